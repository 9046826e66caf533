//! One client connection after the handshake: reader, writer and timers in a single task.
//!
//! Why one task with a hand-written poll loop: an idle relay connection should cost as little as
//! possible (no second task, no split locks, no per-connection timer besides one `Sleep`), and
//! the packet path should not bounce through channels. [`ConnTask::poll_once`] reads frames
//! straight into a `BytesMut`, turns each SendPacket into a RecvPacket *in place* (same length:
//! type byte and key are overwritten) and hands the resulting slice of the read buffer to the
//! destination's [`SendQueue`](crate::core::queue::SendQueue) — no copy and no allocation per
//! packet. The same poll drains this connection's own queue into one vectored (or coalesced, up to 64 KiB) write and flushes when
//! the queue is empty.
//!
//! Memory when idle: most relay connections are idle most of the time, so an idle connection
//! holds no buffer at all, only its task future (a few hundred bytes: keep it small, box
//! anything large and short-lived), its [`ConnHandle`], its registry entry and the transport.
//! Without a read buffer, the next bytes are read into a [`read::IDLE_READ`]-byte stack buffer: a
//! short read (the socket is drained, typically one small frame such as NotePreferred or Ping)
//! is copied into a buffer of exactly its size, which is freed as soon as its frames are
//! handled; a full one means a burst, so a whole [`READ_CHUNK`] is allocated and the read buffer
//! grows on demand from there (up to [`read::READ_CHUNK_MAX`] per read, or the size of a large
//! frame).
//! While the connection holds any buffer, a check runs every [`idle::IDLE_RELEASE`] (on the same
//! `Sleep`, so nothing is armed per read): a side that saw no traffic for a whole period gives its
//! buffers back — the empty read buffer (a partial frame is kept in a buffer of its own size),
//! the write lists, the queue's storage and the local histogram. Busy connections never pay for
//! this beyond one timer tick per period.
//!
//! Liveness: one `Sleep` serves both the keepalive (interval + per-connection jitter) and the
//! write-stall check (no write progress for `write_timeout` → close); nothing is armed per packet.
//! With a receive rate limit ([`crate::core::rate`]), a frame that must wait for its tokens pauses
//! reading (TCP backpressure, nothing dropped) and the same `Sleep` resumes it.
//!
//! Must never: block or `.await` inside the poll loop (everything is non-blocking), log per
//! packet, allocate per packet in a burst (only a nearly idle connection's short reads get one
//! exact-size buffer each), keep a read chunk after the connection went quiet, hold a registry
//! or queue lock while waking or writing, read a frame larger than 1 MiB into memory, or let one
//! connection's bad input affect another.
//!
//! Layout: this file holds the task's state and its poll loop ([`ConnTask::poll_once`]) and the
//! teardown; [`read`] parses frames and holds the packet hot path (SendPacket/ForwardPacket →
//! RecvPacket → destination queue, top to bottom in one place); [`write`] drains the queue and
//! writes; [`idle`] runs the one timer (keepalive, write stall, giving buffers back). Every frame
//! the connection writes is encoded by `proto`'s DERP codec.

mod idle;
mod read;
#[cfg(test)]
mod tests;
mod write;

use std::collections::VecDeque;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use prometheus::local::LocalHistogram;
use proto::derp::{looks_like_disco, FrameType, PACKET_PREFIX_LEN};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::{Instant, Sleep};

use crate::core::handle::ConnHandle;
use crate::core::metrics::{DropReason, Metrics, PacketKind};
use crate::core::queue::Control;
use crate::core::rate::{RateLimits, ReceiveBucket};
use crate::core::registry::{IdHasherBuilder, Registry, SentTo};
use read::{NOT_HERE_BURST, READ_CHUNK};

