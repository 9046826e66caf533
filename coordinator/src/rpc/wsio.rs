//! WebSocket ⇄ byte stream, the bottom of Coder's v2 transport stack (WebSocket → yamux → dRPC).
//!
//! Why: Coder wraps its WebSocket in `websocket.NetConn`, so binary message boundaries carry no
//! meaning: every write is one binary message and reads concatenate. yamux needs an
//! `AsyncRead + AsyncWrite`, which [`WsIo`] provides over either axum's server-side WebSocket or
//! tokio-tungstenite's client-side one (see [`WsMessage`]).
//!
//! Shape: [`WsIo::new`] splits the socket and spawns two pump tasks. The reader pump forwards binary
//! payloads into a bounded queue that [`WsIo`]'s `poll_read` drains; it also matches pongs and turns
//! a text message into an error (close 1003, as `websocket.NetConn` does). The writer pump sends each
//! queued write as one binary message, sends a WebSocket ping every `ping_interval` (Coder's
//! `wsWatcher` does this every 15 s) and closes with 1001 `"liveness probe failed"` if the pong does
//! not arrive within `ping_timeout`. With `inactivity_timeout` set it follows the rule coderd applies
//! to an agent's `/me/rpc` instead (its `agentConnectionMonitor`): a ping every `ping_interval` with
//! at most one outstanding, and a check every `ping_interval` that closes the socket once the last
//! pong is older than `inactivity_timeout` (coderd: 30 s). Either way such a peer is known dead, so
//! its byte stream ends at once
//! (the session turns it LOST right then) instead of waiting `close_grace` for a close reply it will
//! never send. The session layer picks the final close code through
//! [`WsHandle::close`] (1000 normal, 1011 + error text); pings from the peer are answered by the
//! WebSocket library itself.
//!
//! This module must never buffer without bound (both queues are bounded; a stalled peer stalls
//! us, and every message write is limited by `write_timeout`), and never block a pump on the other.
//! Note: the per-message size limit is the WebSocket library's (`max_message_size`); servers should
//! set it to [`RECOMMENDED_MAX_MESSAGE_SIZE`] because Go yamux never writes more than one 256 KiB
//! window plus a header per message.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures_util::{Sink, SinkExt, Stream, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{mpsc, watch, Notify};
use tokio::time::Instant;
use tokio_util::sync::{CancellationToken, PollSender};

use super::{count, MetricsRef};

/// Close code: normal closure.
pub const CLOSE_NORMAL: u16 = 1000;
/// Close code: going away (Coder uses it for a failed liveness probe).
pub const CLOSE_GOING_AWAY: u16 = 1001;
/// Close code: unsupported data (a text message on a binary byte stream).
pub const CLOSE_UNSUPPORTED_DATA: u16 = 1003;
/// Close code: internal error (the serve loop failed; reason = error text).
pub const CLOSE_INTERNAL_ERROR: u16 = 1011;
/// Reason sent with [`CLOSE_GOING_AWAY`] when a ping is not answered in time (Coder's text).
pub const LIVENESS_FAILED_REASON: &str = "liveness probe failed";
/// A safe WebSocket `max_message_size` for yamux traffic: one full 256 KiB window, a header and
/// generous slack (Coder's Go side effectively has no limit, but never writes more than this).
pub const RECOMMENDED_MAX_MESSAGE_SIZE: usize = 1 << 20;
/// The WebSocket library's read buffer per connection. Its default (128 KiB) is zero-filled
/// before every socket read and pinned by every received payload until that payload is consumed:
/// at 10,000 sessions that was most of the coordinator's memory and a fifth of its CPU. Coordination
/// messages are a few hundred bytes; larger ones take several reads.
pub const RECOMMENDED_READ_BUFFER_SIZE: usize = 8 * 1024;
/// Longest close reason a control frame can carry.
const MAX_CLOSE_REASON: usize = 123;

/// What the pumps need from a WebSocket message type. Implemented for axum's
/// `extract::ws::Message` (server side) and tungstenite's `Message` (client side).
pub trait WsMessage: Sized + Send + 'static {
    /// A binary data message.
    fn binary(data: Bytes) -> Self;
    /// A ping control message.
    fn ping(payload: Bytes) -> Self;
    /// A close message with code and reason (reason ≤ 123 bytes).
    fn close(code: u16, reason: &str) -> Self;
    /// Classifies a received message.
    fn classify(self) -> WsFrame;
}

