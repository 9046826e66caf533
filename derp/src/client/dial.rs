//! Dialing a DERP server by URL: TCP, optional TLS, the HTTP upgrade (or a WebSocket), then the
//! DERP handshake. Used by tests, the load generator and the outbound mesh links.
//!
//! Why it mirrors the Go client (`derphttp.Client.connect`) closely: the point is to exercise the
//! server the way real clients do. In particular, on TLS 1.3 when the server's chain carries a
//! meta cert (see [`metacert`](crate::edge::metacert)), we send `Derp-Fast-Start: 1` and write the HTTP request
//! and the sealed ClientInfo frame *in one write* without waiting for a response, exactly the
//! pipelining the server edge must survive. Otherwise we read the 101 response and hand any bytes
//! read past its head to the DERP client.
//!
//! TLS: no ALPN (like Go's DERP client), TLS 1.2 and 1.3, server name from the URL (or
//! overridden); trust = bundled web PKI roots + extra roots (an extra root presented as the leaf
//! itself is accepted even if it is marked as a CA, as Go accepts it), or no verification at all
//! for tests.
//! Everything is bounded by one overall timeout.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use proto::key::{MeshKey, NodePrivate, NodePublic};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{ring, CryptoProvider};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;

use crate::client::{Client, ClientError, ClientOptions};
use crate::edge::http::BoxedIo;
use crate::edge::metacert::{self, MetaCertInfo};
use crate::edge::websocket::{self, WsByteStream};

/// TLS trust settings for [`dial`].
#[derive(Debug, Clone)]
pub struct DialTls {
    /// Accept any certificate (tests only!). Signatures are still checked.
    pub insecure_skip_verify: bool,
    /// Extra trusted roots (e.g. a test CA or a self-signed leaf).
    pub extra_roots: Vec<CertificateDer<'static>>,
    /// Trust the bundled web PKI roots (default true).
    pub web_pki_roots: bool,
    /// Server name to verify instead of the URL host.
    pub server_name: Option<String>,
}

impl Default for DialTls {
    fn default() -> Self {
        DialTls {
            insecure_skip_verify: false,
            extra_roots: Vec::new(),
            web_pki_roots: true,
            server_name: None,
        }
    }
}

/// Options for [`dial`].
#[derive(Debug, Clone)]
pub struct DialOptions {
    /// Our DERP identity.
    pub private_key: NodePrivate,
    /// Mesh key to present (mesh peers only).
    pub mesh_key: Option<MeshKey>,
    /// Speak DERP over a WebSocket (subprotocol `derp`) instead of `Upgrade: DERP`.
    pub websocket: bool,
    /// TLS settings for `https://` URLs.
    pub tls: DialTls,
    /// Use fast start when the server offers it (TLS 1.3 + meta cert). Default true.
    pub fast_start: bool,
    /// Advertise `CanAckPings` (Tailscale clients do).
    pub can_ack_pings: bool,
    /// Sent as `Ideal-Node` (marks the connection not-ideal on the server).
    pub ideal_node: Option<String>,
    /// Bound on the whole dial (TCP + TLS + HTTP + DERP handshake).
    pub timeout: Duration,
    /// Connect to this host (name or IP) instead of the URL's; the URL's host still names the
    /// server for TLS and in `Host` (derper's `--mesh-with host/dialhost`).
    pub connect_host: Option<String>,
}

impl DialOptions {
    /// Defaults for `private_key`: raw upgrade, fast start allowed, 10 s timeout.
    pub fn new(private_key: NodePrivate) -> Self {
        DialOptions {
            private_key,
            mesh_key: None,
            websocket: false,
            tls: DialTls::default(),
            fast_start: true,
            can_ack_pings: true,
            ideal_node: None,
            timeout: Duration::from_secs(10),
            connect_host: None,
        }
    }
}

/// A connected client plus what happened on the way.
#[derive(Debug)]
pub struct Dialed {
    /// The DERP client, past the handshake.
    pub client: Client,
    /// Fast start was used (no HTTP response was awaited).
    pub fast_start: bool,
    /// The certificates the server presented (empty for `http://`).
    pub peer_certificates: Vec<CertificateDer<'static>>,
    /// The negotiated TLS version, if TLS.
    pub tls_version: Option<rustls::ProtocolVersion>,
}

