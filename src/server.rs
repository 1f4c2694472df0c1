//! Accept loop and graceful shutdown. Knows nothing of sales: it serves any `Infallible` service
//! over HTTP/1.1 (with upgrades) and, on TLS connections whose client chose it by ALPN, HTTP/2.
//!
//! The protocol is known before the first byte is read: plain connections are HTTP/1 (tills
//! and browsers never speak cleartext HTTP/2), TLS connections say what they speak in ALPN.
//! So there is no sniffing of the first bytes (hyper-util's `auto` connection), which cost a
//! rewind buffer and a second read-buffer growth per connection: ~5 KB of RSS for every idle
//! keep-alive connection and a few per cent of throughput in the `compare` benchmark.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper::server::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tower::{Service, ServiceExt};

use futures_util::future::Either;

use crate::body::Body;
use crate::config::Limits;
use crate::error::ProxyError;

/// Who is on the other end of a connection; put in every request's extensions.
#[derive(Debug, Clone)]
pub struct ConnInfo {
    pub peer: SocketAddr,
    pub tls: bool,
    /// The peer's IP as `X-Forwarded-For` carries it, rendered once per connection: formatting
    /// the address for every request was ~4 % of the instructions of a passthrough GET.
    pub peer_ip: http::HeaderValue,
}

impl ConnInfo {
    pub fn new(peer: SocketAddr, tls: bool) -> Self {
        // An IPv4 client of a dual-stack (`[::]`) listener arrives as `::ffff:a.b.c.d`; the POS
        // gets the address it knows.
        let peer_ip = http::HeaderValue::try_from(peer.ip().to_canonical().to_string())
            .expect("an IP address is a valid header value");
        ConnInfo { peer, tls, peer_ip }
    }
}

