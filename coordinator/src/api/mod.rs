//! Coder's coordination endpoints: who may connect, with which protocol, and the exact pre-upgrade
//! answers Go clients act on.
//!
//! Why: real Coder agents and clients of every generation dial these paths unchanged. Each
//! handler runs coderd's checks in coderd's order (token → agent id → access → version → resume
//! token) *before* looking at the WebSocket upgrade, so a plain GET gets the same status code a
//! Go client would see, then hands the socket to a v1 ([`crate::v1`]) or v2 ([`crate::service`])
//! session.
//!
//! This module must never log tokens and never hold a lock across `.await`.

mod admit;
pub mod caps;
pub mod errors;

use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::{
    rejection::WebSocketUpgradeRejection, Message, WebSocket, WebSocketUpgrade,
};
use axum::extract::{Path, RawQuery, State};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use futures_util::{SinkExt, StreamExt};
use http::{HeaderMap, StatusCode};
use tokio::time::Instant;
use uuid::Uuid;

use crate::auth::{
    query_value, token_from_request, AuthError, SESSION_TOKEN_COOKIE, SIGNED_OUT_MESSAGE,
};
use crate::authz::{AllowedAgents, CoordinateeAuth};
use crate::metrics::Role;
use crate::resume::ResumeError;
use crate::rpc::wsio::{
    CLOSE_GOING_AWAY, LIVENESS_FAILED_REASON, RECOMMENDED_MAX_MESSAGE_SIZE,
    RECOMMENDED_READ_BUFFER_SIZE,
};
use crate::service::{PeerKind, V2Peer};
use crate::upstream::agent_rpc::{Endpoint, UpstreamLink};
use crate::v1::V1Peer;
use crate::Coordinator;
pub use admit::DERP_ADMIT_PATH;
use caps::{CapKind, SessionSlot};
use errors::INVALID_RESUME_TOKEN_MESSAGE;
pub use errors::{parse_version, ApiError, ApiVersion, VersionError};

/// Coder's 404 when the user may not reach the agent.
pub const AGENT_NOT_FOUND_MESSAGE: &str =
    "Agent doesn't exist with that id, or you do not have access to it.";
/// Coder's 401 on `{id}/coordinate` without a usable credential.
pub const AUTH_REQUIRED_MESSAGE: &str =
    "API key or external proxy authentication required, but none provided";
/// WebSocket close code for client data on the server-only DERP map stream.
pub const CLOSE_POLICY: u16 = 1008;

type Upgrade = Result<WebSocketUpgrade, WebSocketUpgradeRejection>;

/// All coordination routes with `coord` as state.
pub(crate) fn router(coord: Arc<Coordinator>) -> Router {
    Router::new()
        .route(
            "/api/v2/workspaceagents/me/coordinate",
            get(agent_coordinate),
        )
        .route("/api/v2/workspaceagents/me/rpc", get(agent_rpc))
        .route(
            "/api/v2/workspaceagents/{agent}/coordinate",
            get(client_coordinate),
        )
        .route("/api/v2/tailnet", get(tailnet))
        .route("/api/v2/derp-map", get(derp_map))
        .route(DERP_MAP_JSON_PATH, get(derp_map_json))
        .route(DERP_ADMIT_PATH, axum::routing::post(admit::derp_admit))
        .with_state(coord)
}

fn shutting_down() -> ApiError {
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "The coordinator is shutting down.",
    )
}

/// Map an authenticator error onto Coder's response, counting it.
fn auth_error(coord: &Coordinator, e: AuthError, not_found: &str) -> ApiError {
    coord.metrics.auth_failure(e.reason());
    match e {
        AuthError::InvalidToken { message, detail } => {
            let mut r = ApiError::new(StatusCode::UNAUTHORIZED, message);
            r.detail = detail;
            r
        }
        AuthError::Forbidden => ApiError::new(StatusCode::NOT_FOUND, not_found),
        // Coder's browser-only answer: `{"message": ...}` with 409.
        AuthError::Conflict { message } => ApiError::new(StatusCode::CONFLICT, message),
        AuthError::Unavailable(d) => {
            tracing::warn!(error = %d, "authentication backend unavailable");
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "Authentication backend unavailable.",
            )
            .detail(d)
        }
    }
}

