//! Reading and the packet hot path: bytes from the transport → frames → actions.
//!
//! Why it is one file: a relayed packet's whole life on the receiving side reads top to bottom
//! here — [`ConnTask::process_frames`] finds a complete frame in the read buffer, `proto`'s
//! codec rewrites it into a RecvPacket in place ([`rewrite_send_to_recv`] for a client's
//! SendPacket, [`rewrite_forward_to_recv`] for a mesh peer's ForwardPacket) and
//! [`ConnTask::deliver`] pushes that slice of the read buffer to the destination's queue and
//! counts the outcome, the same way for both.
//!
//! Reading itself keeps an idle connection free of heap memory (see the module doc of
//! [`super`]): with no buffer, bytes land in a small stack buffer first.
//!
//! With a receive rate limit configured, each frame first takes its tokens
//! ([`ConnTask::take_rate_tokens`]); a frame that must wait pauses reading until the connection's
//! timer says the tokens are there.
//!
//! Must never: allocate, lock anything but the destination's shard and queue, or log per
//! packet (a new rate limit configuration builds one bucket, once); buffer the payload of a frame type the server ignores; read a frame over 1 MiB.

use std::io;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use proto::derp::{
    looks_like_disco, rewrite_forward_to_recv, rewrite_send_to_recv, FrameHeader, FrameType,
    FORWARD_PREFIX_LEN, FRAME_HEADER_LEN, KEY_LEN, MAX_FRAME_SIZE, PACKET_PREFIX_LEN, PING_LEN,
};
use proto::key::NodePublic;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;

use super::{Close, ConnTask};
use crate::core::mesh::ForwardItem;
use crate::core::metrics::{DropReason, Hot, PacketKind};
use crate::core::queue::{Control, PushOutcome};
use crate::core::registry::Route;
use proto::derp::PeerGoneReason;

/// Initial and minimum read size while busy.
pub(super) const READ_CHUNK: usize = 16 << 10;
/// Largest read size (reached when reads keep filling the buffer).
pub(super) const READ_CHUNK_MAX: usize = 64 << 10;
/// Read into the current buffer only if at least this much room is left.
const MIN_SPARE: usize = 2048;
/// Stack buffer used to read from an idle connection without holding heap memory. A read
/// shorter than this drained the socket: what arrived is kept in an exact-size buffer (usually
/// one small frame, handled and freed at once). A full one starts a burst: a whole chunk.
pub(super) const IDLE_READ: usize = 512;
/// PeerGone(NotHere) rate limit per connection: 1/s, burst 3 (derper).
pub(super) const NOT_HERE_BURST: f64 = 3.0;
const NOT_HERE_PER_SEC: f64 = 1.0;

/// Where a relayed packet came from. Only the bookkeeping differs: a client's packets are
/// remembered per destination (for PeerGone when it leaves) and an unknown destination is
/// counted under its own reason for each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Origin {
    /// A client's SendPacket.
    Client,
    /// A mesh peer's ForwardPacket (delivered locally, never forwarded again).
    Mesh,
}

