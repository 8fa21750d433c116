//! The engine: runs executions on a store.
//!
//! Each active execution has one driver task that owns its state. The driver
//! applies an event to the state machine, journals the new state, waits for
//! the write to be durable, and only then makes the calls the machine asked
//! for (persist, then act). Outside events (reply, cancel, commit, …) reach
//! the driver through its mailbox, so one execution is never driven twice at
//! once within a process.
//!
//! An execution that only waits (paused, or backing off for longer than a
//! few seconds) has no driver: it lives in the store, with its due time
//! indexed; a scheduler task finds it when it is due. Memory therefore grows
//! with the executions that are under way, not with those that wait.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::Duration;

use async_trait::async_trait;
use sagatx_core::{
    Call, Conflict, DefinitionError, Endpoint, Env, Event, Execution, ExecutionId, HttpEndpoint,
    Phase, Reply, SagaDefinition, Status, StepError,
};
use serde_json::Value;
use tokio::sync::{oneshot, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::idmap::{id_map, IdMap};
use crate::plan::Plan;
use crate::saga::{Call as StepCall, Handlers, Saga, StepContext};
use crate::store::{Claim, Command, ListQuery, Outcome, Page, Registered, Store, StoreError};

/// Errors of the engine's operations.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EngineError {
    #[error("no saga named {0:?} is registered")]
    UnknownSaga(String),
    #[error("saga {saga:?} has no version {version}")]
    UnknownVersion { saga: String, version: u32 },
    #[error("execution {0} does not exist")]
    NotFound(ExecutionId),
    #[error("saga {saga:?} has no step named {step:?}")]
    UnknownStep { saga: String, step: String },
    #[error("invalid saga definition: {0}")]
    Definition(#[from] DefinitionError),
    #[error("{0}")]
    Conflict(#[from] Conflict),
    #[error(
        "execution {0} already exists with another saga or input; choose another id, \
         or start it again with the same saga and input to get it back"
    )]
    IdTaken(ExecutionId),
    #[error("the engine is shutting down")]
    ShuttingDown,
    /// A request handed to the process that drives the execution failed
    /// there (`conflict`: it does not apply to the execution's state).
    #[error("{message}")]
    Remote { conflict: bool, message: String },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Calls a step's HTTP endpoint; provided by the coordinator. Without one,
/// sagas with HTTP steps fail their calls with a permanent error.
#[async_trait]
pub trait RemoteCaller: Send + Sync + 'static {
    async fn call(
        &self,
        endpoint: &HttpEndpoint,
        ctx: &StepContext,
        timeout: Option<Duration>,
    ) -> Result<Value, StepError>;
}

/// Options of [`Engine::start_with`].
#[derive(Debug, Clone, Default)]
pub struct StartOptions {
    /// The execution's id; a new UUID v7 when `None`. Starting again with
    /// an id that exists, the same saga and the same input gives that
    /// execution back (an idempotent start).
    pub id: Option<ExecutionId>,
    /// Recorded on the execution, visible to steps.
    pub user: Option<String>,
    /// A version of the saga other than the latest.
    pub version: Option<u32>,
}

/// What [`Engine::submit`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Started {
    pub id: ExecutionId,
    /// `false` when an execution with this id, saga and input existed.
    pub created: bool,
}

/// What [`Engine::recover`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RecoveryReport {
    /// Executions found with work under way and handed to a driver.
    pub resumed: usize,
}

/// Settings of an [`Engine`].
pub struct EngineBuilder {
    store: Option<Arc<dyn Store>>,
    sagas: Vec<Saga>,
    remote: Option<Arc<dyn RemoteCaller>>,
    on_status: Option<StatusHook>,
    max_active: usize,
    poll_interval: Duration,
    idle_horizon: Duration,
}

/// Called with the new state each time an execution's status (or what it
/// awaits) changed, once the change is durable.
pub type StatusHook = Arc<dyn Fn(&Execution) + Send + Sync>;

/// Executions with a driver at once, by default.
pub const DEFAULT_MAX_ACTIVE: usize = 10_000;

impl EngineBuilder {
    /// The journal; a `MemoryStore` when not set.
    pub fn store(mut self, store: impl Store) -> Self {
        self.store = Some(Arc::new(store));
        self
    }

    pub fn store_arc(mut self, store: Arc<dyn Store>) -> Self {
        self.store = Some(store);
        self
    }

    /// Registers a Rust saga: its definition goes to the store (a new
    /// version if it changed), its functions stay in this process under the
    /// saga's name, for this and later runs to find.
    pub fn saga(mut self, saga: Saga) -> Self {
        self.sagas.push(saga);
        self
    }

    pub fn remote_caller(mut self, c: Arc<dyn RemoteCaller>) -> Self {
        self.remote = Some(c);
        self
    }

    /// Observes status changes (for notifications); must not block.
    pub fn on_status(mut self, hook: StatusHook) -> Self {
        self.on_status = Some(hook);
        self
    }

    /// At most this many executions are driven at once; more wait (bounded
    /// memory). Default [`DEFAULT_MAX_ACTIVE`].
    pub fn max_active(mut self, n: usize) -> Self {
        self.max_active = n.max(1);
        self
    }

    /// How often the store is asked for due executions (default 1 s).
    pub fn poll_interval(mut self, d: Duration) -> Self {
        self.poll_interval = d.max(Duration::from_millis(1));
        self
    }

    /// A driver sleeps through backoffs shorter than this itself; longer
    /// waits are left to the store and the scheduler (default 5 s).
    pub fn idle_horizon(mut self, d: Duration) -> Self {
        self.idle_horizon = d;
        self
    }

    /// Registers the sagas in the store and starts the scheduler. Call
    /// [`Engine::recover`] next to resume interrupted work.
    pub async fn build(self) -> Result<Engine, EngineError> {
        let store = self
            .store
            .unwrap_or_else(|| Arc::new(crate::store::MemoryStore::new()));
        let inner = Arc::new(Inner {
            store,
            handlers: RwLock::new(HashMap::new()),
            definitions: RwLock::new(HashMap::new()),
            latest: RwLock::new(HashMap::new()),
            active: Mutex::new(id_map()),
            inboxes: std::sync::atomic::AtomicU64::new(0),
            waiters: Mutex::new(id_map()),
            remote: self.remote,
            on_status: self.on_status,
            permits: Arc::new(Semaphore::new(self.max_active)),
            clock: Clock::new(),
            poll_interval: self.poll_interval,
            idle_horizon_ms: self.idle_horizon.as_millis() as u64,
            wake: Arc::new(tokio::sync::Notify::new()),
            stop: tokio::sync::watch::channel(false).0,
            write_failures: crate::throttle::Throttle::new(Duration::from_secs(10)),
            poll_failures: crate::throttle::Throttle::new(Duration::from_secs(10)),
        });
        for saga in self.sagas {
            let reg = inner.store.put_definition(&saga.definition).await?;
            // The functions first: a plan finds them at its first call.
            write(&inner.handlers).insert(saga.definition.name.clone(), Arc::new(saga.handlers));
            let def = Arc::new(Plan::new(saga.definition));
            inner.remember(reg.version, def, true);
        }
        if let Some(leases) = inner.store.leases() {
            leases.subscribe(inner.wake.clone());
        }
        let engine = Engine { inner };
        tokio::spawn(scheduler(
            Arc::downgrade(&engine.inner),
            engine.inner.wake.clone(),
            engine.inner.stop.subscribe(),
            engine.inner.poll_interval,
        ));
        Ok(engine)
    }
}

/// Milliseconds since the epoch, advanced by tokio's clock so that tests
/// with paused time see time move as they advance it.
struct Clock {
    base_ms: u64,
    base: Instant,
}

impl Clock {
    fn new() -> Self {
        Clock {
            base_ms: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0),
            base: Instant::now(),
        }
    }
    fn now_ms(&self) -> u64 {
        self.base_ms + self.base.elapsed().as_millis() as u64
    }
    fn instant_at(&self, ms: u64) -> Instant {
        self.base + Duration::from_millis(ms.saturating_sub(self.base_ms))
    }
}

