//! The journal: one narrow async trait and its implementations.
//!
//! A [`Store`] keeps saga definitions (by name and version) and executions.
//! The engine writes an execution's whole state after every transition with
//! [`Store::append`]; the store accepts the write only when its `seq` follows
//! the one it holds, which fences out a writer that lost track. Every
//! implementation passes the one [`conformance`] suite unchanged.
//!
//! - [`MemoryStore`]: in memory, for tests and the benchmark; not durable.
//! - [`SqliteStore`]: the embedded default; WAL, `synchronous=FULL`, one
//!   writer thread doing group commit, separate read connections.

use async_trait::async_trait;
use sagatx_core::{DecodeError, Execution, ExecutionId, SagaDefinition, Status};

pub mod conformance;
mod lz4;
mod memory;
pub mod migrate;
mod migrations;
mod pack;
#[cfg(feature = "postgres")]
pub(crate) mod postgres;
mod sqlite;
mod url;

pub use memory::MemoryStore;
#[cfg(feature = "postgres")]
pub use postgres::{
    PostgresOptions, PostgresStore, DEFAULT_LEASE, PG_PAUSED_BEFORE, PG_SCHEMA_VERSION,
};
pub use sqlite::{
    Durability, SqliteStore, SqliteStoreBuilder, APPLICATION_ID, MAX_BATCH, PAGE_SIZE_BYTES,
    SCHEMA_VERSION,
};
pub use url::{open, open_with, OpenOptions, StoreUrl};

/// Store operations fail with this.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    #[error("an execution with id {0} already exists")]
    Exists(ExecutionId),
    #[error(
        "execution {id} changed under this writer (the store holds sequence {found:?}, \
         the write expected {expected}); another process may be driving it"
    )]
    Conflict {
        id: ExecutionId,
        expected: u64,
        found: Option<u64>,
    },
    #[error("execution {0} does not exist")]
    NotFound(ExecutionId),
    #[error("{path} is not a sagatx journal ({reason}); point the store at a sagatx database or at a new file")]
    Foreign { path: String, reason: String },
    #[error("{path} was written by a newer sagatx (schema version {found}, this build knows up to {known}); upgrade sagatx")]
    FutureSchema {
        path: String,
        found: i64,
        known: i64,
    },
    #[error("cannot open the store at {path}: {reason}")]
    Open { path: String, reason: String },
    #[error("the journal entry of execution {id} cannot be read: {source}")]
    Corrupt {
        id: String,
        #[source]
        source: DecodeError,
    },
    #[error("store I/O failed: {0}")]
    Io(String),
    #[error("the store is closed")]
    Closed,
    #[error(
        "execution {0} was taken over by another process (this process's lease ran out); \
         this process no longer drives it"
    )]
    LeaseLost(ExecutionId),
}

/// A filter and a page position for [`Store::list`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ListQuery {
    pub status: Option<Status>,
    pub saga: Option<String>,
    /// At most this many items (the engine bounds it).
    pub limit: usize,
    /// From the previous page's `next_cursor`.
    pub cursor: Option<u64>,
}

/// One page of executions, newest first.
#[derive(Debug, Clone, Default)]
pub struct Page {
    pub items: Vec<Execution>,
    /// Pass back as `cursor` for the next page; `None` on the last page.
    pub next_cursor: Option<u64>,
}

/// A registered definition and its version.
#[derive(Debug, Clone, PartialEq)]
pub struct Registered {
    pub version: u32,
    /// `true` when this call created the version, `false` when an equal
    /// definition was already the latest.
    pub created: bool,
}

/// One entry of the operation log (grate.atomic): recorded before the
/// operation runs, finished after.
#[derive(Debug, Clone, PartialEq)]
pub struct OpRecord {
    pub id: u64,
    pub name: String,
    pub args: serde_json::Value,
    pub created_at_ms: u64,
}

/// Counts of executions, computed by the store (for the dashboard).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Summary {
    /// (saga, status, count), sorted by saga then status.
    pub counts: Vec<(String, Status, u64)>,
}

/// A paused execution and the time it paused, as
/// [`Store::paused_before`] lists them.
#[derive(Debug, Clone, PartialEq)]
pub struct Paused {
    /// The `updated_at_ms` of the write that made it `paused`; later writes
    /// that keep it paused (a reply to one of two callback steps) leave it.
    pub since_ms: u64,
    pub execution: Execution,
}

