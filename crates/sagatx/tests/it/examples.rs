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
