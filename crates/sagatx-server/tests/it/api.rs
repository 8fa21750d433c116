//! Every row of API.md §2 and every rule of §4, against a real listening
//! coordinator and real step services on 127.0.0.1.

use std::sync::{Arc, Mutex};

use serde_json::{json, Value};

use crate::harness::{answer, saga, Answer, Coordinator, Services};

#[tokio::test]
async fn definitions_get_versions() {
    let svc = Services::start().await;
    let c = Coordinator::start(None).await;
    let d1 = saga(&svc, "order", &[("reserve", true)]);
    let (s, v) = c.post("/v1/sagas", d1.clone()).await;
    assert_eq!(
        (s, v.clone()),
        (201, json!({"name": "order", "version": 1}))
    );
    let (s, v) = c.post("/v1/sagas", d1.clone()).await;
    assert_eq!(
        (s, v),
        (200, json!({"name": "order", "version": 1})),
        "equal: same version"
    );
    let d2 = saga(&svc, "order", &[("reserve", true), ("ship", false)]);
    let (s, v) = c.post("/v1/sagas", d2).await;
    assert_eq!((s, v), (201, json!({"name": "order", "version": 2})));
    let (s, v) = c.get("/v1/sagas").await;
    assert_eq!(s, 200);
    assert_eq!(
        v,
        json!({"items": [{"name": "order", "version": 2}], "next_cursor": null})
    );
    let (s, v) = c.get("/v1/sagas/order").await;
    assert_eq!(s, 200);
    assert_eq!(v["version"], 2);
    assert_eq!(v["steps"].as_array().map(Vec::len), Some(2));
    assert_eq!(v["mode"], "sequential", "defaults are written out");
    let (s, v) = c.get("/v1/sagas/nope").await;
    assert_eq!(s, 404, "{v}");
    assert_eq!(v["error"]["code"], "not_found");
}

#[tokio::test]
async fn a_saga_completes_and_services_receive_the_envelope() {
    let svc = Services::start().await;
    let c = Coordinator::start(None).await;
    let def = saga(&svc, "order", &[("reserve", true), ("charge", true)]);
    let ex = c.run(def, json!({"order_id": 7})).await;
    assert_eq!(ex["status"], "completed", "{ex}");
    assert_eq!(
        ex["results"]["reserve"],
        json!({"op": "reserve", "attempt": 1})
    );
    for field in [
        "id",
        "saga",
        "saga_version",
        "status",
        "awaiting",
        "input",
        "results",
        "steps",
        "error",
        "created_at",
        "updated_at",
    ] {
        assert!(ex.get(field).is_some(), "missing {field}");
    }
    let got = svc.received();
    assert_eq!(svc.ops(), ["reserve", "charge"]);
    let id = ex["id"].as_str().expect("id");
    let charge = &got[1];
    assert_eq!(
        charge.body,
        json!({
            "execution_id": id, "saga": "order", "step": "charge", "phase": "action",
            "attempt": 1, "input": {"order_id": 7},
            "results": {"reserve": {"op": "reserve", "attempt": 1}},
        })
    );
    assert_eq!(
        charge.headers["idempotency-key"],
        format!("{id}:charge:action")
    );
    assert_eq!(charge.headers["content-type"], "application/json");
    assert_eq!(charge.headers["accept"], "*/*");
    assert!(
        charge.headers["user-agent"].starts_with("sagatx/"),
        "{:?}",
        charge.headers
    );
    assert_eq!(
        format!("http://{}", charge.headers["host"]),
        svc.base,
        "the step service's authority"
    );
    // W3C trace context: version, the execution as trace, a span id of 16
    // hex digits (not all zero) per call, sampled.
    let span = |tp: &str| -> String {
        let parts: Vec<&str> = tp.split('-').collect();
        assert_eq!(parts.len(), 4, "{tp}");
        assert_eq!((parts[0], parts[3]), ("00", "01"), "{tp}");
        assert_eq!(parts[1], id.replace('-', ""), "{tp}");
        assert_eq!(parts[2].len(), 16, "{tp}");
        assert!(
            parts[2]
                .bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()),
            "{tp}"
        );
        assert_ne!(parts[2], "0000000000000000", "{tp}");
        parts[2].to_string()
    };
    assert_ne!(
        span(&got[0].headers["traceparent"]),
        span(&charge.headers["traceparent"]),
        "each call is its own span"
    );
}

#[tokio::test]
async fn a_rejection_compensates_in_reverse_and_retries_keep_their_key() {
    let svc = Services::start().await;
    let c = Coordinator::start(None).await;
    svc.script("charge", vec![answer(503, json!({"error": "busy"}))]);
    svc.script("ship", vec![answer(402, json!({"error": "card declined"}))]);
    let def = saga(
        &svc,
        "order",
        &[("reserve", true), ("charge", true), ("ship", true)],
    );
    let ex = c.run(def, json!({})).await;
    assert_eq!(ex["status"], "compensated", "{ex}");
    assert_eq!(
        svc.ops(),
        [
            "reserve",
            "charge",
            "charge",
            "ship",
            "undo-charge",
            "undo-reserve"
        ]
    );
    let got = svc.received();
    assert_eq!(got[1].body["attempt"], 1);
    assert_eq!(got[2].body["attempt"], 2);
    assert_eq!(
        got[1].headers["idempotency-key"],
        got[2].headers["idempotency-key"]
    );
    assert_eq!(got[4].body["phase"], "compensation");
    assert!(got[4].headers["idempotency-key"].ends_with(":charge:compensation"));
    assert_eq!(ex["steps"][1]["attempts"], 2);
    assert_eq!(
        ex["error"],
        json!({"step": "ship", "message": "HTTP 402: card declined", "compensations": [
            {"step": "reserve", "status": "compensated", "error": null},
            {"step": "charge", "status": "compensated", "error": null},
        ]})
    );
    assert_eq!(ex["steps"][2]["status"], "failed");
    assert_eq!(
        ex["steps"][2]["compensation_attempts"], 0,
        "a rejected step is not compensated"
    );
}

