//! Fuzzes the proxy's HTTP front through its real server stack.
//!
//! Once per process: a fake POS on 127.0.0.1 (plain threads), and the whole proxy started with
//! `App::start` on a multi-thread tokio runtime (listener, TLS-less accept loop, hyper-util's
//! auto HTTP/1 + HTTP/2 connection, access log, sales interception, upstream client, outbox on a
//! temporary SQLite file, CRM enabled but not configured). Small body limits (4 KiB) so inputs
//! reach the "too large" paths.
//!
//! Input: `CLIENT_BYTES [SEPARATOR UPSTREAM_BYTES]` where SEPARATOR is `~~UPSTREAM~~`.
//! CLIENT_BYTES are written raw to a fresh TCP connection to the proxy; the answer is read until
//! it looks complete (5 ms without a byte) or for 50 ms if none comes, then the client
//! half-closes and reads until the proxy closes (at most 200 ms more). With UPSTREAM_BYTES, the
//! fake POS answers every request of this run with exactly those bytes (a raw HTTP response)
//! and closes; without, it answers like the POS (keep-alive): a completed sale with a customer (207) to
//! `POST /api/sales`, a small 200 JSON answer to anything else.
//!
//! Checks: no panic in any thread (a panic in a connection or sale task, which tokio would
//! swallow, is recorded by a panic hook and raised by the fuzzing thread after the exchange); the
//! head of the first HTTP/1 response parses and its framing is unambiguous (not both
//! `Content-Length` and `Transfer-Encoding`, no conflicting lengths, no bytes after a body of
//! the declared length other than a next response); and every 64 runs the
//! proxy still serves: a plain GET gets the fake POS's 200 and a well-formed sale with a
//! customer gets a 207 whose body carries `crmStatus`, within a few seconds.
#![no_main]

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use pos_crm_proxy::config::{Config, NoEnv};
use pos_crm_proxy::App;

const SEPARATOR: &[u8] = b"~~UPSTREAM~~";
const CHECK_EVERY: u64 = 64;

/// The POS's answer to a completed sale with a customer (from the captured samples).
const SALE_ANSWER: &str = r#"{"success":true,"saleId":"POS_1795586791062_cnttqx05g","message":"Sale completed successfully (inventory service unavailable - manual stock adjustment may be required)","saleRecord":{"id":"POS_1795586791062_cnttqx05g","timestamp":"2026-11-25T06:06:31.062Z","items":[{"id":"test-product-1","name":"Test Coffee","price":4.5,"quantity":2,"type":"product"},{"id":"test-service-1","name":"Gift Wrapping","price":1,"quantity":1,"type":"service"}],"subtotal":10,"tax":1,"total":11,"paymentMethod":"Credit Card","user":"test-cashier","warehouseId":"WH1","customerId":"customer-123"},"warnings":["Inventory update failed for item test-product-1: Inventory service not configured"]}"#;

/// The fake POS's answer to anything but `POST /api/sales`.
const OTHER_ANSWER: &str = r#"{"message":"Sale history lookup not implemented","limit":5,"offset":0}"#;

const SALE_REQUEST: &str = r#"{"items":[{"id":"test-product-1","name":"Test Coffee","price":4.5,"quantity":2,"type":"product"},{"id":"test-service-1","name":"Gift Wrapping","price":1,"quantity":1,"type":"service"}],"subtotal":10,"tax":1,"total":11,"paymentMethod":"Credit Card","user":"test-cashier","warehouseId":"WH1","customerId":"customer-123","customerName":"John Doe","currency":"USD"}"#;

