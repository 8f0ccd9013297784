/**
 * HTTP fuzzing of `IdempotencyMiddleware` on kept-alive connections: a client pipelines 2 to 4
 * requests on one connection, some of which the middleware refuses before reading their body
 * (an invalid, repeated or missing key, a body declared over `maxBodyBytes`), and whose bodies
 * hold a whole request of their own. Checked: every request gets exactly one response, in order,
 * unless a response closed the connection (and then nothing more comes); the bytes of a body are
 * never read as a request (no run, no answer for the smuggled one); the connection never hangs;
 * no 500 the handler did not choose; every problem is `application/problem+json`.
 *
 * `PROPERTY_RUNS` scales the random budget, `PROPERTY_SEED` pins its seed.
 */
import { describe, it } from "@effect/vitest"
import { Effect, FastCheck as fc } from "effect"
import { MemoryStorage } from "../../src/index.js"
import { startServer } from "../fixtures/Http.js"
import {
  encodeAction,
  type FuzzAction,
  FuzzLog,
  headerOf,
  type RawRequest,
  sendPipelined,
  serveFuzz
} from "../fixtures/HttpFuzzApp.js"

const maxBodyBytes = 4 * 1024

const latin1 = (text: string) => Buffer.from(text, "latin1")

// Requests hidden in a body: a read of the body as a request would run the handler for
// `smuggled` or answer the health check.
const smuggledRequests = [
  "GET /health HTTP/1.1\r\nhost: x\r\n\r\n",
  "POST /items HTTP/1.1\r\nhost: x\r\nx-fuzz-id: smuggled\r\nidempotency-key: s\r\ncontent-length: 0\r\n\r\n",
  "POST /items HTTP/1.1\r\nhost: x\r\nx-fuzz-id: smuggled\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n"
]

interface Pipelined {
  readonly method: string
  readonly path: string
  readonly key: ReadonlyArray<string>
  readonly contentType: string
  readonly body:
    | { readonly _tag: "smuggled"; readonly which: number; readonly chunked: boolean; readonly padding: number }
    | { readonly _tag: "json" }
    | { readonly _tag: "none" }
  readonly action: FuzzAction
}

const pipelinedArb: fc.Arbitrary<Pipelined> = fc.record({
  method: fc.constantFrom("POST", "PATCH", "PUT"),
  path: fc.constantFrom("/items", "/items/1", "/do/a/b", "/nope"),
  key: fc.oneof(
    fc.constant([]),
    fc.constantFrom("a", "b").map((key) => [key]),
    fc.constantFrom("a", "b").map((key) => [`"${key}"`]),
    fc.constant(["a", "b"]),
    fc.constantFrom("", "\"open", "a b", "k".repeat(300)).map((key) => [key])
  ),
  contentType: fc.constantFrom("application/json", "text/plain", "multipart/form-data; boundary=x", "garbage"),
  body: fc.oneof(
    fc.record({
      _tag: fc.constant("smuggled" as const),
      which: fc.nat({ max: smuggledRequests.length - 1 }),
      chunked: fc.boolean(),
      padding: fc.constantFrom(0, 10, maxBodyBytes + 1)
    }),
    fc.constant({ _tag: "json" as const }),
    fc.constant({ _tag: "none" as const })
  ),
  action: fc.oneof(
    fc.constantFrom(200, 201, 409, 422, 500, 503).map((status): FuzzAction => ({ _tag: "status", status })),
    fc.constantFrom<FuzzAction>({ _tag: "die" }, { _tag: "stream" }, { _tag: "sleep", millis: 50 })
  )
})

const scenarioArb = fc.record({
  mount: fc.constantFrom("HttpRouter.use" as const, "HttpServer.serve" as const),
  required: fc.boolean(),
  requests: fc.array(pipelinedArb, { minLength: 2, maxLength: 4 })
})

type Scenario = typeof scenarioArb extends fc.Arbitrary<infer A> ? A : never

const toRaw = (request: Pipelined, id: string): RawRequest => {
  const headers: Array<readonly [string, Uint8Array]> = [
    ["x-fuzz-id", latin1(id)],
    ["x-fuzz-action", latin1(encodeAction(request.action))],
    ...request.key.map((key) => ["idempotency-key", latin1(key)] as const),
    ["content-type", latin1(request.contentType)]
  ]
  const body = request.body
  if (body._tag === "none") return { method: request.method, target: request.path, headers, body: { _tag: "none" } }
  const bytes = body._tag === "json"
    ? latin1(JSON.stringify({ id }))
    : Buffer.concat([Buffer.alloc(body.padding, 0x20), latin1(smuggledRequests[body.which]!)])
  return {
    method: request.method,
    target: request.path,
    headers,
    body: body._tag === "smuggled" && body.chunked
      ? { _tag: "chunked", chunks: [bytes.subarray(0, 7), bytes.subarray(7)] }
      : { _tag: "whole", bytes }
  }
}