/// Agent token → identity, with Coder's 401 texts.
async fn authenticate_agent(
    coord: &Coordinator,
    headers: &HeaderMap,
    query: Option<&str>,
) -> Result<crate::auth::AgentIdentity, ApiError> {
    let Some(token) = token_from_request(headers, query) else {
        coord.metrics.auth_failure("missing_token");
        return Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            format!("Cookie \"{SESSION_TOKEN_COOKIE}\" must be provided."),
        ));
    };
    if Uuid::parse_str(&token).is_err() {
        coord.metrics.auth_failure("malformed_token");
        return Err(
            ApiError::new(StatusCode::UNAUTHORIZED, "Workspace agent token invalid.")
                .detail("An agent token must be a valid UUIDv4."),
        );
    }
    coord
        .auth
        .agent(&token)
        .await
        .map_err(|e| auth_error(coord, e, AGENT_NOT_FOUND_MESSAGE))
}

/// Validate `version` (defaulting to `default`) the way coderd does.
fn version(
    coord: &Coordinator,
    query: Option<&str>,
    default: &str,
    allow_v1: bool,
) -> Result<ApiVersion, ApiError> {
    let v = query_value(query, "version").unwrap_or_else(|| default.to_string());
    parse_version(&v, allow_v1).map_err(|e| {
        coord.metrics.protocol_error("bad_version");
        ApiError::version(e)
    })
}

/// Coder's `handleResumeToken`: absent → fresh id; valid → its id; no `kid` → fresh id;
/// anything else → 401 with a `resume_token` validation.
fn resume_peer_id(coord: &Coordinator, query: Option<&str>) -> Result<Uuid, ApiError> {
    let Some(token) = query_value(query, "resume_token") else {
        return Ok(Uuid::new_v4());
    };
    match coord.resume.verify(&token) {
        Ok(id) => Ok(id),
        Err(ResumeError::MissingKeyId) => Ok(Uuid::new_v4()),
        Err(e) => {
            coord.metrics.auth_failure("invalid_resume_token");
            Err(
                ApiError::new(StatusCode::UNAUTHORIZED, INVALID_RESUME_TOKEN_MESSAGE)
                    .detail(format!("verify resume token: {e}"))
                    .validation("resume_token", INVALID_RESUME_TOKEN_MESSAGE),
            )
        }
    }
}

/// A place for one more session of `key` under its cap (see [`caps`]), or Coder's 429 JSON
/// answer (logged and counted), given before the WebSocket upgrade.
fn session_slot(coord: &Coordinator, kind: CapKind, key: Uuid) -> Result<SessionSlot, ApiError> {
    coord.caps.acquire(kind, key).map_err(|e| {
        tracing::info!(
            kind = kind.as_str(),
            id = %key,
            limit = e.limit,
            "coordination session refused: too many concurrent sessions"
        );
        ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "Too many concurrent coordination sessions.",
        )
        .detail(e.to_string())
    })
}

/// `GET /api/v2/workspaceagents/me/coordinate`: the agent's coordination socket. No `version` or
/// 1.x = v1 JSON (as agents before v2.8 dialed it); 2.x = the v2 stack.
async fn agent_coordinate(
    State(coord): State<Arc<Coordinator>>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
    ws: Upgrade,
) -> Response {
    if coord.is_shutting_down() {
        return shutting_down().into_response();
    }
    let q = query.as_deref();
    let agent = match authenticate_agent(&coord, &headers, q).await {
        Ok(a) => a,
        Err(e) => return e.into_response(),
    };
    let v = match version(&coord, q, "1.0", true) {
        Ok(v) => v,
        Err(e) => return e.into_response(),
    };
    let ws = match accept(ws, &headers) {
        Ok(ws) => ws,
        Err(r) => return *r,
    };
    let slot = match session_slot(&coord, CapKind::Agent, agent.agent_id) {
        Ok(s) => s,
        Err(e) => return e.into_response(),
    };
    if v.major == 1 {
        let peer = V1Peer {
            id: agent.agent_id,
            name: agent.name,
            role: Role::Agent,
            auth: CoordinateeAuth::Agent { id: agent.agent_id },
            tunnel_to: None,
        };
        upgrade_v1(coord, ws, peer, slot)
    } else {
        let peer = V2Peer {
            id: agent.agent_id,
            name: agent.name,
            kind: PeerKind::Agent,
            resume: false,
            upstream: None,
            telemetry: None,
        };
        upgrade_v2(coord, ws, peer, slot)
    }
}

