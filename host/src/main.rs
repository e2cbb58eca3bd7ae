//! The `wharf` command line.

use std::io::IsTerminal as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;
use wharf::config::{self, Config, ListenerConfig};
use wharf::metrics::Metrics;
use wharf::runtime::engine::{self, MemoryReset};
use wharf::runtime::swap::Swap;
use wharf::runtime::{Runtime, RuntimeConfig};
use wharf::server::Server;
use wharf::server::cores::{self, Cores};
use wharf::tenancy::{self, Tenants};

/// jemalloc, not glibc's malloc. A connection's instance is some 60 blocks
/// allocated and freed together: glibc took 12k of a connection's 115k
/// instructions for them, and left the freed ones as holes between the
/// blocks of connections that stay open. With jemalloc a connection costs
/// 106k instructions and 7.5% less server CPU, and an idle connection
/// holds 1.2 KiB less live, 1.5 KiB less hibernated (3.5–3.9 KiB) and
/// 2.2 KiB less as a shared instance's member (host/benches/RESULTS.md,
/// "jemalloc as the allocator"). The heap trimmer purges it
/// (`server::trim`). The library leaves the choice to its binary: the
/// density bench's native baseline keeps the system allocator.
#[cfg(unix)]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// Wharf: a WebSocket server whose application logic runs in sandboxed
/// WebAssembly components.
///
/// The host does TLS, the HTTP/1.1 upgrade and all of RFC 6455; each
/// connection gets its own instance of the handler component, with its own
/// memory and CPU limits. Logging is controlled with RUST_LOG (default
/// "info") and --log-format.
#[derive(Parser)]
#[command(version = wharf::VERSION, about, long_about)]
struct Cli {
    /// Log lines on stderr as text (coloured only on a terminal, unless
    /// NO_COLOR is set) or as JSON objects, one a line.
    #[arg(
        long,
        global = true,
        value_enum,
        default_value_t = LogFormat::Text,
        env = "WHARF_LOG_FORMAT"
    )]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Serve WebSocket connections (with no options: the bundled echo handler
    /// on ws://127.0.0.1:8080).
    Serve(ServeArgs),
    /// Find what `serve` would refuse at start-up, without serving.
    ///
    /// Loads the configuration and every tenant's plugin, the certificates,
    /// the static directory and the admin token, and binds (then releases)
    /// every address `serve` would listen on; prints the route table and
    /// exits 0 if all is well. A port in use fails it: run it with the
    /// server stopped, or with --listen 127.0.0.1:0 to check the rest.
    Check(CheckArgs),
    /// Create a plugin project (an echo handler, the WIT and a build script)
    /// in Rust, Python, JavaScript, C or Go.
    New(wharf::scaffold::NewArgs),
    /// Show each tenant's plugin versions and connections (admin API).
    Status(wharf::admin::client::StatusArgs),
    /// Upload a component as a tenant's new plugin version (admin API).
    Deploy(wharf::admin::client::DeployArgs),
    /// Put a tenant's previous plugin version back (admin API).
    Rollback(wharf::admin::client::RollbackArgs),
    /// Show where compiled plugins are cached and how much they take;
    /// `wharf cache clear` removes them.
    Cache(CacheArgs),
}

#[derive(clap::Args)]
struct CacheArgs {
    /// Configuration file whose [plugin] cache_dir and cache_max_size to
    /// use. Default: $WHARF_CONFIG, else ./wharf.toml if it exists, else
    /// built-in defaults.
    #[arg(short, long, value_name = "FILE", env = "WHARF_CONFIG", global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    action: Option<CacheAction>,
}

#[derive(Subcommand)]
enum CacheAction {
    /// Remove every compiled plugin from the cache (each is compiled again
    /// when next loaded). Safe while a server runs.
    Clear,
}

/// Where `serve` and `check` get their addresses from: `IP:PORT` only
/// (see [`config::parse_socket_addr`]).
fn socket_addr(text: &str) -> Result<SocketAddr, String> {
    config::parse_socket_addr(text)
}

