//! derper's `--verify-client-url`: ask an HTTP admission controller whether a client may connect.
//!
//! Why: headscale, Coder and other control planes already answer this question over derper's
//! protocol ([`proto::derp::admit`]), and a fleet of tailnetd relays asks tailnetd's coordinator
//! the same way (its `/tailnetd/derp-admit` endpoint). [`UrlVerifier`] is an
//! [`Admission`](crate::core::admission::Admission) the `derp` role plugs into the server.
//!
//! Semantics, from derper's `verifyClient`: one POST per connecting (non-mesh) client with a
//! 5-second deadline; HTTP 200 and `{"Allow":true}` admit; any other status, an undecodable body
//! or `Allow:false` refuse; when the controller cannot be reached (connect, TLS or request error,
//! or the deadline passing before the answer's head), the fail-open setting decides (derper's
//! default: admit). derper keeps no cache of answers, and neither does this. `http://` and
//! `https://` URLs work; HTTPS trusts the bundled web PKI roots plus any given extra roots.
//!
//! Must never: hold a lock across the request, read more than 4 KiB of an answer, or outlive
//! the handshake deadline (the server bounds it; so does the 5-second deadline here).

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::rt::TokioIo;
use proto::derp::admit::{AdmitRequest, AdmitResponse, MAX_RESPONSE_BYTES};
use proto::key::NodePublic;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::net::TcpStream;

use crate::core::admission::{Admission, AdmitFuture, Decision};

/// derper's deadline for one admission request.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);

/// A verify URL that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum VerifyUrlError {
    /// Not an `http://` or `https://` URL with a host.
    #[error("verify-client-url {0:?}: {1}")]
    BadUrl(String, &'static str),
    /// The TLS configuration could not be built (a bad extra root).
    #[error("verify-client-url TLS: {0}")]
    Tls(String),
}

/// Why the controller could not be asked (the fail-open policy applies).
#[derive(Debug, thiserror::Error)]
enum Unreachable {
    #[error("connecting to {addr}: {source}")]
    Connect {
        addr: String,
        source: std::io::Error,
    },
    #[error("TLS: {0}")]
    Tls(std::io::Error),
    #[error("HTTP: {0}")]
    Http(#[from] hyper::Error),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
}

/// Asks an admission controller URL about each connecting client (derper's semantics).
#[derive(Clone)]
pub struct UrlVerifier {
    url: String,
    uri: http::Uri,
    host: String,
    port: u16,
    tls: Option<Arc<rustls::ClientConfig>>,
    fail_open: bool,
    timeout: Duration,
}

impl std::fmt::Debug for UrlVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UrlVerifier")
            .field("url", &self.url)
            .field("fail_open", &self.fail_open)
            .field("timeout", &self.timeout)
            .finish()
    }
}

