/**
 * Model-based properties of the storage protocol on the machine's Redis (`REDIS_URL`), which keeps
 * its own clock: real 1 second leases, time advanced by real sleeps, and a 300 millis zone either
 * side of every expiry where either answer is accepted. See test/fixtures/StorageModel.ts.
 */
import { afterAll, describe, it } from "@effect/vitest"
import { Effect, ManagedRuntime, Redacted } from "effect"
import { Storage } from "../../src/index.js"
import * as RedisStorage from "../../src/Storage/Redis.js"
import { deleteKeys, machineRedisUrl, plainClient } from "../fixtures/redisClients.js"
import { realTimePlan, realTimeSemantics, realTimeSpace, runRealTime, stats } from "../fixtures/StorageModel.js"

const prefix = `idem-model-${Storage.makeToken().slice(0, 8)}`
const runtime = ManagedRuntime.make(RedisStorage.layer({ url: Redacted.make(machineRedisUrl), prefix }))

describe("storage model: Redis", () => {
  it(
    "every step agrees with the model",
    () => runRealTime(runtime, realTimeSemantics(), realTimePlan, realTimeSpace),
    realTimePlan.testTimeoutMs
  )

  afterAll(async () => {
    console.log(`storage model (Redis): ${JSON.stringify(stats)}`)
    await runtime.dispose()
    await Effect.runPromise(
      Effect.scoped(Effect.flatMap(plainClient(machineRedisUrl), (client) => deleteKeys(client, `${prefix}:*`)))
    )
  })
})
