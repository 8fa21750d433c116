//! `run` exit codes, `list`, `show`, `graph`, actions and errors.

use crate::{free_port, run, text, Server, Services};

#[test]
fn graph_prints_the_quickstart_as_mermaid() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = run(
        &[
            "graph",
            concat!(env!("CARGO_MANIFEST_DIR"), "/../../examples/order.json"),
        ],
        dir.path(),
    );
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "flowchart LR\n  start((\"order\"))\n  done((\"done\"))\n  s0[\"reserve\"]\n  s1[\"charge\"]\n  \
         s2[\"ship\"]\n  start --> s0\n  s0 --> s1\n  s1 --> s2\n  s2 --> done\n  \
         s0_undo[\"undo reserve\"]\n  s0 -. compensation .-> s0_undo\n  \
         s1_undo[\"undo charge\"]\n  s1 -. compensation .-> s1_undo\n"
    );
    let bad = dir.path().join("bad.json");
    std::fs::write(&bad, r#"{"name": "x", "steps": [{"name": "a"}]}"#).expect("write");
    let out = run(&["graph", bad.to_str().expect("path")], dir.path());
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out).contains("is not a valid saga definition: steps[0]"),
        "{}",
        text(&out)
    );
}

#[test]
fn run_list_show_and_actions_against_a_real_server() {
    let dir = tempfile::tempdir().expect("tempdir");
    let svc = Services::start(0);
    let server = Server::start(dir.path(), free_port());
    let order = svc.order_json(dir.path());
    let order = order.to_str().expect("path");

    let ok = run(
        &[
            "run",
            order,
            "--input",
            r#"{"order_id": 7}"#,
            "--server",
            &server.url,
        ],
        dir.path(),
    );
    let out = text(&ok);
    assert_eq!(ok.status.code(), Some(0), "{out}");
    assert!(out.contains("ship                 succeeded"), "{out}");
    assert!(out.trim_end().ends_with("is completed"), "{out}");

    let failed = run(
        &[
            "run",
            order,
            "--input",
            r#"{"order_id": 8, "card": "declined"}"#,
            "--server",
            &server.url,
        ],
        dir.path(),
    );
    let out = text(&failed);
    assert_eq!(failed.status.code(), Some(1), "{out}");
    assert!(
        out.contains("is compensated: HTTP 402: card declined (step charge)"),
        "{out}"
    );
    let failed_id = out
        .lines()
        .find_map(|l| l.strip_prefix("execution "))
        .and_then(|l| l.split(' ').next())
        .expect("id")
        .to_string();

    let list = run(&["list", "--server", &server.url], dir.path());
    let out = text(&list);
    assert!(list.status.success(), "{out}");
    assert!(out.contains(&failed_id), "full ids: {out}");
    assert_eq!(out.matches("order ┆ 1").count(), 2, "{out}");
    let only = run(
        &["list", "--status", "compensated", "--server", &server.url],
        dir.path(),
    );
    assert_eq!(
        text(&only).matches("compensated").count(),
        1,
        "{}",
        text(&only)
    );

    let show = run(&["show", &failed_id, "--server", &server.url], dir.path());
    let out = text(&show);
    assert!(show.status.success(), "{out}");
    assert!(out.contains("status    compensated"), "{out}");
    assert!(out.contains("reserve ┆ compensated"), "{out}");
    assert!(out.contains("HTTP 402: card declined"), "{out}");

    let cancel = run(&["cancel", &failed_id, "--server", &server.url], dir.path());
    assert_eq!(cancel.status.code(), Some(2));
    assert!(
        text(&cancel).contains("already compensated (HTTP 409"),
        "{}",
        text(&cancel)
    );
    let missing = run(
        &[
            "show",
            "0193c7e2-0000-7000-8000-000000000000",
            "--server",
            &server.url,
        ],
        dir.path(),
    );
    assert_eq!(missing.status.code(), Some(2));
    assert!(text(&missing).contains("HTTP 404"), "{}", text(&missing));
    assert!(
        dir.path().join("sagatx.db").exists(),
        "serve's default store is ./sagatx.db"
    );
}

