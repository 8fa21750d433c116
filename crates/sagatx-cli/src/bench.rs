//! `sagatx bench`: the project's benchmark. Each workload has fixed,
//! printed parameters and a warm-up; the figures are throughput, latency
//! percentiles, CPU seconds per 1,000 sagas, peak RSS and bytes written to
//! the store per saga. Performance goals live here, never in timed tests.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use sagatx::{Engine, MemoryStore, Saga, SqliteStore, Status, StepContext, StepError, Store};
use sagatx_core::{Env, Event, Execution, ExecutionId, Mode};
use serde_json::{json, Value};

/// Which workloads, at what size.
pub struct Options {
    pub workloads: Vec<String>,
    pub quick: bool,
    /// Only the rows at these concurrencies, in the workloads that have
    /// several (memory, sqlite, http, postgres); empty: every row. The
    /// others (tx, recovery, idle, peers) run as they are.
    pub concurrency: Vec<usize>,
}

/// The concurrencies of the memory workload's rows.
const MEMORY_LEVELS: [usize; 2] = [1, 64];
/// Of the sqlite workload's rows, and of postgres's in-process rows.
const DURABLE_LEVELS: [usize; 3] = [1, 64, 1024];
/// Of the http workload's rows, and of postgres's over HTTP.
const HTTP_LEVELS: [usize; 4] = [1, 16, 64, 256];

impl Options {
    /// The concurrencies of `levels` this run measures.
    fn levels(&self, levels: &[usize]) -> Vec<usize> {
        levels
            .iter()
            .copied()
            .filter(|c| self.concurrency.is_empty() || self.concurrency.contains(c))
            .collect()
    }

    /// Fails, before anything runs, on an unknown workload, and on a
    /// concurrency that none of the chosen workloads has a row at (a
    /// filter that would leave nothing).
    pub fn check(&self) -> Result<()> {
        if let Some(other) = self
            .workloads
            .iter()
            .find(|w| !ALL.contains(&w.as_str()) && !["postgres", "peers"].contains(&w.as_str()))
        {
            bail!(
                "no workload {other:?}; choose from {}, postgres, peers",
                ALL.join(", ")
            );
        }
        let levels = |w: &str| -> &[usize] {
            match w {
                "memory" => &MEMORY_LEVELS,
                "sqlite" => &DURABLE_LEVELS,
                "http" => &HTTP_LEVELS,
                "postgres" => &[1, 16, 64, 256, 1024],
                _ => &[],
            }
        };
        for &c in &self.concurrency {
            if !self.workloads.iter().any(|w| levels(w).contains(&c)) {
                bail!(
                    "no row of the chosen workloads runs at concurrency {c}: memory has {:?}, sqlite {:?}, \
                     http {:?}, postgres {:?} in-process and {:?} over HTTP",
                    MEMORY_LEVELS,
                    DURABLE_LEVELS,
                    HTTP_LEVELS,
                    DURABLE_LEVELS,
                    HTTP_LEVELS
                );
            }
        }
        Ok(())
    }
}

/// One measured row.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Row {
    pub workload: String,
    pub variant: String,
    pub concurrency: usize,
    pub sagas: usize,
    pub seconds: f64,
    pub sagas_per_second: f64,
    pub p50_us: f64,
    pub p90_us: f64,
    pub p99_us: f64,
    pub max_us: f64,
    /// How many of the sagas the percentiles are of (every one, or every
    /// 16th in the sub-microsecond rows).
    pub latencies_timed: usize,
    pub cpu_seconds_per_1000: f64,
    pub peak_rss_mib: f64,
    pub bytes_written_per_saga: Option<f64>,
    pub note: String,
}

/// The workloads run by default; `postgres` runs when asked for (it needs
/// SAGATX_BENCH_PG_URL).
pub const ALL: [&str; 6] = ["memory", "tx", "sqlite", "http", "recovery", "idle"];

fn proc_field(path: &str, key: &str) -> Option<u64> {
    let text = std::fs::read_to_string(path).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

/// Peak resident set of a process, MiB.
fn peak_rss_mib(pid: &str) -> f64 {
    proc_field(&format!("/proc/{pid}/status"), "VmHWM:").unwrap_or(0) as f64 / 1024.0
}

fn rss_mib(pid: &str) -> f64 {
    proc_field(&format!("/proc/{pid}/status"), "VmRSS:").unwrap_or(0) as f64 / 1024.0
}

/// Bytes a process caused to be written to storage.
fn write_bytes(pid: &str) -> Option<u64> {
    proc_field(&format!("/proc/{pid}/io"), "write_bytes:")
}

/// CPU seconds (user + system) of a process (`pid`, or `self`), or of one
/// thread (`self/task/TID`).
fn cpu_seconds(pid: &str) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // Fields after the command name, which is in parentheses.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // utime and stime are fields 14 and 15, i.e. 11 and 12 after ')'.
    (ticks(11) + ticks(12)) / 100.0
}

/// CPU seconds (user + system) of this process's threads whose name
/// starts with `name` (as the kernel keeps it: 15 bytes at most); `None`
/// when there is none (or no `/proc`).
fn threads_cpu_seconds(name: &str) -> Option<f64> {
    let mut found = None;
    for task in std::fs::read_dir("/proc/self/task").ok()?.flatten() {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        if comm.trim_end().starts_with(name) {
            let tid = task.file_name();
            let cpu = cpu_seconds(&format!("self/task/{}", tid.to_string_lossy()));
            *found.get_or_insert(0.0) += cpu;
        }
    }
    found
}

/// The SQLite store's writer thread, as `/proc` names it.
const SQLITE_WRITER_THREAD: &str = "sagatx-sqlite-w";

/// How many sagas (or transactions) of a fast row share one latency
/// measurement: a clock read costs 60-70 ns on this machine's VM, and two
/// per saga were 15 % of a `Saga::execute` run and half of a two-phase
/// commit. Throughput always counts every saga over the whole run; the
/// percentiles are those of about one in 16, picked at random.
const TIME_EVERY_FAST: usize = 16;

/// Picks about one saga in `every` (rounded up to a power of two) to time,
/// at random (xorshift, seeded per caller). A fixed stride aliases with
/// whatever is periodic in a run:
/// tokio's cooperative budget makes a caller yield every so many sagas,
/// and a stride of 16 timed exactly the sagas that waited for the other
/// callers (p90 of 11-18 ms instead of 8-10 µs at concurrency 64).
struct Sampler {
    /// `every` rounded up to a power of two, less one: a mask instead of
    /// a division (a 64-bit division was 2.6 % of a `Saga::execute` run).
    mask: u64,
    state: u64,
}

impl Sampler {
    fn new(every: usize, seed: u64) -> Self {
        Sampler {
            mask: (every.max(1) as u64).next_power_of_two() - 1,
            // Never zero (xorshift stays at zero).
            state: seed.wrapping_add(1).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1,
        }
    }

    /// The start time when this saga is to be timed.
    fn start(&mut self) -> Option<Instant> {
        self.pick().then(Instant::now)
    }

    fn pick(&mut self) -> bool {
        if self.mask == 0 {
            return true;
        }
        let mut x = self.state;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.state = x;
        x & self.mask == 0
    }
}

struct Sample {
    /// Sagas run (the latencies may be of a sample of them).
    sagas: usize,
    latencies_us: Vec<f64>,
    seconds: f64,
    cpu: f64,
    bytes: Option<u64>,
}

/// The `p` quantile (0 to 1) of `sorted` (ascending); 0 when it is empty.
fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

fn row(workload: &str, variant: &str, c: usize, s: Sample, pid: &str, note: &str) -> Row {
    let mut l = s.latencies_us;
    l.sort_by(|a, b| a.total_cmp(b));
    let pct = |p: f64| percentile(&l, p);
    let n = s.sagas.max(1);
    Row {
        workload: workload.into(),
        variant: variant.into(),
        concurrency: c,
        sagas: s.sagas,
        seconds: s.seconds,
        sagas_per_second: s.sagas as f64 / s.seconds.max(1e-9),
        p50_us: pct(0.50),
        p90_us: pct(0.90),
        p99_us: pct(0.99),
        max_us: l.last().copied().unwrap_or(0.0),
        latencies_timed: l.len(),
        cpu_seconds_per_1000: s.cpu / n as f64 * 1000.0,
        peak_rss_mib: peak_rss_mib(pid),
        bytes_written_per_saga: s.bytes.map(|b| b as f64 / n as f64),
        note: note.into(),
    }
}

async fn noop(_: StepContext) -> Result<(), StepError> {
    Ok(())
}

async fn reject(_: StepContext) -> Result<(), StepError> {
    Err(StepError::permanent("rejected"))
}

