//! pos-crm-proxy against nginx and against no proxy at all, with real processes on loopback.
//!
//! `cargo bench --bench compare` (about 5 minutes) or `cargo bench --bench compare -- --quick`
//! (2 s runs, 1 round, about 1 minute). Other flags: `--secs N`, `--rounds N`, `--no-pin`,
//! `--serve N` (start upstream, fake CRM, nginx and the proxy, print their addresses, keep them
//! up N seconds and measure nothing: for profiling by hand with `perf record -p` and `wrk`).
//!
//! Needs `wrk` and `nginx` on the PATH (Debian: `apt-get install -y nginx wrk`); without them it
//! says so and exits 0. It installs nothing.
//!
//! What runs, all on 127.0.0.1:
//! - in this process, on its own tokio runtime: a lean hyper HTTP/1 upstream (`GET /small` 1 KB,
//!   `GET /large` 64 KB, `POST /echo`, `POST /api/sales` answering like the POS) and a lean fake
//!   CRM answering `POST /api/external/invoices` at once (not `SampleCrm`: that one is built for
//!   fidelity, this one only has to be fast);
//! - nginx (1 worker, keep-alive to the upstream) and the release `pos-crm-proxy` binary, each
//!   pinned with `taskset` to the CPU(s) of the target under test when there is more than one CPU;
//! - `wrk -t1 -c32 --latency` against each target, interleaved (target order rotated every round)
//!   and repeated; the tables show medians over the rounds.
//!
//! Then the proxy's RSS with 1,000 idle keep-alive connections, and the latency of a sale with a
//! customer when the CRM never answers (a second proxy with `crm.sync_budget_ms = 200`).
//!
//! The Markdown report goes to stdout and to `target/bench-compare.md`. Only ratios measured in
//! the same run mean much; absolute numbers drift between runs and machines. Every process
//! started here is stopped at the end, also when something panics (the `Procs` guard), and is
//! started under `setpriv --pdeathsig TERM` when available, so it also goes if this process dies.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::ffi::OsString;
use std::fmt::Write as _;
use std::fs;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener as StdListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;

const PROXY_BIN: &str = env!("CARGO_BIN_EXE_pos-crm-proxy");
const API_KEY: &str = "bench-key";
const CONNECTIONS: u32 = 32;
const IDLE_CONNECTIONS: usize = 1000;
const HANG_BUDGET_MS: u64 = 200;

const SALE_WITH_CUSTOMER: &str = r#"{"items":[{"id":"sku-espresso","name":"Espresso","price":2.5,"quantity":2,"type":"product"},{"id":"svc-wrap","name":"Gift wrap","price":1,"quantity":1,"type":"service"}],"subtotal":6,"tax":0.6,"total":6.6,"paymentMethod":"Credit Card","user":"bench-cashier","warehouseId":"WH1","customerId":"cust-42","customerName":"Bench Customer","currency":"USD"}"#;
const SALE_NO_CUSTOMER: &str = r#"{"items":[{"id":"sku-espresso","name":"Espresso","price":2.5,"quantity":2,"type":"product"},{"id":"svc-wrap","name":"Gift wrap","price":1,"quantity":1,"type":"service"}],"subtotal":6,"tax":0.6,"total":6.6,"paymentMethod":"Cash","user":"bench-cashier","warehouseId":"WH1"}"#;
const ECHO_BODY: &str = r#"{"event":"till-heartbeat","till":"T-07","cashier":"bench-cashier","seq":123456,"items":[1,2,3,4,5,6,7,8],"note":"small POST passthrough body for the benchmark"}"#;

// ---------------------------------------------------------------------------------------------
// Options and environment
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone)]
struct Options {
    secs: u64,
    rounds: usize,
    quick: bool,
    pin: bool,
    /// `--pin UP/TARGET/WRK`: taskset CPU lists instead of the default plan.
    pin_layout: Option<String>,
    hang_sales: usize,
    /// `--serve SECS`: start everything, print the addresses, keep it up for SECS, measure
    /// nothing (for profiling the proxy by hand with `perf` and `wrk`).
    serve: Option<u64>,
}

fn parse_args() -> Options {
    let mut o = Options {
        secs: 5,
        rounds: 3,
        quick: false,
        pin: true,
        pin_layout: None,
        hang_sales: 30,
        serve: None,
    };
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    while i < args.len() {
        match args[i].as_str() {
            "--quick" => {
                o.quick = true;
                o.secs = 2;
                o.rounds = 1;
                o.hang_sales = 12;
            }
            "--no-pin" => o.pin = false,
            "--pin" => {
                o.pin_layout = args.get(i + 1).cloned();
                i += 1;
            }
            "--serve" => {
                let secs = args.get(i + 1).and_then(|v| v.parse().ok());
                o.serve = Some(secs.filter(|s| *s > 0).unwrap_or(600).min(3600));
                i += 1;
            }
            "--secs" | "--rounds" => {
                let v: u64 = args
                    .get(i + 1)
                    .and_then(|v| v.parse().ok())
                    .filter(|v| *v > 0)
                    .unwrap_or_else(|| panic!("{} wants a positive number", args[i]));
                if args[i] == "--secs" {
                    o.secs = v.min(60);
                } else {
                    o.rounds = (v as usize).min(9);
                }
                i += 1;
            }
            // `cargo bench` passes `--bench`; anything else is ignored too.
            _ => {}
        }
        i += 1;
    }
    o
}

/// A program on the PATH; for the `sbin` tools also the usual Debian places, which a non-root
/// PATH often lacks.
fn find_program(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/local/sbin"].map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| {
            fs::metadata(p)
                .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
                .unwrap_or(false)
        })
}

fn command_output(program: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(program).args(args).output().ok()?;
    let mut s = String::from_utf8_lossy(&out.stdout).into_owned();
    s.push_str(&String::from_utf8_lossy(&out.stderr));
    Some(s.trim().to_string())
}

fn cpu_model() -> String {
    fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into())
}

/// The filesystem type under `path` (longest mount prefix in /proc/mounts).
fn fs_type(path: &Path) -> String {
    let path = path.canonicalize().unwrap_or_else(|_| path.to_path_buf());
    let mounts = fs::read_to_string("/proc/mounts").unwrap_or_default();
    mounts
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let (_dev, mnt, ty) = (f.next()?, f.next()?, f.next()?);
            path.starts_with(mnt).then(|| (mnt.len(), ty.to_string()))
        })
        .max_by_key(|(len, _)| *len)
        .map(|(_, ty)| ty)
        .unwrap_or_else(|| "unknown".into())
}

fn free_port() -> u16 {
    StdListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("cannot bind a loopback port")
        .port()
}

// ---------------------------------------------------------------------------------------------
// /proc readers
// ---------------------------------------------------------------------------------------------

fn clock_ticks() -> f64 {
    command_output("getconf", &["CLK_TCK"])
        .and_then(|s| s.parse().ok())
        .unwrap_or(100.0)
}

/// (comm, ppid, utime + stime in ticks) from /proc/PID/stat.
fn proc_stat(pid: u32) -> Option<(String, u32, u64)> {
    let s = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let open = s.find('(')?;
    let close = s.rfind(')')?;
    let comm = s[open + 1..close].to_string();
    // Fields after the comm: state(3) ppid(4) ... utime(14) stime(15).
    let rest: Vec<&str> = s[close + 1..].split_whitespace().collect();
    let ppid = rest.get(1)?.parse().ok()?;
    let utime: u64 = rest.get(11)?.parse().ok()?;
    let stime: u64 = rest.get(12)?.parse().ok()?;
    Some((comm, ppid, utime + stime))
}

fn status_field(pid: u32, key: &str) -> Option<String> {
    let s = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix(key).and_then(|v| v.strip_prefix(':')))
        .map(|v| v.trim().to_string())
}

fn rss_kb(pid: u32) -> Option<u64> {
    status_field(pid, "VmRSS")?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

fn children_of(pid: u32) -> Vec<u32> {
    let Ok(dir) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&p| proc_stat(p).is_some_and(|(_, ppid, _)| ppid == pid))
        .collect()
}

fn cpu_ticks(pids: &[u32]) -> u64 {
    pids.iter().filter_map(|&p| proc_stat(p)).map(|s| s.2).sum()
}

/// (busy, total) jiffies of every CPU, from /proc/stat.
fn cpu_jiffies() -> Vec<(u64, u64)> {
    fs::read_to_string("/proc/stat")
        .unwrap_or_default()
        .lines()
        .filter(|l| l.starts_with("cpu") && l.as_bytes().get(3).is_some_and(u8::is_ascii_digit))
        .map(|l| {
            let v: Vec<u64> = l
                .split_whitespace()
                .skip(1)
                .filter_map(|x| x.parse().ok())
                .collect();
            // user nice system idle iowait irq softirq steal ...
            let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
            let total: u64 = v.iter().take(8).sum();
            (total - idle, total)
        })
        .collect()
}

