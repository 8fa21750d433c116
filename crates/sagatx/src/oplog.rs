//! The operation log (grate.atomic): an operation is recorded durably
//! before it runs and marked finished after, so that operations a crash
//! interrupted are found and run again by [`OperationLog::recover_all`]
//! through the handler registered under their name. Operations must
//! therefore be idempotent: one may run more than once.
//!
//! ```
//! use sagatx::oplog::OperationLog;
//! use sagatx::MemoryStore;
//! use serde_json::json;
//!
//! # tokio::runtime::Runtime::new().unwrap().block_on(async {
//! let log = OperationLog::new(std::sync::Arc::new(MemoryStore::new()));
//! log.register("resize", |args| async move {
//!     Ok(json!({"resized": args["image"]}))
//! });
//! let out = log.atomic("resize", json!({"image": 7})).await.unwrap();
//! assert_eq!(out, json!({"resized": 7}));
//! let report = log.recover_all().await.unwrap(); // after a restart
//! assert_eq!(report.rerun, 0);
//! # });
//! ```

use crate::now_ms;
use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, RwLock};

use sagatx_core::ErrorClass;
use serde_json::Value;

use crate::store::{Store, StoreError};
use crate::transaction::TxError;

type Handler = Arc<
    dyn Fn(Value) -> Pin<Box<dyn Future<Output = Result<Value, TxError>> + Send>> + Send + Sync,
>;

/// Why an operation could not be run.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OpError {
    #[error("no handler is registered for operation {0:?}; register it with OperationLog::register before running or recovering it")]
    NoHandler(String),
    #[error("operation {name:?} failed: {error}")]
    Failed { name: String, error: TxError },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What [`OperationLog::recover_all`] did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RecoveryReport {
    /// Interrupted operations run again to completion.
    pub rerun: usize,
    /// Operations left pending: no handler is registered under their name
    /// (id and name). Reported, not dropped: they stay in the log.
    pub unknown: Vec<(u64, String)>,
    /// Operations that failed again (id, name, error); transient ones stay
    /// pending for the next recovery, permanent ones are closed.
    pub failed: Vec<(u64, String, String)>,
}

/// An operation log on a store. Cheap to clone.
#[derive(Clone)]
pub struct OperationLog {
    store: Arc<dyn Store>,
    handlers: Arc<RwLock<HashMap<String, Handler>>>,
}

impl OperationLog {
    pub fn new(store: Arc<dyn Store>) -> Self {
        OperationLog {
            store,
            handlers: Arc::default(),
        }
    }

    /// Registers the handler of operations named `name` (grate's recovery
    /// by method name).
    pub fn register<F, Fut>(&self, name: &str, f: F)
    where
        F: Fn(Value) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Value, TxError>> + Send + 'static,
    {
        let h: Handler = Arc::new(move |args| Box::pin(f(args)));
        self.handlers
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(name.to_string(), h);
    }

    fn handler(&self, name: &str) -> Option<Handler> {
        self.handlers
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(name)
            .cloned()
    }

    async fn run(&self, id: u64, name: &str, h: Handler, args: Value) -> Result<Value, OpError> {
        match h(args).await {
            Ok(v) => {
                self.store.op_finish(id, None, now_ms()).await?;
                Ok(v)
            }
            Err(error) => {
                // A permanent failure is final; a transient one stays
                // pending, for recover_all to run again.
                if error.class == ErrorClass::Permanent {
                    self.store
                        .op_finish(id, Some(&error.message), now_ms())
                        .await?;
                }
                Err(OpError::Failed {
                    name: name.to_string(),
                    error,
                })
            }
        }
    }

    /// grate's `atomic` with the handler inline: registers `f` under `name`
    /// (so that `recover_all` finds it after a restart, if this process
    /// registers it again), then runs the operation as [`atomic`](Self::atomic).
    pub async fn atomic_with<F, Fut>(&self, name: &str, args: Value, f: F) -> Result<Value, OpError>
    where
        F: Fn(Value) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Value, TxError>> + Send + 'static,
    {
        self.register(name, f);
        self.atomic(name, args).await
    }

    /// Records the operation (name, arguments, time), durably, then runs
    /// its handler, then marks it finished.
    pub async fn atomic(&self, name: &str, args: Value) -> Result<Value, OpError> {
        let h = self
            .handler(name)
            .ok_or_else(|| OpError::NoHandler(name.to_string()))?;
        let id = self.store.op_record(name, &args, now_ms()).await?;
        self.run(id, name, h, args).await
    }

    /// Runs again every operation recorded and not finished, oldest first,
    /// through the handler registered under its name.
    pub async fn recover_all(&self) -> Result<RecoveryReport, OpError> {
        let mut report = RecoveryReport::default();
        let mut after = None;
        loop {
            let page = self.store.op_pending(after, 256).await?;
            let Some(last) = page.last() else { break };
            after = Some(last.id);
            for op in page {
                let Some(h) = self.handler(&op.name) else {
                    tracing::error!(id = op.id, name = %op.name, "interrupted operation has no handler; left in the log");
                    report.unknown.push((op.id, op.name));
                    continue;
                };
                match self.run(op.id, &op.name, h, op.args).await {
                    Ok(_) => report.rerun += 1,
                    Err(OpError::Failed { name, error }) => {
                        report.failed.push((op.id, name, error.message))
                    }
                    Err(e) => return Err(e),
                }
            }
        }
        Ok(report)
    }
}
