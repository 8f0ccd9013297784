/**
 * The SQL storage's schema in the user's hands, on the machine's databases: the DDL as a value and
 * as the `effect-idempotency sql-schema` command (run as a child process), applied with psql,
 * mariadb and sqlite3; `createSchema: false`, which runs no DDL and refuses a schema that is
 * missing or older; the layer's upgrade of an older schema; the migrations under each dialect's
 * Migrator; `--drop`; `layerConfig`. Every table has a name unique to the run and is dropped at the end.
 */
import { NodeContext } from "@effect/platform-node"
import { Migrator, SqlClient, type SqlError } from "@effect/sql"
import { MysqlMigrator } from "@effect/sql-mysql2"
import { PgMigrator } from "@effect/sql-pg"
import { SqliteMigrator } from "@effect/sql-sqlite-node"
import { afterAll, assert, describe, it } from "@effect/vitest"
import { Config, ConfigError, ConfigProvider, Context, Effect, Layer, type Scope } from "effect"
import { spawn } from "node:child_process"
import { randomUUID } from "node:crypto"
import { join } from "node:path"
import { fileURLToPath } from "node:url"
import { IdempotencyError, Idempotent, Storage } from "../src/index.js"
import * as SqlStorage from "../src/Storage/Sql.js"
import { failsWith, failureOf, successOf } from "./fixtures/Exits.js"
import {
  dropTable,
  makeTempDir,
  mysqlClient,
  mysqlSocket,
  pgClient,
  pgUrl,
  sqliteClient,
  statementTracer
} from "./fixtures/sqlClients.js"

const { IdempotencyStorageSetupError } = IdempotencyError

const repoRoot = fileURLToPath(new URL("..", import.meta.url))

// --- child processes ------------------------------------------------------------------------------

interface Finished {
  readonly code: number | null
  readonly stdout: string
  readonly stderr: string
}

/** Runs a command to its end, `input` on its stdin. */
const runProcess = (command: string, args: ReadonlyArray<string>, input = "") =>
  Effect.async<Finished, Error>((resume) => {
    const child = spawn(command, args, { cwd: repoRoot, stdio: ["pipe", "pipe", "pipe"] })
    let stdout = ""
    let stderr = ""
    child.stdout.setEncoding("utf8").on("data", (chunk: string) => (stdout += chunk))
    child.stderr.setEncoding("utf8").on("data", (chunk: string) => (stderr += chunk))
    child.on("error", (error) => resume(Effect.fail(error)))
    child.on("close", (code) => resume(Effect.succeed({ code, stdout, stderr })))
    child.stdin.end(input)
  })

/**
 * The command as `npx tsx src/bin.ts` runs it from a checkout: the tsx that npx would find, called
 * directly (npx itself adds seconds per call on a loaded machine).
 */
const cli = (...args: ReadonlyArray<string>) =>
  runProcess(join(repoRoot, "node_modules", ".bin", "tsx"), ["src/bin.ts", ...args])

/** Runs a command that must succeed; its stdout. */
const succeeds = (command: string, args: ReadonlyArray<string>, input: string) =>
  Effect.flatMap(runProcess(command, args, input), (done) =>
    done.code === 0
      ? Effect.succeed(done.stdout)
      : Effect.die(new Error(`${command} exited with ${done.code}: ${done.stderr}`)))

// --- databases ------------------------------------------------------------------------------------

const run = randomUUID().replaceAll("-", "").slice(0, 8)
const pgTables = new Set<string>()
const mysqlTables = new Set<string>()
const sqliteDir = makeTempDir("idem-sql-schema")

type Dialect = SqlStorage.SqlDialect

interface Case {
  readonly name: string
  readonly dialect: Dialect
  /** A client on the case's database: `path` is a file of its own for SQLite. */
  readonly client: (path: string) => Layer.Layer<SqlClient.SqlClient, Error>
  /** Applies a script with the database's command-line client, if the case has a database one can reach. */
  readonly apply?: (script: string, path: string) => Effect.Effect<unknown, Error>
  readonly tables: Set<string> | undefined
}

