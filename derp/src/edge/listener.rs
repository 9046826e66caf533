//! The accept loop of an HTTP or HTTPS listener.
//!
//! Why it is more than `loop { accept }`: a relay faces the internet with hundreds of thousands of
//! long-lived connections. Each accepted socket gets derper's TCP options (TCP_NODELAY; keepalive
//! after 10 min idle, long on purpose for mobile batteries; TCP_USER_TIMEOUT 15 s to reap hung
//! connections quickly); the number of open connections is capped; an optional token bucket
//! limits accepts per second; and the TLS handshake runs in the connection's own task with a
//! timeout, so one slow client never stalls the loop.
//!
//! Per source address (the TCP peer: with a load balancer in front that is the balancer, so the
//! default cap is high), an optional cap on open connections and an optional token bucket stop
//! one client from taking every slot; the table holds only addresses with open connections or a
//! bucket still refilling, swept once a minute.
//!
//! Over-limit connections are accepted and closed at once (like derper: it tells the client
//! immediately and keeps the kernel backlog from growing), and counted. Accept errors (EMFILE,
//! ENOBUFS, ...) are counted and back off exponentially up to 1 s instead of spinning.
//!
//! Each connection's task holds only its permit and gauge guard plus two boxes in turn: the TLS
//! handshake and HTTP phase, then (after that box is freed) the DERP connection. A task's
//! future is allocated at its largest state's size for the task's whole life, so nothing large
//! may be awaited inline here.
//!
//! Must never: block the accept loop on a client, await a large future inline in the
//! connection task, or keep accepting after `cancel`.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::edge::acme::{AcmeConfig, AcmeError, AcmeManager, ChallengeKind};
use crate::edge::config::{ConfigErrors, EdgeConfig};
use crate::edge::http::{serve_until_derp_limited, HttpEdge};
use crate::edge::metacert::MetaCertError;
use crate::edge::stun::StunMetrics;
use crate::edge::tls::{TlsError, TlsReloader};

/// A token bucket for accepted connections.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AcceptRateLimit {
    /// Connections per second.
    pub per_second: f64,
    /// Bucket size.
    pub burst: u32,
}

/// Listener tuning; [`Default`] gives derper's values.
#[derive(Debug, Clone)]
pub struct ListenerOptions {
    /// Cap on concurrently open connections of this listener.
    pub max_connections: usize,
    /// Descriptors that every listener of the process draws on together (one permit per open
    /// connection; see [`crate::edge::fdlimit`]); `None`: only `max_connections` applies.
    pub descriptors: Option<Arc<Semaphore>>,
    /// TCP keepalive idle time (`None` = off).
    pub tcp_keepalive: Option<Duration>,
    /// TCP_USER_TIMEOUT (`None` = system default; Linux only).
    pub tcp_user_timeout: Option<Duration>,
    /// Time allowed for the TLS handshake.
    pub tls_handshake_timeout: Duration,
    /// Optional accept rate limit.
    pub accept_limit: Option<AcceptRateLimit>,
    /// Cap on open connections from one source address (`0` = none).
    pub max_connections_per_ip: usize,
    /// Optional accept rate limit per source address.
    pub accept_limit_per_ip: Option<AcceptRateLimit>,
    /// Peers whose `X-Forwarded-For` is trusted (see [`EdgeConfig::trusted_proxies`]): not
    /// limited per address at accept; their relay upgrades count against the forwarded client.
    pub trusted_proxies: Vec<IpAddr>,
}

impl Default for ListenerOptions {
    fn default() -> Self {
        ListenerOptions {
            max_connections: 100_000,
            descriptors: None,
            tcp_keepalive: Some(Duration::from_secs(600)),
            tcp_user_timeout: Some(Duration::from_secs(15)),
            tls_handshake_timeout: Duration::from_secs(30),
            accept_limit: None,
            max_connections_per_ip: 0,
            accept_limit_per_ip: None,
            trusted_proxies: Vec::new(),
        }
    }
}

