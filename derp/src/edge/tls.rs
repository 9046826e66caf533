//! TLS for the DERP listener: PEM files on disk → a rustls `ServerConfig` whose served chain is the
//! real chain with the DERP meta cert appended, reloaded when the files change.
//!
//! Why a custom resolver: certificates rotate (cert-manager, certbot) while relays run for months,
//! and a DERP relay restart drops every client. The resolver checks the files' metadata at most
//! once per `check_interval` during a handshake (a cheap `stat`) and swaps in the new chain
//! atomically (arc-swap); handshakes never wait on a lock held across I/O.
//!
//! Rules: a new file that fails to load (half-written, key not matching the cert, ...) keeps the
//! old chain, logs an error and counts `derp_tls_cert_reload_failures_total`; the same broken
//! files are not retried until they change again. ALPN offers only `http/1.1`: DERP cannot run over
//! HTTP/2. TLS 1.2 and 1.3 are both allowed (fast start needs 1.3). The meta cert is appended to
//! a copy of the chain; the loaded chain itself is never mutated.

use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use arc_swap::ArcSwap;
use rustls::crypto::ring;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::ServerConfig;

/// How often (at most) a handshake triggers a look at the files by default.
pub const DEFAULT_CHECK_INTERVAL: Duration = Duration::from_secs(5);

/// Errors loading certificates or keys.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be opened or read.
    #[error("reading {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The certificate file held no certificate.
    #[error("{path}: no PEM certificate found")]
    NoCertificate {
        /// The file.
        path: PathBuf,
    },
    /// The key file held no private key.
    #[error("{path}: no PEM private key found")]
    NoPrivateKey {
        /// The file.
        path: PathBuf,
    },
    /// The key is of an unsupported type, or does not match the certificate.
    #[error("{path}: {source}")]
    BadKey {
        /// The key file.
        path: PathBuf,
        /// What rustls said.
        source: rustls::Error,
    },
    /// Building the rustls configuration failed.
    #[error("building TLS config: {0}")]
    Config(#[from] rustls::Error),
    /// Registering metrics failed.
    #[error("registering TLS metrics: {0}")]
    Metrics(#[from] prometheus::Error),
}

/// Metrics of the reloader.
#[derive(Clone, Debug)]
struct TlsMetrics {
    reloads: prometheus::IntCounter,
    reload_failures: prometheus::IntCounter,
}

impl TlsMetrics {
    fn new(registry: &prometheus::Registry) -> Result<Self, prometheus::Error> {
        let reloads = prometheus::IntCounter::new(
            "derp_tls_cert_reloads_total",
            "Times a changed TLS certificate/key pair was loaded and put in service.",
        )?;
        let reload_failures = prometheus::IntCounter::new(
            "derp_tls_cert_reload_failures_total",
            "Times changed TLS certificate/key files failed to load (the old pair stays in service).",
        )?;
        registry.register(Box::new(reloads.clone()))?;
        registry.register(Box::new(reload_failures.clone()))?;
        Ok(TlsMetrics {
            reloads,
            reload_failures,
        })
    }
}

/// Identity of the files' contents as far as `stat` can tell.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    cert: (Option<SystemTime>, u64),
    key: (Option<SystemTime>, u64),
}

fn stat(path: &Path) -> (Option<SystemTime>, u64) {
    match std::fs::metadata(path) {
        Ok(m) => (m.modified().ok(), m.len()),
        Err(_) => (None, 0),
    }
}

#[derive(Debug)]
struct CheckState {
    last_check: Instant,
    /// Stamp of the files currently in service.
    loaded: Stamp,
    /// Stamp of files that failed to load (not retried until they change).
    failed: Option<Stamp>,
}

/// Certificate + key from PEM files, with the meta cert appended, reloaded on change.
#[derive(Debug)]
pub struct TlsReloader {
    cert_path: PathBuf,
    key_path: PathBuf,
    meta_cert: Option<CertificateDer<'static>>,
    current: ArcSwap<CertifiedKey>,
    check: Mutex<CheckState>,
    check_interval: Duration,
    metrics: TlsMetrics,
}

