//! Coder's coordinator conformance cases (tailnet/test/cases.go, tailnet/coordinator_test.go)
//! against the concurrent `PeerGraph` with real queues.
/// Named `graph` so that `cargo test -p coordinator graph` selects these cases.
mod graph {

    use std::collections::HashSet;
    use std::sync::Arc;
    use std::time::Duration;

    use bytes::Bytes;
    use coordinator::authz::{
        addr_from_uuid, AllowedAgents, CoordinateeAuth, CODER_SERVICE_PREFIX, LEGACY_AGENT_IP,
        TAILSCALE_SERVICE_PREFIX,
    };
    use coordinator::graph::{
        CoordinateError, Flow, GraphConfig, PeerGraph, PeerHandle, PeerReceiver, TryRecvError,
        MAX_PEER_UPDATES_PER_RESPONSE,
    };
    use prometheus::Registry;
    use proto::tailnet::v2::coordinate_request::{
        Disconnect, ReadyForHandshake, Tunnel, UpdateSelf,
    };
    use proto::tailnet::v2::coordinate_response::peer_update::Kind;
    use proto::tailnet::v2::coordinate_response::PeerUpdate;
    use proto::tailnet::v2::{CoordinateRequest, CoordinateResponse, Node};
    use uuid::Uuid;

    fn graph_with(queue: usize) -> (Arc<PeerGraph>, Registry) {
        let reg = Registry::new();
        let g = PeerGraph::new(
            GraphConfig {
                response_queue: queue,
                ..GraphConfig::default()
            },
            &reg,
        )
        .unwrap();
        (g, reg)
    }

    fn graph() -> Arc<PeerGraph> {
        graph_with(512).0
    }

    fn node(derp: i32) -> Node {
        Node {
            id: 7,
            key: Bytes::from_static(&[b'n', b'p', 1, 2, 3]),
            disco: "discokey:00".into(),
            preferred_derp: derp,
            ..Default::default()
        }
    }

    fn node_addrs(derp: i32, addresses: &[String], allowed: &[String]) -> Node {
        Node {
            addresses: addresses.to_vec(),
            allowed_ips: allowed.to_vec(),
            ..node(derp)
        }
    }

    fn upd(n: Node) -> CoordinateRequest {
        CoordinateRequest {
            update_self: Some(UpdateSelf { node: Some(n) }),
            ..Default::default()
        }
    }

    fn add(id: Uuid) -> CoordinateRequest {
        CoordinateRequest {
            add_tunnel: Some(Tunnel {
                id: Bytes::copy_from_slice(id.as_bytes()),
            }),
            ..Default::default()
        }
    }

    fn remove(id: Uuid) -> CoordinateRequest {
        CoordinateRequest {
            remove_tunnel: Some(Tunnel {
                id: Bytes::copy_from_slice(id.as_bytes()),
            }),
            ..Default::default()
        }
    }

    fn disconnect() -> CoordinateRequest {
        CoordinateRequest {
            disconnect: Some(Disconnect {}),
            ..Default::default()
        }
    }

    fn rfh(ids: &[Uuid]) -> CoordinateRequest {
        CoordinateRequest {
            ready_for_handshake: ids
                .iter()
                .map(|i| ReadyForHandshake {
                    id: Bytes::copy_from_slice(i.as_bytes()),
                })
                .collect(),
            ..Default::default()
        }
    }

    struct Peer {
        id: Uuid,
        h: Option<PeerHandle>,
        rx: PeerReceiver,
        g: Arc<PeerGraph>,
    }

    impl Peer {
        fn new(g: &Arc<PeerGraph>, id: Uuid, auth: CoordinateeAuth) -> Self {
            let (h, rx) = g.connect(id, format!("peer-{id}"), auth);
            Self {
                id,
                h: Some(h),
                rx,
                g: g.clone(),
            }
        }

        fn single(g: &Arc<PeerGraph>) -> Self {
            Self::new(g, Uuid::new_v4(), CoordinateeAuth::SingleTailnet)
        }

        fn send(&self, req: CoordinateRequest) -> Result<Flow, CoordinateError> {
            self.g.handle(self.h.as_ref().unwrap(), req)
        }

        fn ok(&self, req: CoordinateRequest) {
            assert_eq!(self.send(req), Ok(Flow::Continue));
        }

        /// Everything queued right now; `ended` says whether the stream has ended after it.
        fn drain(&mut self) -> (Vec<CoordinateResponse>, bool) {
            let mut out = Vec::new();
            loop {
                match self.rx.try_recv() {
                    Ok(r) => out.push(r),
                    Err(TryRecvError::Empty) => return (out, false),
                    Err(TryRecvError::Ended) => return (out, true),
                }
            }
        }

        /// All queued peer updates; asserts no error and stream still open.
        fn updates(&mut self) -> Vec<PeerUpdate> {
            let (resps, ended) = self.drain();
            assert!(!ended, "stream ended unexpectedly");
            resps
                .into_iter()
                .flat_map(|r| {
                    assert_eq!(r.error, "", "unexpected error");
                    r.peer_updates
                })
                .collect()
        }

        fn assert_nothing(&mut self) {
            assert_eq!(self.updates(), vec![]);
        }

        /// Asserts the stream ended, with exactly `error` (or no error) as its last message.
        fn assert_closed(&mut self, error: Option<&str>) {
            let (resps, ended) = self.drain();
            assert!(ended, "stream still open: {resps:?}");
            let errors: Vec<&str> = resps
                .iter()
                .filter(|r| !r.error.is_empty())
                .map(|r| r.error.as_str())
                .collect();
            match error {
                Some(e) => assert_eq!(errors, vec![e]),
                None => assert!(errors.is_empty(), "{errors:?}"),
            }
        }

        fn close(&mut self) {
            self.h = None;
        }
    }

    fn one(updates: Vec<PeerUpdate>) -> PeerUpdate {
        assert_eq!(updates.len(), 1, "{updates:?}");
        updates.into_iter().next().unwrap()
    }

