//! `SamplePos`: an in-process stand-in for the legacy Point-of-Sale (a Next.js 15 app).
//!
//! Why it exists: the `demo` subcommand and the integration tests need an upstream that answers
//! *exactly* like the real POS, without running Node. Everything here is reproduced from the raw
//! captures in `shared/pos-samples/` (the `pos-*.txt` files) and `shared/contracts.md` section 1:
//!
//! * the same status codes (207 for a sale with inventory trouble, 400/500 with the POS's own
//!   error bodies, 308 for a trailing slash, 204/405 for OPTIONS/PUT, ...);
//! * the same header set (`vary`, `content-type`, `Date`, `Connection: keep-alive`,
//!   `Keep-Alive: timeout=N`) and the same framing (a streamed, chunked body, never a
//!   `Content-Length`), because the proxy must cope with exactly that framing;
//! * the same JSON key order, and the JavaScript quirks of the route handler
//!   (`if (!items || items.length === 0)`, `if (!total || total <= 0)`, `items.filter(...)`,
//!   V8's `JSON.parse` error messages), so edge-case tests exercise what production will see;
//! * request values echoed in `saleRecord` keep their JSON text as received (`10.10` stays
//!   `10.10`), so money handling in the proxy can be tested for "never re-round". (The real POS
//!   re-serialises with `JSON.stringify`, which would print `10.1`; only insignificant
//!   whitespace is dropped here, as `JSON.stringify` would.)
//!
//! It also keeps a log of what it received (`requests`, `completed_sales`,
//! `connections_accepted`) so tests can assert what the proxy actually forwarded.
//!
//! Header names go out lower-case (hyper writes them that way and gives no public way to choose
//! the case per header); HTTP header names are case-insensitive, so nothing depending on the
//! wire contract can tell.

use std::collections::hash_map::RandomState;
use std::convert::Infallible;
use std::hash::{BuildHasher, Hasher};
use std::io::Write as _;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderName, HeaderValue};
use http::{HeaderMap, Method, Request, Response, StatusCode, Version};
use http_body_util::{BodyExt, Limited};
use hyper::body::{Body, Frame, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use time::OffsetDateTime;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Notify};
use tokio::task::{JoinHandle, JoinSet};

/// The `vary` value Next.js puts on every app-router answer (API routes included).
const NEXT_VARY: &str =
    "RSC, Next-Router-State-Tree, Next-Router-Prefetch, Next-Router-Segment-Prefetch";

/// Node's `headersTimeout` default: a client that starts a request head must finish it in time.
/// The keep-alive idle timeout (`SamplePosOptions::idle_timeout`) is separate and shorter.
const HEADERS_TIMEOUT: Duration = Duration::from_secs(60);

/// How long `shutdown` lets in-flight requests finish before their connections are dropped.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(1);

/// A request body bigger than this is refused (413) rather than buffered: the fake must never be
/// the thing that runs a test machine out of memory.
const MAX_BODY_BYTES: usize = 32 * 1024 * 1024;

/// `JSON.parse` in V8 has no nesting limit, but a recursive parser needs one; deeper input is
/// answered with the error V8 gives when a JS stack overflows.
const MAX_JSON_DEPTH: usize = 512;

/// The stock level the simulated inventory service reports before every update (as in the
/// `pos-invok-*` capture, where a quantity of 2 leaves 8).
const SIMULATED_STOCK: f64 = 10.0;

const SALE_ERROR: &str = "Failed to process sale transaction";
const INVENTORY_ERROR: &str = "Failed to process inventory updates";
const MSG_ALL_OK: &str = "Sale completed successfully with all inventory updates";
const MSG_NOT_CONFIGURED: &str = "Sale completed successfully (inventory service unavailable - manual stock adjustment may be required)";
const ERR_NOT_CONFIGURED: &str = "Inventory service not configured";
const ERR_FETCH_FAILED: &str = "fetch failed";

const SAMPLE_HTML: &str = "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"/>\
<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\"/><title>POS System</title>\
</head><body><main><h1>Point of Sale</h1><p>Sample POS: an in-process stand-in for the legacy \
Next.js POS.</p></main></body></html>";

/// Which inventory service the simulated POS talks to while completing a sale.
///
/// The real POS calls an external inventory service for every `type: "product"` item, and its
/// answer (status, `message`, `warnings`, `inventoryStatus`) depends on how that went; the three
/// captured situations are reproduced here.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum InventoryMode {
    /// No inventory service configured (the usual deployment): 207, "inventory service
    /// unavailable" message, `serviceAvailable: false`.
    #[default]
    NotConfigured,
    /// Every inventory update succeeds: 200, "with all inventory updates", no `warnings` key.
    AllOk,
    /// The inventory service is configured but unreachable: 207, "(N inventory updates failed)",
    /// each update failing with `fetch failed`.
    Failing,
}

/// Start-up settings of a [`SamplePos`]. The first three can be changed later at run time.
#[derive(Clone, Debug)]
pub struct SamplePosOptions {
    /// The simulated inventory service (see [`InventoryMode`]).
    pub inventory: InventoryMode,
    /// Extra time before answering POST /api/sales (a real POS calls an inventory service).
    /// Every POST /api/sales answer waits, refusals included; the sale is decided after the
    /// wait and completes even if the client has hung up meanwhile.
    pub sale_delay: std::time::Duration,
    /// Simulate a compressing layer in front of the POS: gzip every JSON response body
    /// (`content-encoding: gzip`) even when the client asked for identity.
    pub force_gzip: bool,
    /// Idle keep-alive sockets are closed after this (the real POS: 5 s).
    /// Zero disables the idle close, like Node's `keepAliveTimeout = 0`.
    pub idle_timeout: std::time::Duration,
}

impl Default for SamplePosOptions {
    /// The real POS as deployed: no inventory service, instant answers, no compression on JSON,
    /// Node's 5 s keep-alive timeout.
    fn default() -> Self {
        SamplePosOptions {
            inventory: InventoryMode::NotConfigured,
            sale_delay: Duration::ZERO,
            force_gzip: false,
            idle_timeout: Duration::from_secs(5),
        }
    }
}

/// One request the POS received on `/api/sales` (or `/api/sales/`), kept so tests can check what
/// the proxy forwarded: method, URI as sent on the wire, headers and the complete body.
#[derive(Clone, Debug)]
pub struct RecordedRequest {
    /// Any method: a proxy must pass GET/HEAD/OPTIONS/PUT through untouched too.
    pub method: http::Method,
    /// The request target as received (path and query), to check what the proxy rewrote.
    pub uri: http::Uri,
    /// All request headers, e.g. to check `accept-encoding` or hop-by-hop handling.
    pub headers: http::HeaderMap,
    /// The whole body, de-chunked, exactly as the POS received it.
    pub body: bytes::Bytes,
}

/// The run-time knobs, read once per request when it arrives.
#[derive(Clone, Copy, Debug)]
struct Knobs {
    inventory: InventoryMode,
    sale_delay: Duration,
    force_gzip: bool,
}

/// State shared by the handle, the accept loop and every connection task.
struct Shared {
    knobs: Mutex<Knobs>,
    idle_timeout: Duration,
    requests: Mutex<Vec<RecordedRequest>>,
    sales: Mutex<Vec<String>>,
    connections: AtomicUsize,
    id_counter: AtomicU64,
    id_hasher: RandomState,
}

/// Locks a mutex even if a panicking thread poisoned it: the data here (logs and knobs) stays
/// meaningful, and the fake must never turn one failure into a cascade of panics.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Shared {
    fn knobs(&self) -> Knobs {
        *lock(&self.knobs)
    }

    /// The 9 random lower-case base-36 characters of a sale id (JS:
    /// `Math.random().toString(36).substr(2, 9)`), from a randomly keyed hash of a counter and the
    /// clock, so no random-number crate is needed and two sales never collide in practice.
    fn random_suffix(&self) -> String {
        const ALPHABET: &[u8; 36] = b"0123456789abcdefghijklmnopqrstuvwxyz";
        let n = self.id_counter.fetch_add(1, Ordering::Relaxed);
        let mut h = self.id_hasher.build_hasher();
        h.write_u64(n);
        h.write_i128(OffsetDateTime::now_utc().unix_timestamp_nanos());
        let mut x = h.finish();
        let mut s = String::with_capacity(9);
        for _ in 0..9 {
            s.push(char::from(ALPHABET[(x % 36) as usize]));
            x /= 36;
        }
        s
    }
}

/// An in-process fake of the real POS, listening on a real TCP socket.
///
/// Why a real socket: the proxy under test talks HTTP/1.1 to its upstream, and framing,
/// keep-alive and idle-close behaviour are part of what has to match.
pub struct SamplePos {
    addr: SocketAddr,
    shared: Arc<Shared>,
    stop: watch::Sender<bool>,
    accept: Option<JoinHandle<()>>,
}

impl SamplePos {
    /// Starts a POS on an ephemeral loopback port (`127.0.0.1:0`), so parallel tests never clash.
    pub async fn start(opts: SamplePosOptions) -> std::io::Result<SamplePos> {
        SamplePos::start_on(SocketAddr::from(([127, 0, 0, 1], 0)), opts).await
    }

    /// Starts a POS on the given address (the `demo` subcommand picks a fixed port).
    pub async fn start_on(addr: SocketAddr, opts: SamplePosOptions) -> std::io::Result<SamplePos> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            knobs: Mutex::new(Knobs {
                inventory: opts.inventory,
                sale_delay: opts.sale_delay,
                force_gzip: opts.force_gzip,
            }),
            idle_timeout: opts.idle_timeout,
            requests: Mutex::new(Vec::new()),
            sales: Mutex::new(Vec::new()),
            connections: AtomicUsize::new(0),
            id_counter: AtomicU64::new(0),
            id_hasher: RandomState::new(),
        });
        let (stop, stop_rx) = watch::channel(false);
        let accept = tokio::spawn(accept_loop(listener, Arc::clone(&shared), stop_rx));
        tracing::debug!(%addr, "sample POS listening");
        Ok(SamplePos {
            addr,
            shared,
            stop,
            accept: Some(accept),
        })
    }

    /// The bound address (useful when started on port 0).
    pub fn addr(&self) -> std::net::SocketAddr {
        self.addr
    }

    /// Base URL to configure the proxy's upstream with, e.g. `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Switches the simulated inventory service for the sales that arrive from now on.
    pub fn set_inventory(&self, mode: InventoryMode) {
        lock(&self.shared.knobs).inventory = mode;
    }

    /// Changes the extra time before POST /api/sales is answered, for requests arriving from now on.
    pub fn set_sale_delay(&self, d: std::time::Duration) {
        lock(&self.shared.knobs).sale_delay = d;
    }

    /// Turns the simulated compressing layer on or off (see `SamplePosOptions::force_gzip`).
    pub fn set_force_gzip(&self, on: bool) {
        lock(&self.shared.knobs).force_gzip = on;
    }

    /// Every request received on `/api/sales` (any method, trailing slash too), in the order
    /// their bodies finished arriving.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        lock(&self.shared.requests).clone()
    }

    /// The `saleId`s of the sales this POS completed, in order. A sale counts as completed once
    /// the POS has decided it (even if the client hung up meanwhile, as with the real POS).
    pub fn completed_sales(&self) -> Vec<String> {
        lock(&self.shared.sales).clone()
    }

    /// How many TCP connections were accepted so far (to test the proxy's connection reuse).
    pub fn connections_accepted(&self) -> usize {
        self.shared.connections.load(Ordering::SeqCst)
    }

    /// Stops accepting, closes idle connections at once, lets in-flight requests finish for up
    /// to a second, then drops whatever is left. The port is free when this returns.
    pub async fn shutdown(mut self) {
        self.stop.send_replace(true);
        if let Some(task) = self.accept.as_mut() {
            // If this future is itself cancelled, `Drop` still aborts the task.
            let _ = task.await;
        }
        self.accept = None;
    }
}

impl Drop for SamplePos {
    /// Aborting the accept task drops its `JoinSet`, which aborts every connection task: a test
    /// that forgets `shutdown` leaks neither the port nor tasks.
    fn drop(&mut self) {
        if let Some(task) = self.accept.take() {
            task.abort();
        }
    }
}

impl std::fmt::Debug for SamplePos {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SamplePos")
            .field("addr", &self.addr)
            .field("knobs", &self.shared.knobs())
            .finish_non_exhaustive()
    }
}

/// Accepts connections until told to stop; connection tasks live in a `JoinSet` so that dropping
/// (or aborting) this task tears all of them down.
async fn accept_loop(listener: TcpListener, shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            res = listener.accept() => match res {
                Ok((stream, peer)) => {
                    shared.connections.fetch_add(1, Ordering::SeqCst);
                    // Node enables TCP_NODELAY on its sockets; small JSON answers leave at once.
                    let _ = stream.set_nodelay(true);
                    tracing::trace!(%peer, "sample POS accepted a connection");
                    conns.spawn(serve_connection(stream, Arc::clone(&shared), stop.clone()));
                }
                Err(e) => {
                    // E.g. out of file descriptors: back off instead of spinning or giving up.
                    tracing::debug!(error = %e, "sample POS accept failed");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            },
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
            _ = stop.changed() => break,
        }
    }
    drop(listener);
    let grace = tokio::time::sleep(SHUTDOWN_GRACE);
    tokio::pin!(grace);
    loop {
        tokio::select! {
            next = conns.join_next() => if next.is_none() { break },
            _ = &mut grace => break,
        }
    }
    // Dropping `conns` aborts the connections that did not finish in time.
}

/// Per-connection activity, used to close keep-alive connections that stay idle, like Node's
/// `keepAliveTimeout`: the clock runs only while no request is in flight, so a slow sale never
/// gets its connection cut, and restarts on every byte read or written.
struct Activity {
    epoch: Instant,
    last_micros: AtomicU64,
    inflight: AtomicUsize,
    finished: Notify,
}

impl Activity {
    fn new() -> Self {
        Activity {
            epoch: Instant::now(),
            last_micros: AtomicU64::new(0),
            inflight: AtomicUsize::new(0),
            finished: Notify::new(),
        }
    }

    fn touch(&self) {
        let micros = u64::try_from(self.epoch.elapsed().as_micros()).unwrap_or(u64::MAX);
        self.last_micros.store(micros, Ordering::SeqCst);
    }

    fn last(&self) -> Instant {
        self.epoch + Duration::from_micros(self.last_micros.load(Ordering::SeqCst))
    }

