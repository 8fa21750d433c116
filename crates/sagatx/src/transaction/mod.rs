//! Two-phase commit over data managers (the `transaction` package that
//! nti.transactions extends), the retrying [`TransactionLoop`], and
//! [`with_transaction`] (pymongo's).
//!
//! Participants implement [`DataManager`] (`async` methods) or, when
//! their operations never wait, [`SyncDataManager`] (joined with
//! [`Transaction::join_sync`]: called directly, with no future a call).
//!
//! Words: a *2PC commit* is this module's commit of a [`Transaction`]; it
//! is not the commit of a saga (API.md's `autocommit`) nor a journal write.
//!
//! ```
//! use std::sync::Arc;
//! use sagatx::transaction::{after_commit, TransactionManager};
//!
//! # tokio::runtime::Runtime::new().unwrap().block_on(async {
//! let tm = TransactionManager::new();
//! let tx = tm.begin();
//! let (sent, mut seen) = tokio::sync::mpsc::channel::<&str>(1);
//! // Runs only if the transaction commits.
//! after_commit(&tx, move || { let _ = sent.try_send("mail sent"); Ok(()) });
//! tx.commit().await.unwrap();
//! assert_eq!(seen.try_recv().ok(), Some("mail sent"));
//! # });
//! ```

pub(crate) use crate::now_ms;
use std::cell::Cell;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use async_trait::async_trait;
use sagatx_core::ErrorClass;
use smallvec::SmallVec;

mod hooks;
mod looping;
#[cfg(feature = "postgres")]
mod postgres;
mod sqlite;
mod with;

pub use hooks::{
    after_commit, after_commit_voting, near_end, near_end_voting, put_nowait, CallbackManager,
};
pub use looping::{Hooks, LoopError, TransactionLoop, TransactionLoopBuilder};
#[cfg(feature = "postgres")]
pub use postgres::{recover_prepared, PostgresDataManager, PreparedReport};
pub use sqlite::SqliteDataManager;
pub use with::{with_transaction, WithTransaction, DEFAULT_DEADLINE};

/// An error of a data manager or a transaction's work, with its class:
/// `Transient` is worth retrying the whole transaction, `UnknownOutcome`
/// (at commit) means the commit may or may not have happened, `Permanent`
/// is final.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct TxError {
    pub class: ErrorClass,
    pub message: String,
}

impl TxError {
    pub fn transient(m: impl Into<String>) -> Self {
        TxError {
            class: ErrorClass::Transient,
            message: m.into(),
        }
    }
    pub fn permanent(m: impl Into<String>) -> Self {
        TxError {
            class: ErrorClass::Permanent,
            message: m.into(),
        }
    }
    pub fn unknown_outcome(m: impl Into<String>) -> Self {
        TxError {
            class: ErrorClass::UnknownOutcome,
            message: m.into(),
        }
    }
}

