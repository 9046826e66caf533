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
//! the requirement, so the session below implements the spec directly (reader task, writer task,
//! keepalive loop, per-stream bounded buffers).
//!
//! Shape: [`Session::server`] / [`Session::client`] spawn one driver task running three futures:
//! a reader (parses 12-byte headers with `proto::yamux`, routes frames, enforces windows), a
//! writer (the only code that writes to the transport; batches frames and fails the session if a
//! write blocks past `connection_write_timeout`), and a keepalive loop. Streams ([`Stream`]) are
//! `AsyncRead + AsyncWrite` handles over per-stream state kept under a short `std` mutex.
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
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, ReadBuf};
use tokio::sync::{mpsc, oneshot, watch, Notify};
use tokio_util::sync::{CancellationToken, PollSender};

use super::{count, gauge_add, MetricsRef};

/// Largest payload we put in one data frame (Go sends up to the whole window; any size is valid).
const MAX_DATA_FRAME: usize = 64 * 1024;
/// The writer stops batching once a batch reaches this size.
const WRITE_BATCH: usize = 128 * 1024;
/// What the writer's batch buffer starts with; it grows towards [`WRITE_BATCH`] only under load,
/// so that an idle session does not keep a 192 KiB buffer (a separate mapping per session).
const INITIAL_BATCH_CAPACITY: usize = 4 * 1024;
/// The reader's buffer: frames larger than this are read through it in several reads.
const READ_BUFFER: usize = 8 * 1024;
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
    data_tx: mpsc::Sender<OutFrame>,
    ctrl_tx: mpsc::Sender<Header>,
    wu_pending: Mutex<Vec<u32>>,
    wu_notify: Notify,
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
        if let Ok(mut p) = self.pings.lock() {
            p.clear();
        }
    }

    /// Ends the session for a peer protocol violation: GoAway(protocol error), count, log.
    fn protocol_error(&self, msg: String) {
        count(&self.config.metrics, |m| &m.yamux_protocol_errors);
        tracing::info!(error = %msg, "yamux: protocol error, closing session");
        let _ = self
            .ctrl_tx
            .try_send(Header::go_away(GO_AWAY_PROTOCOL_ERROR));
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
        self.wu_notify.notify_one();
    }

    async fn send_ctrl(&self, h: Header) -> Result<(), SessionError> {
        tokio::select! {
            _ = self.shutdown.cancelled() => Err(self.end_error()),
            r = self.ctrl_tx.send(h) => r.map_err(|_| self.end_error()),
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

    /// Starts the close timer for a stream we half-closed: if the peer has not closed within
    /// `stream_close_timeout`, reset it (hashicorp's `closeTimeout`).
    fn start_close_timer(self: &Arc<Self>, state: &Arc<StreamState>) {
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let weak: Weak<Inner> = Arc::downgrade(self);
        let state = state.clone();
        let timeout = self.config.stream_close_timeout;
        rt.spawn(async move {
            tokio::time::sleep(timeout).await;
            let Some(inner) = weak.upgrade() else { return };
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
                let _ = inner
                    .ctrl_tx
                    .try_send(Header::window_update(Flags::RST, state.id, 0));
                inner.remove_stream(&state);
            }
        });
    }
}

/// Owner of a yamux session: accepts inbound streams. Dropping it closes the session; use
/// [`Session::handle`] for cloneable access (open, ping, close) from elsewhere.
pub struct Session {
    handle: SessionHandle,
    accept_rx: mpsc::Receiver<Stream>,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("client", &self.handle.inner.client)
            .finish_non_exhaustive()
    }
}

/// Cloneable handle to a session.
#[derive(Clone)]
pub struct SessionHandle {
    inner: Arc<Inner>,
    done: watch::Receiver<bool>,
}

impl std::fmt::Debug for SessionHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionHandle")
            .field("client", &self.inner.client)
            .finish_non_exhaustive()
    }
}

impl Session {
    /// Runs the server side (coderd's role: accepts odd client streams, never opens any).
    pub fn server<T>(io: T, config: Config) -> Session
    where
        T: AsyncRead + AsyncWrite + Send + 'static,
    {
        Session::new(io, config, false)
    }

    /// Runs the client side (agents' and CLIs' role: opens odd-numbered streams).
    pub fn client<T>(io: T, config: Config) -> Session
    where
        T: AsyncRead + AsyncWrite + Send + 'static,
    {
        Session::new(io, config, true)
    }

