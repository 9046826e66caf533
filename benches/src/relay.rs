//! The relay workload: P sender→receiver pairs through a DERP server (or, for the ceiling, the
//! same bytes through the plain TCP forwarder), open-loop at a fixed total packet rate or as fast
//! as possible, with a send timestamp and sequence number in every payload.
//!
//! Payload layout (little endian): `seq: u64`, `send_ns: u64` (monotonic ns since the run
//! started), zero padding up to the packet size.
//!
//! Two traffic shapes (`--flush`): `batched` buffers up to 32 packets per write (the most a relay
//! can be pushed with one client core), `per-packet` writes and flushes one frame per packet, as
//! Tailscale's clients do (magicsock's DERP writer calls `derp.Client.Send`, one frame and one
//! flush each). Transports: DERP over plain HTTP (`http://`), over TLS (`https://`, `--ca` to
//! trust a self-signed certificate), over WebSocket (`--transport ws`, `ws`/`wss` by the URL's
//! scheme), and the raw bytes of the TCP forwarder (plain or TLS).

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use bytes::{Buf, BytesMut};
use derp::client::READ_CHUNK;
use derp::{dial, DialOptions};
use derp::{ClientReader, ClientWriter, ReceivedFrame};
use futures_util::stream::{self, StreamExt, TryStreamExt};
use proto::derp::{
    send_packet_prefix, FrameHeader, FrameType, FRAME_HEADER_LEN, KEY_LEN, MAX_FRAME_SIZE,
};
use proto::key::{NodePrivate, NodePublic};
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::dialer::{connect, host_path};
use crate::hist::Histogram;
use crate::procfs;

/// Bytes of the payload header (sequence + timestamp).
pub const PAYLOAD_HEADER: usize = 16;
/// Most packets buffered before one flush.
const BATCH: u64 = 32;

/// How the pairs reach each other.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    /// DERP over an HTTP upgrade: `http://host:port/derp`, or TLS with `https://`.
    Derp,
    /// DERP over a WebSocket (subprotocol `derp`): `http://` or `https://` URL.
    Ws,
    /// The TCP forwarder (`tcpfwd`): raw DERP-framed bytes, no server-side parsing.
    Raw,
}

/// How senders write.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Flush {
    /// Up to 32 packets buffered per write and flush.
    Batched,
    /// One frame per write and flush, like Tailscale's clients.
    PerPacket,
}

impl Flush {
    /// The name used on the command line and in reports.
    pub fn name(self) -> &'static str {
        match self {
            Flush::Batched => "batched",
            Flush::PerPacket => "per-packet",
        }
    }
}

/// Relay workload settings.
#[derive(Clone, Debug, clap::Args)]
pub struct RelayArgs {
    /// Server URL (`http://127.0.0.1:PORT/derp`, `https://localhost:PORT/derp`) or, with
    /// `--transport raw`, `host:port` (`tls://host:port` for the TLS-terminating forwarder).
    #[arg(long)]
    pub url: String,
    /// Receivers dial this DERP URL instead of `--url` (senders stay on `--url`): traffic
    /// crosses the mesh between two relays of a region. `derp` transport only.
    #[arg(long)]
    pub recv_url: Option<String>,
    /// Sender/receiver pairs.
    #[arg(long, default_value_t = 10)]
    pub pairs: usize,
    /// Packet (payload) size in bytes (≥ 16).
    #[arg(long, default_value_t = 1400)]
    pub size: usize,
    /// Total offered packets per second over all pairs; 0 = as fast as possible.
    #[arg(long, default_value_t = 0.0)]
    pub rate: f64,
    /// Measurement window in seconds.
    #[arg(long, default_value_t = 5.0)]
    pub duration: f64,
    /// Warm-up before the window, in seconds.
    #[arg(long, default_value_t = 1.0)]
    pub warmup: f64,
    /// Closed loop: at most this many packets of a pair in flight (sent, not yet received);
    /// 0 = open loop. Keep it ≤ the server's per-destination queue (32 for derper and tailnetd)
    /// so a relay never has to drop: this then measures the most a relay moves without loss.
    #[arg(long, default_value_t = 0)]
    pub window: u64,
    /// Server process id: report its CPU seconds during the window and its peak RSS.
    #[arg(long)]
    pub server_pid: Option<u32>,
    /// `derp` (HTTP upgrade; TLS by an `https://` URL), `ws` (WebSocket; TLS likewise), `raw`
    /// (the TCP-forward ceiling).
    #[arg(long, value_enum, default_value_t = Transport::Derp)]
    pub transport: Transport,
    /// `batched` (up to 32 packets per write) or `per-packet` (one frame per write and flush,
    /// like Tailscale's clients).
    #[arg(long, value_enum, default_value_t = Flush::Batched)]
    pub flush: Flush,
    /// PEM certificate(s) to trust for TLS (a self-signed leaf or a CA), besides the system's.
    #[arg(long)]
    pub ca: Option<PathBuf>,
    /// Free-form label copied into the JSON.
    #[arg(long, default_value = "")]
    pub label: String,
}