/// What can go wrong with a transaction as a whole.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TransactionError {
    /// A data manager failed before or during the vote: every manager was
    /// aborted; nothing was committed. Safe to retry when the cause is
    /// transient.
    #[error("the transaction was aborted: {manager} failed in {phase}: {error}")]
    Aborted {
        manager: String,
        phase: &'static str,
        error: TxError,
    },
    /// A failure after every manager voted yes: some managers may have
    /// committed and others not. The transaction needs recovery (for
    /// prepared PostgreSQL transactions, `recover` resolves it).
    #[error(
        "COMMIT FAILED AFTER THE VOTE: {manager} failed in tpc_finish ({error}); \
         {finished} of {total} managers committed; the transaction needs recovery"
    )]
    CommitFailed {
        manager: String,
        error: TxError,
        finished: usize,
        total: usize,
    },
    /// Aborting failed in some managers (the others were aborted).
    #[error("aborting failed in {}: {}", failures.iter().map(|f| f.0.as_str()).collect::<Vec<_>>().join(", "), failures.first().map(|f| f.1.message.as_str()).unwrap_or(""))]
    AbortFailed { failures: Vec<(String, TxError)> },
    /// The application committed or aborted a transaction that a
    /// [`TransactionLoop`] controls.
    #[error("the transaction is controlled by a transaction loop; return from the handler instead of calling {0}")]
    Lifecycle(&'static str),
    /// The transaction manager's current transaction changed while a loop
    /// controlled it (the handler began another one).
    #[error("the handler began another transaction while the loop controlled transaction {expected}; found {found:?}")]
    Foreign { expected: u64, found: Option<u64> },
    /// The transaction is not active any more.
    #[error("the transaction is {0}; begin a new one")]
    NotActive(&'static str),
    /// A joined manager cannot take savepoints.
    #[error("{0} does not support savepoints")]
    SavepointUnsupported(String),
    /// The savepoint belongs to an older state of the transaction.
    #[error("the savepoint is no longer valid (rolled back past, or the transaction ended)")]
    InvalidSavepoint,
}

impl TransactionError {
    /// The class that decides whether retrying the transaction may help.
    pub fn class(&self) -> ErrorClass {
        match self {
            TransactionError::Aborted { error, .. } => error.class,
            TransactionError::CommitFailed { .. } => ErrorClass::UnknownOutcome,
            _ => ErrorClass::Permanent,
        }
    }
}

/// Where a savepoint can take a manager back to.
pub trait SavepointRollback: Send {
    fn rollback(&mut self) -> Result<(), TxError>;
}

/// A participant of two-phase commit. Methods run in this order on commit:
/// `tpc_begin`, `commit`, `tpc_vote`, `tpc_finish` (or `tpc_abort` after a
/// failure); `abort` when the transaction is aborted before commit starts.
#[async_trait]
pub trait DataManager: Send + Sync {
    /// Managers commit in the order of their keys (stable for equal keys).
    fn sort_key(&self) -> String;
    /// A name for messages.
    fn name(&self) -> String {
        self.sort_key()
    }
    /// Throw away the work done in the transaction (no commit started).
    async fn abort(&self, tx: &TxInfo) -> Result<(), TxError>;
    async fn tpc_begin(&self, tx: &TxInfo) -> Result<(), TxError>;
    /// Send the changes (phase one, part one).
    async fn commit(&self, tx: &TxInfo) -> Result<(), TxError>;
    /// Promise to commit: after a yes, `tpc_finish` must succeed (phase one,
    /// part two).
    async fn tpc_vote(&self, tx: &TxInfo) -> Result<(), TxError>;
    /// Make the changes permanent (phase two).
    async fn tpc_finish(&self, tx: &TxInfo) -> Result<(), TxError>;
    /// Undo after a failed commit; must not fail for a manager that did not
    /// vote yet.
    async fn tpc_abort(&self, tx: &TxInfo) -> Result<(), TxError>;
    /// A savepoint, for managers that support them.
    fn savepoint(&self) -> Result<Box<dyn SavepointRollback>, TxError> {
        Err(TxError::permanent(format!(
            "{} does not support savepoints",
            self.name()
        )))
    }
}

/// A data manager whose two-phase operations finish without waiting: an
/// in-process resource, a synchronous driver such as a rusqlite
/// connection, the calls of [`after_commit`]. The same order and rules as
/// [`DataManager`], in plain methods: joined with [`Transaction::join_sync`]
/// its calls make no future (an `async_trait` method boxes one a call).
/// Every `SyncDataManager` is also a [`DataManager`], so
/// [`Transaction::join`] takes it too, at the cost of those futures.
///
/// ```
/// use std::sync::atomic::{AtomicU64, Ordering};
/// use std::sync::Arc;
/// use sagatx::transaction::{SyncDataManager, Transaction, TxError, TxInfo};
///
/// /// Adds what is pending to the total when the transaction commits.
/// #[derive(Default)]
/// struct Counter { total: AtomicU64, pending: AtomicU64 }
///
/// impl SyncDataManager for Counter {
///     fn sort_key(&self) -> String { "counter".into() }
///     fn abort(&self, _: &TxInfo) -> Result<(), TxError> {
///         self.pending.store(0, Ordering::SeqCst);
///         Ok(())
///     }
///     fn tpc_begin(&self, _: &TxInfo) -> Result<(), TxError> { Ok(()) }
///     fn commit(&self, _: &TxInfo) -> Result<(), TxError> { Ok(()) }
///     fn tpc_vote(&self, _: &TxInfo) -> Result<(), TxError> { Ok(()) }
///     fn tpc_finish(&self, _: &TxInfo) -> Result<(), TxError> {
///         let n = self.pending.swap(0, Ordering::SeqCst);
///         self.total.fetch_add(n, Ordering::SeqCst);
///         Ok(())
///     }
///     fn tpc_abort(&self, tx: &TxInfo) -> Result<(), TxError> { self.abort(tx) }
/// }
///
/// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
/// let counter = Arc::new(Counter::default());
/// let tx = Transaction::new();
/// tx.join_sync(counter.clone())?;
/// counter.pending.fetch_add(5, Ordering::SeqCst);
/// tx.commit().await?;
/// assert_eq!(counter.total.load(Ordering::SeqCst), 5);
/// # Ok(())
/// # }
/// # tokio::runtime::Runtime::new().map_err(|e| e.to_string())?.block_on(demo()).map_err(|e| e.to_string())?;
/// # Ok::<(), String>(())
/// ```
pub trait SyncDataManager: Send + Sync {
    /// Managers commit in the order of their keys (stable for equal keys).
    fn sort_key(&self) -> String;
    /// A name for messages.
    fn name(&self) -> String {
        self.sort_key()
    }
    /// Throw away the work done in the transaction (no commit started).
    fn abort(&self, tx: &TxInfo) -> Result<(), TxError>;
    fn tpc_begin(&self, tx: &TxInfo) -> Result<(), TxError>;
    /// Send the changes (phase one, part one).
    fn commit(&self, tx: &TxInfo) -> Result<(), TxError>;
    /// Promise to commit: after a yes, `tpc_finish` must succeed.
    fn tpc_vote(&self, tx: &TxInfo) -> Result<(), TxError>;
    /// Make the changes permanent (phase two).
    fn tpc_finish(&self, tx: &TxInfo) -> Result<(), TxError>;
    /// Undo after a failed commit; must not fail for a manager that did not
    /// vote yet.
    fn tpc_abort(&self, tx: &TxInfo) -> Result<(), TxError>;
    /// A savepoint, for managers that support them.
    fn savepoint(&self) -> Result<Box<dyn SavepointRollback>, TxError> {
        Err(TxError::permanent(format!(
            "{} does not support savepoints",
            self.name()
        )))
    }
}

#[async_trait]
impl<T: SyncDataManager + ?Sized> DataManager for T {
    fn sort_key(&self) -> String {
        SyncDataManager::sort_key(self)
    }
    fn name(&self) -> String {
        SyncDataManager::name(self)
    }
    async fn abort(&self, tx: &TxInfo) -> Result<(), TxError> {
        SyncDataManager::abort(self, tx)
    }
    async fn tpc_begin(&self, tx: &TxInfo) -> Result<(), TxError> {
        SyncDataManager::tpc_begin(self, tx)
    }
    async fn commit(&self, tx: &TxInfo) -> Result<(), TxError> {
        SyncDataManager::commit(self, tx)
    }
    async fn tpc_vote(&self, tx: &TxInfo) -> Result<(), TxError> {
        SyncDataManager::tpc_vote(self, tx)
    }
    async fn tpc_finish(&self, tx: &TxInfo) -> Result<(), TxError> {
        SyncDataManager::tpc_finish(self, tx)
    }
    async fn tpc_abort(&self, tx: &TxInfo) -> Result<(), TxError> {
        SyncDataManager::tpc_abort(self, tx)
    }
    fn savepoint(&self) -> Result<Box<dyn SavepointRollback>, TxError> {
        SyncDataManager::savepoint(self)
    }
}

/// A joined manager: a synchronous one is called directly, with no future
/// of its own.
#[derive(Clone)]
enum Member {
    Async(Arc<dyn DataManager>),
    Sync(Arc<dyn SyncDataManager>),
}

impl Member {
    /// The manager's address: joining the same manager twice, through
    /// either kind of handle, is recognised.
    fn addr(&self) -> *const () {
        match self {
            Member::Async(d) => Arc::as_ptr(d) as *const (),
            Member::Sync(d) => Arc::as_ptr(d) as *const (),
        }
    }

    fn sort_key(&self) -> String {
        match self {
            Member::Async(d) => d.sort_key(),
            Member::Sync(d) => d.sort_key(),
        }
    }

    fn name(&self) -> String {
        match self {
            Member::Async(d) => d.name(),
            Member::Sync(d) => d.name(),
        }
    }

    fn savepoint(&self) -> Result<Box<dyn SavepointRollback>, TxError> {
        match self {
            Member::Async(d) => d.savepoint(),
            Member::Sync(d) => d.savepoint(),
        }
    }
}

/// Calls `$method` of a [`Member`]: a synchronous manager directly, an
/// asynchronous one through its future. (A macro: an `async fn` or a
/// method returning either would add its own work to every call.)
macro_rules! call {
    ($dm:expr, $method:ident, $tx:expr) => {
        match &$dm {
            Member::Sync(d) => d.$method($tx),
            Member::Async(d) => d.$method($tx).await,
        }
    };
}

/// What a data manager is told about the transaction.
#[derive(Debug, Clone)]
pub struct TxInfo {
    pub id: u64,
    /// A description for logs (the loop's `describe_transaction`).
    pub note: String,
    /// Made on first use: most managers never ask for it.
    gid: std::sync::OnceLock<String>,
}

impl TxInfo {
    /// The transaction's globally unique id, the same as
    /// [`Transaction::gid`]: the prefix of prepared transactions' ids and
    /// the key of the commit decision.
    pub fn gid(&self) -> &str {
        self.gid.get_or_init(|| gid_of(self.id))
    }
}

/// The globally unique id of this process's transaction `id`: 32 hex
/// digits, a random number drawn once per process followed by `id`.
fn gid_of(id: u64) -> String {
    static PROCESS: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    let p = PROCESS.get_or_init(|| uuid::Uuid::new_v4().as_u64_pair().0);
    format!("{p:016x}{id:016x}")
}

/// The status of a transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum TxStatus {
    Active,
    Committing,
    Committed,
    /// The commit failed after the vote; `commit` may be called again to
    /// finish the managers that did not.
    CommitFailed,
    Aborted,
}

