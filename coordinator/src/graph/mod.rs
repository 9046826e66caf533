//! The peer graph: Coder's in-memory coordinator semantics behind a small concurrent API.
//!
//! Why: every coordination session (v2 dRPC or v1 JSON, agent or client) feeds its peer's requests
//! into one shared graph of peers and tunnels, and drains what the graph tells it. The rules live
//! in [`core`] as a pure state machine; this module only serializes events into it and pushes the
//! resulting [`Delivery`]s into each connection's bounded queue ([`PeerReceiver`] is the session's
//! end of that queue).
//!
//! # Concurrency design and invariants
//!
//! * **One lock for the graph.** State transitions *and* the pushes they produce happen under a
//!   single `std::sync::Mutex` (as in Coder's in-memory coordinator). Therefore every queue
//!   receives updates in the exact order the state changed: a stale node can never overtake a
//!   newer one, and a NODE can never arrive after the DISCONNECTED that superseded it. We chose
//!   this over sharding on purpose: per-shard locks make the init batch, the fan-out and tunnel
//!   changes (which touch two peers) race with each other unless every push about peer X is done
//!   under X's shard lock, which a later issue can add behind this same API once a benchmark shows
//!   the lock matters. Work under the lock is O(tunnel peers) cheap pushes; no encoding, no I/O.
//! * **Lock order:** graph mutex → a connection's outbox mutex (leaf). The receiving side
//!   ([`PeerReceiver`]) only ever takes its own outbox mutex, so fan-out never waits for a reader.
//! * **No `.await` in the graph.** Nothing here is async except [`PeerReceiver::recv`], which holds
//!   no lock while it waits.
//! * **Sends never block.** A full queue (default 512 responses) removes that peer (its tunnel
//!   peers get DISCONNECTED "failed update"), counted in `coordinator_peers_kicked_total{reason=
//!   "queue_full"}`. Closing bypasses the queue, so a kicked peer's stream ends at once.
//! * **Liveness is per connection.** Each connection has a [`ConnId`] (peer id + generation). A
//!   replaced, kicked or disconnected connection's later events (including dropping its
//!   [`PeerHandle`]) are no-ops, so they never mark a newer connection of the same peer lost.
//! * **Announce rule:** a receiver is told LOST/DISCONNECTED only about peers it holds a NODE for,
//!   and NODE only when the node changed (see [`core`]).
//! * **Chunking:** one delivery becomes responses of at most [`MAX_PEER_UPDATES_PER_RESPONSE`]
//!   updates each (each counts against the queue).

pub mod core;
mod outbox;
pub mod store;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use prometheus::{IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry};
use proto::tailnet::v2::{CoordinateRequest, CoordinateResponse, Node};
use uuid::Uuid;

pub use self::core::{
    CloseReason, ConnId, CoordinateError, Delivery, Event, Flow, Outbound, State,
    ERR_COORDINATOR_CLOSED, ERR_OVERWRITTEN,
};
use self::outbox::{Outbox, PushError};
pub use self::outbox::{PeerReceiver, TryRecvError};
pub use self::store::{MemoryStore, PeerGone, Store};
use crate::authz::{AuthzError, CoordinateeAuth};

/// Coder's `maxPeerUpdatesPerMessage`: keeps every response far below dRPC's 4 MiB limit.
pub const MAX_PEER_UPDATES_PER_RESPONSE: usize = 1024;
/// Coder's `ResponseBufferSize`.
pub const DEFAULT_RESPONSE_QUEUE: usize = 512;

/// Graph settings.
#[derive(Clone, Debug)]
pub struct GraphConfig {
    /// Responses queued per connection before that peer is removed (Coder: 512).
    pub response_queue: usize,
}

impl Default for GraphConfig {
    fn default() -> Self {
        Self {
            response_queue: DEFAULT_RESPONSE_QUEUE,
        }
    }
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
    peers: IntGaugeVec,
    tunnels: IntGauge,
    node_updates_received: IntCounter,
    peer_updates_sent: IntCounter,
    kicked: IntCounterVec,
    authz_failures: IntCounter,
}

