/**
 * Holes in the guarantee under faults, each shown on the memory store (and a basic store) with
 * the clock under the test's control: defects at every step, runs that would outlive their lease,
 * results that cannot be stored, records that no longer decode, keys that are not valid Unicode,
 * options that make no sense.
 */
import { assert, describe, it } from "@effect/vitest"
import { Clock, Duration, Effect, Fiber, Layer, Option, Schedule, Schema, TestClock } from "effect"
import { IdempotencyError, Idempotent, MemoryStorage, Storage } from "../src/index.js"
import { counted, countingLayer, otherProcess, StorageCounts } from "./fixtures/CountingStorage.js"
import { ended, failsWith, failureOf, successOf } from "./fixtures/Exits.js"
import * as MapBasicStorage from "./fixtures/MapBasicStorage.js"

const {
  IdempotencyInFlight,
  IdempotencyKeyInvalid,
  IdempotencyLeaseLost,
  IdempotencyOptionsInvalid,
  IdempotencyRecordUndecodable,
  IdempotencyResultNotStored,
  IdempotencyStorageError
} = IdempotencyError

const storageDown = (key: string, operation: IdempotencyError.StorageOperation) =>
  new IdempotencyStorageError({ key, operation, cause: new Error("connection reset") })

describe("Idempotent.wrap: a defect or interruption at any step settles the local flight and frees the key", () => {
  it.effect("a success schema whose encode throws: the call fails, and the next call with the key runs", () =>
    Effect.gen(function*() {
      const Throws = Schema.transform(Schema.String, Schema.String, {
        strict: true,
        decode: (s) => s,
        encode: () => {
          throw new Error("cannot encode this")
        }
      })
      let runs = 0
      const call = Effect.sync(() => `run-${++runs}`).pipe(
        Idempotent.wrap({ key: "throws-on-encode", success: Throws })
      )
      const error = failsWith(yield* Effect.exit(call), IdempotencyResultNotStored)
      assert.strictEqual(error.reason, "unencodable")
      // Not stranded in flight: the retry runs again.
      failsWith(yield* Effect.exit(call), IdempotencyResultNotStored)
      assert.strictEqual(runs, 2)
      const counts = yield* StorageCounts
      assert.strictEqual(counts.release, 2)
    }).pipe(Effect.provide(countingLayer())))

  it.effect("a custom backend whose commit dies: the caller sees the defect, the key is released, the next call runs", () =>
    Effect.gen(function*() {
      let runs = 0
      const call = Effect.sync(() => ++runs).pipe(Idempotent.wrap({ key: "commit-dies" }))
      const first = yield* Effect.exit(call)
      assert.isTrue(first._tag === "Failure" && first.cause._tag === "Die")
      // The commit dies only once: the second call runs and stores, the third replays it.
      assert.strictEqual(yield* call, 2)
      assert.strictEqual(yield* call, 2)
      assert.strictEqual(runs, 2)
    }).pipe(Effect.provide(countingLayer((inner) => {
      let died = false
      return {
        commit: (lease, request) => {
          if (died) return inner.commit(lease, request)
          died = true
          // A backend built on `Effect.promise` whose promise rejects.
          return Effect.promise(() => Promise.reject(new Error("socket hang up")))
        }
      }
    }))))

  it.effect("renewals that die: the run ends at its deadline, and the key is free once the lease ends", () =>
    Effect.gen(function*() {
      let runs = 0
      const call = (duration: Duration.DurationInput) =>
        Effect.sync(() => ++runs).pipe(
          Effect.zipLeft(Effect.sleep(duration)),
          Idempotent.wrap({ key: "renew-dies", lease: "3 seconds" })
        )
      const first = yield* Effect.fork(call("10 seconds"))
      yield* TestClock.adjust("3 seconds")
      failsWith(yield* ended(first), IdempotencyLeaseLost)
      // A call that needs no renewal gets the key once the first lease has ended in the store.
      const second = yield* Effect.fork(call(Duration.zero))
      yield* TestClock.adjust(Duration.zero)
      assert.strictEqual(successOf(yield* ended(second)), 2)
    }).pipe(Effect.provide(countingLayer(() => ({ renew: () => Effect.die(new Error("renewal bug")) })))))

  it.effect("a release that dies: the caller still gets its own failure, and local waiters are let go", () =>
    Effect.gen(function*() {
      let runs = 0
      const call = Effect.sync(() => ++runs).pipe(
        Effect.zipRight(Effect.sleep("1 second")),
        Effect.zipRight(Effect.fail("not stored" as const)),
        Idempotent.wrap({ key: "release-dies", lease: "5 seconds", onInFlight: { wait: "1 minute" } })
      )
      const first = yield* Effect.fork(call)
      yield* TestClock.adjust(Duration.zero)
      const waiter = yield* Effect.fork(call)
      yield* TestClock.adjust("1 second")
      assert.strictEqual(failureOf(yield* ended(first)), "not stored")
      // The lease could not be dropped: the waiter gets the key once it ends, and runs.
      yield* TestClock.adjust("6 seconds")
      assert.strictEqual(failureOf(yield* ended(waiter)), "not stored")
      assert.strictEqual(runs, 2)
    }).pipe(Effect.provide(countingLayer(() => ({ release: () => Effect.die(new Error("release bug")) })))))
})

