//! Pre-upgrade answers: status codes and Coder's JSON error bodies, in coderd's check order.

use crate::common::*;
use serde_json::json;
use uuid::Uuid;

#[tokio::test]
async fn agent_endpoints_reject_bad_tokens() {
    let h = Harness::start().await;
    for path in [
        "/api/v2/workspaceagents/me/coordinate",
        "/api/v2/workspaceagents/me/rpc",
    ] {
        let (status, body) = h.ws_error(path, "").await;
        assert_eq!(status, 401);
        assert_eq!(
            body["message"],
            "Cookie \"coder_session_token\" must be provided."
        );
        let (status, body) = h.ws_error(path, "not-a-uuid").await;
        assert_eq!(status, 401);
        assert_eq!(body["message"], "Workspace agent token invalid.");
        let (status, body) = h.ws_error(path, &Uuid::new_v4().to_string()).await;
        assert_eq!(status, 401);
        assert_eq!(body["message"], "Workspace agent not authorized.");
        // A user token is not an agent token.
        let (status, _) = h.ws_error(path, USER_ALL).await;
        assert_eq!(status, 401);
    }
    assert!(
        h.metric(
            "coordinator_auth_failures_total",
            &[("reason", "missing_token")]
        ) >= 2.0
    );
    assert!(
        h.metric(
            "coordinator_auth_failures_total",
            &[("reason", "malformed_token")]
        ) >= 2.0
    );
    assert!(
        h.metric(
            "coordinator_auth_failures_total",
            &[("reason", "invalid_token")]
        ) >= 2.0
    );
}

#[tokio::test]
async fn agent_versions() {
    let h = Harness::start().await;
    let tok = h.agent().token.to_string();
    let (status, body) = h
        .ws_error("/api/v2/workspaceagents/me/rpc?version=2.11", &tok)
        .await;
    assert_eq!(status, 400);
    assert_eq!(
        body,
        json!({"message":"Unknown or unsupported API version","validations":[{"field":"version",
            "detail":"server is at version 2.10, behind requested minor version 2.11"}]})
    );
    let (status, body) = h
        .ws_error("/api/v2/workspaceagents/me/rpc?version=1.0", &tok)
        .await;
    assert_eq!(status, 400);
    assert_eq!(
        body["validations"][0]["detail"],
        "version 1.0 is no longer supported"
    );
    let (status, body) = h
        .ws_error("/api/v2/workspaceagents/me/coordinate?version=abc", &tok)
        .await;
    assert_eq!(status, 400);
    assert_eq!(
        body["validations"][0]["detail"],
        "invalid version string: abc"
    );
    let (status, body) = h
        .ws_error("/api/v2/workspaceagents/me/coordinate?version=3.0", &tok)
        .await;
    assert_eq!(status, 400);
    assert_eq!(
        body["validations"][0]["detail"],
        "server is at version 2.10, behind requested major version 3.0"
    );
    // Every accepted version upgrades.
    for v in ["", "?version=1.0", "?version=2.0", "?version=2.10"] {
        h.ws(&format!("/api/v2/workspaceagents/me/coordinate{v}"), &tok)
            .await
            .unwrap();
    }
    for v in ["", "?version=2.0", "?version=2.10&role=agent"] {
        h.ws(&format!("/api/v2/workspaceagents/me/rpc{v}"), &tok)
            .await
            .unwrap();
    }
    assert!(
        h.metric(
            "coordinator_protocol_errors_total",
            &[("kind", "bad_version")]
        ) >= 4.0
    );
}

#[tokio::test]
async fn client_coordinate_check_order() {
    let h = Harness::start().await;
    let agent = h.agent().id;
    let other = h.agents[1].id;
    let path = |id: &str, q: &str| format!("/api/v2/workspaceagents/{id}/coordinate{q}");

    // 1. No or invalid credential.
    let (status, body) = h.ws_error(&path(&agent.to_string(), ""), "").await;
    assert_eq!(status, 401);
    assert_eq!(
        body["message"],
        "API key or external proxy authentication required, but none provided"
    );
    let (status, _) = h
        .ws_error(
            &path(&agent.to_string(), ""),
            "xxxxxxxxxx-yyyyyyyyyyyyyyyyyyyyyy",
        )
        .await;
    assert_eq!(status, 401);
    // 2. Bad UUID (checked after auth).
    let (status, body) = h.ws_error(&path("nope", ""), USER_ALL).await;
    assert_eq!(status, 400);
    assert_eq!(body["message"], "Invalid UUID \"nope\".");
    let (status, _) = h.ws_error(&path("nope", ""), "").await;
    assert_eq!(status, 401);
    // 3. Access, before version.
    let (status, body) = h
        .ws_error(&path(&other.to_string(), "?version=99.0"), USER_ONE)
        .await;
    assert_eq!(status, 404);
    assert_eq!(
        body["message"],
        "Agent doesn't exist with that id, or you do not have access to it."
    );
    // 4. Version.
    let (status, body) = h
        .ws_error(&path(&agent.to_string(), "?version=99.0"), USER_ONE)
        .await;
    assert_eq!(status, 400);
    assert_eq!(body["message"], "Unknown or unsupported API version");
    assert_eq!(body["validations"][0]["field"], "version");
    // 5. Resume token.
    let (status, body) = h
        .ws_error(
            &path(&agent.to_string(), "?version=2.0&resume_token=garbage"),
            USER_ONE,
        )
        .await;
    assert_eq!(status, 401);
    assert_eq!(body["message"], "Invalid resume token");
    assert_eq!(body["validations"][0]["field"], "resume_token");
    // Both generations upgrade.
    for q in ["", "?version=1.0", "?version=2.0", "?version=2.10"] {
        h.ws(&path(&agent.to_string(), q), USER_ONE).await.unwrap();
    }
    assert!(
        h.metric(
            "coordinator_auth_failures_total",
            &[("reason", "forbidden")]
        ) >= 1.0
    );
    assert!(
        h.metric(
            "coordinator_auth_failures_total",
            &[("reason", "invalid_resume_token")]
        ) >= 1.0
    );
}

