//! Coder's coordinator cases end to end over real WebSockets with the v2 stack
//! (tailnet/test/cases.go and tailnet/coordinator_test.go).

use std::time::Duration;

use crate::common::v2::*;
use crate::common::*;
use coordinator::authz::{addr_from_uuid, TAILSCALE_SERVICE_PREFIX};
use proto::tailnet::v2::methods;
use proto::tailnet::v2::{RefreshResumeTokenRequest, RefreshResumeTokenResponse};
use uuid::Uuid;

/// Agent 0 and one of its clients, both with nodes; returns (agent peer, client peer, client id).
async fn agent_and_client(h: &Harness) -> (V2Conn, TestPeer, V2Conn, TestPeer, Uuid) {
    let agent_id = h.agent().id;
    let aconn = V2Conn::agent(h, 0).await;
    let mut agent = aconn.coordinate().await;
    let anode = node(agent_id, true, 1);
    agent.update_self(anode.clone()).await;
    let cconn = V2Conn::client(h, 0, "").await;
    let mut client = cconn.coordinate().await;
    client.add_tunnel(agent_id).await;
    client.expect_node(agent_id, &anode).await;
    let cnode = node(Uuid::nil(), false, 1);
    client.update_self(cnode.clone()).await;
    // The agent learns the client's id from the NODE update.
    agent.until("client node", |p| p.nodes.len() == 1).await;
    let client_id = *agent.nodes.keys().next().unwrap();
    assert_eq!(agent.nodes[&client_id], cnode);
    let _ = &mut client;
    (aconn, agent, cconn, client, client_id)
}

#[tokio::test]
async fn graceful_disconnect() {
    let h = Harness::start().await;
    let (_a, mut agent, _c, mut client, client_id) = agent_and_client(&h).await;
    client.disconnect().await;
    agent.expect_disconnected(client_id).await;
    // The server closes the client's stream promptly, with no error.
    client.expect_closed().await;
    assert!(client.errors.is_empty(), "{:?}", client.errors);
    assert!(!agent.lost.contains_key(&client_id));
}

#[tokio::test]
async fn lost_when_the_connection_drops() {
    let h = Harness::start().await;
    let (_a, mut agent, cconn, client, client_id) = agent_and_client(&h).await;
    drop(client);
    drop(cconn);
    agent.expect_lost(client_id).await;
    assert!(!agent.disconnected.contains_key(&client_id));
}

#[tokio::test]
async fn lost_when_only_the_stream_ends() {
    let h = Harness::start().await;
    let (_a, mut agent, _c, client, client_id) = agent_and_client(&h).await;
    client.stream.close().await.unwrap();
    agent.expect_lost(client_id).await;
}

#[tokio::test]
async fn ready_for_handshake_with_and_without_permission() {
    let h = Harness::start().await;
    let agent_id = h.agent().id;
    let (_a, mut agent, _c, mut client, client_id) = agent_and_client(&h).await;
    agent.ready_for_handshake(client_id).await;
    client.expect_ready(agent_id).await;
    // No tunnel to a stranger: a non-fatal error for the agent.
    let stranger = Uuid::new_v4();
    agent.ready_for_handshake(stranger).await;
    agent
        .expect_error(&format!(
            "ready for handshake error: you do not share a tunnel with \"{stranger}\""
        ))
        .await;
    // The stream is still usable.
    let n2 = node(agent_id, true, 2);
    agent.update_self(n2.clone()).await;
    client.expect_node(agent_id, &n2).await;
    assert!(!agent.closed);
}

