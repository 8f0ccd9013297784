import { Effect, Schema } from "effect"
import { Idempotent, MemoryStorage } from "effect-idempotency"

class Order extends Schema.Class<Order>("Order")({
  id: Schema.String,
  total: Schema.Number,
  placedAt: Schema.Date
}) {}

class OutOfStock extends Schema.TaggedError<OutOfStock>()("OutOfStock", { sku: Schema.String }) {}

interface NewOrder {
  readonly requestId: string
  readonly sku: string
  readonly quantity: number
}

let charged = 0
const createOrder = (input: NewOrder): Effect.Effect<Order, OutOfStock> =>
  Effect.sync(() => {
    charged++
    return new Order({ id: `order-${charged}`, total: 10 * input.quantity, placedAt: new Date() })
  })

const placeOrder = (input: NewOrder) =>
  createOrder(input).pipe(
    Idempotent.wrap({
      key: input.requestId,
      fingerprint: input,
      success: Order,
      failure: OutOfStock,
      ttl: "24 hours",
      onInFlight: { wait: "10 seconds" }
    })
  )

const program = Effect.gen(function*() {
  const input = { requestId: "req-42", sku: "tea", quantity: 2 }
  const first = yield* placeOrder(input)
  const retry = yield* placeOrder(input) // replayed from storage: createOrder does not run again
  yield* Effect.log(`${first.id} ${retry.id}, charged ${charged} time(s)`)
})

Effect.runPromise(program.pipe(Effect.provide(MemoryStorage.layer())))
