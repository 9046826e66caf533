//! v2 sessions: WebSocket → byte stream → yamux server → dRPC, serving Coder's
//! `coder.tailnet.v2.Tailnet` service for one authenticated peer.
//!
//! Why: every modern Coder agent (`/me/rpc`), CLI/IDE (`{id}/coordinate?version=2.x`) and Coder
//! Desktop (`/api/v2/tailnet`) speaks this stack. The HTTP layer fixes the peer's identity; this
//! module binds it to the dRPC methods:
//! - `Coordinate`: connects the peer to the graph and pumps requests in and responses out; the
//!   stream ends with Close when the graph closes the peer's receiver. A request that fails to
//!   decode ends only that stream (Error packet, log, metric; the peer is LOST).
//! - `StreamDERPMaps`: the current map at once, then every change.
//! - `RefreshResumeToken`: only on client endpoints (agents get "unimplemented", as from coderd).
//! - `PostTelemetry`: accepted, counted and answered at once; in sidecar mode also queued for the
//!   session's telemetry pump ([`crate::upstream::telemetry`]), which forwards it to coderd with
//!   the peer's own token (agents and Desktop: on their upstream session; clients of one agent: on
//!   an `/api/v2/tailnet` session dialled on first use). A failed forward never touches the
//!   peer's session.
//! - `WorkspaceUpdates`, the `coder.agent.v2.Agent` methods and unknown names: unimplemented
//!   (code 12 and `unknown rpc: ` text, which Go clients treat as "not supported"), unless an
//!   upstream coderd is configured: then [`crate::upstream::agent_rpc`] takes those streams over
//!   and forwards them byte for byte, and the session closes if that upstream is lost.
//!
//! This module must never block the graph (it only calls its non-blocking API) and never keep a
//! peer connected after its stream is gone (dropping the graph handle marks it LOST).

use std::future::Future;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use futures_util::future::Either;
use futures_util::{Sink, Stream};
use proto::tailnet::v2::methods;
use proto::tailnet::v2::{
    CoordinateRequest, CoordinateResponse, RefreshResumeTokenRequest, StreamDerpMapsRequest,
    TelemetryRequest, TelemetryResponse,
};
use tokio_util::sync::CancellationToken;
use tokio_util::task::AbortOnDropHandle;
use uuid::Uuid;

use crate::auth::UserIdentity;
use crate::authz::{AllowedAgents, CoordinateeAuth, TunnelPermissions};
use crate::graph::{Encoded, Flow, PeerReceiver, MAX_PEER_UPDATES_PER_RESPONSE};
use crate::metrics::{Protocol, Role};
use crate::rpc::drpc::{
    self, CallFuture, DrpcConfig, Handler, RawInvoke, RpcError, RpcStream, TakeOverFuture,
};
use crate::rpc::wsio::{
    WsConfig, WsEnd, WsHandle, WsIo, WsMessage, CLOSE_GOING_AWAY, CLOSE_INTERNAL_ERROR,
    CLOSE_NORMAL,
};
use crate::rpc::yamux::{self, Session, SessionError};
use crate::upstream::agent_rpc::UpstreamLink;
use crate::upstream::telemetry::{self, TelemetryQueue};
use crate::Coordinator;

/// What kind of peer a v2 session serves.
#[derive(Debug, Clone)]
pub(crate) enum PeerKind {
    /// A workspace agent (its id is the peer id).
    Agent,
    /// A client of one agent.
    Client {
        /// The only agent it may reach.
        agent_id: Uuid,
    },
    /// A user-scoped client; tunnels are checked with the authenticator as they are requested.
    ClientUser {
        /// The user.
        user: UserIdentity,
        /// Agents already allowed on this session.
        allowed: Arc<AllowedAgents>,
    },
}

