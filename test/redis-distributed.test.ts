/**
 * The Redis storage shared by several instances of a service, on the machine's Redis
 * (`REDIS_URL`, default `redis://127.0.0.1:6379`): independent layers in this process, separate
 * OS processes started together, a holder killed with SIGKILL mid-run, and a holder whose
 * renewals stall past its lease. Every run uses its own key prefix and deletes its keys afterwards.
 * Redis being unreachable fails every test here; none is skipped.
 */
import { assert, describe, it } from "@effect/vitest"
import { Context, Deferred, Duration, Effect, Fiber, Layer, Option, Redacted } from "effect"
import { randomUUID } from "node:crypto"
import { IdempotencyError, Idempotent, Storage } from "../src/index.js"
import * as RedisStorage from "../src/Storage/Redis.js"
import { counted } from "./fixtures/CountingStorage.js"
import { failsWith, successOf } from "./fixtures/Exits.js"
import { deleteKeys, machineRedisUrl, plainClient, storageCallTimeout } from "./fixtures/redisClients.js"
import { spawnWorker } from "./fixtures/redisWorkerProcess.js"
import { executionCounter, raceKey, type RaceResult, type WorkerMessage } from "./fixtures/redisWorkerProtocol.js"

const url = machineRedisUrl
const run = `idem-test-distributed-${randomUUID().slice(0, 8)}`

const keys = 200
const duplicates = 10
const instances = 4

/**
 * A plain connection to the machine's Redis, checked first thing in every test (so that Redis
 * being away fails each test, rather than a shared hook whose failure marks them skipped), and
 * deleting the test's keys when it ends.
 */
const admin = (prefix: string) =>
  Effect.tap(
    plainClient(url),
    (client) => Effect.addFinalizer(() => Effect.ignore(deleteKeys(client, `${prefix}*`)))
  )

const storageLayer = (prefix: string, connectionName?: string) =>
  RedisStorage.layer({
    url: Redacted.make(url),
    prefix,
    timeout: storageCallTimeout,
    ...(connectionName === undefined ? {} : { options: { connectionName } })
  })

/** Builds `layer` on its own (its own connections), for as long as the test's scope. */
const instance = <A, E>(layer: Layer.Layer<A, E>) => Layer.build(Layer.fresh(layer))

/** Per key: the results its callers got. */
const resultsByKey = (results: ReadonlyArray<{ readonly key: number; readonly nonce: string }>) => {
  const byKey = new Map<number, Array<string>>()
  for (const { key, nonce } of results) {
    const nonces = byKey.get(key) ?? []
    nonces.push(nonce)
    byKey.set(key, nonces)
  }
  return byKey
}

/** Every key had `duplicates` callers, and all callers of a key got the same nonce, made for that key alone. */
const assertOneResultPerKey = (results: ReadonlyArray<{ readonly key: number; readonly nonce: string }>) => {
  assert.strictEqual(results.length, keys * duplicates)
  const byKey = resultsByKey(results)
  assert.strictEqual(byKey.size, keys)
  const nonces = new Set<string>()
  for (const [key, got] of byKey) {
    assert.strictEqual(got.length, duplicates, `key ${key} had ${got.length} callers`)
    assert.strictEqual(new Set(got).size, 1, `the callers of key ${key} got different results: ${got}`)
    nonces.add(got[0]!)
  }
  assert.strictEqual(nonces.size, keys, "two keys got the same result")
}