/// utime + stime + cutime + cstime of this process: the bench itself (upstream, fake CRM) and
/// its reaped children (each wrk run, once waited for).
fn self_and_reaped_ticks() -> u64 {
    let Ok(s) = fs::read_to_string("/proc/self/stat") else {
        return 0;
    };
    let Some(close) = s.rfind(')') else { return 0 };
    s[close + 1..]
        .split_whitespace()
        .skip(11)
        .take(4)
        .filter_map(|v| v.parse::<u64>().ok())
        .sum()
}

fn busy_percent(before: &[(u64, u64)], after: &[(u64, u64)]) -> Vec<f64> {
    before
        .iter()
        .zip(after)
        .map(|(b, a)| {
            let total = a.1.saturating_sub(b.1).max(1) as f64;
            a.0.saturating_sub(b.0) as f64 / total * 100.0
        })
        .collect()
}

fn open_files_limit(pid: &str) -> Option<u64> {
    let s = fs::read_to_string(format!("/proc/{pid}/limits")).ok()?;
    let line = s.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

/// Samples the summed RSS and thread count of `pids` every 50 ms until finished; keeps the
/// maxima.
struct RssSampler {
    stop: Arc<AtomicBool>,
    handle: thread::JoinHandle<(u64, u64)>,
}

impl RssSampler {
    fn start(pids: Vec<u32>) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let handle = thread::spawn(move || {
            let (mut rss, mut threads) = (0, 0);
            loop {
                rss = rss.max(pids.iter().filter_map(|&p| rss_kb(p)).sum());
                threads = threads.max(
                    pids.iter()
                        .filter_map(|&p| status_field(p, "Threads")?.parse::<u64>().ok())
                        .sum(),
                );
                if flag.load(Ordering::Relaxed) {
                    return (rss, threads);
                }
                thread::sleep(Duration::from_millis(50));
            }
        });
        RssSampler { stop, handle }
    }

    /// (max RSS in KB, max threads).
    fn finish(self) -> (u64, u64) {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.join().unwrap_or((0, 0))
    }
}

// ---------------------------------------------------------------------------------------------
// Processes: launching, pinning, and the guard that stops them
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone)]
struct Pinning {
    /// This process (the upstream and the fake CRM run on its runtime).
    upstream: Option<String>,
    /// nginx or pos-crm-proxy.
    target: Option<String>,
    wrk: Option<String>,
    description: String,
}

fn plan_pinning(opts: &Options, nproc: usize, have_taskset: bool) -> Pinning {
    let pin = opts.pin;
    let none = |why: &str| Pinning {
        upstream: None,
        target: None,
        wrk: None,
        description: format!("none ({why}); every process free to run on any CPU"),
    };
    if !pin {
        return none("--no-pin");
    }
    if !have_taskset {
        return none("taskset not found");
    }
    if let Some(layout) = &opts.pin_layout {
        let parts: Vec<&str> = layout.split('/').collect();
        assert!(parts.len() == 3, "--pin wants UP/TARGET/WRK, e.g. 0/1/0");
        let some = |s: &str| (!s.is_empty()).then(|| s.to_string());
        return Pinning {
            upstream: some(parts[0]),
            target: some(parts[1]),
            wrk: some(parts[2]),
            description: format!(
                "--pin {layout}: bench process (upstream + fake CRM) on CPU(s) `{}`, target under test on `{}`, wrk on `{}` (empty = not pinned)",
                parts[0], parts[1], parts[2]
            ),
        };
    }
    match nproc {
        0 | 1 => none("1 CPU"),
        2 => Pinning {
            upstream: Some("0".into()),
            target: Some("1".into()),
            wrk: Some("0".into()),
            description: "CPU 0: this bench process (in-process upstream + fake CRM, 1 tokio worker) \
                          and wrk; CPU 1: the target under test alone (nginx master + its 1 worker, \
                          or every thread of pos-crm-proxy). Direct runs: wrk and the upstream share \
                          CPU 0 and CPU 1 idles."
                .into(),
        },
        n => {
            let up = if n > 3 {
                format!("0,3-{}", n - 1)
            } else {
                "0".to_string()
            };
            Pinning {
                upstream: Some(up.clone()),
                target: Some("1".into()),
                wrk: Some("2".into()),
                description: format!(
                    "CPU(s) {up}: this bench process (in-process upstream + fake CRM); CPU 1: the \
                     target under test alone (nginx master + worker, or all pos-crm-proxy threads); \
                     CPU 2: wrk"
                ),
            }
        }
    }
}

/// How children are launched: with a parent-death signal when `setpriv` can, pinned when asked.
#[derive(Debug, Clone)]
struct Launcher {
    setpriv: bool,
}

impl Launcher {
    fn new() -> Self {
        let setpriv = command_output("setpriv", &["--help"])
            .map(|h| h.contains("--pdeathsig"))
            .unwrap_or(false);
        Launcher { setpriv }
    }

    /// `argv` run as: [setpriv --pdeathsig TERM --] [sh -c 'ulimit -n ...; exec "$@"'] [taskset -c
    /// CPUS] argv. Each step `exec`s the next, so the child's pid is the final program's.
    fn command(&self, pin: Option<&str>, raise_nofile: bool, argv: &[OsString]) -> Command {
        let mut full: Vec<OsString> = Vec::new();
        if self.setpriv {
            full.extend(["setpriv", "--pdeathsig", "TERM", "--"].map(OsString::from));
        }
        if raise_nofile {
            full.extend(
                [
                    "sh",
                    "-c",
                    "ulimit -n 8192 2>/dev/null || ulimit -n \"$(ulimit -Hn)\" 2>/dev/null; exec \"$@\"",
                    "sh",
                ]
                .map(OsString::from),
            );
        }
        if let Some(cpus) = pin {
            full.extend(["taskset", "-c", cpus].map(OsString::from));
        }
        full.extend(argv.iter().cloned());
        let mut cmd = Command::new(&full[0]);
        cmd.args(&full[1..]);
        cmd
    }
}

fn signal(pid: u32, sig: &str) {
    let _ = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// Every long-running child of the bench. Dropping it (normally or while unwinding from a
/// panic) stops them all: TERM, up to 3 s to exit, then KILL, and KILL for any child process
/// they left behind (nginx workers).
#[derive(Default)]
struct Procs {
    list: Vec<(String, Child)>,
}

impl Procs {
    fn add(&mut self, name: &str, child: Child) -> u32 {
        let pid = child.id();
        self.list.push((name.to_string(), child));
        pid
    }

    /// Panics with `log`'s tail when `name` has exited.
    fn assert_alive(&mut self, name: &str, log: &Path) {
        for (n, child) in &mut self.list {
            if n == name {
                if let Ok(Some(status)) = child.try_wait() {
                    panic!("{name} exited ({status}); its log:\n{}", tail(log, 30));
                }
            }
        }
    }

    fn stop(&mut self, name: &str) {
        if let Some(i) = self.list.iter().position(|(n, _)| n == name) {
            let (_, child) = self.list.remove(i);
            stop_child(child);
        }
    }
}

fn stop_child(mut child: Child) {
    if matches!(child.try_wait(), Ok(Some(_))) {
        return;
    }
    let pid = child.id();
    let kids = children_of(pid);
    signal(pid, "TERM");
    let deadline = Instant::now() + Duration::from_secs(3);
    while Instant::now() < deadline {
        if matches!(child.try_wait(), Ok(Some(_))) {
            break;
        }
        thread::sleep(Duration::from_millis(20));
    }
    if !matches!(child.try_wait(), Ok(Some(_))) {
        let _ = child.kill();
        let _ = child.wait();
    }
    for k in kids {
        // Still there and still the child it was (its parent is gone, so it was reparented).
        if proc_stat(k).is_some_and(|(_, ppid, _)| ppid != pid) {
            signal(k, "KILL");
        }
    }
}

impl Drop for Procs {
    fn drop(&mut self) {
        while let Some((_, child)) = self.list.pop() {
            stop_child(child);
        }
    }
}

fn tail(path: &Path, lines: usize) -> String {
    let s = fs::read_to_string(path).unwrap_or_default();
    let v: Vec<&str> = s.lines().collect();
    v[v.len().saturating_sub(lines)..].join("\n")
}

// ---------------------------------------------------------------------------------------------
// A minimal blocking HTTP/1.1 client (readiness, checks, idle connections, sequential sales)
// ---------------------------------------------------------------------------------------------

struct Http {
    r: BufReader<TcpStream>,
}

impl Http {
    fn connect(addr: SocketAddr) -> io::Result<Http> {
        let s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
        s.set_nodelay(true)?;
        s.set_read_timeout(Some(Duration::from_secs(15)))?;
        s.set_write_timeout(Some(Duration::from_secs(5)))?;
        Ok(Http {
            r: BufReader::new(s),
        })
    }

    fn send(&mut self, method: &str, path: &str, body: Option<&str>) -> io::Result<(u16, String)> {
        let mut req = format!("{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n");
        if let Some(b) = body {
            let _ = write!(
                req,
                "Content-Type: application/json\r\nContent-Length: {}\r\n",
                b.len()
            );
        }
        req.push_str("\r\n");
        req.push_str(body.unwrap_or(""));
        self.r.get_mut().write_all(req.as_bytes())?;

        let bad = |m: &str| io::Error::new(io::ErrorKind::InvalidData, m.to_string());
        let mut line = String::new();
        if self.r.read_line(&mut line)? == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        let status: u16 = line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| bad("bad status line"))?;
        let (mut length, mut chunked) = (None, false);
        loop {
            line.clear();
            if self.r.read_line(&mut line)? == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            let l = line.trim_end();
            if l.is_empty() {
                break;
            }
            if let Some((k, v)) = l.split_once(':') {
                let (k, v) = (k.trim().to_ascii_lowercase(), v.trim());
                if k == "content-length" {
                    length = v.parse::<usize>().ok();
                } else if k == "transfer-encoding" && v.to_ascii_lowercase().contains("chunked") {
                    chunked = true;
                }
            }
        }
        let mut body = Vec::new();
        if chunked {
            loop {
                line.clear();
                self.r.read_line(&mut line)?;
                let size = usize::from_str_radix(line.trim().split(';').next().unwrap_or(""), 16)
                    .map_err(|_| bad("bad chunk size"))?;
                if size == 0 {
                    loop {
                        line.clear();
                        if self.r.read_line(&mut line)? == 0 || line.trim().is_empty() {
                            break;
                        }
                    }
                    break;
                }
                let start = body.len();
                body.resize(start + size, 0);
                self.r.read_exact(&mut body[start..])?;
                let mut crlf = [0; 2];
                self.r.read_exact(&mut crlf)?;
            }
        } else if let Some(n) = length {
            body.resize(n, 0);
            self.r.read_exact(&mut body)?;
        } else if status != 204 && status != 304 && method != "HEAD" {
            self.r.read_to_end(&mut body)?;
        }
        Ok((status, String::from_utf8_lossy(&body).into_owned()))
    }

    /// Whether the server still holds the connection open (nothing to read, no EOF).
    fn still_open(&self) -> bool {
        let s = self.r.get_ref();
        if s.set_nonblocking(true).is_err() {
            return false;
        }
        let mut b = [0u8; 1];
        let open = matches!(s.peek(&mut b), Err(e) if e.kind() == io::ErrorKind::WouldBlock);
        let _ = s.set_nonblocking(false);
        open
    }
}

