//! `SampleCrm`: a small in-process stand-in for the CRM's external API.
//!
//! The proxy's demo and the integration tests need a CRM they can start on a loopback port, inspect
//! afterwards (what exactly did the proxy send?) and steer into failure modes (slow, down, garbage,
//! `success:false`) without a network or the real product. This module is that CRM.
//!
//! It speaks the wire contract of `contracts.md` section 2:
//! - `POST /api/external/invoices` validates and creates an invoice, honouring `idempotency-key`;
//! - `GET /api/external/invoices?page=&perPage=&search=` lists created invoices;
//! - `GET /api/external/customers/{id}` looks a customer up;
//! - every route wants the configured `x-api-key`.
//!
//! Invoice POSTs can be scripted ([`CrmScript`]): each POST takes the next step from a FIFO queue,
//! or the default step when the queue is empty. Every invoice POST is recorded before its step runs,
//! so a test can see that a request arrived even when the step is to hang or drop the connection.
//!
//! Only this file's own items are used (no `crate::` paths), so it can live in any crate that has
//! `hyper`, `hyper-util`, `http-body-util`, `tokio`, `serde_json`, `time` and `tracing`.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderValue, CONTENT_TYPE};
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::{json, Map, Value};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{oneshot, watch};
use tokio::task::{JoinHandle, JoinSet};

/// Largest request body read. A CRM has to stop somewhere, and a runaway client in a test should get
/// a clear 413 rather than make the process buffer without bound.
const MAX_BODY_BYTES: usize = 8 * 1024 * 1024;

/// Largest `perPage` honoured on the listing, like real paginated APIs that cap page size.
const MAX_PER_PAGE: u64 = 1000;

/// Statuses the CRM accepts on an invoice.
const INVOICE_STATUSES: [&str; 5] = ["draft", "sent", "paid", "overdue", "cancelled"];

const INVOICES_PATH: &str = "/api/external/invoices";
const CUSTOMERS_PREFIX: &str = "/api/external/customers/";

/// How the CRM answers one `POST /api/external/invoices`.
///
/// Tests queue steps with [`SampleCrm::push_script`] to reproduce the ways a real CRM misbehaves;
/// every step except [`CrmScript::Normal`] (and a [`CrmScript::Delay`] wrapping it) replaces the whole
/// behaviour, API key check included, and creates nothing.
#[derive(Clone, Debug)]
pub enum CrmScript {
    /// The real behaviour: check the API key, validate, create (or replay an idempotent create).
    Normal,
    /// Answer this status with this body (`content-type: application/json`) and create nothing,
    /// e.g. a 500 or a 503 from a CRM that is down. A status hyper cannot send as a final answer
    /// (outside 200..=999, or 1xx) is sent as 500.
    Status(u16, String),
    /// 200 with `<html>oops</html>` as `text/html`: a gateway or login page answering in the
    /// CRM's place. Creates nothing, so a client that trusts any 2xx is caught.
    NotJson,
    /// 200 `{"success":false,"error":"Duplicate invoice"}`: a CRM that reports failure in the body
    /// with a success status. Creates nothing.
    SuccessFalse,
    /// Wait this long, then behave like the inner step: a slow CRM, for client timeouts.
    Delay(Duration, Box<CrmScript>),
    /// Never answer: the connection stays open until the client gives up or the CRM shuts down.
    Hang,
    /// Drop the connection without answering: a CRM that crashes mid-request.
    Close,
}

/// One invoice POST as it arrived, kept so tests can check exactly what the proxy sent.
#[derive(Clone, Debug)]
pub struct ReceivedRequest {
    /// Always `POST` today; kept so the record is self-describing.
    pub method: Method,
    /// Path and query string as sent.
    pub path: String,
    /// All request headers as sent.
    pub headers: HeaderMap,
    /// The raw body bytes (empty when the body could not be read).
    pub body: Bytes,
    /// The body parsed as JSON, if it was JSON at all (any JSON value, not only objects).
    pub json: Option<Value>,
    /// The status answered, or `None` while the request is still pending (a `Delay`), and forever
    /// for `Hang` and `Close`, which never answer.
    pub answered_status: Option<u16>,
}

/// An invoice the CRM actually created.
#[derive(Clone, Debug, serde::Serialize)]
pub struct StoredInvoice {
    /// UUID-shaped id returned as `invoice_id`.
    pub invoice_id: String,
    /// `INV-<year>-<sequence>` returned as `invoice_number`.
    pub invoice_number: String,
    /// The `idempotency-key` header of the creating request, if any.
    pub idempotency_key: Option<String>,
    /// The body's `pos_sale_id`, if it was a string: what reconciliation searches for.
    pub pos_sale_id: Option<String>,
    /// The validated request body, as received.
    pub body: Value,
}

/// Counters published on a watch channel so waiters wake on change instead of polling.
#[derive(Clone, Copy, Debug, Default)]
struct Counts {
    posts: usize,
    invoices: usize,
}

/// Everything mutable, behind one lock so that an idempotency check and the create it guards
/// cannot interleave with a concurrent duplicate.
#[derive(Debug)]
struct State {
    api_key: String,
    scripts: VecDeque<CrmScript>,
    default_step: CrmScript,
    customers: BTreeMap<String, String>,
    posts: Vec<ReceivedRequest>,
    invoices: Vec<StoredInvoice>,
    by_idempotency_key: HashMap<String, usize>,
    customer_lookups: Vec<String>,
}

#[derive(Debug)]
struct Shared {
    state: Mutex<State>,
    counts: watch::Sender<Counts>,
    /// Connections accepted so far; lets the tests check keep-alive.
    connections: AtomicUsize,
    /// Connections currently open; lets the tests check that nothing is left behind.
    open_connections: AtomicUsize,
}

/// Counts a connection as open for as long as its task lives, however the task ends (abort too).
struct OpenConnection(Arc<Shared>);

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.open_connections.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Shared {
    /// Locks the state. A panic while holding the lock cannot leave it half-updated in a way that
    /// matters here, so a poisoned lock is used as is rather than turning into more panics.
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// An in-process CRM listening on a TCP port; see the module documentation.
///
/// Dropping it (or calling [`SampleCrm::shutdown`]) stops the accept loop and every open
/// connection, hung ones included, so tests never leak tasks or ports.
#[derive(Debug)]
pub struct SampleCrm {
    addr: SocketAddr,
    shared: Arc<Shared>,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

impl SampleCrm {
    /// Starts on an ephemeral loopback port (`127.0.0.1:0`), the usual choice for tests.
    ///
    /// # Errors
    /// When the listening socket cannot be bound.
    pub async fn start(api_key: impl Into<String>) -> std::io::Result<SampleCrm> {
        Self::start_on(SocketAddr::from(([127, 0, 0, 1], 0)), api_key).await
    }

    /// Starts on a given address, for the demo where the proxy is configured with a fixed URL.
    ///
    /// # Errors
    /// When the address cannot be bound (in use, not local, no permission).
    pub async fn start_on(
        addr: SocketAddr,
        api_key: impl Into<String>,
    ) -> std::io::Result<SampleCrm> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let mut customers = BTreeMap::new();
        customers.insert("customer-123".to_owned(), "John Doe".to_owned());
        customers.insert("customer-456".to_owned(), "Jane Smith".to_owned());
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                api_key: api_key.into(),
                scripts: VecDeque::new(),
                default_step: CrmScript::Normal,
                customers,
                posts: Vec::new(),
                invoices: Vec::new(),
                by_idempotency_key: HashMap::new(),
                customer_lookups: Vec::new(),
            }),
            counts: watch::Sender::new(Counts::default()),
            connections: AtomicUsize::new(0),
            open_connections: AtomicUsize::new(0),
        });
        let (stop_tx, stop_rx) = oneshot::channel();
        let task = tokio::spawn(accept_loop(listener, Arc::clone(&shared), stop_rx));
        tracing::debug!(%addr, "sample CRM listening");
        Ok(SampleCrm {
            addr,
            shared,
            stop: Some(stop_tx),
            task,
        })
    }

    /// The bound address (with the real port when started on port 0).
    #[must_use]
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Base URL to configure as the proxy's CRM URL, e.g. `http://127.0.0.1:40123`.
    #[must_use]
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Queues a step for the next invoice POST. Steps are used first in, first out, one per POST,
    /// whatever that POST is answered; when the queue is empty the default step applies.
    pub fn push_script(&self, step: CrmScript) {
        self.shared.lock().scripts.push_back(step);
    }

    /// Sets the step used when the queue is empty (initially [`CrmScript::Normal`]), e.g. a
    /// permanent `Status(503, ..)` for a CRM that stays down.
    pub fn set_default(&self, step: CrmScript) {
        self.shared.lock().default_step = step;
    }

    /// Changes the API key every route expects, e.g. to simulate a rotated key.
    pub fn set_api_key(&self, key: impl Into<String>) {
        self.shared.lock().api_key = key.into();
    }

    /// Adds (or renames) a customer known to `GET /api/external/customers/{id}`.
    pub fn add_customer(&self, id: &str, name: &str) {
        self.shared
            .lock()
            .customers
            .insert(id.to_owned(), name.to_owned());
    }

    /// Every `POST /api/external/invoices` received, in arrival order, whatever was answered.
    #[must_use]
    pub fn invoice_posts(&self) -> Vec<ReceivedRequest> {
        self.shared.lock().posts.clone()
    }

    /// Invoices actually created, in creation order (idempotent replays are not repeated here).
    #[must_use]
    pub fn invoices(&self) -> Vec<StoredInvoice> {
        self.shared.lock().invoices.clone()
    }

    /// Ids asked for on `GET /api/external/customers/{id}`, in order, found or not; lets tests
    /// check that the proxy caches names.
    #[must_use]
    pub fn customer_lookups(&self) -> Vec<String> {
        self.shared.lock().customer_lookups.clone()
    }

    /// Resolves `true` as soon as at least `n` invoices exist, `false` if `timeout` passes first.
    /// Wakes on each creation (no polling), so tests are neither slow nor flaky.
    pub async fn wait_for_invoices(&self, n: usize, timeout: Duration) -> bool {
        self.wait_for_count(timeout, move |c| c.invoices >= n).await
    }

    /// Resolves `true` as soon as at least `n` invoice POSTs have been received (answered or not),
    /// `false` if `timeout` passes first.
    pub async fn wait_for_posts(&self, n: usize, timeout: Duration) -> bool {
        self.wait_for_count(timeout, move |c| c.posts >= n).await
    }

    async fn wait_for_count(&self, timeout: Duration, done: impl FnMut(&Counts) -> bool) -> bool {
        let mut rx = self.shared.counts.subscribe();
        // The sender lives in `self.shared`, so the channel cannot close while we wait.
        let reached = matches!(
            tokio::time::timeout(timeout, rx.wait_for(done)).await,
            Ok(Ok(_))
        );
        reached
    }

    /// Stops accepting, closes every open connection (hung requests included) and waits until the
    /// listening socket is released.
    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        // The accept task ends by itself once told to stop; a join error only means it was
        // already gone, which is the goal anyway.
        let _ = (&mut self.task).await;
    }
}

