//! Forwarding the dRPC methods tailnetd does not serve itself to the upstream coderd, stream by
//! stream, byte for byte.
//!
//! Why: next to a real coderd, tailnetd owns coordination, but a modern agent has only one socket,
//! `GET /api/v2/workspaceagents/me/rpc`, and multiplexes the `coder.agent.v2.Agent` service
//! (`GetManifest`, `UpdateStats`, `BatchUpdateMetadata`, ...) with `coder.tailnet.v2.Tailnet` on
//! it. Coder Desktop likewise calls `WorkspaceUpdates` next to `Coordinate` on
//! `GET /api/v2/tailnet`. tailnetd answers the Tailnet methods itself ([`crate::service`]) and hands
//! every other stream to coderd through [`crate::rpc::drpc::Handler::take_over`]:
//!
//! - **One upstream session per downstream session.** The first forwarded stream dials the
//!   upstream's same endpoint (`/me/rpc` with the agent's `version` and `role`, or `/api/v2/tailnet`
//!   with `version`) as a WebSocket client with the peer's own token in `Coder-Session-Token`, and
//!   runs a yamux *client* over it ([`crate::rpc::wsio`] → [`crate::rpc::yamux::Session::client`]).
//!   Concurrent first streams wait for that one dial; later streams open yamux streams on it.
//! - **Lazy, not eager.** A real agent calls `GetManifest` within milliseconds of connecting and
//!   Coder Desktop calls `WorkspaceUpdates` at once, so dialing on first use costs them nothing
//!   (coderd's connection monitor, driven by `role=agent`, still sees the agent almost immediately),
//!   while sessions that only coordinate (tools, tests, Desktop builds without workspace updates,
//!   sessions with another `role`) never load coderd with a second socket. Tying every session's
//!   availability to coderd's at connect time would also make coordination fail whenever coderd
//!   restarts, for peers that never needed it.
//! - **Opaque streams.** A forwarded stream gets the bytes the dRPC server already consumed
//!   (`RawInvoke::consumed`: InvokeMetadata, Invoke, any read-ahead) written verbatim to a fresh
//!   upstream yamux stream, then both directions are copied with bounded buffers until both ends
//!   have half-closed (a FIN is passed on as a FIN, an error or RST resets both sides). Nothing of
//!   the stream is parsed, so Agent API versions tailnetd has never heard of pass through.
//! - **Upstream session loss ends the downstream session.** If the upstream WebSocket or yamux
//!   session ends while the downstream one is alive, the downstream session is closed (WebSocket
//!   1011), so the agent redials and gets a fresh upstream; a half-alive session whose Agent API
//!   is dead would leave the workspace looking disconnected in coderd forever.
//! - **Upstream unreachable on first use: Error, then close.** The stream(s) waiting for the dial
//!   get a dRPC Error packet (code 0, `upstream coderd unavailable: <why>` in Go's error-chain
//!   style, including coderd's HTTP message when it refused the upgrade, e.g. a 401 for a stale
//!   agent token), then the whole downstream session is closed once the peer has read the error
//!   (it closes its stream) or after [`REFUSE_GRACE`]. Closing rather than only erroring the
//!   stream is what Coder's peers expect: the agent's `apiConnRoutineManager` treats a failed
//!   Agent API call as fatal and tears the connection down to redial with backoff, and Desktop's
//!   tailnet controller restarts its whole connection when its WorkspaceUpdates controller fails.
//!   Keeping the session would only leave a session with no upstream that every later forwarded
//!   call would fail on again, and the redial is the retry (with the peer's own backoff).
//!
//! Which streams go upstream ([`is_forwarded`]): on `/me/rpc` everything outside
//! `coder.tailnet.v2.Tailnet`; on `/api/v2/tailnet` every method tailnetd does not serve
//! (`WorkspaceUpdates`, and Tailnet methods newer than ours). Only the *first* Invoke of a
//! transport decides; Coder's clients use one yamux stream per call, so that is every call.
//! Without a configured upstream nothing here runs and unknown methods keep their local
//! "unknown rpc" answer.
//!
//! This module must never parse or alter a forwarded stream, never buffer more than one bounded
//! copy buffer per direction per stream, never log tokens, never hold a lock across `.await`, and
//! never keep an upstream session after its downstream session ended.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use prometheus::{IntCounterVec, IntGauge, Opts, Registry};
use proto::drpc::{encode_error, encode_packet, Frame, Kind};
use proto::tailnet::v2::methods;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::OnceCell;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::WebSocketStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth::SESSION_TOKEN_HEADER;
use crate::rpc::drpc::RawInvoke;
use crate::rpc::wsio::{
    WsConfig, WsHandle, WsIo, CLOSE_NORMAL, RECOMMENDED_MAX_MESSAGE_SIZE,
    RECOMMENDED_READ_BUFFER_SIZE,
};
use crate::rpc::yamux::{self, Session, SessionHandle, Stream};

