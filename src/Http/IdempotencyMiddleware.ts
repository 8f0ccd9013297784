/**
 * Idempotency keys for `@effect/platform` HTTP servers, after the IETF draft "The
 * Idempotency-Key HTTP Header Field" and Stripe: the first request with a key runs the handler
 * and its response is stored; every retry with the same key gets that response back, byte for
 * byte, with `Idempotent-Replayed: true`.
 *
 * @since 0.1.0
 */
import * as HttpApp from "@effect/platform/HttpApp"
import type * as HttpMethod from "@effect/platform/HttpMethod"
import * as HttpServerError from "@effect/platform/HttpServerError"
import * as HttpServerRequest from "@effect/platform/HttpServerRequest"
import * as HttpServerResponse from "@effect/platform/HttpServerResponse"
import * as Cause from "effect/Cause"
import * as Context from "effect/Context"
import * as Deferred from "effect/Deferred"
import * as Duration from "effect/Duration"
import * as Effect from "effect/Effect"
import * as Either from "effect/Either"
import * as Exit from "effect/Exit"
import * as Fiber from "effect/Fiber"
import * as Metric from "effect/Metric"
import * as Option from "effect/Option"
import * as Scope from "effect/Scope"
import {
  IdempotencyKeyInvalid,
  IdempotencyKeyMissing,
  IdempotencyOptionsInvalid,
  type KeyInvalidReason,
  type ResultNotStoredReason,
  type WrapError
} from "../IdempotencyError.js"
import type * as Idempotent from "../Idempotent.js"
import * as internalFingerprint from "../internal/fingerprint.js"
import * as apiErrors from "../internal/http/apiErrors.js"
import * as httpKey from "../internal/http/key.js"
import * as httpRequest from "../internal/http/request.js"
import * as storedResponse from "../internal/http/storedResponse.js"
import * as internal from "../internal/idempotent.js"
import * as internalKey from "../internal/key.js"
import * as settings from "../internal/settings.js"
import type * as Storage from "../Storage.js"

/**
 * The stable `type` URI of each problem the middleware answers with.
 *
 * @since 0.1.0
 * @category Problems
 */
export const ProblemType = {
  /** 400: the route requires a key and the request had none. */
  KeyMissing: "https://effect-idempotency.dev/problems/key-missing",
  /** 400: the header is malformed, sent twice, empty, too long or has control characters. */
  KeyInvalid: "https://effect-idempotency.dev/problems/key-invalid",
  /** 422: the key was used before with another request (method, path, query or body). */
  KeyReused: "https://effect-idempotency.dev/problems/key-reused",
  /** 409: the first request with this key is still running (`Retry-After` says how long at most). */
  InFlight: "https://effect-idempotency.dev/problems/in-flight",
  /** 409: the request ran, but lost its lease before its response could be stored. */
  LeaseLost: "https://effect-idempotency.dev/problems/lease-lost",
  /** 503: the idempotency storage failed; the request was not processed. */
  StorageUnavailable: "https://effect-idempotency.dev/problems/storage-unavailable",
  /**
   * 503 with `Retry-After`: the response stored for this key cannot be read here (written by a
   * newer version of this library during a rolling deploy, or damaged); the request was not
   * processed. Another instance may read it.
   */
  RecordUndecodable: "https://effect-idempotency.dev/problems/record-undecodable",
  /**
   * 503: the request was processed, but its response could not be stored (the storage failed
   * while the lease held), so no retry can replay it and a retry may process it again.
   */
  ResultNotStored: "https://effect-idempotency.dev/problems/result-not-stored",
  /** 500: the middleware's options are invalid. `make` refuses such options, so this is not sent. */
  Misconfigured: "https://effect-idempotency.dev/problems/misconfigured",
  /** 413: the request body is larger than `maxBodyBytes`. */
  BodyTooLarge: "https://effect-idempotency.dev/problems/body-too-large",
  /** 400: the request body could not be read (the client stopped sending it, or sent it malformed). */
  BodyUnreadable: "https://effect-idempotency.dev/problems/body-unreadable"
} as const

/**
 * @since 0.1.0
 * @category Problems
 */
export type ProblemType = typeof ProblemType[keyof typeof ProblemType]