impl<IO: AsyncRead + AsyncWrite + Unpin> ConnTask<'_, IO> {
    /// Bytes the parser needs before it can make progress.
    fn bytes_wanted(&self) -> usize {
        if self.skip > 0 {
            return 0;
        }
        match FrameHeader::decode(&self.rbuf) {
            Some(h) if handled(h.frame_type()) => {
                (FRAME_HEADER_LEN + h.payload_len()).saturating_sub(self.rbuf.len())
            }
            _ => FRAME_HEADER_LEN.saturating_sub(self.rbuf.len()),
        }
    }

    pub(super) fn poll_read_some(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        if self.rbuf.capacity() == 0 || self.compacted {
            // Idle mode (no buffer, or only a quiet client's partial frame with no room to
            // spare): no heap memory is added until bytes actually arrive.
            let mut stack = [0u8; IDLE_READ];
            let mut rb = ReadBuf::new(&mut stack);
            match Pin::new(&mut self.io).poll_read(cx, &mut rb) {
                Poll::Ready(Ok(())) => {
                    let n = rb.filled().len();
                    if n > 0 {
                        // Short read: the socket is drained, keep exactly what arrived. Full
                        // read: a burst is starting, take a whole chunk.
                        let extra = if n < IDLE_READ { 0 } else { self.read_chunk };
                        let mut b = BytesMut::with_capacity(self.rbuf.len() + n + extra);
                        b.extend_from_slice(&self.rbuf);
                        b.extend_from_slice(rb.filled());
                        self.rbuf = b;
                        self.read_seen = true;
                        self.compacted = false;
                    }
                    Poll::Ready(Ok(n))
                }
                Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
                Poll::Pending => Poll::Pending,
            }
        } else {
            let need = self.bytes_wanted();
            let spare = self.rbuf.capacity() - self.rbuf.len();
            if spare < need.max(MIN_SPARE) {
                let want = need.max(self.read_chunk);
                if !self.rbuf.try_reclaim(want) {
                    // The old allocation is still referenced by queued packets (or is too
                    // small): start a new one and carry over the partial frame.
                    let mut b = BytesMut::with_capacity(self.rbuf.len() + want);
                    b.extend_from_slice(&self.rbuf);
                    self.rbuf = b;
                }
            }
            let offered = self.rbuf.capacity() - self.rbuf.len();
            match tokio_util::io::poll_read_buf(Pin::new(&mut self.io), cx, &mut self.rbuf) {
                Poll::Ready(Ok(n)) => {
                    if n == offered && self.read_chunk < READ_CHUNK_MAX {
                        self.read_chunk = (self.read_chunk * 2).min(READ_CHUNK_MAX);
                    }
                    self.read_seen = true;
                    Poll::Ready(Ok(n))
                }
                other => other,
            }
        }
    }

    /// Parses and handles every complete frame in the read buffer.
    pub(super) fn process_frames(&mut self) -> Result<(), Close> {
        loop {
            if self.read_paused || self.rate_wait.is_some() {
                return Ok(());
            }
            if self.skip > 0 {
                let n = self.skip.min(self.rbuf.len());
                self.rbuf.advance(n);
                self.skip -= n;
                if self.skip > 0 {
                    return Ok(());
                }
            }
            let Some(hdr) = FrameHeader::decode(&self.rbuf) else {
                return Ok(());
            };
            let len = hdr.payload_len();
            if len > MAX_FRAME_SIZE {
                return Err(self.protocol_error("frame_too_large"));
            }
            if !self.rate_paid {
                self.rate_paid = true;
                if let Some(until) = self.take_rate_tokens(len) {
                    self.metrics.rate_limit_waited.inc();
                    self.rate_wait = Some(until);
                    return Ok(());
                }
            }
            let typ = hdr.frame_type();
            self.note_activity();
            if !handled(typ) {
                // Unknown or ignored type: discard the payload as it streams in, never buffer it.
                self.metrics.hot.add(Hot::UnknownFrames, 1);
                self.rbuf.advance(FRAME_HEADER_LEN);
                self.skip = len;
                self.rate_paid = false;
                continue;
            }
            if let Err(kind) = check_frame(&hdr, self.params.mesh) {
                return Err(self.protocol_error(kind));
            }
            if self.rbuf.len() < FRAME_HEADER_LEN + len {
                return Ok(());
            }
            let frame = self.rbuf.split_to(FRAME_HEADER_LEN + len);
            self.rate_paid = false;
            match typ {
                FrameType::SendPacket => self.on_send_packet(frame)?,
                FrameType::ForwardPacket => self.on_forward_packet(frame)?,
                FrameType::NotePreferred => self.on_note_preferred(frame[FRAME_HEADER_LEN] != 0),
                FrameType::Ping => {
                    self.metrics.hot.add(Hot::GotPing, 1);
                    if self.pong.is_none() {
                        let mut d = [0u8; PING_LEN];
                        d.copy_from_slice(&frame[FRAME_HEADER_LEN..FRAME_HEADER_LEN + PING_LEN]);
                        self.pong = Some(d);
                    }
                }
                FrameType::WatchConns => self.registry.add_watcher(&self.h),
                FrameType::ClosePeer => {
                    let key = key_at(&frame, FRAME_HEADER_LEN);
                    let n = self.registry.close_peer(&key);
                    tracing::info!(target: "derp", peer = %key, closed = n, "ClosePeer from mesh peer");
                }
                _ => {}
            }
        }
    }

    /// The receive rate limit for a frame with a `len`-byte payload (derper's `rateLimit`, after
    /// the header and before the body): `Some(t)` means wait until `t`. Mesh peers are exempt;
    /// without a limit this is one atomic load.
    #[inline]
    fn take_rate_tokens(&mut self, len: usize) -> Option<Instant> {
        if self.params.mesh {
            return None;
        }
        let generation = self.rate.generation();
        if generation != self.rate_generation {
            self.rate_generation = generation;
            self.bucket =
                crate::core::rate::ReceiveBucket::new(self.rate.current(), Instant::now())
                    .map(Box::new);
        }
        let bucket = self.bucket.as_mut()?;
        bucket.reserve(len, Instant::now())
    }

    /// Any frame from a duplicate connection makes it the active one (derper's
    /// `lastWriterIsActive`).
    #[inline]
    fn note_activity(&self) {
        // Common case: one relaxed load. Only a non-active duplicate takes the shard lock.
        if self.h.is_dup.load(Ordering::Relaxed) && !self.h.is_active.load(Ordering::Relaxed) {
            self.registry.note_activity(&self.h);
        }
    }

    /// Counts bad input under `kind` and ends the connection.
    fn protocol_error(&self, kind: &'static str) -> Close {
        self.metrics.protocol_error(kind);
        Close::Protocol(kind)
    }

    /// A frame `proto`'s rewrite refused. Cannot happen: [`check_frame`] accepted its header and
    /// the buffer holds exactly that frame; counted like the header check would count it.
    #[cold]
    fn rejected(&self, typ: FrameType, frame_len: usize) -> Close {
        self.protocol_error(malformed(typ, frame_len.saturating_sub(FRAME_HEADER_LEN)))
    }

    /// The hot path: SendPacket → RecvPacket in place → destination queue.
    #[inline]
    fn on_send_packet(&mut self, mut frame: BytesMut) -> Result<(), Close> {
        let dst = key_at(&frame, FRAME_HEADER_LEN);
        let pkt_len = frame.len() - PACKET_PREFIX_LEN;
        let disco = looks_like_disco(&frame[PACKET_PREFIX_LEN..]);
        let hot = &self.metrics.hot;
        hot.add2(Hot::PacketsReceived, 1, Hot::BytesReceived, pkt_len as u64);
        rewrite_send_to_recv(&mut frame, &self.h.key)
            .map_err(|_| self.rejected(FrameType::SendPacket, frame.len()))?;
        self.deliver(frame.freeze(), dst, disco, pkt_len, Origin::Client);
        Ok(())
    }

    /// Mesh ForwardPacket: deliver locally with the original source; never re-forward.
    fn on_forward_packet(&mut self, mut frame: BytesMut) -> Result<(), Close> {
        let dst = key_at(&frame, PACKET_PREFIX_LEN);
        let pkt_len = frame.len() - FORWARD_PREFIX_LEN;
        let disco = looks_like_disco(&frame[FORWARD_PREFIX_LEN..]);
        self.metrics.hot.add(Hot::PacketsForwardedIn, 1);
        // `0a len src dst pkt` → 32 bytes in: `05 len-32 src pkt`.
        let start = rewrite_forward_to_recv(&mut frame)
            .map_err(|_| self.rejected(FrameType::ForwardPacket, frame.len()))?;
        frame.advance(start);
        self.deliver(frame.freeze(), dst, disco, pkt_len, Origin::Mesh);
        Ok(())
    }

    /// Pushes one RecvPacket frame to `dst`'s queue, wakes its writer and counts what became of
    /// the packet (`pkt_len` bytes, without prefix). The one outcome path for SendPacket and
    /// ForwardPacket.
    #[inline]
    fn deliver(
        &mut self,
        frame: Bytes,
        dst: NodePublic,
        disco: bool,
        pkt_len: usize,
        origin: Origin,
    ) {
        let hot = &self.metrics.hot;
        let kind = PacketKind::from_disco(disco);
        let sent_to = &mut self.sent_to;
        let last_dst = &mut self.last_dst;
        // A forwarded packet's source (in the RecvPacket frame): its local receivers are told
        // when it leaves the region.
        let mesh_src = (origin == Origin::Mesh).then(|| key_at(&frame, FRAME_HEADER_LEN));
        let mut mesh_receiver = None;
        let mut mesh_out = None;
        let outcome = self.registry.with_route(&dst, |r| match r {
            Route::Local(d) => {
                match origin {
                    Origin::Client if d.id != *last_dst => {
                        *last_dst = d.id;
                        sent_to.entry(d.id).or_insert_with(|| Arc::downgrade(d));
                    }
                    Origin::Mesh => {
                        // Noted outside this shard's lock (the source's entry is elsewhere),
                        // once per run of packets of one (source, receiver) pair.
                        let pair = mesh_src.map_or(0, |s| pair_fingerprint(&s, d.id));
                        if pair != *last_dst {
                            *last_dst = pair;
                            mesh_receiver = Some(d.clone());
                        }
                    }
                    Origin::Client => {}
                }
                Some(d.queue.push_packet(frame, disco))
            }
            // A client's packet for a key on another relay; a forwarded one is never forwarded
            // again (it counts as unknown_dest_on_fwd below).
            Route::Mesh(f) if origin == Origin::Client => {
                mesh_out = Some((f.clone(), frame));
                None
            }
            Route::Mesh(_) | Route::Unknown => None,
        });
        if let (Some(receiver), Some(src)) = (mesh_receiver, mesh_src) {
            self.registry.note_mesh_sender(&src, &receiver);
        }
        if let Some((fwd, frame)) = mesh_out {
            hot.add(Hot::PacketsForwardedOut, 1);
            fwd.forward(ForwardItem::new(dst, frame));
            return;
        }
        // Wake the destination's writer only now, outside the shard lock.
        let outcome = outcome.map(|(o, w)| {
            if let Some(w) = w {
                w.wake();
            }
            o
        });
        match outcome {
            Some(PushOutcome::Queued) => {}
            Some(PushOutcome::DroppedHead(n)) => hot.drop_packet(
                DropReason::QueueHead,
                kind,
                n.saturating_sub(PACKET_PREFIX_LEN),
            ),
            Some(PushOutcome::Closed) => {
                hot.drop_packet(DropReason::GoneDisconnected, kind, pkt_len)
            }
            None => {
                let reason = match origin {
                    Origin::Client => DropReason::UnknownDest,
                    Origin::Mesh => DropReason::UnknownDestOnFwd,
                };
                hot.drop_packet(reason, kind, pkt_len);
                if disco {
                    self.send_not_here(dst);
                }
            }
        }
    }

    /// PeerGone(NotHere) for a disco packet to an unknown destination, rate-limited per
    /// connection like derper.
    fn send_not_here(&mut self, dst: NodePublic) {
        let now = Instant::now();
        let elapsed = now
            .saturating_duration_since(self.not_here_at)
            .as_secs_f64();
        self.not_here_at = now;
        self.not_here_tokens =
            (self.not_here_tokens + elapsed * NOT_HERE_PER_SEC).min(NOT_HERE_BURST);
        if self.not_here_tokens < 1.0 {
            return;
        }
        self.not_here_tokens -= 1.0;
        let f = self.encode_control(Control::PeerGone {
            key: dst,
            reason: PeerGoneReason::NotHere,
        });
        self.out.push_back(f);
    }

    /// NotePreferred: this connection is (or stops being) the client's home relay.
    fn on_note_preferred(&mut self, preferred: bool) {
        if preferred != self.preferred {
            self.preferred = preferred;
            self.h
                .preferred
                .store(preferred, std::sync::atomic::Ordering::Relaxed);
            let settled = self.h.connected_at.elapsed() > crate::core::metrics::HOME_MOVE_SETTLE;
            if preferred {
                self.metrics.current_home_connections.inc();
                if settled {
                    self.metrics.home_moves_in.inc();
                }
            } else {
                self.metrics.current_home_connections.dec();
                if settled {
                    self.metrics.home_moves_out.inc();
                }
            }
        }
    }
}