/// What one relay run measured.
#[derive(Clone, Debug, Serialize, serde::Deserialize)]
pub struct RelayReport {
    /// Always "relay".
    pub mode: String,
    /// The `--label`.
    pub label: String,
    /// `derp`, `tls`, `ws`, `wss`, `raw` or `raw-tls`.
    pub transport: String,
    /// `batched` or `per-packet`.
    #[serde(default)]
    pub flush: String,
    /// Which client: `loadgen` (ours) or `derphttp` (Tailscale's, `interop/derpload`).
    #[serde(default)]
    pub generator: String,
    /// Pairs.
    pub pairs: usize,
    /// Payload bytes per packet.
    pub size: usize,
    /// Offered packets/s (0 = as fast as possible).
    pub offered_pps: f64,
    /// Offered payload Gbit/s (0 = as fast as possible).
    pub offered_gbps: f64,
    /// Packets/s the senders actually sent in the window (against `offered_pps`, the nominal).
    #[serde(default)]
    pub actual_offered_pps: f64,
    /// In-flight limit per pair (0 = open loop).
    #[serde(default)]
    pub window: u64,
    /// Times a closed-loop sender gave up waiting (100 ms) and wrote its in-flight packets off.
    #[serde(default)]
    pub window_stalls: u64,
    /// Window length, s.
    pub duration_s: f64,
    /// Packets sent during the window.
    pub sent_window: u64,
    /// Packets received during the window.
    pub received_window: u64,
    /// Packets sent over the whole run.
    pub sent_total: u64,
    /// Packets received over the whole run (after a drain grace period).
    pub received_total: u64,
    /// `sent_total - received_total`.
    pub drops: u64,
    /// `drops / sent_total`.
    pub loss: f64,
    /// Delivered payload Gbit/s during the window.
    pub delivered_gbps: f64,
    /// Delivered packets/s during the window.
    pub delivered_pps: f64,
    /// One-way latency percentiles (µs) of packets sent and received in the window.
    pub latency_p50_us: f64,
    /// p99, µs.
    pub latency_p99_us: f64,
    /// p99.9, µs.
    pub latency_p999_us: f64,
    /// Max, µs.
    pub latency_max_us: f64,
    /// Server CPU seconds (user+system) during the window.
    pub server_cpu_s: Option<f64>,
    /// Server CPU seconds per window second (1.0 = one core busy).
    pub server_cpu_util: Option<f64>,
    /// Server peak RSS (VmHWM), bytes.
    pub server_peak_rss_bytes: Option<u64>,
    /// Delivered Gbit/s per server CPU second per second (Gbit/s per fully used core).
    pub gbps_per_core: Option<f64>,
    /// The load generator's own CPU seconds per window second (1.0 = one core busy): near the
    /// cores it may use, the load generator rather than the server was the limit.
    #[serde(default)]
    pub loadgen_cpu_util: Option<f64>,
    /// The load generator's own CPU seconds (user+system) during the window.
    #[serde(default)]
    pub loadgen_cpu_s: Option<f64>,
    /// Server CPU µs per packet delivered in the window.
    #[serde(default)]
    pub server_cpu_us_per_packet: Option<f64>,
    /// Client (load generator) CPU µs per packet delivered in the window: senders and
    /// receivers together, so it counts one send and one receive per delivered packet.
    #[serde(default)]
    pub loadgen_cpu_us_per_packet: Option<f64>,
}

/// The write half of a raw (forwarder) connection, plain TCP or TLS.
type RawWrite = Box<dyn tokio::io::AsyncWrite + Unpin + Send>;
/// The read half of a raw (forwarder) connection, plain TCP or TLS.
type RawRead = Box<dyn tokio::io::AsyncRead + Unpin + Send>;

