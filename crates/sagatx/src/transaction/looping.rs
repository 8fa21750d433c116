//! The retrying transaction loop (nti's `TransactionLoop`).

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sagatx_core::{ErrorClass, RetryPolicy};
use tracing::Instrument;

use super::{Transaction, TransactionError, TransactionManager, TxError};

/// Why a loop ended without a result: the handler's error, or the
/// transaction's. After the last attempt it is the last error.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum LoopError {
    #[error("the handler failed: {0}")]
    Handler(TxError),
    #[error(transparent)]
    Transaction(#[from] TransactionError),
}

impl LoopError {
    pub fn class(&self) -> ErrorClass {
        match self {
            LoopError::Handler(e) => e.class,
            LoopError::Transaction(e) => e.class(),
        }
    }
}

/// Events and hooks of a loop; every method has a default that does
/// nothing. Events come in this order: `will_first_attempt`, `began`, then
/// `committed` or `aborted`; before each further attempt `will_retry`,
/// `prep_for_retry`, `will_sleep` (which may change the sleep), `began`, …
pub trait Hooks: Send + Sync {
    fn will_first_attempt(&self) {}
    /// Attempt `attempt` (2, 3, …) is about to run.
    fn will_retry(&self, _attempt: u32) {}
    /// Before attempt `attempt`: change `sleep` to sleep otherwise.
    fn will_sleep(&self, _attempt: u32, _sleep: &mut Duration) {}
    fn began(&self, _tx: &Transaction) {}
    fn committed(&self, _tx: &Transaction) {}
    /// The attempt's transaction was aborted (with the error, when one
    /// caused it; `None` for a veto or a read-only abort).
    fn aborted(&self, _tx: &Transaction, _error: Option<&LoopError>) {}
    /// Get ready for attempt `attempt` (nti's `prep_for_retry`, e.g. rewind
    /// a request body).
    fn prep_for_retry(&self, _attempt: u32) {}
    /// A description of the work for logs and data managers.
    fn describe_transaction(&self) -> String {
        String::new()
    }
    /// `true` vetoes the commit: the transaction is aborted instead and the
    /// handler's result returned.
    fn commit_veto(&self, _tx: &Transaction) -> bool {
        false
    }
}

struct NoHooks;
impl Hooks for NoHooks {}

type RetryIf = Arc<dyn Fn(&LoopError) -> bool + Send + Sync>;

/// Runs a handler in a fresh transaction, commits, and retries what is
/// worth retrying.
#[derive(Clone)]
pub struct TransactionLoop {
    manager: TransactionManager,
    policy: RetryPolicy,
    retry_if: RetryIf,
    hooks: Arc<dyn Hooks>,
    rng: Arc<AtomicU64>,
}

/// Settings of a [`TransactionLoop`].
pub struct TransactionLoopBuilder {
    manager: Option<TransactionManager>,
    policy: RetryPolicy,
    retry_if: Option<RetryIf>,
    hooks: Arc<dyn Hooks>,
}

impl TransactionLoopBuilder {
    pub fn manager(mut self, m: TransactionManager) -> Self {
        self.manager = Some(m);
        self
    }
    /// Attempts in all (default 3).
    pub fn attempts(mut self, n: u32) -> Self {
        self.policy.max_attempts = n.max(1);
        self
    }
    /// Backoff between attempts (defaults: 100 ms, ×2, at most 30 s, ±20 %).
    pub fn backoff(mut self, policy: RetryPolicy) -> Self {
        let attempts = self.policy.max_attempts;
        self.policy = RetryPolicy {
            max_attempts: attempts,
            ..policy
        };
        self
    }
    /// Which errors are retried, besides none: by default those whose class
    /// is `Transient` (a commit that failed after the vote never is).
    pub fn retry_if(mut self, f: impl Fn(&LoopError) -> bool + Send + Sync + 'static) -> Self {
        self.retry_if = Some(Arc::new(f));
        self
    }
    pub fn hooks(mut self, h: Arc<dyn Hooks>) -> Self {
        self.hooks = h;
        self
    }
    pub fn build(self) -> TransactionLoop {
        TransactionLoop {
            manager: self.manager.unwrap_or_default(),
            policy: self.policy,
            retry_if: self
                .retry_if
                .unwrap_or_else(|| Arc::new(|e: &LoopError| e.class() == ErrorClass::Transient)),
            hooks: self.hooks,
            rng: Arc::new(AtomicU64::new(0x2545_F491_4F6C_DD1D)),
        }
    }
}

