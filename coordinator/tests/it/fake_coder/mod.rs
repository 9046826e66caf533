//! A fake Coder server (coderd) for the upstream tests: a real axum app on 127.0.0.1 with the
//! agents API, `/api/v2/users/me`, the `{agent}/coordinate` version probe, `/me/manifest`
//! (switchable to 404), a `/me/rpc` serving a small `coder.agent.v2.Agent` subset over our own
//! dRPC/yamux/WebSocket stack, a WebSocket echo on `{agent}/pty`, streaming endpoints, request
//! counters and fault switches.
//!
//! Public API (kept stable for other helpers):
//! - `FakeCoder::start().await -> FakeCoder` with `url`, `addr`, `agent_id`, `agent_token`,
//!   `agent_name`, `workspace_id`, `user_token_ssh` / `user_id_ssh` (may ssh to the agent),
//!   `user_token_nossh` (may read it, not ssh), `user_token_ssh_scoped` (a
//!   second token of the ssh user without the ssh right), `bad_user_token`.
//! - counters: `count(path)` (path without query), `total()`, `requests()`, `last(path)`,
//!   `body(path)` (last request body seen by a JSON endpoint), `rpc_calls()`.
//! - switches: `set_slow(Duration)`, `set_fail(bool)` (every request → 500),
//!   `set_manifest_gone(bool)` (`/me/manifest` → 404), `set_browser_only(bool)` (probe → 409),
//!   `go_away()` (stop listening and drop every connection, upgraded ones included).
//! - `/me/rpc` methods: `/coder.agent.v2.Agent/GetManifest` → `Manifest`; any other
//!   `/coder.agent.v2.Agent/*` method echoes its request message back (unary); everything else is
//!   unimplemented (code 12). `rpc_calls()` lists `(method, role query)` per call.
//! - coderd's coordinator on `/me/rpc` (off until `set_tailnet(true)`, so that the default fake
//!   keeps answering Tailnet methods "unimplemented"): `Coordinate` connects the agent (as
//!   `AgentCoordinateeAuth`) to the fake's own in-memory coordinator, tailnetd's [`PeerGraph`]
//!   (the same semantics as coderd's); `PostTelemetry` records the request. Helpers:
//!   `server_tailnet(id)` connects a coderd-side peer (like coderd's server tailnet:
//!   `SingleTailnetCoordinateeAuth`) to that coordinator, `coordinator()` is the graph itself,
//!   `end_coordinate_streams()` ends every open `Coordinate` stream from the server side,
//!   `coordinates_opened()` / `telemetry()` / `rpc_sessions()` count what arrived. `/api/v2/tailnet`
//!   (user token) serves `PostTelemetry` the same way (`tailnet_sessions()` counts its sockets).
//! - fake-only helpers: `ANY /api/v2/fake/echo/{*rest}` (JSON description of the request),
//!   `POST /api/v2/fake/upload` (streams the body; `{"bytes":n,"sha256":hex}`),
//!   `GET /api/v2/fake/stream?chunks=N&interval_ms=M` (chunked body, one chunk per interval).
#![allow(clippy::result_large_err)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{FromRequestParts, Path, RawQuery, Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get, patch, post};
use axum::{Json, Router};
use coordinator::auth::{query_value, token_from_request};
use coordinator::authz::CoordinateeAuth;
use coordinator::graph::{GraphConfig, PeerGraph, PeerHandle, PeerReceiver};
use coordinator::rpc::drpc::{self, CallFuture, DrpcConfig, Handler, RpcError, RpcStream};
use coordinator::rpc::wsio::{WsConfig, WsIo};
use coordinator::rpc::yamux::{self, Session};
use futures_util::{SinkExt, StreamExt};
use http::request::Parts;
use http::{HeaderMap, StatusCode};
use http_body_util::BodyExt;
use proto::tailnet::v2::methods as tailnet_methods;
use proto::tailnet::v2::{CoordinateRequest, TelemetryRequest, TelemetryResponse};
use serde_json::{json, Value};
use sha2::Digest;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// The upstream's own DERP map (what tailnetd must replace when it owns the map).
pub const UPSTREAM_DERP_MAP: &str = r#"{"Regions":{"999":{"EmbeddedRelay":true,"RegionID":999,"RegionCode":"coder","RegionName":"Coder Embedded Relay","Nodes":[{"Name":"999b","RegionID":999,"HostName":"coder.upstream.example","STUNPort":-1,"DERPPort":443}]}}}"#;

/// One request as the fake saw it.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub method: String,
    pub uri: String,
    pub path: String,
    pub headers: HeaderMap,
}

#[derive(Debug, Clone)]
struct FakeUser {
    id: Uuid,
    username: String,
    ssh: bool,
}

/// Shared state behind the app.
#[derive(Debug)]
pub struct FakeState {
    agent_id: Uuid,
    agent_token: String,
    agent_name: String,
    workspace_id: Uuid,
    users: HashMap<String, FakeUser>,
    slow_ms: AtomicU64,
    fail: AtomicBool,
    manifest_gone: AtomicBool,
    browser_only: AtomicBool,
    counts: Mutex<HashMap<String, u64>>,
    recorded: Mutex<Vec<Recorded>>,
    bodies: Mutex<HashMap<String, Bytes>>,
    rpc_calls: Mutex<Vec<(String, String)>>,
    total: AtomicU64,
    cancel: CancellationToken,
    /// Serve `Coordinate` and `PostTelemetry` on `/me/rpc`.
    tailnet: AtomicBool,
    /// coderd's coordinator.
    graph: Arc<PeerGraph>,
    /// One token per open `Coordinate` stream; cancelling ends that stream.
    coordinate_streams: Mutex<Vec<CancellationToken>>,
    coordinates_opened: AtomicU64,
    telemetry: Mutex<Vec<TelemetryRequest>>,
    /// `role` of every `/me/rpc` WebSocket accepted.
    rpc_sessions: Mutex<Vec<String>>,
    /// `/api/v2/tailnet` WebSockets accepted.
    tailnet_sessions: AtomicU64,
}