fn noop_sync(_: StepContext) -> Result<(), StepError> {
    Ok(())
}

fn reject_sync(_: StepContext) -> Result<(), StepError> {
    Err(StepError::permanent("rejected"))
}

/// [`three`] with synchronous steps (`step_sync`): py-api-saga's steps are
/// plain functions, and so are these.
fn three_sync(name: &str, fail_third: bool, mode: Mode) -> Result<Saga> {
    three_of(name, fail_third, mode, true)
}

fn three(name: &str, fail_third: bool, mode: Mode) -> Result<Saga> {
    three_of(name, fail_third, mode, false)
}

/// Steps a, b and c, the first two with a compensation; c rejects when
/// `fail_third`; every function synchronous when `sync`.
fn three_of(name: &str, fail_third: bool, mode: Mode, sync: bool) -> Result<Saga> {
    let mut b = Saga::builder(name).mode(mode);
    for step in ["a", "b", "c"] {
        let last = step == "c";
        b = match (sync, last && fail_third) {
            (true, false) => b.step_sync(step, noop_sync),
            (true, true) => b.step_sync(step, reject_sync),
            (false, false) => b.step(step, noop),
            (false, true) => b.step(step, reject),
        };
        if !last {
            b = if sync {
                b.compensate_sync(noop_sync)
            } else {
                b.compensate(noop)
            };
        }
    }
    b.build().map_err(|e| anyhow!("{e}"))
}

/// Runs `n` sagas on `engine` with `c` concurrent callers; latencies of
/// about one in `every` start-to-end ([`Sampler`]).
async fn drive(
    engine: &Engine,
    saga: &str,
    n: usize,
    c: usize,
    expect: Status,
    every: usize,
) -> Result<Vec<f64>> {
    let per = n.div_ceil(c);
    let mut tasks = tokio::task::JoinSet::new();
    for caller in 0..c {
        let engine = engine.clone();
        let saga = saga.to_string();
        tasks.spawn(async move {
            let mut lat = Vec::with_capacity(per.div_ceil(every));
            let mut counter = Counter(0);
            let mut sampler = Sampler::new(every, caller as u64);
            for _ in 0..per {
                let t = sampler.start();
                let ex = engine.run(&saga, Value::Null).await?;
                if ex.status != expect {
                    bail!("a {saga} saga ended {} instead of {expect}", ex.status);
                }
                if let Some(t) = t {
                    lat.push(t.elapsed().as_secs_f64() * 1e6);
                }
                counter.one();
            }
            Ok(lat)
        });
    }
    latencies(tasks, n).await
}

/// The latencies the callers of a run measured, all together.
async fn latencies(
    mut tasks: tokio::task::JoinSet<Result<Vec<f64>>>,
    n: usize,
) -> Result<Vec<f64>> {
    let mut all = Vec::with_capacity(n);
    while let Some(r) = tasks.join_next().await {
        all.extend(r.map_err(|e| anyhow!("bench task: {e}"))??);
    }
    Ok(all)
}

/// Runs `n` sagas with [`Saga::execute`] (nothing journaled) with `c`
/// concurrent callers; `ok`: whether they are to complete. Latencies of
/// about one in [`TIME_EVERY_FAST`].
async fn drive_local(saga: &Arc<Saga>, n: usize, c: usize, ok: bool) -> Result<Vec<f64>> {
    let per = n.div_ceil(c);
    let mut tasks = tokio::task::JoinSet::new();
    for caller in 0..c {
        let saga = saga.clone();
        tasks.spawn(async move {
            let mut lat = Vec::with_capacity(per.div_ceil(TIME_EVERY_FAST));
            let mut counter = Counter(0);
            let mut sampler = Sampler::new(TIME_EVERY_FAST, caller as u64);
            for _ in 0..per {
                let t = sampler.start();
                let r = saga.execute(Value::Null).await;
                if r.is_ok() != ok {
                    bail!("a {} saga ended {r:?}", saga.name());
                }
                if let Some(t) = t {
                    lat.push(t.elapsed().as_secs_f64() * 1e6);
                }
                counter.one();
            }
            Ok(lat)
        });
    }
    latencies(tasks, n).await
}

/// Sagas run before a row is measured, not measured: a tenth, and at
/// least one per caller.
fn warm_up(n: usize, c: usize) -> usize {
    (n / 10).max(c)
}

/// The sagas a stage runs: `n` measured after the warm-up, each split
/// evenly over `c` callers (rounded up, as [`drive`] does).
fn stage_sagas(n: usize, c: usize) -> usize {
    let each = |n: usize| n.div_ceil(c) * c;
    each(warm_up(n, c)) + each(n)
}

/// Runs a row's warm-up, then its `n` sagas (rounded up to a multiple of
/// `c`), timing about one in `every`.
async fn measure(
    engine: &Engine,
    saga: &str,
    n: usize,
    c: usize,
    expect: Status,
    every: usize,
) -> Result<Sample> {
    drive(engine, saga, warm_up(n, c), c, expect, every).await?;
    let cpu0 = cpu_seconds("self");
    let w0 = write_bytes("self");
    let t = Instant::now();
    let latencies_us = drive(engine, saga, n, c, expect, every).await?;
    Ok(Sample {
        sagas: n.div_ceil(c) * c,
        latencies_us,
        seconds: t.elapsed().as_secs_f64(),
        cpu: cpu_seconds("self") - cpu0,
        bytes: w0.and_then(|w0| Some(write_bytes("self")?.saturating_sub(w0))),
    })
}

/// [`measure`] for [`Saga::execute`].
async fn measure_local(saga: &Arc<Saga>, n: usize, c: usize, ok: bool) -> Result<Sample> {
    drive_local(saga, warm_up(n, c), c, ok).await?;
    let cpu0 = cpu_seconds("self");
    let t = Instant::now();
    let latencies_us = drive_local(saga, n, c, ok).await?;
    Ok(Sample {
        sagas: n.div_ceil(c) * c,
        latencies_us,
        seconds: t.elapsed().as_secs_f64(),
        cpu: cpu_seconds("self") - cpu0,
        bytes: None,
    })
}

/// Finished executions the `memory` workload's store keeps.
const MEMORY_RETENTION: usize = 10_000;

async fn memory(o: &Options, out: &mut Vec<Row>) -> Result<()> {
    if o.levels(&MEMORY_LEVELS).is_empty() {
        return Ok(());
    }
    let n = if o.quick { 2_000 } else { 200_000 };
    // The store keeps the last 10,000 finished executions (as a long-lived
    // process would), so that the figures are the engine's, not those of a
    // store growing by a million executions.
    let engine = Engine::builder()
        .store(MemoryStore::with_retention(MEMORY_RETENTION))
        .saga(three("ok", false, Mode::Sequential)?)
        .saga(three("fail", true, Mode::Sequential)?)
        .saga(three("conc", false, Mode::Concurrent)?)
        .build()
        .await?;
    for (saga, variant, expect) in [
        ("ok", "3 steps, sequential", Status::Completed),
        ("fail", "3rd rejected, 2 compensations", Status::Compensated),
        ("conc", "3 steps, concurrent", Status::Completed),
    ] {
        for c in o.levels(&MEMORY_LEVELS) {
            let _stage = stage(
                &format!("memory: {variant}, {n} sagas, concurrency {c}"),
                stage_sagas(n, c),
            );
            let s = measure(&engine, saga, n, c, expect, TIME_EVERY_FAST).await?;
            out.push(row(
                "memory",
                variant,
                c,
                s,
                "self",
                "MemoryStore keeping the last 10,000 finished, in-process",
            ));
        }
    }
    // The same sagas run by `Saga::execute`: nothing journaled, like
    // py-api-saga (which keeps no state either), with synchronous steps
    // as its are; and once with async steps (a boxed future a call).
    const SYNC: &str =
        "Saga::execute: no store, in-process; synchronous steps (step_sync), as the peer's are";
    for (saga, variant, ok, note) in [
        (
            three_sync("ok", false, Mode::Sequential)?,
            "3 steps, sequential, not journaled (Saga::execute)",
            true,
            SYNC,
        ),
        (
            three_sync("fail", true, Mode::Sequential)?,
            "3rd rejected, 2 compensations, not journaled (Saga::execute)",
            false,
            SYNC,
        ),
        (
            three_sync("conc", false, Mode::Concurrent)?,
            "3 steps, concurrent, not journaled (Saga::execute)",
            true,
            SYNC,
        ),
        (
            three("ok", false, Mode::Sequential)?,
            "3 steps, sequential, async steps, not journaled (Saga::execute)",
            true,
            "Saga::execute: no store, in-process; async steps (a boxed future a call)",
        ),
    ] {
        let saga = Arc::new(saga);
        for c in o.levels(&MEMORY_LEVELS) {
            let _stage = stage(
                &format!("memory: {variant}, {n} sagas, concurrency {c}"),
                stage_sagas(n, c),
            );
            let s = measure_local(&saga, n, c, ok).await?;
            out.push(row("memory", variant, c, s, "self", note));
        }
    }
    Ok(())
}