/// The journal of definitions and executions.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Registers a definition: an equal one (as canonical JSON) to the latest
    /// version gives that version back; a different one creates the next.
    async fn put_definition(&self, def: &SagaDefinition) -> Result<Registered, StoreError>;

    /// A definition by name, the given version or the latest.
    async fn get_definition(
        &self,
        name: &str,
        version: Option<u32>,
    ) -> Result<Option<(u32, SagaDefinition)>, StoreError>;

    /// Every saga name with its latest version, sorted by name.
    async fn list_definitions(&self) -> Result<Vec<(String, u32)>, StoreError>;

    /// Journals a transition. `ex.seq == 1` creates the execution (fails with
    /// [`StoreError::Exists`] if the id is taken); a larger `seq` replaces
    /// the state only if the store holds `seq - 1` ([`StoreError::Conflict`]
    /// otherwise). Returns once the write is durable.
    async fn append(&self, ex: &Execution) -> Result<(), StoreError>;

    /// One execution.
    async fn load(&self, id: ExecutionId) -> Result<Option<Execution>, StoreError>;

    /// A page of executions, newest first. An entry that cannot be decoded
    /// is skipped (and logged), not allowed to hide the others.
    async fn list(&self, query: &ListQuery) -> Result<Page, StoreError>;

    /// Ids of non-terminal executions with a due time at or before `now_ms`,
    /// earliest first.
    async fn due(&self, now_ms: u64, limit: usize) -> Result<Vec<ExecutionId>, StoreError>;

    /// A random 32-byte secret made when the store was created and kept
    /// with it: the key of the capabilities in reply URLs, so that every
    /// process on one store accepts the replies of the others.
    async fn secret(&self) -> Result<[u8; 32], StoreError>;

    /// Records an operation durably before it runs; returns its id.
    async fn op_record(
        &self,
        name: &str,
        args: &serde_json::Value,
        now_ms: u64,
    ) -> Result<u64, StoreError>;

    /// Marks an operation finished (`error` when it failed for good).
    /// Finishing an unknown or finished operation is a no-op.
    async fn op_finish(&self, id: u64, error: Option<&str>, now_ms: u64) -> Result<(), StoreError>;

    /// Operations recorded and not finished, oldest first, with an id above
    /// `after`.
    async fn op_pending(
        &self,
        after: Option<u64>,
        limit: usize,
    ) -> Result<Vec<OpRecord>, StoreError>;

    /// How many executions of each saga are in each status.
    async fn summary(&self) -> Result<Summary, StoreError>;

    /// Paused executions that paused at or before `before_ms` (the
    /// `updated_at_ms` of the write that made them `paused`; later writes
    /// that keep them paused do not move it), each with that time, the
    /// longest paused first, at most `limit`: the executions waiting too
    /// long on a reply or a commit, for the dashboard. The durable stores
    /// answer from an index of the paused executions alone, however many
    /// others they hold.
    async fn paused_before(&self, before_ms: u64, limit: usize) -> Result<Vec<Paused>, StoreError>;

    /// Every execution, oldest first, after `cursor` (for copying a store).
    async fn scan(&self, cursor: Option<u64>, limit: usize) -> Result<Page, StoreError>;

    /// Writes an execution as it is, whatever its `seq` (for copying a
    /// store); fails with [`StoreError::Exists`] if the id is taken.
    async fn import(&self, ex: &Execution) -> Result<(), StoreError>;

    /// Replaces the store's secret (for copying a store, so that the reply
    /// URLs already handed out keep working).
    async fn import_secret(&self, secret: [u8; 32]) -> Result<(), StoreError>;

    /// A page of executions that may have work under way (status `created`,
    /// `running` or `compensating`), oldest first, after `cursor`; for
    /// recovery. Undecodable entries are skipped and logged, as in `list`.
    async fn unfinished(&self, cursor: Option<u64>, limit: usize) -> Result<Page, StoreError>;

    /// Work sharing between processes: `Some` for a store that several
    /// processes use at once (PostgreSQL). A store without it belongs to
    /// one process (it refuses a second opener), which drives everything.
    fn leases(&self) -> Option<&dyn Leases> {
        None
    }
}

/// The outcome of [`Leases::claim`].
#[derive(Debug)]
pub enum Claim {
    /// This process holds the execution now: the state as it was claimed
    /// and the lease's epoch (for [`Leases::release`]).
    Mine { ex: Box<Execution>, epoch: u64 },
    /// Another process's lease on it is running.
    Held,
    /// No such execution.
    Missing,
}

