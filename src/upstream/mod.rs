//! Forwarding to the POS: pooled keep-alive connections (`pool`), hop-by-hop header handling,
//! `X-Forwarded-*`, protocol upgrades (WebSocket), and 502/504 when the POS fails.
//!
//! Bodies stream through untouched in both directions; nothing here buffers.

mod pool;

pub use pool::Lease;

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::{Authority, PathAndQuery};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body::Body as _;
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioIo;

use crate::body::{Body, BoxError};
use crate::config::UpstreamConfig;
use crate::error::ProxyError;
use crate::metrics::Metrics;
use crate::server::{ConnInfo, ConnSlot};
use crate::tls::{self, TlsError};

static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// A request extension that replaces the configured answer timeout for one request (the sales
/// route waits longer in the background than the till does).
#[derive(Debug, Clone, Copy)]
pub struct UpstreamTimeout(pub Duration);

/// The POS behind the proxy. Cheap to clone.
#[derive(Clone)]
pub struct Upstream {
    inner: Arc<Inner>,
}

struct Inner {
    pool: Arc<pool::Pool>,
    metrics: Arc<Metrics>,
    authority: Authority,
    timeout: Duration,
}

impl Upstream {
    pub fn new(cfg: &UpstreamConfig, metrics: Arc<Metrics>) -> Result<Self, TlsError> {
        let mut http = HttpConnector::new();
        http.set_nodelay(true);
        http.set_connect_timeout(Some(cfg.connect_timeout));
        http.set_keepalive(Some(Duration::from_secs(60)));
        http.enforce_http(false);
        // https:// POS: verified against the system roots plus `upstream.ca_file`.
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls::client_config(cfg.ca_file.as_deref())?)
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        let target = Uri::builder()
            .scheme(cfg.scheme.clone())
            .authority(cfg.authority.clone())
            .path_and_query("/")
            .build()
            .expect("scheme and authority were validated with the config");
        let pool = pool::Pool::new(
            connector,
            target,
            cfg.pool_max_idle_per_host,
            cfg.pool_idle_timeout,
            cfg.connect_timeout,
        );
        Ok(Upstream {
            inner: Arc::new(Inner {
                pool,
                metrics,
                authority: cfg.authority.clone(),
                timeout: cfg.timeout,
            }),
        })
    }

    /// Sends `req` to the POS and returns its answer, or the proxy's error answer.
    pub async fn forward(&self, req: Request<Body>) -> Response<Body> {
        match self.try_forward(req).await {
            Ok(resp) => resp,
            Err(e) => {
                tracing::warn!(error = %e, "upstream request failed");
                e.into_response()
            }
        }
    }

    async fn try_forward(&self, mut req: Request<Body>) -> Result<Response<Body>, ProxyError> {
        if req.method() == Method::CONNECT {
            return Err(ProxyError::MethodNotAllowed("CONNECT".into()));
        }
        let timeout = req
            .extensions_mut()
            .remove::<UpstreamTimeout>()
            .map_or(self.inner.timeout, |t| t.0);
        let upgrade = wants_upgrade(req.headers());
        let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
        // The tunnel keeps the client connection's slot under `limits.max_connections`.
        let slot = if upgrade {
            req.extensions_mut().remove::<ConnSlot>()
        } else {
            None
        };
        self.prepare_request(&mut req, upgrade);

        // A bodiless idempotent request can be sent again if a pooled connection turns out to
        // be closed; anything with a body, or a POST, never is.
        let replay = (is_idempotent(req.method()) && req.body().is_end_stream() && !upgrade)
            .then(|| copy_head(&req));
        let (mut resp, lease) = match self.send(req, timeout).await {
            Err(SendError::Stale(e)) => match replay {
                Some(again) => {
                    tracing::debug!("pooled upstream connection was closed; sending again");
                    // Boxed, like every rare path here: inline, its future would be part of
                    // (and enlarge) the future allocated for every request.
                    Box::pin(self.send(again, timeout))
                        .await
                        .map_err(SendError::into_proxy)?
                }
                None => return Err(SendError::Stale(e).into_proxy()),
            },
            other => other.map_err(SendError::into_proxy)?,
        };

        if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
            if let Some(client_upgrade) = client_upgrade {
                let upstream_upgrade = hyper::upgrade::on(&mut resp);
                tokio::spawn(tunnel(client_upgrade, upstream_upgrade, slot));
            }
        } else {
            // hyper does not check the length of an answer without a body (HEAD, 204, 304):
            // an invalid or conflicting one must not reach the client (RFC 9112 §6.3: 502).
            if !resp.headers().contains_key(header::TRANSFER_ENCODING)
                && !content_length_valid(resp.headers())
            {
                return Err(ProxyError::UpstreamBroken(
                    "invalid Content-Length in the POS answer".into(),
                ));
            }
            // A `Content-Length` beside `Transfer-Encoding` is stale (the chunked framing wins,
            // RFC 9112 §6.3); forwarded, it would cut or desynchronise the client's stream.
            if resp.headers().contains_key(header::TRANSFER_ENCODING) {
                resp.headers_mut().remove(header::CONTENT_LENGTH);
            }
            strip_hop_by_hop(resp.headers_mut(), false);
            return Ok(resp.map(|body| Body::leased(body, lease)));
        }
        // An upgraded connection is the tunnel's now; it never goes back to the pool.
        drop(lease);
        Ok(resp.map(Body::from))
    }

    /// Sends `req`; the timeout counts from when the request body has been sent in full.
    async fn send(
        &self,
        mut req: Request<Body>,
        timeout: Duration,
    ) -> Result<(Response<Incoming>, Lease), SendError> {
        let body_sent = if req.body().is_end_stream() {
            None
        } else {
            let (tx, rx) = tokio::sync::oneshot::channel();
            let body = std::mem::take(req.body_mut());
            *req.body_mut() = Body::Watched {
                inner: Box::new(body),
                done: Some(tx),
            };
            Some(rx)
        };
        let started = std::time::Instant::now();
        let sent = self.exchange(req);
        let deadline = async {
            if let Some(rx) = body_sent {
                let _ = rx.await;
            }
            tokio::time::sleep(timeout).await;
        };
        let result = tokio::select! {
            result = sent => result.map(|(resp, conn)| (resp, Lease::new(self.inner.pool.clone(), conn))),
            _ = deadline => Err(SendError::Timeout(timeout)),
        };
        let outcome = match &result {
            Ok(_) => "ok",
            Err(SendError::Timeout(_)) => "timeout",
            Err(_) => "error",
        };
        self.inner
            .metrics
            .observe_upstream(outcome, started.elapsed().as_secs_f64());
        result
    }

    /// One request on a pooled connection. A request the connection refused before writing
    /// anything (the POS had closed a reused socket) goes once more on a new connection: nothing
    /// of it reached the POS, so even a POST is safe to send.
    async fn exchange(
        &self,
        req: Request<Body>,
    ) -> Result<(Response<Incoming>, SendRequest<Body>), SendError> {
        let pool::Checkout { mut conn, reused } = self
            .inner
            .pool
            .checkout()
            .await
            .map_err(SendError::Connect)?;
        let mut failed = match conn.try_send_request(req).await {
            Ok(resp) => return Ok((resp, conn)),
            Err(failed) => failed,
        };
        match failed.take_message() {
            Some(req) if reused => {
                tracing::debug!("pooled upstream connection was closed before use; new one");
                Box::pin(self.send_on_new_connection(req)).await
            }
            _ => Err(SendError::from_hyper(failed.into_error())),
        }
    }

    async fn send_on_new_connection(
        &self,
        req: Request<Body>,
    ) -> Result<(Response<Incoming>, SendRequest<Body>), SendError> {
        let mut conn = self
            .inner
            .pool
            .connect()
            .await
            .map_err(SendError::Connect)?;
        match conn.try_send_request(req).await {
            Ok(resp) => Ok((resp, conn)),
            Err(e) => Err(SendError::from_hyper(e.into_error())),
        }
    }

    /// Rewrites the request for the upstream hop: origin-form target, HTTP/1.1, hop-by-hop
    /// headers removed (upgrade headers kept for an upgrade), `Host` kept, `X-Forwarded-*` set.
    fn prepare_request(&self, req: &mut Request<Body>, upgrade: bool) {
        let client_authority = req.uri().authority().cloned();
        // The connection is already to the POS: the request line carries only path and query.
        if req.uri().scheme().is_some() || req.uri().authority().is_some() {
            let path = req
                .uri()
                .path_and_query()
                .cloned()
                .unwrap_or_else(|| PathAndQuery::from_static("/"));
            *req.uri_mut() = Uri::from(path);
        }

        let (tls, peer) = match req.extensions().get::<ConnInfo>() {
            Some(c) => (c.tls, Some(c.peer_ip.clone())),
            None => (false, None),
        };
        let headers = req.headers_mut();
        strip_hop_by_hop(headers, upgrade);
        // The proxy answered `Expect: 100-continue` itself (hyper does, when the body is read).
        headers.remove(header::EXPECT);

        if let Some(target) = client_authority {
            // An absolute-form target (RFC 9112 §3.2.2) or HTTP/2's `:authority` (RFC 9113
            // §8.3.1) names the host, over any `Host` field; without its user info.
            let host = match target.port() {
                Some(port) => format!("{}:{}", target.host(), port.as_str()),
                None => target.host().to_string(),
            };
            if let Ok(v) = HeaderValue::from_str(&host) {
                headers.insert(header::HOST, v);
            }
        } else if !headers.contains_key(header::HOST) {
            // HTTP/1.0 clients may send no Host: name the POS.
            if let Ok(v) = HeaderValue::from_str(self.inner.authority.as_str()) {
                headers.insert(header::HOST, v);
            }
        }
        let host = headers.get(header::HOST).cloned();
        if let Some(ip) = peer {
            let mut xff = String::new();
            for v in headers.get_all(&X_FORWARDED_FOR) {
                if let Ok(s) = v.to_str() {
                    if !s.trim().is_empty() {
                        xff.push_str(s.trim());
                        xff.push_str(", ");
                    }
                }
            }
            let value = if xff.is_empty() {
                Some(ip)
            } else {
                xff.push_str(ip.to_str().unwrap_or_default());
                HeaderValue::from_str(&xff).ok()
            };
            if let Some(v) = value {
                headers.insert(X_FORWARDED_FOR.clone(), v);
            }
        }
        headers.insert(
            X_FORWARDED_PROTO.clone(),
            HeaderValue::from_static(if tls { "https" } else { "http" }),
        );
        if let Some(host) = host {
            headers.insert(X_FORWARDED_HOST.clone(), host);
        }
        *req.version_mut() = Version::HTTP_11;
    }
}

