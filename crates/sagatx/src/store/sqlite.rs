//! The embedded SQLite store, the default.
//!
//! - WAL mode; `synchronous=FULL` by default ([`Durability`]): a write is on
//!   disk when `append` returns.
//! - One write connection. A writer thread takes every write queued at the
//!   moment, applies them in one transaction and one fsync (group commit),
//!   then wakes each waiter. Throughput grows with concurrency.
//! - At low load the caller commits itself: a write with no other in
//!   flight (nor had the few before it), on a runtime of two workers or
//!   more, finding the writer thread idle, takes the connection and
//!   commits on its own thread (flat combining), so its latency is one
//!   fsync without two thread wake-ups. That blocks the calling thread (a
//!   tokio worker) for the commit, and only then; a write that meets any
//!   other goes to the writer thread.
//!   [`SqliteStoreBuilder::caller_commits`] turns it off.
//! - Reads use a small pool of separate connections on tokio's blocking pool.
//!
//! The file is marked with an `application_id`, so a foreign SQLite file is
//! refused instead of written to; `user_version` holds the schema version.
//! The format is described in `docs/journal-format.md`.

use crate::now_ms;
use crate::throttle::{CommitFailures, Throttle};
use std::borrow::Cow;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, TryLockError};
use std::thread;
use std::time::Duration;

use async_trait::async_trait;
use rusqlite::{params, CachedStatement, Connection, OpenFlags, OptionalExtension};
use sagatx_core::{Execution, ExecutionId, Name, SagaDefinition};
use tokio::sync::{mpsc, oneshot};
use uuid::Uuid;

use super::{ListQuery, Page, Paused, Registered, Store, StoreError};

/// `PRAGMA application_id` of a sagatx journal: "SgTx".
pub const APPLICATION_ID: i32 = 0x5367_5478;
/// The page size of a new journal. Every commit writes whole pages (to the
/// WAL, and again at the checkpoint), and a transition changes one row of
/// about 200 bytes: halving SQLite's default 4096 halves what a commit
/// that touches few rows writes. Measured (seventh session, A/B over four
/// runs each): bytes per 3-step saga 60 KB → 40 KB at concurrency 1,
/// 6.3 KB → 4.7 KB at 64, 2.1 KB → 1.8 KB at 1024; throughput the same
/// within the machine's noise; the recovery of 100,000 executions 7-15 %
/// slower (the trees are a level deeper). 1024 was tried before
/// compressed states and lost at high concurrency.
pub const PAGE_SIZE_BYTES: u32 = 2048;

/// `Store::paused_before`: the executions paused at or before `?1`,
/// longest paused first, from the `paused` table's index (`CROSS JOIN`
/// keeps SQLite to that order of the tables; a test checks the plan).
const PAUSED_BEFORE: &str = "SELECT e.n, e.id, e.created_at, e.state, p.since
     FROM paused p CROSS JOIN executions e ON e.n = p.n
     WHERE p.since <= ?1 ORDER BY p.since, p.n LIMIT ?2";
/// Execution `?1` paused at `?2` / is paused no more (written only when
/// its status changes to or from `paused`).
const PAUSE: &str = "INSERT OR REPLACE INTO paused (n, since) VALUES (?1, ?2)";
const UNPAUSE: &str = "DELETE FROM paused WHERE n = ?1";

/// The schema version this build writes (`PRAGMA user_version`).
pub const SCHEMA_VERSION: i64 = 8;
/// Writes applied in one transaction at most. A batch is what is queued
/// when the writer gets to it, so this only counts when more writes wait
/// than that: recovery resuming thousands of executions at once, or more
/// than a thousand callers. There a batch of 4,096 rewrites each page it
/// touches once for up to four times as many writes, and shares one fsync
/// among them: 100,000 executions recovered in 4.6-5.2 s against 5.6-5.9 s
/// with batches of 1,024 (A/B, the same binary, docs/benchmarks-log.md, tenth session).
pub const MAX_BATCH: usize = 4096;
/// Writes queued for the writer thread at most (back-pressure beyond).
pub const QUEUE_DEPTH: usize = 8192;
/// Read connections kept open at most.
pub const MAX_READERS: usize = 8;

/// Migrations (numbered SQL files under `migrations/sqlite`).
pub(crate) const MIGRATIONS: &[super::migrations::Migration] = &[
    super::migrations::Migration {
        version: 1,
        name: "executions",
        sql: include_str!("migrations/sqlite/0001_executions.sql"),
    },
    super::migrations::Migration {
        version: 2,
        name: "secret",
        sql: include_str!("migrations/sqlite/0002_secret.sql"),
    },
    super::migrations::Migration {
        version: 3,
        name: "oplog",
        sql: include_str!("migrations/sqlite/0003_oplog.sql"),
    },
    super::migrations::Migration {
        version: 4,
        name: "saga_status_index",
        sql: include_str!("migrations/sqlite/0004_saga_status_index.sql"),
    },
    super::migrations::Migration {
        version: 5,
        name: "counts",
        sql: include_str!("migrations/sqlite/0005_counts.sql"),
    },
    super::migrations::Migration {
        version: 6,
        name: "packed_states",
        sql: include_str!("migrations/sqlite/0006_packed_states.sql"),
    },
    super::migrations::Migration {
        version: 7,
        name: "relative_times",
        sql: include_str!("migrations/sqlite/0007_relative_times.sql"),
    },
    super::migrations::Migration {
        version: 8,
        name: "paused",
        sql: include_str!("migrations/sqlite/0008_paused.sql"),
    },
];

/// How hard a commit insists on reaching the disk.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum Durability {
    /// `synchronous=FULL`: durable across power loss once `append` returns.
    #[default]
    Full,
    /// `synchronous=NORMAL`: durable across a process crash; the last
    /// commits may be lost on power loss. Faster.
    Normal,
}

/// Opens a [`SqliteStore`] with settings.
#[derive(Debug, Clone)]
pub struct SqliteStoreBuilder {
    path: PathBuf,
    durability: Durability,
    caller_commits: bool,
}

impl SqliteStoreBuilder {
    pub fn durability(mut self, d: Durability) -> Self {
        self.durability = d;
        self
    }

    /// Whether a write made at low load may be committed by its caller, on
    /// the caller's thread, instead of by the writer thread (default
    /// `true`; the module's docs say when; never on a runtime of one
    /// thread, where a burst of writes would then commit one by one).
    /// Such a commit blocks the calling thread (a tokio worker) for one
    /// fsync: turn it off where the workers must never wait on the disk,
    /// say a server whose few workers answer requests that cannot wait,
    /// beside a disk that can stall.
    pub fn caller_commits(mut self, on: bool) -> Self {
        self.caller_commits = on;
        self
    }

    /// Opens (creating if needed) the journal file.
    pub fn open(self) -> Result<SqliteStore, StoreError> {
        SqliteStore::open_with(self)
    }
}

enum Write {
    Append {
        id: ExecutionId,
        /// Shared with the execution's state (a count, not a copy).
        saga: Name,
        status: &'static str,
        seq: u64,
        due_at: Option<u64>,
        created_at: u64,
        updated_at: u64,
        state: Vec<u8>,
        reply: oneshot::Sender<Result<(), StoreError>>,
    },
    Definition {
        def: Box<SagaDefinition>,
        now_ms: u64,
        reply: oneshot::Sender<Result<Registered, StoreError>>,
    },
    OpRecord {
        name: String,
        args: String,
        now_ms: u64,
        reply: oneshot::Sender<Result<u64, StoreError>>,
    },
    OpFinish {
        id: u64,
        error: Option<String>,
        now_ms: u64,
        reply: oneshot::Sender<Result<(), StoreError>>,
    },
}

impl Write {
    /// The write of `ex`'s state (packed), and where its outcome comes.
    fn append(
        ex: &Execution,
    ) -> Result<(Write, oneshot::Receiver<Result<(), StoreError>>), StoreError> {
        let (reply, rx) = oneshot::channel();
        let w = Write::Append {
            id: ex.id,
            saga: ex.saga.clone(),
            status: ex.status.as_str(),
            seq: ex.seq,
            due_at: ex.next_due_ms(),
            created_at: ex.created_at_ms,
            updated_at: ex.updated_at_ms,
            state: stored_state(ex)?,
            reply,
        };
        Ok((w, rx))
    }
}

/// The SQLite journal. Cheap to share behind an `Arc`.
pub struct SqliteStore {
    path: PathBuf,
    secret: Mutex<[u8; 32]>,
    writer: mpsc::Sender<Write>,
    /// Joined when the store is dropped (see `Drop`).
    writer_thread: Option<thread::JoinHandle<()>>,
    /// The write connection; the writer thread's, or a lone write's.
    core: Arc<Mutex<Core>>,
    /// Writes in flight, and how many began alone in a row.
    load: Load,
    /// See [`SqliteStoreBuilder::caller_commits`].
    caller_commits: bool,
    /// Commits made by their caller (see [`SqliteStore::commit_here`]).
    commits_here: AtomicU64,
    readers: Arc<Mutex<Vec<Connection>>>,
}

fn io(e: rusqlite::Error) -> StoreError {
    StoreError::Io(e.to_string())
}

fn display(path: &Path) -> String {
    path.display().to_string()
}

fn open_conn(path: &Path, flags: OpenFlags) -> Result<Connection, StoreError> {
    let conn = Connection::open_with_flags(path, flags).map_err(|e| StoreError::Open {
        path: display(path),
        reason: format!("{e}; check that the directory exists and that this user may write to it"),
    })?;
    conn.busy_timeout(Duration::from_secs(5)).map_err(io)?;
    Ok(conn)
}

