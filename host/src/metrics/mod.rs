//! Prometheus / OpenMetrics instrumentation for the server.
//!
//! [`Metrics`] owns a [`prometheus_client`] [`Registry`] plus handles to every
//! metric in it. Recording is `&self`, allocation-free and lock-free for the
//! per-connection counters (their label sets are fixed, so the series are
//! created up front and the handles kept). Per-message counts and call
//! durations are gathered in a connection's [`Tally`] and
//! [`absorb`](Metrics::absorb)ed in bulk. Metrics keyed by a close
//! code, HTTP status or failure reason go through a [`Family`], which takes a
//! shared read lock on the (rare) events they describe. [`Metrics::render`]
//! produces the text exposition served by [`crate::admin`].
//!
//! Exposed series (counters carry the `_total` suffix in the output):
//!
//! | name | type | labels |
//! |---|---|---|
//! | `wharf_connections_accepted_total` | counter | `transport` = `ws` \| `wss` |
//! | `wharf_connections_open` | gauge | |
//! | `wharf_handshakes_pending` | gauge | |
//! | `wharf_buffered_bytes` | gauge | |
//! | `wharf_buffered_waiting` | gauge | |
//! | `wharf_websocket_opened_total` | counter | |
//! | `wharf_websocket_closed_total` | counter | `code`, `clean` = `true` \| `false` |
//! | `wharf_handshake_failures_total` | counter | `status`, `reason` |
//! | `wharf_messages_received_total` | counter | `tenant`, `type` = `text` \| `binary` |
//! | `wharf_received_bytes_total` | counter | `tenant` |
//! | `wharf_messages_sent_total` | counter | `tenant`, `type` = `text` \| `binary` |
//! | `wharf_sent_bytes_total` | counter | `tenant` |
//! | `wharf_protocol_violations_total` | counter | `code` |
//! | `wharf_plugin_failures_total` | counter | `tenant`, `kind` |
//! | `wharf_sends_refused_total` | counter | `reason` |
//! | `wharf_received_dropped_total` | counter | `reason` |
//! | `wharf_unwritten_bytes_total` | counter | `tenant` |
//! | `wharf_tenant_connections_open` | gauge | `tenant` |
//! | `wharf_version_connections_open` | gauge | `tenant`, `version` (the plugin's SHA-256, 16 hex digits), `state` (`active`, `draining`, `standby`); one series per loaded version, gone with it (see [`version_series`]) |
//! | `wharf_tenant_refusals_total` | counter | `tenant`, `reason` |
//! | `wharf_plugin_log_dropped_total` | counter | `tenant` |
//! | `wharf_swaps_total` | counter | `tenant`, `policy` |
//! | `wharf_deploys_failed_total` | counter | `tenant` |
//! | `wharf_migrations_total` | counter | `tenant` |
//! | `wharf_restart_closes_total` | counter | `tenant` |
//! | `wharf_static_responses_total` | counter | `status` |
//! | `wharf_memory_reset_exposed` | gauge | |
//! | `wharf_plugin_call_seconds` | histogram | buckets 1 µs × 2ⁿ, n = 0..23 (to ~8.4 s); one observation per call, a batch (`on-messages`, `on-packed`, `on-packed-words`, `on-texts`) being one call |
//!
//! Series with fixed labels are exported as 0 from the start; the families
//! keyed by code, status, reason or tenant appear on their first event.

