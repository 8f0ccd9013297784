/**
 * The documentation checks of `npm test`:
 *
 * - every ```ts block of docs/ (but docs/api/) and the README type-checks, all in one tsc run,
 *   and every ```ts run block also runs (tsx) and exits 0 within 30 seconds of CPU;
 * - every relative link and `#anchor` resolves, and absolute links go only to public https sites;
 * - docs/en and docs/es hold the same pages, each with a title, and the same code blocks per page;
 * - docs/api is what `npm run docs` generates now (docgen refuses an export without `@since` or a
 *   description), every public function and layer has an `@example`, and the examples type-check
 *   (in the same tsc run as the docs' blocks) and run, but those that need a server or a network
 *   service (which `npm run docs` also leaves out of its run).
 */
import { afterAll, assert, beforeAll, describe, it } from "@effect/vitest"
import { execFile } from "node:child_process"
import { existsSync, readdirSync, readFileSync, statSync } from "node:fs"
import { mkdir, mkdtemp, rm, writeFile } from "node:fs/promises"
import { tmpdir } from "node:os"
import { dirname, join, normalize, relative } from "node:path"
import ts from "typescript"
import { cannotRunAlone, type DocgenOutcome, generateApiDocs, repoRoot } from "./fixtures/docsApi.js"
import { anchors, type CodeBlock, jsdocBlocks, links, markdownFiles, readText, scan } from "./fixtures/docsMarkdown.js"

/**
 * A `ts run` block may use 30 s of CPU (`ulimit -t`): CPU time, not wall time, so that a loaded
 * machine does not fail a block that is merely waiting for a core. A block that waits on nothing
 * forever uses no CPU, so wall time is bounded too, loosely.
 */
const RUN_CPU_SECONDS = 30
const RUN_WALL_MS = 300_000
const RUN_CONCURRENCY = 2
/**
 * Generous: the checks take about four minutes of CPU (most of it the ~40 `ts run` blocks, a few
 * seconds each), and took eight minutes of wall time on 2 cores under a load average of 15 to 30.
 */
const SLOW_TEST_MS = 900_000

const publicRepo = "https://github.com/effect-idempotency/effect-idempotency/"

const proseFiles = [...markdownFiles(repoRoot, "docs", ["docs/api"]), "README.md"]
const apiFiles = existsSync(join(repoRoot, "docs", "api")) ? markdownFiles(repoRoot, "docs/api") : []
const scans = new Map([...proseFiles, ...apiFiles].map((file) => [file, scan(file, readText(repoRoot, file))]))
/** A page's scan; writers add pages while the suite runs, so one may be newer than the load. */
const scanOf = (file: string) => {
  let scanned = scans.get(file)
  if (scanned === undefined) {
    scanned = scan(file, readText(repoRoot, file))
    scans.set(file, scanned)
  }
  return scanned
}
const blocks = proseFiles.flatMap((file) => scanOf(file).blocks)
const tsBlocks = blocks.filter((block) => block.language === "ts" || block.language === "typescript")
const runBlocks = tsBlocks.filter((block) => block.flags.includes("run"))

const listFiles = (root: string, dir = root): Array<string> =>
  readdirSync(dir, { withFileTypes: true }).flatMap((entry) =>
    entry.isDirectory() ? listFiles(root, join(dir, entry.name)) : [relative(root, join(dir, entry.name))]
  ).sort()

/** The modules docgen documents (see docgen.json): src/ but internal/ and the command. */
const publicModules = listFiles(join(repoRoot, "src"))
  .filter((file) => file.endsWith(".ts") && !file.startsWith("internal") && file !== "bin.ts")
  .map((file) => `src/${file}`)
const exampleBlocks = publicModules.flatMap((file) => jsdocBlocks(file, readText(repoRoot, file)))
const runnableExamples = exampleBlocks.filter((block) => !cannotRunAlone.test(block.code))

const where = (block: CodeBlock) => `${block.file}:${block.line}`

interface ProcessResult {
  readonly code: number | null
  readonly signal: string | null
  readonly timedOut: boolean
  readonly output: string
}

const describeExit = (result: ProcessResult) =>
  result.timedOut
    ? `still running after ${RUN_WALL_MS / 1000} s`
    // The CPU limit sends SIGXCPU, then SIGKILL (a wrapper would exit with 128 + the signal).
    : result.signal === "SIGXCPU" || result.signal === "SIGKILL" || result.code === 152 || result.code === 137
    ? `used more than ${RUN_CPU_SECONDS} s of CPU (or was killed)`
    : result.signal !== null
    ? `killed by ${result.signal}`
    : `exit code ${result.code}`

