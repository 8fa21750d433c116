//! A participant that uses the barrier: a step service whose action and
//! compensation run inside its own SQLite transaction together with the
//! barrier's record, so that duplicates, a compensation that overtakes its
//! action, and an action that comes after its compensation do no harm.
//!
//! ```sh
//! cargo run --example barrier_participant   # sends itself duplicates and reordered calls
//! ```

use std::sync::{Arc, Mutex};

use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::routing::post;
use axum::Router;
use sagatx::barrier::{self, Outcome};

type Db = Arc<Mutex<rusqlite::Connection>>;

async fn step(State(db): State<Db>, Path(op): Path<String>, headers: HeaderMap) -> String {
    let key = headers
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let delta = if op == "reserve" { -1 } else { 1 };
    let mut conn = db.lock().unwrap_or_else(|p| p.into_inner());
    let result = (|| -> Result<_, Box<dyn std::error::Error>> {
        let tx = conn.transaction()?;
        let out = barrier::sqlite(&tx, &key, |tx| {
            tx.execute("UPDATE stock SET n = n + ?1", [delta])
        })?;
        tx.commit()?;
        let n: i64 = conn.query_row("SELECT n FROM stock", [], |r| r.get(0))?;
        Ok((out, n))
    })();
    match result {
        Ok((Outcome::Ran(_), n)) => format!("{op}: done, stock {n}"),
        Ok((skipped, n)) => format!("{op}: skipped ({skipped:?}), stock {n}"),
        Err(e) => format!("{op}: error {e}"),
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let conn = rusqlite::Connection::open_in_memory()?;
    barrier::sqlite_schema(&conn)?;
    conn.execute_batch("CREATE TABLE stock (n INTEGER); INSERT INTO stock VALUES (10);")?;
    let db: Db = Arc::new(Mutex::new(conn));
    let app = Router::new().route("/{op}", post(step)).with_state(db);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move { axum::serve(listener, app).await });
    let ex = "0193c7e2-0000-7000-8000-0000000000b1";
    let calls = [
        ("reserve", format!("{ex}:reserve:action")),
        ("reserve", format!("{ex}:reserve:action")), // a retry: duplicate
        ("release", format!("{ex}:reserve:compensation")),
        ("release", format!("{ex}:ship:compensation")), // overtakes its action
        ("reserve", format!("{ex}:ship:action")),       // arrives after it: hanging
    ];
    for (op, key) in calls {
        let mut stream = tokio::net::TcpStream::connect(addr).await?;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        stream
            .write_all(
                format!("POST /{op} HTTP/1.1\r\nHost: x\r\nIdempotency-Key: {key}\r\nConnection: close\r\nContent-Length: 0\r\n\r\n")
                    .as_bytes(),
            )
            .await?;
        let mut resp = String::new();
        stream.read_to_string(&mut resp).await?;
        println!("{key} -> {}", resp.lines().last().unwrap_or(""));
    }
    Ok(())
}
