//! The store conformance suite: written once against [`Store`], run against
//! every implementation. A store is correct when [`run`] returns `Ok`.
//!
//! The suite uses saga names and ids of its own (prefixed with a random
//! tag), so it can run on a store that holds other data.

use std::collections::HashSet;
use std::sync::Arc;

use sagatx_core::{Env, Event, Execution, ExecutionId, Phase, SagaDefinition, Status, StepError};
use serde_json::json;
use uuid::Uuid;

use super::{ListQuery, Paused, Store, StoreError};

macro_rules! ensure {
    ($cond:expr, $($msg:tt)+) => {
        if !$cond {
            return Err(format!("{}:{}: {}", file!(), line!(), format!($($msg)+)));
        }
    };
}

type R = Result<(), String>;

fn e<E: std::fmt::Display>(what: &str) -> impl FnOnce(E) -> String + '_ {
    move |err| format!("{what}: {err}")
}

fn def(name: &str, steps: usize, callback: bool) -> SagaDefinition {
    let steps: Vec<String> = (0..steps)
        .map(|i| {
            let reply = if callback && i == 0 {
                r#","reply":"callback""#
            } else {
                ""
            };
            format!(r#"{{"name":"s{i}","action":"local","compensation":"local"{reply}}}"#)
        })
        .collect();
    SagaDefinition::from_json(
        format!(r#"{{"name":"{name}","steps":[{}]}}"#, steps.join(",")).as_bytes(),
    )
    .unwrap_or_else(|e| panic!("the suite's own definition is valid: {e}"))
}

const ENV: Env = Env {
    now_ms: 1_000,
    random01: 0.5,
};

/// A started execution (status running, first call in flight), seq 1.
fn started(d: &SagaDefinition, id: ExecutionId) -> Execution {
    let mut ex = Execution::new(
        id,
        d,
        1,
        json!({"n": id.to_string()}),
        Some("suite".into()),
        1_000,
    );
    let _ = ex.handle(d, Event::Start, ENV);
    ex.seq = 1;
    ex
}

fn step(ex: &mut Execution, d: &SagaDefinition, ev: Event) -> Result<(), String> {
    step_at(ex, d, ev, ENV.now_ms)
}

/// [`step`] at time `now_ms`.
fn step_at(ex: &mut Execution, d: &SagaDefinition, ev: Event, now_ms: u64) -> Result<(), String> {
    let env = Env {
        now_ms,
        random01: 0.5,
    };
    let t = ex.handle(d, ev, env).map_err(e("suite transition"))?;
    if t.changed {
        ex.seq += 1;
    }
    Ok(())
}

/// Delivers the outcome of step `i`'s action call in flight.
fn act(
    ex: &mut Execution,
    d: &SagaDefinition,
    i: usize,
    outcome: Result<serde_json::Value, StepError>,
) -> Result<(), String> {
    act_at(ex, d, i, outcome, ENV.now_ms)
}

/// [`act`] at time `now_ms`.
fn act_at(
    ex: &mut Execution,
    d: &SagaDefinition,
    i: usize,
    outcome: Result<serde_json::Value, StepError>,
    now_ms: u64,
) -> Result<(), String> {
    let ev = Event::Outcome {
        step: i,
        phase: Phase::Action,
        attempt: ex.steps[i].attempts,
        outcome,
    };
    step_at(ex, d, ev, now_ms)
}

/// Runs every check against `store`.
pub async fn run(store: Arc<dyn Store>) -> R {
    let tag = Uuid::new_v4().simple().to_string()[..8].to_string();
    definitions(&*store, &tag).await?;
    append_and_load(&*store, &tag).await?;
    list_and_page(&*store, &tag).await?;
    due_and_unfinished(&*store, &tag).await?;
    due_in_order(&*store, &tag).await?;
    paused_longest_first(&*store, &tag).await?;
    concurrent_writers(store.clone(), &tag).await?;
    long_execution(&*store, &tag).await?;
    secret(&*store).await?;
    oplog(&*store, &tag).await?;
    import_and_scan(&*store, &tag).await?;
    summary(&*store, &tag).await?;
    Ok(())
}

/// Appends every one of `exs` at once.
async fn append_all(store: &dyn Store, exs: &[Execution], what: &str) -> R {
    for r in futures_util::future::join_all(exs.iter().map(|ex| store.append(ex))).await {
        r.map_err(e(what))?;
    }
    Ok(())
}

/// The summary's counts are the executions' own: after creations,
/// changes of status, transitions that keep the status, a refused stale
/// write and an import, each written many at a time (so that a store which
/// batches writes batches these), the counts by status equal what listing
/// every execution of the saga finds.
async fn summary(store: &dyn Store, tag: &str) -> R {
    let d = def(&format!("conf-sum-{tag}"), 2, false);
    let mut exs: Vec<Execution> = (0..16)
        .map(|_| started(&d, ExecutionId(Uuid::now_v7())))
        .collect();
    append_all(store, &exs, "create").await?;
    // A quarter stays running with its first call in flight; a quarter
    // moves to its second step (still running); a quarter completes; a
    // quarter has its first step rejected.
    for (i, ex) in exs.iter_mut().enumerate() {
        match i % 4 {
            1 | 2 => act(ex, &d, 0, Ok(json!(i)))?,
            3 => act(ex, &d, 0, Err(StepError::permanent("402")))?,
            _ => {}
        }
    }
    let stale = exs[1].clone();
    let moved: Vec<Execution> = exs
        .iter()
        .enumerate()
        .filter(|(i, _)| i % 4 != 0)
        .map(|(_, ex)| ex.clone())
        .collect();
    append_all(store, &moved, "first outcome").await?;
    for ex in exs.iter_mut().skip(2).step_by(4) {
        act(ex, &d, 1, Ok(json!("done")))?;
    }
    let second: Vec<Execution> = exs.iter().skip(2).step_by(4).cloned().collect();
    append_all(store, &second, "second outcome").await?;
    ensure!(
        matches!(store.append(&stale).await, Err(StoreError::Conflict { .. })),
        "a stale write is refused"
    );
    let mut imported = started(&d, ExecutionId(Uuid::now_v7()));
    act(&mut imported, &d, 0, Ok(json!(1)))?;
    act(&mut imported, &d, 1, Ok(json!(2)))?;
    store.import(&imported).await.map_err(e("import"))?;

    let mut truth: Vec<(Status, u64)> = Vec::new();
    let mut cursor = None;
    loop {
        let page = store
            .list(&ListQuery {
                saga: Some(d.name.clone()),
                limit: 5,
                cursor,
                ..Default::default()
            })
            .await
            .map_err(e("list"))?;
        for ex in &page.items {
            match truth.iter_mut().find(|(s, _)| *s == ex.status) {
                Some((_, n)) => *n += 1,
                None => truth.push((ex.status, 1)),
            }
        }
        cursor = page.next_cursor;
        if cursor.is_none() {
            break;
        }
    }
    ensure!(
        truth.len() >= 3 && truth.iter().map(|t| t.1).sum::<u64>() == 17,
        "the suite's executions are all listed, in three statuses at least: {truth:?}"
    );
    let s = store.summary().await.map_err(e("summary"))?;
    let mut mine: Vec<(Status, u64)> = s
        .counts
        .iter()
        .filter(|c| c.0 == d.name)
        .map(|c| (c.1, c.2))
        .collect();
    let key = |t: &(Status, u64)| t.0.as_str();
    mine.sort_by_key(key);
    truth.sort_by_key(key);
    ensure!(
        mine == truth,
        "counts by saga and status: summary {mine:?}, executions {truth:?}"
    );
    ensure!(
        s.counts
            .windows(2)
            .all(|w| (w[0].0.as_str(), w[0].1.as_str()) < (w[1].0.as_str(), w[1].1.as_str())),
        "the summary is sorted by saga, then status, each pair once"
    );
    Ok(())
}

async fn import_and_scan(store: &dyn Store, tag: &str) -> R {
    let d = def(&format!("conf-import-{tag}"), 2, false);
    // An execution some transitions along, as another store held it.
    let mut ex = started(&d, ExecutionId(Uuid::now_v7()));
    ex.seq = 7;
    store.import(&ex).await.map_err(e("import"))?;
    let got = store.load(ex.id).await.map_err(e("load"))?;
    ensure!(
        got.as_ref() == Some(&ex),
        "import keeps the state and its seq"
    );
    ensure!(
        matches!(store.import(&ex).await, Err(StoreError::Exists(_))),
        "importing twice fails"
    );
    let mut next = ex.clone();
    act(&mut next, &d, 0, Ok(json!(1)))?;
    ensure!(next.seq == 8, "one transition after the import");
    store
        .append(&next)
        .await
        .map_err(e("append after import"))?;
    // Scan: every execution once, oldest first.
    let mut seen = Vec::new();
    let mut cursor = None;
    loop {
        let page = store.scan(cursor, 7).await.map_err(e("scan"))?;
        ensure!(page.items.len() <= 7, "scan respects its limit");
        seen.extend(page.items.iter().map(|x| x.id));
        cursor = page.next_cursor;
        if cursor.is_none() {
            break;
        }
    }
    let unique: HashSet<_> = seen.iter().collect();
    ensure!(
        unique.len() == seen.len(),
        "scan returned an execution twice"
    );
    ensure!(
        seen.last() == Some(&ex.id),
        "the newest comes last in a scan"
    );
    let all = store
        .list(&ListQuery {
            limit: 1000,
            ..Default::default()
        })
        .await
        .map_err(e("list"))?;
    ensure!(
        all.items.len() == seen.len().min(1000),
        "scan and list see the same executions"
    );
    // The secret can be replaced (and is put back).
    let old = store.secret().await.map_err(e("secret"))?;
    store
        .import_secret([9; 32])
        .await
        .map_err(e("import secret"))?;
    ensure!(
        store.secret().await.map_err(e("secret"))? == [9; 32],
        "imported secret"
    );
    store
        .import_secret(old)
        .await
        .map_err(e("restore secret"))?;
    Ok(())
}

async fn oplog(store: &dyn Store, tag: &str) -> R {
    let name = format!("conf-op-{tag}");
    let before: Vec<u64> = store
        .op_pending(None, 100_000)
        .await
        .map_err(e("pending"))?
        .iter()
        .map(|o| o.id)
        .collect();
    let a = store
        .op_record(&name, &json!({"n": 1}), 5)
        .await
        .map_err(e("record a"))?;
    let b = store
        .op_record(&name, &json!([1, "x"]), 6)
        .await
        .map_err(e("record b"))?;
    let c = store
        .op_record(&name, &json!(null), 7)
        .await
        .map_err(e("record c"))?;
    ensure!(a < b && b < c, "ids grow: {a} {b} {c}");
    store.op_finish(b, None, 8).await.map_err(e("finish b"))?;
    store
        .op_finish(b, Some("again"), 9)
        .await
        .map_err(e("finish b twice"))?;
    store
        .op_finish(c, Some("failed for good"), 9)
        .await
        .map_err(e("finish c"))?;
    let pending = store
        .op_pending(None, 100_000)
        .await
        .map_err(e("pending"))?;
    let mine: Vec<_> = pending.iter().filter(|o| !before.contains(&o.id)).collect();
    ensure!(
        mine.len() == 1 && mine[0].id == a,
        "only a is pending: {mine:?}"
    );
    ensure!(
        mine[0].name == name && mine[0].args == json!({"n": 1}) && mine[0].created_at_ms == 5,
        "the record keeps its name, arguments and time: {:?}",
        mine[0]
    );
    let after = store
        .op_pending(Some(a), 100_000)
        .await
        .map_err(e("pending after"))?;
    ensure!(!after.iter().any(|o| o.id == a), "after excludes it");
    store.op_finish(a, None, 10).await.map_err(e("finish a"))?;
    Ok(())
}

async fn secret(store: &dyn Store) -> R {
    let a = store.secret().await.map_err(e("secret"))?;
    let b = store.secret().await.map_err(e("secret again"))?;
    ensure!(a == b, "the secret does not change");
    ensure!(a != [0u8; 32], "the secret is random, not zero");
    Ok(())
}

async fn definitions(store: &dyn Store, tag: &str) -> R {
    let name = format!("conf-def-{tag}");
    let d1 = def(&name, 2, false);
    let r = store.put_definition(&d1).await.map_err(e("put v1"))?;
    ensure!(
        r.version == 1 && r.created,
        "first put gives v1 created, got {r:?}"
    );
    let r = store.put_definition(&d1).await.map_err(e("put v1 again"))?;
    ensure!(
        r.version == 1 && !r.created,
        "an equal definition keeps v1, got {r:?}"
    );
    let d2 = def(&name, 3, false);
    let r = store.put_definition(&d2).await.map_err(e("put v2"))?;
    ensure!(
        r.version == 2 && r.created,
        "a different definition gives v2, got {r:?}"
    );
    let latest = store
        .get_definition(&name, None)
        .await
        .map_err(e("get latest"))?;
    ensure!(
        latest == Some((2, d2.clone())),
        "latest is v2, got {latest:?}"
    );
    let v1 = store
        .get_definition(&name, Some(1))
        .await
        .map_err(e("get v1"))?;
    ensure!(v1 == Some((1, d1.clone())), "v1 is kept, got {v1:?}");
    let none = store
        .get_definition(&name, Some(3))
        .await
        .map_err(e("get v3"))?;
    ensure!(none.is_none(), "no v3, got {none:?}");
    let none = store
        .get_definition(&format!("conf-none-{tag}"), None)
        .await
        .map_err(e("get unknown"))?;
    ensure!(none.is_none(), "unknown name gives None");
    // Going back to the first body makes a third version: versions only grow.
    let r = store
        .put_definition(&d1)
        .await
        .map_err(e("put v1 body again"))?;
    ensure!(
        r.version == 3 && r.created,
        "the old body again is v3, got {r:?}"
    );
    let list = store.list_definitions().await.map_err(e("list"))?;
    ensure!(
        list.contains(&(name.clone(), 3)),
        "list holds {name} at v3: {list:?}"
    );
    let names: Vec<&String> = list.iter().map(|(n, _)| n).collect();
    let mut sorted = names.clone();
    sorted.sort();
    ensure!(names == sorted, "list is sorted by name");
    Ok(())
}

async fn append_and_load(store: &dyn Store, tag: &str) -> R {
    let d = def(&format!("conf-append-{tag}"), 2, false);
    let id = ExecutionId(Uuid::now_v7());
    let mut ex = started(&d, id);
    store.append(&ex).await.map_err(e("create"))?;
    let got = store.load(id).await.map_err(e("load"))?;
    ensure!(got.as_ref() == Some(&ex), "load gives what was written");
    match store.append(&ex).await {
        Err(StoreError::Exists(x)) => ensure!(x == id, "Exists names the id"),
        other => {
            return Err(format!(
                "creating twice must fail with Exists, got {other:?}"
            ))
        }
    }
    let before = ex.clone();
    act(&mut ex, &d, 0, Ok(json!({"r": 1})))?;
    ensure!(ex.seq == 2, "one transition");
    store.append(&ex).await.map_err(e("update"))?;
    let got = store.load(id).await.map_err(e("load 2"))?;
    ensure!(got.as_ref() == Some(&ex), "load gives the update");
    // A stale writer (seq 2 again, from the old state) is fenced out.
    let mut stale = before.clone();
    stale.seq = 2;
    stale.input = std::sync::Arc::new(json!("stale"));
    match store.append(&stale).await {
        Err(StoreError::Conflict {
            expected: 1,
            found: Some(2),
            ..
        }) => {}
        other => return Err(format!("a stale write must conflict, got {other:?}")),
    }
    let mut ahead = ex.clone();
    ahead.seq = 9;
    ensure!(
        matches!(store.append(&ahead).await, Err(StoreError::Conflict { .. })),
        "a write that skips sequence numbers must conflict"
    );
    let mut ghost = ex.clone();
    ghost.id = ExecutionId(Uuid::now_v7());
    ghost.seq = 2;
    ensure!(
        matches!(
            store.append(&ghost).await,
            Err(StoreError::Conflict { found: None, .. })
        ),
        "updating an unknown execution must conflict"
    );
    let got = store.load(id).await.map_err(e("load 3"))?;
    ensure!(got.as_ref() == Some(&ex), "rejected writes change nothing");
    let none = store
        .load(ExecutionId(Uuid::now_v7()))
        .await
        .map_err(e("load unknown"))?;
    ensure!(none.is_none(), "an unknown id loads as None");
    Ok(())
}

async fn list_and_page(store: &dyn Store, tag: &str) -> R {
    let da = def(&format!("conf-list-a-{tag}"), 1, false);
    let db = def(&format!("conf-list-b-{tag}"), 1, false);
    let mut written = Vec::new();
    for i in 0..25 {
        let d = if i % 2 == 0 { &da } else { &db };
        let mut ex = started(d, ExecutionId(Uuid::now_v7()));
        store.append(&ex).await.map_err(e("create"))?;
        if i % 5 == 0 {
            act(&mut ex, d, 0, Ok(json!(i)))?;
            store.append(&ex).await.map_err(e("complete"))?;
        }
        written.push(ex);
    }
    // Newest first, every execution once, over pages of 4.
    let mut seen = Vec::new();
    let mut cursor = None;
    for _ in 0..100 {
        let page = store
            .list(&ListQuery {
                saga: Some(da.name.clone()),
                limit: 4,
                cursor,
                ..Default::default()
            })
            .await
            .map_err(e("list page"))?;
        ensure!(page.items.len() <= 4, "a page holds at most limit items");
        seen.extend(page.items.iter().map(|x| x.id));
        cursor = page.next_cursor;
        if cursor.is_none() {
            break;
        }
    }
    let want: Vec<ExecutionId> = written
        .iter()
        .rev()
        .filter(|x| x.saga == da.name)
        .map(|x| x.id)
        .collect();
    ensure!(
        seen == want,
        "paging by saga visits each once, newest first: {} vs {}",
        seen.len(),
        want.len()
    );
    let done = store
        .list(&ListQuery {
            status: Some(Status::Completed),
            saga: Some(db.name.clone()),
            limit: 100,
            cursor: None,
        })
        .await
        .map_err(e("list completed"))?;
    let want: Vec<ExecutionId> = written
        .iter()
        .rev()
        .filter(|x| x.saga == db.name && x.status == Status::Completed)
        .map(|x| x.id)
        .collect();
    let got: Vec<ExecutionId> = done.items.iter().map(|x| x.id).collect();
    ensure!(
        got == want && !want.is_empty(),
        "status and saga filters combine: {got:?} vs {want:?}"
    );
    ensure!(
        done.next_cursor.is_none(),
        "a short last page has no cursor"
    );
    let all = store
        .list(&ListQuery {
            limit: 3,
            ..Default::default()
        })
        .await
        .map_err(e("list all"))?;
    ensure!(
        all.items.len() == 3 && all.next_cursor.is_some(),
        "an unfiltered page is full and has a cursor"
    );
    ensure!(all.items[0].id == written[24].id, "the newest comes first");
    Ok(())
}

async fn due_and_unfinished(store: &dyn Store, tag: &str) -> R {
    let d = def(&format!("conf-due-{tag}"), 2, true);
    // a: backing off (due at 1100); b: paused on a callback with no deadline;
    // c: terminal (cancelled before any call); f: running (in flight).
    let mut a = started(&d, ExecutionId(Uuid::now_v7()));
    store.append(&a).await.map_err(e("a"))?;
    act(&mut a, &d, 0, Err(StepError::transient("503")))?;
    store.append(&a).await.map_err(e("a2"))?;
    ensure!(
        a.next_due_ms() == Some(1_100),
        "a is due at 1100, got {:?}",
        a.next_due_ms()
    );
    let mut b = started(&d, ExecutionId(Uuid::now_v7()));
    store.append(&b).await.map_err(e("b"))?;
    act(&mut b, &d, 0, Ok(json!(null)))?;
    store.append(&b).await.map_err(e("b2"))?;
    ensure!(b.status == Status::Paused, "b is paused");
    let mut c = Execution::new(ExecutionId(Uuid::now_v7()), &d, 1, json!(null), None, 1_000);
    step(&mut c, &d, Event::Cancel)?;
    c.seq = 1;
    ensure!(c.status == Status::Compensated, "c is terminal");
    store.append(&c).await.map_err(e("c"))?;
    let f = started(&d, ExecutionId(Uuid::now_v7()));
    store.append(&f).await.map_err(e("f"))?;

    let due = store.due(1_099, 100).await.map_err(e("due early"))?;
    ensure!(
        !due.contains(&a.id),
        "nothing of ours is due before its time"
    );
    let due = store.due(1_100, 10_000).await.map_err(e("due"))?;
    ensure!(due.contains(&a.id), "a is due at its time");
    ensure!(
        !due.contains(&b.id) && !due.contains(&c.id) && !due.contains(&f.id),
        "only a is due"
    );
    let one = store.due(u64::MAX / 2, 1).await.map_err(e("due limit"))?;
    ensure!(one.len() == 1, "due respects its limit");

    // Unfinished: a and f (running), not b (paused) nor c (terminal);
    // paging visits each once.
    let mut seen = HashSet::new();
    let mut cursor = None;
    for _ in 0..100_000 {
        let page = store.unfinished(cursor, 2).await.map_err(e("unfinished"))?;
        ensure!(page.items.len() <= 2, "unfinished respects its limit");
        for x in &page.items {
            ensure!(seen.insert(x.id), "unfinished returned {} twice", x.id);
            ensure!(
                matches!(
                    x.status,
                    Status::Created | Status::Running | Status::Compensating
                ),
                "unfinished returned a {} execution",
                x.status
            );
        }
        cursor = page.next_cursor;
        if cursor.is_none() {
            break;
        }
    }
    ensure!(
        seen.contains(&a.id) && seen.contains(&f.id),
        "a and f are unfinished"
    );
    ensure!(
        !seen.contains(&b.id) && !seen.contains(&c.id),
        "b and c are not"
    );
    Ok(())
}

/// Due executions come earliest first, however the store keeps them (the
/// memory store in shards): a limit of `k` gives the `k` earliest.
async fn due_in_order(store: &dyn Store, tag: &str) -> R {
    let d = def(&format!("conf-due-order-{tag}"), 1, false);
    // Forty executions whose first call fails for a passing reason at
    // times 7 ms apart, made in a shuffled order: each is due 100 ms after
    // its failure (the default backoff, no jitter at random01 = 0.5).
    let base = 10_000_000;
    let mut mine = HashSet::new();
    for k in 0..40u64 {
        let failed_at = base + (k * 11 % 40) * 7;
        let mut ex = started(&d, ExecutionId(Uuid::now_v7()));
        store.append(&ex).await.map_err(e("create"))?;
        let seq = ex.seq;
        act_at(&mut ex, &d, 0, Err(StepError::transient("503")), failed_at)?;
        ensure!(ex.seq == seq + 1, "a failure is a transition");
        store.append(&ex).await.map_err(e("failure"))?;
        ensure!(
            ex.next_due_ms() == Some(failed_at + 100),
            "due 100 ms after the failure, got {:?}",
            ex.next_due_ms()
        );
        mine.insert(ex.id);
    }
    let now = u64::MAX / 2;
    let all = store.due(now, 100_000).await.map_err(e("due"))?;
    ensure!(
        mine.iter().all(|id| all.contains(id)),
        "every one of the forty is due"
    );
    let due_times = |ids: Vec<ExecutionId>| async move {
        let mut times = Vec::new();
        for id in ids {
            let ex = store.load(id).await.map_err(e("load"))?;
            times.push(
                ex.and_then(|x| x.next_due_ms())
                    .ok_or("a due execution has a due time")?,
            );
        }
        Ok::<_, String>(times)
    };
    let times = due_times(all.clone()).await?;
    ensure!(
        times.windows(2).all(|w| w[0] <= w[1]),
        "due executions come earliest first: {times:?}"
    );
    for k in [1, 5, 17] {
        let first = store.due(now, k).await.map_err(e("due with a limit"))?;
        ensure!(
            first.len() == k,
            "a limit of {k} gives {k}, got {}",
            first.len()
        );
        // By due times: executions due at the same time may come in
        // either order.
        let got = due_times(first).await?;
        ensure!(
            got == times[..k],
            "a limit of {k} gives the {k} earliest: {got:?} vs {:?}",
            &times[..k]
        );
    }
    Ok(())
}

/// `paused_before`: paused executions only, those paused at or before the
/// time asked, each with the time it paused, the longest paused first,
/// within the limit; one that goes on leaves the list. (Other checks'
/// executions share the store: the checks on order, times and status hold
/// for every item, those on membership for this check's own.)
async fn paused_longest_first(store: &dyn Store, tag: &str) -> R {
    let d = def(&format!("conf-paused-{tag}"), 2, true);
    // Twelve executions paused on their first step's callback at times
    // 7 ms apart, made in a shuffled order; the newest made first.
    let base = 2_000_000;
    let mut mine: Vec<(u64, Execution)> = Vec::new();
    for k in 0..12u64 {
        let paused_at = base + (k * 5 % 12) * 7;
        let mut ex = started(&d, ExecutionId(Uuid::now_v7()));
        store.append(&ex).await.map_err(e("create"))?;
        act_at(&mut ex, &d, 0, Ok(json!(null)), paused_at)?;
        ensure!(ex.status == Status::Paused, "paused on the callback");
        ensure!(ex.updated_at_ms == paused_at, "paused at {paused_at}");
        store.append(&ex).await.map_err(e("pause"))?;
        mine.push((paused_at, ex));
    }
    // A running execution, last written long before: never listed.
    let running = started(&d, ExecutionId(Uuid::now_v7()));
    store.append(&running).await.map_err(e("running"))?;
    mine.sort_by_key(|(at, _)| *at);
    let every: Vec<ExecutionId> = mine.iter().map(|(_, x)| x.id).collect();
    let ours = |items: &[Paused]| -> Vec<ExecutionId> {
        items
            .iter()
            .map(|p| p.execution.id)
            .filter(|id| every.contains(id))
            .collect()
    };
    // Every item is paused, since a time at or before the one asked, in
    // the order of those times; this check's own since the time they paused.
    let check = |items: &[Paused], before: u64| -> R {
        ensure!(
            items.iter().all(|p| p.execution.status == Status::Paused),
            "paused executions only"
        );
        ensure!(
            items.iter().all(|p| p.since_ms <= before),
            "paused at or before {before} only"
        );
        ensure!(
            items.windows(2).all(|w| w[0].since_ms <= w[1].since_ms),
            "the longest paused first"
        );
        for p in items {
            if let Some((at, _)) = mine.iter().find(|(_, x)| x.id == p.execution.id) {
                ensure!(p.since_ms == *at, "paused since {at}, not {}", p.since_ms);
                ensure!(
                    p.execution.updated_at_ms == *at,
                    "the execution as it was written"
                );
            }
        }
        ensure!(
            !items.iter().any(|p| p.execution.id == running.id),
            "a running execution is not listed"
        );
        Ok(())
    };
    // Every one paused at or before `before`, checked as above.
    let check = &check;
    let listed = |before: u64, what: &'static str| async move {
        let got = store
            .paused_before(before, 100_000)
            .await
            .map_err(e(what))?;
        check(&got, before)?;
        Ok::<_, String>(got)
    };
    let before = base + 6 * 7;
    let got = listed(before, "paused_before").await?;
    let expected = every[..7].to_vec();
    ensure!(
        ours(&got) == expected,
        "the seven paused at or before {before}, in the order they paused"
    );
    let all = listed(u64::MAX / 2, "paused_before all").await?;
    ensure!(ours(&all) == every, "all twelve, in the order they paused");
    for k in [1, 3] {
        let first = store
            .paused_before(u64::MAX / 2, k)
            .await
            .map_err(e("paused_before with a limit"))?;
        let key = |p: &Paused| (p.execution.id, p.since_ms);
        ensure!(
            first.iter().map(key).collect::<Vec<_>>()
                == all[..k].iter().map(key).collect::<Vec<_>>(),
            "a limit of {k} gives the {k} paused longest"
        );
    }
    // The one paused longest is cancelled: it goes on, and is not listed.
    let (at, mut gone) = mine[0].clone();
    step_at(&mut gone, &d, Event::Cancel, at + 1)?;
    ensure!(gone.status != Status::Paused, "cancelled");
    store.append(&gone).await.map_err(e("cancel"))?;
    let got = listed(before, "paused_before after a cancel").await?;
    ensure!(
        !got.iter().any(|p| p.execution.id == gone.id),
        "a cancelled execution is no longer paused"
    );
    ensure!(ours(&got) == expected[1..], "the other six as before");

    // Paused since its pause, not its last write: two callback steps at
    // once; it pauses when both calls are in, at `paused_at`, and a reply
    // to one later keeps it paused.
    let both = SagaDefinition::from_json(
        format!(
            r#"{{"name":"conf-paused-both-{tag}","mode":"concurrent","steps":[
                {{"name":"s0","action":"local","reply":"callback"}},
                {{"name":"s1","action":"local","reply":"callback"}}]}}"#
        )
        .as_bytes(),
    )
    .map_err(e("definition"))?;
    let mut two = started(&both, ExecutionId(Uuid::now_v7()));
    store.append(&two).await.map_err(e("two"))?;
    let paused_at = base + 3 * 7 + 1;
    for (i, at) in [(0, paused_at - 1), (1, paused_at)] {
        act_at(&mut two, &both, i, Ok(json!(null)), at)?;
        store.append(&two).await.map_err(e("call"))?;
    }
    ensure!(
        two.status == Status::Paused && two.updated_at_ms == paused_at,
        "paused when both calls are in"
    );
    let reply = Event::Reply {
        step: 0,
        reply: sagatx_core::Reply::Ok(json!(1)),
    };
    step_at(&mut two, &both, reply, base + 1_000)?;
    ensure!(
        two.status == Status::Paused,
        "still paused on the other step"
    );
    store.append(&two).await.map_err(e("reply"))?;
    let got = listed(before, "paused_before after a reply").await?;
    let listed = got.iter().find(|p| p.execution.id == two.id);
    ensure!(
        listed.is_some_and(|p| p.since_ms == paused_at && p.execution == two),
        "listed since it paused ({paused_at}), as last written: {listed:?}"
    );
    let at = got.iter().position(|p| p.execution.id == two.id);
    let after = got.iter().position(|p| p.execution.id == every[4]);
    let before_it = got.iter().position(|p| p.execution.id == every[3]);
    ensure!(
        at.is_some() && before_it < at && at < after,
        "listed by the time it paused, between those paused before and after it"
    );
    Ok(())
}