/** Runs `command` (a path, or a name in node_modules/.bin) from the repository root. */
const run = (command: string, args: ReadonlyArray<string>, timeout: number, cpuSeconds?: number) =>
  new Promise<ProcessResult>((resolve) => {
    const bin = join(repoRoot, "node_modules", ".bin")
    const executable = command.startsWith("/") ? command : join(bin, command)
    const [file, argv] = cpuSeconds === undefined
      ? [executable, args]
      : ["/bin/sh", ["-c", `ulimit -t ${cpuSeconds} && exec "$0" "$@"`, executable, ...args]]
    execFile(
      file,
      argv,
      {
        cwd: repoRoot,
        timeout,
        killSignal: "SIGKILL",
        maxBuffer: 16 * 1024 * 1024,
        env: { ...process.env, PATH: `${bin}:${process.env.PATH ?? ""}`, NO_COLOR: "1", FORCE_COLOR: "0" }
      },
      (error, stdout, stderr) =>
        resolve({
          code: error === null ? 0 : typeof error.code === "number" ? error.code : null,
          signal: error?.signal ?? null,
          timedOut: error !== null && error.killed === true,
          output: `${stdout}${stderr}`
        })
    )
  })

/** Runs `task` over `items`, `limit` at a time, keeping the order of the results. */
const pool = async <A, B>(items: ReadonlyArray<A>, limit: number, task: (item: A) => Promise<B>) => {
  const results: Array<B> = new Array(items.length)
  let next = 0
  const worker = async () => {
    while (next < items.length) {
      const index = next++
      results[index] = await task(items[index]!)
    }
  }
  await Promise.all(Array.from({ length: Math.min(limit, items.length) }, worker))
  return results
}

// Blocks are written inside the repository (scratch/ is git-ignored), so that the repository's
// tsconfig `paths` map `effect-idempotency` to src/ for tsc and tsx alike, as they do for test/.
let blockDir = ""
const blockFile = new Map<string, CodeBlock>()
let typecheck: Promise<ProcessResult>
let runs: Promise<Array<ProcessResult>>
let apiDir = ""
let docgen: Promise<DocgenOutcome>
const nameOf = (block: CodeBlock) => [...blockFile].find(([, candidate]) => candidate === block)![0]

beforeAll(async () => {
  await mkdir(join(repoRoot, "scratch"), { recursive: true })
  blockDir = await mkdtemp(join(repoRoot, "scratch", "docs-blocks-"))
  apiDir = await mkdtemp(join(tmpdir(), "effect-idempotency-api-"))
  await Promise.all([...tsBlocks, ...exampleBlocks].map(async (block, index) => {
    const name = `block${String(index).padStart(3, "0")}.ts`
    blockFile.set(name, block)
    // `export {}` last, so that every block is a module and its lines keep their numbers.
    await writeFile(join(blockDir, name), `${block.code}\nexport {}\n`)
  }))
  await writeFile(
    join(blockDir, "tsconfig.json"),
    JSON.stringify({ extends: relative(blockDir, join(repoRoot, "tsconfig.json")), include: ["*.ts"] })
  )
  // The API examples run in one process, in order, as docgen runs them.
  await writeFile(
    join(blockDir, "examples.ts"),
    runnableExamples.map((block) => `import "./${nameOf(block).replace(/\.ts$/, ".js")}"\n`).join("")
  )
  docgen = generateApiDocs(apiDir, { checkExamples: false })
  typecheck = run("tsc", ["--noEmit", "--pretty", "false", "-p", join(blockDir, "tsconfig.json")], SLOW_TEST_MS)
  runs = pool(
    [...runBlocks.map(nameOf), "examples.ts"],
    RUN_CONCURRENCY,
    // `node --import tsx` rather than the tsx command, which starts a second node process per block.
    (name) =>
      run(
        process.execPath,
        ["--import", "tsx", join(blockDir, name)],
        RUN_WALL_MS,
        name === "examples.ts" ? undefined : RUN_CPU_SECONDS
      )
  )
}, SLOW_TEST_MS)

afterAll(async () => {
  // Let whatever is still running finish before its folders go.
  await Promise.allSettled([typecheck, runs, docgen])
  if (blockDir !== "") await rm(blockDir, { recursive: true, force: true })
  if (apiDir !== "") await rm(apiDir, { recursive: true, force: true })
}, SLOW_TEST_MS)

