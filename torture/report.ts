/**
 * Checks a torture run from its workers' logs and the store's records (read back by the `verify`
 * worker), and writes the figures: a Markdown table, also rewritten into the docs' reliability
 * pages between their marker comments.
 */
import { readdirSync, readFileSync, writeFileSync } from "node:fs"
import { cpus, platform, release } from "node:os"
import { join } from "node:path"
import { fileURLToPath } from "node:url"
import type { Backend, LogLine } from "./protocol.js"

/** One incarnation of a worker: its log file and, if it was killed, when it was seen dead. */
export interface Incarnation {
  readonly file: string
  readonly worker: number
  readonly diedAt: number | undefined
}

export interface BackendResult {
  readonly backend: Backend
  readonly seed: number
  /** Calls the workers were asked to make: workers x keys x duplicates. */
  readonly calls: number
  readonly keys: number
  /** Workers SIGKILLed. */
  readonly kills: number
  /** Times the store's connections were cut, and its server restarted. */
  readonly connectionKills: number
  readonly serverRestarts: number
  /** Calls beyond the first of each key. */
  readonly duplicatesAttempted: number
  /** Tries that failed and were retried with the same key. */
  readonly retries: number
  /** Runs of the wrapped effect (one per `start` line). */
  readonly runs: number
  /** Runs a kill cut short: after the acquire and before the effect started, during it, or after it and before the commit answered. */
  readonly cut: { readonly acquire: number; readonly run: number; readonly commit: number }
  /** Pairs of runs of one key that overlapped while the earlier one's lease was valid. */
  readonly doubleRuns: number
  /** Keys left without a readable record or whose calls did not all succeed. */
  readonly stuckKeys: number
  /** Keys whose fences did not grow strictly in the order their runs started. */
  readonly fenceErrors: number
  /** Keys where a caller, the replay or the store disagree on the value. */
  readonly valueMismatches: number
  readonly durationMillis: number
  /** The first few problems, described. */
  readonly problems: ReadonlyArray<string>
}

const readLines = (file: string): Array<LogLine> =>
  readFileSync(file, "utf8").split("\n").filter((line) => line.length > 0).flatMap((line) => {
    try {
      return [JSON.parse(line) as LogLine]
    } catch {
      // The last line of a killed worker may be cut short.
      return []
    }
  })

interface Run {
  readonly key: string
  readonly fence: number
  readonly start: number
  end: number
  validUntil: number
  value: string | undefined
  committed: boolean | undefined
  started: boolean
}

/**
 * Checks the logs of one backend's run:
 * - double runs: two runs of a key that overlap (the later starts before the earlier ended, was
 *   interrupted, or its process was seen dead) while the earlier's lease was valid (the send time
 *   of its acquire or last accepted renewal, plus the lease);
 * - fences strictly growing per key, in the order the runs started;
 * - stuck keys: every call of every worker ended in success, and the store holds a record for the
 *   key that a new call replays;
 * - values: every caller of a key got the same value, the one the record holds, which the run
 *   with the record's fence returned.
 */
