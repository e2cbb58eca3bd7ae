//! Plain HTTP `GET`/`HEAD` requests that are not WebSocket upgrades, answered
//! from a directory (`[static_files] dir`): the page that opens the
//! WebSocket (a chat client, say) comes from the same origin as the socket.
//!
//! Deliberately small: whole files up to `max_file_size`, one request per
//! connection (`Connection: close`), no ranges, no directory listings, no
//! symlinks out of the directory. Anything richer belongs in a real web
//! server in front of Wharf.
//!
//! Bounded like the rest of the edge: at most `max_concurrent` files are
//! being sent at once (503 beyond), each is streamed from its open file
//! rather than read into memory, the whole exchange is under the
//! connection's handshake deadline, and the file checked is the file
//! sent (opened once, not following a symlink, then checked by its handle).

use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::config::StaticFilesConfig;

/// The resolved `[static_files]` settings.
#[derive(Debug, Clone)]
pub struct StaticFiles {
    /// Canonical directory: every served file's canonical path starts with it.
    root: PathBuf,
    index: String,
    max_file_size: u64,
    /// Places for files being sent.
    sending: Arc<Semaphore>,
}

/// A response to write before closing the connection: its head (and, for
/// a small answer, its body), then the file's bytes if it has one.
pub struct Response {
    pub status: u16,
    pub bytes: Vec<u8>,
    body: Option<Body>,
}

/// A file being sent, with its place among those in flight.
struct Body {
    file: tokio::fs::File,
    len: u64,
    _place: OwnedSemaphorePermit,
}

impl Response {
    /// Writes the response; the file (if any) is streamed, never held whole.
    pub async fn write_to<W: AsyncWrite + Unpin>(self, writer: &mut W) -> std::io::Result<()> {
        writer.write_all(&self.bytes).await?;
        if let Some(body) = self.body {
            let copied = tokio::io::copy(&mut body.file.take(body.len), writer).await?;
            if copied != body.len {
                // Shrunk while being sent: the promised length cannot be met.
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
        }
        writer.flush().await
    }
}

impl StaticFiles {
    /// `None` when no directory is configured.
    pub fn new(config: &StaticFilesConfig) -> anyhow::Result<Option<Self>> {
        let Some(dir) = &config.dir else {
            return Ok(None);
        };
        let root = dir
            .canonicalize()
            .map_err(|err| anyhow::anyhow!("static_files.dir {}: {err}", dir.display()))?;
        anyhow::ensure!(
            root.is_dir(),
            "static_files.dir {} is not a directory",
            dir.display()
        );
        Ok(Some(Self {
            root,
            index: config.index.clone(),
            max_file_size: config.max_file_size.as_u64(),
            sending: Arc::new(Semaphore::new(config.max_concurrent.max(1))),
        }))
    }

    /// Answers a complete request head found in `head`, or `None` if it is
    /// not a `GET`/`HEAD` this module serves (the caller then gives the
    /// upgrade error it would have given anyway).
    pub async fn respond(&self, head: &[u8]) -> Option<Response> {
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut request = httparse::Request::new(&mut headers);
        if !matches!(request.parse(head), Ok(httparse::Status::Complete(_))) {
            return None;
        }
        let head_only = match request.method? {
            "GET" => false,
            "HEAD" => true,
            _ => return None,
        };
        let target = request.path?;
        let path = target.split(['?', '#']).next().unwrap_or_default();
        let Some(relative) = self.relative_path(path) else {
            return Some(text_response(404, "not found\n", head_only));
        };
        Some(self.file(&relative, head_only).await)
    }

    /// The request path as a path under the root: percent-decoded, and only
    /// plain names (no `..`, no hidden files, no empty segments in between).
    fn relative_path(&self, path: &str) -> Option<PathBuf> {
        let decoded = percent_decode(path.strip_prefix('/')?)?;
        let mut relative = PathBuf::new();
        for segment in decoded.split('/') {
            if segment.is_empty() {
                continue;
            }
            if segment.starts_with('.') || segment.contains(['\\', '\0']) {
                return None;
            }
            match Path::new(segment).components().next() {
                Some(Component::Normal(_)) => relative.push(segment),
                _ => return None,
            }
        }
        Some(relative)
    }