/// A received WebSocket message, library-independent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WsFrame {
    /// Binary payload: part of the byte stream.
    Binary(Bytes),
    /// A text message: a protocol error on a binary byte stream.
    Text,
    /// Ping (answered by the library).
    Ping,
    /// Pong with its payload.
    Pong(Bytes),
    /// The peer's close frame, if it carried a code.
    Close(Option<(u16, String)>),
    /// Anything else (raw frames); ignored.
    Other,
}

impl WsMessage for axum::extract::ws::Message {
    fn binary(data: Bytes) -> Self {
        axum::extract::ws::Message::Binary(data)
    }
    fn ping(payload: Bytes) -> Self {
        axum::extract::ws::Message::Ping(payload)
    }
    fn close(code: u16, reason: &str) -> Self {
        axum::extract::ws::Message::Close(Some(axum::extract::ws::CloseFrame {
            code,
            reason: reason.into(),
        }))
    }
    fn classify(self) -> WsFrame {
        use axum::extract::ws::Message as M;
        match self {
            M::Binary(b) => WsFrame::Binary(b),
            M::Text(_) => WsFrame::Text,
            M::Ping(_) => WsFrame::Ping,
            M::Pong(p) => WsFrame::Pong(p),
            M::Close(c) => WsFrame::Close(c.map(|c| (c.code, c.reason.to_string()))),
        }
    }
}

impl WsMessage for tokio_tungstenite::tungstenite::Message {
    fn binary(data: Bytes) -> Self {
        tokio_tungstenite::tungstenite::Message::Binary(data)
    }
    fn ping(payload: Bytes) -> Self {
        tokio_tungstenite::tungstenite::Message::Ping(payload)
    }
    fn close(code: u16, reason: &str) -> Self {
        use tokio_tungstenite::tungstenite::protocol::CloseFrame;
        tokio_tungstenite::tungstenite::Message::Close(Some(CloseFrame {
            code: code.into(),
            reason: reason.into(),
        }))
    }
    fn classify(self) -> WsFrame {
        use tokio_tungstenite::tungstenite::Message as M;
        match self {
            M::Binary(b) => WsFrame::Binary(b),
            M::Text(_) => WsFrame::Text,
            M::Ping(_) => WsFrame::Ping,
            M::Pong(p) => WsFrame::Pong(p),
            M::Close(c) => WsFrame::Close(c.map(|c| (u16::from(c.code), c.reason.to_string()))),
            M::Frame(_) => WsFrame::Other,
        }
    }
}

/// Timing and queue settings for one WebSocket byte stream.
#[derive(Debug, Clone)]
pub struct WsConfig {
    /// Send a WebSocket ping this often (`None` disables; Coder's server: 15 s).
    pub ping_interval: Option<Duration>,
    /// A ping not answered within this time closes with 1001 (Coder: 15 s).
    pub ping_timeout: Duration,
    /// coderd's agent rule instead of `ping_timeout`: pings wait for their pong however long it
    /// takes, and every `ping_interval` the socket is closed with 1001 if no pong has arrived for
    /// longer than this (coderd's `AgentInactiveDisconnectTimeout`, 30 s).
    pub inactivity_timeout: Option<Duration>,
    /// One message write blocked longer than this ends the stream.
    pub write_timeout: Duration,
    /// How long to wait for the session layer's close code after the byte stream is shut down,
    /// and for the peer's close reply.
    pub close_grace: Duration,
    /// Depth of the inbound and outbound message queues.
    pub queue_depth: usize,
    /// Where to count liveness failures, text messages and write timeouts.
    pub metrics: MetricsRef,
}

impl WsConfig {
    /// Coder's server-side behaviour: ping every 15 s, 15 s to answer.
    pub fn server() -> Self {
        WsConfig {
            ping_interval: Some(Duration::from_secs(15)),
            ping_timeout: Duration::from_secs(15),
            inactivity_timeout: None,
            write_timeout: Duration::from_secs(10),
            close_grace: Duration::from_secs(5),
            queue_depth: 16,
            metrics: None,
        }
    }

