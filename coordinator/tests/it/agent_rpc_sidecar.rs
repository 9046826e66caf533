//! End to end in sidecar mode over TLS: tailnetd with the upstream authenticator and agent-RPC
//! forwarding in front of the shared fake coderd (`tests/fake_coder`, HTTPS), a modern agent on
//! `/me/rpc` and Coder Desktop on `/api/v2/tailnet`.

/// Named after the module so that `cargo test -p coordinator agent_rpc` runs it.
mod agent_rpc {
    use coordinator::derpmap::DerpMapConfig;
    use coordinator::upstream::UpstreamConfig;
    use proto::agent::v2::{methods as agent_methods, GetManifestRequest, Manifest};
    use uuid::Uuid;

    use crate::common::node;
    use crate::fake_coder::FakeCoder;
    use crate::upstream_harness::{Sidecar, Wiring};

    /// tailnetd forwarding to the fake coderd over TLS.
    async fn start_tls() -> Sidecar {
        let (fake, cert) = FakeCoder::start_tls().await;
        let upstream = UpstreamConfig {
            url: fake.url.clone(),
            tls: Some(FakeCoder::client_tls(cert)),
            ..Default::default()
        };
        Sidecar::launch(
            fake,
            upstream,
            Wiring::ForwardStreams,
            DerpMapConfig::default(),
            |_| {},
        )
        .await
    }

    #[tokio::test]
    async fn sidecar_over_tls_forwards_agent_api_and_checks_tunnels_upstream() {
        let s = start_tls().await;
        let agent_id = s.fake.agent_id;

        // The agent: authenticated by coderd, GetManifest forwarded over wss with role=agent.
        let a = s.agent_v2().await;
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
            .v2("/api/v2/tailnet?version=2.3", &s.fake.user_token_nossh)
            .await;
        let mut dp = d.coordinate().await;
        dp.add_tunnel(agent_id).await;
        dp.expect_error("authorization: ").await;
        assert!(dp.nodes.is_empty());

        // Desktop with a second, scoped token of the `ssh` user: refused for that token.
        let d1 = s
            .v2("/api/v2/tailnet?version=2.3", &s.fake.user_token_ssh_scoped)
            .await;
        let mut dp1 = d1.coordinate().await;
        dp1.add_tunnel(agent_id).await;
        dp1.expect_error("authorization: ").await;
        assert!(dp1.nodes.is_empty());

        // Desktop with the same user's `ssh` token: the tunnel is allowed (decided per token,
        // not held back by the scoped one) and the agent's node arrives.
        let d2 = s
            .v2("/api/v2/tailnet?version=2.3", &s.fake.user_token_ssh)
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
