/**
 * Model-based properties of the storage protocol on PostgreSQL, whose clock is the database's: real 1
 * second leases, time advanced by real sleeps, and a 300 millis zone either side of every expiry
 * where either answer is accepted. See test/fixtures/StorageModel.ts.
 */
import { afterAll, describe, it } from "@effect/vitest"
import { Effect, Layer, ManagedRuntime } from "effect"
import * as SqlStorage from "../../src/Storage/Sql.js"
import { dropTable, pgClient, uniqueTable } from "../fixtures/sqlClients.js"
import { realTimePlan, realTimeSemantics, realTimeSpace, runRealTime, stats } from "../fixtures/StorageModel.js"

const table = uniqueTable("model_pg")
const runtime = ManagedRuntime.make(
  SqlStorage.layer({ table }).pipe(Layer.provide(pgClient({ applicationName: `${table}-model` })))
)

describe("storage model: PostgreSQL", () => {
  it("every step agrees with the model", () =>
    runRealTime(
      runtime,
      realTimeSemantics({
        // Documented: commit checks the token under the row lock, not the lease end; a lease ends
        // at the later of the acquire's end and the last renewal's.
        commitAfterLeaseEnd: true,
        leaseEndIsLaterOfAcquireAndRenewal: true
      }),
      realTimePlan,
      realTimeSpace
    ), realTimePlan.testTimeoutMs)

  afterAll(async () => {
    console.log(`storage model (PostgreSQL): ${JSON.stringify(stats)}`)
    await runtime.dispose()
    await Effect.runPromise(Effect.provide(dropTable(table), pgClient({ maxConnections: 1 })))
  })
})
