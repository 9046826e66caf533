//! Auth delegated to an upstream coderd: agent ids via `/me/manifest` and the `/me/rpc`
//! GetManifest fallback, user ACLs via the coordinate probe, the decision cache, and every fault.

/// Named after the feature so that `cargo test -p coordinator upstream` runs it.
mod upstream {
    use std::time::{Duration, Instant};

    use coordinator::auth::{AuthError, Authenticator};
    use coordinator::upstream::UpstreamAuthenticator;
    use proto::tailnet::v2::{methods, RefreshResumeTokenRequest, RefreshResumeTokenResponse};

    use crate::common::v2::V2Conn;
    use crate::fake_coder::FakeCoder;
    use crate::upstream_harness::Sidecar;

    const MANIFEST: &str = "/api/v2/workspaceagents/me/manifest";
    const RPC: &str = "/api/v2/workspaceagents/me/rpc";
    const USERS_ME: &str = "/api/v2/users/me";

    fn probe_path(f: &FakeCoder) -> String {
        format!("/api/v2/workspaceagents/{}/coordinate", f.agent_id)
    }

    /// A RefreshResumeToken call on an open session (it works only on a live, authorized one).
    async fn refresh_resume_token(conn: &V2Conn) -> RefreshResumeTokenResponse {
        conn.rpc
            .invoke_unary(methods::REFRESH_RESUME_TOKEN, &RefreshResumeTokenRequest {})
            .await
            .unwrap()
    }

    /// coderd's answer to a user who may not reach the agent, passed on.
    fn assert_no_access(code: u16, body: &serde_json::Value) {
        assert_eq!(code, 404);
        assert!(body["message"]
            .as_str()
            .unwrap()
            .contains("do not have access"));
    }

