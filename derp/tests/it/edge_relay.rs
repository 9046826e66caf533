//! End-to-end relay through the HTTP edge: plain Upgrade, TLS (fast start + meta cert), WebSocket
//! (plain and TLS), the exact 101, pipelined fast start, 426, garbage heads, WebSocket text.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use crate::harness::*;
use bytes::Bytes;
use derp::client::{Client, ClientOptions};
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::Message;
use x509_parser::prelude::{FromDer, X509Certificate};

#[tokio::test]
async fn edge_relay_plain_upgrade() {
    let relay = Relay::start().await;
    let mut a = dial_ok(&relay.http_url(), DialOptionsExt::plain(key())).await;
    let mut b = dial_ok(&relay.http_url(), DialOptionsExt::plain(key())).await;
    assert!(!a.fast_start, "no fast start without TLS");
    relay.wait_connected(&a.client.public_key()).await;
    relay.wait_connected(&b.client.public_key()).await;
    assert_eq!(a.client.server_public_key(), relay.server.public_key());
    relay_sizes(&mut a.client, &mut b.client).await;
    assert_eq!(
        relay.metric("derp_http_connections_total", &[("kind", "derp")]),
        2.0
    );
}

struct DialOptionsExt;
impl DialOptionsExt {
    fn plain(k: proto::key::NodePrivate) -> derp::client::dial::DialOptions {
        derp::client::dial::DialOptions::new(k)
    }
}

#[tokio::test]
async fn edge_relay_tls_fast_start_and_meta_cert() {
    let relay = Relay::start_tls().await;
    let mut a = dial_ok(&relay.https_url(), insecure(key())).await;
    let mut b = dial_ok(&relay.https_url(), insecure(key())).await;
    assert_eq!(a.tls_version, Some(rustls::ProtocolVersion::TLSv1_3));
    assert!(
        a.fast_start && b.fast_start,
        "fast start on TLS 1.3 with meta cert"
    );
    // Served chain = [leaf, meta cert]; the meta cert names our DERP key, serial 2.
    assert_eq!(a.peer_certificates.len(), 2);
    let leaf = std::fs::read(&relay.cert_path).unwrap();
    assert!(String::from_utf8_lossy(&leaf).contains("BEGIN CERTIFICATE"));
    let (_, meta) = X509Certificate::from_der(a.peer_certificates[1].as_ref()).unwrap();
    let cn = meta
        .subject()
        .iter_common_name()
        .next()
        .unwrap()
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(
        cn,
        format!(
            "derpkey{}",
            hex::encode(relay.server.public_key().as_bytes())
        )
    );
    assert_eq!(meta.tbs_certificate.raw_serial(), &[2]);
    relay.wait_connected(&a.client.public_key()).await;
    relay.wait_connected(&b.client.public_key()).await;
    relay_sizes(&mut a.client, &mut b.client).await;
    assert_eq!(
        relay.metric(
            "derp_http_connections_total",
            &[("kind", "derp_fast_start")]
        ),
        2.0
    );

    // Without fast start the same TLS listener answers with the 101.
    let mut o = insecure(key());
    o.fast_start = false;
    let mut c = dial_ok(&relay.https_url(), o).await;
    assert!(!c.fast_start);
    relay.wait_connected(&c.client.public_key()).await;
    relay_sizes(&mut a.client, &mut c.client).await;
}

#[tokio::test]
async fn edge_relay_websocket_plain_and_tls() {
    let relay = Relay::start_tls().await;
    let mut o = DialOptionsExt::plain(key());
    o.websocket = true;
    let mut a = dial_ok(&relay.http_url(), o).await;
    let mut o = insecure(key());
    o.websocket = true;
    let mut b = dial_ok(&relay.https_url(), o).await;
    assert!(!b.fast_start);
    // A raw-upgrade client talks to both WebSocket clients.
    let mut c = dial_ok(&relay.http_url(), DialOptionsExt::plain(key())).await;
    for k in [
        a.client.public_key(),
        b.client.public_key(),
        c.client.public_key(),
    ] {
        relay.wait_connected(&k).await;
    }
    relay_sizes(&mut a.client, &mut b.client).await;
    relay_sizes(&mut c.client, &mut a.client).await;
    assert_eq!(
        relay.metric("derp_http_connections_total", &[("kind", "websocket")]),
        2.0
    );
}

#[tokio::test]
async fn edge_exact_101_bytes_then_server_key() {
    let relay = Relay::start().await;
    let mut s = TcpStream::connect(relay.http_addr).await.unwrap();
    s.write_all(b"GET /derp HTTP/1.1\r\nHost: x\r\nUpgrade: DERP\r\nConnection: Upgrade\r\n\r\n")
        .await
        .unwrap();
    let expected = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: DERP\r\nConnection: Upgrade\r\nDerp-Version: 2\r\nDerp-Public-Key: {}\r\n\r\n",
        hex::encode(relay.server.public_key().as_bytes())
    );
    let mut got = vec![0u8; expected.len() + 5 + 40];
    tokio::time::timeout(SOON, s.read_exact(&mut got))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&got[..expected.len()]), expected);
    let frame = &got[expected.len()..];
    assert_eq!(frame[0], 0x01, "ServerKey frame");
    assert_eq!(&frame[1..5], &40u32.to_be_bytes());
    assert_eq!(&frame[5..13], "DERP🔑".as_bytes());
    assert_eq!(&frame[13..45], relay.server.public_key().as_bytes());
}

