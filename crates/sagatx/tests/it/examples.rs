//! The examples run as a user runs them: real processes, a SQLite file in
//! the working directory.

use std::path::PathBuf;
use std::process::Command;

fn example(name: &str) -> PathBuf {
    // tests live in target/<profile>/deps; `cargo test` builds examples
    // into target/<profile>/examples.
    let exe = std::env::current_exe().expect("current exe");
    let dir = exe
        .parent()
        .and_then(|p| p.parent())
        .expect("target directory")
        .join("examples");
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: build the examples first (cargo build --examples)",
        path.display()
    );
    path
}

#[test]
fn shop_completes_then_compensates_a_failed_shipping() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ok = Command::new(example("shop"))
        .current_dir(dir.path())
        .output()
        .expect("run shop");
    let out = String::from_utf8_lossy(&ok.stdout);
    assert!(ok.status.success(), "{out}");
    assert!(out.contains("is completed"), "{out}");
    let failed = Command::new(example("shop"))
        .arg("--fail-shipping")
        .current_dir(dir.path())
        .output()
        .expect("run shop");
    let out = String::from_utf8_lossy(&failed.stdout);
    assert_eq!(failed.status.code(), Some(1), "{out}");
    assert!(out.contains("sold_out -> in_stock (compensation)"), "{out}");
    assert!(out.contains("is compensated"), "{out}");
    assert!(
        out.contains("holds 2 execution(s)"),
        "both runs are in the journal: {out}"
    );
    assert!(dir.path().join("sagatx.db").exists());
}

#[test]
fn remote_step_resumes_in_another_process() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = Command::new(example("remote_step"))
        .arg("demo")
        .current_dir(dir.path())
        .output()
        .expect("run remote_step");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("is paused awaiting Some(Reply)"), "{text}");
    assert!(
        text.contains("confirm-order: paid with {\"payment\":\"p-9\"}"),
        "{text}"
    );
    assert!(text.trim_end().ends_with("is completed"), "{text}");
}

fn run_example(name: &str, args: &[&str], dir: &std::path::Path) -> String {
    let out = Command::new(example(name))
        .args(args)
        .current_dir(dir)
        .output()
        .expect("run example");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{name}: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    text
}

#[test]
fn tx_loop_web_retries_a_conflict_and_aborts_reads() {
    let dir = tempfile::tempdir().expect("tempdir");
    let text = run_example("tx_loop_web", &[], dir.path());
    assert!(
        text.contains("POST /add/5: attempt 2 after a conflict"),
        "{text}"
    );
    assert!(text.contains("POST /add/2 -> counter = 7"), "{text}");
    assert!(
        text.contains("GET /counter: aborted (read only, nothing to commit)"),
        "{text}"
    );
}

#[test]
fn oplog_recover_reruns_what_the_crash_interrupted() {
    let dir = tempfile::tempdir().expect("tempdir");
    let text = run_example("oplog_recover", &["demo"], dir.path());
    assert!(
        text.contains("the process dies with three operations under way"),
        "{text}"
    );
    assert!(
        text.contains("recovered: 3 operation(s) run again; unknown: []"),
        "{text}"
    );
}

#[test]
fn barrier_participant_is_safe_against_duplicates_and_reordering() {
    let dir = tempfile::tempdir().expect("tempdir");
    let text = run_example("barrier_participant", &[], dir.path());
    let outcomes: Vec<&str> = text
        .lines()
        .map(|l| l.split(" -> ").nth(1).unwrap_or(""))
        .collect();
    assert_eq!(
        outcomes,
        [
            "reserve: done, stock 9",
            "reserve: skipped (Duplicate), stock 9",
            "release: done, stock 10",
            "release: skipped (NullCompensation), stock 10",
            "reserve: skipped (Hanging), stock 10",
        ],
        "{text}"
    );
}

#[cfg(feature = "postgres")]
#[test]
fn orders_inventory_commits_with_with_transaction() {
    let dir = tempfile::tempdir().expect("tempdir");
    let base = std::env::var("SAGATX_TEST_PG_URL")
        .expect("SAGATX_TEST_PG_URL is not set: run the tests with scripts/test");
    let out = Command::new(example("orders_inventory"))
        .env("SAGATX_PG_URL", &base)
        .current_dir(dir.path())
        .output()
        .expect("run");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("committed; inventory of abc123 is now"),
        "{text}"
    );
}
