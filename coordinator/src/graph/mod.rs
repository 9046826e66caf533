//! The peer graph: Coder's in-memory coordinator semantics behind a small concurrent API.
//!
//! Why: every coordination session (v2 dRPC or v1 JSON, agent or client) feeds its peer's requests
//! into one shared graph of peers and tunnels, and drains what the graph tells it. The rules are
//! specified by a pure state machine, `graph/model` (compiled for tests only: it is the model of a
//! differential property test that runs it side by side with this module); [`core`] holds the
//! vocabulary both share. This module applies the same rules to a
//! **sharded** peer table so that a node update never waits for updates of unrelated peers, and it
//! pushes each resulting update straight into the receiving connection's bounded queue
//! ([`PeerReceiver`] is the session's end of that queue).
//!
//! # Data layout
//!
//! Peers are split by id hash into `N` shards (default: 4 × CPUs, at least 16), each a
//! `std::sync::Mutex`. Everything about peer X lives in X's shard (an *entry*): X's current
//! connection, X's node, and X's *links* — one per tunnel peer R, saying whether the tunnels
//! X → R and R → X exist, plus a cached reference to R's current connection. The de-duplication
//! memory (`sent`: the last node each connection was told about each other peer) lives with the
//! receiving connection, in its outbox, behind that outbox's own small mutex.
//!
//! An entry may also describe a **remote peer** (one this process does not serve, reported by a
//! [`RemoteSource`]: its per-source bindings and, in `node`, the best binding's node) and carry
//! the **watchers** of a local peer (sources that pass on what it does). Both live in the peer's
//! shard like everything else about it, so the invariants and the ordering argument below cover
//! them unchanged; see [`remote`].
//!
//! A fan-out builds its update once (one `Arc`, the node moved in from the request, never copied
//! by the graph) and queues a pointer to it per receiver; each receiver copies it into an owned
//! protobuf response when it takes it, outside every graph lock (see `outbox.rs`). The outbox is
//! embedded in its connection and compact, and the fan-out loop warms receivers a few places
//! ahead, so a large fan-out costs about the same per receiver as a small one.
//!
//! # Invariants
//!
//! * **I1 (link cache):** whenever no one holds X's shard lock, `X.links[R].conn` is R's current
//!   connection (or `None` if R is not connected).
//! * **I2 (symmetry):** `X.links[R].out` ⇔ `R.links[X].inc`; a link exists only while one of the two
//!   is set; an entry exists only while it has a connection or a link.
//! * **I3:** X has a node only while connected; tunnels *from* X exist only while X is connected
//!   (removal deletes them, as Coder's `removePeerLocked` does); tunnels *to* X survive.
//! * **Who changes what, holding which locks:**
//!   - X's node: X's shard (update_self).
//!   - a link X–R: both shards (add/remove tunnel) or X's whole neighbourhood (removal of X).
//!   - X's connection (connect, replace, removal): X's shard **and the shard of every peer linked to
//!     X** ("X's neighbourhood"), so every cached `R.links[X].conn` is updated in the same critical
//!     section (I1).
//!   - `sent[X]` in any outbox: only while holding X's shard (plus that outbox's mutex).
//!
//! # Lock order (deadlock freedom)
//!
//! Shard mutexes are only taken in increasing index order (`shard.rs` is the only code that locks
//! them), then at most one outbox mutex, which is a leaf: nothing is locked while holding it. A
//! per-connection mutex serializes concurrent [`PeerGraph::handle`] calls on one handle; it is taken
//! before any shard lock and never while holding one. Nothing blocks while holding a lock: there is
//! no `.await`, no I/O and no allocation-heavy encoding in the graph. Which locks each operation
//! takes:
//!
//! | operation | locks |
//! |---|---|
//! | update_self of X (the hot path) | X's shard only |
//! | ready_for_handshake X → R | X's shard only (R's connection via I1) |
//! | add/remove tunnel X → R | X's and R's shards |
//! | connect, disconnect, lost, kick of X | X's neighbourhood (1 + distinct shards of X's links) |
//! | shutdown | all shards |
//!
//! The neighbourhood is found optimistically: lock X's shard, read the shards of X's links; if one
//! is missing, release and lock the union in index order, re-check (X's links only change under
//! X's lock, so a set that is complete while X's lock is held stays complete); after three rounds
//! of churn, lock every shard. So a client with one tunnel costs two locks; an agent with thousands
//! of clients locks every shard, briefly, when it connects or leaves — not when it updates.
//!
//! # Ordering argument
//!
//! **Every push of an update *about* peer X — NODE, LOST, DISCONNECTED, READY_FOR_HANDSHAKE, to any
//! receiver — is made while holding X's shard lock**, and its content (X's node, whether X is
//! connected, whether X shares a tunnel) is read under that same lock: update_self of X holds X's
//! shard; add/remove tunnel hold both endpoints' shards and push only about those two; connect of
//! R sends its init batch (about each linked X) holding R's whole neighbourhood; removal of X
//! pushes about X only; ready_for_handshake from X pushes about X only. A push appends to the
//! receiver's FIFO queue before the lock is released. Hence, for each receiver, the updates about
//! X arrive in exactly the order X's state changed, and the receiver's `sent[X]` evolves exactly as
//! in the single-lock [`core`] restricted to X's history. In particular a receiver never sees an
//! older node of X after a newer one, never a NODE of X after the LOST/DISCONNECTED that ended that
//! connection of X, and LOST/DISCONNECTED only about a peer it holds a NODE for. Updates about
//! *different* peers may interleave differently at different receivers (they did not share a lock);
//! no rule relates them. A closed outbox refuses every push, so nothing follows a close.
//!
//! Races this covers, spelled out:
//! * **Tunnel X → Y added while Y updates its node:** both take Y's shard. Either the update comes
//!   first (add_tunnel then reads the new node and sends it to X) or the link exists first (the
//!   update fans out to X). X ends with Y's latest node, in order.
//! * **X leaves while Y adds a tunnel to X:** both take X's shard. If the add is first, the link is
//!   there when X's removal re-checks its neighbourhood (so Y's shard is locked too) and Y is told
//!   (if it was told X's node); if the removal is first, the add finds X absent and records a tunnel
//!   to an absent peer (which survives, like Coder's).
//! * **X's connection replaced while R fans out to X:** R is linked to X, so the replacement holds
//!   R's shard. Either the fan-out is first (it reaches the old connection, which is then closed, and
//!   the new connection's init batch carries R's latest node) or the replacement is first (the
//!   fan-out finds the new connection through I1, after its init batch).
//! * **Two peers update concurrently and share a receiver:** different shard locks, one outbox
//!   mutex; each update's position is consistent with its own peer's order.
//!
//! # Back-pressure and liveness
//!
//! * **Sends never block.** A push into a full queue (default 512 responses) marks that outbox
//!   *failed*: it refuses every later push, so its receiver sees a prefix of its stream, never a
//!   gap. After its locks are released, the operation removes the failed connection like Coder does
//!   (tunnel peers get DISCONNECTED "failed update"; `coordinator_peers_kicked_total{reason=
//!   "queue_full"}`); that removal can fill other queues, so kicks run as a worklist (bounded: each
//!   connection fails at most once). Any operation that meets a failed connection of its own peer
//!   (a request, reconnect, drop, shutdown) removes it as kicked first, so the window between the
//!   failed push and the removal is invisible to that peer's session: once it sees the stream end or
//!   `Flow::Close`, the removal is complete. The stream is closed last in a removal, after the tunnel
//!   peers were told.
//! * **Liveness is per connection.** Each connection has a [`ConnId`] (peer id + generation). A
//!   replaced, kicked or disconnected connection's later events (including dropping its
//!   [`PeerHandle`]) are no-ops, so they never mark a newer connection of the same peer lost.
//! * **A request is applied as consecutive steps** (update_self, add_tunnel, remove_tunnel,
//!   disconnect, ready_for_handshake), each atomic; it is validated as a whole first, so a refused
//!   request changes nothing. Another peer's operation may fall between two steps, which is
//!   indistinguishable from this peer having sent the steps as separate requests.
//! * **Chunking:** an init batch becomes responses of at most [`MAX_PEER_UPDATES_PER_RESPONSE`]
//!   updates each (each counts against the queue).