/// `GET /api/v2/workspaceagents/me/rpc`: the agent's dRPC socket (version default 2.0).
async fn agent_rpc(
    State(coord): State<Arc<Coordinator>>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
    ws: Upgrade,
) -> Response {
    if coord.is_shutting_down() {
        return shutting_down().into_response();
    }
    let q = query.as_deref();
    let agent = match authenticate_agent(&coord, &headers, q).await {
        Ok(a) => a,
        Err(e) => return e.into_response(),
    };
    if let Err(e) = version(&coord, q, "2.0", false) {
        return e.into_response();
    }
    let ws = match accept(ws, &headers) {
        Ok(ws) => ws,
        Err(r) => return *r,
    };
    let slot = match session_slot(&coord, CapKind::Agent, agent.agent_id) {
        Ok(s) => s,
        Err(e) => return e.into_response(),
    };
    let role = query_value(q, "role").unwrap_or_default();
    tracing::debug!(agent = %agent.agent_id, role = %role, "agent rpc connection");
    let upstream = upstream_link(&coord, Endpoint::AgentRpc, &headers, q);
    let peer = V2Peer {
        id: agent.agent_id,
        name: agent.name,
        kind: PeerKind::Agent,
        resume: false,
        telemetry: upstream.clone(),
        upstream,
    };
    upgrade_v2(coord, ws, peer, slot)
}

/// `GET /api/v2/workspaceagents/{agent}/coordinate`: a client's socket for one agent.
async fn client_coordinate(
    State(coord): State<Arc<Coordinator>>,
    Path(agent): Path<String>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
    ws: Upgrade,
) -> Response {
    if coord.is_shutting_down() {
        return shutting_down().into_response();
    }
    let q = query.as_deref();
    // 1. A user credential is optional on this route in coderd (a proxy token is the other
    //    option), so a bad token reads as "none provided".
    let user = match token_from_request(&headers, q) {
        None => {
            coord.metrics.auth_failure("missing_token");
            return ApiError::new(StatusCode::UNAUTHORIZED, AUTH_REQUIRED_MESSAGE).into_response();
        }
        Some(token) => match coord.auth.user(&token).await {
            Ok(u) => u,
            Err(AuthError::InvalidToken { .. }) => {
                coord.metrics.auth_failure("invalid_token");
                return ApiError::new(StatusCode::UNAUTHORIZED, AUTH_REQUIRED_MESSAGE)
                    .into_response();
            }
            Err(e) => return auth_error(&coord, e, AGENT_NOT_FOUND_MESSAGE).into_response(),
        },
    };
    // 2. The agent id.
    let Ok(agent_id) = Uuid::parse_str(&agent) else {
        coord.metrics.protocol_error("bad_agent_id");
        return ApiError::new(StatusCode::BAD_REQUEST, format!("Invalid UUID {agent:?}."))
            .detail(format!("invalid UUID length: {}", agent.len()))
            .into_response();
    };
    // 3. May this user reach it?
    match coord.auth.user_may_reach(&user, agent_id).await {
        Ok(true) => {}
        Ok(false) => {
            coord.metrics.auth_failure("forbidden");
            return ApiError::new(StatusCode::NOT_FOUND, AGENT_NOT_FOUND_MESSAGE).into_response();
        }
        Err(e) => return auth_error(&coord, e, AGENT_NOT_FOUND_MESSAGE).into_response(),
    }
    // 4. Version (1.x still served here, unlike current coderd).
    let v = match version(&coord, q, "1.0", true) {
        Ok(v) => v,
        Err(e) => return e.into_response(),
    };
    // 5. Resume token.
    let peer_id = match resume_peer_id(&coord, q) {
        Ok(id) => id,
        Err(e) => return e.into_response(),
    };
    let ws = match accept(ws, &headers) {
        Ok(ws) => ws,
        Err(r) => return *r,
    };
    let slot = match session_slot(&coord, CapKind::User, user.user_id) {
        Ok(s) => s,
        Err(e) => return e.into_response(),
    };
    tracing::debug!(user = %user.username, agent = %agent_id, peer = %peer_id, "client coordinate connection");
    if v.major == 1 {
        let peer = V1Peer {
            id: peer_id,
            name: "client".into(),
            role: Role::Client,
            auth: CoordinateeAuth::Client { agent_id },
            tunnel_to: Some(agent_id),
        };
        upgrade_v1(coord, ws, peer, slot)
    } else {
        let peer = V2Peer {
            id: peer_id,
            name: "client".into(),
            kind: PeerKind::Client { agent_id },
            resume: true,
            upstream: None,
            telemetry: telemetry_link(&coord, &headers, q),
        };
        upgrade_v2(coord, ws, peer, slot)
    }
}

