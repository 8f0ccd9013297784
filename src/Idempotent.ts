/**
 * `Idempotent.wrap` runs an effect at most once per idempotency key and replays its stored result
 * to every later call with the same key: the retried `POST /payments`, the redelivered queue
 * message, the job restarted after a crash.
 *
 * @since 0.1.0
 */
import * as DateTime from "effect/DateTime"
import type * as Duration from "effect/Duration"
import * as Effect from "effect/Effect"
import * as Either from "effect/Either"
import { dual } from "effect/Function"
import type * as Option from "effect/Option"
import type * as Schema from "effect/Schema"
import { IdempotencyKeyInvalid, type WrapError } from "./IdempotencyError.js"
import * as internalFingerprint from "./internal/fingerprint.js"
import * as internal from "./internal/idempotent.js"
import * as internalKey from "./internal/key.js"
import * as ResultCodec from "./internal/resultCodec.js"
import * as settings from "./internal/settings.js"
import * as tracing from "./internal/tracing.js"
import type * as Storage from "./Storage.js"

/**
 * The running effect's own view of its execution: the key, and the fence number of this
 * acquisition. The fence grows with every new owner of the key, so a downstream system can refuse
 * a write carrying a fence lower than one it has seen (a holder that lost its lease).
 *
 * @example
 * ```ts
 * import { Effect } from "effect"
 * import { Idempotent } from "effect-idempotency"
 *
 * const charge = Effect.gen(function*() {
 *   const { fence, key } = yield* Idempotent.Execution
 *   yield* Effect.log(`charging for ${key} with fence ${fence}`)
 * }).pipe(Idempotent.wrap({ key: "payment-7" }))
 * ```
 *
 * @since 0.1.0
 * @category Tags
 */
export const Execution: typeof internal.Execution = internal.Execution

/**
 * What the wrapped effect reads from the `Execution` service.
 *
 * @since 0.1.0
 * @category Models
 */
export type Execution = internal.Execution

/**
 * What the wrapped effect can read about its own run: its key and the fence of this acquisition.
 *
 * @since 0.1.0
 * @category Models
 */
export type ExecutionInfo = internal.ExecutionInfo

/**
 * The current run's {@link ExecutionInfo}, or `None` outside one. Code that may run both under
 * and outside an idempotent run (an HTTP handler reached with and without an `Idempotency-Key`,
 * or by a method the middleware does not cover) reads this instead of requiring
 * {@link Execution}, which only a run provides.
 *
 * @example
 * ```ts
 * import { Effect, Option } from "effect"
 * import { Idempotent } from "effect-idempotency"
 *
 * const handler = Effect.gen(function*() {
 *   const execution = yield* Idempotent.currentExecution
 *   const fence = Option.match(execution, { onNone: () => 0, onSome: (run) => run.fence })
 *   yield* Effect.log(`writing with fence ${fence}`)
 * })
 * ```
 *
 * @since 0.1.0
 * @category Accessors
 */
export const currentExecution: Effect.Effect<Option.Option<ExecutionInfo>> = Effect.serviceOption(internal.Execution)

/**
 * What a duplicate does while the first run is in flight: fail at once with
 * `IdempotencyInFlight`, or wait up to `wait` for the first run to finish and replay its result.
 *
 * @since 0.1.0
 * @category Models
 */
export type OnInFlight = "fail" | { readonly wait: Duration.DurationInput }

/**
 * Options of `Idempotent.wrap`: the key, the fingerprint and how long to keep the record and the
 * lease. Without a `success` schema the result must be plain JSON data.
 *
 * @since 0.1.0
 * @category Models
 */
