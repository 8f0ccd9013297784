/**
 * SQL storage on any `@effect/sql` client: PostgreSQL (`@effect/sql-pg`), MySQL and MariaDB
 * (`@effect/sql-mysql2`) and SQLite (`@effect/sql-sqlite-node` and the other SQLite clients). It
 * needs no infrastructure beyond the database the application already has, and it can commit a
 * stored result in the same transaction as the application's own writes
 * (`Idempotent.wrap({ transactional: true })`).
 *
 * **One table** with its index (default `idempotency_records`), and on PostgreSQL two functions
 * that hold acquire and commit (see Statements) and a table of lease renewals, `<table>_leases`
 * (see Isolation). A row per key:
 *
 * | column            | PostgreSQL    | MySQL / MariaDB                   | SQLite    |
 * |-------------------|---------------|-----------------------------------|-----------|
 * | `key_hash` (PK)   | `bytea`       | `BINARY(32)`                      | `BLOB`    |
 * | `idempotency_key` | `text`        | `TEXT` utf8mb4, binary collation  | `TEXT`    |
 * | `state`           | `text`        | `VARCHAR(16)`                     | `TEXT`    |
 * | `token`           | `text`        | `VARCHAR(64)`                     | `TEXT`    |
 * | `fingerprint`     | `text`        | `VARCHAR(255)`                    | `TEXT`    |
 * | `fence`           | `bigint`      | `BIGINT`                          | `INTEGER` |
 * | `outcome`         | `text`        | `VARCHAR(16)`                     | `TEXT`    |
 * | `payload`         | `bytea`       | `LONGBLOB`                        | `BLOB`    |
 * | `created_at`      | `timestamptz` | `BIGINT` epoch millis             | `INTEGER` epoch millis |
 * | `expires_at`      | `timestamptz` | `BIGINT` epoch millis (indexed)   | `INTEGER` epoch millis (indexed) |
 *
 * The primary key is the SHA-256 of the key, so MySQL's case-insensitive and pad-space collations
 * and index length limits never apply to keys; the key itself is kept as given in its own column.
 * `state` is `in_flight` (a lease owned by `token` until `expires_at`) or `completed` (a record
 * replayed until `expires_at`). MySQL and SQLite have no timestamp type with a time zone, so they
 * keep epoch milliseconds, which also never overflow (MySQL's `TIMESTAMP` ends in 2038).
 *
 * **The schema.** {@link schema} returns the DDL per dialect (`npx effect-idempotency sql-schema
 * --dialect pg|mysql|sqlite [--table t] [--drop]` prints it) and {@link migrations} the same for
 * `@effect/sql`'s `Migrator`. The objects carry the schema version they are of
 * ({@link schemaVersion}): a comment on PostgreSQL's tables and functions and on MySQL's table, and
 * on SQLite a comment kept in the table's `CREATE` statement beside a check of its columns and
 * index. At build the layer reads the catalogs; with `createSchema: true` (the default) it runs
 * the DDL only if something is missing or older (every statement can run again, and brings older
 * objects up to date), and with `createSchema: false` it runs none and fails the build with
 * `IdempotencyStorageSetupError` naming what is missing or older and how to get it. The
 * statements of `drop` remove everything, functions included.
 *
 * **Time is the database's clock** (`clock_timestamp()` on PostgreSQL, `UTC_TIMESTAMP(6)` on MySQL,
 * `julianday('now')` on SQLite), so application servers with skewed clocks agree on every lease
 * and TTL. `TestClock` does not move it.
 *
 * **Statements.** Every protocol step is one statement (or one call of a function) that checks the
 * owner's token itself, except acquire on MySQL, which is two:
 *
 * - acquire on PostgreSQL: the PL/pgSQL function `<table>_acquire_v1`. A key live in a plain read
 *   (a replay, a duplicate of a running call) is answered from it: nothing is locked or written.
 *   Otherwise the row, if there is one, is locked `FOR UPDATE` (waiting out a renewal or commit of
 *   it in progress), and a statement after the lock takes the key only if it is still free; a new
 *   key is inserted with `ON CONFLICT DO NOTHING`, and a concurrent winner's row read once it
 *   committed. Commit is the function `<table>_commit_v1`. Both are created with the table:
 *   PostgreSQL then keeps their plans per connection, where the statements sent as they are would
 *   be parsed and planned on every call (about ten times the cost of a `SELECT 1`).
 * - acquire on SQLite: one upsert, `INSERT ... ON CONFLICT DO UPDATE SET col = CASE WHEN <expired>
 *   THEN <new> ELSE col END ... RETURNING` (one writer at a time makes it atomic).
 * - acquire on MySQL: the same with `ON DUPLICATE KEY UPDATE col = IF(<expired>, ...)`, then a
 *   `SELECT` of the row; the caller acquired only if the row then holds its token.
 * - A first call is acquire and commit: two statements (three on MySQL); a replay is one (two on
 *   MySQL).
 * - commit keeps the holder's token on the completed row, so a commit retried after its reply
 *   was lost (a dropped connection) is answered as done; it owns nothing else. On PostgreSQL it
 *   checks the token under the row's lock, not the lease's end: a lease that ran out but that
 *   no one took is still the holder's (taking it changes the token). MySQL and SQLite also
 *   require the lease not to have ended.
 * - renew, release: one `UPDATE ... WHERE token = ? AND state = 'in_flight' AND <not expired>`;
 *   on PostgreSQL renew writes the leases table instead (see Isolation). On PostgreSQL commit,
 *   release and delete also `pg_notify` in the same statement.
 * - read: one `SELECT` of a completed row that has not expired. delete: one `DELETE`. delete
 *   with a fence: one `UPDATE` that ends the completed row carrying that fence (its `expires_at`
 *   set to now) and nothing else; the row keeps its fence, so the next owner's is higher.
 *
 * **Isolation.** The storage's statements behave alike whatever the session's default isolation.
 * On PostgreSQL, where a statement above READ COMMITTED fails with a serialization error instead
 * of waiting for a concurrent change (two callers of a new key), the layer reads the session's
 * default at build and, if it is above READ COMMITTED, runs each of its own statements in a
 * transaction of its own at READ COMMITTED (three round trips more each: give the storage's
 * client a READ COMMITTED session to avoid them; all connections of a pool are assumed to share
 * the level). The commit inside a caller's transaction runs at the caller's level, whose snapshot
 * may predate the lease's renewals: so on PostgreSQL renewals never change the row, only
 * share-lock it, and write the lease's new end to `<table>_leases` (key hash, token, end), which
 * acquire, release and the cleanup read with the row; the commit then finds the row as the
 * acquire left it, and a caller's REPEATABLE READ or SERIALIZABLE transaction commits. MySQL's
 * updates read the latest row at every level, and SQLite has one writer.
 *
 * **Fences** are kept in the row: a new key starts from the database clock in microseconds and
 * each new owner adds one, across release, lease expiry and record expiry, which keep the row.
 * Deleting a key (or the cleanup removing its expired row) forgets its fence; the next owner
 * starts again from the clock, which is above every fence handed out before unless the key averaged
 * more than one new owner per microsecond (per millisecond on SQLite, whose clock has no finer
 * resolution), or the database clock went back.
 *
 * **Cleanup.** A fiber of the layer deletes expired rows every `cleanupInterval`, in batches of
 * `cleanupBatchSize`, one statement each: on PostgreSQL rows locked with `FOR UPDATE SKIP LOCKED`,
 * so that replicas never wait on each other; on MySQL `DELETE ... ORDER BY expires_at LIMIT n`;
 * on SQLite a `rowid` subquery. Expired rows are never replayed whether or not they were deleted:
 * every statement checks the expiry. Removing the storage altogether is `schema(...).drop`: the
 * table alone would leave PostgreSQL's functions and leases table behind.
 *
 * **Waiting.** On PostgreSQL with a `PgClient` in the context (as `PgClient.layer` provides),
 * waiters are woken by `LISTEN/NOTIFY`: the layer keeps one listening connection on the channel
 * `<table>_changed`, shared by all its waiters, and checks it every second with a notice to itself;
 * while it is down, waiters poll. Elsewhere (MySQL, SQLite, or PostgreSQL through a client that
 * cannot listen) `watch` polls: it returns after `pollInterval`, growing by half each round while
 * the same key is waited on, up to 1 second. A commit, release or delete made through the same
 * layer wakes its own waiters at once. `capabilities.notification` says which.
 *
 * **Transactions.** The storage's `transaction` is the client's `withTransaction`. `commit` runs
 * in the caller's context, so inside a transaction it lands in that transaction; every other step
 * runs outside it on its own connection, so that other callers see the lease at once and a
 * renewal is never held back by the caller's transaction. SQLite is the exception: its clients
 * have one connection, and a statement outside an open transaction would wait for it forever, so
 * there every step runs in the caller's transaction when there is one (and a lease is not renewed
 * in the caller's transaction on another connection: no other writer gets in while it is open).
 * A plain `Idempotent.wrap` inside a transaction of the caller's own commits its record with that
 * transaction too: until it ends, other callers of the key wait on the row's lock, and if it rolls
 * back, the key stays in flight until its lease ends.
 *
 * @since 0.1.0
 */