#[tokio::test]
async fn a_redirect_is_a_rejection_and_is_not_followed() {
    // Following it would turn the POST into a GET without the body (302,
    // 303) or send the call, its idempotency key and any reply capability
    // to a host the definition does not name.
    let svc = Services::start().await;
    let c = Coordinator::start(None).await;
    let moved = format!("{}/elsewhere", svc.base);
    svc.script(
        "charge",
        vec![Answer {
            location: Some(moved.clone()),
            ..answer(307, Value::Null)
        }],
    );
    let def = saga(&svc, "moved", &[("reserve", true), ("charge", true)]);
    let ex = c.run(def, json!({})).await;
    assert_eq!(ex["status"], "compensated", "{ex}");
    assert_eq!(svc.ops(), ["reserve", "charge", "undo-reserve"]);
    assert_eq!(ex["steps"][1]["attempts"], 1, "a redirect is not retried");
    let message = ex["error"]["message"].as_str().unwrap_or_default();
    assert!(message.starts_with("HTTP 307"), "{message}");
    assert!(
        message.contains(&moved),
        "names where it pointed: {message}"
    );
    assert_eq!(
        ex["steps"][1]["compensation_attempts"], 0,
        "a rejected step is not compensated"
    );
}

#[tokio::test]
async fn a_sync_step_past_its_timeout_is_an_unknown_outcome_and_compensated() {
    let svc = Services::start().await;
    let c = Coordinator::start(None).await;
    svc.script(
        "charge",
        vec![Answer {
            delay_ms: 3_000,
            ..answer(200, json!({"late": true}))
        }],
    );
    let mut def = saga(&svc, "slow", &[("reserve", true), ("charge", true)]);
    def["steps"][1]["timeout_ms"] = json!(200);
    def["steps"][1]["retry"] = json!({"max_attempts": 1});
    let ex = c.run(def, json!({})).await;
    assert_eq!(ex["status"], "compensated", "{ex}");
    let message = ex["steps"][1]["error"].as_str().unwrap_or_default();
    assert_eq!(message, "timed out after 200 ms", "{ex}");
    // Its outcome is unknown: it may have taken effect, so it is undone.
    assert_eq!(
        svc.ops(),
        ["reserve", "charge", "undo-charge", "undo-reserve"]
    );
}

#[tokio::test]
async fn an_answer_over_a_mebibyte_is_a_permanent_failure() {
    let svc = Services::start().await;
    let c = Coordinator::start(None).await;
    svc.script(
        "charge",
        vec![answer(200, json!("x".repeat((1 << 20) + 10)))],
    );
    let def = saga(&svc, "big", &[("reserve", true), ("charge", true)]);
    let ex = c.run(def, json!({})).await;
    assert_eq!(ex["status"], "compensated", "{ex}");
    assert_eq!(ex["steps"][1]["attempts"], 1, "not retried");
    let message = ex["steps"][1]["error"].as_str().unwrap_or_default();
    assert!(message.contains("larger than 1048576 bytes"), "{message}");
}

/// A step service that answers every connection with `response` (raw
/// HTTP/1.1 bytes) after reading its request, then closes it.
async fn raw_service(response: Vec<u8>) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let base = format!("http://{}", listener.local_addr().expect("addr"));
    tokio::spawn(async move {
        while let Ok((mut sock, _)) = listener.accept().await {
            let response = response.clone();
            tokio::spawn(async move {
                // The request: its head and its (small) body.
                let mut got = Vec::new();
                let mut buf = [0u8; 4096];
                while !String::from_utf8_lossy(&got).contains("\r\n\r\n{") {
                    match sock.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => got.extend_from_slice(&buf[..n]),
                    }
                }
                let _ = sock.write_all(&response).await;
                let _ = sock.shutdown().await;
            });
        }
    });
    base
}

