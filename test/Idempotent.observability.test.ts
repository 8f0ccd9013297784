import { assert, describe, it } from "@effect/vitest"
import {
  Cause,
  Context,
  Duration,
  Effect,
  Exit,
  Fiber,
  HashMap,
  Layer,
  Logger,
  Metric,
  MetricState,
  TestClock,
  Tracer
} from "effect"
import { IdempotencyError, Idempotent, MemoryStorage, Storage } from "../src/index.js"
import { ended, failsWith, successOf } from "./fixtures/Exits.js"

const { IdempotencyInFlight, IdempotencyKeyReused, IdempotencyLeaseLost, IdempotencyStorageError } = IdempotencyError

// --- a tracer and a logger that record everything -------------------------------------------------

interface RecordedSpan {
  readonly name: string
  readonly attributes: Map<string, unknown>
  readonly events: Array<{ readonly name: string; readonly attributes: Record<string, unknown> | undefined }>
  exit: Exit.Exit<unknown, unknown> | undefined
}

interface RecordedLog {
  readonly line: string
  readonly annotations: Record<string, unknown>
}

class Recorded extends Context.Tag("test/Recorded")<Recorded, {
  readonly spans: Array<RecordedSpan>
  readonly logs: Array<RecordedLog>
}>() {}

const recordingTracer = (spans: Array<RecordedSpan>): Tracer.Tracer =>
  Tracer.make({
    span: (name, parent, context, links, startTime, kind) => {
      const recorded: RecordedSpan = { name, attributes: new Map(), events: [], exit: undefined }
      spans.push(recorded)
      let status: Tracer.SpanStatus = { _tag: "Started", startTime }
      return {
        _tag: "Span",
        name,
        spanId: `span-${spans.length}`,
        traceId: "trace-1",
        parent,
        context,
        get status() {
          return status
        },
        attributes: recorded.attributes,
        links,
        sampled: true,
        kind,
        end(endTime, exit) {
          status = { _tag: "Ended", startTime, endTime, exit }
          recorded.exit = exit
        },
        attribute(key, value) {
          recorded.attributes.set(key, value)
        },
        event(name, _startTime, attributes) {
          recorded.events.push({ name, attributes })
        },
        addLinks() {}
      }
    },
    context: (f) => f()
  })

const recording = Layer.unwrapEffect(Effect.sync(() => {
  const spans: Array<RecordedSpan> = []
  const logs: Array<RecordedLog> = []
  const logger = Logger.make((options) => {
    logs.push({
      line: Logger.logfmtLogger.log(options),
      annotations: Object.fromEntries(HashMap.toEntries(options.annotations))
    })
  })
  return Layer.mergeAll(
    Layer.succeed(Recorded, { spans, logs }),
    Layer.setTracer(recordingTracer(spans)),
    Logger.replace(Logger.defaultLogger, logger)
  )
}))

// --- a memory storage with switchable faults ---------------------------------------------------------

interface FaultSwitches {
  acquire: boolean
  commit: boolean
  release: boolean
  /** How many of the next renewals fail with a storage error. */
  renewErrors: number
  /** Renewals answer "no longer yours". */
  renewLost: boolean
}

class Faults extends Context.Tag("test/Faults")<Faults, FaultSwitches>() {}

const faultyStorage = (backend: string): Layer.Layer<Storage.Storage | Faults> =>
  Layer.effectContext(
    Effect.map(Storage.Storage, (inner) => {
      const faults: FaultSwitches = { acquire: false, commit: false, release: false, renewErrors: 0, renewLost: false }
      const down = (key: string, operation: IdempotencyError.StorageOperation) =>
        Effect.fail(new IdempotencyStorageError({ key, operation, cause: new Error("connection reset") }))
      const storage = Storage.make({
        ...inner,
        backend,
        // The switches are read when the effect runs, not when it is built: a caller may build it once.
        acquire: (request) =>
          Effect.suspend(() => faults.acquire ? down(request.key, "acquire") : inner.acquire(request)),
        renew: (lease, duration) =>
          Effect.suspend(() => {
            if (faults.renewLost) return Effect.succeed(false)
            if (faults.renewErrors > 0) {
              faults.renewErrors--
              return down(lease.key, "renew")
            }
            return inner.renew(lease, duration)
          }),
        commit: (lease, request) =>
          Effect.suspend(() => faults.commit ? down(lease.key, "commit") : inner.commit(lease, request)),
        release: (lease) => Effect.suspend(() => faults.release ? down(lease.key, "release") : inner.release(lease))
      })
      return Context.make(Storage.Storage, storage).pipe(Context.add(Faults, faults))
    })
  ).pipe(Layer.provide(MemoryStorage.layer()))

