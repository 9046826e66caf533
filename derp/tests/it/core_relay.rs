//! Relay data plane: delivery, ordering, self-send, PeerGone, ping/pong, NotePreferred,
//! keepalive, pipelining, disco NotHere rate limit, slow receivers, shutdown.

use std::time::Duration;

use crate::harness::*;
use bytes::Bytes;
use derp::{Client, ClientOptions, ReceivedFrame};
use proto::derp::PeerGoneReason;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test]
async fn relays_packets_of_every_size() {
    let ts = TestServer::start().await;
    let mut a = ts.client().await;
    let mut b = ts.client().await;
    for size in [1usize, 1400, 65536] {
        let pkt: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
        a.send_packet(b.public_key(), &pkt).await.expect("send");
        let (src, data) = recv_packet(&mut b).await;
        assert_eq!(src, a.public_key());
        assert_eq!(data.len(), size);
        assert_eq!(&data[..], &pkt[..]);
    }
    ts.wait_metric("derp_packets_received", 3.0).await;
    ts.wait_metric("derp_packets_sent", 3.0).await;
    ts.wait_metric("derp_bytes_received", (1 + 1400 + 65536) as f64)
        .await;
    ts.wait_metric("derp_bytes_sent", (1 + 1400 + 65536) as f64)
        .await;
    assert_eq!(ts.metric("derp_current_connections"), 2.0);
    assert_eq!(ts.metric("derp_accepts"), 2.0);
    // Each packet was its own batch in b's queue; b's local histogram lands when it leaves.
    drop(b);
    ts.wait_metric("derp_queue_wait_seconds_count", 3.0).await;
}

/// `derp_queue_wait_seconds` shows a receiver that fell behind: while its socket is full its
/// writer takes nothing from the queue, so the first batch taken after it reads again has
/// waited at least as long as the receiver stalled.
#[tokio::test]
async fn queue_wait_shows_a_receiver_that_fell_behind() {
    let ts = TestServer::with_config(|c| c.write_timeout = Duration::from_secs(60)).await;
    let a = ts.client().await;
    let mut slow = ts.client().await;
    let slow_pub = slow.public_key();
    let (_ar, mut aw) = a.split();
    let pkt = vec![0x5au8; 60 * 1024];
    // About 19 MiB: more than loopback socket buffers hold, so the queue fills behind them.
    for _ in 0..40 {
        for _ in 0..8 {
            aw.buffer_packet(slow_pub, &pkt).expect("buffer");
        }
        within(aw.flush()).await.expect("flush");
    }
    let stall = Duration::from_millis(400);
    tokio::time::sleep(stall).await;
    let mut got = 0;
    while let Ok(Ok(f)) = tokio::time::timeout(Duration::from_millis(500), slow.recv()).await {
        if matches!(f, ReceivedFrame::Packet { .. }) {
            got += 1;
        }
    }
    assert!(got > 0, "the slow receiver got nothing");
    // The slow connection's local histogram lands in the registry when it ends.
    drop(slow);
    let waited_long = || {
        ts.metric("derp_queue_wait_seconds_bucket{le=\"0.1\"}")
            < ts.metric("derp_queue_wait_seconds_count")
    };
    assert!(
        wait_until(waited_long).await,
        "no batch waited more than 0.1 s: {} of {} within 0.1 s",
        ts.metric("derp_queue_wait_seconds_bucket{le=\"0.1\"}"),
        ts.metric("derp_queue_wait_seconds_count")
    );
    assert!(ts.metric("derp_queue_wait_seconds_sum") >= stall.as_secs_f64());
}

#[tokio::test]
async fn preserves_order_of_ten_thousand_packets() {
    let ts = TestServer::start().await;
    let a = ts.client().await;
    let mut b = ts.client().await;
    let bkey = b.public_key();
    let akey = a.public_key();
    let (_ar, mut aw) = a.split();
    // Send in batches but never more than the queue can hold before the receiver reads:
    // the receiver acknowledges progress through a channel so nothing is dropped.
    let (tx, mut rx) = tokio::sync::mpsc::channel::<u32>(1024);
    let sender = tokio::spawn(async move {
        let mut next = 0u32;
        let mut acked = 0u32;
        while next < 10_000 {
            while next < 10_000 && next < acked + 16 {
                aw.buffer_packet(bkey, &next.to_be_bytes()).expect("buffer");
                next += 1;
            }
            aw.flush().await.expect("flush");
            match rx.recv().await {
                Some(a) => acked = a,
                None => return,
            }
        }
    });
    for i in 0..10_000u32 {
        let (src, data) = recv_packet(&mut b).await;
        assert_eq!(src, akey);
        assert_eq!(&data[..], &i.to_be_bytes(), "packet {i} out of order");
        if (i + 1) % 16 == 0 || i == 9_999 {
            let _ = tx.send(i + 1).await;
        }
    }
    within(sender).await.expect("sender");
    assert_eq!(
        ts.metric("derp_packets_dropped{kind=\"other\",reason=\"queue_head\"}"),
        0.0
    );
}

