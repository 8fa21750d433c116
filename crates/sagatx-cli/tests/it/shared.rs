//! Several `sagatx serve` processes on one PostgreSQL: they share the work,
//! one killed with SIGKILL has its executions taken over when its leases
//! run out, one stopped with SIGSTOP cannot write to what it lost, and a
//! command sent to any of them reaches the one that drives the execution.

use std::collections::HashMap;
use std::path::Path;
use std::process::Child;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::crash::check_calls;
use crate::{free_port, Server, Services};

/// A new database on the test server; its URL.
pub(crate) fn fresh_db(tag: &str) -> String {
    let base = std::env::var("SAGATX_TEST_PG_URL")
        .expect("SAGATX_TEST_PG_URL is not set: run the tests with scripts/test");
    let db = format!("sagatx_{tag}_{}", std::process::id());
    let admin = std::process::Command::new("psql")
        .args([
            base.as_str(),
            "-q",
            "-c",
            &format!("DROP DATABASE IF EXISTS {db}"),
            "-c",
            &format!("CREATE DATABASE {db}"),
        ])
        .status();
    assert!(
        admin.map(|s| s.success()).unwrap_or(false),
        "psql (installed with PostgreSQL by scripts/test) must create the test database"
    );
    format!("{}/{db}", base.rsplit_once('/').expect("url").0)
}