    /// Resolves once the connection has had no request in flight and no traffic for `timeout`.
    async fn idle_for(&self, timeout: Duration) {
        if timeout.is_zero() {
            return std::future::pending().await;
        }
        loop {
            if self.inflight.load(Ordering::SeqCst) > 0 {
                // `notify_one` stores a permit, so a request finishing right here is not missed.
                self.finished.notified().await;
                continue;
            }
            let deadline = self.last() + timeout;
            if Instant::now() >= deadline {
                return;
            }
            tokio::time::sleep_until(deadline.into()).await;
        }
    }
}

/// Marks one request as in flight for as long as it lives; it travels inside the response body,
/// which hyper drops once the last byte is written (or the connection dies).
struct InflightGuard(Arc<Activity>);

impl InflightGuard {
    fn new(activity: Arc<Activity>) -> Self {
        activity.inflight.fetch_add(1, Ordering::SeqCst);
        activity.touch();
        InflightGuard(activity)
    }
}

impl Drop for InflightGuard {
    fn drop(&mut self) {
        self.0.touch();
        self.0.inflight.fetch_sub(1, Ordering::SeqCst);
        self.0.finished.notify_one();
    }
}

/// The TCP stream, noting every byte of traffic in the connection's [`Activity`].
struct TrackedIo {
    inner: TcpStream,
    activity: Arc<Activity>,
}

impl AsyncRead for TrackedIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let res = Pin::new(&mut this.inner).poll_read(cx, buf);
        if matches!(res, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            this.activity.touch();
        }
        res
    }
}

impl AsyncWrite for TrackedIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let res = Pin::new(&mut this.inner).poll_write(cx, buf);
        if matches!(res, Poll::Ready(Ok(n)) if n > 0) {
            this.activity.touch();
        }
        res
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let res = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        if matches!(res, Poll::Ready(Ok(n)) if n > 0) {
            this.activity.touch();
        }
        res
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// Serves one connection with hyper's HTTP/1.1 server and closes it when it idles.
///
/// hyper's `header_read_timeout` is not used for the idle close. hyper 1.12 does start that
/// clock while a keep-alive connection waits for its next request (checked), but it is one clock
/// for two things Node keeps apart (idle gap: `keepAliveTimeout`, 5 s; slow head:
/// `headersTimeout`, 60 s), and it is only documented for the head. Tracking activity ourselves
/// gives Node's semantics whatever hyper 1.x does there.
async fn serve_connection(stream: TcpStream, shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    let activity = Arc::new(Activity::new());
    let io = TokioIo::new(TrackedIo {
        inner: stream,
        activity: Arc::clone(&activity),
    });
    let service = {
        let shared = Arc::clone(&shared);
        let activity = Arc::clone(&activity);
        service_fn(move |req| {
            handle(
                req,
                Arc::clone(&shared),
                InflightGuard::new(Arc::clone(&activity)),
            )
        })
    };
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .keep_alive(true)
        .header_read_timeout(HEADERS_TIMEOUT);
    let conn = builder.serve_connection(io, service);
    tokio::pin!(conn);

    let idle_timeout = shared.idle_timeout;
    let mut closing = *stop.borrow();
    if closing {
        conn.as_mut().graceful_shutdown();
    }
    loop {
        tokio::select! {
            res = conn.as_mut() => {
                if let Err(e) = res {
                    tracing::debug!(error = %e, "sample POS connection ended with an error");
                }
                break;
            }
            _ = activity.idle_for(idle_timeout) => {
                if closing {
                    // Already asked to close, and still nothing happens (e.g. a half-sent
                    // head): drop the socket.
                    break;
                }
                tracing::trace!("sample POS closing an idle keep-alive connection");
                conn.as_mut().graceful_shutdown();
                closing = true;
            }
            _ = stop.changed(), if !closing => {
                conn.as_mut().graceful_shutdown();
                closing = true;
            }
        }
    }
}

/// The response body: one chunk sent with chunked framing (no `Content-Length`, as Next.js
/// streams its answers), an empty chunked body, or no body at all (HEAD, 204).
struct PosBody {
    chunk: Option<Bytes>,
    done: bool,
    _guard: Option<InflightGuard>,
}

impl Body for PosBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.get_mut();
        this.done = true;
        match this.chunk.take() {
            Some(chunk) if !chunk.is_empty() => Poll::Ready(Some(Ok(Frame::data(chunk)))),
            _ => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done
    }
    // `size_hint` stays unknown on purpose: that is what makes hyper use chunked framing.
}

/// What the request asked of the connection and the encoding, needed to finish any answer.
struct ReqCtx {
    keep_alive: bool,
    head: bool,
    idle_timeout: Duration,
}

/// An answer before the connection-level headers are added.
struct Reply {
    status: StatusCode,
    headers: Vec<(HeaderName, HeaderValue)>,
    /// `None`: no body and no framing header at all (Node's HEAD / 204 answers).
    body: Option<Bytes>,
}

impl Reply {
    /// A Next.js `NextResponse.json(...)` answer; gzipped when a compressing layer is simulated.
    fn json(status: StatusCode, json: String, force_gzip: bool) -> Reply {
        let mut headers = vec![
            (header::VARY, HeaderValue::from_static(NEXT_VARY)),
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            ),
        ];
        let mut body = Bytes::from(json);
        if force_gzip {
            if let Some(gz) = gzip(&body) {
                headers.push((header::CONTENT_ENCODING, HeaderValue::from_static("gzip")));
                body = gz;
            }
        }
        Reply {
            status,
            headers,
            body: Some(body),
        }
    }

    /// Any page outside `/api`: a small HTML document, gzipped when the client accepts it
    /// (Next.js compresses pages, unlike API answers).
    fn html(accepts_gzip: bool) -> Reply {
        let mut headers = vec![
            (
                header::VARY,
                HeaderValue::from_static(
                    "RSC, Next-Router-State-Tree, Next-Router-Prefetch, Next-Router-Segment-Prefetch, Accept-Encoding",
                ),
            ),
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/html; charset=utf-8"),
            ),
        ];
        let mut body = Bytes::from_static(SAMPLE_HTML.as_bytes());
        if accepts_gzip {
            if let Some(gz) = gzip(&body) {
                headers.push((header::CONTENT_ENCODING, HeaderValue::from_static("gzip")));
                body = gz;
            }
        }
        Reply {
            status: StatusCode::OK,
            headers,
            body: Some(body),
        }
    }

    /// Next.js's trailing-slash redirect (pos-trailing-slash.txt): no `vary`, no content type,
    /// the target as plain body.
    fn redirect(location: &str) -> Reply {
        let loc = HeaderValue::from_str(location).unwrap_or(HeaderValue::from_static("/"));
        let refresh = HeaderValue::from_str(&format!("0;url={location}"))
            .unwrap_or(HeaderValue::from_static("0;url=/"));
        Reply {
            status: StatusCode::PERMANENT_REDIRECT,
            headers: vec![
                (header::LOCATION, loc),
                (HeaderName::from_static("refresh"), refresh),
            ],
            body: Some(Bytes::copy_from_slice(location.as_bytes())),
        }
    }

    /// OPTIONS on a route handler (pos-options.txt): 204 with `allow`, no body, no framing.
    fn options() -> Reply {
        Reply {
            status: StatusCode::NO_CONTENT,
            headers: vec![
                (header::VARY, HeaderValue::from_static(NEXT_VARY)),
                (
                    header::ALLOW,
                    HeaderValue::from_static("GET, HEAD, OPTIONS, POST"),
                ),
            ],
            body: None,
        }
    }

    /// A method the route does not export (pos-put.txt): 405, empty chunked body.
    fn method_not_allowed() -> Reply {
        Reply {
            status: StatusCode::METHOD_NOT_ALLOWED,
            headers: vec![(header::VARY, HeaderValue::from_static(NEXT_VARY))],
            body: Some(Bytes::new()),
        }
    }

    /// A status with no body and no extra headers (only for requests hyper could not deliver).
    fn bare(status: StatusCode) -> Reply {
        Reply {
            status,
            headers: Vec::new(),
            body: Some(Bytes::new()),
        }
    }

    /// Adds Node's connection-level headers in Node's order and builds the hyper response.
    fn into_response(self, ctx: &ReqCtx) -> Response<PosBody> {
        let body = if ctx.head { None } else { self.body };
        let mut resp = Response::new(PosBody {
            done: body.is_none(),
            chunk: body,
            _guard: None,
        });
        *resp.status_mut() = self.status;
        let headers = resp.headers_mut();
        for (name, value) in self.headers {
            headers.append(name, value);
        }
        // Set here (not by hyper) so it sits where Node puts it, before `Connection`.
        if let Ok(date) = HeaderValue::from_str(&http_date(OffsetDateTime::now_utc())) {
            headers.append(header::DATE, date);
        }
        if ctx.keep_alive {
            headers.append(header::CONNECTION, HeaderValue::from_static("keep-alive"));
            if !ctx.idle_timeout.is_zero() {
                // Node writes whole seconds, rounded down.
                let ka = format!("timeout={}", ctx.idle_timeout.as_secs());
                if let Ok(v) = HeaderValue::from_str(&ka) {
                    headers.append(HeaderName::from_static("keep-alive"), v);
                }
            }
        } else {
            headers.append(header::CONNECTION, HeaderValue::from_static("close"));
        }
        resp
    }
}

fn gzip(data: &[u8]) -> Option<Bytes> {
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    enc.write_all(data).ok()?;
    enc.finish().ok().map(Bytes::from)
}

/// The hyper service: buffers the request body, routes, and ties the in-flight guard to the
/// response body.
async fn handle(
    req: Request<Incoming>,
    shared: Arc<Shared>,
    guard: InflightGuard,
) -> Result<Response<PosBody>, Infallible> {
    let (parts, incoming) = req.into_parts();
    let ctx = ReqCtx {
        keep_alive: wants_keep_alive(parts.version, &parts.headers),
        head: parts.method == Method::HEAD,
        idle_timeout: shared.idle_timeout,
    };
    let reply = match Limited::new(incoming, MAX_BODY_BYTES).collect().await {
        Ok(collected) => route(&parts, collected.to_bytes(), &shared).await,
        Err(e) => {
            tracing::debug!(error = %e, "sample POS could not read a request body");
            let status = if e.is::<http_body_util::LengthLimitError>() {
                StatusCode::PAYLOAD_TOO_LARGE
            } else {
                StatusCode::BAD_REQUEST
            };
            let ctx = ReqCtx {
                keep_alive: false,
                ..ctx
            };
            let mut resp = Reply::bare(status).into_response(&ctx);
            resp.body_mut()._guard = Some(guard);
            return Ok(resp);
        }
    };
    let mut resp = reply.into_response(&ctx);
    resp.body_mut()._guard = Some(guard);
    Ok(resp)
}

/// Whether the client keeps the connection open (HTTP/1.1 unless `close`; HTTP/1.0 only with
/// `keep-alive`), so the answer's `Connection` header tells the truth like Node's does.
fn wants_keep_alive(version: Version, headers: &HeaderMap) -> bool {
    let mut close = false;
    let mut keep = false;
    for value in headers.get_all(header::CONNECTION) {
        if let Ok(s) = value.to_str() {
            for token in s.split(',') {
                let token = token.trim();
                close |= token.eq_ignore_ascii_case("close");
                keep |= token.eq_ignore_ascii_case("keep-alive");
            }
        }
    }
    match version {
        Version::HTTP_10 | Version::HTTP_09 => keep && !close,
        _ => !close,
    }
}

/// Whether `Accept-Encoding` allows gzip (a `gzip`, `x-gzip` or `*` coding with q > 0).
fn accepts_gzip(headers: &HeaderMap) -> bool {
    for value in headers.get_all(header::ACCEPT_ENCODING) {
        let Ok(s) = value.to_str() else { continue };
        for item in s.split(',') {
            let mut params = item.split(';');
            let coding = params.next().unwrap_or("").trim();
            if !(coding.eq_ignore_ascii_case("gzip")
                || coding.eq_ignore_ascii_case("x-gzip")
                || coding == "*")
            {
                continue;
            }
            let mut q = 1.0_f64;
            for p in params {
                if let Some((k, v)) = p.split_once('=') {
                    if k.trim().eq_ignore_ascii_case("q") {
                        q = v.trim().parse().unwrap_or(0.0);
                    }
                }
            }
            if q > 0.0 {
                return true;
            }
        }
    }
    false
}

/// Dispatches like the Next.js app: trailing-slash redirect, the `/api/sales` route handler,
/// 404 for other API paths, and an HTML page for everything else.
async fn route(parts: &http::request::Parts, body: Bytes, shared: &Arc<Shared>) -> Reply {
    let knobs = shared.knobs();
    let path = parts.uri.path();
    let record = |shared: &Shared| {
        lock(&shared.requests).push(RecordedRequest {
            method: parts.method.clone(),
            uri: parts.uri.clone(),
            headers: parts.headers.clone(),
            body: body.clone(),
        });
    };

    if path.len() > 1 && path.ends_with('/') {
        let trimmed = path.trim_end_matches('/');
        let target = if trimmed.is_empty() { "/" } else { trimmed };
        if target == "/api/sales" {
            record(shared);
        }
        let location = match parts.uri.query() {
            Some(q) => format!("{target}?{q}"),
            None => target.to_string(),
        };
        return Reply::redirect(&location);
    }

    if path == "/api/sales" {
        record(shared);
        return match parts.method {
            Method::POST => post_sale(body, shared, knobs).await,
            Method::GET | Method::HEAD => sale_history(parts.uri.query(), knobs.force_gzip),
            Method::OPTIONS => Reply::options(),
            _ => Reply::method_not_allowed(),
        };
    }

    if path == "/api" || path.starts_with("/api/") {
        return Reply::json(
            StatusCode::NOT_FOUND,
            r#"{"error":"Not found"}"#.to_string(),
            knobs.force_gzip,
        );
    }

    Reply::html(accepts_gzip(&parts.headers))
}

/// `GET /api/sales`: the POS's stub (pos-gzip-get.txt). JS: `parseInt(searchParams.get('limit')
/// || '50')`, same for `offset` with `'0'`.
fn sale_history(query: Option<&str>, force_gzip: bool) -> Reply {
    let param = |name: &str, default: &str| -> String {
        let value = query_param(query.unwrap_or(""), name).unwrap_or_default();
        let value = if value.is_empty() {
            default.to_string()
        } else {
            value
        };
        json_number(js_parse_int(&value))
    };
    let body = format!(
        r#"{{"message":"Sale history lookup not implemented","limit":{},"offset":{}}}"#,
        param("limit", "50"),
        param("offset", "0")
    );
    Reply::json(StatusCode::OK, body, force_gzip)
}

