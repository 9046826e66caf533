//! One client connection after the handshake: reader, writer and timers in a single task.
//!
//! Why one task with a hand-written poll loop: an idle relay connection should cost as little as
//! possible (no second task, no split locks, no per-connection timer besides one `Sleep`), and
//! the packet path should not bounce through channels. [`ConnTask::poll_once`] reads frames
//! straight into a `BytesMut`, turns each SendPacket into a RecvPacket *in place* (same length:
//! type byte and key are overwritten) and hands the resulting slice of the read buffer to the
//! destination's [`SendQueue`] — no copy and no allocation per packet. The same poll drains this
//! connection's own queue into one vectored (or coalesced, up to 64 KiB) write and flushes when
//! the queue is empty.
//!
//! Memory when idle: most relay connections are idle most of the time, so an idle connection
//! holds no buffer at all, only its task future (a few hundred bytes: keep it small, box
//! anything large and short-lived), its [`ConnHandle`], its registry entry and the transport.
//! Without a read buffer, the next bytes are read into a [`IDLE_READ`]-byte stack buffer: a
//! short read (the socket is drained, typically one small frame such as NotePreferred or Ping)
//! is copied into a buffer of exactly its size, which is freed as soon as its frames are
//! handled; a full one means a burst, so a whole [`READ_CHUNK`] is allocated and the read buffer
//! grows on demand from there (up to [`READ_CHUNK_MAX`] per read, or the size of a large frame).
//! While the connection holds any buffer, a check runs every [`IDLE_RELEASE`] (on the same
//! `Sleep`, so nothing is armed per read): a side that saw no traffic for a whole period gives its
//! buffers back — the empty read buffer (a partial frame is kept in a buffer of its own size),
//! the write lists, the queue's storage and the local histogram. Busy connections never pay for
//! this beyond one timer tick per period.
//!
//! Liveness: one `Sleep` serves both the keepalive (interval + per-connection jitter) and the
//! write-stall check (no write progress for `write_timeout` → close); nothing is armed per packet.
//!
//! Must never: block or `.await` inside the poll loop (everything is non-blocking), log per
//! packet, allocate per packet in a burst (only a nearly idle connection's short reads get one
//! exact-size buffer each), keep a read chunk after the connection went quiet, hold a registry
//! or queue lock while waking or writing, read a frame larger than 1 MiB into memory, or let one
//! connection's bad input affect another.

use std::collections::VecDeque;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use prometheus::local::LocalHistogram;
use proto::derp::{
    looks_like_disco, FrameHeader, FrameType, FORWARD_PREFIX_LEN, FRAME_HEADER_LEN, KEY_LEN,
    MAX_FRAME_SIZE, PACKET_PREFIX_LEN, PEER_PRESENT_LEN,
};
use proto::key::NodePublic;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

use crate::metrics::{DropReason, Hot, PacketKind};
use crate::queue::{CloseRequest, Control, PushOutcome, SendQueue};
use crate::registry::{IdHasherBuilder, Route, SentTo, PEER_GONE_NOT_HERE};
use crate::server::Server;

/// Initial and minimum read size while busy.
const READ_CHUNK: usize = 16 << 10;
/// Largest read size (reached when reads keep filling the buffer).
const READ_CHUNK_MAX: usize = 64 << 10;
/// Read into the current buffer only if at least this much room is left.
const MIN_SPARE: usize = 2048;
/// Stack buffer used to read from an idle connection without holding heap memory. A read
/// shorter than this drained the socket: what arrived is kept in an exact-size buffer (usually
/// one small frame, handled and freed at once). A full one starts a burst: a whole chunk.
const IDLE_READ: usize = 512;
/// A connection that holds buffers is checked this often; buffers of a side that was quiet for a
/// whole period are released (so memory goes back 1–2 periods after the last byte).
const IDLE_RELEASE: Duration = Duration::from_secs(1);
/// Reads (each up to [`READ_CHUNK_MAX`]) handled per poll before yielding. One: the writers
/// our pushes wake sit in this worker's LIFO slot (not stealable) until we yield, so a larger
/// budget lets a flooding sender overflow destination queues before their writers run. Measured
/// in-process on 2 cores (tests/core_throughput.rs, open-loop flood): 16 reads/poll delivered
/// 5% of the flood, 1 read/poll 21%; closed-loop throughput was not hurt.
const READS_PER_POLL: usize = 1;
/// Coalescing limit for one write (and the iovec count limit for vectored writes).
const WRITE_BATCH_BYTES: usize = 64 << 10;
const MAX_IOVECS: usize = 64;
/// Flush the local `buffered_write_frames` histogram after this many observations.
const HIST_FLUSH_EVERY: u32 = 64;
/// PeerGone(NotHere) rate limit per connection: 1/s, burst 3 (derper).
const NOT_HERE_BURST: f64 = 3.0;
const NOT_HERE_PER_SEC: f64 = 1.0;

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
    pub presence_flags: u8,
}

impl ConnHandle {
    /// The PeerPresent control item announcing this connection to watchers.
    pub(crate) fn presence(&self) -> Control {
        let ip = match self.remote.ip() {
            std::net::IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
            std::net::IpAddr::V6(v6) => v6.octets(),
        };
        Control::PeerPresent {
            key: self.key,
            ip,
            port: self.remote.port(),
            flags: self.presence_flags,
        }
    }
}

