/**
 * The middleware mounted on an `HttpApi` with `HttpApiBuilder.middleware`. The API turns a
 * handler's typed error into its response outside every such middleware, so these tests check
 * that the stored and replayed response is that encoded error, not an empty 200 or a 500.
 */
import { HttpApi, HttpApiBuilder, HttpApiEndpoint, HttpApiGroup, HttpApiSchema } from "@effect/platform"
import { assert, describe, it } from "@effect/vitest"
import { Deferred, Effect, Fiber, Layer, Schema } from "effect"
import * as IdempotencyMiddleware from "../src/Http/IdempotencyMiddleware.js"
import { MemoryStorage } from "../src/index.js"
import { eventually, json, send, startServer } from "./fixtures/Http.js"
import { makeSlowSignals, Runs, type SlowSignals } from "./fixtures/HttpApp.js"
import { assertInFlight, assertReplayOf } from "./fixtures/HttpScenarios.js"

class OutOfStock extends Schema.TaggedError<OutOfStock>()(
  "OutOfStock",
  { sku: Schema.String, attempt: Schema.Number },
  HttpApiSchema.annotations({ status: 409 })
) {}

class Maintenance extends Schema.TaggedError<Maintenance>()(
  "Maintenance",
  { attempt: Schema.Number },
  HttpApiSchema.annotations({ status: 503 })
) {}

class Order extends Schema.Class<Order>("Order")({ id: Schema.String, sku: Schema.String }) {}

const Api = HttpApi.make("shop").add(
  HttpApiGroup.make("orders").add(
    HttpApiEndpoint.post("create", "/orders")
      .setPayload(Schema.Struct({ sku: Schema.String }))
      .addSuccess(Order, { status: 201 })
      .addError(OutOfStock)
      .addError(Maintenance)
  )
)

const serveApi = (runs: Runs, slow?: SlowSignals, options?: IdempotencyMiddleware.IdempotencyMiddlewareOptions) => {
  const OrdersLive = HttpApiBuilder.group(
    Api,
    "orders",
    (handlers) =>
      handlers.handle("create", ({ payload }) =>
        Effect.gen(function*() {
          if (payload.sku === "slow" && slow !== undefined) {
            yield* Deferred.succeed(slow.started, undefined)
            yield* Deferred.await(slow.release)
          }
          const attempt = runs.count(payload.sku)
          switch (payload.sku) {
            case "none":
              return yield* new OutOfStock({ sku: payload.sku, attempt })
            case "maintenance":
              return yield* new Maintenance({ attempt })
            case "crash":
              return yield* Effect.dieMessage("crash")
            default:
              return new Order({ id: `order-${attempt}`, sku: payload.sku })
          }
        }))
  )
  // Applied to the API's `HttpApp` through a lambda: given the generic middleware itself,
  // `HttpApiBuilder.middleware` infers its requirements as `unknown` (as it does for `HttpMiddleware.cors()`).
  return HttpApiBuilder.serve().pipe(
    Layer.provide(HttpApiBuilder.middleware((app) => IdempotencyMiddleware.make(options)(app), { withContext: true })),
    Layer.provide(HttpApiBuilder.api(Api).pipe(Layer.provide(OrdersLive)))
  )
}

const body = (sku: string) => JSON.stringify({ sku })

