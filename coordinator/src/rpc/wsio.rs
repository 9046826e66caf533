//! WebSocket ⇄ byte stream, the bottom of Coder's v2 transport stack (WebSocket → yamux → dRPC).
//!
//! Why: Coder wraps its WebSocket in `websocket.NetConn`, so binary message boundaries carry no
//! meaning: every write is one binary message and reads concatenate. yamux needs an
//! `AsyncRead + AsyncWrite`, which [`WsIo`] provides over either axum's server-side WebSocket or
//! tokio-tungstenite's client-side one (see [`WsMessage`]).
//!
//! Shape: no pump tasks. The socket and all its state live in one `Core` behind a short `std`
//! mutex shared by [`WsIo`] and its [`WsHandle`]s; whoever polls (the yamux reader through
//! `poll_read`, its writer through `poll_write`/`poll_flush`, a task awaiting
//! [`WsHandle::close`]/[`WsHandle::ended`]) drives it. Inner polls use one combined waker that
//! wakes every task currently waiting on the socket, so a timer or a socket event registered by
//! one caller is never lost to another. `poll_read` concatenates binary payloads, matches pongs and
//! turns a text message into an error (close 1003, as `websocket.NetConn` does). Every
//! `poll_write` is one binary message (at most [`MAX_OUTBOUND_MESSAGE`]); the next write waits until it is flushed (one message in
//! flight), and a write or flush blocked longer than `write_timeout` ends the stream. One timer,
//! armed at the earliest deadline, serves pings, pong deadlines and close phases: a WebSocket ping
//! every `ping_interval` (Coder's `wsWatcher` does this every 15 s) and a close with 1001
//! `"liveness probe failed"` if the pong does not arrive within `ping_timeout`. With
//! `inactivity_timeout` set it follows the rule coderd applies to an agent's `/me/rpc` instead
//! (its `agentConnectionMonitor`): a ping every `ping_interval` with at most one outstanding, and a
//! check every `ping_interval` that closes the socket once the last pong is older than
//! `inactivity_timeout` (coderd: 30 s). Either way such a peer is known dead, so its byte stream
//! ends at once (the session turns it LOST right then) instead of waiting `close_grace` for a close
//! reply it will never send. The session layer picks the final close code through
//! [`WsHandle::close`] (1000 normal, 1011 + error text); pings from the peer are answered by the
//! WebSocket library itself. A handle's owner finishes the close handshake in its own task
//! ([`WsHandle::close`], [`WsHandle::ended`]); only when the [`WsIo`] and every handle are dropped
//! before it has finished does one small task finish it (1000, or the close already requested),
//! bounded by `close_grace` and `write_timeout` and ending with the socket.
//!
//! This module must never buffer without bound (at most one received and one sent message per
//! socket; a stalled peer stalls us, bounded by `write_timeout`).
//! Note: the per-message size limit is the WebSocket library's (`max_message_size`); servers should
//! set it to [`RECOMMENDED_MAX_MESSAGE_SIZE`] because Go yamux never writes more than one 256 KiB
//! window plus a header per message.

use std::future::Future;
use std::io;
use std::marker::PhantomData;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Wake, Waker};
use std::time::Duration;

use bytes::Bytes;
use futures_util::{Sink, Stream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

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
/// messages are a few hundred bytes, and the library reserves room for a whole message once its
/// header is read, so a larger message is still one read: this only bounds how many small
/// messages one read takes in (4 KiB was 13% of a connected peer's bytes).
pub const RECOMMENDED_READ_BUFFER_SIZE: usize = 2 * 1024;
/// Largest binary message we send: a longer write goes out as several messages (boundaries carry
/// no meaning). The library keeps its send buffer at the largest message it ever sent, so this
/// bounds what a burst (a 128 KiB yamux batch) leaves behind in every session.
pub const MAX_OUTBOUND_MESSAGE: usize = 16 * 1024;
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

/// A message to send, library-independent.
enum Out {
    Binary(Bytes),
    Ping(Bytes),
    Close(u16, String),
}

/// The socket as the core sees it: one object for both directions, errors as text.
trait Transport: Send {
    fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<WsFrame, String>>>;
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), String>>;
    fn start_send(&mut self, out: Out) -> Result<(), String>;
    fn poll_flush(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), String>>;
    fn poll_close(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), String>>;
}

struct Adapter<S, M> {
    ws: S,
    _m: PhantomData<fn() -> M>,
}

