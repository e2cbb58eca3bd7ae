//! The control plane's tenants: whose handler serves a request, within
//! which limits. Connections ask [`Tenants::route`] once, before any plugin
//! runs, and keep the [`Tenant`] they were given; nothing here reaches into
//! the connection driver.

pub mod origin;
pub mod rate;
pub mod routes;

use std::fmt::Write as _;
use std::sync::{Arc, RwLock};

use anyhow::Context as _;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use self::origin::OriginPolicy;
use self::rate::RateLimit;
use self::routes::RouteTable;
use crate::config::{self, Config, InstanceMode, ResolvedTenant};
use crate::metrics::Metrics;
use crate::runtime::connection_host::SendLimits;
use crate::runtime::cpu_share::CpuShare;
use crate::runtime::limits::CpuBudget;
use crate::runtime::log_stream::LogBudget;
use crate::runtime::shared::SharedInstance;
use crate::runtime::{InstanceLimits, Plugin, PluginSpec, Runtime, WasiGrants};

/// The plugin a tenant's new connections get. Swapping it leaves
/// connections already open on the plugin they started with.
#[derive(Clone)]
pub struct PluginSlot(Arc<RwLock<Arc<Plugin>>>);

impl PluginSlot {
    pub fn new(plugin: Plugin) -> Self {
        Self(Arc::new(RwLock::new(Arc::new(plugin))))
    }

    pub fn current(&self) -> Arc<Plugin> {
        match self.0.read() {
            Ok(p) => p.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }
}

/// One tenant as the server runs it.
pub struct Tenant {
    pub name: Arc<str>,
    pub plugin: PluginSlot,
    pub instance: InstanceMode,
    /// In shared mode: the one instance all its connections use.
    pub shared: Option<Arc<SharedInstance>>,
    /// Its connections' protocol limits and timers.
    pub ws: wharf_protocol::Config,
    pub origins: OriginPolicy,
    pub rate: RateLimit,
    /// Its plugin calls' share of the CPU, across its connections.
    pub cpu: Arc<CpuShare>,
    pub routes: Vec<String>,
    pub max_connections: u32,
    connections: Arc<Semaphore>,
}

impl Tenant {
    /// A place among the tenant's connections; `None` when it has
    /// `max_connections` open.
    pub fn admit(&self) -> Option<OwnedSemaphorePermit> {
        self.connections.clone().try_acquire_owned().ok()
    }

    /// Connections open (or upgrading) now.
    pub fn open_connections(&self) -> usize {
        (self.max_connections as usize).saturating_sub(self.connections.available_permits())
    }
}

/// Every tenant and the route table over them.
pub struct Tenants {
    list: Vec<Arc<Tenant>>,
    routes: RouteTable,
}

impl Tenants {
    /// Loads every tenant's plugin (compiling or from the cache) with its
    /// limits and settings.
    pub fn load(config: &Config, runtime: &Runtime, metrics: &Metrics) -> anyhow::Result<Tenants> {
        let resolved = config.resolved_tenants();
        let routes = RouteTable::build(&resolved)?;
        let mut list = Vec::with_capacity(resolved.len());
        for tenant in &resolved {
            let spec = PluginSpec {
                tenant: tenant.name.as_str().into(),
                limits: instance_limits(config, tenant),
                settings: Arc::new(tenant.settings.clone()),
                log: LogBudget::new(
                    tenant.limits.log_lines_per_second,
                    metrics.plugin_log_dropped(&tenant.name),
                ),
                cpu_share: Arc::new(CpuShare::new(tenant.limits.cpu_share)),
                wasi: Arc::new(WasiGrants {
                    env: tenant
                        .wasi
                        .env
                        .iter()
                        .filter_map(|name| Some((name.clone(), std::env::var(name).ok()?)))
                        .collect(),
                    dir: tenant.wasi.dir.clone(),
                }),
            };
            let plugin = match &tenant.plugin {
                Some(path) => {
                    let (name, bytes) = crate::runtime::read_plugin(path)?;
                    runtime.load_for(spec, &name, &bytes)
                }
                None => runtime.load_for(spec, "echo", crate::bundled::ECHO),
            }
            .with_context(|| format!("tenant {}", tenant.name))?;
            list.push(Arc::new(Tenant::new(config, tenant, plugin)?));
        }
        Ok(Tenants { list, routes })
    }

