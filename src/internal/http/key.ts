import * as Either from "effect/Either"
import { IdempotencyKeyInvalid } from "../../IdempotencyError.js"
import * as internalKey from "../key.js"

const malformed = (detail: string) =>
  Either.left(new IdempotencyKeyInvalid({ key: "", reason: "malformed-header", detail }))

const isOws = (code: number) => code === 0x20 || code === 0x09

// A bare key: visible ASCII without DQUOTE and comma, which would make it a quoted string or a list.
const isBare = (code: number) => code >= 0x21 && code <= 0x7e && code !== 0x22 && code !== 0x2c

/**
 * Reads the idempotency key header: a bare token (`Idempotency-Key: 8e03978e`, as Stripe clients
 * send it) or an RFC 8941 sf-string (`Idempotency-Key: "8e03978e"`, as the IETF draft writes it),
 * whose only escapes are `\"` and `\\`. Servers join repeated header lines with `, `, so a comma
 * after the first item means the header came more than once (or held a list): refused, since
 * picking one of two keys would be a guess. The key itself is then checked like any other key.
 *
 * @internal
 */
export const parse = (value: string, maxLength: number): Either.Either<string, IdempotencyKeyInvalid> => {
  let start = 0
  let end = value.length
  while (start < end && isOws(value.charCodeAt(start))) start++
  while (end > start && isOws(value.charCodeAt(end - 1))) end--
  if (start === end) return internalKey.validate("", maxLength)

  let key: string
  let i = start
  if (value.charCodeAt(i) === 0x22) {
    key = ""
    i++
    let closed = false
    while (i < end) {
      const code = value.charCodeAt(i)
      if (code === 0x5c) {
        const next = value.charCodeAt(i + 1)
        if (next !== 0x22 && next !== 0x5c) return malformed("a quoted key may only escape `\"` and `\\`")
        key += value[i + 1]
        i += 2
      } else if (code === 0x22) {
        closed = true
        i++
        break
      } else if (code >= 0x20 && code <= 0x7e) {
        key += value[i]
        i++
      } else {
        return malformed("a quoted key may hold printable ASCII only")
      }
    }
    if (!closed) return malformed("the quoted key has no closing quote")
  } else {
    while (i < end && isBare(value.charCodeAt(i))) i++
    key = value.slice(start, i)
  }

  let rest = i
  while (rest < end && isOws(value.charCodeAt(rest))) rest++
  if (rest < end) {
    if (value.charCodeAt(rest) === 0x2c) {
      return Either.left(
        new IdempotencyKeyInvalid({
          key: "",
          reason: "duplicate-header",
          detail: "the header was sent more than once, or holds a list: send exactly one key"
        })
      )
    }
    return malformed("the header is neither a bare key nor one quoted string")
  }
  return internalKey.validate(key, maxLength)
}
