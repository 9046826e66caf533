//! Remote peers: peers this process does not serve, seen through a *source* that can vanish as a
//! whole.
//!
//! Why: next to coderd, coderd's own peers (its server tailnet, workspace proxies, clients that
//! dialled coderd) reach an agent served here only through coderd's coordinator. The sidecar
//! bridge ([`crate::upstream::bridge`]) mirrors them: one upstream `Coordinate` stream per local
//! agent, whose peer updates become *remote peers* of that agent in this graph. Later, other
//! replicas seen through PostgreSQL are the same thing with another source. One concept:
//!
//! * A [`RemoteSource`] is one origin of remote peers (one bridge stream; later one replica). It
//!   holds, per remote peer X, a **binding**: X's node as this source last reported it and the
//!   local peers this source says X has a tunnel to. A remote peer may be bound by several sources
//!   at once (coderd's server tailnet dialling two agents that are both served here is seen
//!   through both agents' bridges).
//! * **Best binding wins** (pgcoord's rule): X's node, as every local tunnel peer sees it, is the
//!   node of the binding updated last. When a source loses X (LOST, DISCONNECTED, or the source
//!   itself goes away) its binding is removed: local peers whose tunnel to X no other binding
//!   holds are told LOST/DISCONNECTED (and the tunnel goes, as Coder's in-memory coordinator
//!   removes a lost peer's tunnels); the others keep X with the best remaining node.
//! * **Dropping a source marks all its peers LOST at once**, so local peers keep their WireGuard
//!   sessions (a LOST peer is kept by Coder's clients, a DISCONNECTED one is removed).
//! * The other direction: a source **watches** local peers ([`RemoteSource::watch`]) and receives,
//!   through its bounded [`SourceEvents`] queue, what they send that concerns it: their node
//!   updates, their READY_FOR_HANDSHAKE to remote peers, and their removal (LOST or DISCONNECTED).
//!   Updates *to* remote peers about local peers are not queued per remote peer: the source
//!   forwards the watched peer's node once and its own coordinator fans it out.
//!
//! # Invariants and ordering
//!
//! The graph's rules hold unchanged (see [`super`]): everything about remote X lives in X's shard
//! (its bindings, its effective node in `Entry::node`, its links); every push *about* X to a local
//! receiver is made holding X's shard lock (upsert and READY_FOR_HANDSHAKE: X's shard; tunnel
//! add/remove: both shards; losing a binding: X's neighbourhood), so a local receiver sees X's
//! updates in the order they were applied. Every event *about* watched local peer A is queued to
//! A's watchers holding A's shard lock (update_self, ready_for_handshake, removal), so a source
//! sees A's node updates, RFHs and removal in A's order. A source's queue mutex is a leaf, like an
//! outbox's. Nothing here waits: a full source queue marks the source *failed* (counted in
//! `coordinator_remote_source_overflows_total`); its owner sees [`SourceEvent::Overflow`] and
//! must re-synchronise by replacing the source (the bridge reopens its upstream stream).
//!
//! * **Watching every local peer:** a store that mirrors the whole graph (PostgreSQL, `crate::ha`)
//!   uses the one watch-all source of a graph ([`PeerGraph::remote_source_all`]); it also
//!   receives local connects and tunnel changes ([`SourceEvent::Connected`],
//!   [`SourceEvent::TunnelAdded`], [`SourceEvent::TunnelRemoved`]), queued under the same shard
//!   locks as the other events. It re-synchronises after an overflow without being replaced:
//!   [`PeerGraph::resync_all`] restarts its queue and hands it every local peer, atomically,
//!   and the peers that left gracefully while it was failed (remembered, bounded by
//!   [`RESYNC_LEAVES`]), so that it can delete what it wrote about them instead of marking them
//!   LOST.
//!
//! # Not yet general
//!
//! * A peer id is either local or remote: remote operations about an id that has a local
//!   connection are refused (`false`), and a local peer that connects with an id that has
//!   bindings shadows them until it leaves.
//! * Remote peers only have tunnels *to* local peers (what a bridge learns: coderd tells an agent
//!   about peers that tunnel to it). A local client adding a tunnel to a remote-only peer records
//!   the tunnel but is not sent the remote node (PostgreSQL sources will need that direction).
//! * Bindings carry no timestamps from the source: "updated last" is the order of arrival here.
//!   The PostgreSQL store therefore keeps one source for all replicas and picks the best binding
//!   itself (by status and `updated_at`) before handing it to the graph.

