/**
 * Types that tell the truth: without a `success` schema a call only compiles for plain JSON data,
 * and every value those types accept replays deep-equal. The `@ts-expect-error` lines are checked
 * by `tsc` (`npm test` runs it first): each would compile, and lie at replay, without the check.
 */
import { assert, describe, expectTypeOf, it } from "@effect/vitest"
import { DateTime, Duration, Effect, Exit, Fiber, Option, Schema, TestClock } from "effect"
import * as fc from "effect/FastCheck"
import { IdempotencyError, Idempotent, MemoryStorage } from "../src/index.js"
import { failsWith } from "./fixtures/Exits.js"

const { IdempotencyResultNotStored } = IdempotencyError

/** Replays, with the seed fast-check printed, when set: `PROPERTY_SEED=n`. */
const seed = process.env.PROPERTY_SEED === undefined ? undefined : Number(process.env.PROPERTY_SEED)
const runScale = Math.max(1, Number(process.env.PROPERTY_RUNS ?? 1) || 1)

interface Order {
  readonly id: string
  readonly lines: ReadonlyArray<{ readonly sku: string; readonly quantity: number }>
  readonly note?: string
  readonly totals: Record<string, number | null>
}
class WithMethod {
  constructor(readonly id: string) {}
  label() {
    return `#${this.id}`
  }
}
class Receipt extends Schema.Class<Receipt>("Receipt")({ id: Schema.String, at: Schema.DateFromNumber }) {}

// Compile-time only: never run, checked by tsc.
export const accepted = () => {
  const key = "k"
  Effect.succeed("text").pipe(Idempotent.wrap({ key }))
  Effect.succeed(42).pipe(Idempotent.wrap({ key }))
  Effect.succeed(true).pipe(Idempotent.wrap({ key }))
  Effect.succeed(null).pipe(Idempotent.wrap({ key }))
  Effect.void.pipe(Idempotent.wrap({ key }))
  Effect.succeed({ id: "o-1", lines: [{ sku: "a", quantity: 1 }] }).pipe(Idempotent.wrap({ key }))
  Effect.succeed<Order>({ id: "o-1", lines: [], totals: {} }).pipe(Idempotent.wrap({ key }))
  Effect.succeed<Idempotent.JsonValue>([1, "two", { three: [null] }]).pipe(Idempotent.wrap({ key }))
  Effect.succeed(["tuple", 1] as const).pipe(Idempotent.wrap({ key }))
  Idempotent.wrap(Effect.succeed({ data: "first" }), { key })
  // With a schema, anything the schema encodes.
  Effect.succeed(new Date(0)).pipe(Idempotent.wrap({ key, success: Schema.DateFromNumber }))
  Idempotent.wrap(Effect.succeed(new Receipt({ id: "r", at: new Date(0) })), { key, success: Receipt })
  Effect.succeed(10n).pipe(Idempotent.wrap({ key, success: Schema.BigInt }))
  Effect.succeed(Option.some(1)).pipe(Idempotent.wrap({ key, success: Schema.Option(Schema.Number) }))
  // Failures are not stored without a `failure` schema, so they need none.
  Effect.fail(new Date(0)).pipe(Idempotent.wrap({ key }))
}

export const refused = () => {
  const key = "k"
  // @ts-expect-error a Date would replay as its ISO string
  Effect.sync(() => new Date(0)).pipe(Idempotent.wrap({ key }))
  // @ts-expect-error a class instance would replay as a plain object, without its methods
  Effect.succeed(new WithMethod("1")).pipe(Idempotent.wrap({ key }))
  // @ts-expect-error a bigint has no JSON form
  Effect.succeed(10n).pipe(Idempotent.wrap({ key }))
  // @ts-expect-error a Map would replay as {}
  Effect.succeed(new Map([["a", 1]])).pipe(Idempotent.wrap({ key }))
  // @ts-expect-error a Set would replay as {}
  Effect.succeed(new Set([1])).pipe(Idempotent.wrap({ key }))
  // @ts-expect-error a function has no JSON form
  Effect.succeed(() => 1).pipe(Idempotent.wrap({ key }))
  // @ts-expect-error an Option is a class instance
  Effect.succeed(Option.some(1)).pipe(Idempotent.wrap({ key }))
  // @ts-expect-error nested: a Date inside a plain object
  Effect.succeed({ id: "o-1", at: new Date(0) }).pipe(Idempotent.wrap({ key }))
  // @ts-expect-error nested: a bigint inside an array
  Effect.succeed([1n]).pipe(Idempotent.wrap({ key }))
  // @ts-expect-error unknown may be anything
  Effect.succeed(JSON.parse("1") as unknown).pipe(Idempotent.wrap({ key }))
  // @ts-expect-error data-first, the same check
  Idempotent.wrap(Effect.succeed(new Date(0)), { key })
  // @ts-expect-error wrapWithInfo, the same check
  Effect.succeed(new Date(0)).pipe(Idempotent.wrapWithInfo({ key }))
  // @ts-expect-error a schema for another type is refused too
  Effect.succeed(new Date(0)).pipe(Idempotent.wrap({ key, success: Schema.String }))
}

