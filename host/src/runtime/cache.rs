//! Compiled plugins cached on disk, so a restart (or a large interpreter
//! component) does not pay Cranelift again.
//!
//! A cached artifact is native code the server will run, so nothing in the
//! cache is trusted because of where it is or what it is called: only
//! because the server can prove it wrote it.
//!
//! Layout of the cache directory:
//!
//! ```text
//! <dir>/                          mode 0700 when created here; must be a real
//!                                 directory (not a symlink), owned by the
//!                                 server's effective uid, not group- or
//!                                 world-writable, else the cache is not used
//! <dir>/key                       32 random bytes (from /dev/urandom), mode
//!                                 0600, owned by the euid: the MAC key
//! <dir>/<sha256>-<compat>.cwasm   "WHARFC01" | tag (32 bytes) | artifact
//! <dir>/.tmp-<random>             a write in flight (renamed over the above)
//! ```
//!
//! `<sha256>` is the component's SHA-256 and `<compat>` a hash of the
//! engine's compatibility hash (wasmtime version and every setting that
//! affects code generation, among them the memory reservation, which
//! [`engine::reservation`](super::engine::reservation) rounds so that it
//! does not follow every `memory_limit`, and which `plugin.memory_slots =
//! "wide"` sets to 4 GiB for every limit). The tag is HMAC-SHA256, keyed with `key`, of
//! the magic, the file name, a NUL and the artifact: an artifact cannot be
//! forged without the key, nor moved to another plugin's name.
//!
//! Every file is opened relative to the directory's descriptor (`openat`),
//! with `O_NOFOLLOW`, and checked on the opened descriptor (`fstat`): a
//! regular file owned by the euid, not group- or world-writable (the key:
//! no group or other bits at all). The artifact is read into memory, its tag
//! verified, and those same bytes deserialised. Anything missing, refused or
//! rejected by wasmtime is recompiled and overwritten. Writes go to a fresh
//! `O_CREAT|O_EXCL|O_NOFOLLOW` file, mode 0600, renamed over the final name.
//!
//! Only plugins the runtime accepted are written (a refused component is
//! not cached). The directory is bounded (`plugin.cache_max_size`): each
//! read of an artifact sets its mtime, and after each write the least
//! recently used artifacts are removed until the rest fit (the one just
//! written always stays), with temporary files an hour old (a crash's).
//! `wharf cache` shows the directory and its size, `wharf cache clear`
//! empties it ([`usage`], [`clear`]).

use std::collections::BTreeSet;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use bytesize::ByteSize;
use sha2::{Digest, Sha256};
use wasmtime::Engine;
use wasmtime::component::Component;