/// Why a connection ended.
#[derive(Debug)]
pub(crate) enum Close {
    /// The client closed its side.
    Eof,
    /// Reading failed.
    ReadError(io::Error),
    /// Writing failed.
    WriteError(io::Error),
    /// Writes made no progress for the write timeout.
    WriteTimeout,
    /// Bad input from the client (label of `derp_protocol_errors`).
    Protocol(&'static str),
    /// A mesh peer asked to close this key.
    KickedByMesh,
    /// The server is shutting down (Restarting was sent, or could not be).
    Shutdown,
    /// The control list overflowed.
    ControlOverflow,
}

impl std::fmt::Display for Close {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Close::Eof => f.write_str("client closed"),
            Close::ReadError(e) => write!(f, "read error: {e}"),
            Close::WriteError(e) => write!(f, "write error: {e}"),
            Close::WriteTimeout => f.write_str("write timeout"),
            Close::Protocol(k) => write!(f, "protocol error: {k}"),
            Close::KickedByMesh => f.write_str("closed by mesh peer (ClosePeer)"),
            Close::Shutdown => f.write_str("server shutting down"),
            Close::ControlOverflow => f.write_str("control list overflow"),
        }
    }
}

/// Per-connection settings decided at handshake time.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ConnParams {
    pub mesh: bool,
    pub write_timeout: Duration,
    pub keepalive: Duration,
    pub keepalive_jitter: Duration,
}

/// The connection task's state. Only this task touches it.
pub(crate) struct ConnTask<'a, IO> {
    srv: &'a Server,
    h: Arc<ConnHandle>,
    io: IO,
    params: ConnParams,
    // --- reading
    rbuf: BytesMut,
    read_chunk: usize,
    /// Some bytes were read since the last idle check.
    read_seen: bool,
    /// `rbuf` holds a partial frame in a buffer of exactly its size (a quiet client stopped
    /// mid-frame): read through the stack buffer until more bytes arrive.
    compacted: bool,
    /// Bytes of an ignored frame's payload still to discard.
    skip: usize,
    read_paused: bool,
    // --- writing
    out: VecDeque<Bytes>,
    ctl: VecDeque<Control>,
    cbuf: BytesMut,
    wbuf: Vec<u8>,
    wpos: usize,
    frames_in_batch: u32,
    need_flush: bool,
    pong: Option<[u8; 8]>,
    close_after_flush: Option<Close>,
    stalled_since: Option<Instant>,
    /// Boxed: most idle connections have none, and the task stays small.
    hist: Option<Box<LocalHistogram>>,
    hist_pending: u32,
    // --- timers
    next_keepalive: Instant,
    /// When to check for buffers to release (armed while the connection holds any).
    release_at: Option<Instant>,
    // --- per-connection protocol state
    sent_to: SentTo,
    last_dst: u64,
    not_here_tokens: f64,
    not_here_at: Instant,
    preferred: bool,
}

impl<'a, IO: AsyncRead + AsyncWrite + Unpin> ConnTask<'a, IO> {
    pub(crate) fn new(
        srv: &'a Server,
        h: Arc<ConnHandle>,
        io: IO,
        rbuf: BytesMut,
        params: ConnParams,
    ) -> Self {
        let now = Instant::now();
        let rbuf = if rbuf.is_empty() {
            BytesMut::new()
        } else {
            rbuf
        };
        Self {
            srv,
            h,
            io,
            params,
            rbuf,
            read_chunk: READ_CHUNK,
            read_seen: false,
            compacted: false,
            skip: 0,
            read_paused: false,
            out: VecDeque::new(),
            ctl: VecDeque::new(),
            cbuf: BytesMut::new(),
            wbuf: Vec::new(),
            wpos: 0,
            frames_in_batch: 0,
            need_flush: false,
            pong: None,
            close_after_flush: None,
            stalled_since: None,
            hist: None,
            hist_pending: 0,
            next_keepalive: now + params.keepalive + params.keepalive_jitter,
            release_at: None,
            sent_to: SentTo::with_hasher(IdHasherBuilder),
            last_dst: 0,
            not_here_tokens: NOT_HERE_BURST,
            not_here_at: now,
            preferred: false,
        }
    }

    /// Runs the connection until it ends, then cleans up (unregister, drop accounting).
    /// Takes `&mut self` (not `self`) so the task's state is not stored twice in the future.
    pub(crate) async fn run(&mut self) -> Close {
        let sleep = tokio::time::sleep_until(self.next_keepalive);
        tokio::pin!(sleep);
        // Frames pipelined behind ClientInfo may already be buffered.
        let first = self.process_frames();
        let why = match first {
            Err(c) => c,
            Ok(()) => std::future::poll_fn(|cx| self.poll_once(cx, sleep.as_mut())).await,
        };
        self.finish(&why);
        why
    }