impl TxStatus {
    /// The inverse of `status as u8`.
    fn from_u8(v: u8) -> Self {
        match v {
            0 => TxStatus::Active,
            1 => TxStatus::Committing,
            2 => TxStatus::Committed,
            3 => TxStatus::CommitFailed,
            _ => TxStatus::Aborted,
        }
    }

    fn as_str(self) -> &'static str {
        match self {
            TxStatus::Active => "active",
            TxStatus::Committing => "committing",
            TxStatus::Committed => "committed",
            TxStatus::CommitFailed => "failed after the vote",
            TxStatus::Aborted => "aborted",
        }
    }
}

struct Joined {
    dm: Member,
    /// `tpc_finish` succeeded.
    finished: bool,
}

struct State {
    /// Most transactions join one manager: it is kept inline, with no
    /// allocation of its own.
    joined: SmallVec<[Joined; 1]>,
    /// Incremented by every savepoint rollback and by the end of the
    /// transaction: savepoints of an older generation are invalid.
    generation: u64,
    read_only: bool,
    loop_controlled: bool,
    note: String,
    decisions: Option<Arc<dyn DecisionLog>>,
    /// The logged commit decision, forgotten once every manager finished.
    decision: Option<u64>,
}

struct Inner {
    id: u64,
    /// Made on first use: most transactions never need it.
    gid: std::sync::OnceLock<String>,
    /// The [`TxStatus`], readable without the lock. Every change is made
    /// with `state` locked, so that joining, savepoints and the start of
    /// a commit or an abort see it together with the rest of the state;
    /// all but one: the end of a successful commit without a decision
    /// log (`Committing` to `Committed`) changes nothing else, so it
    /// takes no lock (no operation acts on the difference: each one
    /// refuses both).
    status: AtomicU8,
    state: Mutex<State>,
}

