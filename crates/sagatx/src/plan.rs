//! A saga version as the engine runs it: the definition, and what the
//! engine derives from it once instead of on every call (the names as
//! shared strings for step contexts and metric labels, and the metric
//! handles).
//!
//! Metric handles are made on first use and kept for as long as the
//! process's metrics recorder stays the same one: a recorder installed
//! later (or a thread's local recorder in a test) gets handles of its own,
//! so no count is ever sent to a recorder that is gone.

use std::collections::HashMap;
use std::ops::Deref;
use std::sync::{Arc, OnceLock, RwLock};

use metrics::{Counter, Histogram, Label};
use sagatx_core::{ErrorClass, Name, Phase, SagaDefinition, Status};

use crate::saga::Handlers;

pub(crate) struct Plan {
    def: SagaDefinition,
    /// The saga's name.
    pub(crate) saga_name: Name,
    /// Each step's name, by index.
    pub(crate) step_names: Box<[Name]>,
    first: OnceLock<Handles>,
    later: RwLock<Option<Arc<Handles>>>,
    /// This process's functions for each step, by index.
    local: OnceLock<Box<[Option<Handlers>]>>,
}

impl Deref for Plan {
    type Target = SagaDefinition;
    fn deref(&self) -> &SagaDefinition {
        &self.def
    }
}

/// How a call ended, for `sagatx_step_attempts_total{outcome}`: `ok` or
/// its error's class.
pub(crate) fn outcome_label(outcome: Option<ErrorClass>) -> &'static str {
    outcome.map_or("ok", ErrorClass::as_str)
}

const OUTCOMES: [&str; 4] = ["ok", "transient", "permanent", "unknown_outcome"];
const PHASES: [Phase; 3] = [Phase::Action, Phase::Compensation, Phase::Confirm];
const FINAL: [Status; 3] = [Status::Completed, Status::Compensated, Status::Failed];

fn phase_index(p: Phase) -> usize {
    match p {
        Phase::Action => 0,
        Phase::Compensation => 1,
        Phase::Confirm => 2,
    }
}

/// The handles of one recorder.
struct Handles {
    recorder: usize,
    started: OnceLock<Counter>,
    /// By step and phase: the duration histogram and a counter per outcome.
    calls: Box<[CallHandles]>,
    /// By terminal status: the finished counter and the duration histogram.
    finished: [OnceLock<(Counter, Histogram)>; 3],
}

#[derive(Default)]
struct CallHandles {
    duration: OnceLock<Histogram>,
    outcomes: [OnceLock<Counter>; 4],
}

/// Which recorder the metrics macros would use on this thread now.
fn recorder_id() -> usize {
    metrics::with_recorder(|r| r as *const dyn metrics::Recorder as *const () as usize)
}

impl Plan {
    pub(crate) fn new(def: SagaDefinition) -> Self {
        Plan {
            saga_name: Name::from(&def.name),
            step_names: def.steps.iter().map(|s| Name::from(&s.name)).collect(),
            def,
            first: OnceLock::new(),
            later: RwLock::new(None),
            local: OnceLock::new(),
        }
    }

    /// This process's functions for each step, by index, found once in
    /// `by_name` (the functions registered for the saga, by step name)
    /// rather than by hashing the step's name at every call. The functions
    /// are registered when the engine is built, before any plan is used.
    pub(crate) fn local(
        &self,
        by_name: impl FnOnce() -> Option<Arc<HashMap<String, Handlers>>>,
    ) -> &[Option<Handlers>] {
        self.local.get_or_init(|| {
            let by_name = by_name();
            self.def
                .steps
                .iter()
                .map(|s| by_name.as_ref().and_then(|m| m.get(&s.name)).cloned())
                .collect()
        })
    }

    /// Runs `f` with the handles of the recorder in use. Those of the
    /// first recorder seen are read without a lock (most processes have
    /// one recorder; a lock word written by every call would bounce between
    /// cores); another recorder's are kept behind a lock.
    fn with_handles<R>(&self, f: impl FnOnce(&Handles) -> R) -> R {
        let id = recorder_id();
        let first = self.first.get_or_init(|| self.new_handles(id));
        if first.recorder == id {
            return f(first);
        }
        let later = {
            let read = self.later.read().unwrap_or_else(|p| p.into_inner());
            read.as_ref().filter(|h| h.recorder == id).cloned()
        };
        let h = match later {
            Some(h) => h,
            None => {
                // A poisoned lock still holds a whole value (it is only
                // ever replaced at once).
                let mut slot = self.later.write().unwrap_or_else(|p| p.into_inner());
                match slot.as_ref().filter(|h| h.recorder == id) {
                    Some(h) => h.clone(),
                    None => {
                        let h = Arc::new(self.new_handles(id));
                        *slot = Some(h.clone());
                        h
                    }
                }
            }
        };
        f(&h)
    }

    fn new_handles(&self, recorder: usize) -> Handles {
        Handles {
            recorder,
            started: OnceLock::new(),
            calls: (0..self.step_names.len() * PHASES.len())
                .map(|_| CallHandles::default())
                .collect(),
            finished: Default::default(),
        }
    }

