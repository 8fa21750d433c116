//! Micro-benchmarks of the model's hot paths, found by profiling the
//! `memory` and `sqlite` workloads of `sagatx bench`: one transition of the
//! state machine, and the journal entry's encoding and decoding.
//! `cargo bench -p sagatx-core`; not run by the test suite.

#![allow(clippy::unwrap_used)]

use divan::{black_box, Bencher};
use sagatx_core::{Env, Event, Execution, ExecutionId, SagaDefinition};
use serde_json::json;

fn main() {
    divan::main();
}

fn definition(steps: usize) -> SagaDefinition {
    let steps: Vec<_> = (0..steps)
        .map(|i| {
            json!({"name": format!("s{i}"), "action": {"url": "http://127.0.0.1:9/a"},
                        "compensation": {"url": "http://127.0.0.1:9/c"}})
        })
        .collect();
    SagaDefinition::from_json(json!({"name": "b", "steps": steps}).to_string().as_bytes()).unwrap()
}

const ENV: Env = Env {
    now_ms: 1_700_000_000_000,
    random01: 0.5,
};

fn started(def: &SagaDefinition) -> (Execution, sagatx_core::Call) {
    let mut ex = Execution::new(
        ExecutionId(uuid::Uuid::from_u128(7)),
        def,
        1,
        json!({"order": 1}),
        None,
        ENV.now_ms,
    );
    let t = ex.handle(def, Event::Start, ENV).unwrap();
    (ex, t.calls[0])
}

/// Start, then one successful outcome per step: a whole 3-step saga
/// through the machine, no I/O.
#[divan::bench]
fn saga_of_three_steps(b: Bencher) {
    let def = definition(3);
    b.bench(|| {
        let (mut ex, mut call) = started(&def);
        loop {
            let t = ex
                .handle(
                    &def,
                    Event::Outcome {
                        step: call.step,
                        phase: call.phase,
                        attempt: call.attempt,
                        outcome: Ok(json!(1)),
                    },
                    ENV,
                )
                .unwrap();
            match t.calls.first() {
                Some(c) => call = *c,
                None => break,
            }
        }
        black_box(ex)
    });
}

/// One transition: the outcome of the first step.
#[divan::bench(args = [3, 10])]
fn one_transition(b: Bencher, steps: usize) {
    let def = definition(steps);
    let (ex, call) = started(&def);
    b.with_inputs(|| ex.clone()).bench_local_values(|mut ex| {
        ex.handle(
            &def,
            Event::Outcome {
                step: call.step,
                phase: call.phase,
                attempt: call.attempt,
                outcome: Ok(json!(1)),
            },
            ENV,
        )
        .unwrap();
        ex
    });
}

/// The journal entry of a 3-step execution, encoded.
#[divan::bench]
fn encode(b: Bencher) {
    let def = definition(3);
    let (ex, _) = started(&def);
    b.bench(|| black_box(&ex).to_raw().unwrap());
}

/// The same entry, decoded (and checked).
#[divan::bench]
fn decode(b: Bencher) {
    let def = definition(3);
    let (ex, _) = started(&def);
    let raw = ex.to_raw().unwrap();
    b.bench(|| Execution::from_raw(black_box(&raw)).unwrap());
}