import * as SqlClient from "@effect/sql/SqlClient"
import type { SqlError } from "@effect/sql/SqlError"
import type * as Statement from "@effect/sql/Statement"
import * as Cause from "effect/Cause"
import * as Clock from "effect/Clock"
import * as Config from "effect/Config"
import type { ConfigError } from "effect/ConfigError"
import * as Context from "effect/Context"
import * as Deferred from "effect/Deferred"
import * as Duration from "effect/Duration"
import * as Effect from "effect/Effect"
import * as Exit from "effect/Exit"
import * as Fiber from "effect/Fiber"
import * as FiberId from "effect/FiberId"
import * as Layer from "effect/Layer"
import * as Option from "effect/Option"
import * as Predicate from "effect/Predicate"
import type * as Scope from "effect/Scope"
import * as Stream from "effect/Stream"
import { createHash } from "node:crypto"
import { IdempotencyStorageError, IdempotencyStorageSetupError, type StorageOperation } from "../IdempotencyError.js"
import type { IdempotencyRecord } from "../IdempotencyRecord.js"
import * as SqlInspect from "../internal/sql/inspect.js"
import * as SqlSchema from "../internal/sql/schema.js"
import * as wait from "../internal/wait.js"
import * as Storage from "../Storage.js"

/**
 * Options of the SQL storage layers.
 *
 * @since 0.1.0
 * @category Models
 */
export interface SqlStorageOptions {
  /**
   * The table, created if missing (unless `createSchema` is false). Default
   * `"idempotency_records"`. Letters, digits and underscores, not starting with a digit, at most 48
   * characters (so that the index and channel names derived from it fit PostgreSQL's 63); it is
   * quoted in every statement and lives in the connection's default schema or database.
   */
  readonly table?: string | undefined
  /**
   * Whether the layer may run DDL. Default `true`: at build it reads the catalogs, and if the
   * table (and on PostgreSQL the leases table and functions) is missing or of an older schema
   * version, runs the statements of {@link schema}, which create what is missing and bring older
   * objects up to date. With `false` it never runs DDL: objects that are missing or older fail
   * the build with `IdempotencyStorageSetupError`, whose `detail` names them and how to get them
   * ({@link schema}, the `effect-idempotency sql-schema` command, {@link migrations}).
   */
  readonly createSchema?: boolean | undefined
  /** How often expired rows are deleted. Default 1 minute. */
  readonly cleanupInterval?: Duration.DurationInput | undefined
  /** The most rows one cleanup statement deletes; batches follow until one is short. Default 1,000. */
  readonly cleanupBatchSize?: number | undefined
  /**
   * Where the store cannot notify, the first interval at which a waiter looks again; each round on
   * the same key waits half as long again, up to 1 second (or this interval, if longer). Default
   * 25 millis.
   */
  readonly pollInterval?: Duration.DurationInput | undefined
  /**
   * The bound on creating the table and on every statement of the protocol (not on the caller's
   * own effect inside `transaction`). A statement that overruns it fails with
   * `IdempotencyStorageError`, so an unreachable database fails closed instead of hanging a
   * caller. Default 10 seconds.
   */
  readonly timeout?: Duration.DurationInput | undefined
}

const maxPollMillis = 1000

// MySQL / MariaDB: what the commit statement adds to its payload in one packet (the statement
// text, the key's hash, the token and the other parameters), with room to spare.
const packetOverhead = 4096

// The listening connection is checked this often by a notice to itself; a notice that does not
// come back within `pingTimeout` means it is gone (PgClient does not report a dropped listener).
const heartbeatInterval = Duration.seconds(1)
const pingTimeout = Duration.seconds(2)
const pingPrefix = "ping:"

// Databases take interval arithmetic up to far beyond this; a hundred years is "forever" enough.
const maxExpiryMillis = 100 * 365 * 24 * 60 * 60 * 1000

const expiryMillis = (duration: Duration.Duration): number => {
  const millis = Duration.toMillis(duration)
  return Number.isFinite(millis) ? Math.min(Math.max(1, Math.ceil(millis)), maxExpiryMillis) : maxExpiryMillis
}

// Every way the layer (or `schema`) refuses to start says so with one error, naming the fix.
const setupError = (detail: string, cause?: unknown) =>
  new IdempotencyStorageSetupError(cause === undefined ? { backend: "sql", detail } : { backend: "sql", detail, cause })

/** A row as the statements return it; drivers differ in how they type numbers. */
interface Row {
  readonly token: string | null
  readonly state: string
  readonly idempotency_key: string | Uint8Array
  readonly fingerprint: string
  readonly fence: number | string | bigint
  readonly outcome: string | null
  readonly payload: Uint8Array | null
  readonly created_at: number | string | bigint
  readonly expires_at: number | string | bigint
  /** The database clock when the row was read, in epoch millis. */
  readonly now: number | string | bigint
}

interface AcquireArgs {
  readonly hash: Buffer
  readonly key: string
  readonly token: string
  readonly fingerprint: string
  readonly leaseMillis: number
}

/** The statements of one dialect. */
interface Dialect {
  readonly name: "pg" | "mysql" | "sqlite"
  /** Takes the key or answers who has it: the row afterwards, if there is one. */
  readonly acquire: (args: AcquireArgs) => Effect.Effect<Row | undefined, SqlError>
  readonly renew: (hash: Buffer, token: string, leaseMillis: number) => Effect.Effect<boolean, SqlError>
  readonly commit: (
    hash: Buffer,
    token: string,
    outcome: string,
    payload: Buffer,
    ttlMillis: number
  ) => Effect.Effect<boolean, SqlError>
  readonly release: (hash: Buffer, token: string) => Effect.Effect<boolean, SqlError>
  /** The completed row, if it has not expired. */
  readonly read: (hash: Buffer) => Effect.Effect<Row | undefined, SqlError>
  /**
   * With `fence`, only a completed row carrying it, which is ended rather than deleted: the row
   * keeps its fence, so the next owner's is higher (a row deleted and made again would start
   * from the clock, which on SQLite can repeat within a millisecond).
   */
  readonly delete: (hash: Buffer, fence: number | undefined) => Effect.Effect<void, SqlError>
  /** Deletes up to `limit` expired rows; how many it deleted. */
  readonly cleanup: (limit: number) => Effect.Effect<number, SqlError>
  /** PostgreSQL: sends a notice on the layer's channel. */
  readonly notify?: (payload: string) => Effect.Effect<void, SqlError>
}

