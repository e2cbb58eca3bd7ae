//! The network driver: listeners, TLS, and one task per connection that moves
//! bytes between the socket, the protocol core and the plugin instance.

mod budget;
mod conn_id;
mod connection;
pub mod cores;
mod handler;
pub(crate) mod inbox;
mod pending;
mod per_address;
pub mod static_files;
pub mod tls;
pub mod tls_reload;
mod trim;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument as _;

use crate::config::{self, Config};
use crate::metrics::Metrics;
use crate::tenancy::Tenants;

/// Settings every connection task reads.
pub(crate) struct Shared {
    pub handshake: wharf_protocol::HandshakeLimits,
    pub handshake_timeout: Duration,
    /// Connections in their handshake: capped, oldest evicted.
    pub pending: Arc<pending::Pending>,
    /// Bytes all connections hold for their peers, budgeted.
    pub budget: Arc<budget::Budget>,
    /// How long a connection waits for the budget before 1013.
    pub buffered_wait: Duration,
    /// Handshakes and connections per client address, capped.
    pub per_address: Arc<per_address::PerAddress>,
    /// Over how long `restart` swaps spread their 1012 closes.
    pub restart_window: Duration,
    /// How long a connection's send queue may stay full before 1008.
    pub send_queue_grace: Duration,
    pub hibernate_after: Option<Duration>,
    /// Bytes idle connections freed, for the heap trimmer.
    pub released: Arc<trim::Released>,
    pub tenants: Arc<Tenants>,
    pub metrics: Arc<Metrics>,
    pub shutdown: CancellationToken,
    /// Fired with `shutdown`, for the open connections' loops (cheaper to
    /// wait on every pass than the token).
    pub stop: Arc<crate::beacon::Beacon>,
    pub capacity: Arc<Semaphore>,
    pub static_files: Option<static_files::StaticFiles>,
    max_connections: usize,
    ids: conn_id::ConnIds,
}

/// A bound listener.
#[derive(Debug, Clone)]
pub struct Bound {
    pub address: SocketAddr,
    pub tls: bool,
}

impl Bound {
    pub fn url(&self) -> String {
        format!("{}://{}", if self.tls { "wss" } else { "ws" }, self.address)
    }
}

/// A running server.
pub struct Server {
    shared: Arc<Shared>,
    tracker: TaskTracker,
    bound: Vec<Bound>,
    /// One per wss listener (for the admin API's `POST /reload-tls`).
    tls_reloaders: Vec<tls::TlsReloader>,
    shutdown_timeout: Duration,
}

impl Server {
    /// Binds every listener and starts accepting.
    pub async fn start(
        config: &Config,
        tenants: Arc<Tenants>,
        metrics: Arc<Metrics>,
    ) -> anyhow::Result<Self> {
        let sockets = bind_all(config, false)?;
        Self::start_on(config, tenants, metrics, sockets, &[]).await
    }

    /// [`start`](Self::start) on sockets [`bind_all`] bound already (`wharf
    /// serve` binds them before it compiles the plugins, so that a port in
    /// use is told at once, not after a first compile). Each of `cores`
    /// (see [`cores`]) accepts on every listener's address too, on a socket
    /// of its own, which needs the sockets bound `shared`.
    pub async fn start_on(
        config: &Config,
        tenants: Arc<Tenants>,
        metrics: Arc<Metrics>,
        sockets: Vec<std::net::TcpListener>,
        cores: &[tokio::runtime::Handle],
    ) -> anyhow::Result<Self> {
        anyhow::ensure!(
            sockets.len() == config.listeners.len(),
            "{} sockets for {} listeners",
            sockets.len(),
            config.listeners.len()
        );
        let shared = Shared::new(config, tenants, metrics)?;
        let tracker = TaskTracker::new();
        // Hibernation and settling both free memory (see `trim`).
        tokio::spawn(trim::run(
            shared.released.clone(),
            Duration::from_secs(1),
            shared.shutdown.clone(),
        ));
        let mut bound = Vec::new();
        let mut tls_reloaders = Vec::new();
        for (listener, socket) in config.listeners.iter().zip(sockets) {
            let acceptor = match &listener.tls {
                Some(tls) => {
                    let (acceptor, reloader) = tls::reloadable_acceptor(tls)?;
                    tls_reloaders.push(reloader);
                    Some(acceptor)
                }
                None => None,
            };
            let socket = TcpListener::from_std(socket)?;
            let address = socket.local_addr()?;
            bound.push(Bound {
                address,
                tls: acceptor.is_some(),
            });
            for core in cores {
                let socket = {
                    // Registered with that worker's reactor, not this one's.
                    let _worker = core.enter();
                    join_std(address).and_then(TcpListener::from_std)
                }
                .with_context(|| format!("cannot listen on {address} (another worker)"))?;
                tracker.spawn_on(
                    accept_loop(socket, acceptor.clone(), shared.clone(), tracker.clone()),
                    core,
                );
            }
            tracker.spawn(accept_loop(
                socket,
                acceptor,
                shared.clone(),
                tracker.clone(),
            ));
        }
        // File changes and SIGHUP reload the certificates, until shutdown.
        tls_reload::spawn(tls_reloaders.clone(), &shared.shutdown);
        Ok(Self {
            shared,
            tracker,
            bound,
            tls_reloaders,
            shutdown_timeout: config.server.shutdown_timeout,
        })
    }