const environment = (backend = "memory") => Layer.merge(recording, faultyStorage(backend))

// --- the scenarios -------------------------------------------------------------------------------------

const secretKey = "secret-key-🔑-123"

const quick = (key: string, fingerprint?: unknown) => Effect.succeed("ok").pipe(Idempotent.wrap({ key, fingerprint }))

const slow = (key: string) =>
  Effect.sleep("10 seconds").pipe(Effect.as("ok"), Idempotent.wrap({ key, lease: "3 seconds" }))

type Scenario = Effect.Effect<Exit.Exit<unknown, unknown>, never, Storage.Storage | Faults>

/** Every path of `Idempotent.wrap` that reports an outcome, a warning or an error, on keys built from `base`. */
const scenarios = (base: string): Record<
  | "executed"
  | "replayed"
  | "reused"
  | "in_flight"
  | "lease_lost"
  | "renewal_warning"
  | "release_warning"
  | "commit_error"
  | "storage_error"
  | "encode_error",
  Scenario
> => ({
  executed: Effect.exit(quick(`${base}/a`, { n: 1 })),
  replayed: Effect.exit(quick(`${base}/a`, { n: 1 })),
  reused: Effect.exit(quick(`${base}/a`, { n: 2 })),
  in_flight: Effect.gen(function*() {
    const first = yield* Effect.fork(slow(`${base}/b`))
    yield* TestClock.adjust(Duration.zero)
    const exit = yield* Effect.exit(slow(`${base}/b`))
    yield* TestClock.adjust("10 seconds")
    successOf(yield* Fiber.await(first))
    return exit
  }),
  lease_lost: Effect.gen(function*() {
    const faults = yield* Faults
    faults.renewLost = true
    const fiber = yield* Effect.fork(slow(`${base}/c`))
    yield* TestClock.adjust("1 second")
    faults.renewLost = false
    return yield* ended(fiber)
  }),
  renewal_warning: Effect.gen(function*() {
    const faults = yield* Faults
    faults.renewErrors = 1
    const fiber = yield* Effect.fork(slow(`${base}/d`))
    yield* TestClock.adjust("10 seconds")
    return yield* ended(fiber)
  }),
  release_warning: Effect.gen(function*() {
    const faults = yield* Faults
    faults.release = true
    const exit = yield* Effect.exit(Effect.fail(new Error("not stored")).pipe(Idempotent.wrap({ key: `${base}/e` })))
    faults.release = false
    return exit
  }),
  commit_error: Effect.gen(function*() {
    const faults = yield* Faults
    faults.commit = true
    // The commit is retried while the lease holds (30 seconds by default), then given up.
    const call = yield* Effect.fork(Effect.exit(quick(`${base}/f`)))
    yield* TestClock.adjust("31 seconds")
    const exit = yield* Fiber.join(call)
    faults.commit = false
    return exit
  }),
  storage_error: Effect.gen(function*() {
    const faults = yield* Faults
    faults.acquire = true
    const exit = yield* Effect.exit(quick(`${base}/g`))
    faults.acquire = false
    return exit
  }),
  // NaN passes the types (a number) but has no JSON form: refused at run time.
  encode_error: Effect.exit(Effect.succeed({ amount: Number.NaN }).pipe(Idempotent.wrap({ key: `${base}/h` })))
})

