//! Sidecar mode: dRPC streams tailnetd does not serve are forwarded to the upstream coderd
//! (`coordinator::upstream::agent_rpc`). A small fake coderd below serves `/me/rpc` and
//! `/api/v2/tailnet` with our own rpc stack; the "agents" are our yamux+dRPC client over
//! WebSocket.

/// Named after the module so that `cargo test -p coordinator agent_rpc` runs everything here.
mod agent_rpc {
    use std::collections::HashSet;
    use std::net::SocketAddr;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use axum::extract::ws::{WebSocket, WebSocketUpgrade};
    use axum::extract::{RawQuery, State};
    use axum::response::{IntoResponse, Response};
    use axum::routing::get;
    use bytes::{Bytes, BytesMut};
    use coordinator::rpc::drpc::{
        self, CallFuture, DrpcConfig, Handler, RawInvoke, RpcError, RpcStream, TakeOverFuture,
    };
    use coordinator::rpc::wsio::{WsConfig, WsIo, CLOSE_GOING_AWAY};
    use coordinator::rpc::yamux::{self, Session};
    use coordinator::upstream::{Upstream, UpstreamConfig};
    use http::{HeaderMap, StatusCode, Uri};
    use proto::agent::v2::{methods as agent_methods, GetManifestRequest, Manifest};
    use proto::drpc::{encode_packet, Kind};
    use proto::tailnet::v2::{methods, WorkspaceUpdate, WorkspaceUpdatesRequest};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::time::timeout;
    use tokio_util::sync::CancellationToken;
    use uuid::Uuid;

    use crate::common::v2::{V2Conn, WAIT};
    use crate::common::{eventually, node, test_config, Harness, USER_ALL};

    /// Streams one message back per request message, until the client half-closes.
    const HOLD: &str = "/coder.agent.v2.Agent/TestHold";
    /// Taken over raw by the fake: echoes every byte of the transport, unparsed.
    const RAW_ECHO: &str = "/test.Raw/Echo";

    // -----------------------------------------------------------------------------------------
    // A fake coderd
    // -----------------------------------------------------------------------------------------

    #[derive(Default)]
    struct FakeState {
        /// Tokens answered with 401.
        denied: Mutex<HashSet<String>>,
        /// WebSocket sessions accepted.
        sessions: AtomicUsize,
        /// (path, query, token) of every accepted upgrade.
        dials: Mutex<Vec<(String, String, String)>>,
        /// (method, token) of every call served.
        calls: Mutex<Vec<(String, String)>>,
        /// Kill switches of live sessions by token.
        kills: Mutex<Vec<(String, CancellationToken)>>,
        /// The raw Manifest bytes sent by GetManifest.
        manifest: Mutex<Bytes>,
    }

    impl FakeState {
        fn calls_of(&self, method: &str) -> usize {
            self.calls
                .lock()
                .unwrap()
                .iter()
                .filter(|(m, _)| m == method)
                .count()
        }

        fn kill(&self, token: &str) {
            for (t, k) in self.kills.lock().unwrap().iter() {
                if t == token {
                    k.cancel();
                }
            }
        }
    }

    struct FakeCoder {
        addr: SocketAddr,
        state: Arc<FakeState>,
    }

    impl FakeCoder {
        async fn start() -> FakeCoder {
            let state = Arc::new(FakeState::default());
            // A Manifest with an extra field our partial schema does not know (field 99):
            // proves the bytes come back as sent, not re-encoded.
            let m = Manifest {
                agent_id: Bytes::copy_from_slice(Uuid::new_v4().as_bytes()),
                agent_name: "main".into(),
                directory: "/home/coder".into(),
                ..Default::default()
            };
            let mut raw = prost::Message::encode_to_vec(&m);
            raw.extend_from_slice(&[0x9a, 0x06, 0x03, b'x', b'y', b'z']);
            *state.manifest.lock().unwrap() = Bytes::from(raw);
            let app = axum::Router::new()
                .route("/api/v2/workspaceagents/me/rpc", get(upgrade))
                .route("/api/v2/tailnet", get(upgrade))
                .with_state(state.clone());
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            tokio::spawn(async move {
                let _ = axum::serve(listener, app).await;
            });
            FakeCoder { addr, state }
        }

