import * as Cause from "effect/Cause"
import * as Clock from "effect/Clock"
import * as Context from "effect/Context"
import * as Duration from "effect/Duration"
import * as Effect from "effect/Effect"
import * as Either from "effect/Either"
import * as Exit from "effect/Exit"
import * as Fiber from "effect/Fiber"
import * as FiberRef from "effect/FiberRef"
import * as Metric from "effect/Metric"
import * as Option from "effect/Option"
import type * as Scope from "effect/Scope"
import type * as Tracer from "effect/Tracer"
import {
  type IdempotencyError,
  IdempotencyInFlight,
  IdempotencyKeyReused,
  IdempotencyLeaseLost,
  IdempotencyStorageError
} from "../IdempotencyError.js"
import type { IdempotencyRecord } from "../IdempotencyRecord.js"
import * as Storage from "../Storage.js"
import { keyHash } from "./fingerprint.js"
import * as LocalFlights from "./localFlights.js"
import * as metrics from "./metrics.js"
import type { ResultCodec } from "./resultCodec.js"
import * as wait from "./wait.js"

/**
 * What the wrapped effect can read about its own run.
 *
 * @internal
 */
export interface ExecutionInfo {
  readonly key: string
  readonly fence: number
}

/** @internal */
export class Execution extends Context.Tag("effect-idempotency/Idempotent/Execution")<Execution, ExecutionInfo>() {}

/**
 * Everything a run needs, already validated and decoded.
 *
 * @internal
 */
export interface Settings<A, E> {
  /** The key as the caller gave it: what `Execution.key` and the errors show. */
  readonly key: string
  /**
   * What the key is scoped by in the store, already serialized (JSON, so it holds no raw control
   * character): the record is stored under `namespace + "\u001f" + key`. `undefined` stores the
   * key as it is. Two operations with different namespaces never share a record.
   */
  readonly namespace: string | undefined
  /** The largest encoded result stored; a larger one fails with `IdempotencyResultNotStored`. */
  readonly maxResultBytes: number
  /** What a record that no longer decodes does: fail with `IdempotencyRecordUndecodable`, or run again. */
  readonly onUndecodable: "fail" | "run"
  readonly fingerprint: string
  readonly codec: ResultCodec<A, E>
  readonly ttl: Duration.Duration
  readonly lease: Duration.Duration
  /** How long a duplicate waits for the first run; `undefined` to fail at once. */
  readonly wait: Duration.Duration | undefined
  /** Run the effect and commit its result in one storage transaction (`Storage.transaction`). */
  readonly transactional: boolean
  /** The caller's span (`Idempotent.wrap`'s, the HTTP middleware's), told the backend and outcome. */
  readonly span: Tracer.Span | undefined
}

type RunExit<A, E> = Exit.Exit<Exit.Exit<A, E>, IdempotencyLeaseLost>

/** Rolls a transactional run back, carrying how the run ended to the code after the transaction. */
class RollBack<A, E> {
  readonly _tag = "RollBack"
  constructor(readonly outer: RunExit<A, E>) {}
}

/** @internal */
export type Outcome = "executed" | "replayed" | "in_flight" | "reused" | "lease_lost"

const outcomeCounter: Record<Outcome, keyof metrics.BackendCounters> = {
  executed: "executions",
  replayed: "replays",
  in_flight: "inFlight",
  reused: "keyReused",
  lease_lost: "leaseLost"
}

const noteOutcome = (counters: metrics.BackendCounters, span: Tracer.Span | undefined, outcome: Outcome) => {
  const counted = Metric.increment(counters[outcomeCounter[outcome]])
  return span === undefined
    ? counted
    : Effect.zipRight(Effect.sync(() => span.attribute("idempotency.outcome", outcome)), counted)
}

/**
 * `self` with `Execution` in its context, for a fiber of its own that starts uninterruptible;
 * `restore` makes `self` interruptible again. `Effect.provideService` would do, but it scopes the
 * change with a full acquire/use/release (a quarter of a first call's operations); on a fiber
 * that ends with `self`, setting the context and putting it back on exit is enough. Putting it
 * back matters: the caller inherits the run's fiber refs as a join would.
 */
