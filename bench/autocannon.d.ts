/**
 * The part of autocannon 8's programmatic API the HTTP benchmark uses (autocannon ships no types,
 * and `@types/autocannon` lags its major versions). See its README, "API".
 */
declare module "autocannon" {
  import type { EventEmitter } from "node:events"

  namespace autocannon {
    interface Request {
      method?: string
      path?: string
      headers?: Record<string, string>
      body?: string | Buffer
      /** Called before every request is sent; returns the request to send. */
      setupRequest?: (request: Request, context: Record<string, unknown>) => Request
    }

    interface Options {
      url: string
      connections?: number
      /** Seconds. */
      duration?: number
      pipelining?: number
      /** Seconds to wait for a response. */
      timeout?: number
      method?: string
      headers?: Record<string, string>
      body?: string | Buffer
      requests?: Array<Request>
    }

    /** Percentiles are `p2_5`, `p50`, `p75`, `p90`, `p97_5`, `p99`, `p99_9`, ... */
    interface Histogram {
      readonly average: number
      readonly mean: number
      readonly stddev: number
      readonly min: number
      readonly max: number
      readonly p50: number
      readonly p99: number
    }

    interface Result {
      /** Per-second samples, plus totals. */
      readonly requests: Histogram & { readonly total: number; readonly sent: number }
      /** Milliseconds, 2xx responses only, whole-millisecond resolution. */
      readonly latency: Histogram
      readonly throughput: Histogram
      /** Seconds. */
      readonly duration: number
      readonly errors: number
      readonly timeouts: number
      readonly mismatches: number
      readonly non2xx: number
      readonly "2xx": number
      readonly statusCodeStats: Readonly<Record<string, { readonly count: number }>>
    }

    interface Instance extends EventEmitter, PromiseLike<Result> {
      stop(): void
      on(
        event: "response",
        listener: (client: unknown, statusCode: number, resBytes: number, responseTime: number) => void
      ): this
      on(event: string, listener: (...args: Array<any>) => void): this
    }
  }

  function autocannon(options: autocannon.Options): autocannon.Instance

  export = autocannon
}
