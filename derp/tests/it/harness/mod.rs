//! What every derp integration test shares: the two test relays ([`TestServer`] for the core
//! over plain loopback TCP, [`Relay`] for the whole edge), key generation, metric reading and
//! the frame helpers with their timeouts.
//!
//! Why one harness: the `core_*` and `edge_*` tests ask the same questions (what did this client
//! receive, what does this metric say, did that happen soon enough) and must answer them the same
//! way. The `it` binary uses all of it; the memory binaries include it with `#[path]` and use a
//! part, hence the allowances.
#![allow(dead_code, unused_imports)]

mod edge;
mod region;
mod server;

pub use edge::*;
pub use region::*;
pub use server::*;

use std::future::Future;
use std::time::Duration;

use bytes::Bytes;
use derp::{Client, ReceivedFrame};
use proto::key::{NodePrivate, NodePublic};
use tokio::net::TcpStream;

/// Generous bound for anything that should happen "soon" (loaded 2-core CI machines).
pub const SOON: Duration = Duration::from_secs(10);

/// A fresh node key.
pub fn key() -> NodePrivate {
    NodePrivate::generate(&mut rand::rngs::OsRng)
}

/// Everything `registry` exposes, in the Prometheus text format.
fn exposition(registry: &prometheus::Registry) -> String {
    prometheus::TextEncoder::new()
        .encode_to_string(&registry.gather())
        .expect("encode")
}

/// The value of one series, written exactly as exposed (`name` or `name{label="v",...}`).
/// Panics if the series is absent.
pub fn metric(registry: &prometheus::Registry, series: &str) -> f64 {
    let text = exposition(registry);
    text.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|r| r.strip_prefix(' ')))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no series {series} in\n{text}"))
}

/// The value of the first series of `name` whose labels include all of `labels`; 0 when there
/// is none (a labelled counter that never counted is not exposed).
pub fn metric_matching(
    registry: &prometheus::Registry,
    name: &str,
    labels: &[(&str, &str)],
) -> f64 {
    for line in exposition(registry).lines() {
        let Some(rest) = line.strip_prefix(name) else {
            continue;
        };
        if !(rest.starts_with('{') || rest.starts_with(' ')) {
            continue;
        }
        if labels
            .iter()
            .all(|(k, v)| rest.contains(&format!("{k}=\"{v}\"")))
        {
            return rest
                .rsplit(' ')
                .next()
                .and_then(|v| v.parse().ok())
                .unwrap_or(0.0);
        }
    }
    0.0
}

/// Polls `cond` every 10 ms until it holds (true) or [`SOON`] passed (false).
pub async fn wait_until(mut cond: impl FnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + SOON;
    loop {
        if cond() {
            return true;
        }
        if tokio::time::Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Listens on `addr` again after a relay there was stopped. Another socket (an outgoing
/// connection of a test running at the same time, given that port as its ephemeral one) may hold
/// the port for a moment, so an `AddrInUse` is retried for [`SOON`].
pub async fn rebind(addr: std::net::SocketAddr) -> tokio::net::TcpListener {
    let deadline = tokio::time::Instant::now() + SOON;
    loop {
        match tokio::net::TcpListener::bind(addr).await {
            Ok(l) => return l,
            Err(e)
                if e.kind() == std::io::ErrorKind::AddrInUse
                    && tokio::time::Instant::now() < deadline =>
            {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("rebinding {addr}: {e}"),
        }
    }
}

/// Runs `f`, failing the test if it takes longer than [`SOON`].
pub async fn within<T>(f: impl Future<Output = T>) -> T {
    tokio::time::timeout(SOON, f).await.expect("timed out")
}

/// Next frame, skipping keepalives.
pub async fn recv(c: &mut Client) -> ReceivedFrame {
    loop {
        match within(c.recv()).await.expect("recv") {
            ReceivedFrame::KeepAlive => continue,
            f => return f,
        }
    }
}

/// Receives the ServerInfo that must open every connection (protocol version 2). The server
/// registers the key before writing it, so the key is routable once this returns.
pub async fn expect_server_info(c: &mut Client) {
    match recv(c).await {
        ReceivedFrame::ServerInfo(i) => assert_eq!(i.version, 2),
        other => panic!("first frame must be ServerInfo, got {other:?}"),
    }
}

/// Next packet (skips keepalives; panics on anything else).
pub async fn recv_packet(c: &mut Client) -> (NodePublic, Bytes) {
    match recv(c).await {
        ReceivedFrame::Packet { src, data } => (src, data),
        other => panic!("expected packet, got {other:?}"),
    }
}

/// Asserts that nothing but keepalives arrives for `d`.
pub async fn expect_silence(c: &mut Client, d: Duration) {
    let deadline = tokio::time::Instant::now() + d;
    loop {
        match tokio::time::timeout_at(deadline, c.recv()).await {
            Err(_) => return,
            Ok(Ok(ReceivedFrame::KeepAlive)) => continue,
            Ok(other) => panic!("expected silence, got {other:?}"),
        }
    }
}

/// Waits until the server closes the client's connection (EOF or reset).
pub async fn expect_closed(c: &mut Client) {
    let r = tokio::time::timeout(SOON, async {
        loop {
            match c.recv().await {
                Ok(_) => continue,
                Err(e) => return e,
            }
        }
    })
    .await;
    assert!(r.is_ok(), "connection was not closed");
}

/// Waits until a raw socket is closed by the server (EOF or error), discarding data.
pub async fn expect_raw_closed(tcp: &mut TcpStream) {
    use tokio::io::AsyncReadExt;
    let r = tokio::time::timeout(SOON, async {
        let mut buf = [0u8; 4096];
        loop {
            match tcp.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => continue,
            }
        }
    })
    .await;
    assert!(r.is_ok(), "raw connection was not closed");
}

/// A disco-looking packet (magic + 32-byte key + 24-byte nonce + body).
pub fn disco_packet() -> Vec<u8> {
    let mut p = proto::derp::DISCO_MAGIC.to_vec();
    p.extend_from_slice(&[7u8; 32]);
    p.extend_from_slice(&[0u8; 24]);
    p.extend_from_slice(b"ping");
    p
}

/// A client of the relay at `addr` over plain HTTP, past its ServerInfo.
pub async fn plain_client(addr: std::net::SocketAddr) -> Client {
    let mut c = within(derp::client::dial::dial(
        &format!("http://{addr}/derp"),
        derp::client::dial::DialOptions::new(key()),
    ))
    .await
    .expect("dial")
    .client;
    expect_server_info(&mut c).await;
    c
}

/// Next packet, skipping keepalives and presence frames.
pub async fn next_packet(c: &mut Client) -> (NodePublic, bytes::Bytes) {
    loop {
        match recv(c).await {
            ReceivedFrame::Packet { src, data } => return (src, data),
            ReceivedFrame::Ping(_) | ReceivedFrame::Health(_) => continue,
            other => panic!("expected a packet, got {other:?}"),
        }
    }
}

/// Sends from every client to every other one and checks each arrives with its source.
pub async fn all_ways(clients: &mut [Client], tag: &str) {
    let keys: Vec<NodePublic> = clients.iter().map(Client::public_key).collect();
    for i in 0..clients.len() {
        for j in 0..clients.len() {
            if i == j {
                continue;
            }
            let msg = format!("{tag} {i}->{j}");
            clients[i]
                .send_packet(keys[j], msg.as_bytes())
                .await
                .expect("send");
            let (src, data) = next_packet(&mut clients[j]).await;
            assert_eq!(src, keys[i], "{msg}: source");
            assert_eq!(&data[..], msg.as_bytes());
        }
    }
}
