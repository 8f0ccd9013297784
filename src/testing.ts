/**
 * The conformance suite every storage backend passes, exported for authors of custom backends.
 *
 * ```ts
 * import { conformance } from "effect-idempotency/testing"
 * import * as MyStorage from "./MyStorage.js"
 *
 * conformance("MyStorage", MyStorage.layer())
 * ```
 *
 * It registers `@effect/vitest` tests that drive the {@link Storage} protocol directly (1,000
 * concurrent acquires, ownership, lease expiry, TTL, notification, large values, odd keys) and
 * through `Idempotent.wrap`. It runs on real time, since remote backends keep their own clocks.
 *
 * A guarantee that a backend declares absent in its `capabilities` (a store made with
 * `Storage.fromBasic` has no renewal, no fencing and no owner-checked commit) is not tested as if
 * present: the suite asserts the declared absence and the documented fallback instead, and the
 * test's name says so.
 *
 * @since 0.1.0
 */
import { assert, describe, layer } from "@effect/vitest"
import * as Chunk from "effect/Chunk"
import * as Duration from "effect/Duration"
import * as Effect from "effect/Effect"
import * as Either from "effect/Either"
import * as Exit from "effect/Exit"
import * as Fiber from "effect/Fiber"
import * as Layer from "effect/Layer"
import * as Option from "effect/Option"
import * as Schema from "effect/Schema"
import * as Idempotent from "./Idempotent.js"
import * as internalToken from "./internal/token.js"
import * as Storage from "./Storage.js"

/**
 * Options of the conformance suite: the base lease and TTL of its timing tests, whether builds of
 * the layer share their data, and the timeout of each test.
 *
 * @since 0.1.0
 * @category Models
 */
export interface ConformanceOptions {
  /**
   * The base lease and TTL of the timing tests. Default 300 millis: long enough for a remote
   * round trip, short enough to keep the suite quick.
   */
  readonly lease?: Duration.DurationInput | undefined
  /**
   * Whether two builds of the layer share their data, as two processes on one Redis or one
   * database do. When true, the suite also races several independent builds (each with its own
   * connections) for the same keys. Memory storage is one store per build: false.
   */
  readonly sharedAcrossBuilds?: boolean | undefined
  /** Test timeout. Default 30 seconds. */
  readonly timeout?: Duration.DurationInput | undefined
}

const uniqueKey = (label: string) => `conformance ${label} ${internalToken.make()}`

const acquireOnce = (storage: Storage.StorageService, key: string, fingerprint: string, lease: Duration.Duration) =>
  storage.acquire({ key, fingerprint, lease })

const expectAcquired = (result: Storage.AcquireResult): Storage.Lease => {
  if (result._tag !== "Acquired") assert.fail(`expected Acquired, got ${result._tag}`)
  return result.lease
}

const bytes = (text: string) => new TextEncoder().encode(text)

const randomBytes = (size: number) => {
  const out = new Uint8Array(size)
  for (let i = 0; i < size; i += 65536) crypto.getRandomValues(out.subarray(i, Math.min(size, i + 65536)))
  return out
}

/**
 * Registers the conformance suite for a storage layer.
 *
 * @example
 * ```ts
 * // test/my-storage.test.ts, run by vitest: the whole suite against your layer.
 * import { MemoryStorage } from "effect-idempotency"
 * import { conformance } from "effect-idempotency/testing"
 *
 * conformance("MemoryStorage", MemoryStorage.layer())
 * ```
 *
 * @since 0.1.0
 * @category Testing
 */
