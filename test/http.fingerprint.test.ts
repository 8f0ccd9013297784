/**
 * The default request fingerprint over real connections: every byte that changes what a request
 * asks for changes its fingerprint (a retry that differs gets 422 and the handler does not run
 * again), and only key order and whitespace in a JSON body do not. Also the canonical JSON of
 * `Idempotent.wrap`'s `fingerprint` option on values nested deeper than the stack.
 */
import { assert, describe, it } from "@effect/vitest"
import { Effect, Either } from "effect"
import * as IdempotencyMiddleware from "../src/Http/IdempotencyMiddleware.js"
import { MemoryStorage } from "../src/index.js"
import * as internalFingerprint from "../src/internal/fingerprint.js"
import { json, type PostOptions, send, startServer } from "./fixtures/Http.js"
import { routes, Runs, serveWith } from "./fixtures/HttpApp.js"
import { assertReplayOf } from "./fixtures/HttpScenarios.js"

const { ProblemType } = IdempotencyMiddleware

const start = (runs: Runs) => startServer(serveWith("HttpRouter.use", routes(runs)), MemoryStorage.layer())

const bytes = (...values: ReadonlyArray<number>) => new Uint8Array(values)
const utf8 = (text: string) => new TextEncoder().encode(text)

/** The first request, then its retry with the same key on `/payments` (which ignores the body). */
const firstThenRetry = (first: PostOptions, retry: PostOptions) =>
  Effect.gen(function*() {
    const runs = new Runs()
    const server = yield* start(runs)
    const one = yield* send(server, "/payments", { ...first, key: "fp" })
    const two = yield* send(server, "/payments", { ...retry, key: "fp" })
    assert.strictEqual(one.status, 201)
    return { one, two, runs }
  })

describe("the default fingerprint tells apart", () => {
  const pairs: ReadonlyArray<readonly [string, PostOptions, PostOptions]> = [
    [
      "a big integer and the double it parses to",
      { body: "{\"amount\":12345678901234567890}" },
      { body: "{\"amount\":12345678901234567000}" }
    ],
    [
      "a long decimal and the double it parses to",
      { body: "{\"amount\":0.1000000000000000000001}" },
      { body: "{\"amount\":0.1}" }
    ],
    [
      "an object with a duplicate member and its deduplicated form",
      { body: "{\"a\":1,\"a\":2}" },
      { body: "{\"a\":2}" }
    ],
    [
      "bytes that are not UTF-8 and their lossy decoding",
      // {"a":"<0xff>"} against {"a":"\uFFFD"}: a lossy decoder reads the first as the second.
      { body: bytes(0x7b, 0x22, 0x61, 0x22, 0x3a, 0x22, 0xff, 0x22, 0x7d) },
      { body: utf8("{\"a\":\"\uFFFD\"}") }
    ],
    [
      "application/json and application/merge-patch+json",
      { body: "{\"sku\":null}", contentType: "application/json" },
      { body: "{\"sku\":null}", contentType: "application/merge-patch+json" }
    ],
    [
      "one text body in two charsets",
      { body: bytes(0x63, 0x61, 0x66, 0xc3, 0xa9), contentType: "text/plain; charset=utf-8" },
      { body: bytes(0x63, 0x61, 0x66, 0xc3, 0xa9), contentType: "text/plain; charset=iso-8859-1" }
    ],
    [
      "a byte order mark before a JSON body",
      { body: "{\"sku\":\"tea\"}" },
      { body: "\uFEFF{\"sku\":\"tea\"}" }
    ]
  ]
  for (const [label, first, retry] of pairs) {
    it.scopedLive(`${label}: the retry gets 422 and the handler runs once`, () =>
      Effect.gen(function*() {
        const { runs, two } = yield* firstThenRetry(first, retry)
        assert.strictEqual(two.status, 422)
        assert.strictEqual(json(two).type, ProblemType.KeyReused)
        assert.strictEqual(runs.of("/payments"), 1)
      }))
  }
})

describe("the default fingerprint still matches", () => {
  const pairs: ReadonlyArray<readonly [string, PostOptions, PostOptions]> = [
    [
      "member order and whitespace",
      { body: "{\"sku\":\"tea\",\"lines\":[{\"q\":2,\"p\":1.50}]}" },
      { body: " {\n\t\"lines\" : [ { \"p\" : 1.50 , \"q\" : 2 } ] ,\r\n \"sku\" : \"tea\" } " }
    ],
    [
      "an escaped character and the character itself",
      { body: "{\"sku\":\"th\\u00e9\"}" },
      { body: "{\"sku\":\"thé\"}" }
    ],
    [
      "application/json with and without a charset",
      { body: "{\"sku\":\"tea\"}", contentType: "application/json" },
      { body: "{\"sku\":\"tea\"}", contentType: "Application/JSON; charset=UTF-8" }
    ]
  ]
  for (const [label, first, retry] of pairs) {
    it.scopedLive(`${label}: the retry is a replay`, () =>
      Effect.gen(function*() {
        const { one, runs, two } = yield* firstThenRetry(first, retry)
        assertReplayOf(two, one)
        assert.strictEqual(runs.of("/payments"), 1)
      }))
  }

  it.scopedLive("a 1 MiB body of arrays nested 500,000 deep is fingerprinted: replayed, and told from a sibling", () =>
    Effect.gen(function*() {
      const deep = "[".repeat(500_000) + "]".repeat(500_000)
      const { one, runs, two } = yield* firstThenRetry({ body: deep }, { body: deep })
      assertReplayOf(two, one)
      const runsBefore = runs.of("/payments")
      assert.strictEqual(runsBefore, 1)
      // The same depth with one more item inside differs.
      const runs2 = new Runs()
      const server = yield* start(runs2)
      yield* send(server, "/payments", { key: "deep", body: deep })
      const other = yield* send(server, "/payments", {
        key: "deep",
        body: "[".repeat(500_000) + "0" + "]".repeat(500_000)
      })
      assert.strictEqual(other.status, 422)
    }))
})

describe("the canonical JSON of a fingerprint value", () => {
  it("a value nested 200,000 levels deep is encoded, and nesting still counts", () => {
    let arrays: unknown = 1
    let objects: unknown = 1
    for (let i = 0; i < 200_000; i++) {
      arrays = [arrays]
      objects = { a: objects }
    }
    const first = internalFingerprint.make(arrays)
    assert.isTrue(Either.isRight(first))
    assert.isTrue(Either.isRight(internalFingerprint.make(objects)))
    assert.notDeepEqual(first, internalFingerprint.make([arrays]))
  })

  it("a cycle deep down is refused, naming its path; a value seen twice is not a cycle", () => {
    const root: { a: Array<unknown> } = { a: [1, {}] }
    ;(root.a[1] as Record<string, unknown>).self = root
    const refused = internalFingerprint.make(root)
    assert.isTrue(Either.isLeft(refused))
    if (Either.isLeft(refused)) assert.strictEqual(refused.left.detail, "fingerprint.a[1].self is a cycle")
    const shared = { x: 1 }
    assert.strictEqual(
      internalFingerprint.canonicalJson([shared, { b: shared, a: shared }]),
      "[{\"x\":1},{\"a\":{\"x\":1},\"b\":{\"x\":1}}]"
    )
  })
})
