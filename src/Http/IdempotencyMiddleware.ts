/**
 * Idempotency keys for `@effect/platform` HTTP servers, after the IETF draft "The
 * Idempotency-Key HTTP Header Field" and Stripe: the first request with a key runs the handler
 * and its response is stored; every retry with the same key gets that response back, byte for
 * byte, with `Idempotent-Replayed: true`.
 *
 * ## Options
 *
 * | Option | Default | What it does |
 * | --- | --- | --- |
 * | `header` | `"Idempotency-Key"` | the request header holding the key |
 * | `key` | none | a function that finds the key elsewhere (the body, several headers); instead of `header` |
 * | `methods` | `["POST", "PATCH"]` | the methods covered; others pass straight through |
 * | `required` | `false` | a covered request without a key gets a 400 instead of passing through |
 * | `maxKeyLength` | `255` | the longest key, in characters |
 * | `maxBodyBytes` | 1 MiB | the largest request body read (413 over it) |
 * | `maxResponseBytes` | 1 MiB | the largest response stored (sent, not stored, over it) |
 * | `credentialHeaders` | `["authorization", "cookie"]` | the headers whose digest scopes a key to its caller |
 * | `scope` | none | who a record belongs to, instead of `credentialHeaders` |
 * | `fingerprint` | method, path, query, body | what a retry must match (422 otherwise) |
 * | `store` | {@link defaultStore} | which statuses are stored and replayed |
 * | `replayHeader` | `"Idempotent-Replayed"` | the header that marks a replay |
 * | `ttl` | 24 hours | how long a response is replayed |
 * | `lease` | 30 seconds | the in-flight lease, renewed while the handler runs |
 * | `onInFlight` | `"fail"` | a duplicate gets a 409 at once, or `{ wait }` for the first response |
 * | `inFlightRetryAfter` | 1 second | the `Retry-After` of that 409: when a retry may first succeed |
 * | `onUndecodable` | `"fail"` | a stored response this version cannot read: 503, or `"run"` again |
 * | `problemTypeBase` | this project's problem-types page | where the `type` URIs of problems point |
 * | `problem` | `application/problem+json` | renders a problem as the app wants it |
 *
 * {@link make} takes them as values; {@link makeConfig} reads the data options from `Config`.
 *
 * @since 0.1.0
 */
import * as HttpApp from "@effect/platform/HttpApp"
import type * as HttpMethod from "@effect/platform/HttpMethod"
import * as HttpServerError from "@effect/platform/HttpServerError"
import * as HttpServerRequest from "@effect/platform/HttpServerRequest"
import * as HttpServerResponse from "@effect/platform/HttpServerResponse"
import * as Cause from "effect/Cause"
import * as Config from "effect/Config"
import type * as ConfigError from "effect/ConfigError"
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
  type IdempotencyOptionsInvalid,
  type KeyInvalidReason,
  type ResultNotStoredReason,
  type WrapError
} from "../IdempotencyError.js"
import type * as Idempotent from "../Idempotent.js"
import * as internalFingerprint from "../internal/fingerprint.js"
import * as apiErrors from "../internal/http/apiErrors.js"
import * as httpKey from "../internal/http/key.js"
import * as httpOptions from "../internal/http/options.js"
import * as httpRequest from "../internal/http/request.js"
import * as storedResponse from "../internal/http/storedResponse.js"
import * as internal from "../internal/idempotent.js"
import * as internalKey from "../internal/key.js"
import type * as Storage from "../Storage.js"

/**
 * The `type` URI of each problem the middleware answers with, by default: a section of this
 * project's problem-types page (`docs/en/problem-types.md`), whose anchor is the problem's slug
 * (`#key-missing`, `#in-flight`, ...) and which says what the client should do. With
 * `problemTypeBase` the same slug follows that base instead.
 *
 * @since 0.1.0
 * @category Problems
 */