#[tokio::test]
async fn a_chunked_answer_over_a_mebibyte_or_one_cut_short_fails_the_step() {
    let c = Coordinator::start(None).await;
    // Chunked, no length announced: refused once it passes the limit.
    let mut big = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n".to_vec();
    for _ in 0..20 {
        big.extend_from_slice(format!("{:x}\r\n", 64 << 10).as_bytes());
        big.extend(std::iter::repeat_n(b'x', 64 << 10));
        big.extend_from_slice(b"\r\n");
    }
    big.extend_from_slice(b"0\r\n\r\n");
    let base = raw_service(big).await;
    let def = json!({"name": "chunked", "steps": [{"name": "a", "action": {"url": format!("{base}/a")}}]});
    let ex = c.run(def, json!({})).await;
    assert_eq!(ex["status"], "compensated", "{ex}");
    let message = ex["steps"][0]["error"].as_str().unwrap_or_default();
    assert!(message.contains("larger than"), "{ex}");
    assert_eq!(ex["steps"][0]["attempts"], 1, "permanent: not retried");

    // A body that ends before its announced length: the call broke off,
    // its outcome unknown (retried, here once).
    let cut = b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n{\"ok\"".to_vec();
    let base = raw_service(cut).await;
    let def = json!({"name": "cut", "retry": {"max_attempts": 2, "initial_backoff_ms": 10},
        "steps": [{"name": "a", "action": {"url": format!("{base}/a")}}]});
    let ex = c.run(def, json!({})).await;
    assert_eq!(ex["status"], "compensated", "{ex}");
    assert_eq!(ex["steps"][0]["attempts"], 2, "unknown outcome: retried");
    let message = ex["steps"][0]["error"].as_str().unwrap_or_default();
    assert!(message.starts_with("the response broke off"), "{ex}");
}

#[tokio::test]
async fn a_step_whose_retries_run_out_on_5xx_is_compensated_too() {
    let svc = Services::start().await;
    let c = Coordinator::start(None).await;
    svc.script("charge", vec![answer(500, Value::Null); 3]);
    let def = saga(&svc, "order", &[("reserve", true), ("charge", true)]);
    let ex = c.run(def, json!({})).await;
    assert_eq!(ex["status"], "compensated", "{ex}");
    assert_eq!(
        svc.ops(),
        [
            "reserve",
            "charge",
            "charge",
            "charge",
            "undo-charge",
            "undo-reserve"
        ]
    );
    assert_eq!(ex["error"]["message"], "HTTP 500");
}

#[tokio::test]
async fn a_dead_port_is_a_transient_failure_and_the_server_keeps_serving() {
    let c = Coordinator::start(None).await;
    let def = json!({"name": "dead", "retry": {"max_attempts": 2, "initial_backoff_ms": 10},
        "steps": [{"name": "a", "action": {"url": "http://127.0.0.1:9/nothing"}}]});
    let ex = c.run(def, json!({})).await;
    assert_eq!(ex["status"], "compensated", "{ex}");
    assert_eq!(ex["steps"][0]["attempts"], 2);
    let msg = ex["steps"][0]["error"].as_str().unwrap_or_default();
    assert!(
        msg.contains("cannot connect to http://127.0.0.1:9/nothing"),
        "{msg}"
    );
    let (s, _) = c.get("/healthz").await;
    assert_eq!(s, 200);
}

#[tokio::test]
async fn unknown_sagas_and_executions_are_404() {
    let c = Coordinator::start(None).await;
    let (s, v) = c
        .post("/v1/executions", json!({"saga": "nope", "input": 1}))
        .await;
    assert_eq!(s, 404, "{v}");
    assert!(v["error"]["message"]
        .as_str()
        .unwrap_or_default()
        .contains("nope"));
    let (s, _) = c
        .get("/v1/executions/0193c7e2-0000-7000-8000-000000000000")
        .await;
    assert_eq!(s, 404);
    let (s, _) = c.get("/v1/executions/not-a-uuid").await;
    assert_eq!(s, 404);
    let (s, v) = c.get("/v1/nothing/here").await;
    assert_eq!(s, 404);
    assert_eq!(v["error"]["code"], "not_found");
}

#[tokio::test]
async fn a_callback_step_waits_for_its_reply_at_the_reply_url() {
    let svc = Services::start().await;
    // With a token: the reply URL's capability replaces it.
    let c = Coordinator::start(Some("s3cret")).await;
    let mut def = saga(
        &svc,
        "remote",
        &[("reserve", true), ("ship", true), ("bill", false)],
    );
    def["steps"][1]["reply"] = json!("callback");
    let ex = c.run(def, json!({})).await;
    assert_eq!(
        (ex["status"].clone(), ex["awaiting"].clone()),
        (json!("paused"), json!("reply")),
        "{ex}"
    );
    let id = ex["id"].as_str().expect("id").to_string();
    let ship = &svc.received()[1];
    let reply_url = ship.body["reply_url"]
        .as_str()
        .expect("reply_url")
        .to_string();
    assert!(reply_url.starts_with(&format!(
        "{}/v1/executions/{id}/steps/ship/reply?cap=",
        c.base
    )));
    let plain = reqwest::Client::new();
    // A bad capability is refused.
    let bad = plain
        .post(format!(
            "{}/v1/executions/{id}/steps/ship/reply?cap=00",
            c.base
        ))
        .json(&json!({"ok": true}))
        .send()
        .await
        .expect("send");
    assert_eq!(bad.status().as_u16(), 401);
    // The capability opens only its own step.
    let other = reply_url.replace("/steps/ship/", "/steps/reserve/");
    let r = plain
        .post(&other)
        .json(&json!({"ok": true}))
        .send()
        .await
        .expect("send");
    assert_eq!(r.status().as_u16(), 401);
    let r = plain
        .post(&reply_url)
        .json(&json!({"ok": true, "result": {"tracking": "t-1"}}))
        .send()
        .await
        .expect("send");
    assert_eq!(r.status().as_u16(), 202);
    let done = c.until(&id, |e| e["status"] == "completed").await;
    assert_eq!(done["results"]["ship"], json!({"tracking": "t-1"}));
    // Same reply again: 202, no second effect.
    let r = plain
        .post(&reply_url)
        .json(&json!({"ok": true, "result": {"tracking": "t-1"}}))
        .send()
        .await
        .expect("send");
    assert_eq!(r.status().as_u16(), 202);
    assert_eq!(svc.ops(), ["reserve", "ship", "bill"]);
    // A different reply: 409. A reply to a step that never waited: 409.
    let r = plain
        .post(&reply_url)
        .json(&json!({"ok": false, "error": "x"}))
        .send()
        .await
        .expect("send");
    assert_eq!(r.status().as_u16(), 409);
    let (s, _) = c
        .post(
            &format!("/v1/executions/{id}/steps/bill/reply"),
            json!({"ok": true}),
        )
        .await;
    assert_eq!(s, 409);
    // Without the capability, the bearer token is needed.
    let r = plain
        .post(format!("{}/v1/executions/{id}/steps/ship/reply", c.base))
        .json(&json!({"ok": true}))
        .send()
        .await
        .expect("send");
    assert_eq!(r.status().as_u16(), 401);
}

#[tokio::test]
async fn a_rejected_reply_compensates_the_earlier_steps_only() {
    let svc = Services::start().await;
    let c = Coordinator::start(None).await;
    let mut def = saga(&svc, "remote", &[("reserve", true), ("ship", true)]);
    def["steps"][1]["reply"] = json!("callback");
    let ex = c.run(def, json!({})).await;
    let id = ex["id"].as_str().expect("id");
    let (s, _) = c
        .post(
            &format!("/v1/executions/{id}/steps/ship/reply"),
            json!({"ok": false, "error": "no courier"}),
        )
        .await;
    assert_eq!(s, 202);
    let done = c.until(id, |e| e["status"] == "compensated").await;
    assert_eq!(done["error"]["message"], "no courier");
    assert_eq!(svc.ops(), ["reserve", "ship", "undo-reserve"]);
}

#[tokio::test]
async fn a_callback_without_a_reply_in_time_is_compensated() {
    let svc = Services::start().await;
    let c = Coordinator::start(None).await;
    let mut def = saga(&svc, "remote", &[("ship", true)]);
    def["steps"][0]["reply"] = json!("callback");
    def["steps"][0]["timeout_ms"] = json!(300);
    let ex = c.run(def, json!({})).await;
    let id = ex["id"].as_str().expect("id");
    let done = c.until(id, |e| e["status"] == "compensated").await;
    assert_eq!(done["steps"][0]["error"], "no reply within 300 ms");
    assert_eq!(svc.ops(), ["ship", "undo-ship"]);
}

#[tokio::test]
async fn without_autocommit_commit_runs_confirms_and_reject_compensates() {
    let svc = Services::start().await;
    let c = Coordinator::start(None).await;
    let mut def = saga(&svc, "tcc", &[("a", true), ("b", true)]);
    def["autocommit"] = json!(false);
    def["steps"][0]["confirm"] = svc.url("confirm-a");
    def["steps"][1]["confirm"] = svc.url("confirm-b");
    let ex = c.run(def.clone(), json!(1)).await;
    assert_eq!(
        (ex["status"].clone(), ex["awaiting"].clone()),
        (json!("paused"), json!("commit"))
    );
    let id = ex["id"].as_str().expect("id");
    let (s, v) = c
        .post(&format!("/v1/executions/{id}/commit"), json!({}))
        .await;
    assert_eq!(s, 202, "{v}");
    c.until(id, |e| e["status"] == "completed").await;
    assert_eq!(svc.ops(), ["a", "b", "confirm-a", "confirm-b"]);
    let (s, _) = c
        .post(&format!("/v1/executions/{id}/commit"), json!({}))
        .await;
    assert_eq!(s, 409);

    let ex = c.run(def, json!(2)).await;
    let id = ex["id"].as_str().expect("id");
    let (s, _) = c
        .post(&format!("/v1/executions/{id}/reject"), json!({}))
        .await;
    assert_eq!(s, 202);
    let done = c.until(id, |e| e["status"] == "compensated").await;
    assert_eq!(done["error"]["message"], "rejected");
    assert_eq!(done["error"]["step"], Value::Null);
    let (s, _) = c
        .post(&format!("/v1/executions/{id}/reject"), json!({}))
        .await;
    assert_eq!(s, 409);
}

#[tokio::test]
async fn cancel_stops_and_compensates() {
    let svc = Services::start().await;
    let c = Coordinator::start(None).await;
    svc.script(
        "charge",
        vec![Answer {
            status: 200,
            body: json!({"late": true}),
            delay_ms: 400,
            location: None,
        }],
    );
    let def = saga(
        &svc,
        "slow",
        &[("reserve", true), ("charge", true), ("ship", true)],
    );
    let (s, ex) = c
        .post("/v1/executions", json!({"saga": def, "input": {}}))
        .await;
    assert_eq!(s, 201);
    let id = ex["id"].as_str().expect("id");
    c.until(id, |e| e["steps"][1]["status"] == "running").await;
    let (s, v) = c
        .post(&format!("/v1/executions/{id}/cancel"), json!({}))
        .await;
    assert_eq!(s, 202, "{v}");
    assert_eq!(v["status"], "compensating");
    let done = c.until(id, |e| e["status"] == "compensated").await;
    assert_eq!(done["error"]["message"], "cancelled");
    // The call in flight finished; no new action started.
    assert_eq!(
        svc.ops(),
        ["reserve", "charge", "undo-charge", "undo-reserve"]
    );
    let (s, _) = c
        .post(&format!("/v1/executions/{id}/cancel"), json!({}))
        .await;
    assert_eq!(s, 409, "terminal");
}

#[tokio::test]
async fn retry_resumes_a_failed_compensation() {
    let svc = Services::start().await;
    let c = Coordinator::start(None).await;
    svc.script("charge", vec![answer(400, json!({"error": "bad card"}))]);
    svc.script(
        "undo-reserve",
        vec![answer(409, json!({"error": "locked"}))],
    );
    let def = saga(&svc, "order", &[("reserve", true), ("charge", true)]);
    let ex = c.run(def, json!({})).await;
    assert_eq!(ex["status"], "failed", "{ex}");
    assert_eq!(ex["error"]["compensations"][0]["error"], "HTTP 409: locked");
    let id = ex["id"].as_str().expect("id");
    let (s, v) = c
        .post(&format!("/v1/executions/{id}/retry"), json!({}))
        .await;
    assert_eq!(s, 202, "{v}");
    let done = c.until(id, |e| e["status"] == "compensated").await;
    assert_eq!(done["steps"][0]["compensation_attempts"], 2);
    let (s, _) = c
        .post(&format!("/v1/executions/{id}/retry"), json!({}))
        .await;
    assert_eq!(s, 409);
}

#[tokio::test]
async fn an_idempotency_key_makes_a_start_safe_to_repeat() {
    let svc = Services::start().await;
    let c = Coordinator::start(None).await;
    let def = saga(&svc, "order", &[("a", false)]);
    let body = json!({"saga": def, "input": {"n": 1}});
    let send = |b: Value| {
        c.http
            .post(format!("{}/v1/executions", c.base))
            .header("Idempotency-Key", "order-7")
            .json(&b)
            .send()
    };
    let r1 = send(body.clone()).await.expect("send");
    assert_eq!(r1.status().as_u16(), 201);
    let e1: Value = r1.json().await.expect("json");
    let r2 = send(body.clone()).await.expect("send");
    assert_eq!(r2.status().as_u16(), 200);
    let e2: Value = r2.json().await.expect("json");
    assert_eq!(e1["id"], e2["id"]);
    let r3 = send(json!({"saga": body["saga"], "input": {"n": 2}}))
        .await
        .expect("send");
    assert_eq!(r3.status().as_u16(), 409);
    assert_eq!(svc.ops(), ["a"], "one execution only");
}

#[tokio::test]
async fn lists_page_newest_first_with_filters() {
    let svc = Services::start().await;
    let c = Coordinator::start(None).await;
    let (s, empty) = c.get("/v1/executions").await;
    assert_eq!(s, 200);
    assert_eq!(empty, json!({"items": [], "next_cursor": null}));
    svc.script("bad", vec![answer(400, Value::Null); 3]);
    let good = saga(&svc, "good", &[("a", false)]);
    let bad = saga(&svc, "bad", &[("bad", false)]);
    let mut ids = Vec::new();
    for i in 0..7 {
        let ex = c
            .run(
                if i % 3 == 0 {
                    bad.clone()
                } else {
                    good.clone()
                },
                json!(i),
            )
            .await;
        ids.push(ex["id"].clone());
    }
    ids.reverse();
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let path = match &cursor {
            Some(cur) => format!("/v1/executions?limit=3&cursor={cur}"),
            None => "/v1/executions?limit=3".to_string(),
        };
        let (s, page) = c.get(&path).await;
        assert_eq!(s, 200, "{page}");
        seen.extend(
            page["items"]
                .as_array()
                .expect("items")
                .iter()
                .map(|e| e["id"].clone()),
        );
        match page["next_cursor"].as_str() {
            Some(cur) => cursor = Some(cur.to_string()),
            None => break,
        }
    }
    assert_eq!(seen, ids);
    // Each item is the execution's view, as a GET of it answers it.
    let (_, page) = c.get("/v1/executions?limit=4").await;
    let items = page["items"].as_array().expect("items");
    assert_eq!(items.len(), 4);
    for item in items {
        let id = item["id"].as_str().expect("an id");
        let (_, one) = c.get(&format!("/v1/executions/{id}")).await;
        assert_eq!(item, &one);
    }
    let (_, page) = c.get("/v1/executions?saga=bad&status=compensated").await;
    assert_eq!(page["items"].as_array().map(Vec::len), Some(3));
    for (q, field) in [
        ("limit=1001", "limit"),
        ("limit=0", "limit"),
        ("status=done", "status"),
        ("cursor=x", "cursor"),
        ("limit=ten", "query"),
    ] {
        let (s, v) = c.get(&format!("/v1/executions?{q}")).await;
        assert_eq!(s, 422, "{q}: {v}");
        assert!(
            v["error"]["message"]
                .as_str()
                .unwrap_or_default()
                .starts_with(field),
            "{q}: {v}"
        );
    }
}

