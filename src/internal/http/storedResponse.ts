import * as HttpServerResponse from "@effect/platform/HttpServerResponse"
import * as Effect from "effect/Effect"
import * as Either from "effect/Either"
import * as Option from "effect/Option"
import { IdempotencyRecordUndecodable } from "../../IdempotencyError.js"
import type { IdempotencyRecord } from "../../IdempotencyRecord.js"
import type { ResultCodec } from "../resultCodec.js"

/**
 * A response as it is stored and replayed: status, headers (a name once per value, in order) and
 * the body bytes, or `undefined` for a response that had no body at all (an empty 204), which is
 * replayed without a `Content-Length`.
 *
 * @internal
 */
export interface StoredResponse {
  readonly status: number
  readonly statusText: string | undefined
  readonly headers: ReadonlyArray<readonly [name: string, value: string]>
  readonly body: Uint8Array | undefined
}

/**
 * Why a response was sent but not stored: a body that is not in memory (a stream, a file, form
 * data), or more bytes than `maxResponseBytes`.
 *
 * @internal
 */
export type NotStoredReason = "streamed" | "too-large"

// Never stored: cookies belong to the first caller's session, hop-by-hop headers to its
// connection, and `Content-Length` is recomputed from the stored body.
const dropped = new Set([
  "set-cookie",
  "content-length",
  "connection",
  "keep-alive",
  "te",
  "trailer",
  "transfer-encoding",
  "upgrade"
])

const isDropped = (name: string, connectionTokens: ReadonlySet<string>) =>
  dropped.has(name) || name.startsWith("proxy-") || connectionTokens.has(name)

const textEncoder = new TextEncoder()

const bodyBytes = (
  response: HttpServerResponse.HttpServerResponse
): Either.Either<Uint8Array | undefined, "streamed"> => {
  const body = response.body
  switch (body._tag) {
    case "Empty":
      return Either.right(undefined)
    case "Uint8Array":
      return Either.right(body.body)
    case "Raw":
      if (typeof body.body === "string") return Either.right(textEncoder.encode(body.body))
      if (body.body instanceof Uint8Array) return Either.right(body.body)
      return Either.left("streamed")
    case "FormData":
    case "Stream":
      return Either.left("streamed")
  }
}

/**
 * What of `response` can be stored, or why it cannot.
 *
 * @internal
 */
export const fromResponse = (
  response: HttpServerResponse.HttpServerResponse,
  maxBytes: number,
  replayHeader: string
): Either.Either<StoredResponse, NotStoredReason> => {
  const body = bodyBytes(response)
  if (Either.isLeft(body)) return Either.left(body.left)
  if (body.right !== undefined && body.right.length > maxBytes) return Either.left("too-large")
  // Header values are strings by type; a value set behind the type's back as an array (Node
  // writes one header line per element) keeps all its values.
  const source = response.headers as unknown as Record<string, string | ReadonlyArray<string>>
  const connection = source["connection"]
  const connectionTokens = new Set(
    (typeof connection === "string" ? [connection] : connection ?? []).flatMap((value) =>
      value.split(",").map((token) => token.trim().toLowerCase())
    )
  )
  const headers: Array<readonly [string, string]> = []
  for (const name of Object.keys(source)) {
    if (name === replayHeader || isDropped(name, connectionTokens)) continue
    const value = source[name]!
    if (typeof value === "string") headers.push([name, value])
    else for (const item of value) headers.push([name, item])
  }
  return Either.right({ status: response.status, statusText: response.statusText, headers, body: body.right })
}

/**
 * The response a replay sends: the stored status, headers and body, and `replayHeader: true`.
 *
 * @internal
 */
export const toResponse = (stored: StoredResponse, replayHeader: string): HttpServerResponse.HttpServerResponse => {
  const single = new Map<string, string>()
  const multiple = new Map<string, Array<string>>()
  for (const [name, value] of stored.headers) {
    const values = multiple.get(name)
    if (values !== undefined) {
      values.push(value)
      continue
    }
    const first = single.get(name)
    if (first === undefined) {
      single.set(name, value)
    } else {
      single.delete(name)
      multiple.set(name, [first, value])
    }
  }
  single.set(replayHeader, "true")
  const options = { status: stored.status, statusText: stored.statusText, headers: single }
  let response = stored.body === undefined
    ? HttpServerResponse.empty(options)
    : HttpServerResponse.raw(stored.body, { ...options, contentLength: stored.body.length })
  for (const [name, values] of multiple) {
    // `Headers` joins arrays into one line; set as they were stored, Node writes a line per value.
    response = HttpServerResponse.setHeader(response, name, values as unknown as string)
  }
  return response
}

