//! The state of one execution of a saga, and its serialised (journal) form.
//!
//! [`Execution`] is what the journal stores after every transition (minos'
//! `raw` / `from_raw`): [`Execution::to_raw`] and [`Execution::from_raw`]
//! round-trip it through JSON with a `format_version`. [`Execution::view`]
//! gives the public JSON of API.md §3.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use uuid::Uuid;

use crate::error::{CompensationOutcome, SagaError};
use crate::name::Name;

/// The journal format written by this version.
pub const FORMAT_VERSION: u32 = 1;

/// The id of an execution (a UUID; v7, time-ordered, unless the caller chose one).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ExecutionId(pub Uuid);

impl fmt::Display for ExecutionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl FromStr for ExecutionId {
    type Err = uuid::Error;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Uuid::parse_str(s).map(ExecutionId)
    }
}

/// The status of an execution (API.md §3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Created,
    Running,
    Paused,
    Compensating,
    Completed,
    Compensated,
    Failed,
}

impl Status {
    pub const ALL: [Status; 7] = [
        Status::Created,
        Status::Running,
        Status::Paused,
        Status::Compensating,
        Status::Completed,
        Status::Compensated,
        Status::Failed,
    ];

    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            Status::Completed | Status::Compensated | Status::Failed
        )
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Status::Created => "created",
            Status::Running => "running",
            Status::Paused => "paused",
            Status::Compensating => "compensating",
            Status::Completed => "completed",
            Status::Compensated => "compensated",
            Status::Failed => "failed",
        }
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Status {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Status::ALL
            .into_iter()
            .find(|st| st.as_str() == s)
            .ok_or_else(|| {
                format!(
                    "unknown status {s:?}; expected one of created, running, paused, \
                     compensating, completed, compensated, failed"
                )
            })
    }
}

/// What a paused execution waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Awaiting {
    /// A `callback` step waits for its reply.
    Reply,
    /// `autocommit` is off and every action succeeded.
    Commit,
}

/// The status of one step (API.md §3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StepStatus {
    Pending,
    Running,
    Waiting,
    Succeeded,
    Failed,
    Compensating,
    Compensated,
    CompensationFailed,
    Confirmed,
    ConfirmFailed,
}

impl StepStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            StepStatus::Pending => "pending",
            StepStatus::Running => "running",
            StepStatus::Waiting => "waiting",
            StepStatus::Succeeded => "succeeded",
            StepStatus::Failed => "failed",
            StepStatus::Compensating => "compensating",
            StepStatus::Compensated => "compensated",
            StepStatus::CompensationFailed => "compensation_failed",
            StepStatus::Confirmed => "confirmed",
            StepStatus::ConfirmFailed => "confirm_failed",
        }
    }
}

/// A reply to a `callback` step.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reply {
    /// The step succeeded with this result.
    Ok(Value),
    /// The step was rejected (it is not compensated).
    Err(String),
}

/// Attempts that do not count against a phase's retry budget: calls cut
/// short by a crash, and the budget spent before an operator's `retry`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Exempt {
    #[serde(default, skip_serializing_if = "is_zero")]
    pub action: u32,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub compensation: u32,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub confirm: u32,
}

/// A field that is present is `Some`, even when it is `null`.
fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Value>, D::Error> {
    Value::deserialize(d).map(Some)
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

fn is_false(b: &bool) -> bool {
    !*b
}

fn is_default_exempt(e: &Exempt) -> bool {
    *e == Exempt::default()
}

/// The state of one step within an execution.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepState {
    pub name: Name,
    pub status: StepStatus,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub attempts: u32,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub compensation_attempts: u32,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub confirm_attempts: u32,
    #[serde(default, skip_serializing_if = "is_default_exempt")]
    pub exempt: Exempt,
    /// `Some` exactly when the action succeeded (`Some(Null)` for a null
    /// result: written as `"result": null`, while `None` is not written).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "present"
    )]
    pub result: Option<Value>,
    /// The last error of the action.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compensation_error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub confirm_error: Option<String>,
    /// The action's last attempt failed in a way that may have taken effect.
    #[serde(default, skip_serializing_if = "is_false")]
    pub outcome_unknown: bool,
    /// The phase whose call has been journaled as started and whose outcome
    /// is not yet recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub in_flight: Option<Phase>,
    /// The next retry of the current phase, or a callback's reply deadline.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub due_at_ms: Option<u64>,
    /// A compensation or confirm this step still owes (queued or under way).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owed: Option<Phase>,
    /// The reply received for a `callback` step.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reply: Option<Reply>,
    /// The calls made for this step, oldest first: the last
    /// [`HISTORY_CAP`] of them (the counters above count them all).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub history: Vec<Attempt>,
}