use super::{Upstream, UpstreamError, UpstreamIo};

/// Prefix of every `coder.tailnet.v2.Tailnet` method.
pub const TAILNET_SERVICE_PREFIX: &str = "/coder.tailnet.v2.Tailnet/";
/// Tailnet methods tailnetd serves itself on user-scoped (`/api/v2/tailnet`) sessions.
const LOCAL_TAILNET_METHODS: [&str; 4] = [
    methods::COORDINATE,
    methods::STREAM_DERP_MAPS,
    methods::REFRESH_RESUME_TOKEN,
    methods::POST_TELEMETRY,
];
/// How long a refused stream's peer gets to read the Error packet before the session closes.
pub const REFUSE_GRACE: Duration = Duration::from_secs(1);
/// Copy buffer per direction per forwarded stream.
const COPY_BUFFER: usize = 64 * 1024;
/// Largest error body read from an upstream that refused the WebSocket upgrade.
const MAX_ERROR_BODY: usize = 4 * 1024;
/// Time allowed to close an upstream session cleanly.
const CLOSE_GRACE: Duration = Duration::from_secs(2);

/// The endpoint a downstream session came in on; decides the upstream path and what is forwarded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    /// `GET /api/v2/workspaceagents/me/rpc` (agent token).
    AgentRpc,
    /// `GET /api/v2/tailnet` (user token, Coder Desktop).
    Tailnet,
}

impl Endpoint {
    /// The upstream path.
    pub fn path(self) -> &'static str {
        match self {
            Endpoint::AgentRpc => "/api/v2/workspaceagents/me/rpc",
            Endpoint::Tailnet => "/api/v2/tailnet",
        }
    }

    /// Metric label.
    pub fn label(self) -> &'static str {
        match self {
            Endpoint::AgentRpc => "agent_rpc",
            Endpoint::Tailnet => "tailnet",
        }
    }

    /// Query parameters passed on upstream (others, such as `resume_token` or tokens in the query,
    /// are ours or are carried by the header).
    fn forwarded_query_keys(self) -> &'static [&'static str] {
        match self {
            Endpoint::AgentRpc => &["version", "role"],
            Endpoint::Tailnet => &["version"],
        }
    }
}

/// Whether a stream whose first Invoke names `method` goes upstream.
pub fn is_forwarded(endpoint: Endpoint, method: &str) -> bool {
    match endpoint {
        Endpoint::AgentRpc => !method.starts_with(TAILNET_SERVICE_PREFIX),
        Endpoint::Tailnet => !LOCAL_TAILNET_METHODS.contains(&method),
    }
}

/// The raw query with only `keys` kept, values verbatim (still percent-encoded).
fn filter_query(query: Option<&str>, keys: &[&str]) -> String {
    let Some(q) = query else {
        return String::new();
    };
    q.split('&')
        .filter(|pair| {
            let key = pair.split_once('=').map_or(*pair, |(k, _)| k);
            keys.contains(&key)
        })
        .collect::<Vec<_>>()
        .join("&")
}

/// The stream id of the first Invoke in `consumed` (Coder's clients always use 1).
fn invoke_stream_id(consumed: &[u8]) -> u64 {
    let mut rest = consumed;
    while let Ok(Some((frame, n))) = Frame::parse(rest) {
        if frame.kind == Kind::Invoke {
            return frame.stream_id;
        }
        rest = rest.get(n..).unwrap_or(&[]);
    }
    1
}

