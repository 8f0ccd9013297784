/**
 * The typed failures of `effect-idempotency`.
 *
 * Every error carries the idempotency `key` it concerns, so a caller can log or branch on it, and
 * a stable `_tag` that the HTTP middleware maps to a status code.
 *
 * @since 0.1.0
 */
import * as Duration from "effect/Duration"
import * as Predicate from "effect/Predicate"
import * as Schema from "effect/Schema"

/**
 * The brand every error of this module carries, which `isIdempotencyError` tests.
 *
 * @since 0.1.0
 * @category Type IDs
 */
export const TypeId: unique symbol = Symbol.for("effect-idempotency/IdempotencyError")

/**
 * The type of `TypeId`, the brand every error of this module carries.
 *
 * @since 0.1.0
 * @category Type IDs
 */
export type TypeId = typeof TypeId

/**
 * Tells whether a value is one of this library's errors.
 *
 * @example
 * ```ts
 * import { Effect } from "effect"
 * import { IdempotencyError, Idempotent, MemoryStorage } from "effect-idempotency"
 *
 * const program = Effect.succeed("done").pipe(
 *   Idempotent.wrap({ key: "" }),
 *   Effect.catchIf(IdempotencyError.isIdempotencyError, (error) => Effect.succeed(`refused: ${error._tag}`)),
 *   Effect.provide(MemoryStorage.layer())
 * )
 *
 * Effect.runPromise(program).then(console.log) // refused: IdempotencyKeyInvalid
 * ```
 *
 * @since 0.1.0
 * @category Refinements
 */
export const isIdempotencyError = (u: unknown): u is IdempotencyError => Predicate.hasProperty(u, TypeId)

/**
 * HTTP only: the route requires an idempotency key and the request had none.
 *
 * @since 0.1.0
 * @category Errors
 */
export class IdempotencyKeyMissing extends Schema.TaggedError<IdempotencyKeyMissing>(
  "effect-idempotency/IdempotencyKeyMissing"
)("IdempotencyKeyMissing", {
  key: Schema.String
}) {
  /**
   * Brands the error for `isIdempotencyError`.
   *
   * @since 0.1.0
   */
  readonly [TypeId]: TypeId = TypeId

  /**
   * What went wrong, in words, with what to do about it where there is something to do.
   *
   * @since 0.1.0
   */
  get message(): string {
    return "An idempotency key is required for this request"
  }
}

/**
 * Why a key, or the request around it, was refused before storage was touched.
 *
 * - `empty`, `too-long`, `control-character`: the key itself.
 * - `malformed-header`: HTTP only, the header is not a token or a valid quoted string.
 * - `duplicate-header`: HTTP only, the header was sent more than once.
 * - `unencodable-fingerprint`: the fingerprint is not a JSON-like value (a bigint, a function, a cycle).
 * - `invalid-unicode`: the key holds a lone surrogate, which storage encodings (UTF-8) would
 *   replace, so two different keys would share one record.
 *
 * @since 0.1.0
 * @category Errors
 */
export const KeyInvalidReason = Schema.Literal(
  "empty",
  "too-long",
  "control-character",
  "malformed-header",
  "duplicate-header",
  "unencodable-fingerprint",
  "invalid-unicode"
)

/**
 * Why a key was refused: one of the `KeyInvalidReason` literals.
 *
 * @since 0.1.0
 * @category Errors
 */
export type KeyInvalidReason = typeof KeyInvalidReason.Type

/**
 * The key cannot be used: see `reason`.
 *
 * @since 0.1.0
 * @category Errors
 */
export class IdempotencyKeyInvalid extends Schema.TaggedError<IdempotencyKeyInvalid>(
  "effect-idempotency/IdempotencyKeyInvalid"
)("IdempotencyKeyInvalid", {
  key: Schema.String,
  reason: KeyInvalidReason,
  detail: Schema.String
}) {
  /**
   * Brands the error for `isIdempotencyError`.
   *
   * @since 0.1.0
   */
  readonly [TypeId]: TypeId = TypeId

  /**
   * What went wrong, in words, with what to do about it where there is something to do.
   *
   * @since 0.1.0
   */
  get message(): string {
    return `Invalid idempotency key (${this.reason}): ${this.detail}`
  }
}