describe("code blocks of docs/ and the README, and the @examples of src/", () => {
  it("type-check, every ts block as a module of its own", async () => {
    const result = await typecheck
    const failures: Array<string> = []
    for (const line of result.output.split("\n")) {
      const error = /^(.*?)\((\d+),(\d+)\): (error .*)$/.exec(line)
      if (error === null) {
        if (line.trim() !== "" && !line.startsWith(" ")) failures.push(line)
        else if (line.startsWith(" ") && failures.length > 0) failures[failures.length - 1] += `\n${line}`
        continue
      }
      // A block's errors point into the Markdown; any other file's (src/, say) stay as tsc gave them.
      const file = error[1]!
      const block = normalize(dirname(join(repoRoot, file))) === normalize(blockDir)
        ? blockFile.get(file.split(/[\\/]/).pop()!)
        : undefined
      const at = block !== undefined
        ? `${block.file}:${block.line + Number(error[2]) - 1}:${error[3]}`
        : `${file}:${error[2]}:${error[3]}`
      failures.push(`${at}: ${error[4]}`)
    }
    assert.isFalse(result.timedOut, "tsc timed out")
    assert.deepStrictEqual(failures, [], `ts blocks that do not compile:\n${failures.join("\n")}`)
    assert.strictEqual(result.code, 0, result.output)
  }, SLOW_TEST_MS)

  it("run to a clean exit when marked `ts run`", async () => {
    const results = (await runs).slice(0, runBlocks.length)
    const failures = results.flatMap((result, index) =>
      result.code === 0 ? [] : [
        `${where(runBlocks[index]!)}: ${describeExit(result)}\n${
          result.output.trim().split("\n").slice(-15).join("\n")
        }`
      ]
    )
    assert.deepStrictEqual(failures, [], `ts run blocks that failed:\n${failures.join("\n\n")}`)
  }, SLOW_TEST_MS)

  it("run to a clean exit for the @examples of src/ that need no server or network service", async () => {
    const result = (await runs)[runBlocks.length]!
    const legend = runnableExamples.map((block) => `${nameOf(block)} is ${where(block)}`).join("\n")
    assert.strictEqual(result.code, 0, `the examples failed (${describeExit(result)}):\n${result.output}\n${legend}`)
  }, SLOW_TEST_MS)
})

describe("links of docs/ and the README", () => {
  const anchorsOf = new Map<string, Set<string>>()
  const anchorsIn = (file: string) => {
    let found = anchorsOf.get(file)
    if (found === undefined) {
      const scanned = scanOf(file)
      found = anchors(scanned.prose)
      anchorsOf.set(file, found)
    }
    return found
  }

  /** What is wrong with a link to `path#anchor` (both relative to the repository), if anything. */
  const checkTarget = (path: string, anchor: string | undefined): string | undefined => {
    if (path.startsWith("..") || path.startsWith("/")) return "points outside the repository"
    if (!existsSync(join(repoRoot, path))) return "no such file"
    if (anchor === undefined || anchor === "") return undefined
    if (!path.endsWith(".md") || statSync(join(repoRoot, path)).isDirectory()) {
      return /^L\d+(-L\d+)?$/.test(anchor) ? undefined : "an anchor into a file that is not Markdown"
    }
    return anchorsIn(path).has(decodeURIComponent(anchor)) ? undefined : `no heading or <a id> "${anchor}" there`
  }

  it("resolve: relative files exist, anchors name a heading, absolute links are public https", () => {
    const failures: Array<string> = []
    for (const [file, scanned] of scans) {
      for (const link of links(file, scanned.prose)) {
        const { target } = link
        const fail = (why: string) => failures.push(`${link.file}:${link.line}: ${target}: ${why}`)
        if (target.includes("shared/")) {
          fail("a folder users never have")
          continue
        }
        if (/^[a-z][a-z0-9+.-]*:/i.test(target)) {
          if (!target.startsWith("https://")) {
            fail("only https:// links leave the repository")
            continue
          }
          const host = new URL(target).hostname
          if (/^(localhost|127\.|0\.0\.0\.0|\[::1\]|10\.|192\.168\.)|\.(local|internal|test)$/.test(host)) {
            fail("not a public site")
            continue
          }
          // A link to this repository's own files on GitHub must name a file that exists here.
          const own = new RegExp(`^${publicRepo.replace(/[.]/g, "\\.")}(?:blob|tree)/main/([^#?]*)(?:#(.*))?$`)
            .exec(target)
          if (own !== null) {
            const why = checkTarget(own[1]!.replace(/\/$/, "") || ".", own[2])
            if (why !== undefined) fail(why)
          }
          continue
        }
        const [pathPart, anchor] = target.split("#", 2) as [string, string | undefined]
        const path = pathPart === "" ? file : normalize(join(dirname(file), decodeURIComponent(pathPart)))
        const why = checkTarget(path, anchor)
        if (why !== undefined) fail(why)
      }
    }
    assert.deepStrictEqual(failures, [], `broken links:\n${failures.join("\n")}`)
  })
})