#[tokio::test]
async fn non_vectored_transport_with_partial_io_relays_in_order() {
    let ts = TestServer::chunked().await;
    let mut a = ts.client().await;
    let mut b = ts.client().await;
    for size in [1usize, 1400, 65536] {
        let pkt: Vec<u8> = (0..size).map(|i| (i % 253) as u8).collect();
        a.send_packet(b.public_key(), &pkt).await.expect("send");
        let (src, data) = recv_packet(&mut b).await;
        assert_eq!(src, a.public_key());
        assert_eq!(&data[..], &pkt[..]);
    }
    // Bursts that coalesce into multi-frame writes, split at arbitrary points.
    for round in 0..50u32 {
        for i in 0..20u32 {
            let mut p = vec![0u8; 300 + (i as usize * 97) % 2000];
            p[..4].copy_from_slice(&(round * 20 + i).to_be_bytes());
            a.writer()
                .buffer_packet(b.public_key(), &p)
                .expect("buffer");
        }
        a.writer().flush().await.expect("flush");
        for i in 0..20u32 {
            let (_, data) = recv_packet(&mut b).await;
            assert_eq!(&data[..4], &(round * 20 + i).to_be_bytes());
        }
    }
    a.ping([9; 8]).await.expect("ping");
    assert_eq!(recv(&mut a).await, ReceivedFrame::Pong([9; 8]));
}

#[tokio::test]
async fn self_send_works() {
    let ts = TestServer::start().await;
    let mut a = ts.client().await;
    a.send_packet(a.public_key(), b"me").await.expect("send");
    let (src, data) = recv_packet(&mut a).await;
    assert_eq!(src, a.public_key());
    assert_eq!(&data[..], b"me");
}

#[tokio::test]
async fn peer_gone_disconnected_once_after_sender_leaves() {
    let ts = TestServer::start().await;
    let mut a = ts.client().await;
    let mut b = ts.client().await;
    let mut c = ts.client().await; // never received from a: no PeerGone
    let akey = a.public_key();
    for _ in 0..3 {
        a.send_packet(b.public_key(), b"hi").await.expect("send");
        recv_packet(&mut b).await;
    }
    drop(a);
    match recv(&mut b).await {
        ReceivedFrame::PeerGone { key, reason } => {
            assert_eq!(key, akey);
            assert_eq!(reason, PeerGoneReason::Disconnected);
        }
        other => panic!("expected PeerGone, got {other:?}"),
    }
    expect_silence(&mut b, Duration::from_millis(300)).await;
    expect_silence(&mut c, Duration::from_millis(50)).await;
    assert_eq!(ts.metric("derp_peer_gone_disconnected_frames"), 1.0);
    ts.wait_connections(2).await;
}

#[tokio::test]
async fn ping_gets_pong_with_same_bytes() {
    let ts = TestServer::start().await;
    let mut a = ts.client().await;
    let data = [1, 2, 3, 4, 5, 6, 7, 0x2a];
    a.ping(data).await.expect("ping");
    assert_eq!(recv(&mut a).await, ReceivedFrame::Pong(data));
    // A longer ping (up to 1000 bytes) echoes only the first 8.
    let mut long = vec![9u8; 1000];
    long[..8].copy_from_slice(&[8, 7, 6, 5, 4, 3, 2, 1]);
    a.send_raw_frame(0x12, &long).await.expect("ping");
    assert_eq!(
        recv(&mut a).await,
        ReceivedFrame::Pong([8, 7, 6, 5, 4, 3, 2, 1])
    );
    assert_eq!(ts.metric("derp_got_ping"), 2.0);
    assert_eq!(ts.metric("derp_sent_pong"), 2.0);
}

#[tokio::test]
async fn note_preferred_drives_home_gauge() {
    let ts = TestServer::start().await;
    let mut a = ts.client().await;
    let mut b = ts.client().await;
    a.note_preferred(true).await.expect("np");
    b.note_preferred(true).await.expect("np");
    ts.wait_metric("derp_current_home_connections", 2.0).await;
    a.note_preferred(false).await.expect("np");
    ts.wait_metric("derp_current_home_connections", 1.0).await;
    a.note_preferred(false).await.expect("np");
    b.note_preferred(true).await.expect("np");
    // Ping round trip orders us after the NotePreferred frames.
    b.ping([0; 8]).await.expect("ping");
    assert_eq!(recv(&mut b).await, ReceivedFrame::Pong([0; 8]));
    assert_eq!(ts.metric("derp_current_home_connections"), 1.0);
    drop(b);
    ts.wait_metric("derp_current_home_connections", 0.0).await;
}

