//! Finding 3 of issue 14: `/metrics` is served on its own address (loopback by default, as coderd
//! keeps its metrics off the public listener), and on the public listener only when asked (the
//! `dev` role asks by default).

use crate::support::{get, start};

#[test]
fn metrics_addr_keeps_metrics_off_the_public_listener() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("derp.key");
    let relay = start(&[
        "derp",
        "--http-addr",
        "127.0.0.1:0",
        "--stun-addr",
        "",
        "--key-file",
        key.to_str().unwrap(),
        "--metrics-addr",
        "127.0.0.1:0",
    ]);
    let public = relay.line["http_addr"].as_str().unwrap();
    assert_eq!(get(public, "/metrics", &[]).0, 404);
    assert_eq!(get(public, "/healthz", &[]).0, 200);
    let metrics_addr = relay.line["metrics_addr"].as_str().unwrap();
    let (status, body) = get(metrics_addr, "/metrics", &[]);
    assert_eq!(status, 200);
    assert!(body.contains("derp_current_connections"));
}

#[test]
fn metrics_on_the_public_listener_when_asked() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("derp.key");
    let relay = start(&[
        "derp",
        "--http-addr",
        "127.0.0.1:0",
        "--stun-addr",
        "",
        "--key-file",
        key.to_str().unwrap(),
        "--metrics-addr",
        "",
        "--metrics-on-public-listener",
        "true",
    ]);
    let public = relay.line["http_addr"].as_str().unwrap();
    assert_eq!(get(public, "/metrics", &[]).0, 200);
    assert!(relay.line["metrics_addr"].is_null());
}
