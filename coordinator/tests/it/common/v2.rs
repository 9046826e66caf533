//! v2 test client: tokio-tungstenite → wsio → yamux client → dRPC client, and a test peer that
//! tracks what a Coordinate stream told it (like Coder's tailnet/test peer).

use std::collections::HashMap;
use std::time::Duration;

use bytes::Bytes;
use coordinator::rpc::drpc::{DrpcConfig, RpcClient, RpcStream};
use coordinator::rpc::wsio::{WsConfig, WsHandle, WsIo};
use coordinator::rpc::yamux::{self, Session};
use proto::tailnet::v2::coordinate_request::{Disconnect, ReadyForHandshake, Tunnel, UpdateSelf};
use proto::tailnet::v2::coordinate_response::peer_update::Kind;
use proto::tailnet::v2::{methods, CoordinateRequest, CoordinateResponse, Node};
use uuid::Uuid;

use super::{Harness, Ws};

pub const WAIT: Duration = Duration::from_secs(10);

/// A v2 connection to the WebSocket `url` with `headers` (see [`crate::support::ws_dial`]).
pub async fn v2_dial(url: &str, headers: &[(&str, &str)]) -> V2Conn {
    client_stack(crate::support::ws_dial(url, headers).await.unwrap())
}

/// One v2 connection (WebSocket + yamux + dRPC client).
pub struct V2Conn {
    pub rpc: RpcClient,
    pub ws: WsHandle,
}

pub fn client_stack(ws: Ws) -> V2Conn {
    let (io, handle) = WsIo::new(ws, WsConfig::client());
    let session = Session::client(io, yamux::Config::default());
    V2Conn {
        rpc: RpcClient::new(session, DrpcConfig::default()),
        ws: handle,
    }
}

impl V2Conn {
    pub async fn dial(h: &Harness, path: &str, token: &str) -> V2Conn {
        v2_dial(&h.url(path), &[(crate::support::SESSION_TOKEN, token)]).await
    }

    /// Agent on `/me/rpc`.
    pub async fn agent(h: &Harness, idx: usize) -> V2Conn {
        let tok = h.agents[idx].token.to_string();
        Self::dial(
            h,
            "/api/v2/workspaceagents/me/rpc?version=2.10&role=agent",
            &tok,
        )
        .await
    }

    /// Client of agent `idx` on `{id}/coordinate?version=2.0`.
    pub async fn client(h: &Harness, idx: usize, extra_query: &str) -> V2Conn {
        let path = format!(
            "/api/v2/workspaceagents/{}/coordinate?version=2.0{extra_query}",
            h.agents[idx].id
        );
        Self::dial(h, &path, super::USER_ALL).await
    }

    pub async fn coordinate(&self) -> TestPeer {
        let stream = self.rpc.open_stream(methods::COORDINATE).await.unwrap();
        TestPeer::new(stream)
    }
}

/// Tracks a Coordinate stream's view, like Coder's `test.Peer`.
pub struct TestPeer {
    pub stream: RpcStream,
    pub nodes: HashMap<Uuid, Node>,
    pub lost: HashMap<Uuid, String>,
    pub disconnected: HashMap<Uuid, String>,
    pub ready: Vec<Uuid>,
    pub errors: Vec<String>,
    pub closed: bool,
    pub kinds_seen: Vec<i32>,
}

impl TestPeer {
    pub fn new(stream: RpcStream) -> Self {
        Self {
            stream,
            nodes: HashMap::new(),
            lost: HashMap::new(),
            disconnected: HashMap::new(),
            ready: Vec::new(),
            errors: Vec::new(),
            closed: false,
            kinds_seen: Vec::new(),
        }
    }

    pub async fn send(&self, req: CoordinateRequest) {
        self.stream.send_msg(&req).await.unwrap();
    }

    pub async fn update_self(&self, node: Node) {
        self.send(CoordinateRequest {
            update_self: Some(UpdateSelf { node: Some(node) }),
            ..Default::default()
        })
        .await
    }

    pub async fn add_tunnel(&self, id: Uuid) {
        self.send(add_tunnel_req(id.as_bytes())).await
    }

