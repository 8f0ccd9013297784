import * as Either from "effect/Either"
import * as crypto from "node:crypto"

/** The fingerprint of a call that gave none. */
export const none = ""

/** @internal */
export class UnencodableFingerprint {
  constructor(readonly detail: string) {}
}

/** An object or array being printed: where it is, and what of it is left. */
interface Frame {
  readonly value: object
  /** Its place in its parent (`[3]`, `.name`), for error messages. */
  readonly segment: string
  /** An array's items, or an object's own keys in sorted order. */
  readonly items: ReadonlyArray<unknown> | undefined
  readonly keys: ReadonlyArray<string> | undefined
  index: number
  empty: boolean
}

// A `toJSON` that returns another value with a `toJSON`, and so on: followed this many times at most.
const maxToJsonChain = 64

/**
 * Canonical JSON: object keys sorted, so `{ a, b }` and `{ b, a }` are the same fingerprint.
 * Follows `JSON.stringify` (`toJSON` honoured, `undefined` properties dropped, `undefined` in arrays
 * as `null`) but refuses what JSON would silently mangle or throw on: bigints, symbols, functions
 * and non-finite numbers as values, Maps and Sets, and cycles.
 *
 * Linear in the size of the value, however deep: the open objects are a stack of frames, not
 * recursion, the cycle check is a set of them, and the path an error names is built only for the
 * error.
 *
 * @internal
 */
export const canonicalJson = (input: unknown): string => {
  const stack: Array<Frame> = []
  const ancestors = new Set<object>()
  let out = ""
  const path = (segment: string) => "fingerprint" + stack.map((frame) => frame.segment).join("") + segment

  // Prints a value, or opens a frame for an object or array.
  const write = (item: unknown, segment: string): void => {
    let value = item
    for (let chain = 0; typeof value === "object" && value !== null; chain++) {
      if (ancestors.has(value)) throw new UnencodableFingerprint(`${path(segment)} is a cycle`)
      if (typeof (value as { toJSON?: unknown }).toJSON !== "function") break
      if (chain === maxToJsonChain) {
        throw new UnencodableFingerprint(`${path(segment)} has more than ${maxToJsonChain} nested toJSON results`)
      }
      value = (value as { toJSON: () => unknown }).toJSON()
    }
    switch (typeof value) {
      case "string":
        out += JSON.stringify(value)
        return
      case "boolean":
        out += value ? "true" : "false"
        return
      case "number":
        if (!Number.isFinite(value)) throw new UnencodableFingerprint(`${path(segment)} is ${value}, not a JSON number`)
        out += JSON.stringify(value)
        return
      case "object": {
        if (value === null) {
          out += "null"
          return
        }
        if (value instanceof Map || value instanceof Set) {
          throw new UnencodableFingerprint(`${path(segment)} is a ${value.constructor.name}, not a JSON value`)
        }
        ancestors.add(value)
        if (Array.isArray(value)) {
          out += "["
          stack.push({ value, segment, items: value, keys: undefined, index: 0, empty: true })
        } else {
          out += "{"
          stack.push({ value, segment, items: undefined, keys: Object.keys(value).sort(), index: 0, empty: true })
        }
        return
      }
      default:
        throw new UnencodableFingerprint(`${path(segment)} is a ${typeof value}, not a JSON value`)
    }
  }

  write(input, "")
  while (stack.length > 0) {
    const frame = stack[stack.length - 1]!
    if (frame.items !== undefined) {
      if (frame.index === frame.items.length) {
        out += "]"
        ancestors.delete(frame.value)
        stack.pop()
        continue
      }
      const i = frame.index++
      const item = frame.items[i]
      if (i > 0) out += ","
      if (item === undefined || typeof item === "function") out += "null"
      else write(item, `[${i}]`)
    } else {
      const keys = frame.keys!
      if (frame.index === keys.length) {
        out += "}"
        ancestors.delete(frame.value)
        stack.pop()
        continue
      }
      const key = keys[frame.index++]!
      const item = (frame.value as Record<string, unknown>)[key]
      if (item === undefined || typeof item === "function") continue
      if (!frame.empty) out += ","
      frame.empty = false
      out += JSON.stringify(key) + ":"
      write(item, `.${key}`)
    }
  }
  return out
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