/// At most this many calls are kept in a step's history.
pub const HISTORY_CAP: usize = 16;

/// An error message is kept in the history up to this many bytes.
const HISTORY_ERROR_BYTES: usize = 300;

/// One call of a step, for the timeline.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attempt {
    /// `a`, `c` or `f`: action, compensation or confirm (short: it is
    /// journaled with every transition).
    #[serde(rename = "p", with = "phase_letter")]
    pub phase: Phase,
    #[serde(rename = "n")]
    pub attempt: u32,
    /// When the call was journaled as started, ms since the Unix epoch.
    #[serde(rename = "s")]
    pub started_at_ms: u64,
    /// When its outcome was journaled; `None` while it is in flight.
    #[serde(rename = "e", default, skip_serializing_if = "Option::is_none")]
    pub ended_at_ms: Option<u64>,
    /// How it ended; `None` while it is in flight.
    #[serde(rename = "o", default, skip_serializing_if = "Option::is_none")]
    pub outcome: Option<CallOutcome>,
    #[serde(rename = "x", default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// How a call ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CallOutcome {
    Ok,
    Transient,
    Permanent,
    UnknownOutcome,
    /// Cut short by a restart or a takeover.
    Interrupted,
}

impl CallOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            CallOutcome::Ok => "ok",
            CallOutcome::Transient => "transient",
            CallOutcome::Permanent => "permanent",
            CallOutcome::UnknownOutcome => "unknown_outcome",
            CallOutcome::Interrupted => "interrupted",
        }
    }
}

impl From<crate::ErrorClass> for CallOutcome {
    fn from(c: crate::ErrorClass) -> Self {
        match c {
            crate::ErrorClass::Transient => CallOutcome::Transient,
            crate::ErrorClass::Permanent => CallOutcome::Permanent,
            crate::ErrorClass::UnknownOutcome => CallOutcome::UnknownOutcome,
        }
    }
}

mod phase_letter {
    use super::Phase;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(p: &Phase, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(match p {
            Phase::Action => "a",
            Phase::Compensation => "c",
            Phase::Confirm => "f",
        })
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Phase, D::Error> {
        match String::deserialize(d)?.as_str() {
            "a" => Ok(Phase::Action),
            "c" => Ok(Phase::Compensation),
            "f" => Ok(Phase::Confirm),
            other => Err(serde::de::Error::custom(format!(
                "unknown phase letter {other:?}"
            ))),
        }
    }
}

impl StepState {
    /// Records the start of a call in the history.
    pub(crate) fn began(&mut self, phase: Phase, attempt: u32, now_ms: u64) {
        if self.history.len() == HISTORY_CAP {
            self.history.remove(0);
        }
        self.history.push(Attempt {
            phase,
            attempt,
            started_at_ms: now_ms,
            ended_at_ms: None,
            outcome: None,
            error: None,
        });
    }

    /// Records the end of a call in the history.
    pub(crate) fn ended(
        &mut self,
        phase: Phase,
        attempt: u32,
        now_ms: u64,
        outcome: CallOutcome,
        error: Option<&str>,
    ) {
        if let Some(a) = self
            .history
            .iter_mut()
            .rev()
            .find(|a| a.phase == phase && a.attempt == attempt && a.ended_at_ms.is_none())
        {
            a.ended_at_ms = Some(now_ms.max(a.started_at_ms));
            a.outcome = Some(outcome);
            a.error = error.map(|e| {
                let mut end = e.len().min(HISTORY_ERROR_BYTES);
                while !e.is_char_boundary(end) {
                    end -= 1;
                }
                e[..end].to_string()
            });
        }
    }
}

use crate::definition::Phase;

impl StepState {
    pub fn new(name: impl Into<Name>) -> Self {
        StepState {
            name: name.into(),
            status: StepStatus::Pending,
            attempts: 0,
            compensation_attempts: 0,
            confirm_attempts: 0,
            exempt: Exempt::default(),
            result: None,
            error: None,
            compensation_error: None,
            confirm_error: None,
            outcome_unknown: false,
            in_flight: None,
            due_at_ms: None,
            owed: None,
            reply: None,
            history: Vec::new(),
        }
    }

