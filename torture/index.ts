/**
 * `npm run torture`: the full-size torture run on Redis, PostgreSQL, MariaDB and a SQLite file,
 * then the soak bench, printing the figures and rewriting them into docs/en/reliability.md and
 * docs/es/reliability.md. `TORTURE_SEED` pins the seed (default: the current time, printed);
 * `TORTURE_BACKENDS=redis,sqlite` runs some backends only; `SOAK_CALLS` sizes the soak
 * (default 1,000,000). A run that finds a double run, a stuck key, a fence out of order or a value
 * mismatch exits with code 1 (the docs are rewritten all the same: they publish what was found).
 */
import { Effect } from "effect"
import { fileURLToPath } from "node:url"
import { type Backend, backends } from "./protocol.js"
import {
  type BackendResult,
  type Lang,
  machine,
  rewriteDocs,
  type SoakResult,
  soakTable,
  table,
  wordsOf
} from "./report.js"
import { fullSize, runTorture } from "./run.js"

const seed = Number(process.env.TORTURE_SEED ?? Date.now() % 2 ** 31)
const chosen = (process.env.TORTURE_BACKENDS?.split(",") ?? backends) as ReadonlyArray<Backend>
const soakCalls = Number(process.env.SOAK_CALLS ?? 1_000_000)

// The soak bench is written apart (bench/soak.ts); a checkout without it still runs the torture.
const soakModule = fileURLToPath(new URL("../bench/soak.ts", import.meta.url))

const soak = Effect.tryPromise(() =>
  import(soakModule) as Promise<{ readonly runSoak?: (options: { readonly calls: number }) => Promise<SoakResult> }>
).pipe(
  Effect.flatMap((module) =>
    module.runSoak === undefined
      ? Effect.succeed(undefined)
      : Effect.tryPromise(() => module.runSoak!({ calls: soakCalls }))
  ),
  Effect.catchAll((error) =>
    Effect.sync(() => {
      console.log(`soak: not available (${error instanceof Error ? error.message : String(error)})`)
      return undefined
    })
  )
)

const program = Effect.gen(function*() {
  console.log(`torture: seed ${seed} (TORTURE_SEED=${seed} runs it again), backends ${chosen.join(", ")}`)
  const results: Array<BackendResult> = []
  const unfinished: Array<string> = []
  for (const backend of chosen) {
    const outcome = yield* Effect.either(runTorture({ ...fullSize(backend, seed), log: (line) => console.log(line) }))
    if (outcome._tag === "Left") {
      // A run that could not finish (a worker that never started, a store that went away) is
      // reported and the others go on.
      const error = outcome.left as { readonly message?: string }
      const message = (error.message ?? String(outcome.left)).split("\n")[0]!
      console.log(`${backend}: the run did not finish: ${message}`)
      unfinished.push(`${backend} (${message})`)
      continue
    }
    results.push(outcome.right)
    for (const problem of outcome.right.problems) console.log(`  ${problem}`)
  }
  const figures = table(results)
  console.log(`\n${figures}\n`)
  console.log("soak: running")
  const soaked = yield* soak
  if (soaked === undefined) console.log("soak: not available")
  else console.log(soakTable(soaked))

  const date = new Date().toISOString().slice(0, 10)
  const body = (lang: Lang) => {
    const words = wordsOf(lang)
    return [
      words.measured(date, machine(), seed),
      "",
      table(results, lang),
      ...(unfinished.length === 0 ? [] : ["", `${words.unfinished}: ${unfinished.join("; ")}.`]),
      "",
      words.soak,
      "",
      soaked === undefined ? words.soakMissing : soakTable(soaked, lang)
    ].join("\n")
  }
  for (const file of rewriteDocs(body)) console.log(`wrote ${file}`)
  const failed = results.some((result) =>
    result.doubleRuns + result.stuckKeys + result.fenceErrors + result.valueMismatches > 0
  )
  if (failed || unfinished.length > 0) process.exitCode = 1
})

Effect.runPromise(program).catch((error) => {
  console.error(error)
  process.exit(1)
})