impl ListenerOptions {
    /// Options from the operator config (zero durations mean "off" / "system default").
    pub fn from_config(cfg: &crate::edge::config::EdgeConfig) -> Self {
        let nonzero = |d: Duration| (!d.is_zero()).then_some(d);
        ListenerOptions {
            max_connections: cfg
                .max_connections
                .saturating_add(crate::edge::fdlimit::HTTP_HEADROOM),
            descriptors: None,
            tcp_keepalive: nonzero(cfg.tcp_keepalive),
            tcp_user_timeout: nonzero(cfg.tcp_user_timeout),
            tls_handshake_timeout: Duration::from_secs(30),
            accept_limit: cfg
                .accept_connection_limit
                .map(|per_second| AcceptRateLimit {
                    per_second,
                    burst: cfg
                        .accept_connection_burst
                        .unwrap_or_else(|| (per_second.ceil() as u32).max(1)),
                }),
            max_connections_per_ip: cfg.max_connections_per_ip,
            accept_limit_per_ip: cfg.accept_connection_limit_per_ip.map(|per_second| {
                AcceptRateLimit {
                    per_second,
                    burst: (per_second.ceil() as u32).max(1),
                }
            }),
            trusted_proxies: cfg.trusted_proxies.clone(),
        }
    }
}

/// A classic token bucket (not shared between tasks: only the accept loop uses it).
#[derive(Debug)]
struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    fn new(limit: AcceptRateLimit) -> Self {
        let burst = f64::from(limit.burst.max(1));
        TokenBucket {
            rate: limit.per_second.max(0.0),
            burst,
            tokens: burst,
            last: Instant::now(),
        }
    }

    fn refill(&mut self) {
        let now = Instant::now();
        let elapsed = now.duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
    }

    fn is_full(&mut self) -> bool {
        self.refill();
        self.tokens >= self.burst
    }

    fn allow(&mut self) -> bool {
        self.refill();
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// One source address's share: its open connections and its accept bucket.
#[derive(Debug)]
struct AddressShare {
    open: usize,
    bucket: Option<TokenBucket>,
}

/// Open connections and accept buckets per source address, for one listener. The lock is a
/// plain mutex held for a map operation, never across `.await`.
#[derive(Debug, Default)]
pub(crate) struct PerAddress {
    shares: Mutex<HashMap<IpAddr, AddressShare>>,
}

/// Why a source address may not open another connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AddressRefusal {
    Cap,
    Rate,
}

impl PerAddress {
    /// Admits one connection from `ip`, or says why not.
    fn admit(
        self: &Arc<Self>,
        ip: IpAddr,
        opts: &ListenerOptions,
    ) -> Result<AddressGuard, AddressRefusal> {
        let mut shares = self.shares.lock().unwrap_or_else(|e| e.into_inner());
        let share = shares.entry(ip).or_insert_with(|| AddressShare {
            open: 0,
            bucket: opts.accept_limit_per_ip.map(TokenBucket::new),
        });
        if opts.max_connections_per_ip != 0 && share.open >= opts.max_connections_per_ip {
            return Err(AddressRefusal::Cap);
        }
        if let Some(b) = share.bucket.as_mut() {
            if !b.allow() {
                return Err(AddressRefusal::Rate);
            }
        }
        share.open += 1;
        Ok(AddressGuard {
            table: self.clone(),
            ip,
        })
    }

    /// Forgets addresses with no open connection whose bucket has refilled.
    fn sweep(&self) {
        let mut shares = self.shares.lock().unwrap_or_else(|e| e.into_inner());
        shares.retain(|_, s| s.open > 0 || s.bucket.as_mut().is_some_and(|b| !b.is_full()));
    }
}

/// One open connection's claim on its source address's share; released on drop.
pub(crate) struct AddressGuard {
    table: Arc<PerAddress>,
    ip: IpAddr,
}

impl Drop for AddressGuard {
    fn drop(&mut self) {
        let mut shares = self.table.shares.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(share) = shares.get_mut(&self.ip) {
            share.open = share.open.saturating_sub(1);
            if share.open == 0 && share.bucket.is_none() {
                shares.remove(&self.ip);
            }
        }
    }
}

