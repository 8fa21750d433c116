//! An in-memory store: the reference implementation of the trait, for tests
//! and the in-process benchmark. Nothing survives the process.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};

use async_trait::async_trait;
use sagatx_core::{Execution, ExecutionId, SagaDefinition, Status};

use super::{
    may_have_work, same_definition, ListQuery, Page, Paused, Registered, Store, StoreError,
};

/// The executions are spread over this many shards by id, each behind a
/// lock of its own. With one lock, two cores running sagas took turns at
/// it four times a saga, and each turn moved the maps' memory from one
/// core's cache to the other's: at concurrency 64 a saga cost about 1.8x
/// the CPU it cost at 1, and two cores gave no more sagas a second than
/// one (docs/benchmarks-log.md, twelfth session).
const SHARDS: usize = 32;

/// One shard's executions.
#[derive(Default)]
struct Shard {
    /// Insertion number → execution; the number is the list cursor.
    executions: BTreeMap<u64, Execution>,
    by_id: crate::idmap::IdMap<u64>,
    /// (due time, insertion number) of every execution with a due time.
    due: BTreeSet<(u64, u64)>,
    /// Insertion number → the time it paused, of every paused execution.
    paused: BTreeMap<u64, u64>,
}

impl Shard {
    /// Adds a new execution as number `n`.
    fn insert(&mut self, n: u64, ex: &Execution) {
        self.by_id.insert(ex.id, n);
        if let Some(d) = ex.next_due_ms() {
            self.due.insert((d, n));
        }
        if ex.status == Status::Paused {
            self.paused.insert(n, ex.updated_at_ms);
        }
        self.executions.insert(n, ex.clone());
    }
}

/// A store that keeps everything in memory (or, with a retention, every
/// execution but the oldest finished ones).
pub struct MemoryStore {
    shards: Box<[Mutex<Shard>]>,
    /// The last insertion number given out: unique across the shards, and
    /// taken under the lock of the shard that gets the execution, so a
    /// list (which holds every shard's lock) sees every number below the
    /// highest it sees.
    next: AtomicU64,
    definitions: Mutex<BTreeMap<String, Vec<SagaDefinition>>>,
    /// Operation log: id → (record, finished).
    ops: Mutex<BTreeMap<u64, (super::OpRecord, bool)>>,
    /// With a retention: the finished executions it may drop, oldest
    /// first, by insertion number and id.
    finished: Mutex<VecDeque<(u64, ExecutionId)>>,
    secret: Mutex<[u8; 32]>,
    keep_finished: Option<usize>,
}

impl Default for MemoryStore {
    fn default() -> Self {
        let mut secret = [0u8; 32];
        secret[..16].copy_from_slice(uuid::Uuid::new_v4().as_bytes());
        secret[16..].copy_from_slice(uuid::Uuid::new_v4().as_bytes());
        MemoryStore {
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
            next: AtomicU64::new(0),
            definitions: Mutex::default(),
            ops: Mutex::default(),
            finished: Mutex::default(),
            secret: Mutex::new(secret),
            keep_finished: None,
        }
    }
}

