/**
 * `npm run demo`: starts the example orders API (`examples/orders/`) on memory storage on a free
 * loopback port, then plays a client retrying over a flaky network against it, over real HTTP
 * with `fetch`. Each step says what the client sent, what came back, and how many times the
 * handler really ran (read from `GET /stats`), and checks it against what the middleware promises:
 * a wrong answer fails the run with exit code 1 and says which step and why.
 */
import { HttpServer } from "@effect/platform"
import { NodeRuntime } from "@effect/platform-node"
import { Array, Cause, Console, Data, Effect, Option } from "effect"
import { MemoryStorage } from "effect-idempotency"
import * as IdempotencyMiddleware from "effect-idempotency/Http/IdempotencyMiddleware"
import * as Server from "./orders/server.js"

class DemoFailed extends Data.TaggedError("DemoFailed")<{ readonly message: string }> {}

// --- The client --------------------------------------------------------------------------------

interface Reply {
  readonly status: number
  readonly replayed: boolean
  readonly contentType: string
  readonly text: string
}

const send = (url: string, options: { readonly method?: string; readonly key?: string; readonly body?: unknown }) =>
  Effect.tryPromise({
    try: async (): Promise<Reply> => {
      const headers: Record<string, string> = {}
      if (options.key !== undefined) headers["idempotency-key"] = options.key
      if (options.body !== undefined) headers["content-type"] = "application/json"
      const response = await fetch(url, {
        method: options.method ?? "POST",
        headers,
        ...(options.body === undefined ? {} : { body: JSON.stringify(options.body) })
      })
      return {
        status: response.status,
        replayed: response.headers.get("idempotent-replayed") === "true",
        contentType: response.headers.get("content-type") ?? "",
        text: await response.text()
      }
    },
    catch: (cause) => new DemoFailed({ message: `${options.method ?? "POST"} ${url} failed: ${String(cause)}` })
  })

const parse = (reply: Reply): Record<string, unknown> => {
  try {
    const value: unknown = JSON.parse(reply.text)
    return typeof value === "object" && value !== null ? value as Record<string, unknown> : {}
  } catch {
    return {}
  }
}

// --- The steps ---------------------------------------------------------------------------------

type Route = "orders" | "payments"

interface Step {
  readonly name: string
  readonly route: Route
  readonly key?: string
  readonly body: () => unknown
  /** How many identical requests are sent at once. */
  readonly copies: number
  readonly expect: {
    readonly status: number
    /** How many of the replies carry `Idempotent-Replayed: true`. */
    readonly replayed: number
    /** How many times the route's handler runs for the whole step. */
    readonly runs: number
    /** The problem's `type`, for an `application/problem+json` answer. */
    readonly problem?: string
    /** The step whose body every reply must repeat byte for byte. */
    readonly sameBodyAs?: string
  }
}

// Filled in by the first step, so that the payments pay for a real order.
let firstOrderId = "?"

const steps: ReadonlyArray<Step> = [
  {
    name: "first POST",
    route: "orders",
    key: "order-1",
    body: () => ({ sku: "mug", quantity: 2 }),
    copies: 1,
    expect: { status: 201, replayed: 0, runs: 1 }
  },
  {
    name: "retry, same key",
    route: "orders",
    key: "order-1",
    body: () => ({ sku: "mug", quantity: 2 }),
    copies: 1,
    expect: { status: 201, replayed: 1, runs: 0, sameBodyAs: "first POST" }
  },
  {
    name: "20 concurrent duplicates",
    route: "orders",
    key: "order-2",
    body: () => ({ sku: "tea", quantity: 1 }),
    copies: 20,
    expect: { status: 201, replayed: 19, runs: 1 }
  },
  {
    name: "same key, other body",
    route: "orders",
    key: "order-1",
    body: () => ({ sku: "mug", quantity: 5 }),
    copies: 1,
    expect: { status: 422, replayed: 0, runs: 0, problem: IdempotencyMiddleware.ProblemType.KeyReused }
  },
  {
    name: "out of stock",
    route: "orders",
    key: "order-3",
    body: () => ({ sku: "lamp", quantity: 1 }),
    copies: 1,
    expect: { status: 409, replayed: 0, runs: 1, problem: "https://example.com/problems/out-of-stock" }
  },
  {
    name: "retry, out of stock",
    route: "orders",
    key: "order-3",
    body: () => ({ sku: "lamp", quantity: 1 }),
    copies: 1,
    expect: {
      status: 409,
      replayed: 1,
      runs: 0,
      problem: "https://example.com/problems/out-of-stock",
      sameBodyAs: "out of stock"
    }
  },
  {
    name: "payment, no key",
    route: "payments",
    body: () => ({ orderId: firstOrderId, amount: 1998 }),
    copies: 1,
    expect: { status: 400, replayed: 0, runs: 0, problem: IdempotencyMiddleware.ProblemType.KeyMissing }
  },
  {
    name: "payment with a key",
    route: "payments",
    key: "pay-1",
    body: () => ({ orderId: firstOrderId, amount: 1998 }),
    copies: 1,
    expect: { status: 201, replayed: 0, runs: 1 }
  }
]

// One short line per distinct answer.
const summary = (reply: Reply): string => {
  const body = parse(reply)
  if (reply.contentType.startsWith("application/problem+json")) return `problem: ${String(body.title)}`
  if (typeof body.id === "string" && typeof body.sku === "string") {
    return `order ${body.id}, ${String(body.quantity)} × ${body.sku}`
  }
  if (typeof body.id === "string" && typeof body.amount === "number") return `payment ${body.id}, ${body.amount} ¢`
  return reply.text.slice(0, 40)
}