    fn new<T>(io: T, config: Config, client: bool) -> Session
    where
        T: AsyncRead + AsyncWrite + Send + 'static,
    {
        let (data_tx, data_rx) = mpsc::channel(config.write_queue_depth.max(1));
        let (ctrl_tx, ctrl_rx) = mpsc::channel(256);
        let (accept_tx, accept_rx) = mpsc::channel(config.accept_backlog.max(1));
        let (done_tx, done_rx) = watch::channel(false);
        let max_window = config.max_stream_window.max(INITIAL_WINDOW);
        gauge_add(&config.metrics, |m| &m.yamux_sessions, 1);
        let inner = Arc::new(Inner {
            client,
            streams: Mutex::new(HashMap::new()),
            next_id: AtomicU32::new(if client { 1 } else { 2 }),
            data_tx,
            ctrl_tx,
            wu_pending: Mutex::new(Vec::new()),
            wu_notify: Notify::new(),
            pings: Mutex::new(HashMap::new()),
            ping_id: AtomicU32::new(0),
            shutdown: CancellationToken::new(),
            shut: AtomicBool::new(false),
            end: Mutex::new(None),
            remote_goaway: AtomicBool::new(false),
            local_goaway: AtomicBool::new(false),
            max_window,
            buffered: AtomicUsize::new(0),
            over_buffer_limit: AtomicBool::new(false),
            config,
        });
        let (rd, wr) = tokio::io::split(io);
        let driver_inner = inner.clone();
        tokio::spawn(async move {
            let inner = driver_inner;
            tokio::join!(
                reader_loop(inner.clone(), rd, accept_tx),
                writer_loop(inner.clone(), wr, data_rx, ctrl_rx),
                keepalive_loop(inner.clone()),
            );
            // Whatever ended the session, make sure everything observes it.
            inner.shutdown_with(SessionError::Closed);
            let streams: Vec<Arc<StreamState>> = inner.streams().drain().map(|(_, s)| s).collect();
            for s in streams {
                let mut g = s.lock();
                if !g.removed {
                    g.removed = true;
                    gauge_add(&inner.config.metrics, |m| &m.yamux_streams, -1);
                }
                wake_all(&mut g);
            }
            gauge_add(&inner.config.metrics, |m| &m.yamux_sessions, -1);
            let _ = done_tx.send(true);
        });
        Session {
            handle: SessionHandle {
                inner,
                done: done_rx,
            },
            accept_rx,
        }
    }

    /// Waits for the next inbound stream (already ACKed). Fails once the session has ended.
    pub async fn accept(&mut self) -> Result<Stream, SessionError> {
        match self.accept_rx.recv().await {
            Some(s) => Ok(s),
            None => Err(self.handle.inner.end_error()),
        }
    }

    /// A cloneable handle.
    pub fn handle(&self) -> SessionHandle {
        self.handle.clone()
    }

    /// See [`SessionHandle::open`].
    pub async fn open(&self) -> Result<Stream, SessionError> {
        self.handle.open().await
    }

    /// See [`SessionHandle::ping`].
    pub async fn ping(&self) -> Result<Duration, SessionError> {
        self.handle.ping().await
    }

    /// See [`SessionHandle::close`].
    pub async fn close(&self) -> SessionError {
        self.handle.close().await
    }

    /// See [`SessionHandle::closed`].
    pub async fn closed(&self) -> SessionError {
        self.handle.closed().await
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        self.handle.start_close();
    }
}

