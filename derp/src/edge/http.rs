//! The HTTP face of the relay: turns one accepted connection into either a DERP connection (raw or
//! over WebSocket) or an ordinary HTTP/1.1 connection served by an axum router.
//!
//! Why we read the first request head by hand (with `httparse`) instead of letting hyper do it:
//! - fast start: a client that saw our meta cert sends `Derp-Fast-Start: 1` and expects *no* HTTP
//!   response at all, only DERP frames; hyper's upgrade API always writes a 101 first;
//! - pipelining: such a client writes its sealed ClientInfo frame in the same TCP segment / TLS
//!   record as the request, so bytes past the request head must reach the DERP frame reader.
//!   Hyper keeps what it over-read in a buffer its upgrade hands back, but only after a 101.
//!
//! So: we read at most [`MAX_HEAD_LEN`] bytes (with a [`HEAD_TIMEOUT`]) until a complete head
//! parses. `/derp` with `Upgrade: DERP` (or `websocket` without the `derp` subprotocol, as very
//! old clients sent) becomes raw DERP: the exact 101 (unless fast start), then
//! `DerpHandler::accept` with the leftover bytes. `/derp` with `Upgrade: websocket` and subprotocol
//! `derp` completes a WebSocket handshake (tungstenite, replaying the bytes we read) and runs DERP
//! over [`crate::edge::websocket::WsByteStream`]. Everything else is replayed into hyper's HTTP/1.1
//! server (keep-alive and upgrades work) serving [`routes`] in front of the caller's fallback
//! router. A non-upgrade `/derp` thus gets 426 from [`routes`], also on a keep-alive connection.
//!
//! Memory: all of this is one short phase ([`serve_until_derp`]), run in its own allocation and
//! freed before a DERP connection starts; an idle DERP connection would otherwise carry the
//! phase's largest state (head scratch buffer, hyper, TLS and WebSocket handshakes: ~15 KB
//! measured) for its whole life.
//!
//! Must never: buffer more than [`MAX_HEAD_LEN`] for any request head (the first, read here, or a
//! later one on a kept-alive connection, read by hyper with the same limit) or before deciding, drop bytes read past the head,
//! keep HTTP-phase state alive in a DERP connection, or let one bad client affect another
//! (garbage gets a 400, a log line and a counter).

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::extract::ConnectInfo;
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::any;
use axum::Router;
use bytes::{Buf, Bytes, BytesMut};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio_util::sync::CancellationToken;

use crate::edge::listener::{AddressGuard, ForwardedLimits};
use crate::edge::websocket::{self, WsByteStream};

/// Largest request head we read before deciding what the connection is.
pub const MAX_HEAD_LEN: usize = 16 * 1024;
/// Time allowed for the first request head (and a WebSocket handshake) to arrive.
pub const HEAD_TIMEOUT: Duration = Duration::from_secs(30);
/// Headers parsed in the first request head at most.
const MAX_HEADERS: usize = 100;
/// Time given to in-flight HTTP requests after shutdown begins.
const HTTP_DRAIN: Duration = Duration::from_secs(5);

/// Body of the 426 answer to a non-upgrade `/derp` request (derper's text).
pub const UPGRADE_REQUIRED_BODY: &str = "DERP requires connection upgrade";

/// Any bidirectional byte stream a DERP connection can run over.
pub trait DerpIo: AsyncRead + AsyncWrite + Send + Unpin + 'static {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> DerpIo for T {}

/// A boxed [`DerpIo`].
pub type BoxedIo = Box<dyn DerpIo>;

/// How the connection reached the DERP core.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UpgradeInfo {
    /// TCP peer address.
    pub remote: SocketAddr,
    /// The client sent `Ideal-Node` (it is not on its region's first node).
    pub not_ideal: bool,
    /// DERP runs over WebSocket binary messages.
    pub websocket: bool,
    /// The client asked for fast start (no HTTP response was written).
    pub fast_start: bool,
}

/// The DERP server core as the HTTP edge sees it. Implemented for [`crate::core::server::Server`];
/// tests may plug in their own.
pub trait DerpHandler: Send + Sync + 'static {
    /// The server's DERP public key (for `Derp-Public-Key`).
    fn public_key_bytes(&self) -> [u8; 32];
    /// Runs one DERP connection to completion. `leftover` holds bytes already read past the HTTP
    /// request head; they come before anything else read from `io`.
    fn accept_boxed(
        self: Arc<Self>,
        io: BoxedIo,
        leftover: Bytes,
        info: UpgradeInfo,
    ) -> Pin<Box<dyn Future<Output = ()> + Send + 'static>>;
}

