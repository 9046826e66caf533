//! Every kind of bad input ends only the offending connection, is counted, and leaves other
//! clients relaying.

use std::time::Duration;

use crate::harness::*;
use derp::{AdmitFn, Client, ClientOptions};
use proto::derp::{client_info_frame, parse_server_key, ClientInfo};
use proto::key::NodePublic;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

async fn read_server_key(tcp: &mut TcpStream) -> NodePublic {
    let mut hdr = [0u8; 45];
    within(tcp.read_exact(&mut hdr)).await.expect("server key");
    assert_eq!(&hdr[..5], &[0x01, 0, 0, 0, 40]);
    parse_server_key(&hdr[5..]).expect("parse")
}

/// A pair that must keep working, plus the server.
async fn setup_with(f: impl FnOnce(&mut derp::ServerConfig)) -> (TestServer, Client, Client) {
    let ts = TestServer::with_config(f).await;
    let a = ts.client().await;
    let b = ts.client().await;
    (ts, a, b)
}

async fn setup() -> (TestServer, Client, Client) {
    setup_with(|_| {}).await
}

async fn still_relays(ts: &TestServer, a: &mut Client, b: &mut Client) {
    assert_pair_relays(ts, a, b, b"a->b").await;
    assert_pair_relays(ts, b, a, b"b->a").await;
    assert_eq!(ts.server.connection_count(), 2);
}

async fn handshake_failure(ts: &TestServer, reason: &str) {
    ts.wait_metric(
        &format!("derp_handshake_failures{{reason=\"{reason}\"}}"),
        1.0,
    )
    .await;
}

async fn protocol_error(ts: &TestServer, kind: &str) {
    ts.wait_metric(&format!("derp_protocol_errors{{kind=\"{kind}\"}}"), 1.0)
        .await;
}

// ---------------------------------------------------------------- handshake

#[tokio::test]
async fn first_frame_not_client_info() {
    let (ts, mut a, mut b) = setup().await;
    let mut tcp = ts.raw().await;
    read_server_key(&mut tcp).await;
    let mut f = vec![0x04, 0, 0, 0, 33];
    f.extend_from_slice(&[1u8; 33]);
    tcp.write_all(&f).await.expect("write");
    expect_raw_closed(&mut tcp).await;
    handshake_failure(&ts, "not_client_info").await;
    still_relays(&ts, &mut a, &mut b).await;
}

#[tokio::test]
async fn garbage_instead_of_client_info() {
    let (ts, mut a, mut b) = setup().await;
    let mut tcp = ts.raw().await;
    read_server_key(&mut tcp).await;
    tcp.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .expect("write");
    expect_raw_closed(&mut tcp).await;
    handshake_failure(&ts, "not_client_info").await;
    still_relays(&ts, &mut a, &mut b).await;
}

#[tokio::test]
async fn client_info_that_does_not_open() {
    let (ts, mut a, mut b) = setup().await;
    let mut tcp = ts.raw().await;
    read_server_key(&mut tcp).await;
    // Sealed to the wrong server key.
    let wrong_server = key().public();
    let f = client_info_frame(&key(), &wrong_server, &ClientInfo::default(), [1; 24]);
    tcp.write_all(&f).await.expect("write");
    expect_raw_closed(&mut tcp).await;
    handshake_failure(&ts, "open_failed").await;
    still_relays(&ts, &mut a, &mut b).await;
}

#[tokio::test]
async fn client_info_with_zero_key() {
    let (ts, mut a, mut b) = setup().await;
    let mut tcp = ts.raw().await;
    read_server_key(&mut tcp).await;
    let mut f = vec![0x02, 0, 0, 0, 100];
    f.extend_from_slice(&[0u8; 100]);
    tcp.write_all(&f).await.expect("write");
    expect_raw_closed(&mut tcp).await;
    handshake_failure(&ts, "zero_key").await;
    still_relays(&ts, &mut a, &mut b).await;
}