// What wrap can fail with: no IdempotencyKeyMissing (HTTP only) and no setup error.
export const errors = () => {
  const call = Effect.succeed(1).pipe(Idempotent.wrap({ key: "k" }))
  expectTypeOf(call).toEqualTypeOf<
    Effect.Effect<number, IdempotencyError.WrapError, import("../src/Storage.js").Storage>
  >()
  expectTypeOf<IdempotencyError.IdempotencyKeyMissing>().not.toMatchTypeOf<IdempotencyError.WrapError>()
  expectTypeOf<IdempotencyError.IdempotencyStorageError["operation"]>().toEqualTypeOf<
    IdempotencyError.StorageOperation
  >()
  expectTypeOf<"configure">().not.toMatchTypeOf<IdempotencyError.StorageOperation>()
}

const twice = (value: Idempotent.JsonValue | undefined, key: string) => {
  let runs = 0
  const call = Effect.sync(() => {
    runs++
    return value
  }).pipe(Idempotent.wrapWithInfo({ key }))
  return Effect.map(Effect.zip(call, call), ([first, replay]) => ({ first, replay, runs }))
}

describe("Idempotent.wrap without a schema: plain JSON data replays deep-equal", () => {
  it.effect("every JSON value (fast-check), and -0, replays deep-equal after one run", () =>
    Effect.promise(() =>
      fc.assert(
        fc.asyncProperty(fc.oneof(fc.jsonValue(), fc.constant(-0), fc.constant({ zero: -0, list: [-0, 0] })), (value) =>
          Effect.runPromise(
            Effect.gen(function*() {
              const { first, replay, runs } = yield* twice(value, "json")
              assert.strictEqual(runs, 1)
              assert.isFalse(first.replayed)
              assert.isTrue(replay.replayed)
              assert.deepStrictEqual(first.value, value)
              // chai's deep equality tells -0 from 0.
              assert.deepStrictEqual(replay.value, value)
            }).pipe(Effect.provide(MemoryStorage.layer()))
          )),
        { numRuns: 300 * runScale, ...(seed === undefined ? {} : { seed }) }
      )
    ))

  it.effect("an absent optional property and one set to undefined are the same once stored", () =>
    Effect.gen(function*() {
      const { replay } = yield* twice({ id: "o-1", note: undefined as string | undefined }, "optional")
      assert.deepStrictEqual(replay.value, { id: "o-1" })
    }).pipe(Effect.provide(MemoryStorage.layer())))

  it.effect("what the types cannot see is refused at run time, naming where: not stored, key released", () =>
    Effect.gen(function*() {
      class NoMethods {
        constructor(readonly id: string) {}
      }
      const cyclic: Record<string, unknown> = { id: "c" }
      cyclic.self = cyclic
      const cases: ReadonlyArray<readonly [string, unknown, string]> = [
        ["nan", { total: Number.NaN }, "NaN has no JSON form at .total"],
        ["infinity", [1, Number.POSITIVE_INFINITY], "Infinity has no JSON form at [1]"],
        ["class", { order: new NoMethods("1") }, "a NoMethods at .order"],
        // eslint-disable-next-line no-sparse-arrays -- the hole is the case
        ["hole", { list: [1, , 3] }, "a hole in an array at .list[1]"],
        ["undefined-item", [undefined], "undefined in an array at [0]"],
        ["cycle", cyclic, "a cycle at .self"],
        ["symbol", { [Symbol("s")]: 1 }, "a symbol-keyed property"],
        ["cast-bigint", { amount: 1n }, "a bigint at .amount"],
        ["cast-date", new Date(0), "a Date"]
      ]
      for (const [name, value, where] of cases) {
        let runs = 0
        const call = Effect.sync(() => {
          runs++
          return value as Idempotent.JsonValue
        }).pipe(Idempotent.wrap({ key: name }))
        const error = failsWith(yield* Effect.exit(call), IdempotencyResultNotStored)
        assert.strictEqual(error.reason, "unencodable", name)
        assert.include(error.detail, where, name)
        assert.include(error.detail, "Pass a `success` schema", name)
        // Released: a retry runs again rather than waiting out a lease.
        yield* Effect.exit(call)
        assert.strictEqual(runs, 2, name)
      }
    }).pipe(Effect.provide(MemoryStorage.layer())))
})

