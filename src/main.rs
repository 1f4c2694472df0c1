//! The `pos-crm-proxy` binary: command line, logging, signals and exit codes. No logic here.
//!
//! Exit codes: 0 after a clean shutdown, 2 for a configuration error, 1 for anything else.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context as _;
use clap::{Parser, Subcommand, ValueEnum};
use pos_crm_proxy::app::{ConfigSource, LogLevelFn, Startup};
use pos_crm_proxy::config::{Config, LogFormat, ProcessEnv};
use pos_crm_proxy::demo::Demo;
use pos_crm_proxy::outbox::cli;
use pos_crm_proxy::outbox::store::State;
use pos_crm_proxy::App;

/// jemalloc instead of glibc's malloc. Measured (benches/instructions.sh, README): about 12 %
/// fewer user-space instructions per request, because every request allocates and frees
/// futures and buffers of a few KB that glibc serves from its slow paths (bin consolidation);
/// and a smaller RSS with 1,000 idle keep-alive connections. mimalloc saved as much CPU but
/// took more memory per idle connection.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// Sidecar reverse proxy in front of a legacy POS: every completed sale with a customer becomes
/// exactly one paid invoice in the CRM; every other request passes through untouched.
///
/// Environment variables override the config file: POS_UPSTREAM_URL, PROXY_LISTEN,
/// PROXY_ADMIN_LISTEN, PROXY_DATA_DIR, CRM_API_URL, CRM_API_KEY, CRM_INTEGRATION_ENABLED,
/// PROXY_LOG_LEVEL, PROXY_ADMIN_TOKEN, PROXY_TLS_CERT, PROXY_TLS_KEY (RUST_LOG, when set, wins
/// over every log level setting). SIGHUP, or a change of the config file, reloads it without
/// dropping connections; SIGTERM/SIGINT shut down gracefully.
#[derive(Debug, Parser)]
#[command(name = "pos-crm-proxy", version, about, long_about)]
struct Cli {
    /// Config file. When the default is missing, built-in defaults and the environment are used.
    #[arg(long, short = 'c', value_name = "PATH", env = "PROXY_CONFIG")]
    config: Option<PathBuf>,

    /// Log output format (overrides `log.format`): text or json.
    #[arg(long, value_enum, value_name = "FORMAT")]
    log_format: Option<CliLogFormat>,

    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum CliLogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the proxy (the default).
    Run,
    /// Start a sample POS and a sample CRM on loopback with the proxy in front, and print
    /// commands to try.
    Demo {
        /// Where the demo proxy listens.
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: SocketAddr,
        /// Where the demo admin listener listens.
        #[arg(long, default_value = "127.0.0.1:9090")]
        admin_listen: SocketAddr,
    },
    /// Validate the configuration (file and environment), print it with secrets redacted, exit.
    CheckConfig,
    /// Inspect and replay the invoice outbox (safe while the proxy runs).
    #[command(subcommand)]
    Outbox(OutboxCommand),
}

#[derive(Debug, Subcommand)]
enum OutboxCommand {
    /// List jobs, newest first.
    List {
        /// Only jobs in this state: pending, in_flight, delivered, dead or held.
        #[arg(long, value_parser = parse_state)]
        state: Option<State>,
        #[arg(long, default_value_t = 50)]
        limit: usize,
        /// JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Show one sale's job with its frozen invoice payload.
    Show { sale_id: String },
    /// Queue jobs for delivery again: one sale, every dead job, or every held job.
    Retry {
        /// The POS sale id of the job to replay (a dead, held or pending job).
        #[arg(required_unless_present_any = ["all_dead", "all_held"], conflicts_with_all = ["all_dead", "all_held"])]
        sale_id: Option<String>,
        /// Replay every dead job (after fixing what the CRM refused).
        #[arg(long, conflicts_with = "all_held")]
        all_dead: bool,
        /// Release the held queue (after fixing the CRM API key).
        #[arg(long)]
        all_held: bool,
    },
    /// Counts per state and the oldest waiting job.
    Stats {
        #[arg(long)]
        json: bool,
    },
}

fn parse_state(s: &str) -> Result<State, String> {
    State::parse(s)
        .ok_or_else(|| "expected pending, in_flight, delivered, dead or held".to_string())
}

const DEFAULT_CONFIG: &str = "config.toml";

fn main() -> ExitCode {
    let cli = Cli::parse();
    let (path, required) = match &cli.config {
        Some(p) => (p.clone(), true),
        None => (PathBuf::from(DEFAULT_CONFIG), false),
    };
    let needs_config = !matches!(cli.command, Some(Command::Demo { .. }));
    let quiet = matches!(cli.command, Some(Command::Outbox(_)));
    let config = if needs_config {
        match Config::load(&path, required, &ProcessEnv) {
            Ok(c) => Some(c),
            Err(e) => {
                eprintln!("pos-crm-proxy: configuration error: {e}");
                return ExitCode::from(2);
            }
        }
    } else {
        None
    };

    let (level, mut format) = match &config {
        Some(c) => (c.log.level.clone(), c.log.format),
        None => ("info".to_string(), LogFormat::Text),
    };
    if let Some(f) = cli.log_format {
        format = match f {
            CliLogFormat::Text => LogFormat::Text,
            CliLogFormat::Json => LogFormat::Json,
        };
    }
    let log_level = (!quiet).then(|| init_logging(&level, format));
    let startup = Startup {
        source: Some(ConfigSource {
            path: path.clone(),
            required,
            env: Arc::new(ProcessEnv),
        }),
        log_level,
        sighup: true,
    };

    let result = match cli.command.unwrap_or(Command::Run) {
        Command::CheckConfig => {
            println!("{:#?}", config.expect("loaded above"));
            println!("configuration OK");
            Ok(())
        }
        Command::Run => {
            let config = config.expect("loaded above");
            runtime(config.worker_threads).and_then(|rt| rt.block_on(run(config, startup)))
        }
        Command::Demo {
            listen,
            admin_listen,
        } => runtime(None).and_then(|rt| rt.block_on(demo(listen, admin_listen))),
        Command::Outbox(cmd) => outbox(cmd, &config.expect("loaded above")),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("pos-crm-proxy: {e:#}");
            ExitCode::from(1)
        }
    }
}

