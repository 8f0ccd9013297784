#!/usr/bin/env node
/**
 * The `effect-idempotency` command. `sql-schema` prints the SQL storage's DDL for a dialect and a
 * table (`SqlStorage.schema(...).createScript`), or with `--drop` the statements that remove it,
 * ready to pipe into psql, mariadb or sqlite3. It loads only the DDL module: neither `@effect/sql`
 * nor a driver needs to be installed.
 *
 * @since 0.1.0
 */
import * as SqlSchema from "./internal/sql/schema.js"

const usage = `Usage: effect-idempotency sql-schema --dialect pg|mysql|sqlite [--table name] [--drop]

Prints the DDL of the SQL storage (effect-idempotency/Storage/Sql) to stdout:
the statements SqlStorage.layer runs when its table is missing or older.

Options:
  --dialect pg|mysql|sqlite  pg: PostgreSQL; mysql: MySQL and MariaDB; sqlite: SQLite
  --table name               the storage's table (default ${SqlSchema.defaultTable})
  --drop                     print the statements that drop everything the storage made instead
  -h, --help                 show this help

Examples:
  npx effect-idempotency sql-schema --dialect pg | psql "$DATABASE_URL"
  npx effect-idempotency sql-schema --dialect mysql --table idempotency_records | mariadb app
  npx effect-idempotency sql-schema --dialect sqlite | sqlite3 app.db
`

class UsageError {
  constructor(readonly message: string) {}
}

interface SqlSchemaArguments {
  readonly dialect: SqlSchema.Dialect
  readonly table: string
  readonly drop: boolean
}

const isDialect = (value: string): value is SqlSchema.Dialect => SqlSchema.dialects.some((dialect) => dialect === value)

/** Reads `--name value` and `--name=value` alike; each option at most once. */
const parseSqlSchema = (args: ReadonlyArray<string>): SqlSchemaArguments | "help" => {
  const values = new Map<string, string | true>()
  for (let i = 0; i < args.length; i++) {
    const arg = args[i]!
    if (arg === "-h" || arg === "--help") return "help"
    const match = arg.match(/^--([a-z-]+)(?:=(.*))?$/s)
    if (match === null) throw new UsageError(`unexpected argument ${JSON.stringify(arg)}`)
    const name = match[1]!
    if (values.has(name)) throw new UsageError(`--${name} is given more than once`)
    if (name === "drop") {
      if (match[2] !== undefined) throw new UsageError("--drop takes no value")
      values.set(name, true)
    } else if (name === "dialect" || name === "table") {
      const value = match[2] ?? args[++i]
      if (value === undefined || value === "" || (match[2] === undefined && value.startsWith("--"))) {
        throw new UsageError(`--${name} needs a value`)
      }
      values.set(name, value)
    } else {
      throw new UsageError(`unknown option --${name}`)
    }
  }
  const dialect = values.get("dialect")
  if (dialect === undefined) throw new UsageError("--dialect is required")
  if (typeof dialect !== "string" || !isDialect(dialect)) {
    throw new UsageError(`--dialect must be one of ${SqlSchema.dialects.join(", ")}, not ${JSON.stringify(dialect)}`)
  }
  const table = values.get("table")
  const tableName = typeof table === "string" ? table : SqlSchema.defaultTable
  const invalid = SqlSchema.invalidTable(tableName)
  if (invalid !== undefined) throw new UsageError(`--table: ${invalid}`)
  return { dialect, table: tableName, drop: values.get("drop") === true }
}

/** What the command prints and its exit code: 0, or 2 for arguments it cannot use. */
const main = (
  args: ReadonlyArray<string>
): { readonly stdout: string; readonly stderr: string; readonly code: number } => {
  const [command, ...rest] = args
  if (command === "-h" || command === "--help" || command === "help") return { stdout: usage, stderr: "", code: 0 }
  try {
    if (command === undefined) throw new UsageError("no command given")
    if (command !== "sql-schema") throw new UsageError(`unknown command ${JSON.stringify(command)}`)
    const parsed = parseSqlSchema(rest)
    if (parsed === "help") return { stdout: usage, stderr: "", code: 0 }
    const { dialect, drop, table } = parsed
    const script = drop
      ? SqlSchema.toScript(SqlSchema.dropHeader(dialect, table), SqlSchema.dropStatements(dialect, table))
      : SqlSchema.toScript(SqlSchema.createHeader(dialect, table), SqlSchema.createStatements(dialect, table))
    return { stdout: script, stderr: "", code: 0 }
  } catch (error) {
    if (error instanceof UsageError) {
      return { stdout: "", stderr: `effect-idempotency: ${error.message}\n\n${usage}`, code: 2 }
    }
    throw error
  }
}

const result = main(process.argv.slice(2))
process.stdout.write(result.stdout)
process.stderr.write(result.stderr)
process.exitCode = result.code
