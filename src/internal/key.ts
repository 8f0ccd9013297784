import * as Either from "effect/Either"
import { IdempotencyKeyInvalid } from "../IdempotencyError.js"

/** @internal */
export const defaultMaxLength = 255

// C0 and C1 control characters and DEL: they break logs, headers and storage keys.
const controlCharacter = /[\u0000-\u001f\u007f-\u009f]/
// Read by code point (the `u` flag), a surrogate pair is one character: only lone halves match.
const loneSurrogate = /\p{Cs}/u

/**
 * Checks a key: 1 to `maxLength` characters (code points), valid Unicode, no control characters.
 *
 * @internal
 */
export const validate = (key: string, maxLength = defaultMaxLength): Either.Either<string, IdempotencyKeyInvalid> => {
  if (typeof key !== "string" || key.length === 0) {
    return Either.left(new IdempotencyKeyInvalid({ key: "", reason: "empty", detail: "the key is empty" }))
  }
  // UTF-16 length is never below the code point count, so only long strings need counting.
  if (key.length > maxLength) {
    let codePoints = 0
    for (const _ of key) codePoints++
    if (codePoints > maxLength) {
      return Either.left(
        new IdempotencyKeyInvalid({
          key: key.slice(0, 32),
          reason: "too-long",
          detail: `the key has ${codePoints} characters, more than ${maxLength}`
        })
      )
    }
  }
  // Storage encodes keys as UTF-8, which turns every lone surrogate into U+FFFD: "a\uD800",
  // "a\uDC00" and "a\uFFFD" would share one record there while memory keeps them apart.
  if (loneSurrogate.test(key)) {
    return Either.left(
      new IdempotencyKeyInvalid({
        key: key.replace(new RegExp(loneSurrogate, "gu"), "?").slice(0, 32),
        reason: "invalid-unicode",
        detail: "the key contains a lone surrogate (it is not valid Unicode)"
      })
    )
  }
  if (controlCharacter.test(key)) {
    return Either.left(
      new IdempotencyKeyInvalid({
        key: key.replace(new RegExp(controlCharacter, "g"), "?"),
        reason: "control-character",
        detail: "the key contains a control character"
      })
    )
  }
  return Either.right(key)
}
