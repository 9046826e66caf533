//! The DERP relay server: handshake, registration and the life of each connection.
//!
//! Why: this is the entry point the HTTP layer hands an upgraded byte stream to
//! ([`Server::accept`]). The handshake follows derper exactly (ServerKey first, before reading
//! anything; ClientInfo must be the first frame; ServerInfo after registration; everything under
//! one deadline); the steady state lives in [`super::conn`], routing in [`super::registry`].
//!
//! Bad input ends only the offending connection: every handshake failure is logged once at debug
//! (with the remote address and connection id) and counted in `derp_handshake_failures{reason}`;
//! at info there is at most one summary line a minute ([`HandshakeFailureLog`]), so that a
//! client cannot turn each failed, unauthenticated connection into an INFO line;
//! every post-handshake protocol violation in `derp_protocol_errors{kind}`.
//!
//! Memory: the handshake runs in its own boxed future ([`Server::accept`] creates it) that is
//! freed before the steady state starts, so each connection's long-lived future is only the
//! [`crate::core::conn`] task state plus its timer (~0.7 KB).
//!
//! Must never: answer a failed handshake with anything but a close, validate the client's
//! `version`, open a box from a zero key, keep handshake state in the long-lived connection
//! future, or wait unboundedly (handshake deadline; shutdown waits a bounded time).

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use proto::derp::{
    open_client_info, server_info_frame, server_key_frame, ClientInfo, FrameHeader, HandshakeError,
    PeerPresentFlags, ServerInfo, FRAME_HEADER_LEN,
};
use proto::key::{MeshKey, NodePrivate, NodePublic};
use rand::{Rng, RngCore};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::Notify;
use tracing::Instrument;

use crate::core::admission::{Admission, Decision};
use crate::core::conn::{Close, ConnParams, ConnTask};
use crate::core::handle::ConnHandle;
use crate::core::mesh::{ForwardReceiver, MeshForwarder, MeshPeerId, PresenceFeed};
use crate::core::metrics::{DropReason, Hot, Metrics, PacketKind};
use crate::core::queue::PushOutcome;
pub use crate::core::queue::QueueDepth;
use crate::core::queue::{CloseRequest, SendQueue};
use crate::core::rate::{RateConfig, RateLimits};
use crate::core::registry::Registry;
use crate::core::registry::Route;

/// Write timeout for mesh peers (derper's `privilegedWriteTimeout`).
pub const MESH_WRITE_TIMEOUT: Duration = Duration::from_secs(30);
/// Control items (PeerGone/PeerPresent) a connection may have pending before it is closed.
const CONTROL_CAP: usize = 1 << 20;

/// Relay configuration. Build with [`ServerConfig::new`] and override fields as needed.
#[derive(Clone)]
pub struct ServerConfig {
    /// The server's DERP private key (its public half is what clients pin).
    pub private_key: NodePrivate,
    /// Pre-shared mesh key; clients presenting it are mesh peers.
    pub mesh_key: Option<MeshKey>,
    /// Packets queued per destination per queue (regular and disco each). derper: 32.
    pub queue_depth: usize,
    /// A connection whose writes make no progress for this long is closed. derper: 2 s.
    /// Mesh peers get [`MESH_WRITE_TIMEOUT`] instead.
    pub write_timeout: Duration,
    /// KeepAlive interval (plus per-connection jitter of up to 1/12 of it). derper: 60 s.
    pub keepalive: Duration,
    /// Deadline for the whole handshake. derper: 10 s.
    pub handshake_timeout: Duration,
    /// Optional admission check for non-mesh clients.
    pub admission: Option<Arc<dyn Admission>>,
    /// Per-client receive rate limit at start (derper's `-rate-config`; change it later with
    /// [`Server::set_rate_config`]). Default: off.
    pub rate_config: RateConfig,
}

impl ServerConfig {
    /// derper's defaults with the given key.
    pub fn new(private_key: NodePrivate) -> Self {
        Self {
            private_key,
            mesh_key: None,
            queue_depth: 32,
            write_timeout: Duration::from_secs(2),
            keepalive: proto::derp::KEEP_ALIVE,
            handshake_timeout: Duration::from_secs(10),
            admission: None,
            rate_config: RateConfig::default(),
        }
    }
}

