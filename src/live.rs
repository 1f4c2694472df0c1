//! What a configuration reload may change, swapped atomically for new requests.
//!
//! A [`Snapshot`] is built from one validated `Config`: the proxy's tower stack (access log →
//! sales → upstream), the TLS server config, the admin token. Every request loads the current
//! snapshot, so a keep-alive connection sees a reload on its next request and no connection is
//! dropped. The CRM client sits behind [`CrmHandle`] so the outbox worker, which lives across
//! reloads, always sends with the current URL and key.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::{Request, Response};
use tower::{Layer, Service};

use crate::access_log::{AccessLog, AccessLogLayer};
use crate::body::Body;
use crate::config::Config;
use crate::crm::{BuildError, CreatedInvoice, CrmClient, CrmError};
use crate::invoice::Invoicer;
use crate::metrics::Metrics;
use crate::outbox::{Outbox, Sender};
use crate::sales::{SalesContext, SalesLayer, SalesService};
use crate::tls::TlsError;
use crate::upstream::Upstream;

/// The proxy's service stack.
pub type ProxyStack = AccessLog<SalesService<Upstream>>;

/// The CRM client currently configured; replaced on reload.
#[derive(Debug)]
pub struct CrmHandle {
    current: ArcSwap<CrmClient>,
}

impl CrmHandle {
    pub fn new(client: CrmClient) -> Self {
        CrmHandle {
            current: ArcSwap::from_pointee(client),
        }
    }

    pub fn current(&self) -> Arc<CrmClient> {
        self.current.load_full()
    }

    pub fn replace(&self, client: CrmClient) {
        self.current.store(Arc::new(client));
    }
}

impl Sender for CrmHandle {
    fn configured(&self) -> bool {
        self.current.load().is_configured()
    }

    fn send<'a>(
        &'a self,
        payload: Bytes,
        idempotency_key: &'a str,
    ) -> Pin<Box<dyn Future<Output = Result<CreatedInvoice, CrmError>> + Send + 'a>> {
        let client = self.current();
        Box::pin(async move { client.create_invoice(payload, idempotency_key).await })
    }
}

/// Everything a reload swaps, built from one config.
pub struct Snapshot {
    pub config: Arc<Config>,
    pub proxy: ProxyStack,
    pub upstream: Upstream,
    pub tls: Option<Arc<rustls::ServerConfig>>,
}

/// Why a snapshot could not be built from a config.
#[derive(Debug, thiserror::Error)]
pub enum BuildSnapshotError {
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error(transparent)]
    Crm(#[from] BuildError),
}

/// The parts that live across reloads, and the current snapshot.
pub struct Live {
    current: ArcSwap<Snapshot>,
    pub crm: Arc<CrmHandle>,
    pub outbox: Arc<Outbox>,
    pub metrics: Arc<Metrics>,
}

impl Live {
    pub fn new(
        snapshot: Snapshot,
        crm: Arc<CrmHandle>,
        outbox: Arc<Outbox>,
        metrics: Arc<Metrics>,
    ) -> Self {
        Live {
            current: ArcSwap::from_pointee(snapshot),
            crm,
            outbox,
            metrics,
        }
    }

    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.current.load_full()
    }

    pub fn config(&self) -> Arc<Config> {
        self.current.load().config.clone()
    }

    pub fn swap(&self, snapshot: Snapshot) {
        self.current.store(Arc::new(snapshot));
    }

    /// The listener's TLS source: the current snapshot's server config at every accept.
    pub fn tls_source(self: &Arc<Self>) -> crate::server::TlsSource {
        let live = self.clone();
        Arc::new(move || {
            let snap = live.current.load();
            let timeout = snap
                .config
                .tls
                .as_ref()
                .map_or(Duration::from_secs(10), |t| t.handshake_timeout);
            snap.tls.clone().map(|cfg| (cfg, timeout))
        })
    }

    /// Builds the snapshot for `config`. The upstream client (and its connection pool) is kept
    /// when the upstream settings did not change.
    pub fn build(
        config: Config,
        previous: Option<&Snapshot>,
        crm: &Arc<CrmHandle>,
        outbox: &Arc<Outbox>,
        metrics: &Arc<Metrics>,
    ) -> Result<Snapshot, BuildSnapshotError> {
        let tls = config
            .tls
            .as_ref()
            .map(crate::tls::server_config)
            .transpose()?;
        let upstream = match previous {
            Some(prev) if prev.config.upstream == config.upstream => prev.upstream.clone(),
            _ => Upstream::new(&config.upstream, metrics.clone())?,
        };
        let invoicer = Invoicer::new(
            crm.clone(),
            outbox.clone(),
            config.crm.sync_budget,
            &config.sales.default_currency,
        );
        let sales = SalesLayer::new(SalesContext::new(&config, invoicer, metrics.clone()));
        let proxy = AccessLogLayer {
            enabled: config.access_log,
            metrics: metrics.clone(),
        }
        .layer(sales.layer(upstream.clone()));
        Ok(Snapshot {
            config: Arc::new(config),
            proxy,
            upstream,
            tls,
        })
    }
}

/// The service the proxy listener serves: the current snapshot's stack, per request.
#[derive(Clone)]
pub struct LiveService {
    pub live: Arc<Live>,
}

impl Service<Request<Body>> for LiveService {
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = <ProxyStack as Service<Request<Body>>>::Future;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<Body>) -> Self::Future {
        self.live.current.load().proxy.clone().call(req)
    }
}