/// Locks `m`. A panic while holding one of the store's locks cannot leave
/// its maps half-updated (every update is a few inserts or removes that do
/// not panic), so a poisoned lock is usable.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The executions of every shard merged by insertion number: newest first
/// when `newest_first`, else oldest first; each shard's own iterator must
/// go in that order.
fn merged<'a, I>(
    mut each: Vec<std::iter::Peekable<I>>,
    newest_first: bool,
) -> impl Iterator<Item = (u64, &'a Execution)>
where
    I: Iterator<Item = (&'a u64, &'a Execution)>,
{
    std::iter::from_fn(move || {
        let mut best: Option<(usize, u64)> = None;
        for (i, it) in each.iter_mut().enumerate() {
            if let Some((&n, _)) = it.peek() {
                let better = match best {
                    None => true,
                    Some((_, b)) => (n > b) == newest_first,
                };
                if better {
                    best = Some((i, n));
                }
            }
        }
        let (i, _) = best?;
        each[i].next().map(|(&n, ex)| (n, ex))
    })
}

impl MemoryStore {
    pub fn new() -> Self {
        Self::default()
    }

    /// A store that keeps only the `keep` executions that most recently
    /// ended `completed` or `compensated`, and drops older ones as they
    /// finish (as a retention period drops closed workflows), so that a
    /// long-lived process that runs sagas in memory does not grow without
    /// bound. Unfinished executions, and `failed` ones (which wait for an
    /// operator's retry), are always kept.
    pub fn with_retention(keep: usize) -> Self {
        MemoryStore {
            keep_finished: Some(keep),
            ..Self::default()
        }
    }

    fn shard(&self, id: &ExecutionId) -> MutexGuard<'_, Shard> {
        // The last bytes of a UUID are random (v4 and v7 alike).
        let b = id.0.as_bytes();
        let i = u16::from_le_bytes([b[14], b[15]]) as usize % SHARDS;
        lock(&self.shards[i])
    }

    /// Every shard, locked in one order (the only place that holds more
    /// than one lock, so no two callers can wait on each other).
    fn lock_all(&self) -> Vec<MutexGuard<'_, Shard>> {
        self.shards.iter().map(lock).collect()
    }

    /// A page of the executions that `keep` takes, oldest first from
    /// `cursor` (inclusive), with the number of the first one left out.
    fn oldest_first(
        &self,
        cursor: Option<u64>,
        limit: usize,
        keep: impl Fn(&Execution) -> bool,
    ) -> Page {
        let all = self.lock_all();
        let lower = cursor.unwrap_or(0);
        let each = all
            .iter()
            .map(|s| s.executions.range(lower..).peekable())
            .collect();
        let mut items = Vec::new();
        let mut next_cursor = None;
        for (n, ex) in merged(each, false) {
            if !keep(ex) {
                continue;
            }
            if items.len() == limit {
                next_cursor = Some(n);
                break;
            }
            items.push(ex.clone());
        }
        Page { items, next_cursor }
    }

    /// Counts execution `n` as finished when `ex` is, and takes out the
    /// oldest finished execution beyond the retention (for the caller to
    /// free outside every lock). Called with no shard locked.
    fn retain(&self, n: u64, ex: &Execution) -> Option<Execution> {
        let keep = self.keep_finished?;
        if !matches!(ex.status, Status::Completed | Status::Compensated) {
            return None;
        }
        let (old, id) = {
            let mut finished = lock(&self.finished);
            finished.push_back((n, ex.id));
            // One in, at most one out: the queue never exceeds `keep`.
            if finished.len() <= keep {
                return None;
            }
            finished.pop_front()?
        };
        // A finished execution changes no more, so it is the one queued.
        let mut shard = self.shard(&id);
        let gone = shard.executions.remove(&old)?;
        shard.by_id.remove(&gone.id);
        Some(gone)
    }
}

#[async_trait]
impl Store for MemoryStore {
    async fn put_definition(&self, def: &SagaDefinition) -> Result<Registered, StoreError> {
        let mut definitions = lock(&self.definitions);
        let versions = definitions.entry(def.name.clone()).or_default();
        if let Some(last) = versions.last() {
            if same_definition(last, def) {
                return Ok(Registered {
                    version: versions.len() as u32,
                    created: false,
                });
            }
        }
        versions.push(def.clone());
        Ok(Registered {
            version: versions.len() as u32,
            created: true,
        })
    }

    async fn get_definition(
        &self,
        name: &str,
        version: Option<u32>,
    ) -> Result<Option<(u32, SagaDefinition)>, StoreError> {
        let definitions = lock(&self.definitions);
        let Some(versions) = definitions.get(name) else {
            return Ok(None);
        };
        let v = version.unwrap_or(versions.len() as u32);
        Ok(v.checked_sub(1)
            .and_then(|i| versions.get(i as usize))
            .map(|d| (v, d.clone())))
    }

    async fn list_definitions(&self) -> Result<Vec<(String, u32)>, StoreError> {
        Ok(lock(&self.definitions)
            .iter()
            .map(|(n, v)| (n.clone(), v.len() as u32))
            .collect())
    }

