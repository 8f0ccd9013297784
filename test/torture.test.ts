/**
 * The reduced torture of `npm test`: on Redis (its own throw-away server), PostgreSQL, MariaDB and
 * a SQLite file, 4 worker processes call 40 keys 10 times each through `Idempotent.wrap` while the
 * killer SIGKILLs each worker once at a seeded random moment and restarts it (and, on Redis and
 * PostgreSQL, cuts the workers' storage connections once). From the workers' logs and the store:
 * no key ran twice while a lease was valid, no key is stuck, fences grow per key, and every caller
 * got the value the store holds. `npm run torture` runs the full size (see torture/index.ts).
 * `TORTURE_SEED` pins the seed; the default is fixed.
 */
import { describe, expect, it } from "@effect/vitest"
import { Effect } from "effect"
import { type Backend, backends } from "../torture/protocol.js"
import { table } from "../torture/report.js"
import { reducedSize, runTorture } from "../torture/run.js"

const seed = Number(process.env.TORTURE_SEED ?? 20_261_202)

describe("torture (reduced)", () => {
  it.each(backends)("%s: kills leave no double run, no stuck key, fences growing", async (backend: Backend) => {
    const result = await Effect.runPromise(runTorture(reducedSize(backend, seed)))
    const report = `seed ${seed}\n${table([result])}\n${result.problems.join("\n")}`
    // One round kills each of the 4 workers once, unless they all finished first.
    expect(result.kills, report).toBeGreaterThanOrEqual(1)
    expect(result.connectionKills, report).toBe(backend === "redis" || backend === "postgres" ? 1 : 0)
    expect(result.runs, report).toBeGreaterThanOrEqual(result.keys)
    expect(
      {
        doubleRuns: result.doubleRuns,
        stuckKeys: result.stuckKeys,
        fences: result.fenceErrors,
        values: result.valueMismatches
      },
      report
    ).toEqual({ doubleRuns: 0, stuckKeys: 0, fences: 0, values: 0 })
  }, 180_000)
})
