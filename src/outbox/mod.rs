//! The durable outbox: no invoice is lost, none is created twice.
//!
//! A completed sale with a customer becomes a job, committed to SQLite *before* the till gets
//! its answer. One delivery attempt runs inline within the sale's budget; whatever it does not
//! finish, the background [`worker`] finishes: retries on a schedule, a circuit breaker while
//! the CRM is down, a hold when the CRM refuses our key, `dead` when retrying cannot help.
//! Every attempt for a sale carries the same `Idempotency-Key`, and a delivered job is never
//! sent again.

pub mod breaker;
pub mod cli;
pub mod schedule;
pub mod store;
pub mod worker;

use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::Notify;
use tokio_util::task::TaskTracker;

use self::breaker::{Breaker, BreakerConfig, Signal, Transition};
use self::schedule::RetryPolicy;
use self::store::{Enqueued, Job, Outcome, State, Stats, Store, StoreError};
use crate::crm::{CreatedInvoice, CrmClient, CrmError, Retry};
use crate::metrics::{Metrics, OutcomeLabels};
use crate::sales::model::CrmStatus;

/// Sends an invoice to the CRM. The real one is [`CrmClient`]; tests script their own.
pub trait Sender: Send + Sync + 'static {
    /// Whether a CRM is configured at all (if not, jobs wait without burning attempts).
    fn configured(&self) -> bool;
    fn send<'a>(
        &'a self,
        payload: Bytes,
        idempotency_key: &'a str,
    ) -> Pin<Box<dyn Future<Output = Result<CreatedInvoice, CrmError>> + Send + 'a>>;
}

impl Sender for CrmClient {
    fn configured(&self) -> bool {
        self.is_configured()
    }
    fn send<'a>(
        &'a self,
        payload: Bytes,
        idempotency_key: &'a str,
    ) -> Pin<Box<dyn Future<Output = Result<CreatedInvoice, CrmError>> + Send + 'a>> {
        Box::pin(self.create_invoice(payload, idempotency_key))
    }
}

/// The time stamped on outbox rows, in Unix milliseconds.
///
/// In production it is the system's wall clock, the same one the `outbox` CLI uses, so a
/// replay by an operator is due for the running proxy at once. Paused-time tests use a clock
/// that follows tokio's, so hours of retry schedule run in milliseconds.
#[derive(Debug, Clone, Copy)]
pub enum Clock {
    System,
    FollowsTokio {
        base_unix_ms: i64,
        base: tokio::time::Instant,
    },
}

fn system_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

impl Clock {
    /// Starts at the wall clock's now and then advances with tokio's clock.
    pub fn following_tokio() -> Self {
        Clock::FollowsTokio {
            base_unix_ms: system_ms(),
            base: tokio::time::Instant::now(),
        }
    }

    pub fn now_ms(&self) -> i64 {
        match self {
            Clock::System => system_ms(),
            Clock::FollowsTokio { base_unix_ms, base } => {
                base_unix_ms + base.elapsed().as_millis() as i64
            }
        }
    }
}

/// The outbox settings (`[outbox]` in the config).
#[derive(Debug, Clone, PartialEq)]
pub struct OutboxConfig {
    pub synchronous_full: bool,
    pub retry: RetryPolicy,
    pub breaker: BreakerConfig,
    /// A claimed job belongs to its claimer this long; longer than one CRM call.
    pub lease: Duration,
    /// Backlog deliveries per second at most.
    pub drain_rate_per_sec: f64,
    /// How often the worker looks for work it was not told about (an operator's replay).
    pub poll_interval: Duration,
    /// Delivered jobs are deleted this long after their invoice was confirmed; `None` keeps
    /// them for ever.
    pub keep_delivered: Option<Duration>,
}

/// The outbox file is in use by the async runtime: the hot writes (new jobs, attempt outcomes)
/// go to one writer thread; reads and operator writes run on blocking threads.
struct Db {
    store: Arc<Mutex<Store>>,
    /// Run SQLite on the calling thread (paused-time tests, where blocking threads would let
    /// tokio's clock jump) instead of `spawn_blocking` and the writer thread.
    inline: bool,
    writable: Arc<AtomicBool>,
    /// The writer thread (see [`write_batches`]).
    writer: std::sync::mpsc::Sender<WriteOp>,
}

