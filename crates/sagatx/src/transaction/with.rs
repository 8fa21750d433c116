//! `with_transaction` (pymongo's `ClientSession.with_transaction`).

use std::future::Future;
use std::time::Duration;

use sagatx_core::ErrorClass;
use tokio::time::Instant;

use super::{LoopError, Transaction, TransactionManager, TxStatus};

/// The overall deadline of [`with_transaction`] by default: 120 s.
pub const DEFAULT_DEADLINE: Duration = Duration::from_secs(120);

/// Settings of [`with_transaction`].
#[derive(Clone)]
pub struct WithTransaction {
    pub manager: TransactionManager,
    /// No new attempt starts after this much time (default 120 s).
    pub deadline: Duration,
}

impl WithTransaction {
    pub fn new(manager: TransactionManager) -> Self {
        WithTransaction {
            manager,
            deadline: DEFAULT_DEADLINE,
        }
    }
}

/// Runs `callback` in a transaction and commits it:
/// - an error of class `Transient` (from the callback or the commit's
///   votes) retries the whole callback in a new transaction;
/// - a commit whose result is unknown (a failure after the vote) retries
///   only the commit, finishing the managers that did not;
/// - after the deadline no new attempt starts and the last error is
///   returned;
/// - a transaction is committed at most once; if the callback committed or
///   aborted it itself, nothing more is done.
pub async fn with_transaction<T, F, Fut>(
    opts: &WithTransaction,
    mut callback: F,
) -> Result<T, LoopError>
where
    F: FnMut(Transaction) -> Fut,
    Fut: Future<Output = Result<T, super::TxError>>,
{
    let start = Instant::now();
    let in_time = || start.elapsed() < opts.deadline;
    'attempt: loop {
        let tx = opts.manager.begin();
        let value = match callback(tx.clone()).await {
            Ok(v) => v,
            Err(e) => {
                if tx.is_active() {
                    let _ = tx.abort_inner().await;
                }
                if e.class == ErrorClass::Transient && in_time() {
                    continue 'attempt;
                }
                return Err(LoopError::Handler(e));
            }
        };
        match tx.status() {
            TxStatus::Active => {}
            // The callback ended the transaction itself.
            _ => return Ok(value),
        }
        loop {
            match tx.commit_inner().await {
                Ok(()) => return Ok(value),
                Err(e) => {
                    let class = e.class();
                    let e = LoopError::Transaction(e);
                    if class == ErrorClass::UnknownOutcome && in_time() {
                        // Retry only the commit.
                        continue;
                    }
                    if class == ErrorClass::Transient && in_time() {
                        continue 'attempt;
                    }
                    return Err(e);
                }
            }
        }
    }
}
