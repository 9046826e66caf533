//! The session's writer, the only code that writes to the transport: control frames (ACK, window
//! updates, ping replies, GoAway) before stream data, frames batched, and the session failed if
//! one write blocks past `connection_write_timeout` (Go's rule); and its queue of stream frames
//! ([`DataQueue`]).

use super::*;

/// Stream frames (data, SYN, FIN, RST) waiting for the writer: at most `cap`, a stream that finds
/// it full waits (its waker is kept) until the writer takes frames or the session ends. A queue
/// under a mutex rather than a channel: a channel allocates its shared state and a first block of
/// 32 slots for every session when it is made (1.6 KB, 8% of a connected peer), and every
/// stream's `PollSender` a boxed future besides; this holds nothing while empty.
pub(super) struct DataQueue {
    frames: Mutex<VecDeque<OutFrame>>,
    pub(super) cap: usize,
    /// Streams waiting for room.
    waiting: Mutex<Vec<Waker>>,
}

impl DataQueue {
    pub(super) fn new(cap: usize) -> Self {
        DataQueue {
            frames: Mutex::new(VecDeque::new()),
            cap: cap.max(1),
            waiting: Mutex::new(Vec::new()),
        }
    }

    pub(super) fn lock(&self) -> MutexGuard<'_, VecDeque<OutFrame>> {
        self.frames.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The queue, locked, with room for one more frame, or (after the session has ended) as it
    /// is: the caller checks the session before queueing. `Pending` (the waker kept) while full.
    pub(super) fn poll_room(
        &self,
        inner: &Inner,
        cx: &mut Context<'_>,
    ) -> Poll<MutexGuard<'_, VecDeque<OutFrame>>> {
        let q = self.lock();
        if q.len() < self.cap || inner.is_shutdown() {
            return Poll::Ready(q);
        }
        // Registered while the queue is locked: the writer takes frames under the same lock and
        // wakes the waiting after it, so no wake-up is lost.
        let mut w = self.waiting.lock().unwrap_or_else(|e| e.into_inner());
        if !w.iter().any(|x| x.will_wake(cx.waker())) {
            w.push(cx.waker().clone());
        }
        Poll::Pending
    }

    fn pop(&self) -> Option<OutFrame> {
        let mut q = self.lock();
        let f = q.pop_front();
        if q.is_empty() && q.capacity() > 16 {
            // A burst grew it: give the room back.
            *q = VecDeque::new();
        }
        f
    }

    fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }

    /// Wakes every stream waiting for room (the writer took frames, or the session ended).
    pub(super) fn wake_waiting(&self) {
        let waiting = std::mem::take(&mut *self.waiting.lock().unwrap_or_else(|e| e.into_inner()));
        for w in waiting {
            w.wake();
        }
    }
}

/// Moves the queued control frames into `batch` (and makes room for waiting senders).
fn take_control_frames(inner: &Inner, batch: &mut BytesMut) {
    let mut q = inner.ctrl_queue();
    if q.is_empty() {
        return;
    }
    for h in q.drain(..) {
        batch.extend_from_slice(&h.encode());
    }
    if q.capacity() > 16 {
        // A burst grew it: give the room back.
        *q = VecDeque::new();
    }
    drop(q);
    inner.ctrl_room.notify_waiters();
}

/// Control frames, then window updates, into `batch`.
pub(super) fn drain_control(inner: &Inner, batch: &mut BytesMut) {
    take_control_frames(inner, batch);
    let ids: Vec<u32> = match inner.wu_pending.lock() {
        Ok(mut v) => std::mem::take(&mut *v),
        Err(_) => Vec::new(),
    };
    if ids.is_empty() {
        return;
    }
    let map = inner.streams();
    for id in ids {
        let Some(state) = map.get(&id) else { continue };
        let mut g = state.lock();
        g.wu_queued = false;
        if g.removed || g.reset || g.remote_closed || g.detached {
            continue;
        }
        let free = inner
            .max_window
            .saturating_sub(g.buffered.min(u32::MAX as usize) as u32);
        let delta = free.saturating_sub(g.recv_window);
        if delta > 0 {
            g.recv_window += delta;
            batch.extend_from_slice(&Header::window_update(Flags::NONE, id, delta).encode());
        }
    }
}

pub(super) fn push_frame(batch: &mut BytesMut, f: OutFrame) {
    batch.extend_from_slice(&f.header.encode());
    batch.extend_from_slice(&f.body);
}

pub(super) async fn writer_loop<W>(inner: Arc<Inner>, mut wr: W)
where
    W: AsyncWrite + Unpin,
{
    let timeout = inner.config.connection_write_timeout;
    // Holds no memory while the session is idle (most sessions, most of the time): allocated
    // when there is something to write, given back before waiting again.
    let mut batch = BytesMut::new();
    let shutdown = inner.shutdown.clone();
    let shut_down = shutdown.cancelled();
    tokio::pin!(shut_down);
    loop {
        if inner.is_shutdown() {
            break;
        }
        batch.clear();
        if batch.capacity() < INITIAL_BATCH_CAPACITY && !inner.data.is_empty() {
            batch.reserve(INITIAL_BATCH_CAPACITY);
        }
        drain_control(&inner, &mut batch);
        let mut took = false;
        while batch.len() < WRITE_BATCH {
            let Some(f) = inner.data.pop() else { break };
            took = true;
            // Control queued before this frame must go first (ACK before data).
            drain_control(&inner, &mut batch);
            push_frame(&mut batch, f);
        }
        if took {
            inner.data.wake_waiting();
        }
        if batch.is_empty() {
            if batch.capacity() > 0 {
                batch = BytesMut::new();
            }
            tokio::select! {
                biased;
                _ = &mut shut_down => break,
                _ = inner.ctrl_notify.notified() => {}
            }
            continue;
        }
        let write = async {
            wr.write_all(&batch).await?;
            wr.flush().await
        };
        // Not cancelled by shutdown: a half-written frame would corrupt the final GoAway.
        let res = tokio::time::timeout(timeout, write).await;
        match res {
            Ok(Ok(())) => {
                if batch.capacity() > KEEP_BATCH_CAPACITY {
                    batch = BytesMut::with_capacity(INITIAL_BATCH_CAPACITY);
                }
            }
            Ok(Err(e)) => {
                inner.shutdown_with(SessionError::Io(e.to_string()));
                break;
            }
            Err(_) => {
                count(&inner.config.metrics, |m| &m.yamux_write_timeouts);
                tracing::info!(
                    "yamux: frame write blocked past the write timeout; closing session"
                );
                inner.shutdown_with(SessionError::WriteTimeout);
                // The transport is stuck: don't try to write anything else.
                let _ = tokio::time::timeout(Duration::from_millis(10), wr.shutdown()).await;
                return;
            }
        }
    }
    // Final flush of control frames queued before shutdown (GoAway), bounded.
    batch.clear();
    take_control_frames(&inner, &mut batch);
    let finish = async {
        if !batch.is_empty() {
            wr.write_all(&batch).await?;
            wr.flush().await?;
        }
        wr.shutdown().await
    };
    let _ = tokio::time::timeout(timeout, finish).await;
}
