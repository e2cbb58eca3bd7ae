//! The `wharf` command line.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;
use wharf::config::{self, Config, ListenerConfig};
use wharf::metrics::Metrics;
use wharf::runtime::{Runtime, RuntimeConfig};
use wharf::server::Server;
use wharf::tenancy::{self, Tenants};

/// Wharf: a WebSocket server whose application logic runs in sandboxed
/// WebAssembly components.
///
/// The host does TLS, the HTTP/1.1 upgrade and all of RFC 6455; each
/// connection gets its own instance of the handler component, with its own
/// memory and CPU limits. Logging is controlled with RUST_LOG (default "info").
#[derive(Parser)]
#[command(version, about, long_about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve WebSocket connections (with no options: the bundled echo handler
    /// on ws://127.0.0.1:8080).
    Serve(ServeArgs),
    /// Load a configuration and its plugin, report problems, and exit.
    Check(ServeArgs),
    /// Create a plugin project (an echo handler, the WIT and a build script)
    /// in Rust, Python, JavaScript, C or Go.
    New(wharf::scaffold::NewArgs),
    /// Show each tenant's plugin versions and connections (admin API).
    Status(wharf::admin::client::StatusArgs),
    /// Upload a component as a tenant's new plugin version (admin API).
    Deploy(wharf::admin::client::DeployArgs),
    /// Put a tenant's previous plugin version back (admin API).
    Rollback(wharf::admin::client::RollbackArgs),
}

#[derive(clap::Args)]
struct ServeArgs {
    /// Configuration file (TOML); see the README for every key.
    #[arg(short, long, value_name = "FILE", env = "WHARF_CONFIG")]
    config: Option<PathBuf>,
    /// Listen on this address with plain ws:// instead of the configured
    /// listeners (repeatable). Port 0 picks a free port; the bound address is
    /// printed on stdout as "listening on ws://ADDR".
    #[arg(short, long, value_name = "ADDR")]
    listen: Vec<SocketAddr>,
    /// Handler component (.wasm) to serve instead of the configured one.
    #[arg(short, long, value_name = "PATH")]
    plugin: Option<PathBuf>,
    /// Serve the admin API (health, metrics, tenants, hot swap) on this address.
    #[arg(long, value_name = "ADDR")]
    admin: Option<SocketAddr>,
    /// Answer plain HTTP GETs (not upgrades) with files from this directory,
    /// e.g. the page that opens the WebSocket.
    #[arg(long = "static", value_name = "DIR")]
    static_dir: Option<PathBuf>,
    /// Redeploy a tenant when its plugin file changes (policy drain).
    #[arg(long)]
    watch: bool,
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| EnvFilter::new("info,cranelift=warn,wasmtime=warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    // Each connection is a socket: allow as many as the hard limit permits.
    if let Err(err) = rlimit::increase_nofile_limit(u64::MAX) {
        tracing::warn!(%err, "cannot raise the open-files limit");
    }
    let (args, check_only) = match cli.command {
        Command::Serve(a) => (a, false),
        Command::Check(a) => (a, true),
        Command::New(a) => return wharf::scaffold::run(&a),
        Command::Status(a) => return wharf::admin::client::status(&a),
        Command::Deploy(a) => return wharf::admin::client::deploy(&a),
        Command::Rollback(a) => return wharf::admin::client::rollback(&a),
    };
    let config = load_config(&args)?;
    let runtime =
        Runtime::new(runtime_config(&config)).context("cannot start the plugin runtime")?;
    let metrics = Metrics::new();
    // Pub/sub's missed deliveries and refused publishes: wharf_sends_refused_total.
    let broker = runtime.broker();
    broker.set_counters(|reason| metrics.sends_refused_counter(reason));
    let tenants = Arc::new(Tenants::load(&config, Arc::new(runtime), metrics.clone())?);
    if check_only {
        // What `serve` would refuse at start-up: the certificates too.
        for listener in &config.listeners {
            if let Some(tls) = &listener.tls {
                wharf::server::tls::acceptor(tls)
                    .with_context(|| format!("listener {}", listener.address))?;
            }
        }
        let count = tenants.iter().count();
        println!("ok: configuration valid, {count} tenant(s), every plugin loads");
        print!("{}", tenants.describe());
        return Ok(());
    }
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("wharf-worker")
        .build()?
        .block_on(serve(config, tenants, metrics, args.watch))
}

fn load_config(args: &ServeArgs) -> anyhow::Result<Config> {
    let mut config = match &args.config {
        Some(path) => Config::load(path)?,
        None => Config::default(),
    };
    if !args.listen.is_empty() {
        config.listeners = args
            .listen
            .iter()
            .map(|&address| ListenerConfig { address, tls: None })
            .collect();
    }
    if let Some(path) = &args.plugin {
        config.plugin.path = Some(path.clone());
    }
    if let Some(dir) = &args.static_dir {
        config.static_files.dir = Some(dir.clone());
    }
    if let Some(addr) = args.admin {
        config.admin.listen = Some(addr);
    }
    config.validate()?;
    Ok(config)
}

fn runtime_config(config: &Config) -> RuntimeConfig {
    RuntimeConfig {
        max_instances: config.server.max_connections,
        limits: tenancy::runtime_limits(config),
        cache_dir: config
            .plugin
            .cache_dir
            .clone()
            .or_else(wharf::runtime::cache::default_dir),
        concurrency_support: false,
        keep_resident: config::bytes(config.plugin.keep_resident),
    }
}

async fn serve(
    config: Config,
    tenants: Arc<Tenants>,
    metrics: Arc<Metrics>,
    watch: bool,
) -> anyhow::Result<()> {
    // An admin token that cannot be read stops start-up before anything listens.
    let admin_token = match config.admin.listen {
        Some(_) => wharf::admin::AdminToken::load(&config.admin)?,
        None => None,
    };
    // GET /readyz: 503 until the listeners serve, and again once shutdown begins.
    let ready = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let server = Server::start(&config, tenants.clone(), metrics.clone()).await?;
    let watch_stop = tokio_util::sync::CancellationToken::new();
    wharf::tenancy::watch::spawn(
        tenants.clone(),
        tenants.watched_files(watch),
        watch_stop.clone(),
    )
    .context("cannot watch the plugin files")?;
    for bound in server.bound() {
        tracing::info!(url = %bound.url(), "listening");
        println!("listening on {}", bound.url());
    }
    ready.store(true, std::sync::atomic::Ordering::SeqCst);
    let admin_stop = tokio_util::sync::CancellationToken::new();
    if let Some(addr) = config.admin.listen {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen on {addr} (admin)"))?;
        println!("admin on http://{}", listener.local_addr()?);
        if admin_token.is_none() {
            tracing::info!("no admin token: deploys and rollbacks are off");
        }
        let admin = wharf::admin::Admin {
            metrics: Arc::clone(&metrics),
            tenants,
            token: admin_token,
            ready: Arc::clone(&ready),
            limits: wharf::admin::Limits::from_config(&config.admin),
            tls: server.tls_reloaders().to_vec(),
        };
        tokio::spawn(wharf::admin::serve(listener, admin, admin_stop.clone()));
    }
    shutdown_signal().await;
    ready.store(false, std::sync::atomic::Ordering::SeqCst);
    watch_stop.cancel();
    server.shutdown().await;
    admin_stop.cancel();
    tracing::info!("stopped");
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = ctrl_c => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = ctrl_c.await;
            }
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}