export const ProblemType = {
  /** 400: the route requires a key and the request had none. */
  KeyMissing: "https://github.com/effect-idempotency/effect-idempotency/blob/main/docs/en/problem-types.md#key-missing",
  /** 400: the key is malformed, sent twice, empty, too long or has control characters. */
  KeyInvalid: "https://github.com/effect-idempotency/effect-idempotency/blob/main/docs/en/problem-types.md#key-invalid",
  /** 422: the key was used before with another request (method, path, query or body). */
  KeyReused: "https://github.com/effect-idempotency/effect-idempotency/blob/main/docs/en/problem-types.md#key-reused",
  /** 409: the first request with this key is still running (`Retry-After` says when to try again). */
  InFlight: "https://github.com/effect-idempotency/effect-idempotency/blob/main/docs/en/problem-types.md#in-flight",
  /** 409: the request ran, but lost its lease before its response could be stored. */
  LeaseLost: "https://github.com/effect-idempotency/effect-idempotency/blob/main/docs/en/problem-types.md#lease-lost",
  /** 503: the idempotency storage failed; the request was not processed. */
  StorageUnavailable:
    "https://github.com/effect-idempotency/effect-idempotency/blob/main/docs/en/problem-types.md#storage-unavailable",
  /**
   * 503 with `Retry-After`: the response stored for this key cannot be read here (written by a
   * newer version of this library during a rolling deploy, or damaged); the request was not
   * processed. Another instance may read it.
   */
  RecordUndecodable:
    "https://github.com/effect-idempotency/effect-idempotency/blob/main/docs/en/problem-types.md#record-undecodable",
  /**
   * 503: the request was processed, but its response could not be stored (the storage failed
   * while the lease held), so no retry can replay it and a retry may process it again.
   */
  ResultNotStored:
    "https://github.com/effect-idempotency/effect-idempotency/blob/main/docs/en/problem-types.md#result-not-stored",
  /** 500: the middleware's options are invalid. `make` refuses such options, so this is not sent. */
  Misconfigured:
    "https://github.com/effect-idempotency/effect-idempotency/blob/main/docs/en/problem-types.md#misconfigured",
  /** 413: the request body is larger than `maxBodyBytes`. */
  BodyTooLarge:
    "https://github.com/effect-idempotency/effect-idempotency/blob/main/docs/en/problem-types.md#body-too-large",
  /** 400: the request body could not be read (the client stopped sending it, or sent it malformed). */
  BodyUnreadable:
    "https://github.com/effect-idempotency/effect-idempotency/blob/main/docs/en/problem-types.md#body-unreadable"
} as const

/**
 * One of the `ProblemType` URIs.
 *
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
  /**
   * A {@link ProblemType} value; with `problemTypeBase`, that base followed by the same `#slug`
   * (`https://api.example.com/problems#in-flight`).
   */
  readonly type: string
  readonly title: string
  readonly status: number
  readonly detail: string
  /** For `KeyInvalid`: why the key was refused; for `ResultNotStored`: why the response was not kept. */
  readonly reason?: KeyInvalidReason | ResultNotStoredReason
  /**
   * Whole seconds before a retry may first succeed, also sent as `Retry-After`. For `InFlight`:
   * the first request may finish at any moment, so this is `inFlightRetryAfter` (1 by default),
   * never more than `leaseExpiresInSeconds`; for `RecordUndecodable`: when another instance may
   * have taken over.
   */
  readonly retryAfter?: number
  /**
   * For `InFlight`: whole seconds until the first request's lease ends unless it is renewed. Its
   * holder renews it while it runs, so this is the latest the key frees if that server stopped,
   * not when the response will be ready.
   */
  readonly leaseExpiresInSeconds?: number
}

/**
 * The options of the middleware that are data, so they can come from `Config` (see
 * {@link makeConfig}).
 *
 * @since 0.1.0
 * @category Models
 */
