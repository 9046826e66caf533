//! What one peer may make the coordinator hold: nodes are bounded per field and in encoded bytes
//! (`CoordinatorConfig::node_limits`); a node over a limit ends its session with an error, is
//! never stored, and the graph's own accounting (`coordinator_graph_node_bytes`) shows what it
//! holds. The attack of issue 14 (a just-under-4-MiB request of two million empty endpoints,
//! ~51 MB of RSS each, kept for the session's life) is reproduced first.

use std::time::Duration;

use crate::common::v2::*;
use crate::common::*;
use coordinator::graph::NodeLimits;
use coordinator::CoordinatorConfig;
use prost::Message;
use proto::tailnet::v2::Node;

const NODE_BYTES: &str = "coordinator_graph_node_bytes";
const OVER_LIMIT: &str = "coordinator_nodes_over_limit_total";

/// The attack node: `n` empty endpoint strings (2 bytes each on the wire).
fn empty_endpoints(base: Node, n: usize) -> Node {
    Node {
        endpoints: vec![String::new(); n],
        ..base
    }
}

/// Issue 14, finding 1: two million empty endpoints in one `update_self` (just under the 4 MiB
/// dRPC message limit). Before the limits the node was stored and kept for the session's life;
/// now the session ends with a clear error and the graph holds nothing for it.
#[tokio::test]
async fn two_million_empty_endpoints_end_the_session_and_are_not_held() {
    let h = Harness::start().await;
    for (i, agent) in h.agents.iter().enumerate() {
        let conn = V2Conn::agent(&h, i).await;
        let mut p = conn.coordinate().await;
        let attack = empty_endpoints(node(agent.id, true, 1), 2_000_000);
        assert!(attack.encoded_len() < 4 << 20, "fits one dRPC message");
        p.update_self(attack).await;
        p.expect_error(
            "node update failed: node has 2000000 endpoints, more than the limit of 256",
        )
        .await;
        p.expect_closed().await;
        assert_eq!(h.coord.graph().node(agent.id), None);
    }
    assert_eq!(h.metric(NODE_BYTES, &[]), 0.0);
    assert_eq!(h.metric(OVER_LIMIT, &[]), h.agents.len() as f64);
    assert_eq!(
        h.metric(
            "coordinator_protocol_errors_total",
            &[("kind", "coordinate_node_over_limit")]
        ),
        h.agents.len() as f64
    );
}

/// A node exactly at every default entry limit is accepted and accounted at its encoded size;
/// a newer node replaces the count; the session's end releases it.
#[tokio::test]
async fn node_at_the_limits_is_held_and_accounted_until_the_session_ends() {
    let h = Harness::start().await;
    let limits = NodeLimits::default();
    let agent = h.agent().id;
    let conn = V2Conn::agent(&h, 0).await;
    let mut p = conn.coordinate().await;
    let mut big = node(agent, true, 1);
    big.endpoints = (0..limits.max_endpoints)
        .map(|i| format!("10.{}.{}.1:41641", i / 256, i % 256))
        .collect();
    big.derp_latency = (0..limits.max_derp_latency)
        .map(|i| {
            (
                format!("{}-v{}", i / 2, if i % 2 == 0 { 4 } else { 6 }),
                0.01,
            )
        })
        .collect();
    assert!(big.encoded_len() <= limits.max_node_bytes);
    p.update_self(big.clone()).await;
    p.expect_quiet(Duration::from_millis(100)).await;
    assert_eq!(h.coord.graph().node(agent), Some(big.clone()));
    assert_eq!(h.metric(NODE_BYTES, &[]), big.encoded_len() as f64);

    let small = node(agent, true, 2);
    p.update_self(small.clone()).await;
    assert!(
        eventually(Duration::from_secs(5), || h.metric(NODE_BYTES, &[])
            == small.encoded_len() as f64)
        .await
    );
    p.disconnect().await;
    p.expect_closed().await;
    assert!(eventually(Duration::from_secs(5), || h.metric(NODE_BYTES, &[]) == 0.0).await);
    assert_eq!(h.metric(OVER_LIMIT, &[]), 0.0);
}

