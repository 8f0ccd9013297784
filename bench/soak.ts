/**
 * Soak: a long run of mixed `Idempotent.wrap` calls on one memory store in one process, then a
 * check that what the calls held is let go. Fresh keys, replays, concurrent duplicates (waiting
 * or failing at once, in one layer and across two), typed failures stored and not stored,
 * defects, callers interrupted mid-run, `Effect.timeout` around `wrap`, and runs that outlive a
 * short lease whose renewals hang. After a settle period (longer than every lease, wait and
 * TTL) and a forced GC, heap, timers, handles, fibers, local flights, store watchers and store
 * entries are compared with a baseline taken before the run. Reported, not asserted: the
 * figures go to `npm run torture`; test/soak.test.ts asserts the counts at a reduced size.
 *
 * It runs on the sources (relative imports, through tsx), not on dist/: the counts come from
 * internal modules (the local-flight registry, the memory store's maps), which must be the very
 * module instances the library uses.
 *
 * Run directly: `npx tsx --expose-gc bench/soak.ts [calls]` (default 1,000,000; SOAK_SEED pins
 * the workload). Without --expose-gc the GC is exposed at run time instead.
 */
import { Cause, Effect, Exit, Fiber, Logger, Option, Schema, Scope, Supervisor } from "effect"
import { realpathSync } from "node:fs"
import { resolve } from "node:path"
import { monitorEventLoopDelay } from "node:perf_hooks"
import { fileURLToPath } from "node:url"
import { setFlagsFromString } from "node:v8"
import { runInNewContext } from "node:vm"
import * as Idempotent from "../src/Idempotent.js"
import * as internalDiagnostics from "../src/internal/diagnostics.js"
import * as LocalFlights from "../src/internal/localFlights.js"
import * as Storage from "../src/Storage.js"
import * as MemoryStorage from "../src/Storage/Memory.js"
import { random as seededRandom } from "../torture/protocol.js"

export interface SoakOptions {
  readonly calls: number
  /** Seeds the workload; random when absent. */
  readonly seed?: number | undefined
}

export interface SoakResult {
  readonly calls: number
  readonly durationMs: number
  readonly rows: ReadonlyArray<{ readonly metric: string; readonly baseline: number; readonly after: number }>
  /** What replays the workload: `SOAK_SEED`, or `seed` in the options. */
  readonly seed: number
  /** How the calls ended, per scenario ("interrupted: success" = 1,234). */
  readonly outcomes: Readonly<Record<string, number>>
  /** Outcomes no scenario allows; every one is a bug to look at. */
  readonly anomalies: Readonly<Record<string, number>>
  /** What the library logged during the run, by level and message. */
  readonly logs: Readonly<Record<string, number>>
  /** How late a 10 ms timer fired during the run: the load the leases and waits were under. */
  readonly eventLoopDelayMs: { readonly p50: number; readonly p99: number; readonly max: number }
}

// Records outlive every scenario that replays them, then the sweeper drops them before the
// after-figures are taken.
const ttlMillis = 2_000
const sweepMillis = 250
// The lease of most calls: well past their runs, and within the TTL (as `wrap` requires).
const leaseMillis = 1_000
// Runs that outlive this lease lose it when renewals hang.
const shortLeaseMillis = 150
// Runs that outlive this lease keep it by renewing.
const renewedLeaseMillis = 2_000
// How long a waiting duplicate waits.
const waitMillis = 2_000
// Past the TTL and every wait, plus two sweeps: whatever is still held then is held for good.
const settleMillis = Math.max(ttlMillis, waitMillis) + 2 * sweepMillis + 500
// Scenarios under way at once: enough to keep the CPU busy through every scenario's sleeps.
const workers = 100

class Declined extends Schema.TaggedError<Declined>()("Declined", { key: Schema.String }) {}
class NotKept extends Schema.TaggedError<NotKept>()("NotKept", { key: Schema.String }) {}

/** Counts the fibers started under it that have not ended yet. */
class LiveFibers extends Supervisor.AbstractSupervisor<number> {
  live = 0
  readonly value = Effect.sync(() => this.live)
  override onStart() {
    this.live++
  }
  override onEnd() {
    this.live--
  }
}

/**
 * Every pending timer, unref'd ones included (`process.getActiveResourcesInfo` only lists those
 * that keep the process alive): Effect's clock and scheduler and the library's waits call the
 * global `setTimeout` when they run, so wrapping it for the run sees them all.
 */