#[tokio::test]
async fn plain_get_is_the_code_order_probe() {
    // coderd answers a non-upgrade GET with the same status as the upgrade would get: 400 for a
    // bad version iff the caller is authorized (§2.2 "code-order probe").
    let h = Harness::start().await;
    let agent = h.agent().id;
    let other = h.agents[1].id;
    let p = |id: Uuid| format!("/api/v2/workspaceagents/{id}/coordinate?version=99.0");
    let (s, _) = h.get(&p(agent), &[("Coder-Session-Token", USER_ONE)]).await;
    assert_eq!(s, 400);
    let (s, _) = h.get(&p(other), &[("Coder-Session-Token", USER_ONE)]).await;
    assert_eq!(s, 404);
    let (s, _) = h.get(&p(agent), &[]).await;
    assert_eq!(s, 401);
    // A valid request without upgrade headers is refused by the WebSocket layer, not served.
    let (s, _) = h
        .get(
            &format!("/api/v2/workspaceagents/{agent}/coordinate?version=2.0"),
            &[("Coder-Session-Token", USER_ONE)],
        )
        .await;
    assert_eq!(s, 426);
    // So is the DERP map stream.
    assert_eq!(h.get("/api/v2/derp-map", &[]).await.0, 426);
}

#[tokio::test]
async fn cross_origin_upgrades_are_refused() {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let h = Harness::start().await;
    let tok = h.agent().token.to_string();
    let dial = |origin: Option<String>| {
        let mut req = h
            .url("/api/v2/workspaceagents/me/rpc")
            .into_client_request()
            .unwrap();
        req.headers_mut()
            .insert("Coder-Session-Token", tok.parse().unwrap());
        if let Some(o) = origin {
            req.headers_mut().insert("Origin", o.parse().unwrap());
        }
        tokio_tungstenite::connect_async(req)
    };
    match dial(Some("https://evil.example".into())).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(r)) => assert_eq!(r.status(), 403),
        other => panic!("unexpected {:?}", other.map(|_| ())),
    }
    // Same host: allowed (as coder/websocket does).
    dial(Some(format!("http://{}", h.addr))).await.unwrap();
    dial(None).await.unwrap();
}

#[tokio::test]
async fn token_sources_in_coder_order() {
    let h = Harness::start().await;
    let agent = h.agent().id;
    let p = format!("/api/v2/workspaceagents/{agent}/coordinate?version=99.0");
    // Each source alone authenticates (400 = got past auth and access).
    let cookie = format!("coder_session_token={USER_ONE}");
    let bearer = format!("Bearer {USER_ONE}");
    for hdr in [
        vec![("Cookie", cookie.as_str())],
        vec![("Coder-Session-Token", USER_ONE)],
        vec![("Authorization", bearer.as_str())],
    ] {
        assert_eq!(h.get(&p, &hdr).await.0, 400);
    }
    assert_eq!(
        h.get(&format!("{p}&coder_session_token={USER_ONE}"), &[])
            .await
            .0,
        400
    );
    assert_eq!(
        h.get(&format!("{p}&access_token={USER_ONE}"), &[]).await.0,
        400
    );
    // The cookie wins over the header: a bad cookie with a good header fails.
    assert_eq!(
        h.get(
            &p,
            &[
                (
                    "Cookie",
                    "coder_session_token=zzzzzzzzzz-zzzzzzzzzzzzzzzzzzzzzz"
                ),
                ("Coder-Session-Token", USER_ONE)
            ]
        )
        .await
        .0,
        401
    );
    // The query token wins over the header.
    assert_eq!(
        h.get(
            &format!("{p}&coder_session_token=zzzzzzzzzz-zzzzzzzzzzzzzzzzzzzzzz"),
            &[("Coder-Session-Token", USER_ONE)]
        )
        .await
        .0,
        401
    );
}

#[tokio::test]
async fn tailnet_endpoint() {
    let h = Harness::start().await;
    let (status, body) = h.ws_error("/api/v2/tailnet", "").await;
    assert_eq!(status, 401);
    assert_eq!(
        body["message"],
        "You are signed out or your session has expired. Please sign in again to continue."
    );
    let (status, _) = h.ws_error("/api/v2/tailnet", "bogus").await;
    assert_eq!(status, 401);
    let (status, body) = h.ws_error("/api/v2/tailnet?version=1.0", USER_ALL).await;
    assert_eq!(status, 400);
    assert_eq!(
        body["validations"][0]["detail"],
        "version 1.0 is no longer supported"
    );
    let (status, body) = h
        .ws_error("/api/v2/tailnet?version=2.3&resume_token=a.b.c", USER_ALL)
        .await;
    assert_eq!(status, 401);
    assert_eq!(body["validations"][0]["field"], "resume_token");
    h.ws("/api/v2/tailnet", USER_ALL).await.unwrap();
    h.ws("/api/v2/tailnet?version=2.3", USER_ONE).await.unwrap();
}

#[tokio::test]
async fn shutdown_refuses_new_requests() {
    let h = Harness::start().await;
    h.coord.shutdown().await;
    let (status, _) = h
        .ws_error(
            "/api/v2/workspaceagents/me/rpc",
            &h.agent().token.to_string(),
        )
        .await;
    assert_eq!(status, 503);
}
