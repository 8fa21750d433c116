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

/// A SQLite store in a new directory, after the conformance suite ran on it.
async fn conformed_sqlite() -> (tempfile::TempDir, std::path::PathBuf, Arc<SqliteStore>) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("j.db");
    let store = Arc::new(SqliteStore::open(&path).expect("open"));
    conformance::run(store.clone())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    (dir, path, store)
}

/// The counts the summary reads, kept by the writer batch by batch, equal
/// a count of the executions themselves after everything the suite writes
/// (inserts, changes of status, imports), after rows are deleted by hand,
/// and after a reopen.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_summary_counts_stay_equal_to_the_executions() {
    let (_dir, path, store) = conformed_sqlite().await;
    let counted = |c: &rusqlite::Connection| -> Vec<(String, String, i64)> {
        let mut s = c
            .prepare(
                "SELECT saga, status, count(*) FROM executions GROUP BY saga, status ORDER BY saga, status",
            )
            .expect("prepare");
        let rows = s
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .expect("query");
        rows.collect::<Result<_, _>>().expect("rows")
    };
    let summarised = |s: sagatx::store::Summary| -> Vec<(String, String, i64)> {
        s.counts
            .into_iter()
            .map(|(saga, status, n)| (saga, status.as_str().to_string(), n as i64))
            .collect()
    };
    let c = rusqlite::Connection::open(&path).expect("open");
    let before = counted(&c);
    assert!(
        before.len() > 5,
        "the suite wrote several sagas: {before:?}"
    );
    assert!(
        before
            .iter()
            .any(|(_, st, _)| st != "running" && st != "created"),
        "some changed status: {before:?}"
    );
    assert_eq!(summarised(store.summary().await.expect("summary")), before);
    // An operator deleting executions by hand keeps the counts right too.
    let deleted = c
        .execute(
            "DELETE FROM executions WHERE n IN (SELECT n FROM executions ORDER BY n LIMIT 7)",
            [],
        )
        .expect("delete");
    assert_eq!(deleted, 7);
    let after = counted(&c);
    assert_ne!(after, before);
    assert_eq!(summarised(store.summary().await.expect("summary")), after);
    drop(store);
    let again = SqliteStore::open(&path).expect("reopen");
    assert_eq!(summarised(again.summary().await.expect("summary")), after);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_store_keeps_everything_across_reopen() {
    let (_dir, path, store) = conformed_sqlite().await;
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
                ex.saga.as_str(),
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
    assert_eq!(store.load(ex.id).await.expect("load"), Some(ex.clone()));
    // The counts of schema 5 start from the executions already there.
    assert_eq!(
        store.summary().await.expect("summary").counts,
        [(ex.saga.to_string(), ex.status, 1)]
    );
    assert_ne!(store.secret().await.expect("secret"), [0u8; 32]);
    let c = rusqlite::Connection::open(&path).expect("open");
    let v: i64 = c
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .expect("version");
    assert_eq!(v, sagatx::store::SCHEMA_VERSION);
    // An existing file keeps the page size it was made with.
    let page: i64 = c
        .query_row("PRAGMA page_size", [], |r| r.get(0))
        .expect("page size");
    assert_eq!(page, 4096);
}

/// A new journal is made with the store's page size (half SQLite's
/// default: a commit writes whole pages), and keeps it when reopened.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_journal_has_the_store_page_size() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("new.db");
    let page = |path: &std::path::Path| -> i64 {
        rusqlite::Connection::open(path)
            .expect("open")
            .query_row("PRAGMA page_size", [], |r| r.get(0))
            .expect("page size")
    };
    drop(SqliteStore::open(&path).expect("create"));
    assert_eq!(page(&path), i64::from(sagatx::store::PAGE_SIZE_BYTES));
    assert_eq!(sagatx::store::PAGE_SIZE_BYTES, 2048);
    let store = SqliteStore::open(&path).expect("reopen");
    assert_eq!(store.summary().await.expect("summary").counts, []);
    drop(store);
    assert_eq!(page(&path), 2048);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_store_with_a_retention_conforms() {
    // A retention larger than what the suite finishes drops nothing.
    conformance::run(Arc::new(MemoryStore::with_retention(100_000)))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
}

