/**
 * The conformance suite on the machine's Redis (`REDIS_URL`, default `redis://127.0.0.1:6379`),
 * including 4 independent builds of the layer racing for the same keys.
 */
import { afterAll } from "@effect/vitest"
import { Redacted } from "effect"
import { Redis } from "ioredis"
import { Storage } from "../src/index.js"
import * as RedisStorage from "../src/Storage/Redis.js"
import { conformance } from "../src/testing.js"

const url = process.env.REDIS_URL ?? "redis://127.0.0.1:6379"
const prefix = `idem-conformance-${Storage.makeToken().slice(0, 8)}`

// A 1 second base lease (the suite's default is 300 millis): on a busy two-core machine running
// other suites beside this one, a 150 millis sleep has been seen to take over 300.
conformance("RedisStorage", RedisStorage.layer({ url: Redacted.make(url), prefix }), {
  sharedAcrossBuilds: true,
  lease: "1 second"
})

afterAll(async () => {
  const client = new Redis(url)
  try {
    let cursor = "0"
    do {
      const [next, keys] = await client.scan(cursor, "MATCH", `${prefix}:*`, "COUNT", 1000)
      cursor = next
      if (keys.length > 0) await client.del(...keys)
    } while (cursor !== "0")
  } finally {
    client.disconnect()
  }
})
