import * as HttpRouter from "@effect/platform/HttpRouter"
import * as HttpServerError from "@effect/platform/HttpServerError"
import type * as HttpServerRequest from "@effect/platform/HttpServerRequest"
import * as UrlParams from "@effect/platform/UrlParams"
import * as Chunk from "effect/Chunk"
import * as Context from "effect/Context"
import * as Effect from "effect/Effect"
import * as Either from "effect/Either"
import * as Option from "effect/Option"
import * as Scope from "effect/Scope"
import * as Stream from "effect/Stream"
import { sha256 } from "../fingerprint.js"
import { canonicalize } from "./canonicalJson.js"

/**
 * The request body is larger than `maxBodyBytes`.
 *
 * @internal
 */
export class BodyTooLarge {
  readonly _tag = "BodyTooLarge"
  constructor(readonly limit: number) {}
}

const mediaType = (contentType: string) => contentType.split(";")[0]!.trim().toLowerCase()

/**
 * Multipart bodies are left for the handler to stream: buffering an upload to fingerprint it
 * would hold whole files in memory, and the platform parses multipart from the raw request.
 *
 * @internal
 */
export const isBuffered = (request: HttpServerRequest.HttpServerRequest): boolean =>
  !mediaType(request.headers["content-type"] ?? "").startsWith("multipart/")

/**
 * `true` when `Content-Length` alone says the body is too large, so it need not be read.
 *
 * @internal
 */
export const declaredTooLarge = (request: HttpServerRequest.HttpServerRequest, limit: number): boolean => {
  const declared = request.headers["content-length"]
  return declared !== undefined && Number(declared) > limit
}

const concat = (chunks: ReadonlyArray<Uint8Array>, size: number): Uint8Array => {
  if (chunks.length === 1) return chunks[0]!
  const out = new Uint8Array(size)
  let offset = 0
  for (const chunk of chunks) {
    out.set(chunk, offset)
    offset += chunk.length
  }
  return out
}

/**
 * Reads the body, failing with `BodyTooLarge` as soon as it passes `limit` bytes (a chunked body
 * has no `Content-Length` to check first).
 *
 * The stream is pulled in the request's scope: a body read to its end is done with, and one that
 * was cut off is destroyed when the request ends, after the 413 has gone out. Closing it at once
 * would reset the connection under the response.
 *
 * @internal
 */
export const readBody = (
  request: HttpServerRequest.HttpServerRequest,
  limit: number
): Effect.Effect<Uint8Array, BodyTooLarge | HttpServerError.RequestError> =>
  Effect.flatMap(Effect.serviceOption(Scope.Scope), (requestScope) => {
    const read = Effect.flatMap(Stream.toPull(request.stream), (pull) => {
      const chunks: Array<Uint8Array> = []
      let size = 0
      const loop: Effect.Effect<Uint8Array, BodyTooLarge | HttpServerError.RequestError> = Effect.matchEffect(pull, {
        onFailure: Option.match({
          onNone: () => Effect.sync(() => concat(chunks, size)),
          onSome: Effect.fail
        }),
        onSuccess: (chunk) => {
          for (const bytes of Chunk.toReadonlyArray(chunk)) {
            size += bytes.length
            if (size > limit) return Effect.fail(new BodyTooLarge(limit))
            chunks.push(bytes)
          }
          return loop
        }
      })
      return loop
    })
    return Option.match(requestScope, {
      onNone: () => Effect.scoped(read),
      onSome: (scope) => Scope.extend(read, scope)
    })
  })

const textDecoder = new TextDecoder()

/**
 * The request with its body served from `body`, already read. Every body accessor (`text`,
 * `json`, `urlParamsBody`, `arrayBuffer`, `stream`) works for the handler, on any platform;
 * Node caches only `text`, and an `arrayBuffer` or `stream` read after the middleware's would
 * wait for a body that was already consumed.
 *
 * It is a Proxy over the platform's request rather than a new class: the platform's server reads
 * its own fields off the request it finds in the context (the Node response, the "handled" mark),
 * which a class that knew only the public interface would lose.
 *
 * @internal
 */
