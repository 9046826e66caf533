//! Replicas as an operator runs them: real `tailnetd coordinator` processes on one throwaway
//! PostgreSQL, peers dialling their real `/api/v2` endpoints (WebSocket → yamux → dRPC, the
//! stack Coder's clients speak). One replica is killed with SIGKILL: its peers turn LOST on the
//! survivor within 8 s, and a client that redials the survivor with the resume token the dead
//! replica issued keeps its peer id (the replicas share `[auth] resume_key`).

use std::time::{Duration, Instant};

use coordinator::authz::{addr_from_uuid, TAILSCALE_SERVICE_PREFIX};
use coordinator::rpc::drpc::{DrpcConfig, RpcClient, RpcStream};
use coordinator::rpc::wsio::{WsConfig, WsHandle, WsIo};
use coordinator::rpc::yamux::{self, Session};
use proto::tailnet::v2::coordinate_request::{Disconnect, Tunnel, UpdateSelf};
use proto::tailnet::v2::coordinate_response::peer_update::Kind;
use proto::tailnet::v2::{
    methods, CoordinateRequest, CoordinateResponse, Node, RefreshResumeTokenRequest,
    RefreshResumeTokenResponse,
};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use uuid::Uuid;

use crate::pg_server::PgServer;
use crate::support::{bin, Running};

const AGENT_TOKEN: &str = "9a0c4a53-53c7-4f38-9a3e-0d7c2b7f7c11";
const AGENT_ID: &str = "3c1f2b6e-8d4a-4e57-9b1a-2f6e8c0d4a21";
const USER_TOKEN: &str = "abcdefghij-0123456789012345678901";

/// A config file every replica shares: static tokens and one resume-token key.
fn replica_config(dir: &std::path::Path) -> std::path::PathBuf {
    let path = dir.join("replica.toml");
    let secret = "5e".repeat(64);
    std::fs::write(
        &path,
        format!(
            "[[auth.agents]]\ntoken = \"{AGENT_TOKEN}\"\nid = \"{AGENT_ID}\"\n\n\
             [[auth.users]]\ntoken = \"{USER_TOKEN}\"\nagents = \"all\"\n\n\
             [auth.resume_key]\nid = \"1\"\nsecret_hex = \"{secret}\"\n"
        ),
    )
    .unwrap();
    path
}

/// `tailnetd coordinator` on `pg_url`; returns the process and its HTTP address.
fn replica(config: &std::path::Path, pg_url: &str) -> (Running, String) {
    use std::io::BufRead;
    let mut child = bin()
        .args([
            "coordinator",
            "--config",
            config.to_str().unwrap(),
            "--http-addr",
            "127.0.0.1:0",
            "--postgres-url",
            pg_url,
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    assert!(!line.is_empty(), "tailnetd exited without announcing");
    let line: serde_json::Value = serde_json::from_str(&line).unwrap();
    let addr = line["http_addr"].as_str().unwrap().to_string();
    (Running { child, line }, addr)
}

/// One Coordinate session over WebSocket + yamux + dRPC.
struct Session2 {
    rpc: RpcClient,
    _ws: WsHandle,
}

async fn dial(addr: &str, path: &str, token: &str) -> Session2 {
    let mut req = format!("ws://{addr}{path}").into_client_request().unwrap();
    req.headers_mut()
        .insert("Coder-Session-Token", token.parse().unwrap());
    let (ws, _) = tokio_tungstenite::connect_async(req).await.unwrap();
    let (io, handle) = WsIo::new(ws, WsConfig::client());
    let session = Session::client(io, yamux::Config::default());
    Session2 {
        rpc: RpcClient::new(session, DrpcConfig::default()),
        _ws: handle,
    }
}

async fn agent_session(addr: &str) -> Session2 {
    dial(
        addr,
        "/api/v2/workspaceagents/me/rpc?version=2.10&role=agent",
        AGENT_TOKEN,
    )
    .await
}

async fn client_session(addr: &str, resume: Option<&str>) -> Session2 {
    let mut path = format!("/api/v2/workspaceagents/{AGENT_ID}/coordinate?version=2.0");
    if let Some(t) = resume {
        path.push_str(&format!("&resume_token={t}"));
    }
    dial(addr, &path, USER_TOKEN).await
}

/// A Coordinate stream and what it was told.
struct Peer {
    stream: RpcStream,
    seen: Vec<(Uuid, Kind, Option<Node>)>,
}

impl Peer {
    async fn open(s: &Session2) -> Peer {
        Peer {
            stream: s.rpc.open_stream(methods::COORDINATE).await.unwrap(),
            seen: Vec::new(),
        }
    }

    async fn send(&self, req: CoordinateRequest) {
        self.stream.send_msg(&req).await.unwrap();
    }

    async fn update(&self, n: Node) {
        self.send(CoordinateRequest {
            update_self: Some(UpdateSelf { node: Some(n) }),
            ..Default::default()
        })
        .await
    }

    async fn tunnel(&self, to: Uuid) {
        self.send(CoordinateRequest {
            add_tunnel: Some(Tunnel {
                id: to.as_bytes().to_vec().into(),
            }),
            ..Default::default()
        })
        .await
    }

    /// Waits (at most `within`) for an update of `kind` matching `f`; returns its peer id.
    async fn expect(
        &mut self,
        kind: Kind,
        within: Duration,
        f: impl Fn(Uuid, Option<&Node>) -> bool,
    ) -> Uuid {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let r = tokio::time::timeout_at(deadline, self.stream.recv_msg::<CoordinateResponse>())
                .await
                .unwrap_or_else(|_| panic!("no {kind:?} within {within:?}; seen {:?}", self.seen))
                .unwrap()
                .expect("Coordinate stream ended");
            for u in r.peer_updates {
                let id = Uuid::from_slice(&u.id).unwrap();
                let k = Kind::try_from(u.kind).unwrap();
                self.seen.push((id, k, u.node.clone()));
                if k == kind && f(id, u.node.as_ref()) {
                    return id;
                }
            }
        }
    }
}

fn node(addr: String, derp: i32) -> Node {
    let mut key = b"np".to_vec();
    key.extend_from_slice(Uuid::new_v4().as_bytes());
    key.extend_from_slice(Uuid::new_v4().as_bytes());
    Node {
        id: i64::from(derp) + 100,
        key: key.into(),
        disco: format!("discokey:{}", Uuid::new_v4().simple()),
        preferred_derp: derp,
        addresses: vec![addr.clone()],
        allowed_ips: vec![addr],
        ..Default::default()
    }
}

fn agent_node(derp: i32) -> Node {
    let id = Uuid::parse_str(AGENT_ID).unwrap();
    node(
        format!("{}/128", addr_from_uuid(TAILSCALE_SERVICE_PREFIX, id)),
        derp,
    )
}

fn client_node(derp: i32) -> Node {
    node("fd7a:115c:a1e0:4a3b::1/128".into(), derp)
}

const SOON: Duration = Duration::from_secs(10);

/// An agent on replica A and a client on replica B exchange nodes through the real endpoints;
/// the client's Disconnect reaches the agent as DISCONNECTED.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_and_client_on_two_replica_processes_exchange_nodes() {
    let pg = PgServer::start();
    let dir = tempfile::tempdir().unwrap();
    let cfg = replica_config(dir.path());
    let url = pg.url("postgres");
    let (_a, addr_a) = replica(&cfg, &url);
    let (_b, addr_b) = replica(&cfg, &url);
    let agent_id = Uuid::parse_str(AGENT_ID).unwrap();

    let sa = agent_session(&addr_a).await;
    let mut agent = Peer::open(&sa).await;
    agent.update(agent_node(1)).await;
    let sc = client_session(&addr_b, None).await;
    let mut client = Peer::open(&sc).await;
    client.tunnel(agent_id).await;
    client.update(client_node(2)).await;

    client
        .expect(Kind::Node, SOON, |id, n| {
            id == agent_id && n.is_some_and(|n| n.preferred_derp == 1)
        })
        .await;
    let client_id = agent
        .expect(Kind::Node, SOON, |_, n| {
            n.is_some_and(|n| n.preferred_derp == 2)
        })
        .await;
    agent.update(agent_node(3)).await;
    client
        .expect(Kind::Node, SOON, |id, n| {
            id == agent_id && n.is_some_and(|n| n.preferred_derp == 3)
        })
        .await;

    client
        .send(CoordinateRequest {
            disconnect: Some(Disconnect {}),
            ..Default::default()
        })
        .await;
    agent
        .expect(Kind::Disconnected, SOON, |id, _| id == client_id)
        .await;
}

