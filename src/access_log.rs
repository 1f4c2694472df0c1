//! One log line per proxied request: method, path, status, latency, and for sales the sale id
//! and invoice outcome (read from the [`SaleNote`] the sales route leaves on the response).
//!
//! Latency is time to response headers; bodies stream on after the line is written. The query
//! string is not logged: it may carry customer data.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use http::{Method, Request, Response};
use pin_project_lite::pin_project;
use tower::{Layer, Service};

use crate::body::Body;
use crate::metrics::Metrics;
use crate::sales::SaleNote;

/// Adds the access log (and the request counter) around a service.
#[derive(Debug, Clone)]
pub struct AccessLogLayer {
    pub enabled: bool,
    pub metrics: Arc<Metrics>,
}

impl<S> Layer<S> for AccessLogLayer {
    type Service = AccessLog<S>;
    fn layer(&self, inner: S) -> AccessLog<S> {
        AccessLog {
            inner,
            enabled: self.enabled,
            metrics: self.metrics.clone(),
        }
    }
}

/// The access log service.
#[derive(Debug, Clone)]
pub struct AccessLog<S> {
    inner: S,
    enabled: bool,
    metrics: Arc<Metrics>,
}

impl<S> Service<Request<Body>> for AccessLog<S>
where
    S: Service<Request<Body>, Response = Response<Body>, Error = Infallible>,
{
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = LogFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<Body>) -> Self::Future {
        let start = self.enabled.then(|| {
            (
                Instant::now(),
                req.method().clone(),
                req.uri().path().to_string(),
            )
        });
        LogFuture {
            inner: self.inner.call(req),
            start,
            metrics: self.metrics.clone(),
        }
    }
}

pin_project! {
    /// Logs when the inner future yields the response.
    pub struct LogFuture<F> {
        #[pin]
        inner: F,
        start: Option<(Instant, Method, String)>,
        metrics: Arc<Metrics>,
    }
}

impl<F> Future for LogFuture<F>
where
    F: Future<Output = Result<Response<Body>, Infallible>>,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let out = std::task::ready!(this.inner.poll(cx));
        if let Ok(resp) = &out {
            let route = if resp.extensions().get::<SaleNote>().is_some() {
                "sales"
            } else {
                "passthrough"
            };
            this.metrics.count_request(route, resp.status().as_u16());
        }
        if let (Some((start, method, path)), Ok(resp)) = (this.start.take(), &out) {
            let latency_ms = format_args!("{:.3}", start.elapsed().as_secs_f64() * 1000.0);
            let status = resp.status().as_u16();
            match resp.extensions().get::<SaleNote>() {
                Some(note) => tracing::info!(
                    target: "access",
                    %method, path, status, %latency_ms,
                    sale_id = note.sale_id.as_deref().unwrap_or("-"),
                    invoice = note.invoice,
                    "request"
                ),
                None => {
                    tracing::info!(target: "access", %method, path, status, %latency_ms, "request")
                }
            }
        }
        Poll::Ready(out)
    }
}
