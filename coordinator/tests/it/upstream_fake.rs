//! Tests of the fake Coder upstream itself, so other tests (and helpers) can trust it.

/// Named after the feature so that `cargo test -p coordinator upstream` runs it.
mod upstream {
    use bytes::Bytes;

    use crate::common::v2::v2_dial;
    use crate::fake_coder::FakeCoder;
    use crate::support::SESSION_TOKEN;
    use crate::upstream_harness::{get_with_token, json, send};

    #[tokio::test]
    async fn fake_coder_rest_and_switches() {
        let f = FakeCoder::start().await;
        let me = get_with_token(&format!("{}/api/v2/users/me", f.url), &f.user_token_ssh).await;
        assert_eq!(me.status(), 200);
        assert_eq!(json(me.body())["id"], f.user_id_ssh.to_string());
        let probe = format!("{}{}", f.url, f.agent_path("/coordinate?version=99.0"));
        let r = get_with_token(&probe, &f.user_token_ssh).await;
        assert_eq!(r.status(), 400);
        let r = get_with_token(&probe, &f.user_token_nossh).await;
        assert_eq!(r.status(), 404);
        let r = get_with_token(&probe, &f.bad_user_token).await;
        assert_eq!(r.status(), 401);
        f.set_browser_only(true);
        let r = get_with_token(&probe, &f.user_token_ssh).await;
        assert_eq!(r.status(), 409);
        let manifest = format!("{}/api/v2/workspaceagents/me/manifest", f.url);
        let r = get_with_token(&manifest, &f.agent_token).await;
        assert_eq!(json(r.body())["agent_id"], f.agent_id.to_string());
        f.set_manifest_gone(true);
        let r = get_with_token(&manifest, &f.agent_token).await;
        assert_eq!(r.status(), 404);
        f.set_fail(true);
        let r = send(&manifest, "GET", &[], b"").await;
        assert_eq!(r.status(), 500);
        assert_eq!(f.count("/api/v2/workspaceagents/me/manifest"), 3);
        f.go_away().await;
        assert!(tokio::net::TcpStream::connect(f.addr).await.is_err());
    }

    /// `/me/rpc`: GetManifest and the echo of other Agent methods, over our own stack.
    #[tokio::test]
    async fn fake_coder_agent_rpc() {
        let f = FakeCoder::start().await;
        let url = format!(
            "ws://{}/api/v2/workspaceagents/me/rpc?version=2.10&role=agent",
            f.addr
        );
        let conn = v2_dial(&url, &[(SESSION_TOKEN, &f.agent_token)]).await;
        let m: proto::agent::v2::Manifest = conn
            .rpc
            .invoke_unary(
                proto::agent::v2::methods::GET_MANIFEST,
                &proto::agent::v2::GetManifestRequest::default(),
            )
            .await
            .unwrap();
        assert_eq!(&m.agent_id[..], f.agent_id.as_bytes());
        assert!(m.derp_map.is_some());
        let echoed: proto::agent::v2::GetManifestRequest = conn
            .rpc
            .invoke_unary(
                "/coder.agent.v2.Agent/UpdateStats",
                &proto::agent::v2::GetManifestRequest::default(),
            )
            .await
            .unwrap();
        assert_eq!(echoed, proto::agent::v2::GetManifestRequest::default());
        let e = conn
            .rpc
            .invoke_unary::<_, proto::agent::v2::Manifest>(
                "/coder.tailnet.v2.Tailnet/PostTelemetry",
                &proto::agent::v2::GetManifestRequest::default(),
            )
            .await
            .unwrap_err();
        assert!(e.is_unimplemented());
        let calls = f.rpc_calls();
        assert_eq!(calls.len(), 2);
        assert_eq!(calls[1].0, "/coder.agent.v2.Agent/UpdateStats");
        assert_eq!(calls[1].1, "agent");
        let _ = Bytes::new();
    }
}