struct Harness {
    proxy: SocketAddr,
    /// What the fake POS answers: `None` = like the POS (fixed answers, keep-alive).
    answer: Arc<Mutex<Option<Arc<Vec<u8>>>>>,
    runs: AtomicU64,
    /// The running proxy, never shut down (it runs until the process ends).
    _app: Mutex<App>,
    /// Keeps the runtime (and so the proxy's tasks) alive for the whole process.
    _rt: tokio::runtime::Runtime,
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// What the fake POS saw.
struct Seen {
    head: bool,
    sale: bool,
}

/// Reads one request (head and, as far as it can tell, body) from `buf` + `s`; `None` when the
/// connection is done.
fn read_request(s: &mut TcpStream, buf: &mut Vec<u8>) -> Option<Seen> {
    let mut chunk = [0u8; 8192];
    let head_end = loop {
        if let Some(i) = find(buf, b"\r\n\r\n") {
            break i + 4;
        }
        if buf.len() > 1 << 20 {
            return None;
        }
        match s.read(&mut chunk) {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
    let seen = Seen {
        head: head.starts_with("head "),
        sale: head.starts_with("post /api/sales "),
    };
    let mut length: usize = 0;
    let mut chunked = false;
    for line in head.lines() {
        if let Some(v) = line.strip_prefix("content-length:") {
            length = v.trim().parse().unwrap_or(0).min(1 << 20);
        }
        if line.starts_with("transfer-encoding:") && line.contains("chunked") {
            chunked = true;
        }
    }
    let end = loop {
        let body = &buf[head_end..];
        if chunked {
            if let Some(i) = find(body, b"0\r\n\r\n") {
                break head_end + i + 5;
            }
        } else if body.len() >= length {
            break head_end + length;
        }
        match s.read(&mut chunk) {
            // A body that never completes still gets an answer (and the connection ends).
            Ok(0) | Err(_) => break buf.len(),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    };
    buf.drain(..end.min(buf.len()));
    Some(seen)
}

fn fake_pos_connection(mut s: TcpStream, answer: Arc<Mutex<Option<Arc<Vec<u8>>>>>) {
    let _ = s.set_read_timeout(Some(Duration::from_millis(300)));
    let _ = s.set_write_timeout(Some(Duration::from_secs(2)));
    let _ = s.set_nodelay(true);
    let mut buf = Vec::new();
    while let Some(seen) = read_request(&mut s, &mut buf) {
        let current = answer.lock().unwrap().clone();
        match current {
            Some(raw) => {
                let _ = s.write_all(&raw);
                let _ = s.shutdown(Shutdown::Both);
                return;
            }
            None => {
                let (status, body) = if seen.sale {
                    ("207 Multi-Status", SALE_ANSWER)
                } else {
                    ("200 OK", OTHER_ANSWER)
                };
                let head = format!(
                    "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: keep-alive\r\nkeep-alive: timeout=5\r\n\r\n",
                    body.len()
                );
                let mut out = head.into_bytes();
                if !seen.head {
                    out.extend_from_slice(body.as_bytes());
                }
                if s.write_all(&out).is_err() {
                    return;
                }
            }
        }
    }
}

fn start_fake_pos(answer: Arc<Mutex<Option<Arc<Vec<u8>>>>>) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind fake POS");
    let addr = listener.local_addr().unwrap();
    std::thread::Builder::new()
        .name("fake-pos".into())
        .spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                let answer = answer.clone();
                let _ = std::thread::Builder::new()
                    .name("fake-pos-conn".into())
                    .spawn(move || fake_pos_connection(conn, answer));
            }
        })
        .expect("fake POS thread");
    addr
}

fn data_dir() -> PathBuf {
    let base = std::env::var_os("FUZZ_DATA_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    base.join(format!("pos-crm-proxy-fuzz-{}", std::process::id()))
}

/// The first panic of a thread other than the fuzzing thread (a connection or sale task):
/// reported by the fuzzing thread after the exchange, so the input that caused it is the one
/// libFuzzer saves. (libfuzzer-sys's own hook would abort only after printing a backtrace,
/// which takes seconds here, and blame whatever input runs by then.)
static OTHER_THREAD_PANIC: Mutex<Option<String>> = Mutex::new(None);

fn install_panic_hook() {
    let fuzz_thread = std::thread::current().id();
    let libfuzzer_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if std::thread::current().id() == fuzz_thread {
            libfuzzer_hook(info); // prints and aborts
        } else {
            let name = std::thread::current().name().unwrap_or("?").to_string();
            let mut first = OTHER_THREAD_PANIC.lock().unwrap_or_else(|e| e.into_inner());
            first.get_or_insert_with(|| format!("thread '{name}' {info}"));
        }
    }));
}

fn raise_other_thread_panic() {
    let taken = OTHER_THREAD_PANIC
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .take();
    if let Some(message) = taken {
        panic!("a proxy thread panicked: {message}");
    }
}