    async fn file(&self, relative: &Path, head_only: bool) -> Response {
        let mut path = self.root.join(relative);
        if tokio::fs::metadata(&path).await.is_ok_and(|m| m.is_dir()) {
            path.push(&self.index);
        }
        // Canonicalising resolves symlinks: whatever the name, the file must
        // live under the root.
        let path = match tokio::fs::canonicalize(&path).await {
            Ok(p) if p.starts_with(&self.root) => p,
            _ => return text_response(404, "not found\n", head_only),
        };
        let Ok(place) = self.sending.clone().try_acquire_owned() else {
            return text_response(503, "busy, try again later\n", head_only);
        };
        // Opened once, without following a symlink put there since; what
        // is checked and sent is this handle's file.
        let mut options = tokio::fs::OpenOptions::new();
        options.read(true);
        #[cfg(unix)]
        options.custom_flags(libc::O_NOFOLLOW);
        let file = match options.open(&path).await {
            Ok(f) => f,
            Err(_) => return text_response(404, "not found\n", head_only),
        };
        let meta = match file.metadata().await {
            Ok(m) if m.is_file() => m,
            _ => return text_response(404, "not found\n", head_only),
        };
        if meta.len() > self.max_file_size {
            tracing::warn!(path = %path.display(), size = meta.len(), "static file over static_files.max_file_size");
            return text_response(403, "file too large to serve\n", head_only);
        }
        let mut response = head(200, content_type(&path), meta.len());
        if !head_only {
            response.body = Some(Body {
                file,
                len: meta.len(),
                _place: place,
            });
        }
        response
    }
}

fn text_response(status: u16, body: &str, head_only: bool) -> Response {
    response(
        status,
        "text/plain; charset=utf-8",
        body.as_bytes(),
        head_only,
    )
}

fn response(status: u16, content_type: &str, body: &[u8], head_only: bool) -> Response {
    let mut response = head(status, content_type, body.len() as u64);
    if !head_only {
        response.bytes.extend_from_slice(body);
    }
    response
}

/// A response's head, for a body of `len` bytes.
fn head(status: u16, content_type: &str, len: u64) -> Response {
    let reason = match status {
        200 => "OK",
        403 => "Forbidden",
        503 => "Service Unavailable",
        _ => "Not Found",
    };
    let bytes = format!(
        "HTTP/1.1 {status} {reason}\r\n\
         Content-Type: {content_type}\r\n\
         Content-Length: {len}\r\n\
         Cache-Control: no-cache\r\n\
         X-Content-Type-Options: nosniff\r\n\
         Connection: close\r\n\r\n"
    )
    .into_bytes();
    Response {
        status,
        bytes,
        body: None,
    }
}

fn content_type(path: &Path) -> &'static str {
    match path.extension().and_then(|e| e.to_str()) {
        Some("html" | "htm") => "text/html; charset=utf-8",
        Some("js" | "mjs") => "text/javascript; charset=utf-8",
        Some("css") => "text/css; charset=utf-8",
        Some("json") => "application/json",
        Some("txt") => "text/plain; charset=utf-8",
        Some("svg") => "image/svg+xml",
        Some("png") => "image/png",
        Some("jpg" | "jpeg") => "image/jpeg",
        Some("ico") => "image/x-icon",
        Some("wasm") => "application/wasm",
        _ => "application/octet-stream",
    }
}

