//! The `edge_*` tests' relay: a real relay (server core + HTTP edge + listeners) on 127.0.0.1,
//! optional TLS with a self-signed cert written to a temp dir, and raw HTTP helpers.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ConnectInfo;
use axum::{Extension, Router};
use derp::client::dial::{dial, DialOptions, Dialed};
use derp::edge::http::{ConnScheme, HttpEdge};
use derp::edge::listener::{self, ListenerOptions};
use derp::edge::tls::TlsReloader;
use derp::{Server, ServerConfig};
use proto::key::{NodePrivate, NodePublic};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use super::{expect_server_info, key, metric_matching, recv_packet, SOON};

pub struct Relay {
    pub server: Arc<Server>,
    pub edge: Arc<HttpEdge>,
    pub registry: prometheus::Registry,
    pub http_addr: SocketAddr,
    pub https_addr: Option<SocketAddr>,
    pub reloader: Option<Arc<TlsReloader>>,
    pub cert_path: PathBuf,
    pub key_path: PathBuf,
    pub cancel: CancellationToken,
    pub dir: tempfile::TempDir,
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

/// A fallback router standing in for the binary's (coordinator API, /metrics, ...).
pub fn fallback() -> Router {
    Router::new()
        .route(
            "/echo-ws",
            axum::routing::get(|ws: axum::extract::WebSocketUpgrade| async move {
                ws.on_upgrade(|mut socket| async move {
                    while let Some(Ok(msg)) = socket.recv().await {
                        if socket.send(msg).await.is_err() {
                            break;
                        }
                    }
                })
            }),
        )
        .route(
            "/hello",
            axum::routing::get(|| async { "hello from fallback" }),
        )
        .route(
            "/whoami",
            axum::routing::get(
                |ConnectInfo(remote): ConnectInfo<SocketAddr>,
                 Extension(s): Extension<ConnScheme>| async move {
                    format!("{} tls={}", remote.ip(), s.tls)
                },
            ),
        )
}

/// Writes a fresh self-signed cert for localhost/127.0.0.1 to the given paths; returns its DER.
pub fn write_self_signed(cert_path: &std::path::Path, key_path: &std::path::Path) -> Vec<u8> {
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()])
        .expect("rcgen");
    std::fs::write(cert_path, ck.cert.pem()).expect("write cert");
    std::fs::write(key_path, ck.key_pair.serialize_pem()).expect("write key");
    ck.cert.der().to_vec()
}

pub struct RelayOptions {
    pub tls: bool,
    pub mesh_key: Option<proto::key::MeshKey>,
    pub listener: ListenerOptions,
    pub check_interval: Duration,
}

impl Default for RelayOptions {
    fn default() -> Self {
        RelayOptions {
            tls: false,
            mesh_key: None,
            listener: ListenerOptions::default(),
            check_interval: Duration::from_secs(5),
        }
    }
}

impl Relay {
    pub async fn start() -> Relay {
        Self::with(RelayOptions::default()).await
    }

    pub async fn start_tls() -> Relay {
        Self::with(RelayOptions {
            tls: true,
            ..RelayOptions::default()
        })
        .await
    }

    pub async fn with(opts: RelayOptions) -> Relay {
        let registry = prometheus::Registry::new();
        let mut cfg = ServerConfig::new(key());
        cfg.mesh_key = opts.mesh_key;
        let server = Server::new(cfg, &registry).expect("server");
        let edge = HttpEdge::new(Some(server.clone()), fallback(), &registry).expect("edge");
        let cancel = CancellationToken::new();
        let dir = tempfile::tempdir().expect("tempdir");
        let cert_path = dir.path().join("cert.pem");
        let key_path = dir.path().join("key.pem");

        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let http_addr = l.local_addr().expect("addr");
        tokio::spawn(listener::serve(
            l,
            None,
            edge.clone(),
            opts.listener.clone(),
            cancel.clone(),
        ));

        let (https_addr, reloader) = if opts.tls {
            write_self_signed(&cert_path, &key_path);
            let meta =
                derp::edge::metacert::generate(server.public_key().as_bytes()).expect("meta");
            let reloader = Arc::new(
                TlsReloader::new(&cert_path, &key_path, Some(meta), &registry)
                    .expect("tls")
                    .with_check_interval(opts.check_interval),
            );
            let cfg = reloader.server_config().expect("config");
            let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
            let addr = l.local_addr().expect("addr");
            tokio::spawn(listener::serve(
                l,
                Some(cfg),
                edge.clone(),
                opts.listener,
                cancel.clone(),
            ));
            (Some(addr), Some(reloader))
        } else {
            (None, None)
        };
        Relay {
            server,
            edge,
            registry,
            http_addr,
            https_addr,
            reloader,
            cert_path,
            key_path,
            cancel,
            dir,
        }
    }

