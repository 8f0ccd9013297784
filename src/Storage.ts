/**
 * The storage protocol that `Idempotent.wrap` runs on.
 *
 * Each method is one step of the protocol, and on the built-in backends one round trip:
 *
 * - `acquire` atomically answers one of: acquired (a lease with its owner token and fence), in
 *   flight (someone else holds the lease), or completed (the stored record).
 * - `renew`, `commit` and `release` act only if the caller's token still owns the lease.
 * - `read` and `delete` look at or forget a completed record.
 * - `watch` subscribes to a key, so a waiter is woken when it is committed or released.
 *
 * Custom backends can implement {@link Storage} directly, or the simpler {@link BasicStorage} of
 * the original design and turn it into a full storage with {@link fromBasic}.
 *
 * @since 0.1.0
 */
import * as Clock from "effect/Clock"
import * as Context from "effect/Context"
import * as Data from "effect/Data"
import * as Duration from "effect/Duration"
import * as Effect from "effect/Effect"
import * as Option from "effect/Option"
import type * as Scope from "effect/Scope"
import type { IdempotencyStorageError } from "./IdempotencyError.js"
import type { IdempotencyRecord, Outcome } from "./IdempotencyRecord.js"
import * as internalToken from "./internal/token.js"

/**
 * A lease on a key, held by the caller that acquired it. `token` proves ownership to `renew`,
 * `commit` and `release`; `fence` grows with every new owner of the key.
 *
 * @since 0.1.0
 * @category Models
 */
export interface Lease {
  readonly key: string
  readonly fingerprint: string
  readonly token: string
  readonly fence: number
}

/**
 * What `acquire` asks for.
 *
 * @since 0.1.0
 * @category Models
 */
export interface AcquireRequest {
  readonly key: string
  /** SHA-256 (hex) of the canonical fingerprint, or `""`. Kept with the lease. */
  readonly fingerprint: string
  /** How long the lease lasts unless renewed. */
  readonly lease: Duration.Duration
}

/**
 * The one answer of an atomic acquire.
 *
 * `InFlight.fingerprint` is the holder's fingerprint, or `undefined` when the backend cannot tell
 * (a {@link BasicStorage} between its lock and its marker write).
 *
 * @since 0.1.0
 * @category Models
 */
export type AcquireResult = Data.TaggedEnum<{
  Acquired: { readonly lease: Lease }
  InFlight: { readonly fingerprint: string | undefined; readonly leaseRemaining: Duration.Duration }
  Completed: { readonly record: IdempotencyRecord }
}>

/**
 * Constructors and matchers for {@link AcquireResult}.
 *
 * @since 0.1.0
 * @category Constructors
 */
export const AcquireResult = Data.taggedEnum<AcquireResult>()

/**
 * What `commit` stores.
 *
 * @since 0.1.0
 * @category Models
 */
export interface CommitRequest {
  readonly outcome: Outcome
  readonly payload: Uint8Array
  /** How long the completed record is replayed. */
  readonly ttl: Duration.Duration
}

/**
 * What a backend guarantees. The built-in backends guarantee all of it; a storage made by
 * {@link fromBasic} cannot, and says so here, so that `Idempotent.wrap` and the conformance suite
 * treat it accordingly.
 *
 * @since 0.1.0
 * @category Models
 */
export interface Capabilities {
  /** The lease can be extended while the effect runs. Without it the lease is a hard deadline. */
  readonly renewal: boolean
  /** Fences grow with every new owner of a key. Without it every fence is `0`. */
  readonly fencing: boolean
  /** `commit` stores only if the token still owns the lease, in the same atomic step. */
  readonly ownedCommit: boolean
  /** `watch` is woken by the store. Without it, `watch` polls. */
  readonly notification: boolean
}

/**
 * The brand every `StorageService` carries.
 *
 * @since 0.1.0
 * @category Type IDs
 */
export const TypeId: unique symbol = Symbol.for("effect-idempotency/Storage")

/**
 * The type of `TypeId`.
 *
 * @since 0.1.0
 * @category Type IDs
 */
export type TypeId = typeof TypeId

/**
 * The storage protocol a backend implements: acquire a lease on a key, renew it, commit the result,
 * release, read and delete records, and watch a key until it changes.
 *
 * @since 0.1.0
 * @category Models
 */
