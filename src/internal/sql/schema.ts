/**
 * The SQL storage's schema per dialect, as plain statements: what `SqlStorage.layer` runs when its
 * objects are missing or older, what `SqlStorage.schema` returns, what the migrations run and what
 * `effect-idempotency sql-schema` prints. It imports nothing, so the command runs without
 * `@effect/sql` or a driver installed.
 */

/** @internal */
export type Dialect = "pg" | "mysql" | "sqlite"

/** @internal */
export const dialects: ReadonlyArray<Dialect> = ["pg", "mysql", "sqlite"]

/** @internal */
export const dialectNames: Record<Dialect, string> = {
  pg: "PostgreSQL",
  mysql: "MySQL / MariaDB",
  sqlite: "SQLite"
}

/** @internal */
export const defaultTable = "idempotency_records"

/**
 * The schema version this library needs. Any change to the statements below (a column, an index,
 * a function's body) is a new version: the layer compares the version marked on the objects with
 * this one, and only runs the statements when the objects are missing or older.
 *
 * @internal
 */
export const version = 1

const markerPrefix = "effect-idempotency schema version "

/**
 * Marks the objects with the version they are of: the comment of each table and function on
 * PostgreSQL, the table's comment on MySQL, an SQL comment kept in the table's `CREATE` text on
 * SQLite (which keeps the statement as written in `sqlite_master`).
 *
 * @internal
 */
export const marker = `${markerPrefix}${version}`

/** The version a comment marks, if it holds a marker. @internal */
export const markedVersion = (comment: string | null | undefined): number | undefined => {
  const match = comment?.match(/effect-idempotency schema version (\d+)/)
  return match === null || match === undefined ? undefined : Number(match[1])
}

const tablePattern = /^[A-Za-z_][A-Za-z0-9_]{0,47}$/

/**
 * Why a table name cannot be used, or `undefined` if it can. At most 48 characters, so that the
 * index and channel names derived from it fit PostgreSQL's 63; letters, digits and underscores, so
 * that quoting it needs no escapes.
 *
 * @internal
 */
export const invalidTable = (table: string): string | undefined =>
  tablePattern.test(table) ?
    undefined :
    `the table name ${
      JSON.stringify(table)
    } is not an identifier of letters, digits and underscores (at most 48, not starting with a digit)`

/** Where waiters on PostgreSQL hear about changed keys: `<table>_changed`. @internal */
export const channelOf = (table: string): string => `${table}_changed`

/** PostgreSQL: the table that holds lease renewals, `<table>_leases`. @internal */
export const leasesOf = (table: string): string => `${table}_leases`

/** The index on the expiry, which the cleanup reads. @internal */
export const expiryIndexOf = (table: string): string => `${table}_expires_at_idx`

/**
 * The PostgreSQL functions that hold acquire and commit, with their signatures as the catalogs
 * spell them. A new signature gets a new name (`_v2`), since `CREATE OR REPLACE FUNCTION` cannot
 * change one; a new body under the same signature replaces the old one, so that instances of an
 * older version of this library call the new one.
 *
 * @internal
 */
export const postgresFunctions = (table: string) => ({
  acquire: `${table}_acquire_v1`,
  commit: `${table}_commit_v1`,
  acquireSignature: `"${table}_acquire_v1"(bytea, text, text, text, double precision)`,
  commitSignature: `"${table}_commit_v1"(bytea, text, text, bytea, double precision)`
})

/** The columns every version of the table has, in order. @internal */
export const columns: ReadonlyArray<string> = [
  "key_hash",
  "idempotency_key",
  "state",
  "token",
  "fingerprint",
  "fence",
  "outcome",
  "payload",
  "created_at",
  "expires_at"
]

/**
 * PostgreSQL: the live row's columns as the storage reads them, times in epoch millis (`now` is
 * the database's clock when the statement ran). The lease's end is the later of the row's and of
 * its holder's last renewal.
 *
 * @internal
 */
export const postgresColumns = (leases: string, alias: string): string =>
  `${alias}.token, ${alias}.state, ${alias}.idempotency_key, ${alias}.fingerprint, ${alias}.fence,
    ${alias}.outcome, ${alias}.payload,
    floor(extract(epoch FROM ${alias}.created_at) * 1000)::float8 AS created_at,
    floor(extract(epoch FROM ${postgresExpiry(leases, alias)}) * 1000)::float8 AS expires_at,
    floor(extract(epoch FROM clock_timestamp()) * 1000)::float8 AS now`

/**
 * PostgreSQL: when a row ends. A record at its `expires_at`, a lease at the later of the row's
 * `expires_at` and its holder's last renewal (kept in the leases table, never in the row).
 *
 * @internal
 */
export const postgresExpiry = (leases: string, alias: string): string =>
  `CASE WHEN ${alias}.state = 'in_flight' THEN greatest(${alias}.expires_at, (
    SELECT l.expires_at FROM "${leases}" AS l WHERE l.key_hash = ${alias}.key_hash AND l.token = ${alias}.token
  )) ELSE ${alias}.expires_at END`