impl std::fmt::Debug for ServerConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerConfig")
            .field("public_key", &self.private_key.public())
            .field("mesh_key", &self.mesh_key.is_some())
            .field("queue_depth", &self.queue_depth)
            .field("write_timeout", &self.write_timeout)
            .field("keepalive", &self.keepalive)
            .field("handshake_timeout", &self.handshake_timeout)
            .field("admission", &self.admission.is_some())
            .field("rate_config", &self.rate_config)
            .finish()
    }
}

/// What the transport layer knows about a connection.
#[derive(Debug, Clone, Copy)]
pub struct ConnInfo {
    /// The client's address.
    pub remote: SocketAddr,
    /// The client said this node is not its ideal node (`Ideal-Node` header mismatch).
    pub not_ideal: bool,
    /// The stream is DERP-over-WebSocket.
    pub websocket: bool,
}

impl ConnInfo {
    /// A plain connection from `remote`.
    pub fn new(remote: SocketAddr) -> Self {
        Self {
            remote,
            not_ideal: false,
            websocket: false,
        }
    }
}

/// Errors creating a server.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// Registering the metrics failed (e.g. a second server on the same registry).
    #[error("registering metrics: {0}")]
    Metrics(#[from] prometheus::Error),
}

/// Why a handshake failed (label of `derp_handshake_failures`).
#[derive(Debug)]
struct HandshakeFailure {
    reason: &'static str,
    detail: String,
}

impl HandshakeFailure {
    fn new(reason: &'static str, detail: impl std::fmt::Display) -> Self {
        Self {
            reason,
            detail: detail.to_string(),
        }
    }
}

/// The relay. Share it as `Arc<Server>`.
pub struct Server {
    config: ServerConfig,
    public_key: NodePublic,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) registry: Registry,
    rate: RateLimits,
    pub(crate) mesh_metrics: crate::core::mesh::MeshMetrics,
    next_conn_id: AtomicU64,
    shutting_down: AtomicBool,
    /// Accepted connections whose task has not finished (handshaking included).
    tasks: AtomicUsize,
    tasks_changed: Notify,
    handshake_failures: HandshakeFailureLog,
}

/// The info-level summary of failed handshakes: at most one line per [`Self::INTERVAL`].
#[derive(Debug)]
struct HandshakeFailureLog {
    since_summary: AtomicU64,
    /// When the last summary was written (`None`: never). Held only to compare and set.
    last_summary: std::sync::Mutex<Option<Instant>>,
}

impl HandshakeFailureLog {
    const INTERVAL: Duration = Duration::from_secs(60);

    fn new() -> Self {
        HandshakeFailureLog {
            since_summary: AtomicU64::new(0),
            last_summary: std::sync::Mutex::new(None),
        }
    }

    /// Counts one failure; writes the summary if one is due.
    fn record(&self, reason: &str) {
        self.since_summary.fetch_add(1, Ordering::Relaxed);
        let now = Instant::now();
        let due = {
            let mut last = self.last_summary.lock().unwrap_or_else(|e| e.into_inner());
            let due = last.is_none_or(|t| now.duration_since(t) >= Self::INTERVAL);
            if due {
                *last = Some(now);
            }
            due
        };
        if due {
            let failed = self.since_summary.swap(0, Ordering::Relaxed);
            tracing::info!(target: "derp", failed, last_reason = reason,
                "derp handshakes failed since the last summary (at most one a minute; \
                 per-connection lines at debug, counts in derp_handshake_failures)");
        }
    }
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("public_key", &self.public_key)
            .field("connections", &self.connection_count())
            .finish_non_exhaustive()
    }
}

/// What [`Server::establish`] hands to the steady state.
struct Established<IO> {
    handle: Arc<ConnHandle>,
    io: IO,
    rbuf: BytesMut,
    params: ConnParams,
}

/// Decrements the task count when a connection future ends (even if it is dropped).
struct TaskGuard<'a>(&'a Server);