export interface StorageService {
  readonly [TypeId]: TypeId
  /** A short name for spans and metrics: `memory`, `redis`, `pg`, ... */
  readonly backend: string
  readonly capabilities: Capabilities
  /** One atomic step: acquired, in flight, or completed. Expired leases and records count as absent. */
  readonly acquire: (request: AcquireRequest) => Effect.Effect<AcquireResult, IdempotencyStorageError>
  /** Extends the lease to `lease` from now. `false` when the token no longer owns the key. */
  readonly renew: (lease: Lease, duration: Duration.Duration) => Effect.Effect<boolean, IdempotencyStorageError>
  /** Stores the result and drops the lease. `false` (nothing stored) when the token no longer owns the key. */
  readonly commit: (lease: Lease, request: CommitRequest) => Effect.Effect<boolean, IdempotencyStorageError>
  /** Drops the lease so the key can be acquired at once. `false` when the token no longer owned it. */
  readonly release: (lease: Lease) => Effect.Effect<boolean, IdempotencyStorageError>
  /** The completed record of a key, if it is still kept. */
  readonly read: (key: string) => Effect.Effect<Option.Option<IdempotencyRecord>, IdempotencyStorageError>
  /**
   * Forgets a key: its record and any lease on it. With `fence`, forgets only a completed record
   * carrying that fence, in one atomic step, and leaves anything else (a lease, a newer record)
   * alone: `Idempotent.wrap({ onUndecodable: "run" })` drops a record it cannot read this way,
   * so that two callers doing so at once cannot drop the record the first one's new run stored.
   */
  readonly delete: (key: string, fence?: number | undefined) => Effect.Effect<void, IdempotencyStorageError>
  /**
   * Subscribes to a key for the life of the scope. The returned effect completes once the key may
   * have changed (committed, released, deleted) after the subscription began. Subscribe, then
   * check, then await: that order misses no change.
   */
  readonly watch: (key: string) => Effect.Effect<Effect.Effect<void>, IdempotencyStorageError, Scope.Scope>
  /**
   * Runs an effect in one storage transaction, for `Idempotent.wrap({ transactional: true })`: the
   * wrapped effect's own writes through the same client and the `commit` of its result land
   * together or not at all. Only stores that share a client with the application have it (SQL).
   * Every other method runs outside any such transaction, so that other callers see the lease.
   */
  readonly transaction?: <A, E, R>(self: Effect.Effect<A, E, R>) => Effect.Effect<A, E | IdempotencyStorageError, R>
}

/**
 * The storage service. Provide one of the backends' layers at the edge of the application.
 *
 * @since 0.1.0
 * @category Tags
 */
export class Storage extends Context.Tag("effect-idempotency/Storage")<Storage, StorageService>() {}

/**
 * Builds a {@link StorageService}, adding the type id.
 *
 * @example
 * ```ts
 * import { Effect } from "effect"
 * import { MemoryStorage, Storage } from "effect-idempotency"
 *
 * // A storage that counts acquisitions and leaves the rest to memory storage.
 * const makeCounting = Effect.gen(function*() {
 *   const inner = yield* MemoryStorage.make()
 *   let acquisitions = 0
 *   const storage = Storage.make({
 *     ...inner,
 *     backend: "counting-memory",
 *     acquire: (request) => Effect.suspend(() => (acquisitions++, inner.acquire(request)))
 *   })
 *   return { storage, acquisitions: () => acquisitions }
 * })
 * ```
 *
 * @since 0.1.0
 * @category Constructors
 */
export const make = (service: Omit<StorageService, TypeId>): StorageService => ({ [TypeId]: TypeId, ...service })

/**
 * An opaque lock token returned by {@link BasicStorage.tryLock}.
 *
 * @since 0.1.0
 * @category Models
 */
export type LockToken = string

/**
 * The simple storage interface of the original design, for custom backends (MongoDB, DynamoDB,
 * ...). {@link fromBasic} turns it into a {@link StorageService}.
 *
 * @since 0.1.0
 * @category Models
 */