/// Checks the file is ours (or new), brings its schema up to date.
fn prepare(conn: &mut Connection, path: &Path, durability: Durability) -> Result<(), StoreError> {
    let foreign = |reason: String| StoreError::Foreign {
        path: display(path),
        reason,
    };
    // Reading the header is the first thing to fail on a file that is not
    // SQLite at all.
    let app_id: i32 = conn
        .query_row("PRAGMA application_id", [], |r| r.get(0))
        .map_err(|e| foreign(e.to_string()))?;
    let tables: i64 = conn
        .query_row("SELECT count(*) FROM sqlite_master", [], |r| r.get(0))
        .map_err(|e| foreign(e.to_string()))?;
    if app_id != APPLICATION_ID && !(app_id == 0 && tables == 0) {
        return Err(foreign(format!(
            "it is a SQLite database of something else (application_id {app_id:#x}, {tables} schema objects)"
        )));
    }
    if tables == 0 {
        // A new journal: its page size is set before anything is written
        // (it cannot change afterwards in WAL mode; older files keep 4096).
        conn.execute_batch(&format!("PRAGMA page_size={PAGE_SIZE_BYTES};"))
            .map_err(io)?;
    }
    let mode: String = conn
        .query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))
        .map_err(|e| StoreError::Open {
            path: display(path),
            reason: format!("cannot switch to WAL mode: {e}"),
        })?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(StoreError::Open {
            path: display(path),
            reason: format!("the file system refused WAL mode (got {mode})"),
        });
    }
    let sync = match durability {
        Durability::Full => "FULL",
        Durability::Normal => "NORMAL",
    };
    conn.execute_batch(&format!("PRAGMA synchronous={sync};"))
        .map_err(io)?;
    let version: i64 = conn
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .map_err(io)?;
    const _: () = assert!(super::migrations::latest(MIGRATIONS) == SCHEMA_VERSION);
    for m in super::migrations::pending(MIGRATIONS, version, &display(path))? {
        let tx = conn.transaction().map_err(|e| StoreError::Open {
            path: display(path),
            reason: e.to_string(),
        })?;
        tx.execute_batch(m.sql).map_err(|e| StoreError::Open {
            path: display(path),
            reason: format!("migration {} ({}) failed: {e}", m.version, m.name),
        })?;
        tx.execute_batch(&format!(
            "PRAGMA application_id={APPLICATION_ID}; PRAGMA user_version={};",
            m.version
        ))
        .map_err(io)?;
        tx.commit().map_err(|e| StoreError::Open {
            path: display(path),
            reason: format!("migration {} could not be committed: {e}", m.version),
        })?;
    }
    Ok(())
}

/// Locks `<file>.lock` so that no other process (or store in this one)
/// drives the same journal: two would call the same steps twice.
fn take_lock(path: &Path) -> Result<std::fs::File, StoreError> {
    let mut name = path.as_os_str().to_owned();
    name.push(".lock");
    let lock_path = PathBuf::from(name);
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(|e| StoreError::Open {
            path: display(path),
            reason: format!(
                "cannot create {}: {e}; check that the directory exists and that this user may write to it",
                lock_path.display()
            ),
        })?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => Err(StoreError::Open {
            path: display(path),
            reason: "another sagatx process (or store) has this journal open; stop it first, \
                     or give this one another file"
                .into(),
        }),
        Err(std::fs::TryLockError::Error(e)) => Err(StoreError::Open {
            path: display(path),
            reason: format!("cannot lock {}: {e}", lock_path.display()),
        }),
    }
}

/// Dropping the store closes the writer's queue and waits for the writer
/// thread to commit what was queued and end: the journal's lock goes with
/// the thread's connection, so once the drop returns the journal is
/// closed, everything its callers were told is in, and it can be opened
/// again at once (by this process or another). Waits at most for one
/// queue's worth of writes (`QUEUE_DEPTH`, 8,192).
impl Drop for SqliteStore {
    fn drop(&mut self) {
        let (closed, _) = mpsc::channel(1);
        drop(std::mem::replace(&mut self.writer, closed));
        if let Some(t) = self.writer_thread.take() {
            // A writer thread that panicked has nothing left to commit.
            let _ = t.join();
        }
    }
}

impl SqliteStore {
    /// Settings for the journal at `path`.
    pub fn builder(path: impl AsRef<Path>) -> SqliteStoreBuilder {
        SqliteStoreBuilder {
            path: path.as_ref().to_path_buf(),
            durability: Durability::Full,
            caller_commits: true,
        }
    }

    /// Opens (creating if needed) the journal at `path` with full durability.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, StoreError> {
        Self::builder(path).open()
    }

    fn open_with(settings: SqliteStoreBuilder) -> Result<Self, StoreError> {
        Self::open_unhinted(settings).map_err(full_disk_hint)
    }

    fn open_unhinted(settings: SqliteStoreBuilder) -> Result<Self, StoreError> {
        let SqliteStoreBuilder {
            path,
            durability,
            caller_commits,
        } = settings;
        let lock = take_lock(&path)?;
        let mut conn = open_conn(
            &path,
            OpenFlags::SQLITE_OPEN_READ_WRITE
                | OpenFlags::SQLITE_OPEN_CREATE
                | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        prepare(&mut conn, &path, durability)?;
        let blob: Vec<u8> = conn
            .query_row("SELECT value FROM meta WHERE key = 'secret'", [], |r| {
                r.get(0)
            })
            .map_err(io)?;
        let secret: [u8; 32] = blob
            .as_slice()
            .try_into()
            .map_err(|_| StoreError::Foreign {
                path: display(&path),
                reason: format!("its secret is {} bytes, not 32", blob.len()),
            })?;
        // Statements stay in the connection's cache (begin, the writes,
        // the counts, commit, and a few for rarer writes); preparing them
        // here says now, not at the first write, if one cannot be.
        conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
        Statements::check(&conn).map_err(|e| StoreError::Open {
            path: display(&path),
            reason: format!("cannot prepare the journal's statements: {e}"),
        })?;
        let (tx, rx) = mpsc::channel(QUEUE_DEPTH);
        let committed = start_checkpointer(&path)?;
        let core = Arc::new(Mutex::new(Core {
            conn,
            rows: Rows::default(),
            failures: CommitFailures::new(path.display().to_string()),
            committed,
            path: path.clone(),
            _lock: lock,
        }));
        let writer_core = core.clone();
        let writer_thread = thread::Builder::new()
            .name("sagatx-sqlite-writer".into())
            .spawn(move || writer(writer_core, rx))
            .map_err(|e| StoreError::Open {
                path: display(&path),
                reason: format!("cannot start the writer thread: {e}"),
            })?;
        Ok(SqliteStore {
            path,
            secret: Mutex::new(secret),
            writer: tx,
            writer_thread: Some(writer_thread),
            core,
            load: Load::default(),
            caller_commits,
            commits_here: AtomicU64::new(0),
            readers: Arc::new(Mutex::new(Vec::new())),
        })
    }

    /// The journal file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// How many commits so far were made by a write's own caller rather
    /// than by the writer thread (see [`SqliteStoreBuilder::caller_commits`]):
    /// a diagnostic, for tests and for judging the setting.
    pub fn commits_by_callers(&self) -> u64 {
        self.commits_here.load(Ordering::Relaxed)
    }

    /// Runs `f` with a read connection on the blocking pool.
    async fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let readers = self.readers.clone();
        let path = self.path.clone();
        tokio::task::spawn_blocking(move || {
            let pooled = readers.lock().unwrap_or_else(|p| p.into_inner()).pop();
            let conn = match pooled {
                Some(c) => c,
                None => open_conn(
                    &path,
                    OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
                )?,
            };
            let out = f(&conn);
            let mut pool = readers.lock().unwrap_or_else(|p| p.into_inner());
            if pool.len() < MAX_READERS {
                pool.push(conn);
            }
            out
        })
        .await
        .map_err(|e| StoreError::Io(format!("read task failed: {e}")))?
    }

    /// Has `w` committed and answers what its writer answered on `rx`:
    /// committed here when it is alone (see [`SqliteStore::commit_here`]),
    /// otherwise queued for the writer thread.
    async fn submit<T>(
        &self,
        w: Write,
        rx: oneshot::Receiver<Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        let in_flight = InFlight::enter(&self.load);
        if let Some(w) = self.commit_here(w, in_flight.lone) {
            self.writer.send(w).await.map_err(|_| StoreError::Closed)?;
        }
        let answer = rx.await.map_err(|_| StoreError::Closed)?;
        drop(in_flight);
        answer
    }

    /// Commits `w` on this thread when the load is low (`lone`: no other
    /// write in flight, nor when the last [`LONE_STREAK`] began), the
    /// runtime has other workers ([`other_workers`]) and the writer thread
    /// is idle (flat combining): that saves the
    /// two thread wake-ups of a hand-off (the tokio worker that waits for
    /// the writer thread parks on a virtual CPU that halts, and waking it
    /// took p50 31 µs a commit here; docs/benchmarks-log.md, twelfth session).
    /// Otherwise gives `w` back, for the writer thread: under load, writes
    /// share its batches and their fsyncs. The commit blocks this thread
    /// for one fsync; the lock is only tried, never waited for.
    fn commit_here(&self, w: Write, lone: bool) -> Option<Write> {
        if !lone
            || !self.caller_commits
            || self.writer.capacity() < self.writer.max_capacity()
            || !other_workers()
        {
            return Some(w);
        }
        let mut core = match self.core.try_lock() {
            Ok(core) => core,
            // A commit that panicked left no transaction open (the
            // transaction's guard rolls back as it unwinds).
            Err(TryLockError::Poisoned(p)) => p.into_inner(),
            Err(TryLockError::WouldBlock) => return Some(w),
        };
        let mut w = w;
        let outcome = core.commit(std::slice::from_mut(&mut w), true);
        drop(core);
        answer([w], outcome);
        self.commits_here.fetch_add(1, Ordering::Relaxed);
        None
    }
}

/// Whether the calling task runs on a runtime with other workers beside
/// its own. On one thread (a current-thread runtime, or a multi-thread one
/// with one worker, as tokio makes on a machine of one CPU), a caller that
/// commits never yields, so the next task's write always finds itself
/// alone and commits alone too: a burst of a thousand writes would take a
/// thousand fsyncs instead of sharing one. With a second worker, writes
/// made there meanwhile are seen in flight, and go to the writer thread.
fn other_workers() -> bool {
    tokio::runtime::Handle::try_current().is_ok_and(|h| {
        h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread
            && h.metrics().num_workers() >= 2
    })
}

/// A write is committed by its caller only when it and the
/// `LONE_STREAK` writes before it each began with no other in flight: a
/// sign of low load, not of a lull between busy moments. With no streak
/// (any write alone), the coordinator at http concurrency 16 often met a
/// write alone while its workers had requests to serve, and the worker
/// blocked in the fsync served none (docs/benchmarks-log.md, fourteenth session).
const LONE_STREAK: u32 = 8;

/// The store's write load, as [`InFlight`] counts it.
#[derive(Default)]
struct Load {
    in_flight: AtomicUsize,
    /// Writes that began alone in a row (saturating).
    lone: AtomicU32,
}

/// Counts a write in flight while it lives.
struct InFlight<'a> {
    load: &'a Load,
    /// This write and the [`LONE_STREAK`] before it began alone.
    lone: bool,
}

impl<'a> InFlight<'a> {
    fn enter(load: &'a Load) -> Self {
        // Relaxed: a heuristic; two writes beginning at once may both
        // count as alone, and then one finds the connection taken.
        let before = load.in_flight.fetch_add(1, Ordering::Relaxed);
        let streak = if before == 0 {
            load.lone
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                    Some(n.saturating_add(1))
                })
                .unwrap_or(0)
                .saturating_add(1)
        } else {
            load.lone.store(0, Ordering::Relaxed);
            0
        };
        InFlight {
            load,
            lone: streak > LONE_STREAK,
        }
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.load.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// How long the checkpointer lets commits gather after one before it
/// copies them into the database (see [`checkpointer`]).
pub const CHECKPOINT_DELAY: Duration = Duration::from_millis(20);