impl TransactionLoop {
    pub fn builder() -> TransactionLoopBuilder {
        TransactionLoopBuilder {
            manager: None,
            policy: RetryPolicy::default(),
            retry_if: None,
            hooks: Arc::new(NoHooks),
        }
    }

    pub fn manager(&self) -> &TransactionManager {
        &self.manager
    }

    fn random01(&self) -> f64 {
        let mut z = self.rng.fetch_add(0x9E37_79B9_7F4A_7C15, Ordering::Relaxed);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        ((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Runs `handler` in a new transaction per attempt; returns its result
    /// once committed (or aborted by a veto or as read-only).
    pub async fn run<T, F, Fut>(&self, mut handler: F) -> Result<T, LoopError>
    where
        F: FnMut(Transaction) -> Fut,
        Fut: Future<Output = Result<T, TxError>>,
    {
        let hooks = &self.hooks;
        hooks.will_first_attempt();
        let mut attempt = 1u32;
        loop {
            let description = hooks.describe_transaction();
            let tx = self.manager.begin();
            tx.note(description.clone());
            tx.set_loop_controlled(true);
            let span = tracing::info_span!("transaction", attempt, tx = tx.id(), description = %description);
            let outcome = async {
                hooks.began(&tx);
                let result = handler(tx.clone()).await;
                let current = self.manager.get().map(|t| t.id());
                if current != Some(tx.id()) {
                    let _ = tx.abort_inner().await;
                    let e = LoopError::Transaction(TransactionError::Foreign {
                        expected: tx.id(),
                        found: current,
                    });
                    hooks.aborted(&tx, Some(&e));
                    return Err(e);
                }
                match result {
                    Ok(v) => {
                        if tx.is_read_only() || hooks.commit_veto(&tx) {
                            let started = Instant::now();
                            tx.abort_inner().await?;
                            metrics::histogram!("sagatx_tx_abort_seconds")
                                .record(started.elapsed().as_secs_f64());
                            hooks.aborted(&tx, None);
                            return Ok(v);
                        }
                        let started = Instant::now();
                        match tx.commit_inner().await {
                            Ok(()) => {
                                metrics::histogram!("sagatx_tx_commit_seconds")
                                    .record(started.elapsed().as_secs_f64());
                                hooks.committed(&tx);
                                Ok(v)
                            }
                            Err(e) => {
                                let e = LoopError::Transaction(e);
                                hooks.aborted(&tx, Some(&e));
                                Err(e)
                            }
                        }
                    }
                    Err(e) => {
                        let started = Instant::now();
                        let abort = tx.abort_inner().await;
                        metrics::histogram!("sagatx_tx_abort_seconds")
                            .record(started.elapsed().as_secs_f64());
                        let e = LoopError::Handler(e);
                        hooks.aborted(&tx, Some(&e));
                        if let Err(a) = abort {
                            tracing::error!(error = %a, "aborting after a handler error failed");
                        }
                        Err(e)
                    }
                }
            }
            .instrument(span)
            .await;
            tx.set_loop_controlled(false);
            let err = match outcome {
                Ok(v) => return Ok(v),
                Err(e) => e,
            };
            if attempt >= self.policy.max_attempts || !(self.retry_if)(&err) {
                return Err(err);
            }
            attempt += 1;
            hooks.will_retry(attempt);
            hooks.prep_for_retry(attempt);
            let mut sleep =
                Duration::from_millis(self.policy.backoff_ms(attempt - 1, self.random01()));
            hooks.will_sleep(attempt, &mut sleep);
            tracing::debug!(attempt, error = %err, sleep_ms = sleep.as_millis() as u64, "retrying the transaction");
            tokio::time::sleep(sleep).await;
        }
    }
}
