//! A yamux session compatible with hashicorp/yamux v0.1.2 (the multiplexer every Coder agent and
//! client runs over its WebSocket), with the exact defaults Coder relies on.
//!
//! Why our own and not the `yamux` crate (rust-yamux 0.14): rust-yamux is wire-compatible but not
//! behaviour-compatible with hashicorp's `DefaultConfig`: it sends no keepalive pings on idle
//! sessions (pings only measure RTT), so a dead peer is never detected the way Go detects it
//! (ping every 30 s, 10 s to answer, else the session dies); it auto-tunes stream windows far past
//! 256 KiB (more memory per stream than we want to promise); it has no per-frame write timeout
//! (Go kills a session whose frame write blocks for 10 s); and it is driven by polling a
//! `Connection` rather than by tasks with bounded queues. Matching Go's observable behaviour is
//! the requirement, so the session below implements the spec directly (reader, writer,
//! keepalive loop, per-stream bounded buffers).
//!
//! Shape: one driver future running three futures, spawned as the session's task by
//! [`Session::server`] / [`Session::client`], or handed to the caller to poll in its own task by
//! [`Session::client_driven`]:
//! a reader (parses 12-byte headers with `proto::yamux`, routes frames, enforces windows), a
//! writer (the only code that writes to the transport; batches frames and fails the session if a
//! write blocks past `connection_write_timeout`), and a keepalive loop. Timers (a stream's open
//! and close deadlines) run as helper tasks the session tracks: they stop when the session ends,
//! and the driver waits for them before it reports the session closed. Streams ([`Stream`]) are
//! `AsyncRead + AsyncWrite` handles over per-stream state kept under a short `std` mutex.
//!
//! Files by role: `mod.rs` the configuration, errors and the session state the others share
//! (`Inner`, per-stream `StreamState`); `session.rs` the owner and handles; `reader.rs`,
//! `writer.rs`, `keepalive.rs` the three parts of the driver; `stream.rs` the stream handles.
//!
//! Invariants this module must never break:
//! - Memory is bounded: a stream buffers at most its receive window (256 KiB); a peer sending
//!   more gets GoAway(protocol error) and the session ends (that session only); the accept queue,
//!   the writer queues and the outstanding-ping table are bounded; the number of streams is capped.
//! - Session-wide, what the peer made us hold and nobody has read yet (stream receive buffers,
//!   plus what the layer above charges through [`HeldBytes`]: partial dRPC packets, messages not
//!   yet taken) is at most `max_buffered_bytes`; one byte more ends the session like any protocol
//!   violation (GoAway(protocol error), as hashicorp ends a session on a window violation).
//! - No lock is held across `.await`; stream locks are never taken while the session map lock is
//!   held in the other order (map lock first, then stream lock, never the reverse).
//! - Control frames (ACK, window updates, ping replies, GoAway) never queue behind stream data: the
//!   writer drains them first, and an inbound stream is ACKed before the application sees it, so
//!   the ACK always precedes any data we send on it.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use proto::yamux::{
    Flags, Header, HeaderError, Type, GO_AWAY_INTERNAL_ERROR, GO_AWAY_NORMAL,
    GO_AWAY_PROTOCOL_ERROR, HEADER_LEN, INITIAL_WINDOW,
};
use tokio::io::{
    AsyncBufRead, AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader,
    ReadBuf,
};
use tokio::sync::{oneshot, watch, Notify};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::{count, gauge_add, MetricsRef};

/// Largest payload we put in one data frame (Go sends up to the whole window; any size is valid).
const MAX_DATA_FRAME: usize = 64 * 1024;
/// The writer stops batching once a batch reaches this size.
const WRITE_BATCH: usize = 128 * 1024;
/// What the writer's batch buffer reserves when frames are queued; it grows towards
/// [`WRITE_BATCH`] only under load, and a writer with nothing to write holds no buffer.
const INITIAL_BATCH_CAPACITY: usize = 4 * 1024;
/// A batch buffer grown past this by a burst is given back once written (a backlog must not
/// leave every session holding its peak).
const KEEP_BATCH_CAPACITY: usize = 16 * 1024;
/// Control frames queued for the writer before a sender waits (see `Inner::send_ctrl`).
const CTRL_QUEUE: usize = 256;
/// The reader's buffer, held for the session's life. Small: the transport below (the WebSocket
/// byte stream) already holds the received message, so refilling it is a copy, not a system
/// call; a payload at least this large is read past it, straight into the frame's own buffer.
/// 2 KiB was 7% of a connected peer's bytes.
const READ_BUFFER: usize = 512;
/// Outstanding pings (keepalive + explicit [`SessionHandle::ping`]) per session.
const MAX_OUTSTANDING_PINGS: usize = 64;

