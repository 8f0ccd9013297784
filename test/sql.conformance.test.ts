/**
 * The conformance suite on every SQL dialect of the machine: PostgreSQL, MariaDB, a SQLite file and
 * SQLite `:memory:`. Each runs on a table of its own, dropped at the end. PostgreSQL runs it with
 * each session default isolation level (READ COMMITTED, REPEATABLE READ, SERIALIZABLE) and MariaDB
 * with REPEATABLE READ and SERIALIZABLE: the storage's statements must not depend on the level.
 *
 * Independent builds of the layer race for the same keys (`sharedAcrossBuilds`) on each of them:
 * on PostgreSQL, MariaDB and the SQLite file every build opens its own pool or connection to the
 * same database. A `:memory:` database lives and dies with its connection, so a fresh client per
 * build would be a database per build; there the builds share one client, built once for the file,
 * as the storages of several services in one process over one in-memory database would.
 */
import { afterAll } from "@effect/vitest"
import { Effect, Exit, Layer, Scope } from "effect"
import { join } from "node:path"
import * as SqlStorage from "../src/Storage/Sql.js"
import { conformance } from "../src/testing.js"
import {
  dropTable,
  isolationLevels,
  makeTempDir,
  mysqlClient,
  pgClient,
  sqliteClient,
  uniqueTable
} from "./fixtures/sqlClients.js"

// A 1 second base lease (the suite's default is 300 millis): on a busy two-core machine running
// other suites beside this one, a 150 millis sleep has been seen to take over 300.
const options = { sharedAcrossBuilds: true, lease: "1 second" } as const

// Short: table names stay within the storage's 48 characters.
const label = (isolation: string) => isolation.split(" ").map((word) => word[0]!.toLowerCase()).join("")

const pgTables = isolationLevels.pg.map((isolation) => {
  const table = uniqueTable(`conformance_pg_${label(isolation)}`)
  conformance(
    `SqlStorage on PostgreSQL, ${isolation}`,
    SqlStorage.layer({ table }).pipe(
      Layer.provide(pgClient({ applicationName: `${table}-conformance`, isolation }))
    ),
    options
  )
  return table
})

const mysqlTables = isolationLevels.mysql.map((isolation) => {
  const table = uniqueTable(`conformance_mysql_${label(isolation)}`)
  conformance(
    `SqlStorage on MariaDB, ${isolation}`,
    SqlStorage.layer({ table }).pipe(Layer.provide(mysqlClient({ isolation }))),
    options
  )
  return table
})

const dir = makeTempDir("idem-sqlite-conformance")
conformance(
  "SqlStorage on a SQLite file",
  SqlStorage.layer({ table: uniqueTable("conformance") }).pipe(
    Layer.provide(sqliteClient(join(dir.path, "conformance.db")))
  ),
  options
)

const memoryScope = Effect.runSync(Scope.make())
const memoryClient = await Effect.runPromise(Layer.buildWithScope(sqliteClient(":memory:"), memoryScope))
conformance(
  "SqlStorage on SQLite :memory:",
  SqlStorage.layer({ table: uniqueTable("conformance") }).pipe(Layer.provide(Layer.succeedContext(memoryClient))),
  options
)

afterAll(() =>
  Effect.runPromise(
    Effect.all([
      Scope.close(memoryScope, Exit.void),
      Effect.provide(Effect.forEach(pgTables, dropTable), pgClient({ maxConnections: 1 })),
      Effect.provide(Effect.forEach(mysqlTables, dropTable), mysqlClient({ maxConnections: 1 }))
    ], { mode: "validate", discard: true }).pipe(Effect.ensuring(Effect.sync(dir.release)))
  )
)