    /// Calls of `phase` so far.
    pub fn attempts_of(&self, phase: Phase) -> u32 {
        match phase {
            Phase::Action => self.attempts,
            Phase::Compensation => self.compensation_attempts,
            Phase::Confirm => self.confirm_attempts,
        }
    }

    pub(crate) fn attempts_mut(&mut self, phase: Phase) -> &mut u32 {
        match phase {
            Phase::Action => &mut self.attempts,
            Phase::Compensation => &mut self.compensation_attempts,
            Phase::Confirm => &mut self.confirm_attempts,
        }
    }

    pub(crate) fn exempt_mut(&mut self, phase: Phase) -> &mut u32 {
        match phase {
            Phase::Action => &mut self.exempt.action,
            Phase::Compensation => &mut self.exempt.compensation,
            Phase::Confirm => &mut self.exempt.confirm,
        }
    }

    /// Attempts of `phase` that count against its retry budget.
    pub fn counted_attempts(&self, phase: Phase) -> u32 {
        let exempt = match phase {
            Phase::Action => self.exempt.action,
            Phase::Compensation => self.exempt.compensation,
            Phase::Confirm => self.exempt.confirm,
        };
        self.attempts_of(phase).saturating_sub(exempt)
    }

    pub fn action_succeeded(&self) -> bool {
        self.result.is_some()
    }
}

/// The steps of an execution, each shared until it changes: cloning an
/// execution (the journal's copy, a waiter's, a reader's) copies no step,
/// and a transition copies only the steps it changes (copy-on-write). So a
/// transition costs what it changes, not what the saga holds.
///
/// Reads as a slice of [`StepState`] (`steps[i]`, `iter()`, `len()`);
/// `steps[i]` as a place to assign copies that one step first if it is
/// shared. Serialised as a plain list of steps.
#[derive(Debug, Default, PartialEq)]
pub struct Steps(Vec<Arc<StepState>>);

impl Clone for Steps {
    fn clone(&self) -> Self {
        Steps(self.0.clone())
    }

    /// Reuses this list's allocation.
    fn clone_from(&mut self, source: &Self) {
        self.0.clone_from(&source.0);
    }
}

impl Steps {
    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn iter(&self) -> impl ExactSizeIterator<Item = &StepState> + DoubleEndedIterator {
        self.0.iter().map(|s| &**s)
    }

    pub fn get(&self, i: usize) -> Option<&StepState> {
        self.0.get(i).map(|s| &**s)
    }

    pub fn first(&self) -> Option<&StepState> {
        self.get(0)
    }

    pub fn last(&self) -> Option<&StepState> {
        self.0.last().map(|s| &**s)
    }

    /// Every step for writing (each one copied first if it is shared).
    pub fn iter_mut(&mut self) -> impl Iterator<Item = &mut StepState> {
        self.0.iter_mut().map(Arc::make_mut)
    }

    pub fn push(&mut self, step: StepState) {
        self.0.push(Arc::new(step));
    }
}

impl std::ops::Index<usize> for Steps {
    type Output = StepState;
    fn index(&self, i: usize) -> &StepState {
        &self.0[i]
    }
}

impl std::ops::IndexMut<usize> for Steps {
    fn index_mut(&mut self, i: usize) -> &mut StepState {
        Arc::make_mut(&mut self.0[i])
    }
}

impl FromIterator<StepState> for Steps {
    fn from_iter<I: IntoIterator<Item = StepState>>(it: I) -> Self {
        Steps(it.into_iter().map(Arc::new).collect())
    }
}

impl From<Vec<StepState>> for Steps {
    fn from(v: Vec<StepState>) -> Self {
        v.into_iter().collect()
    }
}

impl<'a> IntoIterator for &'a Steps {
    type Item = &'a StepState;
    type IntoIter =
        std::iter::Map<std::slice::Iter<'a, Arc<StepState>>, fn(&Arc<StepState>) -> &StepState>;
    fn into_iter(self) -> Self::IntoIter {
        self.0.iter().map(|s| &**s)
    }
}

impl<'a> IntoIterator for &'a mut Steps {
    type Item = &'a mut StepState;
    type IntoIter = std::iter::Map<
        std::slice::IterMut<'a, Arc<StepState>>,
        fn(&mut Arc<StepState>) -> &mut StepState,
    >;
    fn into_iter(self) -> Self::IntoIter {
        self.0.iter_mut().map(Arc::make_mut)
    }
}

impl Serialize for Steps {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.iter())
    }
}