impl Inner {
    fn status(&self) -> TxStatus {
        TxStatus::from_u8(self.status.load(Ordering::Acquire))
    }

    fn set_status(&self, status: TxStatus) {
        self.status.store(status as u8, Ordering::Release);
    }
}

/// A transaction that data managers join. Cheap to clone (a handle).
#[derive(Clone)]
pub struct Transaction {
    inner: Arc<Inner>,
}

static NEXT_TX: AtomicU64 = AtomicU64::new(1);

/// Transaction numbers each thread takes from [`NEXT_TX`] at a time.
const ID_BLOCK: u64 = 1024;

/// The next transaction number: unique in the process, increasing within
/// a thread. Each thread takes a block of [`ID_BLOCK`] numbers at a time,
/// so that beginning a transaction costs no atomic operation (one of the
/// few costs left in a transaction's begin, join and commit) and threads
/// beginning transactions do not contend for one counter.
fn next_id() -> u64 {
    thread_local! {
        /// The next number of this thread's block and the block's end.
        static IDS: Cell<(u64, u64)> = const { Cell::new((0, 0)) };
    }
    IDS.with(|ids| {
        let (next, end) = ids.get();
        let (id, end) = if next < end {
            (next, end)
        } else {
            let start = NEXT_TX.fetch_add(ID_BLOCK, Ordering::Relaxed);
            (start, start + ID_BLOCK)
        };
        ids.set((id + 1, end));
        id
    })
}

