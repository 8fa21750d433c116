//! Rust sagas: a builder of steps that are async functions, or plain
//! functions for work that never waits (`step_sync`).
//!
//! ```
//! use sagatx::{Saga, StepContext, StepError};
//! use serde_json::json;
//!
//! async fn reserve(ctx: StepContext) -> Result<serde_json::Value, StepError> {
//!     Ok(json!({"reservation": format!("r-{}", ctx.input()["order"])}))
//! }
//! async fn release(_ctx: StepContext) -> Result<(), StepError> { Ok(()) }
//! async fn charge(ctx: StepContext) -> Result<(), StepError> {
//!     // Earlier results are visible to later steps.
//!     let _reservation = &ctx.results()["reserve"];
//!     Err(StepError::permanent("card declined"))
//! }
//!
//! let saga = Saga::builder("order")
//!     .step("reserve", reserve).compensate(release)
//!     .step("charge", charge)
//!     .build()
//!     .unwrap();
//! assert_eq!(saga.definition().steps.len(), 2);
//! ```

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use sagatx_core::{
    DefinitionError, Endpoint, ExecutionId, Mode, Name, Phase, ReplyMode, RetryOverride,
    RetryPolicy, SagaDefinition, StepDefinition, StepError,
};
use serde::Serialize;
use serde_json::Value;

use crate::results::Results;

/// What a step function receives.
#[derive(Debug, Clone)]
pub struct StepContext {
    pub(crate) origin: Origin,
    pub(crate) phase: Phase,
    pub(crate) attempt: u32,
    pub(crate) user: Option<Arc<str>>,
    pub(crate) callback: bool,
}

/// Whose call a [`StepContext`] is for.
#[derive(Debug, Clone)]
pub(crate) enum Origin {
    /// An engine's execution.
    Journaled {
        id: ExecutionId,
        input: Arc<Value>,
        saga: Name,
        step: Name,
        /// The results the call sees.
        results: Arc<Results>,
    },
    /// A run of [`Saga::execute`](crate::Saga::execute), and the step's
    /// index. The names are reached through the run: a context costs no
    /// reference count that every run of the saga shares (on two cores,
    /// such counts pass between the cores at every call, and were why a
    /// second core added little).
    Local {
        run: Arc<LocalRun>,
        step: usize,
        /// The results the call sees when they are not the run's own
        /// (`None`): an action of a concurrent run sees those of the
        /// moment it was called.
        results: Option<Arc<Results>>,
    },
}

/// One run of [`Saga::execute`]: its input, its id, and the results of its
/// steps so far (which hold the saga's names). The id is made when a step
/// first asks for it: reading the wall clock for it cost more than a no-op
/// step (60-70 ns on a VM), and most steps never ask. The results are here
/// rather than behind an `Arc` of their own so that a call's context costs
/// one reference count, not two: each is an atomic operation, and they
/// were a good part of a no-op step's time.
#[derive(Debug)]
pub(crate) struct LocalRun {
    pub(crate) input: Value,
    pub(crate) id: std::sync::OnceLock<ExecutionId>,
    pub(crate) results: Results,
}

impl LocalRun {
    /// The run's id, made at the first call.
    fn id(&self) -> ExecutionId {
        *self
            .id
            .get_or_init(|| ExecutionId(crate::engine::new_id(crate::engine::wall_ms())))
    }
}

/// A copy is made only when a step's context outlives its call (a step
/// kept a clone) and the run must then change its results: the copy takes
/// the run's id, made now if no step asked for it yet, so that the kept
/// context and the run's later steps see the same id.
impl Clone for LocalRun {
    fn clone(&self) -> Self {
        LocalRun {
            input: self.input.clone(),
            id: std::sync::OnceLock::from(self.id()),
            results: self.results.clone(),
        }
    }
}

/// A saga's name and its steps' names, in step order.
#[derive(Debug)]
pub(crate) struct Names {
    pub(crate) saga: Name,
    pub(crate) steps: Box<[Name]>,
}

