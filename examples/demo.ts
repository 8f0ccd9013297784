/**
 * A tiny orders service behind `Idempotent.wrap`, on memory storage: each step calls
 * `createOrder` the way a client retrying over a flaky network would, counts how often the real
 * body ran, and checks it against what the library promises. Run with `npm run demo`.
 */
import { NodeRuntime } from "@effect/platform-node"
import { Array, Cause, Console, Data, Effect, Exit, Option, Schema } from "effect"
import { type IdempotencyError, Idempotent, MemoryStorage } from "../src/index.js"

class Order extends Schema.Class<Order>("Order")({
  id: Schema.String,
  sku: Schema.String,
  quantity: Schema.Number,
  placedAt: Schema.Date
}) {}

class OutOfStock extends Schema.TaggedError<OutOfStock>()("OutOfStock", { sku: Schema.String }) {}

interface NewOrder {
  readonly requestId: string
  readonly sku: string
  readonly quantity: number
}

// --- The service -------------------------------------------------------------------------------

const stock = new Map([["mug", 500], ["lamp", 0], ["desk", 3]])
// The warehouse client crashes once on its first desk order: a bug, not a business outcome.
let deskClientBroken = true
let bodyRuns = 0

// The real work. It must not run twice for one request, or the customer is charged twice.
const placeOrder = (input: NewOrder) =>
  Effect.gen(function*() {
    bodyRuns++
    // A slow downstream call, so that concurrent duplicates overlap with the run.
    yield* Effect.sleep("20 millis")
    if (input.sku === "desk" && deskClientBroken) {
      deskClientBroken = false
      return yield* Effect.die(new Error("warehouse client crashed"))
    }
    const left = stock.get(input.sku) ?? 0
    if (left < input.quantity) return yield* new OutOfStock({ sku: input.sku })
    stock.set(input.sku, left - input.quantity)
    return new Order({ id: `ord-${bodyRuns}`, sku: input.sku, quantity: input.quantity, placedAt: new Date() })
  })

// OutOfStock is a real answer, so it is stored and replayed; a defect is not, so it frees the key.
const createOrder = (input: NewOrder) =>
  placeOrder(input).pipe(
    Idempotent.wrap({
      key: input.requestId,
      fingerprint: { sku: input.sku, quantity: input.quantity },
      success: Order,
      failure: OutOfStock,
      onInFlight: { wait: "5 seconds" }
    })
  )

// --- The scenarios -----------------------------------------------------------------------------

interface Step {
  readonly step: string
  readonly input: NewOrder
  readonly calls: number
  readonly bodyRuns: number
  readonly result: string
}

const twoMugs: NewOrder = { requestId: "req-1", sku: "mug", quantity: 2 }
const oneMug: NewOrder = { requestId: "req-2", sku: "mug", quantity: 1 }
const oneLamp: NewOrder = { requestId: "req-3", sku: "lamp", quantity: 1 }
const oneDesk: NewOrder = { requestId: "req-4", sku: "desk", quantity: 1 }
const nineMugsOnReq1: NewOrder = { ...twoMugs, quantity: 9 }

// Each step: what the client sends, how many times, and how often the body may run for it.
const steps: ReadonlyArray<Step> = [
  { step: "first run", input: twoMugs, calls: 1, bodyRuns: 1, result: "Order ord-1" },
  { step: "retry, same key", input: twoMugs, calls: 1, bodyRuns: 0, result: "Order ord-1" },
  { step: "100 concurrent duplicates", input: oneMug, calls: 100, bodyRuns: 1, result: "Order ord-2" },
  { step: "typed failure", input: oneLamp, calls: 1, bodyRuns: 1, result: "OutOfStock(lamp)" },
  { step: "retry of stored failure", input: oneLamp, calls: 1, bodyRuns: 0, result: "OutOfStock(lamp)" },
  { step: "defect (Effect.die)", input: oneDesk, calls: 1, bodyRuns: 1, result: "defect: warehouse client crashed" },
  { step: "retry after defect", input: oneDesk, calls: 1, bodyRuns: 1, result: "Order ord-5" },
  { step: "same key, other body", input: nineMugsOnReq1, calls: 1, bodyRuns: 0, result: "IdempotencyKeyReused" }
]

// One line per outcome; a replayed Order must come back as an Order instance, not a plain object.
const describe = (exit: Exit.Exit<Order, OutOfStock | IdempotencyError.IdempotencyError>): string =>
  Exit.match(exit, {
    onSuccess: (order) => order instanceof Order ? `Order ${order.id}` : "not an Order instance",
    onFailure: (cause) =>
      Option.match(Cause.failureOption(cause), {
        onSome: (error) => error._tag === "OutOfStock" ? `OutOfStock(${error.sku})` : error._tag,
        onNone: () => {
          const defect = Cause.squash(cause)
          return `defect: ${defect instanceof Error ? defect.message : String(defect)}`
        }
      })
  })

const runStep = (step: Step) =>
  Effect.gen(function*() {
    const before = bodyRuns
    const exits = yield* Effect.all(Array.replicate(Effect.exit(createOrder(step.input)), step.calls), {
      concurrency: "unbounded"
    })
    const runs = bodyRuns - before
    const results = Array.dedupe(exits.map(describe))
    const ok = runs === step.bodyRuns && results.length === 1 && results[0] === step.result
    return {
      row: {
        step: step.step,
        key: step.input.requestId,
        calls: `${step.calls}`,
        "body runs": `${runs}`,
        result: results.join(" | ")
      },
      problem: ok ? Option.none() : Option.some(
        `"${step.step}": expected ${step.bodyRuns} body run(s) and "${step.result}" for every call, ` +
          `got ${runs} run(s) and ${JSON.stringify(results)}`
      )
    }
  })

const printTable = (rows: ReadonlyArray<Record<string, string>>) => {
  const columns = Object.keys(rows[0]!)
  const widths = columns.map((column) => Math.max(column.length, ...rows.map((row) => row[column]!.length)))
  const line = (cells: ReadonlyArray<string>) => cells.map((cell, i) => cell.padEnd(widths[i]!)).join("  ").trimEnd()
  const body = rows.map((row) => line(columns.map((column) => row[column]!)))
  return Console.log([line(columns), line(widths.map((width) => "-".repeat(width))), ...body].join("\n"))
}

class DemoFailed extends Data.TaggedError("DemoFailed")<{ readonly message: string }> {}

// The demo checks its own claims: a wrong count fails the run (exit code 1), not just a line to eyeball.
const program = Effect.gen(function*() {
  const outcomes = yield* Effect.forEach(steps, runStep)
  yield* printTable(outcomes.map((outcome) => outcome.row))
  const problems = Array.getSomes(outcomes.map((outcome) => outcome.problem))
  if (problems.length > 0) return yield* new DemoFailed({ message: problems.join("\n") })
  yield* Console.log(`\nAll ${steps.length} steps behaved as promised; the body ran ${bodyRuns} times in all.`)
})

NodeRuntime.runMain(program.pipe(Effect.provide(MemoryStorage.layer())))
