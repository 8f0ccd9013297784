/**
 * HTTP: what the middleware costs a real server under load. The example's `POST /orders` route
 * (JSON body in, JSON order out, no simulated latency) runs in its own process
 * (`bench/httpServer.ts`), served twice on free loopback ports: bare, and behind
 * `IdempotencyMiddleware`. autocannon, in this process, drives it with 20 connections for 3
 * seconds per case:
 *
 * - (a) no middleware;
 * - (b) middleware, replays: one key for every request (the first runs the handler, every other
 *   gets the stored response);
 * - (c) middleware, first calls: a new key per request (acquire, run, store every time).
 *
 * The cases take turns in 3 rounds of 1 second ((a), (b), (c), (a), ...), so that load that comes
 * and goes on a shared machine falls on each alike. Every case sends the same requests, key header
 * included (the bare server ignores it), so the load generator does the same work in each. The
 * cases run on memory storage, then on Redis (`REDIS_URL`, default `redis://127.0.0.1:6379`, keys
 * under a prefix unique to the run, removed at the end). Each prints requests per second (and its
 * slowest and fastest round), latency p50 and p99 over every answer (timed per response, below the
 * millisecond), and requests per second as a multiple of (a)'s in the same run. Every round checks
 * its invariants first: only 2xx answers, no errors, and the handler ran as often as it should
 * (once in all for (b), once per answer for (c)).
 *
 * BENCH_HTTP_SECONDS (default 3), BENCH_HTTP_ROUNDS (default 3) and BENCH_HTTP_CONNECTIONS
 * (default 20) change the load.
 */
import autocannon from "autocannon"
import { Redis } from "ioredis"
import { type ChildProcess, spawn } from "node:child_process"
import { fileURLToPath } from "node:url"
import { fixed, invariant, printRows, type Suite } from "./harness.js"

const redisUrl = process.env.REDIS_URL ?? "redis://127.0.0.1:6379"
const startTimeoutMillis = 60_000

const positiveInt = (name: string, fallback: number): number => {
  const raw = process.env[name]
  if (raw === undefined || raw === "") return fallback
  const value = Number(raw)
  if (!Number.isInteger(value) || value <= 0) throw new Error(`${name} must be a positive integer, got "${raw}"`)
  return value
}

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

const message = (error: unknown): string => error instanceof Error ? error.message : String(error)

// --- The server process ------------------------------------------------------------------------

interface Server {
  readonly bare: string
  readonly guarded: string
  readonly stop: () => Promise<void>
}

/** Starts `bench/httpServer.ts` with the same tsx loader this process runs under. */
const startServer = (storage: "memory" | "redis", env: Record<string, string>): Promise<Server> =>
  new Promise((resolve, reject) => {
    const script = fileURLToPath(new URL("./httpServer.ts", import.meta.url))
    const child: ChildProcess = spawn(process.execPath, [...process.execArgv, script, storage], {
      env: { ...process.env, ...env },
      stdio: ["ignore", "pipe", "pipe"]
    })
    let stdout = ""
    let stderr = ""
    let started = false
    const exited = new Promise<void>((done) => child.once("exit", () => done()))
    const stop = async () => {
      if (child.exitCode !== null || child.signalCode !== null) return
      child.kill("SIGTERM")
      const timer = setTimeout(() => child.kill("SIGKILL"), 5_000)
      await exited
      clearTimeout(timer)
    }
    const fail = (reason: string) => {
      clearTimeout(timer)
      void stop()
      reject(new Error(`the ${storage} server ${reason}${stderr.trim() === "" ? "" : `:\n${stderr.trim()}`}`))
    }
    const timer = setTimeout(() => fail(`did not listen within ${startTimeoutMillis / 1000} s`), startTimeoutMillis)
    child.stderr!.on("data", (chunk: Buffer) => {
      stderr += chunk.toString()
    })
    child.stdout!.on("data", (chunk: Buffer) => {
      stdout += chunk.toString()
      const line = stdout.split("\n")
      if (started || line.length < 2) return
      started = true
      clearTimeout(timer)
      try {
        const ports = JSON.parse(line[0]!) as { bare: number; guarded: number }
        resolve({ bare: `http://127.0.0.1:${ports.bare}`, guarded: `http://127.0.0.1:${ports.guarded}`, stop })
      } catch {
        fail(`printed ${JSON.stringify(line[0])} instead of its ports`)
      }
    })
    child.once("exit", (code, signal) => {
      if (!started) fail(`exited (${signal ?? `code ${code}`}) before listening`)
    })
  })

const handlerRuns = async (url: string): Promise<number> => {
  const response = await fetch(`${url}/stats`)
  const body = await response.json() as { handlerRuns: { orders: number } }
  return body.handlerRuns.orders
}

// --- One case ----------------------------------------------------------------------------------

/** One run of autocannon: what came back, and each answer's time in milliseconds. */
interface Slice {
  readonly answered: number
  /** Seconds. */
  readonly duration: number
  readonly latencies: Float64Array
  readonly runs: number
}

