/**
 * The SQL backend on the machine's databases: PostgreSQL (`DATABASE_URL`), MariaDB over its socket
 * (`MYSQL_SOCKET`), and SQLite in memory and in a file. Schema, statement counts, fencing, cleanup,
 * waiting, transactions with the caller, odd input and errors, per dialect. A database that
 * cannot be reached fails these tests; nothing is skipped. Every table this file creates has a name
 * unique to the run and is dropped at the end.
 */
import { SqlClient } from "@effect/sql"
import { MysqlClient } from "@effect/sql-mysql2"
import { PgClient } from "@effect/sql-pg"
import { SqliteClient } from "@effect/sql-sqlite-node"
import { afterAll, assert, describe, it } from "@effect/vitest"
import {
  Cause,
  Context,
  Deferred,
  Duration,
  Effect,
  Exit,
  Fiber,
  Layer,
  Logger,
  LogLevel,
  Option,
  Redacted,
  Schema,
  type Scope
} from "effect"
import { createHash, randomBytes, randomUUID } from "node:crypto"
import { mkdtempSync, rmSync } from "node:fs"
import { connect, createServer, type Socket } from "node:net"
import { tmpdir } from "node:os"
import { join } from "node:path"
import { IdempotencyError, Idempotent, Storage } from "../src/index.js"
import * as SqlStorage from "../src/Storage/Sql.js"
import { failsWith } from "./fixtures/Exits.js"
import {
  dropTable,
  isolationLevels,
  mysqlClient as fixtureMysqlClient,
  pgClient as fixturePgClient,
  postgresFunctions,
  statementTracer
} from "./fixtures/sqlClients.js"

const { IdempotencyStorageError, IdempotencyStorageSetupError } = IdempotencyError

// --- databases ------------------------------------------------------------------------------------

const pgUrl = process.env.DATABASE_URL ?? "postgres://postgres@127.0.0.1:5432/test"
const mysqlSocket = process.env.MYSQL_SOCKET ?? "/run/mysqld/mysqld.sock"

const unreachable = (what: string) => (cause: unknown) =>
  new Error(`${what} is unreachable: start it as STACK.md says; these tests need it and do not skip`, { cause })

// Small pools: these tests build many, and share the server's 100 connections with the other SQL
// suites running beside them.
const pgClient = (url = pgUrl) =>
  PgClient.layer({ url: Redacted.make(url), connectTimeout: "5 seconds", maxConnections: 3 }).pipe(
    Layer.mapError(unreachable(`PostgreSQL at ${url}`))
  )

// mysql2 takes a socket as `socketPath` in the pool options. The client's default drops idle
// connections at once; keeping them spares a connect per statement.
const mysqlClient = () =>
  MysqlClient.layer({
    database: "test",
    username: "root",
    maxConnections: 3,
    poolConfig: { socketPath: mysqlSocket, maxIdle: 3 }
  }).pipe(Layer.mapError(unreachable(`MariaDB at ${mysqlSocket}`)))

const sqliteDir = mkdtempSync(join(tmpdir(), "effect-idempotency-sql-"))
const sqliteFile = join(sqliteDir, "idempotency.db")

const sqliteClient = (filename: string) =>
  SqliteClient.layer({ filename }).pipe(Layer.mapError(unreachable(`SQLite ${filename}`)))

type ClientLayer = Layer.Layer<SqlClient.SqlClient, Error>

interface Case {
  readonly name: string
  readonly dialect: "pg" | "mysql" | "sqlite"
  /** A new client: its own pool, or its own connection to the same database. */
  readonly client: () => ClientLayer
  /** Whether two clients see the same data (not so for `:memory:`). */
  readonly shared: boolean
}

const cases: ReadonlyArray<Case> = [
  { name: "PostgreSQL", dialect: "pg", client: () => pgClient(), shared: true },
  { name: "MariaDB", dialect: "mysql", client: mysqlClient, shared: true },
  { name: "SQLite (file)", dialect: "sqlite", client: () => sqliteClient(sqliteFile), shared: true },
  { name: "SQLite (:memory:)", dialect: "sqlite", client: () => sqliteClient(":memory:"), shared: false }
]

const run = randomUUID().replaceAll("-", "").slice(0, 10)
const table = `idem_sqltest_${run}`
const tables = new Set([table])
/** Another table of this run, dropped with the rest. */
const tableFor = (label: string) => {
  const name = `${table}_${label}`
  tables.add(name)
  return name
}

afterAll(async () => {
  const drop = Effect.forEach(tables, dropTable, { discard: true })
  try {
    await Effect.runPromise(Effect.provide(drop, pgClient()))
    await Effect.runPromise(Effect.provide(drop, mysqlClient()))
  } finally {
    rmSync(sqliteDir, { recursive: true, force: true })
  }
}, 60_000)

// --- helpers --------------------------------------------------------------------------------------

/** Runs `body` with a fresh client of the case, closed after. */
const withClient = <A, E>(c: Case, body: Effect.Effect<A, E, SqlClient.SqlClient | Scope.Scope>) =>
  Effect.scoped(Effect.provide(body, c.client()))

/** A storage on the client in context, for the life of the scope. */
const storageOn = (options?: SqlStorage.SqlStorageOptions) =>
  Effect.map(Layer.build(SqlStorage.layer({ table, ...options })), Context.get(Storage.Storage))

/**
 * Another replica: a client of its own where the case has one, else the same client (a second
 * layer on one `:memory:` database). Only a `listening` replica on PostgreSQL keeps its `PgClient`
 * in context, and so a connection of its own for LISTEN: the server's connections are few.
 */
const otherClient = (
  c: Case,
  listening = false
): Effect.Effect<Context.Context<SqlClient.SqlClient>, Error, SqlClient.SqlClient | Scope.Scope> =>
  c.shared
    ? Effect.map(Layer.build(c.client()), (context) => listening ? context : Context.pick(SqlClient.SqlClient)(context))
    : Effect.map(SqlClient.SqlClient, (sql) => Context.make(SqlClient.SqlClient, sql))

const replicaOn = (c: Case, options?: SqlStorage.SqlStorageOptions, listening = false) =>
  Effect.flatMap(otherClient(c, listening), (context) => Effect.provide(storageOn(options), context))

const uniqueKey = (label: string) => `${label} ${randomUUID()}`
const bytes = (text: string) => new TextEncoder().encode(text)
const text = (payload: Uint8Array) => new TextDecoder().decode(payload)
const keyHash = (key: string) => createHash("sha256").update(key, "utf8").digest()
const ttl = Duration.minutes(10)
const longLease = Duration.seconds(30)

const acquired = (result: Storage.AcquireResult): Storage.Lease => {
  if (result._tag !== "Acquired") return assert.fail(`expected Acquired, got ${result._tag}`)
  return result.lease
}

const rowCount = (name: string) =>
  Effect.flatMap(
    SqlClient.SqlClient,
    (sql) =>
      Effect.map(sql<{ readonly n: number | string }>`SELECT COUNT(*) AS n FROM ${sql(name)}`, (rows) =>
        Number(rows[0]?.n))
  )

/** Polls `check` every 50 millis until it holds, failing after `within`. */
const eventually = <E, R>(
  what: string,
  check: Effect.Effect<boolean, E, R>,
  within: Duration.DurationInput = "10 seconds"
) =>
  Effect.gen(function*() {
    const deadline = Date.now() + Duration.toMillis(within)
    while (!(yield* check)) {
      if (Date.now() > deadline) return assert.fail(`${what}: not within ${Duration.format(Duration.decode(within))}`)
      yield* Effect.sleep("50 millis")
    }
  })

