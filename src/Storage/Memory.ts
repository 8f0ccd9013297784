/**
 * In-memory storage for one process: the default for development, tests and single-instance
 * services. Time comes from `Clock`, so `TestClock` drives leases and TTLs.
 *
 * @since 0.1.0
 */
import * as Clock from "effect/Clock"
import * as Config from "effect/Config"
import type { ConfigError } from "effect/ConfigError"
import * as Deferred from "effect/Deferred"
import * as Duration from "effect/Duration"
import * as Effect from "effect/Effect"
import * as FiberId from "effect/FiberId"
import * as Layer from "effect/Layer"
import * as Option from "effect/Option"
import * as Schedule from "effect/Schedule"
import type * as Scope from "effect/Scope"
import { IdempotencyStorageError } from "../IdempotencyError.js"
import type { IdempotencyRecord } from "../IdempotencyRecord.js"
import * as internalDiagnostics from "../internal/diagnostics.js"
import * as internalToken from "../internal/token.js"
import * as Storage from "../Storage.js"

/**
 * Options of the in-memory storage layer.
 *
 * @since 0.1.0
 * @category Models
 */
export interface MemoryStorageOptions {
  /**
   * The most keys kept at once. When full, the oldest completed records are evicted first; an
   * in-flight key is never evicted, and an acquire that finds only in-flight keys fails with
   * `IdempotencyStorageError`. Default 100,000.
   */
  readonly maxEntries?: number | undefined
  /** How often expired records are swept. Expired records are never replayed either way. Default 1 minute. */
  readonly sweepInterval?: Duration.DurationInput | undefined
}

interface InFlightEntry {
  readonly fingerprint: string
  readonly token: string
  readonly fence: number
  leaseExpiresAt: number
}

/**
 * Builds a memory storage whose sweeper lives as long as the scope.
 *
 * Every operation reads the clock, then changes the maps in one synchronous step: JavaScript runs
 * one fiber at a time, so each step is atomic without a lock, and cheaper than a `Ref` of an
 * immutable map would be on the hot path.
 *
 * @example
 * ```ts
 * import { Effect } from "effect"
 * import { Idempotent, MemoryStorage, Storage } from "effect-idempotency"
 *
 * const program = Effect.scoped(
 *   Effect.gen(function*() {
 *     const storage = yield* MemoryStorage.make({ maxEntries: 10_000 })
 *     return yield* Effect.succeed(42).pipe(
 *       Idempotent.wrap({ key: "job-1" }),
 *       Effect.provideService(Storage.Storage, storage)
 *     )
 *   })
 * )
 *
 * Effect.runPromise(program).then(console.log) // 42
 * ```
 *
 * @since 0.1.0
 * @category Constructors
 */