describe("Idempotent.wrap: a run never outlives its lease", () => {
  it.effect("renewals that hang then fail (a partition): the run is interrupted before another process can take the key", () =>
    Effect.gen(function*() {
      const store = yield* Storage.Storage
      // Process A: its renewals reach nobody; each hangs 550 ms, then fails.
      const partitioned = counted(store, {
        renew: (lease) => Effect.zipRight(Effect.sleep("550 millis"), Effect.fail(storageDown(lease.key, "renew")))
      }).storage
      const healthy = otherProcess(store).storage
      const timeline: Array<string> = []
      const note = (event: string) =>
        Effect.map(Clock.currentTimeMillis, (now) => void timeline.push(`${now} ${event}`))
      const job = (name: string) =>
        note(`${name} start`).pipe(
          Effect.zipRight(Effect.sleep("5 seconds")),
          Effect.zipRight(note(`${name} end`)),
          Effect.onInterrupt(() => note(`${name} interrupted`)),
          Effect.as(name),
          Idempotent.wrap({ key: "partitioned", lease: "900 millis" })
        )
      const a = yield* Effect.fork(Effect.provideService(job("A"), Storage.Storage, partitioned))
      yield* TestClock.adjust(Duration.zero)
      const b = yield* Effect.fork(
        Effect.provideService(job("B"), Storage.Storage, healthy).pipe(
          Effect.retry({
            while: (error) => error instanceof IdempotencyInFlight,
            schedule: Schedule.spaced("50 millis")
          })
        )
      )
      yield* TestClock.adjust("10 seconds")
      failsWith(yield* ended(a), IdempotencyLeaseLost)
      assert.strictEqual(successOf(yield* ended(b)), "B")
      const at = (event: string) => Number(timeline.find((line) => line.endsWith(event))!.split(" ")[0])
      // A is stopped before its lease (900 ms from its acquire) ends in the store; B starts after.
      assert.isBelow(at("A interrupted"), 900, timeline.join(", "))
      assert.isAtLeast(at("B start"), 900, timeline.join(", "))
    }).pipe(Effect.provide(MemoryStorage.layer())))

  it.effect("a renewal that answers late is dated from when it was sent: the run stops by then + lease", () =>
    Effect.gen(function*() {
      const store = yield* Storage.Storage
      // Every renewal lands at once in the store, but its answer comes back 2 seconds later; the
      // third one is lost.
      let renewals = 0
      const slow = counted(store, {
        renew: (lease, duration) =>
          ++renewals >= 3
            ? Effect.zipRight(Effect.sleep("10 seconds"), Effect.fail(storageDown(lease.key, "renew")))
            : Effect.zipLeft(store.renew(lease, duration), Effect.sleep("2 seconds"))
      }).storage
      const interruptedAt: Array<number> = []
      const job = Effect.sleep("1 minute").pipe(
        Effect.onInterrupt(() => Effect.map(Clock.currentTimeMillis, (now) => void interruptedAt.push(now))),
        Idempotent.wrap({ key: "late-answers", lease: "6 seconds" })
      )
      const fiber = yield* Effect.fork(Effect.provideService(job, Storage.Storage, slow))
      yield* TestClock.adjust("1 minute")
      failsWith(yield* ended(fiber), IdempotencyLeaseLost)
      // Renewals sent at 2 s (answered at 4 s) and 6 s (answered at 8 s): the store's lease ends
      // at 6 + 6 = 12 s; counting from the answer (8 + 6 = 14 s) would overrun it.
      assert.strictEqual(interruptedAt.length, 1)
      assert.isBelow(interruptedAt[0]!, 12_000)
    }).pipe(Effect.provide(MemoryStorage.layer())))
})