export const analyze = (options: {
  readonly backend: Backend
  readonly seed: number
  readonly incarnations: ReadonlyArray<Incarnation>
  readonly verifyLog: string
  readonly workers: number
  readonly keys: number
  readonly duplicates: number
  readonly leaseMillis: number
  readonly kills: number
  readonly connectionKills: number
  readonly serverRestarts: number
  readonly durationMillis: number
}): BackendResult => {
  const problems: Array<string> = []
  const problem = (text: string) => {
    if (problems.length < 20) problems.push(text)
  }
  const runs = new Map<string, Array<Run>>()
  const answers = new Map<string, Map<string, string>>()
  const failedCalls = new Map<string, number>()
  let retries = 0
  const cut = { acquire: 0, run: 0, commit: 0 }

  for (const incarnation of options.incarnations) {
    const lines = readLines(incarnation.file)
    const mine = new Map<string, Run>()
    const id = (key: string, fence: number) => `${key}#${fence}`
    const runOf = (key: string, fence: number, start: number) => {
      let run = mine.get(id(key, fence))
      if (run === undefined) {
        run = {
          key,
          fence,
          start,
          end: Number.POSITIVE_INFINITY,
          validUntil: start,
          value: undefined,
          committed: undefined,
          started: false
        }
        mine.set(id(key, fence), run)
      }
      return run
    }
    for (const line of lines) {
      switch (line.e) {
        case "acq":
          runOf(line.k, line.f, line.sent).validUntil = Math.max(
            runOf(line.k, line.f, line.sent).validUntil,
            line.sent + options.leaseMillis
          )
          break
        case "ren": {
          const run = runOf(line.k, line.f, line.sent)
          run.validUntil = Math.max(run.validUntil, line.sent + options.leaseMillis)
          break
        }
        case "start": {
          const run = runOf(line.k, line.f, line.t)
          ;(run as { start: number }).start = line.t
          run.started = true
          break
        }
        case "end": {
          const run = runOf(line.k, line.f, line.t)
          run.end = line.t
          run.value = line.v
          break
        }
        case "int":
          runOf(line.k, line.f, line.t).end = line.t
          break
        case "com":
          runOf(line.k, line.f, line.sent).committed = line.ok
          break
        case "call": {
          const call = `${incarnation.worker}:${line.k}:${line.i}`
          if (line.ok) {
            const byCall = answers.get(line.k) ?? new Map<string, string>()
            byCall.set(call, line.v ?? "")
            answers.set(line.k, byCall)
            failedCalls.delete(call)
          } else if (!answers.get(line.k)?.has(call)) {
            failedCalls.set(call, (failedCalls.get(call) ?? 0) + 1)
            problem(`${options.backend}: call ${call} failed after ${line.tries} tries: ${line.error}`)
          }
          break
        }
        case "retry":
          retries++
          break
        default:
          break
      }
    }
    for (const run of mine.values()) {
      if (run.end === Number.POSITIVE_INFINITY && incarnation.diedAt !== undefined) {
        run.end = incarnation.diedAt
        if (!run.started) cut.acquire++
        else cut.run++
      } else if (incarnation.diedAt !== undefined && run.value !== undefined && run.committed === undefined) {
        cut.commit++
      }
      if (!run.started) continue
      const list = runs.get(run.key) ?? []
      list.push(run)
      runs.set(run.key, list)
    }
  }

  let doubleRuns = 0
  let fenceErrors = 0
  let runCount = 0
  for (const [key, list] of runs) {
    list.sort((a, b) => a.start - b.start || a.fence - b.fence)
    runCount += list.length
    let fencesOk = true
    for (let j = 0; j < list.length; j++) {
      const later = list[j]!
      if (j > 0 && list[j - 1]!.fence >= later.fence) fencesOk = false
      for (let i = 0; i < j; i++) {
        const earlier = list[i]!
        if (later.start < earlier.end && later.start < earlier.validUntil) {
          doubleRuns++
          problem(
            `${options.backend}: ${key} fence ${later.fence} started at ${later.start} while fence ${earlier.fence} ` +
              `ran (${earlier.start}..${earlier.end}) with its lease valid until ${earlier.validUntil}`
          )
        }
      }
    }
    if (!fencesOk) {
      fenceErrors++
      problem(`${options.backend}: ${key} fences in start order: ${list.map((run) => run.fence).join(", ")}`)
    }
  }

  // What the store holds, and what one more call replays.
  const verified = new Map<string, Extract<LogLine, { e: "verify" }>>()
  for (const line of readLines(options.verifyLog)) {
    if (line.e === "verify") verified.set(line.k, line)
  }
  let stuckKeys = 0
  let valueMismatches = 0
  for (let n = 0; n < options.keys; n++) {
    const key = `torture-${n}`
    const check = verified.get(key)
    const byCall = answers.get(key) ?? new Map<string, string>()
    const unanswered = options.workers * options.duplicates - byCall.size
    const stuck = check === undefined || check.record === null || !check.replay.ok || unanswered > 0
    if (stuck) {
      stuckKeys++
      problem(
        `${options.backend}: ${key} stuck: ${unanswered} calls unanswered, record ${
          JSON.stringify(check?.record ?? null)
        }, replay ${JSON.stringify(check?.replay ?? null)}`
      )
      continue
    }
    const values = new Set(byCall.values())
    const stored = check.record!.value
    const producer = (runs.get(key) ?? []).find((run) => run.fence === check.record!.fence)
    if (
      values.size !== 1 || !values.has(String(stored)) || check.replay.v !== stored ||
      producer === undefined || producer.value !== stored
    ) {
      valueMismatches++
      problem(
        `${options.backend}: ${key} values: callers ${JSON.stringify([...values])}, stored ${
          JSON.stringify(stored)
        } (fence ${check.record!.fence}, run returned ${producer?.value}), replay ${check.replay.v}`
      )
    }
  }

  const calls = options.workers * options.keys * options.duplicates
  return {
    backend: options.backend,
    seed: options.seed,
    calls,
    keys: options.keys,
    kills: options.kills,
    connectionKills: options.connectionKills,
    serverRestarts: options.serverRestarts,
    duplicatesAttempted: calls - options.keys,
    retries,
    runs: runCount,
    cut,
    doubleRuns,
    stuckKeys,
    fenceErrors,
    valueMismatches,
    durationMillis: options.durationMillis,
    problems
  }
}

