//! Test support: the proxy on 127.0.0.1:0 in front of in-process fakes, and clients.

#![allow(dead_code)]

pub mod certs;
pub mod raw;
pub mod upstream;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use pos_crm_proxy::app::{ConfigSource, Startup};
use pos_crm_proxy::config::{Config, NoEnv};
use pos_crm_proxy::demo::sample_crm::SampleCrm;
use pos_crm_proxy::demo::sample_pos::{SamplePos, SamplePosOptions};
use pos_crm_proxy::App;

/// The API key the fake CRM expects in tests.
pub const KEY: &str = "sk-test-4f1c9a7e-not-for-logs";

/// The sale request of the contract, with a customer.
pub const SALE_WITH_CUSTOMER: &str = r#"{"items":[{"id":"test-product-1","name":"Test Coffee","price":4.5,"quantity":2,"type":"product"},{"id":"test-service-1","name":"Gift Wrapping","price":1,"quantity":1,"type":"service"}],"subtotal":10,"tax":1,"total":11,"paymentMethod":"Credit Card","user":"test-cashier","warehouseId":"WH1","customerId":"customer-123","customerName":"John Doe","currency":"USD"}"#;
/// The same sale without a customer.
pub const SALE_NO_CUSTOMER: &str = r#"{"items":[{"id":"test-product-1","name":"Test Coffee","price":4.5,"quantity":2,"type":"product"},{"id":"test-service-1","name":"Gift Wrapping","price":1,"quantity":1,"type":"service"}],"subtotal":10,"tax":1,"total":11,"paymentMethod":"Cash","user":"test-cashier","warehouseId":"WH1"}"#;

/// Settings the tests vary; rendered into a real TOML file's text and parsed like one.
#[derive(Debug, Clone)]
pub struct Opts {
    pub crm: Option<(String, String)>,
    pub enabled: bool,
    pub sync_budget_ms: u64,
    pub crm_timeout_ms: u64,
    pub upstream_timeout_ms: u64,
    /// `http` unless a test needs an `https://` POS.
    pub upstream_scheme: &'static str,
    pub pool_idle_ms: u64,
    pub max_request_body: usize,
    pub max_response_body: usize,
    pub intercept_paths: Vec<String>,
    /// Short retry schedule so outbox tests run in well under a second.
    pub retry_schedule_ms: Vec<u64>,
    pub breaker_threshold: u32,
    pub admin_token: Option<String>,
    /// Reuse a data directory (restarts); a fresh temp dir otherwise.
    pub data_dir: Option<std::path::PathBuf>,
    /// TLS certificate, key and optional client CA for the listener.
    pub tls: Option<(PathBuf, PathBuf, Option<PathBuf>)>,
    /// Watch the config file this often (0: only explicit reloads).
    pub reload_poll_ms: u64,
    /// More TOML appended to the file (sections the fields above do not write).
    pub extra: String,
}

impl Default for Opts {
    fn default() -> Self {
        Opts {
            crm: None,
            enabled: true,
            sync_budget_ms: 3_000,
            crm_timeout_ms: 3_000,
            upstream_timeout_ms: 10_000,
            upstream_scheme: "http",
            pool_idle_ms: 4_000,
            max_request_body: 1024 * 1024,
            max_response_body: 8 * 1024 * 1024,
            intercept_paths: vec!["/api/sales".into()],
            retry_schedule_ms: vec![100, 200, 400],
            breaker_threshold: 3,
            admin_token: None,
            data_dir: None,
            tls: None,
            reload_poll_ms: 0,
            extra: String::new(),
        }
    }
}

impl Opts {
    pub fn with_crm(crm: &SampleCrm) -> Self {
        Opts {
            crm: Some((crm.url(), KEY.to_string())),
            ..Opts::default()
        }
    }

