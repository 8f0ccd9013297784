// A value or request larger than the server accepts (`proto-max-bulk-len`; the server also drops
// the connection that sent it), a key holding another type, a command the user may not run.
// Everything else (timeouts, dropped connections, OOM, NOSCRIPT, READONLY during a failover, BUSY,
// LOADING) may pass by itself.
const permanent =
  /^(?:ERR Protocol error: invalid (?:multi)?bulk length|WRONGTYPE |NOPERM )|exceeds maximum allowed size/

// An error reply from the server (ioredis' `ReplyError`), as opposed to a failed connection.
/** @internal */
export const isReplyError = (cause: unknown): cause is Error => cause instanceof Error && cause.name === "ReplyError"

// An error reply that the same command would get again.
/** @internal */
export const isPermanent = (cause: unknown): boolean => isReplyError(cause) && permanent.test(cause.message)
