/**
 * Builds the package, packs it, installs the tarball into a throw-away project and checks what a
 * user of the published package sees: the root exports, the exports map, the shipped types, and
 * that the root entry loads no database driver or optional peer.
 */
import { afterAll, assert, beforeAll, describe, it } from "@effect/vitest"
import { execFile } from "node:child_process"
import { existsSync, readdirSync } from "node:fs"
import { mkdir, mkdtemp, rm, symlink, writeFile } from "node:fs/promises"
import { tmpdir } from "node:os"
import { dirname, join } from "node:path"
import { fileURLToPath } from "node:url"

const repoRoot = fileURLToPath(new URL("..", import.meta.url))
const repoModules = join(repoRoot, "node_modules")

/** Peers the root entry needs: the test fails if the repository has not installed them. */
const requiredPeers = ["effect", "@effect/platform"]

/**
 * Linked too when installed, so that a root entry that wrongly loads one of them is caught by the
 * resolve log below instead of failing with a less telling ERR_MODULE_NOT_FOUND.
 */
const optionalLinks = [
  "@effect/platform-node",
  "@effect/sql",
  "@effect/experimental",
  "ioredis",
  "pg",
  "mysql2",
  "better-sqlite3",
  "vitest",
  "@effect/vitest",
  "@types/node"
]

const forbiddenFromRoot: ReadonlyArray<{ readonly name: string; readonly why: string }> = [
  { name: "ioredis", why: "the Redis driver belongs to effect-idempotency/Storage/Redis" },
  { name: "pg", why: "the PostgreSQL driver belongs to the user's @effect/sql-pg client" },
  { name: "mysql2", why: "the MySQL driver belongs to the user's @effect/sql-mysql2 client" },
  { name: "better-sqlite3", why: "the SQLite driver belongs to the user's @effect/sql-sqlite-node client" },
  { name: "@effect/sql", why: "it is an optional peer: the root entry must work without it" },
  { name: "@effect/platform-node", why: "the HTTP middleware is platform-neutral; only apps pick a server" },
  { name: "vitest", why: "the test runner belongs to effect-idempotency/testing" },
  { name: "@effect/vitest", why: "the test runner belongs to effect-idempotency/testing" }
]

/** Each public subpath that exists; a new backend or the HTTP module adds its own here. */
const publicSubpaths = [
  "effect-idempotency/testing",
  "effect-idempotency/Storage/Redis",
  "effect-idempotency/Storage/Sql",
  "effect-idempotency/Http/IdempotencyMiddleware"
]

/** What the root entry must export, per the public contract (API.md). */
const expectedShape: Record<string, "object" | "function"> = {
  "Idempotent": "object",
  "Idempotent.wrap": "function",
  "IdempotencyError": "object",
  "IdempotencyError.IdempotencyKeyMissing": "function",
  "IdempotencyError.IdempotencyKeyInvalid": "function",
  "IdempotencyError.IdempotencyKeyReused": "function",
  "IdempotencyError.IdempotencyInFlight": "function",
  "IdempotencyError.IdempotencyLeaseLost": "function",
  "IdempotencyError.IdempotencyStorageError": "function",
  "Storage": "object",
  "Storage.Storage": "function",
  "Storage.fromBasic": "function",
  "MemoryStorage": "object",
  "MemoryStorage.layer": "function"
}

/**
 * The child processes must not inherit the `npm_*` variables of the `npm test` that started
 * vitest: `npm_config_prefix` and friends would point the inner npm at this repository.
 */
const childEnv = (extra: Record<string, string> = {}): NodeJS.ProcessEnv => {
  const env: NodeJS.ProcessEnv = {}
  for (const [name, value] of Object.entries(process.env)) {
    if (!/^npm_/i.test(name) && name !== "NODE_OPTIONS") env[name] = value
  }
  return { ...env, npm_config_update_notifier: "false", npm_config_fund: "false", ...extra }
}

/** Fails with every offending entry in the message: vitest's diff of string arrays elides them. */
const assertNone = (problems: ReadonlyArray<string>, header: string) => {
  if (problems.length > 0) assert.fail(`${header}:\n  ${problems.join("\n  ")}`)
}

const tail = (text: string, max = 4000) => text.length > max ? `...${text.slice(-max)}` : text

interface RunResult {
  readonly stdout: string
  readonly stderr: string
}

