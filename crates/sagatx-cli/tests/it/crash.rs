//! `sagatx serve` killed with SIGKILL while steps are in flight and while
//! compensations run; restarted on the same file; every execution finishes,
//! no call whose success was recorded is made again, and calls in flight
//! are made again with the same Idempotency-Key.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::{free_port, get, Call, Server, Services};

const N: usize = 60;
/// How long the services take to answer a call.
const DELAY_MS: u64 = 40;

fn post(url: &str, body: &Value) -> Value {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        sagatx_server::install_crypto();
        reqwest::Client::new()
            .post(url)
            .json(body)
            .send()
            .await
            .expect("post")
            .json()
            .await
            .expect("json")
    })
}

#[test]
fn kill_9_of_the_server_loses_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    // Slow services: calls are in flight when the kill lands.
    let svc = Services::start(DELAY_MS);
    let port = free_port();
    let server = Server::start(dir.path(), port);
    let def: Value =
        serde_json::from_str(&std::fs::read_to_string(svc.order_json(dir.path())).expect("read"))
            .expect("json");
    let mut ids = Vec::new();
    for i in 0..N {
        let input = if i % 3 == 0 {
            json!({"order_id": i, "card": "declined"})
        } else {
            json!({"order_id": i})
        };
        let ex = post(
            &format!("{}/v1/executions", server.url),
            &json!({"saga": def, "input": input}),
        );
        ids.push((ex["id"].as_str().expect("id").to_string(), i % 3 == 0));
    }
    // Kill while actions are in flight, then again while compensations
    // run: once a call came in less than half the services' delay ago, so
    // that it is surely still unanswered, or, when none has for a while
    // (the calls of that kind are over), at once. Killing at the first
    // call seen at all missed every call once, on a machine busy enough
    // that the calls seen had been answered by then.
    let mut server = Some(server);
    let fresh = Duration::from_millis(DELAY_MS / 2);
    for want in ["charge", "release"] {
        let start = Instant::now();
        loop {
            let calls = svc.calls();
            let mut seen = calls.iter().filter(|c| c.op == want).peekable();
            let any = seen.peek().is_some();
            if seen.any(|c| c.at.elapsed() < fresh) {
                break;
            }
            if any && start.elapsed() > Duration::from_secs(2) {
                break;
            }
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "no {want} call seen"
            );
            std::thread::sleep(Duration::from_millis(2));
        }
        if let Some(s) = server.take() {
            s.kill9();
        }
        server = Some(Server::start(dir.path(), port));
    }
    let server = server.expect("running");

    // Every execution ends, with the expected outcome.
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut finals = HashMap::new();
    for (id, declined) in &ids {
        loop {
            let ex = get(&format!("{}/v1/executions/{id}", server.url));
            let st = ex["status"].as_str().unwrap_or("").to_string();
            if ["completed", "compensated", "failed"].contains(&st.as_str()) {
                let want = if *declined {
                    "compensated"
                } else {
                    "completed"
                };
                assert_eq!(st, want, "{id}: {ex}");
                finals.insert(id.clone(), ex);
                break;
            }
            assert!(Instant::now() < deadline, "{id} never finished: {ex}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    let recalled = check_calls(&finals, &svc.calls());
    // The kills did land on calls in flight.
    assert!(
        recalled > 0,
        "no call was interrupted; the test did not test anything"
    );
    drop(server);
}

/// Checks the calls the services received against the final states: the
/// same key on every attempt of a call, attempts in order, no action
/// called again after its recorded success, compensations made at least
/// once and no more than journaled. Returns how many calls were made more
/// than once (interrupted and made again).
pub(crate) fn check_calls(finals: &HashMap<String, Value>, calls: &[Call]) -> usize {
    fn phase_of(op: &str) -> &'static str {
        match op {
            "release" | "refund" => "compensation",
            _ => "action",
        }
    }
    fn step_of(op: &str) -> &str {
        match op {
            "release" => "reserve",
            "refund" => "charge",
            other => other,
        }
    }
    let mut recalled = 0;
    for (id, ex) in finals {
        let mine: Vec<_> = calls.iter().filter(|c| &c.execution == id).collect();
        let mut by_call: HashMap<(&str, &str), Vec<u64>> = HashMap::new();
        for c in &mine {
            let (step, phase) = (step_of(&c.op), phase_of(&c.op));
            assert_eq!(
                c.key,
                format!("{id}:{step}:{phase}"),
                "the same key on every attempt"
            );
            by_call.entry((step, phase)).or_default().push(c.attempt);
        }
        for ((step, phase), attempts) in &by_call {
            assert!(
                attempts.windows(2).all(|w| w[0] < w[1]),
                "{id} {step} {phase}: {attempts:?}"
            );
            if attempts.len() > 1 {
                recalled += 1;
            }
        }
        for st in ex["steps"].as_array().expect("steps") {
            let step = st["name"].as_str().expect("name");
            if let Some(n) = st["result"]["attempt"].as_u64() {
                // The recorded success was the last action call.
                let last = by_call
                    .get(&(step, "action"))
                    .and_then(|a| a.last().copied());
                assert_eq!(last, Some(n), "{id} {step}: called again after its success");
            }
            if st["status"] == "compensated" {
                let n = st["compensation_attempts"].as_u64().expect("n");
                let made = by_call
                    .get(&(step, "compensation"))
                    .map(Vec::len)
                    .unwrap_or(0) as u64;
                assert!(
                    made >= 1 && made <= n,
                    "{id} {step}: {made} compensation calls, {n} journaled"
                );
            }
        }
    }
    recalled
}