/// A running fake coderd.
#[derive(Debug, Clone)]
pub struct FakeCoder {
    pub url: String,
    pub addr: SocketAddr,
    pub agent_id: Uuid,
    pub agent_token: String,
    pub agent_name: String,
    pub workspace_id: Uuid,
    pub user_token_ssh: String,
    pub user_id_ssh: Uuid,
    pub user_token_nossh: String,
    /// A second token of the ssh user (`user_id_ssh`) whose scope does not allow ssh (like a
    /// Coder token scoped to `application_connect`).
    pub user_token_ssh_scoped: String,
    /// Well-formed but unknown to the fake (401).
    pub bad_user_token: String,
    pub state: Arc<FakeState>,
}

fn api_token() -> String {
    let s = Uuid::new_v4().simple().to_string();
    format!("{}-{}", &s[..10], &s[10..32])
}

impl FakeCoder {
    /// Start on 127.0.0.1:0.
    pub async fn start() -> FakeCoder {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        Self::start_on(listener).await
    }

    /// Start on 127.0.0.1:0 with TLS (self-signed for `localhost` and `127.0.0.1`); the URL is
    /// `https://127.0.0.1:port`. Returns the certificate to trust.
    /// A client TLS configuration (HTTP/1.1) that trusts only `cert`, the certificate
    /// [`FakeCoder::start_tls`] serves.
    pub fn client_tls(
        cert: rustls::pki_types::CertificateDer<'static>,
    ) -> Arc<rustls::ClientConfig> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(cert).unwrap();
        let mut tls = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
        tls.alpn_protocols = vec![b"http/1.1".to_vec()];
        Arc::new(tls)
    }

    pub async fn start_tls() -> (FakeCoder, rustls::pki_types::CertificateDer<'static>) {
        let ck = rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()])
            .unwrap();
        let cert = ck.cert.der().clone();
        let key = rustls::pki_types::PrivateKeyDer::Pkcs8(ck.key_pair.serialize_der().into());
        let mut cfg = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert.clone()], key)
        .unwrap();
        cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut fake = Self::start_inner(
            listener,
            Some(tokio_rustls::TlsAcceptor::from(Arc::new(cfg))),
        )
        .await;
        fake.url = format!("https://{}", fake.addr);
        (fake, cert)
    }

    /// Start on a given listener (e.g. to restart on the same port after `go_away`).
    pub async fn start_on(listener: tokio::net::TcpListener) -> FakeCoder {
        Self::start_inner(listener, None).await
    }

    async fn start_inner(
        listener: tokio::net::TcpListener,
        tls: Option<tokio_rustls::TlsAcceptor>,
    ) -> FakeCoder {
        let addr = listener.local_addr().unwrap();
        let user_token_ssh = api_token();
        let user_token_nossh = api_token();
        let user_token_ssh_scoped = api_token();
        let user_id_ssh = Uuid::new_v4();
        let user_id_nossh = Uuid::new_v4();
        let mut users = HashMap::new();
        users.insert(
            user_token_ssh.clone(),
            FakeUser {
                id: user_id_ssh,
                username: "alice".into(),
                ssh: true,
            },
        );
        users.insert(
            user_token_ssh_scoped.clone(),
            FakeUser {
                id: user_id_ssh,
                username: "alice".into(),
                ssh: false,
            },
        );
        users.insert(
            user_token_nossh.clone(),
            FakeUser {
                id: user_id_nossh,
                username: "bob".into(),
                ssh: false,
            },
        );
        let state = Arc::new(FakeState {
            agent_id: Uuid::new_v4(),
            agent_token: Uuid::new_v4().to_string(),
            agent_name: "main".into(),
            workspace_id: Uuid::new_v4(),
            users,
            slow_ms: AtomicU64::new(0),
            fail: AtomicBool::new(false),
            manifest_gone: AtomicBool::new(false),
            browser_only: AtomicBool::new(false),
            counts: Mutex::new(HashMap::new()),
            recorded: Mutex::new(Vec::new()),
            bodies: Mutex::new(HashMap::new()),
            rpc_calls: Mutex::new(Vec::new()),
            total: AtomicU64::new(0),
            cancel: CancellationToken::new(),
            tailnet: AtomicBool::new(false),
            graph: PeerGraph::new(GraphConfig::default(), &prometheus::Registry::new()).unwrap(),
            coordinate_streams: Mutex::new(Vec::new()),
            coordinates_opened: AtomicU64::new(0),
            telemetry: Mutex::new(Vec::new()),
            rpc_sessions: Mutex::new(Vec::new()),
            tailnet_sessions: AtomicU64::new(0),
        });
        let app = app(state.clone());
        tokio::spawn(serve(listener, app, state.cancel.clone(), tls));
        FakeCoder {
            url: format!("http://{addr}"),
            addr,
            agent_id: state.agent_id,
            agent_token: state.agent_token.clone(),
            agent_name: state.agent_name.clone(),
            workspace_id: state.workspace_id,
            user_token_ssh,
            user_id_ssh,
            user_token_nossh,
            user_token_ssh_scoped,
            bad_user_token: api_token(),
            state,
        }
    }

    /// Serve coderd's coordinator (`Coordinate`) and `PostTelemetry` on `/me/rpc`.
    pub fn set_tailnet(&self, on: bool) {
        self.state.tailnet.store(on, Ordering::SeqCst);
    }

    /// coderd's coordinator.
    pub fn coordinator(&self) -> Arc<PeerGraph> {
        self.state.graph.clone()
    }

    /// Connects a coderd-side peer (like coderd's server tailnet) to coderd's coordinator.
    pub fn server_tailnet(&self, id: Uuid) -> (PeerHandle, PeerReceiver) {
        self.state
            .graph
            .connect(id, "server-tailnet".into(), CoordinateeAuth::SingleTailnet)
    }

    /// Ends every open `Coordinate` stream on `/me/rpc` from the server side (the session stays).
    pub fn end_coordinate_streams(&self) {
        for t in self.state.coordinate_streams.lock().unwrap().drain(..) {
            t.cancel();
        }
    }

    /// `Coordinate` streams opened on `/me/rpc` so far.
    pub fn coordinates_opened(&self) -> u64 {
        self.state.coordinates_opened.load(Ordering::SeqCst)
    }

    /// `PostTelemetry` requests received on `/me/rpc`.
    pub fn telemetry(&self) -> Vec<TelemetryRequest> {
        self.state.telemetry.lock().unwrap().clone()
    }

    /// `role` query of every `/me/rpc` WebSocket accepted.
    pub fn rpc_sessions(&self) -> Vec<String> {
        self.state.rpc_sessions.lock().unwrap().clone()
    }

    /// `/api/v2/tailnet` WebSockets accepted (user token).
    pub fn tailnet_sessions(&self) -> u64 {
        self.state.tailnet_sessions.load(Ordering::SeqCst)
    }

    /// Requests seen for `path` (no query).
    pub fn count(&self, path: &str) -> u64 {
        let g = self.state.counts.lock().unwrap();
        g.get(path).copied().unwrap_or(0)
    }

    /// Every request seen.
    pub fn total(&self) -> u64 {
        self.state.total.load(Ordering::SeqCst)
    }

    /// Every request seen, in order.
    pub fn requests(&self) -> Vec<Recorded> {
        self.state.recorded.lock().unwrap().clone()
    }

    /// The last request for `path`.
    pub fn last(&self, path: &str) -> Option<Recorded> {
        let g = self.state.recorded.lock().unwrap();
        g.iter().rev().find(|r| r.path == path).cloned()
    }

    /// The last body received by the handler of `path`.
    pub fn body(&self, path: &str) -> Option<Bytes> {
        self.state.bodies.lock().unwrap().get(path).cloned()
    }

    /// `(method, role)` of every dRPC call on `/me/rpc`.
    pub fn rpc_calls(&self) -> Vec<(String, String)> {
        self.state.rpc_calls.lock().unwrap().clone()
    }

    /// Sleep this long before answering any request (zero: off).
    pub fn set_slow(&self, d: Duration) {
        self.state
            .slow_ms
            .store(d.as_millis() as u64, Ordering::SeqCst);
    }

    /// Answer every request with 500.
    pub fn set_fail(&self, on: bool) {
        self.state.fail.store(on, Ordering::SeqCst);
    }

    /// `/me/manifest` answers 404 (as current coderd, where it was removed).
    pub fn set_manifest_gone(&self, on: bool) {
        self.state.manifest_gone.store(on, Ordering::SeqCst);
    }

    /// The coordinate probe answers 409 (enterprise browser-only).
    pub fn set_browser_only(&self, on: bool) {
        self.state.browser_only.store(on, Ordering::SeqCst);
    }

    /// Stop listening and drop every connection (including upgraded ones).
    pub async fn go_away(&self) {
        self.state.cancel.cancel();
        // Let the accept loop and connection tasks observe it.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    pub fn agent_path(&self, rest: &str) -> String {
        format!("/api/v2/workspaceagents/{}{}", self.agent_id, rest)
    }
}

