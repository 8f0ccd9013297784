/**
 * The example orders API as a Layer: the routes of `Routes.ts` served by a Node HTTP server on
 * `port` (0 picks a free one; read it from `HttpServer.HttpServer`'s `address`), with idempotency
 * records in whatever `storage` layer it is given. Releasing the layer stops the server.
 */
import { HttpMiddleware, HttpServer } from "@effect/platform"
import { NodeHttpServer } from "@effect/platform-node"
import { Layer } from "effect"
import type { Storage } from "effect-idempotency"
import { createServer } from "node:http"
import { router } from "./Routes.js"
import * as Shop from "./Shop.js"

export interface ServerOptions<E, R> {
  readonly storage: Layer.Layer<Storage.Storage, E, R>
  readonly port: number
  /** The interface to listen on. Default `127.0.0.1`. */
  readonly host?: string | undefined
  /** Log a line per request (`HttpMiddleware.logger`). Default false. */
  readonly logRequests?: boolean | undefined
  readonly shop?: Shop.ShopOptions | undefined
}

export const layer = <E, R>(options: ServerOptions<E, R>) =>
  (options.logRequests === true ? HttpServer.serve(router, HttpMiddleware.logger) : HttpServer.serve(router)).pipe(
    Layer.provide(Shop.layer(options.shop)),
    Layer.provide(options.storage),
    Layer.provideMerge(NodeHttpServer.layer(createServer, { port: options.port, host: options.host ?? "127.0.0.1" }))
  )