fn harness() -> &'static Harness {
    static H: OnceLock<Harness> = OnceLock::new();
    H.get_or_init(|| {
        // libFuzzer's C++ main does not ignore SIGPIPE as a Rust main does: a write on a socket
        // the peer closed (hyper writes with writev) would kill the process.
        // SAFETY: setting a signal disposition to SIG_IGN, before any other thread of ours runs.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_IGN);
        }
        install_panic_hook();
        let answer = Arc::new(Mutex::new(None));
        let pos = start_fake_pos(answer.clone());
        let dir = data_dir();
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("data dir");
        let toml = format!(
            r#"
[proxy]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
access_log = true
shutdown_grace_ms = 1000
reload_poll_ms = 0

[upstream]
url = "http://{pos}"
connect_timeout_ms = 1000
timeout_ms = 2000

[sales]
max_request_body_bytes = 4096
max_response_body_bytes = 4096

[crm]
enabled = true
sync_budget_ms = 200

[storage]
data_dir = "{dir}"

[outbox]
synchronous_full = false
"#,
            dir = dir.display()
        );
        let config = Config::from_toml(&toml, std::path::Path::new("fuzz.toml"), &NoEnv)
            .expect("fuzz config");
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let app = rt.block_on(App::start(config)).expect("proxy starts");
        Harness {
            proxy: app.proxy_addr(),
            answer,
            runs: AtomicU64::new(0),
            _app: Mutex::new(app),
            _rt: rt,
        }
    })
}

/// How long one exchange may wait.
#[derive(Clone, Copy)]
struct Waits {
    /// For the first byte of an answer.
    first: Duration,
    /// Without a new byte, once something came: the answer is taken as complete.
    idle: Duration,
    /// For the proxy to close after the client half-closed.
    close: Duration,
}

const FUZZ_WAITS: Waits = Waits {
    first: Duration::from_millis(50),
    idle: Duration::from_millis(5),
    close: Duration::from_millis(200),
};

const CHECK_WAITS: Waits = Waits {
    first: Duration::from_secs(5),
    idle: Duration::from_millis(100),
    close: Duration::from_secs(1),
};

/// Sends `bytes` as one client connection and reads what comes back. The write half stays open
/// while the proxy works (hyper drops a connection whose client half-closes, since
/// `http1_half_close` is off, which would hide the answer); once an answer seems complete (no
/// byte for `idle`), or none came within `first`, the client half-closes and reads until the
/// proxy closes (at most `close`).
fn exchange(addr: SocketAddr, bytes: &[u8], waits: Waits) -> std::io::Result<Vec<u8>> {
    let start = Instant::now();
    let mut s = TcpStream::connect_timeout(&addr, waits.first)?;
    s.set_nodelay(true)?;
    s.set_write_timeout(Some(waits.first))?;
    // The proxy may answer and close before reading everything: a failed write is fine.
    let _ = s.write_all(bytes);
    let mut out = Vec::new();
    let mut chunk = [0u8; 16384];
    let mut last = Instant::now();
    let mut closing: Option<Instant> = None;
    loop {
        let now = Instant::now();
        let until = match closing {
            Some(deadline) => deadline,
            None if out.is_empty() => start + waits.first,
            None => last + waits.idle,
        };
        let limit = until.saturating_duration_since(now);
        if limit.is_zero() {
            if closing.is_some() {
                break;
            }
            let _ = s.shutdown(Shutdown::Write);
            closing = Some(now + waits.close);
            continue;
        }
        s.set_read_timeout(Some(limit))?;
        match s.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => {
                out.extend_from_slice(&chunk[..n]);
                last = Instant::now();
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(_) if !out.is_empty() => break,
            Err(e) => return Err(e),
        }
    }
    Ok(out)
}

