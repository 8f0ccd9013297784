/**
 * Packs the package (`prepack` builds it) and checks what a user of the published tarball sees.
 *
 * - Linked to this repository's node_modules: the root exports, the exports map, the shipped
 *   types, and that the root entry loads no database driver or optional peer.
 * - Installed from the registry (or the npm cache) into scratch apps next to the oldest and the
 *   newest `effect` 3.x the peer ranges allow: the root entry runs with `effect` alone, then
 *   `Storage/Redis` and `Http/IdempotencyMiddleware` run with their peers added, and `tsc` checks
 *   the programs that ran.
 */
import { afterAll, assert, beforeAll, describe, it } from "@effect/vitest"
import { execFile } from "node:child_process"
import { existsSync, readdirSync } from "node:fs"
import { mkdir, mkdtemp, readFile, rm, symlink, writeFile } from "node:fs/promises"
import { tmpdir } from "node:os"
import { dirname, join } from "node:path"
import { fileURLToPath } from "node:url"

const repoRoot = fileURLToPath(new URL("..", import.meta.url))
const repoModules = join(repoRoot, "node_modules")

/** Peers the root entry needs: the test fails if the repository has not installed them. */
const requiredPeers = ["effect"]

/**
 * Linked too when installed, so that a root entry that wrongly loads one of them is caught by the
 * resolve log below instead of failing with a less telling ERR_MODULE_NOT_FOUND.
 */