        fn target(&self) -> Upstream {
            upstream_at(&format!("http://{}", self.addr), Duration::from_secs(3))
        }
    }

    /// The upstream at `url` with stream dials bounded by `dial_timeout` (its own registry: the
    /// harness reads only the coordinator's metrics).
    fn upstream_at(url: &str, dial_timeout: Duration) -> Upstream {
        let connect_timeout = Duration::from_secs(1);
        let config = UpstreamConfig {
            url: url.to_string(),
            connect_timeout,
            header_timeout: dial_timeout - connect_timeout,
            ..Default::default()
        };
        let upstream = Upstream::new(config, &prometheus::Registry::new()).unwrap();
        assert_eq!(upstream.dial_timeout(), dial_timeout);
        upstream
    }

    async fn upgrade(
        State(state): State<Arc<FakeState>>,
        uri: Uri,
        headers: HeaderMap,
        RawQuery(query): RawQuery,
        ws: WebSocketUpgrade,
    ) -> Response {
        let token = headers
            .get("Coder-Session-Token")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        if token.is_empty() || state.denied.lock().unwrap().contains(&token) {
            return (
                StatusCode::UNAUTHORIZED,
                axum::Json(serde_json::json!({
                    "message": "Workspace agent not authorized.",
                    "detail": "the agent is outdated"
                })),
            )
                .into_response();
        }
        state.dials.lock().unwrap().push((
            uri.path().to_string(),
            query.unwrap_or_default(),
            token.clone(),
        ));
        ws.on_upgrade(move |socket| serve_fake(state, socket, token))
    }

    async fn serve_fake(state: Arc<FakeState>, socket: WebSocket, token: String) {
        state.sessions.fetch_add(1, Ordering::SeqCst);
        let kill = CancellationToken::new();
        state
            .kills
            .lock()
            .unwrap()
            .push((token.clone(), kill.clone()));
        let (io, ws) = WsIo::new(socket, WsConfig::server());
        let session = Session::server(io, yamux::Config::default());
        let handle = session.handle();
        let handler: Arc<dyn Handler> = Arc::new(FakeHandler { state, token });
        tokio::select! {
            _ = drpc::serve(session, handler, DrpcConfig::default()) => {}
            _ = kill.cancelled() => {
                // Mid-stream death: the socket goes away under live streams.
                handle.close().await;
                ws.close(CLOSE_GOING_AWAY, "fake coderd restarting").await;
            }
        }
    }

    struct FakeHandler {
        state: Arc<FakeState>,
        token: String,
    }

    impl Handler for FakeHandler {
        fn call(self: Arc<Self>, method: &str, mut stream: RpcStream) -> Option<CallFuture> {
            self.state
                .calls
                .lock()
                .unwrap()
                .push((method.to_string(), self.token.clone()));
            match method {
                agent_methods::GET_MANIFEST => Some(Box::pin(async move {
                    let _ = stream.recv().await?;
                    let m = self.state.manifest.lock().unwrap().clone();
                    stream.send(m).await
                })),
                HOLD => Some(Box::pin(async move {
                    while let Some(m) = stream.recv().await? {
                        stream.send(m).await?;
                    }
                    Ok(())
                })),
                methods::WORKSPACE_UPDATES => Some(Box::pin(async move {
                    let req = stream
                        .recv_msg::<WorkspaceUpdatesRequest>()
                        .await?
                        .ok_or(RpcError::Closed)?;
                    for _ in 0..2 {
                        stream
                            .send_msg(&WorkspaceUpdate {
                                upserted_workspaces: vec![proto::tailnet::v2::Workspace {
                                    id: req.workspace_owner_id.clone(),
                                    name: "ws".into(),
                                    ..Default::default()
                                }],
                                ..Default::default()
                            })
                            .await?;
                    }
                    stream.close().await
                })),
                _ => None,
            }
        }