impl<S, M, E> Transport for Adapter<S, M>
where
    S: Stream<Item = Result<M, E>> + Sink<M, Error = E> + Send + Unpin,
    M: WsMessage,
    E: std::fmt::Display,
{
    fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<WsFrame, String>>> {
        Pin::new(&mut self.ws)
            .poll_next(cx)
            .map(|o| o.map(|r| r.map(M::classify).map_err(|e| e.to_string())))
    }
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), String>> {
        Pin::new(&mut self.ws)
            .poll_ready(cx)
            .map_err(|e| e.to_string())
    }
    fn start_send(&mut self, out: Out) -> Result<(), String> {
        let msg = match out {
            Out::Binary(b) => M::binary(b),
            Out::Ping(p) => M::ping(p),
            Out::Close(code, reason) => M::close(code, &reason),
        };
        Pin::new(&mut self.ws)
            .start_send(msg)
            .map_err(|e| e.to_string())
    }
    fn poll_flush(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), String>> {
        Pin::new(&mut self.ws)
            .poll_flush(cx)
            .map_err(|e| e.to_string())
    }
    fn poll_close(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), String>> {
        Pin::new(&mut self.ws)
            .poll_close(cx)
            .map_err(|e| e.to_string())
    }
}

/// What replaces the socket once the stream is over: the connection itself is released then,
/// not when the last handle goes.
struct Gone;

impl Transport for Gone {
    fn poll_next(&mut self, _cx: &mut Context<'_>) -> Poll<Option<Result<WsFrame, String>>> {
        Poll::Ready(None)
    }
    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), String>> {
        Poll::Ready(Err("websocket ended".into()))
    }
    fn start_send(&mut self, _out: Out) -> Result<(), String> {
        Err("websocket ended".into())
    }
    fn poll_flush(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), String>> {
        Poll::Ready(Ok(()))
    }
    fn poll_close(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), String>> {
        Poll::Ready(Ok(()))
    }
}

/// Every task currently waiting on the socket (reader, writer, close waiters). Inner polls get a
/// waker that wakes all of them, so whichever caller polled last never steals another's wake-up.
#[derive(Default)]
struct Wakers(Mutex<Vec<Waker>>);

impl Wakers {
    fn register(&self, w: &Waker) {
        let mut list = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if !list.iter().any(|x| x.will_wake(w)) {
            list.push(w.clone());
        }
    }
}

impl Wake for Wakers {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }
    fn wake_by_ref(self: &Arc<Self>) {
        let list = std::mem::take(&mut *self.0.lock().unwrap_or_else(|e| e.into_inner()));
        for w in list {
            w.wake();
        }
    }
}

/// Where the close handshake is. Every phase but `Open` and `Done` has a deadline.
#[derive(Debug)]
enum Phase {
    Open,
    /// Our close frame must be queued.
    SendClose {
        code: u16,
        reason: String,
        peer_dead: bool,
        deadline: Instant,
    },
    /// Our close frame is queued; flush it.
    FlushClose {
        peer_dead: bool,
        deadline: Instant,
    },
    /// Wait (bounded) for the peer's close reply so the handshake completes cleanly.
    AwaitReply {
        deadline: Instant,
    },
    /// The peer closed; keep polling until the library has sent its reply.
    PeerClosing {
        deadline: Instant,
    },
    /// Close the transport.
    Shutdown {
        deadline: Instant,
    },
    Done,
}

struct Core {
    ws: Box<dyn Transport>,
    ping_every: Option<Duration>,
    ping_timeout: Duration,
    inactivity: Option<Duration>,
    write_timeout: Duration,
    close_grace: Duration,
    metrics: MetricsRef,
    /// Received bytes not yet read.
    cur: Bytes,
    read_eof: bool,
    /// A text message arrived: reads fail from now on.
    read_failed: bool,
    end: Option<WsEnd>,
    phase: Phase,
    /// A written message is not yet flushed.
    needs_flush: bool,
    /// A write or flush is blocked; it must finish by then.
    write_stall: Option<Instant>,
    next_ping: Option<Instant>,
    ping_due: bool,
    pong_deadline: Option<Instant>,
    awaiting_pong: bool,
    last_pong: Instant,
    next_check: Option<Instant>,
    ping_counter: u64,
    /// Pong payload we are waiting for (0 = none).
    expect_pong: u64,
    /// [`WsIo`] shut down or dropped: close 1000 at this time unless a handle chose a code.
    default_close_at: Option<Instant>,
    write_shut: bool,
    handles: usize,
    sleep: Pin<Box<Sleep>>,
    sleep_at: Option<Instant>,
}

fn transport_err(e: &str) -> io::Error {
    io::Error::new(io::ErrorKind::BrokenPipe, format!("websocket: {e}"))
}

impl Core {
    fn set_end(&mut self, end: WsEnd) {
        if self.end.is_none() {
            self.end = Some(end);
        }
    }

    fn end(&self) -> WsEnd {
        self.end
            .clone()
            .unwrap_or_else(|| WsEnd::Transport("websocket ended".into()))
    }

    /// The stream is over: release the connection and its buffers.
    fn finish(&mut self) {
        self.phase = Phase::Done;
        self.read_eof = true;
        self.needs_flush = false;
        self.ws = Box::new(Gone);
    }

