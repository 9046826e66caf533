//! The coordinator's vocabulary: connection ids, close reasons, request errors and validation.
//!
//! Why: the sharded [`super::PeerGraph`], the sessions (v1 and v2) and the test model of the
//! graph (`graph/model`, compiled for tests only) all speak of the same connections, reasons and
//! errors, and validate requests the same way before any part is applied (a request is validated
//! completely: authorization, node present, every UUID 16 bytes; Go applies `update_self` before
//! discovering a bad `add_tunnel` id). This module owns those shared definitions and nothing else;
//! it does no I/O, reads no clock and takes no lock.

use proto::tailnet::v2::{CoordinateRequest, Node};
use uuid::Uuid;

use crate::authz::{AuthzError, CoordinateeAuth};

/// Error sent to a connection replaced by a newer one with the same peer id.
pub const ERR_OVERWRITTEN: &str = "peer ID overwritten by new connection";
/// Error sent to every connection when the coordinator shuts down.
pub const ERR_COORDINATOR_CLOSED: &str = "coordinator closed";

/// One connection of one peer. A peer id may reconnect; `gen` tells the connections apart, so a
/// stale connection's late events never touch its successor.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ConnId {
    /// The peer's id (agent UUID, client UUID, ...).
    pub peer: Uuid,
    /// Unique per connection; chosen by the caller, never reused.
    pub gen: u64,
}

/// Why a connection's stream ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CloseReason {
    /// The peer sent `disconnect`.
    Disconnect,
    /// The connection was dropped without `disconnect`.
    Lost,
    /// A newer connection with the same peer id replaced it.
    Overwritten,
    /// Its response queue was full.
    QueueFull,
    /// It sent a request that failed authorization or validation.
    InvalidRequest,
    /// The coordinator is shutting down (or already shut down).
    Shutdown,
}

impl CloseReason {
    /// Metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            CloseReason::Disconnect => "disconnect",
            CloseReason::Lost => "lost",
            CloseReason::Overwritten => "overwritten",
            CloseReason::QueueFull => "queue_full",
            CloseReason::InvalidRequest => "invalid_request",
            CloseReason::Shutdown => "shutdown",
        }
    }
}

/// What the session should do with its stream after a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flow {
    /// Keep reading requests.
    Continue,
    /// The stream is finished (disconnect processed, or the connection was already removed).
    Close,
}

/// A fatal problem with a request. The connection has already been told (its final error is
/// `Display` of this) and removed as LOST.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CoordinateError {
    /// The request was not allowed for this identity.
    #[error("authorization: {0}")]
    Authz(#[from] AuthzError),
    /// A peer id in the request was not 16 bytes.
    #[error("unable to convert bytes to UUID: invalid UUID (got {0} bytes)")]
    BadUuid(usize),
    /// `update_self` carried no node.
    #[error("node update failed: update_self without a node")]
    MissingNode,
    /// A node field holds more entries than [`NodeLimits`] allow.
    #[error("node update failed: node has {count} {field}, more than the limit of {limit}")]
    TooManyEntries {
        /// The node field (`endpoints`, `addresses`, ...).
        field: &'static str,
        /// Entries sent.
        count: usize,
        /// The configured limit.
        limit: usize,
    },
    /// An `add_tunnel` would give the peer more tunnels than
    /// [`super::GraphConfig::max_tunnels_per_peer`] allows.
    #[error("add tunnel failed: peer already has {limit} tunnels, the limit")]
    TooManyTunnels {
        /// The configured limit.
        limit: usize,
    },
    /// A node's encoding is larger than [`NodeLimits::max_node_bytes`].
    #[error("node update failed: node is {size} bytes encoded, more than the limit of {limit}")]
    NodeTooLarge {
        /// Encoded size of the node sent.
        size: usize,
        /// The configured limit.
        limit: usize,
    },
}

