/**
 * Properties of `Idempotent.wrap` under faults. Several callers, spread over several "processes"
 * (copies of one store, each with its own local flights), call one key at random times; their
 * effects succeed, fail (a stored failure), die, or run for longer than a lease; callers are
 * interrupted at random times; and every storage call may fail, die, answer late or never, on a
 * schedule fast-check makes and shrinks. After each scenario:
 *
 * - no two runs of the key overlap, and each starts with a fence larger than the last;
 * - every caller told "success" (or handed the effect's typed failure) got what the store keeps;
 * - every caller ended, with an allowed exit (see `allowed`);
 * - once the lease has passed, the key is free: a healthy process replays or runs, and every
 *   faulty copy, its faults off, answers at once (no local flight left behind).
 *
 * `npm test` runs each property with a fixed seed, then a smaller budget with a random seed
 * (fast-check prints the seed and the shrunk scenario of a failure). `PROPERTY_RUNS=n` multiplies
 * the budgets; `PROPERTY_SEED=s` pins the random part.
 */
import { assert, describe, it } from "@effect/vitest"
import {
  Cause,
  Clock,
  Duration,
  Effect,
  Exit,
  FastCheck as fc,
  Fiber,
  Logger,
  LogLevel,
  Option,
  Schema,
  type Scope,
  TestClock,
  TestContext
} from "effect"
import { IdempotencyError, type IdempotencyRecord, Idempotent, MemoryStorage, Storage } from "../../src/index.js"
import { type Fault, type Faulty, faulty, healthy, InjectedDefect } from "../fixtures/FaultyStorage.js"
import * as MapBasicStorage from "../fixtures/MapBasicStorage.js"

const scale = Number(process.env.PROPERTY_RUNS ?? "1")
const pinnedSeed = process.env.PROPERTY_SEED === undefined ? undefined : Number(process.env.PROPERTY_SEED)
const fixedSeed = 20_261_202

const leaseMillis = 3_000
const key = "order-1"
const ttl = Duration.hours(24)

/** The effect's own typed failure, stored and replayed through the `failure` schema. */
const Refused = Schema.Struct({ refused: Schema.Number })
type Refused = typeof Refused.Type

/** The effect's own defect, told apart from the storage's injected one. */
class EffectDefect extends Error {}

interface Caller {
  readonly copy: number
  readonly startAt: number
  readonly runMillis: number
  readonly outcome: "succeed" | "fail" | "die"
  readonly interruptAt: number | undefined
  readonly waitMillis: number | undefined
}

interface Scenario {
  readonly schedules: ReadonlyArray<ReadonlyArray<Fault>>
  readonly callers: ReadonlyArray<Caller>
}

const faultArbitrary = (hangs: boolean): fc.Arbitrary<Fault> => {
  const delay = fc.integer({ min: 1, max: 2 * leaseMillis })
  return fc.oneof(
    { arbitrary: fc.constant<Fault>({ _tag: "ok" }), weight: 6 },
    { arbitrary: fc.constant<Fault>({ _tag: "fail" }), weight: 1 },
    { arbitrary: fc.constant<Fault>({ _tag: "failFinal" }), weight: 1 },
    { arbitrary: fc.constant<Fault>({ _tag: "lostReply" }), weight: 1 },
    { arbitrary: fc.constant<Fault>({ _tag: "die" }), weight: 1 },
    { arbitrary: delay.map((delayMillis): Fault => ({ _tag: "slow", delayMillis })), weight: 1 },
    { arbitrary: delay.map((delayMillis): Fault => ({ _tag: "slowReply", delayMillis })), weight: 1 },
    { arbitrary: fc.constant<Fault>({ _tag: "hang" }), weight: hangs ? 1 : 0 }
  )
}

const callerArbitrary = (copies: number): fc.Arbitrary<Caller> =>
  fc.record({
    copy: fc.nat({ max: copies - 1 }),
    startAt: fc.oneof(fc.constant(0), fc.integer({ min: 0, max: 3 * leaseMillis })),
    runMillis: fc.oneof(fc.constant(0), fc.integer({ min: 0, max: 3 * leaseMillis })),
    outcome: fc.constantFrom("succeed" as const, "succeed" as const, "fail" as const, "die" as const),
    interruptAt: fc.option(fc.integer({ min: 0, max: 5 * leaseMillis }), { nil: undefined, freq: 4 }),
    waitMillis: fc.option(fc.integer({ min: 0, max: 2 * leaseMillis }), { nil: undefined })
  })

const scenarioArbitrary = (hangs: boolean): fc.Arbitrary<Scenario> =>
  fc.integer({ min: 1, max: 3 }).chain((copies) =>
    fc.record({
      schedules: fc.array(fc.array(faultArbitrary(hangs), { maxLength: 12 }), {
        minLength: copies,
        maxLength: copies
      }),
      callers: fc.array(callerArbitrary(copies), { minLength: 1, maxLength: 6 })
    })
  )

