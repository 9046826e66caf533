//! Streams as the layers above see them: [`Stream`] and its halves ([`StreamReader`],
//! [`StreamWriter`]) as `AsyncRead + AsyncWrite` over the per-stream state, half-close (FIN) and
//! reset (RST), and [`HeldBytes`], what a layer above charges against the session's limit.

use super::*;

/// Shared by a stream's halves; dropping the last one detaches the stream (FIN if still open).
pub(super) struct StreamCore {
    pub(super) state: Arc<StreamState>,
    pub(super) session: Arc<Inner>,
}

impl StreamCore {
    pub(super) fn poll_read(
        &self,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let mut g = self.state.lock();
        if let Some(front) = g.recv_buf.front_mut() {
            let n = front.len().min(buf.remaining());
            buf.put_slice(&front.split_to(n));
            if front.is_empty() {
                g.recv_buf.pop_front();
            }
            g.buffered -= n;
            self.session.release(n);
            // hashicorp: send an update once the peer's remaining credit is below half the max.
            let max = self.session.max_window;
            let free = max.saturating_sub(g.buffered.min(u32::MAX as usize) as u32);
            let delta = free.saturating_sub(g.recv_window);
            if delta >= max / 2 && !g.wu_queued && !g.remote_closed && !g.reset {
                g.wu_queued = true;
                drop(g);
                self.session.queue_window_update(self.state.id);
            }
            return Poll::Ready(Ok(()));
        }
        if g.reset {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::ConnectionReset,
                "yamux: stream reset",
            )));
        }
        if g.remote_closed {
            return Poll::Ready(Ok(()));
        }
        if self.session.is_shutdown() {
            return Poll::Ready(Err(self.session.end_error().to_io()));
        }
        g.read_waker = Some(cx.waker().clone());
        Poll::Pending
    }

    /// Ready once a read would not wait (data buffered, the stream half-closed or reset, or the
    /// session ended), without reading: lets a reader wait holding no buffer.
    pub(super) fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<()> {
        let mut g = self.state.lock();
        if !g.recv_buf.is_empty() || g.reset || g.remote_closed || self.session.is_shutdown() {
            return Poll::Ready(());
        }
        g.read_waker = Some(cx.waker().clone());
        Poll::Pending
    }

    pub(super) fn poll_write(&self, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        {
            let mut g = self.state.lock();
            if let Some(e) = self.write_error(&g) {
                return Poll::Ready(Err(e));
            }
            if g.send_window == 0 {
                g.write_waker = Some(cx.waker().clone());
                return Poll::Pending;
            }
        }
        // Room in the writer's queue, held (the queue's lock) while the window is taken, so the
        // frame is queued in the order its bytes were taken. Lock order: queue, then stream.
        let mut q = match self.session.data.poll_room(&self.session, cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(q) => q,
        };
        let n = {
            let mut g = self.state.lock();
            if let Some(e) = self.write_error(&g) {
                return Poll::Ready(Err(e));
            }
            let n = (g.send_window as usize).min(buf.len()).min(MAX_DATA_FRAME);
            if n == 0 {
                g.write_waker = Some(cx.waker().clone());
                return Poll::Pending;
            }
            g.send_window -= n as u32;
            n
        };
        q.push_back(OutFrame {
            header: Header::data(Flags::NONE, self.state.id, n as u32),
            body: Bytes::copy_from_slice(&buf[..n]),
        });
        drop(q);
        self.session.ctrl_notify.notify_one();
        Poll::Ready(Ok(n))
    }

    pub(super) fn write_error(&self, g: &StreamInner) -> Option<io::Error> {
        if g.reset {
            return Some(io::Error::new(
                io::ErrorKind::ConnectionReset,
                "yamux: stream reset",
            ));
        }
        if g.local_closed {
            return Some(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "yamux: stream closed for writing",
            ));
        }
        if self.session.is_shutdown() {
            return Some(self.session.end_error().to_io());
        }
        None
    }

    pub(super) fn poll_shutdown(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        {
            let g = self.state.lock();
            if g.local_closed || g.reset {
                return Poll::Ready(Ok(()));
            }
        }
        if self.session.is_shutdown() {
            return Poll::Ready(Err(self.session.end_error().to_io()));
        }
        let mut q = match self.session.data.poll_room(&self.session, cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(q) => q,
        };
        if self.session.is_shutdown() {
            return Poll::Ready(Err(self.session.end_error().to_io()));
        }
        let remote_closed = {
            let mut g = self.state.lock();
            if g.local_closed || g.reset {
                return Poll::Ready(Ok(()));
            }
            g.local_closed = true;
            g.remote_closed
        };
        q.push_back(OutFrame {
            header: Header::window_update(Flags::FIN, self.state.id, 0),
            body: Bytes::new(),
        });
        drop(q);
        self.session.ctrl_notify.notify_one();
        if remote_closed {
            self.session.remove_stream(&self.state);
        } else {
            self.session.start_close_timer(&self.state);
        }
        Poll::Ready(Ok(()))
    }
}

