import { assert, describe, it } from "@effect/vitest"
import { Duration, Effect, FiberRef, Option, TestClock } from "effect"
import { IdempotencyError, Idempotent, Storage } from "../src/index.js"
import { countingLayer, StorageCounts } from "./fixtures/CountingStorage.js"
import { ended, failsWith, poll, successOf } from "./fixtures/Exits.js"

const { IdempotencyLeaseLost, IdempotencyResultNotStored, IdempotencyStorageError } = IdempotencyError

const storageDown = (key: string, operation: IdempotencyError.StorageOperation) =>
  new IdempotencyStorageError({ key, operation, cause: new Error("connection refused") })

/** A run that takes `duration`, notes whether it was interrupted, and answers `"done"`. */
const longRun = (duration: Duration.DurationInput) => {
  const state = { runs: 0, interrupted: false }
  const effect = Effect.sync(() => state.runs++).pipe(
    Effect.zipRight(Effect.sleep(duration)),
    Effect.as("done"),
    Effect.onInterrupt(() => Effect.sync(() => (state.interrupted = true)))
  )
  return { state, effect }
}

describe("Idempotent.wrap: leases", () => {
  it.effect("renewal keeps a run longer than its lease alive, and its result is stored", () =>
    Effect.gen(function*() {
      const counts = yield* StorageCounts
      const { effect, state } = longRun("10 seconds")
      const fiber = yield* Effect.fork(Idempotent.wrap(effect, { key: "long-1", lease: "3 seconds" }))
      yield* TestClock.adjust("10 seconds")
      assert.strictEqual(successOf(yield* ended(fiber)), "done")
      assert.isFalse(state.interrupted)
      const storage = yield* Storage.Storage
      assert.isTrue(Option.isSome(yield* storage.read("long-1")))
      // Renewed every third of the lease: at 1, 2, ... 9 seconds (and maybe 10, racing the end).
      assert.isAtLeast(counts.renew, 9)
      assert.isAtMost(counts.renew, 10)
    }).pipe(Effect.provide(countingLayer())))

  it.effect("a key deleted under a running holder: the run is interrupted and fails with IdempotencyLeaseLost", () =>
    Effect.gen(function*() {
      const storage = yield* Storage.Storage
      const { effect, state } = longRun("10 seconds")
      const fiber = yield* Effect.fork(Idempotent.wrap(effect, { key: "long-2", lease: "3 seconds" }))
      yield* TestClock.adjust("500 millis")
      yield* storage.delete("long-2")
      // The next renewal, at 1 second, finds the lease gone.
      yield* TestClock.adjust("500 millis")
      const error = failsWith(yield* ended(fiber), IdempotencyLeaseLost)
      assert.strictEqual(error.key, "long-2")
      assert.strictEqual(error.fence, 1)
      assert.isTrue(state.interrupted)
      assert.strictEqual(state.runs, 1)
      assert.isTrue(Option.isNone(yield* storage.read("long-2")))
    }).pipe(Effect.provide(countingLayer())))

  it.effect("a renewal answered false (the lease was taken over) ends the run with IdempotencyLeaseLost", () =>
    Effect.gen(function*() {
      const counts = yield* StorageCounts
      const storage = yield* Storage.Storage
      const { effect, state } = longRun("10 seconds")
      const fiber = yield* Effect.fork(Idempotent.wrap(effect, { key: "long-3", lease: "3 seconds" }))
      yield* TestClock.adjust("1 second")
      failsWith(yield* ended(fiber), IdempotencyLeaseLost)
      assert.isTrue(state.interrupted)
      assert.strictEqual(counts.commit, 0)
      assert.isTrue(Option.isNone(yield* storage.read("long-3")))
    }).pipe(Effect.provide(countingLayer(() => ({ renew: () => Effect.succeed(false) })))))

  it.effect("renewal storage errors shorter than a lease are tolerated", () => {
    let renewals = 0
    const layer = countingLayer((inner) => ({
      renew: (lease, duration) =>
        ++renewals === 2 ? Effect.fail(storageDown(lease.key, "renew")) : inner.renew(lease, duration)
    }))
    return Effect.gen(function*() {
      const storage = yield* Storage.Storage
      const { effect, state } = longRun("5 seconds")
      const fiber = yield* Effect.fork(Idempotent.wrap(effect, { key: "long-4", lease: "3 seconds" }))
      yield* TestClock.adjust("5 seconds")
      assert.strictEqual(successOf(yield* ended(fiber)), "done")
      assert.isFalse(state.interrupted)
      assert.isAtLeast(renewals, 4)
      assert.isTrue(Option.isSome(yield* storage.read("long-4")))
    }).pipe(Effect.provide(layer))
  })

  it.effect("renewal storage errors for a whole lease end the run with IdempotencyLeaseLost", () =>
    Effect.gen(function*() {
      const storage = yield* Storage.Storage
      const { effect, state } = longRun("10 seconds")
      const fiber = yield* Effect.fork(Idempotent.wrap(effect, { key: "long-5", lease: "3 seconds" }))
      // Failed renewals at 1 and 2 seconds are retried: the last good renewal is less than a lease old.
      yield* TestClock.adjust("2 seconds")
      assert.isUndefined(yield* poll(fiber))
      yield* TestClock.adjust("1 second")
      failsWith(yield* ended(fiber), IdempotencyLeaseLost)
      assert.isTrue(state.interrupted)
      assert.isTrue(Option.isNone(yield* storage.read("long-5")))
    }).pipe(Effect.provide(countingLayer(() => ({ renew: (lease) => Effect.fail(storageDown(lease.key, "renew")) })))))
})

