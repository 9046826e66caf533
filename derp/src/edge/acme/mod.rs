//! ACME certificates (Let's Encrypt or any RFC 8555 CA) for the HTTPS listener: derper's
//! `-certmode=letsencrypt`.
//!
//! Why this shape: the protocol is instant-acme's (a maintained client that leaves key handling,
//! storage and timing to the caller); the CSR and the TLS-ALPN-01 challenge certificate are made
//! with rcgen, as the meta cert is. What stays here is what a relay needs around it:
//!
//! - one [`AcmeManager`] per HTTPS listener is its rustls certificate resolver: it serves the
//!   certificate in service (with the DERP meta cert appended, as [`super::tls`] does), and, to a
//!   handshake that offers only the `acme-tls/1` ALPN, the challenge certificate of a pending
//!   TLS-ALPN-01 validation (the listener closes such connections after the handshake);
//! - HTTP-01 tokens are answered at `/.well-known/acme-challenge/{token}` by
//!   [`AcmeManager::http01_router`], which the binary merges into the router of every listener
//!   (the CA asks on port 80, the plain HTTP listener; derper serves it there too);
//! - certificates and the account key live in `cert_dir` in derper's layout ([`store`]); at start
//!   a stored certificate is put in service without asking the CA;
//! - [`AcmeManager::run`] renews when a third of the lifetime is left, looking at least every
//!   `check_interval` ([`timing`]). A failed order (CA down, validation refused) keeps the
//!   certificate in service, logs an error, counts `derp_acme_renewals_total{result="failed"}` and
//!   retries with backoff; it never stops the relay.
//!
//! Every challenge installed for an order is removed when the order ends, however it ends.

pub mod store;
pub mod timing;

use std::collections::HashMap;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwapOption;
use bytes::Bytes;
use http_body_util::BodyExt;
use hyper_util::rt::TokioIo;
use instant_acme::{
    Account, AuthorizationStatus, BodyWrapper, BytesResponse, ChallengeType, HttpClient,
    Identifier, NewOrder, OrderStatus, RetryPolicy,
};
use rustls::crypto::ring;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio_util::sync::CancellationToken;

use self::store::StoredCert;
use self::timing::{Next, Validity};

/// Let's Encrypt's production directory, the default.
pub const LETS_ENCRYPT_PRODUCTION: &str = "https://acme-v02.api.letsencrypt.org/directory";
/// The ALPN protocol of TLS-ALPN-01 (RFC 8737).
pub const ACME_TLS_ALPN: &[u8] = b"acme-tls/1";
/// Bound on one whole order (account, challenges, validation, finalize, download).
const ORDER_TIMEOUT: Duration = Duration::from_secs(180);
/// Bound on one HTTP request to the CA.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// Which challenge proves control of the hostname.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChallengeKind {
    /// The CA fetches `http://HOST/.well-known/acme-challenge/TOKEN` (port 80).
    Http01,
    /// The CA connects to `HOST:443` with ALPN `acme-tls/1`.
    TlsAlpn01,
}

impl ChallengeKind {
    /// Parses `http-01` or `tls-alpn-01`.
    pub fn parse(text: &str) -> Result<Self, String> {
        match text.trim() {
            "http-01" => Ok(ChallengeKind::Http01),
            "tls-alpn-01" => Ok(ChallengeKind::TlsAlpn01),
            other => Err(format!(
                "{other:?} is neither \"http-01\" nor \"tls-alpn-01\""
            )),
        }
    }

    fn acme_type(self) -> ChallengeType {
        match self {
            ChallengeKind::Http01 => ChallengeType::Http01,
            ChallengeKind::TlsAlpn01 => ChallengeType::TlsAlpn01,
        }
    }

    fn name(self) -> &'static str {
        match self {
            ChallengeKind::Http01 => "http-01",
            ChallengeKind::TlsAlpn01 => "tls-alpn-01",
        }
    }
}