export const withBody = (
  request: HttpServerRequest.HttpServerRequest,
  body: Uint8Array
): HttpServerRequest.HttpServerRequest => {
  let text: string | undefined
  const readText = () => (text ??= textDecoder.decode(body))
  const decodeError = (cause: unknown) => new HttpServerError.RequestError({ request: proxy, reason: "Decode", cause })
  const overrides = new Map<PropertyKey, () => unknown>(Object.entries({
    text: () => Effect.sync(readText),
    json: () =>
      Effect.try({
        try: () => {
          const value = readText()
          return value === "" ? null : JSON.parse(value) as unknown
        },
        catch: decodeError
      }),
    urlParamsBody: () =>
      Effect.try({ try: () => UrlParams.fromInput(new URLSearchParams(readText())), catch: decodeError }),
    arrayBuffer: () => Effect.sync(() => body.slice().buffer),
    stream: () => body.length === 0 ? Stream.empty : Stream.succeed(body),
    modify: () => (options: Parameters<HttpServerRequest.HttpServerRequest["modify"]>[0]) =>
      withBody(request.modify(options), body)
  }))
  const proxy: HttpServerRequest.HttpServerRequest = new Proxy(request, {
    get: (target, property) => {
      const override = overrides.get(property)
      return override === undefined ? Reflect.get(target, property, target) : override()
    }
  })
  return proxy
}

/**
 * The request handed to a `key` function, whose body is read (within `limit`) only if the
 * function asks for it, and then served from memory to every later reader; and what came of that
 * read: `None` when the function never asked for the body.
 *
 * @internal
 */
export interface LazyBody {
  readonly request: HttpServerRequest.HttpServerRequest
  readonly result: Effect.Effect<Option.Option<Either.Either<Uint8Array, BodyTooLarge | HttpServerError.RequestError>>>
}

/**
 * The request with a body read on first use. A key function may read the body, and the handler
 * must read it again after: on Node only `text` is cached, so the middleware reads the bytes once
 * and serves every accessor from them ({@link withBody}). A body over `limit` fails the accessor
 * with a `RequestError` whose cause is `BodyTooLarge`; `result` tells the middleware, which answers
 * 413 whatever the function made of it.
 *
 * @internal
 */
export const withLazyBody = (
  request: HttpServerRequest.HttpServerRequest,
  limit: number
): Effect.Effect<LazyBody> =>
  Effect.map(
    Effect.cached(declaredTooLarge(request, limit) ? Effect.fail(new BodyTooLarge(limit)) : readBody(request, limit)),
    (read) => {
      let asked = false
      const body = Effect.suspend(() => {
        asked = true
        return read
      })
      const lazy = (target: HttpServerRequest.HttpServerRequest): HttpServerRequest.HttpServerRequest => {
        const buffered = <A>(
          use: (request: HttpServerRequest.HttpServerRequest) => Effect.Effect<A, HttpServerError.RequestError>
        ): Effect.Effect<A, HttpServerError.RequestError> =>
          body.pipe(
            Effect.mapError((error) =>
              error._tag === "BodyTooLarge"
                ? new HttpServerError.RequestError({
                  request: proxy,
                  reason: "Decode",
                  cause: error,
                  description: `the request body is larger than ${error.limit} bytes`
                })
                : error
            ),
            Effect.flatMap((bytes) => use(withBody(target, bytes)))
          )
        const overrides = new Map<PropertyKey, () => unknown>(Object.entries({
          text: () => buffered((request) => request.text),
          json: () => buffered((request) => request.json),
          urlParamsBody: () => buffered((request) => request.urlParamsBody),
          arrayBuffer: () => buffered((request) => request.arrayBuffer),
          stream: () => Stream.unwrap(buffered((request) => Effect.succeed(request.stream))),
          modify: () => (options: Parameters<HttpServerRequest.HttpServerRequest["modify"]>[0]) =>
            lazy(target.modify(options))
        }))
        const proxy: HttpServerRequest.HttpServerRequest = new Proxy(target, {
          get: (target, property) => {
            const override = overrides.get(property)
            return override === undefined ? Reflect.get(target, property, target) : override()
          }
        })
        return proxy
      }
      return {
        request: lazy(request),
        result: Effect.suspend(() => asked ? Effect.asSome(Effect.either(read)) : Effect.succeedNone)
      }
    }
  )