const postgres = (sql: SqlClient.SqlClient, table: string): Dialect => {
  const t = sql(table)
  const leases = SqlSchema.leasesOf(table)
  const l = sql(leases)
  const channel = SqlSchema.channelOf(table)
  const functions = SqlSchema.postgresFunctions(table)
  // `clock_timestamp()`, not `now()`: inside a caller's transaction `now()` is when it began.
  const columns = sql.literal(SqlSchema.postgresColumns(leases, "r"))
  const expiry = sql.literal(SqlSchema.postgresExpiry(leases, "r"))

  return {
    name: "pg",
    acquire: ({ fingerprint, hash, key, leaseMillis, token }) =>
      Effect.map(
        sql<Row>`
          SELECT * FROM ${sql(functions.acquire)}(
            ${hash}::bytea, ${key}::text, ${token}::text, ${fingerprint}::text, ${leaseMillis}::float8
          )
        `,
        (rows) => rows[0]
      ),

    // The renewal goes to the leases table; the row itself is only share-locked, which waits out a
    // takeover in progress and is not a change that a caller's transaction could conflict with.
    renew: (hash, token, leaseMillis) =>
      Effect.map(
        sql`
          WITH owner AS (
            SELECT r.key_hash FROM ${t} AS r
            WHERE r.key_hash = ${hash}::bytea AND r.token = ${token}::text AND r.state = 'in_flight'
              AND ${expiry} > clock_timestamp()
            FOR SHARE
          )
          INSERT INTO ${l} (key_hash, token, expires_at)
          SELECT key_hash, ${token}::text, clock_timestamp() + ${leaseMillis}::float8 * interval '1 millisecond'
          FROM owner
          ON CONFLICT (key_hash) DO UPDATE SET token = excluded.token, expires_at = excluded.expires_at
          RETURNING 1 AS renewed
        `,
        (rows) => rows.length > 0
      ),

    // Above READ COMMITTED, a row changed since the caller's transaction began fails the update
    // ("concurrent update"): only a new owner changes it (renewals do not), so the caller's token
    // no longer owns the key. The transaction is rolled back either way. Other serialization
    // failures (SERIALIZABLE's read/write dependencies) say nothing about the key: errors.
    commit: (hash, token, outcome, payload, ttlMillis) =>
      Effect.map(
        sql<{ readonly committed: boolean }>`
          SELECT ${sql(functions.commit)}(
            ${hash}::bytea, ${token}::text, ${outcome}::text, ${payload}::bytea, ${ttlMillis}::float8
          ) AS committed
        `,
        (rows) => rows[0]?.committed === true
      ).pipe(Effect.catchIf(changedSinceSnapshot, () => Effect.succeed(false))),

    release: (hash, token) =>
      Effect.map(
        sql`
          WITH done AS (
            UPDATE ${t} AS r SET token = NULL, expires_at = clock_timestamp()
            WHERE r.key_hash = ${hash}::bytea AND r.token = ${token}::text AND r.state = 'in_flight'
              AND ${expiry} > clock_timestamp()
            RETURNING r.key_hash
          )
          SELECT pg_notify(${channel}::text, encode(key_hash, 'hex')) FROM done
        `,
        (rows) => rows.length > 0
      ),

    read: (hash) =>
      Effect.map(
        sql<Row>`
          SELECT ${columns} FROM ${t} AS r
          WHERE r.key_hash = ${hash}::bytea AND r.state = 'completed' AND r.expires_at > clock_timestamp()
        `,
        (rows) => rows[0]
      ),

    delete: (hash, fence) =>
      Effect.asVoid(
        fence === undefined
          ? sql`
            WITH gone AS (DELETE FROM ${t} WHERE key_hash = ${hash}::bytea RETURNING key_hash)
            SELECT pg_notify(${channel}::text, encode(key_hash, 'hex')) FROM gone
          `
          : sql`
            WITH gone AS (
              UPDATE ${t} SET expires_at = clock_timestamp()
              WHERE key_hash = ${hash}::bytea AND state = 'completed' AND fence = ${fence}::bigint
                AND expires_at > clock_timestamp()
              RETURNING key_hash
            )
            SELECT pg_notify(${channel}::text, encode(key_hash, 'hex')) FROM gone
          `
      ),

    // Rows another replica is deleting are locked, and skipped rather than waited for. A lease
    // renewed past its row's `expires_at` stays; renewals that ended go too.
    cleanup: (limit) =>
      Effect.map(
        sql<{ readonly deleted: number | string }>`
          WITH gone AS (
            DELETE FROM ${t} WHERE ctid IN (
              SELECT r.ctid FROM ${t} AS r WHERE r.expires_at <= clock_timestamp() AND ${expiry} <= clock_timestamp()
              LIMIT ${limit}::int FOR UPDATE SKIP LOCKED
            )
            RETURNING 1
          ),
          renewals AS (
            DELETE FROM ${l} WHERE ctid IN (
              SELECT ctid FROM ${l} WHERE expires_at <= clock_timestamp()
              LIMIT ${limit}::int FOR UPDATE SKIP LOCKED
            )
            RETURNING 1
          )
          SELECT greatest((SELECT count(*) FROM gone), (SELECT count(*) FROM renewals))::int AS deleted
        `,
        (rows) => Number(rows[0]?.deleted ?? 0)
      ),

    notify: (payload) => Effect.asVoid(sql`SELECT pg_notify(${channel}::text, ${payload}::text)`)
  }
}

// A retried commit whose first try landed finds its token on the completed row: answered as done,
// with the record left as it is (writing it again would move its TTL, and bring back a record that
// has since expired or been deleted by its fence). Once the record has ended it is refused, as on
// every other backend.
const committedBeforeOn =
  (sql: SqlClient.SqlClient, table: string, nowMillis: Statement.Fragment) => (hash: Buffer, token: string) =>
    Effect.map(
      sql`SELECT 1 AS done FROM ${sql(table)}
      WHERE key_hash = ${hash} AND token = ${token} AND state = 'completed' AND expires_at > ${nowMillis}`,
      (rows) => rows.length > 0
    )

const mysql = (sql: SqlClient.SqlClient, table: string): Dialect => {
  const t = sql(table)
  // UTC, so that no session time zone or daylight saving change moves it; fixed for a statement.
  const nowMicros = sql.literal("TIMESTAMPDIFF(MICROSECOND, '1970-01-01 00:00:00', UTC_TIMESTAMP(6))")
  const nowMillis = sql.literal("(TIMESTAMPDIFF(MICROSECOND, '1970-01-01 00:00:00', UTC_TIMESTAMP(6)) DIV 1000)")
  const columns = sql`token, state, idempotency_key, fingerprint, fence, outcome, payload, created_at, expires_at,
    ${nowMillis} AS now`
  const affected = (result: unknown) => Predicate.hasProperty(result, "affectedRows") && Number(result.affectedRows) > 0
  const committedBefore = committedBeforeOn(sql, table, nowMillis)

  return {
    name: "mysql",
    // MySQL evaluates `ON DUPLICATE KEY UPDATE` assignments left to right, each seeing the ones
    // before (MariaDB's SIMULTANEOUS_ASSIGNMENT mode does not): every condition reads only
    // `expires_at`, assigned last, so both orders decide alike. `VALUES(created_at)` is the
    // statement's clock. The SELECT after it sees the row as it is now; the caller acquired only
    // if that row holds its token, so no two callers can both believe they own the key.
    acquire: ({ fingerprint, hash, key, leaseMillis, token }) =>
      Effect.zipRight(
        sql`
          INSERT INTO ${t}
            (key_hash, idempotency_key, state, token, fingerprint, fence, outcome, payload, created_at, expires_at)
          VALUES (${hash}, ${key}, 'in_flight', ${token}, ${fingerprint}, ${nowMicros}, NULL, NULL,
            ${nowMillis}, ${nowMillis} + CAST(${leaseMillis} AS SIGNED))
          ON DUPLICATE KEY UPDATE
            idempotency_key = IF(expires_at <= VALUES(created_at), VALUES(idempotency_key), idempotency_key),
            state = IF(expires_at <= VALUES(created_at), VALUES(state), state),
            token = IF(expires_at <= VALUES(created_at), VALUES(token), token),
            fingerprint = IF(expires_at <= VALUES(created_at), VALUES(fingerprint), fingerprint),
            fence = IF(expires_at <= VALUES(created_at), fence + 1, fence),
            outcome = IF(expires_at <= VALUES(created_at), NULL, outcome),
            payload = IF(expires_at <= VALUES(created_at), NULL, payload),
            created_at = IF(expires_at <= VALUES(created_at), VALUES(created_at), created_at),
            expires_at = IF(expires_at <= VALUES(created_at), VALUES(expires_at), expires_at)
        `.raw,
        Effect.map(sql<Row>`SELECT ${columns} FROM ${t} WHERE key_hash = ${hash}`, (rows) => rows[0])
      ),

    // mysql2 connects with CLIENT_FOUND_ROWS: `affectedRows` counts matched rows, so a renewal
    // that lands on the same millisecond still reports the row it found.
    renew: (hash, token, leaseMillis) =>
      Effect.map(
        sql`
          UPDATE ${t} SET expires_at = ${nowMillis} + CAST(${leaseMillis} AS SIGNED)
          WHERE key_hash = ${hash} AND token = ${token} AND state = 'in_flight' AND expires_at > ${nowMillis}
        `.raw,
        affected
      ),

    commit: (hash, token, outcome, payload, ttlMillis) =>
      Effect.flatMap(
        sql`
          UPDATE ${t} SET state = 'completed', outcome = ${outcome}, payload = ${payload},
            created_at = ${nowMillis}, expires_at = ${nowMillis} + CAST(${ttlMillis} AS SIGNED)
          WHERE key_hash = ${hash} AND token = ${token} AND state = 'in_flight' AND expires_at > ${nowMillis}
        `.raw,
        (result) => affected(result) ? Effect.succeed(true) : committedBefore(hash, token)
      ),

    release: (hash, token) =>
      Effect.map(
        sql`
          UPDATE ${t} SET token = NULL, expires_at = ${nowMillis}
          WHERE key_hash = ${hash} AND token = ${token} AND state = 'in_flight' AND expires_at > ${nowMillis}
        `.raw,
        affected
      ),

    read: (hash) =>
      Effect.map(
        sql<Row>`
          SELECT ${columns} FROM ${t}
          WHERE key_hash = ${hash} AND state = 'completed' AND expires_at > ${nowMillis}
        `,
        (rows) => rows[0]
      ),

    delete: (hash, fence) =>
      Effect.asVoid(
        fence === undefined
          ? sql`DELETE FROM ${t} WHERE key_hash = ${hash}`.raw
          : sql`
            UPDATE ${t} SET expires_at = ${nowMillis}
            WHERE key_hash = ${hash} AND state = 'completed' AND fence = ${fence} AND expires_at > ${nowMillis}
          `.raw
      ),

    cleanup: (limit) =>
      Effect.map(
        sql`DELETE FROM ${t} WHERE expires_at <= ${nowMillis} ORDER BY expires_at LIMIT ${sql.literal(String(limit))}`
          .raw,
        (result) => Predicate.hasProperty(result, "affectedRows") ? Number(result.affectedRows) : 0
      )
  }
}

