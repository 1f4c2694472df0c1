//! Soak/chaos run of the real proxy binary (issue 6): sustained mixed load while the CRM flaps
//! and the configuration is reloaded, then a check that nothing was lost, duplicated or leaked.
//!
//! `cargo bench --bench soak` (5 minutes of chaos), `cargo bench --bench soak -- --secs N`, or
//! `cargo bench --bench soak -- --quick` (60 s). Loopback only. The run takes the chaos time
//! plus about 45 s: a 10 s warm-up, 10 s idle before the baseline, the drain, 10 s idle after.
//!
//! In this process: the sample POS, the sample CRM (which honours `Idempotency-Key` and records
//! every invoice), the load clients, the chaos and reload drivers. In a child process: the
//! release binary with a temp config file and data dir, its stderr captured.
//!
//! 1. Warm-up: the mixed load with the CRM answering; load stopped; idle; baseline RSS/fds.
//! 2. Chaos for N seconds: six clients (~240 requests/s in all: `GET /api/sales?limit=5`,
//!    `GET /`, sales with a customer, sales without; some on fresh connections) while the CRM
//!    alternates between answering and a fault (500, slow, connection dropped, hanging) every
//!    few seconds, and the config file is rewritten every few seconds (sync budget, access log)
//!    and SIGHUP sent, one rewrite in four being an invalid file that must be refused.
//! 3. The CRM answers again, the load stops, the outbox drains (`/readyz` `outbox.depth == 0`),
//!    idle, RSS/fds again, SIGTERM (exit 0 expected).
//! 4. Figures as a Markdown table. Panics when an answered sale with a customer has no invoice
//!    (lost), a sale has two (duplicated), a request failed, a WARN/ERROR line of the proxy is
//!    not explained by the chaos at the time it was logged, the reload counts are off, the CRM
//!    API key shows in the proxy's stderr, the fds are not back near the baseline (+10), the
//!    RSS grew by more than half, or the proxy does not exit 0 on SIGTERM.
//!
//! Explained WARN/ERROR lines: "CRM invoice not created; will retry" with a 500 while the CRM
//! answered 500, a timeout while it was slow or hanging, a dropped connection while it dropped
//! them; "circuit open" during any fault; "configuration not reloaded" while an invalid file
//! was in place (each within a few seconds of the log line's timestamp). A line without a
//! timestamp continues the entry before it.
//!
//! Besides the short timeouts, the config sets `outbox.drain_rate_per_sec = 500` and
//! `breaker_max_open_ms = 2000` so a backlog drains within the run. The seed is printed;
//! `SOAK_SEED=<seed>` repeats the same chaos schedule and request mix. Every process started
//! is killed on the way out (panic, Ctrl-C and SIGTERM included).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use pos_crm_proxy::demo::sample_crm::{CrmScript, SampleCrm};
use pos_crm_proxy::demo::sample_pos::{SamplePos, SamplePosOptions};
use serde_json::Value;

const API_KEY: &str = "sk-soak-7d2e91b0-not-for-logs";
const CLIENTS: usize = 6;
/// Requests per second per client (the pacing skips ticks when a request is slow).
const RATE_PER_CLIENT: u64 = 40;
const WARMUP: Duration = Duration::from_secs(10);
/// Longer than the proxy's idle pool timeouts (POS and CRM: 4 s, reaped within another 4 s).
const IDLE: Duration = Duration::from_secs(10);
const DRAIN_LIMIT: Duration = Duration::from_secs(180);
/// A failed CRM attempt is logged at most this long after the faulty answer was chosen: CRM
/// timeout (1 s) plus the immediate resend of a dropped connection plus the outbox commit.
const EXPLAIN_WINDOW_MS: i64 = 3_000;
const FD_TOLERANCE: i64 = 10;
const RSS_GROWTH_LIMIT: f64 = 0.5;

// ---------------------------------------------------------------------------------------------
// Time

fn unix_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Unix ms of a tracing timestamp such as `2026-11-25T06:06:31.062345Z`.
fn parse_log_time(s: &str) -> Option<i64> {
    let s = s.strip_suffix('Z')?;
    let (date, time) = s.split_once('T')?;
    let mut d = date.split('-').map(|p| p.parse::<i64>().ok());
    let (y, mo, da) = (d.next()??, d.next()??, d.next()??);
    let (hms, frac) = time.split_once('.').unwrap_or((time, "0"));
    let mut t = hms.split(':').map(|p| p.parse::<i64>().ok());
    let (h, mi, se) = (t.next()??, t.next()??, t.next()??);
    let frac3: String = frac.chars().chain("000".chars()).take(3).collect();
    let ms = frac3.parse::<i64>().ok()?;
    Some(((days_from_civil(y, mo, da) * 24 + h) * 60 + mi) * 60_000 + se * 1000 + ms)
}

// ---------------------------------------------------------------------------------------------
// The proxy process

/// One stderr line of the proxy.
struct LogLine {
    text: String,
}

/// The running binary; killed (SIGKILL) and reaped when dropped, panics included.
struct ProxyProcess {
    child: Child,
    pid: u32,
    addr: SocketAddr,
    admin: SocketAddr,
    log: Arc<Mutex<Vec<LogLine>>>,
    reader: Option<std::thread::JoinHandle<()>>,
}