/// The per-address limits applied at a relay upgrade that came through a trusted proxy, to the
/// client address the proxy forwarded (same table, cap and rate as at accept).
pub(crate) struct ForwardedLimits {
    table: Arc<PerAddress>,
    opts: Arc<ListenerOptions>,
    per_ip_cap: prometheus::IntCounter,
    per_ip_rate: prometheus::IntCounter,
}

impl ForwardedLimits {
    /// Admits one relay connection for the client named in `head` (a request head that came
    /// from `proxy`): the rightmost `X-Forwarded-For` address that is not itself a trusted
    /// proxy, or `proxy` when there is none. `Err` (counted) when that address is at its cap or
    /// rate.
    pub(crate) fn admit(&self, head: &[u8], proxy: IpAddr) -> Result<AddressGuard, IpAddr> {
        let client = forwarded_client(head, &self.opts.trusted_proxies).unwrap_or(proxy);
        self.table.admit(client, &self.opts).map_err(|refusal| {
            match refusal {
                AddressRefusal::Cap => self.per_ip_cap.inc(),
                AddressRefusal::Rate => self.per_ip_rate.inc(),
            }
            client
        })
    }
}

/// The client address of a request head that came through trusted proxies: the rightmost
/// `X-Forwarded-For` entry (over every such header, in order) that is not a trusted proxy.
/// Entries left of it were written by the client and are not believed.
fn forwarded_client(head: &[u8], trusted: &[IpAddr]) -> Option<IpAddr> {
    let mut headers = [httparse::EMPTY_HEADER; 128];
    let mut req = httparse::Request::new(&mut headers);
    req.parse(head).ok()?;
    let mut hops: Vec<IpAddr> = Vec::new();
    for h in req.headers.iter() {
        if !h.name.eq_ignore_ascii_case("x-forwarded-for") {
            continue;
        }
        let Ok(text) = std::str::from_utf8(h.value) else {
            return None;
        };
        for entry in text.split(',') {
            let entry = entry.trim();
            // `1.2.3.4`, `[::1]:80`, `1.2.3.4:80`, `::1`.
            let ip = entry
                .parse::<IpAddr>()
                .ok()
                .or_else(|| entry.parse::<SocketAddr>().ok().map(|a| a.ip()));
            match ip {
                Some(ip) => hops.push(ip),
                // An unreadable hop: nothing left of it can be attributed.
                None => hops.clear(),
            }
        }
    }
    hops.into_iter().rev().find(|ip| !trusted.contains(ip))
}

/// Decrements the open-connections gauge when the connection task ends, however it ends.
struct OpenGuard(prometheus::IntGauge);

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

fn tune_socket(stream: &TcpStream, opts: &ListenerOptions) {
    if let Err(e) = stream.set_nodelay(true) {
        tracing::debug!(error = %e, "TCP_NODELAY failed");
    }
    let sock = socket2::SockRef::from(stream);
    if let Some(idle) = opts.tcp_keepalive {
        let ka = socket2::TcpKeepalive::new().with_time(idle);
        if let Err(e) = sock.set_tcp_keepalive(&ka) {
            tracing::debug!(error = %e, "TCP keepalive failed");
        }
    }
    #[cfg(any(target_os = "linux", target_os = "android", target_os = "fuchsia"))]
    if let Some(t) = opts.tcp_user_timeout {
        if let Err(e) = sock.set_tcp_user_timeout(Some(t)) {
            tracing::debug!(error = %e, "TCP_USER_TIMEOUT failed");
        }
    }
}

