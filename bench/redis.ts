/**
 * Redis storage: what a first call and a replay cost next to the network, on the machine's Redis
 * (REDIS_URL, default `redis://127.0.0.1:6379`).
 *
 * - Floors, measured in the same run on the very connection the storage uses: one `PING` and one
 *   trivial `EVALSHA` (an `HMGET` of a missing key, the shape of our scripts without their work).
 * - Our cases through `Idempotent.wrap`: a first call (fresh key: acquire, run, commit; two
 *   round trips) and a replay (a completed key: one round trip), as multiples of the floors and
 *   against the targets of issue 3 (first call ≤ 2.4× and replay ≤ 1.3× one round trip).
 * - The same workload through AWS Powertools' `makeIdempotent` with its Redis persistence layer
 *   (`CachePersistenceLayer` on `@redis/client`, the client its docs and peer range name), on the
 *   same Redis, and our median as a fraction of theirs.
 *
 * Every case is timed in interleaved slices, so load that comes and goes on a shared machine
 * falls on all of them alike. Before the timing, an untimed pass counts the Redis commands each
 * case sends per call and checks each case runs its body (or not) as it should. All keys live
 * under a prefix unique to the run and are removed at the end.
 */
import { IdempotencyConfig, makeIdempotent } from "@aws-lambda-powertools/idempotency"
import { CachePersistenceLayer } from "@aws-lambda-powertools/idempotency/cache"
import { createClient } from "@redis/client"
import { Effect, ManagedRuntime, Schema } from "effect"
import { Idempotent } from "effect-idempotency"
import * as RedisStorage from "effect-idempotency/Storage/Redis"
import { Redis } from "ioredis"
import { readFileSync } from "node:fs"
import {
  type BenchConfig,
  type Case,
  fixed,
  invariant,
  measureInterleaved,
  printRows,
  type Stats,
  type Suite
} from "./harness.js"

const url = process.env.REDIS_URL ?? "redis://127.0.0.1:6379"
const timeoutMillis = 2_000

// Targets from issue 3, as multiples of one round trip (the PING floor's median).
const targets = { first: 2.4, replay: 1.3 }

/** The URL without its password, for printing. */
const display = (raw: string): string => {
  try {
    const parsed = new URL(raw)
    if (parsed.password !== "") parsed.password = "***"
    return parsed.toString()
  } catch {
    return "(unparseable REDIS_URL)"
  }
}

const unreachable = (cause: unknown) =>
  new Error(
    `cannot reach Redis at ${display(url)} within ${timeoutMillis / 1000} s ` +
      `(${cause instanceof Error ? cause.message || cause.name : String(cause)}). ` +
      "Start it (redis-server --daemonize yes --port 6379) or point REDIS_URL at one."
  )

/** `promise`, or a rejection once `timeoutMillis` pass first. */
const deadline = <A>(promise: Promise<A>): Promise<A> => {
  let timer: ReturnType<typeof setTimeout> | undefined
  const timeout = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Error(`no answer within ${timeoutMillis / 1000} s`)), timeoutMillis)
  })
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer))
}

const versionOf = (name: string): string => {
  try {
    const path = new URL(`../node_modules/${name}/package.json`, import.meta.url)
    return (JSON.parse(readFileSync(path, "utf8")) as { version: string }).version
  } catch {
    return "?"
  }
}

const OrderSchema = Schema.Struct({ id: Schema.String, total: Schema.Number })
type Order = typeof OrderSchema.Type

/** One event shape for both libraries: the key, a request body, and the call number. */
interface OrderEvent {
  readonly key: string
  readonly sku: string
  readonly quantity: number
  readonly i: number
}

interface FloorClient {
  benchFloorEvalsha(key: string): Promise<unknown>
}

