//! `sagatx`: the coordinator and its command line (API.md §7).
//!
//! Exit codes: 0 success; 1 `run` ended in a status other than `completed`;
//! 2 the command could not do its work (bad arguments, server unreachable,
//! an error from the server), with a message that says what to do.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use clap::{Parser, Subcommand};
use serde_json::{json, Value};

mod bench;
mod client;
mod graph;
#[cfg(feature = "otel")]
mod otel;
mod show;

use client::Client;

#[derive(Parser)]
#[command(
    name = "sagatx",
    version,
    about = "Sagas over HTTP: the sagatx coordinator and its client"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Args, Clone)]
struct Remote {
    /// The coordinator's address.
    #[arg(long, default_value = "http://127.0.0.1:7700", env = "SAGATX_SERVER")]
    server: String,
    /// Bearer token, when the server has one.
    #[arg(long, env = "SAGATX_TOKEN", hide_env_values = true)]
    token: Option<String>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the coordinator.
    Serve {
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:7700")]
        listen: String,
        /// sqlite://PATH (relative to the working directory),
        /// sqlite:///ABSOLUTE/PATH, or postgres://…
        #[arg(long, default_value = "sqlite://sagatx.db")]
        store: String,
        /// Require `Authorization: Bearer <token>` on every /v1 route.
        #[arg(long, env = "SAGATX_TOKEN", hide_env_values = true)]
        token: Option<String>,
        /// Where step services reach this server (for reply URLs); by
        /// default http:// and the listen address.
        #[arg(long)]
        public_url: Option<String>,
        /// POST a notification here when an execution becomes paused,
        /// failed, compensated or completed (repeatable).
        #[arg(long = "notify-url")]
        notify_url: Vec<String>,
        /// Which statuses are notified, comma-separated.
        #[arg(
            long,
            value_delimiter = ',',
            default_value = "paused,failed,compensated,completed"
        )]
        notify_on: Vec<String>,
        /// Logs as human-readable text or as JSON lines.
        #[arg(long, value_parser = ["text", "json"], default_value = "text")]
        log_format: String,
        /// PostgreSQL: how long this process's leases on executions last
        /// unless renewed, in milliseconds: the longest the work of a
        /// process that died waits for another to take it over.
        #[arg(long, env = "SAGATX_LEASE_MS", default_value_t = 10_000)]
        lease_ms: u64,
        /// SQLite: at low load a journal write is committed by the task
        /// that made it instead of handed to the writer thread (one fsync
        /// less of waiting on thread hand-offs). `off` keeps every commit
        /// on the writer thread, so that a stalled disk never holds up a
        /// runtime worker.
        #[arg(
            long,
            env = "SAGATX_SQLITE_CALLER_COMMITS",
            value_parser = ["on", "off"],
            default_value = "on"
        )]
        sqlite_caller_commits: String,
        /// Export tracing spans (executions, step calls, store commits) to
        /// this OpenTelemetry collector over OTLP/HTTP, e.g.
        /// http://127.0.0.1:4318 (builds with the `otel` feature).
        #[arg(long, env = "OTEL_EXPORTER_OTLP_ENDPOINT")]
        otlp_endpoint: Option<String>,
    },
    /// Start an execution of the definition in FILE and follow it until it
    /// is terminal or paused; exit 0 for completed, 1 otherwise.
    Run {
        file: PathBuf,
        /// The execution's input, as JSON.
        #[arg(long, default_value = "null")]
        input: String,
        #[command(flatten)]
        remote: Remote,
    },
    /// A table of executions, newest first.
    List {
        #[arg(long)]
        status: Option<String>,
        #[arg(long)]
        saga: Option<String>,
        #[arg(long, default_value_t = 50)]
        limit: usize,
        #[command(flatten)]
        remote: Remote,
    },
    /// One execution with its step timeline.
    Show {
        id: String,
        #[command(flatten)]
        remote: Remote,
    },
    /// Stop an execution and compensate what it did.
    Cancel {
        id: String,
        #[command(flatten)]
        remote: Remote,
    },
    /// Resume a failed execution's compensations or confirms.
    Retry {
        id: String,
        #[command(flatten)]
        remote: Remote,
    },
    /// Run the confirms of an execution awaiting commit.
    Commit {
        id: String,
        #[command(flatten)]
        remote: Remote,
    },
    /// Compensate an execution awaiting commit.
    Reject {
        id: String,
        #[command(flatten)]
        remote: Remote,
    },
    /// Print the saga in FILE as a Mermaid flowchart.
    Graph { file: PathBuf },
    /// The benchmark: throughput, latency, CPU, memory and bytes written.
    ///
    /// It measures the machine first (an fsync where the stores are made,
    /// a fixed CPU loop) and prints that with the rows: this machine's
    /// figures move with its disk and CPU from hour to hour.
    Bench {
        /// Workloads to run, comma-separated: memory, tx, sqlite, http,
        /// recovery, idle (the default: these six); also postgres (on the
        /// server of SAGATX_BENCH_PG_URL, in databases it creates and
        /// drops) and peers (the Python peers side by side, bench/peers/run,
        /// then Saga::execute and tx in rounds alternated with their peer).
        #[arg(long, value_delimiter = ',')]
        workload: Vec<String>,
        /// Tiny sizes: checks that the benchmark works, measures nothing.
        #[arg(long)]
        quick: bool,
        /// Print the rows as JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// Only the rows at these concurrencies, comma-separated (memory:
        /// 1, 64; sqlite: 1, 64, 1024; http: 1, 16, 64, 256; postgres: both
        /// sets); tx, recovery, idle and peers run as they are. For
        /// profiling one row.
        #[arg(long, value_delimiter = ',')]
        concurrency: Vec<usize>,
    },
    /// Copy every definition and execution from one store to another, empty
    /// one, and verify the copy. Stop the servers on both first.
    Migrate {
        /// sqlite://PATH or postgres://…
        #[arg(long)]
        from: String,
        /// sqlite://PATH or postgres://…; must hold no sagatx data yet.
        #[arg(long)]
        to: String,
    },
    /// The step service of the benchmark's http workload.
    #[command(hide = true)]
    BenchService {
        #[arg(long)]
        listen: String,
    },
}

