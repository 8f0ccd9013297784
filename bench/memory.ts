/**
 * Memory storage: the cost `Idempotent.wrap` adds to an effect when the store itself is free, so
 * what is measured is the combinator (key checks, fingerprint, codec, local flights, spans,
 * metrics) and not I/O.
 */
import { Array, Effect, ManagedRuntime, Schema } from "effect"
import { Idempotent, MemoryStorage } from "effect-idempotency"
import { type BenchConfig, invariant, measure, measureBatches, printTable, type Suite } from "./harness.js"

const OrderSchema = Schema.Struct({ id: Schema.String, total: Schema.Number })

// The wrapped effect is as small as it gets, so every microsecond above the bare run is overhead.
const order = (i: number) => Effect.sync(() => ({ id: `order-${i}`, total: 42 }))

const keyOnly = (key: string) => Idempotent.wrap({ key })
// What a real caller writes: a request fingerprint and a Schema for the stored result.
const withSchema = (key: string) =>
  Idempotent.wrap({ key, fingerprint: { sku: "mug", quantity: 2 }, success: OrderSchema })

const duplicates = 1_000

export const suite: Suite = {
  name: "memory",
  run: async (config: BenchConfig) => {
    // Built once and outside the timings: a layer build is not a call.
    const runtime = ManagedRuntime.make(MemoryStorage.layer({ maxEntries: 10_000_000 }))
    await runtime.runtime()
    try {
      await runtime.runPromise(order(-1).pipe(keyOnly("replay")))
      await runtime.runPromise(order(-1).pipe(withSchema("replay-schema")))

      const bare = await measure("bare run (no wrap)", config, (i) => runtime.runPromise(order(i)))
      const latency = [
        bare,
        await measure("first call, key only", config, (i) => runtime.runPromise(order(i).pipe(keyOnly(`first-${i}`)))),
        await measure(
          "first call, fingerprint + Schema",
          config,
          (i) => runtime.runPromise(order(i).pipe(withSchema(`first-schema-${i}`)))
        ),
        await measure("replay, key only", config, (i) => runtime.runPromise(order(i).pipe(keyOnly("replay")))),
        await measure(
          "replay, fingerprint + Schema",
          config,
          (i) => runtime.runPromise(order(i).pipe(withSchema("replay-schema")))
        )
      ]
      printTable(
        `memory: one call at a time (${config.iterations} timed after ${config.warmup} warm-up)`,
        bare,
        latency
      )

      // The body yields once, so all 1,000 fibers are started while the first run is still going.
      let executions = 0
      const body = (i: number) =>
        Effect.zipRight(Effect.yieldNow(), Effect.sync(() => ++executions)).pipe(Effect.zipRight(order(i)))
      const bareBatch = await measureBatches(
        `${duplicates} concurrent bare runs`,
        config.batches,
        duplicates,
        (i) => runtime.runPromise(Effect.all(Array.replicate(body(i), duplicates), { concurrency: "unbounded" })),
        () => {}
      )
      const duplicateBatch = await measureBatches(
        `${duplicates} concurrent duplicates, one key`,
        config.batches,
        duplicates,
        (i) => {
          executions = 0
          const call = body(i).pipe(Idempotent.wrap({ key: `dup-${i}`, onInFlight: { wait: "10 seconds" } }))
          return runtime.runPromise(Effect.all(Array.replicate(call, duplicates), { concurrency: "unbounded" }))
        },
        (results) => {
          invariant(executions === 1, `${duplicates} duplicates ran the body ${executions} times, not once`)
          invariant(results.every((result) => result.id === results[0]!.id), "duplicates got different results")
        }
      )
      printTable(
        `memory: batches of ${duplicates} concurrent calls (${config.batches} timed; executions per batch: 1)`,
        bareBatch,
        [bareBatch, duplicateBatch],
        "ms"
      )
    } finally {
      await runtime.dispose()
    }
  }
}