impl DerpHandler for crate::core::server::Server {
    fn public_key_bytes(&self) -> [u8; 32] {
        *self.public_key().as_bytes()
    }

    fn accept_boxed(
        self: Arc<Self>,
        io: BoxedIo,
        leftover: Bytes,
        info: UpgradeInfo,
    ) -> Pin<Box<dyn Future<Output = ()> + Send + 'static>> {
        let conn = crate::core::server::ConnInfo {
            remote: info.remote,
            not_ideal: info.not_ideal,
            websocket: info.websocket,
        };
        Box::pin(self.accept(io, leftover, conn))
    }
}

/// Counters of the HTTP edge and its listeners (one set per process registry).
#[derive(Clone, Debug)]
pub struct HttpMetrics {
    pub(crate) requests: prometheus::IntCounterVec,
    pub(crate) bad_requests: prometheus::IntCounterVec,
    pub(crate) websocket_text: prometheus::IntCounter,
    pub(crate) accepted: prometheus::IntCounterVec,
    pub(crate) rejected: prometheus::IntCounterVec,
    pub(crate) accept_errors: prometheus::IntCounterVec,
    pub(crate) tls_handshake_failures: prometheus::IntCounterVec,
    pub(crate) open: prometheus::IntGaugeVec,
}

impl HttpMetrics {
    /// Registers the edge metrics on `registry`.
    pub fn new(registry: &prometheus::Registry) -> Result<Self, prometheus::Error> {
        fn counter_vec(
            registry: &prometheus::Registry,
            name: &str,
            help: &str,
            labels: &[&str],
        ) -> Result<prometheus::IntCounterVec, prometheus::Error> {
            let c = prometheus::IntCounterVec::new(prometheus::Opts::new(name, help), labels)?;
            registry.register(Box::new(c.clone()))?;
            Ok(c)
        }
        let websocket_text = prometheus::IntCounter::new(
            "derp_websocket_text_messages_total",
            "WebSocket DERP connections closed (1003) because the client sent a text message.",
        )?;
        registry.register(Box::new(websocket_text.clone()))?;
        let open = prometheus::IntGaugeVec::new(
            prometheus::Opts::new(
                "derp_listener_open_connections",
                "Connections currently open, by listener.",
            ),
            &["listener"],
        )?;
        registry.register(Box::new(open.clone()))?;
        Ok(HttpMetrics {
            requests: counter_vec(
                registry,
                "derp_http_connections_total",
                "Connections by what their first request was (derp, derp_fast_start, websocket, http).",
                &["kind"],
            )?,
            bad_requests: counter_vec(
                registry,
                "derp_http_bad_requests_total",
                "Connections closed before or at a bad first request head, by reason.",
                &["reason"],
            )?,
            websocket_text,
            accepted: counter_vec(
                registry,
                "derp_listener_accepted_connections_total",
                "TCP connections accepted, by listener.",
                &["listener"],
            )?,
            rejected: counter_vec(
                registry,
                "derp_listener_rejected_connections_total",
                "TCP connections accepted and closed at once, by listener and reason (rate_limit, max_connections).",
                &["listener", "reason"],
            )?,
            accept_errors: counter_vec(
                registry,
                "derp_listener_accept_errors_total",
                "accept() errors, by listener.",
                &["listener"],
            )?,
            tls_handshake_failures: counter_vec(
                registry,
                "derp_tls_handshake_failures_total",
                "TLS handshakes that failed or timed out, by reason.",
                &["reason"],
            )?,
            open,
        })
    }
}

/// Everything a connection needs: the DERP core, the HTTP router, and metrics.
pub struct HttpEdge {
    derp: Option<Arc<dyn DerpHandler>>,
    /// One permit per relay (DERP) connection; none left = new upgrades get a 503.
    relay_slots: Arc<tokio::sync::Semaphore>,
    app: Router,
    metrics: HttpMetrics,
    /// Set once the process starts to drain: the probe routes answer 503 from then on.
    draining: Arc<AtomicBool>,
}

impl std::fmt::Debug for HttpEdge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpEdge").finish_non_exhaustive()
    }
}