impl<'de> Deserialize<'de> for Steps {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Vec::<StepState>::deserialize(d).map(Steps::from)
    }
}

/// Why an execution left the happy path: the first step that failed (or
/// `None` after a cancel or a reject) and its message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Failure {
    pub step: Option<String>,
    pub message: String,
}

/// One execution of one version of a saga: the unit the journal stores.
#[derive(Debug, PartialEq, Serialize, Deserialize)]
pub struct Execution {
    pub format_version: u32,
    pub id: ExecutionId,
    pub saga: Name,
    pub saga_version: u32,
    pub status: Status,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub awaiting: Option<Awaiting>,
    /// Shared: a transition never copies it.
    pub input: Arc<Value>,
    pub steps: Steps,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure: Option<Failure>,
    /// The commit decision is taken: confirms run; no rollback any more.
    #[serde(default, skip_serializing_if = "is_false")]
    pub committing: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    pub created_at_ms: u64,
    pub updated_at_ms: u64,
    /// How many transitions have been journaled; the store accepts a write
    /// only when it follows the one it holds.
    pub seq: u64,
}

impl Clone for Execution {
    fn clone(&self) -> Self {
        Execution {
            format_version: self.format_version,
            id: self.id,
            saga: self.saga.clone(),
            saga_version: self.saga_version,
            status: self.status,
            awaiting: self.awaiting,
            input: self.input.clone(),
            steps: self.steps.clone(),
            failure: self.failure.clone(),
            committing: self.committing,
            user: self.user.clone(),
            created_at_ms: self.created_at_ms,
            updated_at_ms: self.updated_at_ms,
            seq: self.seq,
        }
    }

    /// Reuses what this copy holds (the journal's copy of an execution is
    /// overwritten this way at every transition, without allocating).
    fn clone_from(&mut self, source: &Self) {
        let Execution {
            format_version,
            id,
            saga,
            saga_version,
            status,
            awaiting,
            input,
            steps,
            failure,
            committing,
            user,
            created_at_ms,
            updated_at_ms,
            seq,
        } = source;
        self.format_version = *format_version;
        self.id = *id;
        self.saga.clone_from(saga);
        self.saga_version = *saga_version;
        self.status = *status;
        self.awaiting = *awaiting;
        self.input.clone_from(input);
        self.steps.clone_from(steps);
        self.failure.clone_from(failure);
        self.committing = *committing;
        self.user.clone_from(user);
        self.created_at_ms = *created_at_ms;
        self.updated_at_ms = *updated_at_ms;
        self.seq = *seq;
    }
}

/// Why a journal entry could not be read back.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    #[error("journal entry is not valid JSON for an execution: {0}")]
    Json(#[from] serde_json::Error),
    #[error(
        "journal entry has format_version {found}; this build reads up to {FORMAT_VERSION}: \
         upgrade sagatx"
    )]
    FutureVersion { found: u32 },
    #[error("journal entry is inconsistent: {0}")]
    Invariant(String),
}

impl Execution {
    /// A new execution in status `created`.
    pub fn new(
        id: ExecutionId,
        saga: &crate::definition::SagaDefinition,
        saga_version: u32,
        input: Value,
        user: Option<String>,
        now_ms: u64,
    ) -> Self {
        Self::with_names(
            id,
            Name::from(&saga.name),
            saga.steps.iter().map(|s| Name::from(&s.name)),
            saga_version,
            input,
            user,
            now_ms,
        )
    }