async fn sqlite(o: &Options, out: &mut Vec<Row>) -> Result<()> {
    if o.levels(&DURABLE_LEVELS).is_empty() {
        return Ok(());
    }
    let dir = tempfile::tempdir()?;
    let store = Arc::new(SqliteStore::open(dir.path().join("bench.db"))?);
    let callers = store.clone();
    let commits = move || callers.commits_by_callers();
    durable(
        o,
        out,
        "sqlite",
        store,
        "synchronous=FULL, group commit",
        Some(&commits),
    )
    .await
}

/// The PostgreSQL URL of the `postgres` workload.
fn pg_url() -> Result<String> {
    std::env::var("SAGATX_BENCH_PG_URL").map_err(|_| {
        anyhow!(
            "the postgres workload needs SAGATX_BENCH_PG_URL, the URL of a database on a \
             PostgreSQL server where its user may create databases: each part of the workload \
             runs on a fresh one, dropped afterwards (scripts/test-postgres start starts a \
             PostgreSQL and prints a URL)"
        )
    })
}

/// A database of the benchmark's own on a PostgreSQL server: every
/// workload starts on an empty one, and [`PgDb::remove`] drops it after.
struct PgDb {
    /// The URL given (its database is where `CREATE DATABASE` runs).
    admin: String,
    name: String,
    url: String,
}

impl PgDb {
    /// Creates a fresh database on the server of `url`.
    async fn create(url: &str) -> Result<Self> {
        let name = format!(
            "sagatx_bench_{}",
            &uuid::Uuid::new_v4().simple().to_string()[..12]
        );
        pg_admin(url, &format!("CREATE DATABASE {name}")).await?;
        let base = url.rsplit_once('/').map(|(b, _)| b).unwrap_or(url);
        Ok(PgDb {
            admin: url.to_string(),
            url: format!("{base}/{name}"),
            name,
        })
    }

    /// Drops the database, with whatever connections are left to it (a
    /// full run writes over a gigabyte; left behind, repeated runs would
    /// fill the server's disk). Gives `r` back: a failed drop is only
    /// reported, it does not change the run's outcome.
    async fn remove<T>(self, r: Result<T>) -> Result<T> {
        let drop = format!("DROP DATABASE IF EXISTS {}", self.name);
        let dropped = match pg_admin(&self.admin, &format!("{drop} WITH (FORCE)")).await {
            // Before PostgreSQL 13 there is no FORCE: the coordinators are
            // gone by now, so a plain drop finds no one connected.
            Err(_) => pg_admin(&self.admin, &drop).await,
            ok => ok,
        };
        if let Err(e) = dropped {
            eprintln!(
                "sagatx bench: could not drop the benchmark's database {}: {e:#}; drop it by hand",
                self.name
            );
        }
        r
    }
}

/// Runs one statement on the server of `url`.
async fn pg_admin(url: &str, statement: &str) -> Result<()> {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .map_err(|e| anyhow!("cannot connect to {url}: {e}"))?;
    let conn = tokio::spawn(conn);
    let done = client.batch_execute(statement).await;
    drop(client);
    let _ = conn.await;
    done.with_context(|| format!("{statement} failed"))
}

async fn postgres(o: &Options, out: &mut Vec<Row>) -> Result<()> {
    let url = pg_url()?;
    if !o.levels(&DURABLE_LEVELS).is_empty() {
        let db = PgDb::create(&url).await?;
        let run = async {
            let store = sagatx::store::open(&db.url).await?;
            durable(
                o,
                out,
                "postgres",
                store,
                "PostgreSQL, group commit, one process",
                None,
            )
            .await
        }
        .await;
        db.remove(run).await?;
    }
    if o.levels(&HTTP_LEVELS).is_empty() {
        return Ok(());
    }
    let db = PgDb::create(&url).await?;
    let run = http_on(o, out, "postgres-http", &db.url, 1).await;
    db.remove(run).await?;
    // Three coordinators on one database, the load spread over them.
    let db = PgDb::create(&url).await?;
    let run = http_on(o, out, "postgres-http-3", &db.url, 3).await;
    db.remove(run).await
}

/// `caller_commits`: the store's count of commits made by their callers
/// (SQLite's low-load path), shown in each row's note per saga.
async fn durable(
    o: &Options,
    out: &mut Vec<Row>,
    workload: &str,
    store: Arc<dyn Store>,
    note: &str,
    caller_commits: Option<&dyn Fn() -> u64>,
) -> Result<()> {
    let engine = Engine::builder()
        .store_arc(store)
        .saga(three("ok", false, Mode::Sequential)?)
        .saga(three("fail", true, Mode::Sequential)?)
        .build()
        .await?;
    for (saga, variant, expect) in [
        ("ok", "3 steps, sequential", Status::Completed),
        ("fail", "3rd rejected, 2 compensations", Status::Compensated),
    ] {
        for c in o.levels(&DURABLE_LEVELS) {
            let n = match (o.quick, c) {
                (true, 1) => 200,
                (true, _) => 2_000,
                (false, 1) => 5_000,
                (false, _) => 100_000,
            };
            let _stage = stage(
                &format!("{workload}: {variant}, {n} sagas, concurrency {c}"),
                stage_sagas(n, c),
            );
            let before = caller_commits.map(|f| f());
            let (writer0, all0) = (
                threads_cpu_seconds(SQLITE_WRITER_THREAD),
                cpu_seconds("self"),
            );
            let s = measure(&engine, saga, n, c, expect, 1).await?;
            let mut note = match (caller_commits, before) {
                (Some(f), Some(before)) => {
                    // The warm-up's sagas commit too.
                    let sagas = stage_sagas(n, c).max(1);
                    let per_saga = f().saturating_sub(before) as f64 / sagas as f64;
                    format!("{note}; {per_saga:.2} commits a saga made by their callers")
                }
                _ => note.to_string(),
            };
            // Where the CPU went: the writer thread applies every batch,
            // the runtime's workers run the engine and encode the states.
            let all = cpu_seconds("self") - all0;
            if let (Some(w0), Some(w1)) = (writer0, threads_cpu_seconds(SQLITE_WRITER_THREAD)) {
                if all > 0.0 {
                    let share = ((w1 - w0) / all * 100.0).clamp(0.0, 100.0);
                    note.push_str(&format!("; writer thread {share:.0} % of the CPU"));
                }
            }
            out.push(row(workload, variant, c, s, "self", &note));
        }
    }
    Ok(())
}

fn progress(msg: &str) {
    eprintln!("sagatx bench: {msg}");
}

/// Sagas finished in the current stage, for its progress bar.
static DONE: AtomicU64 = AtomicU64::new(0);

/// A measuring task counts its sagas itself and adds them up this often:
/// one shared counter touched per saga would cost the in-memory rows a
/// cache line bouncing between the cores.
const COUNT_EVERY: u64 = 32;

/// Counts one task's finished sagas into [`DONE`].
struct Counter(u64);

impl Counter {
    fn one(&mut self) {
        self.0 += 1;
        if self.0 == COUNT_EVERY {
            DONE.fetch_add(self.0, Ordering::Relaxed);
            self.0 = 0;
        }
    }
}

impl Drop for Counter {
    fn drop(&mut self) {
        DONE.fetch_add(self.0, Ordering::Relaxed);
    }
}

/// One stage of the benchmark (a row's warm-up and measurement): on a
/// terminal a progress bar fed from [`DONE`] ten times a second, elsewhere
/// (a pipe, CI) one line.
struct Stage {
    bar: Option<indicatif::ProgressBar>,
    stop: Arc<AtomicBool>,
    ticker: Option<std::thread::JoinHandle<()>>,
}

fn stage(msg: &str, total: usize) -> Stage {
    use std::io::IsTerminal;
    DONE.store(0, Ordering::Relaxed);
    let stop = Arc::new(AtomicBool::new(false));
    if !std::io::stderr().is_terminal() {
        progress(msg);
        return Stage {
            bar: None,
            stop,
            ticker: None,
        };
    }
    let style = indicatif::ProgressStyle::with_template(
        "sagatx bench: {msg} {wide_bar} {pos}/{len} sagas, {elapsed}",
    )
    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar());
    let bar = indicatif::ProgressBar::new(total as u64)
        .with_style(style)
        .with_message(msg.to_string());
    let ticker = {
        let (bar, stop) = (bar.clone(), stop.clone());
        std::thread::Builder::new()
            .name("bench-progress".into())
            .spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    bar.set_position(DONE.load(Ordering::Relaxed));
                    std::thread::sleep(Duration::from_millis(100));
                }
            })
            .ok()
    };
    Stage {
        bar: Some(bar),
        stop,
        ticker,
    }
}