pub mod core;
mod keys;
#[cfg(test)]
mod model;
mod outbox;
pub mod remote;
mod shard;

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use prometheus::{
    Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
};
use proto::tailnet::v2::coordinate_response::peer_update::Kind;
use proto::tailnet::v2::{CoordinateRequest, CoordinateResponse, Node};
use uuid::Uuid;

pub use self::core::{
    CloseReason, ConnId, CoordinateError, Flow, NodeLimits, ERR_COORDINATOR_CLOSED, ERR_OVERWRITTEN,
};
pub use self::outbox::{Encoded, PeerReceiver, TryRecvError};
use self::outbox::{Outbox, PushError, Update};
pub use self::remote::{
    LocalPeerState, RemoteSource, Resync, SourceEvent, SourceEvents, DEFAULT_SOURCE_QUEUE,
    RESYNC_LEAVES,
};
use self::shard::{Conn, Link, Locked, Shards};
use crate::authz::{AuthzError, CoordinateeAuth};

/// Coder's `maxPeerUpdatesPerMessage`: keeps every response far below dRPC's 4 MiB limit.
pub const MAX_PEER_UPDATES_PER_RESPONSE: usize = 1024;
/// pgcoord's error for sessions of a coordinator whose heartbeats fail.
pub const ERR_UNHEALTHY: &str = "coordinator unhealthy";

/// Coder's `ResponseBufferSize`.
pub const DEFAULT_RESPONSE_QUEUE: usize = 512;
/// Default [`GraphConfig::response_queue_bytes`] (8 MiB; see
/// [`crate::config::DEFAULT_RESPONSE_BUFFER_BYTES`]).
pub const DEFAULT_RESPONSE_QUEUE_BYTES: usize = 8 << 20;
/// Upper bound on the shard count.
pub const MAX_SHARDS: usize = 4096;
/// How many receivers ahead a fan-out warms (see [`PeerGraph::update_self`]).
const WARM_AHEAD: usize = 8;

/// Graph settings.
#[derive(Clone, Debug)]
pub struct GraphConfig {
    /// Responses queued per connection before that peer is removed (Coder: 512).
    pub response_queue: usize,
    /// Bytes queued per connection (encoded nodes and responses, see `outbox.rs`) before that
    /// peer is removed like for a full queue; counted in `coordinator_outbox_byte_overflows_total`.
    pub response_queue_bytes: usize,
    /// How large a node may be; a larger one ends its session (see [`NodeLimits`]).
    pub node_limits: NodeLimits,
    /// Most tunnels (`add_tunnel` destinations) one peer may hold; one more ends its session
    /// with [`CoordinateError::TooManyTunnels`].
    pub max_tunnels_per_peer: usize,
}

/// Default [`GraphConfig::max_tunnels_per_peer`]: far above one Coder Desktop client tunnelling
/// to every agent it can see.
pub const DEFAULT_MAX_TUNNELS_PER_PEER: usize = 1024;

impl Default for GraphConfig {
    fn default() -> Self {
        Self {
            response_queue: DEFAULT_RESPONSE_QUEUE,
            response_queue_bytes: DEFAULT_RESPONSE_QUEUE_BYTES,
            node_limits: NodeLimits::default(),
            max_tunnels_per_peer: DEFAULT_MAX_TUNNELS_PER_PEER,
        }
    }
}

/// The shard count [`PeerGraph::new`] uses: 4 × available CPUs rounded up to a power of two,
/// at least 16.
pub fn default_shards() -> usize {
    let cpus = std::thread::available_parallelism().map_or(4, |n| n.get());
    cpus.saturating_mul(4)
        .next_power_of_two()
        .clamp(16, MAX_SHARDS)
}

