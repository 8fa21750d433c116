//! The sagatx coordinator: sagas whose steps are HTTP calls, defined in
//! JSON and driven over the HTTP API of API.md §2.
//!
//! - [`serve`]: runs the coordinator on a bound listener until a shutdown
//!   future resolves (tests bind port 0).
//! - [`api::router`]: the axum router, for tests without sockets.
//! - [`HttpCaller`]: the step caller of API.md §4 (rustls, pooled
//!   connections, a bounded number of calls in flight).
//! - [`Capabilities`]: the capabilities of reply URLs.

use std::future::Future;
use std::sync::{Arc, OnceLock};

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use sagatx::{Engine, EngineError, Store, StoreError};
use tokio::net::TcpListener;

pub mod api;
pub mod caller;
pub mod capability;
pub mod dashboard;
pub mod notify;
pub mod openapi;

pub use caller::HttpCaller;
pub use capability::Capabilities;

/// What the handlers share: a cheap clone.
#[derive(Clone)]
pub struct AppState {
    pub engine: Engine,
    pub token: Option<Arc<str>>,
    pub caps: Capabilities,
    pub metrics: PrometheusHandle,
}

/// The process's Prometheus recorder, installed on first use. (A process
/// has one global recorder; several servers in one process share it.)
pub fn metrics_handle() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            const SECONDS: &[f64] = &[
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                10.0, 30.0, 60.0, 300.0,
            ];
            const SIZES: &[f64] = &[
                1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0,
            ];
            let recorder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), SECONDS)
                .and_then(|b| b.set_buckets_for_metric(Matcher::Suffix("_size".into()), SIZES))
                .map(|b| b.build_recorder())
                .unwrap_or_else(|_| PrometheusBuilder::new().build_recorder());
            let handle = recorder.handle();
            // Fails only when another recorder is installed already; then
            // this handle renders nothing, which /metrics shows plainly.
            let _ = metrics::set_global_recorder(recorder);
            handle
        })
        .clone()
}

/// Settings of [`serve`].
#[derive(Debug, Clone, Default)]
pub struct ServerConfig {
    /// Every `/v1` route requires `Authorization: Bearer <token>`.
    pub token: Option<String>,
    /// Where step services reach this server, for reply URLs; by default
    /// `http://` and the listener's address.
    pub public_url: Option<String>,
    /// HTTP calls in flight at most (default [`caller::DEFAULT_MAX_CALLS`]).
    pub max_calls: Option<usize>,
    /// Where to POST status changes (`--notify-url`); none by default.
    pub notify: Option<notify::NotifyConfig>,
}

/// Why the server could not run.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServerError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error("cannot build the HTTP client: {0}")]
    Client(String),
    #[error("the listener failed: {0}")]
    Io(#[from] std::io::Error),
}

/// Makes rustls use the `ring` provider (once per process).
/// The `Location` of a redirect answer, as text (step calls and
/// notifications do not follow redirects; they name where it pointed).
pub(crate) fn redirect_location(resp: &reqwest::Response) -> Option<String> {
    resp.status()
        .is_redirection()
        .then(|| location(resp.headers()))
        .flatten()
}

/// The `Location` header, as text.
pub(crate) fn location(headers: &reqwest::header::HeaderMap) -> Option<String> {
    headers
        .get(reqwest::header::LOCATION)
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
}

pub fn install_crypto() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Builds the engine and state of a coordinator on `store`, and resumes
/// the executions a previous process left unfinished.
pub async fn build(
    store: Arc<dyn Store>,
    base_url: String,
    cfg: &ServerConfig,
) -> Result<AppState, ServerError> {
    // Before the engine exists, so that its first events are recorded.
    let _ = metrics_handle();
    let caps = Capabilities::new(store.secret().await?, base_url);
    let caller = HttpCaller::new(
        caps.clone(),
        cfg.max_calls.unwrap_or(caller::DEFAULT_MAX_CALLS),
    )
    .map_err(|e| ServerError::Client(e.to_string()))?;
    let mut builder = Engine::builder()
        .store_arc(store)
        .remote_caller(Arc::new(caller));
    if let Some(hook) = cfg.notify.clone().and_then(notify::start) {
        builder = builder.on_status(hook);
    }
    let engine = builder.build().await?;
    let report = engine.recover().await?;
    if report.resumed > 0 {
        tracing::info!(resumed = report.resumed, "resumed unfinished executions");
    }
    Ok(AppState {
        engine,
        token: cfg.token.as_deref().map(Arc::from),
        caps,
        metrics: metrics_handle(),
    })
}

/// Serves the coordinator on `listener` until `shutdown` resolves; requests
/// under way finish, calls in flight finish or are left to recovery.
pub async fn serve(
    listener: TcpListener,
    store: Arc<dyn Store>,
    cfg: ServerConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServerError> {
    let addr = listener.local_addr()?;
    let base = cfg
        .public_url
        .clone()
        .unwrap_or_else(|| format!("http://{addr}"));
    let state = build(store, base, &cfg).await?;
    let engine = state.engine.clone();
    tracing::info!(%addr, "sagatx coordinator listening");
    axum::serve(listener, api::router(state))
        .with_graceful_shutdown(shutdown)
        .await?;
    engine.shutdown();
    // Other processes on the same PostgreSQL take this one's executions
    // over now rather than when the leases run out.
    if let Err(e) = engine.release_leases().await {
        tracing::warn!(error = %e, "cannot give the leases up; they run out by themselves");
    }
    Ok(())
}