    #[tokio::test]
    async fn agent_id_via_manifest() {
        let s = Sidecar::start().await;
        let f = &s.fake;
        let id = s.auth.agent(&f.agent_token).await.unwrap();
        assert_eq!(id.agent_id, f.agent_id);
        assert_eq!(id.name, "alice-dev-main");
        assert_eq!(f.count(MANIFEST), 1);
        assert_eq!(f.count(RPC), 0);
        // Cached.
        s.auth.agent(&f.agent_token).await.unwrap();
        assert_eq!(f.count(MANIFEST), 1);
        // A token the upstream rejects: 401 with coderd's words.
        let bad = uuid::Uuid::new_v4().to_string();
        match s.auth.agent(&bad).await {
            Err(AuthError::InvalidToken { message, .. }) => {
                assert_eq!(message, "Workspace agent not authorized.")
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    /// Current coderd has no `/me/manifest`: the id comes from GetManifest over `/me/rpc`, dialed
    /// with `role=tailnetd`; later lookups skip the manifest request.
    #[tokio::test]
    async fn agent_id_via_rpc_fallback() {
        let s = Sidecar::start().await;
        let f = &s.fake;
        f.set_manifest_gone(true);
        let id = s.auth.agent(&f.agent_token).await.unwrap();
        assert_eq!(id.agent_id, f.agent_id);
        assert_eq!(id.name, "alice-dev-main");
        assert_eq!(f.count(MANIFEST), 1);
        assert_eq!(f.count(RPC), 1);
        let rec = f.last(RPC).unwrap();
        assert!(rec.uri.contains("version=2.0"), "{}", rec.uri);
        assert!(rec.uri.contains("role=tailnetd"), "{}", rec.uri);
        assert_eq!(
            f.rpc_calls(),
            vec![(
                "/coder.agent.v2.Agent/GetManifest".to_string(),
                "tailnetd".to_string()
            )]
        );
        // A second agent token: no manifest attempt any more; a rejected token is a 401.
        let bad = uuid::Uuid::new_v4().to_string();
        assert!(matches!(
            s.auth.agent(&bad).await,
            Err(AuthError::InvalidToken { .. })
        ));
        assert_eq!(f.count(MANIFEST), 1);
        assert_eq!(f.count(RPC), 2);
        // And an agent session opens through tailnetd's own /me/rpc.
        let ws = s
            .ws(&format!("{RPC}?version=2.0&role=agent"), &f.agent_token)
            .await
            .unwrap();
        drop(ws);
    }

    #[tokio::test]
    async fn user_acl_decides_coordinate() {
        let s = Sidecar::start().await;
        let f = &s.fake;
        let path = s.coordinate_path();
        // ssh allowed: the session opens and works.
        let conn = s.v2(&path, &f.user_token_ssh).await;
        let r = refresh_resume_token(&conn).await;
        assert!(!r.token.is_empty());
        // The probe went out with the user's token and a version coderd rejects.
        let rec = f.last(&probe_path(f)).unwrap();
        assert!(rec.uri.ends_with("?version=99.0"), "{}", rec.uri);
        assert_eq!(
            rec.headers.get("coder-session-token").unwrap(),
            f.user_token_ssh.as_str()
        );
        assert!(rec.headers.get("upgrade").is_none());
        // No ssh: 404 as coderd answers.
        let (code, body) = s.ws_error(&path, &f.user_token_nossh).await;
        assert_no_access(code, &body);
        // Unknown token: 401.
        let (code, _) = s.ws_error(&path, &f.bad_user_token).await;
        assert_eq!(code, 401);
        // Direct API: user identity from /users/me.
        let u = s.auth.user(&f.user_token_ssh).await.unwrap();
        assert_eq!(u.user_id, f.user_id_ssh);
        assert_eq!(u.username, "alice");
        assert!(s.auth.user_may_reach(&u, f.agent_id).await.unwrap());
        assert!(!s
            .auth
            .user_may_reach(&u, uuid::Uuid::new_v4())
            .await
            .unwrap());
    }

    /// Reach is decided per token, as coderd decides it: a user's full token reaches the agent
    /// while a second, narrowly scoped token of the same user does not, in any order, and
    /// neither answer leaks into the other.
    #[tokio::test]
    async fn reach_is_decided_per_token() {
        let s = Sidecar::start().await;
        let f = &s.fake;
        let path = s.coordinate_path();
        // The scoped token first: refused with coderd's 404.
        let (code, body) = s.ws_error(&path, &f.user_token_ssh_scoped).await;
        assert_no_access(code, &body);
        // The same user's full token still reaches the agent, and the session works.
        let conn = s.v2(&path, &f.user_token_ssh).await;
        let r = refresh_resume_token(&conn).await;
        assert!(!r.token.is_empty());
        // And the scoped token is still refused after the full one was used.
        let (code, _) = s.ws_error(&path, &f.user_token_ssh_scoped).await;
        assert_eq!(code, 404);
        // Each probe went out with the token of the request it decided.
        let probe_tokens: Vec<String> = f
            .requests()
            .into_iter()
            .filter(|r| r.path == probe_path(f))
            .map(|r| {
                r.headers
                    .get("coder-session-token")
                    .unwrap()
                    .to_str()
                    .unwrap()
                    .to_string()
            })
            .collect();
        assert_eq!(
            probe_tokens,
            vec![f.user_token_ssh_scoped.clone(), f.user_token_ssh.clone()]
        );
        // Direct API: one user id, two identities, two answers; the token never shows.
        let full = s.auth.user(&f.user_token_ssh).await.unwrap();
        let scoped = s.auth.user(&f.user_token_ssh_scoped).await.unwrap();
        assert_eq!(full.user_id, f.user_id_ssh);
        assert_eq!(scoped.user_id, f.user_id_ssh);
        assert_eq!(full.token.expose(), f.user_token_ssh);
        assert_eq!(scoped.token.expose(), f.user_token_ssh_scoped);
        for _ in 0..2 {
            assert!(!s.auth.user_may_reach(&scoped, f.agent_id).await.unwrap());
            assert!(s.auth.user_may_reach(&full, f.agent_id).await.unwrap());
        }
        let shown = format!("{full:?} {scoped:?}");
        assert!(!shown.contains(&f.user_token_ssh), "{shown}");
        assert!(!shown.contains(&f.user_token_ssh_scoped), "{shown}");
        // Decisions are cached per (token, agent): no further probes for either token.
        assert_eq!(f.count(&probe_path(f)), 2);
        assert!(s
            .auth
            .token_may_reach(&f.user_token_ssh, f.agent_id)
            .await
            .unwrap());
        assert!(!s
            .auth
            .token_may_reach(&f.user_token_ssh_scoped, f.agent_id)
            .await
            .unwrap());
        assert_eq!(f.count(&probe_path(f)), 2);
    }

    /// coderd's browser-only mode refuses non-browser connections with 409; tailnetd answers
    /// the same 409 with coderd's message, counted under its own reason.
    #[tokio::test]
    async fn browser_only_upstream_is_409() {
        let s = Sidecar::start().await;
        let f = &s.fake;
        f.set_browser_only(true);
        let (code, body) = s.ws_error(&s.coordinate_path(), &f.user_token_ssh).await;
        assert_eq!(code, 409);
        assert_eq!(
            body,
            serde_json::json!({
                "message": "Non-browser connections are disabled for your deployment."
            })
        );
        assert_eq!(
            s.metric("coordinator_auth_failures_total", &[("reason", "conflict")]),
            1.0
        );
        // Through the trait: the conflict outcome with coderd's words, not "forbidden".
        let u = s.auth.user(&f.user_token_ssh).await.unwrap();
        match s.auth.user_may_reach(&u, f.agent_id).await {
            Err(AuthError::Conflict { message }) => {
                assert_eq!(message, coordinator::auth::BROWSER_ONLY_MESSAGE)
            }
            other => panic!("unexpected {other:?}"),
        }
        // A user without ssh still gets 404 first (coderd checks ssh before browser-only).
        let (code, _) = s.ws_error(&s.coordinate_path(), &f.user_token_nossh).await;
        assert_eq!(code, 404);
    }

    /// 100 reconnects of one client cost the upstream at most a couple of requests.
    #[tokio::test]
    async fn cache_absorbs_reconnect_bursts() {
        let s = Sidecar::start().await;
        let f = s.fake.clone();
        let path = s.coordinate_path();
        // One burst of 50 concurrent dials (single flight), then 50 sequential ones (cache).
        let mut tasks = Vec::new();
        let s = std::sync::Arc::new(s);
        for _ in 0..50 {
            let s = s.clone();
            let path = path.clone();
            let token = f.user_token_ssh.clone();
            tasks.push(tokio::spawn(async move {
                let ws = s.ws(&path, &token).await.unwrap();
                drop(ws);
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        for _ in 0..50 {
            let ws = s.ws(&path, &f.user_token_ssh).await.unwrap();
            drop(ws);
        }
        assert!(
            f.count(USERS_ME) <= 2,
            "users/me asked {} times",
            f.count(USERS_ME)
        );
        assert!(
            f.count(&probe_path(&f)) <= 2,
            "probe asked {} times",
            f.count(&probe_path(&f))
        );
        let hits = s.metric("tailnetd_upstream_auth_cache_total", &[("result", "hit")]);
        let coalesced = s.metric(
            "tailnetd_upstream_auth_cache_total",
            &[("result", "coalesced")],
        );
        let misses = s.metric("tailnetd_upstream_auth_cache_total", &[("result", "miss")]);
        assert!(
            hits + coalesced >= 196.0,
            "hits {hits} coalesced {coalesced}"
        );
        assert!(misses <= 4.0, "misses {misses}");
        // Negative answers are cached too (briefly).
        for _ in 0..20 {
            let (code, _) = s.ws_error(&path, &f.user_token_nossh).await;
            assert_eq!(code, 404);
        }
        for _ in 0..20 {
            let (code, _) = s.ws_error(&path, &f.bad_user_token).await;
            assert_eq!(code, 401);
        }
        // users/me: ssh user once, nossh once, bad token once.
        assert!(
            f.count(USERS_ME) <= 4,
            "users/me asked {} times",
            f.count(USERS_ME)
        );
    }

    #[tokio::test]
    async fn rejected_token_is_cached_briefly() {
        let fake = FakeCoder::start().await;
        let s = Sidecar::start_with(fake, |c| c.auth_ttl_err = Duration::from_millis(300)).await;
        let f = &s.fake;
        for _ in 0..5 {
            assert!(matches!(
                s.auth.user(&f.bad_user_token).await,
                Err(AuthError::InvalidToken { .. })
            ));
        }
        assert_eq!(f.count(USERS_ME), 1);
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert!(s.auth.user(&f.bad_user_token).await.is_err());
        assert_eq!(f.count(USERS_ME), 2);
    }

    #[tokio::test]
    async fn upstream_refusing_connections_is_503() {
        let s = Sidecar::start().await;
        let f = s.fake.clone();
        f.go_away().await;
        let (code, body) = s.ws_error(&s.coordinate_path(), &f.user_token_ssh).await;
        assert_eq!(code, 503);
        assert_eq!(body["message"], "Authentication backend unavailable.");
        assert!(matches!(
            s.auth.agent(&f.agent_token).await,
            Err(AuthError::Unavailable(_))
        ));
        let (code, _) = s
            .ws_error(&format!("{RPC}?version=2.0"), &f.agent_token)
            .await;
        assert_eq!(code, 503);
        assert_eq!(s.coord.session_count(), 0);
    }

    #[tokio::test]
    async fn hanging_upstream_is_503_within_the_timeout() {
        let fake = FakeCoder::start().await;
        let s = Sidecar::start_with(fake, |c| c.header_timeout = Duration::from_millis(300)).await;
        s.fake.set_slow(Duration::from_secs(10));
        let t = Instant::now();
        let (code, _) = s
            .ws_error(&s.coordinate_path(), &s.fake.user_token_ssh)
            .await;
        assert_eq!(code, 503);
        assert!(
            t.elapsed() < Duration::from_secs(2),
            "took {:?}",
            t.elapsed()
        );
        assert!(
            s.metric(
                "tailnetd_upstream_requests_total",
                &[("kind", "auth_user"), ("outcome", "timeout")]
            ) >= 1.0
        );
    }

    /// An upstream 500 on an auth check: 503, no session, and not cached.
    #[tokio::test]
    async fn upstream_500_on_auth_is_503_and_not_cached() {
        let s = Sidecar::start().await;
        let f = &s.fake;
        f.set_fail(true);
        let (code, body) = s.ws_error(&s.coordinate_path(), &f.user_token_ssh).await;
        assert_eq!(code, 503);
        assert!(body["detail"].as_str().unwrap().contains("500"));
        assert_eq!(s.coord.session_count(), 0);
        let (code, _) = s
            .ws_error(&format!("{RPC}?version=2.0"), &f.agent_token)
            .await;
        assert_eq!(code, 503);
        // Upstream recovers: the next attempt asks again and succeeds.
        f.set_fail(false);
        let ws = s.ws(&s.coordinate_path(), &f.user_token_ssh).await.unwrap();
        drop(ws);
        // 500 on the probe only (users/me cached by now).
        f.set_fail(true);
        let other = UpstreamAuthenticator::new(s.upstream.clone());
        assert!(matches!(
            other.token_may_reach(&f.user_token_ssh, f.agent_id).await,
            Err(AuthError::Unavailable(_))
        ));
    }

    /// Sessions already open are not touched when the upstream goes away.
    #[tokio::test]
    async fn open_session_survives_upstream_loss() {
        let s = Sidecar::start().await;
        let f = s.fake.clone();
        let conn = s.v2(&s.coordinate_path(), &f.user_token_ssh).await;
        let _ = refresh_resume_token(&conn).await;
        f.go_away().await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        let r = refresh_resume_token(&conn).await;
        assert!(!r.token.is_empty());
        assert_eq!(s.coord.session_count(), 1);
        // New sessions fail closed meanwhile (after the cache entry expires they would get 503;
        // within the TTL the cached decision still admits them).
        let (code, _) = s.ws_error(&s.coordinate_path(), &f.user_token_nossh).await;
        assert_eq!(code, 503);
    }
}
