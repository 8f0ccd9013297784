/**
 * One torture worker: a separate OS process with its own storage layer, calling every key
 * `duplicates` times through `Idempotent.wrap` and logging every run and storage answer to its log
 * file. Run as `node --import tsx torture/worker.ts '<WorkerConfig as JSON>'` (see `protocol.ts`).
 */
import { Cause, Duration, Effect, Exit, Layer, Logger } from "effect"
import { closeSync, openSync, writeSync } from "node:fs"
import * as Idempotent from "../src/Idempotent.js"
import * as Storage from "../src/Storage.js"
import { type LogLine, random, shuffled, tortureKey, type WorkerConfig, type WorkerMessage } from "./protocol.js"
import { describeCause, storeLayer, verifyKeys } from "./store.js"

const config = JSON.parse(process.argv[2] ?? "null") as WorkerConfig

const emit = (message: WorkerMessage) => Effect.sync(() => process.stdout.write(`${JSON.stringify(message)}\n`))

// O_APPEND, one write per line: a line written before a SIGKILL is in the file.
const logFd = openSync(config.logFile, "a")
const log = (line: LogLine) => writeSync(logFd, `${JSON.stringify(line)}\n`)

const next = random(config.seed * 7919 + config.index * 104729 + config.incarnation * 1299709)

/** Up to 50 milliseconds. */
const pause = () => Effect.suspend(() => Effect.sleep(Duration.millis(next() * 50)))

/** Logs what the store answered to this process: acquisitions, renewals, commits, releases. */
const logged = (storage: Storage.StorageService): Storage.StorageService =>
  Storage.make({
    ...storage,
    acquire: (request) => {
      const sent = Date.now()
      // A pause after an acquisition widens the moment a kill lands between acquire and run.
      return Effect.tap(storage.acquire(request), (result) =>
        result._tag === "Acquired"
          ? Effect.zipRight(
            Effect.sync(() => log({ e: "acq", k: result.lease.key, f: result.lease.fence, sent })),
            pause()
          )
          : Effect.void)
    },
    renew: (lease, duration) => {
      const sent = Date.now()
      return Effect.tap(storage.renew(lease, duration), (renewed) =>
        Effect.sync(() => {
          if (renewed) log({ e: "ren", k: lease.key, f: lease.fence, sent })
        }))
    },
    // Pauses before and after a commit widen the moments a kill lands after the run and before the
    // commit, or after the store committed and before this process heard.
    commit: (lease, request) =>
      Effect.zipRight(
        pause(),
        Effect.suspend(() => {
          const sent = Date.now()
          return Effect.tap(
            storage.commit(lease, request),
            (ok) =>
              Effect.zipRight(pause(), Effect.sync(() => log({ e: "com", k: lease.key, f: lease.fence, sent, ok })))
          )
        })
      ),
    release: (lease) => {
      const sent = Date.now()
      return Effect.tap(
        storage.release(lease),
        () => Effect.sync(() => log({ e: "rel", k: lease.key, f: lease.fence, sent }))
      )
    }
  })

const storageLayer = Layer.effect(Storage.Storage, Effect.map(Storage.Storage, logged)).pipe(
  Layer.provide(storeLayer(config.store))
)

const lease = Duration.millis(config.leaseMillis)
const wait = { wait: Duration.millis(config.leaseMillis * 3) }

/** One run: logs its start and end with its fence, sleeps a random time, returns a value naming it. */
const execution = (key: string) =>
  Effect.gen(function*() {
    const { fence } = yield* Idempotent.Execution
    log({ e: "start", k: key, f: fence, t: Date.now() })
    const long = next() * config.longRunEvery < 1
    const sleep = long
      ? config.leaseMillis + next() * config.leaseMillis
      : next() * config.sleepMaxMillis
    yield* Effect.sleep(Duration.millis(sleep))
    const v = `${process.pid}/${config.incarnation}/${fence}/${Math.floor(next() * 1e9)}`
    log({ e: "end", k: key, f: fence, t: Date.now(), v })
    return v
  }).pipe(
    Effect.onInterrupt(() =>
      Effect.flatMap(Idempotent.Execution, ({ fence }) =>
        Effect.sync(() => log({ e: "int", k: key, f: fence, t: Date.now() })))
    )
  )

/** One caller: retries with the same key until it succeeds or `attempts` tries have failed. */
const call = (n: number, i: number) => {
  const key = tortureKey(n)
  const attempt = (tries: number): Effect.Effect<void, never, Storage.Storage> =>
    Effect.flatMap(
      Effect.exit(Idempotent.wrap(execution(key), { key, lease, onInFlight: wait })),
      (exit) => {
        if (Exit.isSuccess(exit)) {
          return Effect.sync(() => log({ e: "call", k: key, i, t: Date.now(), ok: true, v: exit.value, tries }))
        }
        const error = describeCause(exit.cause)
        if (tries >= config.attempts) {
          return Effect.sync(() => log({ e: "call", k: key, i, t: Date.now(), ok: false, error, tries }))
        }
        log({ e: "retry", k: key, i, t: Date.now(), error })
        return Effect.delay(attempt(tries + 1), Duration.millis(50 + next() * 250))
      }
    )
  return attempt(1)
}

const calls = Effect.gen(function*() {
  const done = new Set(config.done)
  // Every worker goes through the keys in the same order, so that they meet on each.
  const order = shuffled(config.keys, config.seed)
  yield* Effect.forEach(
    order,
    (n) =>
      Effect.forEach(
        Array.from({ length: config.duplicates }, (_, i) => i).filter((i) => !done.has(`${tortureKey(n)}:${i}`)),
        (i) => call(n, i),
        { concurrency: "unbounded", discard: true }
      ),
    { concurrency: config.concurrency, discard: true }
  )
})

const program = Effect.gen(function*() {
  yield* emit({ type: "ready", pid: process.pid })
  yield* config.mode === "calls" ? calls : verifyKeys(config, log)
  yield* emit({ type: "done" })
}).pipe(
  Effect.provide(storageLayer),
  // Standard output carries the protocol only.
  Effect.provide(Logger.replace(Logger.defaultLogger, Logger.withConsoleError(Logger.logfmtLogger)))
)

Effect.runPromiseExit(program).then((exit) => {
  closeSync(logFd)
  const finish = () => process.exit(Exit.isFailure(exit) ? 1 : 0)
  const last: WorkerMessage | undefined = Exit.isFailure(exit)
    ? { type: "fatal", message: Cause.pretty(exit.cause) }
    : undefined
  process.stdout.write(last === undefined ? "" : `${JSON.stringify(last)}\n`, finish)
})
