import * as HttpApi from "@effect/platform/HttpApi"
import * as HttpApiSchema from "@effect/platform/HttpApiSchema"
import * as HttpServerResponse from "@effect/platform/HttpServerResponse"
import * as Cause from "effect/Cause"
import * as Effect from "effect/Effect"
import * as Option from "effect/Option"
import * as ParseResult from "effect/ParseResult"
import * as Schema from "effect/Schema"
import type * as AST from "effect/SchemaAST"

/**
 * An `HttpApi` encodes a handler's typed error into its response in `HttpApiBuilder.httpApp`,
 * outside every middleware added with `HttpApiBuilder.middleware`. The idempotency middleware
 * must store that response (a 404 or 409 the endpoint declared, not a 500), so it encodes the
 * error the same way: the union of the API's, groups' and endpoints' error schemas, each member
 * sent with its `status` annotation and encoding, as `HttpApiBuilder` does.
 */

type ErrorEncoder = (error: unknown) => Effect.Effect<HttpServerResponse.HttpServerResponse, ParseResult.ParseError>

const responseSchema = Schema.declare(HttpServerResponse.isServerResponse)

const toResponse = (
  data: unknown,
  _: AST.ParseOptions,
  ast: AST.Transformation
): Effect.Effect<HttpServerResponse.HttpServerResponse, ParseResult.ParseIssue> => {
  const status = HttpApiSchema.getStatusErrorAST(ast.to)
  if (HttpApiSchema.isVoid(ast.to)) return Effect.succeed(HttpServerResponse.empty({ status }))
  const encoding = HttpApiSchema.getEncoding(ast.to)
  switch (encoding.kind) {
    case "Json":
      return Effect.mapError(
        HttpServerResponse.json(data, { status, contentType: encoding.contentType }),
        (error) => new ParseResult.Type(ast, error, "Could not encode to JSON")
      )
    case "Text":
      return Effect.succeed(HttpServerResponse.text(data as string, { status, contentType: encoding.contentType }))
    case "Uint8Array":
      return Effect.succeed(
        HttpServerResponse.uint8Array(data as Uint8Array, { status, contentType: encoding.contentType })
      )
    case "UrlParams":
      return Effect.succeed(
        HttpServerResponse.urlParams(data as never, { status, contentType: encoding.contentType })
      )
  }
}

const encodeOnly = (data: unknown, _: AST.ParseOptions, ast: AST.Transformation) =>
  ParseResult.fail(new ParseResult.Forbidden(ast, data, "Encode only schema"))

const encoders = new WeakMap<object, ErrorEncoder>()

const encoderFor = (api: HttpApi.HttpApi.AnyWithProps): ErrorEncoder => {
  let encoder = encoders.get(api)
  if (encoder === undefined) {
    const schemas = new Set<Schema.Schema.Any>()
    HttpApiSchema.deunionize(schemas, api.errorSchema)
    for (const group of Object.values(api.groups)) {
      for (const endpoint of Object.values(group.endpoints)) {
        HttpApiSchema.deunionize(schemas, endpoint.errorSchema)
      }
      HttpApiSchema.deunionize(schemas, group.errorSchema)
    }
    const union = Schema.Union(
      ...Array.from(
        schemas,
        (schema) =>
          Schema.transformOrFail(responseSchema, schema as Schema.Schema<unknown, unknown, never>, {
            decode: encodeOnly,
            encode: toResponse
          })
      )
    )
    encoder = Schema.encodeUnknown(union) as ErrorEncoder
    encoders.set(api, encoder)
  }
  return encoder
}

/**
 * The response the serving `HttpApi` (if any is in the context) makes of a failure, or `None`
 * when there is no API or the failure is not one of its declared errors.
 *
 * @internal
 */
export const response = <E>(
  cause: Cause.Cause<E>
): Effect.Effect<Option.Option<HttpServerResponse.HttpServerResponse>> =>
  Effect.flatMap(Effect.serviceOption(HttpApi.Api), (service) => {
    if (Option.isNone(service)) return Effect.succeedNone
    const { api, context } = service.value
    return encoderFor(api as unknown as HttpApi.HttpApi.AnyWithProps)(Cause.squash(cause)).pipe(
      Effect.provide(context),
      Effect.option
    )
  })
