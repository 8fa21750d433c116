//! minos' remote step: a step that sends a request and pauses until the
//! reply arrives, then resumes, even when the reply comes to another
//! process after a restart.
//!
//! ```sh
//! cargo run --example remote_step -- start              # pauses, prints the id
//! cargo run --example remote_step -- reply ID ok        # a new process resumes it
//! cargo run --example remote_step -- reply ID fail      # or: rejected, compensated
//! cargo run --example remote_step -- demo               # all of it, in two processes
//! ```

use std::time::Duration;

use sagatx::{Engine, ExecutionId, Reply, Saga, SqliteStore, StepContext, StepError};
use serde_json::json;

fn saga() -> Result<Saga, sagatx::core::DefinitionError> {
    Saga::builder("order-payment")
        .step("create-order", |ctx: StepContext| async move {
            println!("  create-order for {}", ctx.input()["customer"]);
            Ok::<_, StepError>(json!({"order": "o-1"}))
        })
        .compensate(|_ctx: StepContext| async move {
            println!("  create-order: order cancelled (compensation)");
            Ok::<_, StepError>(())
        })
        .step("ask-payment", |ctx: StepContext| async move {
            // The request goes out; the payment service answers later
            // through Engine::reply (in the coordinator: the reply URL).
            println!(
                "  ask-payment: request sent, waiting for the reply to execution {}",
                ctx.execution_id()
            );
            Ok::<_, StepError>(())
        })
        .callback()
        .timeout(Duration::from_secs(24 * 3600))
        .step("confirm-order", |ctx: StepContext| async move {
            println!(
                "  confirm-order: paid with {}",
                ctx.results()["ask-payment"]
            );
            Ok::<_, StepError>(json!({"confirmed": true}))
        })
        .build()
}

async fn engine() -> Result<Engine, Box<dyn std::error::Error>> {
    let engine = Engine::builder()
        .store(SqliteStore::open("sagatx-remote.db")?)
        .saga(saga()?)
        .build()
        .await?;
    engine.recover().await?;
    Ok(engine)
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .as_slice()
    {
        ["start"] => {
            let engine = engine().await?;
            let ex = engine
                .run("order-payment", json!({"customer": "ada"}))
                .await?;
            println!(
                "execution {} is {} awaiting {:?}",
                ex.id, ex.status, ex.awaiting
            );
            println!(
                "now, from any process: cargo run --example remote_step -- reply {} ok",
                ex.id
            );
        }
        ["reply", id, outcome] => {
            let id: ExecutionId = id
                .parse()
                .map_err(|e| format!("{id} is not an execution id: {e}"))?;
            let reply = match *outcome {
                "ok" => Reply::Ok(json!({"payment": "p-9"})),
                "fail" => Reply::Err("card declined".into()),
                other => return Err(format!("the reply is ok or fail, not {other}").into()),
            };
            let engine = engine().await?;
            engine.reply(id, "ask-payment", reply).await?;
            let ex = engine.wait(id).await?;
            println!("execution {} is {}", ex.id, ex.status);
            if let Some(e) = ex.saga_error() {
                println!("  failed at {:?}: {}", e.step, e.message);
            }
        }
        ["demo"] => {
            let exe = std::env::current_exe()?;
            let out = std::process::Command::new(&exe).arg("start").output()?;
            let text = String::from_utf8_lossy(&out.stdout).to_string();
            print!("{text}");
            let id = text
                .lines()
                .find_map(|l| l.strip_prefix("execution "))
                .and_then(|l| l.split(' ').next())
                .ok_or("the first process printed no execution id")?
                .to_string();
            println!("-- the first process has exited; a second one delivers the reply --");
            let status = std::process::Command::new(&exe)
                .args(["reply", &id, "ok"])
                .status()?;
            std::process::exit(status.code().unwrap_or(1));
        }
        _ => {
            eprintln!("usage: remote_step start | reply ID ok|fail | demo");
            std::process::exit(2);
        }
    }
    Ok(())
}