/// Session settings. [`Config::default`] is hashicorp's `DefaultConfig()` as Coder uses it.
#[derive(Debug, Clone)]
pub struct Config {
    /// Inbound streams waiting for `accept` (hashicorp `AcceptBacklog`, 256). A SYN beyond this is
    /// answered with RST.
    pub accept_backlog: usize,
    /// Send keepalive pings (hashicorp `EnableKeepAlive`, true).
    pub enable_keepalive: bool,
    /// Keepalive ping period (30 s).
    pub keepalive_interval: Duration,
    /// A frame write blocked longer than this kills the session; also the deadline for a ping
    /// reply (hashicorp `ConnectionWriteTimeout`, 10 s).
    pub connection_write_timeout: Duration,
    /// Per-stream receive window (256 KiB; values below 256 KiB are raised to it, as the protocol
    /// fixes the initial window).
    pub max_stream_window: u32,
    /// An opened stream not ACKed within this time kills the session (75 s).
    pub stream_open_timeout: Duration,
    /// After we half-close, the peer has this long to close too before we reset (5 min).
    pub stream_close_timeout: Duration,
    /// Most concurrent streams; a SYN beyond this is answered with RST (not in hashicorp, which is
    /// unbounded; Coder peers use a handful).
    pub max_streams: usize,
    /// Depth of the queue of frames from streams to the writer.
    pub write_queue_depth: usize,
    /// Most bytes the session may hold buffered and unread across all its streams (receive
    /// buffers and [`HeldBytes`] charged by the layer above); more ends the session with
    /// GoAway(protocol error). Not in hashicorp (unbounded but for the windows): default
    /// `usize::MAX`; the coordinator's server sessions set it.
    pub max_buffered_bytes: usize,
    /// Where to count protocol errors, keepalive and write timeouts, refused streams.
    pub metrics: MetricsRef,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            accept_backlog: 256,
            enable_keepalive: true,
            keepalive_interval: Duration::from_secs(30),
            connection_write_timeout: Duration::from_secs(10),
            max_stream_window: INITIAL_WINDOW,
            stream_open_timeout: Duration::from_secs(75),
            stream_close_timeout: Duration::from_secs(300),
            max_streams: 1024,
            write_queue_depth: 64,
            max_buffered_bytes: usize::MAX,
            metrics: None,
        }
    }
}

/// Why a session ended (or why an operation on it failed).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SessionError {
    /// Closed locally ([`SessionHandle::close`] or the [`Session`] was dropped).
    #[error("yamux: session closed")]
    Closed,
    /// The transport reached EOF.
    #[error("yamux: remote end closed the connection")]
    Eof,
    /// The transport failed.
    #[error("yamux: i/o error: {0}")]
    Io(String),
    /// The peer violated the protocol; we sent GoAway(protocol error).
    #[error("yamux: protocol error: {0}")]
    Protocol(String),
    /// A keepalive ping went unanswered.
    #[error("yamux: keepalive timeout")]
    KeepAliveTimeout,
    /// A frame write blocked past `connection_write_timeout`.
    #[error("yamux: connection write timeout")]
    WriteTimeout,
    /// A stream we opened was not ACKed within `stream_open_timeout`.
    #[error("yamux: stream open timeout")]
    StreamOpenTimeout,
    /// The peer sent GoAway with an error code (1 protocol error, 2 internal error).
    #[error("yamux: remote sent go away with code {0}")]
    RemoteGoAway(u32),
    /// The peer sent a normal GoAway: no new streams.
    #[error("yamux: remote end is not accepting connections")]
    RemoteGoAwayNormal,
    /// Local GoAway sent: no new streams.
    #[error("yamux: session is going away")]
    LocalGoAway,
    /// Stream limit or id space exhausted.
    #[error("yamux: too many streams")]
    StreamsExhausted,
    /// A ping was not answered within `connection_write_timeout`.
    #[error("yamux: ping timeout")]
    PingTimeout,
    /// Too many pings outstanding on this session.
    #[error("yamux: too many outstanding pings")]
    TooManyPings,
}