const countTimers = () => {
  const pending = new Set<unknown>()
  const originalSet = globalThis.setTimeout
  const originalClear = globalThis.clearTimeout
  const patchedSet = (callback: (...args: Array<any>) => void, ms?: number, ...args: Array<any>) => {
    const timer = originalSet(
      (...inner: Array<any>) => {
        pending.delete(timer)
        callback(...inner)
      },
      ms,
      ...args
    )
    pending.add(timer)
    return timer
  }
  const patchedClear = (timer: Parameters<typeof clearTimeout>[0]) => {
    pending.delete(timer)
    originalClear(timer)
  }
  globalThis.setTimeout = Object.assign(patchedSet, originalSet) as unknown as typeof setTimeout
  globalThis.clearTimeout = patchedClear as typeof clearTimeout
  return {
    pending: () => pending.size,
    restore: () => {
      globalThis.setTimeout = originalSet
      globalThis.clearTimeout = originalClear
    }
  }
}

const exposeGc = (): () => void => {
  const exposed = (globalThis as { gc?: () => void }).gc
  if (exposed !== undefined) return exposed
  setFlagsFromString("--expose-gc")
  return runInNewContext("gc") as () => void
}

type Outcome = string

const underLoad: ReadonlyArray<Outcome> = ["IdempotencyLeaseLost", "IdempotencyInFlight"]

const outcomeOf = (exit: Exit.Exit<number, unknown>): Outcome => {
  if (Exit.isSuccess(exit)) return "success"
  const failure = Cause.failureOption(exit.cause)
  if (Option.isSome(failure)) return (failure.value as { readonly _tag?: string })._tag ?? "untagged failure"
  if (Option.isSome(Cause.dieOption(exit.cause))) return "defect"
  return Cause.isInterruptedOnly(exit.cause) ? "interrupted" : "empty cause"
}

/**
 * The workload: `calls` wrap calls spread over a fixed pool of workers, each picking scenarios at
 * random. Every scenario checks what it can of the outcome; anything else is counted by kind.
 */
/** The store as three layers would see it, each with its own local flights. */
const layersOf = (store: Storage.StorageService) => ({
  store,
  // Another layer on the same store, as another process would be.
  other: Storage.make({ ...store }),
  // Renewals that answer only after the lease ended: every run longer than the lease loses it.
  slowRenew: Storage.make({
    ...store,
    renew: (lease, duration) => Effect.zipRight(Effect.sleep(duration), store.renew(lease, duration))
  })
})