/// Accept loop with hyper (HTTP/1.1 + upgrades) so `go_away` can drop everything.
async fn serve(
    listener: tokio::net::TcpListener,
    app: Router,
    cancel: CancellationToken,
    tls: Option<tokio_rustls::TlsAcceptor>,
) {
    loop {
        let (stream, _) = tokio::select! {
            r = listener.accept() => match r {
                Ok(s) => s,
                Err(_) => continue,
            },
            _ = cancel.cancelled() => return,
        };
        let app = app.clone();
        let cancel = cancel.clone();
        let tls = tls.clone();
        tokio::spawn(async move {
            let svc =
                hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                    let app = app.clone();
                    async move {
                        use tower::ServiceExt;
                        app.oneshot(req.map(Body::new)).await
                    }
                });
            let builder = hyper::server::conn::http1::Builder::new();
            match tls {
                None => {
                    let conn = builder
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                        .with_upgrades();
                    tokio::select! {
                        _ = conn => {}
                        _ = cancel.cancelled() => {}
                    }
                }
                Some(acceptor) => {
                    let Ok(stream) = acceptor.accept(stream).await else {
                        return;
                    };
                    let conn = builder
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                        .with_upgrades();
                    tokio::select! {
                        _ = conn => {}
                        _ = cancel.cancelled() => {}
                    }
                }
            }
        });
    }
}