impl HttpEdge {
    /// Builds the edge for `derp`. `fallback` serves every request that is not DERP and not one of
    /// [`routes`] (which take precedence, so merging them into `fallback` too is harmless).
    /// Without a relay (`derp` = `None`, the coordinator-only role) `/derp` answers 404
    /// "derp server disabled", as derper does with `-derp=false`, and the probe routes are absent.
    pub fn new(
        derp: Option<Arc<dyn DerpHandler>>,
        fallback: Router,
        registry: &prometheus::Registry,
    ) -> Result<Arc<Self>, prometheus::Error> {
        Self::with_relay_cap(
            derp,
            fallback,
            registry,
            tokio::sync::Semaphore::MAX_PERMITS,
        )
    }

    /// [`new`](Self::new) with a cap on concurrent relay (DERP) connections: past it, a relay
    /// upgrade is answered `503 Service Unavailable` and closed at once, while every other
    /// request is still served (the listener's cap sits above this one).
    pub fn with_relay_cap(
        derp: Option<Arc<dyn DerpHandler>>,
        fallback: Router,
        registry: &prometheus::Registry,
        relay_cap: usize,
    ) -> Result<Arc<Self>, prometheus::Error> {
        let draining = Arc::new(AtomicBool::new(false));
        let app = if derp.is_some() {
            routes(draining.clone()).fallback_service(fallback)
        } else {
            fallback
        };
        Ok(Arc::new(HttpEdge {
            derp,
            relay_slots: Arc::new(tokio::sync::Semaphore::new(
                relay_cap.clamp(1, tokio::sync::Semaphore::MAX_PERMITS),
            )),
            app,
            metrics: HttpMetrics::new(registry)?,
            draining,
        }))
    }

    /// Marks the relay as draining: `/derp/probe` and `/derp/latency-check` answer
    /// `503 draining` from now on (everything else is still served), so that a coordinator
    /// probing its regions moves peers away before the relay goes, and clients measuring
    /// latency over HTTP stop choosing it.
    pub fn set_draining(&self) {
        self.draining.store(true, Ordering::Relaxed);
    }

    /// The edge's metrics (shared with the listeners).
    pub fn metrics(&self) -> &HttpMetrics {
        &self.metrics
    }

    /// The DERP core, if this process runs a relay.
    pub fn derp(&self) -> Option<&Arc<dyn DerpHandler>> {
        self.derp.as_ref()
    }
}

/// Whether the connection arrived over TLS; inserted as a request extension for fallback
/// handlers (next to axum's `ConnectInfo<SocketAddr>`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnScheme {
    /// True on the HTTPS listener.
    pub tls: bool,
}

/// An IO that first yields `prefix`, then reads from `inner`; writes go straight to `inner`.
/// Used to replay bytes we already read into hyper or tungstenite.
#[derive(Debug)]
pub struct Rewind<IO> {
    prefix: Bytes,
    inner: IO,
}