const workload = (
  { other, slowRenew, store }: ReturnType<typeof layersOf>,
  calls: number,
  random: () => number,
  anomalies: Map<string, number>,
  outcomes: Map<string, number>,
  prefix: string
) => {
  let issued = 0
  let keys = 0
  let runs = 0
  const recent: Array<{ readonly key: string; readonly value: number; readonly at: number }> = []
  const anomaly = (what: string) => anomalies.set(what, (anomalies.get(what) ?? 0) + 1)
  const int = (below: number) => Math.floor(random() * below)
  const freshKey = () => `${prefix}-${keys++}`

  const succeed = Effect.sync(() => ++runs)
  const after = (millis: number) => Effect.zipRight(Effect.sleep(millis), succeed)

  const call = (
    storage: Storage.StorageService,
    key: string,
    body: Effect.Effect<number, Declined | NotKept>,
    options?: Partial<Idempotent.WrapOptions<number, Declined>>
  ) =>
    body.pipe(
      Idempotent.wrap<number, Declined>({ key, ttl: ttlMillis, lease: leaseMillis, ...options }),
      Effect.provideService(Storage.Storage, storage),
      Effect.exit
    )

  // All successes handed out for one key are the one stored result; nothing but `allowed` (and
  // what a saturated event loop causes: a lease the process could not prove in time, a wait that
  // ran out) ends a call.
  const check = (
    scenario: string,
    exits: ReadonlyArray<Exit.Exit<number, unknown>>,
    allowed: ReadonlyArray<string>
  ) => {
    let value: number | undefined = undefined
    for (const exit of exits) {
      const outcome = outcomeOf(exit)
      const tally = `${scenario}: ${outcome}`
      outcomes.set(tally, (outcomes.get(tally) ?? 0) + 1)
      if (!allowed.includes(outcome) && !underLoad.includes(outcome)) anomaly(tally)
      if (Exit.isSuccess(exit)) {
        if (value !== undefined && exit.value !== value) anomaly(`${scenario}: two different successes`)
        value = exit.value
      }
    }
    return value
  }
  const remember = (key: string, value: number | undefined) => {
    if (value === undefined) return
    recent.push({ key, value, at: Date.now() })
    if (recent.length > 1024) recent.splice(0, 512)
  }
  const waiting = { onInFlight: { wait: waitMillis } } as const

  const scenarios: ReadonlyArray<readonly [weight: number, calls: number, run: () => Effect.Effect<void>]> = [
    [35, 1, () => {
      const key = freshKey()
      return Effect.map(call(store, key, succeed), (exit) => remember(key, check("fresh", [exit], ["success"])))
    }],
    [25, 1, () => {
      const stored = recent[int(recent.length)]
      if (stored === undefined) return Effect.void
      return Effect.map(call(store, stored.key, succeed), (exit) => {
        const value = check("replay", [exit], ["success"])
        // Only a record its TTL may have dropped runs again.
        if (value !== stored.value && Date.now() - stored.at < ttlMillis - 500) anomaly("replay: ran again")
      })
    }],
    [8, 4, () => {
      const key = freshKey()
      return Effect.map(
        Effect.all(Array.from({ length: 4 }, () => call(store, key, after(int(4)), waiting)), { concurrency: 4 }),
        (exits) => remember(key, check("duplicates waiting", exits, ["success"]))
      )
    }],
    [5, 3, () => {
      const key = freshKey()
      return Effect.map(
        Effect.all([store, other, store].map((storage) => call(storage, key, after(2))), { concurrency: 3 }),
        (exits) => check("duplicates failing", exits, ["success", "IdempotencyInFlight"])
      )
    }],
    [5, 4, () => {
      const key = freshKey()
      return Effect.map(
        Effect.all(
          [store, other, store, other].map((storage) => call(storage, key, after(int(4)), waiting)),
          { concurrency: 4 }
        ),
        (exits) => remember(key, check("duplicates across layers", exits, ["success"]))
      )
    }],
    [5, 2, () => {
      const key = freshKey()
      let ran = 0
      const decline = Effect.suspend(() => {
        ran++
        return Effect.fail(new Declined({ key }))
      })
      return Effect.gen(function*() {
        const first = yield* call(store, key, decline, { failure: Declined })
        const second = yield* call(store, key, decline, { failure: Declined })
        check("failure stored", [first, second], ["Declined"])
        if (outcomeOf(first) === "Declined" && outcomeOf(second) === "Declined" && ran !== 1) {
          anomaly("failure stored: not replayed")
        }
      })
    }],
    [4, 2, () => {
      const key = freshKey()
      let ran = 0
      const fail = Effect.suspend(() => {
        ran++
        return Effect.fail(new NotKept({ key }))
      })
      return Effect.gen(function*() {
        const first = yield* call(store, key, fail, { failure: Declined })
        const second = yield* call(store, key, fail, { failure: Declined })
        check("failure not stored", [first, second], ["NotKept"])
        if (outcomeOf(first) === "NotKept" && outcomeOf(second) === "NotKept" && ran !== 2) {
          anomaly("failure not stored: replayed")
        }
      })
    }],
    [4, 2, () => {
      const key = freshKey()
      return Effect.map(
        Effect.all([
          call(store, key, Effect.zipRight(Effect.sleep(int(3)), Effect.die(new Error("soak defect")))),
          call(store, key, succeed, waiting)
        ], { concurrency: 2 }),
        (exits) => check("defect", exits, ["defect", "success"])
      )
    }],
    [5, 2, () => {
      const key = freshKey()
      return Effect.gen(function*() {
        const first = yield* Effect.fork(call(store, key, after(50), waiting))
        yield* Effect.yieldNow()
        const second = yield* Effect.fork(call(store, key, succeed, waiting))
        yield* Effect.sleep(int(45))
        yield* Fiber.interrupt(first)
        const outer = yield* Fiber.await(first)
        // The caller was interrupted; a run it had already finished may have stored its result.
        const interrupted = Exit.isSuccess(outer) ? outer.value : Exit.failCause(outer.cause)
        const exits = [interrupted, yield* Fiber.join(second)]
        check("interrupted", exits, ["interrupted", "success"])
      })
    }],
    [4, 2, () => {
      const key = freshKey()
      return Effect.gen(function*() {
        const first = yield* after(40).pipe(
          Idempotent.wrap({ key, ttl: ttlMillis, lease: leaseMillis }),
          Effect.timeout(1 + int(40)),
          Effect.provideService(Storage.Storage, store),
          Effect.exit
        )
        const retry = yield* call(store, key, succeed, waiting)
        check("timeout", [first, retry], ["TimeoutException", "success"])
      })
    }],
    [3, 2, () => {
      const key = freshKey()
      const lease = { lease: shortLeaseMillis, ...waiting }
      return Effect.map(
        Effect.all([
          call(slowRenew, key, after(2 * shortLeaseMillis), lease),
          call(slowRenew, key, succeed, lease)
        ], { concurrency: 2 }),
        (exits) => check("lease expiry", exits, ["IdempotencyLeaseLost", "success"])
      )
    }],
    // Duplicates that give up waiting: in this layer (a listener on the local run) and in
    // another (a watch on the store), each abandoned mid-wait by `Effect.timeout`.
    [3, 3, () => {
      const key = freshKey()
      const impatient = (storage: Storage.StorageService) =>
        succeed.pipe(
          Idempotent.wrap({ key, ttl: ttlMillis, lease: leaseMillis, onInFlight: { wait: waitMillis } }),
          Effect.timeout(1 + int(40)),
          Effect.provideService(Storage.Storage, storage),
          Effect.exit
        )
      return Effect.map(
        Effect.all([call(store, key, after(40)), impatient(store), impatient(other)], { concurrency: 3 }),
        (exits) => remember(key, check("waiters timed out", exits, ["success", "TimeoutException"]))
      )
    }],
    // A run longer than its lease, renewed in time: it keeps the key and stores its result. The
    // lease leaves room for timers made late by a busy event loop (by 400 ms on a loaded machine).
    [0.5, 1, () => {
      const key = freshKey()
      return Effect.map(
        call(store, key, after(renewedLeaseMillis + 100), { lease: renewedLeaseMillis }),
        (exit) => remember(key, check("renewed", [exit], ["success"]))
      )
    }]
  ]
  const totalWeight = scenarios.reduce((sum, [weight]) => sum + weight, 0)
  const pick = () => {
    let roll = random() * totalWeight
    for (const scenario of scenarios) {
      roll -= scenario[0]
      if (roll < 0) return scenario
    }
    return scenarios[0]!
  }

  const worker: Effect.Effect<void> = Effect.suspend(() => {
    if (issued >= calls) return Effect.void
    const [, count, run] = pick()
    issued += count
    return Effect.flatMap(run(), () => worker)
  })
  return Effect.as(
    Effect.all(Array.from({ length: workers }, () => worker), { concurrency: "unbounded", discard: true }),
    { issued: () => issued }
  ).pipe(Effect.map((result) => result.issued()))
}