/// Identity of a v2 session, fixed by the HTTP layer.
#[derive(Debug, Clone)]
pub(crate) struct V2Peer {
    /// Peer id in the graph.
    pub id: Uuid,
    /// Display name.
    pub name: String,
    /// What it is.
    pub kind: PeerKind,
    /// Whether `RefreshResumeToken` is served (client endpoints only).
    pub resume: bool,
    /// Sidecar mode: where streams tailnetd does not serve are forwarded.
    pub upstream: Option<Arc<UpstreamLink>>,
    /// Sidecar mode: where `PostTelemetry` is forwarded (the peer's own upstream session, or for
    /// clients of one agent a session dialled on first use with the client's token).
    pub telemetry: Option<Arc<UpstreamLink>>,
}

impl V2Peer {
    /// What kind of authenticated session this is, for the session log lines.
    fn kind_name(&self) -> &'static str {
        match self.kind {
            PeerKind::Agent => "agent",
            PeerKind::Client { .. } => "client",
            PeerKind::ClientUser { .. } => "client_user",
        }
    }

    fn role(&self) -> Role {
        match self.kind {
            PeerKind::Agent => Role::Agent,
            _ => Role::Client,
        }
    }

    fn auth(&self) -> CoordinateeAuth {
        match &self.kind {
            PeerKind::Agent => CoordinateeAuth::Agent { id: self.id },
            PeerKind::Client { agent_id } => CoordinateeAuth::Client {
                agent_id: *agent_id,
            },
            PeerKind::ClientUser { allowed, .. } => CoordinateeAuth::ClientUser {
                permissions: allowed.clone() as Arc<dyn TunnelPermissions>,
            },
        }
    }
}

/// Serve one upgraded WebSocket as a v2 session until it ends; in sidecar mode the session's
/// telemetry pump runs next to it and drains (bounded) after it. Generic over the WebSocket
/// (axum's in production, tungstenite's in the `v2_session` fuzz target).
///
/// Not an `async fn`: the returned future lives as long as the session, in every session's task,
/// and an `async fn` wrapper would keep its own copies of the WebSocket and the peer beside the
/// ones `run_session` holds (a moved-from argument keeps its slot). A session with telemetry is
/// boxed, so that the pump's state does not set the size of every other session's task.
pub(crate) fn serve_session<S, M, E>(
    coord: Arc<Coordinator>,
    ws: S,
    peer: V2Peer,
) -> impl Future<Output = ()> + Send
where
    S: Stream<Item = Result<M, E>> + Sink<M, Error = E> + Send + Unpin + 'static,
    M: WsMessage,
    E: std::fmt::Display + Send + 'static,
{
    // Wrapped here, not in `run_session`: the WebSocket (hundreds of bytes) would otherwise keep
    // a slot in that future for the session's life after being moved into the `WsIo`.
    let ws_config = WsConfig {
        ping_interval: Some(coord.config.ws_ping_interval),
        ping_timeout: coord.config.ws_pong_timeout,
        inactivity_timeout: match peer.kind {
            PeerKind::Agent => Some(coord.config.agent_inactive_disconnect_timeout),
            _ => None,
        },
        metrics: Some(coord.rpc_metrics.clone()),
        ..WsConfig::server()
    };
    let (io, ws_handle) = WsIo::new(ws, ws_config);
    match peer.telemetry.clone() {
        None => Either::Left(run_session(coord, io, ws_handle, peer, None)),
        Some(link) => Either::Right(Box::pin(async move {
            let (queue, pump) = telemetry::channel(link.clone(), peer.id);
            let session_ended = CancellationToken::new();
            let shutdown = coord.cancel.clone();
            let session = async {
                run_session(coord, io, ws_handle, peer, Some(queue)).await;
                session_ended.cancel();
            };
            tokio::join!(session, pump.run(session_ended.clone(), shutdown));
            // A client's telemetry link is its own upstream session: closed with this one.
            link.shutdown();
            link.finished().await;
        })),
    }
}