impl<IO> Rewind<IO> {
    /// Wraps `inner`, replaying `prefix` first.
    pub fn new(inner: IO, prefix: Bytes) -> Self {
        Rewind { prefix, inner }
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Rewind<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            buf.put_slice(&self.prefix[..n]);
            self.prefix.advance(n);
            if self.prefix.is_empty() {
                // Free the replayed buffer now: the stream may live for days (WebSocket DERP).
                self.prefix = Bytes::new();
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Rewind<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Why the first request head was not usable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum HeadError {
    /// Closed before any byte: not an error worth a response.
    Closed,
    /// Closed in the middle of a head.
    Truncated,
    Malformed,
    TooLarge,
    Timeout,
    Io,
}

impl HeadError {
    fn reason(self) -> &'static str {
        match self {
            HeadError::Closed => "closed",
            HeadError::Truncated => "truncated",
            HeadError::Malformed => "malformed",
            HeadError::TooLarge => "too_large",
            HeadError::Timeout => "timeout",
            HeadError::Io => "io_error",
        }
    }
}

/// What the first request is.
#[derive(Debug, Clone, PartialEq, Eq)]
enum FirstRequest {
    /// Raw DERP after the 101 (or straight away on fast start).
    Derp { fast_start: bool, not_ideal: bool },
    /// DERP over a WebSocket with subprotocol `derp`.
    WebSocket { not_ideal: bool },
    /// Anything else: hyper + axum.
    Http,
}

/// The path part of a request target (origin-form or absolute-form), without the query.
fn target_path(target: &str) -> &str {
    let no_query = target.split(['?', '#']).next().unwrap_or("");
    if let Some(idx) = no_query.find("://") {
        let after = &no_query[idx + 3..];
        return after.find('/').map(|i| &after[i..]).unwrap_or("/");
    }
    no_query
}

fn header_str<'a>(headers: &'a [httparse::Header<'_>], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case(name))
        .and_then(|h| std::str::from_utf8(h.value).ok())
        .map(str::trim)
}

/// Parses a complete head; `Ok(None)` if more bytes are needed.
fn classify(buf: &[u8]) -> Result<Option<(usize, FirstRequest)>, HeadError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let n = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(HeadError::TooLarge),
        Err(_) => return Err(HeadError::Malformed),
    };
    let path = target_path(req.path.unwrap_or(""));
    if path != "/derp" {
        return Ok(Some((n, FirstRequest::Http)));
    }
    let headers = req.headers;
    let upgrade = header_str(headers, "upgrade")
        .unwrap_or("")
        .to_ascii_lowercase();
    let not_ideal = header_str(headers, "ideal-node").is_some_and(|v| !v.is_empty());
    let kind = match upgrade.as_str() {
        "derp" => FirstRequest::Derp {
            fast_start: header_str(headers, "derp-fast-start") == Some("1"),
            not_ideal,
        },
        "websocket" => {
            let wants_derp = headers
                .iter()
                .filter(|h| h.name.eq_ignore_ascii_case("sec-websocket-protocol"))
                .any(|h| h.value.windows(4).any(|w| w == b"derp"));
            if wants_derp {
                FirstRequest::WebSocket { not_ideal }
            } else {
                // Very early clients said "Upgrade: WebSocket" but spoke raw DERP.
                FirstRequest::Derp {
                    fast_start: header_str(headers, "derp-fast-start") == Some("1"),
                    not_ideal,
                }
            }
        }
        other => {
            if !other.is_empty() {
                tracing::debug!(upgrade = other, "unexpected Upgrade header on /derp");
            }
            FirstRequest::Http
        }
    };
    Ok(Some((n, kind)))
}

async fn read_head<IO: AsyncRead + Unpin>(
    io: &mut IO,
    buf: &mut BytesMut,
) -> Result<(usize, FirstRequest), HeadError> {
    let mut chunk = [0u8; 4096];
    loop {
        if !buf.is_empty() {
            if let Some(found) = classify(buf)? {
                return Ok(found);
            }
        }
        if buf.len() >= MAX_HEAD_LEN {
            return Err(HeadError::TooLarge);
        }
        let want = chunk.len().min(MAX_HEAD_LEN - buf.len());
        let n = io
            .read(&mut chunk[..want])
            .await
            .map_err(|_| HeadError::Io)?;
        if n == 0 {
            return Err(if buf.is_empty() {
                HeadError::Closed
            } else {
                HeadError::Truncated
            });
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// The exact 101 derper writes before DERP frames (when not fast-starting).
pub fn switching_protocols_response(public_key: &[u8; 32]) -> String {
    format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: DERP\r\nConnection: Upgrade\r\nDerp-Version: 2\r\nDerp-Public-Key: {}\r\n\r\n",
        hex::encode(public_key)
    )
}

/// Writes a bodyless error response and closes. Unread input is drained for a moment first
/// ("lingering close"): closing with unread bytes makes the kernel send a RST, which can destroy
/// the response before the client reads it.
async fn write_error_and_close<IO: AsyncRead + AsyncWrite + Unpin>(io: &mut IO, status: &str) {
    let msg = format!("HTTP/1.1 {status}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        io.write_all(msg.as_bytes()).await?;
        io.shutdown().await
    })
    .await;
    let mut sink = [0u8; 4096];
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        let mut drained = 0usize;
        while drained < 256 * 1024 {
            match io.read(&mut sink).await {
                Ok(0) | Err(_) => break,
                Ok(n) => drained += n,
            }
        }
    })
    .await;
}

/// A DERP connection ready to run: the HTTP phase is over (101 written, or fast start) and only
/// the relay's own state remains. Returned by [`serve_until_derp`].
pub type DerpConnection = Pin<Box<dyn Future<Output = ()> + Send + 'static>>;

