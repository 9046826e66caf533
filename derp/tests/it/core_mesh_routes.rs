//! Mesh routes in the core, driven through the server's mesh API without any link: a local
//! connection wins over a route, a routed packet lands in the peer's bounded queue (overflow
//! counted), a forwarded packet is never forwarded again, and a key leaving the region (its
//! last route removed) sends PeerGone to the local clients that received its packets.

use std::time::Duration;

use crate::harness::*;
use derp::{ClientOptions, ReceivedFrame};
use proto::derp::PeerGoneReason;
use proto::key::MeshKey;

const MESH: MeshKey = MeshKey::from_bytes([3; 32]);

#[tokio::test]
async fn core_mesh_routes_local_wins_queue_bound_no_reforward_peer_gone() {
    let ts = TestServer::with_config(|c| c.mesh_key = Some(MESH)).await;
    let (fwd, mut rx) = ts.server.add_mesh_peer("peer-x", 1);
    let mut a = ts.client().await;
    let mut b = ts.client().await;
    let remote = key().public();

    // A route for a key that is also local: the local connection gets the packet.
    assert!(ts.server.mesh_peer_present(&fwd, b.public_key()));
    assert!(
        !ts.server.mesh_peer_present(&fwd, b.public_key()),
        "added twice"
    );
    a.send_packet(b.public_key(), b"local").await.unwrap();
    assert_eq!(&recv_packet(&mut b).await.1[..], b"local");
    assert!(rx.try_recv().is_err());

    // A key only the peer has: the packet is queued for the peer with its source.
    ts.server.mesh_peer_present(&fwd, remote);
    assert_eq!(ts.server.mesh_route_of(&remote), Some(fwd.id()));
    a.send_packet(remote, b"to the peer").await.unwrap();
    let item = within(rx.recv()).await.unwrap();
    assert_eq!((item.src(), item.dst), (a.public_key(), remote));
    assert_eq!(item.payload(), b"to the peer");
    // The queue holds one packet: the second of two is dropped and counted.
    a.send_packet(remote, b"1").await.unwrap();
    a.send_packet(remote, b"2").await.unwrap();
    let labels = [("peer", "peer-x")];
    assert!(
        wait_until(|| metric_matching(&ts.registry, "derp_mesh_forward_dropped", &labels) == 1.0)
            .await
    );
    assert_eq!(ts.metric("derp_packets_forwarded_out"), 3.0);
    assert_eq!(within(rx.recv()).await.unwrap().payload(), b"1");

    // A mesh connection's ForwardPacket for a routed (not local) key is dropped, not forwarded.
    let mut m = ts
        .client_with(
            key(),
            ClientOptions {
                mesh_key: Some(MESH),
                ..Default::default()
            },
        )
        .await;
    m.forward_packet(a.public_key(), remote, b"loop")
        .await
        .unwrap();
    ts.wait_metric(
        "derp_packets_dropped{kind=\"other\",reason=\"unknown_dest_on_fwd\"}",
        1.0,
    )
    .await;
    assert!(rx.try_recv().is_err());

    // A forwarded packet from `remote` reaches a; when the peer says `remote` is gone (its last
    // route), a hears PeerGone.
    m.forward_packet(remote, a.public_key(), b"from afar")
        .await
        .unwrap();
    let (src, data) = recv_packet(&mut a).await;
    assert_eq!((src, &data[..]), (remote, &b"from afar"[..]));
    assert!(ts.server.mesh_peer_gone(&fwd, remote));
    assert!(!ts.server.mesh_peer_gone(&fwd, remote), "removed twice");
    assert_eq!(
        recv(&mut a).await,
        ReceivedFrame::PeerGone {
            key: remote,
            reason: PeerGoneReason::Disconnected
        }
    );
    assert_eq!(ts.server.mesh_route_of(&remote), None);

    // b leaves while the peer still announces it: b is still in the region, so a (which got a
    // packet from b) hears nothing until the route goes too.
    let b_key = b.public_key();
    b.send_packet(a.public_key(), b"from b").await.unwrap();
    assert_eq!(recv_packet(&mut a).await.0, b_key);
    drop(b);
    assert!(wait_until(|| !ts.server.is_connected(&b_key)).await);
    assert_eq!(ts.server.mesh_route_of(&b_key), Some(fwd.id()));
    expect_silence(&mut a, Duration::from_millis(100)).await;
    ts.server.mesh_peer_gone(&fwd, b_key);
    assert_eq!(
        recv(&mut a).await,
        ReceivedFrame::PeerGone {
            key: b_key,
            reason: PeerGoneReason::Disconnected
        }
    );
}