/// Serves `listener` until `cancel` fires: plain HTTP if `tls` is `None`, else HTTPS with that
/// config (e.g. [`TlsReloader::server_config`](super::tls::TlsReloader::server_config)). Returns
/// once the loop has stopped; open connections keep running (DERP ones end through
/// `Server::shutdown`, HTTP ones drain on `cancel`).
pub async fn serve(
    listener: TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
    edge: Arc<HttpEdge>,
    opts: ListenerOptions,
    cancel: CancellationToken,
) {
    let name = if tls.is_some() { "https" } else { "http" };
    let metrics = edge.metrics().clone();
    let accepted = metrics.accepted.with_label_values(&[name]);
    let accept_errors = metrics.accept_errors.with_label_values(&[name]);
    let rate_limited = metrics.rejected.with_label_values(&[name, "rate_limit"]);
    let over_cap = metrics
        .rejected
        .with_label_values(&[name, "max_connections"]);
    let per_ip_cap = metrics.rejected.with_label_values(&[name, "per_ip_cap"]);
    let per_ip_rate = metrics.rejected.with_label_values(&[name, "per_ip_rate"]);
    let per_address = Arc::new(PerAddress::default());
    let shared_opts = Arc::new(opts.clone());
    let mut next_sweep = Instant::now() + Duration::from_secs(60);
    let open = metrics.open.with_label_values(&[name]);
    let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
    let permits = Arc::new(Semaphore::new(opts.max_connections.max(1)));
    let mut bucket = opts.accept_limit.map(TokenBucket::new);
    let mut backoff = Duration::ZERO;
    let local = listener.local_addr().ok();
    tracing::debug!(?local, listener = name, "accept loop started");

    loop {
        let res = tokio::select! {
            _ = cancel.cancelled() => break,
            r = listener.accept() => r,
        };
        let (stream, remote): (TcpStream, SocketAddr) = match res {
            Ok(x) => {
                backoff = Duration::ZERO;
                x
            }
            Err(e) => {
                accept_errors.inc();
                backoff = (backoff * 2).clamp(Duration::from_millis(5), Duration::from_secs(1));
                tracing::warn!(error = %e, listener = name, ?backoff, "accept failed");
                tokio::select! {
                    _ = cancel.cancelled() => break,
                    _ = tokio::time::sleep(backoff) => continue,
                }
            }
        };
        accepted.inc();
        if let Some(b) = bucket.as_mut() {
            if !b.allow() {
                rate_limited.inc();
                drop(stream);
                continue;
            }
        }
        if Instant::now() >= next_sweep {
            per_address.sweep();
            next_sweep = Instant::now() + Duration::from_secs(60);
        }
        // A trusted proxy carries many clients: its relay upgrades are limited per forwarded
        // client address instead (see `ForwardedLimits`).
        let forwarded = opts
            .trusted_proxies
            .contains(&remote.ip())
            .then(|| ForwardedLimits {
                table: per_address.clone(),
                opts: shared_opts.clone(),
                per_ip_cap: per_ip_cap.clone(),
                per_ip_rate: per_ip_rate.clone(),
            });
        let address_guard = match forwarded {
            Some(_) => None,
            None => match per_address.admit(remote.ip(), &opts) {
                Ok(g) => Some(g),
                Err(refusal) => {
                    match refusal {
                        AddressRefusal::Cap => per_ip_cap.inc(),
                        AddressRefusal::Rate => per_ip_rate.inc(),
                    }
                    tracing::debug!(%remote, listener = name, ?refusal, "per-address limit; closing");
                    drop(stream);
                    continue;
                }
            },
        };
        let descriptor = match &opts.descriptors {
            Some(pool) => pool.clone().try_acquire_owned().ok().map(Some),
            None => Some(None),
        };
        let (Ok(permit), Some(descriptor)) = (permits.clone().try_acquire_owned(), descriptor)
        else {
            over_cap.inc();
            tracing::debug!(%remote, listener = name, "connection cap reached; closing");
            drop(stream);
            continue;
        };
        tune_socket(&stream, &opts);
        let edge = edge.clone();
        let cancel = cancel.clone();
        let acceptor = acceptor.clone();
        let open = open.clone();
        let hs_failures = metrics.tls_handshake_failures.clone();
        let hs_timeout = opts.tls_handshake_timeout;
        open.inc();
        tokio::spawn(async move {
            let _permit = permit;
            let _descriptor = descriptor;
            let _address = address_guard;
            let _open = OpenGuard(open);
            // The TLS handshake and the HTTP phase run boxed and are freed before a DERP
            // connection starts: the task itself stays a few pointers for its whole life.
            let derp = Box::pin(async move {
                match acceptor {
                    None => {
                        serve_until_derp_limited(stream, remote, edge, false, cancel, forwarded)
                            .await
                    }
                    Some(acceptor) => {
                        match tokio::time::timeout(hs_timeout, acceptor.accept(stream)).await {
                            Ok(Ok(tls))
                                if tls.get_ref().1.alpn_protocol()
                                    == Some(crate::edge::acme::ACME_TLS_ALPN) =>
                            {
                                // A TLS-ALPN-01 validation: the handshake was the answer.
                                tracing::debug!(%remote, "ACME TLS-ALPN-01 validation answered");
                                None
                            }
                            Ok(Ok(tls)) => {
                                serve_until_derp_limited(tls, remote, edge, true, cancel, forwarded)
                                    .await
                            }
                            Ok(Err(e)) => {
                                hs_failures.with_label_values(&["error"]).inc();
                                tracing::debug!(%remote, error = %e, "TLS handshake failed");
                                None
                            }
                            Err(_) => {
                                hs_failures.with_label_values(&["timeout"]).inc();
                                tracing::debug!(%remote, "TLS handshake timed out");
                                None
                            }
                        }
                    }
                }
            })
            .await;
            if let Some(derp) = derp {
                derp.await;
            }
        });
    }
    tracing::debug!(?local, listener = name, "accept loop stopped");
}

