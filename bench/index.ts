/**
 * `npm run bench [suite...]`: runs the benchmark suites, all of them by default, or those named on
 * the command line or in BENCH_ONLY (comma separated). BENCH_ITERATIONS, BENCH_WARMUP and
 * BENCH_BATCHES set how hard each suite pushes. A backend adds its suite to `suites`.
 */
import type { BenchConfig, Suite } from "./harness.js"
import * as Memory from "./memory.js"

const suites: ReadonlyArray<Suite> = [Memory.suite]

const positiveInt = (name: string, fallback: number): number => {
  const raw = process.env[name]
  if (raw === undefined || raw === "") return fallback
  const value = Number(raw)
  if (!Number.isInteger(value) || value <= 0) throw new Error(`${name} must be a positive integer, got "${raw}"`)
  return value
}

const main = async () => {
  const config: BenchConfig = {
    iterations: positiveInt("BENCH_ITERATIONS", 20_000),
    warmup: positiveInt("BENCH_WARMUP", 2_000),
    batches: positiveInt("BENCH_BATCHES", 50)
  }
  const wanted = process.argv.slice(2).length > 0
    ? process.argv.slice(2)
    : (process.env.BENCH_ONLY ?? "").split(",").map((name) => name.trim()).filter((name) => name !== "")
  const unknown = wanted.filter((name) => !suites.some((suite) => suite.name === name))
  if (unknown.length > 0) {
    throw new Error(`unknown suite(s): ${unknown.join(", ")}; known: ${suites.map((suite) => suite.name).join(", ")}`)
  }
  const selected = wanted.length === 0 ? suites : suites.filter((suite) => wanted.includes(suite.name))
  console.log(`node ${process.version}, ${process.platform}/${process.arch}`)
  for (const suite of selected) {
    const started = performance.now()
    await suite.run(config)
    console.log(`\n${suite.name}: ${((performance.now() - started) / 1000).toFixed(1)} s`)
  }
}

main().catch((error: unknown) => {
  console.error(error instanceof Error ? error.message : error)
  process.exitCode = 1
})