    pub fn http_url(&self) -> String {
        format!("http://{}/derp", self.http_addr)
    }

    pub fn https_url(&self) -> String {
        format!("https://{}/derp", self.https_addr.expect("tls relay"))
    }

    pub fn metric(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        metric_matching(&self.registry, name, labels)
    }

    /// Waits until `key` is registered on the server.
    pub async fn wait_connected(&self, key: &NodePublic) {
        let deadline = tokio::time::Instant::now() + SOON;
        while !self.server.is_connected(key) {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{key} never connected"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

pub fn insecure(key: NodePrivate) -> DialOptions {
    let mut o = DialOptions::new(key);
    o.tls.insecure_skip_verify = true;
    o
}

/// Dials and waits for ServerInfo, which must be the first frame (the key is routable then).
pub async fn dial_ok(url: &str, opts: DialOptions) -> Dialed {
    let mut d = dial(url, opts).await.expect("dial");
    expect_server_info(&mut d.client).await;
    d
}

/// Sends 1, 1400 and 65536-byte packets a→b and b→a and checks them.
pub async fn relay_sizes(a: &mut derp::Client, b: &mut derp::Client) {
    let (ak, bk) = (a.public_key(), b.public_key());
    for size in [1usize, 1400, 65536] {
        let data: Vec<u8> = (0..size).map(|i| (i * 7 + size) as u8).collect();
        a.send_packet(bk, &data).await.expect("send");
        let (src, got) = recv_packet(b).await;
        assert_eq!(src, ak);
        assert_eq!(got.len(), size);
        assert_eq!(&got[..], &data[..]);
        b.send_packet(ak, &data).await.expect("send back");
        let (src, got) = recv_packet(a).await;
        assert_eq!(src, bk);
        assert_eq!(&got[..], &data[..]);
    }
}

/// Sends raw bytes and reads until EOF (bounded), returning everything the server wrote.
pub async fn raw_exchange(addr: SocketAddr, request: &[u8]) -> Vec<u8> {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(request).await.expect("write");
    let mut out = Vec::new();
    let _ = tokio::time::timeout(SOON, s.read_to_end(&mut out))
        .await
        .expect("server closed in time");
    out
}

/// A parsed HTTP response.
#[derive(Debug)]
pub struct Resp {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Resp {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// Parses one response from the front of `raw` (body by Content-Length, else the rest).
pub fn parse_response(raw: &[u8], head_request: bool) -> (Resp, usize) {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut r = httparse::Response::new(&mut headers);
    let n = match r.parse(raw).expect("response parses") {
        httparse::Status::Complete(n) => n,
        httparse::Status::Partial => panic!("partial response: {:?}", String::from_utf8_lossy(raw)),
    };
    let hs: Vec<(String, String)> = r
        .headers
        .iter()
        .map(|h| {
            (
                h.name.to_string(),
                String::from_utf8_lossy(h.value).to_string(),
            )
        })
        .collect();
    let status = r.code.expect("code");
    let len = hs
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
        .map(|(_, v)| v.parse::<usize>().expect("length"));
    let body_len = if head_request || status == 204 || status == 304 {
        0
    } else {
        len.unwrap_or(raw.len() - n)
    };
    let body = raw[n..n + body_len].to_vec();
    (
        Resp {
            status,
            headers: hs,
            body,
        },
        n + body_len,
    )
}

pub async fn get(addr: SocketAddr, path: &str, extra_headers: &str) -> Resp {
    let req =
        format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n{extra_headers}\r\n");
    let raw = raw_exchange(addr, req.as_bytes()).await;
    parse_response(&raw, false).0
}