        fn take_over(
            self: Arc<Self>,
            raw: Box<RawInvoke>,
        ) -> Result<TakeOverFuture, Box<RawInvoke>> {
            if raw.method != RAW_ECHO {
                return Err(raw);
            }
            self.state
                .calls
                .lock()
                .unwrap()
                .push((raw.method.clone(), self.token.clone()));
            Ok(Box::pin(async move {
                let RawInvoke {
                    consumed,
                    mut reader,
                    mut writer,
                    ..
                } = *raw;
                writer.write_all(&consumed).await.unwrap();
                let _ = tokio::io::copy(&mut reader, &mut writer).await;
                let _ = writer.shutdown().await;
            }))
        }
    }

    // -----------------------------------------------------------------------------------------
    // Helpers
    // -----------------------------------------------------------------------------------------

    async fn harness_with(up: &FakeCoder, agents: usize) -> Harness {
        let mut config = test_config();
        config.upstream = Some(up.target());
        Harness::start_with(config, agents).await
    }

    /// GetManifest as raw bytes: the response payload exactly as the upstream sent it.
    async fn get_manifest_raw(conn: &V2Conn) -> Result<Bytes, RpcError> {
        let mut s = conn.rpc.open_stream(agent_methods::GET_MANIFEST).await?;
        s.send_msg(&GetManifestRequest {}).await?;
        s.close_send().await?;
        match timeout(WAIT, s.recv())
            .await
            .expect("GetManifest timed out")?
        {
            Some(b) => Ok(b),
            None => Err(RpcError::Closed),
        }
    }

    fn metric(h: &Harness, name: &str, labels: &[(&str, &str)]) -> f64 {
        h.metric(name, labels)
    }

    // -----------------------------------------------------------------------------------------
    // Tests
    // -----------------------------------------------------------------------------------------

    #[tokio::test]
    async fn get_manifest_is_forwarded_while_coordinate_is_served_locally() {
        let up = FakeCoder::start().await;
        let h = harness_with(&up, 2).await;
        let agent = h.agents[0];
        let a = V2Conn::agent(&h, 0).await;

        // Forwarded: the upstream sees the agent's own token and query; bytes come back as sent.
        let got = get_manifest_raw(&a).await.unwrap();
        assert_eq!(got, *up.state.manifest.lock().unwrap());
        let m: Manifest = prost::Message::decode(got).unwrap();
        assert_eq!(m.agent_name, "main");
        assert_eq!(up.state.calls_of(agent_methods::GET_MANIFEST), 1);
        {
            let dials = up.state.dials.lock().unwrap();
            assert_eq!(dials.len(), 1);
            assert_eq!(dials[0].0, "/api/v2/workspaceagents/me/rpc");
            assert_eq!(dials[0].1, "version=2.10&role=agent");
            assert_eq!(dials[0].2, agent.token.to_string());
        }
        // A typed call works too (same upstream session).
        let typed: Manifest = a
            .rpc
            .invoke_unary(agent_methods::GET_MANIFEST, &GetManifestRequest {})
            .await
            .unwrap();
        assert_eq!(typed.directory, "/home/coder");
        assert_eq!(up.state.sessions.load(Ordering::SeqCst), 1);

        // Coordinate on the same session is tailnetd's: a client's node reaches the agent through
        // tailnetd's graph, and the upstream never sees a Tailnet call.
        let mut ap = a.coordinate().await;
        let an = node(agent.id, true, 1);
        ap.update_self(an.clone()).await;
        let c = V2Conn::client(&h, 0, "").await;
        let mut cp = c.coordinate().await;
        cp.add_tunnel(agent.id).await;
        let cn = node(Uuid::new_v4(), false, 1);
        cp.update_self(cn.clone()).await;
        cp.expect_node(agent.id, &an).await;
        ap.until("client node", |p| p.nodes.values().any(|n| *n == cn))
            .await;
        assert_eq!(up.state.calls_of(methods::COORDINATE), 0);
        assert_eq!(up.state.calls.lock().unwrap().len(), 2);
        assert_eq!(
            metric(
                &h,
                "coordinator_upstream_rpc_streams_total",
                &[("endpoint", "agent_rpc")]
            ),
            2.0
        );
        assert_eq!(
            metric(
                &h,
                "coordinator_upstream_rpc_dials_total",
                &[("endpoint", "agent_rpc"), ("result", "ok")]
            ),
            1.0
        );
    }