/**
 * Acquire and commit are long statements that PostgreSQL would parse and plan on every call (the
 * client sends unnamed statements): about ten times the cost of a `SELECT 1`, more than the work
 * itself. As PL/pgSQL functions their plans are kept per connection, and each protocol step is
 * still one call.
 */
const postgresFunctionsDdl = (table: string): ReadonlyArray<string> => {
  const t = `"${table}"`
  const leases = leasesOf(table)
  const names = postgresFunctions(table)
  const columns = postgresColumns(leases, "r")
  const expiry = postgresExpiry(leases, "r")
  return [
    // A key that is live (a lease or a record that has not ended) is answered from a plain read:
    // a replay writes nothing and takes no lock. Otherwise the row, if there is one, is locked
    // first, which waits out a renewal or a commit of it in progress; the statements after the
    // lock see them (READ COMMITTED: a snapshot per statement) and take the key only if it is
    // still free. A new key is inserted; a concurrent caller that inserted it first is read once
    // it committed.
    `CREATE OR REPLACE FUNCTION "${names.acquire}"(
  p_hash bytea, p_key text, p_token text, p_fingerprint text, p_lease_millis float8
) RETURNS TABLE (
  token text, state text, idempotency_key text, fingerprint text, fence bigint, outcome text,
  payload bytea, created_at float8, expires_at float8, now float8
) LANGUAGE plpgsql VOLATILE AS $body$
#variable_conflict use_column
DECLARE
  at timestamptz;
BEGIN
  RETURN QUERY SELECT ${columns} FROM ${t} AS r
    WHERE r.key_hash = p_hash AND ${expiry} > clock_timestamp();
  IF FOUND THEN RETURN; END IF;
  PERFORM 1 FROM ${t} AS r WHERE r.key_hash = p_hash FOR UPDATE;
  IF FOUND THEN
    at := clock_timestamp();
    RETURN QUERY WITH taken AS (
      UPDATE ${t} AS r SET idempotency_key = p_key, state = 'in_flight', token = p_token,
        fingerprint = p_fingerprint, fence = r.fence + 1, outcome = NULL, payload = NULL, created_at = at,
        expires_at = at + p_lease_millis * interval '1 millisecond'
      WHERE r.key_hash = p_hash AND ${expiry} <= at
      RETURNING r.*
    )
    SELECT ${postgresColumns(leases, "taken")} FROM taken;
    IF FOUND THEN RETURN; END IF;
  ELSE
    at := clock_timestamp();
    RETURN QUERY WITH taken AS (
      INSERT INTO ${t} AS r
        (key_hash, idempotency_key, state, token, fingerprint, fence, outcome, payload, created_at, expires_at)
      VALUES (p_hash, p_key, 'in_flight', p_token, p_fingerprint,
        floor(extract(epoch FROM at) * 1000000)::bigint, NULL, NULL,
        at, at + p_lease_millis * interval '1 millisecond')
      ON CONFLICT (key_hash) DO NOTHING
      RETURNING r.*
    )
    SELECT ${postgresColumns(leases, "taken")} FROM taken;
    IF FOUND THEN RETURN; END IF;
  END IF;
  -- Renewed, committed or inserted by someone else meanwhile: the row as it is now.
  RETURN QUERY SELECT ${columns} FROM ${t} AS r WHERE r.key_hash = p_hash;
END
$body$`,
    // Ownership by token, checked by the update itself on the row's latest version under its row
    // lock, not by the expiry: inside the caller's transaction that is all it can see (its
    // snapshot may predate the renewals), and a lease that ran out but that no one took is still
    // the caller's (taking it would change the token). The token stays on the completed row, so a
    // commit retried after its reply was lost finds it and answers true again.
    `CREATE OR REPLACE FUNCTION "${names.commit}"(
  p_hash bytea, p_token text, p_outcome text, p_payload bytea, p_ttl_millis float8
) RETURNS boolean LANGUAGE plpgsql VOLATILE AS $body$
DECLARE
  at timestamptz := clock_timestamp();
  committed boolean;
BEGIN
  UPDATE ${t} SET state = 'completed', outcome = p_outcome, payload = p_payload, created_at = at,
    expires_at = at + p_ttl_millis * interval '1 millisecond'
  WHERE key_hash = p_hash AND token = p_token AND state = 'in_flight';
  IF FOUND THEN
    PERFORM pg_notify('${channelOf(table)}', encode(p_hash, 'hex'));
    RETURN true;
  END IF;
  -- A retry of a commit that landed: answered as done, and the stored record left as it is.
  SELECT EXISTS (
    SELECT 1 FROM ${t} WHERE key_hash = p_hash AND token = p_token AND state = 'completed' AND expires_at > at
  ) INTO committed;
  RETURN committed;
END
$body$`
  ]
}

