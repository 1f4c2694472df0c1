//! The background delivery worker: claims due jobs one at a time, oldest first, at a bounded
//! rate, and sleeps until the next job is due, it is woken, or shutdown.
//!
//! It sends nothing while the CRM is not configured, while the queue is held, or while the
//! circuit is open (then only one probe when the open period ends).

use std::sync::Arc;
use std::time::Duration;

use super::breaker::Permit;
use super::{Attempt, Outbox};
use crate::server::Shutdown;

/// What one [`Outbox::tick`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TickReport {
    pub attempted: usize,
    pub delivered: usize,
    pub retrying: usize,
    pub held: usize,
    pub dead: usize,
    /// Why the tick stopped early, if it was blocked.
    pub blocked: Option<Blocked>,
}

/// Why the worker is not sending.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Blocked {
    NotConfigured,
    Held,
    /// Circuit open until this Unix ms.
    CircuitOpen(i64),
}

/// At most this many deliveries per tick, so shutdown and new work are noticed.
const MAX_PER_TICK: usize = 100;
/// How often delivered jobs past their keeping time are deleted (and once at start).
const PRUNE_EVERY: Duration = Duration::from_secs(3600);
/// Jobs deleted per transaction.
const PRUNE_BATCH: usize = 500;
/// Transactions per round at most, so a large backlog (the first start after an upgrade) does
/// not hold up deliveries: the rest goes in the next rounds.
const PRUNE_BATCHES: usize = 100;

impl Outbox {
    /// Delivers the jobs that are due now, oldest first, paced by `drain_rate_per_sec`.
    pub async fn tick(&self, shutdown: &Shutdown) -> TickReport {
        let mut report = TickReport::default();
        if !self.sender.configured() {
            report.blocked = Some(Blocked::NotConfigured);
            return report;
        }
        if self.refresh_held().await {
            report.blocked = Some(Blocked::Held);
            return report;
        }
        let pace = Duration::from_secs_f64(1.0 / self.cfg.drain_rate_per_sec.max(0.001));
        while report.attempted < MAX_PER_TICK && !shutdown.is_requested() {
            let now = self.clock.now_ms();
            let probe = match self.breaker().permit(now) {
                Permit::Go => false,
                Permit::Probe => true,
                Permit::Wait(until) => {
                    report.blocked = Some(Blocked::CircuitOpen(until));
                    break;
                }
            };
            // The probe is the oldest *due* job: a job whose own back-off is not over (say, one
            // the CRM keeps refusing) is not what tells whether the CRM is back.
            let (clock, lease) = (self.clock, self.cfg.lease.as_millis() as i64);
            let claimed = self
                .db
                .write(move |s| {
                    let now = clock.now_ms();
                    s.claim_due(now, now + lease, 1)
                })
                .await
                .map(|mut jobs| jobs.pop());
            let Ok(claimed) = claimed else {
                if probe {
                    self.breaker().probe_unused(now);
                }
                break;
            };
            let Some(job) = claimed else {
                if probe {
                    self.breaker().probe_unused(now);
                }
                break;
            };
            report.attempted += 1;
            match self.attempt(job).await {
                Attempt::Delivered(_) => report.delivered += 1,
                Attempt::Retrying(_) => report.retrying += 1,
                Attempt::Held(_) => {
                    report.held += 1;
                    report.blocked = Some(Blocked::Held);
                    break;
                }
                Attempt::Dead(..) => report.dead += 1,
            }
            if probe {
                // One probe per open period; the next tick asks the breaker again.
                continue;
            }
            tokio::time::sleep(pace).await;
        }
        report
    }

    /// Deletes the delivered jobs confirmed before `before`, a batch per transaction so the
    /// writer thread (and the sales waiting on it) never waits long for the file.
    async fn prune_delivered(&self, before: i64, shutdown: &Shutdown) {
        let mut total = 0;
        loop {
            let Ok(n) = self
                .db
                .write(move |s| s.prune_delivered(before, PRUNE_BATCH))
                .await
            else {
                break; // logged by the store; tried again at the next round
            };
            total += n;
            if n < PRUNE_BATCH || total >= PRUNE_BATCH * PRUNE_BATCHES || shutdown.is_requested() {
                break;
            }
            tokio::task::yield_now().await;
        }
        if total > 0 {
            tracing::info!(
                jobs = total,
                "delivered jobs past outbox.keep_delivered_days deleted"
            );
        }
    }

