/**
 * One backend's torture run: starts the store (a throw-away redis-server, a fresh table on the
 * machine's PostgreSQL or MariaDB, a SQLite file), starts the workers as separate processes,
 * follows the killer's plan (SIGKILL workers and restart them, cut the store's connections, restart
 * the Redis server), waits for every call to be answered, lets a `verify` worker read back every
 * key, and checks the logs (`report.ts`).
 */
import { SqlClient } from "@effect/sql"
import { Duration, Effect, Fiber, Layer, Option, type Scope } from "effect"
import { appendFileSync, readFileSync, writeFileSync } from "node:fs"
import { join } from "node:path"
import * as SqlStorage from "../src/Storage/Sql.js"
import { redisCli, server as redisServer } from "../test/fixtures/redisServers.js"
import { dropTable, mysqlClient, pgClient, sqliteClient, tempDir, uniqueTable } from "../test/fixtures/sqlClients.js"
import { spawnWorker, type Worker, WorkerError } from "../test/fixtures/workerProcess.js"
import { type Fault, plan } from "./killer.js"
import type { Backend, LogLine, StoreConfig, WorkerConfig, WorkerMessage } from "./protocol.js"
import { analyze, type BackendResult, type Incarnation } from "./report.js"
import { storeLayer, verifyKeys } from "./store.js"

export interface TortureOptions {
  readonly backend: Backend
  readonly seed: number
  readonly workers: number
  readonly keys: number
  readonly duplicates: number
  /** Kill rounds: each SIGKILLs every worker once, at a random moment. */
  readonly rounds: number
  /** Connection kills (Redis, PostgreSQL only). */
  readonly connectionKills: number
  /** Server restarts (Redis only: its own throw-away server). */
  readonly serverRestarts: number
  readonly concurrency: number
  readonly leaseMillis: number
  readonly sleepMaxMillis: number
  readonly longRunEvery: number
  readonly gapMillis: readonly [number, number]
  readonly downMillis: readonly [number, number]
  /** The whole run fails past this. */
  readonly timeout: Duration.DurationInput
  /** Where the logs go, kept afterwards. Default: a temporary folder, removed. */
  readonly logDir?: string | undefined
  /** Progress lines. */
  readonly log?: ((line: string) => void) | undefined
}

/** The store of one run and what the killer can do to it. */
interface Store {
  readonly config: StoreConfig
  readonly killConnections: Effect.Effect<void, unknown>
  readonly restartServer: Effect.Effect<void, unknown>
}

const createTable = (table: string) => Effect.scoped(Layer.build(SqlStorage.layer({ table })))

const store = (backend: Backend, dir: string): Effect.Effect<Store, unknown, Scope.Scope> => {
  const table = uniqueTable(`torture_${backend}`)
  const unsupported = (what: string) => Effect.dieMessage(`${what} is not planned on ${backend}`)
  switch (backend) {
    case "redis":
      return Effect.map(
        // Its own server, with every write in an fsync'd append-only file so that a restart keeps
        // records, leases and fences as they were.
        redisServer({ args: ["--appendonly", "yes", "--appendfsync", "always"] }),
        (server) => ({
          config: { backend, url: server.url, prefix: `torture:${table}:` },
          killConnections: Effect.asVoid(redisCli(server.port, ["client", "kill", "type", "normal", "skipme", "yes"])),
          restartServer: server.restart
        })
      )
    case "postgres": {
      const applicationName = `torture-${table}`
      return Effect.gen(function*() {
        const context = yield* Layer.build(pgClient({ applicationName: `${applicationName}-admin`, maxConnections: 2 }))
        const sql = yield* Effect.provide(SqlClient.SqlClient, context)
        yield* Effect.provide(createTable(table), context)
        yield* Effect.addFinalizer(() => Effect.ignore(Effect.provide(dropTable(table), context)))
        return {
          config: { backend, table, applicationName },
          killConnections: Effect.asVoid(
            sql`SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = ${applicationName}`
          ),
          restartServer: unsupported("a server restart")
        } satisfies Store
      })
    }
    case "mariadb":
      return Effect.gen(function*() {
        const context = yield* Layer.build(mysqlClient({ maxConnections: 2 }))
        yield* Effect.provide(createTable(table), context)
        yield* Effect.addFinalizer(() => Effect.ignore(Effect.provide(dropTable(table), context)))
        return {
          config: { backend, table },
          killConnections: unsupported("a connection kill"),
          restartServer: unsupported("a server restart")
        } satisfies Store
      })
    case "sqlite": {
      const filename = join(dir, "torture.sqlite")
      return Effect.gen(function*() {
        yield* Effect.scoped(
          Effect.flatMap(Layer.build(sqliteClient(filename)), (context) => Effect.provide(createTable(table), context))
        )
        return {
          config: { backend, table, filename },
          killConnections: unsupported("a connection kill"),
          restartServer: unsupported("a server restart")
        } satisfies Store
      })
    }
  }
}

