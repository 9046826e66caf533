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
//! Layout: [`Upstream`] owns one pooled HTTP/1.1 client (hyper-util's legacy client with a small
//! http/https connector), the configuration and the metrics; [`proxy`] is the fallback router;
//! [`auth`] implements [`crate::Authenticator`] on top of it with the single-flight TTL cache of
//! [`cache`].
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
            tls: None,
        }
    }
}

impl UpstreamConfig {
    /// The same upstream as a target for the `/me/rpc` and `/api/v2/tailnet` stream forwarding
    /// of [`agent_rpc`] (`CoordinatorConfig::upstream`), so one set of flags configures both.
    pub fn agent_rpc_target(&self) -> agent_rpc::UpstreamTarget {
        agent_rpc::UpstreamTarget {
            base_url: self.url.clone(),
            connect_timeout: self.connect_timeout.saturating_add(self.header_timeout),
            tls: self.tls.clone(),
        }
    }
}

/// Why the upstream could not be set up or asked.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// The configured URL is not `http(s)://authority[/prefix]`.
    #[error("invalid upstream URL {0:?}: {1}")]
    Url(String, String),
    /// TLS configuration failed.
    #[error("upstream TLS setup: {0}")]
    Tls(String),
    /// Metric registration failed (usually: two upstreams on one registry).
    #[error("registering upstream metrics: {0}")]
    Metrics(#[from] prometheus::Error),
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
    /// Path prefix without a trailing slash (`""` for none).
    prefix: String,
}

/// The upstream Coder server: one pooled client plus configuration and metrics. Cheap to clone.
#[derive(Clone)]
pub struct Upstream {
    inner: Arc<Inner>,
}

struct Inner {
    config: UpstreamConfig,
    base: Base,
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
        let tls = match &config.tls {
            Some(t) => t.clone(),
            None => Arc::new(default_tls()?),
        };
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_connect_timeout(Some(config.connect_timeout));
        http.set_nodelay(true);
        let connector = Connector {
            http,
            tls: tokio_rustls::TlsConnector::from(tls),
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
            .map_err(|e| UpstreamError::Url(path_and_query.to_string(), e.to_string()))
    }

    /// The upstream's authority (for `Host` when it is not preserved).
    pub fn authority(&self) -> &http::uri::Authority {
        &self.inner.base.authority
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
    let bad = |why: &str| UpstreamError::Url(url.to_string(), why.to_string());
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
    if uri.query().is_some() {
        return Err(bad("a query is not allowed"));
    }
    let prefix = uri.path().trim_end_matches('/').to_string();
    Ok(Base {
        scheme,
        authority,
        prefix,
    })
}

fn default_tls() -> Result<rustls::ClientConfig, UpstreamError> {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    let mut cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| UpstreamError::Tls(e.to_string()))?
    .with_root_certificates(roots)
    .with_no_client_auth();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(cfg)
}

/// http/https connector: hyper-util's TCP connector plus a rustls handshake for `https`.
#[derive(Clone)]
struct Connector {
    http: HttpConnector,
    tls: tokio_rustls::TlsConnector,
    timeout: Duration,
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl tower::Service<Uri> for Connector {
    type Response = MaybeTls;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<MaybeTls, BoxError>> + Send>>;

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
            let tcp = http.call(uri).await?;
            if !https {
                return Ok(MaybeTls::Plain(tcp));
            }
            let name = rustls::pki_types::ServerName::try_from(host)?;
            let stream: TcpStream = tcp.into_inner();
            let tls = tokio::time::timeout(timeout, tls.connect(name, stream))
                .await
                .map_err(|_| "TLS handshake with the upstream timed out")??;
            Ok(MaybeTls::Tls(Box::new(TokioIo::new(tls))))
        })
    }
}

/// A plain or TLS connection to the upstream.
enum MaybeTls {
    Plain(TokioIo<TcpStream>),
    Tls(Box<TokioIo<tokio_rustls::client::TlsStream<TcpStream>>>),
}

impl Connection for MaybeTls {
    fn connected(&self) -> Connected {
        match self {
            MaybeTls::Plain(s) => s.connected(),
            MaybeTls::Tls(s) => s.inner().get_ref().0.connected(),
        }
    }
}

impl hyper::rt::Read for MaybeTls {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_read(cx, buf),
            MaybeTls::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl hyper::rt::Write for MaybeTls {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_write(cx, buf),
            MaybeTls::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_flush(cx),
            MaybeTls::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_shutdown(cx),
            MaybeTls::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
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
        let b = parse_base("https://coder.example.com/base/").unwrap();
        assert_eq!(b.prefix, "/base");
        assert!(parse_base("ftp://x").is_err());
        assert!(parse_base("/just/a/path").is_err());
        assert!(parse_base("http://u:p@host").is_err());
        assert!(parse_base("http://host/?q=1").is_err());
    }
}