const cases: ReadonlyArray<Case> = [
  {
    name: "PostgreSQL",
    dialect: "pg",
    client: () => pgClient({ maxConnections: 2 }),
    apply: (script) => succeeds("psql", ["-v", "ON_ERROR_STOP=1", "-q", pgUrl], script),
    tables: pgTables
  },
  {
    name: "MariaDB",
    dialect: "mysql",
    client: () => mysqlClient({ maxConnections: 2 }),
    apply: (script) => succeeds("mariadb", ["-uroot", `--socket=${mysqlSocket}`, "test"], script),
    tables: mysqlTables
  },
  {
    name: "SQLite (file)",
    dialect: "sqlite",
    client: (path) => sqliteClient(path),
    apply: (script, path) => succeeds("sqlite3", ["-bail", path], script),
    tables: undefined
  },
  { name: "SQLite (:memory:)", dialect: "sqlite", client: () => sqliteClient(":memory:"), tables: undefined }
]

afterAll(async () => {
  const drop = (tables: Set<string>) => Effect.forEach(tables, dropTable, { discard: true })
  try {
    await Effect.runPromise(Effect.provide(drop(pgTables), pgClient({ maxConnections: 1 })))
    await Effect.runPromise(Effect.provide(drop(mysqlTables), mysqlClient({ maxConnections: 1 })))
  } finally {
    sqliteDir.release()
  }
}, 60_000)

/** A table of this run, dropped at the end (with its migrations table). */
const tableFor = (c: Case, label: string) => {
  const name = `idem_schema_${run}_${label}`
  c.tables?.add(name)
  c.tables?.add(`${name}_migrations`)
  return name
}

let files = 0
/** Runs `body` with a fresh client of the case (for SQLite, on a new database file) and its path. */
const withDatabase = <A, E>(
  c: Case,
  body: (path: string) => Effect.Effect<A, E, SqlClient.SqlClient | Scope.Scope>
) => {
  const path = join(sqliteDir.path, `db-${++files}.sqlite`)
  return Effect.scoped(Effect.provide(body(path), c.client(path)))
}

/** Runs statements through the client in context. */
const execute = (statements: ReadonlyArray<string>) =>
  Effect.flatMap(SqlClient.SqlClient, (sql) => Effect.forEach(statements, (statement) => sql.unsafe(statement)))

/** Applies a script with the case's command-line client, or its statements through the client. */
const applyScript = (c: Case, path: string, script: string, statements: ReadonlyArray<string>) =>
  c.apply === undefined ? execute(statements) : c.apply(script, path)

/** Builds the storage on the client in context; its exit. */
const build = (options: SqlStorage.SqlStorageOptions) =>
  Effect.exit(Effect.map(Layer.build(SqlStorage.layer(options)), Context.get(Storage.Storage)))

/** Two calls of one key through wrap: the effect runs once, and the second call is its replay. */
const runsOnceAndReplays = (storage: Storage.StorageService) =>
  Effect.gen(function*() {
    let runs = 0
    const key = `schema ${randomUUID()}`
    const call = Effect.sync(() => ++runs).pipe(
      Idempotent.wrap({ key }),
      Effect.provideService(Storage.Storage, storage)
    )
    assert.strictEqual(yield* call, 1)
    assert.strictEqual(yield* call, 1)
    assert.strictEqual(runs, 1, "the wrapped effect ran once")
  })