/// Executions the writer remembers at most (see [`Rows`]).
const ROWS_REMEMBERED: usize = 65_536;

/// The row number and status of the executions the writer wrote lately, so
/// that a transition updates its row by row number (no search of the id
/// index) and sets the status only when it changed, in one statement. Only
/// a hint: every update also checks the sequence, and the status it leaves
/// alone, so a wrong entry costs a second statement, never a wrong row.
/// Terminal executions are forgotten; past [`ROWS_REMEMBERED`] entries (many
/// executions waiting) it starts afresh, so it stays small.
#[derive(Default)]
struct Rows(crate::idmap::IdMap<(i64, &'static str)>);

impl Rows {
    fn note(&mut self, id: ExecutionId, n: i64, status: &'static str) {
        if TERMINAL.contains(&status) {
            self.0.remove(&id);
            return;
        }
        if self.0.len() >= ROWS_REMEMBERED {
            self.0.clear();
        }
        self.0.insert(id, (n, status));
    }
}

const TERMINAL: [&str; 3] = ["completed", "compensated", "failed"];

/// The write connection and what goes with it, behind one lock: the
/// writer thread takes it for each batch, a lone write to commit itself
/// ([`SqliteStore::commit_here`]).
struct Core {
    conn: Connection,
    rows: Rows,
    failures: CommitFailures,
    /// Signals the checkpointer after each commit.
    committed: std::sync::mpsc::SyncSender<()>,
    path: PathBuf,
    /// An exclusive lock on `<file>.lock`: one process drives one journal.
    /// Held with the connection, so it goes with the last of its owners
    /// (the store and the writer thread), after the writer's last batch:
    /// another process must not open the journal before that batch is in.
    /// Last, so that it goes after the connection.
    _lock: std::fs::File,
}

impl Core {
    /// Applies `batch` in one transaction. The outcome is for [`answer`],
    /// once the lock is given back (a waiter woken while it is held would
    /// find the connection taken). `here`: the batch's one write is
    /// committed by its caller.
    fn commit(&mut self, batch: &mut [Write], here: bool) -> Result<Vec<Done>, String> {
        let started = std::time::Instant::now();
        let n = batch.len();
        let span = tracing::debug_span!("store_commit", store = "sqlite", batch = n, here);
        let outcome = span.in_scope(|| apply_batch(&self.conn, batch, &mut self.rows));
        let elapsed = started.elapsed();
        // Labelled by who committed: the writer thread, or a lone write's
        // caller (`SqliteStoreBuilder::caller_commits`). Each with its
        // literal label, so that the macro's key is a constant (a label
        // chosen at run time is a key built, and allocated, per commit).
        let seconds = if here {
            metrics::histogram!("sagatx_store_commit_seconds", "by" => "caller")
        } else {
            metrics::histogram!("sagatx_store_commit_seconds", "by" => "writer")
        };
        seconds.record(elapsed.as_secs_f64());
        metrics::histogram!("sagatx_store_batch_size").record(n as f64);
        tracing::trace!(
            batch = n,
            here,
            elapsed_us = elapsed.as_micros() as u64,
            "group commit"
        );
        match outcome {
            Ok(results) => {
                self.failures.succeeded(std::time::Instant::now());
                // Wakes the checkpointer unless a signal already waits
                // (or it ended: the writer's own checkpoints remain).
                let _ = self.committed.try_send(());
                Ok(results)
            }
            Err(e) => {
                // What it noted was rolled back.
                self.rows.0.clear();
                let e = commit_error(&self.path, &e);
                self.failures.failed(&e, std::time::Instant::now());
                Err(e)
            }
        }
    }
}

/// Answers each write of a batch with the outcome of its commit.
fn answer(batch: impl IntoIterator<Item = Write>, outcome: Result<Vec<Done>, String>) {
    match outcome {
        Ok(results) => {
            for (w, r) in batch.into_iter().zip(results) {
                reply(w, r);
            }
        }
        Err(e) => {
            for w in batch {
                reply_err(w, StoreError::Io(e.clone()));
            }
        }
    }
}

/// The writer thread: each batch is what is queued when it gets to it.
/// It ends when the store (the queue's sender) is dropped.
fn writer(core: Arc<Mutex<Core>>, mut rx: mpsc::Receiver<Write>) {
    let mut batch: Vec<Write> = Vec::with_capacity(MAX_BATCH);
    while let Some(first) = rx.blocking_recv() {
        batch.push(first);
        let outcome = {
            // Waits while a lone write commits itself; what queued
            // meanwhile joins this batch.
            let mut core = core.lock().unwrap_or_else(|p| p.into_inner());
            while batch.len() < MAX_BATCH {
                match rx.try_recv() {
                    Ok(w) => batch.push(w),
                    Err(_) => break,
                }
            }
            core.commit(&mut batch, false)
        };
        answer(batch.drain(..), outcome);
    }
}

/// Starts the journal's checkpointer thread; the sender is the writer's,
/// to signal each commit, and its end (the writer's) ends the thread.
fn start_checkpointer(path: &Path) -> Result<std::sync::mpsc::SyncSender<()>, StoreError> {
    let conn = open_conn(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    let thread_path = path.to_path_buf();
    thread::Builder::new()
        .name("sagatx-sqlite-checkpointer".into())
        .spawn(move || checkpointer(conn, rx, thread_path))
        .map_err(|e| StoreError::Open {
            path: display(path),
            reason: format!("cannot start the checkpointer thread: {e}"),
        })?;
    Ok(tx)
}

/// Copies committed WAL frames into the database on a thread of its own,
/// a [`CHECKPOINT_DELAY`] after a commit, so that the writer seldom does.
///
/// SQLite checkpoints in the committing thread: every 1,000 frames a
/// commit also copies them into the database and fsyncs it, and every
/// execution waiting on the writer waits through that. A passive
/// checkpoint here takes no write lock, so commits go on while it copies. The writer keeps its own
/// automatic checkpoint, which then finds the frames already copied and
/// has little left to do; it is also what lets the WAL start again from
/// its beginning (only a writer that finds every frame copied does that),
/// so the WAL stays as small as before. Measured (A/B, two runs each,
/// http workload): concurrency 64 p99 15.0-15.4 ms → 11.6-12.5 ms and
/// 6,581-7,481 → 7,932-8,357 sagas/s; the sqlite workload unchanged.
/// A checkpoint that fails (busy with the writer's own, a full disk) is
/// only logged: the frames stay in the WAL, durable, for the next one.
///
/// Never inlined into its thread's closure: `bench/server-instructions.sh`
/// finds the thread's instructions by this function's name.
#[inline(never)]
fn checkpointer(conn: Connection, commits: std::sync::mpsc::Receiver<()>, path: PathBuf) {
    // A checkpoint that keeps failing is reported once a minute, not after
    // every commit.
    let warn = Throttle::new(Duration::from_secs(60));
    while commits.recv().is_ok() {
        thread::sleep(CHECKPOINT_DELAY);
        // The commits made while it slept are in this checkpoint.
        while commits.try_recv().is_ok() {}
        let done: rusqlite::Result<(i64, i64, i64)> =
            conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?))
            });
        match done {
            Ok((_, frames, copied)) => {
                tracing::trace!(frames, copied, "checkpoint");
            }
            Err(rusqlite::Error::SqliteFailure(e, _))
                if e.code == rusqlite::ErrorCode::DatabaseBusy =>
            {
                tracing::trace!("checkpoint skipped: another one runs");
            }
            Err(e) => {
                if warn.ready(std::time::Instant::now()).is_some() {
                    tracing::warn!(path = %path.display(), error = %e, "checkpoint failed; the writer's own checkpoints go on");
                } else {
                    tracing::debug!(error = %e, "checkpoint failed again");
                }
            }
        }
    }
}

/// A store that cannot be opened because its disk is full says so, and
/// what to do: SQLite's own message ("database or disk is full", its text
/// for `SQLITE_FULL`) comes from wherever opening stopped (the switch to
/// WAL, a migration, …).
fn full_disk_hint(e: StoreError) -> StoreError {
    const FULL: &str = "database or disk is full";
    match e {
        StoreError::Open { path, reason } if reason.contains(FULL) => StoreError::Open {
            reason: format!("{reason}; the disk that holds it is full: free space on it"),
            path,
        },
        StoreError::Io(m) if m.contains(FULL) => StoreError::Io(format!(
            "{m}; the disk that holds the journal is full: free space on it"
        )),
        e => e,
    }
}

/// What a failed commit tells its writers (and the log): SQLite's error,
/// or, when the disk is full, which disk and what to do.
fn commit_error(path: &Path, e: &rusqlite::Error) -> String {
    match e {
        rusqlite::Error::SqliteFailure(f, _) if f.code == rusqlite::ErrorCode::DiskFull => {
            format!(
                "the disk that holds {} is full; free space on it ({e})",
                path.display()
            )
        }
        _ => e.to_string(),
    }
}

/// Per-write results of one batch; `Err` when the whole transaction failed.
enum Done {
    Appended(Result<(), StoreError>),
    Defined(Result<Registered, StoreError>),
    OpRecorded(u64),
}

fn reply(w: Write, r: Done) {
    // A waiter that went away (its task was cancelled) no longer cares.
    match (w, r) {
        (Write::Append { reply, .. }, Done::Appended(r)) => {
            let _ = reply.send(r);
        }
        (Write::Definition { reply, .. }, Done::Defined(r)) => {
            let _ = reply.send(r);
        }
        (Write::OpRecord { reply, .. }, Done::OpRecorded(id)) => {
            let _ = reply.send(Ok(id));
        }
        (Write::OpFinish { reply, .. }, Done::Appended(r)) => {
            let _ = reply.send(r);
        }
        (w, _) => reply_err(w, StoreError::Io("internal: mismatched reply".into())),
    }
}

fn reply_err(w: Write, e: StoreError) {
    match w {
        Write::Append { reply, .. } => {
            let _ = reply.send(Err(e));
        }
        Write::Definition { reply, .. } => {
            let _ = reply.send(Err(e));
        }
        Write::OpRecord { reply, .. } => {
            let _ = reply.send(Err(e));
        }
        Write::OpFinish { reply, .. } => {
            let _ = reply.send(Err(e));
        }
    }
}

