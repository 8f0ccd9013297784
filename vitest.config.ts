import { defineConfig } from "vitest/config"

export default defineConfig({
  test: {
    include: ["test/**/*.test.ts"],
    // Backend suites are mostly waiting on Redis, PostgreSQL and MariaDB, so two files at a time
    // keeps both cores busy; more than that and lease/TTL timing starts to compete for CPU.
    pool: "forks",
    fileParallelism: true,
    maxWorkers: 2,
    minWorkers: 1,
    testTimeout: 30_000,
    hookTimeout: 60_000,
    teardownTimeout: 30_000,
    sequence: {
      shuffle: false,
      concurrent: false
    }
  }
})