/**
 * An RFC 9457 problem details object, sent as `application/problem+json`.
 *
 * @since 0.1.0
 * @category Problems
 */
export interface Problem {
  readonly type: ProblemType
  readonly title: string
  readonly status: number
  readonly detail: string
  /** For `KeyInvalid`: why the key was refused; for `ResultNotStored`: why the response was not kept. */
  readonly reason?: KeyInvalidReason | ResultNotStoredReason
  /**
   * For `InFlight`: whole seconds until the first request's lease ends; for `RecordUndecodable`:
   * when to try again. Also sent as `Retry-After`.
   */
  readonly retryAfter?: number
}

/**
 * @since 0.1.0
 * @category Models
 */
export interface IdempotencyMiddlewareOptions<E = never, R = never> {
  /** The request header holding the key: a bare token or an RFC 8941 quoted string. Default `"Idempotency-Key"`. */
  readonly header?: string | undefined
  /** The methods the middleware covers; others pass straight through. Default `["POST", "PATCH"]`. */
  readonly methods?: ReadonlyArray<HttpMethod.HttpMethod> | undefined
  /** Refuse a covered request without a key (400) instead of passing it through. Default `false`. */
  readonly required?: boolean | undefined
  /** The longest key accepted, in characters. Default 255. */
  readonly maxKeyLength?: number | undefined
  /**
   * The largest request body read on a request with a key, in bytes (over it: 413, checked on
   * `Content-Length` first, then while reading). Multipart bodies are not read (nor fingerprinted):
   * they are left to the handler to stream. Default 1 MiB.
   */
  readonly maxBodyBytes?: number | undefined
  /**
   * The largest response body stored, in bytes. A larger response is sent to the first caller,
   * not stored, and the key is released. Default 1 MiB.
   */
  readonly maxResponseBytes?: number | undefined
  /**
   * The request headers that say who is calling. By default a key is scoped by the caller: a
   * SHA-256 digest of these headers' values (never the values themselves) is part of the scope,
   * so a replay, a 409 or a 422 never goes to another principal, even one who sends the same key
   * and body. Default `["authorization", "cookie"]`; `[]` scopes by method and route only. A
   * caller whose cookies change between a request and its retry (an analytics cookie, a rotated
   * session) is another caller under this default: name only the stable headers here, or give
   * `scope`. Ignored when `scope` is given.
   */
  readonly credentialHeaders?: ReadonlyArray<string> | undefined
  /**
   * Who the stored record belongs to, on top of the method and route: the tenant or principal,
   * so that one key sent by two of them runs twice. Given, it replaces the digest of
   * `credentialHeaders`: return a value that tells principals apart (the authenticated user's
   * id, say), or retries may cross them. It may read the request body.
   */
  readonly scope?: ((request: HttpServerRequest.HttpServerRequest) => Effect.Effect<string, E, R>) | undefined
  /**
   * What a retry must match. Default: method, path, query and body with its media type (a JSON
   * body in canonical form: member order and whitespace do not count, every other byte does). A
   * function returns any JSON-like value to hash instead (`body` is `undefined` for a multipart
   * body, which is not read); `false` compares nothing.
   */
  readonly fingerprint?:
    | false
    | ((request: HttpServerRequest.HttpServerRequest, body: Uint8Array | undefined) => Effect.Effect<unknown, E, R>)
    | undefined
  /**
   * Which response statuses are stored and replayed; a status not stored releases the key, so
   * the retry runs the handler again. Default {@link defaultStore}: what a retry should see again.
   *
   * | Status | Stored | Why |
   * | --- | --- | --- |
   * | 2xx, 3xx | yes | the operation's outcome |
   * | 400, 411, 413, 415, 422 | no | the request was refused before the operation began (malformed, a body `HttpServerRequest.schemaBodyJson` rejected): the fixed request, with the same key, must run |
   * | 401, 403 | no | the credentials may be fixed (a refreshed token, a granted role) |
   * | 408, 425, 429 | no | "not now": the retry is what the server asked for |
   * | other 4xx (404, 409, 410, ...) | yes | the operation's outcome (the seat was taken, the order is gone) |
   * | 5xx | no | a failure: the retry may succeed |
   */
  readonly store?: ((status: number) => boolean) | undefined
  /** The header added to replays, with the value `true`. Default `"Idempotent-Replayed"`. */
  readonly replayHeader?: string | undefined
  /** How long a stored response is replayed. Default 24 hours. */
  readonly ttl?: Duration.DurationInput | undefined
  /** The in-flight lease, renewed while the handler runs. Default 30 seconds. */
  readonly lease?: Duration.DurationInput | undefined
  /** `"fail"` (409 with `Retry-After`) or `{ wait }` for the first response. Default `"fail"`. */
  readonly onInFlight?: Idempotent.OnInFlight | undefined
  /**
   * What a stored response that cannot be read does (one written by a newer version of this
   * library, during a rolling deploy): `"fail"` answers 503 `RecordUndecodable` with
   * `Retry-After`, so the retry may reach an instance that reads it; `"run"` forgets it and runs
   * the handler again. Default `"fail"`.
   */
  readonly onUndecodable?: "fail" | "run" | undefined
  /** Renders a problem as the app wants it. Default: the problem as `application/problem+json`. */
  readonly problem?:
    | ((problem: Problem, request: HttpServerRequest.HttpServerRequest) => HttpServerResponse.HttpServerResponse)
    | undefined
}