    /// A new execution in status `created`, with the saga's and its steps'
    /// names given (shared with whoever holds them already: a runtime that
    /// keeps the names of its sagas makes no copy of them per execution).
    pub fn with_names(
        id: ExecutionId,
        saga: Name,
        steps: impl IntoIterator<Item = Name>,
        saga_version: u32,
        input: Value,
        user: Option<String>,
        now_ms: u64,
    ) -> Self {
        Execution {
            format_version: FORMAT_VERSION,
            id,
            saga,
            saga_version,
            status: Status::Created,
            awaiting: None,
            input: Arc::new(input),
            steps: steps.into_iter().map(StepState::new).collect(),
            failure: None,
            committing: false,
            user,
            created_at_ms: now_ms,
            updated_at_ms: now_ms,
            seq: 0,
        }
    }

    /// The serialised form (minos' `raw`), checked before it is written.
    pub fn to_raw(&self) -> Result<Vec<u8>, DecodeError> {
        self.check_invariants().map_err(DecodeError::Invariant)?;
        // Sized for a typical entry (about 200 bytes per step with a call
        // or two in its history): growing from empty reallocated it seven
        // times per journal write.
        let mut raw = Vec::with_capacity(256 + 256 * self.steps.len());
        crate::journal::encode(self, 0, &mut raw)?;
        // The hand-written encoder must write what the derived `Serialize`
        // (the format's definition) writes: every entry a debug build
        // journals, every test's, is compared.
        debug_assert_eq!(
            String::from_utf8_lossy(&raw),
            String::from_utf8_lossy(&serde_json::to_vec(self)?),
            "the journal encoder and serde disagree"
        );
        Ok(raw)
    }

    /// [`to_raw`](Self::to_raw) with every time written as milliseconds
    /// after `base_ms` (wrapping, so a time before it comes back exactly
    /// too); [`from_raw_relative`](Self::from_raw_relative) with the same
    /// base reads it. A store that keeps `created_at_ms` in a column of its
    /// own writes the entry relative to it: the times then take a digit or
    /// two instead of thirteen, and compress far better.
    pub fn to_raw_relative(&self, base_ms: u64) -> Result<Vec<u8>, DecodeError> {
        self.check_invariants().map_err(DecodeError::Invariant)?;
        let mut raw = Vec::with_capacity(256 + 256 * self.steps.len());
        crate::journal::encode(self, base_ms, &mut raw)?;
        #[cfg(debug_assertions)]
        {
            let back = Self::from_raw_relative(&raw, base_ms)?;
            debug_assert!(back == *self, "a relative entry does not read back");
        }
        Ok(raw)
    }

    /// [`to_raw_relative`](Self::to_raw_relative) with the id's value left
    /// out (`"id":""`), for a store that keeps the id in a column of its
    /// own and puts it back before reading: the 36 characters that differ
    /// from entry to entry are neither written nor compressed.
    pub fn to_raw_relative_without_id(&self, base_ms: u64) -> Result<Vec<u8>, DecodeError> {
        self.check_invariants().map_err(DecodeError::Invariant)?;
        let mut raw = Vec::with_capacity(256 + 256 * self.steps.len());
        crate::journal::encode_with(self, base_ms, false, &mut raw)?;
        #[cfg(debug_assertions)]
        {
            let mut whole = Vec::new();
            crate::journal::encode(self, base_ms, &mut whole)?;
            let id = self.id.0.hyphenated().to_string();
            let at = whole
                .windows(id.len())
                .position(|w| w == id.as_bytes())
                .unwrap_or(whole.len());
            whole.drain(at..(at + id.len()).min(whole.len()));
            debug_assert!(
                whole == raw,
                "the entry without its id is not the entry less its id"
            );
        }
        Ok(raw)
    }

    /// Reads back a serialised execution (minos' `from_raw`), checked after
    /// it is read.
    pub fn from_raw(raw: &[u8]) -> Result<Self, DecodeError> {
        Self::from_raw_relative(raw, 0)
    }

