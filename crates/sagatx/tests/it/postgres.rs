//! Two-phase commit over two real PostgreSQL databases, with the process
//! killed with SIGKILL at each point of the protocol, and recovery.
//! `scripts/test` starts the servers and sets SAGATX_TEST_PG_URL (prepared
//! transactions on) and SAGATX_TEST_PG_NOPREP_URL (off).

use std::process::{Command, Stdio};
use std::sync::Arc;

use async_trait::async_trait;
use sagatx::transaction::{
    recover_prepared, DataManager, PostgresDataManager, StoreDecisions, Transaction,
    TransactionError, TxError, TxInfo,
};
use sagatx::{SqliteStore, Store};
use tokio_postgres::NoTls;

fn env_url(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!("{name} is not set: run the tests with scripts/test, which starts PostgreSQL")
    })
}

async fn client(url: &str) -> tokio_postgres::Client {
    let (c, conn) = tokio_postgres::connect(url, NoTls).await.expect("connect");
    tokio::spawn(conn);
    c
}

/// A fresh database on the test server; its URL.
async fn fresh_db(base: &str) -> String {
    let name = format!(
        "sagatx_t_{}",
        &uuid::Uuid::new_v4().simple().to_string()[..12]
    );
    client(base)
        .await
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .await
        .expect("create database");
    let url = base
        .rsplit_once('/')
        .map(|(b, _)| format!("{b}/{name}"))
        .expect("url");
    client(&url)
        .await
        .batch_execute("CREATE TABLE t (v INTEGER)")
        .await
        .expect("table");
    url
}

async fn rows(url: &str) -> i64 {
    client(url)
        .await
        .query_one("SELECT count(*) FROM t", &[])
        .await
        .expect("count")
        .get(0)
}

async fn prepared(base: &str, url: &str) -> i64 {
    let db = url.rsplit('/').next().expect("db").to_string();
    client(base)
        .await
        .query_one(
            "SELECT count(*) FROM pg_prepared_xacts WHERE database = $1",
            &[&db],
        )
        .await
        .expect("prepared")
        .get(0)
}

#[tokio::test]
async fn two_databases_commit_or_roll_back_together() {
    let base = env_url("SAGATX_TEST_PG_URL");
    let (ua, ub) = (fresh_db(&base).await, fresh_db(&base).await);
    let dir = tempfile::tempdir().expect("tempdir");
    let store: Arc<dyn Store> = Arc::new(SqliteStore::open(dir.path().join("d.db")).expect("open"));

    let tx = Transaction::new();
    tx.set_decision_log(Arc::new(StoreDecisions(store.clone())));
    let a = PostgresDataManager::begin("a", &ua).await.expect("a");
    let b = PostgresDataManager::begin("b", &ub).await.expect("b");
    a.client()
        .batch_execute("INSERT INTO t VALUES (1)")
        .await
        .expect("insert");
    b.client()
        .batch_execute("INSERT INTO t VALUES (2)")
        .await
        .expect("insert");
    tx.join(a).expect("join");
    tx.join(b).expect("join");
    tx.commit().await.expect("commit");
    assert_eq!((rows(&ua).await, rows(&ub).await), (1, 1));
    assert!(
        store
            .op_pending(None, 10)
            .await
            .expect("pending")
            .is_empty(),
        "decision forgotten"
    );

    // A vote that fails after one database prepared: both roll back.
    let tx = Transaction::new();
    let a = PostgresDataManager::begin("a", &ua).await.expect("a");
    let b = PostgresDataManager::begin("b", &ub).await.expect("b");
    a.client()
        .batch_execute("INSERT INTO t VALUES (3)")
        .await
        .expect("insert");
    // b violates nothing yet; make its PREPARE fail by ending its transaction.
    b.client()
        .batch_execute("INSERT INTO t VALUES (4); COMMIT")
        .await
        .expect("commit b");
    tx.join(a).expect("join");
    tx.join(b).expect("join");
    let err = tx.commit().await.expect_err("b cannot prepare");
    assert!(matches!(err, TransactionError::Aborted { .. }), "{err}");
    assert!(err.to_string().contains("prepared nothing"), "{err}");
    assert_eq!(rows(&ua).await, 1, "a rolled back");
    assert_eq!(prepared(&base, &ua).await, 0, "nothing left prepared");
}

#[tokio::test]
async fn a_server_without_prepared_transactions_says_how_to_enable_them() {
    let base = env_url("SAGATX_TEST_PG_NOPREP_URL");
    let url = fresh_db(&base).await;
    let tx = Transaction::new();
    let a = PostgresDataManager::begin("a", &url).await.expect("a");
    a.client()
        .batch_execute("INSERT INTO t VALUES (1)")
        .await
        .expect("insert");
    tx.join(a).expect("join");
    let err = tx.commit().await.expect_err("cannot prepare");
    let msg = err.to_string();
    assert!(msg.contains("set max_prepared_transactions"), "{msg}");
    assert!(msg.contains("restart PostgreSQL"), "{msg}");
    assert_eq!(rows(&url).await, 0);
    let e = PostgresDataManager::begin("a b", &url)
        .await
        .err()
        .expect("bad key");
    assert!(e.message.contains("letters, digits"), "{e}");
    let e = PostgresDataManager::begin("a", "postgres://127.0.0.1:1/x")
        .await
        .err()
        .expect("no server");
    assert!(e.message.contains("cannot connect to PostgreSQL"), "{e}");
}

/// A data manager that kills its own process with SIGKILL in one phase.
struct Killer {
    key: &'static str,
    phase: &'static str,
}

