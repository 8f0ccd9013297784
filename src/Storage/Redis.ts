/**
 * Redis storage on ioredis, for services that run many instances: every protocol step is one Lua
 * script call, so a first call costs two round trips (acquire, commit) and a replay one.
 *
 * Layout, for an idempotency key `k` and `h = sha256(k)` in hex:
 *
 * - `${prefix}:{h}`: a hash holding the lease or the completed record (`state` `L` or `C`,
 *   `key`, `fp`, `token`, `fence`, `outcome`, `payload`, `createdAt`, `expiresAt`), expiring with
 *   the lease while in flight and with the TTL once completed.
 * - `${prefix}:{h}:fence`: the fencing counter, kept longer than any lease or record of the key.
 * - `${prefix}:{h}:changed`: the sharded pub/sub channel that commit, release and delete publish
 *   to, so waiters are woken without polling.
 *
 * The client's key is hashed, so no key a client sends can name anything else; all three names
 * share the hash tag `{h}`, so one key lives in one Redis Cluster slot. Needs Redis 7 or later
 * (`SPUBLISH`, `SSUBSCRIBE`, `CONFIG GET` of several parameters).
 *
 * What Redis itself must not do, and what the layer checks:
 *
 * - **Eviction.** A lease or record that Redis evicts under memory pressure is a key that runs
 *   again. Every key here carries a TTL, so the `volatile-*` policies evict them as readily as the
 *   `allkeys-*` ones (`volatile-ttl` takes in-flight leases first); only `noeviction` is safe.
 *   At build the layer reads `maxmemory-policy` (`CONFIG GET`; on a Cluster, from every master)
 *   and fails with `IdempotencyStorageSetupError` (cause {@link RedisEvictionPolicyUnsafe}) when it is anything else, or only logs a warning with
 *   `onEvictionRisk: "warn"`. Where `CONFIG` is refused (a managed Redis that renames or forbids
 *   it), the policy is unknown: the layer logs a warning and builds. The check is made once; a
 *   policy changed later goes unnoticed.
 * - **Failover.** Replication is asynchronous: a primary that fails before its replicas have a
 *   commit loses that record (the key runs again), and a fence counter that had not reached the
 *   replica hands the same fence out twice. `waitForReplicas` sends `WAIT` after each commit and
 *   reports the commit as failed until enough replicas acknowledge it, which narrows the window
 *   for records. It does not close it: `WAIT` does not make Redis strongly consistent (a replica
 *   that acknowledged can still lose the write, a failover may promote one that did not), and
 *   leases and fences are not waited for.
 * - **Value size.** Redis refuses a bulk string longer than `proto-max-bulk-len` (512 MB unless
 *   lowered) and drops the connection that sent it. The layer reads the limit at build and fails
 *   a commit of a larger result at once, without sending it, with `retryable: false`; a refusal
 *   from Redis itself (the limit lowered later) is reported with `retryable: false` too.
 *
 * @since 0.1.0
 */
import * as Config from "effect/Config"
import type { ConfigError } from "effect/ConfigError"
import * as Deferred from "effect/Deferred"
import * as Duration from "effect/Duration"
import * as Effect from "effect/Effect"
import * as Exit from "effect/Exit"
import * as FiberId from "effect/FiberId"
import * as Layer from "effect/Layer"
import * as Option from "effect/Option"
import * as Redacted from "effect/Redacted"
import * as Runtime from "effect/Runtime"
import * as Schema from "effect/Schema"
import type * as Scope from "effect/Scope"
import type { Cluster, RedisOptions } from "ioredis"
import { Redis } from "ioredis"
import {
  IdempotencyOptionsInvalid,
  IdempotencyStorageError,
  IdempotencyStorageSetupError,
  type StorageOperation
} from "../IdempotencyError.js"
import type { IdempotencyRecord } from "../IdempotencyRecord.js"
import { keyDigest } from "../internal/fingerprint.js"
import { isPermanent, isReplyError } from "../internal/redis/replies.js"
import * as Storage from "../Storage.js"

/**
 * Where and how to reach Redis.
 *
 * Give a `url`, ioredis `options`, or both (what the URL names, such as host, port, password or
 * database, wins over the same options), to let the layer open and close its own connections; or
 * an existing `client`, which the layer uses and never closes. Either way the layer opens one more connection of its own for pub/sub (a
 * `duplicate()`; with a `Cluster`, one per master) and closes it when released.
 *
 * @since 0.1.0
 * @category Models
 */