async fn run_session(
    coord: Arc<Coordinator>,
    io: WsIo,
    ws_handle: WsHandle,
    peer: V2Peer,
    telemetry: Option<TelemetryQueue>,
) {
    let _tracked = coord.sessions.track();
    let _session = coord.metrics.session(peer.role(), Protocol::V2);
    let metrics = Some(coord.rpc_metrics.clone());
    let session = Session::server(
        io,
        yamux::Config {
            max_streams: coord.config.session_max_streams.max(1),
            max_buffered_bytes: match peer.kind {
                PeerKind::Agent => coord.config.agent_session_max_buffered_bytes,
                _ => coord.config.client_session_max_buffered_bytes,
            },
            metrics: metrics.clone(),
            ..Default::default()
        },
    );
    let yamux_handle = session.handle();
    let peer_id = peer.id;
    let role = peer.role();
    let kind = peer.kind_name();
    let opened = std::time::Instant::now();
    let upstream = peer.upstream.clone();
    let handler: Arc<dyn Handler> = Arc::new(TailnetService {
        coord: coord.clone(),
        peer,
        telemetry,
    });
    let config = DrpcConfig {
        metrics,
        ..Default::default()
    };
    // One line per authenticated session open and close (the credentials never appear: only
    // the peer id and what kind of peer it is). Failed authentication never gets here.
    tracing::info!(peer = %peer_id, role = role.as_str(), kind, protocol = "v2",
        "coordination session opened");
    // Its own task (it must not slow the session's), owned here: it ends by itself once the
    // upstream link is shut down below, and is awaited (or aborted, if this future is dropped)
    // before the session reports closed.
    let bridge = upstream
        .as_ref()
        .filter(|link| crate::upstream::bridge::wants_bridge(&coord.config.upstream_bridge, link))
        .map(|link| {
            AbortOnDropHandle::new(tokio::spawn(crate::upstream::bridge::run(
                coord.graph.clone(),
                link.clone(),
                peer_id,
                coord.config.upstream_bridge.clone(),
                coord.bridge_metrics.clone(),
            )))
        });
    let upstream_failed = async {
        match &upstream {
            Some(u) => u.failed().await,
            None => std::future::pending().await,
        }
    };
    let mut upstream_lost = None;
    let end = tokio::select! {
        e = drpc::serve(session, handler, config) => Some(e),
        _ = coord.cancel.cancelled() => None,
        reason = upstream_failed => {
            upstream_lost = Some(reason);
            None
        }
    };
    if let Some(u) = &upstream {
        u.shutdown();
    }
    let ws_end = match (end, upstream_lost) {
        (None, Some(reason)) => {
            let _ = yamux_handle.close().await;
            ws_handle.close(CLOSE_INTERNAL_ERROR, &reason).await
        }
        (None, None) => {
            let _ = yamux_handle.close().await;
            ws_handle
                .close(CLOSE_GOING_AWAY, "coordinator shutting down")
                .await
        }
        (Some(SessionError::Eof | SessionError::Closed | SessionError::RemoteGoAwayNormal), _) => {
            ws_handle.close(CLOSE_NORMAL, "").await
        }
        (Some(e), _) => {
            if matches!(e, SessionError::Protocol(_)) {
                coord.metrics.protocol_error("yamux");
            }
            tracing::debug!(peer = %peer_id, error = %e, "v2 session ended with an error");
            ws_handle.close(CLOSE_INTERNAL_ERROR, &e.to_string()).await
        }
    };
    match ws_end {
        WsEnd::TextMessage => {
            coord.metrics.protocol_error("ws_text_message");
            tracing::info!(peer = %peer_id, "text message on a v2 session; closed");
        }
        WsEnd::LivenessFailed => {
            coord.metrics.protocol_error("liveness");
            tracing::info!(peer = %peer_id, "v2 peer failed the liveness probe; closed");
        }
        _ => {}
    }
    // Nothing of the session outlives it: the bridge, the upstream session's task and the yamux
    // driver (each bounded by its close grace or write timeout) have ended before it reports
    // closed.
    if let Some(bridge) = bridge {
        let _ = bridge.await;
    }
    if let Some(u) = &upstream {
        u.finished().await;
    }
    let _ = yamux_handle.closed().await;
    tracing::info!(peer = %peer_id, role = role.as_str(), kind, protocol = "v2", end = ?ws_end,
        duration_ms = u64::try_from(opened.elapsed().as_millis()).unwrap_or(u64::MAX),
        "coordination session closed");
}