/// `%XX` decoding; `None` for a malformed escape or a result that is not UTF-8.
fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files(dir: &Path) -> StaticFiles {
        StaticFiles::new(&StaticFilesConfig {
            dir: Some(dir.to_owned()),
            ..StaticFilesConfig::default()
        })
        .unwrap()
        .unwrap()
    }

    async fn get(files: &StaticFiles, target: &str) -> (u16, String) {
        let head = format!("GET {target} HTTP/1.1\r\nHost: x\r\n\r\n");
        let r = files.respond(head.as_bytes()).await.unwrap();
        let status = r.status;
        let mut out = Vec::new();
        r.write_to(&mut out).await.unwrap();
        (status, String::from_utf8_lossy(&out).into_owned())
    }

    #[tokio::test]
    async fn serves_files_and_index_and_nothing_outside() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("www");
        std::fs::create_dir_all(root.join("sub")).unwrap();
        std::fs::write(root.join("index.html"), "<p>hi</p>").unwrap();
        std::fs::write(root.join("sub/app.js"), "let x;").unwrap();
        std::fs::write(root.join(".secret"), "no").unwrap();
        std::fs::write(tmp.path().join("outside.txt"), "no").unwrap();
        #[cfg(unix)]
        std::os::unix::fs::symlink(tmp.path().join("outside.txt"), root.join("link.txt")).unwrap();
        let f = files(&root);

        let (status, resp) = get(&f, "/").await;
        assert_eq!(status, 200);
        assert!(resp.contains("Content-Type: text/html; charset=utf-8\r\n"));
        assert!(resp.ends_with("\r\n\r\n<p>hi</p>"));
        let (status, resp) = get(&f, "/sub/app.js?v=1").await;
        assert_eq!(status, 200);
        assert!(resp.contains("text/javascript"));
        for bad in [
            "/../outside.txt",
            "/sub/../../outside.txt",
            "/%2e%2e/outside.txt",
            "/.secret",
            "/link.txt",
            "/missing",
            "/%zz",
            "relative",
        ] {
            assert_eq!(get(&f, bad).await.0, 404, "{bad}");
        }
    }

    #[tokio::test]
    async fn head_has_no_body_and_post_is_not_ours() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::write(tmp.path().join("index.html"), "<p>hi</p>").unwrap();
        let f = files(tmp.path());
        let r = f
            .respond(b"HEAD / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let text = String::from_utf8(r.bytes).unwrap();
        assert!(text.contains("Content-Length: 9\r\n") && text.ends_with("\r\n\r\n"));
        assert!(
            f.respond(b"POST / HTTP/1.1\r\nHost: x\r\n\r\n")
                .await
                .is_none()
        );
    }

    #[tokio::test]
    async fn oversized_file_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::write(tmp.path().join("big.bin"), vec![0u8; 2048]).unwrap();
        let f = StaticFiles::new(&StaticFilesConfig {
            dir: Some(tmp.path().to_owned()),
            max_file_size: bytesize::ByteSize::kib(1),
            ..StaticFilesConfig::default()
        })
        .unwrap()
        .unwrap();
        assert_eq!(get(&f, "/big.bin").await.0, 403);
    }

    #[tokio::test]
    async fn files_in_flight_are_capped() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::write(tmp.path().join("a.txt"), "abc").unwrap();
        let f = StaticFiles::new(&StaticFilesConfig {
            dir: Some(tmp.path().to_owned()),
            max_concurrent: 2,
            ..StaticFilesConfig::default()
        })
        .unwrap()
        .unwrap();
        let request = b"GET /a.txt HTTP/1.1\r\nHost: x\r\n\r\n";
        // Two held (their clients not reading yet), the third refused...
        let first = f.respond(request).await.unwrap();
        let second = f.respond(request).await.unwrap();
        assert_eq!((first.status, second.status), (200, 200));
        assert_eq!(f.respond(request).await.unwrap().status, 503);
        // ...until one is sent.
        let mut out = Vec::new();
        first.write_to(&mut out).await.unwrap();
        assert!(out.ends_with(b"\r\n\r\nabc"));
        assert_eq!(f.respond(request).await.unwrap().status, 200);
    }
}