    /// Reads back an entry written by [`to_raw_relative`](Self::to_raw_relative)
    /// with `base_ms` (0: the format itself), checked after the times are
    /// put back.
    pub fn from_raw_relative(raw: &[u8], base_ms: u64) -> Result<Self, DecodeError> {
        #[derive(Deserialize)]
        struct Head {
            format_version: u32,
        }
        // One parse on the way every entry of this version takes; a later
        // version is told as such whether or not its shape still parses
        // (reading the version alone first cost a second pass over every
        // entry: a third of decoding, which recovery does for each one).
        let mut e: Execution = match serde_json::from_slice(raw) {
            Ok(e) => e,
            Err(err) => {
                return Err(match serde_json::from_slice::<Head>(raw) {
                    Ok(head) if head.format_version > FORMAT_VERSION => {
                        DecodeError::FutureVersion {
                            found: head.format_version,
                        }
                    }
                    _ => err.into(),
                });
            }
        };
        if e.format_version > FORMAT_VERSION {
            return Err(DecodeError::FutureVersion {
                found: e.format_version,
            });
        }
        if base_ms != 0 {
            e.shift_times(base_ms);
        }
        e.check_invariants().map_err(DecodeError::Invariant)?;
        Ok(e)
    }

    /// Adds `base_ms` (wrapping) to every time the entry holds: the inverse
    /// of the journal encoder's subtraction.
    fn shift_times(&mut self, base_ms: u64) {
        self.created_at_ms = self.created_at_ms.wrapping_add(base_ms);
        self.updated_at_ms = self.updated_at_ms.wrapping_add(base_ms);
        // Freshly decoded, the steps are not shared: no copy is made.
        for s in self.steps.iter_mut() {
            let StepState {
                due_at_ms, history, ..
            } = s;
            if let Some(d) = due_at_ms {
                *d = d.wrapping_add(base_ms);
            }
            for a in history {
                let Attempt {
                    started_at_ms,
                    ended_at_ms,
                    ..
                } = a;
                *started_at_ms = started_at_ms.wrapping_add(base_ms);
                if let Some(e) = ended_at_ms {
                    *e = e.wrapping_add(base_ms);
                }
            }
        }
    }

    /// The earliest time at which the engine must look at this execution
    /// again (a retry or a reply deadline), if any.
    pub fn next_due_ms(&self) -> Option<u64> {
        if self.status.is_terminal() {
            return None;
        }
        self.steps.iter().filter_map(|s| s.due_at_ms).min()
    }

    /// Whether some call is journaled as started and not yet finished.
    pub fn has_in_flight(&self) -> bool {
        self.steps.iter().any(|s| s.in_flight.is_some())
    }

    /// Every step whose action succeeded, with its result.
    pub fn results(&self) -> Map<String, Value> {
        self.steps
            .iter()
            .filter_map(|s| Some((s.name.as_str().to_owned(), s.result.clone()?)))
            .collect()
    }

    /// The compensations of a rollback: every step that has one and was
    /// rolled back or tried to be.
    pub fn compensations(&self) -> Vec<CompensationOutcome> {
        self.steps
            .iter()
            .filter(|s| {
                s.compensation_attempts > 0
                    || s.owed == Some(Phase::Compensation)
                    || matches!(
                        s.status,
                        StepStatus::Compensating
                            | StepStatus::Compensated
                            | StepStatus::CompensationFailed
                    )
            })
            .map(|s| CompensationOutcome {
                step: s.name.as_str().to_owned(),
                status: s.status,
                error: s.compensation_error.clone(),
            })
            .collect()
    }

    /// The saga error of an execution that left the happy path.
    pub fn saga_error(&self) -> Option<SagaError> {
        let f = self.failure.as_ref()?;
        Some(SagaError {
            step: f.step.clone(),
            message: f.message.clone(),
            compensations: self.compensations(),
        })
    }

    /// The public JSON of API.md §3. Every field is present, `null` when empty.
    pub fn view(&self) -> Value {
        serde_json::to_value(self.view_ref()).unwrap_or(Value::Null)
    }