#[tokio::test]
async fn client_info_with_bad_json() {
    let (ts, mut a, mut b) = setup().await;
    let mut tcp = ts.raw().await;
    let server = read_server_key(&mut tcp).await;
    let me = key();
    let mut payload = me.public().as_bytes().to_vec();
    payload.extend_from_slice(&me.seal_to(&server, b"{not json", [2; 24]));
    let mut f = vec![0x02];
    f.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    f.extend_from_slice(&payload);
    tcp.write_all(&f).await.expect("write");
    expect_raw_closed(&mut tcp).await;
    handshake_failure(&ts, "bad_json").await;
    still_relays(&ts, &mut a, &mut b).await;
}

#[tokio::test]
async fn client_info_too_large() {
    let (ts, mut a, mut b) = setup().await;
    let mut tcp = ts.raw().await;
    read_server_key(&mut tcp).await;
    // Declares 256 KiB + 1: rejected from the header, before the payload is read.
    tcp.write_all(&[0x02, 0x00, 0x04, 0x00, 0x01])
        .await
        .expect("write");
    expect_raw_closed(&mut tcp).await;
    handshake_failure(&ts, "bad_length").await;
    still_relays(&ts, &mut a, &mut b).await;
}

#[tokio::test]
async fn handshake_that_never_completes_times_out() {
    let (ts, mut a, mut b) = setup_with(|c| c.handshake_timeout = Duration::from_millis(300)).await;
    let mut silent = ts.raw().await;
    read_server_key(&mut silent).await;
    // And one that sends half a ClientInfo.
    let mut partial = ts.raw().await;
    read_server_key(&mut partial).await;
    partial
        .write_all(&[0x02, 0, 0, 0, 100, 1, 2, 3])
        .await
        .expect("write");
    expect_raw_closed(&mut silent).await;
    expect_raw_closed(&mut partial).await;
    ts.wait_metric("derp_handshake_failures{reason=\"timeout\"}", 2.0)
        .await;
    still_relays(&ts, &mut a, &mut b).await;
}

#[tokio::test]
async fn admission_rejects_unknown_keys() {
    let allowed = key();
    let allowed_pub = allowed.public();
    let ts = TestServer::with_config(move |c| {
        c.admission = Some(std::sync::Arc::new(AdmitFn(
            move |k: &NodePublic, ip: std::net::IpAddr| *k == allowed_pub && ip.is_loopback(),
        )));
    })
    .await;
    let mut ok = ts.client_with(allowed, ClientOptions::default()).await;
    let tcp = ts.raw().await;
    let mut denied = Client::handshake(tcp, bytes::Bytes::new(), key(), ClientOptions::default())
        .await
        .expect("handshake write succeeds");
    expect_closed(&mut denied).await;
    handshake_failure(&ts, "admission_denied").await;
    ok.send_packet(ok.public_key(), b"self")
        .await
        .expect("send");
    recv_packet(&mut ok).await;
    assert_eq!(ts.server.connection_count(), 1);
}

#[tokio::test]
async fn mesh_key_bypasses_admission() {
    let mesh = proto::key::MeshKey::from_bytes([5; 32]);
    let ts = TestServer::with_config(move |c| {
        c.mesh_key = Some(mesh);
        c.admission = Some(std::sync::Arc::new(AdmitFn(|_: &NodePublic, _| false)));
    })
    .await;
    let opts = ClientOptions {
        mesh_key: Some(mesh),
        ..Default::default()
    };
    let mut m = ts.client_with(key(), opts).await;
    m.ping([1; 8]).await.expect("ping");
    assert_eq!(recv(&mut m).await, derp::ReceivedFrame::Pong([1; 8]));
}

// ---------------------------------------------------------------- after the handshake

async fn bad_frame_closes(typ: u8, payload: &[u8], kind: &str) {
    let (ts, mut a, mut b) = setup().await;
    let mut bad = ts.client().await;
    bad.send_raw_frame(typ, payload).await.expect("send");
    expect_closed(&mut bad).await;
    protocol_error(&ts, kind).await;
    still_relays(&ts, &mut a, &mut b).await;
}