export interface RedisStorageOptions {
  /** For example `Redacted.make("redis://127.0.0.1:6379")`. */
  readonly url?: Redacted.Redacted<string> | undefined
  /**
   * ioredis options, merged over the defaults of connections this layer opens. The defaults fail
   * fast while Redis is unreachable instead of queueing: no offline queue
   * (`enableOfflineQueue: false`), no retry or resend of a command whose connection dropped
   * (`maxRetriesPerRequest: 0`, `autoResendUnfulfilledCommands: false`), and `connectTimeout` and
   * `commandTimeout` equal to `timeout`. The connections reconnect in the background.
   * `lazyConnect` is always on: the layer connects, and fails to build if it cannot.
   */
  readonly options?: RedisOptions | undefined
  /**
   * An existing client, used as it is and never closed. Its offline queue and retries are its
   * own: each call is still bounded by `timeout`, but a command that timed out may run later
   * from that client's queue. Set `enableOfflineQueue: false` on it to fail fast.
   */
  readonly client?: Redis | Cluster | undefined
  /** The first part of every Redis key and channel. Default `"idem"`. No `{` or `}`. */
  readonly prefix?: string | undefined
  /** The bound on connecting and on every storage call. Default 2 seconds. */
  readonly timeout?: Duration.DurationInput | undefined
  /**
   * What to do when `maxmemory-policy` lets Redis evict this library's keys (anything but
   * `noeviction`, on any master): `"fail"` the layer build (the default), or only log a
   * `"warn"`ing and build, for a Redis whose memory is known never to run out.
   */
  readonly onEvictionRisk?: "fail" | "warn" | undefined
  /**
   * Wait for replicas after each commit: `WAIT count timeout` on the connection that committed.
   * When fewer than `count` replicas acknowledge within `timeout` (default half of `timeout`, and
   * shorter than it), the commit fails with a retryable `IdempotencyStorageError` whose cause is
   * {@link RedisReplicasNotAcknowledged}: `Idempotent.wrap` tries it again while its lease holds,
   * then reports the result as not stored. The record may still be on the primary and be
   * replayed from there. Costs one `WAIT` per first call and sends the commit script's text
   * (`EVAL`) so that the two travel together.
   */
  readonly waitForReplicas?: {
    readonly count: number
    readonly timeout?: Duration.DurationInput | undefined
  } | undefined
}

/**
 * The cause of a layer build that failed because a Redis master's `maxmemory-policy` may evict
 * this library's leases and records. Only `noeviction` keeps them.
 *
 * @since 0.1.0
 * @category Errors
 */
export class RedisEvictionPolicyUnsafe extends Schema.TaggedError<RedisEvictionPolicyUnsafe>(
  "effect-idempotency/RedisEvictionPolicyUnsafe"
)("RedisEvictionPolicyUnsafe", {
  /** `host:port` of the server that answered. */
  node: Schema.String,
  policy: Schema.String
}) {
  /**
   * What went wrong, in words, with what to do about it.
   *
   * @since 0.1.0
   */
  get message(): string {
    return `Redis at ${this.node} has maxmemory-policy ${this.policy}, which may evict idempotency leases and ` +
      `records (only noeviction keeps them); set it to noeviction, or pass onEvictionRisk: "warn"`
  }
}

/**
 * The cause of a commit that fewer replicas acknowledged than `waitForReplicas.count` asks for.
 *
 * @since 0.1.0
 * @category Errors
 */
export class RedisReplicasNotAcknowledged extends Schema.TaggedError<RedisReplicasNotAcknowledged>(
  "effect-idempotency/RedisReplicasNotAcknowledged"
)("RedisReplicasNotAcknowledged", {
  required: Schema.Number,
  acknowledged: Schema.Number,
  timeoutMillis: Schema.Number
}) {
  /**
   * What went wrong, in words, with what to do about it.
   *
   * @since 0.1.0
   */
  get message(): string {
    return `${this.acknowledged} of ${this.required} replicas acknowledged the commit within ${this.timeoutMillis} ms`
  }
}

/**
 * The cause of a commit refused before it was sent: its payload is longer than the
 * `proto-max-bulk-len` Redis reported at build. Retrying cannot fix it.
 *
 * @since 0.1.0
 * @category Errors
 */
export class RedisValueTooLarge extends Schema.TaggedError<RedisValueTooLarge>(
  "effect-idempotency/RedisValueTooLarge"
)("RedisValueTooLarge", {
  bytes: Schema.Number,
  limit: Schema.Number
}) {
  /**
   * What went wrong, in words, with what to do about it.
   *
   * @since 0.1.0
   */
  get message(): string {
    return `a ${this.bytes}-byte result exceeds Redis's proto-max-bulk-len of ${this.limit} bytes`
  }
}

// Time after a key's last lease or record that its fence counter is kept. A counter that expires
// anyway restarts from the server clock in milliseconds (see `acquireScript`), above every fence
// it handed out unless the key averaged more than one new owner per millisecond. Every script that
// sets the record's expiry sets the counter's to the same plus this margin, so the counter always
// outlives the record it numbers (an older, longer expiry belonged to a record that is gone).
const fenceMargin = Duration.hours(1)

// Redis rejects expiry times it cannot add to its clock; a hundred years is "forever" enough.
const maxExpiryMillis = 100 * 365 * 24 * 60 * 60 * 1000

