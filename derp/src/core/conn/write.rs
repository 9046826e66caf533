//! Writing: this connection's queue and its own replies → the transport.
//!
//! Why it looks like this: the writer drains everything ready at once (pong, control items,
//! disco packets first, then the rest) into `out` and writes it as one vectored write of up to
//! [`MAX_IOVECS`] frames, or, on transports without vectored writes, coalesced into one buffer of
//! up to [`WRITE_BATCH_BYTES`]; it flushes only when nothing is left. Packets are the `Bytes`
//! that senders pushed (slices of their read buffers): nothing is copied on this side.
//! Frames the connection produces itself (Pong, PeerGone, PeerPresent, Restarting) are encoded
//! by `proto`'s [`Frame`] codec.
//!
//! Must never: block, hold the queue lock while writing, or lose track of a stalled write (the
//! stall arms the write-timeout on the connection's one timer).

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes};
use proto::derp::{Frame, PeerGoneReason, PACKET_PREFIX_LEN};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::{Instant, Sleep};

use super::{Close, ConnHistograms, ConnTask};
use crate::core::metrics::Hot;
use crate::core::queue::{CloseRequest, Control};

/// Coalescing limit for one write (and the iovec count limit for vectored writes).
const WRITE_BATCH_BYTES: usize = 64 << 10;
const MAX_IOVECS: usize = 64;
/// Flush the local histograms (`buffered_write_frames`, `queue_wait`) after this many
/// observations.
const HIST_FLUSH_EVERY: u32 = 64;

impl<IO: AsyncRead + AsyncWrite + Unpin> ConnTask<'_, IO> {
    /// Encodes a queued control item (counting PeerGone frames by reason).
    pub(super) fn encode_control(&mut self, c: Control) -> Bytes {
        let frame = match c {
            Control::PeerGone { key, reason } => {
                let sent = if reason == PeerGoneReason::NotHere {
                    Hot::PeerGoneNotHereFrames
                } else {
                    Hot::PeerGoneDisconnectedFrames
                };
                self.metrics.hot.add(sent, 1);
                Frame::PeerGone { peer: key, reason }
            }
            Control::PeerPresent { key, addr, flags } => Frame::PeerPresent {
                peer: key,
                addr: Some(addr),
                flags,
            },
        };
        self.encode(&frame)
    }

    /// One frame encoded by `proto`'s codec, split off the reusable control buffer.
    fn encode(&mut self, frame: &Frame) -> Bytes {
        frame.encode(&mut self.cbuf);
        self.cbuf.split().freeze()
    }

    /// Moves everything ready (pong, control, disco, packets) into `out`. Returns a close
    /// request from outside, if any.
    fn fill_out(&mut self, cx: &mut Context<'_>) -> Result<(), Close> {
        if let Some(p) = self.pong.take() {
            self.metrics.hot.add(Hot::SentPong, 1);
            let f = self.encode(&Frame::Pong { data: p });
            self.out.push_back(f);
        }
        if self.close_after_flush.is_some() {
            return Ok(());
        }
        let before = self.out.len();
        let (d, req) = self
            .h
            .queue
            .drain_into(&mut self.ctl, &mut self.out, cx.waker());
        if let Some(at) = d.oldest_queued_at {
            self.observe_queue_wait(at.elapsed().as_secs_f64());
        }
        if d.packets > 0 {
            let bytes: usize = self
                .out
                .iter()
                .skip(before)
                .map(|b| b.len() - PACKET_PREFIX_LEN)
                .sum();
            self.metrics.hot.add2(
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
            Some(CloseRequest::NotAdmitted) => Err(Close::NotAdmitted),
            Some(CloseRequest::ControlOverflow) => {
                self.metrics.control_overflows.inc();
                Err(Close::ControlOverflow)
            }
            Some(CloseRequest::Restarting {
                reconnect_in_ms,
                try_for_ms,
            }) => {
                let f = self.encode(&Frame::Restarting {
                    reconnect_in_ms,
                    try_for_ms,
                });
                self.out.push_back(f);
                self.close_after_flush = Some(Close::Shutdown);
                self.read_paused = true;
                Ok(())
            }
        }
    }

    /// Writes until nothing is left (then flushes) or the transport is not ready. Ready means
    /// the connection ends.
    pub(super) fn poll_write_phase(
        &mut self,
        cx: &mut Context<'_>,
        sleep: Pin<&mut Sleep>,
    ) -> Poll<Close> {
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

    /// Drops the first `n` written bytes from `out`.
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

    /// Records how many frames the last flushed batch held (local histogram, flushed now and
    /// then).
    fn observe_batch(&mut self) {
        if self.frames_in_batch == 0 {
            return;
        }
        let v = f64::from(self.frames_in_batch);
        self.frames_in_batch = 0;
        self.local_histograms().frames.observe(v);
        self.note_observation();
    }

    /// Records how long the oldest packet of a drained batch waited in the queue.
    fn observe_queue_wait(&mut self, seconds: f64) {
        self.local_histograms().queue_wait.observe(seconds);
        self.note_observation();
    }

    fn local_histograms(&mut self) -> &mut ConnHistograms {
        let m = &self.metrics;
        self.hist.get_or_insert_with(|| {
            Box::new(ConnHistograms {
                frames: m.buffered_write_frames.local(),
                queue_wait: m.queue_wait.local(),
            })
        })
    }

    /// Flushes the local histograms into the shared ones every [`HIST_FLUSH_EVERY`] observations.
    fn note_observation(&mut self) {
        self.hist_pending += 1;
        if self.hist_pending >= HIST_FLUSH_EVERY {
            if let Some(h) = &self.hist {
                h.flush();
            }
            self.hist_pending = 0;
        }
    }

    /// Remembers when writes stopped making progress and arms the write-timeout check.
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
}