/// `coordinator_upstream_rpc_*` metrics.
#[derive(Debug, Clone)]
pub struct UpstreamRpcMetrics {
    /// Dials of the upstream by endpoint and result (`ok`, `error`).
    pub dials: IntCounterVec,
    /// Live upstream sessions.
    pub sessions: IntGauge,
    /// Streams forwarded, by endpoint.
    pub streams: IntCounterVec,
    /// Failures by reason: `dial` (upstream unreachable or refused), `session_lost` (an upstream
    /// session ended under a live downstream session), `open_stream` (the upstream session refused
    /// a stream), `stream_io` (a forwarded stream failed mid-copy).
    pub failures: IntCounterVec,
    /// Bytes copied by direction (`to_upstream`, `to_downstream`), counted when a stream ends.
    pub bytes: IntCounterVec,
}

impl UpstreamRpcMetrics {
    /// Creates the metrics and registers them on `registry`.
    pub fn new(registry: &Registry) -> Result<Self, prometheus::Error> {
        let m = UpstreamRpcMetrics {
            dials: IntCounterVec::new(
                Opts::new(
                    "coordinator_upstream_rpc_dials_total",
                    "dials of the upstream coderd for forwarded dRPC streams",
                ),
                &["endpoint", "result"],
            )?,
            sessions: IntGauge::with_opts(Opts::new(
                "coordinator_upstream_rpc_sessions",
                "live upstream yamux sessions carrying forwarded dRPC streams",
            ))?,
            streams: IntCounterVec::new(
                Opts::new(
                    "coordinator_upstream_rpc_streams_total",
                    "dRPC streams forwarded to the upstream coderd",
                ),
                &["endpoint"],
            )?,
            failures: IntCounterVec::new(
                Opts::new(
                    "coordinator_upstream_rpc_failures_total",
                    "upstream forwarding failures by reason",
                ),
                &["reason"],
            )?,
            bytes: IntCounterVec::new(
                Opts::new(
                    "coordinator_upstream_rpc_bytes_total",
                    "bytes copied on forwarded dRPC streams",
                ),
                &["direction"],
            )?,
        };
        registry.register(Box::new(m.dials.clone()))?;
        registry.register(Box::new(m.sessions.clone()))?;
        registry.register(Box::new(m.streams.clone()))?;
        registry.register(Box::new(m.failures.clone()))?;
        registry.register(Box::new(m.bytes.clone()))?;
        Ok(m)
    }

    fn fail(&self, reason: &str) {
        self.failures.with_label_values(&[reason]).inc();
    }
}

/// The forwarding side of one coordinator: the [`Upstream`] it dials and its metrics. Cheap to
/// share.
#[derive(Debug)]
pub struct UpstreamRpc {
    upstream: Upstream,
    metrics: UpstreamRpcMetrics,
}

impl UpstreamRpc {
    /// Forwarding to `upstream`, counted on `metrics`.
    pub fn new(upstream: Upstream, metrics: UpstreamRpcMetrics) -> Self {
        UpstreamRpc { upstream, metrics }
    }

    /// The metrics.
    pub fn metrics(&self) -> &UpstreamRpcMetrics {
        &self.metrics
    }

    /// The forwarding state of one downstream session. `query` is the downstream request's raw
    /// query (only the keys coderd needs are passed on); `token` is the peer's own token.
    pub fn link(
        self: &Arc<Self>,
        endpoint: Endpoint,
        query: Option<&str>,
        token: String,
    ) -> Arc<UpstreamLink> {
        let q = filter_query(query, endpoint.forwarded_query_keys());
        let mut path = endpoint.path().to_string();
        if !q.is_empty() {
            path.push('?');
            path.push_str(&q);
        }
        let role = filter_query(query, &["role"]);
        let monitored_agent = endpoint == Endpoint::AgentRpc
            && matches!(role.as_str(), "" | "role" | "role=" | "role=agent");
        Arc::new(UpstreamLink {
            rpc: self.clone(),
            endpoint,
            path_and_query: path,
            token,
            session: OnceCell::new(),
            signals: Arc::new(Signals::default()),
            monitored_agent,
            tasks: TaskTracker::new(),
        })
    }

