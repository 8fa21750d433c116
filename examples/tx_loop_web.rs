//! nti.transactions' pyramid tween: every request of a web service runs in
//! a transaction loop, retried on a transient conflict, described by its
//! URL in the logs, aborted instead of committed for a read.
//!
//! ```sh
//! cargo run --example tx_loop_web      # serves on 127.0.0.1, sends itself a few requests
//! ```

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use axum::extract::{Path, State};
use axum::routing::{get, post};
use axum::Router;
use sagatx::transaction::{Hooks, SqliteDataManager, Transaction, TransactionLoop, TxError};

struct App {
    db: std::path::PathBuf,
    conflicts: AtomicU32,
}

/// Logs and describes each request's transaction.
struct RequestHooks(String);

impl Hooks for RequestHooks {
    fn describe_transaction(&self) -> String {
        self.0.clone()
    }
    fn will_retry(&self, attempt: u32) {
        println!("  {}: attempt {attempt} after a conflict", self.0);
    }
    fn committed(&self, _: &Transaction) {
        println!("  {}: committed", self.0);
    }
    fn aborted(&self, _: &Transaction, e: Option<&sagatx::transaction::LoopError>) {
        match e {
            Some(e) => println!("  {}: aborted ({e})", self.0),
            None => println!("  {}: aborted (read only, nothing to commit)", self.0),
        }
    }
}

fn in_loop(url: String) -> TransactionLoop {
    TransactionLoop::builder()
        .attempts(3)
        .hooks(Arc::new(RequestHooks(url)))
        .build()
}

async fn add(State(app): State<Arc<App>>, Path(n): Path<i64>) -> String {
    let result = in_loop(format!("POST /add/{n}"))
        .run(|tx| {
            let app = app.clone();
            async move {
                let conn = rusqlite::Connection::open(&app.db)
                    .map_err(|e| TxError::permanent(e.to_string()))?;
                let dm = SqliteDataManager::begin("db", conn)?;
                tx.join_sync(dm.clone())
                    .map_err(|e| TxError::permanent(e.to_string()))?;
                dm.with(|c| c.execute("UPDATE counter SET n = n + ?1", [n]))?;
                // The first request meets a (simulated) write conflict once.
                if app.conflicts.fetch_add(1, Ordering::SeqCst) == 0 {
                    return Err(TxError::transient("write conflict"));
                }
                dm.with(|c| c.query_row("SELECT n FROM counter", [], |r| r.get::<_, i64>(0)))
            }
        })
        .await;
    match result {
        Ok(v) => format!("counter = {v}\n"),
        Err(e) => format!("error: {e}\n"),
    }
}

async fn read(State(app): State<Arc<App>>) -> String {
    let result = in_loop("GET /counter".into())
        .run(|tx| {
            let app = app.clone();
            async move {
                let conn = rusqlite::Connection::open(&app.db)
                    .map_err(|e| TxError::permanent(e.to_string()))?;
                let dm = SqliteDataManager::begin("db", conn)?;
                tx.join_sync(dm.clone())
                    .map_err(|e| TxError::permanent(e.to_string()))?;
                tx.set_read_only();
                dm.with(|c| c.query_row("SELECT n FROM counter", [], |r| r.get::<_, i64>(0)))
            }
        })
        .await;
    match result {
        Ok(v) => format!("counter = {v}\n"),
        Err(e) => format!("error: {e}\n"),
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = std::env::temp_dir().join(format!("sagatx-tx-loop-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let db = dir.join("counter.db");
    rusqlite::Connection::open(&db)?
        .execute_batch("CREATE TABLE IF NOT EXISTS counter (n INTEGER); DELETE FROM counter; INSERT INTO counter VALUES (0);")?;
    let app = Arc::new(App {
        db,
        conflicts: AtomicU32::new(0),
    });
    let router = Router::new()
        .route("/add/{n}", post(add))
        .route("/counter", get(read))
        .with_state(app);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move { axum::serve(listener, router).await });
    println!("serving on http://{addr}");
    for (method, path) in [("POST", "/add/5"), ("POST", "/add/2"), ("GET", "/counter")] {
        let mut stream = tokio::net::TcpStream::connect(addr).await?;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        stream
            .write_all(format!("{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 0\r\n\r\n").as_bytes())
            .await?;
        let mut resp = String::new();
        stream.read_to_string(&mut resp).await?;
        println!("{method} {path} -> {}", resp.lines().last().unwrap_or(""));
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
