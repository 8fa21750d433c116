//! Journal writes that fail: the engine reads the journaled state back
//! before it goes on, retries what it produced itself, and never calls a
//! step twice because of a write whose answer was lost.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use sagatx::store::{ListQuery, OpRecord, Page, Registered, Summary};
use sagatx::{
    Engine, EngineError, Execution, ExecutionId, MemoryStore, Saga, SagaDefinition, StartOptions,
    Status, Store, StoreError,
};
use serde_json::json;

use crate::support::{three, Recorder};

/// What the next journal writes do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    /// Fails without writing.
    Refuse,
    /// Writes, then fails as if the answer was lost on the way back.
    LoseAnswer,
}

/// A memory store whose appends fail as scripted: the `n`-th append from
/// now (counting from 1) gets the fault.
#[derive(Default)]
struct FaultyStore {
    inner: MemoryStore,
    appends: AtomicUsize,
    faults: Mutex<Vec<(usize, Fault)>>,
    /// Fail every `load` while set (the store is unreachable).
    loads_fail: std::sync::atomic::AtomicBool,
}

impl FaultyStore {
    fn fail(&self, nth_from_now: usize, fault: Fault) {
        let at = self.appends.load(Ordering::SeqCst) + nth_from_now;
        self.faults.lock().expect("lock").push((at, fault));
    }
}

fn down() -> StoreError {
    StoreError::Io("injected: the disk is unreachable".into())
}

#[async_trait]
impl Store for FaultyStore {
    async fn put_definition(&self, def: &SagaDefinition) -> Result<Registered, StoreError> {
        self.inner.put_definition(def).await
    }
    async fn get_definition(
        &self,
        name: &str,
        version: Option<u32>,
    ) -> Result<Option<(u32, SagaDefinition)>, StoreError> {
        self.inner.get_definition(name, version).await
    }
    async fn list_definitions(&self) -> Result<Vec<(String, u32)>, StoreError> {
        self.inner.list_definitions().await
    }
    async fn append(&self, ex: &Execution) -> Result<(), StoreError> {
        let n = self.appends.fetch_add(1, Ordering::SeqCst) + 1;
        let fault = {
            let mut f = self.faults.lock().expect("lock");
            let hit = f.iter().position(|(at, _)| *at == n);
            hit.map(|i| f.remove(i).1)
        };
        match fault {
            Some(Fault::Refuse) => Err(down()),
            Some(Fault::LoseAnswer) => {
                self.inner.append(ex).await?;
                Err(down())
            }
            None => self.inner.append(ex).await,
        }
    }
    async fn load(&self, id: ExecutionId) -> Result<Option<Execution>, StoreError> {
        if self.loads_fail.load(Ordering::SeqCst) {
            return Err(down());
        }
        self.inner.load(id).await
    }
    async fn list(&self, query: &ListQuery) -> Result<Page, StoreError> {
        self.inner.list(query).await
    }
    async fn due(&self, now_ms: u64, limit: usize) -> Result<Vec<ExecutionId>, StoreError> {
        self.inner.due(now_ms, limit).await
    }
    async fn secret(&self) -> Result<[u8; 32], StoreError> {
        self.inner.secret().await
    }
    async fn op_record(
        &self,
        name: &str,
        args: &serde_json::Value,
        now_ms: u64,
    ) -> Result<u64, StoreError> {
        self.inner.op_record(name, args, now_ms).await
    }
    async fn op_finish(&self, id: u64, error: Option<&str>, now_ms: u64) -> Result<(), StoreError> {
        self.inner.op_finish(id, error, now_ms).await
    }
    async fn op_pending(
        &self,
        after: Option<u64>,
        limit: usize,
    ) -> Result<Vec<OpRecord>, StoreError> {
        self.inner.op_pending(after, limit).await
    }
    async fn summary(&self) -> Result<Summary, StoreError> {
        self.inner.summary().await
    }
    async fn paused_before(
        &self,
        before_ms: u64,
        limit: usize,
    ) -> Result<Vec<sagatx::Paused>, StoreError> {
        self.inner.paused_before(before_ms, limit).await
    }
    async fn scan(&self, cursor: Option<u64>, limit: usize) -> Result<Page, StoreError> {
        self.inner.scan(cursor, limit).await
    }
    async fn import(&self, ex: &Execution) -> Result<(), StoreError> {
        self.inner.import(ex).await
    }
    async fn import_secret(&self, secret: [u8; 32]) -> Result<(), StoreError> {
        self.inner.import_secret(secret).await
    }
    async fn unfinished(&self, cursor: Option<u64>, limit: usize) -> Result<Page, StoreError> {
        self.inner.unfinished(cursor, limit).await
    }
}

