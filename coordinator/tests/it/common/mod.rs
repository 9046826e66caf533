//! Shared test harness: a coordinator with static credentials served on 127.0.0.1:0, plain HTTP
//! probes, v1 JSON clients and node builders.

use crate::support;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use coordinator::auth::{AccessKeyword, AgentAccess, StaticAgent, StaticAuthConfig, StaticUser};
use coordinator::authz::{addr_from_uuid, TAILSCALE_SERVICE_PREFIX};
use coordinator::derpmap::{DerpMapConfig, DerpMapSource, EmbeddedRelay};
use coordinator::{Coordinator, CoordinatorConfig, StaticAuthenticator};
use futures_util::{SinkExt, StreamExt};
use proto::tailnet::v2::Node;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use uuid::Uuid;

pub use crate::support::{init_tracing, Ws};

pub mod v2;

pub const USER_ALL: &str = "aaaaaaaaaa-bbbbbbbbbbbbbbbbbbbbbb";
pub const USER_ONE: &str = "cccccccccc-dddddddddddddddddddddd";

/// One agent's credentials.
#[derive(Clone, Copy, Debug)]
pub struct Agent {
    pub id: Uuid,
    pub token: Uuid,
}

pub struct Harness {
    pub coord: Arc<Coordinator>,
    pub addr: SocketAddr,
    pub agents: Vec<Agent>,
    pub registry: prometheus::Registry,
    pub derp_file: Option<PathBuf>,
    pub _dir: tempfile::TempDir,
}

pub fn test_config() -> CoordinatorConfig {
    CoordinatorConfig {
        shutdown_grace: Duration::from_secs(2),
        ..Default::default()
    }
}

/// A DERP map JSON file with one region `id`.
pub fn derp_map_json(id: i64, host: &str) -> String {
    format!(
        r#"{{"Regions":{{"{id}":{{"RegionID":{id},"RegionCode":"r{id}","RegionName":"Region {id}","Nodes":[{{"Name":"{id}a","RegionID":{id},"HostName":"{host}","DERPPort":443}}]}}}}}}"#
    )
}

impl Harness {
    pub async fn start() -> Harness {
        Self::start_with(test_config(), 3).await
    }

    pub async fn start_with(config: CoordinatorConfig, n_agents: usize) -> Harness {
        init_tracing();
        let agents: Vec<Agent> = (0..n_agents)
            .map(|_| Agent {
                id: Uuid::new_v4(),
                token: Uuid::new_v4(),
            })
            .collect();
        let auth = StaticAuthConfig {
            agents: agents
                .iter()
                .enumerate()
                .map(|(i, a)| StaticAgent {
                    token: a.token,
                    id: a.id,
                    name: Some(format!("owner-ws-agent{i}")),
                })
                .collect(),
            users: vec![
                StaticUser {
                    token: USER_ALL.into(),
                    name: Some("all".into()),
                    id: None,
                    agents: AgentAccess::Keyword(AccessKeyword::All),
                },
                StaticUser {
                    token: USER_ONE.into(),
                    name: Some("one".into()),
                    id: None,
                    agents: AgentAccess::Only(vec![agents[0].id]),
                },
            ],
        };
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("derp.json");
        std::fs::write(&path, derp_map_json(1, "derp1.example")).unwrap();
        let derp = DerpMapSource::new(DerpMapConfig {
            file: Some(path.clone()),
            embedded: Some(EmbeddedRelay::new("http://127.0.0.1:1", None)),
            poll_interval: Duration::from_millis(100),
            ..Default::default()
        })
        .unwrap();
        let registry = prometheus::Registry::new();
        let coord = Coordinator::new(
            config,
            Arc::new(StaticAuthenticator::new(&auth).unwrap()),
            derp,
            &registry,
        )
        .unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let router = coord.router();
        tokio::spawn(async move {
            let _ = axum::serve(listener, router).await;
        });
        Harness {
            coord,
            addr,
            agents,
            registry,
            derp_file: Some(path),
            _dir: dir,
        }
    }

    pub fn agent(&self) -> Agent {
        self.agents[0]
    }

    pub fn url(&self, path: &str) -> String {
        format!("ws://{}{}", self.addr, path)
    }

    /// Open a WebSocket with `Coder-Session-Token: token`.
    pub async fn ws(
        &self,
        path: &str,
        token: &str,
    ) -> Result<Ws, Box<tokio_tungstenite::tungstenite::Error>> {
        support::ws_dial(&self.url(path), &[(support::SESSION_TOKEN, token)]).await
    }