/// Replica A is SIGKILLed: its client is LOST to the agent on B within 8 s; redialling B with
/// the resume token A issued, the client keeps its peer id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkilled_replica_peers_turn_lost_and_resume_on_the_survivor() {
    let pg = PgServer::start();
    let dir = tempfile::tempdir().unwrap();
    let cfg = replica_config(dir.path());
    let url = pg.url("postgres");
    let (mut a, addr_a) = replica(&cfg, &url);
    let (_b, addr_b) = replica(&cfg, &url);
    let agent_id = Uuid::parse_str(AGENT_ID).unwrap();

    let sb = agent_session(&addr_b).await;
    let mut agent = Peer::open(&sb).await;
    agent.update(agent_node(1)).await;

    let sc = client_session(&addr_a, None).await;
    let tok: RefreshResumeTokenResponse = sc
        .rpc
        .invoke_unary(methods::REFRESH_RESUME_TOKEN, &RefreshResumeTokenRequest {})
        .await
        .unwrap();
    let mut client = Peer::open(&sc).await;
    client.tunnel(agent_id).await;
    client.update(client_node(2)).await;
    client
        .expect(Kind::Node, SOON, |id, _| id == agent_id)
        .await;
    let client_id = agent
        .expect(Kind::Node, SOON, |_, n| {
            n.is_some_and(|n| n.preferred_derp == 2)
        })
        .await;

    // SIGKILL: A writes nothing more; only its missed heartbeats tell B.
    a.child.kill().unwrap();
    let killed = Instant::now();
    let _ = a.child.wait();
    agent
        .expect(Kind::Lost, Duration::from_secs(8), |id, _| id == client_id)
        .await;
    let took = killed.elapsed();
    assert!(
        took >= Duration::from_secs(3),
        "LOST before any heartbeat was missed: {took:?}"
    );
    eprintln!("LOST on the survivor {took:?} after SIGKILL");
    drop(client);
    drop(sc);

    // The client redials the survivor with A's token: same peer id, NODE again.
    let sc2 = client_session(&addr_b, Some(&tok.token)).await;
    let client2 = Peer::open(&sc2).await;
    client2.tunnel(agent_id).await;
    client2.update(client_node(4)).await;
    let id2 = agent
        .expect(Kind::Node, SOON, |_, n| {
            n.is_some_and(|n| n.preferred_derp == 4)
        })
        .await;
    assert_eq!(id2, client_id, "the resumed client got a new peer id");
}