/**
 * The key was used before with a different fingerprint (another request body, another input).
 * This wins over {@link IdempotencyInFlight}: a mismatch is reported even while the first run is
 * still going.
 *
 * @since 0.1.0
 * @category Errors
 */
export class IdempotencyKeyReused extends Schema.TaggedError<IdempotencyKeyReused>(
  "effect-idempotency/IdempotencyKeyReused"
)("IdempotencyKeyReused", {
  key: Schema.String
}) {
  /**
   * Brands the error for `isIdempotencyError`.
   *
   * @since 0.1.0
   */
  readonly [TypeId]: TypeId = TypeId

  /**
   * What went wrong, in words, with what to do about it where there is something to do.
   *
   * @since 0.1.0
   */
  get message(): string {
    return "The idempotency key was already used with a different request"
  }
}

/**
 * The first run for the key is still in flight. `retryAfter` is how long its lease has left: a
 * holder that is alive renews it and may finish at any moment, so a retry can succeed sooner; a
 * holder that stopped (a crashed process) frees the key by then at the latest.
 *
 * @since 0.1.0
 * @category Errors
 */
export class IdempotencyInFlight extends Schema.TaggedError<IdempotencyInFlight>(
  "effect-idempotency/IdempotencyInFlight"
)("IdempotencyInFlight", {
  key: Schema.String,
  retryAfter: Schema.DurationFromMillis
}) {
  /**
   * Brands the error for `isIdempotencyError`.
   *
   * @since 0.1.0
   */
  readonly [TypeId]: TypeId = TypeId

  /**
   * What went wrong, in words, with what to do about it where there is something to do.
   *
   * @since 0.1.0
   */
  get message(): string {
    return "The first call with this idempotency key is still running: retry once it finishes " +
      `(if its holder has stopped, the key frees within ${Duration.format(this.retryAfter)})`
  }
}

/**
 * The holder's lease expired or was taken over before it could commit: its result was not stored.
 *
 * @since 0.1.0
 * @category Errors
 */
export class IdempotencyLeaseLost extends Schema.TaggedError<IdempotencyLeaseLost>(
  "effect-idempotency/IdempotencyLeaseLost"
)("IdempotencyLeaseLost", {
  key: Schema.String,
  fence: Schema.Number
}) {
  /**
   * Brands the error for `isIdempotencyError`.
   *
   * @since 0.1.0
   */
  readonly [TypeId]: TypeId = TypeId

  /**
   * What went wrong, in words, with what to do about it where there is something to do.
   *
   * @since 0.1.0
   */
  get message(): string {
    return "The idempotency lease was lost before the result could be stored"
  }
}

/**
 * The step of the storage protocol that failed: the steps of `Storage` (`acquire`, `renew`,
 * `commit`, `release`, `read`, `delete`, `watch`), `transaction` for a `transactional` run,
 * `cleanup` for a backend's sweep of expired records, and the
 * steps of the basic interface that `Storage.fromBasic` adapts (`get`, `set`, `exists`, `tryLock`,
 * `unlock`).
 *
 * @since 0.1.0
 * @category Errors
 */
export const StorageOperation = Schema.Literal(
  "acquire",
  "renew",
  "commit",
  "release",
  "read",
  "delete",
  "watch",
  "transaction",
  "cleanup",
  "get",
  "set",
  "exists",
  "tryLock",
  "unlock"
)

/**
 * The storage step that failed: one of the `StorageOperation` literals.
 *
 * @since 0.1.0
 * @category Errors
 */
export type StorageOperation = typeof StorageOperation.Type

/**
 * The storage failed or could not be reached. `operation` names the protocol step (`acquire`,
 * `commit`, ...) and `cause` keeps the backend's own error. `retryable: false` marks a failure
 * that trying again cannot fix (a value larger than the store accepts, say): a commit that fails
 * so is not retried.
 *
 * @since 0.1.0
 * @category Errors
 */