use std::collections::{HashSet, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use proto::tailnet::v2::coordinate_response::peer_update::Kind;
use proto::tailnet::v2::Node;
use tokio::sync::Notify;
use uuid::Uuid;

use super::outbox::Update;
use super::shard::{Entry, Link, Locked};
use super::{Kicks, PeerGraph, Pusher};

/// Events queued to one source before it is marked failed.
pub const DEFAULT_SOURCE_QUEUE: usize = 1024;
/// Most graceful leaves the watch-all source remembers between an overflow and its re-sync
/// (beyond, they are counted in [`Resync::leaves_forgotten`] and re-synced as LOST).
pub const RESYNC_LEAVES: usize = 65_536;

/// What a watched local peer did that a source must pass on.
#[derive(Debug, Clone, PartialEq)]
pub enum SourceEvent {
    /// `about` sent this node (also queued once when the watch starts, if it has one).
    Node {
        /// The local peer.
        about: Uuid,
        /// Its new node.
        node: Arc<Node>,
    },
    /// `about` sent READY_FOR_HANDSHAKE to remote peer `to`.
    ReadyForHandshake {
        /// The local peer.
        about: Uuid,
        /// The remote peer it is ready for.
        to: Uuid,
    },
    /// `about` left: `Kind::Lost` or `Kind::Disconnected`.
    Gone {
        /// The local peer.
        about: Uuid,
        /// How it left.
        kind: Kind,
    },
    /// `about` connected (or replaced its connection). Only for the watch-all source.
    Connected {
        /// The local peer.
        about: Uuid,
    },
    /// `about` added a tunnel `about → to`. Only for the watch-all source.
    TunnelAdded {
        /// The local peer (tunnel source).
        about: Uuid,
        /// The tunnel's destination.
        to: Uuid,
    },
    /// `about` removed its tunnel `about → to`. Only for the watch-all source.
    TunnelRemoved {
        /// The local peer (tunnel source).
        about: Uuid,
        /// The tunnel's destination.
        to: Uuid,
    },
    /// The queue overflowed: events were dropped; the source must be replaced to re-synchronise.
    Overflow,
}

/// One connected local peer as [`PeerGraph::resync_all`] reads it.
#[derive(Debug, Clone, PartialEq)]
pub struct LocalPeerState {
    /// The peer id.
    pub id: Uuid,
    /// Its current node, if it sent one.
    pub node: Option<Arc<Node>>,
    /// Destinations of its tunnels.
    pub tunnels: Vec<Uuid>,
}

/// What [`PeerGraph::resync_all`] reads: the state to re-synchronise from.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Resync {
    /// Every connected local peer.
    pub peers: Vec<LocalPeerState>,
    /// Peers that left gracefully (Disconnect) while events were dropped, at most
    /// [`RESYNC_LEAVES`] (in no order; a peer may have connected again since: then it is also in
    /// `peers`). A store must delete what it wrote about them, as for
    /// `SourceEvent::Gone { kind: Kind::Disconnected }`.
    pub left_gracefully: Vec<Uuid>,
    /// Graceful leaves beyond [`RESYNC_LEAVES`] that were not remembered.
    pub leaves_forgotten: u64,
}

/// The bounded queue between the graph (which pushes under shard locks) and a source's owner.
#[derive(Debug)]
pub(crate) struct SourceSink {
    id: u64,
    capacity: usize,
    notify: Notify,
    inner: Mutex<SinkInner>,
}

#[derive(Debug, Default)]
struct SinkInner {
    queue: VecDeque<SourceEvent>,
    failed: bool,
    closed: bool,
    /// Only the watch-all source (it re-syncs instead of being replaced): remember graceful
    /// leaves while failed, in `left` (bounded by [`RESYNC_LEAVES`]; the excess in `forgotten`).
    record_leaves: bool,
    left: HashSet<Uuid>,
    forgotten: u64,
}

impl SourceSink {
    /// Queues `ev`; a full queue marks the sink failed (later pushes are dropped). Never blocks.
    /// Returns false if the push overflowed the queue just now.
    pub(crate) fn push(&self, ev: SourceEvent) -> bool {
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if g.closed {
            return true;
        }
        if g.failed {
            g.remember_leave(&ev);
            return true;
        }
        if g.queue.len() >= self.capacity {
            g.failed = true;
            g.remember_leave(&ev);
            drop(g);
            self.notify.notify_one();
            return false;
        }
        g.queue.push_back(ev);
        drop(g);
        self.notify.notify_one();
        true
    }

    fn close(&self) {
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        g.closed = true;
        drop(g);
        self.notify.notify_one();
    }
}

impl SinkInner {
    /// While failed: a graceful leave is remembered for the re-sync (the event itself is dropped).
    fn remember_leave(&mut self, ev: &SourceEvent) {
        if let SourceEvent::Gone {
            about,
            kind: Kind::Disconnected,
        } = ev
        {
            if !self.record_leaves || self.left.contains(about) {
                return;
            }
            if self.left.len() < RESYNC_LEAVES {
                self.left.insert(*about);
            } else {
                self.forgotten += 1;
            }
        }
    }
}

/// The receiving end of a source's queue.
#[derive(Debug)]
pub struct SourceEvents {
    sink: Arc<SourceSink>,
}

impl SourceEvents {
    /// The next event; [`SourceEvent::Overflow`] once (and forever after) if the queue overflowed
    /// (after the events queued before it); `None` once the source was dropped.
    pub async fn recv(&mut self) -> Option<SourceEvent> {
        loop {
            if let Some(ev) = self.try_recv() {
                return ev;
            }
            self.sink.notify.notified().await;
        }
    }

    /// `Some(next)` if something is ready (`Some(None)`: the source is gone), `None` if empty.
    pub fn try_recv(&mut self) -> Option<Option<SourceEvent>> {
        let mut g = self.sink.inner.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(ev) = g.queue.pop_front() {
            return Some(Some(ev));
        }
        if g.failed {
            return Some(Some(SourceEvent::Overflow));
        }
        if g.closed {
            return Some(None);
        }
        None
    }
}

/// One source's view of a remote peer (kept in the peer's entry, in its shard).
#[derive(Debug)]
pub(crate) struct Binding {
    source: u64,
    node: Option<Arc<Node>>,
    /// Graph-wide arrival order of `node` (the best binding is the one with the highest).
    seq: u64,
    /// Local peers this source says the remote peer has a tunnel to.
    tunnels: Vec<Uuid>,
}

/// What the graph knows about a remote peer: its bindings, one per source.
#[derive(Debug)]
pub(crate) struct RemotePeer {
    /// The peer id as wire bytes, shared by every update about it.
    pub(crate) id_bytes: Bytes,
    bindings: Vec<Binding>,
}

impl RemotePeer {
    fn binding(&mut self, source: u64) -> Option<&mut Binding> {
        self.bindings.iter_mut().find(|b| b.source == source)
    }

    /// The node of the binding updated last.
    fn best(&self) -> Option<Arc<Node>> {
        self.bindings
            .iter()
            .filter(|b| b.node.is_some())
            .max_by_key(|b| b.seq)
            .and_then(|b| b.node.clone())
    }

    fn holds_tunnel(&self, to: Uuid) -> bool {
        self.bindings.iter().any(|b| b.tunnels.contains(&to))
    }
}

fn same_node(a: &Option<Arc<Node>>, b: &Option<Arc<Node>>) -> bool {
    match (a, b) {
        (Some(a), Some(b)) => Arc::ptr_eq(a, b),
        (None, None) => true,
        _ => false,
    }
}

