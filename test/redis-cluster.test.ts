/**
 * The Redis storage on a real Redis Cluster: a throw-away three-master cluster on loopback ports,
 * started for this file and stopped (its folder removed) when the file's layers are released,
 * also when a test failed. The whole conformance suite runs through an ioredis `Cluster` client,
 * then the tests below look at where the keys landed.
 */
import { assert, layer } from "@effect/vitest"
import { Context, Duration, Effect, Layer, Logger, Option, RcRef, Scope } from "effect"
import type { Redis } from "ioredis"
import { createHash, randomUUID } from "node:crypto"
import { IdempotencyStorageError, IdempotencyStorageSetupError } from "../src/IdempotencyError.js"
import * as Storage from "../src/Storage.js"
import * as RedisStorage from "../src/Storage/Redis.js"
import { conformance } from "../src/testing.js"
import { failsWith } from "./fixtures/Exits.js"
import { clusterClient, plainClient, scanKeys, storageCallTimeout } from "./fixtures/redisClients.js"
import * as RedisServers from "./fixtures/redisServers.js"

// One cluster for the file, however many layers use it: each build of a storage layer below holds
// a reference, and the cluster stops when the last is released. The conformance suite builds its
// layer several more times (independent instances), which must share this cluster, not start more.
const clusterRef = Effect.runSync(
  Scope.extend(RcRef.make({ acquire: RedisServers.cluster({ masters: 3 }) }), Effect.runSync(Scope.make()))
)

/** The running cluster, for tests that look at its nodes. */
class TestCluster extends Context.Tag("test/TestCluster")<TestCluster, RedisServers.RedisCluster>() {}

const TestClusterLive = Layer.scoped(TestCluster, RcRef.get(clusterRef))

/** A Redis storage on the cluster through its own ioredis `Cluster` client. */
const clusterStorage = (prefix: string, options?: Omit<RedisStorage.RedisStorageOptions, "client" | "prefix">) =>
  Layer.unwrapScoped(
    Effect.gen(function*() {
      const cluster = yield* RcRef.get(clusterRef)
      // Released after the storage layer built on it: the storage never closes a client it was given.
      const client = yield* clusterClient(cluster.nodes)
      return RedisStorage.layer({ client, prefix, timeout: storageCallTimeout, ...options })
    })
  )

const run = randomUUID().slice(0, 8)
const suitePrefix = `cluster-suite-${run}`

/** A plain connection to every master, to look at what each one stores. */
const masterClients = Effect.flatMap(
  TestCluster,
  (cluster) => Effect.forEach(cluster.masters, (master) => plainClient(master.url))
)

const keySlot = (client: Redis, key: string) =>
  Effect.promise(() => client.call("CLUSTER", "KEYSLOT", key) as Promise<number>)

/** Every key under `prefix`, with the index of the master that holds it. */
const keysByMaster = (masters: ReadonlyArray<Redis>, prefix: string) =>
  Effect.map(
    Effect.forEach(masters, (client) => scanKeys(client, `${prefix}*`)),
    (perMaster) => new Map(perMaster.flatMap((keys, master) => keys.map((key) => [key, master] as const)))
  )

const hashTag = (key: string): string | undefined => /\{([^{}]+)\}/.exec(key)?.[1]

const bytes = (text: string) => new TextEncoder().encode(text)

/** Calls of `command` so far, per master (`INFO commandstats`). */
const callsPerMaster = (masters: ReadonlyArray<Redis>, command: string) =>
  Effect.forEach(masters, (client) =>
    Effect.map(
      Effect.promise(() => client.info("commandstats")),
      (text) => Number(new RegExp(`^cmdstat_${command}:calls=(\\d+)`, "m").exec(text)?.[1] ?? 0)
    ))

/** The master (index) that holds `name`; the others answer MOVED. */
const masterOf = (masters: ReadonlyArray<Redis>, name: string) =>
  Effect.map(
    Effect.forEach(masters, (client) => Effect.promise(() => client.exists(name).catch(() => 0))),
    (found) => found.findIndex((count) => count === 1)
  )

