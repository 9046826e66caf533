//! Fits the connection caps under the process's open-file limit (`RLIMIT_NOFILE`).
//!
//! Why: every accepted connection is a file descriptor. A cap above the limit means that a flood
//! of connections makes `accept` fail with "too many open files", and then nothing is served:
//! not `/healthz`, not a new DERP handshake, not a coordinator dial, not the Coder UI behind the
//! sidecar. So at start-up the soft limit is raised to the hard limit where allowed, and the caps
//! are derived from what is left:
//!
//! - a reserve `R` = min(512, limit / 4), at least 16, is never used by the listeners (upstream dials, the
//!   key and certificate files, the process's own descriptors);
//! - the listeners together accept at most `limit - R` connections, so `accept` itself never
//!   runs out of descriptors. They draw on one shared pool rather than an even split: a relay
//!   whose clients all arrive on HTTPS (the usual case: port 80 only answers captive-portal
//!   checks) can use every descriptor, as derper can;
//! - relay (DERP) connections stop at `min(max_connections, limit - 2R)`: the `R` descriptors
//!   between the relay's cap and the listeners' cap keep health, readiness and coordination
//!   requests served while the relay is full (new relay upgrades get a quick 503).
//!
//! Must never: lower the hard limit, or raise a cap the operator set.

/// Connections a listener accepts beyond the relay's cap, so that health, readiness and
/// coordination requests are served while the relay is full.
pub const HTTP_HEADROOM: usize = 1024;

/// Descriptors kept out of every listener's reach, at least.
const MIN_RESERVE: u64 = 16;

/// Descriptors kept out of every listener's reach, at most.
const MAX_RESERVE: u64 = 512;

/// The caps that fit under an open-file limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FdBudget {
    /// The soft open-file limit the caps were computed from (after any raise).
    pub open_file_limit: u64,
    /// Descriptors no listener uses.
    pub reserve: u64,
    /// Connections all listeners together may hold (HTTP and relay alike): one pool.
    pub listeners_cap: usize,
    /// Cap on relay (DERP) connections of the process.
    pub relay_cap: usize,
}

/// The caps under `open_file_limit`, given the operator's `max_connections` (relay). `None` if the
/// limit is too small to leave even one relay connection.
pub fn budget(open_file_limit: u64, max_connections: usize) -> Option<FdBudget> {
    let reserve = MAX_RESERVE.min(open_file_limit / 4).max(MIN_RESERVE);
    let usable = open_file_limit.checked_sub(reserve)?;
    let relay = usable.checked_sub(reserve)?;
    if relay == 0 {
        return None;
    }
    let clamp = |n: u64| usize::try_from(n).unwrap_or(usize::MAX);
    Some(FdBudget {
        open_file_limit,
        reserve,
        listeners_cap: clamp(usable),
        relay_cap: max_connections.min(clamp(relay)),
    })
}

/// Raises the soft open-file limit to the hard limit where allowed and returns the soft limit
/// now in force (`None` = unlimited or unknown: nothing to fit under).
pub fn raise_open_file_limit() -> Option<u64> {
    use rustix::process::{getrlimit, setrlimit, Resource};
    let limit = getrlimit(Resource::Nofile);
    let soft = limit.current?;
    if limit.maximum.is_none_or(|hard| hard > soft) {
        let mut raised = limit;
        raised.current = limit.maximum;
        match setrlimit(Resource::Nofile, raised) {
            Ok(()) => {
                let now = getrlimit(Resource::Nofile).current;
                tracing::info!(from = soft, to = ?now, "raised the open-file limit");
                return now;
            }
            Err(e) => {
                tracing::info!(limit = soft, error = %e, "could not raise the open-file limit");
            }
        }
    }
    Some(soft)
}

#[cfg(test)]
mod fdlimit_tests {
    use super::*;

    #[test]
    fn fdlimit_budget_keeps_reserves() {
        let b = budget(256, 100_000).unwrap();
        assert_eq!(b.reserve, 64);
        assert_eq!(b.listeners_cap, 192);
        assert_eq!(b.relay_cap, 128);
        let b = budget(1 << 20, 100_000).unwrap();
        assert_eq!(b.reserve, 512);
        assert_eq!(b.relay_cap, 100_000);
        let b = budget(20_000, 100_000).unwrap();
        assert_eq!(b.relay_cap, 20_000 - 1024);
        assert_eq!(b.listeners_cap, 20_000 - 512);
        assert!(budget(1, 10).is_none());
    }
}
