//! The legacy v1 JSON coordination protocol (Coder before v2.16), mapped onto the same peer graph
//! as v2 so that v1 and v2 peers see each other.
//!
//! Why: old agents and clients still in the field send their own `Node` as JSON objects over the
//! WebSocket and expect JSON arrays of their tunnel peers' nodes back. A v1 session is a v2 peer
//! with an adapter: each JSON node becomes an `update_self`, each NODE update in a response
//! becomes part of one JSON array (other kinds are dropped, v1 cannot express them), and a v1
//! client's tunnel to its agent is added implicitly. Because v1 agents never acknowledge nodes,
//! the adapter sends `ready_for_handshake` on a v1 agent's behalf once an array reached it, so v2
//! clients need not wait for their 5 s fallback.
//!
//! This module must never wait on the graph (the graph never blocks), never buffer an unfinished
//! JSON value beyond `v1_max_message`, and never let one write take longer than
//! `v1_write_timeout` (Coder's 5 s `WriteTimeout`).

pub mod decoder;

use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, WebSocket};
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use proto::tailnet::v2::coordinate_request::{Disconnect, ReadyForHandshake, Tunnel, UpdateSelf};
use proto::tailnet::v2::coordinate_response::peer_update::Kind;
use proto::tailnet::v2::{CoordinateRequest, CoordinateResponse};
use tokio::time::Instant;
use uuid::Uuid;

use crate::authz::CoordinateeAuth;
use crate::graph::{Flow, PeerHandle};
use crate::metrics::{Protocol, Role};
use crate::rpc::wsio::{
    CLOSE_GOING_AWAY, CLOSE_INTERNAL_ERROR, CLOSE_NORMAL, CLOSE_UNSUPPORTED_DATA,
    LIVENESS_FAILED_REASON,
};
use crate::Coordinator;
use decoder::JsonStream;

/// Who a v1 session speaks for.
#[derive(Debug, Clone)]
pub(crate) struct V1Peer {
    /// Peer id (agent id, or a fresh/resumed id for a client).
    pub id: Uuid,
    /// Display name.
    pub name: String,
    /// Agent or client.
    pub role: Role,
    /// Authorization for the graph.
    pub auth: CoordinateeAuth,
    /// For clients: the agent whose tunnel is added implicitly.
    pub tunnel_to: Option<Uuid>,
}

/// How a v1 session ended, for the close frame.
enum End {
    /// Peer closed (graceful); nothing more to send.
    PeerClosed,
    /// Connection lost; nothing can be sent.
    Lost,
    /// We close with this code and reason.
    Close(u16, String),
}

/// Convert the NODE updates of a response to the JSON array a v1 peer expects, or `None` if the
/// response carries none. Nodes that cannot be expressed in v1 are skipped (counted by caller).
fn nodes_json(resp: &CoordinateResponse) -> (Option<Vec<u8>>, Vec<Uuid>, usize) {
    let mut nodes = Vec::new();
    let mut ids = Vec::new();
    let mut skipped = 0;
    for u in &resp.peer_updates {
        if u.kind != Kind::Node as i32 {
            continue;
        }
        let Some(n) = &u.node else {
            skipped += 1;
            continue;
        };
        match proto::v1::Node::from_proto(n) {
            Ok(v1) => {
                nodes.push(v1);
                if let Ok(id) = Uuid::from_slice(&u.id) {
                    ids.push(id);
                }
            }
            Err(e) => {
                tracing::debug!(error = %e, "node cannot be expressed in v1 JSON; skipped");
                skipped += 1;
            }
        }
    }
    if nodes.is_empty() {
        return (None, ids, skipped);
    }
    (serde_json::to_vec(&nodes).ok(), ids, skipped)
}