const sqlite = (sql: SqlClient.SqlClient, table: string): Dialect => {
  const t = sql(table)
  // SQLite fixes 'now' for the whole statement; its resolution is one millisecond.
  const nowMillis = sql.literal("CAST(ROUND((julianday('now') - 2440587.5) * 86400000.0) AS INTEGER)")
  const committedBefore = committedBeforeOn(sql, table, nowMillis)
  const columns = sql`token, state, idempotency_key, fingerprint, fence, outcome, payload, created_at, expires_at,
    ${nowMillis} AS now`

  return {
    name: "sqlite",
    // In an upsert's SET every expression reads the row as it was, so the order does not matter;
    // one writer at a time makes the statement atomic across connections and processes.
    acquire: ({ fingerprint, hash, key, leaseMillis, token }) =>
      Effect.map(
        sql<Row>`
          INSERT INTO ${t}
            (key_hash, idempotency_key, state, token, fingerprint, fence, outcome, payload, created_at, expires_at)
          VALUES (${hash}, ${key}, 'in_flight', ${token}, ${fingerprint}, ${nowMillis} * 1000, NULL, NULL,
            ${nowMillis}, ${nowMillis} + CAST(${leaseMillis} AS INTEGER))
          ON CONFLICT (key_hash) DO UPDATE SET
            idempotency_key = CASE WHEN expires_at <= excluded.created_at
              THEN excluded.idempotency_key ELSE idempotency_key END,
            state = CASE WHEN expires_at <= excluded.created_at THEN excluded.state ELSE state END,
            token = CASE WHEN expires_at <= excluded.created_at THEN excluded.token ELSE token END,
            fingerprint = CASE WHEN expires_at <= excluded.created_at THEN excluded.fingerprint ELSE fingerprint END,
            fence = CASE WHEN expires_at <= excluded.created_at THEN fence + 1 ELSE fence END,
            outcome = CASE WHEN expires_at <= excluded.created_at THEN NULL ELSE outcome END,
            payload = CASE WHEN expires_at <= excluded.created_at THEN NULL ELSE payload END,
            created_at = CASE WHEN expires_at <= excluded.created_at THEN excluded.created_at ELSE created_at END,
            expires_at = CASE WHEN expires_at <= excluded.created_at THEN excluded.expires_at ELSE expires_at END
          RETURNING ${columns}
        `,
        (rows) => rows[0]
      ),

    renew: (hash, token, leaseMillis) =>
      Effect.map(
        sql`
          UPDATE ${t} SET expires_at = ${nowMillis} + CAST(${leaseMillis} AS INTEGER)
          WHERE key_hash = ${hash} AND token = ${token} AND state = 'in_flight' AND expires_at > ${nowMillis}
          RETURNING 1 AS renewed
        `,
        (rows) => rows.length > 0
      ),

    commit: (hash, token, outcome, payload, ttlMillis) =>
      Effect.flatMap(
        sql`
          UPDATE ${t} SET state = 'completed', outcome = ${outcome}, payload = ${payload},
            created_at = ${nowMillis}, expires_at = ${nowMillis} + CAST(${ttlMillis} AS INTEGER)
          WHERE key_hash = ${hash} AND token = ${token} AND state = 'in_flight' AND expires_at > ${nowMillis}
          RETURNING 1 AS committed
        `,
        (rows) => rows.length > 0 ? Effect.succeed(true) : committedBefore(hash, token)
      ),

    release: (hash, token) =>
      Effect.map(
        sql`
          UPDATE ${t} SET token = NULL, expires_at = ${nowMillis}
          WHERE key_hash = ${hash} AND token = ${token} AND state = 'in_flight' AND expires_at > ${nowMillis}
          RETURNING 1 AS released
        `,
        (rows) => rows.length > 0
      ),

    read: (hash) =>
      Effect.map(
        sql<Row>`
          SELECT ${columns} FROM ${t}
          WHERE key_hash = ${hash} AND state = 'completed' AND expires_at > ${nowMillis}
        `,
        (rows) => rows[0]
      ),

    delete: (hash, fence) =>
      Effect.asVoid(
        fence === undefined
          ? sql`DELETE FROM ${t} WHERE key_hash = ${hash}`
          : sql`
            UPDATE ${t} SET expires_at = ${nowMillis}
            WHERE key_hash = ${hash} AND state = 'completed' AND fence = ${fence} AND expires_at > ${nowMillis}
          `
      ),

    cleanup: (limit) =>
      Effect.map(
        sql`
          DELETE FROM ${t} WHERE rowid IN (
            SELECT rowid FROM ${t} WHERE expires_at <= ${nowMillis} LIMIT ${sql.literal(String(limit))}
          )
          RETURNING 1 AS deleted
        `,
        (rows) => rows.length
      )
  }
}

/** What this module needs of `@effect/sql-pg`'s `PgClient`, found by its tag without importing it. */
interface Listener {
  readonly listen: (channel: string) => Stream.Stream<string, SqlError>
}

const PgListener = Context.GenericTag<Listener>("@effect/sql-pg/PgClient")

const hashOf = (key: string): Buffer => createHash("sha256").update(key, "utf8").digest()

const toNumber = (value: number | string | bigint | null | undefined): number | undefined => {
  const number = typeof value === "number" ? value : value === null || value === undefined ? NaN : Number(value)
  return Number.isFinite(number) ? number : undefined
}

const toText = (value: string | Uint8Array): string =>
  typeof value === "string" ? value : Buffer.from(value.buffer, value.byteOffset, value.byteLength).toString("utf8")

const toBuffer = (bytes: Uint8Array): Buffer => Buffer.from(bytes.buffer, bytes.byteOffset, bytes.byteLength)

const emptyPayload = new Uint8Array(0)

class UnexpectedRow extends Error {
  constructor(readonly row: unknown) {
    super("unexpected row in the idempotency table: it holds data this library did not write")
  }
}

