//! The coordinator's vocabulary: connection ids, close reasons, request errors and validation.
//!
//! Why: the sharded [`super::PeerGraph`], the sessions (v1 and v2) and the test model of the
//! graph (`graph/model`, compiled for tests only) all speak of the same connections, reasons and
//! errors, and validate requests the same way before any part is applied (a request is validated
//! completely: authorization, node present, every UUID 16 bytes; Go applies `update_self` before
//! discovering a bad `add_tunnel` id). This module owns those shared definitions and nothing else;
//! it does no I/O, reads no clock and takes no lock.

use proto::tailnet::v2::CoordinateRequest;
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