    fn poll_once(&mut self, cx: &mut Context<'_>, mut sleep: Pin<&mut Sleep>) -> Poll<Close> {
        // Bounded: each iteration either makes progress or returns.
        for _ in 0..4 {
            let mut yield_now = false;
            if !self.read_paused {
                let mut reads = 0;
                loop {
                    match self.poll_read_some(cx) {
                        Poll::Ready(Ok(0)) => return Poll::Ready(Close::Eof),
                        Poll::Ready(Ok(_)) => {
                            if let Err(c) = self.process_frames() {
                                return Poll::Ready(c);
                            }
                        }
                        Poll::Ready(Err(e)) => return Poll::Ready(Close::ReadError(e)),
                        Poll::Pending => break,
                    }
                    reads += 1;
                    if reads >= READS_PER_POLL {
                        yield_now = true;
                        break;
                    }
                }
            }
            if let Poll::Ready(c) = self.poll_write_phase(cx, sleep.as_mut()) {
                return Poll::Ready(c);
            }
            match sleep.as_mut().poll(cx) {
                Poll::Ready(()) => {
                    if let Err(c) = self.on_timer(sleep.as_mut()) {
                        return Poll::Ready(c);
                    }
                    // Write what the tick queued (keepalive) and re-register the timer.
                    continue;
                }
                Poll::Pending => {}
            }
            if self.release_at.is_none() && self.holds_buffers() {
                self.arm_release(sleep.as_mut());
            }
            if yield_now {
                cx.waker().wake_by_ref();
            }
            return Poll::Pending;
        }
        cx.waker().wake_by_ref();
        Poll::Pending
    }

    // ------------------------------------------------------------------ reading

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

    fn poll_read_some(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
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
    fn process_frames(&mut self) -> Result<(), Close> {
        loop {
            if self.read_paused {
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
            let typ = hdr.frame_type();
            self.note_activity();
            if !handled(typ) {
                // Unknown or ignored type: discard the payload as it streams in, never buffer it.
                self.srv.metrics.hot.add(Hot::UnknownFrames, 1);
                self.rbuf.advance(FRAME_HEADER_LEN);
                self.skip = len;
                continue;
            }
            if let Err(kind) = check_frame(&hdr, self.params.mesh) {
                return Err(self.protocol_error(kind));
            }
            if self.rbuf.len() < FRAME_HEADER_LEN + len {
                return Ok(());
            }
            let frame = self.rbuf.split_to(FRAME_HEADER_LEN + len);
            match typ {
                FrameType::SendPacket => self.on_send_packet(frame),
                FrameType::ForwardPacket => self.on_forward_packet(frame),
                FrameType::NotePreferred => self.on_note_preferred(frame[FRAME_HEADER_LEN] != 0),
                FrameType::Ping => {
                    self.srv.metrics.hot.add(Hot::GotPing, 1);
                    if self.pong.is_none() {
                        let mut d = [0u8; 8];
                        d.copy_from_slice(&frame[FRAME_HEADER_LEN..FRAME_HEADER_LEN + 8]);
                        self.pong = Some(d);
                    }
                }
                FrameType::WatchConns => self.srv.registry.add_watcher(&self.h),
                FrameType::ClosePeer => {
                    let mut k = [0u8; KEY_LEN];
                    k.copy_from_slice(&frame[FRAME_HEADER_LEN..FRAME_HEADER_LEN + KEY_LEN]);
                    let key = NodePublic::from_bytes(k);
                    let n = self.srv.registry.close_peer(&key);
                    tracing::info!(target: "derp", peer = %key, closed = n, "ClosePeer from mesh peer");
                }
                _ => {}
            }
        }
    }

    #[inline]
    fn note_activity(&self) {
        // Common case: one relaxed load. Only a non-active duplicate takes the shard lock.
        if self.h.is_dup.load(Ordering::Relaxed) && !self.h.is_active.load(Ordering::Relaxed) {
            self.srv.registry.note_activity(&self.h);
        }
    }

    fn protocol_error(&self, kind: &'static str) -> Close {
        self.srv.metrics.protocol_error(kind);
        Close::Protocol(kind)
    }

    /// The hot path: SendPacket → RecvPacket in place → destination queue.
    #[inline]
    fn on_send_packet(&mut self, mut frame: BytesMut) {
        let mut dst = [0u8; KEY_LEN];
        dst.copy_from_slice(&frame[FRAME_HEADER_LEN..PACKET_PREFIX_LEN]);
        let dst = NodePublic::from_bytes(dst);
        let pkt_len = frame.len() - PACKET_PREFIX_LEN;
        let disco = looks_like_disco(&frame[PACKET_PREFIX_LEN..]);
        let srv = self.srv;
        let hot = &srv.metrics.hot;
        hot.add2(Hot::PacketsReceived, 1, Hot::BytesReceived, pkt_len as u64);
        frame[0] = FrameType::RecvPacket.as_u8();
        frame[FRAME_HEADER_LEN..PACKET_PREFIX_LEN].copy_from_slice(self.h.key.as_bytes());
        let frame = frame.freeze();
        let kind = PacketKind::from_disco(disco);
        let sent_to = &mut self.sent_to;
        let last_dst = &mut self.last_dst;
        let outcome = srv.registry.with_route(&dst, |r| match r {
            Route::Local(d) => {
                if d.id != *last_dst {
                    *last_dst = d.id;
                    sent_to.entry(d.id).or_insert_with(|| Arc::downgrade(d));
                }
                Some(d.queue.push_packet(frame, disco))
            }
            // Mesh forwarding is not implemented yet; nothing registers mesh routes.
            Route::Mesh(_) | Route::Unknown => None,
        });
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
                hot.drop_packet(DropReason::UnknownDest, kind, pkt_len);
                if disco {
                    self.send_not_here(dst);
                }
            }
        }
    }

