//! Configuration: `config.toml` (serde, unknown keys refused) plus environment overrides,
//! validated once at start-up into one typed [`Config`] that the rest of the program trusts.
//!
//! Every error names the key it is about, so an operator can fix the file without reading code.

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use http::uri::{Authority, Scheme};
use http::Uri;
use serde::Deserialize;

use crate::outbox::breaker::BreakerConfig;
use crate::outbox::schedule::RetryPolicy;
use crate::outbox::OutboxConfig;

/// The environment variables that override the file, in the order they are applied.
pub const ENV_OVERRIDES: &[&str] = &[
    "POS_UPSTREAM_URL",
    "PROXY_LISTEN",
    "PROXY_ADMIN_LISTEN",
    "PROXY_DATA_DIR",
    "CRM_API_URL",
    "CRM_API_KEY",
    "CRM_INTEGRATION_ENABLED",
    "PROXY_LOG_LEVEL",
    "PROXY_ADMIN_TOKEN",
    "PROXY_TLS_CERT",
    "PROXY_TLS_KEY",
    "CRM_API_KEY_FILE",
    "PROXY_ADMIN_TOKEN_FILE",
];

/// A configuration problem, with the key (or variable) it is about.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("invalid value for `{key}`: {message}")]
    Invalid { key: String, message: String },
}

fn invalid(key: &str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.to_string(),
        message: message.into(),
    }
}

/// A secret string (API key). `Debug` and `Display` never show it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }
    /// The secret itself; call sites are few and each one puts it on the wire, never in a log.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret([redacted])")
    }
}