type Reply_ = oneshot::Sender<Result<Execution, EngineError>>;

struct Msg {
    event: Event,
    reply: Option<Reply_>,
}

/// The messages for one execution's driver, in [`Inner::active`] while
/// the driver runs, with the waker of the driver waiting for one. Under
/// the map's lock rather than a channel of its own: most executions never
/// get a message, and a channel was two allocations (one of them 128-byte
/// aligned, a slow path of the allocator) for each.
struct Inbox {
    /// Which driver it belongs to ([`Mailbox::token`]).
    token: u64,
    queue: std::collections::VecDeque<Box<Msg>>,
    waker: Option<std::task::Waker>,
}

/// A driver's end of its [`Inbox`]. Dropped without having left (a
/// driver dropped at shutdown, or that panicked), it takes the inbox out
/// of the map, so that no inbox stays with nobody to read it: its queued
/// requests are answered "shutting down" (their reply senders go), and a
/// later message starts a new driver.
struct Mailbox {
    inner: Arc<Inner>,
    id: ExecutionId,
    token: u64,
    /// Taken out of the map already.
    left: bool,
}

impl Mailbox {
    /// The next message; waits for one. `None` if the inbox is gone (not
    /// expected while this end lives).
    async fn recv(&mut self) -> Option<Box<Msg>> {
        std::future::poll_fn(|cx| {
            let mut active = lock(&self.inner.active);
            let Some(inbox) = active.get_mut(&self.id).filter(|i| i.token == self.token) else {
                return std::task::Poll::Ready(None);
            };
            match inbox.queue.pop_front() {
                Some(m) => std::task::Poll::Ready(Some(m)),
                None => {
                    // The task polling may change (a driver started in its
                    // caller's task moves to a task of its own).
                    match &mut inbox.waker {
                        Some(w) if w.will_wake(cx.waker()) => {}
                        w => *w = Some(cx.waker().clone()),
                    }
                    std::task::Poll::Pending
                }
            }
        })
        .await
    }

    /// Every message queued now.
    fn take_all(&mut self) -> std::collections::VecDeque<Box<Msg>> {
        let mut active = lock(&self.inner.active);
        match active.get_mut(&self.id).filter(|i| i.token == self.token) {
            Some(inbox) => std::mem::take(&mut inbox.queue),
            None => Default::default(),
        }
    }

    /// Takes the inbox out of the map if no message waits in it (in one
    /// step under the lock: a message is either in it now or, sent after,
    /// starts a new driver). Returns whether it left.
    fn leave_if_empty(&mut self) -> bool {
        if self.left {
            return true;
        }
        let mut active = lock(&self.inner.active);
        match active.get(&self.id) {
            Some(i) if i.token == self.token && !i.queue.is_empty() => false,
            Some(i) if i.token == self.token => {
                active.remove(&self.id);
                self.left = true;
                true
            }
            // Not ours (cannot happen while this end lives): nothing to leave.
            _ => {
                self.left = true;
                true
            }
        }
    }
}

impl Drop for Mailbox {
    fn drop(&mut self) {
        if self.left {
            return;
        }
        let mut active = lock(&self.inner.active);
        if active.get(&self.id).is_some_and(|i| i.token == self.token) {
            // Dropped after the lock: a queued message's reply sender may
            // wake a task.
            let gone = active.remove(&self.id);
            drop(active);
            drop(gone);
        }
    }
}

struct Inner {
    store: Arc<dyn Store>,
    handlers: RwLock<HashMap<String, Arc<HashMap<String, Handlers>>>>,
    definitions: RwLock<HashMap<(String, u32), Arc<Plan>>>,
    latest: RwLock<HashMap<String, (u32, Arc<Plan>)>>,
    active: Mutex<IdMap<Inbox>>,
    /// The token of the next [`Inbox`].
    inboxes: std::sync::atomic::AtomicU64,
    waiters: Mutex<IdMap<Vec<oneshot::Sender<Execution>>>>,
    remote: Option<Arc<dyn RemoteCaller>>,
    on_status: Option<StatusHook>,
    permits: Arc<Semaphore>,
    clock: Clock,
    poll_interval: Duration,
    idle_horizon_ms: u64,
    wake: Arc<tokio::sync::Notify>,
    stop: tokio::sync::watch::Sender<bool>,
    /// Drivers whose journal writes fail (a full disk) retry each on its
    /// own: this keeps the log to a line every few seconds.
    write_failures: crate::throttle::Throttle,
    /// The scheduler's reads that fail while the store is away, once a
    /// poll: logged every few seconds at most.
    poll_failures: crate::throttle::Throttle,
}

// The maps behind these locks are only ever updated by single inserts and
// removals, so a lock poisoned by a panicking thread still holds a
// consistent map.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
fn read<T>(m: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    m.read().unwrap_or_else(|p| p.into_inner())
}
fn write<T>(m: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    m.write().unwrap_or_else(|p| p.into_inner())
}

impl Inner {
    /// Logs a failed poll of the store: every few seconds at most while it
    /// is away, not at every poll.
    fn poll_failed(&self, what: &str, e: &dyn std::fmt::Display) {
        if self
            .poll_failures
            .ready(std::time::Instant::now())
            .is_some()
        {
            tracing::warn!(error = %e, "{what}");
        }
    }

    /// A driver slot (at most `max_active` drivers at once).
    async fn permit(&self) -> Result<OwnedSemaphorePermit, EngineError> {
        self.permits
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| EngineError::ShuttingDown)
    }

    /// The mailbox of a new driver for `id`, registered; `None` when this
    /// process has a driver for it already.
    fn mailbox(self: &Arc<Self>, id: ExecutionId) -> Option<Mailbox> {
        let mut active = lock(&self.active);
        match active.entry(id) {
            std::collections::hash_map::Entry::Occupied(_) => None,
            std::collections::hash_map::Entry::Vacant(v) => {
                let token = self
                    .inboxes
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                v.insert(Inbox {
                    token,
                    queue: Default::default(),
                    waker: None,
                });
                drop(active);
                Some(Mailbox {
                    inner: self.clone(),
                    id,
                    token,
                    left: false,
                })
            }
        }
    }

    fn env(&self) -> Env {
        Env {
            now_ms: self.clock.now_ms(),
            random01: random01(),
        }
    }

    /// A new execution id: a UUID v7 (time-ordered by its millisecond)
    /// whose 74 random bits come from [`random`](Self::random) rather than
    /// from the operating system, which `Uuid::now_v7` asks on every call.
    fn new_id(&self) -> ExecutionId {
        ExecutionId(new_id(self.clock.now_ms()))
    }

    fn remember(&self, version: u32, def: Arc<Plan>, latest: bool) {
        if latest {
            write(&self.latest).insert(def.name.clone(), (version, def.clone()));
        }
        write(&self.definitions).insert((def.name.clone(), version), def);
    }

    async fn definition(&self, saga: &str, version: u32) -> Result<Arc<Plan>, EngineError> {
        if let Some(d) = read(&self.definitions).get(&(saga.to_string(), version)) {
            return Ok(d.clone());
        }
        let (v, def) = self
            .store
            .get_definition(saga, Some(version))
            .await?
            .ok_or_else(|| EngineError::UnknownVersion {
                saga: saga.to_string(),
                version,
            })?;
        let def = Arc::new(Plan::new(def));
        self.remember(v, def.clone(), false);
        Ok(def)
    }

    async fn latest(&self, saga: &str) -> Result<(u32, Arc<Plan>), EngineError> {
        if let Some(x) = read(&self.latest).get(saga) {
            return Ok(x.clone());
        }
        let (v, def) = self
            .store
            .get_definition(saga, None)
            .await?
            .ok_or_else(|| EngineError::UnknownSaga(saga.to_string()))?;
        let def = Arc::new(Plan::new(def));
        self.remember(v, def.clone(), true);
        Ok((v, def))
    }

    fn notify_waiters(&self, ex: &Execution) {
        if !(ex.status.is_terminal() || ex.status == Status::Paused) {
            return;
        }
        let ws = lock(&self.waiters).remove(&ex.id);
        for w in ws.into_iter().flatten() {
            let _ = w.send(ex.clone());
        }
    }
}

