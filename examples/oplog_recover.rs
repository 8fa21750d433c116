//! grate.atomic: operations recorded before they run; a crash in the
//! middle; `recover_all` in the next process runs the interrupted ones
//! again through the handler registered under their name.
//!
//! ```sh
//! cargo run --example oplog_recover -- demo   # a process that crashes, then one that recovers
//! ```

use std::sync::Arc;
use std::time::Duration;

use sagatx::oplog::OperationLog;
use sagatx::SqliteStore;
use serde_json::json;

const DB: &str = "sagatx-oplog.db";

fn log() -> Result<OperationLog, Box<dyn std::error::Error>> {
    let log = OperationLog::new(Arc::new(SqliteStore::open(DB)?));
    // An idempotent operation: setting a thumbnail's size twice is harmless.
    log.register("make-thumbnail", |args| async move {
        println!("  making the thumbnail of image {}", args["image"]);
        tokio::time::sleep(Duration::from_millis(100)).await;
        Ok(json!({"thumbnail": format!("thumb-{}", args["image"])}))
    });
    Ok(log)
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    match std::env::args().nth(1).as_deref() {
        Some("crash") => {
            let log = log()?;
            let mut tasks = tokio::task::JoinSet::new();
            for image in 1..=3 {
                let log = log.clone();
                tasks.spawn(
                    async move { log.atomic("make-thumbnail", json!({"image": image})).await },
                );
            }
            tokio::time::sleep(Duration::from_millis(30)).await;
            println!("  the process dies with three operations under way");
            std::process::abort();
        }
        Some("recover") => {
            let report = log()?.recover_all().await?;
            println!(
                "recovered: {} operation(s) run again; unknown: {:?}",
                report.rerun, report.unknown
            );
        }
        Some("demo") => {
            let _ = std::fs::remove_file(DB);
            let exe = std::env::current_exe()?;
            println!("first process:");
            let _ = std::process::Command::new(&exe).arg("crash").status()?;
            println!("second process:");
            let status = std::process::Command::new(&exe).arg("recover").status()?;
            std::process::exit(status.code().unwrap_or(1));
        }
        _ => {
            eprintln!("usage: oplog_recover crash | recover | demo");
            std::process::exit(2);
        }
    }
    Ok(())
}