layer(TestClusterLive, { excludeTestServices: true, timeout: "60 seconds" })(
  "RedisStorage on a Redis Cluster",
  (it) => {
    // A 1 second base lease, as on the machine's Redis: the suite's 300 millis default leaves too
    // little room for timers on a busy two-core machine running other files alongside.
    conformance("RedisStorage, three-master Redis Cluster", clusterStorage(suitePrefix), {
      sharedAcrossBuilds: true,
      lease: "1 second"
    })

    it.scoped("the cluster is three masters serving all 16384 slots", () =>
      Effect.gen(function*() {
        const cluster = yield* TestCluster
        assert.strictEqual(cluster.masters.length, 3)
        const [first] = yield* masterClients
        const slots = (yield* Effect.promise(() => first!.call("CLUSTER", "SLOTS"))) as Array<
          [number, number, [string, number, string]]
        >
        const ports = new Set(slots.map(([, , [, port]]) => port))
        assert.deepStrictEqual([...ports].sort(), cluster.masters.map((master) => master.port).sort())
        assert.strictEqual(slots.reduce((served, [from, to]) => served + to - from + 1, 0), 16384)
      }))

    it.scoped("the suite's keys all carry a hash tag, each tag on one master, and they spread over all three", () =>
      Effect.gen(function*() {
        const masters = yield* masterClients
        const keys = yield* keysByMaster(masters, suitePrefix)
        assert.isAbove(keys.size, 200, "the conformance suite left fewer keys than it writes")
        const mastersOfTag = new Map<string, Set<number>>()
        for (const [key, master] of keys) {
          const tag = hashTag(key)
          assert.isDefined(tag, `${key} has no hash tag`)
          const seen = mastersOfTag.get(tag!) ?? new Set()
          seen.add(master)
          mastersOfTag.set(tag!, seen)
        }
        for (const [tag, seen] of mastersOfTag) assert.strictEqual(seen.size, 1, `keys of {${tag}} on several masters`)
        assert.strictEqual(new Set(keys.values()).size, 3, "every idempotency key landed on the same master")
      }))

    it.scoped("every Redis key of one idempotency key is in one slot: the record and its fence, in flight and done", () =>
      Effect.gen(function*() {
        const prefix = `cluster-slots-${run}`
        const storage = Context.get(yield* Layer.build(clusterStorage(prefix)), Storage.Storage)
        const masters = yield* masterClients
        const slotsSeen = new Set<number>()
        for (let i = 0; i < 24; i++) {
          const key = `slot check ${i} ${randomUUID()}`
          const before = yield* keysByMaster(masters, prefix)
          const acquired = yield* storage.acquire({ key, fingerprint: "fp", lease: Duration.seconds(30) })
          if (acquired._tag !== "Acquired") return assert.fail(`expected Acquired, got ${acquired._tag}`)
          const inFlight = yield* keysByMaster(masters, prefix)
          assert.isTrue(
            yield* storage.commit(acquired.lease, {
              outcome: "success",
              payload: new TextEncoder().encode("1"),
              ttl: Duration.minutes(10)
            })
          )
          const done = yield* keysByMaster(masters, prefix)

          const own = new Map([...inFlight, ...done].filter(([name]) => !before.has(name)))
          // At least the record (lease, then result) and the fence counter.
          assert.isAtLeast(own.size, 2, `keys of ${key}: ${[...own.keys()]}`)
          const slots = yield* Effect.forEach([...own.keys()], (name) => keySlot(masters[0]!, name))
          assert.strictEqual(new Set(slots).size, 1, `keys of ${key} in slots ${slots}: ${[...own.keys()]}`)
          assert.strictEqual(new Set(own.values()).size, 1, `keys of ${key} on several masters`)
          slotsSeen.add(slots[0]!)
        }
        // Hashed client keys, not the shared prefix, pick the slot.
        assert.isAbove(slotsSeen.size, 1, "all idempotency keys went to one slot")
      }))

    it.scoped("maxmemory-policy is read from every master: one at volatile-lru fails the build naming it, or warns", () =>
      Effect.gen(function*() {
        const cluster = yield* TestCluster
        const masters = yield* masterClients
        const last = masters[2]!
        yield* Effect.acquireRelease(
          Effect.promise(() => last.config("SET", "maxmemory-policy", "volatile-lru")),
          () => Effect.promise(() => last.config("SET", "maxmemory-policy", "noeviction"))
        )
        const exit = yield* Effect.exit(Layer.build(clusterStorage(`cluster-evict-${run}`)))
        const cause = failsWith(exit, IdempotencyStorageSetupError).cause as RedisStorage.RedisEvictionPolicyUnsafe
        assert.instanceOf(cause, RedisStorage.RedisEvictionPolicyUnsafe)
        assert.deepStrictEqual({ node: cause.node, policy: cause.policy }, {
          node: `127.0.0.1:${cluster.masters[2]!.port}`,
          policy: "volatile-lru"
        })

        const warned: Array<Record<string, unknown>> = []
        const logger = Logger.make(({ annotations, logLevel }) => {
          if (logLevel.label === "WARN") warned.push(Object.fromEntries(annotations))
        })
        yield* Layer.build(clusterStorage(`cluster-evict-${run}`, { onEvictionRisk: "warn" })).pipe(
          Effect.provide(Logger.replace(Logger.defaultLogger, logger))
        )
        assert.deepStrictEqual(warned, [{ node: `127.0.0.1:${cluster.masters[2]!.port}`, policy: "volatile-lru" }])
      }))

    it.scoped("waitForReplicas on a cluster: WAIT runs on the master that holds the key, after the record landed there", () =>
      Effect.gen(function*() {
        const prefix = `cluster-wait-${run}`
        const storage = Context.get(
          yield* Layer.build(clusterStorage(prefix, { waitForReplicas: { count: 1, timeout: "200 millis" } })),
          Storage.Storage
        )
        const masters = yield* masterClients
        const holders = new Set<number>()
        for (let i = 0; i < 12; i++) {
          const key = `wait check ${i} ${randomUUID()}`
          const acquired = yield* storage.acquire({ key, fingerprint: "", lease: Duration.seconds(30) })
          if (acquired._tag !== "Acquired") return assert.fail(`expected Acquired, got ${acquired._tag}`)
          const before = yield* callsPerMaster(masters, "wait")
          const exit = yield* Effect.exit(
            storage.commit(acquired.lease, { outcome: "success", payload: bytes("1"), ttl: Duration.minutes(10) })
          )
          const after = yield* callsPerMaster(masters, "wait")
          // The masters have no replicas: none can acknowledge.
          const cause = failsWith(exit, IdempotencyStorageError).cause as RedisStorage.RedisReplicasNotAcknowledged
          assert.instanceOf(cause, RedisStorage.RedisReplicasNotAcknowledged)
          assert.strictEqual(cause.acknowledged, 0)
          const record = `${prefix}:{${createHash("sha256").update(key).digest("hex")}}`
          const holder = yield* masterOf(masters, record)
          assert.isAtLeast(holder, 0, "the record is on no master")
          assert.deepStrictEqual(
            after.map((calls, master) => calls - before[master]!),
            masters.map((_, master) => master === holder ? 1 : 0)
          )
          assert.strictEqual(yield* Effect.promise(() => masters[holder]!.hget(record, "state")), "C")
          holders.add(holder)
        }
        assert.isAbove(holders.size, 1, "every key landed on one master")
      }))

    it.scoped("delete with a fence on a cluster: the completed record with that fence goes, another fence stays", () =>
      Effect.gen(function*() {
        const storage = Context.get(yield* Layer.build(clusterStorage(`cluster-delete-${run}`)), Storage.Storage)
        for (let i = 0; i < 6; i++) {
          const key = `delete check ${i} ${randomUUID()}`
          const acquired = yield* storage.acquire({ key, fingerprint: "", lease: Duration.seconds(30) })
          if (acquired._tag !== "Acquired") return assert.fail(`expected Acquired, got ${acquired._tag}`)
          yield* storage.commit(acquired.lease, { outcome: "success", payload: bytes("1"), ttl: Duration.minutes(10) })
          yield* storage.delete(key, acquired.lease.fence + 1)
          assert.isTrue(Option.isSome(yield* storage.read(key)))
          yield* storage.delete(key, acquired.lease.fence)
          assert.isTrue(Option.isNone(yield* storage.read(key)))
        }
      }))
  }
)