impl SessionHandle {
    /// Opens a stream (client role: odd ids). Returns at once, like hashicorp's `Open`: data may
    /// be written before the ACK arrives; if no ACK arrives within `stream_open_timeout` the
    /// session is closed.
    pub async fn open(&self) -> Result<Stream, SessionError> {
        let inner = &self.inner;
        if inner.is_shutdown() {
            return Err(inner.end_error());
        }
        if inner.remote_goaway.load(Ordering::Acquire) {
            return Err(SessionError::RemoteGoAwayNormal);
        }
        if inner.local_goaway.load(Ordering::Acquire) {
            return Err(SessionError::LocalGoAway);
        }
        let state = {
            let mut map = inner.streams();
            if map.len() >= inner.config.max_streams {
                return Err(SessionError::StreamsExhausted);
            }
            let id = inner.next_id.fetch_add(2, Ordering::Relaxed);
            if id >= u32::MAX - 1 {
                return Err(SessionError::StreamsExhausted);
            }
            let state = Arc::new(StreamState::new(
                id,
                inner.max_window,
                INITIAL_WINDOW,
                false,
            ));
            map.insert(id, state.clone());
            state
        };
        gauge_add(&inner.config.metrics, |m| &m.yamux_streams, 1);
        let syn = OutFrame {
            header: Header::window_update(Flags::SYN, state.id, inner.max_window - INITIAL_WINDOW),
            body: Bytes::new(),
        };
        let sent = tokio::select! {
            _ = inner.shutdown.cancelled() => Err(inner.end_error()),
            r = inner.data_tx.send(syn) => r.map_err(|_| inner.end_error()),
        };
        if let Err(e) = sent {
            inner.remove_stream(&state);
            return Err(e);
        }
        // Open timeout: an un-ACKed stream aborts the session (hashicorp behaviour).
        let weak = Arc::downgrade(inner);
        let st = state.clone();
        let timeout = inner.config.stream_open_timeout;
        tokio::spawn(async move {
            tokio::time::sleep(timeout).await;
            let Some(inner) = weak.upgrade() else { return };
            let (acked, removed) = {
                let g = st.lock();
                (g.acked, g.removed)
            };
            if !acked && !removed && !inner.is_shutdown() {
                tracing::info!(
                    stream = st.id,
                    "yamux: stream open not acknowledged; closing session"
                );
                inner.shutdown_with(SessionError::StreamOpenTimeout);
            }
        });
        Ok(Stream::new(state, inner.clone()))
    }

    /// Sends a ping and waits for the reply (at most `connection_write_timeout`); returns the RTT.
    pub async fn ping(&self) -> Result<Duration, SessionError> {
        self.inner.ping().await
    }

    /// Sends GoAway(normal): the peer must not open new streams; existing streams continue.
    pub async fn go_away(&self) -> Result<(), SessionError> {
        self.inner.local_goaway.store(true, Ordering::Release);
        self.inner.send_ctrl(Header::go_away(GO_AWAY_NORMAL)).await
    }

    fn start_close(&self) {
        if self.inner.is_shutdown() {
            return;
        }
        let _ = self.inner.ctrl_tx.try_send(Header::go_away(GO_AWAY_NORMAL));
        self.inner.shutdown_with(SessionError::Closed);
    }

    /// Closes the session (GoAway(normal) best effort, then the transport) and waits until its
    /// tasks have finished. Returns why it ended (the first cause wins).
    pub async fn close(&self) -> SessionError {
        self.start_close();
        self.closed().await
    }

    /// Waits until the session has ended and returns why.
    pub async fn closed(&self) -> SessionError {
        let mut done = self.done.clone();
        let _ = done.wait_for(|d| *d).await;
        self.inner.end_error()
    }

    /// Whether the session has been shut down (its tasks may still be finishing).
    pub fn is_closed(&self) -> bool {
        self.inner.is_shutdown()
    }

    /// Number of live streams.
    pub fn num_streams(&self) -> usize {
        self.inner.streams().len()
    }

    /// Whether this is the client side.
    pub fn is_client(&self) -> bool {
        self.inner.client
    }

    /// Bytes the session holds buffered and unread right now (see [`Config::max_buffered_bytes`]).
    pub fn buffered_bytes(&self) -> usize {
        self.inner.buffered.load(Ordering::Acquire)
    }
}

// ---------------------------------------------------------------------------------------------
// Driver: reader
// ---------------------------------------------------------------------------------------------

async fn reader_loop<R>(inner: Arc<Inner>, rd: R, accept_tx: mpsc::Sender<Stream>)
where
    R: AsyncRead + Unpin,
{
    let mut rd = BufReader::with_capacity(READ_BUFFER, rd);
    let res = tokio::select! {
        _ = inner.shutdown.cancelled() => Ok(()),
        r = read_frames(&inner, &mut rd, &accept_tx) => r,
    };
    if let Err(e) = res {
        inner.shutdown_with(e);
    }
}

