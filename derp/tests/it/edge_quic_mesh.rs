//! The QUIC mesh between tailnetd relays (`derp::mesh::quic`): three relays list the whole
//! region (themselves included), clients on every relay reach each other (small packets as
//! datagrams, a 60 KB one on a stream), PeerGone crosses the mesh, a relay killed and restarted
//! on the same UDP port rejoins, a relay with the wrong mesh key is refused, and datagrams lost
//! on the way are counted.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use derp::mesh::quic::{parse_mesh_quic_with, QuicConfigError, QuicMeshOptions, QuicTimers};
use derp::{Client, ReceivedFrame};
use proto::derp::PeerGoneReason;
use proto::key::{MeshKey, NodePrivate, NodePublic};
use tokio::net::TcpListener;

use crate::harness::*;

/// One relay of the region with QUIC mesh links (listening on `udp`) to every relay of
/// `quic_with`.
async fn start(
    key: &NodePrivate,
    mesh_key: MeshKey,
    listener: TcpListener,
    udp: SocketAddr,
    quic_with: &str,
) -> RegionRelay {
    start_with(
        key,
        mesh_key,
        listener,
        udp,
        quic_with,
        QuicTimers::default(),
    )
    .await
}

async fn start_with(
    key: &NodePrivate,
    mesh_key: MeshKey,
    listener: TcpListener,
    udp: SocketAddr,
    quic_with: &str,
    timers: QuicTimers,
) -> RegionRelay {
    let relay = RegionRelay::serve(key, mesh_key, listener, None);
    // A relay restarted in process binds the UDP port its predecessor held: quinn releases
    // the socket when its endpoint driver task ends, a moment after shutdown returns.
    let mut tries = 0;
    let links = loop {
        match derp::mesh::quic::start(
            &relay.server,
            QuicMeshOptions {
                listen: Some(udp),
                peers: parse_mesh_quic_with(quic_with).expect("mesh_quic_with"),
                queue_depth: 1024,
                timers,
            },
        ) {
            Err(QuicConfigError::Bind { source, .. })
                if source.kind() == std::io::ErrorKind::AddrInUse && tries < 100 =>
            {
                tries += 1;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            r => break r.expect("quic mesh"),
        }
    };
    assert_eq!(links.local_addr(), Some(udp));
    relay.with_links(MeshLinks::Quic(links))
}

/// A free UDP port on loopback, for a relay to bind (and bind again after a restart). Taken
/// below the kernel's ephemeral range (32768 and up here), so that sockets other tests bind
/// to port 0 meanwhile cannot take it; tried by binding and releasing.
fn free_udp() -> SocketAddr {
    use rand::Rng;
    loop {
        let port = rand::thread_rng().gen_range(20_000..32_000);
        if let Ok(s) = std::net::UdpSocket::bind(("127.0.0.1", port)) {
            return s.local_addr().unwrap();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edge_quic_mesh_three_relays_every_way_peer_gone_restart() {
    let mesh_key = MeshKey::from_bytes([5; 32]);
    let keys: Vec<NodePrivate> = (0..3).map(|_| key()).collect();
    let mut listeners = Vec::new();
    for _ in 0..3 {
        listeners.push(TcpListener::bind("127.0.0.1:0").await.expect("bind"));
    }
    let addrs: Vec<SocketAddr> = listeners.iter().map(|l| l.local_addr().unwrap()).collect();
    let udps: Vec<SocketAddr> = (0..3).map(|_| free_udp()).collect();
    let quic_with = udps
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(",");
    let mut nodes = Vec::new();
    for ((k, l), u) in keys.iter().zip(listeners).zip(&udps) {
        nodes.push(Some(start(k, mesh_key, l, *u, &quic_with).await));
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
        assert!(n.server.mesh_route_of(&ckeys[i]).is_none());
        // The link to itself stopped at its own key.
        let self_peer = format!("quic:{}", udps[i]);
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

    // Larger than any datagram: travels on a stream of its own, intact.
    let big: Vec<u8> = (0..60_000u32).map(|i| (i % 251) as u8).collect();
    let before = n0.metric("derp_mesh_quic_stream_packets", &[]);
    clients[0].send_packet(ckeys[1], &big).await.expect("send");
    let (src, data) = next_packet(&mut clients[1]).await;
    assert_eq!(src, ckeys[0]);
    assert_eq!(&data[..], &big[..]);
    assert_eq!(
        n0.metric("derp_mesh_quic_stream_packets", &[]),
        before + 1.0
    );

    // PeerGone across the mesh: client 0 sent to clients 1 and 2; when it leaves, both hear it.
    drop(clients.remove(0));
    for c in clients.iter_mut() {
        loop {
            match recv(c).await {
                ReceivedFrame::PeerGone { key, reason } => {
                    assert_eq!(key, ckeys[0]);
                    assert_eq!(reason, PeerGoneReason::Disconnected);
                    break;
                }
                ReceivedFrame::Packet { .. } => continue,
                other => panic!("expected PeerGone for client 0, got {other:?}"),
            }
        }
    }
    clients.insert(0, plain_client(addrs[0]).await);

    // Kill relay 2: its routes vanish, and client 1, which got packets from its client, hears
    // PeerGone.
    nodes[2].take().unwrap().kill().await;
    clients.pop();
    match recv(&mut clients[1]).await {
        ReceivedFrame::PeerGone { key, .. } => assert_eq!(key, ckeys[2]),
        other => panic!("expected PeerGone for the killed relay's client, got {other:?}"),
    }
    for n in nodes.iter().take(2) {
        let n = n.as_ref().unwrap();
        assert!(wait_until(|| n.server.mesh_route_of(&ckeys[2]).is_none()).await);
    }

    // Restart it with the same key on the same ports; a new client there reaches everyone.
    let l = rebind(addrs[2]).await;
    nodes[2] = Some(start(&keys[2], mesh_key, l, udps[2], &quic_with).await);
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

/// A relay holding another mesh key dials: the acceptor refuses it (connection closed, counted
/// as `auth`), the dialer never learns a route, and no packet of it is accepted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edge_quic_mesh_wrong_key_is_refused() {
    let (ua, ub) = (free_udp(), free_udp());
    let la = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let lb = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr_b = lb.local_addr().unwrap();
    let a = start(
        &key(),
        MeshKey::from_bytes([1; 32]),
        la,
        ua,
        &ub.to_string(),
    )
    .await;
    let b = start(&key(), MeshKey::from_bytes([2; 32]), lb, ub, "").await;
    let cb = plain_client(addr_b).await;
    assert!(
        wait_until(|| b.metric("derp_mesh_quic_rejected", &[("reason", "auth")]) >= 1.0).await,
        "the wrong key was not refused"
    );
    // It keeps retrying and keeps being refused; never a route, never connected.
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert!(a.server.mesh_route_of(&cb.public_key()).is_none());
    assert_eq!(
        a.metric(
            "derp_mesh_peer_connected",
            &[("peer", &format!("quic:{ub}"))]
        ),
        0.0
    );
    drop(cb);
    a.kill().await;
    b.kill().await;
}

/// A UDP forwarder between a dialing relay and its peer that drops every `nth` UDP datagram
/// going towards the peer (0: none, 1: all; QUIC resends what was in them, except datagrams).
async fn lossy_udp(
    to: SocketAddr,
    nth: Arc<std::sync::atomic::AtomicU64>,
) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    use std::sync::atomic::Ordering;
    let front = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let back = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    back.connect(to).await.unwrap();
    let addr = front.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let mut dialer: Option<SocketAddr> = None;
        let (mut a, mut b) = (vec![0u8; 65_536], vec![0u8; 65_536]);
        let mut n = 0u64;
        loop {
            tokio::select! {
                r = front.recv_from(&mut a) => {
                    let Ok((len, from)) = r else { return };
                    dialer = Some(from);
                    n += 1;
                    let every = nth.load(Ordering::Relaxed);
                    if every != 0 && n.is_multiple_of(every) {
                        continue;
                    }
                    let _ = back.send(&a[..len]).await;
                }
                r = back.recv(&mut b) => {
                    let Ok(len) = r else { return };
                    if let Some(d) = dialer {
                        let _ = front.send_to(&b[..len], d).await;
                    }
                }
            }
        }
    });
    (addr, task)
}

/// Datagrams lost between two relays are counted, exactly: with every 7th UDP datagram
/// towards the receiving relay dropped for a while, the packets its client misses equal
/// `derp_mesh_quic_datagrams_lost` (nothing else drops: queues are deep and sends paced).
/// Then the path goes black: the configured idle timeout (1.5 s, default 6 s) takes the link
/// and its routes down.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edge_quic_mesh_counts_lost_datagrams_and_idles_out() {
    use std::sync::atomic::{AtomicU64, Ordering};
    let mesh_key = MeshKey::from_bytes([9; 32]);
    let (ua, ub) = (free_udp(), free_udp());
    let la = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let lb = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (addr_a, addr_b) = (la.local_addr().unwrap(), lb.local_addr().unwrap());
    let drop_every = Arc::new(AtomicU64::new(0));
    let (proxy, proxy_task) = lossy_udp(ub, drop_every.clone()).await;
    // A dials B through the forwarder; B dials nobody (A→B traffic uses A's link only).
    let timers = QuicTimers::new(Duration::from_millis(300), Duration::from_millis(1500)).unwrap();
    let b = start_with(&key(), mesh_key, lb, ub, "", timers).await;
    let proxied = proxy.to_string();
    let a = start_with(&key(), mesh_key, la, ua, &proxied, timers).await;
    let mut ca = plain_client(addr_a).await;
    let mut cb = plain_client(addr_b).await;
    let kb = cb.public_key();
    a.wait_routes(&[kb]).await;
    // The first packet (not lost) makes sure the path is up.
    ca.send_packet(kb, b"hello").await.expect("send");
    assert_eq!(&next_packet(&mut cb).await.1[..], b"hello");

    let received = Arc::new(AtomicU64::new(0));
    let reader = {
        let received = received.clone();
        tokio::spawn(async move {
            loop {
                match cb.recv().await {
                    Ok(ReceivedFrame::Packet { .. }) => {
                        received.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(_) => {}
                    Err(_) => return,
                }
            }
        })
    };
    // 2,000 packets with losses, then 6,000 without: every gap of the first part ends up more
    // than the loss window (4,096) behind the highest number and is counted.
    let payload = [7u8; 1000];
    let mut sent = 0u64;
    for (count, every) in [(2_000u64, 7), (6_000, 0)] {
        drop_every.store(every, Ordering::Relaxed);
        for _ in 0..count / 16 {
            for _ in 0..16 {
                ca.send_packet(kb, &payload).await.expect("send");
                sent += 1;
            }
            // Paced: neither the client queue (32) nor QUIC's buffers overflow.
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
    let lost = || b.metric("derp_mesh_quic_datagrams_lost", &[]) as u64;
    let settled =
        wait_until(|| received.load(Ordering::Relaxed) + lost() == sent && lost() > 0).await;
    assert!(
        settled,
        "sent {sent}, received {}, counted lost {}",
        received.load(Ordering::Relaxed),
        lost()
    );
    assert_eq!(b.metric("derp_mesh_quic_datagrams_late", &[]), 0.0);
    assert_eq!(a.metric("derp_mesh_forward_dropped", &[]), 0.0);

    // Black hole: keep-alives stop arriving; the idle timeout ends the link within seconds.
    let peer = format!("quic:{proxied}");
    assert_eq!(
        a.metric("derp_mesh_peer_connected", &[("peer", &peer)]),
        1.0
    );
    drop_every.store(1, Ordering::Relaxed);
    let gone = tokio::time::timeout(Duration::from_secs(4), async {
        while a.server.mesh_route_of(&kb).is_some() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert!(
        gone.is_ok(),
        "the idle timeout did not take the silent link down"
    );
    assert_eq!(
        a.metric("derp_mesh_peer_connected", &[("peer", &peer)]),
        0.0
    );
    reader.abort();
    proxy_task.abort();
    drop(ca);
    a.kill().await;
    b.kill().await;
}