impl Drop for Stage {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.ticker.take() {
            let _ = t.join();
        }
        if let Some(bar) = &self.bar {
            bar.set_position(DONE.load(Ordering::Relaxed));
            bar.finish();
        }
    }
}

struct KillOnDrop(Child);
impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn spawn_self(args: &[&str], dir: &Path) -> Result<KillOnDrop> {
    let exe = std::env::current_exe().context("cannot find the sagatx binary")?;
    let child = Command::new(exe)
        .args(args)
        .current_dir(dir)
        .env("SAGATX_LOG", "warn")
        .env_remove("SAGATX_TOKEN")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .context("cannot start a sagatx child process")?;
    Ok(KillOnDrop(child))
}

async fn wait_port(port: u16) -> Result<Duration> {
    let t = Instant::now();
    while tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_err()
    {
        if t.elapsed() > Duration::from_secs(600) {
            bail!("nothing listens on port {port}");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Ok(t.elapsed())
}

/// A minimal step service for the `http` workload (`sagatx bench-service`).
pub async fn service(listen: &str) -> Result<()> {
    use axum::routing::post;
    let app = axum::Router::new()
        .route("/ok", post(|| async { "{}" }))
        .route(
            "/reject",
            post(|| async {
                (
                    axum::http::StatusCode::PAYMENT_REQUIRED,
                    r#"{"error":"rejected"}"#,
                )
            }),
        );
    let listener = tokio::net::TcpListener::bind(listen).await?;
    axum::serve(listener, app).await?;
    Ok(())
}

async fn http(o: &Options, out: &mut Vec<Row>) -> Result<()> {
    http_on(o, out, "http", "sqlite://bench.db", 1).await
}

/// `servers` coordinators on `store` (several only on PostgreSQL), a step
/// service, and the load generator here, spreading requests over the
/// coordinators.
async fn http_on(
    o: &Options,
    out: &mut Vec<Row>,
    workload: &str,
    store: &str,
    servers: usize,
) -> Result<()> {
    if o.levels(&HTTP_LEVELS).is_empty() {
        return Ok(());
    }
    sagatx_server::install_crypto();
    let dir = tempfile::tempdir()?;
    let vp = free_port()?;
    let mut procs = Vec::new();
    let mut bases = Vec::new();
    for _ in 0..servers.max(1) {
        let sp = free_port()?;
        procs.push(spawn_self(
            &[
                "serve",
                "--listen",
                &format!("127.0.0.1:{sp}"),
                "--store",
                store,
            ],
            dir.path(),
        )?);
        wait_port(sp).await?;
        bases.push(format!("http://127.0.0.1:{sp}"));
    }
    let _svc = spawn_self(
        &["bench-service", "--listen", &format!("127.0.0.1:{vp}")],
        dir.path(),
    )?;
    wait_port(vp).await?;
    let spid = procs[0].0.id().to_string();
    let base = bases[0].clone();
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(1024)
        .build()?;
    // The load itself goes through hyper's client directly, as a load
    // generator like wrk or oha would: reqwest's layers parse each
    // request's URL twice, CPU the client would take from the server on
    // this machine's two cores.
    let mut connector = hyper_util::client::legacy::connect::HttpConnector::new();
    connector.set_nodelay(true);
    let load: hyper_util::client::legacy::Client<_, Full<Bytes>> =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .pool_max_idle_per_host(1024)
            .build(connector);
    let step = |name: &str, action: &str| {
        json!({"name": name, "action": {"url": format!("http://127.0.0.1:{vp}/{action}")},
               "compensation": {"url": format!("http://127.0.0.1:{vp}/ok")}})
    };
    let defs = [
        (
            "ok",
            json!({"name": "ok", "steps": [step("a", "ok"), step("b", "ok"), step("c", "ok")]}),
        ),
        (
            "fail",
            json!({"name": "fail", "steps": [step("a", "ok"), step("b", "ok"), step("c", "reject")]}),
        ),
    ];
    for (_, d) in &defs {
        let r = client
            .post(format!("{base}/v1/sagas"))
            .json(d)
            .send()
            .await?;
        if !r.status().is_success() {
            bail!("registering the bench saga failed: {}", r.text().await?);
        }
    }
    for (saga, variant, expect) in [
        ("ok", "3 HTTP steps", "completed"),
        ("fail", "3rd rejected, 2 compensations", "compensated"),
    ] {
        for c in o.levels(&HTTP_LEVELS) {
            let n = match (o.quick, c) {
                (true, _) => 100,
                (false, 1) => 2_000,
                (false, _) => 20_000,
            };
            let _stage = stage(
                &format!("{workload}: {variant}, {n} sagas, concurrency {c}"),
                stage_sagas(n, c),
            );
            let body = Bytes::from(json!({"saga": saga, "input": null}).to_string());
            let run = |n: usize| {
                let load = load.clone();
                let bases = bases.clone();
                let body = body.clone();
                async move {
                    let per = n.div_ceil(c);
                    let mut tasks = tokio::task::JoinSet::new();
                    for i in 0..c {
                        let load = load.clone();
                        let body = body.clone();
                        let uri: http::Uri =
                            format!("{}/v1/executions?wait=30", bases[i % bases.len()])
                                .parse()
                                .context("the bench's start URL")?;
                        tasks.spawn(async move {
                            let mut lat = Vec::with_capacity(per);
                            let mut counter = Counter(0);
                            for _ in 0..per {
                                let t = Instant::now();
                                let mut req = http::Request::new(Full::new(body.clone()));
                                *req.method_mut() = http::Method::POST;
                                *req.uri_mut() = uri.clone();
                                req.headers_mut().insert(
                                    http::header::CONTENT_TYPE,
                                    http::HeaderValue::from_static("application/json"),
                                );
                                let r = load.request(req).await?;
                                let status = r.status();
                                let bytes = r.into_body().collect().await?.to_bytes();
                                let v: Value =
                                    serde_json::from_slice(&bytes).with_context(|| {
                                        format!(
                                            "HTTP {status}: {}",
                                            String::from_utf8_lossy(&bytes)
                                        )
                                    })?;
                                if v["status"] != expect {
                                    bail!("an HTTP saga ended {} instead of {expect}", v["status"]);
                                }
                                lat.push(t.elapsed().as_secs_f64() * 1e6);
                                counter.one();
                            }
                            Ok(lat)
                        });
                    }
                    let mut all = Vec::new();
                    while let Some(r) = tasks.join_next().await {
                        all.extend(r.map_err(|e| anyhow!("bench task: {e}"))??);
                    }
                    Ok::<_, anyhow::Error>(all)
                }
            };
            run(warm_up(n, c)).await?;
            let cpu0 = cpu_seconds(&spid);
            let w0 = write_bytes(&spid);
            let t = Instant::now();
            let latencies_us = run(n).await?;
            let s = Sample {
                sagas: latencies_us.len(),
                latencies_us,
                seconds: t.elapsed().as_secs_f64(),
                cpu: cpu_seconds(&spid) - cpu0,
                bytes: w0.and_then(|w0| Some(write_bytes(&spid)?.saturating_sub(w0))),
            };
            out.push(row(
                workload,
                variant,
                c,
                s,
                &spid,
                &if servers > 1 {
                    format!("{servers} server processes on one PostgreSQL; CPU, RSS and bytes written are the first server's")
                } else {
                    "server process: CPU, RSS and bytes written are the server's".to_string()
                },
            ));
        }
    }
    Ok(())
}

/// Writes `n` executions straight into the store, each as left by a crash:
/// `running`, with its first action in flight (or, `paused`, waiting for a
/// callback's reply).
async fn seed(store: Arc<dyn Store>, name: &str, n: usize, paused: bool) -> Result<()> {
    let def = sagatx_core::SagaDefinition::from_json(
        format!(
            r#"{{"name":"{name}","steps":[
            {{"name":"a","action":"local","compensation":"local"{}}},
            {{"name":"b","action":"local","compensation":"local"}},
            {{"name":"c","action":"local"}}]}}"#,
            if paused { r#","reply":"callback""# } else { "" }
        )
        .as_bytes(),
    )
    .map_err(|e| anyhow!("{e}"))?;
    let version = store.put_definition(&def).await?.version;
    let env = Env {
        now_ms: 1,
        random01: 0.5,
    };
    let mut tasks = tokio::task::JoinSet::new();
    let chunk = 2048;
    for start in (0..n).step_by(chunk) {
        let store = store.clone();
        let def = def.clone();
        tasks.spawn(async move {
            let mut inner = tokio::task::JoinSet::new();
            for _ in start..(start + chunk).min(n) {
                let mut ex = Execution::new(
                    ExecutionId(uuid::Uuid::now_v7()),
                    &def,
                    version,
                    Value::Null,
                    None,
                    1,
                );
                ex.handle(&def, Event::Start, env)
                    .map_err(|e| anyhow!("{e}"))?;
                if paused {
                    ex.handle(
                        &def,
                        Event::Outcome {
                            step: 0,
                            phase: sagatx_core::Phase::Action,
                            attempt: 1,
                            outcome: Ok(Value::Null),
                        },
                        env,
                    )
                    .map_err(|e| anyhow!("{e}"))?;
                }
                ex.seq = 1;
                let store = store.clone();
                inner.spawn(async move { store.append(&ex).await });
            }
            while let Some(r) = inner.join_next().await {
                r.map_err(|e| anyhow!("{e}"))??;
            }
            Ok::<_, anyhow::Error>(())
        });
        while tasks.len() >= 4 {
            if let Some(r) = tasks.join_next().await {
                r.map_err(|e| anyhow!("{e}"))??;
            }
        }
    }
    while let Some(r) = tasks.join_next().await {
        r.map_err(|e| anyhow!("{e}"))??;
    }
    Ok(())
}