/// With a retention, the oldest completed and compensated executions are
/// dropped as newer ones finish; a failed one (an operator's to retry) and
/// unfinished ones stay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_memory_store_retention_drops_the_oldest_finished_only() {
    use sagatx::{Engine, Saga, StartOptions, Status, StepContext, StepError};
    use serde_json::json;

    // The run with input n = 0 fails at `b` and its compensation of `a`
    // fails for good: it ends `failed`. The others complete.
    let first = |ctx: &StepContext| ctx.input()["n"] == json!(0);
    let saga = Saga::builder("kept")
        .step("a", |_ctx: StepContext| async { Ok::<_, StepError>(()) })
        .compensate(move |ctx: StepContext| async move {
            if first(&ctx) {
                return Err(StepError::permanent("cannot undo"));
            }
            Ok(())
        })
        .step("b", move |ctx: StepContext| async move {
            if first(&ctx) {
                return Err(StepError::permanent("rejected"));
            }
            Ok::<_, StepError>(())
        })
        .build()
        .expect("valid");
    let waiting = Saga::builder("waiting")
        .step("w", |_ctx: sagatx::StepContext| async {
            tokio::time::sleep(std::time::Duration::from_secs(3600)).await;
            Ok::<_, sagatx::StepError>(())
        })
        .build()
        .expect("valid");
    let engine = Engine::builder()
        .store(MemoryStore::with_retention(3))
        .saga(saga)
        .saga(waiting)
        .build()
        .await
        .expect("engine");
    let unfinished = engine
        .start_with("waiting", json!({}), StartOptions::default())
        .await
        .expect("start");
    let failed = engine.run("kept", json!({"n": 0})).await.expect("run");
    assert_eq!(failed.status, Status::Failed);
    let mut ids = Vec::new();
    for n in 1..=6 {
        let ex = engine.run("kept", json!({ "n": n })).await.expect("run");
        assert_eq!(ex.status, Status::Completed);
        ids.push(ex.id);
    }
    for (i, id) in ids.iter().enumerate() {
        let kept = engine.get(*id).await.is_ok();
        assert_eq!(
            kept,
            i >= 3,
            "execution {i} of 6: kept only among the last 3"
        );
    }
    assert_eq!(
        engine.get(failed.id).await.expect("failed kept").status,
        Status::Failed
    );
    assert_eq!(
        engine
            .get(unfinished)
            .await
            .expect("unfinished kept")
            .status,
        Status::Running
    );
    let page = engine
        .list(sagatx::ListQuery {
            limit: 100,
            ..Default::default()
        })
        .await
        .expect("list");
    assert_eq!(
        page.items.len(),
        5,
        "3 completed, the failed, the unfinished"
    );
}

/// More writes queued at once than one batch takes: the writer splits them
/// into several transactions, and every write is applied and answered,
/// none lost or doubled at a batch's edge: first the creations, then one
/// update of each, then the sums of the summary.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn more_writes_than_a_batch_holds_all_land() {
    use sagatx::core::{Env, Event, Execution, Phase, SagaDefinition, Status};
    use sagatx::Store as _;
    let n = 2 * sagatx::store::MAX_BATCH + 7;
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Arc::new(SqliteStore::open(dir.path().join("j.db")).expect("open"));
    let def = SagaDefinition::from_json(
        br#"{"name":"b","steps":[{"name":"s","action":{"url":"http://127.0.0.1:9/a"}}]}"#,
    )
    .expect("definition");
    store.put_definition(&def).await.expect("define");
    let env = Env {
        now_ms: 1,
        random01: 0.5,
    };
    let mut exs: Vec<Execution> = (0..n).map(|_| crate::support::started(&def)).collect();
    // Another connection holds the write lock for a while, so that the
    // writer stops at its first batch and the rest queue up behind it
    // (the writer waits up to 5 s for the lock).
    let path = dir.path().join("j.db");
    let blocker = rusqlite::Connection::open(&path).expect("open");
    blocker.execute_batch("BEGIN IMMEDIATE").expect("lock");
    let creating = {
        let (store, exs) = (store.clone(), exs.clone());
        tokio::spawn(async move {
            futures_util::future::join_all(exs.iter().map(|ex| store.append(ex))).await
        })
    };
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    blocker.execute_batch("ROLLBACK").expect("unlock");
    let created = creating.await.expect("creations");
    assert!(created.iter().all(Result::is_ok), "a creation failed");
    for (i, ex) in exs.iter_mut().enumerate() {
        ex.handle(
            &def,
            Event::Outcome {
                step: 0,
                phase: Phase::Action,
                attempt: 1,
                outcome: Ok(serde_json::json!(i)),
            },
            env,
        )
        .expect("outcome");
        ex.seq = 2;
        assert_eq!(ex.status, Status::Completed);
    }
    let updated = futures_util::future::join_all(exs.iter().map(|ex| store.append(ex))).await;
    assert!(updated.iter().all(Result::is_ok), "an update failed");

    let mut stored = Vec::new();
    let mut cursor = None;
    loop {
        let page = store.scan(cursor, 1000).await.expect("scan");
        stored.extend(page.items);
        cursor = page.next_cursor;
        if cursor.is_none() {
            break;
        }
    }
    assert_eq!(stored.len(), n);
    let by_id: std::collections::HashMap<_, _> = stored.iter().map(|ex| (ex.id, ex)).collect();
    for (i, ex) in exs.iter().enumerate() {
        let back = by_id.get(&ex.id).expect("every execution stored");
        assert_eq!((back.seq, back.status), (2, Status::Completed));
        assert_eq!(back.steps[0].result, Some(serde_json::json!(i)));
    }
    let summary = store.summary().await.expect("summary");
    assert_eq!(
        summary.counts,
        vec![("b".to_string(), Status::Completed, n as u64)]
    );
}
