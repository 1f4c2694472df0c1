//! A circuit breaker: after enough consecutive "CRM is down" failures, stop sending and probe
//! with one request at a time, backing off while the CRM stays down.
//!
//! Pure state machine; the caller passes the time in (Unix ms), so tests need no clock.

use std::time::Duration;

/// What the breaker allows now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Permit {
    /// Closed: send.
    Go,
    /// The open period is over: send one request to find out if the CRM is back.
    Probe,
    /// Open (or a probe is out): do not send before this time.
    Wait(i64),
}

/// How an attempt ended, as far as the breaker cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    /// The CRM answered (success or a definite refusal): it is up.
    Up,
    /// Unreachable, timed out, or a retryable server error: it looks down.
    Down,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Closed,
    Open { until: i64, open_for: Duration },
    HalfOpen { since: i64, open_for: Duration },
}

/// The breaker's settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BreakerConfig {
    pub failure_threshold: u32,
    pub open_for: Duration,
    pub max_open_for: Duration,
    /// A probe that has not reported after this is considered lost; another one may go.
    pub probe_timeout: Duration,
}

#[derive(Debug, Clone)]
pub struct Breaker {
    cfg: BreakerConfig,
    phase: Phase,
    failures: u32,
}

/// Whether recording a signal changed something the caller should act on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    None,
    /// The breaker opened: the CRM looks down.
    Opened,
    /// The CRM answered after the circuit had opened: the backlog can drain.
    Recovered,
}

fn ms(d: Duration) -> i64 {
    d.as_millis() as i64
}

impl Breaker {
    pub fn new(cfg: BreakerConfig) -> Self {
        Breaker {
            cfg,
            phase: Phase::Closed,
            failures: 0,
        }
    }

    pub fn permit(&mut self, now: i64) -> Permit {
        match self.phase {
            Phase::Closed => Permit::Go,
            Phase::Open { until, open_for } if now >= until => {
                self.phase = Phase::HalfOpen {
                    since: now,
                    open_for,
                };
                Permit::Probe
            }
            Phase::Open { until, .. } => Permit::Wait(until),
            Phase::HalfOpen { since, open_for } if now >= since + ms(self.cfg.probe_timeout) => {
                self.phase = Phase::HalfOpen {
                    since: now,
                    open_for,
                };
                Permit::Probe
            }
            Phase::HalfOpen { since, .. } => Permit::Wait(since + ms(self.cfg.probe_timeout)),
        }
    }

    pub fn record(&mut self, signal: Signal, now: i64) -> Transition {
        match signal {
            Signal::Up => {
                // Only the end of an outage (the circuit had opened) drains the backlog early; a
                // success between scattered failures leaves every job's back-off alone.
                let recovered = self.phase != Phase::Closed;
                self.failures = 0;
                self.phase = Phase::Closed;
                if recovered {
                    Transition::Recovered
                } else {
                    Transition::None
                }
            }
            Signal::Down => {
                self.failures = self.failures.saturating_add(1);
                match self.phase {
                    Phase::HalfOpen { open_for, .. } | Phase::Open { open_for, .. } => {
                        let open_for = (open_for * 2).min(self.cfg.max_open_for);
                        self.phase = Phase::Open {
                            until: now + ms(open_for),
                            open_for,
                        };
                        Transition::None
                    }
                    Phase::Closed if self.failures >= self.cfg.failure_threshold => {
                        self.phase = Phase::Open {
                            until: now + ms(self.cfg.open_for),
                            open_for: self.cfg.open_for,
                        };
                        Transition::Opened
                    }
                    Phase::Closed => Transition::None,
                }
            }
        }
    }

    /// A probe permit that found nothing to send: the next permit may probe at once.
    pub fn probe_unused(&mut self, now: i64) {
        if let Phase::HalfOpen { open_for, .. } = self.phase {
            self.phase = Phase::Open {
                until: now,
                open_for,
            };
        }
    }

    /// Closed: normal sending. Inline attempts only go out then; probing is the worker's job,
    /// so the backlog, not a new sale, learns first that the CRM is back.
    pub fn is_closed(&self) -> bool {
        self.phase == Phase::Closed
    }

    /// `closed`, `open` or `half_open`, for readiness and metrics.
    pub fn state_name(&self) -> &'static str {
        match self.phase {
            Phase::Closed => "closed",
            Phase::Open { .. } => "open",
            Phase::HalfOpen { .. } => "half_open",
        }
    }

    pub fn consecutive_failures(&self) -> u32 {
        self.failures
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn breaker() -> Breaker {
        Breaker::new(BreakerConfig {
            failure_threshold: 3,
            open_for: Duration::from_secs(10),
            max_open_for: Duration::from_secs(25),
            probe_timeout: Duration::from_secs(60),
        })
    }

    #[test]
    fn opens_after_the_threshold_and_probes_with_back_off() {
        let mut b = breaker();
        assert_eq!(b.record(Signal::Down, 0), Transition::None);
        assert_eq!(b.record(Signal::Down, 1), Transition::None);
        assert_eq!(b.permit(2), Permit::Go);
        assert_eq!(b.record(Signal::Down, 2), Transition::Opened);
        assert_eq!(b.permit(3), Permit::Wait(10_002));
        assert_eq!(b.permit(10_002), Permit::Probe);
        assert_eq!(
            b.permit(10_003),
            Permit::Wait(70_002),
            "one probe at a time"
        );
        // the probe failed: open twice as long
        b.record(Signal::Down, 10_500);
        assert_eq!(b.permit(10_501), Permit::Wait(30_500));
        assert_eq!(b.permit(30_500), Permit::Probe);
        b.record(Signal::Down, 30_600);
        assert_eq!(b.permit(30_601), Permit::Wait(55_600), "capped at 25 s");
        assert_eq!(b.state_name(), "open");
        assert_eq!(b.permit(55_600), Permit::Probe);
        assert_eq!(b.record(Signal::Up, 55_700), Transition::Recovered);
        assert_eq!(b.permit(55_701), Permit::Go);
        assert_eq!(b.state_name(), "closed");
    }

    #[test]
    fn a_success_resets_the_count_and_only_an_outage_recovers() {
        let mut b = breaker();
        b.record(Signal::Down, 0);
        b.record(Signal::Down, 0);
        assert_eq!(
            b.record(Signal::Up, 1),
            Transition::None,
            "the circuit never opened"
        );
        assert_eq!(b.record(Signal::Up, 2), Transition::None);
        b.record(Signal::Down, 3);
        b.record(Signal::Down, 4);
        assert_eq!(b.permit(5), Permit::Go, "the count restarted");
    }

    #[test]
    fn a_lost_probe_does_not_wedge_the_breaker() {
        let mut b = breaker();
        for t in 0..3 {
            b.record(Signal::Down, t);
        }
        assert_eq!(b.permit(10_002), Permit::Probe);
        // the probe never reports; after the probe timeout another may go
        assert_eq!(b.permit(70_002), Permit::Probe);
    }
}
