//! The sales `Service`: per request, pass through or handle a sale.
//!
//! Order of events for a sale: read the request (size-limited) → hand the rest to its own task
//! → forward to the POS → read the answer (size-limited, decoded if encoded) → if the sale
//! completed: invoice (customer) or nothing (no customer) → splice `crmStatus` into the answer.
//! Past the point where the POS answered, every failure of ours becomes the untouched POS answer
//! or a `crmStatus`, never an error response.

use std::borrow::Cow;
use std::convert::Infallible;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::FutureExt;

use bytes::Bytes;
use http::header::{self, HeaderName, HeaderValue};
use http::response::Parts;
use http::{Request, Response};
use tower::{Service, ServiceExt};

use super::future::ResponseFuture;
use super::layer::SalesContext;
use super::model::{completed_sale_id, CrmStatus, Sale};
use super::rewrite::{rewrite_parsed, Outcome};
use crate::body::{collect_limited, Body, Collected};
use crate::encoding;
use crate::error::ProxyError;
use crate::invoice::{outcome_label, utc_date_today, InvoiceRequest};
use crate::json::Object;
use crate::metrics::OutcomeLabels;
use crate::upstream::UpstreamTimeout;

/// Validators and digests that no longer match a rewritten body.
static STALE_HEADERS: [HeaderName; 5] = [
    header::ETAG,
    HeaderName::from_static("content-md5"),
    HeaderName::from_static("digest"),
    HeaderName::from_static("content-digest"),
    HeaderName::from_static("repr-digest"),
];

/// What the sales route did with a request; put in the response extensions for the access log.
#[derive(Debug, Clone, Default)]
pub struct SaleNote {
    pub sale_id: Option<String>,
    /// `created`, `failed`, `queued`, `no-customer`, or why the sale was skipped.
    pub invoice: &'static str,
}

/// Intercepts sales in front of `S` (the upstream).
#[derive(Debug, Clone)]
pub struct SalesService<S> {
    inner: S,
    ctx: Arc<SalesContext>,
}

impl<S> SalesService<S> {
    pub fn new(inner: S, ctx: Arc<SalesContext>) -> Self {
        SalesService { inner, ctx }
    }
}

impl<S> Service<Request<Body>> for SalesService<S>
where
    S: Service<Request<Body>, Response = Response<Body>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<Body>) -> Self::Future {
        if !self.ctx.intercepts(&req) {
            return ResponseFuture::Passthrough {
                inner: self.inner.call(req),
            };
        }
        // The ready clone goes into the sale; a fresh clone stays for the next call.
        let inner = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, inner);
        let ctx = self.ctx.clone();
        ResponseFuture::Sale {
            fut: Box::pin(handle_sale(ctx, inner, req)),
        }
    }
}

async fn handle_sale<S>(ctx: Arc<SalesContext>, inner: S, req: Request<Body>) -> Response<Body>
where
    S: Service<Request<Body>, Response = Response<Body>, Error = Infallible> + Send + 'static,
    S::Future: Send + 'static,
{
    let (mut parts, body) = req.into_parts();
    let read = tokio::time::timeout(
        ctx.body_read_timeout,
        collect_limited(body, ctx.max_request_body),
    );
    let Ok(read) = read.await else {
        // Nothing reached the POS: the till's upload stalled.
        return ProxyError::RequestTimeout(ctx.body_read_timeout.as_millis()).into_response();
    };
    let bytes = match read {
        Ok(Collected::Complete(bytes)) => bytes,
        Ok(Collected::TooLarge(body)) => {
            tracing::warn!(
                limit = ctx.max_request_body,
                "sale request larger than sales.max_request_body_bytes: forwarded untouched, no invoice"
            );
            let resp = Box::pin(call(inner, Request::from_parts(parts, body))).await;
            return noted(resp, None, "skipped-request-too-large");
        }
        Err(e) => {
            // Nothing reached the POS: the client's own upload broke.
            return ProxyError::BadRequest(format!("sale request {e}")).into_response();
        }
    };
    let sale = Sale::parse(&bytes).map_err(|e| e.to_string());
    // The answer has to be read, so ask for it unencoded (decoding stays as a fallback).
    parts.headers.insert(
        header::ACCEPT_ENCODING,
        HeaderValue::from_static("identity"),
    );
    // The till stops waiting after `answer_timeout`; the sale task waits for the POS longer,
    // so a sale the POS completes late still gets its invoice.
    parts.extensions.insert(UpstreamTimeout(SALE_TASK_LIMIT));
    let req = Request::from_parts(parts, Body::full(bytes));

    // From here on the sale belongs to the POS: finish it even if the client hangs up.
    let task = spawn_sale(ctx.clone(), inner, req, sale);
    match tokio::time::timeout(ctx.answer_timeout, task).await {
        Ok(Ok(resp)) => resp,
        Ok(Err(e)) => {
            tracing::error!(error = %e, "sale task failed");
            ProxyError::UpstreamBroken("internal error while relaying the sale".into())
                .into_response()
        }
        Err(_) => {
            tracing::warn!(
                timeout_ms = ctx.answer_timeout.as_millis() as u64,
                "POS did not answer the sale in time; if it completes it later, the invoice is still created"
            );
            noted(
                ProxyError::UpstreamTimeout(ctx.answer_timeout.as_millis()).into_response(),
                None,
                "pos-timeout",
            )
        }
    }
}

