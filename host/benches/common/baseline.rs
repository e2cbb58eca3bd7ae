//! The native echo servers the benches compare wharf against, each written
//! the way its library teaches, run as the bench's own binary re-executed
//! with `--serve-baseline [NAME] [--cert PEM --key PEM]` (wss only with a
//! certificate). It prints `listening on ws://ADDR` (and `wss://ADDR`)
//! like `wharf serve`.
//!
//! - `tokio-tungstenite` (the default NAME): its own
//!   `examples/echo-server.rs`, `read.try_filter(text or binary)
//!   .forward(write)`: `forward` feeds the sink every message that is
//!   already decodable and flushes once when the stream has no more, so a
//!   batch of pipelined messages goes out in one write. (The explicit loop,
//!   `next().await`, then `now_or_never()` while decodable, `feed` each,
//!   `flush` once, makes the same syscalls but cost ~870 more instructions
//!   per echo under callgrind: one more poll of the stream per batch.)
//!   `read_buffer_size` is 16 KiB instead of the 128 KiB default:
//!   tungstenite zeroes that much before every read (`FrameCodec::read_in`),
//!   which at 128 KiB cost ~10,000 instructions per small echo (15,700
//!   against 5,900); 4 KiB saved ~700 more but made 64 KiB messages slower
//!   (four times the reads).
//! - `fastwebsockets`: hyper's HTTP/1 upgrade and `fastwebsockets::upgrade`,
//!   as in its `examples/echo_server.rs` (and `tls_server.rs`, which turns
//!   vectored writes off); `read_frame`, `write_frame` and, as its docs ask
//!   for buffered streams such as TLS, `flush` (free on plain TCP). It
//!   writes each frame as it is given, and `read_frame` cannot tell whether
//!   another frame is already buffered, so nothing can feed several and
//!   flush once: one write per echo, which the pipelined scenarios show.
//!
//! Both use a current-thread tokio runtime (fastwebsockets' examples do
//! too): on the one core the benches pin a server to, it cost fewer
//! instructions per echo than a one-worker multi-thread runtime (what wharf
//! runs, `TOKIO_WORKER_THREADS=1`): per 32 B echo, tokio-tungstenite 5,900
//! against 6,600 instructions and fastwebsockets 3,400 against 4,100. In
//! the echo bench (same run, `--quick --rounds 3`) their CPU time per echo
//! was lower or equal in every scenario but fastwebsockets' `large-tls`
//! (44.7 against 40.6 µs), and tokio-tungstenite's rates were higher.
//!
//! The limits are wharf's defaults (`[websocket]`: 16 MiB messages, 16 MiB
//! frames; fastwebsockets has a message limit only, checked per frame).

use std::sync::Arc;

use anyhow::{Context, Result, bail};
use futures_util::{StreamExt, TryStreamExt};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

/// Wharf's default `websocket.max_message_size` and `max_frame_size`.
const MAX_MESSAGE: usize = 16 << 20;
const MAX_FRAME: usize = 16 << 20;
/// tokio-tungstenite's read buffer (see above).
const READ_BUFFER: usize = 16 << 10;

#[derive(Clone, Copy)]
enum Server {
    TokioTungstenite,
    Fastwebsockets,
}

pub fn main(args: &[String]) -> Result<()> {
    let arg = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
    };
    let server = match arg("--serve-baseline").map(String::as_str) {
        None | Some("tokio-tungstenite") => Server::TokioTungstenite,
        Some(a) if a.starts_with("--") => Server::TokioTungstenite,
        Some("fastwebsockets") => Server::Fastwebsockets,
        Some(other) => bail!(
            "unknown baseline {other:?}; known: tokio-tungstenite (the default), fastwebsockets"
        ),
    };
    let acceptor = match (arg("--cert"), arg("--key")) {
        (Some(cert), Some(key)) => Some(acceptor(cert, key)?),
        (None, None) => None,
        _ => bail!("--serve-baseline needs both --cert PATH and --key PATH, or neither"),
    };
    runtime()?.block_on(async {
        // Returning from main on SIGTERM, not dying of it, lets a build with
        // `-Cprofile-generate` write its profile.
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            served = serve(server, acceptor) => served,
            _ = term.recv() => Ok(()),
        }
    })
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}