    fn assert_update(u: &PeerUpdate, about: Uuid, kind: Kind, reason: &str) {
        assert_eq!(u.id.as_ref(), about.as_bytes());
        assert_eq!(u.kind, kind as i32, "{u:?}");
        assert_eq!(u.reason, reason);
    }

    fn assert_node(updates: Vec<PeerUpdate>, about: Uuid, derp: i32) {
        let u = one(updates);
        assert_eq!(u.id.as_ref(), about.as_bytes());
        assert_eq!(u.kind, Kind::Node as i32);
        assert_eq!(u.node.as_ref().map(|n| n.preferred_derp), Some(derp));
    }

    fn agent_addr(id: Uuid) -> String {
        format!("{}/128", addr_from_uuid(TAILSCALE_SERVICE_PREFIX, id))
    }

    fn metric(reg: &Registry, name: &str, label: Option<(&str, &str)>) -> f64 {
        let mut total = 0.0;
        for mf in reg.gather() {
            if mf.name() != name {
                continue;
            }
            for m in mf.get_metric() {
                let ok = match label {
                    None => true,
                    Some((k, v)) => m
                        .get_label()
                        .iter()
                        .any(|l| l.name() == k && l.value() == v),
                };
                if ok {
                    total += m.get_counter().get_value() + m.get_gauge().get_value();
                }
            }
        }
        total
    }

    /// p1 tunnels to p2, both set DERP, p2 disconnects ⇒ p1 sees DISCONNECTED, p2's stream ends with
    /// no error.
    #[test]
    fn graceful_disconnect() {
        let g = graph();
        let mut p1 = Peer::single(&g);
        let mut p2 = Peer::single(&g);
        p1.ok(add(p2.id));
        p1.ok(upd(node(1)));
        p2.ok(upd(node(2)));
        assert_node(p1.updates(), p2.id, 2);
        assert_node(p2.updates(), p1.id, 1);
        assert_eq!(p2.send(disconnect()), Ok(Flow::Close));
        let u = one(p1.updates());
        assert_update(&u, p2.id, Kind::Disconnected, "graceful disconnect");
        p2.assert_closed(None);
        // The tunnel where p2 is the destination survives; dropping p2's handle now is a no-op.
        assert_eq!(g.tunnel_count(), 1);
        p2.close();
        p1.assert_nothing();
        assert_eq!(g.peer_count(), 1);
    }

    /// p2's connection goes away without disconnect ⇒ p1 sees LOST.
    #[test]
    fn lost() {
        let g = graph();
        let mut p1 = Peer::single(&g);
        let mut p2 = Peer::single(&g);
        p1.ok(add(p2.id));
        p1.ok(upd(node(1)));
        p2.ok(upd(node(2)));
        p1.updates();
        p2.updates();
        p2.close();
        assert_update(&one(p1.updates()), p2.id, Kind::Lost, "lost");
        p2.assert_closed(None);
        assert_eq!(g.peer_count(), 1);
    }

    #[test]
    fn bidirectional_tunnels() {
        let g = graph();
        let mut p1 = Peer::single(&g);
        let mut p2 = Peer::single(&g);
        p1.ok(add(p2.id));
        p2.ok(add(p1.id));
        assert_eq!(g.tunnel_count(), 2);
        p1.ok(upd(node(1)));
        p2.ok(upd(node(2)));
        assert_node(p1.updates(), p2.id, 2);
        assert_node(p2.updates(), p1.id, 1);
        p1.ok(upd(node(3)));
        assert_node(p2.updates(), p1.id, 3);
        p1.assert_nothing();
    }

    /// p2 acks p1 ⇒ p1 sees READY_FOR_HANDSHAKE from p2.
    #[test]
    fn ready_for_handshake() {
        let g = graph();
        let mut p1 = Peer::single(&g);
        let mut p2 = Peer::single(&g);
        p1.ok(add(p2.id));
        p1.ok(upd(node(1)));
        p2.ok(upd(node(2)));
        p1.updates();
        p2.updates();
        p2.ok(rfh(&[p1.id]));
        let u = one(p1.updates());
        assert_update(&u, p2.id, Kind::ReadyForHandshake, "");
        assert!(u.node.is_none());
        p2.assert_nothing();
    }

    #[test]
    fn ready_for_handshake_no_permission() {
        let g = graph();
        let mut p1 = Peer::single(&g);
        let mut p2 = Peer::single(&g);
        p1.ok(upd(node(1)));
        p2.ok(upd(node(2)));
        p2.ok(rfh(&[p1.id]));
        let (resps, ended) = p2.drain();
        assert!(!ended);
        assert_eq!(resps.len(), 1);
        assert_eq!(
            resps[0].error,
            format!(
                "ready for handshake error: you do not share a tunnel with \"{}\"",
                p1.id
            )
        );
        p1.assert_nothing();
        // Non-fatal.
        assert_eq!(g.peer_count(), 2);
    }

    #[test]
    fn client_without_agent() {
        let g = graph();
        let agent = Uuid::new_v4();
        let mut c = Peer::new(
            &g,
            Uuid::new_v4(),
            CoordinateeAuth::Client { agent_id: agent },
        );
        c.ok(add(agent));
        c.ok(upd(node(1)));
        c.assert_nothing();
        assert_eq!(g.tunnel_count(), 1);
        assert_eq!(g.node(c.id).map(|n| n.preferred_derp), Some(1));
        c.close();
        assert_eq!(g.peer_count(), 0);
        assert_eq!(g.node(c.id), None);
    }

    #[test]
    fn agent_without_clients() {
        let g = graph();
        let id = Uuid::new_v4();
        let mut a = Peer::new(&g, id, CoordinateeAuth::Agent { id });
        a.ok(upd(node_addrs(1, &[agent_addr(id)], &[agent_addr(id)])));
        a.assert_nothing();
        assert_eq!(g.node(id).map(|n| n.preferred_derp), Some(1));
    }