const expiryMillis = (duration: Duration.Duration): number => {
  const millis = Duration.toMillis(duration)
  return Number.isFinite(millis) ? Math.min(Math.max(1, Math.ceil(millis)), maxExpiryMillis) : maxExpiryMillis
}

const fenceKeepMillis = (duration: Duration.Duration) => expiryMillis(Duration.sum(duration, fenceMargin))

// Helpers shared by the scripts. Numbers are formatted with %d: Lua's own number-to-string
// conversion may switch to exponent notation for epoch milliseconds.
const luaHelpers = `
local function nowMillis()
  local time = redis.call("TIME")
  return tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
end


local function owns(record, token)
  local held = redis.call("HMGET", record, "state", "token")
  return held[1] == "L" and held[2] == token
end
`

/**
 * KEYS: record, fence. ARGV: lease millis, token, fingerprint, raw key, fence keep millis.
 * Answers `{"C", key, fp, outcome, payload, fence, createdAt, expiresAt}`, `{"L", fp, pttl}` or
 * `{"A", fence}`.
 */
const acquireScript = `${luaHelpers}
local record, fence = KEYS[1], KEYS[2]
local found = redis.call("HMGET", record, "state", "key", "fp", "outcome", "payload", "fence", "createdAt", "expiresAt")
if found[1] == "C" then
  return { "C", found[2], found[3], found[4], found[5], found[6], found[7], found[8] }
end
if found[1] == "L" then
  return { "L", found[3], redis.call("PTTL", record) }
end

local issued = redis.call("INCR", fence)
if issued == 1 then
  -- A new counter: the key was never used, or its counter expired after outliving every lease and
  -- record. Starting from the clock keeps fences growing across that expiry.
  issued = nowMillis()
  redis.call("SET", fence, string.format("%d", issued), "PX", ARGV[5])
else
  redis.call("PEXPIRE", fence, ARGV[5])
end
redis.call("HSET", record, "state", "L", "key", ARGV[4], "fp", ARGV[3], "token", ARGV[2], "fence", string.format("%d", issued))
redis.call("PEXPIRE", record, ARGV[1])
return { "A", issued }
`

/** KEYS: record, fence. ARGV: token, lease millis, fence keep millis. */
const renewScript = `${luaHelpers}
if not owns(KEYS[1], ARGV[1]) then return 0 end
redis.call("PEXPIRE", KEYS[1], ARGV[2])
redis.call("PEXPIRE", KEYS[2], ARGV[3])
return 1
`

/** KEYS: record, fence. ARGV: token, outcome, payload, ttl millis, fence keep millis. */
const commitScript = `${luaHelpers}
local record = KEYS[1]
-- The token stays on the completed record, so a commit retried after its reply was lost answers
-- 1 again instead of reporting the stored result as a lost lease.
local held = redis.call("HMGET", record, "state", "token")
if held[2] ~= ARGV[1] then return 0 end
if held[1] == "C" then
  -- Written again, so that a WAIT after this retry (on a new connection, say) waits for a write
  -- that replicas receive after the record's: their acknowledgement then covers the record too.
  redis.call("HSET", record, "state", "C")
  return 1
end
if held[1] ~= "L" then return 0 end
local now = nowMillis()
redis.call("HSET", record, "state", "C", "outcome", ARGV[2], "payload", ARGV[3],
  "createdAt", string.format("%d", now), "expiresAt", string.format("%d", now + tonumber(ARGV[4])))
redis.call("PEXPIRE", record, ARGV[4])
redis.call("PEXPIRE", KEYS[2], ARGV[5])
redis.call("SPUBLISH", record .. ":changed", "C")
return 1
`

/** KEYS: record. ARGV: token. */
const releaseScript = `${luaHelpers}
if not owns(KEYS[1], ARGV[1]) then return 0 end
redis.call("DEL", KEYS[1])
redis.call("SPUBLISH", KEYS[1] .. ":changed", "R")
return 1
`

/**
 * KEYS: record. ARGV: fence, or nothing. With a fence, deletes only a completed record carrying
 * it, so a lease or a newer record is left alone. The fence counter stays, so fences keep growing
 * after a delete.
 */
const deleteScript = `
if ARGV[1] then
  local held = redis.call("HMGET", KEYS[1], "state", "fence")
  if held[1] ~= "C" or held[2] ~= ARGV[1] then return 0 end
end
redis.call("DEL", KEYS[1])
redis.call("SPUBLISH", KEYS[1] .. ":changed", "D")
return 1
`

// Names are namespaced: on a client the user passes in, they sit next to the user's own commands.
const commands = {
  acquire: "effectIdempotencyAcquire",
  renew: "effectIdempotencyRenew",
  commit: "effectIdempotencyCommit",
  release: "effectIdempotencyRelease",
  delete: "effectIdempotencyDelete"
} as const

type Reply = Buffer | number | null | ReadonlyArray<Reply>

