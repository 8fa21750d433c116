//! Two-phase commit over real SQLite databases, and the participants'
//! barrier with real duplicates, reordered calls and a real crash.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use rusqlite::Connection;
use sagatx::barrier::{self, Outcome};
use sagatx::transaction::{SqliteDataManager, Transaction, TransactionError, TxError};

fn db(path: &std::path::Path) -> Connection {
    let c = Connection::open(path).expect("open");
    c.execute_batch("CREATE TABLE IF NOT EXISTS t (v INTEGER)")
        .expect("table");
    c
}

fn count(path: &std::path::Path) -> i64 {
    Connection::open(path)
        .expect("open")
        .query_row("SELECT count(*) FROM t", [], |r| r.get(0))
        .expect("count")
}

#[tokio::test]
async fn two_sqlite_databases_commit_or_roll_back_together() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (pa, pb) = (dir.path().join("a.db"), dir.path().join("b.db"));
    // Each run joins both managers through `join` (boxed futures) or, as
    // the synchronous managers they are, through `join_sync`; commits
    // when `veto` is off, and a vote fails (both roll back) when it is on.
    let runs = [(false, false), (true, false), (true, true), (false, true)];
    for (n, (sync, veto)) in runs.into_iter().enumerate() {
        let a = SqliteDataManager::begin("a", db(&pa)).expect("begin a");
        let b = SqliteDataManager::begin("b", db(&pb)).expect("begin b");
        let tx = Transaction::new();
        for m in [&a, &b] {
            if sync {
                tx.join_sync(m.clone()).expect("join");
            } else {
                tx.join(m.clone()).expect("join");
            }
        }
        let (ca, cb) = (count(&pa), count(&pb));
        a.with(|c| c.execute("INSERT INTO t VALUES (?1)", [2 * n]))
            .expect("insert");
        b.with(|c| c.execute("INSERT INTO t VALUES (?1)", [2 * n + 1]))
            .expect("insert");
        if veto {
            sagatx::transaction::after_commit_voting(
                &tx,
                || Ok(()),
                || Err(TxError::permanent("no")),
            );
            let err = tx.commit().await.expect_err("vetoed");
            assert!(matches!(err, TransactionError::Aborted { .. }), "{err}");
            assert_eq!((count(&pa), count(&pb)), (ca, cb), "neither committed");
        } else {
            tx.commit().await.expect("commit");
            assert_eq!((count(&pa), count(&pb)), (ca + 1, cb + 1), "sync: {sync}");
        }
    }
    assert_eq!((count(&pa), count(&pb)), (2, 2));
}

#[tokio::test]
async fn a_savepoint_rolls_a_sqlite_manager_back() {
    let dir = tempfile::tempdir().expect("tempdir");
    let p = dir.path().join("a.db");
    let a = SqliteDataManager::begin("a", db(&p)).expect("begin");
    let tx = Transaction::new();
    tx.join(a.clone()).expect("join");
    a.with(|c| c.execute("INSERT INTO t VALUES (1)", []))
        .expect("insert");
    let mut sp = tx.savepoint().expect("savepoint");
    a.with(|c| c.execute("INSERT INTO t VALUES (2)", []))
        .expect("insert");
    sp.rollback().await.expect("rollback");
    tx.commit().await.expect("commit");
    assert_eq!(count(&p), 1);
}

fn stock(c: &Connection) -> i64 {
    c.query_row("SELECT n FROM stock", [], |r| r.get(0))
        .expect("stock")
}

fn shop(path: &std::path::Path) -> Connection {
    let c = Connection::open(path).expect("open");
    barrier::sqlite_schema(&c).expect("schema");
    c.execute_batch(
        "CREATE TABLE IF NOT EXISTS stock (n INTEGER);
         INSERT INTO stock SELECT 10 WHERE NOT EXISTS (SELECT 1 FROM stock);",
    )
    .expect("stock");
    c
}

