//! The HTTP API of API.md §2: thin handlers that translate requests into
//! engine calls. No business rule lives here.

use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{FromRequest, Path, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use sagatx::{EngineError, ExecutionId, ListQuery, Reply, StartOptions, Status, StoreError};
use sagatx_core::{DefinitionError, SagaDefinition};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::AppState;

/// Request bodies larger than this are refused with 413.
pub const MAX_BODY_BYTES: usize = 1 << 20;
/// `?wait=` at most, in seconds.
pub const MAX_WAIT_SECS: u64 = 60;
/// `limit` at most.
pub const MAX_LIMIT: usize = 1000;

/// An error as the API reports it: `{"error": {"code", "message"}}`.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
        }
    }
    fn invalid(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid", message)
    }
    fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({"error": {"code": self.code, "message": self.message}});
        (self.status, Json(body)).into_response()
    }
}

impl From<DefinitionError> for ApiError {
    fn from(e: DefinitionError) -> Self {
        match e {
            DefinitionError::Malformed { .. } => {
                ApiError::new(StatusCode::BAD_REQUEST, "malformed_json", e.to_string())
            }
            _ => ApiError::invalid(e.to_string()),
        }
    }
}

impl From<EngineError> for ApiError {
    fn from(e: EngineError) -> Self {
        let msg = e.to_string();
        match e {
            EngineError::UnknownSaga(_)
            | EngineError::UnknownVersion { .. }
            | EngineError::NotFound(_)
            | EngineError::UnknownStep { .. } => ApiError::not_found(msg),
            EngineError::Definition(d) => d.into(),
            EngineError::Conflict(_)
            | EngineError::Remote {
                conflict: true,
                ..
            } => ApiError::new(StatusCode::CONFLICT, "conflict", msg),
            EngineError::IdTaken(_) => ApiError::new(
                StatusCode::CONFLICT,
                "idempotency_conflict",
                "this Idempotency-Key was used with another body; use a new key for a new execution",
            ),
            EngineError::ShuttingDown => {
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "shutting_down", msg)
            }
            EngineError::Store(StoreError::Corrupt { .. }) => {
                ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "corrupt_journal", msg)
            }
            _ => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "store_unavailable",
                format!("{msg}; the request was not applied, try again"),
            ),
        }
    }
}

type ApiResult<T> = Result<T, ApiError>;

/// The raw body, at most 1 MiB (413 beyond, in the API's error format).
pub struct RawBody(pub Bytes);

impl<S: Send + Sync> FromRequest<S> for RawBody {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        Bytes::from_request(req, state)
            .await
            .map(RawBody)
            .map_err(|e| {
                if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
                    ApiError::new(
                        StatusCode::PAYLOAD_TOO_LARGE,
                        "too_large",
                        format!("the body is larger than {MAX_BODY_BYTES} bytes"),
                    )
                } else {
                    ApiError::new(StatusCode::BAD_REQUEST, "bad_body", e.body_text())
                }
            })
    }
}

/// A JSON body: 413 over 1 MiB, 400 with line and column when it is not
/// JSON, 422 naming the field when it does not fit.
pub struct Body<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for Body<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let RawBody(bytes) = RawBody::from_request(req, state).await?;
        parse_body(&bytes).map(Body)
    }
}

/// Query parameters; a bad one is a 422 that names it.
pub struct Q<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> axum::extract::FromRequestParts<S> for Q<T> {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        _state: &S,
    ) -> Result<Self, Self::Rejection> {
        axum::extract::Query::<T>::try_from_uri(&parts.uri)
            .map(|q| Q(q.0))
            .map_err(|e| ApiError::invalid(format!("query: {}", e.body_text())))
    }
}