    pub fn bound(&self) -> &[Bound] {
        &self.bound
    }

    pub fn tls_reloaders(&self) -> &[tls::TlsReloader] {
        &self.tls_reloaders
    }

    /// Stops accepting, sends every open connection 1001 and waits (up to the
    /// shutdown timeout) for their closing handshakes and queued output.
    pub async fn shutdown(self) {
        let open = self.shared.capacity_in_use();
        tracing::info!(open, "shutting down: closing connections with 1001");
        self.shared.begin_shutdown();
        self.tracker.close();
        if tokio::time::timeout(self.shutdown_timeout, self.tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                left = self.tracker.len(),
                "shutdown timeout: dropping connections still open"
            );
        }
    }
}

impl Shared {
    /// What every connection task of a server with `config` reads.
    pub(crate) fn new(
        config: &Config,
        tenants: Arc<Tenants>,
        metrics: Arc<Metrics>,
    ) -> anyhow::Result<Arc<Self>> {
        Ok(Arc::new(Shared {
            handshake: wharf_protocol::HandshakeLimits {
                max_request_bytes: config::bytes(config.server.max_request_size),
                max_headers: config.server.max_request_headers,
            },
            handshake_timeout: config.server.handshake_timeout,
            pending: pending::Pending::new(config.server.max_pending_handshakes, metrics.clone()),
            budget: budget::Budget::new(config::bytes(config.server.max_buffered), metrics.clone()),
            buffered_wait: config.server.buffered_wait,
            per_address: per_address::PerAddress::new(
                config.server.max_pending_per_address,
                config.server.max_connections_per_address,
            ),
            restart_window: config.server.restart_window,
            send_queue_grace: config.websocket.send_queue_grace,
            hibernate_after: config::nonzero(config.plugin.hibernate_after),
            released: Arc::default(),
            tenants,
            metrics,
            shutdown: CancellationToken::new(),
            stop: crate::beacon::Beacon::new(),
            capacity: Arc::new(Semaphore::new(config.server.max_connections as usize)),
            static_files: static_files::StaticFiles::new(&config.static_files)?,
            max_connections: config.server.max_connections as usize,
            ids: conn_id::ConnIds::new(),
        }))
    }

    /// Stops accepting and handshaking, and tells open connections (1001).
    pub(crate) fn begin_shutdown(&self) {
        self.shutdown.cancel();
        self.stop.fire();
    }

    fn capacity_in_use(&self) -> usize {
        self.max_connections
            .saturating_sub(self.capacity.available_permits())
    }
}

/// Every configured listener's socket, bound and listening, in the
/// order of `config.listeners` (for [`Server::start_on`]); `shared`: as
/// [`bind_std`].
pub fn bind_all(config: &Config, shared: bool) -> anyhow::Result<Vec<std::net::TcpListener>> {
    config
        .listeners
        .iter()
        .map(|l| {
            bind_std(l.address, shared).with_context(|| format!("cannot listen on {}", l.address))
        })
        .collect()
}

/// A listener's socket bound as [`Server::start`] binds it, without the
/// runtime: `wharf check` binds (and releases) them to find a port in use
/// before `serve` meets it. `shared`: other workers will bind the address
/// too ([`cores`]), so the socket allows it (`SO_REUSEPORT`). That option
/// would also let another process of the same user share the address (a
/// second wharf, started by mistake, would take half the connections), so
/// a socket without it is bound first: any socket on the address already
/// refuses that one, and the address is then taken as a fresh bind would.
pub fn bind_std(address: SocketAddr, shared: bool) -> std::io::Result<std::net::TcpListener> {
    if !shared {
        return listen_std(address, false);
    }
    let address = {
        let probe = socket_for(address, false)?;
        probe.bind(&address.into())?;
        // Port 0 chose one: the workers' sockets all take it.
        probe
            .local_addr()?
            .as_socket()
            .ok_or_else(|| std::io::Error::other("not an IP address"))?
    };
    listen_std(address, true)
}

