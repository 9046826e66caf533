//! Memory per idle DERP connection through the whole HTTP edge (listener → request head →
//! 101 → DERP core), the path a real client takes: resident-set growth per connection. The
//! clients are plain blocking sockets (kernel memory only, no per-connection heap), so the figure
//! is essentially the server's. Fails on a regression past the bound below; prints the figure
//! with `--nocapture`.

use std::io::{Read, Write};
use std::sync::Arc;
use std::time::Duration;

use derp::edge::http::HttpEdge;
use derp::edge::listener::{self, ListenerOptions};
use derp::{Server, ServerConfig};
use proto::derp::{client_info_frame, parse_server_key, ClientInfo};
use proto::key::NodePrivate;
use tokio_util::sync::CancellationToken;

fn rss_bytes() -> Option<i64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: i64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * 4096)
}

/// Upper bound on RSS growth per idle connection through the edge. Measured ~2.1 KB; it was
/// ~17.6 KB while the connection's task kept the HTTP phase's state (head buffer, hyper and
/// TLS futures) for its whole life.
const MAX_RSS_PER_CONN: i64 = 8 * 1024;

/// One blocking client: HTTP upgrade, DERP handshake up to ServerInfo, then idle.
fn open_idle(addr: std::net::SocketAddr, me: &NodePrivate) -> std::net::TcpStream {
    let mut s = std::net::TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    s.write_all(b"GET /derp HTTP/1.1\r\nHost: x\r\nUpgrade: DERP\r\nConnection: Upgrade\r\n\r\n")
        .expect("request");
    // The 101 head ends with \r\n\r\n; read it byte by byte (no over-read into DERP frames).
    let mut head = Vec::with_capacity(256);
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        s.read_exact(&mut b).expect("101");
        head.push(b[0]);
    }
    assert!(head.starts_with(b"HTTP/1.1 101"), "{head:?}");
    let mut hdr = [0u8; 45];
    s.read_exact(&mut hdr).expect("server key");
    let server = parse_server_key(&hdr[5..]).expect("key");
    let f = client_info_frame(me, &server, &ClientInfo::default(), [1; 24]);
    s.write_all(&f).expect("client info");
    let mut si = [0u8; 5 + 53];
    s.read_exact(&mut si).expect("server info");
    assert_eq!(si[0], 0x03);
    s
}

/// Named so that `cargo test -p derp edge_` selects it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edge_idle_connection_memory_is_small() {
    let registry = prometheus::Registry::new();
    let server = Server::new(
        ServerConfig::new(NodePrivate::generate(&mut rand::rngs::OsRng)),
        &registry,
    )
    .expect("server");
    let edge = HttpEdge::new(Some(server.clone()), axum::Router::new(), &registry).expect("edge");
    let cancel = CancellationToken::new();
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = l.local_addr().expect("addr");
    tokio::spawn(listener::serve(
        l,
        None,
        edge.clone(),
        ListenerOptions::default(),
        cancel.clone(),
    ));
    let keys: Arc<Vec<NodePrivate>> = Arc::new(
        (0..650)
            .map(|_| NodePrivate::generate(&mut rand::rngs::OsRng))
            .collect(),
    );
    let wait = |n: usize| {
        let server = server.clone();
        async move {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
            while server.connection_count() < n {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "only {} connected",
                    server.connection_count()
                );
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    };
    let open = |range: std::ops::Range<usize>, mut into: Vec<std::net::TcpStream>| {
        let keys = keys.clone();
        tokio::task::spawn_blocking(move || {
            for i in range {
                into.push(open_idle(addr, &keys[i]));
            }
            into
        })
    };
    // Warm up: runtime, registry shards, metric label children, allocator.
    let warm = open(0..50, Vec::with_capacity(50)).await.expect("warm");
    wait(50).await;
    let n = 600usize;
    let conns = Vec::with_capacity(n);
    let Some(before) = rss_bytes() else {
        eprintln!("no /proc/self/statm; skipping");
        return;
    };
    let conns = open(50..50 + n, conns).await.expect("open");
    wait(50 + n).await;
    let after = rss_bytes().expect("rss");
    let per_conn = (after - before) / n as i64;
    eprintln!("edge idle connections: {n}, RSS growth {per_conn} bytes per connection");
    assert!(
        per_conn <= MAX_RSS_PER_CONN,
        "{per_conn} bytes of RSS per idle connection through the edge (bound {MAX_RSS_PER_CONN})"
    );
    drop(conns);
    drop(warm);
    cancel.cancel();
}
