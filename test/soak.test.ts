/**
 * The soak of bench/soak.ts at a reduced size: after 6,000 mixed calls (duplicates, typed
 * failures, defects, interruptions, timeouts, lost leases) and a settle period, nothing the calls
 * held is still held. Counts only: the heap is printed with the table, never asserted.
 */
import { assert, describe, it } from "@effect/vitest"
import { formatSoak, runSoak } from "../bench/soak.js"

const calls = 6_000
const seed = process.env.SOAK_SEED === undefined ? 20_240_601 : Number(process.env.SOAK_SEED)

describe("soak", () => {
  it(`${calls} mixed calls leave no flight, watcher, entry, fiber or timer behind (seed ${seed})`, async () => {
    const result = await runSoak({ calls, seed })
    const table = formatSoak(result)
    console.log(table)
    const row = (metric: string) => {
      const found = result.rows.find((candidate) => candidate.metric === metric)
      if (found === undefined) return assert.fail(`no "${metric}" row in\n${table}`)
      return found
    }
    assert.isAtLeast(result.calls, calls)
    assert.deepStrictEqual(result.anomalies, {}, table)
    for (const metric of ["local flights", "store watchers", "store in-flight keys", "store records", "live fibers"]) {
      assert.strictEqual(row(metric).after, 0, `${metric} after the soak\n${table}`)
    }
    const timers = row("pending timers (incl. unref'd)")
    assert.strictEqual(timers.after, timers.baseline, `pending timers after the soak\n${table}`)
    // Every kind of scenario ran, and the ones that test a release did release.
    for (
      const outcome of ["interrupted: interrupted", "timeout: TimeoutException", "lease expiry: IdempotencyLeaseLost"]
    ) {
      assert.isAbove(result.outcomes[outcome] ?? 0, 0, `no "${outcome}" in\n${table}`)
    }
  }, 120_000)
})