/// Another worker's socket on an address [`bind_std`] bound `shared`.
fn join_std(address: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    listen_std(address, true)
}

fn listen_std(address: SocketAddr, reuse_port: bool) -> std::io::Result<std::net::TcpListener> {
    let socket = socket_for(address, reuse_port)?;
    socket.bind(&address.into())?;
    socket.listen(4096)?;
    Ok(socket.into())
}

fn socket_for(address: SocketAddr, reuse_port: bool) -> std::io::Result<socket2::Socket> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(address),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    socket.set_reuse_address(true)?;
    if reuse_port {
        socket.set_reuse_port(true)?;
    }
    if address.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.set_nonblocking(true)?;
    Ok(socket)
}

async fn accept_loop(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    shared: Arc<Shared>,
    tracker: TaskTracker,
) {
    loop {
        let accepted = tokio::select! {
            _ = shared.shutdown.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(err) => {
                // EMFILE and friends: back off instead of spinning.
                tracing::warn!(%err, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        shared.metrics.connection_accepted(tls.is_some());
        // One address may not hold every handshake place: past its cap its
        // new sockets are closed at once, before they cost a task.
        let Some(address) = shared.per_address.admit(peer.ip()) else {
            tracing::debug!(%peer, "too many handshakes from this address; closed");
            shared.metrics.handshake_failed(0, "address-pending");
            continue;
        };
        // Taken before the task exists: past the cap the oldest pending
        // handshake makes room.
        let handshake = shared
            .pending
            .admit(shared.handshake_timeout, Some(address));
        let shared = shared.clone();
        let tls = tls.clone();
        // Two task types, not one future for both: an async fn's state is
        // as large as its largest branch, and a plain connection need not
        // carry the room for a TLS stream's.
        let _ = stream.set_nodelay(true);
        let id = shared.ids.next();
        let span = tracing::debug_span!("conn", id, %peer);
        // Boxed here, once: tokio would otherwise move the whole state
        // machine (kilobytes) several times while spawning it.
        match tls {
            None => tracker.spawn(Box::pin(
                connection::run(
                    std::future::ready(Some(stream)),
                    peer,
                    false,
                    id,
                    shared,
                    handshake,
                )
                .instrument(span),
            )),
            Some(acceptor) => tracker.spawn(Box::pin(
                connection::run(
                    accept_tls(stream, acceptor, id, peer, shared.metrics.clone()),
                    peer,
                    true,
                    id,
                    shared,
                    handshake,
                )
                .instrument(span),
            )),
        };
    }
}

/// The TLS handshake, as a connection's transport: `None` if it failed
/// (its deadline is the connection's, see `connection::run`).
async fn accept_tls(
    stream: TcpStream,
    acceptor: TlsAcceptor,
    id: u64,
    peer: SocketAddr,
    metrics: Arc<Metrics>,
) -> Option<tokio_rustls::server::TlsStream<TcpStream>> {
    // Boxed: the TLS handshake's future is large and short-lived.
    match Box::pin(acceptor.accept(stream)).await {
        Ok(stream) => Some(stream),
        Err(err) => {
            tracing::debug!(id, %peer, %err, "TLS handshake failed");
            metrics.handshake_failed(0, "tls");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Workers share a listener's address; nobody else does, not even a
    /// second wharf whose sockets would allow it.
    #[test]
    fn a_shared_address_is_shared_by_the_workers_alone() {
        let first = bind_std("127.0.0.1:0".parse().unwrap(), true).unwrap();
        let address = first.local_addr().unwrap();
        let _worker = join_std(address).expect("another worker's socket");
        for shared in [true, false] {
            let err = bind_std(address, shared).expect_err("a second server took the address");
            assert_eq!(err.kind(), std::io::ErrorKind::AddrInUse, "shared {shared}");
        }
        // A plain listener's address is not joined either.
        let plain = bind_std("127.0.0.1:0".parse().unwrap(), false).unwrap();
        assert!(join_std(plain.local_addr().unwrap()).is_err());
    }
}
