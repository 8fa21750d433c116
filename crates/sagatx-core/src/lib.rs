//! The pure model of sagatx: no I/O, no clock, no randomness inside.
//!
//! - [`SagaDefinition`]: a saga's steps, how they are called, retried and
//!   timed out; parsed and validated from the JSON of API.md §1.
//! - [`Execution`]: the state of one run of a saga, the unit the journal
//!   stores, with its serialised form ([`Execution::to_raw`],
//!   [`Execution::from_raw`]) and its public view ([`Execution::view`]).
//! - [`Execution::handle`]: the state machine. An [`Event`] in, the next
//!   state and the [`Call`]s to make out; time and random draws come in
//!   through [`Env`].
//! - [`RetryPolicy`]: exponential, capped backoff with bounded jitter.
//! - [`StepError`] with its [`ErrorClass`], and the [`SagaError`] a caller
//!   receives when a saga did not complete.
//!
//! ```
//! use sagatx_core::*;
//! use serde_json::json;
//!
//! let def = SagaDefinition::from_json(br#"{"name": "order", "steps": [
//!     {"name": "reserve", "action": "local", "compensation": "local"},
//!     {"name": "charge", "action": "local"}]}"#).unwrap();
//! let id = ExecutionId(uuid::Uuid::from_u128(1));
//! let mut ex = Execution::new(id, &def, 1, json!({"order": 7}), None, 0);
//! let env = Env { now_ms: 0, random01: 0.5 };
//!
//! // Start: the first action is to be called (after the state is journaled).
//! let t = ex.handle(&def, Event::Start, env).unwrap();
//! assert_eq!(t.calls, vec![Call { step: 0, phase: Phase::Action, attempt: 1 }]);
//!
//! // It succeeds; the second is rejected: the first is compensated.
//! ex.handle(&def, Event::Outcome { step: 0, phase: Phase::Action, attempt: 1,
//!     outcome: Ok(json!("r-1")) }, env).unwrap();
//! let t = ex.handle(&def, Event::Outcome { step: 1, phase: Phase::Action, attempt: 1,
//!     outcome: Err(StepError::permanent("card declined")) }, env).unwrap();
//! assert_eq!(t.calls, vec![Call { step: 0, phase: Phase::Compensation, attempt: 1 }]);
//! assert_eq!(ex.status, Status::Compensating);
//! ```

pub mod definition;
pub mod error;
pub mod execution;
mod journal;
pub mod machine;
mod name;
pub mod retry;
mod view;

pub use definition::{
    DefinitionError, Endpoint, HttpEndpoint, Mode, Phase, ReplyMode, SagaDefinition, StepDefinition,
};
pub use error::{CompensationOutcome, ErrorClass, SagaError, StepError};
pub use execution::{
    Attempt, Awaiting, CallOutcome, DecodeError, Execution, ExecutionId, ExecutionView, Failure,
    Reply, Status, StepState, StepStatus, FORMAT_VERSION, HISTORY_CAP,
};
pub use machine::{Call, Conflict, Env, Event, Transition};
pub use name::Name;
pub use retry::{RetryOverride, RetryPolicy};
pub use uuid;