#[tokio::test]
async fn bidirectional_tunnels_between_user_scoped_clients() {
    // /api/v2/tailnet peers whose user may reach "all" can tunnel to each other both ways.
    let h = Harness::start().await;
    let c1 = V2Conn::dial(&h, "/api/v2/tailnet?version=2.3", USER_ALL).await;
    let c2 = V2Conn::dial(&h, "/api/v2/tailnet?version=2.3", USER_ALL).await;
    let mut p1 = c1.coordinate().await;
    let mut p2 = c2.coordinate().await;
    let n1 = node(Uuid::nil(), false, 1);
    let n2 = node(Uuid::nil(), false, 2);
    p1.update_self(n1.clone()).await;
    p2.update_self(n2.clone()).await;
    // Discover ids via resume tokens (sub = peer id).
    let id = |t: &RefreshResumeTokenResponse| {
        use base64::Engine;
        let claims = t.token.split('.').nth(1).unwrap();
        let v: serde_json::Value = serde_json::from_slice(
            &base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(claims)
                .unwrap(),
        )
        .unwrap();
        Uuid::parse_str(v["sub"].as_str().unwrap()).unwrap()
    };
    let t1: RefreshResumeTokenResponse = c1
        .rpc
        .invoke_unary(methods::REFRESH_RESUME_TOKEN, &RefreshResumeTokenRequest {})
        .await
        .unwrap();
    let t2: RefreshResumeTokenResponse = c2
        .rpc
        .invoke_unary(methods::REFRESH_RESUME_TOKEN, &RefreshResumeTokenRequest {})
        .await
        .unwrap();
    let (id1, id2) = (id(&t1), id(&t2));
    p1.add_tunnel(id2).await;
    p2.add_tunnel(id1).await;
    p1.expect_node(id2, &n2).await;
    p2.expect_node(id1, &n1).await;
    let n1b = node(Uuid::nil(), false, 3);
    p1.update_self(n1b.clone()).await;
    p2.expect_node(id1, &n1b).await;
    p1.disconnect().await;
    p2.expect_disconnected(id1).await;
}

#[tokio::test]
async fn user_scoped_client_needs_permission() {
    let h = Harness::start().await;
    let c = V2Conn::dial(&h, "/api/v2/tailnet", USER_ONE).await;
    let mut p = c.coordinate().await;
    p.add_tunnel(h.agent().id).await;
    p.expect_quiet(Duration::from_millis(300)).await;
    p.add_tunnel(h.agents[1].id).await;
    p.expect_error("authorization: workspace agent not found or you do not have permission")
        .await;
    p.expect_closed().await;
    // WorkspaceUpdates is not implemented yet: code 12.
    let err = c
        .rpc
        .invoke_unary::<_, proto::tailnet::v2::WorkspaceUpdate>(
            methods::WORKSPACE_UPDATES,
            &proto::tailnet::v2::WorkspaceUpdatesRequest::default(),
        )
        .await
        .unwrap_err();
    assert!(err.is_unimplemented(), "{err:?}");
    assert_eq!(err.code(), 12);
}

#[tokio::test]
async fn agent_double_connect_overwrites() {
    let h = Harness::start().await;
    let agent_id = h.agent().id;
    let (_a, mut agent1, _c, mut client, _client_id) = agent_and_client(&h).await;
    let a2 = V2Conn::agent(&h, 0).await;
    let mut agent2 = a2.coordinate().await;
    agent1
        .expect_error("peer ID overwritten by new connection")
        .await;
    agent1.expect_closed().await;
    // The new connection gets the client's node at once and its own node reaches the client.
    agent2.until("client node", |p| p.nodes.len() == 1).await;
    let n = node(agent_id, true, 7);
    agent2.update_self(n.clone()).await;
    client.expect_node(agent_id, &n).await;
}

#[tokio::test]
async fn invalid_agent_address_ends_only_that_stream() {
    let h = Harness::start().await;
    let agent_id = h.agent().id;
    let (_a, mut agent, _c, mut client, _client_id) = agent_and_client(&h).await;
    let mut bad = node(agent_id, true, 1);
    bad.addresses = vec!["fd7a:115c:a1e0::1/128".into()];
    agent.update_self(bad).await;
    agent
        .expect_error("authorization: Addresses: invalid node address")
        .await;
    agent.expect_closed().await;
    client.expect_lost(agent_id).await;
    // Another agent is unaffected.
    let other = V2Conn::agent(&h, 1).await;
    let mut p = other.coordinate().await;
    p.update_self(node(h.agents[1].id, true, 1)).await;
    p.expect_quiet(Duration::from_millis(200)).await;
    // Wrong allowed_ips and prefix length too.
    let a3 = V2Conn::agent(&h, 2).await;
    let mut p3 = a3.coordinate().await;
    let mut bad = node(h.agents[2].id, true, 1);
    bad.allowed_ips = vec![format!(
        "{}/64",
        addr_from_uuid(TAILSCALE_SERVICE_PREFIX, h.agents[2].id)
    )];
    p3.update_self(bad).await;
    p3.expect_error("authorization: AllowedIps: invalid address bits, expected 128, got 64")
        .await;
    p3.expect_closed().await;
    assert!(
        h.metric(
            "coordinator_protocol_errors_total",
            &[("kind", "coordinate_unauthorized")]
        ) >= 2.0
    );
}

