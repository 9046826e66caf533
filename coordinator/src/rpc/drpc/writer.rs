//! The write side of one dRPC transport ([`TransportWriter`]): packets numbered, encoded and
//! written straight into the yamux stream by the sending call itself (no writer task, no
//! per-message acknowledgement). It must never hold its lock across `.await`.

use super::*;

/// Above this capacity the encode buffer is given back once drained even while other senders
/// wait (a 4 MiB message must not keep a 4 MiB buffer for the transport's life); with nobody
/// waiting it is always given back.
pub(super) const KEEP_WRITE_BUFFER: usize = 16 * 1024;

/// The write side of one transport, shared by every sender of its calls: numbers packets per dRPC
/// stream id (from 1), encodes each into one buffer and writes it straight into the yamux stream.
/// There is no writer task and no per-message acknowledgement: a send completes when the yamux
/// stream took the whole packet, so back-pressure is the yamux send window (as Go's
/// `drpcwire.Writer` blocks in `Write` on the stream). One packet is in flight at a time, so the
/// frames of two packets never interleave; whoever is polled next finishes a packet whose sender
/// was cancelled before it starts its own. The state sits under a short `std` mutex that is
/// never held across `.await` (every step is a poll).
pub(super) struct TransportWriter {
    pub(super) st: Mutex<WriteState>,
}

pub(super) struct WriteState {
    /// `None` once reset, shut down or failed.
    pub(super) wr: Option<StreamWriter>,
    /// The packet in flight (encoded), `buf[pos..]` not yet taken by the stream.
    pub(super) buf: BytesMut,
    pub(super) pos: usize,
    /// Sequence number of the packet in `buf`, of the last one fully written, of the next one.
    pub(super) queued_seq: u64,
    pub(super) written_seq: u64,
    pub(super) next_seq: u64,
    pub(super) cur_stream: u64,
    pub(super) message_id: u64,
    /// No new packet is accepted (the transport is ending).
    pub(super) closing: bool,
    /// Why every later send fails.
    pub(super) failed: Option<RpcError>,
    /// Senders waiting for the packet in flight to drain (at most one entry per waiting sender).
    pub(super) waiters: Vec<Waker>,
}

pub(super) struct OutPacket {
    pub(super) stream_id: u64,
    pub(super) kind: Kind,
    pub(super) control: bool,
    pub(super) body: Bytes,
}

impl WriteState {
    pub(super) fn wake_waiters(&mut self) {
        for w in self.waiters.drain(..) {
            w.wake();
        }
    }

    pub(super) fn park(&mut self, cx: &Context<'_>) {
        if !self.waiters.iter().any(|w| w.will_wake(cx.waker())) {
            self.waiters.push(cx.waker().clone());
        }
    }

    pub(super) fn fail(&mut self, e: RpcError) -> RpcError {
        self.failed = Some(e.clone());
        self.wr = None;
        self.buf = BytesMut::new();
        self.pos = 0;
        self.wake_waiters();
        e
    }

    /// Writes the packet in flight; `Ready(Ok)` once `buf` is empty.
    pub(super) fn poll_flush_packet(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), RpcError>> {
        while self.pos < self.buf.len() {
            let Some(wr) = self.wr.as_mut() else {
                return Poll::Ready(Err(self.fail(RpcError::Closed)));
            };
            match Pin::new(wr).poll_write(cx, &self.buf[self.pos..]) {
                Poll::Ready(Ok(0)) => {
                    return Poll::Ready(Err(self.fail(RpcError::Transport("write zero".into()))));
                }
                Poll::Ready(Ok(n)) => self.pos += n,
                Poll::Ready(Err(e)) => {
                    return Poll::Ready(Err(self.fail(RpcError::Transport(e.to_string()))));
                }
                Poll::Pending => {
                    self.park(cx);
                    return Poll::Pending;
                }
            }
        }
        if self.queued_seq != 0 {
            self.written_seq = self.queued_seq;
            self.queued_seq = 0;
            if self.waiters.is_empty() || self.buf.capacity() > KEEP_WRITE_BUFFER {
                // Nobody else is waiting to send: give the buffer back (most transports are
                // idle between packets, and each would otherwise hold its largest packet).
                self.buf = BytesMut::new();
            } else {
                self.buf.clear();
            }
            self.pos = 0;
            self.wake_waiters();
        }
        Poll::Ready(Ok(()))
    }
}