describe("Idempotent.wrap: results that cannot be stored", () => {
  it.effect("a result over maxResultBytes fails with IdempotencyResultNotStored \"too-large\" and releases the key", () =>
    Effect.gen(function*() {
      const counts = yield* StorageCounts
      let runs = 0
      const call = Effect.sync(() => "x".repeat(1000 + ++runs)).pipe(
        Idempotent.wrap({ key: "big", maxResultBytes: 1000 })
      )
      const error = failsWith(yield* Effect.exit(call), IdempotencyResultNotStored)
      assert.strictEqual(error.reason, "too-large")
      assert.strictEqual(counts.commit, 0)
      failsWith(yield* Effect.exit(call), IdempotencyResultNotStored)
      assert.strictEqual(runs, 2)
    }).pipe(Effect.provide(countingLayer())))

  it.effect("the default limit is 4 MiB: 5 MiB is refused, 3 MiB is stored and replayed", () =>
    Effect.gen(function*() {
      const error = failsWith(
        yield* Effect.exit(Effect.succeed("x".repeat(5 * 1024 * 1024)).pipe(Idempotent.wrap({ key: "five-mib" }))),
        IdempotencyResultNotStored
      )
      assert.strictEqual(error.reason, "too-large")
      let runs = 0
      const call = Effect.sync(() => `${++runs}`.padEnd(3 * 1024 * 1024, "y")).pipe(
        Idempotent.wrap({ key: "three-mib" })
      )
      assert.strictEqual((yield* call).length, 3 * 1024 * 1024)
      assert.strictEqual((yield* call)[0], "1")
      assert.strictEqual(runs, 1)
    }).pipe(Effect.provide(MemoryStorage.layer())))

  it.effect("a typed failure over maxResultBytes is not stored either: the caller is told, a retry runs", () =>
    Effect.gen(function*() {
      class Rejected extends Schema.TaggedError<Rejected>()("Rejected", { reason: Schema.String }) {}
      let runs = 0
      const call = Effect.suspend(() => Effect.fail(new Rejected({ reason: "r".repeat(2000 + ++runs) }))).pipe(
        Idempotent.wrap({ key: "big-failure", failure: Rejected, maxResultBytes: 1000 })
      )
      const error = failsWith(yield* Effect.exit(call), IdempotencyResultNotStored)
      assert.strictEqual(error.reason, "too-large")
      assert.instanceOf(error.cause, Rejected)
      failsWith(yield* Effect.exit(call), IdempotencyResultNotStored)
      assert.strictEqual(runs, 2)
    }).pipe(Effect.provide(MemoryStorage.layer())))
})