export interface WrapOptions<A, F> {
  /** The idempotency key: 1 to 255 characters, no control characters. */
  readonly key: string
  /**
   * Any JSON-like value describing the request (object key order is ignored). A later call with
   * the same key and another fingerprint fails with `IdempotencyKeyReused`.
   */
  readonly fingerprint?: unknown
  /** Schema of the stored success. Default: the value is stored as JSON. */
  readonly success?: Schema.Schema<A, any, never> | undefined
  /** Schema of the failures to store and replay. Failures it cannot encode release the key. */
  readonly failure?: Schema.Schema<F, any, never> | undefined
  /** How long a completed result is kept. Default 24 hours. */
  readonly ttl?: Duration.DurationInput | undefined
  /** How long the in-flight lease lasts; it is renewed while the effect runs. Default 30 seconds. */
  readonly lease?: Duration.DurationInput | undefined
  /** Default `"fail"`. */
  readonly onInFlight?: OnInFlight | undefined
  /**
   * Run the effect and store its success in one storage transaction, so that the effect's own
   * writes through the same client (an `@effect/sql` `SqlClient`) and the stored result commit
   * together, or roll back together and leave the key free for a retry. Needs a storage with
   * transactions (`SqlStorage`); others fail with `IdempotencyStorageError`. Default `false`.
   */
  readonly transactional?: boolean | undefined
  /**
   * The operation the key belongs to. Records are kept per namespace, so two operations that
   * happen to receive the same key (a payment and a refund keyed by one message id) never replay
   * each other's results. Default: none, the key alone.
   */
  readonly namespace?: string | undefined
  /**
   * The largest encoded result (or stored failure) kept, in bytes. A larger one is not stored:
   * the call fails with `IdempotencyResultNotStored` (`too-large`) and the key is released.
   * Default 4 MiB, which every built-in backend accepts in its default configuration.
   */
  readonly maxResultBytes?: number | undefined
  /**
   * What a call does when the stored record for its key cannot be decoded (the `success` or
   * `failure` schema changed across a deploy, or a newer version wrote it): `"fail"` with
   * `IdempotencyRecordUndecodable` until the record expires, or `"run"`: forget that record and
   * run the effect again. Default `"fail"`: running again may repeat a side effect that already
   * happened.
   */
  readonly onUndecodable?: "fail" | "run" | undefined
}

/**
 * Plain JSON data: what `Idempotent.wrap` stores when it is given no `success` schema, and gives
 * back to a retry exactly as it went in. Anything else (a `Date`, a class instance, a `bigint`, a
 * `Map`, a function) needs a schema to come back as itself.
 *
 * @since 0.1.0
 * @category Models
 */
export type JsonValue =
  | string
  | number
  | boolean
  | null
  | ReadonlyArray<JsonValue>
  | { readonly [key: string]: JsonValue | undefined }

/**
 * `true` when values of type `A` are plain JSON data: strings, finite numbers, booleans, `null`,
 * arrays and plain objects of those (optional properties allowed). `any` passes; `unknown` does
 * not. Recursive types are followed 12 levels deep.
 *
 * A class with no methods has the same type as a plain object, so it passes here; at run time
 * such an instance (like `NaN` or `Infinity`, which TypeScript cannot tell from other numbers) is
 * refused with `IdempotencyResultNotStored` (`unencodable`) instead of being stored as something
 * else.
 *
 * @since 0.1.0
 * @category Models
 */
export type IsJsonValue<A, Depth extends ReadonlyArray<unknown> = []> = 0 extends (1 & A) ? true
  : Depth["length"] extends 12 ? true
  : A extends string | number | boolean | null ? true
  : A extends bigint | symbol | undefined | void ? false
  : A extends (...args: ReadonlyArray<any>) => unknown ? false
  : A extends ReadonlyArray<infer Item> ? IsJsonValue<Item, [...Depth, unknown]>
  : A extends object ? IsJsonObject<A, [...Depth, unknown]>
  : false

type IsJsonObject<A, Depth extends ReadonlyArray<unknown>> = [
  {
    [K in keyof A]-?: K extends string | number ? [IsJsonValue<Exclude<A[K], undefined>, Depth>] extends [true] ? true
      : false
      : false
  }[keyof A]
] extends [true] ? true
  : false

/**
 * The check a call without a `success` schema puts on its effect: nothing when the result is plain
 * JSON data (or `void`), otherwise a required property whose name is the compile error's
 * explanation.
 *
 * @since 0.1.0
 * @category Models
 */
export type RequireJsonResult<A> = [IsJsonValue<Exclude<A, void | undefined>>] extends [true] ? unknown : {
  readonly "Idempotent.wrap: the result is not plain JSON data, so it would not replay as itself. Pass a `success` schema":
    A
}

/**
 * Options of a call that stores its result with a `success` schema.
 *
 * @since 0.1.0
 * @category Models
 */
export interface WrapOptionsWithSchema<A, F> extends WrapOptions<A, F> {
  readonly success: Schema.Schema<A, any, never>
}

/**
 * What {@link wrapWithInfo} succeeds with: the value, and where it came from.
 *
 * @since 0.1.0
 * @category Models
 */