impl Drop for SampleCrm {
    /// Aborts the accept task; dropping it drops its `JoinSet`, which aborts every connection task.
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Accepts connections until told to stop, serving each in its own task. The connection tasks live
/// in a `JoinSet` owned here, so stopping or aborting this task ends them all.
async fn accept_loop(listener: TcpListener, shared: Arc<Shared>, mut stop: oneshot::Receiver<()>) {
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            _ = &mut stop => break,
            // Reap finished connections so the set does not grow for the CRM's whole life.
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    shared.connections.fetch_add(1, Ordering::Relaxed);
                    shared.open_connections.fetch_add(1, Ordering::Relaxed);
                    conns.spawn(serve_connection(stream, peer, Arc::clone(&shared)));
                }
                Err(err) => {
                    // Usually a transient resource error (EMFILE); back off briefly, keep going.
                    tracing::debug!(%err, "sample CRM accept failed");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            },
        }
    }
    drop(listener);
    conns.shutdown().await;
    tracing::debug!("sample CRM stopped");
}

async fn serve_connection(stream: TcpStream, peer: SocketAddr, shared: Arc<Shared>) {
    let _open = OpenConnection(Arc::clone(&shared));
    let service = service_fn(move |req| {
        let shared = Arc::clone(&shared);
        async move { handle(req, shared).await }
    });
    let result = http1::Builder::new()
        .keep_alive(true)
        .serve_connection(TokioIo::new(stream), service)
        .await;
    if let Err(err) = result {
        // Expected for `CrmScript::Close` and for clients that give up; never worth more than debug.
        tracing::debug!(%peer, %err, "sample CRM connection ended with an error");
    }
}

/// The error a handler returns to make hyper drop the connection without answering.
#[derive(Debug)]
struct DropConnection;

impl std::fmt::Display for DropConnection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("connection dropped on purpose (CrmScript::Close)")
    }
}

impl std::error::Error for DropConnection {}

type Reply = Result<Response<Full<Bytes>>, DropConnection>;

async fn handle(req: Request<Incoming>, shared: Arc<Shared>) -> Reply {
    let path = req.uri().path().to_owned();
    tracing::debug!(method = %req.method(), %path, "sample CRM request");
    if req.method() == Method::POST && path == INVOICES_PATH {
        return post_invoice(req, shared).await;
    }
    let api_key = shared.lock().api_key.clone();
    if let Err(resp) = check_api_key(req.headers(), &api_key) {
        // Still record a customer lookup that was refused: it was asked for.
        if let Some(id) = customer_id_from_path(req.method(), &path) {
            shared.lock().customer_lookups.push(id);
        }
        return Ok(*resp);
    }
    if req.method() == Method::GET && path == INVOICES_PATH {
        return Ok(list_invoices(req.uri().query().unwrap_or(""), &shared));
    }
    if let Some(id) = customer_id_from_path(req.method(), &path) {
        return Ok(get_customer(id, &shared));
    }
    Ok(error_response(StatusCode::NOT_FOUND, "Not found"))
}

/// `Some(id)` (percent-decoded) for `GET /api/external/customers/{id}` with a non-empty id.
fn customer_id_from_path(method: &Method, path: &str) -> Option<String> {
    if method != Method::GET {
        return None;
    }
    let raw = path.strip_prefix(CUSTOMERS_PREFIX)?;
    if raw.is_empty() || raw.contains('/') {
        return None;
    }
    Some(percent_decode(raw, false))
}

/// Compares the `x-api-key` header with the configured key: `Err(401 answer)` when it is missing or
/// wrong. The comparison does not stop at the first differing byte, so response time does not
/// reveal how much of a guessed key was right.
fn check_api_key(headers: &HeaderMap, expected: &str) -> Result<(), Box<Response<Full<Bytes>>>> {
    let error = match headers.get("x-api-key") {
        Some(v) if !v.as_bytes().is_empty() => {
            if constant_time_eq(v.as_bytes(), expected.as_bytes()) {
                return Ok(());
            }
            "Invalid API key"
        }
        _ => "Missing API key",
    };
    Err(Box::new(error_response(StatusCode::UNAUTHORIZED, error)))
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let len = a.len().max(b.len());
    let mut diff = u8::from(a.len() != b.len());
    for i in 0..len {
        let x = a.get(i).copied().unwrap_or(0);
        let y = b.get(i).copied().unwrap_or(0);
        diff |= x ^ y;
    }
    diff == 0
}

async fn post_invoice(req: Request<Incoming>, shared: Arc<Shared>) -> Reply {
    let (parts, body) = req.into_parts();
    let path = parts
        .uri
        .path_and_query()
        .map_or_else(|| parts.uri.path().to_owned(), |pq| pq.as_str().to_owned());
    let collected = Limited::new(body, MAX_BODY_BYTES).collect().await;
    let (body, read_error) = match collected {
        Ok(c) => (c.to_bytes(), None),
        Err(err) => {
            let too_large = err.is::<http_body_util::LengthLimitError>();
            let resp = if too_large {
                error_response(StatusCode::PAYLOAD_TOO_LARGE, "Request body too large")
            } else {
                error_response(StatusCode::BAD_REQUEST, "Could not read request body")
            };
            (Bytes::new(), Some(resp))
        }
    };
    let json = serde_json::from_slice::<Value>(&body).ok();
    let record = ReceivedRequest {
        method: parts.method.clone(),
        path,
        headers: parts.headers.clone(),
        body,
        json: json.clone(),
        answered_status: None,
    };

    // Record first (and wake waiters) so a test sees the request even if the step never answers.
    let (index, plan) = {
        let mut state = shared.lock();
        state.posts.push(record);
        let posts = state.posts.len();
        shared.counts.send_modify(|c| c.posts = posts);
        // A body that could not be read is answered as such and takes no scripted step: no step
        // can mean anything for a request the CRM never fully received.
        let plan = match read_error {
            Some(resp) => Err(resp),
            None => Ok(state
                .scripts
                .pop_front()
                .unwrap_or_else(|| state.default_step.clone())),
        };
        (posts - 1, plan)
    };

    let resp = match plan {
        Err(resp) => resp,
        Ok(mut step) => loop {
            match step {
                CrmScript::Delay(wait, inner) => {
                    tokio::time::sleep(wait).await;
                    step = *inner;
                }
                CrmScript::Hang => {
                    // Held until the client disconnects (hyper then drops this future) or
                    // `shutdown`/`Drop` ends the connection task.
                    std::future::pending::<()>().await;
                }
                CrmScript::Close => return Err(DropConnection),
                CrmScript::Status(code, body) => break scripted_status(code, body),
                CrmScript::NotJson => {
                    break raw_response(StatusCode::OK, "text/html", "<html>oops</html>".into())
                }
                CrmScript::SuccessFalse => {
                    break error_response(StatusCode::OK, "Duplicate invoice")
                }
                CrmScript::Normal => break create_invoice(&parts.headers, json, &shared),
            }
        },
    };
    if let Some(post) = shared.lock().posts.get_mut(index) {
        post.answered_status = Some(resp.status().as_u16());
    }
    Ok(resp)
}

