//! The sidecar bridge end to end: tailnetd in front of the fake coderd (`tests/fake_coder`) whose
//! `/me/rpc` serves a coordinator (tailnetd's own graph, with coderd's semantics). A modern agent
//! coordinates with tailnetd; coderd's peers (here: a "server tailnet" peer connected straight to
//! the fake's coordinator) must reach it through the bridge, and back.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use coordinator::derpmap::DerpMapConfig;
use coordinator::graph::{PeerGraph, PeerHandle, PeerReceiver};
use coordinator::upstream::bridge::BridgeConfig;
use coordinator::upstream::telemetry::QUEUE_CAPACITY;
use coordinator::upstream::{Upstream, UpstreamConfig};
use proto::tailnet::v2::coordinate_request::{ReadyForHandshake, Tunnel, UpdateSelf};
use proto::tailnet::v2::coordinate_response::peer_update::Kind;
use proto::tailnet::v2::{methods, CoordinateRequest, Node, TelemetryRequest, TelemetryResponse};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use uuid::Uuid;

use crate::common::v2::V2Conn;
use crate::common::{eventually, node};
use crate::fake_coder::FakeCoder;
use crate::upstream_harness::{Sidecar, Wiring};

const WAIT: Duration = Duration::from_secs(10);

/// tailnetd forwarding to the fake coderd (with its coordinator on), the bridge `enabled` or
/// not, redialing fast.
async fn start(enabled: bool) -> Sidecar {
    start_with_rpc_url(enabled, None).await
}

/// As [`start`]; `rpc_url`: where upstream dRPC sessions (forwarded streams, the bridge,
/// telemetry) go instead of the fake coderd, which still authenticates.
async fn start_with_rpc_url(enabled: bool, rpc_url: Option<String>) -> Sidecar {
    let fake = FakeCoder::start().await;
    fake.set_tailnet(true);
    let upstream = UpstreamConfig {
        url: fake.url.clone(),
        ..Default::default()
    };
    let derp = DerpMapConfig {
        stun_servers: vec!["stun.example:3478".into()],
        ..Default::default()
    };
    Sidecar::launch(fake, upstream, Wiring::ForwardStreams, derp, |c| {
        c.upstream_bridge = BridgeConfig {
            enabled,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_millis(400),
            ..Default::default()
        };
        if let Some(url) = rpc_url {
            let elsewhere = UpstreamConfig {
                url,
                ..Default::default()
            };
            c.upstream = Some(Upstream::new(elsewhere, &prometheus::Registry::new()).unwrap());
        }
    })
    .await
}

/// A coderd-side peer in the fake coderd's coordinator (like coderd's server tailnet).
struct CoderdPeer {
    graph: Arc<PeerGraph>,
    handle: PeerHandle,
    rx: PeerReceiver,
    id: Uuid,
}

impl CoderdPeer {
    fn connect(fake: &FakeCoder) -> CoderdPeer {
        let id = Uuid::new_v4();
        let (handle, rx) = fake.server_tailnet(id);
        CoderdPeer {
            graph: fake.coordinator(),
            handle,
            rx,
            id,
        }
    }

    fn send(&self, req: CoordinateRequest) {
        self.graph.handle(&self.handle, req).unwrap();
    }

    fn add_tunnel(&self, to: Uuid) {
        self.send(CoordinateRequest {
            add_tunnel: Some(Tunnel {
                id: Bytes::copy_from_slice(to.as_bytes()),
            }),
            ..Default::default()
        });
    }

    fn remove_tunnel(&self, to: Uuid) {
        self.send(CoordinateRequest {
            remove_tunnel: Some(Tunnel {
                id: Bytes::copy_from_slice(to.as_bytes()),
            }),
            ..Default::default()
        });
    }

    fn update_self(&self, n: Node) {
        self.send(CoordinateRequest {
            update_self: Some(UpdateSelf { node: Some(n) }),
            ..Default::default()
        });
    }