#[tokio::test]
async fn invalid_client_address_bits() {
    let h = Harness::start().await;
    let c = V2Conn::client(&h, 0, "").await;
    let mut p = c.coordinate().await;
    p.add_tunnel(h.agent().id).await;
    let mut n = node(Uuid::nil(), false, 1);
    n.addresses = vec!["fd7a:115c:a1e0::/64".into()];
    p.update_self(n).await;
    p.expect_error("invalid address bits, expected 128, got 64")
        .await;
    p.expect_closed().await;
}

#[tokio::test]
async fn client_may_only_tunnel_to_its_agent() {
    let h = Harness::start().await;
    let c = V2Conn::client(&h, 0, "").await;
    let mut p = c.coordinate().await;
    let other = h.agents[1].id;
    p.add_tunnel(other).await;
    p.expect_error("authorization: invalid agent id").await;
    p.expect_closed().await;
    // Clients may not acknowledge handshakes.
    let c2 = V2Conn::client(&h, 0, "").await;
    let mut p2 = c2.coordinate().await;
    p2.ready_for_handshake(h.agent().id).await;
    p2.expect_error("clients may not send ready_for_handshake")
        .await;
    // Agents may not open tunnels.
    let a = V2Conn::agent(&h, 0).await;
    let mut pa = a.coordinate().await;
    pa.add_tunnel(Uuid::new_v4()).await;
    pa.expect_error("agents cannot open tunnels").await;
    pa.expect_closed().await;
}

#[tokio::test]
async fn agent_without_clients_gets_nothing() {
    let h = Harness::start().await;
    let a = V2Conn::agent(&h, 0).await;
    let mut p = a.coordinate().await;
    p.update_self(node(h.agent().id, true, 1)).await;
    p.expect_quiet(Duration::from_millis(500)).await;
    assert!(p.nodes.is_empty());
}

#[tokio::test]
async fn client_without_agent_then_agent_arrives() {
    let h = Harness::start().await;
    let agent_id = h.agent().id;
    let c = V2Conn::client(&h, 0, "").await;
    let mut client = c.coordinate().await;
    client.add_tunnel(agent_id).await;
    let cnode = node(Uuid::nil(), false, 1);
    client.update_self(cnode.clone()).await;
    client.expect_quiet(Duration::from_millis(300)).await;
    let a = V2Conn::agent(&h, 0).await;
    let mut agent = a.coordinate().await;
    // The tunnel survived the agent's absence: the agent gets the client's node on connect.
    agent
        .until("client node", |p| p.nodes.values().any(|n| *n == cnode))
        .await;
    let anode = node(agent_id, true, 1);
    agent.update_self(anode.clone()).await;
    client.expect_node(agent_id, &anode).await;
}

#[tokio::test]
async fn remove_tunnel_disconnects_both_sides() {
    let h = Harness::start().await;
    let agent_id = h.agent().id;
    let (_a, mut agent, _c, mut client, client_id) = agent_and_client(&h).await;
    client.remove_tunnel(agent_id).await;
    client.expect_disconnected(agent_id).await;
    agent.expect_disconnected(client_id).await;
}