export const make = (
  options?: MemoryStorageOptions
): Effect.Effect<Storage.StorageService, never, Scope.Scope> =>
  Effect.gen(function*() {
    const maxEntries = options?.maxEntries ?? 100_000
    const sweepInterval = Duration.decode(options?.sweepInterval ?? Duration.minutes(1))
    const inFlight = new Map<string, InFlightEntry>()
    // Insertion order is commit order, so the first entries are the oldest completed records.
    const completed = new Map<string, IdempotencyRecord>()
    const watchers = new Map<string, Set<Deferred.Deferred<void>>>()
    // The token that stored each record, so that a retried commit is answered as done.
    const committedBy = new WeakMap<IdempotencyRecord, string>()
    let lastFence = 0

    const notify = (key: string) => {
      const set = watchers.get(key)
      if (set === undefined) return
      watchers.delete(key)
      for (const deferred of set) Deferred.unsafeDone(deferred, Effect.void)
    }

    const liveRecord = (key: string, now: number): IdempotencyRecord | undefined => {
      const record = completed.get(key)
      if (record === undefined) return undefined
      if (record.expiresAt > now) return record
      completed.delete(key)
      return undefined
    }

    const makeRoom = (): boolean => {
      while (inFlight.size + completed.size >= maxEntries) {
        const oldest = completed.keys().next()
        if (oldest.done) return false
        completed.delete(oldest.value)
      }
      return true
    }

    const owned = (lease: Storage.Lease, now: number): InFlightEntry | undefined => {
      const entry = inFlight.get(lease.key)
      return entry !== undefined && entry.token === lease.token && entry.leaseExpiresAt > now ? entry : undefined
    }

    const acquire = (request: Storage.AcquireRequest) =>
      Effect.flatMap(Clock.currentTimeMillis, (now): Effect.Effect<Storage.AcquireResult, IdempotencyStorageError> => {
        const record = liveRecord(request.key, now)
        if (record !== undefined) return Effect.succeed(Storage.AcquireResult.Completed({ record }))
        const holder = inFlight.get(request.key)
        if (holder !== undefined && holder.leaseExpiresAt > now) {
          return Effect.succeed(Storage.AcquireResult.InFlight({
            fingerprint: holder.fingerprint,
            leaseRemaining: Duration.millis(holder.leaseExpiresAt - now)
          }))
        }
        if (holder === undefined && !makeRoom()) {
          return Effect.fail(
            new IdempotencyStorageError({
              key: request.key,
              operation: "acquire",
              cause: new Error(`memory storage is full: ${maxEntries} keys in flight`)
            })
          )
        }
        const lease: Storage.Lease = {
          key: request.key,
          fingerprint: request.fingerprint,
          token: internalToken.make(),
          fence: ++lastFence
        }
        inFlight.set(request.key, {
          fingerprint: request.fingerprint,
          token: lease.token,
          fence: lease.fence,
          leaseExpiresAt: now + Duration.toMillis(request.lease)
        })
        return Effect.succeed(Storage.AcquireResult.Acquired({ lease }))
      })

    const renew = (lease: Storage.Lease, duration: Duration.Duration) =>
      Effect.map(Clock.currentTimeMillis, (now) => {
        const entry = owned(lease, now)
        if (entry === undefined) return false
        entry.leaseExpiresAt = now + Duration.toMillis(duration)
        return true
      })

    const commit = (lease: Storage.Lease, request: Storage.CommitRequest) =>
      Effect.map(Clock.currentTimeMillis, (now) => {
        if (owned(lease, now) === undefined) {
          // A retry of a commit that landed (its reply lost on the way): done, and nothing changes.
          const record = liveRecord(lease.key, now)
          return record !== undefined && committedBy.get(record) === lease.token
        }
        inFlight.delete(lease.key)
        const record: IdempotencyRecord = {
          key: lease.key,
          fingerprint: lease.fingerprint,
          outcome: request.outcome,
          payload: request.payload,
          fence: lease.fence,
          createdAt: now,
          expiresAt: now + Duration.toMillis(request.ttl)
        }
        completed.set(lease.key, record)
        committedBy.set(record, lease.token)
        notify(lease.key)
        return true
      })

    const release = (lease: Storage.Lease) =>
      Effect.map(Clock.currentTimeMillis, (now) => {
        if (owned(lease, now) === undefined) return false
        inFlight.delete(lease.key)
        notify(lease.key)
        return true
      })

    const watch = (key: string) =>
      Effect.acquireRelease(
        Effect.sync(() => {
          const deferred = Deferred.unsafeMake<void>(FiberId.none)
          let set = watchers.get(key)
          if (set === undefined) {
            set = new Set()
            watchers.set(key, set)
          }
          set.add(deferred)
          return deferred
        }),
        (deferred) =>
          Effect.sync(() => {
            const set = watchers.get(key)
            if (set === undefined) return
            set.delete(deferred)
            if (set.size === 0) watchers.delete(key)
          })
      ).pipe(Effect.map(Deferred.await))

    const sweep = Effect.map(Clock.currentTimeMillis, (now) => {
      for (const [key, record] of completed) {
        if (record.expiresAt <= now) completed.delete(key)
      }
      for (const [key, entry] of inFlight) {
        if (entry.leaseExpiresAt <= now) inFlight.delete(key)
      }
    })
    yield* Effect.forkScoped(Effect.repeat(sweep, Schedule.spaced(sweepInterval)))

    const service = Storage.make({
      backend: "memory",
      capabilities: { renewal: true, fencing: true, ownedCommit: true, notification: true },
      acquire,
      renew,
      commit,
      release,
      read: (key) => Effect.map(Clock.currentTimeMillis, (now) => Option.fromNullable(liveRecord(key, now))),
      delete: (key, fence) =>
        Effect.sync(() => {
          if (fence !== undefined) {
            if (completed.get(key)?.fence !== fence) return
          } else {
            inFlight.delete(key)
          }
          completed.delete(key)
          notify(key)
        }),
      watch
    })
    internalDiagnostics.registerMemory(service, () => {
      let watching = 0
      for (const set of watchers.values()) watching += set.size
      return { watchers: watching, inFlight: inFlight.size, completed: completed.size }
    })
    return service
  })

/**
 * A memory storage layer. Each build of the layer is a separate store.
 *
 * @example
 * ```ts
 * import { Effect } from "effect"
 * import { Idempotent, MemoryStorage } from "effect-idempotency"
 *
 * const program = Effect.succeed(42).pipe(Idempotent.wrap({ key: "job-1" }))
 *
 * Effect.runPromise(program.pipe(Effect.provide(MemoryStorage.layer())))
 * ```
 *
 * @since 0.1.0
 * @category Layers
 */
export const layer = (options?: MemoryStorageOptions): Layer.Layer<Storage.Storage> =>
  Layer.scoped(Storage.Storage, make(options))

/**
 * A memory storage layer whose options are read from `Config`. A value that cannot be read fails
 * the build with its `ConfigError`.
 *
 * @example
 * ```ts
 * import { Config } from "effect"
 * import { MemoryStorage } from "effect-idempotency"
 *
 * const StorageLive = MemoryStorage.layerConfig({
 *   maxEntries: Config.integer("IDEMPOTENCY_MAX_ENTRIES").pipe(Config.withDefault(100_000)),
 *   sweepInterval: Config.duration("IDEMPOTENCY_SWEEP_INTERVAL").pipe(Config.withDefault("1 minute"))
 * })
 * ```
 *
 * @since 0.1.0
 * @category Layers
 */
export const layerConfig = (
  config: Config.Config.Wrap<MemoryStorageOptions>
): Layer.Layer<Storage.Storage, ConfigError> =>
  Layer.scoped(Storage.Storage, Effect.flatMap(Config.unwrap(config), make))
