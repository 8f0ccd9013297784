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
