//! The legacy v1 JSON protocol end to end, alone and mixed with v2 peers.

use std::time::Duration;

use crate::common::v2::*;
use crate::common::*;
use futures_util::SinkExt;
use tokio_tungstenite::tungstenite::Message;
use uuid::Uuid;

const W: Duration = Duration::from_secs(10);

async fn v1_agent(h: &Harness, idx: usize, query: &str) -> Ws {
    h.ws(
        &format!("/api/v2/workspaceagents/me/coordinate{query}"),
        &h.agents[idx].token.to_string(),
    )
    .await
    .unwrap()
}

async fn v1_client(h: &Harness, idx: usize, query: &str) -> Ws {
    h.ws(
        &format!(
            "/api/v2/workspaceagents/{}/coordinate{query}",
            h.agents[idx].id
        ),
        USER_ALL,
    )
    .await
    .unwrap()
}

fn same(a: &proto::v1::Node, b: &proto::tailnet::v2::Node) -> bool {
    a.to_proto().unwrap() == *b
}

#[tokio::test]
async fn v1_agent_and_v1_client_exchange_nodes() {
    let h = Harness::start().await;
    let agent_id = h.agent().id;
    let mut agent = v1_agent(&h, 0, "").await;
    let anode = node(agent_id, true, 1);
    send_bin(&mut agent, v1_json(&anode)).await;
    let mut client = v1_client(&h, 0, "?version=1.0").await;
    let got = v1_recv(&mut client, W).await.unwrap();
    assert_eq!(got.len(), 1);
    assert!(same(&got[0], &anode));
    let cnode = node(Uuid::nil(), false, 1);
    send_bin(&mut client, v1_json(&cnode)).await;
    let got = v1_recv(&mut agent, W).await.unwrap();
    assert!(same(&got[0], &cnode));
    // Updates flow both ways; an identical update is not re-sent.
    let anode2 = node(agent_id, true, 2);
    send_bin(&mut agent, v1_json(&anode2)).await;
    let got = v1_recv(&mut client, W).await.unwrap();
    assert!(same(&got[0], &anode2));
    send_bin(&mut agent, v1_json(&anode2)).await;
    assert!(
        tokio::time::timeout(Duration::from_millis(300), v1_recv(&mut client, W))
            .await
            .is_err(),
        "duplicate array was sent"
    );
    assert!(
        eventually(Duration::from_secs(5), || {
            h.metric(
                "coordinator_sessions",
                &[("role", "agent"), ("protocol", "v1")],
            ) == 1.0
                && h.metric(
                    "coordinator_sessions",
                    &[("role", "client"), ("protocol", "v1")],
                ) == 1.0
        })
        .await
    );
}

#[tokio::test]
async fn v1_streaming_decoder_and_text_messages() {
    let h = Harness::start().await;
    let agent_id = h.agent().id;
    let mut client = v1_client(&h, 0, "").await;
    let mut agent = v1_agent(&h, 0, "?version=1.0").await;
    // Two nodes concatenated in one message: the second wins.
    let n1 = node(agent_id, true, 1);
    let n2 = node(agent_id, true, 2);
    let mut both = v1_json(&n1);
    both.extend_from_slice(b"\n");
    both.extend(v1_json(&n2));
    send_bin(&mut agent, both).await;
    let mut last = None;
    while let Ok(Some(v)) =
        tokio::time::timeout(Duration::from_millis(500), v1_recv(&mut client, W)).await
    {
        last = Some(v);
    }
    assert!(same(&last.unwrap()[0], &n2));
    // One node split across three messages.
    let n3 = node(agent_id, true, 3);
    let j = v1_json(&n3);
    let (a, rest) = j.split_at(5);
    let (b, c) = rest.split_at(rest.len() / 2);
    send_bin(&mut agent, a.to_vec()).await;
    send_bin(&mut agent, b.to_vec()).await;
    send_bin(&mut agent, c.to_vec()).await;
    let got = v1_recv(&mut client, W).await.unwrap();
    assert!(same(&got[0], &n3));
    // Text messages are accepted too (old wsproxy).
    let n4 = node(agent_id, true, 4);
    agent
        .send(Message::Text(
            String::from_utf8(v1_json(&n4)).unwrap().into(),
        ))
        .await
        .unwrap();
    let got = v1_recv(&mut client, W).await.unwrap();
    assert!(same(&got[0], &n4));
}

