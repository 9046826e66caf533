//! Per-connection outbound queues: what other connections hand to this connection's writer.
//!
//! Why: the relay must never block a sender on a slow receiver. Every destination owns a small
//! bounded queue; a sender pushes with [`SendQueue::push_packet`], which never waits: when the
//! queue is full the *oldest* packet is dropped (head drop, reported to the caller so it can
//! count `queue_head`). Disco packets live in their own queue, drained first by the writer, so a
//! WireGuard flood can never starve path discovery. Control items (PeerGone, PeerPresent for mesh
//! watchers) have their own bounded list.
//!
//! Queue wait: the queue remembers when it last went from empty to non-empty (one clock read per
//! such transition, under the lock, never per packet), and hands that instant to the writer with
//! the batch it drains; the writer observes how long the oldest packet of that batch waited
//! (`derp_queue_wait_seconds`, tailnetd's counterpart of derper's `average_queue_duration_ms`).
//!
//! The lock is per destination (never global) and is held only for a few pointer moves. No
//! allocation happens until the first item is queued (`VecDeque::new` does not allocate), and the
//! writer releases the storage again when it goes idle ([`SendQueue::shrink_if_idle`]).
//!
//! Must never: block or `.await` while holding the lock, wake the writer while holding the lock,
//! grow without bound, or drop an item without telling the caller.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Mutex, MutexGuard};
use std::task::Waker;
use std::time::Instant;

use bytes::Bytes;
use proto::derp::{PeerGoneReason, PeerPresentFlags};
use proto::key::NodePublic;

/// Why a connection is asked to close from outside its own task.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CloseRequest {
    /// A mesh peer sent ClosePeer for this key.
    ClosePeer,
    /// The server is shutting down: send Restarting, then close.
    Restarting {
        /// Milliseconds after which the client should reconnect.
        reconnect_in_ms: u32,
        /// Milliseconds during which the client should keep trying.
        try_for_ms: u32,
    },
    /// The control list overflowed (a watcher that cannot keep up): it must reconnect to get a
    /// consistent presence flood.
    ControlOverflow,
    /// The key's admission was pending and its grace period ended without the key becoming
    /// known (see [`crate::core::admission`]).
    NotAdmitted,
}

/// A non-packet frame queued for a connection by someone else.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Control {
    /// PeerGone(key, reason).
    PeerGone {
        key: NodePublic,
        reason: PeerGoneReason,
    },
    /// PeerPresent(key, address, flags) for mesh watchers.
    PeerPresent {
        key: NodePublic,
        addr: SocketAddr,
        flags: PeerPresentFlags,
    },
}

/// Outcome of [`SendQueue::push_packet`].
#[derive(Debug)]
pub(crate) enum PushOutcome {
    /// Queued without dropping anything.
    Queued,
    /// Queued; the oldest packet of the same queue (this many bytes) was dropped to make room.
    DroppedHead(usize),
    /// The destination's writer is gone; the packet was dropped.
    Closed,
}

/// Outcome of [`SendQueue::push_control`].
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum ControlOutcome {
    Queued,
    /// The destination is gone; nothing to do.
    Closed,
    /// The list was full: the item was dropped and the destination asked to close.
    Overflow,
}

#[derive(Debug, Default)]
struct Inner {
    disco: VecDeque<Bytes>,
    regular: VecDeque<Bytes>,
    control: VecDeque<Control>,
    waker: Option<Waker>,
    closed: bool,
    close_request: Option<CloseRequest>,
    /// When the packet queues (disco and regular) last went from empty to non-empty.
    nonempty_since: Option<Instant>,
}

/// The queue a connection's writer drains. Shared (via the connection handle) with every sender.
#[derive(Debug)]
pub(crate) struct SendQueue {
    inner: Mutex<Inner>,
    depth: usize,
    control_cap: usize,
}

/// What the writer took out of the queue in one [`SendQueue::drain_into`] call.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Drained {
    pub packets: usize,
    pub control: usize,
    /// When the oldest of the drained packets was queued (the queue's empty → non-empty
    /// transition); `None` when no packet was drained.
    pub oldest_queued_at: Option<Instant>,
}

/// Queued items of one connection at one moment (status page).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct QueueDepth {
    /// Disco packets.
    pub disco: usize,
    /// Other (WireGuard) packets.
    pub regular: usize,
    /// Control frames (PeerGone, PeerPresent).
    pub control: usize,
}

