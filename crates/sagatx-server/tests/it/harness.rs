//! A real coordinator on 127.0.0.1 and real step services beside it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use axum::routing::post;
use axum::Router;
use serde_json::{json, Value};

/// One request a step service received.
#[derive(Debug, Clone)]
pub struct Received {
    pub op: String,
    pub headers: HashMap<String, String>,
    pub body: Value,
}

/// What a service answers: a status, a body, after a delay.
#[derive(Debug, Clone)]
pub struct Answer {
    pub status: u16,
    pub body: Value,
    pub delay_ms: u64,
    /// A `Location` header (for redirects).
    pub location: Option<String>,
}

pub fn answer(status: u16, body: Value) -> Answer {
    Answer {
        status,
        body,
        delay_ms: 0,
        location: None,
    }
}

#[derive(Default)]
struct ServiceState {
    received: Mutex<Vec<Received>>,
    /// Per operation, answers used in order; when none is left, 200.
    script: Mutex<HashMap<String, Vec<Answer>>>,
}

/// Step services on one port: `POST /{op}` records and answers.
#[derive(Clone)]
pub struct Services {
    state: Arc<ServiceState>,
    pub base: String,
}

async fn handle(
    State(st): State<Arc<ServiceState>>,
    Path(op): Path<String>,
    headers: HeaderMap,
    body: String,
) -> axum::response::Response {
    let body: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
    let headers = headers
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("").to_string()))
        .collect();
    st.received.lock().expect("lock").push(Received {
        op: op.clone(),
        headers,
        body: body.clone(),
    });
    let next = {
        let mut script = st.script.lock().expect("lock");
        script
            .get_mut(&op)
            .and_then(|v| (!v.is_empty()).then(|| v.remove(0)))
    };
    let a = next.unwrap_or_else(|| answer(200, json!({"op": op, "attempt": body["attempt"]})));
    if a.delay_ms > 0 {
        tokio::time::sleep(Duration::from_millis(a.delay_ms)).await;
    }
    let text = if a.body.is_null() {
        String::new()
    } else {
        a.body.to_string()
    };
    let status = StatusCode::from_u16(a.status).expect("status");
    match a.location {
        Some(to) => (status, [(axum::http::header::LOCATION, to)], text).into_response(),
        None => (status, text).into_response(),
    }
}

impl Services {
    pub async fn start() -> Services {
        let state = Arc::new(ServiceState::default());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let base = format!("http://{}", listener.local_addr().expect("addr"));
        let app = Router::new()
            .route("/{op}", post(handle))
            .with_state(state.clone());
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Services { state, base }
    }

    pub fn script(&self, op: &str, answers: Vec<Answer>) {
        self.state
            .script
            .lock()
            .expect("lock")
            .insert(op.to_string(), answers);
    }

    pub fn received(&self) -> Vec<Received> {
        self.state.received.lock().expect("lock").clone()
    }

    /// The operations called, in order.
    pub fn ops(&self) -> Vec<String> {
        self.received().into_iter().map(|r| r.op).collect()
    }

    pub fn url(&self, op: &str) -> Value {
        json!({"url": format!("{}/{op}", self.base)})
    }
}

/// A coordinator serving on 127.0.0.1, on a SQLite file.
pub struct Coordinator {
    pub base: String,
    pub http: reqwest::Client,
    pub token: Option<String>,
    /// The coordinator's store, for setting up what the API cannot make.
    pub store: std::sync::Arc<dyn sagatx::Store>,
    _dir: tempfile::TempDir,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Coordinator {
    pub async fn start(token: Option<&str>) -> Coordinator {
        Self::start_with(sagatx_server::ServerConfig {
            token: token.map(str::to_string),
            ..Default::default()
        })
        .await
    }

    pub async fn start_with(cfg: sagatx_server::ServerConfig) -> Coordinator {
        let token = cfg.token.clone();
        let token = token.as_deref();
        sagatx_server::install_crypto();
        let dir = tempfile::tempdir().expect("tempdir");
        let store = sagatx::store::open(&format!("sqlite://{}", dir.path().join("s.db").display()))
            .await
            .expect("store");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let base = format!("http://{}", listener.local_addr().expect("addr"));
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let kept = store.clone();
        tokio::spawn(async move {
            let shutdown = async {
                let _ = rx.await;
            };
            if let Err(e) = sagatx_server::serve(listener, store, cfg, shutdown).await {
                panic!("server failed: {e}");
            }
        });
        Coordinator {
            base,
            http: reqwest::Client::new(),
            token: token.map(str::to_string),
            store: kept,
            _dir: dir,
            stop: Some(tx),
        }
    }

    fn auth(&self, r: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match &self.token {
            Some(t) => r.bearer_auth(t),
            None => r,
        }
    }

    /// A request with the token (when there is one); status and JSON body.
    pub async fn call(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        let url = format!("{}{path}", self.base);
        let req = match method {
            "GET" => self.http.get(url),
            _ => self.http.post(url),
        };
        let req = match body {
            Some(b) => req.json(&b),
            None => req,
        };
        let resp = self.auth(req).send().await.expect("request");
        let status = resp.status().as_u16();
        let text = resp.text().await.expect("body");
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    pub async fn get(&self, path: &str) -> (u16, Value) {
        self.call("GET", path, None).await
    }

    pub async fn post(&self, path: &str, body: Value) -> (u16, Value) {
        self.call("POST", path, Some(body)).await
    }

    /// Starts an execution and waits (up to 10 s) for it to settle.
    pub async fn run(&self, saga: Value, input: Value) -> Value {
        let (status, ex) = self
            .post(
                "/v1/executions?wait=10",
                json!({"saga": saga, "input": input}),
            )
            .await;
        assert_eq!(status, 201, "{ex}");
        ex
    }

    /// Polls an execution until `pred` holds (at most 10 s).
    pub async fn until(&self, id: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let mut last = Value::Null;
        for _ in 0..1000 {
            let (_, ex) = self.get(&format!("/v1/executions/{id}")).await;
            if pred(&ex) {
                return ex;
            }
            last = ex;
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("condition never held; last state {last}");
    }
}

impl Drop for Coordinator {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
    }
}

/// A definition named `name` with steps `(name, compensate?)` on `svc`.
pub fn saga(svc: &Services, name: &str, steps: &[(&str, bool)]) -> Value {
    let steps: Vec<Value> = steps
        .iter()
        .map(|(s, comp)| {
            let mut v = json!({"name": s, "action": svc.url(s)});
            if *comp {
                v["compensation"] = svc.url(&format!("undo-{s}"));
            }
            v
        })
        .collect();
    json!({"name": name, "retry": {"initial_backoff_ms": 10, "max_backoff_ms": 50}, "steps": steps})
}