    pub async fn remove_tunnel(&self, id: Uuid) {
        self.send(CoordinateRequest {
            remove_tunnel: Some(Tunnel {
                id: Bytes::copy_from_slice(id.as_bytes()),
            }),
            ..Default::default()
        })
        .await
    }

    pub async fn ready_for_handshake(&self, id: Uuid) {
        self.send(CoordinateRequest {
            ready_for_handshake: vec![ReadyForHandshake {
                id: Bytes::copy_from_slice(id.as_bytes()),
            }],
            ..Default::default()
        })
        .await
    }

    pub async fn disconnect(&self) {
        self.send(CoordinateRequest {
            disconnect: Some(Disconnect {}),
            ..Default::default()
        })
        .await
    }

    fn apply(&mut self, resp: CoordinateResponse) {
        if !resp.error.is_empty() {
            self.errors.push(resp.error);
        }
        for u in resp.peer_updates {
            let id = Uuid::from_slice(&u.id).unwrap();
            self.kinds_seen.push(u.kind);
            match Kind::try_from(u.kind) {
                Ok(Kind::Node) => {
                    self.lost.remove(&id);
                    self.disconnected.remove(&id);
                    self.nodes.insert(id, u.node.unwrap());
                }
                Ok(Kind::Lost) => {
                    self.nodes.remove(&id);
                    self.lost.insert(id, u.reason);
                }
                Ok(Kind::Disconnected) => {
                    self.nodes.remove(&id);
                    self.disconnected.insert(id, u.reason);
                }
                Ok(Kind::ReadyForHandshake) => self.ready.push(id),
                _ => {}
            }
        }
    }

    /// Read one response (or the end) within `wait`; false on timeout.
    pub async fn step(&mut self, wait: Duration) -> bool {
        if self.closed {
            return false;
        }
        match tokio::time::timeout(wait, self.stream.recv_msg::<CoordinateResponse>()).await {
            Err(_) => false,
            Ok(Ok(Some(r))) => {
                self.apply(r);
                true
            }
            Ok(Ok(None)) | Ok(Err(_)) => {
                self.closed = true;
                true
            }
        }
    }

    /// Read until `f` holds; panics after [`WAIT`].
    pub async fn until(&mut self, what: &str, f: impl Fn(&TestPeer) -> bool) {
        let end = tokio::time::Instant::now() + WAIT;
        while !f(self) {
            let left = end.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() || (self.closed && !f(self)) {
                panic!(
                    "timed out waiting for {what}; nodes={:?} lost={:?} disc={:?} errors={:?} closed={}",
                    self.nodes.keys().collect::<Vec<_>>(),
                    self.lost,
                    self.disconnected,
                    self.errors,
                    self.closed
                );
            }
            self.step(left).await;
        }
    }

    pub async fn expect_node(&mut self, id: Uuid, node: &Node) {
        self.until("node", |p| p.nodes.get(&id) == Some(node)).await
    }

    pub async fn expect_lost(&mut self, id: Uuid) {
        self.until("lost", |p| p.lost.contains_key(&id)).await
    }

    pub async fn expect_disconnected(&mut self, id: Uuid) {
        self.until("disconnected", |p| p.disconnected.contains_key(&id))
            .await
    }

    pub async fn expect_ready(&mut self, id: Uuid) {
        self.until("ready for handshake", |p| p.ready.contains(&id))
            .await
    }

    pub async fn expect_error(&mut self, contains: &str) {
        let c = contains.to_string();
        self.until("error", move |p| p.errors.iter().any(|e| e.contains(&c)))
            .await
    }

    pub async fn expect_closed(&mut self) {
        self.until("stream closed", |p| p.closed).await
    }

    /// Nothing arrives for `wait` (and the stream stays open).
    pub async fn expect_quiet(&mut self, wait: Duration) {
        let before = (self.nodes.len(), self.kinds_seen.len(), self.errors.len());
        self.step(wait).await;
        assert_eq!(
            before,
            (self.nodes.len(), self.kinds_seen.len(), self.errors.len()),
            "unexpected update"
        );
        assert!(!self.closed, "stream closed unexpectedly");
    }
}

pub fn add_tunnel_req(id: &[u8]) -> CoordinateRequest {
    CoordinateRequest {
        add_tunnel: Some(Tunnel {
            id: Bytes::copy_from_slice(id),
        }),
        ..Default::default()
    }
}