describe("docs/en and docs/es", () => {
  const pages = (language: string) =>
    readdirSync(join(repoRoot, "docs", language)).filter((name) => name.endsWith(".md")).sort()

  it("hold the same pages", () => {
    assert.deepStrictEqual(pages("es"), pages("en"))
  })

  it("start each page with a front matter that has a title, then one # heading", () => {
    const failures: Array<string> = []
    for (const language of ["en", "es"]) {
      for (const page of pages(language)) {
        const file = `docs/${language}/${page}`
        const text = readText(repoRoot, file)
        const frontMatter = /^---\n([\s\S]*?)\n---\n/.exec(text)
        if (frontMatter === null || !/^title:\s*\S/m.test(frontMatter[1]!)) {
          failures.push(`${file}: no front matter with a title`)
          continue
        }
        const titles = scanOf(file).prose.filter((line) => /^# /.test(line))
        if (titles.length !== 1) failures.push(`${file}: ${titles.length} level-1 headings, not 1`)
      }
    }
    assert.deepStrictEqual(failures, [], failures.join("\n"))
  })

  it("give each page the same code blocks in both languages (ts, ts run, mermaid)", () => {
    const shape = (file: string) => {
      const found = scanOf(file).blocks
      const ts = found.filter((block) => block.language === "ts" || block.language === "typescript")
      return {
        ts: ts.length,
        tsRun: ts.filter((block) => block.flags.includes("run")).length,
        mermaid: found.filter((block) => block.language === "mermaid").length
      }
    }
    const english = new Set(pages("en"))
    const failures = pages("es").filter((page) => english.has(page)).flatMap((page) => {
      const [en, es] = [shape(`docs/en/${page}`), shape(`docs/es/${page}`)]
      return JSON.stringify(en) === JSON.stringify(es)
        ? []
        : [`${page}: en ${JSON.stringify(en)}, es ${JSON.stringify(es)}`]
    })
    assert.deepStrictEqual(failures, [], failures.join("\n"))
  })
})

describe("API reference (docs/api)", () => {
  it(
    "is what `npm run docs` generates from the JSDoc now (docgen refuses an export without @since or a description)",
    async () => {
      const outcome = await docgen
      assert.isTrue(outcome.ok, `docgen failed (${(outcome.milliseconds / 1000).toFixed(1)} s):\n${outcome.output}`)
      const committed = join(repoRoot, "docs", "api")
      assert.isTrue(existsSync(committed), "docs/api is missing: run npm run docs")
      const generated = listFiles(apiDir)
      assert.deepStrictEqual(listFiles(committed), generated, "docs/api has other files: run npm run docs")
      const stale = generated.filter((file) =>
        readFileSync(join(apiDir, file), "utf8") !== readFileSync(join(committed, file), "utf8")
      )
      assert.deepStrictEqual(stale, [], "docs/api is out of date: run npm run docs")
    },
    SLOW_TEST_MS
  )

  it("gives every public function and layer an @example", () => {
    const entries = publicModules.map((file) => join(repoRoot, file))
    const config = ts.getParsedCommandLineOfConfigFile(join(repoRoot, "tsconfig.json"), {}, {
      ...ts.sys,
      onUnRecoverableConfigFileDiagnostic: (diagnostic) => assert.fail(String(diagnostic.messageText))
    })!
    const program = ts.createProgram(entries, config.options)
    const checker = program.getTypeChecker()
    const missing: Array<string> = []
    for (const entry of entries) {
      const module = checker.getSymbolAtLocation(program.getSourceFile(entry)!)
      if (module === undefined) continue
      for (const exported of checker.getExportsOfModule(module)) {
        const symbol = exported.flags & ts.SymbolFlags.Alias ? checker.getAliasedSymbol(exported) : exported
        if (!(symbol.flags & (ts.SymbolFlags.Variable | ts.SymbolFlags.Function))) continue
        const declaration = symbol.valueDeclaration!
        const type = checker.getTypeOfSymbolAtLocation(symbol, declaration)
        const isFunction = type.getCallSignatures().length > 0
        const isLayer = (type.aliasSymbol ?? type.getSymbol())?.getName() === "Layer"
        if (!isFunction && !isLayer) continue
        const hasExample = ts.getJSDocTags(
          ts.isVariableDeclaration(declaration) ? declaration.parent.parent : declaration
        ).some((tag) => tag.tagName.text === "example")
        if (!hasExample) missing.push(`${relative(repoRoot, entry)}: ${exported.getName()}`)
      }
    }
    assert.deepStrictEqual(missing, [], `functions and layers without an @example:\n${missing.join("\n")}`)
  }, SLOW_TEST_MS)
})