export class IdempotencyStorageError extends Schema.TaggedError<IdempotencyStorageError>(
  "effect-idempotency/IdempotencyStorageError"
)("IdempotencyStorageError", {
  key: Schema.String,
  operation: StorageOperation,
  cause: Schema.optional(Schema.Defect),
  retryable: Schema.optional(Schema.Boolean)
}) {
  /**
   * Brands the error for `isIdempotencyError`.
   *
   * @since 0.1.0
   */
  readonly [TypeId]: TypeId = TypeId

  /**
   * What went wrong, in words, with what to do about it where there is something to do.
   *
   * @since 0.1.0
   */
  get message(): string {
    const cause = this.cause instanceof Error ? `: ${this.cause.message}` : ""
    return `Idempotency storage failed during ${this.operation}${cause}`
  }
}

/**
 * A storage layer could not be built: its options are wrong, its server cannot be reached or is
 * configured unsafely, or the schema it needs is missing or out of date. It fails the layer, so
 * the app does not start rather than serving calls it cannot keep idempotent. `backend` names the
 * storage, `detail` says what to fix and `cause` keeps the underlying error.
 *
 * @since 0.1.0
 * @category Errors
 */
export class IdempotencyStorageSetupError extends Schema.TaggedError<IdempotencyStorageSetupError>(
  "effect-idempotency/IdempotencyStorageSetupError"
)("IdempotencyStorageSetupError", {
  backend: Schema.String,
  detail: Schema.String,
  cause: Schema.optional(Schema.Defect)
}) {
  /**
   * Brands the error for `isIdempotencyError`.
   *
   * @since 0.1.0
   */
  readonly [TypeId]: TypeId = TypeId

  /**
   * What went wrong, in words, with what to do about it where there is something to do.
   *
   * @since 0.1.0
   */
  get message(): string {
    const cause = this.cause instanceof Error && !this.detail.includes(this.cause.message) ?
      ` (${this.cause.message})` :
      ""
    return `Cannot set up the ${this.backend} idempotency storage: ${this.detail}${cause}`
  }
}

/**
 * Why a run's result was not kept.
 *
 * - `too-large`: its encoded form is larger than `maxResultBytes`.
 * - `unencodable`: the `success` (or `failure`) schema could not encode it.
 * - `storage-failed`: the store refused or could not be reached while the lease held.
 *
 * @since 0.1.0
 * @category Errors
 */
export const ResultNotStoredReason = Schema.Literal("too-large", "unencodable", "storage-failed")

/**
 * Why a result was not stored: one of the `ResultNotStoredReason` literals.
 *
 * @since 0.1.0
 * @category Errors
 */
export type ResultNotStoredReason = typeof ResultNotStoredReason.Type

/**
 * The effect ran, but its result could not be stored, so no retry can replay it. The caller is
 * told instead of being handed a value that a retry would not see: a retry may run the effect
 * again (once the key is free), so treat the outcome as unknown to everyone but this caller.
 *
 * @since 0.1.0
 * @category Errors
 */
export class IdempotencyResultNotStored extends Schema.TaggedError<IdempotencyResultNotStored>(
  "effect-idempotency/IdempotencyResultNotStored"
)("IdempotencyResultNotStored", {
  key: Schema.String,
  reason: ResultNotStoredReason,
  detail: Schema.String,
  cause: Schema.optional(Schema.Defect)
}) {
  /**
   * Brands the error for `isIdempotencyError`.
   *
   * @since 0.1.0
   */
  readonly [TypeId]: TypeId = TypeId

  /**
   * What went wrong, in words, with what to do about it where there is something to do.
   *
   * @since 0.1.0
   */
  get message(): string {
    return `The run's result was not stored (${this.reason}): ${this.detail}`
  }
}

/**
 * A stored record for the key could not be read back: written by another schema (a deploy
 * changed it), by a newer version of this library, or damaged. By default the call fails with
 * this error until the record expires; `onUndecodable: "run"` forgets the record and runs again.
 *
 * @since 0.1.0
 * @category Errors
 */