fn apply_batch(
    conn: &Connection,
    batch: &mut [Write],
    rows: &mut Rows,
) -> Result<Vec<Done>, rusqlite::Error> {
    let mut st = Statements::new(conn);
    let tx = Immediate::begin(conn, st.get(Sql::Begin)?)?;
    let mut out = Vec::with_capacity(batch.len());
    let mut counts = Counts::default();
    for w in batch.iter() {
        match w {
            Write::Append {
                id,
                saga,
                status,
                seq,
                due_at,
                created_at,
                updated_at,
                state,
                ..
            } => {
                let idb = id.0.as_bytes().as_slice();
                let due = due_at.map(|d| d as i64);
                if *seq == 1 {
                    let n = st.get(Sql::Insert)?.execute(params![
                        idb,
                        saga.as_str(),
                        status,
                        due,
                        *created_at as i64,
                        *updated_at as i64,
                        state
                    ])?;
                    out.push(Done::Appended(if n == 1 {
                        let row = tx.last_insert_rowid();
                        rows.note(*id, row, status);
                        counts.add(saga, status, 1);
                        if *status == PAUSED {
                            tx.prepare_cached(PAUSE)?
                                .execute(params![row, *updated_at as i64])?;
                        }
                        Ok(())
                    } else {
                        Err(StoreError::Exists(*id))
                    }));
                    continue;
                }
                // The row is updated by its number, on the condition that
                // it holds the sequence before this write and the status
                // the writer believes it has: a remembered row (a hint)
                // first, else (or when the hint was wrong) the row as read.
                // The status is assigned only when it changes (assigning a
                // column rewrites its index entries even when the value is
                // the same), and a change moves one count of the summary.
                // Each statement binds only what it reads (a bind costs the
                // writer about 240 instructions; the same-status update
                // binds 7 values, the other 8).
                let update = |st: &mut Statements<'_>, row: i64, was: &str| {
                    let (seq, updated_at, created_at) =
                        (*seq as i64, *updated_at as i64, *created_at as i64);
                    // `created_at`: the time the state's times are written
                    // after (store/pack.rs), set with the state it goes with.
                    if was == *status {
                        st.get(Sql::SameByRow)?
                            .execute(params![row, seq, due, updated_at, state, created_at, was])
                    } else {
                        st.get(Sql::NewByRow)?.execute(params![
                            row, seq, due, updated_at, state, created_at, was, status
                        ])
                    }
                };
                let mut done: Option<(i64, Cow<'static, str>)> = None;
                if let Some((row, was)) = rows.0.get(id).copied() {
                    if update(&mut st, row, was)? == 1 {
                        done = Some((row, Cow::Borrowed(was)));
                    }
                }
                if done.is_none() {
                    let found: Option<(i64, String)> = st
                        .get(Sql::FindRow)?
                        .query_row([idb], |r| Ok((r.get(0)?, r.get(1)?)))
                        .optional()?;
                    if let Some((row, was)) = found {
                        if update(&mut st, row, &was)? == 1 {
                            done = Some((row, Cow::Owned(was)));
                        }
                    }
                }
                match done {
                    Some((row, was)) => {
                        if was != *status {
                            counts.add(saga, &was, -1);
                            counts.add(saga, status, 1);
                            if *status == PAUSED {
                                tx.prepare_cached(PAUSE)?
                                    .execute(params![row, *updated_at as i64])?;
                            } else if was == PAUSED {
                                tx.prepare_cached(UNPAUSE)?.execute([row])?;
                            }
                        }
                        rows.note(*id, row, status);
                        out.push(Done::Appended(Ok(())));
                    }
                    None => {
                        let found: Option<i64> = tx
                            .prepare_cached("SELECT seq FROM executions WHERE id = ?1")?
                            .query_row([idb], |r| r.get(0))
                            .optional()?;
                        out.push(Done::Appended(Err(StoreError::Conflict {
                            id: *id,
                            expected: seq - 1,
                            found: found.map(|s| s as u64),
                        })));
                    }
                }
            }
            Write::OpRecord {
                name, args, now_ms, ..
            } => {
                tx.prepare_cached(
                    "INSERT INTO oplog (name, args, created_at) VALUES (?1, ?2, ?3)",
                )?
                .execute(params![name, args, *now_ms as i64])?;
                out.push(Done::OpRecorded(tx.last_insert_rowid() as u64));
            }
            Write::OpFinish {
                id, error, now_ms, ..
            } => {
                tx.prepare_cached(
                    "UPDATE oplog SET finished_at = ?2, error = ?3 WHERE id = ?1 AND finished_at IS NULL",
                )?
                .execute(params![*id as i64, *now_ms as i64, error])?;
                out.push(Done::Appended(Ok(())));
            }
            Write::Definition { def, now_ms, .. } => {
                let body = def.to_json();
                let latest: Option<(i64, String)> = tx
                    .prepare_cached(
                        "SELECT version, body FROM definitions WHERE name = ?1 ORDER BY version DESC LIMIT 1",
                    )?
                    .query_row([&def.name], |r| Ok((r.get(0)?, r.get(1)?)))
                    .optional()?;
                let same = latest.as_ref().and_then(|(_, b)| {
                    serde_json::from_str::<serde_json::Value>(b)
                        .ok()
                        .map(|v| v == body)
                });
                match (latest, same) {
                    (Some((v, _)), Some(true)) => out.push(Done::Defined(Ok(Registered {
                        version: v as u32,
                        created: false,
                    }))),
                    (latest, _) => {
                        let v = latest.map(|(v, _)| v).unwrap_or(0) + 1;
                        tx.prepare_cached(
                            "INSERT INTO definitions (name, version, body, created_at) VALUES (?1, ?2, ?3, ?4)",
                        )?
                        .execute(params![def.name, v, body.to_string(), *now_ms as i64])?;
                        out.push(Done::Defined(Ok(Registered {
                            version: v as u32,
                            created: true,
                        })));
                    }
                }
            }
        }
    }
    counts.write(&mut st)?;
    tx.commit(st.get(Sql::Commit)?)?;
    Ok(out)
}

/// A write transaction whose `BEGIN IMMEDIATE` and `COMMIT` are the
/// writer's prepared statements (rusqlite's `Transaction` parses both at
/// every batch: at concurrency 1, eight statements parsed per saga, 2 % of
/// the server's instructions). Dropped without [`Immediate::commit`], or
/// when the commit failed, it rolls back.
struct Immediate<'c> {
    conn: &'c Connection,
}

impl<'c> Immediate<'c> {
    fn begin(conn: &'c Connection, begin: &mut rusqlite::Statement<'_>) -> rusqlite::Result<Self> {
        begin.execute([])?;
        Ok(Immediate { conn })
    }

    fn commit(self, commit: &mut rusqlite::Statement<'_>) -> rusqlite::Result<()> {
        commit.execute([])?;
        Ok(())
    }
}

impl std::ops::Deref for Immediate<'_> {
    type Target = Connection;
    fn deref(&self) -> &Connection {
        self.conn
    }
}

impl Drop for Immediate<'_> {
    fn drop(&mut self) {
        // Still in the transaction: it was not committed, or its commit
        // failed (a full disk, say). What it wrote is undone, as
        // rusqlite's `Transaction` does; a failing rollback leaves
        // nothing more to do here (the next batch's BEGIN reports it).
        if !self.conn.is_autocommit() {
            let _ = self.conn.execute_batch("ROLLBACK");
        }
    }
}

/// The changes a batch makes to the summary's counts by saga and status,
/// written once at its end (a few rows, however many writes it holds).
/// A batch usually meets a handful of (saga, status) pairs: they are
/// searched in a short list (two string comparisons each), where hashing
/// both names twice per change cost the writer thread about 1,200
/// instructions a change of status. Past [`FEW_PAIRS`] pairs (a batch of
/// many sagas) the rest go to maps keyed by saga, then status, so that no
/// batch pays more than that list's length a change. A key is copied only
/// the first time the batch meets it.
#[derive(Default)]
struct Counts {
    few: Vec<(String, String, i64)>,
    many: std::collections::HashMap<String, std::collections::HashMap<String, i64>>,
}

/// The (saga, status) pairs a batch keeps in [`Counts`]'s short list.
const FEW_PAIRS: usize = 16;

impl Counts {
    fn add(&mut self, saga: &str, status: &str, by: i64) {
        if let Some(pair) = self
            .few
            .iter_mut()
            .find(|(s, st, _)| s == saga && st == status)
        {
            pair.2 += by;
            return;
        }
        if self.few.len() < FEW_PAIRS {
            self.few.push((saga.to_string(), status.to_string(), by));
            return;
        }
        let statuses = match self.many.get_mut(saga) {
            Some(m) => m,
            None => self.many.entry(saga.to_string()).or_default(),
        };
        match statuses.get_mut(status) {
            Some(n) => *n += by,
            None => {
                statuses.insert(status.to_string(), by);
            }
        }
    }

    /// Every pair the batch met, with its change (zero included).
    fn changes(&self) -> impl Iterator<Item = (&str, &str, i64)> {
        let few = self
            .few
            .iter()
            .map(|(saga, status, by)| (saga.as_str(), status.as_str(), *by));
        let many = self.many.iter().flat_map(|(saga, statuses)| {
            statuses
                .iter()
                .map(move |(status, by)| (saga.as_str(), status.as_str(), *by))
        });
        few.chain(many)
    }

    /// Adds the changes with `add` (the [`ADD_TO_COUNT`] statement).
    fn write(&self, st: &mut Statements<'_>) -> rusqlite::Result<()> {
        for (saga, status, by) in self.changes().filter(|(_, _, by)| *by != 0) {
            st.get(Sql::AddToCount)?
                .execute(params![saga, status, by])?;
        }
        Ok(())
    }
}

const ADD_TO_COUNT: &str = "INSERT INTO counts (saga, status, n) VALUES (?1, ?2, ?3)
     ON CONFLICT (saga, status) DO UPDATE SET n = n + excluded.n";

const INSERT_EXECUTION: &str =
    "INSERT INTO executions (id, saga, status, seq, due_at, created_at, updated_at, state)
     VALUES (?1, ?2, ?3, 1, ?4, ?5, ?6, ?7) ON CONFLICT (id) DO NOTHING";
/// Both updates: `?1` row, `?2` the new sequence (the row must hold the
/// one before), `?3` due_at, `?4` updated_at, `?5` state, `?6` created_at,
/// `?7` the status the row must hold; the second also `?8` the new status.
const UPDATE_SAME_STATUS_BY_ROW: &str =
    "UPDATE executions SET seq = ?2, due_at = ?3, updated_at = ?4, state = ?5, created_at = ?6
     WHERE n = ?1 AND seq = ?2 - 1 AND status = ?7";
const UPDATE_NEW_STATUS_BY_ROW: &str =
    "UPDATE executions SET seq = ?2, due_at = ?3, updated_at = ?4, state = ?5, created_at = ?6,
                           status = ?8
     WHERE n = ?1 AND seq = ?2 - 1 AND status = ?7";

const FIND_ROW: &str = "SELECT n, status FROM executions WHERE id = ?1";

/// `Status::Paused` as the `status` column holds it.
const PAUSED: &str = "paused";