impl SessionError {
    fn to_io(&self) -> io::Error {
        io::Error::new(io::ErrorKind::ConnectionAborted, self.to_string())
    }
}

/// A frame on its way to the writer.
struct OutFrame {
    header: Header,
    body: Bytes,
}

struct StreamInner {
    recv_buf: VecDeque<Bytes>,
    buffered: usize,
    /// Credit the peer still has (what it may send before our next window update).
    recv_window: u32,
    /// Credit we have towards the peer.
    send_window: u32,
    remote_closed: bool,
    local_closed: bool,
    reset: bool,
    acked: bool,
    detached: bool,
    removed: bool,
    wu_queued: bool,
    read_waker: Option<Waker>,
    write_waker: Option<Waker>,
}

struct StreamState {
    id: u32,
    st: Mutex<StreamInner>,
}

impl StreamState {
    fn new(id: u32, recv_window: u32, send_window: u32, acked: bool) -> Self {
        StreamState {
            id,
            st: Mutex::new(StreamInner {
                recv_buf: VecDeque::new(),
                buffered: 0,
                recv_window,
                send_window,
                remote_closed: false,
                local_closed: false,
                reset: false,
                acked,
                detached: false,
                removed: false,
                wu_queued: false,
                read_waker: None,
                write_waker: None,
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, StreamInner> {
        self.st.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn wake_all(g: &mut StreamInner) {
    if let Some(w) = g.read_waker.take() {
        w.wake();
    }
    if let Some(w) = g.write_waker.take() {
        w.wake();
    }
}

struct Inner {
    config: Config,
    client: bool,
    streams: Mutex<HashMap<u32, Arc<StreamState>>>,
    next_id: AtomicU32,
    /// Stream frames (data, SYN, FIN, RST) for the writer, at most `write_queue_depth`.
    data: DataQueue,
    /// Control frames (ACK, RST, GoAway, ping replies) for the writer, at most [`CTRL_QUEUE`]. A
    /// queue under a mutex rather than a channel: a channel allocates its shared state and a
    /// first block of slots for every session when it is made (about 900 bytes).
    ctrl: Mutex<VecDeque<Header>>,
    /// Room was made in `ctrl` (senders waiting for it).
    ctrl_room: Notify,
    wu_pending: Mutex<Vec<u32>>,
    /// Work for the writer: a control frame, a window update or a stream frame was queued.
    ctrl_notify: Notify,
    pings: Mutex<HashMap<u32, oneshot::Sender<()>>>,
    ping_id: AtomicU32,
    shutdown: CancellationToken,
    /// Mirrors `shutdown` for the hot paths: `CancellationToken::is_cancelled` takes a mutex, and
    /// the reader, writer and every stream poll ask on each frame.
    shut: AtomicBool,
    end: Mutex<Option<SessionError>>,
    remote_goaway: AtomicBool,
    local_goaway: AtomicBool,
    max_window: u32,
    /// Bytes held for this session, see [`Config::max_buffered_bytes`].
    buffered: AtomicUsize,
    /// Set by the first caller that found `buffered` over the limit (so it is counted once).
    over_buffer_limit: AtomicBool,
    /// The session's short-lived helper tasks (stream open and close timers, a FIN waiting for
    /// room in the write queue). Each ends when the session does; the driver waits for them
    /// before it reports the session closed, so none outlives its session.
    helpers: TaskTracker,
    /// Inbound streams waiting for `Session::accept`.
    accept: session::AcceptQueue,
}

impl Inner {
    /// Adds `n` to the session's held bytes (they stay charged until released, so the count
    /// stays exact). Returns whether the session is still within its limit; if not, the caller
    /// must call [`Inner::over_buffer_limit`] once it holds no stream lock.
    fn add_buffered(&self, n: usize) -> bool {
        if n == 0 {
            return true;
        }
        let now = self.buffered.fetch_add(n, Ordering::AcqRel) + n;
        gauge_add(
            &self.config.metrics,
            |m| &m.session_buffered_bytes,
            i64::try_from(n).unwrap_or(i64::MAX),
        );
        now <= self.config.max_buffered_bytes
    }

    /// Ends the session for holding more than `max_buffered_bytes` (once; counted, logged).
    /// Takes stream locks: never call it while holding one.
    fn over_buffer_limit(&self) {
        if self.over_buffer_limit.swap(true, Ordering::AcqRel) || self.is_shutdown() {
            return;
        }
        count(&self.config.metrics, |m| &m.yamux_buffer_limit_exceeded);
        self.protocol_error(format!(
            "session holds {} bytes buffered and unread, more than the limit of {}",
            self.buffered.load(Ordering::Acquire),
            self.config.max_buffered_bytes
        ));
    }

    /// [`Inner::add_buffered`], ending the session when over the limit. No stream lock may be
    /// held.
    fn charge(&self, n: usize) -> bool {
        if self.add_buffered(n) {
            return true;
        }
        self.over_buffer_limit();
        false
    }

    /// Gives back `n` charged bytes.
    fn release(&self, n: usize) {
        if n == 0 {
            return;
        }
        self.buffered.fetch_sub(n, Ordering::AcqRel);
        gauge_add(
            &self.config.metrics,
            |m| &m.session_buffered_bytes,
            -i64::try_from(n).unwrap_or(i64::MAX),
        );
    }

    fn streams(&self) -> MutexGuard<'_, HashMap<u32, Arc<StreamState>>> {
        self.streams.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn ctrl_queue(&self) -> MutexGuard<'_, VecDeque<Header>> {
        self.ctrl.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues a control frame for the writer if there is room; false if the queue is full.
    fn try_ctrl(&self, h: Header) -> bool {
        let mut q = self.ctrl_queue();
        if q.len() >= CTRL_QUEUE {
            return false;
        }
        q.push_back(h);
        drop(q);
        self.ctrl_notify.notify_one();
        true
    }

    fn end_error(&self) -> SessionError {
        self.end
            .lock()
            .ok()
            .and_then(|g| g.clone())
            .unwrap_or(SessionError::Closed)
    }

    fn is_shutdown(&self) -> bool {
        self.shut.load(Ordering::Acquire)
    }

    /// Records `err` as the session's end (first one wins), stops the tasks, wakes every stream.
    fn shutdown_with(&self, err: SessionError) {
        if let Ok(mut g) = self.end.lock() {
            if g.is_none() {
                *g = Some(err);
            }
        }
        self.shut.store(true, Ordering::Release);
        self.shutdown.cancel();
        let streams: Vec<Arc<StreamState>> = self.streams().values().cloned().collect();
        for s in streams {
            wake_all(&mut s.lock());
        }
        self.data.wake_waiting();
        if let Ok(mut p) = self.pings.lock() {
            p.clear();
        }
    }

    /// Queues a stream frame for the writer, waiting for room while the queue is full; fails once
    /// the session has ended.
    async fn send_data(&self, frame: OutFrame) -> Result<(), SessionError> {
        let mut frame = Some(frame);
        std::future::poll_fn(|cx| {
            let mut q = std::task::ready!(self.data.poll_room(self, cx));
            if self.is_shutdown() {
                return Poll::Ready(Err(self.end_error()));
            }
            if let Some(f) = frame.take() {
                q.push_back(f);
            }
            drop(q);
            self.ctrl_notify.notify_one();
            Poll::Ready(Ok(()))
        })
        .await
    }

    /// Queues a stream frame if there is room; gives it back if the queue is full.
    fn try_send_data(&self, frame: OutFrame) -> Result<(), OutFrame> {
        let mut q = self.data.lock();
        if q.len() >= self.data.cap {
            return Err(frame);
        }
        q.push_back(frame);
        drop(q);
        self.ctrl_notify.notify_one();
        Ok(())
    }

    /// Ends the session for a peer protocol violation: GoAway(protocol error), count, log.
    fn protocol_error(&self, msg: String) {
        count(&self.config.metrics, |m| &m.yamux_protocol_errors);
        tracing::info!(error = %msg, "yamux: protocol error, closing session");
        let _ = self.try_ctrl(Header::go_away(GO_AWAY_PROTOCOL_ERROR));
        self.shutdown_with(SessionError::Protocol(msg));
    }

    /// Removes a stream whose both directions are done (or that was reset).
    fn remove_stream(&self, state: &Arc<StreamState>) {
        let mut map = self.streams();
        let mut g = state.lock();
        if g.removed {
            return;
        }
        g.removed = true;
        drop(g);
        if map.get(&state.id).is_some_and(|s| Arc::ptr_eq(s, state)) {
            map.remove(&state.id);
        }
        drop(map);
        gauge_add(&self.config.metrics, |m| &m.yamux_streams, -1);
    }

    fn queue_window_update(&self, id: u32) {
        if let Ok(mut v) = self.wu_pending.lock() {
            v.push(id);
        }
        self.ctrl_notify.notify_one();
    }

    /// Queues a control frame, waiting for room while the queue is full; fails once the session
    /// has ended.
    async fn send_ctrl(&self, h: Header) -> Result<(), SessionError> {
        loop {
            let room = self.ctrl_room.notified();
            tokio::pin!(room);
            room.as_mut().enable();
            if self.try_ctrl(h) {
                return Ok(());
            }
            tokio::select! {
                _ = self.shutdown.cancelled() => return Err(self.end_error()),
                _ = room => {}
            }
        }
    }

    async fn ping(&self) -> Result<Duration, SessionError> {
        if self.is_shutdown() {
            return Err(self.end_error());
        }
        let id = self.ping_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        {
            let mut p = self.pings.lock().unwrap_or_else(|e| e.into_inner());
            if p.len() >= MAX_OUTSTANDING_PINGS {
                return Err(SessionError::TooManyPings);
            }
            p.insert(id, tx);
        }
        let start = tokio::time::Instant::now();
        self.send_ctrl(Header::ping(Flags::SYN, id)).await?;
        let res = tokio::select! {
            _ = self.shutdown.cancelled() => Err(self.end_error()),
            r = tokio::time::timeout(self.config.connection_write_timeout, rx) => match r {
                Ok(Ok(())) => Ok(start.elapsed()),
                Ok(Err(_)) => Err(self.end_error()),
                Err(_) => Err(SessionError::PingTimeout),
            },
        };
        if let Ok(mut p) = self.pings.lock() {
            p.remove(&id);
        }
        res
    }

    /// Runs `on_expiry` after `delay` unless the session ends first, in a helper task the session
    /// tracks (see [`Inner::helpers`]); the task holds only a weak reference to the session.
    fn after(
        self: &Arc<Self>,
        delay: Duration,
        on_expiry: impl FnOnce(&Arc<Inner>) + Send + 'static,
    ) {
        let weak: Weak<Inner> = Arc::downgrade(self);
        self.spawn_helper(async move {
            tokio::time::sleep(delay).await;
            if let Some(inner) = weak.upgrade() {
                on_expiry(&inner);
            }
        });
    }

    /// Runs `work` in a helper task that ends when it completes or when the session ends,
    /// whichever comes first. Outside a runtime (a session dropped after its runtime) nothing
    /// runs: the session is over anyway.
    fn spawn_helper(&self, work: impl std::future::Future<Output = ()> + Send + 'static) {
        if self.is_shutdown() || tokio::runtime::Handle::try_current().is_err() {
            return;
        }
        let shutdown = self.shutdown.clone();
        self.helpers.spawn(async move {
            tokio::select! {
                _ = shutdown.cancelled() => {}
                _ = work => {}
            }
        });
    }

    /// Starts the close timer for a stream we half-closed: if the peer has not closed within
    /// `stream_close_timeout`, reset it (hashicorp's `closeTimeout`).
    fn start_close_timer(self: &Arc<Self>, state: &Arc<StreamState>) {
        let state = state.clone();
        self.after(self.config.stream_close_timeout, move |inner| {
            let expired = {
                let mut g = state.lock();
                if g.removed || g.remote_closed || g.reset {
                    false
                } else {
                    g.reset = true;
                    wake_all(&mut g);
                    true
                }
            };
            if expired {
                let _ = inner.try_ctrl(Header::window_update(Flags::RST, state.id, 0));
                inner.remove_stream(&state);
            }
        });
    }
}

mod keepalive;
mod reader;
mod session;
mod stream;
mod writer;

use keepalive::keepalive_loop;
use reader::reader_loop;
pub use session::{Session, SessionHandle};
pub use stream::{HeldBytes, Stream, StreamReader, StreamWriter};
use writer::{writer_loop, DataQueue};