describe("Idempotent.wrap: records that no longer decode, and namespaces", () => {
  const V1 = Schema.Struct({ total: Schema.Number })
  const V2 = Schema.Struct({ total: Schema.Number, currency: Schema.String })

  it.effect("a record the schema no longer decodes fails with IdempotencyRecordUndecodable, not a storage error", () =>
    Effect.gen(function*() {
      yield* Effect.succeed({ total: 1 }).pipe(Idempotent.wrap({ key: "schema-change", success: V1 }))
      const exit = yield* Effect.exit(
        Effect.succeed({ total: 2, currency: "EUR" }).pipe(Idempotent.wrap({ key: "schema-change", success: V2 }))
      )
      assert.strictEqual(failsWith(exit, IdempotencyRecordUndecodable).key, "schema-change")
    }).pipe(Effect.provide(MemoryStorage.layer())))

  it.effect("onUndecodable: \"run\" forgets the old record and runs again, once, then replays the new one", () =>
    Effect.gen(function*() {
      yield* Effect.succeed({ total: 1 }).pipe(Idempotent.wrap({ key: "rerun", success: V1 }))
      let runs = 0
      const call = Effect.sync(() => ({ total: ++runs, currency: "EUR" })).pipe(
        Idempotent.wrap({ key: "rerun", success: V2, onUndecodable: "run" })
      )
      assert.deepStrictEqual(yield* call, { total: 1, currency: "EUR" })
      assert.deepStrictEqual(yield* call, { total: 1, currency: "EUR" })
      assert.strictEqual(runs, 1)
    }).pipe(Effect.provide(MemoryStorage.layer())))

  it.effect("onUndecodable: \"run\" from several processes at once: one run, everyone gets its result", () =>
    Effect.gen(function*() {
      const store = yield* Storage.Storage
      yield* Effect.succeed({ total: 0 }).pipe(Idempotent.wrap({ key: "rerun-race", success: V1 }))
      let runs = 0
      const call = Effect.sync(() => ({ total: ++runs, currency: "EUR" })).pipe(
        Effect.zipLeft(Effect.sleep("1 second")),
        Idempotent.wrap({ key: "rerun-race", success: V2, onUndecodable: "run", onInFlight: { wait: "10 seconds" } })
      )
      const fibers = yield* Effect.forEach(
        Array.from({ length: 6 }, () => otherProcess(store).storage),
        (storage) => Effect.fork(Effect.provideService(call, Storage.Storage, storage))
      )
      yield* TestClock.adjust("5 seconds")
      for (const fiber of fibers) assert.deepStrictEqual(successOf(yield* ended(fiber)), { total: 1, currency: "EUR" })
      assert.strictEqual(runs, 1)
    }).pipe(Effect.provide(MemoryStorage.layer())))

  it.effect("namespaces keep two operations that receive the same key apart", () =>
    Effect.gen(function*() {
      const charge = Effect.succeed("charged").pipe(Idempotent.wrap({ key: "msg-1", namespace: "charge" }))
      const refund = Effect.succeed("refunded").pipe(Idempotent.wrap({ key: "msg-1", namespace: "refund" }))
      assert.strictEqual(yield* charge, "charged")
      assert.strictEqual(yield* refund, "refunded")
      assert.strictEqual(
        yield* Effect.succeed("again").pipe(Idempotent.wrap({ key: "msg-1", namespace: "charge" })),
        "charged"
      )
      // Without a namespace, the key alone.
      assert.strictEqual(yield* Effect.succeed("bare").pipe(Idempotent.wrap({ key: "msg-1" })), "bare")
      // Execution shows the key as given, not its scoped form.
      const seen = yield* Idempotent.Execution.pipe(Idempotent.wrap({ key: "msg-2", namespace: "charge" }))
      assert.strictEqual(seen.key, "msg-2")
    }).pipe(Effect.provide(MemoryStorage.layer())))
})