/// Errors building a graph.
#[derive(Debug, thiserror::Error)]
pub enum GraphError {
    /// A metric could not be registered (usually: registered twice in one registry).
    #[error("registering graph metrics: {0}")]
    Metrics(#[from] prometheus::Error),
}

#[derive(Clone, Debug)]
struct Metrics {
    /// `coordinator_peers{role="agent"|"client"|"other"}`.
    agents: IntGauge,
    clients: IntGauge,
    others: IntGauge,
    tunnels: IntGauge,
    node_updates_received: IntCounter,
    /// Time to apply one node update (store it, queue it to every tunnel peer).
    node_update_seconds: Histogram,
    peer_updates_sent: IntCounter,
    kicked: IntCounterVec,
    authz_failures: IntCounter,
    /// Live remote sources (see [`remote`]).
    remote_sources: IntGauge,
    /// Remote peers with at least one binding.
    remote_peers: IntGauge,
    /// Source queues that overflowed.
    remote_source_overflows: IntCounter,
    /// Remote operations refused because the peer id is connected locally.
    remote_conflicts: IntCounter,
    /// Encoded bytes of the nodes local connections hold in the graph.
    node_bytes: IntGauge,
    /// Node updates refused by [`NodeLimits`].
    nodes_over_limit: IntCounter,
    /// `add_tunnel` requests refused by [`GraphConfig::max_tunnels_per_peer`].
    tunnels_over_limit: IntCounter,
    /// Bytes queued in every outbox, and pushes refused by the byte bound.
    outbox: outbox::OutboxMetrics,
}

impl Metrics {
    fn new(reg: &Registry) -> Result<Self, prometheus::Error> {
        let peers = IntGaugeVec::new(
            Opts::new("coordinator_peers", "Connected coordination peers by role"),
            &["role"],
        )?;
        let m = Self {
            agents: peers.with_label_values(&["agent"]),
            clients: peers.with_label_values(&["client"]),
            others: peers.with_label_values(&["other"]),
            tunnels: IntGauge::new("coordinator_tunnels", "Tunnels in the peer graph")?,
            node_updates_received: IntCounter::new(
                "coordinator_node_updates_received_total",
                "update_self requests received",
            )?,
            node_update_seconds: Histogram::with_opts(
                HistogramOpts::new(
                    "coordinator_node_update_seconds",
                    "Time to apply one node update: store the node and queue it to every \
                     tunnel peer",
                )
                .buckets(vec![
                    0.000_01, 0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5,
                    0.005, 0.01, 0.025, 0.05, 0.1,
                ]),
            )?,
            peer_updates_sent: IntCounter::new(
                "coordinator_peer_updates_sent_total",
                "Peer updates queued to connections",
            )?,
            kicked: IntCounterVec::new(
                Opts::new(
                    "coordinator_peers_kicked_total",
                    "Connections closed by the coordinator (queue_full, overwritten, invalid_request)",
                ),
                &["reason"],
            )?,
            authz_failures: IntCounter::new(
                "coordinator_authz_failures_total",
                "Requests refused by authorization",
            )?,
            remote_sources: IntGauge::new(
                "coordinator_remote_sources",
                "Live sources of remote peers (sidecar bridge streams)",
            )?,
            remote_peers: IntGauge::new(
                "coordinator_remote_peers",
                "Remote peers in the peer graph (bound by at least one source)",
            )?,
            remote_source_overflows: IntCounter::new(
                "coordinator_remote_source_overflows_total",
                "Remote source queues that overflowed (the source is re-synchronised)",
            )?,
            remote_conflicts: IntCounter::new(
                "coordinator_remote_conflicts_total",
                "Remote peer updates refused because the peer id is connected locally",
            )?,
            node_bytes: IntGauge::new(
                "coordinator_graph_node_bytes",
                "Encoded bytes of the nodes of connected local peers held by the peer graph",
            )?,
            nodes_over_limit: IntCounter::new(
                "coordinator_nodes_over_limit_total",
                "Node updates refused by the node limits (the session is ended)",
            )?,
            tunnels_over_limit: IntCounter::new(
                "coordinator_tunnels_over_limit_total",
                "add_tunnel requests refused by the per-peer tunnel limit (the session is ended)",
            )?,
            outbox: outbox::OutboxMetrics {
                bytes: IntGauge::new(
                    "coordinator_outbox_bytes",
                    "Bytes (encoded nodes and responses) queued towards coordination peers",
                )?,
                byte_overflows: IntCounter::new(
                    "coordinator_outbox_byte_overflows_total",
                    "Peers kicked because their queued bytes reached the per-peer byte bound",
                )?,
            },
        };
        reg.register(Box::new(peers))?;
        reg.register(Box::new(m.tunnels.clone()))?;
        reg.register(Box::new(m.node_updates_received.clone()))?;
        reg.register(Box::new(m.node_update_seconds.clone()))?;
        reg.register(Box::new(m.peer_updates_sent.clone()))?;
        reg.register(Box::new(m.kicked.clone()))?;
        reg.register(Box::new(m.authz_failures.clone()))?;
        reg.register(Box::new(m.remote_sources.clone()))?;
        reg.register(Box::new(m.remote_peers.clone()))?;
        reg.register(Box::new(m.remote_source_overflows.clone()))?;
        reg.register(Box::new(m.remote_conflicts.clone()))?;
        reg.register(Box::new(m.node_bytes.clone()))?;
        reg.register(Box::new(m.nodes_over_limit.clone()))?;
        reg.register(Box::new(m.tunnels_over_limit.clone()))?;
        reg.register(Box::new(m.outbox.bytes.clone()))?;
        reg.register(Box::new(m.outbox.byte_overflows.clone()))?;
        Ok(m)
    }

    fn role(&self, auth: &CoordinateeAuth) -> &IntGauge {
        match auth.role() {
            "agent" => &self.agents,
            "client" => &self.clients,
            _ => &self.others,
        }
    }