describe("IdempotencyMiddleware with HttpApiBuilder.middleware", () => {
  it.scopedLive("runs the endpoint once and replays its success", () =>
    Effect.gen(function*() {
      const runs = new Runs()
      const server = yield* startServer(serveApi(runs), MemoryStorage.layer())
      const first = yield* send(server, "/orders", { key: "a", body: body("tea") })
      const retry = yield* send(server, "/orders", { key: "a", body: body("tea") })
      assert.strictEqual(first.status, 201)
      assert.deepStrictEqual(json(first), { id: "order-1", sku: "tea" })
      assertReplayOf(retry, first)
      assert.strictEqual(runs.of("tea"), 1)
    }))

  it.scopedLive("a typed error the API encodes as 409 is stored and replayed as that response", () =>
    Effect.gen(function*() {
      const runs = new Runs()
      const server = yield* startServer(serveApi(runs), MemoryStorage.layer())
      const first = yield* send(server, "/orders", { key: "b", body: body("none") })
      const retry = yield* send(server, "/orders", { key: "b", body: body("none") })
      assert.strictEqual(first.status, 409)
      assert.deepStrictEqual(json(first), { _tag: "OutOfStock", sku: "none", attempt: 1 })
      assertReplayOf(retry, first)
      assert.strictEqual(runs.of("none"), 1)
    }))

  it.scopedLive("a typed error the API encodes as 503 is sent, not stored: the retry runs", () =>
    Effect.gen(function*() {
      const runs = new Runs()
      const server = yield* startServer(serveApi(runs), MemoryStorage.layer())
      const first = yield* send(server, "/orders", { key: "c", body: body("maintenance") })
      const retry = yield* send(server, "/orders", { key: "c", body: body("maintenance") })
      assert.deepStrictEqual([first.status, retry.status], [503, 503])
      assert.deepStrictEqual([json(first).attempt, json(retry).attempt], [1, 2])
      assert.isNull(retry.headers.get("idempotent-replayed"))
    }))

  it.scopedLive("a defect is a 500 that releases the key", () =>
    Effect.gen(function*() {
      const runs = new Runs()
      const server = yield* startServer(serveApi(runs), MemoryStorage.layer())
      const first = yield* send(server, "/orders", { key: "d", body: body("crash") })
      const retry = yield* send(server, "/orders", { key: "d", body: body("crash") })
      assert.deepStrictEqual([first.status, retry.status], [500, 500])
      assert.strictEqual(runs.of("crash"), 2)
    }))

  it.scopedLive("a payload the API rejects (400) is not stored: the retry is checked again, the fixed payload runs", () =>
    Effect.gen(function*() {
      const runs = new Runs()
      const server = yield* startServer(serveApi(runs), MemoryStorage.layer())
      const first = yield* send(server, "/orders", { key: "e", body: JSON.stringify({ sku: 42 }) })
      const retry = yield* send(server, "/orders", { key: "e", body: JSON.stringify({ sku: 42 }) })
      assert.deepStrictEqual([first.status, retry.status], [400, 400])
      assert.strictEqual(json(first)._tag, "HttpApiDecodeError")
      assert.isNull(retry.headers.get("idempotent-replayed"))
      assert.strictEqual(runs.total, 0)
      const fixed = yield* send(server, "/orders", { key: "e", body: body("tea") })
      assert.strictEqual(fixed.status, 201)
      assert.deepStrictEqual(json(fixed), { id: "order-1", sku: "tea" })
      assert.strictEqual(runs.of("tea"), 1)
    }))

  it.scopedLive("a duplicate in flight gets 409 with Retry-After", () =>
    Effect.gen(function*() {
      const runs = new Runs()
      const slow = yield* makeSlowSignals
      const server = yield* startServer(serveApi(runs, slow), MemoryStorage.layer())
      const first = yield* Effect.fork(send(server, "/orders", { key: "f", body: body("slow") }))
      yield* Deferred.await(slow.started)
      assertInFlight(yield* send(server, "/orders", { key: "f", body: body("slow") }))
      yield* Deferred.succeed(slow.release, undefined)
      const done = yield* Fiber.join(first)
      assert.strictEqual(done.status, 201)
      assertReplayOf(yield* send(server, "/orders", { key: "f", body: body("slow") }), done)
    }))

  it.scopedLive("a client that disconnects: the endpoint completes and the retry gets its response", () =>
    Effect.gen(function*() {
      const runs = new Runs()
      const slow = yield* makeSlowSignals
      const server = yield* startServer(
        serveApi(runs, slow, { onInFlight: { wait: "10 seconds" } }),
        MemoryStorage.layer()
      )
      const controller = new AbortController()
      const first = yield* Effect.fork(
        Effect.exit(send(server, "/orders", { key: "g", body: body("slow"), signal: controller.signal }))
      )
      yield* Deferred.await(slow.started)
      controller.abort()
      yield* Fiber.await(first)
      yield* eventually(() => server.logs.some((line) => line.includes("was interrupted")), "the request to end")
      yield* Deferred.succeed(slow.release, undefined)
      const retry = yield* send(server, "/orders", { key: "g", body: body("slow") })
      assert.strictEqual(retry.status, 201)
      assert.deepStrictEqual(json(retry), { id: "order-1", sku: "slow" })
      assert.strictEqual(retry.headers.get("idempotent-replayed"), "true")
      assert.strictEqual(runs.of("slow"), 1)
    }))
})
