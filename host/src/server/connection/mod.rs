//! One connection's task: the upgrade handshake ([`upgrade`]), then the
//! loop ([`driver`]) that feeds socket bytes to the protocol core, protocol
//! events to the plugin ([`conn`], [`calls`]), and the plugin's sends and
//! the core's output back to the socket ([`io`]).
//!
//! The task owns everything about its connection (socket, protocol state,
//! plugin instance), so connections share nothing but the engine and the
//! metrics, and a misbehaving plugin can only hurt its own connection.

mod calls;
mod conn;
mod driver;
mod io;
#[cfg(test)]
mod tests;
mod transport;
mod upgrade;

use std::net::SocketAddr;
use std::sync::Arc;

pub(crate) use transport::Transport;

use super::Shared;
use super::pending::Handshake;

/// A connection's task: the transport (a TCP stream at once, or after its
/// TLS handshake: `None` if that failed), the upgrade, then the loop.
///
/// An async fn keeps its arguments, and the locals its awaits straddle, in
/// its state for its whole life, moved out or not: the stream (1.2 KiB for
/// TLS), the handshake's place and the upgrade's futures would stay in every
/// open connection's task. They live in the upgrade's box instead, freed
/// once the connection is open; the task carries the connection and its
/// loop.
pub(crate) fn run<S, T>(
    transport: T,
    peer: SocketAddr,
    tls: bool,
    id: u64,
    shared: Arc<Shared>,
    handshake: Handshake,
) -> impl Future<Output = ()> + Send
where
    S: Transport,
    T: Future<Output = Option<S>> + Send,
{
    let upgrade = Box::pin(upgrade(transport, peer, tls, id, shared, handshake));
    async move {
        let Some((opened, mut reader, mut writer, direct, socket)) = upgrade.await else {
            return;
        };
        let (mut conn, buf, permits) = opened.into_parts();
        conn.write_through(direct);
        let mut driver = driver::Driver::new(buf, tls, socket);
        conn.drive(&mut reader, &mut writer, &mut driver).await;
        drop(permits);
    }
}

/// An open connection and its transport's halves and socket (see
/// [`Transport`]).
type Opened<S> = (
    Box<upgrade::Opened>,
    <S as Transport>::Reader,
    <S as Transport>::Writer,
    Option<std::sync::Weak<tokio::net::TcpStream>>,
    transport::Socket,
);

/// The transport and the opening handshake, under one deadline (the request
/// has its own 408 at the same moment; this one also bounds the TLS
/// handshake, the plugin's upgrade and the 101).
async fn upgrade<S, T>(
    transport: T,
    peer: SocketAddr,
    tls: bool,
    id: u64,
    shared: Arc<Shared>,
    mut handshake: Handshake,
) -> Option<Opened<S>>
where
    S: Transport,
    T: Future<Output = Option<S>> + Send,
{
    let accepted = upgrade::Accepted {
        peer,
        tls,
        id,
        deadline: handshake.deadline,
        address: handshake.address.take(),
    };
    let open = async {
        let transport = transport.await?;
        let socket = transport.socket();
        let (mut reader, mut writer, direct) = transport.split();
        let opened = upgrade::open(&mut reader, &mut writer, accepted, &shared).await?;
        Some((opened, reader, writer, direct, socket))
    };
    tokio::select! {
        biased;
        opened = open => opened,
        _ = shared.shutdown.cancelled() => None,
        _ = handshake.evicted.cancelled() => None,
        _ = tokio::time::sleep_until(handshake.deadline) => {
            tracing::debug!(id, %peer, "opening handshake timed out");
            shared.metrics.handshake_failed(0, "timeout");
            None
        }
    }
}