/** The `Idempotent.wrap` spans that `effect` created. */
const wrapSpansOf = <A, E, R>(effect: Effect.Effect<A, E, R>) =>
  Effect.gen(function*() {
    const { spans } = yield* Recorded
    const before = spans.length
    const value = yield* effect
    return { value, spans: spans.slice(before).filter((span) => span.name === "Idempotent.wrap") }
  })

const counters = {
  executions: "idempotency_executions_total",
  replays: "idempotency_replays_total",
  inFlight: "idempotency_in_flight_total",
  keyReused: "idempotency_key_reused_total",
  leaseLost: "idempotency_lease_lost_total",
  releases: "idempotency_releases_total",
  commitFailures: "idempotency_commit_failures_total",
  storageErrors: "idempotency_storage_errors_total"
} as const

type Counters = { -readonly [K in keyof typeof counters]: number }

const readCounters = (backend: string): Effect.Effect<Counters> =>
  Effect.map(Metric.snapshot, (pairs) => {
    const read = (name: string) =>
      pairs
        .filter((pair) =>
          pair.metricKey.name === name &&
          pair.metricKey.tags.some((tag) => tag.key === "backend" && tag.value === backend)
        )
        .reduce(
          (sum, pair) => sum + (MetricState.isCounterState(pair.metricState) ? Number(pair.metricState.count) : 0),
          0
        )
    return Object.fromEntries(Object.entries(counters).map(([field, name]) => [field, read(name)])) as Counters
  })

/** How much each counter of `backend` grew while `effect` ran. */
const countersDelta = <A, E, R>(backend: string, effect: Effect.Effect<A, E, R>) =>
  Effect.gen(function*() {
    const before = yield* readCounters(backend)
    yield* effect
    const after = yield* readCounters(backend)
    return Object.fromEntries(
      Object.keys(counters).map((field) => [field, after[field as keyof Counters] - before[field as keyof Counters]])
    ) as Counters
  })

const zero: Counters = {
  executions: 0,
  replays: 0,
  inFlight: 0,
  keyReused: 0,
  leaseLost: 0,
  releases: 0,
  commitFailures: 0,
  storageErrors: 0
}