impl Drop for TaskGuard<'_> {
    fn drop(&mut self) {
        self.0.tasks.fetch_sub(1, Ordering::AcqRel);
        self.0.tasks_changed.notify_waiters();
    }
}

impl Server {
    /// Creates a server and registers its metrics in `registry`.
    pub fn new(
        config: ServerConfig,
        registry: &prometheus::Registry,
    ) -> Result<Arc<Server>, ServerError> {
        let metrics = Arc::new(Metrics::new(registry)?);
        let public_key = config.private_key.public();
        let mut rng = rand::thread_rng();
        let seed = [rng.next_u64(), rng.next_u64()];
        let rate_config = config.rate_config;
        let server = Arc::new(Server {
            registry: Registry::new(metrics.clone(), public_key, seed),
            rate: RateLimits::default(),
            mesh_metrics: crate::core::mesh::MeshMetrics::new(registry)?,
            metrics,
            public_key,
            config,
            next_conn_id: AtomicU64::new(1),
            shutting_down: AtomicBool::new(false),
            tasks: AtomicUsize::new(0),
            tasks_changed: Notify::new(),
            handshake_failures: HandshakeFailureLog::new(),
        });
        server.set_rate_config(rate_config);
        Ok(server)
    }

    /// Installs a per-client receive rate limit for every connection, existing ones included
    /// (each gets a fresh, full bucket), as derper's `UpdateRateLimits` does. Returns the
    /// configuration as applied (rate 0: off; burst raised to the minimum).
    pub fn set_rate_config(&self, rc: RateConfig) -> RateConfig {
        let applied = rc.applied();
        self.rate.set(applied);
        self.metrics
            .rate_limit_bytes_per_second
            .set(i64::try_from(applied.per_client_rate_limit_bytes_per_sec).unwrap_or(i64::MAX));
        self.metrics
            .rate_limit_burst_bytes
            .set(i64::try_from(applied.per_client_rate_burst_bytes).unwrap_or(i64::MAX));
        applied
    }

    /// The per-client receive rate limit in force.
    pub fn rate_config(&self) -> RateConfig {
        self.rate.current()
    }

    /// The server's DERP public key.
    pub fn public_key(&self) -> NodePublic {
        self.public_key
    }

    /// The configuration in use.
    pub fn config(&self) -> &ServerConfig {
        &self.config
    }

    /// Registered (post-handshake) client connections, duplicates included.
    pub fn connection_count(&self) -> usize {
        usize::try_from(self.metrics.current_connections.get()).unwrap_or(0)
    }

    /// Whether `key` currently has at least one local connection.
    pub fn is_connected(&self, key: &NodePublic) -> bool {
        self.registry.local_count(key) > 0
    }

    /// Number of local connections of `key` (more than one: duplicate connections).
    pub fn connections_of(&self, key: &NodePublic) -> usize {
        self.registry.local_count(key)
    }

    /// The connection id of the active connection of `key` (the one receiving its packets).
    pub fn active_connection_id(&self, key: &NodePublic) -> Option<u64> {
        self.registry.active_id(key)
    }

