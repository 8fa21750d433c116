//! The OpenAPI 3 document of the API, generated from the handlers'
//! annotations (utoipa) and the shapes below. `GET /openapi.json` serves it;
//! a test checks that every route of the router is in it.

use serde_json::Value;
use utoipa::{OpenApi, ToSchema};

/// A registered definition's name and version.
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct SagaRef {
    pub name: String,
    pub version: u32,
}

/// A list of definitions.
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct SagaList {
    pub items: Vec<SagaRef>,
    pub next_cursor: Option<String>,
}

/// `POST /v1/executions`.
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct StartRequest {
    /// A saga name, or an inline definition (registered as by `POST /v1/sagas`).
    pub saga: Value,
    /// Any JSON; given to every step.
    pub input: Option<Value>,
    /// Recorded on the execution.
    pub user: Option<String>,
}

/// A `callback` step's outcome.
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct ReplyRequest {
    pub ok: bool,
    /// The step's result when `ok`.
    pub result: Option<Value>,
    /// Why the step failed when not `ok`.
    pub error: Option<String>,
}

/// One step of an execution.
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct StepView {
    pub name: String,
    /// pending, running, waiting, succeeded, failed, compensating,
    /// compensated, compensation_failed, confirmed, confirm_failed
    pub status: String,
    pub attempts: u32,
    pub compensation_attempts: u32,
    pub confirm_attempts: u32,
    pub result: Option<Value>,
    pub error: Option<String>,
    pub compensation_error: Option<String>,
    pub confirm_error: Option<String>,
    /// RFC 3339; the next retry or reply deadline.
    pub next_attempt_at: Option<String>,
    /// The last 16 calls of the step, oldest first.
    pub history: Vec<AttemptView>,
}

/// One call of a step.
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct AttemptView {
    /// action, compensation or confirm
    pub phase: String,
    pub attempt: u32,
    /// RFC 3339
    pub started_at: String,
    /// RFC 3339; null while in flight
    pub ended_at: Option<String>,
    /// ok, transient, permanent, unknown_outcome, interrupted; null while in flight
    pub outcome: Option<String>,
    pub error: Option<String>,
}

/// A compensation in an execution's error.
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct CompensationView {
    pub step: String,
    pub status: String,
    pub error: Option<String>,
}

/// Why an execution did not complete.
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct ExecutionErrorView {
    /// The first step that failed; null after a cancel or reject.
    pub step: Option<String>,
    pub message: String,
    pub compensations: Vec<CompensationView>,
}

/// An execution (API.md §3).
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct ExecutionView {
    pub id: String,
    pub saga: String,
    pub saga_version: u32,
    /// created, running, paused, compensating, completed, compensated, failed
    pub status: String,
    /// reply or commit when paused
    pub awaiting: Option<String>,
    pub input: Value,
    pub results: Value,
    pub steps: Vec<StepView>,
    pub error: Option<ExecutionErrorView>,
    pub user: Option<String>,
    pub created_at: String,
    pub updated_at: String,
}

/// A page of executions, newest first.
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct ExecutionPage {
    pub items: Vec<ExecutionView>,
    /// Pass as `cursor` for the next page; null on the last.
    pub next_cursor: Option<String>,
}

/// The detail of an error.
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct ErrorDetail {
    pub code: String,
    pub message: String,
}

/// Every error: `{"error": {"code", "message"}}`.
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "sagatx coordinator",
        description = "Sagas whose steps are HTTP calls (API.md §2)."
    ),
    paths(
        crate::api::register,
        crate::api::list_sagas,
        crate::api::get_saga,
        crate::api::diagram,
        crate::api::summary,
        crate::api::start,
        crate::api::list_executions,
        crate::api::get_execution,
        crate::api::reply,
        crate::api::commit,
        crate::api::reject,
        crate::api::cancel,
        crate::api::retry,
        crate::api::healthz,
        crate::api::metrics_text,
        crate::api::openapi_json,
        crate::api::index,
    ),
    components(schemas(
        SagaRef,
        SagaList,
        StartRequest,
        ReplyRequest,
        StepView,
        AttemptView,
        CompensationView,
        ExecutionErrorView,
        ExecutionView,
        ExecutionPage,
        ErrorDetail,
        ErrorBody
    ))
)]
pub struct ApiDoc;

/// The document as JSON.
pub fn document() -> Value {
    serde_json::to_value(ApiDoc::openapi()).unwrap_or(Value::Null)
}