#[tokio::test]
async fn wait_answers_at_once_for_paused_and_refuses_over_sixty() {
    let svc = Services::start().await;
    let c = Coordinator::start(None).await;
    let def = saga(&svc, "order", &[("a", false)]);
    let (s, v) = c
        .post(
            "/v1/executions?wait=61",
            json!({"saga": def, "input": null}),
        )
        .await;
    assert_eq!(s, 422, "{v}");
    assert!(v["error"]["message"]
        .as_str()
        .unwrap_or_default()
        .starts_with("wait"));
    // Without wait, the answer comes before the saga ends: it is durable
    // and running (or already done).
    let (s, v) = c
        .post("/v1/executions", json!({"saga": def, "input": null}))
        .await;
    assert_eq!(s, 201);
    assert!(
        ["running", "completed"].contains(&v["status"].as_str().unwrap_or_default()),
        "{v}"
    );
}

#[tokio::test]
async fn the_token_guards_the_api_but_not_health() {
    let c = Coordinator::start(Some("s3cret")).await;
    let plain = reqwest::Client::new();
    for path in ["/v1/executions", "/v1/sagas"] {
        let r = plain
            .get(format!("{}{path}", c.base))
            .send()
            .await
            .expect("send");
        assert_eq!(r.status().as_u16(), 401, "{path}");
        let body: Value = r.json().await.expect("json");
        assert_eq!(body["error"]["code"], "unauthorized");
        let r = plain
            .get(format!("{}{path}", c.base))
            .bearer_auth("wrong")
            .send()
            .await
            .expect("send");
        assert_eq!(r.status().as_u16(), 401);
    }
    let (s, _) = c.get("/v1/executions").await;
    assert_eq!(s, 200, "with the token");
    let r = plain
        .get(format!("{}/healthz", c.base))
        .send()
        .await
        .expect("send");
    assert_eq!(r.status().as_u16(), 200);
    let r = plain
        .get(format!("{}/", c.base))
        .send()
        .await
        .expect("send");
    assert_eq!(r.status().as_u16(), 200);
}