    /// Runs one connection to completion: `io` is the upgraded byte stream (TCP, TLS or
    /// WebSocket), `leftover` any bytes already read past the HTTP request head.
    pub fn accept<IO>(
        self: &Arc<Self>,
        io: IO,
        leftover: Bytes,
        info: ConnInfo,
    ) -> impl Future<Output = ()> + Send + 'static
    where
        IO: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        let srv = self.clone();
        let id = self.next_conn_id.fetch_add(1, Ordering::Relaxed);
        let span = tracing::info_span!(
            target: "derp",
            "derp_conn",
            conn_id = id,
            remote = %info.remote,
            peer = tracing::field::Empty
        );
        // Boxed, and created here rather than inside the async block: the handshake's state
        // (and the arguments it consumes) is large and short-lived, and a future is as big as
        // its largest state. Kept out, every idle connection's future holds only what the
        // steady state needs (see `idle_connection_future_is_small` in the tests).
        let establish = Box::pin(self.clone().establish(id, io, leftover, info));
        async move {
            srv.metrics.accepts.inc();
            srv.tasks.fetch_add(1, Ordering::AcqRel);
            let _guard = TaskGuard(&srv);
            let mut task = match establish.await {
                Some(e) => ConnTask::new(
                    &srv.registry,
                    &srv.metrics,
                    &srv.rate,
                    e.handle,
                    e.io,
                    e.rbuf,
                    e.params,
                ),
                None => return,
            };
            let why = task.run().await;
            drop(task);
            match &why {
                Close::Eof | Close::Shutdown | Close::KickedByMesh | Close::NotAdmitted => {
                    tracing::debug!(target: "derp", "derp connection closed: {why}")
                }
                _ => tracing::info!(target: "derp", "derp connection closed: {why}"),
            }
        }
        .instrument(span)
    }

    /// Handshake, registration and ServerInfo: everything before the steady state. Returns
    /// `None` (after logging and counting) if the connection ended or failed on the way.
    async fn establish<IO>(
        self: Arc<Self>,
        id: u64,
        mut io: IO,
        leftover: Bytes,
        info: ConnInfo,
    ) -> Option<Established<IO>>
    where
        IO: AsyncRead + AsyncWrite + Send + Unpin,
    {
        let mut rbuf = BytesMut::from(&leftover[..]);
        drop(leftover);
        let hs = tokio::time::timeout(
            self.config.handshake_timeout,
            self.handshake(&mut io, &mut rbuf, &info),
        )
        .await;
        let (key, client_info, mesh, pending) = match hs {
            Ok(Ok(v)) => v,
            Ok(Err(f)) => {
                self.metrics.handshake_failed(f.reason);
                tracing::debug!(target: "derp", conn_id = id, remote = %info.remote,
                    reason = f.reason, "derp handshake failed: {}", f.detail);
                self.handshake_failures.record(f.reason);
                return None;
            }
            Err(_) => {
                self.metrics.handshake_failed("timeout");
                tracing::debug!(target: "derp", conn_id = id, remote = %info.remote,
                    reason = "timeout", "derp handshake failed: deadline exceeded");
                self.handshake_failures.record("timeout");
                return None;
            }
        };
        tracing::Span::current().record("peer", tracing::field::display(key));

        let flags = PeerPresentFlags::for_client(client_info.is_prober, mesh, info.not_ideal);
        drop(client_info);
        let handle = Arc::new(ConnHandle::new(
            id,
            key,
            SendQueue::new(self.config.queue_depth, CONTROL_CAP),
            info.remote,
            flags,
            info.not_ideal,
        ));
        let mut nonce = [0u8; proto::derp::NONCE_LEN];
        rand::thread_rng().fill_bytes(&mut nonce);
        let server_info = server_info_frame(
            &self.config.private_key,
            &key,
            &ServerInfo::current(),
            nonce,
        );
        self.registry.register(&handle);
        if self.shutting_down.load(Ordering::Acquire) {
            // Registered after shutdown collected the connections: restart this one too.
            handle.queue.request_close(restart_request());
        }
        let keepalive = self.config.keepalive;
        let jitter_max = keepalive / 12;
        let jitter = if jitter_max.is_zero() {
            Duration::ZERO
        } else {
            rand::thread_rng().gen_range(Duration::ZERO..jitter_max)
        };
        let params = ConnParams {
            mesh,
            write_timeout: if mesh {
                MESH_WRITE_TIMEOUT
            } else {
                self.config.write_timeout
            },
            keepalive,
            keepalive_jitter: jitter,
        };
        // ServerInfo goes out after registration (so the client is routable once it sees it)
        // and before anything queued for it. Bounded by the write timeout.
        let write = async {
            io.write_all(&server_info).await?;
            io.flush().await
        };
        match tokio::time::timeout(params.write_timeout, write).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::info!(target: "derp", "derp connection closed: writing ServerInfo: {e}");
                self.abandon(handle);
                return None;
            }
            Err(_) => {
                self.metrics
                    .hot
                    .add(crate::core::metrics::Hot::WriteTimeouts, 1);
                tracing::info!(target: "derp", "derp connection closed: writing ServerInfo timed out");
                self.abandon(handle);
                return None;
            }
        }
        drop(server_info);
        if let (Some(grace), Some(adm)) = (pending, &self.config.admission) {
            self.watch_pending(adm.clone(), &handle, grace);
        }
        tracing::debug!(target: "derp", mesh, "derp client connected");
        Some(Established {
            handle,
            io,
            rbuf,
            params,
        })
    }

    /// Unregisters a connection that failed before its task started.
    fn abandon(&self, handle: Arc<ConnHandle>) {
        handle.close_queue(&self.metrics.hot);
        self.registry.unregister(
            &handle,
            crate::core::registry::SentTo::with_hasher(Default::default()),
        );
    }

    async fn handshake<IO>(
        &self,
        io: &mut IO,
        rbuf: &mut BytesMut,
        info: &ConnInfo,
    ) -> Result<(NodePublic, ClientInfo, bool, Option<Duration>), HandshakeFailure>
    where
        IO: AsyncRead + AsyncWrite + Unpin,
    {
        // ServerKey goes out first, before reading anything (also on fast start).
        io.write_all(&server_key_frame(&self.public_key))
            .await
            .map_err(|e| HandshakeFailure::new("io", e))?;
        io.flush()
            .await
            .map_err(|e| HandshakeFailure::new("io", e))?;

        read_at_least(io, rbuf, FRAME_HEADER_LEN).await?;
        let Some(hdr) = FrameHeader::decode(rbuf) else {
            return Err(HandshakeFailure::new("io", "short header"));
        };
        if let Err(e) = hdr.validate_client_info() {
            let reason = if hdr.typ == proto::derp::FrameType::ClientInfo.as_u8() {
                "bad_length"
            } else {
                "not_client_info"
            };
            return Err(HandshakeFailure::new(reason, e));
        }
        let total = FRAME_HEADER_LEN + hdr.payload_len();
        read_at_least(io, rbuf, total).await?;
        let frame = rbuf.split_to(total);
        let (key, client_info) = open_client_info(
            &self.config.private_key,
            &frame[FRAME_HEADER_LEN..],
        )
        .map_err(|e| {
            let reason = match &e {
                HandshakeError::ZeroKey => "zero_key",
                HandshakeError::Box(_) => "open_failed",
                HandshakeError::Info(_) => "bad_json",
                HandshakeError::TooShort { .. } | HandshakeError::TooLong { .. } => "bad_length",
                HandshakeError::Frame(_) => "not_client_info",
            };
            HandshakeFailure::new(reason, e)
        })?;
        drop(frame);
        let mesh = match (&self.config.mesh_key, &client_info.mesh_key) {
            (Some(ours), Some(theirs)) => !ours.is_zero() && ours == theirs,
            _ => false,
        };
        let mut pending = None;
        if !mesh {
            if let Some(adm) = &self.config.admission {
                pending = self.decide(adm.as_ref(), &key, info).await?;
            }
        }
        if self.shutting_down.load(Ordering::Acquire) {
            return Err(HandshakeFailure::new(
                "shutting_down",
                "server is shutting down",
            ));
        }
        Ok((key, client_info, mesh, pending))
    }

    /// Asks the admission about a non-mesh client and counts the answer. `Ok(Some(grace))`: admitted
    /// pending confirmation after `grace`.
    async fn decide(
        &self,
        adm: &dyn Admission,
        key: &NodePublic,
        info: &ConnInfo,
    ) -> Result<Option<Duration>, HandshakeFailure> {
        let refuse = |why: &dyn std::fmt::Display| {
            self.metrics.admission("refused");
            Err(HandshakeFailure::new(
                "admission_denied",
                format_args!("{key} not admitted: {why}"),
            ))
        };
        match adm.admit(key, info.remote.ip()).await {
            Decision::Admit => {
                self.metrics.admission("admitted");
                Ok(None)
            }
            Decision::Refuse(why) => refuse(&why),
            Decision::AdmitPending { grace } => {
                self.metrics.admission("pending");
                Ok(Some(grace))
            }
            Decision::VerifierError { admit, error } => {
                self.metrics.admission_verifier_errors.inc();
                if admit {
                    tracing::debug!(target: "derp", peer = %key, remote = %info.remote,
                        "admission verifier unreachable; admitting (fail open): {error}");
                    self.metrics.admission("admitted");
                    Ok(None)
                } else {
                    refuse(&format_args!("verifier unreachable (fail closed): {error}"))
                }
            }
        }
    }

    /// Closes `handle`'s connection after `grace` unless the admission knows its key by then.
    /// One sleeping task per pending connection; it holds only a weak reference.
    fn watch_pending(&self, adm: Arc<dyn Admission>, handle: &Arc<ConnHandle>, grace: Duration) {
        let weak = Arc::downgrade(handle);
        let metrics = self.metrics.clone();
        tokio::spawn(async move {
            tokio::time::sleep(grace).await;
            let Some(h) = weak.upgrade() else { return };
            if adm.confirm(&h.key) {
                metrics.admission("confirmed");
            } else if h.queue.request_close(CloseRequest::NotAdmitted) {
                metrics.admission("expired");
                // Debug: an unauthenticated client must not turn each connection into an INFO
                // line (counted in derp_admission_total{decision="expired"}).
                tracing::debug!(target: "derp", peer = %h.key, conn_id = h.id,
                    "closing derp connection: its node key did not become known within {grace:?}");
            }
        });
    }

    /// Graceful shutdown: sends Restarting (reconnect in 1 s, keep trying for 30 s) to every
    /// client, closes every connection and waits up to 5 s for them to finish.
    pub async fn shutdown(&self) {
        self.shutdown_with(Duration::from_secs(5)).await;
    }

    /// Like [`shutdown`](Self::shutdown) with a custom bound on the wait. Returns whether every
    /// connection finished in time.
    pub async fn shutdown_with(&self, wait: Duration) -> bool {
        self.shutting_down.store(true, Ordering::Release);
        for c in self.registry.all_conns() {
            c.queue.request_close(restart_request());
        }
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let notified = self.tasks_changed.notified();
            if self.tasks.load(Ordering::Acquire) == 0 {
                return true;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return self.tasks.load(Ordering::Acquire) == 0;
            }
        }
    }
}