impl tower::Service<Request<Body>> for Upstream {
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Body>, Infallible>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<Body>) -> Self::Future {
        let this = self.clone();
        Box::pin(async move { Ok(this.forward(req).await) })
    }
}

/// Why one send failed.
enum SendError {
    /// No connection to the POS could be made.
    Connect(BoxError),
    /// The connection was closed before the answer began (the POS had closed a pooled socket).
    Stale(hyper::Error),
    Failed(hyper::Error),
    Timeout(Duration),
}

impl SendError {
    fn from_hyper(e: hyper::Error) -> SendError {
        if e.is_incomplete_message() {
            SendError::Stale(e)
        } else {
            SendError::Failed(e)
        }
    }

    fn into_proxy(self) -> ProxyError {
        match self {
            SendError::Connect(e) => {
                ProxyError::UpstreamUnavailable(format!("cannot connect: {}", innermost(&*e)))
            }
            SendError::Stale(e) | SendError::Failed(e) => {
                ProxyError::UpstreamUnavailable(innermost(&e))
            }
            SendError::Timeout(t) => ProxyError::UpstreamTimeout(t.as_millis()),
        }
    }
}

fn is_idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE
    )
}

/// A bodiless copy of a request's head, for one replay.
fn copy_head(req: &Request<Body>) -> Request<Body> {
    let mut copy = Request::new(Body::Empty);
    *copy.method_mut() = req.method().clone();
    *copy.uri_mut() = req.uri().clone();
    *copy.version_mut() = req.version();
    *copy.headers_mut() = req.headers().clone();
    *copy.extensions_mut() = req.extensions().clone();
    copy
}