#[tokio::test]
async fn nonsense_gets_clear_errors() {
    let c = Coordinator::start(None).await;
    let raw = |path: &str, body: Vec<u8>| {
        c.http
            .post(format!("{}{path}", c.base))
            .header("content-type", "application/json")
            .body(body)
            .send()
    };
    // Malformed JSON: 400 with line and column.
    let r = raw("/v1/sagas", b"{\n  \"name\": oops\n}".to_vec())
        .await
        .expect("send");
    assert_eq!(r.status().as_u16(), 400);
    let v: Value = r.json().await.expect("json");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("line 2, column"),
        "{v}"
    );
    let r = raw("/v1/executions", b"{\"saga\": ".to_vec())
        .await
        .expect("send");
    assert_eq!(r.status().as_u16(), 400);
    // Unknown fields, wrong types, bad definitions: 422 naming the field.
    for (path, body, field) in [
        ("/v1/executions", json!({"saga": "x", "inptu": 1}), "inptu"),
        ("/v1/executions", json!({"saga": 7}), "saga"),
        (
            "/v1/executions",
            json!({"saga": {"name": "x", "steps": []}}),
            "saga.steps",
        ),
        (
            "/v1/sagas",
            json!({"name": "x", "steps": [{"name": "a", "action": {"url": "ftp://h"}}]}),
            "steps[0].action.url",
        ),
        ("/v1/sagas", json!({"name": "x", "steps": "many"}), "steps"),
        ("/v1/sagas", json!([1, 2]), "definition"),
        // Read as its fields in order by serde's derive, once.
        (
            "/v1/executions",
            json!(["x", 1]),
            "body: must be a JSON object",
        ),
        (
            "/v1/sagas",
            json!({"name": "x", "steps": [{"name": "a", "action": {"url": "http://h/a"}, "retry": [5]}]}),
            "steps[0].retry",
        ),
        // A Rust library's "local" call: nothing in the coordinator can
        // run it (accepted, every execution failed after its retries).
        (
            "/v1/sagas",
            json!({"name": "x", "steps": [{"name": "a", "action": {"url": "http://h/a"}, "compensation": "local"}]}),
            "steps[0].compensation: is \"local\"",
        ),
        (
            "/v1/executions",
            json!({"saga": {"name": "x", "steps": [{"name": "a", "action": "local"}]}}),
            "saga.steps[0].action: is \"local\"",
        ),
    ] {
        let r = raw(path, body.to_string().into_bytes())
            .await
            .expect("send");
        assert_eq!(r.status().as_u16(), 422, "{body}");
        let v: Value = r.json().await.expect("json");
        let msg = v["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        assert!(msg.starts_with(field), "{body}: {msg}");
    }
    // Over 1 MiB: 413.
    let big = format!(
        "{{\"saga\": \"x\", \"input\": \"{}\"}}",
        "a".repeat(1 << 20)
    );
    let r = raw("/v1/executions", big.into_bytes()).await.expect("send");
    assert_eq!(r.status().as_u16(), 413);
    let v: Value = r.json().await.expect("json");
    assert_eq!(v["error"]["code"], "too_large");
    // Still serving.
    let (s, _) = c.get("/healthz").await;
    assert_eq!(s, 200);
}