fn restart_request() -> CloseRequest {
    CloseRequest::Restarting {
        reconnect_in_ms: 1_000,
        try_for_ms: 30_000,
    }
}

async fn read_at_least<IO: AsyncRead + Unpin>(
    io: &mut IO,
    buf: &mut BytesMut,
    n: usize,
) -> Result<(), HandshakeFailure> {
    if buf.len() < n {
        buf.reserve(n - buf.len());
    }
    while buf.len() < n {
        let got = io
            .read_buf(buf)
            .await
            .map_err(|e| HandshakeFailure::new("io", e))?;
        if got == 0 {
            return Err(HandshakeFailure::new(
                "io",
                "connection closed during handshake",
            ));
        }
    }
    Ok(())
}

/// One relay connection as [`Server::snapshot`] sees it.
#[derive(Debug, Clone)]
pub struct ClientSnapshot {
    /// The client's node key.
    pub key: NodePublic,
    /// Process-unique connection id (as in the logs).
    pub conn_id: u64,
    /// The client's address.
    pub remote: SocketAddr,
    /// Connected with the mesh key.
    pub mesh: bool,
    /// A prober (`ClientInfo.IsProber`).
    pub prober: bool,
    /// The client marked this relay as its home (NotePreferred).
    pub preferred: bool,
    /// The client said this relay is not its ideal node.
    pub not_ideal: bool,
    /// Another connection has the same key.
    pub duplicate: bool,
    /// This connection receives its key's packets.
    pub active: bool,
    /// Time since the handshake completed.
    pub connected_for: Duration,
    /// What waits in its queue.
    pub queue: QueueDepth,
}