fn lock(m: &Mutex<State>) -> MutexGuard<'_, State> {
    // Updates under this lock are single assignments and pushes; a panic
    // elsewhere cannot leave the state half-written.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Default for Transaction {
    fn default() -> Self {
        Self::new()
    }
}

impl Transaction {
    /// A new, active transaction (usually through [`TransactionManager::begin`]).
    pub fn new() -> Self {
        Transaction {
            inner: Arc::new(Inner {
                id: next_id(),
                gid: std::sync::OnceLock::new(),
                status: AtomicU8::new(TxStatus::Active as u8),
                state: Mutex::new(State {
                    joined: SmallVec::new(),
                    generation: 0,
                    read_only: false,
                    loop_controlled: false,
                    note: String::new(),
                    decisions: None,
                    decision: None,
                }),
            }),
        }
    }

    /// The transaction's number: unique in the process (never 0), and
    /// increasing among the transactions one thread begins (threads take
    /// numbers in blocks, so not across threads).
    pub fn id(&self) -> u64 {
        self.inner.id
    }

    /// The globally unique id: 32 hex digits, a random number drawn once
    /// per process followed by this transaction's number in the process.
    pub fn gid(&self) -> &str {
        self.inner.gid.get_or_init(|| gid_of(self.inner.id))
    }

    /// Logs the commit decision there, durably, after every vote and before
    /// any manager finishes: what recovery of prepared transactions reads.
    pub fn set_decision_log(&self, log: Arc<dyn DecisionLog>) {
        lock(&self.inner.state).decisions = Some(log);
    }

    pub fn status(&self) -> TxStatus {
        self.inner.status()
    }

    pub fn is_active(&self) -> bool {
        self.status() == TxStatus::Active
    }

    fn info(&self) -> TxInfo {
        TxInfo {
            id: self.inner.id,
            note: lock(&self.inner.state).note.clone(),
            gid: std::sync::OnceLock::new(),
        }
    }

    /// Sets the description data managers and logs see.
    pub fn note(&self, text: impl Into<String>) {
        lock(&self.inner.state).note = text.into();
    }

    /// Says the work changed nothing: a [`TransactionLoop`] aborts instead
    /// of committing (no expensive commit for a read).
    pub fn set_read_only(&self) {
        lock(&self.inner.state).read_only = true;
    }

    pub fn is_read_only(&self) -> bool {
        lock(&self.inner.state).read_only
    }

    pub(crate) fn set_loop_controlled(&self, on: bool) {
        lock(&self.inner.state).loop_controlled = on;
    }

    /// Adds a data manager. Joining the same manager twice is a no-op.
    pub fn join(&self, dm: Arc<dyn DataManager>) -> Result<(), TransactionError> {
        self.add(Member::Async(dm))
    }