/// `GET /api/v2/tailnet`: a user-scoped client (Coder Desktop) that may tunnel to every agent the
/// authenticator allows.
async fn tailnet(
    State(coord): State<Arc<Coordinator>>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
    ws: Upgrade,
) -> Response {
    if coord.is_shutting_down() {
        return shutting_down().into_response();
    }
    let q = query.as_deref();
    let Some(token) = token_from_request(&headers, q) else {
        coord.metrics.auth_failure("missing_token");
        return ApiError::new(StatusCode::UNAUTHORIZED, SIGNED_OUT_MESSAGE)
            .detail(format!(
                "Cookie \"{SESSION_TOKEN_COOKIE}\" or query parameter must be provided."
            ))
            .into_response();
    };
    let user = match coord.auth.user(&token).await {
        Ok(u) => u,
        Err(e) => return auth_error(&coord, e, AGENT_NOT_FOUND_MESSAGE).into_response(),
    };
    if let Err(e) = version(&coord, q, "2.0", false) {
        return e.into_response();
    }
    let peer_id = match resume_peer_id(&coord, q) {
        Ok(id) => id,
        Err(e) => return e.into_response(),
    };
    let ws = match accept(ws, &headers) {
        Ok(ws) => ws,
        Err(r) => return *r,
    };
    let slot = match session_slot(&coord, CapKind::User, user.user_id) {
        Ok(s) => s,
        Err(e) => return e.into_response(),
    };
    let upstream = upstream_link(&coord, Endpoint::Tailnet, &headers, q);
    let peer = V2Peer {
        id: peer_id,
        name: "client".into(),
        kind: PeerKind::ClientUser {
            user,
            allowed: Arc::new(AllowedAgents::new()),
        },
        resume: true,
        telemetry: upstream.clone(),
        upstream,
    };
    upgrade_v2(coord, ws, peer, slot)
}