/// A handle on one source of remote peers. Dropping it removes all its bindings as LOST and ends
/// its watches.
#[derive(Debug)]
pub struct RemoteSource {
    graph: Arc<PeerGraph>,
    sink: Arc<SourceSink>,
    /// Remote peers this source has a binding for (only this handle changes it).
    peers: HashSet<Uuid>,
    /// Local peers it watches.
    watched: HashSet<Uuid>,
    /// The batch being applied, if any (see [`RemoteSource::begin_batch`]).
    batch: Option<u64>,
}

impl PeerGraph {
    /// A new source of remote peers and the receiving end of what the local peers it watches do.
    /// `queue` bounds that queue (at least 1).
    pub fn remote_source(self: &Arc<Self>, queue: usize) -> (RemoteSource, SourceEvents) {
        let sink = Arc::new(SourceSink {
            id: self.next_gen.fetch_add(1, Ordering::Relaxed),
            capacity: queue.max(1),
            notify: Notify::new(),
            inner: Mutex::new(SinkInner::default()),
        });
        self.metrics.remote_sources.inc();
        (
            RemoteSource {
                graph: self.clone(),
                sink: sink.clone(),
                peers: HashSet::new(),
                watched: HashSet::new(),
                batch: None,
            },
            SourceEvents { sink },
        )
    }

    /// Like [`PeerGraph::remote_source`], but the source watches **every** local peer, and also
    /// receives [`SourceEvent::Connected`], [`SourceEvent::TunnelAdded`] and
    /// [`SourceEvent::TunnelRemoved`]: what a store that mirrors the whole graph (PostgreSQL,
    /// `crate::ha`) must write. At most one per graph: `None` if one was already created.
    pub fn remote_source_all(
        self: &Arc<Self>,
        queue: usize,
    ) -> Option<(RemoteSource, SourceEvents)> {
        let (source, events) = self.remote_source(queue);
        self.watch_all.set(source.sink.clone()).ok()?;
        source
            .sink
            .inner
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .record_leaves = true;
        Some((source, events))
    }

    /// Re-synchronises the watch-all source after [`SourceEvent::Overflow`]: with every shard
    /// held, empties its queue and clears its failed mark (events are queued again from this
    /// moment), takes the graceful leaves it remembered while failed, and reads every connected
    /// local peer. Applying the returned state (deleting the graceful leavers, marking other
    /// vanished peers LOST) and then the events queued after it gives the current graph. `None`
    /// without a watch-all source.
    pub fn resync_all(&self) -> Option<Resync> {
        let w = self.watch_all.get()?;
        let l = self.shards.lock_all();
        let (left, forgotten) = {
            let mut g = w.inner.lock().unwrap_or_else(|p| p.into_inner());
            g.queue.clear();
            g.failed = false;
            (
                std::mem::take(&mut g.left),
                std::mem::take(&mut g.forgotten),
            )
        };
        let peers = l
            .entries()
            .filter(|(_, e)| e.conn.is_some())
            .map(|(id, e)| LocalPeerState {
                id: *id,
                node: e.node.clone(),
                tunnels: e
                    .links
                    .iter()
                    .filter(|(_, link)| link.out)
                    .map(|(to, _)| *to)
                    .collect(),
            })
            .collect();
        drop(l);
        Some(Resync {
            peers,
            left_gracefully: left.into_iter().collect(),
            leaves_forgotten: forgotten,
        })
    }

    /// Queues `ev` to the watch-all source, if any (caller holds the shard of the peer `ev` is
    /// about).
    pub(crate) fn notify_all_watcher(&self, ev: impl Fn() -> SourceEvent) {
        if let Some(w) = self.watch_all.get() {
            if !w.push(ev()) {
                self.metrics.remote_source_overflows.inc();
            }
        }
    }

    /// Number of remote peers (with at least one binding).
    pub fn remote_peer_count(&self) -> usize {
        self.remote_peers.load(Ordering::Relaxed)
    }

    /// Queues `ev` to every watcher in `e` (caller holds `e`'s shard).
    pub(crate) fn notify_watchers(&self, e: &Entry, ev: impl Fn() -> SourceEvent) {
        for w in &e.watchers {
            if !w.push(ev()) {
                self.metrics.remote_source_overflows.inc();
            }
        }
        // Only called about local peers (their node, RFH and removal).
        self.notify_all_watcher(ev);
    }
}

impl RemoteSource {
    fn id(&self) -> u64 {
        self.sink.id
    }

    /// Remote peers this source currently binds.
    pub fn peer_count(&self) -> usize {
        self.peers.len()
    }

    /// Until [`RemoteSource::end_batch`], the updates this source causes belong to one batch:
    /// those a receiver has not taken yet share one queued response (one `CoordinateResponse`
    /// with many updates, as pgcoord's mapper sends what one read returned), so a burst of remote
    /// peers costs a receiver that keeps reading one slot of its queue, not one per peer.
    pub fn begin_batch(&mut self) {
        self.batch = Some(self.graph.next_gen.fetch_add(1, Ordering::Relaxed));
    }

    /// Ends the batch begun by [`RemoteSource::begin_batch`].
    pub fn end_batch(&mut self) {
        self.batch = None;
    }

    /// Starts passing on what local peer `local` does (its node at once, if it has one). Returns
    /// false if it was already watched.
    pub fn watch(&mut self, local: Uuid) -> bool {
        if !self.watched.insert(local) {
            return false;
        }
        let g = &self.graph;
        let mut shard = g.shards.lock_one(local);
        let e = shard.peers.entry(local).or_default();
        e.watchers.push(self.sink.clone());
        if e.conn.is_some() {
            if let Some(node) = &e.node {
                if !self.sink.push(SourceEvent::Node {
                    about: local,
                    node: node.clone(),
                }) {
                    g.metrics.remote_source_overflows.inc();
                }
            }
        }
        true
    }