    /// Adds a data manager whose operations do not wait: they are called
    /// directly, with no future made for each. Joining the same manager
    /// twice, by either method, is a no-op.
    pub fn join_sync(&self, dm: Arc<dyn SyncDataManager>) -> Result<(), TransactionError> {
        self.add(Member::Sync(dm))
    }

    fn add(&self, dm: Member) -> Result<(), TransactionError> {
        let mut st = lock(&self.inner.state);
        let status = self.inner.status();
        if status != TxStatus::Active {
            return Err(TransactionError::NotActive(status.as_str()));
        }
        if !st
            .joined
            .iter()
            .any(|j| std::ptr::eq(j.dm.addr(), dm.addr()))
        {
            st.joined.push(Joined {
                dm,
                finished: false,
            });
        }
        Ok(())
    }

    /// The names of the joined managers, in joining order. The commit
    /// takes them (none are listed while it runs), and a transaction that
    /// ended releases them, as `transaction`'s `_free()` does: a
    /// committed or aborted transaction lists none, and keeps none alive
    /// (a finished transaction that is still the manager's current one
    /// holds no connection). After a commit that failed past the vote
    /// they are back, for the commit that finishes them.
    pub fn managers(&self) -> Vec<String> {
        lock(&self.inner.state)
            .joined
            .iter()
            .map(|j| j.dm.name())
            .collect()
    }

    /// A savepoint of every joined manager.
    pub fn savepoint(&self) -> Result<Savepoint, TransactionError> {
        let st = lock(&self.inner.state);
        let status = self.inner.status();
        if status != TxStatus::Active {
            return Err(TransactionError::NotActive(status.as_str()));
        }
        let mut rollbacks = Vec::with_capacity(st.joined.len());
        for j in &st.joined {
            rollbacks.push(
                j.dm.savepoint()
                    .map_err(|_| TransactionError::SavepointUnsupported(j.dm.name()))?,
            );
        }
        Ok(Savepoint {
            tx: self.clone(),
            joined_at: st.joined.len(),
            generation: st.generation,
            rollbacks,
        })
    }

    /// Aborts: every manager's `abort`, in sort order.
    pub async fn abort(&self) -> Result<(), TransactionError> {
        {
            let st = lock(&self.inner.state);
            if st.loop_controlled {
                return Err(TransactionError::Lifecycle("abort()"));
            }
        }
        self.abort_inner().await
    }

    pub(crate) async fn abort_inner(&self) -> Result<(), TransactionError> {
        // The managers leave the state: an aborted transaction releases them.
        let joined = {
            let mut st = lock(&self.inner.state);
            match self.inner.status() {
                TxStatus::Active => {}
                TxStatus::Aborted => return Ok(()),
                s => return Err(TransactionError::NotActive(s.as_str())),
            }
            self.inner.set_status(TxStatus::Aborted);
            st.generation += 1;
            std::mem::take(&mut st.joined)
        };
        let info = self.info();
        let mut failures = Vec::new();
        for i in commit_order(&joined) {
            let dm = &joined[i].dm;
            if let Err(e) = call!(dm, abort, &info) {
                failures.push((dm.name(), e));
            }
        }
        if failures.is_empty() {
            Ok(())
        } else {
            Err(TransactionError::AbortFailed { failures })
        }
    }

    /// Two-phase commit over every joined manager, in sort order.
    pub async fn commit(&self) -> Result<(), TransactionError> {
        self.commit_as(Caller::Application).await
    }

    /// The commit of the loop that controls the transaction.
    pub(crate) async fn commit_inner(&self) -> Result<(), TransactionError> {
        self.commit_as(Caller::Loop).await
    }