    #[tokio::test]
    async fn concurrent_forwarded_calls_share_one_upstream_session() {
        let up = FakeCoder::start().await;
        let h = harness_with(&up, 1).await;
        let a = V2Conn::agent(&h, 0).await;
        // Opened at once, before any upstream session exists: one dial serves them all.
        let mut streams = Vec::new();
        for _ in 0..6 {
            streams.push(a.rpc.open_stream(HOLD).await.unwrap());
        }
        for (i, s) in streams.iter().enumerate() {
            s.send(Bytes::from(vec![i as u8; 3])).await.unwrap();
        }
        for (i, s) in streams.iter_mut().enumerate() {
            let echo = timeout(WAIT, s.recv()).await.unwrap().unwrap().unwrap();
            assert_eq!(echo, Bytes::from(vec![i as u8; 3]));
        }
        assert_eq!(up.state.sessions.load(Ordering::SeqCst), 1);
        assert_eq!(up.state.calls_of(HOLD), 6);
        assert_eq!(metric(&h, "coordinator_upstream_rpc_sessions", &[]), 1.0);
        // Half-close propagates: each upstream handler sees the end and finishes its call.
        for s in streams.iter_mut() {
            s.close_send().await.unwrap();
            assert!(timeout(WAIT, s.recv()).await.unwrap().unwrap().is_none());
        }
        // The agent leaves: its upstream session goes too.
        drop(streams);
        a.ws.close(1000, "").await;
        assert!(
            eventually(WAIT, || metric(
                &h,
                "coordinator_upstream_rpc_sessions",
                &[]
            ) == 0.0)
            .await
        );
        assert_eq!(
            metric(
                &h,
                "coordinator_upstream_rpc_failures_total",
                &[("reason", "session_lost")]
            ),
            0.0
        );
    }

