//! Who is connected: node key → connections, sharded so the packet path takes no global lock.
//!
//! Why: every relayed packet needs "where is key K?". The map is split into [`SHARDS`] shards
//! by a keyed hash of the key, each behind its own short std mutex, so concurrent senders
//! only meet when their destinations share a shard, and only for a hash lookup plus a
//! non-blocking queue push. Registration, duplicate-key bookkeeping and presence fan-out to mesh
//! watchers are connection-rate events; they additionally take one control mutex (derper's
//! `Server.mu`), which the packet path never touches.
//!
//! Duplicate keys follow derper's `lastWriterIsActive`: every connection of a key stays open,
//! the newest is the active destination, any frame from a non-active duplicate makes it active,
//! and when the active one leaves the most recently active remaining one takes over. PeerGone
//! is sent only when the last connection of a key leaves.
//!
//! Each entry also lists the mesh peers that announced the key ([`Route::Mesh`], set and
//! cleared through [`crate::core::mesh`]); a local connection always wins over them, and among
//! them the first announcer is used (derper's `multiForwarder`). When the last route and the last
//! local connection of a key are gone, the local receivers of its packets get PeerGone.
//!
//! Lock order: control → shard → a connection's queue. Must never: hold a shard or control lock
//! across `.await`, wake a task or log while holding a shard lock, or allocate on the lookup path.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard, Weak};

use proto::derp::PeerGoneReason;
use proto::key::NodePublic;

use crate::core::handle::ConnHandle;
use crate::core::mesh::{MeshForwarder, MeshPeerId, PresenceEvent, PresenceFeed};
use crate::core::metrics::Metrics;
use crate::core::queue::{Control, ControlOutcome};

/// Number of shards (power of two).
pub(crate) const SHARDS: usize = 64;