/// Serves one accepted connection (already past TLS if `is_tls`) until it ends. `cancel` starts a
/// graceful stop of plain HTTP connections (DERP connections end through the server's shutdown).
///
/// The HTTP phase runs in its own heap allocation that is freed before the DERP connection
/// starts, so a long-lived idle DERP connection keeps none of it (see [`serve_until_derp`]).
pub async fn serve_connection<IO>(
    io: IO,
    remote: SocketAddr,
    edge: Arc<HttpEdge>,
    is_tls: bool,
    cancel: CancellationToken,
) where
    IO: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let derp = Box::pin(serve_until_derp(io, remote, edge, is_tls, cancel)).await;
    if let Some(derp) = derp {
        derp.await;
    }
}

/// The HTTP phase of a connection: reads the first request head and either serves HTTP until the
/// connection ends (`None`), or upgrades to DERP and returns the not yet started DERP connection.
///
/// Why split: a Rust future is as large as its largest state, and this phase has big ones (the
/// head-reading scratch buffer, hyper's connection, the WebSocket handshake, the TLS stream).
/// Awaited inline, every idle DERP connection would keep that much memory for its whole life.
/// Callers box this future and drop it before awaiting the returned DERP connection, which holds
/// only the transport and the relay's per-connection state. The head buffer is freed here too:
/// bytes read past the head travel on as their own small `Bytes`.
pub async fn serve_until_derp<IO>(
    io: IO,
    remote: SocketAddr,
    edge: Arc<HttpEdge>,
    is_tls: bool,
    cancel: CancellationToken,
) -> Option<DerpConnection>
where
    IO: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    serve_until_derp_limited(io, remote, edge, is_tls, cancel, None).await
}

/// [`serve_until_derp`] for a connection from a trusted proxy: a relay upgrade first takes a
/// place for the client address the proxy forwarded (`forwarded`), held for the DERP
/// connection's life; at that address's cap or rate it is answered 429 and closed.
pub(crate) async fn serve_until_derp_limited<IO>(
    mut io: IO,
    remote: SocketAddr,
    edge: Arc<HttpEdge>,
    is_tls: bool,
    cancel: CancellationToken,
    forwarded: Option<ForwardedLimits>,
) -> Option<DerpConnection>
where
    IO: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let metrics = &edge.metrics;
    let mut buf = BytesMut::with_capacity(1024);
    let head = tokio::select! {
        _ = cancel.cancelled() => return None,
        r = tokio::time::timeout(HEAD_TIMEOUT, read_head(&mut io, &mut buf)) => {
            r.unwrap_or(Err(HeadError::Timeout))
        }
    };
    let (head_len, kind) = match head {
        Ok(x) => x,
        Err(e) => {
            metrics.bad_requests.with_label_values(&[e.reason()]).inc();
            match e {
                HeadError::Malformed => {
                    tracing::debug!(%remote, "malformed HTTP request head");
                    write_error_and_close(&mut io, "400 Bad Request").await;
                }
                HeadError::TooLarge => {
                    tracing::debug!(%remote, "HTTP request head too large");
                    write_error_and_close(&mut io, "431 Request Header Fields Too Large").await;
                }
                HeadError::Timeout => {
                    tracing::debug!(%remote, "timed out waiting for an HTTP request head");
                    write_error_and_close(&mut io, "408 Request Timeout").await;
                }
                HeadError::Closed | HeadError::Truncated | HeadError::Io => {}
            }
            return None;
        }
    };

    match kind {
        FirstRequest::Derp {
            fast_start,
            not_ideal,
        } => {
            let client = admit_forwarded(forwarded, &buf[..head_len], remote, &mut io)
                .await
                .ok()?;
            let (derp, slot) = relay_or_404(&edge, &mut io, remote).await?;
            // Copied out so that the head buffer is freed with this phase.
            let leftover = Bytes::copy_from_slice(&buf[head_len..]);
            drop(buf);
            let label = if fast_start {
                "derp_fast_start"
            } else {
                "derp"
            };
            metrics.requests.with_label_values(&[label]).inc();
            if !fast_start {
                let resp = switching_protocols_response(&derp.public_key_bytes());
                let wrote = tokio::time::timeout(HEAD_TIMEOUT, async {
                    io.write_all(resp.as_bytes()).await?;
                    io.flush().await
                })
                .await;
                if !matches!(wrote, Ok(Ok(()))) {
                    tracing::debug!(%remote, "failed to write the DERP 101 response");
                    return None;
                }
            }
            let info = UpgradeInfo {
                remote,
                not_ideal,
                websocket: false,
                fast_start,
            };
            Some(holding_slot(
                derp.accept_boxed(Box::new(io), leftover, info),
                slot,
                client,
            ))
        }
        FirstRequest::WebSocket { not_ideal } => {
            let client = admit_forwarded(forwarded, &buf[..head_len], remote, &mut io)
                .await
                .ok()?;
            let (derp, slot) = relay_or_404(&edge, &mut io, remote).await?;
            metrics.requests.with_label_values(&["websocket"]).inc();
            let replay = Rewind::new(io, buf.freeze());
            let hs = tokio::time::timeout(
                HEAD_TIMEOUT,
                tokio_tungstenite::accept_hdr_async_with_config(
                    replay,
                    select_derp_subprotocol,
                    Some(websocket::websocket_config()),
                ),
            )
            .await;
            let ws = match hs {
                Ok(Ok(ws)) => ws,
                Ok(Err(e)) => {
                    metrics
                        .bad_requests
                        .with_label_values(&["websocket_handshake"])
                        .inc();
                    tracing::debug!(%remote, error = %e, "WebSocket handshake failed");
                    return None;
                }
                Err(_) => {
                    metrics.bad_requests.with_label_values(&["timeout"]).inc();
                    return None;
                }
            };
            let stream = WsByteStream::new(ws).with_text_counter(metrics.websocket_text.clone());
            let info = UpgradeInfo {
                remote,
                not_ideal,
                websocket: true,
                fast_start: false,
            };
            Some(holding_slot(
                derp.accept_boxed(Box::new(stream), Bytes::new(), info),
                slot,
                client,
            ))
        }
        FirstRequest::Http => {
            metrics.requests.with_label_values(&["http"]).inc();
            serve_http(Rewind::new(io, buf.freeze()), remote, &edge, is_tls, cancel).await;
            None
        }
    }
}

