import { assert, describe, it } from "@effect/vitest"
import { execFile } from "node:child_process"
import { fileURLToPath } from "node:url"

const repoRoot = fileURLToPath(new URL("..", import.meta.url))

describe("npm run demo", () => {
  it("runs the orders API, prints its table of HTTP steps and exits 0", async () => {
    const { code, stdout, stderr } = await new Promise<{ code: number | null; stdout: string; stderr: string }>(
      (resolve) => {
        execFile(
          "npx",
          ["tsx", "examples/demo.ts"],
          { cwd: repoRoot, timeout: 60_000 },
          (error, stdout, stderr) =>
            resolve({ code: error === null ? 0 : (typeof error.code === "number" ? error.code : 1), stdout, stderr })
        )
      }
    )
    assert.strictEqual(code, 0, stderr)
    assert.match(stdout, /Orders API on http:\/\/127\.0\.0\.1:\d+ \(memory storage\)/)
    assert.match(stdout, /first POST\s+POST \/orders\s+order-1\s+1\s+201\s+0 of 1\s+1\s+order ord_\w+.*\sok$/m)
    assert.match(stdout, /retry, same key\s+POST \/orders\s+order-1\s+1\s+201\s+1 of 1\s+0\s+order ord_\w+.*\sok$/m)
    assert.match(
      stdout,
      /20 concurrent duplicates\s+POST \/orders\s+order-2\s+20\s+201 ×20\s+19 of 20\s+1\s+20 identical: order ord_\w+.*\sok$/m
    )
    assert.match(stdout, /same key, other body\s+POST \/orders\s+order-1\s+1\s+422\s+0 of 1\s+0\s+problem: .*\sok$/m)
    assert.match(stdout, /payment, no key\s+POST \/payments\s+\(none\)\s+1\s+400\s+0 of 1\s+0\s+problem: .*\sok$/m)
    assert.notInclude(stdout, "FAIL")
    assert.include(stdout, "All 8 steps behaved as promised")
  }, 90_000)
})
