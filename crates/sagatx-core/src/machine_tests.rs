//! Unit tests: one or more per rule of API.md §3–§4.

use serde_json::{json, Value};

use crate::*;

/// Drives one execution by hand.
pub(crate) struct H {
    pub def: SagaDefinition,
    pub ex: Execution,
    pub now: u64,
    /// Every call the machine asked for, in order.
    pub log: Vec<Call>,
}

pub(crate) fn step_json(name: &str, comp: bool, confirm: bool, callback: bool) -> String {
    let mut s = format!(r#"{{"name":"{name}","action":"local""#);
    if comp {
        s.push_str(r#","compensation":"local""#);
    }
    if confirm {
        s.push_str(r#","confirm":"local""#);
    }
    if callback {
        s.push_str(r#","reply":"callback","timeout_ms":1000"#);
    }
    s.push('}');
    s
}

impl H {
    pub fn new(json: &str) -> H {
        let def = SagaDefinition::from_json(json.as_bytes()).expect("valid definition");
        let ex = Execution::new(
            ExecutionId(uuid::Uuid::from_u128(7)),
            &def,
            1,
            json!({"order": 7}),
            None,
            0,
        );
        H {
            def,
            ex,
            now: 0,
            log: Vec::new(),
        }
    }

    pub fn saga(mode: &str, steps: &[String]) -> H {
        H::new(&format!(
            r#"{{"name":"t","mode":"{mode}","steps":[{}]}}"#,
            steps.join(",")
        ))
    }

    pub fn try_ev(&mut self, e: Event) -> Result<Vec<Call>, Conflict> {
        let env = Env {
            now_ms: self.now,
            random01: 0.5,
        };
        let t = self.ex.handle(&self.def, e, env)?;
        self.ex.check_invariants().expect("invariants hold");
        self.log.extend(t.calls.iter().copied());
        Ok(t.calls)
    }

    pub fn ev(&mut self, e: Event) -> Vec<Call> {
        self.try_ev(e).expect("event applies")
    }

    fn attempt(&self, step: usize, phase: Phase) -> u32 {
        self.ex.steps[step].attempts_of(phase)
    }

    pub fn ok(&mut self, step: usize, phase: Phase, v: Value) -> Vec<Call> {
        let attempt = self.attempt(step, phase);
        self.ev(Event::Outcome {
            step,
            phase,
            attempt,
            outcome: Ok(v),
        })
    }

    pub fn err(&mut self, step: usize, phase: Phase, e: StepError) -> Vec<Call> {
        let attempt = self.attempt(step, phase);
        self.ev(Event::Outcome {
            step,
            phase,
            attempt,
            outcome: Err(e),
        })
    }

    /// Moves time to the next due moment and ticks.
    pub fn tick(&mut self) -> Vec<Call> {
        let due = self.ex.next_due_ms().expect("something is due");
        self.now = self.now.max(due);
        self.ev(Event::Tick)
    }

    pub fn st(&self, i: usize) -> StepStatus {
        self.ex.steps[i].status
    }
}

fn c(step: usize, phase: Phase, attempt: u32) -> Call {
    Call {
        step,
        phase,
        attempt,
    }
}

use Phase::{Action as A, Compensation as C, Confirm as F};

fn three(mode: &str) -> H {
    H::saga(
        mode,
        &[
            step_json("a", true, false, false),
            step_json("b", true, false, false),
            step_json("c", true, false, false),
        ],
    )
}

#[test]
fn sequential_runs_actions_in_order_and_completes() {
    let mut h = three("sequential");
    assert_eq!(h.ev(Event::Start), vec![c(0, A, 1)]);
    assert_eq!(h.ex.status, Status::Running);
    assert_eq!(h.ok(0, A, json!(1)), vec![c(1, A, 1)]);
    assert_eq!(h.ok(1, A, Value::Null), vec![c(2, A, 1)]);
    assert_eq!(h.ok(2, A, json!({"x": 3})), vec![]);
    assert_eq!(h.ex.status, Status::Completed);
    let results = h.ex.results();
    assert_eq!(results.len(), 3, "null results are kept: {results:?}");
    assert_eq!(results["b"], Value::Null);
    assert!(h.ex.saga_error().is_none());
}

#[test]
fn sequential_failure_compensates_earlier_steps_in_reverse_and_not_the_rejected_one() {
    let mut h = three("sequential");
    h.ev(Event::Start);
    h.ok(0, A, json!(1));
    h.ok(1, A, json!(2));
    // The third step is rejected: b then a are compensated, c is not.
    assert_eq!(
        h.err(2, A, StepError::permanent("HTTP 402")),
        vec![c(1, C, 1)]
    );
    assert_eq!(h.ex.status, Status::Compensating);
    assert_eq!(h.ok(1, C, Value::Null), vec![c(0, C, 1)]);
    assert_eq!(h.ok(0, C, Value::Null), vec![]);
    assert_eq!(h.ex.status, Status::Compensated);
    assert_eq!(h.st(2), StepStatus::Failed);
    assert_eq!(h.ex.steps[2].compensation_attempts, 0);
    let e = h.ex.saga_error().expect("error");
    assert_eq!(e.step.as_deref(), Some("c"));
    assert_eq!(e.message, "HTTP 402");
    let names: Vec<_> = e.compensations.iter().map(|c| c.step.as_str()).collect();
    assert_eq!(names, ["a", "b"]);
    assert!(e
        .compensations
        .iter()
        .all(|c| c.status == StepStatus::Compensated));
}

#[test]
fn transient_failures_are_retried_with_backoff_then_compensated_as_unknown() {
    let mut h = three("sequential");
    h.ev(Event::Start);
    h.ok(0, A, json!(1));
    assert_eq!(h.err(1, A, StepError::transient("HTTP 503")), vec![]);
    // Backoff before attempt 2 is 100 ms (jitter draw 0.5 is neutral).
    assert_eq!(h.ex.next_due_ms(), Some(100));
    assert_eq!(h.st(1), StepStatus::Running);
    assert_eq!(h.tick(), vec![c(1, A, 2)]);
    h.err(1, A, StepError::unknown_outcome("timed out"));
    assert_eq!(h.ex.next_due_ms(), Some(300), "then 200 ms");
    assert_eq!(h.tick(), vec![c(1, A, 3)]);
    // The third attempt is the last (max_attempts 3): the failed step is
    // compensated first since its outcome is unknown, then a.
    assert_eq!(
        h.err(1, A, StepError::transient("HTTP 500")),
        vec![c(1, C, 1)]
    );
    assert_eq!(h.ex.steps[1].attempts, 3);
    assert_eq!(h.ok(1, C, Value::Null), vec![c(0, C, 1)]);
    h.ok(0, C, Value::Null);
    assert_eq!(h.ex.status, Status::Compensated);
    assert_eq!(h.st(2), StepStatus::Pending);
}

#[test]
fn a_retry_that_succeeds_continues() {
    let mut h = three("sequential");
    h.ev(Event::Start);
    h.err(0, A, StepError::transient("HTTP 429"));
    h.tick();
    assert_eq!(h.ok(0, A, json!("r")), vec![c(1, A, 1)]);
    assert_eq!(h.ex.steps[0].attempts, 2);
    assert_eq!(h.ex.steps[0].error, None);
}

#[test]
fn steps_without_compensation_are_skipped_in_the_rollback() {
    let mut h = H::saga(
        "sequential",
        &[
            step_json("a", true, false, false),
            step_json("b", false, false, false),
            step_json("c", false, false, false),
        ],
    );
    h.ev(Event::Start);
    h.ok(0, A, json!(1));
    h.ok(1, A, json!(2));
    assert_eq!(h.err(2, A, StepError::permanent("no")), vec![c(0, C, 1)]);
    h.ok(0, C, Value::Null);
    assert_eq!(h.ex.status, Status::Compensated);
    assert_eq!(h.st(1), StepStatus::Succeeded);
}

#[test]
fn concurrent_starts_all_and_lets_calls_in_flight_finish_before_compensating() {
    let mut h = three("concurrent");
    assert_eq!(h.ev(Event::Start), vec![c(0, A, 1), c(1, A, 1), c(2, A, 1)]);
    h.err(0, A, StepError::transient("503")); // a backs off
    assert_eq!(h.err(1, A, StepError::permanent("no")), vec![]);
    // c is in flight: nothing compensates yet, and a's retry never starts.
    assert_eq!(h.ex.status, Status::Compensating);
    assert_eq!(h.st(0), StepStatus::Failed);
    assert!(h.ex.steps[0].outcome_unknown);
    assert_eq!(h.ex.next_due_ms(), None);
    // c succeeds: a (unknown) and c (succeeded) are compensated together.
    assert_eq!(h.ok(2, A, json!(3)), vec![c(0, C, 1), c(2, C, 1)]);
    h.ok(2, C, Value::Null);
    assert_eq!(h.ex.status, Status::Compensating);
    h.ok(0, C, Value::Null);
    assert_eq!(h.ex.status, Status::Compensated);
    assert_eq!(h.st(1), StepStatus::Failed);
    assert_eq!(h.ex.steps[1].compensation_attempts, 0);
}

#[test]
fn concurrent_completes_when_all_succeed_in_any_order() {
    let mut h = three("concurrent");
    h.ev(Event::Start);
    h.ok(2, A, json!(3));
    h.ok(0, A, json!(1));
    assert_eq!(h.ex.status, Status::Running);
    h.ok(1, A, json!(2));
    assert_eq!(h.ex.status, Status::Completed);
}

fn callback_saga() -> H {
    H::saga(
        "sequential",
        &[
            step_json("a", true, false, false),
            step_json("remote", true, false, true),
            step_json("c", true, false, false),
        ],
    )
}

#[test]
fn callback_step_pauses_until_its_reply() {
    let mut h = callback_saga();
    h.ev(Event::Start);
    h.ok(0, A, json!(1));
    assert_eq!(h.ok(1, A, json!({"accepted": true})), vec![]);
    assert_eq!(h.ex.status, Status::Paused);
    assert_eq!(h.ex.awaiting, Some(Awaiting::Reply));
    assert_eq!(h.st(1), StepStatus::Waiting);
    assert_eq!(h.ex.next_due_ms(), Some(1000), "reply deadline");
    let r = Reply::Ok(json!("shipped"));
    assert_eq!(
        h.ev(Event::Reply {
            step: 1,
            reply: r.clone()
        }),
        vec![c(2, A, 1)]
    );
    assert_eq!(h.ex.results()["remote"], json!("shipped"));
    // The same reply again: no second effect.
    let before = h.ex.clone();
    assert_eq!(h.ev(Event::Reply { step: 1, reply: r }), vec![]);
    assert_eq!(h.ex, before);
    // A different reply: conflict.
    assert!(matches!(
        h.try_ev(Event::Reply {
            step: 1,
            reply: Reply::Err("x".into())
        }),
        Err(Conflict::ReplyMismatch { .. })
    ));
}

#[test]
fn callback_rejected_reply_is_not_compensated() {
    let mut h = callback_saga();
    h.ev(Event::Start);
    h.ok(0, A, json!(1));
    h.ok(1, A, Value::Null);
    let calls = h.ev(Event::Reply {
        step: 1,
        reply: Reply::Err("out of stock".into()),
    });
    assert_eq!(calls, vec![c(0, C, 1)]);
    assert_eq!(
        h.ex.failure.as_ref().map(|f| f.message.as_str()),
        Some("out of stock")
    );
    h.ok(0, C, Value::Null);
    assert_eq!(h.ex.status, Status::Compensated);
    assert_eq!(h.ex.steps[1].compensation_attempts, 0);
}

#[test]
fn callback_without_reply_in_time_is_compensated() {
    let mut h = callback_saga();
    h.ev(Event::Start);
    h.ok(0, A, json!(1));
    h.ok(1, A, Value::Null);
    assert_eq!(h.tick(), vec![c(1, C, 1)]);
    assert_eq!(
        h.ex.steps[1].error.as_deref(),
        Some("no reply within 1000 ms")
    );
    h.ok(1, C, Value::Null);
    h.ok(0, C, Value::Null);
    assert_eq!(h.ex.status, Status::Compensated);
    // A late reply is refused.
    assert!(matches!(
        h.try_ev(Event::Reply {
            step: 1,
            reply: Reply::Ok(Value::Null)
        }),
        Err(Conflict::NotWaiting { .. })
    ));
}

#[test]
fn replies_to_steps_that_never_waited_or_are_sync_conflict() {
    let mut h = callback_saga();
    h.ev(Event::Start);
    assert!(matches!(
        h.try_ev(Event::Reply {
            step: 0,
            reply: Reply::Ok(Value::Null)
        }),
        Err(Conflict::NotCallback { .. })
    ));
    assert!(matches!(
        h.try_ev(Event::Reply {
            step: 1,
            reply: Reply::Ok(Value::Null)
        }),
        Err(Conflict::NotWaiting {
            status: StepStatus::Pending,
            ..
        })
    ));
    assert!(matches!(
        h.try_ev(Event::Reply {
            step: 9,
            reply: Reply::Ok(Value::Null)
        }),
        Err(Conflict::NoSuchStep { index: 9 })
    ));
}

#[test]
fn a_reply_that_beats_the_calls_response_is_kept() {
    let mut h = callback_saga();
    h.ev(Event::Start);
    h.ok(0, A, json!(1));
    assert_eq!(
        h.ev(Event::Reply {
            step: 1,
            reply: Reply::Ok(json!("early"))
        }),
        vec![]
    );
    assert_eq!(h.st(1), StepStatus::Running);
    assert_eq!(h.ok(1, A, Value::Null), vec![c(2, A, 1)]);
    assert_eq!(h.ex.results()["remote"], json!("early"));
}

fn confirm_saga(autocommit: bool) -> H {
    H::new(&format!(
        r#"{{"name":"t","autocommit":{autocommit},"steps":[{},{},{}]}}"#,
        step_json("a", true, true, false),
        step_json("b", true, false, false),
        step_json("c", true, true, false)
    ))
}

#[test]
fn autocommit_runs_confirms_in_step_order() {
    let mut h = confirm_saga(true);
    h.ev(Event::Start);
    h.ok(0, A, json!(1));
    h.ok(1, A, json!(2));
    assert_eq!(h.ok(2, A, json!(3)), vec![c(0, F, 1)]);
    assert_eq!(h.ex.status, Status::Running);
    assert_eq!(h.ok(0, F, Value::Null), vec![c(2, F, 1)]);
    h.ok(2, F, Value::Null);
    assert_eq!(h.ex.status, Status::Completed);
    assert_eq!(h.st(0), StepStatus::Confirmed);
    assert_eq!(h.st(1), StepStatus::Succeeded);
    assert!(matches!(
        h.try_ev(Event::Cancel),
        Err(Conflict::Terminal { .. })
    ));
}

#[test]
fn without_autocommit_pauses_for_commit_then_confirms() {
    let mut h = confirm_saga(false);
    assert!(matches!(
        h.try_ev(Event::Commit),
        Err(Conflict::NotAwaitingCommit { .. })
    ));
    h.ev(Event::Start);
    h.ok(0, A, json!(1));
    h.ok(1, A, json!(2));
    assert_eq!(h.ok(2, A, json!(3)), vec![]);
    assert_eq!(h.ex.status, Status::Paused);
    assert_eq!(h.ex.awaiting, Some(Awaiting::Commit));
    assert_eq!(h.ev(Event::Commit), vec![c(0, F, 1)]);
    // Once committing, a cancel is refused.
    assert_eq!(h.try_ev(Event::Cancel), Err(Conflict::Committing));
    h.ok(0, F, Value::Null);
    h.ok(2, F, Value::Null);
    assert_eq!(h.ex.status, Status::Completed);
}

#[test]
fn reject_compensates_everything_with_message_rejected() {
    let mut h = confirm_saga(false);
    h.ev(Event::Start);
    h.ok(0, A, json!(1));
    h.ok(1, A, json!(2));
    h.ok(2, A, json!(3));
    assert_eq!(h.ev(Event::Reject), vec![c(2, C, 1)]);
    h.ok(2, C, Value::Null);
    h.ok(1, C, Value::Null);
    h.ok(0, C, Value::Null);
    assert_eq!(h.ex.status, Status::Compensated);
    let e = h.ex.saga_error().expect("error");
    assert_eq!((e.step, e.message.as_str()), (None, "rejected"));
    assert_eq!(e.compensations.len(), 3);
}

#[test]
fn cancel_lets_the_call_in_flight_finish_then_rolls_back() {
    let mut h = three("sequential");
    h.ev(Event::Start);
    h.ok(0, A, json!(1));
    assert_eq!(h.ev(Event::Cancel), vec![]);
    assert_eq!(h.ex.status, Status::Compensating);
    // Cancelling again while compensating changes nothing.
    assert_eq!(h.ev(Event::Cancel), vec![]);
    // b was in flight; it succeeds and is compensated, then a.
    assert_eq!(h.ok(1, A, json!(2)), vec![c(1, C, 1)]);
    h.ok(1, C, Value::Null);
    h.ok(0, C, Value::Null);
    assert_eq!(h.ex.status, Status::Compensated);
    assert_eq!(h.st(2), StepStatus::Pending);
    assert!(h.log.iter().all(|c| !(c.phase == A && c.step == 2)));
    let e = h.ex.saga_error().expect("error");
    assert_eq!((e.step, e.message.as_str()), (None, "cancelled"));
}

#[test]
fn cancel_of_a_paused_callback_compensates_the_waiting_step() {
    let mut h = callback_saga();
    h.ev(Event::Start);
    h.ok(0, A, json!(1));
    h.ok(1, A, Value::Null);
    assert_eq!(h.ev(Event::Cancel), vec![c(1, C, 1)]);
    assert_eq!(h.ex.next_due_ms(), None, "the reply deadline is gone");
}

#[test]
fn failed_compensations_leave_the_execution_failed_until_retried() {
    let mut h = three("sequential");
    h.ev(Event::Start);
    h.ok(0, A, json!(1));
    h.ok(1, A, json!(2));
    h.err(2, A, StepError::permanent("no"));
    // b's compensation is rejected; a's still runs.
    assert_eq!(
        h.err(1, C, StepError::permanent("cannot")),
        vec![c(0, C, 1)]
    );
    h.ok(0, C, Value::Null);
    assert_eq!(h.ex.status, Status::Failed);
    assert_eq!(h.st(1), StepStatus::CompensationFailed);
    let e = h.ex.saga_error().expect("error");
    assert_eq!(
        e.compensation_errors().collect::<Vec<_>>(),
        [("b", "cannot")]
    );
    // An operator retries: b's compensation runs again and succeeds.
    assert!(matches!(
        three("sequential").try_ev(Event::Retry),
        Err(Conflict::NotFailed { .. })
    ));
    assert_eq!(h.ev(Event::Retry), vec![c(1, C, 2)]);
    h.ok(1, C, Value::Null);
    assert_eq!(h.ex.status, Status::Compensated);
}

#[test]
fn compensations_get_at_least_ten_attempts() {
    let mut h = three("sequential");
    h.ev(Event::Start);
    h.ok(0, A, json!(1));
    h.err(1, A, StepError::permanent("no"));
    for _ in 0..9 {
        h.err(0, C, StepError::transient("503"));
        assert_eq!(h.tick().len(), 1);
    }
    assert_eq!(h.ex.steps[0].compensation_attempts, 10);
    h.err(0, C, StepError::transient("503"));
    assert_eq!(h.ex.status, Status::Failed);
    // A retry grants a fresh budget.
    h.ev(Event::Retry);
    h.err(0, C, StepError::transient("503"));
    assert_eq!(h.ex.status, Status::Compensating);
    h.tick();
    h.ok(0, C, Value::Null);
    assert_eq!(h.ex.status, Status::Compensated);
    assert_eq!(h.ex.steps[0].compensation_attempts, 12);
}

#[test]
fn a_failed_confirm_fails_the_execution_and_retry_finishes_it() {
    let mut h = confirm_saga(true);
    h.ev(Event::Start);
    h.ok(0, A, json!(1));
    h.ok(1, A, json!(2));
    h.ok(2, A, json!(3));
    assert_eq!(h.err(0, F, StepError::permanent("gone")), vec![c(2, F, 1)]);
    h.ok(2, F, Value::Null);
    assert_eq!(h.ex.status, Status::Failed);
    assert_eq!(
        h.ex.failure.as_ref().and_then(|f| f.step.as_deref()),
        Some("a")
    );
    assert_eq!(h.ev(Event::Retry), vec![c(0, F, 2)]);
    h.ok(0, F, Value::Null);
    assert_eq!(h.ex.status, Status::Completed);
}

#[test]
fn resume_calls_an_interrupted_action_again_without_spending_its_budget() {
    let mut h = three("sequential");
    h.ev(Event::Start);
    h.err(0, A, StepError::transient("503"));
    h.tick();
    h.err(0, A, StepError::transient("503"));
    h.tick(); // attempt 3 in flight, the last of the budget
              // Crash: the state round-trips through the journal form.
    h.ex = Execution::from_raw(&h.ex.to_raw().expect("encode")).expect("decode");
    assert_eq!(h.ev(Event::Resume), vec![c(0, A, 4)]);
    // The interrupted attempt does not count: attempt 4 is still allowed,
    // and its failure is then the last; its outcome is unknown, so it is
    // compensated.
    assert_eq!(h.err(0, A, StepError::transient("503")), vec![c(0, C, 1)]);
    assert_eq!(h.ex.status, Status::Compensating);
}

#[test]
fn resume_during_rollback_compensates_an_interrupted_action() {
    let mut h = three("concurrent");
    h.ev(Event::Start);
    h.ok(0, A, json!(1));
    h.err(1, A, StepError::permanent("no"));
    // c is in flight when the process dies.
    assert_eq!(h.ev(Event::Resume), vec![c(0, C, 1), c(2, C, 1)]);
    assert!(h.log.iter().filter(|c| c.step == 2 && c.phase == A).count() == 1);
}

#[test]
fn resume_calls_an_interrupted_compensation_again() {
    let mut h = three("sequential");
    h.ev(Event::Start);
    h.ok(0, A, json!(1));
    h.err(1, A, StepError::permanent("no"));
    assert_eq!(h.ev(Event::Resume), vec![c(0, C, 2)]);
    h.ok(0, C, Value::Null);
    assert_eq!(h.ex.status, Status::Compensated);
}

#[test]
fn stale_outcomes_are_ignored() {
    let mut h = three("sequential");
    h.ev(Event::Start);
    h.ev(Event::Resume); // attempt 2 now in flight
    let before = h.ex.clone();
    let calls = h.ev(Event::Outcome {
        step: 0,
        phase: A,
        attempt: 1,
        outcome: Ok(json!(1)),
    });
    assert!(calls.is_empty());
    assert_eq!(h.ex, before);
}

#[test]
fn cancel_before_start_ends_compensated_with_no_calls() {
    let mut h = three("sequential");
    assert_eq!(h.ev(Event::Cancel), vec![]);
    assert_eq!(h.ex.status, Status::Compensated);
}

#[test]
fn raw_round_trip_and_future_versions() {
    let mut h = callback_saga();
    h.ev(Event::Start);
    h.ok(0, A, json!({"a": [1, 2]}));
    h.ok(1, A, Value::Null);
    let raw = h.ex.to_raw().expect("encode");
    assert_eq!(Execution::from_raw(&raw).expect("decode"), h.ex);
    let mut v: Value = serde_json::from_slice(&raw).expect("json");
    v["format_version"] = json!(99);
    let future = serde_json::to_vec(&v).expect("json");
    assert!(matches!(
        Execution::from_raw(&future),
        Err(DecodeError::FutureVersion { found: 99 })
    ));
    assert!(matches!(
        Execution::from_raw(b"{nope"),
        Err(DecodeError::Json(_))
    ));
    // A later version whose shape this one cannot read is still told as a
    // later version, not as damaged JSON.
    v["steps"] = json!({"renamed": true});
    v["status"] = json!("a status of the future");
    let reshaped = serde_json::to_vec(&v).expect("json");
    assert!(matches!(
        Execution::from_raw(&reshaped),
        Err(DecodeError::FutureVersion { found: 99 })
    ));
    // The same shape at this version is damaged, and says what is wrong.
    v["format_version"] = json!(FORMAT_VERSION);
    let damaged = serde_json::to_vec(&v).expect("json");
    assert!(matches!(
        Execution::from_raw(&damaged),
        Err(DecodeError::Json(_))
    ));
}

#[test]
fn null_results_survive_the_journal() {
    // Regression: a `null` result read back as "no result", which made a
    // succeeded step look like one that never succeeded.
    let mut h = three("sequential");
    h.ev(Event::Start);
    h.ok(0, A, Value::Null);
    let back = Execution::from_raw(&h.ex.to_raw().expect("encode")).expect("decode");
    assert_eq!(back.steps[0].result, Some(Value::Null));
    assert_eq!(back, h.ex);
}

#[test]
fn view_has_every_field_of_the_contract() {
    let mut h = three("sequential");
    h.ev(Event::Start);
    h.ok(0, A, json!({"reservation": "r-1"}));
    h.err(1, A, StepError::permanent("HTTP 402: card declined"));
    let v = h.ex.view();
    for f in [
        "id",
        "saga",
        "saga_version",
        "status",
        "awaiting",
        "input",
        "results",
        "steps",
        "error",
        "created_at",
        "updated_at",
    ] {
        assert!(v.get(f).is_some(), "missing {f}");
    }
    assert_eq!(v["status"], "compensating");
    assert_eq!(v["error"]["step"], "b");
    assert_eq!(v["steps"][1]["error"], "HTTP 402: card declined");
    assert_eq!(v["steps"][2]["result"], Value::Null);
    assert_eq!(v["created_at"], "1970-01-01T00:00:00.000Z");
}

/// The view as it was first written, with `json!` (the reference the
/// serializing view must equal, key order included).
fn reference_view(ex: &Execution) -> Value {
    let steps: Vec<Value> = ex
        .steps
        .iter()
        .map(|s| {
            serde_json::json!({
                "name": s.name,
                "status": s.status.as_str(),
                "attempts": s.attempts,
                "compensation_attempts": s.compensation_attempts,
                "confirm_attempts": s.confirm_attempts,
                "result": s.result.clone().unwrap_or(Value::Null),
                "error": s.error,
                "compensation_error": s.compensation_error,
                "confirm_error": s.confirm_error,
                "next_attempt_at": s.due_at_ms.map(crate::execution::format_ms),
                "history": s.history.iter().map(|a| serde_json::json!({
                    "phase": a.phase.as_str(),
                    "attempt": a.attempt,
                    "started_at": crate::execution::format_ms(a.started_at_ms),
                    "ended_at": a.ended_at_ms.map(crate::execution::format_ms),
                    "outcome": a.outcome.map(crate::CallOutcome::as_str),
                    "error": a.error,
                })).collect::<Vec<_>>(),
            })
        })
        .collect();
    let error = ex.saga_error().map(|e| {
        serde_json::json!({
            "step": e.step,
            "message": e.message,
            "compensations": e.compensations.iter().map(|c| serde_json::json!({
                "step": c.step, "status": c.status.as_str(), "error": c.error,
            })).collect::<Vec<_>>(),
        })
    });
    serde_json::json!({
        "id": ex.id.to_string(),
        "saga": ex.saga,
        "saga_version": ex.saga_version,
        "status": ex.status.as_str(),
        "awaiting": ex.awaiting.map(|a| match a { crate::Awaiting::Reply => "reply", crate::Awaiting::Commit => "commit" }),
        "input": ex.input,
        "results": Value::Object(ex.results()),
        "steps": steps,
        "error": error,
        "user": ex.user,
        "created_at": crate::execution::format_ms(ex.created_at_ms),
        "updated_at": crate::execution::format_ms(ex.updated_at_ms),
    })
}

#[test]
fn the_serializing_view_writes_what_the_json_tree_did() {
    let mut states = vec![golden_state()];
    // Every state of a saga that fails on its last step and compensates
    // (errors, compensations, results), and of a paused one.
    let mut h = three("sequential");
    states.push(h.ex.clone());
    h.ev(Event::Start);
    states.push(h.ex.clone());
    h.ok(0, A, json!({"reservation": "r-1", "z": [1, null]}));
    states.push(h.ex.clone());
    h.err(1, A, StepError::transient("HTTP 503"));
    states.push(h.ex.clone());
    h.ok(1, A, json!("b's"));
    states.push(h.ex.clone());
    h.err(2, A, StepError::permanent("HTTP 402: card declined"));
    states.push(h.ex.clone());
    h.ok(1, C, Value::Null);
    states.push(h.ex.clone());
    h.err(0, C, StepError::permanent("gone"));
    states.push(h.ex.clone());
    let mut p = callback_saga();
    p.ex.user = Some("ada \"lovelace\"".into());
    p.ev(Event::Start);
    p.ok(0, A, Value::Null);
    states.push(p.ex.clone());
    p.ev(Event::Resume);
    p.ok(1, A, Value::Null);
    states.push(p.ex.clone());
    assert!(states.iter().any(|s| s.awaiting.is_some()), "a paused one");
    assert!(
        states
            .iter()
            .any(|s| s.saga_error().is_some_and(|e| !e.compensations.is_empty())),
        "one with compensations"
    );
    for ex in &states {
        let reference = reference_view(ex);
        assert_eq!(ex.view(), reference);
        assert_eq!(
            serde_json::to_string(&ex.view_ref()).expect("writes"),
            reference.to_string(),
            "the same text, keys in the same order"
        );
        let mut written = Vec::new();
        ex.write_view(&mut written).expect("writes");
        assert_eq!(
            String::from_utf8_lossy(&written),
            reference.to_string(),
            "the hand-written view"
        );
    }
}

/// A state touching most fields, as journaled by format version 1.
fn golden_state() -> Execution {
    let mut h = callback_saga();
    h.now = 1_763_800_000_000;
    h.ex.created_at_ms = h.now;
    h.ex.user = Some("ada".into());
    h.ev(Event::Start);
    h.ok(0, A, json!({"reservation": "r-1", "n": [1, 2.5, null]}));
    h.ev(Event::Resume);
    h.ok(1, A, Value::Null);
    h.ev(Event::Reply {
        step: 1,
        reply: Reply::Ok(Value::Null),
    });
    h.err(2, A, StepError::transient("HTTP 503"));
    h.ev(Event::Cancel);
    h.err(1, C, StepError::transient("HTTP 500"));
    h.ex.seq = 9;
    h.ex
}

#[test]
fn golden_files_of_every_format_version_stay_readable() {
    // Format 1 as first written (no call history), and with the history
    // that was added to it later (an optional field: the version did not
    // change).
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/golden/execution-v1-history.json"
    );
    if std::env::var_os("SAGATX_WRITE_GOLDEN").is_some() {
        let v: Value =
            serde_json::from_slice(&golden_state().to_raw().expect("encode")).expect("json");
        std::fs::write(path, serde_json::to_string_pretty(&v).expect("json") + "\n")
            .expect("write");
    }
    let raw = include_bytes!("../golden/execution-v1.json");
    let ex = Execution::from_raw(raw).expect("version 1 journal entries decode");
    let mut without_history = golden_state();
    for s in &mut without_history.steps {
        s.history.clear();
    }
    assert_eq!(ex, without_history, "decoding v1 gives the same state");
    let raw = include_bytes!("../golden/execution-v1-history.json");
    let ex = Execution::from_raw(raw).expect("version 1 entries with history decode");
    assert_eq!(
        ex,
        golden_state(),
        "decoding v1 with history gives the same state"
    );
}

/// The timeline of a step: every call with its times and outcome, a call
/// cut short by a restart marked as such, the oldest dropped past the cap.
#[test]
fn each_call_is_kept_in_the_step_history_with_its_times_and_outcome() {
    let mut h = callback_saga();
    h.now = 1_000;
    h.ev(Event::Start);
    h.now = 1_005;
    h.err(0, A, StepError::transient("HTTP 503"));
    h.now = 1_200;
    h.ev(Event::Tick);
    h.now = 1_210;
    h.ev(Event::Resume);
    h.now = 1_220;
    h.ok(0, A, json!(1));
    let hist = &h.ex.steps[0].history;
    let outcomes: Vec<_> = hist
        .iter()
        .map(|a| {
            (
                a.attempt,
                a.outcome.map(crate::CallOutcome::as_str),
                a.error.as_deref(),
            )
        })
        .collect();
    assert_eq!(
        outcomes,
        [
            (1, Some("transient"), Some("HTTP 503")),
            (2, Some("interrupted"), None),
            (3, Some("ok"), None),
        ]
    );
    assert_eq!(
        (hist[0].started_at_ms, hist[0].ended_at_ms),
        (1_000, Some(1_005))
    );
    assert_eq!(hist[1].ended_at_ms, Some(1_210));
    assert_eq!(
        hist[2].started_at_ms, 1_210,
        "made again at once after the restart"
    );
    // The public view shows it.
    let v = h.ex.view();
    assert_eq!(v["steps"][0]["history"][0]["outcome"], "transient");
    assert_eq!(v["steps"][0]["history"][2]["phase"], "action");

    let mut s = sagatx_core_step("x");
    for n in 1..=(crate::HISTORY_CAP as u32 + 4) {
        s.began(A, n, u64::from(n));
        s.ended(
            A,
            n,
            u64::from(n) + 1,
            crate::CallOutcome::Transient,
            Some(&"e".repeat(1_000)),
        );
    }
    assert_eq!(s.history.len(), crate::HISTORY_CAP);
    assert_eq!(s.history[0].attempt, 5, "the oldest calls go first");
    assert!(s.history[0].error.as_ref().is_some_and(|e| e.len() <= 300));
}

fn sagatx_core_step(name: &str) -> crate::StepState {
    crate::StepState::new(name)
}

#[test]
fn timestamps_are_written_as_humantime_writes_them() {
    let reference = |ms: u64| {
        humantime::format_rfc3339_millis(
            std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms),
        )
        .to_string()
    };
    let day = 86_400_000u64;
    let mut cases = vec![
        0,
        999,
        1_763_800_000_123,
        951_782_400_000,     // 2000-02-29
        4_107_542_399_999,   // 2100-02-28T23:59:59.999
        4_107_542_400_000,   // 2100-03-01
        253_402_300_799_999, // 9999-12-31T23:59:59.999
    ];
    // Every day of a few leap and non-leap years, at a time of day that
    // changes with the day.
    for d in (0..4 * 366).chain(10_950..12_500).chain(47_400..47_800) {
        cases.push(d * day + (d * 7_654_321) % day);
    }
    for ms in cases {
        assert_eq!(crate::execution::format_ms(ms), reference(ms), "{ms}");
    }
    // Past the year 9999 (where humantime's formatter fails) the last
    // instant RFC 3339 can write, not a panic.
    for ms in [253_402_300_800_000, u64::MAX] {
        assert_eq!(crate::execution::format_ms(ms), "9999-12-31T23:59:59.999Z");
    }
}

/// The hand-written journal encoder writes exactly what the derived
/// `Serialize` writes, for a state with every optional field set and
/// strings that need escaping (debug builds also compare every entry
/// journaled by any test).
#[test]
fn the_journal_encoder_writes_what_serde_writes() {
    let mut ex = golden_state();
    let compare = |ex: &Execution| {
        let mut ours = Vec::new();
        crate::journal::encode(ex, 0, &mut ours).expect("encodes");
        let theirs = serde_json::to_vec(ex).expect("serde");
        assert_eq!(
            String::from_utf8_lossy(&ours),
            String::from_utf8_lossy(&theirs)
        );
        assert_eq!(
            Execution::from_raw(&ours).ok().as_ref(),
            Execution::from_raw(&theirs).ok().as_ref()
        );
        // And the API's view, hand-written too, of the same state.
        let mut view = b"[".to_vec();
        ex.write_view(&mut view).expect("writes");
        assert_eq!(
            String::from_utf8_lossy(&view[1..]),
            serde_json::to_string(&ex.view_ref()).expect("serde"),
            "the view"
        );
    };
    compare(&ex);
    ex.awaiting = Some(Awaiting::Commit);
    ex.committing = true;
    ex.user = Some("ada \"the\" \\ lovelace\n\u{1}é😀".into());
    ex.failure = Some(Failure {
        step: Some("b\"\t".into()),
        message: "it broke: \"no\"\r\n".into(),
    });
    ex.input = std::sync::Arc::new(json!({"s": "\"x\"", "n": [1, -2, 3.5, null, true], "o": {}}));
    let s = &mut ex.steps[0];
    s.name = Name::from("na\"me\\");
    s.attempts = 3;
    s.compensation_attempts = 2;
    s.confirm_attempts = 1;
    s.exempt = crate::execution::Exempt {
        action: 1,
        compensation: 0,
        confirm: 7,
    };
    s.result = Some(json!("r\u{7f}\u{1f}"));
    s.error = Some("e\u{0}".into());
    s.compensation_error = Some("ce".into());
    s.confirm_error = Some("fe/".into());
    s.outcome_unknown = true;
    s.in_flight = Some(Phase::Confirm);
    s.due_at_ms = Some(u64::MAX);
    s.owed = Some(Phase::Compensation);
    s.reply = Some(Reply::Err("bad \"reply\"".into()));
    s.history.push(Attempt {
        phase: Phase::Confirm,
        attempt: u32::MAX,
        started_at_ms: 0,
        ended_at_ms: None,
        outcome: Some(CallOutcome::UnknownOutcome),
        error: Some("x\"y".into()),
    });
    compare(&ex);
    ex.steps[1].exempt = crate::execution::Exempt {
        action: 0,
        compensation: 4,
        confirm: 0,
    };
    ex.steps[1].reply = Some(Reply::Ok(json!({"deep": ["\\"]})));
    ex.steps[1].result = Some(Value::Null);
    ex.awaiting = Some(Awaiting::Reply);
    ex.failure = Some(Failure {
        step: None,
        message: String::new(),
    });
    compare(&ex);
}

/// An entry written relative to a time base reads back as the execution
/// it was, times before the base included (they wrap, and come back
/// exactly); its times are small numbers; base 0 is the format itself.
#[test]
fn an_entry_written_relative_to_its_creation_reads_back_exactly() {
    let mut ex = golden_state();
    let base = ex.created_at_ms;
    assert_eq!(
        ex.to_raw_relative(0).expect("encodes"),
        ex.to_raw().expect("encodes")
    );
    let rel = ex.to_raw_relative(base).expect("encodes");
    let text = String::from_utf8_lossy(&rel).into_owned();
    assert!(
        text.contains("\"created_at_ms\":0,") && !text.contains("17638"),
        "times are written after the base: {text}"
    );
    assert_eq!(
        Execution::from_raw_relative(&rel, base).expect("decodes"),
        ex
    );
    // Read with the wrong base, it is another execution (the base is part
    // of the entry's meaning).
    assert_ne!(
        Execution::from_raw_relative(&rel, base + 1).ok(),
        Some(ex.clone())
    );
    // A clock that stepped back: a time before the base, and the extremes.
    ex.steps[0].history[0].started_at_ms = base - 5;
    ex.steps[0].history[0].ended_at_ms = Some(base - 1);
    ex.steps[2].due_at_ms = Some(u64::MAX);
    ex.updated_at_ms = 0;
    for b in [base, 1, u64::MAX] {
        let rel = ex.to_raw_relative(b).expect("encodes");
        assert_eq!(
            Execution::from_raw_relative(&rel, b).expect("decodes"),
            ex,
            "base {b}"
        );
    }
}