/// `URLSearchParams.get`: the first value of `name`, `+` and `%XX` decoded.
fn query_param(query: &str, name: &str) -> Option<String> {
    query.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (form_decode(k) == name).then(|| form_decode(v))
    })
}

fn form_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3])
                    .ok()
                    .and_then(|h| u8::from_str_radix(h, 16).ok());
                match hex {
                    Some(b) => {
                        out.push(b);
                        i += 2;
                    }
                    None => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// POST /api/sales. The decision runs in its own task, so a client that hangs up (say, a proxy
/// timing out) does not cancel the sale: like the real POS, the sale still completes.
async fn post_sale(body: Bytes, shared: &Arc<Shared>, knobs: Knobs) -> Reply {
    let now = OffsetDateTime::now_utc();
    let sale_id = format!("POS_{}_{}", unix_millis(now), shared.random_suffix());
    let task_shared = Arc::clone(shared);
    let task = tokio::spawn(async move {
        if !knobs.sale_delay.is_zero() {
            tokio::time::sleep(knobs.sale_delay).await;
        }
        let outcome = process_sale(&body, knobs.inventory, &sale_id, OffsetDateTime::now_utc());
        if outcome.completed {
            lock(&task_shared.sales).push(sale_id);
        }
        outcome
    });
    match task.await {
        Ok(outcome) => Reply::json(outcome.status, outcome.body, knobs.force_gzip),
        Err(e) => {
            tracing::debug!(error = %e, "sample POS sale task failed");
            Reply::json(
                StatusCode::INTERNAL_SERVER_ERROR,
                sale_error_body("Internal error"),
                knobs.force_gzip,
            )
        }
    }
}

/// What the POS decided for one POST /api/sales body.
#[derive(Debug)]
struct SaleOutcome {
    status: StatusCode,
    body: String,
    completed: bool,
}

impl SaleOutcome {
    fn failed(status: StatusCode, body: String) -> Self {
        SaleOutcome {
            status,
            body,
            completed: false,
        }
    }
}

fn sale_error_body(details: &str) -> String {
    JsonObj::new()
        .str("error", SALE_ERROR)
        .str("details", details)
        .end()
}

fn sale_error(details: &str) -> SaleOutcome {
    SaleOutcome::failed(StatusCode::INTERNAL_SERVER_ERROR, sale_error_body(details))
}

fn inventory_error(details: &str) -> SaleOutcome {
    SaleOutcome::failed(
        StatusCode::INTERNAL_SERVER_ERROR,
        JsonObj::new()
            .raw("success", "false")
            .str("error", INVENTORY_ERROR)
            .str("details", details)
            .end(),
    )
}

/// The POS's route handler, step by step as its JavaScript does it:
/// `const body = await request.json(); const {items, total, ...} = body;`
/// `if (!items || items.length === 0) 400; if (!total || total <= 0) 400;`
/// then `items.filter(item => item.type === 'product')` and one inventory update per product.
fn process_sale(
    raw: &[u8],
    mode: InventoryMode,
    sale_id: &str,
    now: OffsetDateTime,
) -> SaleOutcome {
    // `request.json()`: UTF-8 decode (replacing bad bytes, dropping a BOM), then `JSON.parse`.
    let text = String::from_utf8_lossy(raw);
    let text = text.strip_prefix('\u{feff}').unwrap_or(&text);
    let src: Vec<u16> = text.encode_utf16().collect();
    let body = match parse_json(&src) {
        Ok(v) => v,
        Err(msg) => return sale_error(&msg),
    };
    if matches!(body.kind, JKind::Null) {
        return sale_error("Cannot destructure property 'items' of 'body' as it is null.");
    }
    let items = body.get("items");
    let total = body.get("total");

    let Some(items) = items.filter(|v| v.truthy() && !v.length_is_zero()) else {
        return SaleOutcome::failed(
            StatusCode::BAD_REQUEST,
            r#"{"error":"No items in sale transaction"}"#.to_string(),
        );
    };
    let invalid_total = || {
        SaleOutcome::failed(
            StatusCode::BAD_REQUEST,
            r#"{"error":"Invalid sale total"}"#.to_string(),
        )
    };
    match total {
        Some(t) if t.truthy() => match js_to_number(t) {
            Ok(n) if n <= 0.0 => return invalid_total(),
            Ok(_) => {}
            Err(e) => return sale_error(&e),
        },
        _ => return invalid_total(),
    }

    // `items.filter(item => item.type === 'product')`
    let JKind::Arr(elements) = &items.kind else {
        return inventory_error("items.filter is not a function");
    };
    let mut products = Vec::new();
    for item in elements {
        match &item.kind {
            JKind::Null => {
                return inventory_error("Cannot read properties of null (reading 'type')")
            }
            JKind::Obj(_) if item.get("type").is_some_and(|t| t.is_str("product")) => {
                products.push(item);
            }
            _ => {}
        }
    }

    let millis = unix_millis(now);
    let mut transactions = Vec::new();
    let mut stock_updates = Vec::new();
    let mut warnings = Vec::new();
    let mut failed = 0usize;
    for item in &products {
        let id = item.get("id");
        let id_raw = id.map(|v| v.compact(&src));
        match mode {
            InventoryMode::AllOk => {
                transactions.push(
                    JsonObj::new()
                        .opt_raw("item_id", id_raw.as_deref())
                        .str("transaction_id", &format!("tx-{millis}"))
                        .raw("success", "true")
                        .end(),
                );
                let quantity = item
                    .get("quantity")
                    .map_or(Ok(f64::NAN), js_to_number)
                    .unwrap_or(f64::NAN);
                stock_updates.push(
                    JsonObj::new()
                        .raw("success", "true")
                        .opt_raw("item_id", id_raw.as_deref())
                        .raw("previous_quantity", &json_number(SIMULATED_STOCK))
                        .raw("new_quantity", &json_number(SIMULATED_STOCK - quantity))
                        .end(),
                );
            }
            InventoryMode::NotConfigured | InventoryMode::Failing => {
                let err = if mode == InventoryMode::NotConfigured {
                    ERR_NOT_CONFIGURED
                } else {
                    ERR_FETCH_FAILED
                };
                failed += 1;
                transactions.push(
                    JsonObj::new()
                        .opt_raw("item_id", id_raw.as_deref())
                        .raw("success", "false")
                        .str("error", err)
                        .end(),
                );
                stock_updates.push(
                    JsonObj::new()
                        .raw("success", "false")
                        .opt_raw("item_id", id_raw.as_deref())
                        .str("error", err)
                        .end(),
                );
                // A template literal: `Inventory update failed for item ${item.id}: ${error}`.
                let id_text = match js_to_string(id) {
                    Ok(s) => s,
                    Err(e) => return sale_error(&e),
                };
                warnings.push(json_string(&format!(
                    "Inventory update failed for item {id_text}: {err}"
                )));
            }
        }
    }

    let succeeded = products.len() - failed;
    let summary = JsonObj::new()
        .raw("total_items", &products.len().to_string())
        .raw("successful_updates", &succeeded.to_string())
        .raw("failed_updates", &failed.to_string())
        .end();
    let (status, message) = if failed == 0 {
        (StatusCode::OK, MSG_ALL_OK.to_string())
    } else if mode == InventoryMode::NotConfigured {
        (StatusCode::MULTI_STATUS, MSG_NOT_CONFIGURED.to_string())
    } else {
        (
            StatusCode::MULTI_STATUS,
            format!("Sale completed successfully ({failed} inventory updates failed)"),
        )
    };

    let mut record = JsonObj::new()
        .str("id", sale_id)
        .str("timestamp", &iso_millis(now));
    for key in [
        "items",
        "subtotal",
        "tax",
        "total",
        "paymentMethod",
        "user",
        "warehouseId",
        "customerId",
    ] {
        if let Some(v) = body.get(key) {
            record = record.raw(key, &v.compact(&src));
        }
    }
    let record = record
        .raw("inventoryTransactions", &json_array(&transactions))
        .raw("stockUpdates", &json_array(&stock_updates))
        .raw("inventorySummary", &summary)
        .end();
    let inventory_status = JsonObj::new()
        .raw(
            "serviceAvailable",
            bool_str(mode != InventoryMode::NotConfigured),
        )
        .raw("updatesSuccessful", bool_str(failed == 0))
        .raw("summary", &summary)
        .end();
    let mut out = JsonObj::new()
        .raw("success", "true")
        .str("saleId", sale_id)
        .str("message", &message)
        .raw("saleRecord", &record)
        .raw("inventoryStatus", &inventory_status);
    if !warnings.is_empty() {
        out = out.raw("warnings", &json_array(&warnings));
    }
    SaleOutcome {
        status,
        body: out.end(),
        completed: true,
    }
}

// ---------------------------------------------------------------------------------------------
// JSON output, in a fixed key order (serde_json's map would sort the keys).

/// Builds a JSON object from already-serialised values, keeping insertion order.
struct JsonObj(String);

impl JsonObj {
    fn new() -> Self {
        JsonObj(String::from("{"))
    }

    fn raw(mut self, key: &str, value: &str) -> Self {
        if self.0.len() > 1 {
            self.0.push(',');
        }
        self.0.push_str(&json_string(key));
        self.0.push(':');
        self.0.push_str(value);
        self
    }

    fn str(self, key: &str, value: &str) -> Self {
        let v = json_string(value);
        self.raw(key, &v)
    }

    /// `JSON.stringify` drops keys whose value is `undefined`.
    fn opt_raw(self, key: &str, value: Option<&str>) -> Self {
        match value {
            Some(v) => self.raw(key, v),
            None => self,
        }
    }

    fn end(mut self) -> String {
        self.0.push('}');
        self.0
    }
}

fn json_array(values: &[String]) -> String {
    format!("[{}]", values.join(","))
}

fn json_string(s: &str) -> String {
    // Serialising a `str` cannot fail; the escapes match `JSON.stringify`.
    serde_json::to_string(s).unwrap_or_else(|_| String::from("\"\""))
}

fn bool_str(b: bool) -> &'static str {
    if b {
        "true"
    } else {
        "false"
    }
}

/// `JSON.stringify(number)`: JS formatting, `null` for NaN and infinities.
fn json_number(n: f64) -> String {
    if n.is_finite() {
        js_number_to_string(n)
    } else {
        String::from("null")
    }
}

// ---------------------------------------------------------------------------------------------
// Time.

fn unix_millis(t: OffsetDateTime) -> i128 {
    t.unix_timestamp_nanos().div_euclid(1_000_000)
}

/// `Date.prototype.toISOString()`: `2026-11-25T06:06:31.062Z`.
fn iso_millis(t: OffsetDateTime) -> String {
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second(),
        t.millisecond()
    )
}

/// The HTTP `Date` format: `Wed, 25 Nov 2026 06:06:31 GMT`.
fn http_date(t: OffsetDateTime) -> String {
    const DAYS: [&str; 7] = ["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"];
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let day = DAYS[usize::from(t.weekday().number_days_from_monday()) % 7];
    let month = MONTHS[(usize::from(u8::from(t.month())) + 11) % 12];
    format!(
        "{day}, {:02} {month} {:04} {:02}:{:02}:{:02} GMT",
        t.day(),
        t.year(),
        t.hour(),
        t.minute(),
        t.second()
    )
}

// ---------------------------------------------------------------------------------------------
// A JSON parser with V8's `JSON.parse` error messages and JS value semantics. Each node keeps
// the span of its source text, so values can be echoed exactly as received.

#[derive(Debug)]
struct JNode {
    start: usize,
    end: usize,
    kind: JKind,
}

#[derive(Debug)]
enum JKind {
    Null,
    Bool(bool),
    Num(f64),
    Str(Vec<u16>),
    Arr(Vec<JNode>),
    Obj(Vec<(Vec<u16>, JNode)>),
}

impl JNode {
    /// Own property lookup; with duplicate keys the last one wins, as in `JSON.parse`.
    fn get(&self, key: &str) -> Option<&JNode> {
        let JKind::Obj(members) = &self.kind else {
            return None;
        };
        let key: Vec<u16> = key.encode_utf16().collect();
        members
            .iter()
            .rev()
            .find(|(k, _)| *k == key)
            .map(|(_, v)| v)
    }

    fn is_str(&self, s: &str) -> bool {
        matches!(&self.kind, JKind::Str(v) if v.iter().copied().eq(s.encode_utf16()))
    }

    /// JS truthiness.
    fn truthy(&self) -> bool {
        match &self.kind {
            JKind::Null => false,
            JKind::Bool(b) => *b,
            JKind::Num(n) => *n != 0.0 && !n.is_nan(),
            JKind::Str(s) => !s.is_empty(),
            JKind::Arr(_) | JKind::Obj(_) => true,
        }
    }

    /// `value.length === 0` (only arrays, strings, and objects with an own `length: 0`).
    fn length_is_zero(&self) -> bool {
        match &self.kind {
            JKind::Arr(a) => a.is_empty(),
            JKind::Str(s) => s.is_empty(),
            JKind::Obj(_) => self
                .get("length")
                .is_some_and(|l| matches!(l.kind, JKind::Num(n) if n == 0.0)),
            _ => false,
        }
    }

    /// The node's source text without insignificant whitespace (what `JSON.stringify` would
    /// lay out), every literal kept verbatim.
    fn compact(&self, src: &[u16]) -> String {
        let slice = src.get(self.start..self.end).unwrap_or(&[]);
        let mut out = Vec::with_capacity(slice.len());
        let mut in_string = false;
        let mut escaped = false;
        for &c in slice {
            if in_string {
                out.push(c);
                if escaped {
                    escaped = false;
                } else if c == u16::from(b'\\') {
                    escaped = true;
                } else if c == u16::from(b'"') {
                    in_string = false;
                }
            } else if !is_json_ws(c) {
                if c == u16::from(b'"') {
                    in_string = true;
                }
                out.push(c);
            }
        }
        String::from_utf16_lossy(&out)
    }
}

fn is_json_ws(c: u16) -> bool {
    matches!(c, 0x20 | 0x09 | 0x0A | 0x0D)
}

fn is_digit(c: u16) -> bool {
    (u16::from(b'0')..=u16::from(b'9')).contains(&c)
}

const fn ch(c: u8) -> u16 {
    c as u16
}

fn parse_json(src: &[u16]) -> Result<JNode, String> {
    let mut p = JsonParser { s: src, pos: 0 };
    let value = p.value(0)?;
    p.skip_ws();
    if p.pos < src.len() {
        return Err(format!(
            "Unexpected non-whitespace character after JSON at position {}",
            p.pos
        ));
    }
    Ok(value)
}