    pub fn toml(&self, upstream: SocketAddr, data_dir: &Path) -> String {
        let (url, key) = self.crm.clone().unwrap_or_default();
        let paths: Vec<String> = self
            .intercept_paths
            .iter()
            .map(|p| format!("{p:?}"))
            .collect();
        format!(
            r#"
[proxy]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
admin_token = "{token}"
shutdown_grace_ms = 2000
reload_poll_ms = {reload_poll}
[upstream]
url = "{scheme}://{upstream}"
timeout_ms = {upstream_timeout}
connect_timeout_ms = 1000
pool_idle_timeout_ms = {pool_idle}
[sales]
intercept_paths = [{paths}]
max_request_body_bytes = {max_req}
max_response_body_bytes = {max_resp}
[crm]
enabled = {enabled}
api_url = "{url}"
api_key = "{key}"
timeout_ms = {crm_timeout}
connect_timeout_ms = 500
sync_budget_ms = {budget}
[storage]
data_dir = {data_dir:?}
[outbox]
retry_schedule_ms = [{schedule}]
breaker_failure_threshold = {threshold}
breaker_open_ms = 200
breaker_max_open_ms = 400
poll_interval_ms = 100
drain_rate_per_sec = 500.0
{tls}
[log]
level = "debug"
{extra}
"#,
            upstream_timeout = self.upstream_timeout_ms,
            scheme = self.upstream_scheme,
            pool_idle = self.pool_idle_ms,
            paths = paths.join(", "),
            max_req = self.max_request_body,
            max_resp = self.max_response_body,
            enabled = self.enabled,
            crm_timeout = self.crm_timeout_ms,
            budget = self.sync_budget_ms,
            data_dir = data_dir.display().to_string(),
            token = self.admin_token.clone().unwrap_or_default(),
            schedule = self
                .retry_schedule_ms
                .iter()
                .map(u64::to_string)
                .collect::<Vec<_>>()
                .join(", "),
            threshold = self.breaker_threshold,
            reload_poll = self.reload_poll_ms,
            extra = self.extra,
            tls = match &self.tls {
                None => String::new(),
                Some((cert, key, ca)) => format!(
                    "[tls]\ncert = {:?}\nkey = {:?}\nclient_ca = {:?}\n",
                    cert.display().to_string(),
                    key.display().to_string(),
                    ca.as_ref()
                        .map(|c| c.display().to_string())
                        .unwrap_or_default()
                ),
            },
        )
    }
}

/// The real proxy, in process, on 127.0.0.1:0.
pub struct TestProxy {
    app: Option<App>,
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    pub upstream: SocketAddr,
    pub dir: tempfile::TempDir,
}

impl TestProxy {
    /// Writes the config file for `opts` and starts the proxy from it (so `reload` re-reads it).
    pub async fn start(upstream: SocketAddr, opts: Opts) -> TestProxy {
        let dir = tempfile::tempdir().unwrap();
        let path = Self::write_config(dir.path(), upstream, &opts);
        let config = Config::load(&path, true, &NoEnv).unwrap();
        let startup = Startup {
            source: Some(ConfigSource {
                path,
                required: true,
                env: Arc::new(NoEnv),
            }),
            ..Startup::default()
        };
        let app = App::start_with(config, startup).await.unwrap();
        TestProxy {
            addr: app.proxy_addr(),
            admin: app.admin_addr(),
            upstream,
            app: Some(app),
            dir,
        }
    }

    /// As [`TestProxy::start`], with more TOML sections.
    pub async fn start_with_extra(upstream: SocketAddr, opts: Opts, extra: &str) -> TestProxy {
        Self::start(
            upstream,
            Opts {
                extra: extra.to_string(),
                ..opts
            },
        )
        .await
    }

    fn write_config(dir: &Path, upstream: SocketAddr, opts: &Opts) -> PathBuf {
        let data_dir = opts.data_dir.clone().unwrap_or_else(|| dir.to_path_buf());
        let path = dir.join("config.toml");
        std::fs::write(&path, opts.toml(upstream, &data_dir)).unwrap();
        path
    }

    /// Replaces the config file with the one for `opts` (a reload or the watcher applies it).
    pub fn rewrite_config(&self, opts: &Opts) -> PathBuf {
        Self::write_config(self.dir.path(), self.upstream, opts)
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{}", self.admin, path)
    }

