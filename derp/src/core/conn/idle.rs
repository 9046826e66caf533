//! Timers and idle memory: the connection's one `Sleep` and what it triggers.
//!
//! Why one timer: an idle relay connection must cost next to nothing, so keepalive (interval +
//! per-connection jitter), the write-stall deadline, the end of a receive rate-limit wait and the
//! idle check all share one `Sleep`,
//! re-armed for the earliest of them; nothing is armed per packet or per read. The idle check
//! runs every [`IDLE_RELEASE`] while the connection holds any buffer: a side that saw no traffic
//! for a whole period gives its buffers back (read buffer, write lists, queue storage, local
//! histogram), so memory returns 1–2 periods after the last byte.
//!
//! Must never: release a buffer that still holds unread or unwritten bytes (a partial frame is
//! kept, compacted to its own size), or arm more than the one timer.

use std::collections::VecDeque;
use std::pin::Pin;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use proto::derp::{FrameHeader, FrameType, FRAME_HEADER_LEN};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::{Instant, Sleep};

use super::read::READ_CHUNK;
use super::{Close, ConnTask};
use crate::core::metrics::Hot;

/// A connection that holds buffers is checked this often; buffers of a side that was quiet for a
/// whole period are released (so memory goes back 1–2 periods after the last byte).
pub(super) const IDLE_RELEASE: Duration = Duration::from_secs(1);

/// The KeepAlive frame (empty payload), encoded once.
static KEEP_ALIVE_FRAME: [u8; FRAME_HEADER_LEN] =
    FrameHeader::new(FrameType::KeepAlive, 0).encode();

impl<IO: AsyncRead + AsyncWrite + Unpin> ConnTask<'_, IO> {
    /// The one timer fired: write stall, keepalive (which also gives idle buffers back) and the
    /// idle check, then re-arms for the earliest of them.
    pub(super) fn on_timer(&mut self, sleep: Pin<&mut Sleep>) -> Result<(), Close> {
        let now = Instant::now();
        if self.rate_wait.is_some_and(|t| now >= t) {
            // The rate limit's wait is over: handle the buffered frames, then read again.
            self.rate_wait = None;
            self.process_frames()?;
        }
        if let Some(t) = self.stalled_since {
            if now.saturating_duration_since(t) >= self.params.write_timeout {
                self.metrics.hot.add(Hot::WriteTimeouts, 1);
                return Err(Close::WriteTimeout);
            }
        }
        if now >= self.next_keepalive {
            self.out.push_back(Bytes::from_static(&KEEP_ALIVE_FRAME));
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
        if let Some(t) = self.rate_wait {
            deadline = deadline.min(t);
        }
        sleep.reset(deadline);
        Ok(())
    }

    /// Whether any per-connection buffer holds memory that an idle check could give back (cheap:
    /// field reads only; the queue's storage only grows together with `out`). A compacted
    /// partial frame is already as small as it gets.
    #[inline]
    pub(super) fn holds_buffers(&self) -> bool {
        (self.rbuf.capacity() > 0 && !self.compacted)
            || self.out.capacity() > 0
            || self.ctl.capacity() > 0
            || self.cbuf.capacity() > 0
            || self.wbuf.capacity() > 0
            || self.hist.is_some()
    }

    /// Schedules an idle check [`IDLE_RELEASE`] from now (once per period, not per read).
    pub(super) fn arm_release(&mut self, mut sleep: Pin<&mut Sleep>) {
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
}