fn get_once(addr: SocketAddr, path: &str) -> io::Result<(u16, String)> {
    Http::connect(addr)?.send("GET", path, None)
}

// ---------------------------------------------------------------------------------------------
// In-process upstream (fast POS) and fake CRM
// ---------------------------------------------------------------------------------------------

struct Counters {
    sales: AtomicU64,
    invoices: AtomicU64,
    hung_invoice_requests: AtomicU64,
    /// Idempotency-Keys of the invoices created, to spot a sale invoiced twice.
    invoice_keys: std::sync::Mutex<std::collections::HashSet<String>>,
    duplicate_invoices: AtomicU64,
}

type HttpResult = Result<Response<Full<Bytes>>, Infallible>;

fn respond(status: u16, content_type: &'static str, body: Bytes) -> HttpResult {
    let mut resp = Response::new(Full::new(body));
    *resp.status_mut() = StatusCode::from_u16(status).expect("valid status");
    resp.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(content_type),
    );
    Ok(resp)
}

/// A POS answer shaped like the real one (inventory service not configured), ~1 KB.
fn sale_answer(n: u64) -> String {
    let id = format!("POS_{n}_x");
    format!(
        r#"{{"success":true,"saleId":"{id}","message":"Sale completed successfully (inventory service unavailable - manual stock adjustment may be required)","saleRecord":{{"id":"{id}","timestamp":"2026-01-01T00:00:00.000Z","items":[{{"id":"sku-espresso","name":"Espresso","price":2.5,"quantity":2,"type":"product"}},{{"id":"svc-wrap","name":"Gift wrap","price":1,"quantity":1,"type":"service"}}],"subtotal":6,"tax":0.6,"total":6.6,"paymentMethod":"Credit Card","user":"bench-cashier","warehouseId":"WH1","inventoryTransactions":[{{"item_id":"sku-espresso","success":false,"error":"Inventory service not configured"}}],"stockUpdates":[{{"success":false,"item_id":"sku-espresso","error":"Inventory service not configured"}}],"inventorySummary":{{"total_items":1,"successful_updates":0,"failed_updates":1}}}},"inventoryStatus":{{"serviceAvailable":false,"updatesSuccessful":false,"summary":{{"total_items":1,"successful_updates":0,"failed_updates":1}}}},"warnings":["Inventory update failed for item sku-espresso: Inventory service not configured"]}}"#
    )
}

async fn upstream_handler(
    req: Request<Incoming>,
    small: Bytes,
    large: Bytes,
    counters: Arc<Counters>,
) -> HttpResult {
    match (req.method().clone(), req.uri().path()) {
        (Method::GET, "/small") => respond(200, "text/plain", small),
        (Method::GET, "/large") => respond(200, "application/octet-stream", large),
        (Method::POST, "/echo") => {
            let _ = req.into_body().collect().await;
            respond(
                200,
                "application/json",
                Bytes::from_static(b"{\"ok\":true}"),
            )
        }
        (Method::POST, "/api/sales") => {
            let _ = req.into_body().collect().await;
            let n = counters.sales.fetch_add(1, Ordering::Relaxed) + 1;
            respond(207, "application/json", Bytes::from(sale_answer(n)))
        }
        _ => respond(404, "text/plain", Bytes::from_static(b"not found")),
    }
}

async fn crm_handler(req: Request<Incoming>, counters: Arc<Counters>, hang: bool) -> HttpResult {
    let is_invoice = req.method() == Method::POST && req.uri().path() == "/api/external/invoices";
    let key = req
        .headers()
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let _ = req.into_body().collect().await;
    if !is_invoice {
        return respond(
            404,
            "application/json",
            Bytes::from_static(b"{\"success\":false}"),
        );
    }
    if hang {
        counters
            .hung_invoice_requests
            .fetch_add(1, Ordering::Relaxed);
        // Never answers (for the length of any run of this bench).
        tokio::time::sleep(Duration::from_secs(3600)).await;
    }
    let n = counters.invoices.fetch_add(1, Ordering::Relaxed) + 1;
    if !counters.invoice_keys.lock().unwrap().insert(key) {
        counters.duplicate_invoices.fetch_add(1, Ordering::Relaxed);
    }
    let body = format!(
        r#"{{"success":true,"invoice_id":"00000000-0000-4000-8000-{n:012}","invoice_number":"INV-BENCH-{n:06}"}}"#
    );
    respond(201, "application/json", Bytes::from(body))
}

/// Serves hyper HTTP/1 on `listener` with `handler` for every request.
async fn serve<F, Fut>(listener: tokio::net::TcpListener, handler: F)
where
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = HttpResult> + Send + 'static,
{
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let _ = stream.set_nodelay(true);
        let handler = handler.clone();
        tokio::spawn(async move {
            let _ = hyper::server::conn::http1::Builder::new()
                .keep_alive(true)
                .serve_connection(TokioIo::new(stream), service_fn(handler))
                .await;
        });
    }
}

fn start_upstream(rt: &tokio::runtime::Runtime, counters: &Arc<Counters>) -> SocketAddr {
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .expect("bind upstream");
    let addr = listener.local_addr().unwrap();
    let small = Bytes::from(vec![b's'; 1024]);
    let large = Bytes::from(vec![b'L'; 64 * 1024]);
    let counters = Arc::clone(counters);
    rt.spawn(serve(listener, move |req| {
        upstream_handler(req, small.clone(), large.clone(), Arc::clone(&counters))
    }));
    addr
}

fn start_crm(rt: &tokio::runtime::Runtime, counters: &Arc<Counters>, hang: bool) -> SocketAddr {
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .expect("bind CRM");
    let addr = listener.local_addr().unwrap();
    let counters = Arc::clone(counters);
    rt.spawn(serve(listener, move |req| {
        crm_handler(req, Arc::clone(&counters), hang)
    }));
    addr
}

// ---------------------------------------------------------------------------------------------
// nginx and the proxy
// ---------------------------------------------------------------------------------------------

struct Nginx {
    addr: SocketAddr,
    pid: u32,
    log: PathBuf,
}

