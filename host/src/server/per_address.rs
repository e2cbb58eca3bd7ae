//! Connections per client address: pending handshakes and open connections
//! counted per address, each with an optional cap, so that one client
//! cannot take every handshake place or every connection.
//!
//! An IPv6 client is counted by its /64: a host is commonly given a whole
//! /64, and counting single addresses would let it pick a fresh one per
//! socket. IPv4 addresses (and IPv4-mapped IPv6 ones) count one by one.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

/// Who a connection is counted as.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum ClientKey {
    V4(u32),
    /// The /64 prefix.
    V6(u64),
}

impl ClientKey {
    pub fn of(ip: IpAddr) -> Self {
        match ip {
            IpAddr::V4(v4) => Self::V4(v4.into()),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => Self::V4(v4.into()),
                None => Self::V6((u128::from(v6) >> 64) as u64),
            },
        }
    }
}

#[derive(Default)]
struct Counts {
    pending: usize,
    open: usize,
}

/// The per-address counts and their caps (0: no cap).
pub(crate) struct PerAddress {
    max_pending: usize,
    max_open: usize,
    counts: Mutex<HashMap<ClientKey, Counts>>,
}

/// A connection's place in its address's counts: pending until
/// [`open`](Self::open), released when dropped.
pub(crate) struct AddressPlace {
    key: ClientKey,
    open: bool,
    table: Arc<PerAddress>,
}

impl PerAddress {
    pub fn new(max_pending: usize, max_open: usize) -> Arc<Self> {
        Arc::new(Self {
            max_pending,
            max_open,
            counts: Mutex::default(),
        })
    }

    /// A pending handshake's place for `ip`; `None` if the address already
    /// has `max_pending` handshakes under way.
    pub fn admit(self: &Arc<Self>, ip: IpAddr) -> Option<AddressPlace> {
        let key = ClientKey::of(ip);
        let mut counts = self.lock();
        let c = counts.entry(key).or_default();
        if self.max_pending != 0 && c.pending >= self.max_pending {
            return None;
        }
        c.pending += 1;
        Some(AddressPlace {
            key,
            open: false,
            table: self.clone(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<ClientKey, Counts>> {
        self.counts.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl AddressPlace {
    /// The handshake succeeded: the place counts as an open connection,
    /// unless the address has `max_open` already (`false`, still pending).
    pub fn open(&mut self) -> bool {
        if self.open {
            return true;
        }
        let mut counts = self.table.lock();
        let c = counts.entry(self.key).or_default();
        if self.table.max_open != 0 && c.open >= self.table.max_open {
            return false;
        }
        c.pending = c.pending.saturating_sub(1);
        c.open += 1;
        self.open = true;
        true
    }
}

impl Drop for AddressPlace {
    fn drop(&mut self) {
        let mut counts = self.table.lock();
        if let Some(c) = counts.get_mut(&self.key) {
            if self.open {
                c.open = c.open.saturating_sub(1);
            } else {
                c.pending = c.pending.saturating_sub(1);
            }
            // No entry outlives its last connection: the table holds only
            // addresses connected now.
            if c.open == 0 && c.pending == 0 {
                counts.remove(&self.key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn pending_and_open_are_capped_per_address() {
        let table = PerAddress::new(2, 1);
        let a = table.admit(ip("10.0.0.1")).unwrap();
        let mut b = table.admit(ip("10.0.0.1")).unwrap();
        assert!(table.admit(ip("10.0.0.1")).is_none(), "third pending");
        let mut other = table.admit(ip("10.0.0.2")).unwrap();
        assert!(b.open());
        // b no longer pending: room for another handshake, none for another open.
        let mut c = table.admit(ip("10.0.0.1")).unwrap();
        assert!(!c.open(), "second open");
        assert!(other.open());
        drop(b);
        assert!(c.open());
        drop((a, c, other));
        assert!(table.lock().is_empty(), "entries go with their connections");
    }

    #[test]
    fn ipv6_counts_by_its_64_and_mapped_ipv4_as_ipv4() {
        assert_eq!(
            ClientKey::of(ip("2001:db8:1:2::1")),
            ClientKey::of(ip("2001:db8:1:2:ffff::9"))
        );
        assert_ne!(
            ClientKey::of(ip("2001:db8:1:2::1")),
            ClientKey::of(ip("2001:db8:1:3::1"))
        );
        assert_eq!(
            ClientKey::of(ip("::ffff:10.0.0.1")),
            ClientKey::of(ip("10.0.0.1"))
        );
        assert_ne!(ClientKey::of(ip("::1")), ClientKey::of(ip("0.0.0.1")));
    }

    #[test]
    fn zero_means_no_cap() {
        let table = PerAddress::new(0, 0);
        let places: Vec<_> = (0..100)
            .map(|_| table.admit(ip("10.0.0.1")).unwrap())
            .collect();
        for mut p in places {
            assert!(p.open());
        }
    }
}