/** Every object in the catalogs whose name starts with the table's. */
const objectsOf = (dialect: Dialect, table: string) =>
  Effect.flatMap(SqlClient.SqlClient, (sql) => {
    switch (dialect) {
      case "pg":
        return Effect.map(
          sql<{ readonly name: string }>`
            SELECT relname AS name FROM pg_class WHERE starts_with(relname, ${table})
            UNION ALL SELECT proname FROM pg_proc WHERE starts_with(proname, ${table})
          `,
          (rows) => rows.map((row) => row.name).sort()
        )
      case "mysql":
        return Effect.map(
          sql<{ readonly name: string }>`
            SELECT TABLE_NAME AS name FROM information_schema.TABLES
            WHERE TABLE_SCHEMA = DATABASE() AND LEFT(TABLE_NAME, ${table.length}) = ${table}
          `,
          (rows) => rows.map((row) => row.name).sort()
        )
      case "sqlite":
        return Effect.map(
          sql<
            { readonly name: string }
          >`SELECT name FROM sqlite_master WHERE substr(name, 1, ${table.length}) = ${table}`,
          (rows) => rows.map((row) => row.name).sort()
        )
    }
  })

/** The storage's objects right after its schema was made, by dialect. */
const expectedObjects = (dialect: Dialect, table: string): ReadonlyArray<string> => {
  switch (dialect) {
    case "pg":
      return [
        table,
        `${table}_acquire_v1`,
        `${table}_commit_v1`,
        `${table}_expires_at_idx`,
        `${table}_leases`,
        `${table}_leases_pkey`,
        `${table}_pkey`
      ].sort()
    case "mysql":
      return [table]
    case "sqlite":
      return [table, `${table}_expires_at_idx`].sort()
  }
}

const isDdl = (query: string) => /^(CREATE|ALTER|COMMENT|DROP)\b/i.test(query)

// --- the DDL as a value and as a command -----------------------------------------------------------

