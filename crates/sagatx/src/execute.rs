//! A saga run here and now with nothing journaled: [`Saga::execute`].
//!
//! py-api-saga's `execute()`: the caller's task runs the steps, retries
//! them, and compensates what was done when one fails for good, by the same
//! rules as an [`Engine`](crate::Engine) (API.md §4: which steps are
//! compensated, in which order, retries and backoff, confirms), but nothing
//! is written anywhere: a crash in the middle loses the saga, and nothing
//! can list it, wait for it or reply to it. It is for work that lives and
//! dies with one process (undoing in-memory or local changes when a later
//! step fails); work that must survive a crash runs on an `Engine`.
//!
//! A property test drives random sagas and outcome scripts through both
//! this runner and the engine (on a `MemoryStore`) and checks that they
//! make the same calls and end the same way.

use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::task::Poll;
use std::time::Duration;

use sagatx_core::{
    CompensationOutcome, Mode, Phase, ReplyMode, RetryPolicy, SagaDefinition, SagaError, StepError,
    StepStatus,
};
use serde_json::Value;

use crate::results::Results;
use crate::saga::{Handler, LocalRun, Origin, Saga, StepContext, StepFuture};

impl Saga {
    /// Runs the saga in this task with nothing journaled (py-api-saga's
    /// `execute()`): `Ok` with every step's result when every action (and
    /// confirm) succeeded; otherwise the [`SagaError`] of the step that
    /// failed first, with what became of each compensation.
    ///
    /// The rules are the engine's: failed attempts are retried with the
    /// step's retry policy (the backoff is slept in this task); when an
    /// action fails for good, the steps that succeeded, and a failed one
    /// whose outcome is unknown (its last attempt was transient), are
    /// compensated, in reverse order when sequential and together when
    /// concurrent; confirms run in step order after every action
    /// succeeded. A step sees the results of the steps that succeeded
    /// before its call.
    ///
    /// Each run gets a fresh execution id (`ctx.execution_id()`, and so
    /// `ctx.idempotency_key()`, differ from run to run). Nothing is
    /// durable: a crash loses the run, and nothing can list it or reply to
    /// it. A saga with a `callback` step, or with `autocommit`
    /// off, needs an [`Engine`](crate::Engine) (something must deliver the
    /// reply or the decision later): `execute` fails at once, calling
    /// nothing.
    ///
    /// ```
    /// use sagatx::{Saga, StepContext, StepError};
    ///
    /// async fn reserve(_: StepContext) -> Result<&'static str, StepError> { Ok("r-1") }
    /// async fn release(_: StepContext) -> Result<(), StepError> { Ok(()) }
    /// async fn charge(_: StepContext) -> Result<(), StepError> {
    ///     Err(StepError::permanent("card declined"))
    /// }
    ///
    /// # tokio::runtime::Runtime::new().unwrap().block_on(async {
    /// let saga = Saga::builder("order")
    ///     .step("reserve", reserve).compensate(release)
    ///     .step("charge", charge)
    ///     .build().unwrap();
    /// let err = saga.execute(serde_json::json!({"order": 7})).await.unwrap_err();
    /// assert_eq!(err.step.as_deref(), Some("charge"));
    /// assert_eq!(err.compensated().count(), 1);
    /// # });
    /// ```
    pub async fn execute(&self, input: Value) -> Result<Results, SagaError> {
        if let Some(refused) = &self.refusal {
            return Err(refused.clone());
        }
        let mut run = Run {
            saga: self,
            local: Arc::new(LocalRun {
                input,
                id: OnceLock::new(),
                results: Results::new(self.names.clone()),
            }),
        };
        let n = self.definition.steps.len();
        // What the actions ended with (their results are then the run's):
        // the first action that failed for good and its error, and the
        // steps whose compensation is then owed (those that succeeded, and
        // a failed one whose outcome is unknown: its last attempt was
        // transient).
        let (failure, owed): (_, Vec<usize>) = match self.definition.mode {
            Mode::Sequential => {
                // One call at a time: the results are the run's own (no
                // lock), and the steps before the one that failed all
                // succeeded (no record of each; a saga that completes
                // allocates none).
                let mut failed = None;
                for i in 0..n {
                    match run.phase(i, Phase::Action, Seen::Run).await {
                        // The call's context is gone: no copy.
                        Ok(v) => run.results_mut().insert(i, v),
                        Err(e) => {
                            failed = Some((i, e));
                            break;
                        }
                    }
                }
                match failed {
                    None => (None, Vec::new()),
                    Some((i, e)) => {
                        let unknown = e.class.is_retryable();
                        let owed = (0..i).chain(unknown.then_some(i)).collect();
                        let step = self.definition.steps[i].name.clone();
                        (Some((step, e.message)), owed)
                    }
                }
            }
            Mode::Concurrent => {
                let shared = Shared {
                    results: Mutex::new(Arc::new(Results::new(self.names.clone()))),
                    rolling_back: AtomicBool::new(false),
                    first_failure: Mutex::new(None),
                };
                let ended =
                    futures_util::future::join_all((0..n).map(|i| run.action(i, &shared))).await;
                let owed = ended
                    .iter()
                    .enumerate()
                    .filter(|(_, e)| matches!(e, Ok(()) | Err(true)))
                    .map(|(i, _)| i)
                    .collect();
                let failure = shared
                    .first_failure
                    .into_inner()
                    .unwrap_or_else(PoisonError::into_inner);
                let results = shared
                    .results
                    .into_inner()
                    .unwrap_or_else(PoisonError::into_inner);
                *run.results_mut() = Arc::unwrap_or_clone(results);
                (failure, owed)
            }
        };
        let Some((step, message)) = failure else {
            if self.confirms {
                if let Some(err) = run.confirms().await {
                    return Err(err);
                }
            }
            // The calls are over: the results are the run's alone (no
            // copy, unless a step kept a clone of its context).
            return Ok(match Arc::try_unwrap(run.local) {
                Ok(local) => local.results,
                Err(shared) => shared.results.clone(),
            });
        };
        // The rollback: the owed steps that have a compensation.
        let owed = owed
            .into_iter()
            .filter(|&i| self.definition.steps[i].compensation.is_some());
        // In step order either way (join_all keeps its futures' order).
        let compensations: Vec<CompensationOutcome> = match self.definition.mode {
            Mode::Sequential => {
                let mut out = Vec::new();
                for i in owed.rev() {
                    out.push(run.compensation(i).await);
                }
                out.reverse();
                out
            }
            Mode::Concurrent => {
                let run = &run;
                futures_util::future::join_all(owed.map(|i| run.compensation(i))).await
            }
        };
        Err(SagaError {
            step: Some(step),
            message,
            compensations,
        })
    }
}