#[test]
fn errors_say_what_to_do() {
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let out = run(
        &["list", "--server", &format!("http://127.0.0.1:{port}")],
        dir.path(),
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out).contains("start it with `sagatx serve`"),
        "{}",
        text(&out)
    );

    let out = run(&["serve", "--store", "mysql://x"], dir.path());
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out).contains("use sqlite://PATH"), "{}", text(&out));

    std::fs::write(
        dir.path().join("notes.db"),
        "not a database at all, just notes ".repeat(100),
    )
    .expect("write");
    let out = run(&["serve", "--store", "sqlite://notes.db"], dir.path());
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out).contains("is not a sagatx journal"),
        "{}",
        text(&out)
    );

    let out = run(&["run", "missing.json"], dir.path());
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out).contains("cannot read missing.json"),
        "{}",
        text(&out)
    );

    let out = run(&["run", "x.json", "--input", "{nope"], dir.path());
    assert_eq!(out.status.code(), Some(2));

    // A port in use, and an address that cannot be one, each told apart.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let at = taken.local_addr().expect("addr").to_string();
    let out = run(
        &["serve", "--listen", &at, "--store", "sqlite://taken.db"],
        dir.path(),
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out).contains("is another server running there?"),
        "{}",
        text(&out)
    );
    let out = run(
        &[
            "serve",
            "--listen",
            "127.0.0.1:99999",
            "--store",
            "sqlite://port.db",
        ],
        dir.path(),
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out).contains("a port from 1 to 65535") && !text(&out).contains("another server"),
        "{}",
        text(&out)
    );
}

#[test]
fn serve_stops_cleanly_on_sigterm() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut server = Server::start(dir.path(), free_port());
    let pid = server.child.id().to_string();
    let status = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("kill");
    assert!(status.success());
    let code = server.child.wait().expect("wait");
    assert_eq!(code.code(), Some(0), "a clean stop");
}

#[test]
fn bench_runs_at_a_tiny_size_and_prints_well_formed_json() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = run(&["bench", "--quick", "--json"], dir.path());
    assert!(out.status.success(), "{}", text(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("the output is JSON");
    assert_eq!(v["quick"], true);
    // The machine's own speed, measured in the same run.
    let m = &v["machine"];
    assert_eq!(m["fsyncs"], 20, "{m}");
    for k in [
        "cpus",
        "fsync_p50_us",
        "fsync_p90_us",
        "fsync_p99_us",
        "cpu_probe_ns",
    ] {
        assert!(m[k].as_f64().is_some_and(|x| x > 0.0), "{k} in {m}");
    }
    assert!(
        m["fsync_p50_us"].as_f64() <= m["fsync_p90_us"].as_f64()
            && m["fsync_p90_us"].as_f64() <= m["fsync_p99_us"].as_f64(),
        "percentiles in order: {m}"
    );
    let rows = v["rows"].as_array().expect("rows");
    let workloads: std::collections::BTreeSet<&str> =
        rows.iter().filter_map(|r| r["workload"].as_str()).collect();
    assert_eq!(
        workloads.into_iter().collect::<Vec<_>>(),
        ["http", "idle", "memory", "recovery", "sqlite", "tx"]
    );
    for r in rows {
        for k in [
            "variant",
            "concurrency",
            "sagas",
            "seconds",
            "sagas_per_second",
            "p50_us",
            "p99_us",
            "cpu_seconds_per_1000",
            "peak_rss_mib",
        ] {
            assert!(!r[k].is_null(), "{k} missing in {r}");
        }
        assert!(r["sagas"].as_u64().unwrap_or(0) > 0, "{r}");
    }
    // The sqlite rows say how many commits a saga their callers made: at
    // concurrency 1 nearly all (a 3-step saga is four writes), the store's
    // low-load path; none on a machine of one CPU (a runtime of one worker
    // leaves every write to the writer thread).
    let callers = |c: u64| -> f64 {
        let r = rows
            .iter()
            .find(|r| r["workload"] == "sqlite" && r["concurrency"] == c)
            .unwrap_or_else(|| panic!("no sqlite row at concurrency {c}"));
        let note = r["note"].as_str().unwrap_or("");
        note.split("; ")
            .find_map(|p| p.strip_suffix(" commits a saga made by their callers"))
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no count of callers' commits in {note:?}"))
    };
    // The rows at concurrency 1 count their p50 in fsyncs of the probe
    // (its p50), and only they.
    let fsync_p50 = m["fsync_p50_us"].as_f64().unwrap_or(0.0);
    for r in rows.iter().filter(|r| r["workload"] == "sqlite") {
        let note = r["note"].as_str().unwrap_or("");
        let fsyncs = note
            .split("; ")
            .find_map(|p| p.strip_prefix("p50 "))
            .and_then(|p| p.strip_suffix(" fsyncs of the machine's probe"))
            .map(|n| n.parse::<f64>().unwrap_or(f64::NAN));
        if r["concurrency"] == 1 {
            let want = r["p50_us"].as_f64().unwrap_or(0.0) / fsync_p50;
            let got = fsyncs.unwrap_or_else(|| panic!("no count of fsyncs in {note:?}"));
            assert!((got - want).abs() <= 0.051, "{got} vs {want} in {r}");
        } else {
            assert_eq!(fsyncs, None, "{r}");
        }
    }
    if m["cpus"].as_u64().unwrap_or(0) >= 2 {
        assert!(callers(1) > 3.0, "{}", callers(1));
    } else {
        assert_eq!(callers(1), 0.0);
    }
    // And the writer thread's share of the process's CPU, a percentage.
    for r in rows.iter().filter(|r| r["workload"] == "sqlite") {
        let note = r["note"].as_str().unwrap_or("");
        let share: f64 = note
            .split("; ")
            .find_map(|p| p.strip_prefix("writer thread "))
            .and_then(|p| p.strip_suffix(" % of the CPU"))
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no writer thread's share in {note:?}"));
        assert!((0.0..=100.0).contains(&share), "{note}");
    }
    // A name it does not know fails before anything runs (memory first
    // would otherwise run in full).
    let out = run(&["bench", "--workload", "memory,nope"], dir.path());
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out).contains("no workload \"nope\"") && !text(&out).contains("machine:"),
        "{}",
        text(&out)
    );
}