fn acceptor(cert: &str, key: &str) -> Result<tokio_rustls::TlsAcceptor> {
    let certs = CertificateDer::pem_file_iter(cert)
        .context("read cert")?
        .collect::<Result<Vec<_>, _>>()
        .context("parse cert")?;
    let key = PrivateKeyDer::from_pem_file(key).context("read key")?;
    let mut tls = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_no_client_auth()
    .with_single_cert(certs, key)?;
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(tls)))
}

async fn serve(server: Server, acceptor: Option<tokio_rustls::TlsAcceptor>) -> Result<()> {
    let ws = TcpListener::bind("127.0.0.1:0").await?;
    println!("listening on ws://{}", ws.local_addr()?);
    if let Some(acceptor) = acceptor {
        let wss = TcpListener::bind("127.0.0.1:0").await?;
        println!("listening on wss://{}", wss.local_addr()?);
        tokio::spawn(async move {
            loop {
                let Ok((s, _)) = wss.accept().await else {
                    continue;
                };
                let _ = s.set_nodelay(true);
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    if let Ok(s) = acceptor.accept(s).await {
                        connection(server, s, true).await;
                    }
                });
            }
        });
    }
    loop {
        let Ok((s, _)) = ws.accept().await else {
            continue;
        };
        let _ = s.set_nodelay(true);
        tokio::spawn(connection(server, s, false));
    }
}

async fn connection<S>(server: Server, s: S, tls: bool)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    match server {
        Server::TokioTungstenite => tungstenite::echo(s).await,
        Server::Fastwebsockets => fastws::serve(s, tls).await,
    }
}

mod tungstenite {
    use super::*;

    /// Echoes text as text and binary as binary, one flush per batch;
    /// tungstenite answers pings and the closing handshake itself.
    pub(super) async fn echo<S: AsyncRead + AsyncWrite + Unpin>(s: S) {
        let config = WebSocketConfig::default()
            .max_message_size(Some(MAX_MESSAGE))
            .max_frame_size(Some(MAX_FRAME))
            .read_buffer_size(READ_BUFFER);
        let Ok(ws) = tokio_tungstenite::accept_async_with_config(s, Some(config)).await else {
            return;
        };
        let (write, read) = ws.split();
        let _ = read
            .try_filter(|msg| std::future::ready(msg.is_text() || msg.is_binary()))
            .forward(write)
            .await;
    }
}

mod fastws {
    use super::*;
    use fastwebsockets::{Frame, OpCode, WebSocketError, upgrade};
    use http_body_util::Empty;
    use hyper::body::{Bytes, Incoming};
    use hyper::server::conn::http1;
    use hyper::service::service_fn;
    use hyper::{Request, Response};
    use hyper_util::rt::TokioIo;

    /// One HTTP/1 connection: hyper answers the upgrade request, the
    /// WebSocket runs in a task of its own (as in fastwebsockets' examples).
    pub(super) async fn serve<S>(s: S, tls: bool)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let service = service_fn(move |mut req: Request<Incoming>| async move {
            let (response, fut) = upgrade::upgrade(&mut req)?;
            tokio::spawn(tokio::task::unconstrained(echo(fut, tls)));
            Ok::<Response<Empty<Bytes>>, WebSocketError>(response)
        });
        let _ = http1::Builder::new()
            .serve_connection(TokioIo::new(s), service)
            .with_upgrades()
            .await;
    }

    /// Echoes text as text and binary as binary; fastwebsockets answers
    /// pings and the closing handshake itself.
    async fn echo(fut: upgrade::UpgradeFut, tls: bool) -> Result<(), WebSocketError> {
        let mut ws = fut.await?;
        ws.set_auto_close(true);
        ws.set_auto_pong(true);
        ws.set_max_message_size(MAX_MESSAGE);
        if tls {
            // As fastwebsockets' examples/tls_server.rs.
            ws.set_writev(false);
        }
        loop {
            let frame = ws.read_frame().await?;
            match frame.opcode {
                OpCode::Close => break,
                OpCode::Text | OpCode::Binary | OpCode::Continuation => {
                    // Unmasked, as a server's frames must be (its README's
                    // echo); a fragmented message goes back frame by frame.
                    let frame = Frame::new(frame.fin, frame.opcode, None, frame.payload);
                    ws.write_frame(frame).await?;
                    ws.flush().await?;
                }
                OpCode::Ping | OpCode::Pong => {}
            }
        }
        Ok(())
    }
}
