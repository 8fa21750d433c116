//! Property tests: random definitions, random failure patterns (transient,
//! permanent, timeout), random crash points, cancels, commits and rejects.
//! Every run must end terminal and keep the guarantees of API.md §4.
//! A failing case is printed by proptest with its seed and can be replayed.

use std::collections::HashSet;

use proptest::prelude::*;
use serde_json::json;

use super::tests::{step_json, H};
use crate::*;

#[derive(Debug, Clone)]
struct Case {
    steps: Vec<(bool, bool, bool)>, // compensation, confirm, callback
    concurrent: bool,
    autocommit: bool,
    max_attempts: u32,
    seed: u64,
    /// Percentages: a crash per event, a cancel per event, a permanent
    /// failure per action outcome.
    crash_pct: u64,
    cancel_pct: u64,
    permanent_pct: u64,
}

fn arb_case() -> impl Strategy<Value = Case> {
    (
        prop::collection::vec(
            (
                any::<bool>(),
                prop::bool::weighted(0.3),
                prop::bool::weighted(0.2),
            ),
            1..6,
        ),
        any::<bool>(),
        prop::bool::weighted(0.7),
        1u32..4,
        any::<u64>(),
        prop::sample::select(vec![0u64, 3, 12]),
        prop::sample::select(vec![0u64, 2]),
        prop::sample::select(vec![0u64, 5, 15]),
    )
        .prop_map(
            |(
                steps,
                concurrent,
                autocommit,
                max_attempts,
                seed,
                crash_pct,
                cancel_pct,
                permanent_pct,
            )| Case {
                steps,
                concurrent,
                autocommit,
                max_attempts,
                seed,
                crash_pct,
                cancel_pct,
                permanent_pct,
            },
        )
}

/// A small deterministic generator (xorshift*), seeded by proptest.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn pct(&mut self, p: u64) -> bool {
        self.next() % 100 < p
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

struct Checker {
    rollback_at: Option<usize>,
    /// (step, phase) whose success the machine recorded.
    succeeded: HashSet<(usize, Phase)>,
    actions_called: HashSet<usize>,
    first_compensation: Vec<usize>,
    sequential: bool,
}

impl Checker {
    fn calls(&mut self, h: &H, calls: &[Call]) -> Result<(), TestCaseError> {
        if h.ex.status == Status::Compensating && self.rollback_at.is_none() {
            self.rollback_at = Some(h.log.len());
        }
        for c in calls {
            prop_assert!(
                !self.succeeded.contains(&(c.step, c.phase)),
                "{:?} called again after its success was recorded",
                c
            );
            match c.phase {
                Phase::Action => {
                    prop_assert!(
                        self.rollback_at.is_none(),
                        "action {:?} called after the rollback began",
                        c
                    );
                    if self.sequential {
                        for j in 0..c.step {
                            prop_assert!(
                                h.ex.steps[j].action_succeeded(),
                                "step {} started before step {} succeeded",
                                c.step,
                                j
                            );
                        }
                    }
                    self.actions_called.insert(c.step);
                }
                Phase::Compensation => {
                    prop_assert!(
                        self.actions_called.contains(&c.step),
                        "compensation of step {} before its action",
                        c.step
                    );
                    if !self.first_compensation.contains(&c.step) {
                        self.first_compensation.push(c.step);
                    }
                }
                Phase::Confirm => {
                    prop_assert!(h.ex.steps.iter().all(|s| s.action_succeeded()));
                }
            }
        }
        if self.sequential {
            let w = &self.first_compensation;
            prop_assert!(
                w.windows(2).all(|p| p[0] > p[1]),
                "sequential compensations out of reverse order: {:?}",
                w
            );
            let in_flight = h.ex.steps.iter().filter(|s| s.in_flight.is_some()).count();
            prop_assert!(
                in_flight <= 1,
                "sequential with {} calls in flight",
                in_flight
            );
        }
        Ok(())
    }
}

