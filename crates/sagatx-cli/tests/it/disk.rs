//! A full disk: `sagatx serve` on a real, small filesystem (a tmpfs of
//! 4 MiB) that fills up. Writes are refused with a message that says what
//! to do, the log does not repeat itself once per failed commit, nothing
//! half-written is left behind, and work goes on once there is space.
//!
//! Mounting needs root (CI and `scripts/test` here run as root); elsewhere
//! the test says it was skipped and returns.

use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::{free_port, Services};

/// A tmpfs mounted for the test, unmounted when dropped.
struct SmallDisk {
    path: PathBuf,
}

impl SmallDisk {
    fn mount(path: PathBuf, size: &str) -> Option<SmallDisk> {
        std::fs::create_dir_all(&path).ok()?;
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&path)
            .stderr(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        ok.then_some(SmallDisk { path })
    }

    /// Fills the disk to its last byte; the filler's path.
    fn fill(&self) -> PathBuf {
        use std::io::Write;
        let filler = self.path.join("filler");
        let mut f = std::fs::File::create(&filler).expect("create the filler");
        let chunk = vec![0u8; 4096];
        while f.write_all(&chunk).is_ok() {}
        for _ in 0..4096 {
            if f.write_all(&[0]).is_err() {
                break;
            }
        }
        filler
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.path)
            .status();
    }
}

fn serve(dir: &Path, port: u16, store: &str, log: &Path) -> Child {
    crate::serve_logged(dir, port, store, &[], "info", log)
}

/// A POST with a JSON body: the status and the answer.
fn post(rt: &tokio::runtime::Runtime, url: &str, body: &Value) -> (u16, Value) {
    rt.block_on(async {
        let r = reqwest::Client::new()
            .post(url)
            .json(body)
            .send()
            .await
            .expect("the server answers");
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    })
}

/// Every execution the server lists (at most 1,000 here), by id: status.
fn statuses(rt: &tokio::runtime::Runtime, base: &str) -> Vec<(String, String)> {
    rt.block_on(async {
        let v: Value = reqwest::get(format!("{base}/v1/executions?limit=1000"))
            .await
            .expect("list")
            .json()
            .await
            .expect("JSON");
        v["items"]
            .as_array()
            .expect("items")
            .iter()
            .map(|e| {
                (
                    e["id"].as_str().unwrap_or("").to_string(),
                    e["status"].as_str().unwrap_or("").to_string(),
                )
            })
            .collect()
    })
}

fn lines_with(log: &Path, what: &str) -> usize {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains(what))
        .count()
}