fn start_nginx(
    procs: &mut Procs,
    launcher: &Launcher,
    pin: Option<&str>,
    nginx: &Path,
    work: &Path,
    upstream: SocketAddr,
) -> Nginx {
    let dir = work.join("nginx");
    fs::create_dir_all(&dir).unwrap();
    // Workers run as `nobody` when the master is root: let them reach their temp dirs.
    for d in [work, dir.as_path()] {
        let _ = fs::set_permissions(d, fs::Permissions::from_mode(0o755));
    }
    let port = free_port();
    let d = dir.display();
    let conf = format!(
        r#"worker_processes 1;
daemon off;
master_process on;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {d}/client_body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    keepalive_timeout 65s;
    keepalive_requests 1000000;
    upstream pos {{
        server {upstream};
        keepalive 64;
        keepalive_requests 1000000;
    }}
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location / {{
            proxy_pass http://pos;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffers 16 8k;
            proxy_busy_buffers_size 64k;
        }}
    }}
}}
"#
    );
    let conf_path = dir.join("nginx.conf");
    fs::write(&conf_path, conf).unwrap();
    let log = dir.join("error.log");
    let argv: Vec<OsString> = vec![
        nginx.into(),
        "-p".into(),
        dir.clone().into(),
        "-c".into(),
        conf_path.into(),
        "-e".into(),
        log.clone().into(),
    ];
    let out = fs::File::create(dir.join("stdout.log")).unwrap();
    let child = launcher
        .command(pin, false, &argv)
        .stdin(Stdio::null())
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        .spawn()
        .expect("cannot start nginx");
    let pid = procs.add("nginx", child);
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        procs.assert_alive("nginx", &log);
        if matches!(get_once(addr, "/small"), Ok((200, _))) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "nginx not answering after 10 s; its log:\n{}",
            tail(&log, 30)
        );
        thread::sleep(Duration::from_millis(50));
    }
    Nginx { addr, pid, log }
}

struct Proxy {
    addr: SocketAddr,
    admin: SocketAddr,
    pid: u32,
    log: PathBuf,
}

#[allow(clippy::too_many_arguments)]
fn start_proxy(
    procs: &mut Procs,
    name: &str,
    launcher: &Launcher,
    pin: Option<&str>,
    work: &Path,
    upstream: SocketAddr,
    crm: SocketAddr,
    sync_budget_ms: Option<u64>,
) -> Proxy {
    let dir = work.join(name);
    let data = dir.join("data");
    fs::create_dir_all(&data).unwrap();
    let (port, admin_port) = (free_port(), free_port());
    let budget = sync_budget_ms
        .map(|ms| format!("sync_budget_ms = {ms}\n"))
        .unwrap_or_default();
    let data_str = serde_json::to_string(&data.display().to_string()).unwrap();
    let conf = format!(
        r#"[proxy]
listen = "127.0.0.1:{port}"
admin_listen = "127.0.0.1:{admin_port}"
access_log = false
shutdown_grace_ms = 1000

[upstream]
url = "http://{upstream}"

[crm]
enabled = true
api_url = "http://{crm}"
{budget}
[storage]
data_dir = {data_str}

[log]
level = "warn"
"#
    );
    let conf_path = dir.join("config.toml");
    fs::write(&conf_path, conf).unwrap();
    let log = dir.join("proxy.log");
    let out = fs::File::create(&log).unwrap();
    let argv: Vec<OsString> = vec![PROXY_BIN.into(), "--config".into(), conf_path.into()];
    let mut cmd = launcher.command(pin, true, &argv);
    for var in [
        "POS_UPSTREAM_URL",
        "PROXY_LISTEN",
        "PROXY_ADMIN_LISTEN",
        "PROXY_DATA_DIR",
        "CRM_API_URL",
        "CRM_INTEGRATION_ENABLED",
        "PROXY_LOG_LEVEL",
        "PROXY_ADMIN_TOKEN",
        "PROXY_CONFIG",
        "RUST_LOG",
    ] {
        cmd.env_remove(var);
    }
    let child = cmd
        .env("CRM_API_KEY", API_KEY)
        .stdin(Stdio::null())
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        .spawn()
        .expect("cannot start pos-crm-proxy");
    let pid = procs.add(name, child);
    let admin: SocketAddr = format!("127.0.0.1:{admin_port}").parse().unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        procs.assert_alive(name, &log);
        if matches!(get_once(admin, "/readyz"), Ok((200, _))) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{name}: /readyz not 200 after 20 s; its log:\n{}",
            tail(&log, 30)
        );
        thread::sleep(Duration::from_millis(50));
    }
    let comm = proc_stat(pid).map(|s| s.0).unwrap_or_default();
    assert!(
        "pos-crm-proxy".starts_with(&comm) && !comm.is_empty(),
        "pid {pid} is {comm:?}, not the proxy: RSS/CPU would measure the wrong process"
    );
    Proxy {
        addr: format!("127.0.0.1:{port}").parse().unwrap(),
        admin,
        pid,
        log,
    }
}

// ---------------------------------------------------------------------------------------------
// wrk
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Target {
    Direct,
    Nginx,
    Proxy,
}

impl Target {
    fn name(self) -> &'static str {
        match self {
            Target::Direct => "direct (no proxy)",
            Target::Nginx => "nginx",
            Target::Proxy => "pos-crm-proxy",
        }
    }
}

struct Scenario {
    title: &'static str,
    method: &'static str,
    path: &'static str,
    body: Option<&'static str>,
    targets: &'static [Target],
}

const ALL: &[Target] = &[Target::Direct, Target::Nginx, Target::Proxy];

const SCENARIOS: &[Scenario] = &[
    Scenario {
        title: "GET /small (1 KB answer)",
        method: "GET",
        path: "/small",
        body: None,
        targets: ALL,
    },
    Scenario {
        title: "GET /large (64 KB answer)",
        method: "GET",
        path: "/large",
        body: None,
        targets: ALL,
    },
    Scenario {
        title: "POST /echo (small body, passthrough)",
        method: "POST",
        path: "/echo",
        body: Some(ECHO_BODY),
        targets: ALL,
    },
    Scenario {
        title: "POST /api/sales with a customer (proxy: outbox + CRM invoice)",
        method: "POST",
        path: "/api/sales",
        body: Some(SALE_WITH_CUSTOMER),
        targets: ALL,
    },
    Scenario {
        title: "POST /api/sales without a customer (proxy: intercept, crmStatus null)",
        method: "POST",
        path: "/api/sales",
        body: Some(SALE_NO_CUSTOMER),
        targets: ALL,
    },
];

#[derive(Debug, Clone, Default)]
struct WrkOut {
    requests: u64,
    rps: f64,
    p50_us: f64,
    p99_us: f64,
    socket_errors: u64,
    non_2xx: u64,
}

fn parse_time_us(s: &str) -> Option<f64> {
    let split = s.find(|c: char| c.is_ascii_alphabetic())?;
    let (num, unit) = s.split_at(split);
    let v: f64 = num.parse().ok()?;
    Some(match unit {
        "us" => v,
        "ms" => v * 1e3,
        "s" => v * 1e6,
        "m" => v * 60e6,
        "h" => v * 3600e6,
        _ => return None,
    })
}

fn parse_wrk(out: &str) -> Option<WrkOut> {
    let mut w = WrkOut::default();
    let (mut p50, mut p99, mut rps, mut req) = (None, None, None, None);
    for line in out.lines() {
        let t = line.trim();
        if let Some(v) = t.strip_prefix("Requests/sec:") {
            rps = v.trim().parse().ok();
        } else if t.contains(" requests in ") {
            req = t.split_whitespace().next().and_then(|v| v.parse().ok());
        } else if let Some(v) = t.strip_prefix("Non-2xx or 3xx responses:") {
            w.non_2xx = v.trim().parse().unwrap_or(0);
        } else if let Some(v) = t.strip_prefix("Socket errors:") {
            w.socket_errors = v
                .split(',')
                .filter_map(|p| p.split_whitespace().last()?.parse::<u64>().ok())
                .sum();
        } else if let Some((pct, val)) = t.split_once('%') {
            match pct.trim() {
                "50" => p50 = parse_time_us(val.trim()),
                "99" => p99 = parse_time_us(val.trim()),
                _ => {}
            }
        }
    }
    w.p50_us = p50?;
    w.p99_us = p99?;
    w.rps = rps?;
    w.requests = req?;
    Some(w)
}

fn lua_script(dir: &Path, name: &str, body: &str) -> PathBuf {
    assert!(!body.contains("]==]"));
    let path = dir.join(format!("{name}.lua"));
    let script = format!(
        "wrk.method = \"POST\"\nwrk.body = [==[{body}]==]\nwrk.headers[\"Content-Type\"] = \"application/json\"\n"
    );
    fs::write(&path, script).unwrap();
    path
}