    #[test]
    fn agent_with_client() {
        let g = graph();
        let aid = Uuid::new_v4();
        let mut a = Peer::new(&g, aid, CoordinateeAuth::Agent { id: aid });
        a.ok(upd(node_addrs(1, &[agent_addr(aid)], &[])));
        let mut c = Peer::new(
            &g,
            Uuid::new_v4(),
            CoordinateeAuth::Client { agent_id: aid },
        );
        c.assert_nothing();
        c.ok(add(aid));
        assert_node(c.updates(), aid, 1);
        a.assert_nothing();
        c.ok(upd(node(5)));
        assert_node(a.updates(), c.id, 5);
        a.ok(upd(node_addrs(2, &[agent_addr(aid)], &[])));
        assert_node(c.updates(), aid, 2);
        // Agent reconnects: init batch carries the client's node (client → agent survives).
        a.close();
        assert_update(&one(c.updates()), aid, Kind::Lost, "lost");
        let mut a2 = Peer::new(&g, aid, CoordinateeAuth::Agent { id: aid });
        let u = one(a2.updates());
        assert_update(&u, c.id, Kind::Node, "init");
        a2.ok(upd(node_addrs(3, &[agent_addr(aid)], &[])));
        assert_node(c.updates(), aid, 3);
        // Client leaves ⇒ agent sees LOST.
        c.close();
        assert_update(&one(a2.updates()), c.id, Kind::Lost, "lost");
    }

    /// Same id connects twice: the old stream gets the overwrite error and ends; the new one keeps
    /// working; dropping the old handle later does not mark the new one lost.
    #[test]
    fn agent_double_connect() {
        let g = graph();
        let aid = Uuid::new_v4();
        let mut a1 = Peer::new(&g, aid, CoordinateeAuth::Agent { id: aid });
        a1.ok(upd(node_addrs(1, &[agent_addr(aid)], &[])));
        let mut c = Peer::new(
            &g,
            Uuid::new_v4(),
            CoordinateeAuth::Client { agent_id: aid },
        );
        c.ok(add(aid));
        c.ok(upd(node(5)));
        assert_node(c.updates(), aid, 1);
        assert_node(a1.updates(), c.id, 5);

        let mut a2 = Peer::new(&g, aid, CoordinateeAuth::Agent { id: aid });
        a1.assert_closed(Some("peer ID overwritten by new connection"));
        let u = one(a2.updates());
        assert_update(&u, c.id, Kind::Node, "init");
        c.assert_nothing();
        // Requests on the replaced connection are ignored.
        assert_eq!(a1.send(upd(node(9))), Ok(Flow::Close));
        a1.close();
        c.assert_nothing();
        assert_eq!(g.peer_count(), 2);
        a2.ok(upd(node_addrs(2, &[agent_addr(aid)], &[])));
        assert_node(c.updates(), aid, 2);
    }

    #[test]
    fn invalid_client_address_bits() {
        let (g, reg) = graph_with(512);
        let aid = Uuid::new_v4();
        let mut c = Peer::new(
            &g,
            Uuid::new_v4(),
            CoordinateeAuth::Client { agent_id: aid },
        );
        let r = c.send(upd(node_addrs(1, &["fd7a:115c:a1e0::1/64".into()], &[])));
        assert!(matches!(r, Err(CoordinateError::Authz(_))), "{r:?}");
        c.assert_closed(Some(
            "authorization: invalid address bits, expected 128, got 64",
        ));
        assert_eq!(g.peer_count(), 0);
        assert_eq!(metric(&reg, "coordinator_authz_failures_total", None), 1.0);
        assert_eq!(
            metric(
                &reg,
                "coordinator_peers_kicked_total",
                Some(("reason", "invalid_request"))
            ),
            1.0
        );
    }

    #[test]
    fn invalid_agent_addresses() {
        let g = graph();
        let aid = Uuid::new_v4();
        let wrong = format!(
            "{}/128",
            addr_from_uuid(TAILSCALE_SERVICE_PREFIX, Uuid::new_v4())
        );
        let wrong_addr = wrong.trim_end_matches("/128").to_owned();
        let cases: Vec<(Node, String)> = vec![
            (
                node_addrs(1, std::slice::from_ref(&wrong), &[]),
                format!("authorization: Addresses: invalid node address, got {wrong_addr}"),
            ),
            (
                node_addrs(1, &[agent_addr(aid)], std::slice::from_ref(&wrong)),
                format!("authorization: AllowedIps: invalid node address, got {wrong_addr}"),
            ),
            (
                node_addrs(
                    1,
                    &[agent_addr(aid).replace("/128", "/64")],
                    &[agent_addr(aid)],
                ),
                "authorization: Addresses: invalid address bits, expected 128, got 64".into(),
            ),
            (
                node_addrs(1, &[], &[agent_addr(aid).replace("/128", "/127")]),
                "authorization: AllowedIps: invalid address bits, expected 128, got 127".into(),
            ),
        ];
        for (n, want) in cases {
            let mut a = Peer::new(&g, aid, CoordinateeAuth::Agent { id: aid });
            assert!(a.send(upd(n)).is_err());
            a.assert_closed(Some(&want));
            assert_eq!(g.peer_count(), 0);
        }
        // All three accepted forms.
        let a = Peer::new(&g, aid, CoordinateeAuth::Agent { id: aid });
        let coder = format!("{}/128", addr_from_uuid(CODER_SERVICE_PREFIX, aid));
        let legacy = format!("{LEGACY_AGENT_IP}/128");
        a.ok(upd(node_addrs(
            1,
            &[agent_addr(aid), coder.clone(), legacy.clone()],
            &[agent_addr(aid), coder, legacy],
        )));
    }

    #[test]
    fn agents_cannot_add_tunnels() {
        let g = graph();
        let aid = Uuid::new_v4();
        let mut a = Peer::new(&g, aid, CoordinateeAuth::Agent { id: aid });
        assert!(a.send(add(Uuid::new_v4())).is_err());
        a.assert_closed(Some("authorization: agents cannot open tunnels"));
        assert_eq!(g.tunnel_count(), 0);
    }

    #[test]
    fn clients_cannot_ready_for_handshake() {
        let g = graph();
        let aid = Uuid::new_v4();
        let mut c = Peer::new(
            &g,
            Uuid::new_v4(),
            CoordinateeAuth::Client { agent_id: aid },
        );
        c.ok(add(aid));
        assert!(c.send(rfh(&[aid])).is_err());
        c.assert_closed(Some(
            "authorization: clients may not send ready_for_handshake",
        ));
    }