/// The default cache directory: `$XDG_CACHE_HOME/wharf` or `~/.cache/wharf`.
pub fn default_dir() -> Option<PathBuf> {
    std::env::var_os("XDG_CACHE_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .map(|d| d.join("wharf"))
}

/// A component's content hash, hex.
pub fn content_hash(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// First bytes of a cache file (format version 1).
const MAGIC: &[u8; 8] = b"WHARFC01";
const TAG_LEN: usize = 32;
const HEADER_LEN: usize = MAGIC.len() + TAG_LEN;
const KEY_LEN: usize = 32;

/// The default cap on a cache directory's compiled plugins
/// (`plugin.cache_max_size`).
pub const DEFAULT_MAX_SIZE: u64 = 1 << 30;

/// Temporary files older than this are left from a write that never
/// finished (a crash): eviction removes them.
const STALE_TEMP: Duration = Duration::from_secs(3600);

/// A cache directory, opened and checked, and the cap on its size.
pub struct PluginCache {
    cache: Cache,
    max_size: u64,
}

impl PluginCache {
    /// Opens (creating it) `dir` to cache compiled plugins, at most
    /// `max_size` bytes of them; `None`, with a warning once per directory
    /// and reason, if it must not be used.
    pub fn open(dir: &Path, max_size: u64) -> Option<PluginCache> {
        match Cache::open(dir) {
            Ok(cache) => Some(PluginCache { cache, max_size }),
            Err(why) => {
                refuse(dir, &why);
                None
            }
        }
    }

    pub fn dir(&self) -> &Path {
        &self.cache.dir_path
    }

    /// The plugin of content hash `hash`, compiled for `engine`, if this
    /// server cached it; a use counts for eviction (its file's mtime).
    pub fn get(&self, engine: &Engine, hash: &str) -> Option<Component> {
        let name = artifact_name(engine, hash)?;
        let path = self.cache.path(&name);
        match self.cache.read_verified(&name) {
            Ok(Some(artifact)) => {
                // SAFETY: `artifact` is exactly the bytes whose HMAC was just
                // verified with this cache's key, which only this server's uid
                // (and root) can read or replace: the directory and the key file
                // were checked, on their open descriptors, to be owned by the
                // euid, the directory not group- or world-writable, the key with
                // no group or other bits. A valid tag for this file name means the
                // server itself wrote them, from `Engine::precompile_component`
                // of this plugin's bytes (the name binds the content hash and the
                // engine's compatibility hash). wasmtime also checks the header
                // and refuses artifacts from a different engine configuration.
                match unsafe { Component::deserialize(engine, &artifact) } {
                    Ok(component) => return Some(component),
                    Err(err) => {
                        tracing::warn!(path = %path.display(), %err, "cached plugin unusable; recompiling")
                    }
                }
            }
            Ok(None) => tracing::debug!(path = %path.display(), "plugin not cached; compiling"),
            Err(err) => {
                tracing::warn!(path = %path.display(), %err, "cached plugin rejected; recompiling")
            }
        }
        None
    }

    /// Caches `artifact`, compiled for `engine` from the plugin of content
    /// hash `hash`, then evicts the least recently used others while the
    /// directory holds more than its cap (the new one stays, even alone
    /// over the cap).
    pub fn put(&self, engine: &Engine, hash: &str, artifact: &[u8]) {
        let Some(name) = artifact_name(engine, hash) else {
            return;
        };
        if let Err(err) = self.cache.write(&name, artifact) {
            let path = self.cache.path(&name);
            tracing::warn!(path = %path.display(), %err, "cannot cache compiled plugin");
            return;
        }
        match self.evict(&name) {
            Ok(evicted) if evicted.files > 0 => tracing::info!(
                dir = %self.dir().display(),
                evicted = evicted.files,
                freed = %ByteSize(evicted.bytes).display().iec(),
                cap = %ByteSize(self.max_size).display().iec(),
                "compiled-plugin cache over its cap: least recently used plugins removed"
            ),
            Ok(_) => {}
            Err(err) => {
                tracing::warn!(dir = %self.dir().display(), %err, "cannot evict from the plugin cache")
            }
        }
    }

    /// Removes the least recently used artifacts but `keep` while the
    /// artifacts add up to more than the cap, and temporary files left by
    /// a crash: what was removed.
    fn evict(&self, keep: &str) -> io::Result<Usage> {
        let mut entries = self.cache.list()?;
        let mut removed = Usage::default();
        let now = SystemTime::now();
        entries.retain(|e| {
            let stale = !e.artifact
                && now
                    .duration_since(e.modified)
                    .is_ok_and(|age| age > STALE_TEMP);
            if stale && self.cache.remove(&e.name).is_ok() {
                removed.add(e.len);
            }
            e.artifact
        });
        let mut total: u64 = entries.iter().map(|e| e.len).sum();
        // Oldest use first.
        entries.sort_by_key(|e| e.modified);
        for e in &entries {
            if total <= self.max_size {
                break;
            }
            if e.name == keep {
                continue;
            }
            match self.cache.remove(&e.name) {
                Ok(()) => {
                    total -= e.len;
                    removed.add(e.len);
                }
                // Another server evicted it first.
                Err(err) if err.kind() == io::ErrorKind::NotFound => total -= e.len,
                Err(err) => return Err(err),
            }
        }
        Ok(removed)
    }
}

/// Compiles `bytes` for `engine`: the artifact to cache, and the component
/// loaded from it.
pub fn compile(engine: &Engine, bytes: &[u8]) -> anyhow::Result<(Vec<u8>, Component)> {
    let artifact = engine.precompile_component(bytes)?;
    // SAFETY: the artifact was produced just above by this engine.
    let component = unsafe { Component::deserialize(engine, &artifact)? };
    Ok((artifact, component))
}

/// A file of the cache directory.
#[cfg_attr(not(unix), allow(dead_code))]
struct Entry {
    name: String,
    len: u64,
    /// Written or last used.
    modified: SystemTime,
    /// An artifact; else a temporary file.
    artifact: bool,
}

/// Compiled plugins in a cache directory, counted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub files: usize,
    pub bytes: u64,
}

impl Usage {
    fn add(&mut self, len: u64) {
        self.files += 1;
        self.bytes += len;
    }
}

/// What the cache in `dir` holds (`wharf cache`); `None` if there is no
/// such directory yet. An error says why the directory is not used.
pub fn usage(dir: &Path) -> Result<Option<Usage>, String> {
    let Some(cache) = Cache::open_existing(dir)? else {
        return Ok(None);
    };
    let mut usage = Usage::default();
    for e in cache.list().map_err(|err| err.to_string())? {
        if e.artifact {
            usage.add(e.len);
        }
    }
    Ok(Some(usage))
}

/// Removes every compiled plugin (and unfinished write) from the cache in
/// `dir` (`wharf cache clear`): what was removed. The key stays, so that a
/// server running on it goes on caching.
pub fn clear(dir: &Path) -> Result<Usage, String> {
    let Some(cache) = Cache::open_existing(dir)? else {
        return Ok(Usage::default());
    };
    let mut removed = Usage::default();
    for e in cache.list().map_err(|err| err.to_string())? {
        match cache.remove(&e.name) {
            Ok(()) => {
                if e.artifact {
                    removed.add(e.len);
                }
            }
            Err(err) if err.kind() == io::ErrorKind::NotFound => {}
            Err(err) => return Err(format!("cannot remove {}: {err}", e.name)),
        }
    }
    Ok(removed)
}

/// The cache file of the plugin of content hash `hash` compiled for
/// `engine`; `None` if `hash` is not hex (it names a file: nothing else).
fn artifact_name(engine: &Engine, hash: &str) -> Option<String> {
    if hash.is_empty() || !hash.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let mut h = DefaultHasher::new();
    engine.precompile_compatibility_hash().hash(&mut h);
    Some(format!("{hash}-{:016x}.cwasm", h.finish()))
}

/// Whether `name` is one `artifact_name` returns.
fn is_artifact(name: &str) -> bool {
    let hex = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_hexdigit());
    name.strip_suffix(".cwasm")
        .and_then(|stem| stem.split_once('-'))
        .is_some_and(|(hash, compat)| hex(hash) && hex(compat))
}