// The URL as the client sent it: a router that strips a mount's prefix changes `url` only.
const pathOf = (request: HttpServerRequest.HttpServerRequest) => {
  const url = request.originalUrl
  const queryStart = url.indexOf("?")
  return queryStart === -1 ? url : url.slice(0, queryStart)
}

const isJson = (type: string) => type === "application/json" || type.endsWith("+json")

// The `charset` parameter of a Content-Type, lowercased and unquoted, or `null`.
const charsetOf = (contentType: string): string | null => {
  for (const parameter of contentType.split(";").slice(1)) {
    const equals = parameter.indexOf("=")
    if (equals === -1 || parameter.slice(0, equals).trim().toLowerCase() !== "charset") continue
    return parameter.slice(equals + 1).trim().replace(/^"(.*)"$/, "$1").toLowerCase()
  }
  return null
}

/**
 * What of the body the fingerprint hashes. The media type is part of it (`application/json` and
 * `application/merge-patch+json` ask for different things with the same bytes), as its essence
 * (type/subtype, lowercased); the `charset` too for a body that is not JSON, since it changes what
 * the bytes say (JSON is always UTF-8). A JSON body that is one clean document is hashed in its
 * canonical form ({@link canonicalize}: member order and whitespace do not count, every other
 * byte does); any other body byte for byte.
 */
const bodyPart = (contentType: string, body: Uint8Array | undefined): unknown => {
  const type = mediaType(contentType)
  // A multipart body is not read; its boundary differs on every request, so only the media type counts.
  if (body === undefined) return { unread: type }
  if (body.length === 0) return null
  if (isJson(type)) {
    const canonical = canonicalize(body)
    if (canonical !== undefined) return { type, json: sha256(canonical) }
    return { type, bytes: sha256(body) }
  }
  return { type, charset: charsetOf(contentType), bytes: sha256(body) }
}

/**
 * The default fingerprint: method, path, query (parameters in name order, repeated names in
 * their order) and body, with its media type. "No body" differs from every body, even an empty
 * JSON object.
 *
 * @internal
 */
export const defaultFingerprint = (
  request: HttpServerRequest.HttpServerRequest,
  body: Uint8Array | undefined
): string => {
  const url = request.originalUrl
  const queryStart = url.indexOf("?")
  const query = queryStart === -1
    ? []
    : [...new URLSearchParams(url.slice(queryStart + 1))].sort(([a], [b]) => a < b ? -1 : a > b ? 1 : 0)
  const part = bodyPart(request.headers["content-type"] ?? "", body)
  return sha256(JSON.stringify([request.method, pathOf(request), query, part]))
}

/**
 * The route part of the scope: the matched route's template when a router put one in the context
 * (`/orders/:id/capture`, after the prefix of a mount), else the request's path. A wildcard
 * template (a mounted app) covers many endpoints, so it gives way to the path too.
 *
 * @internal
 */
export const route = (
  request: HttpServerRequest.HttpServerRequest,
  context: Context.Context<never>
): string => {
  const routeContext = Context.getOption(context, HttpRouter.RouteContext)
  if (Option.isSome(routeContext)) {
    const template = routeContext.value.route.path
    if (!template.includes("*")) return mountPrefix(request) + template
  }
  return pathOf(request)
}

// A router mounted under a prefix sees the URL without it: the prefix is what the client sent
// before the URL the router sees.
const mountPrefix = (request: HttpServerRequest.HttpServerRequest) => {
  const original = pathOf(request)
  const queryStart = request.url.indexOf("?")
  const seen = queryStart === -1 ? request.url : request.url.slice(0, queryStart)
  return original !== seen && original.endsWith(seen) ? original.slice(0, original.length - seen.length) : ""
}