#[test]
fn a_full_disk_refuses_writes_clearly_and_loses_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let Some(disk) = SmallDisk::mount(dir.path().join("disk"), "4m") else {
        eprintln!("skipped: mounting a small filesystem needs root");
        return;
    };
    sagatx_server::install_crypto();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let svc = Services::start(0);
    let store = format!("sqlite://{}/j.db", disk.path.display());
    let log = dir.path().join("serve.log");
    let port = free_port();
    let base = format!("http://127.0.0.1:{port}");
    let mut server = serve(dir.path(), port, &store, &log);
    let order: Value = serde_json::from_str(
        &std::fs::read_to_string(svc.order_json(dir.path())).expect("order.json"),
    )
    .expect("order.json is JSON");
    let (s, v) = post(&rt, &format!("{base}/v1/sagas"), &order);
    assert!(s == 200 || s == 201, "{s} {v}");
    let start_waiting = |i: u64, wait: u32| {
        post(
            &rt,
            &format!("{base}/v1/executions?wait={wait}"),
            &json!({"saga": "order", "input": {"order_id": i}}),
        )
    };
    let start = |i: u64| start_waiting(i, 10);
    let (s, v) = start(0);
    assert_eq!((s, v["status"].as_str()), (201, Some("completed")), "{v}");
    let mut completed = 1;
    // Executions under way when the disk fills: each call takes a second,
    // so their outcomes come back to a full disk.
    let slow_svc = Services::start(1_000);
    std::fs::create_dir(dir.path().join("slow")).expect("dir");
    let mut slow: Value = serde_json::from_str(
        &std::fs::read_to_string(slow_svc.order_json(&dir.path().join("slow")))
            .expect("order.json"),
    )
    .expect("order.json is JSON");
    slow["name"] = json!("slow");
    let (s, v) = post(&rt, &format!("{base}/v1/sagas"), &slow);
    assert!(s == 200 || s == 201, "{s} {v}");
    let under_way: Vec<String> = (0..5)
        .map(|i| {
            let (s, v) = post(
                &rt,
                &format!("{base}/v1/executions"),
                &json!({"saga": "slow", "input": {"order_id": 100 + i}}),
            );
            assert_eq!(s, 201, "{v}");
            v["id"].as_str().expect("id").to_string()
        })
        .collect();
    completed += under_way.len();
    let slow_started = under_way.len();

    // Full: starts are refused, each with what to do, until space is freed.
    let filler = disk.fill();
    let full_at = Instant::now();
    let mut refused = 0;
    let mut i = 1;
    let mut under_way = under_way;
    while refused < 50 {
        assert!(i < 2_000, "2,000 starts on a full disk and not 50 refused");
        let (s, v) = start_waiting(i, 1);
        i += 1;
        if s == 201 {
            // A start the WAL could still take (it overwrites its pages in
            // place); its later writes may not fit: it goes on once there
            // is space, like those under way.
            under_way.push(v["id"].as_str().expect("id").to_string());
            completed += 1;
            continue;
        }
        assert_eq!(s, 503, "{v}");
        assert_eq!(v["error"]["code"], "store_unavailable", "{v}");
        let msg = v["error"]["message"].as_str().unwrap_or("");
        assert!(
            msg.contains(&format!(
                "the disk that holds {}/j.db is full",
                disk.path.display()
            )) && msg.contains("free space on it")
                && msg.contains("the request was not applied"),
            "{msg}"
        );
        refused += 1;
    }
    // One log line, not one per failed commit (one more per ten seconds
    // that the disk stayed full).
    let allowed = 1 + full_at.elapsed().as_secs() as usize / 10 + 1;
    let reports = lines_with(&log, "journal commit failed");
    assert!(
        (1..=allowed).contains(&reports),
        "{reports} log lines for {refused} refused starts"
    );

    // The calls under way take a second each, and the refusals above may
    // all come back sooner (a loaded machine or a fast one): the disk stays
    // full until an outcome of one of them has met it.
    let met_the_full_disk = |under_way: &[String]| {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains("journal write failed"))
            .filter(|l| under_way.iter().any(|id| l.contains(id.as_str())))
            .count()
    };
    let deadline = Instant::now() + Duration::from_secs(15);
    while met_the_full_disk(&under_way) == 0 {
        assert!(
            Instant::now() < deadline,
            "no outcome came back to the full disk within 15 s"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let allowed = 1 + full_at.elapsed().as_secs() as usize / 10 + 1;

    // Space again: work goes on, and the log says so.
    std::fs::remove_file(&filler).expect("remove the filler");
    let (s, v) = start(i);
    assert_eq!((s, v["status"].as_str()), (201, Some("completed")), "{v}");
    completed += 1;
    let again = lines_with(&log, "journal commits succeed again");
    assert!((1..=allowed).contains(&again), "{again} lines");
    // The executions under way end as if nothing happened: their outcomes
    // were kept and journaled once there was space, and no step was
    // called twice.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let listed = statuses(&rt, &base);
        let done = under_way
            .iter()
            .all(|id| listed.iter().any(|(i, s)| i == id && s == "completed"));
        if done {
            break;
        }
        assert!(Instant::now() < deadline, "not all completed: {listed:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
    for (n, id) in under_way.iter().enumerate() {
        let calls = if n < slow_started {
            slow_svc.calls()
        } else {
            svc.calls()
        };
        let ops: Vec<String> = calls
            .into_iter()
            .filter(|c| &c.execution == id)
            .map(|c| c.op)
            .collect();
        assert_eq!(ops, ["reserve", "charge", "ship"], "{id}");
    }

    // Nothing half-written: every execution the journal holds completed,
    // and exactly those the server said it started. The same after a
    // kill -9 and a restart on the same file.
    let listed = statuses(&rt, &base);
    assert_eq!(listed.len(), completed, "{listed:?}");
    assert!(listed.iter().all(|(_, s)| s == "completed"), "{listed:?}");
    let _ = server.kill();
    let _ = server.wait();
    let port = free_port();
    let base = format!("http://127.0.0.1:{port}");
    let mut server = serve(dir.path(), port, &store, &dir.path().join("serve2.log"));
    let mut again = statuses(&rt, &base);
    let mut before = listed;
    again.sort();
    before.sort();
    assert_eq!(again, before);
    let _ = server.kill();
    let _ = server.wait();
}

/// A disk already full when `sagatx serve` starts: it stops at once and
/// says why and what to do.
#[test]
fn serve_on_a_full_disk_says_to_free_space() {
    let dir = tempfile::tempdir().expect("tempdir");
    let Some(disk) = SmallDisk::mount(dir.path().join("disk"), "1m") else {
        eprintln!("skipped: mounting a small filesystem needs root");
        return;
    };
    disk.fill();
    let out = crate::run(
        &[
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--store",
            &format!("sqlite://{}/j.db", disk.path.display()),
        ],
        dir.path(),
    );
    assert_eq!(out.status.code(), Some(2), "{}", crate::text(&out));
    let text = crate::text(&out);
    assert!(text.contains("is full: free space on it"), "{text}");
}