/** One run of the effect, as it saw itself. */
interface Run {
  readonly caller: number
  readonly fence: number
  readonly start: number
  end: number | undefined
  how: string | undefined
}

const call = (scenario: Scenario, index: number, log: Array<Run>) => {
  const caller = scenario.callers[index]!
  const body = Effect.gen(function*() {
    const execution = yield* Idempotent.Execution
    const run: Run = {
      caller: index,
      fence: execution.fence,
      start: yield* Clock.currentTimeMillis,
      end: undefined,
      how: undefined
    }
    log.push(run)
    const n = log.length
    return yield* Effect.sleep(Duration.millis(caller.runMillis)).pipe(
      Effect.zipRight(Effect.suspend(() => {
        switch (caller.outcome) {
          case "succeed":
            return Effect.succeed(`run-${n}`)
          case "fail":
            return Effect.fail<Refused>({ refused: n })
          case "die":
            return Effect.die(new EffectDefect(`run-${n} died`))
        }
      })),
      Effect.onExit((exit) =>
        Effect.map(Clock.currentTimeMillis, (now) => {
          run.end = now
          run.how = Exit.isSuccess(exit) ? "success" : Cause.isInterruptedOnly(exit.cause) ? "interrupted" : "failure"
        })
      )
    )
  })
  return body.pipe(
    Idempotent.wrap({
      key,
      lease: Duration.millis(leaseMillis),
      ttl,
      success: Schema.String,
      failure: Refused,
      onInFlight: caller.waitMillis === undefined ? "fail" : { wait: Duration.millis(caller.waitMillis) }
    })
  )
}

type CallExit = Exit.Exit<string, Refused | IdempotencyError.IdempotencyError>

/** What a caller may end with, the store's record given: `undefined` when allowed, or why not. */
const disallowed = (
  exit: CallExit,
  stored: Option.Option<{ readonly outcome: string; readonly value: unknown }>,
  interrupted: boolean
): string | undefined => {
  if (Exit.isSuccess(exit)) {
    if (Option.isNone(stored) || stored.value.outcome !== "success") return `success ${exit.value} but nothing stored`
    return stored.value.value === exit.value
      ? undefined
      : `success ${exit.value} but the store keeps ${stored.value.value}`
  }
  const cause = exit.cause
  if (Cause.isInterruptedOnly(cause)) return interrupted ? undefined : "interrupted although no one interrupted it"
  const failure = Cause.failureOption(cause)
  if (Option.isSome(failure)) {
    const error = failure.value
    if ("refused" in error) {
      if (Option.isNone(stored) || stored.value.outcome !== "failure") return `failure ${error.refused} not stored`
      const value = stored.value.value as Refused
      return value.refused === error.refused ? undefined : `failure ${error.refused}, stored ${value.refused}`
    }
    switch (error._tag) {
      case "IdempotencyInFlight":
      case "IdempotencyLeaseLost":
      case "IdempotencyStorageError":
      case "IdempotencyResultNotStored":
        return undefined
      default:
        return `unexpected ${error._tag}`
    }
  }
  const defects = Cause.defects(cause)
  if (defects.length > 0 && [...defects].every((d) => d instanceof EffectDefect || d instanceof InjectedDefect)) {
    return undefined
  }
  return `unexpected end: ${Cause.pretty(cause)}`
}

const decodeStored = (record: Option.Option<IdempotencyRecord.IdempotencyRecord>) =>
  Option.map(record, (record) => ({
    outcome: record.outcome,
    value: JSON.parse(new TextDecoder().decode(record.payload)) as unknown
  }))