fn run(case: Case) -> Result<(), TestCaseError> {
    let steps: Vec<String> = case
        .steps
        .iter()
        .enumerate()
        .map(|(i, &(c, f, cb))| step_json(&format!("s{i}"), c, f, cb))
        .collect();
    let mut h = H::new(&format!(
        r#"{{"name":"sim","mode":"{}","autocommit":{},"retry":{{"max_attempts":{}}},"steps":[{}]}}"#,
        if case.concurrent {
            "concurrent"
        } else {
            "sequential"
        },
        case.autocommit,
        case.max_attempts,
        steps.join(",")
    ));
    let mut rng = Rng(case.seed | 1);
    let mut ck = Checker {
        rollback_at: None,
        succeeded: HashSet::new(),
        actions_called: HashSet::new(),
        first_compensation: Vec::new(),
        sequential: !case.concurrent,
    };
    let mut pending: Vec<Call> = Vec::new();
    let mut retries = 0;
    let mut crashes = 0;

    let calls = h.ev(Event::Start);
    ck.calls(&h, &calls)?;
    pending.extend(calls);

    for _ in 0..5000 {
        if h.ex.status.is_terminal() && !(h.ex.status == Status::Failed && retries < 3) {
            break;
        }
        let calls: Vec<Call>;
        if crashes < 8 && rng.pct(case.crash_pct) {
            // Crash: calls in flight are lost (they may or may not have
            // happened); the state comes back from the journal form.
            crashes += 1;
            pending.clear();
            h.ex = Execution::from_raw(&h.ex.to_raw().expect("encode")).expect("decode");
            calls = h.ev(Event::Resume);
        } else if rng.pct(case.cancel_pct) {
            calls = h.try_ev(Event::Cancel).unwrap_or_default();
        } else if !pending.is_empty() {
            let c = pending.swap_remove(rng.below(pending.len()));
            let callback = case.steps[c.step].2 && c.phase == Phase::Action;
            if callback && rng.pct(20) {
                // The reply races ahead of the call's own response.
                let _ = h.try_ev(Event::Reply {
                    step: c.step,
                    reply: Reply::Ok(json!("early")),
                });
            }
            let roll = rng.below(100);
            let permanent_pct = if c.phase == Phase::Action {
                case.permanent_pct
            } else {
                case.permanent_pct / 3
            };
            let outcome = if roll < 10 {
                Ok(serde_json::Value::Null)
            } else if roll < 55 {
                Ok(json!({"step": c.step, "attempt": c.attempt}))
            } else if roll < 55 + permanent_pct as usize {
                Err(StepError::permanent("rejected"))
            } else if roll < 85 {
                Err(StepError::transient("503"))
            } else {
                Err(StepError::unknown_outcome("timed out"))
            };
            let ok = outcome.is_ok();
            let in_flight_before = h.ex.steps[c.step].in_flight == Some(c.phase)
                && h.ex.steps[c.step].attempts_of(c.phase) == c.attempt;
            calls = h.ev(Event::Outcome {
                step: c.step,
                phase: c.phase,
                attempt: c.attempt,
                outcome,
            });
            if ok && in_flight_before {
                ck.succeeded.insert((c.step, c.phase));
            }
        } else if h.ex.status == Status::Paused && h.ex.awaiting == Some(Awaiting::Reply) {
            let waiting: Vec<usize> = (0..h.ex.steps.len())
                .filter(|&i| h.ex.steps[i].status == StepStatus::Waiting)
                .collect();
            prop_assert!(!waiting.is_empty());
            let i = waiting[rng.below(waiting.len())];
            calls = match rng.below(3) {
                0 => h.ev(Event::Reply {
                    step: i,
                    reply: Reply::Ok(json!("r")),
                }),
                1 => h.ev(Event::Reply {
                    step: i,
                    reply: Reply::Err("no".into()),
                }),
                _ => h.tick(),
            };
        } else if h.ex.status == Status::Paused {
            calls = h.ev(if rng.pct(50) {
                Event::Commit
            } else {
                Event::Reject
            });
        } else if h.ex.status == Status::Failed {
            retries += 1;
            calls = h.ev(Event::Retry);
        } else {
            prop_assert!(
                h.ex.next_due_ms().is_some(),
                "stuck: nothing in flight, nothing due, status {}",
                h.ex.status
            );
            calls = h.tick();
        }
        ck.calls(&h, &calls)?;
        pending.extend(calls);
    }

    let ex = &h.ex;
    prop_assert!(ex.status.is_terminal(), "not terminal: {}", ex.status);
    prop_assert!(pending.is_empty() || ex.status.is_terminal());
    match ex.status {
        Status::Completed => {
            prop_assert!(ck.rollback_at.is_none());
            for (i, s) in ex.steps.iter().enumerate() {
                let want = if case.steps[i].1 {
                    StepStatus::Confirmed
                } else {
                    StepStatus::Succeeded
                };
                prop_assert_eq!(s.status, want);
            }
        }
        Status::Compensated => {
            for (i, s) in ex.steps.iter().enumerate() {
                let owes = case.steps[i].0 && (s.action_succeeded() || s.outcome_unknown);
                prop_assert_eq!(
                    owes,
                    s.status == StepStatus::Compensated,
                    "step {} is {:?}",
                    i,
                    s.status
                );
            }
        }
        Status::Failed => {
            prop_assert!(ex.steps.iter().any(|s| matches!(
                s.status,
                StepStatus::CompensationFailed | StepStatus::ConfirmFailed
            )));
        }
        _ => {}
    }
    Ok(())
}

proptest! {
    // 2,000 cases by default; PROPTEST_CASES=200000 for a long soak.
    #![proptest_config(ProptestConfig::with_cases(
        std::env::var("PROPTEST_CASES").ok().and_then(|s| s.parse().ok()).unwrap_or(2000)
    ))]
    #[test]
    fn random_executions_end_terminal_and_keep_the_guarantees(case in arb_case()) {
        run(case)?;
    }
}