    #[test]
    fn client_wrong_agent_and_client_user() {
        let g = graph();
        let aid = Uuid::new_v4();
        let other = Uuid::new_v4();
        let mut c = Peer::new(
            &g,
            Uuid::new_v4(),
            CoordinateeAuth::Client { agent_id: aid },
        );
        assert!(c.send(add(other)).is_err());
        c.assert_closed(Some(&format!(
            "authorization: invalid agent id, expected {aid}, got {other}"
        )));

        let perms = Arc::new(AllowedAgents::new());
        perms.allow(aid);
        let mut u = Peer::new(
            &g,
            Uuid::new_v4(),
            CoordinateeAuth::ClientUser {
                permissions: perms.clone(),
            },
        );
        u.ok(add(aid));
        assert!(u.send(add(other)).is_err());
        u.assert_closed(Some(
            "authorization: workspace agent not found or you do not have permission",
        ));
    }

    /// Authorization covers the whole request: nothing of a refused request is applied.
    #[test]
    fn refused_request_applies_nothing() {
        let g = graph();
        let aid = Uuid::new_v4();
        let mut a = Peer::new(&g, aid, CoordinateeAuth::Agent { id: aid });
        let mut c = Peer::new(
            &g,
            Uuid::new_v4(),
            CoordinateeAuth::Client { agent_id: aid },
        );
        c.ok(add(aid));
        let mut req = upd(node(1));
        req.add_tunnel = Some(Tunnel {
            id: Bytes::copy_from_slice(Uuid::new_v4().as_bytes()),
        });
        assert!(a.send(req).is_err());
        a.assert_closed(Some("authorization: agents cannot open tunnels"));
        c.assert_nothing();
        assert_eq!(g.node(aid), None);
    }

    #[test]
    fn update_self_without_node_is_fatal() {
        let g = graph();
        let mut p = Peer::single(&g);
        let r = p.send(CoordinateRequest {
            update_self: Some(UpdateSelf { node: None }),
            ..Default::default()
        });
        assert_eq!(r, Err(CoordinateError::MissingNode));
        p.assert_closed(Some("node update failed: update_self without a node"));
        assert_eq!(g.peer_count(), 0);
    }

    #[test]
    fn bad_uuid_is_fatal() {
        let g = graph();
        for req in [
            CoordinateRequest {
                add_tunnel: Some(Tunnel {
                    id: Bytes::from_static(&[1, 2, 3]),
                }),
                ..Default::default()
            },
            CoordinateRequest {
                remove_tunnel: Some(Tunnel {
                    id: Bytes::from_static(&[1; 17]),
                }),
                ..Default::default()
            },
            CoordinateRequest {
                ready_for_handshake: vec![ReadyForHandshake { id: Bytes::new() }],
                ..Default::default()
            },
        ] {
            let mut p = Peer::single(&g);
            let n = match &req {
                r if r.add_tunnel.is_some() => 3,
                r if r.remove_tunnel.is_some() => 17,
                _ => 0,
            };
            assert_eq!(p.send(req), Err(CoordinateError::BadUuid(n)));
            p.assert_closed(Some(&format!(
                "unable to convert bytes to UUID: invalid UUID (got {n} bytes)"
            )));
        }
        assert_eq!(g.peer_count(), 0);
        assert_eq!(g.tunnel_count(), 0);
    }

    #[test]
    fn node_updates_are_deduplicated() {
        let g = graph();
        let mut p1 = Peer::single(&g);
        let mut p2 = Peer::single(&g);
        p1.ok(add(p2.id));
        p2.ok(upd(node(2)));
        assert_node(p1.updates(), p2.id, 2);
        p2.ok(upd(node(2)));
        p1.assert_nothing();
        // Re-adding the tunnel does not resend an unchanged node either.
        p1.ok(add(p2.id));
        p1.assert_nothing();
        p2.ok(upd(node(3)));
        assert_node(p1.updates(), p2.id, 3);
        // p1 never sent a node, so p2 was never told anything.
        p2.assert_nothing();
    }

    #[test]
    fn lost_and_disconnected_only_if_announced() {
        let g = graph();
        let mut p1 = Peer::single(&g);
        let mut p2 = Peer::single(&g);
        let mut p3 = Peer::single(&g);
        p1.ok(add(p2.id));
        p1.ok(add(p3.id));
        p1.ok(upd(node(1)));
        p2.updates();
        p3.updates();
        // p2 never sent a node: p1 has nothing to forget.
        assert_eq!(p2.send(disconnect()), Ok(Flow::Close));
        p1.assert_nothing();
        p3.close();
        p1.assert_nothing();
        // remove_tunnel: p1 was announced to p4 and vice versa ⇒ both see DISCONNECTED.
        let mut p4 = Peer::single(&g);
        p4.ok(upd(node(4)));
        p1.ok(add(p4.id));
        assert_node(p1.updates(), p4.id, 4);
        assert_node(p4.updates(), p1.id, 1);
        p1.ok(remove(p4.id));
        assert_update(
            &one(p1.updates()),
            p4.id,
            Kind::Disconnected,
            "remove tunnel",
        );
        assert_update(
            &one(p4.updates()),
            p1.id,
            Kind::Disconnected,
            "remove tunnel",
        );
        // A second remove says nothing new.
        p1.ok(remove(p4.id));
        p1.assert_nothing();
        p4.assert_nothing();
    }

    #[test]
    fn tunnels_to_absent_peers_are_remembered() {
        let g = graph();
        let mut p1 = Peer::single(&g);
        let p2id = Uuid::new_v4();
        p1.ok(upd(node(1)));
        p1.ok(add(p2id));
        let mut p2 = Peer::new(&g, p2id, CoordinateeAuth::SingleTailnet);
        assert_update(&one(p2.updates()), p1.id, Kind::Node, "init");
        p2.ok(upd(node(2)));
        assert_node(p1.updates(), p2id, 2);
    }

