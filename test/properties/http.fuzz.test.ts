/**
 * HTTP fuzzing of `IdempotencyMiddleware` on a real server (a real port on 127.0.0.1, raw bytes
 * over `net`): random methods, paths, keys (any Unicode as UTF-8 or WTF-8 bytes, control
 * characters, empty, huge, quoted, repeated header lines), bodies (JSON, invalid UTF-8, deeply
 * nested, around `maxBodyBytes`, multipart, empty, chunked), content types and callers, against a
 * handler that does what each request asks (answer a status, sleep, fail, die, stream, answer too
 * large to store). A reference model of what the middleware stored checks, after every step:
 *
 * - every request is answered within a bound, and the server stays up;
 * - a 500 comes only from a handler that chose to fail, die or answer 500;
 * - every 4xx the middleware makes is `application/problem+json` with `type`, `title`, `status`;
 * - the handler never runs for a (scope, key) that has a stored response: a request with the
 *   same key, body and caller is a replay (`Idempotent-Replayed: true`, the same status and body
 *   bytes), another request with that key a 422 (or a replay, for an equivalent JSON body);
 * - a replay only ever goes to the caller whose run stored it.
 *
 * `PROPERTY_RUNS` scales the random budget, `PROPERTY_SEED` pins its seed.
 */
import { describe, it } from "@effect/vitest"
import { Effect, FastCheck as fc, type Layer, Redacted, Schedule } from "effect"
import { createHash } from "node:crypto"
import * as IdempotencyMiddleware from "../../src/Http/IdempotencyMiddleware.js"
import { MemoryStorage, Storage } from "../../src/index.js"
import * as RedisStorage from "../../src/Storage/Redis.js"
import { startServer } from "../fixtures/Http.js"
import {
  encodeAction,
  type FuzzAction,
  FuzzLog,
  headerOf,
  largeResponseBytes,
  principalOf,
  type RawRequest,
  type RawResult,
  sendRawBytes,
  serveFuzz,
  templateOf
} from "../fixtures/HttpFuzzApp.js"

const { ProblemType } = IdempotencyMiddleware
const problemTypes = new Set<string>(Object.values(ProblemType))

const maxBodyBytes = 64 * 1024
const maxResponseBytes = 32 * 1024
// Node refuses request heads over 16 KiB with a 431 of its own.
const nodeMaxHeaderBytes = 16 * 1024
// Every request is answered within this bound (handlers sleep at most 300 ms).
const answerWithinMillis = 15_000

/** A server configuration a run is made on. */
interface Config {
  readonly name: "router" | "serve"
  readonly mount: "HttpRouter.use" | "HttpServer.serve"
  readonly methods: ReadonlyArray<string>
  readonly required: boolean
  readonly maxKeyLength: number
}

const configs: ReadonlyArray<Config> = [
  { name: "router", mount: "HttpRouter.use", methods: ["POST", "PATCH"], required: false, maxKeyLength: 255 },
  {
    name: "serve",
    mount: "HttpServer.serve",
    methods: ["POST", "PUT", "PATCH", "DELETE"],
    required: true,
    maxKeyLength: 64
  }
]

// ---------------------------------------------------------------------------------------------
// Generators

/** Bytes that print as `label` in a counterexample (a 17 KiB key or a 192 KiB body would drown it). */
const compact = <A extends Uint8Array>(bytes: A, label: string): A =>
  Object.assign(bytes, { [fc.toStringMethod]: () => label })

const latin1 = (text: string) => Buffer.from(text, "latin1")
const utf8 = (text: string) => Buffer.from(text, "utf8")

/** WTF-8: UTF-8 that also encodes lone surrogates (as 3 bytes), as a buggy client would send them. */
const wtf8 = (text: string): Uint8Array => {
  const bytes: Array<number> = []
  for (let i = 0; i < text.length; i++) {
    let code = text.charCodeAt(i)
    if (code >= 0xd800 && code <= 0xdbff && i + 1 < text.length) {
      const low = text.charCodeAt(i + 1)
      if (low >= 0xdc00 && low <= 0xdfff) {
        code = 0x10000 + ((code - 0xd800) << 10) + (low - 0xdc00)
        i++
      }
    }
    if (code < 0x80) bytes.push(code)
    else if (code < 0x800) bytes.push(0xc0 | (code >> 6), 0x80 | (code & 63))
    else if (code < 0x10000) bytes.push(0xe0 | (code >> 12), 0x80 | ((code >> 6) & 63), 0x80 | (code & 63))
    else {
      bytes.push(0xf0 | (code >> 18), 0x80 | ((code >> 12) & 63), 0x80 | ((code >> 6) & 63), 0x80 | (code & 63))
    }
  }
  return Uint8Array.from(bytes)
}

