/**
 * SQL storage: what a first call and a replay cost next to one database round trip, on the
 * machine's PostgreSQL (DATABASE_URL, default `postgres://postgres@127.0.0.1:5432/test`) and on a
 * SQLite file in a temporary directory.
 *
 * - Floor, measured in the same run on the very pool the storage uses, through the same runtime:
 *   a raw `SELECT 1`.
 * - Our cases through `Idempotent.wrap`: a first call (fresh key: acquire, run, commit) and a
 *   replay (a completed key), as multiples of the floor's median and p99.
 *
 * The cases of a dialect are timed in interleaved slices, so load that comes and goes on a shared
 * machine falls on all of them alike. Before the timing, an untimed pass checks that a first call
 * runs its body once and a replay does not run it. The bench table is unique to the run and
 * dropped at the end (also when the run fails); the SQLite file's directory is removed.
 */
import { SqlClient, type SqlError } from "@effect/sql"
import { PgClient } from "@effect/sql-pg"
import { SqliteClient } from "@effect/sql-sqlite-node"
import { Cause, Effect, Layer, ManagedRuntime, Redacted, Runtime } from "effect"
import { Idempotent } from "effect-idempotency"
import * as SqlStorage from "effect-idempotency/Storage/Sql"
import { mkdtempSync, rmSync } from "node:fs"
import { tmpdir } from "node:os"
import { join } from "node:path"
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

const pgUrl = process.env.DATABASE_URL ?? "postgres://postgres@127.0.0.1:5432/test"

/** The URL without its password, for printing. */
const display = (raw: string): string => {
  try {
    const parsed = new URL(raw)
    if (parsed.password !== "") parsed.password = "***"
    return parsed.toString()
  } catch {
    return "(unparseable DATABASE_URL)"
  }
}

/** An error's message and its cause's (the driver's: ECONNREFUSED, ...), through a FiberFailure. */
const describe = (error: unknown): string => {
  const cause = Runtime.isFiberFailure(error) ? Cause.squash(error[Runtime.FiberFailureCauseId]) : error
  if (cause instanceof Error) {
    const inner = (cause as { cause?: unknown }).cause
    const innerText = inner instanceof Error
      ? inner.message || (inner as { code?: string }).code || inner.name
      : undefined
    return `${cause.message || cause.name}${innerText === undefined ? "" : `: ${innerText}`}`
  }
  return String(cause)
}

interface Order {
  readonly id: string
  readonly total: number
}

interface Target {
  readonly name: string
  /** Printed once, before the tables. */
  readonly description: string
  readonly client: Layer.Layer<SqlClient.SqlClient, unknown>
  /** Says what to do when the client cannot be built. */
  readonly unreachable: (cause: unknown) => Error
  readonly release?: () => void
}

const postgres = (): Target => ({
  name: "postgres",
  description: `PostgreSQL at ${display(pgUrl)}, pool of 2`,
  client: PgClient.layer({ url: Redacted.make(pgUrl), maxConnections: 2, connectTimeout: "3 seconds" }),
  unreachable: (cause) =>
    new Error(
      `cannot reach PostgreSQL at ${display(pgUrl)} (${describe(cause)}). ` +
        "Start it or point DATABASE_URL at one."
    )
})

const sqlite = (): Target => {
  const dir = mkdtempSync(join(tmpdir(), "effect-idempotency-bench-"))
  const filename = join(dir, "bench.db")
  return {
    name: "sqlite",
    description: `SQLite file ${filename} (WAL)`,
    client: SqliteClient.layer({ filename }),
    unreachable: (cause) => new Error(`cannot open SQLite file ${filename} (${describe(cause)})`),
    release: () => rmSync(dir, { recursive: true, force: true })
  }
}

const checkCalls = 50

