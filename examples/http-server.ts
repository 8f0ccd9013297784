import { HttpRouter, HttpServer, HttpServerRequest, HttpServerResponse } from "@effect/platform"
import { NodeHttpServer, NodeRuntime } from "@effect/platform-node"
import { Config, Effect, Layer, Schema } from "effect"
import { MemoryStorage } from "effect-idempotency"
import * as IdempotencyMiddleware from "effect-idempotency/Http/IdempotencyMiddleware"
import { createServer } from "node:http"

const NewPayment = Schema.Struct({ orderId: Schema.String, amount: Schema.Int })

let charges = 0

// POST /payments runs once per Idempotency-Key; a retry gets the stored 201, byte for byte.
const router = HttpRouter.empty.pipe(
  HttpRouter.post(
    "/payments",
    Effect.gen(function*() {
      const payment = yield* HttpServerRequest.schemaBodyJson(NewPayment)
      charges++
      return yield* HttpServerResponse.json({ id: `pay_${charges}`, ...payment }, { status: 201 })
    }).pipe(
      // A 400 is not stored: the client may fix the body and retry with the same key.
      Effect.catchTags({
        ParseError: () => HttpServerResponse.json({ error: "invalid payment" }, { status: 400 }),
        RequestError: () => HttpServerResponse.json({ error: "unreadable body" }, { status: 400 })
      })
    )
  ),
  HttpRouter.use(IdempotencyMiddleware.make({ required: true, onInFlight: { wait: "10 seconds" } }))
)

const ServerLive = Layer.unwrapEffect(
  Effect.map(
    Config.port("PORT").pipe(Config.withDefault(3000)),
    (port) => NodeHttpServer.layer(createServer, { port, host: "127.0.0.1" })
  )
)

HttpServer.serve(router).pipe(
  HttpServer.withLogAddress,
  // One line to swap for Redis: RedisStorage.layerConfig({ url: Config.redacted("REDIS_URL") })
  Layer.provide(MemoryStorage.layer()),
  Layer.provide(ServerLive),
  Layer.launch,
  NodeRuntime.runMain
)