/** The key header lines of a request, and what the middleware must make of them. */
interface KeySpec {
  readonly lines: ReadonlyArray<Uint8Array>
  /** `valid`: never refused as invalid; `invalid`: always refused (400 problem, or by Node); `any`. */
  readonly expect: "valid" | "invalid" | "any"
}

const keyPoolArb = fc.array(fc.stringMatching(/^[A-Za-z0-9._~-]{1,24}$/), { minLength: 1, maxLength: 3 })

const keySpecArb = (pool: ReadonlyArray<string>): fc.Arbitrary<KeySpec | undefined> => {
  const pooled = fc.constantFrom(...pool)
  return fc.oneof(
    { weight: 2, arbitrary: fc.constant(undefined) },
    { weight: 8, arbitrary: pooled.map((key): KeySpec => ({ lines: [latin1(key)], expect: "valid" })) },
    {
      weight: 2,
      arbitrary: pooled.map((key): KeySpec => ({ lines: [latin1(`"${key}"`)], expect: "valid" }))
    },
    {
      weight: 1,
      arbitrary: pooled.map((key): KeySpec => ({ lines: [latin1(` \t${key}\t `)], expect: "valid" }))
    },
    {
      weight: 2,
      arbitrary: fc.tuple(pooled, pooled).map(([a, b]): KeySpec => ({
        lines: [latin1(a), latin1(b)],
        expect: "invalid"
      }))
    },
    {
      weight: 1,
      arbitrary: pooled.map((key): KeySpec => ({ lines: [latin1(`${key}, ${key}`)], expect: "invalid" }))
    },
    { weight: 1, arbitrary: fc.constant<KeySpec>({ lines: [new Uint8Array(0)], expect: "invalid" }) },
    {
      weight: 2,
      arbitrary: fc.string({ unit: "binary", minLength: 1, maxLength: 20 }).map((key): KeySpec => ({
        lines: [utf8(key.replace(/[\r\n]/g, "_"))],
        expect: "any"
      }))
    },
    {
      weight: 2,
      arbitrary: fc.string({ unit: fc.integer({ min: 0xd800, max: 0xdfff }).map((c) => String.fromCharCode(c)) })
        .chain((lone) => fc.string({ maxLength: 5 }).map((rest) => `${rest}${lone}${rest}`))
        .map((key): KeySpec => ({ lines: [wtf8(key.replace(/[\r\n]/g, "_"))], expect: "any" }))
    },
    {
      weight: 2,
      arbitrary: fc.tuple(
        fc.string({ maxLength: 5 }).map((text) => text.replace(/[\r\n]/g, "_")),
        fc.integer({ min: 0, max: 0x1f }).filter((code) => code !== 0x0a && code !== 0x0d),
        fc.string({ maxLength: 5 }).map((text) => text.replace(/[\r\n]/g, "_"))
      )
        .map(([a, control, b]): KeySpec => ({
          lines: [latin1(`k${a}${String.fromCharCode(control)}${b}k`)],
          expect: control === 0x09 ? "any" : "invalid"
        }))
    },
    {
      weight: 1,
      arbitrary: fc.constantFrom(65, 256, 300, 9000, 17_000).map((length): KeySpec => ({
        lines: [compact(latin1("k".repeat(length)), `latin1("k".repeat(${length}))`)],
        expect: length > 64 ? (length > 255 ? "invalid" : "any") : "valid"
      }))
    },
    {
      weight: 1,
      arbitrary: fc.constantFrom("\"unterminated", "\"a\\x\"", "\"a\" b", "a b", "\"é\"", "\"\"").map(
        (key): KeySpec => ({ lines: [latin1(key)], expect: "invalid" })
      )
    }
  )
}

type Body = RawRequest["body"]