impl Drop for ProxyProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl ProxyProcess {
    fn start(config: &Path, crm_url: &str) -> ProxyProcess {
        let mut child = Command::new(env!("CARGO_BIN_EXE_pos-crm-proxy"))
            .args(["--config", config.to_str().expect("utf-8 temp path")])
            .env_clear()
            .env("CRM_API_URL", crm_url)
            .env("CRM_API_KEY", API_KEY)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start the proxy binary");
        let pid = child.id();
        let stderr = child.stderr.take().expect("piped stderr");
        let log = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel::<String>();
        let sink = log.clone();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if line.contains("pos-crm-proxy started") {
                    let _ = tx.send(line.clone());
                }
                sink.lock().unwrap().push(LogLine { text: line });
            }
        });
        // From here on the guard owns the child: a panic below still kills it.
        let mut running = ProxyProcess {
            child,
            pid,
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            admin: SocketAddr::from(([127, 0, 0, 1], 0)),
            log,
            reader: Some(reader),
        };
        let Ok(line) = rx.recv_timeout(Duration::from_secs(30)) else {
            let _ = running.child.kill();
            let _ = running.child.wait();
            let text: Vec<String> = running
                .log
                .lock()
                .unwrap()
                .iter()
                .map(|l| l.text.clone())
                .collect();
            panic!("the proxy did not start; its stderr:\n{}", text.join("\n"));
        };
        let field = |key: &str| -> SocketAddr {
            line.split(key)
                .nth(1)
                .and_then(|rest| rest.split_whitespace().next())
                .and_then(|a| a.parse().ok())
                .unwrap_or_else(|| panic!("no {key} in the start line: {line}"))
        };
        running.addr = field("listen=");
        running.admin = field("admin=");
        running
    }

    fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([sig, &self.pid.to_string()])
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        assert!(ok, "kill {sig} {} failed", self.pid);
    }

    fn resources(&self) -> Resources {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid))
            .expect("read /proc/PID/status");
        let kb = |key: &str| -> u64 {
            status
                .lines()
                .find_map(|l| l.strip_prefix(key))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.parse().ok())
                .unwrap_or(0)
        };
        let fds = std::fs::read_dir(format!("/proc/{}/fd", self.pid))
            .expect("read /proc/PID/fd")
            .count();
        Resources {
            rss_kb: kb("VmRSS:"),
            fds,
            threads: kb("Threads:"),
        }
    }

    /// SIGTERM, then wait (bounded) for the exit; `None` when it had to be killed.
    fn terminate(&mut self, within: Duration) -> Option<i32> {
        self.signal("-TERM");
        let deadline = Instant::now() + within;
        let code = loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                break status.code();
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                break None;
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        // stderr reaches EOF once the process is gone: every line is in the log now.
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
        code
    }

    fn log_lines(&self) -> Vec<String> {
        self.log
            .lock()
            .unwrap()
            .iter()
            .map(|l| l.text.clone())
            .collect()
    }
}

#[derive(Debug, Clone, Copy, Default)]
struct Resources {
    rss_kb: u64,
    fds: usize,
    threads: u64,
}

// ---------------------------------------------------------------------------------------------
// Configuration

#[derive(Debug, Clone, Copy)]
enum ConfigFile {
    Valid {
        budget_ms: u64,
        access_log: bool,
    },
    /// TOML that does not parse.
    BadSyntax,
    /// A key the proxy does not know.
    UnknownKey,
    /// A value that fails validation.
    ZeroBudget,
}

fn config_text(pos_url: &str, data_dir: &Path, file: ConfigFile) -> String {
    let (budget, access_log, extra) = match file {
        ConfigFile::Valid {
            budget_ms,
            access_log,
        } => (budget_ms.to_string(), access_log, ""),
        ConfigFile::BadSyntax => ("300".into(), true, "this line is not toml\n"),
        ConfigFile::UnknownKey => ("300".into(), true, "sync_budget = 300\n"),
        ConfigFile::ZeroBudget => ("0".into(), true, ""),
    };
    format!(
        "# written by benches/soak.rs\n\
         [proxy]\n\
         listen = \"127.0.0.1:0\"\n\
         admin_listen = \"127.0.0.1:0\"\n\
         access_log = {access_log}\n\
         reload_poll_ms = 200\n\
         shutdown_grace_ms = 5000\n\
         [upstream]\n\
         url = \"{pos_url}\"\n\
         [crm]\n\
         sync_budget_ms = {budget}\n\
         timeout_ms = 1000\n\
         connect_timeout_ms = 500\n\
         {extra}\
         [storage]\n\
         data_dir = {data:?}\n\
         [outbox]\n\
         retry_schedule_ms = [200, 500, 1000]\n\
         breaker_open_ms = 500\n\
         breaker_max_open_ms = 2000\n\
         poll_interval_ms = 100\n\
         drain_rate_per_sec = 500.0\n\
         [log]\n\
         level = \"warn,pos_crm_proxy::app=info\"\n",
        data = data_dir.display().to_string(),
    )
}

/// Replaces the file in one step (temp file + rename), as careful editors and config
/// management do, so the proxy's file watcher never reads a half-written file.
fn write_config(path: &Path, text: &str) {
    let tmp = path.with_extension("toml.tmp");
    std::fs::write(&tmp, text).expect("write the temp config");
    std::fs::rename(&tmp, path).expect("rename the config into place");
}

// ---------------------------------------------------------------------------------------------
// Chaos timeline

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Fault {
    Ok,
    Error500,
    /// Answers after this many ms (beyond the sync budget; sometimes beyond the CRM timeout).
    Slow(u64),
    /// Drops the connection without answering.
    Close,
    /// Never answers.
    Hang,
}

impl Fault {
    fn script(self) -> CrmScript {
        match self {
            Fault::Ok => CrmScript::Normal,
            Fault::Error500 => CrmScript::Status(
                500,
                r#"{"success":false,"error":"soak chaos: internal error"}"#.to_string(),
            ),
            Fault::Slow(ms) => {
                CrmScript::Delay(Duration::from_millis(ms), Box::new(CrmScript::Normal))
            }
            Fault::Close => CrmScript::Close,
            Fault::Hang => CrmScript::Hang,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Fault::Ok => "ok",
            Fault::Error500 => "500",
            Fault::Slow(_) => "slow",
            Fault::Close => "close",
            Fault::Hang => "hang",
        }
    }
}