export interface WithInfo<A> {
  readonly value: A
  /** `false` for the call whose run produced the value; `true` for every call that got it from the record. */
  readonly replayed: boolean
  /** The fence of the run that produced the value (the same on the first call and on every replay). */
  readonly fence: number
  /** When that run's result was stored. */
  readonly createdAt: DateTime.Utc
}

const defaultMaxResultBytes = 4 * 1024 * 1024

const make = <A, E, R, F>(
  self: Effect.Effect<A, E, R>,
  options: WrapOptions<A, F>
): Effect.Effect<internal.Completed<A>, E | F | WrapError, Exclude<R, Execution> | Storage.Storage> => {
  const timing = settings.decodeTiming(options)
  const maxResultBytes = settings.decodeByteLimit("maxResultBytes", options.maxResultBytes, defaultMaxResultBytes)
  const codec = ResultCodec.fromSchemas<A, E | F>(options.success, options.failure)
  const namespace = options.namespace === undefined ? undefined : JSON.stringify(options.namespace)
  return tracing.withSpan(
    "Idempotent.wrap",
    () => ({ "idempotency.key_hash": internalFingerprint.keyHash(String(options.key)) }),
    (span) =>
      Effect.suspend(() => {
        if (Either.isLeft(timing)) return Effect.fail(timing.left)
        if (Either.isLeft(maxResultBytes)) return Effect.fail(maxResultBytes.left)
        const key = internalKey.validate(options.key)
        if (Either.isLeft(key)) return Effect.fail(key.left)
        const fingerprint = internalFingerprint.make(options.fingerprint)
        if (Either.isLeft(fingerprint)) {
          return Effect.fail(
            new IdempotencyKeyInvalid({
              key: key.right,
              reason: "unencodable-fingerprint",
              detail: fingerprint.left.detail
            })
          )
        }
        return internal.runCompleted<A, E | F, R>(self, {
          key: key.right,
          namespace,
          maxResultBytes: maxResultBytes.right,
          onUndecodable: options.onUndecodable ?? "fail",
          fingerprint: fingerprint.right,
          codec,
          ttl: timing.right.ttl,
          lease: timing.right.lease,
          wait: timing.right.wait,
          transactional: options.transactional === true,
          span
        })
      })
  )
}

const valueOf = <A>(done: internal.Completed<A>): A => done.value

const withInfo = <A>(done: internal.Completed<A>): WithInfo<A> => ({
  value: done.value,
  replayed: done.replayed,
  fence: done.fence,
  createdAt: DateTime.unsafeMake(done.createdAt)
})

/**
 * Runs the effect at most once per key while its result is kept, and replays the stored result
 * (success, or a failure that `failure` encodes) to every later call. Other failures, defects and
 * interruptions release the key so a retry runs again. Needs a `Storage` layer.
 *
 * Without a `success` schema the result is stored as JSON, so the call only compiles when the
 * result is plain JSON data ({@link JsonValue}): a `Date`, a class instance, a `bigint` or a `Map`
 * would come back as something else, and is a compile error that asks for a schema.
 *
 * @example
 * ```ts
 * import { Effect, Schema } from "effect"
 * import { Idempotent, MemoryStorage } from "effect-idempotency"
 *
 * class Order extends Schema.Class<Order>("Order")({ id: Schema.String, total: Schema.Number }) {}
 * class OutOfStock extends Schema.TaggedError<OutOfStock>()("OutOfStock", { sku: Schema.String }) {}
 *
 * const createOrder = (requestId: string, sku: string) =>
 *   Effect.succeed(new Order({ id: `order-${requestId}`, total: 42 })).pipe(
 *     Idempotent.wrap({
 *       key: requestId,
 *       fingerprint: { sku },
 *       success: Order,
 *       failure: OutOfStock,
 *       onInFlight: { wait: "10 seconds" }
 *     })
 *   )
 *
 * // Plain JSON data needs no schema.
 * const sendReceipt = (orderId: string) =>
 *   Effect.succeed({ sent: true, to: "buyer@example.com" }).pipe(Idempotent.wrap({ key: `receipt-${orderId}` }))
 *
 * const program = Effect.gen(function*() {
 *   const first = yield* createOrder("req-1", "sku-1")
 *   const retry = yield* createOrder("req-1", "sku-1") // replayed, not run again
 *   yield* sendReceipt(first.id)
 *   return [first, retry]
 * })
 *
 * Effect.runPromise(program.pipe(Effect.provide(MemoryStorage.layer())))
 * ```
 *
 * @since 0.1.0
 * @category Combinators
 */