const bodyBytesArb: fc.Arbitrary<Uint8Array> = fc.oneof(
  { weight: 4, arbitrary: fc.json({ maxDepth: 3 }).map(utf8) },
  { weight: 2, arbitrary: fc.uint8Array({ maxLength: 64 }) },
  {
    weight: 1,
    arbitrary: fc.tuple(fc.integer({ min: 1, max: 3000 }), fc.boolean()).map(([depth, array]) =>
      array
        ? compact(utf8("[".repeat(depth) + "]".repeat(depth)), `nested array, depth ${depth}`)
        : compact(utf8("{\"a\":".repeat(depth) + "1" + "}".repeat(depth)), `nested object, depth ${depth}`)
    )
  },
  {
    weight: 1,
    arbitrary: fc.constantFrom(maxBodyBytes - 1, maxBodyBytes, maxBodyBytes + 1, 3 * maxBodyBytes).map((size) =>
      compact(new Uint8Array(size).fill(0x20), `${size} spaces`)
    )
  },
  {
    weight: 1,
    arbitrary: fc.constant(
      utf8("--XyZ\r\ncontent-disposition: form-data; name=\"name\"\r\n\r\ntea\r\n--XyZ--\r\n")
    )
  },
  { weight: 1, arbitrary: fc.constant(new Uint8Array(0)) }
)

const bodyArb: fc.Arbitrary<Body> = fc.oneof(
  { weight: 1, arbitrary: fc.constant<Body>({ _tag: "none" }) },
  { weight: 4, arbitrary: bodyBytesArb.map((bytes): Body => ({ _tag: "whole", bytes })) },
  {
    weight: 2,
    arbitrary: fc.tuple(bodyBytesArb, fc.array(fc.nat(), { maxLength: 4 })).map(([bytes, cuts]): Body => {
      const points = [...new Set(cuts.map((cut) => cut % (bytes.length + 1)))].sort((a, b) => a - b)
      const chunks: Array<Uint8Array> = []
      let from = 0
      for (const point of [...points, bytes.length]) {
        chunks.push(compact(bytes.subarray(from, point), `${point - from} bytes`))
        from = point
      }
      return { _tag: "chunked", chunks }
    })
  },
  {
    weight: 1,
    arbitrary: fc.tuple(bodyBytesArb, fc.integer({ min: 1, max: 1000 })).map(([bytes, missing]): Body => ({
      _tag: "truncated",
      bytes,
      declared: bytes.length + missing
    }))
  }
)

const contentTypeArb: fc.Arbitrary<ReadonlyArray<Uint8Array>> = fc.oneof(
  fc.constant([]),
  fc.constantFrom(
    "application/json",
    "application/merge-patch+json",
    "Application/JSON; charset=UTF-8",
    "text/plain; charset=utf-8",
    "text/plain; charset=latin1",
    "multipart/form-data; boundary=XyZ",
    "multipart/form-data",
    "garbage",
    ";;;",
    ""
  ).map((type) => [latin1(type)]),
  fc.uint8Array({ minLength: 1, maxLength: 12, min: 0x20 }).map((bytes) => [
    Uint8Array.from(bytes, (b) => (b === 0x7f ? 0x20 : b))
  ]),
  fc.constant([latin1("application/json"), latin1("text/plain")])
)

const principals: ReadonlyArray<ReadonlyArray<readonly [string, string]>> = [
  [],
  [["authorization", "Bearer alice"]],
  [["authorization", "Bearer bob"]],
  [["cookie", "sid=carol"]],
  [["authorization", "Bearer alice"], ["cookie", "sid=carol"]],
  [["cookie", "sid=carol"], ["cookie", "theme=dark"]]
]

const methodArb = fc.oneof(
  { weight: 6, arbitrary: fc.constantFrom("POST", "PATCH") },
  { weight: 3, arbitrary: fc.constantFrom("PUT", "DELETE", "GET") },
  { weight: 1, arbitrary: fc.constantFrom("PURGE", "OPTIONS", "PROPFIND", "FROB") }
)

const pathArb = fc.tuple(
  fc.oneof(
    { weight: 6, arbitrary: fc.constantFrom("/items", "/items/1", "/items/2", "/do/a/b", "/items/%C3%A9") },
    { weight: 1, arbitrary: fc.constantFrom("/nope", "/items/1/2", "/do/a") }
  ),
  fc.oneof(
    { weight: 4, arbitrary: fc.constant("") },
    { weight: 1, arbitrary: fc.constantFrom("?a=1&b=2", "?b=2&a=1", "?x=%FF", "?") }
  )
).map(([path, query]) => ({ path, target: `${path}${query}` }))