/// When each CRM behaviour and each invalid config file was in force (Unix ms).
#[derive(Default)]
struct Timeline {
    /// (from, behaviour); each lasts until the next entry.
    faults: Vec<(i64, Fault)>,
    /// (from, to) while an invalid config file was in place.
    invalid_config: Vec<(i64, i64)>,
}

impl Timeline {
    /// Whether a behaviour accepted by `pred` was in force at some moment of [from, to].
    fn fault_during(&self, from: i64, to: i64, pred: impl Fn(Fault) -> bool) -> bool {
        self.faults.iter().enumerate().any(|(i, &(start, f))| {
            let end = self.faults.get(i + 1).map_or(i64::MAX, |n| n.0);
            pred(f) && start <= to && end >= from
        })
    }

    fn invalid_during(&self, from: i64, to: i64) -> bool {
        self.invalid_config
            .iter()
            .any(|&(s, e)| s <= to && e >= from)
    }
}

// ---------------------------------------------------------------------------------------------
// Load

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    ApiSales,
    Root,
    SaleCustomer,
    SaleNoCustomer,
}

const KINDS: [Kind; 4] = [
    Kind::ApiSales,
    Kind::Root,
    Kind::SaleCustomer,
    Kind::SaleNoCustomer,
];

impl Kind {
    fn label(self) -> &'static str {
        match self {
            Kind::ApiSales => "GET /api/sales?limit=5",
            Kind::Root => "GET /",
            Kind::SaleCustomer => "POST /api/sales with customer",
            Kind::SaleNoCustomer => "POST /api/sales without customer",
        }
    }
    fn index(self) -> usize {
        self as usize
    }
}

#[derive(Default)]
struct Tally {
    served: [u64; 4],
    failed: [u64; 4],
    latency_us: [Vec<u32>; 4],
    /// Sale ids of answered, completed sales with a customer: each must get one invoice.
    expected: Vec<String>,
    created_inline: u64,
    /// When each of those answers arrived (Unix ms): how soon sales get invoices again once the
    /// CRM answers after a fault.
    created_at: Vec<i64>,
    /// `queued: true`, by the start of the error text.
    queued: BTreeMap<String, u64>,
    /// `queued: false`: the invoice will not be delivered (must not happen here).
    not_queued: u64,
    /// Sync budgets named in "CRM did not answer within N ms" answers: the reloads took effect.
    budgets_seen: BTreeSet<u64>,
    samples: Vec<String>,
}

impl Tally {
    fn fail(&mut self, kind: Kind, what: String) {
        self.failed[kind.index()] += 1;
        if self.samples.len() < 20 {
            self.samples.push(format!("{}: {what}", kind.label()));
        }
    }
}

fn sale_body(rng: &mut fastrand::Rng, customer: bool) -> String {
    let qty = rng.u32(1..=3);
    let subtotal = 4.5 * f64::from(qty) + 1.0;
    let total = subtotal + 1.0;
    let who = if !customer {
        String::new()
    } else if rng.u8(..10) < 8 {
        r#","customerId":"customer-123","customerName":"John Doe""#.to_string()
    } else {
        // No name: the proxy looks it up in the CRM (cached).
        r#","customerId":"customer-456""#.to_string()
    };
    let pay = if customer { "Credit Card" } else { "Cash" };
    format!(
        r#"{{"items":[{{"id":"test-product-1","name":"Test Coffee","price":4.5,"quantity":{qty},"type":"product"}},{{"id":"test-service-1","name":"Gift Wrapping","price":1,"quantity":1,"type":"service"}}],"subtotal":{subtotal},"tax":1,"total":{total},"paymentMethod":"{pay}","user":"soak-cashier","warehouseId":"WH1"{who},"currency":"USD"}}"#
    )
}

fn http_client() -> reqwest::Client {
    pos_crm_proxy::tls::install_crypto_provider();
    reqwest::Client::builder()
        .timeout(Duration::from_secs(15))
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("build the HTTP client")
}

