//! Reverse proxy to an upstream coderd: every agents-API endpoint, headers, streaming bodies,
//! WebSocket splicing, DERP map rewriting, size limits and upstream faults.

/// Named after the feature so that `cargo test -p coordinator upstream` runs it.
mod upstream {
    use std::time::{Duration, Instant};

    use bytes::Bytes;
    use futures_util::{SinkExt, StreamExt};
    use http_body_util::BodyExt;
    use tokio_tungstenite::tungstenite::Message;

    use crate::fake_coder::{connection_json, manifest_json, FakeCoder};
    use crate::upstream_harness::{json, send, Sidecar};

    const WA: &str = "/api/v2/workspaceagents";

    /// Every endpoint of Coder's agents API answers through tailnetd exactly as coderd does
    /// (status, content type, body byte for byte; DERP-map answers aside), and request bodies
    /// arrive intact.
    #[tokio::test]
    async fn every_agents_api_endpoint_is_proxied() {
        let s = Sidecar::start_tweaked(|c| c.rewrite_derp_map = false).await;
        let f = s.fake.clone();
        let agent = f.agent_token.as_str();
        let user = f.user_token_ssh.as_str();
        let id = f.agent_id;
        let cases: Vec<(&str, String, &str, &[u8])> = vec![
            ("POST", format!("{WA}/aws-instance-identity"), "", br#"{"signature":"sig","document":"doc"}"#),
            ("POST", format!("{WA}/azure-instance-identity"), "", br#"{"signature":"sig","encoding":"pkcs7"}"#),
            ("POST", format!("{WA}/google-instance-identity"), "", br#"{"json_web_token":"jwt"}"#),
            ("POST", format!("{WA}/me/app-health"), agent, br#"{"Healths":{"00000000-0000-0000-0000-000000000000":"healthy"}}"#),
            ("GET", format!("{WA}/me/external-auth?match=github.com&id=github"), agent, b""),
            ("GET", format!("{WA}/me/gitauth?url=https%3A%2F%2Fgithub.com"), agent, b""),
            ("GET", format!("{WA}/me/gitsshkey"), agent, b""),
            ("PATCH", format!("{WA}/me/logs"), agent, br#"{"logs":[{"created_at":"2024-01-01T00:00:00Z","output":"hi","level":"info"}],"log_source_id":"00000000-0000-0000-0000-000000000000"}"#),
            ("PATCH", format!("{WA}/me/startup-logs"), agent, br#"{"logs":[{"created_at":"2024-01-01T00:00:00Z","output":"hi","level":"info"}]}"#),
            ("GET", format!("{WA}/me/manifest"), agent, b""),
            ("POST", format!("{WA}/me/report-stats"), agent, br#"{"connections_by_proto":{"ssh":1},"connection_count":1}"#),
            ("GET", format!("{WA}/{id}"), user, b""),
            ("GET", format!("{WA}/{id}/connection"), user, b""),
            ("GET", format!("{WA}/{id}/listening-ports"), user, b""),
            ("GET", format!("{WA}/{id}/logs?before=10&after=0"), user, b""),
            ("GET", format!("{WA}/{id}/startup-logs"), user, b""),
            // A plain GET on pty is not an upgrade: coderd's WebSocket layer refuses it.
            ("GET", format!("{WA}/{id}/pty"), user, b""),
            // Agent API with a bad token, and an unknown route.
            ("GET", format!("{WA}/me/gitsshkey"), "00000000-0000-0000-0000-000000000000", b""),
            ("GET", "/api/v2/nonexistent?x=1".to_string(), user, b""),
            ("GET", "/".to_string(), "", b""),
        ];
        for (method, path, token, body) in cases {
            let mut headers = vec![("content-type", "application/json")];
            if !token.is_empty() {
                headers.push(("coder-session-token", token));
            }
            let got = s.request(method, &path, &headers, body).await;
            let want = s.direct(method, &path, &headers, body).await;
            assert_eq!(got.status(), want.status(), "{method} {path}");
            assert_eq!(got.body(), want.body(), "{method} {path}: body");
            assert_eq!(
                got.headers().get("content-type"),
                want.headers().get("content-type"),
                "{method} {path}: content-type"
            );
            assert_eq!(
                got.headers().get("x-coder-build-version").unwrap(),
                "v2.99.0-fake",
                "{method} {path}"
            );
            let p = path.split('?').next().unwrap();
            if !body.is_empty() {
                assert_eq!(
                    f.body(p).unwrap(),
                    Bytes::from_static(body),
                    "{method} {path}: request body"
                );
            }
            let rec = f.last(p).unwrap();
            assert_eq!(rec.method, method);
            assert_eq!(rec.uri, path, "{method} {path}: path and query");
            if !token.is_empty() {
                assert_eq!(rec.headers.get("coder-session-token").unwrap(), token);
            }
        }
        // Spot-check realistic shapes.
        let r = s.get_with_token(&format!("{WA}/{id}"), user).await;
        assert_eq!(r.status(), 200);
        let v = json(r.body());
        assert_eq!(v["id"], id.to_string());
        assert_eq!(v["status"], "connected");
        let r = s
            .get_with_token(
                &format!("{WA}/me/gitsshkey"),
                "00000000-0000-0000-0000-000000000000",
            )
            .await;
        assert_eq!(r.status(), 401);
        assert_eq!(json(r.body())["message"], "Workspace agent not authorized.");
    }

    #[tokio::test]
    async fn forwarded_headers_and_hop_by_hop() {
        let s = Sidecar::start().await;
        let host = s.addr.to_string();
        let r = s
            .request(
                "PUT",
                "/api/v2/fake/echo/a/b?q=1&q=2&x=%20y",
                &[
                    ("x-custom", "one"),
                    ("x-custom", "two"),
                    ("connection", "keep-alive, x-hop"),
                    ("x-hop", "secret"),
                    ("keep-alive", "timeout=5"),
                    ("authorization", "Bearer tok"),
                    ("x-forwarded-for", "10.0.0.1"),
                ],
                b"payload bytes",
            )
            .await;
        assert_eq!(r.status(), 200);
        let v = json(r.body());
        assert_eq!(v["method"], "PUT");
        assert_eq!(v["uri"], "/api/v2/fake/echo/a/b?q=1&q=2&x=%20y");
        assert_eq!(v["body"], "payload bytes");
        let h = &v["headers"];
        assert_eq!(h["x-custom"], serde_json::json!(["one", "two"]));
        assert_eq!(h["authorization"], serde_json::json!(["Bearer tok"]));
        assert!(
            h.get("x-hop").is_none(),
            "header named in Connection must be dropped"
        );
        assert!(h.get("keep-alive").is_none());
        assert_eq!(h["host"], serde_json::json!([host.clone()]));
        // The test client is no trusted proxy: its X-Forwarded-For is replaced (issue 14).
        assert_eq!(h["x-forwarded-for"], serde_json::json!(["127.0.0.1"]));
        assert_eq!(h["x-forwarded-host"], serde_json::json!([host]));
        assert_eq!(h["x-forwarded-proto"], serde_json::json!(["http"]));
    }

    #[tokio::test]
    async fn host_rewritten_when_not_preserved() {
        let s = Sidecar::start_tweaked(|c| c.preserve_host = false).await;
        let r = s.request("GET", "/api/v2/fake/echo/x", &[], b"").await;
        let v = json(r.body());
        assert_eq!(
            v["headers"]["host"],
            serde_json::json!([s.fake.addr.to_string()])
        );
        assert_eq!(
            v["headers"]["x-forwarded-host"],
            serde_json::json!([s.addr.to_string()])
        );
    }

    #[tokio::test]
    async fn pty_websocket_is_spliced_both_ways() {
        let s = Sidecar::start().await;
        let path = format!(
            "{WA}/{}/pty?reconnect={}&height=24&width=80",
            s.fake.agent_id,
            uuid::Uuid::new_v4()
        );
        let mut ws = s.ws(&path, &s.fake.user_token_ssh).await.unwrap();
        for i in 0..20u8 {
            let data = vec![i; 1000 + i as usize];
            ws.send(Message::Binary(Bytes::from(data.clone())))
                .await
                .unwrap();
            let got = tokio::time::timeout(Duration::from_secs(5), ws.next())
                .await
                .unwrap()
                .unwrap()
                .unwrap();
            assert_eq!(got, Message::Binary(Bytes::from(data)));
        }
        ws.send(Message::Text("ls -la\r".into())).await.unwrap();
        let got = tokio::time::timeout(Duration::from_secs(5), ws.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(got, Message::Text("ls -la\r".into()));
        assert_eq!(s.metric("tailnetd_upstream_spliced_connections", &[]), 1.0);
        ws.close(None).await.unwrap();
        // The pty request reached the fake with its query.
        let rec = s
            .fake
            .last(&format!("{WA}/{}/pty", s.fake.agent_id))
            .unwrap();
        assert_eq!(rec.uri, path);
        // A pty WebSocket without access answers coderd's 401.
        let (code, body) = s.ws_error(&path, &s.fake.bad_user_token).await;
        assert_eq!(code, 401);
        assert!(body["message"].as_str().unwrap().contains("signed out"));
    }

    #[tokio::test]
    async fn follow_logs_websocket() {
        let s = Sidecar::start().await;
        let path = format!("{WA}/{}/logs?follow=true&after=0", s.fake.agent_id);
        let mut ws = s.ws(&path, &s.fake.user_token_ssh).await.unwrap();
        let first = tokio::time::timeout(Duration::from_secs(5), ws.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        let Message::Text(t) = first else {
            panic!("expected text, got {first:?}")
        };
        let v: serde_json::Value = serde_json::from_str(t.as_str()).unwrap();
        assert_eq!(v[1]["output"], "ready");
        ws.send(Message::Text("more".into())).await.unwrap();
        let again = tokio::time::timeout(Duration::from_secs(5), ws.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert!(matches!(again, Message::Text(_)));
    }

    /// The response body streams: the first chunk arrives long before the last is sent.
    #[tokio::test]
    async fn streaming_response_arrives_incrementally() {
        let s = Sidecar::start().await;
        let client: hyper_util::client::legacy::Client<_, http_body_util::Empty<Bytes>> =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .build(hyper_util::client::legacy::connect::HttpConnector::new());
        let start = Instant::now();
        let resp = client
            .get(
                s.http_url("/api/v2/fake/stream?chunks=4&interval_ms=400")
                    .parse()
                    .unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        let mut body = resp.into_body();
        let mut arrivals = Vec::new();
        let mut all = Vec::new();
        while let Some(frame) = body.frame().await {
            if let Ok(d) = frame.unwrap().into_data() {
                arrivals.push(start.elapsed());
                all.extend_from_slice(&d);
            }
        }
        assert_eq!(
            String::from_utf8(all).unwrap(),
            "chunk 0\nchunk 1\nchunk 2\nchunk 3\n"
        );
        // The first chunk was delivered long before the last one was even produced.
        let spread = *arrivals.last().unwrap() - arrivals[0];
        assert!(
            spread >= Duration::from_millis(900),
            "arrivals {arrivals:?}"
        );
    }

    /// A large request body streams to the upstream intact (chunked, no Content-Length).
    #[tokio::test]
    async fn streaming_request_body_reaches_upstream_intact() {
        let s = Sidecar::start().await;
        let chunks: Vec<Bytes> = (0..16)
            .map(|i| Bytes::from(vec![i as u8; 32 * 1024]))
            .collect();
        let mut all = Vec::new();
        for c in &chunks {
            all.extend_from_slice(c);
        }
        let client: hyper_util::client::legacy::Client<_, axum::body::Body> =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .build(hyper_util::client::legacy::connect::HttpConnector::new());
        let req = http::Request::post(s.http_url("/api/v2/fake/upload"))
            .body(crate::upstream_harness::stream_body(chunks))
            .unwrap();
        let resp = client.request(req).await.unwrap();
        assert_eq!(resp.status(), 200);
        let v = json(&resp.into_body().collect().await.unwrap().to_bytes());
        use sha2::Digest;
        assert_eq!(v["bytes"], all.len());
        assert_eq!(v["sha256"], hex::encode(sha2::Sha256::digest(&all)));
    }

    #[tokio::test]
    async fn body_larger_than_limit_is_413() {
        let s = Sidecar::start_tweaked(|c| c.max_body_bytes = 64 * 1024).await;
        // Declared length over the limit: refused before contacting the upstream.
        let before = s.fake.total();
        let r = s
            .request("POST", "/api/v2/fake/upload", &[], &vec![7u8; 100 * 1024])
            .await;
        assert_eq!(r.status(), 413);
        let v = json(r.body());
        assert_eq!(v["message"], "Request body is too large.");
        assert!(v["detail"].as_str().unwrap().contains("65536"));
        assert_eq!(s.fake.total(), before);
        // Chunked body that turns out too large while streaming.
        let client: hyper_util::client::legacy::Client<_, axum::body::Body> =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .build(hyper_util::client::legacy::connect::HttpConnector::new());
        let chunks: Vec<Bytes> = (0..8).map(|_| Bytes::from(vec![1u8; 16 * 1024])).collect();
        let req = http::Request::post(s.http_url("/api/v2/fake/upload"))
            .body(crate::upstream_harness::stream_body(chunks))
            .unwrap();
        let resp = client.request(req).await.unwrap();
        assert_eq!(resp.status(), 413);
        // Within the limit still works.
        let r = s
            .request("POST", "/api/v2/fake/upload", &[], &vec![7u8; 1000])
            .await;
        assert_eq!(r.status(), 200);
        assert!(s.proxy_errors("body_too_large") >= 2.0);
    }

    /// `/connection` and `/me/manifest` carry tailnetd's DERP map; every other member is kept.
    #[tokio::test]
    async fn derp_maps_are_rewritten() {
        let s = Sidecar::start().await;
        let f = &s.fake;
        let ours: serde_json::Value = serde_json::from_slice(&s.coord.derp_map().json).unwrap();
        let r = s
            .request(
                "GET",
                &format!("{WA}/{}/connection", f.agent_id),
                &[
                    ("coder-session-token", &f.user_token_ssh),
                    ("accept-encoding", "gzip"),
                ],
                b"",
            )
            .await;
        assert_eq!(r.status(), 200);
        let v = json(r.body());
        assert_eq!(v["derp_map"], ours);
        assert_eq!(v["hostname_suffix"], "coder");
        assert_eq!(r.headers()["content-length"], r.body().len().to_string());
        // Byte for byte apart from the map.
        let upstream_map = crate::fake_coder::UPSTREAM_DERP_MAP;
        let ours_text = String::from_utf8(s.coord.derp_map().json.to_vec()).unwrap();
        let expect = connection_json().replace(upstream_map, ours_text.trim());
        assert_eq!(std::str::from_utf8(r.body()).unwrap(), expect);
        // The upstream was asked without compression.
        let rec = f.last(&format!("{WA}/{}/connection", f.agent_id)).unwrap();
        assert!(rec.headers.get("accept-encoding").is_none());

        let r = s
            .get_with_token(&format!("{WA}/me/manifest"), &f.agent_token)
            .await;
        assert_eq!(r.status(), 200);
        let expect = manifest_json(f.agent_id, f.workspace_id, &f.agent_name)
            .replace(upstream_map, ours_text.trim());
        assert_eq!(std::str::from_utf8(r.body()).unwrap(), expect);
        assert_eq!(json(r.body())["derpmap"], ours);
        assert_eq!(
            s.metric(
                "tailnetd_upstream_derp_map_rewrites_total",
                &[("result", "rewritten")]
            ),
            2.0
        );

        // Non-200 answers pass through untouched.
        let r = s
            .get_with_token(
                &format!("{WA}/me/manifest"),
                "00000000-0000-0000-0000-000000000000",
            )
            .await;
        assert_eq!(r.status(), 401);
    }

    #[tokio::test]
    async fn large_derp_answer_passes_through_unchanged() {
        let s = Sidecar::start_tweaked(|c| c.max_rewrite_bytes = 64).await;
        let f = &s.fake;
        let r = s
            .get_with_token(
                &format!("{WA}/{}/connection", f.agent_id),
                &f.user_token_ssh,
            )
            .await;
        assert_eq!(r.status(), 200);
        assert_eq!(std::str::from_utf8(r.body()).unwrap(), connection_json());
        assert_eq!(
            s.metric(
                "tailnetd_upstream_derp_map_rewrites_total",
                &[("result", "too_large")]
            ),
            1.0
        );
    }

    #[tokio::test]
    async fn unreachable_upstream_is_502_json() {
        // A port nobody listens on.
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let dead = l.local_addr().unwrap();
        drop(l);
        let s = Sidecar::start_tweaked(|c| c.url = format!("http://{dead}")).await;
        let t = Instant::now();
        let r = s.request("GET", "/api/v2/buildinfo", &[], b"").await;
        assert_eq!(r.status(), 502);
        let v = json(r.body());
        assert_eq!(v["message"], "Failed to reach the upstream Coder server.");
        assert!(v["detail"].is_string());
        assert!(t.elapsed() < Duration::from_secs(3));
        assert_eq!(s.proxy_errors("unreachable"), 1.0);
    }

    #[tokio::test]
    async fn upstream_gone_is_502() {
        let s = Sidecar::start().await;
        assert_eq!(
            s.request("GET", "/api/v2/fake/echo/x", &[], b"")
                .await
                .status(),
            200
        );
        s.fake.go_away().await;
        let r = s.request("GET", "/api/v2/fake/echo/x", &[], b"").await;
        assert_eq!(r.status(), 502);
        assert!(json(r.body())["message"].is_string());
    }

    #[tokio::test]
    async fn hanging_upstream_is_502_within_the_timeout() {
        let s = Sidecar::start_tweaked(|c| c.header_timeout = Duration::from_millis(300)).await;
        s.fake.set_slow(Duration::from_secs(10));
        let t = Instant::now();
        let r = s.request("GET", "/api/v2/buildinfo", &[], b"").await;
        assert_eq!(r.status(), 502);
        assert!(
            t.elapsed() < Duration::from_secs(2),
            "took {:?}",
            t.elapsed()
        );
        assert!(json(r.body())["detail"]
            .as_str()
            .unwrap()
            .contains("did not answer"));
        assert_eq!(s.proxy_errors("timeout"), 1.0);
    }

    /// An upstream 500 is the upstream's answer: passed through, not turned into 502.
    #[tokio::test]
    async fn upstream_errors_pass_through() {
        let s = Sidecar::start().await;
        s.fake.set_fail(true);
        let r = s.request("GET", "/api/v2/buildinfo", &[], b"").await;
        assert_eq!(r.status(), 500);
        assert_eq!(json(r.body())["message"], "Internal error.");
    }

    /// An https upstream: REST, auth and a spliced WebSocket over TLS.
    #[tokio::test]
    async fn https_upstream() {
        let (fake, cert) = FakeCoder::start_tls().await;
        let s = Sidecar::start_with(fake, |c| c.tls = Some(FakeCoder::client_tls(cert))).await;
        assert!(s.fake.url.starts_with("https://"));
        let r = s
            .request("POST", "/api/v2/fake/echo/tls", &[], b"over tls")
            .await;
        assert_eq!(r.status(), 200);
        assert_eq!(json(r.body())["body"], "over tls");
        let path = s.coordinate_path();
        let ws = s.ws(&path, &s.fake.user_token_ssh).await.unwrap();
        drop(ws);
        let mut pty = s
            .ws(
                &format!("{WA}/{}/pty", s.fake.agent_id),
                &s.fake.user_token_ssh,
            )
            .await
            .unwrap();
        pty.send(Message::Binary(Bytes::from_static(b"tls echo")))
            .await
            .unwrap();
        let got = tokio::time::timeout(Duration::from_secs(5), pty.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(got, Message::Binary(Bytes::from_static(b"tls echo")));
        // The default roots do not trust the self-signed upstream: 502, not a hang.
        let (fake2, _) = FakeCoder::start_tls().await;
        let s2 = Sidecar::start_with(fake2, |_| {}).await;
        let r = s2.request("GET", "/api/v2/buildinfo", &[], b"").await;
        assert_eq!(r.status(), 502);
    }

    /// tailnetd's own routes are not proxied.
    #[tokio::test]
    async fn owned_routes_stay_local() {
        let s = Sidecar::start().await;
        let r = send(&s.http_url("/api/v2/derp-map"), "GET", &[], b"").await;
        // Not an upgrade: tailnetd's own WebSocket layer answers.
        assert_eq!(r.status(), 426);
        assert_eq!(s.fake.count("/api/v2/derp-map"), 0);
    }
}
