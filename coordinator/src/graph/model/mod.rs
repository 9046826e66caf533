//! The coordinator's protocol logic as a pure state machine: the model of the peer graph, compiled
//! for tests only.
//!
//! Why: every rule of Coder's in-memory coordinator (tailnet/coordinator.go, peer.go) lives here as
//! plain transitions `(state, event) -> deliveries`, so the semantics are unit- and property-
//! testable with ordinary values. This module must never do I/O, read a clock, spawn, lock or
//! `.await`; it only decides *what* each connection should be told.
//!
//! It is the *specification* of [`super::PeerGraph`], which applies the same rules to a sharded
//! peer table (with the de-duplication map kept by each receiving connection's outbox instead of
//! here); a differential property test in `graph/tests.rs` runs both on the same random operation
//! sequences and requires identical per-peer update streams. A rule changed here must be changed
//! there too.
//!
//! De-duplication follows Coder's `storeMappingLocked`: each connected peer has a `sent` map of the
//! last node it was told about each other peer. NODE is emitted only when the node differs from
//! what was sent (prost `PartialEq`; the schema's maps are `BTreeMap`s, so equal values encode to
//! identical bytes — the only divergence is a NaN latency, which then re-sends, harmlessly); LOST
//! and DISCONNECTED only about peers that are in `sent`, and they remove the entry.
//! READY_FOR_HANDSHAKE bypasses the map.
//!
//! Where we knowingly differ from Coder's Go coordinator (all invisible to well-behaved peers):
//! * A request is validated completely (authorization, node present, every UUID 16 bytes) before
//!   any part is applied; Go applies `update_self` before discovering a bad `add_tunnel` id.
//! * A fatal request error is sent to the peer as `CoordinateResponse.error` before the stream
//!   ends (`"authorization: …"`, `"unable to convert bytes to UUID: …"`); Go only logs it.
//! * `ready_for_handshake` in the same request as `disconnect` is ignored (the peer is gone).
//! * Like Go's `removePeerLocked`, every removal (DISCONNECTED *and* LOST) deletes the tunnels the
//!   peer is the *source* of; tunnels where it is the destination survive. Clients re-add their
//!   tunnels on every reconnect, so this only matters to a peer that does not.

use std::collections::HashMap;

use bytes::Bytes;
use proto::tailnet::v2::coordinate_response::peer_update::Kind;
use proto::tailnet::v2::coordinate_response::PeerUpdate;
use proto::tailnet::v2::{CoordinateRequest, Node};
use uuid::Uuid;

use self::store::{MemoryStore, PeerGone, Store};
use super::core::{
    parse_id, validate, CloseReason, ConnId, CoordinateError, Flow, ERR_COORDINATOR_CLOSED,
    ERR_OVERWRITTEN,
};
use crate::authz::CoordinateeAuth;

pub mod store;

/// What a connection is to be told.
#[derive(Clone, Debug, PartialEq)]
pub enum Outbound {
    /// Peer updates, to be sent in order (the graph chunks them at 1024 per response).
    Updates(Vec<PeerUpdate>),
    /// A non-fatal error string (`CoordinateResponse.error`).
    Error(String),
    /// End the stream, after sending `error` if any. Pending responses may be discarded.
    Close {
        /// Final error string, if any.
        error: Option<String>,
        /// Why (for metrics and logs).
        reason: CloseReason,
    },
}

/// One thing to push to one connection.
#[derive(Clone, Debug, PartialEq)]
pub struct Delivery {
    /// The receiving connection.
    pub to: ConnId,
    /// What it receives.
    pub what: Outbound,
}

/// An input to the state machine.
#[derive(Clone, Debug)]
pub enum Event {
    /// A new connection (replaces any connection with the same peer id).
    Connect {
        /// Its id and a fresh generation.
        conn: ConnId,
        /// What it may do.
        auth: CoordinateeAuth,
    },
    /// A request read from a connection.
    Request {
        /// Sender.
        conn: ConnId,
        /// The request.
        req: CoordinateRequest,
    },
    /// The connection went away without `disconnect`.
    Lost {
        /// Which connection.
        conn: ConnId,
    },
    /// The connection's response queue overflowed.
    Kick {
        /// Which connection.
        conn: ConnId,
    },
    /// Close everything.
    Shutdown,
}