const toRecord = (row: Row): IdempotencyRecord | undefined => {
  const fence = toNumber(row.fence)
  const createdAt = toNumber(row.created_at)
  const expiresAt = toNumber(row.expires_at)
  if (
    fence === undefined || createdAt === undefined || expiresAt === undefined ||
    (row.outcome !== "success" && row.outcome !== "failure")
  ) return undefined
  return {
    key: toText(row.idempotency_key),
    fingerprint: row.fingerprint,
    outcome: row.outcome,
    // SQLite may give back an empty blob as NULL.
    payload: row.payload ?? emptyPayload,
    fence,
    createdAt,
    expiresAt
  }
}

/** Rolls the client's transaction back, carrying how the caller's effect ended. */
class RolledBack {
  constructor(readonly cause: Cause.Cause<unknown>) {}
}

const isSqlError = (u: unknown): u is SqlError => Predicate.isTagged(u, "SqlError")

/** The driver's error under a `SqlError`. */
const driverError = (u: unknown): unknown => isSqlError(u) ? u.cause : u

/** PostgreSQL: the SQLSTATE of a failed statement. */
const sqlState = (u: unknown): string | undefined => {
  const error = driverError(u)
  return Predicate.hasProperty(error, "code") && typeof error.code === "string" ? error.code : undefined
}

/** PostgreSQL: an update found its row changed by a transaction that committed after its snapshot. */
const changedSinceSnapshot = (u: unknown): boolean => {
  const error = driverError(u)
  return sqlState(u) === "40001" && Predicate.hasProperty(error, "message") && typeof error.message === "string" &&
    error.message.includes("concurrent update")
}

// MySQL / MariaDB errors about a value the server will never take: a packet over
// `max_allowed_packet` (1153, and 1301 for a result over it), a row or a column too large (1118,
// 1406).
const permanentMysqlErrors = new Set([1118, 1153, 1301, 1406])
const permanentMysqlCodes = new Set([
  "ER_TOO_BIG_ROWSIZE",
  "ER_NET_PACKET_TOO_LARGE",
  "ER_WARN_ALLOWED_PACKET_OVERFLOWED",
  "ER_DATA_TOO_LONG"
])

/**
 * Whether a statement failed in a way that trying again cannot fix: a value larger than the
 * database takes. MySQL / MariaDB by error number, PostgreSQL by SQLSTATE (class 54,
 * program_limit_exceeded: a value or a statement over a limit; 22001, a string too long), SQLite
 * by `SQLITE_TOOBIG`.
 */
const permanent = (u: unknown): boolean => {
  const error = driverError(u)
  if (!Predicate.isObject(error)) return false
  const errno = Predicate.hasProperty(error, "errno") ? error.errno : undefined
  const code = Predicate.hasProperty(error, "code") ? error.code : undefined
  if (typeof errno === "number" && permanentMysqlErrors.has(errno)) return true
  if (typeof code !== "string") return false
  return permanentMysqlCodes.has(code) || /^54[0-9A-Z]{3}$/.test(code) || code === "22001" ||
    code === "SQLITE_TOOBIG"
}

interface Watched {
  readonly waiters: Set<Deferred.Deferred<void>>
  /** When this round of waiting on the key began: polls back off from there. */
  since: number
  lastWatchedAt: number
}

/**
 * Builds a SQL storage on the context's `SqlClient`: checks the schema (creating or upgrading it
 * unless `createSchema` is false), and runs the cleanup (and on PostgreSQL the listener) for as
 * long as the scope. Fails with `IdempotencyStorageSetupError` on a client whose dialect is not
 * PostgreSQL, MySQL or SQLite, an invalid option, a schema that is missing or older with
 * `createSchema: false` or that cannot be created, or a `PgClient` in context whose `LISTEN`
 * cannot be confirmed within `timeout`.
 *
 * @example
 * ```ts
 * import { SqliteClient } from "@effect/sql-sqlite-node"
 * import { Effect, Layer } from "effect"
 * import { Idempotent, Storage } from "effect-idempotency"
 * import * as SqlStorage from "effect-idempotency/Storage/Sql"
 *
 * // What SqlStorage.layer does, here on an in-memory SQLite database.
 * const StorageLive = Layer.scoped(Storage.Storage, SqlStorage.make({ table: "idempotency_records" })).pipe(
 *   Layer.provide(SqliteClient.layer({ filename: ":memory:" }))
 * )
 *
 * const program = Effect.succeed(42).pipe(Idempotent.wrap({ key: "job-1" }), Effect.provide(StorageLive))
 *
 * Effect.runPromise(program).then(console.log) // 42
 * ```
 *
 * @since 0.1.0
 * @category Constructors
 */
