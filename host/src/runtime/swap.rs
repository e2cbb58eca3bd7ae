//! Whether this process's memory can be swapped out, which decides whether
//! a pool slot may be reset in place (`plugin.memory_reset = "in-place"`).
//!
//! The in-place reset finds the pages a finished instance wrote with
//! `PAGEMAP_SCAN` and restores only those. wasmtime 48 asks the scan for
//! pages that are present, so a written page the kernel has swapped out is
//! neither restored nor returned to the OS: the slot's next instance,
//! perhaps another tenant's, would read it (bytecodealliance/wasmtime#14357;
//! fixed in 48.0.11, not yet resolvable here: see the README's
//! `memory_reset`). So the reset in place is only for a process that cannot
//! swap.

use std::path::{Path, PathBuf};

/// Why this process's pages can, or cannot, be swapped out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Swap {
    /// A cgroup on the process's path forbids swap (`memory.swap.max` is
    /// 0): holds whatever devices are added later, until the limit is
    /// raised.
    ForbiddenByCgroup(PathBuf),
    /// No swap device exists now. Holds until an administrator runs
    /// `swapon`.
    NoDevice,
    /// This many swap devices (zram and zswap's backing ones included)
    /// and no cgroup limit against them.
    Possible { devices: usize },
}

impl Swap {
    /// Probes `/proc` and `/sys/fs/cgroup` (cgroup v2).
    pub fn probe() -> Self {
        let cgroup = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
        if let Some(path) = forbidding_cgroup(&cgroup, Path::new("/sys/fs/cgroup"), |p| {
            std::fs::read_to_string(p).ok()
        }) {
            return Swap::ForbiddenByCgroup(path);
        }
        match swap_devices() {
            0 => Swap::NoDevice,
            devices => Swap::Possible { devices },
        }
    }

    pub fn possible(&self) -> bool {
        matches!(self, Swap::Possible { .. })
    }
}

impl std::fmt::Display for Swap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Swap::ForbiddenByCgroup(p) => write!(f, "{}: memory.swap.max is 0", p.display()),
            Swap::NoDevice => f.write_str("no swap device (/proc/swaps)"),
            Swap::Possible { devices } => write!(
                f,
                "{devices} swap device(s) in /proc/swaps and no cgroup with memory.swap.max = 0"
            ),
        }
    }
}

/// Swap devices in `/proc/swaps` (a header line, then one per device);
/// 0 if it cannot be read (no swap support compiled in).
fn swap_devices() -> usize {
    std::fs::read_to_string("/proc/swaps").map_or(0, |s| count_devices(&s))
}

fn count_devices(proc_swaps: &str) -> usize {
    proc_swaps
        .lines()
        .skip(1)
        .filter(|l| !l.trim().is_empty())
        .count()
}

/// The cgroup v2 directory, on the process's path from its own group up to
/// the root, whose `memory.swap.max` is 0. `proc_self_cgroup` is
/// `/proc/self/cgroup`; its v2 line is `0::/path`.
fn forbidding_cgroup(
    proc_self_cgroup: &str,
    root: &Path,
    read: impl Fn(&Path) -> Option<String>,
) -> Option<PathBuf> {
    let path = proc_self_cgroup
        .lines()
        .find_map(|l| l.strip_prefix("0::"))?
        .trim();
    let mut dir = root.join(path.trim_start_matches('/'));
    loop {
        if read(&dir.join("memory.swap.max")).is_some_and(|v| v.trim() == "0") {
            return Some(dir);
        }
        if dir == root || !dir.pop() || !dir.starts_with(root) {
            return None;
        }
    }
}

/// Re-probes every `every` and, once swap has become possible (a `swapon`,
/// or the cgroup's limit raised), logs an error and calls `exposed`: from
/// then on, a swapped-out page could outlive its instance (see the
/// module). Returns then, or when `stop` is cancelled.
pub async fn watch(
    every: std::time::Duration,
    stop: tokio_util::sync::CancellationToken,
    exposed: impl FnOnce(),
) {
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
        let now = Swap::probe();
        if now.possible() {
            tracing::error!(
                swap = %now,
                "swap became possible after start-up while plugin.memory_reset is \"in-place\": a \
                 page swapped out of a finished instance could reach the next instance in its \
                 pool slot; restart wharf (it will refuse \"in-place\") or forbid swap to its \
                 cgroup (memory.swap.max = 0)"
            );
            exposed();
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_are_the_lines_after_the_header() {
        let none = "Filename\t\t\t\tType\t\tSize\t\tUsed\t\tPriority\n";
        assert_eq!(count_devices(none), 0);
        let two =
            format!("{none}/swapfile file 1048572 0 -2\n/dev/zram0 partition 4194300 0 100\n");
        assert_eq!(count_devices(&two), 2);
        assert_eq!(count_devices(""), 0);
    }

    #[test]
    fn a_cgroup_on_the_path_that_forbids_swap_is_found() {
        let root = Path::new("/sys/fs/cgroup");
        let files = |forbidding: &'static str| {
            move |p: &Path| {
                (p == Path::new(forbidding))
                    .then(|| "0\n".to_owned())
                    .or(Some("max\n".into()))
            }
        };
        let cgroup = "0::/system.slice/wharf.service\n";
        assert_eq!(
            forbidding_cgroup(
                cgroup,
                root,
                files("/sys/fs/cgroup/system.slice/memory.swap.max")
            ),
            Some(PathBuf::from("/sys/fs/cgroup/system.slice"))
        );
        assert_eq!(
            forbidding_cgroup(
                cgroup,
                root,
                files("/sys/fs/cgroup/system.slice/wharf.service/memory.swap.max")
            ),
            Some(PathBuf::from("/sys/fs/cgroup/system.slice/wharf.service"))
        );
        assert_eq!(forbidding_cgroup(cgroup, root, files("/elsewhere")), None);
        // cgroup v1 only (no `0::` line), or no cgroup file: nothing forbids.
        assert_eq!(
            forbidding_cgroup(
                "4:memory:/x\n",
                root,
                files("/sys/fs/cgroup/memory.swap.max")
            ),
            None
        );
        assert_eq!(forbidding_cgroup("", root, |_| None), None);
    }
}
