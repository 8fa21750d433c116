//! The engine end to end, on real stores: every rule of API.md §4 as the
//! Rust library sees it.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use sagatx::{
    Awaiting, Engine, EngineError, ExecutionId, ListQuery, MemoryStore, Phase, Reply, RetryPolicy,
    Saga, SqliteStore, StartOptions, Status, StepContext, StepError, StepStatus,
};
use serde_json::{json, Value};

use crate::support::{three, Do, Recorder};

async fn sqlite_engine(dir: &tempfile::TempDir, sagas: Vec<Saga>) -> Engine {
    let mut b =
        Engine::builder().store(SqliteStore::open(dir.path().join("sagatx.db")).expect("open"));
    for s in sagas {
        b = b.saga(s);
    }
    b.build().await.expect("engine")
}

async fn memory_engine(sagas: Vec<Saga>) -> Engine {
    let mut b = Engine::builder().store(MemoryStore::new());
    for s in sagas {
        b = b.saga(s);
    }
    b.build().await.expect("engine")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_saga_completes_and_later_steps_see_earlier_results() {
    let dir = tempfile::tempdir().expect("tempdir");
    let saga = Saga::builder("order")
        .step("reserve", |ctx: StepContext| async move {
            Ok::<_, StepError>(json!({"reservation": format!("r-{}", ctx.input()["order_id"])}))
        })
        .step("charge", |ctx: StepContext| async move {
            let r = ctx.results()["reserve"]["reservation"].clone();
            Ok::<_, StepError>(json!({"charged_for": r}))
        })
        .step(
            "note",
            |_ctx: StepContext| async move { Ok::<_, StepError>(()) },
        )
        .build()
        .expect("valid");
    let engine = sqlite_engine(&dir, vec![saga]).await;
    let ex = engine
        .run("order", json!({"order_id": 7}))
        .await
        .expect("run");
    assert_eq!(ex.status, Status::Completed);
    let results = ex.results();
    assert_eq!(results["charge"], json!({"charged_for": "r-7"}));
    assert_eq!(results["note"], Value::Null, "null results are kept");
    // What run() returned is what the journal holds.
    assert_eq!(engine.get(ex.id).await.expect("get"), ex);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejected_step_compensates_the_earlier_ones_in_reverse() {
    let dir = tempfile::tempdir().expect("tempdir");
    let rec = Recorder::default();
    rec.script("ship", Phase::Action, 1, Do::Permanent);
    let engine = sqlite_engine(&dir, vec![three(&rec, "order")]).await;
    let ex = engine.run("order", json!({})).await.expect("run");
    assert_eq!(ex.status, Status::Compensated);
    assert_eq!(
        rec.trail(),
        [
            "reserve/action",
            "charge/action",
            "ship/action",
            "charge/compensation",
            "reserve/compensation"
        ]
    );
    let err = ex.saga_error().expect("saga error");
    assert_eq!(err.step.as_deref(), Some("ship"));
    assert_eq!(err.message, "HTTP 402: card declined");
    assert_eq!(err.compensated().count(), 2);
    assert_eq!(err.compensation_errors().count(), 0);
    assert_eq!(ex.steps[2].status, StepStatus::Failed);
}

#[tokio::test(start_paused = true)]
async fn transient_failures_are_retried_with_exponential_backoff() {
    let rec = Recorder::default();
    rec.script("charge", Phase::Action, 1, Do::Transient);
    rec.script("charge", Phase::Action, 2, Do::Transient);
    let times = Arc::new(std::sync::Mutex::new(Vec::new()));
    let t2 = times.clone();
    let r2 = rec.clone();
    let saga = Saga::builder("order")
        .step("charge", move |ctx: StepContext| {
            t2.lock().expect("lock").push(tokio::time::Instant::now());
            let out = r2.record(&ctx);
            async move { out }
        })
        .retry(RetryPolicy {
            max_attempts: 3,
            initial_backoff_ms: 1_000,
            max_backoff_ms: 60_000,
            multiplier: 3.0,
        })
        .build()
        .expect("valid");
    let engine = memory_engine(vec![saga]).await;
    let ex = engine.run("order", json!({})).await.expect("run");
    assert_eq!(ex.status, Status::Completed);
    assert_eq!(ex.steps[0].attempts, 3);
    let t = times.lock().expect("lock").clone();
    let gaps: Vec<u128> = t.windows(2).map(|w| (w[1] - w[0]).as_millis()).collect();
    // 1 s then 3 s, each within ±20 % jitter.
    assert!((800..=1200).contains(&gaps[0]), "first backoff {gaps:?}");
    assert!((2400..=3600).contains(&gaps[1]), "second backoff {gaps:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_mode_starts_every_action_together() {
    let n = 4;
    let barrier = Arc::new(tokio::sync::Barrier::new(n));
    let mut b = Saga::builder("fanout").concurrent();
    for i in 0..n {
        let barrier = barrier.clone();
        // Each action waits for all the others: only concurrent calls pass.
        b = b.step(format!("s{i}"), move |_ctx: StepContext| {
            let barrier = barrier.clone();
            async move {
                barrier.wait().await;
                Ok::<_, StepError>(i)
            }
        });
    }
    let engine = memory_engine(vec![b.build().expect("valid")]).await;
    let id = engine.start("fanout", json!({})).await.expect("start");
    let ex = tokio::time::timeout(Duration::from_secs(5), engine.wait(id))
        .await
        .expect("concurrent actions did not run together")
        .expect("wait");
    assert_eq!(ex.status, Status::Completed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_failure_compensates_the_succeeded_steps() {
    let rec = Recorder::default();
    rec.script("charge", Phase::Action, 1, Do::Permanent);
    let saga = Saga::builder("c")
        .concurrent()
        .step("reserve", rec.step())
        .compensate(rec.step())
        .step("charge", rec.step())
        .compensate(rec.step())
        .step("ship", rec.step())
        .compensate(rec.step())
        .build()
        .expect("valid");
    let engine = memory_engine(vec![saga]).await;
    let ex = engine.run("c", json!({})).await.expect("run");
    assert_eq!(ex.status, Status::Compensated);
    let mut comps: Vec<String> = rec
        .trail()
        .into_iter()
        .filter(|t| t.ends_with("/compensation"))
        .collect();
    comps.sort();
    assert_eq!(comps, ["reserve/compensation", "ship/compensation"]);
    // No action started after the first compensation.
    let trail = rec.trail();
    let first = trail
        .iter()
        .position(|t| t.ends_with("/compensation"))
        .expect("some");
    assert!(trail[first..].iter().all(|t| t.ends_with("/compensation")));
}

fn callback_saga(rec: &Recorder) -> Saga {
    Saga::builder("remote")
        .step("reserve", rec.step())
        .compensate(rec.step())
        .step("ship", rec.step())
        .callback()
        .compensate(rec.step())
        .step("bill", rec.step())
        .build()
        .expect("valid")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_callback_step_pauses_until_its_reply() {
    let dir = tempfile::tempdir().expect("tempdir");
    let rec = Recorder::default();
    let engine = sqlite_engine(&dir, vec![callback_saga(&rec)]).await;
    let ex = engine.run("remote", json!({})).await.expect("run");
    assert_eq!(ex.status, Status::Paused);
    assert_eq!(ex.awaiting, Some(Awaiting::Reply));
    assert_eq!(ex.steps[1].status, StepStatus::Waiting);
    // A waiting execution holds no driver.
    for _ in 0..100 {
        if engine.active() == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        engine.active(),
        0,
        "a paused execution stays in the store only"
    );
    let reply = Reply::Ok(json!({"tracking": "t-9"}));
    engine
        .reply(ex.id, "ship", reply.clone())
        .await
        .expect("reply");
    let done = engine.wait(ex.id).await.expect("wait");
    assert_eq!(done.status, Status::Completed);
    assert_eq!(done.results()["ship"], json!({"tracking": "t-9"}));
    // The same reply again: accepted, no second effect.
    let again = engine
        .reply(ex.id, "ship", reply)
        .await
        .expect("same reply");
    assert_eq!(again.seq, done.seq);
    // Another reply, an unknown step, a sync step: refused.
    assert!(matches!(
        engine.reply(ex.id, "ship", Reply::Err("late".into())).await,
        Err(EngineError::Conflict(_))
    ));
    assert!(matches!(
        engine.reply(ex.id, "nope", Reply::Ok(Value::Null)).await,
        Err(EngineError::UnknownStep { .. })
    ));
    assert!(matches!(
        engine.reply(ex.id, "bill", Reply::Ok(Value::Null)).await,
        Err(EngineError::Conflict(_))
    ));
    assert!(matches!(
        engine
            .reply(
                ExecutionId(uuid::Uuid::now_v7()),
                "ship",
                Reply::Ok(Value::Null)
            )
            .await,
        Err(EngineError::NotFound(_))
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_callback_rejection_compensates_only_the_earlier_steps() {
    let rec = Recorder::default();
    let engine = memory_engine(vec![callback_saga(&rec)]).await;
    let ex = engine.run("remote", json!({})).await.expect("run");
    engine
        .reply(ex.id, "ship", Reply::Err("no courier".into()))
        .await
        .expect("reply");
    let done = engine.wait(ex.id).await.expect("wait");
    assert_eq!(done.status, Status::Compensated);
    assert_eq!(
        rec.trail(),
        ["reserve/action", "ship/action", "reserve/compensation"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_callback_without_reply_times_out_and_is_compensated() {
    let rec = Recorder::default();
    let saga = Saga::builder("remote")
        .step("ship", rec.step())
        .callback()
        .timeout(Duration::from_millis(200))
        .compensate(rec.step())
        .build()
        .expect("valid");
    let engine = Engine::builder()
        .store(MemoryStore::new())
        .saga(saga)
        .poll_interval(Duration::from_millis(20))
        .build()
        .await
        .expect("engine");
    let id = engine.start("remote", json!({})).await.expect("start");
    let mut ex = engine.get(id).await.expect("get");
    for _ in 0..300 {
        ex = engine.get(id).await.expect("get");
        if ex.status.is_terminal() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(ex.status, Status::Compensated);
    assert_eq!(ex.steps[0].error.as_deref(), Some("no reply within 200 ms"));
    assert_eq!(rec.trail(), ["ship/action", "ship/compensation"]);
}

fn confirm_saga(rec: &Recorder, autocommit: bool) -> Saga {
    Saga::builder("tcc")
        .autocommit(autocommit)
        .step("a", rec.step())
        .compensate(rec.step())
        .confirm(rec.step())
        .step("b", rec.step())
        .compensate(rec.step())
        .confirm(rec.step())
        .build()
        .expect("valid")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_autocommit_an_execution_waits_for_commit_or_reject() {
    let dir = tempfile::tempdir().expect("tempdir");
    let rec = Recorder::default();
    let engine = sqlite_engine(&dir, vec![confirm_saga(&rec, false)]).await;
    let ex = engine.run("tcc", json!({})).await.expect("run");
    assert_eq!(
        (ex.status, ex.awaiting),
        (Status::Paused, Some(Awaiting::Commit))
    );
    engine.commit(ex.id).await.expect("commit");
    let done = engine.wait(ex.id).await.expect("wait");
    assert_eq!(done.status, Status::Completed);
    assert_eq!(done.steps[0].status, StepStatus::Confirmed);
    assert_eq!(
        rec.trail(),
        ["a/action", "b/action", "a/confirm", "b/confirm"]
    );
    assert!(matches!(
        engine.commit(ex.id).await,
        Err(EngineError::Conflict(_))
    ));

    let rec2 = Recorder::default();
    let dir2 = tempfile::tempdir().expect("tempdir");
    let engine = sqlite_engine(&dir2, vec![confirm_saga(&rec2, false)]).await;
    let ex = engine.run("tcc", json!({})).await.expect("run");
    engine.reject(ex.id).await.expect("reject");
    let done = engine.wait(ex.id).await.expect("wait");
    assert_eq!(done.status, Status::Compensated);
    let err = done.saga_error().expect("error");
    assert_eq!((err.step, err.message.as_str()), (None, "rejected"));
    assert_eq!(
        rec2.trail(),
        ["a/action", "b/action", "b/compensation", "a/compensation"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_lets_the_call_in_flight_finish_and_starts_no_new_action() {
    let rec = Recorder::default();
    let gate = Arc::new(tokio::sync::Notify::new());
    let entered = Arc::new(tokio::sync::Notify::new());
    let (g, e, r) = (gate.clone(), entered.clone(), rec.clone());
    let saga = Saga::builder("slow")
        .step("reserve", rec.step())
        .compensate(rec.step())
        .step("charge", move |ctx: StepContext| {
            let (g, e, r) = (g.clone(), e.clone(), r.clone());
            async move {
                e.notify_one();
                g.notified().await;
                r.record(&ctx)
            }
        })
        .compensate(rec.step())
        .step("ship", rec.step())
        .build()
        .expect("valid");
    let engine = memory_engine(vec![saga]).await;
    let id = engine.start("slow", json!({})).await.expect("start");
    entered.notified().await;
    let ex = engine.cancel(id).await.expect("cancel");
    assert_eq!(ex.status, Status::Compensating);
    gate.notify_one();
    let done = engine.wait(id).await.expect("wait");
    assert_eq!(done.status, Status::Compensated);
    assert_eq!(
        rec.trail(),
        [
            "reserve/action",
            "charge/action",
            "charge/compensation",
            "reserve/compensation"
        ]
    );
    let err = done.saga_error().expect("error");
    assert_eq!((err.step, err.message.as_str()), (None, "cancelled"));
    assert!(matches!(
        engine.cancel(id).await,
        Err(EngineError::Conflict(_))
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_compensation_waits_for_an_operator_retry() {
    let rec = Recorder::default();
    rec.script("ship", Phase::Action, 1, Do::Permanent);
    rec.script("charge", Phase::Compensation, 1, Do::Permanent);
    let engine = memory_engine(vec![three(&rec, "order")]).await;
    let ex = engine.run("order", json!({})).await.expect("run");
    assert_eq!(ex.status, Status::Failed);
    assert_eq!(ex.steps[1].status, StepStatus::CompensationFailed);
    let err = ex.saga_error().expect("error");
    assert_eq!(
        err.compensation_errors().collect::<Vec<_>>(),
        [("charge", "HTTP 402: card declined")]
    );
    // reserve's compensation still ran.
    assert_eq!(ex.steps[0].status, StepStatus::Compensated);
    engine.retry(ex.id).await.expect("retry");
    let done = engine.wait(ex.id).await.expect("wait");
    assert_eq!(done.status, Status::Compensated);
    assert_eq!(done.steps[1].compensation_attempts, 2);
    assert!(matches!(
        engine.retry(ex.id).await,
        Err(EngineError::Conflict(_))
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chosen_id_makes_start_idempotent_and_the_user_is_recorded() {
    let dir = tempfile::tempdir().expect("tempdir");
    let users = Arc::new(std::sync::Mutex::new(Vec::new()));
    let u2 = users.clone();
    let saga = Saga::builder("who")
        .step("a", move |ctx: StepContext| {
            u2.lock()
                .expect("lock")
                .push(ctx.user().map(str::to_string));
            async move { Ok::<_, StepError>(()) }
        })
        .build()
        .expect("valid");
    let engine = sqlite_engine(&dir, vec![saga]).await;
    let id = ExecutionId(uuid::Uuid::from_u128(42));
    let opts = StartOptions {
        id: Some(id),
        user: Some("ada".into()),
        ..Default::default()
    };
    assert_eq!(
        engine
            .start_with("who", json!({"x": 1}), opts.clone())
            .await
            .expect("start"),
        id
    );
    engine.wait(id).await.expect("wait");
    assert_eq!(
        engine
            .start_with("who", json!({"x": 1}), opts.clone())
            .await
            .expect("again"),
        id
    );
    assert!(matches!(
        engine.start_with("who", json!({"x": 2}), opts).await,
        Err(EngineError::IdTaken(_))
    ));
    assert_eq!(*users.lock().expect("lock"), [Some("ada".to_string())]);
    assert_eq!(
        engine.get(id).await.expect("get").user.as_deref(),
        Some("ada")
    );
    assert!(matches!(
        engine.start("nope", json!({})).await,
        Err(EngineError::UnknownSaga(_))
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_backoff_waits_in_the_store_not_in_memory() {
    let dir = tempfile::tempdir().expect("tempdir");
    let rec = Recorder::default();
    rec.script("a", Phase::Action, 1, Do::Transient);
    let saga = Saga::builder("slow")
        .step("a", rec.step())
        .retry(RetryPolicy {
            max_attempts: 2,
            initial_backoff_ms: 2_000,
            max_backoff_ms: 2_000,
            multiplier: 1.0,
        })
        .build()
        .expect("valid");
    let engine = Engine::builder()
        .store(SqliteStore::open(dir.path().join("j.db")).expect("open"))
        .saga(saga)
        .idle_horizon(Duration::ZERO)
        .poll_interval(Duration::from_millis(25))
        .build()
        .await
        .expect("engine");
    let id = engine.start("slow", json!({})).await.expect("start");
    // Once the first attempt failed, no task holds the waiting execution.
    for _ in 0..300 {
        if rec.seen().len() == 1 && engine.active() == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(engine.active(), 0, "no task holds the waiting execution");
    let ex = engine.get(id).await.expect("get");
    assert_eq!(ex.status, Status::Running);
    assert!(
        ex.next_due_ms().is_some(),
        "the retry's due time is journaled"
    );
    // The scheduler finds it in the store when it is due.
    let done = engine
        .wait_timeout(id, Duration::from_secs(10))
        .await
        .expect("wait");
    assert_eq!(done.status, Status::Completed);
    assert_eq!(done.steps[0].attempts, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_pages_newest_first_with_filters() {
    let dir = tempfile::tempdir().expect("tempdir");
    let rec = Recorder::default();
    let engine = sqlite_engine(&dir, vec![three(&rec, "a"), three(&rec, "b")]).await;
    let mut ids = Vec::new();
    for i in 0..7 {
        let ex = engine
            .run(if i % 2 == 0 { "a" } else { "b" }, json!(i))
            .await
            .expect("run");
        ids.push(ex.id);
    }
    let mut seen = Vec::new();
    let mut cursor = None;
    loop {
        let page = engine
            .list(ListQuery {
                limit: 2,
                cursor,
                ..Default::default()
            })
            .await
            .expect("list");
        seen.extend(page.items.iter().map(|e| e.id));
        cursor = page.next_cursor;
        if cursor.is_none() {
            break;
        }
    }
    ids.reverse();
    assert_eq!(seen, ids);
    let only_b = engine
        .list(ListQuery {
            saga: Some("b".into()),
            status: Some(Status::Completed),
            limit: 100,
            cursor: None,
        })
        .await
        .expect("list");
    assert_eq!(only_b.items.len(), 3);
}

#[test]
fn an_interrupted_action_is_called_again_after_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("j.db");
    let rec = Recorder::default();
    let hang = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let saga = {
        let (rec, hang) = (rec.clone(), hang.clone());
        let r2 = rec.clone();
        Saga::builder("order")
            .step("reserve", rec.step())
            .compensate(rec.step())
            .step("charge", move |ctx: StepContext| {
                let out = r2.record(&ctx);
                let hang = hang.load(std::sync::atomic::Ordering::SeqCst);
                async move {
                    if hang {
                        std::future::pending::<()>().await;
                    }
                    out
                }
            })
            .build()
            .expect("valid")
    };
    // First life: charge is in flight when the runtime dies.
    let id = {
        let rt = tokio::runtime::Runtime::new().expect("runtime");
        let id = rt.block_on(async {
            let engine = Engine::builder()
                .store(SqliteStore::open(&path).expect("open"))
                .saga(saga.clone())
                .build()
                .await
                .expect("engine");
            let id = engine.start("order", json!({})).await.expect("start");
            for _ in 0..500 {
                if rec.seen().len() == 2 {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            id
        });
        rt.shutdown_timeout(Duration::from_millis(100));
        id
    };
    assert_eq!(rec.trail(), ["reserve/action", "charge/action"]);
    hang.store(false, std::sync::atomic::Ordering::SeqCst);
    // Second life: recover calls charge again (attempt 2), reserve is not
    // called again.
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        let engine = Engine::builder()
            .store(SqliteStore::open(&path).expect("open"))
            .saga(saga)
            .build()
            .await
            .expect("engine");
        let report = engine.recover().await.expect("recover");
        assert_eq!(report.resumed, 1);
        let ex = engine
            .wait_timeout(id, Duration::from_secs(10))
            .await
            .expect("wait");
        assert_eq!(ex.status, Status::Completed);
        assert_eq!(ex.steps[1].attempts, 2);
        assert_eq!(ex.steps[0].attempts, 1);
    });
    let seen = rec.seen();
    assert_eq!(
        rec.trail(),
        ["reserve/action", "charge/action", "charge/action"]
    );
    assert_eq!(seen[2].attempt, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waits_that_time_out_leave_nothing_behind() {
    let rec = Recorder::default();
    let engine = memory_engine(vec![callback_saga(&rec)]).await;
    let ex = engine.run("remote", json!({})).await.expect("run");
    assert_eq!(ex.status, Status::Paused);
    assert_eq!(engine.waiting_callers(), 0);
    // A paused execution answers at once; a missing one fails; neither stays.
    engine.wait(ex.id).await.expect("wait");
    let _ = engine.wait(ExecutionId(uuid::Uuid::now_v7())).await;
    let gate = Arc::new(tokio::sync::Notify::new());
    let g = gate.clone();
    let saga = Saga::builder("blocked")
        .step("a", move |_c: StepContext| {
            let g = g.clone();
            async move {
                g.notified().await;
                Ok::<_, StepError>(())
            }
        })
        .build()
        .expect("valid");
    // A second engine on the same store, with the saga's function (its
    // builder registers the definition; the first engine, which has no
    // function for it, could not).
    let engine2 = Engine::builder()
        .store_arc(engine.store().clone())
        .saga(saga)
        .build()
        .await
        .expect("engine");
    let id = engine2.start("blocked", json!({})).await.expect("start");
    let still = engine2
        .wait_timeout(id, Duration::from_millis(50))
        .await
        .expect("state");
    assert_eq!(still.status, Status::Running);
    assert_eq!(
        engine2.waiting_callers(),
        0,
        "a timed-out wait is forgotten"
    );
    gate.notify_one();
    assert_eq!(
        engine2.wait(id).await.expect("wait").status,
        Status::Completed
    );
    assert_eq!(engine2.waiting_callers(), 0);
}

/// Regression: recovery queued its Resume behind the driver's timer; when
/// the timer of a due retry fired first, the driver started the retry, then
/// took that call for one interrupted by the crash and made it again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recovering_a_due_retry_calls_it_exactly_once() {
    use sagatx::core::{Env, Event, Execution, Phase as P};
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("j.db");
    let rec = Recorder::default();
    let saga = Saga::builder("due")
        .step("a", rec.step())
        .build()
        .expect("valid");
    let n = 300;
    {
        let store: Arc<dyn sagatx::Store> = Arc::new(SqliteStore::open(&path).expect("open"));
        let v = store
            .put_definition(saga.definition())
            .await
            .expect("define")
            .version;
        let env = Env {
            now_ms: 1,
            random01: 0.5,
        };
        for _ in 0..n {
            // The first attempt failed; its retry was due long ago.
            let mut ex = Execution::new(
                ExecutionId(uuid::Uuid::now_v7()),
                saga.definition(),
                v,
                json!(null),
                None,
                1,
            );
            ex.handle(saga.definition(), Event::Start, env)
                .expect("start");
            ex.handle(
                saga.definition(),
                Event::Outcome {
                    step: 0,
                    phase: P::Action,
                    attempt: 1,
                    outcome: Err(StepError::transient("503")),
                },
                env,
            )
            .expect("fail");
            ex.seq = 1;
            store.append(&ex).await.expect("append");
        }
    }
    let engine = Engine::builder()
        .store(SqliteStore::open(&path).expect("open"))
        .saga(saga)
        .build()
        .await
        .expect("engine");
    engine.recover().await.expect("recover");
    let mut done = 0;
    for _ in 0..500 {
        let page = engine
            .list(ListQuery {
                status: Some(Status::Completed),
                limit: 1000,
                ..Default::default()
            })
            .await
            .expect("list");
        done = page.items.len();
        if done == n {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(done, n, "every execution completed");
    let seen = rec.seen();
    assert_eq!(
        seen.len(),
        n,
        "one call each, attempt 2: {:?}",
        &seen[..seen.len().min(5)]
    );
    assert!(seen.iter().all(|s| s.attempt == 2));
}

/// A panic in a step is an unknown outcome: retried, and the driver goes
/// on; whether in the step's future, in its function before it makes its
/// future (an `async` step written as a closure that does work first), or
/// in a synchronous step. (Before synchronous steps came, the engine
/// caught only the future's panic.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_step_is_an_unknown_outcome_and_the_engine_goes_on() {
    let quick = || RetryPolicy {
        initial_backoff_ms: 1,
        ..Default::default()
    };
    let saga = Saga::builder("panicky")
        .step("a", |ctx: StepContext| async move {
            if ctx.attempt() == 1 {
                panic!("a bug in the step");
            }
            Ok::<_, StepError>(ctx.attempt())
        })
        .retry(quick())
        .step("early", |ctx: StepContext| {
            if ctx.attempt() == 1 {
                panic!("a bug before the future");
            }
            async move { Ok::<_, StepError>(ctx.attempt()) }
        })
        .retry(quick())
        .step_sync("sync", |ctx: StepContext| {
            if ctx.attempt() < 3 {
                panic!("a bug in a synchronous step");
            }
            Ok::<_, StepError>(ctx.attempt() * 10)
        })
        .retry(quick())
        .build()
        .expect("valid");
    let engine = memory_engine(vec![saga]).await;
    let ex = engine.run("panicky", json!({})).await.expect("run");
    assert_eq!(ex.status, Status::Completed, "{:?}", ex.saga_error());
    let attempts: Vec<u32> = ex.steps.iter().map(|s| s.attempts).collect();
    assert_eq!(attempts, [2, 2, 3]);
    assert_eq!(ex.results()["a"], json!(2));
    assert_eq!(ex.results()["early"], json!(2));
    assert_eq!(ex.results()["sync"], json!(30));
}

/// Synchronous steps on a journaled engine: results seen by later steps,
/// a permanent failure compensated in reverse with synchronous
/// compensations, and confirms; the journal holds each outcome.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn synchronous_steps_run_compensate_and_confirm_on_the_engine() {
    let calls = Arc::new(Mutex::new(Vec::<String>::new()));
    let log = |calls: &Arc<Mutex<Vec<String>>>, what: &str| {
        calls
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(what.to_string());
    };
    let (c1, c2, c3, c4, c5) = (
        calls.clone(),
        calls.clone(),
        calls.clone(),
        calls.clone(),
        calls.clone(),
    );
    let saga = Saga::builder("sync_steps")
        .step_sync("reserve", move |ctx: StepContext| {
            log(&c1, "reserve");
            Ok::<_, StepError>(json!({"n": ctx.input()["n"]}))
        })
        .compensate_sync(move |_| {
            log(&c2, "release");
            Ok::<_, StepError>(())
        })
        .confirm_sync(move |_| {
            log(&c3, "confirm reserve");
            Ok::<_, StepError>(())
        })
        .step_sync("charge", move |ctx: StepContext| {
            log(&c4, "charge");
            // Sees the earlier result.
            match ctx.results()["reserve"]["n"].as_i64() {
                Some(n) if n > 0 => Ok(n * 2),
                _ => Err(StepError::permanent("nothing to charge")),
            }
        })
        .compensate_sync(move |_| {
            log(&c5, "refund");
            Ok::<_, StepError>(())
        })
        .build()
        .expect("valid");
    let engine = memory_engine(vec![saga]).await;

    let ex = engine
        .run("sync_steps", json!({"n": 4}))
        .await
        .expect("run");
    assert_eq!(ex.status, Status::Completed, "{:?}", ex.saga_error());
    assert_eq!(ex.results()["charge"], json!(8));
    let seen = std::mem::take(&mut *calls.lock().unwrap_or_else(|e| e.into_inner()));
    assert_eq!(seen, ["reserve", "charge", "confirm reserve"]);

    let ex = engine
        .run("sync_steps", json!({"n": 0}))
        .await
        .expect("run");
    assert_eq!(ex.status, Status::Compensated);
    let err = ex.saga_error().expect("an error");
    assert_eq!(err.step.as_deref(), Some("charge"));
    assert_eq!(err.message, "nothing to charge");
    let seen = std::mem::take(&mut *calls.lock().unwrap_or_else(|e| e.into_inner()));
    // The rejected step itself is not compensated (API.md §4).
    assert_eq!(seen, ["reserve", "charge", "release"]);
    let stored = engine.get(ex.id).await.expect("get");
    assert_eq!(stored.steps[0].compensation_attempts, 1);
}

/// `run` drives a new execution in the caller's task until it has to wait;
/// from then on the execution has a task of its own, so a caller that
/// gives up (its future dropped) does not stop it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_given_up_while_a_step_waits_still_finishes() {
    let (release, released) = tokio::sync::oneshot::channel::<()>();
    let released = Arc::new(tokio::sync::Mutex::new(Some(released)));
    let saga = Saga::builder("slow")
        .step("quick", |_ctx: StepContext| async { Ok::<_, StepError>(1) })
        .step("gated", move |_ctx: StepContext| {
            let released = released.clone();
            async move {
                if let Some(rx) = released.lock().await.take() {
                    let _ = rx.await;
                }
                Ok::<_, StepError>(2)
            }
        })
        .build()
        .expect("valid");
    let engine = memory_engine(vec![saga]).await;
    let given_up = tokio::time::timeout(
        Duration::from_millis(100),
        engine.run("slow", json!({"n": 1})),
    )
    .await;
    assert!(given_up.is_err(), "the gated step holds the saga");
    let page = engine
        .list(ListQuery {
            limit: 10,
            ..Default::default()
        })
        .await
        .expect("list");
    let id = page.items[0].id;
    assert_eq!(page.items[0].steps[1].in_flight, Some(Phase::Action));
    let _ = release.send(());
    let ex = tokio::time::timeout(Duration::from_secs(5), engine.wait(id))
        .await
        .expect("finishes without its caller")
        .expect("wait");
    assert_eq!(ex.status, Status::Completed);
    assert_eq!(ex.results()["gated"], json!(2));
    // The waiter is answered just before the driver leaves.
    for _ in 0..200 {
        if engine.active() == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(engine.active(), 0, "its driver ended");
}

/// A local step whose function this process does not have (a saga
/// registered by another process, or by an earlier build): each call fails
/// as a passing failure naming the step and what to do, is retried, and
/// the saga ends by its rules; the process's functions are found by step
/// once per saga version, so a missing one stays missing, and those it
/// has are called (here: a saga it has, run by the same engine).
#[tokio::test(start_paused = true)]
async fn a_local_step_without_its_function_here_fails_as_a_passing_failure() {
    let store: Arc<dyn sagatx::Store> = Arc::new(MemoryStore::new());
    let def = sagatx::SagaDefinition::from_json(
        br#"{"name":"elsewhere","retry":{"max_attempts":2,"initial_backoff_ms":10},
             "steps":[{"name":"reserve","action":"local","compensation":"local"}]}"#,
    )
    .expect("definition");
    store.put_definition(&def).await.expect("put");
    let rec = Recorder::default();
    let engine = Engine::builder()
        .store_arc(store)
        .saga(three(&rec, "order"))
        .build()
        .await
        .expect("engine");
    let ex = engine.run("elsewhere", json!({})).await.expect("run");
    assert_eq!(ex.status, Status::Failed, "{ex:?}");
    let step = &ex.steps[0];
    let actions: Vec<_> = step
        .history
        .iter()
        .filter(|a| a.phase == Phase::Action)
        .collect();
    assert_eq!(actions.len(), 2, "retried as a passing failure: {step:?}");
    for a in actions {
        let error = a.error.as_deref().unwrap_or("");
        assert!(
            error.contains(
                "no function is registered for the action of step \"reserve\" of saga \"elsewhere\""
            ) && error.contains("Engine::builder().saga(...)"),
            "{error}"
        );
    }
    // Its outcome unknown, its compensation is owed, and missing too.
    assert!(
        step.history.iter().any(|a| a.phase == Phase::Compensation),
        "{step:?}"
    );
    // The saga this process has runs with its functions.
    let ok = engine.run("order", json!({})).await.expect("run");
    assert_eq!(ok.status, Status::Completed);
    assert_eq!(
        rec.trail(),
        ["reserve/action", "charge/action", "ship/action"]
    );
}

/// A driver dropped where it stands (its runtime shut down while a step
/// was under way) takes its inbox out of the engine's map of active
/// drivers: none is left that nothing reads (a later message for the
/// execution starts a new driver instead of waiting in it).
#[test]
fn a_driver_dropped_with_its_runtime_leaves_no_inbox_behind() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let (started, mut called) = tokio::sync::mpsc::unbounded_channel::<()>();
    let saga = Saga::builder("slow")
        .step("wait", move |_ctx: StepContext| {
            let started = started.clone();
            async move {
                let _ = started.send(());
                std::future::pending::<Result<(), StepError>>().await
            }
        })
        .build()
        .expect("valid");
    let engine = rt.block_on(async {
        let engine = memory_engine(vec![saga]).await;
        engine.start("slow", json!({})).await.expect("start");
        called.recv().await.expect("the step was called");
        engine
    });
    assert_eq!(engine.active(), 1, "its driver runs");
    drop(rt);
    assert_eq!(engine.active(), 0, "no inbox left behind");
}

/// `Engine::register` refuses a `"local"` call that this process has no
/// function for (a coordinator's user registering one over HTTP would
/// otherwise see every execution fail), naming the call; a new version of
/// a saga whose functions are here registers.
#[tokio::test]
async fn registering_a_local_call_without_its_function_here_is_refused() {
    let store: Arc<dyn sagatx::Store> = Arc::new(MemoryStore::new());
    let rec = Recorder::default();
    let engine = Engine::builder()
        .store_arc(store.clone())
        .saga(three(&rec, "order"))
        .build()
        .await
        .expect("engine");
    let def = |json: &str| sagatx::SagaDefinition::from_json(json.as_bytes()).expect("definition");
    let refused = |r: Result<sagatx::store::Registered, EngineError>| match r {
        Err(EngineError::Definition(sagatx::core::DefinitionError::Invalid { field, message })) => {
            (field, message)
        }
        other => panic!("expected an invalid definition, got {other:?}"),
    };
    // A saga this process has no functions for.
    let (field, message) = refused(
        engine
            .register(def(
                r#"{"name":"elsewhere","steps":[{"name":"reserve","action":"local"}]}"#,
            ))
            .await,
    );
    assert_eq!(field, "steps[0].action");
    assert!(
        message.contains("no function for the action of step \"reserve\" of saga \"elsewhere\"")
            && message.contains("Engine::builder().saga(...)")
            && message.contains("url"),
        "{message}"
    );
    assert!(
        store
            .get_definition("elsewhere", None)
            .await
            .expect("read")
            .is_none(),
        "nothing was stored"
    );
    // A step of a saga that is here, but a call it has no function for:
    // "ship" has a compensation, "pack" does not exist here at all.
    let (field, _) = refused(
        engine
            .register(def(r#"{"name":"order","steps":[
                    {"name":"reserve","action":"local","compensation":"local"},
                    {"name":"pack","action":"local"}]}"#))
            .await,
    );
    assert_eq!(field, "steps[1].action");
    let (field, _) = refused(
        engine
            .register(def(r#"{"name":"order","steps":[
                    {"name":"ship","action":"local","confirm":"local"}]}"#))
            .await,
    );
    assert_eq!(field, "steps[0].confirm");
    // A new version of the saga whose functions are here, reordered and
    // with an HTTP step added, registers and runs them.
    let reg = engine
        .register(def(r#"{"name":"order","steps":[
                {"name":"charge","action":"local","compensation":"local"},
                {"name":"reserve","action":"local"},
                {"name":"notify","action":{"url":"http://127.0.0.1:9/notify"}}]}"#))
        .await
        .expect("registers");
    assert_eq!(reg.version, 2);
}
