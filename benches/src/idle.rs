//! The idle-connection workload: N authenticated DERP connections that then sit idle, spread
//! over source addresses 127.0.0.2, 127.0.0.3, ... so that N can exceed one source address's
//! ephemeral port range; reports the server's RSS growth per connection.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use anyhow::{anyhow, Result};
use derp::Client;
use futures_util::stream::{self, StreamExt};
use serde::Serialize;

use crate::dialer::{connect, host_path};
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

/// Runs the idle workload.
pub async fn run(args: IdleArgs) -> Result<IdleReport> {
    let (authority, path) = host_path(&args.url)?;
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
            let src = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2 + (i / PER_SOURCE) as u8));
            async move { connect(dst, Some(src), &a, &p, false).await }
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