export class IdempotencyRecordUndecodable extends Schema.TaggedError<IdempotencyRecordUndecodable>(
  "effect-idempotency/IdempotencyRecordUndecodable"
)("IdempotencyRecordUndecodable", {
  key: Schema.String,
  cause: Schema.optional(Schema.Defect)
}) {
  /**
   * Brands the error for `isIdempotencyError`.
   *
   * @since 0.1.0
   */
  readonly [TypeId]: TypeId = TypeId

  /**
   * What went wrong, in words, with what to do about it where there is something to do.
   *
   * @since 0.1.0
   */
  get message(): string {
    const cause = this.cause instanceof Error ? `: ${this.cause.message}` : ""
    return `The stored result for this idempotency key cannot be decoded${cause}`
  }
}

/**
 * An option makes no sense (a zero lease, a `ttl` shorter than the lease, ...). `option` names it.
 *
 * @since 0.1.0
 * @category Errors
 */
export class IdempotencyOptionsInvalid extends Schema.TaggedError<IdempotencyOptionsInvalid>(
  "effect-idempotency/IdempotencyOptionsInvalid"
)("IdempotencyOptionsInvalid", {
  option: Schema.String,
  detail: Schema.String
}) {
  /**
   * Brands the error for `isIdempotencyError`.
   *
   * @since 0.1.0
   */
  readonly [TypeId]: TypeId = TypeId

  /**
   * What went wrong, in words, with what to do about it where there is something to do.
   *
   * @since 0.1.0
   */
  get message(): string {
    return `Invalid idempotency option \`${this.option}\`: ${this.detail}`
  }
}

/**
 * Any error of this module. Narrow it with `isIdempotencyError`, or handle each tag with
 * `Effect.catchTags`.
 *
 * @since 0.1.0
 * @category Errors
 */
export type IdempotencyError =
  | IdempotencyKeyMissing
  | IdempotencyKeyInvalid
  | IdempotencyKeyReused
  | IdempotencyInFlight
  | IdempotencyLeaseLost
  | IdempotencyStorageError
  | IdempotencyResultNotStored
  | IdempotencyRecordUndecodable
  | IdempotencyOptionsInvalid
  | IdempotencyStorageSetupError

/**
 * What `Idempotent.wrap` can fail with, besides the wrapped effect's own failures: every error
 * above except `IdempotencyKeyMissing` (HTTP only: `wrap` always has a key) and
 * `IdempotencyStorageSetupError` (raised when a storage layer is built, not by a call).
 *
 * @since 0.1.0
 * @category Errors
 */
export type WrapError =
  | IdempotencyKeyInvalid
  | IdempotencyKeyReused
  | IdempotencyInFlight
  | IdempotencyLeaseLost
  | IdempotencyStorageError
  | IdempotencyResultNotStored
  | IdempotencyRecordUndecodable
  | IdempotencyOptionsInvalid

/**
 * The schema of every error above, for APIs that declare their failures.
 *
 * @since 0.1.0
 * @category Schemas
 */
export const IdempotencyError: Schema.Union<[
  typeof IdempotencyKeyMissing,
  typeof IdempotencyKeyInvalid,
  typeof IdempotencyKeyReused,
  typeof IdempotencyInFlight,
  typeof IdempotencyLeaseLost,
  typeof IdempotencyStorageError,
  typeof IdempotencyResultNotStored,
  typeof IdempotencyRecordUndecodable,
  typeof IdempotencyOptionsInvalid,
  typeof IdempotencyStorageSetupError
]> = Schema.Union(
  IdempotencyKeyMissing,
  IdempotencyKeyInvalid,
  IdempotencyKeyReused,
  IdempotencyInFlight,
  IdempotencyLeaseLost,
  IdempotencyStorageError,
  IdempotencyResultNotStored,
  IdempotencyRecordUndecodable,
  IdempotencyOptionsInvalid,
  IdempotencyStorageSetupError
)
