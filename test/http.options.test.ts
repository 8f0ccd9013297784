/**
 * The middleware's newer options over real connections on memory storage: a key found by a
 * function (in the body, in two headers), problem `type` URIs that resolve to a documented anchor
 * (or to the app's own base), a `Retry-After` on 409 that says when a retry may first succeed,
 * options read from `Config`, and storage failures logged with their cause.
 */
import { HttpServerRequest } from "@effect/platform"
import { assert, describe, it } from "@effect/vitest"
import { Config, ConfigError, ConfigProvider, Deferred, Effect, Fiber, Layer, Option, Schema } from "effect"
import { readFileSync } from "node:fs"
import * as IdempotencyMiddleware from "../src/Http/IdempotencyMiddleware.js"
import { IdempotencyError, MemoryStorage, Storage } from "../src/index.js"
import { counted } from "./fixtures/CountingStorage.js"
import { json, type Reply, send, sendRaw, startServer } from "./fixtures/Http.js"
import { makeSlowSignals, routes, Runs, serveMiddleware, serveWith, type SlowSignals } from "./fixtures/HttpApp.js"
import { assertReplayOf } from "./fixtures/HttpScenarios.js"

const { ProblemType } = IdempotencyMiddleware

const start = (runs: Runs, middleware: IdempotencyMiddleware.IdempotencyMiddleware<unknown>, slow?: SlowSignals) =>
  startServer(serveMiddleware("HttpRouter.use", routes(runs, slow), middleware), MemoryStorage.layer())

const assertProblem = (reply: Reply, status: number, type: string) => {
  assert.strictEqual(reply.status, status)
  assert.strictEqual(reply.headers.get("content-type"), "application/problem+json")
  const problem = json(reply)
  assert.strictEqual(problem.type, type)
  assert.strictEqual(problem.status, status)
  return problem
}

const RequestId = Schema.Struct({ requestId: Schema.optional(Schema.String) })

/** The key in the JSON body; a body without one is a request without a key. */
const bodyKey = (request: HttpServerRequest.HttpServerRequest) =>
  request.json.pipe(
    Effect.flatMap(Schema.decodeUnknown(RequestId)),
    Effect.map(({ requestId }) => Option.fromNullable(requestId))
  )

/** The key made of two headers: a client's request id is unique for its tenant only. */
const tenantKey = (request: HttpServerRequest.HttpServerRequest) =>
  Effect.succeed(
    Option.all([
      Option.fromNullable(request.headers["x-tenant"]),
      Option.fromNullable(request.headers["x-request-id"])
    ]).pipe(Option.map(([tenant, id]) => `${tenant}:${id}`))
  )