/**
 * The stored form, format version 1:
 *
 * | bytes | what |
 * | --- | --- |
 * | 1 | the format version, `1` |
 * | 4 | the head's length in bytes, unsigned, big endian |
 * | head | a UTF-8 JSON object: `s` status, `t` status text (optional), `h` header pairs, `b` 1 when there is a body |
 * | rest | the body bytes, as sent (never base64'd or copied into JSON: a replay costs one slice) |
 *
 * How the format evolves, so that instances of two versions can share a store during a rolling
 * deploy:
 *
 * - a change an older reader may ignore (a new property in the head) keeps version 1: readers
 *   read the properties they know and ignore the others (tested);
 * - any other change takes a new version byte, and a reader refuses a version it does not know
 *   with `IdempotencyRecordUndecodable` (the middleware answers 503 with `Retry-After`, so the
 *   retry may reach an instance that reads it), never with a misread response. The head's length
 *   prefix stays in every version, so a reader can always skip the head.
 *
 * @internal
 */
export const formatVersion = 1
const headOffset = 5
const textDecoder = new TextDecoder()

interface Head {
  readonly s: number
  readonly t?: string
  readonly h: ReadonlyArray<readonly [string, string]>
  readonly b: 0 | 1
}

const encode = (stored: StoredResponse): Uint8Array => {
  const head: Head = {
    s: stored.status,
    ...(stored.statusText === undefined ? {} : { t: stored.statusText }),
    h: stored.headers,
    b: stored.body === undefined ? 0 : 1
  }
  const headBytes = textEncoder.encode(JSON.stringify(head))
  const body = stored.body ?? new Uint8Array(0)
  const out = new Uint8Array(headOffset + headBytes.length + body.length)
  const view = new DataView(out.buffer)
  view.setUint8(0, formatVersion)
  view.setUint32(1, headBytes.length)
  out.set(headBytes, headOffset)
  out.set(body, headOffset + headBytes.length)
  return out
}

const isHead = (u: unknown): u is Head => {
  if (typeof u !== "object" || u === null) return false
  const head = u as Record<string, unknown>
  return Number.isInteger(head.s) && (head.s as number) >= 100 && (head.s as number) <= 999 &&
    (head.t === undefined || typeof head.t === "string") &&
    (head.b === 0 || head.b === 1) && Array.isArray(head.h) &&
    head.h.every((pair) =>
      Array.isArray(pair) && pair.length === 2 && typeof pair[0] === "string" && typeof pair[1] === "string"
    )
}

const decode = (payload: Uint8Array): StoredResponse => {
  if (payload.length < headOffset) throw new Error("not a stored HTTP response")
  if (payload[0] !== formatVersion) {
    throw new Error(`the stored HTTP response has format version ${payload[0]}; this version reads ${formatVersion}`)
  }
  const view = new DataView(payload.buffer, payload.byteOffset, payload.byteLength)
  const headEnd = headOffset + view.getUint32(1)
  if (headEnd > payload.length) throw new Error("the stored HTTP response is truncated")
  const head: unknown = JSON.parse(textDecoder.decode(payload.subarray(headOffset, headEnd)))
  if (!isHead(head)) throw new Error("the stored HTTP response has a malformed head")
  return {
    status: head.s,
    statusText: head.t,
    headers: head.h,
    body: head.b === 0 ? undefined : payload.subarray(headEnd)
  }
}

const decodeRecord = (record: IdempotencyRecord): Effect.Effect<StoredResponse, IdempotencyRecordUndecodable> =>
  Effect.suspend(() => {
    if (record.outcome !== "success") {
      return Effect.fail(
        new IdempotencyRecordUndecodable({
          key: record.key,
          cause: new Error("the record holds a stored failure, not an HTTP response")
        })
      )
    }
    try {
      return Effect.succeed(decode(record.payload))
    } catch (cause) {
      return Effect.fail(new IdempotencyRecordUndecodable({ key: record.key, cause }))
    }
  })

/**
 * The middleware's `ResultCodec`: only whole responses are stored. Every failure is refused, so
 * a response that must not be stored (carried by the run's failure) releases the key.
 *
 * @internal
 */
export const codec = <E>(): ResultCodec<StoredResponse, E> => ({
  encodeSuccess: (stored) => Either.right(encode(stored)),
  encodeFailure: () => Option.none(),
  decode: decodeRecord
})
