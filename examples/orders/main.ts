/**
 * `npm run example`: the orders API kept up for curl, until Ctrl-C.
 *
 * | variable          | default                                       |
 * |-------------------|-----------------------------------------------|
 * | `PORT`            | `3000`                                        |
 * | `HOST`            | `127.0.0.1`                                   |
 * | `STORAGE`         | `memory` (or `sqlite`, `redis`, `postgres`)   |
 * | `REDIS_URL`       | `redis://127.0.0.1:6379`                      |
 * | `DATABASE_URL`    | `postgres://postgres@127.0.0.1:5432/test`     |
 * | `SQLITE_FILENAME` | `effect-idempotency-orders.sqlite` in the OS temporary directory |
 *
 * Redis keys go under the prefix `orders-example`, and the SQL backends use the table
 * `orders_example_idempotency`, so the example never touches the records of another app or test.
 */
import { HttpServer } from "@effect/platform"
import { NodeRuntime } from "@effect/platform-node"
import type { SqlError } from "@effect/sql"
import { PgClient } from "@effect/sql-pg"
import { SqliteClient } from "@effect/sql-sqlite-node"
import { Config, type ConfigError, Effect, Layer, Redacted } from "effect"
import { type IdempotencyError, MemoryStorage, type Storage } from "effect-idempotency"
import * as RedisStorage from "effect-idempotency/Storage/Redis"
import * as SqlStorage from "effect-idempotency/Storage/Sql"
import { tmpdir } from "node:os"
import { join } from "node:path"
import * as Server from "./server.js"

const table = "orders_example_idempotency"

const redisUrl = Config.redacted("REDIS_URL").pipe(Config.withDefault(Redacted.make("redis://127.0.0.1:6379")))
const databaseUrl = Config.redacted("DATABASE_URL").pipe(
  Config.withDefault(Redacted.make("postgres://postgres@127.0.0.1:5432/test"))
)
const sqliteFilename = Config.string("SQLITE_FILENAME").pipe(
  Config.withDefault(join(tmpdir(), "effect-idempotency-orders.sqlite"))
)

/** Where the URL points, without its password. */
const display = (url: Redacted.Redacted<string>): string => {
  try {
    const parsed = new URL(Redacted.value(url))
    if (parsed.password !== "") parsed.password = "***"
    return parsed.toString()
  } catch {
    return "(unparseable URL)"
  }
}

/** A storage layer, and a line saying where it keeps its records. */
interface Choice {
  readonly layer: Layer.Layer<
    Storage.Storage,
    IdempotencyError.IdempotencyStorageSetupError | SqlError.SqlError | ConfigError.ConfigError
  >
  readonly where: string
}

const choice = (layer: Choice["layer"], where: string): Choice => ({ layer, where })

/** The storage `STORAGE` names. */
const storage = Effect.gen(function*() {
  const kind = yield* Config.literal("memory", "sqlite", "redis", "postgres")("STORAGE").pipe(
    Config.withDefault("memory")
  )
  switch (kind) {
    case "memory":
      return choice(MemoryStorage.layer(), "memory")
    case "redis": {
      const url = yield* redisUrl
      return choice(
        RedisStorage.layer({ url, prefix: "orders-example" }),
        `redis at ${display(url)}, prefix orders-example`
      )
    }
    case "sqlite": {
      const filename = yield* sqliteFilename
      return choice(
        SqlStorage.layer({ table }).pipe(Layer.provide(SqliteClient.layer({ filename }))),
        `sqlite at ${filename}, table ${table}`
      )
    }
    case "postgres": {
      const url = yield* databaseUrl
      return choice(
        SqlStorage.layer({ table }).pipe(Layer.provide(PgClient.layer({ url }))),
        `postgres at ${display(url)}, table ${table}`
      )
    }
  }
})

const main = Layer.unwrapEffect(
  Effect.gen(function*() {
    const port = yield* Config.port("PORT").pipe(Config.withDefault(3000))
    const host = yield* Config.string("HOST").pipe(Config.withDefault("127.0.0.1"))
    const { layer, where } = yield* storage
    const announce = Layer.effectDiscard(
      HttpServer.addressFormattedWith((url) => Effect.log(`Orders API listening on ${url} (storage: ${where})`))
    )
    return announce.pipe(Layer.provideMerge(Server.layer({ storage: layer, port, host, logRequests: true })))
  })
)

NodeRuntime.runMain(Layer.launch(main))
