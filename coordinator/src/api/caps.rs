//! Caps on concurrent coordination sessions: per user (client sessions on `/api/v2/tailnet` and
//! `/api/v2/workspaceagents/{id}/coordinate`) and per agent id (`/me/coordinate` and `/me/rpc`).
//!
//! Why: every session may hold a node (up to `node_max_bytes`), a bounded outbox and bounded
//! transport buffers; without a cap on sessions, one account multiplies those per-session bounds
//! by as many sockets as it can open (issue 14: twenty sessions of one user took the process
//! from 73 MB to 1 GB). Coder itself has no such cap (only its API rate limit of 512 requests a
//! minute per user); the defaults here are far above what real clients open.
//!
//! A slot is taken before the WebSocket upgrade (so a refused request costs one HTTP answer: 429
//! in Coder's JSON error shape) and released by [`SessionSlot`]'s `Drop`, which runs on every
//! way a session ends (normal close, error, upgrade failure, task cancellation). The count lives
//! under a `std` mutex taken for a map update only, never across `.await`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use prometheus::{IntCounterVec, IntGaugeVec, Opts, Registry};
use uuid::Uuid;

/// Default [`crate::CoordinatorConfig::max_sessions_per_user`]: a developer with many IDE
/// windows, terminals and port-forwards open holds a few dozen client sessions (one per
/// workspace connection per tool, plus Coder Desktop's one); 256 leaves ample room while bounding
/// what one account can make the process hold.
pub const DEFAULT_MAX_SESSIONS_PER_USER: usize = 256;
/// Default [`crate::CoordinatorConfig::max_sessions_per_agent`]: an agent holds one coordination
/// session (plus, for a few seconds while it reconnects, the one being replaced); 8 tolerates a
/// flapping network without letting one agent token open sessions without end.
pub const DEFAULT_MAX_SESSIONS_PER_AGENT: usize = 8;

/// Which cap a session counts against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CapKind {
    /// Client sessions of one user.
    User,
    /// Coordination sessions of one agent id.
    Agent,
}

impl CapKind {
    /// Metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            CapKind::User => "user",
            CapKind::Agent => "agent",
        }
    }
}

/// One cap: live sessions per key.
#[derive(Debug)]
struct Counter {
    limit: usize,
    live: Mutex<HashMap<Uuid, usize>>,
    /// `coordinator_capped_sessions{kind}`: sessions counted against this cap right now.
    gauge: prometheus::IntGauge,
}

/// A session's place under its cap; dropping it gives the place back.
#[derive(Debug)]
pub struct SessionSlot {
    counter: Arc<Counter>,
    key: Uuid,
}

impl Drop for SessionSlot {
    fn drop(&mut self) {
        let mut live = self.counter.live.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = live.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                live.remove(&self.key);
            }
        }
        drop(live);
        self.counter.gauge.dec();
    }
}

/// A session over its cap.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{} already has {limit} concurrent coordination sessions, the limit", .kind.as_str())]
pub struct OverCap {
    /// Which cap.
    pub kind: CapKind,
    /// Its value.
    pub limit: usize,
}

/// Both caps and their metrics.
#[derive(Debug, Clone)]
pub struct SessionCaps {
    user: Arc<Counter>,
    agent: Arc<Counter>,
    /// `coordinator_sessions_over_cap_total{kind}`: requests refused with 429.
    refused: IntCounterVec,
}

impl SessionCaps {
    /// Caps of `per_user` and `per_agent` (each at least 1), metrics registered on `registry`.
    pub fn new(
        per_user: usize,
        per_agent: usize,
        registry: &Registry,
    ) -> Result<Self, prometheus::Error> {
        let live = IntGaugeVec::new(
            Opts::new(
                "coordinator_capped_sessions",
                "Coordination sessions counted against the per-user and per-agent caps",
            ),
            &["kind"],
        )?;
        let refused = IntCounterVec::new(
            Opts::new(
                "coordinator_sessions_over_cap_total",
                "Coordination requests refused with 429 because the user or agent had the maximum number of concurrent sessions",
            ),
            &["kind"],
        )?;
        let counter = |kind: CapKind, limit: usize| {
            refused.with_label_values(&[kind.as_str()]);
            Arc::new(Counter {
                limit: limit.max(1),
                live: Mutex::new(HashMap::new()),
                gauge: live.with_label_values(&[kind.as_str()]),
            })
        };
        let caps = Self {
            user: counter(CapKind::User, per_user),
            agent: counter(CapKind::Agent, per_agent),
            refused: refused.clone(),
        };
        registry.register(Box::new(live))?;
        registry.register(Box::new(refused))?;
        Ok(caps)
    }

