//! The PostgreSQL store (feature `postgres`), for several coordinator
//! processes sharing one database.
//!
//! - One writer task owns one connection and applies every write queued at
//!   the moment in one transaction (group commit), then answers each waiter.
//! - Reads use a pool (deadpool-postgres).
//! - The schema is versioned in `sagatx_schema`; numbered migrations run at
//!   start-up under an advisory lock, so processes starting together do not
//!   race.
//!
//! - Several processes share one database through leases (see
//!   [`Leases`](super::Leases)): a process claims an execution before it
//!   drives it (`FOR UPDATE SKIP LOCKED` for due work), every write carries
//!   the lease's owner and epoch and fails once another process claimed the
//!   execution, a live process keeps its leases with a heartbeat (one row
//!   in `sagatx_processes`), and those of a dead one run out and are
//!   claimed by the others. Lease times use the database's clock, so the
//!   processes' clocks need not agree.
//! - Commands for an execution another process drives go through the
//!   `sagatx_inbox` table; `LISTEN/NOTIFY` wakes the holder at once (a
//!   notification is a hint: the table is read again after every reconnect
//!   and at every poll).
//! - The summary's counts by saga and status are rows of changes that
//!   triggers add per statement to `sagatx_counts` and the heartbeat folds
//!   ([`fold_counts`]): the summary never reads the executions.

use crate::now_ms;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use sagatx_core::{Execution, ExecutionId, SagaDefinition};
use tokio::sync::{mpsc, oneshot};
use tokio_postgres::{Client, Config, NoTls};
use uuid::Uuid;

use super::{
    Claim, Claimed, Command, Inboxed, Leases, ListQuery, OpRecord, Outcome, Page, Paused,
    Registered, Store, StoreError,
};

/// Migrations (numbered SQL files under `migrations/postgres`).
pub(crate) const MIGRATIONS: &[super::migrations::Migration] = &[
    super::migrations::Migration {
        version: 1,
        name: "executions",
        sql: include_str!("migrations/postgres/0001_executions.sql"),
    },
    super::migrations::Migration {
        version: 2,
        name: "saga_status_index",
        sql: include_str!("migrations/postgres/0002_saga_status_index.sql"),
    },
    super::migrations::Migration {
        version: 3,
        name: "leases_inbox_processes",
        sql: include_str!("migrations/postgres/0003_leases_inbox_processes.sql"),
    },
    super::migrations::Migration {
        version: 4,
        name: "counts",
        sql: include_str!("migrations/postgres/0004_counts.sql"),
    },
    super::migrations::Migration {
        version: 5,
        name: "paused_at",
        sql: include_str!("migrations/postgres/0005_paused_at.sql"),
    },
];

/// `Store::paused_before`: the executions paused at or before `$1`,
/// longest paused first, from the partial index `sagatx_executions_paused`
/// (public for the test that checks PostgreSQL's plan uses it).
#[doc(hidden)]
pub const PG_PAUSED_BEFORE: &str = "SELECT n, id, state, paused_at FROM sagatx_executions
     WHERE paused_at IS NOT NULL AND paused_at <= $1 ORDER BY paused_at, n LIMIT $2";

/// How long a lease lasts unless renewed, by default.
pub const DEFAULT_LEASE: Duration = Duration::from_secs(10);

/// Options of [`PostgresStore::open_with`].
#[derive(Debug, Clone)]
pub struct PostgresOptions {
    /// How long this process's leases last unless renewed (they are renewed
    /// every quarter of it): the longest a dead process's work waits before
    /// another process takes it over.
    pub lease: Duration,
}

impl Default for PostgresOptions {
    fn default() -> Self {
        PostgresOptions {
            lease: DEFAULT_LEASE,
        }
    }
}

/// What the store's tasks share with it.
struct Shared {
    owner: Uuid,
    lease_ms: i64,
    wake: Mutex<Option<Arc<tokio::sync::Notify>>>,
}

impl Shared {
    fn wake(&self) {
        if let Some(w) = &*self.wake.lock().unwrap_or_else(|p| p.into_inner()) {
            w.notify_one();
        }
    }
}

/// The schema version this build writes.
pub const PG_SCHEMA_VERSION: i32 = super::migrations::latest(MIGRATIONS) as i32;
/// Writes applied in one transaction at most.
const MAX_BATCH: usize = 1024;

fn io(e: tokio_postgres::Error) -> StoreError {
    StoreError::Io(describe(&e))
}

/// A PostgreSQL error as a message: the server's code and message (the
/// error's own text is "db error"), or the error with its cause.
fn describe(e: &tokio_postgres::Error) -> String {
    match (e.as_db_error(), std::error::Error::source(e)) {
        (Some(d), _) => format!("PostgreSQL: {}: {}", d.code().code(), d.message()),
        (None, Some(cause)) => format!("PostgreSQL: {e}: {cause}"),
        (None, None) => format!("PostgreSQL: {e}"),
    }
}

/// Why a connection was refused, and what to check: the server's own
/// message when it answered (tokio-postgres says only "db error"), the
/// system's when it did not ("error connecting to server" alone does not
/// say that nothing listens).
fn refusal(e: &tokio_postgres::Error) -> String {
    let (what, hint) = match e.as_db_error() {
        Some(d) => {
            let hint = match d.code().code() {
                "3D000" => "create the database, or name one that exists in the URL",
                "28P01" | "28000" => "check the user and password in the URL",
                _ => "check that PostgreSQL accepts this user",
            };
            (format!("{} ({})", d.message(), d.code().code()), hint)
        }
        None => {
            let what = match std::error::Error::source(e) {
                Some(cause) => format!("{e}: {cause}"),
                None => e.to_string(),
            };
            let hint = if what.contains("TLS") || what.contains("certificate") {
                "check sslrootcert: it must hold the certificate of the CA that signed the server's"
            } else {
                "check that PostgreSQL runs there and accepts this user"
            };
            (what, hint)
        }
    };
    format!("{what}; {hint}")
}

fn redact(url: &str) -> String {
    // Never print a password.
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => format!("{}://…{}", &url[..s], &url[at..]),
        _ => url.to_string(),
    }
}

enum Write {
    /// The state, its encoding, the lease epoch it is written under (0:
    /// none: accepted while no other process holds the execution), and the
    /// waiter.
    Append(
        Box<Execution>,
        Vec<u8>,
        u64,
        oneshot::Sender<Result<(), StoreError>>,
    ),
    /// Gives a lease up unless a later claim replaced it.
    Release(ExecutionId, u64, oneshot::Sender<Result<(), StoreError>>),
    Definition(
        Box<SagaDefinition>,
        u64,
        oneshot::Sender<Result<Registered, StoreError>>,
    ),
    OpRecord(
        String,
        String,
        u64,
        oneshot::Sender<Result<u64, StoreError>>,
    ),
    OpFinish(
        u64,
        Option<String>,
        u64,
        oneshot::Sender<Result<(), StoreError>>,
    ),
}

/// The PostgreSQL journal.
pub struct PostgresStore {
    pool: Pool,
    writer: mpsc::Sender<Write>,
    secret: std::sync::Mutex<[u8; 32]>,
    shared: Arc<Shared>,
    /// Dropped with the store: ends the heartbeat and listener tasks.
    _stop: tokio::sync::watch::Sender<()>,
}

/// How the store reaches PostgreSQL: the connection settings and, when
/// the URL asks for TLS, the rustls connector.
#[derive(Clone)]
pub(crate) struct Target {
    pub(crate) cfg: Config,
    tls: Option<tokio_postgres_rustls::MakeRustlsConnect>,
}

