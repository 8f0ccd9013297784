import { assert, describe, it } from "@effect/vitest"
import { Cause, Deferred, Duration, Effect, Exit, Fiber, Option, Schema, TestClock } from "effect"
import { IdempotencyError, Idempotent, Storage } from "../src/index.js"
import { countingLayer, otherProcess, StorageCounts } from "./fixtures/CountingStorage.js"
import { ended, failsWith, failureOf, poll, runNow, successOf } from "./fixtures/Exits.js"

const {
  IdempotencyInFlight,
  IdempotencyKeyInvalid,
  IdempotencyKeyReused,
  IdempotencyStorageError
} = IdempotencyError

class OutOfStock extends Schema.TaggedError<OutOfStock>()("OutOfStock", { sku: Schema.String }) {}

class PaymentDeclined extends Schema.TaggedError<PaymentDeclined>()("PaymentDeclined", {
  reason: Schema.String
}) {}

class Order extends Schema.Class<Order>("Order")({
  id: Schema.String,
  placedAt: Schema.Date,
  total: Schema.BigInt,
  note: Schema.Option(Schema.String),
  coupon: Schema.Option(Schema.String)
}) {}

/** The same calls, seen from a second process sharing the store. */
const fromOtherProcess = Effect.map(Storage.Storage, (storage) => otherProcess(storage))

const wait = { wait: "10 seconds" } as const

