import * as Duration from "effect/Duration"
import * as Either from "effect/Either"
import * as Option from "effect/Option"
import { IdempotencyOptionsInvalid } from "../IdempotencyError.js"

/**
 * The options that `Idempotent.wrap` and the HTTP middleware share, as the caller writes them.
 *
 * @internal
 */
export interface TimingOptions {
  readonly ttl?: Duration.DurationInput | undefined
  readonly lease?: Duration.DurationInput | undefined
  readonly onInFlight?: "fail" | { readonly wait: Duration.DurationInput } | undefined
}

/**
 * The same options decoded and checked.
 *
 * @internal
 */
export interface Timing {
  readonly ttl: Duration.Duration
  readonly lease: Duration.Duration
  /** How long a duplicate waits for the first run; `undefined` to fail at once. */
  readonly wait: Duration.Duration | undefined
}

/** @internal */
export const defaultTtl = Duration.hours(24)

/** @internal */
export const defaultLease = Duration.seconds(30)

const invalid = (option: string, detail: string) => Either.left(new IdempotencyOptionsInvalid({ option, detail }))

/**
 * Decodes `ttl`, `lease` and `onInFlight`, refusing what would break the protocol: a lease of
 * zero renews in a busy loop and expires before any run; a `ttl` shorter than the lease can drop a
 * record before a commit retried within the lease lands, which then reads as a lost lease.
 *
 * @internal
 */
export const decodeTiming = (options: TimingOptions): Either.Either<Timing, IdempotencyOptionsInvalid> => {
  const ttl = Duration.decodeUnknown(options.ttl ?? defaultTtl)
  const lease = Duration.decodeUnknown(options.lease ?? defaultLease)
  if (Option.isNone(ttl)) return invalid("ttl", "not a duration")
  if (Option.isNone(lease)) return invalid("lease", "not a duration")
  const leaseMillis = Duration.toMillis(lease.value)
  if (!(leaseMillis > 0) || !Number.isFinite(leaseMillis)) {
    return invalid("lease", `must be a finite duration above zero, got ${Duration.format(lease.value)}`)
  }
  if (!Number.isFinite(Duration.toMillis(ttl.value)) || Duration.lessThan(ttl.value, lease.value)) {
    return invalid(
      "ttl",
      `must be finite and at least the lease (${Duration.format(lease.value)}), got ${Duration.format(ttl.value)}`
    )
  }
  const onInFlight = options.onInFlight ?? "fail"
  if (onInFlight === "fail") return Either.right({ ttl: ttl.value, lease: lease.value, wait: undefined })
  const wait = typeof onInFlight === "object" && onInFlight !== null
    ? Duration.decodeUnknown(onInFlight.wait)
    : undefined
  if (wait === undefined || Option.isNone(wait)) {
    return invalid("onInFlight", "must be \"fail\" or { wait: a duration }")
  }
  return Either.right({ ttl: ttl.value, lease: lease.value, wait: wait.value })
}

/**
 * Checks a byte limit: a positive whole number, or infinity for none.
 *
 * @internal
 */
export const decodeByteLimit = (
  option: string,
  value: number | undefined,
  fallback: number
): Either.Either<number, IdempotencyOptionsInvalid> => {
  if (value === undefined) return Either.right(fallback)
  if (value === Number.POSITIVE_INFINITY || (Number.isInteger(value) && value > 0)) return Either.right(value)
  return invalid(option, `must be a whole number of bytes above zero, got ${String(value)}`)
}