impl StepContext {
    pub fn execution_id(&self) -> ExecutionId {
        match &self.origin {
            Origin::Journaled { id, .. } => *id,
            Origin::Local { run, .. } => run.id(),
        }
    }
    pub fn saga(&self) -> &str {
        match &self.origin {
            Origin::Journaled { saga, .. } => saga,
            Origin::Local { run, .. } => &run.results.names().saga,
        }
    }
    pub fn step(&self) -> &str {
        match &self.origin {
            Origin::Journaled { step, .. } => step,
            // `step` is an index of the run's own saga (execute.rs).
            Origin::Local { run, step, .. } => {
                run.results.names().steps.get(*step).map_or("", |n| n)
            }
        }
    }
    /// `action`, `compensation` or `confirm`.
    pub fn phase(&self) -> Phase {
        self.phase
    }
    /// Counts from 1 within the phase, across crashes and retries.
    pub fn attempt(&self) -> u32 {
        self.attempt
    }
    /// The execution's input.
    pub fn input(&self) -> &Value {
        match &self.origin {
            Origin::Journaled { input, .. } => input,
            Origin::Local { run, .. } => &run.input,
        }
    }
    /// The results of every step that succeeded so far (py-api-saga's
    /// `saga_results`). A compensation sees its own step's result here.
    pub fn results(&self) -> &Results {
        match &self.origin {
            Origin::Journaled { results, .. } => results,
            Origin::Local {
                results: Some(results),
                ..
            } => results,
            Origin::Local { run, .. } => &run.results,
        }
    }
    /// The user recorded on the execution, if any.
    pub fn user(&self) -> Option<&str> {
        self.user.as_deref()
    }
    /// Whether this is the action of a `callback` step: its success only
    /// means "accepted", and the outcome comes later as a reply.
    pub fn is_callback(&self) -> bool {
        self.callback
    }

    /// A key that is the same on every attempt of this step's phase:
    /// `{execution_id}:{step}:{phase}`. Pass it to the services you call.
    pub fn idempotency_key(&self) -> String {
        // Put together by hand: `format!` took a thousand instructions per
        // step call (the coordinator sends this key with each).
        let mut buf = uuid::Uuid::encode_buffer();
        let id = self.execution_id().0.hyphenated().encode_lower(&mut buf);
        let (step, phase) = (self.step(), self.phase.as_str());
        let mut key = String::with_capacity(id.len() + step.len() + phase.len() + 2);
        for part in [&*id, ":", step, ":", phase] {
            key.push_str(part);
        }
        key
    }
}

/// The boxed future of a step call.
pub type StepFuture = Pin<Box<dyn Future<Output = Result<Value, StepError>> + Send>>;

/// Awaits a step call that was not done at its first poll: bounded by
/// `timeout` (running out is an unknown outcome), and a panic in user code
/// becomes an unknown outcome instead of unwinding through the caller.
pub(crate) async fn finish_call(
    fut: StepFuture,
    timeout: Option<std::time::Duration>,
) -> Result<Value, StepError> {
    use futures_util::FutureExt;
    let timed = async move {
        match timeout {
            Some(t) => match tokio::time::timeout(t, fut).await {
                Ok(r) => r,
                Err(_) => Err(StepError::unknown_outcome(format!(
                    "timed out after {} ms",
                    t.as_millis()
                ))),
            },
            None => fut.await,
        }
    };
    match std::panic::AssertUnwindSafe(timed).catch_unwind().await {
        Ok(r) => r,
        Err(_) => Err(StepError::unknown_outcome("the step panicked")),
    }
}

/// A step function, type-erased.
pub type StepFn = Arc<dyn Fn(StepContext) -> StepFuture + Send + Sync>;