/// Starts the sale's own task. A plain function, so the sale's future is built here and moved
/// into the task, never into the state of the caller's future (which would then be as large).
fn spawn_sale<S>(
    ctx: Arc<SalesContext>,
    inner: S,
    req: Request<Body>,
    sale: Result<Sale, String>,
) -> tokio::task::JoinHandle<Response<Body>>
where
    S: Service<Request<Body>, Response = Response<Body>, Error = Infallible> + Send + 'static,
    S::Future: Send + 'static,
{
    tokio::spawn(complete_sale(ctx, inner, req, sale))
}

/// How long a sale task waits for the POS after the till has been answered with a 504.
const SALE_TASK_LIMIT: Duration = Duration::from_secs(15 * 60);

async fn call<S>(inner: S, req: Request<Body>) -> Response<Body>
where
    S: Service<Request<Body>, Response = Response<Body>, Error = Infallible>,
{
    match inner.oneshot(req).await {
        Ok(resp) => resp,
        Err(never) => match never {},
    }
}

fn noted(
    mut resp: Response<Body>,
    sale_id: Option<String>,
    invoice: &'static str,
) -> Response<Body> {
    resp.extensions_mut().insert(SaleNote { sale_id, invoice });
    resp
}

/// The POS's answer as read, re-framed from its real length.
fn untouched(
    mut parts: Parts,
    raw: Bytes,
    sale_id: Option<String>,
    why: &'static str,
) -> Response<Body> {
    parts
        .headers
        .insert(header::CONTENT_LENGTH, HeaderValue::from(raw.len()));
    noted(Response::from_parts(parts, Body::full(raw)), sale_id, why)
}

async fn complete_sale<S>(
    ctx: Arc<SalesContext>,
    inner: S,
    req: Request<Body>,
    sale: Result<Sale, String>,
) -> Response<Body>
where
    S: Service<Request<Body>, Response = Response<Body>, Error = Infallible>,
{
    let resp = call(inner, req).await;
    if !resp.status().is_success() {
        // Not a completed sale (or a proxy error answer): streamed back as it is.
        return noted(resp, None, "not-completed");
    }
    let (parts, body) = resp.into_parts();
    let read = tokio::time::timeout(
        ctx.answer_timeout,
        collect_limited(body, ctx.max_response_body),
    );
    let raw = match read.await {
        Ok(Ok(Collected::Complete(raw))) => raw,
        Ok(Ok(Collected::TooLarge(body))) => {
            tracing::warn!(
                limit = ctx.max_response_body,
                "POS answer larger than sales.max_response_body_bytes: passed through untouched, no invoice"
            );
            return noted(
                Response::from_parts(parts, body),
                None,
                "skipped-answer-too-large",
            );
        }
        Ok(Err(e)) => return ProxyError::UpstreamBroken(e.to_string()).into_response(),
        Err(_) => {
            return ProxyError::UpstreamTimeout(ctx.answer_timeout.as_millis()).into_response()
        }
    };

    // Past this point the POS has answered: whatever happens, the till gets that answer.
    let backup = (parts.status, parts.version, parts.headers.clone());
    match AssertUnwindSafe(finish_sale(&ctx, parts, raw.clone(), sale))
        .catch_unwind()
        .await
    {
        Ok(resp) => resp,
        Err(_) => {
            tracing::error!("sale handling panicked; POS answer passed through untouched");
            let (status, version, mut headers) = backup;
            headers.insert(header::CONTENT_LENGTH, HeaderValue::from(raw.len()));
            let mut resp = Response::new(Body::full(raw));
            *resp.status_mut() = status;
            *resp.version_mut() = version;
            *resp.headers_mut() = headers;
            noted(resp, None, "internal-error")
        }
    }
}

