//! tailnetd in sidecar mode for tests: a coordinator whose authenticator asks the fake coderd,
//! its routes merged with the upstream proxy, served on 127.0.0.1 with connect info.

use crate::support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use bytes::Bytes;
use coordinator::derpmap::{DerpMapConfig, DerpMapSource, EmbeddedRelay};
use coordinator::upstream::{Upstream, UpstreamAuthenticator, UpstreamConfig};
use coordinator::{Coordinator, CoordinatorConfig};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use crate::common::v2::{v2_dial, V2Conn};
use crate::fake_coder::FakeCoder;
use crate::support::{init_tracing, Ws};

/// How a [`Sidecar`] uses its upstream besides asking it about tokens.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Wiring {
    /// Everything tailnetd does not serve is proxied to the upstream.
    Proxy,
    /// Non-Tailnet dRPC streams are forwarded to the upstream (`CoordinatorConfig::upstream`);
    /// no HTTP proxy.
    ForwardStreams,
}

pub struct Sidecar {
    pub fake: FakeCoder,
    pub addr: SocketAddr,
    pub coord: Arc<Coordinator>,
    pub upstream: Upstream,
    pub auth: Arc<UpstreamAuthenticator>,
    pub registry: prometheus::Registry,
}

/// The agent's dRPC endpoint, as a modern agent dials it.
pub const AGENT_RPC: &str = "/api/v2/workspaceagents/me/rpc?version=2.10&role=agent";

/// Test defaults: short timeouts, 1 MiB body limit.
pub fn test_config(url: &str) -> UpstreamConfig {
    UpstreamConfig {
        url: url.to_string(),
        connect_timeout: Duration::from_millis(500),
        header_timeout: Duration::from_millis(1500),
        max_body_bytes: 1 << 20,
        auth_ttl_ok: Duration::from_secs(30),
        auth_ttl_err: Duration::from_secs(5),
        ..Default::default()
    }
}

impl Sidecar {
    pub async fn start() -> Sidecar {
        let fake = FakeCoder::start().await;
        Self::start_with(fake, |_| {}).await
    }

    /// A fresh fake coderd behind tailnetd with the test upstream settings adjusted by `tweak`.
    pub async fn start_tweaked(tweak: impl FnOnce(&mut UpstreamConfig)) -> Sidecar {
        Self::start_with(FakeCoder::start().await, tweak).await
    }

    pub async fn start_with(fake: FakeCoder, tweak: impl FnOnce(&mut UpstreamConfig)) -> Sidecar {
        let mut cfg = test_config(&fake.url);
        tweak(&mut cfg);
        let derp = DerpMapConfig::default();
        Self::launch(fake, cfg, Wiring::Proxy, derp, |_| {}).await
    }