/// The Tailnet dRPC service bound to one session's peer.
struct TailnetService {
    coord: Arc<Coordinator>,
    peer: V2Peer,
    /// Sidecar mode: where `PostTelemetry` requests wait for the session's telemetry pump.
    telemetry: Option<TelemetryQueue>,
}

impl Handler for TailnetService {
    fn call(self: Arc<Self>, method: &str, stream: RpcStream) -> Option<CallFuture> {
        match method {
            methods::COORDINATE => Some(Box::pin(self.coordinate(stream))),
            methods::STREAM_DERP_MAPS => Some(Box::pin(self.stream_derp_maps(stream))),
            methods::REFRESH_RESUME_TOKEN if self.peer.resume => {
                Some(Box::pin(self.refresh_resume_token(stream)))
            }
            methods::POST_TELEMETRY => Some(Box::pin(self.post_telemetry(stream))),
            _ => {
                tracing::debug!(peer = %self.peer.id, method, "unimplemented dRPC method");
                None
            }
        }
    }

    fn take_over(self: Arc<Self>, raw: Box<RawInvoke>) -> Result<TakeOverFuture, Box<RawInvoke>> {
        match &self.peer.upstream {
            Some(link) if link.forwards(&raw.method) => Ok(Box::pin(link.clone().forward(raw))),
            _ => Err(raw),
        }
    }
}

/// Decode failures end the call with an Error packet and are counted.
fn decode_failure(coord: &Coordinator, peer: Uuid, what: &str, e: RpcError) -> RpcError {
    match e {
        RpcError::Decode(msg) => {
            coord.metrics.protocol_error("protobuf_decode");
            tracing::info!(peer = %peer, error = %msg, "undecodable {what}; ending the stream");
            RpcError::new(0, format!("decode {what}: {msg}"))
        }
        other => other,
    }
}

impl TailnetService {
    async fn coordinate(self: Arc<Self>, mut stream: RpcStream) -> Result<(), RpcError> {
        let coord = &self.coord;
        let _coordinating = coord.coordinations.track();
        let (handle, mut rx) =
            coord
                .graph
                .connect(self.peer.id, self.peer.name.clone(), self.peer.auth());
        let mut wire = BytesMut::new();
        loop {
            // Requests arrive boxed: a 312-byte request held across `preauthorize`'s await (and
            // once more as the select's output) sized this future, which lives for the session.
            let next_request = async {
                let req = stream.recv_msg::<CoordinateRequest>().await;
                req.map(|r| r.map(Box::new))
            };
            tokio::select! {
                req = next_request => match req {
                    Ok(Some(req)) => {
                        self.preauthorize(&req).await;
                        match coord.graph.handle(&handle, *req) {
                            Ok(Flow::Continue) | Ok(Flow::Close) => {}
                            Err(e) => {
                                // The error response is queued and the receiver closes after it.
                                let kind = match e {
                                    crate::graph::CoordinateError::Authz(_) => "coordinate_unauthorized",
                                    crate::graph::CoordinateError::BadUuid(_) => "coordinate_bad_uuid",
                                    crate::graph::CoordinateError::MissingNode => "coordinate_missing_node",
                                    crate::graph::CoordinateError::TooManyEntries { .. }
                                    | crate::graph::CoordinateError::NodeTooLarge { .. } => "coordinate_node_over_limit",
                                    crate::graph::CoordinateError::TooManyTunnels { .. } => "coordinate_tunnels_over_limit",
                                };
                                coord.metrics.protocol_error(kind);
                            }
                        }
                    }
                    // CloseSend/Close from the client without a Disconnect: the peer is LOST.
                    Ok(None) => {
                        drop(handle);
                        let _ = stream.close().await;
                        return Ok(());
                    }
                    Err(e) => return Err(decode_failure(coord, self.peer.id, "CoordinateRequest", e)),
                },
                taken = rx.recv_encoded(&mut wire) => match taken {
                    Some(first) => {
                        let whole = take_queued(&mut rx, &mut wire, first);
                        if !wire.is_empty() {
                            // Taken whole (not split): the spare capacity of a split buffer would
                            // stay allocated beside the sent bytes until the next batch.
                            stream.send(std::mem::take(&mut wire).freeze()).await?;
                        }
                        if let Some(whole) = whole {
                            stream.send_msg(&whole).await?;
                        }
                    }
                    None => {
                        let _ = stream.close().await;
                        return Ok(());
                    }
                },
            }
        }
    }