/// Every `Content-Length` value (comma lists included) is the same decimal number.
fn content_length_valid(headers: &HeaderMap) -> bool {
    let mut length = None;
    for value in headers.get_all(header::CONTENT_LENGTH) {
        let Ok(text) = value.to_str() else {
            return false;
        };
        for part in text.split(',').map(str::trim) {
            if part.is_empty() || !part.bytes().all(|b| b.is_ascii_digit()) {
                return false;
            }
            let Ok(n) = part.parse::<u64>() else {
                return false;
            };
            if *length.get_or_insert(n) != n {
                return false;
            }
        }
    }
    true
}

/// `Connection: upgrade` plus an `Upgrade` header (HTTP/1.1 only).
fn wants_upgrade(headers: &HeaderMap) -> bool {
    headers.contains_key(header::UPGRADE)
        && connection_tokens(headers).any(|t| t.eq_ignore_ascii_case("upgrade"))
}

fn connection_tokens(headers: &HeaderMap) -> impl Iterator<Item = &str> {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|t| !t.is_empty())
}

/// Removes the headers that belong to one connection (RFC 9110 §7.6.1), including any named in
/// `Connection`. For an upgrade, `Connection: upgrade` and `Upgrade` are kept (and only those).
pub fn strip_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    // Most requests and answers carry none of these: one look at each name is cheaper than
    // hashing seven names for removal (that was ~5 % of a passthrough GET's instructions).
    if !keep_upgrade && !headers.keys().any(is_hop_by_hop) {
        return;
    }
    let named: Vec<HeaderName> = connection_tokens(headers)
        .filter_map(|t| HeaderName::from_bytes(t.as_bytes()).ok())
        .collect();
    for name in named {
        if keep_upgrade && name == header::UPGRADE {
            continue;
        }
        headers.remove(name);
    }
    headers.remove(header::CONNECTION);
    headers.remove(&KEEP_ALIVE);
    headers.remove(&PROXY_CONNECTION);
    headers.remove(header::TE);
    headers.remove(header::TRAILER);
    headers.remove(header::TRANSFER_ENCODING);
    if keep_upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    } else {
        headers.remove(header::UPGRADE);
    }
}