enum Writer {
    Derp(ClientWriter),
    Raw(RawWrite, Vec<u8>),
}

impl Writer {
    fn buffer(&mut self, dst: NodePublic, data: &[u8]) -> Result<()> {
        match self {
            Writer::Derp(w) => w.buffer_packet(dst, data).map_err(|e| anyhow!("{e}")),
            Writer::Raw(_, buf) => {
                buf.extend_from_slice(&send_packet_prefix(&dst, data.len()));
                buf.extend_from_slice(data);
                Ok(())
            }
        }
    }

    async fn flush(&mut self) -> Result<()> {
        match self {
            Writer::Derp(w) => w.flush().await.map_err(|e| anyhow!("{e}")),
            Writer::Raw(w, buf) => {
                // Like `ClientWriter::flush`: one write, the buffer kept for the next batch.
                w.write_all(buf).await?;
                w.flush().await?;
                buf.clear();
                Ok(())
            }
        }
    }
}

enum Reader {
    Derp(ClientReader),
    Raw(RawRead, BytesMut),
}

impl Reader {
    /// Waits for at least one packet, then hands the payload of every packet already buffered
    /// to `on_packet` (borrowed from the read buffer: no allocation per packet). Frames that
    /// are not packets are skipped. Both transports read the same way: at least
    /// [`READ_CHUNK`] bytes of room per read, every complete frame parsed in place.
    async fn next_batch(&mut self, on_packet: &mut impl FnMut(&[u8])) -> Result<()> {
        match self {
            Reader::Derp(r) => {
                r.recv_packets(|_, data| on_packet(data))
                    .await
                    .map_err(|e| anyhow!("{e}"))?;
                Ok(())
            }
            Reader::Raw(r, buf) => loop {
                let mut delivered = false;
                while let Some(h) = FrameHeader::decode(buf) {
                    let len = h.payload_len();
                    if len > MAX_FRAME_SIZE {
                        bail!("raw stream: frame of {len} bytes");
                    }
                    if buf.len() < FRAME_HEADER_LEN + len {
                        break;
                    }
                    if h.typ != FrameType::SendPacket.as_u8() || len < KEY_LEN {
                        bail!("raw stream: unexpected frame 0x{:02x}", h.typ);
                    }
                    on_packet(&buf[FRAME_HEADER_LEN + KEY_LEN..FRAME_HEADER_LEN + len]);
                    buf.advance(FRAME_HEADER_LEN + len);
                    delivered = true;
                }
                if delivered {
                    return Ok(());
                }
                let frame_rest = FrameHeader::decode(buf).map_or(0, |h| {
                    (FRAME_HEADER_LEN + h.payload_len()).saturating_sub(buf.len())
                });
                let want = frame_rest.max(READ_CHUNK);
                if buf.capacity() - buf.len() < want {
                    buf.reserve(want);
                }
                if r.read_buf(buf).await? == 0 {
                    bail!("raw stream closed");
                }
            },
        }
    }
}

/// One end of a pair: its key and its halves.
struct End {
    key: NodePublic,
    reader: Reader,
    writer: Writer,
}

/// First bytes a `tcpfwd` connection sends: `b"FW"`, role (0 sender, 1 receiver), 0, pair (BE).
pub fn raw_hello(receiver: bool, pair: u32) -> [u8; 8] {
    let p = pair.to_be_bytes();
    [b'F', b'W', u8::from(receiver), 0, p[0], p[1], p[2], p[3]]
}

async fn wait_server_info(client: &mut derp::Client) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let f = tokio::time::timeout_at(deadline.into(), client.recv())
            .await
            .map_err(|_| anyhow!("no ServerInfo within 10 s"))?
            .map_err(|e| anyhow!("{e}"))?;
        if matches!(f, ReceivedFrame::ServerInfo(_)) {
            return Ok(());
        }
    }
}

/// Where the pairs connect, resolved once.
#[derive(Clone)]
struct Target {
    args: RelayArgs,
    /// For `http://` DERP URLs: address, authority and path for our buffered dialer; `None`
    /// means `derp::dial` (e.g. `https://`).
    dst: Option<(std::net::SocketAddr, String, String)>,
    /// TLS trust (`--ca` added to the system roots).
    tls: derp::client::dial::DialTls,
    /// The same as `dst` for receivers with `--recv-url`.
    recv_dst: Option<(std::net::SocketAddr, String, String)>,
}