interface ScriptedClient {
  effectIdempotencyAcquireBuffer(
    record: string,
    fence: string,
    leaseMillis: number,
    token: string,
    fingerprint: string,
    key: string,
    fenceKeepMillis: number
  ): Promise<ReadonlyArray<Reply>>
  effectIdempotencyRenew(
    record: string,
    fence: string,
    token: string,
    leaseMillis: number,
    fenceKeepMillis: number
  ): Promise<number>
  effectIdempotencyCommit(
    record: string,
    fence: string,
    token: string,
    outcome: string,
    payload: Buffer,
    ttlMillis: number,
    fenceKeepMillis: number
  ): Promise<number>
  effectIdempotencyRelease(record: string, token: string): Promise<number>
  effectIdempotencyDelete(record: string, ...fence: Array<string>): Promise<number>
  hmgetBuffer(record: string, ...fields: Array<string>): Promise<Array<Buffer | null>>
}

const defineScripts = (client: Redis | Cluster): ScriptedClient => {
  client.defineCommand(commands.acquire, { lua: acquireScript, numberOfKeys: 2 })
  client.defineCommand(commands.renew, { lua: renewScript, numberOfKeys: 2 })
  client.defineCommand(commands.commit, { lua: commitScript, numberOfKeys: 2 })
  client.defineCommand(commands.release, { lua: releaseScript, numberOfKeys: 1 })
  client.defineCommand(commands.delete, { lua: deleteScript, numberOfKeys: 1 })
  return client as unknown as ScriptedClient
}

const isCluster = (client: Redis | Cluster): client is Cluster => client.isCluster

const text = (reply: Reply | undefined): string | undefined =>
  Buffer.isBuffer(reply) ? reply.toString("utf8") : typeof reply === "number" ? String(reply) : undefined

const integer = (reply: Reply | undefined): number | undefined => {
  const value = typeof reply === "number" ? reply : Number(text(reply))
  return Number.isSafeInteger(value) ? value : undefined
}

class UnexpectedReply extends Error {
  constructor(readonly reply: unknown) {
    super("unexpected reply from Redis: the key holds data this library did not write")
  }
}

const toRecord = (fields: ReadonlyArray<Reply>): IdempotencyRecord | undefined => {
  const [rawKey, rawFingerprint, rawOutcome, payload, rawFence, rawCreatedAt, rawExpiresAt] = fields
  const key = text(rawKey)
  const fingerprint = text(rawFingerprint)
  const outcome = text(rawOutcome)
  const fence = integer(rawFence)
  const createdAt = integer(rawCreatedAt)
  const expiresAt = integer(rawExpiresAt)
  if (
    key === undefined || fingerprint === undefined || (outcome !== "success" && outcome !== "failure") ||
    !Buffer.isBuffer(payload) || fence === undefined || createdAt === undefined || expiresAt === undefined
  ) return undefined
  return { key, fingerprint, outcome, payload, fence, createdAt, expiresAt }
}

const recordFields = ["key", "fp", "outcome", "payload", "fence", "createdAt", "expiresAt"]

// Connections this layer opens fail fast while Redis is away and never run a command twice: a
// resent acquire could take a lease for an answer nobody reads, a resent commit could report a
// stored result as lost.
const connectionDefaults = (timeoutMillis: number): RedisOptions => ({
  enableOfflineQueue: false,
  maxRetriesPerRequest: 0,
  autoResendUnfulfilledCommands: false,
  connectTimeout: timeoutMillis,
  commandTimeout: timeoutMillis,
  retryStrategy: (attempt) => Math.min(attempt * 100, 1000)
})

/** What `CONFIG GET` told about one master, or that it was refused. */
type ServerSettings =
  | { readonly node: string; readonly settings: ReadonlyMap<string, string> }
  | { readonly node: string; readonly refused: string }

const nodeName = (connection: Redis) => `${connection.options.host ?? "127.0.0.1"}:${connection.options.port ?? 6379}`

const setupError = (detail: string, cause?: unknown) =>
  new IdempotencyStorageSetupError(
    cause === undefined ? { backend: "redis", detail } : { backend: "redis", detail, cause }
  )

/**
 * Why a Redis URL is refused before a connection is tried, or `undefined` when it is usable.
 * ioredis reads any other string as a host or a socket path, and fails later with an error that
 * does not mention the URL (`http://host` becomes `connect ENOENT //host`). Only the scheme is
 * quoted: the rest may hold a password.
 */
const urlScheme = (url: string): string | undefined => {
  const scheme = /^([a-z][a-z0-9+.-]*):/i.exec(url)?.[1]?.toLowerCase()
  if (scheme === "redis" || scheme === "rediss") return undefined
  return scheme === undefined
    ? "must be a URL starting with redis:// or rediss://"
    : `must start with redis:// or rediss://, not ${scheme}://`
}

interface Channel {
  readonly subscribed: Promise<void>
  readonly waiters: Set<Deferred.Deferred<void>>
}

