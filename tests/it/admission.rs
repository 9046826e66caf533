//! Relay admission as an operator runs it: `dev` (and `serve`) admit node keys the coordinator
//! knows; a separate relay (`derp`, started with derper's flags) asks the coordinator through
//! derper's `--verify-client-url` protocol at `/tailnetd/derp-admit`.

use std::io::{Read, Write};
use std::time::Duration;

use derp::{dial, DialOptions, ReceivedFrame};
use futures_util::SinkExt;
use proto::key::NodePrivate;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

use crate::support::{get, start, Running};

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn key() -> NodePrivate {
    NodePrivate::generate(&mut rand::rngs::OsRng)
}

/// Dials the relay at `url` with `k` and says whether it was admitted (ServerInfo arrived) or
/// refused (closed after ClientInfo).
async fn admitted(url: &str, k: &NodePrivate) -> bool {
    let mut opts = DialOptions::new(k.clone());
    opts.timeout = Duration::from_secs(10);
    let Ok(mut d) = dial(url, opts).await else {
        return false;
    };
    loop {
        match tokio::time::timeout(Duration::from_secs(10), d.client.recv()).await {
            Ok(Ok(ReceivedFrame::ServerInfo(_))) => return true,
            Ok(Ok(_)) => continue,
            Ok(Err(_)) => return false,
            Err(_) => panic!("neither admitted nor refused within 10s"),
        }
    }
}

/// Connects as the dev agent over Coder's v1 protocol and announces a node with key `k`; the
/// returned socket keeps the agent connected.
async fn coordinate_agent(
    line: &serde_json::Value,
    k: &NodePrivate,
) -> tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>> {
    let addr = line["http_addr"].as_str().unwrap();
    let mut req = format!("ws://{addr}/api/v2/workspaceagents/me/coordinate")
        .into_client_request()
        .unwrap();
    req.headers_mut().insert(
        "Coder-Session-Token",
        line["agent_token"].as_str().unwrap().parse().unwrap(),
    );
    let (mut ws, _) = tokio_tungstenite::connect_async(req).await.unwrap();
    let node = proto::v1::Node {
        id: 7,
        key: k.public(),
        preferred_derp: 999,
        ..Default::default()
    };
    ws.send(Message::text(serde_json::to_string(&node).unwrap()))
        .await
        .unwrap();
    ws
}

/// `POST /tailnetd/derp-admit` with derper's request body; returns (status, body).
fn ask(addr: &str, body: &str) -> (u16, String) {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "POST /tailnetd/derp-admit HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    let status = resp[9..12].parse().unwrap();
    (
        status,
        resp.split("\r\n\r\n").nth(1).unwrap_or("").to_string(),
    )
}

