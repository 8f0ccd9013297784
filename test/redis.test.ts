/**
 * The Redis backend against the machine's Redis (`REDIS_URL`, default `redis://127.0.0.1:6379`)
 * and, where a test counts commands or kills the server, against a throw-away `redis-server` of
 * its own. Nothing here is skipped: without Redis these tests fail.
 */
import { afterAll, assert, describe, it } from "@effect/vitest"
import {
  Config,
  ConfigError,
  ConfigProvider,
  Duration,
  Effect,
  Exit,
  Fiber,
  Layer,
  Logger,
  Option,
  Redacted,
  Schedule,
  Scope
} from "effect"
import { Redis, ReplyError } from "ioredis"
import { createHash } from "node:crypto"
import { connect, createServer, type Server, type Socket } from "node:net"
import { IdempotencyError, Idempotent, Storage } from "../src/index.js"
import { isPermanent } from "../src/internal/redis/replies.js"
import * as RedisStorage from "../src/Storage/Redis.js"
import { failsWith, failureOf, successOf } from "./fixtures/Exits.js"
import { freePorts, type RedisServer, server } from "./fixtures/redisServers.js"

const { IdempotencyStorageError, IdempotencyStorageSetupError } = IdempotencyError

const url = process.env.REDIS_URL ?? "redis://127.0.0.1:6379"
const run = Storage.makeToken().slice(0, 8)
const uniquePrefix = (label: string) => `idem-test-${run}-${label}-${Storage.makeToken().slice(0, 8)}`
const uniqueKey = (label: string) => `${label} ${Storage.makeToken()}`

/** A plain connection for looking at what the storage wrote; closed with the scope. */
const admin = (target: string) =>
  Effect.acquireRelease(
    Effect.tryPromise({
      try: async () => {
        const client = new Redis(target, { lazyConnect: true, maxRetriesPerRequest: 1 })
        client.on("error", () => undefined)
        await client.connect()
        return client
      },
      catch: (cause) => new Error(`Redis at ${target} is not reachable: these tests need it`, { cause })
    }),
    (client) => Effect.promise(() => client.quit().catch(() => client.disconnect()))
  )

const redisCall = <A>(call: () => Promise<A>) => Effect.promise(call)

/** Calls per command, from `INFO commandstats`: commands run inside scripts are counted too. */
const commandStats = (client: Redis) =>
  Effect.map(redisCall(() => client.info("commandstats")), (text) => {
    const calls = new Map<string, number>()
    for (const match of text.matchAll(/^cmdstat_([^:]+):calls=(\d+)/gm)) calls.set(match[1]!, Number(match[2]))
    return calls
  })

/** What the server received between two snapshots, leaving out the snapshots' own `INFO`. */
const commandsBetween = (before: Map<string, number>, after: Map<string, number>) => {
  const delta: Record<string, number> = {}
  for (const [command, calls] of after) {
    const sent = calls - (before.get(command) ?? 0)
    if (command !== "info" && sent > 0) delta[command] = sent
  }
  return delta
}

interface Seen {
  readonly args: ReadonlyArray<string>
  readonly source: string
}

/**
 * Counts what a server receives. `INFO commandstats` counts every command run, also those a
 * script runs; `MONITOR` tells them apart (their source is `lua`), so `commands` lists exactly
 * what clients sent, in order, and `stats` the `commandstats` deltas.
 */
const recorder = (target: string) =>
  Effect.gen(function*() {
    const control = yield* admin(target)
    const seen: Array<Seen> = []
    const monitor = yield* Effect.acquireRelease(
      redisCall(() => control.monitor()),
      (monitor) => Effect.sync(() => monitor.disconnect())
    )
    monitor.on("monitor", (_time: string, args: Array<string>, source: string) => seen.push({ args, source }))

    // MONITOR reports asynchronously: a marker sent after the measured calls is seen after them.
    const mark = Effect.gen(function*() {
      const token = `mark-${Storage.makeToken()}`
      yield* redisCall(() => control.echo(token))
      return yield* eventually(Effect.suspend(() => {
        const index = seen.findIndex((entry) => entry.args[1] === token)
        return index === -1 ? Effect.fail(new Error("marker not seen by MONITOR")) : Effect.succeed(index)
      }))
    })

    const measure = <A, E, R>(effect: Effect.Effect<A, E, R>) =>
      Effect.gen(function*() {
        const before = yield* commandStats(control)
        const from = yield* mark
        const value = yield* effect
        const to = yield* mark
        const after = yield* commandStats(control)
        const commands = seen.slice(from + 1, to)
          .filter((entry) => entry.source !== "lua")
          .map((entry) => entry.args[0]!.toLowerCase())
        const stats = commandsBetween(before, after)
        // The markers are not the measured calls (and the storage never sends ECHO).
        delete stats.echo
        return { value, commands, stats }
      })

    return { client: control, measure }
  })

/** Connections whose CLIENT SETNAME is `name`. */
const connectionsNamed = (client: Redis, name: string) =>
  Effect.map(
    redisCall(() => client.client("LIST") as Promise<string>),
    (list) => list.split("\n").filter((line) => line.includes(` name=${name} `)).length
  )

/** Retries `check` every 50 millis for up to `within`. */
const eventually = <A, E, R>(check: Effect.Effect<A, E, R>, within: Duration.DurationInput = "5 seconds") =>
  Effect.retry(check, Schedule.spaced("50 millis").pipe(Schedule.upTo(within)))

const expectCount = (client: Redis, name: string, expected: number) =>
  eventually(Effect.flatMap(connectionsNamed(client, name), (count) =>
    count === expected
      ? Effect.void
      : Effect.fail(new Error(`expected ${expected} connections named ${name}, found ${count}`))))

const scanAll = (client: Redis, pattern: string) =>
  redisCall(async () => {
    let keys: Array<string> = []
    let cursor = "0"
    do {
      const [next, batch] = await client.scan(cursor, "MATCH", pattern, "COUNT", 1000)
      cursor = next
      keys = keys.concat(batch)
    } while (cursor !== "0")
    return keys
  })

const deleteAll = (client: Redis, pattern: string) =>
  Effect.flatMap(
    scanAll(client, pattern),
    (keys) => keys.length === 0 ? Effect.void : redisCall(() => client.del(...keys))
  )

/** Builds a layer into the current scope. */
const build = <E>(layer: Layer.Layer<Storage.Storage, E>) => Layer.build(layer)

const elapsed = <A, E, R>(effect: Effect.Effect<A, E, R>) =>
  Effect.gen(function*() {
    const start = performance.now()
    const exit = yield* Effect.exit(effect)
    return { exit, millis: performance.now() - start }
  })

const bytes = (text: string) => new TextEncoder().encode(text)

const recordName = (prefix: string, key: string) => `${prefix}:{${createHash("sha256").update(key).digest("hex")}}`

interface LogLine {
  readonly level: string
  readonly message: string
  readonly annotations: Record<string, unknown>
}

/** Every line logged where `layer` is provided, kept instead of printed. */
const capturedLogs = () => {
  const lines: Array<LogLine> = []
  const logger = Logger.make(({ annotations, logLevel, message }) => {
    lines.push({
      level: logLevel.label,
      message: (Array.isArray(message) ? message : [message]).map(String).join(" "),
      annotations: Object.fromEntries(annotations)
    })
  })
  return { lines, layer: Logger.replace(Logger.defaultLogger, logger) }
}

const warnings = (lines: ReadonlyArray<LogLine>) => lines.filter((line) => line.level === "WARN")