fn app(state: Arc<FakeState>) -> Router {
    let wa = "/api/v2/workspaceagents";
    Router::new()
        .route("/api/v2/users/me", get(users_me))
        .route(
            &format!("{wa}/aws-instance-identity"),
            post(instance_identity),
        )
        .route(
            &format!("{wa}/azure-instance-identity"),
            post(instance_identity),
        )
        .route(
            &format!("{wa}/google-instance-identity"),
            post(instance_identity),
        )
        .route(&format!("{wa}/me/app-health"), post(agent_json_body))
        .route(&format!("{wa}/me/external-auth"), get(external_auth))
        .route(&format!("{wa}/me/gitauth"), get(gitauth))
        .route(&format!("{wa}/me/gitsshkey"), get(gitsshkey))
        .route(&format!("{wa}/me/logs"), patch(agent_json_body))
        .route(&format!("{wa}/me/startup-logs"), patch(agent_json_body))
        .route(&format!("{wa}/me/manifest"), get(manifest))
        .route(&format!("{wa}/me/report-stats"), post(report_stats))
        .route(&format!("{wa}/me/rpc"), get(agent_rpc))
        .route("/api/v2/tailnet", get(user_tailnet))
        .route(&format!("{wa}/{{agent}}"), get(workspace_agent))
        .route(&format!("{wa}/{{agent}}/connection"), get(connection))
        .route(
            &format!("{wa}/{{agent}}/listening-ports"),
            get(listening_ports),
        )
        .route(&format!("{wa}/{{agent}}/logs"), get(logs))
        .route(&format!("{wa}/{{agent}}/startup-logs"), get(logs))
        .route(&format!("{wa}/{{agent}}/pty"), get(pty))
        .route(&format!("{wa}/{{agent}}/coordinate"), get(coordinate_probe))
        .route("/api/v2/fake/echo/{*rest}", any(echo))
        .route("/api/v2/fake/upload", post(upload))
        .route("/api/v2/fake/stream", get(stream))
        .fallback(not_found)
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            record_and_faults,
        ))
        .with_state(state)
}

/// Count and record every request; apply the slow and fail switches.
async fn record_and_faults(State(st): State<Arc<FakeState>>, req: Request, next: Next) -> Response {
    let path = req.uri().path().to_string();
    st.total.fetch_add(1, Ordering::SeqCst);
    *st.counts.lock().unwrap().entry(path.clone()).or_insert(0) += 1;
    st.recorded.lock().unwrap().push(Recorded {
        method: req.method().to_string(),
        uri: req.uri().to_string(),
        path,
        headers: req.headers().clone(),
    });
    let slow = st.slow_ms.load(Ordering::SeqCst);
    if slow > 0 {
        tokio::time::sleep(Duration::from_millis(slow)).await;
    }
    if st.fail.load(Ordering::SeqCst) {
        return coder_error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "Internal error.",
            Some("fake coderd failure switch"),
        );
    }
    let mut resp = next.run(req).await;
    resp.headers_mut()
        .insert("x-coder-build-version", "v2.99.0-fake".parse().unwrap());
    resp
}

fn coder_error(status: StatusCode, message: &str, detail: Option<&str>) -> Response {
    let mut v = json!({ "message": message });
    if let Some(d) = detail {
        v["detail"] = json!(d);
    }
    (status, Json(v)).into_response()
}

async fn not_found() -> Response {
    coder_error(StatusCode::NOT_FOUND, "Route not found.", None)
}

fn agent_auth(st: &FakeState, headers: &HeaderMap, query: Option<&str>) -> Result<(), Response> {
    match token_from_request(headers, query) {
        None => Err(coder_error(
            StatusCode::UNAUTHORIZED,
            "Cookie \"coder_session_token\" must be provided.",
            None,
        )),
        Some(t) if Uuid::parse_str(&t).is_err() => Err(coder_error(
            StatusCode::UNAUTHORIZED,
            "Workspace agent token invalid.",
            Some("An agent token must be a valid UUIDv4."),
        )),
        Some(t) if t != st.agent_token => Err(coder_error(
            StatusCode::UNAUTHORIZED,
            "Workspace agent not authorized.",
            Some("The agent cannot authenticate until the workspace provision job has been completed. If the job is no longer running, this agent is invalid."),
        )),
        Some(_) => Ok(()),
    }
}

fn user_auth(
    st: &FakeState,
    headers: &HeaderMap,
    query: Option<&str>,
) -> Result<FakeUser, Response> {
    token_from_request(headers, query)
        .and_then(|t| st.users.get(&t).cloned())
        .ok_or_else(|| {
            coder_error(
                StatusCode::UNAUTHORIZED,
                "You are signed out or your session has expired. Please sign in again to continue.",
                Some("API key is invalid."),
            )
        })
}

fn record_body(st: &FakeState, path: &str, body: &Bytes) {
    st.bodies
        .lock()
        .unwrap()
        .insert(path.to_string(), body.clone());
}

async fn users_me(
    State(st): State<Arc<FakeState>>,
    headers: HeaderMap,
    RawQuery(q): RawQuery,
) -> Response {
    let u = match user_auth(&st, &headers, q.as_deref()) {
        Ok(u) => u,
        Err(r) => return r,
    };
    Json(json!({
        "id": u.id,
        "username": u.username,
        "email": format!("{}@example.com", u.username),
        "name": "",
        "created_at": "2024-01-01T00:00:00Z",
        "updated_at": "2024-01-01T00:00:00Z",
        "last_seen_at": "2024-06-01T00:00:00Z",
        "status": "active",
        "login_type": "password",
        "theme_preference": "",
        "organization_ids": [Uuid::nil()],
        "roles": [{"name": "member", "display_name": "Member"}],
        "avatar_url": ""
    }))
    .into_response()
}