const withExecution = <A, E, R>(
  self: Effect.Effect<A, E, R>,
  execution: ExecutionInfo,
  restore: <A, E, R>(effect: Effect.Effect<A, E, R>) => Effect.Effect<A, E, R>
): Effect.Effect<A, E, Exclude<R, Execution>> =>
  Effect.flatMap(Effect.context<never>(), (context) =>
    Effect.zipRight(
      FiberRef.set(FiberRef.currentContext, Context.add(context, Execution, execution)),
      Effect.onExit(
        restore(self as Effect.Effect<A, E, Exclude<R, Execution>>),
        () => FiberRef.set(FiberRef.currentContext, context)
      )
    ))

// Read after each wait, so a waiter that outlived the lease sees the key as it is now.
type Waited = Option.Option<LocalFlights.Shared>

/**
 * Runs `self` at most once per key: the protocol that `Idempotent.wrap` and the HTTP middleware
 * share.
 *
 * @internal
 */
export const run = <A, E, R>(
  self: Effect.Effect<A, E, R>,
  settings: Settings<A, E>
): Effect.Effect<A, E | IdempotencyError, Exclude<R, Execution> | Storage.Storage> =>
  // The store and the clock are read off the fiber at once, not through an Effect each; the clock
  // is then read synchronously wherever the call needs the time.
  Effect.withFiberRuntime((fiber) => {
    const storage = Context.unsafeGet(fiber.currentContext, Storage.Storage)
    const clock = Context.get(fiber.currentDefaultServices, Clock.Clock)
    const { codec, fingerprint, key } = settings
    const storageKey = settings.namespace === undefined ? key : `${settings.namespace}\u001f${key}`
    const backend = storage.backend
    const counters = metrics.forBackend(backend)
    const leaseMillis = Duration.toMillis(settings.lease)
    const request: Storage.AcquireRequest = { key: storageKey, fingerprint, lease: settings.lease }

    const reused = () =>
      Effect.zipRight(
        noteOutcome(counters, settings.span, "reused"),
        Effect.failSync(() => new IdempotencyKeyReused({ key }))
      )
    const inFlight = (remainingMillis: number) =>
      Effect.zipRight(
        noteOutcome(counters, settings.span, "in_flight"),
        Effect.failSync(() =>
          new IdempotencyInFlight({ key, retryAfter: Duration.millis(Math.max(0, remainingMillis)) })
        )
      )
    const replay = (record: IdempotencyRecord): Effect.Effect<A, E | IdempotencyError> =>
      record.fingerprint === fingerprint
        ? Effect.zipRight(noteOutcome(counters, settings.span, "replayed"), codec.decode(record))
        : reused()
    const storageFailed = (error: IdempotencyStorageError) =>
      Effect.zipRight(Metric.increment(counters.storageErrors), Effect.fail(error))

    settings.span?.attribute("idempotency.backend", backend)

    if (settings.transactional && storage.transaction === undefined) {
      return Effect.fail(
        new IdempotencyStorageError({
          key,
          operation: "transaction",
          cause: new Error(`the ${backend} storage has no transactions to run in`)
        })
      )
    }

    const startedAt = clock.unsafeCurrentTimeMillis()
    const deadline = settings.wait === undefined ? startedAt : startedAt + Duration.toMillis(settings.wait)

    return Effect.uninterruptibleMask((restore) => {
      const acquire = Effect.catchAll(LocalFlights.acquire(storage, request), storageFailed)

      const step = (shared: LocalFlights.Shared): Effect.Effect<A, E | IdempotencyError, Exclude<R, Execution>> => {
        const result = shared.result
        switch (result._tag) {
          case "Completed":
            return restore(replay(result.record))
          case "InFlight": {
            if (result.fingerprint !== undefined && result.fingerprint !== fingerprint) return reused()
            return clock.unsafeCurrentTimeMillis() >= deadline
              ? inFlight(Duration.toMillis(result.leaseRemaining))
              : Effect.flatMap(waitForStore, step)
          }
          case "Acquired": {
            if (shared.leader) return execute(result.lease, shared.flight)
            if (shared.flight.fingerprint !== fingerprint) return reused()
            return awaitLocalRun(shared.flight)
          }
        }
      }

      // Subscribe, then look again, then sleep until woken or the holder's lease would end (a
      // crashed holder sends no notice). Nothing committed between the look and the sleep is missed.
      const waitForStore: Effect.Effect<LocalFlights.Shared, IdempotencyStorageError> = Effect.suspend(() =>
        Effect.scoped(
          Effect.flatMap(
            Effect.catchAll(storage.watch(storageKey), storageFailed),
            (changed): Effect.Effect<Waited, IdempotencyStorageError, Scope.Scope> =>
              Effect.flatMap(acquire, (shared) => {
                const result = shared.result
                // An unknown holder fingerprint (a basic store between lock and marker) is waited on, as
                // `step` does; handed back to `step`, it would come straight back here without sleeping.
                const otherRequest = result._tag === "InFlight" && result.fingerprint !== undefined &&
                  result.fingerprint !== fingerprint
                if (result._tag !== "InFlight" || otherRequest) {
                  return Effect.succeed(Option.some(shared))
                }
                const now = clock.unsafeCurrentTimeMillis()
                if (now >= deadline) return Effect.succeed(Option.some(shared))
                const sleep = Math.min(Duration.toMillis(result.leaseRemaining), deadline - now)
                return Effect.as(restore(Effect.raceFirst(changed, Effect.sleep(sleep))), Option.none())
              })
          )
        ).pipe(Effect.flatMap(Option.match({ onNone: () => waitForStore, onSome: Effect.succeed })))
      )

      const awaitLocalRun = (flight: LocalFlights.Flight) => {
        const now = clock.unsafeCurrentTimeMillis()
        if (now >= deadline) return inFlight(flight.leaseExpiresAt - now)
        return Effect.flatMap(
          restore(wait.within(
            clock,
            deadline - now,
            (done: (settlement: LocalFlights.Settlement) => void) => LocalFlights.listenSettled(flight, done)
          )),
          (settlement) => {
            if (settlement === undefined) return inFlight(flight.leaseExpiresAt - clock.unsafeCurrentTimeMillis())
            return settlement._tag === "Completed" ? restore(replay(settlement.record)) : Effect.flatMap(acquire, step)
          }
        )
      }

      // The run gets a fiber of its own, so that a lost lease can interrupt it without
      // interrupting the caller; this fiber supervises it and renews the lease meanwhile.
      const execute = (lease: Storage.Lease, flight: LocalFlights.Flight) =>
        Effect.suspend(() => {
          const acquiredAt = clock.unsafeCurrentTimeMillis()
          flight.leaseExpiresAt = acquiredAt + leaseMillis
          const runToEnd: Effect.Effect<RunExit<A, E>, never, Exclude<R, Execution>> = Effect.flatMap(
            Effect.fork(withExecution(self, { key, fence: lease.fence }, restore)),
            (run) =>
              Effect.flatMap(
                Effect.exit(restore(supervise(run, lease, flight, acquiredAt))),
                (outer) =>
                  Exit.isFailure(outer) && Option.isNone(Cause.failureOption(outer.cause))
                    // The caller was interrupted: the run goes with it.
                    ? Effect.as(Fiber.interrupt(run), outer)
                    // Like a join: what the run set in FiberRefs (log annotations, say) carries on.
                    : Effect.as(Fiber.inheritAll(run), outer)
              )
          )
          return Effect.zipRight(
            noteOutcome(counters, settings.span, "executed"),
            storage.transaction !== undefined && settings.transactional
              ? inTransaction(storage.transaction, runToEnd, lease, flight)
              : Effect.flatMap(runToEnd, (outer) => finish(lease, flight, outer))
          )
        })

      // The run and the commit of its success share one storage transaction, so the caller's own
      // writes through the same client land with the stored result or not at all. Any other end
      // rolls the transaction back and is then handled as usual: a typed failure is stored
      // outside it, anything else releases the key.
      const inTransaction = (
        transaction: NonNullable<Storage.StorageService["transaction"]>,
        runToEnd: Effect.Effect<RunExit<A, E>, never, Exclude<R, Execution>>,
        lease: Storage.Lease,
        flight: LocalFlights.Flight
      ) =>
        Effect.flatMap(
          Effect.exit(transaction(Effect.flatMap(runToEnd, (outer) => {
            if (Exit.isFailure(outer) || Exit.isFailure(outer.value)) return Effect.fail(new RollBack(outer))
            const value = outer.value.value
            const payload = codec.encodeSuccess(value)
            if (Either.isLeft(payload)) return Effect.fail(new RollBack(outer))
            const record = recordOf(lease, "success", payload.right, clock.unsafeCurrentTimeMillis())
            return Effect.flatMap(
              storage.commit(lease, { outcome: "success", payload: payload.right, ttl: settings.ttl }),
              (committed) =>
                committed
                  ? Effect.succeed({ value, record })
                  : Effect.fail(
                    new RollBack<A, E>(Exit.fail(new IdempotencyLeaseLost({ key, fence: lease.fence })))
                  )
            )
          }))),
          (exit): Effect.Effect<A, E | IdempotencyError> => {
            if (Exit.isSuccess(exit)) {
              LocalFlights.settle(storage, flight, { _tag: "Completed", record: exit.value.record })
              return Effect.succeed(exit.value.value)
            }
            const failure = Cause.failureOption(exit.cause)
            if (Option.isSome(failure) && failure.value instanceof RollBack) {
              return finish(lease, flight, failure.value.outer)
            }
            // The transaction itself failed (begin, the commit statement, or COMMIT): nothing the
            // run wrote was kept, so neither is the key.
            return Effect.zipRight(
              releaseKey(lease, flight),
              Effect.failCause(exit.cause as Cause.Cause<IdempotencyStorageError>)
            )
          }
        )

      // Waits for the run, renewing the lease every third of it. A renewal that finds the lease
      // gone, or storage failures lasting a whole lease, end the run: someone else may own the
      // key by then. A storage that cannot renew holds the lease for its first term only.
      const supervise = (
        run: Fiber.RuntimeFiber<A, E>,
        lease: Storage.Lease,
        flight: LocalFlights.Flight,
        acquiredAt: number
      ): Effect.Effect<Exit.Exit<A, E>, IdempotencyLeaseLost> => {
        const lost = Effect.zipRight(
          Effect.uninterruptible(Fiber.interrupt(run)),
          Effect.failSync(() => new IdempotencyLeaseLost({ key, fence: lease.fence }))
        )
        if (!storage.capabilities.renewal) {
          return Effect.flatMap(
            wait.fiberWithin(clock, run, leaseMillis),
            (exit) => exit === undefined ? lost : Effect.succeed(exit)
          )
        }
        let lastRenewed = acquiredAt
        // A slow renewal must not hold back a run that has ended: the two race, on renewal ticks only.
        const renewOrEnd = Effect.raceFirst(
          Effect.either(Effect.suspend(() => storage.renew(lease, settings.lease))),
          Fiber.await(run)
        )
        const renew: Effect.Effect<Exit.Exit<A, E>, IdempotencyLeaseLost> = Effect.flatMap(
          renewOrEnd,
          (renewed) => {
            if (Exit.isExit(renewed)) return Effect.succeed(renewed)
            const now = clock.unsafeCurrentTimeMillis()
            if (Either.isRight(renewed)) {
              if (!renewed.right) return lost
              lastRenewed = now
              flight.leaseExpiresAt = now + leaseMillis
              return loop
            }
            if (now - lastRenewed >= leaseMillis) return lost
            return Effect.zipRight(
              Effect.logWarning("idempotency lease renewal failed; retrying").pipe(
                Effect.annotateLogs({ "idempotency.key_hash": keyHash(storageKey), cause: renewed.left.message })
              ),
              loop
            )
          }
        )
        const loop: Effect.Effect<Exit.Exit<A, E>, IdempotencyLeaseLost> = Effect.flatMap(
          wait.fiberWithin(clock, run, leaseMillis / 3),
          (exit) => exit === undefined ? renew : Effect.succeed(exit)
        )
        return loop
      }

      const releaseKey = (lease: Storage.Lease, flight: LocalFlights.Flight) =>
        storage.release(lease).pipe(
          Effect.catchAll((error) =>
            Effect.logWarning("idempotency release failed; the key frees when its lease ends").pipe(
              Effect.annotateLogs({ "idempotency.key_hash": keyHash(storageKey), cause: error.message })
            )
          ),
          Effect.zipRight(Metric.increment(counters.releases)),
          Effect.ensuring(Effect.sync(() => LocalFlights.settle(storage, flight, LocalFlights.released)))
        )

      // A commit that failed (a dropped connection, a timeout) is tried again while the lease
      // still holds: no one else can take the key until then, and commits are idempotent for
      // their token, so one that landed but lost its reply is answered as done. Giving up early
      // would let a waiting duplicate run the effect a second time once the lease ends.
      const commitWithinLease = (
        lease: Storage.Lease,
        flight: LocalFlights.Flight,
        request: Storage.CommitRequest
      ): Effect.Effect<boolean, IdempotencyStorageError> => {
        const attempt = (delayMillis: number): Effect.Effect<boolean, IdempotencyStorageError> =>
          Effect.catchAll(
            storage.commit(lease, request),
            (error) =>
              clock.unsafeCurrentTimeMillis() + delayMillis >= flight.leaseExpiresAt
                ? Effect.fail(error)
                : Effect.zipRight(Effect.sleep(delayMillis), attempt(Math.min(delayMillis * 2, 1000)))
          )
        return attempt(25)
      }

      // What local duplicates replay: the record as the store keeps it.
      const recordOf = (
        lease: Storage.Lease,
        outcome: IdempotencyRecord["outcome"],
        payload: Uint8Array,
        now: number
      ): IdempotencyRecord => ({
        key: storageKey,
        fingerprint,
        outcome,
        payload,
        fence: lease.fence,
        createdAt: now,
        expiresAt: now + Duration.toMillis(settings.ttl)
      })

      const store = (
        lease: Storage.Lease,
        flight: LocalFlights.Flight,
        outcome: IdempotencyRecord["outcome"],
        payload: Uint8Array
      ): Effect.Effect<void, IdempotencyLeaseLost> => {
        const record = recordOf(lease, outcome, payload, clock.unsafeCurrentTimeMillis())
        return commitWithinLease(lease, flight, { outcome, payload, ttl: settings.ttl }).pipe(
          Effect.matchEffect({
            onSuccess: (committed) => {
              if (committed) {
                LocalFlights.settle(storage, flight, { _tag: "Completed", record })
                return Effect.void
              }
              LocalFlights.settle(storage, flight, LocalFlights.released)
              return Effect.zipRight(
                noteOutcome(counters, settings.span, "lease_lost"),
                Effect.fail(new IdempotencyLeaseLost({ key, fence: lease.fence }))
              )
            },
            // The run happened and its caller gets its result; local duplicates get it too. The
            // store did not keep it, so a retry after the lease ends would run again: say so loudly.
            onFailure: (error) => {
              LocalFlights.settle(storage, flight, { _tag: "Completed", record })
              return Effect.zipRight(
                Metric.increment(counters.commitFailures),
                Effect.logError("idempotency commit failed; the result was returned but not stored").pipe(
                  Effect.annotateLogs({ "idempotency.key_hash": keyHash(storageKey), cause: error.message })
                )
              )
            }
          })
        )
      }

      const finish = (
        lease: Storage.Lease,
        flight: LocalFlights.Flight,
        outer: RunExit<A, E>
      ): Effect.Effect<A, E | IdempotencyError> => {
        if (Exit.isFailure(outer)) {
          const lost = Cause.failureOption(outer.cause)
          if (Option.isSome(lost)) {
            LocalFlights.settle(storage, flight, LocalFlights.released)
            return Effect.zipRight(noteOutcome(counters, settings.span, "lease_lost"), Effect.fail(lost.value))
          }
          return Effect.zipRight(releaseKey(lease, flight), Effect.failCause(outer.cause))
        }
        const exit = outer.value
        if (Exit.isSuccess(exit)) {
          const payload = codec.encodeSuccess(exit.value)
          if (Either.isLeft(payload)) {
            return Effect.zipRight(
              releaseKey(lease, flight),
              Effect.fail(new IdempotencyStorageError({ key, operation: "encode", cause: payload.left }))
            )
          }
          return Effect.as(store(lease, flight, "success", payload.right), exit.value)
        }
        const failure = Cause.isFailType(exit.cause) ? Option.some(exit.cause.error) : Option.none()
        const payload = Option.flatMap(failure, codec.encodeFailure)
        if (Option.isNone(payload)) return Effect.zipRight(releaseKey(lease, flight), exit)
        return Effect.zipRight(store(lease, flight, "failure", payload.value), exit)
      }

      return Effect.flatMap(acquire, step)
    })
  })