impl std::ops::Deref for Target {
    type Target = RelayArgs;
    fn deref(&self) -> &RelayArgs {
        &self.args
    }
}

/// A TLS client for the TLS-terminating forwarder, trusting `tls.extra_roots` (rustls with
/// ring, as `derp::dial`).
pub fn raw_tls_connector(tls: &derp::client::dial::DialTls) -> Result<tokio_rustls::TlsConnector> {
    let mut roots = rustls::RootCertStore::empty();
    for c in &tls.extra_roots {
        // System roots that rustls cannot parse are skipped, as webpki does.
        let _ = roots.add(c.clone());
    }
    let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(tokio_rustls::TlsConnector::from(Arc::new(cfg)))
}

async fn connect_end(args: &Target, pair: u32, receiver: bool) -> Result<End> {
    let pk = NodePrivate::generate(&mut rand::thread_rng());
    match args.transport {
        Transport::Derp | Transport::Ws => {
            let (dst, url) = match &args.recv_url {
                Some(u) if receiver => (&args.recv_dst, u),
                _ => (&args.dst, &args.url),
            };
            let client = match dst {
                // Our own upgrade with a 64 KiB read buffer (see `dialer`).
                Some((dst, authority, path)) if args.transport == Transport::Derp => {
                    connect(*dst, None, authority, path, true).await?
                }
                _ => {
                    let mut opts = DialOptions::new(pk);
                    opts.websocket = args.transport == Transport::Ws;
                    opts.tls = args.tls.clone();
                    let mut c = dial(url, opts)
                        .await
                        .with_context(|| format!("dialing {url}"))?
                        .client;
                    wait_server_info(&mut c).await?;
                    c
                }
            };
            let key = client.public_key();
            let (r, w) = client.split();
            Ok(End {
                key,
                reader: Reader::Derp(r),
                writer: Writer::Derp(w),
            })
        }
        Transport::Raw => {
            let tls = args.url.strip_prefix("tls://");
            let hostport = tls.unwrap_or_else(|| args.url.trim_start_matches("http://"));
            let s = TcpStream::connect(hostport)
                .await
                .with_context(|| format!("connecting to {}", args.url))?;
            s.set_nodelay(true)?;
            let (r, mut w): (RawRead, RawWrite) = match tls {
                None => {
                    let (r, w) = s.into_split();
                    (Box::new(r), Box::new(w))
                }
                Some(hp) => {
                    let host = hp.rsplit_once(':').map_or(hp, |(h, _)| h).to_string();
                    let name =
                        rustls::pki_types::ServerName::try_from(host).context("TLS server name")?;
                    let t = raw_tls_connector(&args.tls)?
                        .connect(name, s)
                        .await
                        .with_context(|| format!("TLS to {}", args.url))?;
                    let (r, w) = tokio::io::split(t);
                    (Box::new(r), Box::new(w))
                }
            };
            w.write_all(&raw_hello(receiver, pair)).await?;
            w.flush().await?;
            Ok(End {
                key: pk.public(),
                reader: Reader::Raw(r, BytesMut::with_capacity(64 << 10)),
                writer: Writer::Raw(w, Vec::with_capacity(64 << 10)),
            })
        }
    }
}

#[derive(Default)]
struct Counters {
    window_stalls: AtomicU64,
    sent_total: AtomicU64,
    sent_window: AtomicU64,
    recv_total: AtomicU64,
    recv_window: AtomicU64,
}

/// Closed-loop and end-of-run bookkeeping shared by one pair's sender and receiver.
struct Flow {
    received: AtomicU64,
    notify: tokio::sync::Notify,
    /// Packets sent, published when the sender has finished (`u64::MAX` until then).
    sent_final: AtomicU64,
}

impl Default for Flow {
    fn default() -> Self {
        Flow {
            received: AtomicU64::new(0),
            notify: tokio::sync::Notify::new(),
            sent_final: AtomicU64::new(u64::MAX),
        }
    }
}

