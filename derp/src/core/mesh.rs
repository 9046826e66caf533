//! The relay's side of a mesh peer, independent of how the peer is reached: the bounded queue
//! of packets waiting to be forwarded to it, and the presence it announced.
//!
//! Why it is in the core: the packet path must hand a packet for a key on another relay to that
//! relay without waiting and without knowing the transport. A [`MeshForwarder`] is what the
//! registry stores as a key's mesh route; the packet path pushes into its queue and moves on. A
//! link (today the DERP-over-HTTP mesh client in [`crate::mesh`]; a QUIC link could be another)
//! owns the receiving end ([`ForwardReceiver`], from [`Server::add_mesh_peer`]), writes what it
//! takes from it as ForwardPacket frames, and reports what the peer announced through
//! [`Server::mesh_peer_present`] and [`Server::mesh_peer_gone`].
//!
//! Semantics follow derper's `AddPacketForwarder`/`RemovePacketForwarder`: a local connection
//! always wins over a mesh route; a key announced by several peers keeps them all, the first
//! announcer first; when a key's last route and last local connection are gone, every local
//! client that received packets from it gets PeerGone(Disconnected) (derper's
//! `notePeerGoneFromRegion`). A packet that arrived as ForwardPacket is never forwarded again.
//!
//! A link that announces this relay's own clients to a peer (the QUIC mesh; a DERP mesh peer is
//! a watcher connection instead) takes a [`PresenceFeed`]: a bounded queue of presence changes
//! that starts with the complete list. When changes come faster than the link sends them, the
//! queue is not grown: it is emptied, marked overflowed (`derp_mesh_presence_overflows`), and the
//! link asks for the complete list again ([`Server::resync_presence`]), which the peer applies
//! as a replacement, so nothing is lost and nothing is unbounded.
//!
//! Must never: block or allocate in `MeshForwarder::forward` beyond the queue's own slot, or
//! let a slow peer hold packets without bound (the queue is bounded, overflow is dropped and
//! counted in `derp_mesh_forward_dropped{peer}`).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};

use bytes::Bytes;
use prometheus::{IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry};
use proto::derp::{KEY_LEN, PACKET_PREFIX_LEN};
use proto::key::NodePublic;
use tokio::sync::{mpsc, Notify};

#[cfg(doc)]
use crate::core::server::Server;

/// Identifies a mesh peer (one outbound mesh link), process-unique.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct MeshPeerId(pub u32);

/// Default bound of a mesh peer's forward queue (packets).
pub const DEFAULT_FORWARD_QUEUE: usize = 4096;

/// One packet waiting to be forwarded: its destination and the RecvPacket frame the packet path
/// built (`05 len src payload`), so the source and payload are borrowed from it, not copied.
#[derive(Debug, Clone)]
pub struct ForwardItem {
    /// The destination key (a client of the mesh peer).
    pub dst: NodePublic,
    frame: Bytes,
}

impl ForwardItem {
    pub(crate) fn new(dst: NodePublic, recv_frame: Bytes) -> Self {
        Self {
            dst,
            frame: recv_frame,
        }
    }

    /// The sender's key.
    pub fn src(&self) -> NodePublic {
        let mut k = [0u8; KEY_LEN];
        k.copy_from_slice(&self.frame[PACKET_PREFIX_LEN - KEY_LEN..PACKET_PREFIX_LEN]);
        NodePublic::from_bytes(k)
    }

    /// The packet bytes.
    pub fn payload(&self) -> &[u8] {
        &self.frame[PACKET_PREFIX_LEN..]
    }

    /// The whole RecvPacket frame (`05 len src payload`) the receiving relay will write.
    pub fn recv_frame(&self) -> &[u8] {
        &self.frame
    }
}

/// What the packet path sees of a mesh peer: a name, a bounded queue and its counters.
#[derive(Debug)]
pub struct MeshForwarder {
    id: MeshPeerId,
    name: String,
    tx: mpsc::Sender<ForwardItem>,
    dropped: IntCounter,
    connected: IntGauge,
}

impl MeshForwarder {
    /// Process-unique id of this peer.
    pub fn id(&self) -> MeshPeerId {
        self.id
    }

    /// The peer's name as configured (host or URL).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Queues one packet for the peer; `false` (and counted) when the queue is full or the link
    /// is gone for good.
    pub(crate) fn forward(&self, item: ForwardItem) -> bool {
        if self.tx.try_send(item).is_ok() {
            true
        } else {
            self.dropped.inc();
            false
        }
    }

