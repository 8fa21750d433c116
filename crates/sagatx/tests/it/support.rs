//! Helpers shared by the tests: a log of the calls steps receive, and
//! steps whose behaviour is scripted.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use sagatx::{Phase, StepContext, StepError};
use serde_json::{json, Value};

/// One call a step function received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seen {
    pub execution: String,
    pub step: String,
    pub phase: Phase,
    pub attempt: u32,
}

/// What a scripted call does.
#[derive(Debug, Clone)]
#[allow(dead_code)]
pub enum Do {
    Ok,
    Transient,
    Permanent,
}

type Script = HashMap<(String, Phase, u32), Do>;

/// Records calls and plays a script: `(step, phase, attempt) → Do`;
/// unscripted calls succeed with `{"step": .., "attempt": ..}`.
#[derive(Clone, Default)]
pub struct Recorder {
    pub calls: Arc<Mutex<Vec<Seen>>>,
    script: Arc<Mutex<Script>>,
}

impl Recorder {
    pub fn script(&self, step: &str, phase: Phase, attempt: u32, what: Do) {
        self.script
            .lock()
            .expect("lock")
            .insert((step.to_string(), phase, attempt), what);
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.calls.lock().expect("lock").clone()
    }

    /// `step/phase` of every call, in order.
    pub fn trail(&self) -> Vec<String> {
        self.seen()
            .iter()
            .map(|s| format!("{}/{}", s.step, s.phase))
            .collect()
    }

    pub fn record(&self, ctx: &StepContext) -> Result<Value, StepError> {
        self.calls.lock().expect("lock").push(Seen {
            execution: ctx.execution_id().to_string(),
            step: ctx.step().to_string(),
            phase: ctx.phase(),
            attempt: ctx.attempt(),
        });
        let what = self
            .script
            .lock()
            .expect("lock")
            .get(&(ctx.step().to_string(), ctx.phase(), ctx.attempt()))
            .cloned()
            .unwrap_or(Do::Ok);
        match what {
            Do::Ok => Ok(json!({"step": ctx.step(), "attempt": ctx.attempt()})),
            Do::Transient => Err(StepError::transient("HTTP 503")),
            Do::Permanent => Err(StepError::permanent("HTTP 402: card declined")),
        }
    }

    /// A step function that records and plays the script.
    pub fn step(
        &self,
    ) -> impl Fn(
        StepContext,
    ) -> std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Value, StepError>> + Send>,
    > + Send
           + Sync
           + 'static {
        let r = self.clone();
        move |ctx| {
            let out = r.record(&ctx);
            Box::pin(async move { out })
        }
    }
}

/// reserve, charge, ship: each step and compensation records and plays the
/// script.
pub fn three(rec: &Recorder, name: &str) -> sagatx::Saga {
    sagatx::Saga::builder(name)
        .step("reserve", rec.step())
        .compensate(rec.step())
        .step("charge", rec.step())
        .compensate(rec.step())
        .step("ship", rec.step())
        .compensate(rec.step())
        .build()
        .expect("valid saga")
}

/// A new execution of version 1 of `def`, started (its first call
/// journaled) and numbered as its first write, as a store receives it.
pub fn started(def: &sagatx::core::SagaDefinition) -> sagatx::core::Execution {
    use sagatx::core::{Env, Event, Execution, ExecutionId};
    let env = Env {
        now_ms: 1,
        random01: 0.5,
    };
    let mut ex = Execution::new(
        ExecutionId(uuid::Uuid::now_v7()),
        def,
        1,
        json!({}),
        None,
        1,
    );
    ex.handle(def, Event::Start, env).expect("start");
    ex.seq = 1;
    ex
}