/** The storage's own scripts, as `RedisStorage` defines them on the client it is given. */
interface StorageScripts {
  effectIdempotencyAcquireBuffer(
    record: string,
    fence: string,
    leaseMillis: number,
    token: string,
    fingerprint: string,
    key: string,
    fenceKeepMillis: number
  ): Promise<unknown>
  effectIdempotencyCommit(
    record: string,
    fence: string,
    token: string,
    outcome: string,
    payload: Buffer,
    ttlMillis: number,
    fenceKeepMillis: number
  ): Promise<number>
}

/** A case, plus what an untimed pass checks about it before the timing. */
interface Checked extends Case {
  /** The Redis commands one call should send, by name (lower case). */
  readonly commands: Readonly<Record<string, number>>
  /** Executions of the wrapped body per call: 1 for a first call, 0 for a replay. */
  readonly executions?: number | undefined
  /** Checks one call's result. */
  readonly check?: ((result: unknown, i: number) => void) | undefined
}

const sameOrder = (label: string, expected: string) => (result: unknown) =>
  invariant(
    typeof result === "object" && result !== null && (result as Order).id === expected &&
      (result as Order).total === 42,
    `${label} returned ${JSON.stringify(result)}, not the order ${expected}`
  )

const ratio = (value: number, floor: number) => `${fixed(value / floor, 2)}×`

