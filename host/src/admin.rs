//! The admin HTTP endpoint: `GET /metrics` and `GET /healthz`.
//!
//! A deliberately tiny HTTP/1.1 server: one request per connection, answered
//! with `Connection: close`. The request head is parsed with [`httparse`],
//! capped at [`MAX_HEAD_BYTES`] and must arrive within [`READ_TIMEOUT`];
//! request bodies are ignored. It is meant to be bound to a private address
//! and scraped by Prometheus, not exposed to the internet, but it still
//! bounds the memory, time and concurrency a misbehaving client can take.
//!
//! | request | response |
//! |---|---|
//! | `GET /metrics` | 200, OpenMetrics text |
//! | `GET /healthz` | 200, `ok\n` |
//! | other method on those paths | 405 (with `Allow: GET`) |
//! | any other path | 404 |
//! | unparsable head | 400 |
//! | head over 8 KiB or over 64 headers | 431 |
//! | head not complete within 5 s | 408 |
//!
//! A query string is ignored (`/metrics?x=1` is `/metrics`).

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::metrics::Metrics;

/// Time allowed for the whole request head to arrive.
pub const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest accepted request head (request line and headers).
pub const MAX_HEAD_BYTES: usize = 8 * 1024;
/// Most headers accepted in a request.
const MAX_HEADERS: usize = 64;
/// Time allowed for writing the response.
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// After responding, how long (and how much) to read and discard what the
/// client still sends, so closing does not reset the connection before the
/// client has read the response.
const LINGER_TIMEOUT: Duration = Duration::from_secs(1);
const LINGER_BYTES: usize = 64 * 1024;
/// Connections served at once; more are closed immediately.
const MAX_CONNECTIONS: usize = 64;
/// Pause after a failed `accept` (e.g. out of file descriptors).
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// The `Content-Type` of `/metrics`.
pub const OPENMETRICS_CONTENT_TYPE: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";
const TEXT_CONTENT_TYPE: &str = "text/plain; charset=utf-8";

/// Serve the admin endpoint on `listener` until `shutdown` is cancelled.
///
/// On cancellation it stops accepting, aborts in-flight requests, waits for
/// their tasks to finish and returns (dropping the listener). Never panics;
/// I/O errors are logged and only affect the connection they occurred on.
pub async fn serve(listener: TcpListener, metrics: Arc<Metrics>, shutdown: CancellationToken) {
    serve_with(listener, metrics, shutdown, READ_TIMEOUT).await;
}

async fn serve_with(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
    read_timeout: Duration,
) {
    match listener.local_addr() {
        Ok(addr) => tracing::info!(%addr, "admin endpoint listening"),
        Err(error) => tracing::info!(%error, "admin endpoint listening (address unknown)"),
    }
    let tasks = TaskTracker::new();
    let permits = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let accepted = tokio::select! {
            biased;
            () = shutdown.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(error) => {
                tracing::warn!(%error, "admin endpoint: accept failed");
                tokio::select! {
                    () = shutdown.cancelled() => break,
                    () = tokio::time::sleep(ACCEPT_BACKOFF) => continue,
                }
            }
        };
        let Ok(permit) = Arc::clone(&permits).try_acquire_owned() else {
            tracing::warn!(%peer, "admin endpoint: too many connections, closing");
            continue;
        };
        let metrics = Arc::clone(&metrics);
        let shutdown = shutdown.clone();
        tasks.spawn(async move {
            let _permit = permit;
            tokio::select! {
                () = shutdown.cancelled() => {
                    tracing::debug!(%peer, "admin endpoint: connection aborted by shutdown");
                }
                () = handle(stream, peer, &metrics, read_timeout) => {}
            }
        });
    }
    tasks.close();
    tasks.wait().await;
    tracing::info!("admin endpoint stopped");
}

/// What reading the request head produced.
#[derive(Debug)]
enum Head {
    Request {
        method: String,
        target: String,
    },
    /// The client closed without sending anything.
    Closed,
    /// Over [`MAX_HEAD_BYTES`] or [`MAX_HEADERS`].
    TooLarge,
    /// Not HTTP, or the client closed mid-head.
    Malformed,
}