/// An execution of many transitions (retries among them), read back after
/// each write, by id and in a list, until it ends.
async fn long_execution(store: &dyn Store, tag: &str) -> R {
    let name = format!("conf-long-{tag}");
    let d = def(&name, 40, false);
    let mut ex = started(&d, ExecutionId(Uuid::now_v7()));
    store.append(&ex).await.map_err(e("create"))?;
    let mut writes = 1;
    for i in 0..40 {
        // A transient failure first on some steps: a retry is due, the
        // backoff fires, the retry succeeds.
        if i % 7 == 3 {
            act(&mut ex, &d, i, Err(StepError::transient("503")))?;
            store.append(&ex).await.map_err(e("failure"))?;
            let due = ex.next_due_ms().ok_or("a retry is due")?;
            let env = Env {
                now_ms: due,
                random01: 0.5,
            };
            let t = ex.handle(&d, Event::Tick, env).map_err(e("tick"))?;
            ensure!(t.changed, "the retry starts");
            ex.seq += 1;
            store.append(&ex).await.map_err(e("retry"))?;
            writes += 2;
        }
        act(
            &mut ex,
            &d,
            i,
            Ok(json!({"step": i, "text": "\"quoted\"\n"})),
        )?;
        store.append(&ex).await.map_err(e("update"))?;
        writes += 1;
        let got = store.load(ex.id).await.map_err(e("load"))?;
        ensure!(
            got.as_ref() == Some(&ex),
            "load after write {writes} (seq {}) gives the state written",
            ex.seq
        );
    }
    ensure!(
        ex.status == Status::Completed,
        "completed, got {}",
        ex.status
    );
    ensure!(ex.seq > 40, "many transitions: {}", ex.seq);
    let page = store
        .list(&ListQuery {
            saga: Some(name),
            limit: 10,
            ..Default::default()
        })
        .await
        .map_err(e("list"))?;
    ensure!(
        page.items.len() == 1 && page.items[0] == ex,
        "the list gives the last state"
    );
    Ok(())
}

async fn concurrent_writers(store: Arc<dyn Store>, tag: &str) -> R {
    let d = Arc::new(def(&format!("conf-conc-{tag}"), 3, false));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..64 {
        let store = store.clone();
        let d = d.clone();
        tasks.spawn(async move {
            let mut ex = started(&d, ExecutionId(Uuid::now_v7()));
            store.append(&ex).await.map_err(e("create"))?;
            for i in 0..3 {
                act(&mut ex, &d, i, Ok(json!(i)))?;
                store.append(&ex).await.map_err(e("update"))?;
            }
            Ok::<_, String>(ex)
        });
    }
    let mut n = 0;
    while let Some(r) = tasks.join_next().await {
        let ex = r.map_err(e("task"))??;
        let got = store.load(ex.id).await.map_err(e("load"))?;
        ensure!(
            got.as_ref() == Some(&ex),
            "every concurrent write is durable and readable"
        );
        ensure!(ex.status == Status::Completed, "completed");
        n += 1;
    }
    ensure!(n == 64, "all writers finished");
    Ok(())
}