async fn read_frames<R>(
    inner: &Arc<Inner>,
    rd: &mut BufReader<R>,
    accept_tx: &mpsc::Sender<Stream>,
) -> Result<(), SessionError>
where
    R: AsyncRead + Unpin,
{
    let mut hdr_buf = [0u8; HEADER_LEN];
    loop {
        if let Err(e) = rd.read_exact(&mut hdr_buf).await {
            return Err(io_end(e));
        }
        let hdr = match Header::decode(&hdr_buf) {
            Ok(Some(h)) => h,
            Ok(None) => return Err(SessionError::Io("short header".into())),
            Err(e) => {
                let msg = match e {
                    HeaderError::BadVersion(_) | HeaderError::BadType(_) => e.to_string(),
                };
                inner.protocol_error(msg.clone());
                return Err(SessionError::Protocol(msg));
            }
        };
        match hdr.typ {
            Type::Data | Type::WindowUpdate => {
                if let Err(msg) = handle_stream_frame(inner, rd, accept_tx, hdr).await? {
                    inner.protocol_error(msg.clone());
                    return Err(SessionError::Protocol(msg));
                }
            }
            Type::Ping => {
                if hdr.flags.contains(Flags::SYN) {
                    inner
                        .send_ctrl(Header::ping(Flags::ACK, hdr.length))
                        .await?;
                } else if hdr.flags.contains(Flags::ACK) {
                    let waiter = inner
                        .pings
                        .lock()
                        .ok()
                        .and_then(|mut p| p.remove(&hdr.length));
                    if let Some(w) = waiter {
                        let _ = w.send(());
                    }
                }
            }
            Type::GoAway => match hdr.length {
                GO_AWAY_NORMAL => inner.remote_goaway.store(true, Ordering::Release),
                GO_AWAY_PROTOCOL_ERROR | GO_AWAY_INTERNAL_ERROR => {
                    tracing::info!(code = hdr.length, "yamux: received go away with error code");
                    return Err(SessionError::RemoteGoAway(hdr.length));
                }
                other => {
                    let msg = format!("unexpected go away code {other}");
                    inner.protocol_error(msg.clone());
                    return Err(SessionError::Protocol(msg));
                }
            },
        }
    }
}

fn io_end(e: io::Error) -> SessionError {
    match e.kind() {
        io::ErrorKind::UnexpectedEof => SessionError::Eof,
        _ => SessionError::Io(e.to_string()),
    }
}

async fn discard<R: AsyncRead + Unpin>(rd: &mut R, mut len: u64) -> Result<(), SessionError> {
    let mut scratch = [0u8; 4096];
    while len > 0 {
        let n = usize::try_from(len)
            .unwrap_or(usize::MAX)
            .min(scratch.len());
        rd.read_exact(&mut scratch[..n]).await.map_err(io_end)?;
        len -= n as u64;
    }
    Ok(())
}

