//! `Saga::execute` (nothing journaled) against the engine: the same calls,
//! the same end, for random sagas and random outcome scripts.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use proptest::prelude::*;
use sagatx::{
    Engine, MemoryStore, Mode, Phase, RetryPolicy, Saga, SagaError, Status, StepContext, StepError,
};
use serde_json::{json, Value};

/// What one call of a phase answers.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Answer {
    Ok,
    Transient,
    Permanent,
}

fn answer() -> impl Strategy<Value = Answer> {
    prop_oneof![
        3 => Just(Answer::Ok),
        2 => Just(Answer::Transient),
        1 => Just(Answer::Permanent),
    ]
}

#[derive(Debug, Clone)]
struct StepPlan {
    /// Its functions are synchronous (`step_sync`, ...).
    sync: bool,
    compensation: bool,
    confirm: bool,
    max_attempts: u32,
    /// The answers of the action's attempts, then Ok.
    action: Vec<Answer>,
    compensation_answers: Vec<Answer>,
    confirm_answers: Vec<Answer>,
}

#[derive(Debug, Clone)]
struct Case {
    concurrent: bool,
    steps: Vec<StepPlan>,
}

fn case() -> impl Strategy<Value = Case> {
    any::<bool>().prop_flat_map(|concurrent| {
        // Concurrent actions answer at their first call: which attempt of
        // one step races another's failure is timing, not a rule.
        let action = if concurrent {
            proptest::collection::vec(answer(), 1..=1).boxed()
        } else {
            proptest::collection::vec(answer(), 0..=3).boxed()
        };
        let step = (
            any::<bool>(),
            any::<bool>(),
            any::<bool>(),
            1u32..=3,
            action,
            proptest::collection::vec(answer(), 0..=3),
            proptest::collection::vec(answer(), 0..=2),
        )
            .prop_map(
                move |(sync, compensation, confirm, max_attempts, action, comp, conf)| StepPlan {
                    sync,
                    compensation,
                    confirm,
                    max_attempts: if concurrent { 1 } else { max_attempts },
                    action,
                    compensation_answers: comp,
                    confirm_answers: conf,
                },
            );
        proptest::collection::vec(step, 1..=4).prop_map(move |steps| Case { concurrent, steps })
    })
}

type Log = Arc<Mutex<Vec<(String, &'static str, u32)>>>;

fn phase_name(p: Phase) -> &'static str {
    match p {
        Phase::Action => "action",
        Phase::Compensation => "compensation",
        Phase::Confirm => "confirm",
    }
}

/// Logs a call and answers it from the script.
fn answer_call(log: &Log, answers: &[Answer], ctx: &StepContext) -> Result<Value, StepError> {
    let mut l = log.lock().unwrap_or_else(|e| e.into_inner());
    l.push((
        ctx.step().to_string(),
        phase_name(ctx.phase()),
        ctx.attempt(),
    ));
    let n = ctx.attempt() as usize - 1;
    match answers.get(n).copied().unwrap_or(Answer::Ok) {
        Answer::Ok => Ok(json!(format!(
            "{}-{}-{}",
            ctx.step(),
            phase_name(ctx.phase()),
            ctx.attempt()
        ))),
        Answer::Transient => Err(StepError::transient(format!("t{}", ctx.attempt()))),
        Answer::Permanent => Err(StepError::permanent(format!("p{}", ctx.attempt()))),
    }
}

/// A step function that logs its call and answers from the script.
fn scripted(
    log: Log,
    answers: Vec<Answer>,
) -> impl Fn(StepContext) -> std::future::Ready<Result<Value, StepError>> + Send + Sync + 'static {
    move |ctx: StepContext| std::future::ready(answer_call(&log, &answers, &ctx))
}

/// The same, synchronous.
fn scripted_sync(
    log: Log,
    answers: Vec<Answer>,
) -> impl Fn(StepContext) -> Result<Value, StepError> + Send + Sync + 'static {
    move |ctx: StepContext| answer_call(&log, &answers, &ctx)
}