const statementsOf = <A, E, R>(effect: Effect.Effect<A, E, R>) =>
  Effect.suspend(() => {
    const queries: Array<string> = []
    return Effect.map(Effect.withTracer(effect, statementTracer(queries)), (value) => ({ value, queries }))
  })

const firstWord = (query: string) => query.split(/\s+/, 1)[0]!.toUpperCase()

/** A fake client of a dialect this storage does not support. */
const fakeClient = (dialect: "mssql" | "clickhouse"): SqlClient.SqlClient => {
  const client = {
    onDialectOrElse: (options: Record<string, (() => unknown) | undefined>) => (options[dialect] ?? options.orElse!)(),
    withoutTransforms: () => client
  }
  return client as unknown as SqlClient.SqlClient
}

class OutOfStock extends Schema.TaggedError<OutOfStock>()("OutOfStock", { sku: Schema.String }) {}
class Unstored extends Schema.TaggedError<Unstored>()("Unstored", {}) {}

// --- configuration, for every dialect at once -------------------------------------------------------

describe("SqlStorage configuration", () => {
  it.live("an invalid table name fails at build with a configure error", () =>
    Effect.gen(function*() {
      for (const name of ["", "1st", "a-b", "a\"b", "a;drop", "schema.table", "x".repeat(49), "naïve", "a b"]) {
        const exit = yield* Effect.exit(
          Effect.scoped(Layer.build(SqlStorage.layer({ table: name }))).pipe(
            Effect.provideService(SqlClient.SqlClient, fakeClient("mssql"))
          )
        )
        const error = failsWith(exit, IdempotencyStorageSetupError)
        assert.strictEqual(error.backend, "sql", `table ${JSON.stringify(name)}`)
        assert.include(error.message, "table name")
      }
    }))

  it.live("an unsupported dialect fails at build with a configure error naming it", () =>
    Effect.gen(function*() {
      for (const dialect of ["mssql", "clickhouse"] as const) {
        const exit = yield* Effect.exit(
          Effect.scoped(Layer.build(SqlStorage.layer())).pipe(
            Effect.provideService(SqlClient.SqlClient, fakeClient(dialect))
          )
        )
        const error = failsWith(exit, IdempotencyStorageSetupError)
        assert.strictEqual(error.backend, "sql")
        assert.include(error.message, `(${dialect}) is not supported`)
      }
    }))

  it.live("a cleanup batch size that is not a positive integer fails at build", () =>
    Effect.gen(function*() {
      for (const cleanupBatchSize of [0, -1, 1.5, Number.NaN]) {
        const exit = yield* Effect.exit(
          Effect.scoped(Layer.build(SqlStorage.layer({ cleanupBatchSize }))).pipe(
            Effect.provideService(SqlClient.SqlClient, fakeClient("mssql"))
          )
        )
        assert.strictEqual(failsWith(exit, IdempotencyStorageSetupError).backend, "sql")
      }
    }))
})

// --- per dialect ----------------------------------------------------------------------------------

const columnTypes = (c: Case, name: string) =>
  Effect.flatMap(SqlClient.SqlClient, (sql) => {
    switch (c.dialect) {
      case "pg":
        return Effect.map(
          sql<{ readonly column_name: string; readonly data_type: string }>`
            SELECT column_name, data_type FROM information_schema.columns WHERE table_name = ${name}
          `,
          (rows) => new Map(rows.map((row) => [row.column_name, row.data_type]))
        )
      case "mysql":
        return Effect.map(
          sql<{ readonly name: string; readonly type: string }>`
            SELECT COLUMN_NAME AS name, COLUMN_TYPE AS type FROM information_schema.columns
            WHERE table_schema = DATABASE() AND table_name = ${name}
          `,
          (rows) => new Map(rows.map((row) => [row.name, row.type.toLowerCase()]))
        )
      case "sqlite":
        return Effect.map(
          sql<{ readonly name: string; readonly type: string }>`SELECT name, type FROM pragma_table_info(${name})`,
          (rows) => new Map(rows.map((row) => [row.name, row.type.toLowerCase()]))
        )
    }
  })

/** PostgreSQL: the bodies of the storage's functions for `name`, by function name. */
const functionSources = (name: string) =>
  Effect.flatMap(SqlClient.SqlClient, (sql) => {
    const functions = postgresFunctions(name)
    return Effect.map(
      sql<{ readonly name: string; readonly source: string }>`
        SELECT proname AS name, prosrc AS source FROM pg_proc
        WHERE proname IN (${functions.acquire}, ${functions.commit})
      `,
      (rows): Record<string, string> => Object.fromEntries(rows.map((row) => [row.name, row.source]))
    )
  })

const primaryKey = (c: Case, name: string) =>
  Effect.flatMap(SqlClient.SqlClient, (sql) => {
    switch (c.dialect) {
      case "pg":
        return Effect.map(
          sql<{ readonly name: string }>`
            SELECT a.attname AS name FROM pg_index i
            JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey)
            WHERE i.indrelid = ${name}::regclass AND i.indisprimary
          `,
          (rows) => rows.map((row) => row.name)
        )
      case "mysql":
        return Effect.map(
          sql<{ readonly name: string }>`
            SELECT COLUMN_NAME AS name FROM information_schema.columns
            WHERE table_schema = DATABASE() AND table_name = ${name} AND COLUMN_KEY = 'PRI'
          `,
          (rows) => rows.map((row) => row.name)
        )
      case "sqlite":
        return Effect.map(
          sql<{ readonly name: string }>`SELECT name FROM pragma_table_info(${name}) WHERE pk > 0`,
          (rows) => rows.map((row) => row.name)
        )
    }
  })

/** The columns of each secondary index of the table. */
const indexedColumns = (c: Case, name: string) =>
  Effect.flatMap(SqlClient.SqlClient, (sql) => {
    switch (c.dialect) {
      case "pg":
        return Effect.map(
          sql<{ readonly indexdef: string }>`SELECT indexdef FROM pg_indexes WHERE tablename = ${name}`,
          (rows) => rows.map((row) => row.indexdef.replace(/.*\((.*)\)$/, "$1"))
        )
      case "mysql":
        return Effect.map(
          sql<{ readonly name: string }>`
            SELECT COLUMN_NAME AS name FROM information_schema.statistics
            WHERE table_schema = DATABASE() AND table_name = ${name} AND INDEX_NAME <> 'PRIMARY'
          `,
          (rows) => rows.map((row) => row.name)
        )
      case "sqlite":
        return Effect.map(
          sql<{ readonly name: string }>`
            SELECT ii.name AS name FROM pragma_index_list(${name}) AS il, pragma_index_info(il.name) AS ii
            WHERE il.origin = 'c'
          `,
          (rows) => rows.map((row) => row.name)
        )
    }
  })

const expectedTypes: Record<Case["dialect"], Record<string, string>> = {
  pg: {
    key_hash: "bytea",
    idempotency_key: "text",
    payload: "bytea",
    fence: "bigint",
    created_at: "timestamp with time zone",
    expires_at: "timestamp with time zone"
  },
  mysql: {
    key_hash: "binary(32)",
    idempotency_key: "text",
    payload: "longblob",
    fence: "bigint(20)",
    created_at: "bigint(20)",
    expires_at: "bigint(20)"
  },
  sqlite: {
    key_hash: "blob",
    idempotency_key: "text",
    payload: "blob",
    fence: "integer",
    created_at: "integer",
    expires_at: "integer"
  }
}