async fn recovery(o: &Options, out: &mut Vec<Row>) -> Result<()> {
    let n = if o.quick { 2_000 } else { 100_000 };
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("recovery.db");
    progress(&format!("recovery: writing {n} interrupted executions"));
    seed(Arc::new(SqliteStore::open(&path)?), "rec", n, false).await?;
    progress(&format!("recovery: recovering {n} executions"));
    let done = Arc::new(AtomicUsize::new(0));
    let d2 = done.clone();
    let saga = Saga::builder("rec")
        .step("a", noop)
        .compensate(noop)
        .step("b", noop)
        .compensate(noop)
        .step("c", move |_c: StepContext| {
            let d = d2.clone();
            async move {
                d.fetch_add(1, Ordering::Relaxed);
                Ok::<_, StepError>(())
            }
        })
        .build()
        .map_err(|e| anyhow!("{e}"))?;
    let cpu0 = cpu_seconds("self");
    let t = Instant::now();
    let engine = Engine::builder()
        .store(SqliteStore::open(&path)?)
        .saga(saga)
        .build()
        .await?;
    engine.recover().await?;
    // Every interrupted execution read back and handed to a driver.
    let resumed = t.elapsed().as_secs_f64();
    while done.load(Ordering::Relaxed) < n {
        if t.elapsed() > Duration::from_secs(1800) {
            bail!("recovery did not finish in 30 minutes");
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    // Wait for the last journal writes too.
    while engine.active() > 0 {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let secs = t.elapsed().as_secs_f64();
    let s = Sample {
        sagas: n,
        latencies_us: vec![secs * 1e6; n],
        seconds: secs,
        cpu: cpu_seconds("self") - cpu0,
        bytes: None,
    };
    let mut r = row(
        "recovery",
        "interrupted mid-saga, to terminal",
        0,
        s,
        "self",
        &format!(
            "latency columns: the whole recovery; all read back and resumed after {resumed:.2} s"
        ),
    );
    r.sagas = n;
    out.push(r);
    Ok(())
}

async fn idle(o: &Options, out: &mut Vec<Row>) -> Result<()> {
    let n = if o.quick { 5_000 } else { 1_000_000 };
    let dir = tempfile::tempdir()?;
    progress(&format!(
        "idle: writing {n} executions paused on a callback"
    ));
    seed(
        Arc::new(SqliteStore::open(dir.path().join("idle.db"))?),
        "idle",
        n,
        true,
    )
    .await?;
    progress("idle: starting sagatx serve on them");
    let port = free_port()?;
    let t = Instant::now();
    let server = spawn_self(
        &[
            "serve",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--store",
            "sqlite://idle.db",
        ],
        dir.path(),
    )?;
    let startup = wait_port(port).await?;
    // Let recovery and the scheduler settle.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let pid = server.0.id().to_string();
    let rss = rss_mib(&pid);
    // What the dashboard asks of a store this size: the summary (one
    // GROUP BY in the store) and the first and a later page of the list.
    sagatx_server::install_crypto();
    let client = reqwest::Client::new();
    let base = format!("http://127.0.0.1:{port}");
    let timed = |path: String| {
        let client = client.clone();
        async move {
            let t = Instant::now();
            let r = client.get(path).send().await?;
            if !r.status().is_success() {
                bail!("the dashboard's request failed: {}", r.status());
            }
            let v: Value = r.json().await?;
            Ok::<_, anyhow::Error>((t.elapsed().as_secs_f64() * 1e3, v))
        }
    };
    let (summary_ms, summary) = timed(format!("{base}/v1/summary")).await?;
    let counted: u64 = summary["counts"]
        .as_array()
        .map(|a| a.iter().filter_map(|c| c["count"].as_u64()).sum())
        .unwrap_or(0);
    if counted != n as u64 {
        bail!("the summary counts {counted} executions, not {n}");
    }
    let (page_ms, page) = timed(format!("{base}/v1/executions?limit=50")).await?;
    let cursor = page["next_cursor"].as_str().unwrap_or("").to_string();
    let (next_ms, _) = timed(format!("{base}/v1/executions?limit=50&cursor={cursor}")).await?;
    let dashboard = format!(
        "; dashboard: summary {summary_ms:.0} ms, first page {page_ms:.1} ms, next page {next_ms:.1} ms"
    );
    let r = Row {
        workload: "idle".into(),
        variant: format!("{n} paused executions"),
        concurrency: 0,
        sagas: n,
        seconds: t.elapsed().as_secs_f64(),
        sagas_per_second: 0.0,
        p50_us: startup.as_secs_f64() * 1e6,
        p90_us: 0.0,
        p99_us: 0.0,
        max_us: 0.0,
        latencies_timed: 0,
        cpu_seconds_per_1000: 0.0,
        peak_rss_mib: peak_rss_mib(&pid),
        bytes_written_per_saga: None,
        note: format!(
            "server start-up {:.0} ms (p50 column); RSS now {rss:.1} MiB{dashboard}",
            startup.as_secs_f64() * 1e3
        ),
    };
    out.push(r);
    Ok(())
}

/// A data manager that does nothing, for the `tx` workload: synchronous,
/// as the `transaction` package's are.
struct NoopDm(&'static str);

impl sagatx::transaction::SyncDataManager for NoopDm {
    fn sort_key(&self) -> String {
        self.0.to_string()
    }
    fn abort(&self, _: &sagatx::transaction::TxInfo) -> Result<(), sagatx::transaction::TxError> {
        Ok(())
    }
    fn tpc_begin(
        &self,
        _: &sagatx::transaction::TxInfo,
    ) -> Result<(), sagatx::transaction::TxError> {
        Ok(())
    }
    fn commit(&self, _: &sagatx::transaction::TxInfo) -> Result<(), sagatx::transaction::TxError> {
        Ok(())
    }
    fn tpc_vote(
        &self,
        _: &sagatx::transaction::TxInfo,
    ) -> Result<(), sagatx::transaction::TxError> {
        Ok(())
    }
    fn tpc_finish(
        &self,
        _: &sagatx::transaction::TxInfo,
    ) -> Result<(), sagatx::transaction::TxError> {
        Ok(())
    }
    fn tpc_abort(
        &self,
        _: &sagatx::transaction::TxInfo,
    ) -> Result<(), sagatx::transaction::TxError> {
        Ok(())
    }
}

/// In-process two-phase commit: begin, join one or three no-op data
/// managers, commit; and the retrying loop around one.
async fn tx(o: &Options, out: &mut Vec<Row>) -> Result<()> {
    use sagatx::transaction::{DataManager, SyncDataManager, TransactionLoop, TransactionManager};
    let n: usize = if o.quick { 2_000 } else { 1_000_000 };
    let dms: Vec<Arc<dyn SyncDataManager>> = vec![
        Arc::new(NoopDm("a")),
        Arc::new(NoopDm("b")),
        Arc::new(NoopDm("c")),
    ];
    // The same manager as a `DataManager`: each call boxes a future, as
    // an `async_trait` manager's does.
    let boxed: Arc<dyn DataManager> = Arc::new(NoopDm("a"));
    for (variant, k, sync) in [
        ("begin, join 1, commit", 1usize, true),
        ("begin, join 3, commit", 3, true),
        ("begin, join 1 (async DataManager), commit", 1, false),
    ] {
        progress(&format!("tx: {variant}, {n} transactions"));
        let cpu0 = cpu_seconds("self");
        let t = Instant::now();
        let mut lat = Vec::with_capacity(n.div_ceil(TIME_EVERY_FAST));
        let mut sampler = Sampler::new(TIME_EVERY_FAST, k as u64);
        // Begun by a manager that holds the current transaction, as the
        // peer's `tm.begin()` does.
        let tm = TransactionManager::new();
        for _ in 0..n {
            let t1 = sampler.start();
            let tx = tm.begin();
            if sync {
                for dm in &dms[..k] {
                    tx.join_sync(dm.clone()).map_err(|e| anyhow!("{e}"))?;
                }
            } else {
                tx.join(boxed.clone()).map_err(|e| anyhow!("{e}"))?;
            }
            tx.commit().await.map_err(|e| anyhow!("{e}"))?;
            if let Some(t1) = t1 {
                lat.push(t1.elapsed().as_secs_f64() * 1e6);
            }
        }
        let s = Sample {
            sagas: n,
            latencies_us: lat,
            seconds: t.elapsed().as_secs_f64(),
            cpu: cpu_seconds("self") - cpu0,
            bytes: None,
        };
        out.push(row(
            "tx",
            variant,
            1,
            s,
            "self",
            if sync {
                "begun by a TransactionManager (as the peer's tm.begin()), no-op SyncDataManagers joined with join_sync (synchronous, as the peer's are), one task"
            } else {
                "begun by a TransactionManager, one no-op manager joined as a DataManager (join): four boxed futures a commit, as an async_trait manager makes; one task"
            },
        ));
    }
    progress(&format!("tx: the retrying loop, {n} transactions"));
    let lp = TransactionLoop::builder().build();
    let cpu0 = cpu_seconds("self");
    let t = Instant::now();
    let mut lat = Vec::with_capacity(n.div_ceil(TIME_EVERY_FAST));
    let mut sampler = Sampler::new(TIME_EVERY_FAST, 7);
    for _ in 0..n {
        let t1 = sampler.start();
        let dm = dms[0].clone();
        lp.run(|tx| {
            let r = tx
                .join_sync(dm.clone())
                .map_err(|e| sagatx::transaction::TxError::permanent(e.to_string()));
            async move { r }
        })
        .await
        .map_err(|e| anyhow!("{e}"))?;
        if let Some(t1) = t1 {
            lat.push(t1.elapsed().as_secs_f64() * 1e6);
        }
    }
    let s = Sample {
        sagas: n,
        latencies_us: lat,
        seconds: t.elapsed().as_secs_f64(),
        cpu: cpu_seconds("self") - cpu0,
        bytes: None,
    };
    out.push(row(
        "tx",
        "TransactionLoop, join 1",
        1,
        s,
        "self",
        "no-op SyncDataManager",
    ));
    Ok(())
}

/// The script that runs the Python peers.
fn peers_script() -> String {
    std::env::var("SAGATX_PEERS")
        .unwrap_or_else(|_| concat!(env!("CARGO_MANIFEST_DIR"), "/../../bench/peers/run").into())
}

/// One figure the peers' script printed.
struct PeerFigure {
    peer: String,
    workload: String,
    n: u64,
    per_second: f64,
    us_each: f64,
    note: String,
}

/// Runs the peers' script with `env` (`PEERS_SECONDS`, `PEERS_ONLY`) and
/// `args` (which peers), and reads the figures it prints.
async fn run_peers(env: &[(&str, &str)], args: &[&str]) -> Result<Vec<PeerFigure>> {
    let script = peers_script();
    let output = tokio::process::Command::new(&script)
        .envs(env.iter().copied())
        .args(args)
        .stderr(Stdio::inherit())
        .output()
        .await
        .with_context(|| format!("cannot run {script}; set SAGATX_PEERS to bench/peers/run"))?;
    if !output.status.success() {
        bail!("{script} failed ({})", output.status);
    }
    let mut figures = Vec::new();
    for line in String::from_utf8_lossy(&output.stdout).lines() {
        let v: Value = serde_json::from_str(line)
            .with_context(|| format!("{script} printed something that is not JSON: {line}"))?;
        let (Some(peer), Some(workload), Some(per_second), Some(us_each), Some(n)) = (
            v["peer"].as_str(),
            v["workload"].as_str(),
            v["per_second"].as_f64(),
            v["us_each"].as_f64(),
            v["n"].as_u64(),
        ) else {
            bail!("{script} printed an incomplete row: {line}");
        };
        figures.push(PeerFigure {
            peer: peer.into(),
            workload: workload.into(),
            n,
            per_second,
            us_each,
            note: v["note"].as_str().unwrap_or("").into(),
        });
    }
    Ok(figures)
}

/// A row of a figure measured by the peers' script (or by sagatx in
/// rounds): the mean time in the p50 column.
fn mean_row(workload: &str, variant: String, n: u64, per_second: f64, note: String) -> Row {
    Row {
        workload: workload.into(),
        variant,
        concurrency: 1,
        sagas: n as usize,
        seconds: n as f64 / per_second,
        sagas_per_second: per_second,
        p50_us: 1e6 / per_second,
        p90_us: f64::NAN,
        p99_us: f64::NAN,
        max_us: f64::NAN,
        latencies_timed: 0,
        cpu_seconds_per_1000: f64::NAN,
        peak_rss_mib: f64::NAN,
        bytes_written_per_saga: None,
        note,
    }
}

/// The Python peers (bench/peers), run as a child process in this run;
/// then the two targets that the issue states as ratios measured again in
/// alternated rounds ([`paired`]).
async fn peers(o: &Options, out: &mut Vec<Row>) -> Result<()> {
    progress("peers: py-api-saga, minos-microservice-saga, transaction, nti.transactions");
    let seconds = if o.quick { "0.2" } else { "3" };
    for f in run_peers(&[("PEERS_SECONDS", seconds)], &[]).await? {
        let mut row = mean_row(
            "peers",
            format!("{}: {}", f.peer, f.workload),
            f.n,
            f.per_second,
            format!("mean µs in p50; {}", f.note),
        );
        row.p50_us = f.us_each;
        out.push(row);
    }
    paired(o, out).await
}

/// Rounds of the peers' alternation.
const PAIRED_ROUNDS: usize = 7;

/// The memory and tx targets are ratios to a Python peer, and this
/// machine's speed moves by up to 1.5x from one minute to the next, the
/// peers' too: a peer measured a minute after sagatx gave ratios from 7x
/// to 20x within one hour. So these two pairs are measured again in
/// alternated rounds, sagatx then the peer, about half a second each,
/// and each round's ratio is of two figures a second apart. The rows give
/// the medians; their notes the rounds' ratios, lowest, median, highest.
async fn paired(o: &Options, out: &mut Vec<Row>) -> Result<()> {
    use sagatx::transaction::{SyncDataManager, TransactionManager};
    let (rounds, seconds) = if o.quick {
        (1, 0.05)
    } else {
        (PAIRED_ROUNDS, 0.5)
    };
    let saga = three_sync("paired", false, Mode::Sequential)?;
    let dm: Arc<dyn SyncDataManager> = Arc::new(NoopDm("a"));
    let tm = TransactionManager::new();
    struct Pair {
        ours: &'static str,
        peer_args: &'static str,
        peer_workload: &'static str,
        us: Vec<(f64, f64)>,
        counts: (usize, u64),
        peer_name: String,
    }
    let mut pairs = [
        Pair {
            ours: "Saga::execute, 3 steps, sequential",
            peer_args: "py_api_saga",
            peer_workload: "memory: 3 steps, sequential",
            us: Vec::new(),
            counts: (0, 0),
            peer_name: String::new(),
        },
        Pair {
            ours: "tx: begin, join 1, commit",
            peer_args: "transaction_pkg",
            peer_workload: "tx: begin, join 1, commit",
            us: Vec::new(),
            counts: (0, 0),
            peer_name: String::new(),
        },
    ];
    // A warm-up of ours (the peers' script warms up in each run).
    for _ in 0..10_000 {
        saga.execute(Value::Null)
            .await
            .map_err(|e| anyhow!("a saga of the alternated rounds failed: {e:?}"))?;
    }
    for round in 0..rounds {
        progress(&format!(
            "peers: alternated rounds with Saga::execute and tx, {}/{rounds}",
            round + 1
        ));
        for (k, pair) in pairs.iter_mut().enumerate() {
            let t = Instant::now();
            let mut n = 0usize;
            while t.elapsed().as_secs_f64() < seconds {
                for _ in 0..1_000 {
                    if k == 0 {
                        saga.execute(Value::Null).await.map_err(|e| {
                            anyhow!("a saga of the alternated rounds failed: {e:?}")
                        })?;
                    } else {
                        let tx = tm.begin();
                        tx.join_sync(dm.clone()).map_err(|e| anyhow!("{e}"))?;
                        tx.commit().await.map_err(|e| anyhow!("{e}"))?;
                    }
                }
                n += 1_000;
            }
            let ours_us = t.elapsed().as_secs_f64() * 1e6 / n as f64;
            let figures = run_peers(
                &[
                    ("PEERS_SECONDS", &seconds.to_string()),
                    ("PEERS_ONLY", pair.peer_workload),
                ],
                &[pair.peer_args],
            )
            .await?;
            let [f] = figures.as_slice() else {
                bail!(
                    "the peers' script printed {} figures for {:?}, not one",
                    figures.len(),
                    pair.peer_workload
                );
            };
            pair.peer_name = f.peer.clone();
            pair.us.push((ours_us, f.us_each));
            pair.counts.0 += n;
            pair.counts.1 += f.n;
        }
    }
    // Each pair has one figure a round, and there is at least one round.
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
    };
    for pair in pairs {
        let ratios: Vec<f64> = pair.us.iter().map(|(a, b)| b / a).collect();
        let lowest = ratios.iter().copied().fold(f64::INFINITY, f64::min);
        let highest = ratios.iter().copied().fold(0.0, f64::max);
        let ratio = median(ratios);
        let note = format!(
            "{} alternated with {} ({}) in rounds of {seconds} s ({rounds}); the median µs of \
             the rounds in p50; the rounds' ratios {lowest:.1}x lowest, {ratio:.1}x median, \
             {highest:.1}x highest",
            pair.ours, pair.peer_name, pair.peer_workload
        );
        let ours = median(pair.us.iter().map(|u| u.0).collect());
        let theirs = median(pair.us.iter().map(|u| u.1).collect());
        out.push(mean_row(
            "paired",
            pair.ours.into(),
            pair.counts.0 as u64,
            1e6 / ours,
            note.clone(),
        ));
        out.push(mean_row(
            "paired",
            format!("{}: {}", pair.peer_name, pair.peer_workload),
            pair.counts.1,
            1e6 / theirs,
            note,
        ));
    }
    Ok(())
}

/// For each peer figure measured in this run, the sagatx figure of the
/// same workload and the ratio of their mean times.
pub fn ratios(rows: &[Row]) -> Option<String> {
    let find = |w: &str, v: &str| {
        rows.iter()
            .find(|r| r.workload == w && r.variant == v && r.concurrency == 1)
    };
    // The peers journal nothing: each is set first against sagatx's run
    // that journals nothing either (`Saga::execute`), then against the
    // engine's, which writes every transition to a `MemoryStore`.
    const EXECUTE: &str = "Saga::execute (nothing journaled)";
    const ENGINE: &str = "Engine::run on a MemoryStore (journaled)";
    let pairs = [
        (
            "3 steps, sequential, not journaled (Saga::execute)",
            EXECUTE,
            "py-api-saga 0.0.3: memory: 3 steps, sequential",
        ),
        (
            "3 steps, sequential",
            ENGINE,
            "py-api-saga 0.0.3: memory: 3 steps, sequential",
        ),
        (
            "3rd rejected, 2 compensations, not journaled (Saga::execute)",
            EXECUTE,
            "py-api-saga 0.0.3: memory: 3rd rejected, 2 compensations",
        ),
        (
            "3rd rejected, 2 compensations",
            ENGINE,
            "py-api-saga 0.0.3: memory: 3rd rejected, 2 compensations",
        ),
        (
            "3 steps, sequential, not journaled (Saga::execute)",
            EXECUTE,
            "minos-microservice-saga 0.7.0: memory: 3 steps, sequential",
        ),
        (
            "3 steps, sequential",
            ENGINE,
            "minos-microservice-saga 0.7.0: memory: 3 steps, sequential",
        ),
        (
            "begin, join 1, commit",
            "TransactionManager",
            "transaction 5.1: tx: begin, join 1, commit",
        ),
        (
            "begin, join 3, commit",
            "TransactionManager",
            "transaction 5.1: tx: begin, join 3, commit",
        ),
        (
            "TransactionLoop, join 1",
            "TransactionLoop",
            "nti.transactions 5.2: tx: TransactionLoop, join 1",
        ),
    ];
    let mut t = comfy_table::Table::new();
    t.load_style(comfy_table::presets::UTF8_FULL_CONDENSED);
    t.set_header([
        "peer and workload",
        "peer µs",
        "sagatx",
        "sagatx µs",
        "sagatx is faster by",
    ]);
    let mut any = false;
    for (v, label, peer) in pairs {
        let w = if label.starts_with("Transaction") {
            "tx"
        } else {
            "memory"
        };
        let (Some(ours), Some(theirs)) = (find(w, v), find("peers", peer)) else {
            continue;
        };
        let (a, b) = (1e6 / ours.sagas_per_second, 1e6 / theirs.sagas_per_second);
        t.add_row([
            peer.to_string(),
            format!("{b:.2}"),
            label.to_string(),
            format!("{a:.2}"),
            format!("{:.2}×", b / a),
        ]);
        any = true;
    }
    // The alternated rounds: sagatx's row, then the peer's.
    let paired: Vec<&Row> = rows.iter().filter(|r| r.workload == "paired").collect();
    for pair in paired.chunks_exact(2) {
        let (ours, theirs) = (pair[0], pair[1]);
        t.add_row([
            format!("{} (alternated rounds, medians)", theirs.variant),
            format!("{:.2}", theirs.p50_us),
            ours.variant.clone(),
            format!("{:.2}", ours.p50_us),
            format!("{:.2}× (of the medians)", theirs.p50_us / ours.p50_us),
        ]);
        any = true;
    }
    any.then(|| t.to_string())
}

/// A figure for the table; "–" when not measured.
fn num(x: f64, decimals: usize) -> String {
    if x.is_finite() {
        format!("{x:.decimals$}")
    } else {
        "–".into()
    }
}

/// What the machine could do when the run was made, measured in the run
/// itself. This machine's speed moves by up to 3x from one hour to the
/// next (BENCHMARKS.md), with its disk's fsync and its CPU: with these
/// beside the rows, a slow hour tells itself apart from a slow change.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Machine {
    pub cpus: usize,
    /// fsyncs timed, each after a 4 KiB overwrite of a 1 MiB file in the
    /// temporary directory, where the workloads make their stores.
    pub fsyncs: usize,
    pub fsync_p50_us: f64,
    pub fsync_p90_us: f64,
    pub fsync_p99_us: f64,
    /// Nanoseconds per step of a fixed CPU-only loop (a chain of xorshift
    /// steps, each waiting on the last): lower is a faster CPU.
    pub cpu_probe_ns: f64,
}

impl Machine {
    /// One line for the table's reader.
    pub fn line(&self) -> String {
        format!(
            "machine: {} CPUs; fsync after a 4 KiB overwrite p50 {:.0} µs (p90 {:.0}, p99 {:.0}; {} timed); CPU probe {:.2} ns a step",
            self.cpus,
            self.fsync_p50_us,
            self.fsync_p90_us,
            self.fsync_p99_us,
            self.fsyncs,
            self.cpu_probe_ns
        )
    }
}

/// Measures the [`Machine`]: a fraction of a second (500 fsyncs and 50
/// million loop steps; 20 and one million when `quick`).
pub fn machine(quick: bool) -> Result<Machine> {
    use std::io::{Seek, SeekFrom, Write};
    let dir = tempfile::tempdir().context("a temporary directory for the fsync probe")?;
    let path = dir.path().join("fsync-probe");
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)
        .with_context(|| format!("creating {}", path.display()))?;
    let io = |e: std::io::Error| anyhow!("the fsync probe on {}: {e}", path.display());
    f.set_len(1 << 20).map_err(io)?;
    f.sync_all().map_err(io)?;
    let block = [0x5a_u8; 4096];
    let n = if quick { 20 } else { 500 };
    let mut fsync_us = Vec::with_capacity(n);
    for i in 0..n {
        f.seek(SeekFrom::Start((i % 256) as u64 * 4096))
            .map_err(io)?;
        f.write_all(&block).map_err(io)?;
        let t = Instant::now();
        f.sync_all().map_err(io)?;
        fsync_us.push(t.elapsed().as_secs_f64() * 1e6);
    }
    fsync_us.sort_by(f64::total_cmp);
    let steps: u64 = if quick { 1_000_000 } else { 50_000_000 };
    let t = Instant::now();
    let mut x = std::hint::black_box(0x9E37_79B9_7F4A_7C15_u64);
    for _ in 0..steps {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
    }
    std::hint::black_box(x);
    let cpu_probe_ns = t.elapsed().as_secs_f64() * 1e9 / steps as f64;
    Ok(Machine {
        cpus: std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1),
        fsyncs: n,
        fsync_p50_us: percentile(&fsync_us, 0.50),
        fsync_p90_us: percentile(&fsync_us, 0.90),
        fsync_p99_us: percentile(&fsync_us, 0.99),
        cpu_probe_ns,
    })
}