/// Parses a `postgres://` URL. Besides what tokio-postgres reads, it takes
/// `sslrootcert=FILE` (PEM certificates to trust) and the `sslmode`s
/// `verify-ca` and `verify-full`: any of `require`, `verify-ca`,
/// `verify-full` or a `sslrootcert` makes the connection TLS, with the
/// server's certificate checked against `sslrootcert` or, without it,
/// against the system's roots (stricter than libpq's `require`, which
/// checks nothing).
pub(crate) fn target(url: &str) -> Result<Target, StoreError> {
    let bad = |reason: String| StoreError::Open {
        path: redact(url),
        reason,
    };
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, q),
        None => (url, ""),
    };
    let mut kept = Vec::new();
    let (mut root, mut tls) = (None, false);
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        match (k, v) {
            ("sslrootcert", file) => {
                root = Some(file.to_string());
                tls = true;
            }
            ("sslmode", "verify-ca" | "verify-full" | "require") => {
                tls = true;
                kept.push("sslmode=require".to_string());
            }
            _ => kept.push(pair.to_string()),
        }
    }
    let plain = if kept.is_empty() {
        base.to_string()
    } else {
        format!("{base}?{}", kept.join("&"))
    };
    let mut cfg: Config = plain
        .parse()
        .map_err(|e| bad(format!("not a PostgreSQL URL: {e}")))?;
    cfg.application_name("sagatx");
    if !tls {
        return Ok(Target { cfg, tls: None });
    }
    if root.is_some() && !kept.iter().any(|p| p.starts_with("sslmode=")) {
        cfg.ssl_mode(tokio_postgres::config::SslMode::Require);
    }
    let mut roots = rustls::RootCertStore::empty();
    match &root {
        Some(file) => {
            use rustls::pki_types::{pem::PemObject, CertificateDer};
            let certs = CertificateDer::pem_file_iter(file)
                .map_err(|e| bad(format!("cannot read sslrootcert {file}: {e}")))?;
            for c in certs {
                let c = c.map_err(|e| bad(format!("sslrootcert {file} is not PEM: {e}")))?;
                roots
                    .add(c)
                    .map_err(|e| bad(format!("sslrootcert {file}: {e}")))?;
            }
            if roots.is_empty() {
                return Err(bad(format!("sslrootcert {file} holds no certificate")));
            }
        }
        None => {
            for c in rustls_native_certs::load_native_certs().certs {
                let _ = roots.add(c);
            }
            if roots.is_empty() {
                return Err(bad(
                    "TLS was asked for but the system has no root certificates; give sslrootcert=FILE"
                        .into(),
                ));
            }
        }
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| bad(format!("TLS: {e}")))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Target {
        cfg,
        tls: Some(tokio_postgres_rustls::MakeRustlsConnect::new(config)),
    })
}

impl Target {
    /// A new connection whose messages a spawned task drives.
    async fn connect(&self, url: &str) -> Result<Client, StoreError> {
        self.client().await.map_err(|reason| StoreError::Open {
            path: redact(url),
            reason,
        })
    }

    /// A new connection, or what went wrong and what to check.
    pub(crate) async fn client(&self) -> Result<Client, String> {
        let timeout = |_| "no answer within 10 s; check the host and port".to_string();
        let refused = |e: tokio_postgres::Error| refusal(&e);
        let ended = |e: tokio_postgres::Error| {
            tracing::warn!(error = %describe(&e), "PostgreSQL connection ended");
        };
        let ten = Duration::from_secs(10);
        match &self.tls {
            None => {
                let (client, conn) = tokio::time::timeout(ten, self.cfg.connect(NoTls))
                    .await
                    .map_err(timeout)?
                    .map_err(refused)?;
                tokio::spawn(async move { conn.await.map_err(ended) });
                Ok(client)
            }
            Some(tls) => {
                let (client, conn) = tokio::time::timeout(ten, self.cfg.connect(tls.clone()))
                    .await
                    .map_err(timeout)?
                    .map_err(refused)?;
                tokio::spawn(async move { conn.await.map_err(ended) });
                Ok(client)
            }
        }
    }

    fn manager(&self) -> Manager {
        let mc = ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        };
        match &self.tls {
            None => Manager::from_config(self.cfg.clone(), NoTls, mc),
            Some(tls) => Manager::from_config(self.cfg.clone(), tls.clone(), mc),
        }
    }
}

async fn migrate(client: &mut Client, url: &str) -> Result<(), StoreError> {
    let open = |e: tokio_postgres::Error| StoreError::Open {
        path: redact(url),
        reason: format!("migrating the schema failed: {e}"),
    };
    let tx = client.transaction().await.map_err(open)?;
    // One process migrates at a time.
    tx.batch_execute(
        "SELECT pg_advisory_xact_lock(7385742001);
         CREATE TABLE IF NOT EXISTS sagatx_schema (version INTEGER NOT NULL);",
    )
    .await
    .map_err(open)?;
    let version: i32 = tx
        .query_opt("SELECT version FROM sagatx_schema", &[])
        .await
        .map_err(open)?
        .map(|r| r.get(0))
        .unwrap_or(0);
    for m in super::migrations::pending(MIGRATIONS, version as i64, &redact(url))? {
        tx.batch_execute(m.sql)
            .await
            .map_err(|e| StoreError::Open {
                path: redact(url),
                reason: format!("migration {} ({}) failed: {e}", m.version, m.name),
            })?;
    }
    tx.execute("DELETE FROM sagatx_schema", &[])
        .await
        .map_err(open)?;
    tx.execute(
        "INSERT INTO sagatx_schema (version) VALUES ($1)",
        &[&PG_SCHEMA_VERSION],
    )
    .await
    .map_err(open)?;
    let mut fresh = [0u8; 32];
    fresh[..16].copy_from_slice(Uuid::new_v4().as_bytes());
    fresh[16..].copy_from_slice(Uuid::new_v4().as_bytes());
    tx.execute(
        "INSERT INTO sagatx_meta (key, value) VALUES ('secret', $1) ON CONFLICT DO NOTHING",
        &[&fresh.as_slice()],
    )
    .await
    .map_err(open)?;
    tx.commit().await.map_err(open)
}

impl PostgresStore {
    /// Connects, migrates the schema, starts the writer, the heartbeat
    /// and the listener, with the default lease.
    pub async fn open(url: &str) -> Result<Self, StoreError> {
        Self::open_with(url, PostgresOptions::default()).await
    }