    /// The general form: `fake` as the upstream with `upstream` settings, wired as `wiring` says;
    /// `derp` gets tailnetd's embedded relay, `tweak` adjusts the coordinator's configuration.
    pub async fn launch(
        fake: FakeCoder,
        upstream: UpstreamConfig,
        wiring: Wiring,
        derp: DerpMapConfig,
        tweak: impl FnOnce(&mut CoordinatorConfig),
    ) -> Sidecar {
        init_tracing();
        let registry = prometheus::Registry::new();
        let upstream = Upstream::new(upstream, &registry).unwrap();
        let auth = Arc::new(UpstreamAuthenticator::new(upstream.clone()));
        let derp = DerpMapSource::new(DerpMapConfig {
            embedded: Some(EmbeddedRelay::new("http://127.0.0.1:1", None)),
            ..derp
        })
        .unwrap();
        let mut config = CoordinatorConfig {
            shutdown_grace: Duration::from_secs(2),
            upstream: (wiring == Wiring::ForwardStreams).then(|| upstream.clone()),
            ..Default::default()
        };
        tweak(&mut config);
        let coord = Coordinator::new(config, auth.clone(), derp, &registry).unwrap();
        let app = match wiring {
            Wiring::Proxy => coord.router().merge(upstream.proxy_router(coord.clone())),
            Wiring::ForwardStreams => coord.router(),
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let _ = axum::serve(
                listener,
                app.into_make_service_with_connect_info::<SocketAddr>(),
            )
            .await;
        });
        Sidecar {
            fake,
            addr,
            coord,
            upstream,
            auth,
            registry,
        }
    }

    pub fn http_url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// One HTTP request through tailnetd.
    pub async fn request(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> http::Response<Bytes> {
        send(&self.http_url(path), method, headers, body).await
    }

    /// A bodiless GET through tailnetd with a Coder token.
    pub async fn get_with_token(&self, path: &str, token: &str) -> http::Response<Bytes> {
        get_with_token(&self.http_url(path), token).await
    }

    /// One HTTP request straight to the fake (for byte-for-byte comparison).
    pub async fn direct(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> http::Response<Bytes> {
        send(&format!("{}{}", self.fake.url, path), method, headers, body).await
    }

    pub async fn ws(
        &self,
        path: &str,
        token: &str,
    ) -> Result<Ws, Box<tokio_tungstenite::tungstenite::Error>> {
        support::ws_dial(&self.ws_url(path), &[(support::SESSION_TOKEN, token)]).await
    }

    /// A v2 session (WebSocket + yamux + dRPC client) through tailnetd.
    pub async fn v2(&self, path: &str, token: &str) -> V2Conn {
        v2_dial(&self.ws_url(path), &[(support::SESSION_TOKEN, token)]).await
    }

    fn ws_url(&self, path: &str) -> String {
        format!("ws://{}{path}", self.addr)
    }

    /// A failed WebSocket dial's status and JSON body.
    pub async fn ws_error(&self, path: &str, token: &str) -> (u16, serde_json::Value) {
        support::ws_refusal(path, self.ws(path, token).await)
    }

    pub fn metric(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        support::metric(&self.registry, name, labels)
    }

    /// The fake's agent on `/me/rpc` (v2, agent role) through tailnetd.
    pub async fn agent_v2(&self) -> V2Conn {
        self.v2(AGENT_RPC, &self.fake.agent_token).await
    }

    /// A client (the ssh user) of the fake's agent on its coordinate endpoint through tailnetd.
    pub async fn client_v2(&self) -> V2Conn {
        self.v2(&self.coordinate_path(), &self.fake.user_token_ssh)
            .await
    }

    /// `tailnetd_upstream_proxy_errors_total{reason}`.
    pub fn proxy_errors(&self, reason: &str) -> f64 {
        self.metric(
            "tailnetd_upstream_proxy_errors_total",
            &[("reason", reason)],
        )
    }

    pub fn coordinate_path(&self) -> String {
        format!(
            "/api/v2/workspaceagents/{}/coordinate?version=2.0",
            self.fake.agent_id
        )
    }
}

pub async fn send(
    url: &str,
    method: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> http::Response<Bytes> {
    let client: Client<HttpConnector, Full<Bytes>> =
        Client::builder(TokioExecutor::new()).build(HttpConnector::new());
    let mut req = http::Request::builder()
        .method(method)
        .uri(url)
        .body(Full::new(Bytes::copy_from_slice(body)))
        .unwrap();
    for (k, v) in headers {
        req.headers_mut().append(
            http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
            v.parse().unwrap(),
        );
    }
    let resp = tokio::time::timeout(Duration::from_secs(10), client.request(req))
        .await
        .expect("request timed out")
        .unwrap();
    let (parts, body) = resp.into_parts();
    let bytes = tokio::time::timeout(Duration::from_secs(10), body.collect())
        .await
        .expect("body timed out")
        .unwrap()
        .to_bytes();
    http::Response::from_parts(parts, bytes)
}

/// A bodiless GET of `url` with a Coder token.
pub async fn get_with_token(url: &str, token: &str) -> http::Response<Bytes> {
    send(url, "GET", &[("coder-session-token", token)], b"").await
}

/// A streaming request body from chunks.
pub fn stream_body(chunks: Vec<Bytes>) -> Body {
    Body::from_stream(futures_util::stream::iter(
        chunks.into_iter().map(Ok::<Bytes, std::io::Error>),
    ))
}

pub fn json(b: &[u8]) -> serde_json::Value {
    serde_json::from_slice(b).unwrap_or_else(|_| panic!("not JSON: {}", String::from_utf8_lossy(b)))
}