fn parse_body<T: DeserializeOwned>(bytes: &[u8]) -> ApiResult<T> {
    let value: Value = serde_json::from_slice(bytes).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "malformed_json",
            format!(
                "malformed JSON at line {}, column {}: {}",
                e.line(),
                e.column(),
                strip_position(&e.to_string())
            ),
        )
    })?;
    // Every body of the API is an object; serde's derive would also read
    // one from an array, its fields in order.
    if !value.is_object() {
        return Err(ApiError::invalid("body: must be a JSON object"));
    }
    serde_path_to_error::deserialize(&value).map_err(|e| {
        let path = e.path().to_string();
        let msg = strip_position(&e.into_inner().to_string());
        let field = if path == "." {
            "body".to_string()
        } else {
            path
        };
        ApiError::invalid(format!("{field}: {msg}"))
    })
}

fn strip_position(msg: &str) -> String {
    match msg.rfind(" at line ") {
        Some(i) => msg[..i].to_string(),
        None => msg.to_string(),
    }
}

/// The router of every route of API.md §2 (the dashboard is its own issue).
pub fn router(state: AppState) -> Router {
    let v1 = Router::new()
        .route("/sagas", post(register).get(list_sagas))
        .route("/sagas/{name}", get(get_saga))
        .route("/sagas/{name}/diagram.svg", get(diagram))
        .route("/summary", get(summary))
        .route("/executions", post(start).get(list_executions))
        .route("/executions/{id}", get(get_execution))
        .route("/executions/{id}/commit", post(commit))
        .route("/executions/{id}/reject", post(reject))
        .route("/executions/{id}/cancel", post(cancel))
        .route("/executions/{id}/retry", post(retry))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_token))
        // The reply route checks a capability or the token itself.
        .route("/executions/{id}/steps/{step}/reply", post(reply));
    Router::new()
        .nest("/v1", v1)
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics_text))
        .route("/openapi.json", get(openapi_json))
        .route("/", get(index))
        .fallback(unknown_route)
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(state)
}

fn bearer_ok(state: &AppState, headers: &HeaderMap) -> bool {
    let Some(token) = &state.token else {
        return true;
    };
    let Some(value) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    match value.strip_prefix("Bearer ") {
        // Constant-time compare: the token is a secret.
        Some(given) => {
            given.len() == token.len()
                && given
                    .bytes()
                    .zip(token.bytes())
                    .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                    == 0
        }
        None => false,
    }
}

fn unauthorized() -> ApiError {
    ApiError::new(
        StatusCode::UNAUTHORIZED,
        "unauthorized",
        "this server requires Authorization: Bearer <token> (the token given to sagatx serve)",
    )
}

async fn require_token(
    State(state): State<AppState>,
    req: Request,
    next: Next,
) -> Result<Response, ApiError> {
    if bearer_ok(&state, req.headers()) {
        Ok(next.run(req).await)
    } else {
        Err(unauthorized())
    }
}

async fn unknown_route(req: Request) -> ApiError {
    ApiError::not_found(format!(
        "no route {} {}; see GET /openapi.json for the API",
        req.method(),
        req.uri().path()
    ))
}

#[utoipa::path(get, path = "/healthz", tag = "operations", responses((status = 200, description = "the store is open"), (status = 503, description = "store unavailable", body = crate::openapi::ErrorBody)))]
pub(crate) async fn healthz(State(state): State<AppState>) -> ApiResult<Json<Value>> {
    state.engine.store().list_definitions().await.map_err(|e| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "store_unavailable",
            e.to_string(),
        )
    })?;
    Ok(Json(match state.engine.store().leases() {
        Some(l) => json!({"status": "ok", "owner": l.owner()}),
        None => json!({"status": "ok"}),
    }))
}

#[utoipa::path(get, path = "/metrics", tag = "operations", responses((status = 200, description = "Prometheus text format", content_type = "text/plain")))]
pub(crate) async fn metrics_text(State(state): State<AppState>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        state.metrics.render(),
    )
}

#[utoipa::path(get, path = "/openapi.json", tag = "operations", responses((status = 200, description = "this document", body = Object)))]
pub(crate) async fn openapi_json() -> Json<Value> {
    Json(crate::openapi::document())
}

