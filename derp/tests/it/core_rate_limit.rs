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

/// Sends `n` packets of `size` bytes from `a` to `b`; returns how many `b` received and when the
/// last one arrived. Without a limit a flood may overflow `b`'s queue (derper drops from the head
/// then), so reception also ends 500 ms after the last packet once everything was sent.
async fn pump(
    a: &mut derp::Client,
    b: &mut derp::Client,
    n: usize,
    size: usize,
) -> (usize, Duration) {
    let dst = b.public_key();
    let payload = vec![0x5a; size];
    let t0 = Instant::now();
    let sent = std::sync::atomic::AtomicBool::new(false);
    let recv = async {
        let (mut got, mut last) = (0, Duration::ZERO);
        while got < n {
            let wait = if sent.load(std::sync::atomic::Ordering::Acquire) {
                Duration::from_millis(500)
            } else {
                Duration::from_secs(20)
            };
            let Ok(frame) = tokio::time::timeout(wait, b.recv()).await else {
                break;
            };
            if let ReceivedFrame::Packet { data, .. } = frame.expect("recv") {
                assert_eq!(data.len(), size);
                got += 1;
                last = t0.elapsed();
            }
        }
        (got, last)
    };
    let send = async {
        for _ in 0..n {
            a.send_packet(dst, &payload).await.expect("send");
        }
        sent.store(true, std::sync::atomic::Ordering::Release);
    };
    let (got, ()) = tokio::join!(recv, send);
    got
}

fn dropped(ts: &TestServer) -> f64 {
    ts.metric("derp_packets_dropped{kind=\"other\",reason=\"queue_head\"}")
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
    // 1.2 MB at 1 MB/s with a 65 568-byte bucket: at least ~1.1 s, and every packet arrives:
    // the limit is backpressure, not drops.
    let (got, took) = pump(&mut a, &mut b, 120, 10_000).await;
    assert_eq!(got, 120);
    assert_eq!(dropped(&ts), 0.0);
    assert!(took >= Duration::from_millis(1_050), "took {took:?}");
    assert!(took < Duration::from_secs(4), "took {took:?}");
    assert!(ts.metric("derp_rate_limit_per_client_waited") > 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn core_rate_limit_follows_changes_on_existing_connections() {
    let ts = TestServer::start().await;
    let mut a = ts.client().await;
    let mut b = ts.client().await;
    let (_, fast) = pump(&mut a, &mut b, 120, 10_000).await;
    assert!(fast < Duration::from_millis(800), "unlimited took {fast:?}");
    assert_eq!(ts.metric("derp_rate_limit_per_client_waited"), 0.0);
    let applied = ts.server.set_rate_config(limit());
    assert_eq!(applied.per_client_rate_burst_bytes, 65_568);
    let before = dropped(&ts);
    let (got, slow) = pump(&mut a, &mut b, 120, 10_000).await;
    assert_eq!((got, dropped(&ts)), (120, before));
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
    let waited = ts.metric("derp_rate_limit_per_client_waited");
    let (_, fast) = pump(&mut a, &mut b, 120, 10_000).await;
    assert!(
        fast < Duration::from_millis(800),
        "unlimited again took {fast:?}"
    );
    assert_eq!(ts.metric("derp_rate_limit_per_client_waited"), waited);
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
    let (_, took) = pump(&mut mesh, &mut b, 120, 10_000).await;
    assert!(took < Duration::from_millis(800), "mesh peer took {took:?}");
    assert_eq!(ts.metric("derp_rate_limit_per_client_waited"), 0.0);
}