const check = (
  scenario: Scenario,
  makeStore: Effect.Effect<Storage.StorageService, never, Scope.Scope>
) =>
  Effect.gen(function*() {
    const base = yield* makeStore
    const copies: Array<Faulty> = scenario.schedules.map((schedule) => faulty(base, schedule))
    const log: Array<Run> = []
    const fibers = yield* Effect.forEach(scenario.callers, (caller, index) =>
      Effect.fork(
        Effect.zipRight(
          Effect.sleep(Duration.millis(caller.startAt)),
          call(scenario, index, log).pipe(Effect.provideService(Storage.Storage, copies[caller.copy]!.storage))
        )
      ))
    yield* Effect.forEach(scenario.callers, (caller, index) =>
      caller.interruptAt === undefined ? Effect.void : Effect.fork(
        Effect.zipRight(Effect.sleep(Duration.millis(caller.interruptAt)), Fiber.interruptFork(fibers[index]!))
      ))
    // Long enough for every start, run, wait, delay and lease of the scenario, many times over.
    yield* TestClock.adjust(Duration.minutes(10))

    const exits: Array<CallExit> = []
    for (const [index, fiber] of fibers.entries()) {
      const exit = yield* Fiber.poll(fiber)
      if (Option.isNone(exit)) {
        return assert.fail(`caller ${index} never ended`)
      }
      exits.push(exit.value)
    }

    // No two runs overlap, and fences grow.
    const runs = [...log].sort((a, b) =>
      a.start - b.start
    )
    for (const [i, run] of runs.entries()) {
      if (run.end === undefined) return assert.fail(`the run of caller ${run.caller} never ended`)
      if (i === 0) continue
      const previous = runs[i - 1]!
      if (run.start < previous.end!) {
        return assert.fail(
          `runs overlap: caller ${previous.caller} ran ${previous.start}-${previous.end} (fence ${previous.fence}), ` +
            `caller ${run.caller} started at ${run.start} (fence ${run.fence})`
        )
      }
      if (base.capabilities.fencing && run.fence <= previous.fence) {
        return assert.fail(`fence ${run.fence} after fence ${previous.fence}`)
      }
    }

    // Every caller ended as allowed, and no success without a stored record of it.
    const stored = decodeStored(yield* Effect.orDie(base.read(key)))
    for (const [index, exit] of exits.entries()) {
      const why = disallowed(exit, stored, scenario.callers[index]!.interruptAt !== undefined)
      if (why !== undefined) return assert.fail(`caller ${index}: ${why}`)
    }

    // The key is free once the lease has passed: another process replays or runs, and each
    // faulty copy, faults off, answers without waiting (no local flight left holding it).
    const fresh = (storage: Storage.StorageService) =>
      Effect.gen(function*() {
        const fiber = yield* Effect.fork(
          Effect.sync(() => "fresh").pipe(
            Idempotent.wrap({
              key,
              lease: Duration.millis(leaseMillis),
              ttl,
              success: Schema.String,
              failure: Refused
            }),
            Effect.provideService(Storage.Storage, storage)
          )
        )
        // At once on memory; a basic store takes a few of its own (test clock) round trips.
        yield* TestClock.adjust(Duration.seconds(1))
        const exit = yield* Fiber.poll(fiber)
        return Option.getOrElse(exit, () => assert.fail("a call after the lease is still waiting"))
      })
    const afterward = yield* fresh(healthy(base))
    if (
      Exit.isFailure(afterward) &&
      Option.isNone(Option.filter(Cause.failureOption(afterward.cause), (e) => "refused" in e))
    ) {
      return assert.fail(`a healthy process after the lease: ${Cause.pretty(afterward.cause)}`)
    }
    for (const [index, copy] of copies.entries()) {
      copy.enabled = false
      const again = yield* fresh(copy.storage)
      if (
        Exit.isFailure(again) && Option.isNone(Option.filter(Cause.failureOption(again.cause), (e) => "refused" in e))
      ) {
        return assert.fail(`faulty copy ${index}, faults off: ${Cause.pretty(again.cause)}`)
      }
    }
    return true
  }).pipe(Effect.scoped, Logger.withMinimumLogLevel(LogLevel.None), Effect.provide(TestContext.TestContext))

const runProperty = (
  name: string,
  arbitrary: fc.Arbitrary<Scenario>,
  makeStore: Effect.Effect<Storage.StorageService, never, Scope.Scope>,
  runs: { readonly fixed: number; readonly random: number }
) => {
  // A scenario that never ends (a wait outside the test clock) fails, with its seed, instead of
  // stalling the suite.
  const property = fc.asyncProperty(arbitrary, (scenario) => {
    let timer: ReturnType<typeof setTimeout> | undefined
    return Promise.race([
      Effect.runPromise(check(scenario, makeStore)),
      new Promise<never>((_, reject) => {
        timer = setTimeout(() => reject(new Error("the scenario did not end within 20 s")), 20_000)
      })
    ]).finally(() => clearTimeout(timer))
  })
  it(`${name} (fixed seed)`, async () => {
    await fc.assert(property, { seed: fixedSeed, numRuns: Math.ceil(runs.fixed * scale) })
  }, 120_000 * scale)
  it(`${name} (random seed)`, async () => {
    const seed = pinnedSeed ?? Math.floor(Math.random() * 2 ** 31)
    await fc.assert(property, { seed, numRuns: Math.ceil(runs.random * scale) })
  }, 120_000 * scale)
}

describe("Idempotent.wrap under faults: memory storage, TestClock", () => {
  runProperty("faults that answer", scenarioArbitrary(false), MemoryStorage.make(), { fixed: 70, random: 25 })
  runProperty("faults that include calls that never answer", scenarioArbitrary(true), MemoryStorage.make(), {
    fixed: 70,
    random: 25
  })
})

describe("Idempotent.wrap under faults: fromBasic (MapBasicStorage), TestClock", () => {
  runProperty("faults that answer", scenarioArbitrary(false), MapBasicStorage.make, { fixed: 40, random: 15 })
})
