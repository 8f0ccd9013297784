/**
 * Timing, statistics and table printing shared by every benchmark suite. A suite measures its
 * cases with {@link measure} and {@link measureBatches}; this module knows nothing about storage.
 */
import { performance } from "node:perf_hooks"

/** How hard to push: read once from the environment by `bench/index.ts`. */
export interface BenchConfig {
  /** Timed calls per latency case. */
  readonly iterations: number
  /** Untimed calls before them, so the JIT has settled. */
  readonly warmup: number
  /** Timed batches per concurrency case. */
  readonly batches: number
}

/**
 * A suite is one backend's set of cases. It builds (and releases) its own runtime. A suite whose
 * calls cost a network round trip sets lower `defaults`; the BENCH_* variables still win.
 */
export interface Suite {
  readonly name: string
  readonly defaults?: Partial<BenchConfig> | undefined
  readonly run: (config: BenchConfig) => Promise<void>
}

export interface Stats {
  readonly name: string
  readonly samples: number
  /** Microseconds. */
  readonly median: number
  readonly p99: number
  readonly mean: number
  /** Calls per second: calls per sample × 1e6 / mean. */
  readonly opsPerSecond: number
}

const percentile = (sorted: Float64Array, p: number): number =>
  sorted[Math.min(sorted.length - 1, Math.ceil(p * sorted.length) - 1)]!

const summarize = (name: string, micros: Float64Array, callsPerSample: number): Stats => {
  const sorted = micros.slice().sort()
  let total = 0
  for (const sample of sorted) total += sample
  const mean = total / sorted.length
  return {
    name,
    samples: sorted.length,
    median: percentile(sorted, 0.5),
    p99: percentile(sorted, 0.99),
    mean,
    opsPerSecond: callsPerSample * 1e6 / mean
  }
}

/**
 * Times `call(i)` one call at a time. `i` counts on across warm-up and timed calls, so a case that
 * needs a fresh key per call never repeats one.
 */
export const measure = async (
  name: string,
  config: Pick<BenchConfig, "iterations" | "warmup">,
  call: (i: number) => Promise<unknown>
): Promise<Stats> => {
  for (let i = 0; i < config.warmup; i++) await call(i)
  const micros = new Float64Array(config.iterations)
  for (let i = 0; i < config.iterations; i++) {
    const start = performance.now()
    await call(config.warmup + i)
    micros[i] = (performance.now() - start) * 1000
  }
  return summarize(name, micros, 1)
}

/** One latency case for {@link measureInterleaved}. */
export interface Case {
  readonly name: string
  readonly call: (i: number) => Promise<unknown>
}

/**
 * Times several cases one call at a time like {@link measure}, but in `rounds` interleaved slices
 * (case A's slice, then B's, ..., then A's next slice), so that load that comes and goes on a
 * shared machine falls on every case alike and the ratios between them stay meaningful. Each
 * case's `i` counts on across its own warm-up and slices.
 */
export const measureInterleaved = async (
  config: Pick<BenchConfig, "iterations" | "warmup">,
  cases: ReadonlyArray<Case>,
  rounds = 10
): Promise<Array<Stats>> => {
  for (const { call } of cases) {
    for (let i = 0; i < config.warmup; i++) await call(i)
  }
  const samples = cases.map(() => new Float64Array(config.iterations))
  const slices = Math.max(1, Math.min(rounds, config.iterations))
  for (let slice = 0; slice < slices; slice++) {
    const from = Math.floor(slice * config.iterations / slices)
    const to = Math.floor((slice + 1) * config.iterations / slices)
    for (let c = 0; c < cases.length; c++) {
      const { call } = cases[c]!
      const micros = samples[c]!
      for (let i = from; i < to; i++) {
        const start = performance.now()
        await call(config.warmup + i)
        micros[i] = (performance.now() - start) * 1000
      }
    }
  }
  return cases.map(({ name }, c) => summarize(name, samples[c]!, 1))
}

/** Times whole batches of `size` calls (e.g. 1,000 concurrent ones); `check` sees each batch's result. */
export const measureBatches = async <A>(
  name: string,
  batches: number,
  size: number,
  batch: (i: number) => Promise<A>,
  check: (result: A) => void
): Promise<Stats> => {
  const warmup = Math.max(1, Math.floor(batches / 10))
  for (let i = 0; i < warmup; i++) check(await batch(i))
  const micros = new Float64Array(batches)
  for (let i = 0; i < batches; i++) {
    const start = performance.now()
    const result = await batch(warmup + i)
    micros[i] = (performance.now() - start) * 1000
    check(result)
  }
  return summarize(name, micros, size)
}

export const fixed = (value: number, digits: number) =>
  value.toLocaleString("en-US", { minimumFractionDigits: digits, maximumFractionDigits: digits })

/** Prints a table: the first column left-aligned (a name), the others right-aligned (numbers). */
export const printRows = (header: ReadonlyArray<string>, rows: ReadonlyArray<ReadonlyArray<string>>) => {
  const widths = header.map((cell, i) => Math.max(cell.length, ...rows.map((row) => row[i]!.length)))
  // The first column is a name, the rest are numbers: left- and right-aligned.
  const line = (cells: ReadonlyArray<string>) =>
    cells.map((cell, i) => i === 0 ? cell.padEnd(widths[i]!) : cell.padStart(widths[i]!)).join("  ")
  console.log(line(header))
  console.log(line(widths.map((width) => "-".repeat(width))))
  for (const row of rows) console.log(line(row))
}

/**
 * Prints latency statistics, each row also as a multiple of `baseline` measured in the same process
 * and as the time it adds to the baseline's median.
 */
export const printTable = (title: string, baseline: Stats, rows: ReadonlyArray<Stats>, unit: "µs" | "ms" = "µs") => {
  const scale = unit === "µs" ? 1 : 1000
  const digits = unit === "µs" ? 2 : 3
  console.log(`\n${title}`)
  printRows(
    ["case", `median ${unit}`, `p99 ${unit}`, `+median ${unit}`, "calls/s", "median ×base", "p99 ×base"],
    rows.map((row) => [
      row.name,
      fixed(row.median / scale, digits),
      fixed(row.p99 / scale, digits),
      fixed((row.median - baseline.median) / scale, digits),
      fixed(row.opsPerSecond, 0),
      fixed(row.median / baseline.median, 1),
      fixed(row.p99 / baseline.p99, 1)
    ])
  )
}

/** Fails the run loudly: a benchmark whose invariant broke measured the wrong thing. */
export const invariant = (condition: boolean, message: string): void => {
  if (!condition) throw new Error(`benchmark invariant broken: ${message}`)
}