impl Metrics {
    fn new(reg: &Registry) -> Result<Self, prometheus::Error> {
        let m = Self {
            peers: IntGaugeVec::new(
                Opts::new("coordinator_peers", "Connected coordination peers by role"),
                &["role"],
            )?,
            tunnels: IntGauge::new("coordinator_tunnels", "Tunnels in the peer graph")?,
            node_updates_received: IntCounter::new(
                "coordinator_node_updates_received_total",
                "update_self requests received",
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
        };
        reg.register(Box::new(m.peers.clone()))?;
        reg.register(Box::new(m.tunnels.clone()))?;
        reg.register(Box::new(m.node_updates_received.clone()))?;
        reg.register(Box::new(m.peer_updates_sent.clone()))?;
        reg.register(Box::new(m.kicked.clone()))?;
        reg.register(Box::new(m.authz_failures.clone()))?;
        Ok(m)
    }
}

#[derive(Debug)]
struct Inner {
    state: State<MemoryStore>,
    /// Outbox of each peer's current connection.
    outboxes: HashMap<Uuid, (u64, Arc<Outbox>)>,
}

/// The shared peer graph. Create one per coordinator with [`PeerGraph::new`].
#[derive(Debug)]
pub struct PeerGraph {
    inner: Mutex<Inner>,
    next_gen: AtomicU64,
    config: GraphConfig,
    metrics: Metrics,
}

/// A session's handle on its connection. Dropping it without a prior `disconnect` removes the peer
/// as LOST (a no-op if the connection was already disconnected, kicked or replaced).
#[derive(Debug)]
pub struct PeerHandle {
    graph: Arc<PeerGraph>,
    conn: ConnId,
}

impl PeerHandle {
    /// The peer id.
    pub fn id(&self) -> Uuid {
        self.conn.peer
    }

    /// The connection id (peer id + generation).
    pub fn conn(&self) -> ConnId {
        self.conn
    }
}

impl Drop for PeerHandle {
    fn drop(&mut self) {
        self.graph.lost(self.conn);
    }
}

impl PeerGraph {
    /// A new, empty graph whose metrics are registered in `registry`.
    pub fn new(config: GraphConfig, registry: &Registry) -> Result<Arc<Self>, GraphError> {
        let metrics = Metrics::new(registry)?;
        for role in ["agent", "client", "other"] {
            metrics.peers.with_label_values(&[role]).set(0);
        }
        Ok(Arc::new(Self {
            inner: Mutex::new(Inner {
                state: State::default(),
                outboxes: HashMap::new(),
            }),
            next_gen: AtomicU64::new(1),
            config,
            metrics,
        }))
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
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
        let conn = ConnId {
            peer: id,
            gen: self.next_gen.fetch_add(1, Ordering::Relaxed),
        };
        let outbox = Outbox::new(self.config.response_queue);
        let receiver = PeerReceiver::new(outbox.clone());
        tracing::debug!(peer = %id, name = %name, role = auth.role(), "coordinator peer connecting");
        {
            let mut inner = self.lock();
            let old = inner
                .outboxes
                .insert(id, (conn.gen, outbox))
                .map(|(gen, ob)| (ConnId { peer: id, gen }, ob));
            let mut out = Vec::new();
            inner.state.connect(conn, name, auth, &mut out);
            self.dispatch(&mut inner, out, old);
        }
        (
            PeerHandle {
                graph: self.clone(),
                conn,
            },
            receiver,
        )
    }

    /// Applies one request from `handle`'s connection. `Ok(Flow::Close)` means the stream is done
    /// (disconnect processed, or this connection was already removed). `Err` is fatal: the error
    /// response is already queued and the peer removed as LOST.
    pub fn handle(
        &self,
        handle: &PeerHandle,
        req: CoordinateRequest,
    ) -> Result<Flow, CoordinateError> {
        let mut inner = self.lock();
        if req.update_self.is_some() && inner.state.is_current(handle.conn) {
            self.metrics.node_updates_received.inc();
        }
        let mut out = Vec::new();
        let res = inner.state.request(handle.conn, &req, &mut out);
        match &res {
            Err(CoordinateError::Authz(e)) => {
                self.metrics.authz_failures.inc();
                log_authz(handle.conn, e);
            }
            Err(e) => {
                tracing::info!(peer = %handle.conn.peer, error = %e, "invalid coordinate request; closing")
            }
            Ok(_) => {}
        }
        self.dispatch(&mut inner, out, None);
        res
    }

    fn lost(&self, conn: ConnId) {
        let mut inner = self.lock();
        let mut out = Vec::new();
        inner.state.lost(conn, &mut out);
        self.dispatch(&mut inner, out, None);
    }