/** The calls a worker's earlier incarnations got answers to, as `"key:i"`. */
const answered = (files: ReadonlyArray<string>): Array<string> => {
  const done = new Set<string>()
  for (const file of files) {
    for (const line of readFileSync(file, "utf8").split("\n")) {
      if (line.length === 0) continue
      try {
        const parsed = JSON.parse(line) as LogLine
        if (parsed.e === "call" && parsed.ok) done.add(`${parsed.k}:${parsed.i}`)
      } catch {
        // A line cut by the kill.
      }
    }
  }
  return [...done]
}

type MutableIncarnation = { -readonly [K in keyof Incarnation]: Incarnation[K] }

interface Slot {
  current: Option.Option<
    { readonly worker: Worker<WorkerMessage>; readonly incarnation: MutableIncarnation; readonly readyAt: number }
  >
  finished: boolean
  killedAt: number | undefined
  downMillis: number
}

export const runTorture = (options: TortureOptions): Effect.Effect<BackendResult, unknown> =>
  Effect.scoped(Effect.gen(function*() {
    const say = options.log ?? (() => undefined)
    const dir = options.logDir ?? (yield* tempDir(`torture-${options.backend}`))
    const target = yield* store(options.backend, dir)
    const incarnations: Array<Incarnation> = []
    const slots: Array<Slot> = Array.from(
      { length: options.workers },
      () => ({ current: Option.none(), finished: false, killedAt: undefined, downMillis: 0 })
    )
    const base = {
      store: target.config,
      seed: options.seed,
      keys: options.keys,
      duplicates: options.duplicates,
      concurrency: options.concurrency,
      leaseMillis: options.leaseMillis,
      sleepMaxMillis: options.sleepMaxMillis,
      longRunEvery: options.longRunEvery,
      attempts: 1000
    }
    const startedAt = Date.now()
    let crashes = 0
    let startFailures = 0

    /** Runs worker `index` to its end, starting it again each time it is killed. */
    const supervise = (index: number) =>
      Effect.gen(function*() {
        const slot = slots[index]!
        for (let incarnation = 0;; incarnation++) {
          const file = join(dir, `w${index}-${incarnation}.log`)
          const config: WorkerConfig = {
            ...base,
            mode: "calls",
            index,
            incarnation,
            logFile: file,
            done: answered(incarnations.filter((earlier) => earlier.worker === index).map((earlier) => earlier.file))
          }
          const record: MutableIncarnation = {
            file,
            worker: index,
            diedAt: undefined
          }
          incarnations.push(record)
          slot.killedAt = undefined
          let started = false
          const ended = yield* Effect.either(Effect.scoped(Effect.gen(function*() {
            const worker = yield* spawnWorker<WorkerMessage>("../../torture/worker.ts", config)
            yield* worker.next("ready", "2 minutes")
            started = true
            slot.current = Option.some({ worker, incarnation: record, readyAt: Date.now() })
            return yield* worker.next("done", options.timeout)
          })))
          slot.current = Option.none()
          if (ended._tag === "Right") {
            slot.finished = true
            return
          }
          if (!started) {
            // Its storage layer could not be built (the Redis server is restarting): it made no
            // call. Start it again, as a service's supervisor would.
            startFailures++
            record.diedAt = Date.now()
            say(`${options.backend}: worker ${index} could not start: ${ended.left.message.split("\n")[0]}`)
            if (startFailures > 40) return yield* ended.left
            yield* Effect.sleep("500 millis")
            continue
          }
          if (slot.killedAt === undefined) {
            // Not the killer's doing: report it, and go on as after a kill.
            crashes++
            record.diedAt = Date.now()
            say(`${options.backend}: worker ${index} died unasked: ${ended.left.message}`)
            if (crashes > 3) return yield* ended.left
          }
          yield* Effect.sleep(Duration.millis(slot.downMillis))
        }
      })

    const faults = plan({
      seed: options.seed,
      workers: options.workers,
      rounds: options.rounds,
      connectionKills: options.connectionKills,
      serverRestarts: options.serverRestarts,
      gapMillis: options.gapMillis,
      downMillis: options.downMillis
    })
    let kills = 0
    let connectionKills = 0
    let serverRestarts = 0

    const apply = (fault: Fault, pick: () => number) =>
      Effect.gen(function*() {
        switch (fault._tag) {
          case "KillWorker": {
            // Waits for a running worker (one may be restarting) unless all have finished.
            // A worker just restarted is given a moment to get back into its calls first.
            const running = () =>
              slots.flatMap((slot, index) =>
                Option.isSome(slot.current) && !slot.finished && Date.now() - slot.current.value.readyAt >= 300
                  ? [index]
                  : []
              )
            yield* Effect.repeat(Effect.sleep("20 millis"), {
              until: () => running().length > 0 || slots.every((slot) => slot.finished)
            })
            const candidates = running()
            if (candidates.length === 0) return
            const index = candidates.includes(fault.worker)
              ? fault.worker
              : candidates[Math.floor(pick() * candidates.length)]!
            const slot = slots[index]!
            if (Option.isNone(slot.current)) return
            const { incarnation, worker } = slot.current.value
            slot.downMillis = fault.downMillis
            slot.current = Option.none()
            slot.killedAt = Date.now()
            yield* Effect.ignore(worker.kill("SIGKILL"))
            // Seen dead: no run of it goes on past this moment.
            incarnation.diedAt = Date.now()
            kills++
            say(`${options.backend}: killed worker ${index} (pid ${worker.pid}) at +${fault.atMillis} ms`)
            return
          }
          case "KillConnections":
            yield* target.killConnections
            connectionKills++
            say(`${options.backend}: cut the store's connections at +${fault.atMillis} ms`)
            return
          case "RestartServer":
            yield* target.restartServer
            serverRestarts++
            say(`${options.backend}: restarted the server at +${fault.atMillis} ms`)
            return
        }
      })

    const supervisors = yield* Effect.forkScoped(
      Effect.forEach(slots, (_, index) => supervise(index), { concurrency: "unbounded", discard: true })
    )
    // The plan's clock starts once every worker is up.
    yield* Effect.repeat(
      Effect.sleep("50 millis"),
      { until: () => slots.every((slot) => Option.isSome(slot.current) || slot.finished) }
    )
    const planStart = Date.now()
    let seed = options.seed
    const pick = () => {
      seed = (seed * 1103515245 + 12345) >>> 0
      return seed / 4294967296
    }
    const killer = yield* Effect.forkScoped(Effect.forEach(faults, (fault) =>
      Effect.zipRight(
        Effect.suspend(() => Effect.sleep(Duration.millis(Math.max(0, planStart + fault.atMillis - Date.now())))),
        apply(fault, pick)
      ), { discard: true }))
    yield* Fiber.join(supervisors).pipe(
      Effect.timeoutFail({
        duration: options.timeout,
        onTimeout: () => new WorkerError({ message: `${options.backend}: workers not done within the timeout` })
      })
    )
    yield* Fiber.interrupt(killer)
    const durationMillis = Date.now() - startedAt
    say(`${options.backend}: calls done in ${durationMillis} ms, verifying`)

    const verifyLog = join(dir, "verify.log")
    writeFileSync(verifyLog, "")
    // Read back from this process, with a storage layer of its own.
    yield* verifyKeys(base, (line) => appendFileSync(verifyLog, `${JSON.stringify(line)}\n`)).pipe(
      Effect.provide(storeLayer(target.config)),
      Effect.timeout("120 seconds")
    )

    return analyze({
      backend: options.backend,
      seed: options.seed,
      incarnations: [...incarnations, { file: verifyLog, worker: -1, diedAt: undefined }],
      verifyLog,
      workers: options.workers,
      keys: options.keys,
      duplicates: options.duplicates,
      leaseMillis: options.leaseMillis,
      kills,
      connectionKills,
      serverRestarts,
      durationMillis
    })
  }))

/** The full size of `npm run torture`. */
export const fullSize = (backend: Backend, seed: number): TortureOptions => ({
  backend,
  seed,
  workers: 4,
  keys: 200,
  duplicates: 10,
  rounds: 3,
  connectionKills: backend === "redis" || backend === "postgres" ? 2 : 0,
  serverRestarts: backend === "redis" ? 1 : 0,
  concurrency: 4,
  leaseMillis: 3000,
  sleepMaxMillis: 400,
  longRunEvery: 50,
  gapMillis: [300, 1200],
  downMillis: [100, 1000],
  timeout: "10 minutes"
})

/** The reduced size `npm test` runs: one kill round, fewer keys. */
export const reducedSize = (backend: Backend, seed: number): TortureOptions => ({
  ...fullSize(backend, seed),
  keys: 40,
  rounds: 1,
  connectionKills: backend === "redis" || backend === "postgres" ? 1 : 0,
  serverRestarts: 0,
  concurrency: 2,
  leaseMillis: 2000,
  gapMillis: [200, 700],
  timeout: "3 minutes"
})
