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
mod upgrade;

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncWrite};

use super::Shared;
use super::pending::Handshake;

pub(crate) async fn run<S>(
    stream: S,
    peer: SocketAddr,
    tls: bool,
    id: u64,
    shared: Arc<Shared>,
    mut handshake: Handshake,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let (mut reader, mut writer) = tokio::io::split(stream);
    let accepted = upgrade::Accepted {
        peer,
        tls,
        id,
        deadline: handshake.deadline,
        address: handshake.address.take(),
    };
    // The upgrade's futures (request parsing, instantiation, on-upgrade) are
    // large and finished with once the connection is open: boxed, an open
    // connection's task does not carry their space for its whole life.
    let open = Box::pin(upgrade::open(&mut reader, &mut writer, accepted, &shared));
    // One deadline for all of it (the request has its own 408 at the same
    // moment; this one also bounds the plugin's upgrade and the 101).
    let opened = tokio::select! {
        biased;
        opened = open => opened,
        _ = shared.shutdown.cancelled() => None,
        _ = handshake.evicted.cancelled() => None,
        _ = tokio::time::sleep_until(handshake.deadline) => {
            shared.metrics.handshake_failed(0, "timeout");
            None
        }
    };
    drop(handshake);
    let Some(opened) = opened else {
        return;
    };
    let (mut conn, buf, permits) = opened.into_parts();
    conn.drive(&mut reader, &mut writer, buf, tls).await;
    drop(permits);
}