describe("SqlStorage.schema and the sql-schema command", () => {
  it.live(
    "the command prints exactly SqlStorage.schema(...).createScript, or dropScript with --drop",
    () =>
      Effect.gen(function*() {
        for (const dialect of ["pg", "mysql", "sqlite"] as const) {
          for (const table of [undefined, "orders_idempotency"]) {
            const expected = SqlStorage.schema({ dialect, table })
            const args = ["sql-schema", "--dialect", dialect, ...(table === undefined ? [] : ["--table", table])]
            const created = yield* cli(...args)
            assert.strictEqual(created.code, 0, created.stderr)
            assert.strictEqual(created.stdout, expected.createScript)
            assert.strictEqual(created.stderr, "")
            const dropped = yield* cli(...args, "--drop")
            assert.strictEqual(dropped.code, 0, dropped.stderr)
            assert.strictEqual(dropped.stdout, expected.dropScript)
          }
        }
      }),
    { timeout: 120_000 }
  )

  it.live("the scripts are the statements, each terminated, in order", () =>
    Effect.sync(() => {
      for (const dialect of ["pg", "mysql", "sqlite"] as const) {
        const ddl = SqlStorage.schema({ dialect, table: "t" })
        assert.strictEqual(ddl.version, SqlStorage.schemaVersion)
        assert.strictEqual(ddl.table, "t")
        assert.isTrue(ddl.createScript.endsWith(";\n"))
        let at = 0
        for (const statement of ddl.create) {
          const found = ddl.createScript.indexOf(`${statement};\n`, at)
          assert.isAbove(found, at - 1, statement)
          at = found + statement.length
        }
        for (const statement of ddl.drop) assert.include(ddl.dropScript, `${statement};\n`)
      }
      // On PostgreSQL the drop names both functions, whose table alone would leave them behind.
      const pg = SqlStorage.schema({ dialect: "pg", table: "t" })
      assert.isTrue(pg.drop.some((statement) => statement.startsWith("DROP FUNCTION IF EXISTS \"t_acquire_v1\"(")))
      assert.isTrue(pg.drop.some((statement) => statement.startsWith("DROP FUNCTION IF EXISTS \"t_commit_v1\"(")))
    }))

  it.live("arguments it cannot use: a message on stderr, the usage, exit code 2", () =>
    Effect.gen(function*() {
      const bad: ReadonlyArray<readonly [ReadonlyArray<string>, string]> = [
        [[], "no command given"],
        [["schema"], "unknown command \"schema\""],
        [["sql-schema"], "--dialect is required"],
        [["sql-schema", "--dialect", "oracle"], "--dialect must be one of pg, mysql, sqlite"],
        [["sql-schema", "--dialect"], "--dialect needs a value"],
        [["sql-schema", "--dialect", "pg", "--table", "a-b"], "--table: the table name \"a-b\""],
        [["sql-schema", "--dialect", "pg", "--table"], "--table needs a value"],
        [["sql-schema", "--dialect", "pg", "--schema", "x"], "unknown option --schema"],
        [["sql-schema", "--dialect", "pg", "--dialect", "mysql"], "--dialect is given more than once"],
        [["sql-schema", "--dialect", "pg", "extra"], "unexpected argument \"extra\""],
        [["sql-schema", "--dialect", "pg", "--drop=yes"], "--drop takes no value"]
      ]
      yield* Effect.forEach(bad, ([args, message]) =>
        Effect.map(cli(...args), (done) => {
          assert.strictEqual(done.code, 2, args.join(" "))
          assert.strictEqual(done.stdout, "", args.join(" "))
          assert.include(done.stderr, `effect-idempotency: ${message}`)
          assert.include(done.stderr, "Usage: effect-idempotency sql-schema --dialect pg|mysql|sqlite")
        }), { concurrency: 3, discard: true })
      for (const args of [["--help"], ["sql-schema", "--help"], ["sql-schema", "-h"]]) {
        const help = yield* cli(...args)
        assert.strictEqual(help.code, 0)
        assert.include(help.stdout, "Usage: effect-idempotency sql-schema")
        assert.strictEqual(help.stderr, "")
      }
    }), { timeout: 120_000 })

  it.live("SqlStorage.schema refuses a table name or a dialect the storage would refuse", () =>
    Effect.sync(() => {
      for (const table of ["", "1st", "a-b", "a\"b", "x".repeat(49)]) {
        const thrown = (() => {
          try {
            SqlStorage.schema({ dialect: "pg", table })
          } catch (error) {
            return error
          }
        })()
        assert.instanceOf(thrown, IdempotencyStorageSetupError, JSON.stringify(table))
      }
      assert.throws(() => SqlStorage.schema({ dialect: "oracle" as Dialect }), /oracle/)
    }))
})

// --- per dialect ----------------------------------------------------------------------------------