/// One outbound mesh link as [`Server::snapshot`] sees it.
#[derive(Debug, Clone)]
pub struct MeshPeerSnapshot {
    /// The configured name (host or URL).
    pub name: String,
    /// The link is up.
    pub connected: bool,
    /// Packets waiting in its forward queue.
    pub queued: usize,
    /// Packets for it dropped so far.
    pub dropped: u64,
}

/// Packets and bytes dropped so far for one reason and kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DropCount {
    /// derper's `reason` label.
    pub reason: DropReason,
    /// disco or other.
    pub kind: PacketKind,
    /// Packets.
    pub packets: u64,
    /// Payload bytes.
    pub bytes: u64,
}

/// What the relay holds at one moment (read by the status page).
#[derive(Debug, Clone)]
pub struct RelaySnapshot {
    /// Up to the requested number of connections.
    pub clients: Vec<ClientSnapshot>,
    /// Every registered connection, listed or not.
    pub total_clients: usize,
    /// Outbound mesh links.
    pub mesh_peers: Vec<MeshPeerSnapshot>,
    /// Drops so far, every reason and kind.
    pub drops: Vec<DropCount>,
}

impl Server {
    /// A read-only snapshot of at most `limit` connections, the mesh links and the drop
    /// counters. Each registry shard is locked only to clone its handles, each queue only to
    /// count it; nothing is held across an `.await` (there is none).
    pub fn snapshot(&self, limit: usize) -> RelaySnapshot {
        let (handles, total_clients) = self.registry.sample(limit);
        let clients = handles
            .iter()
            .map(|h| ClientSnapshot {
                key: h.key,
                conn_id: h.id,
                remote: h.remote,
                mesh: h.presence_flags.contains(PeerPresentFlags::IS_MESH_PEER),
                prober: h.presence_flags.contains(PeerPresentFlags::IS_PROBER),
                preferred: h.preferred.load(Ordering::Relaxed),
                not_ideal: h.not_ideal,
                duplicate: h.is_dup.load(Ordering::Relaxed),
                active: h.is_active.load(Ordering::Relaxed),
                connected_for: h.connected_at.elapsed(),
                queue: h.queue.depth(),
            })
            .collect();
        let mesh_peers = self
            .mesh_metrics
            .peers()
            .iter()
            .map(|f| MeshPeerSnapshot {
                name: f.name().to_string(),
                connected: f.is_connected(),
                queued: f.queued(),
                dropped: f.dropped(),
            })
            .collect();
        let mut drops = Vec::with_capacity(DropReason::ALL.len() * 2);
        for reason in DropReason::ALL {
            for kind in [PacketKind::Disco, PacketKind::Other] {
                let (packets, bytes) = self.metrics.hot.dropped(reason, kind);
                drops.push(DropCount {
                    reason,
                    kind,
                    packets,
                    bytes,
                });
            }
        }
        RelaySnapshot {
            clients,
            total_clients,
            mesh_peers,
            drops,
        }
    }
}