/// A header that always belongs to one connection; any other may be made one by `Connection`,
/// which is itself one of these.
fn is_hop_by_hop(name: &HeaderName) -> bool {
    name == header::CONNECTION
        || name == header::TRANSFER_ENCODING
        || name == header::TE
        || name == header::TRAILER
        || name == header::UPGRADE
        || name == KEEP_ALIVE
        || name == PROXY_CONNECTION
}

/// Copies bytes both ways between an upgraded client and upstream connection.
async fn tunnel(
    client: hyper::upgrade::OnUpgrade,
    upstream: hyper::upgrade::OnUpgrade,
    _slot: Option<ConnSlot>,
) {
    let (client, upstream) = match tokio::try_join!(client, upstream) {
        Ok(pair) => pair,
        Err(e) => {
            tracing::debug!(error = %e, "upgrade failed");
            return;
        }
    };
    let mut client = TokioIo::new(client);
    let mut upstream = TokioIo::new(upstream);
    if let Err(e) = tokio::io::copy_bidirectional(&mut client, &mut upstream).await {
        tracing::debug!(error = %e, "upgraded connection ended with an error");
    }
}

/// A short description of an error: its innermost cause.
fn innermost(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cur = e;
    while let Some(next) = cur.source() {
        cur = next;
    }
    cur.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_go_including_those_named_in_connection() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            "keep-alive, X-Secret-Hop".parse().unwrap(),
        );
        h.insert("keep-alive", "timeout=5".parse().unwrap());
        h.insert("x-secret-hop", "1".parse().unwrap());
        h.insert(header::TRANSFER_ENCODING, "chunked".parse().unwrap());
        h.insert(header::TE, "trailers".parse().unwrap());
        h.insert(header::UPGRADE, "websocket".parse().unwrap());
        h.insert("x-kept", "1".parse().unwrap());
        strip_hop_by_hop(&mut h, false);
        assert_eq!(h.len(), 1, "{h:?}");
        assert!(h.contains_key("x-kept"));
    }

    #[test]
    fn each_hop_by_hop_header_goes_also_alone() {
        for name in [
            "connection",
            "keep-alive",
            "proxy-connection",
            "te",
            "trailer",
            "transfer-encoding",
            "upgrade",
        ] {
            let mut h = HeaderMap::new();
            h.insert(name, "x".parse().unwrap());
            h.insert("x-kept", "1".parse().unwrap());
            strip_hop_by_hop(&mut h, false);
            assert_eq!(
                h.keys().map(|k| k.as_str()).collect::<Vec<_>>(),
                ["x-kept"],
                "{name}"
            );
        }
    }

    #[test]
    fn upgrade_keeps_its_two_headers() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, "Upgrade".parse().unwrap());
        h.insert(header::UPGRADE, "websocket".parse().unwrap());
        assert!(wants_upgrade(&h));
        strip_hop_by_hop(&mut h, true);
        assert_eq!(h.get(header::UPGRADE).unwrap(), "websocket");
        assert_eq!(h.get(header::CONNECTION).unwrap(), "upgrade");
    }
}