export const make = (
  options?: SqlStorageOptions
): Effect.Effect<Storage.StorageService, IdempotencyStorageSetupError, SqlClient.SqlClient | Scope.Scope> =>
  Effect.gen(function*() {
    const table = options?.table ?? SqlSchema.defaultTable
    const createSchema = options?.createSchema ?? true
    const cleanupInterval = Duration.decode(options?.cleanupInterval ?? Duration.minutes(1))
    const cleanupBatchSize = options?.cleanupBatchSize ?? 1000
    const pollMillis = Math.max(1, Duration.toMillis(Duration.decode(options?.pollInterval ?? Duration.millis(25))))
    const timeout = Duration.decode(options?.timeout ?? Duration.seconds(10))
    const timeoutMillis = Duration.toMillis(timeout)
    const pollCapMillis = Math.max(maxPollMillis, pollMillis)

    const configure = (detail: string) => setupError(detail)

    const invalidTable = SqlSchema.invalidTable(table)
    if (invalidTable !== undefined) return yield* configure(invalidTable)
    if (!Number.isSafeInteger(cleanupBatchSize) || cleanupBatchSize < 1) {
      return yield* configure(`cleanupBatchSize must be a positive integer, not ${cleanupBatchSize}`)
    }

    // Names as given: the storage's own columns must not pass through a client's name transforms.
    const sql = (yield* SqlClient.SqlClient).withoutTransforms()
    const dialect = sql.onDialectOrElse({
      pg: () => postgres(sql, table),
      mysql: () => mysql(sql, table),
      sqlite: () => sqlite(sql, table),
      orElse: (): Dialect | undefined => undefined
    })
    if (dialect === undefined) {
      const name = sql.onDialectOrElse({
        mssql: () => "mssql",
        clickhouse: () => "clickhouse",
        orElse: () => "unknown"
      })
      return yield* configure(
        `the SQL client's dialect (${name}) is not supported: use PostgreSQL, MySQL / MariaDB or SQLite`
      )
    }

    const failure = (operation: StorageOperation, key: string) => (cause: unknown) =>
      new IdempotencyStorageError(
        permanent(cause) ? { key, operation, cause, retryable: false } : { key, operation, cause }
      )

    // PostgreSQL sessions whose default isolation is above READ COMMITTED: the storage's own
    // statements run in a transaction of their own at READ COMMITTED (see Isolation). Read once
    // the table is there.
    let readCommittedExplicitly = false

    // SQLite clients have one connection, held by an open transaction: a statement outside it would
    // wait for the transaction, and the transaction for the statement.
    const outside = <A>(statement: Effect.Effect<A, SqlError>): Effect.Effect<A, SqlError> =>
      dialect.name === "sqlite" ? statement : Effect.mapInputContext(
        readCommitted(statement),
        (context: Context.Context<never>) => Context.omit(SqlClient.TransactionConnection)(context)
      )

    // A statement of the storage's own, not in a caller's transaction: at READ COMMITTED.
    const readCommitted = <A>(statement: Effect.Effect<A, SqlError>): Effect.Effect<A, SqlError> =>
      Effect.suspend(() =>
        readCommittedExplicitly
          ? sql.withTransaction(Effect.zipRight(sql`SET TRANSACTION ISOLATION LEVEL READ COMMITTED`, statement))
          : statement
      )

    // Every statement is bounded. `Idempotent.wrap` acquires and commits uninterruptibly; the
    // statement runs on a fiber of its own, interruptible, so that the timeout can end the wait
    // even there (and the statement, in the background).
    const bounded = <A, E>(
      onFailure: (cause: unknown) => E,
      statement: Effect.Effect<A, SqlError>
    ): Effect.Effect<A, E> =>
      Effect.flatMap(
        wait.runWithin(Effect.interruptible(statement), timeoutMillis),
        (exit) =>
          exit === undefined
            ? Effect.fail(onFailure(new Error(`the database did not answer within ${Duration.format(timeout)}`)))
            : Effect.mapError(exit, onFailure)
      )
    const call = <A>(operation: StorageOperation, key: string, statement: Effect.Effect<A, SqlError>) =>
      bounded(failure(operation, key), statement)
    // The layer's own statements (creating the schema, reading settings) fail the layer's build.
    const setupCall = <A>(doing: string, statement: Effect.Effect<A, SqlError>) =>
      bounded(
        (cause) => setupError(`${doing} failed`, cause),
        statement
      )

    // The catalogs are read first: a schema that is there and current costs no DDL, no lock, and
    // no privilege beyond seeing it.
    const inspect = setupCall("reading the schema", outside(SqlInspect.inspect(sql, dialect.name, table)))
    const problems = yield* inspect
    if (problems.length > 0) {
      if (!createSchema) return yield* configure(SqlInspect.notReady(dialect.name, table, problems))
      const statements = SqlSchema.createStatements(dialect.name, table).map((ddl) => sql.unsafe(ddl))
      // Concurrent `CREATE TABLE IF NOT EXISTS` can fail on PostgreSQL (a duplicate row in
      // pg_type): builds that start together take turns on an advisory lock.
      yield* setupCall(
        "creating the schema (a role that may not run DDL takes createSchema: false)",
        outside(
          dialect.name === "pg"
            ? sql.withTransaction(Effect.all([
              sql`SELECT pg_advisory_xact_lock(hashtext(${`effect-idempotency ${table}`}::text))`,
              ...statements
            ], { discard: true }))
            : Effect.all(statements, { discard: true })
        )
      )
      const left = yield* inspect
      if (left.length > 0) return yield* configure(SqlInspect.notUpgraded(dialect.name, table, left))
    }
    if (dialect.name === "pg") {
      const [level] = yield* setupCall(
        "reading transaction_isolation",
        outside(sql<{ readonly level: string }>`SELECT current_setting('transaction_isolation') AS level`)
      )
      readCommittedExplicitly = level?.level !== "read committed"
    }
    // MySQL / MariaDB: a statement over `max_allowed_packet` makes the server drop the connection
    // (the client sees only a reset, as for any network failure), so a result that cannot fit is
    // refused before it is sent. Read once; 0 where unknown.
    const maxPacket = dialect.name === "mysql"
      ? yield* setupCall(
        "reading max_allowed_packet",
        outside(Effect.map(
          sql<{ readonly max_packet: number | string }>`SELECT @@max_allowed_packet AS max_packet`,
          (rows) => Number(rows[0]?.max_packet ?? 0)
        ))
      )
      : 0

    // Waiters, by key hash in hex (the payload of the notices).
    const watched = new Map<string, Watched>()
    const wake = (hex: string) => watched.get(hex)?.waiters.forEach((waiter) => Deferred.unsafeDone(waiter, Exit.void))
    const wakeAll = () => watched.forEach((_, hex) => wake(hex))
    const forgetIdle = (now: number) =>
      watched.forEach((entry, hex) => {
        if (entry.waiters.size === 0 && now - entry.lastWatchedAt > 2 * pollCapMillis) watched.delete(hex)
      })

    const listener = dialect.notify === undefined
      ? undefined
      : yield* Effect.flatMap(Effect.serviceOption(PgListener), (pg) =>
        Option.isNone(pg)
          ? Effect.succeed(undefined)
          : listen(pg.value, SqlSchema.channelOf(table), dialect.notify!, wake, wakeAll, timeout))
    const notifies = () => listener?.ready === true

    const sweep = Effect.gen(function*() {
      let deleted = cleanupBatchSize
      while (deleted >= cleanupBatchSize) {
        deleted = yield* call("cleanup", "", outside(dialect.cleanup(cleanupBatchSize)))
      }
    }).pipe(
      Effect.catchAll((error) =>
        Effect.logWarning("idempotency cleanup failed; it runs again at the next interval").pipe(
          Effect.annotateLogs("cause", error.message)
        )
      ),
      Effect.zipRight(Effect.flatMap(Clock.currentTimeMillis, (now) => Effect.sync(() => forgetIdle(now))))
    )
    // The first sweep waits an interval too: replicas deployed together do not all sweep at boot.
    yield* Effect.forkScoped(Effect.forever(Effect.zipRight(Effect.sleep(cleanupInterval), sweep)))

    const unexpected = (operation: StorageOperation, key: string, row: unknown) =>
      Effect.fail(failure(operation, key)(new UnexpectedRow(row)))

    const acquire = (request: Storage.AcquireRequest) => {
      const token = Storage.makeToken()
      return Effect.flatMap(
        call(
          "acquire",
          request.key,
          outside(dialect.acquire({
            hash: hashOf(request.key),
            key: request.key,
            token,
            fingerprint: request.fingerprint,
            leaseMillis: expiryMillis(request.lease)
          }))
        ),
        (row): Effect.Effect<Storage.AcquireResult, IdempotencyStorageError> => {
          // MySQL only: the row was deleted between its two statements. Whoever deleted it did so
          // a moment ago; the caller looks again.
          if (row === undefined) {
            return Effect.succeed(
              Storage.AcquireResult.InFlight({ fingerprint: undefined, leaseRemaining: Duration.zero })
            )
          }
          const fence = toNumber(row.fence)
          const now = toNumber(row.now)
          const expiresAt = toNumber(row.expires_at)
          if (fence === undefined || now === undefined || expiresAt === undefined) {
            return unexpected("acquire", request.key, row)
          }
          if (row.token === token) {
            return Effect.succeed(Storage.AcquireResult.Acquired({
              lease: { key: request.key, fingerprint: request.fingerprint, token, fence }
            }))
          }
          if (row.state === "completed") {
            // A record that expired since the statement decided (a lock wait on PostgreSQL, the
            // gap between MySQL's two statements) is not replayed: the caller looks again.
            if (expiresAt <= now) {
              return Effect.succeed(
                Storage.AcquireResult.InFlight({ fingerprint: undefined, leaseRemaining: Duration.zero })
              )
            }
            const record = toRecord(row)
            return record === undefined
              ? unexpected("acquire", request.key, row)
              : Effect.succeed(Storage.AcquireResult.Completed({ record }))
          }
          if (row.state !== "in_flight") return unexpected("acquire", request.key, row)
          return Effect.succeed(Storage.AcquireResult.InFlight({
            fingerprint: row.fingerprint,
            leaseRemaining: Duration.millis(Math.max(0, expiresAt - now))
          }))
        }
      )
    }

    // A change made through this layer wakes its own waiters at once; with a listener the notice
    // does, for every layer on the database.
    const changed = (hash: Buffer) =>
      Effect.sync(() => {
        if (!notifies()) wake(hash.toString("hex"))
      })

    const commit = (lease: Storage.Lease, request: Storage.CommitRequest) => {
      const hash = hashOf(lease.key)
      if (maxPacket > 0 && request.payload.length + packetOverhead > maxPacket) {
        return Effect.fail(
          new IdempotencyStorageError({
            key: lease.key,
            operation: "commit",
            retryable: false,
            cause: new Error(
              `the result is ${request.payload.length} bytes: with its statement, more than the server's ` +
                `max_allowed_packet (${maxPacket})`
            )
          })
        )
      }
      // In the caller's context: inside `transaction` it commits with the caller's writes.
      const statement = dialect.commit(
        hash,
        lease.token,
        request.outcome,
        toBuffer(request.payload),
        expiryMillis(request.ttl)
      )
      return call(
        "commit",
        lease.key,
        Effect.flatMap(
          Effect.serviceOption(SqlClient.TransactionConnection),
          (transaction) => Option.isSome(transaction) ? statement : readCommitted(statement)
        )
      ).pipe(Effect.tap((committed) => committed ? changed(hash) : Effect.void))
    }

    const release = (lease: Storage.Lease) => {
      const hash = hashOf(lease.key)
      return call("release", lease.key, outside(dialect.release(hash, lease.token))).pipe(
        Effect.tap((released) => released ? changed(hash) : Effect.void)
      )
    }

    const read = (key: string) =>
      Effect.flatMap(
        call("read", key, outside(dialect.read(hashOf(key)))),
        (row): Effect.Effect<Option.Option<IdempotencyRecord>, IdempotencyStorageError> => {
          if (row === undefined) return Effect.succeed(Option.none())
          const record = toRecord(row)
          return record === undefined ? unexpected("read", key, row) : Effect.succeed(Option.some(record))
        }
      )

    const remove = (key: string, fence?: number | undefined) => {
      const hash = hashOf(key)
      return Effect.zipRight(call("delete", key, outside(dialect.delete(hash, fence))), changed(hash))
    }

    const watch = (key: string) => {
      const hex = hashOf(key).toString("hex")
      return Effect.flatMap(Clock.currentTimeMillis, (now) =>
        Effect.acquireRelease(
          Effect.sync(() => {
            // Idle entries go with each cleanup; many distinct keys waited on in between go sooner.
            if (watched.size >= 10_000) forgetIdle(now)
            let entry = watched.get(hex)
            if (entry === undefined) {
              entry = { waiters: new Set(), since: now, lastWatchedAt: now }
              watched.set(hex, entry)
            } else if (now - entry.lastWatchedAt > pollCapMillis + pollMillis) {
              entry.since = now
            }
            entry.lastWatchedAt = now
            const waiter = Deferred.unsafeMake<void>(FiberId.none)
            entry.waiters.add(waiter)
            // Half as long again each round, whatever the number of local waiters on the key.
            const delay = Math.min(pollCapMillis, Math.max(pollMillis, (now - entry.since) / 2))
            return { entry, waiter, delay }
          }),
          ({ entry, waiter }) => Effect.sync(() => entry.waiters.delete(waiter))
        )).pipe(
          Effect.map(({ delay, waiter }) =>
            // Listening, confirmed by the last heartbeat: woken by the notice. Otherwise, poll.
            notifies() ? Deferred.await(waiter) : Effect.raceFirst(Deferred.await(waiter), Effect.sleep(delay))
          )
        )
    }

    // The caller's own ends are carried through as `RolledBack`, so that what is left is the
    // transaction's: a failed BEGIN, or a COMMIT or ROLLBACK that the client turns into a defect.
    const transaction = <A, E, R>(
      self: Effect.Effect<A, E, R>
    ): Effect.Effect<A, E | IdempotencyStorageError, R> =>
      sql.withTransaction(Effect.catchAllCause(self, (cause) => Effect.fail(new RolledBack(cause)))).pipe(
        Effect.catchAllCause((cause): Effect.Effect<never, E | IdempotencyStorageError> => {
          const failed = Cause.failureOption(cause)
          if (Option.isSome(failed)) {
            return failed.value instanceof RolledBack
              ? Effect.failCause(failed.value.cause as Cause.Cause<E>)
              : Effect.fail(failure("transaction", "")(failed.value))
          }
          const defect = Cause.dieOption(cause)
          if (Option.isSome(defect) && isSqlError(defect.value)) {
            return Effect.fail(failure("transaction", "")(defect.value))
          }
          return Effect.failCause(cause as Cause.Cause<never>)
        })
      )

    return Storage.make({
      backend: dialect.name,
      capabilities: { renewal: true, fencing: true, ownedCommit: true, notification: listener !== undefined },
      acquire,
      renew: (lease, duration) =>
        call("renew", lease.key, outside(dialect.renew(hashOf(lease.key), lease.token, expiryMillis(duration)))),
      commit,
      release,
      read,
      delete: remove,
      watch,
      transaction
    })
  })