/// A write for the writer thread.
enum WriteOp {
    /// A new job (made durable by the batch's commit).
    Enqueue(EnqueueRequest),
    /// The end of an attempt.
    Record {
        outcome: Outcome,
        reply: tokio::sync::oneshot::Sender<Result<bool, StoreError>>,
    },
}

/// A new job waiting for the group commit.
struct EnqueueRequest {
    sale_id: String,
    key: String,
    payload: Vec<u8>,
    /// Start claimed for an inline attempt.
    attempt_now: bool,
    reply: tokio::sync::oneshot::Sender<Result<Enqueued, StoreError>>,
}

/// Largest number of writes committed together.
const MAX_GROUP: usize = 256;

/// The writer thread: commits in groups. Whatever arrived while the previous commit was being
/// flushed to disk goes into the next transaction together, so N concurrent sales cost one
/// fsync, not N, and their outcomes ride along. A lone write is committed at once; nothing
/// waits to fill a group. One thread instead of a blocking task per write: no convoy of
/// threads on the store's lock, no thread wake-up per sale.
fn write_batches(
    rx: std::sync::mpsc::Receiver<WriteOp>,
    store: Arc<Mutex<Store>>,
    writable: Arc<AtomicBool>,
    clock: Clock,
    lease_ms: i64,
) {
    while let Ok(first) = rx.recv() {
        let mut new = Vec::new();
        let mut done = Vec::new();
        let mut op = Some(first);
        while let Some(o) = op.take() {
            match o {
                WriteOp::Enqueue(r) => new.push(r),
                WriteOp::Record { outcome, reply } => done.push((outcome, reply)),
            }
            if new.len() + done.len() < MAX_GROUP {
                op = rx.try_recv().ok();
            }
        }
        let now = clock.now_ms();
        let jobs: Vec<store::NewJob<'_>> = new
            .iter()
            .map(|r| store::NewJob {
                sale_id: &r.sale_id,
                idempotency_key: &r.key,
                payload: &r.payload,
                now,
                lease_until: r.attempt_now.then_some(now + lease_ms),
            })
            .collect();
        let (outcomes, replies): (Vec<Outcome>, Vec<_>) = done.into_iter().unzip();
        let result = lock(&store).write_batch(&jobs, &outcomes);
        drop(jobs);
        writable.store(result.is_ok(), Ordering::Relaxed);
        match result {
            Ok((enqueued, recorded)) => {
                for (r, one) in new.into_iter().zip(enqueued) {
                    let _ = r.reply.send(one);
                }
                for (reply, one) in replies.into_iter().zip(recorded) {
                    let _ = reply.send(one);
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "outbox commit failed");
                let msg = e.to_string();
                for r in new {
                    let _ = r.reply.send(Err(StoreError::Task(msg.clone())));
                }
                for reply in replies {
                    let _ = reply.send(Err(StoreError::Task(msg.clone())));
                }
            }
        }
    }
}

fn lock(store: &Mutex<Store>) -> MutexGuard<'_, Store> {
    store.lock().unwrap_or_else(|p| p.into_inner())
}

impl Db {
    /// Runs a read.
    async fn call<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&mut Store) -> Result<T, StoreError> + Send + 'static,
    {
        let result = if self.inline {
            f(&mut lock(&self.store))
        } else {
            let store = self.store.clone();
            tokio::task::spawn_blocking(move || f(&mut lock(&store)))
                .await
                .unwrap_or_else(|e| Err(StoreError::Task(e.to_string())))
        };
        if let Err(e) = &result {
            tracing::error!(error = %e, "outbox store failed");
        }
        result
    }

    /// Runs a write; its outcome is what readiness reports as `writable`.
    async fn write<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&mut Store) -> Result<T, StoreError> + Send + 'static,
    {
        let result = self.call(f).await;
        self.writable.store(result.is_ok(), Ordering::Relaxed);
        result
    }

    /// The writer thread is gone (it panicked): nothing can be written any more, and readiness
    /// must say so.
    fn writer_stopped(&self) -> StoreError {
        self.writable.store(false, Ordering::Relaxed);
        StoreError::Task("the outbox writer thread has stopped".into())
    }

    /// Records an attempt's outcome through the writer thread.
    async fn record(&self, outcome: Outcome) -> Result<bool, StoreError> {
        if self.inline {
            return self.write(move |s| s.record(&outcome)).await;
        }
        let (reply, answer) = tokio::sync::oneshot::channel();
        let result = match self.writer.send(WriteOp::Record { outcome, reply }) {
            Ok(()) => answer.await.unwrap_or_else(|_| Err(self.writer_stopped())),
            Err(_) => Err(self.writer_stopped()),
        };
        if let Err(e) = &result {
            tracing::error!(error = %e, "outbox store failed");
        }
        result
    }
}