    /// [`open`](Self::open) with options.
    pub async fn open_with(url: &str, options: PostgresOptions) -> Result<Self, StoreError> {
        let target = target(url)?;
        if options.lease < Duration::from_millis(200) {
            return Err(StoreError::Open {
                path: redact(url),
                reason: "the lease must last at least 200 ms".into(),
            });
        }
        let mut client = target.connect(url).await?;
        migrate(&mut client, url).await?;
        let secret: Vec<u8> = client
            .query_one("SELECT value FROM sagatx_meta WHERE key = 'secret'", &[])
            .await
            .map_err(io)?
            .get(0);
        let secret: [u8; 32] = secret
            .as_slice()
            .try_into()
            .map_err(|_| StoreError::Foreign {
                path: redact(url),
                reason: "its secret is not 32 bytes".into(),
            })?;
        let pool = Pool::builder(target.manager())
            .max_size(16)
            .build()
            .map_err(|e| StoreError::Open {
                path: redact(url),
                reason: e.to_string(),
            })?;
        let shared = Arc::new(Shared {
            owner: Uuid::new_v4(),
            lease_ms: options.lease.as_millis().min(i64::MAX as u128) as i64,
            wake: Mutex::new(None),
        });
        // This process, for `peers` (a migration refuses to copy a
        // database that processes use).
        client
            .execute(
                "INSERT INTO sagatx_processes (owner, host, pid, lease_ms, started_at, seen_at)
                 VALUES ($1, $2, $3, $4, sagatx_now_ms(), sagatx_now_ms())",
                &[
                    &shared.owner,
                    &std::env::var("HOSTNAME").unwrap_or_default(),
                    &(std::process::id() as i32),
                    &shared.lease_ms,
                ],
            )
            .await
            .map_err(io)?;
        let (stop, stopped) = tokio::sync::watch::channel(());
        let (tx, rx) = mpsc::channel(8192);
        tokio::spawn(writer(
            client,
            target.clone(),
            url.to_string(),
            rx,
            shared.clone(),
        ));
        tokio::spawn(renew(pool.clone(), shared.clone(), stopped.clone()));
        match target.tls {
            None => tokio::spawn(listen(target.cfg, NoTls, shared.clone(), stopped)),
            Some(tls) => tokio::spawn(listen(target.cfg, tls, shared.clone(), stopped)),
        };
        tracing::info!(owner = %shared.owner, lease_ms = shared.lease_ms, "PostgreSQL store open");
        Ok(PostgresStore {
            pool,
            writer: tx,
            secret: std::sync::Mutex::new(secret),
            shared,
            _stop: stop,
        })
    }

    async fn read(&self) -> Result<deadpool_postgres::Object, StoreError> {
        self.pool
            .get()
            .await
            .map_err(|e| StoreError::Io(format!("no PostgreSQL connection: {e}")))
    }

    async fn send(&self, w: Write) -> Result<(), StoreError> {
        self.writer.send(w).await.map_err(|_| StoreError::Closed)
    }
}

async fn writer(
    mut client: Client,
    target: Target,
    url: String,
    mut rx: mpsc::Receiver<Write>,
    shared: Arc<Shared>,
) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    let mut statements: Option<Statements> = None;
    let mut failures = crate::throttle::CommitFailures::new("PostgreSQL".into());
    while let Some(first) = rx.recv().await {
        batch.push(first);
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(w) => batch.push(w),
                Err(_) => break,
            }
        }
        let started = std::time::Instant::now();
        let n = batch.len();
        let mut unprepared = None;
        if statements.is_none() {
            match prepare(&client).await {
                Ok(s) => statements = Some(s),
                Err(e) => unprepared = Some(describe(&e)),
            }
        }
        let span = tracing::debug_span!("store_commit", store = "postgres", batch = n);
        let result: Result<Vec<Done>, String> = match &statements {
            Some(st) => {
                tracing::Instrument::instrument(apply(&mut client, st, &batch, &shared), span)
                    .await
                    .map_err(|e| describe(&e))
            }
            None => Err(format!(
                "cannot prepare the journal's statements: {}",
                unprepared.unwrap_or_default()
            )),
        };
        match result {
            Ok(results) => {
                failures.succeeded(std::time::Instant::now());
                for (w, r) in batch.drain(..).zip(results) {
                    answer(w, Ok(r));
                }
            }
            Err(e) => {
                failures.failed(&e, std::time::Instant::now());
                // The outcome of a commit whose answer was lost is unknown;
                // the engine rereads the state before it tries again.
                for w in batch.drain(..) {
                    answer(w, Err(StoreError::Io(e.clone())));
                }
                if client.is_closed() {
                    // PostgreSQL went away: wait for it and reconnect.
                    // Writes queue up meanwhile (bounded: senders wait);
                    // leases that ran out meanwhile fence this process's
                    // later writes.
                    let mut backoff = Duration::from_millis(100);
                    loop {
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(5));
                        if let Ok(c) = target.connect(&url).await {
                            tracing::info!("reconnected to PostgreSQL");
                            client = c;
                            statements = None;
                            break;
                        }
                    }
                }
            }
        }
        metrics::histogram!("sagatx_store_commit_seconds").record(started.elapsed().as_secs_f64());
        metrics::histogram!("sagatx_store_batch_size").record(n as f64);
    }
}

enum Done {
    Appended(Result<(), StoreError>),
    Defined(Registered),
    Recorded(u64),
    Finished,
}

fn answer(w: Write, r: Result<Done, StoreError>) {
    match w {
        Write::Release(_, _, tx) => {
            let _ = tx.send(r.map(|_| ()));
        }
        Write::Append(_, _, _, tx) => {
            let _ = tx.send(match r {
                Ok(Done::Appended(r)) => r,
                Ok(_) => Err(StoreError::Io("internal: mismatched reply".into())),
                Err(e) => Err(e),
            });
        }
        Write::Definition(_, _, tx) => {
            let _ = tx.send(match r {
                Ok(Done::Defined(r)) => Ok(r),
                Ok(_) => Err(StoreError::Io("internal: mismatched reply".into())),
                Err(e) => Err(e),
            });
        }
        Write::OpRecord(_, _, _, tx) => {
            let _ = tx.send(match r {
                Ok(Done::Recorded(id)) => Ok(id),
                Ok(_) => Err(StoreError::Io("internal: mismatched reply".into())),
                Err(e) => Err(e),
            });
        }
        Write::OpFinish(_, _, _, tx) => {
            let _ = tx.send(r.map(|_| ()));
        }
    }
}

/// The writer's statements, prepared once per connection.
struct Statements {
    insert: tokio_postgres::Statement,
    update: tokio_postgres::Statement,
    release: tokio_postgres::Statement,
    /// `insert` and `update` for many executions at once, their values in
    /// arrays (see [`BULK_MIN`]).
    insert_many: tokio_postgres::Statement,
    update_many: tokio_postgres::Statement,
}

/// The fewest writes of new or of existing executions that a batch sends
/// as one statement over arrays rather than one statement per write.
/// PostgreSQL's work per statement (binding, starting the executor, a
/// snapshot) is paid once: a batch of 256 updates took 4.2 ms against 7.0 ms
/// as 256 pipelined prepared statements (pgbench, fsync on, the table and
/// indexes of this store), 16 µs a row against 27.
const BULK_MIN: usize = 4;