    /// The worker loop; returns on shutdown.
    pub async fn run_worker(self: Arc<Self>, mut shutdown: Shutdown) {
        let now = self.clock.now_ms();
        match self.db.call(move |s| s.release_in_flight(now, true)).await {
            Ok(n) if n > 0 => tracing::info!(
                jobs = n,
                "expired leases from a previous run returned to pending"
            ),
            _ => {}
        }
        let mut next_prune = i64::MIN;
        loop {
            if shutdown.is_requested() {
                return;
            }
            if let Some(keep) = self.cfg.keep_delivered {
                let now = self.clock.now_ms();
                if now >= next_prune {
                    self.prune_delivered(now - keep.as_millis() as i64, &shutdown)
                        .await;
                    next_prune = now + PRUNE_EVERY.as_millis() as i64;
                }
            }
            let report = self.tick(&shutdown).await;
            let now = self.clock.now_ms();
            let poll = self.cfg.poll_interval;
            let wait = match report.blocked {
                Some(Blocked::CircuitOpen(until)) => {
                    Duration::from_millis((until - now).max(1) as u64).min(poll)
                }
                Some(_) => poll,
                None if report.attempted >= MAX_PER_TICK => Duration::ZERO,
                None => match self.db.call(|s| s.next_due()).await {
                    Ok(Some(due)) => Duration::from_millis((due - now).max(0) as u64).min(poll),
                    _ => poll,
                },
            };
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = self.wake.notified() => {}
                _ = shutdown.requested() => return,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    //! The worker on tokio's paused clock: hours of retry schedule run in milliseconds, and
    //! every gap is measured exactly.

    use std::collections::VecDeque;
    use std::future::Future;
    use std::pin::Pin;
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use bytes::Bytes;
    use http::StatusCode;
    use tokio::time::Instant;

    use super::super::breaker::BreakerConfig;
    use super::super::schedule::RetryPolicy;
    use super::super::store::State;
    use super::super::{Clock, Outbox, OutboxConfig, RetryTarget, Sender};
    use crate::crm::{CreatedInvoice, CrmError};
    use crate::server::Shutdown;

    /// A CRM that answers from a script (then succeeds) and records when and what it was sent.
    #[derive(Default)]
    struct Scripted {
        answers: Mutex<VecDeque<Result<CreatedInvoice, CrmError>>>,
        calls: Mutex<Vec<(Instant, String, String)>>,
        created: Mutex<u32>,
        /// Every send takes this long first.
        delay: Duration,
        /// This key is answered 500 whenever it would have been created.
        poison_key: Option<&'static str>,
    }

    fn status(code: u16, retry_after: Option<u64>) -> Result<CreatedInvoice, CrmError> {
        Err(CrmError::Status {
            status: StatusCode::from_u16(code).unwrap(),
            text: "scripted".into(),
            retry_after: retry_after.map(Duration::from_secs),
        })
    }

    impl Scripted {
        fn new(answers: Vec<Result<CreatedInvoice, CrmError>>) -> Arc<Self> {
            Arc::new(Scripted {
                answers: Mutex::new(answers.into()),
                ..Scripted::default()
            })
        }
        fn calls(&self) -> Vec<(Instant, String, String)> {
            self.calls.lock().unwrap().clone()
        }
    }

    impl Sender for Scripted {
        fn configured(&self) -> bool {
            true
        }
        fn send<'a>(
            &'a self,
            payload: Bytes,
            key: &'a str,
        ) -> Pin<Box<dyn Future<Output = Result<CreatedInvoice, CrmError>> + Send + 'a>> {
            Box::pin(async move {
                if !self.delay.is_zero() {
                    tokio::time::sleep(self.delay).await;
                }
                if self.poison_key == Some(key) && self.answers.lock().unwrap().is_empty() {
                    self.calls.lock().unwrap().push((
                        Instant::now(),
                        key.to_string(),
                        String::new(),
                    ));
                    return status(500, None);
                }
                let body = String::from_utf8_lossy(&payload).into_owned();
                self.calls
                    .lock()
                    .unwrap()
                    .push((Instant::now(), key.to_string(), body));
                let next = self.answers.lock().unwrap().pop_front();
                next.unwrap_or_else(|| {
                    let mut n = self.created.lock().unwrap();
                    *n += 1;
                    Ok(CreatedInvoice {
                        invoice_id: Some(format!("id-{n}")),
                        invoice_number: Some(format!("INV-{n}")),
                    })
                })
            })
        }
    }