impl Drop for StreamCore {
    fn drop(&mut self) {
        let (need_fin, remove) = {
            let mut g = self.state.lock();
            g.detached = true;
            g.recv_buf.clear();
            self.session.release(std::mem::take(&mut g.buffered));
            let need_fin = !g.local_closed && !g.reset && !g.removed;
            if need_fin {
                g.local_closed = true;
            }
            (need_fin, g.remote_closed || g.reset)
        };
        if self.session.is_shutdown() {
            return;
        }
        if need_fin {
            let fin = OutFrame {
                header: Header::window_update(Flags::FIN, self.state.id, 0),
                body: Bytes::new(),
            };
            if let Err(fin) = self.session.try_send_data(fin) {
                // Keep FIN ordered after the data already queued: wait for room in a helper.
                let session = Arc::downgrade(&self.session);
                self.session.spawn_helper(async move {
                    if let Some(session) = session.upgrade() {
                        let _ = session.send_data(fin).await;
                    }
                });
            }
        }
        if remove {
            self.session.remove_stream(&self.state);
        } else if need_fin {
            self.session.start_close_timer(&self.state);
        }
    }
}

/// Bytes a layer above yamux holds on behalf of one session's peer (a partial dRPC packet, a
/// message not yet taken by its call), charged against the session's
/// [`Config::max_buffered_bytes`] and given back when changed or dropped.
pub struct HeldBytes {
    pub(super) session: Arc<Inner>,
    pub(super) bytes: usize,
}

impl std::fmt::Debug for HeldBytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HeldBytes")
            .field("bytes", &self.bytes)
            .finish()
    }
}

impl HeldBytes {
    /// Now `bytes` are held. `Err` when that takes the session over its limit: the session has
    /// been ended with GoAway(protocol error) and the error says why.
    pub fn set(&mut self, bytes: usize) -> Result<(), SessionError> {
        if bytes <= self.bytes {
            self.session.release(self.bytes - bytes);
            self.bytes = bytes;
            return Ok(());
        }
        let more = bytes - self.bytes;
        self.bytes = bytes;
        if self.session.charge(more) {
            Ok(())
        } else {
            Err(self.session.end_error())
        }
    }

    /// A new charge of `bytes` against the same session (a message split off from this one).
    pub fn split(&self, bytes: usize) -> Result<HeldBytes, SessionError> {
        let mut h = HeldBytes {
            session: self.session.clone(),
            bytes: 0,
        };
        h.set(bytes)?;
        Ok(h)
    }

    /// The bytes held.
    pub fn get(&self) -> usize {
        self.bytes
    }
}

impl Drop for HeldBytes {
    fn drop(&mut self) {
        self.session.release(self.bytes);
    }
}