describe("Idempotent.Execution", () => {
  it.effect("the running effect reads its key and fence; a later owner gets a higher fence", () =>
    Effect.gen(function*() {
      const seen: Array<Idempotent.ExecutionInfo> = []
      const job = Effect.gen(function*() {
        const execution = yield* Idempotent.Execution
        seen.push(execution)
        if (seen.length === 1) return yield* Effect.fail(new Error("not stored: the key is released"))
        return execution.fence
      }).pipe(Idempotent.wrap({ key: "fenced-1" }))

      yield* Effect.exit(job)
      const fence = yield* job
      assert.strictEqual(yield* job, fence, "replayed, not run a third time")
      assert.strictEqual(seen.length, 2)
      assert.deepStrictEqual(seen.map((execution) => execution.key), ["fenced-1", "fenced-1"])
      assert.isAbove(seen[1]!.fence, seen[0]!.fence)
      assert.strictEqual(fence, seen[1]!.fence)
    }).pipe(Effect.provide(countingLayer())))

  it.effect("Execution is the run's own: nested runs see theirs, the caller sees none after, the run's fiber refs carry on", () =>
    Effect.gen(function*() {
      const annotation = FiberRef.unsafeMake("unset")
      const inner = Effect.map(Idempotent.Execution, (execution) => execution.key).pipe(
        Idempotent.wrap({ key: "nested-inner" })
      )
      const outer = Effect.gen(function*() {
        const before = (yield* Idempotent.Execution).key
        const nested = yield* inner
        const after = (yield* Idempotent.Execution).key
        yield* FiberRef.set(annotation, "set by the run")
        return [before, nested, after]
      }).pipe(Idempotent.wrap({ key: "nested-outer" }))

      assert.deepStrictEqual(yield* outer, ["nested-outer", "nested-inner", "nested-outer"])
      assert.isTrue(Option.isNone(yield* Effect.serviceOption(Idempotent.Execution)))
      assert.strictEqual(yield* FiberRef.get(annotation), "set by the run")
    }).pipe(Effect.provide(countingLayer())))
})

describe("Idempotent.wrap: ttl", () => {
  it.effect("a result is replayed within its ttl and run again after it", () =>
    Effect.gen(function*() {
      let runs = 0
      const call = Effect.sync(() => ++runs).pipe(Idempotent.wrap({ key: "ttl-1", ttl: "1 hour" }))
      assert.strictEqual(yield* call, 1)
      yield* TestClock.adjust("59 minutes")
      assert.strictEqual(yield* call, 1)
      yield* TestClock.adjust("2 minutes")
      assert.strictEqual(yield* call, 2)
      assert.strictEqual(yield* call, 2)
      assert.strictEqual(runs, 2)
    }).pipe(Effect.provide(countingLayer())))
})

