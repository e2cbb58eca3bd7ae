//! The baseline every Rust user knows: a native tokio-tungstenite echo
//! server written the way tokio-tungstenite teaches, run by the benches as
//! their own binary re-executed with `--serve-baseline [--cert PEM --key
//! PEM]` (wss only with a certificate). It prints `listening on ws://ADDR`
//! (and `wss://ADDR`) like `wharf serve`.
//!
//! It is tokio-tungstenite's own `examples/echo-server.rs`,
//! `read.try_filter(text or binary).forward(write)`: `forward` feeds the
//! sink every message that is already decodable and flushes once when the
//! stream has no more, so a batch of pipelined messages goes out in one
//! write. (The explicit loop, `next().await`, then `now_or_never()` while
//! decodable, `feed` each, `flush` once, makes the same syscalls but cost
//! ~870 more instructions per echo under callgrind: one more poll of the
//! stream per batch.) `read_buffer_size` is 16 KiB instead of the 128 KiB
//! default: tungstenite zeroes that much before every read
//! (`FrameCodec::read_in`), which at 128 KiB cost ~10,000 instructions per
//! small echo (15,700 against 5,900); 4 KiB saved ~700 more but made 64 KiB
//! messages slower (four times the reads).
//!
//! It uses a current-thread tokio runtime: on the one core the benches pin
//! a server to, it cost fewer instructions per echo than a one-worker
//! multi-thread runtime (what wharf runs, `TOKIO_WORKER_THREADS=1`), 5,900
//! against 6,600 per 32 B echo, and in the echo bench (same run, `--quick
//! --rounds 3`) its CPU time per echo was lower or equal in every scenario
//! and its rates higher.
//!
//! The limits are wharf's defaults (`[websocket]`: 16 MiB messages, 16 MiB
//! frames).

use std::sync::Arc;

use anyhow::{Context, Result};
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

pub fn main(args: &[String]) -> Result<()> {
    let arg = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
    };
    let acceptor = match (arg("--cert"), arg("--key")) {
        (Some(cert), Some(key)) => Some(acceptor(cert, key)?),
        (None, None) => None,
        _ => anyhow::bail!("--serve-baseline needs both --cert PATH and --key PATH, or neither"),
    };
    runtime()?.block_on(serve(acceptor))
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
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_no_client_auth()
    .with_single_cert(certs, key)?;
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(tls)))
}

async fn serve(acceptor: Option<tokio_rustls::TlsAcceptor>) -> Result<()> {
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
                        echo(s).await;
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
        tokio::spawn(echo(s));
    }
}

/// Echoes text as text and binary as binary, one flush per batch;
/// tungstenite answers pings and the closing handshake itself.
async fn echo<S: AsyncRead + AsyncWrite + Unpin>(s: S) {
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