/** Statements per first call and per replay through `Idempotent.wrap`. */
const expectedStatements: Record<
  Case["dialect"],
  { readonly first: ReadonlyArray<string>; readonly replay: ReadonlyArray<string> }
> = {
  // PostgreSQL: acquire and commit are calls of the storage's functions.
  pg: { first: ["SELECT", "SELECT"], replay: ["SELECT"] },
  mysql: { first: ["INSERT", "SELECT", "UPDATE"], replay: ["INSERT", "SELECT"] },
  sqlite: { first: ["INSERT", "UPDATE"], replay: ["INSERT"] }
}

for (const c of cases) {
  describe(`SqlStorage on ${c.name}`, () => {
    describe("table", () => {
      it.live("is created if missing, with its types, primary key on the key's hash and index on the expiry", () =>
        withClient(
          c,
          Effect.gen(function*() {
            const name = tableFor("schema")
            const storage = yield* storageOn({ table: name })
            assert.strictEqual(storage.backend, c.dialect)
            const types = yield* columnTypes(c, name)
            for (const [column, type] of Object.entries(expectedTypes[c.dialect])) {
              assert.strictEqual(types.get(column), type, `column ${column}`)
            }
            assert.sameMembers([...types.keys()], [
              "key_hash",
              "idempotency_key",
              "state",
              "token",
              "fingerprint",
              "fence",
              "outcome",
              "payload",
              "created_at",
              "expires_at"
            ])
            assert.deepStrictEqual(yield* primaryKey(c, name), ["key_hash"])
            assert.include(yield* indexedColumns(c, name), "expires_at")

            // Built again on a table that exists: kept as it is, with its rows.
            const owner = acquired(yield* storage.acquire({ key: "kept", fingerprint: "", lease: longLease }))
            assert.isTrue(yield* storage.commit(owner, { outcome: "success", payload: bytes("1"), ttl }))
            const again = yield* storageOn({ table: name })
            assert.strictEqual(
              (yield* again.acquire({ key: "kept", fingerprint: "", lease: longLease }))._tag,
              "Completed"
            )
          })
        ))

      if (c.shared) {
        it.live("concurrent builds on separate connections create it once, without failing", () =>
          withClient(
            c,
            Effect.gen(function*() {
              const name = tableFor("race")
              const storages = yield* Effect.all(
                Array.from({ length: 8 }, () => replicaOn(c, { table: name })),
                { concurrency: "unbounded" }
              )
              assert.strictEqual(storages.length, 8)
              assert.deepStrictEqual(yield* primaryKey(c, name), ["key_hash"])
            })
          ), { timeout: 60_000 })
      }
    })

    describe("statements", () => {
      it.live("a first call and a replay through Idempotent.wrap cost the documented statements", () =>
        withClient(
          c,
          Effect.gen(function*() {
            const storage = yield* storageOn()
            const key = uniqueKey("count")
            let runs = 0
            const call = Effect.sync(() => ++runs).pipe(
              Idempotent.wrap({ key }),
              Effect.provideService(Storage.Storage, storage)
            )
            const first = yield* statementsOf(call)
            const replay = yield* statementsOf(call)
            assert.strictEqual(first.value, 1)
            assert.strictEqual(replay.value, 1)
            assert.strictEqual(runs, 1)
            const expected = expectedStatements[c.dialect]
            assert.deepStrictEqual(first.queries.map(firstWord), expected.first, first.queries.join("\n---\n"))
            assert.deepStrictEqual(replay.queries.map(firstWord), expected.replay, replay.queries.join("\n---\n"))
            // The acquire decides in the statement itself: insert, or update the row it found.
            if (c.dialect === "pg") {
              const functions = postgresFunctions(table)
              assert.include(first.queries[0]!, `"${functions.acquire}"(`)
              assert.include(first.queries[1]!, `"${functions.commit}"(`)
              assert.include(replay.queries[0]!, `"${functions.acquire}"(`)
              const sources = yield* functionSources(table)
              assert.match(sources[functions.acquire]!, /ON CONFLICT \(key_hash\) DO NOTHING/)
              // A replay is answered from the live row, read alone: the function returns before it
              // locks or writes anything.
              assert.match(
                sources[functions.acquire]!,
                /RETURN QUERY SELECT[\s\S]*?IF FOUND THEN RETURN;[\s\S]*FOR UPDATE/
              )
              assert.match(sources[functions.commit]!, /UPDATE[\s\S]*pg_notify/)
            } else {
              assert.match(first.queries[0]!, c.dialect === "mysql" ? /ON DUPLICATE KEY UPDATE/ : /ON CONFLICT/)
            }
          })
        ))

      it.live("racing acquires on separate connections: one owner per key, the rest see it in flight", () =>
        withClient(
          c,
          Effect.gen(function*() {
            const storages = yield* Effect.all(Array.from({ length: 4 }, () => replicaOn(c)), {
              concurrency: "unbounded"
            })
            const prefix = uniqueKey("race")
            const results = yield* Effect.all(
              Array.from({ length: 50 * 8 }, (_, i) =>
                Effect.map(
                  storages[i % storages.length]!.acquire({
                    key: `${prefix} ${i % 50}`,
                    fingerprint: "fp",
                    lease: longLease
                  }),
                  (result) => [i % 50, result] as const
                )),
              { concurrency: "unbounded" }
            )
            for (let key = 0; key < 50; key++) {
              const answers = results.filter(([k]) => k === key).map(([, result]) => result)
              assert.strictEqual(answers.filter((result) => result._tag === "Acquired").length, 1, `key ${key}`)
              for (const answer of answers) {
                if (answer._tag === "Acquired") continue
                // An answer without the holder's fingerprint would be a statement that saw no row.
                assert.strictEqual(answer._tag, "InFlight")
                if (answer._tag === "InFlight") assert.strictEqual(answer.fingerprint, "fp")
              }
            }
          })
        ), { timeout: 60_000 })
    })

    describe("fencing", () => {
      it.live("the fence is kept in the row and grows with each new owner: expired lease, expired record, release, delete", () =>
        withClient(
          c,
          Effect.gen(function*() {
            const storage = yield* storageOn({ cleanupInterval: "1 hour" })
            const sql = yield* SqlClient.SqlClient
            const key = uniqueKey("fence")
            const short = Duration.millis(200)
            const storedFence = Effect.map(
              sql<{ readonly fence: number | string }>`SELECT fence FROM ${sql(table)} WHERE key_hash = ${
                keyHash(key)
              }`,
              (rows) => Number(rows[0]?.fence)
            )
            const fences: Array<number> = []

            const first = acquired(yield* storage.acquire({ key, fingerprint: "fp", lease: short }))
            fences.push(first.fence)
            assert.strictEqual(yield* storedFence, first.fence)
            yield* Effect.sleep("400 millis")
            const afterLease = acquired(yield* storage.acquire({ key, fingerprint: "fp", lease: longLease }))
            fences.push(afterLease.fence)
            assert.isTrue(yield* storage.commit(afterLease, { outcome: "success", payload: bytes("1"), ttl: short }))
            yield* Effect.sleep("400 millis")
            const afterRecord = acquired(yield* storage.acquire({ key, fingerprint: "fp", lease: longLease }))
            fences.push(afterRecord.fence)
            assert.isTrue(yield* storage.release(afterRecord))
            const afterRelease = acquired(yield* storage.acquire({ key, fingerprint: "fp", lease: longLease }))
            fences.push(afterRelease.fence)
            assert.strictEqual(yield* storedFence, afterRelease.fence)
            // Deleting forgets the row; the next owner starts from the database clock.
            yield* storage.delete(key)
            const afterDelete = acquired(yield* storage.acquire({ key, fingerprint: "fp", lease: longLease }))
            fences.push(afterDelete.fence)

            for (let i = 1; i < fences.length; i++) assert.isTrue(fences[i]! > fences[i - 1]!, `fences ${fences}`)
            assert.deepStrictEqual(fences.slice(1, 4), [first.fence + 1, first.fence + 2, first.fence + 3])
            assert.isTrue(Number.isSafeInteger(afterDelete.fence))
          })
        ))
    })

    describe("a commit retried by the token that stored the record", () => {
      it.live("is answered as done and changes nothing, nor brings back a record deleted by its fence", () =>
        withClient(
          c,
          Effect.gen(function*() {
            const storage = yield* storageOn()
            const key = uniqueKey("recommit")
            const owner = acquired(yield* storage.acquire({ key, fingerprint: "fp", lease: longLease }))
            const first = { outcome: "success", payload: new Uint8Array([1]), ttl: Duration.minutes(1) } as const
            assert.isTrue(yield* storage.commit(owner, first))
            const stored = Option.getOrThrow(yield* storage.read(key))
            // Its reply was lost, say: the retry is answered as done, and the record stays as it was.
            assert.isTrue(
              yield* storage.commit(owner, { outcome: "failure", payload: new Uint8Array([2]), ttl: Duration.hours(1) })
            )
            const after = Option.getOrThrow(yield* storage.read(key))
            assert.deepStrictEqual(after.payload, stored.payload)
            assert.strictEqual(after.outcome, "success")
            assert.strictEqual(after.expiresAt - after.createdAt, 60_000)
            assert.strictEqual(after.createdAt, stored.createdAt)
            // Once deleted by its fence, a late retry does not bring it back.
            yield* storage.delete(key, owner.fence)
            yield* storage.commit(owner, first)
            assert.isTrue(Option.isNone(yield* storage.read(key)))
          })
        ))

      it.live("is refused once the record has expired, as on every other backend", () =>
        withClient(
          c,
          Effect.gen(function*() {
            const storage = yield* storageOn()
            const key = uniqueKey("recommit-expired")
            const owner = acquired(yield* storage.acquire({ key, fingerprint: "fp", lease: longLease }))
            const request = { outcome: "success", payload: new Uint8Array([1]), ttl: Duration.seconds(1) } as const
            assert.isTrue(yield* storage.commit(owner, request))
            assert.isTrue(yield* storage.commit(owner, request))
            yield* Effect.sleep("1500 millis")
            assert.isFalse(yield* storage.commit(owner, request))
            assert.isTrue(Option.isNone(yield* storage.read(key)))
          })
        ))
    })

    describe("delete by fence", () => {
      it.live(
        "drops only the completed record carrying the fence: not another fence, not a lease; wakes waiters",
        () =>
          withClient(
            c,
            Effect.gen(function*() {
              const storage = yield* storageOn()
              const key = uniqueKey("delete-fence")
              const owner = acquired(yield* storage.acquire({ key, fingerprint: "fp", lease: longLease }))
              // A lease is left alone, even with its own fence.
              yield* storage.delete(key, owner.fence)
              assert.strictEqual(
                (yield* storage.acquire({ key, fingerprint: "fp", lease: longLease }))._tag,
                "InFlight"
              )
              assert.isTrue(yield* storage.commit(owner, { outcome: "success", payload: bytes("kept"), ttl }))
              // Another fence: the record stays.
              yield* storage.delete(key, owner.fence + 1)
              yield* storage.delete(key, owner.fence - 1)
              assert.strictEqual(text(Option.getOrThrow(yield* storage.read(key)).payload), "kept")

              // Its own fence: gone, and a waiter on another replica hears of it (on PostgreSQL by
              // NOTIFY: a listening replica does not poll, so without the notice it would not wake).
              const replica = yield* replicaOn(c, undefined, true)
              const woken = yield* Effect.fork(Effect.scoped(Effect.flatMap(replica.watch(key), (changed) => changed)))
              yield* Effect.sleep("200 millis")
              yield* storage.delete(key, owner.fence)
              yield* Fiber.join(woken).pipe(
                Effect.timeoutFail({ duration: "5 seconds", onTimeout: () => new Error("the waiter was not woken") })
              )
              assert.isTrue(Option.isNone(yield* storage.read(key)))
              const next = acquired(yield* storage.acquire({ key, fingerprint: "fp", lease: longLease }))
              assert.notStrictEqual(next.token, owner.token)
              // The row kept its fence: the next owner's is higher, even within the same millisecond.
              assert.isAbove(next.fence, owner.fence)

              // A newer record of the key (the fence a second run got) is not dropped by the old fence.
              assert.isTrue(yield* storage.commit(next, { outcome: "success", payload: bytes("newer"), ttl }))
              yield* storage.delete(key, owner.fence)
              assert.strictEqual(text(Option.getOrThrow(yield* storage.read(key)).payload), "newer")
            })
          ),
        { timeout: 30_000 }
      )
    })

    describe("cleanup", () => {
      it.live("expired rows are never replayed, even before the cleanup runs", () =>
        withClient(
          c,
          Effect.gen(function*() {
            const storage = yield* storageOn({ cleanupInterval: "1 hour" })
            const key = uniqueKey("expired")
            const owner = acquired(yield* storage.acquire({ key, fingerprint: "fp", lease: longLease }))
            assert.isTrue(
              yield* storage.commit(owner, { outcome: "success", payload: bytes("1"), ttl: Duration.millis(200) })
            )
            assert.isTrue(Option.isSome(yield* storage.read(key)))
            yield* Effect.sleep("400 millis")
            assert.isTrue(Option.isNone(yield* storage.read(key)))
            const next = acquired(yield* storage.acquire({ key, fingerprint: "other", lease: longLease }))
            assert.strictEqual(next.fence, owner.fence + 1)
          })
        ))

      it.live(
        "a fiber of the layer deletes expired rows in bounded batches, replicas side by side, live rows stay",
        () =>
          withClient(
            c,
            Effect.gen(function*() {
              const name = tableFor("cleanup")
              const warnings: Array<string> = []
              const logger = Logger.replace(
                Logger.defaultLogger,
                Logger.make(({ logLevel, message }) => {
                  if (LogLevel.greaterThanEqual(logLevel, LogLevel.Warning)) warnings.push(String(message))
                })
              )
              // Nothing cleans until the rows are in: then replicas with a short interval start.
              const writer = yield* storageOn({ table: name, cleanupInterval: "1 hour" })
              const short = Duration.millis(1)
              for (let i = 0; i < 40; i++) {
                const owner = acquired(
                  yield* writer.acquire({ key: `expired ${i}`, fingerprint: "", lease: longLease })
                )
                assert.isTrue(
                  yield* writer.commit(owner, { outcome: "success", payload: bytes(String(i)), ttl: short })
                )
              }
              for (let i = 0; i < 5; i++) yield* writer.acquire({ key: `lease ${i}`, fingerprint: "", lease: short })
              for (let i = 0; i < 3; i++) {
                const owner = acquired(yield* writer.acquire({ key: `live ${i}`, fingerprint: "", lease: longLease }))
                assert.isTrue(yield* writer.commit(owner, { outcome: "success", payload: bytes(String(i)), ttl }))
              }
              yield* writer.acquire({ key: "in flight", fingerprint: "", lease: longLease })
              assert.strictEqual(yield* rowCount(name), 49)
              yield* Effect.sleep("20 millis")

              yield* Effect.all(
                Array.from(
                  { length: c.shared ? 3 : 1 },
                  () => replicaOn(c, { table: name, cleanupInterval: "50 millis", cleanupBatchSize: 4 })
                ),
                { concurrency: "unbounded" }
              ).pipe(Effect.provide(logger))
              yield* eventually("the expired rows were deleted", Effect.map(rowCount(name), (n) => n === 4))
              for (let i = 0; i < 3; i++) {
                const record = yield* writer.read(`live ${i}`)
                assert.strictEqual(text(Option.getOrThrow(record).payload), String(i))
              }
              assert.strictEqual(
                (yield* writer.acquire({ key: "in flight", fingerprint: "", lease: longLease }))._tag,
                "InFlight"
              )
              assert.deepStrictEqual(warnings, [])
            })
          ),
        { timeout: 60_000 }
      )
    })

    describe("waiting", () => {
      if (c.dialect === "pg") {
        it.live("with PgClient, waiters on another pool are woken by NOTIFY, not by polling", () =>
          withClient(
            c,
            Effect.gen(function*() {
              // Polls a minute apart: only a notice can wake the waiter in time.
              const waiting = yield* replicaOn(c, { pollInterval: "1 minute" }, true)
              const holder = yield* storageOn()
              assert.isTrue(waiting.capabilities.notification)
              const key = uniqueKey("notify")
              const owner = acquired(yield* holder.acquire({ key, fingerprint: "", lease: Duration.minutes(2) }))
              const waiter = yield* Effect.fork(
                Effect.succeed("ran").pipe(
                  Idempotent.wrap({ key, onInFlight: { wait: "1 minute" } }),
                  Effect.provideService(Storage.Storage, waiting)
                )
              )
              yield* Effect.sleep("300 millis")
              assert.isTrue(yield* holder.commit(owner, { outcome: "success", payload: bytes("\"stored\""), ttl }))
              const started = Date.now()
              const result = yield* Fiber.join(waiter).pipe(Effect.timeout("5 seconds"))
              assert.strictEqual(result, "stored")
              assert.isBelow(Date.now() - started, 2000)
            })
          ), { timeout: 30_000 })

        it.live(
          "the listener comes back after its connection is killed, and its waiters are not stranded",
          () =>
            withClient(
              c,
              Effect.gen(function*() {
                const name = tableFor("listen")
                const sql = yield* SqlClient.SqlClient
                const waiting = yield* replicaOn(c, { table: name, pollInterval: "1 minute" }, true)
                const holder = yield* storageOn({ table: name })
                const listenerPid = Effect.map(
                  sql<{ readonly pid: number }>`
                  SELECT pid FROM pg_stat_activity WHERE query = ${`LISTEN "${name}_changed"`}
                `,
                  (rows) => rows[0]?.pid
                )
                const killed = yield* listenerPid
                assert.isDefined(killed, "no backend is listening on the table's channel")

                const key = uniqueKey("listen")
                const owner = acquired(yield* holder.acquire({ key, fingerprint: "", lease: Duration.minutes(2) }))
                const waiter = yield* Effect.fork(
                  Effect.succeed("ran").pipe(
                    Idempotent.wrap({ key, onInFlight: { wait: "1 minute" } }),
                    Effect.provideService(Storage.Storage, waiting)
                  )
                )
                yield* Effect.sleep("200 millis")
                yield* sql`SELECT pg_terminate_backend(${killed!})`
                yield* eventually(
                  "a new listening connection",
                  Effect.map(listenerPid, (pid) => pid !== undefined && pid !== killed),
                  "20 seconds"
                )
                // Give the heartbeat its confirmation of the new LISTEN.
                yield* Effect.sleep("1500 millis")
                assert.isTrue(yield* holder.commit(owner, { outcome: "success", payload: bytes("\"stored\""), ttl }))
                const started = Date.now()
                assert.strictEqual(yield* Fiber.join(waiter).pipe(Effect.timeout("10 seconds")), "stored")
                assert.isBelow(Date.now() - started, 2000)
              })
            ),
          { timeout: 60_000 }
        )

        it.live("through a PostgreSQL client that cannot listen, waiting polls and says so", () =>
          Effect.gen(function*() {
            const context = yield* Layer.build(pgClient())
            const storage = yield* storageOn().pipe(
              Effect.provide(Context.pick(SqlClient.SqlClient)(context))
            )
            assert.isFalse(storage.capabilities.notification)
            const changed = yield* storage.watch(uniqueKey("poll"))
            const started = Date.now()
            yield* changed
            assert.isBelow(Date.now() - started, 1000)
          }).pipe(Effect.scoped))
      } else {
        it.live("waiting polls (notification: false) and still gets the first run's result", () =>
          withClient(
            c,
            Effect.gen(function*() {
              const waiting = yield* replicaOn(c)
              const holder = yield* storageOn()
              assert.isFalse(waiting.capabilities.notification)
              const key = uniqueKey("poll")
              const owner = acquired(yield* holder.acquire({ key, fingerprint: "", lease: Duration.minutes(2) }))
              const waiter = yield* Effect.fork(
                Effect.succeed("ran").pipe(
                  Idempotent.wrap({ key, onInFlight: { wait: "1 minute" } }),
                  Effect.provideService(Storage.Storage, waiting)
                )
              )
              yield* Effect.sleep("1500 millis")
              assert.isTrue(yield* holder.commit(owner, { outcome: "success", payload: bytes("\"stored\""), ttl }))
              const started = Date.now()
              assert.strictEqual(yield* Fiber.join(waiter).pipe(Effect.timeout("10 seconds")), "stored")
              // Backed off to at most a second between looks.
              assert.isBelow(Date.now() - started, 2500)
            })
          ), { timeout: 30_000 })
      }

      it.live("a commit or release through the same layer wakes its waiters at once", () =>
        withClient(
          c,
          Effect.gen(function*() {
            const storage = yield* storageOn({ pollInterval: "1 minute" })
            for (const end of ["commit", "release"] as const) {
              const key = uniqueKey(`local-${end}`)
              const owner = acquired(yield* storage.acquire({ key, fingerprint: "", lease: longLease }))
              const changed = yield* storage.watch(key)
              const waiter = yield* Effect.fork(changed)
              yield* Effect.sleep("50 millis")
              assert.isTrue(
                end === "commit"
                  ? yield* storage.commit(owner, { outcome: "success", payload: bytes("1"), ttl })
                  : yield* storage.release(owner)
              )
              const woke = yield* Fiber.join(waiter).pipe(Effect.timeout("1 second"), Effect.either)
              assert.isTrue(woke._tag === "Right", `not woken within a second of the ${end}`)
            }
          }).pipe(Effect.scoped)
        ))
    })

    describe("one transaction with the caller", () => {
      const business = tableFor("orders")
      const setup = Effect.flatMap(
        SqlClient.SqlClient,
        (sql) => sql`CREATE TABLE IF NOT EXISTS ${sql(business)} (request_id VARCHAR(200) NOT NULL)`
      )
      const insertOrder = (requestId: string) =>
        Effect.flatMap(
          SqlClient.SqlClient,
          (sql) => sql`INSERT INTO ${sql(business)} (request_id) VALUES (${requestId})`
        )
      const orders = (requestId: string) =>
        Effect.flatMap(
          SqlClient.SqlClient,
          (sql) =>
            Effect.map(
              sql<{ readonly n: number | string }>`SELECT COUNT(*) AS n FROM ${
                sql(business)
              } WHERE request_id = ${requestId}`,
              (rows) => Number(rows[0]?.n)
            )
        )

      it.live("success: the business row and the stored result commit together; a retry replays", () =>
        withClient(
          c,
          Effect.gen(function*() {
            yield* setup
            const storage = yield* storageOn()
            const key = uniqueKey("tx-success")
            let runs = 0
            const place = Effect.suspend(() => {
              runs++
              return Effect.as(insertOrder(key), "placed")
            }).pipe(Idempotent.wrap({ key, transactional: true }), Effect.provideService(Storage.Storage, storage))
            assert.strictEqual(yield* place, "placed")
            assert.strictEqual(yield* place, "placed")
            assert.strictEqual(runs, 1)
            assert.strictEqual(yield* orders(key), 1)
            // Committed: another connection sees both.
            const replica = yield* replicaOn(c)
            assert.isTrue(Option.isSome(yield* replica.read(key)))
            if (c.shared) {
              assert.strictEqual(yield* Effect.provide(orders(key), yield* otherClient(c)), 1)
            }
          })
        ))

      it.live("a failure it does not store, or a defect: neither the row nor a record, and the retry runs", () =>
        withClient(
          c,
          Effect.gen(function*() {
            yield* setup
            const storage = yield* storageOn()
            for (const end of ["failure", "defect"] as const) {
              const key = uniqueKey(`tx-${end}`)
              let runs = 0
              const place = Effect.suspend(() => {
                runs++
                const ending = end === "failure" ? Effect.fail(new Unstored()) : Effect.die("boom")
                return runs === 1 ? Effect.zipRight(insertOrder(key), ending) : Effect.as(insertOrder(key), "placed")
              }).pipe(Idempotent.wrap({ key, transactional: true }), Effect.provideService(Storage.Storage, storage))
              const exit = yield* Effect.exit(place)
              if (end === "failure") failsWith(exit, Unstored)
              else assert.isTrue(Exit.isFailure(exit) && Cause.isDie(exit.cause), `expected a defect, got ${exit}`)
              assert.strictEqual(yield* orders(key), 0)
              assert.isTrue(Option.isNone(yield* storage.read(key)))
              // Free at once, not after the lease.
              const started = Date.now()
              assert.strictEqual(yield* place, "placed")
              assert.isBelow(Date.now() - started, 5000)
              assert.strictEqual(runs, 2)
              assert.strictEqual(yield* orders(key), 1)
            }
          })
        ))

      it.live("a typed failure the schema stores: the business writes roll back, the failure is stored and replayed", () =>
        withClient(
          c,
          Effect.gen(function*() {
            yield* setup
            const storage = yield* storageOn()
            const key = uniqueKey("tx-typed")
            let runs = 0
            const place = Effect.suspend(() => {
              runs++
              return Effect.zipRight(insertOrder(key), Effect.fail(new OutOfStock({ sku: "A-1" })))
            }).pipe(
              Idempotent.wrap({ key, transactional: true, failure: OutOfStock }),
              Effect.provideService(Storage.Storage, storage)
            )
            const first = failsWith(yield* Effect.exit(place), OutOfStock)
            const second = failsWith(yield* Effect.exit(place), OutOfStock)
            assert.strictEqual(first.sku, "A-1")
            assert.strictEqual(second.sku, "A-1")
            assert.strictEqual(runs, 1)
            assert.strictEqual(yield* orders(key), 0)
            assert.strictEqual(Option.getOrThrow(yield* storage.read(key)).outcome, "failure")
          })
        ))

      it.live("a run longer than its lease keeps it: renewals are not trapped in the transaction", () =>
        withClient(
          c,
          Effect.gen(function*() {
            yield* setup
            const storage = yield* storageOn()
            const key = uniqueKey("tx-long")
            const gate = yield* Deferred.make<void>()
            // Renewals every third of the lease must each land within the lease less its margin
            // (1.6 s here): wide enough for a loaded machine, while the run still outlives the lease.
            const lease = Duration.seconds(2)
            const run = yield* Effect.fork(
              Effect.zipRight(insertOrder(key), Effect.as(Deferred.await(gate), "placed")).pipe(
                Idempotent.wrap({ key, transactional: true, lease }),
                Effect.provideService(Storage.Storage, storage)
              )
            )
            yield* Effect.sleep(Duration.sum(lease, Duration.millis(500)))
            // Another connection sees the lease while the transaction is open. (SQLite has one
            // writer: another connection would wait for the transaction.)
            if (c.dialect !== "sqlite") {
              const replica = yield* replicaOn(c)
              const seen = yield* replica.acquire({ key, fingerprint: "", lease: longLease })
              assert.strictEqual(seen._tag, "InFlight")
            }
            yield* Deferred.succeed(gate, undefined)
            assert.strictEqual(yield* Fiber.join(run), "placed")
            assert.strictEqual(yield* orders(key), 1)
          })
        ), { timeout: 30_000 })

      it.live("without transactional, a wrap inside the caller's own transaction commits with it", () =>
        withClient(
          c,
          Effect.gen(function*() {
            yield* setup
            const sql = yield* SqlClient.SqlClient
            const storage = yield* storageOn()
            const key = uniqueKey("ambient")
            const placed = yield* sql.withTransaction(
              insertOrder(key).pipe(
                Effect.as("placed"),
                Idempotent.wrap({ key }),
                Effect.provideService(Storage.Storage, storage)
              )
            ).pipe(Effect.timeout("10 seconds"))
            assert.strictEqual(placed, "placed")
            assert.strictEqual(yield* orders(key), 1)
            assert.isTrue(Option.isSome(yield* storage.read(key)))

            const rolledBack = uniqueKey("ambient-rollback")
            const exit = yield* Effect.exit(sql.withTransaction(
              insertOrder(rolledBack).pipe(
                Effect.asVoid,
                Idempotent.wrap({ key: rolledBack, lease: "300 millis" }),
                Effect.provideService(Storage.Storage, storage),
                Effect.zipRight(Effect.fail(new Unstored()))
              )
            ))
            failsWith(exit, Unstored)
            assert.strictEqual(yield* orders(rolledBack), 0)
            assert.isTrue(Option.isNone(yield* storage.read(rolledBack)))
          })
        ))
    })

    describe("bad input", () => {
      it.live(
        "keys and payloads are bound parameters: odd keys and a 1 MiB payload come back exactly",
        () =>
          withClient(
            c,
            Effect.gen(function*() {
              const sql = yield* SqlClient.SqlClient
              const storage = yield* storageOn()
              const suffix = randomUUID().slice(0, 8)
              const keys = [
                `it's "quoted" ${suffix}`,
                `semi; colon'); DROP TABLE ${table}; -- ${suffix}`,
                `back\\slash \\' \\" \\\\ \\0 ${suffix}`,
                `100% _under_ %_% ${suffix}`,
                `%${suffix}`,
                `_${suffix}`,
                `$1 ? :name @p0 \${x} ${suffix}`,
                `naïve café 鍵 ключ 🔑 ${suffix}`,
                `nai\u0308ve cafe\u0301 鍵 ключ 🔑 ${suffix}`,
                `padded ${suffix} `,
                `padded ${suffix}`,
                `CASE ${suffix}`,
                `case ${suffix}`,
                `${suffix}${"x".repeat(255 - suffix.length)}`,
                `${suffix}${"🔑".repeat(255 - suffix.length)}`
              ]
              const big = randomBytes(1024 * 1024)
              const payloadOf = (i: number) => i === 0 ? big : bytes(`payload ${i} ${keys[i]}`)
              for (const [i, key] of keys.entries()) {
                const owner = acquired(yield* storage.acquire({ key, fingerprint: `fp '${i}'; --`, lease: longLease }))
                assert.isTrue(yield* storage.commit(owner, { outcome: "success", payload: payloadOf(i), ttl }))
              }
              const reader = yield* replicaOn(c)
              for (const [i, key] of keys.entries()) {
                const record = Option.getOrThrow(yield* reader.read(key))
                assert.strictEqual(record.key, key)
                assert.strictEqual(record.fingerprint, `fp '${i}'; --`)
                assert.isTrue(Buffer.from(record.payload).equals(Buffer.from(payloadOf(i))), `payload of key ${i}`)
                const replay = yield* reader.acquire({ key, fingerprint: "", lease: longLease })
                if (replay._tag !== "Completed") return assert.fail(`expected Completed for key ${i}`)
                assert.strictEqual(replay.record.key, key)
                const stored = yield* sql<{ readonly idempotency_key: string }>`
                SELECT idempotency_key FROM ${sql(table)} WHERE key_hash = ${keyHash(key)}
              `
                assert.strictEqual(stored[0]?.idempotency_key, key)
              }
              assert.isAtLeast(yield* rowCount(table), keys.length)
            })
          ),
        { timeout: 60_000 }
      )
    })

    describe("errors", () => {
      it.live("every statement's failure is an IdempotencyStorageError with its operation and the SqlError", () =>
        withClient(
          c,
          Effect.gen(function*() {
            const name = tableFor("errors")
            const sql = yield* SqlClient.SqlClient
            const storage = yield* storageOn({ table: name })
            const key = uniqueKey("errors")
            const lease = acquired(yield* storage.acquire({ key, fingerprint: "", lease: longLease }))
            yield* sql`DROP TABLE ${sql(name)}`
            const operations: Array<
              readonly [string, Effect.Effect<unknown, IdempotencyError.IdempotencyStorageError>]
            > = [
              ["acquire", storage.acquire({ key, fingerprint: "", lease: longLease })],
              ["renew", storage.renew(lease, longLease)],
              ["commit", storage.commit(lease, { outcome: "success", payload: bytes("1"), ttl })],
              ["release", storage.release(lease)],
              ["read", storage.read(key)],
              ["delete", storage.delete(key)]
            ]
            for (const [operation, effect] of operations) {
              const error = failsWith(yield* Effect.exit(effect), IdempotencyStorageError)
              assert.strictEqual(error.operation, operation)
              assert.strictEqual(error.key, key)
              assert.strictEqual((error.cause as { readonly _tag?: string })._tag, "SqlError")
            }
            // Fails closed: the effect does not run.
            let runs = 0
            const exit = yield* Effect.exit(
              Effect.sync(() => ++runs).pipe(Idempotent.wrap({ key }), Effect.provideService(Storage.Storage, storage))
            )
            assert.strictEqual(failsWith(exit, IdempotencyStorageError).operation, "acquire")
            assert.strictEqual(runs, 0)
          })
        ))

      if (c.dialect === "pg") {
        it.live(
          "a broken connection fails closed, and the layer recovers when the database is back",
          () =>
            Effect.gen(function*() {
              const proxy = yield* tcpProxy(new URL(pgUrl))
              const url = new URL(pgUrl)
              url.host = `127.0.0.1:${proxy.port}`
              const storage = yield* Effect.provide(storageOn(), yield* Layer.build(pgClient(url.toString())))
              let runs = 0
              const call = (key: string) =>
                Effect.sync(() => ++runs).pipe(
                  Idempotent.wrap({ key }),
                  Effect.provideService(Storage.Storage, storage)
                )
              assert.strictEqual(yield* call(uniqueKey("before")), 1)
              yield* proxy.cut
              const started = Date.now()
              const exit = yield* Effect.exit(call(uniqueKey("during")))
              assert.strictEqual(failsWith(exit, IdempotencyStorageError).operation, "acquire")
              assert.isBelow(Date.now() - started, 10_000)
              assert.strictEqual(runs, 1)
              yield* proxy.restore
              assert.strictEqual(yield* call(uniqueKey("after")), 2)
            }).pipe(Effect.scoped),
          { timeout: 30_000 }
        )

        it.live("a statement that hangs is bounded by timeout, and the effect does not run", () =>
          withClient(
            c,
            Effect.gen(function*() {
              const sql = yield* SqlClient.SqlClient
              const name = tableFor("locked")
              // 2 seconds, not less: the layer's own LISTEN is bounded by it too, and on a loaded
              // machine its confirmation has taken more than 500 ms.
              const storage = yield* storageOn({ table: name, timeout: "2 seconds" })
              const locked = yield* Deferred.make<void>()
              const unlock = yield* Deferred.make<void>()
              // Every statement on the table waits behind this lock until the transaction ends.
              const holder = yield* Effect.fork(sql.withTransaction(
                sql`LOCK TABLE ${sql(name)} IN ACCESS EXCLUSIVE MODE`.pipe(
                  Effect.zipRight(Deferred.succeed(locked, undefined)),
                  Effect.zipRight(Deferred.await(unlock))
                )
              ))
              yield* Deferred.await(locked)
              let runs = 0
              const key = uniqueKey("locked")
              const call = Effect.sync(() => ++runs).pipe(
                Idempotent.wrap({ key }),
                Effect.provideService(Storage.Storage, storage)
              )
              const started = Date.now()
              const error = failsWith(yield* Effect.exit(call), IdempotencyStorageError)
              assert.strictEqual(error.operation, "acquire")
              assert.include(error.message, "did not answer within")
              // The lock is held until the test lets go: any bound at all shows the timeout.
              assert.isBelow(Date.now() - started, 15_000)
              assert.strictEqual(runs, 0)
              yield* Deferred.succeed(unlock, undefined)
              yield* Fiber.join(holder)
              // The statement was cancelled, not left to take the key later.
              assert.strictEqual(yield* call, 1)
            })
          ), { timeout: 30_000 })
      }
    })
  })
}

