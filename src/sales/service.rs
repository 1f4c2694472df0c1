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

use bytes::Bytes;
use http::header::{self, HeaderName, HeaderValue};
use http::response::Parts;
use http::{Request, Response};
use tower::{Service, ServiceExt};

use super::future::ResponseFuture;
use super::layer::SalesContext;
use super::model::{completed_sale_id, Sale};
use super::rewrite::{rewrite, Outcome};
use crate::body::{collect_limited, Body, Collected};
use crate::encoding;
use crate::error::ProxyError;
use crate::invoice::{outcome_label, utc_date_today, InvoiceRequest};
use crate::json::Object;

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
    let bytes = match collect_limited(body, ctx.max_request_body).await {
        Ok(Collected::Complete(bytes)) => bytes,
        Ok(Collected::TooLarge(body)) => {
            tracing::warn!(
                limit = ctx.max_request_body,
                "sale request larger than sales.max_request_body_bytes: forwarded untouched, no invoice"
            );
            let resp = call(inner, Request::from_parts(parts, body)).await;
            return noted(resp, None, "skipped-request-too-large");
        }
        Err(e) => {
            // Nothing reached the POS: the client's own upload broke.
            return ProxyError::BadRequest(format!("sale request {e}")).into_response();
        }
    };
    let sale = Sale::parse(&bytes).ok();
    // The answer has to be read, so ask for it unencoded (decoding stays as a fallback).
    parts.headers.insert(
        header::ACCEPT_ENCODING,
        HeaderValue::from_static("identity"),
    );
    let req = Request::from_parts(parts, Body::full(bytes));

    // From here on the sale belongs to the POS: finish it even if the client hangs up.
    match tokio::spawn(complete_sale(ctx, inner, req, sale)).await {
        Ok(resp) => resp,
        Err(e) => {
            tracing::error!(error = %e, "sale task failed");
            ProxyError::UpstreamBroken("internal error while relaying the sale".into())
                .into_response()
        }
    }
}

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

fn untouched(
    parts: Parts,
    raw: Bytes,
    sale_id: Option<String>,
    why: &'static str,
) -> Response<Body> {
    noted(Response::from_parts(parts, Body::full(raw)), sale_id, why)
}

async fn complete_sale<S>(
    ctx: Arc<SalesContext>,
    inner: S,
    req: Request<Body>,
    sale: Option<Sale>,
) -> Response<Body>
where
    S: Service<Request<Body>, Response = Response<Body>, Error = Infallible>,
{
    let resp = call(inner, req).await;
    if !resp.status().is_success() {
        // Not a completed sale (or a proxy error answer): streamed back as it is.
        return noted(resp, None, "not-completed");
    }
    let (mut parts, body) = resp.into_parts();
    let raw = match collect_limited(body, ctx.max_response_body).await {
        Ok(Collected::Complete(raw)) => raw,
        Ok(Collected::TooLarge(body)) => {
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
        Err(e) => {
            return ProxyError::UpstreamBroken(e.to_string()).into_response();
        }
    };

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
    let sale_id = match Object::parse_bytes(&decoded) {
        Ok(answer) => completed_sale_id(parts.status, &answer),
        Err(_) => return untouched(parts, raw, None, "not-json"),
    };
    let Some(sale_id) = sale_id else {
        return untouched(parts, raw, None, "not-completed");
    };

    let customer = sale.and_then(|s| s.customer_id.clone().map(|id| (s, id)));
    let (crm_status, label) = match customer {
        None => (None, "no-customer"),
        Some((sale, customer_id)) => {
            let status = ctx
                .invoicer
                .invoice(InvoiceRequest {
                    sale,
                    customer_id,
                    sale_id: sale_id.clone(),
                    date: utc_date_today(),
                })
                .await;
            let label = outcome_label(&status);
            (Some(status), label)
        }
    };
    let outcome = match &crm_status {
        None => Outcome::NoCustomer,
        Some(s) => Outcome::Crm(s),
    };
    // The rewrite is pure and tested not to panic; should it ever, the till still gets the sale.
    let rewritten = std::panic::catch_unwind(AssertUnwindSafe(|| {
        rewrite(&decoded, parts.status, outcome)
    }));
    let rewritten = match rewritten {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "POS answer not rewritten");
            return untouched(parts, raw, Some(sale_id), label);
        }
        Err(_) => {
            tracing::error!("rewrite panicked; POS answer passed through untouched");
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