/** Waits until `replica` streams from `primary`: the primary counts it and the link is up. */
const replicating = (primary: RedisServer, replicas: ReadonlyArray<RedisServer>) =>
  Effect.gen(function*() {
    const primaryClient = yield* admin(primary.url)
    const replicaClients = yield* Effect.forEach(replicas, (replica) => admin(replica.url))
    yield* eventually(
      Effect.gen(function*() {
        const info = yield* redisCall(() => primaryClient.info("replication"))
        if (!info.includes(`connected_slaves:${replicas.length}`)) return yield* Effect.fail(new Error(info))
        for (const client of replicaClients) {
          const own = yield* redisCall(() => client.info("replication"))
          if (!own.includes("master_link_status:up")) return yield* Effect.fail(new Error(own))
        }
      }),
      "20 seconds"
    )
    return replicaClients
  })

/** Stops a process (SIGSTOP) for the life of the scope: it holds its connections and answers nothing. */
const stalled = (pid: number) =>
  Effect.acquireRelease(
    Effect.sync(() => process.kill(pid, "SIGSTOP")),
    () => Effect.sync(() => process.kill(pid, "SIGCONT"))
  )

/** Ids of the connections named `name`. */
const connectionIds = (client: Redis, name: string) =>
  Effect.map(
    redisCall(() => client.client("LIST") as Promise<string>),
    (list) =>
      list.split("\n").filter((line) => line.includes(` name=${name} `)).map((line) => /^id=(\d+)/.exec(line)?.[1])
  )