    /// TCP (+ TLS) + WebSocket handshake, bounded by [`Upstream::dial_timeout`].
    async fn dial(
        &self,
        path_and_query: &str,
        token: &str,
    ) -> Result<WebSocketStream<UpstreamIo>, UpstreamError> {
        let timeout = self.upstream.dial_timeout();
        tokio::time::timeout(timeout, self.dial_inner(path_and_query, token))
            .await
            .map_err(|_| UpstreamError::DialTimeout(timeout))?
    }

    async fn dial_inner(
        &self,
        path_and_query: &str,
        token: &str,
    ) -> Result<WebSocketStream<UpstreamIo>, UpstreamError> {
        let mut req = self
            .upstream
            .ws_url(path_and_query)
            .into_client_request()
            .map_err(|e| UpstreamError::Handshake(e.to_string()))?;
        let value = http::HeaderValue::from_str(token)
            .map_err(|_| UpstreamError::Handshake("token is not a valid header value".into()))?;
        req.headers_mut().insert(SESSION_TOKEN_HEADER, value);
        let io = self.upstream.connect_stream().await?;
        let config = WebSocketConfig::default()
            .max_message_size(Some(RECOMMENDED_MAX_MESSAGE_SIZE))
            .max_frame_size(Some(RECOMMENDED_MAX_MESSAGE_SIZE))
            .read_buffer_size(RECOMMENDED_READ_BUFFER_SIZE);
        match tokio_tungstenite::client_async_with_config(req, io, Some(config)).await {
            Ok((ws, _)) => Ok(ws),
            Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
                let status = resp.status().as_u16();
                let body = resp.body().as_deref().unwrap_or_default();
                Err(UpstreamError::Status {
                    status,
                    message: error_message(body),
                })
            }
            Err(e) => Err(UpstreamError::Handshake(e.to_string())),
        }
    }
}

/// coderd's `{"message": ...}` (plus `detail`), else the body as text; bounded.
fn error_message(body: &[u8]) -> String {
    let body = body.get(..MAX_ERROR_BODY).unwrap_or(body);
    if let Ok(v) = serde_json::from_slice::<serde_json::Value>(body) {
        if let Some(m) = v.get("message").and_then(|m| m.as_str()) {
            return match v.get("detail").and_then(|d| d.as_str()) {
                Some(d) if !d.is_empty() => format!("{m} {d}"),
                _ => m.to_string(),
            };
        }
    }
    String::from_utf8_lossy(body).trim().to_string()
}

/// Shared between a link and its upstream session's monitor task.
#[derive(Default)]
struct Signals {
    /// Fired when the downstream session must close; `reason` says why.
    failed: CancellationToken,
    reason: Mutex<Option<String>>,
    /// Fired when the downstream session has ended: the upstream session closes.
    done: CancellationToken,
}

impl Signals {
    fn fail(&self, reason: String) {
        if let Ok(mut g) = self.reason.lock() {
            if g.is_none() {
                *g = Some(reason);
            }
        }
        self.failed.cancel();
    }

    fn reason(&self) -> String {
        self.reason
            .lock()
            .ok()
            .and_then(|g| g.clone())
            .unwrap_or_else(|| "upstream failed".into())
    }
}

/// Forwarding state of one downstream session: its upstream session (dialed on first use) and
/// the signal that ends the downstream session when the upstream is lost.
pub struct UpstreamLink {
    rpc: Arc<UpstreamRpc>,
    endpoint: Endpoint,
    path_and_query: String,
    token: String,
    session: OnceCell<Result<SessionHandle, UpstreamError>>,
    signals: Arc<Signals>,
    /// An `/me/rpc` session whose `role` coderd monitors (empty or `agent`).
    monitored_agent: bool,
    /// The upstream session's one task (its yamux driver and [`monitor`]), held here so that the
    /// downstream session can wait for it ([`UpstreamLink::finished`]) and nothing outlives it.
    tasks: TaskTracker,
}

impl std::fmt::Debug for UpstreamLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamLink")
            .field("endpoint", &self.endpoint)
            .field("path", &self.path_and_query)
            .finish_non_exhaustive()
    }
}

impl Drop for UpstreamLink {
    fn drop(&mut self) {
        self.signals.done.cancel();
    }
}

impl UpstreamLink {
    /// Whether a stream whose first Invoke names `method` goes upstream.
    pub fn forwards(&self, method: &str) -> bool {
        is_forwarded(self.endpoint, method)
    }