/// One yamux stream: `AsyncRead + AsyncWrite`. `poll_shutdown` half-closes (FIN); reads return EOF
/// after the peer's FIN and `ConnectionReset` after RST. Dropping it sends FIN if not yet sent.
pub struct Stream {
    /// The write half; reads go through its `core` too (a whole stream is its write half plus
    /// read access, so the write path exists once).
    writer: StreamWriter,
}

impl std::fmt::Debug for Stream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stream").field("id", &self.id()).finish()
    }
}

/// Read half of a [`Stream`].
pub struct StreamReader {
    pub(super) core: Arc<StreamCore>,
}

impl std::fmt::Debug for StreamReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamReader")
            .field("id", &self.core.state.id)
            .finish()
    }
}

/// Write half of a [`Stream`].
pub struct StreamWriter {
    pub(super) core: Arc<StreamCore>,
}

impl std::fmt::Debug for StreamWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamWriter")
            .field("id", &self.core.state.id)
            .finish()
    }
}

impl Stream {
    pub(super) fn new(state: Arc<StreamState>, session: Arc<Inner>) -> Stream {
        Stream {
            writer: StreamWriter {
                core: Arc::new(StreamCore { state, session }),
            },
        }
    }

    /// The yamux stream id.
    pub fn id(&self) -> u32 {
        self.writer.id()
    }

    /// Splits into independently usable halves (no lock shared between them).
    pub fn into_split(self) -> (StreamReader, StreamWriter) {
        let reader = StreamReader {
            core: self.writer.core.clone(),
        };
        (reader, self.writer)
    }

    /// Resets the stream (RST): both directions fail immediately on both sides.
    pub async fn reset(self) -> Result<(), SessionError> {
        self.writer.reset().await
    }
}

pub(super) async fn reset_stream(core: &StreamCore) -> Result<(), SessionError> {
    {
        let mut g = core.state.lock();
        if g.reset || g.removed {
            return Ok(());
        }
        g.reset = true;
        g.local_closed = true;
        wake_all(&mut g);
    }
    let rst = OutFrame {
        header: Header::window_update(Flags::RST, core.state.id, 0),
        body: Bytes::new(),
    };
    let res = tokio::select! {
        _ = core.session.shutdown.cancelled() => Err(core.session.end_error()),
        r = core.session.send_data(rst) => r,
    };
    core.session.remove_stream(&core.state);
    res
}

impl StreamReader {
    /// The yamux stream id.
    pub fn id(&self) -> u32 {
        self.core.state.id
    }

    /// Waits until a read would not wait (see [`StreamCore::poll_read_ready`]); reads nothing.
    /// Cancel-safe.
    pub async fn readable(&self) {
        std::future::poll_fn(|cx| self.core.poll_read_ready(cx)).await
    }

    /// A charge of 0 bytes against the session's buffered-bytes limit, for the layer above to
    /// account what it holds from this stream (see [`HeldBytes`]).
    pub fn held_bytes(&self) -> HeldBytes {
        HeldBytes {
            session: self.core.session.clone(),
            bytes: 0,
        }
    }

    /// Rejoins the halves of one stream; gives them back if they belong to different streams.
    pub fn reunite(self, writer: StreamWriter) -> Result<Stream, (StreamReader, StreamWriter)> {
        if Arc::ptr_eq(&self.core, &writer.core) {
            Ok(Stream { writer })
        } else {
            Err((self, writer))
        }
    }
}

impl StreamWriter {
    /// The yamux stream id.
    pub fn id(&self) -> u32 {
        self.core.state.id
    }

    /// Resets the stream (RST).
    pub async fn reset(&self) -> Result<(), SessionError> {
        reset_stream(&self.core).await
    }
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.writer.core.poll_read(cx, buf)
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().writer).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().writer).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().writer).poll_shutdown(cx)
    }
}

impl AsyncRead for StreamReader {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.core.poll_read(cx, buf)
    }
}

impl AsyncWrite for StreamWriter {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.core.poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.core.poll_shutdown(cx)
    }
}