#[derive(Debug)]
struct Peer {
    gen: u64,
    auth: CoordinateeAuth,
    /// Last node sent to this connection about each other peer (Coder's `peer.sent`).
    sent: HashMap<Uuid, Node>,
}

/// The whole coordinator state: connected peers (with their de-dup maps) plus the store.
#[derive(Debug)]
pub struct State<S: Store = MemoryStore> {
    peers: HashMap<Uuid, Peer>,
    store: S,
    closed: bool,
}

impl Default for State<MemoryStore> {
    fn default() -> Self {
        Self::new(MemoryStore::new())
    }
}

fn uuid_bytes(id: Uuid) -> Bytes {
    Bytes::copy_from_slice(id.as_bytes())
}

/// Coder's `storeMappingLocked`: decides whether `sent` warrants an update and records it.
fn store_mapping(
    sent: &mut HashMap<Uuid, Node>,
    about: Uuid,
    node: Option<&Node>,
    kind: Kind,
    reason: &str,
) -> Option<PeerUpdate> {
    match kind {
        Kind::Lost | Kind::Disconnected => {
            sent.remove(&about)?;
        }
        Kind::Node => {
            let node = node?;
            if sent.get(&about) == Some(node) {
                return None;
            }
            sent.insert(about, node.clone());
        }
        Kind::ReadyForHandshake | Kind::Unspecified => {}
    }
    Some(PeerUpdate {
        id: uuid_bytes(about),
        node: if kind == Kind::Node {
            node.cloned()
        } else {
            None
        },
        kind: kind as i32,
        reason: reason.to_owned(),
    })
}

impl<S: Store> State<S> {
    /// A state over `store` (which may already hold tunnels).
    pub fn new(store: S) -> Self {
        Self {
            peers: HashMap::new(),
            store,
            closed: false,
        }
    }

    /// The store.
    pub fn store(&self) -> &S {
        &self.store
    }

    /// Applies one event and returns what to push where.
    pub fn apply(&mut self, ev: Event) -> Vec<Delivery> {
        let mut out = Vec::new();
        match ev {
            Event::Connect { conn, auth } => self.connect(conn, auth, &mut out),
            Event::Request { conn, req } => {
                let _ = self.request(conn, &req, &mut out);
            }
            Event::Lost { conn } => self.lost(conn, &mut out),
            Event::Kick { conn } => self.kick(conn, &mut out),
            Event::Shutdown => self.shutdown(&mut out),
        }
        out
    }

    /// Whether `conn` is the live connection of its peer.
    pub fn is_current(&self, conn: ConnId) -> bool {
        self.peers
            .get(&conn.peer)
            .is_some_and(|p| p.gen == conn.gen)
    }

    /// The node of a connected peer.
    pub fn node(&self, peer: Uuid) -> Option<&Node> {
        if self.peers.contains_key(&peer) {
            self.store.node(peer)
        } else {
            None
        }
    }

    /// Number of connected peers.
    pub fn peer_count(&self) -> usize {
        self.peers.len()
    }

    /// Number of directed tunnels.
    pub fn tunnel_count(&self) -> usize {
        self.store.tunnel_count()
    }

