//! The control plane's tenants: whose handler serves a request, within
//! which limits. Connections ask [`Tenants::route`] once, before any plugin
//! runs, and keep the [`Tenant`] they were given; nothing here reaches into
//! the connection driver.

pub mod origin;
pub mod rate;
pub mod routes;
pub mod swap;
pub mod watch;

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::{Instant, UNIX_EPOCH};

use anyhow::Context as _;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use self::origin::OriginPolicy;
use self::rate::RateLimit;
use self::routes::RouteTable;
use self::swap::{PluginSlot, Policy, Version};
use crate::config::{self, Config, InstanceMode, ResolvedTenant};
use crate::metrics::{Metrics, TenantCounters};
use crate::runtime::connection_host::SendLimits;
use crate::runtime::cpu_share::CpuShare;
use crate::runtime::limits::CpuBudget;
use crate::runtime::log_stream::LogBudget;
use crate::runtime::shared::Migration;
use crate::runtime::snapshot;
use crate::runtime::{InstanceLimits, LoadError, Plugin, PluginSpec, Runtime, WasiGrants};
use crate::server::inbox;

/// One tenant as the server runs it.
pub struct Tenant {
    pub name: Arc<str>,
    /// Its plugin's versions: the one new connections get, and the others
    /// still serving connections.
    pub plugin: PluginSlot,
    pub instance: InstanceMode,
    /// What its plugins are loaded with (for deploys).
    spec: PluginSpec,
    /// Its plugin file (none: the bundled echo), and whether a change to
    /// it redeploys the tenant.
    source: Option<std::path::PathBuf>,
    watch: bool,
    /// Its connections' protocol limits and timers (each connection's
    /// protocol state shares them).
    pub ws: Arc<wharf_protocol::Config>,
    pub origins: OriginPolicy,
    pub rate: RateLimit,
    /// Its message and byte counters.
    pub counters: TenantCounters,
    /// Its plugin calls' share of the CPU, across its connections.
    pub cpu: Arc<CpuShare>,
    pub routes: Vec<String>,
    pub max_connections: u32,
    connections: Arc<Semaphore>,
    /// Held through a swap: one at a time per tenant (the admin API
    /// serializes its own, but a file watch may deploy meanwhile).
    swapping: std::sync::Mutex<()>,
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
    runtime: Arc<Runtime>,
    metrics: Arc<Metrics>,
}

/// Why a deploy or a rollback was refused; the running version keeps
/// serving.
#[derive(Debug, thiserror::Error)]
pub enum DeployError {
    #[error("no tenant named {0:?}")]
    UnknownTenant(String),
    #[error(transparent)]
    Invalid(#[from] LoadError),
    #[error("tenant {0} has no previous version to roll back to")]
    NoPrevious(String),
}

impl DeployError {
    /// The HTTP status the admin API answers with.
    pub fn status(&self) -> u16 {
        match self {
            DeployError::UnknownTenant(_) => 404,
            DeployError::Invalid(_) => 422,
            DeployError::NoPrevious(_) => 409,
        }
    }
}

/// What a deploy or rollback did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct DeployOutcome {
    pub tenant: String,
    /// The version now serving new connections (SHA-256 of the component).
    pub sha256: String,
    /// The version it replaced.
    pub previous: String,
    /// The policy applied to open connections.
    pub policy: Policy,
    /// Set when the asked policy could not be applied (and which was).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
    /// Connections open on older versions when the swap was made.
    pub open_connections: usize,
    pub compile_ms: u64,
}

/// A tenant as `GET /tenants` shows it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct TenantStatus {
    pub name: String,
    pub routes: Vec<String>,
    pub instance: &'static str,
    pub max_connections: u32,
    pub connections: usize,
    pub versions: Vec<VersionStatus>,
}

/// One loaded version of a tenant's plugin.
#[derive(Debug, Clone, serde::Serialize)]
pub struct VersionStatus {
    pub sha256: String,
    pub plugin: String,
    /// Seconds since the Unix epoch.
    pub loaded_at: u64,
    pub connections: usize,
    /// `active` (new connections get it), `draining` (connections still
    /// open on it) or `standby` (none: kept loaded as the rollback target).
    pub state: &'static str,
}

