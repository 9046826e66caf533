//! End to end in sidecar mode over TLS: tailnetd with the upstream authenticator and agent-RPC
//! forwarding in front of the shared fake coderd (`tests/fake_coder`, HTTPS), a modern agent on
//! `/me/rpc` and Coder Desktop on `/api/v2/tailnet`.

/// Named after the module so that `cargo test -p coordinator agent_rpc` runs it.
mod agent_rpc {
    use std::sync::Arc;
    use std::time::Duration;

    use coordinator::derpmap::{DerpMapConfig, DerpMapSource, EmbeddedRelay};
    use coordinator::upstream::{Upstream, UpstreamAuthenticator, UpstreamConfig};
    use coordinator::{Coordinator, CoordinatorConfig};
    use proto::agent::v2::{methods as agent_methods, GetManifestRequest, Manifest};
    use uuid::Uuid;

    use crate::common::node;
    use crate::common::v2::{v2_dial, V2Conn};
    use crate::fake_coder::FakeCoder;
    use crate::support::{self, init_tracing};

    struct Sidecar {
        fake: FakeCoder,
        addr: std::net::SocketAddr,
        registry: prometheus::Registry,
        _coord: Arc<Coordinator>,
    }

    impl Sidecar {
        async fn start_tls() -> Sidecar {
            init_tracing();
            let (fake, cert) = FakeCoder::start_tls().await;
            let mut roots = rustls::RootCertStore::empty();
            roots.add(cert).unwrap();
            let mut tls = rustls::ClientConfig::builder_with_provider(Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
            tls.alpn_protocols = vec![b"http/1.1".to_vec()];
            let up_config = UpstreamConfig {
                url: fake.url.clone(),
                tls: Some(Arc::new(tls)),
                ..Default::default()
            };
            let registry = prometheus::Registry::new();
            let upstream = Upstream::new(up_config, &registry).unwrap();
            let auth = Arc::new(UpstreamAuthenticator::new(upstream.clone()));
            let derp = DerpMapSource::new(DerpMapConfig {
                embedded: Some(EmbeddedRelay::new("http://127.0.0.1:1", None)),
                ..Default::default()
            })
            .unwrap();
            let config = CoordinatorConfig {
                shutdown_grace: Duration::from_secs(2),
                upstream: Some(upstream),
                ..Default::default()
            };
            let coord = Coordinator::new(config, auth, derp, &registry).unwrap();
            let app = coord.router();
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            tokio::spawn(async move {
                let _ = axum::serve(listener, app).await;
            });
            Sidecar {
                fake,
                addr,
                registry,
                _coord: coord,
            }
        }

        async fn dial(&self, path: &str, token: &str) -> V2Conn {
            v2_dial(
                &format!("ws://{}{path}", self.addr),
                &[(support::SESSION_TOKEN, token)],
            )
            .await
        }

        fn metric(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
            support::metric(&self.registry, name, labels)
        }
    }

    #[tokio::test]
    async fn sidecar_over_tls_forwards_agent_api_and_checks_tunnels_upstream() {
        let s = Sidecar::start_tls().await;
        let agent_id = s.fake.agent_id;

        // The agent: authenticated by coderd, GetManifest forwarded over wss with role=agent.
        let a = s
            .dial(
                "/api/v2/workspaceagents/me/rpc?version=2.10&role=agent",
                &s.fake.agent_token,
            )
            .await;
        let m: Manifest = a
            .rpc
            .invoke_unary(agent_methods::GET_MANIFEST, &GetManifestRequest {})
            .await
            .unwrap();
        assert_eq!(m.agent_id.as_ref(), agent_id.as_bytes());
        assert!(s
            .fake
            .rpc_calls()
            .iter()
            .any(|(method, role)| method == agent_methods::GET_MANIFEST && role == "agent"));
        assert_eq!(
            s.metric(
                "coordinator_upstream_rpc_dials_total",
                &[("endpoint", "agent_rpc"), ("result", "ok")]
            ),
            1.0
        );
        let mut ap = a.coordinate().await;
        let an = node(agent_id, true, 1);
        ap.update_self(an.clone()).await;

        // Desktop without `ssh` on the workspace: coderd says no, per tunnel.
        let d = s
            .dial("/api/v2/tailnet?version=2.3", &s.fake.user_token_nossh)
            .await;
        let mut dp = d.coordinate().await;
        dp.add_tunnel(agent_id).await;
        dp.expect_error("authorization: ").await;
        assert!(dp.nodes.is_empty());

        // Desktop with a second, scoped token of the `ssh` user: refused for that token.
        let d1 = s
            .dial("/api/v2/tailnet?version=2.3", &s.fake.user_token_ssh_scoped)
            .await;
        let mut dp1 = d1.coordinate().await;
        dp1.add_tunnel(agent_id).await;
        dp1.expect_error("authorization: ").await;
        assert!(dp1.nodes.is_empty());

        // Desktop with the same user's `ssh` token: the tunnel is allowed (decided per token,
        // not held back by the scoped one) and the agent's node arrives.
        let d2 = s
            .dial("/api/v2/tailnet?version=2.3", &s.fake.user_token_ssh)
            .await;
        let mut dp2 = d2.coordinate().await;
        dp2.add_tunnel(agent_id).await;
        dp2.expect_node(agent_id, &an).await;
        let dn = node(Uuid::new_v4(), false, 1);
        dp2.update_self(dn.clone()).await;
        ap.until("desktop node", |p| p.nodes.values().any(|n| *n == dn))
            .await;
    }
}