fn scripted_status(code: u16, body: String) -> Response<Full<Bytes>> {
    let status = StatusCode::from_u16(code)
        .ok()
        .filter(|s| !s.is_informational())
        .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    raw_response(status, "application/json", Bytes::from(body))
}

/// The real create: key check, JSON check, validation, idempotent replay, then a new invoice.
fn create_invoice(
    headers: &HeaderMap,
    json: Option<Value>,
    shared: &Shared,
) -> Response<Full<Bytes>> {
    let api_key = shared.lock().api_key.clone();
    if let Err(resp) = check_api_key(headers, &api_key) {
        return *resp;
    }
    let body = match json {
        Some(body @ Value::Object(_)) => body,
        _ => return error_response(StatusCode::BAD_REQUEST, "Invalid JSON body"),
    };
    if let Err(msg) = validate_invoice(&body) {
        return error_response(StatusCode::BAD_REQUEST, &msg);
    }
    let idempotency_key = headers
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .filter(|k| !k.is_empty())
        .map(str::to_owned);

    let mut state = shared.lock();
    if let Some(key) = &idempotency_key {
        if let Some(existing) = state
            .by_idempotency_key
            .get(key)
            .and_then(|&i| state.invoices.get(i))
        {
            tracing::debug!(invoice = %existing.invoice_number, "sample CRM idempotent replay");
            let mut resp = json_response(StatusCode::OK, &created_body(existing));
            resp.headers_mut()
                .insert("idempotent-replayed", HeaderValue::from_static("true"));
            return resp;
        }
    }
    let seq = state.invoices.len() + 1;
    let year = time::OffsetDateTime::now_utc().year();
    let invoice = StoredInvoice {
        invoice_id: format!("3f2b8c1e-0000-4000-8000-{seq:012}"),
        invoice_number: format!("INV-{year}-{seq:04}"),
        idempotency_key: idempotency_key.clone(),
        pos_sale_id: body
            .get("pos_sale_id")
            .and_then(Value::as_str)
            .map(str::to_owned),
        body,
    };
    let resp = json_response(StatusCode::CREATED, &created_body(&invoice));
    tracing::debug!(invoice = %invoice.invoice_number, "sample CRM created invoice");
    state.invoices.push(invoice);
    let index = state.invoices.len() - 1;
    if let Some(key) = idempotency_key {
        state.by_idempotency_key.insert(key, index);
    }
    let invoices = state.invoices.len();
    shared.counts.send_modify(|c| c.invoices = invoices);
    resp
}

fn created_body(invoice: &StoredInvoice) -> Value {
    json!({
        "success": true,
        "invoice_id": invoice.invoice_id,
        "invoice_number": invoice.invoice_number,
    })
}

/// Checks an invoice body; `Err("<field>: <what is wrong>")` for the first problem found.
fn validate_invoice(body: &Value) -> Result<(), String> {
    match body.get("customer_id") {
        None | Some(Value::Null) => return Err("customer_id: is required".into()),
        Some(Value::String(s)) if s.trim().is_empty() => {
            return Err("customer_id: must not be empty".into())
        }
        Some(Value::String(_)) => {}
        Some(_) => return Err("customer_id: must be a string".into()),
    }
    match body.get("amount") {
        None | Some(Value::Null) => return Err("amount: is required".into()),
        Some(Value::Number(n)) => {
            if !n.as_f64().is_some_and(|v| v > 0.0) {
                return Err("amount: must be greater than 0".into());
            }
        }
        Some(_) => return Err("amount: must be a number".into()),
    }
    let items = match body.get("line_items") {
        None | Some(Value::Null) => return Err("line_items: is required".into()),
        Some(Value::Array(items)) => items,
        Some(_) => return Err("line_items: must be an array".into()),
    };
    if items.is_empty() {
        return Err("line_items: must contain at least one item".into());
    }
    for (i, item) in items.iter().enumerate() {
        let Some(item) = item.as_object() else {
            return Err(format!("line_items[{i}]: must be an object"));
        };
        if !item.get("description").is_some_and(Value::is_string) {
            return Err(format!("line_items[{i}].description: must be a string"));
        }
        let quantity = item.get("quantity").and_then(Value::as_f64);
        if !quantity.is_some_and(|q| q > 0.0) {
            return Err(format!(
                "line_items[{i}].quantity: must be a number greater than 0"
            ));
        }
        let price = item.get("price").and_then(Value::as_f64);
        if !price.is_some_and(|p| p >= 0.0) {
            return Err(format!(
                "line_items[{i}].price: must be a number greater than or equal to 0"
            ));
        }
    }
    match body.get("status") {
        None | Some(Value::Null) => {}
        Some(Value::String(s)) if INVOICE_STATUSES.contains(&s.as_str()) => {}
        Some(_) => {
            return Err(format!(
                "status: must be one of {}",
                INVOICE_STATUSES.join(", ")
            ))
        }
    }
    match body.get("date") {
        None | Some(Value::Null) => {}
        Some(Value::String(s)) if is_calendar_date(s) => {}
        Some(_) => return Err("date: must be a valid date in YYYY-MM-DD format".into()),
    }
    Ok(())
}

/// `YYYY-MM-DD` with exactly that shape and a day that exists.
fn is_calendar_date(s: &str) -> bool {
    let b = s.as_bytes();
    let shape_ok = b.len() == 10
        && b[4] == b'-'
        && b[7] == b'-'
        && b.iter()
            .enumerate()
            .all(|(i, c)| i == 4 || i == 7 || c.is_ascii_digit());
    if !shape_ok {
        return false;
    }
    let (Ok(year), Ok(month), Ok(day)) = (
        s[0..4].parse::<i32>(),
        s[5..7].parse::<u8>(),
        s[8..10].parse::<u8>(),
    ) else {
        return false;
    };
    match time::Month::try_from(month) {
        Ok(month) => time::Date::from_calendar_date(year, month, day).is_ok(),
        Err(_) => false,
    }
}

/// `GET /api/external/invoices?page=&perPage=&search=`: creation order, 1-based pages.
fn list_invoices(query: &str, shared: &Shared) -> Response<Full<Bytes>> {
    let mut page: u64 = 1;
    let mut per_page: u64 = 50;
    let mut search: Option<String> = None;
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        let value = percent_decode(value, true);
        match percent_decode(key, true).as_str() {
            "page" => page = value.trim().parse().unwrap_or(1).max(1),
            "perPage" => per_page = value.trim().parse().unwrap_or(50).clamp(1, MAX_PER_PAGE),
            "search" if !value.trim().is_empty() => search = Some(value.trim().to_lowercase()),
            _ => {}
        }
    }

    let state = shared.lock();
    let matching: Vec<&StoredInvoice> = state
        .invoices
        .iter()
        .filter(|inv| match &search {
            None => true,
            Some(needle) => invoice_matches(inv, needle),
        })
        .collect();
    let total = matching.len() as u64;
    let total_pages = total.div_ceil(per_page);
    let skip =
        usize::try_from(page.saturating_sub(1).saturating_mul(per_page)).unwrap_or(usize::MAX);
    let take = usize::try_from(per_page).unwrap_or(usize::MAX);
    let data: Vec<Value> = matching
        .into_iter()
        .skip(skip)
        .take(take)
        .map(invoice_listing_entry)
        .collect();
    json_response(
        StatusCode::OK,
        &json!({
            "data": data,
            "pagination": {
                "page": page,
                "perPage": per_page,
                "total": total,
                "totalPages": total_pages,
            }
        }),
    )
}

