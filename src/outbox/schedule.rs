//! When to try a failed invoice again: a fixed back-off schedule with ±jitter, the CRM's
//! `Retry-After` when it sends one, and a maximum age after which the job is dead.

use std::time::Duration;

/// The retry policy, from `[outbox]` in the config.
#[derive(Debug, Clone, PartialEq)]
pub struct RetryPolicy {
    /// Delay after the 1st, 2nd, ... failed attempt; the last one repeats.
    pub steps: Vec<Duration>,
    /// A job still failing this long after its cycle started is dead.
    pub max_age: Duration,
    /// Relative jitter: 0.2 spreads each delay over ±20 %, so a backlog does not retry in lockstep.
    pub jitter: f64,
    /// `Retry-After` is honoured up to this.
    pub retry_after_cap: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        let m = |mins: u64| Duration::from_secs(mins * 60);
        RetryPolicy {
            steps: vec![
                Duration::from_secs(5),
                Duration::from_secs(30),
                m(2),
                m(10),
                m(30),
                m(60),
                m(120),
                m(240),
            ],
            max_age: m(72 * 60),
            jitter: 0.2,
            retry_after_cap: m(60),
        }
    }
}

impl RetryPolicy {
    /// The delay after `attempts` failed attempts in this cycle (1 = the first failed).
    /// `unit` is a uniform random number in `[0, 1)` (injected so tests are exact).
    pub fn delay(&self, attempts: u32, retry_after: Option<Duration>, unit: f64) -> Duration {
        if let Some(ra) = retry_after {
            return ra.clamp(Duration::from_secs(1), self.retry_after_cap);
        }
        let idx = (attempts.max(1) as usize - 1).min(self.steps.len().saturating_sub(1));
        let base = self
            .steps
            .get(idx)
            .copied()
            .unwrap_or(Duration::from_secs(5));
        let factor = 1.0 + self.jitter * (2.0 * unit.clamp(0.0, 1.0) - 1.0);
        base.mul_f64(factor.max(0.0))
    }

    /// When to try next (Unix ms), or `None` when the job has run out of time.
    pub fn next_attempt_at(
        &self,
        now_ms: i64,
        cycle_started_ms: i64,
        attempts: u32,
        retry_after: Option<Duration>,
        unit: f64,
    ) -> Option<i64> {
        let next = now_ms + self.delay(attempts, retry_after, unit).as_millis() as i64;
        let give_up = cycle_started_ms + self.max_age.as_millis() as i64;
        (next <= give_up).then_some(next)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_schedule_with_jitter_bounds() {
        let p = RetryPolicy::default();
        let secs = [5, 30, 120, 600, 1800, 3600, 7200, 14400, 14400, 14400];
        for (i, s) in secs.iter().enumerate() {
            let n = i as u32 + 1;
            assert_eq!(
                p.delay(n, None, 0.5),
                Duration::from_secs(*s),
                "attempt {n}"
            );
            assert_eq!(p.delay(n, None, 0.0), Duration::from_secs(*s).mul_f64(0.8));
            assert_eq!(p.delay(n, None, 1.0), Duration::from_secs(*s).mul_f64(1.2));
        }
    }

    #[test]
    fn retry_after_is_honoured_and_clamped() {
        let p = RetryPolicy::default();
        assert_eq!(
            p.delay(1, Some(Duration::from_secs(90)), 0.0),
            Duration::from_secs(90)
        );
        assert_eq!(
            p.delay(1, Some(Duration::ZERO), 0.0),
            Duration::from_secs(1)
        );
        assert_eq!(
            p.delay(1, Some(Duration::from_secs(86_400)), 0.0),
            Duration::from_secs(3600)
        );
    }

    #[test]
    fn gives_up_after_72_hours() {
        let p = RetryPolicy::default();
        let h = 3_600_000i64;
        assert_eq!(p.next_attempt_at(0, 0, 1, None, 0.5), Some(5_000));
        assert_eq!(p.next_attempt_at(60 * h, 0, 20, None, 0.5), Some(64 * h));
        assert_eq!(
            p.next_attempt_at(70 * h, 0, 21, None, 0.5),
            None,
            "74 h is past 72 h"
        );
        // walking the whole schedule ends dead at about 72 h with ~24 attempts
        let (mut now, mut attempts) = (0i64, 0u32);
        loop {
            attempts += 1;
            match p.next_attempt_at(now, 0, attempts, None, 0.5) {
                Some(t) => now = t,
                None => break,
            }
        }
        assert!(now <= 72 * h && now > 68 * h, "last attempt at {now}");
        // 9 attempts in the first 8 hours, then one every 4 hours: 25 in all
        assert_eq!(attempts, 25);
    }
}