describe("RedisStorage", () => {
  // Every key the tests write on the shared Redis is under this run's prefix.
  afterAll(() =>
    Effect.runPromise(Effect.scoped(Effect.flatMap(admin(url), (client) => deleteAll(client, `idem-test-${run}-*`))))
  )

  it.scopedLive("the Redis at REDIS_URL answers, at maxmemory-policy noeviction (every other test needs it)", () =>
    Effect.gen(function*() {
      const client = yield* admin(url)
      assert.strictEqual(yield* redisCall(() => client.ping()), "PONG")
      // Any other policy makes every layer built on it fail: it could evict leases and records.
      const policy = yield* redisCall(() => client.call("CONFIG", "GET", "maxmemory-policy") as Promise<Array<string>>)
      assert.deepStrictEqual(policy, ["maxmemory-policy", "noeviction"])
    }))

  describe("layers", () => {
    it.scopedLive("a url layer runs Idempotent.wrap and closes both connections it opened when released", () =>
      Effect.gen(function*() {
        const client = yield* admin(url)
        const name = `idem-test-url-${Storage.makeToken().slice(0, 8)}`
        const scope = yield* Scope.make()
        const context = yield* Scope.extend(
          build(
            RedisStorage.layer({
              url: Redacted.make(url),
              options: { connectionName: name },
              prefix: uniquePrefix("url")
            })
          ),
          scope
        )
        let runs = 0
        const job = Effect.sync(() => ++runs).pipe(Idempotent.wrap({ key: uniqueKey("url") }), Effect.provide(context))
        assert.deepStrictEqual([yield* job, yield* job], [1, 1])
        // The command connection and the pub/sub subscriber.
        yield* expectCount(client, name, 2)
        yield* Scope.close(scope, Exit.void)
        yield* expectCount(client, name, 0)
      }))

    it.scopedLive("ioredis options alone (no url) are enough", () =>
      Effect.gen(function*() {
        const { hostname, port } = new URL(url)
        const context = yield* build(
          RedisStorage.layer({ options: { host: hostname, port: Number(port || 6379) }, prefix: uniquePrefix("opts") })
        )
        const value = yield* Effect.succeed("ok").pipe(
          Idempotent.wrap({ key: uniqueKey("opts") }),
          Effect.provide(context)
        )
        assert.strictEqual(value, "ok")
      }))

    it.scopedLive("a client passed in is used and never closed; the subscriber the layer duplicated is closed", () =>
      Effect.gen(function*() {
        const client = yield* admin(url)
        const name = `idem-test-user-${Storage.makeToken().slice(0, 8)}`
        const userWithName = yield* Effect.acquireRelease(
          Effect.promise(async () => {
            const named = new Redis(url, { lazyConnect: true, connectionName: name })
            await named.connect()
            return named
          }),
          (named) => Effect.sync(() => named.disconnect())
        )
        const scope = yield* Scope.make()
        const context = yield* Scope.extend(
          build(RedisStorage.layer({ client: userWithName, prefix: uniquePrefix("user") })),
          scope
        )
        yield* expectCount(client, name, 2)
        const value = yield* Effect.succeed(7).pipe(
          Idempotent.wrap({ key: uniqueKey("user") }),
          Effect.provide(context)
        )
        assert.strictEqual(value, 7)
        yield* Scope.close(scope, Exit.void)
        yield* expectCount(client, name, 1)
        assert.strictEqual(userWithName.status, "ready")
        assert.strictEqual(yield* redisCall(() => userWithName.ping()), "PONG")
      }))

    it.scopedLive("a client with a keyPrefix: keys land under it and waiters are still woken", () =>
      Effect.gen(function*() {
        const client = yield* admin(url)
        const keyPrefix = `${uniquePrefix("kp")}:`
        const prefixed = yield* Effect.acquireRelease(
          Effect.sync(() => new Redis(url, { keyPrefix })),
          (redis) => Effect.sync(() => redis.disconnect())
        )
        const context = yield* build(RedisStorage.layer({ client: prefixed }))
        const store = yield* Storage.Storage.pipe(Effect.provide(context))
        const key = uniqueKey("kp")
        const lease = yield* store.acquire({ key, fingerprint: "", lease: Duration.seconds(30) })
        if (lease._tag !== "Acquired") return assert.fail(`expected Acquired, got ${lease._tag}`)
        const changed = yield* store.watch(key)
        const waiter = yield* Effect.fork(changed)
        yield* store.commit(lease.lease, { outcome: "success", payload: bytes("1"), ttl: Duration.minutes(1) })
        const woke = yield* Fiber.join(waiter).pipe(Effect.timeout("2 seconds"), Effect.exit)
        assert.isTrue(Exit.isSuccess(woke), "the waiter was not woken through the client's keyPrefix")
        const keys = yield* scanAll(client, `${keyPrefix}*`)
        assert.strictEqual(keys.length, 2)
        for (const stored of keys) assert.match(stored, /^.+:idem:\{[0-9a-f]{64}\}(:fence)?$/)
      }))

    it.scopedLive("layerConfig reads its options from Config, and fails with a ConfigError when they are missing", () =>
      Effect.gen(function*() {
        const prefix = uniquePrefix("config")
        const config = {
          url: Config.redacted("REDIS_URL"),
          prefix: Config.string("IDEMPOTENCY_PREFIX"),
          timeout: Config.duration("IDEMPOTENCY_TIMEOUT")
        }
        const provider = ConfigProvider.fromMap(
          new Map([["REDIS_URL", url], ["IDEMPOTENCY_PREFIX", prefix], ["IDEMPOTENCY_TIMEOUT", "1 second"]])
        )
        const context = yield* build(
          RedisStorage.layerConfig(config).pipe(Layer.provide(Layer.setConfigProvider(provider)))
        )
        const key = uniqueKey("config")
        assert.strictEqual(yield* Effect.succeed(1).pipe(Idempotent.wrap({ key }), Effect.provide(context)), 1)
        const client = yield* admin(url)
        assert.strictEqual((yield* scanAll(client, `${prefix}:*`)).length, 2)

        const missing = yield* Effect.exit(
          build(
            RedisStorage.layerConfig(config).pipe(
              Layer.provide(Layer.setConfigProvider(ConfigProvider.fromMap(new Map())))
            )
          )
        )
        const error = failureOf(missing)
        assert.isTrue(ConfigError.isConfigError(error), `expected a ConfigError, got ${String(error)}`)
      }))

    it.scopedLive("a prefix holding { or } is refused: it would change the hash tag", () =>
      Effect.gen(function*() {
        const exit = yield* Effect.exit(build(RedisStorage.layer({ url: Redacted.make(url), prefix: "a{b}" })))
        const error = failsWith(exit, IdempotencyStorageSetupError)
        assert.strictEqual(error.backend, "redis")
        assert.strictEqual((error.cause as IdempotencyError.IdempotencyOptionsInvalid).option, "prefix")
      }))

    it.scopedLive("a url that is not redis:// or rediss:// is refused at once, naming the scheme and not the password", () =>
      Effect.gen(function*() {
        for (
          const [bad, scheme] of [
            ["http://user:hunter2@127.0.0.1:6379", "http://"],
            ["127.0.0.1:6379", "redis://"],
            ["mysql://127.0.0.1", "mysql://"]
          ]
        ) {
          const { exit, millis } = yield* elapsed(build(RedisStorage.layer({ url: Redacted.make(bad!) })))
          const error = failsWith(exit, IdempotencyStorageSetupError)
          assert.include(error.message, "option url must", bad)
          assert.include(error.message, scheme!, bad)
          assert.notInclude(error.message, "hunter2")
          assert.notInclude(error.message, "ENOENT")
          assert.isBelow(millis, 1000)
        }
        // rediss:// (TLS) is accepted: it fails here only because nothing speaks TLS on this port.
        const tls = yield* Effect.exit(
          build(RedisStorage.layer({ url: Redacted.make(url.replace(/^redis:/, "rediss:")), timeout: "300 millis" }))
        )
        assert.notInclude(failsWith(tls, IdempotencyStorageSetupError).message, "option url")
      }))

    it.scopedLive("building against a port nobody listens on fails with IdempotencyStorageSetupError at once", () =>
      Effect.gen(function*() {
        const [port] = yield* freePorts(1)
        const { exit, millis } = yield* elapsed(
          build(RedisStorage.layer({ url: Redacted.make(`redis://127.0.0.1:${port}`), timeout: "500 millis" }))
        )
        const error = failsWith(exit, IdempotencyStorageSetupError)
        assert.include(error.message, "connecting to Redis failed")
        assert.include(error.message, "ECONNREFUSED")
        assert.isBelow(millis, 3000)
      }))

    it.scopedLive("building against a server that never answers fails within the timeout and closes its sockets", () =>
      Effect.gen(function*() {
        const sockets = new Set<Socket>()
        const silent = yield* Effect.acquireRelease(
          Effect.async<Server>((resume) => {
            const tcp = createServer((socket) => {
              sockets.add(socket)
              // Reads and drops what it is sent, so it sees the client hang up.
              socket.resume()
              socket.on("close", () => sockets.delete(socket))
            })
            tcp.listen(0, "127.0.0.1", () => resume(Effect.succeed(tcp)))
          }),
          (tcp) =>
            Effect.async<void>((resume) => {
              for (const socket of sockets) socket.destroy()
              tcp.close(() => resume(Effect.void))
            })
        )
        const address = silent.address()
        if (address === null || typeof address === "string") return assert.fail("no TCP address")
        const { exit, millis } = yield* elapsed(
          build(RedisStorage.layer({ url: Redacted.make(`redis://127.0.0.1:${address.port}`), timeout: "500 millis" }))
        )
        const error = failsWith(exit, IdempotencyStorageSetupError)
        assert.include(error.message, "connecting to Redis failed")
        assert.include(error.message, "did not answer within")
        assert.isAtLeast(millis, 450)
        assert.isBelow(millis, 3000)
        yield* eventually(
          Effect.suspend(() =>
            sockets.size === 0 ? Effect.void : Effect.fail(new Error(`${sockets.size} sockets still open`))
          )
        )
      }))

    it.scopedLive("declares every guarantee, under the backend name redis", () =>
      Effect.gen(function*() {
        const context = yield* build(RedisStorage.layer({ url: Redacted.make(url) }))
        const storage = yield* Storage.Storage.pipe(Effect.provide(context))
        assert.strictEqual(storage.backend, "redis")
        assert.deepStrictEqual(storage.capabilities, {
          renewal: true,
          fencing: true,
          ownedCommit: true,
          notification: true
        })
      }))
  })

  describe("round trips, counted by the server", () => {
    it.scopedLive("a first call is 2 commands (acquire, commit), a replay 1; each protocol step is one script call", () =>
      Effect.gen(function*() {
        const redis = yield* server()
        const { measure } = yield* recorder(redis.url)
        const context = yield* build(RedisStorage.layer({ url: Redacted.make(redis.url) }))
        const wrapped = (key: string) =>
          Effect.succeed({ order: key }).pipe(
            Idempotent.wrap({ key, lease: "1 minute" }),
            Effect.provide(context)
          )
        // ioredis sends a script's text (EVAL) the first time on each connection, EVALSHA after.
        const warm = uniqueKey("warm")
        yield* wrapped(warm)
        yield* wrapped(warm)

        const key = uniqueKey("count")
        const first = yield* measure(wrapped(key))
        const replay = yield* measure(wrapped(key))
        assert.deepStrictEqual(first.commands, ["evalsha", "evalsha"])
        assert.deepStrictEqual(replay.commands, ["evalsha"])
        assert.strictEqual(first.stats.evalsha, 2)
        assert.strictEqual(replay.stats.evalsha, 1)
        assert.strictEqual(first.stats.eval, undefined)
        assert.deepStrictEqual(replay.value, first.value)

        const storage = yield* Storage.Storage.pipe(Effect.provide(context))
        const steps = (key: string, lease: Storage.Lease) =>
          Effect.all([
            storage.renew(lease, Duration.minutes(1)),
            storage.release(lease),
            storage.read(key),
            storage.delete(key)
          ])
        const warmKey = uniqueKey("warm-steps")
        const warmLease = yield* storage.acquire({ key: warmKey, fingerprint: "", lease: Duration.minutes(1) })
        if (warmLease._tag !== "Acquired") return assert.fail("expected Acquired")
        yield* steps(warmKey, warmLease.lease)
        yield* storage.delete(warmKey, warmLease.lease.fence)

        const other = uniqueKey("steps")
        const acquired = yield* measure(storage.acquire({ key: other, fingerprint: "", lease: Duration.minutes(1) }))
        if (acquired.value._tag !== "Acquired") return assert.fail("expected Acquired")
        const lease = acquired.value.lease
        const renewed = yield* measure(storage.renew(lease, Duration.minutes(1)))
        const released = yield* measure(storage.release(lease))
        const read = yield* measure(storage.read(key))
        const deleted = yield* measure(storage.delete(key))
        const fenced = yield* measure(storage.delete(key, lease.fence))
        assert.isTrue(renewed.value && released.value && Option.isSome(read.value))
        for (const step of [acquired, renewed, released, deleted, fenced]) {
          assert.deepStrictEqual(step.commands, ["evalsha"])
        }
        assert.deepStrictEqual(read.commands, ["hmget"])
      }))

    it.scopedLive("after SCRIPT FLUSH the scripts still run: EVALSHA answers NOSCRIPT and ioredis sends EVAL", () =>
      Effect.gen(function*() {
        const redis = yield* server()
        const { client, measure } = yield* recorder(redis.url)
        const context = yield* build(RedisStorage.layer({ url: Redacted.make(redis.url) }))
        const wrapped = (key: string) => Effect.succeed(key).pipe(Idempotent.wrap({ key }), Effect.provide(context))
        yield* wrapped(uniqueKey("loaded"))
        assert.strictEqual(yield* redisCall(() => client.script("FLUSH") as Promise<string>), "OK")
        const key = uniqueKey("flushed")
        const first = yield* measure(wrapped(key))
        assert.strictEqual(first.value, key)
        // Each script: EVALSHA (NOSCRIPT), then EVAL, which loads it again.
        assert.deepStrictEqual(first.commands, ["evalsha", "eval", "evalsha", "eval"])
        const replay = yield* measure(wrapped(key))
        assert.deepStrictEqual(replay.commands, ["evalsha"])
        assert.strictEqual(replay.value, key)
      }))
  })

  describe("layout", () => {
    it.scopedLive("one hash per key: in flight it holds the holder's token, fingerprint and fence, and expires with the lease", () =>
      Effect.gen(function*() {
        const client = yield* admin(url)
        const prefix = uniquePrefix("layout")
        const storage = yield* Storage.Storage.pipe(
          Effect.provide(yield* build(RedisStorage.layer({ url: Redacted.make(url), prefix })))
        )
        const key = uniqueKey("layout")
        const acquired = yield* storage.acquire({ key, fingerprint: "fp-1", lease: Duration.seconds(20) })
        if (acquired._tag !== "Acquired") return assert.fail("expected Acquired")
        const lease = acquired.lease
        const keys = (yield* scanAll(client, `${prefix}:*`)).sort()
        assert.strictEqual(keys.length, 2)
        const [hash, fence] = keys as [string, string]
        assert.match(hash, new RegExp(`^${prefix}:\\{[0-9a-f]{64}\\}$`))
        assert.strictEqual(fence, `${hash}:fence`)

        const inFlight = yield* redisCall(() => client.hgetall(hash))
        assert.deepStrictEqual(inFlight, {
          state: "L",
          key,
          fp: "fp-1",
          token: lease.token,
          fence: String(lease.fence)
        })
        const leaseLeft = yield* redisCall(() => client.pttl(hash))
        // Seconds of slack: a loaded machine may take a while between the acquire and this look.
        assert.isTrue(leaseLeft > 10_000 && leaseLeft <= 20_000, `lease PTTL ${leaseLeft}`)
        // The counter outlives the lease by the margin (an hour).
        assert.isAbove(yield* redisCall(() => client.pttl(fence)), 20_000 + 3_500_000)

        const other = yield* storage.acquire({ key, fingerprint: "fp-2", lease: Duration.seconds(20) })
        if (other._tag !== "InFlight") return assert.fail("expected InFlight")
        assert.strictEqual(other.fingerprint, "fp-1")
        assert.isTrue(Duration.toMillis(other.leaseRemaining) > 10_000)

        const [seconds, micros] = yield* redisCall(() => client.time())
        const redisNow = Number(seconds) * 1000 + Math.floor(Number(micros) / 1000)
        const payload = new Uint8Array([0, 255, 10, 13, 0, 128])
        assert.isTrue(yield* storage.commit(lease, { outcome: "failure", payload, ttl: Duration.minutes(5) }))
        const completed = yield* redisCall(() => client.hgetallBuffer(hash))
        assert.deepStrictEqual(Object.keys(completed).sort(), [
          "createdAt",
          "expiresAt",
          "fence",
          "fp",
          "key",
          "outcome",
          "payload",
          "state",
          "token"
        ])
        // The holder's token stays, so a retried commit is answered as done, and owns nothing more.
        assert.strictEqual(completed.token!.toString(), lease.token)
        assert.isTrue(yield* storage.commit(lease, { outcome: "failure", payload, ttl: Duration.minutes(5) }))
        assert.isFalse(yield* storage.renew(lease, Duration.seconds(20)))
        assert.isFalse(yield* storage.release(lease))
        assert.strictEqual(completed.state!.toString(), "C")
        assert.strictEqual(completed.outcome!.toString(), "failure")
        assert.isTrue(completed.payload!.equals(Buffer.from(payload)))
        // Timestamps come from the Redis clock.
        const createdAt = Number(completed.createdAt!.toString())
        assert.isTrue(Math.abs(createdAt - redisNow) < 1000, `createdAt ${createdAt}, Redis TIME ${redisNow}`)
        assert.strictEqual(Number(completed.expiresAt!.toString()), createdAt + 300_000)
        const ttlLeft = yield* redisCall(() => client.pttl(hash))
        assert.isTrue(ttlLeft > 290_000 && ttlLeft <= 300_000, `record PTTL ${ttlLeft}`)
        assert.isAbove(yield* redisCall(() => client.pttl(fence)), 300_000 + 3_500_000)

        const stored = Option.getOrThrow(yield* storage.read(key))
        assert.deepStrictEqual(
          { ...stored, payload: Array.from(stored.payload) },
          {
            key,
            fingerprint: "fp-1",
            outcome: "failure",
            payload: Array.from(payload),
            fence: lease.fence,
            createdAt,
            expiresAt: createdAt + 300_000
          }
        )
      }))

    it.scopedLive("keys nobody can aim: odd keys are hashed under the prefix, one hash tag each, and do not collide", () =>
      Effect.gen(function*() {
        const client = yield* admin(url)
        const prefix = uniquePrefix("aim")
        const storage = yield* Storage.Storage.pipe(
          Effect.provide(yield* build(RedisStorage.layer({ url: Redacted.make(url), prefix })))
        )
        const keys = [
          "a}:{b",
          "a",
          "a}",
          "{a}",
          "*",
          "?",
          "[a-z]",
          "../x",
          "..\\x",
          " ",
          `${prefix}:{x}`,
          `${prefix}:{${"0".repeat(64)}}`,
          `${prefix}:{${"0".repeat(64)}}:fence`,
          "x".repeat(255),
          "x".repeat(254),
          "🔑".repeat(255)
        ]
        for (const [i, key] of keys.entries()) {
          const acquired = yield* storage.acquire({ key, fingerprint: "", lease: Duration.seconds(30) })
          if (acquired._tag !== "Acquired") return assert.fail(`expected Acquired for key ${i}`)
          assert.isTrue(
            yield* storage.commit(acquired.lease, {
              outcome: "success",
              payload: bytes(String(i)),
              ttl: Duration.minutes(1)
            })
          )
        }
        const stored = yield* scanAll(client, `${prefix}*`)
        assert.strictEqual(stored.length, keys.length * 2)
        const tags = new Set<string>()
        for (const name of stored) {
          const match = new RegExp(`^${prefix}:\\{([0-9a-f]{64})\\}(:fence)?$`).exec(name)
          if (match === null) return assert.fail(`a key outside the layout: ${name}`)
          tags.add(match[1]!)
        }
        assert.strictEqual(tags.size, keys.length)
        for (const [i, key] of keys.entries()) {
          const record = Option.getOrThrow(yield* storage.read(key))
          assert.strictEqual(record.key, key)
          assert.strictEqual(new TextDecoder().decode(record.payload), String(i))
        }
      }))

    it.scopedLive("the fence counter survives the lease's expiry, and fences keep growing after the counter expires", () =>
      Effect.gen(function*() {
        const client = yield* admin(url)
        const prefix = uniquePrefix("fence")
        const storage = yield* Storage.Storage.pipe(
          Effect.provide(yield* build(RedisStorage.layer({ url: Redacted.make(url), prefix })))
        )
        const key = uniqueKey("fence")
        const acquire = (lease: Duration.DurationInput) =>
          Effect.flatMap(
            storage.acquire({ key, fingerprint: "", lease: Duration.decode(lease) }),
            (result) => result._tag === "Acquired" ? Effect.succeed(result.lease) : Effect.die(`got ${result._tag}`)
          )
        const first = yield* acquire("200 millis")
        yield* Effect.sleep("400 millis")
        const left = yield* scanAll(client, `${prefix}:*`)
        assert.strictEqual(left.length, 1, "the record should have expired with its lease, and only it")
        const counter = left[0]!
        assert.match(counter, /:fence$/)
        const second = yield* acquire("30 seconds")
        assert.strictEqual(second.fence, first.fence + 1)
        assert.notStrictEqual(second.token, first.token)
        assert.isTrue(yield* storage.release(second))
        // As if the counter had expired: it starts again from the Redis clock, above every fence so far.
        yield* redisCall(() => client.del(counter))
        const third = yield* acquire("30 seconds")
        assert.isAbove(third.fence, second.fence)
      }))
  })

  describe("waiting without polling", () => {
    it.scopedLive(
      "a waiter is woken by the commit within milliseconds, and sends nothing while it waits",
      () =>
        Effect.gen(function*() {
          const redis = yield* server()
          const { measure } = yield* recorder(redis.url)
          // Two layers: two instances of a service, so the waiter cannot share the holder's local run.
          const holderContext = yield* build(RedisStorage.layer({ url: Redacted.make(redis.url) }))
          const waiterContext = yield* build(RedisStorage.layer({ url: Redacted.make(redis.url) }))
          const key = uniqueKey("wait")
          const times = { ranUntil: 0, committed: 0, woke: 0 }
          const holder = yield* Effect.sleep("2500 millis").pipe(
            Effect.zipRight(Effect.sync(() => (times.ranUntil = performance.now()))),
            Effect.as("first run"),
            Idempotent.wrap({ key, lease: "30 seconds" }),
            Effect.tap(() => Effect.sync(() => (times.committed = performance.now()))),
            Effect.provide(holderContext),
            Effect.fork
          )
          yield* Effect.sleep("200 millis")
          const waiter = yield* Effect.succeed("second run").pipe(
            Idempotent.wrap({ key, lease: "30 seconds", onInFlight: { wait: "10 seconds" } }),
            Effect.tap(() => Effect.sync(() => (times.woke = performance.now()))),
            Effect.provide(waiterContext),
            Effect.fork
          )
          // By now the waiter has subscribed, looked once more and gone to sleep, with time to spare.
          yield* Effect.sleep("800 millis")
          const quiet = yield* measure(Effect.sleep("1 second"))
          assert.deepStrictEqual(quiet.commands, [], "commands were sent while the waiter waited")
          assert.deepStrictEqual(quiet.stats, {}, "the server ran commands while the waiter waited")
          assert.strictEqual(successOf(yield* Fiber.await(holder)), "first run")
          assert.strictEqual(successOf(yield* Fiber.await(waiter)), "first run")
          const afterCommit = times.woke - times.committed
          const afterRun = times.woke - times.ranUntil
          yield* Effect.annotateCurrentSpan({ afterCommit, afterRun })
          // Typically 5 to 10 millis here (a subscribe and an acquire after the notice). The bound leaves room
          // for a busy two-core machine, and is far below the lease (30 s) a waiter would otherwise sleep out.
          assert.isBelow(afterCommit, 200, `woken ${afterCommit.toFixed(1)} ms after the holder's commit returned`)
          assert.isBelow(afterRun, 250, `woken ${afterRun.toFixed(1)} ms after the holder's run ended`)
          yield* Effect.logInfo(
            `waiter woken ${afterCommit.toFixed(2)} ms after the commit returned, ${
              afterRun.toFixed(2)
            } ms after the run ended`
          )
        }),
      { timeout: 20_000 }
    )

    it.scopedLive("watchers of one key share one subscription: SSUBSCRIBE for the first, SUNSUBSCRIBE after the last", () =>
      Effect.gen(function*() {
        const redis = yield* server()
        const { client, measure } = yield* recorder(redis.url)
        const storage = yield* Storage.Storage.pipe(
          Effect.provide(yield* build(RedisStorage.layer({ url: Redacted.make(redis.url), prefix: "idem" })))
        )
        const key = uniqueKey("shared")
        const channel = `idem:{${createHash("sha256").update(key).digest("hex")}}:changed`
        const subscribers = Effect.map(
          redisCall(() => client.call("PUBSUB", "SHARDNUMSUB", channel) as Promise<[string, number]>),
          ([, count]) => count
        )
        const acquired = yield* storage.acquire({ key, fingerprint: "", lease: Duration.seconds(30) })
        if (acquired._tag !== "Acquired") return assert.fail("expected Acquired")

        const outer = yield* Scope.make()
        const inner = yield* Scope.make()
        const watched = yield* measure(
          Effect.all([Scope.extend(storage.watch(key), outer), Scope.extend(storage.watch(key), inner)])
        )
        assert.deepStrictEqual(watched.commands, ["ssubscribe"])
        assert.strictEqual(yield* subscribers, 1)
        const [remaining] = watched.value
        const closedInner = yield* measure(Scope.close(inner, Exit.void))
        assert.deepStrictEqual(closedInner.commands, [], "unsubscribed while a watcher was left")
        assert.strictEqual(yield* subscribers, 1)
        const waiter = yield* Effect.fork(remaining)
        yield* storage.release(acquired.lease)
        const woke = yield* Fiber.join(waiter).pipe(Effect.timeout("2 seconds"), Effect.exit)
        assert.isTrue(Exit.isSuccess(woke), "the waiter was not woken by the release")
        const closedOuter = yield* measure(Scope.close(outer, Exit.void))
        assert.deepStrictEqual(closedOuter.commands, ["sunsubscribe"])
        assert.strictEqual(yield* subscribers, 0)
      }))

    it.scopedLive("a waiter wakes on delete too, and not on another key", () =>
      Effect.gen(function*() {
        const storage = yield* Storage.Storage.pipe(
          Effect.provide(yield* build(RedisStorage.layer({ url: Redacted.make(url), prefix: uniquePrefix("del") })))
        )
        const key = uniqueKey("deleted")
        const changed = yield* storage.watch(key)
        const waiter = yield* Effect.fork(changed)
        yield* storage.delete(uniqueKey("another"))
        yield* Effect.sleep("100 millis")
        assert.isTrue(Option.isNone(yield* Fiber.poll(waiter)), "woken by another key")
        yield* storage.delete(key)
        const woke = yield* Fiber.join(waiter).pipe(Effect.timeout("2 seconds"), Effect.exit)
        assert.isTrue(Exit.isSuccess(woke), "the waiter was not woken by the delete")
      }))
  })

  describe("outages fail closed and fast", () => {
    it.scopedLive(
      "with Redis killed, wrap fails within the bound and the effect does not run; after a restart the same layer works",
      () =>
        Effect.gen(function*() {
          const redis = yield* server()
          const context = yield* build(RedisStorage.layer({ url: Redacted.make(redis.url), timeout: "500 millis" }))
          let runs = 0
          const job = (key: string) =>
            Effect.sync(() => ++runs).pipe(
              Idempotent.wrap({ key, onInFlight: { wait: "5 seconds" } }),
              Effect.provide(context)
            )
          assert.strictEqual(yield* job(uniqueKey("before")), 1)

          yield* redis.kill
          const key = uniqueKey("down")
          const down = yield* elapsed(job(key))
          const error = failsWith(down.exit, IdempotencyStorageError)
          assert.strictEqual(error.operation, "acquire")
          assert.isDefined(error.cause)
          assert.isBelow(down.millis, 3000)
          assert.strictEqual(runs, 1, "the effect ran although the storage was down")

          yield* redis.restart
          // ioredis reconnects in the background (at most a second between attempts).
          const value = yield* eventually(job(key), "10 seconds")
          assert.strictEqual(value, 2)
          assert.strictEqual(yield* job(key), 2)
          assert.strictEqual(runs, 2)

          // The subscriber reconnected too: a waiter is woken again.
          const storage = yield* Storage.Storage.pipe(Effect.provide(context))
          const other = uniqueKey("after")
          const acquired = yield* storage.acquire({ key: other, fingerprint: "", lease: Duration.seconds(30) })
          if (acquired._tag !== "Acquired") return assert.fail("expected Acquired")
          const changed = yield* eventually(storage.watch(other), "10 seconds")
          const waiter = yield* Effect.fork(changed)
          yield* storage.commit(acquired.lease, { outcome: "success", payload: bytes("1"), ttl: Duration.minutes(1) })
          const woke = yield* Fiber.join(waiter).pipe(Effect.timeout("2 seconds"), Effect.exit)
          assert.isTrue(Exit.isSuccess(woke), "the waiter was not woken after the restart")
        }),
      { timeout: 30_000 }
    )

    it.scopedLive(
      "Redis killed while a waiter waits: it fails fast with IdempotencyStorageError instead of sleeping out the lease",
      () =>
        Effect.gen(function*() {
          const redis = yield* server()
          const layer = RedisStorage.layer({ url: Redacted.make(redis.url), timeout: "500 millis" })
          const holderContext = yield* build(layer)
          const waiterContext = yield* build(layer)
          const key = uniqueKey("mid-run")
          // The holder's commit is retried until its lease ends: 8 seconds keep the test short.
          const holder = yield* Effect.sleep("1500 millis").pipe(
            Effect.as("first run"),
            Idempotent.wrap({ key, lease: "8 seconds" }),
            Effect.provide(holderContext),
            Effect.fork
          )
          yield* Effect.sleep("200 millis")
          const waiter = yield* Effect.succeed("second run").pipe(
            Idempotent.wrap({ key, lease: "30 seconds", onInFlight: { wait: "20 seconds" } }),
            Effect.provide(waiterContext),
            Effect.fork
          )
          yield* Effect.sleep("500 millis")
          const killedAt = performance.now()
          yield* redis.kill
          failsWith(yield* Fiber.await(waiter), IdempotencyStorageError)
          const waited = performance.now() - killedAt
          assert.isBelow(waited, 3000, `the waiter failed ${waited.toFixed(0)} ms after Redis was killed`)
          // The holder's run had begun, and its result could not be stored: never reported as success.
          const notStored = failsWith(yield* Fiber.await(holder), IdempotencyError.IdempotencyResultNotStored)
          assert.strictEqual(notStored.reason, "storage-failed")
        }),
      { timeout: 30_000 }
    )

    it.scopedLive(
      "a client passed in that queues commands offline is still bounded by timeout",
      () =>
        Effect.gen(function*() {
          const redis = yield* server()
          const patient = yield* Effect.acquireRelease(
            Effect.sync(() => {
              const queued = new Redis(redis.url, { enableOfflineQueue: true, maxRetriesPerRequest: null })
              queued.on("error", () => undefined)
              return queued
            }),
            (queued) => Effect.sync(() => queued.disconnect())
          )
          const context = yield* build(RedisStorage.layer({ client: patient, timeout: "500 millis" }))
          let runs = 0
          const job = Effect.sync(() => ++runs).pipe(
            Idempotent.wrap({ key: uniqueKey("queued") }),
            Effect.provide(context)
          )
          yield* redis.kill
          const down = yield* elapsed(job)
          const error = failsWith(down.exit, IdempotencyStorageError)
          assert.include(error.message, "did not answer within")
          assert.isAtLeast(down.millis, 450)
          assert.isBelow(down.millis, 3000)
          assert.strictEqual(runs, 0)
        }),
      { timeout: 30_000 }
    )
  })

  describe("delete by fence", () => {
    it.scopedLive(
      "delete with a fence drops only the completed record carrying it, and wakes waiters; a lease or another fence is left alone",
      () =>
        Effect.gen(function*() {
          const client = yield* admin(url)
          const prefix = uniquePrefix("fenced")
          const storage = yield* Storage.Storage.pipe(
            Effect.provide(yield* build(RedisStorage.layer({ url: Redacted.make(url), prefix })))
          )
          const key = uniqueKey("fenced")
          const record = recordName(prefix, key)
          const acquired = yield* storage.acquire({ key, fingerprint: "fp", lease: Duration.seconds(30) })
          if (acquired._tag !== "Acquired") return assert.fail("expected Acquired")
          const { lease } = acquired

          // In flight: a fenced delete does not touch the lease, even with the lease's own fence.
          yield* storage.delete(key, lease.fence)
          assert.strictEqual(yield* redisCall(() => client.hget(record, "state")), "L")
          const other = yield* storage.acquire({ key, fingerprint: "fp", lease: Duration.seconds(30) })
          assert.strictEqual(other._tag, "InFlight")

          assert.isTrue(
            yield* storage.commit(lease, { outcome: "success", payload: bytes("1"), ttl: Duration.minutes(5) })
          )
          const changed = yield* storage.watch(key)
          const waiter = yield* Effect.fork(changed)
          // Another fence (an older or a newer record's): left alone, and nobody is woken.
          yield* storage.delete(key, lease.fence + 1)
          yield* storage.delete(key, lease.fence - 1)
          assert.isTrue(Option.isSome(yield* storage.read(key)))
          yield* Effect.sleep("200 millis")
          assert.isTrue(Option.isNone(yield* Fiber.poll(waiter)), "woken by a delete that deleted nothing")

          yield* storage.delete(key, lease.fence)
          assert.isTrue(Option.isNone(yield* storage.read(key)))
          assert.strictEqual(yield* redisCall(() => client.exists(record)), 0)
          const woke = yield* Fiber.join(waiter).pipe(Effect.timeout("2 seconds"), Effect.exit)
          assert.isTrue(Exit.isSuccess(woke), "the waiter was not woken by the fenced delete")
          // The counter stays: the next owner gets a larger fence.
          const next = yield* storage.acquire({ key, fingerprint: "fp", lease: Duration.seconds(30) })
          if (next._tag !== "Acquired") return assert.fail(`expected Acquired, got ${next._tag}`)
          assert.isAbove(next.lease.fence, lease.fence)
        })
    )
  })

  describe("setups that would void the guarantee", () => {
    it.scopedLive(
      "maxmemory-policy volatile-ttl or allkeys-lru fails the layer build (configure, RedisEvictionPolicyUnsafe), leaving no connection open",
      () =>
        Effect.gen(function*() {
          for (const policy of ["volatile-ttl", "allkeys-lru"]) {
            const redis = yield* server({ args: ["--maxmemory-policy", policy] })
            const client = yield* admin(redis.url)
            const name = `idem-test-evict-${Storage.makeToken().slice(0, 8)}`
            const exit = yield* Effect.exit(
              build(RedisStorage.layer({ url: Redacted.make(redis.url), options: { connectionName: name } }))
            )
            const error = failsWith(exit, IdempotencyStorageSetupError)
            assert.include(error.message, `maxmemory-policy is ${policy}`)
            assert.instanceOf(error.cause, RedisStorage.RedisEvictionPolicyUnsafe)
            const cause = error.cause as RedisStorage.RedisEvictionPolicyUnsafe
            assert.deepStrictEqual({ node: cause.node, policy: cause.policy }, {
              node: `127.0.0.1:${redis.port}`,
              policy
            })
            assert.include(error.message, `maxmemory-policy ${policy}`)
            yield* expectCount(client, name, 0)
          }
        }),
      { timeout: 30_000 }
    )

    it.scopedLive("with onEvictionRisk: \"warn\" it builds, warns once naming the node and policy, and runs", () =>
      Effect.gen(function*() {
        const redis = yield* server({ args: ["--maxmemory-policy", "volatile-lru"] })
        const logs = capturedLogs()
        const context = yield* build(
          RedisStorage.layer({ url: Redacted.make(redis.url), onEvictionRisk: "warn" })
        ).pipe(Effect.provide(logs.layer))
        const warned = warnings(logs.lines)
        assert.strictEqual(warned.length, 1, JSON.stringify(logs.lines))
        assert.include(warned[0]!.message, "maxmemory-policy volatile-lru")
        assert.deepStrictEqual(warned[0]!.annotations, { node: `127.0.0.1:${redis.port}`, policy: "volatile-lru" })
        let runs = 0
        const job = Effect.sync(() => ++runs).pipe(Idempotent.wrap({ key: uniqueKey("warn") }), Effect.provide(context))
        assert.deepStrictEqual([yield* job, yield* job], [1, 1])
      }))

    it.scopedLive("at noeviction it builds without a warning", () =>
      Effect.gen(function*() {
        const redis = yield* server({ args: ["--maxmemory-policy", "noeviction"] })
        const logs = capturedLogs()
        yield* build(RedisStorage.layer({ url: Redacted.make(redis.url) })).pipe(Effect.provide(logs.layer))
        assert.deepStrictEqual(warnings(logs.lines), [])
      }))

    it.scopedLive("where CONFIG is refused (renamed away), the policy is unknown: it warns and builds", () =>
      Effect.gen(function*() {
        const redis = yield* server({ args: ["--rename-command", "CONFIG", ""] })
        const logs = capturedLogs()
        const context = yield* build(RedisStorage.layer({ url: Redacted.make(redis.url) })).pipe(
          Effect.provide(logs.layer)
        )
        const warned = warnings(logs.lines)
        assert.strictEqual(warned.length, 1, JSON.stringify(logs.lines))
        assert.include(warned[0]!.message, "cannot read maxmemory-policy")
        assert.strictEqual(warned[0]!.annotations.node, `127.0.0.1:${redis.port}`)
        assert.include(String(warned[0]!.annotations.cause), "unknown command")
        const value = yield* Effect.succeed("ran").pipe(
          Idempotent.wrap({ key: uniqueKey("refused") }),
          Effect.provide(context)
        )
        assert.strictEqual(value, "ran")
      }))

    it.scopedLive(
      "a result longer than proto-max-bulk-len is refused before it is sent (retryable: false): the connection stays, wrap does not retry",
      () =>
        Effect.gen(function*() {
          const redis = yield* server({ args: ["--proto-max-bulk-len", "1mb"] })
          const client = yield* admin(redis.url)
          const name = `idem-test-bulk-${Storage.makeToken().slice(0, 8)}`
          const context = yield* build(
            RedisStorage.layer({ url: Redacted.make(redis.url), options: { connectionName: name } })
          )
          const storage = yield* Storage.Storage.pipe(Effect.provide(context))
          const before = yield* connectionIds(client, name)
          assert.strictEqual(before.length, 2)

          const key = uniqueKey("bulk")
          const acquired = yield* storage.acquire({ key, fingerprint: "", lease: Duration.seconds(30) })
          if (acquired._tag !== "Acquired") return assert.fail("expected Acquired")
          const large = new Uint8Array(2 * 1024 * 1024)
          const refused = yield* Effect.exit(
            storage.commit(acquired.lease, { outcome: "success", payload: large, ttl: Duration.minutes(1) })
          )
          const error = failsWith(refused, IdempotencyStorageError)
          assert.strictEqual(error.operation, "commit")
          assert.isFalse(error.retryable)
          assert.instanceOf(error.cause, RedisStorage.RedisValueTooLarge)
          const cause = error.cause as RedisStorage.RedisValueTooLarge
          assert.deepStrictEqual({ bytes: cause.bytes, limit: cause.limit }, {
            bytes: large.length,
            limit: 1024 * 1024
          })
          // The same connection, usable at once: the commit that fits lands.
          assert.isTrue(
            yield* storage.commit(acquired.lease, { outcome: "success", payload: bytes("1"), ttl: Duration.minutes(1) })
          )
          assert.deepStrictEqual(yield* connectionIds(client, name), before)

          // Through wrap: the run happened once, its result was not stored, and the commit was not
          // retried for the rest of the 30 second lease.
          let runs = 0
          const { exit, millis } = yield* elapsed(
            Effect.sync(() => {
              runs++
              return "x".repeat(2 * 1024 * 1024)
            }).pipe(Idempotent.wrap({ key: uniqueKey("bulk-wrap"), lease: "30 seconds" }), Effect.provide(context))
          )
          const notStored = failsWith(exit, IdempotencyError.IdempotencyResultNotStored)
          assert.strictEqual(notStored.reason, "storage-failed")
          assert.strictEqual(runs, 1)
          assert.isBelow(millis, 10_000)
          assert.deepStrictEqual(yield* connectionIds(client, name), before)
        }),
      { timeout: 30_000 }
    )

    it.scopedLive(
      "replies that retrying cannot change are retryable: false (an oversized bulk, WRONGTYPE); OOM is retryable",
      () =>
        Effect.gen(function*() {
          // The reply Redis sends for a bulk longer than proto-max-bulk-len, read off a raw socket
          // (the header alone, so nothing unread makes the server reset the connection first).
          const redis = yield* server({ args: ["--proto-max-bulk-len", "1mb"] })
          const reply = yield* Effect.async<string>((resume) => {
            const socket = connect(redis.port, "127.0.0.1", () => socket.write("*2\r\n$4\r\nECHO\r\n$2097152\r\n"))
            let received = ""
            socket.on("data", (chunk) => {
              received += chunk.toString("utf8")
              const end = received.indexOf("\r\n")
              if (end !== -1) {
                socket.destroy()
                resume(Effect.succeed(received.slice(0, end)))
              }
            })
            socket.on("error", () => undefined)
          })
          assert.strictEqual(reply, "-ERR Protocol error: invalid bulk length")
          assert.isTrue(isPermanent(new ReplyError(reply.slice(1))))
          assert.isFalse(isPermanent(new Error(reply.slice(1))), "a connection error is not a reply")

          // WRONGTYPE: the record's key holds something this library did not write.
          const client = yield* admin(redis.url)
          const prefix = uniquePrefix("wrongtype")
          const storage = yield* Storage.Storage.pipe(
            Effect.provide(yield* build(RedisStorage.layer({ url: Redacted.make(redis.url), prefix })))
          )
          const key = uniqueKey("wrongtype")
          const acquired = yield* storage.acquire({ key, fingerprint: "", lease: Duration.seconds(30) })
          if (acquired._tag !== "Acquired") return assert.fail("expected Acquired")
          yield* redisCall(() => client.set(recordName(prefix, key), "not a hash"))
          const wrongType = failsWith(
            yield* Effect.exit(
              storage.commit(acquired.lease, { outcome: "success", payload: bytes("1"), ttl: Duration.minutes(1) })
            ),
            IdempotencyStorageError
          )
          assert.include(wrongType.message, "WRONGTYPE")
          assert.isFalse(wrongType.retryable)

          // OOM: memory may be freed, so the commit may land when tried again.
          const other = uniqueKey("oom")
          const lease = yield* storage.acquire({ key: other, fingerprint: "", lease: Duration.seconds(30) })
          if (lease._tag !== "Acquired") return assert.fail("expected Acquired")
          yield* redisCall(() => client.config("SET", "maxmemory", "1"))
          const oom = failsWith(
            yield* Effect.exit(
              storage.commit(lease.lease, { outcome: "success", payload: bytes("1"), ttl: Duration.minutes(1) })
            ),
            IdempotencyStorageError
          )
          assert.include(oom.message, "OOM")
          assert.notStrictEqual(oom.retryable, false)
          yield* redisCall(() => client.config("SET", "maxmemory", "0"))
          assert.isTrue(
            yield* storage.commit(lease.lease, { outcome: "success", payload: bytes("1"), ttl: Duration.minutes(1) })
          )
        }),
      { timeout: 30_000 }
    )

    it.scopedLive("waitForReplicas is checked at build: a count below 1, or a timeout not shorter than timeout, is refused", () =>
      Effect.gen(function*() {
        const refused = (waitForReplicas: RedisStorage.RedisStorageOptions["waitForReplicas"]) =>
          Effect.map(
            Effect.exit(build(RedisStorage.layer({ url: Redacted.make(url), timeout: "1 second", waitForReplicas }))),
            (exit) => {
              const error = failsWith(exit, IdempotencyStorageSetupError)
              assert.instanceOf(error.cause, IdempotencyError.IdempotencyOptionsInvalid)
              return (error.cause as IdempotencyError.IdempotencyOptionsInvalid).option
            }
          )
        assert.strictEqual(yield* refused({ count: 0 }), "waitForReplicas.count")
        assert.strictEqual(yield* refused({ count: 1.5 }), "waitForReplicas.count")
        assert.strictEqual(yield* refused({ count: 1, timeout: "1 second" }), "waitForReplicas.timeout")
        assert.strictEqual(yield* refused({ count: 1, timeout: "0 millis" }), "waitForReplicas.timeout")
      }))

    it.scopedLive(
      "waitForReplicas: a commit returns once the replica has the record; a stalled replica fails it (retryable) until it catches up",
      () =>
        Effect.gen(function*() {
          const primary = yield* server()
          const replica = yield* server({ args: ["--replicaof", "127.0.0.1", String(primary.port)] })
          const [replicaClient] = yield* replicating(primary, [replica])
          const prefix = "idem"
          const context = yield* build(
            RedisStorage.layer({
              url: Redacted.make(primary.url),
              prefix,
              waitForReplicas: { count: 1, timeout: "1 second" }
            })
          )
          const storage = yield* Storage.Storage.pipe(Effect.provide(context))

          const key = uniqueKey("replicated")
          assert.strictEqual(yield* Effect.succeed("ok").pipe(Idempotent.wrap({ key }), Effect.provide(context)), "ok")
          // Read from the replica right after the commit returned: WAIT made sure it is there.
          assert.strictEqual(yield* redisCall(() => replicaClient!.hget(recordName(prefix, key), "state")), "C")

          // The replica stops answering: the commit lands on the primary, but WAIT is not acknowledged.
          const stalledKey = uniqueKey("stalled")
          const acquired = yield* storage.acquire({ key: stalledKey, fingerprint: "", lease: Duration.seconds(30) })
          if (acquired._tag !== "Acquired") return assert.fail("expected Acquired")
          const request = { outcome: "success", payload: bytes("1"), ttl: Duration.minutes(1) } as const
          const pause = yield* Scope.make()
          yield* Scope.extend(stalled(replica.pid()), pause)
          const { exit, millis } = yield* elapsed(storage.commit(acquired.lease, request))
          const error = failsWith(exit, IdempotencyStorageError)
          assert.strictEqual(error.operation, "commit")
          assert.isTrue(error.retryable)
          assert.instanceOf(error.cause, RedisStorage.RedisReplicasNotAcknowledged)
          const cause = error.cause as RedisStorage.RedisReplicasNotAcknowledged
          assert.deepStrictEqual(
            { required: cause.required, acknowledged: cause.acknowledged, timeoutMillis: cause.timeoutMillis },
            { required: 1, acknowledged: 0, timeoutMillis: 1000 }
          )
          assert.isAtLeast(millis, 950)

          // Through wrap, the commit is tried again while the lease holds: once the replica is
          // back, it is acknowledged and the call succeeds; the effect ran once.
          let runs = 0
          const wrapKey = uniqueKey("stalled-wrap")
          const call = yield* Effect.sync(() => ++runs).pipe(
            Idempotent.wrap({ key: wrapKey, lease: "30 seconds" }),
            Effect.provide(context),
            Effect.fork
          )
          yield* Effect.sleep("3 seconds")
          assert.isTrue(Option.isNone(yield* Fiber.poll(call)), "the call returned before any replica acknowledged")
          yield* Scope.close(pause, Exit.void)
          assert.strictEqual(successOf(yield* Fiber.await(call)), 1)
          assert.strictEqual(runs, 1)
          assert.strictEqual(yield* redisCall(() => replicaClient!.hget(recordName(prefix, wrapKey), "state")), "C")
          // The storage-level commit, tried again, is acknowledged now too.
          assert.isTrue(yield* eventually(storage.commit(acquired.lease, request), "10 seconds"))
          assert.strictEqual(yield* redisCall(() => replicaClient!.hget(recordName(prefix, stalledKey), "state")), "C")
        }),
      { timeout: 60_000 }
    )

    it.scopedLive(
      "waitForReplicas for 2 with one replica: the commit fails after the timeout, and wrap reports IdempotencyResultNotStored",
      () =>
        Effect.gen(function*() {
          const primary = yield* server()
          const replica = yield* server({ args: ["--replicaof", "127.0.0.1", String(primary.port)] })
          yield* replicating(primary, [replica])
          const context = yield* build(
            RedisStorage.layer({
              url: Redacted.make(primary.url),
              timeout: "3 seconds",
              waitForReplicas: { count: 2, timeout: "1 second" }
            })
          )
          const storage = yield* Storage.Storage.pipe(Effect.provide(context))
          const acquired = yield* storage.acquire({
            key: uniqueKey("two"),
            fingerprint: "",
            lease: Duration.seconds(30)
          })
          if (acquired._tag !== "Acquired") return assert.fail("expected Acquired")
          const { exit, millis } = yield* elapsed(
            storage.commit(acquired.lease, { outcome: "success", payload: bytes("1"), ttl: Duration.minutes(1) })
          )
          const error = failsWith(exit, IdempotencyStorageError)
          assert.isTrue(error.retryable)
          const cause = error.cause as RedisStorage.RedisReplicasNotAcknowledged
          assert.deepStrictEqual({ required: cause.required, acknowledged: cause.acknowledged }, {
            required: 2,
            acknowledged: 1
          })
          assert.isAtLeast(millis, 950)

          let runs = 0
          const wrapped = yield* elapsed(
            Effect.sync(() => ++runs).pipe(
              Idempotent.wrap({ key: uniqueKey("two-wrap"), lease: "5 seconds" }),
              Effect.provide(context)
            )
          )
          const notStored = failsWith(wrapped.exit, IdempotencyError.IdempotencyResultNotStored)
          assert.strictEqual(notStored.reason, "storage-failed")
          assert.strictEqual(runs, 1)
          // Tried again while the lease held, not past it.
          assert.isAtLeast(wrapped.millis, 950)
          assert.isBelow(wrapped.millis, 5000 + 3000)
        }),
      { timeout: 60_000 }
    )
  })
})