async fn instance_identity(State(st): State<Arc<FakeState>>, req: Request) -> Response {
    let path = req.uri().path().to_string();
    let body = req.into_body().collect().await.unwrap().to_bytes();
    record_body(&st, &path, &body);
    if serde_json::from_slice::<Value>(&body).is_err() {
        return coder_error(
            StatusCode::BAD_REQUEST,
            "Request body must be valid JSON.",
            None,
        );
    }
    Json(json!({ "session_token": st.agent_token })).into_response()
}

/// `POST /me/app-health`, `PATCH /me/logs`, `PATCH /me/startup-logs`: agent token + JSON body.
async fn agent_json_body(State(st): State<Arc<FakeState>>, req: Request) -> Response {
    let path = req.uri().path().to_string();
    if let Err(r) = agent_auth(&st, req.headers(), req.uri().query()) {
        return r;
    }
    let body = req.into_body().collect().await.unwrap().to_bytes();
    record_body(&st, &path, &body);
    if serde_json::from_slice::<Value>(&body).is_err() {
        return coder_error(
            StatusCode::BAD_REQUEST,
            "Request body must be valid JSON.",
            None,
        );
    }
    Json(json!({})).into_response()
}

/// A request with a valid agent token: the check the agent endpoints start with. Rejects with
/// coderd's error answer.
struct AgentAuthed;

impl FromRequestParts<Arc<FakeState>> for AgentAuthed {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, st: &Arc<FakeState>) -> Result<Self, Response> {
        agent_auth(st, &parts.headers, parts.uri.query())?;
        Ok(AgentAuthed)
    }
}

async fn external_auth(_: AgentAuthed) -> Response {
    Json(json!({
        "url": "https://github.com/login/oauth/authorize?client_id=x",
        "access_token": "gho_fake",
        "token_extra": {},
        "username": "oauth2",
        "password": "",
        "type": "github"
    }))
    .into_response()
}

async fn gitauth(_: AgentAuthed) -> Response {
    Json(json!({"username": "oauth2", "password": "gho_fake", "url": ""})).into_response()
}

async fn gitsshkey(_: AgentAuthed) -> Response {
    Json(json!({
        "public_key": "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIFakeFakeFakeFakeFakeFakeFakeFakeFakeFake",
        "private_key": "-----BEGIN OPENSSH PRIVATE KEY-----\nfake\n-----END OPENSSH PRIVATE KEY-----\n"
    }))
    .into_response()
}

/// The legacy JSON manifest (`agentsdk.Manifest`), field order as Go encodes it.
pub fn manifest_json(agent_id: Uuid, workspace_id: Uuid, agent_name: &str) -> String {
    format!(
        r#"{{"agent_id":"{agent_id}","agent_name":"{agent_name}","owner_name":"alice","workspace_id":"{workspace_id}","workspace_name":"dev","git_auth_configs":1,"vscode_port_proxy_uri":"https://{{{{port}}}}--main--dev--alice.apps.example","apps":[{{"id":"{app}","url":"http://localhost:8080","external":false,"slug":"web","display_name":"Web","icon":"","subdomain":true,"sharing_level":"owner","healthcheck":{{"url":"","interval":0,"threshold":0}},"health":"disabled"}}],"derpmap":{UPSTREAM_DERP_MAP},"derp_force_websockets":false,"environment_variables":{{"GIT_AUTHOR_NAME":"alice","ZED":"last"}},"directory":"/home/coder","motd_file":"/etc/motd","disable_direct_connections":false,"metadata":[],"scripts":[]}}"#,
        app = Uuid::nil()
    )
}

/// `AgentConnectionInfo` as coderd encodes it.
pub fn connection_json() -> String {
    format!(
        r#"{{"derp_map":{UPSTREAM_DERP_MAP},"derp_force_websockets":false,"disable_direct_connections":false,"hostname_suffix":"coder"}}"#
    )
}

async fn manifest(
    State(st): State<Arc<FakeState>>,
    headers: HeaderMap,
    RawQuery(q): RawQuery,
) -> Response {
    if st.manifest_gone.load(Ordering::SeqCst) {
        return not_found().await;
    }
    if let Err(r) = agent_auth(&st, &headers, q.as_deref()) {
        return r;
    }
    (
        [(
            http::header::CONTENT_TYPE,
            "application/json; charset=utf-8",
        )],
        manifest_json(st.agent_id, st.workspace_id, &st.agent_name),
    )
        .into_response()
}

async fn report_stats(State(st): State<Arc<FakeState>>, req: Request) -> Response {
    let path = req.uri().path().to_string();
    if let Err(r) = agent_auth(&st, req.headers(), req.uri().query()) {
        return r;
    }
    let body = req.into_body().collect().await.unwrap().to_bytes();
    record_body(&st, &path, &body);
    Json(json!({"report_interval": 30_000_000_000u64})).into_response()
}

/// Resolve the `{agent}` path parameter for a user endpoint, Coder's way.
fn user_agent(
    st: &FakeState,
    agent: &str,
    headers: &HeaderMap,
    q: Option<&str>,
) -> Result<FakeUser, Response> {
    let u = user_auth(st, headers, q)?;
    let Ok(id) = Uuid::parse_str(agent) else {
        return Err(coder_error(
            StatusCode::BAD_REQUEST,
            &format!("Invalid UUID {agent:?}."),
            None,
        ));
    };
    if id != st.agent_id {
        return Err(coder_error(
            StatusCode::NOT_FOUND,
            "Agent doesn't exist with that id, or you do not have access to it.",
            None,
        ));
    }
    Ok(u)
}

