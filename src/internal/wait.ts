import * as Clock from "effect/Clock"
import * as Context from "effect/Context"
import * as DefaultServices from "effect/DefaultServices"
import * as Effect from "effect/Effect"
import type * as Exit from "effect/Exit"
import * as Fiber from "effect/Fiber"

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
    // Both sides interruptible: called where the caller cannot be interrupted, the race must
    // still stop its loser (an uninterruptible sleep on `TestClock` would hold it until the clock
    // moves).
    return Effect.raceFirst(
      Effect.interruptible(signal),
      Effect.interruptible(Effect.as(Effect.sleep(millis), undefined))
    )
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

/**
 * A fiber's exit, or `undefined` once `millis` pass first.
 *
 * @internal
 */
export const fiberWithin = <A, E>(
  clock: Clock.Clock,
  fiber: Fiber.RuntimeFiber<A, E>,
  millis: number
): Effect.Effect<Exit.Exit<A, E> | undefined> =>
  within(clock, millis, (done: (exit: Exit.Exit<A, E>) => void) => {
    fiber.addObserver(done)
    return () => fiber.removeObserver(done)
  })

/**
 * Runs `self` on a fiber of its own for at most `millis`: its exit, or `undefined` once the time
 * is up and the fiber, interrupted, has stopped (as with `Effect.timeout`: a statement cancelled
 * must not take a key later). One fork and a timer, where `Effect.timeout` races two fibers and
 * costs several times a database round trip.
 *
 * @internal
 */
export const runWithin = <A, E, R>(
  self: Effect.Effect<A, E, R>,
  millis: number
): Effect.Effect<Exit.Exit<A, E> | undefined, never, R> =>
  Effect.clockWith((clock) =>
    Effect.flatMap(Effect.fork(self), (fiber) =>
      Effect.tap(
        fiberWithin(clock, fiber, millis),
        (exit) => exit === undefined ? Fiber.interrupt(fiber) : Effect.void
      ))
  )

/**
 * `runWithin` for a caller that must not be interrupted meanwhile: `self` and its timer run as
 * daemons, so an interruption sent to the caller (held off while it is uninterruptible) does not
 * reach them and end the storage call for everyone sharing it.
 *
 * @internal
 */
export const runDetachedWithin = <A, E, R>(
  self: Effect.Effect<A, E, R>,
  millis: number
): Effect.Effect<Exit.Exit<A, E> | undefined, never, R> =>
  Effect.clockWith((clock) =>
    Effect.flatMap(Effect.forkDaemon(Effect.interruptible(self)), (fiber) => {
      if (clock === liveClock) {
        return Effect.tap(
          fiberWithin(clock, fiber, millis),
          (exit) => exit === undefined ? Fiber.interruptFork(fiber) : Effect.void
        )
      }
      return Effect.flatMap(Effect.forkDaemon(Effect.interruptible(Effect.sleep(millis))), (timer) =>
        Effect.flatMap(
          Effect.async<Exit.Exit<A, E> | undefined>((resume) => {
            let fired = false
            const onCall = (exit: Exit.Exit<A, E>) => {
              if (fired) return
              fired = true
              resume(Effect.succeed(exit))
            }
            const onTimer = () => {
              if (fired) return
              fired = true
              resume(Effect.succeed(undefined))
            }
            fiber.addObserver(onCall)
            timer.addObserver(onTimer)
          }),
          (exit) =>
            Effect.as(
              Effect.zipRight(
                Fiber.interruptFork(timer),
                exit === undefined ? Fiber.interruptFork(fiber) : Effect.void
              ),
              exit
            )
        ))
    })
  )