    #[tokio::test]
    async fn upstream_death_closes_only_that_agents_session() {
        let up = FakeCoder::start().await;
        let h = harness_with(&up, 2).await;
        let a = V2Conn::agent(&h, 0).await;
        let b = V2Conn::agent(&h, 1).await;
        let mut a_hold = a.rpc.open_stream(HOLD).await.unwrap();
        let mut b_hold = b.rpc.open_stream(HOLD).await.unwrap();
        for s in [&mut a_hold, &mut b_hold] {
            s.send(Bytes::from_static(b"ping")).await.unwrap();
            assert_eq!(
                timeout(WAIT, s.recv()).await.unwrap().unwrap().unwrap(),
                Bytes::from_static(b"ping")
            );
        }
        // A Coordinate stream on A's session too: it must end with the session.
        let mut ap = a.coordinate().await;
        ap.update_self(node(h.agents[0].id, true, 1)).await;

        up.state.kill(&h.agents[0].token.to_string());

        // A sees its whole session end (WebSocket and yamux), mid-stream.
        let end = timeout(WAIT, a.ws.ended())
            .await
            .expect("agent A not closed");
        tracing::info!(?end, "agent A session ended");
        timeout(WAIT, a.rpc.session().closed()).await.unwrap();
        let r = timeout(WAIT, a_hold.recv()).await.unwrap();
        assert!(!matches!(r, Ok(Some(_))), "{r:?}");
        ap.expect_closed().await;
        assert_eq!(
            metric(
                &h,
                "coordinator_upstream_rpc_failures_total",
                &[("reason", "session_lost")]
            ),
            1.0
        );

        // B is unaffected: its held stream and new forwarded calls still work.
        b_hold.send(Bytes::from_static(b"again")).await.unwrap();
        assert_eq!(
            timeout(WAIT, b_hold.recv())
                .await
                .unwrap()
                .unwrap()
                .unwrap(),
            Bytes::from_static(b"again")
        );
        get_manifest_raw(&b).await.unwrap();
        assert!(!b.ws.is_ended());

        // A redials and gets a fresh upstream session.
        let a2 = V2Conn::agent(&h, 0).await;
        get_manifest_raw(&a2).await.unwrap();
        assert_eq!(up.state.sessions.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn unreachable_upstream_errors_the_call_then_closes_the_session() {
        // A port nothing listens on.
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let mut config = test_config();
        config.upstream = Some(upstream_at(
            &format!("http://127.0.0.1:{port}"),
            Duration::from_secs(2),
        ));
        let h = Harness::start_with(config, 1).await;
        let a = V2Conn::agent(&h, 0).await;
        // Tailnet methods do not need the upstream.
        let mut ap = a.coordinate().await;
        ap.update_self(node(h.agents[0].id, true, 1)).await;
        ap.expect_quiet(Duration::from_millis(200)).await;

        let err = a
            .rpc
            .invoke_unary::<_, Manifest>(agent_methods::GET_MANIFEST, &GetManifestRequest {})
            .await
            .unwrap_err();
        match &err {
            RpcError::Remote { code, message } => {
                assert_eq!(*code, 0);
                assert!(
                    message.starts_with("upstream coderd unavailable: connect 127.0.0.1:"),
                    "{message}"
                );
            }
            other => panic!("unexpected error {other:?}"),
        }
        assert!(!err.is_unimplemented());
        // Then the session closes, so the agent redials.
        timeout(WAIT, a.ws.ended())
            .await
            .expect("session not closed");
        ap.expect_closed().await;
        assert_eq!(
            metric(
                &h,
                "coordinator_upstream_rpc_failures_total",
                &[("reason", "dial")]
            ),
            1.0
        );
        assert_eq!(
            metric(
                &h,
                "coordinator_upstream_rpc_dials_total",
                &[("endpoint", "agent_rpc"), ("result", "error")]
            ),
            1.0
        );
    }

    #[tokio::test]
    async fn upstream_refusal_carries_coders_message() {
        let up = FakeCoder::start().await;
        let h = harness_with(&up, 1).await;
        up.state
            .denied
            .lock()
            .unwrap()
            .insert(h.agents[0].token.to_string());
        let a = V2Conn::agent(&h, 0).await;
        let err = get_manifest_raw(&a).await.unwrap_err();
        assert_eq!(
            err,
            RpcError::new(
                0,
                "upstream coderd unavailable: 401: Workspace agent not authorized. the agent is outdated"
            )
        );
        timeout(WAIT, a.ws.ended())
            .await
            .expect("session not closed");
    }

    #[tokio::test]
    async fn without_upstream_unknown_methods_stay_unimplemented() {
        let h = Harness::start().await;
        let a = V2Conn::agent(&h, 0).await;
        let err = get_manifest_raw(&a).await.unwrap_err();
        assert!(err.is_unimplemented(), "{err:?}");
        // The session stays up.
        let mut ap = a.coordinate().await;
        ap.update_self(node(h.agents[0].id, true, 1)).await;
        ap.expect_quiet(Duration::from_millis(200)).await;
    }

    #[tokio::test]
    async fn forwarded_stream_bytes_are_unchanged() {
        let up = FakeCoder::start().await;
        let h = harness_with(&up, 1).await;
        let a = V2Conn::agent(&h, 0).await;
        let mut s = a.rpc.session().open().await.unwrap();
        // An InvokeMetadata + Invoke on dRPC stream 5 (not Coder's 1), then bytes that are not
        // dRPC at all: nobody between us and the upstream may parse or change them.
        let mut first = BytesMut::new();
        encode_packet(
            5,
            1,
            Kind::InvokeMetadata,
            &proto::drpc::encode_metadata([("k", "v")]),
            &mut first,
        );
        encode_packet(5, 2, Kind::Invoke, RAW_ECHO.as_bytes(), &mut first);
        s.write_all(&first).await.unwrap();
        let mut echo = vec![0u8; first.len()];
        timeout(WAIT, s.read_exact(&mut echo))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(echo, first.to_vec());
        let junk: Vec<u8> = (0..300_000u32).map(|i| (i * 7 + 3) as u8).collect();
        let (mut rd, mut wr) = s.into_split();
        let writer = tokio::spawn(async move {
            wr.write_all(&junk).await.unwrap();
            wr.shutdown().await.unwrap();
            junk
        });
        let mut back = Vec::new();
        timeout(WAIT, rd.read_to_end(&mut back))
            .await
            .unwrap()
            .unwrap();
        let junk = writer.await.unwrap();
        assert_eq!(back.len(), junk.len());
        assert!(back == junk, "bytes changed in transit");
        assert_eq!(up.state.calls_of(RAW_ECHO), 1);
        assert!(
            eventually(WAIT, || metric(
                &h,
                "coordinator_upstream_rpc_bytes_total",
                &[("direction", "to_downstream")]
            ) >= (first.len() + junk.len()) as f64)
            .await
        );
    }

    #[tokio::test]
    async fn workspace_updates_on_tailnet_are_forwarded() {
        let up = FakeCoder::start().await;
        let h = harness_with(&up, 1).await;
        let d = V2Conn::dial(&h, "/api/v2/tailnet?version=2.3", USER_ALL).await;
        let owner = Uuid::new_v4();
        let mut s = d.rpc.open_stream(methods::WORKSPACE_UPDATES).await.unwrap();
        s.send_msg(&WorkspaceUpdatesRequest {
            workspace_owner_id: Bytes::copy_from_slice(owner.as_bytes()),
        })
        .await
        .unwrap();
        s.close_send().await.unwrap();
        for _ in 0..2 {
            let u: WorkspaceUpdate = timeout(WAIT, s.recv_msg()).await.unwrap().unwrap().unwrap();
            assert_eq!(u.upserted_workspaces[0].id.as_ref(), owner.as_bytes());
        }
        assert!(timeout(WAIT, s.recv()).await.unwrap().unwrap().is_none());
        {
            let dials = up.state.dials.lock().unwrap();
            assert_eq!(dials.len(), 1);
            assert_eq!(dials[0].0, "/api/v2/tailnet");
            assert_eq!(dials[0].1, "version=2.3");
            assert_eq!(dials[0].2, USER_ALL);
        }
        assert_eq!(up.state.calls_of(methods::WORKSPACE_UPDATES), 1);
        // Tailnet methods tailnetd serves stay local on the same session.
        let tok: proto::tailnet::v2::RefreshResumeTokenResponse = d
            .rpc
            .invoke_unary(
                methods::REFRESH_RESUME_TOKEN,
                &proto::tailnet::v2::RefreshResumeTokenRequest {},
            )
            .await
            .unwrap();
        assert!(!tok.token.is_empty());
        let mut cp = d.coordinate().await;
        cp.add_tunnel(h.agents[0].id).await;
        cp.expect_quiet(Duration::from_millis(200)).await;
        assert_eq!(up.state.calls.lock().unwrap().len(), 1);
        assert_eq!(
            metric(
                &h,
                "coordinator_upstream_rpc_streams_total",
                &[("endpoint", "tailnet")]
            ),
            1.0
        );
    }
}