    fn config(retry: RetryPolicy, threshold: u32) -> OutboxConfig {
        OutboxConfig {
            synchronous_full: true,
            retry,
            breaker: BreakerConfig {
                failure_threshold: threshold,
                open_for: Duration::from_secs(30),
                max_open_for: Duration::from_secs(300),
                probe_timeout: Duration::from_secs(60),
            },
            lease: Duration::from_secs(60),
            drain_rate_per_sec: 10.0,
            poll_interval: Duration::from_secs(1),
            keep_delivered: None,
        }
    }

    struct Rig {
        outbox: Arc<Outbox>,
        crm: Arc<Scripted>,
        stop: tokio::sync::watch::Sender<bool>,
        worker: tokio::task::JoinHandle<()>,
        _dir: tempfile::TempDir,
    }

    /// An outbox on tokio's paused clock with SQLite on the calling thread.
    fn open_outbox(dir: &tempfile::TempDir, cfg: OutboxConfig, crm: Arc<Scripted>) -> Arc<Outbox> {
        Arc::new(
            Outbox::open(
                dir.path(),
                cfg,
                crm,
                Clock::following_tokio(),
                Default::default(),
            )
            .unwrap()
            .with_inline_store(),
        )
    }

    async fn rig(crm: Arc<Scripted>, cfg: OutboxConfig) -> Rig {
        let dir = tempfile::tempdir().unwrap();
        let outbox = open_outbox(&dir, cfg, crm.clone());
        let (stop, shutdown) = Shutdown::new();
        let worker = tokio::spawn(outbox.clone().run_worker(shutdown));
        Rig {
            outbox,
            crm,
            stop,
            worker,
            _dir: dir,
        }
    }

    impl Rig {
        async fn sale(&self, id: &str) -> crate::sales::model::CrmStatus {
            let budget = Duration::from_millis(1500);
            self.outbox
                .submit(
                    id,
                    &format!("pos-sale-{id}"),
                    format!("{{\"sale\":\"{id}\"}}").into_bytes(),
                    Instant::now() + budget,
                    budget,
                )
                .await
        }
        async fn state(&self, id: &str) -> State {
            self.outbox.get(id).await.unwrap().unwrap().state
        }
        /// Lets virtual time run until `id` reaches `state` (bounded: a day of virtual time).
        async fn until(&self, id: &str, state: State) {
            for _ in 0..(24 * 60) {
                if self.state(id).await == state {
                    return;
                }
                tokio::time::sleep(Duration::from_secs(60)).await;
            }
            panic!(
                "{id} never became {state:?}; it is {:?}",
                self.state(id).await
            );
        }
        async fn stop(self) {
            let _ = self.stop.send(true);
            self.worker.await.unwrap();
        }
    }

    fn gaps(calls: &[(Instant, String, String)]) -> Vec<Duration> {
        calls.windows(2).map(|w| w[1].0 - w[0].0).collect()
    }

