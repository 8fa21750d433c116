//! Bad input gets a clear error, and the journal stays consistent.

use sagatx::{Engine, EngineError, Saga, SqliteStore, Status, StepContext, StepError, StoreError};
use serde_json::json;

fn ok_saga() -> Saga {
    Saga::builder("ok")
        .step("a", |_c: StepContext| async { Ok::<_, StepError>(1) })
        .build()
        .expect("valid")
}

#[test]
fn builder_errors_name_what_is_wrong() {
    let e = Saga::builder("x")
        .compensate(|_c: StepContext| async { Ok::<_, StepError>(()) })
        .build()
        .err()
        .expect("compensate before step is refused");
    assert!(
        e.to_string()
            .contains("compensate() was called before any step()"),
        "{e}"
    );
    let e = Saga::builder("x")
        .confirm_sync(|_c: StepContext| Ok::<_, StepError>(()))
        .build()
        .err()
        .expect("confirm_sync before step is refused");
    assert!(
        e.to_string()
            .contains("confirm_sync() was called before any step()"),
        "{e}"
    );
    // Two steps of one name, whatever their kinds.
    let e = Saga::builder("x")
        .step("a", |_c: StepContext| async { Ok::<_, StepError>(()) })
        .step_sync("a", |_c: StepContext| Ok::<_, StepError>(()))
        .build()
        .err()
        .expect("duplicate step refused");
    assert!(e.to_string().contains("duplicate"), "{e}");
    let e = Saga::builder("Bad Name")
        .step("a", |_c: StepContext| async { Ok::<_, StepError>(()) })
        .build()
        .err()
        .expect("bad name refused");
    assert!(e.to_string().starts_with("name:"), "{e}");
    let e = Saga::builder("x").build().err().expect("no steps refused");
    assert!(e.to_string().starts_with("steps:"), "{e}");
    let e = Saga::builder("x")
        .step("a", |_c: StepContext| async { Ok::<_, StepError>(()) })
        .step("a", |_c: StepContext| async { Ok::<_, StepError>(()) })
        .build()
        .err()
        .expect("duplicate refused");
    assert!(e.to_string().contains("steps[1].name"), "{e}");
}

#[tokio::test]
async fn a_file_that_is_not_sqlite_is_refused_and_left_alone() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("notes.txt");
    let text = "these are my notes, not a database\n".repeat(200);
    std::fs::write(&path, &text).expect("write");
    let err = SqliteStore::open(&path).err().expect("refused");
    assert!(matches!(err, StoreError::Foreign { .. }), "{err}");
    assert!(err.to_string().contains("is not a sagatx journal"), "{err}");
    assert_eq!(
        std::fs::read_to_string(&path).expect("read"),
        text,
        "untouched"
    );
}

#[tokio::test]
async fn a_foreign_sqlite_database_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("other.db");
    {
        let c = rusqlite::Connection::open(&path).expect("open");
        c.execute_batch("CREATE TABLE customers (id INTEGER PRIMARY KEY, name TEXT); INSERT INTO customers VALUES (1, 'ada');")
            .expect("create");
    }
    let err = SqliteStore::open(&path).err().expect("refused");
    assert!(matches!(err, StoreError::Foreign { .. }), "{err}");
    let c = rusqlite::Connection::open(&path).expect("open");
    let n: i64 = c
        .query_row("SELECT count(*) FROM sqlite_master", [], |r| r.get(0))
        .expect("count");
    assert_eq!(n, 1, "no table was added to someone else's database");
}

#[tokio::test]
async fn a_journal_from_a_newer_version_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("j.db");
    drop(SqliteStore::open(&path).expect("create"));
    {
        let c = rusqlite::Connection::open(&path).expect("open");
        c.execute_batch("PRAGMA user_version = 99").expect("bump");
    }
    let err = SqliteStore::open(&path).err().expect("refused");
    assert!(
        matches!(err, StoreError::FutureSchema { found: 99, .. }),
        "{err}"
    );
    assert!(err.to_string().contains("upgrade sagatx"), "{err}");
}

#[tokio::test]
async fn an_unusable_location_gives_a_clear_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let err = SqliteStore::open(dir.path().join("missing/dir/j.db"))
        .err()
        .expect("refused");
    assert!(matches!(err, StoreError::Open { .. }), "{err}");
    assert!(
        err.to_string().contains("check that the directory exists"),
        "{err}"
    );
    // A read-only location (a read-only file system; permission bits do
    // not stop root, which the tests may run as).
    let err = SqliteStore::open("/proc/sagatx-test.db")
        .err()
        .expect("refused");
    assert!(matches!(err, StoreError::Open { .. }), "{err}");
    assert!(
        err.to_string().contains("/proc/sagatx-test.db"),
        "names the path: {err}"
    );
    // A directory where the file should be.
    let err = SqliteStore::open(dir.path()).err().expect("refused");
    assert!(
        matches!(err, StoreError::Open { .. } | StoreError::Foreign { .. }),
        "{err}"
    );
}

