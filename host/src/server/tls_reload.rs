//! When `wss` certificates are reloaded while serving: when their files
//! change, on SIGHUP, and on request ([`reload_all`], for the admin API).
//!
//! Each reload is [`TlsReloader::reload`]: all of a listener's files are read
//! and checked again, and a set that fails any check is refused with the
//! error (logged as a warning naming the file) while the previous
//! certificates keep serving. Established connections are never touched.
//!
//! Files are watched through their directories, not by themselves: editors
//! and ACME clients replace a file by renaming a new one over it, which a
//! watch on the old file would not see. Events are coalesced per listener and
//! acted on once the directory has been quiet for [`DEBOUNCE`], so a
//! certificate and its key written one after the other are read together.
//! A file that is a symlink (Kubernetes secrets, certbot's `live/`) is
//! reloaded on any change in its directory, where the link's target is
//! swapped, and its target's directory is watched as well.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::future::Future;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use notify::event::{AccessKind, AccessMode};
use notify::{EventKind, RecursiveMode, Watcher as _};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::tls::{Reloaded, TlsError, TlsReloader};

/// How long a watched directory must be quiet before its listeners reload.
pub const DEBOUNCE: Duration = Duration::from_millis(500);

/// A directory that never goes quiet still gets its reload this long after
/// its first change.
pub const MAX_DELAY: Duration = Duration::from_secs(3);

/// Starts everything that reloads these listeners' certificates on its own:
/// the file watcher and the SIGHUP handler, both running until `shutdown`.
/// Nothing to do without listeners. Neither is essential, so a failure to
/// set one up is logged, not returned. Call it from within the runtime.
pub fn spawn(reloaders: Vec<TlsReloader>, shutdown: &CancellationToken) {
    if reloaders.is_empty() {
        return;
    }
    #[cfg(unix)]
    match reload_on_sighup(reloaders.clone(), shutdown.clone()) {
        Ok(task) => {
            tokio::spawn(task);
        }
        Err(err) => {
            tracing::warn!(%err, "cannot handle SIGHUP: TLS certificates reload only when their files change")
        }
    }
    match watch(reloaders, shutdown.clone()) {
        Ok(task) => {
            tokio::spawn(task);
        }
        Err(err) => {
            tracing::warn!(%err, "cannot watch the TLS certificate files: reload them with SIGHUP")
        }
    }
}

/// Reloads every listener's certificates now, logging each outcome as the
/// other triggers do; the results are in the order of `reloaders`.
/// Blocking (it reads files): from async code, call it in `spawn_blocking`.
pub fn reload_all(reloaders: &[TlsReloader]) -> Vec<Result<Reloaded, TlsError>> {
    reloaders
        .iter()
        .map(|reloader| {
            let result = reloader.reload();
            log_outcome(reloader, &result, Trigger::Request);
            result
        })
        .collect()
}

/// Watches the directories of every certificate and key file, and reloads a
/// listener once changes to its files have settled. The watch is set up
/// here (so its errors are returned); the future acts on it until
/// `shutdown`, and must be polled within a tokio runtime.
pub fn watch(
    reloaders: Vec<TlsReloader>,
    shutdown: CancellationToken,
) -> Result<impl Future<Output = ()> + Send + 'static, notify::Error> {
    let routes = Arc::new(Routes::new(&reloaders));
    let pending = Arc::new(Pending::default());
    let mut watcher = {
        let (routes, pending) = (routes.clone(), pending.clone());
        notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
            // Runs on the watcher's thread: only marks, never blocks for long.
            match event {
                Ok(event) => pending.mark(routes.affected(&event)),
                Err(err) => {
                    // Rare (the kernel's queue overflowed, a watch broke):
                    // changes may have been missed, so look at everything.
                    tracing::warn!(%err, "watching the TLS certificate files");
                    pending.mark(0..routes.listeners);
                }
            }
        })?
    };
    for dir in &routes.dirs {
        watcher.watch(dir, RecursiveMode::NonRecursive)?;
    }
    tracing::debug!(dirs = ?routes.dirs, "watching the TLS certificate files");
    Ok(async move {
        // Dropped at the end: the watch stops with this task.
        let _watcher = watcher;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = pending.wake.notified() => {}
            }
            let latest = Instant::now() + MAX_DELAY;
            loop {
                let quiet = (Instant::now() + DEBOUNCE).min(latest);
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = pending.wake.notified() => {}
                    _ = tokio::time::sleep_until(quiet) => break,
                }
            }
            for index in pending.take() {
                reload_logged(&reloaders[index], Trigger::FileChange).await;
            }
        }
    })
}

