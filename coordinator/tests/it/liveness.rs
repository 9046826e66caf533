//! A peer that stops answering WebSocket pings is closed with 1001 "liveness probe failed" on
//! every kind of session; a responsive neighbour is not. Timing follows coderd per endpoint:
//! clients and DERP map streams its `wsWatcher` (a ping every interval, closed when one is not
//! answered within the timeout), agents on `/me/rpc` its agent monitor (closed once the last
//! pong is older than the inactivity timeout, checked every interval).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::common::v2::*;
use crate::common::*;

fn fast_pings() -> coordinator::CoordinatorConfig {
    coordinator::CoordinatorConfig {
        ws_ping_interval: Duration::from_millis(200),
        ws_pong_timeout: Duration::from_millis(300),
        agent_inactive_disconnect_timeout: Duration::from_millis(900),
        ..test_config()
    }
}

#[tokio::test]
async fn silent_peers_fail_the_liveness_probe() {
    let h = Harness::start_with(fast_pings(), 3).await;
    // A responsive v2 agent (its client stack keeps reading, so pongs go out).
    let a = V2Conn::agent(&h, 1).await;
    let mut p = a.coordinate().await;
    p.update_self(node(h.agents[1].id, true, 1)).await;

    let tok = h.agent().token.to_string();
    let mut v1 = h
        .ws("/api/v2/workspaceagents/me/coordinate", &tok)
        .await
        .unwrap();
    let mut v2 = h
        .ws(
            "/api/v2/workspaceagents/me/rpc",
            &h.agents[2].token.to_string(),
        )
        .await
        .unwrap();
    let mut dm = h.ws("/api/v2/derp-map", "").await.unwrap();
    // Don't read (so no pong is sent) for longer than interval + timeout.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    for ws in [&mut v1, &mut v2, &mut dm] {
        let (code, reason) = close_code(ws).await.unwrap();
        assert_eq!((code, reason.as_str()), (1001, "liveness probe failed"));
    }
    assert!(
        eventually(Duration::from_secs(10), || h.metric(
            "coordinator_protocol_errors_total",
            &[("kind", "liveness")]
        ) >= 3.0)
        .await
    );
    // The responsive session is still up.
    p.expect_quiet(Duration::from_millis(800)).await;
}

/// A TCP relay to the harness that can freeze: once frozen it forwards nothing in either
/// direction but keeps both sockets open, which is how a peer whose network died looks to a
/// server (no FIN, no RST, no pong).
struct Freezer {
    addr: std::net::SocketAddr,
    frozen: Arc<AtomicBool>,
}

impl Freezer {
    async fn start(target: std::net::SocketAddr) -> Freezer {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let frozen = Arc::new(AtomicBool::new(false));
        let f = frozen.clone();
        tokio::spawn(async move {
            while let Ok((inbound, _)) = l.accept().await {
                let outbound = tokio::net::TcpStream::connect(target).await.unwrap();
                let (ir, iw) = inbound.into_split();
                let (or, ow) = outbound.into_split();
                tokio::spawn(pipe(ir, ow, f.clone()));
                tokio::spawn(pipe(or, iw, f.clone()));
            }
        });
        Freezer { addr, frozen }
    }

    fn freeze(&self) {
        self.frozen.store(true, Ordering::SeqCst);
    }
}

async fn pipe(
    mut r: tokio::net::tcp::OwnedReadHalf,
    mut w: tokio::net::tcp::OwnedWriteHalf,
    frozen: Arc<AtomicBool>,
) {
    let mut buf = vec![0u8; 16384];
    loop {
        let n = match r.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if frozen.load(Ordering::SeqCst) {
            // A dead network: hold both sockets open and forward nothing, ever.
            std::future::pending::<()>().await;
        }
        if w.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

/// A peer known dead is LOST as soon as coderd's rule for its endpoint says so, not after a
/// further wait for a close reply that a dead peer will never send. An agent on `/me/rpc`: its
/// last pong is older than the inactivity timeout (900 ms here) at a check (every 200 ms); not
/// earlier, since coderd would still count it connected.
#[tokio::test]
async fn a_silent_agent_is_lost_when_its_ping_goes_unanswered() {
    let h = Harness::start_with(fast_pings(), 2).await;
    let freezer = Freezer::start(h.addr).await;
    let agent_id = h.agents[1].id;
    let agent = v2_dial(
        &format!(
            "ws://{}/api/v2/workspaceagents/me/rpc?version=2.10&role=agent",
            freezer.addr
        ),
        &[(
            crate::support::SESSION_TOKEN,
            &h.agents[1].token.to_string(),
        )],
    )
    .await;
    let a = agent.coordinate().await;
    let agent_node = node(agent_id, true, 1);
    a.update_self(agent_node.clone()).await;

    let client = V2Conn::client(&h, 1, "").await;
    let mut c = client.coordinate().await;
    c.add_tunnel(agent_id).await;
    c.expect_node(agent_id, &agent_node).await;

    freezer.freeze();
    let frozen_at = Instant::now();
    c.expect_lost(agent_id).await;
    let took = frozen_at.elapsed();
    // The last pong came at most one interval (200 ms) before the freeze, so the agent is
    // inactive for 900 ms at the earliest 700 ms after it, and a check follows within 200 ms.
    // The old behaviour added the 5 s close grace on top; the client rule would have taken
    // 500 ms.
    assert!(
        took >= Duration::from_millis(650) && took < Duration::from_millis(2500),
        "LOST after {took:?}; coderd's agent rule says 700–1100 ms"
    );
}

/// A client known dead (the `wsWatcher` rule: a ping unanswered for the pong timeout) is gone
/// for the agent within interval + timeout of the freeze.
#[tokio::test]
async fn a_silent_client_is_lost_when_its_ping_goes_unanswered() {
    let h = Harness::start_with(fast_pings(), 2).await;
    let freezer = Freezer::start(h.addr).await;
    let agent_id = h.agents[1].id;
    let agent = V2Conn::agent(&h, 1).await;
    let mut a = agent.coordinate().await;
    a.update_self(node(agent_id, true, 1)).await;

    let client = v2_dial(
        &format!(
            "ws://{}/api/v2/workspaceagents/{agent_id}/coordinate?version=2.0",
            freezer.addr
        ),
        &[(crate::support::SESSION_TOKEN, USER_ALL)],
    )
    .await;
    let c = client.coordinate().await;
    c.add_tunnel(agent_id).await;
    c.update_self(node(uuid::Uuid::new_v4(), false, 2)).await;
    a.until("the client's node", |p| !p.nodes.is_empty()).await;
    let client_id = *a.nodes.keys().next().unwrap();

    freezer.freeze();
    let frozen_at = Instant::now();
    a.expect_lost(client_id).await;
    let took = frozen_at.elapsed();
    assert!(
        took < Duration::from_millis(2000),
        "client LOST after {took:?}; the wsWatcher rule allows about 500 ms"
    );
}