async fn read_head(stream: &mut TcpStream) -> io::Result<Head> {
    let mut buf = vec![0u8; MAX_HEAD_BYTES];
    let mut len = 0;
    loop {
        if len == buf.len() {
            return Ok(Head::TooLarge);
        }
        let n = stream.read(&mut buf[len..]).await?;
        if n == 0 {
            return Ok(if len == 0 {
                Head::Closed
            } else {
                Head::Malformed
            });
        }
        len += n;
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut request = httparse::Request::new(&mut headers);
        match request.parse(&buf[..len]) {
            Ok(httparse::Status::Complete(_)) => {
                return Ok(match (request.method, request.path) {
                    (Some(method), Some(target)) => Head::Request {
                        method: method.to_owned(),
                        target: target.to_owned(),
                    },
                    _ => Head::Malformed,
                });
            }
            Ok(httparse::Status::Partial) => {}
            Err(httparse::Error::TooManyHeaders) => return Ok(Head::TooLarge),
            Err(_) => return Ok(Head::Malformed),
        }
    }
}

#[derive(Debug)]
struct Response {
    status: u16,
    content_type: &'static str,
    allow: Option<&'static str>,
    body: String,
}

impl Response {
    fn text(status: u16, body: impl Into<String>) -> Self {
        Self {
            status,
            content_type: TEXT_CONTENT_TYPE,
            allow: None,
            body: body.into(),
        }
    }

    fn to_bytes(&self) -> Vec<u8> {
        let mut head = format!(
            "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nCache-Control: no-store\r\nConnection: close\r\n",
            self.status,
            reason_phrase(self.status),
            self.content_type,
            self.body.len(),
        );
        if let Some(allow) = self.allow {
            head.push_str("Allow: ");
            head.push_str(allow);
            head.push_str("\r\n");
        }
        head.push_str("\r\n");
        let mut bytes = head.into_bytes();
        bytes.extend_from_slice(self.body.as_bytes());
        bytes
    }
}

fn reason_phrase(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        431 => "Request Header Fields Too Large",
        _ => "",
    }
}

fn route(method: &str, target: &str, metrics: &Metrics) -> Response {
    let path = target.split_once('?').map_or(target, |(path, _query)| path);
    match path {
        "/metrics" | "/healthz" if method != "GET" => Response {
            allow: Some("GET"),
            ..Response::text(405, "method not allowed\n")
        },
        "/metrics" => Response {
            content_type: OPENMETRICS_CONTENT_TYPE,
            ..Response::text(200, metrics.render())
        },
        "/healthz" => Response::text(200, "ok\n"),
        _ => Response::text(404, "not found\n"),
    }
}