    fn is_done(&self) -> bool {
        matches!(self.phase, Phase::Done)
    }

    /// Starts our close handshake (only from `Open`; later requests are no-ops).
    fn request_close(&mut self, code: u16, reason: String, peer_dead: bool) {
        if !matches!(self.phase, Phase::Open) {
            return;
        }
        self.set_end(WsEnd::ClosedByUs {
            code,
            reason: reason.clone(),
        });
        self.read_eof = true;
        self.ping_due = false;
        self.phase = Phase::SendClose {
            code,
            reason: truncate_reason(&reason).to_string(),
            peer_dead,
            deadline: Instant::now() + self.write_timeout,
        };
    }

    /// The socket is gone or stuck: close the transport (bounded) and stop.
    fn fail(&mut self, end: WsEnd) {
        self.set_end(end);
        self.read_eof = true;
        if !matches!(self.phase, Phase::Shutdown { .. } | Phase::Done) {
            self.phase = Phase::Shutdown {
                deadline: Instant::now() + self.write_timeout,
            };
        }
    }

    fn liveness_failed(&mut self) {
        count(&self.metrics, |m| &m.ws_liveness_failures);
        self.set_end(WsEnd::LivenessFailed);
        self.request_close(CLOSE_GOING_AWAY, LIVENESS_FAILED_REASON.into(), true);
    }

    fn ping_outstanding(&self) -> bool {
        self.pong_deadline.is_some() || self.awaiting_pong || self.ping_due
    }

    fn check_timers(&mut self, now: Instant) {
        if matches!(self.phase, Phase::Open) {
            if self.pong_deadline.is_some_and(|d| now >= d) {
                tracing::info!("websocket: ping not answered in time; closing 1001");
                self.pong_deadline = None;
                self.liveness_failed();
                return;
            }
            if let (Some(at), Some(limit)) = (self.next_check, self.inactivity) {
                if now >= at {
                    if self.last_pong.elapsed() > limit {
                        tracing::info!(
                            "websocket: no pong within the inactivity timeout; closing 1001"
                        );
                        self.next_check = None;
                        self.liveness_failed();
                        return;
                    }
                    self.next_check =
                        Some(now + self.ping_every.unwrap_or(Duration::from_secs(15)));
                }
            }
            if self.write_stall.is_some_and(|d| now >= d) {
                self.write_stall = None;
                count(&self.metrics, |m| &m.ws_write_timeouts);
                self.fail(WsEnd::Transport("websocket write timed out".into()));
                return;
            }
            if !self.ping_outstanding() && self.next_ping.is_some_and(|d| now >= d) {
                self.ping_due = true;
            }
            if self.default_close_at.is_some_and(|d| now >= d) {
                self.default_close_at = None;
                self.request_close(CLOSE_NORMAL, String::new(), false);
            }
        }
        let expired = match &self.phase {
            Phase::SendClose { deadline, .. }
            | Phase::FlushClose { deadline, .. }
            | Phase::AwaitReply { deadline }
            | Phase::PeerClosing { deadline } => now >= *deadline,
            Phase::Shutdown { deadline } => {
                if now >= *deadline {
                    self.finish();
                }
                false
            }
            Phase::Open | Phase::Done => false,
        };
        if expired {
            self.phase = Phase::Shutdown {
                deadline: now + self.write_timeout,
            };
        }
    }

    fn next_deadline(&self) -> Option<Instant> {
        let mut at: Option<Instant> = None;
        let mut take = |d: Option<Instant>| {
            if let Some(d) = d {
                at = Some(at.map_or(d, |a| a.min(d)));
            }
        };
        match &self.phase {
            Phase::Open => {
                take(self.pong_deadline);
                take(self.next_check.filter(|_| self.inactivity.is_some()));
                take(self.write_stall);
                take(self.default_close_at);
                if !self.ping_outstanding() {
                    take(self.next_ping);
                }
            }
            Phase::SendClose { deadline, .. }
            | Phase::FlushClose { deadline, .. }
            | Phase::AwaitReply { deadline }
            | Phase::PeerClosing { deadline }
            | Phase::Shutdown { deadline } => take(Some(*deadline)),
            Phase::Done => {}
        }
        at
    }

    fn stall(&mut self) {
        if self.write_stall.is_none() {
            self.write_stall = Some(Instant::now() + self.write_timeout);
        }
    }

