//! A PostgreSQL database as a real two-phase commit participant:
//! the vote is `PREPARE TRANSACTION`, the finish `COMMIT PREPARED`, the
//! abort `ROLLBACK PREPARED`. With a [`super::DecisionLog`] on the
//! transaction, the commit decision is durable before any `COMMIT
//! PREPARED`, and [`recover_prepared`] resolves every in-doubt prepared
//! transaction after a crash: commit where the decision was logged, roll
//! back otherwise.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::store::postgres::Target;
use async_trait::async_trait;
use tokio_postgres::Client;

use super::{DataManager, TxError, TxInfo, DECISION_OP};
use crate::Store;

/// The prefix of the ids of sagatx's prepared transactions.
pub const GID_PREFIX: &str = "sagatx:";

const DISABLED: &str = "PostgreSQL has prepared transactions disabled \
    (max_prepared_transactions = 0): set max_prepared_transactions in postgresql.conf \
    to at least the number of transactions that may be in doubt at once (for example 64, \
    and at least max_connections for heavy use), then restart PostgreSQL";

fn classify(e: &tokio_postgres::Error, what: &str) -> TxError {
    if let Some(db) = e.as_db_error() {
        let code = db.code().code();
        if code == "55000" && db.message().contains("prepared transactions are disabled") {
            return TxError::permanent(DISABLED);
        }
        // Serialization failures and deadlocks are worth a retry.
        if code == "40001" || code == "40P01" {
            return TxError::transient(format!("{what}: {}", db.message()));
        }
        return TxError::permanent(format!("{what}: {} ({code})", db.message()));
    }
    if e.is_closed() {
        return TxError::unknown_outcome(format!("{what}: the connection closed"));
    }
    TxError::unknown_outcome(format!("{what}: {e}"))
}

/// Connects as the store does: the same URL settings, TLS included
/// (`sslmode=require|verify-ca|verify-full`, `sslrootcert=`).
async fn connect(target: &Target) -> Result<Client, TxError> {
    target
        .client()
        .await
        .map_err(|e| TxError::transient(format!("cannot connect to PostgreSQL: {e}")))
}

fn parse(url: &str) -> Result<Target, TxError> {
    crate::store::postgres::target(url).map_err(|e| match e {
        crate::StoreError::Open { path, reason } => {
            TxError::permanent(format!("cannot use {path}: {reason}"))
        }
        other => TxError::permanent(other.to_string()),
    })
}

/// A PostgreSQL transaction that joins a [`super::Transaction`].
pub struct PostgresDataManager {
    key: String,
    client: Client,
    prepared: Mutex<Option<String>>,
}

impl PostgresDataManager {
    /// Connects and opens a transaction (`BEGIN`). `key` orders the commit
    /// and names the prepared transaction: letters, digits, `_ . -`.
    pub async fn begin(key: &str, url: &str) -> Result<Arc<Self>, TxError> {
        if key.is_empty()
            || key.len() > 64
            || !key
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
        {
            return Err(TxError::permanent(format!(
                "data manager key {key:?} must be 1 to 64 letters, digits, _ . -"
            )));
        }
        let client = connect(&parse(url)?).await?;
        client
            .batch_execute("BEGIN")
            .await
            .map_err(|e| classify(&e, "BEGIN"))?;
        Ok(Arc::new(PostgresDataManager {
            key: key.to_string(),
            client,
            prepared: Mutex::new(None),
        }))
    }

    /// The connection, to do the transaction's work.
    pub fn client(&self) -> &Client {
        &self.client
    }

    fn gid(&self, tx: &TxInfo) -> String {
        format!("{GID_PREFIX}{}:{}", tx.gid(), self.key)
    }

