//! TLS certificate reload: new connections see the new leaf; a broken file keeps the old one.

use std::time::Duration;

use crate::harness::*;

#[tokio::test]
async fn edge_tls_cert_reload_on_file_change() {
    let relay = Relay::with(RelayOptions {
        tls: true,
        check_interval: Duration::ZERO,
        ..RelayOptions::default()
    })
    .await;
    let first = dial_ok(&relay.https_url(), insecure(key())).await;
    let leaf1 = first.peer_certificates[0].clone();
    assert_eq!(first.peer_certificates.len(), 2);

    // Rotate the files (new key pair, new leaf).
    tokio::time::sleep(Duration::from_millis(20)).await;
    let new_der = write_self_signed(&relay.cert_path, &relay.key_path);
    let second = dial_ok(&relay.https_url(), insecure(key())).await;
    assert_ne!(second.peer_certificates[0], leaf1);
    assert_eq!(second.peer_certificates[0].as_ref(), &new_der[..]);
    assert_eq!(
        second.peer_certificates.len(),
        2,
        "meta cert still appended once"
    );
    assert_eq!(second.peer_certificates[1], first.peer_certificates[1]);
    assert!(second.fast_start);
    assert_eq!(relay.metric("derp_tls_cert_reloads_total", &[]), 1.0);

    // A broken cert file keeps the current pair in service.
    tokio::time::sleep(Duration::from_millis(20)).await;
    std::fs::write(&relay.cert_path, "-----BEGIN CERTIFICATE-----\nnope\n").unwrap();
    let third = dial_ok(&relay.https_url(), insecure(key())).await;
    assert_eq!(third.peer_certificates[0].as_ref(), &new_der[..]);
    assert_eq!(
        relay.metric("derp_tls_cert_reload_failures_total", &[]),
        1.0
    );

    // A key that does not match the cert is refused too.
    tokio::time::sleep(Duration::from_millis(20)).await;
    let other = tempfile::tempdir().unwrap();
    write_self_signed(&other.path().join("c.pem"), &other.path().join("k.pem"));
    write_self_signed(&relay.cert_path, &other.path().join("unused.pem"));
    std::fs::copy(other.path().join("k.pem"), &relay.key_path).unwrap();
    let fourth = dial_ok(&relay.https_url(), insecure(key())).await;
    assert_eq!(fourth.peer_certificates[0].as_ref(), &new_der[..]);
    assert_eq!(
        relay.metric("derp_tls_cert_reload_failures_total", &[]),
        2.0
    );

    // Relaying works on the reloaded chain.
    let mut a = second;
    let mut b = fourth;
    relay.wait_connected(&a.client.public_key()).await;
    relay.wait_connected(&b.client.public_key()).await;
    relay_sizes(&mut a.client, &mut b.client).await;
}

#[tokio::test]
async fn edge_tls_bad_files_at_startup_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    let registry = prometheus::Registry::new();
    let meta = derp::edge::metacert::generate(&[1u8; 32]).unwrap();
    let err = derp::edge::tls::TlsReloader::new(
        dir.path().join("missing.pem"),
        dir.path().join("k.pem"),
        Some(meta.clone()),
        &registry,
    )
    .unwrap_err();
    assert!(err.to_string().contains("missing.pem"), "{err}");
    std::fs::write(dir.path().join("empty.pem"), "").unwrap();
    let err = derp::edge::tls::TlsReloader::new(
        dir.path().join("empty.pem"),
        dir.path().join("empty.pem"),
        Some(meta),
        &registry,
    )
    .unwrap_err();
    assert!(err.to_string().contains("no PEM certificate"), "{err}");
}