    /// Flushes the message in flight. Ready(Ok) once nothing is pending.
    fn flush(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), String>> {
        if !self.needs_flush {
            return Poll::Ready(Ok(()));
        }
        match self.ws.poll_flush(cx) {
            Poll::Pending => {
                self.stall();
                Poll::Pending
            }
            Poll::Ready(Ok(())) => {
                self.needs_flush = false;
                self.write_stall = None;
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => {
                self.fail(WsEnd::Transport(e.clone()));
                Poll::Ready(Err(e))
            }
        }
    }

    /// Queues one message once the message in flight is flushed.
    fn send(&mut self, cx: &mut Context<'_>, out: Out) -> Poll<Result<(), String>> {
        if self.flush(cx)?.is_pending() {
            return Poll::Pending;
        }
        match self.ws.poll_ready(cx) {
            Poll::Pending => {
                self.stall();
                return Poll::Pending;
            }
            Poll::Ready(Err(e)) => {
                self.fail(WsEnd::Transport(e.clone()));
                return Poll::Ready(Err(e));
            }
            Poll::Ready(Ok(())) => {}
        }
        if let Err(e) = self.ws.start_send(out) {
            self.fail(WsEnd::Transport(e.clone()));
            return Poll::Ready(Err(e));
        }
        self.needs_flush = true;
        self.write_stall = None;
        // Push it out now; what is left is flushed by the next poll of any kind.
        let _ = self.flush(cx);
        Poll::Ready(Ok(()))
    }

    fn send_ping(&mut self, cx: &mut Context<'_>) {
        if !self.ping_due || !matches!(self.phase, Phase::Open) {
            return;
        }
        let counter = self.ping_counter + 1;
        let payload = Bytes::from(counter.to_string());
        if let Poll::Ready(Ok(())) = self.send(cx, Out::Ping(payload)) {
            self.ping_due = false;
            self.ping_counter = counter;
            self.expect_pong = counter;
            let now = Instant::now();
            if self.inactivity.is_some() {
                self.awaiting_pong = true;
            } else {
                self.pong_deadline = Some(now + self.ping_timeout);
            }
            self.next_ping = self.ping_every.map(|d| now + d);
        }
    }

    /// Reads and drops what arrives until the library reports the end of the stream.
    fn drain_to_end(&mut self, cx: &mut Context<'_>) -> bool {
        loop {
            match self.ws.poll_next(cx) {
                Poll::Pending => return false,
                Poll::Ready(None | Some(Err(_))) => return true,
                Poll::Ready(Some(Ok(WsFrame::Close(_)))) => {}
                Poll::Ready(Some(Ok(_))) => {}
            }
        }
    }

    fn progress_close(&mut self, cx: &mut Context<'_>) {
        loop {
            let now = Instant::now();
            match std::mem::replace(&mut self.phase, Phase::Done) {
                Phase::Open => {
                    self.phase = Phase::Open;
                    return;
                }
                Phase::Done => return,
                Phase::SendClose {
                    code,
                    reason,
                    peer_dead,
                    deadline,
                } => {
                    // The message in flight first, then the close frame.
                    self.phase = Phase::SendClose {
                        code,
                        reason: reason.clone(),
                        peer_dead,
                        deadline,
                    };
                    let ready = match self.ws_flush_then_ready(cx) {
                        Poll::Pending => return,
                        Poll::Ready(r) => r,
                    };
                    self.phase =
                        match ready.and_then(|()| self.ws.start_send(Out::Close(code, reason))) {
                            Ok(()) => Phase::FlushClose {
                                peer_dead,
                                deadline,
                            },
                            Err(_) => Phase::Shutdown {
                                deadline: now + self.write_timeout,
                            },
                        };
                }
                Phase::FlushClose {
                    peer_dead,
                    deadline,
                } => match self.ws.poll_flush(cx) {
                    Poll::Pending => {
                        self.phase = Phase::FlushClose {
                            peer_dead,
                            deadline,
                        };
                        return;
                    }
                    Poll::Ready(Ok(())) if !peer_dead => {
                        self.phase = Phase::AwaitReply {
                            deadline: now + self.close_grace,
                        };
                    }
                    Poll::Ready(_) => {
                        self.phase = Phase::Shutdown {
                            deadline: now + self.write_timeout,
                        };
                    }
                },
                phase @ (Phase::AwaitReply { .. } | Phase::PeerClosing { .. }) => {
                    if !self.drain_to_end(cx) {
                        self.phase = phase;
                        return;
                    }
                    self.phase = Phase::Shutdown {
                        deadline: now + self.write_timeout,
                    };
                }
                Phase::Shutdown { deadline } => match self.ws.poll_close(cx) {
                    Poll::Pending => {
                        self.phase = Phase::Shutdown { deadline };
                        return;
                    }
                    Poll::Ready(_) => self.finish(),
                },
            }
        }
    }

    /// Flushes the message in flight, then waits until the sink takes another.
    fn ws_flush_then_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), String>> {
        if self.needs_flush {
            match self.ws.poll_flush(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Ok(())) => self.needs_flush = false,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
            }
        }
        self.ws.poll_ready(cx)
    }

    /// Runs timers, a due ping, the close handshake and a pending flush; arms the timer at the
    /// earliest deadline. `cx` carries the combined waker.
    fn drive(&mut self, cx: &mut Context<'_>) {
        for _ in 0..16 {
            self.check_timers(Instant::now());
            self.send_ping(cx);
            self.progress_close(cx);
            if matches!(self.phase, Phase::Open) && self.needs_flush {
                let _ = self.flush(cx);
            }
            let Some(at) = self.next_deadline() else {
                return;
            };
            if self.sleep_at != Some(at) {
                self.sleep.as_mut().reset(at);
                self.sleep_at = Some(at);
            }
            if self.sleep.as_mut().poll(cx).is_pending() {
                return;
            }
        }
    }

    /// One received message while open.
    fn on_frame(&mut self, frame: WsFrame) {
        match frame {
            WsFrame::Binary(b) => self.cur = b,
            WsFrame::Text => {
                count(&self.metrics, |m| &m.ws_text_messages);
                tracing::debug!("websocket: text message on a binary byte stream; closing 1003");
                self.set_end(WsEnd::TextMessage);
                self.read_failed = true;
                self.request_close(
                    CLOSE_UNSUPPORTED_DATA,
                    "unexpected frame type read (expected MessageBinary): MessageText".into(),
                    false,
                );
            }
            WsFrame::Ping | WsFrame::Other => {}
            WsFrame::Pong(p) => {
                if self.expect_pong != 0 && p.as_ref() == self.expect_pong.to_string().as_bytes() {
                    self.expect_pong = 0;
                    self.pong_deadline = None;
                    self.awaiting_pong = false;
                    self.last_pong = Instant::now();
                }
            }
            WsFrame::Close(frame) => {
                let (code, reason) = match frame {
                    Some((c, r)) => (Some(c), r),
                    None => (None, String::new()),
                };
                self.set_end(WsEnd::ClosedByPeer { code, reason });
                self.read_eof = true;
                if matches!(self.phase, Phase::Open) {
                    self.phase = Phase::PeerClosing {
                        deadline: Instant::now() + self.close_grace,
                    };
                }
            }
        }
    }

    fn poll_read(&mut self, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        loop {
            self.drive(cx);
            if !self.cur.is_empty() {
                let n = self.cur.len().min(buf.remaining());
                let chunk = self.cur.split_to(n);
                buf.put_slice(&chunk);
                return Poll::Ready(Ok(()));
            }
            if self.read_failed {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "websocket: text message on a binary stream",
                )));
            }
            if self.read_eof {
                return Poll::Ready(Ok(()));
            }
            match self.ws.poll_next(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(None) => self.fail(WsEnd::Transport("connection closed".into())),
                Poll::Ready(Some(Err(e))) => self.fail(WsEnd::Transport(e)),
                Poll::Ready(Some(Ok(frame))) => self.on_frame(frame),
            }
        }
    }

    /// The [`WsIo`] will write no more: close 1000 now if no handle can choose a code, else
    /// after `close_grace` unless a handle does.
    fn shutdown_write(&mut self) {
        if self.write_shut {
            return;
        }
        self.write_shut = true;
        if self.handles == 0 {
            self.request_close(CLOSE_NORMAL, String::new(), false);
        } else if matches!(self.phase, Phase::Open) {
            self.default_close_at = Some(Instant::now() + self.close_grace);
        }
    }
}