// --- isolation levels -------------------------------------------------------------------------------

describe("SqlStorage at each isolation level (the session's default, set per connection)", () => {
  const levels = [
    ...isolationLevels.pg.map((isolation) => ({
      name: `PostgreSQL, ${isolation}`,
      client: () => fixturePgClient({ isolation, maxConnections: 3 }),
      isolation
    })),
    ...isolationLevels.mysql.map((isolation) => ({
      name: `MariaDB, ${isolation}`,
      client: () => fixtureMysqlClient({ isolation, maxConnections: 3 }),
      isolation
    }))
  ]

  for (const level of levels) {
    describe(level.name, () => {
      it.live("the session really runs at that level", () =>
        Effect.gen(function*() {
          const sql = yield* SqlClient.SqlClient
          const [row] = yield* sql.onDialectOrElse({
            pg: () => sql<{ readonly level: string }>`SELECT current_setting('transaction_isolation') AS level`,
            orElse: () => sql<{ readonly level: string }>`SELECT @@tx_isolation AS level`
          })
          assert.strictEqual(row?.level.toUpperCase().replace("-", " "), level.isolation)
        }).pipe(Effect.provide(level.client())))

      it.live("a transactional run longer than two leases commits with its business row", () =>
        Effect.gen(function*() {
          const sql = yield* SqlClient.SqlClient
          const name = tableFor("isolation_tx")
          const business = tableFor("isolation_orders")
          yield* sql`CREATE TABLE IF NOT EXISTS ${sql(business)} (request_id VARCHAR(200) NOT NULL)`
          const storage = yield* storageOn({ table: name })
          const key = uniqueKey("long-tx")
          const lease = Duration.seconds(2)
          let runs = 0
          const place = Effect.gen(function*() {
            runs++
            yield* sql`INSERT INTO ${sql(business)} (request_id) VALUES (${key})`
            yield* Effect.sleep(Duration.times(lease, 2.25))
            return "placed"
          }).pipe(
            Idempotent.wrap({ key, lease, transactional: true }),
            Effect.provideService(Storage.Storage, storage)
          )
          assert.strictEqual(yield* place, "placed")
          assert.strictEqual(yield* place, "placed")
          assert.strictEqual(runs, 1)
          const [orders] = yield* sql<{ readonly n: number | string }>`
            SELECT COUNT(*) AS n FROM ${sql(business)} WHERE request_id = ${key}`
          assert.strictEqual(Number(orders?.n), 1)
          assert.isTrue(Option.isSome(yield* storage.read(key)))
        }).pipe(Effect.scoped, Effect.provide(level.client())), { timeout: 30_000 })

      it.live(
        "concurrent acquires of new keys from four pools: one Acquired each, the rest InFlight, no error",
        () =>
          Effect.gen(function*() {
            const name = tableFor("isolation_race")
            const storages = yield* Effect.all(
              Array.from({ length: 4 }, () =>
                Effect.flatMap(
                  Layer.build(level.client()),
                  (context) => Effect.provide(storageOn({ table: name }), Context.pick(SqlClient.SqlClient)(context))
                )),
              { concurrency: "unbounded" }
            )
            for (let round = 0; round < 10; round++) {
              const key = uniqueKey(`race-${round}`)
              const results = yield* Effect.all(
                Array.from(
                  { length: 24 },
                  (_, i) =>
                    Effect.either(storages[i % storages.length]!.acquire({ key, fingerprint: "fp", lease: longLease }))
                ),
                { concurrency: "unbounded" }
              )
              const errors = results.flatMap((result) => result._tag === "Left" ? [result.left.message] : [])
              assert.deepStrictEqual(errors, [], `round ${round}`)
              const tags = results.flatMap((result) => result._tag === "Right" ? [result.right] : [])
              assert.strictEqual(tags.filter((result) => result._tag === "Acquired").length, 1, `round ${round}`)
              for (const result of tags) {
                if (result._tag === "Acquired") continue
                if (result._tag !== "InFlight") return assert.fail(`round ${round}: ${result._tag}`)
                assert.strictEqual(result.fingerprint, "fp")
                assert.isTrue(Duration.greaterThan(result.leaseRemaining, Duration.zero))
              }
            }
          }).pipe(Effect.scoped),
        { timeout: 30_000 }
      )
    })
  }
})