/// The saga of `case`; with `flip`, every step's functions of the other
/// kind (synchronous for asynchronous and back).
fn build(case: &Case, log: &Log, flip: bool) -> Saga {
    let mut b = Saga::builder("diff").mode(if case.concurrent {
        Mode::Concurrent
    } else {
        Mode::Sequential
    });
    for (i, s) in case.steps.iter().enumerate() {
        let sync = s.sync != flip;
        b = if sync {
            b.step_sync(
                format!("s{i}"),
                scripted_sync(log.clone(), s.action.clone()),
            )
        } else {
            b.step(format!("s{i}"), scripted(log.clone(), s.action.clone()))
        }
        .retry(RetryPolicy {
            max_attempts: s.max_attempts,
            initial_backoff_ms: 1,
            max_backoff_ms: 2,
            multiplier: 2.0,
        });
        if s.compensation {
            let answers = s.compensation_answers.clone();
            b = if sync {
                b.compensate_sync(scripted_sync(log.clone(), answers))
            } else {
                b.compensate(scripted(log.clone(), answers))
            };
        }
        if s.confirm {
            let answers = s.confirm_answers.clone();
            b = if sync {
                b.confirm_sync(scripted_sync(log.clone(), answers))
            } else {
                b.confirm(scripted(log.clone(), answers))
            };
        }
    }
    b.build().expect("a valid saga")
}

/// The run's end as `execute` gives it, from the engine's execution.
fn engine_end(ex: &sagatx::Execution) -> Result<HashMap<String, Value>, SagaError> {
    match ex.status {
        Status::Completed => Ok(ex
            .steps
            .iter()
            .filter_map(|s| Some((s.name.to_string(), s.result.clone()?)))
            .collect()),
        _ => Err(ex.saga_error().expect("a saga error")),
    }
}

async fn both(case: Case) -> Result<(), TestCaseError> {
    let engine_log = Log::default();
    let engine = Engine::builder()
        .store(MemoryStore::new())
        .saga(build(&case, &engine_log, false))
        .build()
        .await
        .map_err(|e| TestCaseError::fail(e.to_string()))?;
    let ex = engine
        .run("diff", Value::Null)
        .await
        .map_err(|e| TestCaseError::fail(e.to_string()))?;
    prop_assert!(ex.status.is_terminal(), "the engine ended {}", ex.status);
    let mut a = engine_log.lock().unwrap_or_else(|e| e.into_inner()).clone();
    if case.concurrent {
        a.sort();
    }
    // `execute`, with the case's kinds of functions and with the other
    // kind everywhere: synchronous and asynchronous functions make the
    // same calls and the same end.
    for flip in [false, true] {
        let local_log = Log::default();
        let local = build(&case, &local_log, flip).execute(Value::Null).await;
        let local = local.map(|m| m.into_map().into_iter().collect::<HashMap<_, _>>());
        prop_assert_eq!(&local, &engine_end(&ex), "flipped: {}", flip);
        let mut b = local_log.lock().unwrap_or_else(|e| e.into_inner()).clone();
        if case.concurrent {
            b.sort();
        }
        prop_assert_eq!(
            b,
            a.clone(),
            "the same calls (the engine's on the right); flipped: {}",
            flip
        );
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]
    #[test]
    fn execute_makes_the_calls_the_engine_makes_and_ends_the_same(c in case()) {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        rt.block_on(both(c))?;
    }
}

/// The three outcomes a caller sees, spelled out.
#[tokio::test]
async fn execute_returns_results_or_the_saga_error() {
    async fn ok(ctx: StepContext) -> Result<Value, StepError> {
        // A later step sees the earlier results.
        Ok(json!({"seen": ctx.results().len(), "input": ctx.input()}))
    }
    async fn no(_: StepContext) -> Result<(), StepError> {
        Err(StepError::permanent("card declined"))
    }
    async fn undo(_: StepContext) -> Result<(), StepError> {
        Ok(())
    }
    let saga = Saga::builder("order")
        .step("a", ok)
        .compensate(undo)
        .step("b", ok)
        .build()
        .expect("saga");
    let r = saga.execute(json!(7)).await.expect("completes");
    assert_eq!(r["a"], json!({"seen": 0, "input": 7}));
    assert_eq!(r["b"], json!({"seen": 1, "input": 7}));

    let failing = Saga::builder("order")
        .step("a", ok)
        .compensate(undo)
        .step("b", ok)
        .step("c", no)
        .build()
        .expect("saga");
    let e = failing.execute(Value::Null).await.expect_err("fails");
    assert_eq!(
        (e.step.as_deref(), e.message.as_str()),
        (Some("c"), "card declined")
    );
    assert_eq!(
        e.compensated().map(|c| c.step.as_str()).collect::<Vec<_>>(),
        ["a"]
    );

    // A panic is an unknown outcome: retried, then compensated.
    let calls = Arc::new(Mutex::new(0));
    let c2 = calls.clone();
    let panicky = Saga::builder("p")
        .step("x", move |_: StepContext| {
            *c2.lock().unwrap_or_else(|e| e.into_inner()) += 1;
            async move {
                if true {
                    panic!("boom");
                }
                Ok::<(), StepError>(())
            }
        })
        .retry(RetryPolicy {
            max_attempts: 2,
            initial_backoff_ms: 1,
            max_backoff_ms: 1,
            multiplier: 1.0,
        })
        .compensate(undo)
        .build()
        .expect("saga");
    let e = panicky.execute(Value::Null).await.expect_err("fails");
    assert_eq!(e.message, "the step panicked");
    assert_eq!(*calls.lock().unwrap_or_else(|e| e.into_inner()), 2);
    assert_eq!(e.compensated().count(), 1, "unknown outcome: compensated");
}

