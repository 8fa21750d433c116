//! An in-memory store: the reference implementation of the trait, for tests
//! and the in-process benchmark. Nothing survives the process.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::{Mutex, MutexGuard};

use async_trait::async_trait;
use sagatx_core::{Execution, ExecutionId, SagaDefinition, Status};

use super::{may_have_work, same_definition, ListQuery, Page, Registered, Store, StoreError};

#[derive(Default)]
struct Inner {
    definitions: BTreeMap<String, Vec<SagaDefinition>>,
    /// Insertion number → execution; the number is the list cursor.
    executions: BTreeMap<u64, Execution>,
    by_id: crate::idmap::IdMap<u64>,
    /// (due time, insertion number) of every execution with a due time.
    due: BTreeSet<(u64, u64)>,
    next: u64,
    /// Operation log: id → (record, finished).
    ops: BTreeMap<u64, (super::OpRecord, bool)>,
    /// With a retention: the finished executions it may drop, oldest first.
    finished: VecDeque<u64>,
}

/// A store that keeps everything in memory (or, with a retention, every
/// execution but the oldest finished ones).
pub struct MemoryStore {
    inner: Mutex<Inner>,
    secret: Mutex<[u8; 32]>,
    keep_finished: Option<usize>,
}

impl Default for MemoryStore {
    fn default() -> Self {
        let mut secret = [0u8; 32];
        secret[..16].copy_from_slice(uuid::Uuid::new_v4().as_bytes());
        secret[16..].copy_from_slice(uuid::Uuid::new_v4().as_bytes());
        MemoryStore {
            inner: Mutex::new(Inner::default()),
            secret: Mutex::new(secret),
            keep_finished: None,
        }
    }
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