    /// A peer that never reads is removed when its queue fills; everyone else keeps getting updates.
    #[test]
    fn slow_peer_is_kicked() {
        let (g, reg) = graph_with(4);
        let aid = Uuid::new_v4();
        let mut a = Peer::new(&g, aid, CoordinateeAuth::Agent { id: aid });
        let mut slow = Peer::new(
            &g,
            Uuid::new_v4(),
            CoordinateeAuth::Client { agent_id: aid },
        );
        let mut fast = Peer::new(
            &g,
            Uuid::new_v4(),
            CoordinateeAuth::Client { agent_id: aid },
        );
        slow.ok(add(aid));
        fast.ok(add(aid));
        slow.ok(upd(node(100)));
        fast.ok(upd(node(200)));
        assert_eq!(a.updates().len(), 2);
        for derp in 1..=10 {
            a.ok(upd(node_addrs(derp, &[agent_addr(aid)], &[])));
            assert_node(fast.updates(), aid, derp);
            if derp == 5 {
                // The 5th update overflowed the slow client's 4-deep queue.
                let u = one(a.updates());
                assert_update(&u, slow.id, Kind::Disconnected, "failed update");
            }
        }
        a.assert_nothing();
        slow.assert_closed(None);
        assert_eq!(g.peer_count(), 2);
        assert_eq!(
            metric(
                &reg,
                "coordinator_peers_kicked_total",
                Some(("reason", "queue_full"))
            ),
            1.0
        );
        // The kicked client's later requests are ignored; dropping it changes nothing.
        assert_eq!(slow.send(upd(node(1))), Ok(Flow::Close));
        slow.close();
        a.assert_nothing();
    }

    /// 2,500 tunnel peers ⇒ the init batch arrives as 1024 + 1024 + 452.
    #[test]
    fn init_batch_is_chunked() {
        let g = graph();
        let target = Uuid::new_v4();
        let mut peers = Vec::new();
        for i in 0..2500 {
            let p = Peer::single(&g);
            p.ok(upd(node(i)));
            p.ok(add(target));
            peers.push(p);
        }
        let mut t = Peer::new(&g, target, CoordinateeAuth::SingleTailnet);
        let (resps, ended) = t.drain();
        assert!(!ended);
        let sizes: Vec<usize> = resps.iter().map(|r| r.peer_updates.len()).collect();
        assert_eq!(sizes, vec![1024, 1024, 452]);
        assert!(sizes.iter().all(|s| *s <= MAX_PEER_UPDATES_PER_RESPONSE));
        let ids: HashSet<Vec<u8>> = resps
            .iter()
            .flat_map(|r| r.peer_updates.iter().map(|u| u.id.to_vec()))
            .collect();
        assert_eq!(ids.len(), 2500);
    }

    #[test]
    fn shutdown_closes_everyone_as_lost() {
        let g = graph();
        let mut p1 = Peer::single(&g);
        let mut p2 = Peer::single(&g);
        p1.ok(add(p2.id));
        p1.ok(upd(node(1)));
        p2.ok(upd(node(2)));
        g.shutdown();
        p1.assert_closed(Some("coordinator closed"));
        p2.assert_closed(Some("coordinator closed"));
        assert_eq!(g.peer_count(), 0);
        let mut p3 = Peer::single(&g);
        p3.assert_closed(Some("coordinator closed"));
        assert_eq!(p3.send(upd(node(3))), Ok(Flow::Close));
    }

    /// Async receive: a waiting receiver is woken by an update and by the end of the stream.
    #[tokio::test]
    async fn receiver_wakes_and_ends() {
        let g = graph();
        let p1 = Peer::single(&g);
        let Peer {
            id: id2,
            h: h2,
            mut rx,
            ..
        } = Peer::single(&g);
        p1.ok(upd(node(1)));
        p1.ok(add(id2));
        let first = tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(first.peer_updates.len(), 1);
        let waiter = tokio::spawn(async move { rx.recv().await });
        tokio::task::yield_now().await;
        assert_eq!(
            g.handle(h2.as_ref().unwrap(), disconnect()),
            Ok(Flow::Close)
        );
        let end = tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(end, None);
        let _ = id2;
    }

    /// 1,000 clients tunnel to one agent concurrently: the agent's update reaches all of them and
    /// every client's update reaches the agent.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn fan_out_thousand_clients() {
        const N: usize = 1000;
        let (g, _reg) = graph_with(4096);
        let aid = Uuid::new_v4();
        let (ah, mut arx) = g.connect(aid, "agent".into(), CoordinateeAuth::Agent { id: aid });
        g.handle(&ah, upd(node_addrs(1, &[agent_addr(aid)], &[])))
            .unwrap();

        let reader = tokio::spawn(async move {
            let mut seen = HashSet::new();
            while seen.len() < N {
                let Some(r) = arx.recv().await else { break };
                for u in r.peer_updates {
                    if u.kind == Kind::Node as i32 {
                        seen.insert(u.id.to_vec());
                    }
                }
            }
            (seen.len(), arx)
        });

        let mut tasks = Vec::new();
        for _ in 0..N {
            let g = g.clone();
            tasks.push(tokio::spawn(async move {
                let id = Uuid::new_v4();
                let (h, mut rx) =
                    g.connect(id, "c".into(), CoordinateeAuth::Client { agent_id: aid });
                g.handle(&h, add(aid)).unwrap();
                g.handle(&h, upd(node(7))).unwrap();
                // First: the agent's node with DERP 1 (from add_tunnel).
                let r = rx.recv().await.unwrap();
                assert_eq!(r.peer_updates[0].node.as_ref().unwrap().preferred_derp, 1);
                (h, rx)
            }));
        }
        let mut clients = Vec::new();
        for t in tasks {
            clients.push(t.await.unwrap());
        }
        let (seen, _arx) = tokio::time::timeout(Duration::from_secs(30), reader)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(seen, N);
        assert_eq!(g.peer_count(), N + 1);
        assert_eq!(g.tunnel_count(), N);

