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
  IdempotencyInFlight,
  IdempotencyKeyReused,
  IdempotencyLeaseLost,
  IdempotencyRecordUndecodable,
  IdempotencyResultNotStored,
  IdempotencyStorageError,
  type ResultNotStoredReason,
  type StorageOperation,
  type WrapError
} from "../IdempotencyError.js"
import type { IdempotencyRecord } from "../IdempotencyRecord.js"
import * as Storage from "../Storage.js"
import { keyHash } from "./fingerprint.js"
import * as LocalFlights from "./localFlights.js"
import * as metrics from "./metrics.js"
import { NotStorable, type ResultCodec } from "./resultCodec.js"
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
 * The part of a lease kept back when the run decides it can no longer prove it holds the key: the
 * run is interrupted this long before the store could let the lease go, so that a timer that
 * fires late on a busy machine, or a run that takes a moment to stop, still ends before another
 * caller can take the key.
 */
const safetyMarginMillis = (leaseMillis: number) => Math.min(leaseMillis / 5, 2000)

// What a supervisor waits for: the run's end, the renewal's answer, or neither before the deadline.
type Supervised<A, E> =
  | { readonly _tag: "RunEnded"; readonly exit: Exit.Exit<A, E> }
  | { readonly _tag: "Renewed"; readonly exit: Exit.Exit<boolean, IdempotencyStorageError> }

const firstToEnd = <A, E>(
  clock: Clock.Clock,
  run: Fiber.RuntimeFiber<A, E>,
  renewal: Fiber.RuntimeFiber<boolean, IdempotencyStorageError>,
  millis: number
): Effect.Effect<Supervised<A, E> | undefined> =>
  wait.within(clock, millis, (done: (ended: Supervised<A, E>) => void) => {
    let fired = false
    const onRun = (exit: Exit.Exit<A, E>) => {
      if (fired) return
      fired = true
      done({ _tag: "RunEnded", exit })
    }
    const onRenewal = (exit: Exit.Exit<boolean, IdempotencyStorageError>) => {
      if (fired) return
      fired = true
      done({ _tag: "Renewed", exit })
    }
    run.addObserver(onRun)
    renewal.addObserver(onRenewal)
    return () => {
      run.removeObserver(onRun)
      renewal.removeObserver(onRenewal)
    }
  })

/**
 * A call's value, and whether it was replayed from the record or produced by this call's run.
 *
 * @internal
 */
export interface Completed<A> {
  readonly value: A
  readonly replayed: boolean
  /** The record's: the fence of the run that produced the value, and when it was stored. */
  readonly fence: number
  readonly createdAt: number
}

const completed = <A>(value: A, record: IdempotencyRecord, replayed: boolean): Completed<A> => ({
  value,
  replayed,
  fence: record.fence,
  createdAt: record.createdAt
})

/**
 * Runs `self` at most once per key: the protocol that `Idempotent.wrap` and the HTTP middleware
 * share.
 *
 * @internal
 */
export const run = <A, E, R>(
  self: Effect.Effect<A, E, R>,
  settings: Settings<A, E>
): Effect.Effect<A, E | WrapError, Exclude<R, Execution> | Storage.Storage> =>
  Effect.map(runCompleted(self, settings), (done) => done.value)

/**
 * {@link run}, telling the caller whether the value was replayed.
 *
 * @internal
 */