export interface BasicStorage {
  readonly get: (key: string) => Effect.Effect<Option.Option<IdempotencyRecord>, IdempotencyStorageError>
  /** Stores a record for `ttl`, replacing any record of the same key. */
  readonly set: (record: IdempotencyRecord, ttl: Duration.Duration) => Effect.Effect<void, IdempotencyStorageError>
  readonly delete: (key: string) => Effect.Effect<void, IdempotencyStorageError>
  readonly exists: (key: string) => Effect.Effect<boolean, IdempotencyStorageError>
  /** Takes a lock that expires after `ttl`, or `None` when someone holds it. */
  readonly tryLock: (
    key: string,
    ttl: Duration.Duration
  ) => Effect.Effect<Option.Option<LockToken>, IdempotencyStorageError>
  /** Drops the lock if `token` holds it; `true` when it did. */
  readonly unlock: (key: string, token: LockToken) => Effect.Effect<boolean, IdempotencyStorageError>
}

/**
 * Options for {@link fromBasic}.
 *
 * @since 0.1.0
 * @category Models
 */
export interface FromBasicOptions {
  /** Name for spans and metrics. Default `"basic"`. */
  readonly backend?: string | undefined
  /** How often `watch` polls, since a basic store cannot notify. Default 50 millis. */
  readonly pollInterval?: Duration.DurationInput | undefined
}

// Valid keys never hold control characters, so this suffix cannot collide with a caller's key.
const markerKey = (key: string) => `${key}\u001fin-flight`

/**
 * Builds a full storage from a {@link BasicStorage}.
 *
 * What a basic store cannot give, stated in its {@link Capabilities}:
 *
 * - **No renewal.** The lock's TTL is a hard deadline: an effect still running when its lease
 *   ends is interrupted and fails with `IdempotencyLeaseLost`. Choose a `lease` longer than the
 *   slowest run.
 * - **No fencing.** Every fence is `0`.
 * - **Commit is not owner-checked in one step.** It writes the record, then unlocks. So that a
 *   holder never writes over a newer owner's record, `Idempotent.wrap` counts the lease from
 *   before the acquire was sent, interrupts the run a safety margin (a fifth of the lease, at most
 *   2 seconds) before the lock can expire, and does not start a commit past that point. What
 *   remains is a commit that starts inside the margin and takes longer than the rest of it to
 *   land: keep the store's latency well under the margin.
 * - **Waiting polls** every `pollInterval`.
 * - **More round trips.** Acquire reads the record, takes the lock, reads again (a commit may have
 *   landed in between), then writes an in-flight marker that carries the fingerprint.
 *
 * @example
 * ```ts
 * import { Clock, Duration, Effect, Layer, Option } from "effect"
 * import { type IdempotencyRecord, Storage } from "effect-idempotency"
 *
 * // A basic store over two Maps with expiry; a document store (MongoDB, DynamoDB...) has the same shape.
 * const records = new Map<string, { readonly record: IdempotencyRecord.IdempotencyRecord; readonly until: number }>()
 * const locks = new Map<string, { readonly token: string; readonly until: number }>()
 *
 * const basic: Storage.BasicStorage = {
 *   get: (key) =>
 *     Effect.map(Clock.currentTimeMillis, (now) => {
 *       const entry = records.get(key)
 *       return entry !== undefined && entry.until > now ? Option.some(entry.record) : Option.none()
 *     }),
 *   set: (record, ttl) =>
 *     Effect.map(Clock.currentTimeMillis, (now) => {
 *       records.set(record.key, { record, until: now + Duration.toMillis(ttl) })
 *     }),
 *   delete: (key) => Effect.sync(() => void records.delete(key)),
 *   exists: (key) => Effect.map(Clock.currentTimeMillis, (now) => (records.get(key)?.until ?? 0) > now),
 *   tryLock: (key, ttl) =>
 *     Effect.map(Clock.currentTimeMillis, (now) => {
 *       if ((locks.get(key)?.until ?? 0) > now) return Option.none()
 *       const token = Storage.makeToken()
 *       locks.set(key, { token, until: now + Duration.toMillis(ttl) })
 *       return Option.some(token)
 *     }),
 *   unlock: (key, token) =>
 *     Effect.map(Clock.currentTimeMillis, (now) => {
 *       const held = locks.get(key)
 *       if (held === undefined || held.token !== token || held.until <= now) return false
 *       locks.delete(key)
 *       return true
 *     })
 * }
 *
 * const MapStorageLive = Layer.succeed(Storage.Storage, Storage.fromBasic(basic, { backend: "map" }))
 * ```
 *
 * @since 0.1.0
 * @category Constructors
 */