export const wrap: {
  <A, F = never>(
    options: WrapOptionsWithSchema<A, F>
  ): <A2 extends A, E, R>(
    self: Effect.Effect<A2, E, R>
  ) => Effect.Effect<A2, E | F | WrapError, Exclude<R, Execution> | Storage.Storage>
  <A = unknown, F = never>(
    options: WrapOptions<A, F>
  ): <A2 extends A, E, R>(
    self: Effect.Effect<A2, E, R> & RequireJsonResult<A2>
  ) => Effect.Effect<A2, E | F | WrapError, Exclude<R, Execution> | Storage.Storage>
  <A, E, R, F = never>(
    self: Effect.Effect<A, E, R>,
    options: WrapOptionsWithSchema<NoInfer<A>, F>
  ): Effect.Effect<A, E | F | WrapError, Exclude<R, Execution> | Storage.Storage>
  <A, E, R, F = never>(
    self: Effect.Effect<A, E, R> & RequireJsonResult<A>,
    options: WrapOptions<NoInfer<A>, F>
  ): Effect.Effect<A, E | F | WrapError, Exclude<R, Execution> | Storage.Storage>
} = dual(
  2,
  <A, E, R, F>(self: Effect.Effect<A, E, R>, options: WrapOptions<A, F>) => Effect.map(make(self, options), valueOf)
)

/**
 * {@link wrap}, succeeding with the value and whether it was replayed: `{ value, replayed, fence,
 * createdAt }`. What the HTTP middleware's `Idempotent-Replayed` header says to an HTTP client,
 * for a queue consumer, a job or a test: log a redelivery, count duplicates, skip a notification
 * that the first run already sent. A stored failure is replayed as the failure itself, as with
 * `wrap`.
 *
 * @example
 * ```ts
 * import { Effect } from "effect"
 * import { Idempotent, MemoryStorage } from "effect-idempotency"
 *
 * const handleMessage = (messageId: string) =>
 *   Effect.succeed({ charged: 42 }).pipe(
 *     Idempotent.wrapWithInfo({ key: messageId }),
 *     Effect.tap(({ fence, replayed }) =>
 *       replayed ? Effect.log(`redelivery of ${messageId}, already handled by run ${fence}`) : Effect.void
 *     )
 *   )
 *
 * Effect.runPromise(
 *   Effect.zip(handleMessage("msg-1"), handleMessage("msg-1")).pipe(Effect.provide(MemoryStorage.layer()))
 * ) // [{ value: { charged: 42 }, replayed: false, ... }, { value: { charged: 42 }, replayed: true, ... }]
 * ```
 *
 * @since 0.1.0
 * @category Combinators
 */
export const wrapWithInfo: {
  <A, F = never>(
    options: WrapOptionsWithSchema<A, F>
  ): <A2 extends A, E, R>(
    self: Effect.Effect<A2, E, R>
  ) => Effect.Effect<WithInfo<A2>, E | F | WrapError, Exclude<R, Execution> | Storage.Storage>
  <A = unknown, F = never>(
    options: WrapOptions<A, F>
  ): <A2 extends A, E, R>(
    self: Effect.Effect<A2, E, R> & RequireJsonResult<A2>
  ) => Effect.Effect<WithInfo<A2>, E | F | WrapError, Exclude<R, Execution> | Storage.Storage>
  <A, E, R, F = never>(
    self: Effect.Effect<A, E, R>,
    options: WrapOptionsWithSchema<NoInfer<A>, F>
  ): Effect.Effect<WithInfo<A>, E | F | WrapError, Exclude<R, Execution> | Storage.Storage>
  <A, E, R, F = never>(
    self: Effect.Effect<A, E, R> & RequireJsonResult<A>,
    options: WrapOptions<NoInfer<A>, F>
  ): Effect.Effect<WithInfo<A>, E | F | WrapError, Exclude<R, Execution> | Storage.Storage>
} = dual(
  2,
  <A, E, R, F>(self: Effect.Effect<A, E, R>, options: WrapOptions<A, F>) => Effect.map(make(self, options), withInfo)
)
