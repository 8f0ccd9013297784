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
import * as HttpServerRespondable from "@effect/platform/HttpServerRespondable"
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
  type IdempotencyError,
  IdempotencyKeyInvalid,
  IdempotencyKeyMissing,
  type KeyInvalidReason
} from "../IdempotencyError.js"
import type * as Idempotent from "../Idempotent.js"
import * as internalFingerprint from "../internal/fingerprint.js"
import * as apiErrors from "../internal/http/apiErrors.js"
import * as httpKey from "../internal/http/key.js"
import * as httpRequest from "../internal/http/request.js"
import * as storedResponse from "../internal/http/storedResponse.js"
import * as internal from "../internal/idempotent.js"
import * as internalKey from "../internal/key.js"
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
  /** 413: the request body is larger than `maxBodyBytes`. */
  BodyTooLarge: "https://effect-idempotency.dev/problems/body-too-large"
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
  /** For `KeyInvalid`: why the key was refused. */
  readonly reason?: KeyInvalidReason
  /** For `InFlight`: whole seconds until the first request's lease ends (also sent as `Retry-After`). */
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
   * A value the stored record is scoped by, on top of the method and route: the tenant or
   * principal, so that one key sent by two tenants runs twice. It may read the request body.
   */
  readonly scope?: ((request: HttpServerRequest.HttpServerRequest) => Effect.Effect<string, E, R>) | undefined
  /**
   * What a retry must match. Default: method, path, query and body (canonical JSON when the body
   * is JSON). A function returns any JSON-like value to hash instead (`body` is `undefined` for a
   * multipart body, which is not read); `false` compares nothing.
   */
  readonly fingerprint?:
    | false
    | ((request: HttpServerRequest.HttpServerRequest, body: Uint8Array | undefined) => Effect.Effect<unknown, E, R>)
    | undefined
  /** Which response statuses are stored. Default: every status below 500 (a 5xx releases the key). */
  readonly store?: ((status: number) => boolean) | undefined
  /** The header added to replays, with the value `true`. Default `"Idempotent-Replayed"`. */
  readonly replayHeader?: string | undefined
  /** How long a stored response is replayed. Default 24 hours. */
  readonly ttl?: Duration.DurationInput | undefined
  /** The in-flight lease, renewed while the handler runs. Default 30 seconds. */
  readonly lease?: Duration.DurationInput | undefined
  /** `"fail"` (409 with `Retry-After`) or `{ wait }` for the first response. Default `"fail"`. */
  readonly onInFlight?: Idempotent.OnInFlight | undefined
  /** Renders a problem as the app wants it. Default: the problem as `application/problem+json`. */
  readonly problem?:
    | ((problem: Problem, request: HttpServerRequest.HttpServerRequest) => HttpServerResponse.HttpServerResponse)
    | undefined
}

/**
 * The middleware `make` returns: it adds `Storage` (and what `scope` or `fingerprint` need) to
 * the app's requirements.
 *
 * @since 0.1.0
 * @category Models
 */
export interface IdempotencyMiddleware<E2 = never, R2 = never> {
  <E, R>(app: HttpApp.Default<E, R>): HttpApp.Default<E | E2, Exclude<R, Idempotent.Execution> | R2 | Storage.Storage>
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

const defaultStore = (status: number) => status < 500
const mebibyte = 1024 * 1024
// A scope is JSON (no raw control characters) and a valid key has none either: the scoped key
// splits back into its parts in exactly one way.
const separator = "\u001f"

const problemOf = (error: IdempotencyError, header: string): Problem => {
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
    case "IdempotencyResultNotStored":
    case "IdempotencyRecordUndecodable":
    case "IdempotencyOptionsInvalid":
      return {
        type: ProblemType.StorageUnavailable,
        title: "Idempotency storage unavailable",
        status: 503,
        detail: "The request was not processed because its idempotency key could not be checked."
      }
  }
}

