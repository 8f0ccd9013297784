import { assert, describe, it } from "@effect/vitest"
import { execFile } from "node:child_process"
import { fileURLToPath } from "node:url"

const repoRoot = fileURLToPath(new URL("..", import.meta.url))

describe("npm run demo", () => {
  it("prints its table and exits 0", async () => {
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
    assert.match(stdout, /100 concurrent duplicates\s+req-2\s+100\s+1\s/)
    assert.match(stdout, /same key, other body\s+req-1\s+1\s+0\s+IdempotencyKeyReused/)
    assert.include(stdout, "behaved as promised")
  }, 90_000)
})
