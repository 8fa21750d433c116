//! Step errors and their classes, and the saga error a caller receives.

use serde::{Deserialize, Serialize};

use crate::execution::StepStatus;

/// What kind of failure a step error is. The class, not the error's type,
/// decides whether a call is retried and whether the step is compensated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum ErrorClass {
    /// A passing condition (HTTP 408/425/429/5xx, a refused connection):
    /// retried; when attempts run out the step may have taken effect, so it
    /// is compensated.
    Transient,
    /// A definite rejection (any other 4xx, a business "no"): not retried,
    /// and the step is not compensated: it did nothing.
    Permanent,
    /// The call may or may not have taken effect (a timeout, a crash while
    /// the call was in flight): retried like a transient error and
    /// compensated when attempts run out.
    UnknownOutcome,
}

impl ErrorClass {
    pub fn is_retryable(self) -> bool {
        !matches!(self, ErrorClass::Permanent)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ErrorClass::Transient => "transient",
            ErrorClass::Permanent => "permanent",
            ErrorClass::UnknownOutcome => "unknown_outcome",
        }
    }
}

/// The error a step's call returns.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{message} ({})", class.as_str())]
pub struct StepError {
    pub class: ErrorClass,
    pub message: String,
}

impl StepError {
    pub fn new(class: ErrorClass, message: impl Into<String>) -> Self {
        StepError {
            class,
            message: message.into(),
        }
    }
    pub fn transient(message: impl Into<String>) -> Self {
        Self::new(ErrorClass::Transient, message)
    }
    pub fn permanent(message: impl Into<String>) -> Self {
        Self::new(ErrorClass::Permanent, message)
    }
    pub fn unknown_outcome(message: impl Into<String>) -> Self {
        Self::new(ErrorClass::UnknownOutcome, message)
    }
}

/// The outcome of one compensation in a rolled-back saga.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CompensationOutcome {
    pub step: String,
    pub status: StepStatus,
    pub error: Option<String>,
}

/// Why a saga did not complete: the step that failed first (`None` after a
/// cancel or a reject), its error, and what became of every compensation
/// (py-api-saga's `SagaException`: the failing operation, its error, the
/// compensation results and the compensation errors).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("saga failed at {}: {message}", step.as_deref().unwrap_or("(no step)"))]
pub struct SagaError {
    pub step: Option<String>,
    pub message: String,
    pub compensations: Vec<CompensationOutcome>,
}

impl SagaError {
    /// The compensations that succeeded.
    pub fn compensated(&self) -> impl Iterator<Item = &CompensationOutcome> {
        self.compensations
            .iter()
            .filter(|c| c.status == StepStatus::Compensated)
    }

    /// The compensations that failed, with their errors.
    pub fn compensation_errors(&self) -> impl Iterator<Item = (&str, &str)> {
        self.compensations
            .iter()
            .filter_map(|c| Some((c.step.as_str(), c.error.as_deref()?)))
    }
}
