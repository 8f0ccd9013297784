/**
 * Limits and outages: request bodies over `maxBodyBytes` (declared or streamed), a storage that
 * fails, a lease lost mid-run. Each is refused with a problem and the handler does not run (or,
 * for the lost lease, its response is not stored).
 */
import { HttpServerRequest, HttpServerResponse } from "@effect/platform"
import { assert, describe, it } from "@effect/vitest"
import { Effect, Layer } from "effect"
import * as IdempotencyMiddleware from "../src/Http/IdempotencyMiddleware.js"
import { ProblemType } from "../src/Http/IdempotencyMiddleware.js"
import { IdempotencyError, MemoryStorage, Storage } from "../src/index.js"
import { counted } from "./fixtures/CountingStorage.js"
import { json, send, sendRaw, startServer } from "./fixtures/Http.js"
import { routes, Runs, serveWith } from "./fixtures/HttpApp.js"
import { assertReplayOf } from "./fixtures/HttpScenarios.js"

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

describe("IdempotencyMiddleware and bodies it cannot read", () => {
  it.effect("a body whose stream fails mid-way: 400 body-unreadable problem, handler not run", () =>
    Effect.gen(function*() {
      const runs = new Runs()
      // Node's own parser answers a cut-off body before the app sees it; a body stream that
      // fails (another platform, a proxy) reaches the middleware, which answers with a problem.
      const failing = new ReadableStream<Uint8Array>({
        start: (controller) => {
          controller.enqueue(new TextEncoder().encode("{\"sku\":"))
          controller.error(new Error("connection reset"))
        }
      })
      const request = HttpServerRequest.fromWeb(
        new Request("http://127.0.0.1/orders", {
          method: "POST",
          headers: { "idempotency-key": "cut", "content-type": "application/json" },
          body: failing,
          duplex: "half"
        } as RequestInit)
      )
      const app = IdempotencyMiddleware.make()(
        Effect.sync(() => (runs.count("/orders"), HttpServerResponse.empty({ status: 201 })))
      )
      const response = yield* app.pipe(
        Effect.provideService(HttpServerRequest.HttpServerRequest, request),
        Effect.provide(MemoryStorage.layer()),
        Effect.scoped
      )
      assert.strictEqual(response.status, 400)
      assert.strictEqual(response.headers["content-type"], "application/problem+json")
      const body = response.body
      assert.strictEqual(body._tag, "Uint8Array")
      if (body._tag === "Uint8Array") {
        assert.strictEqual(JSON.parse(new TextDecoder().decode(body.body)).type, ProblemType.BodyUnreadable)
      }
      assert.strictEqual(runs.total, 0)
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

/** Rewrites what the middleware commits: the record as another version of it would have written it. */
const rewritingCommits = (rewrite: (payload: Uint8Array) => Uint8Array) =>
  storageWith((inner) => ({
    commit: (lease, request) => inner.commit(lease, { ...request, payload: rewrite(request.payload) })
  }))

/** The stored form with its head (JSON) rewritten: version byte, head length, head, body. */
const withHead = (payload: Uint8Array, edit: (head: Record<string, unknown>) => Record<string, unknown>) => {
  const view = new DataView(payload.buffer, payload.byteOffset, payload.byteLength)
  const headEnd = 5 + view.getUint32(1)
  const head = JSON.parse(new TextDecoder().decode(payload.subarray(5, headEnd)))
  const newHead = new TextEncoder().encode(JSON.stringify(edit(head)))
  const out = new Uint8Array(5 + newHead.length + payload.length - headEnd)
  out[0] = payload[0]!
  new DataView(out.buffer).setUint32(1, newHead.length)
  out.set(newHead, 5)
  out.set(payload.subarray(headEnd), 5 + newHead.length)
  return out
}

describe("IdempotencyMiddleware and records written by other versions", () => {
  const order = JSON.stringify({ sku: "tea" })

  it.scopedLive("a record in a newer format: 503 record-undecodable with Retry-After, handler not run again", () =>
    Effect.gen(function*() {
      const runs = new Runs()
      const newer = rewritingCommits((payload) => {
        const copy = payload.slice()
        copy[0] = 2
        return copy
      })
      const server = yield* startServer(serveWith("HttpRouter.use", routes(runs)), newer)
      const first = yield* send(server, "/orders", { key: "v2", body: order })
      assert.strictEqual(first.status, 201)
      const retry = yield* send(server, "/orders", { key: "v2", body: order })
      assert.strictEqual(retry.status, 503)
      assert.strictEqual(retry.headers.get("content-type"), "application/problem+json")
      assert.strictEqual(json(retry).type, ProblemType.RecordUndecodable)
      assert.strictEqual(retry.headers.get("retry-after"), "5")
      assert.strictEqual(json(retry).retryAfter, 5)
      assert.strictEqual(runs.of("/orders"), 1)
      assert.isTrue(server.logs.some((line) => line.includes("format version 2")))
    }))

  it.scopedLive("onUndecodable: \"run\" forgets such a record and runs the handler again", () =>
    Effect.gen(function*() {
      const runs = new Runs()
      let commits = 0
      // Only the first commit is in the newer format; the run again stores a readable one.
      const newerOnce = rewritingCommits((payload) => {
        if (++commits > 1) return payload
        const copy = payload.slice()
        copy[0] = 2
        return copy
      })
      const server = yield* startServer(serveWith("HttpRouter.use", routes(runs), { onUndecodable: "run" }), newerOnce)
      yield* send(server, "/orders", { key: "v2", body: order })
      const rerun = yield* send(server, "/orders", { key: "v2", body: order })
      assert.strictEqual(rerun.status, 201)
      assert.deepStrictEqual(json(rerun), { id: "order-2", sku: "tea" })
      assertReplayOf(yield* send(server, "/orders", { key: "v2", body: order }), rerun)
      assert.strictEqual(runs.of("/orders"), 2)
    }))

  it.scopedLive("a version 1 record whose head has fields this version does not know is replayed", () =>
    Effect.gen(function*() {
      const runs = new Runs()
      const richer = rewritingCommits((payload) => withHead(payload, (head) => ({ ...head, z: { future: [1] } })))
      const server = yield* startServer(serveWith("HttpRouter.use", routes(runs)), richer)
      const first = yield* send(server, "/orders", { key: "v1+", body: order })
      assertReplayOf(yield* send(server, "/orders", { key: "v1+", body: order }), first)
      assert.strictEqual(runs.of("/orders"), 1)
    }))

  it.scopedLive("a damaged record (its head cut short) is refused the same way, not misread", () =>
    Effect.gen(function*() {
      const runs = new Runs()
      const damaged = rewritingCommits((payload) => payload.subarray(0, 8))
      const server = yield* startServer(serveWith("HttpRouter.use", routes(runs)), damaged)
      yield* send(server, "/orders", { key: "cut", body: order })
      const retry = yield* send(server, "/orders", { key: "cut", body: order })
      assert.strictEqual(retry.status, 503)
      assert.strictEqual(json(retry).type, ProblemType.RecordUndecodable)
      assert.strictEqual(runs.of("/orders"), 1)
    }))
})

describe("IdempotencyMiddleware when the response cannot be stored", () => {
  for (const mount of ["HttpRouter.use", "HttpServer.serve"] as const) {
    it.scopedLive(`${mount}: a commit the store refuses for good: 503 result-not-stored, never the 201`, () =>
      Effect.gen(function*() {
        const runs = new Runs()
        const refusing = storageWith(() => ({
          commit: (lease) =>
            Effect.fail(
              new IdempotencyError.IdempotencyStorageError({
                key: lease.key,
                operation: "commit",
                cause: new Error("value too large for the store"),
                retryable: false
              })
            )
        }))
        const server = yield* startServer(serveWith(mount, routes(runs)), refusing)
        const reply = yield* send(server, "/orders", { key: "lost", body: JSON.stringify({ sku: "tea" }) })
        assert.strictEqual(reply.status, 503)
        assert.strictEqual(reply.headers.get("content-type"), "application/problem+json")
        assert.strictEqual(json(reply).type, ProblemType.ResultNotStored)
        assert.strictEqual(json(reply).reason, "storage-failed")
        assert.strictEqual(runs.of("/orders"), 1)
      }))
  }
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