        g.handle(&ah, upd(node_addrs(2, &[agent_addr(aid)], &[])))
            .unwrap();
        for (_, rx) in clients.iter_mut() {
            let r = tokio::time::timeout(Duration::from_secs(5), rx.recv())
                .await
                .unwrap()
                .unwrap();
            assert_eq!(r.peer_updates.len(), 1);
            assert_eq!(r.peer_updates[0].node.as_ref().unwrap().preferred_derp, 2);
        }
        drop(clients);
        assert_eq!(g.peer_count(), 1);
        drop(ah);
        assert_eq!(g.peer_count(), 0);
    }

    #[test]
    fn metrics_track_the_graph() {
        let (g, reg) = graph_with(512);
        let aid = Uuid::new_v4();
        let a = Peer::new(&g, aid, CoordinateeAuth::Agent { id: aid });
        let mut c = Peer::new(
            &g,
            Uuid::new_v4(),
            CoordinateeAuth::Client { agent_id: aid },
        );
        let o = Peer::single(&g);
        c.ok(add(aid));
        c.ok(upd(node(1)));
        a.ok(upd(node_addrs(2, &[agent_addr(aid)], &[])));
        assert_node(c.updates(), aid, 2);
        let m = |name, label| metric(&reg, name, label);
        assert_eq!(m("coordinator_peers", Some(("role", "agent"))), 1.0);
        assert_eq!(m("coordinator_peers", Some(("role", "client"))), 1.0);
        assert_eq!(m("coordinator_peers", Some(("role", "other"))), 1.0);
        assert_eq!(m("coordinator_tunnels", None), 1.0);
        assert_eq!(m("coordinator_node_updates_received_total", None), 2.0);
        assert_eq!(m("coordinator_peer_updates_sent_total", None), 2.0);
        drop((a, c, o));
        assert_eq!(m("coordinator_peers", None), 0.0);
        assert_eq!(m("coordinator_tunnels", None), 0.0);
        assert_eq!(m("coordinator_peers_kicked_total", None), 0.0);
    }

    /// Checks the ordering rules on one receiver's stream as it arrives. Nodes are stamped
    /// `id = connection epoch of their peer`, `preferred_derp = a counter that only grows per peer`
    /// (across that peer's connections).
    #[derive(Default)]
    struct Checker {
        /// What the receiver holds: peer → last NODE (LOST/DISCONNECTED clear).
        view: std::collections::HashMap<Uuid, Node>,
        /// Counter of the last NODE about each peer.
        last: std::collections::HashMap<Uuid, i32>,
        /// Peers with a LOST/DISCONNECTED since their last NODE (a re-sent node may repeat).
        gone_since: HashSet<Uuid>,
        /// Highest epoch of each peer whose connection is known (from LOST/DISCONNECTED) to have
        /// ended.
        dead_epoch: std::collections::HashMap<Uuid, i64>,
        ended: bool,
    }

    impl Checker {
        fn drain(&mut self, who: Uuid, rx: &mut PeerReceiver) {
            loop {
                match rx.try_recv() {
                    Ok(r) => self.apply(who, r),
                    Err(TryRecvError::Empty) => return,
                    Err(TryRecvError::Ended) => {
                        self.ended = true;
                        // Nothing after the end, ever.
                        assert_eq!(rx.try_recv(), Err(TryRecvError::Ended));
                        return;
                    }
                }
            }
        }

        fn apply(&mut self, who: Uuid, r: CoordinateResponse) {
            assert!(!self.ended, "{who}: response after the stream ended");
            assert!(
                r.error.is_empty() || r.error.starts_with("ready for handshake error"),
                "{who}: unexpected error {:?}",
                r.error
            );
            assert!(r.peer_updates.len() <= MAX_PEER_UPDATES_PER_RESPONSE);
            for u in r.peer_updates {
                let x = Uuid::from_slice(&u.id).unwrap();
                match Kind::try_from(u.kind).unwrap() {
                    Kind::Node => {
                        let n = u.node.unwrap();
                        let (epoch, count) = (n.id, n.preferred_derp);
                        assert_ne!(self.view.get(&x), Some(&n), "{who}: duplicate NODE of {x}");
                        if let Some(last) = self.last.get(&x) {
                            if self.gone_since.contains(&x) {
                                assert!(count >= *last, "{who}: older node of {x} after newer");
                            } else {
                                assert!(count > *last, "{who}: older node of {x} after newer");
                            }
                        }
                        if let Some(dead) = self.dead_epoch.get(&x) {
                            assert!(
                                epoch > *dead,
                                "{who}: NODE of {x} (epoch {epoch}) after LOST/DISCONNECTED \
                                 ended epoch {dead}"
                            );
                        }
                        self.last.insert(x, count);
                        self.gone_since.remove(&x);
                        self.view.insert(x, n);
                    }
                    Kind::Lost | Kind::Disconnected => {
                        assert!(u.node.is_none());
                        let held = self.view.remove(&x).unwrap_or_else(|| {
                            panic!("{who}: {} about {x}, never announced", u.reason)
                        });
                        self.gone_since.insert(x);
                        if u.reason != "remove tunnel" {
                            // That connection of x (epoch >= the node we held) is over.
                            let d = self.dead_epoch.entry(x).or_insert(held.id);
                            *d = (*d).max(held.id);
                        }
                    }
                    Kind::ReadyForHandshake => assert!(u.node.is_none()),
                    Kind::Unspecified => panic!("{who}: unspecified update"),
                }
            }
        }
    }

    /// One peer id and its owner's knowledge of it.
    struct Owned {
        id: Uuid,
        epoch: i64,
        count: i32,
        last: Option<Node>,
        live: Option<(PeerHandle, PeerReceiver, Checker)>,
        /// Tunnels from this peer (clients only).
        tunnels: HashSet<Uuid>,
    }

    impl Owned {
        fn new(id: Uuid) -> Self {
            Self {
                id,
                epoch: 0,
                count: 0,
                last: None,
                live: None,
                tunnels: HashSet::new(),
            }
        }

        /// Connects (replacing a live connection: its tunnels survive).
        fn connect(&mut self, g: &Arc<PeerGraph>) -> Option<(PeerHandle, PeerReceiver, Checker)> {
            self.epoch += 1;
            let (h, rx) = g.connect(self.id, "p".into(), CoordinateeAuth::SingleTailnet);
            if self.live.is_none() {
                self.tunnels.clear();
            }
            self.last = None;
            self.live.replace((h, rx, Checker::default()))
        }

        fn send(&mut self, g: &Arc<PeerGraph>, req: CoordinateRequest) {
            let (h, rx, c) = self.live.as_mut().unwrap();
            let flow = g.handle(h, req).unwrap();
            assert_eq!(flow, Flow::Continue);
            c.drain(self.id, rx);
        }

        fn update(&mut self, g: &Arc<PeerGraph>) {
            self.count += 1;
            let n = Node {
                id: self.epoch,
                preferred_derp: self.count,
                ..node(0)
            };
            self.last = Some(n.clone());
            self.send(g, upd(n));
        }

        fn drain(&mut self) {
            if let Some((_, rx, c)) = self.live.as_mut() {
                c.drain(self.id, rx);
            }
        }

        /// Ends the live connection: graceful `disconnect` or a dropped handle (LOST).
        fn leave(&mut self, g: &Arc<PeerGraph>, graceful: bool) {
            if let Some((h, mut rx, mut c)) = self.live.take() {
                if graceful {
                    assert_eq!(g.handle(&h, disconnect()), Ok(Flow::Close));
                }
                drop(h);
                c.drain(self.id, &mut rx);
                assert!(c.ended, "stream of {} did not end", self.id);
            }
            self.tunnels.clear();
            self.last = None;
        }

        /// Agents answer every NODE they were sent with READY_FOR_HANDSHAKE, like Coder's agents.
        fn ack_nodes(&mut self, g: &Arc<PeerGraph>) {
            let Some((h, rx, c)) = self.live.as_mut() else {
                return;
            };
            let before: HashSet<(Uuid, i32)> =
                c.view.iter().map(|(k, v)| (*k, v.preferred_derp)).collect();
            c.drain(self.id, rx);
            let fresh: Vec<Uuid> = c
                .view
                .iter()
                .filter(|(k, v)| !before.contains(&(**k, v.preferred_derp)))
                .map(|(k, _)| *k)
                .collect();
            if !fresh.is_empty() {
                assert_eq!(g.handle(h, rfh(&fresh)), Ok(Flow::Continue));
                c.drain(self.id, rx);
            }
        }
    }

    /// Agents and clients on several threads update nodes, add and remove tunnels, acknowledge
    /// with READY_FOR_HANDSHAKE, reconnect (replacing), disconnect and drop, all at once. Every
    /// receiver checks the ordering rules on its stream as it arrives (no older node after a newer
    /// one, no NODE after the LOST/DISCONNECTED that ended that connection, LOST/DISCONNECTED only
    /// about announced peers, no duplicate NODE, nothing after the end). Once quiet, and again after
    /// one last update from every live peer, every live receiver's view is exactly what the graph
    /// says: the latest node of each live tunnel peer that has one, and nobody else.
    fn concurrent_churn(shards: usize, seed: u64) {
        use rand::{Rng, SeedableRng};
        const AGENTS: usize = 4;
        const THREADS: usize = 3;
        const CLIENTS_PER_THREAD: usize = 6;
        const ROUNDS: usize = 1500;

        let reg = Registry::new();
        let g = PeerGraph::with_shards(
            GraphConfig {
                response_queue: 1 << 16,
                ..GraphConfig::default()
            },
            shards,
            &reg,
        )
        .unwrap();
        let agent_ids: Vec<Uuid> = (0..AGENTS).map(|_| Uuid::new_v4()).collect();

        let agent_thread = {
            let g = g.clone();
            let agent_ids = agent_ids.clone();
            std::thread::spawn(move || {
                let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
                let mut agents: Vec<Owned> = agent_ids.iter().map(|id| Owned::new(*id)).collect();
                for a in agents.iter_mut() {
                    a.connect(&g);
                    a.update(&g);
                }
                for _ in 0..ROUNDS {
                    for a in agents.iter_mut() {
                        match rng.gen_range(0..100) {
                            0..=1 => {
                                // Replace; dropping the old handle afterwards is a no-op.
                                let old = a.connect(&g);
                                drop(old);
                            }
                            2 => a.leave(&g, true),
                            3 => a.leave(&g, false),
                            _ => {}
                        }
                        if a.live.is_none() {
                            if rng.gen_range(0..4) == 0 {
                                a.connect(&g);
                            } else {
                                continue;
                            }
                        }
                        a.update(&g);
                        a.ack_nodes(&g);
                    }
                }
                agents
            })
        };

        let mut threads = Vec::new();
        for t in 0..THREADS {
            let g = g.clone();
            let agent_ids = agent_ids.clone();
            threads.push(std::thread::spawn(move || {
                let mut rng = rand::rngs::StdRng::seed_from_u64(seed + 1 + t as u64);
                let mut clients: Vec<Owned> = (0..CLIENTS_PER_THREAD)
                    .map(|_| Owned::new(Uuid::new_v4()))
                    .collect();
                for c in clients.iter_mut() {
                    c.connect(&g);
                }
                for _ in 0..ROUNDS {
                    for c in clients.iter_mut() {
                        if c.live.is_none() {
                            if rng.gen_range(0..3) == 0 {
                                c.connect(&g);
                            }
                            continue;
                        }
                        let agent = agent_ids[rng.gen_range(0..AGENTS)];
                        match rng.gen_range(0..100) {
                            0..=49 => c.update(&g),
                            50..=61 => {
                                c.send(&g, add(agent));
                                c.tunnels.insert(agent);
                            }
                            62..=69 => {
                                c.send(&g, remove(agent));
                                c.tunnels.remove(&agent);
                            }
                            70..=73 => {
                                let old = c.connect(&g);
                                drop(old);
                            }
                            74..=76 => c.leave(&g, true),
                            77..=79 => c.leave(&g, false),
                            _ => c.drain(),
                        }
                    }
                }
                clients
            }));
        }
        let mut agents = agent_thread.join().unwrap();
        let mut clients: Vec<Owned> = threads
            .into_iter()
            .flat_map(|t| t.join().unwrap())
            .collect();

        let check = |agents: &mut Vec<Owned>, clients: &mut Vec<Owned>| {
            for p in agents.iter_mut().chain(clients.iter_mut()) {
                p.drain();
            }
            let live_nodes: std::collections::HashMap<Uuid, Option<Node>> = agents
                .iter()
                .chain(clients.iter())
                .filter(|p| p.live.is_some())
                .map(|p| (p.id, p.last.clone()))
                .collect();
            for (id, last) in &live_nodes {
                assert_eq!(&g.node(*id), last, "graph node of {id}");
            }
            let linked = |client: &Owned, agent: Uuid| client.tunnels.contains(&agent);
            // (receiver, its view, tunnel peers it should know)
            let mut expectations = Vec::new();
            for a in agents.iter() {
                if let Some((_, _, ch)) = &a.live {
                    let peers: Vec<Uuid> = clients
                        .iter()
                        .filter(|c| linked(c, a.id))
                        .map(|c| c.id)
                        .collect();
                    expectations.push((a.id, ch.view.clone(), peers));
                }
            }
            for c in clients.iter() {
                if let Some((_, _, ch)) = &c.live {
                    let peers: Vec<Uuid> = c.tunnels.iter().copied().collect();
                    expectations.push((c.id, ch.view.clone(), peers));
                }
            }
            for (who, view, peers) in expectations {
                for x in view.keys() {
                    assert!(
                        peers.contains(x) && live_nodes.contains_key(x),
                        "{who} still holds {x}, which is not a live tunnel peer"
                    );
                }
                for x in peers {
                    let Some(Some(want)) = live_nodes.get(&x) else {
                        continue;
                    };
                    // (A replaced peer that has not sent a node yet was skipped just above: its
                    // tunnel peers may still hold its previous node, as in Coder.)
                    assert_eq!(view.get(&x), Some(want), "{who} on {x}");
                }
            }
            assert_eq!(g.peer_count(), live_nodes.len());
            let tunnels: usize = clients
                .iter()
                .filter(|c| c.live.is_some())
                .map(|c| c.tunnels.len())
                .sum();
            assert_eq!(g.tunnel_count(), tunnels);
        };
        check(&mut agents, &mut clients);
        // One last update from every live peer: now every live tunnel peer must be known exactly.
        for p in agents.iter_mut().chain(clients.iter_mut()) {
            if p.live.is_some() {
                p.update(&g);
            }
        }
        check(&mut agents, &mut clients);
        assert_eq!(
            metric(
                &reg,
                "coordinator_peers_kicked_total",
                Some(("reason", "queue_full"))
            ),
            0.0
        );
        let sent = metric(&reg, "coordinator_peer_updates_sent_total", None);
        eprintln!("concurrent churn ({shards} shards): {sent} peer updates");
        assert!(sent > 1000.0, "too little traffic to mean anything: {sent}");
        drop(clients);
        drop(agents);
        assert_eq!(g.peer_count(), 0);
        assert_eq!(g.tunnel_count(), 0);
    }

    /// Microbenchmark (not run by default): node updates per second when `threads` threads each
    /// update their own agent, which fans out to 100 clients that the thread drains. With one
    /// shard every update serializes on one mutex (the previous design); with the default shard
    /// count, agents on different shards update in parallel.
    ///
    /// `cargo test --release -p coordinator --test graph_cases -- --ignored --nocapture throughput`
    #[test]
    #[ignore = "microbenchmark; run in release mode with --ignored --nocapture"]
    fn parallel_update_throughput() {
        use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
        use std::time::Instant;
        const CLIENTS: usize = 100;
        let window = Duration::from_millis(1500);
        for shards in [1, coordinator::graph::default_shards()] {
            for threads in [1usize, 2, 4] {
                let reg = Registry::new();
                let g = PeerGraph::with_shards(GraphConfig::default(), shards, &reg).unwrap();
                let stop = Arc::new(AtomicBool::new(false));
                let total = Arc::new(AtomicU64::new(0));
                let barrier = Arc::new(std::sync::Barrier::new(threads + 1));
                let workers: Vec<_> = (0..threads)
                    .map(|_| {
                        let (g, stop, total, barrier) =
                            (g.clone(), stop.clone(), total.clone(), barrier.clone());
                        std::thread::spawn(move || {
                            let aid = Uuid::new_v4();
                            let (ah, _arx) =
                                g.connect(aid, "a".into(), CoordinateeAuth::SingleTailnet);
                            let mut clients: Vec<_> = (0..CLIENTS)
                                .map(|_| {
                                    let (h, rx) = g.connect(
                                        Uuid::new_v4(),
                                        "c".into(),
                                        CoordinateeAuth::SingleTailnet,
                                    );
                                    g.handle(&h, add(aid)).unwrap();
                                    (h, rx)
                                })
                                .collect();
                            let nodes: Vec<Node> = (0..64).map(node).collect();
                            barrier.wait();
                            let mut n = 0u64;
                            while !stop.load(Ordering::Relaxed) {
                                g.handle(&ah, upd(nodes[(n % 64) as usize].clone()))
                                    .unwrap();
                                for (_, rx) in clients.iter_mut() {
                                    while rx.try_recv().is_ok() {}
                                }
                                n += 1;
                            }
                            total.fetch_add(n, Ordering::Relaxed);
                        })
                    })
                    .collect();
                barrier.wait();
                let start = Instant::now();
                std::thread::sleep(window);
                stop.store(true, Ordering::Relaxed);
                for w in workers {
                    w.join().unwrap();
                }
                let secs = start.elapsed().as_secs_f64();
                let n = total.load(Ordering::Relaxed) as f64;
                eprintln!(
                    "shards={shards:>3} threads={threads}: {:>9.0} updates/s ({:>10.0} peer updates/s)",
                    n / secs,
                    n * CLIENTS as f64 / secs
                );
            }
        }
    }

    #[test]
    fn concurrent_updates_converge() {
        concurrent_churn(2, 0x5eed);
    }

    #[test]
    fn concurrent_updates_converge_many_shards() {
        concurrent_churn(64, 0xc0ffee);
    }
}
