//! Fan-out: 1,000 real v2 client sessions (one WebSocket + yamux session + Coordinate stream
//! each) tunnel to one agent; every agent node update reaches all of them.

use std::time::{Duration, Instant};

use crate::common::v2::*;
use crate::common::*;
use futures_util::stream::{self, StreamExt};

const CLIENTS: usize = 1000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_agent_update_reaches_1000_clients() {
    // One user holds every client session here: raise its cap above them.
    let h = Harness::start_with(
        coordinator::CoordinatorConfig {
            max_sessions_per_user: CLIENTS,
            ..test_config()
        },
        3,
    )
    .await;
    let agent_id = h.agent().id;
    let a = V2Conn::agent(&h, 0).await;
    let agent = a.coordinate().await;
    let n1 = node(agent_id, true, 1);
    agent.update_self(n1.clone()).await;

    let started = Instant::now();
    let mut clients: Vec<(V2Conn, TestPeer)> = stream::iter(0..CLIENTS)
        .map(|_| {
            let h = &h;
            let n1 = n1.clone();
            async move {
                let c = V2Conn::client(h, 0, "").await;
                let mut p = c.coordinate().await;
                p.add_tunnel(agent_id).await;
                p.expect_node(agent_id, &n1).await;
                (c, p)
            }
        })
        .buffer_unordered(50)
        .collect()
        .await;
    eprintln!(
        "{CLIENTS} client sessions connected in {:?}",
        started.elapsed()
    );
    assert_eq!(clients.len(), CLIENTS);
    assert_eq!(h.coord.graph().peer_count(), CLIENTS + 1);
    assert_eq!(
        h.metric(
            "coordinator_sessions",
            &[("role", "client"), ("protocol", "v2")]
        ),
        CLIENTS as f64
    );

    for round in 2..5 {
        let n = node(agent_id, true, round);
        let t = Instant::now();
        agent.update_self(n.clone()).await;
        let n = &n;
        let reached = stream::iter(clients.iter_mut())
            .map(|(_, p)| async move {
                p.expect_node(agent_id, n).await;
                assert!(p.errors.is_empty(), "{:?}", p.errors);
            })
            .buffer_unordered(CLIENTS)
            .count()
            .await;
        assert_eq!(reached, CLIENTS);
        eprintln!(
            "round {round}: update reached {CLIENTS} clients in {:?}",
            t.elapsed()
        );
        assert!(t.elapsed() < Duration::from_secs(30));
    }
    // Nobody was kicked for a full queue.
    assert_eq!(
        h.metric(
            "coordinator_peers_kicked_total",
            &[("reason", "queue_full")]
        ),
        0.0
    );
    drop(clients);
    assert!(
        eventually(Duration::from_secs(20), || h.coord.graph().peer_count()
            == 1)
        .await
    );
}