describe("RedisStorage across instances", () => {
  it.scopedLive(
    `${instances} independent layers race for ${keys} keys x ${duplicates} duplicates: ${keys} executions, one result per key`,
    (ctx) =>
      Effect.gen(function*() {
        const prefix = `${run}-layers`
        const redis = yield* admin(prefix)
        const contexts = yield* Effect.all(
          Array.from({ length: instances }, (_, i) => instance(storageLayer(prefix, `${prefix}-${i}`))),
          { concurrency: "unbounded" }
        )
        // Independent instances: four storages, each on its own connections.
        assert.strictEqual(new Set(contexts.map((context) => Context.get(context, Storage.Storage))).size, instances)
        const clients = (yield* Effect.promise(() => redis.client("LIST") as Promise<string>)).split("\n")
        for (let i = 0; i < instances; i++) {
          assert.isTrue(
            clients.some((line) => line.includes(` name=${prefix}-${i} `)),
            `no connection of instance ${i}`
          )
        }

        const executions = new Map<number, number>()
        const results = yield* Effect.all(
          Array.from({ length: keys * duplicates }, (_, call) => {
            const key = Math.floor(call / duplicates)
            return Effect.sync((): RaceResult => {
              executions.set(key, (executions.get(key) ?? 0) + 1)
              // Which instance ran it: the one this caller went through.
              return { nonce: randomUUID(), runner: call % instances }
            }).pipe(
              Effect.delay("20 millis"),
              Idempotent.wrap({ key: raceKey(key), onInFlight: { wait: "30 seconds" } }),
              // Consecutive duplicates of a key go to different instances.
              Effect.provide(contexts[call % instances]!),
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
        ctx.annotate(`executions per instance: ${[...wins.values()].map((nonces) => nonces.size).join(", ")}`)
        assert.isAbove(wins.size, 1, "one instance ran every key")
      }),
    45_000
  )

  it.scopedLive(
    `${instances} OS processes, released together, race for ${keys} keys x ${duplicates} duplicates: ${keys} executions`,
    (ctx) =>
      Effect.gen(function*() {
        const prefix = `${run}-processes`
        const redis = yield* admin(prefix)
        const workers = yield* Effect.all(
          Array.from({ length: instances }, (_, index) =>
            spawnWorker({
              mode: "race",
              url,
              prefix,
              index,
              workers: instances,
              keys,
              duplicates,
              sleepMillis: 20,
              spacingMillis: 2,
              waitMillis: 30_000
            })),
          { concurrency: "unbounded" }
        )
        // Each has built its storage layer and connected before any starts; then all go at one instant.
        yield* Effect.forEach(workers, (worker) => worker.next("ready", "30 seconds"), { concurrency: "unbounded" })
        const startAt = Date.now() + 200
        yield* Effect.forEach(workers, (worker) => worker.send(`go ${startAt}`))
        const done = yield* Effect.forEach(workers, (worker) => worker.next("done", "30 seconds"), {
          concurrency: "unbounded"
        })
        assert.strictEqual(done.reduce((calls, { calls: own }) => calls + own, 0), keys * duplicates)

        const messages = workers.flatMap((worker) => worker.messages())
        const failures = messages.filter((message) => message.type === "failure")
        assert.deepStrictEqual(failures, [], "some calls failed")
        const results = messages.filter((message): message is Extract<WorkerMessage, { type: "result" }> =>
          message.type === "result"
        )
        assertOneResultPerKey(results.map(({ key, result }) => ({ key, nonce: result.nonce })))

        // Executions as Redis counted them, whichever process ran them.
        const counters = yield* Effect.promise(() =>
          redis.mget(Array.from({ length: keys }, (_, key) => executionCounter(prefix, key)))
        )
        assert.deepStrictEqual(counters, Array.from({ length: keys }, () => "1"))
        // A real race: every key was called from at least two processes (its duplicates are dealt out
        // among them), and each got the one execution's result. Which process wins a key is up to
        // the scheduler: on a loaded machine one process has been seen to win all 200, so the spread
        // is reported, not asserted.
        const callers = new Map<number, Set<number>>()
        for (const worker of workers) {
          for (const message of worker.messages()) {
            if (message.type === "result") {
              callers.set(message.key, (callers.get(message.key) ?? new Set()).add(worker.pid))
            }
          }
        }
        for (let key = 0; key < keys; key++) assert.isAbove(callers.get(key)?.size ?? 0, 1, `key ${key}`)
        const wins = new Map<number, Set<string>>()
        for (const { result } of results) {
          wins.set(result.runner, (wins.get(result.runner) ?? new Set()).add(result.nonce))
        }
        ctx.annotate(`executions per process: ${[...wins.values()].map((nonces) => nonces.size).join(", ")}`)
        for (const runner of wins.keys()) assert.include(workers.map((worker) => worker.pid), runner)
      }),
    50_000
  )

  it.scopedLive(
    "a holder killed with SIGKILL keeps the key until its lease ends; then another instance takes it with a higher fence, once",
    () =>
      Effect.gen(function*() {
        const prefix = `${run}-killed`
        yield* admin(prefix)
        const key = "held by a process that is killed"
        // Connected beforehand, so that its first call comes well within the holder's lease.
        const context = yield* instance(storageLayer(prefix))
        const holder = yield* spawnWorker({ mode: "hold", url, prefix, key, leaseMillis: 1000 })
        const held = yield* holder.next("fence", "30 seconds")
        const killedAt = Date.now()
        const killed = yield* holder.kill("SIGKILL")
        assert.strictEqual(killed.signal, "SIGKILL")

        let runs = 0
        const job = (onInFlight: Idempotent.OnInFlight) =>
          Effect.gen(function*() {
            const { fence } = yield* Idempotent.Execution
            runs++
            return { fence, nonce: randomUUID() }
          }).pipe(Idempotent.wrap({ key, lease: "10 seconds", onInFlight }), Effect.provide(context), Effect.exit)

        // The dead holder's lease still stands.
        const early = failsWith(yield* job("fail"), IdempotencyError.IdempotencyInFlight)
        const sinceKill = Date.now() - killedAt
        assert.isBelow(sinceKill, 1000, "the key was looked at only after the lease")
        assert.isAbove(Duration.toMillis(early.retryAfter), 0)
        assert.isAtMost(Duration.toMillis(early.retryAfter), 1000)
        assert.strictEqual(runs, 0)

        // Nobody will publish a release: the waiter wakes when the lease would end, and takes the key.
        const takenOver = successOf(yield* job({ wait: "10 seconds" }))
        const tookOverAfter = Date.now() - killedAt
        assert.strictEqual(runs, 1)
        assert.isAbove(takenOver.fence, held.fence)
        // Not before the lease ended (give or take a timer tick), and not much after.
        const leaseEnded = sinceKill + Duration.toMillis(early.retryAfter)
        assert.isAtLeast(
          tookOverAfter,
          leaseEnded - 20,
          `taken ${tookOverAfter} ms after the kill, lease ended at ${leaseEnded}`
        )
        assert.isBelow(
          tookOverAfter,
          leaseEnded + 2000,
          `taken ${tookOverAfter} ms after the kill, lease ended at ${leaseEnded}`
        )

        const replayed = successOf(yield* job("fail"))
        assert.deepStrictEqual(replayed, takenOver)
        assert.strictEqual(runs, 1)
      }),
    40_000
  )

  it.scopedLive(
    "a holder whose renewals stall is interrupted before its lease ends: IdempotencyLeaseLost, no commit, no overlap with the new owner, whose result is stored",
    () =>
      Effect.gen(function*() {
        const prefix = `${run}-stalled`
        yield* admin(prefix)
        const key = "held by an instance whose renewals stall"
        const stall = Duration.seconds(30)
        const commits: Array<boolean> = []
        const calls = { acquire: 0, renew: 0, commit: 0, release: 0, read: 0, delete: 0, watch: 0 }
        // The holder's renewals reach Redis only after `stall`, far past its lease.
        const stalled = Layer.effect(
          Storage.Storage,
          Effect.map(Storage.Storage, (inner) =>
            counted(inner, {
              renew: (lease, duration) => Effect.delay(inner.renew(lease, duration), stall),
              commit: (lease, request) => Effect.tap(inner.commit(lease, request), (done) => commits.push(done))
            }, calls).storage)
        ).pipe(Layer.provide(storageLayer(prefix)))
        const holderContext = yield* instance(stalled)
        const ownerContext = yield* instance(storageLayer(prefix))

        // A 5 second lease: the core stops the holder a safety margin (1 second) before it ends
        // in Redis, room enough for a busy machine's late timers.
        const times = { holderStopped: 0, ownerStarted: 0 }
        const started = yield* Deferred.make<number>()
        const holder = yield* Effect.gen(function*() {
          const { fence } = yield* Idempotent.Execution
          yield* Deferred.succeed(started, fence)
          yield* Effect.sleep("12 seconds")
          return { fence, by: "stalled holder" }
        }).pipe(
          Effect.onInterrupt(() => Effect.sync(() => (times.holderStopped = performance.now()))),
          Idempotent.wrap({ key, lease: "5 seconds" }),
          Effect.provide(holderContext),
          Effect.fork
        )
        const holderFence = yield* Deferred.await(started)

        const owner = successOf(
          yield* Effect.gen(function*() {
            times.ownerStarted = performance.now()
            const { fence } = yield* Idempotent.Execution
            return { fence, by: "new owner" }
          }).pipe(
            Idempotent.wrap({ key, lease: "10 seconds", onInFlight: { wait: "20 seconds" } }),
            Effect.provide(ownerContext),
            Effect.exit
          )
        )
        assert.isAbove(owner.fence, holderFence)

        const lost = failsWith(yield* Fiber.await(holder), IdempotencyError.IdempotencyLeaseLost)
        assert.strictEqual(lost.fence, holderFence)
        assert.isAbove(times.holderStopped, 0, "the holder's run was not interrupted")
        assert.isBelow(
          times.holderStopped,
          times.ownerStarted,
          "the holder still ran when the new owner started: two runs overlapped"
        )
        // It tried to renew (the calls stalled), and never committed a result it could not own.
        assert.isAtLeast(calls.renew, 1)
        assert.deepStrictEqual(commits, [], "the interrupted holder tried to commit")

        for (const context of [ownerContext, holderContext]) {
          const replayed = yield* Effect.succeed({ fence: -1, by: "a third run" }).pipe(
            Idempotent.wrap({ key }),
            Effect.provide(context)
          )
          assert.deepStrictEqual(replayed, owner)
        }
        const record = yield* Effect.flatMap(Storage.Storage, (storage) => storage.read(key)).pipe(
          Effect.provide(ownerContext)
        )
        assert.strictEqual(Option.getOrThrow(record).fence, owner.fence)
      }),
    40_000
  )
})