#[tokio::test]
async fn keepalive_arrives_at_configured_interval() {
    let ts = TestServer::with_config(|c| c.keepalive = Duration::from_millis(100)).await;
    let mut a = ts.client().await;
    for _ in 0..3 {
        let f = within(a.recv()).await.expect("recv");
        assert_eq!(f, ReceivedFrame::KeepAlive);
    }
    // Still a working connection.
    a.send_packet(a.public_key(), b"x").await.expect("send");
    recv_packet(&mut a).await;
}

#[tokio::test]
async fn frames_pipelined_behind_client_info_are_handled() {
    // Send ClientInfo, SendPacket (to self) and Ping in a single write, before reading
    // anything but the ServerKey.
    let ts = TestServer::start().await;
    let me = key();
    let mut tcp = ts.raw().await;
    let mut hdr = [0u8; 45];
    within(tcp.read_exact(&mut hdr)).await.expect("server key");
    let server_key = proto::derp::parse_server_key(&hdr[5..]).expect("parse");
    let info = proto::derp::ClientInfo {
        version: 2,
        can_ack_pings: true,
        ..Default::default()
    };
    let mut buf = proto::derp::client_info_frame(&me, &server_key, &info, [3u8; 24]).to_vec();
    let mut pkt = bytes::BytesMut::new();
    proto::derp::encode_send_packet(&mut pkt, &me.public(), b"pipelined");
    buf.extend_from_slice(&pkt);
    buf.extend_from_slice(&[0x12, 0, 0, 0, 8, 1, 1, 1, 1, 1, 1, 1, 1]);
    tcp.write_all(&buf).await.expect("write");
    let mut c = Client::handshake(
        tcp,
        Bytes::new(),
        me.clone(),
        ClientOptions {
            server_key: Some(server_key),
            ..Default::default()
        },
    )
    .await;
    // `Client::handshake` sent a second ClientInfo: the server ignores it as an unknown frame.
    let c = c.as_mut().expect("client");
    let mut got = Vec::new();
    while got.len() < 3 {
        got.push(recv(c).await);
    }
    assert!(matches!(got[0], ReceivedFrame::ServerInfo(_)), "{got:?}");
    assert!(got.contains(&ReceivedFrame::Pong([1; 8])), "{got:?}");
    assert!(got.contains(&ReceivedFrame::Packet {
        src: me.public(),
        data: Bytes::from_static(b"pipelined")
    }));
    ts.wait_metric("derp_unknown_frames", 1.0).await;
}

#[tokio::test]
async fn handshake_and_frames_in_leftover_bytes() {
    // The HTTP layer may already have read ClientInfo (and more) past the request head.
    let ts = TestServer::start().await;
    let me = key();
    let info = proto::derp::ClientInfo {
        version: 2,
        can_ack_pings: true,
        ..Default::default()
    };
    let server_key = ts.server.public_key();
    let mut leftover = proto::derp::client_info_frame(&me, &server_key, &info, [4u8; 24]).to_vec();
    leftover.extend_from_slice(&[0x12, 0, 0, 0, 8, 2, 2, 2, 2, 2, 2, 2, 2]);
    let (client_side, server_side) = tokio::io::duplex(64 * 1024);
    let addr = "127.0.0.1:1".parse().expect("addr");
    tokio::spawn(ts.server.accept(
        server_side,
        Bytes::from(leftover),
        derp::ConnInfo::new(addr),
    ));
    let mut c = Client::handshake(
        client_side,
        Bytes::new(),
        me.clone(),
        ClientOptions {
            server_key: None,
            ..Default::default()
        },
    )
    .await
    .expect("handshake");
    // The second ClientInfo sent by `Client::handshake` is ignored by the server.
    assert!(matches!(recv(&mut c).await, ReceivedFrame::ServerInfo(_)));
    assert_eq!(recv(&mut c).await, ReceivedFrame::Pong([2; 8]));
    c.send_packet(me.public(), b"loop").await.expect("send");
    let (src, data) = recv_packet(&mut c).await;
    assert_eq!((src, &data[..]), (me.public(), &b"loop"[..]));
}