fn runtime() -> tokio::runtime::Runtime {
    sagatx_server::install_crypto();
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

/// Runs SQL on the test database; the rows as strings.
fn sql(rt: &tokio::runtime::Runtime, url: &str, q: &str) -> Vec<Vec<Option<String>>> {
    rt.block_on(async {
        let (c, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
            .await
            .expect("connect");
        tokio::spawn(conn);
        let rows = c.simple_query(q).await.expect("query");
        rows.into_iter()
            .filter_map(|m| match m {
                tokio_postgres::SimpleQueryMessage::Row(r) => {
                    Some((0..r.len()).map(|i| r.get(i).map(str::to_string)).collect())
                }
                _ => None,
            })
            .collect()
    })
}

/// POSTs every body, spread over the servers, 32 at a time; the ids.
fn start_all(rt: &tokio::runtime::Runtime, servers: &[String], bodies: Vec<Value>) -> Vec<String> {
    rt.block_on(async {
        let client = reqwest::Client::new();
        let gate = std::sync::Arc::new(tokio::sync::Semaphore::new(32));
        let mut tasks = Vec::new();
        for (i, body) in bodies.into_iter().enumerate() {
            let url = format!("{}/v1/executions", servers[i % servers.len()]);
            let (client, gate) = (client.clone(), gate.clone());
            tasks.push(tokio::spawn(async move {
                let _p = gate.acquire().await.expect("gate");
                let r: Value = client
                    .post(&url)
                    .json(&body)
                    .send()
                    .await
                    .expect("post")
                    .json()
                    .await
                    .expect("json");
                r["id"].as_str().expect("id").to_string()
            }));
        }
        let mut ids = Vec::new();
        for t in tasks {
            ids.push(t.await.expect("task"));
        }
        ids
    })
}

/// GETs every execution from one server.
fn fetch_all(rt: &tokio::runtime::Runtime, server: &str, ids: &[String]) -> HashMap<String, Value> {
    rt.block_on(async {
        let client = reqwest::Client::new();
        let mut out = HashMap::new();
        for chunk in ids.chunks(64) {
            let gets = chunk.iter().map(|id| {
                let client = client.clone();
                let url = format!("{server}/v1/executions/{id}");
                async move {
                    let v: Value = client
                        .get(&url)
                        .send()
                        .await
                        .expect("get")
                        .json()
                        .await
                        .expect("json");
                    v
                }
            });
            for (id, v) in chunk.iter().zip(futures_util::future::join_all(gets).await) {
                out.insert(id.clone(), v);
            }
        }
        out
    })
}

fn owner_of(server: &str) -> String {
    crate::get(&format!("{server}/healthz"))["owner"]
        .as_str()
        .expect("a server on PostgreSQL names its owner id in /healthz")
        .to_string()
}

fn definition(svc: &Services, dir: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(svc.order_json(dir)).expect("read"))
        .expect("json")
}

const LEASE_MS: u64 = 1500;

#[test]
fn three_servers_share_postgres_and_take_over_a_killed_ones_work() {
    const N: usize = 2000;
    let url = fresh_db("three");
    let rt = runtime();
    let dir = tempfile::tempdir().expect("tempdir");
    // Calls of 400 ms: many executions are in flight at any moment.
    let svc = Services::start(400);
    let lease = LEASE_MS.to_string();
    let mut servers: Vec<Option<Server>> = (0..3)
        .map(|_| {
            Some(Server::start_with(
                dir.path(),
                free_port(),
                &url,
                &["--lease-ms", &lease],
            ))
        })
        .collect();
    let urls: Vec<String> = servers
        .iter()
        .map(|s| s.as_ref().expect("up").url.clone())
        .collect();
    let victim_owner = owner_of(&urls[1]);
    let def = definition(&svc, dir.path());
    let mut bodies: Vec<Value> = (0..N)
        .map(|i| {
            let input = if i % 5 == 0 {
                json!({"order_id": i, "card": "declined"})
            } else {
                json!({"order_id": i})
            };
            json!({"saga": def, "input": input})
        })
        .collect();
    let later = bodies.split_off(N / 2);
    // The first half goes to all three; the second server is killed while
    // that half is under way; the second half goes to the two left.
    let mut ids = start_all(&rt, &urls, bodies);
    let held_at_kill = sql(
        &rt,
        &url,
        &format!("SELECT id::text FROM sagatx_executions WHERE lease_owner = '{victim_owner}'"),
    );
    if let Some(s) = servers[1].take() {
        s.kill9();
    }
    let killed_at = Instant::now();
    let held: Vec<String> = held_at_kill
        .into_iter()
        .filter_map(|r| r.into_iter().next().flatten())
        .collect();
    ids.extend(start_all(&rt, &[urls[0].clone(), urls[2].clone()], later));
    assert_eq!(ids.len(), N);

    // Every execution ends, each once, with the outcome its input asks.
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let open = sql(
            &rt,
            &url,
            "SELECT count(*) FROM sagatx_executions WHERE status NOT IN ('completed', 'compensated', 'failed')",
        );
        if open[0][0].as_deref() == Some("0") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{:?} executions never finished",
            open[0][0]
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let total = sql(
        &rt,
        &url,
        "SELECT count(*), count(DISTINCT id) FROM sagatx_executions",
    );
    assert_eq!(total[0][0].as_deref(), Some(N.to_string().as_str()));
    assert_eq!(total[0][1].as_deref(), Some(N.to_string().as_str()));
    let leased = sql(
        &rt,
        &url,
        "SELECT count(*) FROM sagatx_executions WHERE lease_owner IS NOT NULL",
    );
    assert_eq!(
        leased[0][0].as_deref(),
        Some("0"),
        "a terminal execution holds no lease"
    );
    let finals = fetch_all(&rt, &urls[0], &ids);
    for (i, id) in ids.iter().enumerate() {
        let want = if i % 5 == 0 {
            "compensated"
        } else {
            "completed"
        };
        assert_eq!(finals[id]["status"], json!(want), "{id}: {}", finals[id]);
    }
    let calls = svc.calls();
    let recalled = check_calls(&finals, &calls);

    // The killed server held work when it died, and the others took it
    // over within the lease time (plus a poll of the scheduler and some
    // slack for a loaded 2-core machine).
    assert!(
        held.len() >= 20,
        "the killed server held {} executions; the test did not test a takeover",
        held.len()
    );
    assert!(recalled > 0, "no call was interrupted by the kill");
    let mut slowest = Duration::ZERO;
    for id in &held {
        let first_after = calls
            .iter()
            .filter(|c| &c.execution == id && c.at > killed_at)
            .map(|c| c.at - killed_at)
            .min();
        if let Some(t) = first_after {
            slowest = slowest.max(t);
        }
    }
    let bound = Duration::from_millis(LEASE_MS) + Duration::from_secs(1) + Duration::from_secs(5);
    assert!(
        slowest <= bound,
        "the killed server's executions were taken over after {slowest:?} (bound {bound:?})"
    );
    eprintln!(
        "{N} executions on 3 servers; {} held by the killed one, taken over within {slowest:?}; {recalled} calls made again",
        held.len()
    );
}

/// A server on a file, its stderr kept for the test to read.
fn serve_logged(dir: &Path, port: u16, store: &str, log: &Path) -> Child {
    crate::serve_logged(dir, port, store, &["--lease-ms", "1000"], "warn", log)
}

fn signal(child: &Child, sig: &str) {
    let ok = std::process::Command::new("kill")
        .args([sig, &child.id().to_string()])
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(ok, "kill {sig}");
}

#[test]
fn a_server_paused_past_its_lease_cannot_write_to_what_it_lost() {
    let url = fresh_db("fence");
    let rt = runtime();
    let dir = tempfile::tempdir().expect("tempdir");
    // Every call takes 1.5 s: A's first call is in flight when A stops.
    let svc = Services::start(1500);
    let (pa, pb) = (free_port(), free_port());
    let log_a = dir.path().join("a.log");
    let mut a = serve_logged(dir.path(), pa, &url, &log_a);
    let b = Server::start_with(dir.path(), pb, &url, &["--lease-ms", "1000"]);
    let def = definition(&svc, dir.path());
    let id = start_all(
        &rt,
        &[format!("http://127.0.0.1:{pa}")],
        vec![json!({"saga": def, "input": {"order_id": 1}})],
    )
    .remove(0);
    let deadline = Instant::now() + Duration::from_secs(20);
    while svc.calls().is_empty() {
        assert!(Instant::now() < deadline, "A made no call");
        std::thread::sleep(Duration::from_millis(2));
    }
    signal(&a, "-STOP");
    // B takes the execution over once A's lease ran out: it calls the
    // interrupted step again.
    let deadline = Instant::now() + Duration::from_secs(20);
    while !svc
        .calls()
        .iter()
        .any(|c| c.op == "reserve" && c.attempt == 2)
    {
        assert!(
            Instant::now() < deadline,
            "B did not take the execution over"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    // A wakes up with the answer of its call waiting: its write is refused.
    signal(&a, "-CONT");
    let deadline = Instant::now() + Duration::from_secs(30);
    let ex = loop {
        let ex = crate::get(&format!("{}/v1/executions/{id}", b.url));
        if ex["status"] == json!("completed") {
            break ex;
        }
        assert!(Instant::now() < deadline, "never completed: {ex}");
        std::thread::sleep(Duration::from_millis(50));
    };
    // The journal has B's result of the step, not A's.
    assert_eq!(ex["steps"][0]["result"]["attempt"], json!(2), "{ex}");
    let finals = HashMap::from([(id.clone(), ex.clone())]);
    check_calls(&finals, &svc.calls());
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let log = std::fs::read_to_string(&log_a).unwrap_or_default();
        if log.contains("another process took this execution over") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "A never found out it lost the execution: {log}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // Nothing A did after waking changed the journal.
    let seq = sql(
        &rt,
        &url,
        &format!("SELECT seq FROM sagatx_executions WHERE id = '{id}'"),
    );
    std::thread::sleep(Duration::from_millis(500));
    let again = sql(
        &rt,
        &url,
        &format!("SELECT seq FROM sagatx_executions WHERE id = '{id}'"),
    );
    assert_eq!(seq, again);
    let _ = a.kill();
    let _ = a.wait();
}

#[test]
fn a_cancel_sent_to_another_server_reaches_the_one_that_drives_it() {
    let url = fresh_db("forward");
    let rt = runtime();
    let dir = tempfile::tempdir().expect("tempdir");
    // Slow calls: the execution is busy on A when the cancel reaches B.
    let svc = Services::start(700);
    let a = Server::start_on(dir.path(), free_port(), &url);
    let b = Server::start_on(dir.path(), free_port(), &url);
    let def = definition(&svc, dir.path());
    let id = start_all(
        &rt,
        std::slice::from_ref(&a.url),
        vec![json!({"saga": def, "input": {"order_id": 1}})],
    )
    .remove(0);
    let deadline = Instant::now() + Duration::from_secs(20);
    while svc.calls().is_empty() {
        assert!(Instant::now() < deadline, "A made no call");
        std::thread::sleep(Duration::from_millis(2));
    }
    let started = Instant::now();
    let cancelled: Value = rt.block_on(async {
        reqwest::Client::new()
            .post(format!("{}/v1/executions/{id}/cancel", b.url))
            .send()
            .await
            .expect("cancel")
            .json()
            .await
            .expect("json")
    });
    assert!(
        ["compensating", "compensated"].contains(&cancelled["status"].as_str().unwrap_or("")),
        "{cancelled}"
    );
    // Handed over while the step ran, not after the whole saga.
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "the cancel took {:?}",
        started.elapsed()
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let ex = crate::get(&format!("{}/v1/executions/{id}", b.url));
        if ex["status"] == json!("compensated") {
            assert!(
                !svc.calls().iter().any(|c| c.op == "ship"),
                "a cancelled saga went on"
            );
            break;
        }
        assert!(Instant::now() < deadline, "never compensated: {ex}");
        std::thread::sleep(Duration::from_millis(50));
    }
    // A command that does not apply is refused the same way from afar.
    let again = rt.block_on(async {
        reqwest::Client::new()
            .post(format!("{}/v1/executions/{id}/cancel", b.url))
            .send()
            .await
            .expect("cancel")
            .status()
    });
    assert_eq!(again.as_u16(), 409);
    // A migration from a database that servers use is refused.
    let out = crate::run(
        &["migrate", "--from", &url, "--to", "sqlite://copy.db"],
        dir.path(),
    );
    assert_eq!(out.status.code(), Some(2), "{}", crate::text(&out));
    assert!(
        crate::text(&out).contains("other sagatx process"),
        "{}",
        crate::text(&out)
    );
}