// ----- the file as written -------------------------------------------------------------------

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawConfig {
    proxy: RawProxy,
    upstream: RawUpstream,
    sales: RawSales,
    crm: RawCrm,
    storage: RawStorage,
    outbox: RawOutbox,
    tls: RawTls,
    limits: RawLimits,
    log: RawLog,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawLimits {
    max_header_bytes: usize,
    max_headers: usize,
    header_read_timeout_ms: u64,
    sale_body_read_timeout_ms: u64,
    max_connections: usize,
    h2_max_concurrent_streams: u32,
    h2_max_pending_accept_reset_streams: usize,
    h2_max_local_error_reset_streams: usize,
}

impl Default for RawLimits {
    fn default() -> Self {
        RawLimits {
            max_header_bytes: 64 * 1024,
            max_headers: 100,
            header_read_timeout_ms: 30_000,
            sale_body_read_timeout_ms: 30_000,
            max_connections: 4096,
            h2_max_concurrent_streams: 200,
            h2_max_pending_accept_reset_streams: 20,
            h2_max_local_error_reset_streams: 100,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawTls {
    cert: String,
    key: String,
    client_ca: String,
    handshake_timeout_ms: u64,
}

impl Default for RawTls {
    fn default() -> Self {
        RawTls {
            cert: String::new(),
            key: String::new(),
            client_ca: String::new(),
            handshake_timeout_ms: 10_000,
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawProxy {
    listen: String,
    admin_listen: String,
    admin_token: String,
    admin_token_file: String,
    access_log: bool,
    shutdown_grace_ms: u64,
    reload_poll_ms: u64,
    worker_threads: u64,
}

impl fmt::Debug for RawProxy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RawProxy")
            .field("listen", &self.listen)
            .field("admin_listen", &self.admin_listen)
            .finish_non_exhaustive()
    }
}

impl Default for RawProxy {
    fn default() -> Self {
        RawProxy {
            listen: "127.0.0.1:8080".into(),
            admin_listen: "127.0.0.1:9090".into(),
            admin_token: String::new(),
            admin_token_file: String::new(),
            access_log: true,
            shutdown_grace_ms: 10_000,
            reload_poll_ms: 1_000,
            worker_threads: 0,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawUpstream {
    url: String,
    connect_timeout_ms: u64,
    timeout_ms: u64,
    pool_idle_timeout_ms: u64,
    pool_max_idle_per_host: usize,
    ca_file: String,
}

impl Default for RawUpstream {
    fn default() -> Self {
        RawUpstream {
            url: "http://127.0.0.1:3000".into(),
            connect_timeout_ms: 2_000,
            timeout_ms: 120_000,
            pool_idle_timeout_ms: 4_000,
            pool_max_idle_per_host: 64,
            ca_file: String::new(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawSales {
    intercept_paths: Vec<String>,
    max_request_body_bytes: usize,
    max_response_body_bytes: usize,
    default_currency: String,
}

impl Default for RawSales {
    fn default() -> Self {
        RawSales {
            intercept_paths: vec!["/api/sales".into()],
            max_request_body_bytes: 1024 * 1024,
            max_response_body_bytes: 8 * 1024 * 1024,
            default_currency: "USD".into(),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawCrm {
    enabled: bool,
    api_url: String,
    api_key: String,
    api_key_file: String,
    connect_timeout_ms: u64,
    timeout_ms: u64,
    sync_budget_ms: u64,
    customer_cache_ttl_ms: u64,
    ca_file: String,
}

impl fmt::Debug for RawCrm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RawCrm")
            .field("enabled", &self.enabled)
            .field("api_url", &self.api_url)
            .finish_non_exhaustive()
    }
}

impl Default for RawCrm {
    fn default() -> Self {
        RawCrm {
            enabled: true,
            api_url: String::new(),
            api_key: String::new(),
            api_key_file: String::new(),
            connect_timeout_ms: 1_000,
            timeout_ms: 10_000,
            sync_budget_ms: 1_500,
            customer_cache_ttl_ms: 600_000,
            ca_file: String::new(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawStorage {
    data_dir: String,
}

impl Default for RawStorage {
    fn default() -> Self {
        RawStorage {
            data_dir: "./data".into(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawOutbox {
    synchronous_full: bool,
    retry_schedule_ms: Vec<u64>,
    max_age_ms: u64,
    jitter: f64,
    retry_after_cap_ms: u64,
    drain_rate_per_sec: f64,
    breaker_failure_threshold: u32,
    breaker_open_ms: u64,
    breaker_max_open_ms: u64,
    poll_interval_ms: u64,
    keep_delivered_days: u32,
}

impl Default for RawOutbox {
    fn default() -> Self {
        let d = RetryPolicy::default();
        RawOutbox {
            synchronous_full: true,
            retry_schedule_ms: d.steps.iter().map(|s| s.as_millis() as u64).collect(),
            max_age_ms: d.max_age.as_millis() as u64,
            jitter: d.jitter,
            retry_after_cap_ms: d.retry_after_cap.as_millis() as u64,
            drain_rate_per_sec: 10.0,
            breaker_failure_threshold: 5,
            breaker_open_ms: 30_000,
            breaker_max_open_ms: 300_000,
            poll_interval_ms: 1_000,
            keep_delivered_days: 90,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawLog {
    level: String,
    format: String,
}

impl Default for RawLog {
    fn default() -> Self {
        RawLog {
            level: "info".into(),
            format: "text".into(),
        }
    }
}

// ----- the validated configuration -----------------------------------------------------------

/// The validated configuration, built once at start-up and passed down.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    pub admin_listen: SocketAddr,
    /// Bearer token for the admin listener's write endpoints; without it they are refused.
    pub admin_token: Option<Secret>,
    /// One log line per proxied request.
    pub access_log: bool,
    /// How long in-flight requests may take to finish after a shutdown signal.
    pub shutdown_grace: Duration,
    /// How often the config file is checked for changes (`None`: only SIGHUP reloads).
    pub reload_poll: Option<Duration>,
    /// Threads serving connections; `None`: one per CPU this process may run on. One thread
    /// means a single-threaded runtime (no work-stealing scheduler), which served ~7-10 % more
    /// requests per CPU second in the `compare` benchmark on one pinned core.
    pub worker_threads: Option<usize>,
    /// TLS termination; `None` serves plain HTTP (TLS terminated elsewhere, or none).
    pub tls: Option<TlsConfig>,
    /// What a client may send and hold.
    pub limits: Limits,
    pub upstream: UpstreamConfig,
    pub sales: SalesConfig,
    pub crm: CrmConfig,
    pub data_dir: PathBuf,
    pub outbox: OutboxConfig,
    pub log: LogConfig,
}

/// Limits on clients, with safe defaults. None of them refuses passthrough traffic because of
/// the sales route's own limits (those are in [`SalesConfig`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest request head (HTTP/1 read buffer; HTTP/2 header list); larger: 431.
    pub max_header_bytes: usize,
    /// Most header fields in an HTTP/1 request; more: 431.
    pub max_headers: usize,
    /// A request head must arrive within this (slowloris); it also closes an HTTP/1
    /// keep-alive connection that stays idle this long.
    pub header_read_timeout: Duration,
    /// A sale's request body must arrive within this; else 408 and nothing reaches the POS.
    pub sale_body_read_timeout: Duration,
    /// Connections served at once; further ones wait in the listen backlog.
    pub max_connections: usize,
    pub h2_max_concurrent_streams: u32,
    pub h2_max_pending_accept_reset_streams: usize,
    pub h2_max_local_error_reset_streams: usize,
}

/// The listener's certificate, key and optional client-certificate CA.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsConfig {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// When set, clients must present a certificate signed by one of these CAs (mTLS).
    pub client_ca: Option<PathBuf>,
    pub handshake_timeout: Duration,
}

/// Where the POS is and how long it may take.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamConfig {
    pub scheme: Scheme,
    pub authority: Authority,
    pub connect_timeout: Duration,
    /// Time for the POS to answer with headers (a sale may call a slow inventory service).
    pub timeout: Duration,
    /// Idle pooled connections are dropped after this; below the POS's own 5 s keep-alive so the
    /// proxy never reuses a socket the POS is about to close.
    pub pool_idle_timeout: Duration,
    pub pool_max_idle_per_host: usize,
    /// Extra trusted roots for an `https://` POS (the system roots are always trusted).
    pub ca_file: Option<PathBuf>,
}

/// What is intercepted and how much of it is read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SalesConfig {
    pub intercept_paths: Vec<String>,
    pub max_request_body: usize,
    pub max_response_body: usize,
    pub default_currency: String,
}

/// The CRM integration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CrmConfig {
    /// `false`: the proxy is a pure passthrough, nothing is intercepted.
    pub enabled: bool,
    /// `None` when URL or key is missing: sales still pass, `crmStatus` says "not configured".
    pub endpoint: Option<CrmEndpoint>,
    pub connect_timeout: Duration,
    /// Whole-request timeout of one CRM call.
    pub timeout: Duration,
    /// How long a sale's response waits for the CRM before answering without it.
    pub sync_budget: Duration,
    pub customer_cache_ttl: Duration,
    /// Extra trusted roots for an `https://` CRM (the system roots are always trusted).
    pub ca_file: Option<PathBuf>,
}

/// A configured CRM: base URL (no trailing slash) and API key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CrmEndpoint {
    pub base_url: String,
    pub api_key: Secret,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogConfig {
    /// A `tracing` filter directive such as `info` or `pos_crm_proxy=debug,info`.
    pub level: String,
    pub format: LogFormat,
}

/// Where environment values come from; a map in tests, the process environment in `main`.
pub trait Env {
    fn var(&self, name: &str) -> Option<String>;
}

/// The process environment.
pub struct ProcessEnv;

impl Env for ProcessEnv {
    fn var(&self, name: &str) -> Option<String> {
        std::env::var(name).ok()
    }
}

impl Env for HashMap<String, String> {
    fn var(&self, name: &str) -> Option<String> {
        self.get(name).cloned()
    }
}

/// No environment at all.
pub struct NoEnv;

impl Env for NoEnv {
    fn var(&self, _: &str) -> Option<String> {
        None
    }
}

impl Config {
    /// Reads `path` (if it exists, or always when `required`), applies the environment and
    /// validates.
    pub fn load(path: &Path, required: bool, env: &dyn Env) -> Result<Config, ConfigError> {
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !required => String::new(),
            Err(source) => {
                return Err(ConfigError::Read {
                    path: path.to_path_buf(),
                    source,
                })
            }
        };
        Self::from_toml(&text, path, env)
    }

    /// Parses TOML text (named `origin` in errors), applies the environment and validates.
    pub fn from_toml(text: &str, origin: &Path, env: &dyn Env) -> Result<Config, ConfigError> {
        let mut raw: RawConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: origin.to_path_buf(),
            message: parse_message(text, &e),
        })?;
        apply_env(&mut raw, env)?;
        validate(raw)
    }
}

/// One line: what is wrong and where. Never the offending text itself (toml's own `Display`
/// quotes the line, which may be the line holding the API key).
fn parse_message(text: &str, e: &toml::de::Error) -> String {
    let what = e.message().trim().replace('\n', " ");
    match e.span() {
        Some(span) => {
            let before = &text[..span.start.min(text.len())];
            let line = before.matches('\n').count() + 1;
            let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
            // The key on that line is safe to name (only the value could be a secret).
            let key = text
                .lines()
                .nth(line - 1)
                .and_then(|l| l.split_once('='))
                .map(|(k, _)| k.trim())
                .filter(|k| {
                    !k.is_empty()
                        && k.chars()
                            .all(|c| c.is_ascii_alphanumeric() || "_.-\"".contains(c))
                });
            match key {
                Some(k) => format!("line {line}, column {column}, key `{k}`: {what}"),
                None => format!("line {line}, column {column}: {what}"),
            }
        }
        None => what,
    }
}

fn apply_env(raw: &mut RawConfig, env: &dyn Env) -> Result<(), ConfigError> {
    if let Some(v) = env.var("POS_UPSTREAM_URL") {
        raw.upstream.url = v;
    }
    if let Some(v) = env.var("PROXY_LISTEN") {
        raw.proxy.listen = v;
    }
    if let Some(v) = env.var("PROXY_ADMIN_LISTEN") {
        raw.proxy.admin_listen = v;
    }
    if let Some(v) = env.var("PROXY_DATA_DIR") {
        raw.storage.data_dir = v;
    }
    if let Some(v) = env.var("CRM_API_URL") {
        raw.crm.api_url = v;
    }
    // A secret from the environment replaces the file's, whichever form either uses.
    if let Some(v) = env.var("CRM_API_KEY_FILE") {
        raw.crm.api_key_file = v;
        raw.crm.api_key.clear();
    }
    if let Some(v) = env.var("CRM_API_KEY") {
        raw.crm.api_key = v;
        raw.crm.api_key_file.clear();
    }
    if let Some(v) = env.var("CRM_INTEGRATION_ENABLED") {
        raw.crm.enabled = parse_bool(&v).ok_or_else(|| {
            invalid(
                "CRM_INTEGRATION_ENABLED",
                format!("expected true or false, got {v:?}"),
            )
        })?;
    }
    if let Some(v) = env.var("PROXY_LOG_LEVEL") {
        raw.log.level = v;
    }
    if let Some(v) = env.var("PROXY_ADMIN_TOKEN_FILE") {
        raw.proxy.admin_token_file = v;
        raw.proxy.admin_token.clear();
    }
    if let Some(v) = env.var("PROXY_ADMIN_TOKEN") {
        raw.proxy.admin_token = v;
        raw.proxy.admin_token_file.clear();
    }
    if let Some(v) = env.var("PROXY_TLS_CERT") {
        raw.tls.cert = v;
    }
    if let Some(v) = env.var("PROXY_TLS_KEY") {
        raw.tls.key = v;
    }
    Ok(())
}

fn parse_bool(v: &str) -> Option<bool> {
    match v.trim().to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" | "on" => Some(true),
        "0" | "false" | "no" | "off" => Some(false),
        _ => None,
    }
}

fn addr(key: &str, v: &str) -> Result<SocketAddr, ConfigError> {
    v.trim().parse().map_err(|_| {
        invalid(
            key,
            format!("expected IP:PORT such as 127.0.0.1:8080, got {v:?}"),
        )
    })
}

/// A secret given inline or as a file (one of the two). The file's content is never part of an
/// error message; only its path is.
fn secret_value(key: &str, inline: &str, file: &str) -> Result<String, ConfigError> {
    let file_key = format!("{key}_file");
    match (inline.trim(), file.trim()) {
        (v, "") => Ok(v.to_string()),
        ("", path) => std::fs::read_to_string(path)
            .map(|s| s.trim().to_string())
            .map_err(|e| invalid(&file_key, format!("cannot read {path}: {e}"))),
        _ => Err(invalid(
            &file_key,
            format!("set either {key} or {file_key}, not both"),
        )),
    }
}

fn path_opt(v: &str) -> Option<PathBuf> {
    let v = v.trim();
    (!v.is_empty()).then(|| PathBuf::from(v))
}

fn millis(key: &str, ms: u64) -> Result<Duration, ConfigError> {
    if ms == 0 {
        return Err(invalid(key, "must be greater than 0"));
    }
    Ok(Duration::from_millis(ms))
}

/// The `tracing` filter for a `log.level` value. Field values in it (`[span{field=value}]`) are
/// matched literally, never compiled as regular expressions: a regex DFA for a few kilobytes of
/// `.` takes tens of seconds to build, at start-up and on every reload.
pub fn log_filter(level: &str) -> Result<tracing_subscriber::EnvFilter, String> {
    tracing_subscriber::EnvFilter::builder()
        .with_regex(false)
        .parse(level)
        .map_err(|e| e.to_string())
}

fn validate(raw: RawConfig) -> Result<Config, ConfigError> {
    let listen = addr("proxy.listen", &raw.proxy.listen)?;
    let admin_listen = addr("proxy.admin_listen", &raw.proxy.admin_listen)?;
    if listen == admin_listen && listen.port() != 0 {
        return Err(invalid(
            "proxy.admin_listen",
            "must differ from proxy.listen",
        ));
    }

    let upstream_uri: Uri = raw.upstream.url.trim().parse().map_err(|_| {
        invalid(
            "upstream.url",
            format!(
                "expected a URL such as http://127.0.0.1:3000, got {:?}",
                raw.upstream.url
            ),
        )
    })?;
    let scheme = upstream_uri.scheme().cloned();
    let authority = upstream_uri.authority().cloned();
    let (Some(scheme), Some(authority)) = (scheme, authority) else {
        return Err(invalid(
            "upstream.url",
            format!("expected http://HOST:PORT, got {:?}", raw.upstream.url),
        ));
    };
    if scheme != Scheme::HTTP && scheme != Scheme::HTTPS {
        return Err(invalid(
            "upstream.url",
            format!(
                "expected an http:// or https:// URL, got {:?}",
                raw.upstream.url
            ),
        ));
    }
    if !matches!(upstream_uri.path(), "" | "/") || upstream_uri.query().is_some() {
        return Err(invalid(
            "upstream.url",
            "must not carry a path or query: requests keep their own path",
        ));
    }
    let upstream = UpstreamConfig {
        scheme,
        authority,
        connect_timeout: millis(
            "upstream.connect_timeout_ms",
            raw.upstream.connect_timeout_ms,
        )?,
        timeout: millis("upstream.timeout_ms", raw.upstream.timeout_ms)?,
        pool_idle_timeout: millis(
            "upstream.pool_idle_timeout_ms",
            raw.upstream.pool_idle_timeout_ms,
        )?,
        pool_max_idle_per_host: raw.upstream.pool_max_idle_per_host,
        ca_file: path_opt(&raw.upstream.ca_file),
    };

    if raw.sales.intercept_paths.is_empty() {
        return Err(invalid(
            "sales.intercept_paths",
            "needs at least one path (switch the integration off with crm.enabled = false)",
        ));
    }
    for p in &raw.sales.intercept_paths {
        if !p.starts_with('/') || p.contains(['?', '#', ' ']) {
            return Err(invalid(
                "sales.intercept_paths",
                format!("{p:?} is not an absolute path such as /api/sales"),
            ));
        }
    }
    if raw.sales.max_request_body_bytes == 0 {
        return Err(invalid(
            "sales.max_request_body_bytes",
            "must be greater than 0",
        ));
    }
    if raw.sales.max_response_body_bytes == 0 {
        return Err(invalid(
            "sales.max_response_body_bytes",
            "must be greater than 0",
        ));
    }
    let currency = raw.sales.default_currency.trim().to_string();
    if currency.len() != 3 || !currency.chars().all(|c| c.is_ascii_uppercase()) {
        return Err(invalid(
            "sales.default_currency",
            format!("expected a 3-letter ISO code such as USD, got {currency:?}"),
        ));
    }
    let sales = SalesConfig {
        intercept_paths: raw.sales.intercept_paths,
        max_request_body: raw.sales.max_request_body_bytes,
        max_response_body: raw.sales.max_response_body_bytes,
        default_currency: currency,
    };

    let api_url = raw.crm.api_url.trim().trim_end_matches('/').to_string();
    let api_key = secret_value("crm.api_key", &raw.crm.api_key, &raw.crm.api_key_file)?;
    if !api_url.is_empty() {
        let uri: Uri = api_url.parse().map_err(|_| {
            invalid(
                "crm.api_url",
                format!("expected a URL such as https://crm.example.com, got {api_url:?}"),
            )
        })?;
        match uri.scheme_str() {
            Some("http") | Some("https") if uri.authority().is_some() => {}
            _ => {
                return Err(invalid(
                    "crm.api_url",
                    format!("expected an http:// or https:// URL, got {api_url:?}"),
                ))
            }
        }
    }
    if api_key.contains(|c: char| c.is_control()) {
        return Err(invalid("crm.api_key", "contains control characters"));
    }
    let endpoint = (!api_url.is_empty() && !api_key.is_empty()).then(|| CrmEndpoint {
        base_url: api_url,
        api_key: Secret::new(api_key),
    });
    let crm_timeout = millis("crm.timeout_ms", raw.crm.timeout_ms)?;
    let crm = CrmConfig {
        enabled: raw.crm.enabled,
        endpoint,
        connect_timeout: millis("crm.connect_timeout_ms", raw.crm.connect_timeout_ms)?,
        timeout: crm_timeout,
        sync_budget: millis("crm.sync_budget_ms", raw.crm.sync_budget_ms)?,
        customer_cache_ttl: Duration::from_millis(raw.crm.customer_cache_ttl_ms),
        ca_file: path_opt(&raw.crm.ca_file),
    };

    let o = &raw.outbox;
    if o.retry_schedule_ms.is_empty() || o.retry_schedule_ms.contains(&0) {
        return Err(invalid(
            "outbox.retry_schedule_ms",
            "needs at least one delay, each greater than 0",
        ));
    }
    if !(0.0..1.0).contains(&o.jitter) {
        return Err(invalid(
            "outbox.jitter",
            "must be at least 0 and below 1 (0.2 = ±20 %)",
        ));
    }
    if !(o.drain_rate_per_sec > 0.0 && o.drain_rate_per_sec.is_finite()) {
        return Err(invalid(
            "outbox.drain_rate_per_sec",
            "must be greater than 0",
        ));
    }
    if o.breaker_failure_threshold == 0 {
        return Err(invalid(
            "outbox.breaker_failure_threshold",
            "must be greater than 0",
        ));
    }
    let breaker_open = millis("outbox.breaker_open_ms", o.breaker_open_ms)?;
    let breaker_max_open = millis("outbox.breaker_max_open_ms", o.breaker_max_open_ms)?;
    if breaker_max_open < breaker_open {
        return Err(invalid(
            "outbox.breaker_max_open_ms",
            "must not be below outbox.breaker_open_ms",
        ));
    }
    // A claimed job belongs to its claimer for longer than one delivery can take: a create may
    // be sent twice (once more on a pooled connection found closed), each within the timeout.
    let lease = (crm.timeout + crm.connect_timeout) * 2 + Duration::from_secs(1);
    let outbox = OutboxConfig {
        synchronous_full: o.synchronous_full,
        retry: RetryPolicy {
            steps: o
                .retry_schedule_ms
                .iter()
                .map(|ms| Duration::from_millis(*ms))
                .collect(),
            max_age: millis("outbox.max_age_ms", o.max_age_ms)?,
            jitter: o.jitter,
            retry_after_cap: millis("outbox.retry_after_cap_ms", o.retry_after_cap_ms)?,
        },
        breaker: BreakerConfig {
            failure_threshold: o.breaker_failure_threshold,
            open_for: breaker_open,
            max_open_for: breaker_max_open,
            probe_timeout: lease,
        },
        lease,
        drain_rate_per_sec: o.drain_rate_per_sec,
        poll_interval: millis("outbox.poll_interval_ms", o.poll_interval_ms)?,
        keep_delivered: (o.keep_delivered_days > 0)
            .then(|| Duration::from_secs(u64::from(o.keep_delivered_days) * 86_400)),
    };
    let admin_token = secret_value(
        "proxy.admin_token",
        &raw.proxy.admin_token,
        &raw.proxy.admin_token_file,
    )?;
    if admin_token.contains(|c: char| c.is_control() || c == ' ') {
        return Err(invalid(
            "proxy.admin_token",
            "must not contain spaces or control characters",
        ));
    }
    let admin_token = (!admin_token.is_empty()).then(|| Secret::new(admin_token));

    let tls = match (path_opt(&raw.tls.cert), path_opt(&raw.tls.key)) {
        (None, None) => {
            if !raw.tls.client_ca.trim().is_empty() {
                return Err(invalid("tls.client_ca", "needs tls.cert and tls.key"));
            }
            None
        }
        (Some(cert), Some(key)) => Some(TlsConfig {
            cert,
            key,
            client_ca: path_opt(&raw.tls.client_ca),
            handshake_timeout: millis("tls.handshake_timeout_ms", raw.tls.handshake_timeout_ms)?,
        }),
        (Some(_), None) => return Err(invalid("tls.key", "tls.cert is set but tls.key is not")),
        (None, Some(_)) => return Err(invalid("tls.cert", "tls.key is set but tls.cert is not")),
    };

    let l = &raw.limits;
    if l.max_header_bytes < 8192 {
        return Err(invalid("limits.max_header_bytes", "must be at least 8192"));
    }
    for (key, v) in [
        ("limits.max_headers", l.max_headers),
        ("limits.max_connections", l.max_connections),
        (
            "limits.h2_max_concurrent_streams",
            l.h2_max_concurrent_streams as usize,
        ),
    ] {
        if v == 0 {
            return Err(invalid(key, "must be greater than 0"));
        }
    }
    let limits = Limits {
        max_header_bytes: l.max_header_bytes,
        max_headers: l.max_headers,
        header_read_timeout: millis("limits.header_read_timeout_ms", l.header_read_timeout_ms)?,
        sale_body_read_timeout: millis(
            "limits.sale_body_read_timeout_ms",
            l.sale_body_read_timeout_ms,
        )?,
        max_connections: l.max_connections,
        h2_max_concurrent_streams: l.h2_max_concurrent_streams,
        h2_max_pending_accept_reset_streams: l.h2_max_pending_accept_reset_streams,
        h2_max_local_error_reset_streams: l.h2_max_local_error_reset_streams,
    };

    if raw.storage.data_dir.trim().is_empty() {
        return Err(invalid("storage.data_dir", "must not be empty"));
    }
    let format = match raw.log.format.as_str() {
        "text" => LogFormat::Text,
        "json" => LogFormat::Json,
        other => {
            return Err(invalid(
                "log.format",
                format!("expected \"text\" or \"json\", got {other:?}"),
            ))
        }
    };
    if log_filter(&raw.log.level).is_err() {
        return Err(invalid(
            "log.level",
            format!(
                "{:?} is not a level or filter such as info or debug",
                raw.log.level
            ),
        ));
    }

    Ok(Config {
        listen,
        admin_listen,
        admin_token,
        access_log: raw.proxy.access_log,
        shutdown_grace: millis("proxy.shutdown_grace_ms", raw.proxy.shutdown_grace_ms)?,
        reload_poll: (raw.proxy.reload_poll_ms > 0)
            .then(|| Duration::from_millis(raw.proxy.reload_poll_ms)),
        worker_threads: match raw.proxy.worker_threads {
            0 => None,
            n @ 1..=1024 => Some(n as usize),
            n => {
                return Err(invalid(
                    "proxy.worker_threads",
                    format!("{n} is not between 0 (one per CPU) and 1024"),
                ))
            }
        },
        tls,
        limits,
        upstream,
        sales,
        crm,
        data_dir: PathBuf::from(raw.storage.data_dir),
        outbox,
        log: LogConfig {
            level: raw.log.level,
            format,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::from_toml(text, Path::new("test.toml"), &NoEnv)
    }

    fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn empty_file_gives_defaults_without_crm() {
        let c = parse("").unwrap();
        assert_eq!(c.listen, "127.0.0.1:8080".parse().unwrap());
        assert_eq!(c.admin_listen, "127.0.0.1:9090".parse().unwrap());
        assert_eq!(c.sales.intercept_paths, vec!["/api/sales".to_string()]);
        assert_eq!(c.crm.sync_budget, Duration::from_millis(1500));
        assert!(c.crm.enabled);
        assert!(c.crm.endpoint.is_none());
        assert_eq!(c.sales.default_currency, "USD");
        assert_eq!(c.outbox.retry, RetryPolicy::default());
        assert!(c.outbox.synchronous_full);
        assert!(c.outbox.lease > c.crm.timeout);
        assert_eq!(
            c.outbox.keep_delivered,
            Some(Duration::from_secs(90 * 86_400))
        );
        let forever = parse("[outbox]\nkeep_delivered_days = 0\n").unwrap();
        assert_eq!(forever.outbox.keep_delivered, None);
        assert_eq!(c.worker_threads, None);
        assert_eq!(
            parse("[proxy]\nworker_threads = 1\n")
                .unwrap()
                .worker_threads,
            Some(1)
        );
        assert!(c.admin_token.is_none());
    }

    #[test]
    fn the_example_config_file_is_valid() {
        let text = include_str!("../config.toml");
        parse(text).unwrap();
    }

    #[test]
    fn unknown_keys_are_named() {
        let err = parse("[crm]\napi_ur = \"http://x\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("api_ur"), "{err}");
        let err = parse("[nope]\n").unwrap_err().to_string();
        assert!(err.contains("nope"), "{err}");
    }

    #[test]
    fn bad_values_name_their_key() {
        for (text, key) in [
            ("[proxy]\nlisten = \"localhost\"\n", "proxy.listen"),
            ("[upstream]\nurl = \"ftp://x\"\n", "upstream.url"),
            ("[tls]\ncert = \"a.pem\"\n", "tls.key"),
            ("[tls]\nkey = \"a.pem\"\n", "tls.cert"),
            ("[tls]\nclient_ca = \"ca.pem\"\n", "tls.client_ca"),
            ("[upstream]\nurl = \"http://x:3000/base\"\n", "upstream.url"),
            ("[upstream]\ntimeout_ms = 0\n", "upstream.timeout_ms"),
            ("[crm]\napi_url = \"not a url\"\n", "crm.api_url"),
            ("[crm]\nsync_budget_ms = 0\n", "crm.sync_budget_ms"),
            ("[sales]\nintercept_paths = []\n", "sales.intercept_paths"),
            ("[proxy]\nworker_threads = 5000\n", "proxy.worker_threads"),
            (
                "[sales]\nintercept_paths = [\"api/sales\"]\n",
                "sales.intercept_paths",
            ),
            (
                "[sales]\ndefault_currency = \"dollars\"\n",
                "sales.default_currency",
            ),
            ("[log]\nformat = \"xml\"\n", "log.format"),
            ("[log]\nlevel = \"loud=[\"\n", "log.level"),
            (
                "[outbox]\nretry_schedule_ms = []\n",
                "outbox.retry_schedule_ms",
            ),
            ("[outbox]\njitter = 1.5\n", "outbox.jitter"),
            (
                "[outbox]\ndrain_rate_per_sec = 0.0\n",
                "outbox.drain_rate_per_sec",
            ),
            (
                "[outbox]\nbreaker_max_open_ms = 10\n",
                "outbox.breaker_max_open_ms",
            ),
        ] {
            let err = parse(text).unwrap_err().to_string();
            assert!(err.contains(key), "{text:?} gave {err}");
        }
        let err = parse("[upstream]\ntimeout_ms = \"fast\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("timeout_ms"), "{err}");
    }

    #[test]
    fn parse_errors_name_the_place_but_never_quote_the_file() {
        for text in [
            "[crm]\napi_key = \"sk-live-SECRET-123\n",
            "[crm]\napi_key = sk-live-SECRET-123\n",
            "[proxy]\nadmin_token = [\"sk-live-SECRET-123\"]\n",
        ] {
            let err = parse(text).unwrap_err().to_string();
            assert!(!err.contains("SECRET"), "{err}");
            assert!(!err.contains('\n'), "one line: {err}");
            assert!(err.contains("line 2"), "{err}");
        }
    }

    #[test]
    fn environment_overrides_the_file() {
        let text = "[crm]\napi_url = \"http://file\"\napi_key = \"file-key\"\n";
        let e = env(&[
            ("CRM_API_URL", "http://env:1/"),
            ("CRM_API_KEY", "env-key"),
            ("POS_UPSTREAM_URL", "http://127.0.0.1:4000"),
            ("PROXY_LISTEN", "0.0.0.0:8081"),
            ("PROXY_ADMIN_LISTEN", "127.0.0.1:9091"),
            ("PROXY_DATA_DIR", "/tmp/x"),
            ("CRM_INTEGRATION_ENABLED", "false"),
        ]);
        let c = Config::from_toml(text, Path::new("t"), &e).unwrap();
        let ep = c.crm.endpoint.unwrap();
        assert_eq!(ep.base_url, "http://env:1");
        assert_eq!(ep.api_key.expose(), "env-key");
        assert_eq!(c.upstream.authority.as_str(), "127.0.0.1:4000");
        assert_eq!(c.listen, "0.0.0.0:8081".parse().unwrap());
        assert_eq!(c.admin_listen.port(), 9091);
        assert_eq!(c.data_dir, PathBuf::from("/tmp/x"));
        assert!(!c.crm.enabled);

        let err = Config::from_toml(
            "",
            Path::new("t"),
            &env(&[("CRM_INTEGRATION_ENABLED", "maybe")]),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("CRM_INTEGRATION_ENABLED"), "{err}");
    }

    #[test]
    fn debug_output_never_shows_the_key() {
        let e = env(&[
            ("CRM_API_URL", "http://crm"),
            ("CRM_API_KEY", "sk-very-secret"),
        ]);
        let c = Config::from_toml("", Path::new("t"), &e).unwrap();
        let dbg = format!("{c:?}");
        assert!(!dbg.contains("sk-very-secret"), "{dbg}");
        let e = env(&[("PROXY_ADMIN_TOKEN", "admin-very-secret")]);
        let c = Config::from_toml("", Path::new("t"), &e).unwrap();
        assert_eq!(
            c.admin_token.as_ref().unwrap().expose(),
            "admin-very-secret"
        );
        assert!(!format!("{c:?}").contains("admin-very-secret"));
        assert!(dbg.contains("redacted"));
        let raw: RawConfig = toml::from_str("[crm]\napi_key = \"sk-very-secret\"\n").unwrap();
        assert!(!format!("{raw:?}").contains("sk-very-secret"));
    }

    #[test]
    fn secrets_can_come_from_files() {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("crm.key");
        std::fs::write(&key, "sk-from-file\n").unwrap();
        let token = dir.path().join("admin.token");
        std::fs::write(&token, "tok-from-file").unwrap();
        let e = env(&[
            ("CRM_API_URL", "http://crm"),
            ("CRM_API_KEY_FILE", key.to_str().unwrap()),
            ("PROXY_ADMIN_TOKEN_FILE", token.to_str().unwrap()),
        ]);
        let c = Config::from_toml("[crm]\napi_key = \"inline\"\n", Path::new("t"), &e).unwrap();
        assert_eq!(c.crm.endpoint.unwrap().api_key.expose(), "sk-from-file");
        assert_eq!(c.admin_token.unwrap().expose(), "tok-from-file");
        // both in the file: refused, naming the key
        let text = format!(
            "[crm]\napi_key = \"a\"\napi_key_file = {:?}\n",
            key.display().to_string()
        );
        let err = Config::from_toml(&text, Path::new("t"), &NoEnv)
            .unwrap_err()
            .to_string();
        assert!(err.contains("crm.api_key_file"), "{err}");
        // unreadable: the path is named, nothing of a secret is
        let e = env(&[("CRM_API_KEY_FILE", "/nonexistent/key")]);
        let err = Config::from_toml("", Path::new("t"), &e)
            .unwrap_err()
            .to_string();
        assert!(err.contains("/nonexistent/key"), "{err}");
    }

    #[test]
    fn missing_file_is_fine_unless_required() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("absent.toml");
        assert!(Config::load(&path, false, &NoEnv).is_ok());
        let err = Config::load(&path, true, &NoEnv).unwrap_err().to_string();
        assert!(err.contains("absent.toml"), "{err}");
    }
}
