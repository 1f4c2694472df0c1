//! Keep-alive connections to the POS, lent out one request at a time.
//!
//! Connections are made with hyper's `client::conn::http1` and kept idle newest-first. A
//! connection comes back when the answer's body has been read to its end: the [`Lease`] rides
//! inside the response body (`Body::Leased`) and puts the connection back at that moment, or
//! once hyper is done with the request too (an upload still going after an early answer).
//! Idle connections past `upstream.pool_idle_timeout_ms` are never reused, and a reaper task
//! closes them.
//!
//! Why not hyper-util's pooled `Client`: the proxy has one upstream and speaks only HTTP/1 to
//! it, and that client pays on every request for what a single-origin pool does not need: a
//! pool key built and hashed, its pool lock taken on checkout and again on return, and a task
//! spawned per request only to wait until the connection is idle again (13 % of the proxy's
//! user-space instructions per request, README "Against nginx").

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::Poll;
use std::time::{Duration, Instant};

use http::Uri;
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::client::legacy::connect::HttpConnector;
use tower::ServiceExt;

use crate::body::{Body, BoxError};

/// Plain TCP, or rustls for an `https://` POS.
pub type Connector = hyper_rustls::HttpsConnector<HttpConnector>;

/// The idle connections to the POS and how to make a new one.
pub struct Pool {
    connector: Connector,
    /// Scheme and authority of the POS: what the connector connects to.
    target: Uri,
    /// Newest last; all share one origin, so there is no key.
    idle: Mutex<VecDeque<Idle>>,
    max_idle: usize,
    /// Below the POS's own keep-alive, so a socket it is about to close is not reused.
    idle_timeout: Duration,
    /// For the whole connect, TLS handshake included (the connector's own limit is TCP only).
    connect_timeout: Duration,
    /// Whether the task that closes expired idle connections runs (started with the first
    /// idle connection, so a pool is made outside a runtime too).
    reaper: std::sync::Once,
}

struct Idle {
    conn: SendRequest<Body>,
    since: Instant,
}

/// A connection taken from the pool (or new) for one request.
pub struct Checkout {
    pub conn: SendRequest<Body>,
    /// It carried an earlier request, so the POS may have closed it in the meantime.
    pub reused: bool,
}

impl Pool {
    pub fn new(
        connector: Connector,
        target: Uri,
        max_idle: usize,
        idle_timeout: Duration,
        connect_timeout: Duration,
    ) -> Arc<Pool> {
        Arc::new(Pool {
            connector,
            target,
            idle: Mutex::new(VecDeque::new()),
            max_idle,
            idle_timeout,
            connect_timeout,
            reaper: std::sync::Once::new(),
        })
    }

    /// The newest idle connection that is still open, or a new one.
    pub async fn checkout(&self) -> Result<Checkout, BoxError> {
        while let Some(mut conn) = self.take_idle() {
            // Only connections ready for a request are put back, so this is ready at once
            // unless the POS has closed it since; one that is not is dropped, never waited on.
            let ready = std::future::poll_fn(|cx| Poll::Ready(conn.poll_ready(cx))).await;
            if matches!(ready, Poll::Ready(Ok(()))) {
                return Ok(Checkout { conn, reused: true });
            }
        }
        // Boxed: the connector's and the handshake's futures are large, and kept inline they
        // would make every request's future (allocated and moved per request) that large too.
        let conn = Box::pin(self.connect()).await?;
        Ok(Checkout {
            conn,
            reused: false,
        })
    }

    fn take_idle(&self) -> Option<SendRequest<Body>> {
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        self.drop_expired(&mut idle);
        idle.pop_back().map(|newest| newest.conn)
    }

    /// Drops the idle connections past the timeout (oldest first), which closes them: a POS
    /// with few connection slots or a long keep-alive must not keep serving idle sockets.
    fn drop_expired(&self, idle: &mut VecDeque<Idle>) {
        while idle
            .front()
            .is_some_and(|i| i.since.elapsed() > self.idle_timeout)
        {
            idle.pop_front();
        }
    }

    /// A new connection; its I/O runs in a task of its own until either side closes it.
    pub async fn connect(&self) -> Result<SendRequest<Body>, BoxError> {
        let connecting = self.connector.clone().oneshot(self.target.clone());
        let io = tokio::time::timeout(self.connect_timeout, connecting)
            .await
            .map_err(|_| {
                format!(
                    "no connection within {} ms (upstream.connect_timeout_ms)",
                    self.connect_timeout.as_millis()
                )
            })??;
        let (conn, driver) = http1::Builder::new()
            // Legacy clients can depend on the exact header spelling; keep it both ways.
            .preserve_header_case(true)
            .handshake(io)
            .await?;
        tokio::spawn(async move {
            if let Err(e) = driver.with_upgrades().await {
                tracing::debug!(error = %e, "POS connection ended with an error");
            }
        });
        Ok(conn)
    }

    fn put(self: &Arc<Self>, conn: SendRequest<Body>) {
        if conn.is_closed() || self.max_idle == 0 {
            return;
        }
        self.reaper.call_once(|| {
            tokio::spawn(reap(Arc::downgrade(self)));
        });
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        self.drop_expired(&mut idle);
        if idle.len() >= self.max_idle {
            idle.pop_front();
        }
        idle.push_back(Idle {
            conn,
            since: Instant::now(),
        });
    }
}

/// Closes expired idle connections while the pool exists (a reload makes a new pool).
async fn reap(pool: std::sync::Weak<Pool>) {
    let Some(every) = pool.upgrade().map(|p| p.idle_timeout) else {
        return;
    };
    // Half the timeout: an idle connection is closed at most 1.5 timeouts after its last use.
    let mut tick = tokio::time::interval((every / 2).max(Duration::from_millis(10)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(pool) = pool.upgrade() else { return };
        let mut idle = pool.idle.lock().unwrap_or_else(PoisonError::into_inner);
        pool.drop_expired(&mut idle);
    }
}

/// A connection lent for one exchange. Given back with [`Lease::release`] once the answer has
/// been read in full; dropped otherwise (a half-read answer leaves the connection unusable, and
/// hyper closes it).
pub struct Lease {
    pool: Arc<Pool>,
    conn: SendRequest<Body>,
}

impl Lease {
    pub fn new(pool: Arc<Pool>, conn: SendRequest<Body>) -> Lease {
        Lease { pool, conn }
    }

    /// The answer has been read to its end: the connection can carry the next request as
    /// soon as hyper has finished with this one. That is at once, unless the POS answered
    /// before the request body was sent in full (an early 413, say) and the upload is still
    /// going: then the connection goes back only once it is ready, so no request ever waits
    /// behind another's upload; if it closes instead, it is never put back.
    pub fn release(self) {
        let Lease { pool, mut conn } = self;
        if conn.is_ready() {
            pool.put(conn);
            return;
        }
        tokio::spawn(async move {
            if conn.ready().await.is_ok() {
                pool.put(conn);
            }
        });
    }
}

impl std::fmt::Debug for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lease").finish_non_exhaustive()
    }
}