async fn one_request(
    c: &reqwest::Client,
    base: &str,
    kind: Kind,
    rng: &mut fastrand::Rng,
    tally: &Mutex<Tally>,
) {
    let fresh_connection = rng.u8(..100) < 5;
    let mut req = match kind {
        Kind::ApiSales => c.get(format!("{base}/api/sales?limit=5")),
        Kind::Root => c.get(format!("{base}/")),
        Kind::SaleCustomer | Kind::SaleNoCustomer => c
            .post(format!("{base}/api/sales"))
            .header("content-type", "application/json")
            .body(sale_body(rng, kind == Kind::SaleCustomer)),
    };
    if fresh_connection {
        req = req.header("connection", "close");
    }
    let started = Instant::now();
    let result = async {
        let resp = req.send().await?;
        let status = resp.status();
        let body = resp.bytes().await?;
        Ok::<_, reqwest::Error>((status, body))
    }
    .await;
    let elapsed = started.elapsed().as_micros().min(u128::from(u32::MAX)) as u32;
    let mut t = tally.lock().unwrap();
    let (status, body) = match result {
        Ok(r) => r,
        Err(e) => return t.fail(kind, format!("transport error: {e}")),
    };
    t.latency_us[kind.index()].push(elapsed);
    if !status.is_success() {
        let text = String::from_utf8_lossy(&body[..body.len().min(300)]).into_owned();
        return t.fail(kind, format!("{status}: {text}"));
    }
    if matches!(kind, Kind::ApiSales | Kind::Root) {
        t.served[kind.index()] += 1;
        return;
    }
    let Ok(v) = serde_json::from_slice::<Value>(&body) else {
        return t.fail(kind, format!("{status}: answer is not JSON"));
    };
    let Some(sale_id) = v["saleId"].as_str().filter(|_| v["success"] == true) else {
        return t.fail(kind, format!("{status}: sale not completed: {v}"));
    };
    let crm = &v["crmStatus"];
    if kind == Kind::SaleNoCustomer {
        if !crm.is_null() {
            return t.fail(kind, format!("crmStatus should be null: {crm}"));
        }
        t.served[kind.index()] += 1;
        return;
    }
    if !crm.is_object() {
        return t.fail(kind, format!("no crmStatus object: {v}"));
    }
    // Answered: from now on the CRM owes this sale exactly one invoice.
    t.served[kind.index()] += 1;
    t.expected.push(sale_id.to_string());
    if crm["invoiceCreated"] == true {
        t.created_inline += 1;
        t.created_at.push(unix_ms());
    } else if crm["queued"] == true {
        let error = crm["error"].as_str().unwrap_or("(no error)");
        if let Some(ms) = error
            .strip_prefix("CRM did not answer within ")
            .and_then(|r| r.split_whitespace().next())
            .and_then(|n| n.parse::<u64>().ok())
        {
            t.budgets_seen.insert(ms);
        }
        // Group by the kind of error, without per-request details.
        let key: String = error
            .split([':', ';', '('])
            .next()
            .unwrap_or(error)
            .chars()
            .filter(|c| !c.is_ascii_digit())
            .collect::<String>()
            .replace("  ", " ")
            .trim()
            .to_string();
        let key = format!("{key} (serviceAvailable {})", crm["serviceAvailable"]);
        *t.queued.entry(key).or_default() += 1;
    } else if crm.get("queued").is_none() {
        // The outbox write outlasted the budget: delivered if it lands (the lost check tells).
        *t.queued
            .entry("(unconfirmed) outbox did not confirm in time".to_string())
            .or_default() += 1;
    } else {
        t.not_queued += 1;
        if t.samples.len() < 20 {
            t.samples.push(format!("not queued: {crm}"));
        }
    }
}

async fn client_loop(seed: u64, base: String, stop: Arc<AtomicBool>, tally: Arc<Mutex<Tally>>) {
    let mut rng = fastrand::Rng::with_seed(seed);
    let c = http_client();
    let mut tick = tokio::time::interval(Duration::from_millis(1000 / RATE_PER_CLIENT));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    while !stop.load(Ordering::Relaxed) {
        tick.tick().await;
        let kind = match rng.u8(..100) {
            0..=34 => Kind::ApiSales,
            35..=49 => Kind::Root,
            50..=84 => Kind::SaleCustomer,
            _ => Kind::SaleNoCustomer,
        };
        one_request(&c, &base, kind, &mut rng, &tally).await;
    }
}

/// Runs the mixed load until `stop`; every request started is awaited to its end.
fn start_load(
    seed: u64,
    proxy: SocketAddr,
    tally: &Arc<Mutex<Tally>>,
) -> (Arc<AtomicBool>, Vec<tokio::task::JoinHandle<()>>) {
    let stop = Arc::new(AtomicBool::new(false));
    let tasks = (0..CLIENTS)
        .map(|i| {
            tokio::spawn(client_loop(
                seed.wrapping_add(i as u64 + 1),
                format!("http://{proxy}"),
                stop.clone(),
                tally.clone(),
            ))
        })
        .collect();
    (stop, tasks)
}

async fn stop_load(stop: Arc<AtomicBool>, tasks: Vec<tokio::task::JoinHandle<()>>) {
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.expect("a load client panicked");
    }
}

// ---------------------------------------------------------------------------------------------
// Chaos drivers

async fn flap_crm(
    seed: u64,
    crm: Arc<SampleCrm>,
    until: Instant,
    timeline: Arc<Mutex<Timeline>>,
) -> BTreeMap<&'static str, u32> {
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut counts = BTreeMap::new();
    let mut faults = Vec::new();
    while Instant::now() < until {
        // An answering CRM between faults; the faults in a shuffled round so each comes up.
        for fault in [true, false] {
            let next = if fault {
                if faults.is_empty() {
                    faults = vec![Fault::Error500, Fault::Slow(0), Fault::Close, Fault::Hang];
                    rng.shuffle(&mut faults);
                }
                match faults.pop().unwrap() {
                    Fault::Slow(_) => Fault::Slow(rng.u64(400..1_400)),
                    f => f,
                }
            } else {
                Fault::Ok
            };
            crm.set_default(next.script());
            timeline.lock().unwrap().faults.push((unix_ms(), next));
            *counts.entry(next.name()).or_default() += 1;
            let hold = Duration::from_millis(rng.u64(2_000..5_000));
            tokio::time::sleep(hold.min(until.saturating_duration_since(Instant::now()))).await;
            if Instant::now() >= until {
                break;
            }
        }
    }
    crm.set_default(CrmScript::Normal);
    timeline.lock().unwrap().faults.push((unix_ms(), Fault::Ok));
    counts
}

#[derive(Debug, Default)]
struct Reloads {
    valid_files: u32,
    invalid_files: u32,
    sighups: u32,
}