/// Checks the first HTTP/1 response in `answer` (when its head arrived in full): framing that a
/// client or a cache in front could read two ways is a finding.
fn check_framing(answer: &[u8]) {
    if !answer.starts_with(b"HTTP/1.") {
        return; // nothing, HTTP/2 frames, or an upgraded tunnel's bytes
    }
    let mut headers = [httparse::EMPTY_HEADER; 128];
    let mut resp = httparse::Response::new(&mut headers);
    let head_len = match resp.parse(answer) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return, // cut off by our waits
        Err(e) => panic!(
            "the proxy sent an unparsable response head ({e}): {:?}",
            String::from_utf8_lossy(&answer[..answer.len().min(600)])
        ),
    };
    let code = resp.code.unwrap_or(0);
    let mut lengths = Vec::new();
    let mut chunked = false;
    for h in resp.headers.iter() {
        if h.name.eq_ignore_ascii_case("content-length") {
            lengths.push(String::from_utf8_lossy(h.value).trim().to_string());
        }
        if h.name.eq_ignore_ascii_case("transfer-encoding") {
            chunked = true;
        }
    }
    let show = || String::from_utf8_lossy(&answer[..answer.len().min(600)]).into_owned();
    if code != 101 {
        assert!(
            lengths.is_empty() || !chunked,
            "response with both Content-Length and Transfer-Encoding: {:?}",
            show()
        );
        assert!(
            lengths.windows(2).all(|w| w[0] == w[1]),
            "response with conflicting Content-Length values: {:?}",
            show()
        );
        assert!(
            lengths.iter().all(|l| l.parse::<u64>().is_ok()),
            "response with an invalid Content-Length: {:?}",
            show()
        );
    }
    // What follows a body of the declared length can only be the next response. (After a HEAD
    // request's answer, which has no body, the next response follows the head directly.)
    let bodiless = matches!(code, 100..=199 | 204 | 304);
    if let (false, false, Some(Ok(length))) = (
        bodiless,
        chunked,
        lengths.first().map(|l| l.parse::<usize>()),
    ) {
        let rest = &answer[head_len..];
        if rest.len() > length
            && !rest[length..].starts_with(b"HTTP/1.")
            && !rest.starts_with(b"HTTP/1.")
        {
            panic!(
                "response body longer than its Content-Length ({length}): the connection is \
                 desynchronised: {:?}",
                show()
            );
        }
    }
}

/// The proxy still answers a passthrough GET and a sale, as it should.
fn still_serving(h: &Harness) -> Result<(), String> {
    *h.answer.lock().unwrap() = None;
    let get = b"GET /api/health-of-the-fuzzer HTTP/1.1\r\nHost: pos\r\nConnection: close\r\n\r\n";
    let sale = format!(
        "POST /api/sales HTTP/1.1\r\nHost: pos\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{SALE_REQUEST}",
        SALE_REQUEST.len()
    );
    let mut last = String::new();
    for _attempt in 0..3 {
        let got = exchange(h.proxy, get, CHECK_WAITS)
            .map_err(|e| e.to_string())
            .and_then(|a| {
                if a.starts_with(b"HTTP/1.1 200") && find(&a, OTHER_ANSWER.as_bytes()).is_some() {
                    Ok(())
                } else {
                    Err(format!("GET answered {:?}", String::from_utf8_lossy(&a)))
                }
            })
            .and_then(|()| {
                exchange(h.proxy, sale.as_bytes(), CHECK_WAITS)
                    .map_err(|e| e.to_string())
            })
            .and_then(|a| {
                let text = String::from_utf8_lossy(&a);
                if text.starts_with("HTTP/1.1 207") && text.contains("\"crmStatus\":{") {
                    Ok(())
                } else {
                    Err(format!("sale answered {text:?}"))
                }
            });
        match got {
            Ok(()) => return Ok(()),
            Err(e) => last = e,
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    Err(last)
}

fuzz_target!(|data: &[u8]| {
    let h = harness();
    let n = h.runs.fetch_add(1, Ordering::Relaxed);
    // A panic left over from an earlier input's background work (rare): blame it here.
    raise_other_thread_panic();
    if n % CHECK_EVERY == 0 {
        if let Err(e) = still_serving(h) {
            panic!("the proxy stopped serving after {n} runs: {e}");
        }
    }
    let (client, upstream) = match find(data, SEPARATOR) {
        Some(i) => (&data[..i], Some(&data[i + SEPARATOR.len()..])),
        None => (data, None),
    };
    *h.answer.lock().unwrap() = upstream.map(|u| Arc::new(u.to_vec()));
    let started = Instant::now();
    let answer = exchange(h.proxy, client, FUZZ_WAITS);
    raise_other_thread_panic();
    if let Ok(a) = &answer {
        check_framing(a);
    }
    if std::env::var_os("FUZZ_TRACE").is_some() {
        let answer = answer.as_deref().map(|a| String::from_utf8_lossy(&a[..a.len().min(40)]).into_owned());
        eprintln!("{:>4} ms {answer:?}", started.elapsed().as_millis());
    }
});