/**
 * The middleware `make` returns: it adds `Storage` (and what `scope` or `fingerprint` need) to
 * the app's requirements. It does not provide `Idempotent.Execution`: a request without a key, or
 * with a method the middleware does not cover, runs the handler outside any run, so a handler that
 * requires `Execution` keeps that requirement (and cannot be served). Handlers read
 * `Idempotent.currentExecution` instead, `Some` inside a run and `None` outside.
 *
 * @since 0.1.0
 * @category Models
 */
export interface IdempotencyMiddleware<E2 = never, R2 = never> {
  <E, R>(app: HttpApp.Default<E, R>): HttpApp.Default<E | E2, R | R2 | Storage.Storage>
}

const notStoredTotal = Metric.counter("idempotency_http_not_stored_total", {
  description: "Responses sent to the first caller without being stored (a stream, or over maxResponseBytes)"
})

// Tagged once: tagging builds a new metric key.
const notStored: Record<storedResponse.NotStoredReason, Metric.Metric.Counter<number>> = {
  "streamed": Metric.tagged(notStoredTotal, "reason", "streamed"),
  "too-large": Metric.tagged(notStoredTotal, "reason", "too-large")
}

/**
 * The handler's response may not be stored: a 5xx (or a status `store` refuses), a stream, a
 * body over the limit, a defect. As the run's failure it makes the protocol release the key; the
 * response still goes to the caller.
 */
class NotStorable {
  readonly _tag = "NotStorable"
}

// Refusals before the operation began, and "not now" answers: see `store`'s table.
const notStoredStatuses: ReadonlySet<number> = new Set([400, 401, 403, 408, 411, 413, 415, 422, 425, 429])

/**
 * The default of the `store` option: every status below 500 except the refusals a retry must
 * not be held to (400, 401, 403, 408, 411, 413, 415, 422, 425, 429). Compose with it to store
 * more or less: `store: (status) => IdempotencyMiddleware.defaultStore(status) || status === 429`.
 *
 * @since 0.1.0
 * @category Options
 */
export const defaultStore = (status: number): boolean => status < 500 && !notStoredStatuses.has(status)

const mebibyte = 1024 * 1024

// How long a client should wait before retrying a request whose stored response this instance
// cannot read: long enough for a rolling deploy to move on, short enough for a client to wait.
const undecodableRetryAfterSeconds = 5

// RFC 9110 `token`: a header name.
const headerToken = /^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$/

