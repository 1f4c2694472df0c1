//! The admin listener (loopback by default): health, readiness, metrics and the outbox.
//!
//! `/healthz` says the process serves HTTP. `/readyz` says the proxy can take sales: listening,
//! the POS reachable and the outbox writable (it also reports depth, age, hold and circuit).
//! `/metrics` is the Prometheus text format. `GET /outbox` lists jobs; `POST /outbox/retry`
//! replays them and needs `Authorization: Bearer <admin token>`.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::header::{HeaderValue, AUTHORIZATION, CONTENT_TYPE};
use http::{Method, Request, Response, StatusCode};
use serde_json::json;

use crate::body::Body;
use crate::live::Live;
use crate::outbox::store::State;
use crate::outbox::RetryTarget;

/// Shared readiness flags.
#[derive(Debug, Default)]
pub struct Readiness {
    pub proxy_listening: AtomicBool,
}

/// The admin HTTP service.
#[derive(Debug, Clone)]
pub struct Admin {
    inner: Arc<Inner>,
}

struct Inner {
    readiness: Arc<Readiness>,
    live: Arc<Live>,
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Admin").finish_non_exhaustive()
    }
}

fn json(status: StatusCode, body: serde_json::Value) -> Response<Body> {
    let mut resp = Response::new(Body::full(body.to_string()));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

fn error(status: StatusCode, message: &str) -> Response<Body> {
    json(status, json!({ "error": message }))
}

/// Compares without stopping at the first difference, so timing says nothing about the token.
fn same_secret(given: &[u8], expected: &[u8]) -> bool {
    let mut diff = given.len() ^ expected.len();
    for (i, b) in expected.iter().enumerate() {
        diff |= usize::from(given.get(i).copied().unwrap_or(0) ^ b);
    }
    diff == 0
}

impl Admin {
    pub fn new(readiness: Arc<Readiness>, live: Arc<Live>) -> Self {
        Admin {
            inner: Arc::new(Inner { readiness, live }),
        }
    }

    /// Whether a TCP connection to the POS can be opened (within a second).
    async fn upstream_reachable(&self) -> bool {
        let cfg = self.inner.live.config();
        let authority = &cfg.upstream.authority;
        let port =
            authority
                .port_u16()
                .unwrap_or(if cfg.upstream.scheme == http::uri::Scheme::HTTPS {
                    443
                } else {
                    80
                });
        let host = authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        matches!(
            tokio::time::timeout(
                Duration::from_secs(1),
                tokio::net::TcpStream::connect((host.as_str(), port))
            )
            .await,
            Ok(Ok(_))
        )
    }

    /// `None` when the request carries the admin token, else the refusal to send.
    fn refusal(&self, req: &Request<Body>) -> Option<Response<Body>> {
        let config = self.inner.live.config();
        let Some(token) = &config.admin_token else {
            return Some(error(
                StatusCode::FORBIDDEN,
                "write endpoints are disabled: set proxy.admin_token (PROXY_ADMIN_TOKEN)",
            ));
        };
        let given = req
            .headers()
            .get(AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map_or("", |(_, token)| token);
        (!same_secret(given.trim().as_bytes(), token.expose().as_bytes()))
            .then(|| error(StatusCode::UNAUTHORIZED, "missing or wrong bearer token"))
    }

    async fn respond(self, req: Request<Body>) -> Response<Body> {
        let path = req.uri().path().to_string();
        let query: Vec<(String, String)> =
            form_urlencoded::parse(req.uri().query().unwrap_or("").as_bytes())
                .into_owned()
                .collect();
        let param = |k: &str| query.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
        let outbox = &self.inner.live.outbox;
        match (req.method().clone(), path.as_str()) {
            (Method::GET | Method::HEAD, "/healthz") => {
                json(StatusCode::OK, json!({"status": "ok"}))
            }
            (Method::GET | Method::HEAD, "/readyz") => {
                let listening = self.inner.readiness.proxy_listening.load(Ordering::Acquire);
                let upstream = self.upstream_reachable().await;
                let health = outbox.health().await;
                let ready = listening && upstream && health.writable;
                let status = if ready {
                    StatusCode::OK
                } else {
                    StatusCode::SERVICE_UNAVAILABLE
                };
                json(
                    status,
                    json!({
                        "status": if ready { "ready" } else { "not ready" },
                        "listening": listening,
                        "upstream_reachable": upstream,
                        "outbox": health,
                    }),
                )
            }
            (Method::GET | Method::HEAD, "/metrics") => {
                let metrics = &self.inner.live.metrics;
                metrics.observe_outbox(&outbox.health().await);
                let mut resp = Response::new(Body::full(metrics.encode()));
                resp.headers_mut().insert(
                    CONTENT_TYPE,
                    HeaderValue::from_static(
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    ),
                );
                resp
            }
            (Method::GET | Method::HEAD, "/outbox") => {
                let state = match param("state") {
                    None => None,
                    Some(s) => match State::parse(s) {
                        Some(st) => Some(st),
                        None => {
                            return error(
                                StatusCode::BAD_REQUEST,
                                "state must be pending, in_flight, delivered, dead or held",
                            )
                        }
                    },
                };
                let limit = param("limit")
                    .and_then(|l| l.parse().ok())
                    .unwrap_or(50usize)
                    .min(1000);
                match outbox.list(state, limit).await {
                    Ok(jobs) => json(
                        StatusCode::OK,
                        json!({ "jobs": jobs, "outbox": outbox.health().await }),
                    ),
                    Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, &e.to_string()),
                }
            }
            (Method::GET | Method::HEAD, p)
                if p.starts_with("/outbox/") && p != "/outbox/retry" =>
            {
                let sale_id = percent_decode(&p["/outbox/".len()..]);
                match outbox.get(&sale_id).await {
                    Ok(Some(job)) => json(
                        StatusCode::OK,
                        json!({ "job": job, "payload": String::from_utf8_lossy(&job.payload) }),
                    ),
                    Ok(None) => error(StatusCode::NOT_FOUND, "no job for this sale id"),
                    Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, &e.to_string()),
                }
            }
            (Method::POST, "/outbox/retry") => {
                if let Some(refusal) = self.refusal(&req) {
                    return refusal;
                }
                let target = match (param("sale_id"), param("all")) {
                    (Some(id), None) => RetryTarget::Sale(id.to_string()),
                    (None, Some("dead")) => RetryTarget::All(State::Dead),
                    (None, Some("held")) => RetryTarget::All(State::Held),
                    _ => {
                        return error(
                            StatusCode::BAD_REQUEST,
                            "give either ?sale_id=ID or ?all=dead|held",
                        )
                    }
                };
                let one_sale = matches!(target, RetryTarget::Sale(_));
                match outbox.retry(target).await {
                    Ok(0) if one_sale => error(
                        StatusCode::CONFLICT,
                        "nothing replayed: no such sale, or its job is delivered or in flight",
                    ),
                    Ok(n) => json(StatusCode::OK, json!({ "replayed": n })),
                    Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, &e.to_string()),
                }
            }
            (_, "/healthz" | "/readyz" | "/metrics" | "/outbox" | "/outbox/retry") => {
                error(StatusCode::METHOD_NOT_ALLOWED, "method not allowed")
            }
            _ => error(StatusCode::NOT_FOUND, "not found"),
        }
    }
}

fn percent_decode(s: &str) -> String {
    percent_encoding::percent_decode_str(s)
        .decode_utf8_lossy()
        .into_owned()
}

impl tower::Service<Request<Body>> for Admin {
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Body>, Infallible>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<Body>) -> Self::Future {
        let this = self.clone();
        Box::pin(async move { Ok(this.respond(req).await) })
    }
}

#[cfg(test)]
mod tests {
    use super::same_secret;

    #[test]
    fn secret_comparison() {
        assert!(same_secret(b"abc", b"abc"));
        assert!(!same_secret(b"abd", b"abc"));
        assert!(!same_secret(b"ab", b"abc"));
        assert!(!same_secret(b"abcd", b"abc"));
        assert!(!same_secret(b"", b"abc"));
    }
}
