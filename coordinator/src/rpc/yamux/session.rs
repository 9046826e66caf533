//! The session's owner and handles: [`Session`] (accepts inbound streams; dropping it closes the
//! session) and [`SessionHandle`] (open, ping, GoAway, close, observe the end). The driver (the
//! reader, the writer and the keepalive loop) is one future that ends with the session: either
//! spawned as the session's one task ([`Session::server`], [`Session::client`]) or handed to the
//! caller to run inside a task of its own ([`Session::client_driven`]: the sidecar's upstream
//! session runs it beside the task that watches the session).

use super::*;

/// Owner of a yamux session: accepts inbound streams. Dropping it closes the session; use
/// [`Session::handle`] for cloneable access (open, ping, close) from elsewhere.
pub struct Session {
    pub(super) handle: SessionHandle,
}

/// Inbound streams, ACKed and waiting for [`Session::accept`] (at most `accept_backlog`). A queue
/// under a mutex rather than a channel: a channel allocates its shared state and a first block of
/// slots for every session when it is made (about 800 bytes, 4% of a connected peer), and most
/// sessions see one inbound stream in their life.
pub(super) struct AcceptQueue {
    queue: Mutex<VecDeque<Arc<StreamState>>>,
    /// The reader has ended: nothing more will be queued.
    closed: AtomicBool,
    ready: Notify,
}

impl AcceptQueue {
    pub(super) fn new() -> Self {
        AcceptQueue {
            queue: Mutex::new(VecDeque::new()),
            closed: AtomicBool::new(false),
            ready: Notify::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, VecDeque<Arc<StreamState>>> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether one more stream fits. Only the reader queues, so the answer holds until it does.
    pub(super) fn has_room(&self, backlog: usize) -> bool {
        self.lock().len() < backlog.max(1)
    }

    pub(super) fn push(&self, state: Arc<StreamState>) {
        self.lock().push_back(state);
        self.ready.notify_one();
    }

    /// Called when the reader ends: `pop` returns what is queued, then `None`.
    pub(super) fn close(&self) {
        self.closed.store(true, Ordering::Release);
        self.ready.notify_waiters();
    }

    /// The next queued stream; `None` once the queue is empty and closed. Cancel-safe.
    async fn pop(&self) -> Option<Arc<StreamState>> {
        loop {
            let notified = self.ready.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(state) = self.lock().pop_front() {
                return Some(state);
            }
            if self.closed.load(Ordering::Acquire) {
                return None;
            }
            notified.await;
        }
    }
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
    pub(super) inner: Arc<Inner>,
    pub(super) done: watch::Receiver<bool>,
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

    /// The client side with the driver handed to the caller instead of spawned: the session
    /// makes no progress (reads nothing, writes nothing, answers no ping) unless the returned
    /// future is polled, and it must be polled until it completes (after the session has ended:
    /// it flushes the final GoAway and waits for the session's timers). It completes once the
    /// session has ended; [`SessionHandle::closed`] waits for it.
    pub fn client_driven<T>(
        io: T,
        config: Config,
    ) -> (
        Session,
        impl std::future::Future<Output = ()> + Send + 'static,
    )
    where
        T: AsyncRead + AsyncWrite + Send + 'static,
    {
        Session::with_driver(io, config, true)
    }

    pub(super) fn new<T>(io: T, config: Config, client: bool) -> Session
    where
        T: AsyncRead + AsyncWrite + Send + 'static,
    {
        let (session, driver) = Session::with_driver(io, config, client);
        tokio::spawn(driver);
        session
    }

    fn with_driver<T>(
        io: T,
        config: Config,
        client: bool,
    ) -> (
        Session,
        impl std::future::Future<Output = ()> + Send + 'static,
    )
    where
        T: AsyncRead + AsyncWrite + Send + 'static,
    {
        let (done_tx, done_rx) = watch::channel(false);
        let max_window = config.max_stream_window.max(INITIAL_WINDOW);
        gauge_add(&config.metrics, |m| &m.yamux_sessions, 1);
        let inner = Arc::new(Inner {
            client,
            streams: Mutex::new(HashMap::new()),
            next_id: AtomicU32::new(if client { 1 } else { 2 }),
            data: DataQueue::new(config.write_queue_depth),
            ctrl: Mutex::new(VecDeque::new()),
            ctrl_room: Notify::new(),
            wu_pending: Mutex::new(Vec::new()),
            ctrl_notify: Notify::new(),
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
            helpers: TaskTracker::new(),
            accept: AcceptQueue::new(),
            config,
        });
        let (rd, wr) = tokio::io::split(io);
        let driver_inner = inner.clone();
        let driver = async move {
            let inner = driver_inner;
            tokio::join!(
                reader_loop(inner.clone(), rd),
                writer_loop(inner.clone(), wr),
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
            // The helpers stop on the cancellation above; wait for them so that nothing of the
            // session is left running once it reports closed.
            inner.helpers.close();
            inner.helpers.wait().await;
            gauge_add(&inner.config.metrics, |m| &m.yamux_sessions, -1);
            let _ = done_tx.send(true);
        };
        let session = Session {
            handle: SessionHandle {
                inner,
                done: done_rx,
            },
        };
        (session, driver)
    }

    /// Waits for the next inbound stream (already ACKed). Fails once the session has ended.
    pub async fn accept(&mut self) -> Result<Stream, SessionError> {
        match self.handle.inner.accept.pop().await {
            Some(state) => Ok(Stream::new(state, self.handle.inner.clone())),
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
            r = inner.send_data(syn) => r,
        };
        if let Err(e) = sent {
            inner.remove_stream(&state);
            return Err(e);
        }
        // Open timeout: an un-ACKed stream aborts the session (hashicorp behaviour).
        let st = state.clone();
        inner.after(inner.config.stream_open_timeout, move |inner| {
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

    pub(super) fn start_close(&self) {
        if self.inner.is_shutdown() {
            return;
        }
        let _ = self.inner.try_ctrl(Header::go_away(GO_AWAY_NORMAL));
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
