//! The HTTP step caller: makes the calls of API.md §4 and classifies their
//! outcomes.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use reqwest::header::{HeaderMap, HeaderName, HeaderValue, ACCEPT, CONTENT_TYPE, USER_AGENT};
use sagatx::{RemoteCaller, StepContext};
use sagatx_core::{HttpEndpoint, StepError};
use serde_json::Value;
use tokio::sync::Semaphore;
use tokio::time::Instant;

use crate::capability::Capabilities;

/// Calls in flight at most, by default.
pub const DEFAULT_MAX_CALLS: usize = 1024;
/// A response body larger than this is not read (the call is failed).
pub const MAX_RESPONSE_BYTES: usize = 1 << 20;

/// The `User-Agent` of every call.
const AGENT: &str = concat!("sagatx/", env!("CARGO_PKG_VERSION"));
/// How long an idle pooled connection is kept.
const POOL_IDLE: Duration = Duration::from_secs(60);
/// Idle pooled connections kept per step service at most.
const POOL_IDLE_PER_HOST: usize = 256;

/// Calls step URLs over HTTP, reusing connections.
///
/// A plain `http://` URL is called through hyper's client directly; an
/// `https://` one (rustls), one with credentials in it, or any call when
/// the environment names a proxy (`HTTP_PROXY`, `ALL_PROXY`, in either
/// case), through reqwest.
///
/// reqwest's redirect and retry layers parse every call's URL twice even
/// with redirects off: 14 % of the coordinator's instructions per saga
/// (callgrind, `bench/server-instructions.sh`). Both paths send the same
/// request (method, body, the headers of API.md §4, `User-Agent`,
/// `Accept: */*`) and read the answer the same way.
pub struct HttpCaller {
    client: reqwest::Client,
    plain: hyper_util::client::legacy::Client<HttpConnector, Full<Bytes>>,
    slots: Arc<Semaphore>,
    caps: Capabilities,
    urls: Urls,
}

impl HttpCaller {
    pub fn new(caps: Capabilities, max_calls: usize) -> Result<Self, reqwest::Error> {
        Self::with_routes(caps, max_calls, !proxied())
    }

    /// [`HttpCaller::new`], with plain `http://` URLs going through
    /// hyper's client directly when `direct`, through reqwest otherwise.
    fn with_routes(
        caps: Capabilities,
        max_calls: usize,
        direct: bool,
    ) -> Result<Self, reqwest::Error> {
        crate::install_crypto();
        let client = reqwest::Client::builder()
            .pool_idle_timeout(POOL_IDLE)
            .pool_max_idle_per_host(POOL_IDLE_PER_HOST)
            .user_agent(AGENT)
            // A redirect is an answer like any other non-2xx (a permanent
            // rejection, API.md §4): following it would turn a POST into a
            // GET without its body (301-303), or carry the call and its
            // reply capability to a URL the definition does not name.
            .redirect(reqwest::redirect::Policy::none())
            .build()?;
        let mut connector = HttpConnector::new();
        // As reqwest: small requests and answers go out at once.
        connector.set_nodelay(true);
        let plain = hyper_util::client::legacy::Client::builder(TokioExecutor::new())
            .pool_idle_timeout(POOL_IDLE)
            .pool_max_idle_per_host(POOL_IDLE_PER_HOST)
            .pool_timer(TokioTimer::new())
            .build(connector);
        Ok(HttpCaller {
            client,
            plain,
            slots: Arc::new(Semaphore::new(max_calls.max(1))),
            caps,
            urls: Urls::new(direct),
        })
    }
}

/// Whether the environment names a proxy that reqwest would use for
/// plain HTTP.
fn proxied() -> bool {
    ["HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"]
        .iter()
        .any(|k| std::env::var_os(k).is_some_and(|v| !v.is_empty()))
}