async fn prepare(client: &Client) -> Result<Statements, tokio_postgres::Error> {
    Ok(Statements {
        insert: client
            .prepare(
                "INSERT INTO sagatx_executions
                   (id, saga, status, seq, due_at, created_at, updated_at, state, lease_owner, lease_epoch,
                    paused_at)
                 VALUES ($1, $2, $3, 1, $4, $5, $6, $7, $8::UUID, 1, CASE WHEN $3::TEXT = 'paused' THEN $6::BIGINT END)
                 ON CONFLICT (id) DO NOTHING",
            )
            .await?,
        // A terminal write gives the lease up. The lease columns are not
        // otherwise touched, so that a write that changes no indexed column
        // stays a HOT update.
        update: client
            .prepare(
                "UPDATE sagatx_executions SET status = $2, seq = $3, due_at = $4, updated_at = $5, state = $6,
                   paused_at = CASE WHEN $2::TEXT = 'paused' THEN COALESCE(paused_at, $5::BIGINT) END,
                   lease_owner = CASE WHEN $11 THEN lease_owner ELSE $8::UUID END
                 WHERE id = $1 AND seq = $7
                   AND ((lease_owner = $9 AND lease_epoch = $10)
                        OR ($10 = 0 AND (lease_owner IS NULL OR lease_owner = $9)))",
            )
            .await?,
        release: client
            .prepare(
                "UPDATE sagatx_executions SET lease_owner = NULL
                 WHERE id = $1 AND lease_owner = $2 AND lease_epoch = $3",
            )
            .await?,
        // The same two writes as `insert` and `update`, a row of the arrays
        // for each execution; they give back the ids they wrote.
        insert_many: client
            .prepare(
                "INSERT INTO sagatx_executions
                   (id, saga, status, seq, due_at, created_at, updated_at, state, lease_owner, lease_epoch,
                    paused_at)
                 SELECT u.id, u.saga, u.status, 1, u.due_at, u.created_at, u.updated_at, u.state, u.owner, 1,
                   CASE WHEN u.status = 'paused' THEN u.updated_at END
                 FROM unnest($1::UUID[], $2::TEXT[], $3::TEXT[], $4::BIGINT[], $5::BIGINT[],
                             $6::BIGINT[], $7::BYTEA[], $8::UUID[])
                      AS u(id, saga, status, due_at, created_at, updated_at, state, owner)
                 ON CONFLICT (id) DO NOTHING
                 RETURNING id",
            )
            .await?,
        update_many: client
            .prepare(
                "UPDATE sagatx_executions t SET status = u.status, seq = u.seq, due_at = u.due_at,
                   updated_at = u.updated_at, state = u.state,
                   paused_at = CASE WHEN u.status = 'paused' THEN COALESCE(t.paused_at, u.updated_at) END,
                   lease_owner = CASE WHEN u.keep THEN t.lease_owner ELSE u.owner END
                 FROM unnest($1::UUID[], $2::TEXT[], $3::BIGINT[], $4::BIGINT[], $5::BIGINT[],
                             $6::BYTEA[], $7::UUID[], $8::BIGINT[], $9::BOOL[])
                      AS u(id, status, seq, due_at, updated_at, state, owner, epoch, keep)
                 WHERE t.id = u.id AND t.seq = u.seq - 1
                   AND ((t.lease_owner = $10 AND t.lease_epoch = u.epoch)
                        OR (u.epoch = 0 AND (t.lease_owner IS NULL OR t.lease_owner = $10)))
                 RETURNING t.id",
            )
            .await?,
    })
}

/// One execution's write in a batch, with what its statement needs.
struct P<'a> {
    ex: &'a Execution,
    state: &'a Vec<u8>,
    due: Option<i64>,
    epoch: i64,
    /// The lease after the write: this process's, or none once the
    /// execution is terminal (or when nobody held it).
    owner: Option<Uuid>,
    /// A write under no lease leaves the lease as it is.
    keep: bool,
}

