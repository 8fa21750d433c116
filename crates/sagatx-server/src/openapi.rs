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

/// An HTTP call the coordinator makes: an action, compensation or confirm.
#[derive(ToSchema)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
pub struct HttpCall {
    /// An `http://` or `https://` URL naming a host; at most 2048
    /// characters, no spaces or control characters.
    #[schema(
        pattern = "^https?://[^\\s\\x00-\\x1f\\x7f-\\x9f/?#:][^\\s\\x00-\\x1f\\x7f-\\x9f/?#]*([/?#][^\\s\\x00-\\x1f\\x7f-\\x9f]*)?$",
        max_length = 2048
    )]
    pub url: String,
    /// Default `POST`.
    #[serde(default)]
    pub method: HttpMethod,
    /// Sent with every call: names of HTTP token characters, values
    /// without line breaks.
    #[serde(default)]
    pub headers: std::collections::BTreeMap<String, String>,
}

/// The methods a call may use.
#[derive(ToSchema)]
#[allow(dead_code, clippy::upper_case_acronyms)]
pub enum HttpMethod {
    POST,
    PUT,
    PATCH,
    DELETE,
    GET,
}

/// A retry policy: each field overrides the level above it (step over saga
/// over the defaults: 3 attempts, 100 ms, 30000 ms, 2.0).
#[derive(ToSchema)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
pub struct RetryPolicy {
    #[serde(default)]
    #[schema(minimum = 1, maximum = 1000)]
    pub max_attempts: Option<u32>,
    #[serde(default)]
    #[schema(minimum = 0, maximum = 86400000)]
    pub initial_backoff_ms: Option<u64>,
    /// At least `initial_backoff_ms`.
    #[serde(default)]
    #[schema(minimum = 0, maximum = 86400000)]
    pub max_backoff_ms: Option<u64>,
    #[serde(default)]
    #[schema(minimum = 1.0, maximum = 100.0)]
    pub multiplier: Option<f64>,
}

/// How a saga's actions run.
#[derive(ToSchema)]
#[serde(rename_all = "snake_case")]
#[allow(dead_code)]
pub enum Mode {
    Sequential,
    Concurrent,
}

/// What an action's outcome is: its response (`sync`), or a reply posted
/// later (`callback`).
#[derive(ToSchema)]
#[serde(rename_all = "snake_case")]
#[allow(dead_code)]
pub enum ReplyMode {
    Sync,
    Callback,
}

/// One step of a definition.
#[derive(ToSchema)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
pub struct StepDefinition {
    /// Unique within the saga.
    #[schema(pattern = "^[a-z0-9_.-]{1,64}$")]
    pub name: String,
    pub action: HttpCall,
    #[serde(default)]
    pub compensation: Option<HttpCall>,
    #[serde(default)]
    pub confirm: Option<HttpCall>,
    /// Default `sync`.
    #[serde(default)]
    pub reply: ReplyMode,
    /// Per attempt for `sync` (default 10000); the wait for the reply for
    /// `callback` (default none).
    #[serde(default)]
    #[schema(minimum = 1, maximum = 2592000000_u64)]
    pub timeout_ms: Option<u64>,
    #[serde(default)]
    pub retry: RetryPolicy,
}

/// A saga definition (API.md §1).
#[derive(ToSchema)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
pub struct SagaDefinition {
    #[schema(pattern = "^[a-z0-9_.-]{1,64}$")]
    pub name: String,
    /// Default `sequential`.
    #[serde(default)]
    pub mode: Mode,
    /// Default `true`; `false` stops a saga whose actions all succeeded in
    /// `paused`, awaiting commit or reject.
    #[serde(default)]
    pub autocommit: bool,
    #[serde(default)]
    pub retry: RetryPolicy,
    /// 1 to 256 steps with unique names.
    #[schema(min_items = 1, max_items = 256)]
    pub steps: Vec<StepDefinition>,
}

/// The name of a registered saga.
#[derive(ToSchema)]
#[schema(pattern = "^[a-z0-9_.-]{1,64}$")]
#[allow(dead_code)]
pub struct SagaName(String);

/// A saga name, or an inline definition.
#[derive(ToSchema)]
#[serde(untagged)]
#[allow(dead_code)]
pub enum SagaOrDefinition {
    Name(SagaName),
    Definition(SagaDefinition),
}

/// `POST /v1/executions`.
#[derive(ToSchema)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
pub struct StartRequest {
    /// A saga name, or an inline definition (registered as by `POST /v1/sagas`).
    pub saga: SagaOrDefinition,
    /// Any JSON; given to every step.
    #[serde(default)]
    pub input: Option<Value>,
    /// Recorded on the execution.
    #[serde(default)]
    pub user: Option<String>,
}

/// A `callback` step's outcome.
#[derive(ToSchema)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
pub struct ReplyRequest {
    pub ok: bool,
    /// The step's result when `ok`.
    #[serde(default)]
    pub result: Option<Value>,
    /// Why the step failed when not `ok`.
    #[serde(default)]
    pub error: Option<String>,
}

/// The statuses of an execution (API.md §3).
#[derive(ToSchema)]
#[serde(rename_all = "snake_case")]
#[allow(dead_code)]
pub enum ExecutionStatus {
    Created,
    Running,
    Paused,
    Compensating,
    Completed,
    Compensated,
    Failed,
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
        HttpCall,
        HttpMethod,
        RetryPolicy,
        Mode,
        ReplyMode,
        StepDefinition,
        SagaDefinition,
        SagaName,
        SagaOrDefinition,
        StartRequest,
        ReplyRequest,
        ExecutionStatus,
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
    let mut doc = serde_json::to_value(ApiDoc::openapi()).unwrap_or(Value::Null);
    add_links(&mut doc);
    doc
}

/// OpenAPI links: what a response's id or name opens next (for a client,
/// and for a stateful fuzzer that follows them). utoipa's annotations
/// have no place for them.
fn add_links(doc: &mut Value) {
    let execution = ["get_execution", "cancel", "commit", "reject", "retry"]
        .into_iter()
        .map(|op| {
            (
                op.to_string(),
                serde_json::json!({"operationId": op, "parameters": {"id": "$response.body#/id"}}),
            )
        })
        .chain(std::iter::once((
            "reply".to_string(),
            serde_json::json!({"operationId": "reply", "parameters": {
                "id": "$response.body#/id", "step": "$response.body#/steps/0/name"}}),
        )))
        .collect::<serde_json::Map<_, _>>();
    let saga = ["get_saga", "diagram"]
        .into_iter()
        .map(|op| {
            (
                op.to_string(),
                serde_json::json!({"operationId": op, "parameters": {"name": "$response.body#/name"}}),
            )
        })
        .collect::<serde_json::Map<_, _>>();
    for (path, method, links) in [
        ("/v1/executions", "post", &execution),
        ("/v1/sagas", "post", &saga),
    ] {
        for status in ["200", "201"] {
            if let Some(r) = doc
                .pointer_mut(&format!(
                    "/paths/{}/{method}/responses/{status}",
                    path.replace('/', "~1")
                ))
                .and_then(Value::as_object_mut)
            {
                r.insert("links".into(), Value::Object(links.clone()));
            }
        }
    }
}