/// Adds to the note of each durable row at concurrency 1 its p50 counted
/// in the machine's fsyncs (the probe's p50). A saga there is a few
/// commits in a row, each with one fsync, so the count says how close the
/// p50 is to what the disk of the hour allows, whatever that disk is (a
/// 3-step saga is four commits: a p50 near 4 is all disk).
pub fn relate_to_machine(rows: &mut [Row], m: &Machine) {
    // No count without a probe that took time (a NaN or zero p50).
    if m.fsync_p50_us.is_nan() || m.fsync_p50_us <= 0.0 {
        return;
    }
    for r in rows
        .iter_mut()
        .filter(|r| r.concurrency == 1 && matches!(r.workload.as_str(), "sqlite" | "postgres"))
    {
        let fsyncs = r.p50_us / m.fsync_p50_us;
        r.note
            .push_str(&format!("; p50 {fsyncs:.1} fsyncs of the machine's probe"));
    }
}

/// Runs the chosen workloads.
pub async fn run(o: &Options) -> Result<Vec<Row>> {
    o.check()?;
    let mut out = Vec::new();
    for w in &o.workloads {
        match w.as_str() {
            "memory" => memory(o, &mut out).await?,
            "sqlite" => sqlite(o, &mut out).await?,
            "http" => http(o, &mut out).await?,
            "recovery" => recovery(o, &mut out).await?,
            "idle" => idle(o, &mut out).await?,
            "postgres" => postgres(o, &mut out).await?,
            "tx" => tx(o, &mut out).await?,
            "peers" => peers(o, &mut out).await?,
            other => bail!(
                "no workload {other:?}; choose from {}, postgres, peers",
                ALL.join(", ")
            ),
        }
    }
    Ok(out)
}