    /// Counts `n` queued packets the link discarded (it went down before writing them).
    pub fn count_discarded(&self, n: u64) {
        self.dropped.inc_by(n);
    }

    /// Marks the link up or down (`derp_mesh_peer_connected{peer}`).
    pub fn set_connected(&self, up: bool) {
        self.connected.set(i64::from(up));
    }

    /// Whether the link is up.
    pub fn is_connected(&self) -> bool {
        self.connected.get() != 0
    }

    /// Packets waiting in the forward queue now.
    pub fn queued(&self) -> usize {
        self.tx.max_capacity().saturating_sub(self.tx.capacity())
    }

    /// Packets for this peer dropped so far (queue full or link down).
    pub fn dropped(&self) -> u64 {
        self.dropped.get()
    }
}

/// The receiving end of a forwarder's queue, owned by the peer's link.
pub type ForwardReceiver = mpsc::Receiver<ForwardItem>;

/// A change of this relay's local presence, for a link announcing it to a peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PresenceEvent {
    /// A complete list follows.
    SyncStart,
    /// A local client with this key is connected.
    Present(NodePublic),
    /// The last local connection of this key left.
    Gone(NodePublic),
    /// The list started by `SyncStart` is complete.
    SyncEnd,
}

/// Bounded queue of presence changes for one link (see the module doc).
#[derive(Debug)]
pub struct PresenceFeed {
    pub(crate) id: u64,
    cap: usize,
    state: Mutex<FeedState>,
    notify: Notify,
    overflows: IntCounter,
}

#[derive(Debug, Default)]
struct FeedState {
    events: VecDeque<PresenceEvent>,
    overflowed: bool,
}

static NEXT_FEED: AtomicU64 = AtomicU64::new(1);

impl PresenceFeed {
    fn lock(&self) -> std::sync::MutexGuard<'_, FeedState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues one change; on overflow empties the queue and asks for a resync instead.
    pub(crate) fn push(&self, ev: PresenceEvent) {
        {
            let mut g = self.lock();
            if g.overflowed {
                return;
            }
            if g.events.len() >= self.cap {
                g.events.clear();
                g.overflowed = true;
                self.overflows.inc();
            } else {
                g.events.push_back(ev);
            }
        }
        self.notify.notify_one();
    }

    /// Replaces the queue with a complete list (called under the registry's control lock, so
    /// no change can fall between the list and the next change).
    pub(crate) fn load(&self, keys: impl Iterator<Item = NodePublic>) {
        {
            let mut g = self.lock();
            g.events.clear();
            g.overflowed = false;
            g.events.push_back(PresenceEvent::SyncStart);
            g.events.extend(keys.map(PresenceEvent::Present));
            g.events.push_back(PresenceEvent::SyncEnd);
        }
        self.notify.notify_one();
    }

    /// Waits for changes and moves them into `out`. Returns `true` if the queue overflowed
    /// since the last call: the caller must ask for a resync ([`Server::resync_presence`]).
    pub async fn next(&self, out: &mut Vec<PresenceEvent>) -> bool {
        loop {
            {
                let mut g = self.lock();
                if g.overflowed {
                    return true;
                }
                if !g.events.is_empty() {
                    out.extend(g.events.drain(..));
                    return false;
                }
            }
            self.notify.notified().await;
        }
    }
}

/// Mesh metrics (per peer, labelled with its configured name).
#[derive(Debug)]
pub(crate) struct MeshMetrics {
    dropped: IntCounterVec,
    connected: IntGaugeVec,
    /// (key, peer) routes currently held.
    pub routes: IntGauge,
    presence_overflows: IntCounter,
    /// QUIC mesh connections and units refused, by reason (see `crate::mesh::quic`).
    pub quic_rejected: IntCounterVec,
    /// Packets the QUIC mesh sent on a stream because they exceeded the datagram limit.
    pub quic_stream_packets: IntCounter,
    /// QUIC mesh datagrams that never arrived (gaps in their sequence numbers).
    pub quic_datagrams_lost: IntCounter,
    /// QUIC mesh datagrams that arrived after being counted lost (or twice).
    pub quic_datagrams_late: IntCounter,
    next_id: AtomicU32,
    /// Every forwarder created and still alive (the status page lists them); dead entries are
    /// pruned when a peer is added.
    peers: Mutex<Vec<Weak<MeshForwarder>>>,
}

