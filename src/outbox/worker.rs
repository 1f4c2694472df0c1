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
            let lease_until = now + self.cfg.lease.as_millis() as i64;
            let Ok(mut jobs) = self
                .db
                .call(move |s| s.claim_due(now, lease_until, 1))
                .await
            else {
                break;
            };
            let Some(job) = jobs.pop() else {
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
        loop {
            if shutdown.is_requested() {
                return;
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