const settle = (gc: () => void, millis: number) =>
  Effect.zipRight(
    Effect.sleep(millis),
    Effect.promise(async () => {
      for (let i = 0; i < 4; i++) {
        gc()
        await new Promise((resolve) => setImmediate(resolve))
      }
    })
  )

/**
 * Runs `options.calls` mixed calls (a few more: the last scenario finishes) and compares the
 * process with its baseline. Anomalies (an outcome a scenario does not allow) are a row too,
 * baseline 0.
 */
export const runSoak = async (options: SoakOptions): Promise<SoakResult> => {
  const seed = options.seed ?? Math.floor(Math.random() * 2 ** 31)
  const random = seededRandom(seed)
  const gc = exposeGc()
  const timers = countTimers()
  const fibers = new LiveFibers()
  const anomalies = new Map<string, number>()
  const outcomes = new Map<string, number>()
  const logs = new Map<string, number>()
  const logger = Logger.make(({ logLevel, message }) => {
    const text = `${logLevel.label} ${Array.isArray(message) ? message.join(" ") : String(message)}`
    logs.set(text, (logs.get(text) ?? 0) + 1)
  })
  const storeOptions = { maxEntries: 10_000_000, sweepInterval: sweepMillis }

  const program = Effect.gen(function*() {
    // Warms the code paths up on a store of its own, so the baseline is not the first call's heap.
    yield* Effect.scoped(Effect.flatMap(
      MemoryStorage.make(storeOptions),
      (store) =>
        workload(layersOf(store), Math.min(5_000, Math.ceil(options.calls / 4)), random, anomalies, new Map(), "warmup")
    ))
    const scope = yield* Scope.make()
    const store = yield* Scope.extend(MemoryStorage.make(storeOptions), scope)
    const layers = layersOf(store)
    const sample = () => {
      const counts = internalDiagnostics.memoryCounts(store)!
      return [
        ["heap used (bytes)", process.memoryUsage().heapUsed],
        ["pending timers (incl. unref'd)", timers.pending()],
        ["active handles/resources", process.getActiveResourcesInfo().length],
        ["live fibers", fibers.live],
        ["local flights", Object.values(layers).reduce((sum, layer) => sum + LocalFlights.count(layer), 0)],
        ["store watchers", counts.watchers],
        ["store in-flight keys", counts.inFlight],
        ["store records", counts.completed]
      ] as const
    }
    yield* settle(gc, 100)
    const baseline = sample()
    const lag = monitorEventLoopDelay({ resolution: 10 })
    lag.enable()
    const started = performance.now()
    const issued = yield* Effect.supervised(
      workload(layers, options.calls, random, anomalies, outcomes, "soak"),
      fibers
    )
    const durationMs = performance.now() - started
    lag.disable()
    yield* settle(gc, settleMillis)
    const after = sample()
    yield* Scope.close(scope, Exit.void)
    return { issued, durationMs, baseline, after, lag }
  }).pipe(Effect.provide(Logger.replace(Logger.defaultLogger, logger)))

  try {
    const { after, baseline, durationMs, issued, lag } = await Effect.runPromise(program)
    const sum = (counts: Map<string, number>) => [...counts.values()].reduce((total, n) => total + n, 0)
    return {
      calls: issued,
      durationMs,
      rows: [
        ...baseline.map(([metric, value], i) => ({ metric, baseline: value, after: after[i]![1] })),
        { metric: "unexpected outcomes", baseline: 0, after: sum(anomalies) },
        { metric: "log lines", baseline: 0, after: sum(logs) }
      ],
      seed,
      outcomes: Object.fromEntries([...outcomes].sort(([a], [b]) => a.localeCompare(b))),
      anomalies: Object.fromEntries(anomalies),
      logs: Object.fromEntries(logs),
      eventLoopDelayMs: { p50: lag.percentile(50) / 1e6, p99: lag.percentile(99) / 1e6, max: lag.max / 1e6 }
    }
  } finally {
    timers.restore()
  }
}