const problemOf = (error: WrapError | IdempotencyKeyMissing, header: string): Problem => {
  switch (error._tag) {
    case "IdempotencyKeyMissing":
      return {
        type: ProblemType.KeyMissing,
        title: "Idempotency key missing",
        status: 400,
        detail: `This request requires an ${header} header.`
      }
    case "IdempotencyKeyInvalid":
      return {
        type: ProblemType.KeyInvalid,
        title: "Invalid idempotency key",
        status: 400,
        detail: `The ${header} header is invalid: ${error.detail}.`,
        reason: error.reason
      }
    case "IdempotencyKeyReused":
      return {
        type: ProblemType.KeyReused,
        title: "Idempotency key reused",
        status: 422,
        detail: "This key was already used with a different request (method, path, query or body)."
      }
    case "IdempotencyInFlight": {
      const retryAfter = Math.max(1, Math.ceil(Duration.toSeconds(error.retryAfter)))
      return {
        type: ProblemType.InFlight,
        title: "Request in progress",
        status: 409,
        detail: `A request with this key is still in progress: retry in ${retryAfter} second(s).`,
        retryAfter
      }
    }
    case "IdempotencyLeaseLost":
      return {
        type: ProblemType.LeaseLost,
        title: "Idempotency lease lost",
        status: 409,
        detail: "The request ran, but its lease ended before its response could be stored: retry it."
      }
    case "IdempotencyStorageError":
      return {
        type: ProblemType.StorageUnavailable,
        title: "Idempotency storage unavailable",
        status: 503,
        detail: "The request was not processed because its idempotency key could not be checked."
      }
    case "IdempotencyRecordUndecodable":
      return {
        type: ProblemType.RecordUndecodable,
        title: "Stored response unreadable",
        status: 503,
        detail: "The response stored for this key cannot be read by this server; the request was not processed. " +
          `Retry in ${undecodableRetryAfterSeconds} seconds.`,
        retryAfter: undecodableRetryAfterSeconds
      }
    case "IdempotencyResultNotStored":
      return {
        type: ProblemType.ResultNotStored,
        title: "Response not stored",
        status: 503,
        detail: "The request was processed, but its response could not be stored: a retry with this key " +
          "cannot get it, and may process the request again.",
        reason: error.reason
      }
    case "IdempotencyOptionsInvalid":
      return {
        type: ProblemType.Misconfigured,
        title: "Idempotency misconfigured",
        status: 500,
        detail: "The idempotency middleware is misconfigured; the request was not processed."
      }
  }
}

const bodyUnreadable: Problem = {
  type: ProblemType.BodyUnreadable,
  title: "Request body unreadable",
  status: 400,
  detail: "The request body could not be read."
}

const invalid = (option: string, detail: string) => new IdempotencyOptionsInvalid({ option, detail })

const orThrow = <A>(either: Either.Either<A, IdempotencyOptionsInvalid>): A => {
  if (Either.isLeft(either)) throw either.left
  return either.right
}

const headerOption = (option: string, value: string | undefined, fallback: string): string => {
  if (value === undefined) return fallback
  if (typeof value !== "string" || !headerToken.test(value)) {
    throw invalid(option, `must be a header name (an HTTP token), got ${JSON.stringify(value)}`)
  }
  return value
}

/**
 * Builds the middleware. Mount it with `HttpRouter.use`, `HttpServer.serve(app, middleware)` or
 * `HttpApiBuilder.middleware(middleware, { withContext: true })`, and provide a `Storage` layer.
 * Options that make no sense (a lease of zero, a `ttl` shorter than the lease, a byte limit that
 * is not a positive whole number, a header name that is not one) throw
 * `IdempotencyOptionsInvalid` here, before any request.
 *
 * A covered request (`POST` or `PATCH` by default) with a key is checked before the handler
 * runs: a key in use by another request gets a 409 with `Retry-After`, a key used with another
 * request a 422, a stored key its response. Otherwise the handler runs and its response is stored
 * when `store` keeps its status (see {@link defaultStore}) and its body is in memory and at most
 * `maxResponseBytes`; else the key is released for a retry. A client that disconnects does not
 * stop a handler that has begun: it runs to the end and its response is stored for the retry.
 *
 * Keys are scoped by method and route (the route's template when the router knows it, else the
 * path) and by the caller (a digest of `credentialHeaders`, or `scope`'s value), so one key on two
 * routes, or from two callers, runs twice. The handler reads its run with
 * `Idempotent.currentExecution`: its `key` is the key as the client sent it.
 *
 * Every answer the middleware makes itself is an RFC 9457 problem (see {@link ProblemType}); a
 * request it cannot read or check gets a 4xx or 503, never a 500.
 *
 * @example
 * ```ts
 * import { HttpRouter, HttpServer, HttpServerRequest, HttpServerResponse } from "@effect/platform"
 * import { NodeHttpServer, NodeRuntime } from "@effect/platform-node"
 * import { Effect, Layer, Schema } from "effect"
 * import { MemoryStorage } from "effect-idempotency"
 * import * as IdempotencyMiddleware from "effect-idempotency/Http/IdempotencyMiddleware"
 * import { randomUUID } from "node:crypto"
 * import { createServer } from "node:http"
 *
 * const router = HttpRouter.empty.pipe(
 *   HttpRouter.post(
 *     "/orders",
 *     Effect.gen(function*() {
 *       const order = yield* HttpServerRequest.schemaBodyJson(Schema.Struct({ sku: Schema.String }))
 *       return yield* HttpServerResponse.json({ id: randomUUID(), sku: order.sku }, { status: 201 })
 *     })
 *   ),
 *   // Or `HttpServer.serve(router, IdempotencyMiddleware.make())`, or on an `HttpApi`:
 *   // `HttpApiBuilder.middleware((app) => IdempotencyMiddleware.make()(app), { withContext: true })`.
 *   HttpRouter.use(IdempotencyMiddleware.make({ required: true, onInFlight: { wait: "10 seconds" } }))
 * )
 *
 * HttpServer.serve(router).pipe(
 *   Layer.provide(MemoryStorage.layer()),
 *   Layer.provide(NodeHttpServer.layer(createServer, { port: 3000 })),
 *   Layer.launch,
 *   NodeRuntime.runMain
 * )
 * ```
 *
 * @since 0.1.0
 * @category Constructors
 */