    /// Mesh ForwardPacket: deliver locally with the original source; never re-forward.
    fn on_forward_packet(&mut self, mut frame: BytesMut) {
        let mut dst = [0u8; KEY_LEN];
        dst.copy_from_slice(&frame[PACKET_PREFIX_LEN..FORWARD_PREFIX_LEN]);
        let dst = NodePublic::from_bytes(dst);
        let pkt_len = frame.len() - FORWARD_PREFIX_LEN;
        let disco = looks_like_disco(&frame[FORWARD_PREFIX_LEN..]);
        let srv = self.srv;
        let hot = &srv.metrics.hot;
        hot.add(Hot::PacketsForwardedIn, 1);
        // `0a len src dst pkt` → 32 bytes in: `05 len-32 src pkt`.
        frame.copy_within(FRAME_HEADER_LEN..PACKET_PREFIX_LEN, PACKET_PREFIX_LEN);
        let new_len = u32::try_from(KEY_LEN + pkt_len).unwrap_or(u32::MAX);
        let h = FrameHeader::new(FrameType::RecvPacket, new_len).encode();
        frame[KEY_LEN..PACKET_PREFIX_LEN].copy_from_slice(&h);
        frame.advance(KEY_LEN);
        let frame = frame.freeze();
        let kind = PacketKind::from_disco(disco);
        let outcome = srv.registry.with_route(&dst, |r| match r {
            Route::Local(d) => Some(d.queue.push_packet(frame, disco)),
            Route::Mesh(_) | Route::Unknown => None,
        });
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
                hot.drop_packet(DropReason::UnknownDestOnFwd, kind, pkt_len);
                if disco {
                    self.send_not_here(dst);
                }
            }
        }
    }

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
            reason: PEER_GONE_NOT_HERE,
        });
        self.out.push_back(f);
    }

    fn on_note_preferred(&mut self, preferred: bool) {
        if preferred != self.preferred {
            self.preferred = preferred;
            if preferred {
                self.srv.metrics.current_home_connections.inc();
            } else {
                self.srv.metrics.current_home_connections.dec();
            }
        }
    }

    // ------------------------------------------------------------------ writing

    fn encode_control(&mut self, c: Control) -> Bytes {
        let srv = self.srv;
        let hot = &srv.metrics.hot;
        match c {
            Control::PeerGone { key, reason } => {
                if reason == PEER_GONE_NOT_HERE {
                    hot.add(Hot::PeerGoneNotHereFrames, 1);
                } else {
                    hot.add(Hot::PeerGoneDisconnectedFrames, 1);
                }
                self.cbuf.reserve(FRAME_HEADER_LEN + KEY_LEN + 1);
                FrameHeader::new(FrameType::PeerGone, (KEY_LEN + 1) as u32).put(&mut self.cbuf);
                self.cbuf.put_slice(key.as_bytes());
                self.cbuf.put_u8(reason);
            }
            Control::PeerPresent {
                key,
                ip,
                port,
                flags,
            } => {
                self.cbuf.reserve(FRAME_HEADER_LEN + PEER_PRESENT_LEN);
                FrameHeader::new(FrameType::PeerPresent, PEER_PRESENT_LEN as u32)
                    .put(&mut self.cbuf);
                self.cbuf.put_slice(key.as_bytes());
                self.cbuf.put_slice(&ip);
                self.cbuf.put_u16(port);
                self.cbuf.put_u8(flags);
            }
        }
        self.cbuf.split().freeze()
    }

    /// Moves everything ready (pong, control, disco, packets) into `out`. Returns a close
    /// request from outside, if any.
    fn fill_out(&mut self, cx: &mut Context<'_>) -> Result<(), Close> {
        if let Some(p) = self.pong.take() {
            self.srv.metrics.hot.add(Hot::SentPong, 1);
            let mut b = [0u8; FRAME_HEADER_LEN + 8];
            b[..FRAME_HEADER_LEN].copy_from_slice(&FrameHeader::new(FrameType::Pong, 8).encode());
            b[FRAME_HEADER_LEN..].copy_from_slice(&p);
            self.out.push_back(Bytes::copy_from_slice(&b));
        }
        if self.close_after_flush.is_some() {
            return Ok(());
        }
        let before = self.out.len();
        let (d, req) = self
            .h
            .queue
            .drain_into(&mut self.ctl, &mut self.out, cx.waker());
        if d.packets > 0 {
            let bytes: usize = self
                .out
                .iter()
                .skip(before)
                .map(|b| b.len() - PACKET_PREFIX_LEN)
                .sum();
            let hot = &self.srv.metrics.hot;
            hot.add2(
                Hot::PacketsSent,
                d.packets as u64,
                Hot::BytesSent,
                bytes as u64,
            );
        }
        while let Some(c) = self.ctl.pop_front() {
            let f = self.encode_control(c);
            self.out.push_back(f);
        }
        match req {
            None => Ok(()),
            Some(CloseRequest::ClosePeer) => Err(Close::KickedByMesh),
            Some(CloseRequest::ControlOverflow) => {
                self.srv.metrics.control_overflows.inc();
                Err(Close::ControlOverflow)
            }
            Some(CloseRequest::Restarting {
                reconnect_in_ms,
                try_for_ms,
            }) => {
                let mut b = [0u8; FRAME_HEADER_LEN + 8];
                b[..FRAME_HEADER_LEN]
                    .copy_from_slice(&FrameHeader::new(FrameType::Restarting, 8).encode());
                b[FRAME_HEADER_LEN..FRAME_HEADER_LEN + 4]
                    .copy_from_slice(&reconnect_in_ms.to_be_bytes());
                b[FRAME_HEADER_LEN + 4..].copy_from_slice(&try_for_ms.to_be_bytes());
                self.out.push_back(Bytes::copy_from_slice(&b));
                self.close_after_flush = Some(Close::Shutdown);
                self.read_paused = true;
                Ok(())
            }
        }
    }

    fn poll_write_phase(&mut self, cx: &mut Context<'_>, sleep: Pin<&mut Sleep>) -> Poll<Close> {
        let mut sleep = sleep;
        loop {
            if self.out.is_empty() && self.wpos == self.wbuf.len() {
                if let Err(c) = self.fill_out(cx) {
                    return Poll::Ready(c);
                }
            }
            if self.out.is_empty() && self.wpos == self.wbuf.len() {
                if self.need_flush {
                    match Pin::new(&mut self.io).poll_flush(cx) {
                        Poll::Ready(Ok(())) => {
                            self.need_flush = false;
                            self.stalled_since = None;
                            self.observe_batch();
                        }
                        Poll::Ready(Err(e)) => return Poll::Ready(Close::WriteError(e)),
                        Poll::Pending => {
                            self.note_stall(sleep.as_mut());
                            return Poll::Pending;
                        }
                    }
                }
                if let Some(c) = self.close_after_flush.take() {
                    return Poll::Ready(c);
                }
                // Idle: `fill_out` stored our waker in the queue.
                return Poll::Pending;
            }
            match self.poll_write_out(cx) {
                Poll::Ready(Ok(())) => {
                    self.stalled_since = None;
                    self.need_flush = true;
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Close::WriteError(e)),
                Poll::Pending => {
                    self.note_stall(sleep.as_mut());
                    return Poll::Pending;
                }
            }
        }
    }

    /// One write call's worth of `out` (vectored when the transport supports it, else
    /// coalesced into `wbuf`). Ready(Ok) means some bytes were written.
    fn poll_write_out(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.io.is_write_vectored() && self.wpos == self.wbuf.len() {
            let mut slices = [io::IoSlice::new(&[]); MAX_IOVECS];
            let mut n_slices = 0;
            let mut total = 0;
            for b in self.out.iter() {
                if n_slices == MAX_IOVECS || (total > 0 && total + b.len() > WRITE_BATCH_BYTES) {
                    break;
                }
                slices[n_slices] = io::IoSlice::new(b);
                n_slices += 1;
                total += b.len();
            }
            let n = match Pin::new(&mut self.io).poll_write_vectored(cx, &slices[..n_slices]) {
                Poll::Ready(Ok(n)) => n,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            };
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.consume_out(n);
            return Poll::Ready(Ok(()));
        }
        if self.wpos == self.wbuf.len() {
            self.wbuf.clear();
            self.wpos = 0;
            while let Some(b) = self.out.front() {
                if !self.wbuf.is_empty() && self.wbuf.len() + b.len() > WRITE_BATCH_BYTES {
                    break;
                }
                self.wbuf.extend_from_slice(b);
                self.out.pop_front();
                self.frames_in_batch += 1;
            }
        }
        match Pin::new(&mut self.io).poll_write(cx, &self.wbuf[self.wpos..]) {
            Poll::Ready(Ok(0)) => Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
            Poll::Ready(Ok(n)) => {
                self.wpos += n;
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => Poll::Pending,
        }
    }

    fn consume_out(&mut self, mut n: usize) {
        while n > 0 {
            let Some(f) = self.out.front_mut() else {
                return;
            };
            if f.len() <= n {
                n -= f.len();
                self.out.pop_front();
                self.frames_in_batch += 1;
            } else {
                f.advance(n);
                n = 0;
            }
        }
    }

    fn observe_batch(&mut self) {
        if self.frames_in_batch == 0 {
            return;
        }
        let v = f64::from(self.frames_in_batch);
        self.frames_in_batch = 0;
        let hist = self
            .hist
            .get_or_insert_with(|| Box::new(self.srv.metrics.buffered_write_frames.local()));
        hist.observe(v);
        self.hist_pending += 1;
        if self.hist_pending >= HIST_FLUSH_EVERY {
            hist.flush();
            self.hist_pending = 0;
        }
    }

    fn note_stall(&mut self, sleep: Pin<&mut Sleep>) {
        if self.stalled_since.is_none() {
            let now = Instant::now();
            self.stalled_since = Some(now);
            let deadline = now + self.params.write_timeout;
            if deadline < sleep.deadline() {
                sleep.reset(deadline);
            }
        }
    }

    // ------------------------------------------------------------------ timers

    fn on_timer(&mut self, sleep: Pin<&mut Sleep>) -> Result<(), Close> {
        let now = Instant::now();
        if let Some(t) = self.stalled_since {
            if now.saturating_duration_since(t) >= self.params.write_timeout {
                self.srv.metrics.hot.add(Hot::WriteTimeouts, 1);
                return Err(Close::WriteTimeout);
            }
        }
        if now >= self.next_keepalive {
            self.out.push_back(Bytes::from_static(&KEEPALIVE_FRAME));
            self.next_keepalive = now + self.params.keepalive + self.params.keepalive_jitter;
            self.release_idle_memory();
            self.prune_sent_to();
        }
        if self.release_at.is_some_and(|t| now >= t) {
            self.release_at = None;
            if std::mem::take(&mut self.read_seen) {
                // Still reading: only the write side may be idle.
                self.release_write_buffers();
            } else {
                self.release_idle_memory();
            }
            if self.holds_buffers() {
                self.release_at = Some(now + IDLE_RELEASE);
            }
        }
        let mut deadline = self.next_keepalive;
        if let Some(t) = self.stalled_since {
            deadline = deadline.min(t + self.params.write_timeout);
        }
        if let Some(t) = self.release_at {
            deadline = deadline.min(t);
        }
        sleep.reset(deadline);
        Ok(())
    }

    /// Whether any per-connection buffer holds memory that an idle check could give back (cheap:
    /// field reads only; the queue's storage only grows together with `out`). A compacted
    /// partial frame is already as small as it gets.
    #[inline]
    fn holds_buffers(&self) -> bool {
        (self.rbuf.capacity() > 0 && !self.compacted)
            || self.out.capacity() > 0
            || self.ctl.capacity() > 0
            || self.cbuf.capacity() > 0
            || self.wbuf.capacity() > 0
            || self.hist.is_some()
    }

    /// Schedules an idle check [`IDLE_RELEASE`] from now (once per period, not per read).
    fn arm_release(&mut self, mut sleep: Pin<&mut Sleep>) {
        let at = Instant::now() + IDLE_RELEASE;
        self.release_at = Some(at);
        if at < sleep.deadline() {
            sleep.as_mut().reset(at);
        }
    }

    /// Gives back every buffer an idle connection does not need: the read buffer when it is
    /// empty (a partial frame is kept, in a buffer of its own size) and the write side's lists.
    fn release_idle_memory(&mut self) {
        if self.rbuf.is_empty() {
            self.rbuf = BytesMut::new();
            self.compacted = false;
        } else if self.rbuf.capacity() > self.rbuf.len() {
            // A client that stopped mid-frame keeps only the bytes it sent.
            self.rbuf = BytesMut::from(&self.rbuf[..]);
            self.compacted = true;
        }
        self.read_chunk = READ_CHUNK;
        self.release_write_buffers();
    }

    /// Releases the write side's buffers when nothing is waiting to be written.
    fn release_write_buffers(&mut self) {
        if self.wpos == self.wbuf.len() {
            self.wbuf = Vec::new();
            self.wpos = 0;
        }
        if self.out.is_empty() && self.out.capacity() > 0 {
            self.out = VecDeque::new();
        }
        if self.ctl.is_empty() && self.ctl.capacity() > 0 {
            self.ctl = VecDeque::new();
        }
        if self.cbuf.is_empty() && self.cbuf.capacity() > 0 {
            self.cbuf = BytesMut::new();
        }
        self.h.queue.shrink_if_idle();
        if let Some(h) = self.hist.take() {
            h.flush();
            self.hist_pending = 0;
        }
    }

    /// Forgets receivers that are gone (runs at keepalive ticks).
    fn prune_sent_to(&mut self) {
        if self.sent_to.len() > 64 {
            self.sent_to.retain(|_, w| w.strong_count() > 0);
            self.sent_to.shrink_to_fit();
        }
    }

    // ------------------------------------------------------------------ teardown

    fn finish(&mut self, why: &Close) {
        let srv = self.srv;
        let hot = &srv.metrics.hot;
        let (disco, regular) = self.h.queue.close();
        for b in disco {
            hot.drop_packet(
                DropReason::GoneDisconnected,
                PacketKind::Disco,
                b.len().saturating_sub(PACKET_PREFIX_LEN),
            );
        }
        for b in regular {
            hot.drop_packet(
                DropReason::GoneDisconnected,
                PacketKind::Other,
                b.len().saturating_sub(PACKET_PREFIX_LEN),
            );
        }
        if matches!(why, Close::WriteError(_) | Close::WriteTimeout) {
            for b in self.out.drain(..) {
                if b.first() == Some(&FrameType::RecvPacket.as_u8()) {
                    let kind = PacketKind::from_disco(
                        b.get(PACKET_PREFIX_LEN..).is_some_and(looks_like_disco),
                    );
                    hot.drop_packet(
                        DropReason::WriteError,
                        kind,
                        b.len().saturating_sub(PACKET_PREFIX_LEN),
                    );
                }
            }
        }
        if self.preferred {
            self.preferred = false;
            self.srv.metrics.current_home_connections.dec();
        }
        let sent_to = std::mem::replace(&mut self.sent_to, SentTo::with_hasher(IdHasherBuilder));
        self.srv.registry.unregister(&self.h, sent_to);
        if let Some(h) = self.hist.take() {
            h.flush();
        }
    }
}

