//! The execution state machine: an event in, the next state and the calls to
//! make out.
//!
//! [`Execution::handle`] is pure: time and the random draw for jitter come in
//! through [`Env`]. The runtime journals the new state, and only once it is
//! durable makes the [`Call`]s it returned (persist, then act).
//!
//! The rules are those of API.md §3–§4:
//! - sequential: actions one at a time in order; concurrent: all at once;
//! - a retryable failure is retried with backoff while attempts remain;
//! - a permanent failure, or retries running out, starts the rollback:
//!   no new action starts, calls in flight are let finish, then every step
//!   that succeeded, and every failed one whose outcome is unknown, is
//!   compensated (in reverse order when sequential, together when concurrent);
//! - after every action succeeded, confirms run in step order (at once with
//!   `autocommit`, else on commit).

use serde_json::Value;

use crate::definition::{Mode, Phase, ReplyMode, SagaDefinition};
use crate::error::StepError;
use crate::execution::{Awaiting, Execution, Failure, Reply, Status, StepStatus};

/// What the machine needs from the outside world for one event.
#[derive(Debug, Clone, Copy)]
pub struct Env {
    /// Now, in milliseconds since the Unix epoch.
    pub now_ms: u64,
    /// A uniform draw from `[0, 1)` for the jitter of a backoff.
    pub random01: f64,
}

/// Something that happened to an execution.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum Event {
    /// Begin running a `created` execution.
    Start,
    /// A call finished. `attempt` identifies the call; an outcome for a call
    /// that is no longer in flight is ignored.
    Outcome {
        step: usize,
        phase: Phase,
        attempt: u32,
        outcome: Result<Value, StepError>,
    },
    /// The reply of a `callback` step arrived.
    Reply { step: usize, reply: Reply },
    /// Time passed: retries and reply deadlines due at `now` fire.
    Tick,
    /// The execution was loaded after a restart: every call that was in
    /// flight is taken as interrupted.
    Resume,
    /// `autocommit: false`: run the confirms.
    Commit,
    /// `autocommit: false`: roll back.
    Reject,
    /// Stop and roll back.
    Cancel,
    /// Resume a `failed` execution's unfinished compensations or confirms.
    Retry,
}

/// A call the runtime must make, once the new state is durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Call {
    pub step: usize,
    pub phase: Phase,
    /// Counts from 1 within the phase, across crashes and retries.
    pub attempt: u32,
}

/// The result of handling an event.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Transition {
    /// The state changed and must be journaled.
    pub changed: bool,
    /// The calls to make after the journal write.
    pub calls: Vec<Call>,
}

/// An event that does not apply to the execution in its current state.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Conflict {
    #[error("the execution is {status}, not paused awaiting commit")]
    NotAwaitingCommit { status: Status },
    #[error("the execution is already {status}")]
    Terminal { status: Status },
    #[error("the execution is committing (its confirms run); it can no longer be cancelled")]
    Committing,
    #[error("the execution is {status}; only a failed execution can be retried")]
    NotFailed { status: Status },
    #[error("step {step} does not take replies: its reply mode is sync")]
    NotCallback { step: String },
    #[error("step {step} is not waiting for a reply (it is {})", status.as_str())]
    NotWaiting { step: String, status: StepStatus },
    #[error("step {step} already received a different reply")]
    ReplyMismatch { step: String },
    #[error("the saga has no step number {index}")]
    NoSuchStep { index: usize },
    #[error("the definition has {definition} steps but the execution has {execution}")]
    DefinitionMismatch { definition: usize, execution: usize },
}

struct Run<'a> {
    ex: &'a mut Execution,
    def: &'a SagaDefinition,
    env: Env,
    out: Transition,
}