/// A UUID v7 of millisecond `now_ms` whose 74 random bits come from
/// [`random`].
pub(crate) fn new_id(now_ms: u64) -> uuid::Uuid {
    let mut bytes = [0u8; 10];
    bytes[..8].copy_from_slice(&random().to_le_bytes());
    bytes[8..].copy_from_slice(&random().to_le_bytes()[..2]);
    uuid::Builder::from_unix_timestamp_millis(now_ms, &bytes).into_uuid()
}

/// The wall clock in milliseconds since the Unix epoch (0 before it).
pub(crate) fn wall_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// A uniform draw from `[0, 1)` for the jitter of a backoff.
pub(crate) fn random01() -> f64 {
    (random() >> 11) as f64 / (1u64 << 53) as f64
}

/// The next number of a splitmix64 stream of this thread, seeded at random:
/// cheap, and with no shared word for the cores to pass around (a shared
/// atomic counter, written at every transition, was).
fn random() -> u64 {
    thread_local! {
        static STATE: std::cell::Cell<u64> = std::cell::Cell::new({
            use std::hash::BuildHasher;
            std::collections::hash_map::RandomState::new().hash_one(std::thread::current().id())
                ^ std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_nanos() as u64)
                    .unwrap_or(0x9E37_79B9)
        });
    }
    STATE.with(|s| {
        let mut z = s.get().wrapping_add(0x9E37_79B9_7F4A_7C15);
        s.set(z);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    })
}

/// The engine handle: cheap to clone.
#[derive(Clone)]
pub struct Engine {
    inner: Arc<Inner>,
}

impl Engine {
    pub fn builder() -> EngineBuilder {
        EngineBuilder {
            store: None,
            sagas: Vec::new(),
            remote: None,
            on_status: None,
            max_active: DEFAULT_MAX_ACTIVE,
            poll_interval: Duration::from_secs(1),
            idle_horizon: Duration::from_secs(5),
        }
    }

    pub fn store(&self) -> &Arc<dyn Store> {
        &self.inner.store
    }

    /// Registers a definition (one whose steps are HTTP calls, or local
    /// steps of a saga registered with the builder). A `"local"` call that
    /// this process has no function for is refused: nothing could run it
    /// here, and a coordinator's user would only learn so from every
    /// execution failing.
    pub async fn register(&self, def: SagaDefinition) -> Result<Registered, EngineError> {
        def.validate()?;
        self.check_local_functions(&def)?;
        let reg = self.inner.store.put_definition(&def).await?;
        self.inner
            .remember(reg.version, Arc::new(Plan::new(def)), true);
        Ok(reg)
    }

    /// Every `"local"` call of `def` has a function in this process (one
    /// registered with [`EngineBuilder::saga`] under the saga's and the
    /// step's names).
    fn check_local_functions(&self, def: &SagaDefinition) -> Result<(), EngineError> {
        let functions = read(&self.inner.handlers).get(def.name.as_str()).cloned();
        for (i, s) in def.steps.iter().enumerate() {
            let calls = [
                (Phase::Action, Some(&s.action)),
                (Phase::Compensation, s.compensation.as_ref()),
                (Phase::Confirm, s.confirm.as_ref()),
            ];
            for (phase, endpoint) in calls {
                if !matches!(endpoint, Some(Endpoint::Local)) {
                    continue;
                }
                let here = functions
                    .as_ref()
                    .and_then(|f| f.get(&s.name))
                    .and_then(|h| h.get(phase))
                    .is_some();
                if !here {
                    return Err(EngineError::Definition(DefinitionError::Invalid {
                        field: format!("steps[{i}].{phase}"),
                        message: format!(
                            "is \"local\", but this process has no function for the {phase} \
                             of step {:?} of saga {:?}: a local call runs a Rust function \
                             registered with Engine::builder().saga(...); a coordinator's \
                             calls are HTTP calls, {{\"url\": \"http://...\"}}",
                            s.name, def.name
                        ),
                    }));
                }
            }
        }
        Ok(())
    }

    /// Starts an execution of the latest version of `saga`; returns once it
    /// is durable (before its first action is called).
    pub async fn start(&self, saga: &str, input: Value) -> Result<ExecutionId, EngineError> {
        self.start_with(saga, input, StartOptions::default()).await
    }

    /// Starts an execution with a chosen id, user or version.
    pub async fn start_with(
        &self,
        saga: &str,
        input: Value,
        opts: StartOptions,
    ) -> Result<ExecutionId, EngineError> {
        self.submit(saga, input, opts).await.map(|s| s.id)
    }

    /// Like [`start_with`](Self::start_with), and tells whether this call
    /// created the execution or found it (an idempotent start with a chosen
    /// id: same saga and input, and same version when one is given).
    pub async fn submit(
        &self,
        saga: &str,
        input: Value,
        opts: StartOptions,
    ) -> Result<Started, EngineError> {
        match self.begin(saga, input, opts).await? {
            Begun::Found(id) => Ok(Started { id, created: false }),
            Begun::New(id, rx, loaded) => {
                tokio::spawn(drive(self.inner.clone(), id, rx, Some(loaded)));
                Ok(Started { id, created: true })
            }
        }
    }

    /// Creates the execution durably and hands back what its driver needs,
    /// for the caller to spawn or to run.
    async fn begin(
        &self,
        saga: &str,
        input: Value,
        opts: StartOptions,
    ) -> Result<Begun, EngineError> {
        let inner = &self.inner;
        let pinned_version = opts.version;
        if *inner.stop.borrow() {
            return Err(EngineError::ShuttingDown);
        }
        let (version, def) = match opts.version {
            Some(v) => (v, inner.definition(saga, v).await?),
            None => inner.latest(saga).await?,
        };
        let id = opts.id.unwrap_or_else(|| inner.new_id());
        let env = inner.env();
        // Names of its own (not the plan's): an execution's names are
        // cloned at every transition, and one count shared by every
        // execution would bounce between cores.
        let mut ex = Execution::new(id, &def, version, input, opts.user, env.now_ms);
        let t = ex.handle(&def, Event::Start, env)?;
        ex.seq = 1;
        let permit = inner.permit().await?;
        // The mailbox is in place before the journal write, so an event for
        // this id that arrives meanwhile waits for this driver instead of
        // starting a second one.
        let mailbox = inner.mailbox(id);
        let written = match mailbox {
            Some(rx) => match inner.store.leases() {
                Some(leases) => leases.append_leased(&ex, 1).await,
                None => inner.store.append(&ex).await,
            }
            .map(|()| rx),
            None => Err(StoreError::Exists(id)),
        };
        let rx = match written {
            Ok(rx) => rx,
            // The mailbox, dropped, left the map.
            Err(e) => {
                if !matches!(e, StoreError::Exists(_)) {
                    return Err(e.into());
                }
                let existing = inner
                    .store
                    .load(id)
                    .await?
                    .ok_or(EngineError::NotFound(id))?;
                let same = existing.saga == ex.saga
                    && existing.input == ex.input
                    && pinned_version.is_none_or(|v| v == existing.saga_version);
                return if same {
                    Ok(Begun::Found(id))
                } else {
                    Err(EngineError::IdTaken(id))
                };
            }
        };
        tracing::debug!(execution = %id, saga, "started");
        def.started();
        inner.notify_waiters(&ex);
        let loaded = Loaded {
            ex,
            def,
            calls: t.calls,
            permit,
            // A new execution is created under this process's lease.
            lease: inner.store.leases().map(|_| 1),
            resume: false,
        };
        Ok(Begun::New(id, rx, loaded))
    }

