//! The graph's persistent view: peer nodes and tunnels.
//!
//! Why: Coder's HA coordinator keeps the same facts in PostgreSQL (`tailnet_peers`,
//! `tailnet_tunnels`). The pure model ([`super::State`], compiled for tests only) talks to this
//! trait only. The trait holds exactly what the model calls, nothing more.
//!
//! The concurrent [`crate::graph::PeerGraph`] does not go through this trait: it keeps the same facts
//! split across its shards (each peer's node and tunnels in that peer's shard, see [`crate::graph`]), so
//! that no store-wide lock sits on the update path. A PostgreSQL store for HA will attach there as
//! a write-behind observer of those per-shard changes (answer from memory, persist through its own
//! bounded queue), not as a lock-holding backend.
//!
//! Contract: methods are synchronous and must not block on I/O.

use std::collections::{HashMap, HashSet};

use proto::tailnet::v2::Node;
use uuid::Uuid;

/// Why a peer left (mirrors Coder's `tailnet_status` and the update kind peers receive).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PeerGone {
    /// Graceful `disconnect`, or removal after a failed update.
    Disconnected,
    /// Stream ended without `disconnect`, fatal error, or coordinator shutdown.
    Lost,
    /// A newer connection with the same id took over; its node is unknown until it sends one.
    Replaced,
}

/// Storage for peer nodes and tunnels. Tunnels are directed (`src` opened it towards `dst`).
pub trait Store: Send + 'static {
    /// Records `peer`'s latest node.
    fn upsert_node(&mut self, peer: Uuid, node: &Node);
    /// The latest node of a connected peer.
    fn node(&self, peer: Uuid) -> Option<&Node>;
    /// Forgets `peer`'s node (it left; `how` says why, for stores that keep lost rows).
    fn remove_peer(&mut self, peer: Uuid, how: PeerGone);
    /// Records the tunnel `src → dst`. Returns false if it already existed.
    fn add_tunnel(&mut self, src: Uuid, dst: Uuid) -> bool;
    /// Deletes the tunnel `src → dst`. Returns false if it did not exist.
    fn remove_tunnel(&mut self, src: Uuid, dst: Uuid) -> bool;
    /// Deletes every tunnel whose source is `src`; returns their destinations.
    fn remove_tunnels_from(&mut self, src: Uuid) -> Vec<Uuid>;
    /// Every peer sharing a tunnel with `peer` in either direction, each once.
    fn tunnel_peers(&self, peer: Uuid) -> Vec<Uuid>;
    /// Whether a tunnel exists between `a` and `b` in either direction.
    fn tunnel_between(&self, a: Uuid, b: Uuid) -> bool;
    /// Number of directed tunnels.
    fn tunnel_count(&self) -> usize;
}

/// In-memory store: the AGPL coordinator's `tunnelStore` plus nodes.
#[derive(Debug, Default)]
pub struct MemoryStore {
    nodes: HashMap<Uuid, Node>,
    by_src: HashMap<Uuid, HashSet<Uuid>>,
    by_dst: HashMap<Uuid, HashSet<Uuid>>,
    tunnels: usize,
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }
}

fn remove_from(map: &mut HashMap<Uuid, HashSet<Uuid>>, key: Uuid, val: Uuid) -> bool {
    let Some(set) = map.get_mut(&key) else {
        return false;
    };
    let removed = set.remove(&val);
    if set.is_empty() {
        map.remove(&key);
    }
    removed
}

impl Store for MemoryStore {
    fn upsert_node(&mut self, peer: Uuid, node: &Node) {
        self.nodes.insert(peer, node.clone());
    }

    fn node(&self, peer: Uuid) -> Option<&Node> {
        self.nodes.get(&peer)
    }

    fn remove_peer(&mut self, peer: Uuid, _how: PeerGone) {
        self.nodes.remove(&peer);
    }

    fn add_tunnel(&mut self, src: Uuid, dst: Uuid) -> bool {
        let new = self.by_src.entry(src).or_default().insert(dst);
        self.by_dst.entry(dst).or_default().insert(src);
        if new {
            self.tunnels += 1;
        }
        new
    }

    fn remove_tunnel(&mut self, src: Uuid, dst: Uuid) -> bool {
        let removed = remove_from(&mut self.by_src, src, dst);
        remove_from(&mut self.by_dst, dst, src);
        if removed {
            self.tunnels -= 1;
        }
        removed
    }

    fn remove_tunnels_from(&mut self, src: Uuid) -> Vec<Uuid> {
        let dsts: Vec<Uuid> = self
            .by_src
            .remove(&src)
            .map(|s| s.into_iter().collect())
            .unwrap_or_default();
        for dst in &dsts {
            remove_from(&mut self.by_dst, *dst, src);
        }
        self.tunnels -= dsts.len();
        dsts
    }

    fn tunnel_peers(&self, peer: Uuid) -> Vec<Uuid> {
        let mut out: Vec<Uuid> = Vec::new();
        let mut seen = HashSet::new();
        let outs = self.by_src.get(&peer).into_iter().flatten();
        let ins = self.by_dst.get(&peer).into_iter().flatten();
        for p in outs.chain(ins) {
            if seen.insert(*p) {
                out.push(*p);
            }
        }
        out
    }

    fn tunnel_between(&self, a: Uuid, b: Uuid) -> bool {
        let has = |s: Uuid, d: Uuid| self.by_src.get(&s).is_some_and(|set| set.contains(&d));
        has(a, b) || has(b, a)
    }

    fn tunnel_count(&self) -> usize {
        self.tunnels
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tunnels_both_directions() {
        let (a, b, c) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
        let mut s = MemoryStore::new();
        assert!(s.add_tunnel(a, b));
        assert!(!s.add_tunnel(a, b));
        assert!(s.add_tunnel(b, a));
        assert!(s.add_tunnel(c, a));
        assert_eq!(s.tunnel_count(), 3);
        let mut tp = s.tunnel_peers(a);
        tp.sort();
        let mut want = vec![b, c];
        want.sort();
        assert_eq!(tp, want);
        assert!(!s.tunnel_between(b, c) && s.tunnel_between(c, a));
        assert_eq!(s.remove_tunnels_from(a), vec![b]);
        assert_eq!(s.tunnel_count(), 2);
        assert!(s.tunnel_between(a, b)); // b → a remains
        assert!(s.remove_tunnel(b, a));
        assert!(!s.remove_tunnel(b, a));
        assert!(!s.tunnel_between(a, b));
        assert_eq!(s.tunnel_peers(a), vec![c]);
        assert_eq!(s.tunnel_count(), 1);
    }
}
