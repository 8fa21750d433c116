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
//! Not yet here (issue 5): leases and fencing between processes, LISTEN /
//! NOTIFY, TLS. Until then one process drives a database: the writer's
//! connection holds a session advisory lock, and a second process is refused
//! with a clear error instead of driving the same executions twice.

use crate::now_ms;
use std::time::Duration;

use async_trait::async_trait;
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use sagatx_core::{Execution, ExecutionId, SagaDefinition};
use tokio::sync::{mpsc, oneshot};
use tokio_postgres::{Client, Config, NoTls};
use uuid::Uuid;

use super::{ListQuery, OpRecord, Page, Registered, Store, StoreError};

/// Migrations, applied in order; entry `i` takes the schema to version `i+1`.
const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE sagatx_meta (key TEXT PRIMARY KEY, value BYTEA NOT NULL);
CREATE TABLE sagatx_definitions (
    name TEXT NOT NULL, version INTEGER NOT NULL, body TEXT NOT NULL, created_at BIGINT NOT NULL,
    PRIMARY KEY (name, version));
CREATE TABLE sagatx_executions (
    n BIGSERIAL PRIMARY KEY,
    id UUID NOT NULL UNIQUE,
    saga TEXT NOT NULL,
    status TEXT NOT NULL,
    seq BIGINT NOT NULL,
    due_at BIGINT,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL,
    state BYTEA NOT NULL);
CREATE INDEX sagatx_executions_due ON sagatx_executions (due_at) WHERE due_at IS NOT NULL;
CREATE INDEX sagatx_executions_status ON sagatx_executions (status, n);
CREATE INDEX sagatx_executions_saga ON sagatx_executions (saga, n);
CREATE TABLE sagatx_oplog (
    id BIGSERIAL PRIMARY KEY, name TEXT NOT NULL, args TEXT NOT NULL,
    created_at BIGINT NOT NULL, finished_at BIGINT, error TEXT);
CREATE INDEX sagatx_oplog_pending ON sagatx_oplog (id) WHERE finished_at IS NULL;
"#,
    r#"
CREATE INDEX sagatx_executions_saga_status ON sagatx_executions (saga, status);
"#,
];

/// The schema version this build writes.
pub const PG_SCHEMA_VERSION: i32 = MIGRATIONS.len() as i32;
/// Writes applied in one transaction at most.
const MAX_BATCH: usize = 1024;

fn io(e: tokio_postgres::Error) -> StoreError {
    StoreError::Io(format!("PostgreSQL: {e}"))
}

fn redact(url: &str) -> String {
    // Never print a password.
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => format!("{}://…{}", &url[..s], &url[at..]),
        _ => url.to_string(),
    }
}

enum Write {
    Append(
        Box<Execution>,
        Vec<u8>,
        oneshot::Sender<Result<(), StoreError>>,
    ),
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
}