#[tokio::test]
async fn disco_to_unknown_gets_rate_limited_not_here() {
    let ts = TestServer::start().await;
    let mut a = ts.client().await;
    let nobody = key().public();
    // Non-disco to an unknown key: silently dropped.
    a.send_packet(nobody, b"wireguard").await.expect("send");
    expect_silence(&mut a, Duration::from_millis(200)).await;
    assert_eq!(
        ts.metric("derp_packets_dropped{kind=\"other\",reason=\"unknown_dest\"}"),
        1.0
    );
    // Five disco packets → three NotHere (burst 3, 1/s).
    let disco = disco_packet();
    let started = std::time::Instant::now();
    for _ in 0..5 {
        a.send_packet(nobody, &disco).await.expect("send");
    }
    for _ in 0..3 {
        match recv(&mut a).await {
            ReceivedFrame::PeerGone { key, reason } => {
                assert_eq!(key, nobody);
                assert_eq!(reason, PeerGoneReason::NotHere);
            }
            other => panic!("expected NotHere, got {other:?}"),
        }
    }
    // No fourth within the same second (the limiter refills at 1/s: allow a little slack by
    // checking only a short window right after the burst).
    if started.elapsed() < Duration::from_millis(700) {
        expect_silence(&mut a, Duration::from_millis(200)).await;
    } else {
        // A very slow machine let the limiter refill; only the count below is meaningful.
        return;
    }
    assert_eq!(ts.metric("derp_peer_gone_not_here_frames"), 3.0);
    assert_eq!(
        ts.metric("derp_packets_dropped{kind=\"disco\",reason=\"unknown_dest\"}"),
        5.0
    );
}

#[tokio::test]
async fn slow_receiver_never_blocks_sender() {
    let ts = TestServer::with_config(|c| c.write_timeout = Duration::from_secs(60)).await;
    let a = ts.client().await;
    let mut b = ts.client().await;
    // `stuck` completes its handshake and then never reads again.
    let stuck = ts.client().await;
    let stuck_pub = stuck.public_key();
    let akey = a.public_key();
    let bkey = b.public_key();
    let (_ar, mut aw) = a.split();
    let pkt = vec![0xabu8; 16 * 1024];
    // Each round: many large packets to the stuck client, then one small packet to b;
    // b must keep receiving throughout (the sender is never blocked).
    for round in 0..200u32 {
        for _ in 0..8 {
            aw.buffer_packet(stuck_pub, &pkt).expect("buffer");
        }
        aw.buffer_packet(bkey, &round.to_be_bytes())
            .expect("buffer");
        within(aw.flush()).await.expect("flush");
        let (src, data) = recv_packet(&mut b).await;
        assert_eq!(src, akey);
        assert_eq!(&data[..], &round.to_be_bytes());
    }
    assert!(
        ts.metric("derp_packets_dropped{kind=\"other\",reason=\"queue_head\"}") > 0.0,
        "the stuck receiver's queue must overflow and drop from the head"
    );
    drop(stuck);
}

#[tokio::test]
async fn stalled_writer_is_disconnected_after_write_timeout() {
    let ts = TestServer::with_config(|c| c.write_timeout = Duration::from_millis(300)).await;
    let a = ts.client().await;
    let mut b = ts.client().await;
    let stuck = ts.client().await;
    let stuck_pub = stuck.public_key();
    let (_ar, mut aw) = a.split();
    let pkt = vec![0xcdu8; 60 * 1024];
    // Keep the stuck client's socket full until the server gives up on it.
    let mut rounds = 0;
    while ts.metric("derp_sclient_write_timeouts") < 1.0 {
        for _ in 0..8 {
            aw.buffer_packet(stuck_pub, &pkt).expect("buffer");
        }
        within(aw.flush()).await.expect("flush");
        tokio::time::sleep(Duration::from_millis(20)).await;
        rounds += 1;
        assert!(rounds < 1000, "write timeout never fired");
    }
    aw.flush().await.expect("flush");
    ts.wait_connections(2).await;
    // The sender and b are unaffected.
    aw.send_packet(b.public_key(), b"still here")
        .await
        .expect("send");
    let (_, data) = recv_packet(&mut b).await;
    assert_eq!(&data[..], b"still here");
    drop(stuck);
}

#[tokio::test]
async fn shutdown_sends_restarting_and_closes() {
    let ts = TestServer::start().await;
    let mut a = ts.client().await;
    let mut b = ts.client().await;
    let srv = ts.server.clone();
    let done = tokio::spawn(async move { srv.shutdown_with(Duration::from_secs(10)).await });
    for c in [&mut a, &mut b] {
        match recv(c).await {
            ReceivedFrame::Restarting {
                reconnect_in,
                try_for,
            } => {
                assert_eq!(reconnect_in, Duration::from_secs(1));
                assert_eq!(try_for, Duration::from_secs(30));
            }
            other => panic!("expected Restarting, got {other:?}"),
        }
        expect_closed(c).await;
    }
    assert!(
        within(done).await.expect("join"),
        "all connections finished"
    );
    assert_eq!(ts.server.connection_count(), 0);
}
