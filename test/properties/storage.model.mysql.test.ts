/**
 * Model-based properties of the storage protocol on MariaDB, whose clock is the database's: real 1
 * second leases, time advanced by real sleeps, and a 300 millis zone either side of every expiry
 * where either answer is accepted. See test/fixtures/StorageModel.ts.
 */
import { afterAll, describe, it } from "@effect/vitest"
import { Effect, Layer, ManagedRuntime } from "effect"
import * as SqlStorage from "../../src/Storage/Sql.js"
import { dropTable, mysqlClient, uniqueTable } from "../fixtures/sqlClients.js"
import { realTimePlan, realTimeSemantics, realTimeSpace, runRealTime, stats } from "../fixtures/StorageModel.js"

const table = uniqueTable("model_mysql")
const runtime = ManagedRuntime.make(SqlStorage.layer({ table }).pipe(Layer.provide(mysqlClient())))

describe("storage model: MariaDB", () => {
  it(
    "every step agrees with the model",
    () => runRealTime(runtime, realTimeSemantics(), realTimePlan, realTimeSpace),
    realTimePlan.testTimeoutMs
  )

  afterAll(async () => {
    console.log(`storage model (MariaDB): ${JSON.stringify(stats)}`)
    await runtime.dispose()
    await Effect.runPromise(Effect.provide(dropTable(table), mysqlClient({ maxConnections: 1 })))
  })
})