    /// Starts an execution and waits until it is terminal or paused.
    ///
    /// The new execution's driver runs in the caller's task for as long as
    /// it does not have to wait (a journal write that is not yet durable, a
    /// step that is not done at its first poll), and is handed to a task of
    /// its own at the first wait. So a saga of quick local steps on a store
    /// that answers at once ends within this call, with no task spawned
    /// and no thread woken; and dropping this future never stops the
    /// execution, which is only ever left between polls in its own task.
    pub async fn run(&self, saga: &str, input: Value) -> Result<Execution, EngineError> {
        let opts = StartOptions {
            id: Some(self.inner.new_id()),
            ..Default::default()
        };
        let (_, ex) = self.start_and_wait(saga, input, opts, None).await?;
        Ok(ex)
    }

    /// Starts an execution (as [`submit`](Self::submit)) and waits until it
    /// is terminal or paused, for at most `timeout` (`None`: no limit);
    /// gives the state then. A zero timeout does not wait: it gives the
    /// state as created. The driver runs as in [`run`](Self::run), and a
    /// new execution's result needs no read of the store.
    pub async fn start_and_wait(
        &self,
        saga: &str,
        input: Value,
        opts: StartOptions,
        timeout: Option<Duration>,
    ) -> Result<(Started, Execution), EngineError> {
        let (id, mailbox, loaded) = match self.begin(saga, input, opts).await? {
            Begun::New(id, mailbox, loaded) => (id, mailbox, loaded),
            Begun::Found(id) => {
                let ex = match timeout {
                    Some(t) => self.wait_timeout(id, t).await?,
                    None => self.wait(id).await?,
                };
                return Ok((Started { id, created: false }, ex));
            }
        };
        let started = Started { id, created: true };
        if timeout == Some(Duration::ZERO) {
            let ex = loaded.ex.clone();
            tokio::spawn(drive(self.inner.clone(), id, mailbox, Some(loaded)));
            return Ok((started, ex));
        }
        let driven = InlineThenSpawn {
            driver: Some(Box::pin(drive(
                self.inner.clone(),
                id,
                mailbox,
                Some(loaded),
            ))),
            inner: &self.inner,
            id,
        }
        .await;
        // However this call ends, a waiter it registered goes.
        let _guard = WaitGuard {
            inner: &self.inner,
            id,
        };
        let rx = match driven {
            Driven::Ended(Some(ex)) if ex.status.is_terminal() || ex.status == Status::Paused => {
                return Ok((started, ex))
            }
            // It waits in the store (a long backoff): wait for it there.
            Driven::Ended(_) => {
                let ex = match timeout {
                    Some(t) => self.wait_timeout(id, t).await?,
                    None => self.wait(id).await?,
                };
                return Ok((started, ex));
            }
            Driven::Spawned(rx) => rx,
        };
        let ex = match timeout {
            None => self.waited(id, rx).await?,
            Some(t) => match tokio::time::timeout(t, self.waited(id, rx)).await {
                Ok(r) => r?,
                Err(_) => self.get(id).await?,
            },
        };
        Ok((started, ex))
    }

    /// Waits until the execution is terminal or paused; gives its state.
    pub async fn wait(&self, id: ExecutionId) -> Result<Execution, EngineError> {
        // However this wait ends (answered, failed, timed out, dropped), its
        // entry goes, so waiting leaves nothing behind in memory. (Declared
        // before the receiver, so dropped after it.)
        let _guard = WaitGuard {
            inner: &self.inner,
            id,
        };
        let (tx, rx) = oneshot::channel();
        lock(&self.inner.waiters).entry(id).or_default().push(tx);
        // Registered first, then read: a change after the read is notified.
        let ex = self.get(id).await?;
        if ex.status.is_terminal() || ex.status == Status::Paused {
            return Ok(ex);
        }
        self.waited(id, rx).await
    }

    /// Waits for `rx`, a waiter registered for `id`, to be answered. On a
    /// shared store the execution may be driven by another process, whose
    /// changes reach this one only through the store: it is read too.
    async fn waited(
        &self,
        id: ExecutionId,
        mut rx: oneshot::Receiver<Execution>,
    ) -> Result<Execution, EngineError> {
        let mut stop = self.inner.stop.subscribe();
        if self.inner.store.leases().is_some() {
            let mut every = Duration::from_millis(20);
            loop {
                tokio::select! {
                    r = &mut rx => return r.map_err(|_| EngineError::ShuttingDown),
                    _ = stop.wait_for(|s| *s) => return Err(EngineError::ShuttingDown),
                    _ = tokio::time::sleep(every) => {}
                }
                every = (every * 2).min(Duration::from_millis(250));
                if lock(&self.inner.active).contains_key(&id) {
                    // Driven here: its driver wakes this waiter.
                    continue;
                }
                let ex = self.get(id).await?;
                if ex.status.is_terminal() || ex.status == Status::Paused {
                    return Ok(ex);
                }
            }
        }
        tokio::select! {
            r = rx => r.map_err(|_| EngineError::ShuttingDown),
            _ = stop.wait_for(|s| *s) => Err(EngineError::ShuttingDown),
        }
    }

    /// Like [`wait`](Self::wait), for at most `timeout`; gives the state at
    /// that moment when it runs out.
    pub async fn wait_timeout(
        &self,
        id: ExecutionId,
        timeout: Duration,
    ) -> Result<Execution, EngineError> {
        match tokio::time::timeout(timeout, self.wait(id)).await {
            Ok(r) => r,
            Err(_) => self.get(id).await,
        }
    }

    /// The execution's durable state.
    pub async fn get(&self, id: ExecutionId) -> Result<Execution, EngineError> {
        self.inner
            .store
            .load(id)
            .await?
            .ok_or(EngineError::NotFound(id))
    }

    /// A page of executions, newest first (`limit` at most 1000).
    pub async fn list(&self, mut query: ListQuery) -> Result<Page, EngineError> {
        query.limit = query.limit.clamp(1, 1000);
        Ok(self.inner.store.list(&query).await?)
    }

    /// Delivers a `callback` step's outcome (minos' `execute(response)`).
    /// The same reply again has no second effect.
    pub async fn reply(
        &self,
        id: ExecutionId,
        step: &str,
        reply: Reply,
    ) -> Result<Execution, EngineError> {
        let ex = self.get(id).await?;
        let def = self.inner.definition(&ex.saga, ex.saga_version).await?;
        let index = def
            .step_index(step)
            .ok_or_else(|| EngineError::UnknownStep {
                saga: ex.saga.to_string(),
                step: step.to_string(),
            })?;
        self.send(id, Event::Reply { step: index, reply }).await
    }

    /// `autocommit: false`: runs the confirms of an execution awaiting commit.
    pub async fn commit(&self, id: ExecutionId) -> Result<Execution, EngineError> {
        self.send(id, Event::Commit).await
    }

    /// `autocommit: false`: compensates an execution awaiting commit.
    pub async fn reject(&self, id: ExecutionId) -> Result<Execution, EngineError> {
        self.send(id, Event::Reject).await
    }

    /// Stops a running or paused execution and compensates what it did.
    pub async fn cancel(&self, id: ExecutionId) -> Result<Execution, EngineError> {
        self.send(id, Event::Cancel).await
    }

    /// Resumes a `failed` execution's unfinished compensations or confirms.
    pub async fn retry(&self, id: ExecutionId) -> Result<Execution, EngineError> {
        self.send(id, Event::Retry).await
    }