#[utoipa::path(get, path = "/", tag = "operations", responses((status = 200, description = "the dashboard", content_type = "text/html")))]
pub(crate) async fn index() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
        crate::dashboard::PAGE,
    )
}

#[derive(Deserialize)]
pub(crate) struct VersionQuery {
    version: Option<u32>,
}

#[utoipa::path(get, path = "/v1/sagas/{name}/diagram.svg", tag = "sagas", params(("name" = String, Path, description = "saga name"), ("version" = Option<u32>, Query, minimum = 1, description = "a version other than the latest")), responses((status = 200, description = "the saga drawn as SVG", content_type = "image/svg+xml"), (status = 404, description = "no such saga or version", body = crate::openapi::ErrorBody), (status = 422, description = "a version that is not a number", body = crate::openapi::ErrorBody)))]
pub(crate) async fn diagram(
    State(state): State<AppState>,
    Path(name): Path<String>,
    Q(q): Q<VersionQuery>,
) -> ApiResult<impl IntoResponse> {
    let (_, def) = state
        .engine
        .store()
        .get_definition(&name, q.version)
        .await
        .map_err(EngineError::from)?
        .ok_or_else(|| ApiError::not_found(format!("no saga named {name:?} with that version")))?;
    Ok((
        [(header::CONTENT_TYPE, "image/svg+xml")],
        crate::dashboard::diagram(&def),
    ))
}

/// An execution answered as its view (API.md §3), written straight into a
/// buffer of about the right size by the hand-written writer
/// (`Execution::write_view`: no JSON tree in between, and not through
/// serde's entry-by-entry map machinery, which cost about 24,000
/// instructions per answer, a twentieth of an HTTP saga).
pub(crate) struct View(sagatx::Execution);

impl IntoResponse for View {
    fn into_response(self) -> Response {
        let mut body = Vec::new();
        json_body(self.0.write_view(&mut body).map(|()| body), "the execution")
    }
}

/// A JSON answer of `body`, or a 500 that says what could not be written.
fn json_body(body: Result<Vec<u8>, serde_json::Error>, what: &str) -> Response {
    match body {
        Ok(body) => (
            [(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static("application/json"),
            )],
            body,
        )
            .into_response(),
        Err(e) => ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            format!("cannot write {what}: {e}"),
        )
        .into_response(),
    }
}

/// A page of executions answered as `{"items": [views], "next_cursor"}`,
/// each view written as [`View`] writes one.
pub(crate) struct ViewPage(sagatx::store::Page);

impl IntoResponse for ViewPage {
    fn into_response(self) -> Response {
        let page = self.0;
        let mut body = Vec::with_capacity(64 + 1024 * page.items.len());
        body.extend_from_slice(b"{\"items\":[");
        let mut written = Ok(());
        for (i, ex) in page.items.iter().enumerate() {
            if i > 0 {
                body.push(b',');
            }
            written = ex.write_view(&mut body);
            if written.is_err() {
                break;
            }
        }
        body.extend_from_slice(b"],\"next_cursor\":");
        match page.next_cursor {
            // A string, as the cursor comes back: opaque to clients.
            Some(c) => {
                body.push(b'"');
                body.extend_from_slice(c.to_string().as_bytes());
                body.push(b'"');
            }
            None => body.extend_from_slice(b"null"),
        }
        body.push(b'}');
        json_body(written.map(|()| body), "the page of executions")
    }
}

/// Paused for longer than this needs attention.
const LONG_PAUSE_MS: u64 = 60_000;
/// The summary lists at most this many failed and this many long-paused
/// executions.
const ATTENTION_EACH: usize = 20;

