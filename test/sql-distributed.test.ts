/**
 * The SQL storage shared by several instances of a service: independent pools in this process on
 * PostgreSQL and on MariaDB, two OS processes on one SQLite file, and PostgreSQL connections
 * killed (`pg_terminate_backend`) while calls are in flight. Every test runs on a table of its own,
 * dropped when it ends. A database being unreachable fails every test that needs it; none is
 * skipped.
 */
import { SqlClient } from "@effect/sql"
import { assert, describe, it } from "@effect/vitest"
import { Cause, Context, Duration, Effect, Fiber, Layer, Logger, Option, Predicate } from "effect"
import { randomUUID } from "node:crypto"
import { join } from "node:path"
import { IdempotencyError, Idempotent, Storage } from "../src/index.js"
import * as SqlStorage from "../src/Storage/Sql.js"
import { counted } from "./fixtures/CountingStorage.js"
import { failsWith } from "./fixtures/Exits.js"
import {
  type DatabaseUnavailable,
  dropTable,
  mysqlClient,
  pgClient,
  sqliteClient,
  tempDir,
  uniqueTable
} from "./fixtures/sqlClients.js"
import { spawnWorker } from "./fixtures/sqlWorkerProcess.js"
import { type SqlWorkerMessage } from "./fixtures/sqlWorkerProtocol.js"

const run = `idem-test-sql-${randomUUID().slice(0, 8)}`

const keys = 200
const duplicates = 10
const pools = 4

type ClientLayer = Layer.Layer<SqlClient.SqlClient, DatabaseUnavailable>

/**
 * A connection of the test's own, made first thing in the test (so that the database being away
 * fails the test itself), which drops `table` when the test ends.
 */
const admin = (client: ClientLayer, table: string) =>
  Effect.gen(function*() {
    const context = yield* Layer.build(client)
    const sql = Context.get(context, SqlClient.SqlClient)
    yield* Effect.addFinalizer(() => Effect.ignore(Effect.provide(dropTable(table), context)))
    return sql
  })

/** A storage on `table` over a client layer, with the client kept in its context. */
const storageOn = (client: ClientLayer, table: string) => SqlStorage.layer({ table }).pipe(Layer.provideMerge(client))

/** Builds `layer` on its own (its own pool), for as long as the test's scope. */
const instance = <A, E>(layer: Layer.Layer<A, E>) => Layer.build(Layer.fresh(layer))

/** How a call ended: its result, or the name of its failure. */
type Outcome = { readonly nonce: string } | { readonly failure: string }

const failureName = (cause: Cause.Cause<unknown>): string => {
  const failure = Cause.failureOption(cause)
  if (Option.isNone(failure)) return Cause.pretty(cause)
  const error = failure.value
  return Predicate.hasProperty(error, "_tag") ? String(error._tag) : String(error)
}

/** Every key had `duplicates` callers, and all callers of a key got the same nonce, made for that key alone. */
const assertOneResultPerKey = (results: ReadonlyArray<{ readonly key: number; readonly nonce: string }>) => {
  assert.strictEqual(results.length, keys * duplicates)
  const byKey = new Map<number, Array<string>>()
  for (const { key, nonce } of results) byKey.set(key, [...(byKey.get(key) ?? []), nonce])
  assert.strictEqual(byKey.size, keys)
  const nonces = new Set<string>()
  for (const [key, got] of byKey) {
    assert.strictEqual(got.length, duplicates, `key ${key} had ${got.length} callers`)
    assert.strictEqual(new Set(got).size, 1, `the callers of key ${key} got different results: ${got}`)
    nonces.add(got[0]!)
  }
  assert.strictEqual(nonces.size, keys, "two keys got the same result")
}

/**
 * `pools` independently built storages (each its own pool, as `pools` processes would have) race
 * for `keys` keys, `duplicates` callers each, consecutive duplicates going to different pools.
 */
