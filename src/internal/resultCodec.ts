import * as Effect from "effect/Effect"
import * as Either from "effect/Either"
import * as Option from "effect/Option"
import * as ParseResult from "effect/ParseResult"
import * as Schema from "effect/Schema"
import { IdempotencyRecordUndecodable, type IdempotencyStorageError } from "../IdempotencyError.js"
import type { IdempotencyRecord, Outcome } from "../IdempotencyRecord.js"
import * as PlainJson from "./plainJson.js"

/**
 * Turns a run's result into stored bytes and back. `Idempotent.wrap` builds one from the caller's
 * Schemas; the HTTP middleware brings its own framing.
 *
 * @internal
 */
export interface ResultCodec<A, E> {
  readonly encodeSuccess: (value: A) => Either.Either<Uint8Array, unknown>
  /** `None` when the failure is not one the caller asked to store: the key is then released. */
  readonly encodeFailure: (error: E) => Option.Option<Uint8Array>
  readonly decode: (
    record: IdempotencyRecord
  ) => Effect.Effect<A, E | IdempotencyRecordUndecodable | IdempotencyStorageError>
}

const textEncoder = new TextEncoder()
const textDecoder = new TextDecoder()
const empty = new Uint8Array(0)

/**
 * Why a result was not stored: what it holds that JSON cannot carry, and what to do about it.
 *
 * @internal
 */
export class NotStorable extends Error {}

// `undefined` (an `Effect<void>`) has no JSON text; it is stored as an empty payload. Anything
// else must be JSON data, or the replay would decode something other than what was stored.
const checkedBytes = (encoded: unknown, explain: (problem: PlainJson.NotPlainJson) => string): Uint8Array => {
  if (encoded === undefined) return empty
  const json = PlainJson.stringify(encoded)
  if (typeof json !== "string") throw new NotStorable(explain(json))
  return textEncoder.encode(json)
}

// A schema whose encoded side is not JSON (`Schema.DateFromSelf`, say) would store a value that
// its own decoder refuses on every replay.
const schemaOutputBytes = (encoded: unknown) =>
  checkedBytes(
    encoded,
    (problem) =>
      `the schema's encoded form is not JSON data (${problem.message}): use a schema whose encoded side is JSON, ` +
      "such as Schema.Date rather than Schema.DateFromSelf"
  )

const fromBytes = (payload: Uint8Array): unknown =>
  payload.length === 0 ? undefined : JSON.parse(textDecoder.decode(payload))

type AnySchema = Schema.Schema<any, any, never>

interface SchemaCodec {
  readonly encode: (value: unknown) => Either.Either<unknown, ParseResult.ParseError>
  readonly decode: (value: unknown) => Either.Either<unknown, ParseResult.ParseError>
  /** How the encoded value becomes JSON text. */
  readonly stringify: (encoded: unknown) => Uint8Array
}

// Schema's encoders are built per schema; cache them so a hot wrap does not rebuild them per call.
const schemaCodecs = new WeakMap<AnySchema, SchemaCodec>()
const schemaCodec = (schema: AnySchema): SchemaCodec => {
  let codec = schemaCodecs.get(schema)
  if (codec === undefined) {
    codec = {
      encode: Schema.encodeUnknownEither(schema),
      decode: Schema.decodeUnknownEither(schema),
      stringify: schemaOutputBytes
    }
    schemaCodecs.set(schema, codec)
  }
  return codec
}

// Without a schema the value itself is stored, and only plain JSON data is: anything else would
// replay as something other than what the first call returned.
const plainJsonCodec: SchemaCodec = {
  encode: Either.right,
  decode: Either.right,
  stringify: (value) =>
    checkedBytes(
      value,
      (problem) => `the result is not plain JSON data: ${problem.message}. Pass a \`success\` schema to store it`
    )
}

// A schema's own transformation may throw: that is an unencodable result, not a defect that
// would leave the run half-finished.
const encodeWith = (codec: SchemaCodec, value: unknown): Either.Either<Uint8Array, unknown> => {
  try {
    const encoded = codec.encode(value)
    if (Either.isLeft(encoded)) return Either.left(encoded.left)
    return Either.right(codec.stringify(encoded.right))
  } catch (error) {
    return Either.left(error)
  }
}

const decodeWith = (
  codec: SchemaCodec,
  record: IdempotencyRecord
): Either.Either<unknown, IdempotencyRecordUndecodable> => {
  try {
    const decoded = codec.decode(fromBytes(record.payload))
    return Either.mapLeft(decoded, (cause) => new IdempotencyRecordUndecodable({ key: record.key, cause }))
  } catch (cause) {
    return Either.left(new IdempotencyRecordUndecodable({ key: record.key, cause }))
  }
}

/**
 * A codec over Schemas: the success with `success` (or as a JSON value when absent), failures
 * that `failure` can encode, everything as UTF-8 JSON.
 *
 * @internal
 */
export const fromSchemas = <A, E>(
  success: Schema.Schema<A, any, never> | undefined,
  failure: Schema.Schema<any, any, never> | undefined
): ResultCodec<A, E> => {
  const successCodec = success === undefined ? plainJsonCodec : schemaCodec(success)
  const failureCodec = failure === undefined ? undefined : schemaCodec(failure)
  return {
    encodeSuccess: (value) => encodeWith(successCodec, value),
    encodeFailure: (error) => {
      if (failureCodec === undefined) return Option.none()
      return Option.getRight(encodeWith(failureCodec, error))
    },
    decode: (record) => {
      const outcome: Outcome = record.outcome
      if (outcome === "success") {
        return Either.match(decodeWith(successCodec, record), {
          onLeft: Effect.fail,
          onRight: (value) => Effect.succeed(value as A)
        })
      }
      if (failureCodec === undefined) {
        return Effect.fail(
          new IdempotencyRecordUndecodable({
            key: record.key,
            cause: new Error("a stored failure was found, but no `failure` schema was given to decode it")
          })
        )
      }
      return Either.match(decodeWith(failureCodec, record), {
        onLeft: Effect.fail,
        onRight: (error) => Effect.fail(error as E)
      })
    }
  }
}
