//! A region of three relays meshed with each other through the outbound mesh links
//! (`derp::mesh`): each lists all three (itself included, as derper allows), clients on every
//! relay reach each other, PeerGone crosses the mesh, a forwarded packet is never forwarded
//! again, and a relay killed and restarted (same key, same port) rejoins.

use std::net::SocketAddr;

use derp::client::dial::{dial, DialOptions};
use derp::mesh::{parse_mesh_with, MeshOptions};
use derp::{Client, ReceivedFrame};
use proto::derp::PeerGoneReason;
use proto::key::{MeshKey, NodePrivate, NodePublic};
use tokio::net::TcpListener;

use crate::harness::*;

/// One relay of the region with TCP mesh links to every relay of `mesh_with`.
async fn start(
    key: &NodePrivate,
    mesh_key: MeshKey,
    listener: TcpListener,
    mesh_with: &str,
) -> RegionRelay {
    start_with(key, mesh_key, listener, mesh_with, None).await
}

/// `tls`: serve TLS with this certificate and key, and trust the certificate (as an extra CA
/// file, the way `--mesh-ca-file` does) when dialing peers.
async fn start_with(
    key: &NodePrivate,
    mesh_key: MeshKey,
    listener: TcpListener,
    mesh_with: &str,
    tls: Option<(&std::path::Path, &std::path::Path)>,
) -> RegionRelay {
    let relay = RegionRelay::serve(key, mesh_key, listener, tls);
    let extra_roots = match tls {
        Some((cert, _)) => derp::mesh::load_trust(Some(cert)).expect("trust"),
        None => Vec::new(),
    };
    let links = derp::mesh::start(
        &relay.server,
        MeshOptions {
            peers: parse_mesh_with(mesh_with).expect("mesh_with"),
            extra_roots,
            queue_depth: 1024,
        },
    )
    .expect("mesh");
    relay.with_links(MeshLinks::Tcp(links))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edge_mesh_three_relays_every_way_peer_gone_restart() {
    let mesh_key = MeshKey::from_bytes([7; 32]);
    let keys: Vec<NodePrivate> = (0..3).map(|_| key()).collect();
    let mut listeners = Vec::new();
    for _ in 0..3 {
        listeners.push(TcpListener::bind("127.0.0.1:0").await.expect("bind"));
    }
    let addrs: Vec<SocketAddr> = listeners.iter().map(|l| l.local_addr().unwrap()).collect();
    // Every relay lists the whole region, itself included.
    let mesh_with = addrs
        .iter()
        .map(|a| format!("http://{a}/derp"))
        .collect::<Vec<_>>()
        .join(",");
    let mut nodes = Vec::new();
    for (k, l) in keys.iter().zip(listeners) {
        nodes.push(Some(start(k, mesh_key, l, &mesh_with).await));
    }

    let mut clients = Vec::new();
    for a in &addrs {
        clients.push(plain_client(*a).await);
    }
    let ckeys: Vec<NodePublic> = clients.iter().map(Client::public_key).collect();
    for (i, n) in nodes.iter().enumerate() {
        let n = n.as_ref().unwrap();
        let remote: Vec<NodePublic> = (0..3).filter(|j| *j != i).map(|j| ckeys[j]).collect();
        n.wait_routes(&remote).await;
        // The local client wins over any route; the self link stopped at its own key.
        assert!(n.server.mesh_route_of(&ckeys[i]).is_none());
        let self_peer = format!("http://{}/derp", addrs[i]);
        assert_eq!(
            n.metric("derp_mesh_peer_connected", &[("peer", &self_peer)]),
            0.0
        );
    }
    all_ways(&mut clients, "first").await;
    let n0 = nodes[0].as_ref().unwrap();
    assert!(n0.metric("derp_packets_forwarded_out", &[]) >= 2.0);
    assert!(n0.metric("derp_packets_forwarded_in", &[]) >= 2.0);
    assert_eq!(n0.metric("derp_mesh_forward_dropped", &[]), 0.0);

    // A forwarded packet is delivered locally or dropped, never forwarded again: a mesh peer
    // forwarding to relay 0 a packet for relay 1's client gets it dropped.
    let mut raw = within(dial(&format!("http://{}/derp", addrs[0]), {
        let mut o = DialOptions::new(key());
        o.mesh_key = Some(mesh_key);
        o
    }))
    .await
    .expect("dial")
    .client;
    expect_server_info(&mut raw).await;
    let before = n0.metric(
        "derp_packets_dropped",
        &[("reason", "unknown_dest_on_fwd"), ("kind", "other")],
    );
    raw.forward_packet(ckeys[2], ckeys[1], b"loop?")
        .await
        .expect("forward");
    let ok = wait_until(|| {
        n0.metric(
            "derp_packets_dropped",
            &[("reason", "unknown_dest_on_fwd"), ("kind", "other")],
        ) > before
    })
    .await;
    assert!(ok, "a forwarded packet for a mesh route was not dropped");
    drop(raw);

    // PeerGone across the mesh: client 0 sent to clients 1 and 2 (on other relays); when it
    // leaves, both hear it.
    let gone = clients.remove(0);
    drop(gone);
    for c in clients.iter_mut() {
        match recv(c).await {
            ReceivedFrame::PeerGone { key, reason } => {
                assert_eq!(key, ckeys[0]);
                assert_eq!(reason, PeerGoneReason::Disconnected);
            }
            other => panic!("expected PeerGone for client 0, got {other:?}"),
        }
    }
    for n in nodes.iter().skip(1) {
        let n = n.as_ref().unwrap();
        assert!(wait_until(|| n.server.mesh_route_of(&ckeys[0]).is_none()).await);
    }
    clients.insert(0, plain_client(addrs[0]).await);

    // Kill relay 2: its routes vanish everywhere, its client is gone, and client 1, which got
    // packets from it, hears PeerGone.
    nodes[2].take().unwrap().kill().await;
    clients.pop();
    match recv(&mut clients[1]).await {
        ReceivedFrame::PeerGone { key, .. } => assert_eq!(key, ckeys[2]),
        other => panic!("expected PeerGone for the killed relay's client, got {other:?}"),
    }
    for n in nodes.iter().take(2) {
        let n = n.as_ref().unwrap();
        assert!(
            wait_until(|| n.server.mesh_route_of(&ckeys[2]).is_none()).await,
            "route to the killed relay's client survived"
        );
    }

    // Restart it with the same key on the same port; a new client there reaches everyone.
    let l = rebind(addrs[2]).await;
    nodes[2] = Some(start(&keys[2], mesh_key, l, &mesh_with).await);
    clients.push(plain_client(addrs[2]).await);
    let ckeys: Vec<NodePublic> = clients.iter().map(Client::public_key).collect();
    for (i, n) in nodes.iter().enumerate() {
        let remote: Vec<NodePublic> = (0..3).filter(|j| *j != i).map(|j| ckeys[j]).collect();
        n.as_ref().unwrap().wait_routes(&remote).await;
    }
    all_ways(&mut clients, "after restart").await;

    for n in nodes.into_iter().flatten() {
        n.kill().await;
    }
}

/// Two relays meshed over TLS in derper's host syntax (`localhost:PORT`, dialed as
/// `https://localhost:PORT/derp`), each serving a self-signed certificate marked as a CA (as
/// `openssl req -x509` makes them) that the mesh trusts only through the extra CA file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edge_mesh_tls_self_signed_ca_file() {
    let dir = tempfile::tempdir().unwrap();
    let cert_path = dir.path().join("cert.pem");
    let key_path = dir.path().join("key.pem");
    let mut params = rcgen::CertificateParams::new(vec!["localhost".to_string()]).expect("params");
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let key_pair = rcgen::KeyPair::generate().expect("key pair");
    let cert = params.self_signed(&key_pair).expect("self-signed");
    std::fs::write(&cert_path, cert.pem()).unwrap();
    std::fs::write(&key_path, key_pair.serialize_pem()).unwrap();

    let mesh_key = MeshKey::from_bytes([9; 32]);
    let la = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let lb = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (pa, pb) = (
        la.local_addr().unwrap().port(),
        lb.local_addr().unwrap().port(),
    );
    let mesh_with = format!("localhost:{pa},localhost:{pb}");
    let tls = Some((cert_path.as_path(), key_path.as_path()));
    let a = start_with(&key(), mesh_key, la, &mesh_with, tls).await;
    let b = start_with(&key(), mesh_key, lb, &mesh_with, tls).await;

    let dial_tls = |port: u16| {
        let trust = derp::mesh::load_trust(Some(&cert_path)).unwrap();
        async move {
            let mut o = DialOptions::new(key());
            o.tls.extra_roots = trust;
            let mut c = within(dial(&format!("https://localhost:{port}/derp"), o))
                .await
                .expect("dial")
                .client;
            expect_server_info(&mut c).await;
            c
        }
    };
    let mut ca = dial_tls(pa).await;
    let mut cb = dial_tls(pb).await;
    a.wait_routes(&[cb.public_key()]).await;
    b.wait_routes(&[ca.public_key()]).await;
    let mut pair = [ca, cb];
    all_ways(&mut pair, "tls").await;
    [ca, cb] = pair;

    // Without the CA file the same certificate is refused.
    let refused = dial(
        &format!("https://localhost:{pa}/derp"),
        DialOptions::new(key()),
    )
    .await;
    assert!(
        refused.is_err(),
        "an untrusted self-signed certificate was accepted"
    );
    drop((ca, cb));
    a.kill().await;
    b.kill().await;
}
