/**
 * Model-based properties of the storage protocol on the backends that follow `TestClock`: memory
 * and `Storage.fromBasic` (over test/fixtures/MapBasicStorage.ts). Every sequence runs on a fresh
 * store with time moved by `TestClock`, so every answer is checked exactly, expiry boundaries
 * included. See test/fixtures/StorageModel.ts for the model.
 */
import { afterAll, describe, it } from "@effect/vitest"
import { Effect, Layer, TestContext } from "effect"
import type { Storage } from "../../src/index.js"
import * as MemoryStorage from "../../src/Storage/Memory.js"
import * as MapBasicStorage from "../fixtures/MapBasicStorage.js"
import { type CommandSpace, runLanes, runSequence, type Semantics, stats } from "../fixtures/StorageModel.js"

const space: CommandSpace = {
  maxKeys: 3,
  maxOwners: 4,
  leases: [1000, 2000],
  ttls: [1500, 60_000],
  // Exactly on a lease's or a TTL's end, a millisecond either side, and well past.
  advances: [1, 499, 999, 1000, 1001, 1500, 2000, 61_000],
  advanceWeight: 4,
  maxCommands: 40
}

const plan = { fixedSeeds: [10_001, 10_002], randomLanes: 1, runsPerLane: 60, timeLimitMs: 12_000 }

const check = (storageLayer: Layer.Layer<Storage.Storage>, semantics: Semantics) => () =>
  runLanes(plan, space, (sequence) =>
    Effect.runPromise(
      runSequence(sequence, semantics, { testClock: true, keyPrefix: "model" }).pipe(
        Effect.provide(Layer.provideMerge(Layer.fresh(storageLayer), TestContext.TestContext))
      )
    ))

describe("storage model (TestClock)", () => {
  it(
    "memory: every step agrees with the model",
    check(MemoryStorage.layer(), {
      capabilities: { renewal: true, fencing: true, ownedCommit: true, notification: true },
      margin: 0
    }),
    60_000
  )

  it(
    "Storage.fromBasic: every step agrees with the model, as far as its capabilities go",
    check(
      MapBasicStorage.layer,
      {
        capabilities: { renewal: false, fencing: false, ownedCommit: false, notification: false },
        margin: 0,
        deleteLeavesLock: true
      }
    ),
    60_000
  )

  afterAll(() => {
    console.log(`storage model (TestClock): ${JSON.stringify(stats)}`)
  })
})