/// A request about the fake's agent (the `{agent}` path parameter) by a user who may see it: the
/// check every per-agent user endpoint starts with. Rejects with coderd's error answer.
struct AgentOfUser {
    st: Arc<FakeState>,
    /// The raw query.
    query: Option<String>,
}

impl FromRequestParts<Arc<FakeState>> for AgentOfUser {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, st: &Arc<FakeState>) -> Result<Self, Response> {
        let Path(agent) = Path::<String>::from_request_parts(parts, st)
            .await
            .map_err(IntoResponse::into_response)?;
        let query = parts.uri.query().map(str::to_owned);
        user_agent(st, &agent, &parts.headers, query.as_deref())?;
        Ok(AgentOfUser {
            st: st.clone(),
            query,
        })
    }
}

async fn workspace_agent(AgentOfUser { st, .. }: AgentOfUser) -> Response {
    Json(json!({
        "id": st.agent_id,
        "parent_id": null,
        "created_at": "2024-01-01T00:00:00Z",
        "updated_at": "2024-01-01T00:00:00Z",
        "first_connected_at": "2024-01-01T00:00:05Z",
        "last_connected_at": "2024-06-01T00:00:00Z",
        "status": "connected",
        "lifecycle_state": "ready",
        "name": st.agent_name,
        "resource_id": Uuid::nil(),
        "architecture": "amd64",
        "environment_variables": {},
        "operating_system": "linux",
        "logs_length": 2,
        "logs_overflowed": false,
        "directory": "/home/coder",
        "expanded_directory": "/home/coder",
        "version": "v2.99.0",
        "api_version": "2.10",
        "apps": [],
        "latency": {"999": {"latency_ms": 1.5, "preferred": true}},
        "connection_timeout_seconds": 120,
        "troubleshooting_url": "https://coder.com/docs/troubleshooting",
        "subsystems": ["envbox"],
        "health": {"healthy": true},
        "display_apps": ["vscode", "web_terminal", "ssh_helper"],
        "log_sources": [],
        "scripts": [],
        "startup_script_behavior": "non-blocking"
    }))
    .into_response()
}

async fn connection(_: AgentOfUser) -> Response {
    (
        [(
            http::header::CONTENT_TYPE,
            "application/json; charset=utf-8",
        )],
        connection_json(),
    )
        .into_response()
}

async fn listening_ports(_: AgentOfUser) -> Response {
    Json(json!({"ports": [{"process_name": "node", "network": "tcp", "port": 8080}]}))
        .into_response()
}

fn log_lines() -> Value {
    json!([
        {"id": 1, "created_at": "2024-01-01T00:00:01Z", "output": "starting", "level": "info", "source_id": Uuid::nil()},
        {"id": 2, "created_at": "2024-01-01T00:00:02Z", "output": "ready", "level": "info", "source_id": Uuid::nil()}
    ])
}

/// `GET {agent}/logs` (and `startup-logs`): JSON array, or with `follow=true` a WebSocket of JSON
/// text messages (one batch at once, one more when the client sends anything).
async fn logs(
    AgentOfUser { st, query: q }: AgentOfUser,
    ws: Result<WebSocketUpgrade, axum::extract::ws::rejection::WebSocketUpgradeRejection>,
) -> Response {
    if query_value(q.as_deref(), "follow").as_deref() == Some("true") {
        let ws = match ws {
            Ok(ws) => ws,
            Err(e) => return e.into_response(),
        };
        let cancel = st.cancel.clone();
        return ws.on_upgrade(move |mut sock: WebSocket| async move {
            let batch = log_lines().to_string();
            if sock
                .send(Message::Text(batch.clone().into()))
                .await
                .is_err()
            {
                return;
            }
            loop {
                tokio::select! {
                    m = sock.next() => match m {
                        Some(Ok(Message::Text(_) | Message::Binary(_))) => {
                            if sock.send(Message::Text(batch.clone().into())).await.is_err() {
                                return;
                            }
                        }
                        Some(Ok(_)) => {}
                        _ => return,
                    },
                    _ = cancel.cancelled() => return,
                }
            }
        });
    }
    Json(log_lines()).into_response()
}

/// `GET {agent}/pty`: echo every data message back (binary as binary, text as text).
async fn pty(
    AgentOfUser { st, .. }: AgentOfUser,
    ws: Result<WebSocketUpgrade, axum::extract::ws::rejection::WebSocketUpgradeRejection>,
) -> Response {
    let ws = match ws {
        Ok(ws) => ws,
        Err(e) => return e.into_response(),
    };
    let cancel = st.cancel.clone();
    ws.on_upgrade(move |sock: WebSocket| async move {
        let (mut tx, mut rx) = sock.split();
        loop {
            tokio::select! {
                m = rx.next() => match m {
                    Some(Ok(m @ (Message::Text(_) | Message::Binary(_)))) => {
                        if tx.send(m).await.is_err() {
                            return;
                        }
                    }
                    Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return,
                    Some(Ok(_)) => {}
                },
                _ = cancel.cancelled() => return,
            }
        }
    })
}