/// Errors dialing.
#[derive(Debug, thiserror::Error)]
pub enum DialError {
    /// The URL is not `http(s)://host[:port][/path]`.
    #[error("bad DERP URL {0:?}: {1}")]
    BadUrl(String, &'static str),
    /// TCP connect failed.
    #[error("connecting to {addr}: {source}")]
    Connect {
        /// host:port.
        addr: String,
        /// The error.
        source: io::Error,
    },
    /// TLS setup or handshake failed.
    #[error("TLS: {0}")]
    Tls(String),
    /// The HTTP exchange failed.
    #[error("HTTP upgrade: {0}")]
    Http(String),
    /// The WebSocket handshake failed.
    #[error("WebSocket: {0}")]
    WebSocket(#[from] tokio_tungstenite::tungstenite::Error),
    /// The DERP handshake failed.
    #[error("DERP handshake: {0}")]
    Handshake(#[from] ClientError),
    /// I/O failure while upgrading.
    #[error("I/O: {0}")]
    Io(#[from] io::Error),
    /// The overall timeout passed.
    #[error("dial timed out")]
    Timeout,
}

pub(crate) struct Target {
    tls: bool,
    host: String,
    port: u16,
    pub(crate) authority: String,
    path: String,
}

/// Scheme, host (brackets of an IPv6 literal removed) and port (80/443 by default) of an
/// `http://` or `https://` URI: what the dialer and the relay's verify-URL client both need.
pub(crate) fn http_endpoint(uri: &http::Uri) -> Result<(bool, String, u16), &'static str> {
    let tls = match uri.scheme_str() {
        Some("https") => true,
        Some("http") => false,
        _ => return Err("scheme must be http or https"),
    };
    let authority = uri.authority().ok_or("no host")?;
    let host = authority
        .host()
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    if host.is_empty() {
        return Err("no host");
    }
    let port = authority.port_u16().unwrap_or(if tls { 443 } else { 80 });
    Ok((tls, host, port))
}

fn parse_url(url: &str) -> Result<Target, DialError> {
    let bad = |why| DialError::BadUrl(url.to_string(), why);
    let uri: http::Uri = url.parse().map_err(|_| bad("unparsable"))?;
    let (tls, host, port) = http_endpoint(&uri).map_err(bad)?;
    let authority = uri.authority().ok_or_else(|| bad("no host"))?;
    let path = match uri.path() {
        "" | "/" => "/derp".to_string(),
        p => p.to_string(),
    };
    Ok(Target {
        tls,
        host,
        port,
        authority: authority.as_str().to_string(),
        path,
    })
}

/// Accepts any server certificate (tests only), still checking handshake signatures.
#[derive(Debug)]
struct NoVerify(Arc<CryptoProvider>);

impl ServerCertVerifier for NoVerify {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// Web PKI verification, plus what Go accepts and webpki does not: a trusted self-signed
/// certificate presented as the leaf although it is marked as a CA (what `openssl req -x509`
/// and Go's test certificates make). Such a leaf is accepted only if it is byte-equal to one of
/// the extra roots, names the server and is within its validity period.
#[derive(Debug)]
struct TrustedLeafOrWebPki {
    webpki: Arc<rustls::client::WebPkiServerVerifier>,
    trusted: Vec<CertificateDer<'static>>,
}

impl TrustedLeafOrWebPki {
    fn trusted_leaf(
        &self,
        end_entity: &CertificateDer<'_>,
        server_name: &ServerName<'_>,
        now: UnixTime,
    ) -> bool {
        if !self
            .trusted
            .iter()
            .any(|t| t.as_ref() == end_entity.as_ref())
        {
            return false;
        }
        let Ok(parsed) = rustls::server::ParsedCertificate::try_from(end_entity) else {
            return false;
        };
        if rustls::client::verify_server_name(&parsed, server_name).is_err() {
            return false;
        }
        let Ok((_, cert)) = x509_parser::parse_x509_certificate(end_entity.as_ref()) else {
            return false;
        };
        let now = i64::try_from(now.as_secs()).unwrap_or(i64::MAX);
        let v = cert.validity();
        v.not_before.timestamp() <= now && now <= v.not_after.timestamp()
    }
}

impl ServerCertVerifier for TrustedLeafOrWebPki {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self
            .webpki
            .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
        {
            Ok(v) => Ok(v),
            Err(_) if self.trusted_leaf(end_entity, server_name, now) => {
                Ok(ServerCertVerified::assertion())
            }
            Err(e) => Err(e),
        }
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls12_signature(message, cert, dss)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls13_signature(message, cert, dss)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.webpki.supported_verify_schemes()
    }
}

fn client_config(tls: &DialTls) -> Result<rustls::ClientConfig, DialError> {
    let provider = Arc::new(ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| DialError::Tls(e.to_string()))?;
    let cfg = if tls.insecure_skip_verify {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(NoVerify(provider)))
            .with_no_client_auth()
    } else {
        let mut roots = rustls::RootCertStore::empty();
        if tls.web_pki_roots {
            roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        }
        for c in &tls.extra_roots {
            roots
                .add(c.clone())
                .map_err(|e| DialError::Tls(format!("extra root: {e}")))?;
        }
        let webpki =
            rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| DialError::Tls(e.to_string()))?;
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(TrustedLeafOrWebPki {
                webpki,
                trusted: tls.extra_roots.clone(),
            }))
            .with_no_client_auth()
    };
    Ok(cfg)
}