    /// Client side: no pings of our own (Go clients don't send any either).
    pub fn client() -> Self {
        WsConfig {
            ping_interval: None,
            ..WsConfig::server()
        }
    }
}

impl Default for WsConfig {
    fn default() -> Self {
        WsConfig::server()
    }
}

/// How a WebSocket byte stream ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WsEnd {
    /// We sent a close frame with this code and reason.
    ClosedByUs {
        /// Close code.
        code: u16,
        /// Close reason.
        reason: String,
    },
    /// The peer sent a close frame (code absent if its frame had none).
    ClosedByPeer {
        /// Close code, if any.
        code: Option<u16>,
        /// Close reason.
        reason: String,
    },
    /// A ping went unanswered; we closed with 1001.
    LivenessFailed,
    /// The peer sent a text message; we closed with 1003.
    TextMessage,
    /// The connection dropped or a write failed or timed out.
    Transport(String),
}

enum Inbound {
    Data(Bytes),
    Text,
}

struct Shared {
    /// Pong payload we are waiting for (0 = none).
    expect_pong: AtomicU64,
    pong: Notify,
    /// Close requested by the reader pump (text message).
    internal_close: Mutex<Option<(u16, String)>>,
    internal_close_notify: Notify,
    /// Reader pump finished (peer closed or connection lost).
    reader_done: CancellationToken,
    /// Tells the reader pump to stop.
    stop: CancellationToken,
    end: Mutex<Option<WsEnd>>,
    metrics: MetricsRef,
}

impl Shared {
    fn set_end(&self, end: WsEnd) {
        if let Ok(mut g) = self.end.lock() {
            if g.is_none() {
                *g = Some(end);
            }
        }
    }

    fn end(&self) -> WsEnd {
        self.end
            .lock()
            .ok()
            .and_then(|g| g.clone())
            .unwrap_or_else(|| WsEnd::Transport("websocket ended".into()))
    }
}

/// Control handle for a [`WsIo`]: choose the close code, observe the end.
#[derive(Clone)]
pub struct WsHandle {
    cmd: mpsc::Sender<(u16, String)>,
    done: watch::Receiver<bool>,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for WsHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WsHandle").finish_non_exhaustive()
    }
}

impl WsHandle {
    /// Sends a close frame with `code` and `reason` (truncated to 123 bytes) and waits until the
    /// WebSocket has ended (close handshake done, or `close_grace` passed). Only the first close
    /// request counts; later ones and closes after the end are no-ops.
    pub async fn close(&self, code: u16, reason: &str) -> WsEnd {
        let _ = self
            .cmd
            .try_send((code, truncate_reason(reason).to_string()));
        self.ended().await
    }

    /// Waits until both pumps have finished and returns how the stream ended.
    pub async fn ended(&self) -> WsEnd {
        let mut done = self.done.clone();
        let _ = done.wait_for(|d| *d).await;
        self.shared.end()
    }

    /// Whether the WebSocket has fully ended.
    pub fn is_ended(&self) -> bool {
        *self.done.borrow()
    }
}

fn truncate_reason(reason: &str) -> &str {
    if reason.len() <= MAX_CLOSE_REASON {
        return reason;
    }
    let mut end = MAX_CLOSE_REASON;
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    &reason[..end]
}

/// A WebSocket as a byte stream: `AsyncRead` concatenates binary messages, every `poll_write` is one
/// binary message. EOF when the peer closes; a text message is an `InvalidData` error.
pub struct WsIo {
    rx: mpsc::Receiver<Inbound>,
    cur: Bytes,
    failed: bool,
    tx: PollSender<Bytes>,
}

impl std::fmt::Debug for WsIo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WsIo")
            .field("buffered", &self.cur.len())
            .finish()
    }
}