/// A connection's place under `limits.max_connections`. The tunnel of an upgraded connection
/// (WebSocket) outlives the HTTP connection's task, so an upgrade request carries the slot in
/// its extensions and the tunnel keeps it until it closes.
#[derive(Debug, Clone)]
pub struct ConnSlot(#[allow(dead_code)] Arc<tokio::sync::OwnedSemaphorePermit>);

/// A signal that flips once from "running" to "stopping".
#[derive(Debug, Clone)]
pub struct Shutdown(watch::Receiver<bool>);

impl Shutdown {
    pub fn new() -> (watch::Sender<bool>, Shutdown) {
        let (tx, rx) = watch::channel(false);
        (tx, Shutdown(rx))
    }

    /// Whether shutdown was requested.
    pub fn is_requested(&self) -> bool {
        *self.0.borrow()
    }

    /// Resolves when shutdown was requested (or its sender is gone).
    pub async fn requested(&mut self) {
        let _ = self.0.wait_for(|stop| *stop).await;
    }
}

/// The HTTP connection settings shared by every connection of a listener.
#[derive(Clone)]
pub struct HttpBuilders {
    pub http1: http1::Builder,
    pub http2: http2::Builder<TokioExecutor>,
}

/// The HTTP connection settings shared by every connection of a listener.
pub fn http_builder(limits: &Limits) -> HttpBuilders {
    let mut http1 = http1::Builder::new();
    http1
        .timer(TokioTimer::new())
        .preserve_header_case(true)
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(limits.max_header_bytes)
        .max_headers(limits.max_headers)
        // hyper's default vectored writes stay: flattening (`writev(false)`) copied every 64 KB
        // answer into the write buffer, ~20 % more CPU per large answer in the `compare`
        // benchmark, and showed no gain on small ones beyond run-to-run noise.
        .keep_alive(true);
    let mut http2 = http2::Builder::new(TokioExecutor::new());
    http2
        .timer(TokioTimer::new())
        .max_concurrent_streams(limits.h2_max_concurrent_streams)
        .max_pending_accept_reset_streams(limits.h2_max_pending_accept_reset_streams)
        .max_local_error_reset_streams(limits.h2_max_local_error_reset_streams)
        .max_header_list_size(limits.max_header_bytes.min(u32::MAX as usize) as u32);
    HttpBuilders { http1, http2 }
}

/// The current TLS settings of a listener, read at every accept so a certificate reload
/// applies to the next connection. `None`: plain HTTP.
pub type TlsSource = Arc<dyn Fn() -> Option<(Arc<rustls::ServerConfig>, Duration)> + Send + Sync>;

/// How a listener serves.
#[derive(Clone)]
pub struct ServeOptions {
    pub limits: Limits,
    /// After shutdown, open connections may finish in-flight requests for this long.
    pub grace: Duration,
    pub tls: Option<TlsSource>,
    pub handshake_failures: Option<prometheus_client::metrics::counter::Counter>,
}

/// Serves `service` on `listener` until `shutdown`, then lets open connections finish their
/// in-flight requests for at most `opts.grace`.
pub async fn serve<S>(listener: TcpListener, service: S, mut shutdown: Shutdown, opts: ServeOptions)
where
    S: Service<Request<Body>, Response = Response<Body>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    let builder = Arc::new(http_builder(&opts.limits));
    let max_head = opts.limits.max_header_bytes;
    // Every connection task; at shutdown each is asked to finish its request and close.
    let connections = tokio_util::task::TaskTracker::new();
    // At the limit, stop accepting: further clients wait in the kernel's backlog.
    let slots = Arc::new(tokio::sync::Semaphore::new(opts.limits.max_connections));
    loop {
        let slot = tokio::select! {
            slot = slots.clone().acquire_owned() => ConnSlot(Arc::new(slot.expect("the semaphore is never closed"))),
            _ = shutdown.requested() => break,
        };
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    // Out of file descriptors and the like: wait a little instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.requested() => break,
        };
        let _ = stream.set_nodelay(true);
        let svc = service.clone();
        let builder = builder.clone();
        let stop = shutdown.clone();
        match opts.tls.as_ref().and_then(|tls| tls()) {
            None => {
                let info = ConnInfo::new(peer, false);
                connections.spawn(async move {
                    serve_connection(&builder, max_head, stop, stream, false, svc, info, slot)
                        .await;
                });
            }
            Some((config, handshake_timeout)) => {
                let failures = opts.handshake_failures.clone();
                connections.spawn(async move {
                    let acceptor = tokio_rustls::TlsAcceptor::from(config);
                    match tokio::time::timeout(handshake_timeout, acceptor.accept(stream)).await {
                        Ok(Ok(tls)) => {
                            let info = ConnInfo::new(peer, true);
                            let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
                            serve_connection(&builder, max_head, stop, tls, h2, svc, info, slot)
                                .await;
                        }
                        Ok(Err(e)) => {
                            if let Some(f) = failures {
                                f.inc();
                            }
                            tracing::debug!(%peer, error = %e, "TLS handshake failed");
                        }
                        Err(_) => {
                            if let Some(f) = failures {
                                f.inc();
                            }
                            tracing::debug!(%peer, "TLS handshake timed out");
                        }
                    }
                });
            }
        }
    }
    drop(listener);
    connections.close();
    tokio::select! {
        _ = connections.wait() => tracing::debug!("all connections closed"),
        _ = tokio::time::sleep(opts.grace) => tracing::warn!(grace_ms = opts.grace.as_millis() as u64, "grace period over, closing remaining connections"),
    }
}