    /// Ids of connected peers.
    pub fn peer_ids(&self) -> impl Iterator<Item = Uuid> + '_ {
        self.peers.keys().copied()
    }

    /// What `receiver` was last told about `about` as NODE (its de-dup entry).
    pub fn sent_node(&self, receiver: Uuid, about: Uuid) -> Option<&Node> {
        self.peers.get(&receiver).and_then(|p| p.sent.get(&about))
    }

    /// Peers `receiver` currently holds a NODE for.
    pub fn announced_to(&self, receiver: Uuid) -> Vec<Uuid> {
        self.peers
            .get(&receiver)
            .map(|p| p.sent.keys().copied().collect())
            .unwrap_or_default()
    }

    /// Tells `to` about `about`, subject to de-dup: pushes a delivery if anything is to be said.
    fn mapping(
        &mut self,
        to: Uuid,
        about: Uuid,
        node: Option<&Node>,
        kind: Kind,
        reason: &str,
        out: &mut Vec<Delivery>,
    ) {
        let Some(p) = self.peers.get_mut(&to) else {
            return;
        };
        if let Some(u) = store_mapping(&mut p.sent, about, node, kind, reason) {
            out.push(Delivery {
                to: ConnId {
                    peer: to,
                    gen: p.gen,
                },
                what: Outbound::Updates(vec![u]),
            });
        }
    }

    /// A new connection. Replaces (and closes) an older connection with the same peer id, then
    /// sends the newcomer one batched NODE update about every connected tunnel peer with a node.
    pub fn connect(&mut self, conn: ConnId, auth: CoordinateeAuth, out: &mut Vec<Delivery>) {
        if self.closed {
            out.push(Delivery {
                to: conn,
                what: Outbound::Close {
                    error: Some(ERR_COORDINATOR_CLOSED.to_owned()),
                    reason: CloseReason::Shutdown,
                },
            });
            return;
        }
        if let Some(old) = self.peers.remove(&conn.peer) {
            // Like Coder: the newcomer starts without a node; tunnel peers are not told.
            self.store.remove_peer(conn.peer, PeerGone::Replaced);
            out.push(Delivery {
                to: ConnId {
                    peer: conn.peer,
                    gen: old.gen,
                },
                what: Outbound::Close {
                    error: Some(ERR_OVERWRITTEN.to_owned()),
                    reason: CloseReason::Overwritten,
                },
            });
        }
        let mut me = Peer {
            gen: conn.gen,
            auth,
            sent: HashMap::new(),
        };
        let mut batch = Vec::new();
        for other in self.store.tunnel_peers(conn.peer) {
            if let Some(node) = self.node(other) {
                if let Some(u) = store_mapping(&mut me.sent, other, Some(node), Kind::Node, "init")
                {
                    batch.push(u);
                }
            }
        }
        self.peers.insert(conn.peer, me);
        if !batch.is_empty() {
            out.push(Delivery {
                to: conn,
                what: Outbound::Updates(batch),
            });
        }
    }

    /// Processes one request from `conn` in Coder's order: authorize (whole request) →
    /// update_self → add_tunnel → remove_tunnel → disconnect → ready_for_handshake.
    /// A fatal error closes `conn` with that error and removes it as LOST.
    pub fn request(
        &mut self,
        conn: ConnId,
        req: &CoordinateRequest,
        out: &mut Vec<Delivery>,
    ) -> Result<Flow, CoordinateError> {
        if self.closed || !self.is_current(conn) {
            return Ok(Flow::Close);
        }
        let me = conn.peer;
        let checked = match self.peers.get(&me) {
            Some(p) => validate(&p.auth, req),
            None => return Ok(Flow::Close),
        };
        if let Err(e) = checked {
            out.push(Delivery {
                to: conn,
                what: Outbound::Close {
                    error: Some(e.to_string()),
                    reason: CloseReason::InvalidRequest,
                },
            });
            self.remove_peer(me, Kind::Lost, "lost", out);
            return Err(e);
        }

        if let Some(node) = req.update_self.as_ref().and_then(|u| u.node.as_ref()) {
            self.update_self(me, node, out);
        }
        if let Some(t) = &req.add_tunnel {
            let dst = parse_id(&t.id)?;
            self.add_tunnel(me, dst, out);
        }
        if let Some(t) = &req.remove_tunnel {
            let dst = parse_id(&t.id)?;
            self.remove_tunnel(me, dst, out);
        }
        if req.disconnect.is_some() {
            out.push(Delivery {
                to: conn,
                what: Outbound::Close {
                    error: None,
                    reason: CloseReason::Disconnect,
                },
            });
            self.remove_peer(me, Kind::Disconnected, "graceful disconnect", out);
            return Ok(Flow::Close);
        }
        for r in &req.ready_for_handshake {
            let other = parse_id(&r.id)?;
            self.ready_for_handshake(conn, other, out);
        }
        Ok(Flow::Continue)
    }

    fn update_self(&mut self, me: Uuid, node: &Node, out: &mut Vec<Delivery>) {
        self.store.upsert_node(me, node);
        for other in self.store.tunnel_peers(me) {
            self.mapping(other, me, Some(node), Kind::Node, "node update", out);
        }
    }

    fn add_tunnel(&mut self, src: Uuid, dst: Uuid, out: &mut Vec<Delivery>) {
        self.store.add_tunnel(src, dst);
        if !self.peers.contains_key(&dst) {
            return;
        }
        if let Some(dst_node) = self.node(dst).cloned() {
            self.mapping(src, dst, Some(&dst_node), Kind::Node, "add tunnel", out);
        }
        if let Some(src_node) = self.node(src).cloned() {
            self.mapping(dst, src, Some(&src_node), Kind::Node, "add tunnel", out);
        }
    }

    fn remove_tunnel(&mut self, src: Uuid, dst: Uuid, out: &mut Vec<Delivery>) {
        self.mapping(src, dst, None, Kind::Disconnected, "remove tunnel", out);
        self.mapping(dst, src, None, Kind::Disconnected, "remove tunnel", out);
        self.store.remove_tunnel(src, dst);
    }

    fn ready_for_handshake(&mut self, from: ConnId, other: Uuid, out: &mut Vec<Delivery>) {
        if !self.store.tunnel_between(from.peer, other) {
            out.push(Delivery {
                to: from,
                what: Outbound::Error(format!(
                    "ready for handshake error: you do not share a tunnel with \"{other}\""
                )),
            });
            return;
        }
        self.mapping(
            other,
            from.peer,
            None,
            Kind::ReadyForHandshake,
            // Coder sends READY_FOR_HANDSHAKE without a reason.
            "",
            out,
        );
    }

    /// Removes `peer`: tells its tunnel peers (`kind`, subject to the announce rule), deletes the
    /// tunnels it is the source of (as Coder's `removePeerLocked` does), keeps those it is the
    /// destination of.
    fn remove_peer(&mut self, peer: Uuid, kind: Kind, reason: &str, out: &mut Vec<Delivery>) {
        if self.peers.remove(&peer).is_none() {
            return;
        }
        for other in self.store.tunnel_peers(peer) {
            if other != peer {
                self.mapping(other, peer, None, kind, reason, out);
            }
        }
        self.store.remove_tunnels_from(peer);
        let how = if kind == Kind::Lost {
            PeerGone::Lost
        } else {
            PeerGone::Disconnected
        };
        self.store.remove_peer(peer, how);
    }

    /// The connection ended without `disconnect`: LOST to its tunnel peers.
    pub fn lost(&mut self, conn: ConnId, out: &mut Vec<Delivery>) {
        if !self.is_current(conn) {
            return;
        }
        out.push(Delivery {
            to: conn,
            what: Outbound::Close {
                error: None,
                reason: CloseReason::Lost,
            },
        });
        self.remove_peer(conn.peer, Kind::Lost, "lost", out);
    }

    /// The connection's queue overflowed: DISCONNECTED ("failed update") to its tunnel peers.
    pub fn kick(&mut self, conn: ConnId, out: &mut Vec<Delivery>) {
        if !self.is_current(conn) {
            return;
        }
        out.push(Delivery {
            to: conn,
            what: Outbound::Close {
                error: None,
                reason: CloseReason::QueueFull,
            },
        });
        self.remove_peer(conn.peer, Kind::Disconnected, "failed update", out);
    }

    /// Closes every connection with `error:"coordinator closed"` and removes them as LOST (their
    /// WireGuard tunnels keep working). Later connections are closed at once.
    pub fn shutdown(&mut self, out: &mut Vec<Delivery>) {
        self.closed = true;
        let peers: Vec<(Uuid, u64)> = self.peers.iter().map(|(id, p)| (*id, p.gen)).collect();
        for (peer, gen) in peers {
            out.push(Delivery {
                to: ConnId { peer, gen },
                what: Outbound::Close {
                    error: Some(ERR_COORDINATOR_CLOSED.to_owned()),
                    reason: CloseReason::Shutdown,
                },
            });
            self.remove_peer(peer, Kind::Lost, "coordinator close", out);
        }
    }
}