impl MeshMetrics {
    /// A new peer's forwarder with a queue of `depth` packets (at least 1) and its receiver.
    pub(crate) fn new_peer(
        &self,
        name: &str,
        depth: usize,
    ) -> (Arc<MeshForwarder>, ForwardReceiver) {
        let (tx, rx) = mpsc::channel(depth.max(1));
        let fwd = Arc::new(MeshForwarder {
            id: MeshPeerId(self.next_id.fetch_add(1, Ordering::Relaxed)),
            name: name.to_string(),
            tx,
            dropped: self.dropped.with_label_values(&[name]),
            connected: self.connected.with_label_values(&[name]),
        });
        let mut peers = self.peers.lock().unwrap_or_else(|p| p.into_inner());
        peers.retain(|w| w.strong_count() > 0);
        peers.push(Arc::downgrade(&fwd));
        drop(peers);
        (fwd, rx)
    }

    /// A presence feed of `cap` changes (at least 16) before it overflows.
    pub(crate) fn new_feed(&self, cap: usize) -> Arc<PresenceFeed> {
        Arc::new(PresenceFeed {
            id: NEXT_FEED.fetch_add(1, Ordering::Relaxed),
            cap: cap.max(16),
            state: Mutex::new(FeedState::default()),
            notify: Notify::new(),
            overflows: self.presence_overflows.clone(),
        })
    }

    /// The live forwarders, in creation order.
    pub(crate) fn peers(&self) -> Vec<Arc<MeshForwarder>> {
        let peers = self.peers.lock().unwrap_or_else(|p| p.into_inner());
        peers.iter().filter_map(Weak::upgrade).collect()
    }

    pub(crate) fn new(registry: &Registry) -> prometheus::Result<Self> {
        let m = MeshMetrics {
            dropped: IntCounterVec::new(
                Opts::new(
                    "derp_mesh_forward_dropped",
                    "Packets for a mesh peer dropped: its forward queue was full or its link went \
                     down before they were written.",
                ),
                &["peer"],
            )?,
            connected: IntGaugeVec::new(
                Opts::new(
                    "derp_mesh_peer_connected",
                    "1 while the outbound mesh link to the peer is up.",
                ),
                &["peer"],
            )?,
            routes: IntGauge::new(
                "derp_mesh_routes",
                "Keys routed to a mesh peer (one per key and announcing peer).",
            )?,
            presence_overflows: IntCounter::new(
                "derp_mesh_presence_overflows",
                "Times a mesh link's queue of presence changes overflowed and the complete list \
                 was sent again instead.",
            )?,
            quic_rejected: IntCounterVec::new(
                Opts::new(
                    "derp_mesh_quic_rejected",
                    "QUIC mesh connections closed or units dropped because of bad input, by \
                     reason (auth: wrong mesh key; bad_packet; bad_message; handshake).",
                ),
                &["reason"],
            )?,
            quic_stream_packets: IntCounter::new(
                "derp_mesh_quic_stream_packets",
                "Packets the QUIC mesh sent on a stream of their own because they exceeded the \
                 path's datagram limit.",
            )?,
            quic_datagrams_lost: IntCounter::new(
                "derp_mesh_quic_datagrams_lost",
                "QUIC mesh datagrams a peer sent that never arrived here, wherever they were lost \
                 (the path, or the receive buffer inside QUIC that drops the oldest when full): \
                 gaps in their sequence numbers, counted once a gap is 4096 behind the highest \
                 number or the connection ends.",
            )?,
            quic_datagrams_late: IntCounter::new(
                "derp_mesh_quic_datagrams_late",
                "QUIC mesh datagrams that arrived after they had been counted lost (or twice); \
                 they are delivered.",
            )?,
            next_id: AtomicU32::new(1),
            peers: Mutex::new(Vec::new()),
        };
        registry.register(Box::new(m.dropped.clone()))?;
        registry.register(Box::new(m.connected.clone()))?;
        registry.register(Box::new(m.routes.clone()))?;
        registry.register(Box::new(m.presence_overflows.clone()))?;
        registry.register(Box::new(m.quic_rejected.clone()))?;
        registry.register(Box::new(m.quic_stream_packets.clone()))?;
        registry.register(Box::new(m.quic_datagrams_lost.clone()))?;
        registry.register(Box::new(m.quic_datagrams_late.clone()))?;
        Ok(m)
    }
}