async fn engine(store: Arc<FaultyStore>, rec: &Recorder) -> Engine {
    Engine::builder()
        .store_arc(store)
        .saga(three(rec, "order"))
        .build()
        .await
        .expect("engine")
}

/// Writes of the outcomes of `reserve` (2nd append) and `charge` (3rd)
/// fail: the first is refused, the second commits but its answer is lost.
/// Each step is still called exactly once, and the journal ends completed
/// with one transition per step.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_writes_of_outcomes_are_retried_and_lost_answers_recognised() {
    let store = Arc::new(FaultyStore::default());
    let rec = Recorder::default();
    let engine = engine(store.clone(), &rec).await;
    store.fail(2, Fault::Refuse);
    store.fail(3, Fault::LoseAnswer);
    let ex = tokio::time::timeout(Duration::from_secs(10), engine.run("order", json!({})))
        .await
        .expect("finishes despite the failed writes")
        .expect("run");
    assert_eq!(ex.status, Status::Completed);
    assert_eq!(
        rec.trail(),
        ["reserve/action", "charge/action", "ship/action"],
        "no step is called twice"
    );
    let stored = engine.get(ex.id).await.expect("stored");
    assert_eq!(stored, ex, "the journal holds what the caller was given");
    // Start, the three outcomes: four transitions, whatever failed.
    assert_eq!(stored.seq, 4);
    assert_eq!(stored.steps.iter().map(|s| s.attempts).sum::<u32>(), 3);
}

/// A write that fails while the store cannot even be read: the engine
/// keeps trying until the store is back, then finishes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreadable_store_is_waited_for() {
    let store = Arc::new(FaultyStore::default());
    let rec = Recorder::default();
    let engine = engine(store.clone(), &rec).await;
    store.fail(2, Fault::LoseAnswer);
    store.loads_fail.store(true, Ordering::SeqCst);
    let run = tokio::spawn({
        let engine = engine.clone();
        async move { engine.run("order", json!({})).await }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !run.is_finished(),
        "nothing goes on while the journal is unknown"
    );
    assert_eq!(rec.trail(), ["reserve/action"]);
    store.loads_fail.store(false, Ordering::SeqCst);
    let ex = tokio::time::timeout(Duration::from_secs(10), run)
        .await
        .expect("finishes once the store is back")
        .expect("task")
        .expect("run");
    assert_eq!(ex.status, Status::Completed);
    assert_eq!(
        rec.trail(),
        ["reserve/action", "charge/action", "ship/action"]
    );
}

/// An operator's cancel whose write is refused gets the error, and the
/// execution goes on from its journaled state: a second cancel works and
/// compensates what was done.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_write_of_a_cancel_leaves_the_journaled_state() {
    let store = Arc::new(FaultyStore::default());
    let rec = Recorder::default();
    let saga = Saga::builder("held")
        .step("reserve", rec.step())
        .compensate(rec.step())
        .step("wait", |_ctx| async {
            tokio::time::sleep(Duration::from_millis(400)).await;
            Ok::<_, sagatx::StepError>(json!("late"))
        })
        .build()
        .expect("valid saga");
    let engine = Engine::builder()
        .store_arc(store.clone())
        .saga(saga)
        .build()
        .await
        .expect("engine");
    let id = engine
        .start_with("held", json!({}), StartOptions::default())
        .await
        .expect("start");
    // Wait until `wait` is under way.
    for _ in 0..100 {
        let ex = engine.get(id).await.expect("get");
        if ex.steps[1].in_flight.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    store.fail(1, Fault::Refuse);
    let err = engine.cancel(id).await.expect_err("the write was refused");
    assert!(
        matches!(err, EngineError::Store(StoreError::Io(_))),
        "{err:?}"
    );
    let journaled = engine.get(id).await.expect("get");
    assert_eq!(
        journaled.status,
        Status::Running,
        "the cancel was not journaled"
    );
    let ex = engine
        .cancel(id)
        .await
        .expect("the second cancel is journaled");
    assert_eq!(ex.status, Status::Compensating);
    let ex = engine.wait(id).await.expect("wait");
    assert_eq!(ex.status, Status::Compensated);
    assert_eq!(rec.trail(), ["reserve/action", "reserve/compensation"]);
    assert_eq!(
        ex.failure.as_ref().map(|f| f.message.as_str()),
        Some("cancelled")
    );
    assert_eq!(ex.steps[0].compensation_attempts, 1);
}