/// The WebSocket layer's own checks, answered as coder/websocket's `Accept` does (plain text):
/// 426 when the request is not an upgrade, 400 for a bad version/key, 403 when an `Origin`
/// header names another host than `Host` (CLI and agents send no `Origin`).
fn accept(ws: Upgrade, headers: &HeaderMap) -> Result<WebSocketUpgrade, Box<Response>> {
    let ws = ws.map_err(|r| {
        use WebSocketUpgradeRejection as R;
        let (status, text) = match &r {
            R::InvalidConnectionHeader(_) => (
                StatusCode::UPGRADE_REQUIRED,
                "WebSocket protocol violation: Connection header does not contain Upgrade",
            ),
            R::InvalidUpgradeHeader(_) | R::ConnectionNotUpgradable(_) => (
                StatusCode::UPGRADE_REQUIRED,
                "WebSocket protocol violation: Upgrade header does not contain websocket",
            ),
            _ => return Box::new(r.into_response()),
        };
        Box::new((status, text).into_response())
    })?;
    if let Some(origin) = headers.get(http::header::ORIGIN) {
        let host = headers
            .get(http::header::HOST)
            .and_then(|h| h.to_str().ok())
            .unwrap_or("");
        let origin = origin.to_str().unwrap_or("");
        let origin_host = origin
            .split_once("://")
            .map(|(_, rest)| rest.split(['/', '?', '#']).next().unwrap_or(""))
            .unwrap_or("");
        if origin_host.is_empty() {
            return Err(Box::new(
                (
                    StatusCode::FORBIDDEN,
                    format!("request Origin {origin:?} is not a valid URL with a host"),
                )
                    .into_response(),
            ));
        }
        if !origin_host.eq_ignore_ascii_case(host) {
            return Err(Box::new(
                (
                    StatusCode::FORBIDDEN,
                    format!("request Origin {origin:?} is not authorized for Host {host:?}"),
                )
                    .into_response(),
            ));
        }
    }
    Ok(ws)
}

/// Sidecar mode: the session's forwarding state, carrying the peer's own token to coderd.
fn upstream_link(
    coord: &Coordinator,
    endpoint: Endpoint,
    headers: &HeaderMap,
    query: Option<&str>,
) -> Option<Arc<UpstreamLink>> {
    let rpc = coord.upstream_rpc.as_ref()?;
    let token = token_from_request(headers, query)?;
    Some(rpc.link(endpoint, query, token))
}

/// Sidecar mode, clients of one agent: where their `PostTelemetry` goes. coderd serves the same
/// Tailnet service (and telemetry handler) on `/api/v2/tailnet` as on `{id}/coordinate`; the
/// session is dialled with the client's own token on the first telemetry call only.
fn telemetry_link(
    coord: &Coordinator,
    headers: &HeaderMap,
    query: Option<&str>,
) -> Option<Arc<UpstreamLink>> {
    let rpc = coord.upstream_rpc.as_ref()?;
    let token = token_from_request(headers, query)?;
    Some(rpc.link(Endpoint::Tailnet, Some("version=2.3"), token))
}

/// Upgrades to a v1 session. `slot` is held until the session ends (dropped with the upgrade
/// callback if the upgrade fails).
fn upgrade_v1(
    coord: Arc<Coordinator>,
    ws: WebSocketUpgrade,
    peer: V1Peer,
    slot: SessionSlot,
) -> Response {
    let max = coord.config.v1_max_message.saturating_add(64 * 1024);
    ws.max_message_size(max)
        .max_frame_size(max)
        .read_buffer_size(RECOMMENDED_READ_BUFFER_SIZE)
        .on_upgrade(move |socket| async move {
            crate::v1::serve(coord, socket, peer).await;
            drop(slot);
        })
}

/// Upgrades to a v2 session, holding `slot` as [`upgrade_v1`] does.
fn upgrade_v2(
    coord: Arc<Coordinator>,
    ws: WebSocketUpgrade,
    peer: V2Peer,
    slot: SessionSlot,
) -> Response {
    ws.max_message_size(RECOMMENDED_MAX_MESSAGE_SIZE)
        .max_frame_size(RECOMMENDED_MAX_MESSAGE_SIZE)
        .read_buffer_size(RECOMMENDED_READ_BUFFER_SIZE)
        .on_upgrade(move |socket| async move {
            crate::service::serve_session(coord, socket, peer).await;
            drop(slot);
        })
}

/// Where the current DERP map is served as plain JSON (Tailscale's `DERPMap` form, the same bytes
/// as on the `/api/v2/derp-map` WebSocket), for coderd's `CODER_DERP_CONFIG_URL`: coderd's own
/// tailnet must reach the relays agents home on.
pub const DERP_MAP_JSON_PATH: &str = "/tailnetd/derp-map.json";

