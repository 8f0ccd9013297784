import { assert, describe, it } from "@effect/vitest"
import { Config, ConfigError, ConfigProvider, Context, Duration, Effect, Fiber, Layer, Option, TestClock } from "effect"
import { MemoryStorage, Storage } from "../src/index.js"
import { failureOf } from "./fixtures/Exits.js"

const longLease = Duration.seconds(30)
const ttl = Duration.hours(1)
const payload = new TextEncoder().encode("1")

const acquire = (storage: Storage.StorageService, key: string, lease = longLease) =>
  storage.acquire({ key, fingerprint: "", lease })

const complete = (storage: Storage.StorageService, key: string) =>
  Effect.gen(function*() {
    const result = yield* acquire(storage, key)
    if (result._tag !== "Acquired") return assert.fail(`expected Acquired for ${key}, got ${result._tag}`)
    assert.isTrue(yield* storage.commit(result.lease, { outcome: "success", payload, ttl }))
  })

const isKept = (storage: Storage.StorageService, key: string) => Effect.map(storage.read(key), Option.isSome)

describe("MemoryStorage", () => {
  it.scoped("maxEntries evicts the oldest completed records first", () =>
    Effect.gen(function*() {
      const storage = yield* MemoryStorage.make({ maxEntries: 3 })
      yield* complete(storage, "a")
      yield* complete(storage, "b")
      yield* complete(storage, "c")
      yield* complete(storage, "d")
      assert.deepStrictEqual(
        yield* Effect.all([isKept(storage, "a"), isKept(storage, "b"), isKept(storage, "c"), isKept(storage, "d")]),
        [false, true, true, true]
      )
    }))

  it.scoped("maxEntries never evicts an in-flight key, and fails closed when only in-flight keys are left", () =>
    Effect.gen(function*() {
      const storage = yield* MemoryStorage.make({ maxEntries: 2 })
      yield* complete(storage, "done")
      const held = yield* acquire(storage, "held")
      assert.strictEqual(held._tag, "Acquired")
      // Room is made by evicting the completed record, not the in-flight one.
      assert.strictEqual((yield* acquire(storage, "new"))._tag, "Acquired")
      assert.isFalse(yield* isKept(storage, "done"))
      assert.strictEqual((yield* acquire(storage, "held"))._tag, "InFlight")
      const full = yield* Effect.flip(acquire(storage, "one too many"))
      assert.strictEqual(full._tag, "IdempotencyStorageError")
      assert.strictEqual(full.operation, "acquire")
    }))

  it.scoped("leases and TTLs follow the Clock (TestClock here)", () =>
    Effect.gen(function*() {
      const storage = yield* MemoryStorage.make()
      const first = yield* acquire(storage, "lease", Duration.seconds(10))
      yield* TestClock.adjust("9 seconds")
      const inFlight = yield* acquire(storage, "lease")
      if (inFlight._tag !== "InFlight") return assert.fail("expected InFlight")
      assert.strictEqual(Duration.toMillis(inFlight.leaseRemaining), 1000)
      yield* TestClock.adjust("1 second")
      const second = yield* acquire(storage, "lease")
      assert.strictEqual(second._tag, "Acquired")
      if (first._tag === "Acquired" && second._tag === "Acquired") assert.isTrue(second.lease.fence > first.lease.fence)

      yield* complete(storage, "ttl")
      yield* TestClock.adjust("59 minutes")
      assert.isTrue(yield* isKept(storage, "ttl"))
      yield* TestClock.adjust("1 minute")
      assert.isFalse(yield* isKept(storage, "ttl"))
    }))

  it.scoped("the sweeper drops expired records on its interval", () =>
    Effect.gen(function*() {
      const storage = yield* MemoryStorage.make({ maxEntries: 2, sweepInterval: "1 minute" })
      yield* complete(storage, "old")
      const held = yield* acquire(storage, "abandoned", Duration.seconds(5))
      assert.strictEqual(held._tag, "Acquired")
      yield* TestClock.adjust("61 minutes")
      // Both slots were freed by the sweep, so two new in-flight keys fit without evicting anything.
      assert.strictEqual((yield* acquire(storage, "x"))._tag, "Acquired")
      assert.strictEqual((yield* acquire(storage, "y"))._tag, "Acquired")
    }))

  it.scoped("a watcher is woken by the commit itself, with the clock stopped", () =>
    Effect.gen(function*() {
      const storage = yield* MemoryStorage.make()
      const held = yield* acquire(storage, "k")
      if (held._tag !== "Acquired") return assert.fail("expected Acquired")
      const changed = yield* storage.watch("k")
      const waiter = yield* Effect.fork(changed)
      yield* Effect.yieldNow()
      assert.isTrue(Option.isNone(yield* Fiber.poll(waiter)))
      yield* storage.commit(held.lease, { outcome: "success", payload, ttl })
      yield* Fiber.join(waiter)
    }))

  it.effect("each build of the layer is its own store", () =>
    Effect.gen(function*() {
      const a = yield* Effect.provide(Storage.Storage, MemoryStorage.layer())
      const b = yield* Effect.provide(Storage.Storage, MemoryStorage.layer())
      assert.strictEqual((yield* acquire(a, "k"))._tag, "Acquired")
      assert.strictEqual((yield* acquire(b, "k"))._tag, "Acquired")
    }))

  describe("layerConfig", () => {
    const configured = (entries: ReadonlyArray<readonly [string, string]>) =>
      Effect.exit(
        Effect.map(
          Layer.build(MemoryStorage.layerConfig({
            maxEntries: Config.integer("IDEMPOTENCY_MAX_ENTRIES"),
            sweepInterval: Config.duration("IDEMPOTENCY_SWEEP_INTERVAL").pipe(Config.withDefault("1 minute"))
          })),
          Context.get(Storage.Storage)
        ).pipe(Effect.withConfigProvider(ConfigProvider.fromMap(new Map(entries))))
      )

    it.scoped("reads its options from Config: maxEntries from the provider bounds the store", () =>
      Effect.gen(function*() {
        const exit = yield* configured([["IDEMPOTENCY_MAX_ENTRIES", "2"], ["IDEMPOTENCY_SWEEP_INTERVAL", "1 minute"]])
        if (exit._tag !== "Success") return assert.fail("expected the layer to build")
        const storage = exit.value
        yield* complete(storage, "a")
        yield* complete(storage, "b")
        yield* complete(storage, "c")
        assert.deepStrictEqual(
          yield* Effect.all([isKept(storage, "a"), isKept(storage, "b"), isKept(storage, "c")]),
          [false, true, true]
        )
      }))

    it.scoped("a value that is missing or cannot be read fails the build with its ConfigError", () =>
      Effect.gen(function*() {
        for (const entries of [[], [["IDEMPOTENCY_MAX_ENTRIES", "many"]]] as const) {
          assert.isTrue(ConfigError.isConfigError(failureOf(yield* configured(entries))), JSON.stringify(entries))
        }
      }))
  })
})
