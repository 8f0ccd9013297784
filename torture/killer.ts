/**
 * The killer's plan: when to SIGKILL which worker and how long it stays down, and when to cut the
 * storage's connections or restart its server, all drawn from one seed so that a run can be
 * replayed. Times count from the moment every worker first said `ready`.
 */
import { random, shuffled } from "./protocol.js"

export type Fault =
  /** SIGKILL worker `worker` (or, if it is down or finished, another running one), restart it after `downMillis`. */
  | { readonly _tag: "KillWorker"; readonly atMillis: number; readonly worker: number; readonly downMillis: number }
  /** Cut every connection the workers have to the store (CLIENT KILL, pg_terminate_backend). */
  | { readonly _tag: "KillConnections"; readonly atMillis: number }
  /** Stop the store's server and start it again (the throw-away Redis only). */
  | { readonly _tag: "RestartServer"; readonly atMillis: number }

export interface PlanOptions {
  readonly seed: number
  readonly workers: number
  /** Each round kills every worker once, in a random order. */
  readonly rounds: number
  readonly connectionKills: number
  readonly serverRestarts: number
  /** The gap between two kills is drawn from [min, max). */
  readonly gapMillis: readonly [number, number]
  readonly downMillis: readonly [number, number]
}

/** The faults in time order. */
export const plan = (options: PlanOptions): ReadonlyArray<Fault> => {
  const next = random(options.seed ^ 0x5bd1e995)
  const between = ([min, max]: readonly [number, number]) => min + next() * (max - min)
  const faults: Array<Fault> = []
  let at = 0
  for (let round = 0; round < options.rounds; round++) {
    for (const worker of shuffled(options.workers, options.seed + round + 1)) {
      at += between(options.gapMillis)
      faults.push({ _tag: "KillWorker", atMillis: Math.round(at), worker, downMillis: between(options.downMillis) })
    }
  }
  // Storage faults land at random moments of the same span.
  const span = Math.max(at, options.gapMillis[1])
  for (let i = 0; i < options.connectionKills; i++) {
    faults.push({ _tag: "KillConnections", atMillis: Math.round(next() * span) })
  }
  for (let i = 0; i < options.serverRestarts; i++) {
    faults.push({ _tag: "RestartServer", atMillis: Math.round(span * (0.25 + next() * 0.5)) })
  }
  return faults.sort((a, b) => a.atMillis - b.atMillis)
}