impl UrlVerifier {
    /// A verifier for `url`; `fail_open`: admit when the URL cannot be reached (derper's
    /// `--verify-client-url-fail-open`, default true). HTTPS trusts the web PKI roots and
    /// `extra_roots`.
    pub fn new(
        url: &str,
        fail_open: bool,
        extra_roots: &[CertificateDer<'static>],
    ) -> Result<UrlVerifier, VerifyUrlError> {
        let bad = |why| VerifyUrlError::BadUrl(url.to_string(), why);
        let uri: http::Uri = url.parse().map_err(|_| bad("not a URL"))?;
        let (tls, host, port) = crate::client::dial::http_endpoint(&uri).map_err(bad)?;
        let tls = if tls {
            Some(Arc::new(client_config(extra_roots)?))
        } else {
            None
        };
        Ok(UrlVerifier {
            url: url.to_string(),
            uri,
            host,
            port,
            tls,
            fail_open,
            timeout: DEFAULT_TIMEOUT,
        })
    }

    /// Replaces the 5-second deadline (tests).
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The URL asked.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Asks about `key` from `source`: `Err` when the controller could not be reached,
    /// `Ok(Err(why))` when it answered anything but an allow.
    async fn ask(
        &self,
        key: &NodePublic,
        source: IpAddr,
    ) -> Result<Result<(), String>, Unreachable> {
        let deadline = tokio::time::Instant::now() + self.timeout;
        let body = AdmitRequest {
            node_public: *key,
            source: Some(source),
        }
        .to_json();
        let head = tokio::time::timeout_at(deadline, self.send(body))
            .await
            .map_err(|_| Unreachable::Timeout(self.timeout))??;
        if head.status() != http::StatusCode::OK {
            return Ok(Err(format!("admission controller: {}", head.status())));
        }
        // Past the head, derper's failures are decode errors: refusals.
        let read = Limited::new(head.into_body(), MAX_RESPONSE_BYTES);
        let bytes = match tokio::time::timeout_at(deadline, read.collect()).await {
            Ok(Ok(b)) => b.to_bytes(),
            // Over the limit: what fits is decoded (derper's LimitReader cuts the body).
            Ok(Err(e)) => return Ok(Err(format!("admission controller answer: {e}"))),
            Err(_) => return Ok(Err("admission controller answer: deadline exceeded".into())),
        };
        match AdmitResponse::from_json(&bytes) {
            Ok(AdmitResponse { allow: true }) => Ok(Ok(())),
            Ok(AdmitResponse { allow: false }) => Ok(Err(format!(
                "admission controller: {key}/{source} not allowed"
            ))),
            Err(e) => Ok(Err(format!("admission controller answer: {e}"))),
        }
    }

    async fn send(
        &self,
        body: Vec<u8>,
    ) -> Result<http::Response<hyper::body::Incoming>, Unreachable> {
        let addr = format!("{}:{}", bracket(&self.host), self.port);
        let tcp =
            TcpStream::connect(addr.as_str())
                .await
                .map_err(|source| Unreachable::Connect {
                    addr: addr.clone(),
                    source,
                })?;
        let _ = tcp.set_nodelay(true);
        let path = self
            .uri
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .to_string();
        let req = http::Request::post(path)
            .header(
                http::header::HOST,
                self.uri.authority().map_or("", |a| a.as_str()),
            )
            .header(http::header::CONTENT_TYPE, "application/json")
            .header(http::header::USER_AGENT, "tailnetd-derp")
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| Unreachable::Tls(std::io::Error::other(e)))?;
        match &self.tls {
            Some(cfg) => {
                let name = ServerName::try_from(self.host.clone())
                    .map_err(|e| Unreachable::Tls(std::io::Error::other(e)))?;
                let tls = tokio_rustls::TlsConnector::from(cfg.clone())
                    .connect(name, tcp)
                    .await
                    .map_err(Unreachable::Tls)?;
                request(TokioIo::new(tls), req).await
            }
            None => request(TokioIo::new(tcp), req).await,
        }
    }
}

/// One request on a fresh HTTP/1.1 connection (the connection ends with the answer).
async fn request<IO>(
    io: IO,
    req: http::Request<Full<Bytes>>,
) -> Result<http::Response<hyper::body::Incoming>, Unreachable>
where
    IO: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io).await?;
    tokio::spawn(async move {
        // Ends when the answer was read or dropped; its errors surface through the request.
        let _ = conn.await;
    });
    Ok(sender.send_request(req).await?)
}

fn bracket(host: &str) -> String {
    if host.contains(':') {
        format!("[{host}]")
    } else {
        host.to_string()
    }
}

fn client_config(
    extra_roots: &[CertificateDer<'static>],
) -> Result<rustls::ClientConfig, VerifyUrlError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    for c in extra_roots {
        roots
            .add(c.clone())
            .map_err(|e| VerifyUrlError::Tls(format!("extra root: {e}")))?;
    }
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| VerifyUrlError::Tls(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

/// Extra trusted roots the way Go programs take them: the PEM certificates in the file named by
/// `SSL_CERT_FILE`, if set (empty otherwise).
pub fn roots_from_env() -> Result<Vec<CertificateDer<'static>>, VerifyUrlError> {
    let Some(path) = std::env::var_os("SSL_CERT_FILE") else {
        return Ok(Vec::new());
    };
    let text = std::fs::read(&path)
        .map_err(|e| VerifyUrlError::Tls(format!("{}: {e}", path.to_string_lossy())))?;
    rustls_pemfile::certs(&mut text.as_slice())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| VerifyUrlError::Tls(format!("{}: {e}", path.to_string_lossy())))
}

impl Admission for UrlVerifier {
    fn admit<'a>(&'a self, key: &'a NodePublic, remote: IpAddr) -> AdmitFuture<'a> {
        Box::pin(async move {
            match self.ask(key, remote).await {
                Ok(Ok(())) => Decision::Admit,
                Ok(Err(why)) => Decision::Refuse(why),
                Err(e) => Decision::VerifierError {
                    admit: self.fail_open,
                    error: format!("{}: {e}", self.url),
                },
            }
        })
    }
}
