import * as Clock from "effect/Clock"
import * as Context from "effect/Context"
import * as DefaultServices from "effect/DefaultServices"
import * as Effect from "effect/Effect"

const liveClock = Context.get(DefaultServices.liveServices, Clock.Clock)

// setTimeout fires at once past 2^31 - 1 millis: a longer wait has no timer, only the listener.
const maxTimerMillis = 2 ** 31 - 1

/**
 * Waits at most `millis` for a callback-style signal: its value, or `undefined` once the time is
 * up. `listen` registers the callback (calling it at once if the signal has come) and returns
 * what unregisters it.
 *
 * On the live clock this is one timer and one listener, with no fiber forked: racing a sleeper
 * (`Effect.timeout`, `Effect.raceFirst`) forks two, which costs more than the rest of a first
 * call. Any other clock (`TestClock`) gets the same race in plain Effect, so tests drive it.
 *
 * There is no canceler (one would wrap every wait in an interruption handler): an interrupted
 * waiter's listener stays until the signal comes, then resumes nothing, and its timer, unref'd,
 * ends by itself.
 *
 * @internal
 */
export const within = <A>(
  clock: Clock.Clock,
  millis: number,
  listen: (done: (value: A) => void) => () => void
): Effect.Effect<A | undefined> => {
  if (clock !== liveClock) {
    const signal = Effect.async<A | undefined>((resume) => {
      listen((value) => resume(Effect.succeed(value)))
    })
    return Effect.raceFirst(signal, Effect.as(Effect.sleep(millis), undefined))
  }
  return Effect.async<A | undefined>((resume) => {
    let timer: ReturnType<typeof setTimeout> | undefined = undefined
    let ended = false
    const stop = listen((value) => {
      ended = true
      clearTimeout(timer)
      resume(Effect.succeed(value))
    })
    if (ended || millis > maxTimerMillis) return
    timer = setTimeout(() => {
      stop()
      resume(Effect.succeed(undefined))
    }, millis)
    timer.unref()
  })
}