    async fn append(&self, ex: &Execution) -> Result<(), StoreError> {
        ex.check_invariants().map_err(|e| StoreError::Corrupt {
            id: ex.id.to_string(),
            source: sagatx_core::DecodeError::Invariant(e),
        })?;
        let mut shard = self.shard(&ex.id);
        if ex.seq == 1 {
            if shard.by_id.contains_key(&ex.id) {
                return Err(StoreError::Exists(ex.id));
            }
            let n = self.next.fetch_add(1, Ordering::Relaxed) + 1;
            shard.insert(n, ex);
            return Ok(());
        }
        let Some(n) = shard.by_id.get(&ex.id).copied() else {
            return Err(StoreError::Conflict {
                id: ex.id,
                expected: ex.seq - 1,
                found: None,
            });
        };
        let (old_due, was, finishing) = match shard.executions.get_mut(&n) {
            Some(cur) if cur.seq + 1 == ex.seq => {
                let old_due = cur.next_due_ms();
                let was = cur.status;
                let finishing = ex.status.is_terminal() && !cur.status.is_terminal();
                // Overwritten in place: the copy's allocations are reused
                // (the steps themselves are shared with the writer's state).
                cur.clone_from(ex);
                (old_due, was, finishing)
            }
            other => {
                return Err(StoreError::Conflict {
                    id: ex.id,
                    expected: ex.seq - 1,
                    found: other.map(|c| c.seq),
                })
            }
        };
        if let Some(d) = old_due {
            shard.due.remove(&(d, n));
        }
        if let Some(d) = ex.next_due_ms() {
            shard.due.insert((d, n));
        }
        if was != ex.status {
            if ex.status == Status::Paused {
                shard.paused.insert(n, ex.updated_at_ms);
            } else if was == Status::Paused {
                shard.paused.remove(&n);
            }
        }
        drop(shard);
        if finishing {
            // Freed here, after every lock.
            drop(self.retain(n, ex));
        }
        Ok(())
    }

    async fn load(&self, id: ExecutionId) -> Result<Option<Execution>, StoreError> {
        let shard = self.shard(&id);
        Ok(shard
            .by_id
            .get(&id)
            .and_then(|n| shard.executions.get(n))
            .cloned())
    }

    async fn list(&self, q: &ListQuery) -> Result<Page, StoreError> {
        let all = self.lock_all();
        let upper = q.cursor.unwrap_or(u64::MAX);
        let each = all
            .iter()
            .map(|s| s.executions.range(..upper).rev().peekable())
            .collect();
        let mut items = Vec::new();
        let mut next_cursor = None;
        for (n, ex) in merged(each, true) {
            if q.status.is_some_and(|s| s != ex.status) {
                continue;
            }
            if q.saga.as_deref().is_some_and(|s| s != ex.saga) {
                continue;
            }
            if items.len() == q.limit {
                next_cursor = Some(n + 1);
                break;
            }
            items.push(ex.clone());
        }
        Ok(Page { items, next_cursor })
    }

    async fn due(&self, now_ms: u64, limit: usize) -> Result<Vec<ExecutionId>, StoreError> {
        // The first `limit` of each shard, then the first `limit` of those.
        let mut due: Vec<(u64, u64, ExecutionId)> = Vec::new();
        for shard in self.shards.iter() {
            let shard = lock(shard);
            due.extend(
                shard
                    .due
                    .range(..=(now_ms, u64::MAX))
                    .take(limit)
                    .filter_map(|&(d, n)| shard.executions.get(&n).map(|e| (d, n, e.id))),
            );
        }
        due.sort_unstable_by_key(|&(d, n, _)| (d, n));
        Ok(due.into_iter().take(limit).map(|(_, _, id)| id).collect())
    }

    async fn secret(&self) -> Result<[u8; 32], StoreError> {
        Ok(*lock(&self.secret))
    }

    async fn paused_before(&self, before_ms: u64, limit: usize) -> Result<Vec<Paused>, StoreError> {
        // Every shard's paused executions by the time they paused (a walk
        // of the paused alone), then the first `limit` of those.
        let mut paused: Vec<(u64, u64, usize)> = Vec::new();
        for (i, shard) in self.shards.iter().enumerate() {
            let shard = lock(shard);
            paused.extend(
                shard
                    .paused
                    .iter()
                    .filter(|&(_, &since)| since <= before_ms)
                    .map(|(&n, &since)| (since, n, i)),
            );
        }
        paused.sort_unstable();
        paused.truncate(limit);
        Ok(paused
            .into_iter()
            .filter_map(|(since_ms, n, i)| {
                let execution = lock(&self.shards[i]).executions.get(&n).cloned()?;
                Some(Paused {
                    since_ms,
                    execution,
                })
            })
            .collect())
    }