#[tokio::test]
async fn telemetry_and_unimplemented_methods() {
    let h = Harness::start().await;
    let a = V2Conn::agent(&h, 0).await;
    let req = proto::tailnet::v2::TelemetryRequest {
        events: vec![Default::default(), Default::default(), Default::default()],
    };
    let _: proto::tailnet::v2::TelemetryResponse = a
        .rpc
        .invoke_unary(methods::POST_TELEMETRY, &req)
        .await
        .unwrap();
    assert_eq!(h.metric("coordinator_telemetry_events_total", &[]), 3.0);
    // Agents get no resume tokens (coderd has no provider on /me/rpc).
    let err = a
        .rpc
        .invoke_unary::<_, RefreshResumeTokenResponse>(
            methods::REFRESH_RESUME_TOKEN,
            &RefreshResumeTokenRequest {},
        )
        .await
        .unwrap_err();
    assert!(err.is_unimplemented(), "{err:?}");
    // Agent-service methods are not served yet.
    let err = a
        .rpc
        .invoke_unary::<_, proto::agent::v2::Manifest>(
            proto::agent::v2::methods::GET_MANIFEST,
            &proto::agent::v2::GetManifestRequest {},
        )
        .await
        .unwrap_err();
    assert!(err.is_unimplemented(), "{err:?}");
    assert!(err.to_string().contains("unknown rpc: "), "{err}");
    // The session survives all of that.
    let mut p = a.coordinate().await;
    p.update_self(node(h.agent().id, true, 1)).await;
    p.expect_quiet(Duration::from_millis(200)).await;
}

#[tokio::test]
async fn resume_token_keeps_the_peer_id() {
    let h = Harness::start().await;
    let agent_id = h.agent().id;
    let a = V2Conn::agent(&h, 0).await;
    let mut agent = a.coordinate().await;
    agent.update_self(node(agent_id, true, 1)).await;

    let c = V2Conn::client(&h, 0, "").await;
    let tok: RefreshResumeTokenResponse = c
        .rpc
        .invoke_unary(methods::REFRESH_RESUME_TOKEN, &RefreshResumeTokenRequest {})
        .await
        .unwrap();
    assert_eq!(tok.refresh_in.unwrap().seconds, 12 * 3600);
    assert!(tok.expires_at.is_some());
    let client = c.coordinate().await;
    client.add_tunnel(agent_id).await;
    let n1 = node(Uuid::nil(), false, 1);
    client.update_self(n1.clone()).await;
    agent.until("client node", |p| p.nodes.len() == 1).await;
    let first_id = *agent.nodes.keys().next().unwrap();
    drop(client);
    drop(c);
    agent.expect_lost(first_id).await;

    // Redial with the token: same peer id.
    let c2 = V2Conn::client(&h, 0, &format!("&resume_token={}", tok.token)).await;
    let client2 = c2.coordinate().await;
    client2.add_tunnel(agent_id).await;
    let n2 = node(Uuid::nil(), false, 2);
    client2.update_self(n2.clone()).await;
    agent.expect_node(first_id, &n2).await;

    // A token from another coordinator (another key) is refused with the validation field.
    let other = Harness::start().await;
    let (status, body) = other
        .ws_error(
            &format!(
                "/api/v2/workspaceagents/{}/coordinate?version=2.0&resume_token={}",
                other.agent().id,
                tok.token
            ),
            USER_ALL,
        )
        .await;
    assert_eq!(status, 401);
    assert_eq!(body["message"], "Invalid resume token");
    assert_eq!(body["validations"][0]["field"], "resume_token");
}

#[tokio::test]
async fn stream_derp_maps_follows_the_file() {
    let h = Harness::start().await;
    let a = V2Conn::agent(&h, 0).await;
    let mut s = a.rpc.open_stream(methods::STREAM_DERP_MAPS).await.unwrap();
    s.send_msg(&proto::tailnet::v2::StreamDerpMapsRequest {})
        .await
        .unwrap();
    s.close_send().await.unwrap();
    let m: proto::tailnet::v2::DerpMap = tokio::time::timeout(WAIT, s.recv_msg())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(m.home_params.is_some());
    assert!(m.regions.contains_key(&1));
    assert!(m.regions[&999].embedded_relay);
    std::fs::write(
        h.derp_file.as_ref().unwrap(),
        derp_map_json(2, "derp2.example"),
    )
    .unwrap();
    let m: proto::tailnet::v2::DerpMap = tokio::time::timeout(WAIT, s.recv_msg())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(m.regions.contains_key(&2) && !m.regions.contains_key(&1));
    assert_eq!(m.regions[&2].nodes[0].host_name, "derp2.example");
    // A broken file keeps the old map (nothing is sent).
    std::fs::write(h.derp_file.as_ref().unwrap(), "{broken").unwrap();
    assert!(tokio::time::timeout(
        Duration::from_millis(600),
        s.recv_msg::<proto::tailnet::v2::DerpMap>()
    )
    .await
    .is_err());
    assert!(h.coord.derp_map().map.regions.contains_key(&2));
    assert!(h.metric("coordinator_derp_map_updates_total", &[]) >= 1.0);
}