/**
 * Builds a Redis storage whose connections live as long as the scope. Fails with
 * `IdempotencyStorageSetupError` when Redis cannot be reached within `timeout`; for a `url` that
 * is not `redis://` or `rediss://`, a prefix holding `{` or `}` or an invalid `waitForReplicas`
 * (cause `IdempotencyOptionsInvalid`); or for a `maxmemory-policy` that may evict keys (cause
 * {@link RedisEvictionPolicyUnsafe}, unless `onEvictionRisk: "warn"`).
 *
 * @example
 * ```ts
 * import { Layer, Redacted } from "effect"
 * import { Storage } from "effect-idempotency"
 * import * as RedisStorage from "effect-idempotency/Storage/Redis"
 *
 * // What RedisStorage.layer does: the connections close with the layer's scope.
 * const RedisLive = Layer.scoped(Storage.Storage, RedisStorage.make({ url: Redacted.make("redis://127.0.0.1:6379") }))
 * ```
 *
 * @since 0.1.0
 * @category Constructors
 */
export const make = (
  options: RedisStorageOptions
): Effect.Effect<Storage.StorageService, IdempotencyStorageSetupError, Scope.Scope> =>
  Effect.gen(function*() {
    const prefix = options.prefix ?? "idem"
    const timeout = Duration.decode(options.timeout ?? Duration.seconds(2))
    // ioredis sets its timers with setTimeout, which takes at most 2^31 - 1 millis.
    const timeoutMillis = Math.min(expiryMillis(timeout), 2 ** 31 - 1)
    const runtime = yield* Effect.runtime<never>()

    const invalid = (option: string, detail: string) =>
      setupError(`option ${option} ${detail}`, new IdempotencyOptionsInvalid({ option, detail }))

    if (/[{}]/.test(prefix)) {
      return yield* invalid("prefix", `holds { or } (${JSON.stringify(prefix)}), which would change the hash tag`)
    }
    if (options.url !== undefined && options.client === undefined) {
      const scheme = urlScheme(Redacted.value(options.url))
      if (scheme !== undefined) return yield* invalid("url", scheme)
    }
    const replicas = options.waitForReplicas
    const waitTimeout = Duration.decode(
      replicas?.timeout ?? Duration.millis(Math.max(1, Math.floor(Duration.toMillis(timeout) / 2)))
    )
    const waitMillis = Math.ceil(Duration.toMillis(waitTimeout))
    if (replicas !== undefined) {
      if (!Number.isSafeInteger(replicas.count) || replicas.count < 1) {
        return yield* invalid("waitForReplicas.count", `must be a positive integer, got ${replicas.count}`)
      }
      // WAIT must answer within the bound of the call that sends it, or every commit would time out.
      if (!(waitMillis >= 1 && waitMillis < timeoutMillis)) {
        return yield* invalid(
          "waitForReplicas.timeout",
          `must be at least 1 millisecond and shorter than timeout (${Duration.format(timeout)}), got ${
            Duration.format(waitTimeout)
          }`
        )
      }
    }

    const failure = (operation: StorageOperation, key: string) => (cause: unknown) =>
      new IdempotencyStorageError(
        isPermanent(cause) ? { key, operation, cause, retryable: false } : { key, operation, cause }
      )

    // Every call is bounded here, so a client the user passed in cannot hang a caller either. The
    // bound is a plain timer on the promise rather than `Effect.timeout`: that forks two fibers per
    // command, which cost more than the round trip itself; and the timer ends the wait even where
    // `Idempotent.wrap` acquires and commits uninterruptibly.
    const bounded = <A, E>(onFailure: (cause: unknown) => E, run: () => Promise<A>): Effect.Effect<A, E> =>
      Effect.async<A, E>((resume) => {
        let settled = false
        const settle = (result: Effect.Effect<A, E>) => {
          if (settled) return
          settled = true
          clearTimeout(timer)
          resume(result)
        }
        const timer = setTimeout(
          () => settle(Effect.fail(onFailure(new Error(`Redis did not answer within ${Duration.format(timeout)}`)))),
          timeoutMillis
        )
        // The connection keeps the process alive while a command is out; this timer need not.
        timer.unref()
        try {
          run().then(
            (value) => settle(Effect.succeed(value)),
            (cause) => settle(Effect.fail(onFailure(cause)))
          )
        } catch (cause) {
          settle(Effect.fail(onFailure(cause)))
        }
        // No canceler: an interrupted caller stops waiting at once anyway and the timer ends by
        // itself, while a canceler would wrap every call in an interruption handler.
      })

    const call = <A>(operation: StorageOperation, key: string, run: () => Promise<A>) =>
      bounded(failure(operation, key), run)

    // The layer's own calls (connect, settings) fail the layer's build, with what was being done.
    const setupCall = <A>(doing: string, run: () => Promise<A>) =>
      bounded((cause) => setupError(`${doing} failed`, cause), run)

    // ioredis rejects a failed connect with "Connection is closed."; the error event before it
    // says why (refused, timed out, auth), so that is the cause reported.
    const lastErrors = new WeakMap<Redis | Cluster, unknown>()
    const logConnectionErrors = (connection: Redis | Cluster) =>
      connection.on("error", (error: unknown) => {
        lastErrors.set(connection, error)
        Runtime.runFork(runtime)(
          Effect.logDebug("idempotency redis connection error").pipe(
            Effect.annotateLogs("cause", error instanceof Error ? error.message : String(error))
          )
        )
      })

    const close = (connection: Redis | Cluster) =>
      (connection.status === "ready" ? setupCall("closing the connection", () => connection.quit()) : Effect.void).pipe(
        Effect.ignore,
        Effect.ensuring(Effect.sync(() => connection.disconnect()))
      )

    const connect = (connection: Redis | Cluster) =>
      setupCall("connecting to Redis", () =>
        connection.connect().catch((error: unknown) => {
          throw lastErrors.get(connection) ?? error
        }))

    // Ours to close: opened here, or a duplicate of the user's client.
    const open = (create: () => Redis | Cluster) =>
      Effect.acquireRelease(Effect.sync(() => logConnectionErrors(create())), close)

    const defaults = connectionDefaults(timeoutMillis)
    const client = options.client ?? (yield* open(() => {
      const merged: RedisOptions = { ...defaults, ...options.options, lazyConnect: true }
      return options.url === undefined ? new Redis(merged) : new Redis(Redacted.value(options.url), merged)
    }))

    const subscriber = yield* open(() =>
      isCluster(client)
        // Sharded pub/sub on a cluster needs a subscriber per master, which ioredis keeps for us.
        ? client.duplicate([], { lazyConnect: true, shardedSubscribers: true })
        : client.duplicate({ ...defaults, ...options.options, lazyConnect: true })
    )

    yield* Effect.all(
      options.client === undefined ? [connect(client), connect(subscriber)] : [connect(subscriber)],
      { concurrency: "unbounded", discard: true }
    )

    // One look at every master's settings. A refusal (a managed Redis that renames CONFIG, an ACL
    // without it) leaves them unknown; no answer at all fails the build like a failed connect.
    const masters = isCluster(client) ? client.nodes("master") : [client]
    const looked: ReadonlyArray<ServerSettings> = yield* Effect.forEach(masters, (master) =>
      setupCall(
        "reading maxmemory-policy and proto-max-bulk-len",
        () => master.call("CONFIG", "GET", "maxmemory-policy", "proto-max-bulk-len") as Promise<Array<string>>
      ).pipe(
        Effect.map((reply): ServerSettings => {
          const settings = new Map<string, string>()
          for (let i = 0; i + 1 < reply.length; i += 2) settings.set(String(reply[i]), String(reply[i + 1]))
          return { node: nodeName(master), settings }
        }),
        Effect.catchIf(
          (error) => isReplyError(error.cause),
          (error): Effect.Effect<ServerSettings> =>
            Effect.succeed({ node: nodeName(master), refused: (error.cause as Error).message })
        )
      ), { concurrency: "unbounded" })

    const onEvictionRisk = options.onEvictionRisk ?? "fail"
    for (const master of looked) {
      const policy = "settings" in master ? master.settings.get("maxmemory-policy") : undefined
      if (policy === "noeviction") continue
      if (policy === undefined) {
        yield* Effect.logWarning(
          "idempotency redis: cannot read maxmemory-policy; unless it is noeviction, Redis may evict leases and records"
        ).pipe(
          Effect.annotateLogs({ node: master.node, cause: "refused" in master ? master.refused : "not reported" })
        )
        continue
      }
      if (onEvictionRisk !== "warn") {
        return yield* setupError(
          `maxmemory-policy is ${policy} on ${master.node}: Redis may evict leases and records, and an evicted ` +
            "key runs again. Set it to noeviction, or pass onEvictionRisk: \"warn\" to accept the risk",
          new RedisEvictionPolicyUnsafe({ node: master.node, policy })
        )
      }
      yield* Effect.logWarning(
        `idempotency redis: maxmemory-policy ${policy} may evict leases and records (only noeviction keeps them)`
      ).pipe(Effect.annotateLogs({ node: master.node, policy }))
    }
    if (masters.length === 0) {
      yield* Effect.logWarning(
        "idempotency redis: the cluster client knows no master yet; maxmemory-policy was not checked"
      )
    }
    // The smallest limit any master reported: a larger payload is refused before it is sent.
    const maxBulkBytes = looked.reduce((limit, master) => {
      const value = "settings" in master ? Number(master.settings.get("proto-max-bulk-len")) : Number.NaN
      return Number.isSafeInteger(value) && value > 0 ? Math.min(limit, value) : limit
    }, Number.POSITIVE_INFINITY)

    const scripts = defineScripts(client)
    // A client's keyPrefix goes in front of keys, and of the channels it subscribes to, so the
    // scripts publish to `${keyPrefix}${record}:changed`: the name messages arrive under.
    const keyPrefix = (client.options as { readonly keyPrefix?: string | undefined }).keyPrefix ?? ""
    const names = (key: string) => {
      const record = `${prefix}:{${keyDigest(key)}}`
      return {
        record,
        fence: `${record}:fence`,
        channel: `${record}:changed`,
        published: `${keyPrefix}${record}:changed`
      }
    }

    const channels = new Map<string, Channel>()
    const wake = (channel: Channel | undefined) =>
      channel?.waiters.forEach((waiter) => Deferred.unsafeDone(waiter, Exit.void))
    const wakeAll = () => channels.forEach(wake)
    subscriber.on("smessageBuffer", (channel: Buffer) => wake(channels.get(channel.toString("utf8"))))
    // A subscriber that lost its connection can no longer wake anyone: waiters look again at once
    // (and fail fast while Redis is away) instead of sleeping out the lease. Notices published
    // while it was away are lost, so waiters look again once it is back too.
    subscriber.on("close", wakeAll)
    subscriber.on("ready", wakeAll)
    yield* Effect.addFinalizer(() => Effect.sync(wakeAll))

    const watch = (key: string) => {
      const { channel: name, published } = names(key)
      return Effect.acquireRelease(
        Effect.sync(() => {
          let channel = channels.get(published)
          if (channel === undefined) {
            const created: Channel = {
              subscribed: subscriber.ssubscribe(name).then(() => undefined),
              waiters: new Set()
            }
            // A failed subscription is not kept: the next watcher tries again.
            created.subscribed.catch(() => {
              if (channels.get(published) === created) channels.delete(published)
            })
            channels.set(published, created)
            channel = created
          }
          const waiter = Deferred.unsafeMake<void>(FiberId.none)
          channel.waiters.add(waiter)
          return { channel, waiter }
        }),
        ({ channel, waiter }) =>
          Effect.sync(() => {
            channel.waiters.delete(waiter)
            if (channel.waiters.size > 0 || channels.get(published) !== channel) return
            channels.delete(published)
            subscriber.sunsubscribe(name).catch(() => undefined)
          })
      ).pipe(
        // Acknowledged before it returns, so no change published after this is missed.
        Effect.tap(({ channel }) => call("watch", key, () => channel.subscribed)),
        Effect.map(({ waiter }) => Deferred.await(waiter))
      )
    }

    const unexpected = (operation: StorageOperation, key: string, reply: unknown) =>
      Effect.fail(failure(operation, key)(new UnexpectedReply(reply)))

    const acquire = (request: Storage.AcquireRequest) => {
      const { fence, record } = names(request.key)
      const token = Storage.makeToken()
      return Effect.flatMap(
        call("acquire", request.key, () =>
          scripts.effectIdempotencyAcquireBuffer(
            record,
            fence,
            expiryMillis(request.lease),
            token,
            request.fingerprint,
            request.key,
            fenceKeepMillis(request.lease)
          )),
        (reply): Effect.Effect<Storage.AcquireResult, IdempotencyStorageError> => {
          switch (text(reply[0])) {
            case "A": {
              const fenceNumber = integer(reply[1])
              if (fenceNumber === undefined) break
              return Effect.succeed(Storage.AcquireResult.Acquired({
                lease: { key: request.key, fingerprint: request.fingerprint, token, fence: fenceNumber }
              }))
            }
            case "L": {
              const remaining = integer(reply[2])
              if (remaining === undefined) break
              return Effect.succeed(Storage.AcquireResult.InFlight({
                fingerprint: text(reply[1] ?? undefined),
                leaseRemaining: Duration.millis(Math.max(0, remaining))
              }))
            }
            case "C": {
              const stored = toRecord(reply.slice(1))
              if (stored === undefined) break
              return Effect.succeed(Storage.AcquireResult.Completed({ record: stored }))
            }
          }
          return unexpected("acquire", request.key, reply)
        }
      )
    }

    const renew = (lease: Storage.Lease, duration: Duration.Duration) => {
      const { fence, record } = names(lease.key)
      return Effect.map(
        call("renew", lease.key, () =>
          scripts.effectIdempotencyRenew(
            record,
            fence,
            lease.token,
            expiryMillis(duration),
            fenceKeepMillis(duration)
          )),
        (renewed) => renewed === 1
      )
    }

    // The script and WAIT go in one pipeline, so WAIT runs on the connection (and, on a Cluster,
    // the master) that ran the commit. The script goes as EVAL: a pipelined EVALSHA answered
    // NOSCRIPT would be sent again after the WAIT, which would then not cover it.
    const commitAndWait = (
      key: string,
      count: number,
      args: readonly [string, string, string, string, Buffer, number, number]
    ) =>
      Effect.flatMap(
        call("commit", key, () =>
          client.pipeline().eval(commitScript, 2, ...args).call("WAIT", count, waitMillis).exec()),
        (replies): Effect.Effect<number, IdempotencyStorageError> => {
          const [committed, waited] = replies ?? []
          if (committed === undefined || waited === undefined) {
            return unexpected("commit", key, replies)
          }
          if (committed[0] !== null) {
            return Effect.fail(failure("commit", key)(committed[0]))
          }
          if (committed[1] !== 1) {
            return Effect.succeed(0)
          }
          if (waited[0] !== null) {
            return Effect.fail(failure("commit", key)(waited[0]))
          }
          const acknowledged = Number(waited[1])
          return acknowledged >= count ? Effect.succeed(1) : Effect.fail(
            new IdempotencyStorageError({
              key,
              operation: "commit",
              retryable: true,
              cause: new RedisReplicasNotAcknowledged({ required: count, acknowledged, timeoutMillis: waitMillis })
            })
          )
        }
      )

    const commit = (lease: Storage.Lease, request: Storage.CommitRequest) => {
      const { fence, record } = names(lease.key)
      if (request.payload.byteLength > maxBulkBytes) {
        return Effect.fail(
          new IdempotencyStorageError({
            key: lease.key,
            operation: "commit",
            retryable: false,
            cause: new RedisValueTooLarge({ bytes: request.payload.byteLength, limit: maxBulkBytes })
          })
        )
      }
      const payload = Buffer.from(request.payload.buffer, request.payload.byteOffset, request.payload.byteLength)
      const args = [
        record,
        fence,
        lease.token,
        request.outcome,
        payload,
        expiryMillis(request.ttl),
        fenceKeepMillis(request.ttl)
      ] as const
      return Effect.map(
        replicas === undefined
          ? call("commit", lease.key, () =>
            scripts.effectIdempotencyCommit(...args))
          : commitAndWait(lease.key, replicas.count, args),
        (committed) =>
          committed === 1
      )
    }

    const release = (lease: Storage.Lease) =>
      Effect.map(
        call("release", lease.key, () => scripts.effectIdempotencyRelease(names(lease.key).record, lease.token)),
        (released) => released === 1
      )

    const read = (key: string) =>
      Effect.flatMap(
        call("read", key, () => scripts.hmgetBuffer(names(key).record, "state", ...recordFields)),
        (fields): Effect.Effect<Option.Option<IdempotencyRecord>, IdempotencyStorageError> => {
          if (text(fields[0] ?? undefined) !== "C") return Effect.succeed(Option.none())
          const stored = toRecord(fields.slice(1))
          return stored === undefined ? unexpected("read", key, fields) : Effect.succeed(Option.some(stored))
        }
      )

    return Storage.make({
      backend: "redis",
      capabilities: { renewal: true, fencing: true, ownedCommit: true, notification: true },
      acquire,
      renew,
      commit,
      release,
      read,
      delete: (key, fence) =>
        Effect.asVoid(
          call("delete", key, () =>
            fence === undefined
              ? scripts.effectIdempotencyDelete(names(key).record)
              : scripts.effectIdempotencyDelete(names(key).record, String(fence)))
        ),
      watch
    })
  })

