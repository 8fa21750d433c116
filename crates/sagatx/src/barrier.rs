//! A barrier for participants (DTM's subtransaction barrier, Seata's
//! fence): a step service written in Rust calls it inside its own database
//! transaction with the `Idempotency-Key` sagatx sends
//! (`{execution}:{step}:{phase}`). Inside the same transaction as the
//! business change, it records the call, so that
//!
//! - a repeated action, compensation or confirm is a no-op (`Duplicate`);
//! - a compensation that arrives before its action is a no-op
//!   (`NullCompensation`), and marks the action as done;
//! - an action that arrives after its compensation is a no-op (`Hanging`).
//!
//! A crash before the transaction commits rolls back the record with the
//! change: the retried call runs again.
//!
//! ```
//! use sagatx::barrier::{self, Outcome};
//!
//! let mut db = rusqlite::Connection::open_in_memory().unwrap();
//! barrier::sqlite_schema(&db).unwrap();
//! db.execute_batch("CREATE TABLE stock (n INTEGER); INSERT INTO stock VALUES (10)").unwrap();
//! let key = "0193c7e2-0000-7000-8000-000000000001:reserve:action";
//! for _ in 0..2 {
//!     let tx = db.transaction().unwrap();
//!     let out = barrier::sqlite(&tx, key, |tx| tx.execute("UPDATE stock SET n = n - 1", [])).unwrap();
//!     tx.commit().unwrap();
//!     let _ = out; // Ran(1) the first time, Duplicate the second
//! }
//! let n: i64 = db.query_row("SELECT n FROM stock", [], |r| r.get(0)).unwrap();
//! assert_eq!(n, 9);
//! ```

use rusqlite::{params, Transaction};

/// What the barrier did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome<T> {
    /// The call was new: the work ran.
    Ran(T),
    /// The same call came before: skipped.
    Duplicate,
    /// A compensation whose action never ran: skipped.
    NullCompensation,
    /// An action that arrived after its compensation: skipped.
    Hanging,
}

impl<T> Outcome<T> {
    pub fn ran(&self) -> bool {
        matches!(self, Outcome::Ran(_))
    }
}

/// Why the barrier could not decide.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BarrierError {
    #[error("{0:?} is not a sagatx idempotency key ({{execution}}:{{step}}:{{phase}})")]
    BadKey(String),
    #[error(transparent)]
    Db(#[from] rusqlite::Error),
    #[cfg(feature = "postgres")]
    #[error(transparent)]
    Postgres(#[from] tokio_postgres::Error),
}

/// The barrier's table; create it once in the participant's database.
pub fn sqlite_schema(conn: &rusqlite::Connection) -> rusqlite::Result<()> {
    conn.execute_batch(
        "CREATE TABLE IF NOT EXISTS sagatx_barrier (
            branch TEXT NOT NULL,   -- {execution}:{step}
            op     TEXT NOT NULL,   -- action, compensation, confirm
            reason TEXT NOT NULL,   -- the phase whose call inserted the row
            PRIMARY KEY (branch, op)
        ) WITHOUT ROWID",
    )
}

/// Splits `{execution}:{step}:{phase}`.
pub fn parse_key(key: &str) -> Result<(&str, &str), BarrierError> {
    let bad = || BarrierError::BadKey(key.to_string());
    let (branch, phase) = key.rsplit_once(':').ok_or_else(bad)?;
    if !branch.contains(':') || !matches!(phase, "action" | "compensation" | "confirm") {
        return Err(bad());
    }
    Ok((branch, phase))
}

fn insert(tx: &Transaction<'_>, branch: &str, op: &str, reason: &str) -> rusqlite::Result<usize> {
    tx.execute(
        "INSERT INTO sagatx_barrier (branch, op, reason) VALUES (?1, ?2, ?3) ON CONFLICT DO NOTHING",
        params![branch, op, reason],
    )
}

/// Runs `work` in `tx` unless the barrier says the call must be skipped.
/// Commit `tx` afterwards either way (the barrier's record is part of it).
pub fn sqlite<T>(
    tx: &Transaction<'_>,
    idempotency_key: &str,
    work: impl FnOnce(&Transaction<'_>) -> rusqlite::Result<T>,
) -> Result<Outcome<T>, BarrierError> {
    let (branch, phase) = parse_key(idempotency_key)?;
    match phase {
        "compensation" => {
            // Mark the action as taken care of first: if it never ran, it
            // never will (no hanging), and there is nothing to undo.
            let origin = insert(tx, branch, "action", "compensation")?;
            let current = insert(tx, branch, "compensation", "compensation")?;
            if current == 0 {
                return Ok(Outcome::Duplicate);
            }
            if origin > 0 {
                return Ok(Outcome::NullCompensation);
            }
        }
        op => {
            if insert(tx, branch, op, op)? == 0 {
                let reason: String = tx.query_row(
                    "SELECT reason FROM sagatx_barrier WHERE branch = ?1 AND op = ?2",
                    params![branch, op],
                    |r| r.get(0),
                )?;
                return Ok(if reason == "compensation" {
                    Outcome::Hanging
                } else {
                    Outcome::Duplicate
                });
            }
        }
    }
    Ok(Outcome::Ran(work(tx)?))
}

/// The barrier's table in a PostgreSQL database; create it once.
#[cfg(feature = "postgres")]
pub async fn postgres_schema(client: &tokio_postgres::Client) -> Result<(), tokio_postgres::Error> {
    client
        .batch_execute(
            "CREATE TABLE IF NOT EXISTS sagatx_barrier (
                branch TEXT NOT NULL,
                op     TEXT NOT NULL,
                reason TEXT NOT NULL,
                PRIMARY KEY (branch, op)
            )",
        )
        .await
}

/// The barrier in a PostgreSQL transaction. `Ran(())` means the call is new:
/// do its work in `tx` now, then commit `tx`; any other outcome means skip
/// the work (and still commit, or roll back: the record only matters with
/// the work).
#[cfg(feature = "postgres")]
pub async fn postgres(
    tx: &tokio_postgres::Transaction<'_>,
    idempotency_key: &str,
) -> Result<Outcome<()>, BarrierError> {
    let (branch, phase) = parse_key(idempotency_key)?;
    let insert = "INSERT INTO sagatx_barrier (branch, op, reason) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING";
    match phase {
        "compensation" => {
            let origin = tx
                .execute(insert, &[&branch, &"action", &"compensation"])
                .await?;
            let current = tx
                .execute(insert, &[&branch, &"compensation", &"compensation"])
                .await?;
            if current == 0 {
                return Ok(Outcome::Duplicate);
            }
            if origin > 0 {
                return Ok(Outcome::NullCompensation);
            }
        }
        op => {
            if tx.execute(insert, &[&branch, &op, &op]).await? == 0 {
                let reason: String = tx
                    .query_one(
                        "SELECT reason FROM sagatx_barrier WHERE branch = $1 AND op = $2",
                        &[&branch, &op],
                    )
                    .await?
                    .get(0);
                return Ok(if reason == "compensation" {
                    Outcome::Hanging
                } else {
                    Outcome::Duplicate
                });
            }
        }
    }
    Ok(Outcome::Ran(()))
}