    /// Resolves when the downstream session must be closed because the upstream is unusable;
    /// returns the reason (for the close frame and logs).
    pub async fn failed(&self) -> String {
        self.signals.failed.cancelled().await;
        self.signals.reason()
    }

    /// The downstream session ended: close the upstream session (if any) in the background.
    pub fn shutdown(&self) {
        self.signals.done.cancel();
    }

    /// Waits until the upstream session's task has finished (after [`UpstreamLink::shutdown`]:
    /// the upstream session closed, bounded by its close grace and write timeout). The
    /// downstream session waits for this before it reports closed.
    pub async fn finished(&self) {
        self.tasks.close();
        self.tasks.wait().await;
    }

    /// Whether an upstream session was dialed successfully and is still up.
    pub fn is_connected(&self) -> bool {
        matches!(self.session.get(), Some(Ok(h)) if !h.is_closed())
    }

    /// Whether this is an agent's `/me/rpc` session that coderd's connection monitor tracks
    /// (`role` empty or `agent`), i.e. the agent itself rather than a tool using its token.
    pub fn is_monitored_agent(&self) -> bool {
        self.monitored_agent
    }

    /// Counts a failure of a call tailnetd makes upstream itself (metric label `reason`).
    pub fn count_failure(&self, reason: &str) {
        self.rpc.metrics.fail(reason);
    }

    /// The endpoint this link forwards for.
    pub fn endpoint(&self) -> Endpoint {
        self.endpoint
    }

    /// The upstream session, dialed now if it was not yet: the sidecar bridge needs it without
    /// waiting for a forwarded stream (telemetry uses [`Self::session_for_telemetry`]). A failed dial fails the link
    /// like a failed first forwarded stream does (the downstream session closes and the peer
    /// redials).
    pub async fn session_or_fail(&self) -> Result<SessionHandle, UpstreamError> {
        match self.session().await {
            Ok(h) => Ok(h),
            Err(e) => {
                self.signals
                    .fail(format!("upstream coderd unavailable: {e}"));
                Err(e)
            }
        }
    }

    /// The upstream session for forwarded telemetry: dialed now if it was not yet, but unlike
    /// [`Self::session_or_fail`] a failed dial neither fails the link (the downstream session
    /// stays up) nor is remembered (a later forwarded stream or telemetry call dials again).
    /// Once the downstream session has ended nothing is dialed any more (an agent's `/me/rpc`
    /// would look connected to coderd again).
    pub async fn session_for_telemetry(&self) -> Result<SessionHandle, UpstreamError> {
        if self.signals.done.is_cancelled() && self.session.get().is_none() {
            return Err(UpstreamError::Session(
                "the downstream session has ended".into(),
            ));
        }
        self.session
            .get_or_try_init(|| async {
                match self.connect(DialPurpose::Telemetry).await {
                    Ok(h) => Ok(Ok(h)),
                    Err(e) => Err(e),
                }
            })
            .await?
            .clone()
    }

    /// Resolves once the downstream session has ended (or this link was dropped).
    pub async fn ended(&self) {
        self.signals.done.cancelled().await;
    }