#[derive(clap::Args)]
struct ServeArgs {
    /// Configuration file (TOML; see the README for every key). Default:
    /// $WHARF_CONFIG, else ./wharf.toml if it exists, else built-in
    /// defaults. Relative paths in it are relative to its directory.
    #[arg(short, long, value_name = "FILE", env = "WHARF_CONFIG")]
    config: Option<PathBuf>,
    /// Listen on this IP:PORT with plain ws:// instead of the configured
    /// listeners (repeatable). Port 0 picks a free port; the bound address is
    /// printed on stdout as "listening on ws://ADDR".
    #[arg(short, long, value_name = "ADDR", value_parser = socket_addr)]
    listen: Vec<SocketAddr>,
    /// Handler component (.wasm) to serve instead of the configured one.
    #[arg(short, long, value_name = "PATH")]
    plugin: Option<PathBuf>,
    /// Serve the admin API (health, metrics, tenants, hot swap) on this IP:PORT.
    #[arg(long, value_name = "ADDR", value_parser = socket_addr)]
    admin: Option<SocketAddr>,
    /// Answer plain HTTP GETs (not upgrades) with files from this directory,
    /// e.g. the page that opens the WebSocket.
    #[arg(long = "static", value_name = "DIR")]
    static_dir: Option<PathBuf>,
    /// Redeploy a tenant when its plugin file changes (policy drain).
    #[arg(long)]
    watch: bool,
}

#[derive(clap::Args)]
struct CheckArgs {
    /// Configuration file (TOML; see the README for every key). Default:
    /// $WHARF_CONFIG, else ./wharf.toml if it exists, else built-in
    /// defaults. Relative paths in it are relative to its directory.
    #[arg(short, long, value_name = "FILE", env = "WHARF_CONFIG")]
    config: Option<PathBuf>,
    /// Check this IP:PORT (plain ws://) instead of the configured listeners
    /// (repeatable): it must be free to bind.
    #[arg(short, long, value_name = "ADDR", value_parser = socket_addr)]
    listen: Vec<SocketAddr>,
    /// Handler component (.wasm) to check instead of the configured one.
    #[arg(short, long, value_name = "PATH")]
    plugin: Option<PathBuf>,
    /// Check that the admin API could listen on this IP:PORT (it must be
    /// free to bind), instead of the configured [admin] listen.
    #[arg(long, value_name = "ADDR", value_parser = socket_addr)]
    admin: Option<SocketAddr>,
    /// Check this static-files directory instead of the configured one.
    #[arg(long = "static", value_name = "DIR")]
    static_dir: Option<PathBuf>,
}

/// What `serve` and `check` take from the command line over the file.
struct Overrides<'a> {
    config: Option<&'a Path>,
    listen: &'a [SocketAddr],
    plugin: Option<&'a Path>,
    admin: Option<SocketAddr>,
    static_dir: Option<&'a Path>,
}

impl ServeArgs {
    fn overrides(&self) -> Overrides<'_> {
        Overrides {
            config: self.config.as_deref(),
            listen: &self.listen,
            plugin: self.plugin.as_deref(),
            admin: self.admin,
            static_dir: self.static_dir.as_deref(),
        }
    }
}

impl CheckArgs {
    fn overrides(&self) -> Overrides<'_> {
        Overrides {
            config: self.config.as_deref(),
            listen: &self.listen,
            plugin: self.plugin.as_deref(),
            admin: self.admin,
            static_dir: self.static_dir.as_deref(),
        }
    }
}