    fn ready_for_handshake(&self, to: Uuid) {
        self.send(CoordinateRequest {
            ready_for_handshake: vec![ReadyForHandshake {
                id: Bytes::copy_from_slice(to.as_bytes()),
            }],
            ..Default::default()
        });
    }

    /// Waits for an update about `about` of `kind` (and, for NODE, equal to `node`).
    async fn expect(&mut self, about: Uuid, kind: Kind, node: Option<&Node>) {
        let found = tokio::time::timeout(WAIT, async {
            while let Some(resp) = self.rx.recv().await {
                for u in resp.peer_updates {
                    if u.id.as_ref() == about.as_bytes()
                        && u.kind == kind as i32
                        && (node.is_none() || u.node.as_ref() == node)
                    {
                        return true;
                    }
                }
            }
            false
        })
        .await;
        assert_eq!(
            found,
            Ok(true),
            "coderd peer never got {kind:?} about {about}"
        );
    }
}

#[tokio::test]
async fn agent_and_coderd_peer_meet_through_the_bridge() {
    let s = start(true).await;
    let agent_id = s.fake.agent_id;
    let a = s.agent_v2().await;
    // Eager: the upstream session (role=agent, so coderd's connection monitor sees the agent)
    // and the bridge stream exist before the agent calls anything upstream.
    assert!(eventually(WAIT, || s.fake.coordinates_opened() == 1).await);
    assert_eq!(s.fake.rpc_sessions(), vec!["agent".to_string()]);
    assert!(
        eventually(WAIT, || s
            .metric("coordinator_upstream_bridge_streams", &[])
            == 1.0)
        .await
    );

    // The agent's node reaches coderd's coordinator.
    let mut ap = a.coordinate().await;
    let an = node(agent_id, true, 1);
    ap.update_self(an.clone()).await;
    let mut x = CoderdPeer::connect(&s.fake);
    x.add_tunnel(agent_id);
    x.expect(agent_id, Kind::Node, Some(&an)).await;
    let an2 = node(agent_id, true, 2);
    ap.update_self(an2.clone()).await;
    x.expect(agent_id, Kind::Node, Some(&an2)).await;

    // coderd's peer reaches the agent as a remote peer, and the handshake acks go both ways.
    let xn = node(x.id, false, 1);
    x.update_self(xn.clone());
    ap.expect_node(x.id, &xn).await;
    assert!(
        eventually(WAIT, || s
            .metric("coordinator_upstream_bridge_remote_peers", &[])
            == 1.0)
        .await
    );
    ap.ready_for_handshake(x.id).await;
    x.expect(agent_id, Kind::ReadyForHandshake, None).await;
    x.ready_for_handshake(agent_id);
    ap.expect_ready(x.id).await;

    // A client that dialled tailnetd stays local: coderd never hears of it.
    let c = s.client_v2().await;
    let mut cp = c.coordinate().await;
    cp.add_tunnel(agent_id).await;
    cp.expect_node(agent_id, &an2).await;
    let cn = node(Uuid::new_v4(), false, 1);
    cp.update_self(cn.clone()).await;
    ap.until("local client node", |p| p.nodes.values().any(|n| *n == cn))
        .await;
    assert_eq!(s.fake.coordinator().peer_count(), 2, "agent and x only");

    // coderd's peer leaves the tunnel: DISCONNECTED to the agent.
    x.remove_tunnel(agent_id);
    ap.expect_disconnected(x.id).await;
    assert!(
        eventually(WAIT, || s
            .metric("coordinator_upstream_bridge_remote_peers", &[])
            == 0.0)
        .await
    );
}

