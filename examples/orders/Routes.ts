/**
 * The HTTP side of the example orders API, and where the idempotency middleware is mounted:
 *
 * - `POST /orders` takes `{ sku, quantity }` and answers 201 with the order, or 409 when out of
 *   stock. A key is optional; a request with one runs once, and a duplicate that arrives while the
 *   first is still running waits for its response (`onInFlight: { wait }`).
 * - `POST /payments` takes `{ orderId, amount }` and answers 201 with the payment. A key is
 *   required (400 without one), and a duplicate of a running payment gets a 409 with
 *   `Retry-After` (the default, `onInFlight: "fail"`).
 * - `GET /stats` shows how many times each handler really ran (GET is not covered).
 */
import { HttpRouter, HttpServerRequest, HttpServerResponse } from "@effect/platform"
import { Effect, ParseResult } from "effect"
import * as IdempotencyMiddleware from "effect-idempotency/Http/IdempotencyMiddleware"
import { NewOrder, NewPayment, Order, Payment, Shop, Stats } from "./Shop.js"

const invalidBody = (error: ParseResult.ParseError) =>
  HttpServerResponse.unsafeJson({
    type: "https://example.com/problems/invalid-body",
    title: "Invalid request body",
    status: 400,
    detail: ParseResult.TreeFormatter.formatErrorSync(error)
  }, { status: 400, contentType: "application/problem+json" })

/** `POST /orders`: OutOfStock renders itself as a 409 problem. */
export const createOrder = Effect.gen(function*() {
  const input = yield* HttpServerRequest.schemaBodyJson(NewOrder)
  const order = yield* Effect.flatMap(Shop, (shop) => shop.placeOrder(input))
  return yield* HttpServerResponse.schemaJson(Order)(order, { status: 201 })
}).pipe(Effect.catchTag("ParseError", (error) => Effect.succeed(invalidBody(error))))

/** `POST /payments`. */
export const capturePayment = Effect.gen(function*() {
  const input = yield* HttpServerRequest.schemaBodyJson(NewPayment)
  const payment = yield* Effect.flatMap(Shop, (shop) => shop.capturePayment(input))
  return yield* HttpServerResponse.schemaJson(Payment)(payment, { status: 201 })
}).pipe(Effect.catchTag("ParseError", (error) => Effect.succeed(invalidBody(error))))

/** `GET /stats`. */
export const stats = Effect.flatMap(Shop, (shop) => shop.stats).pipe(
  Effect.flatMap(HttpServerResponse.schemaJson(Stats))
)

/**
 * Every route, each with its own idempotency options: `HttpRouter.use` wraps the routes of the
 * router it is applied to, so the middleware knows each route's template (keys are scoped by it).
 */
export const router = HttpRouter.concatAll(
  HttpRouter.empty.pipe(
    HttpRouter.post("/orders", createOrder),
    HttpRouter.use(IdempotencyMiddleware.make({ onInFlight: { wait: "10 seconds" } }))
  ),
  HttpRouter.empty.pipe(
    HttpRouter.post("/payments", capturePayment),
    HttpRouter.use(IdempotencyMiddleware.make({ required: true }))
  ),
  HttpRouter.empty.pipe(HttpRouter.get("/stats", stats))
)
