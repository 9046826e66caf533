//! tailnetd as a sidecar in front of a real Coder server (coderd): everything tailnetd does not
//! serve itself is proxied to the upstream unchanged, and tokens are checked by asking it.
//!
//! Why: tailnetd replaces only coderd's coordination and relay paths. Agents and clients still
//! talk to one base URL, so every other request (the REST API, the agent API, PTY WebSockets,
//! log streams, the web UI) must reach coderd as if tailnetd were not there ([`proxy`]); identities
//! come from coderd too ([`auth::UpstreamAuthenticator`]), so tailnetd needs no database; and
//! because tailnetd owns the relays, the DERP maps coderd hands out in REST answers are replaced
//! with tailnetd's ([`rewrite`]).
//!
//! Layout: [`Upstream`] is the one value for coderd: the base URL parsed once, one TLS connector,
//! one pooled HTTP/1.1 client (hyper-util's legacy client with a small http/https connector), the
//! configuration (timeouts) and the metrics, with one error type, [`UpstreamError`]. [`proxy`] is
//! the fallback router; [`auth`] implements [`crate::Authenticator`] on top of it with the
//! single-flight TTL cache of [`cache`]; [`agent_rpc`] forwards dRPC streams to it, dialing
//! WebSockets through the same TLS connector (the coordinator gets it as
//! [`crate::CoordinatorConfig::upstream`]).
//!
//! This module must never buffer a whole request or response body (except a bounded one being
//! rewritten), never wait on the upstream without a deadline, never log a token, and never touch
//! sessions already open when the upstream misbehaves.

pub mod agent_rpc;
pub mod auth;
pub mod bridge;
pub mod cache;
pub mod proxy;
pub mod rewrite;
pub mod telemetry;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use http::{Request, Response, Uri};
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::{Connected, Connection, HttpConnector};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use prometheus::{IntCounterVec, IntGauge, Opts, Registry};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

pub use auth::UpstreamAuthenticator;

/// How to reach and use the upstream Coder server.
#[derive(Debug, Clone)]
pub struct UpstreamConfig {
    /// Base URL of coderd, `http://host[:port][/prefix]` or `https://...`.
    pub url: String,
    /// TCP connect (and TLS handshake) deadline.
    pub connect_timeout: Duration,
    /// Deadline for the upstream's response headers (the body may stream for longer).
    pub header_timeout: Duration,
    /// Largest request body forwarded; larger → 413 from tailnetd.
    pub max_body_bytes: u64,
    /// How long a positive auth decision (valid token, access granted) is reused.
    pub auth_ttl_ok: Duration,
    /// How long a negative auth decision (token rejected, access denied) is reused.
    pub auth_ttl_err: Duration,
    /// Replace `derp_map` / `derpmap` in proxied `/connection` and `/me/manifest` answers with
    /// tailnetd's own map (on when this process serves the relays).
    pub rewrite_derp_map: bool,
    /// Largest response body that is rewritten; larger ones pass through unchanged (counted).
    pub max_rewrite_bytes: usize,
    /// Forward the client's `Host` header (as Coder's reverse-proxy docs do); otherwise the
    /// upstream's authority is sent. `X-Forwarded-Host` always carries the client's `Host`.
    pub preserve_host: bool,
    /// Most cached auth decisions.
    pub auth_cache_entries: usize,
    /// Peers (the load balancer in front) whose forwarding headers (`X-Forwarded-*`,
    /// `X-Real-IP`, `True-Client-IP`, `Forwarded`) are passed on; from anyone else they are
    /// replaced by what tailnetd saw.
    pub trusted_proxies: Vec<std::net::IpAddr>,
    /// TLS settings for an `https` upstream; `None` = webpki roots, TLS 1.2/1.3.
    pub tls: Option<Arc<rustls::ClientConfig>>,
}

impl Default for UpstreamConfig {
    fn default() -> Self {
        Self {
            url: String::new(),
            connect_timeout: Duration::from_secs(5),
            header_timeout: Duration::from_secs(30),
            max_body_bytes: 32 << 20,
            auth_ttl_ok: Duration::from_secs(30),
            auth_ttl_err: Duration::from_secs(5),
            rewrite_derp_map: true,
            max_rewrite_bytes: 4 << 20,
            preserve_host: true,
            auth_cache_entries: 16_384,
            trusted_proxies: Vec::new(),
            tls: None,
        }
    }
}