    /// Resumes every execution that had work under way when the last
    /// process stopped: calls in flight are made again (same idempotency
    /// key), rollbacks go on. Paused executions keep waiting; terminal ones
    /// are left alone. Reads the store in pages.
    ///
    /// On a shared store (PostgreSQL) it claims what nobody holds: the
    /// executions whose process died (once their lease ran out) and those
    /// copied in by a migration; the scheduler goes on claiming the ones
    /// whose lease runs out later.
    pub async fn recover(&self) -> Result<RecoveryReport, EngineError> {
        let inner = &self.inner;
        let mut report = RecoveryReport::default();
        if inner.store.leases().is_some() {
            loop {
                let n = claim_work(inner, inner.clock.now_ms(), true).await?;
                report.resumed += n;
                if n == 0 {
                    if inner.permits.available_permits() > 0 {
                        break;
                    }
                    // Every slot is busy: wait for one.
                    let p = inner
                        .permits
                        .clone()
                        .acquire_owned()
                        .await
                        .map_err(|_| EngineError::ShuttingDown)?;
                    drop(p);
                }
            }
            inner.wake.notify_one();
            tracing::info!(resumed = report.resumed, "recovery done");
            return Ok(report);
        }
        let mut cursor = None;
        loop {
            let page = inner.store.unfinished(cursor, 512).await?;
            for ex in page.items {
                if lock(&inner.active).contains_key(&ex.id) {
                    continue;
                }
                let def = match inner.definition(&ex.saga, ex.saga_version).await {
                    Ok(d) => d,
                    Err(e) => {
                        tracing::error!(execution = %ex.id, error = %e, "cannot recover: definition missing");
                        continue;
                    }
                };
                let permit = inner.permit().await?;
                let id = ex.id;
                let Some(rx) = inner.mailbox(id) else {
                    continue;
                };
                tokio::spawn(drive(
                    inner.clone(),
                    id,
                    rx,
                    Some(Loaded {
                        ex,
                        def,
                        calls: Vec::new(),
                        permit,
                        lease: None,
                        resume: true,
                    }),
                ));
                report.resumed += 1;
            }
            cursor = page.next_cursor;
            if cursor.is_none() {
                break;
            }
        }
        // Paused executions with deadlines, backoffs: the scheduler's job.
        inner.wake.notify_one();
        tracing::info!(resumed = report.resumed, "recovery done");
        Ok(report)
    }

    /// Stops the scheduler and refuses new starts. Calls under way finish
    /// or are left to recovery.
    pub fn shutdown(&self) {
        let _ = self.inner.stop.send(true);
        self.inner.wake.notify_one();
    }

    /// On a shared store, gives up every lease of this process, so that
    /// the other processes take its executions over at once instead of
    /// when the leases run out. Call it last, after [`shutdown`](Self::shutdown)
    /// and once the calls under way had their time: a driver still running
    /// here loses its execution at its next write.
    pub async fn release_leases(&self) -> Result<(), EngineError> {
        if let Some(leases) = self.inner.store.leases() {
            leases.release_all().await?;
        }
        Ok(())
    }

    /// Executions with a driver in this process now.
    pub fn active(&self) -> usize {
        lock(&self.inner.active).len()
    }

    /// Callers blocked in [`wait`](Self::wait) now, counted by execution.
    pub fn waiting_callers(&self) -> usize {
        lock(&self.inner.waiters).len()
    }

    async fn send(&self, id: ExecutionId, event: Event) -> Result<Execution, EngineError> {
        let (tx, rx) = oneshot::channel();
        deliver(&self.inner, id, event, Some(tx));
        rx.await.map_err(|_| EngineError::ShuttingDown)?
    }
}

struct WaitGuard<'a> {
    inner: &'a Inner,
    id: ExecutionId,
}

impl Drop for WaitGuard<'_> {
    fn drop(&mut self) {
        let mut waiters = lock(&self.inner.waiters);
        if let Some(ws) = waiters.get_mut(&self.id) {
            ws.retain(|w| !w.is_closed());
            if ws.is_empty() {
                waiters.remove(&self.id);
            }
        }
    }
}

/// What [`Engine::begin`] did.
// Made once per start and taken apart at once: not worth a box.
#[allow(clippy::large_enum_variant)]
enum Begun {
    /// The execution existed (an idempotent start).
    Found(ExecutionId),
    /// Created and journaled: its mailbox and the state its driver starts from.
    New(ExecutionId, Mailbox, Loaded),
}

type DriverFuture = std::pin::Pin<Box<dyn std::future::Future<Output = Option<Execution>> + Send>>;

/// What became of a driver run by [`InlineThenSpawn`].
enum Driven {
    /// It ended in the caller's task, with the state it left (`None` when
    /// that is not known to be the journaled one).
    Ended(Option<Execution>),
    /// It had to wait and went on in a task of its own; the receiver is
    /// answered when the execution is terminal or paused.
    Spawned(oneshot::Receiver<Execution>),
}

/// Polls a driver once in the current task. If it has to wait, registers a
/// waiter for its execution and hands it to a task of its own, which polls
/// it again at once (so what it waits for wakes that task from then on).
/// The waiter is in place before the driver can go on, so no change is
/// missed; and none is needed when the driver ends in this poll.
struct InlineThenSpawn<'a> {
    driver: Option<DriverFuture>,
    inner: &'a Inner,
    id: ExecutionId,
}

impl std::future::Future for InlineThenSpawn<'_> {
    type Output = Driven;
    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Driven> {
        let Some(mut driver) = self.driver.take() else {
            // Polled again after it was ready: nothing is left to do.
            return std::task::Poll::Ready(Driven::Ended(None));
        };
        std::task::Poll::Ready(match driver.as_mut().poll(cx) {
            std::task::Poll::Ready(ex) => Driven::Ended(ex),
            std::task::Poll::Pending => {
                let (tx, rx) = oneshot::channel();
                lock(&self.inner.waiters)
                    .entry(self.id)
                    .or_default()
                    .push(tx);
                tokio::spawn(driver);
                Driven::Spawned(rx)
            }
        })
    }
}

/// Hands an event to the execution's driver, starting one (which loads the
/// state from the store) when there is none.
fn deliver(inner: &Arc<Inner>, id: ExecutionId, event: Event, reply: Option<Reply_>) {
    // Boxed: a queue's slots stay small (most executions never get a
    // message, and those that do, few).
    let msg = Box::new(Msg { event, reply });
    let mut active = lock(&inner.active);
    if let Some(inbox) = active.get_mut(&id) {
        inbox.queue.push_back(msg);
        let waker = inbox.waker.take();
        drop(active);
        if let Some(w) = waker {
            w.wake();
        }
        return;
    }
    let token = inner
        .inboxes
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    active.insert(
        id,
        Inbox {
            token,
            queue: std::collections::VecDeque::from([msg]),
            waker: None,
        },
    );
    drop(active);
    let rx = Mailbox {
        inner: inner.clone(),
        id,
        token,
        left: false,
    };
    tokio::spawn(drive(inner.clone(), id, rx, None));
}

struct Loaded {
    ex: Execution,
    def: Arc<Plan>,
    calls: Vec<Call>,
    permit: OwnedSemaphorePermit,
    /// The epoch of this process's lease on it, on a shared store.
    lease: Option<u64>,
    /// Loaded from the store after a restart: what was in flight was
    /// interrupted. Applied before anything else reaches the driver (a
    /// timer or a message first would start a call that this Resume would
    /// then take for interrupted, and call again).
    resume: bool,
}

type CallResult = (Call, Result<Value, StepError>, Duration);

/// An execution's status and what it awaited, before a transition.
type Was = (Status, Option<sagatx_core::Awaiting>);

struct Driver {
    inner: Arc<Inner>,
    ex: Execution,
    def: Arc<Plan>,
    input: Arc<Value>,
    /// Who started the execution (set at its start, never changed), made
    /// once for every call's context rather than copied at each call.
    user: Option<Arc<str>>,
    /// Calls under way in tasks of their own (made on the first).
    calls: Option<JoinSet<CallResult>>,
    /// The state in memory may differ from the journaled one (a write
    /// failed): read it back before the next event.
    stale: bool,
    /// The status before, and the calls of, the transition whose journal
    /// write failed in a way that may have committed all the same (the
    /// state it wrote is the one in memory, until the resync).
    unconfirmed: Option<(Was, Vec<Call>)>,
    /// The epoch of this process's lease, on a shared store.
    lease: Option<u64>,
    /// Another process took the execution over: this driver stops.
    lost: bool,
    /// Outcomes of local calls that finished on their first poll, to apply
    /// before anything else (no task was spawned for them).
    ready: std::collections::VecDeque<CallResult>,
    /// The results step contexts see, kept up to date as steps succeed
    /// (results are only ever added): shared by every call, and extended
    /// in place once the calls that saw the older map are done.
    results: Option<Arc<crate::Results>>,
}