    /// Runs one forwarded transport to completion (the [`crate::rpc::drpc::Handler::take_over`]
    /// future).
    pub async fn forward(self: Arc<Self>, raw: Box<RawInvoke>) {
        let metrics = &self.rpc.metrics;
        metrics
            .streams
            .with_label_values(&[self.endpoint.label()])
            .inc();
        let handle = match self.session().await {
            Ok(h) => h,
            Err(e) => {
                self.refuse(*raw, format!("upstream coderd unavailable: {e}"))
                    .await;
                return;
            }
        };
        let up = match handle.open().await {
            Ok(s) => s,
            Err(e) => {
                metrics.fail("open_stream");
                tracing::info!(
                    endpoint = self.endpoint.label(),
                    method = %raw.method,
                    error = %e,
                    "upstream session refused a forwarded stream; closing the session"
                );
                self.refuse(*raw, format!("upstream coderd unavailable: {e}"))
                    .await;
                return;
            }
        };
        let RawInvoke {
            method,
            consumed,
            reader,
            writer,
            ..
        } = *raw;
        let mut down = match reader.reunite(writer) {
            Ok(s) => s,
            Err((r, w)) => {
                // Cannot happen (the dRPC server hands over one stream's halves); never copy
                // between mismatched halves.
                metrics.fail("stream_io");
                tracing::warn!(method = %method, "forwarded stream halves do not match; reset");
                let _ = w.reset().await;
                drop(r);
                let _ = up.reset().await;
                return;
            }
        };
        let mut up = up;
        tracing::debug!(
            endpoint = self.endpoint.label(),
            method = %method,
            downstream_stream = down.id(),
            upstream_stream = up.id(),
            "forwarding dRPC stream upstream"
        );
        let res = match up.write_all(&consumed).await {
            Ok(()) => {
                tokio::io::copy_bidirectional_with_sizes(
                    &mut down,
                    &mut up,
                    COPY_BUFFER,
                    COPY_BUFFER,
                )
                .await
            }
            Err(e) => Err(e),
        };
        match res {
            Ok((to_up, to_down)) => {
                metrics
                    .bytes
                    .with_label_values(&["to_upstream"])
                    .inc_by(to_up.saturating_add(consumed.len() as u64));
                metrics
                    .bytes
                    .with_label_values(&["to_downstream"])
                    .inc_by(to_down);
            }
            Err(e) => {
                metrics.fail("stream_io");
                tracing::debug!(
                    endpoint = self.endpoint.label(),
                    method = %method,
                    error = %e,
                    "forwarded dRPC stream failed; resetting both sides"
                );
                let _ = down.reset().await;
                let _ = up.reset().await;
            }
        }
    }

    /// The upstream session, dialing it on first use (concurrent callers share one dial).
    async fn session(&self) -> Result<SessionHandle, UpstreamError> {
        self.session
            .get_or_init(|| self.connect(DialPurpose::Forward))
            .await
            .clone()
    }

    async fn connect(&self, purpose: DialPurpose) -> Result<SessionHandle, UpstreamError> {
        let rpc = &self.rpc;
        let endpoint = self.endpoint.label();
        let ws = match rpc.dial(&self.path_and_query, &self.token).await {
            Ok(ws) => ws,
            Err(e) => {
                rpc.metrics
                    .dials
                    .with_label_values(&[endpoint, "error"])
                    .inc();
                match purpose {
                    DialPurpose::Forward => {
                        rpc.metrics.fail("dial");
                        tracing::warn!(
                            endpoint,
                            upstream = %rpc.upstream.config().url,
                            error = %e,
                            "cannot reach the upstream coderd; closing the session"
                        );
                    }
                    // Counted and logged by the telemetry forwarder; the session stays.
                    DialPurpose::Telemetry => {}
                }
                return Err(e);
            }
        };
        rpc.metrics.dials.with_label_values(&[endpoint, "ok"]).inc();
        let (io, ws_handle) = WsIo::new(ws, WsConfig::client());
        let (session, driver) = Session::client_driven(io, yamux::Config::default());
        let handle = session.handle();
        rpc.metrics.sessions.inc();
        tracing::debug!(endpoint, "upstream session established");
        let monitor = monitor(
            session,
            ws_handle,
            self.signals.clone(),
            rpc.metrics.clone(),
            self.endpoint,
        );
        self.tasks.spawn(async move {
            tokio::join!(driver, monitor);
        });
        Ok(handle)
    }

    /// Answers a stream that cannot be forwarded with a dRPC Error (code 0), waits until the peer
    /// has read it (closes its side) or [`REFUSE_GRACE`] passes, then ends the downstream session.
    async fn refuse(&self, raw: RawInvoke, message: String) {
        let packet = refusal_packet(invoke_stream_id(&raw.consumed), &message);
        let RawInvoke {
            mut reader,
            mut writer,
            ..
        } = raw;
        let wait = async {
            if writer.write_all(&packet).await.is_ok() {
                let _ = writer.shutdown().await;
            }
            let mut sink = [0u8; 4096];
            while let Ok(n) = reader.read(&mut sink).await {
                if n == 0 {
                    break;
                }
            }
        };
        let _ = tokio::time::timeout(REFUSE_GRACE, wait).await;
        self.signals.fail(message);
    }
}