    fn kick(&self, reason: CloseReason) {
        self.kicked.with_label_values(&[reason.as_str()]).inc();
    }
}

/// How a connection leaves the graph.
#[derive(Debug)]
enum Removal {
    /// Dropped without `disconnect`.
    Lost,
    /// Sent `disconnect`.
    Disconnect,
    /// Its queue overflowed.
    Kick,
    /// Sent a request that failed validation; the string is its final error.
    Invalid(String),
    /// The coordinator is shutting down.
    Shutdown,
    /// The coordinator became unhealthy (its HA store's heartbeats fail).
    Unhealthy,
}

impl Removal {
    /// (kind told to tunnel peers, reason, final error, close reason)
    fn parts(self) -> (Kind, &'static str, Option<String>, CloseReason) {
        match self {
            Removal::Lost => (Kind::Lost, "lost", None, CloseReason::Lost),
            Removal::Disconnect => (
                Kind::Disconnected,
                "graceful disconnect",
                None,
                CloseReason::Disconnect,
            ),
            Removal::Kick => (
                Kind::Disconnected,
                "failed update",
                None,
                CloseReason::QueueFull,
            ),
            Removal::Invalid(e) => (Kind::Lost, "lost", Some(e), CloseReason::InvalidRequest),
            Removal::Shutdown => (
                Kind::Lost,
                "coordinator close",
                Some(ERR_COORDINATOR_CLOSED.to_owned()),
                CloseReason::Shutdown,
            ),
            Removal::Unhealthy => (
                Kind::Lost,
                "coordinator unhealthy",
                Some(ERR_UNHEALTHY.to_owned()),
                CloseReason::Shutdown,
            ),
        }
    }
}

/// A byte count as a gauge step (node sizes are far below `i64::MAX`).
fn gauge_delta(bytes: usize) -> i64 {
    i64::try_from(bytes).unwrap_or(i64::MAX)
}

/// Connections whose queue overflowed during an operation; removed once its locks are released.
type Kicks = Vec<ConnId>;

/// The shared peer graph. Create one per coordinator with [`PeerGraph::new`].
#[derive(Debug)]
pub struct PeerGraph {
    shards: Shards,
    /// Set (with every shard locked) by [`PeerGraph::shutdown`].
    closed: AtomicBool,
    /// Set (with every shard locked) by [`PeerGraph::set_unhealthy`].
    unhealthy: AtomicBool,
    next_gen: AtomicU64,
    peers: AtomicUsize,
    tunnels: AtomicUsize,
    /// Remote peers with at least one binding (see [`remote`]).
    remote_peers: AtomicUsize,
    /// The one source that watches every local peer (the PostgreSQL store, see
    /// [`PeerGraph::remote_source_all`]).
    watch_all: std::sync::OnceLock<Arc<remote::SourceSink>>,
    /// Node key → entries whose node carries it (the relay's admission question).
    keys: keys::NodeKeyIndex,
    config: GraphConfig,
    metrics: Metrics,
}

/// A session's handle on its connection. Dropping it without a prior `disconnect` removes the peer
/// as LOST (a no-op if the connection was already disconnected, kicked or replaced).
#[derive(Debug)]
pub struct PeerHandle {
    graph: Arc<PeerGraph>,
    conn: Arc<Conn>,
    /// Serializes [`PeerGraph::handle`] calls on this connection (its requests apply in order).
    serial: Mutex<()>,
}

impl PeerHandle {
    /// The peer id.
    pub fn id(&self) -> Uuid {
        self.conn.id.peer
    }

    /// The connection id (peer id + generation).
    pub fn conn(&self) -> ConnId {
        self.conn.id
    }
}

impl Drop for PeerHandle {
    fn drop(&mut self) {
        let mut kicks = Kicks::new();
        self.graph.remove(self.conn.id, Removal::Lost, &mut kicks);
        self.graph.run_kicks(kicks);
    }
}

/// Counts queued updates and overflowing receivers while one operation pushes.
struct Pusher<'k> {
    sent: u64,
    kicks: &'k mut Kicks,
    /// The remote batch these updates belong to (see [`RemoteSource::begin_batch`]).
    batch: Option<u64>,
}

impl Pusher<'_> {
    fn mapping(&mut self, to: &Conn, u: &Arc<Update>) {
        match to.outbox.push_mapping(u, self.batch) {
            Ok(true) => self.sent += 1,
            Ok(false) | Err(PushError::Closed) => {}
            Err(PushError::Full) => self.kicks.push(to.id),
        }
    }
}

impl PeerGraph {
    /// A new, empty graph with [`default_shards`] shards whose metrics are registered in
    /// `registry`.
    pub fn new(config: GraphConfig, registry: &Registry) -> Result<Arc<Self>, GraphError> {
        Self::with_shards(config, default_shards(), registry)
    }

    /// Like [`PeerGraph::new`] with an explicit shard count (clamped to 1..=[`MAX_SHARDS`]).
    pub fn with_shards(
        config: GraphConfig,
        shards: usize,
        registry: &Registry,
    ) -> Result<Arc<Self>, GraphError> {
        let metrics = Metrics::new(registry)?;
        for g in [&metrics.agents, &metrics.clients, &metrics.others] {
            g.set(0);
        }
        // Present at zero from the start, so that dashboards and alerts see the series.
        for r in [
            CloseReason::QueueFull,
            CloseReason::Overwritten,
            CloseReason::InvalidRequest,
        ] {
            metrics.kicked.with_label_values(&[r.as_str()]);
        }
        Ok(Arc::new(Self {
            shards: Shards::new(shards.clamp(1, MAX_SHARDS)),
            closed: AtomicBool::new(false),
            unhealthy: AtomicBool::new(false),
            next_gen: AtomicU64::new(1),
            peers: AtomicUsize::new(0),
            tunnels: AtomicUsize::new(0),
            remote_peers: AtomicUsize::new(0),
            watch_all: std::sync::OnceLock::new(),
            keys: keys::NodeKeyIndex::default(),
            config,
            metrics,
        }))
    }

    /// Whether `id` has a live local connection.
    pub fn is_local(&self, id: Uuid) -> bool {
        let shard = self.shards.lock_one(id);
        shard.peers.get(&id).is_some_and(|e| e.conn.is_some())
    }

    /// Number of shards.
    pub fn shard_count(&self) -> usize {
        self.shards.len()
    }

    /// Connects peer `id`. An existing connection with the same id is closed with
    /// `error:"peer ID overwritten by new connection"`. The receiver's first response is the
    /// batched NODE update of every connected tunnel peer that has a node (if any).
    pub fn connect(
        self: &Arc<Self>,
        id: Uuid,
        name: String,
        auth: CoordinateeAuth,
    ) -> (PeerHandle, PeerReceiver) {
        let conn = Arc::new(Conn {
            id: ConnId {
                peer: id,
                gen: self.next_gen.fetch_add(1, Ordering::Relaxed),
            },
            id_bytes: Bytes::copy_from_slice(id.as_bytes()),
            name,
            auth,
            outbox: Outbox::new(
                self.config.response_queue,
                self.config.response_queue_bytes,
                self.metrics.outbox.clone(),
            ),
        });
        let receiver = PeerReceiver::new(conn.clone());
        tracing::debug!(peer = %id, name = %conn.name, role = conn.auth.role(), "coordinator peer connecting");
        let mut kicks = Kicks::new();
        {
            let mut l = self.shards.lock_neighbourhood(id);
            self.connect_locked(&mut l, &conn, &mut kicks);
        }
        self.run_kicks(kicks);
        (
            PeerHandle {
                graph: self.clone(),
                conn,
                serial: Mutex::new(()),
            },
            receiver,
        )
    }

