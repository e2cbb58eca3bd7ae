//! Redeploying a tenant when its plugin file changes (`wharf serve
//! --watch`, or `watch = true` in its `[[tenant]]` table): the same
//! compile, check and swap as a deploy through the admin API, with the
//! default policy (`drain`). A broken file is logged and ignored; the
//! running version keeps serving.
//!
//! Build tools and editors replace a file in several steps (truncate and
//! write, or write a temporary file and rename it), so the parent
//! directories are watched and a tenant is redeployed once its file has
//! been quiet for [`SETTLE`].

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use notify::{RecursiveMode, Watcher as _};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::Tenants;
use super::swap::Policy;

/// How long a file must stay unchanged before it is redeployed.
pub const SETTLE: Duration = Duration::from_millis(300);

/// Watches each `(tenant, plugin file)` and redeploys the tenant when its
/// file changes, until `shutdown`. Errors only if a directory cannot be
/// watched.
pub fn spawn(
    tenants: Arc<Tenants>,
    files: Vec<(String, PathBuf)>,
    shutdown: CancellationToken,
) -> notify::Result<()> {
    if files.is_empty() {
        return Ok(());
    }
    // Bounded: events are coalesced per file below, so a full channel only
    // drops duplicates of a change already pending.
    let (tx, mut rx) = mpsc::channel::<PathBuf>(256);
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        if let Ok(event) = event
            && (event.kind.is_create() || event.kind.is_modify())
        {
            for path in event.paths {
                let _ = tx.try_send(path);
            }
        }
    })?;
    let mut dirs = HashSet::new();
    for (_, file) in &files {
        let dir = file
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        if dirs.insert(dir.to_owned()) {
            watcher.watch(dir, RecursiveMode::NonRecursive)?;
        }
    }
    let by_file: HashMap<PathBuf, String> = files
        .iter()
        .map(|(tenant, file)| (absolute(file), tenant.clone()))
        .collect();
    tracing::info!(
        files = by_file.len(),
        "watching plugin files; a change redeploys its tenant"
    );
    tokio::spawn(async move {
        // The watcher lives as long as this task.
        let _watcher = watcher;
        let mut pending: HashSet<PathBuf> = HashSet::new();
        loop {
            let settle = tokio::time::sleep(SETTLE);
            tokio::select! {
                () = shutdown.cancelled() => return,
                changed = rx.recv() => match changed {
                    Some(path) => {
                        let path = absolute(&path);
                        if by_file.contains_key(&path) {
                            pending.insert(path);
                        }
                    }
                    None => return,
                },
                () = settle, if !pending.is_empty() => {
                    for path in pending.drain() {
                        let tenant = by_file[&path].clone();
                        redeploy(&tenants, tenant, path).await;
                    }
                }
            }
        }
    });
    Ok(())
}

async fn redeploy(tenants: &Arc<Tenants>, tenant: String, path: PathBuf) {
    let tenants = tenants.clone();
    let result = tokio::task::spawn_blocking(move || {
        let (name, bytes) = crate::runtime::read_plugin(&path)?;
        anyhow::Ok(tenants.deploy(&tenant, &name, &bytes, Policy::Drain)?)
    })
    .await;
    match result {
        Ok(Ok(outcome)) => {
            tracing::info!(
                tenant = outcome.tenant,
                sha256 = &outcome.sha256[..16],
                "plugin file changed: redeployed"
            )
        }
        Ok(Err(err)) => {
            tracing::warn!(
                err = format!("{err:#}"),
                "plugin file changed but cannot be deployed; the running version keeps serving"
            )
        }
        Err(err) => tracing::error!(%err, "redeploy task failed"),
    }
}

/// `path` made absolute against the working directory (without resolving
/// symlinks, which a rename may be replacing).
fn absolute(path: &Path) -> PathBuf {
    std::path::absolute(path).unwrap_or_else(|_| path.to_owned())
}