impl Killer {
    fn maybe(&self, phase: &str) -> Result<(), TxError> {
        if phase == self.phase {
            let _ = Command::new("kill")
                .args(["-9", &std::process::id().to_string()])
                .status();
            std::thread::sleep(std::time::Duration::from_secs(60));
        }
        Ok(())
    }
}

#[async_trait]
impl DataManager for Killer {
    fn sort_key(&self) -> String {
        self.key.into()
    }
    async fn abort(&self, _: &TxInfo) -> Result<(), TxError> {
        Ok(())
    }
    async fn tpc_begin(&self, _: &TxInfo) -> Result<(), TxError> {
        Ok(())
    }
    async fn commit(&self, _: &TxInfo) -> Result<(), TxError> {
        Ok(())
    }
    async fn tpc_vote(&self, _: &TxInfo) -> Result<(), TxError> {
        self.maybe("tpc_vote")
    }
    async fn tpc_finish(&self, _: &TxInfo) -> Result<(), TxError> {
        self.maybe("tpc_finish")
    }
    async fn tpc_abort(&self, _: &TxInfo) -> Result<(), TxError> {
        Ok(())
    }
}

#[test]
#[ignore = "run as a child process by kill_9_at_each_point_of_the_protocol"]
fn tpc_crash_worker() {
    let (Ok(point), Ok(ua), Ok(ub), Ok(store)) = (
        std::env::var("SAGATX_2PC_POINT"),
        std::env::var("SAGATX_2PC_A"),
        std::env::var("SAGATX_2PC_B"),
        std::env::var("SAGATX_2PC_STORE"),
    ) else {
        return;
    };
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async move {
        let store: Arc<dyn Store> = Arc::new(SqliteStore::open(&store).expect("open"));
        let tx = Transaction::new();
        tx.set_decision_log(Arc::new(StoreDecisions(store)));
        let a = PostgresDataManager::begin("a", &ua).await.expect("a");
        let c = PostgresDataManager::begin("c", &ub).await.expect("c");
        a.client()
            .batch_execute("INSERT INTO t VALUES (1)")
            .await
            .expect("insert");
        c.client()
            .batch_execute("INSERT INTO t VALUES (1)")
            .await
            .expect("insert");
        tx.join(a).expect("join");
        tx.join(c).expect("join");
        // Managers finish in key order: a, then c.
        let killer = match point.as_str() {
            // Both prepared, no decision yet.
            "after_prepare" => Killer {
                key: "z",
                phase: "tpc_vote",
            },
            // The decision is logged, no COMMIT PREPARED made.
            "after_decision" => Killer {
                key: "0",
                phase: "tpc_finish",
            },
            // a committed, c still prepared.
            "during_commit_prepared" => Killer {
                key: "b",
                phase: "tpc_finish",
            },
            other => panic!("unknown point {other}"),
        };
        tx.join(Arc::new(killer)).expect("join");
        let _ = tx.commit().await;
        panic!("the worker should have been killed");
    });
}

#[tokio::test]
async fn kill_9_at_each_point_of_the_protocol() {
    let base = env_url("SAGATX_TEST_PG_URL");
    for (point, committed) in [
        ("after_prepare", false),
        ("after_decision", true),
        ("during_commit_prepared", true),
    ] {
        let (ua, ub) = (fresh_db(&base).await, fresh_db(&base).await);
        let dir = tempfile::tempdir().expect("tempdir");
        let store_path = dir.path().join("decisions.db");
        let status = Command::new(std::env::current_exe().expect("exe"))
            .args([
                "--exact",
                "postgres::tpc_crash_worker",
                "--ignored",
                "--nocapture",
            ])
            .env("SAGATX_2PC_POINT", point)
            .env("SAGATX_2PC_A", &ua)
            .env("SAGATX_2PC_B", &ub)
            .env("SAGATX_2PC_STORE", &store_path)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("worker");
        assert_eq!(
            status.code(),
            None,
            "{point}: the worker was killed by a signal"
        );
        let in_doubt = prepared(&base, &ua).await + prepared(&base, &ub).await;
        assert!(
            in_doubt >= 1,
            "{point}: something is in doubt before recovery"
        );
        let store: Arc<dyn Store> = Arc::new(SqliteStore::open(&store_path).expect("open"));
        let report = recover_prepared(&[ua.as_str(), ub.as_str()], &store)
            .await
            .expect("recover");
        let want = if committed { 1 } else { 0 };
        assert_eq!(
            (rows(&ua).await, rows(&ub).await),
            (want, want),
            "{point}: {report:?}"
        );
        assert_eq!(
            prepared(&base, &ua).await + prepared(&base, &ub).await,
            0,
            "{point}"
        );
        assert!(
            store
                .op_pending(None, 10)
                .await
                .expect("pending")
                .is_empty(),
            "{point}"
        );
        if committed {
            assert!(report.rolled_back.is_empty(), "{point}: {report:?}");
            assert!(!report.committed.is_empty(), "{point}: {report:?}");
        } else {
            assert!(report.committed.is_empty(), "{point}: {report:?}");
            assert_eq!(report.rolled_back.len(), 2, "{point}: {report:?}");
        }
    }
}