/// The statements of nearly every batch.
#[derive(Clone, Copy)]
enum Sql {
    Begin,
    Commit,
    Insert,
    SameByRow,
    NewByRow,
    FindRow,
    AddToCount,
}

impl Sql {
    const ALL: [Sql; 7] = [
        Sql::Begin,
        Sql::Commit,
        Sql::Insert,
        Sql::SameByRow,
        Sql::NewByRow,
        Sql::FindRow,
        Sql::AddToCount,
    ];

    fn text(self) -> &'static str {
        match self {
            Sql::Begin => "BEGIN IMMEDIATE",
            Sql::Commit => "COMMIT",
            Sql::Insert => INSERT_EXECUTION,
            Sql::SameByRow => UPDATE_SAME_STATUS_BY_ROW,
            Sql::NewByRow => UPDATE_NEW_STATUS_BY_ROW,
            Sql::FindRow => FIND_ROW,
            Sql::AddToCount => ADD_TO_COUNT,
        }
    }
}

/// Statements kept in the write connection's cache at most: [`Sql`]'s,
/// and the rarer writes' (definitions, the operation log, a conflict's
/// sequence), with room to spare (rusqlite keeps 16 by default; one
/// pushed out would be parsed again at its next use).
const STATEMENT_CACHE: usize = 32;

/// A batch's statements, each taken from the connection's cache the first
/// time the batch uses it and given back when the batch ends. The
/// statements live in the connection (prepared once, at open), not in a
/// thread: the writer thread and a lone write's caller commit on one
/// connection in turn. A take hashes the SQL text and a give-back hashes
/// it again (about 1,600 instructions the pair; the ninth session
/// measured four pairs a commit at 26,000 of the coordinator's 465,000
/// instructions per HTTP saga at concurrency 1), so a batch takes each
/// statement once however many writes use it. A statement is reset after
/// each use (rusqlite's `execute` and `query_row` do it), so none holds
/// the file between batches; SQLite prepares one again by itself when the
/// schema changed.
struct Statements<'c> {
    conn: &'c Connection,
    taken: [Option<CachedStatement<'c>>; Sql::ALL.len()],
}

impl<'c> Statements<'c> {
    fn new(conn: &'c Connection) -> Self {
        Statements {
            conn,
            taken: Default::default(),
        }
    }

    fn get(&mut self, sql: Sql) -> rusqlite::Result<&mut rusqlite::Statement<'c>> {
        let slot = &mut self.taken[sql as usize];
        let st = match slot.take() {
            Some(st) => st,
            None => self.conn.prepare_cached(sql.text())?,
        };
        Ok(slot.insert(st))
    }

    /// Prepares every statement into the connection's cache.
    fn check(conn: &Connection) -> rusqlite::Result<()> {
        let mut st = Statements::new(conn);
        for sql in Sql::ALL {
            st.get(sql)?;
        }
        Ok(())
    }
}

/// The execution of a row: its `id`, `created_at` (the time a compressed
/// state's times are written after) and `state` columns.
fn decode_row(id: &[u8], created_at: i64, state: &[u8]) -> Result<Execution, StoreError> {
    let uuid = Uuid::from_slice(id);
    uuid.as_ref()
        .map_err(|e| {
            sagatx_core::DecodeError::Invariant(format!("the row's id is not a UUID: {e}"))
        })
        .and_then(|u| super::pack::unpack_execution(state, *u, created_at as u64))
        .map_err(|source| StoreError::Corrupt {
            id: uuid
                .as_ref()
                .map(|u| u.to_string())
                .unwrap_or_else(|_| format!("{id:02x?}")),
            source,
        })
}

/// The `state` column of an execution: its entry, checked and compressed.
fn stored_state(ex: &Execution) -> Result<Vec<u8>, StoreError> {
    super::pack::pack(ex).map_err(|source| StoreError::Corrupt {
        id: ex.id.to_string(),
        source,
    })
}

/// How the next page's cursor relates to the first row left out.
enum Cursor {
    /// Newest first: the cursor is an exclusive upper bound.
    Above,
    /// Oldest first: the cursor is an inclusive lower bound.
    From,
}

/// What to do with an entry that cannot be decoded.
enum Damaged {
    /// Report it and leave it for an operator: it must not hide the others.
    Skip,
    /// Fail (copying must not lose anything).
    Fail,
}

/// Reads rows `(n, id, created_at, state)`, at most `limit` of them, fetched with a
/// `LIMIT` of `limit + 1` so that the extra row gives the next cursor.
fn page_of(
    rows: &mut rusqlite::Rows<'_>,
    limit: usize,
    cursor: Cursor,
    damaged: Damaged,
) -> Result<Page, StoreError> {
    let mut items = Vec::new();
    let mut next_cursor = None;
    while let Some(r) = rows.next().map_err(io)? {
        let n: i64 = r.get(0).map_err(io)?;
        if items.len() == limit {
            next_cursor = Some(match cursor {
                Cursor::Above => n as u64 + 1,
                Cursor::From => n as u64,
            });
            break;
        }
        let id: Vec<u8> = r.get(1).map_err(io)?;
        let created_at: i64 = r.get(2).map_err(io)?;
        let state: Vec<u8> = r.get(3).map_err(io)?;
        match (decode_row(&id, created_at, &state), &damaged) {
            (Ok(ex), _) => items.push(ex),
            (Err(e), Damaged::Skip) => {
                tracing::error!(error = %e, "skipping an unreadable journal entry")
            }
            (Err(e), Damaged::Fail) => return Err(e),
        }
    }
    Ok(Page { items, next_cursor })
}

#[async_trait]
impl Store for SqliteStore {
    async fn put_definition(&self, def: &SagaDefinition) -> Result<Registered, StoreError> {
        let (reply, rx) = oneshot::channel();
        let w = Write::Definition {
            def: Box::new(def.clone()),
            now_ms: now_ms(),
            reply,
        };
        self.submit(w, rx).await
    }

    async fn get_definition(
        &self,
        name: &str,
        version: Option<u32>,
    ) -> Result<Option<(u32, SagaDefinition)>, StoreError> {
        let name = name.to_string();
        self.read(move |c| {
            let row: Option<(i64, String)> = match version {
                Some(v) => c
                    .prepare_cached("SELECT version, body FROM definitions WHERE name = ?1 AND version = ?2")
                    .and_then(|mut s| {
                        s.query_row(params![name, v as i64], |r| Ok((r.get(0)?, r.get(1)?)))
                            .optional()
                    }),
                None => c
                    .prepare_cached(
                        "SELECT version, body FROM definitions WHERE name = ?1 ORDER BY version DESC LIMIT 1",
                    )
                    .and_then(|mut s| {
                        s.query_row(params![name], |r| Ok((r.get(0)?, r.get(1)?)))
                            .optional()
                    }),
            }
            .map_err(io)?;
            match row {
                None => Ok(None),
                Some((v, body)) => {
                    let def = SagaDefinition::from_json(body.as_bytes()).map_err(|e| {
                        StoreError::Io(format!("stored definition {name} v{v} is unreadable: {e}"))
                    })?;
                    Ok(Some((v as u32, def)))
                }
            }
        })
        .await
    }