interface Measured {
  readonly name: string
  readonly requestsPerSecond: number
  /** Requests per second of the slowest and the fastest round. */
  readonly range: readonly [number, number]
  /** Milliseconds, over every answer of every round. */
  readonly p50: number
  readonly p99: number
  readonly answered: number
  readonly runs: number
}

const percentile = (sorted: Float64Array, p: number): number =>
  sorted.length === 0 ? Number.NaN : sorted[Math.min(sorted.length - 1, Math.ceil(p * sorted.length) - 1)]!

const body = JSON.stringify({ sku: "mug", quantity: 1 })

/**
 * Loads `url` for `seconds`, every request with the key `key(n)` (n counts on across calls with the
 * same `key`), and checks that only 2xx came back.
 */
const load = async (
  name: string,
  url: string,
  options: { readonly seconds: number; readonly connections: number; readonly key: (n: number) => string },
  counter: { n: number }
): Promise<Omit<Slice, "runs">> => {
  const headers = { "content-type": "application/json" }
  const instance = autocannon({
    url,
    connections: options.connections,
    duration: options.seconds,
    timeout: 10,
    requests: [{
      method: "POST",
      path: "/orders",
      headers,
      body,
      setupRequest: (request) => ({ ...request, headers: { ...headers, "idempotency-key": options.key(counter.n++) } })
    }]
  })
  // autocannon's own latency histogram counts whole milliseconds: keep each answer's time instead.
  let latencies = new Float64Array(1 << 14)
  let count = 0
  instance.on("response", (_client: unknown, _status: number, _bytes: number, responseTime: number) => {
    if (count === latencies.length) {
      const grown = new Float64Array(latencies.length * 2)
      grown.set(latencies)
      latencies = grown
    }
    latencies[count++] = responseTime
  })
  const result = await instance
  const statuses = Object.entries(result.statusCodeStats).map(([status, { count }]) => `${status}: ${count}`)
  invariant(
    result.errors === 0 && result.timeouts === 0 && result.non2xx === 0 && result["2xx"] > 0,
    `${name}: expected only 2xx answers, got ${statuses.join(", ") || "none"}, ` +
      `${result.errors} errors, ${result.timeouts} timeouts`
  )
  return { answered: result["2xx"], duration: result.duration, latencies: latencies.slice(0, count) }
}

const summarize = (name: string, slices: ReadonlyArray<Slice>): Measured => {
  let answered = 0
  let duration = 0
  let runs = 0
  let total = 0
  for (const slice of slices) {
    answered += slice.answered
    duration += slice.duration
    runs += slice.runs
    total += slice.latencies.length
  }
  const merged = new Float64Array(total)
  let offset = 0
  for (const slice of slices) {
    merged.set(slice.latencies, offset)
    offset += slice.latencies.length
  }
  merged.sort()
  const perRound = slices.map((slice) => slice.answered / slice.duration)
  return {
    name,
    requestsPerSecond: answered / duration,
    range: [Math.min(...perRound), Math.max(...perRound)],
    p50: percentile(merged, 0.5),
    p99: percentile(merged, 0.99),
    answered,
    runs
  }
}

// --- The suite ---------------------------------------------------------------------------------

interface GroupResult {
  readonly storage: string
  readonly bare: Measured
  readonly replays: Measured
  readonly firstCalls: Measured
}

interface Case {
  readonly name: string
  readonly url: string
  readonly key: (n: number) => string
  /** Whether the handler ran as it should for a slice. */
  readonly expectedRuns: (answered: number, runs: number, first: boolean) => boolean
  readonly runsText: string
}

/**
 * Runs the three cases in interleaved rounds ((a), (b), (c), (a), (b), (c), ...), so that load
 * that comes and goes on a shared machine falls on every case alike, and merges each case's rounds.
 */
