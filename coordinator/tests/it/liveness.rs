//! A peer that stops answering WebSocket pings is closed with 1001 "liveness probe failed" on
//! every kind of session; a responsive neighbour is not.

use std::time::Duration;

use crate::common::v2::*;
use crate::common::*;

fn fast_pings() -> coordinator::CoordinatorConfig {
    coordinator::CoordinatorConfig {
        ws_ping_interval: Duration::from_millis(200),
        ws_pong_timeout: Duration::from_millis(300),
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