/**
 * The PostgreSQL listener of one layer: one `LISTEN` on the layer's channel, shared by all its
 * waiters, checked every `heartbeatInterval` by a notice it must hear back, and opened again after
 * it is lost. `ready` says whether it is listening now; the build waits until it is.
 */
const listen = (
  pg: Listener,
  channel: string,
  notify: (payload: string) => Effect.Effect<void, SqlError>,
  wake: (hex: string) => void,
  wakeAll: () => void,
  timeout: Duration.Duration
): Effect.Effect<{ readonly ready: boolean }, IdempotencyStorageSetupError, Scope.Scope> =>
  Effect.gen(function*() {
    const state = { ready: false }
    const firstReady = yield* Deferred.make<void, IdempotencyStorageSetupError>()
    const pings = new Map<string, Deferred.Deferred<void>>()

    const onMessage = (message: string) => {
      if (!message.startsWith(pingPrefix)) return wake(message)
      const ping = pings.get(message.slice(pingPrefix.length))
      if (ping !== undefined) Deferred.unsafeDone(ping, Exit.void)
    }

    // The clock starts once a notice is sent: a pool too busy to send one soon says nothing about
    // the listener. Notices sent before LISTEN took effect are lost, so one is sent again every
    // 100 millis until one comes back; a heartbeat is normally answered by its first.
    const confirm = (within: Duration.Duration) =>
      Effect.suspend(() => {
        const heard = Deferred.unsafeMake<void>(FiberId.none)
        const sent: Array<string> = []
        const send = Effect.suspend(() => {
          const id = Storage.makeToken()
          sent.push(id)
          pings.set(id, heard)
          return Effect.timeout(notify(`${pingPrefix}${id}`), timeout)
        })
        const answered = Effect.raceFirst(
          Deferred.await(heard).pipe(
            Effect.timeoutFail({
              duration: within,
              onTimeout: () => new Error(`no notice came back on ${channel} within ${Duration.format(within)}`)
            })
          ),
          Effect.forever(Effect.zipRight(Effect.sleep("100 millis"), send))
        )
        return Effect.zipRight(send, answered).pipe(
          Effect.ensuring(Effect.sync(() => sent.forEach((id) => pings.delete(id))))
        )
      })

    const heard = Effect.sync(() => {
      if (state.ready) return
      state.ready = true
      // Notices sent while no one listened are lost: everyone looks again.
      wakeAll()
      Deferred.unsafeDone(firstReady, Exit.void)
    })

    const session = Effect.scoped(Effect.gen(function*() {
      const messages = yield* Effect.forkScoped(
        Stream.runForEach(pg.listen(channel), (message) => Effect.sync(() => onMessage(message)))
      )
      // A new connection may take a while to LISTEN; once it does, a notice comes back at once.
      const first = Effect.zipRight(confirm(timeout), heard)
      const beat = Effect.zipRight(confirm(pingTimeout), heard)
      return yield* Effect.raceFirst(
        Effect.zipRight(first, Effect.forever(Effect.zipRight(Effect.sleep(heartbeatInterval), beat))),
        Effect.flatMap(Fiber.await(messages), () => Effect.fail(new Error(`the listener on ${channel} ended`)))
      )
    }))

    const lost = (cause: Cause.Cause<unknown>) =>
      Effect.suspend(() => {
        Deferred.unsafeDone(
          firstReady,
          Exit.fail(setupError(`LISTEN on ${channel} failed`, Cause.squash(cause)))
        )
        if (state.ready) {
          state.ready = false
          wakeAll()
        }
        return Effect.logWarning("idempotency listener lost; waiters poll until it is back", cause)
      })

    yield* session.pipe(
      Effect.catchAllCause(lost),
      Effect.zipRight(Effect.sleep(heartbeatInterval)),
      Effect.forever,
      Effect.forkScoped
    )
    // Waiters are woken at once when the layer is released, and look for themselves.
    yield* Effect.addFinalizer(() => Effect.sync(wakeAll))
    yield* Deferred.await(firstReady).pipe(
      Effect.timeoutFail({
        duration: timeout,
        onTimeout: () => setupError(`LISTEN on ${channel} was not confirmed within ${Duration.format(timeout)}`)
      })
    )
    return state
  })

/**
 * A SQL storage layer on the `SqlClient` in context. Layers on the same database and table share
 * their keys, as the instances of a service do. The client is the user's: the layer never closes
 * it.
 *
 * With `PgClient.layer`, waiters are woken by `LISTEN/NOTIFY`; with other clients they poll (see
 * the module's documentation). `Idempotent.wrap({ transactional: true })` commits the stored
 * result in the same transaction as the wrapped effect's writes through the same client.
 *
 * @example
 * ```ts
 * import { PgClient } from "@effect/sql-pg"
 * import { SqlClient } from "@effect/sql"
 * import { Effect, Layer, Redacted } from "effect"
 * import { Idempotent } from "effect-idempotency"
 * import * as SqlStorage from "effect-idempotency/Storage/Sql"
 *
 * const placeOrder = (requestId: string) =>
 *   Effect.gen(function*() {
 *     const sql = yield* SqlClient.SqlClient
 *     yield* sql`INSERT INTO orders (request_id) VALUES (${requestId})`
 *     return { ok: true }
 *   }).pipe(Idempotent.wrap({ key: requestId, transactional: true }))
 *
 * const PgLive = PgClient.layer({ url: Redacted.make("postgres://postgres@127.0.0.1:5432/app") })
 * const StorageLive = SqlStorage.layer({ table: "idempotency_records" }).pipe(Layer.provideMerge(PgLive))
 *
 * Effect.runPromise(placeOrder("req-1").pipe(Effect.provide(StorageLive)))
 * ```
 *
 * @since 0.1.0
 * @category Layers
 */
