//! Accept loop and graceful shutdown. Knows nothing of sales: it serves any `Infallible` service
//! over HTTP/1 and HTTP/2 (hyper-util's auto connection), with upgrades.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tower::{Service, ServiceExt};

use crate::body::Body;
use crate::config::Limits;

/// Who is on the other end of a connection; put in every request's extensions.
#[derive(Debug, Clone, Copy)]
pub struct ConnInfo {
    pub peer: SocketAddr,
    pub tls: bool,
}

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
pub fn http_builder(limits: &Limits) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .preserve_header_case(true)
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(limits.max_header_bytes)
        .max_headers(limits.max_headers)
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(limits.h2_max_concurrent_streams)
        .max_pending_accept_reset_streams(limits.h2_max_pending_accept_reset_streams)
        .max_local_error_reset_streams(limits.h2_max_local_error_reset_streams)
        .max_header_list_size(limits.max_header_bytes.min(u32::MAX as usize) as u32);
    builder
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
    let graceful = GracefulShutdown::new();
    // At the limit, stop accepting: further clients wait in the kernel's backlog.
    let slots = Arc::new(tokio::sync::Semaphore::new(opts.limits.max_connections));
    loop {
        let slot = tokio::select! {
            slot = slots.clone().acquire_owned() => slot.expect("the semaphore is never closed"),
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
        let watcher = graceful.watcher();
        match opts.tls.as_ref().and_then(|tls| tls()) {
            None => {
                let info = ConnInfo { peer, tls: false };
                tokio::spawn(async move {
                    serve_connection(builder, watcher, stream, svc, info).await;
                    drop(slot);
                });
            }
            Some((config, handshake_timeout)) => {
                let failures = opts.handshake_failures.clone();
                tokio::spawn(async move {
                    let _slot = slot;
                    let acceptor = tokio_rustls::TlsAcceptor::from(config);
                    match tokio::time::timeout(handshake_timeout, acceptor.accept(stream)).await {
                        Ok(Ok(tls)) => {
                            let info = ConnInfo { peer, tls: true };
                            serve_connection(builder, watcher, tls, svc, info).await;
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
    tokio::select! {
        _ = graceful.shutdown() => tracing::debug!("all connections closed"),
        _ = tokio::time::sleep(opts.grace) => tracing::warn!(grace_ms = opts.grace.as_millis() as u64, "grace period over, closing remaining connections"),
    }
}

async fn serve_connection<I, S>(
    builder: Arc<auto::Builder<TokioExecutor>>,
    watcher: hyper_util::server::graceful::Watcher,
    io: I,
    service: S,
    info: ConnInfo,
) where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    S: Service<Request<Body>, Response = Response<Body>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    let hyper_svc = hyper::service::service_fn(move |req: Request<Incoming>| {
        let mut req = req.map(Body::from);
        req.extensions_mut().insert(info);
        service.clone().oneshot(req)
    });
    let conn = builder.serve_connection_with_upgrades(TokioIo::new(io), hyper_svc);
    if let Err(e) = watcher.watch(conn.into_owned()).await {
        tracing::debug!(peer = %info.peer, error = %e, "connection ended with an error");
    }
}