impl Tenants {
    /// Loads every tenant's plugin (compiling or from the cache) with its
    /// limits and settings.
    pub fn load(
        config: &Config,
        runtime: Arc<Runtime>,
        metrics: Arc<Metrics>,
    ) -> anyhow::Result<Tenants> {
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
                    wall_clock: tenant.wasi.wall_clock,
                }),
            };
            let plugin = match &tenant.plugin {
                Some(path) => crate::runtime::read_plugin(path)
                    .and_then(|(name, bytes)| runtime.load_for(spec.clone(), &name, &bytes))
                    .with_context(|| format!("tenant {} ({})", tenant.name, path.display())),
                None => runtime
                    .load_for(spec.clone(), "echo", crate::bundled::ECHO)
                    .with_context(|| format!("tenant {}", tenant.name)),
            }?;
            let counters = metrics.tenant_counters(&tenant.name);
            list.push(Arc::new(Tenant::new(
                config, tenant, spec, plugin, counters,
            )?));
        }
        Ok(Tenants {
            list,
            routes,
            runtime,
            metrics,
        })
    }

    /// The plugin files to watch: every tenant's with `all` (`serve
    /// --watch`), else those with `watch = true`.
    pub fn watched_files(&self, all: bool) -> Vec<(String, std::path::PathBuf)> {
        self.list
            .iter()
            .filter(|t| all || t.watch)
            .filter_map(|t| Some((t.name.to_string(), t.source.clone()?)))
            .collect()
    }

    pub fn get(&self, name: &str) -> Option<&Arc<Tenant>> {
        self.list.iter().find(|t| &*t.name == name)
    }

    /// Compiles (or takes from the cache) and checks a new version of a
    /// tenant's plugin, then makes it the one new connections get, moving
    /// the open ones by `policy`. A component that does not compile or
    /// lacks an export is refused and the running version keeps serving.
    /// Blocking (it may compile): call it off the async workers.
    pub fn deploy(
        &self,
        tenant: &str,
        name: &str,
        bytes: &[u8],
        policy: Policy,
    ) -> Result<DeployOutcome, DeployError> {
        let t = self
            .get(tenant)
            .ok_or_else(|| DeployError::UnknownTenant(tenant.to_owned()))?;
        let started = Instant::now();
        let plugin = self
            .runtime
            .load_for(t.spec.clone(), name, bytes)
            .map_err(DeployError::from)
            .inspect_err(|err| {
                tracing::warn!(tenant, %err, "deploy refused");
                self.metrics.deploy_failed(tenant);
            })?;
        let version = Version::new(plugin, t.instance == InstanceMode::Shared);
        Ok(self.install(t, version, policy, started))
    }

    /// Back to the version before the current one.
    pub fn rollback(&self, tenant: &str, policy: Policy) -> Result<DeployOutcome, DeployError> {
        let t = self
            .get(tenant)
            .ok_or_else(|| DeployError::UnknownTenant(tenant.to_owned()))?;
        let previous = t
            .plugin
            .previous()
            .ok_or_else(|| DeployError::NoPrevious(tenant.to_owned()))?;
        // A shared instance that moved away never serves again, and the
        // one a migrate moves the current state into must be new: such a
        // rollback gets a new instance of the previous plugin.
        let previous = if t.instance == InstanceMode::Shared
            && (policy == Policy::Migrate || previous.retired())
        {
            previous.fresh()
        } else {
            previous
        };
        Ok(self.install(t, previous, policy, Instant::now()))
    }

    fn install(
        &self,
        t: &Tenant,
        version: Arc<Version>,
        asked: Policy,
        started: Instant,
    ) -> DeployOutcome {
        let _swapping = t.swapping.lock().unwrap_or_else(|p| p.into_inner());
        // A shared instance's state is in its memory: it moves before the
        // new version is published, so that no connection reaches the new
        // version's instance before the state is in it.
        let (policy, note) = if asked == Policy::Migrate && t.instance == InstanceMode::Shared {
            self.migrate_shared(t, &version)
        } else {
            (asked, None)
        };
        let sha256 = version.plugin.hash().to_owned();
        let old = t.plugin.swap(version, policy);
        let open_connections = t
            .plugin
            .versions()
            .iter()
            .skip(1)
            .map(|v| v.connections())
            .sum();
        self.metrics.swapped(&t.name, policy.as_str());
        tracing::info!(tenant = %t.name, sha256 = &sha256[..16], previous = &old.plugin.hash()[..16], policy = policy.as_str(), open_connections, "plugin swapped");
        DeployOutcome {
            tenant: t.name.to_string(),
            sha256,
            previous: old.plugin.hash().to_owned(),
            policy,
            note,
            open_connections,
            compile_ms: started.elapsed().as_millis() as u64,
        }
    }

    /// Moves a shared tenant's running instance, state and connections, to
    /// `version`'s (see [`SharedInstance::migrate_to`]). Returns the policy
    /// applied, and what the deploy's answer says about it: `drain` unless
    /// both versions export `wharf:websocket/snapshot`. A failed `save` or
    /// `restore` closes the instance's connections with 1011 (counted as
    /// plugin failures); the swap still happens.
    ///
    /// [`SharedInstance::migrate_to`]: crate::runtime::shared::SharedInstance::migrate_to
    fn migrate_shared(&self, t: &Tenant, version: &Version) -> (Policy, Option<String>) {
        let old = t.plugin.current();
        let lacking = match (old.plugin.snapshots(), version.plugin.snapshots()) {
            (true, true) => None,
            (false, true) => Some("the running version does not export it"),
            (true, false) => Some("the new version does not export it"),
            (false, false) => Some("neither version exports it"),
        };
        let drain = |why: String| (Policy::Drain, Some(why));
        if let Some(lacking) = lacking {
            return drain(format!(
                "migrate moves a shared instance's state through {}, and {lacking}; drain was applied",
                snapshot::INTERFACE
            ));
        }
        let (Some(from), Some(to)) = (old.shared.clone(), version.shared.clone()) else {
            return drain("the versions have no shared instance; drain was applied".to_owned());
        };
        let Some(migration) = run_on_runtime(async move { from.migrate_to(&to).await }) else {
            return drain(
                "no async runtime to move the shared instance on; drain was applied".to_owned(),
            );
        };
        tracing::info!(tenant = %t.name, ?migration, "shared instance migration");
        let note = match migration {
            Migration::Idle | Migration::Moved { .. } => None,
            Migration::SaveFailed {
                error,
                connections,
                lost,
            } => {
                self.metrics.plugin_failure(&t.name, error.kind());
                if lost > 0 {
                    self.metrics.sends_refused("instance-failed", lost);
                }
                Some(format!(
                    "the running version's snapshot save failed ({error}): its shared instance was dropped and its {connections} connection(s) closed with 1011; new connections get the new version"
                ))
            }
            Migration::RestoreFailed {
                error,
                connections,
                lost,
            } => {
                self.metrics.plugin_failure(&t.name, error.kind());
                if lost > 0 {
                    self.metrics.sends_refused("instance-failed", lost);
                }
                Some(format!(
                    "the new version's snapshot restore failed ({error}): the state was lost and the {connections} connection(s) moved closed with 1011; new connections get a new instance of the new version"
                ))
            }
        };
        (Policy::Migrate, note)
    }

    /// Every tenant, with its loaded versions.
    pub fn status(&self) -> Vec<TenantStatus> {
        self.list
            .iter()
            .map(|t| {
                let versions = t.plugin.versions();
                TenantStatus {
                    name: t.name.to_string(),
                    routes: t.routes.clone(),
                    instance: match t.instance {
                        InstanceMode::PerConnection => "per-connection",
                        InstanceMode::Shared => "shared",
                    },
                    max_connections: t.max_connections,
                    connections: t.open_connections(),
                    versions: versions
                        .iter()
                        .enumerate()
                        .map(|(i, v)| VersionStatus {
                            sha256: v.plugin.hash().to_owned(),
                            plugin: v.plugin.name().to_owned(),
                            loaded_at: v
                                .loaded_at
                                .duration_since(UNIX_EPOCH)
                                .map_or(0, |d| d.as_secs()),
                            connections: v.connections(),
                            state: match (i, v.connections()) {
                                (0, _) => "active",
                                (_, 0) => "standby",
                                _ => "draining",
                            },
                        })
                        .collect(),
                }
            })
            .collect()
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
                tenant.plugin.current().plugin.name(),
                &tenant.plugin.current().plugin.hash()[..12],
            );
        }
        out
    }
}