export interface IdempotencyMiddlewareSettings {
  /**
   * The request header holding the key: a bare token or an RFC 8941 quoted string. Default
   * `"Idempotency-Key"`. Not with `key`.
   */
  readonly header?: string | undefined
  /** The methods the middleware covers; others pass straight through. Default `["POST", "PATCH"]`. */
  readonly methods?: ReadonlyArray<HttpMethod.HttpMethod> | undefined
  /** Refuse a covered request without a key (400) instead of passing it through. Default `false`. */
  readonly required?: boolean | undefined
  /** The longest key accepted, in characters. Default 255. */
  readonly maxKeyLength?: number | undefined
  /**
   * The largest request body read on a request with a key (or read by a `key` function), in
   * bytes (over it: 413, checked on `Content-Length` first, then while reading). Multipart bodies
   * are not read (nor fingerprinted): they are left to the handler to stream. Default 1 MiB.
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
  /** The header added to replays, with the value `true`. Default `"Idempotent-Replayed"`. */
  readonly replayHeader?: string | undefined
  /** How long a stored response is replayed. Default 24 hours. */
  readonly ttl?: Duration.DurationInput | undefined
  /** The in-flight lease, renewed while the handler runs. Default 30 seconds. */
  readonly lease?: Duration.DurationInput | undefined
  /** `"fail"` (409 with `Retry-After`) or `{ wait }` for the first response. Default `"fail"`. */
  readonly onInFlight?: Idempotent.OnInFlight | undefined
  /**
   * The `Retry-After` of a 409 in-flight (also when a `{ wait }` ran out): when a retry may first
   * succeed. The first request may finish at any moment, so it is short; it is rounded up to
   * whole seconds and never more than the lease left (the body's `leaseExpiresInSeconds`, the
   * latest the key frees if the server running the first request stopped). Default 1 second.
   */
  readonly inFlightRetryAfter?: Duration.DurationInput | undefined
  /**
   * What a stored response that cannot be read does (one written by a newer version of this
   * library, during a rolling deploy): `"fail"` answers 503 `RecordUndecodable` with
   * `Retry-After`, so the retry may reach an instance that reads it; `"run"` forgets it and runs
   * the handler again. Default `"fail"`.
   */
  readonly onUndecodable?: "fail" | "run" | undefined
  /**
   * Where the `type` URIs of problems point: an absolute URI without a fragment, to which `#` and
   * the problem's slug are added (`"https://api.example.com/problems"` gives
   * `"https://api.example.com/problems#key-reused"`). Give your own page to document the
   * problems with your API. Default: this project's problem-types page (see {@link ProblemType}).
   */
  readonly problemTypeBase?: string | undefined
}

/**
 * The options of the middleware that are functions.
 *
 * @since 0.1.0
 * @category Models
 */
export interface IdempotencyMiddlewareFunctions<E = never, R = never> {
  /**
   * Finds the key in the request, instead of the `header`: in the body (`{ "requestId": ... }`),
   * or in several headers together. `None` is a request without a key (passed through, or 400
   * when `required`). The key is checked as a header key is (length, control characters, valid
   * Unicode): 400 `KeyInvalid` otherwise.
   *
   * The function may read the body: it is read once, within `maxBodyBytes` (413 over it, 400 if it
   * cannot be read, whatever the function makes of that), and the handler reads it again. A
   * multipart body is not buffered: find its key in the headers or the URL. A failure of the
   * function is the request's failure, as for `scope`: the handler does not run, nothing is
   * stored, and the app renders it (an `HttpServerError.RequestError` or a `ParseError`, from a
   * body that is not JSON or not of its schema, as a 400; a declared error of an `HttpApi` as
   * declared; any other error, and a defect, as a 500). Map the errors you expect to a `None` or an `Option.some` of the key, or
   * to an error that renders as you want.
   */
  readonly key?:
    | ((request: HttpServerRequest.HttpServerRequest) => Effect.Effect<Option.Option<string>, E, R>)
    | undefined
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
  /** Renders a problem as the app wants it. Default: the problem as `application/problem+json`. */
  readonly problem?:
    | ((problem: Problem, request: HttpServerRequest.HttpServerRequest) => HttpServerResponse.HttpServerResponse)
    | undefined
}

/**
 * Every option of the middleware: see the table at the top of this module.
 *
 * @since 0.1.0
 * @category Models
 */
export interface IdempotencyMiddlewareOptions<E = never, R = never>
  extends IdempotencyMiddlewareSettings, IdempotencyMiddlewareFunctions<E, R>
{}

/**
 * The middleware `make` returns: it adds `Storage` (and what `key`, `scope` or `fingerprint`
 * need) to the app's requirements. It does not provide `Idempotent.Execution`: a request without
 * a key, or with a method the middleware does not cover, runs the handler outside any run, so a
 * handler that requires `Execution` keeps that requirement (and cannot be served). Handlers read
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
 * @example
 * ```ts
 * import * as IdempotencyMiddleware from "effect-idempotency/Http/IdempotencyMiddleware"
 *
 * // Store 429 answers too, so that a client retrying too soon is answered the same until it waits.
 * const middleware = IdempotencyMiddleware.make({
 *   store: (status) => IdempotencyMiddleware.defaultStore(status) || status === 429
 * })
 *
 * console.log(IdempotencyMiddleware.defaultStore(201), IdempotencyMiddleware.defaultStore(422)) // true false
 * ```
 *
 * @since 0.1.0
 * @category Options
 */
export const defaultStore = (status: number): boolean => status < 500 && !notStoredStatuses.has(status)

// How long a client should wait before retrying a request whose stored response this instance
// cannot read: long enough for a rolling deploy to move on, short enough for a client to wait.
const undecodableRetryAfterSeconds = 5