const counted = (values: ReadonlyArray<string>): string => {
  const distinct = Array.dedupe(values)
  if (values.length === 1) return values[0]!
  return distinct.map((value) => `${value} ×${values.filter((v) => v === value).length}`).join(", ")
}

const runsOf = (base: string) =>
  Effect.map(send(`${base}/stats`, { method: "GET" }), (reply) => {
    const runs = parse(reply).handlerRuns as Record<Route, number> | undefined
    return { orders: runs?.orders ?? Number.NaN, payments: runs?.payments ?? Number.NaN }
  })

const runStep = (base: string, step: Step, earlier: Map<string, string>) =>
  Effect.gen(function*() {
    const before = yield* runsOf(base)
    const body = step.body()
    const replies = yield* Effect.all(
      Array.replicate(
        send(`${base}/${step.route}`, { ...(step.key === undefined ? {} : { key: step.key }), body }),
        step.copies
      ),
      { concurrency: "unbounded" }
    )
    const after = yield* runsOf(base)
    const runs = after[step.route] - before[step.route]
    const replayed = replies.filter((reply) => reply.replayed).length
    const statuses = replies.map((reply) => String(reply.status))
    const identical = Array.dedupe(replies.map((reply) => reply.text)).length === 1

    const problems: Array<string> = []
    const { expect } = step
    if (replies.some((reply) => reply.status !== expect.status)) {
      problems.push(`expected status ${expect.status} for every reply, got ${counted(statuses)}`)
    }
    if (replayed !== expect.replayed) problems.push(`expected ${expect.replayed} replayed, got ${replayed}`)
    if (runs !== expect.runs) problems.push(`expected the handler to run ${expect.runs} time(s), it ran ${runs}`)
    if (!identical) problems.push("the replies' bodies differ")
    if (expect.problem !== undefined) {
      const types = Array.dedupe(replies.map((reply) => `${reply.contentType} ${String(parse(reply).type)}`))
      const wanted = `application/problem+json ${expect.problem}`
      if (types.length !== 1 || types[0] !== wanted) problems.push(`expected ${wanted}, got ${types.join(" | ")}`)
    }
    if (expect.sameBodyAs !== undefined && replies[0]!.text !== earlier.get(expect.sameBodyAs)) {
      problems.push(`expected the body of "${expect.sameBodyAs}" byte for byte, got ${replies[0]!.text}`)
    }
    earlier.set(step.name, replies[0]!.text)

    return {
      row: {
        step: step.name,
        request: `POST /${step.route}`,
        key: step.key ?? "(none)",
        sent: String(step.copies),
        status: counted(statuses),
        replayed: `${replayed} of ${replies.length}`,
        "handler ran": String(runs),
        response: identical && replies.length > 1
          ? `${replies.length} identical: ${summary(replies[0]!)}`
          : counted(replies.map(summary)),
        check: problems.length === 0 ? "ok" : "FAIL"
      },
      problems: problems.map((problem) => `"${step.name}": ${problem}`),
      reply: replies[0]!
    }
  })

const printTable = (rows: ReadonlyArray<Record<string, string>>) => {
  const columns = Object.keys(rows[0]!)
  const widths = columns.map((column) => Math.max(column.length, ...rows.map((row) => row[column]!.length)))
  const line = (cells: ReadonlyArray<string>) => cells.map((cell, i) => cell.padEnd(widths[i]!)).join("  ").trimEnd()
  const body = rows.map((row) => line(columns.map((column) => row[column]!)))
  return Console.log([line(columns), line(widths.map((width) => "-".repeat(width))), ...body].join("\n"))
}

const program = Effect.gen(function*() {
  const address = (yield* HttpServer.HttpServer).address
  if (address._tag !== "TcpAddress") return yield* new DemoFailed({ message: "the server is not on TCP" })
  const base = `http://127.0.0.1:${address.port}`
  yield* Console.log(`Orders API on ${base} (memory storage); a client retries against it over HTTP:\n`)

  const earlier = new Map<string, string>()
  const rows: Array<Record<string, string>> = []
  const problems: Array<string> = []
  for (const step of steps) {
    const outcome = yield* runStep(base, step, earlier)
    if (step.name === "first POST") firstOrderId = String(parse(outcome.reply).id)
    rows.push(outcome.row)
    for (const problem of outcome.problems) problems.push(problem)
  }
  yield* printTable(rows)

  if (problems.length > 0) {
    return yield* new DemoFailed({ message: `${problems.length} check(s) failed:\n${problems.join("\n")}` })
  }
  const requests = steps.reduce((total, step) => total + step.copies, 0)
  const runs = yield* runsOf(base)
  yield* Console.log(
    `\nAll ${steps.length} steps behaved as promised: ${requests} requests, the handlers ran ` +
      `${runs.orders + runs.payments} times (orders ${runs.orders}, payments ${runs.payments}).`
  )
})

// The server is a layer around the client: it stops (and the process ends) when the client is done.
program.pipe(
  Effect.provide(Server.layer({ storage: MemoryStorage.layer(), port: 0 })),
  Effect.tapErrorCause((cause) =>
    Option.match(Cause.failureOption(cause), {
      onSome: (error) => Console.error(`\ndemo failed: ${error.message}`),
      onNone: () => Console.error(`\ndemo failed:\n${Cause.pretty(cause)}`)
    })
  ),
  (effect) => NodeRuntime.runMain(effect, { disableErrorReporting: true })
)