/// Writes `prefix` together with the first write (one `write` call on the inner IO), then passes
/// through. This is how the HTTP request and ClientInfo leave in one segment on fast start.
struct Pipelined<IO> {
    inner: IO,
    prefix: Option<Bytes>,
    pending: BytesMut,
}

impl<IO: AsyncWrite + Unpin> Pipelined<IO> {
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while !self.pending.is_empty() {
            let n = ready!(Pin::new(&mut self.inner).poll_write(cx, &self.pending))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.pending.advance(n);
        }
        Poll::Ready(Ok(()))
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Pipelined<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Pipelined<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        if let Some(prefix) = this.prefix.take() {
            this.pending.extend_from_slice(&prefix);
            this.pending.extend_from_slice(buf);
            // Best effort now; the rest goes out on the next write or flush.
            if let Poll::Ready(Err(e)) = this.poll_drain(cx) {
                return Poll::Ready(Err(e));
            }
            return Poll::Ready(Ok(buf.len()));
        }
        ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_drain(cx))?;
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_drain(cx))?;
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

fn upgrade_request(target: &Target, fast_start: bool, ideal_node: Option<&str>) -> String {
    let mut req = format!(
        "GET {} HTTP/1.1\r\nHost: {}\r\nUser-Agent: tailnetd\r\nUpgrade: DERP\r\nConnection: Upgrade\r\n",
        target.path, target.authority
    );
    if fast_start {
        req.push_str("Derp-Fast-Start: 1\r\n");
    }
    if let Some(n) = ideal_node {
        req.push_str("Ideal-Node: ");
        req.push_str(n);
        req.push_str("\r\n");
    }
    req.push_str("\r\n");
    req
}

/// Reads an HTTP response head; requires 101 and returns the bytes read past the head.
async fn read_101(io: &mut BoxedIo) -> Result<Bytes, DialError> {
    let mut buf = BytesMut::with_capacity(512);
    loop {
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut resp = httparse::Response::new(&mut headers);
        match resp.parse(&buf) {
            Ok(httparse::Status::Complete(n)) => {
                if resp.code != Some(101) {
                    return Err(DialError::Http(format!(
                        "expected 101, got {} {}",
                        resp.code.unwrap_or(0),
                        resp.reason.unwrap_or("")
                    )));
                }
                return Ok(buf.split_off(n).freeze());
            }
            Ok(httparse::Status::Partial) => {}
            Err(e) => return Err(DialError::Http(format!("bad response: {e}"))),
        }
        if buf.len() >= crate::edge::http::MAX_HEAD_LEN {
            return Err(DialError::Http("response head too large".into()));
        }
        buf.reserve(1024);
        if io.read_buf(&mut buf).await? == 0 {
            return Err(DialError::Http(
                "connection closed before the response".into(),
            ));
        }
    }
}

/// Connects to `url` (`http://` or `https://host[:port][/derp]`) and runs the DERP handshake.
pub async fn dial(url: &str, opts: DialOptions) -> Result<Dialed, DialError> {
    let timeout = opts.timeout;
    tokio::time::timeout(timeout, dial_inner(url, opts))
        .await
        .map_err(|_| DialError::Timeout)?
}

/// A TCP (and, for `https://`, TLS) stream to a DERP server, before any HTTP.
pub(crate) struct Connected {
    pub(crate) io: BoxedIo,
    pub(crate) peer_certificates: Vec<CertificateDer<'static>>,
    pub(crate) tls_version: Option<rustls::ProtocolVersion>,
}

/// TCP connect and, for TLS targets, the TLS handshake with `tls`'s trust settings. The TCP
/// connection goes to `connect_host` if given, else to the URL's host.
pub(crate) async fn connect(
    url: &str,
    connect_host: Option<&str>,
    tls: &DialTls,
) -> Result<(Target, Connected), DialError> {
    let target = parse_url(url)?;
    let connect_host = connect_host.unwrap_or(&target.host);
    let addr = format!("{}:{}", bracket(connect_host), target.port);
    let tcp = TcpStream::connect(addr.as_str())
        .await
        .map_err(|source| DialError::Connect {
            addr: addr.clone(),
            source,
        })?;
    let _ = tcp.set_nodelay(true);
    if !target.tls {
        let io: BoxedIo = Box::new(tcp);
        return Ok((
            target,
            Connected {
                io,
                peer_certificates: Vec::new(),
                tls_version: None,
            },
        ));
    }
    let cfg = client_config(tls)?;
    let name = tls
        .server_name
        .clone()
        .unwrap_or_else(|| target.host.clone());
    let server_name =
        ServerName::try_from(name).map_err(|e| DialError::Tls(format!("server name: {e}")))?;
    let stream = tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(server_name, tcp)
        .await
        .map_err(|e| DialError::Tls(e.to_string()))?;
    let (_, conn) = stream.get_ref();
    let peer_certificates = conn
        .peer_certificates()
        .map(|c| c.iter().map(|c| c.clone().into_owned()).collect())
        .unwrap_or_default();
    let tls_version = conn.protocol_version();
    Ok((
        target,
        Connected {
            io: Box::new(stream),
            peer_certificates,
            tls_version,
        },
    ))
}