/// Drives one execution, in a `tracing` span that names it.
async fn drive(
    inner: Arc<Inner>,
    id: ExecutionId,
    rx: Mailbox,
    loaded: Option<Loaded>,
) -> Option<Execution> {
    use tracing::Instrument;
    let span = tracing::info_span!("execution", id = %id);
    drive_inner(inner, id, rx, loaded).instrument(span).await
}

async fn drive_inner(
    inner: Arc<Inner>,
    id: ExecutionId,
    mut rx: Mailbox,
    loaded: Option<Loaded>,
) -> Option<Execution> {
    let (mut d, calls, _permit) = match loaded {
        Some(l) => {
            let mut d = Driver::new(inner.clone(), l.ex, l.def);
            d.lease = l.lease;
            if l.resume {
                d.apply_internal(Event::Resume).await;
            }
            (d, l.calls, l.permit)
        }
        None => {
            let permit = match inner.permits.clone().acquire_owned().await {
                Ok(p) => p,
                Err(_) => return None,
            };
            match take(&inner, id).await {
                Ok(Taken::Mine(ex, def, lease)) => {
                    let mut d = Driver::new(inner.clone(), *ex, def);
                    d.lease = lease;
                    // Whatever was in flight was interrupted.
                    d.apply_internal(Event::Resume).await;
                    (d, Vec::new(), permit)
                }
                Ok(Taken::Elsewhere) => {
                    // Another process drives it: hand the requests over.
                    drain(&mut rx, |m| {
                        if let (Some(reply), Some(cmd)) = (m.reply, command_of(&m.event)) {
                            let inner = inner.clone();
                            tokio::spawn(async move {
                                let _ = reply.send(forward(&inner, id, cmd).await);
                            });
                        }
                    });
                    return None;
                }
                Err(e) => {
                    // Answer everything queued, then leave.
                    let msg = e.to_string();
                    drain(&mut rx, |m| {
                        if let Some(r) = m.reply {
                            let _ = r.send(Err(match &e {
                                EngineError::NotFound(id) => EngineError::NotFound(*id),
                                _ => EngineError::Store(StoreError::Io(msg.clone())),
                            }));
                        }
                    });
                    return None;
                }
            }
        }
    };
    let in_flight = metrics::gauge!("sagatx_executions_in_flight");
    in_flight.increment(1.0);
    for c in calls {
        d.spawn_call(c);
    }
    loop {
        if d.lost {
            // The journal belongs to another process now: what is in flight
            // here is abandoned (the new holder calls it again, same key)
            // and what is queued is answered.
            if let Some(calls) = &mut d.calls {
                calls.abort_all();
            }
            drain(&mut rx, |m| {
                if let Some(r) = m.reply {
                    let _ = r.send(Err(EngineError::Store(StoreError::LeaseLost(id))));
                }
            });
            in_flight.decrement(1.0);
            return None;
        }
        if let Some(done) = d.ready.pop_front() {
            d.finished(done).await;
            continue;
        }
        let now = inner.clock.now_ms();
        let due = d.ex.next_due_ms();
        let sleep_to = due.filter(|&t| t <= now + inner.idle_horizon_ms);
        let busy = d.has_calls() || !d.ready.is_empty() || sleep_to.is_some();
        if !busy && rx.leave_if_empty() {
            break;
        }
        let deadline = inner.clock.instant_at(sleep_to.unwrap_or(now + 3_600_000));
        tokio::select! {
            m = rx.recv() => {
                let Some(m) = m else { break };
                let r = d.apply(m.event).await.map(|()| d.ex.clone());
                if let Some(reply) = m.reply {
                    let _ = reply.send(r);
                }
            }
            Some(done) = next_call(&mut d.calls), if d.has_calls() => {
                match done {
                    Ok(done) => d.finished(done).await,
                    Err(e) => tracing::error!(execution = %id, error = %e, "call task failed"),
                }
            }
            _ = tokio::time::sleep_until(deadline), if sleep_to.is_some() => {
                d.apply_internal(Event::Tick).await;
            }
        }
    }
    in_flight.decrement(1.0);
    // A terminal write gave the lease up already.
    if let (Some(leases), Some(epoch)) = (inner.store.leases(), d.lease) {
        if !d.ex.status.is_terminal() {
            leases.release(id, epoch).await;
        }
    }
    // What run() hands back when the driver ended in its task: the state
    // as journaled, unless a write failed or another process took over.
    (!d.stale && !d.lost).then_some(d.ex)
}

/// The next call task to finish; never, without any.
async fn next_call(
    calls: &mut Option<JoinSet<CallResult>>,
) -> Option<Result<CallResult, tokio::task::JoinError>> {
    match calls {
        Some(c) => c.join_next().await,
        None => std::future::pending().await,
    }
}

/// Answers every message queued for a driver that is leaving, and takes it
/// out of the active map once none is left.
fn drain(rx: &mut Mailbox, mut each: impl FnMut(Box<Msg>)) {
    loop {
        for m in rx.take_all() {
            each(m);
        }
        if rx.leave_if_empty() {
            return;
        }
    }
}

enum Taken {
    Mine(Box<Execution>, Arc<Plan>, Option<u64>),
    Elsewhere,
}

/// Loads an execution for a new driver; on a shared store, claims it.
async fn take(inner: &Arc<Inner>, id: ExecutionId) -> Result<Taken, EngineError> {
    let Some(leases) = inner.store.leases() else {
        let (ex, def) = load(inner, id).await?;
        return Ok(Taken::Mine(Box::new(ex), def, None));
    };
    match leases.claim(id).await? {
        Claim::Mine { ex, epoch } => {
            let def = match inner.definition(&ex.saga, ex.saga_version).await {
                Ok(d) => d,
                Err(e) => {
                    leases.release(id, epoch).await;
                    return Err(e);
                }
            };
            Ok(Taken::Mine(ex, def, Some(epoch)))
        }
        Claim::Held => Ok(Taken::Elsewhere),
        Claim::Missing => Err(EngineError::NotFound(id)),
    }
}

/// The command an external event is, for handing it to another process.
fn command_of(event: &Event) -> Option<Command> {
    Some(match event {
        Event::Reply { step, reply } => Command::Reply {
            step: *step,
            reply: reply.clone(),
        },
        Event::Commit => Command::Commit,
        Event::Reject => Command::Reject,
        Event::Cancel => Command::Cancel,
        Event::Retry => Command::Retry,
        _ => return None,
    })
}

fn event_of(command: Command) -> Event {
    match command {
        Command::Reply { step, reply } => Event::Reply { step, reply },
        Command::Commit => Event::Commit,
        Command::Reject => Event::Reject,
        Command::Cancel => Event::Cancel,
        Command::Retry => Event::Retry,
    }
}

/// How long a forwarded command waits for the process that holds the
/// execution.
const FORWARD_TIMEOUT: Duration = Duration::from_secs(30);

/// Hands a command to the process that drives the execution and waits for
/// its outcome. When that process lets the execution go meanwhile (its
/// driver went idle, or it died and its lease ran out), this process
/// claims the execution and applies the command itself.
async fn forward(
    inner: &Arc<Inner>,
    id: ExecutionId,
    cmd: Command,
) -> Result<Execution, EngineError> {
    let Some(leases) = inner.store.leases() else {
        return Err(EngineError::ShuttingDown);
    };
    let inbox = leases.forward(id, &cmd).await?;
    let started = Instant::now();
    let mut pause = Duration::from_millis(5);
    let mut polls = 0u32;
    loop {
        if let Some(outcome) = leases.forwarded(inbox).await? {
            return match outcome {
                Outcome::Applied => inner.store.load(id).await?.ok_or(EngineError::NotFound(id)),
                Outcome::NotFound => Err(EngineError::NotFound(id)),
                Outcome::Conflict(m) => Err(EngineError::Remote {
                    conflict: true,
                    message: m,
                }),
                Outcome::Failed(m) => Err(EngineError::Remote {
                    conflict: false,
                    message: m,
                }),
            };
        }
        if started.elapsed() > FORWARD_TIMEOUT {
            return Err(EngineError::Remote {
                conflict: false,
                message: format!(
                    "the process that drives execution {id} did not answer within {} s; \
                     the request may still be applied: read the execution before sending it again",
                    FORWARD_TIMEOUT.as_secs()
                ),
            });
        }
        polls += 1;
        if polls.is_multiple_of(8) && !lock(&inner.active).contains_key(&id) {
            // Nobody may hold it now: a driver here claims it if it can,
            // and then takes the command from the inbox.
            deliver(inner, id, Event::Tick, None);
            inner.wake.notify_one();
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(50));
    }
}