export const layer = (
  options?: SqlStorageOptions
): Layer.Layer<Storage.Storage, IdempotencyStorageSetupError, SqlClient.SqlClient> =>
  Layer.scoped(Storage.Storage, make(options))

/**
 * A SQL storage layer whose options are read from `Config`, for example
 * `SqlStorage.layerConfig({ table: Config.string("IDEMPOTENCY_TABLE"), createSchema: Config.boolean("IDEMPOTENCY_CREATE_SCHEMA") })`.
 * A value that cannot be read fails the build with its `ConfigError`.
 *
 * @example
 * ```ts
 * import { SqliteClient } from "@effect/sql-sqlite-node"
 * import { Config, Layer } from "effect"
 * import * as SqlStorage from "effect-idempotency/Storage/Sql"
 *
 * const StorageLive = SqlStorage.layerConfig({
 *   table: Config.string("IDEMPOTENCY_TABLE").pipe(Config.withDefault("idempotency_records")),
 *   createSchema: Config.boolean("IDEMPOTENCY_CREATE_SCHEMA").pipe(Config.withDefault(true)),
 *   cleanupInterval: Config.duration("IDEMPOTENCY_CLEANUP_INTERVAL").pipe(Config.withDefault("1 minute"))
 * }).pipe(Layer.provide(SqliteClient.layer({ filename: "app.db" })))
 * ```
 *
 * @since 0.1.0
 * @category Layers
 */
export const layerConfig = (
  config: Config.Config.Wrap<SqlStorageOptions>
): Layer.Layer<Storage.Storage, ConfigError | IdempotencyStorageSetupError, SqlClient.SqlClient> =>
  Layer.scoped(Storage.Storage, Effect.flatMap(Config.unwrap(config), make))

/**
 * The SQL dialects the storage speaks: PostgreSQL, MySQL / MariaDB, SQLite.
 *
 * @since 0.1.0
 * @category Schema
 */
export type SqlDialect = "pg" | "mysql" | "sqlite"

/**
 * The version of the schema this release of the library needs. The layer reads the version marked
 * on the objects (a comment on PostgreSQL's tables and functions and on MySQL's table; on SQLite
 * the table's columns and a comment kept in its `CREATE` statement) and compares it with this one;
 * a newer schema is accepted.
 *
 * @since 0.1.0
 * @category Schema
 */
export const schemaVersion: number = SqlSchema.version

/**
 * The storage's DDL for one dialect and table, exactly as the layer runs it.
 *
 * @since 0.1.0
 * @category Schema
 */
export interface SqlStorageSchema {
  readonly dialect: SqlDialect
  readonly table: string
  /** The schema version the statements make (see {@link schemaVersion}). */
  readonly version: number
  /**
   * The statements that create what is missing and bring objects of an older version up to
   * date, in order. Each can run again: on a schema that is current they change nothing.
   */
  readonly create: ReadonlyArray<string>
  /**
   * The statements that drop everything the storage made for the table, rows included: the
   * table with its index, and on PostgreSQL the leases table and both functions.
   */
  readonly drop: ReadonlyArray<string>
  /** `create` as one script for psql, mariadb or sqlite3: each statement ends with `;`. */
  readonly createScript: string
  /** `drop` as one script for psql, mariadb or sqlite3. */
  readonly dropScript: string
}

/**
 * The DDL of the storage for a dialect and a table (default `"idempotency_records"`), for a team
 * that keeps its schema in its own hands: the statements `SqlStorage.layer` runs when its objects
 * are missing or older, and those that remove them all. The command
 * `npx effect-idempotency sql-schema --dialect pg --table t` prints `createScript` (with `--drop`,
 * `dropScript`).
 *
 * Throws `IdempotencyStorageSetupError` for a table name the storage would refuse or an unknown
 * dialect.
 *
 * @example
 * ```ts
 * import * as SqlStorage from "effect-idempotency/Storage/Sql"
 *
 * const ddl = SqlStorage.schema({ dialect: "pg", table: "idempotency_records" })
 * console.log(ddl.createScript)
 * // ddl.create: the same statements, one string each, for a migration tool
 * ```
 *
 * @since 0.1.0
 * @category Schema
 */
export const schema = (options: {
  readonly dialect: SqlDialect
  readonly table?: string | undefined
}): SqlStorageSchema => {
  const table = options.table ?? SqlSchema.defaultTable
  const dialect = options.dialect
  if (!SqlSchema.dialects.includes(dialect)) {
    throw setupError(`the dialect ${JSON.stringify(dialect)} is not one of ${SqlSchema.dialects.join(", ")}`)
  }
  const invalid = SqlSchema.invalidTable(table)
  if (invalid !== undefined) throw setupError(invalid)
  const create = SqlSchema.createStatements(dialect, table)
  const drop = SqlSchema.dropStatements(dialect, table)
  return {
    dialect,
    table,
    version: SqlSchema.version,
    create,
    drop,
    createScript: SqlSchema.toScript(SqlSchema.createHeader(dialect, table), create),
    dropScript: SqlSchema.toScript(SqlSchema.dropHeader(dialect, table), drop)
  }
}

/**
 * The storage's schema as migrations for `@effect/sql`'s `Migrator`, keyed as
 * `Migrator.fromRecord` reads them (`"<id>_<name>"`): one per schema version, from id 1, each
 * running on the client's dialect the statements that bring the previous version to it. Run them
 * with a migrations table of their own (the Migrator's `table` option), so that their ids never
 * interleave with the application's, and then build the layer with `createSchema: false`.
 *
 * @example
 * ```ts
 * import { Migrator } from "@effect/sql"
 * import { PgClient, PgMigrator } from "@effect/sql-pg"
 * import { Effect, Layer, Redacted } from "effect"
 * import * as SqlStorage from "effect-idempotency/Storage/Sql"
 *
 * const PgLive = PgClient.layer({ url: Redacted.make("postgres://postgres@127.0.0.1:5432/app") })
 *
 * // Run at deploy time, by a role that may run DDL.
 * const migrate = PgMigrator.run({
 *   loader: Migrator.fromRecord(SqlStorage.migrations({ table: "idempotency_records" })),
 *   table: "idempotency_records_migrations"
 * })
 *
 * // The application's role needs no DDL privilege.
 * const StorageLive = SqlStorage.layer({ table: "idempotency_records", createSchema: false }).pipe(
 *   Layer.provide(PgLive)
 * )
 * ```
 *
 * @since 0.1.0
 * @category Schema
 */
export const migrations = (options?: {
  readonly table?: string | undefined
}): Record<string, Effect.Effect<void, SqlError | IdempotencyStorageSetupError, SqlClient.SqlClient>> => {
  const table = options?.table ?? SqlSchema.defaultTable
  const invalid = SqlSchema.invalidTable(table)
  const run = Effect.gen(function*() {
    if (invalid !== undefined) return yield* setupError(invalid)
    const sql = yield* SqlClient.SqlClient
    const dialect: SqlDialect | undefined = sql.onDialectOrElse({
      pg: () => "pg" as const,
      mysql: () => "mysql" as const,
      sqlite: () => "sqlite" as const,
      orElse: () => undefined
    })
    if (dialect === undefined) {
      return yield* setupError("the SQL client's dialect is not supported: use PostgreSQL, MySQL / MariaDB or SQLite")
    }
    for (const statement of SqlSchema.createStatements(dialect, table)) yield* sql.unsafe(statement)
  })
  return { [`${SqlSchema.version}_${table}_schema_v${SqlSchema.version}`]: run }
}