    fn within(gap: Duration, base_secs: f64, jitter: f64) {
        let lo = Duration::from_secs_f64(base_secs * (1.0 - jitter));
        // + pacing (100 ms) and the worker's wake-up granularity
        let hi = Duration::from_secs_f64(base_secs * (1.0 + jitter) + 1.2);
        assert!(
            gap >= lo && gap <= hi,
            "gap {gap:?} not within {lo:?}..{hi:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn retries_follow_the_schedule_with_one_key() {
        let crm = Scripted::new(vec![
            status(503, None),
            status(503, None),
            status(500, None),
        ]);
        let r = rig(crm, config(RetryPolicy::default(), 100)).await;
        let s = r.sale("S1").await;
        assert!(!s.invoice_created);
        assert_eq!(s.queued, Some(true));
        assert!(!s.service_available, "503 means the CRM is unavailable");
        r.until("S1", State::Delivered).await;
        let calls = r.crm.calls();
        assert_eq!(calls.len(), 4, "inline attempt + 3 retries");
        assert!(
            calls
                .iter()
                .all(|c| c.1 == "pos-sale-S1" && c.2 == calls[0].2),
            "same key, same frozen payload"
        );
        let g = gaps(&calls);
        within(g[0], 5.0, 0.2);
        within(g[1], 30.0, 0.2);
        within(g[2], 120.0, 0.2);
        let job = r.outbox.get("S1").await.unwrap().unwrap();
        assert_eq!(
            (job.total_attempts, job.invoice_number.as_deref()),
            (4, Some("INV-1"))
        );
        r.stop().await;
    }

    #[tokio::test(start_paused = true)]
    async fn delivered_jobs_are_deleted_after_their_keeping_time_and_nothing_else_is() {
        let crm = Scripted::new(vec![status(400, None)]);
        let mut cfg = config(RetryPolicy::default(), 100);
        cfg.keep_delivered = Some(Duration::from_secs(24 * 3600));
        cfg.poll_interval = Duration::from_secs(3600);
        let r = rig(crm, cfg).await;
        assert!(!r.sale("BAD").await.invoice_created, "400: dead");
        assert!(r.sale("OLD").await.invoice_created);
        tokio::time::sleep(Duration::from_secs(12 * 3600)).await;
        assert!(r.sale("NEW").await.invoice_created);
        // OLD is a day old within the next hourly round; NEW is 12 h old then
        tokio::time::sleep(Duration::from_secs(13 * 3600 + 60)).await;
        assert!(r.outbox.get("OLD").await.unwrap().is_none(), "pruned");
        assert_eq!(r.state("NEW").await, State::Delivered);
        assert_eq!(r.state("BAD").await, State::Dead, "waits for an operator");
        tokio::time::sleep(Duration::from_secs(12 * 3600)).await;
        assert!(
            r.outbox.get("NEW").await.unwrap().is_none(),
            "pruned in its turn"
        );
        assert_eq!(r.state("BAD").await, State::Dead);
        r.stop().await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_backlog_larger_than_one_batch_is_deleted_in_one_round() {
        let dir = tempfile::tempdir().unwrap();
        let outbox = open_outbox(
            &dir,
            config(RetryPolicy::default(), 100),
            Scripted::new(vec![]),
        );
        let n = super::PRUNE_BATCH * 2 + 1;
        {
            let mut s = super::super::lock(&outbox.db.store);
            for i in 0..n {
                let sale = format!("S{i}");
                s.enqueue(&sale, &sale, b"{}", 10, Some(20)).unwrap();
                let id = s.get(&sale).unwrap().unwrap().id;
                assert!(s.mark_delivered(id, None, None, 30).unwrap());
            }
            s.enqueue("LATE", "LATE", b"{}", 10, Some(20)).unwrap();
            let id = s.get("LATE").unwrap().unwrap().id;
            assert!(s.mark_delivered(id, None, None, 5_000).unwrap());
        }
        let (_stop, shutdown) = Shutdown::new();
        outbox.prune_delivered(1_000, &shutdown).await;
        let stats = super::super::lock(&outbox.db.store).stats().unwrap();
        assert_eq!(
            stats.delivered, 1,
            "all {n} old ones in one round, not the late one"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_refresh_that_raced_with_a_hold_does_not_release_it() {
        use std::sync::atomic::Ordering;
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(RetryPolicy::default(), 100);
        let outbox = open_outbox(&dir, cfg, Scripted::new(vec![]));
        assert!(!outbox.is_held());
        // the worker's refresh reads the file before the 401's outcome is committed ...
        let before = outbox.hold.load(Ordering::Acquire);
        // ... an attempt records the 401 and holds the queue ...
        assert!(outbox.hold(), "newly held");
        // ... and the refresh ends with its stale "nothing held"
        outbox.apply_held(false, before);
        assert!(outbox.is_held(), "a stale read does not release the hold");
        assert!(!outbox.hold(), "already held");
        // an operator released the queue (the file has nothing held, no hold since the read)
        let before = outbox.hold.load(Ordering::Acquire);
        outbox.apply_held(false, before);
        assert!(!outbox.is_held());
        // another process's hold, seen in the file
        let before = outbox.hold.load(Ordering::Acquire);
        outbox.apply_held(true, before);
        assert!(outbox.is_held());
    }

    #[tokio::test(start_paused = true)]
    async fn retry_after_is_honoured() {
        let crm = Scripted::new(vec![status(429, Some(90))]);
        let r = rig(crm, config(RetryPolicy::default(), 100)).await;
        r.sale("S1").await;
        r.until("S1", State::Delivered).await;
        let g = gaps(&r.crm.calls());
        within(g[0], 90.0, 0.0);
        r.stop().await;
    }

    #[tokio::test(start_paused = true)]
    async fn successes_of_other_sales_do_not_rush_a_job_in_back_off() {
        let crm = Scripted::new(vec![status(429, Some(600))]);
        let r = rig(crm, config(RetryPolicy::default(), 3)).await;
        r.sale("SLOW").await;
        for i in 0..5 {
            tokio::time::sleep(Duration::from_secs(30)).await;
            let s = r.sale(&format!("OK{i}")).await;
            assert!(s.invoice_created);
        }
        r.until("SLOW", State::Delivered).await;
        let calls = r.crm.calls();
        let slow: Vec<_> = calls.iter().filter(|c| c.1 == "pos-sale-SLOW").collect();
        assert_eq!(slow.len(), 2);
        assert!(
            slow[1].0 - slow[0].0 >= Duration::from_secs(600),
            "Retry-After honoured"
        );
        r.stop().await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_job_the_crm_keeps_refusing_with_500_does_not_keep_the_circuit_open() {
        // 503s open the circuit; then the CRM is back but answers 500 for the oldest job only
        let dir = tempfile::tempdir().unwrap();
        let crm = Arc::new(Scripted {
            answers: Mutex::new((0..3).map(|_| status(503, None)).collect()),
            poison_key: Some("pos-sale-POISON"),
            ..Scripted::default()
        });
        let outbox = open_outbox(&dir, config(RetryPolicy::default(), 3), crm);
        let (stop, shutdown) = Shutdown::new();
        let worker = tokio::spawn(outbox.clone().run_worker(shutdown));
        let budget = Duration::from_millis(1500);
        for id in ["POISON", "S1", "S2"] {
            outbox
                .submit(
                    id,
                    &format!("pos-sale-{id}"),
                    b"{}".to_vec(),
                    Instant::now() + budget,
                    budget,
                )
                .await;
        }
        assert_eq!(outbox.health().await.circuit, "open");
        // within a few minutes the healthy jobs are delivered and the circuit is closed,
        // whatever the poisoned one does
        tokio::time::sleep(Duration::from_secs(5 * 60)).await;
        assert_eq!(
            outbox.get("S1").await.unwrap().unwrap().state,
            State::Delivered
        );
        assert_eq!(
            outbox.get("S2").await.unwrap().unwrap().state,
            State::Delivered
        );
        assert_eq!(outbox.health().await.circuit, "closed");
        assert_eq!(
            outbox.get("POISON").await.unwrap().unwrap().state,
            State::Pending
        );
        let _ = stop.send(true);
        worker.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn an_attempt_that_outlives_its_lease_is_taken_over_and_its_late_201_still_counts() {
        let dir = tempfile::tempdir().unwrap();
        let slow = Arc::new(Scripted {
            delay: Duration::from_secs(90),
            ..Scripted::default()
        });
        let outbox = open_outbox(&dir, config(RetryPolicy::default(), 5), slow.clone());
        let (stop, shutdown) = Shutdown::new();
        let worker = tokio::spawn(outbox.clone().run_worker(shutdown));
        let budget = Duration::from_millis(1500);
        let s = outbox
            .submit(
                "S",
                "pos-sale-S",
                b"{}".to_vec(),
                Instant::now() + budget,
                budget,
            )
            .await;
        assert_eq!(s.queued, Some(true));
        tokio::time::sleep(Duration::from_secs(200)).await;
        let job = outbox.get("S").await.unwrap().unwrap();
        assert_eq!(job.state, State::Delivered);
        assert_eq!(
            job.total_attempts, 2,
            "the worker took over after the lease ran out"
        );
        assert_eq!(slow.calls().len(), 2, "same key both times");
        let _ = stop.send(true);
        worker.await.unwrap();
        outbox.shutdown(Duration::from_secs(1)).await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_job_that_keeps_failing_dies_at_max_age_and_can_be_replayed() {
        let policy = RetryPolicy {
            steps: vec![Duration::from_secs(60)],
            max_age: Duration::from_secs(600),
            jitter: 0.0,
            retry_after_cap: Duration::from_secs(60),
        };
        let crm = Scripted::new((0..100).map(|_| status(500, None)).collect());
        let r = rig(crm, config(policy, 1000)).await;
        r.sale("S1").await;
        r.until("S1", State::Dead).await;
        let n = r.crm.calls().len();
        assert_eq!(n, 11, "one attempt a minute, at 0 to 10 minutes");
        let job = r.outbox.get("S1").await.unwrap().unwrap();
        assert!(job
            .last_error
            .unwrap()
            .starts_with("gave up after 11 attempts"));
        // the operator replays it once the CRM is fixed
        r.crm.answers.lock().unwrap().clear();
        r.outbox
            .retry(RetryTarget::Sale("S1".into()))
            .await
            .unwrap();
        r.until("S1", State::Delivered).await;
        assert_eq!(r.crm.calls().len(), n + 1);
        r.stop().await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_400_is_dead_at_once_and_a_401_holds_the_queue() {
        let crm = Scripted::new(vec![status(400, None), status(401, None)]);
        let r = rig(crm, config(RetryPolicy::default(), 100)).await;
        let s = r.sale("BAD").await;
        assert_eq!((s.invoice_created, s.queued), (false, Some(false)));
        assert_eq!(r.state("BAD").await, State::Dead);
        let s = r.sale("KEY").await;
        assert_eq!((s.invoice_created, s.queued), (false, Some(true)));
        assert_eq!(r.state("KEY").await, State::Held);
        // held: later sales are queued without being sent, nothing is sent for hours
        let s = r.sale("LATER").await;
        assert_eq!(s.queued, Some(true));
        assert!(s.service_available, "the CRM answers; it refuses the key");
        assert!(s.error.unwrap().contains("held"));
        tokio::time::sleep(Duration::from_secs(6 * 3600)).await;
        assert_eq!(r.crm.calls().len(), 2, "no attempts burned while held");
        assert_eq!(r.state("LATER").await, State::Pending);
        // the operator fixed the key and releases the queue
        r.outbox.retry(RetryTarget::All(State::Held)).await.unwrap();
        r.until("KEY", State::Delivered).await;
        r.until("LATER", State::Delivered).await;
        assert_eq!(
            r.state("BAD").await,
            State::Dead,
            "dead stays dead until replayed"
        );
        r.stop().await;
    }

    #[tokio::test(start_paused = true)]
    async fn the_breaker_stops_sending_then_the_backlog_drains_oldest_first() {
        let crm = Scripted::new((0..3).map(|_| status(503, None)).collect());
        let r = rig(crm, config(RetryPolicy::default(), 3)).await;
        for i in 1..=6 {
            r.sale(&format!("S{i}")).await;
        }
        // three failures opened the circuit: S4..S6 were queued without an attempt
        assert_eq!(r.crm.calls().len(), 3);
        let s = r.outbox.health().await;
        assert_eq!(s.circuit, "open");
        // the CRM is back (the script is empty); after the open period one probe, then all
        r.until("S6", State::Delivered).await;
        let calls = r.crm.calls();
        let delivered: Vec<String> = calls[3..].iter().map(|c| c.1.clone()).collect();
        let want: Vec<String> = (1..=6).map(|i| format!("pos-sale-S{i}")).collect();
        assert_eq!(delivered, want, "exactly once each, oldest first");
        assert!(
            calls[3].0 - calls[2].0 >= Duration::from_secs(30),
            "nothing sent while open"
        );
        r.stop().await;
    }

    #[tokio::test(start_paused = true)]
    async fn the_budget_answers_the_till_and_the_attempt_goes_on() {
        let dir = tempfile::tempdir().unwrap();
        let slow = Arc::new(Scripted {
            delay: Duration::from_secs(5),
            ..Scripted::default()
        });
        let outbox = open_outbox(&dir, config(RetryPolicy::default(), 5), slow.clone());
        let start = Instant::now();
        let budget = Duration::from_millis(1500);
        let s = outbox
            .submit("S", "k", b"{}".to_vec(), start + budget, budget)
            .await;
        assert_eq!(start.elapsed(), budget, "answered exactly at the budget");
        assert_eq!((s.invoice_created, s.queued), (false, Some(true)));
        assert!(s.error.unwrap().contains("within 1500 ms"));
        outbox.shutdown(Duration::from_secs(30)).await;
        assert_eq!(
            outbox.get("S").await.unwrap().unwrap().state,
            State::Delivered
        );
        assert_eq!(slow.calls().len(), 1);
    }
}