/// Records every write call; merges `prefix` into the first one (like the Go client's bufio).
struct Recording<IO> {
    inner: IO,
    prefix: Option<Bytes>,
    writes: Arc<Mutex<Vec<Vec<u8>>>>,
    reads: Arc<Mutex<Vec<u8>>>,
}

impl<IO: AsyncRead + Unpin> AsyncRead for Recording<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        let new = buf.filled()[before..].to_vec();
        self.reads.lock().unwrap().extend_from_slice(&new);
        r
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Recording<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let mut data = match &self.prefix {
            Some(p) => p.to_vec(),
            None => Vec::new(),
        };
        data.extend_from_slice(buf);
        // Small loopback writes complete at once; the test asserts that.
        match Pin::new(&mut self.inner).poll_write(cx, &data) {
            Poll::Ready(Ok(n)) => {
                assert_eq!(n, data.len(), "loopback write completed whole");
                self.prefix = None;
                self.writes.lock().unwrap().push(data);
                Poll::Ready(Ok(buf.len()))
            }
            other => other,
        }
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[tokio::test]
async fn edge_fast_start_pipelined_in_one_write() {
    let relay = Relay::start().await;
    let tcp = TcpStream::connect(relay.http_addr).await.unwrap();
    tcp.set_nodelay(true).unwrap();
    let request = b"GET /derp HTTP/1.1\r\nHost: x\r\nUpgrade: DERP\r\nConnection: Upgrade\r\nDerp-Fast-Start: 1\r\nIdeal-Node: node-1\r\n\r\n";
    let writes = Arc::new(Mutex::new(Vec::new()));
    let reads = Arc::new(Mutex::new(Vec::new()));
    let io = Recording {
        inner: tcp,
        prefix: Some(Bytes::from_static(request)),
        writes: writes.clone(),
        reads: reads.clone(),
    };
    let opts = ClientOptions {
        server_key: Some(relay.server.public_key()),
        can_ack_pings: true,
        ..ClientOptions::default()
    };
    let mut a = Client::handshake(io, Bytes::new(), key(), opts)
        .await
        .unwrap();
    expect_server_info(&mut a).await;
    {
        let w = writes.lock().unwrap();
        assert_eq!(w.len(), 1, "request and ClientInfo left in one write");
        assert!(w[0].starts_with(request));
        assert_eq!(
            w[0][request.len()],
            0x02,
            "ClientInfo frame right after the head"
        );
    }
    let mut b = dial_ok(&relay.http_url(), DialOptionsExt::plain(key())).await;
    relay.wait_connected(&a.public_key()).await;
    relay.wait_connected(&b.client.public_key()).await;
    relay_sizes(&mut a, &mut b.client).await;
    // No HTTP response on fast start: the stream starts with the ServerKey frame.
    let r = reads.lock().unwrap();
    assert_eq!(
        r[0], 0x01,
        "first byte is the ServerKey frame type, not HTTP"
    );
    assert_eq!(&r[5..13], "DERP🔑".as_bytes());
}

#[tokio::test]
async fn edge_plain_get_derp_is_426() {
    let relay = Relay::start().await;
    let r = get(relay.http_addr, "/derp", "").await;
    assert_eq!(r.status, 426);
    assert_eq!(r.body, b"DERP requires connection upgrade");
    let r = get(relay.http_addr, "/derp", "Upgrade: h2c\r\n").await;
    assert_eq!(r.status, 426);
}

#[tokio::test]
async fn edge_garbage_head_gets_400_and_close() {
    let relay = Relay::start().await;
    let out = raw_exchange(relay.http_addr, b"\x16\x03\x01\x02\x00garbage\r\n\r\n").await;
    assert!(
        out.starts_with(b"HTTP/1.1 400"),
        "{:?}",
        String::from_utf8_lossy(&out)
    );
    // An oversized head (no terminator within 16 KiB) gets 431.
    let mut big = b"GET / HTTP/1.1\r\nX: ".to_vec();
    big.extend(std::iter::repeat_n(b'a', 20_000));
    let out = raw_exchange(relay.http_addr, &big).await;
    assert!(
        out.starts_with(b"HTTP/1.1 431"),
        "{:?}",
        String::from_utf8_lossy(&out)
    );
    assert_eq!(
        relay.metric("derp_http_bad_requests_total", &[("reason", "malformed")]),
        1.0
    );
    assert_eq!(
        relay.metric("derp_http_bad_requests_total", &[("reason", "too_large")]),
        1.0
    );
    // The relay still works.
    let r = get(relay.http_addr, "/derp/probe", "").await;
    assert_eq!(r.status, 200);
}