    async fn summary(&self) -> Result<super::Summary, StoreError> {
        // The test store counts by walking everything; the durable stores
        // ask their database.
        let mut m: BTreeMap<(String, &'static str), (sagatx_core::Status, u64)> = BTreeMap::new();
        for shard in self.shards.iter() {
            for ex in lock(shard).executions.values() {
                m.entry((ex.saga.to_string(), ex.status.as_str()))
                    .or_insert((ex.status, 0))
                    .1 += 1;
            }
        }
        Ok(super::Summary {
            counts: m
                .into_iter()
                .map(|((saga, _), (st, n))| (saga, st, n))
                .collect(),
        })
    }

    async fn import_secret(&self, secret: [u8; 32]) -> Result<(), StoreError> {
        *lock(&self.secret) = secret;
        Ok(())
    }

    async fn scan(&self, cursor: Option<u64>, limit: usize) -> Result<Page, StoreError> {
        Ok(self.oldest_first(cursor, limit, |_| true))
    }

    async fn import(&self, ex: &Execution) -> Result<(), StoreError> {
        let mut shard = self.shard(&ex.id);
        if shard.by_id.contains_key(&ex.id) {
            return Err(StoreError::Exists(ex.id));
        }
        let n = self.next.fetch_add(1, Ordering::Relaxed) + 1;
        shard.insert(n, ex);
        drop(shard);
        drop(self.retain(n, ex));
        Ok(())
    }

    async fn op_record(
        &self,
        name: &str,
        args: &serde_json::Value,
        now_ms: u64,
    ) -> Result<u64, StoreError> {
        let mut ops = lock(&self.ops);
        let id = ops.keys().next_back().copied().unwrap_or(0) + 1;
        let rec = super::OpRecord {
            id,
            name: name.to_string(),
            args: args.clone(),
            created_at_ms: now_ms,
        };
        ops.insert(id, (rec, false));
        Ok(id)
    }

    async fn op_finish(
        &self,
        id: u64,
        _error: Option<&str>,
        _now_ms: u64,
    ) -> Result<(), StoreError> {
        if let Some(op) = lock(&self.ops).get_mut(&id) {
            op.1 = true;
        }
        Ok(())
    }

    async fn op_pending(
        &self,
        after: Option<u64>,
        limit: usize,
    ) -> Result<Vec<super::OpRecord>, StoreError> {
        Ok(lock(&self.ops)
            .range(after.map_or(0, |a| a + 1)..)
            .filter(|(_, (_, done))| !done)
            .take(limit)
            .map(|(_, (r, _))| r.clone())
            .collect())
    }

    async fn unfinished(&self, cursor: Option<u64>, limit: usize) -> Result<Page, StoreError> {
        Ok(self.oldest_first(cursor, limit, |ex| may_have_work(ex.status)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use sagatx_core::{Env, Event, Phase, StepError};
    use serde_json::json;

    fn def(name: &str) -> SagaDefinition {
        let json = format!(r#"{{"name":"{name}","steps":[{{"name":"s0","action":"local"}}]}}"#);
        SagaDefinition::from_json(json.as_bytes()).expect("the test's definition is valid")
    }

    fn env(now_ms: u64) -> Env {
        Env {
            now_ms,
            random01: 0.5,
        }
    }

    /// Ends the call in flight of `ex`'s only step: `Ok` completes it, a
    /// transient error makes it due again 100 ms after `at`.
    fn outcome(ex: &mut Execution, d: &SagaDefinition, ok: bool, at: u64) {
        let outcome = if ok {
            Ok(json!(null))
        } else {
            Err(StepError::transient("503"))
        };
        let ev = Event::Outcome {
            step: 0,
            phase: Phase::Action,
            attempt: ex.steps[0].attempts,
            outcome,
        };
        let t = ex.handle(d, ev, env(at)).expect("a valid outcome");
        assert!(t.changed);
        ex.seq += 1;
    }

    /// Pages through `page` from no cursor to the end; gives the ids.
    fn all_pages(mut page: impl FnMut(Option<u64>) -> Page, limit: usize) -> Vec<ExecutionId> {
        let mut ids = Vec::new();
        let mut cursor = None;
        for _ in 0..10_000 {
            let p = page(cursor);
            assert!(p.items.len() <= limit, "a page holds at most its limit");
            ids.extend(p.items.iter().map(|x| x.id));
            match p.next_cursor {
                Some(c) => cursor = Some(c),
                None => return ids,
            }
        }
        panic!("paging did not end");
    }

    proptest! {
        /// The store in shards answers every query as one map in insertion
        /// order would: lists newest first (by status, by saga), scans and
        /// unfinished executions oldest first, due executions earliest
        /// first, over every page.
        #[test]
        fn the_shards_answer_as_one_ordered_map(
            ops in proptest::collection::vec((0u8..3, any::<u32>()), 1..150),
            limit in 1usize..7,
            now in 1_000u64..1_400,
        ) {
            let rt = tokio::runtime::Builder::new_current_thread()
                .build()
                .expect("a runtime");
            let store = MemoryStore::new();
            let defs = [def("a"), def("b")];
            // The model: every execution in insertion order.
            let mut model: Vec<Execution> = Vec::new();
            for (k, (op, r)) in ops.into_iter().enumerate() {
                match op {
                    0 => {
                        // Ids that fall into every shard.
                        let id = ExecutionId(uuid::Uuid::from_u128(
                            (k as u128) << 64 | u128::from(r),
                        ));
                        let d = &defs[(r & 1) as usize];
                        let mut ex = Execution::new(id, d, 1, json!(k), None, 1_000);
                        let _ = ex.handle(d, Event::Start, env(1_000)).expect("start");
                        ex.seq = 1;
                        rt.block_on(store.append(&ex)).expect("create");
                        model.push(ex);
                    }
                    _ if model.is_empty() => {}
                    _ => {
                        let i = r as usize % model.len();
                        let ex = &mut model[i];
                        if ex.status.is_terminal() || ex.next_due_ms().is_some() {
                            continue;
                        }
                        let d = &defs[usize::from(ex.saga.as_str() == "b")];
                        outcome(ex, d, op == 1, 1_000 + u64::from(r % 300));
                        rt.block_on(store.append(ex)).expect("outcome");
                    }
                }
            }
            for status in [None, Some(Status::Running), Some(Status::Completed)] {
                for saga in [None, Some("a".to_string())] {
                    let q = |cursor| ListQuery { status, saga: saga.clone(), limit, cursor };
                    let got = all_pages(|c| rt.block_on(store.list(&q(c))).expect("list"), limit);
                    let want: Vec<ExecutionId> = model
                        .iter()
                        .rev()
                        .filter(|x| status.is_none_or(|s| s == x.status))
                        .filter(|x| saga.as_deref().is_none_or(|s| s == x.saga))
                        .map(|x| x.id)
                        .collect();
                    prop_assert_eq!(got, want);
                }
            }
            let got = all_pages(|c| rt.block_on(store.scan(c, limit)).expect("scan"), limit);
            prop_assert_eq!(got, model.iter().map(|x| x.id).collect::<Vec<_>>());
            let got = all_pages(|c| rt.block_on(store.unfinished(c, limit)).expect("unfinished"), limit);
            let want: Vec<ExecutionId> =
                model.iter().filter(|x| may_have_work(x.status)).map(|x| x.id).collect();
            prop_assert_eq!(got, want);
            let got = rt.block_on(store.due(now, limit)).expect("due");
            let mut want: Vec<(u64, usize, ExecutionId)> = model
                .iter()
                .enumerate()
                .filter_map(|(n, x)| x.next_due_ms().filter(|&d| d <= now).map(|d| (d, n, x.id)))
                .collect();
            want.sort();
            let want: Vec<ExecutionId> = want.into_iter().take(limit).map(|(_, _, id)| id).collect();
            prop_assert_eq!(got, want);
        }
    }
}