describe("Idempotent.wrap with a schema whose encoded side is not JSON", () => {
  it.effect("is refused before it is stored (it could never be replayed): not stored, key released", () =>
    Effect.gen(function*() {
      let runs = 0
      const call = Effect.sync(() => {
        runs++
        return new Date(0)
      }).pipe(Idempotent.wrap({ key: "date-from-self", success: Schema.DateFromSelf }))
      const error = failsWith(yield* Effect.exit(call), IdempotencyResultNotStored)
      assert.strictEqual(error.reason, "unencodable")
      assert.include(error.detail, "the schema's encoded form is not JSON data (a Date)")
      yield* Effect.exit(call)
      assert.strictEqual(runs, 2)
      // The JSON-encoded Date schema stores and replays.
      const stored = Effect.sync(() => new Date(0)).pipe(Idempotent.wrap({ key: "date", success: Schema.Date }))
      assert.strictEqual((yield* stored).getTime(), 0)
      assert.strictEqual((yield* stored).getTime(), 0)
    }).pipe(Effect.provide(MemoryStorage.layer())))
})

describe("Idempotent.wrapWithInfo: a replay is told from a first run", () => {
  it.effect("first run: replayed false; every replay: replayed true, the same fence and createdAt", () =>
    Effect.gen(function*() {
      yield* TestClock.adjust(Duration.seconds(1000))
      let runs = 0
      const call = Effect.sync(() => ({ charged: ++runs })).pipe(Idempotent.wrapWithInfo({ key: "pay-1" }))
      const first = yield* call
      yield* TestClock.adjust(Duration.seconds(5))
      const second = yield* call
      assert.deepStrictEqual(
        { value: first.value, replayed: first.replayed, createdAt: DateTime.toEpochMillis(first.createdAt) },
        { value: { charged: 1 }, replayed: false, createdAt: 1_000_000 }
      )
      assert.deepStrictEqual(
        { value: second.value, replayed: second.replayed, createdAt: DateTime.toEpochMillis(second.createdAt) },
        { value: { charged: 1 }, replayed: true, createdAt: 1_000_000 }
      )
      assert.strictEqual(second.fence, first.fence)
      assert.strictEqual(runs, 1)
    }).pipe(Effect.provide(MemoryStorage.layer())))

  it.effect("concurrent duplicates: exactly one is not a replay, and it is the one that ran", () =>
    Effect.gen(function*() {
      let runs = 0
      const call = Effect.sync(() => ++runs).pipe(
        Effect.delay("1 second"),
        Idempotent.wrapWithInfo({ key: "dup", onInFlight: { wait: "10 seconds" } })
      )
      const fibers = yield* Effect.forkAll(Array.from({ length: 20 }, () => call))
      yield* TestClock.adjust(Duration.seconds(2))
      const results = yield* Fiber.join(fibers)
      assert.strictEqual(runs, 1)
      assert.strictEqual(results.filter((result) => !result.replayed).length, 1)
      assert.isTrue(results.every((result) => result.value === 1 && result.fence === results[0]!.fence))
    }).pipe(Effect.provide(MemoryStorage.layer())))

  it.effect("a new owner after a released run gets a higher fence; a stored failure replays as the failure", () =>
    Effect.gen(function*() {
      class Declined extends Schema.TaggedError<Declined>()("Declined", { reason: Schema.String }) {}
      let attempt = 0
      const flaky = Effect.suspend(() => ++attempt === 1 ? Effect.fail("transient" as const) : Effect.succeed("ok"))
        .pipe(Idempotent.wrapWithInfo({ key: "flaky" }))
      assert.isTrue(Exit.isFailure(yield* Effect.exit(flaky)))
      const afterRetry = yield* flaky
      assert.isFalse(afterRetry.replayed)
      assert.isAbove(afterRetry.fence, 1)

      const declined = Effect.fail(new Declined({ reason: "card" })).pipe(
        Idempotent.wrapWithInfo({ key: "declined", failure: Declined })
      )
      yield* Effect.exit(declined)
      const replayed = yield* Effect.exit(declined)
      assert.instanceOf(failsWith(replayed, Declined), Declined)
    }).pipe(Effect.provide(MemoryStorage.layer())))
})