#[tokio::test]
async fn the_postgres_barrier_skips_duplicates_and_reordered_calls() {
    use sagatx::barrier::{self, Outcome};
    let base = env_url("SAGATX_TEST_PG_URL");
    let url = fresh_db(&base).await;
    let (mut c, conn) = tokio_postgres::connect(&url, NoTls).await.expect("connect");
    tokio::spawn(conn);
    barrier::postgres_schema(&c).await.expect("schema");
    c.batch_execute("CREATE TABLE stock (n INTEGER); INSERT INTO stock VALUES (10)")
        .await
        .expect("stock");
    let ex = "0193c7e2-0000-7000-8000-0000000000c1";
    let mut outcomes = Vec::new();
    for (key, delta) in [
        (format!("{ex}:reserve:action"), -1),
        (format!("{ex}:reserve:action"), -1),
        (format!("{ex}:reserve:compensation"), 1),
        (format!("{ex}:ship:compensation"), 1),
        (format!("{ex}:ship:action"), -1),
    ] {
        let tx = c.transaction().await.expect("tx");
        let out = barrier::postgres(&tx, &key).await.expect("barrier");
        if out.ran() {
            tx.execute("UPDATE stock SET n = n + $1", &[&delta])
                .await
                .expect("work");
        }
        tx.commit().await.expect("commit");
        outcomes.push(out);
    }
    assert_eq!(
        outcomes,
        [
            Outcome::Ran(()),
            Outcome::Duplicate,
            Outcome::Ran(()),
            Outcome::NullCompensation,
            Outcome::Hanging
        ]
    );
    let n: i32 = c
        .query_one("SELECT n FROM stock", &[])
        .await
        .expect("n")
        .get(0);
    assert_eq!(n, 10);
    // A transaction that dies before its commit leaves no record.
    let key = format!("{ex}:pack:action");
    {
        let tx = c.transaction().await.expect("tx");
        assert!(barrier::postgres(&tx, &key).await.expect("barrier").ran());
        // dropped without commit: rolled back
    }
    let tx = c.transaction().await.expect("tx");
    assert!(
        barrier::postgres(&tx, &key).await.expect("barrier").ran(),
        "runs again"
    );
    tx.commit().await.expect("commit");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_store_conforms_and_keeps_its_data_and_secret() {
    use sagatx::store::{conformance, PostgresStore};
    let base = env_url("SAGATX_TEST_PG_URL");
    let url = fresh_db(&base).await;
    let store = Arc::new(PostgresStore::open(&url).await.expect("open"));
    conformance::run(store.clone())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let secret = store.secret().await.expect("secret");
    let before = store
        .list(&sagatx::ListQuery {
            limit: 10_000,
            ..Default::default()
        })
        .await
        .expect("list");
    // Several processes share a database: a second store opens beside the
    // first and sees the same data and secret.
    let second = PostgresStore::open(&url).await.expect("a second process");
    assert_eq!(second.secret().await.expect("secret"), secret);
    drop(second);
    drop(store);
    let reopened = PostgresStore::open(&url).await.ok();
    let again = Arc::new(reopened.expect("reopen once the first store is gone"));
    assert_eq!(again.secret().await.expect("secret"), secret);
    let after = again
        .list(&sagatx::ListQuery {
            limit: 10_000,
            ..Default::default()
        })
        .await
        .expect("list");
    assert_eq!(before.items, after.items);
    conformance::run(again)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
}

#[tokio::test]
async fn a_wrong_postgres_url_gives_a_clear_error() {
    use sagatx::store::PostgresStore;
    let err = PostgresStore::open("postgres://nobody:secret@127.0.0.1:1/x")
        .await
        .err()
        .expect("refused");
    let msg = err.to_string();
    assert!(msg.contains("check that PostgreSQL runs there"), "{msg}");
    assert!(
        msg.contains("error connecting to server: "),
        "the system's reason follows: {msg}"
    );
    assert!(
        !msg.contains("secret"),
        "the password is not printed: {msg}"
    );
    // A server that answers: its own message, not "db error", and what to do.
    let base = env_url("SAGATX_TEST_PG_URL");
    let (server, _) = base.rsplit_once('/').expect("url");
    let nobody = server.replacen("://postgres@", "://sagatx_nobody@", 1);
    assert_ne!(
        nobody, server,
        "the test server's URL names the user postgres"
    );
    for (url, says, hint) in [
        (
            format!("{server}/sagatx_no_such_database"),
            r#"database "sagatx_no_such_database" does not exist (3D000)"#,
            "create the database",
        ),
        (
            format!("{nobody}/postgres"),
            r#"role "sagatx_nobody" does not exist"#,
            "check the user and password",
        ),
    ] {
        let err = PostgresStore::open(&url).await.err().expect("refused");
        let msg = err.to_string();
        assert!(msg.contains(says) && msg.contains(hint), "{msg}");
    }
    let err = PostgresStore::open("postgres://x:y:z@@")
        .await
        .err()
        .expect("refused");
    assert!(err.to_string().contains("cannot open the store"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_engine_runs_sagas_on_postgres() {
    use sagatx::{Engine, Saga, Status, StepContext};
    let base = env_url("SAGATX_TEST_PG_URL");
    let url = fresh_db(&base).await;
    let store = sagatx::store::open(&url).await.expect("open");
    let saga = Saga::builder("pg")
        .step("a", |_c: StepContext| async {
            Ok::<_, sagatx::StepError>(1)
        })
        .compensate(|_c: StepContext| async { Ok::<_, sagatx::StepError>(()) })
        .step("b", |_c: StepContext| async {
            Err::<(), _>(sagatx::StepError::permanent("no"))
        })
        .build()
        .expect("valid");
    let engine = Engine::builder()
        .store_arc(store)
        .saga(saga)
        .build()
        .await
        .expect("engine");
    let ex = engine
        .run("pg", serde_json::json!({"x": 1}))
        .await
        .expect("run");
    assert_eq!(ex.status, Status::Compensated);
    assert_eq!(engine.get(ex.id).await.expect("get"), ex);
}

/// SQLite → PostgreSQL → SQLite leaves identical executions, and an engine
/// on the copy finishes the interrupted one and the paused one.
#[test]
fn a_journal_round_trips_through_postgres_and_the_copy_finishes_the_work() {
    use sagatx::store::{migrate, PostgresStore};
    use sagatx::{Engine, Reply, Saga, Status, StepContext, StepError};
    let base = env_url("SAGATX_TEST_PG_URL");
    let dir = tempfile::tempdir().expect("tempdir");
    let (src, back) = (dir.path().join("src.db"), dir.path().join("back.db"));
    let hang = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let h = hang.clone();
    let saga = move || {
        let h = h.clone();
        Saga::builder("m")
            .step("a", |_c: StepContext| async { Ok::<_, StepError>(1) })
            .compensate(|_c: StepContext| async { Ok::<_, StepError>(()) })
            .step("b", move |c: StepContext| {
                let h = h.clone();
                async move {
                    let block = h.load(std::sync::atomic::Ordering::SeqCst)
                        && c.input()["hang"] == serde_json::json!(true);
                    if block {
                        std::future::pending::<()>().await;
                    }
                    Ok::<_, StepError>(2)
                }
            })
            .step("c", |_c: StepContext| async { Ok::<_, StepError>(3) })
            .callback()
            .build()
            .expect("valid")
    };
    // First life, on SQLite: one paused on a callback, one in flight when
    // the runtime dies.
    let (paused, stuck) = {
        let rt = tokio::runtime::Runtime::new().expect("rt");
        let ids = rt.block_on(async {
            let engine = Engine::builder()
                .store(SqliteStore::open(&src).expect("open"))
                .saga(saga())
                .build()
                .await
                .expect("engine");
            let p = engine
                .run("m", serde_json::json!({"hang": false}))
                .await
                .expect("run");
            assert_eq!(p.status, Status::Paused);
            let s = engine
                .start("m", serde_json::json!({"hang": true}))
                .await
                .expect("start");
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            (p.id, s)
        });
        rt.shutdown_timeout(std::time::Duration::from_millis(100));
        ids
    };
    hang.store(false, std::sync::atomic::Ordering::SeqCst);
    let rt = tokio::runtime::Runtime::new().expect("rt");
    rt.block_on(async {
        // Wait for the first life's store to be closed (its lock released).
        let mut source = None;
        for _ in 0..100 {
            if let Ok(s) = SqliteStore::open(&src) {
                source = Some(s);
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        let source: Arc<dyn Store> = Arc::new(source.expect("source free"));
        let pg_url = fresh_db(&base).await;
        let pg: Arc<dyn Store> = Arc::new(PostgresStore::open(&pg_url).await.expect("pg"));
        let r1 = migrate::copy(&*source, &*pg).await.expect("to postgres");
        assert_eq!(r1.executions, 2);
        let copy: Arc<dyn Store> = Arc::new(SqliteStore::open(&back).expect("back"));
        migrate::copy(&*pg, &*copy).await.expect("back to sqlite");
        let a = source.scan(None, 100).await.expect("scan").items;
        let b = copy.scan(None, 100).await.expect("scan").items;
        assert_eq!(a, b, "identical executions after the round trip");
        assert_eq!(
            source.secret().await.expect("s"),
            copy.secret().await.expect("s")
        );
        // Into a store that holds data already: refused.
        let err = migrate::copy(&*source, &*copy)
            .await
            .expect_err("not empty");
        assert!(
            err.to_string().contains("already holds sagatx data"),
            "{err}"
        );
        drop((source, pg));
        // The copy finishes the work.
        let engine = Engine::builder()
            .store_arc(copy)
            .saga(saga())
            .build()
            .await
            .expect("engine");
        engine.recover().await.expect("recover");
        engine
            .reply(paused, "c", Reply::Ok(serde_json::json!("ok")))
            .await
            .expect("reply");
        assert_eq!(
            engine.wait(paused).await.expect("wait").status,
            Status::Completed
        );
        let s = engine.wait(stuck).await.expect("wait");
        assert_eq!(
            (s.status, s.awaiting),
            (Status::Paused, Some(sagatx::Awaiting::Reply))
        );
        assert_eq!(
            s.steps[1].attempts, 2,
            "the interrupted call was made again"
        );
    });
}

/// A port for a server of a test's own, free when asked for and below
/// the system's range of ephemeral ports (Linux's default starts at
/// 32768): a port in that range may be taken at any moment as the local
/// end of some other test's connection, or by a connection to it that
/// finds no listener (a TCP self-connect), and the server then cannot
/// bind it. The fixed port 55434 failed so, once, under the full suite.
fn free_port_for_a_server() -> u16 {
    let start = 20_000 + (std::process::id() % 10_000) as u16;
    (0..10_000u16)
        .map(|i| 20_000 + (start - 20_000 + i) % 10_000)
        .find(|&p| std::net::TcpListener::bind(("127.0.0.1", p)).is_ok())
        .unwrap_or_else(|| panic!("no free port in 20000-29999"))
}

/// A PostgreSQL restart in the middle of a load: the store reconnects,
/// nothing is lost, every saga completes. Uses a server of its own, since
/// it restarts it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgres_restart_mid_load_loses_nothing() {
    use sagatx::store::PostgresStore;
    use sagatx::{Engine, Saga, Status, StepContext, StepError};
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../../scripts/test-postgres");
    let port = free_port_for_a_server().to_string();
    let pg = move |cmd: &str| {
        let out = std::process::Command::new(script)
            .arg(cmd)
            .env("SAGATX_TEST_PG_PORT", &port)
            .env("SAGATX_TEST_PG_DATA", "/tmp/sagatx-test-pg-restart")
            .output()
            .expect("scripts/test-postgres");
        assert!(
            out.status.success(),
            "{cmd}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    let url = pg("start");
    struct Stop<F: Fn(&str) -> String>(F);
    impl<F: Fn(&str) -> String> Drop for Stop<F> {
        fn drop(&mut self) {
            (self.0)("stop");
        }
    }
    let stop = Stop(pg);
    let store = PostgresStore::open(&url).await.expect("open");
    let step = |_c: StepContext| async {
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        Ok::<_, StepError>(())
    };
    let saga = Saga::builder("r")
        .step("a", step)
        .step("b", step)
        .step("c", step)
        .build()
        .expect("valid");
    let engine = Engine::builder()
        .store(store)
        .saga(saga)
        .build()
        .await
        .expect("engine");
    let mut ids = Vec::new();
    for _ in 0..150 {
        ids.push(
            engine
                .start("r", serde_json::json!(null))
                .await
                .expect("start"),
        );
    }
    let stop = tokio::task::spawn_blocking(move || {
        (stop.0)("restart");
        stop
    })
    .await
    .expect("restart task");
    for id in ids {
        let ex = tokio::time::timeout(std::time::Duration::from_secs(60), engine.wait(id))
            .await
            .expect("finishes after the restart")
            .expect("wait");
        assert_eq!(ex.status, Status::Completed, "{id}");
        assert_eq!(
            ex.steps.iter().map(|s| s.attempts).sum::<u32>(),
            3,
            "{id}: no call made twice"
        );
    }
    drop(stop);
}

/// Two processes on one database (two stores, two owners): a claim takes
/// an execution from a lease that ran out, and the first holder's writes
/// are refused from then on even though their sequence is right.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_taken_over_fences_the_old_holder_out() {
    use sagatx::core::{Event, Execution};
    use sagatx::store::{Claim, PostgresOptions, PostgresStore, StoreError};
    use sagatx::{ExecutionId, SagaDefinition};
    let base = env_url("SAGATX_TEST_PG_URL");
    let url = fresh_db(&base).await;
    let lease = PostgresOptions {
        lease: std::time::Duration::from_millis(400),
    };
    let a = PostgresStore::open_with(&url, lease.clone())
        .await
        .expect("a");
    let b = PostgresStore::open_with(&url, lease).await.expect("b");
    let (la, lb) = (a.leases().expect("shared"), b.leases().expect("shared"));
    assert_ne!(la.owner(), lb.owner());
    let def = SagaDefinition::from_json(
        br#"{"name":"f","steps":[{"name":"s","action":{"url":"http://127.0.0.1:9/a"}}]}"#,
    )
    .expect("definition");
    a.put_definition(&def).await.expect("define");
    let id = ExecutionId(uuid::Uuid::now_v7());
    let env = sagatx::core::Env {
        now_ms: 1,
        random01: 0.5,
    };
    let mut ex = Execution::new(id, &def, 1, serde_json::json!({}), None, 1);
    let call = ex.handle(&def, Event::Start, env).expect("start").calls[0];
    ex.seq = 1;
    la.append_leased(&ex, 1)
        .await
        .expect("created under a's lease");
    // While a's lease runs, b cannot claim it, nor write to it.
    assert!(matches!(lb.claim(id).await.expect("claim"), Claim::Held));
    let mut next = ex.clone();
    next.seq = 2;
    next.updated_at_ms = 2;
    assert!(matches!(
        b.append(&next).await,
        Err(StoreError::LeaseLost(_))
    ));
    // Twice the lease time later, a's renewal has kept its lease alive.
    tokio::time::sleep(std::time::Duration::from_millis(900)).await;
    assert!(
        matches!(lb.claim(id).await.expect("claim"), Claim::Held),
        "a live process keeps its lease by renewing it"
    );
    // a's renewal stops with its store: once the lease runs out, b claims.
    let a_leases_owner = la.owner();
    drop(a);
    let mut taken = None;
    for _ in 0..50 {
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        if let Claim::Mine { ex, epoch } = lb.claim(id).await.expect("claim") {
            taken = Some((*ex, epoch));
            break;
        }
    }
    let (held, epoch) = taken.expect("b takes the execution over once a's lease ran out");
    assert_eq!(held.seq, 1);
    assert_eq!(epoch, 2, "the claim moved the epoch on");
    // The write a would make on waking up (seq 2 under epoch 1, made here
    // through another store of the same database) is refused: the sequence
    // is right, the epoch is not.
    let a2 = PostgresStore::open(&url).await.expect("a again");
    let l2 = a2.leases().expect("shared");
    assert_ne!(l2.owner(), a_leases_owner);
    assert!(matches!(
        l2.append_leased(&next, 1).await,
        Err(StoreError::LeaseLost(_))
    ));
    // b writes under its lease; a terminal write gives the lease up.
    lb.append_leased(&next, epoch).await.expect("b writes");
    let mut done = next.clone();
    done.handle(
        &def,
        Event::Outcome {
            step: call.step,
            phase: call.phase,
            attempt: call.attempt,
            outcome: Ok(serde_json::json!(1)),
        },
        env,
    )
    .expect("outcome");
    done.seq = 3;
    assert_eq!(done.status, sagatx::Status::Completed);
    lb.append_leased(&done, epoch).await.expect("b finishes");
    assert!(matches!(
        l2.claim(id).await.expect("claim"),
        Claim::Mine { .. }
    ));
}

/// `sslmode=verify-full&sslrootcert=…`: every connection of the store is
/// TLS, checked against the given certificate; a server whose certificate
/// the roots do not vouch for is refused with a message that says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_store_connects_over_tls_and_checks_the_certificate() {
    use sagatx::store::{conformance, PostgresStore};
    let base = env_url("SAGATX_TEST_PG_URL");
    let ca = env_url("SAGATX_TEST_PG_CA");
    let url = fresh_db(&base).await;
    let db = url.rsplit('/').next().expect("db").to_string();
    let store = Arc::new(
        PostgresStore::open(&format!("{url}?sslmode=verify-full&sslrootcert={ca}"))
            .await
            .unwrap_or_else(|e| panic!("open over TLS: {e}")),
    );
    conformance::run(store.clone())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let admin = client(&base).await;
    let rows = admin
        .query(
            "SELECT s.ssl FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid)
             WHERE a.datname = $1 AND a.application_name = 'sagatx'",
            &[&db],
        )
        .await
        .expect("pg_stat_ssl");
    assert!(rows.len() >= 2, "the store's connections: {}", rows.len());
    assert!(
        rows.iter().all(|r| r.get::<_, bool>(0)),
        "every connection of the store is TLS"
    );
    // The self-signed certificate is not among the system's roots.
    let err = PostgresStore::open(&format!("{url}?sslmode=require"))
        .await
        .err()
        .expect("an unknown certificate is refused");
    assert!(
        err.to_string().to_lowercase().contains("certificate"),
        "{err}"
    );
    // The data manager of two-phase commit takes the same URL settings.
    let tls_url = format!("{url}?sslmode=verify-full&sslrootcert={ca}");
    let dm = PostgresDataManager::begin("tls", &tls_url)
        .await
        .unwrap_or_else(|e| panic!("a data manager over TLS: {e}"));
    dm.client()
        .execute("INSERT INTO t (v) VALUES (1)", &[])
        .await
        .expect("insert");
    let tx = Transaction::new();
    tx.join(dm).expect("join");
    tx.commit().await.expect("commit over TLS");
    assert_eq!(crate::postgres::rows(&url).await, 1);
    let err = PostgresStore::open(&format!("{url}?sslrootcert=/nonexistent.pem"))
        .await
        .err()
        .expect("a missing root file is refused");
    assert!(
        err.to_string()
            .contains("cannot read sslrootcert /nonexistent.pem"),
        "{err}"
    );
}

/// Two engines on one database (two processes' worth): backoffs longer than
/// the idle horizon leave the executions with no driver and no lease, and
/// the due work is claimed by exactly one of the schedulers: every step is
/// called twice (a failure, then the retry), never three times.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn due_work_is_claimed_by_one_of_several_processes() {
    use sagatx::store::PostgresStore;
    use sagatx::{Engine, RetryPolicy, Saga, Status, StepContext, StepError};
    use std::collections::HashMap;
    use std::time::Duration;
    let base = env_url("SAGATX_TEST_PG_URL");
    let url = fresh_db(&base).await;
    let calls: Arc<std::sync::Mutex<HashMap<String, u32>>> = Arc::default();
    let saga = |calls: Arc<std::sync::Mutex<HashMap<String, u32>>>| {
        Saga::builder("backoff")
            .step("s", move |c: StepContext| {
                let calls = calls.clone();
                async move {
                    *calls
                        .lock()
                        .expect("lock")
                        .entry(c.execution_id().to_string())
                        .or_default() += 1;
                    if c.attempt() == 1 {
                        Err(StepError::transient("not yet"))
                    } else {
                        Ok(c.attempt())
                    }
                }
            })
            .retry(RetryPolicy {
                max_attempts: 3,
                initial_backoff_ms: 300,
                max_backoff_ms: 300,
                multiplier: 1.0,
            })
            .build()
            .expect("valid")
    };
    let mut engines = Vec::new();
    for _ in 0..2 {
        let store = PostgresStore::open(&url).await.expect("open");
        engines.push(
            Engine::builder()
                .store(store)
                .saga(saga(calls.clone()))
                .idle_horizon(Duration::ZERO)
                .poll_interval(Duration::from_millis(50))
                .build()
                .await
                .expect("engine"),
        );
    }
    let mut ids = Vec::new();
    for i in 0..20 {
        ids.push(
            engines[i % 2]
                .start("backoff", serde_json::json!({"i": i}))
                .await
                .expect("start"),
        );
    }
    for id in &ids {
        let ex = engines[0]
            .wait_timeout(*id, Duration::from_secs(20))
            .await
            .expect("wait");
        assert_eq!(ex.status, Status::Completed, "{ex:?}");
        assert_eq!(ex.steps[0].attempts, 2);
    }
    let calls = calls.lock().expect("lock").clone();
    assert_eq!(calls.len(), ids.len());
    assert!(
        calls.values().all(|&n| n == 2),
        "each step called twice: {calls:?}"
    );
    let admin = client(&url).await;
    let held: i64 = admin
        .query_one(
            "SELECT count(*) FROM sagatx_executions WHERE lease_owner IS NOT NULL",
            &[],
        )
        .await
        .expect("count")
        .get(0);
    assert_eq!(held, 0, "finished executions hold no lease");
}

/// A batch of many writes goes to PostgreSQL as one statement over arrays
/// for the new executions and one for the others; each write still gets the
/// answer it would get alone (written, `Exists`, `Conflict`, `LeaseLost`),
/// and only the writes that were right change a row. On a one-thread
/// runtime every write below is queued before the writer runs, so each
/// group is one batch.
#[tokio::test]
async fn a_batch_of_many_writes_answers_each_write_as_alone() {
    use sagatx::core::Execution;
    use sagatx::store::{PostgresStore, StoreError};
    use sagatx::SagaDefinition;
    let url = fresh_db(&env_url("SAGATX_TEST_PG_URL")).await;
    let store = PostgresStore::open(&url).await.expect("open");
    let leases = store.leases().expect("shared");
    let def = SagaDefinition::from_json(
        br#"{"name":"b","steps":[{"name":"s","action":{"url":"http://127.0.0.1:9/a"}}]}"#,
    )
    .expect("definition");
    store.put_definition(&def).await.expect("define");
    let new = || crate::support::started(&def);
    let exs: Vec<Execution> = (0..8).map(|_| new()).collect();
    let created =
        futures_util::future::join_all(exs.iter().map(|ex| leases.append_leased(ex, 1))).await;
    assert!(created.iter().all(Result::is_ok), "{created:?}");

    let next = |ex: &Execution, seq: u64| {
        let mut n = ex.clone();
        n.seq = seq;
        n.updated_at_ms = 2;
        n
    };
    let later = new();
    let writes = [
        next(&exs[0], 2),
        next(&exs[1], 2),
        next(&exs[2], 2),
        next(&exs[3], 3), // skips a sequence number
        exs[4].clone(),   // created again
        later.clone(),    // new
        next(&exs[5], 2), // under the wrong epoch, below
        next(&exs[6], 2),
    ];
    let answers = futures_util::future::join_all(writes.iter().enumerate().map(|(i, w)| {
        let epoch = if i == 6 { 2 } else { 1 };
        leases.append_leased(w, epoch)
    }))
    .await;
    assert!(answers[0].is_ok() && answers[1].is_ok() && answers[2].is_ok());
    assert!(
        matches!(
            answers[3],
            Err(StoreError::Conflict {
                expected: 2,
                found: Some(1),
                ..
            })
        ),
        "{:?}",
        answers[3]
    );
    assert!(matches!(answers[4], Err(StoreError::Exists(id)) if id == exs[4].id));
    assert!(answers[5].is_ok(), "{:?}", answers[5]);
    assert!(
        matches!(answers[6], Err(StoreError::LeaseLost(id)) if id == exs[5].id),
        "{:?}",
        answers[6]
    );
    assert!(answers[7].is_ok(), "{:?}", answers[7]);

    let seq = |id| {
        let store = &store;
        async move { store.load(id).await.expect("load").map(|ex| ex.seq) }
    };
    for (i, want) in [2, 2, 2, 1, 1, 1, 2, 1].into_iter().enumerate() {
        assert_eq!(seq(exs[i].id).await, Some(want), "execution {i}");
    }
    assert_eq!(seq(later.id).await, Some(1));
}

/// A batch PostgreSQL refuses tells its writers the server's reason (a
/// full disk there reads "could not extend file …"), not tokio-postgres's
/// bare "db error"; the store goes on with the next batch.
#[tokio::test]
async fn a_refused_batch_says_what_postgres_said() {
    use sagatx::store::PostgresStore;
    use sagatx::SagaDefinition;
    let url = fresh_db(&env_url("SAGATX_TEST_PG_URL")).await;
    let store = PostgresStore::open(&url).await.expect("open");
    let def = SagaDefinition::from_json(
        br#"{"name":"b","steps":[{"name":"s","action":{"url":"http://127.0.0.1:9/a"}}]}"#,
    )
    .expect("definition");
    store.put_definition(&def).await.expect("define");
    client(&url)
        .await
        .batch_execute(
            "CREATE FUNCTION refuse() RETURNS trigger AS $$ BEGIN
                 RAISE EXCEPTION 'refused by the test' USING ERRCODE = '53100';
             END $$ LANGUAGE plpgsql;
             CREATE TRIGGER refuse BEFORE INSERT ON sagatx_executions
                 FOR EACH ROW EXECUTE FUNCTION refuse();",
        )
        .await
        .expect("trigger");
    let err = store
        .append(&crate::support::started(&def))
        .await
        .expect_err("refused");
    let msg = err.to_string();
    assert!(
        msg.contains("PostgreSQL: 53100: refused by the test"),
        "{msg}"
    );
    client(&url)
        .await
        .batch_execute("DROP TRIGGER refuse ON sagatx_executions")
        .await
        .expect("drop trigger");
    store
        .append(&crate::support::started(&def))
        .await
        .expect("the next batch commits");
}

/// The summary counts by saga and status without reading every execution:
/// triggers add a row of changes per statement to `sagatx_counts`, and
/// each process's heartbeat folds them. Two processes (heartbeats every
/// 50 ms, so folding often and at once) run 300 sagas together, a third
/// of them compensated; the summary equals a count over the executions
/// themselves, and the counts end folded into one row for each pair.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_summary_stays_exact_while_processes_write_and_fold_together() {
    use sagatx::store::{PostgresOptions, PostgresStore};
    use sagatx::{Engine, Saga, Status, StepContext, StepError};
    use std::time::Duration;
    let url = fresh_db(&env_url("SAGATX_TEST_PG_URL")).await;
    let saga = || {
        Saga::builder("counted")
            .step("a", |_c: StepContext| async { Ok(1) })
            .compensate(|_c: StepContext| async { Ok(()) })
            .step("b", |c: StepContext| async move {
                match c.input()["i"].as_u64() {
                    Some(i) if i % 3 == 0 => Err(StepError::permanent("declined")),
                    _ => Ok(2),
                }
            })
            .build()
            .expect("valid")
    };
    let mut engines = Vec::new();
    let mut stores = Vec::new();
    for _ in 0..2 {
        let store = Arc::new(
            PostgresStore::open_with(
                &url,
                PostgresOptions {
                    lease: Duration::from_millis(200),
                },
            )
            .await
            .expect("open"),
        );
        stores.push(store.clone());
        engines.push(
            Engine::builder()
                .store_arc(store)
                .saga(saga())
                .build()
                .await
                .expect("engine"),
        );
    }
    let ids = futures_util::future::join_all(
        (0..300).map(|i| engines[i % 2].start("counted", serde_json::json!({ "i": i }))),
    )
    .await;
    for id in ids {
        let ex = engines[0]
            .wait_timeout(id.expect("start"), Duration::from_secs(30))
            .await
            .expect("wait");
        assert!(ex.status.is_terminal(), "{ex:?}");
    }
    let admin = client(&url).await;
    let truth: Vec<(String, String, i64)> = admin
        .query(
            "SELECT saga, status, count(*) FROM sagatx_executions GROUP BY saga, status ORDER BY saga, status",
            &[],
        )
        .await
        .expect("count")
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    assert_eq!(
        truth,
        [
            ("counted".to_string(), "compensated".to_string(), 100),
            ("counted".to_string(), "completed".to_string(), 200)
        ]
    );
    for store in &stores {
        let s = store.summary().await.expect("summary");
        assert_eq!(
            s.counts,
            [
                ("counted".to_string(), Status::Compensated, 100),
                ("counted".to_string(), Status::Completed, 200)
            ]
        );
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let rows: i64 = admin
            .query_one("SELECT count(*) FROM sagatx_counts", &[])
            .await
            .expect("rows")
            .get(0);
        if rows == 2 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the heartbeats fold the counts: still {rows} rows"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        stores[0].summary().await.expect("summary").counts.len(),
        2,
        "folding keeps the sums"
    );
}

/// The dashboard asks for the long-paused executions every two seconds:
/// PostgreSQL answers from the partial index of the paused ones, not by
/// reading every execution, on a table of many executions and few paused.
#[tokio::test]
async fn the_long_paused_are_read_from_their_index() {
    let url = fresh_db(&env_url("SAGATX_TEST_PG_URL")).await;
    let _store = sagatx::store::PostgresStore::open(&url)
        .await
        .expect("migrate and open");
    let c = client(&url).await;
    c.batch_execute(
        "INSERT INTO sagatx_executions (id, saga, status, seq, created_at, updated_at, state, paused_at)
         SELECT gen_random_uuid(), 's', CASE WHEN i % 1000 = 0 THEN 'paused' ELSE 'running' END,
                2, 0, i, '\\x00', CASE WHEN i % 1000 = 0 THEN i END
         FROM generate_series(1, 20000) i;
         ANALYZE sagatx_executions;",
    )
    .await
    .expect("rows");
    c.batch_execute(&format!(
        "PREPARE q(BIGINT, BIGINT) AS {}",
        sagatx::store::PG_PAUSED_BEFORE
    ))
    .await
    .expect("prepare");
    let plan: Vec<String> = c
        .query("EXPLAIN EXECUTE q(100000, 20)", &[])
        .await
        .expect("explain")
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(
        plan.iter().any(|l| l.contains("sagatx_executions_paused")),
        "{plan:#?}"
    );
}

/// A database made by an earlier version (schema 3, no counts) gets its
/// counts from the executions it holds when it is migrated, and rows
/// deleted by hand afterwards leave the counts.
#[tokio::test]
async fn an_older_schema_is_counted_when_it_is_migrated() {
    use sagatx::store::PostgresStore;
    use sagatx::Status;
    let url = fresh_db(&env_url("SAGATX_TEST_PG_URL")).await;
    let admin = client(&url).await;
    for sql in [
        include_str!("../../src/store/migrations/postgres/0001_executions.sql"),
        include_str!("../../src/store/migrations/postgres/0002_saga_status_index.sql"),
        include_str!("../../src/store/migrations/postgres/0003_leases_inbox_processes.sql"),
        "CREATE TABLE sagatx_schema (version INTEGER NOT NULL);
         INSERT INTO sagatx_schema (version) VALUES (3);
         INSERT INTO sagatx_executions (id, saga, status, seq, created_at, updated_at, state)
         SELECT gen_random_uuid(), CASE WHEN i % 2 = 0 THEN 'even' ELSE 'odd' END,
                CASE WHEN i % 5 = 0 THEN 'failed' ELSE 'completed' END, 3, 0, 0, '\\x00'
         FROM generate_series(1, 50) i;
         INSERT INTO sagatx_executions (id, saga, status, seq, created_at, updated_at, state)
         SELECT gen_random_uuid(), 'waiting', 'paused', 2, 0, i, '\\x00'
         FROM generate_series(1, 3) i;",
    ] {
        admin.batch_execute(sql).await.expect("the old schema");
    }
    let store = PostgresStore::open(&url).await.expect("migrate and open");
    let counts = |odd_failed| {
        vec![
            ("even".to_string(), Status::Completed, 20),
            ("even".to_string(), Status::Failed, 5),
            ("odd".to_string(), Status::Completed, 20),
            ("odd".to_string(), Status::Failed, odd_failed),
            ("waiting".to_string(), Status::Paused, 3),
        ]
    };
    assert_eq!(store.summary().await.expect("summary").counts, counts(5));
    let version: i32 = admin
        .query_one("SELECT version FROM sagatx_schema", &[])
        .await
        .expect("version")
        .get(0);
    assert_eq!(version, sagatx::store::PG_SCHEMA_VERSION);
    // Schema 5: the paused rows' `paused_at` is their `updated_at`.
    let paused: i64 = admin
        .query_one(
            "SELECT count(*) FROM sagatx_executions WHERE paused_at = updated_at",
            &[],
        )
        .await
        .expect("paused_at")
        .get(0);
    assert_eq!(paused, 3, "the paused rows are indexed by when they paused");
    admin
        .execute(
            "DELETE FROM sagatx_executions WHERE ctid IN
             (SELECT ctid FROM sagatx_executions WHERE saga = 'odd' AND status = 'failed' LIMIT 2)",
            &[],
        )
        .await
        .expect("delete");
    assert_eq!(store.summary().await.expect("summary").counts, counts(3));
}
