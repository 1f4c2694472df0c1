//! The composition root: builds every part from the one [`Config`], binds the listeners, runs
//! the outbox worker and the reload watcher, and hands back the bound addresses (tests bind
//! port 0 and read them here).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::admin::{Admin, Readiness};
use crate::config::{Config, ConfigError, Env};
use crate::crm::CrmClient;
use crate::live::{BuildSnapshotError, CrmHandle, Live, LiveService};
use crate::metrics::{Metrics, OutcomeLabels};
use crate::outbox::{Clock, Outbox};
use crate::server::{serve, ServeOptions, Shutdown};

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
    #[error(transparent)]
    Build(#[from] BuildSnapshotError),
}

/// Why a reload was refused (the running configuration stays).
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error("no config file to reload from")]
    NoSource,
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Build(#[from] BuildSnapshotError),
}

/// Where the configuration came from, so it can be read again.
#[derive(Clone)]
pub struct ConfigSource {
    pub path: PathBuf,
    /// Whether a missing file is an error (an explicit `--config`).
    pub required: bool,
    pub env: Arc<dyn Env + Send + Sync>,
}

/// Sets the log filter at run time (a `tracing_subscriber` reload handle, from `main`).
pub type LogLevelFn = Arc<dyn Fn(&str) -> Result<(), String> + Send + Sync>;

/// What `main` adds to a start: where to reload from, how to change the log level, and
/// whether SIGHUP reloads.
#[derive(Clone, Default)]
pub struct Startup {
    pub source: Option<ConfigSource>,
    pub log_level: Option<LogLevelFn>,
    pub sighup: bool,
}

/// What a successful reload did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReloadReport {
    /// Settings that changed in the file but only take effect after a restart.
    pub need_restart: Vec<&'static str>,
}

/// Applies new configurations; shared by the watcher task and [`App::reload`].
struct Reloader {
    live: Arc<Live>,
    startup: Startup,
    lock: tokio::sync::Mutex<()>,
}

impl Reloader {
    async fn reload(&self) -> Result<ReloadReport, ReloadError> {
        let source = self.startup.source.as_ref().ok_or(ReloadError::NoSource)?;
        let result = Config::load(&source.path, source.required, source.env.as_ref())
            .map_err(ReloadError::from);
        match result {
            Ok(config) => self.apply(config).await,
            Err(e) => {
                self.count("error");
                Err(e)
            }
        }
    }

    fn count(&self, outcome: &'static str) {
        self.live
            .metrics
            .reloads
            .get_or_create(&OutcomeLabels { outcome })
            .inc();
    }

    async fn apply(&self, mut new: Config) -> Result<ReloadReport, ReloadError> {
        let _one_at_a_time = self.lock.lock().await;
        let old = self.live.snapshot();
        let mut report = ReloadReport::default();
        // What cannot change under running listeners, the open outbox or the installed log
        // formatter keeps its running value, and the operator is told.
        macro_rules! keep {
            ($field:ident, $name:literal) => {
                if new.$field != old.config.$field {
                    report.need_restart.push($name);
                    new.$field = old.config.$field.clone();
                }
            };
        }
        keep!(listen, "proxy.listen");
        keep!(admin_listen, "proxy.admin_listen");
        keep!(data_dir, "storage.data_dir");
        keep!(outbox, "outbox");
        keep!(shutdown_grace, "proxy.shutdown_grace_ms");
        keep!(reload_poll, "proxy.reload_poll_ms");
        keep!(worker_threads, "proxy.worker_threads");
        keep!(limits, "limits");
        if new.log.format != old.config.log.format {
            report.need_restart.push("log.format");
            new.log.format = old.config.log.format;
        }
        if new.tls.is_some() != old.config.tls.is_some() {
            // Switching TLS on or off changes what clients must speak: only on restart.
            report.need_restart.push("tls (on/off)");
            new.tls = old.config.tls.clone();
        }

        let crm_changed = new.crm != old.config.crm;
        let new_crm = if crm_changed {
            Some(CrmClient::new(&new.crm).map_err(|e| {
                self.count("error");
                ReloadError::Build(e.into())
            })?)
        } else {
            None
        };
        let level_changed = new.log.level != old.config.log.level;
        let snapshot = Live::build(
            new,
            Some(&old),
            &self.live.crm,
            &self.live.outbox,
            &self.live.metrics,
        )
        .map_err(|e| {
            self.count("error");
            ReloadError::from(e)
        })?;
        if let Some(client) = new_crm {
            self.live.crm.replace(client);
        }
        if level_changed {
            if let Some(set) = &self.startup.log_level {
                if let Err(e) = set(&snapshot.config.log.level) {
                    tracing::warn!(error = %e, "log level not changed");
                }
            }
        }
        let config = snapshot.config.clone();
        self.live.swap(snapshot);
        self.count("ok");
        tracing::info!(
            crm_enabled = config.crm.enabled,
            crm_configured = config.crm.endpoint.is_some(),
            tls = config.tls.is_some(),
            "configuration reloaded"
        );
        for name in &report.need_restart {
            tracing::warn!(
                setting = name,
                "setting changed but needs a restart; the running value is kept"
            );
        }
        Ok(report)
    }

