//! The graph's shards and the only ways to lock them.
//!
//! Why: a node update must not wait for updates of unrelated peers, so the peer table is split by
//! peer-id hash into shards, each behind its own mutex. Everything the graph knows about peer X —
//! its connection, its node, its tunnels in both directions, and (cached) the connection of each
//! tunnel peer — lives in X's shard. See [`super`] for the invariants and the ordering argument.
//!
//! Lock order (the only one; deadlock freedom rests on it): shard mutexes in increasing index
//! order, then at most one outbox mutex (a leaf). This module is the only place that locks shards;
//! it never locks a shard while holding a shard of higher or equal index, and it never waits with
//! a lock held (no I/O, no `.await`, no blocking call other than taking these mutexes).

use std::collections::hash_map::RandomState;
use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use proto::tailnet::v2::Node;
use uuid::Uuid;

use super::core::ConnId;
use super::outbox::Outbox;
use super::remote::{RemotePeer, SourceSink};
use crate::authz::CoordinateeAuth;

/// One connection of one peer.
#[derive(Debug)]
#[repr(C)]
pub(crate) struct Conn {
    /// Its response queue, embedded (first, cache-line aligned) so that a fan-out reaches it in
    /// one pointer hop from the link.
    pub(crate) outbox: Outbox,
    pub(crate) id: ConnId,
    /// The peer id as wire bytes, shared by every update about this peer.
    pub(crate) id_bytes: Bytes,
    pub(crate) name: String,
    pub(crate) auth: CoordinateeAuth,
}

/// The relation between a peer and one tunnel peer, seen from the peer's shard.
#[derive(Debug)]
pub(crate) struct Link {
    /// Tunnel self → other exists.
    pub(crate) out: bool,
    /// Tunnel other → self exists.
    pub(crate) inc: bool,
    /// The other peer's current connection (invariant I1 in [`super`]).
    pub(crate) conn: Option<Arc<Conn>>,
    /// The other peer is a remote peer (its tunnel to this one was added by a remote source):
    /// READY_FOR_HANDSHAKE to it goes to this peer's watchers (see [`super::remote`]).
    pub(crate) via_remote: bool,
}

/// Everything about one peer id. Present while the peer is connected or has any tunnel.
#[derive(Debug, Default)]
pub(crate) struct Entry {
    pub(crate) conn: Option<Arc<Conn>>,
    /// The latest node of the current connection (`None` until it sends one).
    pub(crate) node: Option<Arc<Node>>,
    /// Encoded size of `node` while it is a local connection's node (0 otherwise); what the
    /// graph's `coordinator_graph_node_bytes` accounts for this entry.
    pub(crate) node_bytes: usize,
    /// When the current connection last sent a node (`None` until it does; status page).
    pub(crate) updated_at: Option<std::time::Instant>,
    pub(crate) links: HashMap<Uuid, Link>,
    /// Set while remote sources report this peer (see [`super::remote`]); `node` is then the best
    /// binding's node.
    pub(crate) remote: Option<Box<RemotePeer>>,
    /// Remote sources that pass on what this (local) peer does.
    pub(crate) watchers: Vec<Arc<SourceSink>>,
}

impl Entry {
    /// Whether `conn` is this peer's live connection.
    pub(crate) fn is_current(&self, conn: ConnId) -> bool {
        self.conn.as_ref().is_some_and(|c| c.id == conn)
    }

    fn is_empty(&self) -> bool {
        self.conn.is_none()
            && self.links.is_empty()
            && self.remote.is_none()
            && self.watchers.is_empty()
    }
}

#[derive(Debug, Default)]
pub(crate) struct ShardState {
    pub(crate) peers: HashMap<Uuid, Entry>,
}

impl ShardState {
    /// Drops `id`'s entry if it holds nothing any more.
    pub(crate) fn gc(&mut self, id: Uuid) {
        if self.peers.get(&id).is_some_and(Entry::is_empty) {
            self.peers.remove(&id);
        }
    }
}

/// A shard on its own cache lines, so that two cores updating peers of neighbouring shards do not
/// bounce one line between them.
#[derive(Debug, Default)]
#[repr(align(128))]
struct Shard(Mutex<ShardState>);

#[derive(Debug)]
pub(crate) struct Shards {
    shards: Box<[Shard]>,
    hasher: RandomState,
}