/// `--concurrency` keeps the rows at those concurrencies in the workloads
/// that have several, and runs the others as they are; one that no chosen
/// workload has is an error before anything runs.
#[test]
fn bench_runs_only_the_concurrencies_asked_for() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = run(
        &[
            "bench",
            "--quick",
            "--json",
            "--workload",
            "memory,sqlite,tx",
            "--concurrency",
            "64,1024",
        ],
        dir.path(),
    );
    assert!(out.status.success(), "{}", text(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("the output is JSON");
    let rows = v["rows"].as_array().expect("rows");
    let seen = |w: &str| -> std::collections::BTreeSet<u64> {
        rows.iter()
            .filter(|r| r["workload"] == w)
            .filter_map(|r| r["concurrency"].as_u64())
            .collect()
    };
    assert_eq!(seen("memory").into_iter().collect::<Vec<_>>(), [64]);
    assert_eq!(seen("sqlite").into_iter().collect::<Vec<_>>(), [64, 1024]);
    // Both sagas of each, at each concurrency kept.
    assert_eq!(rows.iter().filter(|r| r["workload"] == "sqlite").count(), 4);
    // tx runs in one task, whatever the concurrencies: its four rows
    // (join_sync 1 and 3, join 1, the loop).
    assert_eq!(rows.iter().filter(|r| r["workload"] == "tx").count(), 4);

    // A workload without a row at the concurrency asked for gives none.
    let out = run(
        &[
            "bench",
            "--quick",
            "--json",
            "--workload",
            "memory,sqlite",
            "--concurrency",
            "1024",
        ],
        dir.path(),
    );
    assert!(out.status.success(), "{}", text(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("the output is JSON");
    let rows: Vec<(String, u64)> = v["rows"]
        .as_array()
        .expect("rows")
        .iter()
        .map(|r| {
            (
                r["workload"].as_str().unwrap_or("").to_owned(),
                r["concurrency"].as_u64().unwrap_or(0),
            )
        })
        .collect();
    assert_eq!(
        rows,
        [("sqlite".to_owned(), 1024), ("sqlite".to_owned(), 1024)]
    );

    let out = run(
        &["bench", "--workload", "memory,tx", "--concurrency", "1024"],
        dir.path(),
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out).contains("no row of the chosen workloads runs at concurrency 1024")
            && !text(&out).contains("machine:"),
        "{}",
        text(&out)
    );
}

/// The Python peers run in the same `sagatx bench` run (a pinned
/// virtualenv, made under target/ on first use), and the side-by-side table
/// pairs each with the sagatx figure of the same workload.
#[test]
fn bench_runs_the_python_peers_side_by_side() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = run(
        &["bench", "--quick", "--json", "--workload", "tx,peers"],
        dir.path(),
    );
    assert!(out.status.success(), "{}", text(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("the output is JSON");
    let peers: Vec<&serde_json::Value> = v["rows"]
        .as_array()
        .expect("rows")
        .iter()
        .filter(|r| r["workload"] == "peers")
        .collect();
    let names: Vec<&str> = peers.iter().filter_map(|r| r["variant"].as_str()).collect();
    for want in [
        "py-api-saga 0.0.3: memory: 3 steps, sequential",
        "py-api-saga 0.0.3: memory: 3rd rejected, 2 compensations",
        "minos-microservice-saga 0.7.0: memory: 3 steps, sequential",
        "transaction 5.1: tx: begin, join 1, commit",
        "nti.transactions 5.2: tx: TransactionLoop, join 1",
    ] {
        assert!(names.contains(&want), "{want} missing from {names:?}");
    }
    for r in peers {
        assert!(r["sagas_per_second"].as_f64().unwrap_or(0.0) > 0.0, "{r}");
    }
    // The two targets stated as ratios, measured again in rounds that
    // alternate sagatx and the peer: sagatx's row, then the peer's.
    let paired: Vec<&serde_json::Value> = v["rows"]
        .as_array()
        .expect("rows")
        .iter()
        .filter(|r| r["workload"] == "paired")
        .collect();
    let names: Vec<&str> = paired
        .iter()
        .filter_map(|r| r["variant"].as_str())
        .collect();
    assert_eq!(
        names,
        [
            "Saga::execute, 3 steps, sequential",
            "py-api-saga 0.0.3: memory: 3 steps, sequential",
            "tx: begin, join 1, commit",
            "transaction 5.1: tx: begin, join 1, commit",
        ]
    );
    for r in &paired {
        let (per_s, us) = (
            r["sagas_per_second"].as_f64().unwrap_or(0.0),
            r["p50_us"].as_f64().unwrap_or(0.0),
        );
        assert!(per_s > 0.0 && (us * per_s / 1e6 - 1.0).abs() < 1e-9, "{r}");
        let note = r["note"].as_str().unwrap_or("");
        assert!(
            note.contains("alternated with") && note.contains("x median"),
            "{r}"
        );
    }
    let table = run(&["bench", "--quick", "--workload", "tx,peers"], dir.path());
    assert!(table.status.success(), "{}", text(&table));
    let t = text(&table);
    assert!(t.contains("Side by side, measured in this run"), "{t}");
    assert!(
        t.contains("transaction 5.1: tx: begin, join 1, commit"),
        "{t}"
    );
    assert!(
        t.contains("py-api-saga 0.0.3: memory: 3 steps, sequential (alternated rounds, medians)"),
        "{t}"
    );
}

/// The `postgres` workload at a tiny size: in-process, one coordinator and
/// three on one database, each on a database of its own that the run
/// drops afterwards (a full run writes over a gigabyte).
#[test]
fn bench_runs_on_postgresql_and_drops_its_databases() {
    let base = std::env::var("SAGATX_TEST_PG_URL")
        .expect("SAGATX_TEST_PG_URL is not set: run the tests with scripts/test");
    let bench_dbs = || {
        let out = std::process::Command::new("psql")
            .args([
                base.as_str(),
                "-At",
                "-c",
                "SELECT datname FROM pg_database WHERE datname LIKE 'sagatx_bench_%'",
            ])
            .output()
            .expect("psql (installed with PostgreSQL by scripts/test)");
        assert!(out.status.success(), "{}", text(&out));
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_string)
            .collect::<std::collections::BTreeSet<_>>()
    };
    let before = bench_dbs();
    let dir = tempfile::tempdir().expect("tempdir");
    let out = crate::sagatx()
        .args(["bench", "--quick", "--json", "--workload", "postgres"])
        .current_dir(dir.path())
        .env("SAGATX_BENCH_PG_URL", &base)
        .output()
        .expect("run sagatx");
    assert!(out.status.success(), "{}", text(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("the output is JSON");
    let rows = v["rows"].as_array().expect("rows");
    let workloads: std::collections::BTreeSet<&str> =
        rows.iter().filter_map(|r| r["workload"].as_str()).collect();
    assert_eq!(
        workloads.into_iter().collect::<Vec<_>>(),
        ["postgres", "postgres-http", "postgres-http-3"]
    );
    for r in rows {
        assert!(r["sagas_per_second"].as_f64().unwrap_or(0.0) > 0.0, "{r}");
    }
    let left: Vec<String> = bench_dbs().difference(&before).cloned().collect();
    assert!(left.is_empty(), "the run left databases behind: {left:?}");
}

#[test]
fn serve_runs_sagas_on_postgresql() {
    let url = crate::shared::fresh_db("cli");
    let dir = tempfile::tempdir().expect("tempdir");
    let svc = Services::start(0);
    let server = Server::start_on(dir.path(), free_port(), &url);
    let order = svc.order_json(dir.path());
    let ok = run(
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
    assert_eq!(ok.status.code(), Some(0), "{}", text(&ok));
    assert!(
        !dir.path().join("sagatx.db").exists(),
        "nothing written to SQLite"
    );
}

#[test]
fn migrate_copies_a_journal_and_refuses_while_a_server_runs_on_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let svc = Services::start(0);
    let server = Server::start(dir.path(), free_port());
    let order = svc.order_json(dir.path());
    let ok = run(
        &[
            "run",
            order.to_str().expect("path"),
            "--input",
            "{}",
            "--server",
            &server.url,
        ],
        dir.path(),
    );
    assert_eq!(ok.status.code(), Some(0), "{}", text(&ok));
    // The server holds the journal: migrating from it is refused.
    let busy = run(
        &[
            "migrate",
            "--from",
            "sqlite://sagatx.db",
            "--to",
            "sqlite://copy.db",
        ],
        dir.path(),
    );
    assert_eq!(busy.status.code(), Some(2), "{}", text(&busy));
    assert!(
        text(&busy).contains("another sagatx process"),
        "{}",
        text(&busy)
    );
    drop(server);
    let done = run(
        &[
            "migrate",
            "--from",
            "sqlite://sagatx.db",
            "--to",
            "sqlite://copy.db",
        ],
        dir.path(),
    );
    assert!(done.status.success(), "{}", text(&done));
    assert!(
        text(&done).contains("copied and verified 1 definition versions, 1 executions"),
        "{}",
        text(&done)
    );
    let again = run(
        &[
            "migrate",
            "--from",
            "sqlite://sagatx.db",
            "--to",
            "sqlite://copy.db",
        ],
        dir.path(),
    );
    assert_eq!(again.status.code(), Some(2));
    assert!(
        text(&again).contains("already holds sagatx data"),
        "{}",
        text(&again)
    );
}

/// The dashboard in headless Chromium (playwright-core, e2e/dashboard.mjs):
/// the list with several statuses, the status filter, an execution page
/// with its steps and diagram, and the cancel button. Saves screenshots in
/// docs/screenshots.
#[test]
fn dashboard_in_chromium() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let script = root.join("e2e/dashboard.mjs");
    assert!(
        root.join("e2e/node_modules/playwright-core").exists(),
        "e2e/node_modules is missing: run scripts/test, which installs playwright-core and Chromium"
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let svc = Services::start(0);
    let server = Server::start(dir.path(), free_port());
    let order = svc.order_json(dir.path());
    let order = order.to_str().expect("path");
    for input in [
        r#"{"order_id": 1}"#,
        r#"{"order_id": 2, "card": "declined"}"#,
    ] {
        run(
            &["run", order, "--input", input, "--server", &server.url],
            dir.path(),
        );
    }
    let callback = dir.path().join("remote.json");
    std::fs::write(
        &callback,
        format!(
            r#"{{"name": "remote", "steps": [
                {{"name": "reserve", "action": {{"url": "{b}/reserve"}}, "compensation": {{"url": "{b}/release"}}}},
                {{"name": "ship", "action": {{"url": "{b}/ship"}}, "reply": "callback"}}]}}"#,
            b = svc.base
        ),
    )
    .expect("write");
    let out = run(
        &[
            "run",
            callback.to_str().expect("path"),
            "--server",
            &server.url,
        ],
        dir.path(),
    );
    let paused = text(&out)
        .lines()
        .find_map(|l| l.strip_prefix("execution "))
        .and_then(|l| l.split(' ').next())
        .expect("the paused execution's id")
        .to_string();
    let shots = root.join("docs/screenshots");
    let e2e = std::process::Command::new("node")
        .arg(&script)
        .env("SAGATX_URL", &server.url)
        .env("SAGATX_PAUSED", &paused)
        .env("SAGATX_SHOTS", &shots)
        .output()
        .expect("node (installed with the machine; scripts/test needs it)");
    let log = format!(
        "{}{}",
        String::from_utf8_lossy(&e2e.stdout),
        String::from_utf8_lossy(&e2e.stderr)
    );
    assert!(e2e.status.success(), "{log}");
    assert!(log.contains("ok: the cancel button cancels"), "{log}");
    let ex = crate::get(&format!("{}/v1/executions/{paused}", server.url));
    assert!(
        matches!(ex["status"].as_str(), Some("compensating" | "compensated")),
        "cancelled from the page: {ex}"
    );
    assert_eq!(ex["error"]["message"], "cancelled");
}

#[test]
fn serve_logs_json_lines_when_asked() {
    use std::io::BufRead;
    let dir = tempfile::tempdir().expect("tempdir");
    let mut child = crate::sagatx()
        .args([
            "serve",
            "--listen",
            &format!("127.0.0.1:{}", free_port()),
            "--log-format",
            "json",
        ])
        .current_dir(dir.path())
        .env("SAGATX_LOG", "info")
        .stderr(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("spawn");
    let stderr = child.stderr.take().expect("stderr");
    let mut json_lines = 0;
    for line in std::io::BufReader::new(stderr).lines().take(5) {
        let line = line.expect("line");
        if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) {
            assert!(
                v["level"].is_string() && v["fields"]["message"].is_string(),
                "{line}"
            );
            json_lines += 1;
            if json_lines == 2 {
                break;
            }
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(json_lines, 2, "the log lines are JSON");
}

/// `--sqlite-caller-commits off` keeps every commit on the writer thread;
/// by default a lone write (one saga at a time) is committed by its
/// caller. The commits' histogram says which, by its `by` label.
#[test]
fn serve_commits_on_the_writer_thread_when_asked() {
    let commits = |metrics: &str, by: &str| -> u64 {
        let line = format!("sagatx_store_commit_seconds_count{{by=\"{by}\"}} ");
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(line.as_str()))
            .map_or(0, |n| n.trim().parse().unwrap_or(0))
    };
    let svc = Services::start(0);
    for (flag, caller_commits) in [("off", false), ("on", true)] {
        let dir = tempfile::tempdir().expect("tempdir");
        let server = Server::start_with(
            dir.path(),
            free_port(),
            "sqlite://sagatx.db",
            &["--sqlite-caller-commits", flag],
        );
        let order = svc.order_json(dir.path());
        for i in 0..3 {
            let ok = run(
                &[
                    "run",
                    order.to_str().expect("path"),
                    "--input",
                    &format!(r#"{{"order_id": {i}}}"#),
                    "--server",
                    &server.url,
                ],
                dir.path(),
            );
            assert_eq!(ok.status.code(), Some(0), "{}", text(&ok));
        }
        let metrics = crate::get_text(&format!("{}/metrics", server.url));
        let (caller, writer) = (commits(&metrics, "caller"), commits(&metrics, "writer"));
        if caller_commits {
            assert!(
                caller > 0,
                "lone writes committed by their callers: {metrics}"
            );
        } else {
            assert_eq!(caller, 0, "every commit on the writer thread: {metrics}");
            assert!(writer > 0, "{metrics}");
        }
    }
}
