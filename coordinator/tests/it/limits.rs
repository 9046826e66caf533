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