/** What the problems' wording depends on. */
interface ProblemContext {
  /** The key's header as the user named it; `undefined` when a `key` function finds the key. */
  readonly header: string | undefined
  readonly inFlightRetryAfterSeconds: number
  /** How long a duplicate waits for the first response; `undefined` when it fails at once. */
  readonly wait: Duration.Duration | undefined
}

const problemOf = (error: WrapError | IdempotencyKeyMissing, context: ProblemContext): Problem => {
  switch (error._tag) {
    case "IdempotencyKeyMissing":
      return {
        type: ProblemType.KeyMissing,
        title: "Idempotency key missing",
        status: 400,
        detail: context.header === undefined
          ? "This request requires an idempotency key."
          : `This request requires an ${context.header} header.`
      }
    case "IdempotencyKeyInvalid":
      return {
        type: ProblemType.KeyInvalid,
        title: "Invalid idempotency key",
        status: 400,
        detail: `${context.header === undefined ? "The idempotency key" : `The ${context.header} header`} is ` +
          `invalid: ${error.detail}.`,
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
      // The lease is renewed while the first request runs: what is left of it bounds when the key
      // frees if its server stopped, not when the response is ready, which can be any moment.
      const leaseExpiresInSeconds = Math.max(1, Math.ceil(Duration.toSeconds(error.retryAfter)))
      const retryAfter = Math.min(context.inFlightRetryAfterSeconds, leaseExpiresInSeconds)
      const waited = context.wait === undefined
        ? ""
        : ` It did not finish within the ${Duration.format(context.wait)} this server waits for it.`
      return {
        type: ProblemType.InFlight,
        title: "Request in progress",
        status: 409,
        detail: `A request with this key is still in progress.${waited} It may finish at any moment: ` +
          `retry with the same key in ${retryAfter} second(s) (retryAfter). Its lease ends in ` +
          `${leaseExpiresInSeconds} second(s) unless its server renews it (leaseExpiresInSeconds): ` +
          "if that server stopped, the key is free by then at the latest.",
        retryAfter,
        leaseExpiresInSeconds
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

const orThrow = <A>(either: Either.Either<A, IdempotencyOptionsInvalid>): A => {
  if (Either.isLeft(either)) throw either.left
  return either.right
}

/**
 * Builds the middleware. Mount it with `HttpRouter.use`, `HttpServer.serve(app, middleware)` or
 * `HttpApiBuilder.middleware(middleware, { withContext: true })`, and provide a `Storage` layer.
 * Options that make no sense (a lease of zero, a `ttl` shorter than the lease, a byte limit that
 * is not a positive whole number, a header name that is not one, both `key` and `header`, a
 * `problemTypeBase` that is not an absolute URI) throw `IdempotencyOptionsInvalid` here, before
 * any request.
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
 * @example
 * ```ts
 * // The key in the JSON body (`{ "requestId": "...", ... }`), for clients that cannot set headers.
 * import { Effect, Option, Schema } from "effect"
 * import * as IdempotencyMiddleware from "effect-idempotency/Http/IdempotencyMiddleware"
 *
 * const RequestId = Schema.Struct({ requestId: Schema.optional(Schema.String) })
 *
 * export const fromBody = IdempotencyMiddleware.make({
 *   // A body that is not JSON, or has no string `requestId`, is a request without a key.
 *   key: (request) =>
 *     request.json.pipe(
 *       Effect.flatMap(Schema.decodeUnknown(RequestId)),
 *       Effect.map(({ requestId }) => Option.fromNullable(requestId)),
 *       Effect.orElseSucceed(() => Option.none<string>())
 *     ),
 *   required: true
 * })
 *
 * // Or a key made of two headers: the tenant's own request id is unique per tenant only.
 * export const fromHeaders = IdempotencyMiddleware.make({
 *   key: (request) =>
 *     Effect.succeed(
 *       Option.all([
 *         Option.fromNullable(request.headers["x-tenant"]),
 *         Option.fromNullable(request.headers["x-request-id"])
 *       ]).pipe(Option.map(([tenant, id]) => `${tenant}:${id}`))
 *     )
 * })
 * ```
 *
 * @since 0.1.0
 * @category Constructors
 */
export const make = <E2 = never, R2 = never>(
  options?: IdempotencyMiddlewareOptions<E2, R2>
): IdempotencyMiddleware<E2, R2> => build(orThrow(httpOptions.decode(options ?? {})), options ?? {})

/**
 * {@link make} with its data options read from `Config` (each one a `Config`: `Config.succeed`
 * for a fixed value; one left out takes its default), and its functions given as they are. Bad values fail the effect, with a `ConfigError` when the
 * configuration cannot be read as the type asks, or `IdempotencyOptionsInvalid` when the value
 * makes no sense (a zero lease, a header name that is not one, a `header` beside a `key` function).
 *
 * @example
 * ```ts
 * import { HttpRouter } from "@effect/platform"
 * import { Config, Effect } from "effect"
 * import * as IdempotencyMiddleware from "effect-idempotency/Http/IdempotencyMiddleware"
 *
 * // IDEMPOTENCY_LEASE=10 seconds IDEMPOTENCY_REQUIRED=true IDEMPOTENCY_MAX_BODY_BYTES=65536
 * export const router = (routes: HttpRouter.HttpRouter) =>
 *   Effect.map(
 *     IdempotencyMiddleware.makeConfig({
 *       lease: Config.duration("IDEMPOTENCY_LEASE").pipe(Config.withDefault("30 seconds")),
 *       required: Config.boolean("IDEMPOTENCY_REQUIRED").pipe(Config.withDefault(false)),
 *       maxBodyBytes: Config.integer("IDEMPOTENCY_MAX_BODY_BYTES").pipe(Config.withDefault(1024 * 1024)),
 *       problemTypeBase: Config.succeed("https://api.example.com/problems")
 *     }),
 *     (middleware) => HttpRouter.use(routes, middleware)
 *   )
 * ```
 *
 * @since 0.1.0
 * @category Constructors
 */
export const makeConfig = <E2 = never, R2 = never>(
  config: Config.Config.Wrap<IdempotencyMiddlewareSettings>,
  functions?: IdempotencyMiddlewareFunctions<E2, R2>
): Effect.Effect<IdempotencyMiddleware<E2, R2>, ConfigError.ConfigError | IdempotencyOptionsInvalid> =>
  Effect.flatMap(Config.unwrap(config), (settings) => {
    const options: IdempotencyMiddlewareOptions<E2, R2> = { ...settings, ...functions }
    return Effect.map(httpOptions.decode(options), (decoded) => build(decoded, options))
  })

const build = <E2, R2>(
  decoded: httpOptions.Decoded,
  options: IdempotencyMiddlewareOptions<E2, R2>
): IdempotencyMiddleware<E2, R2> => {
  const {
    credentialHeaders,
    headerLabel,
    headerName,
    lease,
    maxBodyBytes,
    maxKeyLength,
    maxResponseBytes,
    methods,
    onUndecodable,
    problemTypeBase,
    replayHeader,
    required,
    ttl,
    wait
  } = decoded
  const keyOf = options.key
  const store = options.store ?? defaultStore
  const render = options.problem
  const codec = storedResponse.codec<NotStorable>()
  const problemContext: ProblemContext = {
    header: headerLabel,
    inFlightRetryAfterSeconds: decoded.inFlightRetryAfterSeconds,
    wait
  }
  const problemFor = (error: WrapError | IdempotencyKeyMissing) => problemOf(error, problemContext)

  // The type URI as sent: the default page's, or the same slug after the user's base.
  const typeUri = (type: string) =>
    problemTypeBase === httpOptions.defaultProblemTypeBase ? type : problemTypeBase + type.slice(type.indexOf("#"))

  const respond = (
    problem: Problem,
    request: HttpServerRequest.HttpServerRequest
  ): HttpServerResponse.HttpServerResponse => {
    const sent: Problem = { ...problem, type: typeUri(problem.type) }
    let response = render === undefined
      ? HttpServerResponse.unsafeJson(sent, { status: sent.status, contentType: "application/problem+json" })
      : render(sent, request)
    if (sent.retryAfter !== undefined && response.headers["retry-after"] === undefined) {
      response = HttpServerResponse.setHeader(response, "retry-after", String(sent.retryAfter))
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
    const custom = options.fingerprint
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
    if (options.scope !== undefined) return Effect.map(options.scope(request), (scope) => ({ scope }))
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
        ? problemFor(error.value)
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
              : { "idempotency.not_stored": failure.reason }),
            // What went wrong, in the backend's words: the operation alone does not say.
            cause: causeOf(failure)
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

  /**
   * Checks the key and reads the body (unless a `key` function read it already: `read`), then
   * runs the protocol on a daemon fiber, so it goes on when the client leaves.
   */
  const handle = <E, R>(
    app: HttpApp.Default<E, R>,
    request: HttpServerRequest.HttpServerRequest,
    key: Either.Either<string, IdempotencyKeyInvalid>,
    read: Uint8Array | undefined,
    context: Context.Context<never>
  ): Effect.Effect<HttpServerResponse.HttpServerResponse, E | E2, R | R2 | Storage.Storage> =>
    Effect.gen(function*() {
      if (Either.isLeft(key)) return yield* refuse("invalid_key", problemFor(key.left), request)
      let body = read
      if (body === undefined && httpRequest.isBuffered(request)) {
        if (httpRequest.declaredTooLarge(request, maxBodyBytes)) {
          return yield* refuse("body_too_large", tooLarge, request)
        }
        const bytes = yield* Effect.either(httpRequest.readBody(request, maxBodyBytes))
        if (Either.isLeft(bytes)) {
          if (bytes.left._tag === "BodyTooLarge") return yield* refuse("body_too_large", tooLarge, request)
          return yield* refuse("body_unreadable", bodyUnreadable, request)
        }
        body = bytes.right
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
        return yield* refuse("invalid_fingerprint", problemFor(fingerprint.left), request)
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

  const keyMissing = (request: HttpServerRequest.HttpServerRequest) =>
    respond(problemFor(new IdempotencyKeyMissing({ key: "" })), request)

  /**
   * The key from the `key` function. The function sees the body through a request that reads it
   * once, within `maxBodyBytes`; a body it read that was too large or cut off is refused (the
   * handler could not read it again), whatever the function made of it. Its own failures are the
   * request's, as for `scope`.
   */
  const handleKeyFunction = <E, R>(
    app: HttpApp.Default<E, R>,
    request: HttpServerRequest.HttpServerRequest,
    keyOf: NonNullable<IdempotencyMiddlewareFunctions<E2, R2>["key"]>,
    context: Context.Context<never>
  ): Effect.Effect<
    HttpServerResponse.HttpServerResponse,
    E | E2,
    R | R2 | Storage.Storage | HttpServerRequest.HttpServerRequest
  > =>
    Effect.gen(function*() {
      const lazy = httpRequest.isBuffered(request)
        ? yield* httpRequest.withLazyBody(request, maxBodyBytes)
        : undefined
      const found = yield* Effect.exit(keyOf(lazy?.request ?? request))
      const read = lazy === undefined ? Option.none() : yield* lazy.result
      let body: Uint8Array | undefined = undefined
      if (Option.isSome(read)) {
        if (Either.isLeft(read.value)) {
          return respond(read.value.left._tag === "BodyTooLarge" ? tooLarge : bodyUnreadable, request)
        }
        body = read.value.right
      }
      if (Exit.isFailure(found)) return yield* Effect.failCause(found.cause)
      if (!Option.isOption(found.value)) {
        return yield* Effect.dieMessage("the idempotency middleware's `key` function must return an Option")
      }
      if (Option.isNone(found.value)) {
        if (required) return keyMissing(request)
        // The body it read is gone from the request: the handler reads the copy.
        return yield* body === undefined
          ? app
          : Effect.provideService(app, HttpServerRequest.HttpServerRequest, httpRequest.withBody(request, body))
      }
      return yield* handle(app, request, internalKey.validate(found.value.value, maxKeyLength), body, context)
    })

  return <E, R>(app: HttpApp.Default<E, R>): HttpApp.Default<E | E2, R | R2 | Storage.Storage> =>
    Effect.withFiberRuntime<
      HttpServerResponse.HttpServerResponse,
      E | E2,
      R | R2 | Storage.Storage | HttpServerRequest.HttpServerRequest
    >((fiber) => {
      const context = fiber.currentContext
      const request = Context.unsafeGet(context, HttpServerRequest.HttpServerRequest)
      if (!methods.has(request.method)) return app
      if (keyOf !== undefined) return handleKeyFunction(app, request, keyOf, context)
      const header = request.headers[headerName]
      if (header !== undefined) return handle(app, request, httpKey.parse(header, maxKeyLength), undefined, context)
      if (!required) return app
      return Effect.succeed(keyMissing(request))
    })
}

// An error's message, with its cause when the message does not carry it (a cause that is not an `Error`).
const causeOf = (error: { readonly message: string; readonly cause?: unknown }): string => {
  const cause = error.cause
  if (cause === undefined || cause instanceof Error) return error.message
  let text: string
  try {
    text = typeof cause === "string" ? cause : JSON.stringify(cause) ?? String(cause)
  } catch {
    text = String(cause)
  }
  return `${error.message} (${text})`
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