fn erase<F, Fut, T>(f: F) -> StepFn
where
    F: Fn(StepContext) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<T, StepError>> + Send + 'static,
    T: Serialize + 'static,
{
    Arc::new(move |ctx| {
        let fut = f(ctx);
        Box::pin(async move {
            let v = fut.await?;
            serde_json::to_value(v).map_err(|e| {
                StepError::permanent(format!(
                    "the step's result cannot be serialised to JSON: {e}"
                ))
            })
        })
    })
}

/// A synchronous step function, type-erased: called directly, with no
/// future (see [`SagaBuilder::step_sync`]).
pub type SyncStepFn = Arc<dyn Fn(StepContext) -> Result<Value, StepError> + Send + Sync>;

fn erase_sync<F, T>(f: F) -> SyncStepFn
where
    F: Fn(StepContext) -> Result<T, StepError> + Send + Sync + 'static,
    T: Serialize + 'static,
{
    Arc::new(move |ctx| {
        let v = f(ctx)?;
        serde_json::to_value(v).map_err(|e| {
            StepError::permanent(format!(
                "the step's result cannot be serialised to JSON: {e}"
            ))
        })
    })
}

/// One function of a step.
#[derive(Clone)]
pub(crate) enum Handler {
    /// Its call is a future.
    Async(StepFn),
    /// Called directly: its outcome at once.
    Sync(SyncStepFn),
}

/// A step function's call: its outcome, or the future that makes it.
pub(crate) enum Call {
    Done(Result<Value, StepError>),
    Future(StepFuture),
}

impl Handler {
    /// Calls the function. The caller catches a panic (a synchronous
    /// function runs here, and so does the part of an asynchronous one
    /// before its future).
    pub(crate) fn call(&self, ctx: StepContext) -> Call {
        match self {
            Handler::Async(f) => Call::Future(f(ctx)),
            Handler::Sync(f) => Call::Done(f(ctx)),
        }
    }
}

/// The functions of one step.
#[derive(Clone, Default)]
pub(crate) struct Handlers {
    pub action: Option<Handler>,
    pub compensation: Option<Handler>,
    pub confirm: Option<Handler>,
}

impl Handlers {
    pub fn get(&self, phase: Phase) -> Option<&Handler> {
        match phase {
            Phase::Action => self.action.as_ref(),
            Phase::Compensation => self.compensation.as_ref(),
            Phase::Confirm => self.confirm.as_ref(),
        }
    }
}

/// A saga of Rust functions: its definition and its step functions.
#[derive(Clone)]
pub struct Saga {
    pub(crate) definition: SagaDefinition,
    pub(crate) handlers: HashMap<String, Handlers>,
    /// The same functions in step order, for [`Saga::execute`].
    pub(crate) ordered: Vec<Handlers>,
    /// The saga's and the steps' names, for the contexts of
    /// [`Saga::execute`].
    pub(crate) names: Arc<Names>,
    /// Why [`Saga::execute`] cannot run this saga, if it cannot.
    pub(crate) refusal: Option<sagatx_core::SagaError>,
    /// Whether some step has a confirm.
    pub(crate) confirms: bool,
}

impl Saga {
    pub fn builder(name: impl Into<String>) -> SagaBuilder {
        SagaBuilder {
            name: name.into(),
            mode: Mode::Sequential,
            autocommit: true,
            retry: RetryOverride::default(),
            steps: Vec::new(),
            handlers: HashMap::new(),
            error: None,
        }
    }

    pub fn definition(&self) -> &SagaDefinition {
        &self.definition
    }

    pub fn name(&self) -> &str {
        &self.definition.name
    }
}

/// Builds a [`Saga`]. Methods after `step` configure that step.
pub struct SagaBuilder {
    name: String,
    mode: Mode,
    autocommit: bool,
    retry: RetryOverride,
    steps: Vec<StepDefinition>,
    handlers: HashMap<String, Handlers>,
    error: Option<String>,
}