mod histogram;
mod tally;

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use histogram::CallHistogram;
pub use tally::Tally;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TransportLabels {
    transport: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ClosedLabels {
    code: CloseCodeLabel,
    clean: bool,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HandshakeLabels {
    status: u16,
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StatusLabels {
    status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CodeLabels {
    code: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PluginLabels {
    tenant: String,
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TenantLabels {
    tenant: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TenantTypeLabels {
    tenant: String,
    r#type: &'static str,
}

/// One tenant's message counters and open-connections gauge, fetched
/// once (at load) so that adding to them takes no lookup.
#[derive(Debug)]
pub struct TenantCounters {
    /// `wharf_tenant_connections_open`.
    open: Gauge,
    received: ByType,
    received_bytes: Counter,
    sent: ByType,
    sent_bytes: Counter,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TenantPolicyLabels {
    tenant: String,
    policy: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TenantReasonLabels {
    tenant: String,
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: &'static str,
}

/// Close code as a label value, with bounded cardinality.
///
/// The peer picks the close code, and the application ranges (3000–4999)
/// would otherwise let clients mint ~2000 series each. Codes defined by
/// RFC 6455 and its registry (1000–1015) are kept exactly; the application
/// ranges collapse to `3xxx` / `4xxx`; anything else is `other`.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
enum CloseCodeLabel {
    Exact(u16),
    Registered,
    Private,
    Other,
}

impl CloseCodeLabel {
    fn from_code(code: u16) -> Self {
        match code {
            1000..=1015 => Self::Exact(code),
            3000..=3999 => Self::Registered,
            4000..=4999 => Self::Private,
            _ => Self::Other,
        }
    }
}

impl EncodeLabelValue for CloseCodeLabel {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        match self {
            Self::Exact(code) => write!(encoder, "{code}"),
            Self::Registered => encoder.write_str("3xxx"),
            Self::Private => encoder.write_str("4xxx"),
            Self::Other => encoder.write_str("other"),
        }
    }
}

/// A text/binary pair of pre-created counter series.
#[derive(Debug)]
struct ByType {
    text: Counter,
    binary: Counter,
}

impl ByType {
    fn new(family: &Family<TenantTypeLabels, Counter>, tenant: &str) -> Self {
        let of = |r#type| {
            family.get_or_create_owned(&TenantTypeLabels {
                tenant: tenant.to_owned(),
                r#type,
            })
        };
        Self {
            text: of("text"),
            binary: of("binary"),
        }
    }

    /// Adds `[text, binary]` counts.
    fn add(&self, [text, binary]: [u64; 2]) {
        add(&self.text, text);
        add(&self.binary, binary);
    }
}

impl TenantCounters {
    /// A connection of the tenant opened (+1) or ended (-1).
    pub fn connection(&self, delta: i64) {
        self.open.inc_by(delta);
    }

    /// One message sent outside a connection's tally: written during the
    /// plugin's call (`runtime::connection_host::DirectWrite`).
    pub fn message_sent(&self, binary: bool, bytes: u64) {
        let by_type = &self.sent;
        let counter = if binary {
            &by_type.binary
        } else {
            &by_type.text
        };
        counter.inc();
        add(&self.sent_bytes, bytes);
    }
}

/// Skips the locked add when there is nothing to add.
fn add(counter: &Counter, n: u64) {
    if n > 0 {
        counter.inc_by(n);
    }
}

/// All server metrics and the registry they are exposed through.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    accepted_ws: Counter,
    accepted_wss: Counter,
    open: Gauge,
    pending: Gauge,
    buffered: Gauge,
    buffered_waiting: Gauge,
    reset_exposed: Gauge,
    opened: Counter,
    closed: Family<ClosedLabels, Counter>,
    handshake_failures: Family<HandshakeLabels, Counter>,
    received: Family<TenantTypeLabels, Counter>,
    received_bytes: Family<TenantLabels, Counter>,
    sent: Family<TenantTypeLabels, Counter>,
    sent_bytes: Family<TenantLabels, Counter>,
    protocol_violations: Family<CodeLabels, Counter>,
    plugin_failures: Family<PluginLabels, Counter>,
    sends_refused: Family<ReasonLabels, Counter>,
    received_dropped: Family<ReasonLabels, Counter>,
    unwritten_bytes: Family<TenantLabels, Counter>,
    tenant_open: Family<TenantLabels, Gauge>,
    tenant_refusals: Family<TenantReasonLabels, Counter>,
    log_dropped: Family<TenantLabels, Counter>,
    swaps: Family<TenantPolicyLabels, Counter>,
    deploys_failed: Family<TenantLabels, Counter>,
    migrations: Family<TenantLabels, Counter>,
    restart_closes: Family<TenantLabels, Counter>,
    static_responses: Family<StatusLabels, Counter>,
    plugin_call: CallHistogram,
}

impl Metrics {
    /// Create the registry with every metric registered (and the fixed-label
    /// series pre-created, so they are exported as 0 before first use).
    pub fn new() -> Arc<Self> {
        let mut registry = Registry::default();

        let accepted = Family::<TransportLabels, Counter>::default();
        let accepted_ws = accepted.get_or_create_owned(&TransportLabels { transport: "ws" });
        let accepted_wss = accepted.get_or_create_owned(&TransportLabels { transport: "wss" });
        registry.register(
            "wharf_connections_accepted",
            "TCP connections accepted, by transport",
            accepted,
        );

        let open = Gauge::default();
        let pending = Gauge::default();
        registry.register(
            "wharf_handshakes_pending",
            "Connections accepted whose handshake (TLS, upgrade request, on-open) is not done",
            pending.clone(),
        );
        let buffered = Gauge::default();
        registry.register(
            "wharf_buffered_bytes",
            "Bytes connections hold for their peers (read buffers, messages being assembled, send queues), against server.max_buffered",
            buffered.clone(),
        );
        let buffered_waiting = Gauge::default();
        registry.register(
            "wharf_buffered_waiting",
            "Connections not reading because server.max_buffered is spent (backpressure), each for at most server.buffered_wait",
            buffered_waiting.clone(),
        );
        registry.register(
            "wharf_connections_open",
            "WebSocket connections currently open",
            open.clone(),
        );
        let reset_exposed = Gauge::default();
        registry.register(
            "wharf_memory_reset_exposed",
            "1 if pool slots are reset in place and swap became possible after start-up (restart wharf); else 0",
            reset_exposed.clone(),
        );

        let opened = Counter::default();
        registry.register(
            "wharf_websocket_opened",
            "WebSocket connections that completed the opening handshake",
            opened.clone(),
        );

        let closed = Family::<ClosedLabels, Counter>::default();
        registry.register(
            "wharf_websocket_closed",
            "WebSocket connections closed, by close code (3xxx/4xxx collapsed) and whether the closing handshake completed",
            closed.clone(),
        );

        let handshake_failures = Family::<HandshakeLabels, Counter>::default();
        registry.register(
            "wharf_handshake_failures",
            "Opening handshakes that failed, by HTTP status and reason",
            handshake_failures.clone(),
        );

        let received = Family::<TenantTypeLabels, Counter>::default();
        registry.register(
            "wharf_messages_received",
            "WebSocket messages received, by tenant and type",
            received.clone(),
        );

        let received_bytes = Family::<TenantLabels, Counter>::default();
        registry.register(
            "wharf_received_bytes",
            "WebSocket message payload bytes received, by tenant",
            received_bytes.clone(),
        );

        let sent = Family::<TenantTypeLabels, Counter>::default();
        registry.register(
            "wharf_messages_sent",
            "WebSocket messages sent, by tenant and type",
            sent.clone(),
        );

        let sent_bytes = Family::<TenantLabels, Counter>::default();
        registry.register(
            "wharf_sent_bytes",
            "WebSocket message payload bytes sent, by tenant",
            sent_bytes.clone(),
        );

        let protocol_violations = Family::<CodeLabels, Counter>::default();
        registry.register(
            "wharf_protocol_violations",
            "Connections failed for a protocol violation, by the close code sent",
            protocol_violations.clone(),
        );

        let plugin_failures = Family::<PluginLabels, Counter>::default();
        registry.register(
            "wharf_plugin_failures",
            "Plugin instance failures, by tenant and kind",
            plugin_failures.clone(),
        );

        let sends_refused = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "wharf_sends_refused",
            "Outbound messages refused or dropped, by reason",
            sends_refused.clone(),
        );

        let received_dropped = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "wharf_received_dropped",
            "Inbound messages dropped before reaching a plugin, by reason",
            received_dropped.clone(),
        );

        let unwritten_bytes = Family::<TenantLabels, Counter>::default();
        registry.register(
            "wharf_unwritten_bytes",
            "Bytes of frames queued for a peer and never written (its connection ended first), by tenant",
            unwritten_bytes.clone(),
        );

        let tenant_open = Family::<TenantLabels, Gauge>::default();
        registry.register(
            "wharf_tenant_connections_open",
            "WebSocket connections currently open, by tenant",
            tenant_open.clone(),
        );

        let tenant_refusals = Family::<TenantReasonLabels, Counter>::default();
        registry.register(
            "wharf_tenant_refusals",
            "Upgrades refused and connections closed by a tenant's limits, by tenant and reason",
            tenant_refusals.clone(),
        );

        let log_dropped = Family::<TenantLabels, Counter>::default();
        registry.register(
            "wharf_plugin_log_dropped",
            "Plugin stdout/stderr lines dropped over the tenant's log_lines_per_second",
            log_dropped.clone(),
        );

        let swaps = Family::<TenantPolicyLabels, Counter>::default();
        registry.register(
            "wharf_swaps",
            "Plugin versions swapped in, by tenant and policy",
            swaps.clone(),
        );
        let deploys_failed = Family::<TenantLabels, Counter>::default();
        registry.register(
            "wharf_deploys_failed",
            "Deploys refused (the component did not compile or lacks an export)",
            deploys_failed.clone(),
        );
        let migrations = Family::<TenantLabels, Counter>::default();
        registry.register(
            "wharf_migrations",
            "Open connections moved to a new version (policy migrate)",
            migrations.clone(),
        );
        let restart_closes = Family::<TenantLabels, Counter>::default();
        registry.register(
            "wharf_restart_closes",
            "Connections closed with 1012 for a new version (policy restart)",
            restart_closes.clone(),
        );

        let static_responses = Family::<StatusLabels, Counter>::default();
        registry.register(
            "wharf_static_responses",
            "Plain HTTP requests answered from static_files.dir, by status",
            static_responses.clone(),
        );

        let plugin_call = CallHistogram::default();
        registry.register(
            "wharf_plugin_call_seconds",
            "Wall-clock duration of calls into plugin instances",
            plugin_call.clone(),
        );

        Arc::new(Self {
            registry,
            accepted_ws,
            accepted_wss,
            open,
            pending,
            buffered,
            buffered_waiting,
            reset_exposed,
            opened,
            closed,
            handshake_failures,
            received,
            received_bytes,
            sent,
            sent_bytes,
            protocol_violations,
            plugin_failures,
            sends_refused,
            received_dropped,
            unwritten_bytes,
            tenant_open,
            tenant_refusals,
            log_dropped,
            swaps,
            deploys_failed,
            migrations,
            restart_closes,
            static_responses,
            plugin_call,
        })
    }

    /// A TCP connection was accepted on a `ws` (plain) or `wss` (TLS) listener.
    pub fn connection_accepted(&self, tls: bool) {
        if tls {
            self.accepted_wss.inc();
        } else {
            self.accepted_ws.inc();
        }
    }

    /// Handshakes in progress now.
    pub fn handshakes_pending(&self, n: usize) {
        self.pending.set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    /// Bytes held for peers across connections now (see `server::budget`).
    pub fn buffered_bytes(&self, n: usize) {
        self.buffered.set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    /// A connection paused for the budget (see `server::budget`), or
    /// (`false`) read again or ended.
    pub fn buffered_waiting(&self, paused: bool) {
        if paused {
            self.buffered_waiting.inc();
        } else {
            self.buffered_waiting.dec();
        }
    }

    /// Pool slots are reset in place and swap became possible after
    /// start-up (see `runtime::swap::watch`).
    pub fn memory_reset_exposed(&self) {
        self.reset_exposed.set(1);
    }

    /// The opening handshake succeeded: the connection is now a WebSocket.
    pub fn connection_opened(&self) {
        self.open.inc();
        self.opened.inc();
    }

    /// A WebSocket opened with [`connection_opened`](Self::connection_opened)
    /// ended. `code` is the close code reported for it (1005/1006 included);
    /// `clean` is whether the closing handshake completed.
    pub fn connection_closed(&self, code: u16, clean: bool) {
        self.open.dec();
        self.closed
            .get_or_create(&ClosedLabels {
                code: CloseCodeLabel::from_code(code),
                clean,
            })
            .inc();
    }

    /// The opening handshake failed with HTTP `status` (0 if no response
    /// could be sent). `reason` is one of `invalid-request`, `timeout`,
    /// `capacity`, `plugin-reject`, `plugin-error`, `io`, `tls`.
    pub fn handshake_failed(&self, status: u16, reason: &'static str) {
        self.handshake_failures
            .get_or_create(&HandshakeLabels { status, reason })
            .inc();
    }

    /// A plain HTTP request was answered from `static_files.dir`.
    pub fn static_response(&self, status: u16) {
        self.static_responses
            .get_or_create(&StatusLabels { status })
            .inc();
    }

    /// A tenant's message counters and open-connections gauge (its series
    /// exist, as 0, from now on).
    pub fn tenant_counters(&self, tenant: &str) -> TenantCounters {
        TenantCounters {
            open: self.tenant_open.get_or_create_owned(&TenantLabels {
                tenant: tenant.to_owned(),
            }),
            received: ByType::new(&self.received, tenant),
            received_bytes: self.tenant_counter(&self.received_bytes, tenant),
            sent: ByType::new(&self.sent, tenant),
            sent_bytes: self.tenant_counter(&self.sent_bytes, tenant),
        }
    }

    /// Adds what a connection of the tenant `to` counted since its last
    /// flush, and empties it.
    pub fn absorb(&self, tally: &mut Tally, to: &TenantCounters) {
        if tally.is_empty() {
            return;
        }
        tally.dirty = false;
        to.received.add(std::mem::take(&mut tally.received));
        to.sent.add(std::mem::take(&mut tally.sent));
        add(
            &to.received_bytes,
            std::mem::take(&mut tally.received_bytes),
        );
        add(&to.sent_bytes, std::mem::take(&mut tally.sent_bytes));
        self.plugin_call.take_from(&mut tally.calls);
    }

    /// The connection was failed with close `code` for a protocol violation.
    pub fn protocol_violation(&self, code: u16) {
        self.protocol_violations
            .get_or_create(&CodeLabels { code })
            .inc();
    }

    /// A plugin instance failed. `kind` is one of `instantiate`, `trap`,
    /// `cpu`, `wall-time`, `memory`, `table`, `pool`, `restore`. `tenant`
    /// is a configured name.
    pub fn plugin_failure(&self, tenant: &str, kind: &'static str) {
        self.plugin_failures
            .get_or_create(&PluginLabels {
                tenant: tenant.to_owned(),
                kind,
            })
            .inc();
    }

    /// A tenant's limit refused an upgrade or closed a connection: `reason`
    /// is `origin` (403), `capacity` (503) or `rate-limit` (1008).
    pub fn tenant_refused(&self, tenant: &str, reason: &'static str) {
        self.tenant_refusals
            .get_or_create(&TenantReasonLabels {
                tenant: tenant.to_owned(),
                reason,
            })
            .inc();
    }

    /// The counter of a tenant's dropped plugin log lines, for its
    /// [`LogBudget`](crate::runtime::log_stream::LogBudget).
    pub fn plugin_log_dropped(&self, tenant: &str) -> Counter {
        self.log_dropped.get_or_create_owned(&TenantLabels {
            tenant: tenant.to_owned(),
        })
    }

    /// A new version of `tenant`'s plugin took over with `policy`.
    pub fn swapped(&self, tenant: &str, policy: &'static str) {
        self.swaps
            .get_or_create(&TenantPolicyLabels {
                tenant: tenant.to_owned(),
                policy,
            })
            .inc();
    }

    pub fn deploy_failed(&self, tenant: &str) {
        self.tenant_counter(&self.deploys_failed, tenant).inc();
    }

    pub fn migrated(&self, tenant: &str) {
        self.tenant_counter(&self.migrations, tenant).inc();
    }

    pub fn restart_closed(&self, tenant: &str) {
        self.tenant_counter(&self.restart_closes, tenant).inc();
    }

    fn tenant_counter(&self, family: &Family<TenantLabels, Counter>, tenant: &str) -> Counter {
        family.get_or_create_owned(&TenantLabels {
            tenant: tenant.to_owned(),
        })
    }

    /// `count` messages the peer sent were dropped before any plugin saw
    /// them (`rate-limit`: after the connection went over its rates).
    pub fn received_dropped(&self, reason: &'static str, count: u64) {
        self.received_dropped
            .get_or_create(&ReasonLabels { reason })
            .inc_by(count);
    }

    /// An outbound message was refused or dropped (`queue-full`, `closed`,
    /// `too-big`, ...). Every dropped message must be counted here.
    pub fn send_refused(&self, reason: &'static str) {
        self.sends_refused(reason, 1);
    }

    /// `count` sends refused at once (a batch the connection could no longer take).
    pub fn sends_refused(&self, reason: &'static str, count: u64) {
        self.sends_refused
            .get_or_create(&ReasonLabels { reason })
            .inc_by(count);
    }

    /// A connection of `tenant` ended with `bytes` of frames still queued
    /// for its peer: the peer left, or stopped reading past the close
    /// timeout, or the server stopped first.
    pub fn unwritten(&self, tenant: &str, bytes: u64) {
        self.tenant_counter(&self.unwritten_bytes, tenant)
            .inc_by(bytes);
    }

    /// The counter of `wharf_sends_refused_total{reason}`, for counting
    /// outside this struct (the pub/sub broker's `mailbox-full` and
    /// `publish-rate`). The series is exported from then on, as 0 at first.
    pub fn sends_refused_counter(&self, reason: &'static str) -> Counter {
        self.sends_refused
            .get_or_create_owned(&ReasonLabels { reason })
    }

    /// Records one call into a plugin made outside a connection's
    /// [`Tally`] (the upgrade decision).
    pub fn plugin_call(&self, d: Duration) {
        self.plugin_call.observe(d);
    }

    /// The OpenMetrics text exposition of every metric (ends with `# EOF`).
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(4096);
        if let Err(error) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            // Writing to a String cannot fail; only a broken label encoder could.
            tracing::error!(%error, "failed to encode metrics");
        }
        out
    }
}

/// One loaded plugin version, for [`version_series`].
pub struct LoadedVersion<'a> {
    pub tenant: &'a str,
    pub sha256: &'a str,
    pub state: &'a str,
    pub connections: usize,
}

/// `wharf_version_connections_open`, rendered from the versions loaded
/// now (not kept in the registry, so an unloaded version's series goes
/// with it and deploys do not grow the output), inserted before `# EOF`
/// of `rendered`. Tenant names and hashes need no escaping.
pub fn version_series<'a>(
    mut rendered: String,
    versions: impl IntoIterator<Item = LoadedVersion<'a>>,
) -> String {
    let mut out = String::from(
        "# HELP wharf_version_connections_open WebSocket connections open on each loaded plugin version.\n\
         # TYPE wharf_version_connections_open gauge\n",
    );
    for v in versions {
        let short = v.sha256.get(..16).unwrap_or(v.sha256);
        let _ = writeln!(
            out,
            "wharf_version_connections_open{{tenant=\"{}\",version=\"{short}\",state=\"{}\"}} {}",
            v.tenant, v.state, v.connections
        );
    }
    match rendered.rfind("# EOF") {
        Some(at) => rendered.insert_str(at, &out),
        None => rendered.push_str(&out),
    }
    rendered
}

#[cfg(test)]
mod tests {
    use super::*;

    fn has_line(out: &str, line: &str) -> bool {
        out.lines().any(|l| l == line)
    }

    #[track_caller]
    fn assert_line(out: &str, line: &str) {
        assert!(has_line(out, line), "missing line {line:?} in:\n{out}");
    }

    #[test]
    fn fresh_registry_exports_fixed_series_as_zero() {
        let m = Metrics::new();
        // A tenant's series exist once it is loaded.
        let _ = m.tenant_counters("default");
        let out = m.render();
        assert_line(
            &out,
            r#"wharf_connections_accepted_total{transport="ws"} 0"#,
        );
        assert_line(
            &out,
            r#"wharf_connections_accepted_total{transport="wss"} 0"#,
        );
        assert_line(&out, "wharf_connections_open 0");
        assert_line(&out, "wharf_websocket_opened_total 0");
        let d = r#"tenant="default","#;
        assert_line(
            &out,
            &format!(r#"wharf_messages_received_total{{{d}type="text"}} 0"#),
        );
        assert_line(
            &out,
            &format!(r#"wharf_messages_received_total{{{d}type="binary"}} 0"#),
        );
        assert_line(
            &out,
            &format!(r#"wharf_messages_sent_total{{{d}type="text"}} 0"#),
        );
        assert_line(
            &out,
            &format!(r#"wharf_messages_sent_total{{{d}type="binary"}} 0"#),
        );
        assert_line(&out, r#"wharf_received_bytes_total{tenant="default"} 0"#);
        assert_line(&out, r#"wharf_sent_bytes_total{tenant="default"} 0"#);
        assert_line(&out, "wharf_plugin_call_seconds_count 0");
        // Families keyed by codes/reasons have no series (and so are not
        // exported at all) until their first event.
        assert!(!out.contains("wharf_websocket_closed"), "{out}");
        assert!(!out.contains("wharf_sends_refused"), "{out}");
        assert!(out.ends_with("# EOF\n"), "{out}");
    }

    #[test]
    fn connection_lifecycle() {
        let m = Metrics::new();
        m.connection_accepted(false);
        m.connection_accepted(true);
        m.connection_accepted(true);
        m.connection_opened();
        m.connection_opened();
        m.connection_opened();
        m.connection_closed(1000, true);
        m.connection_closed(1006, false);
        let out = m.render();
        assert_line(
            &out,
            r#"wharf_connections_accepted_total{transport="ws"} 1"#,
        );
        assert_line(
            &out,
            r#"wharf_connections_accepted_total{transport="wss"} 2"#,
        );
        assert_line(&out, "wharf_connections_open 1");
        assert_line(&out, "wharf_websocket_opened_total 3");
        assert_line(
            &out,
            r#"wharf_websocket_closed_total{code="1000",clean="true"} 1"#,
        );
        assert_line(
            &out,
            r#"wharf_websocket_closed_total{code="1006",clean="false"} 1"#,
        );
    }

    #[test]
    fn peer_chosen_close_codes_have_bounded_cardinality() {
        let m = Metrics::new();
        for code in 3000..5000 {
            m.connection_opened();
            m.connection_closed(code, true);
        }
        m.connection_opened();
        m.connection_closed(2999, false);
        m.connection_opened();
        m.connection_closed(u16::MAX, false);
        let out = m.render();
        assert_line(
            &out,
            r#"wharf_websocket_closed_total{code="3xxx",clean="true"} 1000"#,
        );
        assert_line(
            &out,
            r#"wharf_websocket_closed_total{code="4xxx",clean="true"} 1000"#,
        );
        assert_line(
            &out,
            r#"wharf_websocket_closed_total{code="other",clean="false"} 2"#,
        );
        assert_line(&out, "wharf_connections_open 0");
        let series = out
            .lines()
            .filter(|l| l.starts_with("wharf_websocket_closed_total{"))
            .count();
        assert_eq!(series, 3, "{out}");
    }

    #[test]
    fn labelled_failure_counters() {
        let m = Metrics::new();
        m.handshake_failed(400, "invalid-request");
        m.handshake_failed(400, "invalid-request");
        m.handshake_failed(503, "capacity");
        m.handshake_failed(0, "tls");
        m.protocol_violation(1002);
        m.protocol_violation(1009);
        m.protocol_violation(1009);
        m.plugin_failure("echo", "trap");
        m.plugin_failure("echo", "cpu");
        m.plugin_failure("chat", "trap");
        m.send_refused("queue-full");
        m.send_refused("queue-full");
        m.send_refused("too-big");
        let out = m.render();
        assert_line(
            &out,
            r#"wharf_handshake_failures_total{status="400",reason="invalid-request"} 2"#,
        );
        assert_line(
            &out,
            r#"wharf_handshake_failures_total{status="503",reason="capacity"} 1"#,
        );
        assert_line(
            &out,
            r#"wharf_handshake_failures_total{status="0",reason="tls"} 1"#,
        );
        assert_line(&out, r#"wharf_protocol_violations_total{code="1002"} 1"#);
        assert_line(&out, r#"wharf_protocol_violations_total{code="1009"} 2"#);
        assert_line(
            &out,
            r#"wharf_plugin_failures_total{tenant="echo",kind="trap"} 1"#,
        );
        assert_line(
            &out,
            r#"wharf_plugin_failures_total{tenant="echo",kind="cpu"} 1"#,
        );
        assert_line(
            &out,
            r#"wharf_plugin_failures_total{tenant="chat",kind="trap"} 1"#,
        );
        assert_line(&out, r#"wharf_sends_refused_total{reason="queue-full"} 2"#);
        assert_line(&out, r#"wharf_sends_refused_total{reason="too-big"} 1"#);
    }

    #[test]
    fn sends_refused_counter_handle() {
        let m = Metrics::new();
        let c = m.sends_refused_counter("mailbox-full");
        assert_line(
            &m.render(),
            r#"wharf_sends_refused_total{reason="mailbox-full"} 0"#,
        );
        c.inc_by(3);
        m.sends_refused("mailbox-full", 2);
        assert_line(
            &m.render(),
            r#"wharf_sends_refused_total{reason="mailbox-full"} 5"#,
        );
    }

    #[test]
    fn message_counters() {
        let m = Metrics::new();
        let mut t = Tally::default();
        assert!(t.is_empty());
        t.message_received(false, 5);
        t.message_received(true, 100);
        t.message_received(true, 0);
        t.messages_sent(false, 1, 7);
        t.messages_sent(true, 0, 0);
        assert!(!t.is_empty());
        let acme = m.tenant_counters("acme");
        let other = m.tenant_counters("other");
        m.absorb(&mut t, &acme);
        assert!(t.is_empty());
        m.absorb(&mut t, &acme); // a flushed tally adds nothing twice
        t.message_received(false, 1);
        m.absorb(&mut t, &other);
        let out = m.render();
        let acme = r#"tenant="acme","#;
        assert_line(
            &out,
            &format!(r#"wharf_messages_received_total{{{acme}type="text"}} 1"#),
        );
        assert_line(
            &out,
            &format!(r#"wharf_messages_received_total{{{acme}type="binary"}} 2"#),
        );
        assert_line(&out, r#"wharf_received_bytes_total{tenant="acme"} 105"#);
        assert_line(
            &out,
            &format!(r#"wharf_messages_sent_total{{{acme}type="text"}} 1"#),
        );
        assert_line(
            &out,
            &format!(r#"wharf_messages_sent_total{{{acme}type="binary"}} 0"#),
        );
        assert_line(&out, r#"wharf_sent_bytes_total{tenant="acme"} 7"#);
        assert_line(
            &out,
            r#"wharf_messages_received_total{tenant="other",type="text"} 1"#,
        );
    }

    #[test]
    fn plugin_call_histogram() {
        let m = Metrics::new();
        let mut t = Tally::default();
        t.plugin_call(Duration::from_nanos(500)); // below the first bucket
        t.plugin_call(Duration::from_millis(3));
        t.plugin_call(Duration::from_secs(100)); // beyond the last bucket
        m.absorb(&mut t, &m.tenant_counters("t"));
        m.plugin_call(Duration::ZERO);
        let out = m.render();
        assert_line(&out, "wharf_plugin_call_seconds_count 4");
        assert_line(&out, r#"wharf_plugin_call_seconds_bucket{le="0.000001"} 2"#);
        assert_line(&out, r#"wharf_plugin_call_seconds_bucket{le="0.002048"} 2"#);
        assert_line(&out, r#"wharf_plugin_call_seconds_bucket{le="0.004096"} 3"#);
        assert_line(&out, r#"wharf_plugin_call_seconds_bucket{le="+Inf"} 4"#);
        let sum: f64 = out
            .lines()
            .find_map(|l| l.strip_prefix("wharf_plugin_call_seconds_sum "))
            .expect("sum line")
            .parse()
            .expect("sum is a number");
        assert!((sum - 100.003_000_5).abs() < 1e-9, "{sum}");
        let buckets = out
            .lines()
            .filter(|l| l.starts_with("wharf_plugin_call_seconds_bucket{"))
            .count();
        assert_eq!(buckets, histogram::BUCKETS, "{out}");
    }

    #[test]
    fn shared_across_threads() {
        let m = Metrics::new();
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let m = Arc::clone(&m);
                std::thread::spawn(move || {
                    let counters = m.tenant_counters("t");
                    for _ in 0..1000 {
                        let mut t = Tally::default();
                        t.messages_sent(true, 1, 2);
                        m.absorb(&mut t, &counters);
                        m.send_refused("closed");
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().expect("thread");
        }
        let out = m.render();
        assert_line(
            &out,
            r#"wharf_messages_sent_total{tenant="t",type="binary"} 4000"#,
        );
        assert_line(&out, r#"wharf_sent_bytes_total{tenant="t"} 8000"#);
        assert_line(&out, r#"wharf_sends_refused_total{reason="closed"} 4000"#);
    }
}