/// What a step of an unjournaled run is told: its saga's and its own
/// name, the input, and one execution id for every call of the run (made
/// when first asked for), another for the next run; the idempotency key
/// is built from it.
#[tokio::test]
async fn execute_context_names_the_run_and_keeps_its_id() {
    type Seen = Arc<Mutex<Vec<(String, String, String, String, String)>>>;
    let seen: Seen = Arc::default();
    let record = |seen: Seen, ask_id: bool| {
        move |ctx: StepContext| {
            let id = if ask_id {
                ctx.execution_id().to_string()
            } else {
                String::new()
            };
            let key = if ask_id {
                ctx.idempotency_key()
            } else {
                String::new()
            };
            seen.lock().unwrap_or_else(|e| e.into_inner()).push((
                format!("{}/{}/{}", ctx.saga(), ctx.step(), ctx.phase()),
                ctx.input().to_string(),
                id,
                key,
                ctx.attempt().to_string(),
            ));
            async { Ok::<(), StepError>(()) }
        }
    };
    let saga = Saga::builder("ctx.names")
        // The first step does not ask for the id: it is made later.
        .step("first-step", record(seen.clone(), false))
        .step("second_step", record(seen.clone(), true))
        .compensate(record(seen.clone(), true))
        .step("third", record(seen.clone(), true))
        .build()
        .expect("saga");
    saga.execute(json!({"n": 1})).await.expect("completes");
    saga.execute(json!({"n": 2})).await.expect("completes");
    let seen = seen.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let names: Vec<&str> = seen.iter().map(|s| s.0.as_str()).collect();
    assert_eq!(
        names,
        [
            "ctx.names/first-step/action",
            "ctx.names/second_step/action",
            "ctx.names/third/action",
        ]
        .repeat(2)
    );
    let inputs: Vec<&str> = seen.iter().map(|s| s.1.as_str()).collect();
    assert_eq!(
        inputs,
        [r#"{"n":1}"#; 3]
            .into_iter()
            .chain([r#"{"n":2}"#; 3])
            .collect::<Vec<_>>()
    );
    let (run1, run2) = (&seen[1].2, &seen[4].2);
    assert!(
        !run1.is_empty() && run1.parse::<uuid::Uuid>().is_ok(),
        "{run1}"
    );
    assert_eq!(&seen[2].2, run1, "one id for every call of a run");
    assert_eq!(&seen[5].2, run2);
    assert_ne!(run1, run2, "each run has its own id");
    assert_eq!(seen[1].3, format!("{run1}:second_step:action"));
    assert!(seen.iter().all(|s| s.4 == "1"));
}

/// A step may keep a clone of its context past its call: the kept one
/// goes on showing what the call saw (the results of the steps before it,
/// not those after) and the run's one id, made after the copy was kept,
/// the same the later steps see.
#[tokio::test]
async fn a_kept_context_keeps_what_its_call_saw_and_the_runs_id() {
    /// What the later steps saw: the execution id and the results' names.
    type Later = Arc<Mutex<Vec<(String, Vec<String>)>>>;
    let kept: Arc<Mutex<Vec<StepContext>>> = Arc::default();
    let later: Later = Arc::default();
    let keep = {
        let kept = kept.clone();
        move |ctx: StepContext| {
            // Not asking for the id: it is made at a later step.
            kept.lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(ctx.clone());
            async { Ok::<_, StepError>(json!("a's result")) }
        }
    };
    let look = {
        let later = later.clone();
        move |ctx: StepContext| {
            later.lock().unwrap_or_else(|e| e.into_inner()).push((
                ctx.execution_id().to_string(),
                ctx.results().keys().map(str::to_owned).collect(),
            ));
            async { Ok::<(), StepError>(()) }
        }
    };
    let saga = Saga::builder("keep")
        .step("a", keep)
        .step("b", look.clone())
        .step("c", look)
        .build()
        .expect("saga");
    let results = saga.execute(Value::Null).await.expect("completes");
    assert_eq!(results.keys().collect::<Vec<_>>(), ["a", "b", "c"]);
    assert_eq!(results["a"], json!("a's result"));
    let later = later.lock().unwrap_or_else(|e| e.into_inner()).clone();
    assert_eq!(later[0].1, ["a"]);
    assert_eq!(later[1].1, ["a", "b"]);
    assert_eq!(later[0].0, later[1].0, "one id for the run");
    let kept = kept.lock().unwrap_or_else(|e| e.into_inner()).clone();
    assert_eq!(kept.len(), 1);
    assert!(kept[0].results().is_empty(), "{:?}", kept[0].results());
    assert_eq!(kept[0].step(), "a");
    assert_eq!(kept[0].execution_id().to_string(), later[0].0);
}

/// A saga that must wait for something cannot run unjournaled: refused,
/// nothing called.
#[tokio::test]
async fn execute_refuses_sagas_that_wait() {
    let called = Arc::new(Mutex::new(false));
    let c = called.clone();
    let step = move |_: StepContext| {
        *c.lock().unwrap_or_else(|e| e.into_inner()) = true;
        async { Ok::<(), StepError>(()) }
    };
    let callback = Saga::builder("cb")
        .step("a", step.clone())
        .step("wait", step.clone())
        .callback()
        .build()
        .expect("saga");
    let e = callback.execute(Value::Null).await.expect_err("refused");
    assert_eq!(e.step.as_deref(), Some("wait"));
    assert!(e.message.contains("Engine"), "{}", e.message);
    let manual = Saga::builder("m")
        .step("a", step)
        .autocommit(false)
        .build()
        .expect("saga");
    let e = manual.execute(Value::Null).await.expect_err("refused");
    assert!(e.message.contains("autocommit"), "{}", e.message);
    assert!(!*called.lock().unwrap_or_else(|e| e.into_inner()));
}

/// A step that is not done at its first poll is bounded by its timeout
/// (an unknown outcome).
#[tokio::test(start_paused = true)]
async fn a_slow_step_times_out() {
    let saga = Saga::builder("slow")
        .step("s", |_: StepContext| async {
            tokio::time::sleep(std::time::Duration::from_secs(60)).await;
            Ok::<(), StepError>(())
        })
        .timeout(std::time::Duration::from_millis(50))
        .retry(RetryPolicy {
            max_attempts: 1,
            ..RetryPolicy::default()
        })
        .build()
        .expect("saga");
    let e = saga.execute(Value::Null).await.expect_err("times out");
    assert_eq!(e.message, "timed out after 50 ms");
}

/// A synchronous step that panics is an unknown outcome, as an async one
/// is: retried, then compensated; later steps see earlier results.
#[tokio::test]
async fn a_panicking_synchronous_step_is_retried_then_compensated() {
    let calls = Arc::new(Mutex::new(Vec::<String>::new()));
    let (c1, c2, c3) = (calls.clone(), calls.clone(), calls.clone());
    let saga = Saga::builder("sync_panics")
        .step_sync("first", move |_: StepContext| {
            c1.lock()
                .unwrap_or_else(|e| e.into_inner())
                .push("first".into());
            Ok::<_, StepError>(7)
        })
        .step_sync("second", move |ctx: StepContext| {
            let seen = ctx.results()["first"].clone();
            c2.lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(format!("second saw {seen}"));
            if ctx.attempt() < 9 {
                panic!("boom");
            }
            Ok::<_, StepError>(())
        })
        .retry(RetryPolicy {
            max_attempts: 2,
            initial_backoff_ms: 1,
            max_backoff_ms: 1,
            multiplier: 1.0,
        })
        .compensate_sync(move |_: StepContext| {
            c3.lock()
                .unwrap_or_else(|e| e.into_inner())
                .push("undo second".into());
            Ok::<_, StepError>(())
        })
        .build()
        .expect("saga");
    let e = saga.execute(Value::Null).await.expect_err("fails");
    assert_eq!(e.step.as_deref(), Some("second"));
    assert_eq!(e.message, "the step panicked");
    assert_eq!(
        *calls.lock().unwrap_or_else(|e| e.into_inner()),
        ["first", "second saw 7", "second saw 7", "undo second"]
    );
}