// --- values the database never takes -------------------------------------------------------------

describe("SqlStorage on MariaDB: a result over max_allowed_packet", () => {
  const client = fixtureMysqlClient({ maxConnections: 2 })
  const packetLimit = Effect.flatMap(
    SqlClient.SqlClient,
    (sql) =>
      Effect.map(
        sql<{ readonly limit: number | string }>`SELECT @@max_allowed_packet AS \`limit\``,
        (rows) => Number(rows[0]?.limit)
      )
  )

  it.live("commit fails with retryable: false, and the storage stays usable", () =>
    Effect.gen(function*() {
      const name = tableFor("packet")
      const storage = yield* storageOn({ table: name })
      const limit = yield* packetLimit
      const key = uniqueKey("too-big")
      const owner = acquired(yield* storage.acquire({ key, fingerprint: "", lease: longLease }))
      const error = failsWith(
        yield* Effect.exit(
          storage.commit(owner, { outcome: "success", payload: randomBytes(limit + 1024 * 1024), ttl })
        ),
        IdempotencyStorageError
      )
      assert.strictEqual(error.operation, "commit")
      assert.strictEqual(error.retryable, false)
      // The server closed that connection; the pool opens another.
      assert.isTrue(yield* storage.commit(owner, { outcome: "success", payload: bytes("small"), ttl }))
      assert.strictEqual(text(Option.getOrThrow(yield* storage.read(key)).payload), "small")
    }).pipe(Effect.scoped, Effect.provide(client)), { timeout: 60_000 })

  it.live(
    "wrap with maxResultBytes above the packet: ResultNotStored at once, ran once, the key released",
    () =>
      Effect.gen(function*() {
        const name = tableFor("packet_wrap")
        const storage = yield* storageOn({ table: name })
        const limit = yield* packetLimit
        const key = uniqueKey("too-big-wrap")
        let runs = 0
        const call = Effect.sync(() => {
          runs++
          return "x".repeat(limit + 1024 * 1024)
        }).pipe(
          Idempotent.wrap({ key, lease: "60 seconds", maxResultBytes: 4 * limit }),
          Effect.provideService(Storage.Storage, storage)
        )
        const started = Date.now()
        const error = failsWith(yield* Effect.exit(call), IdempotencyError.IdempotencyResultNotStored)
        assert.strictEqual(error.reason, "storage-failed")
        assert.isBelow(Date.now() - started, 20_000, "the commit was retried instead of failing at once")
        assert.strictEqual(runs, 1)
        // The key was released: the next call runs again at once (and fails the same way).
        const again = Date.now()
        failsWith(yield* Effect.exit(call), IdempotencyError.IdempotencyResultNotStored)
        assert.isBelow(Date.now() - again, 20_000)
        assert.strictEqual(runs, 2)
      }).pipe(Effect.scoped, Effect.provide(client)),
    { timeout: 60_000 }
  )
})

