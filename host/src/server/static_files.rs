//! Plain HTTP `GET`/`HEAD` requests that are not WebSocket upgrades, answered
//! from a directory (`[static_files] dir`): the page that opens the
//! WebSocket (a chat client, say) comes from the same origin as the socket.
//!
//! Deliberately small: whole files up to `max_file_size`, one request per
//! connection (`Connection: close`), no ranges, no directory listings, no
//! symlinks out of the directory. Anything richer belongs in a real web
//! server in front of Wharf.

use std::path::{Component, Path, PathBuf};

use crate::config::StaticFilesConfig;

/// The resolved `[static_files]` settings.
#[derive(Debug, Clone)]
pub struct StaticFiles {
    /// Canonical directory: every served file's canonical path starts with it.
    root: PathBuf,
    index: String,
    max_file_size: u64,
}

/// A response to write before closing the connection.
pub struct Response {
    pub status: u16,
    pub bytes: Vec<u8>,
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
        let meta = match tokio::fs::metadata(&path).await {
            Ok(m) if m.is_file() => m,
            _ => return text_response(404, "not found\n", head_only),
        };
        if meta.len() > self.max_file_size {
            tracing::warn!(path = %path.display(), size = meta.len(), "static file over static_files.max_file_size");
            return text_response(403, "file too large to serve\n", head_only);
        }
        let body = match tokio::fs::read(&path).await {
            Ok(b) if b.len() as u64 <= self.max_file_size => b,
            Ok(_) => return text_response(403, "file too large to serve\n", head_only),
            Err(err) => {
                tracing::warn!(path = %path.display(), %err, "cannot read static file");
                return text_response(404, "not found\n", head_only);
            }
        };
        response(200, content_type(&path), &body, head_only)
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
    let reason = match status {
        200 => "OK",
        403 => "Forbidden",
        _ => "Not Found",
    };
    let mut bytes = format!(
        "HTTP/1.1 {status} {reason}\r\n\
         Content-Type: {content_type}\r\n\
         Content-Length: {}\r\n\
         Cache-Control: no-cache\r\n\
         X-Content-Type-Options: nosniff\r\n\
         Connection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    if !head_only {
        bytes.extend_from_slice(body);
    }
    Response { status, bytes }
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
        (r.status, String::from_utf8_lossy(&r.bytes).into_owned())
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
}