const actionArb: fc.Arbitrary<FuzzAction> = fc.oneof(
  {
    weight: 6,
    arbitrary: fc.constantFrom(200, 201, 202, 204, 400, 404, 409, 422, 429, 500, 503).map((status): FuzzAction => ({
      _tag: "status",
      status
    }))
  },
  { weight: 2, arbitrary: fc.integer({ min: 10, max: 300 }).map((millis): FuzzAction => ({ _tag: "sleep", millis })) },
  {
    weight: 1,
    arbitrary: fc.constantFrom<FuzzAction>(
      { _tag: "conflict" },
      { _tag: "fail" },
      { _tag: "die" },
      { _tag: "stream" },
      { _tag: "large" }
    )
  }
)

/** A request a run may send many times. */
interface Template {
  readonly method: string
  readonly path: string
  readonly target: string
  readonly key: KeySpec | undefined
  readonly contentType: ReadonlyArray<Uint8Array>
  readonly body: Body
  /** Sent with `Expect: 100-continue`, as curl does with larger bodies. */
  readonly expectContinue: boolean
}

const templateArb = (pool: ReadonlyArray<string>): fc.Arbitrary<Template> =>
  fc.record({
    method: methodArb,
    route: pathArb,
    key: keySpecArb(pool),
    contentType: contentTypeArb,
    body: bodyArb,
    expectContinue: fc.oneof({ weight: 4, arbitrary: fc.constant(false) }, { weight: 1, arbitrary: fc.constant(true) })
  }).map(({ body, contentType, expectContinue, key, method, route }) => ({
    method,
    ...route,
    key,
    // A multipart body the client stops sending goes to the handler unread, and Node may answer
    // 400 before the run has even started: when (and whether) it runs cannot be observed from
    // outside, so a cut-off body is never multipart here.
    contentType: body._tag === "truncated" &&
        contentType.some((line) => Buffer.from(line).toString("latin1").trim().toLowerCase().startsWith("multipart/"))
      ? [latin1("application/octet-stream")]
      : contentType,
    body,
    expectContinue
  }))

/** One step: a template sent `copies` times at once, by one caller, asking for one action. */
interface Step {
  readonly template: number
  readonly principal: number
  readonly action: FuzzAction
  readonly copies: number
  /** The client gives up after 50 ms (only with a sleeping handler). */
  readonly abort: boolean
  /** Sent with another body (`{"variant":n}`) or query (`?variant=n`): the same key for another request. */
  readonly variant: { readonly _tag: "body" | "query"; readonly n: number } | undefined
}

const scenarioArb = fc.record({
  config: fc.constantFrom(...configs),
  pool: keyPoolArb
}).chain(({ config, pool }) =>
  fc.record({
    config: fc.constant(config),
    templates: fc.array(templateArb(pool), { minLength: 1, maxLength: 4 }),
    steps: fc.array(
      fc.record({
        template: fc.nat(),
        principal: fc.oneof(
          { weight: 3, arbitrary: fc.constant(1) },
          { weight: 2, arbitrary: fc.nat({ max: principals.length - 1 }) }
        ),
        action: actionArb,
        copies: fc.oneof({ weight: 4, arbitrary: fc.constant(1) }, {
          weight: 1,
          arbitrary: fc.integer({ min: 2, max: 3 })
        }),
        abort: fc.oneof({ weight: 9, arbitrary: fc.constant(false) }, { weight: 1, arbitrary: fc.constant(true) }),
        variant: fc.oneof(
          { weight: 4, arbitrary: fc.constant(undefined) },
          {
            weight: 1,
            arbitrary: fc.record({ _tag: fc.constantFrom("body" as const, "query" as const), n: fc.nat({ max: 2 }) })
          }
        )
      }),
      { minLength: 1, maxLength: 12 }
    )
  })
)

type Scenario = typeof scenarioArb extends fc.Arbitrary<infer A> ? A : never

// ---------------------------------------------------------------------------------------------
// The model

const bodyBytes = (body: Body): Uint8Array | undefined =>
  body._tag === "none"
    ? undefined
    : body._tag === "whole" || body._tag === "truncated"
    ? body.bytes
    : Buffer.concat(body.chunks)

const isOws = (c: string) => c === " " || c === "\t"