/// `GET` [`DERP_MAP_JSON_PATH`]: unauthenticated, like the DERP map WebSocket.
async fn derp_map_json(State(coord): State<Arc<Coordinator>>) -> Response {
    let snapshot = coord.derp.current();
    (
        [
            (http::header::CONTENT_TYPE, "application/json"),
            (http::header::CACHE_CONTROL, "no-store"),
        ],
        snapshot.json.clone(),
    )
        .into_response()
}

/// `GET /api/v2/derp-map`: unauthenticated, server → client JSON DERP maps.
async fn derp_map(
    State(coord): State<Arc<Coordinator>>,
    headers: HeaderMap,
    ws: Upgrade,
) -> Response {
    if coord.is_shutting_down() {
        return shutting_down().into_response();
    }
    match accept(ws, &headers) {
        Ok(ws) => ws
            .max_message_size(64 * 1024)
            .read_buffer_size(RECOMMENDED_READ_BUFFER_SIZE)
            .on_upgrade(move |socket| serve_derp_map(coord, socket)),
        Err(r) => *r,
    }
}

/// Send the current map at once and every change after it; ping every `ws_ping_interval`; any
/// data from the client closes with 1008 (Coder's encoder calls `CloseRead`).
async fn serve_derp_map(coord: Arc<Coordinator>, socket: WebSocket) {
    let _tracked = coord.sessions.track();
    let (mut sink, mut stream) = socket.split();
    let mut maps = coord.derp.subscribe();
    let write_timeout = coord.config.v1_write_timeout;
    let ping_every = coord.config.ws_ping_interval.max(Duration::from_millis(10));
    let mut ping = tokio::time::interval_at(Instant::now() + ping_every, ping_every);
    let mut pong_deadline: Option<Instant> = None;
    let mut send_now = true;
    let close: Option<(u16, &str)> = loop {
        if send_now {
            send_now = false;
            let json = maps.borrow_and_update().json.clone();
            match tokio::time::timeout(write_timeout, sink.send(Message::Binary(json))).await {
                Ok(Ok(())) => {}
                _ => break None,
            }
        }
        let deadline = pong_deadline;
        tokio::select! {
            changed = maps.changed() => {
                if changed.is_err() { break Some((CLOSE_GOING_AWAY, "")); }
                send_now = true;
            }
            msg = stream.next() => match msg {
                Some(Ok(Message::Pong(_))) => pong_deadline = None,
                Some(Ok(Message::Ping(_))) => {}
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => break None,
                Some(Ok(_)) => {
                    coord.metrics.protocol_error("derp_map_client_data");
                    tracing::debug!("client sent data on /api/v2/derp-map; closing");
                    break Some((CLOSE_POLICY, "unexpected data message"));
                }
            },
            _ = ping.tick() => {
                if pong_deadline.is_none() {
                    match tokio::time::timeout(write_timeout, sink.send(Message::Ping(bytes::Bytes::from_static(b"derp-map")))).await {
                        Ok(Ok(())) => pong_deadline = Some(Instant::now() + coord.config.ws_pong_timeout),
                        _ => break None,
                    }
                }
            }
            _ = async move {
                match deadline {
                    Some(d) => tokio::time::sleep_until(d).await,
                    None => std::future::pending().await,
                }
            } => {
                coord.metrics.protocol_error("liveness");
                break Some((CLOSE_GOING_AWAY, LIVENESS_FAILED_REASON));
            }
            _ = coord.cancel.cancelled() => break Some((CLOSE_GOING_AWAY, "")),
        }
    };
    if let Some((code, reason)) = close {
        let frame = Message::Close(Some(axum::extract::ws::CloseFrame {
            code,
            reason: reason.into(),
        }));
        let _ = tokio::time::timeout(write_timeout, sink.send(frame)).await;
        let _ = tokio::time::timeout(write_timeout, async {
            while let Some(Ok(m)) = stream.next().await {
                if matches!(m, Message::Close(_)) {
                    break;
                }
            }
        })
        .await;
    }
}
