import * as Either from "effect/Either"
import * as crypto from "node:crypto"

/** The fingerprint of a call that gave none. */
export const none = ""

/** @internal */
export class UnencodableFingerprint {
  constructor(readonly detail: string) {}
}

/**
 * Canonical JSON: object keys sorted, so `{ a, b }` and `{ b, a }` are the same fingerprint.
 * Follows `JSON.stringify` (`toJSON` honoured, `undefined` properties dropped, `undefined` in arrays
 * as `null`) but refuses what JSON would silently mangle or throw on: bigints, symbols, functions
 * and non-finite numbers as values, Maps and Sets, and cycles.
 *
 * @internal
 */
export const canonicalJson = (value: unknown): string => {
  const ancestors: Array<object> = []
  const encode = (value: unknown, path: string): string => {
    switch (typeof value) {
      case "string":
        return JSON.stringify(value)
      case "boolean":
        return value ? "true" : "false"
      case "number":
        if (!Number.isFinite(value)) throw new UnencodableFingerprint(`${path} is ${value}, not a JSON number`)
        return JSON.stringify(value)
      case "object": {
        if (value === null) return "null"
        if (ancestors.includes(value)) throw new UnencodableFingerprint(`${path} is a cycle`)
        if (typeof (value as { toJSON?: unknown }).toJSON === "function") {
          return encode((value as { toJSON: () => unknown }).toJSON(), path)
        }
        if (value instanceof Map || value instanceof Set) {
          throw new UnencodableFingerprint(`${path} is a ${value.constructor.name}, not a JSON value`)
        }
        ancestors.push(value)
        let out: string
        if (Array.isArray(value)) {
          out = "["
          for (let i = 0; i < value.length; i++) {
            const item: unknown = value[i]
            if (i > 0) out += ","
            out += item === undefined || typeof item === "function" ? "null" : encode(item, `${path}[${i}]`)
          }
          out += "]"
        } else {
          const record = value as Record<string, unknown>
          const keys = Object.keys(record).sort()
          out = "{"
          let first = true
          for (const key of keys) {
            const item = record[key]
            if (item === undefined || typeof item === "function") continue
            if (!first) out += ","
            first = false
            out += JSON.stringify(key) + ":" + encode(item, `${path}.${key}`)
          }
          out += "}"
        }
        ancestors.pop()
        return out
      }
      default:
        throw new UnencodableFingerprint(`${path} is a ${typeof value}, not a JSON value`)
    }
  }
  return encode(value, "fingerprint")
}

// `crypto.hash` (Node 20.12 and later) hashes in one call, about three times faster than a Hash
// object for short inputs such as keys; earlier Node 20 releases have only `createHash`.
const hashOnce = typeof crypto.hash === "function" ? crypto.hash : undefined

/** SHA-256 (hex) of a string or bytes. */
export const sha256 = (input: string | Uint8Array): string =>
  hashOnce !== undefined
    ? hashOnce("sha256", input, "hex")
    : crypto.createHash("sha256").update(input).digest("hex")

/**
 * The stored fingerprint of a value: SHA-256 of its canonical JSON, or {@link none} when absent.
 *
 * @internal
 */
export const make = (value: unknown): Either.Either<string, UnencodableFingerprint> => {
  if (value === undefined) return Either.right(none)
  try {
    return Either.right(sha256(canonicalJson(value)))
  } catch (error) {
    if (error instanceof UnencodableFingerprint) return Either.left(error)
    return Either.left(new UnencodableFingerprint(error instanceof Error ? error.message : String(error)))
  }
}

/**
 * A short hash of a key for spans, logs and metrics, so that raw keys (which may carry user data)
 * never leave the process.
 *
 * @internal
 */
export const keyHash = (key: string): string => keyDigest(key).slice(0, 16)

// One call hashes its key for its span, then for the store's names at acquire and at commit:
// remembering the last key makes that one hash in the common case.
let lastKey: string | undefined
let lastDigest = ""

/**
 * SHA-256 (hex) of a key, remembered for the most recent key.
 *
 * @internal
 */
export const keyDigest = (key: string): string => {
  if (key !== lastKey) {
    lastDigest = sha256(key)
    lastKey = key
  }
  return lastDigest
}