static KEEPALIVE_FRAME: [u8; FRAME_HEADER_LEN] = [0x06, 0, 0, 0, 0];

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
    let len = h.payload_len();
    Err(match typ {
        FrameType::SendPacket if len < KEY_LEN => "short_send_packet",
        FrameType::SendPacket => "send_packet_too_large",
        FrameType::ForwardPacket if len < 2 * KEY_LEN => "short_forward_packet",
        FrameType::ForwardPacket => "forward_packet_too_large",
        FrameType::NotePreferred => "bad_note_preferred",
        FrameType::Ping => "bad_ping",
        FrameType::ClosePeer => "bad_close_peer",
        FrameType::WatchConns => "bad_watch_conns",
        _ => "frame_too_large",
    })
}

#[cfg(test)]
mod tests {
    //! Buffer life cycle, driven by hand: the task is polled directly (no runtime task) so the
    //! test can look at its buffers between polls.
    use super::*;
    use crate::server::ServerConfig;
    use proto::derp::{MAX_PACKET_SIZE, PING_LEN};
    use proto::key::NodePrivate;
    use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

    struct Rig {
        srv: Arc<Server>,
        h: Arc<ConnHandle>,
        client: DuplexStream,
        server_io: Option<DuplexStream>,
    }

    fn rig() -> Rig {
        let registry = prometheus::Registry::new();
        let key = NodePrivate::generate(&mut rand::rngs::OsRng);
        let srv = Server::new(ServerConfig::new(key), &registry).unwrap();
        let me = NodePrivate::generate(&mut rand::rngs::OsRng).public();
        let h = Arc::new(ConnHandle {
            id: 1,
            key: me,
            queue: SendQueue::new(64, 16),
            is_dup: AtomicBool::new(false),
            is_active: AtomicBool::new(false),
            remote: "127.0.0.1:1".parse().unwrap(),
            presence_flags: 0,
        });
        srv.registry.register(&h);
        let (client, server_io) = tokio::io::duplex(1 << 20);
        Rig {
            srv,
            h,
            client,
            server_io: Some(server_io),
        }
    }