/// Serve one v1 session until either side ends it.
pub(crate) async fn serve(coord: Arc<Coordinator>, ws: WebSocket, peer: V1Peer) {
    let _session = coord.metrics.session(peer.role, Protocol::V1);
    let _tracked = coord.sessions.track();
    let _coordinating = coord.coordinations.track();
    let (mut sink, mut stream) = ws.split();
    let (handle, mut rx) = coord
        .graph
        .connect(peer.id, peer.name.clone(), peer.auth.clone());
    let opened = std::time::Instant::now();
    // One line per authenticated session open and close, never the credentials.
    tracing::info!(peer = %peer.id, role = peer.role.as_str(), kind = peer.role.as_str(),
        protocol = "v1", "coordination session opened");

    let end = run(&coord, &peer, &handle, &mut rx, &mut sink, &mut stream).await;
    let write_timeout = coord.config.v1_write_timeout;
    match end {
        End::PeerClosed => {
            // v1 has no disconnect message: closing the socket is the goodbye.
            let _ = coord.graph.handle(
                &handle,
                CoordinateRequest {
                    disconnect: Some(Disconnect {}),
                    ..Default::default()
                },
            );
            let _ = tokio::time::timeout(write_timeout, sink.close()).await;
        }
        End::Lost => {}
        End::Close(code, reason) => {
            let frame = Message::Close(Some(CloseFrame {
                code,
                reason: truncate(&reason).into(),
            }));
            let _ = tokio::time::timeout(write_timeout, sink.send(frame)).await;
            // Give the peer a moment to answer the close handshake, bounded.
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
    // Dropping the handle now marks the peer LOST unless it disconnected above.
    drop(handle);
    tracing::info!(peer = %peer.id, role = peer.role.as_str(), kind = peer.role.as_str(),
        protocol = "v1",
        duration_ms = u64::try_from(opened.elapsed().as_millis()).unwrap_or(u64::MAX),
        "coordination session closed");
}

fn truncate(s: &str) -> &str {
    let mut end = s.len().min(123);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

async fn run(
    coord: &Arc<Coordinator>,
    peer: &V1Peer,
    handle: &PeerHandle,
    rx: &mut crate::graph::PeerReceiver,
    sink: &mut futures_util::stream::SplitSink<WebSocket, Message>,
    stream: &mut futures_util::stream::SplitStream<WebSocket>,
) -> End {
    let cfg = &coord.config;
    if let Some(agent) = peer.tunnel_to {
        let req = CoordinateRequest {
            add_tunnel: Some(Tunnel {
                id: Bytes::copy_from_slice(agent.as_bytes()),
            }),
            ..Default::default()
        };
        if let Err(e) = coord.graph.handle(handle, req) {
            return End::Close(CLOSE_INTERNAL_ERROR, e.to_string());
        }
    }
    let mut decoder = JsonStream::new(cfg.v1_max_message);
    let mut last_sent: Option<Vec<u8>> = None;
    let mut last_error = String::new();
    let ping_every = cfg.ws_ping_interval.max(Duration::from_millis(10));
    let mut ping = tokio::time::interval_at(Instant::now() + ping_every, ping_every);
    let mut pong_deadline: Option<Instant> = None;
    let mut ping_seq: u64 = 0;
    loop {
        let deadline = pong_deadline;
        tokio::select! {
            msg = stream.next() => {
                let data = match msg {
                    Some(Ok(Message::Binary(b))) => b,
                    // Old wsproxy builds sent text: same JSON.
                    Some(Ok(Message::Text(t))) => Bytes::copy_from_slice(t.as_str().as_bytes()),
                    Some(Ok(Message::Pong(_))) => { pong_deadline = None; continue; }
                    Some(Ok(Message::Ping(_))) => continue,
                    Some(Ok(Message::Close(_))) => return End::PeerClosed,
                    // The connection ended without a close frame: the peer is lost.
                    None => return End::Lost,
                    Some(Err(e)) => {
                        tracing::debug!(peer = %peer.id, error = %e, "v1 websocket read failed");
                        return End::Lost;
                    }
                };
                let values = match decoder.push(&data) {
                    Ok(v) => v,
                    Err(e) => {
                        coord.metrics.protocol_error("v1_invalid_json");
                        tracing::info!(peer = %peer.id, error = %e, "v1 peer sent invalid JSON; closing");
                        return End::Close(CLOSE_UNSUPPORTED_DATA, format!("failed to decode Node update: {e}"));
                    }
                };
                for v in values {
                    let node = match proto::v1::Node::from_value(v).and_then(|n| n.to_proto()) {
                        Ok(n) => n,
                        Err(e) => {
                            coord.metrics.protocol_error("v1_invalid_node");
                            tracing::info!(peer = %peer.id, error = %e, "v1 peer sent JSON that is not a Node; closing");
                            return End::Close(CLOSE_UNSUPPORTED_DATA, format!("failed to decode Node update: {e}"));
                        }
                    };
                    let req = CoordinateRequest {
                        update_self: Some(UpdateSelf { node: Some(node) }),
                        ..Default::default()
                    };
                    match coord.graph.handle(handle, req) {
                        Ok(Flow::Continue) => {}
                        Ok(Flow::Close) => return End::Close(CLOSE_NORMAL, String::new()),
                        Err(e) => {
                            coord.metrics.protocol_error("v1_rejected_node");
                            return End::Close(CLOSE_INTERNAL_ERROR, e.to_string());
                        }
                    }
                }
            }
            resp = rx.recv() => {
                let Some(resp) = resp else {
                    // The graph closed this connection (overwritten, kicked, coordinator closed).
                    return End::Close(CLOSE_NORMAL, last_error);
                };
                if !resp.error.is_empty() {
                    tracing::info!(peer = %peer.id, error = %resp.error, "coordinator error for v1 peer");
                    last_error = resp.error.clone();
                }
                let (json, ids, skipped) = nodes_json(&resp);
                if skipped > 0 {
                    coord.metrics.dropped.with_label_values(&["v1_unconvertible_node"]).inc_by(skipped as u64);
                }
                let Some(json) = json else { continue };
                if last_sent.as_deref() == Some(json.as_slice()) {
                    continue;
                }
                let msg = Message::Binary(Bytes::from(json.clone()));
                match tokio::time::timeout(cfg.v1_write_timeout, sink.send(msg)).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => {
                        tracing::debug!(peer = %peer.id, error = %e, "v1 write failed");
                        return End::Lost;
                    }
                    Err(_) => {
                        coord.metrics.protocol_error("v1_write_timeout");
                        tracing::info!(peer = %peer.id, "v1 write timed out; dropping connection");
                        return End::Lost;
                    }
                }
                last_sent = Some(json);
                if peer.role == Role::Agent && !ids.is_empty() {
                    let req = CoordinateRequest {
                        ready_for_handshake: ids
                            .iter()
                            .map(|id| ReadyForHandshake { id: Bytes::copy_from_slice(id.as_bytes()) })
                            .collect(),
                        ..Default::default()
                    };
                    if let Err(e) = coord.graph.handle(handle, req) {
                        return End::Close(CLOSE_INTERNAL_ERROR, e.to_string());
                    }
                }
            }
            _ = ping.tick() => {
                if pong_deadline.is_none() {
                    ping_seq += 1;
                    let payload = Bytes::copy_from_slice(&ping_seq.to_be_bytes());
                    match tokio::time::timeout(cfg.v1_write_timeout, sink.send(Message::Ping(payload))).await {
                        Ok(Ok(())) => pong_deadline = Some(Instant::now() + cfg.ws_pong_timeout),
                        _ => return End::Lost,
                    }
                }
            }
            _ = sleep_until_opt(deadline) => {
                coord.metrics.protocol_error("liveness");
                tracing::info!(peer = %peer.id, "v1 peer did not answer ping; closing");
                return End::Close(CLOSE_GOING_AWAY, LIVENESS_FAILED_REASON.into());
            }
            _ = coord.cancel.cancelled() => {
                return End::Close(CLOSE_GOING_AWAY, crate::graph::ERR_COORDINATOR_CLOSED.into());
            }
        }
    }
}

async fn sleep_until_opt(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}