/// One wrk run (bounded: killed `secs + 20` s after its start).
fn run_wrk(
    launcher: &Launcher,
    wrk: &Path,
    pin: Option<&str>,
    url: &str,
    script: Option<&Path>,
    secs: u64,
) -> Result<WrkOut, String> {
    let mut argv: Vec<OsString> = vec![
        wrk.into(),
        "-t1".into(),
        format!("-c{CONNECTIONS}").into(),
        format!("-d{secs}s").into(),
        "--latency".into(),
    ];
    if let Some(s) = script {
        argv.push("-s".into());
        argv.push(s.into());
    }
    argv.push(url.into());
    let mut child = launcher
        .command(pin, false, &argv)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot start wrk: {e}"))?;
    // Read the pipes on their own threads so a chatty wrk never blocks on a full pipe.
    let mut so = child.stdout.take().unwrap();
    let mut se = child.stderr.take().unwrap();
    let out_t = thread::spawn(move || {
        let mut s = String::new();
        let _ = so.read_to_string(&mut s);
        s
    });
    let err_t = thread::spawn(move || {
        let mut s = String::new();
        let _ = se.read_to_string(&mut s);
        s
    });
    let deadline = Instant::now() + Duration::from_secs(secs + 20);
    let status = loop {
        if let Ok(Some(st)) = child.try_wait() {
            break Some(st);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        thread::sleep(Duration::from_millis(20));
    };
    let (out, err) = (
        out_t.join().unwrap_or_default(),
        err_t.join().unwrap_or_default(),
    );
    match status {
        None => Err(format!("wrk did not finish in {} s", secs + 20)),
        Some(st) if !st.success() => Err(format!("wrk failed ({st}): {out}{err}")),
        Some(_) => parse_wrk(&out).ok_or_else(|| format!("cannot parse wrk output:\n{out}{err}")),
    }
}

#[derive(Debug, Clone)]
struct Sample {
    wrk: WrkOut,
    rss_kb: Option<u64>,
    threads: Option<u64>,
    cpu_s: Option<f64>,
    wall_s: f64,
    /// Busy % of each CPU during the run.
    cores: Vec<f64>,
    /// CPU used during the run by processes other than this bench, wrk and the target, in cores
    /// (another build on the machine, say). Anything much above 0 disturbs the numbers.
    foreign_cores: f64,
}

struct Bench<'a> {
    launcher: &'a Launcher,
    wrk: &'a Path,
    pinning: &'a Pinning,
    ticks: f64,
    direct: SocketAddr,
    nginx: &'a Nginx,
    proxy: &'a Proxy,
    scripts: BTreeMap<&'static str, PathBuf>,
}

impl Bench<'_> {
    fn addr(&self, t: Target) -> SocketAddr {
        match t {
            Target::Direct => self.direct,
            Target::Nginx => self.nginx.addr,
            Target::Proxy => self.proxy.addr,
        }
    }

    fn pids(&self, t: Target) -> Vec<u32> {
        match t {
            Target::Direct => Vec::new(),
            Target::Nginx => {
                let mut v = vec![self.nginx.pid];
                v.extend(children_of(self.nginx.pid));
                v
            }
            Target::Proxy => vec![self.proxy.pid],
        }
    }

    /// Cores used by other processes (not this bench, its reaped children, nginx or the proxy)
    /// over `window`.
    fn foreign_load(&self, window: Duration) -> f64 {
        let mut pids = self.pids(Target::Nginx);
        pids.push(self.proxy.pid);
        let (j0, o0, t0) = (cpu_jiffies(), self_and_reaped_ticks(), cpu_ticks(&pids));
        let start = Instant::now();
        thread::sleep(window);
        let (j1, o1, t1) = (cpu_jiffies(), self_and_reaped_ticks(), cpu_ticks(&pids));
        let busy: u64 = j1
            .iter()
            .zip(&j0)
            .map(|(a, b)| a.0.saturating_sub(b.0))
            .sum();
        let own = o1.saturating_sub(o0) + t1.saturating_sub(t0);
        (busy.saturating_sub(own)) as f64 / self.ticks / start.elapsed().as_secs_f64()
    }

    /// Waits (in steps, from `budget`) while other processes keep more than 0.2 cores busy.
    /// Returns whether the machine was quiet when it stopped waiting.
    fn wait_for_quiet(&self, budget: &mut Duration) -> bool {
        loop {
            let start = Instant::now();
            let quiet = self.foreign_load(Duration::from_millis(300)) <= 0.2;
            *budget = budget.saturating_sub(start.elapsed());
            if quiet || budget.is_zero() {
                return quiet;
            }
            let pause = Duration::from_millis(700).min(*budget);
            thread::sleep(pause);
            *budget = budget.saturating_sub(pause);
        }
    }

    fn run(&self, s: &Scenario, t: Target, secs: u64) -> Sample {
        let url = format!("http://{}{}", self.addr(t), s.path);
        let script = s.body.map(|_| self.scripts[s.title].as_path());
        let pids = self.pids(t);
        let sampler = (!pids.is_empty()).then(|| RssSampler::start(pids.clone()));
        let before = cpu_ticks(&pids);
        let jiffies = cpu_jiffies();
        let own_before = self_and_reaped_ticks();
        let start = Instant::now();
        let res = run_wrk(
            self.launcher,
            self.wrk,
            self.pinning.wrk.as_deref(),
            &url,
            script,
            secs,
        );
        let wall_s = start.elapsed().as_secs_f64();
        let after = cpu_ticks(&pids);
        let jiffies_after = cpu_jiffies();
        let own = self_and_reaped_ticks().saturating_sub(own_before);
        let cores = busy_percent(&jiffies, &jiffies_after);
        let busy: u64 = jiffies_after
            .iter()
            .zip(&jiffies)
            .map(|(a, b)| a.0.saturating_sub(b.0))
            .sum();
        let foreign_cores = (busy as f64 - own as f64 - after.saturating_sub(before) as f64)
            .max(0.0)
            / self.ticks
            / wall_s;
        let (rss_kb, threads) = sampler.map(RssSampler::finish).unzip();
        let wrk = res.unwrap_or_else(|e| panic!("{} via {}: {e}", s.title, t.name()));
        Sample {
            wrk,
            rss_kb,
            threads,
            cpu_s: (!pids.is_empty()).then(|| after.saturating_sub(before) as f64 / self.ticks),
            wall_s,
            cores,
            foreign_cores,
        }
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n == 0 {
        f64::NAN
    } else if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

#[derive(Debug, Clone)]
struct Summary {
    rps: f64,
    rps_rounds: Vec<f64>,
    p50_us: f64,
    p99_us: f64,
    rss_kb: Option<u64>,
    threads: Option<u64>,
    cpu_per_10k: Option<f64>,
    cpu_pct: Option<f64>,
    errors: u64,
    requests: u64,
    foreign_max: f64,
}

fn summarize(samples: &[Sample]) -> Summary {
    let cpu: Vec<&Sample> = samples.iter().filter(|s| s.cpu_s.is_some()).collect();
    Summary {
        rps: median(samples.iter().map(|s| s.wrk.rps).collect()),
        rps_rounds: samples.iter().map(|s| s.wrk.rps).collect(),
        p50_us: median(samples.iter().map(|s| s.wrk.p50_us).collect()),
        p99_us: median(samples.iter().map(|s| s.wrk.p99_us).collect()),
        rss_kb: samples.iter().filter_map(|s| s.rss_kb).max(),
        threads: samples.iter().filter_map(|s| s.threads).max(),
        cpu_per_10k: (!cpu.is_empty()).then(|| {
            median(
                cpu.iter()
                    .map(|s| s.cpu_s.unwrap() * 10_000.0 / s.wrk.requests.max(1) as f64)
                    .collect(),
            )
        }),
        cpu_pct: (!cpu.is_empty()).then(|| {
            median(
                cpu.iter()
                    .map(|s| s.cpu_s.unwrap() / s.wall_s * 100.0)
                    .collect(),
            )
        }),
        errors: samples
            .iter()
            .map(|s| s.wrk.socket_errors + s.wrk.non_2xx)
            .sum(),
        requests: samples.iter().map(|s| s.wrk.requests).sum(),
        foreign_max: samples.iter().map(|s| s.foreign_cores).fold(0.0, f64::max),
    }
}

// ---------------------------------------------------------------------------------------------
// Idle connections and the hanging CRM
// ---------------------------------------------------------------------------------------------

struct IdleResult {
    before_kb: u64,
    after_kb: u64,
    opened: usize,
    still_open: usize,
}

fn idle_connections(addr: SocketAddr, pids: &dyn Fn() -> Vec<u32>, n: usize) -> IdleResult {
    let rss = |pids: &[u32]| pids.iter().filter_map(|&p| rss_kb(p)).sum::<u64>();
    thread::sleep(Duration::from_millis(500));
    let before_kb = rss(&pids());
    let mut conns = Vec::with_capacity(n);
    for _ in 0..n {
        match Http::connect(addr).and_then(|mut c| c.send("GET", "/small", None).map(|r| (c, r))) {
            Ok((c, (200, _))) => conns.push(c),
            Ok((_, (status, _))) => {
                eprintln!(
                    "idle connections: a request got {status}; stopping at {}",
                    conns.len()
                );
                break;
            }
            Err(e) => {
                eprintln!("idle connections: {e}; stopping at {}", conns.len());
                break;
            }
        }
    }
    thread::sleep(Duration::from_secs(1));
    let mut after_kb = 0;
    for _ in 0..5 {
        after_kb = after_kb.max(rss(&pids()));
        thread::sleep(Duration::from_millis(100));
    }
    let still_open = conns.iter().filter(|c| c.still_open()).count();
    IdleResult {
        before_kb,
        after_kb,
        opened: conns.len(),
        still_open,
    }
}

struct HangResult {
    direct: Vec<f64>,
    proxy: Vec<f64>,
    queued_answers: usize,
    crm_requests: u64,
}

fn sequential_sales(addr: SocketAddr, n: usize) -> (Vec<f64>, Vec<String>) {
    let mut c = Http::connect(addr).expect("connect for sequential sales");
    let mut times = Vec::with_capacity(n);
    let mut bodies = Vec::with_capacity(n);
    for _ in 0..n {
        let start = Instant::now();
        let (status, body) = c
            .send("POST", "/api/sales", Some(SALE_WITH_CUSTOMER))
            .expect("sequential sale");
        times.push(start.elapsed().as_secs_f64() * 1e3);
        assert!(
            (200..300).contains(&status),
            "sale answered {status}: {body}"
        );
        bodies.push(body);
    }
    (times, bodies)
}

// ---------------------------------------------------------------------------------------------
// Report
// ---------------------------------------------------------------------------------------------

fn mb(kb: u64) -> String {
    format!("{:.1}", kb as f64 / 1024.0)
}

fn fmt_rps(v: f64) -> String {
    if v >= 1000.0 {
        format!("{:.1}k", v / 1000.0)
    } else {
        format!("{v:.0}")
    }
}

fn fmt_us(v: f64) -> String {
    if v >= 10_000.0 {
        format!("{:.1} ms", v / 1000.0)
    } else {
        format!("{v:.0} µs")
    }
}

fn ok(met: bool) -> &'static str {
    if met {
        "met"
    } else {
        "NOT met"
    }
}