export const fromBasic = (basic: BasicStorage, options?: FromBasicOptions): StorageService => {
  const pollInterval = Duration.decode(options?.pollInterval ?? Duration.millis(50))

  const readLive = (key: string) =>
    Effect.flatMap(
      basic.get(key),
      (record) =>
        Effect.map(Clock.currentTimeMillis, (now) => Option.filter(record, (record) => record.expiresAt > now))
    )

  const acquire = (request: AcquireRequest): Effect.Effect<AcquireResult, IdempotencyStorageError> =>
    Effect.flatMap(readLive(request.key), (existing): Effect.Effect<AcquireResult, IdempotencyStorageError> => {
      if (Option.isSome(existing)) return Effect.succeed(AcquireResult.Completed({ record: existing.value }))
      return Effect.flatMap(
        basic.tryLock(request.key, request.lease),
        (lock): Effect.Effect<AcquireResult, IdempotencyStorageError> => {
          if (Option.isNone(lock)) {
            return Effect.map(
              Effect.zip(basic.get(markerKey(request.key)), Clock.currentTimeMillis),
              ([marker, now]) =>
                AcquireResult.InFlight({
                  fingerprint: Option.getOrUndefined(Option.map(marker, (marker) => marker.fingerprint)),
                  leaseRemaining: Option.match(marker, {
                    onNone: () => request.lease,
                    onSome: (marker) => Duration.millis(Math.max(0, marker.expiresAt - now))
                  })
                })
            )
          }
          const token = lock.value
          return Effect.flatMap(
            readLive(request.key),
            (committedMeanwhile): Effect.Effect<AcquireResult, IdempotencyStorageError> => {
              if (Option.isSome(committedMeanwhile)) {
                return Effect.as(
                  basic.unlock(request.key, token),
                  AcquireResult.Completed({ record: committedMeanwhile.value })
                )
              }
              return Effect.flatMap(Clock.currentTimeMillis, (now) =>
                Effect.as(
                  basic.set({
                    key: markerKey(request.key),
                    fingerprint: request.fingerprint,
                    outcome: "success",
                    payload: new Uint8Array(0),
                    fence: 0,
                    createdAt: now,
                    expiresAt: now + Duration.toMillis(request.lease)
                  }, request.lease),
                  AcquireResult.Acquired({
                    lease: { key: request.key, fingerprint: request.fingerprint, token, fence: 0 }
                  })
                ))
            }
          )
        }
      )
    })

  const release = (lease: Lease) =>
    Effect.tap(
      basic.unlock(lease.key, lease.token),
      (owned) => owned ? basic.delete(markerKey(lease.key)) : Effect.void
    )

  return make({
    backend: options?.backend ?? "basic",
    capabilities: { renewal: false, fencing: false, ownedCommit: false, notification: false },
    acquire,
    renew: () => Effect.succeed(false),
    commit: (lease, request) =>
      Effect.flatMap(Clock.currentTimeMillis, (now) =>
        Effect.zipRight(
          basic.set({
            key: lease.key,
            fingerprint: lease.fingerprint,
            outcome: request.outcome,
            payload: request.payload,
            fence: lease.fence,
            createdAt: now,
            expiresAt: now + Duration.toMillis(request.ttl)
          }, request.ttl),
          release(lease)
        )),
    release,
    read: readLive,
    // A basic store cannot compare and delete in one step: the fence is checked on a read first.
    delete: (key, fence) =>
      fence === undefined
        ? Effect.zipRight(basic.delete(key), basic.delete(markerKey(key)))
        : Effect.flatMap(
          basic.get(key),
          (record) => Option.isSome(record) && record.value.fence === fence ? basic.delete(key) : Effect.void
        ),
    watch: () => Effect.succeed(Effect.sleep(pollInterval))
  })
}

/**
 * A fresh random owner token, for backends that mint their own.
 *
 * @example
 * ```ts
 * import { Storage } from "effect-idempotency"
 *
 * const token = Storage.makeToken() // a new random string on every call
 * ```
 *
 * @since 0.1.0
 * @category Constructors
 */
export const makeToken: () => string = internalToken.make