/// Why an upstream session is dialed: what a failed dial means for the downstream session.
#[derive(Debug, Clone, Copy)]
enum DialPurpose {
    /// A forwarded stream or the bridge: the downstream session closes.
    Forward,
    /// Forwarded telemetry: best effort, the downstream session stays.
    Telemetry,
}

/// Owns one upstream session: refuses streams coderd opens (it never should), notices the session
/// ending, closes it when the downstream session ends.
async fn monitor(
    mut session: Session,
    ws: WsHandle,
    signals: Arc<Signals>,
    metrics: UpstreamRpcMetrics,
    endpoint: Endpoint,
) {
    let lost = loop {
        tokio::select! {
            biased;
            _ = signals.done.cancelled() => break None,
            s = session.accept() => match s {
                Ok(stream) => refuse_inbound(stream).await,
                Err(e) => break Some(e),
            },
        }
    };
    let _ = tokio::time::timeout(CLOSE_GRACE, session.close()).await;
    let _ = tokio::time::timeout(CLOSE_GRACE, ws.close(CLOSE_NORMAL, "")).await;
    metrics.sessions.dec();
    if let Some(e) = lost {
        if !signals.done.is_cancelled() {
            metrics.fail("session_lost");
            let ws_end = if ws.is_ended() {
                format!("{:?}", ws.ended().await)
            } else {
                String::new()
            };
            tracing::warn!(
                endpoint = endpoint.label(),
                error = %e,
                websocket = %ws_end,
                "upstream coderd session ended; closing the downstream session"
            );
            signals.fail(format!("upstream coderd session ended: {e}"));
        }
    }
}

async fn refuse_inbound(stream: Stream) {
    tracing::debug!(
        stream = stream.id(),
        "upstream opened a stream towards us; reset"
    );
    let _ = stream.reset().await;
}

/// The dRPC Error packet (code 0, server message id 1) a refused stream gets.
pub fn refusal_packet(stream_id: u64, message: &str) -> Bytes {
    let mut packet = BytesMut::new();
    encode_packet(
        stream_id,
        1,
        Kind::Error,
        &encode_error(0, message),
        &mut packet,
    );
    packet.freeze()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forwarding_rules() {
        assert!(is_forwarded(
            Endpoint::AgentRpc,
            "/coder.agent.v2.Agent/GetManifest"
        ));
        assert!(is_forwarded(Endpoint::AgentRpc, "/x.Y/Z"));
        assert!(!is_forwarded(Endpoint::AgentRpc, methods::COORDINATE));
        assert!(!is_forwarded(
            Endpoint::AgentRpc,
            methods::WORKSPACE_UPDATES
        ));
        assert!(is_forwarded(Endpoint::Tailnet, methods::WORKSPACE_UPDATES));
        assert!(!is_forwarded(Endpoint::Tailnet, methods::COORDINATE));
        assert!(!is_forwarded(
            Endpoint::Tailnet,
            methods::REFRESH_RESUME_TOKEN
        ));
        assert!(!is_forwarded(Endpoint::Tailnet, methods::STREAM_DERP_MAPS));
        assert!(!is_forwarded(Endpoint::Tailnet, methods::POST_TELEMETRY));
    }

    #[test]
    fn query_filter() {
        let q = Some("version=2.10&role=agent&resume_token=abc&coder_session_token=s");
        assert_eq!(
            filter_query(q, &["version", "role"]),
            "version=2.10&role=agent"
        );
        assert_eq!(filter_query(q, &["version"]), "version=2.10");
        assert_eq!(filter_query(None, &["version"]), "");
        assert_eq!(filter_query(Some("role"), &["role"]), "role");
    }

    #[test]
    fn stream_id_of_invoke() {
        let mut b = BytesMut::new();
        encode_packet(7, 1, Kind::InvokeMetadata, b"\x0a\x00", &mut b);
        encode_packet(7, 2, Kind::Invoke, b"/a.B/C", &mut b);
        assert_eq!(invoke_stream_id(&b), 7);
        assert_eq!(invoke_stream_id(b"\xff"), 1);
    }

    #[test]
    fn coder_error_messages() {
        assert_eq!(
            error_message(br#"{"message":"Workspace agent not authorized.","detail":"x"}"#),
            "Workspace agent not authorized. x"
        );
        assert_eq!(error_message(b"plain\n"), "plain");
    }
}
