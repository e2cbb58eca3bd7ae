//! The baseline every Rust user knows: a native tokio-tungstenite echo
//! server, run by the benches as their own binary re-executed with
//! `--serve-baseline [--cert PEM --key PEM]` (wss only with a certificate).
//! It prints `listening on ws://ADDR` (and `wss://ADDR`) like `wharf serve`.

use std::sync::Arc;

use anyhow::{Context, Result};
use futures_util::{SinkExt, StreamExt};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

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
    // Honours TOKIO_WORKER_THREADS, like wharf's runtime.
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(serve(acceptor))
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

/// Echoes text as text and binary as binary; tungstenite answers pings
/// and the closing handshake itself.
async fn echo<S: AsyncRead + AsyncWrite + Unpin>(s: S) {
    let config = WebSocketConfig::default()
        .max_message_size(Some(64 << 20))
        .max_frame_size(Some(16 << 20));
    let Ok(mut ws) = tokio_tungstenite::accept_async_with_config(s, Some(config)).await else {
        return;
    };
    while let Some(Ok(msg)) = ws.next().await {
        match msg {
            Message::Text(_) | Message::Binary(_) => {
                if ws.send(msg).await.is_err() {
                    return;
                }
            }
            Message::Ping(_) | Message::Pong(_) | Message::Close(_) | Message::Frame(_) => {}
        }
    }
}
