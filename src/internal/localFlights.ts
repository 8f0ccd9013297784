import * as Deferred from "effect/Deferred"
import * as Duration from "effect/Duration"
import * as Effect from "effect/Effect"
import * as Exit from "effect/Exit"
import * as FiberId from "effect/FiberId"
import { IdempotencyStorageError } from "../IdempotencyError.js"
import type { IdempotencyRecord } from "../IdempotencyRecord.js"
import type * as Storage from "../Storage.js"
import * as wait from "./wait.js"

/**
 * In-process deduplication. Concurrent calls for one key in one process share one storage
 * acquire, and while this process holds the key the other local callers wait on the run itself
 * instead of asking the store. 1,000 local duplicates cost one round trip, not 1,000.
 *
 * The registry is per storage instance: two layers (two pools, as two processes would have) do
 * not share flights, and meet only in the store.
 *
 * @internal
 */
export interface Flight {
  readonly key: string
  readonly fingerprint: string
  /** The leader's acquire, once answered. */
  acquired: Exit.Exit<Storage.AcquireResult, IdempotencyStorageError> | undefined
  /** The local run's end, once settled. */
  settled: Settlement | undefined
  // Made only when a duplicate arrives in time to wait: most calls have none, and each costs.
  acquiredSignal: Deferred.Deferred<Storage.AcquireResult, IdempotencyStorageError> | undefined
  settledListeners: Set<(settlement: Settlement) => void> | undefined
  /**
   * Epoch millis when the local holder's lease ends at the earliest: the acquire's or the last
   * successful renewal's send time plus the lease.
   */
  leaseExpiresAt: number
}

/** @internal */
export type Settlement =
  | { readonly _tag: "Completed"; readonly record: IdempotencyRecord }
  | { readonly _tag: "Released" }

/** @internal */
export const released: Settlement = { _tag: "Released" }

/** @internal */
export interface Shared {
  readonly result: Storage.AcquireResult
  readonly flight: Flight
  /** This caller made the storage call, so an `Acquired` result is its own lease to run and settle. */
  readonly leader: boolean
}

const registries = new WeakMap<Storage.StorageService, Map<string, Flight>>()

const flightsOf = (storage: Storage.StorageService): Map<string, Flight> => {
  let flights = registries.get(storage)
  if (flights === undefined) {
    flights = new Map()
    registries.set(storage, flights)
  }
  return flights
}

/**
 * How many flights the registry holds for `storage`: for the soak bench and leak tests, never on
 * a call's path.
 *
 * @internal
 */
export const count = (storage: Storage.StorageService): number => registries.get(storage)?.size ?? 0

const remove = (flights: Map<string, Flight>, flight: Flight) => {
  if (flights.get(flight.key) === flight) flights.delete(flight.key)
}

/**
 * Acquires through the store, or joins a local acquire or run already under way.
 *
 * Run it uninterruptibly: a leader's acquired lease must reach the code that releases it. A
 * joiner's wait stays interruptible. A store that has not answered within `withinMillis` (past
 * which a lease it granted could not be used anyway) is given up on with a storage error, shared
 * with the joiners: a lease it grants later ends by itself.
 *
 * @internal
 */
export const acquire = (
  storage: Storage.StorageService,
  request: Storage.AcquireRequest,
  sentAt: number,
  withinMillis: number
): Effect.Effect<Shared, IdempotencyStorageError> =>
  Effect.suspend(() => {
    const flights = flightsOf(storage)
    const existing = flights.get(request.key)
    if (existing !== undefined) {
      const join = (result: Storage.AcquireResult): Shared => ({ result, flight: existing, leader: false })
      if (existing.acquired !== undefined) return Exit.map(existing.acquired, join)
      existing.acquiredSignal ??= Deferred.unsafeMake(FiberId.none)
      return Effect.map(Effect.interruptible(Deferred.await(existing.acquiredSignal)), join)
    }
    const flight: Flight = {
      key: request.key,
      fingerprint: request.fingerprint,
      acquired: undefined,
      settled: undefined,
      acquiredSignal: undefined,
      settledListeners: undefined,
      // Counted from before the acquire was sent: the store's lease cannot end sooner.
      leaseExpiresAt: sentAt + Duration.toMillis(request.lease)
    }
    flights.set(request.key, flight)
    const answered = Effect.flatMap(
      wait.runDetachedWithin(storage.acquire(request), withinMillis),
      (exit) =>
        exit ?? Effect.fail(
          new IdempotencyStorageError({
            key: request.key,
            operation: "acquire",
            cause: new Error(`the store did not answer within ${withinMillis} ms`)
          })
        )
    )
    return Effect.flatMap(Effect.exit(answered), (exit) => {
      flight.acquired = exit
      if (flight.acquiredSignal !== undefined) Deferred.unsafeDone(flight.acquiredSignal, exit)
      // Only a lease held here keeps the flight; any other answer was shared and is done.
      if (!(Exit.isSuccess(exit) && exit.value._tag === "Acquired")) remove(flights, flight)
      return Exit.map(exit, (result): Shared => ({ result, flight, leader: true }))
    })
  })

/**
 * Calls `listener` when the local run of a flight ends (at once if it has), and returns what
 * stops listening.
 *
 * @internal
 */
export const listenSettled = (flight: Flight, listener: (settlement: Settlement) => void): () => void => {
  if (flight.settled !== undefined) {
    listener(flight.settled)
    return () => {}
  }
  const listeners = flight.settledListeners ??= new Set()
  listeners.add(listener)
  return () => listeners.delete(listener)
}

/**
 * Ends a local run: wakes the local callers waiting on it and forgets the flight.
 *
 * @internal
 */
export const settle = (storage: Storage.StorageService, flight: Flight, settlement: Settlement): void => {
  const flights = registries.get(storage)
  if (flights !== undefined) remove(flights, flight)
  if (flight.settled !== undefined) return
  flight.settled = settlement
  const listeners = flight.settledListeners
  flight.settledListeners = undefined
  listeners?.forEach((listener) => listener(settlement))
}