/// Mesh peers (see [`crate::core::mesh`]): their forwarders and the routes they announce.
impl Server {
    /// Creates the forwarder of a new mesh peer named `name`, with a queue of `depth` packets
    /// (at least 1). The link keeps the receiver and drains it into its transport.
    pub fn add_mesh_peer(&self, name: &str, depth: usize) -> (Arc<MeshForwarder>, ForwardReceiver) {
        self.mesh_metrics.new_peer(name, depth)
    }

    /// The peer announced `key` (PeerPresent): packets for it go to `fwd` unless it has a local
    /// connection. Returns whether the route is new.
    pub fn mesh_peer_present(&self, fwd: &Arc<MeshForwarder>, key: NodePublic) -> bool {
        let added = self.registry.add_mesh_route(key, fwd);
        if added {
            self.mesh_metrics.routes.inc();
        }
        added
    }

    /// The peer no longer has `key` (PeerGone, or its link broke). Returns whether a route was
    /// removed.
    pub fn mesh_peer_gone(&self, fwd: &Arc<MeshForwarder>, key: NodePublic) -> bool {
        let removed = self.registry.remove_mesh_route(key, fwd);
        if removed {
            self.mesh_metrics.routes.dec();
        }
        removed
    }

    /// A mesh link went down (or stopped): drops the route of every key in `present` (emptying
    /// it) and discards the packets still queued for the peer, counted as forward drops. Both
    /// mesh transports call this, so a link that is down never keeps a route. Returns how many
    /// routes were cleared.
    pub fn mesh_link_down(
        &self,
        fwd: &Arc<MeshForwarder>,
        present: &mut std::collections::HashSet<NodePublic>,
        rx: &mut ForwardReceiver,
    ) -> usize {
        let n = present.len();
        for key in present.drain() {
            self.mesh_peer_gone(fwd, key);
        }
        let mut discarded = 0u64;
        while rx.try_recv().is_ok() {
            discarded += 1;
        }
        fwd.count_discarded(discarded);
        n
    }