/// Handles a Data or WindowUpdate frame. Outer `Err` = transport/session failure; inner `Err` =
/// a peer protocol violation (the caller sends GoAway(protocol error)).
async fn handle_stream_frame<R>(
    inner: &Arc<Inner>,
    rd: &mut BufReader<R>,
    accept_tx: &mpsc::Sender<Stream>,
    hdr: Header,
) -> Result<Result<(), String>, SessionError>
where
    R: AsyncRead + Unpin,
{
    let id = hdr.stream_id;
    let flags = hdr.flags;
    let data_len = if hdr.typ == Type::Data { hdr.length } else { 0 };
    if id == 0 {
        return Ok(Err(format!("{:?} frame on stream 0", hdr.typ)));
    }

    let mut state = inner.streams().get(&id).cloned();
    if flags.contains(Flags::SYN) {
        if state.is_some() {
            return Ok(Err(format!("duplicate stream {id}")));
        }
        // Streams the peer opens carry the peer's parity: odd from clients, even from servers.
        let peer_parity_odd = !inner.client;
        if (id % 2 == 1) != peer_parity_odd {
            return Ok(Err(format!("stream {id} opened with our own id parity")));
        }
        if data_len > INITIAL_WINDOW {
            return Ok(Err(format!(
                "stream {id}: {data_len} bytes exceed the initial window"
            )));
        }
        match open_inbound(inner, accept_tx, id, hdr).await? {
            Some(s) => state = Some(s),
            None => {
                // Refused with RST; drop any payload.
                discard(rd, u64::from(data_len)).await?;
                return Ok(Ok(()));
            }
        }
    }

    let Some(state) = state else {
        // Frame for a stream we no longer know (closed or reset): discard, like hashicorp.
        if data_len > inner.max_window {
            return Ok(Err(format!(
                "stream {id}: {data_len} bytes exceed the window"
            )));
        }
        discard(rd, u64::from(data_len)).await?;
        return Ok(Ok(()));
    };

    // Read the payload first (bounded by the window check), then update state under the lock.
    let mut payload = None;
    if data_len > 0 {
        let allowed = state.lock().recv_window;
        if data_len > allowed {
            return Ok(Err(format!(
                "stream {id}: received {data_len} bytes with only {allowed} bytes of window"
            )));
        }
        let len = data_len as usize;
        let mut buf = BytesMut::zeroed(len);
        rd.read_exact(&mut buf).await.map_err(io_end)?;
        payload = Some(buf.freeze());
    }

    let mut remove = false;
    let mut over_budget = false;
    {
        let mut g = state.lock();
        if flags.contains(Flags::ACK) {
            g.acked = true;
        }
        if hdr.typ == Type::WindowUpdate && hdr.length > 0 {
            g.send_window = g.send_window.saturating_add(hdr.length);
            if let Some(w) = g.write_waker.take() {
                w.wake();
            }
        }
        if let Some(p) = payload {
            g.recv_window -= data_len;
            if !g.detached && !g.remote_closed && !g.reset {
                // Charged while the stream lock is held so that a concurrent read or drop
                // releases only what was charged.
                over_budget = !inner.add_buffered(p.len());
                g.buffered += p.len();
                g.recv_buf.push_back(p);
                if let Some(w) = g.read_waker.take() {
                    w.wake();
                }
            }
        }
        if flags.contains(Flags::FIN) && !g.remote_closed {
            g.remote_closed = true;
            wake_all(&mut g);
            remove = g.local_closed;
        }
        if flags.contains(Flags::RST) {
            g.reset = true;
            wake_all(&mut g);
            remove = true;
        }
    }
    if remove {
        inner.remove_stream(&state);
    }
    if over_budget {
        inner.over_buffer_limit();
        return Err(inner.end_error());
    }
    Ok(Ok(()))
}

/// Registers an inbound stream, ACKs it and queues it for `accept`. `Ok(None)` = refused (RST).
async fn open_inbound(
    inner: &Arc<Inner>,
    accept_tx: &mpsc::Sender<Stream>,
    id: u32,
    hdr: Header,
) -> Result<Option<Arc<StreamState>>, SessionError> {
    let refuse = |why: &str| {
        count(&inner.config.metrics, |m| &m.yamux_streams_rejected);
        tracing::debug!(stream = id, why, "yamux: refusing inbound stream");
    };
    if inner.local_goaway.load(Ordering::Acquire) {
        refuse("local go away");
        inner
            .send_ctrl(Header::window_update(Flags::RST, id, 0))
            .await?;
        return Ok(None);
    }
    let permit = match accept_tx.try_reserve() {
        Ok(p) => p,
        Err(_) => {
            refuse("accept backlog full");
            inner
                .send_ctrl(Header::window_update(Flags::RST, id, 0))
                .await?;
            return Ok(None);
        }
    };
    // The SYN frame's own window delta is applied by the caller like any window update.
    let _ = hdr;
    let state = Arc::new(StreamState::new(id, inner.max_window, INITIAL_WINDOW, true));
    let inserted = {
        let mut map = inner.streams();
        if map.len() >= inner.config.max_streams {
            false
        } else {
            map.insert(id, state.clone());
            true
        }
    };
    if !inserted {
        drop(permit);
        refuse("stream limit");
        inner
            .send_ctrl(Header::window_update(Flags::RST, id, 0))
            .await?;
        return Ok(None);
    }
    gauge_add(&inner.config.metrics, |m| &m.yamux_streams, 1);
    // ACK before the application can see (and write to) the stream.
    inner
        .send_ctrl(Header::window_update(
            Flags::ACK,
            id,
            inner.max_window - INITIAL_WINDOW,
        ))
        .await?;
    // The window update in the ACK already applies to the payload check that follows, but the
    // payload (if any) was sent against the initial window, which `recv_window` covers.
    permit.send(Stream::new(state.clone(), inner.clone()));
    Ok(Some(state))
}