export const suite: Suite = {
  name: "redis",
  // Every call is one or two network round trips: fewer of them still give a steady p99.
  defaults: { iterations: 5_000, warmup: 500 },
  run: async (config: BenchConfig) => {
    const runPrefix = `bench-${process.pid}-${Date.now().toString(36)}`

    // One client for the storage and the floors alike, set up as `RedisStorage.layer({ url })`
    // sets up the connections it opens (fail fast, no offline queue, no resend, a command
    // timeout); it does not reconnect, so a Redis that goes away fails the run.
    const client = new Redis(url, {
      lazyConnect: true,
      enableOfflineQueue: false,
      maxRetriesPerRequest: 0,
      autoResendUnfulfilledCommands: false,
      connectTimeout: timeoutMillis,
      commandTimeout: timeoutMillis,
      retryStrategy: () => null
    })
    let lastError: unknown = undefined
    client.on("error", (error: unknown) => {
      lastError = error
    })
    // Powertools' documented client, on its own connection to the same server.
    const powertoolsClient = createClient({
      url,
      socket: { connectTimeout: timeoutMillis, reconnectStrategy: false }
    })
    powertoolsClient.on("error", () => {})

    let dispose: (() => Promise<void>) | undefined
    try {
      // Bounded as a whole: a server that accepts the connection and then says nothing (or a
      // client that keeps retrying) fails the suite within the timeout too.
      try {
        await deadline(client.connect())
      } catch (error) {
        throw unreachable(lastError ?? error)
      }
      try {
        await deadline(powertoolsClient.connect())
      } catch (error) {
        throw unreachable(error)
      }
      const server = /redis_version:(\S+)/.exec(await client.info("server"))?.[1] ?? "?"
      console.log(
        `\nredis ${server} at ${display(url)}; keys under ${runPrefix}*; ioredis ${versionOf("ioredis")}, ` +
          `@redis/client ${versionOf("@redis/client")}, ` +
          `@aws-lambda-powertools/idempotency ${versionOf("@aws-lambda-powertools/idempotency")}`
      )

      // Floors. The script has the shape of ours (a key, an HMGET) and none of their work.
      client.defineCommand("benchFloorEvalsha", {
        numberOfKeys: 1,
        lua: "return redis.call(\"HMGET\", KEYS[1], \"state\", \"token\")"
      })
      const floorKey = `${runPrefix}:floor:{missing}`
      const floors = client as unknown as FloorClient

      // Ours, on a runtime built once.
      const storageRuntime = ManagedRuntime.make(
        RedisStorage.layer({ client, prefix: `${runPrefix}:ours`, timeout: timeoutMillis })
      )
      dispose = () => storageRuntime.dispose()
      await storageRuntime.runtime()
      let executions = 0
      const order = (i: number) =>
        Effect.sync((): Order => {
          executions++
          return { id: `order-${i}`, total: 42 }
        })
      const keyOnly = (key: string) => Idempotent.wrap({ key })
      const withFingerprint = (key: string) =>
        Idempotent.wrap({ key, fingerprint: { sku: "mug", quantity: 2 }, success: OrderSchema })

      // Theirs, on the same workload: the key is the event's `key`. The lambda context only tells
      // Powertools how long the in-progress record holds, like our lease. Payload validation
      // (`payloadValidationJmesPath`, their fingerprint) is left out: in 2.35.0 the cache layer's
      // completed record drops the validation hash, so every validated replay fails with
      // IdempotencyValidationError (aws-powertools/powertools-lambda-typescript#5705).
      const lambdaContext = { getRemainingTimeInMillis: () => 30_000 }
      const powertools = (cacheClient: typeof powertoolsClient) => {
        const config = new IdempotencyConfig({ eventKeyJmesPath: "key" })
        config.registerLambdaContext(lambdaContext as never)
        return makeIdempotent(
          async (event: OrderEvent): Promise<Order> => {
            executions++
            return { id: `order-${event.i}`, total: 42 }
          },
          {
            persistenceStore: new CachePersistenceLayer({ client: cacheClient }),
            config,
            keyPrefix: `${runPrefix}:powertools`
          }
        )
      }
      const powertoolsKeyOnly = powertools(powertoolsClient)
      const event = (key: string, i: number): OrderEvent => ({ key, sku: "mug", quantity: 2, i })

      // Completed keys for the replays.
      await storageRuntime.runPromise(order(-1).pipe(keyOnly("replay")))
      await storageRuntime.runPromise(order(-1).pipe(withFingerprint("replay-fp")))
      await powertoolsKeyOnly(event("replay", -1))

      const ours = {
        first: {
          name: "ours: first call, key only",
          call: (i: number) => storageRuntime.runPromise(order(i).pipe(keyOnly(`first-${i}`))),
          commands: { evalsha: 2 },
          executions: 1,
          check: (result: unknown, i: number) => sameOrder("first call", `order-${i}`)(result)
        },
        firstFingerprint: {
          name: "ours: first call, fingerprint + Schema",
          call: (i: number) => storageRuntime.runPromise(order(i).pipe(withFingerprint(`first-fp-${i}`))),
          commands: { evalsha: 2 },
          executions: 1,
          check: (result: unknown, i: number) => sameOrder("first call", `order-${i}`)(result)
        },
        replay: {
          name: "ours: replay, key only",
          call: (i: number) => storageRuntime.runPromise(order(i).pipe(keyOnly("replay"))),
          commands: { evalsha: 1 },
          executions: 0,
          check: sameOrder("replay", "order--1")
        },
        replayFingerprint: {
          name: "ours: replay, fingerprint + Schema",
          call: (i: number) => storageRuntime.runPromise(order(i).pipe(withFingerprint("replay-fp"))),
          commands: { evalsha: 1 },
          executions: 0,
          check: sameOrder("replay", "order--1")
        }
      } satisfies Record<string, Checked>
      const theirs = (cacheClient: typeof powertoolsClient) => {
        const keyOnlyFn = cacheClient === powertoolsClient ? powertoolsKeyOnly : powertools(cacheClient)
        return {
          first: {
            name: "Powertools: first call, key only",
            call: (i: number) => keyOnlyFn(event(`first-${i}`, i)),
            commands: { set: 2 },
            executions: 1,
            check: (result: unknown, i: number) => sameOrder("first call", `order-${i}`)(result)
          },
          replay: {
            name: "Powertools: replay, key only",
            call: (i: number) => keyOnlyFn(event("replay", i)),
            commands: { set: 1, get: 1 },
            executions: 0,
            check: sameOrder("replay", "order--1")
          }
        } satisfies Record<string, Checked>
      }
      const powertoolsCases = theirs(powertoolsClient)
      // Our own two scripts sent straight through ioredis, with none of the library around them:
      // the least a first call and a replay can cost with one script per protocol step here.
      const scripts = client as unknown as StorageScripts
      const rawPayload = Buffer.from(JSON.stringify({ id: "order-0", total: 42 }))
      const rawRecord = (name: string) => `${runPrefix}:raw:{${name}}`
      const rawFirst = async (name: string) => {
        const record = rawRecord(name)
        const token = `token-${name}`
        await scripts.effectIdempotencyAcquireBuffer(record, `${record}:fence`, 30_000, token, "", name, 3_630_000)
        const committed = await scripts.effectIdempotencyCommit(
          record,
          `${record}:fence`,
          token,
          "success",
          rawPayload,
          86_400_000,
          90_000_000
        )
        invariant(committed === 1, `the raw commit of ${name} answered ${committed}`)
      }
      await rawFirst("replay")
      const rawReplay = async () => {
        const reply = await scripts.effectIdempotencyAcquireBuffer(
          rawRecord("replay"),
          `${rawRecord("replay")}:fence`,
          30_000,
          "token-other",
          "",
          "replay",
          3_630_000
        )
        invariant(Array.isArray(reply) && String(reply[0]) === "C", "the raw replay found no completed record")
      }
      const boundCases = {
        first: {
          name: "bound: our 2 scripts raw (no library)",
          call: (i: number) => rawFirst(`first-${i}`),
          commands: { evalsha: 2 }
        },
        replay: {
          name: "bound: our acquire script raw (replay)",
          call: () => rawReplay(),
          commands: { evalsha: 1 }
        }
      } satisfies Record<string, Checked>

      const floorCases = {
        ping: { name: "floor: PING (ioredis, storage's connection)", call: () => client.ping(), commands: { ping: 1 } },
        effectPing: {
          name: "floor: PING in Effect (runPromise, same runtime)",
          call: () => storageRuntime.runPromise(Effect.promise(() => client.ping())),
          commands: { ping: 1 }
        },
        evalsha: {
          name: "floor: EVALSHA, HMGET of a missing key (same)",
          call: () => floors.benchFloorEvalsha(floorKey),
          commands: { evalsha: 1 }
        },
        powertoolsPing: {
          name: "ref: PING (@redis/client, Powertools' conn.)",
          call: () => powertoolsClient.ping(),
          commands: {}
        }
      } satisfies Record<string, Checked>

      // Untimed pass: the commands each case sends, counted on the connection (ioredis: every
      // command goes through `sendCommand`; Powertools: a counting client under a twin of each
      // persistence layer, same keys). Also warms the scripts and the JIT a little.
      const checkCalls = 50
      const counted = new Map<string, number>()
      const proto = Object.getPrototypeOf(client) as { sendCommand: Redis["sendCommand"] }
      const countingClient = {
        get: (key: string) => {
          counted.set("get", (counted.get("get") ?? 0) + 1)
          return powertoolsClient.get(key)
        },
        set: (...args: Parameters<typeof powertoolsClient.set>) => {
          counted.set("set", (counted.get("set") ?? 0) + 1)
          return powertoolsClient.set(...args)
        },
        del: (keys: Array<string>) => {
          counted.set("del", (counted.get("del") ?? 0) + 1)
          return powertoolsClient.del(keys)
        }
      } as unknown as typeof powertoolsClient
      const countedPowertools = theirs(countingClient)
      const verify = async (checked: Checked, callFor: Checked) => {
        counted.clear()
        const before = executions
        for (let i = 0; i < checkCalls; i++) {
          // Far above any i the timing uses, so the check takes its own fresh keys.
          const n = 1_000_000_000 + i
          const result = await callFor.call(n)
          checked.check?.(result, n)
        }
        const ran = executions - before
        invariant(
          checked.executions === undefined || ran === checked.executions * checkCalls,
          `${checked.name}: ${checkCalls} calls ran the body ${ran} times, expected ${
            (checked.executions ?? 0) * checkCalls
          }`
        )
        const perCall = [...counted].map(([name, count]) => `${name} ${fixed(count / checkCalls, 2)}`).join(", ")
        // A SCRIPT FLUSH from elsewhere on the shared server adds one EVAL after a NOSCRIPT: allowed.
        const unexpected = [...counted].filter(([name, count]) =>
          name !== "eval" && count !== (checked.commands[name] ?? 0) * checkCalls
        )
        const missing = Object.entries(checked.commands).filter(([name]) => !counted.has(name))
        invariant(
          unexpected.length === 0 && missing.length === 0,
          `${checked.name}: sent ${perCall || "nothing"} per call, expected ${JSON.stringify(checked.commands)}`
        )
        return perCall
      }
      const commandsPerCall = new Map<string, string>()
      ;(client as unknown as { sendCommand: Redis["sendCommand"] }).sendCommand = function(command, stream) {
        counted.set(command.name.toLowerCase(), (counted.get(command.name.toLowerCase()) ?? 0) + 1)
        return proto.sendCommand.call(this, command, stream)
      }
      try {
        for (
          const checked of [
            floorCases.ping,
            floorCases.effectPing,
            floorCases.evalsha,
            ...Object.values(boundCases),
            ...Object.values(ours)
          ]
        ) {
          commandsPerCall.set(checked.name, await verify(checked, checked))
        }
      } finally {
        delete (client as unknown as { sendCommand?: unknown }).sendCommand
      }
      for (const key of ["first", "replay"] as const) {
        const checked = powertoolsCases[key]
        commandsPerCall.set(checked.name, await verify(checked, countedPowertools[key]))
      }
      commandsPerCall.set(floorCases.powertoolsPing.name, "ping 1.00")

      const cases: Array<Checked> = [
        floorCases.ping,
        floorCases.effectPing,
        floorCases.evalsha,
        floorCases.powertoolsPing,
        ...Object.values(boundCases),
        ...Object.values(ours),
        ...Object.values(powertoolsCases)
      ]
      const stats = await measureInterleaved(config, cases)
      const byName = new Map(stats.map((row) => [row.name, row]))
      const get = (checked: Case): Stats => byName.get(checked.name)!
      const ping = get(floorCases.ping)
      const evalsha = get(floorCases.evalsha)

      console.log(
        `\nredis: one call at a time (${config.iterations} timed per case after ${config.warmup} warm-up, ` +
          `in 10 interleaved slices; ratios against the floors' median and p99)`
      )
      printRows(
        [
          "case",
          "median µs",
          "p99 µs",
          "calls/s",
          "median ×PING",
          "p99 ×PING",
          "median ×EVALSHA",
          "p99 ×EVALSHA",
          "commands / call"
        ],
        stats.map((row) => [
          row.name,
          fixed(row.median, 1),
          fixed(row.p99, 1),
          fixed(row.opsPerSecond, 0),
          ratio(row.median, ping.median),
          ratio(row.p99, ping.p99),
          ratio(row.median, evalsha.median),
          ratio(row.p99, evalsha.p99),
          commandsPerCall.get(row.name) ?? ""
        ])
      )

      // The issue allows either floor (a PING or a trivial EVALSHA); both are printed. The bound
      // rows are what no client can beat here: our own scripts with no library around them.
      console.log(
        `\nredis: targets (issue 3), medians over the PING floor (${fixed(ping.median, 1)} µs) ` +
          `and over the trivial EVALSHA floor (${fixed(evalsha.median, 1)} µs)`
      )
      const verdict = (checked: Case, target: number) => {
        const row = get(checked)
        const overPing = row.median / ping.median
        const overEvalsha = row.median / evalsha.median
        return [
          row.name,
          `≤ ${fixed(target, 1)}×`,
          `${fixed(overPing, 2)}×`,
          overPing <= target ? "PASS" : "MISS",
          `${fixed(overEvalsha, 2)}×`,
          overEvalsha <= target ? "PASS" : "MISS"
        ]
      }
      printRows(
        ["case", "target", "×PING", "verdict", "×EVALSHA", "verdict"],
        [
          verdict(ours.first, targets.first),
          verdict(ours.firstFingerprint, targets.first),
          verdict(boundCases.first, targets.first),
          verdict(ours.replay, targets.replay),
          verdict(ours.replayFingerprint, targets.replay),
          verdict(boundCases.replay, targets.replay)
        ]
      )
      const effectPing = get(floorCases.effectPing)
      const rawFirstRow = get(boundCases.first)
      const rawReplayRow = get(boundCases.replay)
      console.log(
        `where a first call's median goes: the two scripts raw ${fixed(rawFirstRow.median, 1)} µs ` +
          `(of which Redis-side script work ≈ ${fixed(rawFirstRow.median - 2 * ping.median, 1)} µs over 2 PINGs), ` +
          `the Effect runtime's own call ${fixed(effectPing.median - ping.median, 1)} µs, ` +
          `the library ${
            fixed(get(ours.first).median - rawFirstRow.median - (effectPing.median - ping.median), 1)
          } µs; ` +
          `a replay's: the script raw ${fixed(rawReplayRow.median, 1)} µs, the library ` +
          `${fixed(get(ours.replay).median - rawReplayRow.median - (effectPing.median - ping.median), 1)} µs`
      )

      console.log("\nredis: ours against AWS Powertools (makeIdempotent + CachePersistenceLayer), same Redis")
      const against = (label: string, our: Case, their: Case) => {
        const a = get(our)
        const b = get(their)
        return [
          label,
          fixed(a.median, 1),
          fixed(b.median, 1),
          fixed(a.median / b.median, 2),
          fixed(a.p99, 1),
          fixed(b.p99, 1),
          fixed(a.p99 / b.p99, 2)
        ]
      }
      printRows(
        [
          "workload",
          "ours median µs",
          "theirs median µs",
          "ours/theirs median",
          "ours p99 µs",
          "theirs p99 µs",
          "ours/theirs p99"
        ],
        [
          against("first call, key only", ours.first, powertoolsCases.first),
          against("replay, key only", ours.replay, powertoolsCases.replay)
        ]
      )
      console.log(
        "(Powertools' payload validation is not measured: in 2.35.0 its cache layer drops the validation hash " +
          "when a record completes, so validated replays fail; aws-powertools/powertools-lambda-typescript#5705)"
      )
    } finally {
      // Our runtime first (it closes the layer's own subscriber connection), then the keys, then
      // the clients.
      await dispose?.()
      try {
        if (client.status === "ready") {
          const removed = await removeKeys(client, `${runPrefix}*`)
          const left = await removeKeys(client, `${runPrefix}*`)
          console.log(
            `\nredis: removed ${removed} keys under ${runPrefix}*${
              left === 0 ? "" : ` (${left} more on a second pass)`
            }`
          )
        }
      } finally {
        client.disconnect()
        try {
          powertoolsClient.destroy()
        } catch {
          // Never opened.
        }
      }
    }
  }
}

/** Removes every key matching `pattern` (SCAN + UNLINK), returning how many. */
const removeKeys = async (client: Redis, pattern: string): Promise<number> => {
  let cursor = "0"
  let removed = 0
  do {
    const [next, keys] = await client.scan(cursor, "MATCH", pattern, "COUNT", 1000)
    cursor = next
    if (keys.length > 0) removed += await client.unlink(...keys)
  } while (cursor !== "0")
  return removed
}
