//! Durable sagas for Rust.
//!
//! - [`Saga`]: a saga of async step functions, built with
//!   `Saga::builder("order").step("reserve", reserve).compensate(release)…`
//!   (or plain functions with `step_sync`, called with no future);
//!   [`Saga::execute`] runs one here and now with nothing journaled
//!   (py-api-saga's `execute()`). A step reads the input and the
//!   [`Results`] of the steps before it in its [`StepContext`].
//! - [`Engine`]: runs executions of registered sagas on a [`Store`]:
//!   [`start`](Engine::start), [`wait`](Engine::wait), [`reply`](Engine::reply)
//!   to a step that waits for a remote reply, [`commit`](Engine::commit) /
//!   [`reject`](Engine::reject), [`cancel`](Engine::cancel),
//!   [`retry`](Engine::retry), [`get`](Engine::get), [`list`](Engine::list),
//!   and [`recover`](Engine::recover) after a restart.
//! - [`store`]: the journal trait with [`MemoryStore`] and [`SqliteStore`].
//!
//! Every state change is journaled before anything that depends on it
//! happens; see `docs/guarantees.md`.
//!
//! ```
//! use sagatx::{Engine, Saga, SqliteStore, StepContext, StepError, Status};
//! use serde_json::json;
//!
//! async fn reserve(_: StepContext) -> Result<&'static str, StepError> { Ok("r-1") }
//! async fn release(_: StepContext) -> Result<(), StepError> { Ok(()) }
//! async fn charge(_: StepContext) -> Result<(), StepError> {
//!     Err(StepError::permanent("card declined"))
//! }
//!
//! # tokio::runtime::Runtime::new().unwrap().block_on(async {
//! let dir = tempfile::tempdir().unwrap();
//! let engine = Engine::builder()
//!     .store(SqliteStore::open(dir.path().join("sagatx.db")).unwrap())
//!     .saga(Saga::builder("order")
//!         .step("reserve", reserve).compensate(release)
//!         .step("charge", charge)
//!         .build().unwrap())
//!     .build().await.unwrap();
//! engine.recover().await.unwrap();
//!
//! let ex = engine.run("order", json!({"order_id": 7})).await.unwrap();
//! assert_eq!(ex.status, Status::Compensated);
//! let err = ex.saga_error().unwrap();
//! assert_eq!(err.step.as_deref(), Some("charge"));
//! assert_eq!(err.message, "card declined");
//! # });
//! ```

pub mod barrier;
mod engine;
mod execute;
mod idmap;
pub mod oplog;
mod plan;
mod results;
mod saga;
pub mod store;
mod throttle;
pub mod transaction;

pub use engine::{
    Engine, EngineBuilder, EngineError, RecoveryReport, RemoteCaller, StartOptions, Started,
    StatusHook, DEFAULT_MAX_ACTIVE,
};
pub use results::{Results, ResultsIter};
pub use saga::{Saga, SagaBuilder, StepContext, StepFn, StepFuture, SyncStepFn};
pub use sagatx_core::{
    self as core, Awaiting, CompensationOutcome, ErrorClass, Execution, ExecutionId, Mode, Phase,
    Reply, RetryPolicy, SagaDefinition, SagaError, Status, StepError, StepStatus,
};
pub use store::{ListQuery, MemoryStore, Page, Paused, SqliteStore, Store, StoreError};

/// Wall-clock milliseconds since the Unix epoch, for records (the engine's
/// timers use tokio's clock).
pub(crate) fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