describe("Idempotent.wrap: keys and options refused before storage is touched", () => {
  it.effect("keys with lone surrogates are refused as invalid-unicode; U+FFFD and astral characters are keys", () =>
    Effect.gen(function*() {
      const counts = yield* StorageCounts
      for (const key of ["a\uD800", "a\uDC00", "\uDC00\uD800", "x".repeat(10) + "\uD83D"]) {
        const error = failsWith(yield* Effect.exit(Effect.void.pipe(Idempotent.wrap({ key }))), IdempotencyKeyInvalid)
        assert.strictEqual(error.reason, "invalid-unicode")
      }
      assert.strictEqual(counts.acquire, 0)
      assert.strictEqual(yield* Effect.succeed(1).pipe(Idempotent.wrap({ key: "a\uFFFD" })), 1)
      assert.strictEqual(yield* Effect.succeed(2).pipe(Idempotent.wrap({ key: "a\uD83D\uDE00" })), 2)
    }).pipe(Effect.provide(countingLayer())))

  it.effect("a zero or negative lease, a ttl shorter than the lease, a bad maxResultBytes: IdempotencyOptionsInvalid", () =>
    Effect.gen(function*() {
      const counts = yield* StorageCounts
      const cases: Array<readonly [string, Idempotent.WrapOptions<number, never>]> = [
        ["lease", { key: "k", lease: 0 }],
        ["lease", { key: "k", lease: "-5 seconds" }],
        ["lease", { key: "k", lease: Duration.infinity }],
        ["ttl", { key: "k", lease: "10 seconds", ttl: "5 seconds" }],
        ["ttl", { key: "k", ttl: "1 second" }],
        ["maxResultBytes", { key: "k", maxResultBytes: 0 }],
        ["maxResultBytes", { key: "k", maxResultBytes: 1.5 }]
      ]
      for (const [option, options] of cases) {
        const error = failsWith(
          yield* Effect.exit(Effect.succeed(1).pipe(Idempotent.wrap(options))),
          IdempotencyOptionsInvalid
        )
        assert.strictEqual(error.option, option, JSON.stringify(options))
      }
      assert.strictEqual(counts.acquire, 0)
    }).pipe(Effect.provide(countingLayer())))
})

describe("Storage.fromBasic: a store that cannot check the owner in its commit", () => {
  // Each call to the basic store takes 200 ms, so an acquire (read, lock, read, marker) takes 800.
  const slowBasic = Layer.effect(
    Storage.Storage,
    Effect.map(MapBasicStorage.makeBasic, (basic): Storage.StorageService => {
      const slow = <A, E>(effect: Effect.Effect<A, E>) => Effect.delay(effect, "200 millis")
      return Storage.fromBasic({
        get: (key) => slow(basic.get(key)),
        set: (record, ttl) => slow(basic.set(record, ttl)),
        delete: (key) => slow(basic.delete(key)),
        exists: (key) => slow(basic.exists(key)),
        tryLock: (key, ttl) => slow(basic.tryLock(key, ttl)),
        unlock: (key, token) => slow(basic.unlock(key, token))
      }, { backend: "slow-basic", pollInterval: "100 millis" })
    })
  )

  it.effect("the hard deadline counts from before the acquire: an overrunning run stops before its lock expires and writes nothing", () =>
    Effect.gen(function*() {
      const store = yield* Storage.Storage
      const events: Array<readonly [string, number]> = []
      const note = (event: string) => Effect.map(Clock.currentTimeMillis, (now) => void events.push([event, now]))
      // The lock is taken at 400 ms (after one read) and expires at 3,400; the run needs 2,700 ms
      // from 800, so it would end at 3,500, after the lock.
      const first = yield* Effect.fork(
        note("run").pipe(
          Effect.zipRight(Effect.sleep("2700 millis")),
          Effect.as("first"),
          Effect.onInterrupt(() => note("interrupted")),
          Idempotent.wrap({ key: "overrun", lease: "3 seconds" })
        )
      )
      yield* TestClock.adjust("3 seconds")
      failsWith(yield* ended(first), IdempotencyLeaseLost)
      const interrupted = events.find(([event]) => event === "interrupted")
      assert.isDefined(interrupted, JSON.stringify(events))
      assert.isBelow(interrupted![1], 3400)
      yield* TestClock.adjust("1 second")
      const second = yield* Effect.fork(
        Effect.succeed("second").pipe(Idempotent.wrap({ key: "overrun", lease: "3 seconds" }))
      )
      yield* TestClock.adjust("5 seconds")
      assert.strictEqual(successOf(yield* ended(second)), "second")
      const read = yield* Effect.fork(store.read("overrun"))
      yield* TestClock.adjust("1 second")
      const record = Option.getOrThrow(successOf(yield* ended(read)))
      assert.strictEqual(new TextDecoder().decode(record.payload), "\"second\"")
    }).pipe(Effect.provide(slowBasic)))
})