/// Whether `name` is a write in flight (or left by a crash).
fn is_temp(name: &str) -> bool {
    name.starts_with(".tmp-")
}

/// Warns that `dir` is not used, once per directory and reason (a server
/// loads many plugins).
fn refuse(dir: &Path, why: &str) {
    static WARNED: Mutex<BTreeSet<(PathBuf, String)>> = Mutex::new(BTreeSet::new());
    let first = WARNED
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .insert((dir.to_owned(), why.to_owned()));
    if first {
        tracing::warn!(
            dir = %dir.display(),
            reason = why,
            "plugin cache directory not used; compiling without a cache"
        );
    }
}

/// The tag of cache file `name` holding `artifact`.
fn tag(key: &[u8; KEY_LEN], name: &str, artifact: &[u8]) -> [u8; TAG_LEN] {
    hmac_sha256(key, &[MAGIC, name.as_bytes(), &[0], artifact])
}

/// HMAC-SHA256 (RFC 2104) of the concatenation of `parts`; `key` is at most
/// one block (64 bytes).
fn hmac_sha256(key: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    assert!(key.len() <= 64, "HMAC key longer than a block");
    let mut block = [0u8; 64];
    block[..key.len()].copy_from_slice(key);
    let mut inner = Sha256::new();
    inner.update(block.map(|b| b ^ 0x36));
    for part in parts {
        inner.update(part);
    }
    let mut outer = Sha256::new();
    outer.update(block.map(|b| b ^ 0x5c));
    outer.update(inner.finalize());
    outer.finalize().into()
}

/// Equality in time independent of where the inputs differ.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn invalid(message: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message.into())
}

impl Cache {
    /// The artifact in cache file `name`, if there is one and its tag is
    /// valid.
    fn read_verified(&self, name: &str) -> io::Result<Option<Vec<u8>>> {
        let Some(mut file) = self.read(name)? else {
            return Ok(None);
        };
        if file.len() < HEADER_LEN || &file[..MAGIC.len()] != MAGIC {
            return Err(invalid("not a wharf cache file (bad header)"));
        }
        let (expected, artifact) = file[MAGIC.len()..].split_at(TAG_LEN);
        if !constant_time_eq(expected, &tag(&self.key, name, artifact)) {
            return Err(invalid("bad MAC: not written by this server (tampered?)"));
        }
        file.drain(..HEADER_LEN);
        Ok(Some(file))
    }

    /// The bytes to store for `artifact` under `name`.
    #[cfg_attr(not(unix), allow(dead_code))]
    fn seal(&self, name: &str, artifact: &[u8]) -> Vec<u8> {
        let mut file = Vec::with_capacity(HEADER_LEN + artifact.len());
        file.extend_from_slice(MAGIC);
        file.extend_from_slice(&tag(&self.key, name, artifact));
        file.extend_from_slice(artifact);
        file
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir_path.join(name)
    }
}

#[cfg(unix)]
use unix::Cache;

