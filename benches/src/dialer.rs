//! Plain-HTTP DERP dialing for the load generator: the `Upgrade: DERP` request, the 101, then
//! `derp::Client::handshake` until ServerInfo.
//!
//! Why not `derp::dial`: it owns the socket, and the load generator needs two things it
//! cannot give: a chosen source address (to open more connections than one address's ephemeral
//! ports allow) and a client over the two owned halves of the TCP stream
//! (`TcpStream::into_split` + `Client::handshake_split`), so its reader and writer never share
//! a lock. The client itself reads 64 KiB at a time and parses in place, as cheaply as the
//! TCP-forward ceiling's raw reader: on a machine where the load generator has one core, the
//! generator, not the relay, must not be the bottleneck.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use bytes::{Bytes, BytesMut};
use derp::{Client, ClientOptions, ReceivedFrame};
use proto::key::NodePrivate;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

/// `http://host:port/path` → (`host:port`, `/path`); the path defaults to `/derp`.
pub fn host_path(url: &str) -> Result<(String, String)> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| anyhow!("only http:// URLs are supported, got {url}"))?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/derp"),
    };
    Ok((authority.to_string(), path.to_string()))
}

/// Connects to `dst` (from `src` if given), upgrades `path` to DERP and runs the handshake until
/// ServerInfo arrives (so the server has accepted us). `owned_halves` hands the client the two
/// owned halves of the stream (no lock between its reader and writer: the relay workload);
/// otherwise the whole stream, split by the client as for every other transport.
pub async fn connect(
    dst: SocketAddr,
    src: Option<IpAddr>,
    authority: &str,
    path: &str,
    owned_halves: bool,
) -> Result<Client> {
    let sock = if dst.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    if let Some(ip) = src {
        // A port taken by bind() stays reserved for every later connect() on the machine while
        // its socket sits in TIME_WAIT (a minute), and the idle workload binds tens of
        // thousands per run: such a connection ends with a reset instead (linger 0, no
        // TIME_WAIT), or back-to-back runs run out of ports.
        sock.set_zero_linger()?;
        sock.bind(SocketAddr::new(ip, 0))
            .with_context(|| format!("binding {ip}"))?;
    }
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
    let opts = ClientOptions::default();
    let mut c = if owned_halves {
        let (rd, wr) = tcp.into_split();
        Client::handshake_split(rd, wr, leftover, pk, opts).await
    } else {
        Client::handshake(tcp, leftover, pk, opts).await
    }
    .map_err(|e| anyhow!("handshake: {e}"))?;
    loop {
        match tokio::time::timeout(Duration::from_secs(10), c.recv()).await {
            Err(_) => bail!("no ServerInfo within 10 s"),
            Ok(Err(e)) => bail!("recv: {e}"),
            Ok(Ok(ReceivedFrame::ServerInfo(_))) => return Ok(c),
            Ok(Ok(_)) => {}
        }
    }
}
