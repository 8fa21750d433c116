//! Micro-benchmark of the engine's in-memory path: `Engine::run` of a
//! 3-step saga of local no-op steps on a `MemoryStore` (keeping the last
//! 1,000 finished executions), on a one-thread runtime, so that the figure
//! is the engine's own cost per saga with nothing else in the way.
//! `Saga::execute` of the same sagas beside it, and a two-phase commit
//! over no-op data managers (`transaction`).
//! `cargo bench -p sagatx --bench engine`; not run by the test suite.

#![allow(clippy::unwrap_used)]

use std::sync::Arc;

use divan::Bencher;
use sagatx::transaction::{
    DataManager, SyncDataManager, TransactionManager, TxError, TxInfo, TxStatus,
};
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

/// A data manager that does nothing: what is left is the transaction's
/// own cost. Synchronous, as the `transaction` package's are.
struct NoopDm(&'static str);

impl SyncDataManager for NoopDm {
    fn sort_key(&self) -> String {
        self.0.to_string()
    }
    fn abort(&self, _: &TxInfo) -> Result<(), TxError> {
        Ok(())
    }
    fn tpc_begin(&self, _: &TxInfo) -> Result<(), TxError> {
        Ok(())
    }
    fn commit(&self, _: &TxInfo) -> Result<(), TxError> {
        Ok(())
    }
    fn tpc_vote(&self, _: &TxInfo) -> Result<(), TxError> {
        Ok(())
    }
    fn tpc_finish(&self, _: &TxInfo) -> Result<(), TxError> {
        Ok(())
    }
    fn tpc_abort(&self, _: &TxInfo) -> Result<(), TxError> {
        Ok(())
    }
}

/// Begin (through a manager, as `sagatx bench`'s tx rows and the
/// `transaction` package do), join `managers` no-op data managers with
/// `join_sync`, commit.
#[divan::bench(args = [1, 3], sample_count = 50, sample_size = 1000)]
fn transaction(b: Bencher, managers: usize) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let dms: Vec<Arc<dyn SyncDataManager>> = ["a", "b", "c"]
        .into_iter()
        .take(managers)
        .map(|k| Arc::new(NoopDm(k)) as Arc<dyn SyncDataManager>)
        .collect();
    let tm = TransactionManager::new();
    b.bench_local(|| {
        let tx = tm.begin();
        for dm in &dms {
            tx.join_sync(dm.clone()).unwrap();
        }
        rt.block_on(tx.commit()).unwrap();
        assert_eq!(tx.status(), TxStatus::Committed);
    });
}

/// The same with one manager joined as a `DataManager` (`join`): each of
/// its four calls makes a boxed future, as an `async_trait` manager's do.
#[divan::bench(sample_count = 50, sample_size = 1000)]
fn transaction_async_manager(b: Bencher) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let dm: Arc<dyn DataManager> = Arc::new(NoopDm("a"));
    let tm = TransactionManager::new();
    b.bench_local(|| {
        let tx = tm.begin();
        tx.join(dm.clone()).unwrap();
        rt.block_on(tx.commit()).unwrap();
        assert_eq!(tx.status(), TxStatus::Committed);
    });
}
