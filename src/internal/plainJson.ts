/**
 * The stored form of a result that `Idempotent.wrap` was given no `success` schema for: plain JSON
 * data, checked before it is written, so that what a retry replays is what the first call returned.
 * `JSON.stringify` alone would store a `Date` as a string, a class instance as a plain object,
 * `NaN` as `null`, and drop `undefined` array items, and the replay would be typed as the original.
 *
 * @internal
 */

/** Why a value cannot be stored as plain JSON data; `path` points at the offending part. */
export class NotPlainJson extends Error {
  constructor(readonly path: string, readonly what: string) {
    super(`${what}${path === "" ? "" : ` at ${path}`}`)
  }
}

const describe = (value: object): string => {
  const name = (value as { constructor?: { name?: unknown } }).constructor?.name
  return typeof name === "string" && name !== "" ? `a ${name}` : "an object with a prototype"
}

const propertyPath = (path: string, key: string) =>
  /^[A-Za-z_$][\w$]*$/.test(key) ? `${path}.${key}` : `${path}[${JSON.stringify(key)}]`

/**
 * Returns the first reason `value` would not replay as it is, or `undefined`; sets `negativeZero`
 * when a `-0` is found (JSON.stringify writes it as `0`).
 */
const check = (
  value: unknown,
  path: string,
  seen: Set<object>,
  found: { negativeZero: boolean }
): NotPlainJson | undefined => {
  switch (typeof value) {
    case "string":
    case "boolean":
      return undefined
    case "number":
      if (Number.isFinite(value)) {
        if (Object.is(value, -0)) found.negativeZero = true
        return undefined
      }
      return new NotPlainJson(path, `${value} has no JSON form`)
    case "object": {
      if (value === null) return undefined
      if (seen.has(value)) return new NotPlainJson(path, "a cycle")
      seen.add(value)
      try {
        if (Array.isArray(value)) {
          for (let i = 0; i < value.length; i++) {
            if (!(i in value)) return new NotPlainJson(`${path}[${i}]`, "a hole in an array")
            const item: unknown = value[i]
            if (item === undefined) return new NotPlainJson(`${path}[${i}]`, "undefined in an array")
            const problem = check(item, `${path}[${i}]`, seen, found)
            if (problem !== undefined) return problem
          }
          return undefined
        }
        const prototype: unknown = Object.getPrototypeOf(value)
        if (prototype !== Object.prototype && prototype !== null) return new NotPlainJson(path, describe(value))
        if (Object.getOwnPropertySymbols(value).length > 0) return new NotPlainJson(path, "a symbol-keyed property")
        for (const key of Object.keys(value)) {
          const item: unknown = (value as Record<string, unknown>)[key]
          // Stored as absent, as JSON does: the same value to code that reads it.
          if (item === undefined) continue
          const problem = check(item, propertyPath(path, key), seen, found)
          if (problem !== undefined) return problem
        }
        return undefined
      } finally {
        seen.delete(value)
      }
    }
    case "undefined":
      return new NotPlainJson(path, "undefined")
    default:
      return new NotPlainJson(path, `a ${typeof value}`)
  }
}

// Only for results holding a -0, which JSON.stringify would write as 0 (JSON.parse reads -0 back).
const stringifyKeepingNegativeZero = (value: unknown): string => {
  if (typeof value === "number") return Object.is(value, -0) ? "-0" : JSON.stringify(value)
  if (Array.isArray(value)) return `[${value.map(stringifyKeepingNegativeZero).join(",")}]`
  if (value !== null && typeof value === "object") {
    const members: Array<string> = []
    for (const [key, item] of Object.entries(value)) {
      if (item !== undefined) members.push(`${JSON.stringify(key)}:${stringifyKeepingNegativeZero(item)}`)
    }
    return `{${members.join(",")}}`
  }
  return JSON.stringify(value)
}

/**
 * The JSON text of `value`, or why it is not plain JSON data. `undefined` at the top (an
 * `Effect<void>`) is the caller's to handle.
 *
 * @internal
 */
export const stringify = (value: unknown): string | NotPlainJson => {
  const found = { negativeZero: false }
  const problem = check(value, "", new Set(), found)
  if (problem !== undefined) return problem
  return found.negativeZero ? stringifyKeepingNegativeZero(value) : JSON.stringify(value)
}