/// The request body every step URL receives (API.md §4), written straight
/// from the context (no JSON tree built first: a tree per call, then its
/// text, cost the server a few per cent of its time).
#[derive(serde::Serialize)]
struct Envelope<'a> {
    execution_id: String,
    saga: &'a str,
    step: &'a str,
    phase: &'a str,
    attempt: u32,
    input: &'a Value,
    results: &'a sagatx::Results,
    #[serde(skip_serializing_if = "Option::is_none")]
    reply_url: Option<&'a str>,
}

impl<'a> Envelope<'a> {
    fn of(ctx: &'a StepContext, reply_url: Option<&'a str>) -> Self {
        Envelope {
            execution_id: ctx.execution_id().to_string(),
            saga: ctx.saga(),
            step: ctx.step(),
            phase: ctx.phase().as_str(),
            attempt: ctx.attempt(),
            input: ctx.input(),
            results: ctx.results(),
            reply_url,
        }
    }
}

/// The request body every step URL receives (API.md §4), as JSON.
pub fn envelope(ctx: &StepContext, reply_url: Option<&str>) -> Value {
    serde_json::to_value(Envelope::of(ctx, reply_url)).unwrap_or(Value::Null)
}

/// W3C trace context: the execution id is the trace id, each call a span
/// (its id the next of a process-wide stream, scrambled: unique in the
/// process without a system call for randomness per call).
fn traceparent(ctx: &StepContext) -> String {
    static NEXT: std::sync::OnceLock<std::sync::atomic::AtomicU64> = std::sync::OnceLock::new();
    let next = NEXT.get_or_init(|| {
        use std::hash::BuildHasher;
        std::sync::atomic::AtomicU64::new(
            std::collections::hash_map::RandomState::new().hash_one(std::process::id()),
        )
    });
    let mut z = next
        .fetch_add(0x9E37_79B9_7F4A_7C15, std::sync::atomic::Ordering::Relaxed)
        .wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    // An all-zero span id is invalid in W3C trace context.
    let span = (z ^ (z >> 31)).max(1);
    // Put together by hand (`format!` cost a thousand instructions per
    // call): version, trace id (the execution's), span id, flags.
    let mut buf = uuid::Uuid::encode_buffer();
    let trace = ctx.execution_id().0.simple().encode_lower(&mut buf);
    let mut header = String::with_capacity(55);
    header.push_str("00-");
    header.push_str(trace);
    header.push('-');
    for shift in (0..16).rev() {
        let nibble = (span >> (shift * 4)) & 0xF;
        header.push(char::from(b"0123456789abcdef"[nibble as usize]));
    }
    header.push_str("-01");
    header
}

/// Step URLs parsed once: parsing one (with its host's IDNA mapping) at
/// every call was a few per cent of the server's time. Bounded: past
/// [`URLS_KEPT`] distinct URLs it starts afresh.
struct Urls {
    /// Whether plain `http://` URLs go through hyper's client directly.
    direct: bool,
    parsed: std::sync::Mutex<std::collections::HashMap<String, Arc<Target>>>,
}

/// A step URL, parsed.
#[derive(Debug, PartialEq)]
struct Target {
    url: reqwest::Url,
    /// The URI to call through hyper's client, when the URL goes that way.
    direct: Option<http::Uri>,
}

/// Distinct step URLs kept parsed at most.
const URLS_KEPT: usize = 4096;

impl Urls {
    fn new(direct: bool) -> Self {
        Urls {
            direct,
            parsed: Default::default(),
        }
    }

    fn get(&self, url: &str) -> Result<Arc<Target>, StepError> {
        let mut m = self.parsed.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(t) = m.get(url) {
            return Ok(t.clone());
        }
        let parsed = reqwest::Url::parse(url).map_err(|e| {
            StepError::permanent(format!("the step URL {url:?} is not a valid URL: {e}"))
        })?;
        // A URL with credentials in it goes through reqwest, which turns
        // them into a Basic `Authorization` header.
        let plain = parsed.scheme() == "http"
            && parsed.username().is_empty()
            && parsed.password().is_none();
        let direct = (self.direct && plain)
            .then(|| http::Uri::try_from(parsed.as_str()).ok())
            .flatten();
        let target = Arc::new(Target {
            url: parsed,
            direct,
        });
        if m.len() >= URLS_KEPT {
            m.clear();
        }
        m.insert(url.to_string(), target.clone());
        Ok(target)
    }
}