/// jemalloc, not the system's: the coordinator allocates and frees small
/// objects on every request, transition and call, often on another thread
/// than the one that allocated them, where glibc's malloc spent a quarter of
/// the server's worker time (perf, `http` workload). jemalloc rather than
/// mimalloc, which the binary had before: the server's RSS 14-20 MiB lower
/// in every row (http at c=64 32 MiB against 46, idle 17 against 31) and
/// throughput the same or better (BENCHMARKS.md, the log's twentieth
/// session); the `mimalloc` crate sends every allocation through
/// mimalloc's aligned entry point, whose slow path over-allocates any size
/// that is not a power of two. The library leaves the choice to its users.
#[cfg(not(target_env = "msvc"))]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(2);
        }
    };
    match rt.block_on(run(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn read_definition(file: &PathBuf) -> Result<Value> {
    let bytes = std::fs::read(file)
        .with_context(|| format!("cannot read {}; check the path", file.display()))?;
    let def = sagatx_core::SagaDefinition::from_json(&bytes)
        .map_err(|e| anyhow!("{} is not a valid saga definition: {e}", file.display()))?;
    Ok(def.to_json())
}

async fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Serve {
            listen,
            store,
            token,
            public_url,
            notify_url,
            notify_on,
            log_format,
            lease_ms,
            sqlite_caller_commits,
            otlp_endpoint,
        } => {
            let statuses = notify_on
                .iter()
                .map(|s| s.parse::<sagatx::Status>())
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| anyhow!("--notify-on: {e}"))?;
            let notify = if notify_url.is_empty() {
                None
            } else {
                Some(sagatx_server::notify::NotifyConfig {
                    urls: notify_url,
                    statuses,
                })
            };
            serve(Serve {
                listen,
                store,
                token,
                public_url,
                notify,
                json_logs: log_format == "json",
                lease: Duration::from_millis(lease_ms),
                caller_commits: sqlite_caller_commits == "on",
                otlp: otlp_endpoint,
            })
            .await
        }
        Command::Run {
            file,
            input,
            remote,
        } => {
            let def = read_definition(&file)?;
            let input: Value = serde_json::from_str(&input)
                .map_err(|e| anyhow!("--input is not valid JSON: {e}"))?;
            let c = Client::new(&remote.server, remote.token.as_deref())?;
            follow(&c, def, input).await
        }
        Command::List {
            status,
            saga,
            limit,
            remote,
        } => {
            let c = Client::new(&remote.server, remote.token.as_deref())?;
            let mut q = vec![("limit".to_string(), limit.to_string())];
            if let Some(s) = status {
                q.push(("status".into(), s));
            }
            if let Some(s) = saga {
                q.push(("saga".into(), s));
            }
            let page = c.get("/v1/executions", &q).await?;
            println!("{}", show::table(&page));
            Ok(ExitCode::SUCCESS)
        }
        Command::Show { id, remote } => {
            let c = Client::new(&remote.server, remote.token.as_deref())?;
            let ex = c.get(&format!("/v1/executions/{id}"), &[]).await?;
            println!("{}", show::execution(&ex));
            Ok(ExitCode::SUCCESS)
        }
        Command::Cancel { id, remote } => act(&remote, &id, "cancel").await,
        Command::Retry { id, remote } => act(&remote, &id, "retry").await,
        Command::Commit { id, remote } => act(&remote, &id, "commit").await,
        Command::Reject { id, remote } => act(&remote, &id, "reject").await,
        Command::Bench {
            workload,
            quick,
            json,
            concurrency,
        } => {
            let workloads = if workload.is_empty() {
                bench::ALL.iter().map(|s| s.to_string()).collect()
            } else {
                workload
            };
            let options = bench::Options {
                workloads,
                quick,
                concurrency,
            };
            options.check()?;
            eprintln!(
                "sagatx bench: workloads {} ({}), on {} CPUs",
                options.workloads.join(", "),
                if quick { "quick sizes" } else { "full sizes" },
                std::thread::available_parallelism()
                    .map(|n| n.get())
                    .unwrap_or(1)
            );
            let machine = bench::machine(quick)?;
            if json {
                // The table shows it on stdout.
                eprintln!("sagatx bench: {}", machine.line());
            }
            let mut rows = bench::run(&options).await?;
            bench::relate_to_machine(&mut rows, &machine);
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(
                        &json!({"rows": rows, "quick": quick, "machine": machine})
                    )?
                );
            } else {
                println!("{}", machine.line());
                println!("{}", bench::table(&rows));
                let notes = bench::notes(&rows);
                if !notes.is_empty() {
                    println!("\nNotes:\n{notes}");
                }
                if let Some(r) = bench::ratios(&rows) {
                    println!("\nSide by side, measured in this run (mean time per saga or transaction):\n{r}");
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Migrate { from, to } => {
            let source = sagatx::store::open(&from)
                .await
                .map_err(|e| anyhow!("the source: {e}"))?;
            let target = sagatx::store::open(&to)
                .await
                .map_err(|e| anyhow!("the target: {e}"))?;
            let r = sagatx::store::migrate::copy(&*source, &*target)
                .await
                .map_err(|e| anyhow!("{e}"))?;
            println!(
                "copied and verified {} definition versions, {} executions, {} unfinished operations",
                r.definitions, r.executions, r.operations
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::BenchService { listen } => {
            bench::service(&listen).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Graph { file } => {
            let bytes = std::fs::read(&file)
                .with_context(|| format!("cannot read {}; check the path", file.display()))?;
            let def = sagatx_core::SagaDefinition::from_json(&bytes)
                .map_err(|e| anyhow!("{} is not a valid saga definition: {e}", file.display()))?;
            print!("{}", graph::mermaid(&def));
            Ok(ExitCode::SUCCESS)
        }
    }
}

async fn act(remote: &Remote, id: &str, what: &str) -> Result<ExitCode> {
    let c = Client::new(&remote.server, remote.token.as_deref())?;
    let ex = c
        .post(&format!("/v1/executions/{id}/{what}"), &json!({}))
        .await?;
    println!(
        "execution {} is {}",
        ex["id"].as_str().unwrap_or(id),
        ex["status"].as_str().unwrap_or("?")
    );
    Ok(ExitCode::SUCCESS)
}

/// Starts an execution and prints each step's progress until it is
/// terminal or paused.
async fn follow(c: &Client, def: Value, input: Value) -> Result<ExitCode> {
    let mut ex = c
        .post("/v1/executions", &json!({"saga": def, "input": input}))
        .await?;
    let id = ex["id"].as_str().unwrap_or_default().to_string();
    println!(
        "execution {id} of {} v{}",
        ex["saga"].as_str().unwrap_or("?"),
        ex["saga_version"]
    );
    // On a terminal: one live line per step (indicatif); in a pipe or a
    // log: a line each time a step changes.
    let live = std::io::IsTerminal::is_terminal(&std::io::stdout());
    let bars = live.then(|| show::Bars::new(&ex));
    let mut seen: Vec<String> = Vec::new();
    loop {
        match &bars {
            Some(b) => b.update(&ex),
            None => show::progress(&ex, &mut seen),
        }
        let status = ex["status"].as_str().unwrap_or_default();
        if matches!(status, "completed" | "compensated" | "failed" | "paused") {
            if let Some(b) = &bars {
                b.finish(&ex);
            }
            println!("{}", show::summary(&ex));
            return Ok(if status == "completed" {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            });
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        ex = c.get(&format!("/v1/executions/{id}"), &[]).await?;
    }
}

/// What `sagatx serve` was asked for.
struct Serve {
    listen: String,
    store: String,
    token: Option<String>,
    public_url: Option<String>,
    notify: Option<sagatx_server::notify::NotifyConfig>,
    json_logs: bool,
    lease: Duration,
    caller_commits: bool,
    otlp: Option<String>,
}

async fn serve(args: Serve) -> Result<ExitCode> {
    let Serve {
        listen,
        store,
        token,
        public_url,
        notify,
        json_logs,
        lease,
        caller_commits,
        otlp,
    } = args;
    use tracing_subscriber::prelude::*;
    let filter = tracing_subscriber::EnvFilter::try_from_env("SAGATX_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let logs = if json_logs {
        tracing_subscriber::fmt::layer()
            .json()
            .with_writer(std::io::stderr)
            .boxed()
    } else {
        use std::io::IsTerminal;
        tracing_subscriber::fmt::layer()
            .with_ansi(std::io::stderr().is_terminal())
            .with_writer(std::io::stderr)
            .boxed()
    };
    // Log lines are events, each with its own fields (the execution's id
    // among them); the spans (an execution, a step call) are left to the
    // OTLP export. Handing them to the log layer had it format every span's
    // fields as the span began, log line or not: 6 % of the server's work.
    let logs = logs.with_filter(tracing_subscriber::filter::filter_fn(|m| m.is_event()));
    #[cfg(feature = "otel")]
    let (provider, spans) = match &otlp {
        Some(endpoint) => {
            let (p, l) = otel::layer(endpoint)?;
            // Executions, step calls and store commits.
            let f = tracing_subscriber::EnvFilter::new("info,sagatx::store=debug");
            (Some(p), Some(l.with_filter(f)))
        }
        None => (None, None),
    };
    #[cfg(not(feature = "otel"))]
    let spans: Option<tracing_subscriber::layer::Identity> = match &otlp {
        Some(_) => bail!(
            "--otlp-endpoint: this build has no OTLP export; build sagatx with the otel feature \
             (cargo build --release -p sagatx-cli --features otel)"
        ),
        None => None,
    };
    // Without the export no layer reads a span: turned off for the whole
    // subscriber, every span callsite is disabled once and for all, where
    // the log layer's own filter left the registry to build and track each
    // one (an execution's, each step call's): 21,000 of 442,000
    // instructions per HTTP saga (bench/server-instructions.sh).
    let only_events = spans
        .is_none()
        .then(|| tracing_subscriber::filter::filter_fn(|m| m.is_event()));
    tracing_subscriber::registry()
        .with(only_events)
        .with(logs.with_filter(filter))
        .with(spans)
        .init();
    let stop = shutdown_signal()?;
    let options = sagatx::store::OpenOptions::default()
        .lease(lease)
        .sqlite_caller_commits(caller_commits);
    let store = sagatx::store::open_with(&store, options)
        .await
        .map_err(|e| anyhow!("{e}"))?;
    let listener = tokio::net::TcpListener::bind(&listen)
        .await
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::AddrInUse => anyhow!(
                "cannot listen on {listen}: {e}; is another server running there? choose another with --listen"
            ),
            _ => anyhow!(
                "cannot listen on {listen}: {e}; give --listen an address this machine has and a port from 1 to 65535, as in 127.0.0.1:7700"
            ),
        })?;
    if token.as_deref().is_some_and(str::is_empty) {
        bail!("--token is empty; give a token or leave the option out");
    }
    let addr = listener.local_addr()?;
    eprintln!("sagatx serve: listening on http://{addr}");
    let cfg = sagatx_server::ServerConfig {
        token,
        public_url,
        max_calls: None,
        notify,
    };
    sagatx_server::serve(listener, store, cfg, stop)
        .await
        .map_err(|e| anyhow!("{e}"))?;
    #[cfg(feature = "otel")]
    if let Some(p) = provider {
        // Sends the spans still in the batch.
        let _ = tokio::task::spawn_blocking(move || p.shutdown()).await;
    }
    eprintln!("sagatx serve: stopped");
    Ok(ExitCode::SUCCESS)
}

/// Ctrl-C or SIGTERM. The handlers are installed now, before the port
/// opens, so a signal that comes early still stops the server cleanly.
fn shutdown_signal() -> Result<impl std::future::Future<Output = ()> + Send + 'static> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate())
            .map_err(|e| anyhow!("cannot install the SIGTERM handler: {e}"))?;
        let mut int = signal(SignalKind::interrupt())
            .map_err(|e| anyhow!("cannot install the Ctrl-C handler: {e}"))?;
        Ok(async move {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        })
    }
    #[cfg(not(unix))]
    {
        Ok(async {
            let _ = tokio::signal::ctrl_c().await;
        })
    }
}