/** Times one dialect; returns its rows, the floor first. */
const runTarget = async (target: Target, config: BenchConfig): Promise<Array<Stats>> => {
  const table = `idem_bench_${process.pid}_${Date.now().toString(36)}`
  // One memo map: the client is built once and shared by the runtime that drops the table and the
  // runtime of the storage, and closed when the last of them is disposed.
  const memoMap = Effect.runSync(Layer.makeMemoMap)
  const clientRuntime = ManagedRuntime.make(target.client, memoMap)
  let disposeStorage: (() => Promise<void>) | undefined
  let tableMayExist = false
  try {
    try {
      await clientRuntime.runtime()
    } catch (error) {
      throw target.unreachable(error)
    }
    tableMayExist = true
    const runtime = ManagedRuntime.make(
      SqlStorage.layer({ table }).pipe(Layer.provideMerge(target.client)),
      memoMap
    )
    disposeStorage = () => runtime.dispose()
    await runtime.runtime()

    let executions = 0
    const order = (i: number) =>
      Effect.sync((): Order => {
        executions++
        return { id: `order-${i}`, total: 42 }
      })
    const wrap = (key: string) => Idempotent.wrap({ key })
    const selectOne = Effect.flatMap(SqlClient.SqlClient, (sql) => sql`SELECT 1 AS one`)

    await runtime.runPromise(order(-1).pipe(wrap("replay")))

    const sameOrder = (label: string, expected: string) => (result: unknown) =>
      invariant(
        typeof result === "object" && result !== null && (result as Order).id === expected &&
          (result as Order).total === 42,
        `${target.name} ${label} returned ${JSON.stringify(result)}, not the order ${expected}`
      )

    const floor: Case = {
      name: `${target.name}: floor, SELECT 1 (same pool)`,
      call: () => runtime.runPromise(selectOne)
    }
    const first: Case = {
      name: `${target.name}: first call`,
      call: (i) => runtime.runPromise(order(i).pipe(wrap(`first-${i}`)))
    }
    const replay: Case = {
      name: `${target.name}: replay`,
      call: (i) => runtime.runPromise(order(i).pipe(wrap("replay")))
    }

    // Untimed pass: the floor answers, a first call runs the body once, a replay never.
    const rows = await runtime.runPromise(selectOne)
    invariant(
      rows.length === 1 && Number((rows[0] as { one: unknown }).one) === 1,
      `${target.name} SELECT 1 returned ${JSON.stringify(rows)}`
    )
    for (const [checked, perCall, expected] of [[first, 1, "fresh"], [replay, 0, "order--1"]] as const) {
      const before = executions
      for (let i = 0; i < checkCalls; i++) {
        // Far above any i the timing uses, so the check takes its own fresh keys.
        const n = 1_000_000_000 + i
        sameOrder(checked.name, expected === "fresh" ? `order-${n}` : expected)(await checked.call(n))
      }
      const ran = executions - before
      invariant(
        ran === perCall * checkCalls,
        `${checked.name}: ${checkCalls} calls ran the body ${ran} times, expected ${perCall * checkCalls}`
      )
    }
    // A first call with a key already used replays it.
    const beforeRepeat = executions
    sameOrder(`${target.name} repeated first call`, "order-1000000000")(await first.call(1_000_000_000))
    invariant(executions === beforeRepeat, `${target.name}: a repeated first-call key ran its body again`)

    return await measureInterleaved(config, [floor, first, replay])
  } finally {
    try {
      // The storage first (its cleanup fiber and, on PostgreSQL, its listener), then the table.
      await disposeStorage?.()
      if (tableMayExist) {
        // And on PostgreSQL the functions and the leases table the storage made with the table.
        await clientRuntime.runPromise(
          Effect.flatMap(SqlClient.SqlClient, (sql) => {
            const dropFunctions: Effect.Effect<unknown, SqlError.SqlError> = sql.onDialectOrElse({
              pg: () =>
                Effect.zipRight(
                  sql`DROP FUNCTION IF EXISTS ${sql(`${table}_acquire_v1`)}, ${sql(`${table}_commit_v1`)}`,
                  sql`DROP TABLE IF EXISTS ${sql(`${table}_leases`)}`
                ),
              orElse: () => Effect.void
            })
            return Effect.zipRight(sql`DROP TABLE IF EXISTS ${sql(table)}`, dropFunctions)
          })
        )
        console.log(`${target.name}: dropped table ${table}`)
      }
    } finally {
      await clientRuntime.dispose()
      target.release?.()
    }
  }
}

const ratio = (value: number, floor: number) => `${fixed(value / floor, 2)}×`

export const suite: Suite = {
  name: "sql",
  // Every call is one or more database round trips; keeps the suite well under a minute.
  defaults: { iterations: 2_000, warmup: 200 },
  run: async (config: BenchConfig) => {
    const results: Array<Array<Stats>> = []
    const failures: Array<string> = []
    for (const make of [postgres, sqlite]) {
      const target = make()
      console.log(`\nsql: ${target.description}`)
      try {
        results.push(await runTarget(target, config))
      } catch (error) {
        failures.push(`${target.name}: ${describe(error)}`)
      }
    }

    if (results.length > 0) {
      console.log(
        `\nsql: one call at a time (${config.iterations} timed per case after ${config.warmup} warm-up, ` +
          "in 10 interleaved slices per dialect; ratios against the same dialect's SELECT 1 floor)"
      )
      printRows(
        ["case", "median µs", "p99 µs", "calls/s", "median ×SELECT 1", "p99 ×SELECT 1"],
        results.flatMap((stats) => {
          const floor = stats[0]!
          return stats.map((row) => [
            row.name,
            fixed(row.median, 1),
            fixed(row.p99, 1),
            fixed(row.opsPerSecond, 0),
            ratio(row.median, floor.median),
            ratio(row.p99, floor.p99)
          ])
        })
      )
    }
    if (failures.length > 0) throw new Error(failures.join("; "))
  }
}