#[tokio::test]
async fn v1_json_that_is_not_a_node_ends_only_that_session() {
    let h = Harness::start().await;
    let agent_id = h.agent().id;
    let mut good = v1_client(&h, 0, "").await;
    let mut bad = v1_client(&h, 0, "").await;
    send_bin(&mut bad, br#"{"key": 12}"#.to_vec()).await;
    let (code, reason) = close_code(&mut bad).await.unwrap();
    assert_eq!(code, 1003, "{reason}");
    let mut bad2 = v1_client(&h, 0, "").await;
    send_bin(&mut bad2, b"[1,2,3]".to_vec()).await;
    assert_eq!(close_code(&mut bad2).await.unwrap().0, 1003);
    let mut bad3 = v1_client(&h, 0, "").await;
    send_bin(&mut bad3, b"}{ not json".to_vec()).await;
    assert_eq!(close_code(&mut bad3).await.unwrap().0, 1003);
    assert!(
        h.metric(
            "coordinator_protocol_errors_total",
            &[("kind", "v1_invalid_node")]
        ) >= 2.0
    );
    assert!(
        h.metric(
            "coordinator_protocol_errors_total",
            &[("kind", "v1_invalid_json")]
        ) >= 1.0
    );
    // The good session still works.
    let mut agent = v1_agent(&h, 0, "").await;
    let n = node(agent_id, true, 1);
    send_bin(&mut agent, v1_json(&n)).await;
    let got = v1_recv(&mut good, W).await.unwrap();
    assert!(same(&got[0], &n));
}

#[tokio::test]
async fn v1_agent_with_invalid_address_is_closed() {
    let h = Harness::start().await;
    let mut agent = v1_agent(&h, 0, "").await;
    let mut n = node(h.agent().id, true, 1);
    n.addresses = vec!["fd7a:115c:a1e0::1/128".into()];
    send_bin(&mut agent, v1_json(&n)).await;
    let (code, reason) = close_code(&mut agent).await.unwrap();
    assert_eq!(code, 1011);
    assert!(reason.contains("invalid node address"), "{reason}");
}

#[tokio::test]
async fn v1_agent_with_v2_client() {
    let h = Harness::start().await;
    let agent_id = h.agent().id;
    let mut agent = v1_agent(&h, 0, "").await;
    let anode = node(agent_id, true, 1);
    send_bin(&mut agent, v1_json(&anode)).await;
    let c = V2Conn::client(&h, 0, "").await;
    let mut client = c.coordinate().await;
    client.add_tunnel(agent_id).await;
    client.expect_node(agent_id, &anode).await;
    let cnode = node(Uuid::nil(), false, 1);
    client.update_self(cnode.clone()).await;
    let got = v1_recv(&mut agent, W).await.unwrap();
    assert!(same(&got[0], &cnode));
    // The adapter acknowledges on the v1 agent's behalf.
    client.expect_ready(agent_id).await;
    // Closing the v1 socket is a graceful goodbye.
    agent.close(None).await.unwrap();
    client.expect_disconnected(agent_id).await;
}

#[tokio::test]
async fn v2_agent_with_v1_client() {
    let h = Harness::start().await;
    let agent_id = h.agent().id;
    let a = V2Conn::agent(&h, 0).await;
    let mut agent = a.coordinate().await;
    let anode = node(agent_id, true, 1);
    agent.update_self(anode.clone()).await;
    let mut client = v1_client(&h, 0, "").await;
    let got = v1_recv(&mut client, W).await.unwrap();
    assert!(same(&got[0], &anode));
    let cnode = node(Uuid::nil(), false, 1);
    send_bin(&mut client, v1_json(&cnode)).await;
    agent
        .until("v1 client node", |p| p.nodes.values().any(|n| *n == cnode))
        .await;
    let client_id = *agent.nodes.keys().next().unwrap();
    // RFH from the v2 agent to a v1 client is accepted (v1 can't show it, but it's not an error).
    agent.ready_for_handshake(client_id).await;
    agent.expect_quiet(Duration::from_millis(200)).await;
    // The v1 client's socket dropping without a close frame is LOST.
    drop(client);
    agent
        .until("client gone", |p| {
            p.lost.contains_key(&client_id) || p.disconnected.contains_key(&client_id)
        })
        .await;
}

#[tokio::test]
async fn v1_sessions_end_on_shutdown() {
    let h = Harness::start().await;
    let mut agent = v1_agent(&h, 0, "").await;
    send_bin(&mut agent, v1_json(&node(h.agent().id, true, 1))).await;
    h.coord.shutdown().await;
    assert!(close_code(&mut agent).await.is_some());
}

#[tokio::test]
async fn v1_agent_double_connect() {
    let h = Harness::start().await;
    let agent_id = h.agent().id;
    let mut first = v1_agent(&h, 0, "").await;
    send_bin(&mut first, v1_json(&node(agent_id, true, 1))).await;
    let mut client = v1_client(&h, 0, "").await;
    v1_recv(&mut client, W).await.unwrap();
    let mut second = v1_agent(&h, 0, "").await;
    let (code, reason) = close_code(&mut first).await.unwrap();
    assert_eq!(code, 1000);
    assert_eq!(reason, "peer ID overwritten by new connection");
    let n2 = node(agent_id, true, 2);
    send_bin(&mut second, v1_json(&n2)).await;
    let got = v1_recv(&mut client, W).await.unwrap();
    assert!(same(&got[0], &n2));
}

#[tokio::test]
async fn v1_client_without_agent_then_agent_arrives() {
    let h = Harness::start().await;
    let agent_id = h.agent().id;
    let mut client = v1_client(&h, 0, "").await;
    let cnode = node(Uuid::nil(), false, 1);
    send_bin(&mut client, v1_json(&cnode)).await;
    // An agent without clients gets nothing; this one gets the waiting client's node.
    let mut agent = v1_agent(&h, 0, "").await;
    let got = v1_recv(&mut agent, W).await.unwrap();
    assert!(same(&got[0], &cnode));
    let anode = node(agent_id, true, 1);
    send_bin(&mut agent, v1_json(&anode)).await;
    let got = v1_recv(&mut client, W).await.unwrap();
    assert!(same(&got[0], &anode));
    // A lone agent hears nothing.
    let mut lone = v1_agent(&h, 1, "").await;
    send_bin(&mut lone, v1_json(&node(h.agents[1].id, true, 1))).await;
    assert!(
        tokio::time::timeout(Duration::from_millis(300), v1_recv(&mut lone, W))
            .await
            .is_err()
    );
}