/// How one delivery attempt ended.
#[derive(Debug, Clone)]
pub enum Attempt {
    Delivered(CreatedInvoice),
    /// Will be retried at the next scheduled time.
    Retrying(CrmError),
    /// The whole queue waits for an operator (the CRM refused our credentials).
    Held(CrmError),
    /// Will not be retried: refused for good, or out of time.
    Dead(String, bool),
}

/// What readiness and operators see.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Health {
    pub writable: bool,
    /// The CRM refused the key: nothing is sent until an operator releases the queue.
    pub queue_held: bool,
    pub circuit: &'static str,
    pub crm_configured: bool,
    #[serde(flatten)]
    pub stats: Stats,
    pub depth: u64,
    pub oldest_waiting_age_ms: Option<i64>,
}

/// The outbox: store, delivery and the state shared with the worker.
pub struct Outbox {
    db: Db,
    sender: Arc<dyn Sender>,
    breaker: Mutex<Breaker>,
    cfg: OutboxConfig,
    clock: Clock,
    /// Bit 0: the queue is held (the CRM refused the key). The bits above count the holds
    /// made by this process, so a refresh from the file that raced with one cannot undo it.
    hold: AtomicU64,
    /// Wakes the worker (new work, recovery).
    wake: Notify,
    /// Every delivery attempt, so shutdown can wait for them.
    tasks: TaskTracker,
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for Outbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Outbox")
            .field("cfg", &self.cfg)
            .finish_non_exhaustive()
    }
}

impl Outbox {
    /// Opens the outbox in `data_dir`.
    pub fn open(
        data_dir: &Path,
        cfg: OutboxConfig,
        sender: Arc<dyn Sender>,
        clock: Clock,
        metrics: Arc<Metrics>,
    ) -> Result<Outbox, StoreError> {
        let store = Store::open(data_dir, cfg.synchronous_full)?;
        let held = store.any_held()?;
        let store = Arc::new(Mutex::new(store));
        let writable = Arc::new(AtomicBool::new(true));
        let (writer, rx) = std::sync::mpsc::channel();
        {
            let (store, writable) = (store.clone(), writable.clone());
            let lease_ms = cfg.lease.as_millis() as i64;
            std::thread::Builder::new()
                .name("outbox-writer".into())
                .spawn(move || write_batches(rx, store, writable, clock, lease_ms))
                .map_err(|e| {
                    StoreError::Task(format!("cannot start the outbox writer thread: {e}"))
                })?;
        }
        Ok(Outbox {
            db: Db {
                store,
                inline: false,
                writable,
                writer,
            },
            sender,
            breaker: Mutex::new(Breaker::new(cfg.breaker)),
            cfg,
            clock,
            hold: AtomicU64::new(u64::from(held)),
            wake: Notify::new(),
            tasks: TaskTracker::new(),
            metrics,
        })
    }

    /// Runs SQLite on the calling thread instead of blocking threads (for paused-time tests).
    pub fn with_inline_store(mut self) -> Self {
        self.db.inline = true;
        self
    }

    pub fn clock(&self) -> Clock {
        self.clock
    }

