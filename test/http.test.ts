/**
 * The HTTP middleware over real connections on memory storage: the core scenarios under both
 * router mounts, then keys, scope, fingerprint, status policy and problem details.
 * (`http.api.test.ts` mounts it on an `HttpApi`, `http.limits.test.ts` covers limits and outages,
 * `http.redis.test.ts` runs the core scenarios on Redis.)
 */
import { HttpRouter, HttpServer, HttpServerResponse } from "@effect/platform"
import { assert, describe, it } from "@effect/vitest"
import { Deferred, type Duration, Effect, Fiber, Layer, Tracer } from "effect"
import * as IdempotencyMiddleware from "../src/Http/IdempotencyMiddleware.js"
import { IdempotencyError, Idempotent, MemoryStorage, Storage } from "../src/index.js"
import { counted } from "./fixtures/CountingStorage.js"
import { eventually, headerLines, json, type Reply, send, sendRaw, startServer } from "./fixtures/Http.js"
import { makeSlowSignals, type Mount, routes, Runs, serveWith, type SlowSignals } from "./fixtures/HttpApp.js"
import { assertInFlight, assertReplayOf, coreScenarios } from "./fixtures/HttpScenarios.js"

const { ProblemType } = IdempotencyMiddleware

const order = JSON.stringify({ sku: "tea" })

const start = (
  runs: Runs,
  options?: IdempotencyMiddleware.IdempotencyMiddlewareOptions,
  mount: Mount = "HttpRouter.use",
  slow?: SlowSignals
) => startServer(serveWith(mount, routes(runs, slow), options), MemoryStorage.layer())

const assertProblem = (reply: Reply, status: number, type: IdempotencyMiddleware.ProblemType) => {
  assert.strictEqual(reply.status, status)
  assert.strictEqual(reply.headers.get("content-type"), "application/problem+json")
  const problem = json(reply)
  assert.strictEqual(problem.type, type)
  assert.strictEqual(problem.status, status)
  assert.isString(problem.title)
  assert.isString(problem.detail)
  return problem
}