    /// For user-scoped clients: ask the authenticator about every new `add_tunnel` destination
    /// before the graph (which cannot wait) authorizes the request.
    async fn preauthorize(&self, req: &CoordinateRequest) {
        let PeerKind::ClientUser { user, allowed } = &self.peer.kind else {
            return;
        };
        let Some(t) = &req.add_tunnel else { return };
        let Ok(agent) = Uuid::from_slice(&t.id) else {
            return;
        };
        if allowed.may_tunnel_to(agent) {
            return;
        }
        match self.coord.auth.user_may_reach(user, agent).await {
            Ok(true) => allowed.allow(agent),
            Ok(false) => self.coord.metrics.auth_failure("tunnel_forbidden"),
            Err(e) => {
                self.coord.metrics.auth_failure(e.reason());
                tracing::warn!(user = %user.username, agent = %agent, error = %e, "tunnel permission check failed");
            }
        }
    }

    async fn stream_derp_maps(self: Arc<Self>, mut stream: RpcStream) -> Result<(), RpcError> {
        let coord = &self.coord;
        stream
            .recv_msg::<StreamDerpMapsRequest>()
            .await
            .map_err(|e| decode_failure(coord, self.peer.id, "StreamDERPMapsRequest", e))?;
        let mut maps = coord.derp.subscribe();
        loop {
            let map = maps.borrow_and_update().proto.clone();
            stream.send_msg(&map).await?;
            tokio::select! {
                changed = maps.changed() => {
                    if changed.is_err() {
                        let _ = stream.close().await;
                        return Ok(());
                    }
                }
                _ = stream.cancelled() => return Ok(()),
                _ = coord.cancel.cancelled() => {
                    let _ = stream.close().await;
                    return Ok(());
                }
            }
        }
    }

    async fn refresh_resume_token(self: Arc<Self>, mut stream: RpcStream) -> Result<(), RpcError> {
        let coord = &self.coord;
        stream
            .recv_msg::<RefreshResumeTokenRequest>()
            .await
            .map_err(|e| decode_failure(coord, self.peer.id, "RefreshResumeTokenRequest", e))?;
        let issued = coord
            .resume
            .issue(self.peer.id)
            .map_err(|e| RpcError::new(0, format!("generate resume token: {e}")))?;
        stream.send_msg(&issued.to_proto()).await
    }

    async fn post_telemetry(self: Arc<Self>, mut stream: RpcStream) -> Result<(), RpcError> {
        let coord = &self.coord;
        let req = stream
            .recv_msg::<TelemetryRequest>()
            .await
            .map_err(|e| decode_failure(coord, self.peer.id, "TelemetryRequest", e))?;
        if let Some(req) = req {
            coord
                .metrics
                .telemetry_events
                .inc_by(req.events.len() as u64);
            if let Some(queue) = &self.telemetry {
                queue.offer(self.peer.id, req);
            }
        }
        stream
            .send(Bytes::from(prost::Message::encode_to_vec(
                &TelemetryResponse {},
            )))
            .await
    }
}

/// Most queued items a session sends as one message.
const MAX_MERGED_ITEMS: usize = 64;
/// A merged message stops growing at this size.
const MAX_MERGED_BYTES: usize = 256 * 1024;