/// Reloads every listener's certificates on each SIGHUP, until `shutdown`.
/// The handler is installed here (so SIGHUP no longer ends the process from
/// now on, and its error is returned); the future acts on the signals and
/// must be polled within the runtime it was created in.
#[cfg(unix)]
pub fn reload_on_sighup(
    reloaders: Vec<TlsReloader>,
    shutdown: CancellationToken,
) -> std::io::Result<impl Future<Output = ()> + Send + 'static> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut hangup = signal(SignalKind::hangup())?;
    Ok(async move {
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                received = hangup.recv() => {
                    if received.is_none() {
                        return;
                    }
                }
            }
            tracing::info!("SIGHUP: reloading TLS certificates");
            for reloader in &reloaders {
                reload_logged(reloader, Trigger::Sighup).await;
            }
        }
    })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Trigger {
    FileChange,
    #[cfg_attr(not(unix), allow(dead_code))]
    Sighup,
    Request,
}

impl Trigger {
    fn as_str(self) -> &'static str {
        match self {
            Trigger::FileChange => "file change",
            Trigger::Sighup => "SIGHUP",
            Trigger::Request => "request",
        }
    }
}

/// Reloads off the async threads (it reads files), and logs the outcome.
async fn reload_logged(reloader: &TlsReloader, trigger: Trigger) {
    let task = reloader.clone();
    let result = match tokio::task::spawn_blocking(move || task.reload()).await {
        Ok(result) => result,
        // Only at runtime shutdown (reload does not panic on bad input).
        Err(err) => {
            tracing::warn!(%err, cert = %reloader.cert().display(), "TLS reload did not run");
            return;
        }
    };
    log_outcome(reloader, &result, trigger);
}

fn log_outcome(reloader: &TlsReloader, result: &Result<Reloaded, TlsError>, trigger: Trigger) {
    let cert = reloader.cert().display();
    let asked = trigger != Trigger::FileChange;
    let trigger = trigger.as_str();
    match result {
        Ok(Reloaded {
            changed: true,
            not_after,
        }) => tracing::info!(
            %cert,
            not_after = not_after.as_deref().unwrap_or("unknown"),
            trigger,
            "TLS certificates reloaded: new handshakes get them"
        ),
        // Asked for explicitly: say so even when nothing changed.
        Ok(Reloaded { changed: false, .. }) if asked => {
            tracing::info!(%cert, trigger, "TLS certificates reloaded: unchanged")
        }
        Ok(Reloaded { changed: false, .. }) => {
            tracing::debug!(%cert, trigger, "TLS certificates unchanged")
        }
        Err(err) => tracing::warn!(
            %cert,
            %err,
            trigger,
            "TLS certificates not reloaded: still serving the previous ones"
        ),
    }
}

/// Which listeners a change to which path concerns.
#[derive(Debug, Default)]
struct Routes {
    /// How many listeners (reloaders) there are.
    listeners: usize,
    /// Directories to watch.
    dirs: BTreeSet<PathBuf>,
    /// A watched file (absolute, and its symlink target if it is one) ->
    /// the listeners reading it.
    files: HashMap<PathBuf, BTreeSet<usize>>,
    /// A watched directory -> the listeners with a file in it.
    in_dir: HashMap<PathBuf, BTreeSet<usize>>,
    /// Directories holding a symlinked file: any change there counts.
    any_change: HashSet<PathBuf>,
}

impl Routes {
    fn new(reloaders: &[TlsReloader]) -> Self {
        let mut routes = Routes {
            listeners: reloaders.len(),
            ..Routes::default()
        };
        for (index, reloader) in reloaders.iter().enumerate() {
            for file in reloader.files() {
                // Events name paths under the directory as it was watched.
                let Ok(file) = std::path::absolute(&file) else {
                    continue;
                };
                let symlink = file.symlink_metadata().is_ok_and(|m| m.is_symlink());
                if symlink && let Some(dir) = file.parent() {
                    routes.any_change.insert(dir.to_owned());
                }
                let target = symlink.then(|| file.canonicalize().ok()).flatten();
                for path in std::iter::once(file).chain(target) {
                    routes.add(path, index);
                }
            }
        }
        routes
    }