describe("IdempotencyMiddleware on memory storage", () => {
  coreScenarios("HttpRouter.use", () => MemoryStorage.layer())
  coreScenarios("HttpServer.serve", () => MemoryStorage.layer())

  describe("keys", () => {
    it.scopedLive("a bare token and the same key as an RFC 8941 string are one key", () =>
      Effect.gen(function*() {
        const runs = new Runs()
        const server = yield* start(runs)
        const first = yield* send(server, "/orders", { key: "8e03978e-40d5-43e8-bc93-6894a57f9324", body: order })
        const quoted = yield* send(server, "/orders", { key: "\"8e03978e-40d5-43e8-bc93-6894a57f9324\"", body: order })
        assertReplayOf(quoted, first)
        assert.strictEqual(runs.of("/orders"), 1)
      }))

    it.scopedLive("a quoted key with escaped quote and backslash is read unescaped", () =>
      Effect.gen(function*() {
        const runs = new Runs()
        const server = yield* start(runs)
        const first = yield* send(server, "/orders", { key: String.raw`"say \"hi\" \\ bye"`, body: order })
        const again = yield* send(server, "/orders", { key: String.raw`"say \"hi\" \\ bye"`, body: order })
        const other = yield* send(server, "/orders", { key: String.raw`"say \"hi\" bye"`, body: order })
        assert.strictEqual(first.status, 201)
        assertReplayOf(again, first)
        assert.isNull(other.headers.get("idempotent-replayed"))
        assert.strictEqual(runs.of("/orders"), 2)
      }))

    const invalid: ReadonlyArray<readonly [string, string, string]> = [
      ["an unterminated quoted string", "\"abc", "malformed-header"],
      ["an escape other than \\\" and \\\\", String.raw`"a\nb"`, "malformed-header"],
      ["two tokens", "abc def", "malformed-header"],
      ["a list in one line", "abc, def", "duplicate-header"],
      ["an empty quoted string", "\"\"", "empty"],
      ["256 characters", "k".repeat(256), "too-long"]
    ]
    for (const [label, key, reason] of invalid) {
      it.scopedLive(`${label} → 400 (${reason}), handler not run`, () =>
        Effect.gen(function*() {
          const runs = new Runs()
          const server = yield* start(runs)
          const reply = yield* send(server, "/orders", { key, body: order })
          const problem = assertProblem(reply, 400, ProblemType.KeyInvalid)
          assert.strictEqual(problem.reason, reason)
          assert.strictEqual(runs.total, 0)
        }))
    }

    it.scopedLive("255 characters are accepted; maxKeyLength lowers the bound", () =>
      Effect.gen(function*() {
        const runs = new Runs()
        const server = yield* start(runs)
        assert.strictEqual((yield* send(server, "/orders", { key: "k".repeat(255), body: order })).status, 201)
        const strict = yield* start(runs, { maxKeyLength: 8 })
        assert.strictEqual((yield* send(strict, "/orders", { key: "12345678", body: order })).status, 201)
        assertProblem(yield* send(strict, "/orders", { key: "123456789", body: order }), 400, ProblemType.KeyInvalid)
      }))

    it.scopedLive("the header sent twice → 400 (duplicate-header), handler not run", () =>
      Effect.gen(function*() {
        const runs = new Runs()
        const server = yield* start(runs)
        const reply = yield* sendRaw(server, "/orders", {
          headers: [["idempotency-key", "a"], ["idempotency-key", "a"], ["content-type", "application/json"]],
          body: new TextEncoder().encode(order)
        })
        assert.strictEqual(reply.status, 400)
        const problem = JSON.parse(new TextDecoder().decode(reply.body))
        assert.strictEqual(problem.type, ProblemType.KeyInvalid)
        assert.strictEqual(problem.reason, "duplicate-header")
        assert.strictEqual(runs.total, 0)
      }))

    it.scopedLive("required: a covered request without a key → 400, handler not run", () =>
      Effect.gen(function*() {
        const runs = new Runs()
        const server = yield* start(runs, { required: true })
        const reply = yield* send(server, "/orders", { body: order })
        assertProblem(reply, 400, ProblemType.KeyMissing)
        assert.strictEqual(runs.total, 0)
        // Methods it does not cover need no key.
        assert.strictEqual((yield* send(server, "/orders", { method: "GET" })).status, 200)
      }))

    it.scopedLive("not required: a request without a key passes through and runs every time", () =>
      Effect.gen(function*() {
        const runs = new Runs()
        const server = yield* start(runs)
        yield* send(server, "/orders", { body: order })
        const second = yield* send(server, "/orders", { body: order })
        assert.deepStrictEqual(json(second), { id: "order-2", sku: "tea" })
      }))

    it.scopedLive("uncovered methods pass through even with a key; PATCH is covered", () =>
      Effect.gen(function*() {
        const runs = new Runs()
        const server = yield* start(runs)
        yield* send(server, "/orders", { method: "GET", key: "list" })
        yield* send(server, "/orders", { method: "GET", key: "list" })
        assert.strictEqual(runs.of("GET /orders"), 2)
        const patched = yield* send(server, "/orders/7", { method: "PATCH", key: "p", body: "{}" })
        const again = yield* send(server, "/orders/7", { method: "PATCH", key: "p", body: "{}" })
        assertReplayOf(again, patched)
        assert.strictEqual(runs.of("/orders/:id"), 1)
        // `methods` chooses.
        const postOnly = yield* start(runs, { methods: ["POST"] })
        yield* send(postOnly, "/orders/7", { method: "PATCH", key: "p", body: "{}" })
        assert.strictEqual(runs.of("/orders/:id"), 2)
      }))

    it.scopedLive("header names another header; replayHeader renames the replay mark", () =>
      Effect.gen(function*() {
        const runs = new Runs()
        const server = yield* start(runs, { header: "X-Request-Id", replayHeader: "X-Replayed" })
        const first = yield* send(server, "/orders", { headers: { "x-request-id": "r-1" }, body: order })
        const retry = yield* send(server, "/orders", { headers: { "x-request-id": "r-1" }, body: order })
        assert.deepStrictEqual(retry.body, first.body)
        assert.strictEqual(retry.headers.get("x-replayed"), "true")
        assert.isNull(retry.headers.get("idempotent-replayed"))
        assert.strictEqual(runs.of("/orders"), 1)
      }))
  })

  describe("scope", () => {
    it.scopedLive("one key on two routes runs twice", () =>
      Effect.gen(function*() {
        const runs = new Runs()
        const server = yield* start(runs)
        const order1 = yield* send(server, "/orders", { key: "shared", body: order })
        const payment = yield* send(server, "/payments", { key: "shared", body: order })
        assert.deepStrictEqual([order1.status, payment.status], [201, 201])
        assert.isNull(payment.headers.get("idempotent-replayed"))
        assert.deepStrictEqual([runs.of("/orders"), runs.of("/payments")], [1, 1])
      }))

    const alice = { authorization: "Bearer alice-token" }
    const bob = { authorization: "Bearer bob-token" }

    it.scopedLive("Bob sending Alice's key and body runs the handler himself, never seeing her response", () =>
      Effect.gen(function*() {
        const runs = new Runs()
        const server = yield* start(runs)
        const first = yield* send(server, "/private", { key: "k", body: order, headers: alice })
        const bobs = yield* send(server, "/private", { key: "k", body: order, headers: bob })
        assert.strictEqual(runs.of("/private"), 2)
        assert.strictEqual(bobs.status, 201)
        assert.isNull(bobs.headers.get("idempotent-replayed"))
        assert.deepStrictEqual(json(bobs), { n: 2, for: "Bearer bob-token" })
        assert.strictEqual(bobs.headers.get("x-owner-secret"), "secret-of-run-2")
        // Each one's retry replays their own.
        const aliceAgain = yield* send(server, "/private", { key: "k", body: order, headers: alice })
        assertReplayOf(aliceAgain, first)
        assert.strictEqual(aliceAgain.headers.get("x-owner-secret"), "secret-of-run-1")
        assertReplayOf(yield* send(server, "/private", { key: "k", body: order, headers: bob }), bobs)
        assert.strictEqual(runs.of("/private"), 2)
      }))

    it.scopedLive("a 409 and a 422 never cross callers either", () =>
      Effect.gen(function*() {
        const runs = new Runs()
        const slow = yield* makeSlowSignals
        const server = yield* start(runs, undefined, "HttpRouter.use", slow)
        const alices = yield* Effect.fork(send(server, "/slow", { key: "busy", body: order, headers: alice }))
        yield* Deferred.await(slow.started)
        // Bob's own run of the key starts (and, on this route, waits for the same release).
        const bobs = yield* Effect.fork(send(server, "/slow", { key: "busy", body: order, headers: bob }))
        yield* eventually(() => slow.events.filter((event) => event === "started").length === 2, "Bob's run to start")
        yield* Deferred.succeed(slow.release, undefined)
        assert.deepStrictEqual([(yield* Fiber.join(alices)).status, (yield* Fiber.join(bobs)).status], [201, 201])
        assert.strictEqual(runs.of("/slow"), 2)
        // Alice used the key with one body; Bob's other body under it is his first use.
        yield* send(server, "/payments", { key: "reuse", body: order, headers: alice })
        const other = yield* send(server, "/payments", { key: "reuse", body: "{}", headers: bob })
        assert.strictEqual(other.status, 201)
        assert.strictEqual(runs.of("/payments"), 2)
      }))

    it.scopedLive("Cookie counts as a credential; the same credentials replay; no credentials share", () =>
      Effect.gen(function*() {
        const runs = new Runs()
        const server = yield* start(runs)
        const a = yield* send(server, "/private", { key: "c", body: order, headers: { cookie: "session=a" } })
        const b = yield* send(server, "/private", { key: "c", body: order, headers: { cookie: "session=b" } })
        assert.deepStrictEqual([json(a).n, json(b).n], [1, 2])
        assertReplayOf(yield* send(server, "/private", { key: "c", body: order, headers: { cookie: "session=a" } }), a)
        const anonymous = yield* send(server, "/private", { key: "anon", body: order })
        assertReplayOf(yield* send(server, "/private", { key: "anon", body: order }), anonymous)
        assert.strictEqual(runs.of("/private"), 3)
      }))

    it.scopedLive("credentialHeaders chooses the headers; their values never reach the store or the logs", () =>
      Effect.gen(function*() {
        const runs = new Runs()
        const keys: Array<string> = []
        const recording = Layer.effect(
          Storage.Storage,
          Effect.map(Storage.Storage, (inner) =>
            counted(inner, {
              acquire: (request) => Effect.suspend(() => (keys.push(request.key), inner.acquire(request)))
            }).storage)
        ).pipe(Layer.provide(MemoryStorage.layer()))
        const server = yield* startServer(
          serveWith("HttpRouter.use", routes(runs), { credentialHeaders: ["X-Api-Key"] }),
          recording
        )
        const one = yield* send(server, "/private", {
          key: "h",
          body: order,
          headers: { "x-api-key": "key-one", ...alice }
        })
        const two = yield* send(server, "/private", {
          key: "h",
          body: order,
          headers: { "x-api-key": "key-two", ...alice }
        })
        assert.deepStrictEqual([json(one).n, json(two).n], [1, 2])
        // Authorization is not named, so it does not count.
        assertReplayOf(
          yield* send(server, "/private", { key: "h", body: order, headers: { "x-api-key": "key-one", ...bob } }),
          one
        )
        assert.strictEqual(keys.length, 3)
        for (const text of [...keys, ...server.logs]) {
          for (const secret of ["key-one", "key-two", "alice-token", "bob-token"]) assert.notInclude(text, secret)
        }
      }))

    it.scopedLive("with scope given, scope decides: one tenant's callers share a record", () =>
      Effect.gen(function*() {
        const runs = new Runs()
        const server = yield* start(runs, { scope: () => Effect.succeed("tenant-1") })
        const first = yield* send(server, "/private", { key: "t", body: order, headers: alice })
        assertReplayOf(yield* send(server, "/private", { key: "t", body: order, headers: bob }), first)
        assert.strictEqual(runs.of("/private"), 1)
      }))

    it.scopedLive("one key for two tenants runs twice; for one tenant on one route, once", () =>
      Effect.gen(function*() {
        const runs = new Runs()
        const server = yield* start(runs, {
          scope: (request) => Effect.succeed(request.headers["x-tenant"] ?? "anonymous")
        })
        const acme = yield* send(server, "/orders", { key: "k", body: order, headers: { "x-tenant": "acme" } })
        const globex = yield* send(server, "/orders", { key: "k", body: order, headers: { "x-tenant": "globex" } })
        const acmeAgain = yield* send(server, "/orders", { key: "k", body: order, headers: { "x-tenant": "acme" } })
        assert.deepStrictEqual(json(acme), { id: "order-1", sku: "tea" })
        assert.deepStrictEqual(json(globex), { id: "order-2", sku: "tea" })
        assertReplayOf(acmeAgain, acme)
        assert.strictEqual(runs.of("/orders"), 2)
      }))

    it.scopedLive("the route template is the scope: the key on another id of the route is a reuse (422)", () =>
      Effect.gen(function*() {
        const runs = new Runs()
        const server = yield* start(runs)
        const first = yield* send(server, "/orders/1/capture", { key: "cap", body: "{}" })
        const other = yield* send(server, "/orders/2/capture", { key: "cap", body: "{}" })
        assert.deepStrictEqual(json(first), { id: "1", capture: 1 })
        assertProblem(other, 422, ProblemType.KeyReused)
        assert.strictEqual(runs.of("/orders/:id/capture"), 1)
      }))

    it.scopedLive("a router mounted under two prefixes: the prefix is part of the route", () =>
      Effect.gen(function*() {
        const runs = new Runs()
        const versioned = HttpRouter.use(routes(runs), IdempotencyMiddleware.make())
        const server = yield* startServer(
          HttpServer.serve(
            HttpRouter.empty.pipe(HttpRouter.mount("/v1", versioned), HttpRouter.mount("/v2", versioned))
          ),
          MemoryStorage.layer()
        )
        const v1 = yield* send(server, "/v1/orders", { key: "m", body: order })
        const v2 = yield* send(server, "/v2/orders", { key: "m", body: order })
        const v1Again = yield* send(server, "/v1/orders", { key: "m", body: order })
        assert.deepStrictEqual([json(v1).id, json(v2).id], ["order-1", "order-2"])
        assertReplayOf(v1Again, v1)
      }))

    it.scopedLive("without a router in front (HttpServer.serve), the path is the scope", () =>
      Effect.gen(function*() {
        const runs = new Runs()
        const server = yield* start(runs, undefined, "HttpServer.serve")
        yield* send(server, "/orders/1/capture", { key: "cap", body: "{}" })
        const other = yield* send(server, "/orders/2/capture", { key: "cap", body: "{}" })
        assert.deepStrictEqual(json(other), { id: "2", capture: 2 })
      }))
  })

  describe("fingerprint", () => {
    const reused: ReadonlyArray<readonly [string, Parameters<typeof send>[2], Parameters<typeof send>[2], string?]> = [
      ["a different body", { body: order }, { body: JSON.stringify({ sku: "coffee" }) }],
      ["a different query", { body: order }, { body: order }, "?coupon=1"],
      ["a body where the first had none", {}, { body: "{}" }],
      ["no body where the first had one", { body: "{}" }, {}]
    ]
    for (const [label, first, second, query] of reused) {
      it.scopedLive(`${label} → 422, handler not run again`, () =>
        Effect.gen(function*() {
          const runs = new Runs()
          const server = yield* start(runs)
          const one = yield* send(server, "/payments", { ...first, key: "fp" })
          assert.strictEqual(one.status, 201)
          const two = yield* send(server, `/payments${query ?? ""}`, { ...second, key: "fp" })
          assertProblem(two, 422, ProblemType.KeyReused)
          assert.strictEqual(runs.of("/payments"), 1)
        }))
    }

    it.scopedLive("JSON bodies are compared canonically: key order and whitespace do not matter", () =>
      Effect.gen(function*() {
        const runs = new Runs()
        const server = yield* start(runs)
        const first = yield* send(server, "/orders?a=1&b=2", { key: "c", body: "{\"sku\":\"tea\",\"quantity\":2}" })
        const retry = yield* send(server, "/orders?b=2&a=1", {
          key: "c",
          body: "{ \"quantity\": 2,\n  \"sku\": \"tea\" }",
          contentType: "application/json; charset=utf-8"
        })
        assertReplayOf(retry, first)
      }))

    it.scopedLive("the handler still reads the body after the middleware did, in every form", () =>
      Effect.gen(function*() {
        const runs = new Runs()
        const server = yield* start(runs)
        const body = JSON.stringify({ note: "café ☕", n: 1 })
        const reply = yield* send(server, "/echo", { key: "echo", body })
        const bytes = new TextEncoder().encode(body).length
        assert.deepStrictEqual(json(reply), {
          json: { note: "café ☕", n: 1 },
          text: body,
          bytes,
          streamed: bytes,
          described: "ServerRequest(POST /echo)",
          n: 1
        })
      }))

    it.scopedLive("fingerprint: false compares nothing; a function chooses what is compared", () =>
      Effect.gen(function*() {
        const runs = new Runs()
        const loose = yield* start(runs, { fingerprint: false })
        const first = yield* send(loose, "/orders", { key: "f", body: order })
        assertReplayOf(yield* send(loose, "/orders", { key: "f", body: JSON.stringify({ sku: "coffee" }) }), first)
        const bySku = yield* start(runs, {
          fingerprint: (_, body) =>
            Effect.sync(() => (JSON.parse(new TextDecoder().decode(body)) as { readonly sku: string }).sku)
        })
        const a = yield* send(bySku, "/orders", { key: "g", body: JSON.stringify({ sku: "tea", quantity: 1 }) })
        assertReplayOf(
          yield* send(bySku, "/orders", { key: "g", body: JSON.stringify({ sku: "tea", quantity: 9 }) }),
          a
        )
        assertProblem(
          yield* send(bySku, "/orders", { key: "g", body: order.replace("tea", "mate") }),
          422,
          ProblemType.KeyReused
        )
      }))
  })

  describe("status policy", () => {
    it.scopedLive("store overrides which statuses are kept", () =>
      Effect.gen(function*() {
        const runs = new Runs()
        const onlySuccess = yield* start(runs, { store: (status) => status < 400 })
        yield* send(onlySuccess, "/bad-request", { key: "s", body: order })
        const rerun = yield* send(onlySuccess, "/bad-request", { key: "s", body: order })
        assert.deepStrictEqual(json(rerun), { invalid: 2 })
        const everything = yield* start(runs, { store: () => true })
        const failed = yield* send(everything, "/unavailable", { key: "u", body: order })
        assertReplayOf(yield* send(everything, "/unavailable", { key: "u", body: order }), failed)
        assert.strictEqual(runs.of("/unavailable"), 1)
      }))
  })

  describe("the handler's run (Idempotent.currentExecution)", () => {
    it.scopedLive("a keyed POST: Some, with the key exactly as the client sent it and a fence", () =>
      Effect.gen(function*() {
        const runs = new Runs()
        const server = yield* start(runs)
        const key = "order-42:retry/1"
        const first = yield* send(server, "/execution", { key, body: order })
        const { execution } = json(first)
        assert.strictEqual(execution.key, key)
        assert.isAbove(execution.fence, 0)
        assertReplayOf(yield* send(server, "/execution", { key, body: order }), first)
        // A quoted key is the string inside the quotes.
        const quoted = yield* send(server, "/execution", { key: String.raw`"say \"hi\""`, body: order })
        assert.strictEqual(json(quoted).execution.key, "say \"hi\"")
      }))

    it.scopedLive("a keyless POST, a GET and a GET with a key: None, and the handler answers 200", () =>
      Effect.gen(function*() {
        const runs = new Runs()
        for (const required of [false, true]) {
          const server = yield* start(runs, { required })
          const keyless = yield* send(server, "/execution", { body: order })
          if (!required) {
            assert.strictEqual(keyless.status, 200)
            assert.isNull(json(keyless).execution)
          }
          const get = yield* send(server, "/execution", { method: "GET" })
          const keyedGet = yield* send(server, "/execution", { method: "GET", key: "g" })
          assert.deepStrictEqual([get.status, keyedGet.status], [200, 200])
          assert.deepStrictEqual([json(get).execution, json(keyedGet).execution], [null, null])
        }
      }))

    it("a handler that requires Idempotent.Execution cannot be served through the middleware", () => {
      type Servable = Layer.Layer<
        never,
        never,
        HttpServer.HttpServer | HttpRouter.HttpRouter.DefaultServices | Storage.Storage
      >
      const needsExecution = HttpServer.serve(
        HttpRouter.empty.pipe(
          HttpRouter.post(
            "/x",
            Effect.map(Idempotent.Execution, ({ fence }) => HttpServerResponse.unsafeJson({ fence }))
          ),
          HttpRouter.use(IdempotencyMiddleware.make())
        )
      )
      // @ts-expect-error `Execution` stays a requirement: no request without a run could meet it.
      const refused: Servable = needsExecution
      const readsOption = HttpServer.serve(
        HttpRouter.empty.pipe(
          HttpRouter.post("/x", Effect.map(Idempotent.currentExecution, (run) => HttpServerResponse.text(String(run)))),
          HttpRouter.use(IdempotencyMiddleware.make())
        )
      )
      const served: Servable = readsOption
      assert.isDefined(refused)
      assert.isDefined(served)
    })
  })

  describe("options", () => {
    const refused: ReadonlyArray<readonly [string, IdempotencyMiddleware.IdempotencyMiddlewareOptions]> = [
      ["lease", { lease: 0 }],
      ["lease", { lease: "-1 second" as Duration.DurationInput }],
      ["ttl", { ttl: "1 second", lease: "30 seconds" }],
      ["onInFlight", { onInFlight: { wait: "soon" as Duration.DurationInput } }],
      ["maxBodyBytes", { maxBodyBytes: 0 }],
      ["maxBodyBytes", { maxBodyBytes: -1 }],
      ["maxBodyBytes", { maxBodyBytes: 1.5 }],
      ["maxBodyBytes", { maxBodyBytes: Number.NaN }],
      ["maxResponseBytes", { maxResponseBytes: 0 }],
      ["maxKeyLength", { maxKeyLength: 0 }],
      ["header", { header: "Idempotency Key" }],
      ["replayHeader", { replayHeader: "" }],
      ["credentialHeaders", { credentialHeaders: ["authorization", "x-api key"] }],
      ["onUndecodable", { onUndecodable: "retry" as "run" }]
    ]
    for (const [option, options] of refused) {
      it(`make throws IdempotencyOptionsInvalid for ${option}: ${JSON.stringify(options)}`, () => {
        try {
          IdempotencyMiddleware.make(options)
          assert.fail("make accepted the options")
        } catch (error) {
          assert.instanceOf(error, IdempotencyError.IdempotencyOptionsInvalid)
          assert.strictEqual((error as IdempotencyError.IdempotencyOptionsInvalid).option, option)
        }
      })
    }

    it("make accepts a ttl equal to the lease and limits of Infinity", () => {
      assert.isFunction(
        IdempotencyMiddleware.make({ ttl: "30 seconds", lease: "30 seconds", maxResponseBytes: Infinity })
      )
    })
  })

  it.scopedLive("its span names the outcome and the scoped key's hash, never the key", () =>
    Effect.gen(function*() {
      const spans: Array<{ readonly name: string; readonly attributes: Map<string, unknown> }> = []
      const tracer = Tracer.make({
        span: (name, parent, context, links, startTime, kind) => {
          const attributes = new Map<string, unknown>()
          spans.push({ name, attributes })
          return {
            _tag: "Span",
            name,
            spanId: `span-${spans.length}`,
            traceId: "trace",
            parent,
            context,
            status: { _tag: "Started", startTime },
            attributes,
            links,
            sampled: true,
            kind,
            end: () => undefined,
            attribute: (key, value) => void attributes.set(key, value),
            event: () => undefined,
            addLinks: () => undefined
          }
        },
        context: (f) => f()
      })
      const runs = new Runs()
      const server = yield* startServer(serveWith("HttpRouter.use", routes(runs)), MemoryStorage.layer(), { tracer })
      const key = "customer-42@example.com"
      yield* send(server, "/orders", { key, body: order })
      yield* send(server, "/orders", { key, body: order })
      const mine = spans.filter((span) => span.name === "IdempotencyMiddleware")
      assert.deepStrictEqual(mine.map((span) => span.attributes.get("idempotency.outcome")), ["executed", "replayed"])
      assert.strictEqual(mine[0]!.attributes.get("idempotency.stored"), true)
      assert.strictEqual(mine[0]!.attributes.get("idempotency.backend"), "memory")
      const hash = mine[0]!.attributes.get("idempotency.key_hash")
      assert.match(String(hash), /^[0-9a-f]{16}$/)
      assert.strictEqual(mine[1]!.attributes.get("idempotency.key_hash"), hash)
      // (The platform's own `http.server` span records request headers unless their names are in
      // `Headers.currentRedactedNames`.)
      for (const span of mine) {
        for (const value of span.attributes.values()) assert.notInclude(String(value), key)
      }
    }))

  describe("problem details", () => {
    it.scopedLive("every refusal is application/problem+json with a stable type, title, status and detail", () =>
      Effect.gen(function*() {
        const runs = new Runs()
        const slow = yield* makeSlowSignals
        const server = yield* start(runs, { required: true }, "HttpRouter.use", slow)
        assertProblem(yield* send(server, "/orders", { body: order }), 400, ProblemType.KeyMissing)
        assertProblem(yield* send(server, "/orders", { key: "\"x", body: order }), 400, ProblemType.KeyInvalid)
        yield* send(server, "/orders", { key: "p", body: order })
        assertProblem(yield* send(server, "/orders", { key: "p", body: "{}" }), 422, ProblemType.KeyReused)
        const first = yield* Effect.fork(send(server, "/slow", { key: "busy", body: order }))
        yield* Deferred.await(slow.started)
        const busy = yield* send(server, "/slow", { key: "busy", body: order })
        assertInFlight(busy)
        const problem = json(busy)
        assert.strictEqual(problem.retryAfter, Number(busy.headers.get("retry-after")))
        yield* Deferred.succeed(slow.release, undefined)
        assert.strictEqual((yield* Fiber.join(first)).status, 201)
      }))

    it.scopedLive("the problem hook renders the body; 409 still carries Retry-After", () =>
      Effect.gen(function*() {
        const runs = new Runs()
        const slow = yield* makeSlowSignals
        const server = yield* start(
          runs,
          {
            problem: (problem, request) =>
              HttpServerResponse.text(`${problem.title} (${request.method})`, {
                status: problem.status === 422 ? 400 : problem.status,
                headers: { "x-problem": problem.type }
              })
          },
          "HttpRouter.use",
          slow
        )
        yield* send(server, "/orders", { key: "h", body: order })
        const reused = yield* send(server, "/orders", { key: "h", body: "{}" })
        assert.strictEqual(reused.status, 400)
        assert.strictEqual(reused.text, "Idempotency key reused (POST)")
        assert.strictEqual(reused.headers.get("x-problem"), ProblemType.KeyReused)
        const first = yield* Effect.fork(send(server, "/slow", { key: "busy", body: order }))
        yield* Deferred.await(slow.started)
        const busy = yield* send(server, "/slow", { key: "busy", body: order })
        assert.strictEqual(busy.status, 409)
        assert.strictEqual(busy.text, "Request in progress (POST)")
        assert.isAtLeast(Number(busy.headers.get("retry-after")), 1)
        yield* Deferred.succeed(slow.release, undefined)
        yield* Fiber.join(first)
      }))

    it.scopedLive("a replay carries the stored headers once each, plus the replay mark", () =>
      Effect.gen(function*() {
        const runs = new Runs()
        const server = yield* start(runs)
        const headers = [["idempotency-key", "h1"], ["content-type", "application/json"]] as const
        const body = new TextEncoder().encode(order)
        yield* sendRaw(server, "/orders", { headers, body })
        const retry = yield* sendRaw(server, "/orders", { headers, body })
        assert.deepStrictEqual(headerLines(retry, "content-type"), ["application/json"])
        assert.deepStrictEqual(headerLines(retry, "content-length"), [String(retry.body.length)])
        assert.deepStrictEqual(headerLines(retry, "idempotent-replayed"), ["true"])
      }))
  })
})