/// Why the upstream could not be set up, asked or dialed: the one error of this module, for the
/// reverse proxy, the auth client and the Agent API forwarder alike. Cloneable (one dial result is
/// shared by every stream waiting for it); texts never contain tokens.
#[derive(Debug, Clone, thiserror::Error)]
pub enum UpstreamError {
    /// The configured URL is not `http(s)://authority[/prefix]`.
    #[error("invalid upstream URL {url:?}: {reason}")]
    Url {
        /// The configured URL (or the path that did not fit it).
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The TLS configuration could not be built.
    #[error("upstream TLS setup: {0}")]
    TlsSetup(String),
    /// Metric registration failed (usually: two upstreams on one registry).
    #[error("registering upstream metrics: {0}")]
    Metrics(#[source] Arc<prometheus::Error>),
    /// Connecting or talking to the upstream failed.
    #[error("upstream request failed: {0}")]
    Request(String),
    /// The upstream did not answer in time.
    #[error("upstream did not answer within {0:?}")]
    Timeout(Duration),
    /// The request body was larger than the limit.
    #[error("request body larger than {0} bytes")]
    BodyTooLarge(u64),
    /// The upstream answered, but not as expected.
    #[error("unexpected upstream answer: {0}")]
    Unexpected(String),
    /// A stream dial: TCP connect failed.
    #[error("connect {addr}: {reason}")]
    Connect {
        /// host:port dialed.
        addr: String,
        /// The I/O error.
        reason: String,
    },
    /// A stream dial: the TLS handshake failed.
    #[error("tls handshake with {host}: {reason}")]
    Tls {
        /// Server name.
        host: String,
        /// The error.
        reason: String,
    },
    /// A stream dial took longer than [`Upstream::dial_timeout`].
    #[error("dial timed out after {0:?}")]
    DialTimeout(Duration),
    /// coderd answered a WebSocket upgrade with an HTTP error (its JSON `message`, if any).
    #[error("{status}: {message}")]
    Status {
        /// HTTP status.
        status: u16,
        /// coderd's message or the raw body (bounded).
        message: String,
    },
    /// The WebSocket handshake failed otherwise.
    #[error("websocket handshake: {0}")]
    Handshake(String),
    /// The upstream yamux session refused a new stream or had ended.
    #[error("upstream session: {0}")]
    Session(String),
}

impl From<prometheus::Error> for UpstreamError {
    fn from(e: prometheus::Error) -> Self {
        UpstreamError::Metrics(Arc::new(e))
    }
}

/// Counters for the upstream; all names start with `tailnetd_upstream_`.
#[derive(Debug, Clone)]
pub struct UpstreamMetrics {
    /// Requests to the upstream by `kind` (proxy, upgrade, auth_agent, auth_user, auth_reach,
    /// agent_rpc) and `outcome` (1xx..5xx status class, error, timeout).
    pub requests: IntCounterVec,
    /// Proxy failures by `reason` (unreachable, timeout, body_too_large, upgrade, splice).
    pub proxy_errors: IntCounterVec,
    /// Auth cache lookups by `result` (hit, miss, coalesced).
    pub auth_cache: IntCounterVec,
    /// DERP map rewrites by `result` (rewritten, too_large, not_json, no_field, encoded).
    pub derp_rewrites: IntCounterVec,
    /// Upgraded connections currently spliced to the upstream.
    pub spliced: IntGauge,
}

impl UpstreamMetrics {
    fn new(registry: &Registry) -> Result<Self, prometheus::Error> {
        let requests = IntCounterVec::new(
            Opts::new(
                "tailnetd_upstream_requests_total",
                "requests sent to the upstream Coder server by kind and outcome",
            ),
            &["kind", "outcome"],
        )?;
        let proxy_errors = IntCounterVec::new(
            Opts::new(
                "tailnetd_upstream_proxy_errors_total",
                "proxied requests that failed in tailnetd, by reason",
            ),
            &["reason"],
        )?;
        let auth_cache = IntCounterVec::new(
            Opts::new(
                "tailnetd_upstream_auth_cache_total",
                "upstream auth decision cache lookups by result",
            ),
            &["result"],
        )?;
        let derp_rewrites = IntCounterVec::new(
            Opts::new(
                "tailnetd_upstream_derp_map_rewrites_total",
                "proxied responses considered for DERP map replacement, by result",
            ),
            &["result"],
        )?;
        let spliced = IntGauge::with_opts(Opts::new(
            "tailnetd_upstream_spliced_connections",
            "upgraded connections currently spliced to the upstream",
        ))?;
        // Present at zero from the start, so that dashboards and alerts see the series.
        for reason in [
            "body_too_large",
            "timeout",
            "unreachable",
            "upgrade",
            "splice",
        ] {
            proxy_errors.with_label_values(&[reason]);
        }
        registry.register(Box::new(requests.clone()))?;
        registry.register(Box::new(proxy_errors.clone()))?;
        registry.register(Box::new(auth_cache.clone()))?;
        registry.register(Box::new(derp_rewrites.clone()))?;
        registry.register(Box::new(spliced.clone()))?;
        Ok(Self {
            requests,
            proxy_errors,
            auth_cache,
            derp_rewrites,
            spliced,
        })
    }

    pub(crate) fn request(&self, kind: &str, outcome: &str) {
        self.requests.with_label_values(&[kind, outcome]).inc();
    }

    pub(crate) fn status(&self, kind: &str, status: http::StatusCode) {
        let class = match status.as_u16() / 100 {
            1 => "1xx",
            2 => "2xx",
            3 => "3xx",
            4 => "4xx",
            _ => "5xx",
        };
        self.request(kind, class);
    }

    pub(crate) fn proxy_error(&self, reason: &str) {
        self.proxy_errors.with_label_values(&[reason]).inc();
    }

    pub(crate) fn rewrite(&self, result: &str) {
        self.derp_rewrites.with_label_values(&[result]).inc();
    }
}

/// The parsed base URL.
#[derive(Debug, Clone)]
struct Base {
    scheme: http::uri::Scheme,
    authority: http::uri::Authority,
    /// The host without IPv6 brackets (for TCP connect and the TLS server name).
    host: String,
    /// The port, the scheme's default when the URL names none.
    port: u16,
    /// Path prefix without a trailing slash (`""` for none).
    prefix: String,
}

impl Base {
    fn is_tls(&self) -> bool {
        self.scheme == http::uri::Scheme::HTTPS
    }
}

/// The upstream Coder server, parsed and set up once: the base URL, one TLS connector, one pooled
/// HTTP client (reverse proxy and auth), the timeouts and the metrics. The stream forwarder of
/// [`agent_rpc`] dials through it too. Cheap to clone.
#[derive(Clone)]
pub struct Upstream {
    inner: Arc<Inner>,
}

struct Inner {
    config: UpstreamConfig,
    base: Base,
    tls: tokio_rustls::TlsConnector,
    client: Client<Connector, Body>,
    metrics: UpstreamMetrics,
}

impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upstream")
            .field("url", &self.inner.config.url)
            .finish_non_exhaustive()
    }
}

