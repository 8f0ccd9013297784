import * as HttpMethod from "@effect/platform/HttpMethod"
import * as Duration from "effect/Duration"
import * as Either from "effect/Either"
import * as Option from "effect/Option"
import type * as IdempotencyMiddleware from "../../Http/IdempotencyMiddleware.js"
import { IdempotencyOptionsInvalid } from "../../IdempotencyError.js"
import * as internalKey from "../key.js"
import * as settings from "../settings.js"

/**
 * The page every problem `type` of the middleware points at, one section per problem.
 *
 * @internal
 */
export const defaultProblemTypeBase =
  "https://github.com/effect-idempotency/effect-idempotency/blob/main/docs/en/problem-types.md"

const mebibyte = 1024 * 1024

/**
 * The middleware's options, checked and with their defaults.
 *
 * @internal
 */
export interface Decoded extends settings.Timing {
  /** The key header as the user wrote it, for problem details; `undefined` with a `key` function. */
  readonly headerLabel: string | undefined
  /** The key header, lowercased as the platform gives header names. */
  readonly headerName: string
  readonly methods: ReadonlySet<string>
  readonly required: boolean
  readonly maxKeyLength: number
  readonly maxBodyBytes: number
  readonly maxResponseBytes: number
  readonly replayHeader: string
  readonly credentialHeaders: ReadonlyArray<string>
  readonly onUndecodable: "fail" | "run"
  readonly problemTypeBase: string
  /** The `Retry-After` of a 409 in-flight, in whole seconds, before the lease left caps it. */
  readonly inFlightRetryAfterSeconds: number
}

// RFC 9110 `token`: a header name.
const headerToken = /^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$/

// Printable ASCII without space: what a URI may hold as it is (RFC 3986 needs anything else encoded).
const uriCharacters = /^[\x21-\x7e]+$/

const invalid = (option: string, detail: string) => Either.left(new IdempotencyOptionsInvalid({ option, detail }))

const headerOption = (
  option: string,
  value: string | undefined,
  fallback: string
): Either.Either<string, IdempotencyOptionsInvalid> => {
  if (value === undefined) return Either.right(fallback)
  if (typeof value !== "string" || !headerToken.test(value)) {
    return invalid(option, `must be a header name (an HTTP token), got ${JSON.stringify(value)}`)
  }
  return Either.right(value)
}

const problemTypeBaseOption = (value: string | undefined): Either.Either<string, IdempotencyOptionsInvalid> => {
  if (value === undefined) return Either.right(defaultProblemTypeBase)
  const refused = (why: string) =>
    invalid(
      "problemTypeBase",
      `must be an absolute URI without a fragment (each problem's slug is added after "#"): ${why}, got ${
        JSON.stringify(value)
      }`
    )
  if (typeof value !== "string" || !uriCharacters.test(value)) return refused("it holds spaces or non-ASCII")
  if (value.includes("#")) return refused("it has a fragment")
  try {
    new URL(value)
  } catch {
    return refused("it is not an absolute URI")
  }
  return Either.right(value)
}

const retryAfterOption = (
  value: Duration.DurationInput | undefined
): Either.Either<number, IdempotencyOptionsInvalid> => {
  if (value === undefined) return Either.right(1)
  const decoded = Duration.decodeUnknown(value)
  if (Option.isNone(decoded)) return invalid("inFlightRetryAfter", "not a duration")
  const millis = Duration.toMillis(decoded.value)
  if (!Number.isFinite(millis) || !(millis > 0)) {
    return invalid("inFlightRetryAfter", `must be a finite duration above zero, got ${Duration.format(decoded.value)}`)
  }
  return Either.right(Math.ceil(millis / 1000))
}

/**
 * Checks the options as `make` and `makeConfig` take them, refusing what makes no sense before any
 * request comes: a header name that is not one, a limit that is not a positive whole number, a
 * `key` function beside a `header`, timing the protocol cannot keep.
 *
 * @internal
 */
export const decode = <E, R>(
  options: IdempotencyMiddleware.IdempotencyMiddlewareOptions<E, R>
): Either.Either<Decoded, IdempotencyOptionsInvalid> =>
  Either.gen(function*() {
    if (options.key !== undefined) {
      if (typeof options.key !== "function") {
        return yield* invalid("key", "must be a function from the request to an Effect of Option<string>")
      }
      if (options.header !== undefined) {
        return yield* invalid(
          "key",
          `give either \`key\` (a function) or \`header\`, not both (header: ${JSON.stringify(options.header)})`
        )
      }
    }
    const header = yield* headerOption("header", options.header, "Idempotency-Key")
    const maxKeyLength = options.maxKeyLength ?? internalKey.defaultMaxLength
    if (!Number.isInteger(maxKeyLength) || maxKeyLength < 1) {
      return yield* invalid(
        "maxKeyLength",
        `must be a whole number of characters above zero, got ${String(maxKeyLength)}`
      )
    }
    const methods = options.methods ?? ["POST", "PATCH"]
    if (!Array.isArray(methods) || !methods.every(HttpMethod.isHttpMethod)) {
      return yield* invalid(
        "methods",
        `must be a list of HTTP methods (${[...HttpMethod.all].join(", ")}), got ${JSON.stringify(methods)}`
      )
    }
    const required = options.required ?? false
    if (typeof required !== "boolean") {
      return yield* invalid("required", `must be true or false, got ${JSON.stringify(required)}`)
    }
    const maxBodyBytes = yield* settings.decodeByteLimit("maxBodyBytes", options.maxBodyBytes, mebibyte)
    const maxResponseBytes = yield* settings.decodeByteLimit("maxResponseBytes", options.maxResponseBytes, mebibyte)
    const timing = yield* settings.decodeTiming(options)
    const replayHeader = yield* headerOption("replayHeader", options.replayHeader, "Idempotent-Replayed")
    const credentialHeaders: Array<string> = []
    for (const name of options.credentialHeaders ?? ["authorization", "cookie"]) {
      credentialHeaders.push((yield* headerOption("credentialHeaders", name, name)).toLowerCase())
    }
    const onUndecodable = options.onUndecodable ?? "fail"
    if (onUndecodable !== "fail" && onUndecodable !== "run") {
      return yield* invalid("onUndecodable", `must be "fail" or "run", got ${JSON.stringify(onUndecodable)}`)
    }
    return {
      ...timing,
      headerLabel: options.key === undefined ? header : undefined,
      headerName: header.toLowerCase(),
      methods: new Set(methods),
      required,
      maxKeyLength,
      maxBodyBytes,
      maxResponseBytes,
      replayHeader: replayHeader.toLowerCase(),
      credentialHeaders,
      onUndecodable,
      problemTypeBase: yield* problemTypeBaseOption(options.problemTypeBase),
      inFlightRetryAfterSeconds: yield* retryAfterOption(options.inFlightRetryAfter)
    }
  })