/// Everything the Markdown report shows.
struct Report {
    opts: Options,
    pinning: Pinning,
    /// `nproc` as the machine reports it before this process pins itself.
    nproc: String,
    /// Where each measured process was allowed to run (Cpus_allowed_list), as checked.
    pins_checked: String,
    nginx_version: String,
    upstream_threads: usize,
    data_fs: String,
    proxy_nofile: Option<u64>,
    samples: BTreeMap<(usize, Target), Vec<Sample>>,
    quiet: QuietLog,
    idle_proxy: IdleResult,
    idle_nginx: IdleResult,
    hang: HangResult,
    /// p50 ms of sequential sales with a customer over one connection: (nginx, proxy).
    unloaded: (f64, f64, usize),
    /// Lines of the "Checks" section.
    checks: Vec<String>,
    started: Instant,
}

/// How long the bench waited for other processes to calm down, and how often in vain.
struct QuietLog {
    budget: Duration,
    left: Duration,
    busy_starts: usize,
    runs: usize,
}

fn main() {
    let opts = parse_args();
    let (Some(wrk), Some(nginx)) = (find_program("wrk"), find_program("nginx")) else {
        let missing: Vec<&str> = ["wrk", "nginx"]
            .into_iter()
            .filter(|n| find_program(n).is_none())
            .collect();
        println!(
            "compare bench skipped: it needs `wrk` and `nginx` (missing: {}).\n\
             On Debian/Ubuntu install them with:\n\n    apt-get install -y nginx wrk\n\n\
             (as root, after `apt-get update`), then run `cargo bench --bench compare` again.",
            missing.join(", ")
        );
        return;
    };
    let started = Instant::now();
    let nproc = thread::available_parallelism().map_or(1, |n| n.get());
    // Before pinning: `nproc` counts only the CPUs this process may use.
    let nproc_text = command_output("nproc", &[]).unwrap_or_else(|| nproc.to_string());
    let pinning = plan_pinning(&opts, nproc, find_program("taskset").is_some());
    // Pin this process before any thread exists: the runtime's threads inherit it.
    if let Some(cpus) = &pinning.upstream {
        let pinned = Command::new("taskset")
            .args(["-a", "-cp", cpus, &std::process::id().to_string()])
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        assert!(
            pinned,
            "taskset could not pin the bench process to CPU(s) {cpus}"
        );
    }
    let upstream_threads = if pinning.upstream.is_some() {
        thread::available_parallelism().map_or(1, |n| n.get())
    } else {
        2
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(upstream_threads)
        .enable_all()
        .build()
        .expect("runtime");
    let launcher = Launcher::new();

    // Declared before `procs`, so dropped after it: the processes stop before their files go.
    let work = tempfile::Builder::new()
        .prefix("bench-compare-")
        .tempdir()
        .expect("temp dir");
    let mut procs = Procs::default();

    let counters = Arc::new(Counters {
        sales: AtomicU64::new(0),
        invoices: AtomicU64::new(0),
        hung_invoice_requests: AtomicU64::new(0),
        invoice_keys: Default::default(),
        duplicate_invoices: AtomicU64::new(0),
    });
    let direct = start_upstream(&rt, &counters);
    let crm = start_crm(&rt, &counters, false);
    let tpin = pinning.target.as_deref();
    let ngx = start_nginx(&mut procs, &launcher, tpin, &nginx, work.path(), direct);
    let proxy = start_proxy(
        &mut procs,
        "proxy",
        &launcher,
        tpin,
        work.path(),
        direct,
        crm,
        None,
    );
    let mut checks = check_answers(direct, &ngx, &proxy);

    let mut scripts = BTreeMap::new();
    for (i, s) in SCENARIOS.iter().enumerate() {
        if let Some(body) = s.body {
            scripts.insert(s.title, lua_script(work.path(), &format!("post{i}"), body));
        }
    }
    if let Some(secs) = opts.serve {
        println!("serving for {secs} s (Ctrl-C stops everything)");
        println!("upstream (direct): http://{direct}");
        println!("fake CRM:          http://{crm}");
        println!("nginx:             http://{}", ngx.addr);
        println!(
            "pos-crm-proxy:     http://{} (admin {}, pid {})",
            proxy.addr, proxy.admin, proxy.pid
        );
        for (title, script) in &scripts {
            println!("wrk script for {title}: {}", script.display());
        }
        if let Some(cpus) = &pinning.wrk {
            println!(
                "run wrk pinned like the bench: taskset -c {cpus} wrk -t1 -c{CONNECTIONS} ..."
            );
        }
        thread::sleep(Duration::from_secs(secs));
        return;
    }
    let bench = Bench {
        launcher: &launcher,
        wrk: &wrk,
        pinning: &pinning,
        ticks: clock_ticks(),
        direct,
        nginx: &ngx,
        proxy: &proxy,
        scripts,
    };

    // Warm-up: pools, caches, the SQLite file.
    eprintln!("warming up ...");
    for t in ALL {
        bench.run(&SCENARIOS[0], *t, 1);
    }
    bench.run(&SCENARIOS[3], Target::Proxy, 1);

    let invoices_before = counters.invoices.load(Ordering::Relaxed);
    let (samples, quiet) = run_rounds(&bench, &opts, &mut procs);
    thread::sleep(Duration::from_millis(500));
    let invoices = counters.invoices.load(Ordering::Relaxed) - invoices_before;
    let sold: u64 = SCENARIOS
        .iter()
        .enumerate()
        .filter(|(_, s)| s.body == Some(SALE_WITH_CUSTOMER))
        .filter_map(|(si, _)| samples.get(&(si, Target::Proxy)))
        .flatten()
        .map(|s| s.wrk.requests)
        .sum();
    checks.push(format!(
        "sales with a customer through the proxy during the rounds (completed, per wrk): {sold}; \
         invoices the fake CRM created meanwhile: {invoices} (the difference is at most the \
         requests in flight when each wrk run stopped, {CONNECTIONS} per run)"
    ));
    let outbox = get_once(proxy.admin, "/readyz")
        .ok()
        .and_then(|(_, b)| serde_json::from_str::<serde_json::Value>(&b).ok())
        .map_or_else(|| "(no answer)".into(), |v| v["outbox"].to_string());
    checks.push(format!(
        "proxy outbox after the rounds (`/readyz`): `{outbox}`"
    ));

    // The latency a sale with an invoice adds without queueing: one connection, one at a time.
    eprintln!("unloaded sales ...");
    let n_seq = if opts.quick { 50 } else { 300 };
    let _ = sequential_sales(proxy.addr, 10);
    let (ngx_seq, _) = sequential_sales(ngx.addr, n_seq);
    let (proxy_seq, _) = sequential_sales(proxy.addr, n_seq);
    let unloaded = (median(ngx_seq), median(proxy_seq), n_seq);

    eprintln!("idle connections ...");
    let idle_proxy = idle_connections(proxy.addr, &|| vec![proxy.pid], IDLE_CONNECTIONS);
    let idle_nginx = idle_connections(ngx.addr, &|| bench.pids(Target::Nginx), IDLE_CONNECTIONS);

    // The CRM never answers: a second proxy with a short sync budget.
    eprintln!("hanging CRM ...");
    let hang_crm = start_crm(&rt, &counters, true);
    let hang_proxy = start_proxy(
        &mut procs,
        "proxy-crm-hangs",
        &launcher,
        tpin,
        work.path(),
        direct,
        hang_crm,
        Some(HANG_BUDGET_MS),
    );
    let _ = sequential_sales(direct, 3);
    let (direct_ms, _) = sequential_sales(direct, opts.hang_sales);
    let (proxy_ms, bodies) = sequential_sales(hang_proxy.addr, opts.hang_sales);
    let hang = HangResult {
        direct: direct_ms,
        proxy: proxy_ms,
        queued_answers: bodies
            .iter()
            .filter(|b| {
                serde_json::from_str::<serde_json::Value>(b).is_ok_and(|v| {
                    v["crmStatus"]["invoiceCreated"] == serde_json::Value::Bool(false)
                        && v["crmStatus"]["queued"] == serde_json::Value::Bool(true)
                })
            })
            .count(),
        crm_requests: counters.hung_invoice_requests.load(Ordering::Relaxed),
    };
    procs.stop("proxy-crm-hangs");

    checks.push(format!(
        "invoices the fake CRM got twice (same Idempotency-Key), whole run: {}",
        counters.duplicate_invoices.load(Ordering::Relaxed)
    ));
    for (what, log) in [
        ("proxy log lines (level warn)", &proxy.log),
        ("proxy (CRM hangs) log lines", &hang_proxy.log),
        ("nginx error log lines", &ngx.log),
    ] {
        let text = fs::read_to_string(log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
        let first = lines.first().map_or(String::new(), |l| {
            format!("; first: `{}`", l.chars().take(200).collect::<String>())
        });
        checks.push(format!("{what}: {}{first}", lines.len()));
    }

    let cpus_of = |pid: u32| status_field(pid, "Cpus_allowed_list").unwrap_or_else(|| "?".into());
    let report = Report {
        nproc: nproc_text,
        pins_checked: format!(
            "proxy {}, nginx master {} / worker {}, bench process {}",
            cpus_of(proxy.pid),
            cpus_of(ngx.pid),
            children_of(ngx.pid)
                .iter()
                .map(|&p| cpus_of(p))
                .collect::<Vec<_>>()
                .join(","),
            cpus_of(std::process::id())
        ),
        nginx_version: command_output(&nginx.display().to_string(), &["-v"])
            .unwrap_or_default()
            .replace("nginx version: ", ""),
        upstream_threads,
        data_fs: fs_type(work.path()),
        proxy_nofile: open_files_limit(&proxy.pid.to_string()),
        samples,
        quiet,
        idle_proxy,
        idle_nginx,
        hang,
        unloaded,
        checks,
        started,
        opts,
        pinning: pinning.clone(),
    };
    let md = render(&report);
    println!("\n{md}");
    let target_dir = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target"));
    let out = target_dir.join("bench-compare.md");
    match fs::create_dir_all(&target_dir).and_then(|_| fs::write(&out, &md)) {
        Ok(()) => eprintln!("written to {}", out.display()),
        Err(e) => eprintln!("cannot write {}: {e}", out.display()),
    }

    drop(procs);
    rt.shutdown_timeout(Duration::from_secs(1));
}

/// One request of every scenario to every target: each answers 2xx, and the sales come back as
/// expected (the proxy intercepts them, nginx and the upstream do not). Returns what was odd.
fn check_answers(direct: SocketAddr, ngx: &Nginx, proxy: &Proxy) -> Vec<String> {
    let mut notes = Vec::new();
    for t in ALL {
        let addr = match t {
            Target::Direct => direct,
            Target::Nginx => ngx.addr,
            Target::Proxy => proxy.addr,
        };
        for s in SCENARIOS.iter().filter(|s| s.targets.contains(t)) {
            let (status, body) = Http::connect(addr)
                .and_then(|mut c| c.send(s.method, s.path, s.body))
                .unwrap_or_else(|e| panic!("{} via {}: {e}", s.title, t.name()));
            assert!(
                (200..300).contains(&status),
                "{} via {}: {status} {body}",
                s.title,
                t.name()
            );
            if s.path != "/api/sales" {
                continue;
            }
            let v: serde_json::Value = serde_json::from_str(&body)
                .unwrap_or_else(|e| panic!("{} via {}: not JSON ({e}): {body}", s.title, t.name()));
            let crm_status = v.get("crmStatus");
            let expected = match (t, s.body == Some(SALE_WITH_CUSTOMER)) {
                (Target::Proxy, true) => {
                    crm_status.and_then(|c| c.get("invoiceCreated"))
                        == Some(&serde_json::Value::Bool(true))
                }
                (Target::Proxy, false) => crm_status == Some(&serde_json::Value::Null),
                _ => crm_status.is_none(),
            };
            if !expected {
                let msg = format!(
                    "WARNING: unexpected answer for \"{}\" via {}: crmStatus = {}",
                    s.title,
                    t.name(),
                    crm_status.map_or("(absent)".to_string(), |c| c.to_string())
                );
                eprintln!("{msg}");
                notes.push(msg);
            }
        }
    }
    notes
}

/// The measured runs: every round runs every target of every scenario, the target order rotated
/// from one scenario and round to the next.
fn run_rounds(
    bench: &Bench<'_>,
    opts: &Options,
    procs: &mut Procs,
) -> (BTreeMap<(usize, Target), Vec<Sample>>, QuietLog) {
    let mut samples: BTreeMap<(usize, Target), Vec<Sample>> = BTreeMap::new();
    let budget = Duration::from_secs(if opts.quick { 15 } else { 60 });
    let mut quiet = QuietLog {
        budget,
        left: budget,
        busy_starts: 0,
        runs: 0,
    };
    for round in 0..opts.rounds {
        for (si, s) in SCENARIOS.iter().enumerate() {
            let n = s.targets.len();
            for k in 0..n {
                let t = s.targets[(k + round + si) % n];
                procs.assert_alive("nginx", &bench.nginx.log);
                procs.assert_alive("proxy", &bench.proxy.log);
                if !bench.wait_for_quiet(&mut quiet.left) {
                    quiet.busy_starts += 1;
                }
                quiet.runs += 1;
                let x = bench.run(s, t, opts.secs);
                eprintln!(
                    "round {}/{} | {:<70} | {:<17} | {:>9.0} req/s  p50 {:>9}  p99 {:>9}  errors {}  \
                     target CPU {:>3.0}%  cores busy {}  other load {:.2} cores",
                    round + 1,
                    opts.rounds,
                    s.title,
                    t.name(),
                    x.wrk.rps,
                    fmt_us(x.wrk.p50_us),
                    fmt_us(x.wrk.p99_us),
                    x.wrk.socket_errors + x.wrk.non_2xx,
                    x.cpu_s.map_or(0.0, |c| c / x.wall_s * 100.0),
                    x.cores
                        .iter()
                        .map(|c| format!("{c:.0}%"))
                        .collect::<Vec<_>>()
                        .join("/"),
                    x.foreign_cores
                );
                samples.entry((si, t)).or_default().push(x);
                thread::sleep(Duration::from_millis(200));
            }
        }
    }
    (samples, quiet)
}

fn render(r: &Report) -> String {
    let opts = &r.opts;
    let mut md = String::new();
    let date = command_output("date", &["-u"]).unwrap_or_default();
    let git = command_output(
        "git",
        &[
            "-C",
            env!("CARGO_MANIFEST_DIR"),
            "describe",
            "--always",
            "--dirty",
        ],
    )
    .filter(|s| !s.is_empty() && !s.contains(' '))
    .unwrap_or_else(|| "unknown".into());
    let _ = writeln!(md, "## pos-crm-proxy vs nginx vs direct (loopback)\n");
    let _ = writeln!(md, "- date: {date}");
    let _ = writeln!(
        md,
        "- machine: nproc {}, {}, kernel {}",
        r.nproc,
        cpu_model(),
        command_output("uname", &["-r"]).unwrap_or_default()
    );
    let _ = writeln!(
        md,
        "- pinning: {} (checked, allowed CPUs: {})",
        r.pinning.description, r.pins_checked
    );
    let _ = writeln!(
        md,
        "- load: `wrk -t1 -c{CONNECTIONS} -d{}s --latency` (POST bodies from a Lua script); {} round(s), \
         every target for every scenario in each round, target order rotated; numbers are medians \
         over rounds, RSS the max sampled every 50 ms over all rounds{}",
        opts.secs,
        opts.rounds,
        if opts.quick { " (--quick)" } else { "" }
    );
    let _ = writeln!(
        md,
        "- upstream: in-process hyper 1 HTTP/1 server on {} tokio worker(s) (POS-like 207 sale \
         answer of {} bytes); fake CRM: in-process lean hyper server answering 201 at once (not \
         SampleCrm)",
        r.upstream_threads,
        sale_answer(1).len()
    );
    let _ = writeln!(
        md,
        "- nginx: {}, 1 worker, upstream `keepalive 64`, `proxy_http_version 1.1`, \
         `Connection \"\"`, keepalive_requests 1000000 both sides, proxy_buffers 16 8k, access_log off",
        r.nginx_version
    );
    let _ = writeln!(
        md,
        "- pos-crm-proxy: `{git}`, release build, access_log false, log warn, outbox \
         synchronous_full (default) on {} (temp dir), open-files limit {}",
        r.data_fs,
        r.proxy_nofile.map_or("?".into(), |n| n.to_string())
    );
    let _ = writeln!(
        md,
        "- CPU s / 10k = (utime+stime of the target's processes) × 10000 / requests; CPU % = share of \
         one core used by the target during the run; other load = cores used during the run by \
         processes that are not part of the bench (max over rounds; above ~0.1 the run was disturbed); \
         threads = max threads of the target's processes seen during the runs"
    );
    let _ = writeln!(
        md,
        "- before each run the bench waits while other processes keep > 0.2 cores busy (at most {} s \
         in all): waited {:.0} s; {} of {} runs started with the machine still busy",
        r.quiet.budget.as_secs(),
        (r.quiet.budget - r.quiet.left).as_secs_f64(),
        r.quiet.busy_starts,
        r.quiet.runs
    );
    let foreign_max = r
        .samples
        .values()
        .flatten()
        .map(|s| s.foreign_cores)
        .fold(0.0, f64::max);
    if foreign_max > 0.1 {
        let _ = writeln!(
            md,
            "- **warning: other processes used up to {foreign_max:.2} cores during some runs; \
             those numbers are disturbed (medians over rounds soften it)**"
        );
    }
    let _ = writeln!(md);

    let mut goals: Vec<String> = Vec::new();
    let sums: BTreeMap<(usize, Target), Summary> =
        r.samples.iter().map(|(k, v)| (*k, summarize(v))).collect();
    for (si, s) in SCENARIOS.iter().enumerate() {
        let _ = writeln!(md, "### {}\n", s.title);
        let _ = writeln!(
            md,
            "| target | req/s | req/s per round | p50 | p99 | max RSS MB | threads | CPU s / 10k req | CPU % | errors | other load |"
        );
        let _ = writeln!(md, "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|");
        for t in s.targets {
            let Some(x) = sums.get(&(si, *t)) else {
                continue;
            };
            let _ = writeln!(
                md,
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {:.2} |",
                t.name(),
                fmt_rps(x.rps),
                x.rps_rounds
                    .iter()
                    .map(|r| fmt_rps(*r))
                    .collect::<Vec<_>>()
                    .join(" / "),
                fmt_us(x.p50_us),
                fmt_us(x.p99_us),
                x.rss_kb.map_or("–".into(), mb),
                x.threads.map_or("–".into(), |t| t.to_string()),
                x.cpu_per_10k.map_or("–".into(), |c| format!("{c:.3}")),
                x.cpu_pct.map_or("–".into(), |c| format!("{c:.0}")),
                if x.errors == 0 {
                    "0".to_string()
                } else {
                    format!("**{}** of {}", x.errors, x.requests)
                },
                x.foreign_max
            );
        }
        let (Some(n), Some(p)) = (
            sums.get(&(si, Target::Nginx)),
            sums.get(&(si, Target::Proxy)),
        ) else {
            let _ = writeln!(md);
            continue;
        };
        let _ = writeln!(
            md,
            "\nproxy / nginx: req/s **×{:.2}**, p50 ×{:.2}, p99 **×{:.2}**, CPU per request ×{:.2}\n",
            p.rps / n.rps,
            p.p50_us / n.p50_us,
            p.p99_us / n.p99_us,
            p.cpu_per_10k.unwrap_or(f64::NAN) / n.cpu_per_10k.unwrap_or(f64::NAN)
        );
        if s.path != "/api/sales" {
            goals.push(format!(
                "| {} passthrough: req/s ≥ 1.0× nginx, p99 ≤ nginx | ×{:.2}, p99 {} vs {} | {} |",
                s.title.split(" (").next().unwrap_or(s.title),
                p.rps / n.rps,
                fmt_us(p.p99_us),
                fmt_us(n.p99_us),
                ok(p.rps >= n.rps && p.p99_us <= n.p99_us)
            ));
        } else if s.body == Some(SALE_WITH_CUSTOMER) {
            goals.push(format!(
                "| sale with customer, instant CRM: p50 added ≤ 1 ms over passthrough of the same \
                 request (nginx) | {} vs {} (+{}) | {} |",
                fmt_us(p.p50_us),
                fmt_us(n.p50_us),
                fmt_us(p.p50_us - n.p50_us),
                ok(p.p50_us - n.p50_us <= 1000.0)
            ));
            let (ngx_ms, proxy_ms, n_seq) = r.unloaded;
            goals.push(format!(
                "| the same, unloaded ({n_seq} sequential sales on one connection): p50 added ≤ 1 ms \
                 over nginx | {} vs {} (+{}) | {} |",
                fmt_us(proxy_ms * 1000.0),
                fmt_us(ngx_ms * 1000.0),
                fmt_us((proxy_ms - ngx_ms) * 1000.0),
                ok(proxy_ms - ngx_ms <= 1.0)
            ));
            goals.push(format!(
                "| sale with customer: req/s ≥ 0.5× passthrough of the same request (nginx) | ×{:.2} | {} |",
                p.rps / n.rps,
                ok(p.rps >= 0.5 * n.rps)
            ));
        }
    }
    let max_load_rss = sums
        .iter()
        .filter(|((_, t), _)| *t == Target::Proxy)
        .filter_map(|(_, s)| s.rss_kb)
        .max()
        .unwrap_or(0);

    let _ = writeln!(md, "### {IDLE_CONNECTIONS} idle keep-alive connections\n");
    let _ = writeln!(
        md,
        "One `GET /small` on each, then held open; RSS sampled 1 s later.\n"
    );
    let _ = writeln!(
        md,
        "| target | RSS before MB | RSS with idle conns MB | per connection | still open |"
    );
    let _ = writeln!(md, "|---|---:|---:|---:|---:|");
    for (name, x) in [("pos-crm-proxy", &r.idle_proxy), ("nginx", &r.idle_nginx)] {
        let _ = writeln!(
            md,
            "| {name} | {} | {} | {:.1} KB | {} of {} |",
            mb(x.before_kb),
            mb(x.after_kb),
            x.after_kb.saturating_sub(x.before_kb) as f64 / x.opened.max(1) as f64,
            x.still_open,
            x.opened
        );
    }

    let hang = &r.hang;
    let pos_ms = median(hang.direct.clone());
    let hang_p50 = median(hang.proxy.clone());
    let expected = pos_ms + HANG_BUDGET_MS as f64;
    let (min, max) = hang
        .proxy
        .iter()
        .fold((f64::INFINITY, 0.0f64), |(lo, hi), &v| {
            (lo.min(v), hi.max(v))
        });
    let _ = writeln!(md, "\n### Sale latency when the CRM hangs\n");
    let _ = writeln!(
        md,
        "{} sequential sales with a customer over one connection, `crm.sync_budget_ms = {HANG_BUDGET_MS}`, \
         the fake CRM accepts and never answers.\n",
        opts.hang_sales
    );
    let _ = writeln!(md, "- POS time (direct, same client) p50: {pos_ms:.3} ms");
    let _ = writeln!(
        md,
        "- through the proxy p50: **{hang_p50:.1} ms** (min {min:.1}, max {max:.1}); expected ≈ POS + \
         budget = {expected:.1} ms; difference {:+.1} ms",
        hang_p50 - expected
    );
    let _ = writeln!(
        md,
        "- answers with `invoiceCreated:false, queued:true`: {} of {}; invoice requests the hanging \
         CRM received: {}",
        hang.queued_answers, opts.hang_sales, hang.crm_requests
    );

    let _ = writeln!(md, "\n### Goals (issue 5)\n");
    let _ = writeln!(md, "| goal | this run | |");
    let _ = writeln!(md, "|---|---|---|");
    for g in &goals {
        let _ = writeln!(md, "{g}");
    }
    let _ = writeln!(
        md,
        "| RSS ≤ 30 MB under load and at 1,000 idle connections | {} MB under load, {} MB idle | {} |",
        mb(max_load_rss),
        mb(r.idle_proxy.after_kb),
        ok(max_load_rss <= 30 * 1024 && r.idle_proxy.after_kb <= 30 * 1024)
    );
    let _ = writeln!(
        md,
        "| sale latency with a hanging CRM ≈ POS time + sync budget (±50 ms) | {hang_p50:.1} ms vs {expected:.1} ms | {} |",
        ok((hang_p50 - expected).abs() <= 50.0)
    );

    let _ = writeln!(md, "\n### Checks\n");
    for c in &r.checks {
        let _ = writeln!(md, "- {c}");
    }
    let _ = writeln!(
        md,
        "- total bench time: {:.0} s",
        r.started.elapsed().as_secs_f64()
    );
    md
}