const runGroup = async (
  storage: string,
  server: Server,
  options: { readonly seconds: number; readonly rounds: number; readonly connections: number; readonly tag: string }
): Promise<GroupResult> => {
  const { connections, rounds } = options
  const seconds = options.seconds / rounds
  const tag = `${options.tag}-${storage}`
  // Requests still in flight when autocannon stops may have run the handler without being answered.
  const oncePerAnswer = (answered: number, runs: number) => runs >= answered && runs <= answered + connections
  const cases: ReadonlyArray<Case> = [
    {
      name: "(a) no middleware",
      url: server.bare,
      key: (n) => `${tag}-a-${n}`,
      expectedRuns: oncePerAnswer,
      runsText: "one run per answer"
    },
    {
      name: "(b) middleware, replays (one key)",
      url: server.guarded,
      key: () => `${tag}-replay`,
      expectedRuns: (_, runs, first) => runs === (first ? 1 : 0),
      runsText: "1 run in the first round, none after"
    },
    {
      name: "(c) middleware, first calls (new key each)",
      url: server.guarded,
      key: (n) => `${tag}-c-${n}`,
      expectedRuns: oncePerAnswer,
      runsText: "one run per answer"
    }
  ]

  // Warm-up, untimed: the JIT, both servers' connections, the storage's scripts.
  await load("warm-up (a)", server.bare, { seconds: 1, connections, key: (n) => `${tag}-warm-a-${n}` }, { n: 0 })
  await load("warm-up (c)", server.guarded, { seconds: 1, connections, key: (n) => `${tag}-warm-c-${n}` }, { n: 0 })

  const slices = cases.map((): Array<Slice> => [])
  const counters = cases.map(() => ({ n: 0 }))
  for (let round = 0; round < rounds; round++) {
    for (let c = 0; c < cases.length; c++) {
      const { expectedRuns, key, name, runsText, url } = cases[c]!
      const before = await handlerRuns(server.guarded)
      const slice = await load(name, url, { seconds, connections, key }, counters[c]!)
      const runs = (await handlerRuns(server.guarded)) - before
      invariant(
        expectedRuns(slice.answered, runs, round === 0),
        `${name}, round ${round + 1}: ${slice.answered} answers, the handler ran ${runs} times; expected ${runsText}`
      )
      slices[c]!.push({ ...slice, runs })
    }
  }
  const [bare, replays, firstCalls] = cases.map(({ name }, c) => summarize(name, slices[c]!)) as [
    Measured,
    Measured,
    Measured
  ]

  printRows(
    ["case", "req/s", "rounds min–max", "p50 ms", "p99 ms", "req/s ×(a)", "answers", "handler runs"],
    [bare, replays, firstCalls].map((row) => [
      row.name,
      fixed(row.requestsPerSecond, 0),
      `${fixed(row.range[0], 0)}–${fixed(row.range[1], 0)}`,
      fixed(row.p50, 2),
      fixed(row.p99, 2),
      `${fixed(row.requestsPerSecond / bare.requestsPerSecond, 2)}×`,
      fixed(row.answered, 0),
      fixed(row.runs, 0)
    ])
  )
  return { storage, bare, replays, firstCalls }
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

export const suite: Suite = {
  name: "http",
  run: async () => {
    const seconds = positiveInt("BENCH_HTTP_SECONDS", 3)
    const connections = positiveInt("BENCH_HTTP_CONNECTIONS", 20)
    const rounds = positiveInt("BENCH_HTTP_ROUNDS", 3)
    const tag = `bench-http-${process.pid}-${Date.now().toString(36)}`
    const prefix = tag
    console.log(
      `\nhttp: POST /orders on 127.0.0.1 (server in its own process), autocannon ${connections} connections, ` +
        `${seconds} s per case in ${rounds} interleaved rounds`
    )

    const redis = new Redis(redisUrl, {
      lazyConnect: true,
      enableOfflineQueue: false,
      maxRetriesPerRequest: 0,
      connectTimeout: 2_000,
      commandTimeout: 2_000,
      retryStrategy: () => null
    })
    // ioredis rejects `connect` with "Connection is closed."; the event says why.
    let lastError: unknown = undefined
    redis.on("error", (error: unknown) => {
      lastError = error
    })
    const servers: Array<Server> = []
    try {
      // Both servers start before any load, so that one's start-up does not fall on the other's cases.
      const [memory, onRedis] = await Promise.allSettled([
        startServer("memory", {}),
        redis.connect().then(
          () => startServer("redis", { REDIS_URL: redisUrl, BENCH_REDIS_PREFIX: prefix }),
          (error: unknown) => {
            throw new Error(
              `cannot reach Redis at ${display(redisUrl)} (${message(lastError ?? error)}); ` +
                "start it (redis-server --daemonize yes --port 6379) or point REDIS_URL at one"
            )
          }
        )
      ])
      for (const started of [memory, onRedis]) if (started.status === "fulfilled") servers.push(started.value)
      const results: Array<GroupResult> = []

      if (memory.status === "rejected") throw memory.reason
      console.log("\nmemory storage")
      results.push(await runGroup("memory", memory.value, { seconds, rounds, connections, tag }))

      if (onRedis.status === "rejected") throw onRedis.reason
      console.log(`\nRedis storage at ${display(redisUrl)}, keys under ${prefix}*`)
      results.push(await runGroup("redis", onRedis.value, { seconds, rounds, connections, tag }))

      console.log("\nthroughput with the middleware, as a multiple of the same route without it (a), same run")
      printRows(
        ["storage", "(a) req/s", "(b) replays", "(c) first calls"],
        results.map((result) => [
          result.storage,
          fixed(result.bare.requestsPerSecond, 0),
          `${fixed(result.replays.requestsPerSecond / result.bare.requestsPerSecond, 2)}×`,
          `${fixed(result.firstCalls.requestsPerSecond / result.bare.requestsPerSecond, 2)}×`
        ])
      )
    } finally {
      await Promise.all(servers.map((server) => server.stop()))
      try {
        if (redis.status === "ready") {
          const removed = await removeKeys(redis, `${prefix}*`)
          console.log(`\nredis: removed ${removed} keys under ${prefix}*`)
        }
      } finally {
        redis.disconnect()
      }
    }
  }
}
