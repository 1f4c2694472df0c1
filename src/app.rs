//! The composition root: builds every part from the one [`Config`], binds the listeners and
//! hands back the bound addresses (tests bind port 0 and read them here).

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tower::ServiceBuilder;

use crate::access_log::AccessLogLayer;
use crate::admin::{Admin, Readiness};
use crate::config::Config;
use crate::crm::CrmClient;
use crate::invoice::Invoicer;
use crate::outbox::{Clock, Outbox};
use crate::sales::{SalesContext, SalesLayer};
use crate::server::{serve, Shutdown};
use crate::upstream::Upstream;

/// Why the proxy could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot listen on {addr} ({what}): {source}")]
    Bind {
        addr: SocketAddr,
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Crm(#[from] crate::crm::BuildError),
    #[error(transparent)]
    Outbox(#[from] crate::outbox::store::StoreError),
}

/// A running proxy.
pub struct App {
    proxy_addr: SocketAddr,
    admin_addr: SocketAddr,
    stop: watch::Sender<bool>,
    servers: Vec<JoinHandle<()>>,
    worker: JoinHandle<()>,
    outbox: Arc<Outbox>,
    grace: Duration,
}

async fn bind(addr: SocketAddr, what: &'static str) -> Result<TcpListener, StartError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| StartError::Bind { addr, what, source })
}

impl App {
    /// Builds and starts everything described by `config`.
    pub async fn start(config: Config) -> Result<App, StartError> {
        crate::tls::install_crypto_provider();
        let proxy_listener = bind(config.listen, "proxy.listen").await?;
        let admin_listener = bind(config.admin_listen, "proxy.admin_listen").await?;
        let proxy_addr = proxy_listener
            .local_addr()
            .map_err(|source| StartError::Bind {
                addr: config.listen,
                what: "proxy.listen",
                source,
            })?;
        let admin_addr = admin_listener
            .local_addr()
            .map_err(|source| StartError::Bind {
                addr: config.admin_listen,
                what: "proxy.admin_listen",
                source,
            })?;

        let crm = Arc::new(CrmClient::new(&config.crm)?);
        let outbox = Arc::new(Outbox::open(
            &config.data_dir,
            config.outbox.clone(),
            crm.clone(),
            Clock::new(),
        )?);
        let invoicer = Invoicer::new(
            crm,
            outbox.clone(),
            config.crm.sync_budget,
            &config.sales.default_currency,
        );
        let upstream = Upstream::new(&config.upstream);

        // Outermost first: the access log sees the final status (after the sale rewrite);
        // the sales layer sits right in front of the upstream it forwards to.
        let proxy = ServiceBuilder::new()
            .layer(AccessLogLayer {
                enabled: config.access_log,
            })
            .layer(SalesLayer::new(SalesContext::new(&config, invoicer)))
            .service(upstream);

        let readiness = Arc::new(Readiness::default());
        let (stop, shutdown) = Shutdown::new();
        let grace = config.shutdown_grace;
        let servers = vec![
            tokio::spawn(serve(proxy_listener, proxy, shutdown.clone(), grace)),
            tokio::spawn(serve(
                admin_listener,
                Admin::new(
                    readiness.clone(),
                    outbox.clone(),
                    config.admin_token.clone(),
                ),
                shutdown.clone(),
                Duration::from_secs(1),
            )),
        ];
        let worker = tokio::spawn(outbox.clone().run_worker(shutdown));
        readiness.proxy_listening.store(true, Ordering::Release);
        tracing::info!(
            listen = %proxy_addr,
            admin = %admin_addr,
            upstream = %format!("{}://{}", config.upstream.scheme, config.upstream.authority),
            crm_enabled = config.crm.enabled,
            crm_configured = config.crm.endpoint.is_some(),
            outbox = %config.data_dir.display(),
            "pos-crm-proxy started"
        );
        Ok(App {
            proxy_addr,
            admin_addr,
            stop,
            servers,
            worker,
            outbox,
            grace,
        })
    }

    pub fn proxy_addr(&self) -> SocketAddr {
        self.proxy_addr
    }

    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_addr
    }

    /// The outbox, for tests and the admin listener.
    pub fn outbox(&self) -> &Arc<Outbox> {
        &self.outbox
    }

    /// Stops accepting, lets in-flight requests finish (within the grace period), lets running
    /// deliveries finish or puts their jobs back to pending, and returns.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        for task in self.servers {
            let _ = task.await;
        }
        let _ = self.worker.await;
        self.outbox.shutdown(self.grace).await;
    }
}