/** The key a header value the middleware accepted stands for: unquoted, unescaped. */
const keyOf = (value: string): string => {
  let start = 0
  let end = value.length
  while (start < end && isOws(value[start]!)) start++
  while (end > start && isOws(value[end - 1]!)) end--
  const trimmed = value.slice(start, end)
  if (!trimmed.startsWith("\"")) return trimmed
  let key = ""
  for (let i = 1; i < trimmed.length - 1; i++) {
    if (trimmed[i] === "\\") i++
    key += trimmed[i]
  }
  return key
}

/** What a stored (or maybe stored) response is. */
interface Stored {
  readonly identity: string
  readonly status: number
  readonly body: string
  readonly principal: string
  /** `true` once the response is known stored; `false` while its run may still be committing. */
  readonly settled: boolean
}

const defaultStore = IdempotencyMiddleware.defaultStore

interface Sent {
  readonly id: string
  readonly step: Step
  readonly template: Template
  readonly result: RawResult
}

const fail = (message: string, sent: Sent, extra?: unknown): never => {
  const result = sent.result
  const shown = result._tag === "Response"
    ? {
      status: result.status,
      headers: result.headers,
      body: Buffer.from(result.body.subarray(0, 400)).toString("latin1")
    }
    : result
  throw new Error(
    `${message}\nrequest ${sent.id}: ${sent.template.method} ${sent.template.target} action=${
      encodeAction(sent.step.action)
    } principal=${sent.step.principal} copies=${sent.step.copies} abort=${sent.step.abort}\nresult: ${
      JSON.stringify(shown)
    }${extra === undefined ? "" : `\n${JSON.stringify(extra)}`}`
  )
}

/** Counts of what the fuzzing saw, for the report of a full-size run. */
const seen = {
  runs: 0,
  requests: 0,
  handlerRuns: 0,
  replays: 0,
  problems: {} as Record<string, number>,
  node: 0,
  closed: 0,
  notFound: 0
}

const runScenario = (scenario: Scenario, storage: () => Layer.Layer<Storage.Storage, unknown>) =>
  Effect.gen(function*() {
    seen.runs++
    const { config } = scenario
    const log = new FuzzLog()
    const server = yield* startServer(
      serveFuzz(config.mount, log, {
        methods: config.methods as any,
        required: config.required,
        maxKeyLength: config.maxKeyLength,
        maxBodyBytes,
        maxResponseBytes,
        lease: "10 seconds",
        // Long enough for any run; short enough that Redis forgets the records soon after.
        ttl: "5 minutes"
      }),
      storage()
    )
    const model = new Map<string, Stored>()
    let next = 0

    for (const step of scenario.steps) {
      const base = scenario.templates[step.template % scenario.templates.length]!
      const template: Template = step.variant === undefined
        ? base
        : step.variant._tag === "body"
        ? { ...base, body: { _tag: "whole", bytes: utf8(JSON.stringify({ variant: step.variant.n })) } }
        : { ...base, target: `${base.path}?variant=${step.variant.n}` }
      const principalHeaders = principals[step.principal]!
      const abort = step.abort && step.action._tag === "sleep"
      const action = abort ? { _tag: "sleep", millis: 300 } as const : step.action
      const requests = Array.from({ length: step.copies }, () => {
        const id = `r${++next}`
        const raw: RawRequest = {
          method: template.method,
          target: template.target,
          headers: [
            ["x-fuzz-id", latin1(id)],
            ["x-fuzz-action", latin1(encodeAction(action))],
            ...principalHeaders.map(([name, value]) => [name, latin1(value)] as const),
            ...(template.key?.lines ?? []).map((line) => ["idempotency-key", line] as const),
            ...template.contentType.map((line) => ["content-type", line] as const),
            ...(template.expectContinue ? [["expect", latin1("100-continue")] as const] : [])
          ],
          body: template.body
        }
        return { id, raw }
      })
      const results = yield* Effect.forEach(
        requests,
        ({ raw }) =>
          sendRawBytes(server.port, raw, {
            timeoutMillis: answerWithinMillis,
            abortAfterMillis: abort ? 50 : undefined
          }),
        { concurrency: "unbounded" }
      )
      if (abort || template.body._tag === "truncated") {
        // The client left (or stopped sending): its run goes on; wait for every run to end.
        yield* Effect.suspend(() => log.running === 0 ? Effect.void : Effect.fail("running")).pipe(
          Effect.retry(Schedule.spaced("20 millis").pipe(Schedule.upTo("10 seconds"))),
          Effect.orDie
        )
      }
      const sent: Array<Sent> = requests.map(({ id }, i) => ({
        id,
        step: { ...step, action },
        template,
        result: results[i]!
      }))
      check(config, log, model, sent, template, principalHeaders, abort)
    }

    // The server is still up, and nothing is left running.
    const health = yield* sendRawBytes(server.port, {
      method: "GET",
      target: "/health",
      headers: [],
      body: { _tag: "none" }
    }, { timeoutMillis: answerWithinMillis })
    if (health._tag !== "Response" || health.status !== 200) {
      throw new Error(`the server is not up after the run: ${JSON.stringify(health)}`)
    }
    yield* Effect.suspend(() => log.running === 0 ? Effect.void : Effect.fail("running")).pipe(
      Effect.retry(Schedule.spaced("20 millis").pipe(Schedule.upTo("10 seconds"))),
      Effect.orDieWith(() => new Error(`handler runs never ended: ${log.running}`))
    )
  }).pipe(Effect.scoped)

