/**
 * `npm run bench [suite...]` builds the library, then runs the benchmark suites against the
 * compiled dist/: all of them by default, or those named on the command line or in BENCH_ONLY
 * (comma separated). BENCH_ITERATIONS, BENCH_WARMUP and BENCH_BATCHES set how hard each suite
 * pushes (over each suite's own defaults); the `http` suite (a real server under autocannon) has
 * its own BENCH_HTTP_* variables instead. A backend adds its suite to `suites`.
 *
 * A suite that fails (a service it needs is unreachable, an invariant broke) is reported and the
 * run goes on with the next one; the exit code is then 1.
 */
import { relative, sep } from "node:path"
import { fileURLToPath } from "node:url"
import type { BenchConfig, Suite } from "./harness.js"
import * as Http from "./http.js"
import * as Memory from "./memory.js"
import * as Redis from "./redis.js"
import * as Sql from "./sql.js"

const suites: ReadonlyArray<Suite> = [Memory.suite, Redis.suite, Sql.suite, Http.suite]

const positiveInt = (name: string, fallback: number): number => {
  const raw = process.env[name]
  if (raw === undefined || raw === "") return fallback
  const value = Number(raw)
  if (!Number.isInteger(value) || value <= 0) throw new Error(`${name} must be a positive integer, got "${raw}"`)
  return value
}

const configFor = (suite: Suite): BenchConfig => ({
  iterations: positiveInt("BENCH_ITERATIONS", suite.defaults?.iterations ?? 20_000),
  warmup: positiveInt("BENCH_WARMUP", suite.defaults?.warmup ?? 2_000),
  batches: positiveInt("BENCH_BATCHES", suite.defaults?.batches ?? 50)
})

const main = async () => {
  // Read before anything runs, so a bad value fails at once rather than after the first suite.
  const configs = new Map(suites.map((suite) => [suite, configFor(suite)]))
  const wanted = process.argv.slice(2).length > 0
    ? process.argv.slice(2)
    : (process.env.BENCH_ONLY ?? "").split(",").map((name) => name.trim()).filter((name) => name !== "")
  const unknown = wanted.filter((name) => !suites.some((suite) => suite.name === name))
  if (unknown.length > 0) {
    throw new Error(`unknown suite(s): ${unknown.join(", ")}; known: ${suites.map((suite) => suite.name).join(", ")}`)
  }
  const selected = wanted.length === 0 ? suites : suites.filter((suite) => wanted.includes(suite.name))
  // The compiled library, as users run it (see tsconfig.bench.json): tsx's transform of the
  // sources wraps each function the library creates per call in a naming helper, which would
  // add its own cost to every figure.
  const library = fileURLToPath(import.meta.resolve("effect-idempotency"))
  if (!library.includes(`${sep}dist${sep}`)) {
    throw new Error(`effect-idempotency resolves to ${library}, not to dist/: run the bench with \`npm run bench\``)
  }
  console.log(
    `node ${process.version}, ${process.platform}/${process.arch}; library ${relative(process.cwd(), library)}`
  )
  const failed: Array<string> = []
  for (const suite of selected) {
    const started = performance.now()
    try {
      await suite.run(configs.get(suite)!)
      console.log(`\n${suite.name}: ${((performance.now() - started) / 1000).toFixed(1)} s`)
    } catch (error) {
      failed.push(suite.name)
      console.error(
        `\n${suite.name}: FAILED after ${((performance.now() - started) / 1000).toFixed(1)} s: ${message(error)}`
      )
    }
  }
  if (failed.length > 0) throw new Error(`failed suite(s): ${failed.join(", ")}`)
}

const message = (error: unknown): string => error instanceof Error ? error.message : String(error)

main().catch((error: unknown) => {
  console.error(message(error))
  process.exitCode = 1
}).finally(() => {
  // Every suite closes what it opened, so the process should end by itself now. If a leaked
  // socket or timer keeps it alive, say so and end it rather than hang (the timer itself does not
  // keep the process alive).
  setTimeout(() => {
    console.error("bench: something the suites opened is still keeping the process alive; exiting")
    process.exit(process.exitCode ?? 1)
  }, 5_000).unref()
})