/// `conn`, keeping its relay slot (and its forwarded client's place) until it ends.
fn holding_slot(
    conn: DerpConnection,
    slot: tokio::sync::OwnedSemaphorePermit,
    client: Option<AddressGuard>,
) -> DerpConnection {
    Box::pin(async move {
        let _slot = slot;
        let _client = client;
        conn.await;
    })
}

/// The peer was answered with an error status; its connection ends here.
struct Answered;

/// A place for the forwarded client of a trusted proxy's relay upgrade, held until the relay
/// connection ends: `Ok(None)` when the peer is not a trusted proxy (its own address was limited
/// at accept), `Err(Answered)` after a 429 when the forwarded client is over its limit.
async fn admit_forwarded<IO: AsyncRead + AsyncWrite + Unpin>(
    forwarded: Option<ForwardedLimits>,
    head: &[u8],
    remote: SocketAddr,
    io: &mut IO,
) -> Result<Option<AddressGuard>, Answered> {
    let Some(limits) = forwarded else {
        return Ok(None);
    };
    match limits.admit(head, remote.ip()) {
        Ok(guard) => Ok(Some(guard)),
        Err(client) => {
            tracing::debug!(%remote, %client, "per-address limit for a forwarded client; answering 429");
            write_error_and_close(io, "429 Too Many Requests").await;
            Err(Answered)
        }
    }
}

/// The relay, or (in a process without one) a 404 answer and `None`, like derper's `-derp=false`.
///
/// With a relay, also takes one of its slots; at the relay's cap the answer is a quick 503 and
/// `None`. The slot is held until the DERP connection ends.
async fn relay_or_404<IO: AsyncRead + AsyncWrite + Unpin>(
    edge: &HttpEdge,
    io: &mut IO,
    remote: SocketAddr,
) -> Option<(Arc<dyn DerpHandler>, tokio::sync::OwnedSemaphorePermit)> {
    if let Some(d) = &edge.derp {
        let Ok(slot) = edge.relay_slots.clone().try_acquire_owned() else {
            edge.metrics
                .requests
                .with_label_values(&["derp_over_cap"])
                .inc();
            tracing::debug!(%remote, "relay connection cap reached; answering 503");
            write_error_and_close(io, "503 Service Unavailable").await;
            return None;
        };
        return Some((d.clone(), slot));
    }
    edge.metrics
        .requests
        .with_label_values(&["derp_disabled"])
        .inc();
    tracing::debug!(%remote, "DERP requested but this process runs no relay");
    write_error_and_close(io, "404 Not Found").await;
    None
}

