//! Duplicate connections for one key (derper's lastWriterIsActive) and mesh-peer frames
//! (WatchConns / PeerPresent / ForwardPacket / ClosePeer).

use std::time::Duration;

use crate::harness::*;
use derp::{Client, ClientOptions, ReceivedFrame};
use proto::derp::{PeerGoneReason, PeerPresentFlags};
use proto::key::{MeshKey, NodePublic};

#[tokio::test]
async fn duplicate_keys_newest_active_activity_reactivates_gone_at_zero() {
    let ts = TestServer::start().await;
    let k = key();
    let kpub = k.public();
    let mut b = ts.client().await;
    let mut a1 = ts.client_with(k.clone(), ClientOptions::default()).await;
    // a1 sends to b, so b must eventually hear PeerGone(k) — but only when *both* are gone.
    a1.send_packet(b.public_key(), b"from a1")
        .await
        .expect("send");
    recv_packet(&mut b).await;
    let mut a2 = ts.client_with(k.clone(), ClientOptions::default()).await;
    assert_eq!(ts.server.connections_of(&kpub), 2);
    assert_eq!(ts.metric("derp_current_dup_client_keys"), 1.0);
    assert_eq!(ts.metric("derp_current_dup_client_conns"), 2.0);
    assert_eq!(ts.metric("derp_total_dup_client_conns"), 1.0);
    assert_eq!(ts.metric("derp_current_connections"), 3.0);

    // Newest connection is active.
    b.send_packet(kpub, b"1").await.expect("send");
    assert_eq!(&recv_packet(&mut a2).await.1[..], b"1");
    expect_silence(&mut a1, Duration::from_millis(100)).await;

    // Any frame from the older one makes it active (last writer wins).
    a1.ping([1; 8]).await.expect("ping");
    assert_eq!(recv(&mut a1).await, ReceivedFrame::Pong([1; 8]));
    b.send_packet(kpub, b"2").await.expect("send");
    assert_eq!(&recv_packet(&mut a1).await.1[..], b"2");
    expect_silence(&mut a2, Duration::from_millis(100)).await;

    // And back.
    a2.note_preferred(true).await.expect("np");
    a2.ping([2; 8]).await.expect("ping");
    assert_eq!(recv(&mut a2).await, ReceivedFrame::Pong([2; 8]));
    b.send_packet(kpub, b"3").await.expect("send");
    assert_eq!(&recv_packet(&mut a2).await.1[..], b"3");

    // The active one leaves: the remaining one becomes active, no PeerGone yet.
    drop(a2);
    let ok = wait_until(|| ts.server.connections_of(&kpub) == 1).await;
    assert!(ok);
    assert_eq!(ts.metric("derp_current_dup_client_keys"), 0.0);
    assert_eq!(ts.metric("derp_current_dup_client_conns"), 0.0);
    b.send_packet(kpub, b"4").await.expect("send");
    assert_eq!(&recv_packet(&mut a1).await.1[..], b"4");
    expect_silence(&mut b, Duration::from_millis(100)).await;

    // The last one leaves: exactly one PeerGone(Disconnected).
    drop(a1);
    match recv(&mut b).await {
        ReceivedFrame::PeerGone { key, reason } => {
            assert_eq!(key, kpub);
            assert_eq!(reason, PeerGoneReason::Disconnected);
        }
        other => panic!("expected PeerGone, got {other:?}"),
    }
    expect_silence(&mut b, Duration::from_millis(200)).await;
    assert_eq!(ts.metric("derp_peer_gone_disconnected_frames"), 1.0);
    assert_eq!(ts.metric("derp_total_dup_client_conns"), 1.0);
}

#[tokio::test]
async fn peer_gone_covers_receivers_of_any_duplicate() {
    // b received only from the *older* duplicate, which leaves first: the notification is kept
    // until the newer one also leaves.
    let ts = TestServer::start().await;
    let k = key();
    let mut b = ts.client().await;
    let mut a1 = ts.client_with(k.clone(), ClientOptions::default()).await;
    let a2 = ts.client_with(k.clone(), ClientOptions::default()).await;
    a1.send_packet(b.public_key(), b"x").await.expect("send");
    recv_packet(&mut b).await;
    drop(a1);
    let ok = wait_until(|| ts.server.connections_of(&k.public()) == 1).await;
    assert!(ok);
    expect_silence(&mut b, Duration::from_millis(100)).await;
    drop(a2);
    match recv(&mut b).await {
        ReceivedFrame::PeerGone { key, .. } => assert_eq!(key, k.public()),
        other => panic!("expected PeerGone, got {other:?}"),
    }
}

const MESH: MeshKey = MeshKey::from_bytes([0x42; 32]);

async fn mesh_server() -> TestServer {
    TestServer::with_config(|c| c.mesh_key = Some(MESH)).await
}

async fn mesh_client(ts: &TestServer) -> Client {
    ts.client_with(
        key(),
        ClientOptions {
            mesh_key: Some(MESH),
            ..Default::default()
        },
    )
    .await
}