impl Upstream {
    /// Parse the URL, build the client and register the metrics on `registry`. Needs no runtime
    /// until the first request.
    pub fn new(config: UpstreamConfig, registry: &Registry) -> Result<Self, UpstreamError> {
        let base = parse_base(&config.url)?;
        let tls = tokio_rustls::TlsConnector::from(match &config.tls {
            Some(t) => t.clone(),
            None => Arc::new(default_tls()?),
        });
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_connect_timeout(Some(config.connect_timeout));
        http.set_nodelay(true);
        let connector = Connector {
            http,
            tls: tls.clone(),
            timeout: config.connect_timeout,
        };
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .pool_max_idle_per_host(64)
            .build(connector);
        let metrics = UpstreamMetrics::new(registry)?;
        Ok(Self {
            inner: Arc::new(Inner {
                config,
                base,
                tls,
                client,
                metrics,
            }),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &UpstreamConfig {
        &self.inner.config
    }

    /// The metrics.
    pub fn metrics(&self) -> &UpstreamMetrics {
        &self.inner.metrics
    }

    /// The upstream URI for a client's `path_and_query` (the base URL's path prefix prepended).
    pub fn uri_for(&self, path_and_query: &str) -> Result<Uri, UpstreamError> {
        let b = &self.inner.base;
        let pq = format!("{}{}", b.prefix, path_and_query);
        Uri::builder()
            .scheme(b.scheme.clone())
            .authority(b.authority.clone())
            .path_and_query(pq)
            .build()
            .map_err(|e| UpstreamError::Url {
                url: path_and_query.to_string(),
                reason: e.to_string(),
            })
    }

    /// The upstream's authority (for `Host` when it is not preserved).
    pub fn authority(&self) -> &http::uri::Authority {
        &self.inner.base.authority
    }

    /// Bound on one stream dial of [`agent_rpc`] (TCP connect, TLS and WebSocket handshake):
    /// `connect_timeout + header_timeout`, as the upgrade's answer is a response head.
    pub fn dial_timeout(&self) -> Duration {
        let c = &self.inner.config;
        c.connect_timeout.saturating_add(c.header_timeout)
    }

    /// The WebSocket URL (`ws`/`wss`) for a `path_and_query` below the base URL's prefix.
    pub(crate) fn ws_url(&self, path_and_query: &str) -> String {
        let b = &self.inner.base;
        let scheme = if b.is_tls() { "wss" } else { "ws" };
        format!("{scheme}://{}{}{path_and_query}", b.authority, b.prefix)
    }

    /// A fresh TCP (+ TLS for `https`) connection to the upstream, for a stream dial. Not bounded
    /// in time: the caller bounds the whole dial by [`Upstream::dial_timeout`].
    pub(crate) async fn connect_stream(&self) -> Result<UpstreamIo, UpstreamError> {
        let b = &self.inner.base;
        let tcp = TcpStream::connect((b.host.as_str(), b.port))
            .await
            .map_err(|e| UpstreamError::Connect {
                addr: format!("{}:{}", b.host, b.port),
                reason: e.to_string(),
            })?;
        let _ = tcp.set_nodelay(true);
        if !b.is_tls() {
            return Ok(UpstreamIo::Plain(tcp));
        }
        tls_handshake(&self.inner.tls, b.host.clone(), tcp)
            .await
            .map_err(|e| UpstreamError::Tls {
                host: b.host.clone(),
                reason: e.to_string(),
            })
    }

    /// The fallback router that proxies every request to the upstream (see [`proxy`]).
    pub fn proxy_router(&self, coord: Arc<crate::Coordinator>) -> axum::Router {
        proxy::router(self.clone(), coord)
    }

    /// Send `req` (absolute URI) and wait for the response head at most `header_timeout`
    /// (connect time included). Counts the outcome under `kind`.
    pub async fn send(
        &self,
        kind: &str,
        req: Request<Body>,
    ) -> Result<Response<Incoming>, UpstreamError> {
        let t = self.inner.config.header_timeout;
        let m = &self.inner.metrics;
        match tokio::time::timeout(t, self.inner.client.request(req)).await {
            Err(_) => {
                m.request(kind, "timeout");
                Err(UpstreamError::Timeout(t))
            }
            Ok(Err(e)) => {
                m.request(kind, "error");
                if is_length_limit(&e) {
                    return Err(UpstreamError::BodyTooLarge(
                        self.inner.config.max_body_bytes,
                    ));
                }
                Err(UpstreamError::Request(error_chain(&e)))
            }
            Ok(Ok(resp)) => {
                m.status(kind, resp.status());
                Ok(resp)
            }
        }
    }

    /// A bodiless request to the upstream with the Coder session token header.
    pub(crate) fn token_request(
        &self,
        method: http::Method,
        path_and_query: &str,
        token: &str,
    ) -> Result<Request<Body>, UpstreamError> {
        let uri = self.uri_for(path_and_query)?;
        let token = http::HeaderValue::from_str(token)
            .map_err(|_| UpstreamError::Unexpected("token is not a valid header value".into()))?;
        let mut req = Request::builder()
            .method(method)
            .uri(uri)
            .header(http::header::HOST, self.authority().as_str())
            .header(http::header::ACCEPT, "application/json")
            .body(Body::empty())
            .map_err(|e| UpstreamError::Request(e.to_string()))?;
        req.headers_mut()
            .insert(crate::auth::SESSION_TOKEN_HEADER, token);
        Ok(req)
    }
}

/// Whether a client error was caused by the request body length limit.
fn is_length_limit(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if err.is::<http_body_util::LengthLimitError>() {
            return true;
        }
        cur = err.source();
    }
    false
}

/// `e: cause: cause` (hyper's top-level messages alone say little).
pub(crate) fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    let mut n = 0;
    while let Some(err) = cur {
        s.push_str(": ");
        s.push_str(&err.to_string());
        cur = err.source();
        n += 1;
        if n > 8 {
            break;
        }
    }
    s
}

fn parse_base(url: &str) -> Result<Base, UpstreamError> {
    let bad = |why: &str| UpstreamError::Url {
        url: url.to_string(),
        reason: why.to_string(),
    };
    let uri: Uri = url
        .parse()
        .map_err(|e: http::uri::InvalidUri| bad(&e.to_string()))?;
    let scheme = uri.scheme().cloned().ok_or_else(|| bad("missing scheme"))?;
    if scheme != http::uri::Scheme::HTTP && scheme != http::uri::Scheme::HTTPS {
        return Err(bad("scheme must be http or https"));
    }
    let authority = uri
        .authority()
        .cloned()
        .ok_or_else(|| bad("missing host"))?;
    if authority.as_str().contains('@') {
        return Err(bad("credentials in the URL are not supported"));
    }
    let host = authority.host().trim_matches(['[', ']']).to_string();
    if host.is_empty() {
        return Err(bad("missing host"));
    }
    if uri.query().is_some() {
        return Err(bad("a query is not allowed"));
    }
    let default_port = if scheme == http::uri::Scheme::HTTPS {
        443
    } else {
        80
    };
    Ok(Base {
        port: authority.port_u16().unwrap_or(default_port),
        host,
        prefix: uri.path().trim_end_matches('/').to_string(),
        scheme,
        authority,
    })
}

fn default_tls() -> Result<rustls::ClientConfig, UpstreamError> {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    let mut cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| UpstreamError::TlsSetup(e.to_string()))?
    .with_root_certificates(roots)
    .with_no_client_auth();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(cfg)
}

