/**
 * The server side of `bench/http.ts`, run as its own process so that the load generator does not
 * share its event loop: the example's `POST /orders` route served twice on free loopback ports,
 * once bare and once behind `IdempotencyMiddleware` (as the example mounts it, `onInFlight:
 * { wait }`), both on one shop (no simulated latency, endless stock), so each port's `GET /stats`
 * counts the handler's runs for both. It prints `{"bare":port,"guarded":port}` on one line of
 * stdout once both listen, and stops on SIGTERM.
 *
 * `tsx bench/httpServer.ts memory|redis`; for Redis, `REDIS_URL` and `BENCH_REDIS_PREFIX`.
 */
import { HttpRouter, HttpServer } from "@effect/platform"
import { NodeHttpServer, NodeRuntime } from "@effect/platform-node"
import { Context, Effect, Layer, Redacted } from "effect"
import { MemoryStorage } from "effect-idempotency"
import * as IdempotencyMiddleware from "effect-idempotency/Http/IdempotencyMiddleware"
import * as RedisStorage from "effect-idempotency/Storage/Redis"
import { createServer } from "node:http"
import { createOrder, stats } from "../examples/orders/Routes.js"
import * as Shop from "../examples/orders/Shop.js"

const kind = process.argv[2]

const storage = kind === "memory"
  ? MemoryStorage.layer()
  : kind === "redis"
  ? RedisStorage.layer({
    url: Redacted.make(process.env.REDIS_URL ?? "redis://127.0.0.1:6379"),
    prefix: process.env.BENCH_REDIS_PREFIX ?? "bench-http"
  })
  : undefined

const bare = HttpRouter.empty.pipe(
  HttpRouter.post("/orders", createOrder),
  HttpRouter.get("/stats", stats)
)

const guarded = HttpRouter.empty.pipe(
  HttpRouter.post("/orders", createOrder),
  HttpRouter.use(IdempotencyMiddleware.make({ onInFlight: { wait: "10 seconds" } })),
  HttpRouter.get("/stats", stats)
)

/** Serves `app` on a free loopback port until the scope closes; returns the port. */
const listen = <E, R>(app: HttpRouter.HttpRouter<E, R>) =>
  Layer.build(
    HttpServer.serve(app).pipe(
      Layer.provideMerge(NodeHttpServer.layer(createServer, { port: 0, host: "127.0.0.1" }))
    )
  ).pipe(
    Effect.flatMap((context) => {
      const address = Context.get(context, HttpServer.HttpServer).address
      return address._tag === "TcpAddress" ? Effect.succeed(address.port) : Effect.dieMessage("not on TCP")
    })
  )

const program = Effect.gen(function*() {
  if (storage === undefined) return yield* Effect.dieMessage(`usage: httpServer.ts memory|redis, got ${kind}`)
  // Built once in the program's scope, so both servers share them until the process stops.
  const shared = yield* Layer.build(
    Layer.merge(Shop.layer({ latency: 0, stock: { mug: Number.MAX_SAFE_INTEGER } }), storage)
  )
  const ports = yield* Effect.all({ bare: listen(bare), guarded: listen(guarded) }).pipe(Effect.provide(shared))
  process.stdout.write(`${JSON.stringify(ports)}\n`)
  return yield* Effect.never
})

NodeRuntime.runMain(Effect.scoped(program))