const raceAcrossPools = (client: (pool: number) => ClientLayer, table: string) =>
  Effect.gen(function*() {
    const contexts = yield* Effect.all(
      Array.from({ length: pools }, (_, i) => instance(storageOn(client(i), table))),
      { concurrency: "unbounded" }
    )
    assert.strictEqual(new Set(contexts.map((context) => Context.get(context, Storage.Storage))).size, pools)
    assert.strictEqual(new Set(contexts.map((context) => Context.get(context, SqlClient.SqlClient))).size, pools)

    const executions = new Map<number, number>()
    const results = yield* Effect.all(
      Array.from({ length: keys * duplicates }, (_, call) => {
        const key = Math.floor(call / duplicates)
        return Effect.sync(() => {
          executions.set(key, (executions.get(key) ?? 0) + 1)
          return { nonce: randomUUID(), runner: call % pools }
        }).pipe(
          Effect.delay("20 millis"),
          Idempotent.wrap({ key: `race-${key}`, onInFlight: { wait: "30 seconds" } }),
          Effect.provide(contexts[call % pools]!),
          Effect.map(({ nonce, runner }) => ({ key, nonce, runner }))
        )
      }),
      { concurrency: "unbounded" }
    )

    assert.strictEqual(executions.size, keys)
    for (const [key, count] of executions) assert.strictEqual(count, 1, `key ${key} ran ${count} times`)
    assertOneResultPerKey(results)
    const wins = new Map<number, Set<string>>()
    for (const { nonce, runner } of results) wins.set(runner, (wins.get(runner) ?? new Set()).add(nonce))
    assert.isAbove(wins.size, 1, "one pool ran every key")
    return [...wins.values()].map((nonces) => nonces.size)
  })

describe("SqlStorage across pools", () => {
  it.scopedLive(
    `PostgreSQL: ${pools} independent pools race for ${keys} keys x ${duplicates} duplicates: ${keys} executions, one result per key`,
    (ctx) =>
      Effect.gen(function*() {
        const table = uniqueTable("pools_pg")
        const sql = yield* admin(pgClient({ applicationName: `${run}-admin`, maxConnections: 1 }), table)
        const name = (pool: number) => `${run}-pool-${pool}`
        const wins = yield* raceAcrossPools((pool) => pgClient({ applicationName: name(pool) }), table)
        ctx.annotate(`executions per pool: ${wins.join(", ")}`)
        // Four pools of their own, as PostgreSQL saw them.
        const seen = yield* sql<{ readonly name: string }>`
          SELECT DISTINCT application_name AS name FROM pg_stat_activity WHERE application_name LIKE ${`${run}-pool-%`}`
        assert.deepStrictEqual(
          seen.map(({ name }) => name).sort(),
          Array.from({ length: pools }, (_, pool) => name(pool)).sort()
        )
      }),
    50_000
  )

  it.scopedLive(
    `MariaDB: ${pools} independent pools race for ${keys} keys x ${duplicates} duplicates: ${keys} executions, one result per key`,
    (ctx) =>
      Effect.gen(function*() {
        const table = uniqueTable("pools_mysql")
        yield* admin(mysqlClient({ maxConnections: 1 }), table)
        const wins = yield* raceAcrossPools(() => mysqlClient(), table)
        ctx.annotate(`executions per pool: ${wins.join(", ")}`)
      }),
    50_000
  )
})

