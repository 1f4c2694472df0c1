//! Prometheus metrics (text format on the admin listener's `/metrics`).
//!
//! One [`Metrics`] per running proxy, passed down from `app.rs`, so several proxies in one test
//! process never share counters. Names follow Prometheus conventions: `_total` counters, base
//! units (seconds), a `pos_crm_proxy_` prefix.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::outbox::Health;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// `sales` or `passthrough`.
    pub route: &'static str,
    pub status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabels {
    pub state: &'static str,
}

fn latency_histogram() -> Histogram {
    // 100 µs .. ~100 s
    Histogram::new(exponential_buckets(0.0001, 2.0, 21))
}

/// Every metric the proxy exports.
pub struct Metrics {
    registry: Registry,
    pub requests: Family<RequestLabels, Counter>,
    pub upstream_duration: Family<OutcomeLabels, Histogram, fn() -> Histogram>,
    pub crm_attempts: Family<OutcomeLabels, Counter>,
    pub invoices: Family<OutcomeLabels, Counter>,
    pub outbox_jobs: Family<StateLabels, Gauge>,
    pub outbox_depth: Gauge,
    pub outbox_oldest_age: Gauge<f64, std::sync::atomic::AtomicU64>,
    pub outbox_writable: Gauge,
    pub outbox_held: Gauge,
    pub circuit: Family<StateLabels, Gauge>,
    pub reloads: Family<OutcomeLabels, Counter>,
    pub tls_handshake_failures: Counter,
    /// Handles for the label sets nearly every request uses, looked up once: a family lookup
    /// hashes the labels under a lock, on every request.
    hot: Hot,
}

struct Hot {
    passthrough_ok: Counter,
    sales_ok: Counter,
    upstream_ok: Histogram,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// One answered request.
    pub fn count_request(&self, route: &'static str, status: u16) {
        match (route, status) {
            ("passthrough", 200) => self.hot.passthrough_ok.inc(),
            ("sales", 200) => self.hot.sales_ok.inc(),
            _ => self
                .requests
                .get_or_create(&RequestLabels { route, status })
                .inc(),
        };
    }

    /// How long the POS took to answer, by outcome.
    pub fn observe_upstream(&self, outcome: &'static str, seconds: f64) {
        if outcome == "ok" {
            self.hot.upstream_ok.observe(seconds);
        } else {
            self.upstream_duration
                .get_or_create(&OutcomeLabels { outcome })
                .observe(seconds);
        }
    }

    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("pos_crm_proxy");
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "requests",
            "Requests answered, by route (sales, passthrough) and status",
            requests.clone(),
        );
        let upstream_duration =
            Family::<OutcomeLabels, Histogram, fn() -> Histogram>::new_with_constructor(
                latency_histogram,
            );
        registry.register(
            "upstream_duration_seconds",
            "Time until the POS answered with headers, by outcome (ok, error, timeout)",
            upstream_duration.clone(),
        );
        let crm_attempts = Family::<OutcomeLabels, Counter>::default();
        registry.register(
            "crm_attempts",
            "Invoice delivery attempts, by outcome (delivered, retry, held, dead)",
            crm_attempts.clone(),
        );
        let invoices = Family::<OutcomeLabels, Counter>::default();
        registry.register(
            "invoices",
            "Completed sales with a customer, by what the till was told (created, queued, failed)",
            invoices.clone(),
        );
        let outbox_jobs = Family::<StateLabels, Gauge>::default();
        registry.register("outbox_jobs", "Outbox jobs by state", outbox_jobs.clone());
        let outbox_depth = Gauge::default();
        registry.register(
            "outbox_depth",
            "Invoices not yet delivered (pending, in flight, held)",
            outbox_depth.clone(),
        );
        let outbox_oldest_age = Gauge::<f64, std::sync::atomic::AtomicU64>::default();
        registry.register(
            "outbox_oldest_age_seconds",
            "Age of the oldest invoice not yet delivered",
            outbox_oldest_age.clone(),
        );
        let outbox_writable = Gauge::default();
        registry.register(
            "outbox_writable",
            "1 when the outbox database accepts writes",
            outbox_writable.clone(),
        );
        let outbox_held = Gauge::default();
        registry.register(
            "outbox_held",
            "1 when the CRM refused the API key and the queue waits for an operator",
            outbox_held.clone(),
        );
        let circuit = Family::<StateLabels, Gauge>::default();
        registry.register(
            "crm_circuit",
            "1 for the CRM circuit breaker's current state (closed, open, half_open)",
            circuit.clone(),
        );
        let reloads = Family::<OutcomeLabels, Counter>::default();
        registry.register(
            "config_reloads",
            "Configuration reloads, by outcome (ok, error)",
            reloads.clone(),
        );
        let tls_handshake_failures = Counter::default();
        registry.register(
            "tls_handshake_failures",
            "TLS handshakes that failed or timed out",
            tls_handshake_failures.clone(),
        );
        // One statement each: a family's read guard lives to the end of its statement, and the
        // next lookup may need the write lock.
        let passthrough_ok = requests
            .get_or_create(&RequestLabels {
                route: "passthrough",
                status: 200,
            })
            .clone();
        let sales_ok = requests
            .get_or_create(&RequestLabels {
                route: "sales",
                status: 200,
            })
            .clone();
        let upstream_ok = upstream_duration
            .get_or_create(&OutcomeLabels { outcome: "ok" })
            .clone();
        let hot = Hot {
            passthrough_ok,
            sales_ok,
            upstream_ok,
        };
        Metrics {
            hot,
            registry,
            requests,
            upstream_duration,
            crm_attempts,
            invoices,
            outbox_jobs,
            outbox_depth,
            outbox_oldest_age,
            outbox_writable,
            outbox_held,
            circuit,
            reloads,
            tls_handshake_failures,
        }
    }

    /// Sets the outbox gauges from a fresh health reading (done at scrape time).
    pub fn observe_outbox(&self, h: &Health) {
        for (state, n) in [
            ("pending", h.stats.pending),
            ("in_flight", h.stats.in_flight),
            ("delivered", h.stats.delivered),
            ("dead", h.stats.dead),
            ("held", h.stats.held),
        ] {
            self.outbox_jobs
                .get_or_create(&StateLabels { state })
                .set(n as i64);
        }
        self.outbox_depth.set(h.depth as i64);
        self.outbox_oldest_age
            .set(h.oldest_waiting_age_ms.unwrap_or(0) as f64 / 1000.0);
        self.outbox_writable.set(i64::from(h.writable));
        self.outbox_held.set(i64::from(h.queue_held));
        for state in ["closed", "open", "half_open"] {
            self.circuit
                .get_or_create(&StateLabels { state })
                .set(i64::from(state == h.circuit));
        }
    }

    /// The text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }
}