fn policy_override(p: RetryPolicy) -> RetryOverride {
    RetryOverride {
        max_attempts: Some(p.max_attempts),
        initial_backoff_ms: Some(p.initial_backoff_ms),
        max_backoff_ms: Some(p.max_backoff_ms),
        multiplier: Some(p.multiplier),
    }
}

impl SagaBuilder {
    /// Adds a step whose action is `f`.
    pub fn step<F, Fut, T>(self, name: impl Into<String>, f: F) -> Self
    where
        F: Fn(StepContext) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<T, StepError>> + Send + 'static,
        T: Serialize + 'static,
    {
        self.add_step(name.into(), Handler::Async(erase(f)))
    }

    /// Adds a step whose action is the synchronous function `f`, called
    /// directly: no future is made for its calls (an `async` step's call
    /// is a boxed future). For work that never waits: in-memory changes, a
    /// synchronous driver. Such a step runs to its end on the thread that
    /// calls it: its `timeout` cannot interrupt it (an attempt that
    /// returns is taken as it is), and a long one holds that thread.
    ///
    /// ```
    /// use sagatx::{Saga, StepContext, StepError};
    ///
    /// fn add(ctx: StepContext) -> Result<i64, StepError> {
    ///     let n = ctx.input()["n"]
    ///         .as_i64()
    ///         .ok_or_else(|| StepError::permanent("the input has no number \"n\""))?;
    ///     Ok(n + 1)
    /// }
    ///
    /// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
    /// let saga = Saga::builder("counter")
    ///     .step_sync("add", add)
    ///     .compensate_sync(|_| Ok::<_, StepError>(()))
    ///     .build()?;
    /// let results = saga.execute(serde_json::json!({"n": 41})).await?;
    /// assert_eq!(results["add"], 42);
    /// # Ok(())
    /// # }
    /// # tokio::runtime::Runtime::new().map_err(|e| e.to_string())?.block_on(demo()).map_err(|e| e.to_string())?;
    /// # Ok::<(), String>(())
    /// ```
    pub fn step_sync<F, T>(self, name: impl Into<String>, f: F) -> Self
    where
        F: Fn(StepContext) -> Result<T, StepError> + Send + Sync + 'static,
        T: Serialize + 'static,
    {
        self.add_step(name.into(), Handler::Sync(erase_sync(f)))
    }

    fn add_step(mut self, name: String, action: Handler) -> Self {
        self.handlers.insert(
            name.clone(),
            Handlers {
                action: Some(action),
                ..Default::default()
            },
        );
        self.steps.push(StepDefinition::local(name));
        self
    }

    fn last(&mut self, what: &str) -> Option<&mut StepDefinition> {
        if self.steps.is_empty() && self.error.is_none() {
            self.error = Some(format!("{what}() was called before any step()"));
        }
        self.steps.last_mut()
    }

    fn set_handler(&mut self, phase: Phase, f: Handler) {
        if let Some(s) = self.steps.last() {
            let h = self.handlers.entry(s.name.clone()).or_default();
            match phase {
                Phase::Action => h.action = Some(f),
                Phase::Compensation => h.compensation = Some(f),
                Phase::Confirm => h.confirm = Some(f),
            }
        }
    }

    /// The last step's compensation: undoes its action.
    pub fn compensate<F, Fut, T>(mut self, f: F) -> Self
    where
        F: Fn(StepContext) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<T, StepError>> + Send + 'static,
        T: Serialize + 'static,
    {
        if let Some(s) = self.last("compensate") {
            s.compensation = Some(Endpoint::Local);
            self.set_handler(Phase::Compensation, Handler::Async(erase(f)));
        }
        self
    }

    /// The last step's compensation, a synchronous function (see
    /// [`step_sync`](Self::step_sync)).
    pub fn compensate_sync<F, T>(mut self, f: F) -> Self
    where
        F: Fn(StepContext) -> Result<T, StepError> + Send + Sync + 'static,
        T: Serialize + 'static,
    {
        if let Some(s) = self.last("compensate_sync") {
            s.compensation = Some(Endpoint::Local);
            self.set_handler(Phase::Compensation, Handler::Sync(erase_sync(f)));
        }
        self
    }

