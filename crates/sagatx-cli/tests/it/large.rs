//! The dashboard's queries on a store of 100,000 executions: the summary
//! is counted by the store, the list pages through every execution once,
//! and the server does not load the executions to answer (its memory stays
//! far below what 100,000 decoded executions take).

use std::collections::HashSet;

use sagatx::core::{Env, Event, Execution, ExecutionId, Phase, Reply, SagaDefinition, StepError};
use sagatx::{SqliteStore, Store};
use serde_json::json;

use crate::{free_port, get, Server};

const COMPLETED: usize = 40_000;
const PAUSED: usize = 30_000;
const COMPENSATED: usize = 30_000;

/// An execution driven through the machine to the status `kind` asks.
fn made(def: &SagaDefinition, kind: usize) -> Execution {
    let env = Env {
        now_ms: 1_700_000_000_000,
        random01: 0.5,
    };
    let mut ex = Execution::new(
        ExecutionId(uuid::Uuid::now_v7()),
        def,
        1,
        json!({"order": kind}),
        None,
        env.now_ms,
    );
    let mut calls = ex.handle(def, Event::Start, env).expect("start").calls;
    while let Some(c) = calls.first().copied() {
        let outcome = match (kind, c.step, c.phase) {
            // Compensated: the third step is rejected.
            (2, 2, Phase::Action) => Err(StepError::permanent("rejected")),
            _ => Ok(json!(c.step)),
        };
        calls = ex
            .handle(
                def,
                Event::Outcome {
                    step: c.step,
                    phase: c.phase,
                    attempt: c.attempt,
                    outcome,
                },
                env,
            )
            .expect("outcome")
            .calls;
        if (c.step, c.phase) == (1, Phase::Action) {
            // The second step waits for its reply: paused stays so.
            if kind == 1 {
                break;
            }
            calls = ex
                .handle(
                    def,
                    Event::Reply {
                        step: 1,
                        reply: Reply::Ok(json!("replied")),
                    },
                    env,
                )
                .expect("reply")
                .calls;
        }
    }
    let want = ["completed", "paused", "compensated"][kind];
    assert_eq!(ex.status.as_str(), want, "the seed is wrong");
    ex.seq = 1;
    ex
}

fn seed(path: &std::path::Path) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let store = std::sync::Arc::new(SqliteStore::open(path).expect("open"));
        let def = SagaDefinition::from_json(
            br#"{"name":"big","steps":[
                {"name":"a","action":{"url":"http://127.0.0.1:9/a"},"compensation":{"url":"http://127.0.0.1:9/c"}},
                {"name":"b","action":{"url":"http://127.0.0.1:9/b"},"reply":"callback","compensation":{"url":"http://127.0.0.1:9/c"}},
                {"name":"c","action":{"url":"http://127.0.0.1:9/c"}}]}"#,
        )
        .expect("definition");
        store.put_definition(&def).await.expect("define");
        let kinds = std::iter::repeat_n(0, COMPLETED)
            .chain(std::iter::repeat_n(1, PAUSED))
            .chain(std::iter::repeat_n(2, COMPENSATED));
        let all: Vec<Execution> = kinds.map(|k| made(&def, k)).collect();
        for chunk in all.chunks(4096) {
            let writes = chunk.iter().map(|ex| store.append(ex));
            for r in futures_util::future::join_all(writes).await {
                r.expect("append");
            }
        }
    });
}

fn peak_rss_mib(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        })
        .map(|kib| kib / 1024.0)
        .unwrap_or(f64::NAN)
}

#[test]
fn the_dashboard_pages_and_counts_100k_executions_without_loading_them() {
    let dir = tempfile::tempdir().expect("tempdir");
    seed(&dir.path().join("sagatx.db"));
    let server = Server::start(dir.path(), free_port());
    let summary = get(&format!("{}/v1/summary", server.url));
    let mut counts = std::collections::HashMap::new();
    for c in summary["counts"].as_array().expect("counts") {
        counts.insert(
            c["status"].as_str().expect("status").to_string(),
            c["count"].as_u64().expect("count"),
        );
    }
    assert_eq!(
        counts.get("completed"),
        Some(&(COMPLETED as u64)),
        "{summary}"
    );
    assert_eq!(counts.get("paused"), Some(&(PAUSED as u64)), "{summary}");
    assert_eq!(
        counts.get("compensated"),
        Some(&(COMPENSATED as u64)),
        "{summary}"
    );

    // The dashboard's first page, then every compensated one, page by page.
    let first = get(&format!("{}/v1/executions?limit=50", server.url));
    assert_eq!(first["items"].as_array().map(Vec::len), Some(50));
    assert!(first["next_cursor"].is_string(), "{first}");
    let mut seen = HashSet::new();
    let mut cursor: Option<String> = None;
    let mut pages = 0;
    loop {
        let url = match &cursor {
            Some(c) => format!(
                "{}/v1/executions?status=compensated&limit=1000&cursor={c}",
                server.url
            ),
            None => format!("{}/v1/executions?status=compensated&limit=1000", server.url),
        };
        let page = get(&url);
        let items = page["items"].as_array().expect("items");
        for ex in items {
            assert_eq!(ex["status"], "compensated");
            assert!(
                seen.insert(ex["id"].as_str().expect("id").to_string()),
                "seen twice"
            );
        }
        pages += 1;
        match page["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_string()),
            None => break,
        }
        assert!(pages <= 31, "more pages than executions");
    }
    assert_eq!(seen.len(), COMPENSATED);
    let html = crate::get_text(&format!("{}/", server.url));
    assert!(html.contains("<html"), "the dashboard page");

    // 100,000 decoded executions would take several hundred MiB; the
    // server answered from indexes and pages.
    let rss = peak_rss_mib(server.child.id());
    assert!(rss < 120.0, "the server's peak RSS is {rss:.0} MiB");
}