#[tokio::test]
async fn a_bridge_stream_coderd_ends_is_reestablished_and_its_peers_are_lost_meanwhile() {
    let s = start(true).await;
    let agent_id = s.fake.agent_id;
    let a = s.agent_v2().await;
    let mut ap = a.coordinate().await;
    let an = node(agent_id, true, 1);
    ap.update_self(an.clone()).await;
    let mut x = CoderdPeer::connect(&s.fake);
    x.add_tunnel(agent_id);
    let xn = node(x.id, false, 1);
    x.update_self(xn.clone());
    ap.expect_node(x.id, &xn).await;
    x.expect(agent_id, Kind::Node, Some(&an)).await;

    s.fake.end_coordinate_streams();
    // The stream's peers are LOST (not DISCONNECTED) to the agent: its tunnels keep working.
    ap.expect_lost(x.id).await;
    assert!(ap.disconnected.is_empty());
    // Re-established with backoff, on the same upstream session; coderd re-introduces x.
    assert!(eventually(WAIT, || s.fake.coordinates_opened() == 2).await);
    ap.expect_node(x.id, &xn).await;
    x.expect(agent_id, Kind::Node, Some(&an)).await;
    assert_eq!(
        s.fake.rpc_sessions().len(),
        1,
        "the upstream session stayed"
    );
    assert!(s.metric("coordinator_upstream_bridge_redials_total", &[]) >= 1.0);
    assert_eq!(
        s.metric(
            "coordinator_upstream_bridge_stream_ends_total",
            &[("reason", "upstream")]
        ),
        1.0
    );
    assert!(!a.ws.is_ended(), "local coordination was never interrupted");
}

#[tokio::test]
async fn upstream_session_death_closes_the_agent_session_and_its_clients_see_it_lost() {
    let s = start(true).await;
    let agent_id = s.fake.agent_id;
    let a = s.agent_v2().await;
    let ap = a.coordinate().await;
    let an = node(agent_id, true, 1);
    ap.update_self(an.clone()).await;
    let c = s.client_v2().await;
    let mut cp = c.coordinate().await;
    cp.add_tunnel(agent_id).await;
    cp.expect_node(agent_id, &an).await;
    assert!(eventually(WAIT, || s.fake.coordinates_opened() == 1).await);

    s.fake.go_away().await;
    tokio::time::timeout(WAIT, a.ws.ended())
        .await
        .expect("agent session not closed");
    cp.expect_lost(agent_id).await;
    assert!(cp.disconnected.is_empty());
    assert!(
        s.coord.derp_map().json.len() > 2,
        "tailnetd itself is still up"
    );
}

#[tokio::test]
async fn with_the_bridge_off_nothing_goes_upstream() {
    let s = start(false).await;
    let agent_id = s.fake.agent_id;
    let a = s.agent_v2().await;
    let mut ap = a.coordinate().await;
    ap.update_self(node(agent_id, true, 1)).await;
    ap.expect_quiet(Duration::from_millis(500)).await;
    assert_eq!(s.fake.coordinates_opened(), 0);
    assert!(s.fake.rpc_sessions().is_empty(), "not even a session");
    assert_eq!(s.fake.coordinator().peer_count(), 0);
    assert_eq!(s.metric("coordinator_upstream_bridge_streams", &[]), 0.0);
}

#[tokio::test]
async fn a_tool_with_the_agent_token_is_not_bridged() {
    let s = start(true).await;
    let t = s
        .v2(
            "/api/v2/workspaceagents/me/rpc?version=2.10&role=logstream",
            &s.fake.agent_token,
        )
        .await;
    let mut tp = t.coordinate().await;
    tp.expect_quiet(Duration::from_millis(500)).await;
    assert_eq!(s.fake.coordinates_opened(), 0);
}

#[tokio::test]
async fn post_telemetry_is_forwarded_to_coderd() {
    let s = start(true).await;
    let a = s.agent_v2().await;
    let req = TelemetryRequest {
        events: vec![Default::default(), Default::default()],
    };
    let _: TelemetryResponse = a
        .rpc
        .invoke_unary(methods::POST_TELEMETRY, &req)
        .await
        .unwrap();
    assert_eq!(s.metric("coordinator_telemetry_events_total", &[]), 2.0);
    assert!(eventually(WAIT, || !s.fake.telemetry().is_empty()).await);
    assert_eq!(s.fake.telemetry(), vec![req]);
    assert_eq!(
        s.fake.rpc_sessions(),
        vec!["agent".to_string()],
        "on the agent's own upstream session"
    );
}