async fn expect_present(w: &mut Client) -> (NodePublic, PeerPresentFlags) {
    match recv(w).await {
        ReceivedFrame::PeerPresent { key, addr, flags } => {
            let addr = addr.expect("PeerPresent carries the address");
            assert!(addr.ip().is_loopback(), "{addr}");
            assert_ne!(addr.port(), 0);
            (key, flags)
        }
        other => panic!("expected PeerPresent, got {other:?}"),
    }
}

#[tokio::test]
async fn watch_conns_floods_then_streams_presence() {
    let ts = mesh_server().await;
    let c1 = ts.client().await;
    let c2 = ts.client().await;
    let mut w = mesh_client(&ts).await;
    w.watch_conns().await.expect("watch");
    let mut seen = std::collections::HashMap::new();
    for _ in 0..3 {
        let (k, f) = expect_present(&mut w).await;
        seen.insert(k, f);
    }
    assert_eq!(
        seen.get(&c1.public_key()),
        Some(&PeerPresentFlags::IS_REGULAR)
    );
    assert_eq!(
        seen.get(&c2.public_key()),
        Some(&PeerPresentFlags::IS_REGULAR)
    );
    assert_eq!(
        seen.get(&w.public_key()),
        Some(&PeerPresentFlags::IS_MESH_PEER)
    );
    ts.wait_metric("derp_watchers", 1.0).await;

    let c3 = ts.client().await;
    let (k, f) = expect_present(&mut w).await;
    assert_eq!((k, f), (c3.public_key(), PeerPresentFlags::IS_REGULAR));
    let c3key = c3.public_key();
    drop(c3);
    match recv(&mut w).await {
        ReceivedFrame::PeerGone { key, reason } => {
            assert_eq!(key, c3key);
            assert_eq!(reason, PeerGoneReason::Disconnected);
        }
        other => panic!("expected PeerGone, got {other:?}"),
    }
    drop(w);
    ts.wait_metric("derp_watchers", 0.0).await;
    drop((c1, c2));
}

#[tokio::test]
async fn watch_conns_from_own_server_key_is_ignored() {
    let ts = mesh_server().await;
    let own = ts.server.config().private_key.clone();
    let mut w = ts
        .client_with(
            own,
            ClientOptions {
                mesh_key: Some(MESH),
                ..Default::default()
            },
        )
        .await;
    w.watch_conns().await.expect("watch");
    w.ping([3; 8]).await.expect("ping");
    assert_eq!(recv(&mut w).await, ReceivedFrame::Pong([3; 8]));
    assert_eq!(ts.metric("derp_watchers"), 0.0);
}

#[tokio::test]
async fn forward_packet_delivers_with_original_source() {
    let ts = mesh_server().await;
    let mut c1 = ts.client().await;
    let mut w = mesh_client(&ts).await;
    let remote_src = key().public();
    w.forward_packet(remote_src, c1.public_key(), b"via mesh")
        .await
        .expect("fwd");
    let (src, data) = recv_packet(&mut c1).await;
    assert_eq!(src, remote_src);
    assert_eq!(&data[..], b"via mesh");
    ts.wait_metric("derp_packets_forwarded_in", 1.0).await;

    // Unknown destination: dropped (never re-forwarded); disco gets NotHere back.
    let nobody = key().public();
    w.forward_packet(remote_src, nobody, b"lost")
        .await
        .expect("fwd");
    w.forward_packet(remote_src, nobody, &disco_packet())
        .await
        .expect("fwd");
    match recv(&mut w).await {
        ReceivedFrame::PeerGone { key, reason } => {
            assert_eq!(key, nobody);
            assert_eq!(reason, PeerGoneReason::NotHere);
        }
        other => panic!("expected NotHere, got {other:?}"),
    }
    ts.wait_metric(
        "derp_packets_dropped{kind=\"other\",reason=\"unknown_dest_on_fwd\"}",
        1.0,
    )
    .await;
    ts.wait_metric(
        "derp_packets_dropped{kind=\"disco\",reason=\"unknown_dest_on_fwd\"}",
        1.0,
    )
    .await;
    // Forwarded packets are not "received from clients".
    assert_eq!(ts.metric("derp_packets_received"), 0.0);
}

#[tokio::test]
async fn close_peer_closes_every_connection_of_the_key() {
    let ts = mesh_server().await;
    let k = key();
    let mut t1 = ts.client_with(k.clone(), ClientOptions::default()).await;
    let mut t2 = ts.client_with(k.clone(), ClientOptions::default()).await;
    let mut other = ts.client().await;
    let mut w = mesh_client(&ts).await;
    w.close_peer(k.public()).await.expect("close");
    expect_closed(&mut t1).await;
    expect_closed(&mut t2).await;
    ts.wait_connections(2).await;
    // The mesh peer and the other client are unaffected.
    other
        .send_packet(w.public_key(), b"still fine")
        .await
        .expect("send");
    let (_, data) = recv_packet(&mut w).await;
    assert_eq!(&data[..], b"still fine");
    // Unknown key: nothing happens.
    w.close_peer(key().public()).await.expect("close");
    w.ping([5; 8]).await.expect("ping");
    assert_eq!(recv(&mut w).await, ReceivedFrame::Pong([5; 8]));
    drop(other);
}