/// Rows written by each of `appends`, one statement each, pipelined on
/// the connection (sent together, answered in order): one round trip for
/// the batch instead of one per write.
async fn write_each(
    tx: &tokio_postgres::Transaction<'_>,
    st: &Statements,
    appends: &[P<'_>],
    me: Uuid,
) -> Result<Vec<u64>, tokio_postgres::Error> {
    let (insert, update) = (&st.insert, &st.update);
    futures_util::future::try_join_all(appends.iter().map(|p| async move {
        let ex = p.ex;
        if ex.seq == 1 {
            tx.execute(
                insert,
                &[
                    &ex.id.0,
                    &ex.saga.as_str(),
                    &ex.status.as_str(),
                    &p.due,
                    &(ex.created_at_ms as i64),
                    &(ex.updated_at_ms as i64),
                    p.state,
                    &p.owner,
                ],
            )
            .await
        } else {
            tx.execute(
                update,
                &[
                    &ex.id.0,
                    &ex.status.as_str(),
                    &(ex.seq as i64),
                    &p.due,
                    &(ex.updated_at_ms as i64),
                    p.state,
                    &((ex.seq - 1) as i64),
                    &p.owner,
                    &me,
                    &p.epoch,
                    &p.keep,
                ],
            )
            .await
        }
    }))
    .await
}

/// Rows written by each of `appends` (no two of one execution), with one
/// statement for the new executions and one for the others.
async fn write_many(
    tx: &tokio_postgres::Transaction<'_>,
    st: &Statements,
    appends: &[P<'_>],
    me: Uuid,
) -> Result<Vec<u64>, tokio_postgres::Error> {
    let (new, old): (Vec<&P<'_>>, Vec<&P<'_>>) = appends.iter().partition(|p| p.ex.seq == 1);
    let inserted = async {
        if new.is_empty() {
            return Ok(Vec::new());
        }
        let ids: Vec<Uuid> = new.iter().map(|p| p.ex.id.0).collect();
        let sagas: Vec<&str> = new.iter().map(|p| p.ex.saga.as_str()).collect();
        let statuses: Vec<&str> = new.iter().map(|p| p.ex.status.as_str()).collect();
        let dues: Vec<Option<i64>> = new.iter().map(|p| p.due).collect();
        let created: Vec<i64> = new.iter().map(|p| p.ex.created_at_ms as i64).collect();
        let updated: Vec<i64> = new.iter().map(|p| p.ex.updated_at_ms as i64).collect();
        let states: Vec<&[u8]> = new.iter().map(|p| p.state.as_slice()).collect();
        let owners: Vec<Option<Uuid>> = new.iter().map(|p| p.owner).collect();
        tx.query(
            &st.insert_many,
            &[
                &ids, &sagas, &statuses, &dues, &created, &updated, &states, &owners,
            ],
        )
        .await
    };
    let updated = async {
        if old.is_empty() {
            return Ok(Vec::new());
        }
        let ids: Vec<Uuid> = old.iter().map(|p| p.ex.id.0).collect();
        let statuses: Vec<&str> = old.iter().map(|p| p.ex.status.as_str()).collect();
        let seqs: Vec<i64> = old.iter().map(|p| p.ex.seq as i64).collect();
        let dues: Vec<Option<i64>> = old.iter().map(|p| p.due).collect();
        let times: Vec<i64> = old.iter().map(|p| p.ex.updated_at_ms as i64).collect();
        let states: Vec<&[u8]> = old.iter().map(|p| p.state.as_slice()).collect();
        let owners: Vec<Option<Uuid>> = old.iter().map(|p| p.owner).collect();
        let epochs: Vec<i64> = old.iter().map(|p| p.epoch).collect();
        let keeps: Vec<bool> = old.iter().map(|p| p.keep).collect();
        tx.query(
            &st.update_many,
            &[
                &ids, &statuses, &seqs, &dues, &times, &states, &owners, &epochs, &keeps, &me,
            ],
        )
        .await
    };
    let (inserted, updated) = futures_util::future::try_join(inserted, updated).await?;
    let written: std::collections::HashSet<Uuid> = inserted
        .iter()
        .chain(&updated)
        .map(|r| r.get::<_, Uuid>(0))
        .collect();
    Ok(appends
        .iter()
        .map(|p| u64::from(written.contains(&p.ex.id.0)))
        .collect())
}

async fn apply(
    client: &mut Client,
    st: &Statements,
    batch: &[Write],
    shared: &Shared,
) -> Result<Vec<Done>, tokio_postgres::Error> {
    let tx = client.transaction().await?;
    let me = shared.owner;
    let appends: Vec<P<'_>> = batch
        .iter()
        .filter_map(|w| match w {
            Write::Append(ex, state, epoch, _) => Some(P {
                ex,
                state,
                due: ex.next_due_ms().map(|d| d as i64),
                epoch: *epoch as i64,
                owner: (*epoch != 0 && !ex.status.is_terminal()).then_some(me),
                keep: *epoch == 0 && !ex.status.is_terminal(),
            }),
            _ => None,
        })
        .collect();
    let tx_ref = &tx;
    // Many writes go as two statements over arrays (the new executions',
    // then the others'); a few, or a batch holding two writes of one
    // execution (which one statement would not apply one after the other),
    // as one statement each.
    let bulk = appends.len() >= BULK_MIN && {
        let mut ids = std::collections::HashSet::with_capacity(appends.len());
        appends.iter().all(|p| ids.insert(p.ex.id))
    };
    let writes = async {
        if bulk {
            write_many(tx_ref, st, &appends, me).await
        } else {
            write_each(tx_ref, st, &appends, me).await
        }
    };
    let releases = futures_util::future::try_join_all(batch.iter().filter_map(|w| match w {
        Write::Release(id, epoch, _) => {
            let (release, epoch) = (&st.release, *epoch as i64);
            Some(async move { tx_ref.execute(release, &[&id.0, &me, &epoch]).await })
        }
        _ => None,
    }));
    let (counts, _) = futures_util::future::try_join(writes, releases).await?;
    let mut counts = counts.into_iter();
    let mut out = Vec::with_capacity(batch.len());
    for w in batch {
        match w {
            Write::Release(..) => out.push(Done::Finished),
            Write::Append(ex, _, _, _) => {
                let n = counts.next().unwrap_or(0);
                if ex.seq == 1 {
                    out.push(Done::Appended(if n == 1 {
                        Ok(())
                    } else {
                        Err(StoreError::Exists(ex.id))
                    }));
                } else if n == 1 {
                    out.push(Done::Appended(Ok(())));
                } else {
                    let row = tx
                        .query_opt(
                            "SELECT seq, lease_owner, lease_epoch FROM sagatx_executions WHERE id = $1",
                            &[&ex.id.0],
                        )
                        .await?;
                    let found = row.as_ref().map(|r| r.get::<_, i64>(0) as u64);
                    // Another process holds it (or claimed it since this
                    // writer's lease): it moved on without this one.
                    let lost = row.as_ref().is_some_and(|r| {
                        let owner: Option<Uuid> = r.get(1);
                        let epoch = r.get::<_, i64>(2) as u64;
                        match owner {
                            Some(o) if o != me => true,
                            Some(_) => *w_epoch(w) != 0 && epoch != *w_epoch(w),
                            None => *w_epoch(w) != 0 && found != Some(ex.seq - 1),
                        }
                    });
                    out.push(Done::Appended(Err(if lost || found == Some(ex.seq - 1) {
                        StoreError::LeaseLost(ex.id)
                    } else {
                        StoreError::Conflict {
                            id: ex.id,
                            expected: ex.seq - 1,
                            found,
                        }
                    })));
                }
            }
            Write::Definition(def, now_ms, _) => {
                let body = def.to_json();
                tx.execute("SELECT pg_advisory_xact_lock(hashtext($1))", &[&def.name])
                    .await?;
                let latest = tx
                    .query_opt(
                        "SELECT version, body FROM sagatx_definitions WHERE name = $1 ORDER BY version DESC LIMIT 1",
                        &[&def.name],
                    )
                    .await?
                    .map(|r| (r.get::<_, i32>(0), r.get::<_, String>(1)));
                let same = latest.as_ref().is_some_and(|(_, b)| {
                    serde_json::from_str::<serde_json::Value>(b).ok().as_ref() == Some(&body)
                });
                match latest {
                    Some((v, _)) if same => out.push(Done::Defined(Registered {
                        version: v as u32,
                        created: false,
                    })),
                    latest => {
                        let v = latest.map(|(v, _)| v).unwrap_or(0) + 1;
                        tx.execute(
                            "INSERT INTO sagatx_definitions (name, version, body, created_at) VALUES ($1, $2, $3, $4)",
                            &[&def.name, &v, &body.to_string(), &(*now_ms as i64)],
                        )
                        .await?;
                        out.push(Done::Defined(Registered {
                            version: v as u32,
                            created: true,
                        }));
                    }
                }
            }
            Write::OpRecord(name, args, now_ms, _) => {
                let id: i64 = tx
                    .query_one(
                        "INSERT INTO sagatx_oplog (name, args, created_at) VALUES ($1, $2, $3) RETURNING id",
                        &[name, args, &(*now_ms as i64)],
                    )
                    .await?
                    .get(0);
                out.push(Done::Recorded(id as u64));
            }
            Write::OpFinish(id, error, now_ms, _) => {
                tx.execute(
                    "UPDATE sagatx_oplog SET finished_at = $2, error = $3 WHERE id = $1 AND finished_at IS NULL",
                    &[&(*id as i64), &(*now_ms as i64), error],
                )
                .await?;
                out.push(Done::Finished);
            }
        }
    }
    tx.commit().await?;
    Ok(out)
}

fn decode(id: Uuid, state: &[u8]) -> Result<Execution, StoreError> {
    Execution::from_raw(state).map_err(|source| StoreError::Corrupt {
        id: id.to_string(),
        source,
    })
}

fn page_of(rows: Vec<tokio_postgres::Row>, limit: usize, newest_first: bool) -> Page {
    let mut items = Vec::new();
    let mut next_cursor = None;
    for r in rows {
        let n: i64 = r.get(0);
        if items.len() == limit {
            next_cursor = Some(if newest_first { n as u64 + 1 } else { n as u64 });
            break;
        }
        let id: Uuid = r.get(1);
        let state: Vec<u8> = r.get(2);
        match decode(id, &state) {
            Ok(ex) => items.push(ex),
            Err(e) => tracing::error!(error = %e, "skipping an unreadable journal entry"),
        }
    }
    Page { items, next_cursor }
}

#[async_trait]
impl Store for PostgresStore {
    async fn put_definition(&self, def: &SagaDefinition) -> Result<Registered, StoreError> {
        let (tx, rx) = oneshot::channel();
        self.send(Write::Definition(Box::new(def.clone()), now_ms(), tx))
            .await?;
        rx.await.map_err(|_| StoreError::Closed)?
    }

    async fn get_definition(
        &self,
        name: &str,
        version: Option<u32>,
    ) -> Result<Option<(u32, SagaDefinition)>, StoreError> {
        let c = self.read().await?;
        let row = match version {
            Some(v) => c
                .query_opt(
                    "SELECT version, body FROM sagatx_definitions WHERE name = $1 AND version = $2",
                    &[&name, &(v as i32)],
                )
                .await,
            None => c
                .query_opt(
                    "SELECT version, body FROM sagatx_definitions WHERE name = $1 ORDER BY version DESC LIMIT 1",
                    &[&name],
                )
                .await,
        }
        .map_err(io)?;
        match row {
            None => Ok(None),
            Some(r) => {
                let (v, body): (i32, String) = (r.get(0), r.get(1));
                let def = SagaDefinition::from_json(body.as_bytes()).map_err(|e| {
                    StoreError::Io(format!("stored definition {name} v{v} is unreadable: {e}"))
                })?;
                Ok(Some((v as u32, def)))
            }
        }
    }

    async fn list_definitions(&self) -> Result<Vec<(String, u32)>, StoreError> {
        let c = self.read().await?;
        let rows = c
            .query(
                "SELECT name, max(version) FROM sagatx_definitions GROUP BY name ORDER BY name",
                &[],
            )
            .await
            .map_err(io)?;
        Ok(rows
            .iter()
            .map(|r| (r.get::<_, String>(0), r.get::<_, i32>(1) as u32))
            .collect())
    }

    async fn append(&self, ex: &Execution) -> Result<(), StoreError> {
        let state = ex.to_raw().map_err(|source| StoreError::Corrupt {
            id: ex.id.to_string(),
            source,
        })?;
        let (tx, rx) = oneshot::channel();
        self.send(Write::Append(Box::new(ex.clone()), state, 0, tx))
            .await?;
        rx.await.map_err(|_| StoreError::Closed)?
    }

    async fn load(&self, id: ExecutionId) -> Result<Option<Execution>, StoreError> {
        let c = self.read().await?;
        let row = c
            .query_opt(
                "SELECT state FROM sagatx_executions WHERE id = $1",
                &[&id.0],
            )
            .await
            .map_err(io)?;
        row.map(|r| decode(id.0, &r.get::<_, Vec<u8>>(0)))
            .transpose()
    }

    async fn list(&self, q: &ListQuery) -> Result<Page, StoreError> {
        let c = self.read().await?;
        let upper = q.cursor.map(|c| c as i64).unwrap_or(i64::MAX);
        let status = q.status.map(|s| s.as_str());
        let rows = c
            .query(
                "SELECT n, id, state FROM sagatx_executions
                 WHERE n < $1 AND ($2::TEXT IS NULL OR status = $2) AND ($3::TEXT IS NULL OR saga = $3)
                 ORDER BY n DESC LIMIT $4",
                &[&upper, &status, &q.saga, &((q.limit + 1) as i64)],
            )
            .await
            .map_err(io)?;
        Ok(page_of(rows, q.limit, true))
    }

    async fn due(&self, now_ms: u64, limit: usize) -> Result<Vec<ExecutionId>, StoreError> {
        let c = self.read().await?;
        let rows = c
            .query(
                "SELECT id FROM sagatx_executions WHERE due_at IS NOT NULL AND due_at <= $1 ORDER BY due_at LIMIT $2",
                &[&(now_ms.min(i64::MAX as u64) as i64), &(limit as i64)],
            )
            .await
            .map_err(io)?;
        Ok(rows.iter().map(|r| ExecutionId(r.get(0))).collect())
    }

    async fn secret(&self) -> Result<[u8; 32], StoreError> {
        Ok(*self.secret.lock().unwrap_or_else(|p| p.into_inner()))
    }

    async fn paused_before(&self, before_ms: u64, limit: usize) -> Result<Vec<Paused>, StoreError> {
        let c = self.read().await?;
        let rows = c
            .query(PG_PAUSED_BEFORE, &[&clamp_ms(before_ms), &(limit as i64)])
            .await
            .map_err(io)?;
        let mut out = Vec::with_capacity(rows.len());
        for r in rows {
            let id: Uuid = r.get(1);
            let state: Vec<u8> = r.get(2);
            let since: i64 = r.get(3);
            // A damaged entry hides nothing else (as in the lists).
            match decode(id, &state) {
                Ok(execution) => out.push(Paused {
                    since_ms: since as u64,
                    execution,
                }),
                Err(e) => tracing::error!(error = %e, "skipping an unreadable journal entry"),
            }
        }
        Ok(out)
    }

    async fn summary(&self) -> Result<super::Summary, StoreError> {
        let c = self.read().await?;
        let rows = c
            .query(
                "SELECT saga, status, sum(n)::BIGINT FROM sagatx_counts
                 GROUP BY saga, status HAVING sum(n) <> 0 ORDER BY saga, status",
                &[],
            )
            .await
            .map_err(io)?;
        let mut counts = Vec::new();
        for r in rows {
            let status: String = r.get(1);
            counts.push((
                r.get::<_, String>(0),
                status.parse().map_err(StoreError::Io)?,
                // Never below zero unless rows were changed behind the
                // triggers' back; a count is not an error worth failing on.
                r.get::<_, i64>(2).max(0) as u64,
            ));
        }
        Ok(super::Summary { counts })
    }

    async fn import_secret(&self, secret: [u8; 32]) -> Result<(), StoreError> {
        let c = self.read().await?;
        c.execute(
            "UPDATE sagatx_meta SET value = $1 WHERE key = 'secret'",
            &[&secret.as_slice()],
        )
        .await
        .map_err(io)?;
        *self.secret.lock().unwrap_or_else(|p| p.into_inner()) = secret;
        Ok(())
    }

    async fn scan(&self, cursor: Option<u64>, limit: usize) -> Result<Page, StoreError> {
        let c = self.read().await?;
        let rows = c
            .query(
                "SELECT n, id, state FROM sagatx_executions WHERE n >= $1 ORDER BY n LIMIT $2",
                &[&(cursor.unwrap_or(0) as i64), &((limit + 1) as i64)],
            )
            .await
            .map_err(io)?;
        let mut items = Vec::new();
        let mut next_cursor = None;
        for r in rows {
            let n: i64 = r.get(0);
            if items.len() == limit {
                next_cursor = Some(n as u64);
                break;
            }
            items.push(decode(r.get(1), &r.get::<_, Vec<u8>>(2))?);
        }
        Ok(Page { items, next_cursor })
    }

    async fn import(&self, ex: &Execution) -> Result<(), StoreError> {
        let state = ex.to_raw().map_err(|source| StoreError::Corrupt {
            id: ex.id.to_string(),
            source,
        })?;
        let c = self.read().await?;
        let n = c
            .execute(
                "INSERT INTO sagatx_executions
                   (id, saga, status, seq, due_at, created_at, updated_at, state, paused_at)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, CASE WHEN $3::TEXT = 'paused' THEN $7::BIGINT END)
                 ON CONFLICT (id) DO NOTHING",
                &[
                    &ex.id.0,
                    &ex.saga.as_str(),
                    &ex.status.as_str(),
                    &(ex.seq as i64),
                    &ex.next_due_ms().map(|d| d as i64),
                    &(ex.created_at_ms as i64),
                    &(ex.updated_at_ms as i64),
                    &state,
                ],
            )
            .await
            .map_err(io)?;
        if n == 1 {
            Ok(())
        } else {
            Err(StoreError::Exists(ex.id))
        }
    }

    async fn op_record(
        &self,
        name: &str,
        args: &serde_json::Value,
        now_ms: u64,
    ) -> Result<u64, StoreError> {
        let (tx, rx) = oneshot::channel();
        self.send(Write::OpRecord(
            name.to_string(),
            args.to_string(),
            now_ms,
            tx,
        ))
        .await?;
        rx.await.map_err(|_| StoreError::Closed)?
    }

    async fn op_finish(&self, id: u64, error: Option<&str>, now_ms: u64) -> Result<(), StoreError> {
        let (tx, rx) = oneshot::channel();
        self.send(Write::OpFinish(id, error.map(str::to_string), now_ms, tx))
            .await?;
        rx.await.map_err(|_| StoreError::Closed)?
    }

    async fn op_pending(
        &self,
        after: Option<u64>,
        limit: usize,
    ) -> Result<Vec<OpRecord>, StoreError> {
        let c = self.read().await?;
        let rows = c
            .query(
                "SELECT id, name, args, created_at FROM sagatx_oplog
                 WHERE finished_at IS NULL AND id > $1 ORDER BY id LIMIT $2",
                &[&(after.unwrap_or(0) as i64), &(limit as i64)],
            )
            .await
            .map_err(io)?;
        rows.iter()
            .map(|r| {
                let id: i64 = r.get(0);
                let args: String = r.get(2);
                Ok(OpRecord {
                    id: id as u64,
                    name: r.get(1),
                    args: serde_json::from_str(&args).map_err(|e| {
                        StoreError::Io(format!("operation {id} has unreadable arguments: {e}"))
                    })?,
                    created_at_ms: r.get::<_, i64>(3) as u64,
                })
            })
            .collect()
    }

    fn leases(&self) -> Option<&dyn Leases> {
        Some(self)
    }

    async fn unfinished(&self, cursor: Option<u64>, limit: usize) -> Result<Page, StoreError> {
        let c = self.read().await?;
        let rows = c
            .query(
                "SELECT n, id, state FROM sagatx_executions
                 WHERE status IN ('created', 'running', 'compensating') AND n >= $1
                 ORDER BY n LIMIT $2",
                &[&(cursor.unwrap_or(0) as i64), &((limit + 1) as i64)],
            )
            .await
            .map_err(io)?;
        Ok(page_of(rows, limit, false))
    }
}

fn w_epoch(w: &Write) -> &u64 {
    match w {
        Write::Append(_, _, epoch, _) => epoch,
        _ => &0,
    }
}

fn clamp_ms(ms: u64) -> i64 {
    ms.min(i64::MAX as u64) as i64
}

#[async_trait]
impl Leases for PostgresStore {
    fn owner(&self) -> Uuid {
        self.shared.owner
    }

    async fn claim(&self, id: ExecutionId) -> Result<Claim, StoreError> {
        let c = self.read().await?;
        let me = self.shared.owner;
        let row = c
            .query_opt(
                "UPDATE sagatx_executions
                 SET lease_owner = $2, lease_epoch = lease_epoch + 1
                 WHERE id = $1 AND (lease_owner IS NULL OR lease_owner = $2 OR lease_owner IN (
                     SELECT owner FROM sagatx_processes WHERE seen_at + lease_ms < sagatx_now_ms())
                   OR NOT EXISTS (SELECT 1 FROM sagatx_processes WHERE owner = lease_owner))
                 RETURNING lease_epoch, state",
                &[&id.0, &me],
            )
            .await
            .map_err(io)?;
        let Some(row) = row else {
            let exists = c
                .query_opt("SELECT 1 FROM sagatx_executions WHERE id = $1", &[&id.0])
                .await
                .map_err(io)?;
            return Ok(if exists.is_some() {
                Claim::Held
            } else {
                Claim::Missing
            });
        };
        let epoch = row.get::<_, i64>(0) as u64;
        let ex = decode(id.0, &row.get::<_, Vec<u8>>(1))?;
        Ok(Claim::Mine {
            ex: Box::new(ex),
            epoch,
        })
    }

    async fn claim_due(
        &self,
        now_ms: u64,
        limit: usize,
        orphans: bool,
    ) -> Result<Vec<Claimed>, StoreError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let c = self.read().await?;
        // Three kinds, each by its own index; rows another process is
        // claiming at this moment are skipped, not waited for.
        let rows = c
            .query(
                "WITH due AS (
                    SELECT id FROM sagatx_executions
                    WHERE due_at IS NOT NULL AND due_at <= $1 AND lease_owner IS NULL
                    ORDER BY due_at LIMIT $3 FOR UPDATE SKIP LOCKED),
                 dead AS (
                    SELECT owner FROM sagatx_processes
                    WHERE owner <> $2 AND seen_at + lease_ms < sagatx_now_ms()),
                 lapsed AS (
                    SELECT id FROM sagatx_executions
                    WHERE lease_owner IN (SELECT owner FROM dead)
                    LIMIT $3 FOR UPDATE SKIP LOCKED),
                 orphans AS (
                    SELECT id FROM sagatx_executions
                    WHERE $4 AND lease_owner IS NULL AND status IN ('created', 'running', 'compensating')
                    ORDER BY n LIMIT $3 FOR UPDATE SKIP LOCKED)
                 UPDATE sagatx_executions e
                 SET lease_owner = $2, lease_epoch = e.lease_epoch + 1
                 WHERE e.id IN (SELECT id FROM due UNION SELECT id FROM lapsed UNION SELECT id FROM orphans)
                 RETURNING e.id, e.lease_epoch, e.state",
                &[&clamp_ms(now_ms), &self.shared.owner, &(limit as i64), &orphans],
            )
            .await
            .map_err(io)?;
        let mut out = Vec::with_capacity(rows.len());
        for r in rows {
            let id = ExecutionId(r.get(0));
            let epoch = r.get::<_, i64>(1) as u64;
            match decode(id.0, &r.get::<_, Vec<u8>>(2)) {
                Ok(ex) => out.push(Claimed { ex, epoch }),
                Err(e) => {
                    tracing::error!(error = %e, "skipping an unreadable journal entry");
                    self.release(id, epoch).await;
                }
            }
        }
        Ok(out)
    }

    async fn append_leased(&self, ex: &Execution, epoch: u64) -> Result<(), StoreError> {
        let state = ex.to_raw().map_err(|source| StoreError::Corrupt {
            id: ex.id.to_string(),
            source,
        })?;
        let (tx, rx) = oneshot::channel();
        self.send(Write::Append(Box::new(ex.clone()), state, epoch.max(1), tx))
            .await?;
        rx.await.map_err(|_| StoreError::Closed)?
    }

    async fn release(&self, id: ExecutionId, epoch: u64) {
        // A lease this live process keeps by mistake would hold the
        // execution's due work back from every process (due work is
        // claimed when nobody holds it): retried until it is written, in
        // the background (the writer reconnects after an outage). A later
        // claim's epoch makes a late release a no-op.
        let writer = self.writer.clone();
        tokio::spawn(async move {
            let mut backoff = Duration::from_millis(100);
            loop {
                let (tx, rx) = oneshot::channel();
                if writer.send(Write::Release(id, epoch, tx)).await.is_err() {
                    return; // the store is closed
                }
                match rx.await {
                    Ok(Ok(())) | Err(_) => return,
                    Ok(Err(e)) => {
                        tracing::warn!(execution = %id, error = %e, "cannot give a lease up; retrying")
                    }
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        });
    }

    async fn release_all(&self) -> Result<(), StoreError> {
        let c = self.read().await?;
        c.execute(
            "UPDATE sagatx_executions SET lease_owner = NULL WHERE lease_owner = $1",
            &[&self.shared.owner],
        )
        .await
        .map_err(io)?;
        Ok(())
    }

    async fn peers(&self) -> Result<usize, StoreError> {
        let c = self.read().await?;
        let n: i64 = c
            .query_one(
                "SELECT count(*) FROM sagatx_processes WHERE owner <> $1 AND seen_at + 2 * lease_ms > sagatx_now_ms()",
                &[&self.shared.owner],
            )
            .await
            .map_err(io)?
            .get(0);
        Ok(n as usize)
    }

    async fn forward(&self, id: ExecutionId, command: &Command) -> Result<u64, StoreError> {
        let body = serde_json::to_string(command)
            .map_err(|e| StoreError::Io(format!("cannot encode a command: {e}")))?;
        let c = self.read().await?;
        let inbox: i64 = c
            .query_one(
                "INSERT INTO sagatx_inbox (execution_id, command, created_at) VALUES ($1, $2, $3) RETURNING id",
                &[&id.0, &body, &clamp_ms(now_ms())],
            )
            .await
            .map_err(io)?
            .get(0);
        c.execute(
            "SELECT pg_notify('sagatx_inbox', lease_owner::TEXT) FROM sagatx_executions
             WHERE id = $1 AND lease_owner IS NOT NULL",
            &[&id.0],
        )
        .await
        .map_err(io)?;
        Ok(inbox as u64)
    }

    async fn forwarded(&self, inbox_id: u64) -> Result<Option<Outcome>, StoreError> {
        let c = self.read().await?;
        let row = c
            .query_opt(
                "DELETE FROM sagatx_inbox WHERE id = $1 AND outcome IS NOT NULL RETURNING outcome",
                &[&(inbox_id as i64)],
            )
            .await
            .map_err(io)?;
        row.map(|r| {
            serde_json::from_str(&r.get::<_, String>(0))
                .map_err(|e| StoreError::Io(format!("unreadable command outcome: {e}")))
        })
        .transpose()
    }

    async fn take_inbox(&self, limit: usize) -> Result<Vec<Inboxed>, StoreError> {
        let c = self.read().await?;
        let rows = c
            .query(
                "UPDATE sagatx_inbox SET taken = true WHERE id IN (
                    SELECT i.id FROM sagatx_inbox i JOIN sagatx_executions e ON e.id = i.execution_id
                    WHERE NOT i.taken AND e.lease_owner = $1
                    ORDER BY i.id LIMIT $2 FOR UPDATE OF i SKIP LOCKED)
                 RETURNING id, execution_id, command",
                &[&self.shared.owner, &(limit as i64)],
            )
            .await
            .map_err(io)?;
        let mut out = Vec::with_capacity(rows.len());
        for r in rows {
            let inbox_id = r.get::<_, i64>(0) as u64;
            match serde_json::from_str::<Command>(&r.get::<_, String>(2)) {
                Ok(command) => out.push(Inboxed {
                    inbox_id,
                    execution: ExecutionId(r.get(1)),
                    command,
                }),
                Err(e) => {
                    self.answer(
                        inbox_id,
                        &Outcome::Failed(format!("unreadable command: {e}")),
                    )
                    .await?
                }
            }
        }
        Ok(out)
    }

    async fn answer(&self, inbox_id: u64, outcome: &Outcome) -> Result<(), StoreError> {
        let body = serde_json::to_string(outcome)
            .map_err(|e| StoreError::Io(format!("cannot encode an outcome: {e}")))?;
        let c = self.read().await?;
        c.execute(
            "UPDATE sagatx_inbox SET outcome = $2 WHERE id = $1",
            &[&(inbox_id as i64), &body],
        )
        .await
        .map_err(io)?;
        Ok(())
    }

    fn subscribe(&self, wake: Arc<tokio::sync::Notify>) {
        *self.shared.wake.lock().unwrap_or_else(|p| p.into_inner()) = Some(wake);
    }
}