describe("Idempotent.wrap: faults found by the properties of test/properties/wrap.*.test.ts", () => {
  it.effect("an acquire answered only after its lease ran out does not run the effect: another process may hold the key", () =>
    Effect.gen(function*() {
      const store = yield* Storage.Storage
      // The store grants the lease at once, but its answer takes as long as the lease itself.
      const late = counted(store, {
        acquire: (request) => Effect.zipLeft(store.acquire(request), Effect.sleep("3 seconds"))
      }).storage
      const starts: Array<readonly [string, number]> = []
      const job = (name: string) =>
        Effect.map(Clock.currentTimeMillis, (now) => void starts.push([name, now])).pipe(
          Effect.as(name),
          Idempotent.wrap({ key: "late-acquire", lease: "3 seconds" })
        )
      const a = yield* Effect.fork(Effect.provideService(job("A"), Storage.Storage, late))
      // Process B asks once the store's lease has ended, just before A hears its answer.
      yield* TestClock.adjust("3 seconds")
      assert.strictEqual(yield* Effect.provideService(job("B"), Storage.Storage, otherProcess(store).storage), "B")
      yield* TestClock.adjust("1 second")
      // A gave up on the store at its deadline (lease - margin), before any answer.
      assert.strictEqual(failsWith(yield* ended(a), IdempotencyStorageError).operation, "acquire")
      assert.deepStrictEqual(starts, [["B", 3000]])
      // B's result is the key's.
      assert.strictEqual(yield* Effect.provideService(job("C"), Storage.Storage, otherProcess(store).storage), "B")
    }).pipe(Effect.provide(MemoryStorage.layer())))
})