/// Decides what the completed sale needs and rewrites the POS's answer.
async fn finish_sale(
    ctx: &SalesContext,
    mut parts: Parts,
    raw: Bytes,
    sale: Result<Sale, String>,
) -> Response<Body> {
    let encoding = parts
        .headers
        .get(header::CONTENT_ENCODING)
        .map(|v| v.to_str().unwrap_or("(invalid)").to_string());
    let decoded: Cow<'_, [u8]> = match &encoding {
        None => Cow::Borrowed(&raw),
        Some(enc) => match encoding::decode(enc, &raw, ctx.max_response_body) {
            Ok(d) => Cow::Owned(d),
            Err(e) => {
                tracing::warn!(error = %e, "POS answer could not be decoded: passed through untouched");
                return untouched(parts, raw, None, "skipped-undecodable");
            }
        },
    };
    let Ok(answer) = Object::parse_bytes(&decoded) else {
        return untouched(parts, raw, None, "not-json");
    };
    let sale_id = completed_sale_id(parts.status, &answer);
    let Some(sale_id) = sale_id else {
        return untouched(parts, raw, None, "not-completed");
    };

    let crm_status = match sale {
        Err(e) => {
            // The POS completed a sale whose body we could not read: say so rather than
            // claiming there was no customer.
            tracing::error!(sale_id = %sale_id, error = %e, "completed sale could not be read; no invoice");
            Some(CrmStatus::failed(
                true,
                format!("sale request could not be read ({e}); no invoice created"),
            ))
        }
        Ok(sale) => match sale.customer_id.clone() {
            None => None,
            // Boxed: the invoice's future is large and only sales with a customer need it;
            // inline, it would enlarge every sale's task.
            Some(customer_id) => Some(
                Box::pin(ctx.invoicer.invoice(InvoiceRequest {
                    sale,
                    customer_id,
                    sale_id: sale_id.clone(),
                    date: utc_date_today(),
                }))
                .await,
            ),
        },
    };
    let (outcome, label) = match &crm_status {
        None => (Outcome::NoCustomer, "no-customer"),
        Some(s) => (Outcome::Crm(s), outcome_label(s)),
    };
    if crm_status.is_some() {
        ctx.metrics
            .invoices
            .get_or_create(&OutcomeLabels { outcome: label })
            .inc();
    }
    let rewritten = match rewrite_parsed(&answer, parts.status, outcome) {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(error = %e, "POS answer not rewritten");
            return untouched(parts, raw, Some(sale_id), label);
        }
    };

    if rewritten.status != parts.status {
        parts.status = rewritten.status;
        // A custom reason phrase of the old status would be wrong on the new one.
        parts.extensions.remove::<hyper::ext::ReasonPhrase>();
    }
    parts.headers.remove(header::CONTENT_ENCODING);
    for name in &STALE_HEADERS {
        parts.headers.remove(name);
    }
    parts.headers.insert(
        header::CONTENT_LENGTH,
        HeaderValue::from(rewritten.body.len()),
    );
    noted(
        Response::from_parts(parts, Body::full(rewritten.body)),
        Some(sale_id),
        label,
    )
}
