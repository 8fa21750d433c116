//! Unit tests of two-phase commit, the loop and `with_transaction`.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;

use super::*;

type Log = Arc<Mutex<Vec<String>>>;

/// A data manager that records every call and can be told to fail.
struct Dm {
    name: String,
    key: String,
    log: Log,
    /// phase → how many more times it fails, and with what.
    fail: Mutex<Vec<(&'static str, u32, TxError)>>,
    savepoints: bool,
}

fn dm(log: &Log, name: &str, key: &str) -> Arc<Dm> {
    Arc::new(Dm {
        name: name.into(),
        key: key.into(),
        log: log.clone(),
        fail: Mutex::new(Vec::new()),
        savepoints: true,
    })
}

impl Dm {
    fn fail_in(self: &Arc<Self>, phase: &'static str, times: u32, e: TxError) -> Arc<Self> {
        self.fail.lock().expect("lock").push((phase, times, e));
        self.clone()
    }
    fn call(&self, phase: &'static str) -> Result<(), TxError> {
        self.log
            .lock()
            .expect("lock")
            .push(format!("{}:{phase}", self.name));
        let mut f = self.fail.lock().expect("lock");
        for (p, n, e) in f.iter_mut() {
            if *p == phase && *n > 0 {
                *n -= 1;
                return Err(e.clone());
            }
        }
        Ok(())
    }
}

struct Rollback {
    name: String,
    log: Log,
}
impl SavepointRollback for Rollback {
    fn rollback(&mut self) -> Result<(), TxError> {
        self.log
            .lock()
            .expect("lock")
            .push(format!("{}:rollback", self.name));
        Ok(())
    }
}

#[async_trait]
impl DataManager for Dm {
    fn sort_key(&self) -> String {
        self.key.clone()
    }
    fn name(&self) -> String {
        self.name.clone()
    }
    async fn abort(&self, _: &TxInfo) -> Result<(), TxError> {
        self.call("abort")
    }
    async fn tpc_begin(&self, _: &TxInfo) -> Result<(), TxError> {
        self.call("tpc_begin")
    }
    async fn commit(&self, _: &TxInfo) -> Result<(), TxError> {
        self.call("commit")
    }
    async fn tpc_vote(&self, _: &TxInfo) -> Result<(), TxError> {
        self.call("tpc_vote")
    }
    async fn tpc_finish(&self, _: &TxInfo) -> Result<(), TxError> {
        self.call("tpc_finish")
    }
    async fn tpc_abort(&self, _: &TxInfo) -> Result<(), TxError> {
        self.call("tpc_abort")
    }
    fn savepoint(&self) -> Result<Box<dyn SavepointRollback>, TxError> {
        if self.savepoints {
            Ok(Box::new(Rollback {
                name: self.name.clone(),
                log: self.log.clone(),
            }))
        } else {
            Err(TxError::permanent("no savepoints"))
        }
    }
}

fn take(log: &Log) -> Vec<String> {
    std::mem::take(&mut *log.lock().expect("lock"))
}

/// Joins `m` with `join`, or, with `sync`, as a synchronous manager with
/// `join_sync`: the tests below run with both kinds mixed too.
fn join_as(tx: &Transaction, m: Arc<Dm>, sync: bool) -> Result<(), TransactionError> {
    if sync {
        tx.join_sync(Arc::new(SyncDm(m)))
    } else {
        tx.join(m)
    }
}

#[tokio::test]
async fn commit_runs_each_phase_over_managers_in_stable_sort_order() {
    for mixed in [false, true] {
        let log = Log::default();
        let tx = Transaction::new();
        join_as(&tx, dm(&log, "c", "b"), mixed).expect("join");
        join_as(&tx, dm(&log, "a", "a"), false).expect("join");
        join_as(&tx, dm(&log, "d", "b"), mixed).expect("join");
        assert_eq!(tx.managers(), ["c", "a", "d"]);
        tx.commit().await.expect("commit");
        let want: Vec<String> = ["tpc_begin", "commit", "tpc_vote", "tpc_finish"]
            .iter()
            .flat_map(|p| ["a", "c", "d"].map(|n| format!("{n}:{p}")))
            .collect();
        assert_eq!(take(&log), want, "mixed: {mixed}");
        assert_eq!(tx.status(), TxStatus::Committed);
        assert!(matches!(
            tx.commit().await,
            Err(TransactionError::NotActive(_))
        ));
        assert!(matches!(
            join_as(&tx, dm(&log, "late", "z"), mixed),
            Err(TransactionError::NotActive(_))
        ));
    }
}

#[tokio::test]
async fn a_failing_vote_aborts_every_manager() {
    for mixed in [false, true] {
        let log = Log::default();
        let tx = Transaction::new();
        join_as(&tx, dm(&log, "a", "1"), false).expect("join");
        let b = dm(&log, "b", "2").fail_in("tpc_vote", 1, TxError::transient("conflict"));
        join_as(&tx, b, mixed).expect("join");
        let err = tx.commit().await.expect_err("aborted");
        assert!(
            matches!(&err, TransactionError::Aborted { manager, phase: "tpc_vote", .. } if manager == "b"),
            "{err}"
        );
        assert_eq!(err.class(), ErrorClass::Transient);
        let l = take(&log);
        assert!(
            l.ends_with(&["a:tpc_abort".to_string(), "b:tpc_abort".to_string()]),
            "{l:?}"
        );
        assert!(!l.iter().any(|x| x.ends_with("tpc_finish")));
        assert_eq!(tx.status(), TxStatus::Aborted);
    }
}

#[tokio::test]
async fn a_failure_after_the_vote_is_serious_and_the_commit_can_be_finished() {
    for mixed in [false, true] {
        let log = Log::default();
        let tx = Transaction::new();
        join_as(&tx, dm(&log, "a", "1"), mixed).expect("join");
        let b = dm(&log, "b", "2").fail_in("tpc_finish", 1, TxError::unknown_outcome("network"));
        join_as(&tx, b, mixed).expect("join");
        join_as(&tx, dm(&log, "c", "3"), false).expect("join");
        let err = tx.commit().await.expect_err("failed");
        assert!(
            matches!(
                err,
                TransactionError::CommitFailed {
                    finished: 1,
                    total: 3,
                    ..
                }
            ),
            "{err}"
        );
        assert!(err.to_string().contains("needs recovery"), "{err}");
        assert_eq!(tx.status(), TxStatus::CommitFailed);
        take(&log);
        // Retrying finishes only the managers that did not.
        tx.commit().await.expect("finished");
        assert_eq!(take(&log), ["b:tpc_finish", "c:tpc_finish"]);
        assert_eq!(tx.status(), TxStatus::Committed);
    }
}

#[tokio::test]
async fn abort_reaches_every_manager_and_reports_failures() {
    let log = Log::default();
    let tx = Transaction::new();
    tx.join(dm(&log, "a", "1").fail_in("abort", 1, TxError::permanent("stuck")))
        .expect("join");
    tx.join(dm(&log, "b", "2")).expect("join");
    let err = tx.abort().await.expect_err("abort failed");
    assert!(
        matches!(&err, TransactionError::AbortFailed { failures } if failures.len() == 1),
        "{err}"
    );
    assert_eq!(take(&log), ["a:abort", "b:abort"]);
    assert_eq!(tx.status(), TxStatus::Aborted);
}

#[tokio::test]
async fn rolling_back_a_savepoint_aborts_and_unjoins_later_managers() {
    let log = Log::default();
    let tx = Transaction::new();
    tx.join(dm(&log, "a", "1")).expect("join");
    let mut sp = tx.savepoint().expect("savepoint");
    tx.join(dm(&log, "b", "2")).expect("join");
    let mut later = tx.savepoint().expect("savepoint 2");
    sp.rollback().await.expect("rollback");
    assert_eq!(take(&log), ["a:rollback", "b:abort"]);
    assert_eq!(tx.managers(), ["a"]);
    assert!(matches!(
        later.rollback().await,
        Err(TransactionError::InvalidSavepoint)
    ));
    // The first savepoint stays usable.
    sp.rollback().await.expect("again");
    take(&log);
    tx.commit().await.expect("commit");
    assert!(take(&log).iter().all(|l| l.starts_with("a:")));
    let no_sp = Arc::new(Dm {
        name: "x".into(),
        key: "x".into(),
        log: log.clone(),
        fail: Mutex::new(Vec::new()),
        savepoints: false,
    });
    let tx = Transaction::new();
    tx.join(no_sp).expect("join");
    assert!(matches!(tx.savepoint(), Err(TransactionError::SavepointUnsupported(n)) if n == "x"));
}

#[tokio::test]
async fn after_commit_calls_run_last_only_on_commit_and_cannot_break_it() {
    let log = Log::default();
    let tx = Transaction::new();
    let l = log.clone();
    near_end(&tx, move || {
        l.lock().expect("lock").push("near-end".into());
        Ok(())
    });
    let l = log.clone();
    after_commit(&tx, move || {
        l.lock().expect("lock").push("after-commit".into());
        Err(TxError::permanent("mail server down"))
    });
    tx.join(dm(&log, "db", "db")).expect("join");
    tx.commit()
        .await
        .expect("a failing after-commit call does not fail the commit");
    let l = take(&log);
    assert_eq!(
        l.iter()
            .filter(|x| !x.starts_with("db:tpc_") && !x.starts_with("db:commit"))
            .collect::<Vec<_>>(),
        ["after-commit", "near-end"]
    );
    let finish = l.iter().position(|x| x == "db:tpc_finish").expect("finish");
    assert!(finish < l.iter().position(|x| x == "after-commit").expect("after"));

    let tx = Transaction::new();
    let l = log.clone();
    after_commit(&tx, move || {
        l.lock().expect("lock").push("never".into());
        Ok(())
    });
    tx.abort().await.expect("abort");
    assert!(take(&log).is_empty(), "no call on abort");

    let tx = Transaction::new();
    tx.join(dm(&log, "db", "db")).expect("join");
    after_commit_voting(&tx, || Ok(()), || Err(TxError::permanent("veto")));
    let err = tx.commit().await.expect_err("vetoed");
    assert!(
        matches!(
            err,
            TransactionError::Aborted {
                phase: "tpc_vote",
                ..
            }
        ),
        "{err}"
    );
}

#[tokio::test]
async fn a_queue_put_is_visible_only_after_commit_and_a_full_queue_aborts() {
    let (q, mut rx) = tokio::sync::mpsc::channel::<u32>(1);
    let tx = Transaction::new();
    put_nowait(&tx, &q, 7).expect("put");
    assert!(rx.try_recv().is_err(), "not before commit");
    tx.commit().await.expect("commit");
    assert_eq!(rx.try_recv().ok(), Some(7));

    q.try_send(1).expect("fill the queue");
    let tx = Transaction::new();
    put_nowait(&tx, &q, 8).expect("put");
    let err = tx.commit().await.expect_err("full");
    assert!(err.to_string().contains("the queue is full"), "{err}");
    assert_eq!(rx.try_recv().ok(), Some(1));
    assert!(rx.try_recv().is_err(), "the aborted put never arrives");

    let tx = Transaction::new();
    put_nowait(&tx, &q, 9).expect("put");
    tx.abort().await.expect("abort");
    assert!(rx.try_recv().is_err());
}

#[derive(Default)]
struct Events(Mutex<Vec<String>>, Option<Duration>);

impl Events {
    fn push(&self, s: String) {
        self.0.lock().expect("lock").push(s);
    }
    fn take(&self) -> Vec<String> {
        std::mem::take(&mut *self.0.lock().expect("lock"))
    }
}

impl Hooks for Events {
    fn will_first_attempt(&self) {
        self.push("will_first_attempt".into());
    }
    fn will_retry(&self, a: u32) {
        self.push(format!("will_retry {a}"));
    }
    fn will_sleep(&self, a: u32, sleep: &mut Duration) {
        self.push(format!("will_sleep {a}"));
        if let Some(d) = self.1 {
            *sleep = d;
        }
    }
    fn began(&self, _: &Transaction) {
        self.push("began".into());
    }
    fn committed(&self, _: &Transaction) {
        self.push("committed".into());
    }
    fn aborted(&self, _: &Transaction, e: Option<&LoopError>) {
        self.push(format!(
            "aborted{}",
            if e.is_some() { " with error" } else { "" }
        ));
    }
    fn prep_for_retry(&self, a: u32) {
        self.push(format!("prep_for_retry {a}"));
    }
    fn describe_transaction(&self) -> String {
        "GET /orders".into()
    }
}

#[tokio::test(start_paused = true)]
async fn the_loop_retries_transient_errors_with_events_in_order_and_backoff() {
    let events = Arc::new(Events::default());
    let lp = TransactionLoop::builder()
        .attempts(3)
        .hooks(events.clone())
        .build();
    let n = AtomicU32::new(0);
    let t0 = tokio::time::Instant::now();
    let v = lp
        .run(|tx| {
            let k = n.fetch_add(1, Ordering::SeqCst);
            async move {
                assert_eq!(tx.info().note, "GET /orders");
                if k == 0 {
                    Err(TxError::transient("deadlock"))
                } else {
                    Ok(42)
                }
            }
        })
        .await
        .expect("second attempt commits");
    assert_eq!(v, 42);
    let slept = t0.elapsed();
    assert!(
        (Duration::from_millis(80)..=Duration::from_millis(120)).contains(&slept),
        "{slept:?}"
    );
    assert_eq!(
        events.take(),
        [
            "will_first_attempt",
            "began",
            "aborted with error",
            "will_retry 2",
            "prep_for_retry 2",
            "will_sleep 2",
            "began",
            "committed"
        ]
    );
}

#[tokio::test(start_paused = true)]
async fn will_sleep_can_change_the_sleep_and_attempts_run_out() {
    let events = Arc::new(Events(Mutex::default(), Some(Duration::from_secs(5))));
    let lp = TransactionLoop::builder()
        .attempts(2)
        .hooks(events.clone())
        .build();
    let t0 = tokio::time::Instant::now();
    let err = lp
        .run(|_| async { Err::<(), _>(TxError::transient("busy")) })
        .await
        .expect_err("runs out");
    assert_eq!(
        err,
        LoopError::Handler(TxError::transient("busy")),
        "the last error"
    );
    assert_eq!(t0.elapsed(), Duration::from_secs(5));
    assert_eq!(events.take().iter().filter(|e| *e == "began").count(), 2);
}

#[tokio::test]
async fn the_loop_does_not_retry_permanent_errors_and_respects_retry_if() {
    let n = AtomicU32::new(0);
    let lp = TransactionLoop::builder().attempts(5).build();
    let err = lp
        .run(|_| {
            n.fetch_add(1, Ordering::SeqCst);
            async { Err::<(), _>(TxError::permanent("bad input")) }
        })
        .await
        .expect_err("not retried");
    assert_eq!(err.class(), ErrorClass::Permanent);
    assert_eq!(n.load(Ordering::SeqCst), 1);
    let lp = TransactionLoop::builder()
        .attempts(3)
        .backoff(sagatx_core::RetryPolicy {
            initial_backoff_ms: 0,
            max_backoff_ms: 0,
            ..Default::default()
        })
        .retry_if(|e| e.to_string().contains("bad input"))
        .build();
    n.store(0, Ordering::SeqCst);
    let _ = lp
        .run(|_| {
            n.fetch_add(1, Ordering::SeqCst);
            async { Err::<(), _>(TxError::permanent("bad input")) }
        })
        .await;
    assert_eq!(n.load(Ordering::SeqCst), 3, "retry_if decides");
}

#[tokio::test]
async fn read_only_work_and_a_veto_abort_instead_of_committing() {
    struct Veto;
    impl Hooks for Veto {
        fn commit_veto(&self, _: &Transaction) -> bool {
            true
        }
    }
    let log = Log::default();
    let lp = TransactionLoop::builder().build();
    let d = dm(&log, "db", "db");
    let v = lp
        .run(|tx| {
            tx.join(d.clone()).expect("join");
            tx.set_read_only();
            async { Ok(1) }
        })
        .await
        .expect("ok");
    assert_eq!(v, 1);
    assert_eq!(take(&log), ["db:abort"]);
    let lp = TransactionLoop::builder().hooks(Arc::new(Veto)).build();
    lp.run(|tx| {
        tx.join(d.clone()).expect("join");
        async { Ok(()) }
    })
    .await
    .expect("ok");
    assert_eq!(take(&log), ["db:abort"]);
}

#[tokio::test]
async fn lifecycle_and_foreign_transaction_errors() {
    let lp = TransactionLoop::builder().build();
    let err = lp
        .run(|tx| async move {
            let e = tx.commit().await.expect_err("the loop is in control");
            assert_eq!(e, TransactionError::Lifecycle("commit()"));
            let e = tx.abort().await.expect_err("the loop is in control");
            assert_eq!(e, TransactionError::Lifecycle("abort()"));
            Err::<(), _>(TxError::permanent(e.to_string()))
        })
        .await
        .expect_err("handler error");
    assert!(
        err.to_string().contains("controlled by a transaction loop"),
        "{err}"
    );
    let tm = lp.manager().clone();
    let err = lp
        .run(|_| {
            tm.begin();
            async { Ok(()) }
        })
        .await
        .expect_err("foreign");
    assert!(
        matches!(
            err,
            LoopError::Transaction(TransactionError::Foreign { .. })
        ),
        "{err}"
    );
}

#[tokio::test(start_paused = true)]
async fn with_transaction_retries_the_callback_on_transient_errors() {
    let log = Log::default();
    let opts = WithTransaction::new(TransactionManager::new());
    let n = AtomicU32::new(0);
    let d = dm(&log, "db", "db").fail_in("tpc_vote", 1, TxError::transient("write conflict"));
    let v = with_transaction(&opts, |tx| {
        let k = n.fetch_add(1, Ordering::SeqCst);
        tx.join(d.clone()).expect("join");
        async move {
            if k == 0 {
                Err(TxError::transient("TransientTransactionError"))
            } else {
                Ok(k)
            }
        }
    })
    .await
    .expect("commits");
    // 1: callback error; 2: vote conflict (transient); 3: commits.
    assert_eq!(v, 2);
    assert_eq!(
        take(&log).iter().filter(|l| *l == "db:tpc_finish").count(),
        1
    );
}

#[tokio::test(start_paused = true)]
async fn with_transaction_retries_only_the_commit_when_its_result_is_unknown() {
    let log = Log::default();
    let opts = WithTransaction::new(TransactionManager::new());
    let n = AtomicU32::new(0);
    let a = dm(&log, "a", "1");
    let b = dm(&log, "b", "2").fail_in("tpc_finish", 2, TxError::unknown_outcome("no answer"));
    with_transaction(&opts, |tx| {
        n.fetch_add(1, Ordering::SeqCst);
        tx.join(a.clone()).expect("join");
        tx.join(b.clone()).expect("join");
        async { Ok(()) }
    })
    .await
    .expect("commits");
    assert_eq!(n.load(Ordering::SeqCst), 1, "the callback ran once");
    let l = take(&log);
    assert_eq!(
        l.iter().filter(|x| *x == "a:tpc_finish").count(),
        1,
        "committed at most once: {l:?}"
    );
    assert_eq!(l.iter().filter(|x| *x == "b:tpc_finish").count(), 3);
}

#[tokio::test(start_paused = true)]
async fn with_transaction_gives_up_after_its_deadline() {
    let opts = WithTransaction::new(TransactionManager::new());
    let t0 = tokio::time::Instant::now();
    let n = AtomicU32::new(0);
    let err = with_transaction(&opts, |_| {
        n.fetch_add(1, Ordering::SeqCst);
        async {
            tokio::time::sleep(Duration::from_secs(7)).await;
            Err::<(), _>(TxError::transient("still busy"))
        }
    })
    .await
    .expect_err("gives up");
    assert_eq!(err, LoopError::Handler(TxError::transient("still busy")));
    // Attempts start until 120 s have passed: 18 attempts of 7 s.
    assert_eq!(n.load(Ordering::SeqCst), 18);
    assert_eq!(t0.elapsed(), Duration::from_secs(126));
    let short = WithTransaction {
        deadline: Duration::from_secs(10),
        ..WithTransaction::new(TransactionManager::new())
    };
    n.store(0, Ordering::SeqCst);
    let _ = with_transaction(&short, |_| {
        n.fetch_add(1, Ordering::SeqCst);
        async {
            tokio::time::sleep(Duration::from_secs(7)).await;
            Err::<(), _>(TxError::transient("busy"))
        }
    })
    .await;
    assert_eq!(n.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn with_transaction_leaves_a_transaction_the_callback_ended() {
    let log = Log::default();
    let opts = WithTransaction::new(TransactionManager::new());
    let d = dm(&log, "db", "db");
    with_transaction(&opts, |tx| {
        tx.join(d.clone()).expect("join");
        async move {
            tx.commit()
                .await
                .map_err(|e| TxError::permanent(e.to_string()))?;
            Ok(())
        }
    })
    .await
    .expect("ok");
    assert_eq!(
        take(&log).iter().filter(|l| *l == "db:tpc_finish").count(),
        1
    );
    with_transaction(&opts, |tx| {
        tx.join(d.clone()).expect("join");
        async move {
            tx.abort()
                .await
                .map_err(|e| TxError::permanent(e.to_string()))?;
            Ok(())
        }
    })
    .await
    .expect("ok");
    assert_eq!(take(&log), ["db:abort"]);
}

#[tokio::test]
async fn a_manager_that_fails_in_every_phase_gets_clear_errors_and_harms_no_one() {
    let log = Log::default();
    let broken = || {
        let d = dm(&log, "broken", "b");
        for p in [
            "abort",
            "tpc_begin",
            "commit",
            "tpc_vote",
            "tpc_finish",
            "tpc_abort",
        ] {
            d.fail_in(p, 99, TxError::permanent(format!("{p} is broken")));
        }
        d
    };
    let tx = Transaction::new();
    tx.join(dm(&log, "good", "a")).expect("join");
    tx.join(broken()).expect("join");
    let err = tx.commit().await.expect_err("fails");
    assert_eq!(
        err.to_string(),
        "the transaction was aborted: broken failed in tpc_begin: tpc_begin is broken"
    );
    let l = take(&log);
    assert!(
        l.contains(&"good:tpc_abort".to_string()),
        "the good one is undone: {l:?}"
    );
    assert!(!l.iter().any(|x| x == "good:tpc_finish"));
    let tx = Transaction::new();
    tx.join(broken()).expect("join");
    let err = tx.abort().await.expect_err("abort fails");
    assert_eq!(
        err.to_string(),
        "aborting failed in broken: abort is broken"
    );
}

/// A manager that notes the global id it is told.
struct GidDm(Mutex<Vec<String>>);

#[async_trait]
impl DataManager for GidDm {
    fn sort_key(&self) -> String {
        "gid".into()
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
    async fn tpc_vote(&self, tx: &TxInfo) -> Result<(), TxError> {
        self.0.lock().expect("lock").push(tx.gid().to_string());
        Ok(())
    }
    async fn tpc_finish(&self, tx: &TxInfo) -> Result<(), TxError> {
        self.0.lock().expect("lock").push(tx.gid().to_string());
        Ok(())
    }
    async fn tpc_abort(&self, _: &TxInfo) -> Result<(), TxError> {
        Ok(())
    }
}

/// The global id a manager is told (made on first use) is the
/// transaction's own, the same in every call, and differs between
/// transactions.
#[tokio::test]
async fn managers_see_the_transactions_global_id() {
    let seen = Arc::new(GidDm(Mutex::new(Vec::new())));
    let a = Transaction::new();
    a.join(seen.clone()).expect("join");
    a.commit().await.expect("commit");
    let b = Transaction::new();
    b.join(seen.clone()).expect("join");
    b.commit().await.expect("commit");
    let got = seen.0.lock().expect("lock").clone();
    assert_eq!(
        got,
        [a.gid(), a.gid(), b.gid(), b.gid()]
            .map(String::from)
            .to_vec()
    );
    assert_ne!(a.gid(), b.gid());
    assert_eq!(a.gid().len(), 32);
    assert!(a.gid().chars().all(|c| c.is_ascii_hexdigit()));
}

/// The same recording manager, joined as a [`SyncDataManager`].
struct SyncDm(Arc<Dm>);

impl SyncDataManager for SyncDm {
    fn sort_key(&self) -> String {
        self.0.key.clone()
    }
    fn name(&self) -> String {
        self.0.name.clone()
    }
    fn abort(&self, _: &TxInfo) -> Result<(), TxError> {
        self.0.call("abort")
    }
    fn tpc_begin(&self, _: &TxInfo) -> Result<(), TxError> {
        self.0.call("tpc_begin")
    }
    fn commit(&self, _: &TxInfo) -> Result<(), TxError> {
        self.0.call("commit")
    }
    fn tpc_vote(&self, _: &TxInfo) -> Result<(), TxError> {
        self.0.call("tpc_vote")
    }
    fn tpc_finish(&self, _: &TxInfo) -> Result<(), TxError> {
        self.0.call("tpc_finish")
    }
    fn tpc_abort(&self, _: &TxInfo) -> Result<(), TxError> {
        self.0.call("tpc_abort")
    }
    fn savepoint(&self) -> Result<Box<dyn SavepointRollback>, TxError> {
        DataManager::savepoint(&*self.0)
    }
}

fn sdm(log: &Log, name: &str, key: &str) -> Arc<SyncDm> {
    Arc::new(SyncDm(dm(log, name, key)))
}

#[tokio::test]
async fn a_manager_joined_by_both_methods_counts_once_and_aborts_and_rolls_back() {
    let log = Log::default();
    let tx = Transaction::new();
    let a = sdm(&log, "a", "1");
    tx.join_sync(a.clone()).expect("join");
    // The same manager through the blanket `DataManager`: not a second one.
    tx.join(a.clone()).expect("join again");
    assert_eq!(tx.managers(), ["a"]);
    let mut sp = tx.savepoint().expect("savepoint");
    tx.join_sync(sdm(&log, "b", "2")).expect("join");
    sp.rollback().await.expect("rollback");
    assert_eq!(take(&log), ["a:rollback", "b:abort"]);
    assert_eq!(tx.managers(), ["a"]);
    tx.abort().await.expect("abort");
    assert_eq!(take(&log), ["a:abort"]);
    assert_eq!(tx.status(), TxStatus::Aborted);

    // Joined through `join` alone, a synchronous manager takes the boxed
    // path with the same outcome.
    let tx = Transaction::new();
    tx.join(sdm(&log, "x", "1")).expect("join");
    tx.commit().await.expect("commit");
    assert_eq!(
        take(&log),
        ["x:tpc_begin", "x:commit", "x:tpc_vote", "x:tpc_finish"]
    );
}

mod kinds {
    //! A transaction's calls and end do not depend on how its managers
    //! were joined: random managers, keys and failures, joined with a
    //! random mix of `join` and `join_sync`, against the same managers
    //! all joined with `join`.

    use proptest::prelude::*;

    use super::*;

    /// A manager: its sort key, whether it joins with `join_sync`, and
    /// the phase it fails in once (if any) and how.
    type Manager = (u8, bool, Option<(usize, u8)>);

    #[derive(Debug, Clone)]
    struct Plan {
        managers: Vec<Manager>,
        /// Commit, or abort.
        commit: bool,
    }

    const PHASES: [&str; 6] = [
        "tpc_begin",
        "commit",
        "tpc_vote",
        "tpc_finish",
        "abort",
        "tpc_abort",
    ];

    fn plan() -> impl Strategy<Value = Plan> {
        (
            proptest::collection::vec(
                (
                    0u8..3,
                    any::<bool>(),
                    proptest::option::of((0usize..PHASES.len(), 0u8..3)),
                ),
                1..=4,
            ),
            any::<bool>(),
        )
            .prop_map(|(managers, commit)| Plan { managers, commit })
    }

    fn error(kind: u8) -> TxError {
        match kind {
            0 => TxError::transient("t"),
            1 => TxError::permanent("p"),
            _ => TxError::unknown_outcome("u"),
        }
    }

    /// Runs the plan; `mixed` joins as the plan says, otherwise all with
    /// `join`. What was called, the outcome, the end status.
    async fn run(plan: &Plan, mixed: bool) -> (Vec<String>, Result<(), String>, TxStatus) {
        let log = Log::default();
        let tx = Transaction::new();
        for (i, (key, sync, fail)) in plan.managers.iter().enumerate() {
            let m = dm(&log, &format!("m{i}"), &format!("k{key}"));
            if let Some((phase, kind)) = fail {
                m.fail_in(PHASES[*phase], 1, error(*kind));
            }
            let joined = if mixed && *sync {
                tx.join_sync(Arc::new(SyncDm(m)))
            } else {
                tx.join(m)
            };
            joined.expect("join");
        }
        let outcome = if plan.commit {
            tx.commit().await
        } else {
            tx.abort().await
        };
        (take(&log), outcome.map_err(|e| e.to_string()), tx.status())
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]
        #[test]
        fn joining_synchronously_changes_no_call_and_no_outcome(p in plan()) {
            let rt = tokio::runtime::Builder::new_current_thread()
                .build()
                .map_err(|e| TestCaseError::fail(e.to_string()))?;
            let (mixed, all_async) = rt.block_on(async { (run(&p, true).await, run(&p, false).await) });
            prop_assert_eq!(mixed, all_async);
        }
    }
}

/// Transaction numbers come from per-thread blocks: unique across
/// threads beginning transactions at once, and increasing within each.
#[test]
fn transaction_numbers_are_unique_across_threads_and_increase_within_one() {
    let per_thread = 3 * ID_BLOCK as usize + 7;
    let threads: Vec<_> = (0..4)
        .map(|_| {
            std::thread::spawn(move || {
                (0..per_thread)
                    .map(|_| Transaction::new().id())
                    .collect::<Vec<u64>>()
            })
        })
        .collect();
    let mut all = std::collections::HashSet::new();
    for t in threads {
        let ids = t.join().expect("thread");
        assert!(ids.windows(2).all(|w| w[0] < w[1]), "not increasing");
        for id in ids {
            assert!(id > 0);
            assert!(all.insert(id), "transaction number {id} given twice");
        }
    }
    assert_eq!(all.len(), 4 * per_thread);
}

/// Records the transaction's status in every phase it is called in.
struct StatusDm {
    tx: Transaction,
    seen: Mutex<Vec<(&'static str, TxStatus)>>,
    /// How many managers the transaction listed at each call.
    listed: Mutex<Vec<usize>>,
}

impl StatusDm {
    fn see(&self, phase: &'static str) -> Result<(), TxError> {
        self.seen
            .lock()
            .expect("lock")
            .push((phase, self.tx.status()));
        self.listed
            .lock()
            .expect("lock")
            .push(self.tx.managers().len());
        Ok(())
    }
}

impl SyncDataManager for StatusDm {
    fn sort_key(&self) -> String {
        "status".into()
    }
    fn abort(&self, _: &TxInfo) -> Result<(), TxError> {
        self.see("abort")
    }
    fn tpc_begin(&self, _: &TxInfo) -> Result<(), TxError> {
        self.see("tpc_begin")
    }
    fn commit(&self, _: &TxInfo) -> Result<(), TxError> {
        self.see("commit")
    }
    fn tpc_vote(&self, _: &TxInfo) -> Result<(), TxError> {
        self.see("tpc_vote")
    }
    fn tpc_finish(&self, _: &TxInfo) -> Result<(), TxError> {
        self.see("tpc_finish")
    }
    fn tpc_abort(&self, _: &TxInfo) -> Result<(), TxError> {
        self.see("tpc_abort")
    }
}

/// Records the decisions logged and forgotten.
#[derive(Default)]
struct Decisions(Mutex<Vec<String>>);

#[async_trait]
impl DecisionLog for Decisions {
    async fn decide_commit(&self, tx: &TxInfo) -> Result<u64, TxError> {
        self.0
            .lock()
            .expect("lock")
            .push(format!("decide {}", tx.id));
        Ok(tx.id + 100)
    }
    async fn forget(&self, token: u64) -> Result<(), TxError> {
        self.0.lock().expect("lock").push(format!("forget {token}"));
        Ok(())
    }
}

/// A manager reads the status during the commit (it is `Committing` in
/// every phase, and reading it does not wait for the commit); the status
/// is `Committed` after it, with or without a decision log (whose
/// decision is then forgotten); a savepoint taken before the commit can
/// no longer roll back.
#[tokio::test]
async fn the_status_is_committing_during_the_commit_and_committed_after_it() {
    for decisions in [false, true] {
        let tx = Transaction::new();
        let log = Arc::new(Decisions::default());
        if decisions {
            tx.set_decision_log(log.clone());
        }
        let m = Arc::new(StatusDm {
            tx: tx.clone(),
            seen: Mutex::new(Vec::new()),
            listed: Mutex::new(Vec::new()),
        });
        let rec = Log::default();
        tx.join(dm(&rec, "sp", "sp")).expect("join");
        let mut sp = tx.savepoint().expect("savepoint");
        tx.join_sync(m.clone()).expect("join");
        assert_eq!(tx.status(), TxStatus::Active);
        tx.commit().await.expect("commit");
        assert_eq!(
            *m.seen.lock().expect("lock"),
            ["tpc_begin", "commit", "tpc_vote", "tpc_finish"].map(|p| (p, TxStatus::Committing))
        );
        // The commit holds the managers while it runs.
        assert_eq!(*m.listed.lock().expect("lock"), [0, 0, 0, 0]);
        assert_eq!(tx.status(), TxStatus::Committed);
        let want = if decisions {
            vec![
                format!("decide {}", tx.id()),
                format!("forget {}", tx.id() + 100),
            ]
        } else {
            vec![]
        };
        assert_eq!(*log.0.lock().expect("lock"), want);
        take(&rec);
        assert!(matches!(
            sp.rollback().await,
            Err(TransactionError::InvalidSavepoint)
        ));
        assert_eq!(
            take(&rec),
            Vec::<String>::new(),
            "no rollback after the commit"
        );
        assert!(matches!(
            tx.abort().await,
            Err(TransactionError::NotActive("committed"))
        ));
        assert_eq!(tx.status(), TxStatus::Committed);
    }
}

/// Its `tpc_finish` fails the first time, and the second time waits
/// until it is let go.
struct SlowFinish {
    finishes: AtomicU32,
    go: tokio::sync::Notify,
}

#[async_trait]
impl DataManager for SlowFinish {
    fn sort_key(&self) -> String {
        "slow".into()
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
        Ok(())
    }
    async fn tpc_finish(&self, _: &TxInfo) -> Result<(), TxError> {
        if self.finishes.fetch_add(1, Ordering::SeqCst) == 0 {
            return Err(TxError::unknown_outcome("connection lost"));
        }
        self.go.notified().await;
        Ok(())
    }
    async fn tpc_abort(&self, _: &TxInfo) -> Result<(), TxError> {
        Ok(())
    }
}

/// Finishing a commit that failed after the vote takes the transaction
/// back to `Committing`: a second commit meanwhile is refused and does
/// not finish the same manager again.
#[tokio::test]
async fn a_commit_being_finished_again_refuses_a_second_one_meanwhile() {
    let tx = Transaction::new();
    let m = Arc::new(SlowFinish {
        finishes: AtomicU32::new(0),
        go: tokio::sync::Notify::new(),
    });
    tx.join(m.clone()).expect("join");
    assert!(matches!(
        tx.commit().await,
        Err(TransactionError::CommitFailed { .. })
    ));
    let again = tokio::spawn({
        let tx = tx.clone();
        async move { tx.commit().await }
    });
    while m.finishes.load(Ordering::SeqCst) < 2 {
        tokio::task::yield_now().await;
    }
    assert_eq!(tx.status(), TxStatus::Committing);
    assert!(matches!(
        tx.commit().await,
        Err(TransactionError::NotActive("committing"))
    ));
    m.go.notify_one();
    again.await.expect("task").expect("finished");
    assert_eq!(tx.status(), TxStatus::Committed);
    assert_eq!(m.finishes.load(Ordering::SeqCst), 2);
}

/// A transaction that ended releases its managers, as `transaction`'s
/// `_free()` does: a finished transaction still alive (here, the
/// manager's current one) holds none of them. One that failed after the
/// vote keeps them until a commit finishes them.
#[tokio::test]
async fn an_ended_transaction_releases_its_managers() {
    let log = Log::default();
    let tm = TransactionManager::new();
    for end in ["commit", "abort", "a failed vote"] {
        let tx = tm.begin();
        let a = dm(&log, "a", "1");
        let b = dm(&log, "b", "2");
        if end == "a failed vote" {
            b.fail_in("tpc_vote", 1, TxError::transient("conflict"));
        }
        tx.join(a.clone()).expect("join");
        tx.join_sync(Arc::new(SyncDm(b.clone()))).expect("join");
        assert_eq!((Arc::strong_count(&a), Arc::strong_count(&b)), (2, 2));
        match end {
            "commit" => tx.commit().await.expect("commit"),
            "abort" => tx.abort().await.expect("abort"),
            _ => drop(tx.commit().await.expect_err("aborted")),
        }
        assert_eq!(
            (Arc::strong_count(&a), Arc::strong_count(&b)),
            (1, 1),
            "after {end}"
        );
        assert!(tx.managers().is_empty(), "after {end}");
        assert_eq!(tm.get().map(|t| t.id()), Some(tx.id()));
    }
    let tx = tm.begin();
    let a = dm(&log, "a", "1").fail_in("tpc_finish", 1, TxError::unknown_outcome("lost"));
    tx.join(a.clone()).expect("join");
    assert!(matches!(
        tx.commit().await,
        Err(TransactionError::CommitFailed { .. })
    ));
    assert_eq!(tx.managers(), ["a"]);
    assert_eq!(Arc::strong_count(&a), 2);
    take(&log);
    tx.commit().await.expect("finished");
    assert_eq!(take(&log), ["a:tpc_finish"]);
    assert_eq!(Arc::strong_count(&a), 1);
    assert!(tx.managers().is_empty());
}
