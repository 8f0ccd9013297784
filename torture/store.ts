/**
 * The storage layer of a torture run, for its workers and for the final check: each backend's
 * modules are loaded only when that backend is used, so that a worker starts quickly.
 */
import { Cause, Duration, Effect, Exit, Layer, Option, Redacted } from "effect"
import * as Idempotent from "../src/Idempotent.js"
import * as Storage from "../src/Storage.js"
import { type LogLine, type StoreConfig, tortureKey, type WorkerConfig } from "./protocol.js"

export const storeLayer = (store: StoreConfig): Layer.Layer<Storage.Storage, unknown> =>
  Layer.unwrapEffect(Effect.promise(async () => {
    switch (store.backend) {
      case "redis": {
        const RedisStorage = await import("../src/Storage/Redis.js")
        return RedisStorage.layer({ url: Redacted.make(store.url), prefix: store.prefix, timeout: "5 seconds" })
      }
      case "postgres": {
        const [SqlStorage, { PgClient }, { pgUrl }] = await Promise.all([
          import("../src/Storage/Sql.js"),
          import("@effect/sql-pg"),
          import("../test/fixtures/sqlClients.js")
        ])
        return SqlStorage.layer({ table: store.table }).pipe(
          Layer.provide(PgClient.layer({
            url: Redacted.make(pgUrl),
            connectTimeout: "10 seconds",
            maxConnections: 4,
            applicationName: store.applicationName
          }))
        )
      }
      case "mariadb": {
        const [SqlStorage, { MysqlClient }, { mysqlSocket }] = await Promise.all([
          import("../src/Storage/Sql.js"),
          import("@effect/sql-mysql2"),
          import("../test/fixtures/sqlClients.js")
        ])
        return SqlStorage.layer({ table: store.table }).pipe(
          Layer.provide(MysqlClient.layer({
            database: "test",
            username: "root",
            maxConnections: 4,
            connectionTTL: "1 hour",
            poolConfig: { socketPath: mysqlSocket, maxIdle: 4 }
          }))
        )
      }
      case "sqlite": {
        const [SqlStorage, { SqliteClient }] = await Promise.all([
          import("../src/Storage/Sql.js"),
          import("@effect/sql-sqlite-node")
        ])
        return SqlStorage.layer({ table: store.table }).pipe(
          Layer.provide(SqliteClient.layer({ filename: store.filename }))
        )
      }
    }
  }))

export const describeCause = (cause: Cause.Cause<unknown>): string => {
  const failure = Cause.failureOption(cause)
  if (Option.isSome(failure)) {
    const error = failure.value as { readonly _tag?: string; readonly message?: string }
    return `${error._tag ?? "Error"}: ${error.message ?? String(error)}`
  }
  return Cause.pretty(cause).split("\n")[0] ?? "unknown"
}

/**
 * For every key: the record the store holds (read directly), and what one more call through
 * `wrap` answers. A run it has to make (the key was free) logs its start like any other.
 */
export const verifyKeys = (
  config: Pick<WorkerConfig, "keys" | "leaseMillis" | "concurrency">,
  log: (line: LogLine) => void
): Effect.Effect<void, never, Storage.Storage> =>
  Effect.gen(function*() {
    const storage = yield* Storage.Storage
    const decoder = new TextDecoder()
    const lease = Duration.millis(config.leaseMillis)
    yield* Effect.forEach(
      Array.from({ length: config.keys }, (_, n) => tortureKey(n)),
      (key) =>
        Effect.gen(function*() {
          const stored = yield* Effect.either(storage.read(key))
          const record = stored._tag === "Right" && Option.isSome(stored.right)
            ? {
              fence: stored.right.value.fence,
              outcome: stored.right.value.outcome,
              value: stored.right.value.payload.length === 0
                ? null
                : JSON.parse(decoder.decode(stored.right.value.payload)) as unknown
            }
            : null
          const unexpected = Effect.gen(function*() {
            const { fence } = yield* Idempotent.Execution
            log({ e: "start", k: key, f: fence, t: Date.now() })
            const v = `verify/${fence}`
            log({ e: "end", k: key, f: fence, t: Date.now(), v })
            return v
          })
          const replay = yield* Effect.exit(
            Idempotent.wrap(unexpected, { key, lease, onInFlight: { wait: Duration.times(lease, 2) } })
          )
          log({
            e: "verify",
            k: key,
            t: Date.now(),
            record,
            replay: Exit.isSuccess(replay)
              ? { ok: true, v: replay.value }
              : { ok: false, error: describeCause(replay.cause) }
          })
        }),
      { concurrency: config.concurrency, discard: true }
    )
  })