fn load_pair(
    cert_path: &Path,
    key_path: &Path,
    meta_cert: Option<&CertificateDer<'static>>,
) -> Result<CertifiedKey, TlsError> {
    let read_err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| TlsError::Read { path, source }
    };
    let mut rd = BufReader::new(File::open(cert_path).map_err(read_err(cert_path))?);
    let mut chain = rustls_pemfile::certs(&mut rd)
        .collect::<Result<Vec<CertificateDer<'static>>, _>>()
        .map_err(read_err(cert_path))?;
    if chain.is_empty() {
        return Err(TlsError::NoCertificate {
            path: cert_path.to_path_buf(),
        });
    }
    let mut rd = BufReader::new(File::open(key_path).map_err(read_err(key_path))?);
    let key: PrivateKeyDer<'static> = rustls_pemfile::private_key(&mut rd)
        .map_err(read_err(key_path))?
        .ok_or_else(|| TlsError::NoPrivateKey {
            path: key_path.to_path_buf(),
        })?;
    let signing_key = ring::sign::any_supported_type(&key).map_err(|source| TlsError::BadKey {
        path: key_path.to_path_buf(),
        source,
    })?;
    // The served chain: the real chain, then the meta cert last (on our own copy). A process
    // without a relay (the coordinator role) serves the plain chain.
    if let Some(meta) = meta_cert {
        chain.push(meta.clone());
    }
    let certified = CertifiedKey::new(chain, signing_key);
    certified.keys_match().map_err(|source| TlsError::BadKey {
        path: key_path.to_path_buf(),
        source,
    })?;
    Ok(certified)
}

impl TlsReloader {
    /// Loads `cert_path` (PEM chain, leaf first) and `key_path` (PEM private key: PKCS#8, RSA or
    /// SEC1) and prepares to serve them with `meta_cert` (see [`crate::edge::metacert`]) appended.
    pub fn new(
        cert_path: impl Into<PathBuf>,
        key_path: impl Into<PathBuf>,
        meta_cert: Option<CertificateDer<'static>>,
        registry: &prometheus::Registry,
    ) -> Result<Self, TlsError> {
        let cert_path = cert_path.into();
        let key_path = key_path.into();
        let stamp = Stamp {
            cert: stat(&cert_path),
            key: stat(&key_path),
        };
        let certified = load_pair(&cert_path, &key_path, meta_cert.as_ref())?;
        let metrics = TlsMetrics::new(registry)?;
        Ok(TlsReloader {
            cert_path,
            key_path,
            meta_cert,
            current: ArcSwap::from_pointee(certified),
            check: Mutex::new(CheckState {
                last_check: Instant::now(),
                loaded: stamp,
                failed: None,
            }),
            check_interval: DEFAULT_CHECK_INTERVAL,
            metrics,
        })
    }

    /// Sets how often (at most) handshakes look at the files (default 5 s; zero = every time).
    pub fn with_check_interval(mut self, interval: Duration) -> Self {
        self.check_interval = interval;
        self
    }

    /// The chain currently served (the meta cert is last).
    pub fn current_chain(&self) -> Vec<CertificateDer<'static>> {
        self.current.load().cert.clone()
    }

    /// Reloads now if the files changed since the last successful load. Returns `Ok(true)` if a
    /// new pair was put in service; on error the old pair stays in service.
    pub fn reload_if_changed(&self) -> Result<bool, TlsError> {
        let stamp = Stamp {
            cert: stat(&self.cert_path),
            key: stat(&self.key_path),
        };
        {
            let mut st = match self.check.lock() {
                Ok(g) => g,
                Err(poisoned) => poisoned.into_inner(),
            };
            st.last_check = Instant::now();
            if stamp == st.loaded || Some(stamp) == st.failed {
                return Ok(false);
            }
        }
        // Load outside the lock; a concurrent check may load the same files too (harmless).
        match load_pair(&self.cert_path, &self.key_path, self.meta_cert.as_ref()) {
            Ok(certified) => {
                self.current.store(Arc::new(certified));
                let mut st = match self.check.lock() {
                    Ok(g) => g,
                    Err(poisoned) => poisoned.into_inner(),
                };
                st.loaded = stamp;
                st.failed = None;
                drop(st);
                self.metrics.reloads.inc();
                tracing::info!(cert = %self.cert_path.display(), "TLS certificate reloaded");
                Ok(true)
            }
            Err(e) => {
                let mut st = match self.check.lock() {
                    Ok(g) => g,
                    Err(poisoned) => poisoned.into_inner(),
                };
                st.failed = Some(stamp);
                drop(st);
                self.metrics.reload_failures.inc();
                tracing::error!(error = %e, "TLS certificate reload failed; keeping the old certificate");
                Err(e)
            }
        }
    }

    fn maybe_reload(&self) {
        let due = {
            let st = match self.check.lock() {
                Ok(g) => g,
                Err(poisoned) => poisoned.into_inner(),
            };
            st.last_check.elapsed() >= self.check_interval
        };
        if due {
            // Errors are logged and counted inside.
            let _ = self.reload_if_changed();
        }
    }

    /// A rustls server config serving this reloader's chain: TLS 1.2 + 1.3, ALPN `http/1.1`.
    pub fn server_config(self: &Arc<Self>) -> Result<Arc<ServerConfig>, TlsError> {
        let mut cfg = ServerConfig::builder_with_provider(Arc::new(ring::default_provider()))
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
            .with_no_client_auth()
            .with_cert_resolver(self.clone());
        cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Arc::new(cfg))
    }
}

impl ResolvesServerCert for TlsReloader {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.maybe_reload();
        Some(self.current.load_full())
    }
}