/// Reads (each up to [`read::READ_CHUNK_MAX`]) handled per poll before yielding. One: the writers
/// our pushes wake sit in this worker's LIFO slot (not stealable) until we yield, so a larger
/// budget lets a flooding sender overflow destination queues before their writers run. Measured
/// in-process on 2 cores (tests/it/core_throughput.rs, open-loop flood): 16 reads/poll delivered
/// 5% of the flood, 1 read/poll 21%; closed-loop throughput was not hurt.
const READS_PER_POLL: usize = 1;

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
    /// Admitted pending confirmation, and the key did not become known in time.
    NotAdmitted,
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
            Close::NotAdmitted => f.write_str("node key not admitted after its grace period"),
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
    /// Where packets go (the server's registry, shared by every connection).
    registry: &'a Registry,
    /// The server's metrics.
    metrics: &'a Metrics,
    /// The server's receive rate limit (see [`crate::core::rate`]).
    rate: &'a RateLimits,
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
    // --- receive rate limit (non-mesh connections, while one is configured)
    /// The rate limit generation `bucket` was built for.
    rate_generation: u64,
    /// Boxed: without a limit (the default) it costs one pointer.
    bucket: Option<Box<ReceiveBucket>>,
    /// The frame at the head of `rbuf` has taken its tokens.
    rate_paid: bool,
    /// Reading waits for the rate limit until then (the head frame is handled first).
    rate_wait: Option<Instant>,
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
    hist: Option<Box<ConnHistograms>>,
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
    /// The task for one established connection; `rbuf` holds bytes read past ClientInfo.
    pub(crate) fn new(
        registry: &'a Registry,
        metrics: &'a Metrics,
        rate: &'a RateLimits,
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
            registry,
            metrics,
            rate,
            h,
            io,
            params,
            rbuf,
            read_chunk: READ_CHUNK,
            read_seen: false,
            compacted: false,
            skip: 0,
            read_paused: false,
            rate_generation: 0,
            bucket: None,
            rate_paid: false,
            rate_wait: None,
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

    /// One turn of the loop: read and handle what arrived, write what is ready, run the timer.
    /// Ready means the connection ends.
    fn poll_once(&mut self, cx: &mut Context<'_>, mut sleep: Pin<&mut Sleep>) -> Poll<Close> {
        // Bounded: each iteration either makes progress or returns.
        for _ in 0..4 {
            let mut yield_now = false;
            if !self.read_paused && self.rate_wait.is_none() {
                let mut reads = 0;
                loop {
                    match self.poll_read_some(cx) {
                        Poll::Ready(Ok(0)) => return Poll::Ready(Close::Eof),
                        Poll::Ready(Ok(_)) => {
                            if let Err(c) = self.process_frames() {
                                return Poll::Ready(c);
                            }
                            if self.rate_wait.is_some() {
                                // Backpressure: read nothing more until the tokens are there.
                                break;
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
            if let Some(t) = self.rate_wait {
                if t < sleep.deadline() {
                    sleep.as_mut().reset(t);
                }
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

    /// Teardown: counts what can no longer be delivered, unregisters, flushes the histogram.
    fn finish(&mut self, why: &Close) {
        let hot = &self.metrics.hot;
        self.h.close_queue(hot);
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
            self.metrics.current_home_connections.dec();
        }
        let sent_to = std::mem::replace(&mut self.sent_to, SentTo::with_hasher(IdHasherBuilder));
        self.registry.unregister(&self.h, sent_to);
        if let Some(h) = self.hist.take() {
            h.flush();
        }
    }
}

/// A connection's local copies of the shared histograms (observed without touching shared
/// atomics, flushed now and then and at the end).
#[derive(Debug)]
pub(super) struct ConnHistograms {
    /// Frames per flushed batch (`derp_buffered_write_frames`).
    pub(super) frames: LocalHistogram,
    /// Wait of the oldest packet of each drained batch (`derp_queue_wait_seconds`).
    pub(super) queue_wait: LocalHistogram,
}

impl ConnHistograms {
    pub(super) fn flush(&self) {
        self.frames.flush();
        self.queue_wait.flush();
    }
}