    async fn list_definitions(&self) -> Result<Vec<(String, u32)>, StoreError> {
        self.read(|c| {
            let mut s = c
                .prepare_cached(
                    "SELECT name, max(version) FROM definitions GROUP BY name ORDER BY name",
                )
                .map_err(io)?;
            let rows = s
                .query_map([], |r| {
                    Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)? as u32))
                })
                .map_err(io)?;
            rows.collect::<Result<Vec<_>, _>>().map_err(io)
        })
        .await
    }

    async fn append(&self, ex: &Execution) -> Result<(), StoreError> {
        let (w, rx) = Write::append(ex)?;
        self.submit(w, rx).await
    }

    async fn load(&self, id: ExecutionId) -> Result<Option<Execution>, StoreError> {
        self.read(move |c| {
            let row: Option<(i64, Vec<u8>)> = c
                .prepare_cached("SELECT created_at, state FROM executions WHERE id = ?1")
                .and_then(|mut s| {
                    s.query_row([id.0.as_bytes().as_slice()], |r| Ok((r.get(0)?, r.get(1)?)))
                        .optional()
                })
                .map_err(io)?;
            row.map(|(created_at, state)| decode_row(id.0.as_bytes(), created_at, &state))
                .transpose()
        })
        .await
    }

    async fn list(&self, q: &ListQuery) -> Result<Page, StoreError> {
        let q = q.clone();
        self.read(move |c| {
            let upper = q.cursor.map(|c| c as i64).unwrap_or(i64::MAX);
            let mut sql =
                String::from("SELECT n, id, created_at, state FROM executions WHERE n < ?");
            let mut args: Vec<Box<dyn rusqlite::ToSql>> = vec![Box::new(upper)];
            if let Some(st) = q.status {
                sql.push_str(" AND status = ?");
                args.push(Box::new(st.as_str()));
            }
            if let Some(saga) = q.saga.clone() {
                sql.push_str(" AND saga = ?");
                args.push(Box::new(saga));
            }
            sql.push_str(" ORDER BY n DESC LIMIT ?");
            args.push(Box::new((q.limit + 1) as i64));
            let mut s = c.prepare_cached(&sql).map_err(io)?;
            let mut rows = s
                .query(rusqlite::params_from_iter(args.iter()))
                .map_err(io)?;
            page_of(&mut rows, q.limit, Cursor::Above, Damaged::Skip)
        })
        .await
    }

    async fn due(&self, now_ms: u64, limit: usize) -> Result<Vec<ExecutionId>, StoreError> {
        self.read(move |c| {
            let mut s = c
                .prepare_cached(
                    "SELECT id FROM executions WHERE due_at IS NOT NULL AND due_at <= ?1 ORDER BY due_at LIMIT ?2",
                )
                .map_err(io)?;
            let rows = s
                .query_map(params![now_ms as i64, limit as i64], |r| r.get::<_, Vec<u8>>(0))
                .map_err(io)?;
            let mut out = Vec::new();
            for r in rows {
                let b = r.map_err(io)?;
                let u = Uuid::from_slice(&b)
                    .map_err(|e| StoreError::Io(format!("bad execution id in the journal: {e}")))?;
                out.push(ExecutionId(u));
            }
            Ok(out)
        })
        .await
    }

    async fn secret(&self) -> Result<[u8; 32], StoreError> {
        Ok(*self.secret.lock().unwrap_or_else(|p| p.into_inner()))
    }

    async fn paused_before(&self, before_ms: u64, limit: usize) -> Result<Vec<Paused>, StoreError> {
        self.read(move |c| {
            let mut s = c.prepare_cached(PAUSED_BEFORE).map_err(io)?;
            let mut rows = s
                .query(params![before_ms.min(i64::MAX as u64) as i64, limit as i64])
                .map_err(io)?;
            let mut out = Vec::new();
            while let Some(r) = rows.next().map_err(io)? {
                let id: Vec<u8> = r.get(1).map_err(io)?;
                let created_at: i64 = r.get(2).map_err(io)?;
                let state: Vec<u8> = r.get(3).map_err(io)?;
                let since: i64 = r.get(4).map_err(io)?;
                // A damaged entry hides nothing else (as in the lists).
                match decode_row(&id, created_at, &state) {
                    Ok(execution) => out.push(Paused {
                        since_ms: since as u64,
                        execution,
                    }),
                    Err(e) => tracing::error!(error = %e, "skipping an unreadable journal entry"),
                }
            }
            Ok(out)
        })
        .await
    }

    async fn summary(&self) -> Result<super::Summary, StoreError> {
        self.read(|c| {
            let mut s = c
                .prepare_cached(
                    "SELECT saga, status, n FROM counts WHERE n > 0 ORDER BY saga, status",
                )
                .map_err(io)?;
            let rows = s
                .query_map([], |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        r.get::<_, String>(1)?,
                        r.get::<_, i64>(2)?,
                    ))
                })
                .map_err(io)?;
            let mut counts = Vec::new();
            for r in rows {
                let (saga, status, n) = r.map_err(io)?;
                let status = status.parse().map_err(StoreError::Io)?;
                counts.push((saga, status, n as u64));
            }
            Ok(super::Summary { counts })
        })
        .await
    }

    async fn import_secret(&self, secret: [u8; 32]) -> Result<(), StoreError> {
        let path = self.path.clone();
        tokio::task::spawn_blocking(move || {
            let c = open_conn(&path, OpenFlags::SQLITE_OPEN_READ_WRITE)?;
            c.execute(
                "UPDATE meta SET value = ?1 WHERE key = 'secret'",
                [secret.as_slice()],
            )
            .map_err(io)
        })
        .await
        .map_err(|e| StoreError::Io(e.to_string()))??;
        *self.secret.lock().unwrap_or_else(|p| p.into_inner()) = secret;
        Ok(())
    }

    async fn scan(&self, cursor: Option<u64>, limit: usize) -> Result<Page, StoreError> {
        self.read(move |c| {
            let mut s = c
                .prepare_cached(
                    "SELECT n, id, created_at, state FROM executions WHERE n >= ?1 ORDER BY n LIMIT ?2",
                )
                .map_err(io)?;
            let mut rows = s
                .query(params![cursor.unwrap_or(0) as i64, (limit + 1) as i64])
                .map_err(io)?;
            page_of(&mut rows, limit, Cursor::From, Damaged::Fail)
        })
        .await
    }

    async fn import(&self, ex: &Execution) -> Result<(), StoreError> {
        let state = stored_state(ex)?;
        let ex = ex.clone();
        let path = self.path.clone();
        tokio::task::spawn_blocking(move || {
            let mut c = open_conn(&path, OpenFlags::SQLITE_OPEN_READ_WRITE)?;
            // The execution and its count in one transaction.
            let tx = c
                .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
                .map_err(io)?;
            let n = tx
                .execute(
                    "INSERT INTO executions (id, saga, status, seq, due_at, created_at, updated_at, state)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8) ON CONFLICT (id) DO NOTHING",
                    params![
                        ex.id.0.as_bytes().as_slice(),
                        ex.saga.as_str(),
                        ex.status.as_str(),
                        ex.seq as i64,
                        ex.next_due_ms().map(|d| d as i64),
                        ex.created_at_ms as i64,
                        ex.updated_at_ms as i64,
                        state
                    ],
                )
                .map_err(io)?;
            if n != 1 {
                return Err(StoreError::Exists(ex.id));
            }
            let row = tx.last_insert_rowid();
            tx.execute(ADD_TO_COUNT, params![ex.saga.as_str(), ex.status.as_str(), 1])
                .map_err(io)?;
            if ex.status.as_str() == PAUSED {
                tx.execute(PAUSE, params![row, ex.updated_at_ms as i64])
                    .map_err(io)?;
            }
            tx.commit().map_err(io)
        })
        .await
        .map_err(|e| StoreError::Io(e.to_string()))?
    }

    async fn op_record(
        &self,
        name: &str,
        args: &serde_json::Value,
        now_ms: u64,
    ) -> Result<u64, StoreError> {
        let (reply, rx) = oneshot::channel();
        let w = Write::OpRecord {
            name: name.to_string(),
            args: args.to_string(),
            now_ms,
            reply,
        };
        self.submit(w, rx).await
    }

    async fn op_finish(&self, id: u64, error: Option<&str>, now_ms: u64) -> Result<(), StoreError> {
        let (reply, rx) = oneshot::channel();
        let w = Write::OpFinish {
            id,
            error: error.map(str::to_string),
            now_ms,
            reply,
        };
        self.submit(w, rx).await
    }

    async fn op_pending(
        &self,
        after: Option<u64>,
        limit: usize,
    ) -> Result<Vec<super::OpRecord>, StoreError> {
        self.read(move |c| {
            let mut s = c
                .prepare_cached(
                    "SELECT id, name, args, created_at FROM oplog
                     WHERE finished_at IS NULL AND id > ?1 ORDER BY id LIMIT ?2",
                )
                .map_err(io)?;
            let rows = s
                .query_map(params![after.unwrap_or(0) as i64, limit as i64], |r| {
                    Ok((
                        r.get::<_, i64>(0)?,
                        r.get::<_, String>(1)?,
                        r.get::<_, String>(2)?,
                        r.get::<_, i64>(3)?,
                    ))
                })
                .map_err(io)?;
            let mut out = Vec::new();
            for r in rows {
                let (id, name, args, created) = r.map_err(io)?;
                let args = serde_json::from_str(&args).map_err(|e| {
                    StoreError::Io(format!("operation {id} has unreadable arguments: {e}"))
                })?;
                out.push(super::OpRecord {
                    id: id as u64,
                    name,
                    args,
                    created_at_ms: created as u64,
                });
            }
            Ok(out)
        })
        .await
    }

    async fn unfinished(&self, cursor: Option<u64>, limit: usize) -> Result<Page, StoreError> {
        self.read(move |c| {
            let mut s = c
                .prepare_cached(
                    "SELECT n, id, created_at, state FROM executions
                     WHERE status IN ('created', 'running', 'compensating') AND n >= ?1
                     ORDER BY n LIMIT ?2",
                )
                .map_err(io)?;
            let mut rows = s
                .query(params![cursor.unwrap_or(0) as i64, (limit + 1) as i64])
                .map_err(io)?;
            page_of(&mut rows, limit, Cursor::From, Damaged::Skip)
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sagatx_core::{Env, Event, Status};

    fn definition() -> SagaDefinition {
        SagaDefinition::from_json(
            br#"{"name":"t","steps":[{"name":"a","action":{"url":"http://127.0.0.1:9/a"}},
                                      {"name":"b","action":{"url":"http://127.0.0.1:9/b"}}]}"#,
        )
        .expect("definition")
    }

    #[test]
    fn a_batch_sums_its_count_changes_per_saga_and_status() {
        let mut c = Counts::default();
        for i in 0..500 {
            let saga = format!("s{}", i % 50);
            c.add(&saga, "running", 1);
            c.add(&saga, "running", -1);
            c.add(&saga, "completed", 1);
        }
        // 100 pairs: the short list's and the maps' alike, each once.
        let mut seen: Vec<(String, String, i64)> = c
            .changes()
            .map(|(saga, status, by)| (saga.to_string(), status.to_string(), by))
            .collect();
        assert_eq!(c.few.len(), FEW_PAIRS);
        assert_eq!(seen.len(), 100);
        seen.sort();
        seen.dedup_by(|a, b| a.0 == b.0 && a.1 == b.1);
        assert_eq!(seen.len(), 100, "a pair counted in two places");
        assert!(seen.iter().all(|(_, status, by)| match status.as_str() {
            "running" => *by == 0,
            "completed" => *by == 10,
            _ => false,
        }));
    }

    /// The first step's action fails for good.
    fn fail_first_step(ex: &mut Execution, def: &SagaDefinition, env: Env) {
        ex.handle(
            def,
            Event::Outcome {
                step: 0,
                phase: sagatx_core::Phase::Action,
                attempt: 1,
                outcome: Err(sagatx_core::StepError::permanent("no")),
            },
            env,
        )
        .expect("outcome");
    }

    /// A new execution, started, as its first journal write holds it.
    fn started(def: &SagaDefinition, env: Env) -> Execution {
        let mut ex = Execution::new(
            ExecutionId(uuid::Uuid::now_v7()),
            def,
            1,
            serde_json::Value::Null,
            None,
            1,
        );
        ex.handle(def, Event::Start, env).expect("start");
        ex.seq = 1;
        ex
    }

    /// The write the store makes of `ex` (its state packed as the store
    /// packs it).
    fn write(ex: &Execution) -> (Write, oneshot::Receiver<Result<(), StoreError>>) {
        Write::append(ex).expect("packs")
    }

    fn stored(conn: &Connection, id: ExecutionId) -> (String, i64) {
        conn.query_row(
            "SELECT status, seq FROM executions WHERE id = ?1",
            [id.0.as_bytes().as_slice()],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .expect("row")
    }

    /// A new journal in a directory of its own (kept while the directory
    /// lives), its schema brought up to date, as the writer holds it.
    fn journal() -> (tempfile::TempDir, Connection) {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("j.db");
        let mut conn = open_conn(
            &path,
            OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_CREATE,
        )
        .expect("open");
        prepare(&mut conn, &path, Durability::Full).expect("prepare");
        (dir, conn)
    }

    /// Waits up to five seconds for `done`.
    fn eventually(what: &str, mut done: impl FnMut() -> bool) {
        let until = std::time::Instant::now() + Duration::from_secs(5);
        while !done() {
            assert!(std::time::Instant::now() < until, "{what}: not within 5 s");
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// The checkpointer copies commits into the database while the store
    /// is open: a copy of the database file alone (no WAL) holds them,
    /// though far fewer frames than the writer's automatic checkpoint
    /// waits for (1,000) were written.
    #[tokio::test]
    async fn the_checkpointer_copies_commits_into_the_database_file() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("j.db");
        let store = SqliteStore::open(&path).expect("open");
        let def = definition();
        let env = Env {
            now_ms: 1,
            random01: 0.5,
        };
        for _ in 0..5 {
            store.append(&started(&def, env)).await.expect("append");
        }
        let copy = dir.path().join("copy.db");
        eventually("the five executions in the database file", || {
            std::fs::copy(&path, &copy).expect("copy");
            let c = Connection::open(&copy).expect("open the copy");
            let n: i64 = c
                .query_row("SELECT count(*) FROM executions", [], |r| r.get(0))
                .unwrap_or(0);
            drop(c);
            let _ = std::fs::remove_file(copy.with_extension("db-wal"));
            n == 5
        });
        drop(store);
    }

    /// Threads of this process whose name starts like the checkpointer's
    /// (Linux keeps 15 bytes of a thread's name).
    #[cfg(target_os = "linux")]
    /// Writes `ex` (new) and then its first step's failure: two writes.
    async fn create_then_fail(store: &SqliteStore, def: &SagaDefinition, ex: &mut Execution) {
        store.append(ex).await.expect("the creation");
        fail_first_step(
            ex,
            def,
            Env {
                now_ms: 2,
                random01: 0.5,
            },
        );
        ex.seq = 2;
        store.append(ex).await.expect("the failure");
    }

    /// A store in a directory of its own, and an execution to write.
    fn store_and_execution() -> (
        tempfile::TempDir,
        Arc<SqliteStore>,
        SagaDefinition,
        Execution,
    ) {
        let dir = tempfile::tempdir().expect("dir");
        let store = SqliteStore::open(dir.path().join("j.db")).expect("open");
        let def = definition();
        let ex = started(
            &def,
            Env {
                now_ms: 1,
                random01: 0.5,
            },
        );
        (dir, Arc::new(store), def, ex)
    }

    /// At low load the caller commits its write itself, and what it wrote
    /// reads back: once [`LONE_STREAK`] writes in a row began alone, the
    /// next ones are committed here, not by the writer thread.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn lone_writes_commit_on_their_callers_thread() {
        let (_dir, store, def, mut ex) = store_and_execution();
        let env = Env {
            now_ms: 1,
            random01: 0.5,
        };
        for _ in 0..LONE_STREAK + 3 {
            store.append(&started(&def, env)).await.expect("a creation");
        }
        assert_eq!(store.commits_here.load(Ordering::Relaxed), 3);
        create_then_fail(&store, &def, &mut ex).await;
        assert_eq!(store.commits_here.load(Ordering::Relaxed), 5);
        let back = store.load(ex.id).await.expect("load").expect("stored");
        assert_eq!((back.seq, back.status), (2, ex.status));
        // A stale write committed here is refused as the writer refuses it.
        let err = store.append(&ex).await.expect_err("stale");
        assert!(matches!(err, StoreError::Conflict { .. }), "{err}");
        assert_eq!(store.commits_here.load(Ordering::Relaxed), 6);
        assert_eq!(store.load.in_flight.load(Ordering::Relaxed), 0);
    }

    /// With `caller_commits(false)` every write goes to the writer thread,
    /// however low the load.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_store_told_so_never_commits_on_the_callers_thread() {
        let dir = tempfile::tempdir().expect("dir");
        let store = SqliteStore::builder(dir.path().join("j.db"))
            .caller_commits(false)
            .open()
            .expect("open");
        let def = definition();
        let env = Env {
            now_ms: 1,
            random01: 0.5,
        };
        let ex = started(&def, env);
        store.append(&ex).await.expect("append");
        for _ in 0..2 * LONE_STREAK {
            store.append(&started(&def, env)).await.expect("a creation");
        }
        assert_eq!(store.commits_here.load(Ordering::Relaxed), 0);
        let back = store.load(ex.id).await.expect("load").expect("stored");
        assert_eq!(back.seq, 1);
    }

    /// A write that begins while another is in flight goes to the writer
    /// thread (so that under load writes share its batches), even if the
    /// connection is free, and so do the next [`LONE_STREAK`] lone ones.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_write_beside_another_in_flight_goes_to_the_writer_thread() {
        let (_dir, store, def, ex) = store_and_execution();
        let env = Env {
            now_ms: 1,
            random01: 0.5,
        };
        for _ in 0..=LONE_STREAK {
            store.append(&started(&def, env)).await.expect("a creation");
        }
        assert_eq!(store.commits_here.load(Ordering::Relaxed), 1);
        let other = InFlight::enter(&store.load);
        store.append(&ex).await.expect("append");
        drop(other);
        let back = store.load(ex.id).await.expect("load").expect("stored");
        assert_eq!(back.seq, 1);
        for _ in 0..LONE_STREAK {
            store.append(&started(&def, env)).await.expect("a creation");
        }
        assert_eq!(store.commits_here.load(Ordering::Relaxed), 1);
        store.append(&started(&def, env)).await.expect("a creation");
        assert_eq!(store.commits_here.load(Ordering::Relaxed), 2);
    }

    /// Writes from many tasks in bursts, and from one task in the lulls
    /// between, on a runtime of two workers: every write lands with its
    /// status, whichever path committed it, and both paths served (the
    /// callers in the lulls, the writer thread in the bursts).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn writes_in_bursts_and_lulls_all_land_by_either_path() {
        let (_dir, store, def, _) = store_and_execution();
        let def = Arc::new(def);
        let env = Env {
            now_ms: 1,
            random01: 0.5,
        };
        let life = |store: Arc<SqliteStore>, def: Arc<SagaDefinition>| async move {
            let mut ex = started(&def, env);
            create_then_fail(&store, &def, &mut ex).await;
            ex
        };
        let mut all = Vec::new();
        for _ in 0..6 {
            let mut burst = tokio::task::JoinSet::new();
            for _ in 0..64 {
                burst.spawn(life(store.clone(), def.clone()));
            }
            while let Some(ex) = burst.join_next().await {
                all.push(ex.expect("task"));
            }
            for _ in 0..3 * LONE_STREAK {
                all.push(life(store.clone(), def.clone()).await);
            }
        }
        let here = store.commits_by_callers() as usize;
        let writes = 2 * all.len();
        assert!(
            here > 0 && here < writes,
            "{here} of {writes} committed by their callers"
        );
        for ex in &all {
            let back = store.load(ex.id).await.expect("load").expect("stored");
            assert_eq!((back.seq, back.status), (2, ex.status), "{}", ex.id);
        }
        assert_eq!(store.load.in_flight.load(Ordering::Relaxed), 0);
    }

    /// On one thread (a current-thread runtime, or a multi-thread one with
    /// one worker) no write is committed by its caller: there a committing
    /// caller would keep every other task from running, so a burst of
    /// writes would never be seen in flight together and would commit one
    /// fsync each. They go to the writer thread and share its batches.
    #[test]
    fn on_one_thread_writes_go_to_the_writer_thread() {
        let one_thread = [
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime"),
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .expect("runtime"),
        ];
        for rt in one_thread {
            let (_dir, store, def, _) = store_and_execution();
            let def = Arc::new(def);
            let env = Env {
                now_ms: 1,
                random01: 0.5,
            };
            rt.block_on(async {
                for _ in 0..2 * LONE_STREAK {
                    store.append(&started(&def, env)).await.expect("a creation");
                }
                let mut burst = tokio::task::JoinSet::new();
                for _ in 0..64 {
                    let (store, def) = (store.clone(), def.clone());
                    burst.spawn(async move { store.append(&started(&def, env)).await });
                }
                while let Some(done) = burst.join_next().await {
                    done.expect("task").expect("a creation");
                }
            });
            assert_eq!(store.commits_by_callers(), 0);
        }
    }

    /// The store's write connection, held by a thread of its own (as the
    /// writer thread holds it while it commits a batch) until given back.
    struct Held {
        holder: thread::JoinHandle<()>,
        give_back: std::sync::mpsc::Sender<()>,
    }

    impl Held {
        /// Returns once the connection is taken.
        fn take(store: &SqliteStore) -> Self {
            let (taken_tx, taken_rx) = std::sync::mpsc::channel();
            let (give_back, give_back_rx) = std::sync::mpsc::channel::<()>();
            let core = store.core.clone();
            let holder = thread::spawn(move || {
                let _taken = core.lock().unwrap_or_else(|p| p.into_inner());
                taken_tx.send(()).expect("tell");
                let _ = give_back_rx.recv();
            });
            taken_rx.recv().expect("taken");
            Held { holder, give_back }
        }

        fn give_back(self) {
            self.give_back.send(()).expect("give back");
            self.holder.join().expect("holder");
        }
    }

    /// A lone write that finds the connection taken (the writer thread
    /// committing a batch) does not wait for it on the caller's thread: it
    /// queues, and the writer thread commits it once it has the connection.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_lone_write_that_finds_the_connection_taken_queues() {
        let (_dir, store, def, ex) = store_and_execution();
        let env = Env {
            now_ms: 1,
            random01: 0.5,
        };
        for _ in 0..LONE_STREAK {
            store.append(&started(&def, env)).await.expect("a creation");
        }
        let held = Held::take(&store);
        let write = tokio::spawn({
            let (store, ex) = (store.clone(), ex.clone());
            async move { store.append(&ex).await }
        });
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(!write.is_finished(), "it committed without the connection");
        held.give_back();
        write.await.expect("task").expect("append");
        assert_eq!(store.commits_here.load(Ordering::Relaxed), 0);
        let back = store.load(ex.id).await.expect("load").expect("stored");
        assert_eq!(back.seq, 1);
    }

    /// Regression: the journal's lock went with the store handle, while
    /// the writer thread went on to commit what was queued. A write whose
    /// caller gave up (a cancelled task) could then land after another
    /// process had opened the journal and loaded that execution. The lock
    /// now stays until the writer's last batch is in.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_journal_stays_locked_until_the_writers_last_batch_is_in() {
        let (dir, store, _def, ex) = store_and_execution();
        let path = dir.path().join("j.db");
        let held = Held::take(&store);
        // Queued for the writer thread, which waits for the connection.
        let write = tokio::spawn({
            let (store, ex) = (store.clone(), ex.clone());
            async move { store.append(&ex).await }
        });
        tokio::time::sleep(Duration::from_millis(100)).await;
        write.abort();
        assert!(write.await.is_err_and(|e| e.is_cancelled()));
        // The drop waits for the writer thread, which waits for the
        // connection: on a thread of its own.
        let dropping = thread::spawn(move || drop(store));
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(
            !dropping.is_finished(),
            "the drop did not wait for the writer"
        );
        match SqliteStore::open(&path) {
            Err(StoreError::Open { reason, .. }) => {
                assert!(reason.contains("has this journal open"), "{reason}")
            }
            Err(e) => panic!("another error: {e}"),
            Ok(_) => panic!("opened while a write of the dropped store was queued"),
        }
        held.give_back();
        dropping.join().expect("dropped");
        let reopened = SqliteStore::open(&path).expect("open once the drop returned");
        let back = reopened.load(ex.id).await.expect("load");
        assert_eq!(back.map(|b| b.seq), Some(1), "the queued write is in");
    }

    /// Regression (the benchmark's recovery workload): a store dropped and
    /// opened again at once, as a program that writes a journal and then
    /// hands it to an engine does, opens. While the lock went only with
    /// the writer thread's end, the new open raced the old thread.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_dropped_store_opens_again_at_once() {
        let (dir, store, def, _ex) = store_and_execution();
        let path = dir.path().join("j.db");
        let mut ids = Vec::new();
        let mut store = Arc::into_inner(store).expect("the one handle");
        for round in 0..20u64 {
            let ex = started(
                &def,
                Env {
                    now_ms: round + 1,
                    random01: 0.5,
                },
            );
            store.append(&ex).await.expect("append");
            ids.push(ex.id);
            drop(store);
            store = SqliteStore::open(&path).expect("opens at once after a drop");
        }
        for id in ids {
            assert!(store.load(id).await.expect("load").is_some(), "{id} kept");
        }
    }

    /// The dashboard asks for the long-paused executions every two
    /// seconds: SQLite answers from the index of the paused ones by the
    /// time they paused, not by reading every execution (or every paused
    /// one in the order they were made).
    #[test]
    fn the_long_paused_are_read_from_their_index() {
        let (dir, store, _def, _ex) = store_and_execution();
        drop(store);
        let c = Connection::open(dir.path().join("j.db")).expect("open");
        let plan: Vec<String> = c
            .prepare(&format!("EXPLAIN QUERY PLAN {PAUSED_BEFORE}"))
            .expect("explain")
            .query_map(params![1_000, 20], |r| r.get::<_, String>(3))
            .expect("plan")
            .collect::<Result<_, _>>()
            .expect("rows");
        assert_eq!(
            plan,
            [
                "SEARCH p USING COVERING INDEX paused_since (since<?)",
                "SEARCH e USING INTEGER PRIMARY KEY (rowid=?)"
            ],
            "{plan:?}"
        );
    }

    fn checkpointers() -> usize {
        std::fs::read_dir("/proc/self/task")
            .expect("/proc/self/task")
            .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
            .filter(|name| name.trim_end() == "sagatx-sqlite-c")
            .count()
    }

    /// Dropping the store ends its checkpointer thread (after the writer,
    /// whose end ends it). Counts this process's threads: nextest runs
    /// each test in a process of its own. Linux only (`/proc`).
    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn dropping_the_store_ends_the_checkpointer() {
        let before = checkpointers();
        let dir = tempfile::tempdir().expect("dir");
        let store = SqliteStore::open(dir.path().join("j.db")).expect("open");
        // A thread names itself once it runs, so its name can lag the spawn.
        eventually("one checkpointer per store", || {
            checkpointers() == before + 1
        });
        let def = definition();
        let env = Env {
            now_ms: 1,
            random01: 0.5,
        };
        store.append(&started(&def, env)).await.expect("append");
        drop(store);
        eventually("the checkpointer ended", || checkpointers() == before);
    }

    /// [`apply_batch`], as the writer calls it.
    fn apply(
        conn: &Connection,
        batch: &mut [Write],
        rows: &mut Rows,
    ) -> Result<Vec<Done>, rusqlite::Error> {
        apply_batch(conn, batch, rows)
    }

    /// A batch that fails part-way leaves nothing of itself behind, and
    /// the connection takes the next batch with the same statements (the
    /// write transaction is the writer's own, with its cached BEGIN and
    /// COMMIT; the trigger, made after they were prepared, also checks
    /// that they see a schema that changed).
    #[test]
    fn a_failed_batch_rolls_back_and_the_next_one_commits() {
        let (_dir, conn) = journal();
        Statements::check(&conn).expect("statements");
        conn.execute_batch(
            "CREATE TEMP TRIGGER boom BEFORE INSERT ON executions WHEN new.saga = 'boom'
             BEGIN SELECT RAISE(ABORT, 'boom'); END;",
        )
        .expect("trigger");
        let def = definition();
        let env = Env {
            now_ms: 1,
            random01: 0.5,
        };
        let (a, b) = (started(&def, env), started(&def, env));
        let mut rows = Rows::default();
        let (wa, _ra) = write(&a);
        let (mut wb, _rb) = write(&b);
        if let Write::Append { saga, .. } = &mut wb {
            *saga = Name::from("boom");
        }
        let Err(err) = apply_batch(&conn, &mut [wa, wb], &mut rows) else {
            panic!("the trigger fails the batch");
        };
        assert!(err.to_string().contains("boom"), "{err}");
        assert!(conn.is_autocommit(), "no transaction left open");
        let count = |conn: &Connection| -> i64 {
            conn.query_row("SELECT count(*) FROM executions", [], |r| r.get(0))
                .expect("count")
        };
        assert_eq!(count(&conn), 0, "the first write went with the batch");
        let (wa, _ra) = write(&a);
        apply_batch(&conn, &mut [wa], &mut rows).expect("the next batch");
        assert_eq!(stored(&conn, a.id), ("running".to_string(), 1));
        assert_eq!(count(&conn), 1);
    }

    /// The writer's remembered status is a hint: with a wrong one (here it
    /// claims the status did not change), the row still gets the status
    /// written, and with a wrong row number the row is found by id.
    #[test]
    fn a_wrong_remembered_row_never_writes_a_wrong_status() {
        let (_dir, conn) = journal();
        let def = definition();
        let env = Env {
            now_ms: 1,
            random01: 0.5,
        };
        let mut ex = started(&def, env);
        let mut rows = Rows::default();
        let (w, _rx) = write(&ex);
        apply(&conn, &mut [w], &mut rows).expect("insert");
        assert_eq!(stored(&conn, ex.id), ("running".to_string(), 1));
        let (row, _) = rows.0[&ex.id];

        // The step fails for good: the execution ends `compensated`... but
        // the writer is told (wrongly) that it is still `running`.
        fail_first_step(&mut ex, &def, env);
        ex.seq = 2;
        assert_ne!(ex.status, Status::Running);
        rows.0.insert(ex.id, (row, "running"));
        let (w, _rx) = write(&ex);
        apply(&conn, &mut [w], &mut rows).expect("update");
        assert_eq!(stored(&conn, ex.id), (ex.status.as_str().to_string(), 2));
        assert!(
            !rows.0.contains_key(&ex.id),
            "a terminal execution is forgotten"
        );

        // A wrong row number: the update falls back to the id.
        let mut other = started(&def, env);
        let (w, _rx) = write(&other);
        apply(&conn, &mut [w], &mut rows).expect("insert");
        rows.0.insert(other.id, (row, "running"));
        other.updated_at_ms = 2;
        other.seq = 2;
        let (w, _rx) = write(&other);
        let done = apply(&conn, &mut [w], &mut rows).expect("update");
        assert!(matches!(done[..], [Done::Appended(Ok(()))]));
        assert_eq!(stored(&conn, other.id), ("running".to_string(), 2));
        assert_eq!(stored(&conn, ex.id).1, 2, "the other row is untouched");
        assert_ne!(rows.0[&other.id].0, row, "the right row is remembered");

        // The right row with a wrong status: the update falls back to the
        // row as read, and the counts move from the status the row had.
        let mut third = started(&def, env);
        let (w, _rx) = write(&third);
        apply(&conn, &mut [w], &mut rows).expect("insert");
        let (third_row, _) = rows.0[&third.id];
        rows.0.insert(third.id, (third_row, "paused"));
        fail_first_step(&mut third, &def, env);
        third.seq = 2;
        let (w, _rx) = write(&third);
        let done = apply(&conn, &mut [w], &mut rows).expect("update");
        assert!(matches!(done[..], [Done::Appended(Ok(()))]));
        assert_eq!(
            stored(&conn, third.id),
            (third.status.as_str().to_string(), 2)
        );

        // And the summary's counts are the executions' own.
        let table = |sql: &str| -> Vec<(String, String, i64)> {
            let mut s = conn.prepare(sql).expect("prepare");
            let rows = s
                .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
                .expect("query");
            rows.collect::<Result<_, _>>().expect("rows")
        };
        let counted = table(
            "SELECT saga, status, count(*) FROM executions GROUP BY saga, status ORDER BY saga, status",
        );
        assert_eq!(
            counted,
            [
                ("t".to_string(), ex.status.as_str().to_string(), 2),
                ("t".to_string(), "running".to_string(), 1)
            ]
        );
        assert_eq!(
            table("SELECT saga, status, n FROM counts WHERE n != 0 ORDER BY saga, status"),
            counted
        );
    }

    /// An entry of schema 6 (compressed, its times as they are) reads
    /// whatever the row's `created_at` says; the next write stores it with
    /// its times after `created_at`, which that write sets.
    #[test]
    fn a_schema_6_entry_reads_back_and_its_next_write_is_relative() {
        use super::super::pack;
        let (_dir, conn) = journal();
        let def = definition();
        let env = Env {
            now_ms: 1_795_819_178_413,
            random01: 0.5,
        };
        let mut ex = started(&def, env);
        let v6 = pack::compress(
            ex.to_raw().expect("raw"),
            ex.id.0,
            pack::LZ4_DICT_1,
            pack::MAX_ENTRY_BYTES,
        )
        .expect("compresses");
        conn.execute(
            "INSERT INTO executions (id, saga, status, seq, created_at, updated_at, state)
             VALUES (?1, 't', 'running', 1, 0, 0, ?2)",
            params![ex.id.0.as_bytes().as_slice(), v6],
        )
        .expect("insert");
        let id = ex.id;
        let read = |conn: &Connection| -> (i64, Vec<u8>, Execution) {
            let (at, state): (i64, Vec<u8>) = conn
                .query_row(
                    "SELECT created_at, state FROM executions WHERE id = ?1",
                    [id.0.as_bytes().as_slice()],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                .expect("row");
            let back = decode_row(id.0.as_bytes(), at, &state).expect("decodes");
            (at, state, back)
        };
        assert_eq!(read(&conn).2, ex, "a schema-6 entry ignores created_at");

        fail_first_step(&mut ex, &def, env);
        ex.seq = 2;
        let (w, _rx) = write(&ex);
        let done = apply(&conn, &mut [w], &mut Rows::default()).expect("update");
        assert!(matches!(done[..], [Done::Appended(Ok(()))]));
        let (at, state, back) = read(&conn);
        assert_eq!((at as u64, state[0], back), (ex.created_at_ms, 2, ex));
    }

    #[test]
    fn the_remembered_rows_stay_bounded() {
        let mut rows = Rows::default();
        for i in 0..(ROWS_REMEMBERED as u128 + 10) {
            rows.note(ExecutionId(uuid::Uuid::from_u128(i)), i as i64, "running");
        }
        assert!(rows.0.len() <= ROWS_REMEMBERED);
        let id = ExecutionId(uuid::Uuid::from_u128(7));
        rows.note(id, 7, "running");
        rows.note(id, 7, "completed");
        assert!(!rows.0.contains_key(&id));
    }
}