/// An execution claimed by [`Leases::claim_due`].
#[derive(Debug)]
pub struct Claimed {
    pub ex: Execution,
    pub epoch: u64,
}

/// An operator's or a service's request about one execution, handed from
/// the process that received it to the process that drives the execution.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Command {
    Reply {
        step: usize,
        reply: sagatx_core::Reply,
    },
    Commit,
    Reject,
    Cancel,
    Retry,
}

/// What became of a forwarded [`Command`].
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "outcome", content = "message", rename_all = "snake_case")]
pub enum Outcome {
    Applied,
    NotFound,
    /// The command does not apply to the execution's state (HTTP 409).
    Conflict(String),
    Failed(String),
}

/// A forwarded command taken from the inbox by the process that holds the
/// execution.
#[derive(Debug)]
pub struct Inboxed {
    pub inbox_id: u64,
    pub execution: ExecutionId,
    pub command: Command,
}

/// Leases: how processes that share a store split the work so that no two
/// drive one execution at once.
///
/// A process claims an execution before it drives it, and the claim bumps
/// the execution's lease epoch; every journal write of the process carries
/// the epoch and fails with [`StoreError::LeaseLost`] once another process
/// has claimed the execution since. A process's leases last as long as
/// its heartbeat, so the work of a process that died (or stalled past its
/// lease time) is claimed by another once the heartbeat is that old. A terminal write and [`release`](Leases::release) give the
/// lease up at once.
#[async_trait]
pub trait Leases: Send + Sync {
    /// This process's owner id in the leases.
    fn owner(&self) -> uuid::Uuid;

    /// Claims one execution for this process: granted when no lease is on
    /// it, when the lease ran out, or when it is this process's own.
    async fn claim(&self, id: ExecutionId) -> Result<Claim, StoreError>;

    /// Claims executions that have work for a process: due ones nobody
    /// holds and those whose lease ran out (their process died or stalled);
    /// with `orphans`, also unheld ones that had work under way (copied in
    /// by a migration). At most about `limit` of each kind.
    async fn claim_due(
        &self,
        now_ms: u64,
        limit: usize,
        orphans: bool,
    ) -> Result<Vec<Claimed>, StoreError>;

    /// Journals a transition as [`Store::append`] does, under the lease of
    /// this `epoch`: fails with [`StoreError::LeaseLost`] when another
    /// claim replaced it. `seq == 1` creates the execution under a new
    /// lease of this process (epoch 1). A terminal write gives the lease
    /// up. ([`Store::append`] on a shared store
    /// writes under no lease: accepted while no other process holds the
    /// execution.)
    async fn append_leased(&self, ex: &Execution, epoch: u64) -> Result<(), StoreError>;

    /// Gives a lease up (the driver has nothing left to do), unless a later
    /// claim replaced it.
    async fn release(&self, id: ExecutionId, epoch: u64);

    /// How many other processes use the store now (seen within twice the
    /// lease time).
    async fn peers(&self) -> Result<usize, StoreError>;

    /// Gives up every lease of this process (at shutdown).
    async fn release_all(&self) -> Result<(), StoreError>;

    /// Leaves a command for the process that holds the execution and wakes
    /// it; returns the inbox entry's id.
    async fn forward(&self, id: ExecutionId, command: &Command) -> Result<u64, StoreError>;

    /// The outcome of a forwarded command, once its process answered
    /// (the entry is then removed).
    async fn forwarded(&self, inbox_id: u64) -> Result<Option<Outcome>, StoreError>;

    /// Takes the commands forwarded to executions this process holds.
    async fn take_inbox(&self, limit: usize) -> Result<Vec<Inboxed>, StoreError>;

    /// Answers a command taken with [`take_inbox`](Leases::take_inbox).
    async fn answer(&self, inbox_id: u64, outcome: &Outcome) -> Result<(), StoreError>;

    /// Wakes `wake` whenever work may have arrived for this process
    /// (a forwarded command, a reconnect after which the tables must be
    /// read again).
    fn subscribe(&self, wake: std::sync::Arc<tokio::sync::Notify>);
}

/// The statuses [`Store::unfinished`] returns.
pub(crate) fn may_have_work(s: Status) -> bool {
    matches!(s, Status::Created | Status::Running | Status::Compensating)
}

/// The latest definition version differs from `def`?
pub(crate) fn same_definition(a: &SagaDefinition, b: &SagaDefinition) -> bool {
    a.to_json() == b.to_json()
}