    /// The same JSON as [`Execution::view`], written straight to a
    /// serializer (the coordinator answers with it without building a JSON
    /// tree first).
    pub fn view_ref(&self) -> ExecutionView<'_> {
        ExecutionView(self)
    }

    /// Appends the JSON of [`Execution::view`] to `out`, written by hand
    /// (the coordinator's answers): the same bytes as serde writes for
    /// [`view_ref`](Self::view_ref), which stays the definition, at about a
    /// third of the cost. Debug builds compare the two at every call.
    pub fn write_view(&self, out: &mut Vec<u8>) -> Result<(), serde_json::Error> {
        let start = out.len();
        crate::view::write(self, out)?;
        debug_assert_eq!(
            String::from_utf8_lossy(&out[start..]),
            String::from_utf8_lossy(&serde_json::to_vec(&self.view_ref())?),
            "the hand-written view and serde disagree"
        );
        Ok(())
    }

    /// Checks the structural invariants that must hold across a durability
    /// boundary (before encoding, after decoding).
    pub fn check_invariants(&self) -> Result<(), String> {
        if self.format_version == 0 || self.format_version > FORMAT_VERSION {
            return Err(format!("bad format_version {}", self.format_version));
        }
        if self.steps.is_empty() {
            return Err("an execution has at least one step".into());
        }
        for s in &self.steps {
            if s.history.len() > HISTORY_CAP {
                return Err(format!(
                    "step {} keeps {} calls in its history",
                    s.name,
                    s.history.len()
                ));
            }
        }
        let paused = self.status == Status::Paused;
        if paused != self.awaiting.is_some() {
            return Err(format!(
                "awaiting is {:?} while status is {}",
                self.awaiting, self.status
            ));
        }
        for s in &self.steps {
            if self.status.is_terminal() && (s.in_flight.is_some() || s.due_at_ms.is_some()) {
                return Err(format!(
                    "step {} has work under way in a terminal execution",
                    s.name
                ));
            }
            if let Some(p) = s.in_flight {
                if s.attempts_of(p) == 0 {
                    return Err(format!(
                        "step {} has a {p} in flight with no attempt",
                        s.name
                    ));
                }
            }
            let compensated = matches!(
                s.status,
                StepStatus::Compensating | StepStatus::Compensated | StepStatus::CompensationFailed
            );
            if compensated && !(s.action_succeeded() || s.outcome_unknown) {
                return Err(format!(
                    "step {} is compensated although its action neither succeeded nor may have",
                    s.name
                ));
            }
            if s.status == StepStatus::Succeeded && !s.action_succeeded() {
                return Err(format!("step {} succeeded without a result", s.name));
            }
        }
        if self.status == Status::Completed
            && self
                .steps
                .iter()
                .any(|s| !matches!(s.status, StepStatus::Succeeded | StepStatus::Confirmed))
        {
            return Err("a completed execution has a step that did not succeed".into());
        }
        Ok(())
    }
}

/// An execution as the API shows it (API.md §3): see
/// [`Execution::view_ref`]. Keys are written in sorted order, as a JSON
/// object of serde_json writes them.
pub struct ExecutionView<'a>(&'a Execution);

impl Serialize for ExecutionView<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let e = self.0;
        let mut m = s.serialize_map(Some(12))?;
        m.serialize_entry(
            "awaiting",
            &e.awaiting.map(|a| match a {
                Awaiting::Reply => "reply",
                Awaiting::Commit => "commit",
            }),
        )?;
        m.serialize_entry("created_at", &format_ms(e.created_at_ms))?;
        m.serialize_entry("error", &e.saga_error().map(ErrorView))?;
        m.serialize_entry("id", &e.id.0)?;
        m.serialize_entry("input", &*e.input)?;
        m.serialize_entry("results", &ResultsView(e))?;
        m.serialize_entry("saga", &e.saga)?;
        m.serialize_entry("saga_version", &e.saga_version)?;
        m.serialize_entry("status", e.status.as_str())?;
        m.serialize_entry("steps", &StepsView(e))?;
        m.serialize_entry("updated_at", &format_ms(e.updated_at_ms))?;
        m.serialize_entry("user", &e.user)?;
        m.end()
    }
}

/// Every succeeded step's result by step name, sorted by name.
struct ResultsView<'a>(&'a Execution);

impl Serialize for ResultsView<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut r: Vec<(&str, &Value)> = self
            .0
            .steps
            .iter()
            .filter_map(|st| Some((st.name.as_str(), st.result.as_ref()?)))
            .collect();
        r.sort_unstable_by(|a, b| a.0.cmp(b.0));
        s.collect_map(r)
    }
}

struct StepsView<'a>(&'a Execution);