async fn handle(
    mut stream: TcpStream,
    peer: SocketAddr,
    metrics: &Metrics,
    read_timeout: Duration,
) {
    let response = match tokio::time::timeout(read_timeout, read_head(&mut stream)).await {
        Err(_elapsed) => {
            tracing::debug!(%peer, "admin endpoint: request head timed out");
            Response::text(408, "request timeout\n")
        }
        Ok(Err(error)) => {
            tracing::debug!(%peer, %error, "admin endpoint: read failed");
            return;
        }
        Ok(Ok(Head::Closed)) => return,
        Ok(Ok(Head::TooLarge)) => {
            tracing::debug!(%peer, "admin endpoint: request head too large");
            Response::text(431, "request header fields too large\n")
        }
        Ok(Ok(Head::Malformed)) => {
            tracing::debug!(%peer, "admin endpoint: malformed request");
            Response::text(400, "bad request\n")
        }
        Ok(Ok(Head::Request { method, target })) => {
            let response = route(&method, &target, metrics);
            tracing::debug!(%peer, %method, %target, status = response.status, "admin endpoint: request");
            response
        }
    };

    let bytes = response.to_bytes();
    let write = async {
        stream.write_all(&bytes).await?;
        stream.shutdown().await
    };
    match tokio::time::timeout(WRITE_TIMEOUT, write).await {
        Ok(Ok(())) => {}
        Ok(Err(error)) => {
            tracing::debug!(%peer, %error, "admin endpoint: write failed");
            return;
        }
        Err(_elapsed) => {
            tracing::debug!(%peer, "admin endpoint: write timed out");
            return;
        }
    }

    // Lingering close: drain (bounded) whatever the client still sends, e.g.
    // an ignored request body, so the kernel does not answer it with a RST
    // that could destroy the response before the client reads it.
    let drain = async {
        let mut scratch = [0u8; 4096];
        let mut drained = 0;
        while drained < LINGER_BYTES {
            match stream.read(&mut scratch).await {
                Ok(0) | Err(_) => break,
                Ok(n) => drained += n,
            }
        }
    };
    let _ = tokio::time::timeout(LINGER_TIMEOUT, drain).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    use tokio::task::JoinHandle;

    struct Server {
        addr: SocketAddr,
        metrics: Arc<Metrics>,
        shutdown: CancellationToken,
        task: JoinHandle<()>,
    }

    async fn start(read_timeout: Duration) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("local addr");
        let metrics = Metrics::new();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(serve_with(
            listener,
            Arc::clone(&metrics),
            shutdown.clone(),
            read_timeout,
        ));
        Server {
            addr,
            metrics,
            shutdown,
            task,
        }
    }

    impl Server {
        async fn stop(self) {
            self.shutdown.cancel();
            tokio::time::timeout(Duration::from_secs(5), self.task)
                .await
                .expect("serve returns after shutdown")
                .expect("serve does not panic");
        }
    }

    struct Reply {
        status: u16,
        headers: Vec<(String, String)>,
        body: String,
    }

    impl Reply {
        fn header(&self, name: &str) -> Option<&str> {
            self.headers
                .iter()
                .find(|(n, _)| n.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.as_str())
        }
    }

    /// Send `raw` (then half-close if `finish`), read until EOF, parse.
    async fn exchange(addr: SocketAddr, raw: &[u8], finish: bool) -> Reply {
        let mut stream = TcpStream::connect(addr).await.expect("connect");
        stream.write_all(raw).await.expect("write request");
        if finish {
            stream.shutdown().await.expect("half-close");
        }
        let mut out = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut out))
            .await
            .expect("response within 10 s")
            .expect("read response");
        parse_reply(&out)
    }

    fn parse_reply(raw: &[u8]) -> Reply {
        let mut headers = [httparse::EMPTY_HEADER; 16];
        let mut response = httparse::Response::new(&mut headers);
        let httparse::Status::Complete(head_len) =
            response.parse(raw).expect("well-formed response")
        else {
            panic!("incomplete response: {:?}", String::from_utf8_lossy(raw));
        };
        let headers: Vec<(String, String)> = response
            .headers
            .iter()
            .map(|h| {
                (
                    h.name.to_owned(),
                    String::from_utf8(h.value.to_vec()).expect("utf-8 header"),
                )
            })
            .collect();
        let body = String::from_utf8(raw[head_len..].to_vec()).expect("utf-8 body");
        let reply = Reply {
            status: response.code.expect("status"),
            headers,
            body,
        };
        assert_eq!(response.version, Some(1));
        assert_eq!(reply.header("connection"), Some("close"));
        let length: usize = reply
            .header("content-length")
            .expect("content-length")
            .parse()
            .expect("numeric content-length");
        assert_eq!(length, reply.body.len());
        reply
    }

    async fn get(addr: SocketAddr, target: &str) -> Reply {
        let request = format!("GET {target} HTTP/1.1\r\nHost: localhost\r\n\r\n");
        exchange(addr, request.as_bytes(), false).await
    }

    #[tokio::test]
    async fn metrics_endpoint() {
        let server = start(READ_TIMEOUT).await;
        server.metrics.connection_accepted(true);
        server.metrics.connection_opened();
        server.metrics.handshake_failed(400, "invalid-request");

        let reply = get(server.addr, "/metrics").await;
        assert_eq!(reply.status, 200);
        assert_eq!(reply.header("content-type"), Some(OPENMETRICS_CONTENT_TYPE));
        let lines: Vec<&str> = reply.body.lines().collect();
        assert!(lines.contains(&r#"wharf_connections_accepted_total{transport="wss"} 1"#));
        assert!(lines.contains(&"wharf_connections_open 1"));
        assert!(lines.contains(
            &r#"wharf_handshake_failures_total{status="400",reason="invalid-request"} 1"#
        ));
        assert!(reply.body.ends_with("# EOF\n"), "{}", reply.body);

        // A query string is ignored; HTTP/1.0 is answered too.
        let reply = exchange(
            server.addr,
            b"GET /metrics?name[]=x HTTP/1.0\r\n\r\n",
            false,
        )
        .await;
        assert_eq!(reply.status, 200);
        server.stop().await;
    }

    #[tokio::test]
    async fn healthz() {
        let server = start(READ_TIMEOUT).await;
        let reply = get(server.addr, "/healthz").await;
        assert_eq!(reply.status, 200);
        assert_eq!(reply.body, "ok\n");
        assert_eq!(reply.header("content-type"), Some(TEXT_CONTENT_TYPE));
        server.stop().await;
    }

    #[tokio::test]
    async fn unknown_path_is_404() {
        let server = start(READ_TIMEOUT).await;
        for target in ["/", "/metricsx", "/healthz/", "*", "/nope?metrics"] {
            let reply = get(server.addr, target).await;
            assert_eq!(reply.status, 404, "{target}");
        }
        let reply = exchange(server.addr, b"DELETE /elsewhere HTTP/1.1\r\n\r\n", false).await;
        assert_eq!(reply.status, 404);
        server.stop().await;
    }

    #[tokio::test]
    async fn other_methods_are_405() {
        let server = start(READ_TIMEOUT).await;
        for request in [
            &b"POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello"[..],
            b"PUT /healthz HTTP/1.1\r\n\r\n",
            b"HEAD /metrics HTTP/1.1\r\n\r\n",
            b"get /healthz HTTP/1.1\r\n\r\n",
        ] {
            let reply = exchange(server.addr, request, false).await;
            assert_eq!(reply.status, 405, "{}", String::from_utf8_lossy(request));
            assert_eq!(reply.header("allow"), Some("GET"));
        }
        server.stop().await;
    }

    #[tokio::test]
    async fn malformed_is_400() {
        let server = start(READ_TIMEOUT).await;
        for (request, finish) in [
            (&b"NOT A REQUEST\r\n\r\n"[..], false),
            (b"\x00\x01\x02\x03\r\n\r\n", false),
            (b"GET /metrics HTTP/9.9\r\n\r\n", false),
            (b"GET /metrics HTTP/1.1\r\nBad Header\r\n\r\n", false),
            // Client gives up mid-head.
            (b"GET /metrics HTTP/1.1\r\nHost: x\r\n", true),
        ] {
            let reply = exchange(server.addr, request, finish).await;
            assert_eq!(reply.status, 400, "{}", String::from_utf8_lossy(request));
        }
        server.stop().await;
    }

    #[tokio::test]
    async fn oversized_head_is_431() {
        let server = start(READ_TIMEOUT).await;
        let mut request = b"GET /metrics HTTP/1.1\r\nX-Filler: ".to_vec();
        request.resize(MAX_HEAD_BYTES + 1000, b'a');
        let reply = exchange(server.addr, &request, false).await;
        assert_eq!(reply.status, 431);

        let mut request = b"GET /metrics HTTP/1.1\r\n".to_vec();
        for i in 0..=MAX_HEADERS {
            request.extend_from_slice(format!("X-{i}: y\r\n").as_bytes());
        }
        request.extend_from_slice(b"\r\n");
        assert!(request.len() < MAX_HEAD_BYTES);
        let reply = exchange(server.addr, &request, false).await;
        assert_eq!(reply.status, 431);
        server.stop().await;
    }

    #[tokio::test]
    async fn slow_client_times_out_with_408() {
        let server = start(Duration::from_millis(200)).await;
        let reply = exchange(server.addr, b"GET /metr", false).await;
        assert_eq!(reply.status, 408);
        // The server still works afterwards.
        assert_eq!(get(server.addr, "/healthz").await.status, 200);
        server.stop().await;
    }

    #[tokio::test]
    async fn silent_close_gets_no_response() {
        let server = start(READ_TIMEOUT).await;
        let mut stream = TcpStream::connect(server.addr).await.expect("connect");
        stream.shutdown().await.expect("half-close");
        let mut out = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut out))
            .await
            .expect("server closes")
            .expect("read");
        assert!(out.is_empty());
        server.stop().await;
    }

    #[tokio::test]
    async fn shutdown_returns_with_idle_connection_open() {
        let server = start(READ_TIMEOUT).await;
        let addr = server.addr;
        let mut idle = TcpStream::connect(addr).await.expect("connect");
        // Make sure the idle connection has been accepted before shutting down.
        assert_eq!(get(addr, "/healthz").await.status, 200);
        server.stop().await;
        let mut out = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(5), idle.read_to_end(&mut out))
            .await
            .expect("idle connection closed by shutdown");
        assert!(read.is_err() || out.is_empty());
        assert!(TcpStream::connect(addr).await.is_err(), "listener closed");
    }
}