/// A journal whose schema was damaged by hand (a table the writer needs
/// dropped, the schema version left as it was) is refused at open with
/// the writer's reason, not taken and failed at its first write.
#[tokio::test]
async fn a_journal_missing_a_table_is_refused_at_open() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("j.db");
    drop(SqliteStore::open(&path).expect("a new journal"));
    rusqlite::Connection::open(&path)
        .expect("open by hand")
        .execute_batch("DROP TABLE counts")
        .expect("drop");
    let err = SqliteStore::open(&path).err().expect("refused");
    assert!(matches!(err, StoreError::Open { .. }), "{err}");
    let text = err.to_string();
    assert!(
        text.contains("cannot prepare the journal's statements") && text.contains("counts"),
        "{text}"
    );
    assert!(text.contains("j.db"), "names the file: {text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_entry_is_reported_and_hides_nothing_else() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("j.db");
    let engine = Engine::builder()
        .store(SqliteStore::open(&path).expect("open"))
        .saga(ok_saga())
        .build()
        .await
        .expect("engine");
    let good = engine.run("ok", json!(1)).await.expect("run");
    let bad = engine.run("ok", json!(2)).await.expect("run");
    let bad_packed = engine.run("ok", json!(3)).await.expect("run");
    {
        // Damaged JSON, and a compressed entry whose bytes were damaged.
        let c = rusqlite::Connection::open(&path).expect("open");
        c.execute(
            "UPDATE executions SET state = x'7b6e6f' WHERE id = ?1",
            [bad.id.0.as_bytes().as_slice()],
        )
        .expect("corrupt");
        let packed: Vec<u8> = c
            .query_row(
                "SELECT state FROM executions WHERE id = ?1",
                [bad_packed.id.0.as_bytes().as_slice()],
                |r| r.get(0),
            )
            .expect("read");
        assert_eq!(packed.first(), Some(&2), "entries are stored compressed");
        let cut = &packed[..packed.len() / 2];
        c.execute(
            "UPDATE executions SET state = ?2 WHERE id = ?1",
            rusqlite::params![bad_packed.id.0.as_bytes().as_slice(), cut],
        )
        .expect("corrupt");
    }
    for id in [bad.id, bad_packed.id] {
        let err = engine.get(id).await.expect_err("corrupt entry");
        assert!(
            matches!(err, EngineError::Store(StoreError::Corrupt { .. })),
            "{err}"
        );
        assert!(
            err.to_string().contains(&id.to_string()),
            "names the execution: {err}"
        );
    }
    assert_eq!(
        engine.get(good.id).await.expect("good one").status,
        Status::Completed
    );
    let page = engine
        .list(sagatx::ListQuery {
            limit: 10,
            ..Default::default()
        })
        .await
        .expect("list still works");
    assert_eq!(page.items.len(), 1);
    assert_eq!(page.items[0].id, good.id);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_that_do_not_apply_are_refused_without_changing_the_journal() {
    let dir = tempfile::tempdir().expect("tempdir");
    let engine = Engine::builder()
        .store(SqliteStore::open(dir.path().join("j.db")).expect("open"))
        .saga(ok_saga())
        .build()
        .await
        .expect("engine");
    let ex = engine.run("ok", json!(1)).await.expect("run");
    for r in [
        engine.commit(ex.id).await,
        engine.reject(ex.id).await,
        engine.cancel(ex.id).await,
        engine.retry(ex.id).await,
    ] {
        let e = r.expect_err("refused");
        assert!(matches!(e, EngineError::Conflict(_)), "{e}");
    }
    assert_eq!(engine.get(ex.id).await.expect("get"), ex);
}

#[tokio::test]
async fn a_journal_is_driven_by_one_store_at_a_time() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("j.db");
    let first = SqliteStore::open(&path).expect("open");
    let err = SqliteStore::open(&path).err().expect("second open refused");
    assert!(matches!(err, StoreError::Open { .. }), "{err}");
    assert!(
        err.to_string()
            .contains("another sagatx process (or store) has this journal open"),
        "{err}"
    );
    drop(first);
    SqliteStore::open(&path).expect("free again once the first is closed");
}