/**
 * A TCP proxy to PostgreSQL for the life of the scope. `cut` drops every connection and refuses new
 * ones, as a database gone away does; `restore` accepts them again on the same port.
 */
const tcpProxy = (target: URL) =>
  Effect.acquireRelease(
    Effect.async<{ readonly port: number; readonly cut: Effect.Effect<void>; readonly restore: Effect.Effect<void> }>(
      (resume) => {
        const sockets = new Set<Socket>()
        const track = (socket: Socket) => {
          sockets.add(socket)
          socket.on("close", () => sockets.delete(socket))
          socket.on("error", () => socket.destroy())
        }
        const server = createServer((client) => {
          const upstream = connect(Number(target.port || 5432), target.hostname)
          track(client)
          track(upstream)
          client.pipe(upstream).pipe(client)
        })
        const cut = Effect.sync(() => {
          server.close()
          for (const socket of sockets) socket.destroy()
        })
        server.listen(0, "127.0.0.1", () => {
          const address = server.address()
          const port = typeof address === "object" && address !== null ? address.port : 0
          const restore = Effect.async<void>((resume) => {
            server.listen(port, "127.0.0.1", () => resume(Effect.void))
          })
          resume(Effect.succeed({ port, cut, restore }))
        })
      }
    ),
    (proxy) => proxy.cut
  )
