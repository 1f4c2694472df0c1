//! The admin listener (loopback by default): health and readiness for orchestrators.
//!
//! `/healthz` says the process serves HTTP; `/readyz` says the proxy is ready to take traffic.

use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use http::header::{HeaderValue, CONTENT_TYPE};
use http::{Method, Request, Response, StatusCode};

use crate::body::Body;

/// Shared readiness flags.
#[derive(Debug, Default)]
pub struct Readiness {
    pub proxy_listening: AtomicBool,
}

/// The admin HTTP service.
#[derive(Debug, Clone)]
pub struct Admin {
    readiness: Arc<Readiness>,
}

impl Admin {
    pub fn new(readiness: Arc<Readiness>) -> Self {
        Admin { readiness }
    }

    fn respond(&self, req: &Request<Body>) -> Response<Body> {
        if req.method() != Method::GET && req.method() != Method::HEAD {
            return json(
                StatusCode::METHOD_NOT_ALLOWED,
                r#"{"error":"method not allowed"}"#.into(),
            );
        }
        match req.uri().path() {
            "/healthz" => json(StatusCode::OK, r#"{"status":"ok"}"#.into()),
            "/readyz" => {
                if self.readiness.proxy_listening.load(Ordering::Acquire) {
                    json(StatusCode::OK, r#"{"status":"ready"}"#.into())
                } else {
                    json(
                        StatusCode::SERVICE_UNAVAILABLE,
                        r#"{"status":"starting"}"#.into(),
                    )
                }
            }
            _ => json(StatusCode::NOT_FOUND, r#"{"error":"not found"}"#.into()),
        }
    }
}

fn json(status: StatusCode, body: String) -> Response<Body> {
    let mut resp = Response::new(Body::full(body));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

impl tower::Service<Request<Body>> for Admin {
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = std::future::Ready<Result<Response<Body>, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<Body>) -> Self::Future {
        std::future::ready(Ok(self.respond(&req)))
    }
}