/// Renews this process's leases every quarter of the lease time (a
/// heartbeat in `sagatx_processes`), and clears old answered inbox entries
/// whose sender went away.
async fn renew(pool: Pool, shared: Arc<Shared>, mut stop: tokio::sync::watch::Receiver<()>) {
    let every = Duration::from_millis((shared.lease_ms / 4).max(50) as u64);
    let mut rounds = 0u64;
    loop {
        let stopping = tokio::select! {
            _ = tokio::time::sleep(every) => false,
            r = stop.changed() => r.is_err(),
        };
        let Ok(c) = pool.get().await else {
            if stopping {
                return;
            }
            continue;
        };
        if stopping {
            // The store was dropped: this process is leaving. Marked gone
            // (not deleted) so that whatever it still holds is claimed by
            // the others at once.
            let _ = c
                .execute(
                    "UPDATE sagatx_processes SET seen_at = 0 WHERE owner = $1",
                    &[&shared.owner],
                )
                .await;
            return;
        }
        // The heartbeat keeps every lease of this process: one row, however
        // many executions it drives. A row removed meanwhile is made again.
        match c
            .execute(
                "INSERT INTO sagatx_processes (owner, host, pid, lease_ms, started_at, seen_at)
                 VALUES ($1, $2, $3, $4, sagatx_now_ms(), sagatx_now_ms())
                 ON CONFLICT (owner) DO UPDATE SET seen_at = sagatx_now_ms()",
                &[
                    &shared.owner,
                    &std::env::var("HOSTNAME").unwrap_or_default(),
                    &(std::process::id() as i32),
                    &shared.lease_ms,
                ],
            )
            .await
        {
            Ok(_) => tracing::trace!("heartbeat"),
            Err(e) => tracing::warn!(error = %io(e), "cannot renew leases (heartbeat)"),
        }
        if let Err(e) = fold_counts(&c).await {
            tracing::warn!(error = %io(e), "cannot fold the summary's counts");
        }
        rounds += 1;
        if rounds.is_multiple_of(256) {
            let _ = c
                .execute(
                    "DELETE FROM sagatx_inbox WHERE outcome IS NOT NULL AND created_at < $1",
                    &[&clamp_ms(now_ms().saturating_sub(3_600_000))],
                )
                .await;
            // Processes gone for an hour that hold nothing.
            let _ = c
                .execute(
                    "DELETE FROM sagatx_processes p WHERE seen_at < sagatx_now_ms() - 3600000
                     AND NOT EXISTS (SELECT 1 FROM sagatx_executions e WHERE e.lease_owner = p.owner)",
                    &[],
                )
                .await;
        }
    }
}