describe("SqlStorage on one SQLite file", () => {
  const processes = 2
  const sqliteDuplicates = 6

  it.scopedLive(
    `${processes} OS processes, released together, race for ${keys} keys x ${sqliteDuplicates} duplicates: ${keys} executions`,
    (ctx) =>
      Effect.gen(function*() {
        const filename = join(yield* tempDir("idem-sqlite-distributed"), "shared.db")
        const table = uniqueTable("processes")
        const executionsTable = "executions"
        // The test's own connection: it makes the table the executions are counted in, and reads it.
        const sql = yield* admin(sqliteClient(filename), table)
        yield* sql`CREATE TABLE ${
          sql(executionsTable)
        } (race_key INTEGER NOT NULL, nonce TEXT NOT NULL, pid INTEGER NOT NULL)`

        const workers = yield* Effect.all(
          Array.from({ length: processes }, (_, index) =>
            spawnWorker({
              mode: "race",
              filename,
              table,
              executions: executionsTable,
              index,
              workers: processes,
              keys,
              duplicates: sqliteDuplicates,
              sleepMillis: 20,
              spacingMillis: 5,
              waitMillis: 30_000,
              attempts: 5
            })),
          { concurrency: "unbounded" }
        )
        // Each has opened the file and built its storage before any starts; then all go at one instant.
        yield* Effect.forEach(workers, (worker) => worker.next("ready", "30 seconds"), { concurrency: "unbounded" })
        const startAt = Date.now() + 200
        yield* Effect.forEach(workers, (worker) => worker.send(`go ${startAt}`))
        const done = yield* Effect.forEach(workers, (worker) => worker.next("done", "40 seconds"), {
          concurrency: "unbounded"
        })
        assert.strictEqual(done.reduce((calls, { calls: own }) => calls + own, 0), keys * sqliteDuplicates)

        const messages = workers.flatMap((worker) => worker.messages())
        const failures = messages.filter((message) => message.type === "failure")
        assert.deepStrictEqual(failures, [], "some calls failed")
        const results = messages.filter((message): message is Extract<SqlWorkerMessage, { type: "result" }> =>
          message.type === "result"
        )
        assert.strictEqual(results.length, keys * sqliteDuplicates)
        const retried = results.filter((result) => result.storageErrors.length > 0)
        ctx.annotate(
          `calls that met a storage error and retried: ${retried.length}` +
            (retried.length > 0 ? ` (first: ${retried[0]!.storageErrors[0]})` : "")
        )

        // Per key, every caller in either process got one nonce, and the file holds exactly one
        // execution of it, with that nonce.
        const rows = yield* sql<{ readonly race_key: number; readonly nonce: string; readonly pid: number }>`
          SELECT race_key, nonce, pid FROM ${sql(executionsTable)}`
        const executed = new Map<number, Array<string>>()
        for (const row of rows) executed.set(row.race_key, [...(executed.get(row.race_key) ?? []), row.nonce])
        assert.strictEqual(executed.size, keys)
        for (const [key, nonces] of executed) {
          assert.strictEqual(nonces.length, 1, `key ${key} ran ${nonces.length} times`)
        }
        const byKey = new Map<number, Set<string>>()
        for (const { key, result } of results) {
          byKey.set(key, (byKey.get(key) ?? new Set()).add(result.nonce))
        }
        assert.strictEqual(byKey.size, keys)
        for (const [key, nonces] of byKey) {
          assert.deepStrictEqual([...nonces], executed.get(key), `the callers of key ${key} got another result`)
        }
        // A real race: both processes called every key, and the runs were made by the workers. Which
        // of them wins is down to SQLite's write lock: a process that finds it taken sleeps in the
        // busy handler, its whole event loop with it, and often stays behind for many keys, so the
        // split is reported, not asserted.
        const pids = workers.map((worker) => worker.pid)
        for (const [index, worker] of workers.entries()) {
          const called = new Set(worker.messages().flatMap((message) => message.type === "result" ? [message.key] : []))
          assert.strictEqual(called.size, keys, `process ${index} did not call every key`)
        }
        const wins = new Map<number, number>()
        for (const row of rows) wins.set(row.pid, (wins.get(row.pid) ?? 0) + 1)
        for (const pid of wins.keys()) assert.include(pids, pid)
        ctx.annotate(`executions per process: ${pids.map((pid) => wins.get(pid) ?? 0).join(", ")}`)
      }),
    50_000
  )

  it.scopedLive(
    "a file locked by another writer past the busy timeout: IdempotencyStorageError, nothing runs; the retry runs once",
    () =>
      Effect.gen(function*() {
        const filename = join(yield* tempDir("idem-sqlite-locked"), "locked.db")
        const table = uniqueTable("locked")
        const locker = yield* admin(sqliteClient(filename), table)
        const context = yield* instance(storageOn(sqliteClient(filename), table))
        let runs = 0
        const job = Effect.sync(() => ++runs).pipe(
          Idempotent.wrap({ key: "locked", onInFlight: "fail" }),
          Effect.provide(context)
        )

        // Another connection holds the write lock. The storage's statement waits out the busy
        // timeout (better-sqlite3's default, 5 seconds, blocking its thread) and fails closed.
        yield* locker.unsafe("BEGIN IMMEDIATE")
        const locked = yield* Effect.exit(job).pipe(
          Effect.ensuring(Effect.orDie(locker.unsafe("COMMIT")))
        )
        const error = failsWith(locked, IdempotencyError.IdempotencyStorageError)
        assert.strictEqual(error.operation, "acquire")
        assert.match(
          String(Predicate.hasProperty(error.cause, "cause") ? error.cause.cause : error.cause),
          /database is locked/
        )
        assert.strictEqual(runs, 0)

        // Nothing was left behind: the retry takes the key at once and runs; later calls replay.
        assert.strictEqual(yield* job, 1)
        assert.strictEqual(yield* job, 1)
        assert.strictEqual(runs, 1)
      }),
    30_000
  )
})