const check = (
  config: Config,
  log: FuzzLog,
  model: Map<string, Stored>,
  sent: ReadonlyArray<Sent>,
  template: Template,
  principalHeaders: ReadonlyArray<readonly [string, string]>,
  aborted: boolean
) => {
  const body = bodyBytes(template.body)
  const contentType = template.contentType.length === 0 ? "" : Buffer.from(template.contentType[0]!).toString("latin1")
  const multipart = contentType.trim().toLowerCase().startsWith("multipart/")
  const route = templateOf(template.path)
  const covered = config.methods.includes(template.method) &&
    (config.mount === "HttpServer.serve" || route !== undefined)
  const keyValue = template.key === undefined
    ? undefined
    : template.key.lines.map((line) => Buffer.from(line).toString("latin1")).join(", ")
  const headerBytes = (template.key?.lines ?? []).reduce((n, line) => n + line.length, 0) +
    template.contentType.reduce((n, line) => n + line.length, 0)
  const headersTooLarge = headerBytes > nodeMaxHeaderBytes - 512
  // Node answers a body the client stopped sending with a 400 of its own, if it answers.
  const wireSuspect = headersTooLarge || template.body._tag === "truncated" ||
    [...(template.key?.lines ?? []), ...template.contentType].some((line) =>
      line.some((b) => (b < 0x20 && b !== 0x09) || b === 0x7f)
    ) ||
    !["POST", "PATCH", "PUT", "DELETE", "GET", "PURGE", "OPTIONS", "PROPFIND"].includes(template.method)
  const truncated = template.body._tag === "truncated"
  const declared = template.body._tag === "truncated" ? template.body.declared : body?.length
  const bodyTooLarge = declared !== undefined && declared > maxBodyBytes && !multipart
  const principal = principalOf({
    authorization: principalHeaders.find(([name]) => name === "authorization")?.[1],
    cookie: principalHeaders.filter(([name]) => name === "cookie").map(([, value]) => value).join("; ") || undefined
  })
  const identity = JSON.stringify([
    template.method,
    template.target,
    template.contentType.map((line) => Buffer.from(line).toString("hex")),
    body === undefined ? null : multipart ? "multipart" : Buffer.from(body).toString("hex")
  ])
  // The scope the middleware keys records by, before the key: method, route, caller.
  const scope = JSON.stringify([
    template.method,
    config.mount === "HttpRouter.use" ? route : template.path,
    principal
  ])
  const storable = (status: number, action: FuzzAction) =>
    defaultStore(status) && action._tag !== "stream" && action._tag !== "large"

  // Runs first: a replay or a 409 in the same batch may follow from them.
  const ordered = [...sent].sort((a, b) => log.of(b.id).length - log.of(a.id).length)
  for (const request of ordered) {
    seen.requests++
    const result = request.result
    const runs = log.of(request.id)
    if (runs.length > 1) fail("the handler ran twice for one request", request)
    const run = runs[0]
    const modelKey = keyValue === undefined ? undefined : `${scope}\u0000${keyOf(keyValue)}`
    const stored = modelKey === undefined ? undefined : model.get(modelKey)

    if (result._tag === "Timeout") fail("no answer within the bound", request)

    if (run !== undefined) {
      seen.handlerRuns++
      // What the handler saw: the caller, the key and the body the client sent.
      if (run.principal !== principal) fail("the handler saw another caller", request, run)
      if (covered && keyValue !== undefined) {
        if (run.key !== keyOf(keyValue)) fail("the handler ran under another key", request, run)
        if (stored !== undefined && stored.settled) {
          fail("the handler ran for a key with a stored response", request, { stored, run })
        }
        if (stored !== undefined && defaultStore(stored.status) && stored.identity === identity) {
          fail("the handler ran again for a key whose response may be stored", request, { stored, run })
        }
      } else if (run.key !== null) fail("the handler ran under a key on a request without one", request, run)
      if (body !== undefined && !multipart && !truncated && run.bodyLength !== body.length) {
        fail("the handler saw another body", request, { run, sent: body.length })
      }
      if (
        body !== undefined && !multipart && !truncated &&
        run.bodySha256 !== createHash("sha256").update(body).digest("hex")
      ) {
        fail("the handler saw other body bytes", request, run)
      }
      if (run.interrupted === true) {
        if (covered && keyValue !== undefined) fail("a run the middleware keeps was interrupted", request, run)
        if (!aborted && !truncated) fail("a run was interrupted, and its client did not leave", request, run)
        continue
      }
      // A body the client stopped sending that the middleware leaves to the handler (multipart):
      // Node may answer 400 itself while the run goes on.
      const nodeRefused = truncated && result._tag === "Response" && result.status === 400 &&
        headerOf(result, "content-type") === undefined && headerOf(result, "x-fuzz-run") === undefined
      if (result._tag === "Closed" || nodeRefused) {
        if (!aborted && !truncated) fail("the connection closed on a request whose handler ran", request)
        if (covered && modelKey !== undefined && storable(run.status!, request.step.action)) {
          model.set(modelKey, {
            identity,
            status: run.status!,
            body: run.body!,
            principal,
            settled: false
          })
        }
        continue
      }
    }
    if (result._tag === "Closed") {
      seen.closed++
      if (!(aborted || bodyTooLarge || wireSuspect || truncated)) {
        fail("the connection closed without an answer", request)
      }
      continue
    }
    if (result._tag !== "Response") continue
    const contentTypeOut = headerOf(result, "content-type")
    const replayed = headerOf(result, "idempotent-replayed")
    const text = Buffer.from(result.body).toString("latin1")

    if (contentTypeOut === "application/problem+json") {
      // A problem the middleware made.
      let problem: any
      try {
        problem = JSON.parse(Buffer.from(result.body).toString("utf8"))
      } catch {
        fail("a problem whose body is not JSON", request)
      }
      if (
        !problemTypes.has(problem.type) || typeof problem.title !== "string" || problem.status !== result.status
      ) fail("a malformed problem", request)
      seen.problems[problem.type] = (seen.problems[problem.type] ?? 0) + 1
      if (run !== undefined) fail("a problem on a request whose handler ran", request, run)
      if (!covered) fail("a problem on a request the middleware does not cover", request)
      switch (problem.type) {
        case ProblemType.KeyMissing:
          if (!config.required || template.key !== undefined) fail("an unexpected key-missing problem", request)
          break
        case ProblemType.KeyInvalid:
          if (template.key === undefined || template.key.expect === "valid") fail("a valid key refused", request)
          break
        case ProblemType.BodyTooLarge:
          if (!bodyTooLarge) fail("a body within the limit refused as too large", request)
          break
        case ProblemType.BodyUnreadable:
          if (!truncated || multipart) fail("a whole body refused as unreadable", request)
          break
        case ProblemType.KeyReused:
          if (stored === undefined || stored.identity === identity) {
            fail("a key-reused problem without another request stored", request, stored)
          }
          break
        case ProblemType.InFlight:
          if (sent.length === 1 && (stored === undefined || stored.settled)) {
            fail("an in-flight problem with nothing in flight", request, stored)
          }
          break
        default:
          fail(`an unexpected problem ${problem.type}`, request)
      }
      continue
    }
    // Node's own refusal of bytes it does not parse (a 400 or 431 with no body type).
    if (
      run === undefined && wireSuspect && (result.status === 400 || result.status === 431) &&
      contentTypeOut === undefined && replayed === undefined
    ) {
      seen.node++
      continue
    }
    // Never accepted what had to be refused.
    if (covered && template.key?.expect === "invalid") fail("an invalid key accepted", request)
    if (covered && template.key === undefined && config.required) fail("a missing key accepted", request)
    if (covered && template.key !== undefined && bodyTooLarge) fail("a body over the limit accepted", request)
    if (covered && template.key !== undefined && truncated && !multipart) {
      fail("a body cut off accepted", request)
    }

    if (replayed !== undefined) {
      seen.replays++
      if (replayed !== "true") fail("a replay header that is not `true`", request)
      if (run !== undefined) fail("a replay on a request whose handler ran", request, run)
      if (stored === undefined) fail("a replay with nothing stored for this caller and key", request)
      if (result.status !== stored!.status || text !== stored!.body) {
        fail("a replay that differs from the stored response", request, stored)
      }
      if (stored!.principal !== principal) fail("a replay across callers", request, stored)
      model.set(modelKey!, { ...stored!, settled: true })
      continue
    }

    if (run !== undefined) {
      const action = request.step.action
      const fromHandler = headerOf(result, "x-fuzz-run")
      if (action._tag === "fail" || action._tag === "die") {
        if (result.status !== 500) fail("a failing handler answered other than 500", request)
      } else {
        if (fromHandler !== request.id) fail("the handler's response without its mark", request)
        if (result.status !== run.status) fail("a status the handler did not answer", request, run)
        const received = action._tag === "large"
          ? result.body.length === largeResponseBytes
          : text === (result.status === 204 ? "" : run.body)
        if (!received) fail("a body the handler did not answer", request, run)
      }
      if (covered && modelKey !== undefined && storable(result.status, action)) {
        model.set(modelKey, { identity, status: result.status, body: text, principal, settled: true })
      }
      continue
    }

    // Neither the middleware, nor a replay, nor the handler: the router's 404 or Node's own refusal.
    if (result.status === 404 && route === undefined) {
      seen.notFound++
      if (covered && modelKey !== undefined && defaultStore(404)) {
        model.set(modelKey, { identity, status: 404, body: text, principal, settled: true })
      }
      continue
    }
    if (result.status === 500) fail("a 500 the handler did not choose", request)
    fail("an answer from no one", request)
  }
}