impl Execution {
    /// Applies one event. On `Err` the state is unchanged.
    pub fn handle(
        &mut self,
        def: &SagaDefinition,
        event: Event,
        env: Env,
    ) -> Result<Transition, Conflict> {
        if def.steps.len() != self.steps.len() {
            return Err(Conflict::DefinitionMismatch {
                definition: def.steps.len(),
                execution: self.steps.len(),
            });
        }
        let mut run = Run {
            ex: self,
            def,
            env,
            out: Transition::default(),
        };
        run.event(event)?;
        run.advance();
        if run.out.changed {
            run.ex.updated_at_ms = run.ex.updated_at_ms.max(env.now_ms);
        }
        Ok(run.out)
    }
}

impl Run<'_> {
    fn event(&mut self, event: Event) -> Result<(), Conflict> {
        match event {
            Event::Start => {
                if self.ex.status == Status::Created {
                    self.ex.status = Status::Running;
                    self.out.changed = true;
                }
            }
            Event::Outcome {
                step,
                phase,
                attempt,
                outcome,
            } => {
                self.check_step(step)?;
                self.on_outcome(step, phase, attempt, outcome);
            }
            Event::Reply { step, reply } => {
                self.check_step(step)?;
                self.on_reply(step, reply)?;
            }
            Event::Tick => self.on_tick(),
            Event::Resume => self.on_resume(),
            Event::Commit => {
                self.check_awaiting_commit()?;
                self.decide_commit();
            }
            Event::Reject => {
                self.check_awaiting_commit()?;
                self.begin_rollback(None, "rejected".to_string());
            }
            Event::Cancel => match self.ex.status {
                s if s.is_terminal() => return Err(Conflict::Terminal { status: s }),
                Status::Compensating => {}
                _ if self.ex.committing => return Err(Conflict::Committing),
                _ => self.begin_rollback(None, "cancelled".to_string()),
            },
            Event::Retry => self.on_retry()?,
        }
        Ok(())
    }

    fn check_step(&self, step: usize) -> Result<(), Conflict> {
        if step < self.ex.steps.len() {
            Ok(())
        } else {
            Err(Conflict::NoSuchStep { index: step })
        }
    }

    fn check_awaiting_commit(&self) -> Result<(), Conflict> {
        if self.ex.status == Status::Paused && self.ex.awaiting == Some(Awaiting::Commit) {
            Ok(())
        } else {
            Err(Conflict::NotAwaitingCommit {
                status: self.ex.status,
            })
        }
    }

    fn rolling_back(&self) -> bool {
        self.ex.status == Status::Compensating
    }

    fn is_callback(&self, i: usize) -> bool {
        self.def.steps[i].reply == ReplyMode::Callback
    }

    /// Journals the start of a call and asks the runtime to make it.
    fn start_call(&mut self, i: usize, phase: Phase) {
        // An action never starts once the rollback began (API.md §4).
        if phase == Phase::Action && (self.rolling_back() || self.ex.committing) {
            debug_assert!(false, "action start requested during rollback or commit");
            return;
        }
        let s = &mut self.ex.steps[i];
        *s.attempts_mut(phase) += 1;
        s.in_flight = Some(phase);
        s.due_at_ms = None;
        match phase {
            Phase::Action => s.status = StepStatus::Running,
            Phase::Compensation => s.status = StepStatus::Compensating,
            Phase::Confirm => {}
        }
        let attempt = s.attempts_of(phase);
        s.began(phase, attempt, self.env.now_ms);
        self.out.calls.push(crate::machine::Call {
            step: i,
            phase,
            attempt,
        });
        self.out.changed = true;
    }

    fn owe_compensation(&mut self, i: usize) {
        if self.def.steps[i].compensation.is_some() {
            self.ex.steps[i].owed = Some(Phase::Compensation);
        }
    }

    /// Enters the rollback: no action starts from now on.
    fn begin_rollback(&mut self, step: Option<String>, message: String) {
        self.out.changed = true;
        if self.ex.failure.is_none() {
            self.ex.failure = Some(Failure { step, message });
        }
        if self.rolling_back() {
            return;
        }
        self.ex.status = Status::Compensating;
        self.ex.awaiting = None;
        for i in 0..self.ex.steps.len() {
            // Read first: a step is written (and so copied, when shared
            // with an earlier state) only when it changes.
            let s = &self.ex.steps[i];
            if s.in_flight.is_some() {
                continue; // decided when its outcome arrives
            }
            match s.status {
                StepStatus::Running => {
                    // Backing off after a retryable failure: it may have
                    // taken effect.
                    let s = &mut self.ex.steps[i];
                    s.status = StepStatus::Failed;
                    s.outcome_unknown = true;
                    s.due_at_ms = None;
                    self.owe_compensation(i);
                }
                StepStatus::Waiting => {
                    let s = &mut self.ex.steps[i];
                    s.status = StepStatus::Failed;
                    s.outcome_unknown = true;
                    s.due_at_ms = None;
                    s.error = Some("the rollback began before its reply arrived".to_string());
                    self.owe_compensation(i);
                }
                StepStatus::Succeeded => self.owe_compensation(i),
                StepStatus::Failed if s.outcome_unknown => self.owe_compensation(i),
                _ => {}
            }
        }
    }

    /// The action of step `i` failed for good.
    fn fail_action(&mut self, i: usize, unknown: bool) {
        let s = &mut self.ex.steps[i];
        s.status = StepStatus::Failed;
        s.outcome_unknown = unknown;
        s.due_at_ms = None;
        self.out.changed = true;
        if self.rolling_back() {
            if unknown {
                self.owe_compensation(i);
            }
        } else {
            let s = &self.ex.steps[i];
            let message = s.error.clone().unwrap_or_else(|| "failed".to_string());
            let name = s.name.as_str().to_owned();
            self.begin_rollback(Some(name), message);
        }
    }

    fn on_outcome(
        &mut self,
        i: usize,
        phase: Phase,
        attempt: u32,
        outcome: Result<Value, StepError>,
    ) {
        let s = &self.ex.steps[i];
        if s.in_flight != Some(phase) || s.attempts_of(phase) != attempt {
            return; // a stale outcome of a call already accounted for
        }
        self.ex.steps[i].in_flight = None;
        self.out.changed = true;
        let (label, message) = match &outcome {
            Ok(_) => (crate::CallOutcome::Ok, None),
            Err(e) => (crate::CallOutcome::from(e.class), Some(e.message.as_str())),
        };
        self.ex.steps[i].ended(phase, attempt, self.env.now_ms, label, message);
        match phase {
            Phase::Action => self.on_action_outcome(i, outcome),
            Phase::Compensation | Phase::Confirm => self.on_undo_outcome(i, phase, outcome),
        }
    }

    fn on_action_outcome(&mut self, i: usize, outcome: Result<Value, StepError>) {
        let callback = self.is_callback(i);
        if callback {
            // A reply that raced ahead of the call's own response decides.
            if let Some(reply) = self.ex.steps[i].reply.clone() {
                self.apply_reply(i, reply);
                return;
            }
        }
        match outcome {
            Ok(v) if !callback => {
                let s = &mut self.ex.steps[i];
                s.result = Some(v);
                s.status = StepStatus::Succeeded;
                s.error = None;
                s.outcome_unknown = false;
                if self.rolling_back() {
                    self.owe_compensation(i);
                }
            }
            Ok(_) => {
                if self.rolling_back() {
                    self.ex.steps[i].error =
                        Some("accepted, but the rollback began before its reply".to_string());
                    self.fail_action(i, true);
                } else {
                    let deadline = self
                        .def
                        .reply_timeout_ms(i)
                        .map(|t| self.env.now_ms.saturating_add(t));
                    let s = &mut self.ex.steps[i];
                    s.status = StepStatus::Waiting;
                    s.due_at_ms = deadline;
                }
            }
            Err(e) => {
                let retryable = e.class.is_retryable();
                self.ex.steps[i].error = Some(e.message);
                if !retryable {
                    self.fail_action(i, false);
                } else if self.rolling_back() {
                    self.fail_action(i, true);
                } else {
                    self.retry_or_fail(i, Phase::Action);
                }
            }
        }
    }

    /// After a retryable failure of `phase` on step `i`: schedule the next
    /// attempt if the budget allows, or fail the phase for good.
    fn retry_or_fail(&mut self, i: usize, phase: Phase) {
        let policy = self.def.policy(i, phase);
        let s = &mut self.ex.steps[i];
        if phase == Phase::Action {
            s.outcome_unknown = true;
        }
        let counted = s.counted_attempts(phase);
        if counted < policy.max_attempts {
            let backoff = policy.backoff_ms(counted, self.env.random01);
            s.due_at_ms = Some(self.env.now_ms.saturating_add(backoff));
            return;
        }
        match phase {
            Phase::Action => self.fail_action(i, true),
            Phase::Compensation | Phase::Confirm => self.fail_undo(i, phase),
        }
    }

    fn fail_undo(&mut self, i: usize, phase: Phase) {
        let s = &mut self.ex.steps[i];
        s.owed = None;
        s.due_at_ms = None;
        if phase == Phase::Compensation {
            s.status = StepStatus::CompensationFailed;
        } else {
            s.status = StepStatus::ConfirmFailed;
            if self.ex.failure.is_none() {
                let msg = s.confirm_error.clone().unwrap_or_default();
                self.ex.failure = Some(Failure {
                    step: Some(s.name.as_str().to_owned()),
                    message: format!("confirm failed: {msg}"),
                });
            }
        }
        self.out.changed = true;
    }

    fn on_undo_outcome(&mut self, i: usize, phase: Phase, outcome: Result<Value, StepError>) {
        match outcome {
            Ok(_) => {
                let s = &mut self.ex.steps[i];
                s.owed = None;
                s.due_at_ms = None;
                if phase == Phase::Compensation {
                    s.status = StepStatus::Compensated;
                    s.compensation_error = None;
                } else {
                    s.status = StepStatus::Confirmed;
                    s.confirm_error = None;
                }
            }
            Err(e) => {
                let retryable = e.class.is_retryable();
                let s = &mut self.ex.steps[i];
                if phase == Phase::Compensation {
                    s.compensation_error = Some(e.message);
                } else {
                    s.confirm_error = Some(e.message);
                }
                if retryable {
                    self.retry_or_fail(i, phase);
                } else {
                    self.fail_undo(i, phase);
                }
            }
        }
    }

    fn apply_reply(&mut self, i: usize, reply: Reply) {
        let s = &mut self.ex.steps[i];
        s.reply = Some(reply.clone());
        s.due_at_ms = None;
        self.out.changed = true;
        match reply {
            Reply::Ok(v) => {
                s.result = Some(v);
                s.status = StepStatus::Succeeded;
                s.error = None;
                s.outcome_unknown = false;
                if self.rolling_back() {
                    self.owe_compensation(i);
                }
            }
            Reply::Err(msg) => {
                s.error = Some(msg);
                self.fail_action(i, false);
            }
        }
    }

    fn on_reply(&mut self, i: usize, reply: Reply) -> Result<(), Conflict> {
        let name = self.ex.steps[i].name.as_str().to_owned();
        if !self.is_callback(i) {
            return Err(Conflict::NotCallback { step: name });
        }
        let s = &self.ex.steps[i];
        if let Some(prev) = &s.reply {
            return if *prev == reply {
                Ok(()) // the same reply again: no second effect
            } else {
                Err(Conflict::ReplyMismatch { step: name })
            };
        }
        let forward = !self.rolling_back() && !self.ex.status.is_terminal();
        match s.status {
            StepStatus::Waiting if forward => self.apply_reply(i, reply),
            StepStatus::Running if forward && s.in_flight == Some(Phase::Action) => {
                // The reply beat the call's own response; it decides once
                // the call returns.
                self.ex.steps[i].reply = Some(reply);
                self.out.changed = true;
            }
            StepStatus::Running if forward => self.apply_reply(i, reply),
            status => return Err(Conflict::NotWaiting { step: name, status }),
        }
        Ok(())
    }

    fn on_tick(&mut self) {
        let now = self.env.now_ms;
        for i in 0..self.ex.steps.len() {
            let s = &self.ex.steps[i];
            let due = matches!(s.due_at_ms, Some(d) if d <= now) && s.in_flight.is_none();
            if !due {
                continue;
            }
            let (status, owed) = (s.status, s.owed);
            self.ex.steps[i].due_at_ms = None;
            self.out.changed = true;
            match (status, owed) {
                (StepStatus::Running, _) => self.start_call(i, Phase::Action),
                (StepStatus::Waiting, _) => {
                    let t = self.def.reply_timeout_ms(i).unwrap_or(0);
                    self.ex.steps[i].error = Some(format!("no reply within {t} ms"));
                    self.fail_action(i, true);
                }
                (_, Some(phase)) => self.start_call(i, phase),
                _ => {}
            }
        }
    }

    fn on_resume(&mut self) {
        let now = self.env.now_ms;
        for i in 0..self.ex.steps.len() {
            let Some(phase) = self.ex.steps[i].in_flight else {
                continue;
            };
            self.out.changed = true;
            let rolling_back = self.rolling_back() || self.ex.committing;
            let s = &mut self.ex.steps[i];
            let attempt = s.attempts_of(phase);
            s.ended(phase, attempt, now, crate::CallOutcome::Interrupted, None);
            s.in_flight = None;
            *s.exempt_mut(phase) += 1;
            if phase == Phase::Action {
                s.outcome_unknown = true;
            }
            if phase == Phase::Action && rolling_back {
                s.error = Some("interrupted by a restart during the rollback".to_string());
                self.fail_action(i, true);
            } else {
                // Called again at once: at least once, same idempotency key.
                self.ex.steps[i].due_at_ms = Some(now);
            }
        }
        if self.ex.status == Status::Created {
            self.ex.status = Status::Running;
            self.out.changed = true;
        }
        self.on_tick();
    }

    fn on_retry(&mut self) -> Result<(), Conflict> {
        if self.ex.status != Status::Failed {
            return Err(Conflict::NotFailed {
                status: self.ex.status,
            });
        }
        let mut compensations = false;
        for i in 0..self.ex.steps.len() {
            if !matches!(
                self.ex.steps[i].status,
                StepStatus::CompensationFailed | StepStatus::ConfirmFailed
            ) {
                continue;
            }
            let s = &mut self.ex.steps[i];
            match s.status {
                StepStatus::CompensationFailed => {
                    s.owed = Some(Phase::Compensation);
                    s.exempt.compensation = s.compensation_attempts;
                    compensations = true;
                }
                StepStatus::ConfirmFailed => {
                    s.owed = Some(Phase::Confirm);
                    s.exempt.confirm = s.confirm_attempts;
                }
                _ => {}
            }
        }
        self.ex.status = if compensations {
            Status::Compensating
        } else {
            Status::Running
        };
        self.out.changed = true;
        Ok(())
    }

    fn decide_commit(&mut self) {
        self.ex.committing = true;
        self.ex.status = Status::Running;
        self.ex.awaiting = None;
        for i in 0..self.ex.steps.len() {
            if self.def.steps[i].confirm.is_some() {
                self.ex.steps[i].owed = Some(Phase::Confirm);
            }
        }
        self.out.changed = true;
    }

    fn set_status(&mut self, status: Status, awaiting: Option<Awaiting>) {
        if self.ex.status != status || self.ex.awaiting != awaiting {
            self.ex.status = status;
            self.ex.awaiting = awaiting;
            self.out.changed = true;
        }
    }

    fn in_progress(&self, i: usize, phase: Phase) -> bool {
        let s = &self.ex.steps[i];
        s.owed == Some(phase) && (s.in_flight == Some(phase) || s.due_at_ms.is_some())
    }

    /// Starts whatever can start now and settles the execution's status.
    fn advance(&mut self) {
        match self.ex.status {
            Status::Created | Status::Completed | Status::Compensated | Status::Failed => {}
            Status::Compensating => self.advance_rollback(),
            _ if self.ex.committing => self.advance_confirms(),
            _ => self.advance_forward(),
        }
    }

    fn advance_forward(&mut self) {
        if self.ex.steps.iter().all(|s| s.action_succeeded()) {
            if self.def.autocommit {
                self.decide_commit();
                self.advance_confirms();
            } else {
                self.set_status(Status::Paused, Some(Awaiting::Commit));
            }
            return;
        }
        match self.def.mode {
            Mode::Sequential => {
                let next = self.ex.steps.iter().position(|s| !s.action_succeeded());
                if let Some(j) = next {
                    if self.ex.steps[j].status == StepStatus::Pending {
                        self.start_call(j, Phase::Action);
                    }
                }
            }
            Mode::Concurrent => {
                for j in 0..self.ex.steps.len() {
                    if self.ex.steps[j].status == StepStatus::Pending {
                        self.start_call(j, Phase::Action);
                    }
                }
            }
        }
        let running = self
            .ex
            .steps
            .iter()
            .any(|s| s.status == StepStatus::Running);
        let waiting = self
            .ex
            .steps
            .iter()
            .any(|s| s.status == StepStatus::Waiting);
        if !running && waiting {
            self.set_status(Status::Paused, Some(Awaiting::Reply));
        } else {
            self.set_status(Status::Running, None);
        }
    }

    fn advance_confirms(&mut self) {
        let n = self.ex.steps.len();
        if (0..n).any(|i| self.in_progress(i, Phase::Confirm)) {
            return;
        }
        if let Some(i) = (0..n).find(|&i| self.ex.steps[i].owed == Some(Phase::Confirm)) {
            self.start_call(i, Phase::Confirm);
            return;
        }
        let failed = self
            .ex
            .steps
            .iter()
            .any(|s| s.status == StepStatus::ConfirmFailed);
        self.set_status(
            if failed {
                Status::Failed
            } else {
                Status::Completed
            },
            None,
        );
    }

    fn advance_rollback(&mut self) {
        let n = self.ex.steps.len();
        // Calls in flight are let finish before any compensation starts.
        if self
            .ex
            .steps
            .iter()
            .any(|s| s.in_flight == Some(Phase::Action))
        {
            return;
        }
        let owed = |r: &Self, i: usize| {
            r.ex.steps[i].owed == Some(Phase::Compensation)
                && !r.in_progress(i, Phase::Compensation)
        };
        match self.def.mode {
            Mode::Sequential => {
                if !(0..n).any(|i| self.in_progress(i, Phase::Compensation)) {
                    if let Some(i) = (0..n).rev().find(|&i| owed(self, i)) {
                        self.start_call(i, Phase::Compensation);
                    }
                }
            }
            Mode::Concurrent => {
                for i in 0..n {
                    if owed(self, i) {
                        self.start_call(i, Phase::Compensation);
                    }
                }
            }
        }
        let busy = self
            .ex
            .steps
            .iter()
            .any(|s| s.owed == Some(Phase::Compensation) || s.in_flight.is_some());
        if !busy {
            let failed = self
                .ex
                .steps
                .iter()
                .any(|s| s.status == StepStatus::CompensationFailed);
            self.set_status(
                if failed {
                    Status::Failed
                } else {
                    Status::Compensated
                },
                None,
            );
        }
    }
}

#[cfg(test)]
#[path = "machine_tests.rs"]
mod tests;

#[cfg(test)]
#[path = "sim_tests.rs"]
mod sim_tests;