    fn prepared(&self) -> Option<String> {
        self.prepared
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

#[async_trait]
impl DataManager for PostgresDataManager {
    fn sort_key(&self) -> String {
        self.key.clone()
    }
    async fn abort(&self, _: &TxInfo) -> Result<(), TxError> {
        self.client
            .batch_execute("ROLLBACK")
            .await
            .map_err(|e| classify(&e, "ROLLBACK"))
    }
    async fn tpc_begin(&self, _: &TxInfo) -> Result<(), TxError> {
        Ok(())
    }
    async fn commit(&self, _: &TxInfo) -> Result<(), TxError> {
        Ok(())
    }
    async fn tpc_vote(&self, tx: &TxInfo) -> Result<(), TxError> {
        let gid = self.gid(tx);
        // The gid holds only [0-9a-z:_.-] (checked in begin), so quoting is safe.
        self.client
            .batch_execute(&format!("PREPARE TRANSACTION '{gid}'"))
            .await
            .map_err(|e| classify(&e, "PREPARE TRANSACTION"))?;
        // PREPARE TRANSACTION outside a transaction, or in a failed one,
        // succeeds with a warning and prepares nothing: check it did.
        let found = self
            .client
            .query_opt("SELECT 1 FROM pg_prepared_xacts WHERE gid = $1", &[&gid])
            .await
            .map_err(|e| classify(&e, "checking the prepared transaction"))?;
        if found.is_none() {
            return Err(TxError::permanent(
                "PostgreSQL prepared nothing: its transaction was ended or failed before the vote",
            ));
        }
        *self.prepared.lock().unwrap_or_else(|p| p.into_inner()) = Some(gid);
        Ok(())
    }
    async fn tpc_finish(&self, _: &TxInfo) -> Result<(), TxError> {
        let Some(gid) = self.prepared() else {
            return Err(TxError::permanent(
                "tpc_finish without a prepared transaction",
            ));
        };
        match self
            .client
            .batch_execute(&format!("COMMIT PREPARED '{gid}'"))
            .await
        {
            Ok(()) => Ok(()),
            // An earlier COMMIT PREPARED went through but its answer was lost.
            Err(e) if e.as_db_error().is_some_and(|d| d.code().code() == "42704") => Ok(()),
            Err(e) => Err(classify(&e, "COMMIT PREPARED")),
        }
    }
    async fn tpc_abort(&self, _: &TxInfo) -> Result<(), TxError> {
        match self.prepared() {
            Some(gid) => self
                .client
                .batch_execute(&format!("ROLLBACK PREPARED '{gid}'"))
                .await
                .map_err(|e| classify(&e, "ROLLBACK PREPARED")),
            None => self
                .client
                .batch_execute("ROLLBACK")
                .await
                .map_err(|e| classify(&e, "ROLLBACK")),
        }
    }
}

/// What [`recover_prepared`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PreparedReport {
    /// Prepared transactions committed (their decision was logged).
    pub committed: Vec<String>,
    /// Prepared transactions rolled back (no decision: presumed abort).
    pub rolled_back: Vec<String>,
}

/// Resolves every in-doubt prepared transaction of sagatx in the given
/// PostgreSQL databases (one URL per database, as the data managers were
/// given) against the decisions in `store`, then forgets the decisions.
/// Run it at start-up, with every database the transactions of this store
/// use, before new transactions begin: a transaction prepared and not yet
/// decided by a live process would be rolled back.
pub async fn recover_prepared(
    urls: &[&str],
    store: &Arc<dyn Store>,
) -> Result<PreparedReport, TxError> {
    // The decisions: pending decision records, by transaction gid.
    let mut decided: HashMap<String, u64> = HashMap::new();
    let mut after = None;
    loop {
        let page = store
            .op_pending(after, 512)
            .await
            .map_err(|e| TxError::transient(format!("cannot read the decisions: {e}")))?;
        let Some(last) = page.last() else { break };
        after = Some(last.id);
        for op in page {
            if op.name == DECISION_OP {
                if let Some(tx) = op.args["tx"].as_str() {
                    decided.insert(tx.to_string(), op.id);
                }
            }
        }
    }
    let mut report = PreparedReport::default();
    for url in urls {
        let target = parse(url)?;
        let cfg = &target.cfg;
        let db = cfg
            .get_dbname()
            .map(str::to_string)
            .or_else(|| cfg.get_user().map(str::to_string))
            .unwrap_or_else(|| "postgres".into());
        // COMMIT PREPARED must run in the prepared transaction's database:
        // the URL names it.
        let client = connect(&target).await?;
        let rows = client
            .query(
                "SELECT gid FROM pg_prepared_xacts WHERE gid LIKE 'sagatx:%' AND database = $1 ORDER BY prepared",
                &[&db],
            )
            .await
            .map_err(|e| classify(&e, "reading pg_prepared_xacts"))?;
        for r in rows {
            let gid: String = r.get(0);
            let tx = gid
                .strip_prefix(GID_PREFIX)
                .and_then(|r| r.split(':').next())
                .unwrap_or("")
                .to_string();
            let commit = decided.contains_key(&tx);
            let sql = if commit {
                format!("COMMIT PREPARED '{gid}'")
            } else {
                format!("ROLLBACK PREPARED '{gid}'")
            };
            match client.batch_execute(&sql).await {
                Ok(()) => {}
                // Resolved meanwhile by someone else.
                Err(e) if e.as_db_error().is_some_and(|d| d.code().code() == "42704") => continue,
                Err(e) => {
                    return Err(classify(
                        &e,
                        if commit {
                            "COMMIT PREPARED"
                        } else {
                            "ROLLBACK PREPARED"
                        },
                    ))
                }
            }
            tracing::info!(%gid, commit, "recovery resolved a prepared transaction");
            if commit {
                report.committed.push(gid);
            } else {
                report.rolled_back.push(gid);
            }
        }
    }
    // Every database was visited: the decisions are done with.
    for (_, op) in decided {
        store
            .op_finish(op, None, super::now_ms())
            .await
            .map_err(|e| TxError::transient(e.to_string()))?;
    }
    Ok(report)
}