/// The state shared by a [`WsIo`] and its handles.
struct Shared {
    core: Mutex<Core>,
    wakers: Arc<Wakers>,
    /// Wakes every task in `wakers`; given to every inner poll.
    waker: Waker,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Core> {
        self.core.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers the caller, locks, and gives `f` the core and a context with the combined waker.
    fn with<R>(&self, cx: &mut Context<'_>, f: impl FnOnce(&mut Core, &mut Context<'_>) -> R) -> R {
        self.wakers.register(cx.waker());
        let mut inner = Context::from_waker(&self.waker);
        let mut core = self.lock();
        let before = (std::mem::discriminant(&core.phase), core.read_eof);
        let r = f(&mut core, &mut inner);
        let after = (std::mem::discriminant(&core.phase), core.read_eof);
        drop(core);
        if before != after {
            // Others waiting for the end (or for data) must see the change.
            self.waker.wake_by_ref();
        }
        r
    }

    /// The byte stream and every handle are gone before the close handshake finished, so nobody
    /// is left to drive it: one small task finishes it (the close already requested, or 1000
    /// after `close_grace`), bounded by `close_grace` and `write_timeout` per phase, and ends with
    /// the socket. While a handle remains, its owner drives the close ([`WsHandle::close`] or
    /// [`WsHandle::ended`]) in its own task and nothing is spawned: a coordinator session always
    /// does.
    fn finish_close_unattended(self: &Arc<Self>) {
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            let shared = self.clone();
            rt.spawn(async move {
                std::future::poll_fn(|cx| shared.poll_done(cx)).await;
            });
        }
    }

    fn poll_done(&self, cx: &mut Context<'_>) -> Poll<WsEnd> {
        self.with(cx, |core, icx| {
            core.drive(icx);
            if core.is_done() {
                Poll::Ready(core.end())
            } else {
                Poll::Pending
            }
        })
    }
}