export const make = <E2 = never, R2 = never>(
  options?: IdempotencyMiddlewareOptions<E2, R2>
): IdempotencyMiddleware<E2, R2> => {
  const headerLabel = headerOption("header", options?.header, "Idempotency-Key")
  const headerName = headerLabel.toLowerCase()
  const methods = new Set<string>(options?.methods ?? ["POST", "PATCH"])
  const required = options?.required === true
  const maxKeyLength = options?.maxKeyLength ?? internalKey.defaultMaxLength
  if (!Number.isInteger(maxKeyLength) || maxKeyLength < 1) {
    throw invalid("maxKeyLength", `must be a whole number of characters above zero, got ${String(maxKeyLength)}`)
  }
  const maxBodyBytes = orThrow(settings.decodeByteLimit("maxBodyBytes", options?.maxBodyBytes, mebibyte))
  const maxResponseBytes = orThrow(settings.decodeByteLimit("maxResponseBytes", options?.maxResponseBytes, mebibyte))
  const { lease, ttl, wait } = orThrow(settings.decodeTiming(options ?? {}))
  const store = options?.store ?? defaultStore
  const replayHeader = headerOption("replayHeader", options?.replayHeader, "Idempotent-Replayed").toLowerCase()
  const credentialHeaders = (options?.credentialHeaders ?? ["authorization", "cookie"]).map((name) =>
    headerOption("credentialHeaders", name, name).toLowerCase()
  )
  const onUndecodable = options?.onUndecodable ?? "fail"
  if (onUndecodable !== "fail" && onUndecodable !== "run") {
    throw invalid("onUndecodable", `must be "fail" or "run", got ${JSON.stringify(onUndecodable)}`)
  }
  const render = options?.problem
  const codec = storedResponse.codec<NotStorable>()

  const respond = (
    problem: Problem,
    request: HttpServerRequest.HttpServerRequest
  ): HttpServerResponse.HttpServerResponse => {
    let response = render === undefined
      ? HttpServerResponse.unsafeJson(problem, { status: problem.status, contentType: "application/problem+json" })
      : render(problem, request)
    if (problem.retryAfter !== undefined && response.headers["retry-after"] === undefined) {
      response = HttpServerResponse.setHeader(response, "retry-after", String(problem.retryAfter))
    }
    // The rest of the body is left unread, so the connection cannot carry another request.
    if (problem.type === ProblemType.BodyTooLarge || problem.type === ProblemType.BodyUnreadable) {
      response = HttpServerResponse.setHeader(response, "connection", "close")
    }
    return response
  }

  const refuse = (outcome: string, problem: Problem, request: HttpServerRequest.HttpServerRequest) =>
    Effect.as(Effect.annotateCurrentSpan("idempotency.outcome", outcome), respond(problem, request))

  const tooLarge: Problem = {
    type: ProblemType.BodyTooLarge,
    title: "Request body too large",
    status: 413,
    detail: `The request body is larger than ${maxBodyBytes} bytes.`
  }

  const fingerprintOf = (
    request: HttpServerRequest.HttpServerRequest,
    body: Uint8Array | undefined
  ): Effect.Effect<Either.Either<string, IdempotencyKeyInvalid>, E2, R2> => {
    const custom = options?.fingerprint
    if (custom === false) return Effect.succeed(Either.right(internalFingerprint.none))
    if (custom === undefined) return Effect.succeed(Either.right(httpRequest.defaultFingerprint(request, body)))
    return Effect.map(custom(request, body), (value) =>
      Either.mapLeft(
        internalFingerprint.make(value),
        (error) => new IdempotencyKeyInvalid({ key: "", reason: "unencodable-fingerprint", detail: error.detail })
      ))
  }

  /**
   * Who the record belongs to: `scope`'s value, or a digest of the credential headers (`null`
   * without any). Tagged, so a `scope` value never equals a digest.
   */
  const principalOf = (request: HttpServerRequest.HttpServerRequest): Effect.Effect<unknown, E2, R2> => {
    if (options?.scope !== undefined) return Effect.map(options.scope(request), (scope) => ({ scope }))
    const values = credentialHeaders.map((name) => request.headers[name] ?? null)
    const credentials = values.every((value) => value === null)
      ? null
      : internalFingerprint.sha256(JSON.stringify(values))
    return Effect.succeed({ credentials })
  }

  // Stored, or why not. A refused response is the run's failure, so the protocol releases the key.
  const decide = (
    storageKey: string,
    response: HttpServerResponse.HttpServerResponse
  ): Effect.Effect<storedResponse.StoredResponse, NotStorable> => {
    if (!store(response.status)) {
      return Effect.zipRight(Effect.annotateCurrentSpan("idempotency.stored", false), Effect.fail(new NotStorable()))
    }
    const stored = storedResponse.fromResponse(response, maxResponseBytes, replayHeader)
    if (Either.isRight(stored)) return Effect.as(Effect.annotateCurrentSpan("idempotency.stored", true), stored.right)
    return Effect.logWarning("idempotency: the response was sent but not stored; the key is released").pipe(
      Effect.annotateLogs({
        "idempotency.key_hash": internalFingerprint.keyHash(storageKey),
        "idempotency.not_stored": stored.left,
        "http.status": response.status
      }),
      Effect.zipRight(Metric.increment(notStored[stored.left])),
      Effect.zipRight(Effect.annotateCurrentSpan("idempotency.stored", false)),
      Effect.zipRight(Effect.fail(new NotStorable()))
    )
  }

  /**
   * Runs the protocol for one request whose key and fingerprint are known, and answers with what
   * the request fiber returns: the handler's own result when this request ran it, a replay, or a
   * problem. It runs on a daemon fiber, so it goes on when the client leaves.
   */
  const execute = <E, R>(
    app: HttpApp.Default<E, R>,
    request: HttpServerRequest.HttpServerRequest,
    key: string,
    namespace: string,
    fingerprint: string
  ): Effect.Effect<Exit.Exit<HttpServerResponse.HttpServerResponse, E>, never, R | Storage.Storage> =>
    Effect.gen(function*() {
      const storageKey = `${namespace}${separator}${key}`
      // Holds a response the app writes itself (under `HttpServer.serve(app, middleware)`) until
      // the run is committed or released: a client never sees a response its retry cannot get.
      // Completed with the problem to write instead, when the run failed after the handler answered.
      const decided = yield* Deferred.make<HttpServerResponse.HttpServerResponse | undefined>()
      // Set once this request acquires the key and starts the handler.
      const ran: {
        handler?: Fiber.RuntimeFiber<HttpServerResponse.HttpServerResponse, E>
        /** What the request fiber returns, when the handler did not write its response itself. */
        reply?: Exit.Exit<HttpServerResponse.HttpServerResponse, E>
      } = {}

      // The handler's final response: the one it writes (seen by a pre-response handler), the
      // one it returns, or the one its failure becomes, as its `HttpApi` or the platform renders it.
      const self = Effect.uninterruptibleMask((restore) =>
        Effect.gen(function*() {
          const captured = yield* Deferred.make<HttpServerResponse.HttpServerResponse>()
          const capture: HttpApp.PreResponseHandler = (_, response) =>
            Effect.zipRight(
              Deferred.succeed(captured, response),
              Effect.map(Deferred.await(decided), (instead) => instead ?? response)
            )
          // A daemon, not a child of this fiber: when the app writes its own response, the
          // handler finishes writing after this fiber has returned the response to store.
          const handler = yield* Effect.forkDaemon(
            HttpApp.withPreResponseHandler(app, capture).pipe(
              Effect.provideService(HttpServerRequest.HttpServerRequest, request),
              Effect.interruptible
            ) as Effect.Effect<HttpServerResponse.HttpServerResponse, E, R>
          )
          ran.handler = handler
          const first = yield* restore(
            Effect.raceFirst(
              Effect.map(Deferred.await(captured), Either.left),
              Effect.map(Fiber.await(handler), Either.right)
            )
          ).pipe(Effect.onInterrupt(() => Fiber.interrupt(handler)))
          if (Either.isLeft(first)) return yield* decide(storageKey, first.left)
          const exit = first.right
          ran.reply = exit
          if (Exit.isSuccess(exit)) return yield* decide(storageKey, exit.value)
          const encoded = yield* apiErrors.response(exit.cause)
          if (Option.isSome(encoded)) {
            ran.reply = Exit.succeed(encoded.value)
            return yield* decide(storageKey, encoded.value)
          }
          // The failure itself goes back to the platform, which renders the same response and logs it.
          const [response] = yield* HttpServerError.causeResponse(exit.cause)
          return yield* decide(storageKey, response)
        })
      )

      const span = Option.getOrUndefined(yield* Effect.option(Effect.currentSpan))
      const outcome = yield* internal.run(self, {
        key,
        namespace,
        // The body is bounded by `maxResponseBytes`, checked (with the response sent and the key
        // released) before the protocol sees it.
        maxResultBytes: Number.POSITIVE_INFINITY,
        onUndecodable,
        fingerprint,
        codec,
        ttl,
        lease,
        wait,
        transactional: false,
        span
      }).pipe(
        // Never left holding a response the app writes itself, even if this fiber is stopped.
        Effect.onInterrupt(() => Deferred.succeed(decided, undefined)),
        Effect.exit
      )

      const error = Exit.isFailure(outcome) ? Cause.failureOption(outcome.cause) : Option.none()
      const problem = Option.isSome(error) && error.value._tag !== "NotStorable"
        ? problemOf(error.value, headerLabel)
        : undefined
      const instead = problem === undefined ? undefined : respond(problem, request)
      yield* Deferred.succeed(decided, instead)

      const handlerExit = ran.handler === undefined ? undefined : yield* Fiber.await(ran.handler)
      if (Exit.isSuccess(outcome)) {
        return ran.reply ?? handlerExit ?? Exit.succeed(storedResponse.toResponse(outcome.value, replayHeader))
      }
      if (Option.isNone(error)) return yield* Effect.failCause(outcome.cause as Cause.Cause<never>)
      if (error.value._tag === "NotStorable") return ran.reply ?? handlerExit!
      const failure = error.value
      if (failure._tag === "IdempotencyStorageError" || failure._tag === "IdempotencyResultNotStored") {
        yield* Effect.annotateCurrentSpan("idempotency.outcome", "storage_error")
        yield* Effect.logWarning(
          failure._tag === "IdempotencyStorageError"
            ? "idempotency: storage failed; the request is refused"
            : "idempotency: the request was processed, but its response could not be stored"
        ).pipe(
          Effect.annotateLogs({
            "idempotency.key_hash": internalFingerprint.keyHash(storageKey),
            ...(failure._tag === "IdempotencyStorageError"
              ? { "idempotency.operation": failure.operation }
              : { "idempotency.not_stored": failure.reason })
          })
        )
      } else if (failure._tag === "IdempotencyRecordUndecodable") {
        yield* Effect.annotateCurrentSpan("idempotency.outcome", "undecodable")
        yield* Effect.logWarning("idempotency: the stored response cannot be read here; the request is refused").pipe(
          Effect.annotateLogs({
            "idempotency.key_hash": internalFingerprint.keyHash(storageKey),
            cause: failure.message
          })
        )
      }
      return Exit.succeed(instead!)
    })

  const handle = <E, R>(
    app: HttpApp.Default<E, R>,
    request: HttpServerRequest.HttpServerRequest,
    header: string,
    context: Context.Context<never>
  ): Effect.Effect<HttpServerResponse.HttpServerResponse, E | E2, R | R2 | Storage.Storage> =>
    Effect.gen(function*() {
      const key = httpKey.parse(header, maxKeyLength)
      if (Either.isLeft(key)) return yield* refuse("invalid_key", problemOf(key.left, headerLabel), request)
      let body: Uint8Array | undefined = undefined
      if (httpRequest.isBuffered(request)) {
        if (httpRequest.declaredTooLarge(request, maxBodyBytes)) {
          return yield* refuse("body_too_large", tooLarge, request)
        }
        const read = yield* Effect.either(httpRequest.readBody(request, maxBodyBytes))
        if (Either.isLeft(read)) {
          if (read.left._tag === "BodyTooLarge") return yield* refuse("body_too_large", tooLarge, request)
          return yield* refuse("body_unreadable", bodyUnreadable, request)
        }
        body = read.right
      }
      const buffered = body === undefined ? request : httpRequest.withBody(request, body)
      const principal = yield* principalOf(buffered)
      const route = httpRequest.route(request, context)
      // JSON: no raw control character, so the namespace and the key (which has none either)
      // split back apart in exactly one way.
      const namespace = JSON.stringify([request.method, route, principal])
      yield* Effect.annotateCurrentSpan(
        "idempotency.key_hash",
        internalFingerprint.keyHash(`${namespace}${separator}${key.right}`)
      )
      const fingerprint = yield* fingerprintOf(buffered, body)
      if (Either.isLeft(fingerprint)) {
        return yield* refuse("invalid_fingerprint", problemOf(fingerprint.left, headerLabel), request)
      }

      const run = yield* Effect.forkDaemon(
        Effect.interruptible(execute(app, buffered, key.right, namespace, fingerprint.right))
      )
      const exit = yield* Effect.interruptible(Fiber.await(run)).pipe(
        Effect.onInterrupt(() => keepScopeOpen(context, run, `${namespace}${separator}${key.right}`))
      )
      return yield* Effect.flatten(exit)
    }).pipe(
      Effect.withSpan("IdempotencyMiddleware", {
        attributes: { "http.request.method": request.method },
        captureStackTrace: false
      })
    )

  return <E, R>(app: HttpApp.Default<E, R>): HttpApp.Default<E | E2, R | R2 | Storage.Storage> =>
    Effect.withFiberRuntime<
      HttpServerResponse.HttpServerResponse,
      E | E2,
      R | R2 | Storage.Storage | HttpServerRequest.HttpServerRequest
    >((fiber) => {
      const context = fiber.currentContext
      const request = Context.unsafeGet(context, HttpServerRequest.HttpServerRequest)
      if (!methods.has(request.method)) return app
      const header = request.headers[headerName]
      if (header !== undefined) return handle(app, request, header, context)
      if (!required) return app
      return Effect.succeed(respond(problemOf(new IdempotencyKeyMissing({ key: "" }), headerLabel), request))
    })
}

// The storage key is `namespace + separator + key`, as the protocol builds it: used here only for
// the hash that spans and logs show, so they match the protocol's own.
const separator = "\u001f"

/**
 * The request was interrupted (its client left) while its run goes on: the request's scope, which
 * the handler's resources live in, stays open until the run ends instead of closing under it.
 */
const keepScopeOpen = (context: Context.Context<never>, run: Fiber.Fiber<unknown, unknown>, storageKey: string) =>
  Effect.zipRight(
    Effect.logDebug("idempotency: the request was interrupted; its run goes on and its response is kept").pipe(
      Effect.annotateLogs("idempotency.key_hash", internalFingerprint.keyHash(storageKey))
    ),
    Option.match(Context.getOption(context, Scope.Scope), {
      onNone: () => Effect.void,
      onSome: (scope) =>
        Effect.suspend(() => {
          HttpApp.ejectDefaultScopeClose(scope)
          return Effect.forkDaemon(
            Effect.zipRight(Fiber.await(run), Scope.close(scope as Scope.CloseableScope, Exit.void))
          )
        })
    })
  )
