/**
 * What the torture run (`run.ts`) and its worker processes (`worker.ts`) share: the worker's
 * configuration (its one argument, JSON), the lines each worker appends to its log file, and a
 * seeded random generator so that a run can be replayed from its seed.
 */

export type Backend = "redis" | "postgres" | "mariadb" | "sqlite"

export const backends: ReadonlyArray<Backend> = ["redis", "postgres", "mariadb", "sqlite"]

/** Where a worker's storage lives. */
export type StoreConfig =
  | { readonly backend: "redis"; readonly url: string; readonly prefix: string }
  | { readonly backend: "postgres"; readonly table: string; readonly applicationName: string }
  | { readonly backend: "mariadb"; readonly table: string }
  | { readonly backend: "sqlite"; readonly table: string; readonly filename: string }

/**
 * `calls`: calls keys `0 .. keys - 1`, `duplicates` times each (all of a key's calls at once, up to
 * `concurrency` keys at a time, in an order shared by every worker so that they meet on each key),
 * skipping the calls listed in `done` (a restarted worker goes on where it was killed). Each run
 * sleeps a random time (sometimes longer than the lease, so that it renews) and returns a value
 * naming its process and fence. A failed call is retried with the same key until it succeeds or
 * `attempts` tries have failed.
 *
 * `verify`: for every key, reads the store's record and calls the key once more.
 *
 * Either way the worker appends one {@link LogLine} per event to `logFile` (synchronous O_APPEND
 * writes: a SIGKILL loses no line already written), says `{"type":"ready"}` once its storage layer
 * is built and `{"type":"done"}` at the end, on standard output.
 */
export interface WorkerConfig {
  readonly mode: "calls" | "verify"
  readonly store: StoreConfig
  readonly index: number
  readonly incarnation: number
  readonly seed: number
  readonly logFile: string
  readonly keys: number
  readonly duplicates: number
  readonly concurrency: number
  readonly leaseMillis: number
  readonly sleepMaxMillis: number
  /** One run in this many sleeps past its lease. */
  readonly longRunEvery: number
  readonly attempts: number
  /** Calls already answered, as `"key:i"`. */
  readonly done: ReadonlyArray<string>
}

export type WorkerMessage =
  | { readonly type: "ready"; readonly pid: number }
  | { readonly type: "done" }
  | { readonly type: "fatal"; readonly message: string }

/** The idempotency key of torture key number `n`. */
export const tortureKey = (n: number): string => `torture-${n}`

/**
 * One line of a worker's log. Times are epoch milliseconds of the machine's one clock, which
 * every process shares. `sent` is when a storage call was sent, logged once its answer came.
 */
export type LogLine =
  /** An acquire that made this process the key's holder with `fence`. */
  | { readonly e: "acq"; readonly k: string; readonly f: number; readonly sent: number }
  /** A renewal the store accepted. */
  | { readonly e: "ren"; readonly k: string; readonly f: number; readonly sent: number }
  | { readonly e: "com"; readonly k: string; readonly f: number; readonly sent: number; readonly ok: boolean }
  | { readonly e: "rel"; readonly k: string; readonly f: number; readonly sent: number }
  /** The wrapped effect started (its fence from `Idempotent.Execution`). */
  | { readonly e: "start"; readonly k: string; readonly f: number; readonly t: number }
  /** The wrapped effect returned `v`. */
  | { readonly e: "end"; readonly k: string; readonly f: number; readonly t: number; readonly v: string }
  /** The wrapped effect was interrupted (its lease could no longer be proven). */
  | { readonly e: "int"; readonly k: string; readonly f: number; readonly t: number }
  /** A call's answer: success with `v`, or the last error after `attempts` tries. */
  | {
    readonly e: "call"
    readonly k: string
    readonly i: number
    readonly t: number
    readonly ok: boolean
    readonly v?: string | undefined
    readonly error?: string | undefined
    readonly tries: number
  }
  /** A failed try that is retried. */
  | { readonly e: "retry"; readonly k: string; readonly i: number; readonly t: number; readonly error: string }
  /** `verify`: the record the store holds for `k`, and what calling `k` again answered. */
  | {
    readonly e: "verify"
    readonly k: string
    readonly t: number
    readonly record: { readonly fence: number; readonly outcome: string; readonly value: unknown } | null
    readonly replay: { readonly ok: boolean; readonly v?: string | undefined; readonly error?: string | undefined }
  }

/** mulberry32: a small seeded generator of numbers in [0, 1). */
export const random = (seed: number): () => number => {
  let state = seed >>> 0
  return () => {
    state = (state + 0x6d2b79f5) >>> 0
    let t = state
    t = Math.imul(t ^ (t >>> 15), t | 1)
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61)
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296
  }
}

/** The same permutation of `0 .. n - 1` for every caller with the same seed. */
export const shuffled = (n: number, seed: number): Array<number> => {
  const next = random(seed)
  const order = Array.from({ length: n }, (_, i) => i)
  for (let i = n - 1; i > 0; i--) {
    const j = Math.floor(next() * (i + 1))
    const swap = order[i]!
    order[i] = order[j]!
    order[j] = swap
  }
  return order
}