    /// Counts `n` as finished when `ex` is, and takes out the oldest
    /// finished execution beyond the retention (for the caller to free
    /// outside the lock).
    fn retain(&self, g: &mut Inner, n: u64, ex: &Execution) -> Option<Execution> {
        let keep = self.keep_finished?;
        if !matches!(ex.status, Status::Completed | Status::Compensated) {
            return None;
        }
        g.finished.push_back(n);
        // One in, at most one out: the queue never exceeds `keep`.
        if g.finished.len() <= keep {
            return None;
        }
        let old = g.finished.pop_front()?;
        let gone = g.executions.remove(&old)?;
        g.by_id.remove(&gone.id);
        Some(gone)
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding this lock cannot leave the maps half-updated
        // (every update is a single insert), so a poisoned lock is usable.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[async_trait]
impl Store for MemoryStore {
    async fn put_definition(&self, def: &SagaDefinition) -> Result<Registered, StoreError> {
        let mut g = self.lock();
        let versions = g.definitions.entry(def.name.clone()).or_default();
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
        let g = self.lock();
        let Some(versions) = g.definitions.get(name) else {
            return Ok(None);
        };
        let v = version.unwrap_or(versions.len() as u32);
        Ok(v.checked_sub(1)
            .and_then(|i| versions.get(i as usize))
            .map(|d| (v, d.clone())))
    }

    async fn list_definitions(&self) -> Result<Vec<(String, u32)>, StoreError> {
        let g = self.lock();
        Ok(g.definitions
            .iter()
            .map(|(n, v)| (n.clone(), v.len() as u32))
            .collect())
    }

    async fn append(&self, ex: &Execution) -> Result<(), StoreError> {
        ex.check_invariants().map_err(|e| StoreError::Corrupt {
            id: ex.id.to_string(),
            source: sagatx_core::DecodeError::Invariant(e),
        })?;
        let mut guard = self.lock();
        let g = &mut *guard;
        if ex.seq == 1 {
            if g.by_id.contains_key(&ex.id) {
                return Err(StoreError::Exists(ex.id));
            }
            g.next += 1;
            let n = g.next;
            g.by_id.insert(ex.id, n);
            if let Some(d) = ex.next_due_ms() {
                g.due.insert((d, n));
            }
            g.executions.insert(n, ex.clone());
            return Ok(());
        }
        let Some(n) = g.by_id.get(&ex.id).copied() else {
            return Err(StoreError::Conflict {
                id: ex.id,
                expected: ex.seq - 1,
                found: None,
            });
        };
        let (old_due, finishing) = match g.executions.get_mut(&n) {
            Some(cur) if cur.seq + 1 == ex.seq => {
                let old_due = cur.next_due_ms();
                let finishing = ex.status.is_terminal() && !cur.status.is_terminal();
                // Overwritten in place: the copy's allocations are reused
                // (the steps themselves are shared with the writer's state).
                cur.clone_from(ex);
                (old_due, finishing)
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
            g.due.remove(&(d, n));
        }
        if let Some(d) = ex.next_due_ms() {
            g.due.insert((d, n));
        }
        let dropped = if finishing {
            self.retain(g, n, ex)
        } else {
            None
        };
        // Freed after the lock.
        drop(guard);
        drop(dropped);
        Ok(())
    }

    async fn load(&self, id: ExecutionId) -> Result<Option<Execution>, StoreError> {
        let g = self.lock();
        Ok(g.by_id.get(&id).and_then(|n| g.executions.get(n)).cloned())
    }

    async fn list(&self, q: &ListQuery) -> Result<Page, StoreError> {
        let g = self.lock();
        let upper = q.cursor.unwrap_or(u64::MAX);
        let mut items = Vec::new();
        let mut next_cursor = None;
        for (&n, ex) in g.executions.range(..upper).rev() {
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
        let g = self.lock();
        Ok(g.due
            .range(..=(now_ms, u64::MAX))
            .take(limit)
            .filter_map(|(_, n)| g.executions.get(n).map(|e| e.id))
            .collect())
    }

    async fn secret(&self) -> Result<[u8; 32], StoreError> {
        Ok(*self.secret.lock().unwrap_or_else(|p| p.into_inner()))
    }

    async fn summary(&self) -> Result<super::Summary, StoreError> {
        // The test store counts by walking everything; the durable stores
        // ask their database.
        let g = self.lock();
        let mut m: BTreeMap<(String, &'static str), (sagatx_core::Status, u64)> = BTreeMap::new();
        for ex in g.executions.values() {
            m.entry((ex.saga.to_string(), ex.status.as_str()))
                .or_insert((ex.status, 0))
                .1 += 1;
        }
        Ok(super::Summary {
            counts: m
                .into_iter()
                .map(|((saga, _), (st, n))| (saga, st, n))
                .collect(),
        })
    }

    async fn import_secret(&self, secret: [u8; 32]) -> Result<(), StoreError> {
        *self.secret.lock().unwrap_or_else(|p| p.into_inner()) = secret;
        Ok(())
    }

    async fn scan(&self, cursor: Option<u64>, limit: usize) -> Result<Page, StoreError> {
        let g = self.lock();
        let mut items = Vec::new();
        let mut next_cursor = None;
        for (&n, ex) in g.executions.range(cursor.unwrap_or(0)..) {
            if items.len() == limit {
                next_cursor = Some(n);
                break;
            }
            items.push(ex.clone());
        }
        Ok(Page { items, next_cursor })
    }

    async fn import(&self, ex: &Execution) -> Result<(), StoreError> {
        let mut g = self.lock();
        if g.by_id.contains_key(&ex.id) {
            return Err(StoreError::Exists(ex.id));
        }
        g.next += 1;
        let n = g.next;
        g.by_id.insert(ex.id, n);
        if let Some(d) = ex.next_due_ms() {
            g.due.insert((d, n));
        }
        g.executions.insert(n, ex.clone());
        let dropped = self.retain(&mut g, n, ex);
        drop(g);
        drop(dropped);
        Ok(())
    }

    async fn op_record(
        &self,
        name: &str,
        args: &serde_json::Value,
        now_ms: u64,
    ) -> Result<u64, StoreError> {
        let mut g = self.lock();
        let id = g.ops.keys().next_back().copied().unwrap_or(0) + 1;
        let rec = super::OpRecord {
            id,
            name: name.to_string(),
            args: args.clone(),
            created_at_ms: now_ms,
        };
        g.ops.insert(id, (rec, false));
        Ok(id)
    }

    async fn op_finish(
        &self,
        id: u64,
        _error: Option<&str>,
        _now_ms: u64,
    ) -> Result<(), StoreError> {
        if let Some(op) = self.lock().ops.get_mut(&id) {
            op.1 = true;
        }
        Ok(())
    }

    async fn op_pending(
        &self,
        after: Option<u64>,
        limit: usize,
    ) -> Result<Vec<super::OpRecord>, StoreError> {
        let g = self.lock();
        Ok(g.ops
            .range(after.map_or(0, |a| a + 1)..)
            .filter(|(_, (_, done))| !done)
            .take(limit)
            .map(|(_, (r, _))| r.clone())
            .collect())
    }

    async fn unfinished(&self, cursor: Option<u64>, limit: usize) -> Result<Page, StoreError> {
        let g = self.lock();
        let lower = cursor.unwrap_or(0);
        let mut items = Vec::new();
        let mut next_cursor = None;
        for (&n, ex) in g.executions.range(lower..) {
            if !may_have_work(ex.status) {
                continue;
            }
            if items.len() == limit {
                next_cursor = Some(n);
                break;
            }
            items.push(ex.clone());
        }
        Ok(Page { items, next_cursor })
    }
}