fn call(c: &mut Connection, key: &str, delta: i64) -> Outcome<usize> {
    let tx = c.transaction().expect("tx");
    let out = barrier::sqlite(&tx, key, |tx| {
        tx.execute("UPDATE stock SET n = n + ?1", [delta])
    })
    .expect("barrier");
    tx.commit().expect("commit");
    out
}

const EX: &str = "0193c7e2-0000-7000-8000-00000000000a";

#[test]
fn the_barrier_skips_duplicates_null_compensations_and_hanging_actions() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut c = shop(&dir.path().join("shop.db"));
    let action = format!("{EX}:reserve:action");
    let comp = format!("{EX}:reserve:compensation");
    // In order, with duplicates.
    assert!(call(&mut c, &action, -1).ran());
    assert_eq!(call(&mut c, &action, -1), Outcome::Duplicate);
    assert_eq!(stock(&c), 9);
    assert!(call(&mut c, &comp, 1).ran());
    assert_eq!(call(&mut c, &comp, 1), Outcome::Duplicate);
    assert_eq!(stock(&c), 10);
    // Reordered: the compensation first is a no-op, the late action too.
    let action = format!("{EX}:ship:action");
    let comp = format!("{EX}:ship:compensation");
    assert_eq!(call(&mut c, &comp, 1), Outcome::NullCompensation);
    assert_eq!(call(&mut c, &action, -1), Outcome::Hanging);
    assert_eq!(call(&mut c, &comp, 1), Outcome::Duplicate);
    assert_eq!(stock(&c), 10);
    // Confirms are deduplicated.
    let confirm = format!("{EX}:reserve:confirm");
    assert!(call(&mut c, &confirm, 0).ran());
    assert_eq!(call(&mut c, &confirm, 0), Outcome::Duplicate);
    // Keys that are not sagatx's are refused.
    let tx = c.transaction().expect("tx");
    assert!(barrier::sqlite(&tx, "nonsense", |_| Ok(())).is_err());
    assert!(barrier::sqlite(&tx, "a:b:undo", |_| Ok(())).is_err());
}

#[test]
#[ignore = "run as a child process by barrier_records_vanish_with_a_crashed_transaction"]
fn barrier_crash_worker() {
    let Ok(path) = std::env::var("SAGATX_BARRIER_DB") else {
        return;
    };
    let mut c = shop(std::path::Path::new(&path));
    let tx = c.transaction().expect("tx");
    let out = barrier::sqlite(&tx, &format!("{EX}:reserve:action"), |tx| {
        tx.execute("UPDATE stock SET n = n - 1", [])
    })
    .expect("barrier");
    assert!(out.ran());
    // Killed here, before the commit.
    std::fs::write(format!("{path}.ready"), "").expect("marker");
    std::thread::sleep(Duration::from_secs(60));
    tx.commit().expect("never reached");
}

#[test]
fn barrier_records_vanish_with_a_crashed_transaction() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("shop.db");
    drop(shop(&path));
    let mut child = Command::new(std::env::current_exe().expect("exe"))
        .args([
            "--exact",
            "participants::barrier_crash_worker",
            "--ignored",
            "--nocapture",
        ])
        .env("SAGATX_BARRIER_DB", &path)
        .stdout(Stdio::null())
        .spawn()
        .expect("spawn");
    let marker = dir.path().join("shop.db.ready");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !marker.exists() {
        assert!(Instant::now() < deadline, "the worker never got ready");
        std::thread::sleep(Duration::from_millis(5));
    }
    let _ = child.kill();
    let _ = child.wait();
    // The retried call runs (the crashed one left nothing), exactly once.
    let mut c = shop(&path);
    assert_eq!(stock(&c), 10);
    let action = format!("{EX}:reserve:action");
    assert!(call(&mut c, &action, -1).ran());
    assert_eq!(call(&mut c, &action, -1), Outcome::Duplicate);
    assert_eq!(stock(&c), 9);
}