/**
 * A Redis storage layer. Layers built from the same Redis and prefix share their keys, as the
 * instances of a service do.
 *
 * @example
 * ```ts
 * import { Effect, Redacted } from "effect"
 * import { Idempotent } from "effect-idempotency"
 * import * as RedisStorage from "effect-idempotency/Storage/Redis"
 *
 * const program = Effect.succeed(42).pipe(Idempotent.wrap({ key: "job-1" }))
 *
 * const RedisLive = RedisStorage.layer({ url: Redacted.make("redis://127.0.0.1:6379"), prefix: "orders" })
 *
 * Effect.runPromise(program.pipe(Effect.provide(RedisLive)))
 * ```
 *
 * @since 0.1.0
 * @category Layers
 */
export const layer = (options: RedisStorageOptions): Layer.Layer<Storage.Storage, IdempotencyStorageSetupError> =>
  Layer.scoped(Storage.Storage, make(options))

/**
 * A Redis storage layer read from `Config`, for example
 * `RedisStorage.layerConfig({ url: Config.redacted("REDIS_URL") })`.
 *
 * @example
 * ```ts
 * import { Config, Effect } from "effect"
 * import { Idempotent } from "effect-idempotency"
 * import * as RedisStorage from "effect-idempotency/Storage/Redis"
 *
 * // REDIS_URL is read when the layer is built; a missing one fails with a ConfigError.
 * const RedisLive = RedisStorage.layerConfig({ url: Config.redacted("REDIS_URL") })
 *
 * const program = Effect.succeed(42).pipe(Idempotent.wrap({ key: "job-1" }), Effect.provide(RedisLive))
 * ```
 *
 * @since 0.1.0
 * @category Layers
 */
export const layerConfig = (
  config: Config.Config.Wrap<RedisStorageOptions>
): Layer.Layer<Storage.Storage, ConfigError | IdempotencyStorageSetupError> =>
  Layer.scoped(Storage.Storage, Effect.flatMap(Config.unwrap(config), make))