/// Parses Prometheus text: `name{labels} value` lines into (series, value).
fn parse_prometheus(text: &str) -> Vec<(String, f64)> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| {
            let (series, value) = l
                .rsplit_once(' ')
                .unwrap_or_else(|| panic!("bad line {l:?}"));
            let v: f64 = value
                .parse()
                .unwrap_or_else(|_| panic!("bad value in {l:?}"));
            (series.to_string(), v)
        })
        .collect()
}

fn metric(m: &[(String, f64)], name: &str, labels: &[&str]) -> f64 {
    m.iter()
        .filter(|(s, _)| {
            s.starts_with(name) && s[name.len()..].starts_with(['{', ' ']) || s == name
        })
        .filter(|(s, _)| labels.iter().all(|l| s.contains(l)))
        .map(|(_, v)| *v)
        .sum()
}

#[tokio::test]
async fn metrics_move_as_executions_run() {
    let svc = Services::start().await;
    let c = Coordinator::start(None).await;
    svc.script("charge", vec![answer(503, Value::Null)]);
    let def = saga(&svc, "metered", &[("reserve", true), ("charge", true)]);
    let before = {
        let r = c
            .http
            .get(format!("{}/metrics", c.base))
            .send()
            .await
            .expect("send");
        parse_prometheus(&r.text().await.expect("text"))
    };
    assert_eq!(
        metric(
            &before,
            "sagatx_executions_started_total",
            &["saga=\"metered\""]
        ),
        0.0
    );
    for _ in 0..2 {
        let ex = c.run(def.clone(), json!({})).await;
        assert_eq!(ex["status"], "completed");
    }
    let r = c
        .http
        .get(format!("{}/metrics", c.base))
        .send()
        .await
        .expect("send");
    assert_eq!(r.status().as_u16(), 200);
    assert!(r.headers()["content-type"]
        .to_str()
        .unwrap_or("")
        .starts_with("text/plain"));
    let m = parse_prometheus(&r.text().await.expect("text"));
    assert_eq!(
        metric(&m, "sagatx_executions_started_total", &["saga=\"metered\""]),
        2.0
    );
    assert_eq!(
        metric(
            &m,
            "sagatx_executions_finished_total",
            &["saga=\"metered\"", "status=\"completed\""]
        ),
        2.0
    );
    assert_eq!(
        metric(
            &m,
            "sagatx_step_attempts_total",
            &[
                "step=\"charge\"",
                "phase=\"action\"",
                "outcome=\"transient\""
            ]
        ),
        1.0
    );
    assert_eq!(
        metric(
            &m,
            "sagatx_step_attempts_total",
            &["saga=\"metered\"", "outcome=\"ok\""]
        ),
        4.0
    );
    assert_eq!(
        metric(
            &m,
            "sagatx_execution_duration_seconds_count",
            &["saga=\"metered\"", "status=\"completed\""]
        ),
        2.0
    );
    assert_eq!(
        metric(
            &m,
            "sagatx_step_duration_seconds_count",
            &["saga=\"metered\"", "step=\"charge\"", "phase=\"action\""]
        ),
        3.0,
        "step latency by saga and step"
    );
    assert!(metric(&m, "sagatx_store_commit_seconds_count", &[]) >= 6.0);
    assert!(metric(&m, "sagatx_store_batch_size_count", &[]) >= 1.0);
    assert!(m
        .iter()
        .any(|(s, _)| s.starts_with("sagatx_executions_in_flight")));
}

#[tokio::test]
async fn the_openapi_document_covers_every_route() {
    let c = Coordinator::start(Some("t")).await;
    // Served without the token.
    let r = reqwest::get(format!("{}/openapi.json", c.base))
        .await
        .expect("send");
    assert_eq!(r.status().as_u16(), 200);
    let doc: Value = r.json().await.expect("json");
    assert!(
        doc["openapi"].as_str().unwrap_or("").starts_with("3."),
        "{}",
        doc["openapi"]
    );
    let routes = [
        ("post", "/v1/sagas"),
        ("get", "/v1/sagas"),
        ("get", "/v1/sagas/{name}"),
        ("get", "/v1/sagas/{name}/diagram.svg"),
        ("get", "/v1/summary"),
        ("post", "/v1/executions"),
        ("get", "/v1/executions"),
        ("get", "/v1/executions/{id}"),
        ("post", "/v1/executions/{id}/steps/{step}/reply"),
        ("post", "/v1/executions/{id}/commit"),
        ("post", "/v1/executions/{id}/reject"),
        ("post", "/v1/executions/{id}/cancel"),
        ("post", "/v1/executions/{id}/retry"),
        ("get", "/healthz"),
        ("get", "/metrics"),
        ("get", "/openapi.json"),
        ("get", "/"),
    ];
    let paths = doc["paths"].as_object().expect("paths");
    let documented: usize = paths
        .values()
        .map(|p| p.as_object().map_or(0, |o| o.len()))
        .sum();
    assert_eq!(
        documented,
        routes.len(),
        "documented operations: {:?}",
        paths.keys().collect::<Vec<_>>()
    );
    for (method, path) in routes {
        let op = &doc["paths"][path][method];
        assert!(op.is_object(), "{method} {path} is not documented");
        assert!(
            op["responses"].as_object().is_some_and(|r| !r.is_empty()),
            "{method} {path}"
        );
    }
    assert!(doc["components"]["schemas"]["ExecutionView"]["properties"]["steps"].is_object());
}