// ---------------------------------------------------------------------------------------------

const fixedSeed = 20261202
const envRuns = process.env["PROPERTY_RUNS"] === undefined ? undefined : Number(process.env["PROPERTY_RUNS"])
const envSeed = process.env["PROPERTY_SEED"] === undefined ? undefined : Number(process.env["PROPERTY_SEED"])
// A full-size run takes about half a second a scenario on a loaded machine.
const timeout = Math.max(120_000, (envRuns ?? 0) * 2_000)

const assertProperty = (
  storage: () => Layer.Layer<Storage.Storage, unknown>,
  seed: number | undefined,
  numRuns: number
) =>
  Effect.promise(() =>
    fc.assert(
      fc.asyncProperty(scenarioArb, (scenario) => Effect.runPromise(runScenario(scenario, storage))),
      { numRuns, ...(seed === undefined ? {} : { seed }) }
    )
  )

const memory = () => MemoryStorage.layer()

const redisUrl = process.env["REDIS_URL"] ?? "redis://127.0.0.1:6379"
const redisRun = Storage.makeToken().slice(0, 8)
let redisStores = 0
const redis = () =>
  RedisStorage.layer({ url: Redacted.make(redisUrl), prefix: `idem-http-fuzz-${redisRun}-${++redisStores}` })

describe("IdempotencyMiddleware under HTTP fuzzing", () => {
  it.live("memory storage, fixed seed", () => assertProperty(memory, fixedSeed, envRuns ?? 40), { timeout })

  it.live(
    "memory storage, random seed",
    () => assertProperty(memory, envSeed, envRuns === undefined ? 15 : Math.ceil(envRuns / 4)),
    { timeout }
  )

  it.live(
    "Redis storage, fixed seed and random seed",
    () =>
      Effect.zipRight(
        assertProperty(redis, fixedSeed + 1, envRuns === undefined ? 8 : Math.ceil(envRuns / 4)),
        assertProperty(redis, envSeed, envRuns === undefined ? 4 : Math.ceil(envRuns / 8))
      ),
    { timeout }
  )

  it.live("what the fuzzing saw", () =>
    Effect.sync(() => {
      if (process.env["PROPERTY_REPORT"] !== undefined) console.log(JSON.stringify(seen))
    }))
})
