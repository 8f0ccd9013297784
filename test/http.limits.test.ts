/**
 * Limits and outages: request bodies over `maxBodyBytes` (declared or streamed), a storage that
 * fails, a lease lost mid-run. Each is refused with a problem and the handler does not run (or,
 * for the lost lease, its response is not stored).
 */
import { assert, describe, it } from "@effect/vitest"
import { Effect, Layer } from "effect"
import { ProblemType } from "../src/Http/IdempotencyMiddleware.js"
import { IdempotencyError, MemoryStorage, Storage } from "../src/index.js"
import { counted } from "./fixtures/CountingStorage.js"
import { json, send, sendRaw, startServer } from "./fixtures/Http.js"
import { routes, Runs, serveWith } from "./fixtures/HttpApp.js"

const storageWith = (overrides: (inner: Storage.StorageService) => Parameters<typeof counted>[1]) =>
  Layer.effect(Storage.Storage, Effect.map(Storage.Storage, (inner) => counted(inner, overrides(inner)).storage)).pipe(
    Layer.provide(MemoryStorage.layer())
  )

describe("IdempotencyMiddleware limits", () => {
  it.scopedLive("a body over maxBodyBytes by Content-Length: 413 without reading it, handler not run", () =>
    Effect.gen(function*() {
      const runs = new Runs()
      const server = yield* startServer(
        serveWith("HttpRouter.use", routes(runs), { maxBodyBytes: 1024 }),
        MemoryStorage.layer()
      )
      const reply = yield* sendRaw(server, "/orders", {
        headers: [["idempotency-key", "big"], ["content-type", "application/json"]],
        body: new Uint8Array(16 * 1024 * 1024).fill(32)
      })
      assert.strictEqual(reply.status, 413)
      const problem = JSON.parse(new TextDecoder().decode(reply.body))
      assert.strictEqual(problem.type, ProblemType.BodyTooLarge)
      assert.strictEqual(runs.total, 0)
    }))

  it.scopedLive("a chunked body that passes maxBodyBytes: 413 once the cap is passed, handler not run", () =>
    Effect.gen(function*() {
      const runs = new Runs()
      const server = yield* startServer(
        serveWith("HttpRouter.use", routes(runs), { maxBodyBytes: 1024 }),
        MemoryStorage.layer()
      )
      const reply = yield* sendRaw(server, "/orders", {
        headers: [["idempotency-key", "big"], ["content-type", "application/json"]],
        body: Array.from({ length: 16 * 1024 }, () => new Uint8Array(1024).fill(32))
      })
      assert.strictEqual(reply.status, 413)
      assert.strictEqual(runs.total, 0)
      const ok = yield* send(server, "/orders", { key: "small", body: JSON.stringify({ sku: "tea" }) })
      assert.strictEqual(ok.status, 201)
    }))
})

describe("IdempotencyMiddleware outages", () => {
  it.scopedLive("a storage that cannot be reached: 503 problem, handler not run (fail closed)", () =>
    Effect.gen(function*() {
      const runs = new Runs()
      const down = storageWith(() => ({
        acquire: (request) =>
          Effect.fail(
            new IdempotencyError.IdempotencyStorageError({
              key: request.key,
              operation: "acquire",
              cause: new Error("connection refused")
            })
          )
      }))
      const server = yield* startServer(serveWith("HttpRouter.use", routes(runs)), down)
      const reply = yield* send(server, "/orders", { key: "k", body: JSON.stringify({ sku: "tea" }) })
      assert.strictEqual(reply.status, 503)
      assert.strictEqual(reply.headers.get("content-type"), "application/problem+json")
      assert.strictEqual(json(reply).type, ProblemType.StorageUnavailable)
      assert.strictEqual(runs.total, 0)
      // Requests without a key do not touch the storage.
      assert.strictEqual((yield* send(server, "/orders", { body: JSON.stringify({ sku: "tea" }) })).status, 201)
    }))

  it.scopedLive("a lease lost mid-run: 409 lease-lost problem, nothing stored, the retry runs", () =>
    Effect.gen(function*() {
      const runs = new Runs()
      const lossy = storageWith(() => ({ renew: () => Effect.succeed(false) }))
      const server = yield* startServer(serveWith("HttpRouter.use", routes(runs), { lease: "150 millis" }), lossy)
      const reply = yield* send(server, "/slow", { key: "lost", body: "{}" })
      assert.strictEqual(reply.status, 409)
      assert.strictEqual(json(reply).type, ProblemType.LeaseLost)
      // The handler was interrupted when the lease was lost, before it counted its run.
      assert.strictEqual(runs.of("/slow"), 0)
    }))
})

describe("IdempotencyMiddleware and multipart bodies", () => {
  it.scopedLive("a multipart body is left to the handler: it parses it, and the retry replays", () =>
    Effect.gen(function*() {
      const runs = new Runs()
      const server = yield* startServer(serveWith("HttpRouter.use", routes(runs)), MemoryStorage.layer())
      const upload = () =>
        Effect.promise(async () => {
          const form = new FormData()
          form.append("name", "report.csv")
          const response = await fetch(`${server.url}/upload`, {
            method: "POST",
            headers: { "idempotency-key": "up" },
            body: form
          })
          return {
            status: response.status,
            replayed: response.headers.get("idempotent-replayed"),
            body: await response.text()
          }
        })
      const first = yield* upload()
      const retry = yield* upload()
      assert.deepStrictEqual(first, { status: 201, replayed: null, body: JSON.stringify({ name: "report.csv", n: 1 }) })
      assert.deepStrictEqual(retry, { ...first, replayed: "true" })
    }))
})
