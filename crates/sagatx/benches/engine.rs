//! Micro-benchmark of the engine's in-memory path: `Engine::run` of a
//! 3-step saga of local no-op steps on a `MemoryStore` (keeping the last
//! 1,000 finished executions), on a one-thread runtime, so that the figure
//! is the engine's own cost per saga with nothing else in the way.
//! `Saga::execute` of the same sagas beside it.
//! `cargo bench -p sagatx --bench engine`; not run by the test suite.

#![allow(clippy::unwrap_used)]

use divan::Bencher;
use sagatx::{Engine, MemoryStore, Mode, Saga, Status, StepContext, StepError};
use serde_json::Value;

/// Counts allocations too: they are most of the cost.
#[global_allocator]
static ALLOC: divan::AllocProfiler = divan::AllocProfiler::system();

fn main() {
    divan::main();
}

async fn noop(_: StepContext) -> Result<(), StepError> {
    Ok(())
}

async fn reject(_: StepContext) -> Result<(), StepError> {
    Err(StepError::permanent("rejected"))
}

fn saga(name: &str, mode: Mode, fail_third: bool) -> Saga {
    let b = Saga::builder(name)
        .mode(mode)
        .step("a", noop)
        .compensate(noop)
        .step("b", noop)
        .compensate(noop);
    let b = if fail_third {
        b.step("c", reject)
    } else {
        b.step("c", noop)
    };
    b.build().unwrap()
}

/// One saga start to end: `ok` (3 steps), `fail` (3rd rejected, 2
/// compensations), `concurrent` (3 steps at once).
#[divan::bench(args = ["ok", "fail", "concurrent"], sample_count = 50, sample_size = 1000)]
fn run(b: Bencher, which: &str) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let engine = rt.block_on(async {
        Engine::builder()
            .store(MemoryStore::with_retention(1_000))
            .saga(saga("ok", Mode::Sequential, false))
            .saga(saga("fail", Mode::Sequential, true))
            .saga(saga("concurrent", Mode::Concurrent, false))
            .build()
            .await
            .unwrap()
    });
    let expect = if which == "fail" {
        Status::Compensated
    } else {
        Status::Completed
    };
    b.bench_local(|| {
        let ex = rt.block_on(engine.run(which, Value::Null)).unwrap();
        assert_eq!(ex.status, expect);
    });
}

/// The same sagas run by `Saga::execute`: nothing journaled, no engine.
#[divan::bench(args = ["ok", "fail", "concurrent"], sample_count = 50, sample_size = 1000)]
fn execute(b: Bencher, which: &str) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let s = match which {
        "ok" => saga("ok", Mode::Sequential, false),
        "fail" => saga("fail", Mode::Sequential, true),
        _ => saga("concurrent", Mode::Concurrent, false),
    };
    b.bench_local(|| {
        let r = rt.block_on(s.execute(Value::Null));
        assert_eq!(r.is_ok(), which != "fail");
    });
}
