import { assert, describe, it } from "@effect/vitest"
import { readFileSync } from "node:fs"

const read = (path: string) => readFileSync(new URL(`../${path}`, import.meta.url), "utf8")

describe("README", () => {
  it("shows the quick start kept in examples/quickstart.ts, which tsc checks", () => {
    const readme = read("README.md")
    const section = readme.slice(readme.indexOf("## Quick start"))
    const block = /```ts\n([\s\S]*?)```/.exec(section)?.[1]
    assert.isDefined(block, "no ts code block under ## Quick start")
    assert.strictEqual(block, read("examples/quickstart.ts"))
  })

  it("names the two commands that CI and a new user run", () => {
    const readme = read("README.md")
    assert.include(readme, "npm ci && npm run demo")
    assert.include(readme, "npm test")
    assert.match(read(".ci/run"), /^npm test$/m)
  })
})