const run = (
  command: string,
  args: ReadonlyArray<string>,
  options: { readonly cwd: string; readonly env?: NodeJS.ProcessEnv }
): Promise<RunResult> =>
  new Promise((resolve, reject) => {
    execFile(
      command,
      args,
      { cwd: options.cwd, env: options.env ?? childEnv(), maxBuffer: 64 * 1024 * 1024 },
      (error, stdout, stderr) => {
        if (error) {
          reject(
            new Error(
              [
                `\`${command} ${args.join(" ")}\` failed in ${options.cwd} (exit code ${String(error.code)})`,
                `--- stdout ---\n${tail(stdout)}`,
                `--- stderr ---\n${tail(stderr)}`
              ].join("\n")
            )
          )
        } else {
          resolve({ stdout, stderr })
        }
      }
    )
  })

const linkFromRepo = async (consumerModules: string, name: string) => {
  const link = join(consumerModules, name)
  if (existsSync(link)) return
  await mkdir(dirname(link), { recursive: true })
  await symlink(join(repoModules, name), link, "dir")
}

/** Resolve hooks run on their own thread; appending synchronously keeps the log complete. */
const resolveHook = `
import { appendFileSync } from "node:fs"
let logFile
export async function initialize(data) { logFile = data.logFile }
export async function resolve(specifier, context, nextResolve) {
  const result = await nextResolve(specifier, context)
  appendFileSync(logFile, result.url + "\\n")
  return result
}
`

const registerHook = `
import { register } from "node:module"
register("./resolve-hook.mjs", import.meta.url, { data: { logFile: process.env.RESOLVE_LOG } })
`

const checkScript = (internalSpecifier: string) => `
import { existsSync, readFileSync } from "node:fs"
import { createRequire } from "node:module"
import { fileURLToPath } from "node:url"

const get = (value, path) => path.split(".").reduce((v, k) => (v == null ? undefined : v[k]), value)
const describeError = (e) => ({ code: e?.code ?? null, message: String(e?.message ?? e) })
const report = {}

try {
  const root = await import("effect-idempotency")
  report.rootExports = Object.keys(root).sort()
  report.shape = Object.fromEntries(
    ${JSON.stringify(Object.keys(expectedShape))}.map((path) => [path, typeof get(root, path)])
  )
} catch (e) {
  report.rootError = describeError(e)
}
report.rootResolved = readFileSync(process.env.RESOLVE_LOG, "utf8").split("\\n").filter(Boolean)
report.rootCjs = Object.keys(createRequire(import.meta.url).cache)

try {
  await import(${JSON.stringify(internalSpecifier)})
  report.internal = { loaded: true }
} catch (e) {
  report.internal = { loaded: false, ...describeError(e) }
}

report.subpaths = {}
for (const specifier of ${JSON.stringify(publicSubpaths)}) {
  try {
    // Node 20 resolves an exports-map target without checking that the file is there.
    const url = import.meta.resolve(specifier)
    report.subpaths[specifier] = existsSync(fileURLToPath(url))
      ? { url }
      : { code: "MISSING_FILE", message: "the exports map points at " + url + ", which is not in the package" }
  } catch (e) {
    report.subpaths[specifier] = describeError(e)
  }
}

process.stdout.write("\\n@@REPORT@@" + JSON.stringify(report) + "\\n")
`

const consumerTypes = `
import { HttpServerResponse } from "@effect/platform"
import type { SqlClient } from "@effect/sql"
import { Effect, Layer, Redacted } from "effect"
import { IdempotencyError, Idempotent, MemoryStorage, Storage } from "effect-idempotency"
import * as RedisStorage from "effect-idempotency/Storage/Redis"
import * as SqlStorage from "effect-idempotency/Storage/Sql"
import * as IdempotencyMiddleware from "effect-idempotency/Http/IdempotencyMiddleware"
import { conformance } from "effect-idempotency/testing"

export const program: Effect.Effect<number, IdempotencyError.IdempotencyError, Storage.Storage> = Effect.succeed(1)
  .pipe(Idempotent.wrap({ key: "k" }))
export const used = [IdempotencyError.IdempotencyKeyReused, Storage.fromBasic, MemoryStorage.layer, conformance]
export const middleware: IdempotencyMiddleware.IdempotencyMiddleware = IdempotencyMiddleware.make({
  required: true,
  onInFlight: { wait: "5 seconds" },
  problem: (problem) => HttpServerResponse.unsafeJson(problem, { status: problem.status })
})
export const problemTypes: ReadonlyArray<IdempotencyMiddleware.ProblemType> = Object.values(IdempotencyMiddleware.ProblemType)
export const redis: Layer.Layer<Storage.Storage, IdempotencyError.IdempotencyStorageError> = RedisStorage.layer({
  url: Redacted.make("redis://127.0.0.1:6379")
})
export const sql: Layer.Layer<Storage.Storage, IdempotencyError.IdempotencyStorageError, SqlClient.SqlClient> =
  SqlStorage.layer({ table: "idempotency_records", cleanupInterval: "1 minute" })
`