    pub fn app(&self) -> &App {
        self.app.as_ref().expect("running")
    }

    pub async fn shutdown(mut self) {
        if let Some(app) = self.app.take() {
            app.shutdown().await;
        }
    }
}

/// A fake POS, a fake CRM and the proxy in front of the POS.
pub struct Stack {
    pub pos: SamplePos,
    pub crm: SampleCrm,
    pub proxy: TestProxy,
}

impl Stack {
    pub async fn start() -> Stack {
        Self::start_with(SamplePosOptions::default(), |o| o).await
    }

    pub async fn start_with(pos_opts: SamplePosOptions, tweak: impl FnOnce(Opts) -> Opts) -> Stack {
        let pos = SamplePos::start(pos_opts).await.unwrap();
        let crm = SampleCrm::start(KEY).await.unwrap();
        let opts = tweak(Opts::with_crm(&crm));
        let proxy = TestProxy::start(pos.addr(), opts).await;
        Stack { pos, crm, proxy }
    }

    /// POSTs a sale through the proxy and returns status and JSON body.
    pub async fn sale(&self, body: &str) -> (u16, serde_json::Value, String) {
        post_sale(&self.proxy, body).await
    }
}

/// POSTs `body` to `/api/sales` through `proxy`.
pub async fn post_sale(proxy: &TestProxy, body: &str) -> (u16, serde_json::Value, String) {
    let resp = client()
        .post(proxy.url("/api/sales"))
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    let text = resp.text().await.unwrap();
    let json = serde_json::from_str(&text).unwrap_or(serde_json::Value::Null);
    (status, json, text)
}

/// Sends a request and reads its answer as JSON; panics (fails the test) on any error.
pub async fn json_of(req: reqwest::RequestBuilder) -> serde_json::Value {
    req.send().await.unwrap().json().await.unwrap()
}

/// A plain-HTTP reqwest client with a bounded timeout.
pub fn client() -> reqwest::Client {
    pos_crm_proxy::tls::install_crypto_provider();
    reqwest::Client::builder()
        .timeout(Duration::from_secs(20))
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
}

/// Creates the CRM received for a sale after it had already answered 2xx for that sale: a
/// proxy that knows a sale is invoiced never sends it again. (The sample CRM honours the
/// Idempotency-Key, so its invoice list alone could not show a duplicate send.)
pub fn creates_after_success(crm: &SampleCrm) -> usize {
    let mut created = std::collections::HashSet::new();
    let mut late = 0;
    for post in crm.invoice_posts() {
        let Some(sale) = post
            .json
            .as_ref()
            .and_then(|j| j["pos_sale_id"].as_str())
            .map(str::to_string)
        else {
            continue;
        };
        if created.contains(&sale) {
            late += 1;
        }
        if post
            .answered_status
            .is_some_and(|s| (200..300).contains(&s))
        {
            created.insert(sale);
        }
    }
    late
}

/// Removes the two values that differ between runs (sale id, timestamp) so POS answers can be
/// compared with the captures.
pub fn normalise(mut v: serde_json::Value) -> serde_json::Value {
    if let Some(o) = v.as_object_mut() {
        o.remove("saleId");
        if let Some(r) = o.get_mut("saleRecord").and_then(|r| r.as_object_mut()) {
            r.remove("id");
            r.remove("timestamp");
            if let Some(txs) = r
                .get_mut("inventoryTransactions")
                .and_then(|t| t.as_array_mut())
            {
                for t in txs {
                    if let Some(t) = t.as_object_mut() {
                        t.remove("transaction_id");
                    }
                }
            }
        }
    }
    v
}

/// A child process that is killed and reaped when dropped, so a failing assertion never
/// leaves a proxy running.
pub struct Reaped(pub std::process::Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl std::ops::Deref for Reaped {
    type Target = std::process::Child;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl std::ops::DerefMut for Reaped {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.0
    }
}