describe("Idempotent.wrap", () => {
  describe("runs once, replays after", () => {
    it.effect("runs the effect on the first call and replays its value to the next (data-last)", () =>
      Effect.gen(function*() {
        const counts = yield* StorageCounts
        let runs = 0
        const createOrder = Effect.sync(() => ({ id: `order-${++runs}`, total: 42 })).pipe(
          Idempotent.wrap({ key: "request-1" })
        )
        const first = yield* createOrder
        const second = yield* createOrder
        assert.strictEqual(runs, 1)
        assert.deepStrictEqual(first, { id: "order-1", total: 42 })
        assert.deepStrictEqual(second, first)
        assert.strictEqual(counts.commit, 1)
      }).pipe(Effect.provide(countingLayer())))

    it.effect("works data-first: Idempotent.wrap(effect, options)", () =>
      Effect.gen(function*() {
        let runs = 0
        const createOrder = Idempotent.wrap(Effect.sync(() => `order-${++runs}`), { key: "request-1" })
        assert.strictEqual(yield* createOrder, "order-1")
        assert.strictEqual(yield* createOrder, "order-1")
        assert.strictEqual(runs, 1)
      }).pipe(Effect.provide(countingLayer())))

    it.effect("runs once per key: other keys run on their own", () =>
      Effect.gen(function*() {
        let runs = 0
        const call = (key: string) => Effect.sync(() => `${key}:${++runs}`).pipe(Idempotent.wrap({ key }))
        assert.strictEqual(yield* call("a"), "a:1")
        assert.strictEqual(yield* call("b"), "b:2")
        assert.strictEqual(yield* call("a"), "a:1")
        assert.strictEqual(runs, 2)
      }).pipe(Effect.provide(countingLayer())))
  })

  describe("stored results", () => {
    it.effect("a Schema.Class success with a Date, a bigint and Options comes back as an instance", () =>
      Effect.gen(function*() {
        let runs = 0
        const placedAt = new Date("2024-05-06T07:08:09.010Z")
        const createOrder = Effect.sync(() => {
          runs++
          return new Order({
            id: "o-7",
            placedAt,
            total: 12345678901234567890n,
            note: Option.some("gift"),
            coupon: Option.none()
          })
        }).pipe(Idempotent.wrap({ key: "order-7", success: Order }))

        const first = yield* createOrder
        const other = yield* fromOtherProcess
        const replayed = yield* Effect.provideService(createOrder, Storage.Storage, other.storage)

        assert.strictEqual(runs, 1)
        assert.notStrictEqual(replayed, first, "the replay is decoded from the store, not the same object")
        assert.instanceOf(replayed, Order)
        assert.instanceOf(replayed.placedAt, Date)
        assert.strictEqual(replayed.placedAt.getTime(), placedAt.getTime())
        assert.strictEqual(replayed.total, 12345678901234567890n)
        assert.deepStrictEqual(replayed.note, Option.some("gift"))
        assert.isTrue(Option.isNone(replayed.coupon))

        const record = yield* other.storage.read("order-7")
        assert.isTrue(Option.isSome(record))
        assert.deepStrictEqual(JSON.parse(new TextDecoder().decode(Option.getOrThrow(record).payload)), {
          id: "o-7",
          placedAt: "2024-05-06T07:08:09.010Z",
          total: "12345678901234567890",
          note: { _tag: "Some", value: "gift" },
          coupon: { _tag: "None" }
        })
      }).pipe(Effect.provide(countingLayer())))

    it.effect("without a schema the value is stored as JSON", () =>
      Effect.gen(function*() {
        let runs = 0
        const value = { a: 1, list: [1, "x", null], nested: { ok: true } }
        const call = Effect.sync(() => {
          runs++
          return value
        }).pipe(Idempotent.wrap({ key: "json-1" }))
        yield* call
        const replayed = yield* call
        assert.strictEqual(runs, 1)
        assert.deepStrictEqual(replayed, value)
        const storage = yield* Storage.Storage
        const record = Option.getOrThrow(yield* storage.read("json-1"))
        assert.strictEqual(new TextDecoder().decode(record.payload), JSON.stringify(value))
      }).pipe(Effect.provide(countingLayer())))

    it.effect("an Effect<void> replays undefined", () =>
      Effect.gen(function*() {
        let runs = 0
        const sendEmail: Effect.Effect<void> = Effect.sync(() => {
          runs++
        })
        const call = sendEmail.pipe(Idempotent.wrap({ key: "email-1" }))
        assert.isUndefined(yield* call)
        const replay = yield* Effect.exit(call)
        assert.isUndefined(successOf(replay))
        assert.strictEqual(runs, 1)
      }).pipe(Effect.provide(countingLayer())))
  })

  describe("failures", () => {
    it.effect("a failure the failure schema encodes is stored and replayed without running", () =>
      Effect.gen(function*() {
        let runs = 0
        const reserve = Effect.suspend(() => {
          runs++
          return Effect.fail(new OutOfStock({ sku: "sku-1" }))
        }).pipe(Idempotent.wrap({ key: "reserve-1", failure: OutOfStock }))

        const first = failsWith(yield* Effect.exit(reserve), OutOfStock)
        const replayed = failsWith(yield* Effect.exit(reserve), OutOfStock)
        assert.strictEqual(runs, 1)
        assert.strictEqual(first.sku, "sku-1")
        assert.strictEqual(replayed._tag, "OutOfStock")
        assert.strictEqual(replayed.sku, "sku-1")
      }).pipe(Effect.provide(countingLayer())))

    it.effect("a failure the schema does not encode releases the key: the next call runs", () =>
      Effect.gen(function*() {
        const counts = yield* StorageCounts
        let runs = 0
        const pay = Effect.suspend(() =>
          ++runs === 1 ? Effect.fail(new PaymentDeclined({ reason: "card expired" })) : Effect.succeed("paid")
        ).pipe(Idempotent.wrap({ key: "pay-1", failure: OutOfStock }))

        assert.strictEqual(failsWith(yield* Effect.exit(pay), PaymentDeclined).reason, "card expired")
        assert.strictEqual(yield* pay, "paid")
        assert.strictEqual(yield* pay, "paid")
        assert.strictEqual(runs, 2)
        assert.strictEqual(counts.release, 1)
      }).pipe(Effect.provide(countingLayer())))

    it.effect("without a failure schema no failure is stored", () =>
      Effect.gen(function*() {
        let runs = 0
        const reserve = Effect.suspend(() =>
          ++runs === 1 ? Effect.fail(new OutOfStock({ sku: "sku-1" })) : Effect.succeed("reserved")
        ).pipe(Idempotent.wrap({ key: "reserve-2" }))
        failsWith(yield* Effect.exit(reserve), OutOfStock)
        assert.strictEqual(yield* reserve, "reserved")
        assert.strictEqual(runs, 2)
      }).pipe(Effect.provide(countingLayer())))

    it.effect("a defect releases the key", () =>
      Effect.gen(function*() {
        let runs = 0
        const job = Effect.suspend(() => ++runs === 1 ? Effect.die(new Error("boom")) : Effect.succeed("ok")).pipe(
          Idempotent.wrap({ key: "job-1", failure: OutOfStock })
        )
        const first = yield* Effect.exit(job)
        assert.isTrue(Exit.isFailure(first) && Cause.isDie(first.cause))
        assert.strictEqual(yield* job, "ok")
        assert.strictEqual(runs, 2)
      }).pipe(Effect.provide(countingLayer())))

    it.effect("interrupting the caller releases the key at once, without waiting for the lease", () =>
      Effect.gen(function*() {
        const counts = yield* StorageCounts
        const started = yield* Deferred.make<void>()
        let runs = 0
        let interrupted = false
        const slow = Effect.sync(() => runs++).pipe(
          Effect.zipRight(Deferred.succeed(started, undefined)),
          Effect.zipRight(Effect.never),
          Effect.onInterrupt(() => Effect.sync(() => (interrupted = true)))
        )
        const first = yield* Effect.fork(Idempotent.wrap(slow, { key: "job-2" }))
        yield* Deferred.await(started)
        yield* Fiber.interrupt(first)

        const retry = Effect.sync(() => {
          runs++
          return "retried"
        }).pipe(Idempotent.wrap({ key: "job-2" }))
        // No clock moves: were the key left to its lease, this would fail with IdempotencyInFlight.
        assert.strictEqual(yield* retry, "retried")
        assert.isTrue(interrupted)
        assert.strictEqual(runs, 2)
        assert.strictEqual(counts.release, 1)
      }).pipe(Effect.provide(countingLayer())))
  })

  describe("fingerprint", () => {
    it.effect("ignores object key order", () =>
      Effect.gen(function*() {
        let runs = 0
        const call = (fingerprint: unknown) =>
          Effect.sync(() => ++runs).pipe(Idempotent.wrap({ key: "fp-1", fingerprint }))
        assert.strictEqual(yield* call({ a: 1, b: { c: 2, d: [1, 2] } }), 1)
        assert.strictEqual(yield* call({ b: { d: [1, 2], c: 2 }, a: 1 }), 1)
        assert.strictEqual(runs, 1)
      }).pipe(Effect.provide(countingLayer())))

    it.effect("another fingerprint after completion fails with IdempotencyKeyReused", () =>
      Effect.gen(function*() {
        let runs = 0
        const call = (fingerprint: unknown) =>
          Effect.sync(() => ++runs).pipe(Idempotent.wrap({ key: "fp-2", fingerprint }))
        yield* call({ amount: 100, items: [1, 2] })
        assert.strictEqual(
          failsWith(yield* Effect.exit(call({ amount: 200, items: [1, 2] })), IdempotencyKeyReused).key,
          "fp-2"
        )
        assert.strictEqual(
          failsWith(yield* Effect.exit(call({ amount: 100, items: [2, 1] })), IdempotencyKeyReused)._tag,
          "IdempotencyKeyReused"
        )
        assert.strictEqual(yield* call({ items: [1, 2], amount: 100 }), 1)
        assert.strictEqual(runs, 1)
      }).pipe(Effect.provide(countingLayer())))

    it.effect("another fingerprint while the first run is in flight: KeyReused wins, also in wait mode", () =>
      Effect.gen(function*() {
        let runs = 0
        const call = (fingerprint: unknown, onInFlight: Idempotent.OnInFlight) =>
          Effect.sleep("10 seconds").pipe(
            Effect.zipRight(Effect.sync(() => ++runs)),
            Idempotent.wrap({ key: "fp-3", fingerprint, onInFlight })
          )
        const first = yield* Effect.fork(call({ amount: 100 }, "fail"))
        yield* TestClock.adjust(Duration.zero)
        const other = yield* fromOtherProcess

        // The same request is in flight; another one is a reuse, locally and from another process.
        failsWith(yield* runNow(call({ amount: 100 }, "fail")), IdempotencyInFlight)
        for (const onInFlight of ["fail", wait] as const) {
          failsWith(yield* runNow(call({ amount: 200 }, onInFlight)), IdempotencyKeyReused)
          failsWith(
            yield* runNow(Effect.provideService(call({ amount: 200 }, onInFlight), Storage.Storage, other.storage)),
            IdempotencyKeyReused
          )
        }

        yield* TestClock.adjust("10 seconds")
        assert.strictEqual(yield* Fiber.join(first), 1)
        assert.strictEqual(runs, 1)
      }).pipe(Effect.provide(countingLayer())))

    it.effect("an unencodable fingerprint is refused before storage is touched", () =>
      Effect.gen(function*() {
        const counts = yield* StorageCounts
        const cycle: Record<string, unknown> = { name: "loop" }
        cycle.self = cycle
        const fingerprints: ReadonlyArray<unknown> = [
          { amount: 10n },
          cycle,
          () => "a function",
          new Map([["a", 1]]),
          { tags: new Set(["a"]) },
          { amount: Number.NaN },
          Symbol("s")
        ]
        let runs = 0
        for (const fingerprint of fingerprints) {
          const call = Effect.sync(() => ++runs).pipe(Idempotent.wrap({ key: "fp-4", fingerprint }))
          const error = failsWith(yield* Effect.exit(call), IdempotencyKeyInvalid)
          assert.strictEqual(error.reason, "unencodable-fingerprint")
        }
        assert.strictEqual(runs, 0)
        assert.deepStrictEqual(counts, { acquire: 0, renew: 0, commit: 0, release: 0, read: 0, delete: 0, watch: 0 })
      }).pipe(Effect.provide(countingLayer())))
  })

  describe("keys", () => {
    it.effect("an empty, too long or control-character key is refused before storage is touched", () =>
      Effect.gen(function*() {
        const counts = yield* StorageCounts
        const invalid: ReadonlyArray<readonly [string, IdempotencyError.KeyInvalidReason]> = [
          ["", "empty"],
          ["k".repeat(256), "too-long"],
          ["🔑".repeat(256), "too-long"],
          ["line\nbreak", "control-character"],
          ["nul\u0000", "control-character"],
          ["del\u007f", "control-character"],
          ["tab\there", "control-character"],
          ["c1\u0085", "control-character"]
        ]
        let runs = 0
        for (const [key, reason] of invalid) {
          const exit = yield* Effect.exit(Effect.sync(() => ++runs).pipe(Idempotent.wrap({ key })))
          assert.strictEqual(failsWith(exit, IdempotencyKeyInvalid).reason, reason, JSON.stringify(key))
        }
        assert.strictEqual(runs, 0)
        assert.deepStrictEqual(counts, { acquire: 0, renew: 0, commit: 0, release: 0, read: 0, delete: 0, watch: 0 })
      }).pipe(Effect.provide(countingLayer())))

    it.effect("255 characters, 255 emoji (code points), unicode and spaces are valid keys", () =>
      Effect.gen(function*() {
        const emoji = "😀".repeat(255)
        assert.isAbove(emoji.length, 255, "more than 255 UTF-16 units")
        const keys = ["k".repeat(255), emoji, "ключ 鍵 clé", " spaces around "]
        let runs = 0
        for (const key of keys) {
          const call = Effect.sync(() => ++runs).pipe(Idempotent.wrap({ key }))
          const first = yield* call
          assert.strictEqual(yield* call, first, key)
        }
        assert.strictEqual(runs, keys.length)
      }).pipe(Effect.provide(countingLayer())))
  })

  describe("onInFlight: \"fail\"", () => {
    it.effect("a duplicate fails at once with IdempotencyInFlight carrying the lease left", () =>
      Effect.gen(function*() {
        let runs = 0
        const call = Effect.sleep("1 minute").pipe(
          Effect.zipRight(Effect.sync(() => ++runs)),
          Idempotent.wrap({ key: "slow-1", lease: "30 seconds" })
        )
        const first = yield* Effect.fork(call)
        const other = yield* fromOtherProcess
        const retryAfter = Effect.gen(function*() {
          const local = failsWith(yield* runNow(call), IdempotencyInFlight)
          const remote = failsWith(
            yield* runNow(Effect.provideService(call, Storage.Storage, other.storage)),
            IdempotencyInFlight
          )
          return [Duration.toMillis(local.retryAfter), Duration.toMillis(remote.retryAfter)]
        })

        yield* TestClock.adjust("5 seconds")
        assert.deepStrictEqual(yield* retryAfter, [25_000, 25_000])
        // Renewed at 10 seconds (every third of the lease), so at 12 seconds 28 are left.
        yield* TestClock.adjust("7 seconds")
        assert.deepStrictEqual(yield* retryAfter, [28_000, 28_000])

        yield* TestClock.adjust("48 seconds")
        assert.strictEqual(yield* Fiber.join(first), 1)
        assert.strictEqual(runs, 1)
      }).pipe(Effect.provide(countingLayer())))
  })

  describe("onInFlight: { wait }", () => {
    it.effect("duplicates are woken with the first run's result when it completes", () =>
      Effect.gen(function*() {
        let runs = 0
        const call = Effect.sleep("5 seconds").pipe(
          Effect.zipRight(Effect.sync(() => `run ${++runs}`)),
          Idempotent.wrap({ key: "wait-1", onInFlight: wait })
        )
        const first = yield* Effect.fork(call)
        yield* TestClock.adjust(Duration.zero)
        const other = yield* fromOtherProcess
        const local = yield* Effect.fork(call)
        const remote = yield* Effect.fork(Effect.provideService(call, Storage.Storage, other.storage))
        yield* TestClock.adjust("4 seconds")
        assert.isUndefined(yield* poll(local))
        assert.isUndefined(yield* poll(remote))

        // Only the first run's own delay passes: the waiters are woken, not polling on a timer.
        yield* TestClock.adjust("1 second")
        assert.strictEqual(successOf(yield* Fiber.await(first)), "run 1")
        assert.strictEqual(successOf(yield* ended(local)), "run 1")
        assert.strictEqual(successOf(yield* ended(remote)), "run 1")
        assert.strictEqual(runs, 1)
        // Acquire, then subscribe and look again, then one look after the wake-up.
        assert.isAtMost(other.counts.acquire, 3)
      }).pipe(Effect.provide(countingLayer())))

    it.effect("at the deadline, with the first run still going, a waiter fails with IdempotencyInFlight", () =>
      Effect.gen(function*() {
        let runs = 0
        const call = Effect.sleep("1 minute").pipe(
          Effect.zipRight(Effect.sync(() => ++runs)),
          Idempotent.wrap({ key: "wait-2", onInFlight: wait })
        )
        const first = yield* Effect.fork(call)
        yield* TestClock.adjust(Duration.zero)
        const other = yield* fromOtherProcess
        const local = yield* Effect.fork(call)
        const remote = yield* Effect.fork(Effect.provideService(call, Storage.Storage, other.storage))

        yield* TestClock.adjust("9 seconds")
        assert.isUndefined(yield* poll(local))
        assert.isUndefined(yield* poll(remote))
        yield* TestClock.adjust("1 second")
        for (const waiter of [local, remote]) {
          const error = failsWith(yield* ended(waiter), IdempotencyInFlight)
          assert.isAbove(Duration.toMillis(error.retryAfter), 0)
        }
        yield* TestClock.adjust("50 seconds")
        assert.strictEqual(yield* Fiber.join(first), 1)
        assert.strictEqual(runs, 1)
      }).pipe(Effect.provide(countingLayer())))

    // On the live clock a local waiter is a timer and a listener on the run, not a forked race:
    // the same outcomes on real time.
    it.live("on the live clock, local waiters are woken by the run's end, or fail at their deadline", () =>
      Effect.gen(function*() {
        let runs = 0
        const gate = yield* Deferred.make<void>()
        const call = (onInFlight: { readonly wait: Duration.DurationInput }) =>
          Deferred.await(gate).pipe(
            Effect.zipRight(Effect.sync(() => ++runs)),
            Idempotent.wrap({ key: "wait-live", onInFlight })
          )
        const first = yield* Effect.fork(call(wait))
        yield* Effect.sleep("20 millis")
        const patient = yield* Effect.fork(call(wait))
        const hasty = yield* Effect.fork(call({ wait: "50 millis" }))
        const hastyExit = yield* Fiber.await(hasty)
        failsWith(hastyExit, IdempotencyInFlight)
        assert.isUndefined(yield* poll(patient))
        yield* Deferred.succeed(gate, undefined)
        assert.strictEqual(yield* Fiber.join(first), 1)
        assert.strictEqual(yield* Fiber.join(patient), 1)
        assert.strictEqual(runs, 1)
      }).pipe(Effect.provide(countingLayer())))

    it.effect("if the first run releases the key, a waiter runs the effect itself", () =>
      Effect.gen(function*() {
        let runs = 0
        const first = yield* Effect.fork(
          Effect.sleep("5 seconds").pipe(
            Effect.zipRight(Effect.sync(() => runs++)),
            Effect.zipRight(Effect.fail(new PaymentDeclined({ reason: "timeout upstream" }))),
            Idempotent.wrap({ key: "wait-3", failure: OutOfStock, onInFlight: wait })
          )
        )
        yield* TestClock.adjust(Duration.zero)
        const retry = Effect.sync(() => {
          runs++
          return "retried"
        }).pipe(Idempotent.wrap({ key: "wait-3", failure: OutOfStock, onInFlight: wait }))
        const other = yield* fromOtherProcess
        const local = yield* Effect.fork(retry)
        const remote = yield* Effect.fork(Effect.provideService(retry, Storage.Storage, other.storage))

        yield* TestClock.adjust("5 seconds")
        failsWith(yield* Fiber.await(first), PaymentDeclined)
        // One of the two waiters ran the effect; the other replayed its result.
        assert.strictEqual(successOf(yield* ended(local)), "retried")
        assert.strictEqual(successOf(yield* ended(remote)), "retried")
        assert.strictEqual(runs, 2)
      }).pipe(Effect.provide(countingLayer())))

    it.effect("a holder whose fingerprint the store cannot tell is waited for, not spun on", () => {
      let acquires = 0
      const layer = countingLayer((inner) => ({
        // A `fromBasic` store between its lock and its marker write answers without a fingerprint.
        acquire: (request) =>
          ++acquires > 20
            ? Effect.fail(new IdempotencyStorageError({ key: request.key, operation: "acquire" }))
            : Effect.succeed(
              Storage.AcquireResult.InFlight({ fingerprint: undefined, leaseRemaining: Duration.seconds(30) })
            ),
        watch: (key) => Effect.as(inner.watch(key), Effect.never)
      }))
      return Effect.gen(function*() {
        const waiter = yield* Effect.fork(
          Effect.succeed("dup").pipe(Idempotent.wrap({ key: "wait-4", fingerprint: { a: 1 }, onInFlight: wait }))
        )
        yield* TestClock.adjust("10 seconds")
        failsWith(yield* ended(waiter), IdempotencyInFlight)
        assert.isAtMost(acquires, 3)
      }).pipe(Effect.provide(layer))
    })
  })

  describe("in-process deduplication", () => {
    it.effect("1,000 concurrent waiters: one run, one acquire, one commit, every caller gets the value", () =>
      Effect.gen(function*() {
        const counts = yield* StorageCounts
        let runs = 0
        const call = Effect.sleep("1 second").pipe(
          Effect.zipRight(Effect.sync(() => ++runs)),
          Idempotent.wrap({ key: "hot-1", onInFlight: wait })
        )
        const all = yield* Effect.fork(
          Effect.all(Array.from({ length: 1000 }, () => call), { concurrency: "unbounded" })
        )
        yield* TestClock.adjust("1 second")
        const values = yield* Fiber.join(all)
        assert.strictEqual(runs, 1)
        assert.strictEqual(values.length, 1000)
        assert.isTrue(values.every((value) => value === 1))
        assert.strictEqual(counts.acquire, 1)
        assert.strictEqual(counts.commit, 1)
      }).pipe(Effect.provide(countingLayer())))

    it.effect("1,000 concurrent duplicates in \"fail\" mode: one success, 999 IdempotencyInFlight, one acquire", () =>
      Effect.gen(function*() {
        const counts = yield* StorageCounts
        let runs = 0
        const call = Effect.sleep("1 second").pipe(
          Effect.zipRight(Effect.sync(() => ++runs)),
          Idempotent.wrap({ key: "hot-2" })
        )
        const all = yield* Effect.fork(
          Effect.all(Array.from({ length: 1000 }, () => Effect.exit(call)), { concurrency: "unbounded" })
        )
        yield* TestClock.adjust("1 second")
        const exits = yield* Fiber.join(all)
        const successes = exits.filter(Exit.isSuccess)
        const inFlight = exits.filter((exit) => Exit.isFailure(exit) && failureOf(exit)._tag === "IdempotencyInFlight")
        assert.strictEqual(successes.length, 1)
        assert.strictEqual(inFlight.length, 999)
        assert.strictEqual(runs, 1)
        assert.strictEqual(counts.acquire, 1)
      }).pipe(Effect.provide(countingLayer())))

    it.effect("local duplicates of an acquire that fails all fail closed, on one round trip", () =>
      Effect.gen(function*() {
        const counts = yield* StorageCounts
        let runs = 0
        const call = Effect.sync(() => ++runs).pipe(Idempotent.wrap({ key: "hot-3", onInFlight: wait }))
        const all = yield* Effect.fork(
          Effect.all(Array.from({ length: 10 }, () => Effect.exit(call)), { concurrency: "unbounded" })
        )
        yield* TestClock.adjust("1 second")
        const exits = yield* Fiber.join(all)
        for (const exit of exits) assert.strictEqual(failsWith(exit, IdempotencyStorageError).operation, "acquire")
        assert.strictEqual(runs, 0)
        assert.strictEqual(counts.acquire, 1)
      }).pipe(
        Effect.provide(countingLayer(() => ({
          acquire: (request) =>
            Effect.zipRight(
              Effect.sleep("1 second"),
              Effect.fail(new IdempotencyStorageError({ key: request.key, operation: "acquire" }))
            )
        })))
      ))
  })
})