const postgresCreate = (table: string): ReadonlyArray<string> => {
  const t = `"${table}"`
  const leases = `"${leasesOf(table)}"`
  const functions = postgresFunctions(table)
  return [
    `CREATE TABLE IF NOT EXISTS ${t} (
  key_hash bytea PRIMARY KEY,
  idempotency_key text NOT NULL,
  state text NOT NULL,
  token text,
  fingerprint text NOT NULL,
  fence bigint NOT NULL,
  outcome text,
  payload bytea,
  created_at timestamptz NOT NULL,
  expires_at timestamptz NOT NULL
) WITH (fillfactor = 90)`,
    `CREATE INDEX IF NOT EXISTS "${expiryIndexOf(table)}" ON ${t} (expires_at)`,
    `CREATE TABLE IF NOT EXISTS ${leases} (
  key_hash bytea PRIMARY KEY,
  token text NOT NULL,
  expires_at timestamptz NOT NULL
)`,
    ...postgresFunctionsDdl(table),
    `COMMENT ON TABLE ${t} IS '${marker}: idempotency records'`,
    `COMMENT ON TABLE ${leases} IS '${marker}: lease renewals of ${table}'`,
    `COMMENT ON FUNCTION ${functions.acquireSignature} IS '${marker}: acquire on ${table}'`,
    `COMMENT ON FUNCTION ${functions.commitSignature} IS '${marker}: commit on ${table}'`
  ]
}

// The key's hash is the primary key, so MySQL's case-insensitive and pad-space collations and
// index length limits never apply to keys. The ALTER marks a table made by an older version: the
// CREATE leaves an existing table as it is.
const mysqlCreate = (table: string): ReadonlyArray<string> => [
  `CREATE TABLE IF NOT EXISTS \`${table}\` (
  key_hash BINARY(32) NOT NULL PRIMARY KEY,
  idempotency_key TEXT CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
  state VARCHAR(16) NOT NULL,
  token VARCHAR(64) NULL,
  fingerprint VARCHAR(255) NOT NULL,
  fence BIGINT NOT NULL,
  outcome VARCHAR(16) NULL,
  payload LONGBLOB NULL,
  created_at BIGINT NOT NULL,
  expires_at BIGINT NOT NULL,
  INDEX \`${expiryIndexOf(table)}\` (expires_at)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin COMMENT = '${marker}: idempotency records'`,
  `ALTER TABLE \`${table}\` COMMENT = '${marker}: idempotency records'`
]

// SQLite keeps a table's CREATE statement as written, comments included: the marker lives there.
const sqliteCreate = (table: string): ReadonlyArray<string> => [
  `CREATE TABLE IF NOT EXISTS "${table}" (
  -- ${marker}: idempotency records
  key_hash BLOB NOT NULL PRIMARY KEY,
  idempotency_key TEXT NOT NULL,
  state TEXT NOT NULL,
  token TEXT,
  fingerprint TEXT NOT NULL,
  fence INTEGER NOT NULL,
  outcome TEXT,
  payload BLOB,
  created_at INTEGER NOT NULL,
  expires_at INTEGER NOT NULL
)`,
  `CREATE INDEX IF NOT EXISTS "${expiryIndexOf(table)}" ON "${table}" (expires_at)`
]

/**
 * The statements that create the storage's objects for `table`, or bring older ones to
 * `version`: each one idempotent, run in order.
 *
 * @internal
 */
export const createStatements = (dialect: Dialect, table: string): ReadonlyArray<string> => {
  switch (dialect) {
    case "pg":
      return postgresCreate(table)
    case "mysql":
      return mysqlCreate(table)
    case "sqlite":
      return sqliteCreate(table)
  }
}

/**
 * The statements that drop everything the storage created for `table`, rows included: on
 * PostgreSQL its two functions and the leases table too. Indexes go with their table.
 *
 * @internal
 */
export const dropStatements = (dialect: Dialect, table: string): ReadonlyArray<string> => {
  switch (dialect) {
    case "pg": {
      const functions = postgresFunctions(table)
      return [
        `DROP FUNCTION IF EXISTS ${functions.acquireSignature}`,
        `DROP FUNCTION IF EXISTS ${functions.commitSignature}`,
        `DROP TABLE IF EXISTS "${leasesOf(table)}"`,
        `DROP TABLE IF EXISTS "${table}"`
      ]
    }
    case "mysql":
      return [`DROP TABLE IF EXISTS \`${table}\``]
    case "sqlite":
      return [`DROP TABLE IF EXISTS "${table}"`]
  }
}

/**
 * Statements as one script for psql, mariadb or sqlite3: a comment saying what it is, then each
 * statement terminated by `;` on a line of its own.
 *
 * @internal
 */
export const toScript = (header: string, statements: ReadonlyArray<string>): string =>
  `-- ${header}\n\n${statements.map((statement) => `${statement};\n`).join("\n")}`

/** @internal */
export const createHeader = (dialect: Dialect, table: string): string =>
  `effect-idempotency SQL storage, schema version ${version}, ${dialectNames[dialect]}, table ${table}: ` +
  `creates what is missing and brings older versions up to date (every statement can run again).`

/** @internal */
export const dropHeader = (dialect: Dialect, table: string): string =>
  `effect-idempotency SQL storage, ${dialectNames[dialect]}, table ${table}: ` +
  `drops everything the storage created, with its rows.`