#[tokio::test]
async fn a_clients_post_telemetry_is_forwarded_with_its_own_token() {
    let s = start(true).await;
    let c = s.client_v2().await;
    let cp = c.coordinate().await;
    cp.add_tunnel(s.fake.agent_id).await;
    assert_eq!(
        s.fake.tailnet_sessions(),
        0,
        "dialled on the first telemetry call only"
    );
    let req = TelemetryRequest {
        events: vec![Default::default(); 3],
    };
    let _: TelemetryResponse = c
        .rpc
        .invoke_unary(methods::POST_TELEMETRY, &req)
        .await
        .unwrap();
    assert!(eventually(WAIT, || !s.fake.telemetry().is_empty()).await);
    assert_eq!(s.fake.telemetry(), vec![req.clone()]);
    let _: TelemetryResponse = c
        .rpc
        .invoke_unary(methods::POST_TELEMETRY, &req)
        .await
        .unwrap();
    assert!(eventually(WAIT, || s.fake.telemetry().len() == 2).await);
    assert_eq!(
        s.fake.tailnet_sessions(),
        1,
        "one upstream session per client session"
    );
    assert_eq!(s.fake.coordinates_opened(), 0, "clients are never bridged");
}

/// The client's call must not wait for coderd: answered well within this.
const PROMPT: Duration = Duration::from_millis(500);

async fn post_telemetry_promptly(c: &V2Conn, req: &TelemetryRequest) {
    let call = c
        .rpc
        .invoke_unary::<_, TelemetryResponse>(methods::POST_TELEMETRY, req);
    tokio::time::timeout(PROMPT, call)
        .await
        .expect("PostTelemetry answered only after coderd")
        .unwrap();
}

fn telemetry_failures(s: &Sidecar) -> f64 {
    s.metric(
        "coordinator_upstream_rpc_failures_total",
        &[("reason", "telemetry")],
    )
}

#[tokio::test]
async fn a_slow_coderd_does_not_delay_the_answer_to_post_telemetry() {
    let s = start(false).await;
    let c = s.client_v2().await;
    let cp = c.coordinate().await;
    cp.add_tunnel(s.fake.agent_id).await;
    s.fake.set_slow(Duration::from_secs(2));
    let req = TelemetryRequest {
        events: vec![Default::default()],
    };
    post_telemetry_promptly(&c, &req).await;
    assert!(s.fake.telemetry().is_empty(), "coderd is still sleeping");
    assert!(eventually(WAIT, || s.fake.telemetry() == vec![req.clone()]).await);
    assert_eq!(telemetry_failures(&s), 0.0);
}

#[tokio::test]
async fn telemetry_posted_right_before_the_client_hangs_up_still_reaches_coderd() {
    // Coder's client posts its ping event and closes its connection at once; the forward
    // (a fresh dial to coderd) must outlive the client's session.
    let s = start(false).await;
    let c = s.client_v2().await;
    let cp = c.coordinate().await;
    cp.add_tunnel(s.fake.agent_id).await;
    s.fake.set_slow(Duration::from_secs(1));
    let req = TelemetryRequest {
        events: vec![Default::default(); 2],
    };
    post_telemetry_promptly(&c, &req).await;
    c.ws.close(1000, "").await;
    assert!(eventually(WAIT, || s.fake.telemetry() == vec![req.clone()]).await);
    assert_eq!(s.fake.tailnet_sessions(), 1);
    assert_eq!(telemetry_failures(&s), 0.0);
}