const runScenario = (scenario: Scenario) =>
  Effect.gen(function*() {
    const log = new FuzzLog()
    const server = yield* startServer(
      serveFuzz(scenario.mount, log, { required: scenario.required, maxBodyBytes, lease: "10 seconds" }),
      MemoryStorage.layer()
    )
    const ids = scenario.requests.map((_, i) => `p${i + 1}`)
    const { responses, timedOut } = yield* sendPipelined(
      server.port,
      scenario.requests.map((request, i) => toRaw(request, ids[i]!)),
      15_000
    )
    const problem = (message: string) =>
      new Error(
        `${message}\nresponses: ${
          JSON.stringify(
            responses.map((r) => ({
              status: r.status,
              headers: r.headers,
              body: Buffer.from(r.body).toString("latin1").slice(0, 200)
            }))
          )
        }`
      )
    if (timedOut) throw problem("the connection hung")
    if (log.runs.some((run) => run.id === "smuggled")) throw problem("a body was read as a request")
    if (responses.length > scenario.requests.length) throw problem("more responses than requests")
    for (const [i, response] of responses.entries()) {
      const request = scenario.requests[i]!
      const text = Buffer.from(response.body).toString("utf8")
      if (text === "up") throw problem(`response ${i + 1} answers a request smuggled in a body`)
      const contentType = headerOf(response, "content-type")
      const run = headerOf(response, "x-fuzz-run")
      if (run !== undefined && run !== ids[i] && headerOf(response, "idempotent-replayed") !== "true") {
        throw problem(`response ${i + 1} is another request's`)
      }
      if (contentType === "application/problem+json") {
        const body = JSON.parse(text)
        if (typeof body.type !== "string" || typeof body.title !== "string" || body.status !== response.status) {
          throw problem(`response ${i + 1} is a malformed problem`)
        }
      } else if (response.status >= 400 && response.status < 500 && run === undefined && response.status !== 404) {
        // Node's own 400 for a request it cannot parse has no body type and closes the connection.
        if (!(response.status === 400 && contentType === undefined)) {
          throw problem(`response ${i + 1} is a 4xx that is not a problem`)
        }
      }
      if (response.status === 500 && request.action._tag !== "die" && !(request.action._tag === "status")) {
        throw problem(`response ${i + 1} is a 500 the handler did not choose`)
      }
      if (response.status === 500 && request.action._tag === "status" && request.action.status !== 500) {
        throw problem(`response ${i + 1} is a 500 the handler did not choose`)
      }
    }
    const closedAt = responses.findIndex((response) => headerOf(response, "connection")?.toLowerCase() === "close")
    if (closedAt === -1 && responses.length !== scenario.requests.length) {
      throw problem(`${responses.length} responses to ${scenario.requests.length} requests`)
    }
    if (closedAt !== -1 && closedAt !== responses.length - 1) {
      throw problem(`responses after the one that closed the connection (${closedAt + 1})`)
    }
  }).pipe(Effect.scoped)

const envRuns = process.env["PROPERTY_RUNS"] === undefined ? undefined : Number(process.env["PROPERTY_RUNS"])
const envSeed = process.env["PROPERTY_SEED"] === undefined ? undefined : Number(process.env["PROPERTY_SEED"])
// A full-size run takes about half a second a scenario on a loaded machine.
const timeout = Math.max(120_000, (envRuns ?? 0) * 2_000)

const assertProperty = (seed: number | undefined, numRuns: number) =>
  Effect.promise(() =>
    fc.assert(
      fc.asyncProperty(scenarioArb, (scenario) => Effect.runPromise(runScenario(scenario))),
      { numRuns, ...(seed === undefined ? {} : { seed }) }
    )
  )

describe("IdempotencyMiddleware on kept-alive connections", () => {
  it.live("fixed seed", () => assertProperty(20261203, envRuns ?? 50), { timeout })
  it.live("random seed", () => assertProperty(envSeed, envRuns === undefined ? 15 : Math.ceil(envRuns / 4)), {
    timeout
  })
})
