//! The per-client receive rate limit (derper's `-rate-config`): reading slows down to the
//! configured rate, nothing is dropped, the limit follows configuration changes on existing
//! connections, mesh peers are exempt, and ServerInfo announces nothing.

use std::time::{Duration, Instant};

use derp::{ClientOptions, RateConfig, ReceivedFrame};
use proto::key::MeshKey;

use crate::harness::*;

const RATE: u64 = 1_000_000;

fn limit() -> RateConfig {
    RateConfig {
        per_client_rate_limit_bytes_per_sec: RATE,
        per_client_rate_burst_bytes: 0,
    }
}

/// Sends `n` packets of `size` bytes from `a` to `b` and returns how long until `b` had them all.
async fn pump(a: &mut derp::Client, b: &mut derp::Client, n: usize, size: usize) -> Duration {
    let dst = b.public_key();
    let payload = vec![0x5a; size];
    let t0 = Instant::now();
    // Receive concurrently so the receiver's queue never overflows.
    let recv = async {
        let mut got = 0;
        while got < n {
            let frame = tokio::time::timeout(Duration::from_secs(20), b.recv())
                .await
                .expect("receiver stalled")
                .expect("recv");
            if let ReceivedFrame::Packet { data, .. } = frame {
                assert_eq!(data.len(), size);
                got += 1;
            }
        }
        got
    };
    let send = async {
        for _ in 0..n {
            a.send_packet(dst, &payload).await.expect("send");
        }
    };
    let (got, ()) = tokio::join!(recv, send);
    assert_eq!(
        got, n,
        "every packet arrives: the limit is backpressure, not drops"
    );
    t0.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn core_rate_limit_slows_reading_without_drops() {
    let ts = TestServer::with_config(|c| c.rate_config = limit()).await;
    assert_eq!(
        ts.metric("derp_rate_limit_per_client_bytes_per_second"),
        RATE as f64
    );
    // The burst is raised to one maximum-size frame.
    assert_eq!(
        ts.metric("derp_rate_limit_per_client_burst_bytes"),
        65_568.0
    );
    let mut a = ts.client().await;
    let mut b = ts.client().await;
    // 1.2 MB at 1 MB/s with a 65 568-byte bucket: at least ~1.1 s.
    let took = pump(&mut a, &mut b, 120, 10_000).await;
    assert!(took >= Duration::from_millis(1_050), "took {took:?}");
    assert!(took < Duration::from_secs(4), "took {took:?}");
    assert!(ts.metric("derp_rate_limit_per_client_waited") > 0.0);
    assert_eq!(
        ts.metric("derp_packets_dropped{kind=\"other\",reason=\"queue_head\"}"),
        0.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn core_rate_limit_follows_changes_on_existing_connections() {
    let ts = TestServer::start().await;
    let mut a = ts.client().await;
    let mut b = ts.client().await;
    let fast = pump(&mut a, &mut b, 120, 10_000).await;
    assert!(fast < Duration::from_millis(800), "unlimited took {fast:?}");
    assert_eq!(ts.metric("derp_rate_limit_per_client_waited"), 0.0);
    let applied = ts.server.set_rate_config(limit());
    assert_eq!(applied.per_client_rate_burst_bytes, 65_568);
    let slow = pump(&mut a, &mut b, 120, 10_000).await;
    assert!(
        slow >= Duration::from_millis(1_050),
        "limited took {slow:?}"
    );
    // Rate 0 turns it off again.
    ts.server.set_rate_config(RateConfig::default());
    assert_eq!(
        ts.metric("derp_rate_limit_per_client_bytes_per_second"),
        0.0
    );
    let fast = pump(&mut a, &mut b, 120, 10_000).await;
    assert!(
        fast < Duration::from_millis(800),
        "unlimited again took {fast:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn core_rate_limit_exempts_mesh_peers_and_is_not_announced() {
    const MESH: MeshKey = MeshKey::from_bytes([0x42; 32]);
    let ts = TestServer::with_config(|c| {
        c.rate_config = limit();
        c.mesh_key = Some(MESH);
    })
    .await;
    // ServerInfo stays {"version":2}: a token bucket there would make Go clients drop packets.
    let tcp = tokio::net::TcpStream::connect(ts.addr).await.unwrap();
    let mut c = derp::Client::handshake(tcp, bytes::Bytes::new(), key(), Default::default())
        .await
        .unwrap();
    match recv(&mut c).await {
        ReceivedFrame::ServerInfo(i) => {
            assert_eq!(i.version, 2);
            assert_eq!(i.token_bucket_bytes_per_second, 0);
            assert_eq!(i.token_bucket_bytes_burst, 0);
        }
        other => panic!("expected ServerInfo, got {other:?}"),
    }
    let opts = ClientOptions {
        mesh_key: Some(MESH),
        ..Default::default()
    };
    let mut mesh = ts.client_with(key(), opts).await;
    let mut b = ts.client().await;
    let took = pump(&mut mesh, &mut b, 120, 10_000).await;
    assert!(took < Duration::from_millis(800), "mesh peer took {took:?}");
    assert_eq!(ts.metric("derp_rate_limit_per_client_waited"), 0.0);
}