/// What a step service answered.
struct Answer {
    status: u16,
    /// For a redirect: where it pointed, if it said.
    location: Option<Option<String>>,
    body: Vec<u8>,
}

/// The error of a call that ran out of its time.
fn timed_out(timeout: Option<Duration>) -> StepError {
    StepError::unknown_outcome(format!(
        "timed out after {} ms",
        timeout.map(|t| t.as_millis()).unwrap_or(0)
    ))
}

/// The error of a call that got no answer: a refused connection is
/// transient (nothing reached the service); anything else after the
/// request may have gone out is an unknown outcome.
fn not_sent(url: &str, connect: bool, e: &(dyn std::error::Error + 'static)) -> StepError {
    if connect {
        StepError::transient(format!("cannot connect to {url}: {}", root_cause(e)))
    } else {
        StepError::unknown_outcome(format!("request to {url} failed: {}", root_cause(e)))
    }
}

/// Refuses an answer whose declared length is over [`MAX_RESPONSE_BYTES`].
fn check_length(declared: Option<u64>) -> Result<(), StepError> {
    match declared {
        Some(n) if n > MAX_RESPONSE_BYTES as u64 => Err(too_large()),
        _ => Ok(()),
    }
}

fn too_large() -> StepError {
    StepError::permanent(format!(
        "the response body is larger than {MAX_RESPONSE_BYTES} bytes"
    ))
}

/// 408, 425, 429 and 5xx are passing conditions.
fn transient_status(code: u16) -> bool {
    matches!(code, 408 | 425 | 429) || (500..600).contains(&code)
}

/// A short, readable message from an error response body.
fn error_text(body: &[u8]) -> String {
    if let Ok(v) = serde_json::from_slice::<Value>(body) {
        for key in ["error", "message", "detail"] {
            match v.get(key) {
                Some(Value::String(s)) => return s.clone(),
                Some(Value::Object(o)) => {
                    if let Some(Value::String(s)) = o.get("message") {
                        return s.clone();
                    }
                }
                _ => {}
            }
        }
    }
    let text = String::from_utf8_lossy(body);
    let text = text.trim();
    match text.char_indices().nth(200) {
        Some((i, _)) => format!("{}…", &text[..i]),
        None => text.to_string(),
    }
}

/// The body of an answer through reqwest (whose own deadline covers it).
async fn read_body(mut resp: reqwest::Response) -> Result<Vec<u8>, StepError> {
    check_length(resp.content_length())?;
    let mut body = Vec::new();
    loop {
        match resp.chunk().await {
            Ok(Some(chunk)) => {
                if body.len() + chunk.len() > MAX_RESPONSE_BYTES {
                    return Err(too_large());
                }
                body.extend_from_slice(&chunk);
            }
            Ok(None) => return Ok(body),
            Err(e) if e.is_timeout() => {
                return Err(StepError::unknown_outcome("timed out reading the response"))
            }
            Err(e) => {
                return Err(StepError::unknown_outcome(format!(
                    "the response broke off: {e}"
                )))
            }
        }
    }
}

/// The body of an answer through hyper's client, by `deadline`.
async fn read_incoming(
    mut body: hyper::body::Incoming,
    deadline: Option<Instant>,
) -> Result<Vec<u8>, StepError> {
    check_length(hyper::body::Body::size_hint(&body).exact())?;
    let mut out = Vec::new();
    loop {
        let next = body.frame();
        let frame = match deadline {
            Some(d) => match tokio::time::timeout_at(d, next).await {
                Ok(f) => f,
                Err(_) => return Err(StepError::unknown_outcome("timed out reading the response")),
            },
            None => next.await,
        };
        match frame {
            None => return Ok(out),
            Some(Ok(frame)) => {
                if let Ok(data) = frame.into_data() {
                    if out.len() + data.len() > MAX_RESPONSE_BYTES {
                        return Err(too_large());
                    }
                    out.extend_from_slice(&data);
                }
            }
            Some(Err(e)) => {
                return Err(StepError::unknown_outcome(format!(
                    "the response broke off: {e}"
                )))
            }
        }
    }
}

impl HttpCaller {
    /// One call through hyper's client.
    async fn send_direct(
        &self,
        uri: http::Uri,
        method: reqwest::Method,
        mut headers: HeaderMap,
        body: Vec<u8>,
        timeout: Option<Duration>,
        url: &str,
    ) -> Result<Answer, StepError> {
        let deadline = timeout.map(|t| Instant::now() + t);
        headers.insert(USER_AGENT, HeaderValue::from_static(AGENT));
        headers.insert(ACCEPT, HeaderValue::from_static("*/*"));
        let mut req = http::Request::new(Full::new(Bytes::from(body)));
        *req.method_mut() = method;
        *req.uri_mut() = uri;
        *req.headers_mut() = headers;
        let sent = self.plain.request(req);
        let resp = match deadline {
            Some(d) => match tokio::time::timeout_at(d, sent).await {
                Ok(r) => r,
                Err(_) => return Err(timed_out(timeout)),
            },
            None => sent.await,
        };
        let resp = match resp {
            Ok(r) => r,
            Err(e) => return Err(not_sent(url, e.is_connect(), &e)),
        };
        let status = resp.status().as_u16();
        let location = (300..400)
            .contains(&status)
            .then(|| crate::location(resp.headers()));
        let body = read_incoming(resp.into_body(), deadline).await?;
        Ok(Answer {
            status,
            location,
            body,
        })
    }

    /// One call through reqwest.
    async fn send_reqwest(
        &self,
        url: reqwest::Url,
        method: reqwest::Method,
        headers: HeaderMap,
        body: Vec<u8>,
        timeout: Option<Duration>,
        text: &str,
    ) -> Result<Answer, StepError> {
        let mut req = self.client.request(method, url).headers(headers).body(body);
        if let Some(t) = timeout {
            req = req.timeout(t);
        }
        let resp = match req.send().await {
            Ok(r) => r,
            Err(e) if e.is_timeout() => return Err(timed_out(timeout)),
            Err(e) => return Err(not_sent(text, e.is_connect(), &e)),
        };
        let status = resp.status().as_u16();
        let location = (300..400)
            .contains(&status)
            .then(|| crate::redirect_location(&resp));
        let body = read_body(resp).await?;
        Ok(Answer {
            status,
            location,
            body,
        })
    }
}

#[async_trait]
impl RemoteCaller for HttpCaller {
    async fn call(
        &self,
        endpoint: &HttpEndpoint,
        ctx: &StepContext,
        timeout: Option<Duration>,
    ) -> Result<Value, StepError> {
        let _slot = self
            .slots
            .acquire()
            .await
            .map_err(|_| StepError::transient("the caller is shutting down"))?;
        let reply_url = ctx
            .is_callback()
            .then(|| self.caps.reply_url(ctx.execution_id(), ctx.step()));
        let body = serde_json::to_vec(&Envelope::of(ctx, reply_url.as_deref()))
            .map_err(|e| StepError::permanent(format!("cannot write the call's body: {e}")))?;
        let target = self.urls.get(&endpoint.url)?;
        let method = reqwest::Method::from_bytes(endpoint.method.as_bytes())
            .map_err(|_| StepError::permanent(format!("bad method {:?}", endpoint.method)))?;
        let mut headers = HeaderMap::new();
        for (k, v) in &endpoint.headers {
            // Validated with the definition; skip anything that slipped by.
            if let (Ok(k), Ok(v)) = (
                HeaderName::try_from(k.as_str()),
                HeaderValue::try_from(v.as_str()),
            ) {
                headers.insert(k, v);
            }
        }
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        if let Ok(v) = HeaderValue::try_from(ctx.idempotency_key()) {
            headers.insert("idempotency-key", v);
        }
        if let Ok(v) = HeaderValue::try_from(traceparent(ctx)) {
            headers.insert("traceparent", v);
        }
        let Answer {
            status,
            location,
            body: bytes,
        } = match &target.direct {
            Some(uri) => {
                self.send_direct(uri.clone(), method, headers, body, timeout, &endpoint.url)
                    .await?
            }
            None => {
                self.send_reqwest(
                    target.url.clone(),
                    method,
                    headers,
                    body,
                    timeout,
                    &endpoint.url,
                )
                .await?
            }
        };
        if (200..300).contains(&status) {
            if bytes.iter().all(u8::is_ascii_whitespace) {
                return Ok(Value::Null);
            }
            return Ok(serde_json::from_slice(&bytes)
                .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned())));
        }
        let text = error_text(&bytes);
        if let Some(location) = location {
            let to = location.map(|l| format!(" to {l}")).unwrap_or_default();
            return Err(StepError::permanent(format!(
                "HTTP {status}: redirect{to}, not followed (sagatx calls the step's URL as written: \
                 point the definition at the final URL)"
            )));
        }
        let message = if text.is_empty() {
            format!("HTTP {status}")
        } else {
            format!("HTTP {status}: {text}")
        };
        if transient_status(status) {
            Err(StepError::transient(message))
        } else {
            Err(StepError::permanent(message))
        }
    }
}

fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cur = e;
    while let Some(next) = cur.source() {
        cur = next;
    }
    cur.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_are_classified_as_the_contract_says() {
        for code in [408, 425, 429, 500, 502, 503, 504, 599] {
            assert!(transient_status(code), "{code}");
        }
        for code in [400, 401, 402, 404, 409, 422, 301] {
            assert!(!transient_status(code), "{code}");
        }
    }

    #[test]
    fn step_urls_are_parsed_once_and_a_bad_one_is_a_permanent_error() {
        let urls = Urls::new(true);
        let a = urls.get("http://127.0.0.1:9/a?x=1").expect("parses");
        assert_eq!(a.url.as_str(), "http://127.0.0.1:9/a?x=1");
        assert_eq!(
            a.direct.as_ref().map(|u| u.to_string()).as_deref(),
            Some("http://127.0.0.1:9/a?x=1")
        );
        assert!(Arc::ptr_eq(
            &urls.get("http://127.0.0.1:9/a?x=1").expect("kept"),
            &a
        ));
        assert_eq!(urls.parsed.lock().expect("lock").len(), 1);
        // HTTPS, credentials in the URL, or a proxy in the environment:
        // through reqwest.
        for url in [
            "https://127.0.0.1:9/a",
            "http://u:p@127.0.0.1:9/a",
            "http://u@127.0.0.1:9/a",
        ] {
            assert_eq!(urls.get(url).expect("parses").direct, None, "{url}");
        }
        let proxied = Urls::new(false);
        assert_eq!(
            proxied.get("http://127.0.0.1:9/a").expect("parses").direct,
            None
        );
        let e = urls.get("not a url").expect_err("refused");
        assert_eq!(e.class, sagatx_core::ErrorClass::Permanent, "{e:?}");
        assert!(e.message.contains("not a valid URL"), "{e:?}");
        for i in 0..URLS_KEPT + 10 {
            urls.get(&format!("http://127.0.0.1:9/{i}"))
                .expect("parses");
        }
        assert!(urls.parsed.lock().expect("lock").len() <= URLS_KEPT);
    }

    /// Both routes (hyper's client directly, and reqwest as with a proxy
    /// in the environment) send the same request and read the answer the
    /// same way, through an engine, to a real service on 127.0.0.1.
    #[tokio::test]
    async fn both_routes_make_the_same_call() {
        use axum::http::HeaderMap as Headers;
        type Seen = Arc<std::sync::Mutex<Vec<(Headers, Value)>>>;
        let seen: Seen = Default::default();
        let app = axum::Router::new()
            .route(
                "/a",
                axum::routing::post(
                    |axum::extract::State(seen): axum::extract::State<Seen>,
                     headers: Headers,
                     body: String| async move {
                        let body = serde_json::from_str(&body).unwrap_or(Value::Null);
                        seen.lock().expect("lock").push((headers, body));
                        r#"{"ok": 1}"#
                    },
                ),
            )
            .route(
                "/no",
                axum::routing::post(|| async {
                    (
                        axum::http::StatusCode::PAYMENT_REQUIRED,
                        r#"{"error": "declined"}"#,
                    )
                }),
            )
            .with_state(seen.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let base = format!("http://{}", listener.local_addr().expect("addr"));
        tokio::spawn(async move { axum::serve(listener, app).await });
        let def = sagatx_core::SagaDefinition::from_value(&serde_json::json!({
            "name": "routes",
            "steps": [
                {"name": "a", "action": {"url": format!("{base}/a"),
                 "headers": {"x-extra": "1"}}},
                {"name": "b", "action": {"url": format!("{base}/no")}}
            ]
        }))
        .expect("definition");
        let mut ends = Vec::new();
        for direct in [true, false] {
            let caller = HttpCaller::with_routes(Capabilities::new([7; 32], &base), 8, direct)
                .expect("caller");
            let routed = caller
                .urls
                .get(&format!("{base}/a"))
                .expect("parses")
                .direct
                .is_some();
            assert_eq!(routed, direct);
            let engine = sagatx::Engine::builder()
                .store(sagatx::MemoryStore::new())
                .remote_caller(Arc::new(caller))
                .build()
                .await
                .expect("engine");
            engine.register(def.clone()).await.expect("register");
            let ex = engine
                .run("routes", serde_json::json!({"x": 1}))
                .await
                .expect("runs");
            ends.push((
                ex.status,
                ex.steps[0].result.clone(),
                ex.steps[1].error.clone(),
            ));
        }
        assert_eq!(ends[0], ends[1], "the same outcome either way");
        assert_eq!(ends[0].1, Some(serde_json::json!({"ok": 1})));
        assert_eq!(ends[0].2.as_deref(), Some("HTTP 402: declined"), "{ends:?}");
        let seen = seen.lock().expect("lock").clone();
        assert_eq!(seen.len(), 2);
        let shape = |(h, b): &(Headers, Value)| {
            let mut names: Vec<String> = h.keys().map(|k| k.to_string()).collect();
            names.sort();
            let fixed: Vec<Option<String>> =
                ["content-type", "accept", "user-agent", "x-extra", "host"]
                    .iter()
                    .map(|k| h.get(*k).and_then(|v| v.to_str().ok()).map(str::to_string))
                    .collect();
            (names, fixed, b["step"].clone(), b["input"].clone())
        };
        assert_eq!(shape(&seen[0]), shape(&seen[1]));
        assert_eq!(
            shape(&seen[0]).0,
            [
                "accept",
                "content-length",
                "content-type",
                "host",
                "idempotency-key",
                "traceparent",
                "user-agent",
                "x-extra"
            ]
        );
    }

    #[test]
    fn error_text_prefers_a_json_message() {
        assert_eq!(
            error_text(br#"{"error": "card declined"}"#),
            "card declined"
        );
        assert_eq!(error_text(br#"{"error": {"message": "no"}}"#), "no");
        assert_eq!(error_text(b"  plain text \n"), "plain text");
        assert_eq!(error_text(&[b'x'; 300]).chars().count(), 201);
    }
}