    /// `conn` becomes its peer's connection. Holds the peer's neighbourhood.
    fn connect_locked(&self, l: &mut Locked<'_>, conn: &Arc<Conn>, kicks: &mut Kicks) {
        let id = conn.id.peer;
        if self.closed.load(Ordering::Acquire) {
            conn.outbox.close(Some(ERR_COORDINATOR_CLOSED.to_owned()));
            return;
        }
        if self.unhealthy.load(Ordering::Acquire) {
            conn.outbox.close(Some(ERR_UNHEALTHY.to_owned()));
            return;
        }
        // A predecessor whose queue overflowed was (logically) kicked before this connect.
        if let Some(old) = l.entry(id).and_then(|e| e.conn.clone()) {
            if old.outbox.is_failed() {
                self.remove_locked(l, old.id, Removal::Kick, kicks);
            }
        }
        let Some(e) = l.entry_or_default(id) else {
            conn.outbox.close(None);
            return;
        };
        let replaced = e.conn.replace(conn.clone());
        // Like Coder: the newcomer starts without a node; tunnel peers are not told.
        self.keys.replace(&mut e.node, None);
        e.updated_at = None;
        self.metrics
            .node_bytes
            .sub(gauge_delta(std::mem::take(&mut e.node_bytes)));
        self.notify_all_watcher(|| SourceEvent::Connected { about: id });
        let links: Vec<Uuid> = e.links.keys().copied().collect();
        match &replaced {
            Some(old) => {
                old.outbox.close(Some(ERR_OVERWRITTEN.to_owned()));
                self.metrics.kick(CloseReason::Overwritten);
                self.metrics.role(&old.auth).dec();
                tracing::debug!(peer = %id, "coordinator connection overwritten");
            }
            None => {
                self.peers.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.metrics.role(&conn.auth).inc();
        let mut batch = Vec::new();
        for x in links {
            let Some(xe) = l.entry(x) else { continue };
            if let Some(link) = xe.links.get_mut(&id) {
                link.conn = Some(conn.clone());
            }
            // A remote peer has no connection here; its id bytes live with its bindings.
            let x_bytes = match (&xe.conn, &xe.remote) {
                (Some(xc), _) => Some(xc.id_bytes.clone()),
                (None, Some(r)) => Some(r.id_bytes.clone()),
                (None, None) => None,
            };
            if let (Some(x_bytes), Some(node)) = (x_bytes, &xe.node) {
                if x != id {
                    batch.push((x, x_bytes, node.clone()));
                }
            }
        }
        if !batch.is_empty() {
            match conn
                .outbox
                .push_batch(batch, "init", MAX_PEER_UPDATES_PER_RESPONSE)
            {
                Ok(n) => self.metrics.peer_updates_sent.inc_by(n as u64),
                Err(PushError::Full) => kicks.push(conn.id),
                Err(PushError::Closed) => {}
            }
        }
    }

    /// Applies one request from `handle`'s connection. `Ok(Flow::Close)` means the stream is done
    /// (disconnect processed, or this connection was already removed). `Err` is fatal: the error
    /// response is already queued and the peer removed as LOST.
    pub fn handle(
        &self,
        handle: &PeerHandle,
        req: CoordinateRequest,
    ) -> Result<Flow, CoordinateError> {
        let _serial = handle.serial.lock().unwrap_or_else(|p| p.into_inner());
        let mut kicks = Kicks::new();
        let res = self.request(&handle.conn, req, &mut kicks);
        self.run_kicks(kicks);
        res
    }

    fn request(
        &self,
        conn: &Arc<Conn>,
        mut req: CoordinateRequest,
        kicks: &mut Kicks,
    ) -> Result<Flow, CoordinateError> {
        if self.closed.load(Ordering::Acquire) {
            return Ok(Flow::Close);
        }
        if conn.outbox.is_failed() {
            self.remove(conn.id, Removal::Kick, kicks);
            return Ok(Flow::Close);
        }
        let checked = core::validate(&conn.auth, &req).and_then(|()| {
            match req.update_self.as_ref().and_then(|u| u.node.as_ref()) {
                Some(node) => self.config.node_limits.check(node),
                None => Ok(0),
            }
        });
        let node_bytes = match checked {
            Ok(bytes) => bytes,
            Err(e) => {
                if !self.remove(conn.id, Removal::Invalid(e.to_string()), kicks) {
                    return Ok(Flow::Close);
                }
                if req.update_self.is_some() {
                    self.metrics.node_updates_received.inc();
                }
                match &e {
                    CoordinateError::Authz(a) => {
                        self.metrics.authz_failures.inc();
                        log_authz(conn.id, a);
                    }
                    e => {
                        if matches!(
                            e,
                            CoordinateError::TooManyEntries { .. }
                                | CoordinateError::NodeTooLarge { .. }
                        ) {
                            self.metrics.nodes_over_limit.inc();
                        }
                        tracing::info!(peer = %conn.id.peer, error = %e, "invalid coordinate request; closing")
                    }
                }
                return Err(e);
            }
        };
        // The node is moved into the graph (and shared by every receiver), never copied here.
        if let Some(node) = req.update_self.take().and_then(|u| u.node) {
            if !self.update_self(conn, node, node_bytes, kicks) {
                return Ok(Flow::Close);
            }
        }
        if let Some(t) = &req.add_tunnel {
            let dst = core::parse_id(&t.id)?;
            match self.add_tunnel(conn, dst, kicks) {
                Ok(true) => {}
                Ok(false) => return Ok(Flow::Close),
                Err(e) => {
                    if !self.remove(conn.id, Removal::Invalid(e.to_string()), kicks) {
                        return Ok(Flow::Close);
                    }
                    self.metrics.tunnels_over_limit.inc();
                    tracing::info!(peer = %conn.id.peer, error = %e, "invalid coordinate request; closing");
                    return Err(e);
                }
            }
        }
        if let Some(t) = &req.remove_tunnel {
            let dst = core::parse_id(&t.id)?;
            if !self.remove_tunnel(conn, dst, kicks) {
                return Ok(Flow::Close);
            }
        }
        if req.disconnect.is_some() {
            self.remove(conn.id, Removal::Disconnect, kicks);
            return Ok(Flow::Close);
        }
        for r in &req.ready_for_handshake {
            let other = core::parse_id(&r.id)?;
            if !self.ready_for_handshake(conn, other, kicks) {
                return Ok(Flow::Close);
            }
        }
        Ok(Flow::Continue)
    }

    /// The hot path: stores the node (whose encoding is `node_bytes` long, as
    /// [`NodeLimits::check`] measured it) and fans it out, holding only the sender's shard.
    /// Returns false if `conn` is no longer current.
    fn update_self(&self, conn: &Conn, node: Node, node_bytes: usize, kicks: &mut Kicks) -> bool {
        let started = std::time::Instant::now();
        let me = conn.id.peer;
        let node = Arc::new(node);
        // Built once, outside the lock; every receiver's queue gets a pointer to it.
        let u = Arc::new(Update::new(
            me,
            conn.id_bytes.clone(),
            Kind::Node,
            Some(node.clone()),
            "node update",
        ));
        let mut p = Pusher {
            sent: 0,
            kicks,
            batch: None,
        };
        {
            let mut shard = self.shards.lock_one(me);
            let Some(e) = shard.peers.get_mut(&me) else {
                return false;
            };
            if !e.is_current(conn.id) {
                return false;
            }
            self.keys.replace(&mut e.node, Some(node.clone()));
            e.updated_at = Some(started);
            let held = std::mem::replace(&mut e.node_bytes, node_bytes);
            self.metrics
                .node_bytes
                .add(gauge_delta(node_bytes).saturating_sub(gauge_delta(held)));
            self.notify_watchers(e, || SourceEvent::Node {
                about: me,
                node: node.clone(),
            });
            // Receivers are scattered in memory and every push is a locked (fully ordered)
            // operation, so a plain loop pays each receiver's cache misses in turn: warm the
            // receiver `WARM_AHEAD` places further on while pushing to this one.
            let mut ahead = e.links.values().filter_map(|l| l.conn.as_deref());
            for _ in 0..WARM_AHEAD {
                if let Some(c) = ahead.next() {
                    c.outbox.warm();
                }
            }
            for link in e.links.values() {
                if let Some(to) = &link.conn {
                    if let Some(c) = ahead.next() {
                        c.outbox.warm();
                    }
                    p.mapping(to, &u);
                }
            }
        }
        self.metrics.node_updates_received.inc();
        self.metrics.peer_updates_sent.inc_by(p.sent);
        self.metrics
            .node_update_seconds
            .observe(started.elapsed().as_secs_f64());
        true
    }

    /// Records `conn`'s peer → `dst`, and introduces the two to each other if both are connected
    /// and have nodes. Holds both shards.
    fn add_tunnel(
        &self,
        conn: &Arc<Conn>,
        dst: Uuid,
        kicks: &mut Kicks,
    ) -> Result<bool, CoordinateError> {
        let me = conn.id.peer;
        let mut l = self.shards.lock_peers(&[me, dst]);
        let me_node = match l.entry(me) {
            Some(e) if e.is_current(conn.id) => e.node.clone(),
            _ => return Ok(false),
        };
        let (dst_conn, dst_node) = match l.entry(dst) {
            Some(d) => (d.conn.clone(), d.node.clone()),
            None => (None, None),
        };
        let mut new = false;
        if let Some(e) = l.entry(me) {
            let limit = self.config.max_tunnels_per_peer;
            // Counted only when a new tunnel would be added: no allocation, at most the peer's
            // links walked, under the shard lock already held.
            if !e.links.get(&dst).is_some_and(|link| link.out)
                && e.links.values().filter(|link| link.out).count() >= limit
            {
                return Err(CoordinateError::TooManyTunnels { limit });
            }
            let link = e.links.entry(dst).or_insert_with(|| Link {
                out: false,
                inc: false,
                conn: dst_conn.clone(),
                via_remote: false,
            });
            new = !link.out;
            link.out = true;
            if dst == me {
                link.inc = true;
            }
        }
        if dst != me {
            if let Some(d) = l.entry_or_default(dst) {
                d.links
                    .entry(me)
                    .or_insert_with(|| Link {
                        out: false,
                        inc: false,
                        conn: Some(conn.clone()),
                        via_remote: false,
                    })
                    .inc = true;
            }
        }
        if new {
            self.tunnels.fetch_add(1, Ordering::Relaxed);
            self.metrics.tunnels.inc();
        }
        self.notify_all_watcher(|| SourceEvent::TunnelAdded { about: me, to: dst });
        let Some(dc) = dst_conn else {
            return Ok(true);
        };
        let mut p = Pusher {
            sent: 0,
            kicks,
            batch: None,
        };
        if let Some(n) = dst_node {
            let u = Update::new(dst, dc.id_bytes.clone(), Kind::Node, Some(n), "add tunnel");
            p.mapping(conn, &Arc::new(u));
        }
        if let Some(n) = me_node {
            let u = Update::new(me, conn.id_bytes.clone(), Kind::Node, Some(n), "add tunnel");
            p.mapping(&dc, &Arc::new(u));
        }
        drop(l);
        self.metrics.peer_updates_sent.inc_by(p.sent);
        Ok(true)
    }

    /// Tells both ends DISCONNECTED (if they were told about each other), then deletes the tunnel
    /// `conn`'s peer → `dst`. Holds both shards.
    fn remove_tunnel(&self, conn: &Arc<Conn>, dst: Uuid, kicks: &mut Kicks) -> bool {
        let me = conn.id.peer;
        let mut l = self.shards.lock_peers(&[me, dst]);
        match l.entry(me) {
            Some(e) if e.is_current(conn.id) => {}
            _ => return false,
        }
        let dst_conn = l.entry(dst).and_then(|d| d.conn.clone());
        let mut p = Pusher {
            sent: 0,
            kicks,
            batch: None,
        };
        let dst_bytes = match &dst_conn {
            Some(dc) => dc.id_bytes.clone(),
            None => Bytes::copy_from_slice(dst.as_bytes()),
        };
        let about_dst = Update::new(dst, dst_bytes, Kind::Disconnected, None, "remove tunnel");
        p.mapping(conn, &Arc::new(about_dst));
        if let Some(dc) = &dst_conn {
            let about_me = Update::new(
                me,
                conn.id_bytes.clone(),
                Kind::Disconnected,
                None,
                "remove tunnel",
            );
            p.mapping(dc, &Arc::new(about_me));
        }
        let mut removed = false;
        if let Some(e) = l.entry(me) {
            if let Some(link) = e.links.get_mut(&dst) {
                if link.out {
                    removed = true;
                    link.out = false;
                    if dst == me {
                        link.inc = false;
                    }
                }
                if !link.out && !link.inc {
                    e.links.remove(&dst);
                }
            }
        }
        if removed && dst != me {
            if let Some(d) = l.entry(dst) {
                if let Some(link) = d.links.get_mut(&me) {
                    link.inc = false;
                    if !link.out {
                        d.links.remove(&me);
                    }
                }
            }
            l.gc(dst);
        }
        if removed {
            self.tunnels.fetch_sub(1, Ordering::Relaxed);
            self.metrics.tunnels.dec();
        }
        self.notify_all_watcher(|| SourceEvent::TunnelRemoved { about: me, to: dst });
        drop(l);
        self.metrics.peer_updates_sent.inc_by(p.sent);
        true
    }

    /// READY_FOR_HANDSHAKE from `conn`'s peer to `other`, or a non-fatal error if they share no
    /// tunnel. Holds the sender's shard only: `other`'s connection is the cached one (I1).
    fn ready_for_handshake(&self, conn: &Conn, other: Uuid, kicks: &mut Kicks) -> bool {
        let me = conn.id.peer;
        let mut p = Pusher {
            sent: 0,
            kicks,
            batch: None,
        };
        {
            let shard = self.shards.lock_one(me);
            let Some(e) = shard.peers.get(&me) else {
                return false;
            };
            if !e.is_current(conn.id) {
                return false;
            }
            match e.links.get(&other) {
                Some(link) if link.out || link.inc => {
                    if link.via_remote {
                        // The remote peer's source passes it on.
                        self.notify_watchers(e, || SourceEvent::ReadyForHandshake {
                            about: me,
                            to: other,
                        });
                    }
                    if let Some(to) = &link.conn {
                        let u = Update::new(
                            me,
                            conn.id_bytes.clone(),
                            Kind::ReadyForHandshake,
                            None,
                            // Coder sends READY_FOR_HANDSHAKE without a reason.
                            "",
                        );
                        p.mapping(to, &Arc::new(u));
                    }
                }
                _ => {
                    let resp = CoordinateResponse {
                        peer_updates: Vec::new(),
                        error: format!(
                            "ready for handshake error: you do not share a tunnel with \"{other}\""
                        ),
                    };
                    if conn.outbox.try_push(resp) == Err(PushError::Full) {
                        p.kicks.push(conn.id);
                    }
                }
            }
        }
        self.metrics.peer_updates_sent.inc_by(p.sent);
        true
    }

    /// Removes `conn` if it is still its peer's connection; returns whether it was.
    fn remove(&self, conn: ConnId, how: Removal, kicks: &mut Kicks) -> bool {
        // Cheap check first: a stale connection must not lock a whole neighbourhood.
        {
            let shard = self.shards.lock_one(conn.peer);
            if !shard
                .peers
                .get(&conn.peer)
                .is_some_and(|e| e.is_current(conn))
            {
                return false;
            }
        }
        let mut l = self.shards.lock_neighbourhood(conn.peer);
        self.remove_locked(&mut l, conn, how, kicks)
    }

    /// Removes `conn` (holding its peer's neighbourhood): tunnel peers are told (subject to the
    /// announce rule), tunnels from it are deleted, tunnels to it kept, and its stream is closed
    /// last.
    fn remove_locked(
        &self,
        l: &mut Locked<'_>,
        conn: ConnId,
        how: Removal,
        kicks: &mut Kicks,
    ) -> bool {
        let me = conn.peer;
        let Some(e) = l.entry(me) else { return false };
        if !e.is_current(conn) {
            return false;
        }
        let Some(c) = e.conn.take() else { return false };
        self.keys.replace(&mut e.node, None);
        e.updated_at = None;
        self.metrics
            .node_bytes
            .sub(gauge_delta(std::mem::take(&mut e.node_bytes)));
        let links: Vec<(Uuid, bool)> = e.links.iter().map(|(x, k)| (*x, k.out)).collect();
        // A connection whose queue overflowed was kicked before anything else happened to it.
        let how = if c.outbox.is_failed() {
            Removal::Kick
        } else {
            how
        };
        let (kind, reason, error, close_reason) = how.parts();
        let about = Arc::new(Update::new(me, c.id_bytes.clone(), kind, None, reason));
        let mut p = Pusher {
            sent: 0,
            kicks,
            batch: None,
        };
        let mut removed_tunnels = 0usize;
        for (x, out) in links {
            if out {
                removed_tunnels += 1;
            }
            if x == me {
                // The tunnel me → me goes with me.
                if let Some(e) = l.entry(me) {
                    e.links.remove(&me);
                }
                continue;
            }
            let Some(xe) = l.entry(x) else { continue };
            if let Some(link) = xe.links.get_mut(&me) {
                link.conn = None;
                if out {
                    link.inc = false;
                }
                if !link.out && !link.inc {
                    xe.links.remove(&me);
                }
            }
            if let Some(to) = &xe.conn {
                p.mapping(to, &about);
            }
            l.gc(x);
        }
        if let Some(e) = l.entry(me) {
            e.links.retain(|_, k| {
                k.out = false;
                k.inc
            });
            self.notify_watchers(e, || SourceEvent::Gone { about: me, kind });
        }
        l.gc(me);
        self.peers.fetch_sub(1, Ordering::Relaxed);
        self.tunnels.fetch_sub(removed_tunnels, Ordering::Relaxed);
        self.metrics.tunnels.sub(removed_tunnels as i64);
        self.metrics.role(&c.auth).dec();
        self.metrics.peer_updates_sent.inc_by(p.sent);
        match close_reason {
            CloseReason::QueueFull | CloseReason::InvalidRequest => {
                self.metrics.kick(close_reason);
            }
            CloseReason::Overwritten
            | CloseReason::Disconnect
            | CloseReason::Lost
            | CloseReason::Shutdown => {}
        }
        if close_reason == CloseReason::QueueFull {
            tracing::warn!(peer = %me, "coordinator response queue full; removing peer");
        }
        c.outbox.close(error);
        tracing::debug!(peer = %me, reason = close_reason.as_str(), "coordinator connection closed");
        true
    }

    /// Removes connections whose queue overflowed, and any that overflow while doing so.
    fn run_kicks(&self, mut kicks: Kicks) {
        // Bounded: a connection is reported at most once (a failed outbox refuses later pushes),
        // so the list never grows past the number of connections.
        let mut i = 0;
        while i < kicks.len() {
            let conn = kicks[i];
            let mut more = Kicks::new();
            self.remove(conn, Removal::Kick, &mut more);
            kicks.extend(more);
            i += 1;
        }
    }

    /// Removes `conn` as if its queue had overflowed (tests drive kicks directly).
    #[cfg(test)]
    pub(crate) fn kick(&self, conn: ConnId) {
        self.run_kicks(vec![conn]);
    }

    /// Closes every connection (`error:"coordinator closed"`, peers removed as LOST) and refuses
    /// later connections the same way.
    pub fn shutdown(&self) {
        let mut kicks = Kicks::new();
        {
            let mut l = self.shards.lock_all();
            self.closed.store(true, Ordering::Release);
            for conn in l.connected() {
                self.remove_locked(&mut l, conn, Removal::Shutdown, &mut kicks);
            }
        }
        // Everything is closed now; stale kicks are no-ops.
        self.run_kicks(kicks);
    }

    /// pgcoord's unhealthy state: setting it closes every session with
    /// `error:"coordinator unhealthy"` (removed as LOST, so their tunnel peers keep WireGuard) and
    /// refuses new ones the same way until it is cleared. The HA store sets it while its heartbeat
    /// writes fail.
    pub fn set_unhealthy(&self, unhealthy: bool) {
        let mut kicks = Kicks::new();
        {
            let mut l = self.shards.lock_all();
            let was = self.unhealthy.swap(unhealthy, Ordering::AcqRel);
            if unhealthy && !was {
                for conn in l.connected() {
                    self.remove_locked(&mut l, conn, Removal::Unhealthy, &mut kicks);
                }
            }
        }
        self.run_kicks(kicks);
    }

    /// The node of connected peer `id`, if it has sent one.
    pub fn node(&self, id: Uuid) -> Option<Node> {
        let shard = self.shards.lock_one(id);
        let e = shard.peers.get(&id)?;
        e.conn.as_ref()?;
        e.node.as_deref().cloned()
    }

    /// Whether some peer the graph knows — a local peer or a remote one (the sidecar bridge's,
    /// another replica's) — currently has a node with WireGuard key `key`. Cheap: one small
    /// mutex of a key index, no graph shard. What the relay admits in `serve` and `dev`.
    pub fn knows_node_key(&self, key: &proto::key::NodePublic) -> bool {
        self.keys.contains(key)
    }

    /// Number of distinct node keys the graph holds (see [`PeerGraph::knows_node_key`]).
    pub fn node_key_count(&self) -> usize {
        self.keys.len()
    }

    /// Number of connected peers.
    pub fn peer_count(&self) -> usize {
        self.peers.load(Ordering::Relaxed)
    }

    /// Number of directed tunnels (including tunnels to absent destinations).
    pub fn tunnel_count(&self) -> usize {
        self.tunnels.load(Ordering::Relaxed)
    }
}

/// One peer as [`PeerGraph::snapshot`] sees it.
#[derive(Debug, Clone)]
pub struct PeerRow {
    /// The peer id.
    pub id: Uuid,
    /// The name the session gave (peer-supplied: escape before display).
    pub name: String,
    /// `agent`, `client`, `other`, or `remote` (a peer another replica or coderd serves).
    pub role: &'static str,
    /// The home DERP region of its latest node (`None` without a node).
    pub home_region: Option<i32>,
    /// Time since its current connection last sent a node (local peers only).
    pub last_update: Option<std::time::Duration>,
    /// Tunnels from this peer.
    pub tunnels_out: usize,
}

/// One directed tunnel as [`PeerGraph::snapshot`] sees it.
#[derive(Debug, Clone, Copy)]
pub struct TunnelRow {
    /// Who asked for it.
    pub src: Uuid,
    /// Its destination.
    pub dst: Uuid,
    /// The destination is connected (locally or remotely known).
    pub dst_connected: bool,
}

/// What the graph holds at one moment, bounded (read by the status page).
#[derive(Debug, Clone, Default)]
pub struct GraphSnapshot {
    /// Up to the requested number of peers (connected local peers and remote peers).
    pub peers: Vec<PeerRow>,
    /// Every such peer, listed or not.
    pub total_peers: usize,
    /// Up to the requested number of tunnels.
    pub tunnels: Vec<TunnelRow>,
    /// Every tunnel, listed or not.
    pub total_tunnels: usize,
}

impl PeerGraph {
    /// A read-only snapshot of at most `limit` peers and `limit` tunnels. Locks one shard at a
    /// time, only to copy rows; different shards are seen at slightly different moments.
    pub fn snapshot(&self, limit: usize) -> GraphSnapshot {
        let mut s = GraphSnapshot::default();
        self.shards.for_each(|shard| {
            for (id, e) in &shard.peers {
                let role = match (&e.conn, &e.remote) {
                    (Some(c), _) => Some(c.auth.role()),
                    (None, Some(_)) => Some("remote"),
                    (None, None) => None,
                };
                let tunnels_out = e.links.values().filter(|l| l.out).count();
                if let Some(role) = role {
                    s.total_peers += 1;
                    if s.peers.len() < limit {
                        s.peers.push(PeerRow {
                            id: *id,
                            name: e.conn.as_ref().map(|c| c.name.clone()).unwrap_or_default(),
                            role,
                            home_region: e.node.as_ref().map(|n| n.preferred_derp),
                            last_update: e.conn.as_ref().and(e.updated_at).map(|t| t.elapsed()),
                            tunnels_out,
                        });
                    }
                }
                s.total_tunnels += tunnels_out;
                for (dst, l) in &e.links {
                    if l.out && s.tunnels.len() < limit {
                        s.tunnels.push(TunnelRow {
                            src: *id,
                            dst: *dst,
                            dst_connected: l.conn.is_some() || l.via_remote,
                        });
                    }
                }
            }
        });
        s
    }
}

fn log_authz(conn: ConnId, e: &AuthzError) {
    tracing::info!(peer = %conn.peer, error = %e, "coordinate request refused by authorization; closing");
}

#[cfg(test)]
mod tests;