    /// The tenant serving a request for `host` (the `Host` header) and `path`.
    pub fn route(&self, host: Option<&str>, path: &str) -> Option<&Arc<Tenant>> {
        self.routes.lookup(host, path).map(|i| &self.list[i])
    }

    pub fn iter(&self) -> impl Iterator<Item = &Arc<Tenant>> {
        self.list.iter()
    }

    /// The route table, most specific route first, as `wharf check`
    /// prints it.
    pub fn describe(&self) -> String {
        let mut out =
            String::from("route                                    tenant            plugin\n");
        for (route, i) in self.routes.routes() {
            let tenant = &self.list[i];
            let _ = writeln!(
                out,
                "{:<40} {:<17} {} (sha256 {})",
                route.to_string(),
                tenant.name,
                tenant.plugin.current().name(),
                &tenant.plugin.current().hash()[..12],
            );
        }
        out
    }
}

impl Tenant {
    fn new(config: &Config, tenant: &ResolvedTenant, plugin: Plugin) -> anyhow::Result<Tenant> {
        let limits = &tenant.limits;
        let ws = &config.websocket;
        let origins = match &tenant.allowed_origins {
            Some(list) => OriginPolicy::parse(list).map_err(anyhow::Error::msg)?,
            None => OriginPolicy::default(),
        };
        let cpu = plugin.cpu_share().clone();
        let plugin = PluginSlot::new(plugin);
        let shared = (tenant.instance == InstanceMode::Shared)
            .then(|| Arc::new(SharedInstance::new(plugin.current())));
        Ok(Tenant {
            name: tenant.name.as_str().into(),
            plugin,
            instance: tenant.instance,
            shared,
            ws: wharf_protocol::Config {
                max_frame_size: config::bytes(limits.max_frame_size),
                max_message_size: config::bytes(limits.max_message_size),
                fragment_size: ws.fragment_size.map(config::bytes),
                send_queue_bytes: config::bytes(limits.send_queue),
                ping_interval: config::nonzero(ws.ping_interval),
                idle_timeout: config::nonzero(ws.idle_timeout),
                close_timeout: ws.close_timeout,
            },
            origins,
            rate: RateLimit {
                messages_per_second: limits.messages_per_second,
                bytes_per_second: limits.bytes_per_second.as_u64(),
            },
            cpu,
            routes: tenant.routes.clone(),
            max_connections: limits.max_connections,
            connections: Arc::new(Semaphore::new(limits.max_connections as usize)),
        })
    }
}

/// What each of a tenant's instances is limited to.
fn instance_limits(config: &Config, tenant: &ResolvedTenant) -> InstanceLimits {
    let limits = &tenant.limits;
    InstanceLimits {
        memory: config::bytes(limits.memory_limit),
        cpu: CpuBudget {
            cpu: limits.cpu_time_per_event,
            wall: limits.wall_time_per_event,
        },
        send: SendLimits {
            max_message_size: config::bytes(limits.max_message_size),
            send_queue: config::bytes(limits.send_queue),
            fragment_size: config.websocket.fragment_size.map(config::bytes),
        },
    }
}

/// The runtime's defaults: the largest memory limit of any tenant sizes
/// the pool's slots.
pub fn runtime_limits(config: &Config) -> InstanceLimits {
    let tenants = config.resolved_tenants();
    let mut limits = instance_limits(config, &tenants[0]);
    limits.memory = tenants
        .iter()
        .map(|t| config::bytes(t.limits.memory_limit))
        .max()
        .unwrap_or(limits.memory);
    limits
}