impl WsIo {
    /// Wraps `ws` (axum `WebSocket` or tokio-tungstenite `WebSocketStream`) and spawns its pumps.
    /// Must be called inside a tokio runtime.
    pub fn new<S, M, E>(ws: S, config: WsConfig) -> (WsIo, WsHandle)
    where
        S: Stream<Item = Result<M, E>> + Sink<M, Error = E> + Send + Unpin + 'static,
        M: WsMessage,
        E: std::fmt::Display + Send + 'static,
    {
        let depth = config.queue_depth.max(1);
        let (in_tx, in_rx) = mpsc::channel(depth);
        let (out_tx, out_rx) = mpsc::channel::<Bytes>(depth);
        let (cmd_tx, cmd_rx) = mpsc::channel(1);
        let (done_tx, done_rx) = watch::channel(false);
        let shared = Arc::new(Shared {
            expect_pong: AtomicU64::new(0),
            pong: Notify::new(),
            internal_close: Mutex::new(None),
            internal_close_notify: Notify::new(),
            reader_done: CancellationToken::new(),
            stop: CancellationToken::new(),
            end: Mutex::new(None),
            metrics: config.metrics.clone(),
        });
        let (sink, stream) = ws.split();
        let reader = tokio::spawn(reader_pump(stream, in_tx, shared.clone()));
        let writer_shared = shared.clone();
        tokio::spawn(async move {
            writer_pump(sink, out_rx, cmd_rx, writer_shared.clone(), config).await;
            // The writer already waited (bounded) for the peer's close reply; stop the reader.
            writer_shared.stop.cancel();
            let _ = reader.await;
            let _ = done_tx.send(true);
        });
        let io = WsIo {
            rx: in_rx,
            cur: Bytes::new(),
            failed: false,
            tx: PollSender::new(out_tx),
        };
        let handle = WsHandle {
            cmd: cmd_tx,
            done: done_rx,
            shared,
        };
        (io, handle)
    }
}

async fn reader_pump<St, M, E>(mut stream: St, in_tx: mpsc::Sender<Inbound>, shared: Arc<Shared>)
where
    St: Stream<Item = Result<M, E>> + Unpin,
    M: WsMessage,
    E: std::fmt::Display,
{
    let mut in_tx = Some(in_tx);
    // One waiter for the whole loop: a fresh `cancelled()` per message locks the token's mutex
    // and registers a new waiter every time.
    let stop = shared.stop.cancelled();
    tokio::pin!(stop);
    loop {
        let item = tokio::select! {
            _ = &mut stop => break,
            item = stream.next() => item,
        };
        let msg = match item {
            None => {
                shared.set_end(WsEnd::Transport("connection closed".into()));
                break;
            }
            Some(Err(e)) => {
                shared.set_end(WsEnd::Transport(e.to_string()));
                break;
            }
            Some(Ok(m)) => m,
        };
        match msg.classify() {
            WsFrame::Binary(b) => {
                if b.is_empty() {
                    continue;
                }
                if let Some(tx) = in_tx.as_ref() {
                    tokio::select! {
                        _ = &mut stop => break,
                        r = tx.send(Inbound::Data(b)) => if r.is_err() { in_tx = None; },
                    }
                }
            }
            WsFrame::Text => {
                count(&shared.metrics, |m| &m.ws_text_messages);
                tracing::debug!("websocket: text message on a binary byte stream; closing 1003");
                if let Some(tx) = in_tx.take() {
                    let _ = tx.try_send(Inbound::Text);
                }
                shared.set_end(WsEnd::TextMessage);
                if let Ok(mut g) = shared.internal_close.lock() {
                    *g = Some((
                        CLOSE_UNSUPPORTED_DATA,
                        "unexpected frame type read (expected MessageBinary): MessageText".into(),
                    ));
                }
                shared.internal_close_notify.notify_one();
            }
            WsFrame::Ping | WsFrame::Other => {}
            WsFrame::Pong(p) => {
                let want = shared.expect_pong.load(Ordering::Acquire);
                if want != 0 && p.as_ref() == want.to_string().as_bytes() {
                    shared.expect_pong.store(0, Ordering::Release);
                    shared.pong.notify_one();
                }
            }
            WsFrame::Close(frame) => {
                let (code, reason) = match frame {
                    Some((c, r)) => (Some(c), r),
                    None => (None, String::new()),
                };
                shared.set_end(WsEnd::ClosedByPeer { code, reason });
                // EOF for the byte stream; keep polling so the library completes the handshake.
                in_tx = None;
            }
        }
    }
    drop(in_tx);
    shared.reader_done.cancel();
}