/// Serves one connection in the protocol chosen at accept; when `shutdown` comes, the
/// connection finishes the request in progress (HTTP/1) or its open streams (HTTP/2, after a
/// GOAWAY) and closes.
#[allow(clippy::too_many_arguments)]
async fn serve_connection<I, S>(
    builder: &HttpBuilders,
    max_head: usize,
    shutdown: Shutdown,
    io: I,
    h2: bool,
    service: S,
    info: ConnInfo,
    slot: ConnSlot,
) where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    S: Service<Request<Body>, Response = Response<Body>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    let peer = info.peer;
    let hyper_svc = hyper::service::service_fn(move |req: Request<Incoming>| {
        let size = head_size(&req);
        if size > max_head {
            return Either::Left(std::future::ready(Ok(head_too_large(size, max_head))));
        }
        let mut req = req.map(Body::from);
        req.extensions_mut().insert(info.clone());
        if req.headers().contains_key(http::header::UPGRADE) {
            req.extensions_mut().insert(slot.clone());
        }
        Either::Right(service.clone().oneshot(req))
    });
    let io = TokioIo::new(io);
    let result = if h2 {
        let conn = builder.http2.serve_connection(io, hyper_svc);
        until_shutdown(conn, shutdown, |c| c.graceful_shutdown()).await
    } else {
        let conn = builder
            .http1
            .serve_connection(io, hyper_svc)
            .with_upgrades();
        until_shutdown(conn, shutdown, |c| c.graceful_shutdown()).await
    };
    if let Err(e) = result {
        tracing::debug!(%peer, error = %e, "connection ended with an error");
    }
}

/// Runs a connection to its end; if shutdown comes first, asks it to finish what it is doing
/// (`graceful`) and waits for that.
async fn until_shutdown<C: Future>(
    conn: C,
    mut shutdown: Shutdown,
    graceful: fn(Pin<&mut C>),
) -> C::Output {
    tokio::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => r,
        _ = shutdown.requested() => {
            graceful(conn.as_mut());
            conn.await
        }
    }
}

/// The size of a request head in canonical HTTP/1 form: request line and `Name: value\r\n`
/// lines, without the final blank line. hyper stops reading a head only once its read buffer
/// passes the limit, and that buffer grows in doubling steps, so a head somewhat over the limit
/// can arrive whole in one read and parse; this check makes the limit hold to within a byte per
/// line (a client writing `Name:value` or bare LF line ends is counted as if it had not).
fn head_size<B>(req: &Request<B>) -> usize {
    let uri = req.uri();
    let target = uri.scheme_str().map_or(0, |s| s.len() + 3)
        + uri.authority().map_or(0, |a| a.as_str().len())
        + uri.path_and_query().map_or(1, |p| p.as_str().len());
    // "METHOD target HTTP/1.1\r\n"
    let line = req.method().as_str().len() + target + 12;
    req.headers()
        .iter()
        .fold(line, |n, (k, v)| n + k.as_str().len() + v.len() + 4)
}

/// 431 for a head over the limit; the connection closes after it (the client may still be
/// sending, and nothing it sends on this connection is trusted any more).
fn head_too_large(size: usize, limit: usize) -> Response<Body> {
    tracing::debug!(size, limit, "request head too large");
    let mut resp = ProxyError::HeadTooLarge(size, limit).into_response();
    resp.headers_mut().insert(
        http::header::CONNECTION,
        http::HeaderValue::from_static("close"),
    );
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_forwarded_address_is_the_plain_one() {
        for (peer, want) in [
            ("10.0.0.7:5000", "10.0.0.7"),
            ("[::ffff:10.0.0.7]:5000", "10.0.0.7"),
            ("[2001:db8::1]:5000", "2001:db8::1"),
        ] {
            let info = ConnInfo::new(peer.parse().unwrap(), false);
            assert_eq!(info.peer_ip, want, "{peer}");
        }
    }

    #[test]
    fn head_size_counts_the_bytes_of_the_head_as_sent() {
        let raw = "GET /echo?a=1 HTTP/1.1\r\nHost: pos\r\nX-Big: aaaa\r\nConnection: close\r\n\r\n";
        let req = Request::get("/echo?a=1")
            .header("Host", "pos")
            .header("X-Big", "aaaa")
            .header("Connection", "close")
            .body(())
            .unwrap();
        // Everything but the blank line that ends the head.
        assert_eq!(head_size(&req), raw.len() - 2);
        let absolute = Request::get("http://pos:8080/x").body(()).unwrap();
        assert_eq!(
            head_size(&absolute),
            "GET http://pos:8080/x HTTP/1.1\r\n".len()
        );
    }
}