    fn params() -> ConnParams {
        ConnParams {
            mesh: false,
            write_timeout: Duration::from_secs(10),
            keepalive: Duration::from_secs(600),
            keepalive_jitter: Duration::ZERO,
        }
    }

    /// Polls the task once; panics if it ended.
    async fn poll(task: &mut ConnTask<'_, DuplexStream>, sleep: Pin<&mut Sleep>) {
        let mut sleep = sleep;
        let r = std::future::poll_fn(|cx| Poll::Ready(task.poll_once(cx, sleep.as_mut()))).await;
        if let Poll::Ready(c) = r {
            panic!("connection ended: {c}");
        }
    }

    /// Polls until `want` bytes came back to the client (bounded).
    async fn poll_until_read(
        task: &mut ConnTask<'_, DuplexStream>,
        mut sleep: Pin<&mut Sleep>,
        client: &mut DuplexStream,
        want: usize,
    ) -> Vec<u8> {
        let mut got = Vec::new();
        let mut buf = vec![0u8; 1 << 17];
        for _ in 0..10_000 {
            poll(task, sleep.as_mut()).await;
            if got.len() >= want {
                return got;
            }
            if let Ok(Ok(n)) =
                tokio::time::timeout(Duration::from_millis(1), client.read(&mut buf)).await
            {
                assert!(n > 0, "server closed");
                got.extend_from_slice(&buf[..n]);
            }
        }
        panic!("only {} of {want} bytes came back", got.len());
    }

