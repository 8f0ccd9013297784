/**
 * Idempotency keys for Effect: `Idempotent.wrap` runs an effect once per key and replays its stored
 * result to every retry, on the storage the `Storage` layer provides (memory here; Redis, SQL and
 * the HTTP middleware in their own entry points).
 *
 * @since 0.1.0
 */

/**
 * The typed failures of `effect-idempotency`.
 *
 * @since 0.1.0
 */
export * as IdempotencyError from "./IdempotencyError.js"

/**
 * The stored result of a completed run.
 *
 * @since 0.1.0
 */
export * as IdempotencyRecord from "./IdempotencyRecord.js"

/**
 * `Idempotent.wrap` and the `Execution` service.
 *
 * @since 0.1.0
 */
export * as Idempotent from "./Idempotent.js"

/**
 * In-memory storage for one process.
 *
 * @since 0.1.0
 */
export * as MemoryStorage from "./Storage/Memory.js"

/**
 * The storage protocol and `fromBasic`.
 *
 * @since 0.1.0
 */
export * as Storage from "./Storage.js"