/// Each field's entry limit and the byte limit, one over each, with small configured limits:
/// every violation ends the session with an error naming the limit; a neighbour is unaffected
/// and the graph holds only the neighbour's node.
#[tokio::test]
async fn one_over_each_limit_ends_the_session() {
    let limits = NodeLimits {
        max_endpoints: 4,
        max_addresses: 2,
        max_allowed_ips: 2,
        max_derp_latency: 4,
        max_derp_forced_websocket: 1,
        max_node_bytes: 1024,
    };
    let h = Harness::start_with(
        CoordinatorConfig {
            node_limits: limits.clone(),
            ..test_config()
        },
        3,
    )
    .await;
    let neighbour = h.agents[1].id;
    let nconn = V2Conn::agent(&h, 1).await;
    let np = nconn.coordinate().await;
    let nnode = node(neighbour, true, 1);
    np.update_self(nnode.clone()).await;

    let agent = h.agent().id;
    let base = node(agent, true, 1);
    let addr = base.addresses[0].clone();
    let cases: Vec<(Node, String)> = vec![
        (
            Node {
                endpoints: vec!["127.0.0.1:1".into(); 5],
                ..base.clone()
            },
            "node has 5 endpoints, more than the limit of 4".into(),
        ),
        (
            Node {
                addresses: vec![addr.clone(); 3],
                ..base.clone()
            },
            "node has 3 addresses, more than the limit of 2".into(),
        ),
        (
            Node {
                allowed_ips: vec![addr.clone(); 3],
                ..base.clone()
            },
            "node has 3 allowed_ips, more than the limit of 2".into(),
        ),
        (
            Node {
                derp_latency: (0..5).map(|i| (format!("{i}-v4"), 0.01)).collect(),
                ..base.clone()
            },
            "node has 5 derp_latency, more than the limit of 4".into(),
        ),
        (
            Node {
                derp_forced_websocket: (0..2).map(|i| (i, "x".to_string())).collect(),
                ..base.clone()
            },
            "node has 2 derp_forced_websocket, more than the limit of 1".into(),
        ),
        (
            Node {
                endpoints: vec!["x".repeat(2000)],
                ..base.clone()
            },
            "bytes encoded, more than the limit of 1024".into(),
        ),
    ];
    let n = cases.len();
    for (bad, error) in cases {
        let conn = V2Conn::agent(&h, 0).await;
        let mut p = conn.coordinate().await;
        p.update_self(bad).await;
        p.expect_error(&error).await;
        p.expect_closed().await;
        assert_eq!(h.coord.graph().node(agent), None);
    }
    assert_eq!(h.coord.graph().node(neighbour), Some(nnode.clone()));
    assert_eq!(h.metric(NODE_BYTES, &[]), nnode.encoded_len() as f64);
    assert_eq!(h.metric(OVER_LIMIT, &[]), n as f64);
}

/// The v1 JSON path feeds the same graph: an over-limit node ends that session too.
#[tokio::test]
async fn v1_node_over_the_limit_ends_the_session() {
    let h = Harness::start_with(
        CoordinatorConfig {
            node_limits: NodeLimits {
                max_endpoints: 4,
                ..NodeLimits::default()
            },
            ..test_config()
        },
        1,
    )
    .await;
    let agent = h.agent();
    let mut ws = h
        .ws(
            "/api/v2/workspaceagents/me/coordinate",
            &agent.token.to_string(),
        )
        .await
        .unwrap();
    let bad = Node {
        endpoints: vec!["127.0.0.1:1".into(); 5],
        ..node(agent.id, true, 1)
    };
    send_bin(&mut ws, v1_json(&bad)).await;
    let (code, reason) = close_code(&mut ws).await.expect("close frame");
    assert_eq!(code, 1011);
    assert!(
        reason.contains("node has 5 endpoints, more than the limit of 4"),
        "{reason}"
    );
    assert_eq!(h.coord.graph().node(agent.id), None);
    assert_eq!(h.metric(NODE_BYTES, &[]), 0.0);
    assert_eq!(h.metric(OVER_LIMIT, &[]), 1.0);
}

/// This process's resident set size in MB, from `/proc/self/status` (Linux).
fn rss_mb() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