struct JsonParser<'a> {
    s: &'a [u16],
    pos: usize,
}

impl JsonParser<'_> {
    fn peek(&self) -> Option<u16> {
        self.s.get(self.pos).copied()
    }

    fn skip_ws(&mut self) {
        while self.peek().is_some_and(is_json_ws) {
            self.pos += 1;
        }
    }

    fn at(&self, what: &str) -> String {
        format!("{what} in JSON at position {}", self.pos)
    }

    /// V8's message for an unexpected character at the cursor (no specific expectation).
    fn unexpected(&self) -> String {
        let Some(c) = self.peek() else {
            return String::from("Unexpected end of JSON input");
        };
        if c == ch(b'"') {
            return self.at("Unexpected string");
        }
        if c == ch(b'-') || is_digit(c) {
            return self.at("Unexpected number");
        }
        let whole = String::from_utf16_lossy(self.s);
        if matches!(
            whole.as_str(),
            "[object Object]" | "undefined" | "Infinity" | "NaN"
        ) {
            return format!("\"{whole}\" is not valid JSON");
        }
        let token = String::from_utf16_lossy(&[c]);
        const CONTEXT: usize = 10;
        let len = self.s.len();
        let pos = self.pos;
        let window = |a: usize, b: usize| String::from_utf16_lossy(&self.s[a..b.min(len)]);
        if len <= CONTEXT * 2 + 1 {
            format!("Unexpected token '{token}', \"{whole}\" is not valid JSON")
        } else if pos < CONTEXT {
            format!(
                "Unexpected token '{token}', \"{}\"... is not valid JSON",
                window(0, pos + CONTEXT)
            )
        } else if pos < len - CONTEXT {
            format!(
                "Unexpected token '{token}', ...\"{}\"... is not valid JSON",
                window(pos - CONTEXT, pos + CONTEXT)
            )
        } else {
            format!(
                "Unexpected token '{token}', ...\"{}\" is not valid JSON",
                window(pos - CONTEXT, len)
            )
        }
    }

    fn value(&mut self, depth: usize) -> Result<JNode, String> {
        if depth > MAX_JSON_DEPTH {
            return Err(String::from("Maximum call stack size exceeded"));
        }
        self.skip_ws();
        let start = self.pos;
        let kind = match self.peek() {
            Some(c) if c == ch(b'"') => JKind::Str(self.string()?),
            Some(c) if c == ch(b'-') || is_digit(c) => JKind::Num(self.number()?),
            Some(c) if c == ch(b'{') => JKind::Obj(self.object(depth)?),
            Some(c) if c == ch(b'[') => JKind::Arr(self.array(depth)?),
            Some(c) if c == ch(b't') => {
                self.literal("true")?;
                JKind::Bool(true)
            }
            Some(c) if c == ch(b'f') => {
                self.literal("false")?;
                JKind::Bool(false)
            }
            Some(c) if c == ch(b'n') => {
                self.literal("null")?;
                JKind::Null
            }
            _ => return Err(self.unexpected()),
        };
        Ok(JNode {
            start,
            end: self.pos,
            kind,
        })
    }

    fn literal(&mut self, word: &str) -> Result<(), String> {
        for (i, expected) in word.bytes().enumerate().skip(1) {
            let at = self.pos + i;
            match self.s.get(at) {
                None => {
                    self.pos = at;
                    return Err(self.unexpected());
                }
                Some(&c) if c != u16::from(expected) => {
                    self.pos = at;
                    return Err(self.unexpected());
                }
                Some(_) => {}
            }
        }
        self.pos += word.len();
        Ok(())
    }

    fn number(&mut self) -> Result<f64, String> {
        let start = self.pos;
        if self.peek() == Some(ch(b'-')) {
            self.pos += 1;
        }
        match self.peek() {
            Some(c) if c == ch(b'0') => {
                self.pos += 1;
                if self.peek().is_some_and(is_digit) {
                    return Err(self.at("Unexpected number"));
                }
            }
            Some(c) if is_digit(c) => {
                while self.peek().is_some_and(is_digit) {
                    self.pos += 1;
                }
            }
            _ => return Err(self.at("No number after minus sign")),
        }
        if self.peek() == Some(ch(b'.')) {
            self.pos += 1;
            if !self.peek().is_some_and(is_digit) {
                return Err(self.at("Unterminated fractional number"));
            }
            while self.peek().is_some_and(is_digit) {
                self.pos += 1;
            }
        }
        if matches!(self.peek(), Some(c) if c == ch(b'e') || c == ch(b'E')) {
            self.pos += 1;
            if matches!(self.peek(), Some(c) if c == ch(b'+') || c == ch(b'-')) {
                self.pos += 1;
            }
            if !self.peek().is_some_and(is_digit) {
                return Err(self.at("Exponent part is missing a number"));
            }
            while self.peek().is_some_and(is_digit) {
                self.pos += 1;
            }
        }
        let text = String::from_utf16_lossy(&self.s[start..self.pos]);
        Ok(text.parse::<f64>().unwrap_or(f64::NAN))
    }

    /// Scans a string starting at its opening quote; returns its UTF-16 contents.
    fn string(&mut self) -> Result<Vec<u16>, String> {
        self.pos += 1;
        let mut out = Vec::new();
        loop {
            let Some(c) = self.peek() else {
                return Err(self.at("Unterminated string"));
            };
            if c == ch(b'"') {
                self.pos += 1;
                return Ok(out);
            }
            if c < 0x20 {
                return Err(self.at("Bad control character in string literal"));
            }
            if c != ch(b'\\') {
                out.push(c);
                self.pos += 1;
                continue;
            }
            self.pos += 1;
            let Some(e) = self.peek() else {
                return Err(self.at("Unterminated string"));
            };
            let decoded = match u8::try_from(e).unwrap_or(0) {
                b'"' => ch(b'"'),
                b'\\' => ch(b'\\'),
                b'/' => ch(b'/'),
                b'b' => 0x08,
                b'f' => 0x0C,
                b'n' => 0x0A,
                b'r' => 0x0D,
                b't' => 0x09,
                b'u' => {
                    let mut v: u16 = 0;
                    for i in 1..=4 {
                        let digit = self
                            .s
                            .get(self.pos + i)
                            .and_then(|&h| char::from_u32(u32::from(h)))
                            .and_then(|h| h.to_digit(16));
                        match digit {
                            Some(d) => v = v * 16 + d as u16,
                            None => {
                                self.pos += i;
                                return Err(if self.pos >= self.s.len() {
                                    self.at("Unterminated string")
                                } else {
                                    self.at("Bad Unicode escape")
                                });
                            }
                        }
                    }
                    self.pos += 4;
                    v
                }
                _ => return Err(self.at("Bad escaped character")),
            };
            out.push(decoded);
            self.pos += 1;
        }
    }

    fn object(&mut self, depth: usize) -> Result<Vec<(Vec<u16>, JNode)>, String> {
        self.pos += 1;
        let mut members = Vec::new();
        self.skip_ws();
        if self.peek() == Some(ch(b'}')) {
            self.pos += 1;
            return Ok(members);
        }
        if self.peek() != Some(ch(b'"')) {
            return Err(self.at("Expected property name or '}'"));
        }
        loop {
            let key = self.string()?;
            self.skip_ws();
            if self.peek() != Some(ch(b':')) {
                return Err(self.at("Expected ':' after property name"));
            }
            self.pos += 1;
            let value = self.value(depth + 1)?;
            members.push((key, value));
            self.skip_ws();
            match self.peek() {
                Some(c) if c == ch(b',') => {
                    self.pos += 1;
                    self.skip_ws();
                    if self.peek() != Some(ch(b'"')) {
                        return Err(self.at("Expected double-quoted property name"));
                    }
                }
                Some(c) if c == ch(b'}') => {
                    self.pos += 1;
                    return Ok(members);
                }
                _ => return Err(self.at("Expected ',' or '}' after property value")),
            }
        }
    }

    fn array(&mut self, depth: usize) -> Result<Vec<JNode>, String> {
        self.pos += 1;
        let mut elements = Vec::new();
        self.skip_ws();
        if self.peek() == Some(ch(b']')) {
            self.pos += 1;
            return Ok(elements);
        }
        loop {
            elements.push(self.value(depth + 1)?);
            self.skip_ws();
            match self.peek() {
                Some(c) if c == ch(b',') => self.pos += 1,
                Some(c) if c == ch(b']') => {
                    self.pos += 1;
                    return Ok(elements);
                }
                _ => return Err(self.at("Expected ',' or ']' after array element")),
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// JS conversions used by the handler's checks.

const TO_PRIMITIVE_ERROR: &str = "Cannot convert object to primitive value";

/// `ToString(value)` as in a template literal; `None` is `undefined`.
/// An object with an own (necessarily non-callable) `toString` cannot be converted: TypeError.
fn js_to_string(v: Option<&JNode>) -> Result<String, String> {
    let Some(v) = v else {
        return Ok(String::from("undefined"));
    };
    Ok(match &v.kind {
        JKind::Null => String::from("null"),
        JKind::Bool(b) => bool_str(*b).to_string(),
        JKind::Num(n) => js_number_to_string(*n),
        JKind::Str(s) => String::from_utf16_lossy(s),
        JKind::Arr(elements) => {
            // `Array.prototype.join`: null and undefined become "".
            let mut parts = Vec::with_capacity(elements.len());
            for e in elements {
                parts.push(match e.kind {
                    JKind::Null => String::new(),
                    _ => js_to_string(Some(e))?,
                });
            }
            parts.join(",")
        }
        JKind::Obj(_) => {
            if v.get("toString").is_some() {
                return Err(TO_PRIMITIVE_ERROR.to_string());
            }
            String::from("[object Object]")
        }
    })
}

/// `ToNumber(value)` (after `ToPrimitive` for arrays and objects).
fn js_to_number(v: &JNode) -> Result<f64, String> {
    Ok(match &v.kind {
        JKind::Null => 0.0,
        JKind::Bool(b) => f64::from(u8::from(*b)),
        JKind::Num(n) => *n,
        JKind::Str(s) => js_string_to_number(&String::from_utf16_lossy(s)),
        JKind::Arr(_) | JKind::Obj(_) => js_string_to_number(&js_to_string(Some(v))?),
    })
}

fn is_js_whitespace(c: char) -> bool {
    matches!(
        c,
        '\u{9}' | '\u{a}' | '\u{b}' | '\u{c}' | '\u{d}' | ' ' | '\u{a0}' | '\u{1680}' | '\u{2000}'
            ..='\u{200a}'
                | '\u{2028}'
                | '\u{2029}'
                | '\u{202f}'
                | '\u{205f}'
                | '\u{3000}'
                | '\u{feff}'
    )
}

/// JS `Number(string)`.
fn js_string_to_number(s: &str) -> f64 {
    let t = s.trim_matches(is_js_whitespace);
    if t.is_empty() {
        return 0.0;
    }
    match t {
        "Infinity" | "+Infinity" => return f64::INFINITY,
        "-Infinity" => return f64::NEG_INFINITY,
        _ => {}
    }
    for (prefix, radix) in [
        ("0x", 16),
        ("0X", 16),
        ("0o", 8),
        ("0O", 8),
        ("0b", 2),
        ("0B", 2),
    ] {
        if let Some(digits) = t.strip_prefix(prefix) {
            return parse_radix(digits, radix).unwrap_or(f64::NAN);
        }
    }
    // Rust's float grammar equals JS's StrDecimalLiteral once words like "inf" are excluded.
    if t.chars()
        .all(|c| c.is_ascii_digit() || matches!(c, '+' | '-' | '.' | 'e' | 'E'))
    {
        t.parse().unwrap_or(f64::NAN)
    } else {
        f64::NAN
    }
}

/// All of `digits` in `radix`; `None` when empty or when a character is not a digit.
fn parse_radix(digits: &str, radix: u32) -> Option<f64> {
    if digits.is_empty() {
        return None;
    }
    digits.chars().try_fold(0.0_f64, |acc, c| {
        c.to_digit(radix)
            .map(|d| acc * f64::from(radix) + f64::from(d))
    })
}

/// JS `parseInt(string)` without a radix (so `0x` means hexadecimal).
fn js_parse_int(s: &str) -> f64 {
    let t = s.trim_start_matches(is_js_whitespace);
    let (negative, t) = match t.as_bytes().first() {
        Some(b'-') => (true, &t[1..]),
        Some(b'+') => (false, &t[1..]),
        _ => (false, t),
    };
    let (radix, t) = match t.get(..2) {
        Some("0x") | Some("0X") => (16, &t[2..]),
        _ => (10, t),
    };
    let end = t
        .char_indices()
        .find(|(_, c)| !c.is_digit(radix))
        .map_or(t.len(), |(i, _)| i);
    let digits = &t[..end];
    let value = if radix == 10 {
        // Exact decimal rounding, as V8 does for base 10.
        digits.parse::<f64>().ok()
    } else {
        parse_radix(digits, radix)
    };
    match value {
        Some(v) if negative => -v,
        Some(v) => v,
        None => f64::NAN,
    }
}

/// `Number.prototype.toString()`: shortest round-trip digits, JS's exponent rules.
fn js_number_to_string(n: f64) -> String {
    if n.is_nan() {
        return String::from("NaN");
    }
    if n.is_infinite() {
        return String::from(if n > 0.0 { "Infinity" } else { "-Infinity" });
    }
    if n == 0.0 {
        return String::from("0");
    }
    let sign = if n < 0.0 { "-" } else { "" };
    // `{:e}` gives the shortest digits that round-trip, e.g. "1.2345e-7".
    let sci = format!("{:e}", n.abs());
    let (mantissa, exp) = sci.split_once('e').unwrap_or((sci.as_str(), "0"));
    let digits: String = mantissa.chars().filter(|c| *c != '.').collect();
    let exp: i64 = exp.parse().unwrap_or(0);
    let k = digits.len() as i64;
    let point = exp + 1; // value = 0.DIGITS × 10^point
    let body = if k <= point && point <= 21 {
        format!("{digits}{}", "0".repeat((point - k) as usize))
    } else if 0 < point && point <= 21 {
        let (int, frac) = digits.split_at(point as usize);
        format!("{int}.{frac}")
    } else if -6 < point && point <= 0 {
        format!("0.{}{digits}", "0".repeat((-point) as usize))
    } else {
        let e = point - 1;
        let e_sign = if e < 0 { '-' } else { '+' };
        let (first, rest) = digits.split_at(1);
        if rest.is_empty() {
            format!("{first}e{e_sign}{}", e.abs())
        } else {
            format!("{first}.{rest}e{e_sign}{}", e.abs())
        }
    };
    format!("{sign}{body}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read as _;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Upper bound for any single network wait, so a broken server fails a test instead of
    /// hanging it.
    const WAIT: Duration = Duration::from_secs(10);

    /// Verbatim from `shared/pos-samples/`.
    const SALE_WITH_CUSTOMER: &str = r#"{"items":[{"id":"test-product-1","name":"Test Coffee","price":4.5,"quantity":2,"type":"product"},{"id":"test-service-1","name":"Gift Wrapping","price":1,"quantity":1,"type":"service"}],"subtotal":10,"tax":1,"total":11,"paymentMethod":"Credit Card","user":"test-cashier","warehouseId":"WH1","customerId":"customer-123","customerName":"John Doe","currency":"USD"}"#;

    /// Verbatim from `shared/pos-samples/`.
    const SALE_NO_CUSTOMER: &str = r#"{"items":[{"id":"test-product-1","name":"Test Coffee","price":4.5,"quantity":2,"type":"product"},{"id":"test-service-1","name":"Gift Wrapping","price":1,"quantity":1,"type":"service"}],"subtotal":10,"tax":1,"total":11,"paymentMethod":"Cash","user":"test-cashier","warehouseId":"WH1"}"#;

    /// Verbatim from `shared/pos-samples/`.
    const CAPTURE_WITH_CUSTOMER: &str = r#"{"success":true,"saleId":"POS_1795586791062_cnttqx05g","message":"Sale completed successfully (inventory service unavailable - manual stock adjustment may be required)","saleRecord":{"id":"POS_1795586791062_cnttqx05g","timestamp":"2026-11-25T06:06:31.062Z","items":[{"id":"test-product-1","name":"Test Coffee","price":4.5,"quantity":2,"type":"product"},{"id":"test-service-1","name":"Gift Wrapping","price":1,"quantity":1,"type":"service"}],"subtotal":10,"tax":1,"total":11,"paymentMethod":"Credit Card","user":"test-cashier","warehouseId":"WH1","customerId":"customer-123","inventoryTransactions":[{"item_id":"test-product-1","success":false,"error":"Inventory service not configured"}],"stockUpdates":[{"success":false,"item_id":"test-product-1","error":"Inventory service not configured"}],"inventorySummary":{"total_items":1,"successful_updates":0,"failed_updates":1}},"inventoryStatus":{"serviceAvailable":false,"updatesSuccessful":false,"summary":{"total_items":1,"successful_updates":0,"failed_updates":1}},"warnings":["Inventory update failed for item test-product-1: Inventory service not configured"]}"#;

    /// Verbatim from `shared/pos-samples/`.
    const CAPTURE_NO_CUSTOMER: &str = r#"{"success":true,"saleId":"POS_1795586791075_fix4xiksh","message":"Sale completed successfully (inventory service unavailable - manual stock adjustment may be required)","saleRecord":{"id":"POS_1795586791075_fix4xiksh","timestamp":"2026-11-25T06:06:31.075Z","items":[{"id":"test-product-1","name":"Test Coffee","price":4.5,"quantity":2,"type":"product"},{"id":"test-service-1","name":"Gift Wrapping","price":1,"quantity":1,"type":"service"}],"subtotal":10,"tax":1,"total":11,"paymentMethod":"Cash","user":"test-cashier","warehouseId":"WH1","inventoryTransactions":[{"item_id":"test-product-1","success":false,"error":"Inventory service not configured"}],"stockUpdates":[{"success":false,"item_id":"test-product-1","error":"Inventory service not configured"}],"inventorySummary":{"total_items":1,"successful_updates":0,"failed_updates":1}},"inventoryStatus":{"serviceAvailable":false,"updatesSuccessful":false,"summary":{"total_items":1,"successful_updates":0,"failed_updates":1}},"warnings":["Inventory update failed for item test-product-1: Inventory service not configured"]}"#;

    /// Verbatim from `shared/pos-samples/`.
    const CAPTURE_INVOK: &str = r#"{"success":true,"saleId":"POS_1795586808643_z4l0zrcdg","message":"Sale completed successfully with all inventory updates","saleRecord":{"id":"POS_1795586808643_z4l0zrcdg","timestamp":"2026-11-25T06:06:48.660Z","items":[{"id":"test-product-1","name":"Test Coffee","price":4.5,"quantity":2,"type":"product"},{"id":"test-service-1","name":"Gift Wrapping","price":1,"quantity":1,"type":"service"}],"subtotal":10,"tax":1,"total":11,"paymentMethod":"Credit Card","user":"test-cashier","warehouseId":"WH1","customerId":"customer-123","inventoryTransactions":[{"item_id":"test-product-1","transaction_id":"tx-1795586808652","success":true}],"stockUpdates":[{"success":true,"item_id":"test-product-1","previous_quantity":10,"new_quantity":8}],"inventorySummary":{"total_items":1,"successful_updates":1,"failed_updates":0}},"inventoryStatus":{"serviceAvailable":true,"updatesSuccessful":true,"summary":{"total_items":1,"successful_updates":1,"failed_updates":0}}}"#;

    /// Verbatim from `shared/pos-samples/`.
    const CAPTURE_INVDOWN: &str = r#"{"success":true,"saleId":"POS_1795586813340_jlxfm6r9i","message":"Sale completed successfully (1 inventory updates failed)","saleRecord":{"id":"POS_1795586813340_jlxfm6r9i","timestamp":"2026-11-25T06:06:53.343Z","items":[{"id":"test-product-1","name":"Test Coffee","price":4.5,"quantity":2,"type":"product"},{"id":"test-service-1","name":"Gift Wrapping","price":1,"quantity":1,"type":"service"}],"subtotal":10,"tax":1,"total":11,"paymentMethod":"Credit Card","user":"test-cashier","warehouseId":"WH1","customerId":"customer-123","inventoryTransactions":[{"item_id":"test-product-1","success":false,"error":"fetch failed"}],"stockUpdates":[{"success":false,"item_id":"test-product-1","error":"fetch failed"}],"inventorySummary":{"total_items":1,"successful_updates":0,"failed_updates":1}},"inventoryStatus":{"serviceAvailable":true,"updatesSuccessful":false,"summary":{"total_items":1,"successful_updates":0,"failed_updates":1}},"warnings":["Inventory update failed for item test-product-1: fetch failed"]}"#;

    const NO_ITEMS: &str = r#"{"error":"No items in sale transaction"}"#;
    const INVALID_TOTAL: &str = r#"{"error":"Invalid sale total"}"#;

    /// A parsed HTTP/1.1 response as it came off the socket.
    #[derive(Debug)]
    struct RawResp {
        status_line: String,
        status: u16,
        headers: Vec<(String, String)>,
        body: Vec<u8>,
        chunked: bool,
    }

    impl RawResp {
        fn header(&self, name: &str) -> Option<&str> {
            self.headers
                .iter()
                .find(|(n, _)| n.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.as_str())
        }

        fn names(&self) -> Vec<String> {
            self.headers
                .iter()
                .map(|(n, _)| n.to_ascii_lowercase())
                .collect()
        }

        fn text(&self) -> String {
            String::from_utf8(self.body.clone()).expect("utf-8 body")
        }

        fn gunzipped(&self) -> String {
            let mut out = String::new();
            flate2::read::GzDecoder::new(&self.body[..])
                .read_to_string(&mut out)
                .expect("valid gzip body");
            out
        }

        /// The framing Node uses for a streamed answer.
        fn assert_chunked(&self) {
            assert!(self.chunked, "expected chunked framing: {self:?}");
            assert_eq!(self.header("transfer-encoding"), Some("chunked"));
            assert_eq!(self.header("content-length"), None);
        }

        /// `vary`, `content-type: application/json`, then Node's connection headers.
        fn assert_json_headers(&self) {
            assert_eq!(self.header("vary"), Some(NEXT_VARY));
            assert_eq!(self.header("content-type"), Some("application/json"));
            assert_eq!(self.header("connection"), Some("keep-alive"));
            assert_eq!(self.header("keep-alive"), Some("timeout=5"));
            assert_eq!(self.header("content-encoding"), None);
            assert_date(self.header("date").expect("date header"));
            self.assert_chunked();
        }
    }

    fn assert_date(date: &str) {
        // e.g. "Wed, 25 Nov 2026 06:06:31 GMT"
        assert_eq!(date.len(), 29, "{date}");
        assert!(date.ends_with(" GMT"), "{date}");
        assert_eq!(&date[3..5], ", ", "{date}");
    }

    /// A raw HTTP/1.1 client over one TCP connection, to see framing and connection handling
    /// exactly as a proxy would.
    struct RawConn {
        stream: TcpStream,
        buf: Vec<u8>,
    }

    impl RawConn {
        async fn open(pos: &SamplePos) -> RawConn {
            let stream = tokio::time::timeout(WAIT, TcpStream::connect(pos.addr()))
                .await
                .expect("connect in time")
                .expect("connect");
            RawConn {
                stream,
                buf: Vec::new(),
            }
        }

        async fn send(&mut self, data: &[u8]) {
            self.stream.write_all(data).await.expect("write");
        }

        /// Reads more bytes; false on EOF (or a reset, which is also a close).
        async fn more(&mut self) -> bool {
            let mut tmp = [0u8; 8192];
            match tokio::time::timeout(WAIT, self.stream.read(&mut tmp))
                .await
                .expect("no answer in time")
            {
                Ok(0) | Err(_) => false,
                Ok(n) => {
                    self.buf.extend_from_slice(&tmp[..n]);
                    true
                }
            }
        }

        async fn take_until(&mut self, pat: &[u8]) -> Vec<u8> {
            loop {
                if let Some(i) = self.buf.windows(pat.len()).position(|w| w == pat) {
                    let out = self.buf[..i].to_vec();
                    self.buf.drain(..i + pat.len());
                    return out;
                }
                assert!(self.more().await, "connection closed before {pat:?}");
            }
        }

        async fn take(&mut self, n: usize) -> Vec<u8> {
            while self.buf.len() < n {
                assert!(self.more().await, "connection closed inside a body");
            }
            self.buf.drain(..n).collect()
        }

        /// Reads one final response (skipping `100 Continue`).
        async fn response(&mut self, head_request: bool) -> RawResp {
            loop {
                let head = String::from_utf8(self.take_until(b"\r\n\r\n").await).expect("head");
                let mut lines = head.split("\r\n");
                let status_line = lines.next().unwrap_or_default().to_string();
                let status: u16 = status_line
                    .split(' ')
                    .nth(1)
                    .and_then(|s| s.parse().ok())
                    .expect("status code");
                if status == 100 {
                    continue;
                }
                let headers: Vec<(String, String)> = lines
                    .map(|l| {
                        let (n, v) = l.split_once(':').expect("header line");
                        (n.to_string(), v.trim().to_string())
                    })
                    .collect();
                let find = |name: &str| {
                    headers
                        .iter()
                        .find(|(n, _)| n.eq_ignore_ascii_case(name))
                        .map(|(_, v)| v.clone())
                };
                let chunked = find("transfer-encoding").is_some_and(|v| v.contains("chunked"));
                let body = if head_request || status == 204 || status == 304 {
                    Vec::new()
                } else if chunked {
                    let mut body = Vec::new();
                    loop {
                        let line = String::from_utf8(self.take_until(b"\r\n").await).unwrap();
                        let size = usize::from_str_radix(line.trim(), 16).expect("chunk size");
                        if size == 0 {
                            assert_eq!(self.take(2).await, b"\r\n", "no trailers expected");
                            break;
                        }
                        body.extend(self.take(size).await);
                        assert_eq!(self.take(2).await, b"\r\n");
                    }
                    body
                } else if let Some(len) = find("content-length") {
                    self.take(len.parse().unwrap()).await
                } else {
                    while self.more().await {}
                    std::mem::take(&mut self.buf)
                };
                return RawResp {
                    status_line,
                    status,
                    headers,
                    body,
                    chunked,
                };
            }
        }

        async fn request(
            &mut self,
            method: &str,
            target: &str,
            headers: &[(&str, &str)],
            body: &[u8],
        ) -> RawResp {
            let mut req = format!("{method} {target} HTTP/1.1\r\nHost: pos.test\r\n");
            for (n, v) in headers {
                req.push_str(&format!("{n}: {v}\r\n"));
            }
            if !body.is_empty() || matches!(method, "POST" | "PUT" | "PATCH") {
                req.push_str(&format!("Content-Length: {}\r\n", body.len()));
            }
            req.push_str("\r\n");
            let mut bytes = req.into_bytes();
            bytes.extend_from_slice(body);
            self.send(&bytes).await;
            self.response(method == "HEAD").await
        }

        async fn post_sale(&mut self, body: &str) -> RawResp {
            self.request(
                "POST",
                "/api/sales",
                &[("Content-Type", "application/json")],
                body.as_bytes(),
            )
            .await
        }

        /// Waits (up to `within`) for the server to close; returns how long that took.
        async fn closed_within(&mut self, within: Duration) -> Option<Duration> {
            let started = Instant::now();
            let mut tmp = [0u8; 1024];
            match tokio::time::timeout(within, self.stream.read(&mut tmp)).await {
                Err(_) => None,
                Ok(Ok(0)) | Ok(Err(_)) => Some(started.elapsed()),
                Ok(Ok(_)) => panic!("unexpected bytes from an idle connection"),
            }
        }
    }

    async fn pos_with(opts: SamplePosOptions) -> SamplePos {
        SamplePos::start(opts).await.expect("start sample POS")
    }

    async fn pos() -> SamplePos {
        pos_with(SamplePosOptions::default()).await
    }

    /// Replaces what differs between runs (sale id, timestamp, transaction id) after checking its
    /// shape, so bodies can be compared with the captures byte for byte otherwise.
    fn normalize(body: &str) -> String {
        let s = replace_each(body, "POS_", |rest| {
            let digits = rest.chars().take_while(char::is_ascii_digit).count();
            assert_eq!(digits, 13, "sale id millis in {rest}");
            assert_eq!(&rest[digits..digits + 1], "_");
            let suffix = &rest[digits + 1..digits + 10];
            assert!(
                suffix
                    .chars()
                    .all(|c| c.is_ascii_digit() || c.is_ascii_lowercase()),
                "sale id suffix {suffix}"
            );
            (digits + 10, "<id>")
        });
        let s = replace_each(&s, "\"timestamp\":\"", |rest| {
            assert_iso(&rest[..24]);
            (24, "<ts>")
        });
        replace_each(&s, "\"tx-", |rest| {
            let digits = rest.chars().take_while(char::is_ascii_digit).count();
            assert_eq!(digits, 13, "transaction id millis");
            (digits, "<ms>")
        })
    }

    fn replace_each(s: &str, prefix: &str, f: impl Fn(&str) -> (usize, &'static str)) -> String {
        let mut out = String::new();
        let mut rest = s;
        while let Some(i) = rest.find(prefix) {
            out.push_str(&rest[..i + prefix.len()]);
            rest = &rest[i + prefix.len()..];
            let (skip, with) = f(rest);
            out.push_str(with);
            rest = &rest[skip..];
        }
        out.push_str(rest);
        out
    }

    fn assert_iso(ts: &str) {
        // 2026-11-25T06:06:31.062Z
        let b = ts.as_bytes();
        assert_eq!(b.len(), 24, "{ts}");
        for (i, c) in b.iter().enumerate() {
            match i {
                4 | 7 => assert_eq!(*c, b'-', "{ts}"),
                10 => assert_eq!(*c, b'T', "{ts}"),
                13 | 16 => assert_eq!(*c, b':', "{ts}"),
                19 => assert_eq!(*c, b'.', "{ts}"),
                23 => assert_eq!(*c, b'Z', "{ts}"),
                _ => assert!(c.is_ascii_digit(), "{ts}"),
            }
        }
    }

    fn json(s: &str) -> serde_json::Value {
        serde_json::from_str(s).expect("valid JSON")
    }

    // --- completed sales, one per captured inventory situation -------------------------------

    #[tokio::test]
    async fn sale_with_customer_matches_capture() {
        let pos = pos().await;
        let mut c = RawConn::open(&pos).await;
        let r = c.post_sale(SALE_WITH_CUSTOMER).await;
        assert_eq!(r.status_line, "HTTP/1.1 207 Multi-Status");
        r.assert_json_headers();
        assert_eq!(
            r.names(),
            [
                "vary",
                "content-type",
                "date",
                "connection",
                "keep-alive",
                "transfer-encoding"
            ]
        );
        assert_eq!(normalize(&r.text()), normalize(CAPTURE_WITH_CUSTOMER));
        let v = json(&r.text());
        assert_eq!(pos.completed_sales(), [v["saleId"].as_str().unwrap()]);
        assert_eq!(v["saleId"], v["saleRecord"]["id"]);
    }

    #[tokio::test]
    async fn sale_without_customer_matches_capture() {
        let pos = pos().await;
        let mut c = RawConn::open(&pos).await;
        let r = c.post_sale(SALE_NO_CUSTOMER).await;
        assert_eq!(r.status, 207);
        r.assert_json_headers();
        assert_eq!(normalize(&r.text()), normalize(CAPTURE_NO_CUSTOMER));
        assert_eq!(pos.completed_sales().len(), 1);
    }

    #[tokio::test]
    async fn inventory_all_ok_matches_capture() {
        let pos = pos_with(SamplePosOptions {
            inventory: InventoryMode::AllOk,
            ..Default::default()
        })
        .await;
        let mut c = RawConn::open(&pos).await;
        let r = c.post_sale(SALE_WITH_CUSTOMER).await;
        assert_eq!(r.status_line, "HTTP/1.1 200 OK");
        r.assert_json_headers();
        assert_eq!(normalize(&r.text()), normalize(CAPTURE_INVOK));
        assert!(json(&r.text()).get("warnings").is_none());
        assert_eq!(pos.completed_sales().len(), 1);
    }

    #[tokio::test]
    async fn inventory_failing_matches_capture() {
        let pos = pos_with(SamplePosOptions {
            inventory: InventoryMode::Failing,
            ..Default::default()
        })
        .await;
        let mut c = RawConn::open(&pos).await;
        let r = c.post_sale(SALE_WITH_CUSTOMER).await;
        assert_eq!(r.status, 207);
        r.assert_json_headers();
        assert_eq!(normalize(&r.text()), normalize(CAPTURE_INVDOWN));
    }

    #[tokio::test]
    async fn set_inventory_switches_mode_at_run_time() {
        let pos = pos().await;
        let mut c = RawConn::open(&pos).await;
        assert_eq!(c.post_sale(SALE_WITH_CUSTOMER).await.status, 207);
        pos.set_inventory(InventoryMode::AllOk);
        assert_eq!(c.post_sale(SALE_WITH_CUSTOMER).await.status, 200);
        pos.set_inventory(InventoryMode::Failing);
        let r = c.post_sale(SALE_WITH_CUSTOMER).await;
        assert_eq!(
            json(&r.text())["message"],
            "Sale completed successfully (1 inventory updates failed)"
        );
        assert_eq!(pos.completed_sales().len(), 3);
    }

    #[tokio::test]
    async fn sale_ids_timestamps_and_transaction_ids_have_the_real_shapes() {
        let pos = pos_with(SamplePosOptions {
            inventory: InventoryMode::AllOk,
            ..Default::default()
        })
        .await;
        let mut c = RawConn::open(&pos).await;
        let before = unix_millis(OffsetDateTime::now_utc());
        let a = json(&c.post_sale(SALE_WITH_CUSTOMER).await.text());
        let b = json(&c.post_sale(SALE_WITH_CUSTOMER).await.text());
        let after = unix_millis(OffsetDateTime::now_utc());
        for v in [&a, &b] {
            let id = v["saleId"].as_str().unwrap();
            let (millis, suffix) = id["POS_".len()..].split_once('_').unwrap();
            let millis: i128 = millis.parse().unwrap();
            assert!(before <= millis && millis <= after, "{id}");
            assert_eq!(suffix.len(), 9);
            assert!(suffix
                .chars()
                .all(|c| c.is_ascii_digit() || c.is_ascii_lowercase()));
            assert_iso(v["saleRecord"]["timestamp"].as_str().unwrap());
            let tx = v["saleRecord"]["inventoryTransactions"][0]["transaction_id"]
                .as_str()
                .unwrap();
            let tx: i128 = tx.strip_prefix("tx-").unwrap().parse().unwrap();
            assert!(millis <= tx && tx <= after);
        }
        assert_ne!(a["saleId"], b["saleId"]);
        assert_eq!(
            pos.completed_sales(),
            [a["saleId"].as_str().unwrap(), b["saleId"].as_str().unwrap()]
        );
    }

    #[tokio::test]
    async fn echoed_values_keep_their_json_text() {
        let pos = pos().await;
        let mut c = RawConn::open(&pos).await;
        let body = r#"{ "items": [ {"id":"sku-1", "name":"Tea", "price":4.50, "quantity":2,
            "type":"product", "appliedDiscounts":[], "cost":1.10} ],
            "subtotal": 9.10, "tax": 1.00, "total": 10.10, "paymentMethod": "Cash",
            "customerId": "c-9", "customerName": "Jane", "currency": "EUR" }"#;
        let r = c.post_sale(body).await;
        assert_eq!(r.status, 207);
        let text = r.text();
        assert!(
            text.contains(
                r#""items":[{"id":"sku-1","name":"Tea","price":4.50,"quantity":2,"type":"product","appliedDiscounts":[],"cost":1.10}],"subtotal":9.10,"tax":1.00,"total":10.10,"paymentMethod":"Cash","customerId":"c-9","inventoryTransactions""#
            ),
            "{text}"
        );
        // The real POS does not echo these.
        assert!(
            !text.contains("customerName") && !text.contains("currency"),
            "{text}"
        );
        assert!(
            !text.contains("\"user\"") && !text.contains("warehouseId"),
            "{text}"
        );
    }

    #[tokio::test]
    async fn sale_with_services_only_and_items_without_id() {
        let pos = pos().await;
        let mut c = RawConn::open(&pos).await;
        let r = c
            .post_sale(r#"{"items":[{"id":"s","type":"service"},"x",3],"total":1}"#)
            .await;
        assert_eq!(r.status, 200);
        let v = json(&r.text());
        assert_eq!(v["message"], MSG_ALL_OK);
        assert_eq!(v["inventoryStatus"]["serviceAvailable"], false);
        assert_eq!(v["inventoryStatus"]["summary"]["total_items"], 0);

        let r = c
            .post_sale(r#"{"items":[{"type":"product","quantity":1}],"total":1}"#)
            .await;
        assert_eq!(r.status, 207);
        let text = r.text();
        assert!(text.contains(
            r#""inventoryTransactions":[{"success":false,"error":"Inventory service not configured"}]"#
        ));
        assert!(text.contains(
            r#""warnings":["Inventory update failed for item undefined: Inventory service not configured"]"#
        ));
    }

    #[tokio::test]
    async fn all_ok_stock_update_uses_js_arithmetic() {
        let pos = pos_with(SamplePosOptions {
            inventory: InventoryMode::AllOk,
            ..Default::default()
        })
        .await;
        let mut c = RawConn::open(&pos).await;
        let r = c
            .post_sale(
                r#"{"items":[{"id":1,"type":"product","quantity":"2.5"},{"id":[2],"type":"product"}],"total":"3"}"#,
            )
            .await;
        assert_eq!(r.status, 200);
        assert!(r.text().contains(
            r#""stockUpdates":[{"success":true,"item_id":1,"previous_quantity":10,"new_quantity":7.5},{"success":true,"item_id":[2],"previous_quantity":10,"new_quantity":null}]"#
        ), "{}", r.text());
    }

    // --- refused sales ------------------------------------------------------------------------

    async fn expect_refusal(c: &mut RawConn, body: &str, status: u16, answer: &str) {
        let r = c.post_sale(body).await;
        assert_eq!(r.status, status, "for {body:?}: {}", r.text());
        r.assert_json_headers();
        assert_eq!(r.text(), answer, "for {body:?}");
    }

    #[tokio::test]
    async fn no_items_is_400() {
        let pos = pos().await;
        let mut c = RawConn::open(&pos).await;
        for body in [
            r#"{"items":[],"total":11}"#,
            r#"{"total":11}"#,
            r#"[1,2]"#,
            r#""a string""#,
            r#"42"#,
            r#"{"items":"","total":11}"#,
            r#"{"items":0,"total":11}"#,
            r#"{"items":false,"total":11}"#,
            r#"{"items":null,"total":11}"#,
            r#"{"items":{"length":0},"total":11}"#,
        ] {
            expect_refusal(&mut c, body, 400, NO_ITEMS).await;
        }
        assert!(pos.completed_sales().is_empty());
        assert_eq!(pos.connections_accepted(), 1);
    }

    #[tokio::test]
    async fn invalid_total_is_400() {
        let pos = pos().await;
        let mut c = RawConn::open(&pos).await;
        for total in [
            "0",
            "-3",
            "null",
            "false",
            r#""""#,
            r#""0""#,
            r#"" 0 ""#,
            "[]",
            "[0]",
            "[[-1]]",
            "[null]",
            r#""-1e3""#,
        ] {
            let body = format!(r#"{{"items":[{{"id":"a","type":"product"}}],"total":{total}}}"#);
            expect_refusal(&mut c, &body, 400, INVALID_TOTAL).await;
        }
        expect_refusal(&mut c, r#"{"items":[{"id":"a"}]}"#, 400, INVALID_TOTAL).await;
        // The total is checked before `items.filter` runs.
        expect_refusal(&mut c, r#"{"items":"abc"}"#, 400, INVALID_TOTAL).await;
        assert!(pos.completed_sales().is_empty());
    }

    #[tokio::test]
    async fn js_truthy_totals_pass_the_check() {
        // `"abc" <= 0` and `{} <= 0` are false in JS, so these sales go through.
        let pos = pos().await;
        let mut c = RawConn::open(&pos).await;
        for total in [r#""abc""#, "true", "[1,2]", "{}", r#""0x10""#, "1e400"] {
            let body = format!(r#"{{"items":[{{"id":"a","type":"product"}}],"total":{total}}}"#);
            let r = c.post_sale(&body).await;
            assert_eq!(r.status, 207, "total {total}: {}", r.text());
            assert!(r.text().contains(&format!(r#""total":{total},"#)));
        }
        assert_eq!(pos.completed_sales().len(), 6);
    }

    #[tokio::test]
    async fn items_not_an_array_is_500_from_the_inventory_step() {
        let pos = pos().await;
        let mut c = RawConn::open(&pos).await;
        let filter = r#"{"success":false,"error":"Failed to process inventory updates","details":"items.filter is not a function"}"#;
        for items in [
            r#""abc""#,
            "5",
            "true",
            r#"{"a":1}"#,
            r#"{"filter":1,"length":2}"#,
        ] {
            let body = format!(r#"{{"items":{items},"total":11}}"#);
            expect_refusal(&mut c, &body, 500, filter).await;
        }
        expect_refusal(
            &mut c,
            r#"{"items":[{"type":"product"},null],"total":11}"#,
            500,
            r#"{"success":false,"error":"Failed to process inventory updates","details":"Cannot read properties of null (reading 'type')"}"#,
        )
        .await;
        assert!(pos.completed_sales().is_empty());
    }

    #[tokio::test]
    async fn unparseable_body_is_500_with_a_js_message() {
        let pos = pos().await;
        let mut c = RawConn::open(&pos).await;
        let err = |details: &str| {
            format!(r#"{{"error":"Failed to process sale transaction","details":"{details}"}}"#)
        };
        // The shape of pos-malformed.txt.
        expect_refusal(
            &mut c,
            r#"{"items":[1],"total":1"x":2}"#,
            500,
            &err("Expected ',' or '}' after property value in JSON at position 22"),
        )
        .await;
        expect_refusal(&mut c, "", 500, &err("Unexpected end of JSON input")).await;
        expect_refusal(
            &mut c,
            "null",
            500,
            &err("Cannot destructure property 'items' of 'body' as it is null."),
        )
        .await;
        expect_refusal(
            &mut c,
            "not json",
            500,
            &err(r#"Unexpected token 'o', \"not json\" is not valid JSON"#),
        )
        .await;
        expect_refusal(
            &mut c,
            r#"{"items":[1],"total":{"toString":1}}"#,
            500,
            &err("Cannot convert object to primitive value"),
        )
        .await;
        assert!(pos.completed_sales().is_empty());
    }

    #[test]
    fn json_parse_errors_read_like_v8() {
        let msg = |s: &str| {
            let src: Vec<u16> = s.encode_utf16().collect();
            parse_json(&src).expect_err(s)
        };
        assert_eq!(msg(""), "Unexpected end of JSON input");
        assert_eq!(msg("  "), "Unexpected end of JSON input");
        assert_eq!(
            msg("[1"),
            "Expected ',' or ']' after array element in JSON at position 2"
        );
        assert_eq!(
            msg("{"),
            "Expected property name or '}' in JSON at position 1"
        );
        assert_eq!(
            msg("{\"a\" 1}"),
            "Expected ':' after property name in JSON at position 5"
        );
        assert_eq!(
            msg("{\"a\":1,}"),
            "Expected double-quoted property name in JSON at position 7"
        );
        assert_eq!(
            msg("{\"a\":1"),
            "Expected ',' or '}' after property value in JSON at position 6"
        );
        assert_eq!(
            msg("[1,]"),
            "Unexpected token ']', \"[1,]\" is not valid JSON"
        );
        assert_eq!(msg("tru"), "Unexpected end of JSON input");
        assert_eq!(
            msg("trux"),
            "Unexpected token 'x', \"trux\" is not valid JSON"
        );
        assert_eq!(msg("01"), "Unexpected number in JSON at position 1");
        assert_eq!(msg("-"), "No number after minus sign in JSON at position 1");
        assert_eq!(
            msg("1."),
            "Unterminated fractional number in JSON at position 2"
        );
        assert_eq!(
            msg("1e+"),
            "Exponent part is missing a number in JSON at position 3"
        );
        assert_eq!(msg("\"abc"), "Unterminated string in JSON at position 4");
        assert_eq!(
            msg("\"a\\x\""),
            "Bad escaped character in JSON at position 3"
        );
        assert_eq!(
            msg("\"\\u12g4\""),
            "Bad Unicode escape in JSON at position 5"
        );
        assert_eq!(
            msg("\"a\nb\""),
            "Bad control character in string literal in JSON at position 2"
        );
        assert_eq!(
            msg("{} x"),
            "Unexpected non-whitespace character after JSON at position 3"
        );
        assert_eq!(msg("undefined"), "\"undefined\" is not valid JSON");
        assert_eq!(
            msg("[object Object]"),
            "\"[object Object]\" is not valid JSON"
        );
        assert_eq!(
            msg("<!DOCTYPE html><html><body></body></html>"),
            "Unexpected token '<', \"<!DOCTYPE \"... is not valid JSON"
        );
        assert_eq!(
            msg("{\"items\":[1,2,3],\"total\":x,\"tax\":1,\"more\":2}"),
            "Unexpected token 'x', ...\"],\"total\":x,\"tax\":1,\"... is not valid JSON"
        );
        assert_eq!(
            msg("{\"items\":[1,2,3],\"total\":x}"),
            "Unexpected token 'x', ...\"],\"total\":x}\" is not valid JSON"
        );
        let deep = "[".repeat(MAX_JSON_DEPTH + 5);
        assert_eq!(msg(&deep), "Maximum call stack size exceeded");
        // Within the limit nesting is fine.
        let ok = format!("{}{}", "[".repeat(100), "]".repeat(100));
        assert!(parse_json(&ok.encode_utf16().collect::<Vec<_>>()).is_ok());
    }

    #[test]
    fn json_values_follow_js_semantics() {
        let parse = |s: &str| {
            let src: Vec<u16> = s.encode_utf16().collect();
            (parse_json(&src).expect(s), src)
        };
        let (v, src) =
            parse(r#" { "a" : [ 1.50 , "x y" , {"b":null} ] , "a" : 2 , "s":"\u0041\n" } "#);
        assert!(matches!(v.get("a").unwrap().kind, JKind::Num(n) if n == 2.0));
        assert!(v.get("s").unwrap().is_str("A\n"));
        assert_eq!(
            v.compact(&src),
            r#"{"a":[1.50,"x y",{"b":null}],"a":2,"s":"\u0041\n"}"#
        );
        let (v, _) = parse(r#""𝄞""#);
        assert!(matches!(&v.kind, JKind::Str(s) if s.len() == 2));
    }

    #[test]
    fn js_number_formatting_matches_number_to_string() {
        for (n, s) in [
            (0.0, "0"),
            (-0.0, "0"),
            (1.0, "1"),
            (-8.0, "-8"),
            (7.5, "7.5"),
            (0.1 + 0.2, "0.30000000000000004"),
            (100.0, "100"),
            (1e21, "1e+21"),
            (123e19, "1.23e+21"),
            (999999999999999900000.0, "999999999999999900000"),
            (0.000001, "0.000001"),
            (1e-7, "1e-7"),
            (1.5e-9, "1.5e-9"),
            (9007199254740993.0, "9007199254740992"),
        ] {
            assert_eq!(js_number_to_string(n), s, "{n:e}");
        }
        assert_eq!(json_number(f64::NAN), "null");
        assert_eq!(json_number(f64::INFINITY), "null");
    }

    #[test]
    fn js_string_to_number_and_parse_int() {
        for (s, n) in [
            ("", 0.0),
            ("  \n", 0.0),
            (" 12 ", 12.0),
            ("1.5e3", 1500.0),
            (".5", 0.5),
            ("5.", 5.0),
            ("-0x10", f64::NAN),
            ("0x10", 16.0),
            ("0b101", 5.0),
            ("0o17", 15.0),
            ("-Infinity", f64::NEG_INFINITY),
            ("inf", f64::NAN),
            ("NaN", f64::NAN),
            ("1_000", f64::NAN),
            ("12px", f64::NAN),
        ] {
            let got = js_string_to_number(s);
            assert!(got == n || (got.is_nan() && n.is_nan()), "{s:?} -> {got}");
        }
        for (s, n) in [
            ("50", 50.0),
            ("12px", 12.0),
            ("  -7", -7.0),
            ("0x1f", 31.0),
            ("1e3", 1.0),
            ("3.9", 3.0),
            ("abc", f64::NAN),
            ("", f64::NAN),
            ("-", f64::NAN),
        ] {
            let got = js_parse_int(s);
            assert!(got == n || (got.is_nan() && n.is_nan()), "{s:?} -> {got}");
        }
    }

    #[test]
    fn never_panics_on_mangled_bodies() {
        let base = SALE_WITH_CUSTOMER.as_bytes();
        let replacements: &[&[u8]] = &[
            b"",
            b"\"",
            b"\\",
            b"{",
            b"}",
            b"[",
            b"]",
            b",",
            b":",
            b"-",
            b"0",
            b"null",
            b"\xff",
            b"\xf0\x9f",
            b"\\u",
            b"e",
            b" ",
            b"\n",
            b"\x00",
            b"\"product\"",
            b"[null]",
        ];
        let now = OffsetDateTime::now_utc();
        let mut cases = 0usize;
        for cut in 0..=base.len() {
            for rep in replacements {
                let mut body = base[..cut].to_vec();
                body.extend_from_slice(rep);
                body.extend_from_slice(&base[(cut + 1).min(base.len())..]);
                for mode in [
                    InventoryMode::NotConfigured,
                    InventoryMode::AllOk,
                    InventoryMode::Failing,
                ] {
                    let out = process_sale(&body, mode, "POS_1_abcdefghi", now);
                    // Every answer is valid JSON.
                    let _: serde_json::Value = serde_json::from_str(&out.body)
                        .unwrap_or_else(|e| panic!("{e}: {}", out.body));
                    assert_eq!(out.completed, out.status.is_success());
                    cases += 1;
                }
            }
            // Truncations too.
            let out = process_sale(&base[..cut], InventoryMode::AllOk, "POS_1_x", now);
            assert_eq!(out.completed, cut == base.len());
        }
        assert!(cases > 1000);
    }

    // --- the other methods and paths -----------------------------------------------------------

    #[tokio::test]
    async fn trailing_slash_redirects_with_308() {
        let pos = pos().await;
        let mut c = RawConn::open(&pos).await;
        let r = c.post_sale_at("/api/sales/", SALE_WITH_CUSTOMER).await;
        assert_eq!(r.status_line, "HTTP/1.1 308 Permanent Redirect");
        assert_eq!(r.header("location"), Some("/api/sales"));
        assert_eq!(r.header("refresh"), Some("0;url=/api/sales"));
        assert_eq!(r.header("vary"), None);
        assert_eq!(r.header("content-type"), None);
        assert_eq!(r.header("connection"), Some("keep-alive"));
        assert_eq!(r.header("keep-alive"), Some("timeout=5"));
        r.assert_chunked();
        assert_eq!(r.text(), "/api/sales");
        assert_eq!(
            r.names(),
            [
                "location",
                "refresh",
                "date",
                "connection",
                "keep-alive",
                "transfer-encoding"
            ]
        );
        let r = c.request("GET", "/api/sales/?limit=5", &[], b"").await;
        assert_eq!(r.status, 308);
        assert_eq!(r.header("location"), Some("/api/sales?limit=5"));
        assert_eq!(r.text(), "/api/sales?limit=5");
        // Nothing was sold.
        assert!(pos.completed_sales().is_empty());
        assert_eq!(pos.requests().len(), 2);
    }

    impl RawConn {
        async fn post_sale_at(&mut self, target: &str, body: &str) -> RawResp {
            self.request("POST", target, &[], body.as_bytes()).await
        }
    }

    #[tokio::test]
    async fn get_is_the_history_stub() {
        let pos = pos().await;
        let mut c = RawConn::open(&pos).await;
        let r = c.request("GET", "/api/sales", &[], b"").await;
        assert_eq!(r.status_line, "HTTP/1.1 200 OK");
        r.assert_json_headers();
        assert_eq!(
            r.text(),
            r#"{"message":"Sale history lookup not implemented","limit":50,"offset":0}"#
        );
        // pos-gzip-get.txt: API answers are not compressed even when gzip is accepted.
        let r = c
            .request(
                "GET",
                "/api/sales?limit=5",
                &[("Accept-Encoding", "gzip, deflate, br")],
                b"",
            )
            .await;
        r.assert_json_headers();
        assert_eq!(
            r.text(),
            r#"{"message":"Sale history lookup not implemented","limit":5,"offset":0}"#
        );
        let r = c
            .request("GET", "/api/sales?limit=abc&offset=12px&offset=3", &[], b"")
            .await;
        assert_eq!(
            r.text(),
            r#"{"message":"Sale history lookup not implemented","limit":null,"offset":12}"#
        );
        let r = c
            .request("GET", "/api/sales?limit=&offset=%2D2", &[], b"")
            .await;
        assert_eq!(
            r.text(),
            r#"{"message":"Sale history lookup not implemented","limit":50,"offset":-2}"#
        );
    }

    #[tokio::test]
    async fn head_has_the_headers_but_no_body_and_no_framing() {
        let pos = pos().await;
        let mut c = RawConn::open(&pos).await;
        let r = c.request("HEAD", "/api/sales", &[], b"").await;
        assert_eq!(r.status, 200);
        assert_eq!(
            r.names(),
            ["vary", "content-type", "date", "connection", "keep-alive"]
        );
        assert_eq!(r.header("content-type"), Some("application/json"));
        // The connection is still in sync: no body bytes were sent.
        let r = c.request("GET", "/api/sales", &[], b"").await;
        assert_eq!(r.status, 200);
        assert!(c.buf.is_empty());
    }

    #[tokio::test]
    async fn options_is_204_with_allow() {
        let pos = pos().await;
        let mut c = RawConn::open(&pos).await;
        let r = c.request("OPTIONS", "/api/sales", &[], b"").await;
        assert_eq!(r.status_line, "HTTP/1.1 204 No Content");
        assert_eq!(
            r.names(),
            ["vary", "allow", "date", "connection", "keep-alive"]
        );
        assert_eq!(r.header("allow"), Some("GET, HEAD, OPTIONS, POST"));
        assert!(r.body.is_empty());
        assert_eq!(c.request("GET", "/api/sales", &[], b"").await.status, 200);
    }

    #[tokio::test]
    async fn other_methods_are_405_with_an_empty_chunked_body() {
        let pos = pos().await;
        let mut c = RawConn::open(&pos).await;
        for method in ["PUT", "DELETE", "PATCH"] {
            let r = c
                .request(method, "/api/sales", &[], SALE_WITH_CUSTOMER.as_bytes())
                .await;
            assert_eq!(r.status_line, "HTTP/1.1 405 Method Not Allowed");
            assert_eq!(
                r.names(),
                [
                    "vary",
                    "date",
                    "connection",
                    "keep-alive",
                    "transfer-encoding"
                ]
            );
            r.assert_chunked();
            assert!(r.body.is_empty());
        }
        assert!(pos.completed_sales().is_empty());
    }

    #[tokio::test]
    async fn pages_are_html_gzipped_when_accepted() {
        let pos = pos().await;
        let mut c = RawConn::open(&pos).await;
        let r = c
            .request("GET", "/", &[("Accept-Encoding", "gzip, deflate")], b"")
            .await;
        assert_eq!(r.status, 200);
        assert_eq!(r.header("content-type"), Some("text/html; charset=utf-8"));
        assert_eq!(r.header("content-encoding"), Some("gzip"));
        r.assert_chunked();
        assert_eq!(r.gunzipped(), SAMPLE_HTML);

        let r = c.request("GET", "/checkout", &[], b"").await;
        assert_eq!(r.header("content-encoding"), None);
        assert_eq!(r.text(), SAMPLE_HTML);
        let r = c
            .request(
                "GET",
                "/",
                &[("Accept-Encoding", "gzip;q=0, identity")],
                b"",
            )
            .await;
        assert_eq!(r.header("content-encoding"), None);
        // Pages are not sales: not recorded.
        assert!(pos.requests().is_empty());
    }

    #[test]
    fn accept_encoding_negotiation() {
        let accepts = |v: &str| {
            let mut h = HeaderMap::new();
            h.insert(header::ACCEPT_ENCODING, HeaderValue::from_str(v).unwrap());
            accepts_gzip(&h)
        };
        assert!(accepts("gzip"));
        assert!(accepts("br, GZIP;q=0.5"));
        assert!(accepts("*"));
        assert!(!accepts("identity"));
        assert!(!accepts("gzip;q=0"));
        assert!(!accepts("br"));
        assert!(!accepts_gzip(&HeaderMap::new()));
    }

    #[tokio::test]
    async fn unknown_api_paths_are_json_404() {
        let pos = pos().await;
        let mut c = RawConn::open(&pos).await;
        for path in ["/api/nope", "/api", "/api/sales/history"] {
            let r = c.request("GET", path, &[], b"").await;
            assert_eq!(r.status, 404, "{path}");
            r.assert_json_headers();
            assert_eq!(r.text(), r#"{"error":"Not found"}"#);
        }
        assert!(pos.requests().is_empty());
    }

    // --- compression ---------------------------------------------------------------------------

    #[tokio::test]
    async fn force_gzip_compresses_every_json_body() {
        let pos = pos_with(SamplePosOptions {
            force_gzip: true,
            ..Default::default()
        })
        .await;
        let mut c = RawConn::open(&pos).await;
        let r = c
            .request(
                "POST",
                "/api/sales",
                &[("Accept-Encoding", "identity")],
                SALE_WITH_CUSTOMER.as_bytes(),
            )
            .await;
        assert_eq!(r.status, 207);
        assert_eq!(r.header("content-encoding"), Some("gzip"));
        assert_eq!(r.header("content-type"), Some("application/json"));
        r.assert_chunked();
        assert_eq!(normalize(&r.gunzipped()), normalize(CAPTURE_WITH_CUSTOMER));

        let r = c.post_sale(r#"{"items":[]}"#).await;
        assert_eq!(r.status, 400);
        assert_eq!(r.gunzipped(), NO_ITEMS);

        let r = c.request("GET", "/api/sales?limit=5", &[], b"").await;
        assert_eq!(
            r.gunzipped(),
            r#"{"message":"Sale history lookup not implemented","limit":5,"offset":0}"#
        );
        // HEAD announces the encoding, still without a body.
        let r = c.request("HEAD", "/api/sales", &[], b"").await;
        assert_eq!(r.header("content-encoding"), Some("gzip"));
        assert!(r.body.is_empty());
        // Bodies that are not JSON stay as they are.
        let r = c.request("PUT", "/api/sales", &[], b"").await;
        assert_eq!(r.header("content-encoding"), None);
        let r = c.request("POST", "/api/sales/", &[], b"").await;
        assert_eq!(r.text(), "/api/sales");
    }

    #[tokio::test]
    async fn set_force_gzip_toggles_at_run_time() {
        let pos = pos().await;
        let mut c = RawConn::open(&pos).await;
        let r = c.post_sale(SALE_NO_CUSTOMER).await;
        assert_eq!(r.header("content-encoding"), None);
        pos.set_force_gzip(true);
        let r = c.post_sale(SALE_NO_CUSTOMER).await;
        assert_eq!(r.header("content-encoding"), Some("gzip"));
        assert_eq!(normalize(&r.gunzipped()), normalize(CAPTURE_NO_CUSTOMER));
        pos.set_force_gzip(false);
        assert_eq!(
            c.post_sale(SALE_NO_CUSTOMER)
                .await
                .header("content-encoding"),
            None
        );
    }

    // --- recording ----------------------------------------------------------------------------

    #[tokio::test]
    async fn records_every_sales_request_in_order() {
        let pos = pos().await;
        let mut c = RawConn::open(&pos).await;
        c.request(
            "POST",
            "/api/sales",
            &[("X-Trace", "one"), ("Content-Type", "application/json")],
            SALE_WITH_CUSTOMER.as_bytes(),
        )
        .await;
        c.request("GET", "/api/sales?limit=2", &[], b"").await;
        c.request("GET", "/", &[], b"").await;
        c.request("GET", "/api/other", &[], b"").await;
        c.request("POST", "/api/sales/", &[], b"{}").await;
        c.request("OPTIONS", "/api/sales", &[], b"").await;
        c.request("DELETE", "/api/sales", &[], b"").await;

        let got = pos.requests();
        let summary: Vec<(String, String, Bytes)> = got
            .iter()
            .map(|r| (r.method.to_string(), r.uri.to_string(), r.body.clone()))
            .collect();
        assert_eq!(
            summary,
            [
                (
                    "POST".into(),
                    "/api/sales".into(),
                    Bytes::from_static(SALE_WITH_CUSTOMER.as_bytes())
                ),
                ("GET".into(), "/api/sales?limit=2".into(), Bytes::new()),
                (
                    "POST".into(),
                    "/api/sales/".into(),
                    Bytes::from_static(b"{}")
                ),
                ("OPTIONS".into(), "/api/sales".into(), Bytes::new()),
                ("DELETE".into(), "/api/sales".into(), Bytes::new()),
            ]
        );
        assert_eq!(got[0].headers["x-trace"], "one");
        assert_eq!(got[0].headers["host"], "pos.test");
        assert_eq!(pos.completed_sales().len(), 1);
    }

    #[tokio::test]
    async fn expect_continue_and_chunked_request_bodies() {
        let pos = pos().await;
        let mut c = RawConn::open(&pos).await;
        c.send(
            b"POST /api/sales HTTP/1.1\r\nHost: pos.test\r\nTransfer-Encoding: chunked\r\n\
              Expect: 100-continue\r\n\r\n",
        )
        .await;
        let interim = c.take_until(b"\r\n\r\n").await;
        assert!(interim.starts_with(b"HTTP/1.1 100 Continue"));
        let (a, b) = SALE_NO_CUSTOMER.split_at(40);
        let chunked = format!("{:x}\r\n{a}\r\n{:x}\r\n{b}\r\n0\r\n\r\n", a.len(), b.len());
        c.send(chunked.as_bytes()).await;
        let r = c.response(false).await;
        assert_eq!(r.status, 207);
        assert_eq!(normalize(&r.text()), normalize(CAPTURE_NO_CUSTOMER));
        assert_eq!(pos.requests()[0].body, SALE_NO_CUSTOMER.as_bytes());
    }

    // --- connections ---------------------------------------------------------------------------

    #[tokio::test]
    async fn keep_alive_reuses_one_connection_and_pipelines() {
        let pos = pos().await;
        let mut c = RawConn::open(&pos).await;
        for _ in 0..3 {
            assert_eq!(c.post_sale(SALE_NO_CUSTOMER).await.status, 207);
        }
        // Two requests in one write are answered in order.
        c.send(
            b"GET /api/sales?limit=1 HTTP/1.1\r\nHost: x\r\n\r\nGET /api/sales?limit=2 HTTP/1.1\r\nHost: x\r\n\r\n",
        )
        .await;
        assert!(c.response(false).await.text().contains("\"limit\":1,"));
        assert!(c.response(false).await.text().contains("\"limit\":2,"));
        assert_eq!(pos.connections_accepted(), 1);
        assert_eq!(pos.completed_sales().len(), 3);
    }

    #[tokio::test]
    async fn connection_close_is_honoured() {
        let pos = pos().await;
        let mut c = RawConn::open(&pos).await;
        let r = c
            .request("GET", "/api/sales", &[("Connection", "close")], b"")
            .await;
        assert_eq!(r.status, 200);
        assert_eq!(r.header("connection"), Some("close"));
        assert_eq!(r.header("keep-alive"), None);
        assert!(c.closed_within(WAIT).await.is_some());
    }

    #[tokio::test]
    async fn idle_keep_alive_connections_are_closed() {
        let idle = Duration::from_millis(200);
        let pos = pos_with(SamplePosOptions {
            idle_timeout: idle,
            ..Default::default()
        })
        .await;
        let mut c = RawConn::open(&pos).await;
        let r = c.request("GET", "/api/sales", &[], b"").await;
        assert_eq!(r.status, 200);
        // Node writes whole seconds, rounded down.
        assert_eq!(r.header("keep-alive"), Some("timeout=0"));
        let waited = c
            .closed_within(WAIT)
            .await
            .expect("idle connection closed by the POS");
        assert!(
            waited >= Duration::from_millis(120),
            "closed too early: {waited:?}"
        );

        // A connection that never sends a request is closed too.
        let mut silent = RawConn::open(&pos).await;
        assert!(silent.closed_within(WAIT).await.is_some());
    }

    #[tokio::test]
    async fn idle_close_never_cuts_a_slow_sale() {
        let pos = pos_with(SamplePosOptions {
            idle_timeout: Duration::from_millis(150),
            sale_delay: Duration::from_millis(500),
            ..Default::default()
        })
        .await;
        let mut c = RawConn::open(&pos).await;
        let r = c.post_sale(SALE_WITH_CUSTOMER).await;
        assert_eq!(r.status, 207);
        // ...and the idle clock restarts after the answer.
        let r = c.request("GET", "/api/sales", &[], b"").await;
        assert_eq!(r.status, 200);
        assert!(c.closed_within(WAIT).await.is_some());
        assert_eq!(pos.connections_accepted(), 1);
    }

    #[tokio::test]
    async fn sale_delay_holds_the_answer() {
        let pos = pos_with(SamplePosOptions {
            sale_delay: Duration::from_millis(300),
            ..Default::default()
        })
        .await;
        let mut c = RawConn::open(&pos).await;
        let started = Instant::now();
        assert_eq!(c.post_sale(SALE_WITH_CUSTOMER).await.status, 207);
        assert!(started.elapsed() >= Duration::from_millis(300));
        // Only POST /api/sales waits.
        let started = Instant::now();
        c.request("GET", "/api/sales", &[], b"").await;
        assert!(started.elapsed() < Duration::from_millis(300));
        pos.set_sale_delay(Duration::ZERO);
        let started = Instant::now();
        c.post_sale(SALE_WITH_CUSTOMER).await;
        assert!(started.elapsed() < Duration::from_millis(300));
    }

    #[tokio::test]
    async fn a_sale_completes_even_if_the_client_hangs_up() {
        let pos = pos_with(SamplePosOptions {
            sale_delay: Duration::from_millis(500),
            ..Default::default()
        })
        .await;
        let mut c = RawConn::open(&pos).await;
        let req = format!(
            "POST /api/sales HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n{}",
            SALE_WITH_CUSTOMER.len(),
            SALE_WITH_CUSTOMER
        );
        c.send(req.as_bytes()).await;
        // Wait until the POS has the request, then hang up.
        let deadline = Instant::now() + WAIT;
        while pos.requests().is_empty() {
            assert!(Instant::now() < deadline);
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        drop(c);
        assert!(pos.completed_sales().is_empty());
        while pos.completed_sales().is_empty() {
            assert!(Instant::now() < deadline, "sale never completed");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    #[tokio::test]
    async fn works_with_a_pooling_http_client() {
        use hyper_util::client::legacy::Client;
        use hyper_util::rt::TokioExecutor;
        // hyper-util's pooling client, as a proxy would use it (plain HTTP, keep-alive).
        let client: Client<_, http_body_util::Full<Bytes>> =
            Client::builder(TokioExecutor::new()).build_http();
        let pos = pos().await;
        let req = Request::post(format!("{}/api/sales", pos.url()))
            .header("content-type", "application/json")
            .body(http_body_util::Full::new(Bytes::from_static(
                SALE_WITH_CUSTOMER.as_bytes(),
            )))
            .unwrap();
        let resp = client.request(req).await.unwrap();
        assert_eq!(resp.status(), StatusCode::MULTI_STATUS);
        assert_eq!(resp.headers()["content-type"], "application/json");
        assert_eq!(resp.headers()["transfer-encoding"], "chunked");
        assert!(resp.headers().get("content-length").is_none());
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        let text = String::from_utf8(body.to_vec()).unwrap();
        assert_eq!(normalize(&text), normalize(CAPTURE_WITH_CUSTOMER));

        let uri: http::Uri = format!("{}/api/sales", pos.url()).parse().unwrap();
        let resp = client.get(uri).await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(
            body,
            r#"{"message":"Sale history lookup not implemented","limit":50,"offset":0}"#
        );
        assert_eq!(pos.connections_accepted(), 1);
        assert_eq!(pos.completed_sales().len(), 1);
    }

    #[tokio::test]
    async fn start_on_and_url() {
        let pos = SamplePos::start_on("127.0.0.1:0".parse().unwrap(), SamplePosOptions::default())
            .await
            .unwrap();
        assert_eq!(pos.addr().ip().to_string(), "127.0.0.1");
        assert_ne!(pos.addr().port(), 0);
        assert_eq!(pos.url(), format!("http://127.0.0.1:{}", pos.addr().port()));
        assert_eq!(pos.connections_accepted(), 0);
        // The port is taken while it runs.
        assert!(TcpListener::bind(pos.addr()).await.is_err());
        assert!(format!("{pos:?}").contains("SamplePos"));
    }

    #[test]
    fn defaults_are_the_real_pos() {
        let o = SamplePosOptions::default();
        assert_eq!(o.inventory, InventoryMode::NotConfigured);
        assert_eq!(InventoryMode::default(), InventoryMode::NotConfigured);
        assert_eq!(o.sale_delay, Duration::ZERO);
        assert!(!o.force_gzip);
        assert_eq!(o.idle_timeout, Duration::from_secs(5));
    }

    #[test]
    fn date_formats() {
        let t = OffsetDateTime::from_unix_timestamp_nanos(1_795_586_791_062_000_000).unwrap();
        assert_eq!(http_date(t), "Wed, 25 Nov 2026 06:06:31 GMT");
        assert_eq!(iso_millis(t), "2026-11-25T06:06:31.062Z");
        assert_eq!(unix_millis(t), 1_795_586_791_062);
    }

    #[tokio::test]
    async fn shutdown_closes_connections_and_frees_the_port() {
        let pos = pos().await;
        let addr = pos.addr();
        let mut c = RawConn::open(&pos).await;
        assert_eq!(c.request("GET", "/api/sales", &[], b"").await.status, 200);
        tokio::time::timeout(WAIT, pos.shutdown())
            .await
            .expect("shutdown in time");
        assert!(c.closed_within(WAIT).await.is_some());
        assert!(TcpStream::connect(addr).await.is_err());
        // The port can be bound again.
        drop(TcpListener::bind(addr).await.expect("port is free"));
    }

    #[tokio::test]
    async fn shutdown_lets_an_in_flight_sale_finish() {
        let pos = pos_with(SamplePosOptions {
            sale_delay: Duration::from_millis(200),
            ..Default::default()
        })
        .await;
        let mut c = RawConn::open(&pos).await;
        let req = format!(
            "POST /api/sales HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n{}",
            SALE_NO_CUSTOMER.len(),
            SALE_NO_CUSTOMER
        );
        c.send(req.as_bytes()).await;
        let deadline = Instant::now() + WAIT;
        while pos.requests().is_empty() {
            assert!(Instant::now() < deadline);
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let (resp, ()) = tokio::join!(c.response(false), pos.shutdown());
        assert_eq!(resp.status, 207);
        assert!(c.closed_within(WAIT).await.is_some());
    }

    #[tokio::test]
    async fn dropping_stops_the_server() {
        let pos = pos().await;
        let addr = pos.addr();
        let mut c = RawConn::open(&pos).await;
        assert_eq!(c.request("GET", "/api/sales", &[], b"").await.status, 200);
        drop(pos);
        assert!(c.closed_within(WAIT).await.is_some());
        let deadline = Instant::now() + WAIT;
        while TcpStream::connect(addr).await.is_ok() {
            assert!(Instant::now() < deadline, "still accepting after drop");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}