    /// Remote peer `peer`'s node as this source reports it. Its local tunnel peers are told if the
    /// best node changed. Holds `peer`'s shard. False if `peer` is connected locally.
    pub fn upsert_node(&mut self, peer: Uuid, node: Node) -> bool {
        let g = self.graph.clone();
        let node = Arc::new(node);
        let seq = g.next_gen.fetch_add(1, Ordering::Relaxed);
        let mut kicks = Kicks::new();
        let mut sent = 0;
        {
            let mut shard = g.shards.lock_one(peer);
            let e = shard.peers.entry(peer).or_default();
            if e.conn.is_some() {
                drop(shard);
                g.metrics.remote_conflicts.inc();
                return false;
            }
            let new_peer = e.remote.is_none();
            let r = e.remote.get_or_insert_with(|| {
                Box::new(RemotePeer {
                    id_bytes: Bytes::copy_from_slice(peer.as_bytes()),
                    bindings: Vec::new(),
                })
            });
            if new_peer {
                g.remote_peers.fetch_add(1, Ordering::Relaxed);
                g.metrics.remote_peers.inc();
            }
            match r.binding(self.sink.id) {
                Some(b) => {
                    b.node = Some(node);
                    b.seq = seq;
                }
                None => r.bindings.push(Binding {
                    source: self.sink.id,
                    node: Some(node),
                    seq,
                    tunnels: Vec::new(),
                }),
            }
            let best = r.best();
            let id_bytes = r.id_bytes.clone();
            if !same_node(&best, &e.node) {
                g.keys.replace(&mut e.node, best.clone());
                if let Some(n) = best {
                    let u = Arc::new(Update::new(
                        peer,
                        id_bytes,
                        Kind::Node,
                        Some(n),
                        "node update",
                    ));
                    let mut p = Pusher {
                        sent: 0,
                        kicks: &mut kicks,
                        batch: self.batch,
                    };
                    for link in e.links.values() {
                        if let Some(to) = &link.conn {
                            p.mapping(to, &u);
                        }
                    }
                    sent = p.sent;
                }
            }
        }
        self.settle(&g, peer, sent, kicks);
        true
    }

    /// After an upsert or a tunnel from `peer`, with every lock released: `peer` is this
    /// source's, the updates pushed are counted, and queues that overflowed are kicked.
    fn settle(&mut self, g: &PeerGraph, peer: Uuid, sent: u64, kicks: Kicks) {
        self.peers.insert(peer);
        g.metrics.peer_updates_sent.inc_by(sent);
        g.run_kicks(kicks);
    }

    /// This source says remote `peer` has a tunnel to local peer `local`; `local` gets `peer`'s
    /// best node if it is connected and one is known. Idempotent. Holds both shards. False if
    /// `peer` is connected locally.
    pub fn add_tunnel(&mut self, peer: Uuid, local: Uuid) -> bool {
        if peer == local {
            return false;
        }
        let g = self.graph.clone();
        let mut kicks = Kicks::new();
        let mut sent = 0;
        {
            let mut l = g.shards.lock_peers(&[peer, local]);
            let local_conn = l.entry(local).and_then(|e| e.conn.clone());
            let Some(e) = l.entry_or_default(peer) else {
                return false;
            };
            if e.conn.is_some() {
                drop(l);
                g.metrics.remote_conflicts.inc();
                return false;
            }
            let new_peer = e.remote.is_none();
            let r = e.remote.get_or_insert_with(|| {
                Box::new(RemotePeer {
                    id_bytes: Bytes::copy_from_slice(peer.as_bytes()),
                    bindings: Vec::new(),
                })
            });
            if new_peer {
                g.remote_peers.fetch_add(1, Ordering::Relaxed);
                g.metrics.remote_peers.inc();
            }
            let had_tunnel = r.holds_tunnel(local);
            let id_bytes = r.id_bytes.clone();
            let b = match r.binding(self.sink.id) {
                Some(b) => b,
                None => {
                    r.bindings.push(Binding {
                        source: self.sink.id,
                        node: None,
                        seq: 0,
                        tunnels: Vec::new(),
                    });
                    r.bindings.last_mut().expect("just pushed")
                }
            };
            if !b.tunnels.contains(&local) {
                b.tunnels.push(local);
            }
            let node = e.node.clone();
            if !had_tunnel {
                e.links
                    .entry(local)
                    .or_insert_with(|| Link {
                        out: false,
                        inc: false,
                        conn: local_conn.clone(),
                        via_remote: false,
                    })
                    .out = true;
                if let Some(le) = l.entry_or_default(local) {
                    let link = le.links.entry(peer).or_insert_with(|| Link {
                        out: false,
                        inc: false,
                        conn: None,
                        via_remote: true,
                    });
                    link.inc = true;
                    link.via_remote = true;
                }
                g.tunnels.fetch_add(1, Ordering::Relaxed);
                g.metrics.tunnels.inc();
                if let (Some(to), Some(n)) = (&local_conn, node) {
                    let u = Arc::new(Update::new(
                        peer,
                        id_bytes,
                        Kind::Node,
                        Some(n),
                        "add tunnel",
                    ));
                    let mut p = Pusher {
                        sent: 0,
                        kicks: &mut kicks,
                        batch: self.batch,
                    };
                    p.mapping(to, &u);
                    sent = p.sent;
                }
            }
        }
        self.settle(&g, peer, sent, kicks);
        true
    }

    /// This source no longer reports remote `peer`'s tunnel to `local`. If no other source holds
    /// that tunnel, `local` is told DISCONNECTED and the tunnel is deleted. Holds both shards.
    pub fn remove_tunnel(&mut self, peer: Uuid, local: Uuid) -> bool {
        let g = self.graph.clone();
        let mut kicks = Kicks::new();
        let removed;
        {
            let mut l = g.shards.lock_peers(&[peer, local]);
            let Some(e) = l.entry(peer) else { return false };
            let Some(r) = e.remote.as_mut() else {
                return false;
            };
            let Some(b) = r.binding(self.sink.id) else {
                return false;
            };
            let before = b.tunnels.len();
            b.tunnels.retain(|t| *t != local);
            if b.tunnels.len() == before {
                return false;
            }
            removed = !r.holds_tunnel(local);
            if removed {
                let id_bytes = r.id_bytes.clone();
                let sent = drop_tunnel(
                    &g,
                    &mut l,
                    peer,
                    local,
                    id_bytes,
                    Kind::Disconnected,
                    "remove tunnel",
                    &mut kicks,
                    self.batch,
                );
                g.metrics.peer_updates_sent.inc_by(sent);
            }
        }
        g.run_kicks(kicks);
        removed
    }