const format = (n: number) => Math.round(n).toLocaleString("en-US")

/** The table `npm run torture` and a direct run print. */
export const formatSoak = (result: SoakResult): string => {
  const header = ["metric", "baseline", "after", "delta"]
  const body = result.rows.map((row) => [
    row.metric,
    format(row.baseline),
    format(row.after),
    (row.after >= row.baseline ? "+" : "") + format(row.after - row.baseline)
  ])
  const widths = header.map((title, i) => Math.max(title.length, ...body.map((cells) => cells[i]!.length)))
  const line = (cells: ReadonlyArray<string>) =>
    cells.map((cell, i) => i === 0 ? cell.padEnd(widths[i]!) : cell.padStart(widths[i]!)).join("  ")
  const delay = result.eventLoopDelayMs
  const listed = (title: string, counts: Readonly<Record<string, number>>) =>
    Object.keys(counts).length === 0
      ? []
      : [title, ...Object.entries(counts).map(([what, count]) => `  ${what}: ${format(count)}`)]
  return [
    `soak: ${format(result.calls)} calls in ${(result.durationMs / 1000).toFixed(1)} s (seed ${result.seed}; ` +
    `event loop delay p50 ${delay.p50.toFixed(0)} ms, p99 ${delay.p99.toFixed(0)} ms, max ${delay.max.toFixed(0)} ms)`,
    line(header),
    line(widths.map((width) => "-".repeat(width))),
    ...body.map(line),
    ...listed("outcomes:", result.outcomes),
    ...listed("UNEXPECTED outcomes:", result.anomalies),
    ...listed("logged:", result.logs)
  ].join("\n")
}

const isMain = process.argv[1] !== undefined &&
  realpathSync(resolve(process.argv[1])) === realpathSync(fileURLToPath(import.meta.url))

if (isMain) {
  const calls = Number(process.argv[2] ?? process.env.SOAK_CALLS ?? 1_000_000)
  const seed = process.env.SOAK_SEED === undefined ? undefined : Number(process.env.SOAK_SEED)
  runSoak({ calls, seed }).then(
    (result) => console.log(formatSoak(result)),
    (error: unknown) => {
      console.error(error)
      process.exitCode = 1
    }
  )
}