/// Installs the global subscriber; returns the handle that changes the level on reload.
fn init_logging(level: &str, format: LogFormat) -> LogLevelFn {
    use std::io::IsTerminal;
    use tracing_subscriber::prelude::*;
    use tracing_subscriber::{reload, EnvFilter};
    let from_env = std::env::var_os("RUST_LOG").is_some();
    let filter = EnvFilter::builder()
        .with_regex(false)
        .try_from_env()
        .or_else(|_| pos_crm_proxy::config::log_filter(level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let (filter, handle) = reload::Layer::new(filter);
    let fmt = tracing_subscriber::fmt::layer()
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => tracing_subscriber::registry().with(filter).with(fmt).init(),
        LogFormat::Json => tracing_subscriber::registry()
            .with(filter)
            .with(fmt.json())
            .init(),
    }
    Arc::new(move |level: &str| {
        if from_env {
            return Err("RUST_LOG is set and wins over log.level".to_string());
        }
        let filter = pos_crm_proxy::config::log_filter(level)?;
        handle.reload(filter).map_err(|e| e.to_string())
    })
}

/// The async runtime: `threads` workers (default: one per CPU this process may use). With one
/// worker, a single-threaded runtime: no work stealing to pay for (measured in the `compare`
/// benchmark). SQLite and other blocking work run on their own threads either way.
fn runtime(threads: Option<usize>) -> anyhow::Result<tokio::runtime::Runtime> {
    let threads = threads.unwrap_or_else(|| {
        std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
    });
    let mut builder = if threads == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(threads);
        b
    };
    builder
        .enable_all()
        .thread_name("pos-crm-proxy")
        .build()
        .context("cannot start the async runtime")
}

fn outbox(cmd: OutboxCommand, config: &Config) -> anyhow::Result<()> {
    let cmd = match cmd {
        OutboxCommand::List { state, limit, json } => cli::Command::List { state, limit, json },
        OutboxCommand::Show { sale_id } => cli::Command::Show { sale_id },
        OutboxCommand::Retry {
            sale_id,
            all_dead,
            all_held,
        } => cli::Command::Retry(match (sale_id, all_dead, all_held) {
            (Some(id), _, _) => cli::Target::Sale(id),
            (None, true, _) => cli::Target::AllDead,
            _ => cli::Target::AllHeld,
        }),
        OutboxCommand::Stats { json } => cli::Command::Stats { json },
    };
    let mut out = std::io::stdout().lock();
    cli::run(
        cmd,
        &config.data_dir,
        config.outbox.synchronous_full,
        &mut out,
    )?;
    Ok(())
}

async fn run(config: Config, startup: Startup) -> anyhow::Result<()> {
    let app = App::start_with(config, startup).await?;
    shutdown_signal().await?;
    tracing::info!("shutting down");
    app.shutdown().await;
    Ok(())
}

async fn demo(listen: SocketAddr, admin_listen: SocketAddr) -> anyhow::Result<()> {
    let demo = Demo::start(listen, admin_listen).await?;
    println!("{}", demo.instructions());
    shutdown_signal().await?;
    demo.shutdown().await;
    Ok(())
}

/// SIGINT (Ctrl-C) or SIGTERM.
async fn shutdown_signal() -> anyhow::Result<()> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate()).context("cannot listen for SIGTERM")?;
        tokio::select! {
            r = tokio::signal::ctrl_c() => r.context("cannot listen for Ctrl-C")?,
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    tokio::signal::ctrl_c()
        .await
        .context("cannot listen for Ctrl-C")?;
    Ok(())
}
