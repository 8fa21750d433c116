//! A SQLite database as a data manager of a two-phase commit.
//!
//! SQLite cannot prepare a transaction, so its vote is the closest it
//! allows: the transaction is opened with `BEGIN IMMEDIATE`, which takes the
//! database's write lock at once, and the vote checks that the transaction
//! is still open and that its foreign keys hold. After a yes, `COMMIT` can
//! fail only for an I/O error (a full disk), which the transaction reports
//! as a failure after the vote. Give it the sort key that makes it finish
//! before managers that cannot undo.

use std::sync::{Arc, Mutex, MutexGuard};

use rusqlite::Connection;

use super::{SavepointRollback, SyncDataManager, TxError, TxInfo};

/// A rusqlite connection whose work joins a [`super::Transaction`].
pub struct SqliteDataManager {
    key: String,
    conn: Arc<Mutex<Connection>>,
    savepoints: Mutex<u64>,
}

fn err(e: rusqlite::Error) -> TxError {
    match e {
        rusqlite::Error::SqliteFailure(f, _)
            if matches!(
                f.code,
                rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked
            ) =>
        {
            TxError::transient(format!("the database is busy: {e}"))
        }
        other => TxError::permanent(other.to_string()),
    }
}

impl SqliteDataManager {
    /// Opens a transaction (`BEGIN IMMEDIATE`) on `conn`.
    pub fn begin(key: impl Into<String>, conn: Connection) -> Result<Arc<Self>, TxError> {
        conn.execute_batch("BEGIN IMMEDIATE").map_err(err)?;
        Ok(Arc::new(SqliteDataManager {
            key: key.into(),
            conn: Arc::new(Mutex::new(conn)),
            savepoints: Mutex::new(0),
        }))
    }

    fn lock(&self) -> MutexGuard<'_, Connection> {
        // A panic while using the connection leaves SQLite's own state
        // consistent (it rolls back statements), so the lock is usable.
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Does work in the transaction.
    pub fn with<T>(
        &self,
        f: impl FnOnce(&Connection) -> rusqlite::Result<T>,
    ) -> Result<T, TxError> {
        f(&self.lock()).map_err(err)
    }

    /// The connection back, once the transaction ended.
    pub fn into_connection(self: Arc<Self>) -> Option<Connection> {
        Arc::try_unwrap(self)
            .ok()
            .and_then(|s| Arc::try_unwrap(s.conn).ok())
            .map(|m| m.into_inner().unwrap_or_else(|p| p.into_inner()))
    }

    fn rollback(&self) -> Result<(), TxError> {
        let c = self.lock();
        if !c.is_autocommit() {
            c.execute_batch("ROLLBACK").map_err(err)?;
        }
        Ok(())
    }
}

struct Rollback {
    conn: Arc<Mutex<Connection>>,
    name: String,
}

impl SavepointRollback for Rollback {
    fn rollback(&mut self) -> Result<(), TxError> {
        let c = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        c.execute_batch(&format!("ROLLBACK TO {}", self.name))
            .map_err(err)
    }
}

/// Every operation is a synchronous call on the connection: join it with
/// [`super::Transaction::join_sync`] (or `join`, which boxes a future a call).
impl SyncDataManager for SqliteDataManager {
    fn sort_key(&self) -> String {
        self.key.clone()
    }
    fn abort(&self, _: &TxInfo) -> Result<(), TxError> {
        self.rollback()
    }
    fn tpc_begin(&self, _: &TxInfo) -> Result<(), TxError> {
        Ok(())
    }
    fn commit(&self, _: &TxInfo) -> Result<(), TxError> {
        Ok(())
    }
    fn tpc_vote(&self, _: &TxInfo) -> Result<(), TxError> {
        let c = self.lock();
        if c.is_autocommit() {
            return Err(TxError::permanent(
                "the SQLite transaction was ended outside the two-phase commit",
            ));
        }
        let bad: i64 = c
            .query_row("SELECT count(*) FROM pragma_foreign_key_check", [], |r| {
                r.get(0)
            })
            .map_err(err)?;
        if bad > 0 {
            return Err(TxError::permanent(format!("{bad} foreign key violations")));
        }
        Ok(())
    }
    fn tpc_finish(&self, _: &TxInfo) -> Result<(), TxError> {
        let c = self.lock();
        if c.is_autocommit() {
            return Ok(()); // committed by an earlier try
        }
        c.execute_batch("COMMIT").map_err(err)
    }
    fn tpc_abort(&self, _: &TxInfo) -> Result<(), TxError> {
        self.rollback()
    }
    fn savepoint(&self) -> Result<Box<dyn SavepointRollback>, TxError> {
        let n = {
            let mut s = self.savepoints.lock().unwrap_or_else(|p| p.into_inner());
            *s += 1;
            *s
        };
        let name = format!("sagatx_sp_{n}");
        self.lock()
            .execute_batch(&format!("SAVEPOINT {name}"))
            .map_err(err)?;
        Ok(Box::new(Rollback {
            conn: self.conn.clone(),
            name,
        }))
    }
}
