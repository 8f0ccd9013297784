/**
 * The core HTTP scenarios on Redis (`REDIS_URL`, default `redis://127.0.0.1:6379`), to show the
 * middleware works on any storage layer, and a Redis that dies under a running server: 503.
 * Nothing is skipped: without Redis these tests fail.
 */
import { assert, describe, it } from "@effect/vitest"
import { Effect, Redacted } from "effect"
import { ProblemType } from "../src/Http/IdempotencyMiddleware.js"
import { Storage } from "../src/index.js"
import * as RedisStorage from "../src/Storage/Redis.js"
import { json, send, startServer } from "./fixtures/Http.js"
import { routes, Runs, serveWith } from "./fixtures/HttpApp.js"
import { coreScenarios } from "./fixtures/HttpScenarios.js"
import { server as redisServer } from "./fixtures/redisServers.js"

const url = process.env.REDIS_URL ?? "redis://127.0.0.1:6379"
const run = Storage.makeToken().slice(0, 8)
let stores = 0
const redis = () => RedisStorage.layer({ url: Redacted.make(url), prefix: `idem-http-${run}-${++stores}` })

describe("IdempotencyMiddleware on Redis storage", () => {
  coreScenarios("HttpRouter.use", redis)

  it.scopedLive("Redis going down under a running server: 503 problem, handler not run", () =>
    Effect.gen(function*() {
      const runs = new Runs()
      const doomed = yield* redisServer()
      const server = yield* startServer(
        serveWith("HttpRouter.use", routes(runs)),
        RedisStorage.layer({ url: Redacted.make(doomed.url), timeout: "500 millis" })
      )
      const order = JSON.stringify({ sku: "tea" })
      assert.strictEqual((yield* send(server, "/orders", { key: "before", body: order })).status, 201)
      yield* doomed.kill
      const reply = yield* send(server, "/orders", { key: "after", body: order })
      assert.strictEqual(reply.status, 503)
      assert.strictEqual(json(reply).type, ProblemType.StorageUnavailable)
      assert.strictEqual(runs.of("/orders"), 1)
    }))
})
