//! The `sagatx` binary as a user runs it: real processes, a real SQLite
//! file, real step services on 127.0.0.1.

mod cli;
mod crash;
mod disk;
mod large;
#[cfg(feature = "otel")]
mod otel;
mod shared;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Path as UrlPath, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use axum::Router;
use serde_json::{json, Value};

pub fn sagatx() -> Command {
    Command::new(env!("CARGO_BIN_EXE_sagatx"))
}

pub fn run(args: &[&str], dir: &Path) -> Output {
    sagatx()
        .args(args)
        .current_dir(dir)
        .env_remove("SAGATX_TOKEN")
        .env_remove("SAGATX_SERVER")
        .output()
        .expect("run sagatx")
}

pub fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// A free port on 127.0.0.1 (bound and released: a small race, fine here).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// `sagatx serve` in its own process.
pub struct Server {
    pub child: Child,
    pub url: String,
}

impl Server {
    pub fn start(dir: &Path, port: u16) -> Server {
        Self::start_on(dir, port, "sqlite://sagatx.db")
    }

    pub fn start_on(dir: &Path, port: u16, store: &str) -> Server {
        Self::start_with(dir, port, store, &[])
    }

    pub fn start_with(dir: &Path, port: u16, store: &str, extra: &[&str]) -> Server {
        let child = serve_command(dir, port, store, extra, "warn")
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn sagatx serve");
        wait_listening(port);
        Server {
            child,
            url: format!("http://127.0.0.1:{port}"),
        }
    }

    pub fn kill9(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The command of `sagatx serve` on 127.0.0.1:`port` and `store`, at log
/// level `level`, with `extra` arguments; stderr is the caller's choice.
fn serve_command(dir: &Path, port: u16, store: &str, extra: &[&str], level: &str) -> Command {
    let mut c = sagatx();
    c.args([
        "serve",
        "--listen",
        &format!("127.0.0.1:{port}"),
        "--store",
        store,
    ])
    .args(extra)
    .current_dir(dir)
    .env_remove("SAGATX_TOKEN")
    .env("SAGATX_LOG", level)
    .stdout(Stdio::null());
    c
}

/// Returns once something listens on `port` (at most 20 s).
fn wait_listening(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "sagatx serve did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `sagatx serve` whose stderr goes to `log` for the test to read, at log
/// level `level`, with `extra` arguments; returns once it listens.
pub fn serve_logged(
    dir: &Path,
    port: u16,
    store: &str,
    extra: &[&str],
    level: &str,
    log: &Path,
) -> Child {
    let child = serve_command(dir, port, store, extra, level)
        .stderr(std::fs::File::create(log).expect("log file"))
        .spawn()
        .expect("spawn sagatx serve");
    wait_listening(port);
    child
}

/// One call a step service received.
#[derive(Debug, Clone)]
pub struct Call {
    pub op: String,
    pub execution: String,
    pub attempt: u64,
    pub key: String,
    pub at: Instant,
}

#[derive(Default)]
struct Shop {
    calls: Mutex<Vec<Call>>,
    delay_ms: u64,
}

async fn shop(
    State(st): State<Arc<Shop>>,
    UrlPath(op): UrlPath<String>,
    headers: HeaderMap,
    body: String,
) -> (StatusCode, String) {
    let body: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
    st.calls.lock().expect("lock").push(Call {
        op: op.clone(),
        execution: body["execution_id"].as_str().unwrap_or("").to_string(),
        attempt: body["attempt"].as_u64().unwrap_or(0),
        key: headers
            .get("idempotency-key")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string(),
        at: Instant::now(),
    });
    if st.delay_ms > 0 {
        tokio::time::sleep(Duration::from_millis(st.delay_ms)).await;
    }
    if op == "charge" && body["input"]["card"] == json!("declined") {
        return (
            StatusCode::PAYMENT_REQUIRED,
            r#"{"error":"card declined"}"#.into(),
        );
    }
    (
        StatusCode::OK,
        json!({"op": op, "attempt": body["attempt"]}).to_string(),
    )
}

/// The quickstart's step services, in this process, on their own runtime.
pub struct Services {
    pub base: String,
    state: Arc<Shop>,
    _rt: tokio::runtime::Runtime,
}

impl Services {
    pub fn start(delay_ms: u64) -> Services {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let state = Arc::new(Shop {
            calls: Mutex::new(Vec::new()),
            delay_ms,
        });
        let listener = rt
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .expect("bind");
        let base = format!("http://{}", listener.local_addr().expect("addr"));
        let app = Router::new()
            .route("/{op}", post(shop))
            .with_state(state.clone());
        rt.spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Services {
            base,
            state,
            _rt: rt,
        }
    }

    pub fn calls(&self) -> Vec<Call> {
        self.state.calls.lock().expect("lock").clone()
    }

    /// The quickstart definition, pointed at these services.
    pub fn order_json(&self, dir: &Path) -> PathBuf {
        let text = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../examples/order.json"
        ))
        .expect("examples/order.json")
        .replace("http://127.0.0.1:9001", &self.base);
        let path = dir.join("order.json");
        std::fs::write(&path, text).expect("write");
        path
    }
}

/// A GET from a test thread (no runtime around).
pub fn get(url: &str) -> Value {
    blocking_get(url)
}

fn blocking_get(url: &str) -> Value {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        sagatx_server::install_crypto();
        match reqwest::get(url).await {
            Ok(r) => r.json().await.unwrap_or(Value::Null),
            Err(_) => Value::Null,
        }
    })
}

/// A GET of a page as text.
pub fn get_text(url: &str) -> String {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        sagatx_server::install_crypto();
        match reqwest::get(url).await {
            Ok(r) => r.text().await.unwrap_or_default(),
            Err(_) => String::new(),
        }
    })
}
