//! The store conformance suite, run against every store.

use std::sync::Arc;

use sagatx::store::{conformance, MemoryStore, SqliteStore};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_store_conforms() {
    conformance::run(Arc::new(MemoryStore::new()))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_store_conforms() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = SqliteStore::open(dir.path().join("j.db")).expect("open");
    conformance::run(Arc::new(store))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_store_keeps_everything_across_reopen() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("j.db");
    let store = Arc::new(SqliteStore::open(&path).expect("open"));
    conformance::run(store.clone())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let before = store
        .list(&sagatx::ListQuery {
            limit: 10_000,
            ..Default::default()
        })
        .await
        .expect("list");
    let secret = store.secret().await.expect("secret");
    drop(store);
    let again = SqliteStore::open(&path).expect("reopen");
    assert_eq!(
        again.secret().await.expect("secret"),
        secret,
        "kept with the file"
    );
    let after = again
        .list(&sagatx::ListQuery {
            limit: 10_000,
            ..Default::default()
        })
        .await
        .expect("list");
    assert!(
        before.items.len() > 50,
        "the suite wrote {} executions",
        before.items.len()
    );
    assert_eq!(before.items, after.items);
    // And the suite passes again on the reopened file, beside the old data.
    conformance::run(Arc::new(again))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
}

use sagatx::Store as _;

/// A journal of schema version 1 (sagatx before the `meta` table), built
/// with that version's own SQL, is migrated on open and keeps its data.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_schema_1_journal_is_migrated_on_open() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("v1.db");
    let golden = include_str!("../../../sagatx-core/golden/execution-v1.json");
    let ex = sagatx::Execution::from_raw(golden.as_bytes()).expect("golden decodes");
    {
        let c = rusqlite::Connection::open(&path).expect("open");
        c.execute_batch(
            r#"
            CREATE TABLE definitions (name TEXT NOT NULL, version INTEGER NOT NULL, body TEXT NOT NULL,
                created_at INTEGER NOT NULL, PRIMARY KEY (name, version)) WITHOUT ROWID;
            CREATE TABLE executions (n INTEGER PRIMARY KEY, id BLOB NOT NULL UNIQUE, saga TEXT NOT NULL,
                status TEXT NOT NULL, seq INTEGER NOT NULL, due_at INTEGER, created_at INTEGER NOT NULL,
                updated_at INTEGER NOT NULL, state BLOB NOT NULL);
            CREATE INDEX executions_due ON executions (due_at) WHERE due_at IS NOT NULL;
            CREATE INDEX executions_status ON executions (status, n);
            CREATE INDEX executions_saga ON executions (saga, n);
            PRAGMA application_id = 1399280760;
            PRAGMA user_version = 1;
            "#,
        )
        .expect("schema 1");
        c.execute(
            "INSERT INTO executions (id, saga, status, seq, due_at, created_at, updated_at, state)
             VALUES (?1, ?2, ?3, ?4, NULL, ?5, ?6, ?7)",
            rusqlite::params![
                ex.id.0.as_bytes().as_slice(),
                ex.saga,
                ex.status.as_str(),
                ex.seq as i64,
                ex.created_at_ms as i64,
                ex.updated_at_ms as i64,
                golden.as_bytes()
            ],
        )
        .expect("insert");
    }
    let store = SqliteStore::open(&path).expect("migrates");
    assert_eq!(store.load(ex.id).await.expect("load"), Some(ex));
    assert_ne!(store.secret().await.expect("secret"), [0u8; 32]);
    let c = rusqlite::Connection::open(&path).expect("open");
    let v: i64 = c
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .expect("version");
    assert_eq!(v, sagatx::store::SCHEMA_VERSION);
}