    /// Reloads on SIGHUP and when the config file changes, until shutdown.
    async fn watch(self: Arc<Self>, mut shutdown: Shutdown) {
        let poll = self.live.config().reload_poll;
        let path = self.startup.source.as_ref().map(|s| s.path.clone());
        let stamp = |p: &PathBuf| -> Option<(SystemTime, u64)> {
            let m = std::fs::metadata(p).ok()?;
            Some((m.modified().ok()?, m.len()))
        };
        let mut last = path.as_ref().and_then(stamp);
        #[cfg(unix)]
        let mut hup = if self.startup.sighup {
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok()
        } else {
            None
        };
        loop {
            #[cfg(unix)]
            let hangup = async {
                match hup.as_mut() {
                    Some(s) => {
                        s.recv().await;
                    }
                    None => std::future::pending::<()>().await,
                }
            };
            #[cfg(not(unix))]
            let hangup = std::future::pending::<()>();
            let tick = async {
                match (poll, &path) {
                    (Some(p), Some(_)) => tokio::time::sleep(p).await,
                    _ => std::future::pending::<()>().await,
                }
            };
            let why = tokio::select! {
                _ = hangup => "SIGHUP",
                _ = tick => "file change",
                _ = shutdown.requested() => return,
            };
            if why == "file change" {
                let now = path.as_ref().and_then(stamp);
                if now == last {
                    continue;
                }
                last = now;
            }
            match self.reload().await {
                Ok(_) => {}
                Err(e) => {
                    tracing::error!(trigger = why, error = %e, "configuration not reloaded; the running configuration stays")
                }
            }
        }
    }
}

/// A running proxy.
pub struct App {
    proxy_addr: SocketAddr,
    admin_addr: SocketAddr,
    stop: watch::Sender<bool>,
    servers: Vec<JoinHandle<()>>,
    background: Vec<JoinHandle<()>>,
    reloader: Arc<Reloader>,
    grace: Duration,
}

async fn bind(
    addr: SocketAddr,
    what: &'static str,
) -> Result<(TcpListener, SocketAddr), StartError> {
    let err = |source| StartError::Bind { addr, what, source };
    let listener = TcpListener::bind(addr).await.map_err(err)?;
    let bound = listener.local_addr().map_err(err)?;
    Ok((listener, bound))
}

impl App {
    /// Builds and starts everything described by `config`.
    pub async fn start(config: Config) -> Result<App, StartError> {
        Self::start_with(config, Startup::default()).await
    }

    /// As [`App::start`], with a reload source, a log-level handle and SIGHUP handling.
    pub async fn start_with(config: Config, startup: Startup) -> Result<App, StartError> {
        crate::tls::install_crypto_provider();
        let metrics = Arc::new(Metrics::new());
        let crm = Arc::new(CrmHandle::new(CrmClient::new(&config.crm)?));
        let outbox = Arc::new(Outbox::open(
            &config.data_dir,
            config.outbox.clone(),
            crm.clone(),
            Clock::System,
            metrics.clone(),
        )?);
        // Certificates and the upstream client are checked before any port is taken.
        let snapshot = Live::build(config.clone(), None, &crm, &outbox, &metrics)?;
        let (proxy_listener, proxy_addr) = bind(config.listen, "proxy.listen").await?;
        let (admin_listener, admin_addr) = bind(config.admin_listen, "proxy.admin_listen").await?;
        let live = Arc::new(Live::new(snapshot, crm, outbox.clone(), metrics.clone()));

        let readiness = Arc::new(Readiness::default());
        let (stop, shutdown) = Shutdown::new();
        let grace = config.shutdown_grace;
        let servers = vec![
            tokio::spawn(serve(
                proxy_listener,
                LiveService { live: live.clone() },
                shutdown.clone(),
                ServeOptions {
                    limits: config.limits,
                    grace,
                    tls: Some(live.tls_source()),
                    handshake_failures: Some(metrics.tls_handshake_failures.clone()),
                },
            )),
            tokio::spawn(serve(
                admin_listener,
                Admin::new(readiness.clone(), live.clone()),
                shutdown.clone(),
                ServeOptions {
                    limits: config.limits,
                    grace: Duration::from_secs(1),
                    tls: None,
                    handshake_failures: None,
                },
            )),
        ];
        let reloader = Arc::new(Reloader {
            live: live.clone(),
            startup,
            lock: tokio::sync::Mutex::new(()),
        });
        let background = vec![
            tokio::spawn(outbox.clone().run_worker(shutdown.clone())),
            tokio::spawn(reloader.clone().watch(shutdown)),
        ];
        readiness.proxy_listening.store(true, Ordering::Release);
        tracing::info!(
            listen = %proxy_addr,
            admin = %admin_addr,
            tls = config.tls.is_some(),
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
            background,
            reloader,
            grace,
        })
    }

    pub fn proxy_addr(&self) -> SocketAddr {
        self.proxy_addr
    }

    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_addr
    }

    /// The outbox, for tests and tools.
    pub fn outbox(&self) -> &Arc<Outbox> {
        &self.reloader.live.outbox
    }

    /// The configuration in force.
    pub fn config(&self) -> Arc<Config> {
        self.reloader.live.config()
    }

    /// Re-reads the config file (as on SIGHUP) and applies it to new requests.
    pub async fn reload(&self) -> Result<ReloadReport, ReloadError> {
        self.reloader.reload().await
    }

    /// Applies `config` to new requests, as a reload would.
    pub async fn apply(&self, config: Config) -> Result<ReloadReport, ReloadError> {
        self.reloader.apply(config).await
    }

    /// Stops accepting, lets in-flight requests finish (within the grace period), lets running
    /// deliveries finish or puts their jobs back to pending, and returns.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        for task in self.servers {
            let _ = task.await;
        }
        // The worker finishes its current attempt; past the grace period it is abandoned and its
        // job goes back to pending below (a late confirmation is still recorded: the CRM's 201
        // wins over the release).
        for task in self.background {
            if tokio::time::timeout(self.grace, task).await.is_err() {
                tracing::warn!("outbox worker still busy at shutdown");
            }
        }
        self.reloader.live.outbox.shutdown(self.grace).await;
    }
}