// ---------------------------------------------------------------------------------------------
// Driver: writer
// ---------------------------------------------------------------------------------------------

fn drain_control(inner: &Inner, ctrl_rx: &mut mpsc::Receiver<Header>, batch: &mut BytesMut) {
    while let Ok(h) = ctrl_rx.try_recv() {
        batch.extend_from_slice(&h.encode());
    }
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

fn push_frame(batch: &mut BytesMut, f: OutFrame) {
    batch.extend_from_slice(&f.header.encode());
    batch.extend_from_slice(&f.body);
}

async fn writer_loop<W>(
    inner: Arc<Inner>,
    mut wr: W,
    mut data_rx: mpsc::Receiver<OutFrame>,
    mut ctrl_rx: mpsc::Receiver<Header>,
) where
    W: AsyncWrite + Unpin,
{
    let timeout = inner.config.connection_write_timeout;
    let mut batch = BytesMut::with_capacity(INITIAL_BATCH_CAPACITY);
    let shutdown = inner.shutdown.clone();
    let shut_down = shutdown.cancelled();
    tokio::pin!(shut_down);
    loop {
        if inner.is_shutdown() {
            break;
        }
        batch.clear();
        drain_control(&inner, &mut ctrl_rx, &mut batch);
        while batch.len() < WRITE_BATCH {
            match data_rx.try_recv() {
                Ok(f) => {
                    // Control queued before this frame must go first (ACK before data).
                    drain_control(&inner, &mut ctrl_rx, &mut batch);
                    push_frame(&mut batch, f);
                }
                Err(_) => break,
            }
        }
        if batch.is_empty() {
            tokio::select! {
                biased;
                _ = &mut shut_down => break,
                h = ctrl_rx.recv() => match h {
                    Some(h) => batch.extend_from_slice(&h.encode()),
                    None => break,
                },
                _ = inner.wu_notify.notified() => drain_control(&inner, &mut ctrl_rx, &mut batch),
                f = data_rx.recv() => match f {
                    Some(f) => {
                        drain_control(&inner, &mut ctrl_rx, &mut batch);
                        push_frame(&mut batch, f);
                    }
                    None => break,
                },
            }
            if batch.is_empty() {
                continue;
            }
        }
        let write = async {
            wr.write_all(&batch).await?;
            wr.flush().await
        };
        // Not cancelled by shutdown: a half-written frame would corrupt the final GoAway.
        let res = tokio::time::timeout(timeout, write).await;
        match res {
            Ok(Ok(())) => {}
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
    while let Ok(h) = ctrl_rx.try_recv() {
        batch.extend_from_slice(&h.encode());
    }
    let finish = async {
        if !batch.is_empty() {
            wr.write_all(&batch).await?;
            wr.flush().await?;
        }
        wr.shutdown().await
    };
    let _ = tokio::time::timeout(timeout, finish).await;
}

// ---------------------------------------------------------------------------------------------
// Driver: keepalive
// ---------------------------------------------------------------------------------------------

async fn keepalive_loop(inner: Arc<Inner>) {
    if !inner.config.enable_keepalive || inner.config.keepalive_interval.is_zero() {
        return;
    }
    loop {
        tokio::select! {
            _ = inner.shutdown.cancelled() => return,
            _ = tokio::time::sleep(inner.config.keepalive_interval) => {}
        }
        match inner.ping().await {
            Ok(_) => {}
            // Explicit pings fill the table; try again next period.
            Err(SessionError::TooManyPings) => {}
            Err(SessionError::PingTimeout) => {
                count(&inner.config.metrics, |m| &m.yamux_keepalive_timeouts);
                tracing::info!("yamux: keepalive ping not answered in time; closing session");
                inner.shutdown_with(SessionError::KeepAliveTimeout);
                return;
            }
            Err(_) => return,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Streams
// ---------------------------------------------------------------------------------------------

/// Shared by a stream's halves; dropping the last one detaches the stream (FIN if still open).
struct StreamCore {
    state: Arc<StreamState>,
    session: Arc<Inner>,
}

impl StreamCore {
    fn poll_read(&self, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
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

    fn poll_write(
        &self,
        tx: &mut PollSender<OutFrame>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
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
        match tx.poll_reserve(cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(Err(_)) => return Poll::Ready(Err(self.session.end_error().to_io())),
            Poll::Ready(Ok(())) => {}
        }
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
        let frame = OutFrame {
            header: Header::data(Flags::NONE, self.state.id, n as u32),
            body: Bytes::copy_from_slice(&buf[..n]),
        };
        match tx.send_item(frame) {
            Ok(()) => Poll::Ready(Ok(n)),
            Err(_) => Poll::Ready(Err(self.session.end_error().to_io())),
        }
    }

    fn write_error(&self, g: &StreamInner) -> Option<io::Error> {
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

    fn poll_shutdown(
        &self,
        tx: &mut PollSender<OutFrame>,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<()>> {
        {
            let g = self.state.lock();
            if g.local_closed || g.reset {
                return Poll::Ready(Ok(()));
            }
        }
        if self.session.is_shutdown() {
            return Poll::Ready(Err(self.session.end_error().to_io()));
        }
        match tx.poll_reserve(cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(Err(_)) => return Poll::Ready(Err(self.session.end_error().to_io())),
            Poll::Ready(Ok(())) => {}
        }
        let remote_closed = {
            let mut g = self.state.lock();
            if g.local_closed || g.reset {
                return Poll::Ready(Ok(()));
            }
            g.local_closed = true;
            g.remote_closed
        };
        let fin = OutFrame {
            header: Header::window_update(Flags::FIN, self.state.id, 0),
            body: Bytes::new(),
        };
        if tx.send_item(fin).is_err() {
            return Poll::Ready(Err(self.session.end_error().to_io()));
        }
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
            if let Err(mpsc::error::TrySendError::Full(fin)) = self.session.data_tx.try_send(fin) {
                // Keep FIN ordered after the data already queued: wait for room in a task.
                if let Ok(rt) = tokio::runtime::Handle::try_current() {
                    let tx = self.session.data_tx.clone();
                    let shutdown = self.session.shutdown.clone();
                    rt.spawn(async move {
                        tokio::select! {
                            _ = shutdown.cancelled() => {}
                            _ = tx.send(fin) => {}
                        }
                    });
                }
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
    session: Arc<Inner>,
    bytes: usize,
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
    core: Arc<StreamCore>,
    tx: PollSender<OutFrame>,
}

impl std::fmt::Debug for Stream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stream")
            .field("id", &self.core.state.id)
            .finish()
    }
}

/// Read half of a [`Stream`].
pub struct StreamReader {
    core: Arc<StreamCore>,
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
    core: Arc<StreamCore>,
    tx: PollSender<OutFrame>,
}

impl std::fmt::Debug for StreamWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamWriter")
            .field("id", &self.core.state.id)
            .finish()
    }
}

impl Stream {
    fn new(state: Arc<StreamState>, session: Arc<Inner>) -> Stream {
        let tx = PollSender::new(session.data_tx.clone());
        Stream {
            core: Arc::new(StreamCore { state, session }),
            tx,
        }
    }

    /// The yamux stream id.
    pub fn id(&self) -> u32 {
        self.core.state.id
    }

    /// Splits into independently usable halves (no lock shared between them).
    pub fn into_split(self) -> (StreamReader, StreamWriter) {
        (
            StreamReader {
                core: self.core.clone(),
            },
            StreamWriter {
                core: self.core,
                tx: self.tx,
            },
        )
    }

    /// Resets the stream (RST): both directions fail immediately on both sides.
    pub async fn reset(self) -> Result<(), SessionError> {
        reset_stream(&self.core).await
    }
}

async fn reset_stream(core: &StreamCore) -> Result<(), SessionError> {
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
        r = core.session.data_tx.send(rst) => r.map_err(|_| core.session.end_error()),
    };
    core.session.remove_stream(&core.state);
    res
}

impl StreamReader {
    /// The yamux stream id.
    pub fn id(&self) -> u32 {
        self.core.state.id
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
            Ok(Stream {
                core: writer.core,
                tx: writer.tx,
            })
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
        self.core.poll_read(cx, buf)
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.core.poll_write(&mut this.tx, cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.core.poll_shutdown(&mut this.tx, cx)
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
        let this = self.get_mut();
        this.core.poll_write(&mut this.tx, cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.core.poll_shutdown(&mut this.tx, cx)
    }
}