impl Tenant {
    fn new(
        config: &Config,
        tenant: &ResolvedTenant,
        spec: PluginSpec,
        plugin: Plugin,
        counters: TenantCounters,
    ) -> anyhow::Result<Tenant> {
        let limits = &tenant.limits;
        let ws = &config.websocket;
        let origins = match &tenant.allowed_origins {
            Some(list) => OriginPolicy::parse(list).map_err(anyhow::Error::msg)?,
            None => OriginPolicy::default(),
        };
        let cpu = plugin.cpu_share().clone();
        let version = Version::new(plugin, tenant.instance == InstanceMode::Shared);
        Ok(Tenant {
            name: tenant.name.as_str().into(),
            plugin: PluginSlot::new(version),
            instance: tenant.instance,
            spec,
            source: tenant.plugin.clone(),
            watch: tenant.watch,
            ws: Arc::new(wharf_protocol::Config {
                max_frame_size: config::bytes(limits.max_frame_size),
                max_message_size: config::bytes(limits.max_message_size),
                fragment_size: ws.fragment_size.map(config::bytes),
                send_queue_bytes: config::bytes(limits.send_queue),
                ping_interval: config::nonzero(ws.ping_interval),
                idle_timeout: config::nonzero(ws.idle_timeout),
                close_timeout: ws.close_timeout,
                // Messages too large to be held for a batch are copied
                // into a plugin's memory from where the protocol read them.
                deliver_masked_from: Some(inbox::MESSAGE_MAX + 1),
            }),
            origins,
            rate: RateLimit {
                messages_per_second: limits.messages_per_second,
                bytes_per_second: limits.bytes_per_second.as_u64(),
            },
            counters,
            cpu,
            routes: tenant.routes.clone(),
            max_connections: limits.max_connections,
            connections: Arc::new(Semaphore::new(limits.max_connections as usize)),
            swapping: std::sync::Mutex::new(()),
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

/// Runs `work` on the runtime of the calling thread (a blocking one, as
/// `deploy`'s callers use) and waits for it. `None` outside a runtime, or
/// if the work panicked.
fn run_on_runtime<F>(work: F) -> Option<F::Output>
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    let handle = tokio::runtime::Handle::try_current().ok()?;
    let (done, result) = std::sync::mpsc::sync_channel(1);
    handle.spawn(async move {
        let _ = done.send(work.await);
    });
    result.recv().ok()
}