async fn dial_inner(url: &str, opts: DialOptions) -> Result<Dialed, DialError> {
    let (
        target,
        Connected {
            mut io,
            peer_certificates,
            tls_version,
        },
    ) = connect(url, opts.connect_host.as_deref(), &opts.tls).await?;
    let meta: Option<MetaCertInfo> = if tls_version == Some(rustls::ProtocolVersion::TLSv1_3) {
        metacert::find_in_chain(peer_certificates.iter())
    } else {
        None
    };

    let mut client_opts = ClientOptions {
        mesh_key: opts.mesh_key,
        can_ack_pings: opts.can_ack_pings,
        server_key: None,
        is_prober: false,
    };

    if opts.websocket {
        let scheme = if target.tls { "wss" } else { "ws" };
        let mut req =
            format!("{scheme}://{}{}", target.authority, target.path).into_client_request()?;
        req.headers_mut().insert(
            "Sec-WebSocket-Protocol",
            HeaderValue::from_static(websocket::SUBPROTOCOL),
        );
        if let Some(n) = &opts.ideal_node {
            if let Ok(v) = HeaderValue::from_str(n) {
                req.headers_mut().insert("Ideal-Node", v);
            }
        }
        let (ws, _resp) = tokio_tungstenite::client_async_with_config(
            req,
            io,
            Some(websocket::websocket_config()),
        )
        .await?;
        let client = Client::handshake(
            WsByteStream::new(ws),
            Bytes::new(),
            opts.private_key,
            client_opts,
        )
        .await?;
        return Ok(Dialed {
            client,
            fast_start: false,
            peer_certificates,
            tls_version,
        });
    }

    let fast = match meta {
        Some(m) if opts.fast_start => Some(NodePublic::from_bytes(m.public_key)),
        _ => None,
    };
    let request = upgrade_request(&target, fast.is_some(), opts.ideal_node.as_deref());
    if let Some(server_key) = fast {
        client_opts.server_key = Some(server_key);
        let pipelined = Pipelined {
            inner: io,
            prefix: Some(Bytes::from(request)),
            pending: BytesMut::new(),
        };
        let client =
            Client::handshake(pipelined, Bytes::new(), opts.private_key, client_opts).await?;
        return Ok(Dialed {
            client,
            fast_start: true,
            peer_certificates,
            tls_version,
        });
    }
    io.write_all(request.as_bytes()).await?;
    io.flush().await?;
    let leftover = read_101(&mut io).await?;
    let client = Client::handshake(io, leftover, opts.private_key, client_opts).await?;
    Ok(Dialed {
        client,
        fast_start: false,
        peer_certificates,
        tls_version,
    })
}

fn bracket(host: &str) -> String {
    if host.contains(':') {
        format!("[{host}]")
    } else {
        host.to_string()
    }
}

#[cfg(test)]
mod edge_tests {
    use super::*;

    #[test]
    fn edge_parse_urls() {
        let t = parse_url("https://derp.example.com").unwrap();
        assert!(t.tls);
        assert_eq!(
            (t.host.as_str(), t.port, t.path.as_str()),
            ("derp.example.com", 443, "/derp")
        );
        let t = parse_url("http://127.0.0.1:3340/derp").unwrap();
        assert!(!t.tls);
        assert_eq!(
            (t.host.as_str(), t.port, t.authority.as_str()),
            ("127.0.0.1", 3340, "127.0.0.1:3340")
        );
        let t = parse_url("http://[::1]:80/").unwrap();
        assert_eq!((t.host.as_str(), t.port), ("::1", 80));
        assert!(parse_url("ftp://x/derp").is_err());
        assert!(parse_url("derp").is_err());
    }

    #[tokio::test]
    async fn edge_pipelined_merges_prefix_with_first_write() {
        let (a, mut b) = tokio::io::duplex(1024);
        let mut p = Pipelined {
            inner: a,
            prefix: Some(Bytes::from_static(b"REQ|")),
            pending: BytesMut::new(),
        };
        p.write_all(b"frame").await.unwrap();
        p.flush().await.unwrap();
        p.write_all(b"|more").await.unwrap();
        drop(p);
        let mut s = String::new();
        b.read_to_string(&mut s).await.unwrap();
        assert_eq!(s, "REQ|frame|more");
    }
}