/// Appends what else is already queued behind `first` to `wire`, which then holds one
/// `CoordinateResponse`; returns a response that must follow it as a message of its own.
///
/// Why: under load a peer's queue holds several items when its session wakes up, and each would
/// cost a dRPC message, a yamux frame, a WebSocket message and a write of its own. Coder's clients
/// apply `peer_updates` in order whatever the grouping (its own coordinator batches the initial
/// updates the same way), so one message carries them all. The updates arrive already encoded
/// (see [`PeerReceiver::try_recv_encoded`]): an update fanned out to many peers is encoded once.
/// A response with an error text is never merged, and nothing is taken after it.
fn take_queued(
    rx: &mut PeerReceiver,
    wire: &mut BytesMut,
    first: Encoded,
) -> Option<CoordinateResponse> {
    let mut updates = match first {
        Encoded::Whole(r) => return Some(r),
        Encoded::Appended(n) => n,
    };
    for _ in 1..MAX_MERGED_ITEMS {
        if updates >= MAX_PEER_UPDATES_PER_RESPONSE || wire.len() >= MAX_MERGED_BYTES {
            break;
        }
        match rx.try_recv_encoded(wire) {
            Ok(Encoded::Appended(n)) => updates += n,
            Ok(Encoded::Whole(r)) => return Some(r),
            Err(_) => break,
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use proto::tailnet::v2::coordinate_request::{Tunnel, UpdateSelf};
    use proto::tailnet::v2::{CoordinateRequest, Node};
    use uuid::Uuid;

    use bytes::BytesMut;
    use prost::Message;
    use proto::tailnet::v2::CoordinateResponse;

    use super::take_queued;
    use crate::authz::CoordinateeAuth;
    use crate::graph::{GraphConfig, PeerGraph};

    fn update(derp: i32) -> CoordinateRequest {
        CoordinateRequest {
            update_self: Some(UpdateSelf {
                node: Some(Node {
                    preferred_derp: derp,
                    ..Default::default()
                }),
            }),
            ..Default::default()
        }
    }

    #[test]
    fn queued_responses_merge_in_order_and_an_error_stays_last_and_alone() {
        let graph = PeerGraph::new(GraphConfig::default(), &prometheus::Registry::new()).unwrap();
        let (x, y) = (Uuid::from_u128(1), Uuid::from_u128(2));
        let (hx, mut rx) = graph.connect(x, "x".into(), CoordinateeAuth::SingleTailnet);
        let (hy, _ry) = graph.connect(y, "y".into(), CoordinateeAuth::SingleTailnet);
        let tunnel = CoordinateRequest {
            add_tunnel: Some(Tunnel {
                id: Bytes::copy_from_slice(y.as_bytes()),
            }),
            ..Default::default()
        };
        graph.handle(&hx, tunnel).unwrap();
        for derp in 1..=5 {
            graph.handle(&hy, update(derp)).unwrap();
        }
        let mut wire = BytesMut::new();
        let first = rx.try_recv_encoded(&mut wire).unwrap();
        assert!(take_queued(&mut rx, &mut wire, first).is_none());
        let merged = CoordinateResponse::decode(wire.split().freeze()).unwrap();
        let derps: Vec<i32> = merged
            .peer_updates
            .iter()
            .map(|u| u.node.as_ref().unwrap().preferred_derp)
            .collect();
        assert_eq!(derps, vec![1, 2, 3, 4, 5]);
        assert!(rx.try_recv().is_err(), "everything queued was merged");

        graph.handle(&hy, update(6)).unwrap();
        // x connects again: the old connection gets the "overwritten" error as its last response.
        let (_hx2, _rx2) = graph.connect(x, "x".into(), CoordinateeAuth::SingleTailnet);
        let mut sent = Vec::new();
        while let Ok(first) = rx.try_recv_encoded(&mut wire) {
            let whole = take_queued(&mut rx, &mut wire, first);
            if !wire.is_empty() {
                sent.push(CoordinateResponse::decode(wire.split().freeze()).unwrap());
            }
            sent.extend(whole);
        }
        let (last, before) = sent.split_last().unwrap();
        assert!(!last.error.is_empty(), "the overwritten error is sent last");
        assert!(last.peer_updates.is_empty(), "and alone");
        assert!(before.iter().all(|r| r.error.is_empty()));
    }
}
