import { assert, describe, it } from "@effect/vitest"
import { spawn } from "node:child_process"
import { readFileSync } from "node:fs"
import { createServer } from "node:net"
import { fileURLToPath } from "node:url"

const repoRoot = fileURLToPath(new URL("..", import.meta.url))
const read = (path: string) => readFileSync(new URL(`../${path}`, import.meta.url), "utf8")

/** The first ts code block after `heading` in the README. */
const blockUnder = (heading: string) => {
  const readme = read("README.md")
  const at = readme.indexOf(heading)
  assert.isAtLeast(at, 0, `no heading ${heading} in the README`)
  const block = /```ts\n([\s\S]*?)```/.exec(readme.slice(at))?.[1]
  assert.isDefined(block, `no ts code block under ${heading}`)
  return block
}

const freePort = () =>
  new Promise<number>((resolve, reject) => {
    const server = createServer()
    server.once("error", reject)
    server.listen(0, "127.0.0.1", () => {
      const address = server.address()
      server.close(() => typeof address === "object" && address !== null ? resolve(address.port) : reject(address))
    })
  })

describe("README", () => {
  it("shows the quick start kept in examples/quickstart.ts, which tsc checks", () => {
    assert.strictEqual(blockUnder("## Quick start"), read("examples/quickstart.ts"))
  })

  it("shows the HTTP server kept in examples/http-server.ts, which tsc checks", () => {
    assert.strictEqual(blockUnder("## A complete HTTP server"), read("examples/http-server.ts"))
  })

  it("names the two commands that CI and a new user run", () => {
    const readme = read("README.md")
    assert.include(readme, "npm ci && npm run demo")
    assert.include(readme, "npm test")
    assert.match(read(".ci/run"), /^npm test$/m)
  })

  it("links only inside the repository or to public sites, and opens with what the library is", () => {
    const readme = read("README.md")
    assert.notInclude(readme, "../shared")
    for (const [, target] of readme.matchAll(/\]\(([^)\s]+)\)/g)) {
      if (/^https:\/\//.test(target!) || target!.startsWith("#")) continue
      const path = target!.split("#")[0]!
      assert.doesNotThrow(() => read(path), `README links to ${target}, which is not in the repository`)
    }
    // Contributor material lives in CONTRIBUTING.md, not in the first screen a user reads.
    const firstScreen = readme.slice(0, readme.indexOf("## Install"))
    assert.notInclude(firstScreen, "DATABASE_URL")
    assert.notInclude(firstScreen, "npm run bench")
    assert.include(read("CONTRIBUTING.md"), "bash .ci/run")
  })
})

describe("examples/http-server.ts", () => {
  it("serves POST /payments on a real port: one charge per key, the retry replayed byte for byte", async () => {
    const port = await freePort()
    const child = spawn("npx", ["tsx", "examples/http-server.ts"], {
      cwd: repoRoot,
      env: { ...process.env, PORT: String(port) },
      stdio: ["ignore", "pipe", "pipe"],
      detached: true
    })
    let output = ""
    child.stdout.on("data", (chunk) => (output += String(chunk)))
    child.stderr.on("data", (chunk) => (output += String(chunk)))
    try {
      await new Promise<void>((resolve, reject) => {
        const timer = setTimeout(() => reject(new Error(`not listening after 60 s:\n${output}`)), 60_000)
        const check = () => {
          if (output.includes(`Listening on http://127.0.0.1:${port}`)) {
            clearTimeout(timer)
            resolve()
          }
        }
        child.stdout.on("data", check)
        child.once("exit", (code) => reject(new Error(`exited with ${code}:\n${output}`)))
      })
      const pay = (headers: Record<string, string>, body: string) =>
        fetch(`http://127.0.0.1:${port}/payments`, {
          method: "POST",
          headers: { "content-type": "application/json", ...headers },
          body
        })
      const first = await pay({ "idempotency-key": "pay-1" }, `{"orderId":"o-1","amount":1998}`)
      const firstBody = await first.text()
      const retry = await pay({ "idempotency-key": "pay-1" }, `{"amount":1998,"orderId":"o-1"}`)
      assert.deepStrictEqual([first.status, retry.status], [201, 201])
      assert.strictEqual(await retry.text(), firstBody)
      assert.strictEqual(retry.headers.get("idempotent-replayed"), "true")
      assert.strictEqual(firstBody, `{"id":"pay_1","orderId":"o-1","amount":1998}`)

      const another = await pay({ "idempotency-key": "pay-2" }, `{"orderId":"o-2","amount":5}`)
      assert.strictEqual(JSON.parse(await another.text()).id, "pay_2")
      const noKey = await pay({}, `{"orderId":"o-3","amount":5}`)
      assert.strictEqual(noKey.status, 400)
      assert.strictEqual(noKey.headers.get("content-type"), "application/problem+json")
    } finally {
      process.kill(-child.pid!, "SIGTERM")
    }
  }, 120_000)
})