describe("IdempotencyMiddleware key function", () => {
  it.scopedLive("a key in the JSON body: one run, the retry is replayed, the handler still reads the body", () =>
    Effect.gen(function*() {
      const runs = new Runs()
      const server = yield* start(runs, IdempotencyMiddleware.make({ key: bodyKey }))
      const body = JSON.stringify({ requestId: "r-1", sku: "tea" })
      const first = yield* send(server, "/orders", { body })
      const retry = yield* send(server, "/orders", { body })
      assert.strictEqual(first.status, 201)
      assert.deepStrictEqual(json(first), { id: "order-1", sku: "tea" })
      assertReplayOf(retry, first)
      // Another request id is another key; no request id is no key: each runs.
      assert.strictEqual(
        (yield* send(server, "/orders", { body: JSON.stringify({ requestId: "r-2", sku: "tea" }) })).status,
        201
      )
      assert.strictEqual((yield* send(server, "/orders", { body: JSON.stringify({ sku: "tea" }) })).status, 201)
      assert.strictEqual((yield* send(server, "/orders", { body: JSON.stringify({ sku: "tea" }) })).status, 201)
      assert.strictEqual(runs.of("/orders"), 4)
    }))

  it.scopedLive("after the key function read the body, the handler reads it in every form, with or without a key", () =>
    Effect.gen(function*() {
      const runs = new Runs()
      const server = yield* start(runs, IdempotencyMiddleware.make({ key: bodyKey }))
      for (const body of [JSON.stringify({ requestId: "echo", a: 1 }), JSON.stringify({ a: 1 })]) {
        const reply = yield* send(server, "/echo", { body })
        assert.strictEqual(reply.status, 200)
        const echoed = json(reply)
        assert.deepStrictEqual(echoed.json, JSON.parse(body))
        assert.strictEqual(echoed.text, body)
        assert.strictEqual(echoed.bytes, body.length)
        assert.strictEqual(echoed.streamed, body.length)
      }
      assert.strictEqual(runs.of("/echo"), 2)
    }))

  it.scopedLive("a key of two headers: the same pair replays, the same id from another tenant runs", () =>
    Effect.gen(function*() {
      const runs = new Runs()
      const server = yield* start(runs, IdempotencyMiddleware.make({ key: tenantKey }))
      const order = JSON.stringify({ sku: "tea" })
      const acme = { "x-tenant": "acme", "x-request-id": "42" }
      const first = yield* send(server, "/orders", { body: order, headers: acme })
      assertReplayOf(yield* send(server, "/orders", { body: order, headers: acme }), first)
      const globex = yield* send(server, "/orders", { body: order, headers: { ...acme, "x-tenant": "globex" } })
      assert.strictEqual(globex.status, 201)
      assert.isNull(globex.headers.get("idempotent-replayed"))
      // The Idempotency-Key header means nothing now.
      assert.strictEqual((yield* send(server, "/orders", { body: order, key: "ignored" })).status, 201)
      assert.strictEqual((yield* send(server, "/orders", { body: order, key: "ignored" })).status, 201)
      assert.strictEqual(runs.of("/orders"), 4)
    }))

  const invalidKeys: ReadonlyArray<readonly [string, string, string]> = [
    ["empty", "", "empty"],
    ["256 characters", "k".repeat(256), "too-long"],
    ["a control character", "a\u0007b", "control-character"],
    ["a lone surrogate", "a\uD800b", "invalid-unicode"]
  ]
  for (const [label, key, reason] of invalidKeys) {
    it.scopedLive(`a key from the function that is ${label} → 400 (${reason}), handler not run`, () =>
      Effect.gen(function*() {
        const runs = new Runs()
        const server = yield* start(runs, IdempotencyMiddleware.make({ key: () => Effect.succeedSome(key) }))
        const problem = assertProblem(
          yield* send(server, "/orders", { body: JSON.stringify({ sku: "tea" }) }),
          400,
          ProblemType.KeyInvalid
        )
        assert.strictEqual(problem.reason, reason)
        assert.match(problem.detail, /^The idempotency key is invalid/)
        assert.strictEqual(runs.total, 0)
      }))
  }

  it.scopedLive("required, and the function finds no key → 400 key-missing naming no header", () =>
    Effect.gen(function*() {
      const runs = new Runs()
      const server = yield* start(runs, IdempotencyMiddleware.make({ key: bodyKey, required: true }))
      const problem = assertProblem(
        yield* send(server, "/orders", { body: JSON.stringify({ sku: "tea" }), key: "in-a-header" }),
        400,
        ProblemType.KeyMissing
      )
      assert.strictEqual(problem.detail, "This request requires an idempotency key.")
      assert.strictEqual(runs.total, 0)
    }))

  it.scopedLive("a body the function reads over maxBodyBytes → 413 problem, whatever the function made of it", () =>
    Effect.gen(function*() {
      const runs = new Runs()
      const forgiving = (request: HttpServerRequest.HttpServerRequest) =>
        Effect.orElseSucceed(bodyKey(request), () => Option.none<string>())
      const server = yield* start(runs, IdempotencyMiddleware.make({ key: forgiving, maxBodyBytes: 64 }))
      const big = JSON.stringify({ requestId: "big", sku: "x".repeat(200) })
      // Chunked: no Content-Length to refuse it by, so the function's read finds it too large.
      const reply = yield* sendRaw(server, "/orders", {
        headers: [["content-type", "application/json"]],
        body: [new TextEncoder().encode(big.slice(0, 50)), new TextEncoder().encode(big.slice(50))]
      })
      assert.strictEqual(reply.status, 413)
      assert.strictEqual(JSON.parse(new TextDecoder().decode(reply.body)).type, ProblemType.BodyTooLarge)
      // A function that reads no body leaves a large body to the handler.
      const headersOnly = yield* start(runs, IdempotencyMiddleware.make({ key: tenantKey, maxBodyBytes: 64 }))
      assert.strictEqual((yield* send(headersOnly, "/orders", { body: big })).status, 201)
      assert.strictEqual(runs.of("/orders"), 1)
    }))

  it.scopedLive("a function that fails is the request's failure: a RequestError or ParseError is a 400, nothing runs", () =>
    Effect.gen(function*() {
      const runs = new Runs()
      const server = yield* start(runs, IdempotencyMiddleware.make({ key: bodyKey }))
      // Not JSON: `request.json` fails with a RequestError, which the platform answers 400.
      const reply = yield* send(server, "/orders", { body: "{not json" })
      assert.strictEqual(reply.status, 400)
      // Valid JSON that does not match: a ParseError, which the platform answers 400 too.
      assert.strictEqual((yield* send(server, "/orders", { body: JSON.stringify({ requestId: 7 }) })).status, 400)
      assert.strictEqual(runs.total, 0)
    }))

  it.scopedLive("a function that dies, or fails with an error of its own: 500, nothing runs, the server goes on", () =>
    Effect.gen(function*() {
      const runs = new Runs()
      const server = yield* start(
        runs,
        IdempotencyMiddleware.make({
          key: (request) =>
            request.headers["x-die"] !== undefined
              ? Effect.sync(() => {
                throw new Error("the key function is broken")
              })
              : request.headers["x-fail"] !== undefined
              ? Effect.fail("the tenant directory is down")
              : Effect.succeedSome("fine")
        })
      )
      const order = JSON.stringify({ sku: "tea" })
      const died = yield* send(server, "/orders", { body: order, headers: { "x-die": "1" } })
      assert.strictEqual(died.status, 500)
      // A failure the platform knows no status for is a 500 as well.
      assert.strictEqual((yield* send(server, "/orders", { body: order, headers: { "x-fail": "1" } })).status, 500)
      assert.strictEqual(runs.total, 0)
      assert.strictEqual((yield* send(server, "/orders", { body: order })).status, 201)
      assert.strictEqual(runs.of("/orders"), 1)
    }))

  it("key and header together: make throws IdempotencyOptionsInvalid", () => {
    try {
      IdempotencyMiddleware.make({ key: tenantKey, header: "X-Request-Id" })
      assert.fail("make accepted both")
    } catch (error) {
      assert.instanceOf(error, IdempotencyError.IdempotencyOptionsInvalid)
      assert.strictEqual((error as IdempotencyError.IdempotencyOptionsInvalid).option, "key")
    }
  })
})

