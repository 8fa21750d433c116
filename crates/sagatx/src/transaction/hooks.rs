//! Calls that run when a transaction commits (nti's `do` and
//! `do_near_end`), and the transactional queue put (`put_nowait`).

use std::sync::{Arc, Mutex};

use super::{SyncDataManager, Transaction, TxError, TxInfo};

type Call = Box<dyn FnOnce() -> Result<(), TxError> + Send>;
type Vote = Box<dyn Fn() -> Result<(), TxError> + Send + Sync>;

/// A data manager that makes one call when its transaction commits, and may
/// vote on the commit first. The call runs in `tpc_finish`, after every
/// manager voted yes; if it fails, the failure is logged and the commit
/// stands: a failing call never breaks the consistency of the others.
pub struct CallbackManager {
    key: String,
    name: String,
    call: Mutex<Option<Call>>,
    vote: Option<Vote>,
}

impl CallbackManager {
    pub fn new(
        key: impl Into<String>,
        name: impl Into<String>,
        call: impl FnOnce() -> Result<(), TxError> + Send + 'static,
        vote: Option<Vote>,
    ) -> Self {
        CallbackManager {
            key: key.into(),
            name: name.into(),
            call: Mutex::new(Some(Box::new(call))),
            vote,
        }
    }
}

impl SyncDataManager for CallbackManager {
    fn sort_key(&self) -> String {
        self.key.clone()
    }
    fn name(&self) -> String {
        self.name.clone()
    }
    fn abort(&self, _: &TxInfo) -> Result<(), TxError> {
        self.call.lock().unwrap_or_else(|p| p.into_inner()).take();
        Ok(())
    }
    fn tpc_begin(&self, _: &TxInfo) -> Result<(), TxError> {
        Ok(())
    }
    fn commit(&self, _: &TxInfo) -> Result<(), TxError> {
        Ok(())
    }
    fn tpc_vote(&self, _: &TxInfo) -> Result<(), TxError> {
        match &self.vote {
            Some(v) => v(),
            None => Ok(()),
        }
    }
    fn tpc_finish(&self, tx: &TxInfo) -> Result<(), TxError> {
        let call = self.call.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(call) = call {
            if let Err(e) = call() {
                tracing::error!(transaction = tx.id, manager = %self.name, error = %e,
                    "an after-commit call failed; the transaction stays committed");
            }
        }
        Ok(())
    }
    fn tpc_abort(&self, _: &TxInfo) -> Result<(), TxError> {
        self.call.lock().unwrap_or_else(|p| p.into_inner()).take();
        Ok(())
    }
}

/// Sort key of after-commit calls: after the usual data managers.
pub const AFTER_COMMIT_KEY: &str = "~after-commit";
/// Sort key of near-end calls: after everything else.
pub const NEAR_END_KEY: &str = "~~~~near-end";

fn join_call(tx: &Transaction, key: &str, name: &str, call: Call, vote: Option<Vote>) {
    let dm = Arc::new(CallbackManager {
        key: key.into(),
        name: name.into(),
        call: Mutex::new(Some(call)),
        vote,
    });
    if let Err(e) = tx.join_sync(dm) {
        tracing::warn!(error = %e, "an after-commit call was not registered");
    }
}

/// Runs `call` when `tx` commits (nti's `do`); never if it aborts.
pub fn after_commit(tx: &Transaction, call: impl FnOnce() -> Result<(), TxError> + Send + 'static) {
    join_call(
        tx,
        AFTER_COMMIT_KEY,
        "after-commit call",
        Box::new(call),
        None,
    );
}

/// Like [`after_commit`], with a vote: `vote` runs in the voting phase, and
/// an error from it aborts the whole transaction.
pub fn after_commit_voting(
    tx: &Transaction,
    call: impl FnOnce() -> Result<(), TxError> + Send + 'static,
    vote: impl Fn() -> Result<(), TxError> + Send + Sync + 'static,
) {
    join_call(
        tx,
        AFTER_COMMIT_KEY,
        "after-commit call",
        Box::new(call),
        Some(Box::new(vote)),
    );
}

/// Runs `call` when `tx` commits, after every other manager (nti's
/// `do_near_end`).
pub fn near_end(tx: &Transaction, call: impl FnOnce() -> Result<(), TxError> + Send + 'static) {
    join_call(tx, NEAR_END_KEY, "near-end call", Box::new(call), None);
}

struct QueuePut<T: Send + 'static> {
    queue: tokio::sync::mpsc::Sender<T>,
    item: Mutex<Option<T>>,
    permit: Mutex<Option<tokio::sync::mpsc::OwnedPermit<T>>>,
}

impl<T: Send + 'static> SyncDataManager for QueuePut<T> {
    fn sort_key(&self) -> String {
        AFTER_COMMIT_KEY.into()
    }
    fn name(&self) -> String {
        "queue put".into()
    }
    fn abort(&self, _: &TxInfo) -> Result<(), TxError> {
        self.item.lock().unwrap_or_else(|p| p.into_inner()).take();
        Ok(())
    }
    fn tpc_begin(&self, _: &TxInfo) -> Result<(), TxError> {
        Ok(())
    }
    fn commit(&self, _: &TxInfo) -> Result<(), TxError> {
        Ok(())
    }
    fn tpc_vote(&self, _: &TxInfo) -> Result<(), TxError> {
        // Reserve the slot now, so that the put after commit cannot fail.
        match self.queue.clone().try_reserve_owned() {
            Ok(p) => {
                *self.permit.lock().unwrap_or_else(|p| p.into_inner()) = Some(p);
                Ok(())
            }
            Err(tokio::sync::mpsc::error::TrySendError::Full(_)) => {
                Err(TxError::transient("the queue is full"))
            }
            Err(tokio::sync::mpsc::error::TrySendError::Closed(_)) => {
                Err(TxError::permanent("the queue is closed"))
            }
        }
    }
    fn tpc_finish(&self, _: &TxInfo) -> Result<(), TxError> {
        let permit = self.permit.lock().unwrap_or_else(|p| p.into_inner()).take();
        let item = self.item.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let (Some(permit), Some(item)) = (permit, item) {
            permit.send(item);
        }
        Ok(())
    }
    fn tpc_abort(&self, _: &TxInfo) -> Result<(), TxError> {
        self.permit.lock().unwrap_or_else(|p| p.into_inner()).take();
        self.item.lock().unwrap_or_else(|p| p.into_inner()).take();
        Ok(())
    }
}

/// Like [`near_end`], with a vote that can abort the transaction.
pub fn near_end_voting(
    tx: &Transaction,
    call: impl FnOnce() -> Result<(), TxError> + Send + 'static,
    vote: impl Fn() -> Result<(), TxError> + Send + Sync + 'static,
) {
    join_call(
        tx,
        NEAR_END_KEY,
        "near-end call",
        Box::new(call),
        Some(Box::new(vote)),
    );
}

/// Puts `item` on `queue` when `tx` commits (nti's `put_nowait`): the item
/// is visible only after the commit; a full (or closed) queue makes the
/// transaction abort in its vote.
pub fn put_nowait<T: Send + 'static>(
    tx: &Transaction,
    queue: &tokio::sync::mpsc::Sender<T>,
    item: T,
) -> Result<(), super::TransactionError> {
    tx.join_sync(Arc::new(QueuePut {
        queue: queue.clone(),
        item: Mutex::new(Some(item)),
        permit: Mutex::new(None),
    }))
}