    /// A plain (non-upgrade) GET; returns status and body.
    pub async fn get(&self, path: &str, headers: &[(&str, &str)]) -> (u16, serde_json::Value) {
        let mut s = TcpStream::connect(self.addr).await.unwrap();
        let mut req = format!(
            "GET {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n",
            self.addr
        );
        for (k, v) in headers {
            req.push_str(&format!("{k}: {v}\r\n"));
        }
        req.push_str("\r\n");
        s.write_all(req.as_bytes()).await.unwrap();
        let mut buf = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf))
            .await
            .unwrap()
            .unwrap();
        let text = String::from_utf8_lossy(&buf).to_string();
        let status: u16 = text[9..12].parse().unwrap();
        let body_start = text.find("\r\n\r\n").unwrap() + 4;
        let body = &text[body_start..];
        let json = serde_json::from_str(body).unwrap_or(serde_json::Value::String(body.into()));
        (status, json)
    }

    /// A failed WebSocket dial's status and JSON body.
    pub async fn ws_error(&self, path: &str, token: &str) -> (u16, serde_json::Value) {
        support::ws_refusal(path, self.ws(path, token).await)
    }

    pub fn metric(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        support::metric(&self.registry, name, labels)
    }
}

/// A node that both the v2 authz and the v1 conversion accept, for `peer` (agent addresses if
/// `agent`).
pub fn node(peer: Uuid, agent: bool, derp: i32) -> Node {
    let addr = if agent {
        format!("{}/128", addr_from_uuid(TAILSCALE_SERVICE_PREFIX, peer))
    } else {
        format!("fd7a:115c:a1e0:{:x}::1/128", rand_u16())
    };
    let mut key = b"np".to_vec();
    key.extend_from_slice(&rand_32());
    Node {
        id: i64::from(rand_u16()) + 1,
        as_of: Some(prost_types::Timestamp {
            seconds: 1_700_000_000,
            nanos: 0,
        }),
        key: Bytes::from(key),
        disco: format!("discokey:{}", hex::encode(rand_32())),
        preferred_derp: derp,
        derp_latency: [("1-v4".to_string(), 0.01)].into_iter().collect(),
        derp_forced_websocket: Default::default(),
        addresses: vec![addr.clone()],
        allowed_ips: vec![addr],
        endpoints: vec!["127.0.0.1:41641".into()],
    }
}

fn rand_u16() -> u16 {
    rand_32()[0] as u16 * 256 + rand_32()[1] as u16
}

fn rand_32() -> [u8; 32] {
    let mut b = [0u8; 32];
    let u1 = Uuid::new_v4();
    let u2 = Uuid::new_v4();
    b[..16].copy_from_slice(u1.as_bytes());
    b[16..].copy_from_slice(u2.as_bytes());
    b
}

/// v1 JSON for a node.
pub fn v1_json(n: &Node) -> Vec<u8> {
    proto::v1::Node::from_proto(n).unwrap().to_json().unwrap()
}

/// Read the next v1 array (skipping control frames); `None` on close.
pub async fn v1_recv(ws: &mut Ws, wait: Duration) -> Option<Vec<proto::v1::Node>> {
    let fut = async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Binary(b))) => {
                    return Some(serde_json::from_slice::<Vec<proto::v1::Node>>(&b).unwrap())
                }
                Some(Ok(Message::Text(t))) => {
                    return Some(serde_json::from_str::<Vec<proto::v1::Node>>(t.as_str()).unwrap())
                }
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return None,
                Some(Ok(_)) => continue,
            }
        }
    };
    tokio::time::timeout(wait, fut)
        .await
        .expect("timed out waiting for a v1 update")
}

/// Wait for the close frame; returns its code and reason.
pub async fn close_code(ws: &mut Ws) -> Option<(u16, String)> {
    let fut = async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Close(c))) => {
                    return c.map(|c| (u16::from(c.code), c.reason.to_string()))
                }
                None | Some(Err(_)) => return None,
                Some(Ok(_)) => continue,
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(10), fut)
        .await
        .expect("timed out waiting for close")
}

pub async fn send_bin(ws: &mut Ws, data: Vec<u8>) {
    ws.send(Message::Binary(Bytes::from(data))).await.unwrap();
}

/// Poll `f` until it returns true or `wait` passes.
pub async fn eventually(wait: Duration, mut f: impl FnMut() -> bool) -> bool {
    let end = tokio::time::Instant::now() + wait;
    while tokio::time::Instant::now() < end {
        if f() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    f()
}