/**
 * Builds the middleware. Mount it with `HttpRouter.use`, `HttpServer.serve(app, middleware)` or
 * `HttpApiBuilder.middleware(middleware, { withContext: true })`, and provide a `Storage` layer.
 *
 * A covered request (`POST` or `PATCH` by default) with a key is checked before the handler
 * runs: a key in use by another request gets a 409 with `Retry-After`, a key used with another
 * request a 422, a stored key its response. Otherwise the handler runs and its response is stored
 * when its status is below 500 and its body is in memory and at most `maxResponseBytes`; else the
 * key is released for a retry. A client that disconnects does not stop a handler that has begun:
 * it runs to the end and its response is stored for the retry.
 *
 * Keys are scoped by method and route (the route's template when the router knows it, else the
 * path) and by `scope`'s value, so one key on two routes, or from two tenants, runs twice.
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
  const headerLabel = options?.header ?? "Idempotency-Key"
  const headerName = headerLabel.toLowerCase()
  const methods = new Set<string>(options?.methods ?? ["POST", "PATCH"])
  const required = options?.required === true
  const maxKeyLength = options?.maxKeyLength ?? internalKey.defaultMaxLength
  const maxBodyBytes = options?.maxBodyBytes ?? mebibyte
  const maxResponseBytes = options?.maxResponseBytes ?? mebibyte
  const store = options?.store ?? defaultStore
  const replayHeader = (options?.replayHeader ?? "Idempotent-Replayed").toLowerCase()
  const ttl = Duration.decode(options?.ttl ?? Duration.hours(24))
  const lease = Duration.decode(options?.lease ?? Duration.seconds(30))
  const onInFlight = options?.onInFlight ?? "fail"
  const wait = onInFlight === "fail" ? undefined : Duration.decode(onInFlight.wait)
  const render = options?.problem
  const codec = storedResponse.codec<NotStorable>()

  const respond = (
    problem: Problem,
    request: HttpServerRequest.HttpServerRequest
  ): Effect.Effect<HttpServerResponse.HttpServerResponse> => {
    let response = render === undefined
      ? HttpServerResponse.unsafeJson(problem, { status: problem.status, contentType: "application/problem+json" })
      : render(problem, request)
    if (problem.retryAfter !== undefined && response.headers["retry-after"] === undefined) {
      response = HttpServerResponse.setHeader(response, "retry-after", String(problem.retryAfter))
    }
    // The rest of the body is left unread, so the connection cannot carry another request.
    if (problem.type === ProblemType.BodyTooLarge) {
      response = HttpServerResponse.setHeader(response, "connection", "close")
    }
    return Effect.succeed(response)
  }

  const refuse = (outcome: string, problem: Problem, request: HttpServerRequest.HttpServerRequest) =>
    Effect.zipRight(Effect.annotateCurrentSpan("idempotency.outcome", outcome), respond(problem, request))

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

  // Stored, or why not. A refused response is the run's failure, so the protocol releases the key.
  const decide = (
    key: string,
    response: HttpServerResponse.HttpServerResponse
  ): Effect.Effect<storedResponse.StoredResponse, NotStorable> => {
    if (!store(response.status)) {
      return Effect.zipRight(Effect.annotateCurrentSpan("idempotency.stored", false), Effect.fail(new NotStorable()))
    }
    const stored = storedResponse.fromResponse(response, maxResponseBytes, replayHeader)
    if (Either.isRight(stored)) return Effect.as(Effect.annotateCurrentSpan("idempotency.stored", true), stored.right)
    return Effect.logWarning("idempotency: the response was sent but not stored; the key is released").pipe(
      Effect.annotateLogs({
        "idempotency.key_hash": internalFingerprint.keyHash(key),
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
    fingerprint: string
  ): Effect.Effect<
    Exit.Exit<HttpServerResponse.HttpServerResponse, E>,
    never,
    Exclude<R, Idempotent.Execution> | Storage.Storage
  > =>
    Effect.gen(function*() {
      // Holds a response the app writes itself (under `HttpServer.serve(app, middleware)`) until
      // the run is committed or released: a client never sees a response its retry cannot get.
      const decided = yield* Deferred.make<void>()
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
            Effect.zipRight(Deferred.succeed(captured, response), Effect.as(Deferred.await(decided), response))
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
          if (Either.isLeft(first)) return yield* decide(key, first.left)
          const exit = first.right
          ran.reply = exit
          if (Exit.isSuccess(exit)) return yield* decide(key, exit.value)
          const encoded = yield* apiErrors.response(exit.cause)
          if (Option.isSome(encoded)) {
            ran.reply = Exit.succeed(encoded.value)
            return yield* decide(key, encoded.value)
          }
          // The failure itself goes back to the platform, which renders the same response and logs it.
          const [response] = yield* HttpServerError.causeResponse(exit.cause)
          return yield* decide(key, response)
        })
      )

      const span = Option.getOrUndefined(yield* Effect.option(Effect.currentSpan))
      const outcome = yield* internal.run(self, {
        key,
        namespace: undefined,
        maxResultBytes: Number.POSITIVE_INFINITY,
        onUndecodable: "fail",
        fingerprint,
        codec,
        ttl,
        lease,
        wait,
        transactional: false,
        span
      })
        .pipe(
          Effect.exit,
          Effect.ensuring(Deferred.succeed(decided, undefined))
        )

      const handlerExit = ran.handler === undefined ? undefined : yield* Fiber.await(ran.handler)
      if (Exit.isSuccess(outcome)) {
        return ran.reply ?? handlerExit ?? Exit.succeed(storedResponse.toResponse(outcome.value, replayHeader))
      }
      const error = Cause.failureOption(outcome.cause)
      if (Option.isNone(error)) return yield* Effect.failCause(outcome.cause as Cause.Cause<never>)
      if (error.value._tag === "NotStorable") return ran.reply ?? handlerExit!
      if (error.value._tag === "IdempotencyStorageError") {
        yield* Effect.annotateCurrentSpan("idempotency.outcome", "storage_error")
        yield* Effect.logWarning("idempotency: storage failed; the request is refused").pipe(
          Effect.annotateLogs({
            "idempotency.key_hash": internalFingerprint.keyHash(key),
            "idempotency.operation": error.value.operation
          })
        )
      }
      return Exit.succeed(yield* respond(problemOf(error.value, headerLabel), request))
    })

  const handle = <E, R>(
    app: HttpApp.Default<E, R>,
    request: HttpServerRequest.HttpServerRequest,
    header: string,
    context: Context.Context<never>
  ): Effect.Effect<
    HttpServerResponse.HttpServerResponse,
    E | E2,
    Exclude<R, Idempotent.Execution> | R2 | Storage.Storage
  > =>
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
          // The platform's answer to a body it could not read (a 400).
          return yield* HttpServerRespondable.toResponse(read.left)
        }
        body = read.right
      }
      const buffered = body === undefined ? request : httpRequest.withBody(request, body)
      const tenant = options?.scope === undefined ? undefined : yield* options.scope(buffered)
      const route = httpRequest.route(request, context)
      const scope = JSON.stringify(tenant === undefined ? [request.method, route] : [request.method, route, tenant])
      const scopedKey = `${scope}${separator}${key.right}`
      yield* Effect.annotateCurrentSpan("idempotency.key_hash", internalFingerprint.keyHash(scopedKey))
      const fingerprint = yield* fingerprintOf(buffered, body)
      if (Either.isLeft(fingerprint)) {
        return yield* refuse("invalid_fingerprint", problemOf(fingerprint.left, headerLabel), request)
      }

      const run = yield* Effect.forkDaemon(Effect.interruptible(execute(app, buffered, scopedKey, fingerprint.right)))
      const exit = yield* Effect.interruptible(Fiber.await(run)).pipe(
        Effect.onInterrupt(() => keepScopeOpen(context, run, scopedKey))
      )
      return yield* Effect.flatten(exit)
    }).pipe(
      Effect.withSpan("IdempotencyMiddleware", {
        attributes: { "http.request.method": request.method },
        captureStackTrace: false
      })
    )

  return <E, R>(
    app: HttpApp.Default<E, R>
  ): HttpApp.Default<E | E2, Exclude<R, Idempotent.Execution> | R2 | Storage.Storage> =>
    Effect.withFiberRuntime<
      HttpServerResponse.HttpServerResponse,
      E | E2,
      Exclude<R, Idempotent.Execution> | R2 | Storage.Storage | HttpServerRequest.HttpServerRequest
    >((fiber) => {
      const context = fiber.currentContext
      const request = Context.unsafeGet(context, HttpServerRequest.HttpServerRequest)
      // A route that requires `Execution` gets it from the run; a request that passes through has
      // no run, and its handler is given nothing.
      const passThrough = app as HttpApp.Default<E, Exclude<R, Idempotent.Execution>>
      if (!methods.has(request.method)) return passThrough
      const header = request.headers[headerName]
      if (header !== undefined) return handle(app, request, header, context)
      if (!required) return passThrough
      return respond(problemOf(new IdempotencyKeyMissing({ key: "" }), headerLabel), request)
    })
}

/**
 * The request was interrupted (its client left) while its run goes on: the request's scope, which
 * the handler's resources live in, stays open until the run ends instead of closing under it.
 */
const keepScopeOpen = (context: Context.Context<never>, run: Fiber.Fiber<unknown, unknown>, key: string) =>
  Effect.zipRight(
    Effect.logDebug("idempotency: the request was interrupted; its run goes on and its response is kept").pipe(
      Effect.annotateLogs("idempotency.key_hash", internalFingerprint.keyHash(key))
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
