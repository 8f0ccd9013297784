/**
 * The stored result of a completed run.
 *
 * A record is what every later call with the same key replays: the outcome (a success or a typed
 * failure), its Schema-encoded payload, and the fingerprint of the request that produced it.
 *
 * @since 0.1.0
 */
import * as Schema from "effect/Schema"

/**
 * Whether the stored payload is the run's success value or a typed failure it chose to keep.
 *
 * @since 0.1.0
 * @category Schemas
 */
export const Outcome = Schema.Literal("success", "failure")

/**
 * `"success"` or `"failure"`: one of the `Outcome` literals.
 *
 * @since 0.1.0
 * @category Models
 */
export type Outcome = typeof Outcome.Type

/**
 * The schema of a record. Its encoded side is JSON (the payload in base64), so a custom backend
 * built on `Storage.fromBasic` can keep records in any document store with
 * `Schema.encode(IdempotencyRecord)`.
 *
 * @since 0.1.0
 * @category Schemas
 */
export const IdempotencyRecord = Schema.Struct({
  /** The idempotency key, as the caller gave it. */
  key: Schema.String,
  /** SHA-256 (hex) of the canonical fingerprint; empty when the caller gave none. */
  fingerprint: Schema.String,
  outcome: Outcome,
  /** The Schema-encoded result, as UTF-8 JSON (or the HTTP middleware's own framing). */
  payload: Schema.Uint8ArrayFromBase64,
  /** The fencing number of the run that produced it. */
  fence: Schema.Number,
  /** When the result was stored, in epoch milliseconds. */
  createdAt: Schema.Number,
  /** When the record stops being replayed, in epoch milliseconds. */
  expiresAt: Schema.Number
}).annotations({ identifier: "IdempotencyRecord" })

/**
 * A stored result: the decoded side of the `IdempotencyRecord` schema.
 *
 * @since 0.1.0
 * @category Models
 */
export interface IdempotencyRecord extends Schema.Schema.Type<typeof IdempotencyRecord> {}

/**
 * The JSON form of a record, as `Schema.encode(IdempotencyRecord)` gives it to a document store.
 *
 * @since 0.1.0
 * @category Models
 */
export interface IdempotencyRecordEncoded extends Schema.Schema.Encoded<typeof IdempotencyRecord> {}
