/**
 * What the database holds of the SQL storage's schema, compared with what this version of the
 * library needs: read-only queries of the catalogs, which need no privilege beyond seeing the
 * objects.
 */
import type * as SqlClient from "@effect/sql/SqlClient"
import type { SqlError } from "@effect/sql/SqlError"
import * as Effect from "effect/Effect"
import * as Schema from "./schema.js"

/**
 * Why an object of the schema is not what this version needs, in words for the build's error.
 *
 * @internal
 */
export type Problem = string

const olderThanNeeded = (object: string, comment: string | null | undefined): Problem | undefined => {
  const marked = Schema.markedVersion(comment)
  if (marked === undefined) {
    return `${object} carries no schema version (made by an earlier effect-idempotency, or by hand): ` +
      `version ${Schema.version} is needed`
  }
  return marked < Schema.version
    ? `${object} is of schema version ${marked}: version ${Schema.version} is needed`
    : undefined
}

// Each object by the name the storage's statements use, so resolved through the search_path as
// they are. A newer version is fine: its objects keep serving older instances (see `version`).
const postgres = (sql: SqlClient.SqlClient, table: string): Effect.Effect<ReadonlyArray<Problem>, SqlError> => {
  const functions = Schema.postgresFunctions(table)
  const objects = [
    { object: `table "${table}"`, find: `to_regclass('"${table}"')`, catalog: "pg_class" },
    {
      object: `table "${Schema.leasesOf(table)}"`,
      find: `to_regclass('"${Schema.leasesOf(table)}"')`,
      catalog: "pg_class"
    },
    {
      object: `function ${functions.acquireSignature}`,
      find: `to_regprocedure('${functions.acquireSignature}')`,
      catalog: "pg_proc"
    },
    {
      object: `function ${functions.commitSignature}`,
      find: `to_regprocedure('${functions.commitSignature}')`,
      catalog: "pg_proc"
    }
  ]
  // The names are checked identifiers: the query holds them as literals.
  const query = objects.map(({ catalog, find }, index) =>
    `SELECT ${index} AS i, ${find} IS NOT NULL AS present, obj_description(${find}, '${catalog}') AS comment`
  ).join(" UNION ALL ")
  return Effect.map(
    sql.unsafe<{ readonly i: number; readonly present: boolean; readonly comment: string | null }>(query),
    (rows) =>
      objects.flatMap(({ object }, index) => {
        const row = rows.find((row) => Number(row.i) === index)
        if (row === undefined || !row.present) return [`${object} does not exist`]
        const older = olderThanNeeded(object, row.comment)
        return older === undefined ? [] : [older]
      })
  )
}

const mysql = (sql: SqlClient.SqlClient, table: string): Effect.Effect<ReadonlyArray<Problem>, SqlError> =>
  Effect.map(
    sql<{ readonly comment: string | null }>`
      SELECT TABLE_COMMENT AS comment FROM information_schema.TABLES
      WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = ${table}
    `,
    (rows) => {
      const object = `table \`${table}\``
      if (rows.length === 0) return [`${object} does not exist in the connection's database`]
      const older = olderThanNeeded(object, rows[0]!.comment)
      return older === undefined ? [] : [older]
    }
  )

// SQLite cannot change a table's marker short of making the table again, so its check is of the
// table's shape: a table without a marker is accepted when it has every column and the index (as
// this library made it before it marked its tables), and a marker, when there is one, must not be
// older.
const sqlite = (sql: SqlClient.SqlClient, table: string): Effect.Effect<ReadonlyArray<Problem>, SqlError> =>
  Effect.map(
    Effect.all([
      sql<{ readonly sql: string | null }>`SELECT sql FROM sqlite_master WHERE type = 'table' AND name = ${table}`,
      sql<{ readonly name: string }>`SELECT name FROM pragma_table_info(${table})`,
      sql<{ readonly name: string }>`SELECT name FROM pragma_index_list(${table})`
    ]),
    ([tables, columns, indexes]) => {
      const object = `table "${table}"`
      if (tables.length === 0) return [`${object} does not exist`]
      const problems: Array<Problem> = []
      const marked = Schema.markedVersion(tables[0]!.sql)
      if (marked !== undefined && marked < Schema.version) {
        problems.push(`${object} is of schema version ${marked}: version ${Schema.version} is needed`)
      }
      const present = new Set(columns.map((column) => column.name))
      const missing = Schema.columns.filter((column) => !present.has(column))
      if (missing.length > 0) problems.push(`${object} has no column ${missing.join(", ")}`)
      const index = Schema.expiryIndexOf(table)
      if (!indexes.some((row) => row.name === index)) problems.push(`index "${index}" does not exist`)
      return problems
    }
  )

/**
 * What keeps the database's objects for `table` from serving this version: none when they are all
 * there and of the current version (or newer).
 *
 * @internal
 */
export const inspect = (
  sql: SqlClient.SqlClient,
  dialect: Schema.Dialect,
  table: string
): Effect.Effect<ReadonlyArray<Problem>, SqlError> => {
  switch (dialect) {
    case "pg":
      return postgres(sql, table)
    case "mysql":
      return mysql(sql, table)
    case "sqlite":
      return sqlite(sql, table)
  }
}

/**
 * The build's error detail when `createSchema` is false and the schema is not ready: what is
 * missing or older, and the three ways to get it.
 *
 * @internal
 */
export const notReady = (dialect: Schema.Dialect, table: string, problems: ReadonlyArray<Problem>): string =>
  `the schema for table ${table} is not ready and createSchema is false, so the layer runs no DDL: ` +
  `${problems.join("; ")}. Apply the statements of SqlStorage.schema({ dialect: "${dialect}", table: "${table}" })` +
  `.create (printed by \`npx effect-idempotency sql-schema --dialect ${dialect} --table ${table}\`), or run ` +
  `SqlStorage.migrations({ table: "${table}" }) with @effect/sql's Migrator, as a role that may run DDL`

/**
 * The build's error detail when the layer ran the schema's statements and the objects are still
 * not what this version needs (a table of the same name with other columns, say).
 *
 * @internal
 */
export const notUpgraded = (dialect: Schema.Dialect, table: string, problems: ReadonlyArray<Problem>): string =>
  `the schema for table ${table} is still not usable after its statements ran: ${problems.join("; ")}. ` +
  `Drop or rename the objects in the way (\`npx effect-idempotency sql-schema --dialect ${dialect} --table ${table} ` +
  `--drop\` prints what the storage made), or give the storage another table`