/// How large one node may be. A node over any limit ends its session with
/// [`CoordinateError::TooManyEntries`] or [`CoordinateError::NodeTooLarge`], so no peer can make
/// the graph hold more than `max_node_bytes` (plus the bounded per-entry overhead) for it.
///
/// The defaults are far above what real Coder nodes carry (a few hundred bytes to a few KB: two
/// addresses and allowed IPs, one `/128` each; endpoints from the host's interfaces plus STUN and
/// port-mapped addresses, usually under 20; `derp_latency` keys `"<region>-v4"`/`"<region>-v6"`,
/// two per DERP region).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeLimits {
    /// Entries in `endpoints` (a multi-homed host with many interfaces has a few dozen).
    pub max_endpoints: usize,
    /// Entries in `addresses` (Coder: 1 or 2).
    pub max_addresses: usize,
    /// Entries in `allowed_ips` (Coder: 1 or 2).
    pub max_allowed_ips: usize,
    /// Entries in `derp_latency` (two per region; 30 regions make 60).
    pub max_derp_latency: usize,
    /// Entries in `derp_forced_websocket` (at most one per region).
    pub max_derp_forced_websocket: usize,
    /// Bytes of one node's protobuf encoding.
    pub max_node_bytes: usize,
}

/// Default [`NodeLimits::max_endpoints`].
pub const DEFAULT_MAX_NODE_ENDPOINTS: usize = 256;
/// Default [`NodeLimits::max_addresses`].
pub const DEFAULT_MAX_NODE_ADDRESSES: usize = 64;
/// Default [`NodeLimits::max_allowed_ips`].
pub const DEFAULT_MAX_NODE_ALLOWED_IPS: usize = 256;
/// Default [`NodeLimits::max_derp_latency`].
pub const DEFAULT_MAX_NODE_DERP_LATENCY: usize = 512;
/// Default [`NodeLimits::max_derp_forced_websocket`].
pub const DEFAULT_MAX_NODE_DERP_FORCED_WEBSOCKET: usize = 256;
/// Default [`NodeLimits::max_node_bytes`] (64 KiB).
pub const DEFAULT_MAX_NODE_BYTES: usize = 64 << 10;

impl Default for NodeLimits {
    fn default() -> Self {
        Self {
            max_endpoints: DEFAULT_MAX_NODE_ENDPOINTS,
            max_addresses: DEFAULT_MAX_NODE_ADDRESSES,
            max_allowed_ips: DEFAULT_MAX_NODE_ALLOWED_IPS,
            max_derp_latency: DEFAULT_MAX_NODE_DERP_LATENCY,
            max_derp_forced_websocket: DEFAULT_MAX_NODE_DERP_FORCED_WEBSOCKET,
            max_node_bytes: DEFAULT_MAX_NODE_BYTES,
        }
    }
}

impl NodeLimits {
    /// Checks `node` against the limits; on success returns its encoded size (what the graph
    /// accounts for holding it). Entry counts are checked first, so an oversized node costs no
    /// walk of its encoding.
    pub fn check(&self, node: &Node) -> Result<usize, CoordinateError> {
        for (field, count, limit) in [
            ("endpoints", node.endpoints.len(), self.max_endpoints),
            ("addresses", node.addresses.len(), self.max_addresses),
            ("allowed_ips", node.allowed_ips.len(), self.max_allowed_ips),
            (
                "derp_latency",
                node.derp_latency.len(),
                self.max_derp_latency,
            ),
            (
                "derp_forced_websocket",
                node.derp_forced_websocket.len(),
                self.max_derp_forced_websocket,
            ),
        ] {
            if count > limit {
                return Err(CoordinateError::TooManyEntries {
                    field,
                    count,
                    limit,
                });
            }
        }
        let size = prost::Message::encoded_len(node);
        if size > self.max_node_bytes {
            return Err(CoordinateError::NodeTooLarge {
                size,
                limit: self.max_node_bytes,
            });
        }
        Ok(size)
    }
}

/// A peer id from wire bytes (16 bytes) or [`CoordinateError::BadUuid`].
pub(crate) fn parse_id(b: &[u8]) -> Result<Uuid, CoordinateError> {
    Uuid::from_slice(b).map_err(|_| CoordinateError::BadUuid(b.len()))
}

/// Checks a request completely before any part of it is applied.
pub(crate) fn validate(
    auth: &CoordinateeAuth,
    req: &CoordinateRequest,
) -> Result<(), CoordinateError> {
    auth.authorize(req)?;
    if let Some(u) = &req.update_self {
        if u.node.is_none() {
            return Err(CoordinateError::MissingNode);
        }
    }
    for t in [&req.add_tunnel, &req.remove_tunnel].into_iter().flatten() {
        parse_id(&t.id)?;
    }
    for r in &req.ready_for_handshake {
        parse_id(&r.id)?;
    }
    Ok(())
}
