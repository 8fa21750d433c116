//! `sagatx serve --otlp-endpoint` (feature `otel`): the spans of an
//! execution, its step calls and the store's commits reach an OTLP/HTTP
//! collector (here a real listener on 127.0.0.1 that keeps what it gets).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::routing::post;
use axum::Router;
use serde_json::Value;

use crate::{free_port, run, text, Server, Services};

/// Every span in the collected requests: (name, attributes as key → value).
fn spans(bodies: &[Value]) -> Vec<(String, Vec<(String, String)>)> {
    let mut out = Vec::new();
    for b in bodies {
        for rs in b["resourceSpans"].as_array().into_iter().flatten() {
            for ss in rs["scopeSpans"].as_array().into_iter().flatten() {
                for s in ss["spans"].as_array().into_iter().flatten() {
                    let attrs = s["attributes"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .map(|a| {
                            let v = &a["value"];
                            let v = v["stringValue"]
                                .as_str()
                                .map(str::to_string)
                                .unwrap_or_else(|| v.to_string());
                            (a["key"].as_str().unwrap_or("").to_string(), v)
                        })
                        .collect();
                    out.push((s["name"].as_str().unwrap_or("").to_string(), attrs));
                }
            }
        }
    }
    out
}

#[test]
fn serve_exports_its_spans_over_otlp() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let got: Arc<Mutex<Vec<Value>>> = Arc::default();
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .expect("bind");
    let collector = format!("http://{}", listener.local_addr().expect("addr"));
    let app = Router::new()
        .route(
            "/v1/traces",
            post(
                |State(got): State<Arc<Mutex<Vec<Value>>>>, body: String| async move {
                    if let Ok(v) = serde_json::from_str::<Value>(&body) {
                        got.lock().expect("lock").push(v);
                    }
                    "{}"
                },
            ),
        )
        .with_state(got.clone());
    rt.spawn(async move {
        let _ = axum::serve(listener, app).await;
    });

    let dir = tempfile::tempdir().expect("tempdir");
    let svc = Services::start(0);
    let server = Server::start_with(
        dir.path(),
        free_port(),
        "sqlite://sagatx.db",
        &["--otlp-endpoint", &collector],
    );
    let order = svc.order_json(dir.path());
    let out = run(
        &[
            "run",
            order.to_str().expect("path"),
            "--input",
            r#"{"order_id": 1}"#,
            "--server",
            &server.url,
        ],
        dir.path(),
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    // A graceful stop sends what is still batched.
    let mut server = server;
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &server.child.id().to_string()])
        .status();
    let deadline = Instant::now() + Duration::from_secs(20);
    while server.child.try_wait().ok().flatten().is_none() {
        assert!(Instant::now() < deadline, "the server did not stop");
        std::thread::sleep(Duration::from_millis(20));
    }
    let bodies = got.lock().expect("lock").clone();
    let all = spans(&bodies);
    let names: std::collections::BTreeSet<&str> = all.iter().map(|(n, _)| n.as_str()).collect();
    for want in ["execution", "step", "store_commit"] {
        assert!(names.contains(want), "no {want} span among {names:?}");
    }
    let reserve = all
        .iter()
        .find(|(n, a)| n == "step" && a.iter().any(|(k, v)| k == "step" && v == "reserve"));
    assert!(reserve.is_some(), "a step span names its step: {all:?}");
    let service = bodies.iter().any(|b| {
        b["resourceSpans"][0]["resource"]["attributes"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|a| a["key"] == "service.name" && a["value"]["stringValue"] == "sagatx")
    });
    assert!(service, "the resource names the service");
}