export const runCompleted = <A, E, R>(
  self: Effect.Effect<A, E, R>,
  settings: Settings<A, E>
): Effect.Effect<Completed<A>, E | WrapError, Exclude<R, Execution> | Storage.Storage> =>
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
    const marginMillis = safetyMarginMillis(leaseMillis)
    const request: Storage.AcquireRequest = { key: storageKey, fingerprint, lease: settings.lease }
    // Until when this process may act as the key's holder: the lease as the store counts it, from
    // the moment the acquire or the last successful renewal was sent, less the safety margin.
    const deadlineOf = (flight: LocalFlights.Flight) => flight.leaseExpiresAt - marginMillis

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
    const storageFailed = (error: IdempotencyStorageError) =>
      Effect.zipRight(Metric.increment(counters.storageErrors), Effect.fail(error))
    // A storage call the protocol waits on, given up on after `millis` (the time left that its
    // answer could still matter): a custom backend that never answers must not hold a caller, or a
    // key's local flight, forever. Interrupted on timeout, as a cancelled statement is.
    const bounded = <A, R>(
      operation: StorageOperation,
      call: Effect.Effect<A, IdempotencyStorageError, R>,
      millis: number
    ): Effect.Effect<A, IdempotencyStorageError, R> =>
      Effect.flatMap(
        wait.runDetachedWithin(call, Math.max(0, millis)),
        (exit) =>
          exit ?? Effect.fail(
            new IdempotencyStorageError({
              key,
              operation,
              cause: new Error(`the store did not answer within ${Math.max(0, Math.round(millis))} ms`)
            })
          )
      )
    const notStored = (reason: ResultNotStoredReason, detail: string, cause?: unknown) =>
      Effect.failSync(() =>
        new IdempotencyResultNotStored(cause === undefined ? { key, reason, detail } : { key, reason, detail, cause })
      )

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
    const waitUntil = settings.wait === undefined ? startedAt : startedAt + Duration.toMillis(settings.wait)

    return Effect.uninterruptibleMask((restore) => {
      const acquire = Effect.suspend(() =>
        Effect.catchAll(
          LocalFlights.acquire(storage, request, clock.unsafeCurrentTimeMillis(), leaseMillis - marginMillis),
          storageFailed
        )
      )

      // A record this version cannot read (another schema, a newer format) is, on request,
      // forgotten and the key acquired again, once: only that record goes (compared by fence), so
      // a run stored by another caller meanwhile stays.
      const replay = (
        record: IdempotencyRecord,
        rerunAllowed: boolean
      ): Effect.Effect<Completed<A>, E | WrapError, Exclude<R, Execution>> => {
        if (record.fingerprint !== fingerprint) return reused()
        const decoded = Effect.zipRight(
          noteOutcome(counters, settings.span, "replayed"),
          Effect.map(codec.decode(record), (value) => completed(value, record, true))
        )
        if (settings.onUndecodable === "fail" || !rerunAllowed) return restore(decoded)
        return Effect.catchIf(
          restore(decoded),
          (error): error is IdempotencyRecordUndecodable => error instanceof IdempotencyRecordUndecodable,
          () =>
            Effect.zipRight(
              Effect.catchAll(storage.delete(storageKey, record.fence), storageFailed),
              Effect.flatMap(acquire, (shared) => step(shared, false))
            )
        )
      }

      const step = (
        shared: LocalFlights.Shared,
        rerunAllowed = true
      ): Effect.Effect<Completed<A>, E | WrapError, Exclude<R, Execution>> => {
        const result = shared.result
        switch (result._tag) {
          case "Completed":
            return replay(result.record, rerunAllowed)
          case "InFlight": {
            if (result.fingerprint !== undefined && result.fingerprint !== fingerprint) return reused()
            return clock.unsafeCurrentTimeMillis() >= waitUntil
              ? inFlight(Duration.toMillis(result.leaseRemaining))
              : Effect.flatMap(waitForStore, (shared) => step(shared, rerunAllowed))
          }
          case "Acquired": {
            if (shared.leader) {
              return pastDeadline(shared.flight)
                ? tooLate(result.lease, shared.flight)
                : guarded(result.lease, shared.flight)
            }
            if (shared.flight.fingerprint !== fingerprint) return reused()
            return awaitLocalRun(shared.flight, rerunAllowed)
          }
        }
      }

      // Subscribe, then look again, then sleep until woken or the holder's lease would end (a
      // crashed holder sends no notice). Nothing committed between the look and the sleep is missed.
      const waitForStore: Effect.Effect<LocalFlights.Shared, IdempotencyStorageError> = Effect.suspend(() =>
        Effect.scoped(
          Effect.flatMap(
            Effect.catchAll(
              bounded("watch", storage.watch(storageKey), waitUntil - clock.unsafeCurrentTimeMillis()),
              storageFailed
            ),
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
                if (now >= waitUntil) return Effect.succeed(Option.some(shared))
                const sleep = Math.min(Duration.toMillis(result.leaseRemaining), waitUntil - now)
                return Effect.as(restore(Effect.raceFirst(changed, Effect.sleep(sleep))), Option.none())
              })
          )
        ).pipe(Effect.flatMap(Option.match({ onNone: () => waitForStore, onSome: Effect.succeed })))
      )

      const awaitLocalRun = (flight: LocalFlights.Flight, rerunAllowed: boolean) => {
        const now = clock.unsafeCurrentTimeMillis()
        if (now >= waitUntil) return inFlight(flight.leaseExpiresAt - now)
        return Effect.flatMap(
          restore(wait.within(
            clock,
            waitUntil - now,
            (done: (settlement: LocalFlights.Settlement) => void) => LocalFlights.listenSettled(flight, done)
          )),
          (settlement) => {
            if (settlement === undefined) return inFlight(flight.leaseExpiresAt - clock.unsafeCurrentTimeMillis())
            return settlement._tag === "Completed"
              ? replay(settlement.record, rerunAllowed)
              : Effect.flatMap(acquire, (shared) => step(shared, rerunAllowed))
          }
        )
      }

      // The store's answer came back so late that the lease it granted may have ended already, and
      // another caller may hold the key: the effect is not started. The release is checked by the
      // store against the token, so it cannot free another caller's lease.
      const tooLate = (lease: Storage.Lease, flight: LocalFlights.Flight) =>
        Effect.zipRight(
          releaseKey(lease, flight),
          Effect.zipRight(
            noteOutcome(counters, settings.span, "lease_lost"),
            Effect.fail(new IdempotencyLeaseLost({ key, fence: lease.fence }))
          )
        )

      // Whatever ends the run (a defect in a schema's encoder or in a custom backend's commit, an
      // interruption between steps), a lease still held here is released and the local waiters
      // are let go: otherwise they would wait on a flight nobody settles, for as long as the
      // process lives.
      const guarded = (lease: Storage.Lease, flight: LocalFlights.Flight) =>
        Effect.onExit(
          execute(lease, flight),
          () => flight.settled === undefined ? releaseKey(lease, flight) : Effect.void
        )

      // The run gets a fiber of its own, so that a lost lease can interrupt it without
      // interrupting the caller; this fiber supervises it and renews the lease meanwhile.
      const execute = (lease: Storage.Lease, flight: LocalFlights.Flight) =>
        Effect.suspend(() => {
          const runToEnd: Effect.Effect<RunExit<A, E>, never, Exclude<R, Execution>> = Effect.flatMap(
            Effect.fork(withExecution(self, { key, fence: lease.fence }, restore)),
            (run) =>
              Effect.flatMap(
                Effect.exit(restore(supervise(run, lease, flight))),
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
            const payload = encodeSuccess(value)
            if (Either.isLeft(payload)) return Effect.fail(new RollBack(outer))
            const leaseLost = new RollBack<A, E>(Exit.fail(new IdempotencyLeaseLost({ key, fence: lease.fence })))
            if (pastDeadline(flight)) return Effect.fail(leaseLost)
            const record = recordOf(lease, "success", payload.right, clock.unsafeCurrentTimeMillis())
            return Effect.flatMap(
              storage.commit(lease, { outcome: "success", payload: payload.right, ttl: settings.ttl }),
              (committed) => committed ? Effect.succeed({ value, record }) : Effect.fail(leaseLost)
            )
          }))),
          (exit): Effect.Effect<Completed<A>, E | WrapError> => {
            if (Exit.isSuccess(exit)) {
              LocalFlights.settle(storage, flight, { _tag: "Completed", record: exit.value.record })
              return Effect.succeed(completed(exit.value.value, exit.value.record, false))
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

      // Waits for the run, renewing the lease every third of it. The run may go on only while this
      // process can prove it holds the lease: past the deadline (the last successful renewal's
      // send time plus the lease, less a margin) it is interrupted, whether renewals failed, hang,
      // or found the lease gone, so it ends before the store can hand the key to someone else.
      // A storage that cannot renew holds the lease for its first term only.
      const supervise = (
        run: Fiber.RuntimeFiber<A, E>,
        lease: Storage.Lease,
        flight: LocalFlights.Flight
      ): Effect.Effect<Exit.Exit<A, E>, IdempotencyLeaseLost> => {
        const lost = Effect.zipRight(
          Effect.uninterruptible(Fiber.interrupt(run)),
          Effect.failSync(() => new IdempotencyLeaseLost({ key, fence: lease.fence }))
        )
        const untilDeadline = (millis: number) =>
          Math.max(0, Math.min(millis, deadlineOf(flight) - clock.unsafeCurrentTimeMillis()))
        if (!storage.capabilities.renewal) {
          return Effect.flatMap(
            wait.fiberWithin(clock, run, untilDeadline(Number.POSITIVE_INFINITY)),
            (exit) => exit === undefined ? lost : Effect.succeed(exit)
          )
        }
        const renew: Effect.Effect<Exit.Exit<A, E>, IdempotencyLeaseLost> = Effect.suspend(() => {
          const sentAt = clock.unsafeCurrentTimeMillis()
          const timeLeft = deadlineOf(flight) - sentAt
          if (timeLeft <= 0) return lost
          return Effect.flatMap(Effect.fork(storage.renew(lease, settings.lease)), (renewal) =>
            Effect.flatMap(firstToEnd(clock, run, renewal, timeLeft), (ended) => {
              if (ended === undefined || ended._tag === "RunEnded") {
                // A renewal still on its way is not waited for: its answer no longer matters.
                return Effect.zipRight(
                  Fiber.interruptFork(renewal),
                  ended === undefined ? lost : Effect.succeed(ended.exit)
                )
              }
              const renewed = ended.exit
              if (Exit.isSuccess(renewed)) {
                if (!renewed.value) return lost
                flight.leaseExpiresAt = sentAt + leaseMillis
                return loop(leaseMillis / 3)
              }
              return Effect.zipRight(
                Effect.logWarning("idempotency lease renewal failed; retrying while the lease holds").pipe(
                  Effect.annotateLogs({
                    "idempotency.key_hash": keyHash(storageKey),
                    cause: Cause.pretty(renewed.cause)
                  })
                ),
                loop(leaseMillis / 10)
              )
            }))
        })
        const loop = (millis: number): Effect.Effect<Exit.Exit<A, E>, IdempotencyLeaseLost> =>
          Effect.flatMap(
            Effect.suspend(() => wait.fiberWithin(clock, run, untilDeadline(millis))),
            (exit) => exit === undefined ? renew : Effect.succeed(exit)
          )
        return loop(leaseMillis / 3)
      }

      // How long the store may still hold this caller's lease, at least the safety margin.
      const untilLeaseEnds = (flight: LocalFlights.Flight) =>
        Math.max(flight.leaseExpiresAt - clock.unsafeCurrentTimeMillis(), marginMillis)

      const pastDeadline = (flight: LocalFlights.Flight) => clock.unsafeCurrentTimeMillis() >= deadlineOf(flight)

      // Past the lease, a release has nothing left to free: it is not waited for longer than that.
      const releaseKey = (lease: Storage.Lease, flight: LocalFlights.Flight) =>
        bounded("release", storage.release(lease), untilLeaseEnds(flight)).pipe(
          Effect.catchAllCause((cause) =>
            Effect.logWarning("idempotency release failed; the key frees when its lease ends").pipe(
              Effect.annotateLogs({ "idempotency.key_hash": keyHash(storageKey), cause: Cause.pretty(cause) })
            )
          ),
          Effect.zipRight(Metric.increment(counters.releases)),
          Effect.ensuring(Effect.sync(() => LocalFlights.settle(storage, flight, LocalFlights.released)))
        )

      // A commit that failed (a dropped connection, a timeout) is tried again while the lease
      // still holds: no one else can take the key until then, and commits are idempotent for
      // their token, so one that landed but lost its reply is answered as done. A failure that
      // retrying cannot fix (`retryable: false`) is not tried again.
      const commitWithinLease = (
        lease: Storage.Lease,
        flight: LocalFlights.Flight,
        request: Storage.CommitRequest
      ): Effect.Effect<boolean, IdempotencyStorageError> => {
        const attempt = (delayMillis: number): Effect.Effect<boolean, IdempotencyStorageError> =>
          Effect.catchAll(
            // A commit answered after the lease ended changed nothing (the store checks the owner)
            // or cannot be known to have: either way the result is reported as not stored.
            bounded("commit", storage.commit(lease, request), untilLeaseEnds(flight)),
            (error) =>
              error.retryable === false || clock.unsafeCurrentTimeMillis() + delayMillis >= deadlineOf(flight)
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

      // The success as stored bytes, or why it cannot be stored.
      const encodeSuccess = (
        value: A
      ): Either.Either<Uint8Array, readonly [ResultNotStoredReason, string, unknown]> => {
        const payload = codec.encodeSuccess(value)
        if (Either.isLeft(payload)) {
          const detail = payload.left instanceof NotStorable
            ? payload.left.message
            : "the success schema could not encode the result"
          return Either.left(["unencodable", detail, payload.left] as const)
        }
        return tooLarge(payload.right) ? Either.left(tooLargeReason(payload.right)) : Either.right(payload.right)
      }
      const tooLarge = (payload: Uint8Array) => payload.length > settings.maxResultBytes
      const tooLargeReason = (payload: Uint8Array) =>
        [
          "too-large",
          `the encoded result is ${payload.length} bytes, more than maxResultBytes (${settings.maxResultBytes})`,
          undefined
        ] as const

      const store = (
        lease: Storage.Lease,
        flight: LocalFlights.Flight,
        outcome: IdempotencyRecord["outcome"],
        payload: Uint8Array
      ): Effect.Effect<IdempotencyRecord, IdempotencyLeaseLost | IdempotencyResultNotStored> => {
        // A store that cannot check the owner in its commit must not be written past the deadline:
        // another caller may hold the key by then. The others check it themselves.
        const commit = !storage.capabilities.ownedCommit && pastDeadline(flight)
          ? Effect.succeed(false)
          : commitWithinLease(lease, flight, { outcome, payload, ttl: settings.ttl })
        const record = recordOf(lease, outcome, payload, clock.unsafeCurrentTimeMillis())
        return commit.pipe(
          Effect.matchEffect({
            onSuccess: (committed) => {
              if (committed) {
                LocalFlights.settle(storage, flight, { _tag: "Completed", record })
                return Effect.succeed(record)
              }
              LocalFlights.settle(storage, flight, LocalFlights.released)
              return Effect.zipRight(
                noteOutcome(counters, settings.span, "lease_lost"),
                Effect.fail(new IdempotencyLeaseLost({ key, fence: lease.fence }))
              )
            },
            // The run happened, but no retry can replay its result: the caller is told so instead
            // of being handed a value that nobody else will ever see.
            onFailure: (error) =>
              Effect.zipRight(
                releaseKey(lease, flight),
                Effect.zipRight(
                  Metric.increment(counters.commitFailures),
                  Effect.logError("idempotency commit failed; the run's result was not stored").pipe(
                    Effect.annotateLogs({ "idempotency.key_hash": keyHash(storageKey), cause: error.message })
                  )
                ).pipe(
                  Effect.zipRight(
                    notStored("storage-failed", `the store did not keep the result: ${error.message}`, error)
                  )
                )
              )
          })
        )
      }

      const finish = (
        lease: Storage.Lease,
        flight: LocalFlights.Flight,
        outer: RunExit<A, E>
      ): Effect.Effect<Completed<A>, E | WrapError> => {
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
          const payload = encodeSuccess(exit.value)
          if (Either.isLeft(payload)) {
            const [reason, detail, cause] = payload.left
            return Effect.zipRight(releaseKey(lease, flight), notStored(reason, detail, cause))
          }
          return Effect.map(store(lease, flight, "success", payload.right), (record) =>
            completed(exit.value, record, false))
        }
        const failure = Cause.isFailType(exit.cause) ? Option.some(exit.cause.error) : Option.none()
        const payload = Option.flatMap(failure, codec.encodeFailure)
        if (Option.isNone(payload)) {
          return Effect.zipRight(releaseKey(lease, flight), Effect.failCause(exit.cause))
        }
        if (tooLarge(payload.value)) {
          const [reason, detail] = tooLargeReason(payload.value)
          return Effect.zipRight(releaseKey(lease, flight), notStored(reason, detail, Cause.squash(exit.cause)))
        }
        return Effect.zipRight(store(lease, flight, "failure", payload.value), Effect.failCause(exit.cause))
      }

      return Effect.flatMap(acquire, (shared) =>
        step(shared))
    })
  })