/// Where packets for a key go.
#[derive(Debug)]
pub(crate) enum Route<'a> {
    /// Deliver into this local connection's queue.
    Local(&'a Arc<ConnHandle>),
    /// Forward to the mesh peer that announced the key.
    Mesh(&'a Arc<MeshForwarder>),
    /// Nobody has this key.
    Unknown,
}

/// Receivers a connection has delivered packets to, keyed by connection id: who must get
/// PeerGone(Disconnected) when this key's last connection leaves.
pub(crate) type SentTo = HashMap<u64, Weak<ConnHandle>, IdHasherBuilder>;

struct Entry {
    /// The active local connection (the destination of packets), if any.
    active: Option<Arc<ConnHandle>>,
    /// Other local connections of the same key, least recently active first.
    dups: Vec<Arc<ConnHandle>>,
    /// Mesh peers announcing this key, first announcer first.
    mesh_via: Vec<Arc<MeshForwarder>>,
    /// Receivers of packets sent by connections of this key that already left while others
    /// remained, and local receivers of its packets forwarded by mesh peers; notified together
    /// with the last connection's own receivers when the key leaves the region.
    orphan_sent_to: SentTo,
}

impl Entry {
    fn local_count(&self) -> usize {
        usize::from(self.active.is_some()) + self.dups.len()
    }
}

type Shard = HashMap<NodePublic, Entry, KeyHasherBuilder>;

struct ControlState {
    watchers: HashMap<u64, Arc<ConnHandle>, IdHasherBuilder>,
    /// Presence feeds of mesh links that announce this relay's clients (QUIC mesh).
    feeds: Vec<Arc<PresenceFeed>>,
}

/// The sharded key → connections map plus the watcher set.
pub(crate) struct Registry {
    shards: Box<[Mutex<Shard>]>,
    hasher: KeyHasherBuilder,
    control: Mutex<ControlState>,
    metrics: Arc<Metrics>,
    server_key: NodePublic,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry").finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Registry mutations are plain map/vec operations that cannot leave a half-updated entry
    // behind on panic, so a poisoned lock is safe to keep using.
    match m.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

impl Registry {
    pub(crate) fn new(metrics: Arc<Metrics>, server_key: NodePublic, seed: [u64; 2]) -> Self {
        let hasher = KeyHasherBuilder { seed };
        let shards = (0..SHARDS)
            .map(|_| Mutex::new(HashMap::with_hasher(hasher)))
            .collect();
        Self {
            shards,
            hasher,
            control: Mutex::new(ControlState {
                watchers: HashMap::with_hasher(IdHasherBuilder),
                feeds: Vec::new(),
            }),
            metrics,
            server_key,
        }
    }

    #[inline]
    fn shard(&self, key: &NodePublic) -> &Mutex<Shard> {
        let mut h = self.hasher.build_hasher();
        h.write(key.as_bytes());
        let i = (h.finish() >> 32) as usize & (SHARDS - 1);
        &self.shards[i]
    }

    /// Packet path: runs `f` with the route for `key` while the shard lock is held. `f` must
    /// only do non-blocking work (a queue push); it must not log, wake or take another shard.
    #[inline]
    pub(crate) fn with_route<R>(&self, key: &NodePublic, f: impl FnOnce(Route<'_>) -> R) -> R {
        let g = lock(self.shard(key));
        match g.get(key) {
            Some(Entry {
                active: Some(h), ..
            }) => f(Route::Local(h)),
            Some(Entry { mesh_via, .. }) if !mesh_via.is_empty() => f(Route::Mesh(&mesh_via[0])),
            _ => f(Route::Unknown),
        }
    }

    /// Adds a connection; it becomes the active one for its key. Tells watchers.
    pub(crate) fn register(&self, h: &Arc<ConnHandle>) {
        let ctl = lock(&self.control);
        {
            let mut shard = lock(self.shard(&h.key));
            let e = shard.entry(h.key).or_insert_with(|| Entry {
                active: None,
                dups: Vec::new(),
                mesh_via: Vec::new(),
                orphan_sent_to: SentTo::with_hasher(IdHasherBuilder),
            });
            let before = e.local_count();
            if let Some(old) = e.active.take() {
                old.is_active.store(false, Ordering::Relaxed);
                e.dups.push(old);
            }
            h.is_active.store(true, Ordering::Relaxed);
            e.active = Some(h.clone());
            if before >= 1 {
                if before == 1 {
                    self.metrics.current_dup_client_keys.inc();
                    self.metrics.current_dup_client_conns.add(2);
                    for d in &e.dups {
                        d.is_dup.store(true, Ordering::Relaxed);
                    }
                } else {
                    self.metrics.current_dup_client_conns.inc();
                }
                self.metrics.total_dup_client_conns.inc();
                h.is_dup.store(true, Ordering::Relaxed);
            }
        }
        self.metrics.current_connections.inc();
        if h.not_ideal {
            self.metrics.current_notideal_connections.inc();
        }
        let present = h.presence();
        for w in ctl.watchers.values() {
            self.push_to_watcher(w, present);
        }
        for f in &ctl.feeds {
            f.push(PresenceEvent::Present(h.key));
        }
    }

    /// Removes a connection. If it was the key's last local connection, sends
    /// PeerGone(Disconnected) to every live receiver of packets from the key (and to watchers);
    /// otherwise the next most recently active connection becomes active and `sent_to` is kept
    /// for later.
    pub(crate) fn unregister(&self, h: &Arc<ConnHandle>, sent_to: SentTo) {
        let mut ctl = lock(&self.control);
        if ctl.watchers.remove(&h.id).is_some() {
            self.metrics.watchers.dec();
        }
        let mut gone_to: Option<SentTo> = None;
        let mut removed = false;
        {
            let mut shard = lock(self.shard(&h.key));
            let mut remove_entry = false;
            if let Some(e) = shard.get_mut(&h.key) {
                let before = e.local_count();
                if e.active.as_ref().is_some_and(|a| Arc::ptr_eq(a, h)) {
                    e.active = e.dups.pop();
                    removed = true;
                } else if let Some(i) = e.dups.iter().position(|d| Arc::ptr_eq(d, h)) {
                    e.dups.remove(i);
                    removed = true;
                }
                if removed {
                    if let Some(a) = &e.active {
                        a.is_active.store(true, Ordering::Relaxed);
                    }
                    if before == 2 {
                        self.metrics.current_dup_client_keys.dec();
                        self.metrics.current_dup_client_conns.sub(2);
                        if let Some(a) = &e.active {
                            a.is_dup.store(false, Ordering::Relaxed);
                        }
                    } else if before > 2 {
                        self.metrics.current_dup_client_conns.dec();
                    }
                    if e.local_count() == 0 {
                        let mut all = std::mem::take(&mut e.orphan_sent_to);
                        all.extend(sent_to);
                        if !e.mesh_via.is_empty() {
                            // Still reachable through the mesh: not gone from the region yet.
                            e.orphan_sent_to = all;
                        } else {
                            gone_to = Some(all);
                            remove_entry = true;
                        }
                    } else {
                        e.orphan_sent_to.extend(sent_to);
                    }
                }
            }
            if remove_entry {
                shard.remove(&h.key);
            }
        }
        if !removed {
            return;
        }
        self.metrics.current_connections.dec();
        if h.not_ideal {
            self.metrics.current_notideal_connections.dec();
        }
        if let Some(receivers) = gone_to {
            let gone = Control::PeerGone {
                key: h.key,
                reason: PeerGoneReason::Disconnected,
            };
            for w in receivers.values() {
                if let Some(r) = w.upgrade() {
                    if r.id != h.id {
                        r.queue.push_control(gone);
                    }
                }
            }
            for w in ctl.watchers.values() {
                self.push_to_watcher(w, gone);
            }
            for f in &ctl.feeds {
                f.push(PresenceEvent::Gone(h.key));
            }
        }
    }

    /// A mesh peer announced `key`. Returns whether `fwd` was not already a route of it.
    pub(crate) fn add_mesh_route(&self, key: NodePublic, fwd: &Arc<MeshForwarder>) -> bool {
        let mut shard = lock(self.shard(&key));
        let e = shard.entry(key).or_insert_with(|| Entry {
            active: None,
            dups: Vec::new(),
            mesh_via: Vec::new(),
            orphan_sent_to: SentTo::with_hasher(IdHasherBuilder),
        });
        if e.mesh_via.iter().any(|m| Arc::ptr_eq(m, fwd)) {
            return false;
        }
        e.mesh_via.push(fwd.clone());
        true
    }

    /// A mesh peer no longer has `key`. If that was its last route and no local connection has
    /// it, the key left the region: its local receivers get PeerGone(Disconnected). Returns
    /// whether `fwd` was a route of `key`.
    pub(crate) fn remove_mesh_route(&self, key: NodePublic, fwd: &Arc<MeshForwarder>) -> bool {
        let gone_to = {
            let mut shard = lock(self.shard(&key));
            let Some(e) = shard.get_mut(&key) else {
                return false;
            };
            let Some(i) = e.mesh_via.iter().position(|m| Arc::ptr_eq(m, fwd)) else {
                return false;
            };
            e.mesh_via.remove(i);
            if e.mesh_via.is_empty() && e.local_count() == 0 {
                shard.remove(&key).map(|e| e.orphan_sent_to)
            } else {
                None
            }
        };
        if let Some(receivers) = gone_to {
            let gone = Control::PeerGone {
                key,
                reason: PeerGoneReason::Disconnected,
            };
            for w in receivers.values() {
                if let Some(r) = w.upgrade() {
                    r.queue.push_control(gone);
                }
            }
        }
        true
    }

    /// `receiver` got a packet from `src` through the mesh: it is told when `src` leaves the
    /// region (derper's `noteSendFromSrc`). Nothing to do if `src` is not known here.
    pub(crate) fn note_mesh_sender(&self, src: &NodePublic, receiver: &Arc<ConnHandle>) {
        let mut shard = lock(self.shard(src));
        if let Some(e) = shard.get_mut(src) {
            e.orphan_sent_to
                .entry(receiver.id)
                .or_insert_with(|| Arc::downgrade(receiver));
        }
    }

    /// The first mesh peer announcing `key`, if `key` has no local connection.
    pub(crate) fn mesh_route_of(&self, key: &NodePublic) -> Option<MeshPeerId> {
        self.with_route(key, |r| match r {
            Route::Mesh(f) => Some(f.id()),
            _ => None,
        })
    }

    fn push_to_watcher(&self, w: &Arc<ConnHandle>, c: Control) {
        if w.queue.push_control(c) == ControlOutcome::Overflow {
            self.metrics.control_overflows.inc();
        }
    }

    /// Makes a non-active duplicate connection the active one (it just sent a frame).
    pub(crate) fn note_activity(&self, h: &Arc<ConnHandle>) {
        let mut shard = lock(self.shard(&h.key));
        let Some(e) = shard.get_mut(&h.key) else {
            return;
        };
        let Some(i) = e.dups.iter().position(|d| Arc::ptr_eq(d, h)) else {
            return;
        };
        let me = e.dups.remove(i);
        me.is_active.store(true, Ordering::Relaxed);
        if let Some(old) = e.active.replace(me) {
            old.is_active.store(false, Ordering::Relaxed);
            e.dups.push(old);
        }
    }

    /// WatchConns from a mesh peer: queue PeerPresent for every key with an active local
    /// connection, then stream changes. Ignored for a connection using the server's own key.
    pub(crate) fn add_watcher(&self, h: &Arc<ConnHandle>) {
        if h.key == self.server_key {
            return;
        }
        let mut ctl = lock(&self.control);
        if ctl.watchers.contains_key(&h.id) {
            return;
        }
        // Snapshot under the control lock: no registration can interleave, so the flood plus
        // the subsequent stream is exactly the presence history.
        let mut present = Vec::new();
        for s in self.shards.iter() {
            let g = lock(s);
            present.extend(
                g.values()
                    .filter_map(|e| e.active.as_ref().map(|a| a.presence())),
            );
        }
        for c in present {
            self.push_to_watcher(h, c);
        }
        ctl.watchers.insert(h.id, h.clone());
        self.metrics.watchers.inc();
    }

    /// Loads `feed` with the complete list of keys with a local connection and (if it is new)
    /// streams changes into it from now on. Also the resync after an overflow.
    pub(crate) fn add_feed(&self, feed: &Arc<PresenceFeed>) {
        let mut ctl = lock(&self.control);
        let mut present = Vec::new();
        for s in self.shards.iter() {
            let g = lock(s);
            present.extend(
                g.iter()
                    .filter(|(_, e)| e.active.is_some())
                    .map(|(k, _)| *k),
            );
        }
        feed.load(present.into_iter());
        if !ctl.feeds.iter().any(|f| f.id == feed.id) {
            ctl.feeds.push(feed.clone());
        }
    }

    /// Stops streaming changes into `feed`.
    pub(crate) fn remove_feed(&self, feed: &Arc<PresenceFeed>) {
        lock(&self.control).feeds.retain(|f| f.id != feed.id);
    }

    /// ClosePeer: asks every local connection of `key` to close. Returns how many were asked.
    pub(crate) fn close_peer(&self, key: &NodePublic) -> usize {
        let conns = self.conns_of(key);
        conns
            .iter()
            .filter(|c| {
                c.queue
                    .request_close(crate::core::queue::CloseRequest::ClosePeer)
            })
            .count()
    }

    fn conns_of(&self, key: &NodePublic) -> Vec<Arc<ConnHandle>> {
        let g = lock(self.shard(key));
        match g.get(key) {
            Some(e) => e.active.iter().chain(e.dups.iter()).cloned().collect(),
            None => Vec::new(),
        }
    }

    /// Every registered connection (for shutdown).
    pub(crate) fn all_conns(&self) -> Vec<Arc<ConnHandle>> {
        let mut v = Vec::new();
        for s in self.shards.iter() {
            let g = lock(s);
            for e in g.values() {
                v.extend(e.active.iter().chain(e.dups.iter()).cloned());
            }
        }
        v
    }

    /// Up to `limit` registered connections (shard by shard, each lock held only to clone the
    /// handles) and how many there are in all (status page).
    pub(crate) fn sample(&self, limit: usize) -> (Vec<Arc<ConnHandle>>, usize) {
        let mut v = Vec::new();
        let mut total = 0;
        for s in self.shards.iter() {
            let g = lock(s);
            for e in g.values() {
                total += e.local_count();
                for h in e.active.iter().chain(e.dups.iter()) {
                    if v.len() < limit {
                        v.push(h.clone());
                    }
                }
            }
        }
        (v, total)
    }

    /// Number of local connections of `key` (tests and debugging).
    pub(crate) fn local_count(&self, key: &NodePublic) -> usize {
        lock(self.shard(key)).get(key).map_or(0, Entry::local_count)
    }

    /// The id of the active connection of `key`, if any.
    pub(crate) fn active_id(&self, key: &NodePublic) -> Option<u64> {
        lock(self.shard(key))
            .get(key)
            .and_then(|e| e.active.as_ref().map(|a| a.id))
    }
}

/// Keyed hash for node keys. Keys are chosen by clients, so the hash is seeded per process
/// (clients cannot aim many keys at one bucket without knowing the seed); it mixes all 32 bytes
/// with multiply-rotate rounds, much cheaper than SipHash on the packet path.
#[derive(Debug, Clone, Copy)]
pub(crate) struct KeyHasherBuilder {
    seed: [u64; 2],
}

impl BuildHasher for KeyHasherBuilder {
    type Hasher = KeyHasher;
    fn build_hasher(&self) -> KeyHasher {
        KeyHasher {
            a: self.seed[0],
            b: self.seed[1],
        }
    }
}

#[derive(Debug)]
pub(crate) struct KeyHasher {
    a: u64,
    b: u64,
}

const M1: u64 = 0x9E37_79B9_7F4A_7C15;
const M2: u64 = 0xC2B2_AE3D_27D4_EB4F;

impl Hasher for KeyHasher {
    #[inline]
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for c in &mut chunks {
            let mut w = [0u8; 8];
            w.copy_from_slice(c);
            let v = u64::from_le_bytes(w);
            self.a = (self.a ^ v).wrapping_mul(M1).rotate_left(31);
            self.b = (self.b.rotate_left(27) ^ self.a).wrapping_mul(M2);
        }
        for &x in chunks.remainder() {
            self.a = (self.a ^ u64::from(x)).wrapping_mul(M1);
        }
    }

    #[inline]
    fn write_usize(&mut self, _n: usize) {
        // Length prefixes of fixed-size keys carry no information.
    }

    #[inline]
    fn finish(&self) -> u64 {
        let x = self.a ^ self.b.rotate_left(17);
        let x = (x ^ (x >> 33)).wrapping_mul(M2);
        x ^ (x >> 29)
    }
}

/// Hasher for connection ids (unique sequential numbers chosen by us, not by clients).
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct IdHasherBuilder;

impl BuildHasher for IdHasherBuilder {
    type Hasher = IdHasher;
    fn build_hasher(&self) -> IdHasher {
        IdHasher(0)
    }
}

#[derive(Debug)]
pub(crate) struct IdHasher(u64);

impl Hasher for IdHasher {
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 ^ u64::from(b)).wrapping_mul(M1);
        }
    }
    #[inline]
    fn write_u64(&mut self, n: u64) {
        self.0 = n.wrapping_mul(M1);
    }
    #[inline]
    fn finish(&self) -> u64 {
        self.0 ^ (self.0 >> 32)
    }
}