async fn load(inner: &Arc<Inner>, id: ExecutionId) -> Result<(Execution, Arc<Plan>), EngineError> {
    let ex = inner
        .store
        .load(id)
        .await?
        .ok_or(EngineError::NotFound(id))?;
    let def = inner.definition(&ex.saga, ex.saga_version).await?;
    Ok((ex, def))
}

impl Driver {
    fn new(inner: Arc<Inner>, ex: Execution, def: Arc<Plan>) -> Self {
        let input = ex.input.clone();
        let user = ex.user.as_deref().map(Arc::from);
        Driver {
            inner,
            ex,
            def,
            input,
            user,
            calls: None,
            stale: false,
            unconfirmed: None,
            lease: None,
            lost: false,
            ready: std::collections::VecDeque::new(),
            results: None,
        }
    }

    fn has_calls(&self) -> bool {
        self.calls.as_ref().is_some_and(|c| !c.is_empty())
    }

    /// The results of the steps that succeeded so far.
    fn results(&mut self) -> Arc<crate::Results> {
        let succeeded = self.ex.steps.iter().filter(|s| s.result.is_some()).count();
        let stale = self
            .results
            .as_ref()
            .is_some_and(|r| succeeded < r.len() || r.names().steps.len() != self.ex.steps.len());
        if stale {
            // Not expected (a journaled result went away): start afresh.
            self.results = None;
        }
        let ex = &self.ex;
        // The names are this execution's own, not the plan's (one count
        // shared by every execution would bounce between cores).
        let results = self.results.get_or_insert_with(|| {
            Arc::new(crate::Results::new(Arc::new(crate::saga::Names {
                saga: ex.saga.clone(),
                steps: ex.steps.iter().map(|s| s.name.clone()).collect(),
            })))
        });
        if succeeded != results.len() {
            let r = Arc::make_mut(results);
            for (i, s) in self.ex.steps.iter().enumerate() {
                if let Some(v) = &s.result {
                    if !r.has(i) {
                        r.insert(i, v.clone());
                    }
                }
            }
        }
        results.clone()
    }

    /// Applies an event: the machine changes the state in place, the new
    /// state is journaled, then the calls are made. When the write fails,
    /// the state in memory is no longer known to be the journaled one: it
    /// is read back from the store ([`resync`](Self::resync)) before the
    /// next event, so no copy of the state is made on the way (a copy per
    /// transition was the largest cost of an in-memory saga).
    async fn apply(&mut self, event: Event) -> Result<(), EngineError> {
        if self.stale {
            self.resync().await?;
        }
        let was = (self.ex.status, self.ex.awaiting);
        // On a conflict the machine leaves the state as it was.
        let t = self.ex.handle(&self.def, event, self.inner.env())?;
        if t.changed {
            self.ex.seq += 1;
            let started = tracing::enabled!(tracing::Level::TRACE).then(std::time::Instant::now);
            let written = match (self.inner.store.leases(), self.lease) {
                (Some(leases), Some(epoch)) => leases.append_leased(&self.ex, epoch).await,
                _ => self.inner.store.append(&self.ex).await,
            };
            if let Err(e) = written {
                self.stale = true;
                if matches!(e, StoreError::LeaseLost(_)) {
                    tracing::warn!(execution = %self.ex.id, "another process took this execution over; this one stops driving it");
                    self.lost = true;
                    return Err(e.into());
                }
                // A conflict says the write did not happen; any other
                // failure leaves it unknown: it may have committed.
                if !matches!(e, StoreError::Conflict { .. }) {
                    self.unconfirmed = Some((was, t.calls));
                }
                return Err(e.into());
            }
            if let Some(started) = started {
                tracing::trace!(execution = %self.ex.id, seq = self.ex.seq, us = started.elapsed().as_micros() as u64, "journaled");
            }
        }
        self.advanced(was, t.calls);
        Ok(())
    }

    /// After a failed write: takes the journaled state back from the
    /// store. Returns `true` when the failed write had committed after all
    /// (its answer was lost): the store then holds exactly the state that
    /// was written, which stays, and its calls are made.
    async fn resync(&mut self) -> Result<bool, EngineError> {
        let stored = self
            .inner
            .store
            .load(self.ex.id)
            .await?
            .ok_or(EngineError::NotFound(self.ex.id))?;
        self.stale = false;
        if let Some((was, calls)) = self.unconfirmed.take() {
            if stored == self.ex {
                tracing::info!(execution = %self.ex.id, "a journal write whose answer was lost had committed");
                self.advanced(was, calls);
                return Ok(true);
            }
        }
        self.ex = stored;
        Ok(false)
    }

    /// The state was journaled (it left `was`): tells who needs to know,
    /// and makes its calls.
    fn advanced(&mut self, was: Was, calls: Vec<Call>) {
        let finished = self.ex.status.is_terminal() && !was.0.is_terminal();
        let moved = (self.ex.status, self.ex.awaiting) != was;
        if moved {
            if let Some(hook) = &self.inner.on_status {
                hook(&self.ex);
            }
        }
        for c in calls {
            self.spawn_call(c);
        }
        if finished {
            let ex = &self.ex;
            let seconds = ex.updated_at_ms.saturating_sub(ex.created_at_ms) as f64 / 1000.0;
            self.def.finished(ex.status, seconds);
        }
        self.inner.notify_waiters(&self.ex);
    }

