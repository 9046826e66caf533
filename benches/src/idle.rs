//! The idle-connection workload: N authenticated DERP connections that then sit idle, spread
//! over source addresses 127.0.0.2, 127.0.0.3, ... so that N can exceed one source address's
//! ephemeral port range; reports the server's RSS growth per connection.
//!
//! A garbage-collected server (derper) holds garbage that a collection would free; `--gc-url`
//! (derper's `/debug/gc`, loopback only) is fetched before each RSS reading, then the reading
//! waits `--settle` seconds, the same wait a server without a collector gets.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use derp::client::dial::DialTls;
use derp::Client;
use futures_util::stream::{self, StreamExt};
use proto::key::NodePrivate;
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
    /// Seconds to let the server settle before each RSS reading (before and after connecting).
    #[arg(long, default_value_t = 2.0)]
    pub settle: f64,
    /// Free-form label copied into the JSON.
    #[arg(long, default_value = "")]
    pub label: String,
    /// URL fetched (HTTP GET) before each RSS reading to make the server collect its garbage,
    /// e.g. derper's `http://127.0.0.1:PORT/debug/gc`.
    #[arg(long)]
    pub gc_url: Option<String>,
    /// PEM certificate(s) to trust for an `https://` URL (connections then use `derp::dial`
    /// from one source address, so at most ~20,000).
    #[arg(long)]
    pub ca: Option<std::path::PathBuf>,
}

/// GETs `url` (`http://` or `https://` trusting `tls`) and waits for the response, so a
/// collection it triggers is done.
async fn get(url: &str, tls: &DialTls) -> Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let https = url.strip_prefix("https://").map(|r| format!("http://{r}"));
    let (authority, path) = host_path(https.as_deref().unwrap_or(url))?;
    let tcp = tokio::net::TcpStream::connect(&authority).await?;
    let mut s: Box<dyn Io> = match https {
        None => Box::new(tcp),
        Some(_) => {
            let host = authority.rsplit_once(':').map_or(&*authority, |(h, _)| h);
            let name = rustls::pki_types::ServerName::try_from(host.to_string())?;
            Box::new(
                crate::relay::raw_tls_connector(tls)?
                    .connect(name, tcp)
                    .await?,
            )
        }
    };
    let req = format!("GET {path} HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await?;
    let mut resp = Vec::new();
    // A TLS server may end without close_notify: what arrived before counts.
    let _ = tokio::time::timeout(Duration::from_secs(30), s.read_to_end(&mut resp))
        .await
        .map_err(|_| anyhow!("{url}: no response within 30 s"))?;
    if !resp.starts_with(b"HTTP/1.1 200") && !resp.starts_with(b"HTTP/1.0 200") {
        bail!(
            "{url}: {}",
            String::from_utf8_lossy(&resp[..resp.len().min(60)])
        );
    }
    Ok(())
}

trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Io for T {}

/// RSS of `pid` after an optional collection (`gc_url`) and `settle` seconds.
async fn settled_rss(pid: u32, gc_url: Option<&str>, settle: f64, tls: &DialTls) -> Result<u64> {
    if let Some(u) = gc_url {
        get(u, tls).await.context("--gc-url")?;
    }
    tokio::time::sleep(Duration::from_secs_f64(settle)).await;
    procfs::rss_bytes(pid).ok_or_else(|| anyhow!("cannot read RSS of {pid}"))
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
    /// `http` or `tls`.
    #[serde(default)]
    pub transport: String,
    /// Whether the server was made to collect its garbage before each reading (`--gc-url`).
    #[serde(default)]
    pub gc: bool,
}

/// Runs the idle workload.
pub async fn run(args: IdleArgs) -> Result<IdleReport> {
    let tls = args.url.starts_with("https://");
    let pid = args.server_pid;
    let gc = args.gc_url.as_deref();
    let mut dial_tls = DialTls::default();
    if let Some(ca) = &args.ca {
        dial_tls.extra_roots = derp::mesh::load_trust(Some(ca)).context("--ca")?;
    }
    let rss_before = settled_rss(pid, gc, args.settle, &dial_tls).await?;
    let t = Instant::now();
    let results: Vec<Result<Client>> = if tls {
        let mut opts = derp::DialOptions::new(NodePrivate::generate(&mut rand::thread_rng()));
        opts.tls = dial_tls.clone();
        stream::iter(0..args.conns)
            .map(|_| {
                let mut o = opts.clone();
                o.private_key = NodePrivate::generate(&mut rand::thread_rng());
                let url = args.url.clone();
                async move {
                    let mut c = derp::dial(&url, o).await?.client;
                    loop {
                        match tokio::time::timeout(Duration::from_secs(10), c.recv()).await {
                            Err(_) => bail!("no ServerInfo within 10 s"),
                            Ok(Err(e)) => bail!("recv: {e}"),
                            Ok(Ok(derp::ReceivedFrame::ServerInfo(_))) => return Ok(c),
                            Ok(Ok(_)) => {}
                        }
                    }
                }
            })
            .buffer_unordered(args.concurrency.max(1))
            .collect()
            .await
    } else {
        let (authority, path) = host_path(&args.url)?;
        let dst: SocketAddr = tokio::net::lookup_host(&authority)
            .await?
            .next()
            .ok_or_else(|| anyhow!("cannot resolve {authority}"))?;
        stream::iter(0..args.conns)
            .map(|i| {
                let (a, p) = (authority.clone(), path.clone());
                let src = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2 + (i / PER_SOURCE) as u8));
                async move { connect(dst, Some(src), &a, &p, false).await }
            })
            .buffer_unordered(args.concurrency.max(1))
            .collect()
            .await
    };
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
    let rss_after = settled_rss(pid, gc, args.settle, &dial_tls).await?;
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
        transport: if tls { "tls" } else { "http" }.into(),
        gc: gc.is_some(),
    };
    drop(clients);
    Ok(report)
}