#[tokio::test]
async fn shutdown_gives_lost_semantics() {
    let h = Harness::start().await;
    let (_a, mut agent, _c, mut client, _client_id) = agent_and_client(&h).await;
    h.coord.shutdown().await;
    agent.expect_error("coordinator closed").await;
    agent.expect_closed().await;
    client.expect_closed().await;
    assert!(agent.disconnected.is_empty());
    assert_eq!(h.coord.session_count(), 0);
}

#[tokio::test]
async fn session_gauge_tracks_sessions() {
    let h = Harness::start().await;
    let a = V2Conn::agent(&h, 0).await;
    let c = V2Conn::client(&h, 0, "").await;
    assert!(
        eventually(Duration::from_secs(5), || {
            h.metric(
                "coordinator_sessions",
                &[("role", "agent"), ("protocol", "v2")],
            ) == 1.0
                && h.metric(
                    "coordinator_sessions",
                    &[("role", "client"), ("protocol", "v2")],
                ) == 1.0
        })
        .await
    );
    drop(a);
    drop(c);
    assert!(
        eventually(Duration::from_secs(5), || {
            h.metric(
                "coordinator_sessions",
                &[("role", "agent"), ("protocol", "v2")],
            ) == 0.0
        })
        .await
    );
}

/// A v2 session with a Coordinate call holds exactly three tasks on the server (the session's,
/// the yamux driver's, the dRPC stream's), and none of them outlives it. The clients run on a
/// runtime of their own, so only the server's tasks are counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_task_of_a_v2_session_ends_with_it() {
    const TASKS_PER_SESSION: usize = 3;
    const SESSIONS: usize = 4;
    let h = Harness::start().await;
    let metrics = tokio::runtime::Handle::current().metrics();
    let before = metrics.num_alive_tasks();
    let agent_id = h.agent().id;
    let url = h.url(&format!(
        "/api/v2/workspaceagents/{agent_id}/coordinate?version=2.0"
    ));
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel::<()>();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let clients = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let mut conns = Vec::new();
            for _ in 0..SESSIONS {
                let conn = v2_dial(&url, &[(crate::support::SESSION_TOKEN, USER_ALL)]).await;
                let peer = conn.coordinate().await;
                peer.add_tunnel(agent_id).await;
                peer.update_self(node(Uuid::nil(), false, 1)).await;
                conns.push((conn, peer));
            }
            ready_tx.send(()).unwrap();
            let _ = stop_rx.await;
            for (conn, peer) in conns {
                drop(peer);
                let _ = conn.rpc.session().close().await;
                let _ = conn.ws.close(1000, "").await;
            }
        });
    });
    ready_rx.await.unwrap();
    let sessions = || {
        h.metric(
            "coordinator_sessions",
            &[("role", "client"), ("protocol", "v2")],
        )
    };
    assert!(eventually(WAIT, || sessions() == SESSIONS as f64).await);
    // The tunnels were added, so every session's Coordinate call is running by now.
    assert!(
        eventually(WAIT, || h.coord.graph().tunnel_count() == SESSIONS).await,
        "every client's tunnel is in the graph"
    );
    let settled = eventually(WAIT, || {
        metrics.num_alive_tasks() == before + TASKS_PER_SESSION * SESSIONS
    })
    .await;
    assert!(
        settled,
        "{} server tasks for {SESSIONS} v2 sessions (expected {TASKS_PER_SESSION} each)",
        metrics.num_alive_tasks() - before
    );
    stop_tx.send(()).unwrap();
    tokio::task::spawn_blocking(move || clients.join().unwrap())
        .await
        .unwrap();
    assert!(eventually(WAIT, || sessions() == 0.0).await);
    let drained = eventually(WAIT, || metrics.num_alive_tasks() == before).await;
    assert!(
        drained,
        "{} server tasks left after every session ended",
        metrics.num_alive_tasks() - before
    );
}