/// The §2.2 probe behaviour, in coderd's handler order.
async fn coordinate_probe(
    State(st): State<Arc<FakeState>>,
    Path(agent): Path<String>,
    headers: HeaderMap,
    RawQuery(q): RawQuery,
) -> Response {
    let Some(u) =
        token_from_request(&headers, q.as_deref()).and_then(|t| st.users.get(&t).cloned())
    else {
        return coder_error(
            StatusCode::UNAUTHORIZED,
            "API key or external proxy authentication required, but none provided",
            None,
        );
    };
    let Ok(id) = Uuid::parse_str(&agent) else {
        return coder_error(
            StatusCode::BAD_REQUEST,
            &format!("Invalid UUID {agent:?}."),
            None,
        );
    };
    if id != st.agent_id {
        return coder_error(
            StatusCode::NOT_FOUND,
            "Agent doesn't exist with that id, or you do not have access to it.",
            None,
        );
    }
    if !u.ssh {
        return coder_error(
            StatusCode::NOT_FOUND,
            "Resource not found or you do not have access to this resource",
            None,
        );
    }
    if st.browser_only.load(Ordering::SeqCst) {
        return coder_error(
            StatusCode::CONFLICT,
            "Non-browser connections are disabled for your deployment.",
            None,
        );
    }
    let v = query_value(q.as_deref(), "version").unwrap_or_else(|| "1.0".into());
    match coordinator::api::parse_version(&v, false) {
        Err(e) => (
            StatusCode::BAD_REQUEST,
            Json(json!({
                "message": "Unknown or unsupported API version",
                "validations": [{"field": "version", "detail": e.to_string()}]
            })),
        )
            .into_response(),
        Ok(_) => (
            StatusCode::UPGRADE_REQUIRED,
            "WebSocket protocol violation: Connection header does not contain Upgrade",
        )
            .into_response(),
    }
}

/// `GET /me/rpc`: agent token, then WebSocket → yamux → dRPC serving [`FakeAgentApi`].
async fn agent_rpc(
    State(st): State<Arc<FakeState>>,
    headers: HeaderMap,
    RawQuery(q): RawQuery,
    ws: Result<WebSocketUpgrade, axum::extract::ws::rejection::WebSocketUpgradeRejection>,
) -> Response {
    if let Err(r) = agent_auth(&st, &headers, q.as_deref()) {
        return r;
    }
    let v = query_value(q.as_deref(), "version").unwrap_or_else(|| "2.0".into());
    if let Err(e) = coordinator::api::parse_version(&v, false) {
        return (
            StatusCode::BAD_REQUEST,
            Json(json!({
                "message": "Unknown or unsupported API version",
                "validations": [{"field": "version", "detail": e.to_string()}]
            })),
        )
            .into_response();
    }
    let ws = match ws {
        Ok(ws) => ws,
        Err(e) => return e.into_response(),
    };
    let role = query_value(q.as_deref(), "role").unwrap_or_default();
    st.rpc_sessions.lock().unwrap().push(role.clone());
    let cancel = st.cancel.clone();
    ws.on_upgrade(move |sock: WebSocket| async move {
        let (io, _handle) = WsIo::new(sock, WsConfig::server());
        let session = Session::server(io, yamux::Config::default());
        let handler: Arc<dyn Handler> = Arc::new(FakeAgentApi { st, role });
        tokio::select! {
            _ = drpc::serve(session, handler, DrpcConfig::default()) => {}
            _ = cancel.cancelled() => {}
        }
    })
}

/// A small `coder.agent.v2.Agent`: GetManifest, and an echo for every other Agent method.
struct FakeAgentApi {
    st: Arc<FakeState>,
    role: String,
}

impl Handler for FakeAgentApi {
    fn call(self: Arc<Self>, method: &str, mut stream: RpcStream) -> Option<CallFuture> {
        if self.st.tailnet.load(Ordering::SeqCst) {
            match method {
                tailnet_methods::COORDINATE => {
                    return Some(Box::pin(fake_coordinate(self.st.clone(), stream)))
                }
                tailnet_methods::POST_TELEMETRY => {
                    return Some(Box::pin(async move {
                        let req = stream
                            .recv_msg::<TelemetryRequest>()
                            .await?
                            .ok_or(RpcError::Closed)?;
                        self.st.telemetry.lock().unwrap().push(req);
                        stream.send_msg(&TelemetryResponse {}).await
                    }))
                }
                _ => {}
            }
        }
        if !method.starts_with("/coder.agent.v2.Agent/") {
            return None;
        }
        self.st
            .rpc_calls
            .lock()
            .unwrap()
            .push((method.to_string(), self.role.clone()));
        if method == proto::agent::v2::methods::GET_MANIFEST {
            return Some(Box::pin(async move {
                let _req = stream
                    .recv_msg::<proto::agent::v2::GetManifestRequest>()
                    .await?
                    .ok_or(RpcError::Closed)?;
                let derp = proto::derpmap::DerpMap::from_json(UPSTREAM_DERP_MAP.as_bytes())
                    .map_err(|e| RpcError::new(0, e.to_string()))?
                    .to_proto()
                    .map_err(|e| RpcError::new(0, e.to_string()))?;
                let m = proto::agent::v2::Manifest {
                    agent_id: Bytes::copy_from_slice(self.st.agent_id.as_bytes())
                        .to_vec()
                        .into(),
                    agent_name: self.st.agent_name.clone(),
                    owner_username: "alice".into(),
                    workspace_id: Bytes::copy_from_slice(self.st.workspace_id.as_bytes())
                        .to_vec()
                        .into(),
                    workspace_name: "dev".into(),
                    directory: "/home/coder".into(),
                    derp_map: Some(derp),
                    ..Default::default()
                };
                stream.send_msg(&m).await
            }));
        }
        Some(Box::pin(async move {
            let msg = stream.recv().await?.ok_or(RpcError::Closed)?;
            stream.send(msg).await
        }))
    }
}

