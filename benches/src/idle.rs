//! The idle-connection workload: N authenticated DERP connections that then sit idle, spread
//! over source addresses 127.0.0.2, 127.0.0.3, ... so that N can exceed one source address's
//! ephemeral port range; reports the server's RSS growth per connection.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use bytes::{Bytes, BytesMut};
use derp::{Client, ClientOptions, ReceivedFrame};
use futures_util::stream::{self, StreamExt};
use proto::key::NodePrivate;
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

use crate::procfs;

/// Connections per source address (well inside Linux's default 28k ephemeral ports).
const PER_SOURCE: usize = 20_000;

/// Idle workload settings.
#[derive(Clone, Debug, clap::Args)]
pub struct IdleArgs {
    /// Server URL (`http://127.0.0.1:PORT/derp`).
    #[arg(long)]
    pub url: String,
    /// Connections to open.
    #[arg(long, default_value_t = 10_000)]
    pub conns: usize,
    /// Server process id (required: the figure is its RSS growth).
    #[arg(long)]
    pub server_pid: u32,
    /// Connections being set up at once.
    #[arg(long, default_value_t = 64)]
    pub concurrency: usize,
    /// Seconds to let the server settle before reading RSS after connecting.
    #[arg(long, default_value_t = 2.0)]
    pub settle: f64,
    /// Free-form label copied into the JSON.
    #[arg(long, default_value = "")]
    pub label: String,
}

/// What one idle run measured.
#[derive(Clone, Debug, Serialize, serde::Deserialize)]
pub struct IdleReport {
    /// Always "idle".
    pub mode: String,
    /// The `--label`.
    pub label: String,
    /// Connections requested.
    pub conns: usize,
    /// Connections that completed the handshake.
    pub connected: usize,
    /// Handshakes per second while connecting.
    pub connect_rate_per_s: f64,
    /// Server RSS before connecting, bytes.
    pub rss_before_bytes: u64,
    /// Server RSS with every connection idle, bytes.
    pub rss_after_bytes: u64,
    /// (after − before) / connected, bytes.
    pub rss_per_conn_bytes: f64,
    /// Server peak RSS, bytes.
    pub server_peak_rss_bytes: Option<u64>,
}

fn host_port(url: &str) -> Result<(String, String)> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| anyhow!("idle: only http:// URLs are supported, got {url}"))?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/derp"),
    };
    Ok((authority.to_string(), path.to_string()))
}

async fn connect_one(i: usize, dst: SocketAddr, authority: &str, path: &str) -> Result<Client> {
    let src = Ipv4Addr::new(127, 0, 0, 2 + (i / PER_SOURCE) as u8);
    let sock = TcpSocket::new_v4()?;
    sock.bind(SocketAddr::new(IpAddr::V4(src), 0))
        .with_context(|| format!("binding {src}"))?;
    let mut tcp: TcpStream = sock.connect(dst).await.context("connect")?;
    tcp.set_nodelay(true)?;
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: {authority}\r\nConnection: Upgrade\r\nUpgrade: DERP\r\n\r\n"
    );
    tcp.write_all(req.as_bytes()).await?;
    let mut buf = BytesMut::with_capacity(1024);
    let head_end = loop {
        if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break p + 4;
        }
        if buf.len() > 16 << 10 || tcp.read_buf(&mut buf).await? == 0 {
            bail!("no HTTP 101 response");
        }
    };
    if !buf.starts_with(b"HTTP/1.1 101") {
        bail!(
            "upgrade refused: {}",
            String::from_utf8_lossy(&buf[..head_end.min(80)])
        );
    }
    let leftover = Bytes::copy_from_slice(&buf[head_end..]);
    let pk = NodePrivate::generate(&mut rand::thread_rng());
    let mut c = Client::handshake(tcp, leftover, pk, ClientOptions::default())
        .await
        .map_err(|e| anyhow!("handshake: {e}"))?;
    loop {
        match tokio::time::timeout(Duration::from_secs(10), c.recv()).await {
            Err(_) => bail!("no ServerInfo"),
            Ok(Err(e)) => bail!("recv: {e}"),
            Ok(Ok(ReceivedFrame::ServerInfo(_))) => return Ok(c),
            Ok(Ok(_)) => {}
        }
    }
}

/// Runs the idle workload.
pub async fn run(args: IdleArgs) -> Result<IdleReport> {
    let (authority, path) = host_port(&args.url)?;
    let dst: SocketAddr = tokio::net::lookup_host(&authority)
        .await?
        .next()
        .ok_or_else(|| anyhow!("cannot resolve {authority}"))?;
    let pid = args.server_pid;
    let rss_before = procfs::rss_bytes(pid).ok_or_else(|| anyhow!("cannot read RSS of {pid}"))?;
    let t = Instant::now();
    let results: Vec<Result<Client>> = stream::iter(0..args.conns)
        .map(|i| {
            let (a, p) = (authority.clone(), path.clone());
            async move { connect_one(i, dst, &a, &p).await }
        })
        .buffer_unordered(args.concurrency.max(1))
        .collect()
        .await;
    let elapsed = t.elapsed().as_secs_f64();
    let mut clients = Vec::with_capacity(results.len());
    let mut first_err = None;
    for r in results {
        match r {
            Ok(c) => clients.push(c),
            Err(e) => {
                if first_err.is_none() {
                    first_err = Some(e);
                }
            }
        }
    }
    if let Some(e) = &first_err {
        eprintln!(
            "loadgen idle: {} of {} connections failed; first: {e:#}",
            args.conns - clients.len(),
            args.conns
        );
    }
    tokio::time::sleep(Duration::from_secs_f64(args.settle)).await;
    let rss_after = procfs::rss_bytes(pid).ok_or_else(|| anyhow!("cannot read RSS of {pid}"))?;
    let connected = clients.len();
    let report = IdleReport {
        mode: "idle".into(),
        label: args.label.clone(),
        conns: args.conns,
        connected,
        connect_rate_per_s: connected as f64 / elapsed.max(1e-9),
        rss_before_bytes: rss_before,
        rss_after_bytes: rss_after,
        rss_per_conn_bytes: if connected == 0 {
            0.0
        } else {
            (rss_after as f64 - rss_before as f64) / connected as f64
        },
        server_peak_rss_bytes: procfs::peak_rss_bytes(pid),
    };
    drop(clients);
    Ok(report)
}
