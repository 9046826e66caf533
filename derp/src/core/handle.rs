//! The part of a connection that other connections reach: its key, its send queue and the
//! routing flags the registry maintains.
//!
//! Why a module of its own: the registry stores handles, senders push into them and the
//! connection task drains them, so the handle sits below all three (`conn` → `registry` →
//! `handle` → `queue`) and none of them has to import another in a circle.
//!
//! Must never: hold anything the connection task alone needs (buffers, timers): every handle is
//! shared for the connection's whole life, idle or not.

use std::net::SocketAddr;
use std::sync::atomic::AtomicBool;
use std::time::Instant;

use proto::derp::{PeerPresentFlags, PACKET_PREFIX_LEN};
use proto::key::NodePublic;

use crate::core::metrics::{DropReason, HotCounters, PacketKind};
use crate::core::queue::{Control, SendQueue};

/// The part of a connection other connections can reach: its queue and routing flags.
#[derive(Debug)]
pub(crate) struct ConnHandle {
    /// Process-unique connection id (also in logs and spans).
    pub id: u64,
    /// The client's node key.
    pub key: NodePublic,
    /// Frames waiting for this connection's writer.
    pub queue: SendQueue,
    /// Another connection with the same key exists (dup set). Maintained by the registry.
    pub is_dup: AtomicBool,
    /// This connection is the active destination of its key. Maintained by the registry.
    pub is_active: AtomicBool,
    /// Remote address (for PeerPresent).
    pub remote: SocketAddr,
    /// PeerPresent flags for this connection.
    pub presence_flags: PeerPresentFlags,
    /// When the handshake completed (home moves within the first seconds are not counted, and
    /// the status page shows it).
    pub connected_at: Instant,
    /// The client said this relay is not its ideal node (`derp_current_notideal_connections`).
    pub not_ideal: bool,
    /// The client marked this relay as its home (NotePreferred). Written by the connection's
    /// own task, read by snapshots.
    pub preferred: AtomicBool,
}

impl ConnHandle {
    /// A handle that is neither a duplicate nor active yet (registration decides).
    pub(crate) fn new(
        id: u64,
        key: NodePublic,
        queue: SendQueue,
        remote: SocketAddr,
        presence_flags: PeerPresentFlags,
        not_ideal: bool,
    ) -> Self {
        Self {
            connected_at: Instant::now(),
            not_ideal,
            preferred: AtomicBool::new(false),
            id,
            key,
            queue,
            is_dup: AtomicBool::new(false),
            is_active: AtomicBool::new(false),
            remote,
            presence_flags,
        }
    }

    /// The PeerPresent control item announcing this connection to watchers.
    pub(crate) fn presence(&self) -> Control {
        Control::PeerPresent {
            key: self.key,
            addr: self.remote,
            flags: self.presence_flags,
        }
    }

    /// Closes the queue (senders see `Closed` from now on) and counts every packet still in it
    /// as dropped because its destination went away.
    pub(crate) fn close_queue(&self, hot: &HotCounters) {
        let (disco, regular) = self.queue.close();
        for (kind, list) in [(PacketKind::Disco, disco), (PacketKind::Other, regular)] {
            for b in list {
                hot.drop_packet(
                    DropReason::GoneDisconnected,
                    kind,
                    b.len().saturating_sub(PACKET_PREFIX_LEN),
                );
            }
        }
    }
}