#[tokio::test]
async fn edge_websocket_text_message_ends_only_that_connection() {
    let relay = Relay::start().await;
    let mut o = DialOptionsExt::plain(key());
    o.websocket = true;
    let mut a = dial_ok(&relay.http_url(), o.clone()).await;
    o.private_key = key();
    let mut b = dial_ok(&relay.http_url(), o).await;
    relay.wait_connected(&a.client.public_key()).await;
    relay.wait_connected(&b.client.public_key()).await;

    let mut req = format!("ws://{}/derp", relay.http_addr)
        .into_client_request()
        .unwrap();
    req.headers_mut()
        .insert("Sec-WebSocket-Protocol", "derp".parse().unwrap());
    let (mut ws, resp) =
        tokio_tungstenite::client_async(req, TcpStream::connect(relay.http_addr).await.unwrap())
            .await
            .unwrap();
    assert_eq!(
        resp.headers().get("sec-websocket-protocol").unwrap(),
        "derp"
    );
    // The server speaks first: ServerKey in a binary message.
    match tokio::time::timeout(SOON, ws.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap()
    {
        Message::Binary(b) => assert_eq!(b[0], 0x01),
        other => panic!("unexpected {other:?}"),
    }
    ws.send(Message::Text("hello".into())).await.unwrap();
    let mut saw_1003 = false;
    while let Ok(Some(msg)) = tokio::time::timeout(SOON, ws.next()).await {
        match msg {
            Ok(Message::Close(Some(f))) => {
                assert_eq!(f.code, CloseCode::Unsupported);
                saw_1003 = true;
            }
            Ok(_) => {}
            Err(_) => break,
        }
    }
    assert!(saw_1003, "closed with 1003");
    assert_eq!(relay.metric("derp_websocket_text_messages_total", &[]), 1.0);
    // The other pair keeps relaying.
    relay_sizes(&mut a.client, &mut b.client).await;
}

#[tokio::test]
async fn edge_ideal_node_header_reaches_the_server() {
    let mesh = proto::key::MeshKey::from_bytes([5u8; 32]);
    let relay = Relay::with(RelayOptions {
        tls: true,
        mesh_key: Some(mesh),
        ..RelayOptions::default()
    })
    .await;
    let mut o = DialOptionsExt::plain(key());
    o.mesh_key = Some(mesh);
    let mut watcher = dial_ok(&relay.http_url(), o).await;
    watcher.client.watch_conns().await.unwrap();

    // Fast start over TLS, raw upgrade over HTTP and WebSocket, each with Ideal-Node.
    let mut keys = Vec::new();
    let mut conns = Vec::new();
    for (url, ws) in [
        (relay.https_url(), false),
        (relay.http_url(), false),
        (relay.http_url(), true),
    ] {
        let mut o = insecure(key());
        o.ideal_node = Some("derp1a".into());
        o.websocket = ws;
        let d = dial_ok(&url, o).await;
        keys.push(d.client.public_key());
        conns.push(d);
    }
    assert!(conns[0].fast_start);
    let plain = dial_ok(&relay.http_url(), DialOptionsExt::plain(key())).await;
    let plain_key = plain.client.public_key();

    let mut seen = std::collections::HashMap::new();
    tokio::time::timeout(SOON, async {
        while seen.len() < 4
            || !keys
                .iter()
                .chain([&plain_key])
                .all(|k| seen.contains_key(k))
        {
            if let derp::ReceivedFrame::PeerPresent { key, flags, .. } =
                watcher.client.recv().await.unwrap()
            {
                seen.insert(key, flags);
            }
        }
    })
    .await
    .unwrap();
    for k in &keys {
        assert!(
            seen[k].contains(proto::derp::PeerPresentFlags::NOT_IDEAL),
            "{k}: {:?}",
            seen[k]
        );
    }
    assert!(!seen[&plain_key].contains(proto::derp::PeerPresentFlags::NOT_IDEAL));
}

#[tokio::test]
async fn edge_head_arriving_in_pieces_with_pipelined_bytes() {
    // The head trickles in, and the last piece carries bytes past the head: they must reach the
    // DERP reader (here: a ClientInfo that is not valid, so the server closes after ServerKey —
    // proving the leftover was consumed as DERP, not as HTTP).
    let relay = Relay::start().await;
    let mut s = TcpStream::connect(relay.http_addr).await.unwrap();
    s.set_nodelay(true).unwrap();
    for piece in [&b"GET /de"[..], b"rp HTTP/1.1\r\nUpgr", b"ade: DERP\r\n"] {
        s.write_all(piece).await.unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    // End of head + a bogus frame (type 0x02, length 4, junk) in the same write.
    s.write_all(b"\r\n\x02\x00\x00\x00\x04junk").await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(SOON, s.read_to_end(&mut out))
        .await
        .unwrap()
        .ok();
    let text = String::from_utf8_lossy(&out);
    assert!(
        text.starts_with("HTTP/1.1 101 Switching Protocols\r\n"),
        "{text}"
    );
    let head_end = out.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
    assert_eq!(out[head_end], 0x01, "ServerKey follows the 101");
    assert_eq!(
        out.len(),
        head_end + 45,
        "nothing but ServerKey before the close"
    );
}