/// Runs the relay workload and returns its report.
pub async fn run(args: RelayArgs) -> Result<RelayReport> {
    if args.size < PAYLOAD_HEADER {
        bail!("--size must be at least {PAYLOAD_HEADER}");
    }
    if args.pairs == 0 {
        bail!("--pairs must be at least 1");
    }
    if args.recv_url.is_some() && args.transport != Transport::Derp {
        bail!("--recv-url needs --transport derp");
    }
    // Connect every pair (receivers first so nothing is sent to an unknown key).
    let resolve = |url: String| async move {
        Ok::<_, anyhow::Error>(match (args.transport, host_path(&url)) {
            (Transport::Derp, Ok((authority, path))) => {
                let addr = tokio::net::lookup_host(&authority)
                    .await?
                    .next()
                    .ok_or_else(|| anyhow!("cannot resolve {authority}"))?;
                Some((addr, authority, path))
            }
            _ => None,
        })
    };
    let dst = resolve(args.url.clone()).await?;
    let recv_dst = match &args.recv_url {
        Some(u) => resolve(u.clone()).await?,
        None => None,
    };
    let mut tls = derp::client::dial::DialTls::default();
    if let Some(path) = &args.ca {
        tls.extra_roots = derp::mesh::load_trust(Some(path)).context("--ca")?;
    }
    let args2 = Target {
        args: args.clone(),
        dst,
        tls,
        recv_dst,
    };
    let pairs: Vec<(End, End)> = stream::iter(0..args.pairs)
        .map(|i| {
            let a = args2.clone();
            async move {
                let rx = connect_end(&a, i as u32, true).await?;
                let tx = connect_end(&a, i as u32, false).await?;
                Ok::<_, anyhow::Error>((tx, rx))
            }
        })
        .buffer_unordered(32)
        .try_collect()
        .await?;
    // derper registers a client just after sending ServerInfo; give it a moment.
    tokio::time::sleep(Duration::from_millis(300)).await;

    let start = Instant::now();
    let warm = Duration::from_secs_f64(args.warmup);
    let dur = Duration::from_secs_f64(args.duration);
    let win_start = warm;
    let win_end = warm + dur;
    let grace = Duration::from_secs(2);
    let counters = Arc::new(Counters::default());
    let per_sender_rate = args.rate / args.pairs as f64;

    let mut senders = Vec::new();
    let mut receivers = Vec::new();
    for (tx, rx) in pairs {
        let dst = rx.key;
        let mut writer = tx.writer;
        let mut reader = rx.reader;
        let _keep_tx_reader = tx.reader;
        let _keep_rx_writer = rx.writer;
        let c = counters.clone();
        let size = args.size;
        let window = args.window;
        let per_packet = args.flush == Flush::PerPacket;
        let flow = Arc::new(Flow::default());
        let flow_rx = flow.clone();
        senders.push(tokio::spawn(async move {
            let _keep = _keep_tx_reader;
            let mut payload = vec![0u8; size];
            let mut seq = 0u64;
            let mut written_off = 0u64;
            loop {
                let now = start.elapsed();
                if now >= win_end {
                    break;
                }
                let n = if window > 0 {
                    let inflight = seq - written_off - flow.received.load(Ordering::Acquire);
                    let allowed = window.saturating_sub(inflight).min(BATCH);
                    if allowed == 0 {
                        let wait = tokio::time::timeout(
                            Duration::from_millis(100),
                            flow.notify.notified(),
                        );
                        if wait.await.is_err() {
                            // Lost in the relay: stop waiting for them.
                            written_off = seq - flow.received.load(Ordering::Acquire);
                            c.window_stalls.fetch_add(1, Ordering::Relaxed);
                        }
                        continue;
                    }
                    allowed
                } else if per_sender_rate > 0.0 {
                    let due = (per_sender_rate * now.as_secs_f64()) as u64 + 1;
                    let n = due.saturating_sub(seq).min(BATCH);
                    if n == 0 {
                        let next = Duration::from_secs_f64((seq as f64) / per_sender_rate);
                        tokio::time::sleep_until((start + next).into()).await;
                        continue;
                    }
                    n
                } else {
                    BATCH
                };
                let ns = now.as_nanos() as u64;
                for _ in 0..n {
                    payload[..8].copy_from_slice(&seq.to_le_bytes());
                    payload[8..16].copy_from_slice(&ns.to_le_bytes());
                    writer.buffer(dst, &payload)?;
                    seq += 1;
                    if per_packet {
                        // Tailscale's clients: one frame per write and flush.
                        writer.flush().await?;
                    }
                }
                if !per_packet {
                    writer.flush().await?;
                }
                c.sent_total.fetch_add(n, Ordering::Relaxed);
                if now >= win_start {
                    c.sent_window.fetch_add(n, Ordering::Relaxed);
                }
            }
            flow.sent_final.store(seq, Ordering::Release);
            Ok::<_, anyhow::Error>(writer)
        }));
        let c = counters.clone();
        receivers.push(tokio::spawn(async move {
            let _keep = _keep_rx_writer;
            let mut h = Histogram::new();
            let end = start + win_end + grace;
            let win_start_ns = win_start.as_nanos() as u64;
            let (mut total, mut window) = (0u64, 0u64);
            loop {
                // After the window, poll every 50 ms whether everything sent has arrived, so
                // the run ends as soon as the relay has drained (or after the grace period).
                let now = start.elapsed();
                let until = if now >= win_end {
                    if flow_rx.received.load(Ordering::Acquire)
                        >= flow_rx.sent_final.load(Ordering::Acquire)
                    {
                        break;
                    }
                    (start + now + Duration::from_millis(50)).min(end)
                } else {
                    end
                };
                let mut n = 0u64;
                let mut on_packet = |p: &[u8]| {
                    n += 1;
                    let now = start.elapsed();
                    if p.len() >= PAYLOAD_HEADER && now >= win_start && now < win_end {
                        window += 1;
                        let sent = u64::from_le_bytes(p[8..16].try_into().unwrap_or([0; 8]));
                        if sent >= win_start_ns {
                            h.record((now.as_nanos() as u64).saturating_sub(sent));
                        }
                    }
                };
                let res =
                    tokio::time::timeout_at(until.into(), reader.next_batch(&mut on_packet)).await;
                if n > 0 {
                    // Credit the closed-loop sender once per batch rather than per packet.
                    total += n;
                    flow_rx.received.fetch_add(n, Ordering::Release);
                    flow_rx.notify.notify_one();
                }
                match res {
                    Err(_) if until < end => continue,
                    Err(_) => break,
                    Ok(Err(_)) => break,
                    Ok(Ok(())) => {}
                }
            }
            c.recv_total.fetch_add(total, Ordering::Relaxed);
            c.recv_window.fetch_add(window, Ordering::Relaxed);
            h
        }));
    }

    let mut cpu0 = None;
    let mut cpu1 = None;
    let me = std::process::id();
    tokio::time::sleep_until((start + win_start).into()).await;
    if let Some(pid) = args.server_pid {
        cpu0 = procfs::cpu_seconds(pid);
    }
    let own0 = procfs::cpu_seconds(me);
    tokio::time::sleep_until((start + win_end).into()).await;
    if let Some(pid) = args.server_pid {
        cpu1 = procfs::cpu_seconds(pid);
    }
    let own1 = procfs::cpu_seconds(me);
    let mut writers = Vec::new();
    let mut send_errors = 0;
    for s in senders {
        match s.await {
            Ok(Ok(w)) => writers.push(w),
            Ok(Err(e)) => {
                send_errors += 1;
                if send_errors == 1 {
                    eprintln!("loadgen: sender error: {e:#}");
                }
            }
            Err(e) => eprintln!("loadgen: sender task: {e}"),
        }
    }
    let mut hist = Histogram::new();
    for r in receivers {
        if let Ok(h) = r.await {
            hist.merge(&h);
        }
    }
    drop(writers);

    let sent_total = counters.sent_total.load(Ordering::Relaxed);
    let recv_total = counters.recv_total.load(Ordering::Relaxed);
    let recv_window = counters.recv_window.load(Ordering::Relaxed);
    let secs = dur.as_secs_f64();
    let delivered_gbps = recv_window as f64 * args.size as f64 * 8.0 / secs / 1e9;
    let server_cpu_s = match (cpu0, cpu1) {
        (Some(a), Some(b)) => Some(b - a),
        _ => None,
    };
    let server_cpu_util = server_cpu_s.map(|c| c / secs);
    let loadgen_cpu_s = own0.zip(own1).map(|(a, b)| b - a);
    let per_packet_us = |cpu: Option<f64>| {
        cpu.filter(|_| recv_window > 0)
            .map(|c| c / recv_window as f64 * 1e6)
    };
    let us = |ns: u64| ns as f64 / 1000.0;
    Ok(RelayReport {
        mode: "relay".into(),
        label: args.label.clone(),
        transport: transport_name(args.transport, &args.url).into(),
        flush: args.flush.name().into(),
        generator: "loadgen".into(),
        actual_offered_pps: counters.sent_window.load(Ordering::Relaxed) as f64 / secs,
        pairs: args.pairs,
        size: args.size,
        offered_pps: args.rate,
        offered_gbps: args.rate * args.size as f64 * 8.0 / 1e9,
        window: args.window,
        window_stalls: counters.window_stalls.load(Ordering::Relaxed),
        duration_s: secs,
        sent_window: counters.sent_window.load(Ordering::Relaxed),
        received_window: recv_window,
        sent_total,
        received_total: recv_total,
        drops: sent_total.saturating_sub(recv_total),
        loss: if sent_total == 0 {
            0.0
        } else {
            sent_total.saturating_sub(recv_total) as f64 / sent_total as f64
        },
        delivered_gbps,
        delivered_pps: recv_window as f64 / secs,
        latency_p50_us: us(hist.quantile(0.5)),
        latency_p99_us: us(hist.quantile(0.99)),
        latency_p999_us: us(hist.quantile(0.999)),
        latency_max_us: us(hist.max()),
        server_cpu_s,
        server_cpu_util,
        server_peak_rss_bytes: args.server_pid.and_then(procfs::peak_rss_bytes),
        gbps_per_core: server_cpu_util
            .filter(|u| *u > 0.0)
            .map(|u| delivered_gbps / u),
        loadgen_cpu_util: loadgen_cpu_s.map(|c| c / secs),
        loadgen_cpu_s,
        server_cpu_us_per_packet: per_packet_us(server_cpu_s),
        loadgen_cpu_us_per_packet: per_packet_us(loadgen_cpu_s),
    })
}