async fn reload_config(
    seed: u64,
    proxy: Arc<ProxyProcess>,
    path: PathBuf,
    pos_url: String,
    data_dir: PathBuf,
    until: Instant,
    timeline: Arc<Mutex<Timeline>>,
) -> Reloads {
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut r = Reloads::default();
    let settle = Duration::from_millis(700); // > reload_poll_ms: the watcher has seen the file
    let mut cycle = 0u32;
    loop {
        tokio::time::sleep(Duration::from_millis(rng.u64(3_000..6_000))).await;
        if Instant::now() + 2 * settle >= until {
            break;
        }
        cycle += 1;
        // Every fourth cycle (the second one first, so even a short run has one) puts an
        // invalid file in place for a moment, reloads it both ways, then restores a valid one.
        if cycle % 4 == 2 {
            let bad = [
                ConfigFile::BadSyntax,
                ConfigFile::UnknownKey,
                ConfigFile::ZeroBudget,
            ][(r.invalid_files % 3) as usize];
            let from = unix_ms();
            write_config(&path, &config_text(&pos_url, &data_dir, bad));
            r.invalid_files += 1;
            tokio::time::sleep(settle).await;
            proxy.signal("-HUP");
            r.sighups += 1;
            tokio::time::sleep(settle).await;
            timeline
                .lock()
                .unwrap()
                .invalid_config
                .push((from, unix_ms() + EXPLAIN_WINDOW_MS));
        }
        let valid = ConfigFile::Valid {
            budget_ms: if cycle % 2 == 0 { 300 } else { 450 },
            access_log: rng.bool(),
        };
        write_config(&path, &config_text(&pos_url, &data_dir, valid));
        r.valid_files += 1;
        tokio::time::sleep(settle).await;
        proxy.signal("-HUP");
        r.sighups += 1;
    }
    // End on the starting configuration.
    let start = ConfigFile::Valid {
        budget_ms: 300,
        access_log: true,
    };
    write_config(&path, &config_text(&pos_url, &data_dir, start));
    r.valid_files += 1;
    tokio::time::sleep(settle).await;
    r
}

async fn sample_resources(proxy: Arc<ProxyProcess>, stop: Arc<AtomicBool>) -> Resources {
    let mut peak = Resources::default();
    while !stop.load(Ordering::Relaxed) {
        let now = proxy.resources();
        peak.rss_kb = peak.rss_kb.max(now.rss_kb);
        peak.fds = peak.fds.max(now.fds);
        peak.threads = peak.threads.max(now.threads);
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    peak
}

// ---------------------------------------------------------------------------------------------
// Admin endpoints

async fn readyz(c: &reqwest::Client, admin: SocketAddr) -> Option<Value> {
    let resp = c.get(format!("http://{admin}/readyz")).send().await.ok()?;
    resp.json().await.ok()
}

async fn metric(c: &reqwest::Client, admin: SocketAddr, name_and_labels: &str) -> Option<f64> {
    let text = c
        .get(format!("http://{admin}/metrics"))
        .send()
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix(name_and_labels))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

async fn drain(c: &reqwest::Client, admin: SocketAddr) -> (Option<Value>, Duration) {
    let started = Instant::now();
    let mut last = None;
    while started.elapsed() < DRAIN_LIMIT {
        last = readyz(c, admin).await;
        if last.as_ref().map(|v| v["outbox"]["depth"] == 0) == Some(true) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    (last, started.elapsed())
}

// ---------------------------------------------------------------------------------------------
// Log classification

/// Stderr lines grouped into log entries: a line that does not start with a timestamp continues
/// the entry before it (an error whose text spans lines, such as a TOML parse error).
fn log_entries(lines: &[String]) -> Vec<String> {
    let mut entries: Vec<String> = Vec::new();
    for line in lines {
        let starts_entry = line
            .split_whitespace()
            .next()
            .and_then(parse_log_time)
            .is_some();
        match entries.last_mut() {
            Some(last) if !starts_entry => {
                last.push('\n');
                last.push_str(line);
            }
            _ => entries.push(line.clone()),
        }
    }
    entries
}

/// What explains a proxy WARN/ERROR entry, or why nothing does.
fn explain(line: &str, timeline: &Timeline) -> Result<&'static str, String> {
    let mut parts = line.split_whitespace();
    let (Some(ts), Some(level)) = (parts.next(), parts.next()) else {
        return Err("not a log line".into());
    };
    let Some(at) = parse_log_time(ts) else {
        return Err("not a log line (no timestamp)".into());
    };
    if !matches!(level, "WARN" | "ERROR") {
        return Ok("info");
    }
    let (from, to) = (at - EXPLAIN_WINDOW_MS, at + 250);
    let any_fault = |f: Fault| f != Fault::Ok;
    let (what, fits): (&'static str, bool) = if line.contains("configuration not reloaded") {
        (
            "invalid config refused",
            timeline.invalid_during(at - 500, at),
        )
    } else if line.contains("CRM looks down: circuit open") {
        (
            "circuit opened (CRM down)",
            timeline.fault_during(from, to, any_fault),
        )
    } else if line.contains("CRM invoice not created; will retry") {
        if line.contains("CRM API error: 500") {
            (
                "CRM 500 → retry",
                timeline.fault_during(from, to, |f| f == Fault::Error500),
            )
        } else if line.contains("did not answer within") {
            (
                "CRM timeout → retry",
                timeline.fault_during(from, to, |f| matches!(f, Fault::Slow(_) | Fault::Hang)),
            )
        } else if line.contains("connection closed before the CRM answered")
            || line.contains("CRM unreachable")
            || line.contains("CRM request failed")
        {
            (
                "CRM dropped the connection → retry",
                timeline.fault_during(from, to, |f| f == Fault::Close),
            )
        } else {
            return Err("CRM failure of a kind the chaos does not cause".into());
        }
    } else {
        return Err("no chaos explains this message".into());
    };
    if fits {
        Ok(what)
    } else {
        Err(format!(
            "{what}, but the matching chaos was not in force around {ts}"
        ))
    }
}

// ---------------------------------------------------------------------------------------------
// Figures

fn percentile_ms(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    f64::from(sorted[i]) / 1000.0
}

fn mib(kb: u64) -> String {
    format!("{:.1} MiB", kb as f64 / 1024.0)
}

struct Args {
    secs: u64,
}

fn args() -> Args {
    let mut secs = 300;
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--quick" => secs = 60,
            "--secs" => {
                secs = it
                    .next()
                    .and_then(|v| v.parse().ok())
                    .expect("--secs needs a number of seconds")
            }
            s if s.starts_with("--secs=") => {
                secs = s["--secs=".len()..]
                    .parse()
                    .expect("--secs needs a number of seconds")
            }
            // `cargo bench` adds `--bench`; anything else is ignored too.
            _ => {}
        }
    }
    Args { secs: secs.max(10) }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let args = args();
    // Ctrl-C or SIGTERM drops the run (and with it the proxy's guard) instead of leaving a child behind.
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("listen for SIGTERM");
    tokio::select! {
        () = run(args) => {}
        _ = tokio::signal::ctrl_c() => panic!("interrupted"),
        _ = term.recv() => panic!("terminated"),
    }
}