/// Why a saga cannot run without an engine, if it cannot (worked out once,
/// when the saga is built).
pub(crate) fn refusal(definition: &SagaDefinition) -> Option<SagaError> {
    let refuse = |step: Option<&str>, why: &str| SagaError {
        step: step.map(str::to_string),
        message: format!(
            "{why}: run it on an Engine (Saga::execute journals nothing and cannot wait)"
        ),
        compensations: Vec::new(),
    };
    if !definition.autocommit {
        return Some(refuse(
            None,
            "this saga waits for a commit decision (autocommit off)",
        ));
    }
    definition
        .steps
        .iter()
        .find(|s| s.reply == ReplyMode::Callback)
        .map(|s| refuse(Some(&s.name), "this step waits for a reply (callback)"))
}

/// One run of [`Saga::execute`].
struct Run<'a> {
    saga: &'a Saga,
    /// The input, the names, and the id once a step asked for it.
    local: Arc<LocalRun>,
}

/// What the actions of a concurrent run share.
struct Shared {
    /// The results so far; a call gets a copy of the `Arc` (a step that
    /// succeeds copies the map only while another call still holds it).
    results: Mutex<Arc<Results>>,
    /// An action failed for good: no new action attempt starts.
    rolling_back: AtomicBool,
    /// The first action that failed for good, and its error.
    first_failure: Mutex<Option<(String, String)>>,
}

/// The results a call sees, and whether a rollback began.
#[derive(Clone, Copy)]
enum Seen<'r> {
    /// One call at a time (a sequential run's actions; every
    /// compensation and confirm): the run's results, and no rollback to
    /// watch for.
    Run,
    /// A concurrent run's actions: the results as they are at each
    /// attempt, and the rollback flag.
    Shared(&'r Shared),
}

impl Seen<'_> {
    /// The results of a call's context: `None` for the run's own.
    fn results(self) -> Option<Arc<Results>> {
        match self {
            Seen::Run => None,
            Seen::Shared(s) => Some(
                s.results
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .clone(),
            ),
        }
    }

    fn rolling_back(self) -> bool {
        match self {
            Seen::Run => false,
            Seen::Shared(s) => s.rolling_back.load(Ordering::Acquire),
        }
    }
}

