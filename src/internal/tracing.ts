import * as Context from "effect/Context"
import * as DefaultServices from "effect/DefaultServices"
import * as Effect from "effect/Effect"
import * as Tracer from "effect/Tracer"

// Effect's built-in tracer keeps its spans in memory and hands them to no one.
const nativeTracer = Context.get(DefaultServices.liveServices, Tracer.Tracer)

/**
 * Runs `f` inside a span named `name`, handing it the span to annotate; under Effect's built-in
 * tracer, which exports nothing, `f` gets `undefined` and no span is made. A span costs more than
 * the rest of a replay (random ids, a context copy, a finalizer), and only an installed tracer
 * (OpenTelemetry, DevTools, a test's) can read one. `attributes` is only computed for a real span.
 *
 * @internal
 */
export const withSpan = <A, E, R>(
  name: string,
  attributes: () => Record<string, unknown>,
  f: (span: Tracer.Span | undefined) => Effect.Effect<A, E, R>
): Effect.Effect<A, E, R> =>
  Effect.tracerWith((tracer) =>
    tracer === nativeTracer
      ? f(undefined)
      : Effect.useSpan(
        name,
        // A stack trace per call costs more than the rest of a replay; the span's name says where it is.
        { attributes: attributes(), captureStackTrace: false },
        (span) => Effect.withParentSpan(f(span), span)
      )
  )