/// The rustls handshake over an open TCP connection.
async fn tls_handshake(
    tls: &tokio_rustls::TlsConnector,
    host: String,
    tcp: TcpStream,
) -> Result<UpstreamIo, BoxError> {
    let name = rustls::pki_types::ServerName::try_from(host)?;
    Ok(UpstreamIo::Tls(Box::new(tls.connect(name, tcp).await?)))
}

/// http/https connector for the pooled client: hyper-util's TCP connector plus
/// [`tls_handshake`] for `https`.
#[derive(Clone)]
struct Connector {
    http: HttpConnector,
    tls: tokio_rustls::TlsConnector,
    timeout: Duration,
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl tower::Service<Uri> for Connector {
    type Response = TokioIo<UpstreamIo>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<TokioIo<UpstreamIo>, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.http.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let mut http = self.http.clone();
        let tls = self.tls.clone();
        let timeout = self.timeout;
        Box::pin(async move {
            let https = uri.scheme() == Some(&http::uri::Scheme::HTTPS);
            let host = uri
                .host()
                .unwrap_or("")
                .trim_matches(['[', ']'])
                .to_string();
            let tcp: TcpStream = http.call(uri).await?.into_inner();
            if !https {
                return Ok(TokioIo::new(UpstreamIo::Plain(tcp)));
            }
            let io = tokio::time::timeout(timeout, tls_handshake(&tls, host, tcp))
                .await
                .map_err(|_| "TLS handshake with the upstream timed out")??;
            Ok(TokioIo::new(io))
        })
    }
}