/** The anchors GitHub gives the headings of a Markdown page (github-slugger's rules). */
const githubAnchors = (markdown: string): Set<string> => {
  const anchors = new Set<string>()
  const seen = new Map<string, number>()
  let fenced = false
  for (const line of markdown.split("\n")) {
    if (/^(```|~~~)/.test(line)) fenced = !fenced
    const heading = /^#{1,6}[ \t]+(.*?)[ \t]*$/.exec(line)
    if (fenced || heading === null) continue
    const slug = heading[1]!.replace(/`/g, "").toLowerCase().replace(/[^\p{L}\p{M}\p{N}\p{Pc}\- ]/gu, "")
      .replace(/ /g, "-")
    const n = seen.get(slug) ?? 0
    seen.set(slug, n + 1)
    anchors.add(n === 0 ? slug : `${slug}-${n}`)
  }
  return anchors
}

describe("IdempotencyMiddleware problem types", () => {
  const page = "https://github.com/effect-idempotency/effect-idempotency/blob/main/docs/en/problem-types.md"

  for (const language of ["en", "es"]) {
    it(`every ProblemType is a heading anchor of docs/${language}/problem-types.md`, () => {
      const markdown = readFileSync(new URL(`../docs/${language}/problem-types.md`, import.meta.url), "utf8")
      assert.match(markdown, /^---\ntitle: .+\n---\n/)
      const anchors = githubAnchors(markdown)
      for (const type of Object.values(ProblemType)) {
        const [base, slug] = type.split("#")
        assert.strictEqual(base, page)
        assert.isTrue(anchors.has(slug!), `no heading with the anchor #${slug} in docs/${language}`)
      }
    })
  }

  it.scopedLive("problemTypeBase: the problems' type is that base with the same slug", () =>
    Effect.gen(function*() {
      const runs = new Runs()
      const base = "https://api.example.com/docs/errors"
      const server = yield* start(runs, IdempotencyMiddleware.make({ problemTypeBase: base, required: true }))
      assertProblem(yield* send(server, "/orders", { body: "{}" }), 400, `${base}#key-missing`)
      assertProblem(yield* send(server, "/orders", { body: "{}", key: "\"x" }), 400, `${base}#key-invalid`)
      yield* send(server, "/orders", { body: JSON.stringify({ sku: "tea" }), key: "reused" })
      assertProblem(yield* send(server, "/orders", { body: "{}", key: "reused" }), 422, `${base}#key-reused`)
    }))

  for (
    const base of [
      "problems",
      "/problems",
      "https://api.example.com/problems#top",
      "https://api.example.com/my problems"
    ]
  ) {
    it(`problemTypeBase ${JSON.stringify(base)}: make throws IdempotencyOptionsInvalid`, () => {
      try {
        IdempotencyMiddleware.make({ problemTypeBase: base })
        assert.fail("make accepted the base")
      } catch (error) {
        assert.instanceOf(error, IdempotencyError.IdempotencyOptionsInvalid)
        assert.strictEqual((error as IdempotencyError.IdempotencyOptionsInvalid).option, "problemTypeBase")
      }
    })
  }
})

describe("IdempotencyMiddleware Retry-After on 409 in-flight", () => {
  const order = JSON.stringify({ sku: "tea" })

  /** The 409 a duplicate gets while the first request holds `/slow`. */
  const busy = (options: IdempotencyMiddleware.IdempotencyMiddlewareOptions) =>
    Effect.gen(function*() {
      const runs = new Runs()
      const slow = yield* makeSlowSignals
      const server = yield* startServer(serveWith("HttpRouter.use", routes(runs, slow), options), MemoryStorage.layer())
      const first = yield* Effect.fork(send(server, "/slow", { key: "busy", body: order }))
      yield* Deferred.await(slow.started)
      const reply = yield* send(server, "/slow", { key: "busy", body: order })
      yield* Deferred.succeed(slow.release, undefined)
      assert.strictEqual((yield* Fiber.join(first)).status, 201)
      const problem = assertProblem(reply, 409, ProblemType.InFlight)
      assert.strictEqual(problem.retryAfter, Number(reply.headers.get("retry-after")))
      return problem
    })

  it.scopedLive("by default 1 second, with the lease left as its own member", () =>
    Effect.gen(function*() {
      const problem = yield* busy({})
      assert.strictEqual(problem.retryAfter, 1)
      // The 30-second lease, less what the first request has used (seconds at most, even loaded).
      assert.isAtLeast(problem.leaseExpiresInSeconds, 15)
      assert.isAtMost(problem.leaseExpiresInSeconds, 30)
      assert.include(problem.detail, "retry with the same key in 1 second(s)")
      assert.include(problem.detail, `Its lease ends in ${problem.leaseExpiresInSeconds} second(s)`)
    }))

  it.scopedLive("after a { wait } that ran out: still 1 second, and the detail says it waited", () =>
    Effect.gen(function*() {
      const problem = yield* busy({ onInFlight: { wait: "1 second" } })
      assert.strictEqual(problem.retryAfter, 1)
      assert.isAtLeast(problem.leaseExpiresInSeconds, 15)
      assert.isAtMost(problem.leaseExpiresInSeconds, 30)
      assert.include(problem.detail, "did not finish within the 1s this server waits")
    }))

  it.scopedLive("inFlightRetryAfter sets it, rounded up to whole seconds", () =>
    Effect.gen(function*() {
      assert.strictEqual((yield* busy({ inFlightRetryAfter: "4500 millis" })).retryAfter, 5)
    }))

  it.scopedLive("never more than the lease left", () =>
    Effect.gen(function*() {
      const problem = yield* busy({ lease: "3 seconds", inFlightRetryAfter: "1 minute" })
      assert.isAtMost(problem.retryAfter, 3)
      assert.strictEqual(problem.retryAfter, problem.leaseExpiresInSeconds)
    }))

  it("inFlightRetryAfter that is not a finite duration above zero: make throws IdempotencyOptionsInvalid", () => {
    for (const value of ["soon", "-1 second", 0, Infinity]) {
      try {
        IdempotencyMiddleware.make({ inFlightRetryAfter: value as never })
        assert.fail(`make accepted ${String(value)}`)
      } catch (error) {
        assert.instanceOf(error, IdempotencyError.IdempotencyOptionsInvalid)
        assert.strictEqual((error as IdempotencyError.IdempotencyOptionsInvalid).option, "inFlightRetryAfter")
      }
    }
  })
})

describe("IdempotencyMiddleware.makeConfig", () => {
  const config = {
    header: Config.string("HEADER"),
    methods: Config.array(Config.literal("POST", "PUT", "PATCH")(), "METHODS"),
    required: Config.boolean("REQUIRED"),
    maxBodyBytes: Config.integer("MAX_BODY_BYTES"),
    lease: Config.duration("LEASE"),
    inFlightRetryAfter: Config.duration("IN_FLIGHT_RETRY_AFTER"),
    problemTypeBase: Config.string("PROBLEM_TYPE_BASE")
  }
  const valid = {
    HEADER: "X-Request-Key",
    METHODS: "POST,PUT",
    REQUIRED: "true",
    MAX_BODY_BYTES: "64",
    LEASE: "10 seconds",
    IN_FLIGHT_RETRY_AFTER: "2 seconds",
    PROBLEM_TYPE_BASE: "https://api.example.com/problems"
  }
  const fromMap = (values: Record<string, string>) =>
    Effect.withConfigProvider(ConfigProvider.fromMap(new Map(Object.entries(values))))

  it.scopedLive("reads the data options from a ConfigProvider: the middleware serves with them", () =>
    Effect.gen(function*() {
      const runs = new Runs()
      const middleware = yield* IdempotencyMiddleware.makeConfig(config).pipe(fromMap(valid))
      const server = yield* start(runs, middleware)
      const order = JSON.stringify({ sku: "tea" })
      const first = yield* send(server, "/orders", { body: order, headers: { "x-request-key": "c-1" } })
      assertReplayOf(yield* send(server, "/orders", { body: order, headers: { "x-request-key": "c-1" } }), first)
      assertProblem(yield* send(server, "/orders", { body: order }), 400, `${valid.PROBLEM_TYPE_BASE}#key-missing`)
      const large = yield* send(server, "/orders", {
        body: JSON.stringify({ sku: "x".repeat(100) }),
        headers: { "x-request-key": "c-2" }
      })
      assertProblem(large, 413, `${valid.PROBLEM_TYPE_BASE}#body-too-large`)
      // PATCH is no longer covered: it needs no key.
      assert.strictEqual((yield* send(server, "/orders/7", { method: "PATCH", body: "{}" })).status, 200)
      assert.strictEqual(runs.of("/orders"), 1)
    }))

  it.scopedLive("from JSON, next to the functions, which stay values", () =>
    Effect.gen(function*() {
      const runs = new Runs()
      const middleware = yield* IdempotencyMiddleware.makeConfig(
        { lease: Config.duration("lease"), ttl: Config.duration("ttl"), replayHeader: Config.string("replayHeader") },
        { key: tenantKey }
      ).pipe(
        Effect.withConfigProvider(
          ConfigProvider.fromJson({ lease: "5 seconds", ttl: "1 hour", replayHeader: "X-Replayed" })
        )
      )
      const server = yield* start(runs, middleware)
      const headers = { "x-tenant": "acme", "x-request-id": "9" }
      yield* send(server, "/orders", { body: JSON.stringify({ sku: "tea" }), headers })
      const retry = yield* send(server, "/orders", { body: JSON.stringify({ sku: "tea" }), headers })
      assert.strictEqual(retry.headers.get("x-replayed"), "true")
      assert.strictEqual(runs.of("/orders"), 1)
    }))

  it.effect("a value Config cannot read: a ConfigError in the error channel, not a throw", () =>
    Effect.gen(function*() {
      const error = yield* IdempotencyMiddleware.makeConfig(config).pipe(
        fromMap({ ...valid, LEASE: "soon" }),
        Effect.flip
      )
      assert.isTrue(ConfigError.isConfigError(error))
      assert.strictEqual((error as ConfigError.ConfigError)._op, "InvalidData")
    }))

  const refused: ReadonlyArray<readonly [string, Record<string, string>]> = [
    ["maxBodyBytes", { MAX_BODY_BYTES: "-1" }],
    ["header", { HEADER: "X Request Key" }],
    ["problemTypeBase", { PROBLEM_TYPE_BASE: "/relative" }]
  ]
  for (const [option, values] of refused) {
    it.effect(`a value that makes no sense (${option}): IdempotencyOptionsInvalid in the error channel`, () =>
      Effect.gen(function*() {
        const error = yield* IdempotencyMiddleware.makeConfig(config).pipe(
          fromMap({ ...valid, ...values }),
          Effect.flip
        )
        assert.instanceOf(error, IdempotencyError.IdempotencyOptionsInvalid)
        assert.strictEqual((error as IdempotencyError.IdempotencyOptionsInvalid).option, option)
      }))
  }

  it.effect("a header from Config beside a key function: IdempotencyOptionsInvalid", () =>
    Effect.gen(function*() {
      const error = yield* IdempotencyMiddleware.makeConfig(config, { key: tenantKey }).pipe(
        fromMap(valid),
        Effect.flip
      )
      assert.instanceOf(error, IdempotencyError.IdempotencyOptionsInvalid)
      assert.strictEqual((error as IdempotencyError.IdempotencyOptionsInvalid).option, "key")
    }))
})

describe("IdempotencyMiddleware storage failures", () => {
  it.scopedLive("the warning logged when storage fails carries the storage's own error", () =>
    Effect.gen(function*() {
      const runs = new Runs()
      const down = Layer.effect(
        Storage.Storage,
        Effect.map(Storage.Storage, (inner) =>
          counted(inner, {
            acquire: (request) =>
              Effect.fail(
                new IdempotencyError.IdempotencyStorageError({
                  key: request.key,
                  operation: "acquire",
                  cause: new Error("connect ECONNREFUSED 10.0.0.9:6379")
                })
              )
          }).storage)
      ).pipe(Layer.provide(MemoryStorage.layer()))
      const server = yield* startServer(serveWith("HttpRouter.use", routes(runs)), down)
      const reply = yield* send(server, "/orders", { key: "k", body: JSON.stringify({ sku: "tea" }) })
      assert.strictEqual(reply.status, 503)
      const warning = server.logs.find((line) => line.includes("storage failed; the request is refused"))
      assert.isDefined(warning)
      assert.include(warning, "idempotency.operation=acquire")
      assert.include(warning, "connect ECONNREFUSED 10.0.0.9:6379")
      assert.notInclude(warning, "=k ")
    }))
})
