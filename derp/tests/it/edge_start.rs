//! `listener::start`: one call binds HTTP, HTTPS (meta cert) and STUN from a `EdgeConfig`.

use std::time::Duration;

use crate::harness::*;
use derp::edge::config::EdgeConfig;
use derp::edge::http::HttpEdge;
use derp::edge::listener::{start, StartError};
use derp::{Server, ServerConfig};
use tokio_util::sync::CancellationToken;

#[tokio::test]
async fn edge_start_binds_everything_from_config() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, keyp) = (dir.path().join("c.pem"), dir.path().join("k.pem"));
    write_self_signed(&cert, &keyp);
    let key_file = dir.path().join("derper.key");
    let cfg: EdgeConfig = toml::from_str(&format!(
        r#"
        http_addr = "127.0.0.1:0"
        https_addr = "127.0.0.1:0"
        tls_cert = "{}"
        tls_key = "{}"
        stun_addr = "127.0.0.1:0"
        key_file = "{}"
        queue_depth = 64
        "#,
        cert.display(),
        keyp.display(),
        key_file.display()
    ))
    .unwrap();
    let private = derp::edge::keyfile::load_or_create(cfg.key_file.as_ref().unwrap()).unwrap();
    let mut server_cfg = ServerConfig::new(private.clone());
    cfg.apply_to(&mut server_cfg);
    assert_eq!(server_cfg.queue_depth, 64);
    let registry = prometheus::Registry::new();
    let server = Server::new(server_cfg, &registry).unwrap();
    let edge = HttpEdge::new(Some(server.clone()), fallback(), &registry).unwrap();
    let cancel = CancellationToken::new();
    let (bound, running) = start(&cfg, edge, &registry, cancel.clone()).await.unwrap();
    let (http, https, stun) = (
        bound.http_addr.unwrap(),
        bound.https_addr.unwrap(),
        bound.stun_addr.unwrap(),
    );
    assert_ne!(http.port(), 0);

    let r = get(http, "/derp/probe", "").await;
    assert_eq!(r.status, 200);
    let mut a = dial_ok(&format!("https://{https}/derp"), insecure(key())).await;
    assert!(a.fast_start);
    assert_eq!(a.client.server_public_key(), private.public());
    let mut b = dial_ok(&format!("http://{http}/derp"), insecure(key())).await;
    for k in [a.client.public_key(), b.client.public_key()] {
        let deadline = tokio::time::Instant::now() + SOON;
        while !server.is_connected(&k) {
            assert!(tokio::time::Instant::now() < deadline);
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    relay_sizes(&mut a.client, &mut b.client).await;

    let udp = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    udp.send_to(&proto::stun::build_binding_request([1; 12]), stun)
        .await
        .unwrap();
    let mut buf = [0u8; 128];
    let n = tokio::time::timeout(SOON, udp.recv(&mut buf))
        .await
        .unwrap()
        .unwrap();
    let (_, addr) = proto::stun::parse_binding_response(&buf[..n]).unwrap();
    assert_eq!(addr, udp.local_addr().unwrap());

    cancel.cancel();
    tokio::time::timeout(SOON, running.join()).await.unwrap();
}

#[tokio::test]
async fn edge_start_rejects_bad_config_and_busy_ports() {
    let registry = prometheus::Registry::new();
    let server = Server::new(ServerConfig::new(key()), &registry).unwrap();
    let edge = HttpEdge::new(Some(server), fallback(), &registry).unwrap();
    let cfg = EdgeConfig {
        https_addr: "127.0.0.1:0".into(),
        ..EdgeConfig::default()
    };
    let err = start(&cfg, edge.clone(), &registry, CancellationToken::new())
        .await
        .unwrap_err();
    assert!(matches!(err, StartError::Config(_)));
    assert!(err.to_string().contains("tls_cert"), "{err}");

    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let cfg = EdgeConfig {
        http_addr: busy.local_addr().unwrap().to_string(),
        ..EdgeConfig::default()
    };
    let err = start(&cfg, edge, &registry, CancellationToken::new())
        .await
        .unwrap_err();
    assert!(
        matches!(err, StartError::Bind { what: "http", .. }),
        "{err}"
    );
}