    /// The last step's confirm: runs after every action succeeded.
    pub fn confirm<F, Fut, T>(mut self, f: F) -> Self
    where
        F: Fn(StepContext) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<T, StepError>> + Send + 'static,
        T: Serialize + 'static,
    {
        if let Some(s) = self.last("confirm") {
            s.confirm = Some(Endpoint::Local);
            self.set_handler(Phase::Confirm, Handler::Async(erase(f)));
        }
        self
    }

    /// The last step's confirm, a synchronous function (see
    /// [`step_sync`](Self::step_sync)).
    pub fn confirm_sync<F, T>(mut self, f: F) -> Self
    where
        F: Fn(StepContext) -> Result<T, StepError> + Send + Sync + 'static,
        T: Serialize + 'static,
    {
        if let Some(s) = self.last("confirm_sync") {
            s.confirm = Some(Endpoint::Local);
            self.set_handler(Phase::Confirm, Handler::Sync(erase_sync(f)));
        }
        self
    }

    /// The last step's retry policy (its compensation and confirm get at
    /// least 10 attempts).
    pub fn retry(mut self, policy: RetryPolicy) -> Self {
        if let Some(s) = self.last("retry") {
            s.retry = policy_override(policy);
        }
        self
    }

    /// The last step's per-attempt timeout (for a callback step: how long
    /// it waits for the reply). A synchronous function (`step_sync`) runs
    /// to its end: its outcome is taken as it is.
    pub fn timeout(mut self, t: Duration) -> Self {
        if let Some(s) = self.last("timeout") {
            s.timeout_ms = Some(t.as_millis().clamp(1, u64::MAX as u128) as u64);
        }
        self
    }

    /// The last step's action only means "accepted"; the step waits for
    /// [`Engine::reply`](crate::Engine::reply).
    pub fn callback(mut self) -> Self {
        if let Some(s) = self.last("callback") {
            s.reply = ReplyMode::Callback;
        }
        self
    }

    /// The retry policy of every step that sets none.
    pub fn default_retry(mut self, policy: RetryPolicy) -> Self {
        self.retry = policy_override(policy);
        self
    }

    /// Sequential (default) or concurrent.
    pub fn mode(mut self, mode: Mode) -> Self {
        self.mode = mode;
        self
    }

    /// Run every action at once.
    pub fn concurrent(self) -> Self {
        self.mode(Mode::Concurrent)
    }

    /// When `false`, a saga whose actions all succeeded waits for
    /// [`Engine::commit`](crate::Engine::commit) or `reject`.
    pub fn autocommit(mut self, on: bool) -> Self {
        self.autocommit = on;
        self
    }

    /// Checks the saga as a definition would be (API.md §1).
    pub fn build(self) -> Result<Saga, DefinitionError> {
        if let Some(message) = self.error {
            return Err(DefinitionError::Invalid {
                field: "steps".into(),
                message,
            });
        }
        let definition = SagaDefinition {
            name: self.name,
            mode: self.mode,
            autocommit: self.autocommit,
            retry: self.retry,
            steps: self.steps,
        };
        definition.validate()?;
        let ordered = definition
            .steps
            .iter()
            .map(|s| self.handlers.get(&s.name).cloned().unwrap_or_default())
            .collect();
        Ok(Saga {
            refusal: crate::execute::refusal(&definition),
            confirms: definition.steps.iter().any(|s| s.confirm.is_some()),
            names: Arc::new(Names {
                saga: Name::from(definition.name.as_str()),
                steps: definition
                    .steps
                    .iter()
                    .map(|s| Name::from(s.name.as_str()))
                    .collect(),
            }),
            ordered,
            definition,
            handlers: self.handlers,
        })
    }
}