/// A plain or TLS connection to the upstream (pooled HTTP client and stream dials alike).
pub(crate) enum UpstreamIo {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl Connection for UpstreamIo {
    fn connected(&self) -> Connected {
        match self {
            UpstreamIo::Plain(s) => s.connected(),
            UpstreamIo::Tls(s) => s.get_ref().0.connected(),
        }
    }
}

impl AsyncRead for UpstreamIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            UpstreamIo::Plain(s) => Pin::new(s).poll_read(cx, buf),
            UpstreamIo::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for UpstreamIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            UpstreamIo::Plain(s) => Pin::new(s).poll_write(cx, buf),
            UpstreamIo::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            UpstreamIo::Plain(s) => Pin::new(s).poll_flush(cx),
            UpstreamIo::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            UpstreamIo::Plain(s) => Pin::new(s).poll_shutdown(cx),
            UpstreamIo::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base_urls() {
        let b = parse_base("http://127.0.0.1:3000").unwrap();
        assert_eq!(b.prefix, "");
        assert_eq!(b.authority.as_str(), "127.0.0.1:3000");
        assert_eq!(
            (b.host.as_str(), b.port, b.is_tls()),
            ("127.0.0.1", 3000, false)
        );
        let b = parse_base("https://coder.example.com/base/").unwrap();
        assert_eq!(b.prefix, "/base");
        assert_eq!((b.port, b.is_tls()), (443, true));
        let b = parse_base("http://[::1]:8080").unwrap();
        assert_eq!(b.host, "::1");
        assert_eq!(b.authority.as_str(), "[::1]:8080");
        assert!(parse_base("ftp://x").is_err());
        assert!(parse_base("/just/a/path").is_err());
        assert!(parse_base("http://u:p@host").is_err());
        assert!(parse_base("http://host/?q=1").is_err());
    }
}