export const conformance = <E>(
  name: string,
  storageLayer: Layer.Layer<Storage.Storage, E>,
  options?: ConformanceOptions
): void => {
  const lease = Duration.decode(options?.lease ?? Duration.millis(300))
  const leaseMillis = Duration.toMillis(lease)
  const longLease = Duration.seconds(30)
  const ttl = Duration.minutes(10)
  const timeout = options?.timeout ?? Duration.seconds(30)

  layer(storageLayer, { excludeTestServices: true, timeout: Duration.minutes(1) })(`conformance: ${name}`, (it) => {
    const test = (
      title: string,
      body: (storage: Storage.StorageService) => Effect.Effect<void, unknown, Storage.Storage>
    ) => it.effect(title, () => Effect.flatMap(Storage.Storage, body), { timeout: Duration.toMillis(timeout) })

    it.effect("declares its guarantees", (ctx) =>
      Effect.gen(function*() {
        const storage = yield* Storage.Storage
        const declared = Object.entries(storage.capabilities)
        assert.deepStrictEqual(declared.map(([guarantee]) => guarantee).sort(), [
          "fencing",
          "notification",
          "ownedCommit",
          "renewal"
        ])
        const absent = declared.filter(([, held]) => held !== true).map(([guarantee]) => guarantee)
        if (absent.length > 0) {
          const message = `${name} does not guarantee ${
            absent.join(", ")
          }: the tests of those assert the declared fallback, not the guarantee`
          ctx.annotate(message)
          yield* Effect.logWarning(message)
        }
      }))

    describe("acquire", () => {
      test("1,000 concurrent acquires of one key: exactly one is acquired, the rest see it in flight", (storage) =>
        Effect.gen(function*() {
          const key = uniqueKey("atomic")
          const results = yield* Effect.all(
            Array.from({ length: 1000 }, () => acquireOnce(storage, key, "fp", longLease)),
            { concurrency: "unbounded" }
          )
          const acquired = results.filter((result) => result._tag === "Acquired")
          const inFlight = results.filter((result) => result._tag === "InFlight")
          assert.strictEqual(acquired.length, 1)
          assert.strictEqual(inFlight.length, 999)
          for (const result of inFlight) {
            if (result._tag !== "InFlight") continue
            assert.strictEqual(result.fingerprint, "fp")
            assert.isTrue(Duration.lessThanOrEqualTo(result.leaseRemaining, longLease))
            assert.isTrue(Duration.greaterThan(result.leaseRemaining, Duration.zero))
          }
        }))

      test("a completed key answers Completed with its record, to every later acquire", (storage) =>
        Effect.gen(function*() {
          const key = uniqueKey("completed")
          const owner = expectAcquired(yield* acquireOnce(storage, key, "fp-1", longLease))
          assert.isTrue(yield* storage.commit(owner, { outcome: "success", payload: bytes("{\"ok\":1}"), ttl }))
          for (let i = 0; i < 3; i++) {
            const again = yield* acquireOnce(storage, key, "fp-1", longLease)
            if (again._tag !== "Completed") return assert.fail(`expected Completed, got ${again._tag}`)
            assert.strictEqual(again.record.key, key)
            assert.strictEqual(again.record.fingerprint, "fp-1")
            assert.strictEqual(again.record.outcome, "success")
            assert.deepStrictEqual(Array.from(again.record.payload), Array.from(bytes("{\"ok\":1}")))
            assert.strictEqual(again.record.fence, owner.fence)
            assert.isTrue(again.record.expiresAt > again.record.createdAt)
          }
        }))

      test("release frees the key at once: the next acquire is a new owner", (storage) =>
        Effect.gen(function*() {
          const key = uniqueKey("release")
          const first = expectAcquired(yield* acquireOnce(storage, key, "fp", longLease))
          assert.isTrue(yield* storage.release(first))
          const second = expectAcquired(yield* acquireOnce(storage, key, "fp", longLease))
          assert.notStrictEqual(second.token, first.token)
          if (storage.capabilities.fencing) assert.isTrue(second.fence > first.fence)
          assert.isTrue(Option.isNone(yield* storage.read(key)))
        }))
    })

    describe("ownership", () => {
      test("only the owner's token renews, commits or releases", (storage) =>
        Effect.gen(function*() {
          const key = uniqueKey("owner")
          const owner = expectAcquired(yield* acquireOnce(storage, key, "fp", longLease))
          const impostor: Storage.Lease = { ...owner, token: internalToken.make() }
          assert.isFalse(yield* storage.renew(impostor, longLease))
          assert.isFalse(yield* storage.release(impostor))
          assert.strictEqual((yield* acquireOnce(storage, key, "fp", longLease))._tag, "InFlight")
          if (storage.capabilities.ownedCommit) {
            assert.isFalse(yield* storage.commit(impostor, { outcome: "success", payload: bytes("1"), ttl }))
            assert.isTrue(Option.isNone(yield* storage.read(key)))
            assert.strictEqual((yield* acquireOnce(storage, key, "fp", longLease))._tag, "InFlight")
          }
          assert.isTrue(yield* storage.commit(owner, { outcome: "success", payload: bytes("2"), ttl }))
          const record = yield* storage.read(key)
          assert.isTrue(Option.isSome(record))
          assert.deepStrictEqual(Array.from(Option.getOrThrow(record).payload), Array.from(bytes("2")))
        }))

      test("a lease that is not renewed expires: the key goes to a new owner, the old token is refused", (storage) =>
        Effect.gen(function*() {
          const key = uniqueKey("expiry")
          const first = expectAcquired(yield* acquireOnce(storage, key, "fp", lease))
          assert.strictEqual((yield* acquireOnce(storage, key, "fp", lease))._tag, "InFlight")
          yield* Effect.sleep(leaseMillis * 1.5)
          const second = expectAcquired(yield* acquireOnce(storage, key, "fp", longLease))
          assert.notStrictEqual(second.token, first.token)
          assert.isFalse(yield* storage.release(first))
          const committed = yield* storage.commit(first, { outcome: "success", payload: bytes("stale"), ttl })
          if (storage.capabilities.ownedCommit) {
            assert.isFalse(committed)
            assert.isTrue(Option.isNone(yield* storage.read(key)))
          }
          assert.isTrue(yield* storage.commit(second, { outcome: "success", payload: bytes("fresh"), ttl }))
          const record = Option.getOrThrow(yield* storage.read(key))
          assert.deepStrictEqual(Array.from(record.payload), Array.from(bytes("fresh")))
        }))

      if (options?.sharedAcrossBuilds === true) {
        it.effect(
          "independent builds of the layer race for 200 keys x 10 duplicates: 200 executions",
          () =>
            Effect.gen(function*() {
              const builds = yield* Effect.all(
                Array.from({ length: 4 }, () => Layer.build(Layer.fresh(storageLayer))),
                { concurrency: "unbounded" }
              )
              const prefix = uniqueKey("builds")
              const executions = new Map<string, number>()
              const calls = Array.from({ length: 200 * 10 }, (_, i) => {
                const key = `${prefix} ${i % 200}`
                const context = builds[i % builds.length]!
                return Effect.sync(() => {
                  executions.set(key, (executions.get(key) ?? 0) + 1)
                  return `${key} result`
                }).pipe(
                  Effect.delay("20 millis"),
                  Idempotent.wrap({ key, onInFlight: { wait: "20 seconds" } }),
                  Effect.provide(context),
                  Effect.map((value) => [key, value] as const)
                )
              })
              const results = yield* Effect.all(calls, { concurrency: "unbounded" })
              assert.strictEqual(executions.size, 200)
              for (const count of executions.values()) assert.strictEqual(count, 1)
              for (const [key, value] of results) assert.strictEqual(value, `${key} result`)
            }).pipe(Effect.scoped),
          { timeout: 120_000 }
        )
      }
    })

    describe("renewal and fencing", () => {
      test("renew extends the lease past its first end", (storage) =>
        Effect.gen(function*() {
          const key = uniqueKey("renew")
          const owner = expectAcquired(yield* acquireOnce(storage, key, "fp", lease))
          if (!storage.capabilities.renewal) {
            // Declared absent: renew refuses, and the lease ends when it was first due.
            assert.isFalse(yield* storage.renew(owner, lease))
            return
          }
          for (let i = 0; i < 3; i++) {
            yield* Effect.sleep(leaseMillis / 2)
            assert.isTrue(yield* storage.renew(owner, lease))
          }
          assert.strictEqual((yield* acquireOnce(storage, key, "fp", lease))._tag, "InFlight")
          assert.isTrue(yield* storage.commit(owner, { outcome: "success", payload: bytes("1"), ttl }))
        }))

      test("fences grow with every new owner of a key", (storage) =>
        Effect.gen(function*() {
          const key = uniqueKey("fence")
          const fences: Array<number> = []
          for (let i = 0; i < 3; i++) {
            const owner = expectAcquired(yield* acquireOnce(storage, key, "fp", longLease))
            fences.push(owner.fence)
            yield* storage.release(owner)
          }
          const expired = expectAcquired(yield* acquireOnce(storage, key, "fp", lease))
          fences.push(expired.fence)
          yield* Effect.sleep(leaseMillis * 1.5)
          fences.push(expectAcquired(yield* acquireOnce(storage, key, "fp", longLease)).fence)
          if (!storage.capabilities.fencing) {
            // Declared absent: every fence is 0.
            assert.deepStrictEqual(fences, [0, 0, 0, 0, 0])
            return
          }
          for (let i = 1; i < fences.length; i++) assert.isTrue(fences[i]! > fences[i - 1]!, `fences ${fences}`)
        }))
    })

    describe("completed records", () => {
      test("a record is replayed until its TTL, then the key is free again", (storage) =>
        Effect.gen(function*() {
          const key = uniqueKey("ttl")
          const owner = expectAcquired(yield* acquireOnce(storage, key, "fp", longLease))
          assert.isTrue(yield* storage.commit(owner, { outcome: "success", payload: bytes("1"), ttl: lease }))
          assert.isTrue(Option.isSome(yield* storage.read(key)))
          assert.strictEqual((yield* acquireOnce(storage, key, "fp", longLease))._tag, "Completed")
          yield* Effect.sleep(leaseMillis * 1.5)
          assert.isTrue(Option.isNone(yield* storage.read(key)))
          expectAcquired(yield* acquireOnce(storage, key, "fp", longLease))
        }))

      test("delete forgets a record", (storage) =>
        Effect.gen(function*() {
          const key = uniqueKey("delete")
          const owner = expectAcquired(yield* acquireOnce(storage, key, "fp", longLease))
          assert.isTrue(yield* storage.commit(owner, { outcome: "failure", payload: bytes("{}"), ttl }))
          assert.strictEqual(Option.getOrThrow(yield* storage.read(key)).outcome, "failure")
          yield* storage.delete(key)
          assert.isTrue(Option.isNone(yield* storage.read(key)))
          expectAcquired(yield* acquireOnce(storage, key, "fp", longLease))
        }))

      test("a commit retried by the token that stored the record is answered as done and changes nothing", (storage) =>
        Effect.gen(function*() {
          const key = uniqueKey("recommit")
          const owner = expectAcquired(yield* acquireOnce(storage, key, "fp", longLease))
          assert.isTrue(yield* storage.commit(owner, { outcome: "success", payload: bytes("1"), ttl }))
          const stored = Option.getOrThrow(yield* storage.read(key))
          if (!storage.capabilities.ownedCommit) return
          // Its first reply was lost, say: the retry must not read as a lost lease.
          assert.isTrue(yield* storage.commit(owner, { outcome: "failure", payload: bytes("2"), ttl: longLease }))
          const after = Option.getOrThrow(yield* storage.read(key))
          assert.deepStrictEqual(after.payload, stored.payload)
          assert.strictEqual(after.outcome, "success")
          assert.strictEqual(after.expiresAt, stored.expiresAt)
        }))

      test("delete with a fence forgets only the completed record carrying it", (storage) =>
        Effect.gen(function*() {
          const key = uniqueKey("delete-fence")
          const first = expectAcquired(yield* acquireOnce(storage, key, "fp", longLease))
          assert.isTrue(yield* storage.commit(first, { outcome: "success", payload: bytes("1"), ttl }))
          // Another fence: the record stays.
          yield* storage.delete(key, first.fence + 1)
          assert.strictEqual(Option.getOrThrow(yield* storage.read(key)).fence, first.fence)
          yield* storage.delete(key, first.fence)
          assert.isTrue(Option.isNone(yield* storage.read(key)))
          // A lease taken since is not a completed record: the old fence leaves it alone.
          const second = expectAcquired(yield* acquireOnce(storage, key, "fp", longLease))
          yield* storage.delete(key, first.fence)
          assert.strictEqual((yield* acquireOnce(storage, key, "fp", longLease))._tag, "InFlight")
          assert.isTrue(yield* storage.commit(second, { outcome: "success", payload: bytes("2"), ttl }))
          if (storage.capabilities.fencing) {
            // So is a newer record: two callers that both drop an old record cannot drop the new one.
            yield* storage.delete(key, first.fence)
            assert.deepStrictEqual(Option.getOrThrow(yield* storage.read(key)).payload, bytes("2"))
          }
        }))

      test("values up to 1 MiB come back byte for byte, and an empty one too", (storage) =>
        Effect.gen(function*() {
          for (const size of [0, 1, 65_536, 1024 * 1024]) {
            const key = uniqueKey(`size-${size}`)
            const payload = randomBytes(size)
            const owner = expectAcquired(yield* acquireOnce(storage, key, "fp", longLease))
            assert.isTrue(yield* storage.commit(owner, { outcome: "success", payload, ttl }))
            const record = Option.getOrThrow(yield* storage.read(key))
            assert.strictEqual(record.payload.length, size)
            assert.isTrue(Buffer.from(record.payload).equals(Buffer.from(payload)), `payload of ${size} bytes differs`)
          }
        }))

      test("keys with unicode, spaces, quotes and 255 characters are distinct and kept as given", (storage) =>
        Effect.gen(function*() {
          const suffix = internalToken.make().slice(0, 8)
          const keys = [
            `naïve café ${suffix}`,
            `NAÏVE CAFÉ ${suffix}`,
            `nai\u0308ve cafe\u0301 ${suffix}`,
            `🔑 ${suffix} 鍵 ключ`,
            `'; DROP TABLE x; -- ${suffix}`,
            `"quoted" \\ back {slash} ${suffix}`,
            `idem:{tag}:${suffix}`,
            `${suffix}${"x".repeat(255 - suffix.length)}`,
            `${suffix}${"🔑".repeat(255 - suffix.length)}`
          ]
          for (const [i, key] of keys.entries()) {
            const owner = expectAcquired(yield* acquireOnce(storage, key, `fp-${i}`, longLease))
            assert.isTrue(yield* storage.commit(owner, { outcome: "success", payload: bytes(String(i)), ttl }))
          }
          for (const [i, key] of keys.entries()) {
            const result = yield* acquireOnce(storage, key, `fp-${i}`, longLease)
            if (result._tag !== "Completed") return assert.fail(`expected Completed for key ${i}`)
            assert.strictEqual(result.record.key, key)
            assert.strictEqual(result.record.fingerprint, `fp-${i}`)
            assert.strictEqual(new TextDecoder().decode(result.record.payload), String(i))
          }
        }))
    })

    describe("watch", () => {
      test("a waiter wakes on commit", (storage) =>
        Effect.gen(function*() {
          const key = uniqueKey("wake-commit")
          const owner = expectAcquired(yield* acquireOnce(storage, key, "fp", longLease))
          const changed = yield* storage.watch(key)
          const waiter = yield* Effect.fork(changed)
          yield* Effect.sleep("20 millis")
          yield* storage.commit(owner, { outcome: "success", payload: bytes("1"), ttl })
          const woke = yield* Fiber.join(waiter).pipe(Effect.timeout("5 seconds"), Effect.either)
          assert.isTrue(Either.isRight(woke), "the waiter was not woken within 5 seconds of the commit")
        }).pipe(Effect.scoped))

      test("a waiter wakes on release", (storage) =>
        Effect.gen(function*() {
          const key = uniqueKey("wake-release")
          const owner = expectAcquired(yield* acquireOnce(storage, key, "fp", longLease))
          const changed = yield* storage.watch(key)
          const waiter = yield* Effect.fork(changed)
          yield* Effect.sleep("20 millis")
          yield* storage.release(owner)
          const woke = yield* Fiber.join(waiter).pipe(Effect.timeout("5 seconds"), Effect.either)
          assert.isTrue(Either.isRight(woke), "the waiter was not woken within 5 seconds of the release")
        }).pipe(Effect.scoped))

      test(
        "a waiter on one key is not woken by another key",
        (storage) =>
          Effect.gen(function*() {
            const key = uniqueKey("quiet")
            const other = expectAcquired(yield* acquireOnce(storage, uniqueKey("noise"), "fp", longLease))
            const changed = yield* storage.watch(key)
            const waiter = yield* Effect.fork(changed)
            yield* storage.commit(other, { outcome: "success", payload: bytes("1"), ttl })
            yield* Effect.sleep("100 millis")
            const poll = yield* Fiber.poll(waiter)
            if (storage.capabilities.notification) {
              assert.isTrue(Option.isNone(poll), "woken by a change to another key")
            } else {
              // Declared absent: watch polls, so it returns after its interval whatever happened.
              assert.isTrue(Option.isSome(poll) && Exit.isSuccess(poll.value))
            }
          }).pipe(Effect.scoped)
      )
    })

    describe("through Idempotent.wrap", () => {
      class Receipt extends Schema.Class<Receipt>("Receipt")({
        id: Schema.String,
        at: Schema.Date,
        cents: Schema.BigInt,
        note: Schema.Option(Schema.String)
      }) {}
      class Declined extends Schema.TaggedError<Declined>()("Declined", { reason: Schema.String }) {}

      it.effect("runs once, replays the typed success and the typed failure", () =>
        Effect.gen(function*() {
          let runs = 0
          const key = uniqueKey("wrap")
          const pay = Effect.sync(() => {
            runs++
            return new Receipt({ id: "r1", at: new Date(0), cents: 12_345n, note: Option.some("ok") })
          }).pipe(Idempotent.wrap({ key, fingerprint: { amount: 1 }, success: Receipt }))
          const first = yield* pay
          const second = yield* pay
          assert.strictEqual(runs, 1)
          assert.isTrue(second instanceof Receipt)
          assert.deepStrictEqual(second, first)

          const declinedKey = uniqueKey("wrap-failure")
          let declines = 0
          const decline = Effect.suspend(() => {
            declines++
            return Effect.fail(new Declined({ reason: "card" }))
          }).pipe(Idempotent.wrap({ key: declinedKey, failure: Declined }))
          const a = yield* Effect.flip(decline)
          const b = yield* Effect.flip(decline)
          assert.strictEqual(declines, 1)
          assert.isTrue(a instanceof Declined && b instanceof Declined)
          assert.strictEqual(b._tag, "Declined")
        }))

      it.effect("a key reused with another fingerprint fails, in flight and after completion", () =>
        Effect.gen(function*() {
          const key = uniqueKey("reused")
          const slow = Effect.sleep("200 millis").pipe(Idempotent.wrap({ key, fingerprint: { n: 1 } }))
          const first = yield* Effect.fork(slow)
          yield* Effect.sleep("50 millis")
          const inFlight = yield* Effect.flip(
            Effect.void.pipe(Idempotent.wrap({ key, fingerprint: { n: 2 }, onInFlight: { wait: "5 seconds" } }))
          )
          assert.strictEqual(inFlight._tag, "IdempotencyKeyReused")
          yield* Fiber.join(first)
          const completed = yield* Effect.flip(Effect.void.pipe(Idempotent.wrap({ key, fingerprint: { n: 2 } })))
          assert.strictEqual(completed._tag, "IdempotencyKeyReused")
          yield* Effect.void.pipe(Idempotent.wrap({ key, fingerprint: { n: 1 } }))
        }))

      it.effect("a failure it does not store releases the key, and the retry runs", () =>
        Effect.gen(function*() {
          const key = uniqueKey("released")
          let runs = 0
          const flaky = Effect.suspend(() => {
            runs++
            return runs === 1 ? Effect.die("boom") : Effect.succeed("second time lucky")
          }).pipe(Idempotent.wrap({ key }))
          const first = yield* Effect.exit(flaky)
          assert.isTrue(Exit.isFailure(first))
          assert.strictEqual(yield* flaky, "second time lucky")
          assert.strictEqual(yield* flaky, "second time lucky")
          assert.strictEqual(runs, 2)
        }))

      it.effect("keys are told apart as written: a lone surrogate is refused, U+FFFD is a key of its own", () =>
        Effect.gen(function*() {
          // UTF-8 turns a lone surrogate into U+FFFD: stored, "x\uD800" and "x\uFFFD" would be one record.
          const base = uniqueKey("unicode")
          for (const key of [`${base}\uD800`, `${base}\uDC00`]) {
            const refused = yield* Effect.flip(Effect.succeed("surrogate").pipe(Idempotent.wrap({ key })))
            assert.strictEqual(refused._tag, "IdempotencyKeyInvalid")
          }
          assert.strictEqual(
            yield* Effect.succeed("replacement").pipe(Idempotent.wrap({ key: `${base}\uFFFD` })),
            "replacement"
          )
          assert.strictEqual(
            yield* Effect.succeed("emoji").pipe(Idempotent.wrap({ key: `${base}\uD83D\uDE00` })),
            "emoji"
          )
          assert.strictEqual(
            yield* Effect.succeed("again").pipe(Idempotent.wrap({ key: `${base}\uFFFD` })),
            "replacement"
          )
        }))

      it.effect("waiters get the first run's result, whatever their number", () =>
        Effect.gen(function*() {
          const key = uniqueKey("waiters")
          let runs = 0
          const job = Effect.sync(() => ++runs).pipe(
            Effect.delay("100 millis"),
            Idempotent.wrap({ key, onInFlight: { wait: "10 seconds" } })
          )
          const results = yield* Effect.all(Array.from({ length: 100 }, () => job), { concurrency: "unbounded" })
          assert.strictEqual(runs, 1)
          assert.deepStrictEqual(Chunk.toReadonlyArray(Chunk.dedupe(Chunk.fromIterable(results))), [1])
        }))
    })
  })
}