#[cfg(unix)]
mod unix {
    use std::ffi::{CStr, CString, OsStr};
    use std::fs::{DirBuilder, File, OpenOptions};
    use std::io::{self, Read, Write};
    use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd};
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
    use std::path::{Path, PathBuf};
    use std::time::SystemTime;

    use super::{Entry, KEY_LEN, invalid, is_artifact, is_temp};

    /// An open cache directory, checked, and its key.
    pub(super) struct Cache {
        dir: File,
        pub(super) dir_path: PathBuf,
        pub(super) key: [u8; KEY_LEN],
    }

    impl Cache {
        /// Creates (0700) and opens `dir`, or says why it must not be used.
        pub(super) fn open(dir_path: &Path) -> Result<Cache, String> {
            // Only the directories created here get 0700; existing parents
            // are left alone.
            DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir_path)
                .map_err(|err| format!("cannot create it: {err}"))?;
            // O_NOFOLLOW: a symlink in place of the directory is refused, and
            // every later access is relative to this descriptor, so the path
            // cannot be swapped under us after the check.
            let dir = OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC)
                .open(dir_path)
                .map_err(|err| match err.raw_os_error() {
                    Some(libc::ELOOP) => "it is a symlink".to_string(),
                    Some(libc::ENOTDIR) => "it is not a directory".to_string(),
                    _ => format!("cannot open it: {err}"),
                })?;
            let meta = dir
                .metadata()
                .map_err(|err| format!("cannot stat it: {err}"))?;
            if !meta.is_dir() {
                return Err("it is not a directory".into());
            }
            check_owner(&meta).map_err(|err| err.to_string())?;
            if meta.mode() & 0o022 != 0 {
                return Err(format!(
                    "it is group- or world-writable (mode {:o}); `chmod go-w` it",
                    meta.mode() & 0o7777
                ));
            }
            let key = key(&dir).map_err(|err| format!("its key file: {err}"))?;
            Ok(Cache {
                dir,
                dir_path: dir_path.to_owned(),
                key,
            })
        }

        /// [`open`](Self::open) for a directory that exists: `None` if
        /// there is nothing at `dir_path` (nothing is created then).
        pub(super) fn open_existing(dir_path: &Path) -> Result<Option<Cache>, String> {
            match std::fs::symlink_metadata(dir_path) {
                Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(None),
                _ => Cache::open(dir_path).map(Some),
            }
        }

        /// Cache file `name`, whole; `None` if there is none. Reading it
        /// is a use: its mtime becomes now, for eviction.
        pub(super) fn read(&self, name: &str) -> io::Result<Option<Vec<u8>>> {
            let mut file = match self.open_file(name) {
                Ok(file) => file,
                Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(None),
                Err(err) => return Err(err),
            };
            let meta = file.metadata()?;
            check_file(&meta, 0o022)?;
            let mut bytes = Vec::with_capacity(meta.len().try_into().unwrap_or(0));
            file.read_to_end(&mut bytes)?;
            // Owner may set the times on a read-only descriptor (futimens).
            let _ = file.set_modified(SystemTime::now());
            Ok(Some(bytes))
        }

        /// The artifacts and temporary files in the directory: regular
        /// files owned by the euid, with a name this cache gives.
        pub(super) fn list(&self) -> io::Result<Vec<Entry>> {
            let mut entries = Vec::new();
            for name in self.names()? {
                let Ok(name) = name.to_str() else { continue };
                let artifact = is_artifact(name);
                if !artifact && !is_temp(name) {
                    continue;
                }
                let meta = match self.open_file(name).and_then(|f| f.metadata()) {
                    Ok(meta) => meta,
                    // Removed meanwhile, a symlink, not ours: not listed.
                    Err(_) => continue,
                };
                if check_file(&meta, 0).is_err() {
                    continue;
                }
                entries.push(Entry {
                    name: name.to_owned(),
                    len: meta.len(),
                    modified: meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
                    artifact,
                });
            }
            Ok(entries)
        }

        /// Removes file `name` from the directory (not following a symlink:
        /// `unlinkat` never does).
        pub(super) fn remove(&self, name: &str) -> io::Result<()> {
            unlinkat(&self.dir, &cstring(name)?)
        }

        /// Every name in the directory, read through its descriptor.
        fn names(&self) -> io::Result<Vec<CString>> {
            // A new open file description of the same directory, so that
            // reading it moves no offset of `self.dir`.
            let fd = open_at(&self.dir, c".", libc::O_RDONLY | libc::O_DIRECTORY, 0)?;
            let fd = fd.into_raw_fd();
            // SAFETY: `fd` is an open directory descriptor owned by nobody
            // else; on success the stream owns it (closedir closes it).
            let stream = unsafe { libc::fdopendir(fd) };
            if stream.is_null() {
                let err = io::Error::last_os_error();
                // SAFETY: `fd` is still ours: fdopendir failed.
                unsafe { libc::close(fd) };
                return Err(err);
            }
            let mut names = Vec::new();
            loop {
                // SAFETY: `stream` is a valid, open directory stream used by
                // this thread only; a non-null entry is valid until the
                // next readdir on it, and its `d_name` is NUL-terminated.
                // A null at the end or on an error alike ends the listing
                // (one left out is evicted or cleared the next time).
                let entry = unsafe { libc::readdir(stream) };
                if entry.is_null() {
                    break;
                }
                let name = unsafe { CStr::from_ptr((*entry).d_name.as_ptr()) };
                names.push(name.to_owned());
            }
            // SAFETY: `stream` is open and not used after this.
            unsafe { libc::closedir(stream) };
            Ok(names)
        }

        /// Writes `artifact` (sealed) as cache file `name`, atomically: a
        /// reader never sees half a file, and a symlink at `name` is
        /// replaced, not followed.
        pub(super) fn write(&self, name: &str, artifact: &[u8]) -> io::Result<()> {
            let sealed = self.seal(name, artifact);
            let tmp = write_temp(&self.dir, &sealed)?;
            let result = renameat(&self.dir, &tmp, &cstring(name)?);
            if result.is_err() {
                let _ = unlinkat(&self.dir, &tmp);
            }
            result
        }

        /// Opens `name` in the directory for reading, not following a
        /// symlink, not blocking on a FIFO.
        fn open_file(&self, name: &str) -> io::Result<File> {
            open_at(
                &self.dir,
                &cstring(name)?,
                libc::O_RDONLY | libc::O_NONBLOCK,
                0,
            )
        }
    }

    /// The directory's key, created if missing (published with `linkat`, so
    /// a reader never sees a partial key and two servers agree on one).
    fn key(dir: &File) -> io::Result<[u8; KEY_LEN]> {
        let name = c"key";
        let mut file = match open_at(dir, name, libc::O_RDONLY | libc::O_NONBLOCK, 0) {
            Ok(file) => file,
            Err(err) if err.kind() == io::ErrorKind::NotFound => {
                let tmp = write_temp(dir, &random::<KEY_LEN>()?)?;
                let linked = linkat(dir, &tmp, name);
                let _ = unlinkat(dir, &tmp);
                match linked {
                    Ok(()) => {}
                    // Another server created it first: use theirs.
                    Err(err) if err.kind() == io::ErrorKind::AlreadyExists => {}
                    Err(err) => return Err(err),
                }
                open_at(dir, name, libc::O_RDONLY | libc::O_NONBLOCK, 0)?
            }
            Err(err) if err.raw_os_error() == Some(libc::ELOOP) => {
                return Err(invalid("it is a symlink"));
            }
            Err(err) => return Err(err),
        };
        let meta = file.metadata()?;
        check_file(&meta, 0o077)?;
        if meta.len() != KEY_LEN as u64 {
            return Err(invalid(format!(
                "it is {} bytes, not {KEY_LEN}",
                meta.len()
            )));
        }
        let mut key = [0; KEY_LEN];
        file.read_exact(&mut key)?;
        Ok(key)
    }

    /// A regular file owned by the euid, with none of the `forbidden` mode
    /// bits.
    fn check_file(meta: &std::fs::Metadata, forbidden: u32) -> io::Result<()> {
        if !meta.file_type().is_file() {
            return Err(invalid("not a regular file"));
        }
        check_owner(meta)?;
        if meta.mode() & forbidden != 0 {
            return Err(invalid(format!(
                "mode {:o} allows others to {}",
                meta.mode() & 0o7777,
                if forbidden & 0o044 != 0 {
                    "read or write it"
                } else {
                    "write it"
                }
            )));
        }
        Ok(())
    }

    fn check_owner(meta: &std::fs::Metadata) -> io::Result<()> {
        // SAFETY: geteuid takes no arguments and cannot fail.
        let euid = unsafe { libc::geteuid() };
        if meta.uid() != euid {
            return Err(invalid(format!(
                "owned by uid {}, not the server's uid {euid}",
                meta.uid()
            )));
        }
        Ok(())
    }

    /// Creates a file with a fresh random name in `dir`
    /// (`O_CREAT|O_EXCL|O_NOFOLLOW`, mode 0600) holding `bytes`; its name.
    fn write_temp(dir: &File, bytes: &[u8]) -> io::Result<CString> {
        let name = cstring(&format!(".tmp-{}", hex::encode(random::<16>()?)))?;
        let mut file = open_at(
            dir,
            &name,
            libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL,
            0o600,
        )?;
        if let Err(err) = file.write_all(bytes) {
            drop(file);
            let _ = unlinkat(dir, &name);
            return Err(err);
        }
        Ok(name)
    }

    fn random<const N: usize>() -> io::Result<[u8; N]> {
        let mut bytes = [0; N];
        File::open("/dev/urandom")?.read_exact(&mut bytes)?;
        Ok(bytes)
    }

    fn cstring(name: &str) -> io::Result<CString> {
        let name = OsStr::new(name);
        if name.as_bytes().contains(&b'/') {
            return Err(invalid("file name with a slash"));
        }
        CString::new(name.as_bytes()).map_err(|_| invalid("file name with a NUL"))
    }

    /// `openat(dir, name, flags | O_NOFOLLOW | O_CLOEXEC, mode)`.
    fn open_at(
        dir: &File,
        name: &CStr,
        flags: libc::c_int,
        mode: libc::mode_t,
    ) -> io::Result<File> {
        // SAFETY: `name` is a NUL-terminated string alive for the call; the
        // descriptor is owned by `dir`, which outlives the call.
        let fd = unsafe {
            libc::openat(
                dir.as_raw_fd(),
                name.as_ptr(),
                flags | libc::O_NOFOLLOW | libc::O_CLOEXEC,
                libc::c_uint::from(mode),
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` was just returned by openat and is owned by no one else.
        Ok(unsafe { File::from_raw_fd(fd) })
    }

    fn renameat(dir: &File, from: &CStr, to: &CStr) -> io::Result<()> {
        // SAFETY: both names are NUL-terminated strings alive for the call.
        let rc =
            unsafe { libc::renameat(dir.as_raw_fd(), from.as_ptr(), dir.as_raw_fd(), to.as_ptr()) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    fn linkat(dir: &File, from: &CStr, to: &CStr) -> io::Result<()> {
        // SAFETY: both names are NUL-terminated strings alive for the call;
        // flags 0: a symlink at `from` is not followed.
        let rc = unsafe {
            libc::linkat(
                dir.as_raw_fd(),
                from.as_ptr(),
                dir.as_raw_fd(),
                to.as_ptr(),
                0,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    fn unlinkat(dir: &File, name: &CStr) -> io::Result<()> {
        // SAFETY: `name` is a NUL-terminated string alive for the call.
        let rc = unsafe { libc::unlinkat(dir.as_raw_fd(), name.as_ptr(), 0) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

#[cfg(not(unix))]
use other::Cache;

/// Without `openat`, `O_NOFOLLOW` and Unix owners and modes, the cache's
/// safety cannot be checked: it is not used.
#[cfg(not(unix))]
mod other {
    use std::io;
    use std::path::{Path, PathBuf};

    use super::{Entry, KEY_LEN};

    pub(super) struct Cache {
        pub(super) dir_path: PathBuf,
        pub(super) key: [u8; KEY_LEN],
        never: std::convert::Infallible,
    }

    impl Cache {
        pub(super) fn open(_: &Path) -> Result<Cache, String> {
            Err("the compiled-plugin cache is only supported on Unix".into())
        }

        pub(super) fn read(&self, _: &str) -> io::Result<Option<Vec<u8>>> {
            match self.never {}
        }

        pub(super) fn open_existing(_: &Path) -> Result<Option<Cache>, String> {
            Err("the compiled-plugin cache is only supported on Unix".into())
        }

        pub(super) fn write(&self, _: &str, _: &[u8]) -> io::Result<()> {
            match self.never {}
        }

        pub(super) fn list(&self) -> io::Result<Vec<Entry>> {
            match self.never {}
        }

        pub(super) fn remove(&self, _: &str) -> io::Result<()> {
            match self.never {}
        }
    }
}

#[cfg(all(test, unix))]
mod tests {
    use std::fs;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};

    use super::*;

    /// How a plugin's compiled code was obtained.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    enum Origin {
        Compiled,
        Cached,
    }

    /// From the cache in `dir` if it has it, else compiled (and cached).
    fn load(
        engine: &Engine,
        dir: Option<&Path>,
        hash: &str,
        bytes: &[u8],
    ) -> anyhow::Result<(Component, Origin)> {
        load_capped(engine, dir, DEFAULT_MAX_SIZE, hash, bytes)
    }

    fn load_capped(
        engine: &Engine,
        dir: Option<&Path>,
        max_size: u64,
        hash: &str,
        bytes: &[u8],
    ) -> anyhow::Result<(Component, Origin)> {
        let cache = dir.and_then(|dir| PluginCache::open(dir, max_size));
        if let Some(component) = cache.as_ref().and_then(|c| c.get(engine, hash)) {
            return Ok((component, Origin::Cached));
        }
        let (artifact, component) = compile(engine, bytes)?;
        if let Some(cache) = &cache {
            cache.put(engine, hash, &artifact);
        }
        Ok((component, Origin::Compiled))
    }

    fn engine() -> Engine {
        let mut config = wasmtime::Config::new();
        config.wasm_component_model(true);
        Engine::new(&config).unwrap()
    }

    fn chaos() -> Vec<u8> {
        fs::read(Path::new(crate::bundled::PLUGIN_DIR).join("chaos.wasm")).unwrap()
    }

    fn load_echo(engine: &Engine, dir: &Path) -> (Component, Origin) {
        let echo = crate::bundled::ECHO;
        load(engine, Some(dir), &content_hash(echo), echo).unwrap()
    }

    fn echo_path(engine: &Engine, dir: &Path) -> PathBuf {
        dir.join(artifact_name(engine, &content_hash(crate::bundled::ECHO)).unwrap())
    }

    /// The names of a component's exports.
    fn exports(engine: &Engine, component: &Component) -> Vec<String> {
        let mut names: Vec<String> = component
            .component_type()
            .exports(engine)
            .map(|(name, _)| name.to_string())
            .collect();
        names.sort();
        names
    }

    fn entries(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn hmac_matches_rfc_4231() {
        // Test case 2 of RFC 4231.
        let tag = hmac_sha256(b"Jefe", &[b"what do ya want ", b"for nothing?"]);
        assert_eq!(
            hex::encode(tag),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn round_trip_compiles_then_caches() {
        let engine = engine();
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("a/b/wharf");
        let (first, origin) = load_echo(&engine, &dir);
        assert_eq!(origin, Origin::Compiled);
        let (second, origin) = load_echo(&engine, &dir);
        assert_eq!(origin, Origin::Cached);
        assert_eq!(exports(&engine, &first), exports(&engine, &second));

        // Created 0700, the key 0600, the artifact 0600; no temporary left.
        for created in ["a", "a/b", "a/b/wharf"] {
            let mode = fs::metadata(tmp.path().join(created)).unwrap().mode();
            assert_eq!(mode & 0o777, 0o700, "{created}");
        }
        let artifact = echo_path(&engine, &dir);
        for file in [dir.join("key"), artifact.clone()] {
            assert_eq!(fs::metadata(&file).unwrap().mode() & 0o777, 0o600);
        }
        assert_eq!(fs::metadata(dir.join("key")).unwrap().len(), 32);
        let name = artifact.file_name().unwrap().to_string_lossy().into_owned();
        assert_eq!(entries(&dir), vec![name, "key".to_string()]);
        assert!(fs::read(&artifact).unwrap().starts_with(MAGIC));
    }

    #[test]
    fn planted_artifact_is_not_loaded() {
        let engine = engine();
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("wharf");
        let chaos = chaos();
        let chaos_artifact = engine.precompile_component(&chaos).unwrap();
        let echo_exports = exports(
            &engine,
            &Component::new(&engine, crate::bundled::ECHO).unwrap(),
        );
        let chaos_exports = exports(&engine, &Component::new(&engine, &chaos).unwrap());
        assert_ne!(
            echo_exports, chaos_exports,
            "the test needs different plugins"
        );

        // A legitimately cached chaos, to steal a valid sealed file from.
        let (_, origin) = load(&engine, Some(&dir), &content_hash(&chaos), &chaos).unwrap();
        assert_eq!(origin, Origin::Compiled);
        let sealed_chaos =
            fs::read(dir.join(artifact_name(&engine, &content_hash(&chaos)).unwrap())).unwrap();

        let mut forged_tag = MAGIC.to_vec();
        forged_tag.extend_from_slice(&[0; TAG_LEN]);
        forged_tag.extend_from_slice(&chaos_artifact);
        let plants: [(&str, Vec<u8>); 3] = [
            ("raw precompiled chaos", chaos_artifact.clone()),
            ("chaos with a made-up tag", forged_tag),
            ("chaos sealed under its own name", sealed_chaos),
        ];
        let path = echo_path(&engine, &dir);
        for (what, planted) in plants {
            fs::write(&path, &planted).unwrap();
            fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
            let (component, origin) = load_echo(&engine, &dir);
            assert_eq!(origin, Origin::Compiled, "{what}");
            assert_eq!(exports(&engine, &component), echo_exports, "{what}");
            // Overwritten with echo, which now loads from the cache.
            assert_ne!(fs::read(&path).unwrap(), planted, "{what}");
            let (component, origin) = load_echo(&engine, &dir);
            assert_eq!(origin, Origin::Cached, "{what}");
            assert_eq!(exports(&engine, &component), echo_exports, "{what}");
        }
    }

    #[test]
    fn tampered_or_loose_artifact_is_recompiled() {
        let engine = engine();
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("wharf");
        load_echo(&engine, &dir);
        let path = echo_path(&engine, &dir);

        // One bit of the code flipped.
        let mut bytes = fs::read(&path).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        fs::write(&path, &bytes).unwrap();
        assert_eq!(load_echo(&engine, &dir).1, Origin::Compiled);
        assert_eq!(load_echo(&engine, &dir).1, Origin::Cached);

        // A valid file others may write is not trusted either.
        fs::set_permissions(&path, fs::Permissions::from_mode(0o666)).unwrap();
        assert_eq!(load_echo(&engine, &dir).1, Origin::Compiled);
        assert_eq!(fs::metadata(&path).unwrap().mode() & 0o777, 0o600);
        assert_eq!(load_echo(&engine, &dir).1, Origin::Cached);
    }

    #[test]
    fn writable_directory_is_not_used() {
        let engine = engine();
        let tmp = tempfile::tempdir().unwrap();
        for mode in [0o777, 0o770, 0o1777] {
            let dir = tmp.path().join(format!("wharf-{mode:o}"));
            fs::create_dir(&dir).unwrap();
            fs::set_permissions(&dir, fs::Permissions::from_mode(mode)).unwrap();
            assert_eq!(load_echo(&engine, &dir).1, Origin::Compiled);
            assert_eq!(load_echo(&engine, &dir).1, Origin::Compiled);
            assert!(entries(&dir).is_empty(), "{mode:o}: {:?}", entries(&dir));
        }
    }

    #[test]
    fn symlinked_directory_is_not_used() {
        let engine = engine();
        let tmp = tempfile::tempdir().unwrap();
        let real = tmp.path().join("real");
        fs::create_dir(&real).unwrap();
        fs::set_permissions(&real, fs::Permissions::from_mode(0o700)).unwrap();
        let link = tmp.path().join("wharf");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        assert_eq!(load_echo(&engine, &link).1, Origin::Compiled);
        assert_eq!(load_echo(&engine, &link).1, Origin::Compiled);
        assert!(entries(&real).is_empty());
    }

    #[test]
    fn symlink_at_artifact_name_is_not_followed() {
        let engine = engine();
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("wharf");
        fs::create_dir(&dir).unwrap();
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o700)).unwrap();
        let victim = tmp.path().join("victim");
        fs::write(&victim, b"precious").unwrap();
        let path = echo_path(&engine, &dir);
        std::os::unix::fs::symlink(&victim, &path).unwrap();

        assert_eq!(load_echo(&engine, &dir).1, Origin::Compiled);
        assert_eq!(fs::read(&victim).unwrap(), b"precious");
        // The symlink was replaced by a regular file, which is then used.
        assert!(fs::symlink_metadata(&path).unwrap().file_type().is_file());
        assert_eq!(load_echo(&engine, &dir).1, Origin::Cached);
        assert_eq!(fs::read(&victim).unwrap(), b"precious");
    }

    #[test]
    fn symlinked_or_loose_key_is_not_used() {
        let engine = engine();
        let tmp = tempfile::tempdir().unwrap();

        // A symlink at the key's name: the cache is not used, the target
        // neither read as a key nor written.
        let dir = tmp.path().join("symlinked");
        fs::create_dir(&dir).unwrap();
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o700)).unwrap();
        let victim = tmp.path().join("victim");
        fs::write(&victim, [7; 32]).unwrap();
        fs::set_permissions(&victim, fs::Permissions::from_mode(0o600)).unwrap();
        std::os::unix::fs::symlink(&victim, dir.join("key")).unwrap();
        assert_eq!(load_echo(&engine, &dir).1, Origin::Compiled);
        assert_eq!(load_echo(&engine, &dir).1, Origin::Compiled);
        assert_eq!(entries(&dir), vec!["key".to_string()]);
        assert_eq!(fs::read(&victim).unwrap(), [7; 32]);

        // A key others may read: not used.
        let dir = tmp.path().join("loose");
        load_echo(&engine, &dir);
        fs::set_permissions(dir.join("key"), fs::Permissions::from_mode(0o644)).unwrap();
        assert_eq!(load_echo(&engine, &dir).1, Origin::Compiled);
        fs::set_permissions(dir.join("key"), fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(load_echo(&engine, &dir).1, Origin::Cached);
    }

    #[test]
    fn files_of_another_owner_are_not_used() {
        // Only root can give a file away.
        // SAFETY: geteuid takes no arguments and cannot fail.
        if unsafe { libc::geteuid() } != 0 {
            return;
        }
        let engine = engine();
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("wharf");
        load_echo(&engine, &dir);
        let other = Some(65534);

        let path = echo_path(&engine, &dir);
        std::os::unix::fs::chown(&path, other, None).unwrap();
        assert_eq!(load_echo(&engine, &dir).1, Origin::Compiled);
        assert_eq!(fs::metadata(&path).unwrap().uid(), 0);
        assert_eq!(load_echo(&engine, &dir).1, Origin::Cached);

        std::os::unix::fs::chown(dir.join("key"), other, None).unwrap();
        assert_eq!(load_echo(&engine, &dir).1, Origin::Compiled);
        std::os::unix::fs::chown(dir.join("key"), Some(0), None).unwrap();
        assert_eq!(load_echo(&engine, &dir).1, Origin::Cached);

        std::os::unix::fs::chown(&dir, other, None).unwrap();
        assert_eq!(load_echo(&engine, &dir).1, Origin::Compiled);
        std::os::unix::fs::chown(&dir, Some(0), None).unwrap();
        assert_eq!(load_echo(&engine, &dir).1, Origin::Cached);
    }

    #[test]
    fn no_directory_means_no_cache() {
        let engine = engine();
        let echo = crate::bundled::ECHO;
        let (_, origin) = load(&engine, None, &content_hash(echo), echo).unwrap();
        assert_eq!(origin, Origin::Compiled);
    }

    fn plugin(name: &str) -> Vec<u8> {
        fs::read(Path::new(crate::bundled::PLUGIN_DIR).join(format!("{name}.wasm"))).unwrap()
    }

    /// The size of `bytes`' cache file.
    fn cached_size(engine: &Engine, bytes: &[u8]) -> u64 {
        (HEADER_LEN + engine.precompile_component(bytes).unwrap().len()) as u64
    }

    fn set_age(path: &Path, seconds_ago: u64) {
        let file = fs::File::open(path).unwrap();
        file.set_modified(SystemTime::now() - Duration::from_secs(seconds_ago))
            .unwrap();
    }

    fn artifacts(dir: &Path) -> Vec<String> {
        entries(dir)
            .into_iter()
            .filter(|n| is_artifact(n))
            .collect()
    }

    #[test]
    fn least_recently_used_plugins_are_evicted_beyond_the_cap() {
        let engine = engine();
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("wharf");
        let [a, b, c] = ["echo", "chaos", "close_codes"].map(plugin);
        let path = |bytes: &[u8]| dir.join(artifact_name(&engine, &content_hash(bytes)).unwrap());
        // Room for any two of the three, not for all three.
        let cap = [&a, &b, &c]
            .map(|p| cached_size(&engine, p))
            .iter()
            .sum::<u64>()
            - 1;
        let load =
            |bytes: &[u8]| load_capped(&engine, Some(&dir), cap, &content_hash(bytes), bytes);

        assert_eq!(load(&a).unwrap().1, Origin::Compiled);
        assert_eq!(load(&b).unwrap().1, Origin::Compiled);
        // `a` written first but used last: `b` is the least recently used.
        set_age(&path(&a), 100);
        set_age(&path(&b), 50);
        assert_eq!(load(&a).unwrap().1, Origin::Cached);
        let used = fs::metadata(path(&a)).unwrap().modified().unwrap();
        assert!(
            SystemTime::now().duration_since(used).unwrap() < Duration::from_secs(10),
            "a use sets the mtime"
        );
        assert_eq!(load(&c).unwrap().1, Origin::Compiled);
        let mut expected = vec![
            path(&a).file_name().unwrap().to_string_lossy().into_owned(),
            path(&c).file_name().unwrap().to_string_lossy().into_owned(),
        ];
        expected.sort();
        assert_eq!(artifacts(&dir), expected);
        assert_eq!(load(&a).unwrap().1, Origin::Cached);
        assert_eq!(load(&b).unwrap().1, Origin::Compiled);
        let usage = usage(&dir).unwrap().unwrap();
        assert!(usage.bytes <= cap, "{usage:?} over {cap}");
    }

    #[test]
    fn a_plugin_larger_than_the_cap_is_cached_alone() {
        let engine = engine();
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("wharf");
        for name in ["echo", "chaos"] {
            let bytes = plugin(name);
            load_capped(&engine, Some(&dir), 1, &content_hash(&bytes), &bytes).unwrap();
        }
        let chaos = plugin("chaos");
        let name = artifact_name(&engine, &content_hash(&chaos)).unwrap();
        assert_eq!(artifacts(&dir), vec![name]);
    }

    #[test]
    fn stale_temporary_files_are_removed_fresh_ones_kept() {
        let engine = engine();
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("wharf");
        load_echo(&engine, &dir);
        for (name, age) in [(".tmp-old", 7200), (".tmp-new", 0)] {
            fs::write(dir.join(name), b"half").unwrap();
            set_age(&dir.join(name), age);
        }
        let chaos = plugin("chaos");
        load(&engine, Some(&dir), &content_hash(&chaos), &chaos).unwrap();
        let names = entries(&dir);
        assert!(!names.contains(&".tmp-old".to_owned()), "{names:?}");
        assert!(names.contains(&".tmp-new".to_owned()), "{names:?}");
    }

    #[test]
    fn usage_and_clear() {
        let engine = engine();
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("wharf");
        assert_eq!(usage(&dir).unwrap(), None);
        assert_eq!(clear(&dir).unwrap(), Usage::default());
        assert!(!dir.exists(), "neither creates the directory");

        load_echo(&engine, &dir);
        let chaos = plugin("chaos");
        load(&engine, Some(&dir), &content_hash(&chaos), &chaos).unwrap();
        fs::write(dir.join("notes.txt"), b"mine").unwrap();
        let expected = Usage {
            files: 2,
            bytes: cached_size(&engine, crate::bundled::ECHO) + cached_size(&engine, &chaos),
        };
        assert_eq!(usage(&dir).unwrap(), Some(expected));
        assert_eq!(clear(&dir).unwrap(), expected);
        assert_eq!(usage(&dir).unwrap(), Some(Usage::default()));
        // What is not the cache's stays, and so does the key.
        assert_eq!(
            entries(&dir),
            vec!["key".to_owned(), "notes.txt".to_owned()]
        );
        assert_eq!(load_echo(&engine, &dir).1, Origin::Compiled);
        assert_eq!(load_echo(&engine, &dir).1, Origin::Cached);

        // A directory others may write is neither counted nor cleared.
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o777)).unwrap();
        assert!(usage(&dir).unwrap_err().contains("writable"));
        assert!(clear(&dir).is_err());
    }
}