const optionalLinks = [
  "@effect/platform",
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
  { name: "@effect/platform", why: "it is an optional peer for Http/*: the root entry must work without it" },
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

export const program: Effect.Effect<number, IdempotencyError.WrapError, Storage.Storage> = Effect.succeed(1)
  .pipe(Idempotent.wrap({ key: "k" }))
export const used = [IdempotencyError.IdempotencyKeyReused, Storage.fromBasic, MemoryStorage.layer, conformance]
export const middleware: IdempotencyMiddleware.IdempotencyMiddleware = IdempotencyMiddleware.make({
  required: true,
  onInFlight: { wait: "5 seconds" },
  problem: (problem) => HttpServerResponse.unsafeJson(problem, { status: problem.status })
})
export const problemTypes: ReadonlyArray<IdempotencyMiddleware.ProblemType> = Object.values(IdempotencyMiddleware.ProblemType)
export const redis: Layer.Layer<Storage.Storage, IdempotencyError.IdempotencyStorageSetupError> = RedisStorage.layer({
  url: Redacted.make("redis://127.0.0.1:6379")
})
export const sql: Layer.Layer<Storage.Storage, IdempotencyError.IdempotencyStorageSetupError, SqlClient.SqlClient> =
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

interface PackageManifest {
  readonly bin?: Record<string, string>
  readonly dependencies?: Record<string, string>
  readonly peerDependencies?: Record<string, string>
  readonly peerDependenciesMeta?: Record<string, { readonly optional?: boolean }>
  readonly repository?: unknown
  readonly homepage?: string
  readonly bugs?: unknown
  readonly license?: string
  readonly devDependencies?: Record<string, string>
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

interface Packed {
  readonly workDir: string
  readonly tarballPath: string
  readonly files: ReadonlyArray<string>
}

let packDir = ""
let packed: Packed | undefined

const getPacked = (): Packed => {
  if (packed === undefined) throw new Error("npm pack did not run (see the beforeAll failure)")
  return packed
}

// One tarball for both halves of the file: `prepack` builds dist/ before npm packs it.
beforeAll(async () => {
  const workDir = await mkdtemp(join(tmpdir(), "effect-idempotency-package-"))
  packDir = workDir
  const result = await run("npm", ["pack", "--json", "--pack-destination", workDir], { cwd: repoRoot })
  const manifest = JSON.parse(result.stdout.slice(result.stdout.indexOf("["))) as ReadonlyArray<{
    readonly filename: string
    readonly files: ReadonlyArray<{ readonly path: string }>
  }>
  const tarball = manifest[0]
  if (tarball === undefined) throw new Error(`npm pack printed no manifest:\n${tail(result.stdout)}`)
  packed = { workDir, tarballPath: join(workDir, tarball.filename), files: tarball.files.map((file) => file.path) }
}, 240_000)

afterAll(async () => {
  if (packDir !== "" && process.env.KEEP_PACKAGE_TEST_DIR === undefined) {
    await rm(packDir, { recursive: true, force: true })
  }
})

describe("the packed package, linked to this repository's peers", () => {
  let consumerDir = ""
  let packedFiles: ReadonlyArray<string> = []
  let internalSpecifier = ""
  let report: Report | undefined
  let checkStderr = ""

  beforeAll(async () => {
    const { files, tarballPath, workDir } = getPacked()
    packedFiles = files
    consumerDir = join(workDir, "consumer")

    const internalDir = join(repoRoot, "dist", "internal")
    const internalModule = existsSync(internalDir)
      ? readdirSync(internalDir).find((file) => file.endsWith(".js"))
      : undefined
    internalSpecifier = `effect-idempotency/internal/${internalModule ?? "index.js"}`

    await mkdir(consumerDir)
    await writeFile(
      join(consumerDir, "package.json"),
      JSON.stringify({ name: "consumer", version: "0.0.0", private: true, type: "module" }, null, 2)
    )
    // Peers are linked below from this repository's node_modules, so npm must not fetch them.
    const install = ["install", "--no-audit", "--no-fund", "--legacy-peer-deps", "--ignore-scripts"]
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
    const resolveLog = join(consumerDir, "resolved.log")
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

  it("ships the built entry points, the command, the examples and the legal files, and no tests", async () => {
    const manifest = JSON.parse(await readFile(join(repoRoot, "package.json"), "utf8")) as PackageManifest
    const expected = [
      "package.json",
      "LICENSE",
      "CHANGELOG.md",
      "README.md",
      "dist/index.js",
      "dist/index.d.ts",
      "dist/index.d.ts.map",
      "dist/testing.js",
      "src/index.ts",
      "examples/quickstart.ts",
      ...Object.values(manifest.bin ?? {}).map((target) => target.replace(/^\.\//, ""))
    ]
    const missing = expected.filter((file) => !packedFiles.includes(file))
    assertNone(missing, `the tarball lacks files (it holds:\n${packedFiles.join("\n")})`)
    const unwanted = packedFiles.filter((file) =>
      /^(?:test|bench|torture|docs|\.changeset|\.ci|node_modules)\//.test(file) ||
      /\.test\.(?:[cm]?[jt]s|d\.ts)$/.test(file)
    )
    assertNone(unwanted, "the tarball ships development files")
  })

  it("declares every package its built code imports, and requires no peer but effect", async () => {
    const installed = join(consumerDir, "node_modules", "effect-idempotency")
    const manifest = JSON.parse(await readFile(join(installed, "package.json"), "utf8")) as PackageManifest
    const peers = manifest.peerDependencies ?? {}
    const declared = new Set([...Object.keys(peers), ...Object.keys(manifest.dependencies ?? {})])

    const undeclared: Array<string> = []
    const visit = async (dir: string): Promise<void> => {
      for (const entry of readdirSync(dir, { withFileTypes: true })) {
        const path = join(dir, entry.name)
        if (entry.isDirectory()) {
          await visit(path)
        } else if (entry.name.endsWith(".js")) {
          // Only code: tsc keeps the JSDoc, whose examples import what a user's app would.
          const code = (await readFile(path, "utf8")).split("\n")
            .filter((line) => !/^\s*(?:\*|\/\*|\/\/)/.test(line))
            .join("\n")
          for (const match of code.matchAll(/(?:\bfrom\s*|\bimport\s*\(\s*|^import\s+)"([^"]+)"/gm)) {
            const specifier = match[1]!
            if (specifier.startsWith(".") || specifier.startsWith("node:")) continue
            const name = specifier.startsWith("@")
              ? specifier.split("/").slice(0, 2).join("/")
              : specifier.split("/")[0]!
            if (!declared.has(name)) undeclared.push(`${path.slice(installed.length + 1)} imports ${specifier}`)
          }
        }
      }
    }
    await visit(join(installed, "dist"))
    assertNone(undeclared, "the built code imports packages package.json does not declare")

    const required = Object.keys(peers).filter((name) => manifest.peerDependenciesMeta?.[name]?.optional !== true)
    assert.deepStrictEqual(
      required,
      ["effect"],
      "only effect may be a required peer; the others belong to one entry each"
    )
    const exact = Object.entries(peers).filter(([, range]) => /^\d/.test(range)).map(([name, range]) =>
      `${name}@${range}`
    )
    assertNone(exact, "peers pinned to one exact version make every other version an ERESOLVE")
    for (const field of ["repository", "homepage", "bugs", "license"] as const) {
      assert.isDefined(manifest[field], `package.json has no ${field}`)
    }
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

/**
 * The two ends of the `effect` peer range, each with the `@effect/platform` and `ioredis` that go
 * with it. Pinned, not looked up at test time, so that a new release cannot change what passes;
 * when a new `effect` 3.x comes out, test it and move `newest` (and the ranges) forward.
 */
const registryApps = [
  {
    label: "oldest",
    // effect ^3.21.0 is the floor; @effect/platform 0.96.0 is the first that accepts 3.21 (0.97 asks
    // for ^3.22), and ioredis 5.9.0 the floor of the ioredis range.
    versions: { "effect": "3.21.0", "@effect/platform": "0.96.0", "ioredis": "5.9.0" }
  },
  {
    label: "newest",
    versions: { "effect": "3.22.4", "@effect/platform": "0.97.2", "ioredis": "5.11.1" }
  }
] as const

const optionalPeers = ["ioredis", "@effect/platform", "@effect/sql", "@effect/vitest"]

/**
 * Through the root entry with only `effect` installed: a first call runs, the retry replays.
 * Plain JavaScript so it runs as is; `tsc` checks it later with `checkJs`.
 */
const rootProgram = `// @ts-check
import { Effect } from "effect"
import { Idempotent, MemoryStorage } from "effect-idempotency"

let executions = 0
const placeOrder = Effect.sync(() => {
  executions++
  return { id: "order-" + executions, total: 20, lines: [{ sku: "tea", quantity: 2 }] }
}).pipe(Idempotent.wrap({ key: "request-42", fingerprint: { sku: "tea", quantity: 2 } }))

const program = Effect.gen(function*() {
  const first = yield* placeOrder
  const retry = yield* placeOrder
  return { first, retry }
})

const { first, retry } = await Effect.runPromise(program.pipe(Effect.provide(MemoryStorage.layer())))
process.stdout.write("@@RESULT@@" + JSON.stringify({ executions, first, retry }) + "\\n")
`

/**
 * Through \`Storage/Redis\` (a wrap called twice) and \`Http/IdempotencyMiddleware\` (a web handler
 * called twice with one key), on the machine's Redis under a prefix of its own, then removes
 * every key under that prefix.
 */
const backendsProgram = `// @ts-check
import { HttpApp, HttpServerResponse } from "@effect/platform"
import { Effect, Redacted } from "effect"
import { Idempotent } from "effect-idempotency"
import * as IdempotencyMiddleware from "effect-idempotency/Http/IdempotencyMiddleware"
import * as RedisStorage from "effect-idempotency/Storage/Redis"
import { Redis } from "ioredis"

const url = process.env.REDIS_URL ?? "redis://127.0.0.1:6379"
const prefix = process.env.IDEMPOTENCY_PREFIX ?? "effect-idempotency-package-test"
const storage = RedisStorage.layer({ url: Redacted.make(url), prefix })

let wrapExecutions = 0
const charge = Effect.sync(() => {
  wrapExecutions++
  return { chargeId: "charge-" + wrapExecutions, amount: 1250 }
}).pipe(Idempotent.wrap({ key: "charge-7" }))

const wrapped = await Effect.runPromise(
  Effect.gen(function*() {
    const first = yield* charge
    const retry = yield* charge
    return { first, retry }
  }).pipe(Effect.provide(storage))
)

let httpExecutions = 0
const createOrder = Effect.sync(() => {
  httpExecutions++
  return HttpServerResponse.unsafeJson({ orderId: "order-" + httpExecutions, note: "caf\\u00e9" }, { status: 201 })
})
const { dispose, handler } = HttpApp.toWebHandlerLayer(IdempotencyMiddleware.make()(createOrder), storage)

/** @param {string} key */
const post = async (key) => {
  const response = await handler(
    new Request("http://localhost/orders", {
      method: "POST",
      headers: { "Idempotency-Key": key, "Content-Type": "application/json" },
      body: JSON.stringify({ sku: "tea", quantity: 2 })
    })
  )
  return {
    status: response.status,
    replayed: response.headers.get("idempotent-replayed"),
    body: Buffer.from(await response.arrayBuffer()).toString("base64")
  }
}

let http
try {
  const first = await post("order-key-1")
  const retry = await post("order-key-1")
  http = { first, retry }
} finally {
  await dispose()
}

const redis = new Redis(url, { lazyConnect: true, maxRetriesPerRequest: 1 })
await redis.connect()
/** @type {Array<string>} */
const keys = []
let cursor = "0"
do {
  const [next, batch] = await redis.scan(cursor, "MATCH", prefix + ":*", "COUNT", 1000)
  cursor = next
  keys.push(...batch)
} while (cursor !== "0")
for (const key of keys) await redis.del(key)
const [, left] = await redis.scan("0", "MATCH", prefix + ":*", "COUNT", 1000)
await redis.quit()

process.stdout.write("@@RESULT@@" + JSON.stringify({
  wrapExecutions,
  wrapped,
  httpExecutions,
  http,
  keysWritten: keys.length,
  keysLeft: left.length
}) + "\\n")
`

// The consumer's settings, checking the JavaScript programs that ran.
const appTsconfig = {
  ...consumerTsconfig,
  compilerOptions: { ...consumerTsconfig.compilerOptions, allowJs: true, checkJs: true },
  files: ["root.mjs", "backends.mjs"]
}

const resultOf = <A>(stdout: string, what: string): A => {
  const marker = stdout.lastIndexOf("@@RESULT@@")
  if (marker === -1) throw new Error(`${what} printed no result:\n${tail(stdout)}`)
  return JSON.parse(stdout.slice(marker + "@@RESULT@@".length)) as A
}

/** Names the step that failed in front of the command's own message. */
const step = async <A>(name: string, body: () => Promise<A>): Promise<A> => {
  try {
    return await body()
  } catch (error) {
    throw new Error(`${name}: ${error instanceof Error ? error.message : String(error)}`, { cause: error })
  }
}

interface Post {
  readonly status: number
  readonly replayed: string | null
  readonly body: string
}

describe("the packed package, installed from the registry next to each end of the effect range", () => {
  // At most two npm installs at once: one per app, and each app installs in two steps.
  for (const app of registryApps) {
    const { versions } = app
    it.concurrent(
      `${app.label}: effect ${versions.effect}, @effect/platform ${
        versions["@effect/platform"]
      }, ioredis ${versions.ioredis}`,
      async () => {
        const { tarballPath, workDir } = getPacked()
        const repoManifest = JSON.parse(await readFile(join(repoRoot, "package.json"), "utf8")) as PackageManifest
        const devVersion = (name: string) => {
          const version = repoManifest.devDependencies?.[name]
          if (version === undefined) throw new Error(`package.json pins no ${name} in devDependencies`)
          return version
        }
        const appDir = join(workDir, `app-${app.label}`)
        await mkdir(appDir)
        await writeFile(
          join(appDir, "package.json"),
          JSON.stringify({ name: `app-${app.label}`, version: "0.0.0", private: true, type: "module" }, null, 2)
        )
        await writeFile(join(appDir, "root.mjs"), rootProgram)
        await writeFile(join(appDir, "backends.mjs"), backendsProgram)
        await writeFile(join(appDir, "tsconfig.json"), JSON.stringify(appTsconfig, null, 2))
        // No --legacy-peer-deps: a peer range that refuses these versions fails here with ERESOLVE.
        const install = (packages: ReadonlyArray<string>) =>
          run("npm", ["install", "--prefer-offline", "--no-audit", "--no-fund", "--ignore-scripts", ...packages], {
            cwd: appDir
          })

        // (i) effect alone: npm must not pull in an optional peer, and the root entry must run without them.
        await step(
          "installing the tarball with effect alone",
          () => install([tarballPath, `effect@${versions.effect}`])
        )
        const pulledIn = optionalPeers.filter((name) => existsSync(join(appDir, "node_modules", name)))
        assertNone(pulledIn, "installing the package with effect alone installed optional peers")
        const root = resultOf<{ executions: number; first: unknown; retry: unknown }>(
          (await step("the root entry program", () => run(process.execPath, ["root.mjs"], { cwd: appDir }))).stdout,
          "root.mjs"
        )
        assert.strictEqual(root.executions, 1, "the retry through the root entry ran the effect again")
        assert.deepStrictEqual(root.retry, root.first, "the retry did not get the first call's result")

        if (repoManifest.bin?.["effect-idempotency"] !== undefined) {
          const schema = await step(
            "npx effect-idempotency sql-schema",
            () =>
              run("npx", ["--no", "effect-idempotency", "sql-schema", "--dialect", "pg", "--table", "t"], {
                cwd: appDir
              })
          )
          assert.match(
            schema.stdout,
            /^create table (?:if not exists )?"?t"? \(/im,
            `no CREATE TABLE for t in:\n${tail(schema.stdout)}`
          )
        }

        // (ii) Storage/Redis and Http/IdempotencyMiddleware, with their peers added.
        await step("installing ioredis, @effect/platform, typescript and @types/node", () =>
          install([
            `ioredis@${versions.ioredis}`,
            `@effect/platform@${versions["@effect/platform"]}`,
            `typescript@${devVersion("typescript")}`,
            `@types/node@${devVersion("@types/node")}`
          ]))
        const prefix = `effect-idempotency-package-${app.label}-${process.pid}-${Date.now()}`
        const backends = resultOf<{
          wrapExecutions: number
          wrapped: { first: unknown; retry: unknown }
          httpExecutions: number
          http: { first: Post; retry: Post }
          keysWritten: number
          keysLeft: number
        }>(
          (await step(
            "the Storage/Redis and Http/IdempotencyMiddleware program",
            () =>
              run(process.execPath, ["backends.mjs"], { cwd: appDir, env: childEnv({ IDEMPOTENCY_PREFIX: prefix }) })
          ))
            .stdout,
          "backends.mjs"
        )
        assert.strictEqual(backends.wrapExecutions, 1, "the retry through Storage/Redis ran the effect again")
        assert.deepStrictEqual(backends.wrapped.retry, backends.wrapped.first)
        const { first, retry } = backends.http
        assert.strictEqual(backends.httpExecutions, 1, "the retried request ran the handler again")
        assert.strictEqual(first.status, 201)
        assert.notStrictEqual(first.replayed, "true", "the first response says it was replayed")
        assert.strictEqual(retry.status, 201)
        assert.strictEqual(retry.replayed, "true", "the retried response lacks Idempotent-Replayed: true")
        assert.strictEqual(retry.body, first.body, "the replayed body differs from the first one")
        assert.isAbove(backends.keysWritten, 0, `nothing was written under the prefix ${prefix}`)
        assert.strictEqual(backends.keysLeft, 0, `keys are left under the prefix ${prefix}`)

        // (iii) the programs that ran, type-checked against the shipped declarations.
        await step(
          "tsc on the programs",
          () =>
            run(process.execPath, [join(appDir, "node_modules", "typescript", "bin", "tsc"), "-p", "tsconfig.json"], {
              cwd: appDir
            })
        )
      },
      300_000
    )
  }
})