    async fn commit_as(&self, caller: Caller) -> Result<(), TransactionError> {
        // One look at the state: who may commit, the status, what the
        // managers are told, the decision log, and the joined managers
        // themselves. The commit takes those out of the state (joining
        // needs `Active`, so they no longer change; no reference count is
        // taken a manager) and puts them back only if it fails after the
        // vote, for the commit that finishes them; otherwise they are
        // released when it returns.
        let (resuming, info, mut joined, log) = {
            let mut st = lock(&self.inner.state);
            if caller == Caller::Application && st.loop_controlled {
                return Err(TransactionError::Lifecycle("commit()"));
            }
            let resuming = match self.inner.status() {
                TxStatus::Active => {
                    self.inner.set_status(TxStatus::Committing);
                    false
                }
                // Retry only the commit: finish the managers that did not.
                // `Committing` again, so that a second commit meanwhile
                // is refused instead of finishing the same managers too.
                TxStatus::CommitFailed => {
                    self.inner.set_status(TxStatus::Committing);
                    true
                }
                s => return Err(TransactionError::NotActive(s.as_str())),
            };
            let info = TxInfo {
                id: self.inner.id,
                note: st.note.clone(),
                gid: std::sync::OnceLock::new(),
            };
            let joined = std::mem::take(&mut st.joined);
            (resuming, info, joined, st.decisions.clone())
        };
        let order = commit_order(&joined);
        if !resuming {
            for (phase, n) in [("tpc_begin", 0), ("commit", 1), ("tpc_vote", 2)] {
                for &i in &order {
                    let dm = &joined[i].dm;
                    let r = match n {
                        0 => call!(dm, tpc_begin, &info),
                        1 => call!(dm, commit, &info),
                        _ => call!(dm, tpc_vote, &info),
                    };
                    if let Err(error) = r {
                        return Err(self
                            .abort_after_failure(&info, &joined, &order, dm.name(), phase, error)
                            .await);
                    }
                }
            }
            if let Some(log) = &log {
                match log.decide_commit(&info).await {
                    Ok(token) => lock(&self.inner.state).decision = Some(token),
                    Err(error) => {
                        // Nothing committed yet: abort everywhere.
                        return Err(self
                            .abort_after_failure(
                                &info,
                                &joined,
                                &order,
                                "decision log".into(),
                                "decision",
                                error,
                            )
                            .await);
                    }
                }
            }
        }
        // Phase two. Every manager voted yes: each must now finish.
        let total = joined.len();
        for (k, &i) in order.iter().enumerate() {
            if joined[i].finished {
                continue;
            }
            if let Err(error) = call!(joined[i].dm, tpc_finish, &info) {
                // Those before it in commit order have finished, now or
                // in an earlier attempt.
                for &j in &order[..k] {
                    joined[j].finished = true;
                }
                let finished = joined.iter().filter(|j| j.finished).count();
                let manager = joined[i].dm.name();
                tracing::error!(%manager, %error, finished, total, "commit failed after the vote");
                // Back in the state, with the status, under one lock: a
                // commit that sees `CommitFailed` finds them there.
                let mut st = lock(&self.inner.state);
                st.joined = joined;
                self.inner.set_status(TxStatus::CommitFailed);
                return Err(TransactionError::CommitFailed {
                    manager,
                    error,
                    finished,
                    total,
                });
            }
        }
        // The end. Only the status changes (the managers' `finished`
        // flags serve to resume a commit that failed, and savepoints check
        // the status first), and the decision, when one was logged.
        let token = if log.is_some() {
            let mut st = lock(&self.inner.state);
            self.inner.set_status(TxStatus::Committed);
            st.decision.take()
        } else {
            self.inner.set_status(TxStatus::Committed);
            None
        };
        if let (Some(log), Some(token)) = (log, token) {
            if let Err(e) = log.forget(token).await {
                // Harmless: recovery finds no prepared transaction for it.
                tracing::warn!(error = %e, "the commit decision could not be forgotten");
            }
        }
        Ok(())
    }
}

/// Who commits a transaction: the application may not while a
/// [`TransactionLoop`] controls it.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Caller {
    Application,
    Loop,
}

/// The positions of the joined managers in commit order: by sort key,
/// equal keys in their joining order (a stable sort; the keys are
/// Strings, made once a manager). Most transactions have one: kept
/// inline, and not sorted.
fn commit_order(joined: &[Joined]) -> SmallVec<[usize; 1]> {
    if joined.len() == 1 {
        return smallvec::smallvec![0];
    }
    let mut order: SmallVec<[usize; 1]> = (0..joined.len()).collect();
    order.sort_by_cached_key(|&i| joined[i].dm.sort_key());
    order
}