impl TransportWriter {
    pub(super) fn new(wr: StreamWriter) -> Arc<Self> {
        Arc::new(TransportWriter {
            st: Mutex::new(WriteState {
                wr: Some(wr),
                buf: BytesMut::new(),
                pos: 0,
                queued_seq: 0,
                written_seq: 0,
                next_seq: 1,
                cur_stream: 0,
                message_id: 0,
                closing: false,
                failed: None,
                waiters: Vec::new(),
            }),
        })
    }

    pub(super) fn lock(&self) -> std::sync::MutexGuard<'_, WriteState> {
        self.st.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(super) fn poll_send(
        &self,
        cx: &mut Context<'_>,
        mine: &mut u64,
        pkt: &OutPacket,
    ) -> Poll<Result<(), RpcError>> {
        let mut g = self.lock();
        loop {
            if *mine != 0 && g.written_seq >= *mine {
                return Poll::Ready(Ok(()));
            }
            if let Some(e) = &g.failed {
                return Poll::Ready(Err(e.clone()));
            }
            if g.pos < g.buf.len() {
                match g.poll_flush_packet(cx) {
                    Poll::Ready(Ok(())) => continue,
                    other => return other,
                }
            }
            if *mine != 0 {
                // Our packet left the buffer without being counted written: only a failure
                // does that, and `failed` is checked above.
                return Poll::Ready(Err(RpcError::Closed));
            }
            if g.closing {
                return Poll::Ready(Err(RpcError::Closed));
            }
            if pkt.stream_id < g.cur_stream {
                // A straggler from a superseded call: ids must never go backwards on the wire.
                return Poll::Ready(Err(RpcError::Canceled));
            }
            if pkt.stream_id != g.cur_stream {
                g.cur_stream = pkt.stream_id;
                g.message_id = 0;
            }
            g.message_id += 1;
            let (message_id, seq) = (g.message_id, g.next_seq);
            g.next_seq += 1;
            g.queued_seq = seq;
            g.pos = 0;
            encode_packet_with(
                pkt.stream_id,
                message_id,
                pkt.kind,
                pkt.control,
                &pkt.body,
                &mut g.buf,
            );
            *mine = seq;
        }
    }

    /// Writes one packet; resolves once the yamux stream took all of it.
    pub(super) async fn send(&self, pkt: OutPacket) -> Result<(), RpcError> {
        let mut mine = 0u64;
        let guard = WakeOnDrop {
            writer: self,
            armed: true,
        };
        let res = std::future::poll_fn(|cx| self.poll_send(cx, &mut mine, &pkt)).await;
        let mut guard = guard;
        guard.armed = false;
        res
    }

    /// Ends the transport in order: refuses new packets, finishes the one in flight, then FIN.
    pub(super) async fn finish(&self) {
        self.lock().closing = true;
        std::future::poll_fn(|cx| {
            let mut g = self.lock();
            if g.failed.is_some() {
                return Poll::Ready(());
            }
            match g.poll_flush_packet(cx) {
                Poll::Ready(Ok(())) => {}
                Poll::Ready(Err(_)) => return Poll::Ready(()),
                Poll::Pending => return Poll::Pending,
            }
            let Some(wr) = g.wr.as_mut() else {
                return Poll::Ready(());
            };
            match Pin::new(wr).poll_shutdown(cx) {
                Poll::Pending => Poll::Pending,
                Poll::Ready(_) => {
                    g.fail(RpcError::Closed);
                    Poll::Ready(())
                }
            }
        })
        .await
    }

    /// Ends the transport at once with RST (a protocol error): the packet in flight is dropped.
    pub(super) async fn abort(&self) {
        let wr = {
            let mut g = self.lock();
            let wr = g.wr.take();
            g.fail(RpcError::Closed);
            wr
        };
        if let Some(wr) = wr {
            let _ = wr.reset().await;
        }
    }
}

/// A send cancelled while waiting may hold the only waker the yamux stream will wake: hand the
/// turn to the other waiting senders.
pub(super) struct WakeOnDrop<'a> {
    pub(super) writer: &'a TransportWriter,
    pub(super) armed: bool,
}

impl Drop for WakeOnDrop<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.writer.lock().wake_waiters();
        }
    }
}