#[utoipa::path(get, path = "/v1/summary", tag = "executions", responses((status = 200, description = "counts by saga and status (computed by the store), and the executions that need attention: failed, or paused for more than a minute", body = Object), (status = 401, description = "no or wrong token", body = crate::openapi::ErrorBody)))]
pub(crate) async fn summary(State(state): State<AppState>) -> ApiResult<Json<Value>> {
    let s = state
        .engine
        .store()
        .summary()
        .await
        .map_err(EngineError::from)?;
    let counts: Vec<Value> = s
        .counts
        .iter()
        .map(|(saga, status, n)| json!({"saga": saga, "status": status.as_str(), "count": n}))
        .collect();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    // The newest failures, and the executions paused longest (asked of the
    // store by how long they have waited: among the newest paused, a busy
    // saga's fresh pauses would hide them).
    let failed = state
        .engine
        .list(ListQuery {
            status: Some(Status::Failed),
            limit: ATTENTION_EACH,
            ..Default::default()
        })
        .await?;
    let paused = state
        .engine
        .store()
        .paused_before(now.saturating_sub(LONG_PAUSE_MS + 1), ATTENTION_EACH)
        .await
        .map_err(EngineError::from)?;
    // Each paused one also says since when it has waited: its
    // `updated_at` is its last write, which may be later (a reply to one of
    // two callback steps).
    let attention: Vec<Value> = failed
        .items
        .iter()
        .map(|e| e.view())
        .chain(paused.iter().map(|p| {
            let mut v = p.execution.view();
            if let Some(o) = v.as_object_mut() {
                o.insert(
                    "paused_since".into(),
                    json!(sagatx_core::execution::format_ms(p.since_ms)),
                );
            }
            v
        }))
        .collect();
    Ok(Json(json!({"counts": counts, "attention": attention})))
}

fn parse_id(id: &str) -> ApiResult<ExecutionId> {
    id.parse()
        .map_err(|_| ApiError::not_found(format!("no execution with id {id:?} (not a UUID)")))
}

// ---- sagas

#[utoipa::path(post, path = "/v1/sagas", tag = "sagas", request_body(content = crate::openapi::SagaDefinition, description = "A saga definition (API.md §1)"), responses((status = 201, description = "a new version", body = crate::openapi::SagaRef), (status = 200, description = "equal to the latest version", body = crate::openapi::SagaRef), (status = 400, description = "malformed JSON", body = crate::openapi::ErrorBody), (status = 401, description = "no or wrong token", body = crate::openapi::ErrorBody), (status = 413, description = "body over 1 MiB", body = crate::openapi::ErrorBody), (status = 422, description = "invalid; the message names the field", body = crate::openapi::ErrorBody)))]
pub(crate) async fn register(
    State(state): State<AppState>,
    RawBody(body): RawBody,
) -> ApiResult<(StatusCode, Json<Value>)> {
    let def = SagaDefinition::from_json(&body)?;
    let name = def.name.clone();
    let reg = state.engine.register(def).await?;
    let status = if reg.created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(json!({"name": name, "version": reg.version}))))
}

#[utoipa::path(get, path = "/v1/sagas", tag = "sagas", responses((status = 200, description = "every saga with its latest version", body = crate::openapi::SagaList), (status = 401, description = "no or wrong token", body = crate::openapi::ErrorBody)))]
pub(crate) async fn list_sagas(State(state): State<AppState>) -> ApiResult<Json<Value>> {
    let list = state
        .engine
        .store()
        .list_definitions()
        .await
        .map_err(EngineError::from)?;
    let items: Vec<Value> = list
        .into_iter()
        .map(|(name, version)| json!({"name": name, "version": version}))
        .collect();
    Ok(Json(json!({"items": items, "next_cursor": null})))
}

