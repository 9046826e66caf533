//! Loopback throughput smoke benchmark (ignored by default; run with
//! `cargo test -p derp --release --test it core_throughput -- --ignored --nocapture`).
//! Not an assertion of speed: it prints what one process achieves so regressions are visible.

use std::time::{Duration, Instant};

use crate::harness::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark; run explicitly in release mode"]
async fn loopback_pairs_throughput() {
    let ts = TestServer::start().await;
    let pairs = 4;
    let per_sender = 200_000u64;
    let size = 1400usize;
    let mut receivers = Vec::new();
    let mut senders = Vec::new();
    for _ in 0..pairs {
        let a = ts.client().await;
        let b = ts.client().await;
        let bkey = b.public_key();
        let counter = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let rc = counter.clone();
        receivers.push(tokio::spawn(async move {
            let mut b = b;
            let mut got = 0u64;
            let mut last = Instant::now();
            let deadline = Instant::now() + Duration::from_secs(60);
            while got < per_sender && Instant::now() < deadline {
                match tokio::time::timeout(Duration::from_secs(3), b.recv()).await {
                    Ok(Ok(derp::ReceivedFrame::Packet { .. })) => {
                        got += 1;
                        last = Instant::now();
                        if got.is_multiple_of(32) {
                            rc.store(got, std::sync::atomic::Ordering::Relaxed);
                        }
                    }
                    Ok(Ok(_)) => {}
                    Ok(Err(_)) | Err(_) => break,
                }
            }
            (got, last)
        }));
        senders.push((a, bkey, counter));
    }
    let start = Instant::now();
    let mut tasks = Vec::new();
    let window: u64 = std::env::var("DERP_BENCH_WINDOW")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(u64::MAX);
    for (a, bkey, counter) in senders {
        tasks.push(tokio::spawn(async move {
            let (_r, mut w) = a.split();
            let pkt = vec![0x5au8; size];
            let mut sent = 0u64;
            while sent < per_sender {
                // Optional closed loop: keep at most `window` packets in flight.
                while sent.saturating_sub(counter.load(std::sync::atomic::Ordering::Relaxed))
                    > window
                {
                    tokio::task::yield_now().await;
                }
                for _ in 0..32 {
                    w.buffer_packet(bkey, &pkt).expect("buffer");
                }
                w.flush().await.expect("flush");
                sent += 32;
            }
            (_r, w)
        }));
    }
    let mut keep = Vec::new();
    for t in tasks {
        keep.push(t.await.expect("sender"));
    }
    eprintln!(
        "senders done after {:.2}s; server read {} packets, wrote {}",
        start.elapsed().as_secs_f64(),
        ts.metric("derp_packets_received"),
        ts.metric("derp_packets_sent")
    );
    let mut total = 0u64;
    let mut end = start;
    for r in receivers {
        let (got, last) = r.await.expect("receiver");
        eprintln!(
            "receiver got {got}, last at {:.2}s",
            (last - start).as_secs_f64()
        );
        total += got;
        end = end.max(last);
    }
    eprintln!(
        "server wrote {}, write timeouts {}",
        ts.metric("derp_packets_sent"),
        ts.metric("derp_sclient_write_timeouts")
    );
    let secs = (end - start).as_secs_f64();
    let dropped = ts.metric("derp_packets_dropped{kind=\"other\",reason=\"queue_head\"}");
    eprintln!(
        "{pairs} pairs, {size}-byte packets: delivered {total} in {secs:.2}s = {:.0} pkt/s, \
         {:.2} Gbit/s payload; head drops {dropped}",
        total as f64 / secs,
        total as f64 * size as f64 * 8.0 / secs / 1e9
    );
    let fams = prometheus::TextEncoder::new()
        .encode_to_string(&ts.registry.gather())
        .expect("encode");
    for l in fams
        .lines()
        .filter(|l| l.starts_with("derp_buffered_write_frames_"))
    {
        eprintln!("{l}");
    }
    drop(keep);
}