/// Case-insensitive substring match over the fields reconciliation searches by; `needle` is
/// already lower-case.
fn invoice_matches(inv: &StoredInvoice, needle: &str) -> bool {
    let field = |name: &str| {
        inv.body
            .get(name)
            .and_then(Value::as_str)
            .map(str::to_lowercase)
    };
    inv.invoice_number.to_lowercase().contains(needle)
        || [field("customer"), field("pos_sale_id"), field("notes")]
            .iter()
            .flatten()
            .any(|v| v.contains(needle))
}

/// The stored body plus the server-assigned `id` and `invoice_number`, so a listing entry has every
/// field that was sent (`customer_id`, `customer`, `amount`, `status`, `pos_sale_id`, `date`, ...).
fn invoice_listing_entry(inv: &StoredInvoice) -> Value {
    let mut entry = match &inv.body {
        Value::Object(map) => map.clone(),
        _ => Map::new(),
    };
    entry.insert("id".into(), Value::String(inv.invoice_id.clone()));
    entry.insert(
        "invoice_number".into(),
        Value::String(inv.invoice_number.clone()),
    );
    for key in ["customer", "pos_sale_id", "date", "status"] {
        entry.entry(key).or_insert(Value::Null);
    }
    Value::Object(entry)
}

fn get_customer(id: String, shared: &Shared) -> Response<Full<Bytes>> {
    let mut state = shared.lock();
    state.customer_lookups.push(id.clone());
    match state.customers.get(&id) {
        Some(name) => {
            let email = format!(
                "{}@example.com",
                name.split_whitespace()
                    .collect::<Vec<_>>()
                    .join(".")
                    .to_lowercase()
            );
            json_response(
                StatusCode::OK,
                &json!({ "id": id, "name": name, "email": email }),
            )
        }
        None => error_response(StatusCode::NOT_FOUND, "Customer not found"),
    }
}