/// The document states the limits the server enforces (so that a client
/// generated from it, or a fuzzer reading it, sends what is accepted): the
/// definition's shape with the core's limits, objects without unknown
/// fields, the list's paging bounds. A limit changed in the core and not
/// here fails this test.
#[tokio::test]
async fn the_openapi_document_states_the_limits_the_server_enforces() {
    use sagatx_core::definition::{MAX_STEPS, MAX_TIMEOUT_MS};
    use sagatx_core::retry::{BACKOFF_MS_LIMIT, MAX_ATTEMPTS_LIMIT};
    let c = Coordinator::start(None).await;
    let doc: Value = reqwest::get(format!("{}/openapi.json", c.base))
        .await
        .expect("send")
        .json()
        .await
        .expect("json");
    let schemas = &doc["components"]["schemas"];
    let def = &schemas["SagaDefinition"];
    assert_eq!(def["additionalProperties"], false, "{def}");
    assert_eq!(def["required"], json!(["name", "steps"]), "{def}");
    assert_eq!(def["properties"]["steps"]["minItems"], 1);
    assert_eq!(def["properties"]["steps"]["maxItems"], MAX_STEPS);
    assert_eq!(def["properties"]["name"]["pattern"], "^[a-z0-9_.-]{1,64}$");
    let step = &schemas["StepDefinition"];
    assert_eq!(step["additionalProperties"], false);
    assert_eq!(step["required"], json!(["name", "action"]));
    assert_eq!(step["properties"]["timeout_ms"]["maximum"], MAX_TIMEOUT_MS);
    let retry = &schemas["RetryPolicy"]["properties"];
    assert_eq!(retry["max_attempts"]["maximum"], MAX_ATTEMPTS_LIMIT);
    assert_eq!(retry["initial_backoff_ms"]["maximum"], BACKOFF_MS_LIMIT);
    assert_eq!(retry["max_backoff_ms"]["maximum"], BACKOFF_MS_LIMIT);
    let call = &schemas["HttpCall"];
    assert_eq!(call["additionalProperties"], false);
    assert_eq!(call["required"], json!(["url"]));
    assert_eq!(
        schemas["HttpMethod"]["enum"],
        json!(["POST", "PUT", "PATCH", "DELETE", "GET"])
    );
    for name in ["StartRequest", "ReplyRequest"] {
        assert_eq!(schemas[name]["additionalProperties"], false, "{name}");
    }
    assert_eq!(
        doc["paths"]["/v1/sagas"]["post"]["requestBody"]["content"]["application/json"]["schema"]
            ["$ref"],
        "#/components/schemas/SagaDefinition"
    );
    let params = doc["paths"]["/v1/executions"]["get"]["parameters"]
        .as_array()
        .expect("parameters")
        .clone();
    let param = |name: &str| {
        params
            .iter()
            .find(|p| p["name"] == name)
            .map(|p| p["schema"].clone())
            .unwrap_or_else(|| panic!("no parameter {name}"))
    };
    assert_eq!(param("limit")["minimum"], 1);
    assert_eq!(param("limit")["maximum"], 1000);
    assert_eq!(param("cursor")["minLength"], 1);
    assert_eq!(
        param("status")["$ref"],
        "#/components/schemas/ExecutionStatus"
    );
    // Links from what a start or a registration answers to what it opens.
    let start = &doc["paths"]["/v1/executions"]["post"]["responses"];
    for status in ["200", "201"] {
        assert_eq!(
            start[status]["links"]["cancel"],
            json!({"operationId": "cancel", "parameters": {"id": "$response.body#/id"}}),
            "{status}"
        );
        assert_eq!(
            start[status]["links"]["reply"]["parameters"]["step"],
            "$response.body#/steps/0/name"
        );
    }
    assert_eq!(
        doc["paths"]["/v1/sagas"]["post"]["responses"]["201"]["links"]["get_saga"]["parameters"]
            ["name"],
        "$response.body#/name"
    );
    // The core's statuses, every one and no other.
    assert_eq!(
        schemas["ExecutionStatus"]["enum"],
        json!(sagatx_core::Status::ALL.map(|s| s.as_str()))
    );
}