    fn breaker(&self) -> MutexGuard<'_, Breaker> {
        self.breaker.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Makes the invoice for a completed sale durable, tries to deliver it by `deadline` (the
    /// end of the sale's `budget`), and says what the till should see. The attempt is never
    /// cancelled by the deadline.
    pub async fn submit(
        self: &Arc<Self>,
        sale_id: &str,
        idempotency_key: &str,
        payload: Vec<u8>,
        deadline: tokio::time::Instant,
        budget: Duration,
    ) -> CrmStatus {
        let blocked = self.blocked_reason();
        let attempt_now = blocked.is_none();
        let (sale, key, body) = (
            sale_id.to_string(),
            idempotency_key.to_string(),
            payload.clone(),
        );
        let job = match tokio::time::timeout_at(
            deadline,
            self.enqueue(sale, key, body, attempt_now),
        )
        .await
        {
            Err(_) => {
                // The write goes on in the background; if it lands, the worker delivers it.
                tracing::error!(
                    sale_id,
                    "outbox did not confirm the invoice within the sale's budget"
                );
                let mut s = CrmStatus::failed(
                    true,
                    "outbox did not confirm the invoice in time; it is delivered if the write completes",
                );
                s.queued = None;
                return s;
            }
            Ok(Err(e)) => {
                return self
                    .send_without_outbox(sale_id, idempotency_key, payload, deadline, e)
                    .await
            }
            Ok(Ok(Enqueued::Existing(job))) => return status_of_existing(&job),
            Ok(Ok(Enqueued::New(job))) => job,
        };
        if let Some((reason, available)) = blocked {
            self.wake.notify_one();
            return failed(available, reason, true);
        }
        let this = self.clone();
        let attempt = self.tasks.spawn(async move { this.attempt(job).await });
        match tokio::time::timeout_at(deadline, attempt).await {
            Ok(Ok(result)) => status_of_attempt(&result),
            Ok(Err(_)) => failed(
                true,
                "internal error: delivery task failed; invoice queued".to_string(),
                true,
            ),
            Err(_) => failed(
                false,
                format!(
                    "CRM did not answer within {} ms; invoice queued for delivery",
                    budget.as_millis()
                ),
                true,
            ),
        }
    }

    /// The outbox cannot be written: one best-effort send (same idempotency key), and the frozen
    /// payload in the error log so an operator can recover it if that fails too.
    async fn send_without_outbox(
        &self,
        sale_id: &str,
        key: &str,
        payload: Vec<u8>,
        deadline: tokio::time::Instant,
        store_error: StoreError,
    ) -> CrmStatus {
        tracing::error!(
            sale_id,
            idempotency_key = key,
            payload = %String::from_utf8_lossy(&payload),
            error = %store_error,
            "outbox unavailable: invoice NOT queued; sending once without it"
        );
        if !self.sender.configured() {
            return failed(
                false,
                format!("invoice not queued: outbox unavailable ({store_error})"),
                false,
            );
        }
        match tokio::time::timeout_at(deadline, self.sender.send(Bytes::from(payload), key)).await {
            Ok(Ok(inv)) => CrmStatus::created(inv.invoice_id, inv.invoice_number),
            Ok(Err(e)) => failed(
                e.service_available(),
                format!("{e}; invoice not queued: outbox unavailable ({store_error})"),
                false,
            ),
            Err(_) => failed(
                false,
                format!("CRM did not answer in time; invoice not queued: outbox unavailable ({store_error})"),
                false,
            ),
        }
    }

    /// Makes a new job durable (group commit); the lease is stamped when the row is written.
    async fn enqueue(
        &self,
        sale_id: String,
        key: String,
        payload: Vec<u8>,
        attempt_now: bool,
    ) -> Result<Enqueued, StoreError> {
        if self.db.inline {
            let (clock, lease) = (self.clock, self.cfg.lease.as_millis() as i64);
            return self
                .db
                .write(move |s| {
                    let now = clock.now_ms();
                    s.enqueue(
                        &sale_id,
                        &key,
                        &payload,
                        now,
                        attempt_now.then_some(now + lease),
                    )
                })
                .await;
        }
        let (reply, answer) = tokio::sync::oneshot::channel();
        self.db
            .writer
            .send(WriteOp::Enqueue(EnqueueRequest {
                sale_id,
                key,
                payload,
                attempt_now,
                reply,
            }))
            .map_err(|_| self.db.writer_stopped())?;
        answer
            .await
            .unwrap_or_else(|_| Err(self.db.writer_stopped()))
    }

    /// Why an inline attempt should not be made now, and whether the CRM counts as available.
    fn blocked_reason(&self) -> Option<(String, bool)> {
        if !self.sender.configured() {
            return Some((CrmError::NotConfigured.to_string(), false));
        }
        if self.is_held() {
            // The CRM answers; it refuses our key.
            return Some((
                "CRM refused the API key; invoices are held until an operator fixes the key and replays them"
                    .into(),
                true,
            ));
        }
        if !self.breaker().is_closed() {
            return Some((
                "CRM unavailable (circuit open after repeated failures)".into(),
                false,
            ));
        }
        None
    }

    /// Sends one claimed job and records the outcome.
    async fn attempt(&self, job: Job) -> Attempt {
        let result = self
            .sender
            .send(Bytes::from(job.payload.clone()), &job.idempotency_key)
            .await;
        let now = self.clock.now_ms();
        let (id, claim) = (job.id, job.total_attempts);
        // What the attempt says about the CRM itself, for the breaker: a CRM that answers (even
        // with an error about this one invoice) is up.
        let signal = match &result {
            Err(e) if !e.service_available() => Signal::Down,
            _ => Signal::Up,
        };
        let (attempt, outcome) = match result {
            Ok(inv) => {
                let outcome = Outcome::Delivered {
                    id,
                    invoice_id: inv.invoice_id.clone(),
                    invoice_number: inv.invoice_number.clone(),
                    now,
                };
                (Attempt::Delivered(inv), outcome)
            }
            Err(e) => {
                let (error, status) = (e.to_string(), status_code(&e));
                let failed = |state, error, next_attempt_at| Outcome::Failed {
                    id,
                    claim,
                    state,
                    error,
                    status,
                    next_attempt_at,
                    now,
                };
                match e.retry() {
                    Retry::Later => {
                        let next = self.cfg.retry.next_attempt_at(
                            now,
                            job.cycle_started_at,
                            job.attempts,
                            e.retry_after(),
                            fastrand::f64(),
                        );
                        match next {
                            Some(at) => (Attempt::Retrying(e), failed(State::Pending, error, at)),
                            None => {
                                let msg = format!("gave up after {claim} attempts: {error}");
                                let outcome = failed(State::Dead, msg.clone(), now);
                                (Attempt::Dead(msg, e.service_available()), outcome)
                            }
                        }
                    }
                    // The queue is held once the outcome is on disk (below): the worker's
                    // refresh from the file must not see "nothing held" after this.
                    Retry::Hold => (Attempt::Held(e), failed(State::Held, error, now)),
                    Retry::Never => {
                        let available = e.service_available();
                        (
                            Attempt::Dead(error.clone(), available),
                            failed(State::Dead, error, now),
                        )
                    }
                }
            }
        };
        let recorded = self.db.record(outcome).await;
        if let Attempt::Held(e) = &attempt {
            if self.hold() {
                tracing::error!(error = %e, "CRM refused the API key: the invoice queue is held until an operator fixes the key and runs `outbox retry --all-held`");
            }
        }
        if let Ok(false) = recorded {
            // Another claim owns the job now (this attempt outlived its lease, or the job was
            // released at shutdown); that claim's outcome will be recorded instead.
            tracing::warn!(sale_id = %job.sale_id, attempt = claim, "outcome of a superseded attempt not recorded");
        }
        let outcome = match &attempt {
            Attempt::Delivered(_) => "delivered",
            Attempt::Retrying(_) => "retry",
            Attempt::Held(_) => "held",
            Attempt::Dead(..) => "dead",
        };
        self.metrics
            .crm_attempts
            .get_or_create(&OutcomeLabels { outcome })
            .inc();
        let transition = self.breaker().record(signal, now);
        match transition {
            Transition::Opened => tracing::warn!("CRM looks down: circuit open, deliveries paused"),
            Transition::Recovered => {
                tracing::info!("CRM answers again: draining the backlog oldest first");
                let _ = self.db.write(move |s| s.make_pending_due(now)).await;
                self.wake.notify_one();
            }
            Transition::None => {}
        }
        match &attempt {
            Attempt::Delivered(inv) => tracing::info!(
                sale_id = %job.sale_id,
                attempt = claim,
                invoice_number = inv.invoice_number.as_deref().unwrap_or("-"),
                "CRM invoice created"
            ),
            Attempt::Retrying(e) => {
                tracing::warn!(sale_id = %job.sale_id, attempt = claim, error = %e, "CRM invoice not created; will retry")
            }
            Attempt::Held(e) => {
                tracing::warn!(sale_id = %job.sale_id, error = %e, "CRM invoice held")
            }
            Attempt::Dead(e, _) => {
                tracing::error!(sale_id = %job.sale_id, error = %e, "CRM invoice dead; replay with `outbox retry`")
            }
        }
        attempt
    }

    /// Readiness and operator view.
    pub async fn health(&self) -> Health {
        let stats = self.db.call(|s| s.stats()).await.unwrap_or_default();
        let now = self.clock.now_ms();
        Health {
            writable: self.db.writable.load(Ordering::Relaxed),
            queue_held: self.is_held(),
            circuit: self.breaker().state_name(),
            crm_configured: self.sender.configured(),
            depth: stats.depth(),
            oldest_waiting_age_ms: stats.oldest_waiting_created_at.map(|t| (now - t).max(0)),
            stats,
        }
    }

    /// One sale's job.
    pub async fn get(&self, sale_id: &str) -> Result<Option<Job>, StoreError> {
        let id = sale_id.to_string();
        self.db.call(move |s| s.get(&id)).await
    }

    /// Jobs for the admin listener, newest first.
    pub async fn list(&self, state: Option<State>, limit: usize) -> Result<Vec<Job>, StoreError> {
        self.db.call(move |s| s.list(state, limit)).await
    }

    /// An operator's replay through the admin listener.
    pub async fn retry(&self, target: RetryTarget) -> Result<usize, StoreError> {
        let now = self.clock.now_ms();
        let n = match target {
            RetryTarget::Sale(id) => {
                self.db
                    .call(move |s| {
                        Ok(s.retry(&id, now)?
                            .map_or(0, |j| usize::from(j.state == State::Pending)))
                    })
                    .await?
            }
            RetryTarget::All(state) => self.db.write(move |s| s.retry_all(state, now)).await?,
        };
        self.refresh_held().await;
        self.wake.notify_one();
        Ok(n)
    }

    fn is_held(&self) -> bool {
        self.hold.load(Ordering::Acquire) & 1 == 1
    }

    /// Holds the queue (in memory; the held job is already on disk). True if it was not held.
    fn hold(&self) -> bool {
        let before = self
            .hold
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |h| Some((h + 2) | 1))
            .unwrap_or_else(|h| h);
        before & 1 == 0
    }

