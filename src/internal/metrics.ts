import * as Metric from "effect/Metric"

/** Runs of the wrapped effect: this call acquired the key and ran it. @internal */
export const executions = Metric.counter("idempotency_executions_total", {
  description: "Calls that acquired the key and ran the wrapped effect"
})

/** @internal */
export const replays = Metric.counter("idempotency_replays_total", {
  description: "Calls answered with a stored result"
})

/** @internal */
export const inFlight = Metric.counter("idempotency_in_flight_total", {
  description: "Calls refused because the first run was still in flight"
})

/** @internal */
export const keyReused = Metric.counter("idempotency_key_reused_total", {
  description: "Calls refused because the key was used with a different fingerprint"
})

/** @internal */
export const leaseLost = Metric.counter("idempotency_lease_lost_total", {
  description: "Runs whose lease was lost before they could commit"
})

/** @internal */
export const releases = Metric.counter("idempotency_releases_total", {
  description: "Runs that ended without a storable result and released the key for a retry"
})

/** @internal */
export const commitFailures = Metric.counter("idempotency_commit_failures_total", {
  description: "Runs whose result could not be stored because the storage failed"
})

/** @internal */
export const storageErrors = Metric.counter("idempotency_storage_errors_total", {
  description: "Calls that failed closed because the storage failed"
})

/** @internal */
export interface BackendCounters {
  readonly executions: Metric.Metric.Counter<number>
  readonly replays: Metric.Metric.Counter<number>
  readonly inFlight: Metric.Metric.Counter<number>
  readonly keyReused: Metric.Metric.Counter<number>
  readonly leaseLost: Metric.Metric.Counter<number>
  readonly releases: Metric.Metric.Counter<number>
  readonly commitFailures: Metric.Metric.Counter<number>
  readonly storageErrors: Metric.Metric.Counter<number>
}

// Tagging builds and hashes a new metric key; do it once per backend, not on every call.
const byBackend = new Map<string, BackendCounters>()

/**
 * The counters tagged with a backend's name.
 *
 * @internal
 */
export const forBackend = (backend: string): BackendCounters => {
  let counters = byBackend.get(backend)
  if (counters === undefined) {
    const tag = <A extends Metric.Metric.Counter<number>>(metric: A) => Metric.tagged(metric, "backend", backend)
    counters = {
      executions: tag(executions),
      replays: tag(replays),
      inFlight: tag(inFlight),
      keyReused: tag(keyReused),
      leaseLost: tag(leaseLost),
      releases: tag(releases),
      commitFailures: tag(commitFailures),
      storageErrors: tag(storageErrors)
    }
    byBackend.set(backend, counters)
  }
  return counters
}