impl Run<'_> {
    /// The run's results, to change between calls. The calls' contexts
    /// are gone by then, so the run is not copied, unless a step kept a
    /// clone of its context (`LocalRun`'s `Clone`).
    fn results_mut(&mut self) -> &mut Results {
        &mut Arc::make_mut(&mut self.local).results
    }

    /// Runs step `i`'s action of a concurrent run with its retries: `Ok`
    /// when it succeeded, `Err(unknown)` when it failed for good.
    async fn action(&self, i: usize, shared: &Shared) -> Result<(), bool> {
        match self.phase(i, Phase::Action, Seen::Shared(shared)).await {
            Ok(v) => {
                let mut r = shared
                    .results
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner);
                Arc::make_mut(&mut r).insert(i, v);
                Ok(())
            }
            Err(e) => {
                let unknown = e.class.is_retryable();
                if !shared.rolling_back.swap(true, Ordering::AcqRel) {
                    let name = self.saga.definition.steps[i].name.clone();
                    *shared
                        .first_failure
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner) = Some((name, e.message));
                }
                Err(unknown)
            }
        }
    }

    async fn compensation(&self, i: usize) -> CompensationOutcome {
        let step = self.saga.definition.steps[i].name.clone();
        match self.phase(i, Phase::Compensation, Seen::Run).await {
            Ok(_) => CompensationOutcome {
                step,
                status: StepStatus::Compensated,
                error: None,
            },
            Err(e) => CompensationOutcome {
                step,
                status: StepStatus::CompensationFailed,
                error: Some(e.message),
            },
        }
    }

    /// Runs the confirms in step order; the error of the first that failed
    /// for good (the others still run).
    async fn confirms(&self) -> Option<SagaError> {
        let mut failed = None;
        for (i, s) in self.saga.definition.steps.iter().enumerate() {
            if s.confirm.is_none() {
                continue;
            }
            if let Err(e) = self.phase(i, Phase::Confirm, Seen::Run).await {
                failed.get_or_insert_with(|| SagaError {
                    step: Some(s.name.clone()),
                    message: format!("confirm failed: {}", e.message),
                    compensations: Vec::new(),
                });
            }
        }
        failed
    }

    /// Calls `phase` of step `i` until it succeeds, fails for good, or (an
    /// action of a concurrent run) the rollback began.
    ///
    /// Most local steps succeed at their first attempt and are done at
    /// their first poll: that call is made in place, and only a step that
    /// is not done, or failed, goes on in [`Run::finish_phase`], boxed. Its
    /// timer, its backoff and its retries made this future several hundred
    /// bytes, copied at every step of every run (callgrind: about 15 % of a
    /// 3-step `Saga::execute`).
    async fn phase(&self, i: usize, phase: Phase, seen: Seen<'_>) -> Result<Value, StepError> {
        let first =
            std::future::poll_fn(|cx| Poll::Ready(self.first_poll(i, phase, 1, seen, cx))).await;
        match first {
            First::Done(Ok(v)) => Ok(v),
            first => Box::pin(self.finish_phase(i, phase, seen, first)).await,
        }
    }

    /// [`Run::phase`] after its first attempt's first poll.
    async fn finish_phase(
        &self,
        i: usize,
        phase: Phase,
        seen: Seen<'_>,
        mut first: First,
    ) -> Result<Value, StepError> {
        let mut attempt = 1;
        loop {
            let outcome = match first {
                First::Done(outcome) => outcome,
                First::Pending(fut) => {
                    let timeout = self
                        .saga
                        .definition
                        .attempt_timeout_ms(i, phase)
                        .map(Duration::from_millis);
                    crate::saga::finish_call(fut, timeout).await
                }
            };
            let e = match outcome {
                Ok(v) => return Ok(v),
                Err(e) => e,
            };
            let policy: RetryPolicy = self.saga.definition.policy(i, phase);
            let stopped = || phase == Phase::Action && seen.rolling_back();
            if !e.class.is_retryable() || attempt >= policy.max_attempts || stopped() {
                return Err(e);
            }
            let backoff = policy.backoff_ms(attempt, crate::engine::random01());
            tokio::time::sleep(Duration::from_millis(backoff)).await;
            // The rollback began while this one backed off: it may have
            // taken effect, and no new attempt starts.
            if stopped() {
                return Err(e);
            }
            attempt += 1;
            first = std::future::poll_fn(|cx| {
                Poll::Ready(self.first_poll(i, phase, attempt, seen, cx))
            })
            .await;
        }
    }

    /// Makes a call of `phase` of step `i` and polls it once: a panic is
    /// an unknown outcome; a call not done then is given back, to be
    /// awaited within the step's timeout.
    fn first_poll(
        &self,
        i: usize,
        phase: Phase,
        attempt: u32,
        seen: Seen<'_>,
        cx: &mut std::task::Context<'_>,
    ) -> First {
        let Some(f) = self.saga.ordered[i].get(phase) else {
            return First::Done(Err(StepError::permanent("no function for this phase")));
        };
        let ctx = StepContext {
            origin: Origin::Local {
                run: self.local.clone(),
                step: i,
                results: seen.results(),
            },
            phase,
            attempt,
            user: None,
            callback: false,
        };
        let panicked = || First::Done(Err(StepError::unknown_outcome("the step panicked")));
        let mut fut = match f {
            Handler::Sync(f) => {
                return match std::panic::catch_unwind(AssertUnwindSafe(|| f(ctx))) {
                    Ok(outcome) => First::Done(outcome),
                    Err(_) => panicked(),
                }
            }
            Handler::Async(f) => match std::panic::catch_unwind(AssertUnwindSafe(|| f(ctx))) {
                Ok(fut) => fut,
                Err(_) => return panicked(),
            },
        };
        match std::panic::catch_unwind(AssertUnwindSafe(|| fut.as_mut().poll(cx))) {
            Ok(Poll::Ready(outcome)) => First::Done(outcome),
            Ok(Poll::Pending) => First::Pending(fut),
            Err(_) => panicked(),
        }
    }
}

/// A call after its first poll.
enum First {
    /// Done: its outcome.
    Done(Result<Value, StepError>),
    /// Not done yet: the call, to be awaited.
    Pending(StepFuture),
}