#[tokio::test]
async fn telemetry_beyond_the_sessions_queue_is_dropped_and_counted() {
    let s = start(false).await;
    let c = s.client_v2().await;
    let cp = c.coordinate().await;
    cp.add_tunnel(s.fake.agent_id).await;
    // The first forward waits for the slow dial; the queue fills up behind it.
    s.fake.set_slow(Duration::from_secs(1));
    let posted = QUEUE_CAPACITY + 4;
    let req = TelemetryRequest {
        events: vec![Default::default()],
    };
    for _ in 0..posted {
        post_telemetry_promptly(&c, &req).await;
    }
    let dropped = || {
        s.metric(
            "coordinator_upstream_rpc_failures_total",
            &[("reason", "telemetry_dropped")],
        )
    };
    assert!(
        eventually(WAIT, || s.fake.telemetry().len() as f64 + dropped()
            == posted as f64)
        .await
    );
    assert!(
        dropped() >= (posted - QUEUE_CAPACITY - 1) as f64,
        "at most one in flight and a full queue: {} dropped",
        dropped()
    );
    assert_eq!(telemetry_failures(&s), 0.0);
    assert!(!c.ws.is_ended());
}

#[tokio::test]
async fn an_unreachable_coderd_for_telemetry_leaves_the_clients_session_working() {
    let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let dead_url = format!("http://{}", closed.local_addr().unwrap());
    drop(closed);
    let s = start_with_rpc_url(false, Some(dead_url)).await;
    let agent_id = s.fake.agent_id;
    let a = s.agent_v2().await;
    let ap = a.coordinate().await;
    let an = node(agent_id, true, 1);
    ap.update_self(an.clone()).await;
    let c = s.client_v2().await;
    let mut cp = c.coordinate().await;
    cp.add_tunnel(agent_id).await;
    cp.expect_node(agent_id, &an).await;

    let req = TelemetryRequest {
        events: vec![Default::default()],
    };
    post_telemetry_promptly(&c, &req).await;
    assert!(eventually(WAIT, || telemetry_failures(&s) == 1.0).await);
    post_telemetry_promptly(&c, &req).await;
    assert!(eventually(WAIT, || telemetry_failures(&s) == 2.0).await);
    // The agent's telemetry goes on its own (unreachable) upstream session: same outcome.
    post_telemetry_promptly(&a, &req).await;
    assert!(eventually(WAIT, || telemetry_failures(&s) == 3.0).await);

    // The client's session (and the agent's) carry on coordinating.
    assert!(!c.ws.is_ended() && !a.ws.is_ended());
    let an2 = node(agent_id, true, 2);
    ap.update_self(an2.clone()).await;
    cp.expect_node(agent_id, &an2).await;
    assert_eq!(
        s.metric(
            "coordinator_upstream_rpc_failures_total",
            &[("reason", "dial")]
        ),
        0.0,
        "a telemetry dial is not a forwarding failure"
    );
    assert!(s.fake.telemetry().is_empty());
}

#[tokio::test]
async fn the_derp_map_is_served_as_plain_json() {
    let s = start(false).await;
    let mut conn = tokio::net::TcpStream::connect(s.addr).await.unwrap();
    let req = format!(
        "GET {} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
        coordinator::api::DERP_MAP_JSON_PATH,
        s.addr
    );
    conn.write_all(req.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    tokio::time::timeout(WAIT, conn.read_to_end(&mut buf))
        .await
        .unwrap()
        .unwrap();
    let text = String::from_utf8(buf).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: application/json"),
        "{head}"
    );
    assert_eq!(body.as_bytes(), &s.coord.derp_map().json[..]);
    // Tailscale's DERPMap form: what coderd's CODER_DERP_CONFIG_URL decodes.
    let v: serde_json::Value = serde_json::from_str(body).unwrap();
    assert_eq!(v["Regions"]["999"]["RegionID"], 999);
    assert_eq!(v["Regions"]["999"]["EmbeddedRelay"], true);
    assert_eq!(v["Regions"]["1000"]["Nodes"][0]["STUNOnly"], true);
    proto::derpmap::DerpMap::from_json(body.as_bytes()).unwrap();
}