/// tungstenite handshake callback: answer with the `derp` subprotocol (any Origin is fine).
#[allow(clippy::result_large_err)] // the Err type is fixed by tungstenite's Callback trait
fn select_derp_subprotocol(
    _req: &tokio_tungstenite::tungstenite::handshake::server::Request,
    mut resp: tokio_tungstenite::tungstenite::handshake::server::Response,
) -> Result<
    tokio_tungstenite::tungstenite::handshake::server::Response,
    tokio_tungstenite::tungstenite::handshake::server::ErrorResponse,
> {
    resp.headers_mut().insert(
        header::SEC_WEBSOCKET_PROTOCOL,
        HeaderValue::from_static(websocket::SUBPROTOCOL),
    );
    Ok(resp)
}

async fn serve_http<IO>(
    io: Rewind<IO>,
    remote: SocketAddr,
    edge: &HttpEdge,
    is_tls: bool,
    cancel: CancellationToken,
) where
    IO: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let app = edge.app.clone();
    let svc = hyper::service::service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
        let app = app.clone();
        async move {
            if request_head_len(&req) > MAX_HEAD_LEN {
                tracing::debug!(%remote, "HTTP request head too large (kept-alive connection)");
                let mut resp = StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE.into_response();
                resp.headers_mut()
                    .insert(header::CONNECTION, HeaderValue::from_static("close"));
                return Ok(resp);
            }
            req.extensions_mut().insert(ConnectInfo(remote));
            req.extensions_mut().insert(ConnScheme { tls: is_tls });
            tower::ServiceExt::oneshot(app, req).await
        }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEAD_TIMEOUT)
        // The first head was capped at MAX_HEAD_LEN; later ones on this connection get the same
        // limit (hyper's default is ~400 KiB), answered 431 past it.
        .max_buf_size(MAX_HEAD_LEN)
        .max_headers(MAX_HEADERS)
        .serve_connection(TokioIo::new(io), svc)
        .with_upgrades();
    tokio::pin!(conn);
    let result = tokio::select! {
        r = conn.as_mut() => r,
        _ = cancel.cancelled() => {
            conn.as_mut().graceful_shutdown();
            match tokio::time::timeout(HTTP_DRAIN, conn.as_mut()).await {
                Ok(r) => r,
                Err(_) => return,
            }
        }
    };
    if let Err(e) = result {
        tracing::debug!(%remote, error = %e, "HTTP connection ended with an error");
    }
}

/// The size of a request's head as it was on the wire (request line, headers, CRLFs), give or
/// take the spelling of the version.
fn request_head_len<B>(req: &hyper::Request<B>) -> usize {
    let line = req.method().as_str().len() + req.uri().to_string().len() + " HTTP/1.1\r\n".len();
    req.headers()
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len() + 4)
        .sum::<usize>()
        + line
        + 2
}

/// Whether an `X-Tailscale-Challenge` value may be echoed: 1..=64 chars of `[A-Za-z0-9._:-]`.
pub fn challenge_is_valid(challenge: &[u8]) -> bool {
    !challenge.is_empty()
        && challenge.len() <= 64
        && challenge
            .iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b':' | b'-'))
}

async fn probe(draining: Arc<AtomicBool>, method: Method) -> Response {
    if draining.load(Ordering::Relaxed) && (method == Method::GET || method == Method::HEAD) {
        (StatusCode::SERVICE_UNAVAILABLE, "draining\n").into_response()
    } else if method == Method::GET || method == Method::HEAD {
        ([(header::ACCESS_CONTROL_ALLOW_ORIGIN, "*")], StatusCode::OK).into_response()
    } else {
        (StatusCode::METHOD_NOT_ALLOWED, "bogus probe method\n").into_response()
    }
}

async fn generate_204(headers: HeaderMap) -> Response {
    let mut resp = StatusCode::NO_CONTENT.into_response();
    let h = resp.headers_mut();
    h.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("no-cache, no-store, must-revalidate, no-transform, max-age=0"),
    );
    if let Some(ch) = headers.get("x-tailscale-challenge") {
        if challenge_is_valid(ch.as_bytes()) {
            let mut v = b"response ".to_vec();
            v.extend_from_slice(ch.as_bytes());
            if let Ok(v) = HeaderValue::from_bytes(&v) {
                h.insert("x-tailscale-response", v);
            }
        }
    }
    resp
}