describe("SqlStorage on PostgreSQL with connections killed mid-run", () => {
  // What a caller may be told while connections are killed under it: the store could not be
  // reached (nothing ran), or its run could no longer prove its lease, or its result could not be
  // stored before the lease ended. The last two happen whenever a statement waits longer than a
  // lease: see the kills below.
  const allowedFailures = ["IdempotencyStorageError", "IdempotencyLeaseLost", "IdempotencyResultNotStored"]
  // What a caller whose effect ran may be told instead of its result: the result was not kept.
  const notKept = ["IdempotencyLeaseLost", "IdempotencyResultNotStored"]

  it.scopedLive(
    "calls succeed, replay or fail typed; no key runs twice at once; no caller gets a result that was not stored; none is stuck",
    (ctx) =>
      Effect.gen(function*() {
        const table = uniqueTable("chaos")
        const applicationName = `${run}-chaos`
        const sql = yield* admin(pgClient({ applicationName: `${run}-chaos-admin`, maxConnections: 2 }), table)
        const lease = Duration.seconds(2)
        const chaosKeys = 150

        // What the storage and `Idempotent.wrap` logged (lost listeners, failed renewals and
        // commits): counted, not printed.
        const logged = new Map<string, number>()
        const logger = Logger.replace(
          Logger.defaultLogger,
          Logger.make(({ message }) => {
            const text = String(Array.isArray(message) ? message[0] : message)
            logged.set(text, (logged.get(text) ?? 0) + 1)
          })
        )

        // Each key's commits, in order, as the storage answered them.
        const commits = new Map<string, Array<"stored" | "refused" | "failed">>()
        const noteCommit = (key: string, outcome: "stored" | "refused" | "failed") =>
          Effect.sync(() => commits.set(key, [...(commits.get(key) ?? []), outcome]))
        const observed = Layer.effect(
          Storage.Storage,
          Effect.map(Storage.Storage, (inner) =>
            counted(inner, {
              commit: (lease, request) =>
                inner.commit(lease, request).pipe(
                  Effect.tapBoth({
                    onFailure: () => noteCommit(lease.key, "failed"),
                    onSuccess: (stored) => noteCommit(lease.key, stored ? "stored" : "refused")
                  })
                )
            }).storage)
        ).pipe(Layer.provide(SqlStorage.layer({ table })), Layer.provide(pgClient({ applicationName })))
        // Two instances of the service, each with its own pool (and listener): every key is called
        // through both.
        const [first, second] = yield* Effect.all([instance(observed), instance(observed)]).pipe(
          Effect.provide(logger)
        )

        const key = (n: number) => `chaos-${n}`
        /** One run of a key: its result, its fence, and when it started and stopped (interrupted or not). */
        interface Run {
          readonly nonce: string
          readonly fence: number
          readonly startedAt: number
          endedAt: number | undefined
        }
        const runs = new Map<number, Array<Run>>()
        /** How one call ended, and the run it made, if its effect ran. */
        interface Call {
          readonly outcome: Outcome
          readonly ran: Run | undefined
        }
        // Runs of different lengths: some end within the first third of the lease, others renew it.
        const job = (n: number, context: Context.Context<Storage.Storage>, onInFlight: Idempotent.OnInFlight) =>
          Effect.suspend(() => {
            let ran: Run | undefined = undefined
            return Effect.gen(function*() {
              const execution = yield* Idempotent.Execution
              const own: Run = {
                nonce: randomUUID(),
                fence: execution.fence,
                startedAt: Date.now(),
                endedAt: undefined
              }
              ran = own
              runs.set(n, [...(runs.get(n) ?? []), own])
              return yield* Effect.sleep(Duration.millis([50, 200, 500, 800, 1000][n % 5]!)).pipe(
                Effect.as(own.nonce),
                Effect.ensuring(Effect.sync(() => {
                  own.endedAt = Date.now()
                }))
              )
            }).pipe(
              Idempotent.wrap({ key: key(n), lease, onInFlight }),
              Effect.provide(context),
              // A hang is a failure of its own, told apart from the storage's.
              Effect.timeoutFail({ duration: "20 seconds", onTimeout: () => "timed out" as const }),
              Effect.provide(logger),
              Effect.map((nonce): Outcome => ({ nonce })),
              Effect.catchAllCause((cause) => Effect.succeed<Outcome>({ failure: failureName(cause) })),
              Effect.map((outcome): Call => ({ outcome, ran }))
            )
          })
        const waiting: Idempotent.OnInFlight = { wait: "10 seconds" }

        // Kills every connection of both pools (and their listeners) while statements of them are
        // in flight: an exclusive lock on the table holds the acquires, renewals and commits until
        // their connections are killed. Three rounds, each keeping the table from them for at most
        // a quarter of a second. A statement can still wait much longer than that: every
        // connection of both pools is gone at once, and the calls queue for the few new ones
        // (behind the cancellations of interrupted statements, which the client sends through the
        // same pool). On a loaded machine that wait passes a whole lease, and then a run rightly
        // loses its lease, or its commit reaches the database after the lease ended and is
        // refused: the caller is told its result was not kept, and another caller may run the key.
        let killed = 0
        let blockedAtKill = 0
        const killRound = sql.withTransaction(
          Effect.gen(function*() {
            yield* sql`LOCK TABLE ${sql(table)} IN ACCESS EXCLUSIVE MODE`
            const deadline = Date.now() + 200
            while (Date.now() < deadline) {
              const [blocked] = yield* sql<{ readonly n: number }>`
                SELECT count(*)::int AS n FROM pg_stat_activity
                WHERE application_name = ${applicationName} AND wait_event_type = 'Lock'`
              if ((blocked?.n ?? 0) >= 5) break
              yield* Effect.sleep("5 millis")
            }
            const [counts] = yield* sql<{ readonly blocked: number; readonly killed: number }>`
              SELECT count(*) FILTER (WHERE wait_event_type = 'Lock')::int AS blocked,
                     count(*) FILTER (WHERE pg_terminate_backend(pid))::int AS killed
              FROM pg_stat_activity WHERE application_name = ${applicationName}`
            blockedAtKill += counts?.blocked ?? 0
            killed += counts?.killed ?? 0
          })
        )
        // Both pools open their connections (and the code paths are compiled) before the clock starts.
        yield* Effect.forEach(
          Array.from({ length: 20 }, (_, i) => i),
          (i) =>
            Effect.succeed(i).pipe(
              Idempotent.wrap({ key: `warm-up-${i}` }),
              Effect.provide(i % 2 === 0 ? first : second)
            ),
          { concurrency: "unbounded", discard: true }
        )

        const chaos = yield* Effect.fork(
          Effect.forEach([300, 600, 600], (pause) => Effect.zipRight(Effect.sleep(pause), killRound), {
            discard: true
          })
        )
        // Phase 1: two callers per key, one through each instance, keys 10 millis apart, through the
        // kills. Each waits for the other's run, if that is the one that takes the key.
        const phase1 = yield* Effect.forEach(
          Array.from({ length: chaosKeys }, (_, n) => n),
          (n) =>
            Effect.all([
              Effect.delay(job(n, first, waiting), Duration.millis(n * 10)),
              Effect.delay(job(n, second, waiting), Duration.millis(n * 10 + 20))
            ], { concurrency: "unbounded" }),
          { concurrency: "unbounded" }
        )
        yield* Fiber.join(chaos)
        const failures = phase1.flat().flatMap(({ outcome }) => "failure" in outcome ? [outcome.failure] : [])
        for (const failure of failures) assert.include(allowedFailures, failure)
        const commitFailures = [...commits.values()].flat().filter((seen) => seen === "failed").length
        const byFailure = new Map<string, number>()
        for (const failure of failures) byFailure.set(failure, (byFailure.get(failure) ?? 0) + 1)
        ctx.annotate(
          `${killed} connections killed, ${blockedAtKill} of them blocked mid-statement; ` +
            `${failures.length} of ${chaosKeys * 2} calls failed ${JSON.stringify(Object.fromEntries(byFailure))}; ` +
            `${commitFailures} commits failed; logged: ${JSON.stringify(Object.fromEntries(logged))}`
        )
        assert.isAbove(blockedAtKill, 0, "no statement was in flight when its connection was killed")
        assert.isAbove(failures.length + commitFailures, 0, "the kills were not felt")

        // Phase 2: once a lease has passed since the last call of phase 1 ended (any lease a killed
        // statement left behind was taken before that), the callers that failed retry with the same
        // keys, through the same instance. The first retry does not wait: a key left leased would
        // answer in flight. It runs the key, or replays a run that was stored; should the machine
        // be so slow that even this run loses its lease, the caller tries again (waiting now, for
        // the lease its lost run left), as a client would.
        yield* Effect.sleep(Duration.sum(lease, Duration.seconds(1)))
        const retry = (n: number, context: Context.Context<Storage.Storage>) => {
          const attempt = (tries: number): Effect.Effect<Call> =>
            Effect.flatMap(job(n, context, tries === 0 ? "fail" : waiting), (call) => {
              if ("nonce" in call.outcome) return Effect.succeed(call)
              if (tries < 3 && notKept.includes(call.outcome.failure)) return attempt(tries + 1)
              return assert.fail(`retry ${tries + 1} of key ${n} failed: ${call.outcome.failure}`)
            })
          return attempt(0)
        }
        // Keys at once, the callers of one key one after the other.
        const phase2 = yield* Effect.forEach(
          phase1.entries(),
          ([n, pair]) =>
            Effect.forEach(pair.entries(), ([caller, call]) =>
              "failure" in call.outcome
                ? retry(n, caller === 0 ? first : second)
                : Effect.succeed(undefined)),
          { concurrency: "unbounded" }
        )

        // Phase 3: every key, asked again through either instance, replays the one result stored
        // for it: no key is stuck, and none runs again.
        const runsBefore = [...runs.values()].flat().length
        const stored = yield* Effect.forEach(
          Array.from({ length: chaosKeys }, (_, n) => n),
          (n) =>
            Effect.map(job(n, n % 2 === 0 ? first : second, "fail"), ({ outcome }) => {
              if ("failure" in outcome) return assert.fail(`key ${n} asked again: ${outcome.failure}`)
              return outcome.nonce
            }),
          { concurrency: "unbounded" }
        )
        assert.strictEqual([...runs.values()].flat().length, runsBefore, "a key ran again after its result was stored")

        let ranAgain = 0
        for (const [n, nonce] of stored.entries()) {
          const ran = [...(runs.get(n) ?? [])].sort((a, b) => a.startedAt - b.startedAt)
          // The stored result is one that a run of this key made.
          assert.include(ran.map((run) => run.nonce), nonce, `key ${n} replays a result no run of it made`)
          // No key ran twice at once: a run started only once the one before had stopped, and
          // each was a new owner of the key (its fence higher).
          for (const [i, run] of ran.entries()) {
            assert.isDefined(run.endedAt, `a run of key ${n} never stopped`)
            if (i === 0) continue
            const before = ran[i - 1]!
            assert.isAtMost(before.endedAt!, run.startedAt, `two runs of key ${n} overlapped`)
            assert.isAbove(run.fence, before.fence, `two runs of key ${n} had one owner's fence`)
          }
          if (ran.length > 1) ranAgain++
          // Every caller of the key that was handed a result was handed the stored one; a caller
          // whose run was not the stored one was told its result was not kept.
          const calls = [...phase1[n]!, ...phase2[n]!.flatMap((call) => call === undefined ? [] : [call])]
          for (const call of calls) {
            if ("nonce" in call.outcome) {
              assert.strictEqual(call.outcome.nonce, nonce, `a caller of key ${n} got a result that was not stored`)
            } else if (call.ran !== undefined && call.ran.nonce !== nonce) {
              assert.include(notKept, call.outcome.failure, `key ${n}: a run whose result was lost was reported so`)
            }
          }
        }
        ctx.annotate(`keys that ran again after a run whose result was not kept: ${ranAgain}`)
      }),
    55_000
  )
})