impl SendQueue {
    pub(crate) fn new(depth: usize, control_cap: usize) -> Self {
        Self {
            inner: Mutex::new(Inner::default()),
            depth: depth.max(1),
            control_cap: control_cap.max(1),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding this lock cannot leave the deques inconsistent (we only call
        // std push/pop under it), so a poisoned lock is still safe to use.
        match self.inner.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    /// Queues one packet frame (already in RecvPacket form). Never waits. Returns the writer's
    /// waker if it must be woken: the caller wakes it *after* releasing any lock it holds
    /// (the packet path pushes under a registry shard lock).
    #[inline]
    pub(crate) fn push_packet(&self, frame: Bytes, disco: bool) -> (PushOutcome, Option<Waker>) {
        let mut g = self.lock();
        if g.closed {
            return (PushOutcome::Closed, None);
        }
        if g.disco.is_empty() && g.regular.is_empty() {
            g.nonempty_since = Some(Instant::now());
        }
        let depth = self.depth;
        let q = if disco { &mut g.disco } else { &mut g.regular };
        let outcome = if q.len() >= depth {
            let dropped = q.pop_front().map_or(0, |b| b.len());
            q.push_back(frame);
            PushOutcome::DroppedHead(dropped)
        } else {
            q.push_back(frame);
            PushOutcome::Queued
        };
        (outcome, g.waker.take())
    }

    /// Queues a control frame. Bounded by `control_cap`; on overflow the destination is asked to
    /// close (a watcher with a gap in its presence stream must resync by reconnecting).
    pub(crate) fn push_control(&self, c: Control) -> ControlOutcome {
        let waker;
        let outcome;
        {
            let mut g = self.lock();
            if g.closed {
                return ControlOutcome::Closed;
            }
            if g.control.len() >= self.control_cap {
                if g.close_request.is_none() {
                    g.close_request = Some(CloseRequest::ControlOverflow);
                }
                outcome = ControlOutcome::Overflow;
            } else {
                g.control.push_back(c);
                outcome = ControlOutcome::Queued;
            }
            waker = g.waker.take();
        }
        if let Some(w) = waker {
            w.wake();
        }
        outcome
    }

    /// Asks the owning connection to close (first request wins). Returns false if it is gone.
    pub(crate) fn request_close(&self, why: CloseRequest) -> bool {
        let waker;
        {
            let mut g = self.lock();
            if g.closed {
                return false;
            }
            if g.close_request.is_none() {
                g.close_request = Some(why);
            }
            waker = g.waker.take();
        }
        if let Some(w) = waker {
            w.wake();
        }
        true
    }

    /// Writer side: moves queued control items and packets (disco first) into the writer's
    /// local lists. If nothing is queued, stores `waker` so the next push wakes the writer.
    /// Returns the pending close request, if any.
    pub(crate) fn drain_into(
        &self,
        control: &mut VecDeque<Control>,
        packets: &mut VecDeque<Bytes>,
        waker: &Waker,
    ) -> (Drained, Option<CloseRequest>) {
        let mut g = self.lock();
        let queued = g.disco.len() + g.regular.len();
        let d = Drained {
            packets: queued,
            control: g.control.len(),
            oldest_queued_at: if queued > 0 {
                g.nonempty_since.take()
            } else {
                None
            },
        };
        if d.control > 0 {
            control.extend(g.control.drain(..));
        }
        if d.packets > 0 {
            packets.extend(g.disco.drain(..));
            packets.extend(g.regular.drain(..));
        }
        if d.packets == 0 && d.control == 0 && g.close_request.is_none() {
            match &g.waker {
                Some(w) if w.will_wake(waker) => {}
                _ => g.waker = Some(waker.clone()),
            }
        }
        (d, g.close_request)
    }

    /// Writer side, on exit: refuses further pushes and returns what was still queued so the
    /// caller can count it as `gone_disconnected`.
    pub(crate) fn close(&self) -> (Vec<Bytes>, Vec<Bytes>) {
        let mut g = self.lock();
        g.closed = true;
        g.waker = None;
        g.nonempty_since = None;
        g.control = VecDeque::new();
        let disco = std::mem::take(&mut g.disco).into();
        let regular = std::mem::take(&mut g.regular).into();
        (disco, regular)
    }

    /// Releases queue storage when nothing is queued (idle connections keep no buffers).
    pub(crate) fn shrink_if_idle(&self) {
        let mut g = self.lock();
        if g.disco.is_empty() && g.disco.capacity() > 0 {
            g.disco = VecDeque::new();
        }
        if g.regular.is_empty() && g.regular.capacity() > 0 {
            g.regular = VecDeque::new();
        }
        if g.control.is_empty() && g.control.capacity() > 0 {
            g.control = VecDeque::new();
        }
    }

    /// What is queued now (a snapshot for the status page; one short lock).
    pub(crate) fn depth(&self) -> QueueDepth {
        let g = self.lock();
        QueueDepth {
            disco: g.disco.len(),
            regular: g.regular.len(),
            control: g.control.len(),
        }
    }

    #[cfg(test)]
    fn lens(&self) -> (usize, usize, usize) {
        let d = self.depth();
        (d.disco, d.regular, d.control)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::task::Wake;

    struct CountWake(AtomicUsize);
    impl Wake for CountWake {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn head_drop_keeps_newest_and_reports_size() {
        let q = SendQueue::new(2, 4);
        assert!(matches!(
            q.push_packet(Bytes::from_static(b"a"), false).0,
            PushOutcome::Queued
        ));
        assert!(matches!(
            q.push_packet(Bytes::from_static(b"bb"), false).0,
            PushOutcome::Queued
        ));
        assert!(matches!(
            q.push_packet(Bytes::from_static(b"ccc"), false).0,
            PushOutcome::DroppedHead(1)
        ));
        // disco has its own room
        assert!(matches!(
            q.push_packet(Bytes::from_static(b"d"), true).0,
            PushOutcome::Queued
        ));
        let cw = Arc::new(CountWake(AtomicUsize::new(0)));
        let w = Waker::from(cw.clone());
        let mut c = VecDeque::new();
        let mut p = VecDeque::new();
        let (d, close) = q.drain_into(&mut c, &mut p, &w);
        assert_eq!(d.packets, 3);
        assert!(close.is_none());
        let got: Vec<&[u8]> = p.iter().map(|b| &b[..]).collect();
        assert_eq!(got, vec![&b"d"[..], b"bb", b"ccc"]);
        // empty now: stores the waker, and a push wakes it once
        let (d, _) = q.drain_into(&mut c, &mut p, &w);
        assert_eq!(d.packets, 0);
        for b in [&b"e"[..], b"f"] {
            if let (_, Some(w)) = q.push_packet(Bytes::copy_from_slice(b), false) {
                w.wake();
            }
        }
        assert_eq!(cw.0.load(Ordering::SeqCst), 1);
        let (disco, regular) = q.close();
        assert!(disco.is_empty());
        assert_eq!(regular.len(), 2);
        assert!(matches!(
            q.push_packet(Bytes::from_static(b"g"), false).0,
            PushOutcome::Closed
        ));
    }

    #[test]
    fn depth_counts_what_is_queued() {
        let q = SendQueue::new(4, 4);
        q.push_packet(Bytes::from_static(b"a"), false);
        q.push_packet(Bytes::from_static(b"b"), true);
        q.push_packet(Bytes::from_static(b"c"), false);
        assert_eq!(
            q.depth(),
            QueueDepth {
                disco: 1,
                regular: 2,
                control: 0
            }
        );
    }

    #[test]
    fn control_overflow_requests_close() {
        let q = SendQueue::new(2, 1);
        let c = Control::PeerGone {
            key: NodePublic::ZERO,
            reason: PeerGoneReason::Disconnected,
        };
        assert_eq!(q.push_control(c), ControlOutcome::Queued);
        assert_eq!(q.push_control(c), ControlOutcome::Overflow);
        assert_eq!(q.lens(), (0, 0, 1));
        let w = Waker::from(Arc::new(CountWake(AtomicUsize::new(0))));
        let (_, close) = q.drain_into(&mut VecDeque::new(), &mut VecDeque::new(), &w);
        assert_eq!(close, Some(CloseRequest::ControlOverflow));
        q.shrink_if_idle();
    }

    #[test]
    fn drained_batch_carries_when_its_oldest_packet_was_queued() {
        let q = SendQueue::new(8, 4);
        let w = Waker::from(Arc::new(CountWake(AtomicUsize::new(0))));
        let (mut c, mut p) = (VecDeque::new(), VecDeque::new());
        let (d, _) = q.drain_into(&mut c, &mut p, &w);
        assert_eq!(d.oldest_queued_at, None, "nothing drained, nothing waited");

        let before = Instant::now();
        q.push_packet(Bytes::from_static(b"a"), false);
        let after_first = Instant::now();
        std::thread::sleep(std::time::Duration::from_millis(20));
        // A push to a queue that is not empty keeps the first packet's instant.
        q.push_packet(Bytes::from_static(b"b"), true);
        let (d, _) = q.drain_into(&mut c, &mut p, &w);
        let at = d.oldest_queued_at.expect("two packets drained");
        assert!(
            at >= before && at <= after_first,
            "not the first packet's instant"
        );
        assert!(at.elapsed() >= std::time::Duration::from_millis(20));

        // Drained: the next batch starts its own clock.
        let (d, _) = q.drain_into(&mut c, &mut p, &w);
        assert_eq!(d.oldest_queued_at, None);
        let before = Instant::now();
        q.push_packet(Bytes::from_static(b"c"), false);
        let (d, _) = q.drain_into(&mut c, &mut p, &w);
        assert!(d.oldest_queued_at.expect("one packet drained") >= before);
    }
}