impl Serialize for StepsView<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.0.steps.iter().map(StepView))
    }
}

struct StepView<'a>(&'a StepState);

impl Serialize for StepView<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let st = self.0;
        let mut m = s.serialize_map(Some(11))?;
        m.serialize_entry("attempts", &st.attempts)?;
        m.serialize_entry("compensation_attempts", &st.compensation_attempts)?;
        m.serialize_entry("compensation_error", &st.compensation_error)?;
        m.serialize_entry("confirm_attempts", &st.confirm_attempts)?;
        m.serialize_entry("confirm_error", &st.confirm_error)?;
        m.serialize_entry("error", &st.error)?;
        m.serialize_entry("history", &HistoryView(&st.history))?;
        m.serialize_entry("name", &st.name)?;
        m.serialize_entry("next_attempt_at", &st.due_at_ms.map(format_ms))?;
        m.serialize_entry("result", st.result.as_ref().unwrap_or(&Value::Null))?;
        m.serialize_entry("status", st.status.as_str())?;
        m.end()
    }
}

struct HistoryView<'a>(&'a [Attempt]);

impl Serialize for HistoryView<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.0.iter().map(AttemptView))
    }
}

struct AttemptView<'a>(&'a Attempt);

impl Serialize for AttemptView<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let a = self.0;
        let mut m = s.serialize_map(Some(6))?;
        m.serialize_entry("attempt", &a.attempt)?;
        m.serialize_entry("ended_at", &a.ended_at_ms.map(format_ms))?;
        m.serialize_entry("error", &a.error)?;
        m.serialize_entry("outcome", &a.outcome.map(CallOutcome::as_str))?;
        m.serialize_entry("phase", a.phase.as_str())?;
        m.serialize_entry("started_at", &format_ms(a.started_at_ms))?;
        m.end()
    }
}

/// The saga error of the view: `step`, `message`, and each compensation's
/// `step`, `status` and `error`.
struct ErrorView(SagaError);

impl Serialize for ErrorView {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        struct Compensations<'a>(&'a [CompensationOutcome]);
        impl Serialize for Compensations<'_> {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_seq(self.0.iter().map(|c| {
                    let mut m = std::collections::BTreeMap::new();
                    m.insert("error", c.error.as_deref());
                    m.insert("status", Some(c.status.as_str()));
                    m.insert("step", Some(c.step.as_str()));
                    m
                }))
            }
        }
        let mut m = s.serialize_map(Some(3))?;
        m.serialize_entry("compensations", &Compensations(&self.0.compensations))?;
        m.serialize_entry("message", &self.0.message)?;
        m.serialize_entry("step", &self.0.step)?;
        m.end()
    }
}

/// Formats milliseconds since the Unix epoch as RFC 3339 with milliseconds.
pub fn format_ms(ms: u64) -> String {
    // Only ASCII digits and separators are written.
    String::from_utf8_lossy(&rfc3339_ms(ms)).into_owned()
}

/// [`format_ms`] as bytes.
pub(crate) fn rfc3339_ms(ms: u64) -> [u8; 24] {
    // Written by hand: the API's views write several times per answer, and
    // the formatting machinery took as long as the rest of the view.
    let secs = ms / 1000;
    let (days, day_secs) = (secs / 86_400, secs % 86_400);
    let (year, month, day) = civil_from_days(days);
    if year > 9999 {
        // RFC 3339 has four digits for the year (humantime's formatter
        // failed, and `to_string` panicked, past them).
        return *b"9999-12-31T23:59:59.999Z";
    }
    let mut b = *b"0000-00-00T00:00:00.000Z";
    let mut put = |at: usize, width: usize, mut v: u64| {
        for i in (at..at + width).rev() {
            b[i] = b'0' + (v % 10) as u8;
            v /= 10;
        }
    };
    put(0, 4, year);
    put(5, 2, month);
    put(8, 2, day);
    put(11, 2, day_secs / 3600);
    put(14, 2, day_secs % 3600 / 60);
    put(17, 2, day_secs % 60);
    put(20, 3, ms % 1000);
    b
}

/// Year, month and day of a day counted from 1970-01-01 (Howard Hinnant's
/// `civil_from_days`, for days on or after the epoch).
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    (year, month, day)
}