#[tokio::test]
async fn send_packet_shorter_than_a_key() {
    bad_frame_closes(0x04, &[1u8; 31], "short_send_packet").await;
}

#[tokio::test]
async fn send_packet_larger_than_64k() {
    let (ts, mut a, mut b) = setup().await;
    let mut bad = ts.client().await;
    // Header only: 32 + 65537 bytes declared; rejected before the payload arrives.
    let len = (32u32 + 65537).to_be_bytes();
    bad.writer()
        .send_raw_bytes(&[0x04, len[0], len[1], len[2], len[3]])
        .await
        .expect("send");
    expect_closed(&mut bad).await;
    protocol_error(&ts, "send_packet_too_large").await;
    still_relays(&ts, &mut a, &mut b).await;
}

#[tokio::test]
async fn frame_declaring_more_than_one_mib() {
    let (ts, mut a, mut b) = setup().await;
    let mut bad = ts.client().await;
    bad.writer()
        .send_raw_bytes(&[0x0b, 0x00, 0x10, 0x00, 0x01])
        .await
        .expect("send");
    expect_closed(&mut bad).await;
    protocol_error(&ts, "frame_too_large").await;
    still_relays(&ts, &mut a, &mut b).await;
}

#[tokio::test]
async fn garbage_instead_of_a_frame() {
    let (ts, mut a, mut b) = setup().await;
    let mut bad = ts.client().await;
    // "GET " = type 0x47, length 0x4554202f (> 1 MiB).
    bad.writer()
        .send_raw_bytes(b"GET /derp HTTP/1.1\r\n\r\n")
        .await
        .expect("send");
    expect_closed(&mut bad).await;
    protocol_error(&ts, "frame_too_large").await;
    still_relays(&ts, &mut a, &mut b).await;
}

#[tokio::test]
async fn note_preferred_with_wrong_length() {
    bad_frame_closes(0x07, &[1, 1], "bad_note_preferred").await;
}

#[tokio::test]
async fn ping_too_short() {
    bad_frame_closes(0x12, &[1, 2, 3, 4], "bad_ping").await;
}

#[tokio::test]
async fn ping_too_long() {
    bad_frame_closes(0x12, &[0u8; 1001], "bad_ping").await;
}

#[tokio::test]
async fn non_mesh_watch_conns() {
    bad_frame_closes(0x10, &[], "insufficient_permissions").await;
}

#[tokio::test]
async fn non_mesh_close_peer() {
    bad_frame_closes(0x11, &[9u8; 32], "insufficient_permissions").await;
}

#[tokio::test]
async fn non_mesh_forward_packet() {
    bad_frame_closes(0x0a, &[9u8; 80], "insufficient_permissions").await;
}

#[tokio::test]
async fn unknown_frames_are_skipped_not_fatal() {
    let (ts, mut a, mut b) = setup().await;
    let mut c = ts.client().await;
    c.send_raw_frame(0x0b, &[7u8; 100]).await.expect("send");
    c.send_raw_frame(0x13, &[0u8; 8])
        .await
        .expect("pong from client");
    c.send_raw_frame(0x06, &[])
        .await
        .expect("keepalive from client");
    // A large unknown frame (900 KiB) is discarded as it streams in.
    c.send_raw_frame(0x30, &vec![1u8; 900 * 1024])
        .await
        .expect("send");
    c.ping([4; 8]).await.expect("ping");
    assert_eq!(recv(&mut c).await, derp::ReceivedFrame::Pong([4; 8]));
    assert_eq!(ts.metric("derp_unknown_frames"), 4.0);
    assert_pair_relays(&ts, &mut a, &mut b, b"a->b").await;
    assert_eq!(ts.server.connection_count(), 3);
}

#[tokio::test]
async fn client_vanishing_mid_frame() {
    let (ts, mut a, mut b) = setup().await;
    let mut bad = ts.client().await;
    bad.writer()
        .send_raw_bytes(&[0x04, 0, 0, 4, 0, 1, 2, 3])
        .await
        .expect("send");
    drop(bad);
    ts.wait_connections(2).await;
    still_relays(&ts, &mut a, &mut b).await;
}
