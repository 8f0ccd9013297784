/**
 * The business side of the example orders API: a warehouse with stock, orders and payments. It
 * knows nothing about HTTP or idempotency; it only counts how many times each operation really
 * ran, which is what the demo checks the middleware against.
 */
import { HttpServerRespondable, HttpServerResponse } from "@effect/platform"
import { Context, DateTime, Duration, Effect, Layer, Schema } from "effect"
import { randomUUID } from "node:crypto"

/** `POST /orders` body. */
export class NewOrder extends Schema.Class<NewOrder>("NewOrder")({
  sku: Schema.NonEmptyTrimmedString,
  quantity: Schema.Int.pipe(Schema.positive())
}) {}

export class Order extends Schema.Class<Order>("Order")({
  id: Schema.String,
  sku: Schema.String,
  quantity: Schema.Int,
  createdAt: Schema.DateTimeUtc
}) {}

/** `POST /payments` body: an amount in cents for an order. */
export class NewPayment extends Schema.Class<NewPayment>("NewPayment")({
  orderId: Schema.NonEmptyTrimmedString,
  amount: Schema.Int.pipe(Schema.positive())
}) {}

export class Payment extends Schema.Class<Payment>("Payment")({
  id: Schema.String,
  orderId: Schema.String,
  amount: Schema.Int,
  status: Schema.Literal("captured"),
  capturedAt: Schema.DateTimeUtc
}) {}

/**
 * Not enough stock for an order: a business answer, not a bug. It renders itself as a 409
 * problem, so the idempotency middleware stores that response and replays it to every retry (a
 * retry must not suddenly succeed because stock came back in the meantime).
 */
export class OutOfStock extends Schema.TaggedError<OutOfStock>()("OutOfStock", {
  sku: Schema.String,
  requested: Schema.Int,
  available: Schema.Int
}) {
  [HttpServerRespondable.symbol]() {
    return HttpServerResponse.unsafeJson({
      type: "https://example.com/problems/out-of-stock",
      title: "Out of stock",
      status: 409,
      detail: `${this.requested} × ${this.sku} requested, ${this.available} in stock.`
    }, { status: 409, contentType: "application/problem+json" })
  }
}

/** How many times each handler's body really ran, as `GET /stats` shows it. */
export class Stats extends Schema.Class<Stats>("Stats")({
  handlerRuns: Schema.Struct({ orders: Schema.Int, payments: Schema.Int }),
  stock: Schema.Record({ key: Schema.String, value: Schema.Int })
}) {}

export interface ShopOptions {
  /** Units in stock per SKU. Default: `mug` 1,000, `tea` 250, `lamp` 0. */
  readonly stock?: Readonly<Record<string, number>> | undefined
  /**
   * How long each order and payment takes, standing in for a database and a payment provider:
   * long enough for concurrent duplicates to arrive while the first one runs. Default 100 millis.
   */
  readonly latency?: Duration.DurationInput | undefined
}

export class Shop extends Context.Tag("examples/orders/Shop")<Shop, {
  readonly placeOrder: (order: NewOrder) => Effect.Effect<Order, OutOfStock>
  readonly capturePayment: (payment: NewPayment) => Effect.Effect<Payment>
  readonly stats: Effect.Effect<Stats>
}>() {}

const shortId = (prefix: string) => Effect.sync(() => `${prefix}_${randomUUID().replaceAll("-", "").slice(0, 12)}`)

export const make = (options?: ShopOptions) =>
  Effect.sync(() => {
    const stock = new Map(Object.entries(options?.stock ?? { mug: 1_000, tea: 250, lamp: 0 }))
    const latency = Duration.decode(options?.latency ?? Duration.millis(100))
    const runs = { orders: 0, payments: 0 }
    const work = Duration.isZero(latency) ? Effect.void : Effect.sleep(latency)

    return Shop.of({
      placeOrder: (order) =>
        Effect.gen(function*() {
          runs.orders++
          yield* work
          const available = stock.get(order.sku) ?? 0
          if (available < order.quantity) {
            return yield* new OutOfStock({ sku: order.sku, requested: order.quantity, available })
          }
          stock.set(order.sku, available - order.quantity)
          return new Order({
            id: yield* shortId("ord"),
            sku: order.sku,
            quantity: order.quantity,
            createdAt: yield* DateTime.now
          })
        }),
      capturePayment: (payment) =>
        Effect.gen(function*() {
          runs.payments++
          yield* work
          return new Payment({
            id: yield* shortId("pay"),
            orderId: payment.orderId,
            amount: payment.amount,
            status: "captured",
            capturedAt: yield* DateTime.now
          })
        }),
      stats: Effect.sync(() => new Stats({ handlerRuns: { ...runs }, stock: Object.fromEntries(stock) }))
    })
  })

export const layer = (options?: ShopOptions): Layer.Layer<Shop> => Layer.effect(Shop, make(options))