const consumerTsconfig = {
  compilerOptions: {
    target: "ES2022",
    lib: ["ES2022"],
    types: ["node"],
    module: "NodeNext",
    moduleResolution: "NodeNext",
    strict: true,
    exactOptionalPropertyTypes: true,
    skipLibCheck: true,
    noEmit: true
  },
  files: ["consumer.ts"]
}

interface Report {
  readonly rootExports?: ReadonlyArray<string>
  readonly shape?: Record<string, string>
  readonly rootError?: { readonly code: string | null; readonly message: string }
  readonly rootResolved: ReadonlyArray<string>
  readonly rootCjs: ReadonlyArray<string>
  readonly internal: { readonly loaded: boolean; readonly code?: string | null; readonly message?: string }
  readonly subpaths: Record<string, { readonly url?: string; readonly code?: string | null; readonly message?: string }>
}

describe("the packed package", () => {
  let workDir = ""
  let consumerDir = ""
  let packedFiles: ReadonlyArray<string> = []
  let internalSpecifier = ""
  let report: Report | undefined
  let checkStderr = ""

  beforeAll(async () => {
    workDir = await mkdtemp(join(tmpdir(), "effect-idempotency-package-"))
    consumerDir = join(workDir, "consumer")

    await run("npm", ["run", "build"], { cwd: repoRoot })

    const internalDir = join(repoRoot, "dist", "internal")
    const internalModule = existsSync(internalDir)
      ? readdirSync(internalDir).find((file) => file.endsWith(".js"))
      : undefined
    internalSpecifier = `effect-idempotency/internal/${internalModule ?? "index.js"}`

    const packed = await run("npm", ["pack", "--json", "--pack-destination", workDir], { cwd: repoRoot })
    const manifest = JSON.parse(packed.stdout.slice(packed.stdout.indexOf("["))) as ReadonlyArray<{
      readonly filename: string
      readonly files: ReadonlyArray<{ readonly path: string }>
    }>
    const tarball = manifest[0]
    if (tarball === undefined) throw new Error(`npm pack printed no manifest:\n${tail(packed.stdout)}`)
    packedFiles = tarball.files.map((file) => file.path)

    await mkdir(consumerDir)
    await writeFile(
      join(consumerDir, "package.json"),
      JSON.stringify({ name: "consumer", version: "0.0.0", private: true, type: "module" }, null, 2)
    )
    // Peers are linked below from this repository's node_modules, so npm must not fetch them.
    const install = ["install", "--no-audit", "--no-fund", "--legacy-peer-deps", "--ignore-scripts"]
    const tarballPath = join(workDir, tarball.filename)
    await run("npm", [...install, "--offline", tarballPath], { cwd: consumerDir }).catch(() =>
      run("npm", [...install, tarballPath], { cwd: consumerDir })
    )

    const consumerModules = join(consumerDir, "node_modules")
    for (const name of requiredPeers) {
      if (!existsSync(join(repoModules, name))) {
        throw new Error(`peer dependency ${name} is not installed in ${repoModules}: run npm ci first`)
      }
      await linkFromRepo(consumerModules, name)
    }
    for (const name of optionalLinks) {
      if (existsSync(join(repoModules, name))) await linkFromRepo(consumerModules, name)
    }

    await writeFile(join(consumerDir, "resolve-hook.mjs"), resolveHook)
    await writeFile(join(consumerDir, "register-hook.mjs"), registerHook)
    const resolveLog = join(workDir, "resolved.log")
    await writeFile(resolveLog, "")
    const checked = await run(
      process.execPath,
      ["--import", "./register-hook.mjs", "--input-type=module", "-e", checkScript(internalSpecifier)],
      { cwd: consumerDir, env: childEnv({ RESOLVE_LOG: resolveLog }) }
    )
    checkStderr = checked.stderr
    const marker = checked.stdout.lastIndexOf("@@REPORT@@")
    if (marker === -1) {
      throw new Error(`the import check printed no report:\n${tail(`${checked.stdout}\n${checked.stderr}`)}`)
    }
    report = JSON.parse(checked.stdout.slice(marker + "@@REPORT@@".length)) as Report
  }, 120_000)

  afterAll(async () => {
    if (workDir !== "" && process.env.KEEP_PACKAGE_TEST_DIR === undefined) {
      await rm(workDir, { recursive: true, force: true })
    }
  })

  const getReport = (): Report => {
    if (report === undefined) throw new Error("the import check did not run (see the beforeAll failure)")
    return report
  }

  const assertRootLoaded = () => {
    const { rootError } = getReport()
    if (rootError !== undefined) {
      const stderr = checkStderr.trim() === "" ? "" : `\n--- stderr of the check ---\n${tail(checkStderr)}`
      assert.fail(`import "effect-idempotency" failed: ${rootError.code ?? ""} ${rootError.message}${stderr}`)
    }
  }

  it("ships the built entry points and no tests", () => {
    for (const file of ["package.json", "dist/index.js", "dist/index.d.ts", "dist/index.d.ts.map", "dist/testing.js"]) {
      assert.include(packedFiles, file, `the tarball lacks ${file}; it holds:\n${packedFiles.join("\n")}`)
    }
    const tests = packedFiles.filter((file) => file.startsWith("test/") || /\.test\.(?:[cm]?[jt]s|d\.ts)$/.test(file))
    assertNone(tests, "the tarball ships test files")
  })

  it("exports the public modules from the root entry", () => {
    const { shape } = getReport()
    assertRootLoaded()
    const wrong = Object.entries(expectedShape)
      .filter(([path, type]) => shape?.[path] !== type)
      .map(([path, type]) => `${path}: expected ${type}, got ${shape?.[path] ?? "nothing"}`)
    assertNone(wrong, `wrong root exports (it exports ${getReport().rootExports?.join(", ")})`)
  })

  it("does not load database drivers, optional peers or vitest from the root entry", () => {
    const { rootCjs, rootResolved } = getReport()
    assertRootLoaded()
    assert.isNotEmpty(rootResolved, "the resolve hook recorded nothing: the check itself is broken")
    assert.isTrue(
      rootResolved.some((url) => url.includes("/node_modules/effect-idempotency/dist/index.js")),
      `the root entry was not resolved through the installed package:\n${rootResolved.join("\n")}`
    )
    const loaded = [...rootResolved, ...rootCjs]
    const offending = forbiddenFromRoot.flatMap(({ name, why }) => {
      const hits = loaded.filter((url) => url.includes(`/node_modules/${name}/`))
      return hits.length === 0 ? [] : [`${name} (${why}): ${hits[0]}`]
    })
    assertNone(offending, `import "effect-idempotency" loaded modules it must not`)
  })

  it("does not export internal modules", () => {
    const { internal } = getReport()
    assert.isFalse(internal.loaded, `import "${internalSpecifier}" succeeded; ./internal/* must stay unexported`)
    assert.strictEqual(
      internal.code,
      "ERR_PACKAGE_PATH_NOT_EXPORTED",
      `import "${internalSpecifier}" failed with ${internal.code}: ${internal.message}`
    )
  })

  it("resolves every public subpath through the exports map", () => {
    const { subpaths } = getReport()
    const unresolved = publicSubpaths
      .filter((specifier) => subpaths[specifier]?.url === undefined)
      .map((specifier) => `${specifier}: ${subpaths[specifier]?.code} ${subpaths[specifier]?.message}`)
    assertNone(unresolved, "public subpaths do not resolve through the exports map")
  })

  it("type-checks a consumer against the shipped declarations", async () => {
    await writeFile(join(consumerDir, "consumer.ts"), consumerTypes)
    await writeFile(join(consumerDir, "tsconfig.json"), JSON.stringify(consumerTsconfig, null, 2))
    await run(process.execPath, [join(repoModules, "typescript", "bin", "tsc"), "-p", "tsconfig.json"], {
      cwd: consumerDir
    })
  }, 60_000)
})