describe("Idempotent.wrap: a storage call that never answers holds no caller and no key forever", () => {
  const hangs = (operation: "acquire" | "commit" | "release" | "watch") =>
    countingLayer((inner) => {
      let hung = false
      const once = <A, E, R>(call: Effect.Effect<A, E, R>): Effect.Effect<A, E, R> =>
        Effect.suspend(() => {
          if (hung) return call
          hung = true
          return Effect.never
        })
      return {
        acquire: operation === "acquire" ? (request) => once(inner.acquire(request)) : inner.acquire,
        commit: operation === "commit" ? (lease, request) => once(inner.commit(lease, request)) : inner.commit,
        release: operation === "release" ? (lease) => once(inner.release(lease)) : inner.release,
        watch: operation === "watch" ? (key) => once(inner.watch(key)) : inner.watch
      }
    })

  it.effect("an acquire that hangs: the caller and its local duplicate fail with a storage error within the lease; the next call runs", () =>
    Effect.gen(function*() {
      let runs = 0
      const call = Effect.sync(() => ++runs).pipe(
        Idempotent.wrap({ key: "acquire-hangs", lease: "3 seconds", onInFlight: { wait: "10 seconds" } })
      )
      const first = yield* Effect.fork(call)
      const duplicate = yield* Effect.fork(call)
      yield* TestClock.adjust("3 seconds")
      assert.strictEqual(failsWith(yield* ended(first), IdempotencyStorageError).operation, "acquire")
      assert.strictEqual(failsWith(yield* ended(duplicate), IdempotencyStorageError).operation, "acquire")
      assert.strictEqual(yield* call, 1)
    }).pipe(Effect.provide(hangs("acquire"))))

  it.effect("a commit that hangs: IdempotencyResultNotStored once the lease has ended; the next call runs", () =>
    Effect.gen(function*() {
      let runs = 0
      const call = Effect.sync(() => ++runs).pipe(Idempotent.wrap({ key: "commit-hangs", lease: "3 seconds" }))
      const first = yield* Effect.fork(call)
      yield* TestClock.adjust("4 seconds")
      assert.strictEqual(failsWith(yield* ended(first), IdempotencyResultNotStored).reason, "storage-failed")
      assert.strictEqual(yield* call, 2)
      assert.strictEqual(yield* call, 2)
    }).pipe(Effect.provide(hangs("commit"))))

  it.effect("a release that hangs: the caller gets its own failure once the lease has ended; the next call runs", () =>
    Effect.gen(function*() {
      let runs = 0
      const call = Effect.suspend(() => ++runs === 1 ? Effect.die("boom") : Effect.succeed(runs)).pipe(
        Idempotent.wrap({ key: "release-hangs", lease: "3 seconds" })
      )
      const first = yield* Effect.fork(call)
      yield* TestClock.adjust("4 seconds")
      const exit = yield* ended(first)
      assert.isTrue(exit._tag === "Failure" && exit.cause._tag === "Die")
      assert.strictEqual(yield* call, 2)
    }).pipe(Effect.provide(hangs("release"))))

  it.effect("a watch that hangs: a waiting duplicate fails with a storage error by the end of its wait", () =>
    Effect.gen(function*() {
      const store = yield* Storage.Storage
      const other = otherProcess(store).storage
      const first = yield* Effect.fork(
        Effect.provideService(
          Effect.sleep("5 seconds").pipe(
            Effect.as("first"),
            Idempotent.wrap({ key: "watch-hangs", lease: "3 seconds" })
          ),
          Storage.Storage,
          other
        )
      )
      yield* TestClock.adjust(Duration.zero)
      const waiter = yield* Effect.fork(
        Effect.succeed("second").pipe(
          Idempotent.wrap({ key: "watch-hangs", lease: "3 seconds", onInFlight: { wait: "2 seconds" } })
        )
      )
      yield* TestClock.adjust("2 seconds")
      assert.strictEqual(failsWith(yield* ended(waiter), IdempotencyStorageError).operation, "watch")
      yield* TestClock.adjust("4 seconds")
      assert.strictEqual(successOf(yield* ended(first)), "first")
    }).pipe(Effect.provide(hangs("watch"))))
})

describe("Idempotent.wrap: an interrupted leader does not interrupt its local duplicates", () => {
  it.effect("the first caller is interrupted while its acquire is on its way: the duplicate that joined it still runs", () =>
    Effect.gen(function*() {
      let runs = 0
      const call = Effect.sync(() => ++runs).pipe(
        Idempotent.wrap({ key: "leader-interrupted", lease: "3 seconds", onInFlight: { wait: "2 seconds" } })
      )
      const first = yield* Effect.fork(call)
      const duplicate = yield* Effect.fork(call)
      yield* Fiber.interruptFork(first)
      yield* TestClock.adjust("1 second")
      assert.strictEqual(successOf(yield* ended(duplicate)), 1)
    }).pipe(Effect.provide(countingLayer((inner) => ({
      acquire: (request) => Effect.zipLeft(inner.acquire(request), Effect.sleep("1 millis"))
    })))))
})