    fn saga_label(&self) -> Label {
        Label::new("saga", self.saga_name.to_string())
    }

    /// `sagatx_executions_started_total{saga}`.
    pub(crate) fn started(&self) {
        self.with_handles(|h| {
            h.started
                .get_or_init(|| {
                    metrics::counter!("sagatx_executions_started_total", vec![self.saga_label()])
                })
                .increment(1)
        });
    }

    /// `sagatx_step_duration_seconds{saga,step,phase}` and
    /// `sagatx_step_attempts_total{saga,step,phase,outcome}`.
    pub(crate) fn call(&self, step: usize, phase: Phase, outcome: &'static str, seconds: f64) {
        self.with_handles(|h| {
            let Some(c) = h.calls.get(step * PHASES.len() + phase_index(phase)) else {
                return;
            };
            let labels = || {
                vec![
                    self.saga_label(),
                    Label::new("step", self.step_names[step].to_string()),
                    Label::new("phase", phase.as_str()),
                ]
            };
            c.duration
                .get_or_init(|| metrics::histogram!("sagatx_step_duration_seconds", labels()))
                .record(seconds);
            let l = || {
                let mut l = labels();
                l.push(Label::new("outcome", outcome));
                l
            };
            match OUTCOMES.iter().position(|o| *o == outcome) {
                Some(i) => c.outcomes[i]
                    .get_or_init(|| metrics::counter!("sagatx_step_attempts_total", l()))
                    .increment(1),
                // An outcome this table does not know yet: not cached.
                None => metrics::counter!("sagatx_step_attempts_total", l()).increment(1),
            }
        })
    }

    /// `sagatx_executions_finished_total{saga,status}` and
    /// `sagatx_execution_duration_seconds{saga,status}`.
    pub(crate) fn finished(&self, status: Status, seconds: f64) {
        let Some(i) = FINAL.iter().position(|s| *s == status) else {
            return;
        };
        self.with_handles(|h| {
            let (count, duration) = h.finished[i].get_or_init(|| {
                let labels = vec![self.saga_label(), Label::new("status", status.as_str())];
                (
                    metrics::counter!("sagatx_executions_finished_total", labels.clone()),
                    metrics::histogram!("sagatx_execution_duration_seconds", labels),
                )
            });
            count.increment(1);
            duration.record(seconds);
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use metrics_util::debugging::{DebugValue, DebuggingRecorder};

    fn plan() -> Plan {
        let def: SagaDefinition = serde_json::from_value(serde_json::json!({
            "name": "order",
            "steps": [{"name": "reserve", "action": {"url": "http://127.0.0.1:1/a"}}]
        }))
        .expect("definition");
        Plan::new(def)
    }

    fn counts(r: &DebuggingRecorder) -> Vec<(String, Vec<String>, u64)> {
        let mut v: Vec<_> = r
            .snapshotter()
            .snapshot()
            .into_vec()
            .into_iter()
            .filter_map(|(k, _, _, v)| match v {
                DebugValue::Counter(n) => Some((
                    k.key().name().to_string(),
                    k.key()
                        .labels()
                        .map(|l| format!("{}={}", l.key(), l.value()))
                        .collect(),
                    n,
                )),
                _ => None,
            })
            .collect();
        v.sort();
        v
    }

    /// Handles follow the recorder: counts made under one recorder go to
    /// it, and a recorder that comes later gets its own, with the labels
    /// the macros would have given.
    #[test]
    fn handles_are_kept_per_recorder_with_the_right_labels() {
        let p = plan();
        let first = DebuggingRecorder::new();
        metrics::with_local_recorder(&first, || {
            p.started();
            p.call(0, Phase::Action, outcome_label(None), 0.001);
            p.call(0, Phase::Action, outcome_label(None), 0.001);
            p.call(
                0,
                Phase::Action,
                outcome_label(Some(ErrorClass::Transient)),
                0.001,
            );
            p.finished(Status::Completed, 0.5);
        });
        let second = DebuggingRecorder::new();
        metrics::with_local_recorder(&second, || p.started());
        assert_eq!(
            counts(&first),
            vec![
                (
                    "sagatx_executions_finished_total".to_string(),
                    vec!["saga=order".to_string(), "status=completed".to_string()],
                    1
                ),
                (
                    "sagatx_executions_started_total".to_string(),
                    vec!["saga=order".to_string()],
                    1
                ),
                (
                    "sagatx_step_attempts_total".to_string(),
                    vec![
                        "saga=order".to_string(),
                        "step=reserve".to_string(),
                        "phase=action".to_string(),
                        "outcome=ok".to_string()
                    ],
                    2
                ),
                (
                    "sagatx_step_attempts_total".to_string(),
                    vec![
                        "saga=order".to_string(),
                        "step=reserve".to_string(),
                        "phase=action".to_string(),
                        "outcome=transient".to_string()
                    ],
                    1
                ),
            ]
        );
        assert_eq!(
            counts(&second),
            vec![(
                "sagatx_executions_started_total".to_string(),
                vec!["saga=order".to_string()],
                1
            )]
        );
    }
}