    /// Re-reads from the file whether any job is held: an operator may have released the
    /// queue from another process. A read that started before this process held the queue
    /// cannot release it (it could not see the held job yet): the hold count tells.
    async fn refresh_held(&self) -> bool {
        let before = self.hold.load(Ordering::Acquire);
        if let Ok(in_file) = self.db.call(|s| s.any_held()).await {
            self.apply_held(in_file, before);
        }
        self.is_held()
    }

    fn apply_held(&self, in_file: bool, before_read: u64) {
        if in_file {
            self.hold.fetch_or(1, Ordering::AcqRel);
        } else {
            // Fails, and keeps the hold, if the queue was held again since the read began.
            let _ = self.hold.compare_exchange(
                before_read,
                before_read & !1,
                Ordering::AcqRel,
                Ordering::Acquire,
            );
        }
    }

    /// Waits for running delivery attempts (at most `grace`), then puts whatever is still in
    /// flight back to `pending` for the next start.
    pub async fn shutdown(&self, grace: Duration) {
        self.tasks.close();
        if tokio::time::timeout(grace, self.tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!("delivery attempts still running at shutdown; their jobs stay queued");
        }
        let now = self.clock.now_ms();
        match self
            .db
            .write(move |s| s.release_in_flight(now, false))
            .await
        {
            Ok(0) | Err(_) => {}
            Ok(n) => tracing::info!(jobs = n, "released in-flight jobs for the next start"),
        }
    }
}