async fn writer_pump<Si, M>(
    mut sink: Si,
    mut out_rx: mpsc::Receiver<Bytes>,
    mut cmd_rx: mpsc::Receiver<(u16, String)>,
    shared: Arc<Shared>,
    config: WsConfig,
) where
    Si: Sink<M> + Unpin,
    Si::Error: std::fmt::Display,
    M: WsMessage,
{
    let far = Instant::now() + Duration::from_secs(86400 * 365);
    let ping_every = config.ping_interval.filter(|d| !d.is_zero());
    let mut next_ping = ping_every.map_or(far, |d| Instant::now() + d);
    let mut pong_deadline: Option<Instant> = None;
    // The agent rule: a ping is outstanding until its pong, and liveness is the last pong's age.
    let inactivity = config.inactivity_timeout.filter(|_| ping_every.is_some());
    let mut awaiting_pong = false;
    let mut last_pong = Instant::now();
    let mut next_check = inactivity.map_or(far, |_| next_ping);
    let mut ping_counter: u64 = 0;
    let mut out_open = true;
    let mut handles_gone = false;
    let mut default_close_at: Option<Instant> = None;

    let reader_done = shared.reader_done.cancelled();
    tokio::pin!(reader_done);
    let close: Option<(u16, String)> = loop {
        tokio::select! {
            biased;
            cmd = cmd_rx.recv(), if !handles_gone => match cmd {
                Some(c) => break Some(c),
                None => {
                    handles_gone = true;
                    if !out_open {
                        break Some((CLOSE_NORMAL, String::new()));
                    }
                }
            },
            _ = shared.internal_close_notify.notified() => {
                let req = shared.internal_close.lock().ok().and_then(|mut g| g.take());
                if let Some(req) = req {
                    break Some(req);
                }
            }
            _ = &mut reader_done => break None,
            _ = tokio::time::sleep_until(pong_deadline.unwrap_or(far)), if pong_deadline.is_some() => {
                count(&shared.metrics, |m| &m.ws_liveness_failures);
                tracing::info!("websocket: ping not answered in time; closing 1001");
                shared.set_end(WsEnd::LivenessFailed);
                break Some((CLOSE_GOING_AWAY, LIVENESS_FAILED_REASON.into()));
            }
            _ = tokio::time::sleep_until(next_check), if inactivity.is_some() => {
                if inactivity.is_some_and(|limit| last_pong.elapsed() > limit) {
                    count(&shared.metrics, |m| &m.ws_liveness_failures);
                    tracing::info!("websocket: no pong within the inactivity timeout; closing 1001");
                    shared.set_end(WsEnd::LivenessFailed);
                    break Some((CLOSE_GOING_AWAY, LIVENESS_FAILED_REASON.into()));
                }
                next_check = Instant::now() + ping_every.unwrap_or(Duration::from_secs(15));
            }
            _ = shared.pong.notified(), if pong_deadline.is_some() || awaiting_pong => {
                pong_deadline = None;
                awaiting_pong = false;
                last_pong = Instant::now();
            }
            _ = tokio::time::sleep_until(next_ping), if ping_every.is_some() && pong_deadline.is_none() && !awaiting_pong => {
                ping_counter += 1;
                shared.expect_pong.store(ping_counter, Ordering::Release);
                let payload = Bytes::from(ping_counter.to_string());
                match tokio::time::timeout(config.write_timeout, sink.send(M::ping(payload))).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => {
                        shared.set_end(WsEnd::Transport(e.to_string()));
                        break None;
                    }
                    Err(_) => {
                        shared.set_end(WsEnd::Transport("websocket ping write timed out".into()));
                        break None;
                    }
                }
                if inactivity.is_some() {
                    awaiting_pong = true;
                } else {
                    pong_deadline = Some(Instant::now() + config.ping_timeout);
                }
                next_ping = Instant::now() + ping_every.unwrap_or(Duration::from_secs(15));
            }
            msg = out_rx.recv(), if out_open => match msg {
                Some(data) => {
                    match tokio::time::timeout(config.write_timeout, sink.send(M::binary(data))).await {
                        Ok(Ok(())) => {}
                        Ok(Err(e)) => {
                            shared.set_end(WsEnd::Transport(e.to_string()));
                            break None;
                        }
                        Err(_) => {
                            count(&shared.metrics, |m| &m.ws_write_timeouts);
                            shared.set_end(WsEnd::Transport("websocket write timed out".into()));
                            break None;
                        }
                    }
                }
                None => {
                    out_open = false;
                    if handles_gone {
                        break Some((CLOSE_NORMAL, String::new()));
                    }
                    default_close_at = Some(Instant::now() + config.close_grace);
                }
            },
            _ = tokio::time::sleep_until(default_close_at.unwrap_or(far)), if default_close_at.is_some() => {
                break Some((CLOSE_NORMAL, String::new()));
            }
        }
    };

    if let Some((code, reason)) = close {
        // A peer that failed the liveness probe is known dead: end the byte stream now (the
        // session sees EOF and the peer turns LOST at once, as Coder's rule says) and send the
        // close frame without waiting for a reply that will never come.
        let peer_dead = matches!(shared.end(), WsEnd::LivenessFailed);
        if peer_dead {
            shared.stop.cancel();
        }
        shared.set_end(WsEnd::ClosedByUs {
            code,
            reason: reason.clone(),
        });
        let reason = truncate_reason(&reason).to_string();
        let sent =
            tokio::time::timeout(config.write_timeout, sink.send(M::close(code, &reason))).await;
        if matches!(sent, Ok(Ok(()))) && !peer_dead {
            // Wait (bounded) for the peer's close reply so the handshake completes cleanly.
            let _ = tokio::time::timeout(config.close_grace, shared.reader_done.cancelled()).await;
        }
    }
    let _ = tokio::time::timeout(config.write_timeout, sink.close()).await;
}