    /// Applies an event the engine itself produced (an outcome, a tick).
    /// A store that fails is retried with backoff: the outcome must not be
    /// lost while the process lives.
    async fn apply_internal(&mut self, event: Event) {
        let mut backoff = Duration::from_millis(50);
        loop {
            let r = if self.stale {
                // Did the failed write of this very event commit after all?
                match self.resync().await {
                    Ok(true) => return,
                    Ok(false) => self.apply(event.clone()).await,
                    Err(e) => Err(e),
                }
            } else {
                self.apply(event.clone()).await
            };
            match r {
                Ok(_) => return,
                Err(EngineError::Store(e))
                    if !matches!(
                        e,
                        StoreError::Conflict { .. } | StoreError::Closed | StoreError::LeaseLost(_)
                    ) =>
                {
                    // Every driver retries on its own; the log hears of
                    // it once every few seconds, not once per driver.
                    if let Some(held_back) =
                        self.inner.write_failures.ready(std::time::Instant::now())
                    {
                        tracing::warn!(
                            execution = %self.ex.id,
                            error = %e,
                            held_back,
                            "journal write failed; retrying (the same for other executions is logged at most every 10 s)"
                        );
                    }
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
                Err(e) => {
                    if !self.lost {
                        tracing::error!(execution = %self.ex.id, error = %e, "event dropped");
                    }
                    return;
                }
            }
        }
    }

    /// A call's outcome: counted, timed, and applied.
    async fn finished(&mut self, (call, outcome, took): CallResult) {
        let class = outcome.as_ref().err().map(|e| e.class);
        self.def.call(
            call.step,
            call.phase,
            crate::plan::outcome_label(class),
            took.as_secs_f64(),
        );
        self.apply_internal(Event::Outcome {
            step: call.step,
            phase: call.phase,
            attempt: call.attempt,
            outcome,
        })
        .await;
    }

    fn spawn_call(&mut self, call: Call) {
        let results = self.results();
        let step = &self.def.steps[call.step];
        let ctx = StepContext {
            origin: crate::saga::Origin::Journaled {
                id: self.ex.id,
                input: self.input.clone(),
                saga: self.ex.saga.clone(),
                step: self.ex.steps[call.step].name.clone(),
                results,
            },
            phase: call.phase,
            attempt: call.attempt,
            user: self.user.clone(),
            callback: call.phase == sagatx_core::Phase::Action
                && step.reply == sagatx_core::ReplyMode::Callback,
        };
        let timeout = self
            .def
            .attempt_timeout_ms(call.step, call.phase)
            .map(Duration::from_millis);
        let span = tracing::info_span!(
            "step",
            execution = %self.ex.id,
            saga = %self.ex.saga,
            step = %step.name,
            phase = call.phase.as_str(),
            attempt = call.attempt,
        );
        let fut: crate::saga::StepFuture = match step.endpoint(call.phase) {
            Some(Endpoint::Local) => {
                let functions = self.def.local(|| {
                    read(&self.inner.handlers)
                        .get(self.ex.saga.as_str())
                        .cloned()
                });
                match functions
                    .get(call.step)
                    .and_then(Option::as_ref)
                    .and_then(|h| h.get(call.phase))
                {
                    Some(f) => {
                        // A synchronous function, or an asynchronous one
                        // done at its first poll (no I/O, no await), needs
                        // no task: its outcome is applied by the driver
                        // next. One that is not done goes to its task,
                        // which polls it again (futures allow that) and so
                        // registers the task's waker. A panic, in the
                        // function or in that poll, is an unknown outcome.
                        let started = Instant::now();
                        let first = span.in_scope(|| {
                            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                                match f.call(ctx) {
                                    StepCall::Done(outcome) => Ok(outcome),
                                    StepCall::Future(mut fut) => {
                                        let mut cx = std::task::Context::from_waker(
                                            std::task::Waker::noop(),
                                        );
                                        match fut.as_mut().poll(&mut cx) {
                                            std::task::Poll::Ready(outcome) => Ok(outcome),
                                            std::task::Poll::Pending => Err(fut),
                                        }
                                    }
                                }
                            }))
                        });
                        match first {
                            Ok(Ok(outcome)) => {
                                self.ready.push_back((call, outcome, started.elapsed()));
                                return;
                            }
                            Ok(Err(fut)) => fut,
                            Err(_) => {
                                let outcome = Err(StepError::unknown_outcome("the step panicked"));
                                self.ready.push_back((call, outcome, started.elapsed()));
                                return;
                            }
                        }
                    }
                    None => {
                        let msg = format!(
                            "no function is registered for the {} of step {:?} of saga {:?} in this process; \
                             register the saga with Engine::builder().saga(...)",
                            call.phase, step.name, self.ex.saga
                        );
                        // Transient: retried with backoff like any passing
                        // failure (a process that has it may be started),
                        // and compensated if it runs out.
                        Box::pin(async move { Err(StepError::transient(msg)) })
                    }
                }
            }
            Some(Endpoint::Http(h)) => match &self.inner.remote {
                Some(remote) => {
                    let remote = remote.clone();
                    let h = h.clone();
                    Box::pin(async move { remote.call(&h, &ctx, timeout).await })
                }
                None => Box::pin(async move {
                    Err(StepError::permanent(
                        "this engine has no HTTP caller; HTTP steps run in `sagatx serve`",
                    ))
                }),
            },
            None => {
                Box::pin(async move { Err(StepError::permanent("no endpoint for this phase")) })
            }
        };
        self.calls
            .get_or_insert_with(JoinSet::new)
            .spawn(tracing::Instrument::instrument(
                async move {
                    let started = Instant::now();
                    let outcome = crate::saga::finish_call(fut, timeout).await;
                    (call, outcome, started.elapsed())
                },
                span,
            ));
    }
}

/// On a shared store: claims executions with work (due, or whose lease ran
/// out, and with `orphans` the unheld ones with work under way), as many
/// as there are free driver slots, and starts a driver for each. Returns
/// how many it started.
async fn claim_work(inner: &Arc<Inner>, now: u64, orphans: bool) -> Result<usize, EngineError> {
    let Some(leases) = inner.store.leases() else {
        return Ok(0);
    };
    let free = inner.permits.available_permits().min(256);
    if free == 0 {
        return Ok(0);
    }
    let claimed = leases.claim_due(now, free, orphans).await?;
    let mut started = 0;
    for c in claimed {
        let id = c.ex.id;
        let def = match inner.definition(&c.ex.saga, c.ex.saga_version).await {
            Ok(d) => d,
            Err(e) => {
                tracing::error!(execution = %id, error = %e, "cannot drive: definition missing");
                leases.release(id, c.epoch).await;
                continue;
            }
        };
        let permit = inner.permit().await?;
        let Some(rx) = inner.mailbox(id) else {
            // A driver of this process has it already (claimed while that
            // driver was finishing): give this claim back; that driver
            // goes on under no lease or stops at its next write.
            leases.release(id, c.epoch).await;
            continue;
        };
        tokio::spawn(drive(
            inner.clone(),
            id,
            rx,
            Some(Loaded {
                ex: c.ex,
                def,
                calls: Vec::new(),
                permit,
                lease: Some(c.epoch),
                resume: true,
            }),
        ));
        started += 1;
    }
    Ok(started)
}

/// On a shared store: applies the commands other processes forwarded to
/// executions this process holds, and answers them.
async fn take_commands(inner: &Arc<Inner>) -> Result<(), EngineError> {
    let Some(leases) = inner.store.leases() else {
        return Ok(());
    };
    for item in leases.take_inbox(256).await? {
        let inner = inner.clone();
        tokio::spawn(async move {
            let (tx, rx) = oneshot::channel();
            deliver(&inner, item.execution, event_of(item.command), Some(tx));
            let outcome = match rx.await {
                Ok(Ok(_)) => Outcome::Applied,
                Ok(Err(EngineError::NotFound(_))) => Outcome::NotFound,
                Ok(Err(EngineError::Conflict(c))) => Outcome::Conflict(c.to_string()),
                Ok(Err(EngineError::Remote {
                    conflict: true,
                    message,
                })) => Outcome::Conflict(message),
                Ok(Err(e)) => Outcome::Failed(e.to_string()),
                Err(_) => Outcome::Failed("the engine is shutting down".into()),
            };
            if let Some(leases) = inner.store.leases() {
                if let Err(e) = leases.answer(item.inbox_id, &outcome).await {
                    tracing::warn!(error = %e, "cannot answer a forwarded command");
                }
            }
        });
    }
    Ok(())
}

/// Finds executions whose due time came and hands them to a driver. Holds
/// the engine only weakly between polls: dropping every `Engine` handle
/// ends it.
async fn scheduler(
    inner: std::sync::Weak<Inner>,
    wake: Arc<tokio::sync::Notify>,
    mut stop: tokio::sync::watch::Receiver<bool>,
    poll: Duration,
) {
    loop {
        if *stop.borrow() {
            return;
        }
        {
            let Some(inner) = inner.upgrade() else { return };
            let now = inner.clock.now_ms();
            if inner.store.leases().is_some() {
                if let Err(e) = claim_work(&inner, now, false).await {
                    inner.poll_failed("cannot claim due executions", &e);
                }
                if let Err(e) = take_commands(&inner).await {
                    inner.poll_failed("cannot read forwarded commands", &e);
                }
            } else {
                match inner.store.due(now, 256).await {
                    Ok(ids) => {
                        for id in ids {
                            if !lock(&inner.active).contains_key(&id) {
                                deliver(&inner, id, Event::Tick, None);
                            }
                        }
                    }
                    Err(e) => inner.poll_failed("cannot read due executions", &e),
                }
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(poll) => {}
            _ = wake.notified() => {}
            _ = stop.changed() => {}
        }
    }
}
