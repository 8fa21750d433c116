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
    drop(store);
    let again = SqliteStore::open(&path).expect("reopen");
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
