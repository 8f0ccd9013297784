import * as Deferred from "effect/Deferred"
import * as Effect from "effect/Effect"
import * as Exit from "effect/Exit"
import * as FiberId from "effect/FiberId"
import type { IdempotencyStorageError } from "../IdempotencyError.js"
import type { IdempotencyRecord } from "../IdempotencyRecord.js"
import type * as Storage from "../Storage.js"

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
  readonly acquired: Deferred.Deferred<Storage.AcquireResult, IdempotencyStorageError>
  readonly settled: Deferred.Deferred<Settlement>
  /** Epoch millis when the local holder's lease ends; moved on by each renewal. */
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

const remove = (flights: Map<string, Flight>, flight: Flight) => {
  if (flights.get(flight.key) === flight) flights.delete(flight.key)
}

/**
 * Acquires through the store, or joins a local acquire or run already under way.
 *
 * Run it uninterruptibly: a leader's acquired lease must reach the code that releases it. A
 * joiner's wait stays interruptible.
 *
 * @internal
 */
export const acquire = (
  storage: Storage.StorageService,
  request: Storage.AcquireRequest
): Effect.Effect<Shared, IdempotencyStorageError> =>
  Effect.suspend(() => {
    const flights = flightsOf(storage)
    const existing = flights.get(request.key)
    if (existing !== undefined) {
      return Effect.map(
        Effect.interruptible(Deferred.await(existing.acquired)),
        (result): Shared => ({ result, flight: existing, leader: false })
      )
    }
    const flight: Flight = {
      key: request.key,
      fingerprint: request.fingerprint,
      acquired: Deferred.unsafeMake(FiberId.none),
      settled: Deferred.unsafeMake(FiberId.none),
      leaseExpiresAt: 0
    }
    flights.set(request.key, flight)
    return Effect.flatMap(Effect.exit(storage.acquire(request)), (exit) => {
      Deferred.unsafeDone(flight.acquired, exit)
      // Only a lease held here keeps the flight; any other answer was shared and is done.
      if (!(Exit.isSuccess(exit) && exit.value._tag === "Acquired")) remove(flights, flight)
      return Exit.map(exit, (result): Shared => ({ result, flight, leader: true }))
    })
  })

/**
 * Ends a local run: wakes the local callers waiting on it and forgets the flight.
 *
 * @internal
 */
export const settle = (storage: Storage.StorageService, flight: Flight, settlement: Settlement): void => {
  const flights = registries.get(storage)
  if (flights !== undefined) remove(flights, flight)
  Deferred.unsafeDone(flight.settled, Exit.succeed(settlement))
}