/// Every socket [`bind`] opened, not yet serving. Binding comes first so that a caller can learn
/// the actual addresses (port 0 resolved) before it builds what it serves, e.g. a DERP map that
/// names this relay's own port.
#[derive(Debug)]
pub struct Bound {
    /// Actual address of the HTTP listener (port 0 resolved).
    pub http_addr: Option<SocketAddr>,
    /// Actual address of the HTTPS listener.
    pub https_addr: Option<SocketAddr>,
    /// Actual address of the STUN socket.
    pub stun_addr: Option<SocketAddr>,
    /// The certificate reloader of the HTTPS listener (certificate files).
    pub tls: Option<Arc<TlsReloader>>,
    /// The ACME manager of the HTTPS listener (`acme_hostname`); its renewal loop starts with
    /// [`Bound::spawn`], and its [`AcmeManager::http01_router`] belongs in the router.
    pub acme: Option<Arc<AcmeManager>>,
    /// Cap on relay (DERP) connections: `max_connections`, lowered to fit under the open-file
    /// limit (see [`crate::edge::fdlimit`]). Hand it to [`HttpEdge::with_relay_cap`].
    pub relay_cap: usize,
    opts: ListenerOptions,
    http: Option<TcpListener>,
    https: Option<(TcpListener, Arc<rustls::ServerConfig>)>,
    stun: Option<(tokio::net::UdpSocket, StunMetrics)>,
}