#[tokio::test]
async fn status_changes_are_notified_with_retries_and_filters() {
    use std::sync::{Arc, Mutex};
    // A receiver that refuses its first request.
    let got: Arc<Mutex<Vec<(String, Value)>>> = Arc::default();
    let g = got.clone();
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |headers: axum::http::HeaderMap, body: String| {
            let g = g.clone();
            async move {
                let mut g = g.lock().expect("lock");
                let key = headers["idempotency-key"]
                    .to_str()
                    .unwrap_or("")
                    .to_string();
                g.push((key, serde_json::from_str(&body).unwrap_or(Value::Null)));
                if g.len() == 1 {
                    axum::http::StatusCode::INTERNAL_SERVER_ERROR
                } else {
                    axum::http::StatusCode::OK
                }
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let hook = format!("http://{}/hook", listener.local_addr().expect("addr"));
    tokio::spawn(async move { axum::serve(listener, app).await });
    let svc = Services::start().await;
    svc.script("bad", vec![answer(400, Value::Null)]);
    let c = Coordinator::start_with(sagatx_server::ServerConfig {
        notify: Some(sagatx_server::notify::NotifyConfig {
            urls: vec![hook],
            statuses: vec![sagatx::Status::Completed, sagatx::Status::Compensated],
        }),
        ..Default::default()
    })
    .await;
    let ok = c.run(saga(&svc, "good", &[("a", true)]), json!(1)).await;
    let bad = c
        .run(saga(&svc, "bad", &[("a", true), ("bad", false)]), json!(2))
        .await;
    assert_eq!(
        (ok["status"].as_str(), bad["status"].as_str()),
        (Some("completed"), Some("compensated"))
    );
    for _ in 0..300 {
        if got.lock().expect("lock").len() >= 3 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    let got = got.lock().expect("lock").clone();
    assert_eq!(
        got.len(),
        3,
        "two notifications, one of them retried once: {got:?}"
    );
    let statuses: std::collections::BTreeSet<String> = got
        .iter()
        .map(|(_, b)| b["status"].as_str().unwrap_or("").to_string())
        .collect();
    assert_eq!(
        statuses.into_iter().collect::<Vec<_>>(),
        ["compensated", "completed"]
    );
    // The retried one came again with the same key.
    let keys: Vec<&String> = got.iter().map(|(k, _)| k).collect();
    assert_eq!(
        keys.iter().filter(|k| **k == keys[0]).count(),
        2,
        "{keys:?}"
    );
    for (key, body) in &got {
        assert_eq!(body["event"], "execution.status");
        let id = body["execution"]["id"].as_str().expect("execution id");
        assert!(key.starts_with(id), "{key}");
        // The view notified is the execution's, as a GET of it answers.
        let (_, now) = c.get(&format!("/v1/executions/{id}")).await;
        assert_eq!(body["execution"], now);
        assert_eq!(body["status"], now["status"]);
    }
}

#[tokio::test]
async fn a_notification_answered_with_a_redirect_is_not_followed() {
    use axum::routing::post;
    let calls: Arc<Mutex<Vec<String>>> = Arc::default();
    let record = |route: &'static str, calls: Arc<Mutex<Vec<String>>>| {
        move || {
            calls.lock().expect("lock").push(route.to_string());
            async move { route }
        }
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let base = format!("http://{}", listener.local_addr().expect("addr"));
    let moved = format!("{base}/elsewhere");
    let app = axum::Router::new()
        .route(
            "/hook",
            post({
                let calls = calls.clone();
                let moved = moved.clone();
                move || {
                    calls.lock().expect("lock").push("hook".into());
                    async move {
                        (
                            axum::http::StatusCode::PERMANENT_REDIRECT,
                            [(axum::http::header::LOCATION, moved)],
                        )
                    }
                }
            }),
        )
        .route("/elsewhere", post(record("elsewhere", calls.clone())))
        .route("/other", post(record("other", calls.clone())));
    tokio::spawn(async move { axum::serve(listener, app).await });
    let svc = Services::start().await;
    let c = Coordinator::start_with(sagatx_server::ServerConfig {
        notify: Some(sagatx_server::notify::NotifyConfig {
            urls: vec![format!("{base}/hook"), format!("{base}/other")],
            statuses: vec![sagatx::Status::Completed],
        }),
        ..Default::default()
    })
    .await;
    let ex = c.run(saga(&svc, "moved", &[("a", true)]), json!(1)).await;
    assert_eq!(ex["status"], "completed", "{ex}");
    // The other URL's delivery shows the notifications went out; then a
    // while for any retry or redirect to show up.
    for _ in 0..300 {
        if calls.lock().expect("lock").iter().any(|c| c == "other") {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    tokio::time::sleep(std::time::Duration::from_millis(600)).await;
    let mut got = calls.lock().expect("lock").clone();
    got.sort();
    assert_eq!(
        got,
        ["hook", "other"],
        "the redirect was neither followed nor retried"
    );
}

/// Regression: the summary took the twenty newest paused executions and
/// kept those paused for over a minute, so twenty executions paused in the
/// last minute hid one paused for ten.
#[tokio::test]
async fn a_long_pause_needs_attention_however_many_paused_since() {
    let svc = Services::start().await;
    let c = Coordinator::start(None).await;
    let mut def = saga(&svc, "waits", &[("ask", false)]);
    def["steps"][0]["reply"] = json!("callback");
    let first = c.run(def.clone(), json!(0)).await;
    assert_eq!(first["status"], "paused", "{first}");
    // The same execution, as if it had paused ten minutes ago.
    let id: sagatx::ExecutionId = first["id"].as_str().expect("id").parse().expect("uuid");
    let mut old = c.store.load(id).await.expect("load").expect("stored");
    let ten_minutes = 600_000;
    old.id = sagatx::ExecutionId(uuid::Uuid::now_v7());
    old.created_at_ms -= ten_minutes;
    old.updated_at_ms -= ten_minutes;
    for step in &mut old.steps {
        for a in &mut step.history {
            a.started_at_ms -= ten_minutes;
            a.ended_at_ms = a.ended_at_ms.map(|e| e - ten_minutes);
        }
    }
    c.store.import(&old).await.expect("import");
    for i in 1..=21 {
        let ex = c.run(def.clone(), json!(i)).await;
        assert_eq!(ex["status"], "paused", "{ex}");
    }
    let (s, v) = c.get("/v1/summary").await;
    assert_eq!(s, 200, "{v}");
    let ids: Vec<&str> = v["attention"]
        .as_array()
        .expect("attention")
        .iter()
        .filter_map(|e| e["id"].as_str())
        .collect();
    assert_eq!(
        ids,
        [old.id.to_string()],
        "the one paused for ten minutes, not those paused just now"
    );
    // With the time it paused, as the store keeps it.
    assert_eq!(
        v["attention"][0]["paused_since"],
        sagatx_core::execution::format_ms(old.updated_at_ms),
        "{v}"
    );
}

#[tokio::test]
async fn the_dashboard_is_served_offline_with_summary_and_diagram() {
    let svc = Services::start().await;
    let c = Coordinator::start(Some("t")).await;
    svc.script("bad", vec![answer(400, Value::Null)]);
    svc.script("undo-a", vec![answer(400, Value::Null); 10]);
    for i in 0..3 {
        c.run(saga(&svc, "good", &[("a", true)]), json!(i)).await;
    }
    let failed = c
        .run(saga(&svc, "bad", &[("a", true), ("bad", false)]), json!(9))
        .await;
    assert_eq!(failed["status"], "failed", "{failed}");
    // The page: served without the token, everything inline, no CDN.
    let page = reqwest::get(format!("{}/", c.base)).await.expect("send");
    assert_eq!(page.status().as_u16(), 200);
    assert!(page.headers()["content-type"]
        .to_str()
        .unwrap_or("")
        .starts_with("text/html"));
    let html = page.text().await.expect("text");
    assert!(html.contains("<main id=\"app\">"), "the page shell");
    assert!(
        !html.contains("src=\"http") && !html.contains("href=\"http"),
        "nothing from the internet"
    );
    assert!(
        html.contains("sessionStorage"),
        "asks for the token once and keeps it for the tab"
    );
    // The summary, computed by the store, with what needs attention.
    let (s, v) = c.get("/v1/summary").await;
    assert_eq!(s, 200, "{v}");
    let count = |saga: &str, status: &str| {
        v["counts"]
            .as_array()
            .expect("counts")
            .iter()
            .find(|x| x["saga"] == saga && x["status"] == status)
            .map(|x| x["count"].as_u64().unwrap_or(0))
            .unwrap_or(0)
    };
    assert_eq!(count("good", "completed"), 3);
    assert_eq!(count("bad", "failed"), 1);
    assert_eq!(v["attention"][0]["id"], failed["id"]);
    // A failed one has no pause to tell of.
    assert!(v["attention"][0].get("paused_since").is_none(), "{v}");
    // The diagram, drawn by the server.
    let (s, svg) = c.get("/v1/sagas/bad/diagram.svg").await;
    assert_eq!(s, 200);
    let svg = svg.as_str().unwrap_or("").to_string();
    assert!(
        svg.starts_with("<svg") && svg.contains(">undo a</text>") && svg.contains(">bad</text>"),
        "{svg}"
    );
    let (s, _) = c.get("/v1/sagas/bad/diagram.svg?version=9").await;
    assert_eq!(s, 404);
    let plain = reqwest::get(format!("{}/v1/summary", c.base))
        .await
        .expect("send");
    assert_eq!(
        plain.status().as_u16(),
        401,
        "the dashboard's API calls need the token"
    );
}