fn main() -> ExitCode {
    // Usage errors exit 2 here (clap); everything after is a runtime error: 1.
    let cli = Cli::parse();
    init_logging(cli.log_format);
    match run(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            // Not `main() -> Result`: that prints the chain twice (Display,
            // then "Caused by:") and, with RUST_BACKTRACE=1, a host backtrace
            // that says nothing about a user's mistake.
            eprintln!("error: {}", report(&err));
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes on one line, each said once: many errors
/// already include their source's text in their own (`cannot read X: No
/// such file`), so a cause whose text is already there is left out.
fn report(err: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in err.chain() {
        let cause = cause.to_string();
        if text.contains(&cause) {
            continue;
        }
        if !text.is_empty() {
            text.push_str(": ");
        }
        text.push_str(&cause);
    }
    text
}

fn init_logging(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,cranelift=warn,wasmtime=warn"));
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => logs.json().init(),
        LogFormat::Text => {
            // Escapes only for a person at a terminal: log files and the
            // journal get plain text. NO_COLOR (no-color.org) turns them off there too.
            let no_color = std::env::var_os("NO_COLOR").is_some_and(|v| !v.is_empty());
            logs.with_ansi(std::io::stderr().is_terminal() && !no_color)
                .init()
        }
    }
}

fn run(command: Command) -> anyhow::Result<()> {
    // Each connection is a socket: allow as many as the hard limit permits.
    if let Err(err) = rlimit::increase_nofile_limit(u64::MAX) {
        tracing::warn!(%err, "cannot raise the open-files limit");
    }
    let (overrides, watch, check_only) = match &command {
        Command::Serve(a) => (a.overrides(), a.watch, false),
        Command::Check(a) => (a.overrides(), false, true),
        Command::New(a) => return wharf::scaffold::run(a),
        Command::Status(a) => return wharf::admin::client::status(a),
        Command::Deploy(a) => return wharf::admin::client::deploy(a),
        Command::Rollback(a) => return wharf::admin::client::rollback(a),
        Command::Cache(a) => return cache(a),
    };
    let config = load_config(&overrides)?;
    // Everything start-up could refuse that costs no compile, first: a
    // port in use should not wait behind a plugin's first compile.
    let workers = cores::workers();
    let per_core = cores::per_core(config.server.scheduling, workers);
    let preflight = preflight(&config, per_core)?;
    let memory_reset = memory_reset(&config.plugin)?;
    let watch_swap = matches!(memory_reset, MemoryReset::InPlace { .. });
    let mut runtime = Runtime::new(runtime_config(&config, memory_reset))
        .context("cannot start the plugin runtime")?;
    runtime.set_cache_max_size(config.plugin.cache_max_size.as_u64());
    let metrics = Metrics::new();
    // Pub/sub's missed deliveries and refused publishes: wharf_sends_refused_total.
    let broker = runtime.broker();
    broker.set_counters(|reason| metrics.sends_refused_counter(reason));
    let tenants = Arc::new(Tenants::load(&config, Arc::new(runtime), metrics.clone())?);
    if check_only {
        drop(preflight);
        let count = tenants.iter().count();
        println!("ok: configuration valid, {count} tenant(s), every plugin loads");
        print!("{}", tenants.describe());
        return Ok(());
    }
    tracing::info!(
        workers,
        scheduling = if per_core {
            "per-core"
        } else if workers > 1 {
            "work-stealing"
        } else {
            "one worker"
        },
        "worker threads"
    );
    let extra = if per_core { workers - 1 } else { 0 };
    let cores = Cores::start(extra).context("cannot start the worker threads")?;
    worker_runtime(workers, per_core)
        .enable_all()
        .build()?
        .block_on(serve(
            config, tenants, metrics, watch, preflight, watch_swap, &cores,
        ))
}

/// The runtime `serve` runs on: with one worker, or per core (the first
/// worker's; see `server::cores`), a current-thread runtime; else tokio's
/// multi-thread one with `workers` workers. With one worker the
/// multi-thread runtime only adds cost: the task runs on a worker thread
/// apart from the one blocked in `block_on`, and each pass through the
/// scheduler updates its work-stealing statistics (3.8% of the
/// instructions of a 32 B echo, by callgrind). Threads are named for
/// `top -H`: a current-thread runtime's own threads only run blocking
/// work, a multi-thread runtime's are its workers (and its blocking ones).
fn worker_runtime(workers: usize, per_core: bool) -> tokio::runtime::Builder {
    if workers == 1 || per_core {
        let mut builder = tokio::runtime::Builder::new_current_thread();
        builder.thread_name("wharf-blocking");
        builder
    } else {
        let mut builder = tokio::runtime::Builder::new_multi_thread();
        builder.worker_threads(workers).thread_name("wharf-worker");
        builder
    }
}

/// What start-up checks and holds before the plugins are compiled.
struct Preflight {
    /// Every listener's socket, bound, in `config.listeners`' order.
    listeners: Vec<std::net::TcpListener>,
    admin: Option<std::net::TcpListener>,
    admin_token: Option<wharf::admin::AdminToken>,
}

/// What `serve` would refuse at start-up beyond the configuration, before
/// the plugins (which may take a first compile): each certificate, the
/// static directory, the admin token, and every address, all bound at
/// once (so two listeners on one port are found too; `per_core`: bound to
/// be shared by the workers). `serve` serves on the sockets; `check`
/// releases them.
fn preflight(config: &Config, per_core: bool) -> anyhow::Result<Preflight> {
    for listener in &config.listeners {
        if let Some(tls) = &listener.tls {
            wharf::server::tls::acceptor(tls)
                .with_context(|| format!("listener {}", listener.address))?;
        }
    }
    wharf::server::static_files::StaticFiles::new(&config.static_files)?;
    let admin_token = match config.admin.listen {
        Some(_) => wharf::admin::AdminToken::load(&config.admin)?,
        None => None,
    };
    let listeners = wharf::server::bind_all(config, per_core)?;
    let admin = match config.admin.listen {
        Some(addr) => {
            let socket = std::net::TcpListener::bind(addr)
                .with_context(|| format!("cannot listen on {addr} (admin)"))?;
            socket.set_nonblocking(true)?;
            Some(socket)
        }
        None => None,
    };
    Ok(Preflight {
        listeners,
        admin,
        admin_token,
    })
}

/// `wharf cache [clear]`.
fn cache(args: &CacheArgs) -> anyhow::Result<()> {
    let config = match config::locate(args.config.as_deref()) {
        Some(path) => Config::load(&path)?,
        None => Config::default(),
    };
    let Some(dir) = cache_dir(&config) else {
        println!("no cache directory: neither plugin.cache_dir, XDG_CACHE_HOME nor HOME is set");
        return Ok(());
    };
    let size = |bytes: u64| bytesize::ByteSize(bytes).display().iec().to_string();
    let plugins = |n: usize| format!("{n} compiled plugin{}", if n == 1 { "" } else { "s" });
    match args.action {
        Some(CacheAction::Clear) => {
            let removed = wharf::runtime::cache::clear(&dir).map_err(|why| {
                anyhow::anyhow!("cannot clear the plugin cache {}: {why}", dir.display())
            })?;
            println!(
                "removed {} ({}) from {}",
                plugins(removed.files),
                size(removed.bytes),
                dir.display()
            );
        }
        None => {
            println!("compiled-plugin cache: {}", dir.display());
            let cap = config.plugin.cache_max_size.as_u64();
            match wharf::runtime::cache::usage(&dir) {
                _ if cap == 0 => println!("off (plugin.cache_max_size = 0)"),
                Ok(None) => println!("empty (nothing compiled yet)"),
                Ok(Some(usage)) => println!(
                    "{}, {} (cap {}: plugin.cache_max_size)",
                    plugins(usage.files),
                    size(usage.bytes),
                    size(cap)
                ),
                Err(why) => println!("not used: {why}"),
            }
        }
    }
    Ok(())
}

/// Where compiled plugins are cached: `plugin.cache_dir`, else the default.
fn cache_dir(config: &Config) -> Option<PathBuf> {
    config
        .plugin
        .cache_dir
        .clone()
        .or_else(wharf::runtime::cache::default_dir)
}

fn load_config(args: &Overrides<'_>) -> anyhow::Result<Config> {
    let mut config = match config::locate(args.config) {
        Some(path) => {
            tracing::info!(path = %path.display(), "reading the configuration");
            Config::load(&path)?
        }
        None => Config::default(),
    };
    if !args.listen.is_empty() {
        config.listeners = args
            .listen
            .iter()
            .map(|&address| ListenerConfig { address, tls: None })
            .collect();
    }
    if let Some(path) = args.plugin {
        config.plugin.path = Some(path.to_owned());
    }
    if let Some(dir) = args.static_dir {
        config.static_files.dir = Some(dir.to_owned());
    }
    if let Some(addr) = args.admin {
        config.admin.listen = Some(addr);
    }
    config.validate()?;
    Ok(config)
}

fn runtime_config(config: &Config, memory_reset: MemoryReset) -> RuntimeConfig {
    RuntimeConfig {
        max_instances: config.server.max_connections,
        limits: tenancy::runtime_limits(config),
        cache_dir: cache_dir(config),
        concurrency_support: false,
        memory_reset,
        wide_slots: config.plugin.memory_slots == wharf::config::MemorySlotsMode::Wide,
    }
}

/// `plugin.memory_reset`, checked: `"in-place"` needs the kernel's
/// `PAGEMAP_SCAN` and a process that cannot swap (see
/// `wharf::runtime::swap`).
fn memory_reset(plugin: &config::PluginConfig) -> anyhow::Result<MemoryReset> {
    let keep = config::bytes(plugin.keep_resident());
    if plugin.memory_reset == config::MemoryResetMode::Decommit {
        return Ok(MemoryReset::Decommit {
            keep_resident: keep,
        });
    }
    anyhow::ensure!(
        engine::in_place_available(),
        "plugin.memory_reset = \"in-place\" needs the PAGEMAP_SCAN ioctl on \
         /proc/self/pagemap (Linux 6.7 or later), which is not available here; use \"decommit\""
    );
    let swap = Swap::probe();
    anyhow::ensure!(
        !swap.possible(),
        "plugin.memory_reset = \"in-place\" needs a process that cannot swap, and this one \
         can ({swap}): a written page swapped out of a finished instance would reach the next \
         instance in its slot. Forbid swap to wharf's cgroup (memory.swap.max = 0; systemd: \
         MemorySwapMax=0) or use \"decommit\""
    );
    tracing::info!(reason = %swap, budget = keep, "pool slots reset in place: this process cannot swap");
    Ok(MemoryReset::InPlace { budget: keep })
}

async fn serve(
    config: Config,
    tenants: Arc<Tenants>,
    metrics: Arc<Metrics>,
    watch: bool,
    preflight: Preflight,
    watch_swap: bool,
    cores: &Cores,
) -> anyhow::Result<()> {
    let Preflight {
        listeners,
        admin,
        admin_token,
    } = preflight;
    let admin_listener = admin.map(tokio::net::TcpListener::from_std).transpose()?;
    // GET /readyz: 503 until the listeners serve, and again once shutdown begins.
    let ready = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let server = Server::start_on(
        &config,
        tenants.clone(),
        metrics.clone(),
        listeners,
        cores.handles(),
    )
    .await?;
    let watch_stop = tokio_util::sync::CancellationToken::new();
    wharf::tenancy::watch::spawn(
        tenants.clone(),
        tenants.watched_files(watch),
        watch_stop.clone(),
    )
    .context("cannot watch the plugin files")?;
    if watch_swap {
        // Either guarantee can be undone while wharf runs: say so if it is.
        let metrics = Arc::clone(&metrics);
        tokio::spawn(wharf::runtime::swap::watch(
            std::time::Duration::from_secs(10),
            watch_stop.clone(),
            move || metrics.memory_reset_exposed(),
        ));
    }
    for bound in server.bound() {
        tracing::info!(url = %bound.url(), "listening");
        println!("listening on {}", bound.url());
    }
    ready.store(true, std::sync::atomic::Ordering::SeqCst);
    let admin_stop = tokio_util::sync::CancellationToken::new();
    if let Some(listener) = admin_listener {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("cannot read plugin x.wasm: {source}")]
    struct Read {
        source: std::io::Error,
    }

    #[test]
    fn report_says_each_cause_once() {
        let io = std::io::Error::new(std::io::ErrorKind::NotFound, "No such file");
        let err = anyhow::Error::from(Read { source: io }).context("tenant default");
        assert_eq!(
            report(&err),
            "tenant default: cannot read plugin x.wasm: No such file"
        );
        let err = anyhow::anyhow!("inner").context("outer");
        assert_eq!(report(&err), "outer: inner");
    }
}