/// Identifies a (source key, receiving connection) pair of a mesh connection's packets in its
/// `last_dst` slot (a client connection keeps the receiver's id there).
#[inline]
fn pair_fingerprint(src: &NodePublic, receiver: u64) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&src.as_bytes()[..8]);
    (u64::from_le_bytes(w) ^ receiver.wrapping_mul(0x9E37_79B9_7F4A_7C15)) | 1
}

/// The key stored at `at` in a frame whose length was checked.
#[inline]
fn key_at(frame: &[u8], at: usize) -> NodePublic {
    let mut k = [0u8; KEY_LEN];
    k.copy_from_slice(&frame[at..at + KEY_LEN]);
    NodePublic::from_bytes(k)
}

/// Frame types the server acts on; everything else is skipped.
#[inline]
fn handled(t: FrameType) -> bool {
    t.handled_by_server()
}

/// Length and permission rules checked from the header, before buffering the payload.
fn check_frame(h: &FrameHeader, mesh: bool) -> Result<(), &'static str> {
    let typ = h.frame_type();
    if typ.requires_mesh_key() && !mesh {
        return Err("insufficient_permissions");
    }
    if h.validate_from_client().is_ok() {
        return Ok(());
    }
    Err(malformed(typ, h.payload_len()))
}

/// The `derp_protocol_errors` label for a frame of type `typ` whose `len`-byte payload breaks
/// the length rules.
fn malformed(typ: FrameType, len: usize) -> &'static str {
    match typ {
        FrameType::SendPacket if len < KEY_LEN => "short_send_packet",
        FrameType::SendPacket => "send_packet_too_large",
        FrameType::ForwardPacket if len < 2 * KEY_LEN => "short_forward_packet",
        FrameType::ForwardPacket => "forward_packet_too_large",
        FrameType::NotePreferred => "bad_note_preferred",
        FrameType::Ping => "bad_ping",
        FrameType::ClosePeer => "bad_close_peer",
        FrameType::WatchConns => "bad_watch_conns",
        _ => "frame_too_large",
    }
}