    /// The mesh peer whose route `key` follows, if it has no local connection (tests, debugging).
    pub fn mesh_route_of(&self, key: &NodePublic) -> Option<MeshPeerId> {
        self.registry.mesh_route_of(key)
    }

    /// A presence feed for a link announcing this relay's clients to a peer: loaded with the
    /// complete list, then every change (see [`crate::core::mesh`]). Holds up to `cap` changes.
    pub fn presence_feed(&self, cap: usize) -> Arc<PresenceFeed> {
        let feed = self.mesh_metrics.new_feed(cap);
        self.registry.add_feed(&feed);
        feed
    }

    /// Reloads `feed` with the complete list after it overflowed.
    pub fn resync_presence(&self, feed: &Arc<PresenceFeed>) {
        self.registry.add_feed(feed);
    }

    /// Stops feeding `feed` (its link ended).
    pub fn drop_presence_feed(&self, feed: &Arc<PresenceFeed>) {
        self.registry.remove_feed(feed);
    }

    /// Delivers a packet a mesh peer forwarded (not over a DERP connection: the QUIC mesh) to
    /// the local client `dst`. `recv_frame` is the complete, checked RecvPacket frame
    /// (`05 len src payload`). Never forwarded again; the outcome is counted as for
    /// ForwardPacket frames. `last_pair` is the caller's memo of the last (source, receiver)
    /// pair noted for PeerGone (start with 0), so a run of packets notes it once. Returns
    /// whether it was queued.
    pub fn deliver_forwarded(
        &self,
        dst: NodePublic,
        recv_frame: Bytes,
        last_pair: &mut u64,
    ) -> bool {
        use proto::derp::{looks_like_disco, FRAME_HEADER_LEN, KEY_LEN, PACKET_PREFIX_LEN};
        let hot = &self.metrics.hot;
        hot.add(Hot::PacketsForwardedIn, 1);
        let Some(payload) = recv_frame.get(PACKET_PREFIX_LEN..) else {
            return false;
        };
        let pkt_len = payload.len();
        let disco = looks_like_disco(payload);
        let kind = PacketKind::from_disco(disco);
        let mut src = [0u8; KEY_LEN];
        src.copy_from_slice(&recv_frame[FRAME_HEADER_LEN..PACKET_PREFIX_LEN]);
        let src = NodePublic::from_bytes(src);
        let mut receiver = None;
        let outcome = self.registry.with_route(&dst, |r| match r {
            Route::Local(d) => {
                receiver = Some(d.clone());
                Some(d.queue.push_packet(recv_frame, disco))
            }
            Route::Mesh(_) | Route::Unknown => None,
        });
        let outcome = outcome.map(|(o, w)| {
            if let Some(w) = w {
                w.wake();
            }
            o
        });
        if let Some(r) = receiver {
            let mut w = [0u8; 8];
            w.copy_from_slice(&src.as_bytes()[..8]);
            let pair = (u64::from_le_bytes(w) ^ r.id.wrapping_mul(0x9E37_79B9_7F4A_7C15)) | 1;
            if pair != *last_pair {
                *last_pair = pair;
                self.registry.note_mesh_sender(&src, &r);
            }
        }
        match outcome {
            Some(PushOutcome::Queued) => true,
            Some(PushOutcome::DroppedHead(n)) => {
                hot.drop_packet(
                    DropReason::QueueHead,
                    kind,
                    n.saturating_sub(PACKET_PREFIX_LEN),
                );
                true
            }
            Some(PushOutcome::Closed) => {
                hot.drop_packet(DropReason::GoneDisconnected, kind, pkt_len);
                false
            }
            None => {
                hot.drop_packet(DropReason::UnknownDestOnFwd, kind, pkt_len);
                false
            }
        }
    }
}