    fn add(&mut self, file: PathBuf, index: usize) {
        let Some(dir) = file.parent() else { return };
        self.dirs.insert(dir.to_owned());
        self.in_dir.entry(dir.to_owned()).or_default().insert(index);
        self.files.entry(file).or_default().insert(index);
    }

    /// The listeners an event concerns.
    fn affected(&self, event: &notify::Event) -> BTreeSet<usize> {
        if event.need_rescan() {
            return (0..self.listeners).collect();
        }
        match event.kind {
            // Opening and reading (as a reload itself does) change nothing;
            // a writer closing a file has finished changing it.
            EventKind::Access(AccessKind::Close(AccessMode::Write)) => {}
            EventKind::Access(_) => return BTreeSet::new(),
            _ => {}
        }
        let mut affected = BTreeSet::new();
        for path in &event.paths {
            let hits = [
                self.files.get(path),
                // The directory itself (removed, moved).
                self.in_dir.get(path),
                path.parent()
                    .filter(|dir| self.any_change.contains(*dir))
                    .and_then(|dir| self.in_dir.get(dir)),
            ];
            for hit in hits.into_iter().flatten() {
                affected.extend(hit);
            }
        }
        affected
    }
}

/// Listeners with changes not yet acted on: at most one entry each, however
/// many events arrive, and one pending wake-up.
#[derive(Debug, Default)]
struct Pending {
    listeners: Mutex<BTreeSet<usize>>,
    wake: tokio::sync::Notify,
}

impl Pending {
    fn mark(&self, listeners: impl IntoIterator<Item = usize>) {
        let mut pending = self.listeners.lock().unwrap_or_else(|e| e.into_inner());
        let mut any = false;
        for listener in listeners {
            pending.insert(listener);
            any = true;
        }
        if any {
            // Also for listeners already pending: a change pushes their
            // quiet period back. Wake-ups coalesce into one.
            self.wake.notify_one();
        }
    }

    fn take(&self) -> BTreeSet<usize> {
        std::mem::take(&mut *self.listeners.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use rustls::pki_types::CertificateDer;

    use super::*;
    use crate::config::{SniCertificate, TlsConfig};
    use crate::server::tls::reloadable_acceptor;

    /// Writes a fresh self-signed pair to `dir/STEM.pem` and `dir/STEM-key.pem`
    /// (through a temporary file renamed over each, as ACME clients do).
    fn write_pair(dir: &Path, stem: &str, name: &str) -> CertificateDer<'static> {
        let ck = rcgen::generate_simple_self_signed(vec![name.to_string()]).unwrap();
        replace(&dir.join(format!("{stem}.pem")), ck.cert.pem().as_bytes());
        replace(
            &dir.join(format!("{stem}-key.pem")),
            ck.signing_key.serialize_pem().as_bytes(),
        );
        ck.cert.der().clone()
    }

    fn replace(path: &Path, contents: &[u8]) {
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, contents).unwrap();
        std::fs::rename(&tmp, path).unwrap();
    }

    fn tls(dir: &Path, stem: &str, sni: Vec<SniCertificate>) -> TlsConfig {
        TlsConfig {
            cert: dir.join(format!("{stem}.pem")),
            key: dir.join(format!("{stem}-key.pem")),
            sni,
        }
    }