async fn connect(cfg: &Config, url: &str) -> Result<Client, StoreError> {
    let (client, conn) = tokio::time::timeout(Duration::from_secs(10), cfg.connect(NoTls))
        .await
        .map_err(|_| StoreError::Open {
            path: redact(url),
            reason: "no answer within 10 s; check the host and port".into(),
        })?
        .map_err(|e| StoreError::Open {
            path: redact(url),
            reason: format!("{e}; check that PostgreSQL runs there and accepts this user"),
        })?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::warn!(error = %e, "PostgreSQL connection ended");
        }
    });
    Ok(client)
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
    if version > PG_SCHEMA_VERSION {
        return Err(StoreError::FutureSchema {
            path: redact(url),
            found: version as i64,
            known: PG_SCHEMA_VERSION as i64,
        });
    }
    for sql in MIGRATIONS.iter().skip(version as usize) {
        tx.batch_execute(sql).await.map_err(open)?;
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
    /// Connects, migrates the schema, starts the writer.
    pub async fn open(url: &str) -> Result<Self, StoreError> {
        let cfg: Config = url.parse().map_err(|e| StoreError::Open {
            path: redact(url),
            reason: format!("not a PostgreSQL URL: {e}"),
        })?;
        let mut client = connect(&cfg, url).await?;
        migrate(&mut client, url).await?;
        // One process per database until leases land: the writer's
        // connection holds a session lock for the life of the process.
        if !claim(&client).await.map_err(io)? {
            return Err(StoreError::Open {
                path: redact(url),
                reason: "another sagatx process is using this database; this version drives \
                         one database from one process (several processes sharing one \
                         database need leases, not built yet)"
                    .into(),
            });
        }
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
        let mgr = Manager::from_config(
            cfg.clone(),
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(mgr)
            .max_size(16)
            .build()
            .map_err(|e| StoreError::Open {
                path: redact(url),
                reason: e.to_string(),
            })?;
        let (tx, rx) = mpsc::channel(8192);
        tokio::spawn(writer(client, cfg.clone(), url.to_string(), rx));
        Ok(PostgresStore {
            pool,
            writer: tx,
            secret: std::sync::Mutex::new(secret),
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

/// Takes the one-process lock on a (new) writer connection.
async fn claim(client: &Client) -> Result<bool, tokio_postgres::Error> {
    Ok(client
        .query_one("SELECT pg_try_advisory_lock(7385742002)", &[])
        .await?
        .get(0))
}

async fn writer(mut client: Client, cfg: Config, url: String, mut rx: mpsc::Receiver<Write>) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    let mut statements: Option<Statements> = None;
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
        if statements.is_none() {
            statements = prepare(&client).await.ok();
        }
        let result: Result<Vec<Done>, String> = match &statements {
            Some(st) => apply(&mut client, st, &batch)
                .await
                .map_err(|e| e.to_string()),
            None => Err("cannot prepare the journal's statements".into()),
        };
        match result {
            Ok(results) => {
                for (w, r) in batch.drain(..).zip(results) {
                    answer(w, Ok(r));
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "PostgreSQL journal commit failed");
                // The outcome of a commit whose answer was lost is unknown;
                // the engine rereads the state before it tries again.
                for w in batch.drain(..) {
                    answer(w, Err(StoreError::Io(e.clone())));
                }
                if client.is_closed() {
                    // PostgreSQL went away: wait for it, reconnect, and
                    // take the one-process lock again. Writes queue up
                    // meanwhile (bounded: senders wait).
                    let mut backoff = Duration::from_millis(100);
                    loop {
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(5));
                        let Ok(c) = connect(&cfg, &url).await else {
                            continue;
                        };
                        match claim(&c).await {
                            Ok(true) => {
                                tracing::info!("reconnected to PostgreSQL");
                                client = c;
                                statements = None;
                                break;
                            }
                            Ok(false) => {
                                tracing::error!(
                                    "another process took this database while the connection was down; \
                                     this process stops writing to it"
                                );
                                return;
                            }
                            Err(_) => continue,
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
        Write::Append(_, _, tx) => {
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
}

async fn prepare(client: &Client) -> Result<Statements, tokio_postgres::Error> {
    Ok(Statements {
        insert: client
            .prepare(
                "INSERT INTO sagatx_executions (id, saga, status, seq, due_at, created_at, updated_at, state)
                 VALUES ($1, $2, $3, 1, $4, $5, $6, $7) ON CONFLICT (id) DO NOTHING",
            )
            .await?,
        update: client
            .prepare(
                "UPDATE sagatx_executions SET status = $2, seq = $3, due_at = $4, updated_at = $5, state = $6
                 WHERE id = $1 AND seq = $7",
            )
            .await?,
    })
}

async fn apply(
    client: &mut Client,
    st: &Statements,
    batch: &[Write],
) -> Result<Vec<Done>, tokio_postgres::Error> {
    let tx = client.transaction().await?;
    let (insert, update) = (&st.insert, &st.update);
    // The executions' writes are pipelined on the connection (sent
    // together, answered in order): one round trip for the batch instead of
    // one per write.
    struct P<'a> {
        ex: &'a Execution,
        state: &'a Vec<u8>,
        due: Option<i64>,
    }
    let appends: Vec<P<'_>> = batch
        .iter()
        .filter_map(|w| match w {
            Write::Append(ex, state, _) => Some(P {
                ex,
                state,
                due: ex.next_due_ms().map(|d| d as i64),
            }),
            _ => None,
        })
        .collect();
    let tx_ref = &tx;
    let counts = futures_util::future::try_join_all(appends.iter().map(|p| async move {
        let ex = p.ex;
        if ex.seq == 1 {
            tx_ref
                .execute(
                    insert,
                    &[
                        &ex.id.0,
                        &ex.saga,
                        &ex.status.as_str(),
                        &p.due,
                        &(ex.created_at_ms as i64),
                        &(ex.updated_at_ms as i64),
                        p.state,
                    ],
                )
                .await
        } else {
            tx_ref
                .execute(
                    update,
                    &[
                        &ex.id.0,
                        &ex.status.as_str(),
                        &(ex.seq as i64),
                        &p.due,
                        &(ex.updated_at_ms as i64),
                        p.state,
                        &((ex.seq - 1) as i64),
                    ],
                )
                .await
        }
    }))
    .await?;
    let mut counts = counts.into_iter();
    let mut out = Vec::with_capacity(batch.len());
    for w in batch {
        match w {
            Write::Append(ex, _, _) => {
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
                    let found = tx
                        .query_opt(
                            "SELECT seq FROM sagatx_executions WHERE id = $1",
                            &[&ex.id.0],
                        )
                        .await?
                        .map(|r| r.get::<_, i64>(0) as u64);
                    out.push(Done::Appended(Err(StoreError::Conflict {
                        id: ex.id,
                        expected: ex.seq - 1,
                        found,
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
        self.send(Write::Append(Box::new(ex.clone()), state, tx))
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

    async fn summary(&self) -> Result<super::Summary, StoreError> {
        let c = self.read().await?;
        let rows = c
            .query(
                "SELECT saga, status, count(*) FROM sagatx_executions GROUP BY saga, status ORDER BY saga, status",
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
                r.get::<_, i64>(2) as u64,
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
                "INSERT INTO sagatx_executions (id, saga, status, seq, due_at, created_at, updated_at, state)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT (id) DO NOTHING",
                &[
                    &ex.id.0,
                    &ex.saga,
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