for (const c of cases) {
  describe(`SqlStorage schema on ${c.name}`, () => {
    it.live(
      c.apply === undefined
        ? "the statements of SqlStorage.schema, run through the client, are a schema createSchema: false accepts"
        : "the command's output, applied with the database's client, is a schema createSchema: false accepts; --drop leaves nothing",
      () =>
        withDatabase(c, (path) =>
          Effect.gen(function*() {
            const table = tableFor(c, "cli")
            const ddl = SqlStorage.schema({ dialect: c.dialect, table })
            const printed = yield* cli("sql-schema", "--dialect", c.dialect, "--table", table)
            assert.strictEqual(printed.code, 0, printed.stderr)
            yield* applyScript(c, path, printed.stdout, ddl.create)
            assert.deepStrictEqual(yield* objectsOf(c.dialect, table), expectedObjects(c.dialect, table))

            const storage = successOf(yield* build({ table, createSchema: false }))
            yield* runsOnceAndReplays(storage)

            // Applied again, the script changes nothing and keeps the rows.
            yield* applyScript(c, path, printed.stdout, ddl.create)
            yield* runsOnceAndReplays(successOf(yield* build({ table, createSchema: false })))

            const drop = yield* cli("sql-schema", "--dialect", c.dialect, "--table", table, "--drop")
            assert.strictEqual(drop.code, 0, drop.stderr)
            yield* applyScript(c, path, drop.stdout, ddl.drop)
            assert.deepStrictEqual(yield* objectsOf(c.dialect, table), [])
          })),
      { timeout: 60_000 }
    )

    it.live("createSchema: false on a missing table fails at build, naming it and the fix, and creates nothing", () =>
      withDatabase(c, () =>
        Effect.gen(function*() {
          const table = tableFor(c, "missing")
          const error = failsWith(yield* build({ table, createSchema: false }), IdempotencyStorageSetupError)
          assert.strictEqual(error.backend, "sql")
          assert.include(error.detail, `table ${c.dialect === "mysql" ? `\`${table}\`` : `"${table}"`} does not exist`)
          if (c.dialect === "pg") {
            assert.include(error.detail, `table "${table}_leases" does not exist`)
            assert.include(error.detail, `function "${table}_acquire_v1"(`)
            assert.include(error.detail, `function "${table}_commit_v1"(`)
          }
          assert.include(error.detail, "createSchema is false")
          assert.include(error.detail, `npx effect-idempotency sql-schema --dialect ${c.dialect} --table ${table}`)
          assert.include(error.detail, `SqlStorage.schema({ dialect: "${c.dialect}", table: "${table}" })`)
          assert.include(error.detail, `SqlStorage.migrations({ table: "${table}" })`)
          assert.deepStrictEqual(yield* objectsOf(c.dialect, table), [])
        })))

    it.live("createSchema: true runs the DDL only when the schema is missing or older, not on a current one", () =>
      withDatabase(c, () =>
        Effect.gen(function*() {
          const table = tableFor(c, "nodll")
          const first: Array<string> = []
          successOf(yield* Effect.withTracer(build({ table }), statementTracer(first)))
          assert.isTrue(first.some(isDdl), first.join("\n---\n"))
          const again: Array<string> = []
          const storage = successOf(yield* Effect.withTracer(build({ table }), statementTracer(again)))
          assert.deepStrictEqual(again.filter(isDdl), [])
          yield* runsOnceAndReplays(storage)
        })))

    if (c.dialect === "pg") {
      it.live(
        "objects of an older version: createSchema: false names each and fails; createSchema: true upgrades them",
        () =>
          withDatabase(c, () =>
            Effect.gen(function*() {
              const table = tableFor(c, "older")
              const ddl = SqlStorage.schema({ dialect: "pg", table })
              // As the library made them before it marked its objects: no comments.
              yield* execute(ddl.create.filter((statement) => !statement.startsWith("COMMENT")))
              const unmarked = failsWith(yield* build({ table, createSchema: false }), IdempotencyStorageSetupError)
              for (
                const object of [
                  `table "${table}"`,
                  `table "${table}_leases"`,
                  `function "${table}_acquire_v1"(`,
                  `function "${table}_commit_v1"(`
                ]
              ) {
                assert.match(unmarked.detail, new RegExp(`${escape(object)}[^;]* carries no schema version`))
              }
              assert.include(unmarked.detail, `sql-schema --dialect pg --table ${table}`)

              yield* runsOnceAndReplays(successOf(yield* build({ table })))
              yield* runsOnceAndReplays(successOf(yield* build({ table, createSchema: false })))

              // One function of an older version: only it is named.
              const sql = yield* SqlClient.SqlClient
              yield* sql.unsafe(
                `COMMENT ON FUNCTION "${table}_commit_v1"(bytea, text, text, bytea, double precision) ` +
                  `IS 'effect-idempotency schema version 0'`
              )
              const older = failsWith(yield* build({ table, createSchema: false }), IdempotencyStorageSetupError)
              assert.include(
                older.detail,
                `function "${table}_commit_v1"(bytea, text, text, bytea, double precision) is of schema version 0`
              )
              assert.notInclude(older.detail, "acquire_v1")
              successOf(yield* build({ table }))
              successOf(yield* build({ table, createSchema: false }))
            })),
        { timeout: 60_000 }
      )
    }

    if (c.dialect === "mysql") {
      it.live("a table of an older version: createSchema: false fails naming it; createSchema: true upgrades it", () =>
        withDatabase(c, () =>
          Effect.gen(function*() {
            const table = tableFor(c, "older")
            const sql = yield* SqlClient.SqlClient
            yield* execute(SqlStorage.schema({ dialect: "mysql", table }).create)
            yield* sql.unsafe(`ALTER TABLE \`${table}\` COMMENT = ''`)
            const error = failsWith(yield* build({ table, createSchema: false }), IdempotencyStorageSetupError)
            assert.include(error.detail, `table \`${table}\` carries no schema version`)
            assert.include(error.detail, `sql-schema --dialect mysql --table ${table}`)
            yield* runsOnceAndReplays(successOf(yield* build({ table })))
            yield* runsOnceAndReplays(successOf(yield* build({ table, createSchema: false })))
          })))
    }

    if (c.dialect === "sqlite") {
      it.live("an older table: a missing index or column, or an older marker, fails createSchema: false naming it", () =>
        withDatabase(c, () =>
          Effect.gen(function*() {
            const sql = yield* SqlClient.SqlClient
            const [create, index] = SqlStorage.schema({ dialect: "sqlite", table: tableFor(c, "x") }).create

            // Without its index: named; createSchema: true makes it.
            const noIndex = tableFor(c, "noindex")
            yield* execute([SqlStorage.schema({ dialect: "sqlite", table: noIndex }).create[0]!])
            const missingIndex = failsWith(
              yield* build({ table: noIndex, createSchema: false }),
              IdempotencyStorageSetupError
            )
            assert.include(missingIndex.detail, `index "${noIndex}_expires_at_idx" does not exist`)
            yield* runsOnceAndReplays(successOf(yield* build({ table: noIndex })))
            successOf(yield* build({ table: noIndex, createSchema: false }))

            // Without a column: named, and no DDL of this version can add it.
            const noColumn = tableFor(c, "nocolumn")
            yield* execute(SqlStorage.schema({ dialect: "sqlite", table: noColumn }).create)
            yield* sql.unsafe(`ALTER TABLE "${noColumn}" DROP COLUMN token`)
            const missingColumn = failsWith(
              yield* build({ table: noColumn, createSchema: false }),
              IdempotencyStorageSetupError
            )
            assert.include(missingColumn.detail, `table "${noColumn}" has no column token`)
            const notUpgraded = failsWith(yield* build({ table: noColumn }), IdempotencyStorageSetupError)
            assert.include(notUpgraded.detail, "still not usable after its statements ran")
            assert.include(notUpgraded.detail, `has no column token`)

            // Marked with an older version.
            const marked = tableFor(c, "marked")
            yield* execute(
              SqlStorage.schema({ dialect: "sqlite", table: marked }).create.map((statement) =>
                statement.replace("effect-idempotency schema version 1", "effect-idempotency schema version 0")
              )
            )
            const older = failsWith(yield* build({ table: marked, createSchema: false }), IdempotencyStorageSetupError)
            assert.include(older.detail, `table "${marked}" is of schema version 0: version 1 is needed`)

            // Unmarked, with every column and the index, as the layer made it before marking: accepted.
            const unmarked = tableFor(c, "unmarked")
            yield* execute(
              [create!, index!].map((statement) =>
                statement.replaceAll(tableFor(c, "x"), unmarked).replace(/\n {2}-- effect-idempotency[^\n]*/, "")
              )
            )
            yield* runsOnceAndReplays(successOf(yield* build({ table: unmarked, createSchema: false })))
          })))
    }

    it.live(
      "the migrations, run by the dialect's Migrator, make a schema createSchema: false accepts",
      () =>
        withDatabase(c, () =>
          Effect.gen(function*() {
            const table = tableFor(c, "migrated")
            const options = {
              loader: Migrator.fromRecord(SqlStorage.migrations({ table })),
              table: `${table}_migrations`
            }
            // Each case's client layer provides the dialect's own client tag too, which its Migrator asks for.
            const migrate = (c.dialect === "pg"
              ? PgMigrator.run(options)
              : c.dialect === "mysql"
              ? MysqlMigrator.run(options)
              : SqliteMigrator.run(options)).pipe(Effect.provide(NodeContext.layer)) as Effect.Effect<
                ReadonlyArray<readonly [number, string]>,
                Migrator.MigrationError | SqlError.SqlError,
                SqlClient.SqlClient
              >
            const ran = yield* migrate
            assert.deepStrictEqual(ran, [[1, `${table}_schema_v1`]])
            // Run again: nothing left to run.
            const again = yield* migrate
            assert.deepStrictEqual(again, [])
            assert.deepStrictEqual(
              (yield* objectsOf(c.dialect, table)).filter((name) => !name.startsWith(`${table}_migrations`)),
              expectedObjects(c.dialect, table)
            )
            yield* runsOnceAndReplays(successOf(yield* build({ table, createSchema: false })))
          })),
      { timeout: 60_000 }
    )
  })
}

const escape = (text: string) => text.replace(/[.*+?^${}()|[\]\\]/g, "\\$&")

// --- layerConfig ----------------------------------------------------------------------------------

describe("SqlStorage.layerConfig", () => {
  const configured = (entries: ReadonlyArray<readonly [string, string]>) =>
    Effect.exit(
      Effect.map(
        Layer.build(
          SqlStorage.layerConfig({
            table: Config.string("IDEMPOTENCY_TABLE"),
            createSchema: Config.boolean("IDEMPOTENCY_CREATE_SCHEMA"),
            cleanupBatchSize: Config.integer("IDEMPOTENCY_CLEANUP_BATCH").pipe(Config.withDefault(1000))
          })
        ),
        Context.get(Storage.Storage)
      ).pipe(Effect.withConfigProvider(ConfigProvider.fromMap(new Map(entries))))
    )

  it.live("reads the options from Config: the table and createSchema come from the provider", () =>
    Effect.scoped(
      Effect.gen(function*() {
        const table = `idem_schema_${run}_config`
        const refused = failsWith(
          yield* configured([["IDEMPOTENCY_TABLE", table], ["IDEMPOTENCY_CREATE_SCHEMA", "false"]]),
          IdempotencyStorageSetupError
        )
        assert.include(refused.detail, `table "${table}" does not exist`)
        const storage = successOf(
          yield* configured([["IDEMPOTENCY_TABLE", table], ["IDEMPOTENCY_CREATE_SCHEMA", "true"]])
        )
        yield* runsOnceAndReplays(storage)
        assert.deepStrictEqual(yield* objectsOf("sqlite", table), expectedObjects("sqlite", table))
        // An option the storage refuses, read from Config, fails the build as it does given directly.
        const bad = failsWith(
          yield* configured([
            ["IDEMPOTENCY_TABLE", table],
            ["IDEMPOTENCY_CREATE_SCHEMA", "true"],
            ["IDEMPOTENCY_CLEANUP_BATCH", "0"]
          ]),
          IdempotencyStorageSetupError
        )
        assert.include(bad.detail, "cleanupBatchSize")
      }).pipe(Effect.provide(sqliteClient(":memory:")))
    ))

  it.live("a value that cannot be read fails the build with its ConfigError", () =>
    Effect.scoped(
      Effect.gen(function*() {
        for (
          const entries of [
            [["IDEMPOTENCY_CREATE_SCHEMA", "true"]],
            [["IDEMPOTENCY_TABLE", "t"], ["IDEMPOTENCY_CREATE_SCHEMA", "maybe"]]
          ] as const
        ) {
          assert.isTrue(ConfigError.isConfigError(failureOf(yield* configured(entries))), JSON.stringify(entries))
        }
      }).pipe(Effect.provide(sqliteClient(":memory:")))
    ))
})