/** The log files of a run's folder, by worker and incarnation (`w<worker>-<incarnation>.log`). */
export const logFiles = (dir: string): Array<string> =>
  readdirSync(dir).filter((name) => /^w\d+-\d+\.log$/.test(name)).map((name) => join(dir, name))

const seconds = (millis: number) => `${(millis / 1000).toFixed(1)} s`

/** The languages of the docs, each page with the figures in its own words. */
export type Lang = "en" | "es"

const words = {
  en: {
    header:
      "| backend | calls | kills | duplicates attempted | runs | runs cut (acquire/run/commit) | retried tries | double runs | stuck keys | fence errors | value mismatches | duration |",
    workers: "workers",
    connections: "conn.",
    server: "server",
    callsIn: "calls in",
    soakHeader: "| metric | baseline | after |",
    measured: (date: string, machine: string, seed: number) => `Measured ${date} on ${machine}, seed ${seed}.`,
    unfinished: "Did not finish",
    soak: "Soak:",
    soakMissing: "not available in this run."
  },
  es: {
    header:
      "| almacén | llamadas | muertes | duplicados intentados | ejecuciones | ejecuciones cortadas (acquire/ejecución/commit) | reintentos | ejecuciones dobles | claves atascadas | errores de fence | valores distintos | duración |",
    workers: "procesos",
    connections: "conex.",
    server: "servidor",
    callsIn: "llamadas en",
    soakHeader: "| métrica | línea base | después |",
    measured: (date: string, machine: string, seed: number) => `Medido el ${date} en ${machine}, semilla ${seed}.`,
    unfinished: "No terminaron",
    soak: "Soak:",
    soakMissing: "no disponible en esta ejecución."
  }
} as const

/** The words of one language, for the figures block. */
export const wordsOf = (lang: Lang) => words[lang]

const faults = (result: BackendResult, lang: Lang) =>
  [
    `${result.kills} ${words[lang].workers}`,
    ...(result.connectionKills > 0 ? [`${result.connectionKills} ${words[lang].connections}`] : []),
    ...(result.serverRestarts > 0 ? [`${result.serverRestarts} ${words[lang].server}`] : [])
  ].join(" + ")

/** The table of figures, one row per backend. */
export const table = (results: ReadonlyArray<BackendResult>, lang: Lang = "en"): string =>
  [
    words[lang].header,
    "|---|---:|---|---:|---:|---|---:|---:|---:|---:|---:|---:|",
    ...results.map((result) =>
      `| ${result.backend} | ${result.calls} | ${
        faults(result, lang)
      } | ${result.duplicatesAttempted} | ${result.runs} | ${result.cut.acquire}/${result.cut.run}/${result.cut.commit} | ${result.retries} | ${result.doubleRuns} | ${result.stuckKeys} | ${result.fenceErrors} | ${result.valueMismatches} | ${
        seconds(result.durationMillis)
      } |`
    )
  ].join("\n")

/** What the soak bench reports (see bench/soak.ts). */
export interface SoakResult {
  readonly calls: number
  readonly durationMs: number
  readonly rows: ReadonlyArray<{ readonly metric: string; readonly baseline: number; readonly after: number }>
}

export const soakTable = (soak: SoakResult, lang: Lang = "en"): string =>
  [
    `${soak.calls} ${words[lang].callsIn} ${seconds(soak.durationMs)}.`,
    "",
    words[lang].soakHeader,
    "|---|---:|---:|",
    ...soak.rows.map((row) => `| ${row.metric} | ${row.baseline} | ${row.after} |`)
  ].join("\n")

/** The machine the figures were measured on. */
export const machine = (): string => {
  const cores = cpus()
  return `${platform()} ${release()}, ${cores.length} × ${
    cores[0]?.model.trim() ?? "unknown CPU"
  }, Node ${process.version}`
}

export const startMarker = "<!-- torture:figures:start -->"
export const endMarker = "<!-- torture:figures:end -->"

const repoRoot = fileURLToPath(new URL("..", import.meta.url))

/** Replaces what lies between the markers of `docs/<lang>/reliability.md` with `body(lang)`. */
export const rewriteDocs = (body: (lang: Lang) => string): ReadonlyArray<string> =>
  (["en", "es"] as const).map((lang) => {
    const file = join(repoRoot, "docs", lang, "reliability.md")
    const text = readFileSync(file, "utf8")
    const start = text.indexOf(startMarker)
    const end = text.indexOf(endMarker)
    if (start < 0 || end < start) throw new Error(`${file} has no ${startMarker} ... ${endMarker}`)
    writeFileSync(file, `${text.slice(0, start + startMarker.length)}\n${body(lang)}\n${text.slice(end)}`)
    return file
  })