fn lock(m: &Mutex<ShardState>) -> MutexGuard<'_, ShardState> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Shards {
    pub(crate) fn new(n: usize) -> Self {
        let n = n.max(1);
        Self {
            shards: (0..n).map(|_| Shard::default()).collect(),
            // Seeded per graph: peers cannot pick ids that pile into one shard.
            hasher: RandomState::new(),
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.shards.len()
    }

    /// The shard peer `id` lives in.
    pub(crate) fn index(&self, id: Uuid) -> usize {
        // The modulo of a 64-bit hash is uniform enough for at most a few thousand shards.
        (self.hasher.hash_one(id) % self.shards.len() as u64) as usize
    }

    /// Locks the one shard of `id` (the hot path: a node update needs nothing else).
    pub(crate) fn lock_one(&self, id: Uuid) -> MutexGuard<'_, ShardState> {
        lock(&self.shards[self.index(id)].0)
    }

    /// Locks the shards of `ids` in index order.
    pub(crate) fn lock_peers(&self, ids: &[Uuid]) -> Locked<'_> {
        let mut idx: Vec<usize> = ids.iter().map(|id| self.index(*id)).collect();
        self.lock_indices(&mut idx)
    }

    /// Runs `f` on each shard in turn, holding only that shard's lock while `f` runs (read-only
    /// snapshots: never more than one shard locked, so no order to respect).
    pub(crate) fn for_each(&self, mut f: impl FnMut(&ShardState)) {
        for s in self.shards.iter() {
            f(&lock(&s.0));
        }
    }

    /// Locks every shard (shutdown).
    pub(crate) fn lock_all(&self) -> Locked<'_> {
        let mut idx: Vec<usize> = (0..self.shards.len()).collect();
        self.lock_indices(&mut idx)
    }

    fn lock_indices(&self, idx: &mut Vec<usize>) -> Locked<'_> {
        idx.sort_unstable();
        idx.dedup();
        Locked {
            shards: self,
            guards: idx.iter().map(|i| (*i, lock(&self.shards[*i].0))).collect(),
        }
    }

    /// Locks `id`'s shard and the shard of every peer `id` shares a tunnel with, in index order:
    /// what connecting or removing `id` needs (its connection changes, which every tunnel peer's
    /// shard caches). `id`'s links only change under `id`'s shard lock, so once the set is checked
    /// while that lock is held it stays complete until the guards are dropped. A first look takes
    /// `id`'s shard alone; if links changed between looks, retry with the union; after a few
    /// rounds of churn, lock every shard (always sufficient).
    pub(crate) fn lock_neighbourhood(&self, id: Uuid) -> Locked<'_> {
        let home = self.index(id);
        let mut want = vec![home];
        for _ in 0..3 {
            let mut locked = self.lock_indices(&mut want);
            let needed: Vec<usize> = match locked.shard(home).and_then(|s| s.peers.get(&id)) {
                Some(e) => e.links.keys().map(|x| self.index(*x)).collect(),
                None => Vec::new(),
            };
            let missing: Vec<usize> = needed.into_iter().filter(|i| !locked.holds(*i)).collect();
            if missing.is_empty() {
                return locked;
            }
            drop(locked);
            want.extend(missing);
        }
        // Links kept changing between looks: every shard is always enough.
        self.lock_all()
    }
}

/// Guards of several shards, taken in index order.
pub(crate) struct Locked<'a> {
    shards: &'a Shards,
    /// Sorted by shard index, no duplicates.
    guards: Vec<(usize, MutexGuard<'a, ShardState>)>,
}

impl<'a> Locked<'a> {
    fn holds(&self, idx: usize) -> bool {
        self.guards.binary_search_by_key(&idx, |(i, _)| *i).is_ok()
    }

    fn shard(&mut self, idx: usize) -> Option<&mut ShardState> {
        let pos = self.guards.binary_search_by_key(&idx, |(i, _)| *i).ok()?;
        Some(&mut *self.guards[pos].1)
    }

    /// The locked shard of `id`; `None` if that shard is not held (a bug in the caller's lock
    /// set, which the callers' lock sets are built to exclude).
    pub(crate) fn shard_of(&mut self, id: Uuid) -> Option<&mut ShardState> {
        let idx = self.shards.index(id);
        let s = self.shard(idx);
        debug_assert!(s.is_some(), "shard of {id} not locked");
        s
    }

    /// `id`'s entry, if its shard is held and the entry exists.
    pub(crate) fn entry(&mut self, id: Uuid) -> Option<&mut Entry> {
        self.shard_of(id)?.peers.get_mut(&id)
    }

    /// `id`'s entry, created empty if absent (its shard must be held).
    pub(crate) fn entry_or_default(&mut self, id: Uuid) -> Option<&mut Entry> {
        Some(self.shard_of(id)?.peers.entry(id).or_default())
    }

    /// Drops `id`'s entry if it holds nothing any more.
    pub(crate) fn gc(&mut self, id: Uuid) {
        if let Some(s) = self.shard_of(id) {
            s.gc(id);
        }
    }

    /// Every entry in the held shards.
    pub(crate) fn entries(&self) -> impl Iterator<Item = (&Uuid, &Entry)> {
        self.guards.iter().flat_map(|(_, g)| g.peers.iter())
    }

    /// Every peer id with a live connection in the held shards.
    pub(crate) fn connected(&self) -> Vec<ConnId> {
        self.guards
            .iter()
            .flat_map(|(_, g)| {
                g.peers
                    .values()
                    .filter_map(|e| e.conn.as_ref().map(|c| c.id))
            })
            .collect()
    }
}

#[cfg(test)]
impl Shards {
    /// Locks one shard by index (tests hold it to show that other shards do not wait).
    pub(crate) fn lock_index(&self, idx: usize) -> MutexGuard<'_, ShardState> {
        lock(&self.shards[idx].0)
    }
}