/// What the manager needs to know (see [`crate::edge::config::EdgeConfig`]'s `acme_*` fields).
#[derive(Debug, Clone)]
pub struct AcmeConfig {
    /// The DNS name the certificate is for.
    pub hostname: String,
    /// Where certificates and the account key are kept.
    pub cert_dir: PathBuf,
    /// The CA's ACME directory URL.
    pub directory_url: String,
    /// Contact address given to the CA when the account is created.
    pub email: Option<String>,
    /// Extra CA certificates (PEM) trusted for the CA's HTTPS, besides the web PKI roots.
    pub ca_file: Option<PathBuf>,
    /// The challenge used.
    pub challenge: ChallengeKind,
    /// The CA's certificate profile (e.g. Let's Encrypt's `shortlived`); `None` = its default.
    pub profile: Option<String>,
    /// Longest time between two looks at the certificate's expiry.
    pub check_interval: Duration,
}

/// Errors of the ACME manager.
#[derive(Debug, thiserror::Error)]
pub enum AcmeError {
    /// The ACME protocol failed (CA unreachable, problem document, timeout).
    #[error("ACME: {0}")]
    Protocol(#[from] instant_acme::Error),
    /// The CA answered something we cannot go on with.
    #[error("ACME order: {0}")]
    Order(String),
    /// Generating a key, CSR or challenge certificate failed.
    #[error("generating a key or certificate: {0}")]
    Rcgen(#[from] rcgen::Error),
    /// The certificate directory failed.
    #[error("certificate directory: {0}")]
    Store(#[from] store::StoreError),
    /// A key or certificate was unusable for TLS.
    #[error("TLS: {0}")]
    Tls(#[from] rustls::Error),
    /// The CA file could not be read.
    #[error("ca_file {path}: {reason}")]
    CaFile {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// The whole order took longer than its bound.
    #[error("the order took longer than {0:?}")]
    Timeout(Duration),
    /// Registering metrics failed.
    #[error("registering ACME metrics: {0}")]
    Metrics(#[from] prometheus::Error),
}

#[derive(Debug, Clone)]
struct AcmeMetrics {
    issued: prometheus::IntCounter,
    failed: prometheus::IntCounter,
    not_after: prometheus::IntGauge,
    challenges: prometheus::IntCounterVec,
    store_errors: prometheus::IntCounter,
}

impl AcmeMetrics {
    fn new(registry: &prometheus::Registry) -> Result<Self, prometheus::Error> {
        let renewals = prometheus::IntCounterVec::new(
            prometheus::Opts::new(
                "derp_acme_renewals_total",
                "ACME orders by result: issued (a new certificate is in service) or failed (the \
                 certificate in service, if any, stays).",
            ),
            &["result"],
        )?;
        let not_after = prometheus::IntGauge::new(
            "derp_acme_certificate_not_after_seconds",
            "Expiry (Unix time) of the ACME certificate in service; 0 = none.",
        )?;
        let store_errors = prometheus::IntCounter::new(
            "derp_acme_store_errors_total",
            "Times the certificate directory could not be read at start (a new certificate is \
             ordered) or written after an order (the new certificate is served anyway).",
        )?;
        let challenges = prometheus::IntCounterVec::new(
            prometheus::Opts::new(
                "derp_acme_challenges_answered_total",
                "ACME validation requests answered with a pending challenge, by type.",
            ),
            &["type"],
        )?;
        registry.register(Box::new(renewals.clone()))?;
        registry.register(Box::new(not_after.clone()))?;
        registry.register(Box::new(challenges.clone()))?;
        registry.register(Box::new(store_errors.clone()))?;
        Ok(AcmeMetrics {
            store_errors,
            issued: renewals.with_label_values(&["issued"]),
            failed: renewals.with_label_values(&["failed"]),
            not_after,
            challenges,
        })
    }
}

/// Challenges of the order in progress. Plain mutexes, held for one map operation.
#[derive(Debug, Default)]
struct Pending {
    /// HTTP-01: token → key authorization.
    http: Mutex<HashMap<String, String>>,
    /// TLS-ALPN-01: hostname (lower case) → challenge certificate.
    alpn: Mutex<HashMap<String, Arc<CertifiedKey>>>,
}

impl Pending {
    fn clear(&self) {
        self.http.lock().unwrap_or_else(|e| e.into_inner()).clear();
        self.alpn.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }
}

/// Removes an order's challenges when the order ends.
struct ClearOnDrop<'a>(&'a Pending);

impl Drop for ClearOnDrop<'_> {
    fn drop(&mut self) {
        self.0.clear();
    }
}

/// Obtains, stores, serves and renews the certificate of one hostname.
#[derive(Debug)]
pub struct AcmeManager {
    cfg: AcmeConfig,
    meta_cert: Option<CertificateDer<'static>>,
    current: ArcSwapOption<CertifiedKey>,
    validity: Mutex<Option<Validity>>,
    pending: Arc<Pending>,
    http: CaClient,
    metrics: AcmeMetrics,
}

impl AcmeManager {
    /// Prepares the manager and puts a stored certificate in service, if `cert_dir` has one (a
    /// stored file that does not load is logged and left for the next order to replace).
    pub fn new(
        cfg: AcmeConfig,
        meta_cert: Option<CertificateDer<'static>>,
        registry: &prometheus::Registry,
    ) -> Result<Self, AcmeError> {
        let mut roots = rustls::RootCertStore::empty();
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        if let Some(path) = &cfg.ca_file {
            let bad = |reason: String| AcmeError::CaFile {
                path: path.clone(),
                reason,
            };
            let pem = std::fs::read(path).map_err(|e| bad(e.to_string()))?;
            let mut n = 0;
            for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
                let cert = cert.map_err(|e| bad(format!("bad PEM: {e}")))?;
                roots
                    .add(cert)
                    .map_err(|e| bad(format!("unusable certificate: {e}")))?;
                n += 1;
            }
            if n == 0 {
                return Err(bad("no certificate in the file".into()));
            }
        }
        let tls = rustls::ClientConfig::builder_with_provider(Arc::new(ring::default_provider()))
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
            .with_root_certificates(roots)
            .with_no_client_auth();
        let manager = AcmeManager {
            meta_cert,
            current: ArcSwapOption::empty(),
            validity: Mutex::new(None),
            pending: Arc::new(Pending::default()),
            http: CaClient { tls: Arc::new(tls) },
            metrics: AcmeMetrics::new(registry)?,
            cfg,
        };
        match store::load(&manager.cfg.cert_dir, &manager.cfg.hostname) {
            Ok(Some(stored)) => {
                let not_after = stored.validity.not_after;
                manager.install(stored)?;
                tracing::info!(
                    hostname = %manager.cfg.hostname,
                    expires = %unix(not_after),
                    "ACME certificate loaded from cert_dir"
                );
            }
            Ok(None) => {}
            Err(e) => {
                manager.metrics.store_errors.inc();
                tracing::error!(error = %e, "stored ACME certificate unusable; a new one will be ordered")
            }
        }
        Ok(manager)
    }

    /// The configuration.
    pub fn config(&self) -> &AcmeConfig {
        &self.cfg
    }

    /// The chain in service (meta cert last), if any.
    pub fn current_chain(&self) -> Option<Vec<CertificateDer<'static>>> {
        self.current.load_full().map(|c| c.cert.clone())
    }

    /// A rustls server config resolved by this manager: TLS 1.2 + 1.3, ALPN `http/1.1` and
    /// `acme-tls/1` (only ever chosen by a client that offers nothing else of ours).
    pub fn server_config(self: &Arc<Self>) -> Result<Arc<rustls::ServerConfig>, rustls::Error> {
        let mut cfg =
            rustls::ServerConfig::builder_with_provider(Arc::new(ring::default_provider()))
                .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
                .with_no_client_auth()
                .with_cert_resolver(self.clone());
        cfg.alpn_protocols = vec![b"http/1.1".to_vec(), ACME_TLS_ALPN.to_vec()];
        Ok(Arc::new(cfg))
    }

    /// Answers HTTP-01 validation requests of the order in progress.
    pub fn http01_router(self: &Arc<Self>) -> axum::Router {
        let me = self.clone();
        axum::Router::new().route(
            "/.well-known/acme-challenge/{token}",
            axum::routing::get(
                move |axum::extract::Path(token): axum::extract::Path<String>| {
                    let me = me.clone();
                    async move {
                        let answer = me
                            .pending
                            .http
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .get(&token)
                            .cloned();
                        match answer {
                            Some(key_auth) => {
                                me.metrics.challenges.with_label_values(&["http-01"]).inc();
                                (
                                    http::StatusCode::OK,
                                    [(http::header::CONTENT_TYPE, "text/plain")],
                                    key_auth,
                                )
                            }
                            None => (
                                http::StatusCode::NOT_FOUND,
                                [(http::header::CONTENT_TYPE, "text/plain")],
                                "no such ACME challenge\n".to_string(),
                            ),
                        }
                    }
                },
            ),
        )
    }

    fn install(&self, stored: StoredCert) -> Result<(), AcmeError> {
        let signing = ring::sign::any_supported_type(&stored.key)?;
        let mut chain = stored.chain;
        if let Some(meta) = &self.meta_cert {
            chain.push(meta.clone());
        }
        let certified = CertifiedKey::new(chain, signing);
        certified.keys_match()?;
        self.current.store(Some(Arc::new(certified)));
        *self.validity.lock().unwrap_or_else(|e| e.into_inner()) = Some(stored.validity);
        self.metrics.not_after.set(unix(stored.validity.not_after));
        Ok(())
    }

    /// Renews until `cancel`: see the module documentation.
    pub async fn run(self: Arc<Self>, cancel: CancellationToken) {
        let mut failures = 0u32;
        let mut last_failure = None;
        loop {
            let current = *self.validity.lock().unwrap_or_else(|e| e.into_inner());
            let step = timing::next(
                current,
                SystemTime::now(),
                self.cfg.check_interval,
                failures,
                last_failure,
            );
            match step {
                Next::Wait(d) => {
                    tokio::select! {
                        _ = cancel.cancelled() => return,
                        _ = tokio::time::sleep(d) => continue,
                    }
                }
                Next::Renew => {
                    let result = tokio::select! {
                        _ = cancel.cancelled() => return,
                        r = tokio::time::timeout(ORDER_TIMEOUT, self.order()) => {
                            r.unwrap_or(Err(AcmeError::Timeout(ORDER_TIMEOUT)))
                        }
                    };
                    match result {
                        Ok(validity) => {
                            failures = 0;
                            last_failure = None;
                            self.metrics.issued.inc();
                            tracing::info!(
                                hostname = %self.cfg.hostname,
                                challenge = self.cfg.challenge.name(),
                                expires = %unix(validity.not_after),
                                "ACME certificate issued and in service"
                            );
                        }
                        Err(e) => {
                            failures = failures.saturating_add(1);
                            last_failure = Some(SystemTime::now());
                            self.metrics.failed.inc();
                            tracing::error!(
                                hostname = %self.cfg.hostname,
                                directory = %self.cfg.directory_url,
                                error = %e,
                                failures,
                                retry_in = ?timing::retry_delay(failures).min(self.cfg.check_interval),
                                serving_old = current.is_some(),
                                "ACME order failed; keeping the certificate in service"
                            );
                        }
                    }
                }
            }
        }
    }

    /// One order, from account to certificate in service.
    async fn order(&self) -> Result<Validity, AcmeError> {
        let dir = &self.cfg.cert_dir;
        let (key, pkcs8, new_key) = match store::load_account_key(dir)? {
            Some(der) => {
                let pk8 = PrivatePkcs8KeyDer::from(der);
                (
                    instant_acme::Key::from_pkcs8_der(pk8.clone_key())?,
                    pk8,
                    false,
                )
            }
            None => {
                let (key, pk8) = instant_acme::Key::generate_pkcs8()?;
                (key, pk8, true)
            }
        };
        let (account, _) = Account::builder_with_http(Box::new(self.http.clone()))
            .create_from_key(
                (key, PrivateKeyDer::Pkcs8(pkcs8.clone_key())),
                self.cfg.directory_url.clone(),
            )
            .await?;
        if new_key {
            if let Some(email) = &self.cfg.email {
                let contact = format!("mailto:{email}");
                account.update_contacts(&[contact.as_str()]).await?;
            }
            // Kept once the account is complete: a failure above starts afresh next time.
            store::save_account_key(dir, pkcs8.secret_pkcs8_der())?;
        }

        let identifiers = [Identifier::Dns(self.cfg.hostname.clone())];
        let mut new_order = NewOrder::new(&identifiers);
        if let Some(p) = &self.cfg.profile {
            new_order = new_order.profile(p);
        }
        let mut order = account.new_order(&new_order).await?;
        let _clear = ClearOnDrop(&self.pending);
        let mut authorizations = order.authorizations();
        while let Some(authz) = authorizations.next().await {
            let mut authz = authz?;
            match authz.status {
                AuthorizationStatus::Pending => {}
                AuthorizationStatus::Valid => continue,
                other => {
                    return Err(AcmeError::Order(format!("authorization is {other:?}")));
                }
            }
            let kind = self.cfg.challenge;
            let mut challenge = authz.challenge(kind.acme_type()).ok_or_else(|| {
                AcmeError::Order(format!("the CA offers no {} challenge", kind.name()))
            })?;
            let key_auth = challenge.key_authorization();
            match kind {
                ChallengeKind::Http01 => {
                    self.pending
                        .http
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .insert(challenge.token.clone(), key_auth.as_str().to_string());
                }
                ChallengeKind::TlsAlpn01 => {
                    let cert = alpn_challenge_cert(&self.cfg.hostname, key_auth.digest().as_ref())?;
                    self.pending
                        .alpn
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .insert(self.cfg.hostname.to_ascii_lowercase(), Arc::new(cert));
                }
            }
            challenge.set_ready().await?;
        }
        let policy = RetryPolicy::new()
            .initial_delay(Duration::from_millis(250))
            .backoff(1.5)
            .timeout(Duration::from_secs(90));
        let status = order.poll_ready(&policy).await?;
        if status != OrderStatus::Ready {
            return Err(AcmeError::Order(format!(
                "order is {status:?} after validation"
            )));
        }
        let leaf_key = rcgen::KeyPair::generate()?;
        let mut params = rcgen::CertificateParams::new(vec![self.cfg.hostname.clone()])?;
        params.distinguished_name = rcgen::DistinguishedName::new();
        let csr = params.serialize_request(&leaf_key)?;
        order.finalize_csr(csr.der()).await?;
        let chain_pem = order.poll_certificate(&policy).await?;
        let key_pem = leaf_key.serialize_pem();
        let path = store::cert_file(dir, &self.cfg.hostname);
        let stored = store::parse(format!("{key_pem}{chain_pem}").as_bytes(), &path)?;
        let validity = stored.validity;
        self.install(stored)?;
        // Served even when it cannot be kept: ordering again would not fix the directory and
        // would spend the CA's rate limit. The next start orders anew.
        if let Err(e) = store::save(dir, &self.cfg.hostname, &key_pem, &chain_pem) {
            self.metrics.store_errors.inc();
            tracing::error!(error = %e, "ACME certificate in service but not stored; fix acme.cert_dir");
        }
        Ok(validity)
    }
}

impl ResolvesServerCert for AcmeManager {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let acme_only = hello
            .alpn()
            .is_some_and(|mut protos| protos.all(|p| p == ACME_TLS_ALPN));
        if acme_only {
            let name = hello.server_name()?.to_ascii_lowercase();
            let cert = self
                .pending
                .alpn
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get(&name)
                .cloned();
            if cert.is_some() {
                self.metrics
                    .challenges
                    .with_label_values(&["tls-alpn-01"])
                    .inc();
            }
            return cert;
        }
        self.current.load_full()
    }
}

/// The TLS-ALPN-01 certificate (RFC 8737): self-signed for `hostname`, with the critical
/// acmeIdentifier extension holding the SHA-256 of the key authorization.
fn alpn_challenge_cert(hostname: &str, digest: &[u8]) -> Result<CertifiedKey, AcmeError> {
    let key = rcgen::KeyPair::generate()?;
    let mut params = rcgen::CertificateParams::new(vec![hostname.to_string()])?;
    params.custom_extensions = vec![rcgen::CustomExtension::new_acme_identifier(digest)];
    let cert = params.self_signed(&key)?;
    let der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    let signing = ring::sign::any_supported_type(&der)?;
    Ok(CertifiedKey::new(vec![cert.der().clone()], signing))
}

fn unix(t: SystemTime) -> i64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// The HTTPS client instant-acme talks to the CA through: one HTTP/1.1 connection per request
/// (an order is a dozen requests, minutes apart), trusting the web PKI roots plus `ca_file`.
#[derive(Debug, Clone)]
struct CaClient {
    tls: Arc<rustls::ClientConfig>,
}

impl CaClient {
    async fn send(
        &self,
        mut req: http::Request<BodyWrapper<Bytes>>,
    ) -> Result<BytesResponse, instant_acme::Error> {
        let other = |e: String| instant_acme::Error::Other(e.into());
        let uri = req.uri().clone();
        let host = uri
            .host()
            .ok_or_else(|| other(format!("{uri}: no host")))?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        let https = uri.scheme_str() == Some("https");
        let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
        let path = uri
            .path_and_query()
            .map(|p| p.as_str().to_string())
            .unwrap_or_else(|| "/".into());
        let authority = uri
            .authority()
            .map(|a| a.as_str().to_string())
            .unwrap_or_default();
        *req.uri_mut() = path.parse().map_err(|e| other(format!("{uri}: {e}")))?;
        if let Ok(v) = http::HeaderValue::from_str(&authority) {
            req.headers_mut().insert(http::header::HOST, v);
        }
        let tcp = tokio::net::TcpStream::connect((host.as_str(), port))
            .await
            .map_err(|e| other(format!("connecting to {host}:{port}: {e}")))?;
        let resp = if https {
            let name =
                ServerName::try_from(host.clone()).map_err(|e| other(format!("{host}: {e}")))?;
            let tls = tokio_rustls::TlsConnector::from(self.tls.clone())
                .connect(name, tcp)
                .await
                .map_err(|e| other(format!("TLS with {host}:{port}: {e}")))?;
            one_request(TokioIo::new(tls), req).await?
        } else {
            one_request(TokioIo::new(tcp), req).await?
        };
        // Read the body here so that the connection's task ends with the request.
        let (parts, body) = resp.into_parts();
        let body = body
            .collect()
            .await
            .map_err(|e| other(format!("reading the answer of {uri}: {e}")))?
            .to_bytes();
        Ok(BytesResponse::from(http::Response::from_parts(
            parts,
            http_body_util::Full::new(body),
        )))
    }
}

async fn one_request<IO>(
    io: IO,
    req: http::Request<BodyWrapper<Bytes>>,
) -> Result<http::Response<hyper::body::Incoming>, instant_acme::Error>
where
    IO: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(|e| instant_acme::Error::Other(Box::new(e)))?;
    tokio::spawn(async move {
        // Ends when the answer was read; its errors surface through the request.
        let _ = conn.await;
    });
    sender
        .send_request(req)
        .await
        .map_err(|e| instant_acme::Error::Other(Box::new(e)))
}

impl HttpClient for CaClient {
    fn request(
        &self,
        req: http::Request<BodyWrapper<Bytes>>,
    ) -> Pin<Box<dyn std::future::Future<Output = Result<BytesResponse, instant_acme::Error>> + Send>>
    {
        let me = self.clone();
        Box::pin(async move {
            match tokio::time::timeout(REQUEST_TIMEOUT, me.send(req)).await {
                Ok(r) => r,
                Err(_) => Err(instant_acme::Error::Other(
                    format!("no answer from the CA within {REQUEST_TIMEOUT:?}").into(),
                )),
            }
        })
    }
}