async fn upgrade_required() -> Response {
    (StatusCode::UPGRADE_REQUIRED, UPGRADE_REQUIRED_BODY).into_response()
}

/// derper's small endpoints: `/derp/probe` and `/derp/latency-check` (GET/HEAD → 200 with
/// `Access-Control-Allow-Origin: *`, else 405; `503 draining` once `draining` is set, which
/// derper, having no drain, never answers), `/generate_204` (captive portal check with the
/// challenge echo), and `/derp` → 426 for requests that are not DERP upgrades.
pub fn routes(draining: Arc<AtomicBool>) -> Router {
    let for_latency = draining.clone();
    Router::new()
        .route("/derp", any(upgrade_required))
        .route("/derp/probe", any(move |m| probe(draining.clone(), m)))
        .route(
            "/derp/latency-check",
            any(move |m| probe(for_latency.clone(), m)),
        )
        .route("/generate_204", any(generate_204))
}

#[cfg(test)]
mod edge_tests {
    use super::*;

    #[test]
    fn edge_classify_heads() {
        let c = |s: &str| classify(s.as_bytes()).unwrap().map(|(_, k)| k);
        assert_eq!(
            c("GET /derp HTTP/1.1\r\nUpgrade: DERP\r\nConnection: Upgrade\r\n\r\n"),
            Some(FirstRequest::Derp {
                fast_start: false,
                not_ideal: false
            })
        );
        assert_eq!(
            c("GET /derp?x=1 HTTP/1.1\r\nupgrade: derp\r\nDerp-Fast-Start: 1\r\nIdeal-Node: n1\r\n\r\n"),
            Some(FirstRequest::Derp {
                fast_start: true,
                not_ideal: true
            })
        );
        assert_eq!(
            c("GET /derp HTTP/1.1\r\nUpgrade: WebSocket\r\n\r\n"),
            Some(FirstRequest::Derp {
                fast_start: false,
                not_ideal: false
            })
        );
        assert_eq!(
            c("GET /derp HTTP/1.1\r\nUpgrade: websocket\r\nSec-WebSocket-Protocol: derp\r\n\r\n"),
            Some(FirstRequest::WebSocket { not_ideal: false })
        );
        assert_eq!(c("GET /derp HTTP/1.1\r\n\r\n"), Some(FirstRequest::Http));
        assert_eq!(
            c("GET /derp/probe HTTP/1.1\r\nUpgrade: DERP\r\n\r\n"),
            Some(FirstRequest::Http)
        );
        assert_eq!(
            c("GET http://h/derp HTTP/1.1\r\nUpgrade: DERP\r\n\r\n"),
            Some(FirstRequest::Derp {
                fast_start: false,
                not_ideal: false
            })
        );
        assert_eq!(c("GET /derp HTTP/1.1\r\nUpgrade: DERP\r\n"), None);
        assert_eq!(
            classify(b"\x16\x03\x01garbage\r\n\r\n").unwrap_err(),
            HeadError::Malformed
        );
        // Leftover bytes are not part of the head.
        let req = b"GET /derp HTTP/1.1\r\nUpgrade: DERP\r\n\r\nEXTRA";
        let (n, _) = classify(req).unwrap().unwrap();
        assert_eq!(&req[n..], b"EXTRA");
    }

    #[test]
    fn edge_challenge_rules() {
        assert!(challenge_is_valid(b"ts_derp1.example.com:443-x"));
        assert!(challenge_is_valid(&[b'a'; 64]));
        assert!(!challenge_is_valid(&[b'a'; 65]));
        assert!(!challenge_is_valid(b"a b"));
        assert!(!challenge_is_valid(b"a\0b"));
        assert!(!challenge_is_valid(b""));
        assert!(!challenge_is_valid("é".as_bytes()));
    }

    #[tokio::test]
    async fn edge_rewind_replays_prefix_first() {
        let (a, mut b) = tokio::io::duplex(64);
        b.write_all(b" world").await.unwrap();
        drop(b);
        let mut r = Rewind::new(a, Bytes::from_static(b"hello"));
        let mut s = String::new();
        r.read_to_string(&mut s).await.unwrap();
        assert_eq!(s, "hello world");
    }
}