/// The report's name for a transport: TLS shows in the URL's scheme.
fn transport_name(t: Transport, url: &str) -> &'static str {
    let tls = url.starts_with("https://");
    match (t, tls) {
        (Transport::Derp, false) => "derp",
        (Transport::Derp, true) => "tls",
        (Transport::Ws, false) => "ws",
        (Transport::Ws, true) => "wss",
        (Transport::Raw, _) if url.starts_with("tls://") => "raw-tls",
        (Transport::Raw, _) => "raw",
    }
}

#[cfg(test)]
mod tests {

    use super::*;
    use tokio::net::TcpListener;

    async fn raw_pair() -> (Reader, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let (a, b) = tokio::join!(TcpStream::connect(addr), l.accept());
        let (r, _w) = a.unwrap().into_split();
        (
            Reader::Raw(Box::new(r), BytesMut::with_capacity(64 << 10)),
            b.unwrap().0,
        )
    }

    #[tokio::test]
    async fn raw_reader_parses_every_buffered_frame_in_place() {
        let (mut reader, mut peer) = raw_pair().await;
        let dst = NodePrivate::generate(&mut rand::thread_rng()).public();
        let mut bytes = Vec::new();
        for i in 0..200u32 {
            bytes.extend_from_slice(&send_packet_prefix(&dst, 1400));
            let mut p = vec![0u8; 1400];
            p[..4].copy_from_slice(&i.to_le_bytes());
            bytes.extend_from_slice(&p);
        }
        let w = tokio::spawn(async move {
            for c in bytes.chunks(3001) {
                peer.write_all(c).await.unwrap();
            }
            peer
        });
        let mut got = Vec::new();
        while got.len() < 200 {
            reader
                .next_batch(&mut |p: &[u8]| {
                    assert_eq!(p.len(), 1400);
                    got.push(u32::from_le_bytes(p[..4].try_into().unwrap()));
                })
                .await
                .unwrap();
        }
        assert_eq!(got, (0..200).collect::<Vec<_>>());
        drop(w.await.unwrap());
    }

    #[tokio::test]
    async fn raw_reader_rejects_other_frames() {
        let (mut reader, mut peer) = raw_pair().await;
        peer.write_all(&FrameHeader::new(FrameType::Ping, 8).encode())
            .await
            .unwrap();
        peer.write_all(&[0; 8]).await.unwrap();
        let err = reader.next_batch(&mut |_: &[u8]| {}).await.unwrap_err();
        assert!(err.to_string().contains("unexpected frame"), "{err}");
    }
}