    /// READY_FOR_HANDSHAKE from remote `peer` to local `local`, if they share a tunnel and `local`
    /// is connected. Holds `peer`'s shard only (`local`'s connection is the cached one, I1).
    pub fn ready_for_handshake(&mut self, peer: Uuid, local: Uuid) -> bool {
        let g = self.graph.clone();
        let mut kicks = Kicks::new();
        let mut sent = 0;
        let delivered;
        {
            let shard = g.shards.lock_one(peer);
            let Some(e) = shard.peers.get(&peer) else {
                return false;
            };
            let Some(r) = &e.remote else { return false };
            match e.links.get(&local) {
                Some(link) if link.out || link.inc => {
                    delivered = link.conn.is_some();
                    if let Some(to) = &link.conn {
                        let u = Update::new(
                            peer,
                            r.id_bytes.clone(),
                            Kind::ReadyForHandshake,
                            None,
                            "",
                        );
                        let mut p = Pusher {
                            sent: 0,
                            kicks: &mut kicks,
                            batch: self.batch,
                        };
                        p.mapping(to, &Arc::new(u));
                        sent = p.sent;
                    }
                }
                _ => return false,
            }
        }
        g.metrics.peer_updates_sent.inc_by(sent);
        g.run_kicks(kicks);
        delivered
    }

    /// This source lost remote `peer` (LOST to the local peers that only this source linked it
    /// with). Holds `peer`'s neighbourhood.
    pub fn lost(&mut self, peer: Uuid) -> bool {
        self.unbind(peer, Kind::Lost, "lost")
    }

    /// Remote `peer` disconnected gracefully as far as this source knows (DISCONNECTED to the
    /// local peers that only this source linked it with). Holds `peer`'s neighbourhood.
    pub fn disconnected(&mut self, peer: Uuid) -> bool {
        self.unbind(peer, Kind::Disconnected, "disconnected")
    }

    fn unbind(&mut self, peer: Uuid, kind: Kind, reason: &'static str) -> bool {
        if !self.peers.remove(&peer) {
            return false;
        }
        unbind(&self.graph, self.id(), peer, kind, reason, self.batch);
        true
    }
}

/// Removes `source`'s binding of `peer`, telling local peers as described in the module doc.
fn unbind(
    g: &Arc<PeerGraph>,
    source: u64,
    peer: Uuid,
    kind: Kind,
    reason: &'static str,
    batch: Option<u64>,
) {
    let mut kicks = Kicks::new();
    let mut sent = 0;
    {
        let mut l = g.shards.lock_neighbourhood(peer);
        let Some(e) = l.entry(peer) else { return };
        let Some(r) = e.remote.as_mut() else { return };
        let Some(pos) = r.bindings.iter().position(|b| b.source == source) else {
            return;
        };
        let b = r.bindings.swap_remove(pos);
        let id_bytes = r.id_bytes.clone();
        let orphaned: Vec<Uuid> = b
            .tunnels
            .iter()
            .copied()
            .filter(|t| !r.holds_tunnel(*t))
            .collect();
        let best = r.best();
        let gone = r.bindings.is_empty();
        let shadowed = e.conn.is_some();
        if !shadowed {
            for local in orphaned {
                sent += drop_tunnel(
                    g,
                    &mut l,
                    peer,
                    local,
                    id_bytes.clone(),
                    kind,
                    reason,
                    &mut kicks,
                    batch,
                );
            }
        }
        let Some(e) = l.entry(peer) else { return };
        if gone {
            e.remote = None;
            g.remote_peers.fetch_sub(1, Ordering::Relaxed);
            g.metrics.remote_peers.dec();
        }
        if !shadowed && !same_node(&best, &e.node) {
            g.keys.replace(&mut e.node, best.clone());
            if let Some(n) = best {
                // Another source still knows the peer: its node is the best one now.
                let u = Arc::new(Update::new(
                    peer,
                    id_bytes,
                    Kind::Node,
                    Some(n),
                    "node update",
                ));
                let mut p = Pusher {
                    sent: 0,
                    kicks: &mut kicks,
                    batch,
                };
                for link in e.links.values() {
                    if let Some(to) = &link.conn {
                        p.mapping(to, &u);
                    }
                }
                sent += p.sent;
            }
        }
        l.gc(peer);
    }
    g.metrics.peer_updates_sent.inc_by(sent);
    g.run_kicks(kicks);
}

/// Tells `local` `kind` about remote `peer` (if it was told its node) and deletes the tunnel
/// `peer` → `local` on both sides. Caller holds both shards. Returns the updates queued.
#[allow(clippy::too_many_arguments)]
fn drop_tunnel(
    g: &PeerGraph,
    l: &mut Locked<'_>,
    peer: Uuid,
    local: Uuid,
    id_bytes: Bytes,
    kind: Kind,
    reason: &'static str,
    kicks: &mut Kicks,
    batch: Option<u64>,
) -> u64 {
    let mut p = Pusher {
        sent: 0,
        kicks,
        batch,
    };
    let mut existed = false;
    if let Some(e) = l.entry(peer) {
        if let Some(link) = e.links.get_mut(&local) {
            existed = link.out;
            if let Some(to) = &link.conn {
                p.mapping(
                    to,
                    &Arc::new(Update::new(peer, id_bytes, kind, None, reason)),
                );
            }
            link.out = false;
            if !link.inc {
                e.links.remove(&local);
            }
        }
    }
    if let Some(le) = l.entry(local) {
        if let Some(link) = le.links.get_mut(&peer) {
            link.inc = false;
            if !link.out {
                le.links.remove(&peer);
            }
        }
    }
    l.gc(local);
    if existed {
        g.tunnels.fetch_sub(1, Ordering::Relaxed);
        g.metrics.tunnels.dec();
    }
    p.sent
}