    async fn wait_serving(reloader: &TlsReloader, name: &str, want: &CertificateDer<'_>) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while reloader.serving(Some(name)) != *want {
            assert!(
                Instant::now() < deadline,
                "{name}: still the old certificate"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn event(kind: EventKind, paths: &[&Path]) -> notify::Event {
        let mut event = notify::Event::new(kind);
        for path in paths {
            event = event.add_path(path.to_path_buf());
        }
        event
    }

    #[test]
    fn events_route_to_the_listeners_reading_the_file() {
        use notify::event::{CreateKind, ModifyKind, RenameMode};
        let one = tempfile::tempdir().unwrap();
        let two = tempfile::tempdir().unwrap();
        write_pair(one.path(), "a", "a.test");
        write_pair(one.path(), "shared", "shared.test");
        write_pair(two.path(), "b", "b.test");
        let sni = |dir: &Path, stem: &str| SniCertificate {
            names: vec![format!("{stem}.test")],
            cert: dir.join(format!("{stem}.pem")),
            key: dir.join(format!("{stem}-key.pem")),
        };
        let a = reloadable_acceptor(&tls(one.path(), "a", vec![sni(one.path(), "shared")]))
            .unwrap()
            .1;
        let b = reloadable_acceptor(&tls(two.path(), "b", vec![sni(one.path(), "shared")]))
            .unwrap()
            .1;
        let routes = Routes::new(&[a, b]);
        let dirs: BTreeSet<PathBuf> = [one.path(), two.path()]
            .iter()
            .map(|d| std::path::absolute(d).unwrap())
            .collect();
        assert_eq!(routes.dirs, dirs);

        let affected = |kind, paths: &[&Path]| {
            routes
                .affected(&event(kind, paths))
                .into_iter()
                .collect::<Vec<_>>()
        };
        let modify = EventKind::Modify(ModifyKind::Any);
        let a_key = one.path().join("a-key.pem");
        let shared = one.path().join("shared.pem");
        let b_cert = two.path().join("b.pem");
        let tmp = one.path().join("a.tmp");
        assert_eq!(affected(modify, &[&a_key]), [0]);
        assert_eq!(affected(modify, &[&shared]), [0, 1]);
        assert_eq!(affected(modify, &[&b_cert]), [1]);
        // A rename over a file: its new name counts, the temporary does not.
        let rename = EventKind::Modify(ModifyKind::Name(RenameMode::Both));
        assert_eq!(affected(rename, &[&tmp, &a_key]), [0]);
        assert!(affected(EventKind::Create(CreateKind::File), &[&tmp]).is_empty());
        assert!(affected(modify, &[&one.path().join("unrelated.pem")]).is_empty());
        // Reading a file (a reload does) is no change; writing one is.
        for kind in [
            EventKind::Access(AccessKind::Open(AccessMode::Any)),
            EventKind::Access(AccessKind::Close(AccessMode::Read)),
            EventKind::Access(AccessKind::Read),
        ] {
            assert!(affected(kind, &[&a_key]).is_empty(), "{kind:?}");
        }
        let closed = EventKind::Access(AccessKind::Close(AccessMode::Write));
        assert_eq!(affected(closed, &[&a_key]), [0]);
        // The directory itself went away: everyone with a file there.
        let gone = EventKind::Remove(notify::event::RemoveKind::Folder);
        let (one_abs, two_abs) = (
            std::path::absolute(one.path()).unwrap(),
            std::path::absolute(two.path()).unwrap(),
        );
        assert_eq!(affected(gone, &[&one_abs]), [0, 1]);
        assert_eq!(affected(gone, &[&two_abs]), [1]);
        // The kernel dropped events: everyone.
        let overflow = notify::Event::new(EventKind::Other).set_flag(notify::event::Flag::Rescan);
        assert_eq!(
            routes.affected(&overflow).into_iter().collect::<Vec<_>>(),
            [0, 1]
        );
    }

    #[cfg(unix)]
    #[test]
    fn a_symlinked_file_reloads_on_any_change_in_its_directory() {
        // As Kubernetes mounts secrets: tls.crt -> ..data/tls.crt, and an
        // update swaps ..data for another directory.
        let root = tempfile::tempdir().unwrap();
        let v1 = root.path().join("..v1");
        std::fs::create_dir(&v1).unwrap();
        write_pair(&v1, "tls", "k8s.test");
        std::os::unix::fs::symlink("..v1", root.path().join("..data")).unwrap();
        for file in ["tls.pem", "tls-key.pem"] {
            std::os::unix::fs::symlink(Path::new("..data").join(file), root.path().join(file))
                .unwrap();
        }
        let reloader = reloadable_acceptor(&tls(root.path(), "tls", vec![]))
            .unwrap()
            .1;
        let routes = Routes::new(&[reloader]);
        let root_abs = std::path::absolute(root.path()).unwrap();
        assert!(routes.dirs.contains(&root_abs));
        // The target's directory too.
        assert!(routes.dirs.contains(&v1.canonicalize().unwrap()));
        let swapped = event(
            EventKind::Modify(notify::event::ModifyKind::Name(
                notify::event::RenameMode::To,
            )),
            &[&root_abs.join("..data")],
        );
        assert_eq!(
            routes.affected(&swapped).into_iter().collect::<Vec<_>>(),
            [0]
        );
    }

    #[test]
    fn pending_changes_coalesce() {
        let pending = Pending::default();
        for _ in 0..10_000 {
            pending.mark([2, 0]);
            pending.mark([]);
        }
        pending.mark([1]);
        assert_eq!(pending.take().into_iter().collect::<Vec<_>>(), [0, 1, 2]);
        assert!(pending.take().is_empty());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn watcher_reloads_after_files_are_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let old = write_pair(dir.path(), "server", "server.test");
        let other = tempfile::tempdir().unwrap();
        let other_old = write_pair(other.path(), "other", "other.test");
        let reloader = reloadable_acceptor(&tls(dir.path(), "server", vec![]))
            .unwrap()
            .1;
        let unrelated = reloadable_acceptor(&tls(other.path(), "other", vec![]))
            .unwrap()
            .1;
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(
            watch(vec![reloader.clone(), unrelated.clone()], shutdown.clone()).unwrap(),
        );

        // Renamed over, certificate then key.
        let new = write_pair(dir.path(), "server", "server.test");
        assert!(new != old);
        wait_serving(&reloader, "server.test", &new).await;

        // Overwritten in place, with a mismatched key: refused, the pair
        // before it still served.
        let key = std::fs::read(dir.path().join("server-key.pem")).unwrap();
        let newer = write_pair(dir.path(), "server", "server.test");
        std::fs::write(dir.path().join("server-key.pem"), &key).unwrap();
        tokio::time::sleep(DEBOUNCE * 3).await;
        assert!(reloader.serving(Some("server.test")) == new);
        assert!(reloader.reload().is_err());
        // The other listener's files were never touched.
        assert!(unrelated.serving(None) == other_old);

        // Fixed: the watcher picks it up.
        let fixed = write_pair(dir.path(), "server", "server.test");
        assert!(fixed != newer);
        wait_serving(&reloader, "server.test", &fixed).await;

        shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("the watcher stops at shutdown")
            .unwrap();
    }

    #[cfg(unix)]
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sighup_reloads_every_listener() {
        let dir = tempfile::tempdir().unwrap();
        let old = write_pair(dir.path(), "server", "server.test");
        let reloader = reloadable_acceptor(&tls(dir.path(), "server", vec![]))
            .unwrap()
            .1;
        let shutdown = CancellationToken::new();
        // Installed before it is spawned: a SIGHUP from now on is caught.
        let task =
            tokio::spawn(reload_on_sighup(vec![reloader.clone()], shutdown.clone()).unwrap());

        // In place, without a watcher: only the signal reloads.
        let ck = rcgen::generate_simple_self_signed(vec!["server.test".to_string()]).unwrap();
        std::fs::write(dir.path().join("server.pem"), ck.cert.pem()).unwrap();
        std::fs::write(
            dir.path().join("server-key.pem"),
            ck.signing_key.serialize_pem(),
        )
        .unwrap();
        tokio::time::sleep(DEBOUNCE * 2).await;
        assert!(reloader.serving(None) == old);
        // SAFETY: signals this very process, whose SIGHUP is handled above.
        assert_eq!(unsafe { libc::kill(libc::getpid(), libc::SIGHUP) }, 0);
        wait_serving(&reloader, "server.test", ck.cert.der()).await;

        shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("the SIGHUP task stops at shutdown")
            .unwrap();
    }

    #[test]
    fn reload_all_reports_each_listener() {
        let dir = tempfile::tempdir().unwrap();
        write_pair(dir.path(), "good", "good.test");
        write_pair(dir.path(), "bad", "bad.test");
        let good = reloadable_acceptor(&tls(dir.path(), "good", vec![]))
            .unwrap()
            .1;
        let bad = reloadable_acceptor(&tls(dir.path(), "bad", vec![]))
            .unwrap()
            .1;
        std::fs::remove_file(dir.path().join("bad-key.pem")).unwrap();
        let new_good = write_pair(dir.path(), "good", "good.test");
        let results = reload_all(&[good.clone(), bad]);
        assert!(results[0].as_ref().unwrap().changed);
        let err = results[1].as_ref().unwrap_err().to_string();
        assert!(err.starts_with("cannot read private key"), "{err}");
        assert!(err.contains("bad-key.pem"), "{err}");
        assert!(good.serving(None) == new_good);
    }
}