/// Decodes `%XX` escapes (and `+` as space in query strings); invalid escapes are kept literally
/// and invalid UTF-8 is replaced, since a test CRM should answer rather than reject odd input.
fn percent_decode(s: &str, plus_is_space: bool) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = bytes
                    .get(i + 1..i + 3)
                    .and_then(|h| std::str::from_utf8(h).ok())
                    .and_then(|h| u8::from_str_radix(h, 16).ok());
                match hex {
                    Some(byte) => {
                        out.push(byte);
                        i += 3;
                    }
                    None => {
                        out.push(b'%');
                        i += 1;
                    }
                }
            }
            b'+' if plus_is_space => {
                out.push(b' ');
                i += 1;
            }
            other => {
                out.push(other);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn error_response(status: StatusCode, error: &str) -> Response<Full<Bytes>> {
    json_response(status, &json!({ "success": false, "error": error }))
}

fn json_response(status: StatusCode, body: &Value) -> Response<Full<Bytes>> {
    raw_response(status, "application/json", Bytes::from(body.to_string()))
}

fn raw_response(
    status: StatusCode,
    content_type: &'static str,
    body: Bytes,
) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(body));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    resp
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper_util::client::legacy::connect::HttpConnector;
    use hyper_util::client::legacy::Client as LegacyClient;
    use hyper_util::rt::TokioExecutor;
    use std::time::Instant;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    const KEY: &str = "test-key";
    const LONG: Duration = Duration::from_secs(10);

    // The tests talk to the CRM through hyper-util's plain-HTTP client rather than reqwest: in the
    // proxy crate reqwest is built with `rustls-no-provider`, so building a reqwest client there
    // panics unless a rustls crypto provider was installed first, which this self-contained file
    // cannot do. Plain HTTP needs no TLS at all.
    #[derive(Clone)]
    struct TestClient {
        inner: LegacyClient<HttpConnector, Full<Bytes>>,
        timeout: Duration,
    }

    /// Why a request got no answer: the client's own timeout, or a transport failure.
    #[derive(Debug)]
    enum Failure {
        TimedOut,
        Failed(String),
    }

    impl Failure {
        fn is_timeout(&self) -> bool {
            matches!(self, Failure::TimedOut)
        }
    }

    struct TestRequest {
        client: TestClient,
        builder: http::request::Builder,
        body: Bytes,
    }

    impl TestClient {
        fn request(&self, method: Method, url: impl AsRef<str>) -> TestRequest {
            TestRequest {
                client: self.clone(),
                builder: Request::builder().method(method).uri(url.as_ref()),
                body: Bytes::new(),
            }
        }

        fn get(&self, url: impl AsRef<str>) -> TestRequest {
            self.request(Method::GET, url)
        }

        fn post(&self, url: impl AsRef<str>) -> TestRequest {
            self.request(Method::POST, url)
        }
    }

    impl TestRequest {
        fn header(mut self, name: &'static str, value: &str) -> Self {
            self.builder = self.builder.header(name, value);
            self
        }

        fn body(mut self, body: impl Into<Bytes>) -> Self {
            self.body = body.into();
            self
        }
    }

    fn client() -> TestClient {
        client_with_timeout(LONG)
    }

    fn client_with_timeout(timeout: Duration) -> TestClient {
        TestClient {
            inner: LegacyClient::builder(TokioExecutor::new()).build_http(),
            timeout,
        }
    }

    fn sale_body(sale_id: &str, customer_id: &str, customer: &str) -> Value {
        json!({
            "customer_id": customer_id, "customer": customer, "amount": 11, "paid_amount": 11,
            "currency": "USD", "status": "paid", "date": "2026-11-25",
            "payment_method": "Credit Card", "pos_sale_id": sale_id, "warehouse_id": "WH1",
            "notes": format!("POS Sale #{sale_id} - Payment: Credit Card"),
            "line_items": [
                {"description": "Test Coffee", "quantity": 2, "price": 4.5, "total": 9,
                 "sku": "test-product-1", "type": "product", "cost_price": 0},
                {"description": "Gift Wrapping", "quantity": 1, "price": 1, "total": 1,
                 "sku": "test-service-1", "type": "service", "cost_price": 0}
            ]
        })
    }

    fn default_body() -> Value {
        sale_body("POS_1795586791062_cnttqx05g", "customer-123", "John Doe")
    }

    struct Answer {
        status: u16,
        headers: HeaderMap,
        text: String,
    }

    impl Answer {
        fn json(&self) -> Value {
            serde_json::from_str(&self.text).expect("JSON answer")
        }
    }

    async fn send(req: TestRequest) -> Result<Answer, Failure> {
        let TestRequest {
            client,
            builder,
            body,
        } = req;
        let request = builder
            .body(Full::new(body))
            .map_err(|e| Failure::Failed(e.to_string()))?;
        let exchange = async {
            let resp = client
                .inner
                .request(request)
                .await
                .map_err(|e| Failure::Failed(format!("{e:?}")))?;
            let status = resp.status().as_u16();
            let headers = resp.headers().clone();
            let body = resp
                .into_body()
                .collect()
                .await
                .map_err(|e| Failure::Failed(format!("{e:?}")))?
                .to_bytes();
            Ok(Answer {
                status,
                headers,
                text: String::from_utf8_lossy(&body).into_owned(),
            })
        };
        tokio::time::timeout(client.timeout, exchange)
            .await
            .unwrap_or(Err(Failure::TimedOut))
    }

    fn post_req(
        client: &TestClient,
        crm: &SampleCrm,
        key: Option<&str>,
        idempotency_key: Option<&str>,
        body: String,
    ) -> TestRequest {
        let mut req = client
            .post(format!("{}/api/external/invoices", crm.url()))
            .header("content-type", "application/json")
            .body(body);
        if let Some(key) = key {
            req = req.header("x-api-key", key);
        }
        if let Some(idem) = idempotency_key {
            req = req.header("idempotency-key", idem);
        }
        req
    }

    async fn post(crm: &SampleCrm, idempotency_key: Option<&str>, body: &Value) -> Answer {
        send(post_req(
            &client(),
            crm,
            Some(KEY),
            idempotency_key,
            body.to_string(),
        ))
        .await
        .expect("POST answered")
    }

    async fn get(crm: &SampleCrm, path_and_query: &str) -> Answer {
        send(
            client()
                .get(format!("{}{}", crm.url(), path_and_query))
                .header("x-api-key", KEY),
        )
        .await
        .expect("GET answered")
    }

    /// Bounded check for conditions the CRM has no notification for (task teardown), used only by
    /// tests about cleanup.
    async fn eventually(mut condition: impl FnMut() -> bool) -> bool {
        for _ in 0..200 {
            if condition() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        condition()
    }

    fn is_uuid_shaped(s: &str) -> bool {
        let groups: Vec<&str> = s.split('-').collect();
        groups.iter().map(|g| g.len()).eq([8, 4, 4, 4, 12])
            && groups
                .iter()
                .all(|g| g.bytes().all(|b| b.is_ascii_hexdigit()))
    }

    fn year() -> i32 {
        time::OffsetDateTime::now_utc().year()
    }

    #[tokio::test]
    async fn creates_invoices_numbered_in_sequence() {
        let crm = SampleCrm::start(KEY).await.unwrap();
        let first = post(&crm, Some("sale-1"), &default_body()).await;
        assert_eq!(first.status, 201);
        assert_eq!(
            first.headers.get("content-type").unwrap(),
            "application/json"
        );
        let first = first.json();
        assert_eq!(first["success"], true);
        assert_eq!(first["invoice_number"], format!("INV-{}-0001", year()));
        let id1 = first["invoice_id"].as_str().unwrap().to_owned();
        assert!(is_uuid_shaped(&id1), "{id1}");

        let second = post(
            &crm,
            None,
            &sale_body("POS_2", "customer-456", "Jane Smith"),
        )
        .await;
        assert_eq!(second.status, 201);
        let second = second.json();
        assert_eq!(second["invoice_number"], format!("INV-{}-0002", year()));
        let id2 = second["invoice_id"].as_str().unwrap();
        assert!(is_uuid_shaped(id2));
        assert_ne!(id1, id2);

        let invoices = crm.invoices();
        assert_eq!(invoices.len(), 2);
        assert_eq!(invoices[0].invoice_id, id1);
        assert_eq!(invoices[0].idempotency_key.as_deref(), Some("sale-1"));
        assert_eq!(
            invoices[0].pos_sale_id.as_deref(),
            Some("POS_1795586791062_cnttqx05g")
        );
        assert_eq!(invoices[0].body, default_body());
        assert_eq!(invoices[1].idempotency_key, None);
        assert_eq!(invoices[1].pos_sale_id.as_deref(), Some("POS_2"));

        let posts = crm.invoice_posts();
        assert_eq!(posts.len(), 2);
        assert_eq!(posts[0].method, Method::POST);
        assert_eq!(posts[0].path, "/api/external/invoices");
        assert_eq!(posts[0].headers.get("x-api-key").unwrap(), KEY);
        assert_eq!(posts[0].headers.get("idempotency-key").unwrap(), "sale-1");
        assert_eq!(posts[0].json.as_ref(), Some(&default_body()));
        assert_eq!(posts[0].body, Bytes::from(default_body().to_string()));
        assert_eq!(posts[0].answered_status, Some(201));
        assert_eq!(posts[1].answered_status, Some(201));
        crm.shutdown().await;
    }

    #[tokio::test]
    async fn idempotent_repeat_returns_the_same_invoice() {
        let crm = SampleCrm::start(KEY).await.unwrap();
        let first = post(&crm, Some("pos-sale-abc"), &default_body()).await;
        assert_eq!(first.status, 201);
        assert!(first.headers.get("idempotent-replayed").is_none());
        let again = post(&crm, Some("pos-sale-abc"), &default_body()).await;
        assert_eq!(again.status, 200);
        assert_eq!(again.headers.get("idempotent-replayed").unwrap(), "true");
        assert_eq!(again.json(), first.json());
        assert_eq!(crm.invoices().len(), 1);
        assert_eq!(crm.invoice_posts().len(), 2);
        assert_eq!(crm.invoice_posts()[1].answered_status, Some(200));

        let other = post(&crm, Some("pos-sale-def"), &default_body()).await;
        assert_eq!(other.status, 201);
        assert_eq!(
            other.json()["invoice_number"],
            format!("INV-{}-0002", year())
        );
        assert_eq!(crm.invoices().len(), 2);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_duplicates_create_one_invoice() {
        let crm = SampleCrm::start(KEY).await.unwrap();
        let client = client();
        let sends = (0..8).map(|_| {
            send(post_req(
                &client,
                &crm,
                Some(KEY),
                Some("same-sale"),
                default_body().to_string(),
            ))
        });
        let mut answers = Vec::new();
        for handle in sends.map(tokio::spawn).collect::<Vec<_>>() {
            answers.push(handle.await.unwrap().unwrap());
        }
        assert_eq!(crm.invoices().len(), 1);
        assert_eq!(answers.iter().filter(|a| a.status == 201).count(), 1);
        assert_eq!(answers.iter().filter(|a| a.status == 200).count(), 7);
        let ids: Vec<Value> = answers
            .iter()
            .map(|a| a.json()["invoice_id"].clone())
            .collect();
        assert!(ids.iter().all(|id| *id == ids[0]));
    }

    #[tokio::test]
    async fn rejects_invalid_invoices_with_the_field_at_fault() {
        let crm = SampleCrm::start(KEY).await.unwrap();
        let with = |edit: &dyn Fn(&mut Value)| {
            let mut body = default_body();
            edit(&mut body);
            body
        };
        let cases: Vec<(Value, &str)> = vec![
            (
                with(&|b| {
                    b.as_object_mut().unwrap().remove("customer_id");
                }),
                "customer_id: is required",
            ),
            (
                with(&|b| b["customer_id"] = json!(123)),
                "customer_id: must be a string",
            ),
            (
                with(&|b| b["customer_id"] = json!("")),
                "customer_id: must not be empty",
            ),
            (
                with(&|b| b["customer_id"] = json!("  ")),
                "customer_id: must not be empty",
            ),
            (
                with(&|b| {
                    b.as_object_mut().unwrap().remove("amount");
                }),
                "amount: is required",
            ),
            (
                with(&|b| b["amount"] = json!("11")),
                "amount: must be a number",
            ),
            (
                with(&|b| b["amount"] = json!(0)),
                "amount: must be greater than 0",
            ),
            (
                with(&|b| b["amount"] = json!(-5.5)),
                "amount: must be greater than 0",
            ),
            (
                with(&|b| {
                    b.as_object_mut().unwrap().remove("line_items");
                }),
                "line_items: is required",
            ),
            (
                with(&|b| b["line_items"] = json!({})),
                "line_items: must be an array",
            ),
            (
                with(&|b| b["line_items"] = json!([])),
                "line_items: must contain at least one item",
            ),
            (
                with(&|b| b["line_items"][1] = json!("coffee")),
                "line_items[1]: must be an object",
            ),
            (
                with(&|b| {
                    b["line_items"][0]
                        .as_object_mut()
                        .unwrap()
                        .remove("description");
                }),
                "line_items[0].description: must be a string",
            ),
            (
                with(&|b| b["line_items"][0]["description"] = json!(7)),
                "line_items[0].description: must be a string",
            ),
            (
                with(&|b| b["line_items"][0]["quantity"] = json!(0)),
                "line_items[0].quantity: must be a number greater than 0",
            ),
            (
                with(&|b| b["line_items"][1]["quantity"] = json!("1")),
                "line_items[1].quantity: must be a number greater than 0",
            ),
            (
                with(&|b| b["line_items"][0]["price"] = json!(-0.01)),
                "line_items[0].price: must be a number greater than or equal to 0",
            ),
            (
                with(&|b| {
                    b["line_items"][0].as_object_mut().unwrap().remove("price");
                }),
                "line_items[0].price: must be a number greater than or equal to 0",
            ),
            (
                with(&|b| b["status"] = json!("settled")),
                "status: must be one of draft, sent, paid, overdue, cancelled",
            ),
            (
                with(&|b| b["status"] = json!(1)),
                "status: must be one of draft, sent, paid, overdue, cancelled",
            ),
            (
                with(&|b| b["date"] = json!("25/11/2026")),
                "date: must be a valid date in YYYY-MM-DD format",
            ),
            (
                with(&|b| b["date"] = json!("2026-02-30")),
                "date: must be a valid date in YYYY-MM-DD format",
            ),
            (
                with(&|b| b["date"] = json!("2026-11-25T10:00:00Z")),
                "date: must be a valid date in YYYY-MM-DD format",
            ),
        ];
        for (body, expected) in &cases {
            let answer = post(&crm, Some("k"), body).await;
            assert_eq!(answer.status, 400, "{expected}");
            assert_eq!(
                answer.json(),
                json!({"success": false, "error": expected}),
                "{body}"
            );
        }
        for raw in ["not json", "", "[1,2]", "null", "\"text\"", "{\"a\":"] {
            let answer = send(post_req(&client(), &crm, Some(KEY), None, raw.to_owned()))
                .await
                .unwrap();
            assert_eq!(answer.status, 400, "{raw}");
            assert_eq!(
                answer.json(),
                json!({"success": false, "error": "Invalid JSON body"})
            );
        }
        // Optional fields may be absent or null, and a price of 0 is fine.
        let minimal = json!({"customer_id": "c", "amount": 0.5, "status": null,
            "line_items": [{"description": "Free sample", "quantity": 0.5, "price": 0}]});
        assert_eq!(post(&crm, None, &minimal).await.status, 201);

        assert_eq!(crm.invoices().len(), 1);
        let posts = crm.invoice_posts();
        assert_eq!(posts.len(), cases.len() + 6 + 1);
        assert!(posts[..posts.len() - 1]
            .iter()
            .all(|p| p.answered_status == Some(400)));
        // The idempotency key of a rejected request does not block a later valid one.
        assert_eq!(post(&crm, Some("k"), &default_body()).await.status, 201);
    }

    #[tokio::test]
    async fn checks_the_api_key_on_every_route() {
        let crm = SampleCrm::start(KEY).await.unwrap();
        let client = client();
        let body = default_body().to_string();
        let missing = send(post_req(&client, &crm, None, None, body.clone()))
            .await
            .unwrap();
        assert_eq!(missing.status, 401);
        assert_eq!(
            missing.json(),
            json!({"success": false, "error": "Missing API key"})
        );
        let empty = send(post_req(&client, &crm, Some(""), None, body.clone()))
            .await
            .unwrap();
        assert_eq!(empty.status, 401);
        assert_eq!(empty.json()["error"], "Missing API key");
        for wrong in ["wrong-key", "test-ke", "test-key2"] {
            let answer = send(post_req(&client, &crm, Some(wrong), None, body.clone()))
                .await
                .unwrap();
            assert_eq!(answer.status, 401);
            assert_eq!(
                answer.json(),
                json!({"success": false, "error": "Invalid API key"})
            );
        }
        for path in [
            "/api/external/invoices?page=1&perPage=50",
            "/api/external/customers/customer-123",
            "/nowhere",
        ] {
            let url = format!("{}{}", crm.url(), path);
            let answer = send(client.get(&url)).await.unwrap();
            assert_eq!(answer.status, 401, "{path}");
            assert_eq!(answer.json()["error"], "Missing API key");
            let answer = send(client.get(&url).header("x-api-key", "nope"))
                .await
                .unwrap();
            assert_eq!(answer.status, 401, "{path}");
            assert_eq!(answer.json()["error"], "Invalid API key");
        }
        assert!(crm.invoices().is_empty());
        let posts = crm.invoice_posts();
        assert_eq!(posts.len(), 5);
        assert!(posts.iter().all(|p| p.answered_status == Some(401)));

        crm.set_api_key("rotated");
        assert_eq!(post(&crm, None, &default_body()).await.status, 401);
        let answer = send(post_req(&client, &crm, Some("rotated"), None, body))
            .await
            .unwrap();
        assert_eq!(answer.status, 201);
    }

    #[tokio::test]
    async fn scripts_run_in_fifo_order_then_the_default() {
        let crm = SampleCrm::start(KEY).await.unwrap();
        crm.push_script(CrmScript::Status(
            503,
            r#"{"success":false,"error":"Service unavailable"}"#.into(),
        ));
        crm.push_script(CrmScript::NotJson);
        crm.push_script(CrmScript::SuccessFalse);
        crm.push_script(CrmScript::Status(500, "{}".into()));

        let a = post(&crm, None, &default_body()).await;
        assert_eq!(a.status, 503);
        assert_eq!(a.headers.get("content-type").unwrap(), "application/json");
        assert_eq!(a.text, r#"{"success":false,"error":"Service unavailable"}"#);

        let b = post(&crm, None, &default_body()).await;
        assert_eq!(b.status, 200);
        assert_eq!(b.headers.get("content-type").unwrap(), "text/html");
        assert_eq!(b.text, "<html>oops</html>");

        let c = post(&crm, None, &default_body()).await;
        assert_eq!(c.status, 200);
        assert_eq!(
            c.json(),
            json!({"success": false, "error": "Duplicate invoice"})
        );

        // A scripted step is consumed even by a request that Normal would have refused.
        let d = send(post_req(&client(), &crm, None, None, "junk".into()))
            .await
            .unwrap();
        assert_eq!((d.status, d.text.as_str()), (500, "{}"));
        assert!(crm.invoices().is_empty());

        let e = post(&crm, None, &default_body()).await;
        assert_eq!(e.status, 201);
        assert_eq!(crm.invoices().len(), 1);

        crm.set_default(CrmScript::Status(502, "bad gateway".into()));
        crm.push_script(CrmScript::Normal);
        assert_eq!(post(&crm, None, &default_body()).await.status, 201);
        assert_eq!(post(&crm, None, &default_body()).await.status, 502);
        assert_eq!(post(&crm, None, &default_body()).await.status, 502);
        crm.set_default(CrmScript::Normal);
        assert_eq!(post(&crm, None, &default_body()).await.status, 201);

        let statuses: Vec<Option<u16>> = crm
            .invoice_posts()
            .iter()
            .map(|p| p.answered_status)
            .collect();
        let expected = [503, 200, 200, 500, 201, 201, 502, 502, 201];
        assert_eq!(statuses, expected.map(Some));
        assert_eq!(crm.invoices().len(), 3);
    }

    #[tokio::test]
    async fn unsendable_scripted_status_becomes_500() {
        let crm = SampleCrm::start(KEY).await.unwrap();
        crm.push_script(CrmScript::Status(42, "{}".into()));
        crm.push_script(CrmScript::Status(101, "{}".into()));
        crm.push_script(CrmScript::Status(418, "{\"tea\":1}".into()));
        assert_eq!(post(&crm, None, &default_body()).await.status, 500);
        assert_eq!(post(&crm, None, &default_body()).await.status, 500);
        assert_eq!(post(&crm, None, &default_body()).await.status, 418);
        assert_eq!(crm.invoice_posts()[0].answered_status, Some(500));
    }

    #[tokio::test]
    async fn delay_records_first_then_answers_like_the_inner_step() {
        let crm = SampleCrm::start(KEY).await.unwrap();
        crm.push_script(CrmScript::Delay(
            Duration::from_millis(800),
            Box::new(CrmScript::Normal),
        ));
        let started = Instant::now();
        let pending = tokio::spawn(send(post_req(
            &client(),
            &crm,
            Some(KEY),
            Some("slow"),
            default_body().to_string(),
        )));
        assert!(crm.wait_for_posts(1, LONG).await);
        // Seen on arrival, not yet answered.
        assert!(started.elapsed() < Duration::from_millis(800));
        assert_eq!(crm.invoice_posts()[0].answered_status, None);
        assert!(crm.invoices().is_empty());

        let answer = pending.await.unwrap().unwrap();
        assert!(started.elapsed() >= Duration::from_millis(800));
        assert_eq!(answer.status, 201);
        assert_eq!(crm.invoices().len(), 1);
        assert_eq!(crm.invoice_posts()[0].answered_status, Some(201));

        // Delays nest, and wrap any step.
        crm.push_script(CrmScript::Delay(
            Duration::from_millis(50),
            Box::new(CrmScript::Delay(
                Duration::from_millis(50),
                Box::new(CrmScript::SuccessFalse),
            )),
        ));
        let started = Instant::now();
        let answer = post(&crm, None, &default_body()).await;
        assert!(started.elapsed() >= Duration::from_millis(100));
        assert_eq!(answer.json()["error"], "Duplicate invoice");
    }

    #[tokio::test]
    async fn delay_beyond_the_client_timeout_times_out() {
        let crm = SampleCrm::start(KEY).await.unwrap();
        crm.push_script(CrmScript::Delay(LONG, Box::new(CrmScript::Normal)));
        let client = client_with_timeout(Duration::from_millis(200));
        let err = send(post_req(&client, &crm, Some(KEY), None, "{}".into()))
            .await
            .err()
            .expect("timed out");
        assert!(err.is_timeout(), "{err:?}");
    }

    #[tokio::test]
    async fn hang_never_answers_until_the_client_gives_up() {
        let crm = SampleCrm::start(KEY).await.unwrap();
        crm.push_script(CrmScript::Hang);
        let client = client_with_timeout(Duration::from_millis(300));
        let started = Instant::now();
        let err = send(post_req(
            &client,
            &crm,
            Some(KEY),
            None,
            default_body().to_string(),
        ))
        .await
        .err()
        .expect("no answer");
        assert!(err.is_timeout(), "{err:?}");
        assert!(started.elapsed() >= Duration::from_millis(300));
        // Once the client gives up, the held connection goes away on the CRM side too.
        assert!(
            eventually(|| crm.shared.open_connections.load(Ordering::Relaxed) == 0).await,
            "hung connection still open after the client left"
        );
        let posts = crm.invoice_posts();
        assert_eq!(posts.len(), 1);
        assert_eq!(posts[0].json.as_ref(), Some(&default_body()));
        assert_eq!(posts[0].answered_status, None);
        assert!(crm.invoices().is_empty());
        // The CRM itself is still fine.
        assert_eq!(post(&crm, None, &default_body()).await.status, 201);
    }

    #[tokio::test]
    async fn close_drops_the_connection_without_answering() {
        let crm = SampleCrm::start(KEY).await.unwrap();
        crm.push_script(CrmScript::Close);
        let started = Instant::now();
        let err = send(post_req(
            &client(),
            &crm,
            Some(KEY),
            None,
            default_body().to_string(),
        ))
        .await
        .err()
        .expect("connection error");
        assert!(!err.is_timeout(), "{err:?}");
        let Failure::Failed(reason) = err else {
            panic!("expected a connection error, got {err:?}");
        };
        // The connection closed before any answer: hyper reports an incomplete message.
        assert!(reason.contains("IncompleteMessage"), "{reason}");
        assert!(started.elapsed() < Duration::from_secs(5));
        let posts = crm.invoice_posts();
        assert_eq!(posts.len(), 1);
        assert_eq!(posts[0].answered_status, None);
        assert!(crm.invoices().is_empty());
        assert_eq!(post(&crm, None, &default_body()).await.status, 201);

        // On a raw socket: the request is read, then EOF with not a byte of answer.
        crm.push_script(CrmScript::Delay(
            Duration::from_millis(20),
            Box::new(CrmScript::Close),
        ));
        let mut stream = TcpStream::connect(crm.addr()).await.unwrap();
        let body = default_body().to_string();
        let request = format!(
            "POST /api/external/invoices HTTP/1.1\r\nhost: x\r\nx-api-key: {KEY}\r\n\
             content-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        );
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut answer = Vec::new();
        let read = tokio::time::timeout(LONG, stream.read_to_end(&mut answer)).await;
        assert!(read.is_ok(), "connection was not closed");
        assert!(answer.is_empty(), "{}", String::from_utf8_lossy(&answer));
    }

    #[tokio::test]
    async fn shutdown_releases_hung_requests_and_the_port() {
        let crm = SampleCrm::start(KEY).await.unwrap();
        crm.set_default(CrmScript::Hang);
        let addr = crm.addr();
        let pending = tokio::spawn(send(post_req(
            &client(),
            &crm,
            Some(KEY),
            None,
            default_body().to_string(),
        )));
        assert!(crm.wait_for_posts(1, LONG).await);
        let started = Instant::now();
        let weak = Arc::downgrade(&crm.shared);
        crm.shutdown().await;
        // Every task (accept loop and connections, the hung one included) is gone when it returns.
        assert!(weak.upgrade().is_none());
        let result = pending.await.unwrap();
        let err = result.err().expect("hung request fails at shutdown");
        assert!(!err.is_timeout(), "{err:?}");
        assert!(started.elapsed() < Duration::from_secs(5));
        assert!(TcpStream::connect(addr).await.is_err());
    }

    #[tokio::test]
    async fn drop_stops_the_server() {
        let crm = SampleCrm::start(KEY).await.unwrap();
        let addr = crm.addr();
        assert_eq!(post(&crm, None, &default_body()).await.status, 201);
        let weak = Arc::downgrade(&crm.shared);
        drop(crm);
        // Abort is asynchronous: give the runtime a bounded moment to drop the aborted tasks.
        assert!(
            eventually(|| weak.upgrade().is_none()).await,
            "accept task or a connection task still alive"
        );
        assert!(TcpStream::connect(addr).await.is_err());
    }

    #[tokio::test]
    async fn start_on_binds_the_given_address() {
        let probe = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = probe.local_addr().unwrap();
        drop(probe);
        let crm = SampleCrm::start_on(addr, KEY).await.unwrap();
        assert_eq!(crm.addr(), addr);
        assert_eq!(crm.url(), format!("http://127.0.0.1:{}", addr.port()));
        assert_eq!(post(&crm, None, &default_body()).await.status, 201);
        crm.shutdown().await;
        // The port is free again after shutdown.
        let again = SampleCrm::start_on(addr, KEY).await.unwrap();
        again.shutdown().await;
    }

    #[tokio::test]
    async fn lists_invoices_with_pagination_and_search() {
        let crm = SampleCrm::start(KEY).await.unwrap();
        let empty = get(&crm, "/api/external/invoices?page=1&perPage=50").await;
        assert_eq!(empty.status, 200);
        assert_eq!(
            empty.json(),
            json!({"data": [], "pagination": {"page": 1, "perPage": 50, "total": 0, "totalPages": 0}})
        );

        let bodies = [
            sale_body("POS_1_aaa", "customer-123", "John Doe"),
            sale_body("POS_2_bbb", "customer-456", "Jane Smith"),
            sale_body("POS_3_ccc", "customer-789", "Johnny Walker"),
        ];
        for body in &bodies {
            assert_eq!(post(&crm, None, body).await.status, 201);
        }

        let all = get(&crm, "/api/external/invoices").await.json();
        assert_eq!(
            all["pagination"],
            json!({"page": 1, "perPage": 50, "total": 3, "totalPages": 1})
        );
        let first = &all["data"][0];
        let stored = &crm.invoices()[0];
        assert_eq!(first["id"], stored.invoice_id.as_str());
        assert_eq!(first["invoice_number"], format!("INV-{}-0001", year()));
        assert_eq!(first["customer_id"], "customer-123");
        assert_eq!(first["customer"], "John Doe");
        assert_eq!(first["amount"], 11);
        assert_eq!(first["status"], "paid");
        assert_eq!(first["pos_sale_id"], "POS_1_aaa");
        assert_eq!(first["date"], "2026-11-25");
        assert_eq!(first["line_items"], bodies[0]["line_items"]);

        let page1 = get(&crm, "/api/external/invoices?page=1&perPage=2")
            .await
            .json();
        assert_eq!(
            page1["pagination"],
            json!({"page": 1, "perPage": 2, "total": 3, "totalPages": 2})
        );
        let ids: Vec<&str> = page1["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d["pos_sale_id"].as_str().unwrap())
            .collect();
        assert_eq!(ids, ["POS_1_aaa", "POS_2_bbb"]);
        let page2 = get(&crm, "/api/external/invoices?page=2&perPage=2")
            .await
            .json();
        assert_eq!(page2["data"].as_array().unwrap().len(), 1);
        assert_eq!(page2["data"][0]["pos_sale_id"], "POS_3_ccc");
        let page9 = get(&crm, "/api/external/invoices?page=9&perPage=2")
            .await
            .json();
        assert_eq!(page9["data"], json!([]));
        assert_eq!(page9["pagination"]["total"], 3);

        let search = |q: &'static str| {
            let crm = &crm;
            async move {
                let answer = get(
                    crm,
                    &format!("/api/external/invoices?page=1&perPage=50&search={q}"),
                )
                .await;
                assert_eq!(answer.status, 200);
                let json = answer.json();
                let found: Vec<String> = json["data"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|d| d["pos_sale_id"].as_str().unwrap().to_owned())
                    .collect();
                assert_eq!(json["pagination"]["total"], found.len());
                found
            }
        };
        assert_eq!(search("JOHN").await, ["POS_1_aaa", "POS_3_ccc"]);
        assert_eq!(search("jane%20smith").await, ["POS_2_bbb"]);
        assert_eq!(search("jane+smith").await, ["POS_2_bbb"]);
        assert_eq!(search("pos_3_CCC").await, ["POS_3_ccc"]);
        assert_eq!(search("inv-").await.len(), 3);
        let number = format!("INV-{}-0002", year());
        let number: &'static str = Box::leak(number.into_boxed_str());
        assert_eq!(search(number).await, ["POS_2_bbb"]);
        assert_eq!(search("payment:%20credit").await.len(), 3);
        assert_eq!(search("nothing-like-this").await, Vec::<String>::new());
        assert_eq!(search("").await.len(), 3);

        // Silly paging values fall back to sane ones instead of failing.
        let odd = get(&crm, "/api/external/invoices?page=0&perPage=abc")
            .await
            .json();
        assert_eq!(odd["pagination"]["page"], 1);
        assert_eq!(odd["pagination"]["perPage"], 50);
        let zero = get(&crm, "/api/external/invoices?perPage=0").await.json();
        assert_eq!(zero["pagination"]["perPage"], 1);
        assert_eq!(zero["pagination"]["totalPages"], 3);
    }

    #[tokio::test]
    async fn looks_customers_up_and_records_every_lookup() {
        let crm = SampleCrm::start(KEY).await.unwrap();
        let john = get(&crm, "/api/external/customers/customer-123").await;
        assert_eq!(john.status, 200);
        assert_eq!(
            john.json(),
            json!({"id": "customer-123", "name": "John Doe", "email": "john.doe@example.com"})
        );
        let jane = get(&crm, "/api/external/customers/customer-456")
            .await
            .json();
        assert_eq!(jane["name"], "Jane Smith");
        assert_eq!(jane["email"], "jane.smith@example.com");

        let missing = get(&crm, "/api/external/customers/customer-999").await;
        assert_eq!(missing.status, 404);
        assert_eq!(
            missing.json(),
            json!({"success": false, "error": "Customer not found"})
        );

        crm.add_customer("cust 7", "Ada Mary Lovelace");
        let ada = get(&crm, "/api/external/customers/cust%207").await;
        assert_eq!(ada.status, 200);
        assert_eq!(
            ada.json(),
            json!({"id": "cust 7", "name": "Ada Mary Lovelace", "email": "ada.mary.lovelace@example.com"})
        );
        assert_eq!(
            crm.customer_lookups(),
            ["customer-123", "customer-456", "customer-999", "cust 7"]
        );
    }

    #[tokio::test]
    async fn other_routes_are_json_404s() {
        let crm = SampleCrm::start(KEY).await.unwrap();
        let client = client();
        for (method, path) in [
            (Method::GET, "/"),
            (Method::GET, "/api/external/invoices/"),
            (Method::PUT, "/api/external/invoices"),
            (Method::DELETE, "/api/external/customers/customer-123"),
            (Method::GET, "/api/external/customers/"),
            (Method::GET, "/api/external/customers/a/b"),
            (Method::POST, "/api/external/customers/customer-123"),
        ] {
            let answer = send(
                client
                    .request(method.clone(), format!("{}{}", crm.url(), path))
                    .header("x-api-key", KEY),
            )
            .await
            .unwrap();
            assert_eq!(answer.status, 404, "{method} {path}");
            assert_eq!(
                answer.json(),
                json!({"success": false, "error": "Not found"})
            );
        }
        assert!(crm.invoice_posts().is_empty());
        assert!(crm.customer_lookups().is_empty());
    }

    #[tokio::test]
    async fn invoice_post_path_keeps_the_query() {
        let crm = SampleCrm::start(KEY).await.unwrap();
        let answer = send(
            client()
                .post(format!("{}/api/external/invoices?source=pos", crm.url()))
                .header("x-api-key", KEY)
                .body(default_body().to_string()),
        )
        .await
        .unwrap();
        assert_eq!(answer.status, 201);
        assert_eq!(
            crm.invoice_posts()[0].path,
            "/api/external/invoices?source=pos"
        );
    }

    #[tokio::test]
    async fn wait_for_invoices_wakes_on_creation_and_times_out() {
        let crm = Arc::new(SampleCrm::start(KEY).await.unwrap());
        // Nothing yet: a zero timeout answers at once, a short one runs out.
        assert!(!crm.wait_for_invoices(1, Duration::ZERO).await);
        let started = Instant::now();
        assert!(!crm.wait_for_invoices(1, Duration::from_millis(150)).await);
        assert!(started.elapsed() >= Duration::from_millis(150));
        assert!(crm.wait_for_invoices(0, Duration::ZERO).await);

        let waiter = {
            let crm = Arc::clone(&crm);
            tokio::spawn(async move {
                let ok = crm.wait_for_invoices(2, Duration::from_secs(30)).await;
                (ok, Instant::now())
            })
        };
        let posts_waiter = {
            let crm = Arc::clone(&crm);
            tokio::spawn(async move { crm.wait_for_posts(3, Duration::from_secs(30)).await })
        };
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        // A refused POST counts as a post, not as an invoice.
        crm.push_script(CrmScript::Status(500, "{}".into()));
        assert_eq!(post(&crm, None, &default_body()).await.status, 500);
        assert_eq!(post(&crm, None, &default_body()).await.status, 201);
        assert!(!waiter.is_finished());
        assert_eq!(post(&crm, None, &default_body()).await.status, 201);
        let created_at = Instant::now();
        let (ok, woke_at) = waiter.await.unwrap();
        assert!(ok);
        // Woken by the creation itself, long before a 30 s timeout or any polling period.
        assert!(woke_at.saturating_duration_since(created_at) < Duration::from_secs(1));
        assert!(posts_waiter.await.unwrap());
        // Already satisfied: true without waiting at all.
        assert!(crm.wait_for_invoices(2, Duration::ZERO).await);
        assert!(crm.wait_for_posts(3, Duration::ZERO).await);
        assert!(!crm.wait_for_posts(4, Duration::from_millis(20)).await);
    }

    #[tokio::test]
    async fn keeps_connections_alive() {
        let crm = SampleCrm::start(KEY).await.unwrap();
        let client = client();
        for _ in 0..3 {
            let answer = send(post_req(
                &client,
                &crm,
                Some(KEY),
                None,
                default_body().to_string(),
            ))
            .await
            .unwrap();
            assert_eq!(answer.status, 201);
        }
        let answer = send(
            client
                .get(format!("{}/api/external/customers/customer-123", crm.url()))
                .header("x-api-key", KEY),
        )
        .await
        .unwrap();
        assert_eq!(answer.status, 200);
        assert_eq!(crm.shared.connections.load(Ordering::Relaxed), 1);
    }

    #[tokio::test]
    async fn survives_garbage_and_oversized_input() {
        let crm = SampleCrm::start(KEY).await.unwrap();
        for garbage in [
            &b"\x00\x01\x02 not http at all\r\n\r\n"[..],
            b"GET /\xff\xfe HTTP/1.1\r\nhost: x\r\n\r\n",
            b"POST /api/external/invoices HTTP/1.1\r\ncontent-length: 99999999999999999999\r\n\r\n",
            b"POST /api/external/invoices HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n",
        ] {
            let mut stream = TcpStream::connect(crm.addr()).await.unwrap();
            stream.write_all(garbage).await.unwrap();
            let mut sink = Vec::new();
            let read = tokio::time::timeout(LONG, stream.read_to_end(&mut sink)).await;
            assert!(read.is_ok(), "connection left open after garbage");
        }
        // A body larger than the limit is refused and still recorded.
        let big = "x".repeat(MAX_BODY_BYTES + 1);
        let answer = send(post_req(&client(), &crm, Some(KEY), None, big)).await;
        if let Ok(answer) = answer {
            assert_eq!(answer.status, 413);
            assert_eq!(answer.json()["error"], "Request body too large");
        }
        // The malformed chunked POST may or may not have been recorded (hyper can drop it before
        // the handler sees the bad chunk), but nothing was created and the last answer was 413.
        let posts = crm.invoice_posts();
        let last = posts.last().expect("oversized POST recorded");
        assert_eq!(last.answered_status, Some(413));
        assert!(last.body.is_empty());
        assert!(posts.iter().all(|p| p.answered_status != Some(201)));
        assert!(crm.invoices().is_empty());
        // Unicode and escapes in a customer id are fine too.
        let odd = get(&crm, "/api/external/customers/%E2%9C%93%zz%").await;
        assert_eq!(odd.status, 404);
        assert_eq!(crm.customer_lookups(), ["✓%zz%"]);
        // And the CRM still works.
        assert_eq!(post(&crm, None, &default_body()).await.status, 201);
        assert_eq!(crm.invoices().len(), 1);
    }

    #[test]
    fn constant_time_eq_compares_whole_keys() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(constant_time_eq(b"", b""));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
        assert!(!constant_time_eq(b"ab", b"abc"));
        assert!(!constant_time_eq(b"abc\0", b"abc"));
    }

    #[test]
    fn calendar_dates_are_strict() {
        for ok in ["2026-11-25", "2024-02-29", "0001-01-01"] {
            assert!(is_calendar_date(ok), "{ok}");
        }
        for bad in [
            "2025-02-29",
            "2026-13-01",
            "2026-00-10",
            "2026-1-25",
            "2026/11/25",
            "+026-11-25",
            "2026-11-2x",
            "",
            "２０２６-11-25",
        ] {
            assert!(!is_calendar_date(bad), "{bad}");
        }
    }

    #[test]
    fn percent_decoding_is_lenient() {
        assert_eq!(percent_decode("a%20b+c", true), "a b c");
        assert_eq!(percent_decode("a%20b+c", false), "a b+c");
        assert_eq!(percent_decode("100%", true), "100%");
        assert_eq!(percent_decode("%zz%4", true), "%zz%4");
        assert_eq!(percent_decode("%E2%9C%93", true), "✓");
        assert_eq!(percent_decode("%FF", true), "\u{FFFD}");
    }
}