/// Control handle for a [`WsIo`]: choose the close code, observe the end.
pub struct WsHandle {
    shared: Arc<Shared>,
}

impl Clone for WsHandle {
    fn clone(&self) -> Self {
        self.shared.lock().handles += 1;
        WsHandle {
            shared: self.shared.clone(),
        }
    }
}

impl Drop for WsHandle {
    fn drop(&mut self) {
        let mut core = self.shared.lock();
        core.handles = core.handles.saturating_sub(1);
        if core.handles == 0 && core.write_shut {
            core.request_close(CLOSE_NORMAL, String::new(), false);
            let unattended = !core.is_done();
            drop(core);
            self.shared.waker.wake_by_ref();
            if unattended {
                self.shared.finish_close_unattended();
            }
        }
    }
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
        self.shared
            .lock()
            .request_close(code, reason.to_string(), false);
        self.shared.waker.wake_by_ref();
        self.ended().await
    }

    /// Waits until the WebSocket has finished and returns how it ended. Drives the socket's
    /// timers and close handshake while waiting.
    pub async fn ended(&self) -> WsEnd {
        std::future::poll_fn(|cx| self.shared.poll_done(cx)).await
    }

    /// Whether the WebSocket has fully ended.
    pub fn is_ended(&self) -> bool {
        self.shared.lock().is_done()
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
/// binary message of at most [`MAX_OUTBOUND_MESSAGE`] bytes. EOF when the peer closes; a text message is an `InvalidData` error.
pub struct WsIo {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for WsIo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WsIo")
            .field("buffered", &self.shared.lock().cur.len())
            .finish()
    }
}

impl WsIo {
    /// Wraps `ws` (axum `WebSocket` or tokio-tungstenite `WebSocketStream`). Spawns nothing; must
    /// be called inside a tokio runtime (its timer).
    pub fn new<S, M, E>(ws: S, config: WsConfig) -> (WsIo, WsHandle)
    where
        S: Stream<Item = Result<M, E>> + Sink<M, Error = E> + Send + Unpin + 'static,
        M: WsMessage,
        E: std::fmt::Display + Send + 'static,
    {
        let now = Instant::now();
        let ping_every = config.ping_interval.filter(|d| !d.is_zero());
        let inactivity = config.inactivity_timeout.filter(|_| ping_every.is_some());
        let next_ping = ping_every.map(|d| now + d);
        let core = Core {
            ws: Box::new(Adapter {
                ws,
                _m: PhantomData,
            }),
            ping_every,
            ping_timeout: config.ping_timeout,
            inactivity,
            write_timeout: config.write_timeout,
            close_grace: config.close_grace,
            metrics: config.metrics,
            cur: Bytes::new(),
            read_eof: false,
            read_failed: false,
            end: None,
            phase: Phase::Open,
            needs_flush: false,
            write_stall: None,
            next_ping,
            ping_due: false,
            pong_deadline: None,
            awaiting_pong: false,
            last_pong: now,
            next_check: inactivity.and(next_ping),
            ping_counter: 0,
            expect_pong: 0,
            default_close_at: None,
            write_shut: false,
            handles: 1,
            sleep: Box::pin(tokio::time::sleep_until(
                now + Duration::from_secs(86400 * 365),
            )),
            sleep_at: None,
        };
        let wakers = Arc::new(Wakers::default());
        let shared = Arc::new(Shared {
            core: Mutex::new(core),
            waker: Waker::from(wakers.clone()),
            wakers,
        });
        (
            WsIo {
                shared: shared.clone(),
            },
            WsHandle { shared },
        )
    }
}

impl Drop for WsIo {
    fn drop(&mut self) {
        let unattended = {
            let mut core = self.shared.lock();
            core.shutdown_write();
            !core.is_done() && core.handles == 0
        };
        self.shared.waker.wake_by_ref();
        if unattended {
            self.shared.finish_close_unattended();
        }
    }
}

impl AsyncRead for WsIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.shared.with(cx, |core, icx| core.poll_read(icx, buf))
    }
}

