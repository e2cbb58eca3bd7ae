//! Reading `/proc`'s `NAME: N kB` lines (the density and swap benches).

/// The `NAME: N kB` line's N in a `/proc` file's `text`; 0 if missing.
pub fn kib(text: &str, name: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}