fn admit_request(k: &NodePrivate) -> String {
    format!(r#"{{"NodePublic":"{}","Source":"127.0.0.1"}}"#, k.public())
}

fn dev(extra: &[&str]) -> Running {
    let mut args = vec!["dev", "--http-addr", "127.0.0.1:0", "--stun-addr", ""];
    args.extend_from_slice(extra);
    start(&args)
}

fn wait_known(addr: &str, k: &NodePrivate) {
    for _ in 0..100 {
        if ask(addr, &admit_request(k)).1 == r#"{"Allow":true}"# {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("the coordinator never learnt {}", k.public());
}

#[test]
fn dev_relay_admits_coordinated_keys_and_refuses_strangers() {
    let r = dev(&["--relay-admission-grace", "0s"]);
    let url = r.line["derp_url"].as_str().unwrap().to_string();
    let addr = r.line["http_addr"].as_str().unwrap().to_string();
    let rt = rt();
    let stranger = key();
    assert!(
        !rt.block_on(admitted(&url, &stranger)),
        "an unknown key was admitted"
    );
    assert_eq!(
        ask(&addr, &admit_request(&stranger)),
        (200, r#"{"Allow":false}"#.to_string())
    );
    let agent = key();
    let _ws = rt.block_on(coordinate_agent(&r.line, &agent));
    wait_known(&addr, &agent);
    assert!(
        rt.block_on(admitted(&url, &agent)),
        "the agent's key was refused"
    );
    let (_, metrics) = get(&addr, "/metrics", &[]);
    assert!(
        metrics.contains("derp_admission_total{decision=\"refused\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("derp_admission_total{decision=\"admitted\"} 1"),
        "{metrics}"
    );
    // A malformed request is a 400 (a relay treats it as a refusal).
    assert_eq!(ask(&addr, "{").0, 400);
}

#[test]
fn dev_relay_grace_period_keeps_a_key_whose_node_arrives() {
    let r = dev(&["--relay-admission-grace", "2s"]);
    let url = r.line["derp_url"].as_str().unwrap().to_string();
    let addr = r.line["http_addr"].as_str().unwrap().to_string();
    let rt = rt();
    let agent = key();
    rt.block_on(async {
        // The relay first: admitted pending, then the node arrives within the grace period.
        let mut opts = DialOptions::new(agent.clone());
        opts.timeout = Duration::from_secs(10);
        let mut early = dial(&url, opts).await.unwrap().client;
        let _ws = coordinate_agent(&r.line, &agent).await;
        // A stranger admitted pending is closed when the grace period ends; the agent stays.
        let mut opts = DialOptions::new(key());
        opts.timeout = Duration::from_secs(10);
        let mut stranger = dial(&url, opts).await.unwrap().client;
        let closed = tokio::time::timeout(Duration::from_secs(8), async {
            loop {
                if stranger.recv().await.is_err() {
                    return;
                }
            }
        })
        .await;
        assert!(closed.is_ok(), "the stranger outlived its grace period");
        early.ping([1; 8]).await.unwrap();
        let pong = tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                match early.recv().await.unwrap() {
                    ReceivedFrame::Pong(p) => return p,
                    _ => continue,
                }
            }
        })
        .await
        .unwrap();
        assert_eq!(pong, [1; 8]);
    });
    let (_, metrics) = get(&addr, "/metrics", &[]);
    for series in [
        "derp_admission_total{decision=\"pending\"} 2",
        "derp_admission_total{decision=\"confirmed\"} 1",
        "derp_admission_total{decision=\"expired\"} 1",
    ] {
        assert!(metrics.contains(series), "{series} missing:\n{metrics}");
    }
}

#[test]
fn derp_role_asks_the_coordinator_with_derpers_flags() {
    let coord = dev(&[]);
    let coord_addr = coord.line["http_addr"].as_str().unwrap().to_string();
    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("derper.key");
    let verify = format!("-verify-client-url=http://{coord_addr}/tailnetd/derp-admit");
    let relay = start(&[
        "derp",
        "-a=127.0.0.1:0",
        "-stun=false",
        &format!("-c={}", key_file.display()),
        &verify,
        "-verify-client-url-fail-open=false",
    ]);
    let url = relay.line["derp_url"].as_str().unwrap().to_string();
    let rt = rt();
    let agent = key();
    let _ws = rt.block_on(coordinate_agent(&coord.line, &agent));
    wait_known(&coord_addr, &agent);
    assert!(
        rt.block_on(admitted(&url, &agent)),
        "coordinated key refused"
    );
    assert!(!rt.block_on(admitted(&url, &key())), "unknown key admitted");
    // The coordinator gone, fail-closed refuses even the known key.
    drop(coord);
    assert!(
        !rt.block_on(admitted(&url, &agent)),
        "admitted while the verifier is down"
    );
    let (_, metrics) = get(
        relay.line["metrics_addr"].as_str().unwrap(),
        "/metrics",
        &[],
    );
    for series in [
        "derp_admission_total{decision=\"admitted\"} 1",
        "derp_admission_total{decision=\"refused\"} 2",
        "derp_admission_verifier_errors_total 1",
    ] {
        assert!(metrics.contains(series), "{series} missing:\n{metrics}");
    }
}