/// RSS of `sessions` agent sessions each sending `make(agent id)` once and staying open, with
/// `limits`; prints the figures (graph bytes, over-limit count, RSS before/after).
#[allow(
    clippy::print_stdout,
    reason = "the figures are this by-hand measurement's output"
)]
async fn measure(label: &str, limits: NodeLimits, sessions: usize, make: fn(uuid::Uuid) -> Node) {
    let h = Harness::start_with(
        CoordinatorConfig {
            node_limits: limits,
            ..test_config()
        },
        sessions,
    )
    .await;
    let before = rss_mb();
    let mut held = Vec::new();
    for (i, agent) in h.agents.iter().enumerate() {
        let conn = V2Conn::agent(&h, i).await;
        let p = conn.coordinate().await;
        p.update_self(make(agent.id)).await;
        held.push((conn, p));
    }
    // Let every session's request reach the graph (or be refused).
    let expected = sessions as f64;
    eventually(Duration::from_secs(60), || {
        h.metric(OVER_LIMIT, &[]) == expected
            || h.agents
                .iter()
                .all(|a| h.coord.graph().node(a.id).is_some())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = rss_mb();
    println!(
        "{label}: {sessions} sessions, graph node bytes {:.0}, refused {:.0}, RSS {before:.0} MB -> {after:.0} MB (+{:.0} MB)",
        h.metric(NODE_BYTES, &[]),
        h.metric(OVER_LIMIT, &[]),
        after - before,
    );
    drop(held);
}

fn attack_node(id: uuid::Uuid) -> Node {
    empty_endpoints(node(id, true, 1), 2_000_000)
}

fn largest_allowed_node(id: uuid::Uuid) -> Node {
    let limits = NodeLimits::default();
    let mut n = node(id, true, 1);
    // Entry limits first, then fill up to the byte limit with one long endpoint.
    n.derp_latency = (0..limits.max_derp_latency)
        .map(|i| (format!("{i}-v4"), 0.01))
        .collect();
    n.endpoints = vec![String::new(); limits.max_endpoints - 1];
    let room = limits.max_node_bytes - n.encoded_len() - 8;
    n.endpoints.push("x".repeat(room));
    assert!(n.encoded_len() <= limits.max_node_bytes);
    n
}

/// Benchmark-style checks for the README (not asserted; run each alone, in its own process, with
/// `--ignored --nocapture --exact`): RSS of issue 14's attack without limits, with the default
/// limits, and of the largest node the defaults allow; 20 sessions each.
const MEASURED_SESSIONS: usize = 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "measurement for the README, run by hand"]
async fn rss_attack_without_limits() {
    let unlimited = NodeLimits {
        max_endpoints: usize::MAX,
        max_addresses: usize::MAX,
        max_allowed_ips: usize::MAX,
        max_derp_latency: usize::MAX,
        max_derp_forced_websocket: usize::MAX,
        max_node_bytes: usize::MAX,
    };
    measure(
        "no limits, 2M empty endpoints",
        unlimited,
        MEASURED_SESSIONS,
        attack_node,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "measurement for the README, run by hand"]
async fn rss_attack_with_default_limits() {
    measure(
        "default limits, 2M empty endpoints",
        NodeLimits::default(),
        MEASURED_SESSIONS,
        attack_node,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "measurement for the README, run by hand"]
async fn rss_largest_allowed_nodes() {
    measure(
        "default limits, largest allowed node",
        NodeLimits::default(),
        MEASURED_SESSIONS,
        largest_allowed_node,
    )
    .await;
}

const TUNNELS_OVER_LIMIT: &str = "coordinator_tunnels_over_limit_total";

/// One peer may hold at most `max_tunnels_per_peer` tunnels: repeating one it holds is fine, one
/// more ends the session with an error and the graph drops every tunnel the session held.
#[tokio::test]
async fn one_tunnel_over_the_limit_ends_the_session() {
    let h = Harness::start_with(
        CoordinatorConfig {
            max_tunnels_per_peer: 2,
            ..test_config()
        },
        3,
    )
    .await;
    let conn = V2Conn::dial(&h, "/api/v2/tailnet?version=2.3", USER_ALL).await;
    let mut p = conn.coordinate().await;
    p.add_tunnel(h.agents[0].id).await;
    p.add_tunnel(h.agents[1].id).await;
    p.add_tunnel(h.agents[1].id).await;
    p.expect_quiet(Duration::from_millis(200)).await;
    assert_eq!(h.metric("coordinator_tunnels", &[]), 2.0);
    assert_eq!(h.metric(TUNNELS_OVER_LIMIT, &[]), 0.0);
    p.add_tunnel(h.agents[2].id).await;
    p.expect_error("add tunnel failed: peer already has 2 tunnels, the limit")
        .await;
    p.expect_closed().await;
    assert_eq!(h.metric("coordinator_tunnels", &[]), 0.0);
    assert_eq!(h.metric(TUNNELS_OVER_LIMIT, &[]), 1.0);
    assert_eq!(
        h.metric(
            "coordinator_protocol_errors_total",
            &[("kind", "coordinate_tunnels_over_limit")]
        ),
        1.0
    );
}

// ---------------------------------------------------------------------------------------------
// Concurrent sessions per user and per agent id
// ---------------------------------------------------------------------------------------------

const OVER_CAP: &str = "coordinator_sessions_over_cap_total";
const CAPPED: &str = "coordinator_capped_sessions";

/// A user's client sessions on both client endpoints count together against
/// `max_sessions_per_user`; one more gets Coder's 429 JSON before the upgrade; another user is
/// unaffected; a session's end gives its place back.
#[tokio::test]
async fn client_sessions_per_user_are_capped_before_the_upgrade() {
    let h = Harness::start_with(
        CoordinatorConfig {
            max_sessions_per_user: 3,
            ..test_config()
        },
        2,
    )
    .await;
    let tailnet = "/api/v2/tailnet?version=2.3";
    let a = V2Conn::dial(&h, tailnet, USER_ALL).await;
    let b = V2Conn::client(&h, 0, "").await;
    // v1 on the per-agent endpoint counts too.
    let v1 = h
        .ws(
            &format!("/api/v2/workspaceagents/{}/coordinate", h.agents[1].id),
            USER_ALL,
        )
        .await
        .unwrap();
    assert_eq!(h.metric(CAPPED, &[("kind", "user")]), 3.0);
    for path in [
        tailnet.to_string(),
        format!(
            "/api/v2/workspaceagents/{}/coordinate?version=2.0",
            h.agents[0].id
        ),
    ] {
        let (status, body) = h.ws_error(&path, USER_ALL).await;
        assert_eq!(status, 429, "{body}");
        assert_eq!(
            body["message"],
            "Too many concurrent coordination sessions."
        );
        assert!(
            body["detail"]
                .as_str()
                .unwrap()
                .contains("already has 3 concurrent coordination sessions"),
            "{body}"
        );
    }
    assert_eq!(h.metric(OVER_CAP, &[("kind", "user")]), 2.0);
    assert_eq!(h.metric(CAPPED, &[("kind", "user")]), 3.0);
    // Another user has places of their own.
    let other = V2Conn::dial(&h, tailnet, USER_ONE).await;
    let mut p = other.coordinate().await;
    p.add_tunnel(h.agents[0].id).await;
    p.expect_quiet(Duration::from_millis(100)).await;
    assert_eq!(h.metric(CAPPED, &[("kind", "user")]), 4.0);
    // Ending sessions (however they end) gives the places back, exactly.
    drop((a, v1));
    assert!(
        eventually(Duration::from_secs(10), || h
            .metric(CAPPED, &[("kind", "user")])
            == 2.0)
        .await
    );
    let again = V2Conn::dial(&h, tailnet, USER_ALL).await;
    let _ = again.coordinate().await;
    assert_eq!(h.metric(CAPPED, &[("kind", "user")]), 3.0);
    drop((b, again, p, other));
    assert!(
        eventually(Duration::from_secs(10), || h
            .metric(CAPPED, &[("kind", "user")])
            == 0.0)
        .await
    );
    assert_eq!(h.metric(OVER_CAP, &[("kind", "user")]), 2.0);
}

/// One agent id's coordination sessions (`/me/rpc` and `/me/coordinate`) count together against
/// `max_sessions_per_agent`; another agent is unaffected.
#[tokio::test]
async fn coordination_sessions_per_agent_id_are_capped() {
    let h = Harness::start_with(
        CoordinatorConfig {
            max_sessions_per_agent: 2,
            ..test_config()
        },
        2,
    )
    .await;
    let token = h.agents[0].token.to_string();
    let rpc = V2Conn::agent(&h, 0).await;
    let v1 = h
        .ws("/api/v2/workspaceagents/me/coordinate", &token)
        .await
        .unwrap();
    for path in [
        "/api/v2/workspaceagents/me/rpc?version=2.10&role=agent",
        "/api/v2/workspaceagents/me/coordinate?version=2.0",
        "/api/v2/workspaceagents/me/coordinate",
    ] {
        let (status, body) = h.ws_error(path, &token).await;
        assert_eq!(status, 429, "{path}: {body}");
        assert_eq!(
            body["message"],
            "Too many concurrent coordination sessions."
        );
    }
    assert_eq!(h.metric(OVER_CAP, &[("kind", "agent")]), 3.0);
    assert_eq!(h.metric(CAPPED, &[("kind", "agent")]), 2.0);
    let _other = V2Conn::agent(&h, 1).await;
    assert_eq!(h.metric(CAPPED, &[("kind", "agent")]), 3.0);
    drop(rpc);
    assert!(
        eventually(Duration::from_secs(10), || h
            .metric(CAPPED, &[("kind", "agent")])
            == 2.0)
        .await
    );
    let _again = V2Conn::agent(&h, 0).await;
    assert_eq!(h.metric(CAPPED, &[("kind", "agent")]), 3.0);
    drop(v1);
}

/// Sidecar mode: the user comes from coderd's answer, so two different tokens of one user share
/// that user's places.
#[tokio::test]
async fn sidecar_sessions_per_user_follow_coderds_user_id() {
    use crate::fake_coder::FakeCoder;
    use crate::upstream_harness::{test_config as upstream_config, Sidecar, Wiring};
    let fake = FakeCoder::start().await;
    let cfg = upstream_config(&fake.url);
    let s = Sidecar::launch(
        fake,
        cfg,
        Wiring::Proxy,
        coordinator::derpmap::DerpMapConfig::default(),
        |c| c.max_sessions_per_user = 2,
    )
    .await;
    let tailnet = "/api/v2/tailnet?version=2.3";
    let a = s.v2(tailnet, &s.fake.user_token_ssh).await;
    let b = s.v2(tailnet, &s.fake.user_token_ssh_scoped).await;
    let (status, body) = s.ws_error(tailnet, &s.fake.user_token_ssh).await;
    assert_eq!(status, 429, "{body}");
    let (status, _) = s
        .ws_error(&s.coordinate_path(), &s.fake.user_token_ssh)
        .await;
    assert_eq!(status, 429);
    assert_eq!(s.metric(OVER_CAP, &[("kind", "user")]), 2.0);
    // Another user of coderd is not affected.
    let _bob = s.v2(tailnet, &s.fake.user_token_nossh).await;
    assert_eq!(s.metric(CAPPED, &[("kind", "user")]), 3.0);
    drop(a);
    assert!(
        eventually(Duration::from_secs(10), || s
            .metric(CAPPED, &[("kind", "user")])
            == 2.0)
        .await
    );
    let _c = s.client_v2().await;
    assert_eq!(s.metric(CAPPED, &[("kind", "user")]), 3.0);
    drop(b);
}

// ---------------------------------------------------------------------------------------------
// yamux streams and buffered bytes per session
// ---------------------------------------------------------------------------------------------

const BUFFERED: &str = "coordinator_session_buffered_bytes";
const BUFFER_EXCEEDED: &str = "tailnetd_yamux_buffer_limit_exceeded_total";

/// A raw yamux client session on an agent's `/me/rpc`, for writing dRPC bytes by hand.
async fn raw_agent_session(h: &Harness, idx: usize) -> coordinator::rpc::yamux::Session {
    raw_session(
        h,
        "/api/v2/workspaceagents/me/rpc?version=2.10&role=agent",
        &h.agents[idx].token.to_string(),
    )
    .await
}

/// A raw yamux client session on `path` with `token`.
async fn raw_session(h: &Harness, path: &str, token: &str) -> coordinator::rpc::yamux::Session {
    use coordinator::rpc::wsio::{WsConfig, WsIo};
    use coordinator::rpc::yamux::{Config, Session};
    let ws = h.ws(path, token).await.unwrap();
    let (io, _handle) = WsIo::new(ws, WsConfig::client());
    Session::client(io, Config::default())
}

/// Client sessions have their own, smaller bound (`client_session_max_buffered_bytes`): what a
/// client sends is small, and one user may hold many sessions.
#[tokio::test]
async fn client_sessions_have_their_own_buffered_bytes_bound() {
    use tokio::io::AsyncWriteExt;
    let h = Harness::start_with(
        CoordinatorConfig {
            client_session_max_buffered_bytes: 512 * 1024,
            ..test_config()
        },
        1,
    )
    .await;
    let session = raw_session(&h, "/api/v2/tailnet?version=2.3", USER_ALL).await;
    // 100 KiB partial Invokes are held twice: the third stream passes 512 KiB.
    let mut streams = Vec::new();
    for _ in 0..3 {
        let Ok(mut s) = session.open().await else {
            break;
        };
        let _ = s.write_all(&partial_invoke(100 * 1024)).await;
        streams.push(s);
    }
    tokio::time::timeout(Duration::from_secs(10), session.closed())
        .await
        .expect("session ended");
    assert_eq!(h.metric(BUFFER_EXCEEDED, &[]), 1.0);
    assert!(eventually(Duration::from_secs(10), || h.metric(BUFFERED, &[]) == 0.0).await);
}

/// One dRPC frame of an Invoke that never completes (`done` unset), `len` bytes of data.
fn partial_invoke(len: usize) -> bytes::BytesMut {
    let mut out = bytes::BytesMut::new();
    proto::drpc::Frame {
        stream_id: 1,
        message_id: 1,
        kind: proto::drpc::Kind::Invoke,
        done: false,
        control: false,
        data: bytes::Bytes::from(vec![b'x'; len]),
    }
    .encode(&mut out);
    out
}

/// Streams each holding a partial dRPC packet: the session's accounting grows with them, and the
/// stream whose bytes take it past `agent_session_max_buffered_bytes` ends the whole session with
/// GoAway(protocol error); everything it held is given back.
#[tokio::test]
async fn buffered_bytes_per_session_are_bounded_and_end_the_session() {
    use tokio::io::AsyncWriteExt;
    const LIMIT: usize = 1 << 20;
    const PART: usize = 200 * 1024;
    let h = Harness::start_with(
        CoordinatorConfig {
            agent_session_max_buffered_bytes: LIMIT,
            ..test_config()
        },
        2,
    )
    .await;
    // A neighbour session that must survive.
    let neighbour = V2Conn::agent(&h, 1).await;
    let mut np = neighbour.coordinate().await;
    // The neighbour, idle after its Coordinate call was read, holds nothing: a stream waiting for
    // its next packet gives its read buffer back.
    assert!(eventually(Duration::from_secs(10), || h.metric(BUFFERED, &[]) == 0.0).await);
    let baseline = h.metric(BUFFERED, &[]);
    let session = raw_agent_session(&h, 0).await;
    let mut streams = Vec::new();
    // Each partial Invoke is held twice by the server: in the packet assembler and in the raw
    // prefix kept for a take-over.
    for i in 0..2 {
        let mut s = session.open().await.unwrap();
        s.write_all(&partial_invoke(PART)).await.unwrap();
        s.flush().await.unwrap();
        streams.push(s);
        let want = baseline + ((i + 1) * 2 * PART) as f64;
        assert!(
            eventually(Duration::from_secs(10), || h.metric(BUFFERED, &[]) >= want).await,
            "held {} want {want}",
            h.metric(BUFFERED, &[])
        );
    }
    assert!(h.metric(BUFFERED, &[]) <= LIMIT as f64);
    assert!(!session.handle().is_closed());
    let mut s = session.open().await.unwrap();
    s.write_all(&partial_invoke(PART)).await.unwrap();
    let end = tokio::time::timeout(Duration::from_secs(10), session.closed())
        .await
        .expect("session ended");
    // GoAway(protocol error) then WebSocket close 1011, like every yamux protocol error; the
    // client may see the close first.
    use coordinator::rpc::yamux::SessionError;
    assert!(
        matches!(
            end,
            SessionError::RemoteGoAway(proto::yamux::GO_AWAY_PROTOCOL_ERROR) | SessionError::Eof
        ),
        "{end:?}"
    );
    assert_eq!(h.metric(BUFFER_EXCEEDED, &[]), 1.0);
    assert_eq!(h.metric("tailnetd_yamux_protocol_errors_total", &[]), 1.0);
    assert!(
        eventually(Duration::from_secs(5), || h
            .metric("coordinator_protocol_errors_total", &[("kind", "yamux")])
            == 1.0)
        .await
    );
    assert!(
        eventually(Duration::from_secs(10), || h.metric(BUFFERED, &[])
            == baseline)
        .await
    );
    // The neighbour is untouched.
    let n = node(h.agents[1].id, true, 1);
    np.update_self(n.clone()).await;
    np.expect_quiet(Duration::from_millis(100)).await;
    assert_eq!(h.coord.graph().node(h.agents[1].id), Some(n));
}

/// Streams beyond `session_max_streams` are refused with RST (as hashicorp refuses streams past
/// its accept backlog); the session and its streams within the cap go on.
#[tokio::test]
async fn streams_per_session_are_capped() {
    use tokio::io::AsyncWriteExt;
    let h = Harness::start_with(
        CoordinatorConfig {
            session_max_streams: 4,
            ..test_config()
        },
        1,
    )
    .await;
    let session = raw_agent_session(&h, 0).await;
    let mut streams = Vec::new();
    for _ in 0..6 {
        let mut s = session.open().await.unwrap();
        s.write_all(&partial_invoke(16)).await.unwrap();
        streams.push(s);
    }
    assert!(
        eventually(Duration::from_secs(10), || h
            .metric("tailnetd_yamux_streams_rejected_total", &[])
            == 2.0)
        .await
    );
    assert_eq!(h.metric("tailnetd_yamux_streams", &[]), 4.0);
    assert!(!session.handle().is_closed());
    // Each held stream's partial packet is accounted (raw prefix + assembler, plus headers).
    assert!(
        eventually(Duration::from_secs(10), || h.metric(BUFFERED, &[])
            >= 4.0 * 32.0)
        .await
    );
    drop(streams);
    drop(session);
    assert!(eventually(Duration::from_secs(10), || h.metric(BUFFERED, &[]) == 0.0).await);
}

// ---------------------------------------------------------------------------------------------
// Queued bytes per receiver
// ---------------------------------------------------------------------------------------------

const OUTBOX_BYTES: &str = "coordinator_outbox_bytes";
const OUTBOX_OVERFLOWS: &str = "coordinator_outbox_byte_overflows_total";

/// A tunnelled receiver that stops reading is kicked once its queued bytes would pass
/// `response_buffer_bytes`, long before the 512-entry bound; the queue's bytes are given back.
#[tokio::test]
async fn a_stalled_receiver_is_kicked_at_the_byte_bound() {
    const BOUND: usize = 256 * 1024;
    let h = Harness::start_with(
        CoordinatorConfig {
            response_buffer_bytes: BOUND,
            ..test_config()
        },
        1,
    )
    .await;
    let agent = h.agent().id;
    let conn = V2Conn::agent(&h, 0).await;
    let ap = conn.coordinate().await;
    ap.update_self(node(agent, true, 1)).await;
    // The client tunnels to the agent and then never reads again.
    let client = V2Conn::client(&h, 0, "").await;
    let mut cp = client.coordinate().await;
    cp.add_tunnel(agent).await;
    cp.until("agent node", |p| p.nodes.contains_key(&agent))
        .await;
    let mut sent = 0;
    // ~40 KB nodes, each different: the client's transport window (256 KiB) and its dRPC
    // receive queue fill first, then its outbox.
    while h.metric(OUTBOX_OVERFLOWS, &[]) == 0.0 && sent < 200 {
        sent += 1;
        let mut n = node(agent, true, 1);
        n.endpoints = vec![format!("{sent}:{}", "e".repeat(40_000))];
        ap.update_self(n).await;
        tokio::time::sleep(Duration::from_millis(5)).await;
        assert!(h.metric(OUTBOX_BYTES, &[]) <= (BOUND + 64 * 1024) as f64);
    }
    assert!(
        eventually(Duration::from_secs(10), || h.metric(OUTBOX_OVERFLOWS, &[])
            == 1.0)
        .await,
        "sent {sent}"
    );
    assert!(sent < 100, "kicked by bytes, far below 512 entries: {sent}");
    assert_eq!(
        h.metric(
            "coordinator_peers_kicked_total",
            &[("reason", "queue_full")]
        ),
        1.0
    );
    assert!(
        eventually(Duration::from_secs(10), || h.metric(OUTBOX_BYTES, &[])
            == 0.0)
        .await
    );
    // The sender is unaffected.
    assert!(h.coord.graph().node(agent).is_some());
    drop(cp);
}
