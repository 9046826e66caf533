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
