/**
 * Model-based properties of the storage protocol on SQLite, a file and `:memory:`, whose clock is
 * the database's: real 1 second leases, time advanced by real sleeps, and a 300 millis zone
 * either side of every expiry where either answer is accepted. See test/fixtures/StorageModel.ts.
 */
import { afterAll, describe, it } from "@effect/vitest"
import { Layer, ManagedRuntime } from "effect"
import { join } from "node:path"
import * as SqlStorage from "../../src/Storage/Sql.js"
import { makeTempDir, sqliteClient, uniqueTable } from "../fixtures/sqlClients.js"
import { realTimePlan, realTimeSemantics, realTimeSpace, runRealTime, stats } from "../fixtures/StorageModel.js"

const dir = makeTempDir("idem-sqlite-model")
const file = ManagedRuntime.make(
  SqlStorage.layer({ table: uniqueTable("model") }).pipe(Layer.provide(sqliteClient(join(dir.path, "model.db"))))
)
const memory = ManagedRuntime.make(
  SqlStorage.layer({ table: uniqueTable("model") }).pipe(Layer.provide(sqliteClient(":memory:")))
)

describe("storage model: SQLite", () => {
  it(
    "a file: every step agrees with the model",
    () => runRealTime(file, realTimeSemantics(), realTimePlan, realTimeSpace),
    realTimePlan.testTimeoutMs
  )

  it(
    ":memory:: every step agrees with the model",
    () => runRealTime(memory, realTimeSemantics(), realTimePlan, realTimeSpace),
    realTimePlan.testTimeoutMs
  )

  afterAll(async () => {
    console.log(`storage model (SQLite): ${JSON.stringify(stats)}`)
    await Promise.all([file.dispose(), memory.dispose()])
    dir.release()
  })
})
