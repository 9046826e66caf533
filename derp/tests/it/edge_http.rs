//! The HTTP side of the edge: probes, /generate_204 challenge rules, fallback routing (plain and
//! TLS), keep-alive, listener limits.

use std::time::Duration;

use crate::harness::*;
use derp::edge::listener::{AcceptRateLimit, ListenerOptions};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[tokio::test]
async fn edge_probe_and_latency_check() {
    let relay = Relay::start().await;
    for path in ["/derp/probe", "/derp/latency-check"] {
        let r = get(relay.http_addr, path, "").await;
        assert_eq!(r.status, 200, "{path}");
        assert_eq!(r.header("access-control-allow-origin"), Some("*"));
        assert!(r.body.is_empty());
        let raw = raw_exchange(
            relay.http_addr,
            format!("HEAD {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await;
        let (r, _) = parse_response(&raw, true);
        assert_eq!(r.status, 200);
        assert_eq!(r.header("access-control-allow-origin"), Some("*"));
        let raw = raw_exchange(
            relay.http_addr,
            format!(
                "POST {path} HTTP/1.1\r\nHost: t\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            )
            .as_bytes(),
        )
        .await;
        assert_eq!(parse_response(&raw, false).0.status, 405);
    }
}

#[tokio::test]
async fn edge_generate_204_challenge_rules() {
    let relay = Relay::start().await;
    let cc = "no-cache, no-store, must-revalidate, no-transform, max-age=0";

    let r = get(relay.http_addr, "/generate_204?t=1", "").await;
    assert_eq!(r.status, 204);
    assert_eq!(r.header("cache-control"), Some(cc));
    assert_eq!(r.header("x-tailscale-response"), None);

    let r = get(
        relay.http_addr,
        "/generate_204",
        "X-Tailscale-Challenge: ts_derp1.example.com:80-x\r\n",
    )
    .await;
    assert_eq!(r.status, 204);
    assert_eq!(
        r.header("x-tailscale-response"),
        Some("response ts_derp1.example.com:80-x")
    );

    let max = "a".repeat(64);
    let r = get(
        relay.http_addr,
        "/generate_204",
        &format!("X-Tailscale-Challenge: {max}\r\n"),
    )
    .await;
    assert_eq!(
        r.header("x-tailscale-response"),
        Some(format!("response {max}").as_str())
    );

    let too_long = "a".repeat(65);
    let r = get(
        relay.http_addr,
        "/generate_204",
        &format!("X-Tailscale-Challenge: {too_long}\r\n"),
    )
    .await;
    assert_eq!(r.status, 204);
    assert_eq!(r.header("x-tailscale-response"), None);

    let r = get(
        relay.http_addr,
        "/generate_204",
        "X-Tailscale-Challenge: a b\r\n",
    )
    .await;
    assert_eq!(r.status, 204);
    assert_eq!(r.header("x-tailscale-response"), None);

    // A NUL byte in a header value is not even valid HTTP: rejected (400), never echoed.
    let raw = raw_exchange(
        relay.http_addr,
        b"GET /generate_204 HTTP/1.1\r\nHost: t\r\nConnection: close\r\nX-Tailscale-Challenge: a\0b\r\n\r\n",
    )
    .await;
    let text = String::from_utf8_lossy(&raw).to_ascii_lowercase();
    assert!(!text.contains("x-tailscale-response"), "{text}");
    assert!(
        text.starts_with("http/1.1 400") || text.starts_with("http/1.1 204"),
        "{text}"
    );
}

#[tokio::test]
async fn edge_fallback_routing_plain_and_tls() {
    let relay = Relay::start_tls().await;
    let r = get(relay.http_addr, "/hello", "").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body, b"hello from fallback");
    let r = get(relay.http_addr, "/whoami", "").await;
    assert_eq!(String::from_utf8_lossy(&r.body), "127.0.0.1 tls=false");
    let r = get(relay.http_addr, "/nope", "").await;
    assert_eq!(r.status, 404);

    // Over TLS (ALPN http/1.1 only).
    let mut cfg = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates({
        let mut roots = rustls::RootCertStore::empty();
        let pem = std::fs::read(&relay.cert_path).unwrap();
        for c in rustls_pemfile::certs(&mut &pem[..]) {
            roots.add(c.unwrap()).unwrap();
        }
        roots
    })
    .with_no_client_auth();
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let tcp = TcpStream::connect(relay.https_addr.unwrap()).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(cfg))
        .connect(name, tcp)
        .await
        .unwrap();
    assert_eq!(
        tls.get_ref().1.alpn_protocol(),
        Some(&b"http/1.1"[..]),
        "never h2"
    );
    tls.write_all(b"GET /whoami HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut raw = Vec::new();
    let _ = tokio::time::timeout(SOON, tls.read_to_end(&mut raw))
        .await
        .unwrap();
    let (r, _) = parse_response(&raw, false);
    assert_eq!(String::from_utf8_lossy(&r.body), "127.0.0.1 tls=true");
}

#[tokio::test]
async fn edge_keep_alive_then_derp_gets_426() {
    let relay = Relay::start().await;
    let raw = raw_exchange(
        relay.http_addr,
        b"GET /hello HTTP/1.1\r\nHost: t\r\n\r\nGET /derp HTTP/1.1\r\nHost: t\r\nUpgrade: DERP\r\nConnection: close\r\n\r\n",
    )
    .await;
    let (first, used) = parse_response(&raw, false);
    assert_eq!(first.status, 200);
    assert_eq!(first.body, b"hello from fallback");
    let (second, _) = parse_response(&raw[used..], false);
    assert_eq!(second.status, 426);
}

#[tokio::test]
async fn edge_accept_rate_limit_closes_excess_connections() {
    let relay = Relay::with(RelayOptions {
        listener: ListenerOptions {
            accept_limit: Some(AcceptRateLimit {
                per_second: 0.001,
                burst: 1,
            }),
            ..ListenerOptions::default()
        },
        ..RelayOptions::default()
    })
    .await;
    let r = get(relay.http_addr, "/derp/probe", "").await;
    assert_eq!(r.status, 200);
    let raw = raw_exchange(
        relay.http_addr,
        b"GET /derp/probe HTTP/1.1\r\nHost: t\r\n\r\n",
    )
    .await;
    assert!(raw.is_empty(), "closed without an answer");
    assert_eq!(
        relay.metric(
            "derp_listener_rejected_connections_total",
            &[("listener", "http"), ("reason", "rate_limit")]
        ),
        1.0
    );
}

#[tokio::test]
async fn edge_connection_cap_closes_excess_connections() {
    let relay = Relay::with(RelayOptions {
        listener: ListenerOptions {
            max_connections: 1,
            ..ListenerOptions::default()
        },
        ..RelayOptions::default()
    })
    .await;
    // Hold the only slot with an idle connection.
    let mut hold = TcpStream::connect(relay.http_addr).await.unwrap();
    hold.write_all(b"GET /hel").await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    let raw = raw_exchange(
        relay.http_addr,
        b"GET /derp/probe HTTP/1.1\r\nHost: t\r\n\r\n",
    )
    .await;
    assert!(raw.is_empty());
    assert_eq!(
        relay.metric(
            "derp_listener_rejected_connections_total",
            &[("listener", "http"), ("reason", "max_connections")]
        ),
        1.0
    );
    // Finish the held request; after it closes the slot frees up.
    hold.write_all(b"lo HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut out = Vec::new();
    hold.read_to_end(&mut out).await.unwrap();
    assert!(out.starts_with(b"HTTP/1.1 200"));
    let deadline = tokio::time::Instant::now() + SOON;
    loop {
        let raw = raw_exchange(
            relay.http_addr,
            b"GET /derp/probe HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
        )
        .await;
        if raw.starts_with(b"HTTP/1.1 200") {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn edge_fallback_websocket_upgrades_work() {
    // The coordinator's WebSocket endpoints live in the fallback router: hyper upgrades must flow.
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    let relay = Relay::start().await;
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{}/echo-ws", relay.http_addr))
        .await
        .unwrap();
    ws.send(Message::Text("ping".into())).await.unwrap();
    let got = tokio::time::timeout(SOON, ws.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(got, Message::Text("ping".into()));
    // A WebSocket to /derp without the derp subprotocol is raw DERP, not a WebSocket: the
    // handshake fails on the client (the server answers with DERP's 101).
    let err = tokio_tungstenite::connect_async(format!("ws://{}/derp", relay.http_addr)).await;
    assert!(err.is_err());
}

#[tokio::test]
async fn edge_cancel_stops_accepting_and_drains_http() {
    let relay = Relay::start().await;
    // An idle keep-alive connection that has finished one request.
    let mut idle = TcpStream::connect(relay.http_addr).await.unwrap();
    idle.write_all(b"GET /hello HTTP/1.1\r\nHost: t\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 256];
    let n = tokio::time::timeout(SOON, idle.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert!(buf[..n].starts_with(b"HTTP/1.1 200"));

    relay.cancel.cancel();
    // The idle HTTP connection is closed gracefully.
    let mut rest = Vec::new();
    tokio::time::timeout(SOON, idle.read_to_end(&mut rest))
        .await
        .unwrap()
        .unwrap();
    // New connections are refused once the listener is dropped.
    let deadline = tokio::time::Instant::now() + SOON;
    loop {
        match TcpStream::connect(relay.http_addr).await {
            Err(_) => break,
            Ok(_) => {
                assert!(tokio::time::Instant::now() < deadline, "still accepting");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
}

/// Issue 14, finding 6: every request on a kept-alive connection has the first request's header
/// limit (`MAX_HEAD_LEN`), not hyper's ~400 KiB default.
#[tokio::test]
async fn edge_keep_alive_requests_share_the_head_limit() {
    let relay = Relay::start().await;
    let pad = "a".repeat(derp::edge::http::MAX_HEAD_LEN + 1024);
    let raw = raw_exchange(
        relay.http_addr,
        format!(
            "GET /hello HTTP/1.1\r\nHost: t\r\n\r\nGET /hello HTTP/1.1\r\nHost: t\r\nX-Pad: {pad}\r\nConnection: close\r\n\r\n"
        )
        .as_bytes(),
    )
    .await;
    let (first, used) = parse_response(&raw, false);
    assert_eq!(first.status, 200);
    let (second, _) = parse_response(&raw[used..], false);
    assert_eq!(second.status, 431);
}