describe("Idempotent.wrap: storage failures", () => {
  it.effect("transactional on a storage without transactions fails closed before acquiring: the effect does not run", () =>
    Effect.gen(function*() {
      const counts = yield* StorageCounts
      let runs = 0
      const exit = yield* Effect.exit(
        Effect.sync(() => ++runs).pipe(Idempotent.wrap({ key: "no-tx", transactional: true }))
      )
      assert.strictEqual(failsWith(exit, IdempotencyStorageError).operation, "transaction")
      assert.strictEqual(runs, 0)
      assert.strictEqual(counts.acquire, 0)
    }).pipe(Effect.provide(countingLayer(() => ({})))))

  it.effect("an acquire that fails fails closed with IdempotencyStorageError: the effect does not run", () =>
    Effect.gen(function*() {
      let runs = 0
      const exit = yield* Effect.exit(Effect.sync(() => ++runs).pipe(Idempotent.wrap({ key: "down-1" })))
      const error = failsWith(exit, IdempotencyStorageError)
      assert.strictEqual(error.operation, "acquire")
      assert.strictEqual(error.key, "down-1")
      assert.strictEqual(runs, 0)
    }).pipe(
      Effect.provide(countingLayer(() => ({ acquire: (request) => Effect.fail(storageDown(request.key, "acquire")) })))
    ))

  it.effect("a commit that keeps failing is retried while the lease holds, then fails with IdempotencyResultNotStored: no caller is told success", () =>
    Effect.gen(function*() {
      const counts = yield* StorageCounts
      let runs = 0
      const call = Effect.sleep("1 second").pipe(
        Effect.zipRight(Effect.sync(() => ++runs)),
        Idempotent.wrap({ key: "down-2", lease: "10 seconds", onInFlight: { wait: "30 seconds" } })
      )
      const first = yield* Effect.fork(call)
      yield* TestClock.adjust(Duration.zero)
      const duplicate = yield* Effect.fork(call)
      yield* TestClock.adjust("1 second")
      assert.isUndefined(yield* poll(first), "gave up on the commit while the lease still held")
      yield* TestClock.adjust("10 seconds")
      const error = failsWith(yield* ended(first), IdempotencyResultNotStored)
      assert.strictEqual(error.reason, "storage-failed")
      assert.strictEqual(error.key, "down-2")
      assert.isAbove(counts.commit, 3)
      // The key was released: the waiting duplicate was not handed the unstored value; it ran
      // the effect itself, and was told the same about its own result.
      yield* TestClock.adjust("12 seconds")
      failsWith(yield* ended(duplicate), IdempotencyResultNotStored)
      assert.strictEqual(runs, 2)
    }).pipe(
      Effect.provide(countingLayer(() => ({ commit: (lease) => Effect.fail(storageDown(lease.key, "commit")) })))
    ))

  it.effect("a commit failure that retrying cannot fix (retryable: false) is not retried", () =>
    Effect.gen(function*() {
      const counts = yield* StorageCounts
      let runs = 0
      const call = Effect.sync(() => ++runs).pipe(Idempotent.wrap({ key: "too-big-for-store", lease: "10 seconds" }))
      const error = failsWith(yield* Effect.exit(call), IdempotencyResultNotStored)
      assert.strictEqual(error.reason, "storage-failed")
      assert.strictEqual(counts.commit, 1)
      assert.strictEqual(counts.release, 1)
      // Released: a retry runs again.
      failsWith(yield* Effect.exit(call), IdempotencyResultNotStored)
      assert.strictEqual(runs, 2)
    }).pipe(
      Effect.provide(countingLayer(() => ({
        commit: (lease) =>
          Effect.fail(
            new IdempotencyStorageError({
              key: lease.key,
              operation: "commit",
              cause: new Error("packet too large"),
              retryable: false
            })
          )
      })))
    ))

  it.effect("a commit that fails once is retried: the result is stored and a later call replays it", () =>
    Effect.gen(function*() {
      const counts = yield* StorageCounts
      let runs = 0
      const call = Effect.sync(() => ++runs).pipe(Idempotent.wrap({ key: "flaky-commit" }))
      const first = yield* Effect.fork(call)
      yield* TestClock.adjust("1 second")
      assert.strictEqual(successOf(yield* ended(first)), 1)
      assert.strictEqual(yield* call, 1)
      assert.strictEqual(runs, 1)
      assert.strictEqual(counts.commit, 2)
    }).pipe(
      Effect.provide(countingLayer((inner) => {
        let failed = false
        return {
          commit: (lease, request) => {
            if (failed) return inner.commit(lease, request)
            failed = true
            return Effect.fail(storageDown(lease.key, "commit"))
          }
        }
      }))
    ))

  it.effect("a success the default JSON cannot encode fails with IdempotencyResultNotStored \"unencodable\" and releases the key", () =>
    Effect.gen(function*() {
      const counts = yield* StorageCounts
      const storage = yield* Storage.Storage
      let runs = 0
      // A bigint is a compile error without a schema; a cast gets past the types, not past the store.
      const call = Effect.sync(() => ({ run: ++runs, amount: 10n as unknown as number })).pipe(
        Idempotent.wrap({ key: "encode-1" })
      )
      const error = failsWith(yield* Effect.exit(call), IdempotencyResultNotStored)
      assert.strictEqual(error.reason, "unencodable")
      assert.strictEqual(counts.release, 1)
      assert.strictEqual(counts.commit, 0)
      assert.isTrue(Option.isNone(yield* storage.read("encode-1")))
      // Released, not left in flight: the retry runs (and fails to encode) again.
      failsWith(yield* Effect.exit(call), IdempotencyResultNotStored)
      assert.strictEqual(runs, 2)
    }).pipe(Effect.provide(countingLayer())))
})