    /// Closes every connection (`error:"coordinator closed"`, peers removed as LOST) and refuses
    /// later connections the same way.
    pub fn shutdown(&self) {
        let mut inner = self.lock();
        let mut out = Vec::new();
        inner.state.shutdown(&mut out);
        self.dispatch(&mut inner, out, None);
    }

    /// The node of connected peer `id`, if it has sent one.
    pub fn node(&self, id: Uuid) -> Option<Node> {
        self.lock().state.node(id).cloned()
    }

    /// Number of connected peers.
    pub fn peer_count(&self) -> usize {
        self.lock().state.peer_count()
    }

    /// Number of directed tunnels (including tunnels to absent destinations).
    pub fn tunnel_count(&self) -> usize {
        self.lock().state.tunnel_count()
    }

    /// Pushes deliveries; a full queue kicks that peer, whose removal may produce more deliveries
    /// (bounded: each round removes at least one peer).
    fn dispatch(
        &self,
        inner: &mut Inner,
        mut deliveries: Vec<Delivery>,
        replaced: Option<(ConnId, Arc<Outbox>)>,
    ) {
        loop {
            let mut kicked: Vec<ConnId> = Vec::new();
            for d in deliveries.drain(..) {
                let outbox = match inner.outboxes.get(&d.to.peer) {
                    Some((gen, ob)) if *gen == d.to.gen => ob.clone(),
                    _ => match &replaced {
                        Some((c, ob)) if *c == d.to => ob.clone(),
                        _ => continue,
                    },
                };
                match d.what {
                    Outbound::Updates(updates) => {
                        if !self.push_updates(&outbox, updates) {
                            kicked.push(d.to);
                        }
                    }
                    Outbound::Error(error) => {
                        let resp = CoordinateResponse {
                            peer_updates: Vec::new(),
                            error,
                        };
                        if outbox.try_push(resp) == Err(PushError::Full) {
                            kicked.push(d.to);
                        }
                    }
                    Outbound::Close { error, reason } => {
                        outbox.close(error);
                        if matches!(inner.outboxes.get(&d.to.peer), Some((g, _)) if *g == d.to.gen)
                        {
                            inner.outboxes.remove(&d.to.peer);
                        }
                        match reason {
                            CloseReason::QueueFull
                            | CloseReason::Overwritten
                            | CloseReason::InvalidRequest => {
                                self.metrics
                                    .kicked
                                    .with_label_values(&[reason.as_str()])
                                    .inc();
                            }
                            CloseReason::Disconnect | CloseReason::Lost | CloseReason::Shutdown => {
                            }
                        }
                        tracing::debug!(peer = %d.to.peer, reason = reason.as_str(), "coordinator connection closed");
                    }
                }
            }
            if kicked.is_empty() {
                break;
            }
            for conn in kicked {
                if inner.state.is_current(conn) {
                    tracing::warn!(peer = %conn.peer, "coordinator response queue full; removing peer");
                }
                inner.state.kick(conn, &mut deliveries);
            }
        }
        let rc = inner.state.role_counts();
        let set = |role: &str, n: usize| {
            self.metrics
                .peers
                .with_label_values(&[role])
                .set(i64::try_from(n).unwrap_or(i64::MAX));
        };
        set("agent", rc.agent);
        set("client", rc.client);
        set("other", rc.other);
        self.metrics
            .tunnels
            .set(i64::try_from(inner.state.tunnel_count()).unwrap_or(i64::MAX));
    }

    /// Pushes updates in chunks of at most [`MAX_PEER_UPDATES_PER_RESPONSE`]. Returns false if the
    /// queue was full.
    fn push_updates(
        &self,
        outbox: &Outbox,
        mut updates: Vec<proto::tailnet::v2::coordinate_response::PeerUpdate>,
    ) -> bool {
        while !updates.is_empty() {
            let rest = if updates.len() > MAX_PEER_UPDATES_PER_RESPONSE {
                updates.split_off(MAX_PEER_UPDATES_PER_RESPONSE)
            } else {
                Vec::new()
            };
            let n = updates.len() as u64;
            let resp = CoordinateResponse {
                peer_updates: updates,
                error: String::new(),
            };
            match outbox.try_push(resp) {
                Ok(()) => self.metrics.peer_updates_sent.inc_by(n),
                Err(PushError::Full) => return false,
                Err(PushError::Closed) => return true,
            }
            updates = rest;
        }
        true
    }
}

fn log_authz(conn: ConnId, e: &AuthzError) {
    tracing::info!(peer = %conn.peer, error = %e, "coordinate request refused by authorization; closing");
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests;