    fn send_packet_frame(dst: &NodePublic, payload: &[u8]) -> Vec<u8> {
        let mut f = FrameHeader::new(FrameType::SendPacket, (KEY_LEN + payload.len()) as u32)
            .encode()
            .to_vec();
        f.extend_from_slice(dst.as_bytes());
        f.extend_from_slice(payload);
        f
    }

    fn recv_packet_frame(src: &NodePublic, payload: &[u8]) -> Vec<u8> {
        let mut f = send_packet_frame(src, payload);
        f[0] = FrameType::RecvPacket.as_u8();
        f
    }

    /// Polls every 50 ms until the connection holds no buffer; returns how long that took.
    async fn wait_released(
        task: &mut ConnTask<'_, DuplexStream>,
        mut sleep: Pin<&mut Sleep>,
    ) -> Duration {
        let t0 = Instant::now();
        while task.holds_buffers() {
            assert!(
                t0.elapsed() < IDLE_RELEASE * 4,
                "buffers not released: rbuf {} out {} wbuf {}",
                task.rbuf.capacity(),
                task.out.capacity(),
                task.wbuf.capacity()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
            poll(task, sleep.as_mut()).await;
        }
        t0.elapsed()
    }

    #[tokio::test]
    async fn small_frames_on_an_idle_connection_leave_no_buffer() {
        let mut r = rig();
        let io = r.server_io.take().unwrap();
        let mut task = ConnTask::new(&r.srv, r.h.clone(), io, BytesMut::new(), params());
        let sleep = tokio::time::sleep_until(task.next_keepalive);
        tokio::pin!(sleep);
        poll(&mut task, sleep.as_mut()).await;
        assert!(!task.holds_buffers());

        // NotePreferred + Ping: handled from a short read, nothing kept but the pong's list.
        let mut f = FrameHeader::new(FrameType::NotePreferred, 1)
            .encode()
            .to_vec();
        f.push(1);
        f.extend_from_slice(&FrameHeader::new(FrameType::Ping, PING_LEN as u32).encode());
        f.extend_from_slice(b"12345678");
        r.client.write_all(&f).await.unwrap();
        let pong = poll_until_read(&mut task, sleep.as_mut(), &mut r.client, 13).await;
        assert_eq!(pong[0], FrameType::Pong.as_u8());
        assert_eq!(&pong[FRAME_HEADER_LEN..], b"12345678");
        assert_eq!(
            task.rbuf.capacity(),
            0,
            "a short idle read must not keep a buffer"
        );
        assert!(task.preferred);
        task.finish(&Close::Eof);
    }

    #[tokio::test]
    async fn read_buffer_is_released_when_idle_and_regrows_for_large_frames() {
        let mut r = rig();
        let me = r.h.key;
        let io = r.server_io.take().unwrap();
        let mut task = ConnTask::new(&r.srv, r.h.clone(), io, BytesMut::new(), params());
        let sleep = tokio::time::sleep_until(task.next_keepalive);
        tokio::pin!(sleep);
        poll(&mut task, sleep.as_mut()).await;

        // A burst (to ourselves: every packet comes back as RecvPacket) grows a read chunk.
        let payload: Vec<u8> = (0..1400u32).map(|i| i as u8).collect();
        let mut burst = Vec::new();
        let mut expect = Vec::new();
        for _ in 0..20 {
            burst.extend_from_slice(&send_packet_frame(&me, &payload));
            expect.extend_from_slice(&recv_packet_frame(&me, &payload));
        }
        r.client.write_all(&burst).await.unwrap();
        let got = poll_until_read(&mut task, sleep.as_mut(), &mut r.client, expect.len()).await;
        assert_eq!(got, expect);
        assert!(
            task.rbuf.capacity() >= IDLE_READ,
            "a burst reads into a chunk"
        );
        assert!(
            task.release_at.is_some(),
            "holding buffers arms the idle check"
        );

        // Quiet: everything is given back after one to two periods, not before.
        let took = wait_released(&mut task, sleep.as_mut()).await;
        assert!(took >= IDLE_RELEASE / 2, "released too early ({took:?})");
        assert_eq!(task.rbuf.capacity(), 0);
        assert_eq!(task.out.capacity(), 0);
        assert!(task.hist.is_none());
        assert!(task.release_at.is_none());

        // A maximum-size packet after the release, arriving in pieces: the buffer grows again.
        let big: Vec<u8> = (0..MAX_PACKET_SIZE as u32).map(|i| (i * 7) as u8).collect();
        let f = send_packet_frame(&me, &big);
        r.client.write_all(&f[..300]).await.unwrap();
        poll(&mut task, sleep.as_mut()).await;
        assert_eq!(task.rbuf.len(), 300, "partial frame kept");
        r.client.write_all(&f[300..]).await.unwrap();
        let want = recv_packet_frame(&me, &big);
        let got = poll_until_read(&mut task, sleep.as_mut(), &mut r.client, want.len()).await;
        assert_eq!(got.len(), want.len());
        assert!(got == want, "large packet corrupted after re-growth");
        wait_released(&mut task, sleep.as_mut()).await;

        // The same in one piece (a full stack read starts a chunk that then grows).
        r.client.write_all(&f).await.unwrap();
        let got = poll_until_read(&mut task, sleep.as_mut(), &mut r.client, want.len()).await;
        assert!(got == want, "large packet corrupted");
        task.finish(&Close::Eof);
    }

    #[tokio::test]
    async fn partial_frame_of_a_quiet_client_is_kept_compactly() {
        let mut r = rig();
        let me = r.h.key;
        let io = r.server_io.take().unwrap();
        let mut task = ConnTask::new(&r.srv, r.h.clone(), io, BytesMut::new(), params());
        let sleep = tokio::time::sleep_until(task.next_keepalive);
        tokio::pin!(sleep);
        let f = send_packet_frame(&me, &vec![9u8; 8000]);
        // More than a stack read: a chunk is allocated, then the client stalls mid-frame.
        r.client.write_all(&f[..4000]).await.unwrap();
        for _ in 0..20 {
            poll(&mut task, sleep.as_mut()).await;
            tokio::task::yield_now().await;
        }
        assert_eq!(task.rbuf.len(), 4000);
        assert!(task.rbuf.capacity() >= READ_CHUNK);
        let t0 = Instant::now();
        while task.rbuf.capacity() > 4000 {
            assert!(
                t0.elapsed() < IDLE_RELEASE * 4,
                "partial frame never compacted"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
            poll(&mut task, sleep.as_mut()).await;
        }
        assert_eq!(task.rbuf.len(), 4000);
        r.client.write_all(&f[4000..]).await.unwrap();
        let want = recv_packet_frame(&me, &vec![9u8; 8000]);
        let got = poll_until_read(&mut task, sleep.as_mut(), &mut r.client, want.len()).await;
        assert!(got == want);
        task.finish(&Close::Eof);
    }

    #[tokio::test]
    async fn oversized_frame_after_release_ends_the_connection() {
        let mut r = rig();
        let io = r.server_io.take().unwrap();
        let mut task = ConnTask::new(&r.srv, r.h.clone(), io, BytesMut::new(), params());
        let sleep = tokio::time::sleep_until(task.next_keepalive);
        tokio::pin!(sleep);
        poll(&mut task, sleep.as_mut()).await;
        // A SendPacket header claiming 2 MiB, from a connection holding no buffer.
        let hdr = FrameHeader::new(FrameType::SendPacket, 2 << 20).encode();
        r.client.write_all(&hdr).await.unwrap();
        let why = std::future::poll_fn(|cx| task.poll_once(cx, sleep.as_mut())).await;
        assert!(matches!(why, Close::Protocol(_)), "{why}");
        assert!(
            task.rbuf.capacity() < IDLE_READ,
            "nothing big was allocated"
        );
        task.finish(&why);
    }
}