/// The summary table.
pub fn table(rows: &[Row]) -> String {
    use comfy_table::{presets::UTF8_FULL_CONDENSED, Table};
    let mut t = Table::new();
    t.load_style(UTF8_FULL_CONDENSED).set_header([
        "workload",
        "variant",
        "conc",
        "sagas",
        "sagas/s",
        "p50 µs",
        "p90 µs",
        "p99 µs",
        "max µs",
        "CPU s/1k",
        "peak RSS MiB",
        "bytes/saga",
    ]);
    for r in rows {
        t.add_row([
            r.workload.clone(),
            r.variant.clone(),
            r.concurrency.to_string(),
            r.sagas.to_string(),
            format!("{:.0}", r.sagas_per_second),
            format!("{:.0}", r.p50_us),
            num(r.p90_us, 0),
            num(r.p99_us, 0),
            num(r.max_us, 0),
            num(r.cpu_seconds_per_1000, 3),
            num(r.peak_rss_mib, 1),
            r.bytes_written_per_saga
                .map(|b| format!("{b:.0}"))
                .unwrap_or_else(|| "-".into()),
        ]);
    }
    t.to_string()
}

/// The rows' notes, for below the table (what each row measured and how:
/// the table has no room for them): one line per run of rows of one
/// workload with the same note.
pub fn notes(rows: &[Row]) -> String {
    let mut out = String::new();
    let mut i = 0;
    while i < rows.len() {
        let r = &rows[i];
        let same = rows[i..]
            .iter()
            .take_while(|o| o.workload == r.workload && o.note == r.note)
            .count();
        if !r.note.is_empty() {
            let which = match same {
                1 => format!("{}, {}, c={}", r.workload, r.variant, r.concurrency),
                n => format!("{} ({n} rows)", r.workload),
            };
            out.push_str(&format!("  {which}: {}\n", r.note));
        }
        i += same;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn noted(workload: &str, variant: &str, c: usize, note: &str) -> Row {
        Row {
            workload: workload.into(),
            variant: variant.into(),
            concurrency: c,
            sagas: 1,
            seconds: 1.0,
            sagas_per_second: 1.0,
            p50_us: 1.0,
            p90_us: 1.0,
            p99_us: 1.0,
            max_us: 1.0,
            latencies_timed: 1,
            cpu_seconds_per_1000: 0.0,
            peak_rss_mib: 0.0,
            bytes_written_per_saga: None,
            note: note.into(),
        }
    }

    /// Rows of one workload that share a note share its line; a row with a
    /// note of its own gets its own line, named; rows without a note none.
    #[test]
    fn notes_go_one_line_per_run_of_rows_with_the_same_note() {
        let rows = [
            noted("memory", "a", 1, "in-process"),
            noted("memory", "a", 64, "in-process"),
            noted("sqlite", "b", 1, "4.00 commits"),
            noted("sqlite", "b", 64, "0.00 commits"),
            noted("tx", "c", 1, ""),
            noted("http", "d", 1, "in-process"),
        ];
        assert_eq!(
            notes(&rows),
            "  memory (2 rows): in-process\n  sqlite, b, c=1: 4.00 commits\n  \
             sqlite, b, c=64: 0.00 commits\n  http, d, c=1: in-process\n"
        );
    }

    /// Each peer is set against sagatx's run that journals nothing and,
    /// on its own line, the journaled engine's, each labelled; a pair
    /// with a row missing is left out.
    #[test]
    fn the_side_by_side_table_names_which_sagatx_run_each_peer_meets() {
        let at = |workload: &str, variant: &str, per_second: f64| Row {
            sagas_per_second: per_second,
            ..noted(workload, variant, 1, "")
        };
        let rows = [
            at(
                "memory",
                "3 steps, sequential, not journaled (Saga::execute)",
                2_000_000.0,
            ),
            at("memory", "3 steps, sequential", 250_000.0),
            at(
                "peers",
                "py-api-saga 0.0.3: memory: 3 steps, sequential",
                200_000.0,
            ),
            at("tx", "begin, join 1, commit", 4_000_000.0),
        ];
        let table = ratios(&rows).expect("a table");
        let line = |label: &str| {
            table
                .lines()
                .find(|l| l.contains("py-api-saga") && l.contains(label))
                .unwrap_or_else(|| panic!("no line for {label} in\n{table}"))
                .to_string()
        };
        let execute = line("Saga::execute (nothing journaled)");
        assert!(
            execute.contains("5.00") && execute.contains("0.50") && execute.contains("10.00×"),
            "{execute}"
        );
        let engine = line("Engine::run on a MemoryStore (journaled)");
        assert!(
            engine.contains("4.00") && engine.contains("1.25×"),
            "{engine}"
        );
        assert!(
            !table.contains("transaction 5.1"),
            "no peer row for tx: {table}"
        );
        assert_eq!(ratios(&rows[..2]), None, "no peer at all");
    }

    /// The sampler times about one saga in 16, and not in step with
    /// anything periodic: of sagas marked every 16th (as a caller that
    /// yields every 16 sagas would be), it times about as large a share as
    /// of the others, where a fixed stride would time all or none.
    #[test]
    fn the_sampler_picks_one_in_16_out_of_step_with_any_period() {
        let mut s = Sampler::new(16, 3);
        let (mut picked, mut marked_picked) = (0, 0);
        let n = 160_000;
        for k in 0..n {
            if s.pick() {
                picked += 1;
                if k % 16 == 5 {
                    marked_picked += 1;
                }
            }
        }
        assert!((9_000..11_000).contains(&picked), "{picked} of {n}");
        // 10,000 marked sagas: about 625 picked.
        assert!((500..750).contains(&marked_picked), "{marked_picked}");
        let mut every = Sampler::new(1, 0);
        assert!((0..100).all(|_| every.pick()));
    }

    /// The progress bar's count reaches exactly the sagas a stage runs
    /// (warm-up and measurement, split over the callers), so that the bar
    /// ends full, not short or past its end.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_progress_counts_every_saga_of_a_stage() -> Result<()> {
        let engine = Engine::builder()
            .store(MemoryStore::new())
            .saga(three("ok", false, Mode::Sequential)?)
            .build()
            .await?;
        let (n, c) = (100, 7);
        let total = stage_sagas(n, c);
        let s = {
            let _stage = stage("test", total);
            measure(&engine, "ok", n, c, Status::Completed, 1).await?
        };
        assert_eq!(DONE.load(Ordering::Relaxed), total as u64);
        // 7 callers of 15 sagas each after a warm-up of 2 each.
        assert_eq!(total, 14 + 105);
        assert_eq!(s.sagas, 105);
        assert_eq!(s.latencies_us.len(), 105, "every saga timed");
        Ok(())
    }
}