async fn run(args: Args) {
    let seed = std::env::var("SOAK_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| fastrand::u64(..));
    let chaos_for = Duration::from_secs(args.secs);
    eprintln!(
        "soak: seed {seed}, {} s of chaos (SOAK_SEED={seed} repeats this run)",
        args.secs
    );

    let pos = SamplePos::start(SamplePosOptions::default())
        .await
        .expect("start the sample POS");
    let crm = Arc::new(
        SampleCrm::start(API_KEY)
            .await
            .expect("start the sample CRM"),
    );
    let dir = tempfile::tempdir().expect("temp dir");
    let data_dir = dir.path().join("data");
    let config_path = dir.path().join("config.toml");
    write_config(
        &config_path,
        &config_text(
            &pos.url(),
            &data_dir,
            ConfigFile::Valid {
                budget_ms: 300,
                access_log: true,
            },
        ),
    );
    let proxy = Arc::new(ProxyProcess::start(&config_path, &crm.url()));
    let admin = http_client();

    // 1. Warm-up, then the baseline with the load stopped and the pools idle.
    let warm = Arc::new(Mutex::new(Tally::default()));
    let (stop, tasks) = start_load(seed ^ 0x5eed, proxy.addr, &warm);
    tokio::time::sleep(WARMUP).await;
    stop_load(stop, tasks).await;
    tokio::time::sleep(IDLE).await;
    let (warm_depth, _) = drain(&admin, proxy.admin).await;
    let baseline = proxy.resources();
    eprintln!(
        "soak: baseline after warm-up: RSS {}, {} fds, {} threads (warm-up outbox depth {})",
        mib(baseline.rss_kb),
        baseline.fds,
        baseline.threads,
        warm_depth.map_or(Value::Null, |v| v["outbox"]["depth"].clone())
    );

    // 2. Chaos under load.
    let tally = Arc::new(Mutex::new(Tally::default()));
    let timeline = Arc::new(Mutex::new(Timeline::default()));
    let chaos_started = Instant::now();
    let until = chaos_started + chaos_for;
    let sampling = Arc::new(AtomicBool::new(false));
    let sampler = tokio::spawn(sample_resources(proxy.clone(), sampling.clone()));
    let (stop, tasks) = start_load(seed, proxy.addr, &tally);
    let flapper = tokio::spawn(flap_crm(seed ^ 1, crm.clone(), until, timeline.clone()));
    let reloader = tokio::spawn(reload_config(
        seed ^ 2,
        proxy.clone(),
        config_path.clone(),
        pos.url(),
        data_dir.clone(),
        until,
        timeline.clone(),
    ));
    let mut next_report = chaos_started + Duration::from_secs(30);
    while Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(250)).await;
        if Instant::now() >= next_report {
            next_report += Duration::from_secs(30);
            // Never hold the tally's lock across an await: the clients need it.
            let (requests, expected) = {
                let t = tally.lock().unwrap();
                (
                    t.served.iter().sum::<u64>() + t.failed.iter().sum::<u64>(),
                    t.expected.len(),
                )
            };
            let depth = readyz(&admin, proxy.admin)
                .await
                .map_or(Value::Null, |v| v["outbox"]["depth"].clone());
            let r = proxy.resources();
            eprintln!(
                "soak: {:>4} s: {} requests, {} invoices expected, {} in the CRM, outbox depth {depth}, RSS {}, {} fds",
                chaos_started.elapsed().as_secs(),
                requests,
                expected,
                crm.invoices().len(),
                mib(r.rss_kb),
                r.fds,
            );
        }
    }
    let fault_counts = flapper.await.expect("the CRM flapper panicked");
    let reloads = reloader.await.expect("the reloader panicked");
    // 3. The CRM answers (the flapper ended on Normal), the load stops, the outbox drains.
    stop_load(stop, tasks).await;
    let load_secs = chaos_started.elapsed().as_secs_f64();
    let (ready, drain_time) = drain(&admin, proxy.admin).await;
    let ready = ready.unwrap_or(Value::Null);
    let reloads_ok = metric(
        &admin,
        proxy.admin,
        "pos_crm_proxy_config_reloads_total{outcome=\"ok\"}",
    )
    .await
    .unwrap_or(0.0);
    let reloads_err = metric(
        &admin,
        proxy.admin,
        "pos_crm_proxy_config_reloads_total{outcome=\"error\"}",
    )
    .await
    .unwrap_or(0.0);
    tokio::time::sleep(IDLE).await;
    sampling.store(true, Ordering::Relaxed);
    let peak = sampler.await.expect("the sampler panicked");
    let after = proxy.resources();
    drop(admin);

    // The proxy's own end: SIGTERM, graceful exit, every stderr line collected.
    let mut proxy = Arc::try_unwrap(proxy)
        .ok()
        .expect("every task using the proxy has ended");
    let exit = proxy.terminate(Duration::from_secs(15));
    let log = proxy.log_lines();
    drop(proxy);

    // 4. Figures.
    let t = tally.lock().unwrap();
    let timeline = timeline.lock().unwrap();
    let invoices = crm.invoices();
    let posts = crm.invoice_posts();
    let mut per_sale: HashMap<&str, usize> = HashMap::new();
    for inv in &invoices {
        *per_sale
            .entry(inv.pos_sale_id.as_deref().unwrap_or("(none)"))
            .or_default() += 1;
    }
    let expected: HashSet<&str> = t.expected.iter().map(String::as_str).collect();
    let warm_t = warm.lock().unwrap();
    let answered_any: HashSet<&str> = expected
        .iter()
        .copied()
        .chain(warm_t.expected.iter().map(String::as_str))
        .collect();
    let duplicated = per_sale.values().filter(|n| **n > 1).count();
    let lost: Vec<&str> = expected
        .iter()
        .filter(|s| !per_sale.contains_key(**s))
        .copied()
        .collect();
    let unanswered = per_sale
        .keys()
        .filter(|s| !answered_any.contains(**s))
        .count();
    let replays = posts
        .iter()
        .filter(|p| p.answered_status == Some(200))
        .count();
    let warm_lost = warm_t
        .expected
        .iter()
        .filter(|s| !per_sale.contains_key(s.as_str()))
        .count();

    let entries = log_entries(&log);
    let multi_line = entries.iter().filter(|e| e.contains('\n')).count();
    let key_leaks = log.iter().filter(|l| l.contains(API_KEY)).count();
    let mut classes: BTreeMap<&'static str, u64> = BTreeMap::new();
    let mut unexplained: Vec<String> = Vec::new();
    let mut info = 0u64;
    let mut refused_example = None;
    for entry in &entries {
        match explain(entry, &timeline) {
            Ok("info") => info += 1,
            Ok(class) => {
                if class == "invalid config refused" && refused_example.is_none() {
                    refused_example = Some(entry.clone());
                }
                *classes.entry(class).or_default() += 1
            }
            Err(why) => unexplained.push(format!("{why}: {entry}")),
        }
    }
    if let Some(e) = &refused_example {
        println!("\nA refused reload as the proxy logged it:\n```\n{e}\n```");
    }
    let reload_lines = log
        .iter()
        .filter(|l| l.contains("configuration reloaded"))
        .count();

    // After each fault, how long until a till is again told "invoice created".
    let mut created_at = t.created_at.clone();
    created_at.sort_unstable();
    let mut recovery_ms: Vec<u32> = Vec::new();
    let mut not_recovered = 0;
    for (i, &(start, f)) in timeline.faults.iter().enumerate() {
        let Some(&(end, _)) = timeline.faults.get(i + 1) else {
            break; // the final "ok", after the load
        };
        if f != Fault::Ok || i == 0 {
            continue;
        }
        let first = created_at.partition_point(|&c| c < start);
        match created_at.get(first) {
            Some(&c) if c < end => recovery_ms.push((c - start) as u32),
            _ => not_recovered += 1,
        }
    }
    recovery_ms.sort_unstable();
    let mut posts_by_status: BTreeMap<String, usize> = BTreeMap::new();
    for p in &posts {
        let k = p
            .answered_status
            .map_or("never answered".to_string(), |s| s.to_string());
        *posts_by_status.entry(k).or_default() += 1;
    }

    let served: u64 = t.served.iter().sum();
    let failed: u64 = t.failed.iter().sum();
    let fd_delta = after.fds as i64 - baseline.fds as i64;
    let rss_growth = after.rss_kb as f64 / baseline.rss_kb.max(1) as f64 - 1.0;
    // Each valid file is reloaded twice (file watcher, then SIGHUP) except the last one (watcher
    // only); each invalid file is refused twice.
    let expected_ok = f64::from(2 * reloads.valid_files - 1);
    let expected_err = f64::from(2 * reloads.invalid_files);

    let mut rows: Vec<(String, String)> = Vec::new();
    let mut row = |k: &str, v: String| rows.push((k.to_string(), v));
    row("seed", seed.to_string());
    row(
        "chaos + load",
        format!(
            "{load_secs:.0} s, {CLIENTS} clients, ≤ {} req/s",
            CLIENTS as u64 * RATE_PER_CLIENT
        ),
    );
    row(
        "requests served",
        format!(
            "{served} ({:.0}/s), failed {failed}",
            served as f64 / load_secs
        ),
    );
    for k in KINDS {
        let mut l = t.latency_us[k.index()].clone();
        l.sort_unstable();
        row(
            &format!("– {}", k.label()),
            format!(
                "{} (failed {}); p50 {:.1} ms, p99 {:.1} ms, max {:.0} ms",
                t.served[k.index()],
                t.failed[k.index()],
                percentile_ms(&l, 0.5),
                percentile_ms(&l, 0.99),
                percentile_ms(&l, 1.0)
            ),
        );
    }
    row(
        "CRM behaviours (times each)",
        fault_counts
            .iter()
            .map(|(k, v)| format!("{k} {v}"))
            .collect::<Vec<_>>()
            .join(", "),
    );
    row(
        "config rewrites",
        format!(
            "{} valid, {} invalid, {} SIGHUPs",
            reloads.valid_files, reloads.invalid_files, reloads.sighups
        ),
    );
    row(
        "reloads (metrics)",
        format!(
            "ok {reloads_ok} (expected {expected_ok}), refused {reloads_err} (expected {expected_err}); {reload_lines} \"configuration reloaded\" lines"
        ),
    );
    row(
        "sync budgets seen in crmStatus",
        format!("{:?} ms", t.budgets_seen),
    );
    row("till told: invoice created", t.created_inline.to_string());
    for (k, v) in &t.queued {
        row(&format!("till told: queued – {k}"), v.to_string());
    }
    row("till told: not queued", t.not_queued.to_string());
    row(
        "invoices expected (answered sales with a customer)",
        format!("{} (+{} in warm-up)", expected.len(), warm_t.expected.len()),
    );
    row(
        "invoices created in the CRM",
        format!(
            "{} ({} for sales no till saw answered)",
            per_sale.len(),
            unanswered
        ),
    );
    row(
        "invoice POSTs received",
        format!(
            "{} ({} idempotent replays answered 200)",
            posts.len(),
            replays
        ),
    );
    row(
        "invoice POSTs by CRM answer",
        posts_by_status
            .iter()
            .map(|(k, v)| format!("{k}: {v}"))
            .collect::<Vec<_>>()
            .join(", "),
    );
    row(
        "CRM back → first \"invoice created\" answer",
        format!(
            "p50 {:.1} s, max {:.1} s over {} ok periods ({} ok periods without one)",
            percentile_ms(&recovery_ms, 0.5), // ms in, s out
            percentile_ms(&recovery_ms, 1.0),
            recovery_ms.len() + not_recovered,
            not_recovered
        ),
    );
    row("**duplicates**", duplicated.to_string());
    row(
        "**lost**",
        format!("{} (+{warm_lost} in warm-up)", lost.len()),
    );
    row(
        "outbox after drain",
        format!(
            "depth {}, delivered {}, dead {}, held {}, circuit {} (drained in {:.1} s)",
            ready["outbox"]["depth"],
            ready["outbox"]["delivered"],
            ready["outbox"]["dead"],
            ready["outbox"]["held"],
            ready["outbox"]["circuit"],
            drain_time.as_secs_f64()
        ),
    );
    row(
        "RSS baseline → after (peak)",
        format!(
            "{} → {} ({:+.0} %) (peak {})",
            mib(baseline.rss_kb),
            mib(after.rss_kb),
            rss_growth * 100.0,
            mib(peak.rss_kb)
        ),
    );
    row(
        "open fds baseline → after (peak)",
        format!(
            "{} → {} ({fd_delta:+}) (peak {})",
            baseline.fds, after.fds, peak.fds
        ),
    );
    row(
        "threads baseline → after (peak)",
        format!(
            "{} → {} (peak {})",
            baseline.threads, after.threads, peak.threads
        ),
    );
    row(
        "proxy WARN/ERROR lines",
        format!(
            "{} explained, {} unexplained ({} INFO lines)",
            classes.values().sum::<u64>(),
            unexplained.len(),
            info
        ),
    );
    for (k, v) in &classes {
        row(&format!("– {k}"), v.to_string());
    }
    row(
        "multi-line log entries",
        format!("{multi_line} (an error text that spans lines)"),
    );
    row("stderr lines with the CRM API key", key_leaks.to_string());
    row(
        "exit after SIGTERM",
        exit.map_or("killed (no exit within 15 s)".into(), |c| c.to_string()),
    );

    println!("\n| figure | value |\n|---|---|");
    for (k, v) in &rows {
        println!("| {k} | {v} |");
    }
    println!();

    let mut problems = Vec::new();
    if !lost.is_empty() || warm_lost > 0 {
        problems.push(format!(
            "{} answered sales with a customer have no invoice (first: {:?})",
            lost.len() + warm_lost,
            lost.iter().take(5).collect::<Vec<_>>()
        ));
    }
    if duplicated > 0 {
        let dups: Vec<_> = per_sale.iter().filter(|(_, n)| **n > 1).take(5).collect();
        problems.push(format!(
            "{duplicated} sales have more than one invoice: {dups:?}"
        ));
    }
    if failed > 0 || t.not_queued > 0 || warm_t.failed.iter().sum::<u64>() > 0 {
        problems.push(format!(
            "{failed} requests failed, {} invoices not queued; samples:\n  {}\n  {}",
            t.not_queued,
            t.samples.join("\n  "),
            warm_t.samples.join("\n  ")
        ));
    }
    if ready["outbox"]["depth"] != 0 {
        problems.push(format!(
            "the outbox did not drain within {DRAIN_LIMIT:?}: {ready}"
        ));
    }
    if !unexplained.is_empty() {
        problems.push(format!(
            "{} unexplained WARN/ERROR lines:\n  {}",
            unexplained.len(),
            unexplained
                .iter()
                .take(30)
                .cloned()
                .collect::<Vec<_>>()
                .join("\n  ")
        ));
    }
    if key_leaks > 0 {
        problems.push(format!(
            "the CRM API key appears in {key_leaks} stderr lines"
        ));
    }
    if reloads.invalid_files == 0 {
        problems.push("no invalid config was tried (run longer)".into());
    }
    if reloads_ok != expected_ok || reloads_err != expected_err {
        problems.push(format!(
            "reloads: ok {reloads_ok} (expected {expected_ok}), refused {reloads_err} (expected {expected_err})"
        ));
    }
    if fd_delta > FD_TOLERANCE {
        problems.push(format!(
            "open fds {} → {} (more than +{FD_TOLERANCE})",
            baseline.fds, after.fds
        ));
    }
    if rss_growth > RSS_GROWTH_LIMIT {
        problems.push(format!(
            "RSS {} → {} (more than +{:.0} %)",
            mib(baseline.rss_kb),
            mib(after.rss_kb),
            RSS_GROWTH_LIMIT * 100.0
        ));
    }
    if exit != Some(0) {
        problems.push(format!("exit after SIGTERM: {exit:?}, expected 0"));
    }
    if !problems.is_empty() {
        panic!("soak failed (seed {seed}):\n- {}", problems.join("\n- "));
    }
    println!("soak passed (seed {seed})");
}