#[utoipa::path(get, path = "/v1/sagas/{name}", tag = "sagas", params(("name" = String, Path, description = "saga name")), responses((status = 200, description = "the latest definition with its version", body = Object), (status = 401, description = "no or wrong token", body = crate::openapi::ErrorBody), (status = 404, description = "not found", body = crate::openapi::ErrorBody)))]
pub(crate) async fn get_saga(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> ApiResult<Json<Value>> {
    let (version, def) = state
        .engine
        .store()
        .get_definition(&name, None)
        .await
        .map_err(EngineError::from)?
        .ok_or_else(|| ApiError::not_found(format!("no saga named {name:?}")))?;
    let mut v = def.to_json();
    if let Some(o) = v.as_object_mut() {
        o.insert("version".into(), json!(version));
    }
    Ok(Json(v))
}

// ---- executions

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct StartBody {
    saga: Value,
    #[serde(default)]
    input: Value,
    #[serde(default)]
    user: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct WaitQuery {
    wait: Option<f64>,
}

fn wait_of(q: &WaitQuery) -> ApiResult<Option<Duration>> {
    match q.wait {
        None => Ok(None),
        Some(w) if w.is_finite() && (0.0..=MAX_WAIT_SECS as f64).contains(&w) => {
            Ok(Some(Duration::from_secs_f64(w)))
        }
        Some(_) => Err(ApiError::invalid(format!(
            "wait: must be a number of seconds from 0 to {MAX_WAIT_SECS}"
        ))),
    }
}

/// The namespace of execution ids derived from an `Idempotency-Key`.
const IDEMPOTENCY_NAMESPACE: uuid::Uuid =
    uuid::Uuid::from_u128(0x5a6a_7478_0000_4000_8000_6964_656d_706f);

#[utoipa::path(post, path = "/v1/executions", tag = "executions", params(("wait" = Option<f64>, Query, minimum = 0, maximum = 60, description = "seconds (at most 60) to wait for a terminal or paused status"), ("Idempotency-Key" = Option<String>, Header, min_length = 1, max_length = 256, pattern = "^[\\t\\x20-\\x7e]+$", description = "makes the request safe to retry")), request_body = crate::openapi::StartRequest, responses((status = 201, description = "started", body = crate::openapi::ExecutionView), (status = 200, description = "the same Idempotency-Key and body again", body = crate::openapi::ExecutionView), (status = 400, description = "malformed JSON", body = crate::openapi::ErrorBody), (status = 401, description = "no or wrong token", body = crate::openapi::ErrorBody), (status = 404, description = "not found", body = crate::openapi::ErrorBody), (status = 409, description = "conflict", body = crate::openapi::ErrorBody), (status = 413, description = "body over 1 MiB", body = crate::openapi::ErrorBody), (status = 422, description = "invalid; the message names the field", body = crate::openapi::ErrorBody)))]
pub(crate) async fn start(
    State(state): State<AppState>,
    Q(q): Q<WaitQuery>,
    headers: HeaderMap,
    Body(body): Body<StartBody>,
) -> ApiResult<(StatusCode, View)> {
    let wait = wait_of(&q)?;
    let (saga, version) = match &body.saga {
        Value::String(name) => (name.clone(), None),
        Value::Object(_) => {
            let def = SagaDefinition::from_value(&body.saga).map_err(|e| match e {
                DefinitionError::Invalid { field, message } => {
                    ApiError::invalid(format!("saga.{field}: {message}"))
                }
                other => other.into(),
            })?;
            let name = def.name.clone();
            let reg = state.engine.register(def).await.map_err(|e| match e {
                EngineError::Definition(DefinitionError::Invalid { field, message }) => {
                    ApiError::invalid(format!("saga.{field}: {message}"))
                }
                other => other.into(),
            })?;
            (name, Some(reg.version))
        }
        _ => {
            return Err(ApiError::invalid(
                "saga: must be a saga name or an inline definition object",
            ))
        }
    };
    let id = match headers.get("idempotency-key") {
        Some(k) => {
            let k = k
                .to_str()
                .ok()
                .filter(|k| !k.is_empty() && k.len() <= 256)
                .ok_or_else(|| {
                    ApiError::invalid("Idempotency-Key: must be 1 to 256 visible ASCII characters")
                })?;
            Some(ExecutionId(uuid::Uuid::new_v5(
                &IDEMPOTENCY_NAMESPACE,
                k.as_bytes(),
            )))
        }
        None => None,
    };
    // Without `wait`, the state as created; with it, the state once
    // terminal or paused (or when the time runs out). A new execution's
    // answer needs no read of the store.
    let (started, ex) = state
        .engine
        .start_and_wait(
            &saga,
            body.input,
            StartOptions {
                id,
                user: body.user,
                version,
            },
            Some(wait.unwrap_or(Duration::ZERO)),
        )
        .await?;
    let status = if started.created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, View(ex)))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ListParams {
    status: Option<String>,
    saga: Option<String>,
    limit: Option<usize>,
    cursor: Option<String>,
}

#[utoipa::path(get, path = "/v1/executions", tag = "executions", params(("status" = Option<crate::openapi::ExecutionStatus>, Query, description = "filter by status"), ("saga" = Option<String>, Query, description = "filter by saga name"), ("limit" = Option<usize>, Query, minimum = 1, maximum = 1000, description = "default 50, at most 1000"), ("cursor" = Option<String>, Query, min_length = 1, description = "the previous page's next_cursor")), responses((status = 200, description = "newest first", body = crate::openapi::ExecutionPage), (status = 401, description = "no or wrong token", body = crate::openapi::ErrorBody), (status = 422, description = "invalid; the message names the field", body = crate::openapi::ErrorBody)))]
pub(crate) async fn list_executions(
    State(state): State<AppState>,
    Q(p): Q<ListParams>,
) -> ApiResult<ViewPage> {
    let limit = p.limit.unwrap_or(50);
    if limit == 0 || limit > MAX_LIMIT {
        return Err(ApiError::invalid(format!(
            "limit: must be from 1 to {MAX_LIMIT}"
        )));
    }
    let status = p
        .status
        .map(|s| s.parse::<Status>())
        .transpose()
        .map_err(|e| ApiError::invalid(format!("status: {e}")))?;
    let cursor = p
        .cursor
        .map(|c| c.parse::<u64>())
        .transpose()
        .map_err(|_| {
            ApiError::invalid("cursor: not a cursor from a previous page's next_cursor")
        })?;
    let page = state
        .engine
        .list(ListQuery {
            status,
            saga: p.saga,
            limit,
            cursor,
        })
        .await?;
    Ok(ViewPage(page))
}

#[utoipa::path(get, path = "/v1/executions/{id}", tag = "executions", params(("id" = String, Path, description = "execution id")), responses((status = 200, description = "the execution", body = crate::openapi::ExecutionView), (status = 401, description = "no or wrong token", body = crate::openapi::ErrorBody), (status = 404, description = "not found", body = crate::openapi::ErrorBody)))]
pub(crate) async fn get_execution(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> ApiResult<View> {
    let ex = state.engine.get(parse_id(&id)?).await?;
    Ok(View(ex))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ReplyBody {
    ok: bool,
    #[serde(default)]
    result: Value,
    #[serde(default)]
    error: Option<String>,
}

#[derive(Deserialize)]
pub(crate) struct CapQuery {
    cap: Option<String>,
}

#[utoipa::path(post, path = "/v1/executions/{id}/steps/{step}/reply", tag = "executions", params(("id" = String, Path, description = "execution id"), ("step" = String, Path, description = "step name"), ("cap" = Option<String>, Query, description = "the capability of the step's reply_url; replaces the bearer token")), request_body = crate::openapi::ReplyRequest, responses((status = 202, description = "accepted (again: no second effect)", body = crate::openapi::ExecutionView), (status = 400, description = "malformed JSON", body = crate::openapi::ErrorBody), (status = 401, description = "no or wrong token", body = crate::openapi::ErrorBody), (status = 404, description = "not found", body = crate::openapi::ErrorBody), (status = 409, description = "conflict", body = crate::openapi::ErrorBody), (status = 422, description = "invalid; the message names the field", body = crate::openapi::ErrorBody)))]
pub(crate) async fn reply(
    State(state): State<AppState>,
    Path((id, step)): Path<(String, String)>,
    Q(q): Q<CapQuery>,
    headers: HeaderMap,
    Body(body): Body<ReplyBody>,
) -> ApiResult<(StatusCode, View)> {
    let id = parse_id(&id)?;
    let cap_ok = q.cap.as_deref().map(|c| state.caps.verify(id, &step, c));
    match cap_ok {
        Some(false) => {
            return Err(ApiError::new(
                StatusCode::UNAUTHORIZED,
                "bad_capability",
                "the cap parameter does not open this step; use the reply_url the step received",
            ))
        }
        Some(true) => {}
        None if bearer_ok(&state, &headers) => {}
        None => return Err(unauthorized()),
    }
    let reply = if body.ok {
        Reply::Ok(body.result)
    } else {
        Reply::Err(body.error.unwrap_or_else(|| "rejected".to_string()))
    };
    let ex = state.engine.reply(id, &step, reply).await?;
    Ok((StatusCode::ACCEPTED, View(ex)))
}

#[utoipa::path(post, path = "/v1/executions/{id}/commit", tag = "executions", description = "run the confirms (autocommit false)", params(("id" = String, Path, description = "execution id")), responses((status = 202, description = "accepted", body = crate::openapi::ExecutionView), (status = 401, description = "no or wrong token", body = crate::openapi::ErrorBody), (status = 404, description = "not found", body = crate::openapi::ErrorBody), (status = 409, description = "conflict", body = crate::openapi::ErrorBody)))]
pub(crate) async fn commit(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> ApiResult<(StatusCode, View)> {
    let ex = state.engine.commit(parse_id(&id)?).await?;
    Ok((StatusCode::ACCEPTED, View(ex)))
}

#[utoipa::path(post, path = "/v1/executions/{id}/reject", tag = "executions", description = "compensate (autocommit false)", params(("id" = String, Path, description = "execution id")), responses((status = 202, description = "accepted", body = crate::openapi::ExecutionView), (status = 401, description = "no or wrong token", body = crate::openapi::ErrorBody), (status = 404, description = "not found", body = crate::openapi::ErrorBody), (status = 409, description = "conflict", body = crate::openapi::ErrorBody)))]
pub(crate) async fn reject(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> ApiResult<(StatusCode, View)> {
    let ex = state.engine.reject(parse_id(&id)?).await?;
    Ok((StatusCode::ACCEPTED, View(ex)))
}

#[utoipa::path(post, path = "/v1/executions/{id}/cancel", tag = "executions", description = "stop and compensate", params(("id" = String, Path, description = "execution id")), responses((status = 202, description = "accepted", body = crate::openapi::ExecutionView), (status = 401, description = "no or wrong token", body = crate::openapi::ErrorBody), (status = 404, description = "not found", body = crate::openapi::ErrorBody), (status = 409, description = "conflict", body = crate::openapi::ErrorBody)))]
pub(crate) async fn cancel(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> ApiResult<(StatusCode, View)> {
    let ex = state.engine.cancel(parse_id(&id)?).await?;
    Ok((StatusCode::ACCEPTED, View(ex)))
}

#[utoipa::path(post, path = "/v1/executions/{id}/retry", tag = "executions", description = "resume failed compensations or confirms", params(("id" = String, Path, description = "execution id")), responses((status = 202, description = "accepted", body = crate::openapi::ExecutionView), (status = 401, description = "no or wrong token", body = crate::openapi::ErrorBody), (status = 404, description = "not found", body = crate::openapi::ErrorBody), (status = 409, description = "conflict", body = crate::openapi::ErrorBody)))]
pub(crate) async fn retry(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> ApiResult<(StatusCode, View)> {
    let ex = state.engine.retry(parse_id(&id)?).await?;
    Ok((StatusCode::ACCEPTED, View(ex)))
}
