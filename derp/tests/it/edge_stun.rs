//! The STUN server answers Tailscale binding requests with the sender's address and ignores
//! anything else.

use std::time::Duration;

use derp::edge::stun::{serve, StunMetrics};
use tokio::net::UdpSocket;
use tokio_util::sync::CancellationToken;

fn with_fingerprint(mut b: Vec<u8>) -> Vec<u8> {
    // Recompute the trailing FINGERPRINT over everything before the attribute.
    let n = b.len();
    let crc = crc32fast::hash(&b[..n - 8]) ^ 0x5354_554e;
    b[n - 4..].copy_from_slice(&crc.to_be_bytes());
    b
}

async fn no_answer(client: &UdpSocket) {
    let mut buf = [0u8; 1500];
    let r = tokio::time::timeout(Duration::from_millis(300), client.recv_from(&mut buf)).await;
    assert!(r.is_err(), "expected no answer, got {r:?}");
}

#[tokio::test]
async fn edge_stun_answers_tailscale_requests_only() {
    let registry = prometheus::Registry::new();
    let metrics = StunMetrics::new(&registry).unwrap();
    let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let server_addr = sock.local_addr().unwrap();
    let cancel = CancellationToken::new();
    let task = tokio::spawn(serve(sock, metrics.clone(), cancel.clone()));

    let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    client.connect(server_addr).await.unwrap();
    let me = client.local_addr().unwrap();

    let txid = [7u8; 12];
    let good = proto::stun::build_binding_request(txid);
    client.send(&good).await.unwrap();
    let mut buf = [0u8; 1500];
    let n = tokio::time::timeout(Duration::from_secs(5), client.recv(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(n, 32, "IPv4 response is 32 bytes");
    let (got_txid, addr) = proto::stun::parse_binding_response(&buf[..n]).unwrap();
    assert_eq!(got_txid, txid);
    assert_eq!(addr, me);
    assert_eq!(&buf[0..2], &[0x01, 0x01]);

    // Wrong SOFTWARE (with a correct fingerprint).
    let mut wrong_sw = good.clone();
    let sw = wrong_sw.windows(8).position(|w| w == b"tailnode").unwrap();
    wrong_sw[sw..sw + 8].copy_from_slice(b"notnode!");
    client.send(&with_fingerprint(wrong_sw)).await.unwrap();
    no_answer(&client).await;

    // Bad fingerprint.
    let mut bad_fp = good.clone();
    let last = bad_fp.len() - 1;
    bad_fp[last] ^= 0xff;
    client.send(&bad_fp).await.unwrap();
    no_answer(&client).await;

    // Garbage.
    client
        .send(b"definitely not a STUN packet at all")
        .await
        .unwrap();
    no_answer(&client).await;

    // Still serving.
    client
        .send(&proto::stun::build_binding_request([9u8; 12]))
        .await
        .unwrap();
    let n = tokio::time::timeout(Duration::from_secs(5), client.recv(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        proto::stun::parse_binding_response(&buf[..n]).unwrap().0,
        [9u8; 12]
    );

    assert_eq!(metrics.success(), 2);
    assert_eq!(metrics.not_stun(), 3);
    let text = prometheus::TextEncoder::new()
        .encode_to_string(&registry.gather())
        .unwrap();
    assert!(
        text.contains("derp_stun_addrfamily_total{family=\"ipv4\"} 2"),
        "{text}"
    );

    cancel.cancel();
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn edge_stun_v4_mapped_source_gets_family_1() {
    // On a dual-stack socket IPv4 senders appear as ::ffff:a.b.c.d; we still answer family 1.
    let Ok(sock) = UdpSocket::bind("[::]:0").await else {
        return; // no IPv6 on this machine
    };
    let port = sock.local_addr().unwrap().port();
    let registry = prometheus::Registry::new();
    let metrics = StunMetrics::new(&registry).unwrap();
    let cancel = CancellationToken::new();
    tokio::spawn(serve(sock, metrics, cancel.clone()));
    let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    client
        .send_to(
            &proto::stun::build_binding_request([3u8; 12]),
            ("127.0.0.1", port),
        )
        .await
        .unwrap();
    let mut buf = [0u8; 1500];
    let r = tokio::time::timeout(Duration::from_secs(2), client.recv(&mut buf)).await;
    cancel.cancel();
    let Ok(Ok(n)) = r else {
        return; // dual-stack disabled (IPV6_V6ONLY=1): nothing to check
    };
    assert_eq!(n, 32);
    assert_eq!(buf[24 + 1], 0x01, "family IPv4");
    let (_, addr) = proto::stun::parse_binding_response(&buf[..n]).unwrap();
    assert_eq!(addr, client.local_addr().unwrap());
}