/// The running loops of a [`Bound`] set of sockets.
#[derive(Debug)]
pub struct Running {
    /// The accept loops and the STUN loop; they end on `cancel`.
    pub tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Running {
    /// Waits for every loop to stop (after `cancel`).
    pub async fn join(self) {
        for t in self.tasks {
            let _ = t.await;
        }
    }
}

impl Bound {
    /// Spawns the accept loops (HTTP, HTTPS) and the STUN loop on the sockets not yet spawned;
    /// they stop on `cancel`. The addresses stay readable afterwards.
    pub fn spawn(&mut self, edge: Arc<HttpEdge>, cancel: CancellationToken) -> Running {
        let mut tasks = Vec::new();
        if let Some((sock, metrics)) = self.stun.take() {
            tasks.push(tokio::spawn(crate::edge::stun::serve(
                sock,
                metrics,
                cancel.clone(),
            )));
        }
        if let Some(l) = self.http.take() {
            tasks.push(tokio::spawn(serve(
                l,
                None,
                edge.clone(),
                self.opts.clone(),
                cancel.clone(),
            )));
        }
        if let Some(acme) = &self.acme {
            if self.https.is_some() {
                tasks.push(tokio::spawn(acme.clone().run(cancel.clone())));
            }
        }
        if let Some((l, tls)) = self.https.take() {
            tasks.push(tokio::spawn(serve(
                l,
                Some(tls),
                edge,
                self.opts.clone(),
                cancel,
            )));
        }
        Running { tasks }
    }
}

/// Errors starting the edge.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] ConfigErrors),
    /// A socket could not be bound.
    #[error("binding {what} listener on {addr}: {source}")]
    Bind {
        /// `http`, `https` or `stun`.
        what: &'static str,
        /// The address.
        addr: SocketAddr,
        /// The error.
        source: std::io::Error,
    },
    /// TLS files could not be loaded.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// The ACME manager could not start.
    #[error(transparent)]
    Acme(#[from] AcmeError),
    /// The meta cert could not be generated.
    #[error(transparent)]
    MetaCert(#[from] MetaCertError),
    /// The open-file limit leaves no room for a relay connection.
    #[error("the open-file limit ({0}) is too small to serve connections; raise it (ulimit -n)")]
    OpenFileLimit(u64),
    /// Metric registration failed.
    #[error("registering metrics: {0}")]
    Metrics(#[from] prometheus::Error),
}

/// Validates `cfg` and binds every configured socket (HTTP, HTTPS, STUN). `derp_key` is the
/// relay's DERP public key: with it, the HTTPS chain carries the fast-start meta certificate;
/// without it (no relay in this process) the plain chain is served.
pub async fn bind(
    cfg: &EdgeConfig,
    derp_key: Option<&[u8; 32]>,
    registry: &prometheus::Registry,
) -> Result<Bound, StartError> {
    cfg.validate()?;
    // Addresses were validated above; an error here cannot happen, but is reported anyway.
    let http = cfg.http_socket_addr().map_err(|e| ConfigErrors(vec![e]))?;
    let https = cfg.https_socket_addr().map_err(|e| ConfigErrors(vec![e]))?;
    let stun = cfg.stun_socket_addr().map_err(|e| ConfigErrors(vec![e]))?;
    let mut bound = Bound {
        http_addr: None,
        https_addr: None,
        stun_addr: None,
        tls: None,
        acme: None,
        relay_cap: cfg.max_connections,
        opts: ListenerOptions::from_config(cfg),
        http: None,
        https: None,
        stun: None,
    };
    if let Some(limit) = crate::edge::fdlimit::raise_open_file_limit() {
        let fit = crate::edge::fdlimit::budget(limit, cfg.max_connections)
            .ok_or(StartError::OpenFileLimit(limit))?;
        if fit.relay_cap < cfg.max_connections {
            tracing::warn!(
                max_connections = cfg.max_connections,
                relay_cap = fit.relay_cap,
                listeners_cap = fit.listeners_cap,
                open_file_limit = limit,
                reserve = fit.reserve,
                "max_connections lowered to fit under the open-file limit"
            );
        }
        bound.relay_cap = fit.relay_cap;
        bound.opts.descriptors = Some(Arc::new(Semaphore::new(fit.listeners_cap)));
    }
    if let Some(addr) = http {
        let l = TcpListener::bind(addr)
            .await
            .map_err(|source| StartError::Bind {
                what: "http",
                addr,
                source,
            })?;
        bound.http_addr = l.local_addr().ok();
        bound.http = Some(l);
    }
    if let (Some(addr), Some(cert), Some(key)) = (https, &cfg.tls_cert, &cfg.tls_key) {
        let meta = derp_key.map(crate::edge::metacert::generate).transpose()?;
        let reloader = Arc::new(TlsReloader::new(cert, key, meta, registry)?);
        let server_config = reloader.server_config()?;
        let l = TcpListener::bind(addr)
            .await
            .map_err(|source| StartError::Bind {
                what: "https",
                addr,
                source,
            })?;
        bound.https_addr = l.local_addr().ok();
        bound.tls = Some(reloader);
        bound.https = Some((l, server_config));
    }
    if let (Some(addr), Some(hostname), Some(cert_dir)) =
        (https, &cfg.acme_hostname, &cfg.acme_cert_dir)
    {
        let meta = derp_key.map(crate::edge::metacert::generate).transpose()?;
        let challenge = ChallengeKind::parse(&cfg.acme_challenge).map_err(|reason| {
            ConfigErrors(vec![crate::edge::config::ConfigError {
                field: "acme_challenge",
                reason,
            }])
        })?;
        let acme = Arc::new(AcmeManager::new(
            AcmeConfig {
                hostname: hostname.clone(),
                cert_dir: cert_dir.clone(),
                directory_url: cfg.acme_directory_url.clone(),
                email: cfg.acme_email.clone(),
                ca_file: cfg.acme_ca_file.clone(),
                challenge,
                profile: cfg.acme_profile.clone(),
                check_interval: cfg.acme_check_interval,
            },
            meta,
            registry,
        )?);
        let server_config = acme.server_config().map_err(AcmeError::from)?;
        let l = TcpListener::bind(addr)
            .await
            .map_err(|source| StartError::Bind {
                what: "https",
                addr,
                source,
            })?;
        bound.https_addr = l.local_addr().ok();
        bound.acme = Some(acme);
        bound.https = Some((l, server_config));
    }
    if let Some(addr) = stun {
        let sock = tokio::net::UdpSocket::bind(addr)
            .await
            .map_err(|source| StartError::Bind {
                what: "stun",
                addr,
                source,
            })?;
        bound.stun_addr = sock.local_addr().ok();
        bound.stun = Some((sock, StunMetrics::new(registry)?));
    }
    Ok(bound)
}

/// [`bind`] then [`Bound::spawn`] in one call, for an edge that already exists.
pub async fn start(
    cfg: &EdgeConfig,
    edge: Arc<HttpEdge>,
    registry: &prometheus::Registry,
    cancel: CancellationToken,
) -> Result<(Bound, Running), StartError> {
    let key = edge.derp().map(|d| d.public_key_bytes());
    let mut bound = bind(cfg, key.as_ref(), registry).await?;
    let running = bound.spawn(edge, cancel);
    Ok((bound, running))
}

#[cfg(test)]
mod edge_tests {
    use super::*;

    #[test]
    fn the_forwarded_client_is_the_rightmost_untrusted_hop() {
        let trusted: Vec<IpAddr> = vec!["10.0.0.5".parse().unwrap(), "10.0.0.6".parse().unwrap()];
        let head = |xff: &str| format!("GET /derp HTTP/1.1\r\nHost: x\r\n{xff}\r\n").into_bytes();
        let client = |xff: &str| forwarded_client(&head(xff), &trusted);
        assert_eq!(client(""), None);
        assert_eq!(
            client("X-Forwarded-For: 198.51.100.1\r\n"),
            Some("198.51.100.1".parse().unwrap())
        );
        // A client-written entry left of the proxy's is not believed; trusted hops are skipped.
        assert_eq!(
            client("X-Forwarded-For: 203.0.113.9, 198.51.100.1, 10.0.0.6\r\n"),
            Some("198.51.100.1".parse().unwrap())
        );
        // Several headers read as one list, in order; ports and brackets are accepted.
        assert_eq!(
            client("X-Forwarded-For: 203.0.113.9\r\nx-forwarded-for: [2001:db8::1]:443\r\n"),
            Some("2001:db8::1".parse().unwrap())
        );
        // An unreadable hop hides everything left of it.
        assert_eq!(
            client("X-Forwarded-For: 198.51.100.1, junk, 10.0.0.5\r\n"),
            None
        );
    }

    #[tokio::test]
    async fn edge_socket_options_applied() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let c = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (s, _) = l.accept().await.unwrap();
        tune_socket(&s, &ListenerOptions::default());
        let sock = socket2::SockRef::from(&s);
        assert!(s.nodelay().unwrap());
        assert!(sock.keepalive().unwrap());
        assert_eq!(sock.tcp_keepalive_time().unwrap(), Duration::from_secs(600));
        #[cfg(target_os = "linux")]
        assert_eq!(
            sock.tcp_user_timeout().unwrap(),
            Some(Duration::from_secs(15))
        );
        drop(c);
    }

    #[test]
    fn edge_token_bucket_limits_bursts() {
        let mut b = TokenBucket::new(AcceptRateLimit {
            per_second: 0.001,
            burst: 3,
        });
        assert!(b.allow());
        assert!(b.allow());
        assert!(b.allow());
        assert!(!b.allow());
    }
}