impl AsyncWrite for WsIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        self.shared.with(cx, |core, icx| {
            core.drive(icx);
            if core.write_shut || !matches!(core.phase, Phase::Open) {
                return Poll::Ready(Err(transport_err("closed")));
            }
            let buf = &buf[..buf.len().min(MAX_OUTBOUND_MESSAGE)];
            match core.send(icx, Out::Binary(Bytes::copy_from_slice(buf))) {
                Poll::Pending => Poll::Pending,
                Poll::Ready(Ok(())) => Poll::Ready(Ok(buf.len())),
                Poll::Ready(Err(e)) => Poll::Ready(Err(transport_err(&e))),
            }
        })
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.shared.with(cx, |core, icx| {
            core.drive(icx);
            if !matches!(core.phase, Phase::Open) {
                return Poll::Ready(Ok(()));
            }
            core.flush(icx).map_err(|e| transport_err(&e))
        })
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.shared.with(cx, |core, icx| {
            core.shutdown_write();
            core.drive(icx);
        });
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

    use futures_util::{SinkExt, StreamExt};
    use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
    use tokio_tungstenite::tungstenite::protocol::Role;
    use tokio_tungstenite::tungstenite::Message;
    use tokio_tungstenite::WebSocketStream;

    async fn pair(buf: usize, config: WsConfig) -> (WsIo, WsHandle, WebSocketStream<DuplexStream>) {
        let (a, b) = tokio::io::duplex(buf);
        let server = WebSocketStream::from_raw_socket(a, Role::Server, None).await;
        let peer = WebSocketStream::from_raw_socket(b, Role::Client, None).await;
        let (io, handle) = WsIo::new(server, config);
        (io, handle, peer)
    }

    fn quick() -> WsConfig {
        WsConfig {
            ping_interval: None,
            write_timeout: Duration::from_millis(200),
            close_grace: Duration::from_millis(200),
            ..WsConfig::server()
        }
    }

    async fn next_close(peer: &mut WebSocketStream<DuplexStream>) -> Option<(u16, String)> {
        while let Some(m) = peer.next().await {
            if let Ok(Message::Close(f)) = m {
                return f.map(|f| (u16::from(f.code), f.reason.to_string()));
            }
        }
        None
    }

    #[tokio::test]
    async fn bytes_both_ways_and_pings_answered() {
        let (mut io, _h, mut peer) = pair(1 << 16, quick()).await;
        peer.send(Message::binary(&b"hel"[..])).await.unwrap();
        peer.send(Message::Ping(Bytes::from_static(b"p")))
            .await
            .unwrap();
        peer.send(Message::binary(&b"lo"[..])).await.unwrap();
        let mut got = [0u8; 5];
        io.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"hello");
        io.write_all(b"abc").await.unwrap();
        io.flush().await.unwrap();
        assert_eq!(
            peer.next().await.unwrap().unwrap(),
            Message::Pong(Bytes::from_static(b"p"))
        );
        assert_eq!(
            peer.next().await.unwrap().unwrap(),
            Message::binary(&b"abc"[..])
        );
    }

    /// A long write goes out as several messages of at most `MAX_OUTBOUND_MESSAGE` bytes.
    #[tokio::test]
    async fn long_writes_are_split() {
        let (mut io, _h, mut peer) = pair(1 << 20, quick()).await;
        let data: Vec<u8> = (0..40_000u32).map(|i| i as u8).collect();
        io.write_all(&data).await.unwrap();
        io.flush().await.unwrap();
        let mut got = Vec::new();
        let mut messages = 0;
        while got.len() < data.len() {
            match peer.next().await.unwrap().unwrap() {
                Message::Binary(b) => {
                    assert!(b.len() <= MAX_OUTBOUND_MESSAGE, "{} bytes", b.len());
                    messages += 1;
                    got.extend_from_slice(&b);
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!(got, data);
        assert_eq!(messages, 3);
    }

    /// A peer that never reads: the blocked write ends the stream after `write_timeout`.
    #[tokio::test]
    async fn blocked_write_times_out() {
        let metrics = Arc::new(super::super::RpcMetrics::new().unwrap());
        let cfg = WsConfig {
            metrics: Some(metrics.clone()),
            ..quick()
        };
        let (mut io, h, _peer) = pair(256, cfg).await;
        let chunk = vec![7u8; 1024];
        let err = tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                if let Err(e) = io.write_all(&chunk).await {
                    break e;
                }
            }
        })
        .await
        .expect("write fails in time");
        assert_eq!(err.kind(), io::ErrorKind::BrokenPipe);
        let end = tokio::time::timeout(Duration::from_secs(5), h.ended())
            .await
            .unwrap();
        assert_eq!(end, WsEnd::Transport("websocket write timed out".into()));
        assert_eq!(metrics.ws_write_timeouts.get(), 1);
    }

    /// The byte stream is dropped while its handle stays: nothing is spawned, the handle's owner
    /// drives the close (1000 after `close_grace`); with no handle left, a closer task closes at
    /// once.
    #[tokio::test]
    async fn dropped_stream_closes_normally() {
        let metrics = tokio::runtime::Handle::current().metrics();
        let (io, h, mut peer) = pair(1 << 16, quick()).await;
        let tasks = metrics.num_alive_tasks();
        let t0 = Instant::now();
        drop(io);
        assert_eq!(
            metrics.num_alive_tasks(),
            tasks,
            "no task while a handle remains"
        );
        let (close, end) = tokio::time::timeout(
            Duration::from_secs(5),
            futures_util::future::join(next_close(&mut peer), h.ended()),
        )
        .await
        .unwrap();
        assert_eq!(close, Some((CLOSE_NORMAL, String::new())));
        assert!(t0.elapsed() >= Duration::from_millis(200));
        assert_eq!(
            end,
            WsEnd::ClosedByUs {
                code: CLOSE_NORMAL,
                reason: String::new()
            }
        );

        let (io, h, mut peer) = pair(1 << 16, quick()).await;
        drop(h);
        let t0 = Instant::now();
        drop(io);
        assert_eq!(
            next_close(&mut peer).await,
            Some((CLOSE_NORMAL, String::new()))
        );
        assert!(t0.elapsed() < Duration::from_millis(200));

        // The handle's owner gives up without closing: the last handle's drop leaves a closer.
        let (io, h, mut peer) = pair(1 << 16, quick()).await;
        drop(io);
        let t0 = Instant::now();
        drop(h);
        assert_eq!(
            next_close(&mut peer).await,
            Some((CLOSE_NORMAL, String::new()))
        );
        assert!(t0.elapsed() < Duration::from_millis(200));
    }

    /// The peer's close ends the byte stream and the handshake completes without a handle.
    #[tokio::test]
    async fn peer_close_is_eof() {
        let (mut io, h, mut peer) = pair(1 << 16, quick()).await;
        peer.send(Message::binary(&b"z"[..])).await.unwrap();
        peer.close(None).await.unwrap();
        let mut v = Vec::new();
        io.read_to_end(&mut v).await.unwrap();
        assert_eq!(v, b"z");
        let end = tokio::time::timeout(Duration::from_secs(5), h.ended())
            .await
            .unwrap();
        assert_eq!(
            end,
            WsEnd::ClosedByPeer {
                code: None,
                reason: String::new()
            }
        );
        // Our close reply went out and the connection is released once the stream has ended,
        // whether or not handles remain: the peer's side completes.
        tokio::time::timeout(Duration::from_secs(2), async {
            while let Some(Ok(_)) = peer.next().await {}
        })
        .await
        .expect("connection released");
    }

    /// coderd's agent rule: a ping every interval, at most one outstanding; closed 1001 once
    /// the last pong is older than the inactivity timeout, kept while pongs arrive.
    #[tokio::test]
    async fn inactivity_rule() {
        let cfg = WsConfig {
            ping_interval: Some(Duration::from_millis(50)),
            ping_timeout: Duration::from_millis(20),
            inactivity_timeout: Some(Duration::from_millis(300)),
            ..quick()
        };
        // A peer that answers (tungstenite answers pings while it reads).
        let (mut io, h, mut peer) = pair(1 << 16, cfg.clone()).await;
        let reader = tokio::spawn(async move {
            let mut pings = 0;
            while let Some(Ok(m)) = peer.next().await {
                if matches!(m, Message::Ping(_)) {
                    pings += 1;
                }
            }
            pings
        });
        let mut b = [0u8; 1];
        let r = tokio::time::timeout(Duration::from_millis(700), io.read(&mut b)).await;
        assert!(r.is_err(), "still open: {r:?}");
        assert!(!h.is_ended());
        drop((io, h));
        assert!(reader.await.unwrap() >= 5, "a ping every 50 ms");

        // A peer that never reads: one ping outstanding, then 1001 after the timeout (not
        // after `ping_timeout`, which this rule ignores).
        // The peer end is read raw (server frames are unmasked), so nothing answers the pings.
        let (a, mut raw) = tokio::io::duplex(1 << 16);
        let server = WebSocketStream::from_raw_socket(a, Role::Server, None).await;
        let (mut io, h) = WsIo::new(server, cfg);
        let t0 = Instant::now();
        let mut b = [0u8; 1];
        assert_eq!(
            io.read(&mut b).await.unwrap(),
            0,
            "EOF at once when the peer is dead"
        );
        let end = h.ended().await;
        assert_eq!(end, WsEnd::LivenessFailed);
        assert!(
            t0.elapsed() >= Duration::from_millis(300),
            "{:?}",
            t0.elapsed()
        );
        let mut sent = Vec::new();
        raw.read_to_end(&mut sent).await.unwrap();
        let (mut pings, mut close, mut at) = (0, None, 0);
        while at + 2 <= sent.len() {
            let (op, len) = (sent[at] & 0x0f, usize::from(sent[at + 1] & 0x7f));
            let payload = &sent[at + 2..at + 2 + len];
            match op {
                0x9 => pings += 1,
                0x8 => close = Some(u16::from_be_bytes([payload[0], payload[1]])),
                other => panic!("unexpected opcode {other}"),
            }
            at += 2 + len;
        }
        assert_eq!(pings, 1, "at most one outstanding");
        assert_eq!(close, Some(CLOSE_GOING_AWAY));
    }
}