/// `GET /api/v2/tailnet` (user token): with `set_tailnet(true)`, `PostTelemetry` (recorded like on
/// `/me/rpc`); every other method unimplemented.
async fn user_tailnet(
    State(st): State<Arc<FakeState>>,
    headers: HeaderMap,
    RawQuery(q): RawQuery,
    ws: Result<WebSocketUpgrade, axum::extract::ws::rejection::WebSocketUpgradeRejection>,
) -> Response {
    if let Err(r) = user_auth(&st, &headers, q.as_deref()) {
        return r;
    }
    let ws = match ws {
        Ok(ws) => ws,
        Err(e) => return e.into_response(),
    };
    st.tailnet_sessions.fetch_add(1, Ordering::SeqCst);
    let cancel = st.cancel.clone();
    ws.on_upgrade(move |sock: WebSocket| async move {
        let (io, _handle) = WsIo::new(sock, WsConfig::server());
        let session = Session::server(io, yamux::Config::default());
        let handler: Arc<dyn Handler> = Arc::new(FakeUserTailnet { st });
        tokio::select! {
            _ = drpc::serve(session, handler, DrpcConfig::default()) => {}
            _ = cancel.cancelled() => {}
        }
    })
}

struct FakeUserTailnet {
    st: Arc<FakeState>,
}

impl Handler for FakeUserTailnet {
    fn call(self: Arc<Self>, method: &str, mut stream: RpcStream) -> Option<CallFuture> {
        if !self.st.tailnet.load(Ordering::SeqCst) || method != tailnet_methods::POST_TELEMETRY {
            return None;
        }
        Some(Box::pin(async move {
            let req = stream
                .recv_msg::<TelemetryRequest>()
                .await?
                .ok_or(RpcError::Closed)?;
            self.st.telemetry.lock().unwrap().push(req);
            stream.send_msg(&TelemetryResponse {}).await
        }))
    }
}

/// coderd's `Coordinate` on `/me/rpc`: the agent, authorized as `AgentCoordinateeAuth`, in the
/// fake's coordinator until either side ends the stream.
async fn fake_coordinate(st: Arc<FakeState>, mut stream: RpcStream) -> Result<(), RpcError> {
    let end = CancellationToken::new();
    st.coordinate_streams.lock().unwrap().push(end.clone());
    st.coordinates_opened.fetch_add(1, Ordering::SeqCst);
    let (handle, mut rx) = st.graph.connect(
        st.agent_id,
        st.agent_name.clone(),
        CoordinateeAuth::Agent { id: st.agent_id },
    );
    loop {
        tokio::select! {
            _ = end.cancelled() => {
                drop(handle);
                let _ = stream.close().await;
                return Ok(());
            }
            req = stream.recv_msg::<CoordinateRequest>() => match req? {
                Some(req) => {
                    let _ = st.graph.handle(&handle, req);
                }
                None => return Ok(()),
            },
            resp = rx.recv() => match resp {
                Some(resp) => stream.send_msg(&resp).await?,
                None => {
                    let _ = stream.close().await;
                    return Ok(());
                }
            },
        }
    }
}

/// `ANY /api/v2/fake/echo/{*rest}`: describe the request (method, uri, headers, body).
async fn echo(State(st): State<Arc<FakeState>>, req: Request) -> Response {
    let method = req.method().to_string();
    let uri = req.uri().to_string();
    let path = req.uri().path().to_string();
    let mut headers = serde_json::Map::new();
    for (k, v) in req.headers() {
        let e = headers
            .entry(k.as_str().to_string())
            .or_insert_with(|| Value::Array(vec![]));
        if let Value::Array(a) = e {
            a.push(Value::String(String::from_utf8_lossy(v.as_bytes()).into()));
        }
    }
    let body = req.into_body().collect().await.unwrap().to_bytes();
    record_body(&st, &path, &body);
    Json(json!({
        "method": method,
        "uri": uri,
        "headers": headers,
        "body": String::from_utf8_lossy(&body),
        "body_len": body.len(),
    }))
    .into_response()
}

/// `POST /api/v2/fake/upload`: read the body as a stream; report size and SHA-256.
async fn upload(req: Request) -> Response {
    let mut body = req.into_body().into_data_stream();
    let mut h = sha2::Sha256::new();
    let mut n = 0u64;
    while let Some(chunk) = body.next().await {
        match chunk {
            Ok(c) => {
                n += c.len() as u64;
                h.update(&c);
            }
            Err(e) => {
                return coder_error(
                    StatusCode::BAD_REQUEST,
                    "body read failed",
                    Some(&e.to_string()),
                )
            }
        }
    }
    Json(json!({"bytes": n, "sha256": hex::encode(h.finalize())})).into_response()
}

/// `GET /api/v2/fake/stream?chunks=N&interval_ms=M`: N chunks `chunk i\n`, one per interval.
async fn stream(RawQuery(q): RawQuery) -> Response {
    let n: u64 = query_value(q.as_deref(), "chunks")
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let ms: u64 = query_value(q.as_deref(), "interval_ms")
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);
    let s = futures_util::stream::unfold(0u64, move |i| async move {
        if i >= n {
            return None;
        }
        if i > 0 {
            tokio::time::sleep(Duration::from_millis(ms)).await;
        }
        Some((
            Ok::<_, std::io::Error>(Bytes::from(format!("chunk {i}\n"))),
            i + 1,
        ))
    });
    (
        [(http::header::CONTENT_TYPE, "text/plain")],
        Body::from_stream(s),
    )
        .into_response()
}