impl Drop for RemoteSource {
    fn drop(&mut self) {
        let g = self.graph.clone();
        for local in self.watched.drain() {
            let mut shard = g.shards.lock_one(local);
            if let Some(e) = shard.peers.get_mut(&local) {
                e.watchers.retain(|w| !Arc::ptr_eq(w, &self.sink));
            }
            shard.gc(local);
        }
        // A source that goes away loses all its peers at once: LOST keeps the data path up.
        for peer in self.peers.drain() {
            unbind(&g, self.sink.id, peer, Kind::Lost, "lost", None);
        }
        self.sink.close();
        g.metrics.remote_sources.dec();
    }
}

/// Counts of a source's bindings, for tests and debugging: `remote peer → local tunnel peers`.
#[cfg(test)]
pub(crate) fn bindings_of(g: &PeerGraph, peer: Uuid) -> std::collections::HashMap<u64, Vec<Uuid>> {
    let shard = g.shards.lock_one(peer);
    shard
        .peers
        .get(&peer)
        .and_then(|e| e.remote.as_ref())
        .map(|r| {
            r.bindings
                .iter()
                .map(|b| (b.source, b.tunnels.clone()))
                .collect()
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use bytes::Bytes;
    use proto::tailnet::v2::coordinate_request::{Disconnect, ReadyForHandshake, UpdateSelf};
    use proto::tailnet::v2::coordinate_response::peer_update::Kind;
    use proto::tailnet::v2::{CoordinateRequest, Node};
    use uuid::Uuid;

    use super::{bindings_of, SourceEvent};
    use crate::authz::CoordinateeAuth;
    use crate::graph::{GraphConfig, PeerGraph, PeerHandle, PeerReceiver};

    fn graph() -> Arc<PeerGraph> {
        PeerGraph::with_shards(GraphConfig::default(), 16, &prometheus::Registry::new()).unwrap()
    }

    fn node(derp: i32) -> Node {
        Node {
            preferred_derp: derp,
            ..Default::default()
        }
    }

    fn agent(g: &Arc<PeerGraph>, id: Uuid) -> (PeerHandle, PeerReceiver) {
        g.connect(id, "agent".into(), CoordinateeAuth::Agent { id })
    }

    fn update(g: &PeerGraph, h: &PeerHandle, derp: i32) {
        let req = CoordinateRequest {
            update_self: Some(UpdateSelf {
                node: Some(node(derp)),
            }),
            ..Default::default()
        };
        g.handle(h, req).unwrap();
    }

    fn rfh(g: &PeerGraph, h: &PeerHandle, to: Uuid) {
        let req = CoordinateRequest {
            ready_for_handshake: vec![ReadyForHandshake {
                id: Bytes::copy_from_slice(to.as_bytes()),
            }],
            ..Default::default()
        };
        g.handle(h, req).unwrap();
    }

    /// Every peer update queued to `rx`: (about, kind, derp of the node or 0).
    fn drain(rx: &mut PeerReceiver) -> Vec<(Uuid, Kind, i32)> {
        let mut out = Vec::new();
        while let Ok(resp) = rx.try_recv() {
            assert!(resp.error.is_empty(), "{}", resp.error);
            for u in resp.peer_updates {
                out.push((
                    Uuid::from_slice(&u.id).unwrap(),
                    Kind::try_from(u.kind).unwrap(),
                    u.node.map_or(0, |n| n.preferred_derp),
                ));
            }
        }
        out
    }

    fn events(ev: &mut super::SourceEvents) -> Vec<SourceEvent> {
        let mut out = Vec::new();
        while let Some(Some(e)) = ev.try_recv() {
            let overflow = e == SourceEvent::Overflow;
            out.push(e);
            if overflow {
                break;
            }
        }
        out
    }

    const A: Uuid = Uuid::from_u128(0xa);
    const A2: Uuid = Uuid::from_u128(0xa2);
    const X: Uuid = Uuid::from_u128(0x1);
    const C: Uuid = Uuid::from_u128(0xc);

    /// A burst of remote peers applied as one batch reaches an agent that has not read yet as
    /// a few merged responses (pgcoord's mapper sends one per read), not one per peer: it is
    /// never kicked for it. The same burst without a batch overflows a 512-response queue.
    #[test]
    fn a_remote_batch_shares_one_queue_slot_per_response() {
        let g = graph();
        let (_ha, mut ra) = agent(&g, A);
        let b = Uuid::from_u128(0xb);
        let (_hb, mut rb) = agent(&g, b);
        let (mut src, _ev) = g.remote_source(16);
        let ids: Vec<Uuid> = (0..1000u128).map(|i| Uuid::from_u128(0x1000 + i)).collect();
        src.begin_batch();
        for (i, x) in ids.iter().enumerate() {
            assert!(src.upsert_node(*x, node(i as i32 + 1)));
            assert!(src.add_tunnel(*x, A));
        }
        src.end_batch();
        assert!(g.is_local(A), "the agent was kicked by a batch");
        let mut responses = 0;
        let mut got = Vec::new();
        while let Ok(resp) = ra.try_recv() {
            assert!(resp.error.is_empty(), "{}", resp.error);
            responses += 1;
            got.extend(
                resp.peer_updates
                    .iter()
                    .map(|u| Uuid::from_slice(&u.id).unwrap()),
            );
        }
        assert_eq!(got, ids, "every node, in order");
        assert!(responses <= 2, "{responses} responses for one batch");

        // Not a batch: one queue slot per update, and 600 overflow the receiver's 512.
        for (i, x) in ids.iter().take(600).enumerate() {
            src.upsert_node(*x, node(i as i32 + 5000));
            src.add_tunnel(*x, b);
        }
        assert!(
            !g.is_local(b),
            "600 unbatched updates must overflow the queue"
        );
        // Its stream ends after what was queued before the overflow.
        let end = loop {
            if let Err(e) = rb.try_recv() {
                break e;
            }
        };
        assert_eq!(
            end,
            crate::graph::TryRecvError::Ended,
            "the kicked stream ends"
        );
    }

    #[test]
    fn remote_peer_reaches_local_agent_and_rfh_goes_both_ways() {
        let g = graph();
        let (ha, mut ra) = agent(&g, A);
        let (mut src, mut ev) = g.remote_source(16);
        assert!(src.watch(A));
        update(&g, &ha, 7);
        assert_eq!(
            events(&mut ev),
            vec![SourceEvent::Node {
                about: A,
                node: Arc::new(node(7))
            }]
        );
        // Coderd's peer X: node, then tunnel to A.
        assert!(src.upsert_node(X, node(3)));
        assert!(drain(&mut ra).is_empty(), "no tunnel yet");
        assert!(src.add_tunnel(X, A));
        assert!(src.add_tunnel(X, A), "idempotent");
        assert_eq!(drain(&mut ra), vec![(X, Kind::Node, 3)]);
        assert_eq!(g.tunnel_count(), 1);
        assert_eq!(g.remote_peer_count(), 1);
        src.upsert_node(X, node(4));
        assert_eq!(drain(&mut ra), vec![(X, Kind::Node, 4)]);
        // The agent acks X: the source gets it; X acks the agent: the agent gets it.
        rfh(&g, &ha, X);
        assert_eq!(
            events(&mut ev),
            vec![SourceEvent::ReadyForHandshake { about: A, to: X }]
        );
        assert!(src.ready_for_handshake(X, A));
        assert_eq!(drain(&mut ra), vec![(X, Kind::ReadyForHandshake, 0)]);
        // X leaves gracefully.
        assert!(src.disconnected(X));
        assert_eq!(drain(&mut ra), vec![(X, Kind::Disconnected, 0)]);
        assert_eq!(g.tunnel_count(), 0);
        assert_eq!(g.remote_peer_count(), 0);
        assert!(!src.ready_for_handshake(X, A), "no tunnel any more");
    }

    #[test]
    fn local_peers_stay_local() {
        let g = graph();
        let (ha, _ra) = agent(&g, A);
        let (hc, _rc) = g.connect(C, "c".into(), CoordinateeAuth::Client { agent_id: A });
        let (mut src, mut ev) = g.remote_source(16);
        src.watch(A);
        let tunnel = CoordinateRequest {
            add_tunnel: Some(proto::tailnet::v2::coordinate_request::Tunnel {
                id: Bytes::copy_from_slice(A.as_bytes()),
            }),
            ..Default::default()
        };
        g.handle(&hc, tunnel).unwrap();
        rfh(&g, &ha, C);
        assert!(
            events(&mut ev).is_empty(),
            "RFH to a local client is not passed on"
        );
    }

    #[test]
    fn lost_remote_peer_and_dropped_source_are_lost_to_the_agent() {
        let g = graph();
        let (_ha, mut ra) = agent(&g, A);
        let (mut src, _ev) = g.remote_source(16);
        let y = Uuid::from_u128(0x2);
        for (p, d) in [(X, 1), (y, 2)] {
            src.upsert_node(p, node(d));
            src.add_tunnel(p, A);
        }
        drain(&mut ra);
        assert!(src.lost(X));
        assert_eq!(drain(&mut ra), vec![(X, Kind::Lost, 0)]);
        drop(src);
        assert_eq!(drain(&mut ra), vec![(y, Kind::Lost, 0)]);
        assert_eq!(g.remote_peer_count(), 0);
        assert_eq!(g.tunnel_count(), 0);
    }

    #[test]
    fn remote_peer_known_before_the_agent_connects_is_in_its_init_batch() {
        let g = graph();
        let (mut src, _ev) = g.remote_source(16);
        src.upsert_node(X, node(5));
        src.add_tunnel(X, A);
        let (ha, mut ra) = agent(&g, A);
        assert_eq!(drain(&mut ra), vec![(X, Kind::Node, 5)]);
        // The agent leaves and comes back: the tunnel to it survives, X is sent again.
        drop(ha);
        let (_ha, mut ra) = agent(&g, A);
        assert_eq!(drain(&mut ra), vec![(X, Kind::Node, 5)]);
    }

    #[test]
    fn watch_reports_node_at_once_and_the_local_peers_removal() {
        let g = graph();
        let (ha, _ra) = agent(&g, A);
        update(&g, &ha, 9);
        let (mut src, mut ev) = g.remote_source(16);
        src.watch(A);
        assert_eq!(
            events(&mut ev),
            vec![SourceEvent::Node {
                about: A,
                node: Arc::new(node(9))
            }]
        );
        drop(ha);
        assert_eq!(
            events(&mut ev),
            vec![SourceEvent::Gone {
                about: A,
                kind: Kind::Lost
            }]
        );
        let (ha, _ra) = agent(&g, A);
        let bye = CoordinateRequest {
            disconnect: Some(Disconnect {}),
            ..Default::default()
        };
        g.handle(&ha, bye).unwrap();
        assert_eq!(
            events(&mut ev),
            vec![SourceEvent::Gone {
                about: A,
                kind: Kind::Disconnected
            }]
        );
        // Dropping the source ends the watch and leaves no entry behind.
        drop(src);
        assert_eq!(ev.try_recv(), Some(None));
        assert!(g.shards.lock_one(A).peers.is_empty());
    }

    #[test]
    fn one_peer_through_several_sources_best_binding_wins() {
        let g = graph();
        let (_h1, mut r1) = agent(&g, A);
        let (_h2, mut r2) = agent(&g, A2);
        let (mut s1, _e1) = g.remote_source(16);
        let (mut s2, _e2) = g.remote_source(16);
        // X (e.g. coderd's server tailnet) dials both agents: seen through both bridges.
        s1.upsert_node(X, node(1));
        s1.add_tunnel(X, A);
        s2.upsert_node(X, node(1));
        s2.add_tunnel(X, A2);
        assert_eq!(drain(&mut r1), vec![(X, Kind::Node, 1)]);
        assert_eq!(drain(&mut r2), vec![(X, Kind::Node, 1)]);
        assert_eq!(g.remote_peer_count(), 1);
        assert_eq!(bindings_of(&g, X).len(), 2);
        // The newest binding wins for every tunnel peer.
        s2.upsert_node(X, node(2));
        assert_eq!(drain(&mut r1), vec![(X, Kind::Node, 2)]);
        assert_eq!(drain(&mut r2), vec![(X, Kind::Node, 2)]);
        // s2 dies: A2's only link to X is gone (LOST); A falls back to s1's node.
        drop(s2);
        assert_eq!(drain(&mut r2), vec![(X, Kind::Lost, 0)]);
        assert_eq!(drain(&mut r1), vec![(X, Kind::Node, 1)]);
        assert_eq!(g.remote_peer_count(), 1);
        assert_eq!(g.tunnel_count(), 1);
        // A tunnel held by two sources survives losing one of them.
        let (mut s3, _e3) = g.remote_source(16);
        s3.upsert_node(X, node(3));
        s3.add_tunnel(X, A);
        assert_eq!(drain(&mut r1), vec![(X, Kind::Node, 3)]);
        assert_eq!(g.tunnel_count(), 1);
        assert!(s1.lost(X));
        assert!(
            drain(&mut r1).is_empty(),
            "s3 still links X to A with the best node"
        );
        assert!(s3.remove_tunnel(X, A));
        assert_eq!(drain(&mut r1), vec![(X, Kind::Disconnected, 0)]);
        drop(s3);
        drop(s1);
        assert_eq!(g.remote_peer_count(), 0);
        assert_eq!(g.tunnel_count(), 0);
        assert!(
            !g.shards.lock_one(X).peers.contains_key(&X),
            "X's entry is gone (A and A2 may share its shard)"
        );
    }

    #[test]
    fn a_locally_connected_id_is_not_taken_over_by_a_source() {
        let g = graph();
        let (_hx, _rx) = agent(&g, X);
        let (mut src, _ev) = g.remote_source(16);
        assert!(!src.upsert_node(X, node(1)));
        assert!(!src.add_tunnel(X, A));
        assert_eq!(g.remote_peer_count(), 0);
    }

    #[test]
    fn a_full_source_queue_overflows_once_and_is_counted() {
        let g = graph();
        let (ha, _ra) = agent(&g, A);
        let (mut src, mut ev) = g.remote_source(2);
        src.watch(A);
        for d in 1..=4 {
            update(&g, &ha, d);
        }
        let got = events(&mut ev);
        assert_eq!(got.len(), 3, "{got:?}");
        assert_eq!(got[2], SourceEvent::Overflow);
        assert_eq!(g.metrics.remote_source_overflows.get(), 1);
        assert_eq!(ev.try_recv(), Some(Some(SourceEvent::Overflow)));
    }

    /// The watch-all source remembers graceful leaves that fell into its overflow (not LOST
    /// ones), and hands them over with the re-sync; a peer that left and came back is both live
    /// and a leaver (its earlier rows must go).
    #[test]
    fn watch_all_overflow_remembers_graceful_leaves_for_the_resync() {
        let g = graph();
        let (_src, mut ev) = g.remote_source_all(2).unwrap();
        let (ha, _ra) = agent(&g, A);
        update(&g, &ha, 1);
        update(&g, &ha, 2);
        assert_eq!(events(&mut ev).last(), Some(&SourceEvent::Overflow));
        let (hx, _rx) = agent(&g, X);
        let disconnect = CoordinateRequest {
            disconnect: Some(Disconnect {}),
            ..Default::default()
        };
        let _ = g.handle(&hx, disconnect.clone());
        drop(hx);
        let (hc, _rc) = agent(&g, C);
        drop(hc); // LOST: not remembered
        let (ha2, _ra2) = agent(&g, A2);
        let _ = g.handle(&ha2, disconnect);
        drop(ha2);
        let (ha2b, _ra2b) = agent(&g, A2); // back again
        let r = g.resync_all().unwrap();
        let mut left = r.left_gracefully.clone();
        left.sort();
        let mut want = vec![X, A2];
        want.sort();
        assert_eq!(left, want);
        assert_eq!(r.leaves_forgotten, 0);
        let mut live: Vec<Uuid> = r.peers.iter().map(|p| p.id).collect();
        live.sort();
        let mut want = vec![A, A2];
        want.sort();
        assert_eq!(live, want);
        // Taken: the next re-sync starts empty.
        assert!(g.resync_all().unwrap().left_gracefully.is_empty());
        drop(ha2b);
    }

    #[test]
    fn concurrent_sources_keep_each_sources_order_at_the_receiver() {
        let g = graph();
        let (_ha, mut ra) = agent(&g, A);
        let run = |base: i32| {
            let g = g.clone();
            std::thread::spawn(move || {
                let (mut s, _e) = g.remote_source(16);
                s.upsert_node(X, node(base));
                s.add_tunnel(X, A);
                for d in 1..200 {
                    s.upsert_node(X, node(base + d));
                }
                s
            })
        };
        let (t1, t2) = (run(10_000), run(20_000));
        let (s1, s2) = (t1.join().unwrap(), t2.join().unwrap());
        let got = drain(&mut ra);
        for base in [10_000, 20_000] {
            let seq: Vec<i32> = got
                .iter()
                .filter(|(_, k, d)| *k == Kind::Node && (base..base + 10_000).contains(d))
                .map(|(_, _, d)| *d)
                .collect();
            assert!(seq.windows(2).all(|w| w[0] < w[1]), "{seq:?}");
        }
        drop(s1);
        drop(s2);
        let last = drain(&mut ra);
        assert_eq!(last.last().map(|u| u.1), Some(Kind::Lost));
        assert!(last.iter().filter(|u| u.1 == Kind::Lost).count() == 1);
    }
}