/// Where the coordinator writes its commit decisions, durably.
#[async_trait]
pub trait DecisionLog: Send + Sync {
    /// Records "commit" for the transaction; returns a token for `forget`.
    async fn decide_commit(&self, tx: &TxInfo) -> Result<u64, TxError>;
    /// Every manager finished: the decision is no longer needed.
    async fn forget(&self, token: u64) -> Result<(), TxError>;
}

/// The name of decision records in the operation log.
pub const DECISION_OP: &str = "sagatx.2pc.commit";

/// Commit decisions in a [`Store`](crate::Store)'s operation log.
pub struct StoreDecisions(pub Arc<dyn crate::Store>);

#[async_trait]
impl DecisionLog for StoreDecisions {
    async fn decide_commit(&self, tx: &TxInfo) -> Result<u64, TxError> {
        self.0
            .op_record(DECISION_OP, &serde_json::json!({"tx": tx.gid()}), now_ms())
            .await
            .map_err(|e| TxError::transient(format!("cannot log the commit decision: {e}")))
    }
    async fn forget(&self, token: u64) -> Result<(), TxError> {
        self.0
            .op_finish(token, None, now_ms())
            .await
            .map_err(|e| TxError::transient(e.to_string()))
    }
}

impl Transaction {
    /// A failure before any manager finished: `tpc_abort` everywhere, the
    /// transaction ends aborted.
    async fn abort_after_failure(
        &self,
        info: &TxInfo,
        joined: &[Joined],
        order: &[usize],
        manager: String,
        phase: &'static str,
        error: TxError,
    ) -> TransactionError {
        for &i in order {
            let dm = &joined[i].dm;
            if let Err(e) = call!(dm, tpc_abort, info) {
                tracing::error!(manager = %dm.name(), error = %e, "tpc_abort failed");
            }
        }
        let mut st = lock(&self.inner.state);
        self.inner.set_status(TxStatus::Aborted);
        st.generation += 1;
        TransactionError::Aborted {
            manager,
            phase,
            error,
        }
    }
}

/// A point a transaction can roll back to.
pub struct Savepoint {
    tx: Transaction,
    joined_at: usize,
    generation: u64,
    rollbacks: Vec<Box<dyn SavepointRollback>>,
}

impl Savepoint {
    /// Rolls every manager back to the savepoint; managers that joined after
    /// it are aborted and unjoined. The savepoint stays usable; savepoints
    /// taken after it do not.
    pub async fn rollback(&mut self) -> Result<(), TransactionError> {
        let later: Vec<Member> = {
            let mut st = lock(&self.tx.inner.state);
            if self.tx.inner.status() != TxStatus::Active || st.generation != self.generation {
                return Err(TransactionError::InvalidSavepoint);
            }
            st.generation += 1;
            self.generation = st.generation;
            let keep = self.joined_at.min(st.joined.len());
            st.joined.drain(keep..).map(|j| j.dm).collect()
        };
        for r in &mut self.rollbacks {
            r.rollback().map_err(|error| TransactionError::Aborted {
                manager: "savepoint".into(),
                phase: "rollback",
                error,
            })?;
        }
        let info = self.tx.info();
        let mut failures = Vec::new();
        for dm in later {
            if let Err(e) = call!(dm, abort, &info) {
                failures.push((dm.name(), e));
            }
        }
        if failures.is_empty() {
            Ok(())
        } else {
            Err(TransactionError::AbortFailed { failures })
        }
    }
}

/// Holds the current transaction (ZODB's transaction manager): `begin`
/// replaces it. Cheap to clone.
#[derive(Clone, Default)]
pub struct TransactionManager {
    current: Arc<Mutex<Option<Transaction>>>,
}

impl TransactionManager {
    pub fn new() -> Self {
        Self::default()
    }

    /// Begins a new transaction and makes it current. (An unfinished
    /// previous one is simply forgotten; abort it first if it joined
    /// managers.)
    pub fn begin(&self) -> Transaction {
        let tx = Transaction::new();
        *self.current.lock().unwrap_or_else(|p| p.into_inner()) = Some(tx.clone());
        tx
    }

    /// The current transaction, if one was begun.
    pub fn get(&self) -> Option<Transaction> {
        self.current
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

#[cfg(test)]
mod tests;