/// Folds the rows of `sagatx_counts` (one a statement that changed a
/// status, since the last fold) into one row for each saga and status, so
/// that the summary sums a few rows, however many executions there are.
/// Nothing is written when the table is already folded. Safe beside other
/// processes folding and writers adding rows: a row is either deleted by
/// this statement and summed into its result, or left as it is (added after
/// its snapshot, or deleted first by another folder, which counted it).
pub(crate) async fn fold_counts(c: &Client) -> Result<u64, tokio_postgres::Error> {
    c.execute(
        "WITH d AS (
             DELETE FROM sagatx_counts
             WHERE (SELECT count(*) FROM sagatx_counts)
                 > (SELECT count(*) FROM (SELECT DISTINCT saga, status FROM sagatx_counts) g)
             RETURNING saga, status, n)
         INSERT INTO sagatx_counts (saga, status, n)
         SELECT saga, status, sum(n) FROM d GROUP BY saga, status HAVING sum(n) <> 0",
        &[],
    )
    .await
}

/// Listens for forwarded commands; wakes the engine on each one meant for
/// this process and after every (re)connect, when notifications may have
/// been missed.
async fn listen<T>(
    cfg: Config,
    tls: T,
    shared: Arc<Shared>,
    mut stop: tokio::sync::watch::Receiver<()>,
) where
    T: tokio_postgres::tls::MakeTlsConnect<tokio_postgres::Socket> + Clone + Send + 'static,
    T::Stream: Send + 'static,
    T::TlsConnect: Send,
    <T::TlsConnect as tokio_postgres::tls::TlsConnect<tokio_postgres::Socket>>::Future: Send,
{
    use futures_util::StreamExt;
    let me = shared.owner.to_string();
    let mut backoff = Duration::from_millis(100);
    loop {
        let connected =
            tokio::time::timeout(Duration::from_secs(10), cfg.connect(tls.clone())).await;
        if let Ok(Ok((client, mut conn))) = connected {
            let (ntx, mut nrx) = mpsc::unbounded_channel::<String>();
            let pump = tokio::spawn(async move {
                let mut messages = futures_util::stream::poll_fn(move |cx| conn.poll_message(cx));
                while let Some(m) = messages.next().await {
                    match m {
                        Ok(tokio_postgres::AsyncMessage::Notification(n)) => {
                            let _ = ntx.send(n.payload().to_string());
                        }
                        Ok(_) => {}
                        Err(_) => break,
                    }
                }
            });
            if client.batch_execute("LISTEN sagatx_inbox").await.is_ok() {
                backoff = Duration::from_millis(100);
                // Catch up on whatever came while not listening.
                shared.wake();
                loop {
                    tokio::select! {
                        n = nrx.recv() => match n {
                            Some(owner) if owner == me => shared.wake(),
                            Some(_) => {}
                            None => break,
                        },
                        r = stop.changed() => if r.is_err() {
                            pump.abort();
                            return;
                        },
                    }
                }
            }
            pump.abort();
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            r = stop.changed() => if r.is_err() { return },
        }
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}