/// What an operator asks to replay.
#[derive(Debug, Clone)]
pub enum RetryTarget {
    Sale(String),
    All(State),
}

fn status_code(e: &CrmError) -> Option<u16> {
    match e {
        CrmError::Status { status, .. } | CrmError::NotJson(status) => Some(status.as_u16()),
        CrmError::Redirect { status, .. } => Some(status.as_u16()),
        _ => None,
    }
}

fn failed(service_available: bool, error: String, queued: bool) -> CrmStatus {
    let mut s = CrmStatus::failed(service_available, error);
    s.queued = Some(queued);
    s
}

fn status_of_attempt(a: &Attempt) -> CrmStatus {
    match a {
        Attempt::Delivered(inv) => {
            CrmStatus::created(inv.invoice_id.clone(), inv.invoice_number.clone())
        }
        Attempt::Retrying(e) => failed(e.service_available(), e.to_string(), true),
        Attempt::Held(e) => failed(
            true,
            format!("{e}; invoices are held until an operator fixes the API key"),
            true,
        ),
        Attempt::Dead(e, available) => failed(*available, e.clone(), false),
    }
}

/// The till's view of a sale that already had a job (the same saleId came again).
fn status_of_existing(job: &Job) -> CrmStatus {
    match job.state {
        State::Delivered => CrmStatus::created(job.invoice_id.clone(), job.invoice_number.clone()),
        State::Dead => failed(
            true,
            job.last_error
                .clone()
                .unwrap_or_else(|| "invoice is dead".into()),
            false,
        ),
        _ => failed(
            false,
            "invoice for this sale is already queued".into(),
            true,
        ),
    }
}