describe("Idempotent.wrap observability", () => {
  it.effect("the Idempotent.wrap span carries the outcome, the backend and the key hash", () =>
    Effect.gen(function*() {
      const run = scenarios("span-key")
      const outcomes: Array<readonly [keyof typeof run, string, (exit: Exit.Exit<unknown, unknown>) => void]> = [
        ["executed", "executed", (exit) => assert.strictEqual(successOf(exit), "ok")],
        ["replayed", "replayed", (exit) => assert.strictEqual(successOf(exit), "ok")],
        ["reused", "reused", (exit) => failsWith(exit, IdempotencyKeyReused)],
        ["in_flight", "in_flight", (exit) => failsWith(exit, IdempotencyInFlight)],
        ["lease_lost", "lease_lost", (exit) => failsWith(exit, IdempotencyLeaseLost)]
      ]
      const hashes = new Map<string, unknown>()
      for (const [scenario, outcome, check] of outcomes) {
        const { spans, value } = yield* wrapSpansOf(run[scenario])
        check(value)
        // The in-flight scenario also runs the first call: its span is the one refused.
        const span = spans.find((span) => span.attributes.get("idempotency.outcome") === outcome)
        assert.isDefined(span, `no Idempotent.wrap span with outcome ${outcome}`)
        assert.strictEqual(span!.attributes.get("idempotency.backend"), "memory")
        const hash = span!.attributes.get("idempotency.key_hash")
        assert.match(String(hash), /^[0-9a-f]{16}$/)
        assert.isDefined(span!.exit, "the span ended")
        hashes.set(scenario, hash)
      }
      // One key, one hash; another key, another hash.
      assert.strictEqual(hashes.get("replayed"), hashes.get("executed"))
      assert.strictEqual(hashes.get("reused"), hashes.get("executed"))
      assert.notStrictEqual(hashes.get("in_flight"), hashes.get("executed"))
    }).pipe(Effect.provide(environment())))

  it.effect("the raw key never reaches a span, a log line or a metric tag", () =>
    Effect.gen(function*() {
      const { logs, spans } = yield* Recorded
      for (const scenario of Object.values(scenarios(secretKey))) yield* scenario

      // Each warning path was taken, and logged with the key's hash.
      const messages = [
        "idempotency lease renewal failed; retrying",
        "idempotency release failed; the key frees when its lease ends",
        "idempotency commit failed; the run's result was not stored"
      ]
      for (const message of messages) {
        const log = logs.find((log) => log.line.includes(message))
        assert.isDefined(log, `no log line "${message}" among:\n${logs.map((log) => log.line).join("\n")}`)
        assert.match(String(log!.annotations["idempotency.key_hash"]), /^[0-9a-f]{16}$/)
      }
      assert.isAtLeast(spans.filter((span) => span.name === "Idempotent.wrap").length, 10)

      const texts = [
        ...spans.flatMap((span) => [
          span.name,
          ...[...span.attributes].flatMap(([key, value]) => [key, String(value)]),
          ...span.events.map((event) => `${event.name} ${JSON.stringify(event.attributes ?? {})}`),
          // What an exporter records for a failed span.
          span.exit !== undefined && Exit.isFailure(span.exit) ? Cause.pretty(span.exit.cause) : ""
        ]),
        ...logs.flatMap((log) => [log.line, JSON.stringify(log.annotations)]),
        ...(yield* Metric.snapshot).flatMap((pair) => [
          pair.metricKey.name,
          ...pair.metricKey.tags.flatMap((tag) => [tag.key, tag.value])
        ])
      ]
      const leaks = texts.filter((text) => text.includes("secret-key") || text.includes("🔑"))
      assert.deepStrictEqual(leaks, [])
    }).pipe(Effect.provide(environment())))

  it.effect("the counters grow by one per outcome, tagged with the backend", () =>
    Effect.gen(function*() {
      const backend = "metrics-test"
      const run = scenarios("metrics-key")
      const expected: Array<readonly [keyof typeof run, Partial<Counters>]> = [
        ["executed", { executions: 1 }],
        ["replayed", { replays: 1 }],
        ["reused", { keyReused: 1 }],
        // The first call runs, the duplicate is refused.
        ["in_flight", { executions: 1, inFlight: 1 }],
        ["lease_lost", { executions: 1, leaseLost: 1 }],
        ["renewal_warning", { executions: 1 }],
        ["release_warning", { executions: 1, releases: 1 }],
        // The result was not stored: the caller is told, and the key is released for a retry.
        ["commit_error", { executions: 1, commitFailures: 1, releases: 1 }],
        ["storage_error", { storageErrors: 1 }],
        ["encode_error", { executions: 1, releases: 1 }]
      ]
      for (const [scenario, delta] of expected) {
        assert.deepStrictEqual(yield* countersDelta(backend, run[scenario]), { ...zero, ...delta }, scenario)
      }
    }).pipe(Effect.provide(environment("metrics-test"))))

  // Effect's built-in tracer exports nothing, so the wrap makes no span of its own under it (a span
  // costs more than the rest of a replay) and leaves the caller's span as it found it.
  it.effect("under Effect's built-in tracer no span is made and the caller's span is left alone", () =>
    Effect.gen(function*() {
      const seen = yield* Effect.currentSpan.pipe(
        Effect.map((span) => span.name),
        Idempotent.wrap({ key: "native-tracer" }),
        Effect.withSpan("caller")
      )
      assert.strictEqual(seen, "caller")
      const caller = yield* Effect.succeed(1).pipe(
        Idempotent.wrap({ key: "native-tracer" }),
        Effect.zipRight(Effect.currentSpan),
        Effect.withSpan("caller")
      )
      assert.deepStrictEqual([...caller.attributes.keys()].filter((key) => key.startsWith("idempotency.")), [])
    }).pipe(Effect.provide(MemoryStorage.layer())))
})