    /// Takes a place for one more session of `key` under the `kind` cap, or says why not
    /// (counted).
    pub fn acquire(&self, kind: CapKind, key: Uuid) -> Result<SessionSlot, OverCap> {
        let counter = match kind {
            CapKind::User => &self.user,
            CapKind::Agent => &self.agent,
        };
        {
            let mut live = counter.live.lock().unwrap_or_else(|p| p.into_inner());
            let n = live.entry(key).or_insert(0);
            if *n >= counter.limit {
                drop(live);
                self.refused.with_label_values(&[kind.as_str()]).inc();
                return Err(OverCap {
                    kind,
                    limit: counter.limit,
                });
            }
            *n += 1;
        }
        counter.gauge.inc();
        Ok(SessionSlot {
            counter: counter.clone(),
            key,
        })
    }

    /// Live sessions of `key` under the `kind` cap.
    pub fn live(&self, kind: CapKind, key: Uuid) -> usize {
        let counter = match kind {
            CapKind::User => &self.user,
            CapKind::Agent => &self.agent,
        };
        let live = counter.live.lock().unwrap_or_else(|p| p.into_inner());
        live.get(&key).copied().unwrap_or(0)
    }
}

impl Counter {
    #[cfg(test)]
    fn keys(&self) -> usize {
        self.live.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_counted_exactly_and_released_on_drop() {
        let caps = SessionCaps::new(2, 1, &Registry::new()).unwrap();
        let u = Uuid::from_u128(1);
        let a = caps.acquire(CapKind::User, u).unwrap();
        let b = caps.acquire(CapKind::User, u).unwrap();
        assert_eq!(
            caps.acquire(CapKind::User, u).unwrap_err(),
            OverCap {
                kind: CapKind::User,
                limit: 2
            }
        );
        // Another user and the agent cap are separate.
        let other = caps.acquire(CapKind::User, Uuid::from_u128(2)).unwrap();
        let agent = caps.acquire(CapKind::Agent, u).unwrap();
        assert!(caps.acquire(CapKind::Agent, u).is_err());
        drop(a);
        let c = caps.acquire(CapKind::User, u).unwrap();
        assert_eq!(caps.live(CapKind::User, u), 2);
        drop((b, c, other, agent));
        assert_eq!(caps.live(CapKind::User, u), 0);
        assert_eq!(
            caps.user.keys(),
            0,
            "no entry is kept for a key without sessions"
        );
        assert_eq!(caps.agent.keys(), 0);
        assert_eq!(caps.user.gauge.get(), 0);
        assert_eq!(caps.refused.with_label_values(&["user"]).get(), 1);
        assert_eq!(caps.refused.with_label_values(&["agent"]).get(), 1);
    }

    #[test]
    fn concurrent_acquires_never_exceed_the_cap() {
        let caps = SessionCaps::new(5, 1, &Registry::new()).unwrap();
        let key = Uuid::from_u128(7);
        let held: Vec<Vec<SessionSlot>> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..8)
                .map(|_| {
                    s.spawn(|| {
                        (0..10)
                            .filter_map(|_| caps.acquire(CapKind::User, key).ok())
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert_eq!(held.iter().map(Vec::len).sum::<usize>(), 5);
        assert_eq!(caps.refused.with_label_values(&["user"]).get(), 75);
        drop(held);
        assert_eq!(caps.live(CapKind::User, key), 0);
        assert_eq!(caps.user.gauge.get(), 0);
    }
}
