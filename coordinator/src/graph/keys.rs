//! Which WireGuard node keys the graph currently holds a node for: the answer to the relay's
//! admission question "may node key K connect?" (see the binary's relay admission).
//!
//! Why an index: the graph is keyed by peer id, and a node's key is only inside its node. A lookup
//! by key must be cheap (it runs for every relay connection) and must not lock the graph's shards.
//! This index counts, per key, the graph entries whose current node carries it: local peers'
//! nodes and remote peers' best nodes (the sidecar bridge's and other replicas'), because every
//! write of an entry's node goes through [`NodeKeyIndex::replace`]. A node update that keeps its
//! key (the usual case: endpoints or DERP latency changed) costs one 34-byte comparison and takes
//! no index lock.
//!
//! Lock order: an index shard's mutex is a leaf. It is taken while a graph shard may be held, and
//! nothing is locked or awaited while holding it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use proto::key::NodePublic;
use proto::tailnet::v2::Node;

/// Index shards (by the key's first byte; keys are uniformly random).
const SHARDS: usize = 16;

/// Node key → number of graph entries whose node carries it.
#[derive(Debug)]
pub(crate) struct NodeKeyIndex {
    shards: Box<[Mutex<HashMap<NodePublic, u32>>]>,
}

impl Default for NodeKeyIndex {
    fn default() -> Self {
        NodeKeyIndex {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
        }
    }
}

/// The node's key, if it carries a well-formed one (`"np"` + 32 bytes, not zero).
fn key_of(node: Option<&Arc<Node>>) -> Option<NodePublic> {
    let k = NodePublic::from_np_bytes(&node?.key).ok()?;
    (!k.is_zero()).then_some(k)
}

impl NodeKeyIndex {
    fn shard(&self, key: &NodePublic) -> MutexGuard<'_, HashMap<NodePublic, u32>> {
        let first = usize::from(key.as_bytes()[0]);
        self.shards[first % SHARDS]
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// Stores `new` in `slot` (an entry's node), keeping the index in step.
    pub(crate) fn replace(&self, slot: &mut Option<Arc<Node>>, new: Option<Arc<Node>>) {
        let same_key = match (slot.as_ref(), new.as_ref()) {
            (None, None) => true,
            (Some(a), Some(b)) => a.key == b.key,
            _ => false,
        };
        if !same_key {
            if let Some(old) = key_of(slot.as_ref()) {
                let mut m = self.shard(&old);
                if let Some(n) = m.get_mut(&old) {
                    *n -= 1;
                    if *n == 0 {
                        m.remove(&old);
                    }
                }
            }
            if let Some(k) = key_of(new.as_ref()) {
                *self.shard(&k).entry(k).or_insert(0) += 1;
            }
        }
        *slot = new;
    }

    /// Whether some entry's node carries `key`.
    pub(crate) fn contains(&self, key: &NodePublic) -> bool {
        self.shard(key).contains_key(key)
    }

    /// Distinct keys held (for tests and metrics).
    pub(crate) fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(|e| e.into_inner()).len())
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn node(k: &NodePublic, id: i64) -> Arc<Node> {
        Arc::new(Node {
            id,
            key: Bytes::copy_from_slice(&k.to_np_bytes()),
            ..Default::default()
        })
    }

    #[test]
    fn counts_entries_per_key_and_follows_key_changes() {
        let idx = NodeKeyIndex::default();
        let a = NodePublic::from_bytes([1; 32]);
        let b = NodePublic::from_bytes([2; 32]);
        let (mut x, mut y) = (None, None);
        idx.replace(&mut x, Some(node(&a, 1)));
        idx.replace(&mut y, Some(node(&a, 2)));
        assert!(idx.contains(&a));
        // Same key, new endpoints: nothing changes.
        idx.replace(&mut x, Some(node(&a, 3)));
        assert_eq!(idx.len(), 1);
        // One of two entries moves to another key: both known.
        idx.replace(&mut x, Some(node(&b, 4)));
        assert!(idx.contains(&a) && idx.contains(&b));
        idx.replace(&mut y, None);
        assert!(!idx.contains(&a));
        idx.replace(&mut x, None);
        assert_eq!(idx.len(), 0);
        // A malformed or zero key is never indexed.
        let mut z = None;
        idx.replace(
            &mut z,
            Some(Arc::new(Node {
                key: Bytes::from_static(b"short"),
                ..Default::default()
            })),
        );
        idx.replace(&mut z, Some(node(&NodePublic::ZERO, 5)));
        assert_eq!(idx.len(), 0);
    }

    /// Through the graph's public API: a local peer's node, a remote source's peer, and both
    /// going away.
    #[test]
    fn graph_knows_local_and_remote_node_keys() {
        use crate::authz::CoordinateeAuth;
        use crate::graph::{GraphConfig, PeerGraph};
        use proto::tailnet::v2::coordinate_request::UpdateSelf;
        use proto::tailnet::v2::CoordinateRequest;

        let g = PeerGraph::with_shards(GraphConfig::default(), 4, &prometheus::Registry::new())
            .unwrap();
        let (local, remote) = (
            NodePublic::from_bytes([7; 32]),
            NodePublic::from_bytes([8; 32]),
        );
        let agent = uuid::Uuid::from_u128(1);
        let (h, _rx) = g.connect(agent, "agent".into(), CoordinateeAuth::Agent { id: agent });
        assert!(!g.knows_node_key(&local), "connected without a node yet");
        let req = CoordinateRequest {
            update_self: Some(UpdateSelf {
                node: Some((*node(&local, 1)).clone()),
            }),
            ..Default::default()
        };
        g.handle(&h, req).unwrap();
        assert!(g.knows_node_key(&local));
        let (mut source, _events) = g.remote_source(16);
        source.upsert_node(uuid::Uuid::from_u128(2), (*node(&remote, 2)).clone());
        assert!(g.knows_node_key(&remote));
        drop(source);
        assert!(
            !g.knows_node_key(&remote),
            "the source's peers left with it"
        );
        drop(h);
        assert!(!g.knows_node_key(&local));
        assert_eq!(g.node_key_count(), 0);
    }
}
