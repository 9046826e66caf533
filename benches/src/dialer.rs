//! Plain-HTTP DERP dialing for the load generator: the `Upgrade: DERP` request, the 101, then
//! `derp::Client::handshake` until ServerInfo.
//!
//! Why not `derp::dial::dial`: it owns the socket, and the load generator needs two things it
//! cannot give: a chosen source address (to open more connections than one address's ephemeral
//! ports allow) and a 64 KiB read buffer under the client. `derp::Client` reads only the bytes
//! missing from the current frame, about one `recvfrom` per two 1400-byte packets; on a machine
//! where the load generator has one core, that would make the generator, not the relay, the
//! bottleneck, and unfairly so next to the TCP-forward ceiling, which reads 64 KiB at a time.

use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::task::{Context as TaskContext, Poll};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use bytes::{Bytes, BytesMut};
use derp::{Client, ClientOptions, ReceivedFrame};
use proto::key::NodePrivate;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, ReadBuf};
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

/// Either the bare socket or the socket under a 64 KiB read buffer.
enum Io {
    Plain(TcpStream),
    Buffered(BufReader<TcpStream>),
}

impl AsyncRead for Io {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Io::Buffered(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Io {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Io::Buffered(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_flush(cx),
            Io::Buffered(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Io::Buffered(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

/// Connects to `dst` (from `src` if given), upgrades `path` to DERP and runs the handshake until
/// ServerInfo arrives (so the server has accepted us). `buffered` puts a 64 KiB read buffer
/// under the client.
pub async fn connect(
    dst: SocketAddr,
    src: Option<IpAddr>,
    authority: &str,
    path: &str,
    buffered: bool,
) -> Result<Client> {
    let sock = if dst.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    if let Some(ip) = src {
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
    let io = if buffered {
        Io::Buffered(BufReader::with_capacity(64 << 10, tcp))
    } else {
        Io::Plain(tcp)
    };
    let pk = NodePrivate::generate(&mut rand::thread_rng());
    let mut c = Client::handshake(io, leftover, pk, ClientOptions::default())
        .await
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