impl AsyncRead for WsIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            if !self.cur.is_empty() {
                let n = self.cur.len().min(buf.remaining());
                let chunk = self.cur.split_to(n);
                buf.put_slice(&chunk);
                return Poll::Ready(Ok(()));
            }
            if self.failed {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "websocket: text message on a binary stream",
                )));
            }
            match self.rx.poll_recv(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(None) => return Poll::Ready(Ok(())),
                Poll::Ready(Some(Inbound::Data(b))) => self.cur = b,
                Poll::Ready(Some(Inbound::Text)) => self.failed = true,
            }
        }
    }
}

impl AsyncWrite for WsIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        match self.tx.poll_reserve(cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(Err(_)) => {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::BrokenPipe,
                    "websocket closed",
                )))
            }
            Poll::Ready(Ok(())) => {}
        }
        match self.tx.send_item(Bytes::copy_from_slice(buf)) {
            Ok(()) => Poll::Ready(Ok(buf.len())),
            Err(_) => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "websocket closed",
            ))),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.tx.close();
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn close_reason_fits_a_control_frame() {
        assert_eq!(truncate_reason("short"), "short");
        let long = "é".repeat(100); // 200 bytes, 2-byte chars
        let t = truncate_reason(&long);
        assert!(t.len() <= MAX_CLOSE_REASON);
        assert_eq!(t.len(), 122, "cut on a char boundary");
    }

    #[test]
    fn both_message_types_classify_alike() {
        use axum::extract::ws::Message as A;
        use tokio_tungstenite::tungstenite::Message as G;
        let b = Bytes::from_static(b"x");
        assert_eq!(A::binary(b.clone()).classify(), WsFrame::Binary(b.clone()));
        assert_eq!(G::binary(b.clone()).classify(), WsFrame::Binary(b));
        assert_eq!(A::Text("t".into()).classify(), WsFrame::Text);
        assert_eq!(G::text("t").classify(), WsFrame::Text);
        assert_eq!(
            A::close(1011, "boom").classify(),
            WsFrame::Close(Some((1011, "boom".into())))
        );
        assert_eq!(
            G::close(1001, "bye").classify(),
            WsFrame::Close(Some((1001, "bye".into())))
        );
    }
}
