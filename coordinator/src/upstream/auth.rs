//! [`UpstreamAuthenticator`]: tokens are checked by asking the upstream coderd, with a
//! single-flight TTL cache in front.
//!
//! Why: next to a real coderd, tailnetd has no database, so coderd stays the only judge of who
//! is who and who may reach what:
//! - **Agent token → agent id.** First the legacy `GET /api/v2/workspaceagents/me/manifest`
//!   (JSON with `agent_id`, `agent_name`, `owner_name`, `workspace_name`). Current coderd removed
//!   it (v2.13) and answers 404/405/410; then tailnetd dials
//!   `GET /api/v2/workspaceagents/me/rpc?version=2.0&role=tailnetd` with the agent's token and
//!   calls `/coder.agent.v2.Agent/GetManifest` over its own WebSocket → yamux → dRPC client
//!   (`Manifest.agent_id`, field 1). `role=tailnetd` (not `agent`) keeps coderd from treating the
//!   call as the agent connecting (no `first/last_connected_at` updates, no outdated-build kick).
//!   Once an upstream has answered 404/405/410 the manifest request is skipped for it.
//! - **User token → user.** `GET /api/v2/users/me` (`id`, `username`).
//! - **May this user reach this agent?** coderd's rule is RBAC `ssh` on the agent's workspace. We
//!   ask with the *code-order probe*: a plain (non-upgrade) `GET
//!   /api/v2/workspaceagents/{id}/coordinate?version=99.0` with the user's token. coderd's handler
//!   checks, in order, the token (401), the agent's existence and read access (404), `ssh` on the
//!   workspace (404), browser-only mode (409), and only then the version, so a **400 whose body is
//!   the version-mismatch error means "authorized for ssh"** and nothing is opened. It is exact
//!   (coderd's own check, including ACLs and the browser-only switch) and costs one request,
//!   whereas `POST /api/v2/authcheck` would first need the workspace id, which no agent endpoint
//!   returns (only `resource_id`), i.e. more requests and a chain of lookups that could disagree
//!   with coderd. Any other answer (another 400, 5xx) fails closed as "unavailable". The 409
//!   (browser-only) answer becomes [`AuthError::Conflict`] with coderd's message, so the caller
//!   gets the same 409.
//!
//!   The probe is sent with the token the [`UserIdentity`] was resolved from (it travels in the
//!   identity), so the answer is coderd's for that very credential: two tokens of one user with
//!   different scopes get different answers, as they would from coderd.
//!
//! Caching: decisions are keyed by (SHA-256 of the token, agent), positive ones kept
//! `auth_ttl_ok`, negative ones (token rejected, access denied, browser-only) `auth_ttl_err`;
//! concurrent misses for one key share one upstream request. Upstream failures (unreachable,
//! timeout, 5xx, anything unexpected) become [`AuthError::Unavailable`] (503 to the caller; a
//! transport failure's error chain is logged, not answered) and
//! are never cached. Sessions already open are never re-checked here, so upstream trouble cannot
//! end them.
//!
//! This module must never log or store a token (the cache holds hashes and token-less user
//! records; the identity handed back carries the caller's own token), and never hold a lock
//! across `.await`.

use std::sync::Arc;
use std::time::Duration;

use http::{Method, StatusCode};
use http_body_util::BodyExt;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use uuid::Uuid;

use super::cache::DecisionCache;
use super::{Upstream, UpstreamError};
use crate::auth::{
    AgentIdentity, AuthError, AuthFuture, Authenticator, SessionToken, UserIdentity,
};
use crate::rpc::drpc::{DrpcConfig, RpcClient};
use crate::rpc::wsio::{WsConfig, WsIo};
use crate::rpc::yamux;

/// Largest upstream JSON answer read by the authenticator.
const MAX_AUTH_BODY: usize = 1 << 20;

type TokenHash = [u8; 32];

fn hash(token: &str) -> TokenHash {
    Sha256::digest(token.as_bytes()).into()
}

#[derive(Debug, Clone, Hash, PartialEq, Eq)]
enum Key {
    Agent(TokenHash),
    User(TokenHash),
    Reach(TokenHash, Uuid),
}

/// A user as cached: the identity without the token (the cache never holds one).
#[derive(Debug, Clone)]
struct CachedUser {
    user_id: Uuid,
    username: String,
}

#[derive(Debug, Clone)]
enum Decision {
    Agent(Result<AgentIdentity, AuthError>),
    User(Result<CachedUser, AuthError>),
    Reach(Result<bool, AuthError>),
}

/// Delegates every check to the upstream coderd (see the module documentation).
pub struct UpstreamAuthenticator {
    up: Upstream,
    cache: DecisionCache<Key, Decision>,
    /// Set once the upstream answered 404/405/410 on `/me/manifest`.
    manifest_gone: std::sync::atomic::AtomicBool,
}

impl std::fmt::Debug for UpstreamAuthenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamAuthenticator")
            .field("upstream", &self.up)
            .finish_non_exhaustive()
    }
}

#[derive(Deserialize)]
struct ManifestJson {
    agent_id: Uuid,
    #[serde(default)]
    agent_name: String,
    #[serde(default)]
    owner_name: String,
    #[serde(default)]
    workspace_name: String,
}

#[derive(Deserialize)]
struct UserJson {
    id: Uuid,
    #[serde(default)]
    username: String,
}

#[derive(Deserialize, Default)]
struct CoderResponse {
    #[serde(default)]
    message: String,
    #[serde(default)]
    detail: Option<String>,
    #[serde(default)]
    validations: Vec<CoderValidation>,
}

#[derive(Deserialize)]
struct CoderValidation {
    #[serde(default)]
    field: String,
}

fn unavailable(e: impl std::fmt::Display) -> AuthError {
    AuthError::Unavailable(format!("upstream Coder server: {e}"))
}

/// Asking the upstream failed before it answered: the error chain (OS errors, addresses) goes to
/// the log; the caller, not authenticated yet, learns only what failed.
fn unreachable(e: impl std::fmt::Display) -> AuthError {
    tracing::warn!(error = %e, "asking the upstream Coder server failed");
    AuthError::Unavailable("upstream Coder server could not be asked".into())
}

fn display_name(owner: &str, workspace: &str, agent: &str, id: Uuid) -> String {
    if owner.is_empty() && workspace.is_empty() && agent.is_empty() {
        format!("agent-{id}")
    } else {
        format!("{owner}-{workspace}-{agent}")
    }
}

impl UpstreamAuthenticator {
    /// An authenticator asking `upstream`, with its cache TTLs and size from its configuration.
    pub fn new(upstream: Upstream) -> Self {
        let cfg = upstream.config();
        let cache = DecisionCache::new(cfg.auth_cache_entries, Some(upstream.metrics().clone()));
        Self {
            up: upstream,
            cache,
            manifest_gone: std::sync::atomic::AtomicBool::new(false),
        }
    }

    fn ttl_ok(&self) -> Duration {
        self.up.config().auth_ttl_ok
    }

    fn ttl_err(&self) -> Duration {
        self.up.config().auth_ttl_err
    }

    /// Positive → ok TTL; rejected/denied → error TTL; unavailable → not cached.
    fn ttl(&self, d: &Decision) -> Option<Duration> {
        let (ok, err) = (self.ttl_ok(), self.ttl_err());
        let r: Result<bool, &AuthError> = match d {
            Decision::Agent(r) => r.as_ref().map(|_| true),
            Decision::User(r) => r.as_ref().map(|_| true),
            Decision::Reach(r) => r.as_ref().copied(),
        };
        match r {
            Ok(true) => Some(ok),
            Ok(false) => Some(err),
            Err(AuthError::Unavailable(_)) => None,
            Err(_) => Some(err),
        }
    }

    /// GET `path` with `token`; returns status and (bounded) body.
    async fn get(
        &self,
        kind: &str,
        path: &str,
        token: &str,
    ) -> Result<(StatusCode, bytes::Bytes), UpstreamError> {
        let req = self.up.token_request(Method::GET, path, token)?;
        let resp = self.up.send(kind, req).await?;
        let status = resp.status();
        let deadline = self.up.config().header_timeout;
        let body = http_body_util::Limited::new(resp.into_body(), MAX_AUTH_BODY);
        let collected = tokio::time::timeout(deadline, body.collect())
            .await
            .map_err(|_| UpstreamError::Timeout(deadline))?
            .map_err(|e| UpstreamError::Request(format!("reading answer: {e}")))?;
        Ok((status, collected.to_bytes()))
    }

    /// A 401/403 from the upstream, as Coder worded it.
    fn rejected(body: &[u8], fallback: AuthError) -> AuthError {
        match serde_json::from_slice::<CoderResponse>(body) {
            Ok(r) if !r.message.is_empty() => AuthError::InvalidToken {
                message: r.message,
                detail: r.detail,
            },
            _ => fallback,
        }
    }

    async fn fetch_agent(&self, token: &str) -> Result<AgentIdentity, AuthError> {
        use std::sync::atomic::Ordering;
        if !self.manifest_gone.load(Ordering::Relaxed) {
            let (status, body) = self
                .get("auth_agent", "/api/v2/workspaceagents/me/manifest", token)
                .await
                .map_err(unreachable)?;
            match status {
                StatusCode::OK => {
                    let m: ManifestJson = serde_json::from_slice(&body)
                        .map_err(|e| unavailable(format!("manifest answer: {e}")))?;
                    return Ok(AgentIdentity {
                        agent_id: m.agent_id,
                        name: display_name(
                            &m.owner_name,
                            &m.workspace_name,
                            &m.agent_name,
                            m.agent_id,
                        ),
                    });
                }
                StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => {
                    return Err(Self::rejected(&body, crate::auth::agent_not_authorized()));
                }
                StatusCode::NOT_FOUND | StatusCode::METHOD_NOT_ALLOWED | StatusCode::GONE => {
                    tracing::info!(
                        status = status.as_u16(),
                        "upstream has no /me/manifest; using /me/rpc GetManifest from now on"
                    );
                    self.manifest_gone.store(true, Ordering::Relaxed);
                }
                s => return Err(unavailable(format!("/me/manifest answered {s}"))),
            }
        }
        self.agent_via_rpc(token).await
    }

    /// Dial `/me/rpc?version=2.0&role=tailnetd` and call `GetManifest`.
    async fn agent_via_rpc(&self, token: &str) -> Result<AgentIdentity, AuthError> {
        let deadline = self.up.config().header_timeout;
        let fut = async {
            let mut req = self
                .up
                .token_request(
                    Method::GET,
                    "/api/v2/workspaceagents/me/rpc?version=2.0&role=tailnetd",
                    token,
                )
                .map_err(unreachable)?;
            let key = tokio_tungstenite::tungstenite::handshake::client::generate_key();
            let h = req.headers_mut();
            h.insert(
                http::header::CONNECTION,
                http::HeaderValue::from_static("Upgrade"),
            );
            h.insert(
                http::header::UPGRADE,
                http::HeaderValue::from_static("websocket"),
            );
            h.insert(
                "sec-websocket-version",
                http::HeaderValue::from_static("13"),
            );
            if let Ok(v) = http::HeaderValue::from_str(&key) {
                h.insert("sec-websocket-key", v);
            }
            let mut resp = self.up.send("agent_rpc", req).await.map_err(unreachable)?;
            let status = resp.status();
            if status != StatusCode::SWITCHING_PROTOCOLS {
                let body = http_body_util::Limited::new(resp.into_body(), MAX_AUTH_BODY)
                    .collect()
                    .await
                    .map(|c| c.to_bytes())
                    .unwrap_or_default();
                return match status {
                    StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => {
                        Err(Self::rejected(&body, crate::auth::agent_not_authorized()))
                    }
                    s => Err(unavailable(format!("/me/rpc answered {s}"))),
                };
            }
            let upgraded = hyper::upgrade::on(&mut resp).await.map_err(unreachable)?;
            let ws = tokio_tungstenite::WebSocketStream::from_raw_socket(
                hyper_util::rt::TokioIo::new(upgraded),
                tokio_tungstenite::tungstenite::protocol::Role::Client,
                None,
            )
            .await;
            let (io, ws_handle) = WsIo::new(ws, WsConfig::client());
            let session = yamux::Session::client(io, yamux::Config::default());
            let client = RpcClient::new(session, DrpcConfig::default());
            let res = client
                .invoke_unary::<_, proto::agent::v2::Manifest>(
                    proto::agent::v2::methods::GET_MANIFEST,
                    &proto::agent::v2::GetManifestRequest::default(),
                )
                .await;
            let _ = client.session().close().await;
            let _ = ws_handle.close(crate::rpc::wsio::CLOSE_NORMAL, "").await;
            let m = res.map_err(|e| unavailable(format!("GetManifest: {e}")))?;
            let id = Uuid::from_slice(&m.agent_id)
                .map_err(|_| unavailable("GetManifest: agent_id is not a UUID"))?;
            Ok(AgentIdentity {
                agent_id: id,
                name: display_name(&m.owner_username, &m.workspace_name, &m.agent_name, id),
            })
        };
        match tokio::time::timeout(deadline.saturating_mul(2), fut).await {
            Ok(r) => r,
            Err(_) => Err(unavailable("/me/rpc GetManifest timed out")),
        }
    }

    async fn fetch_user(&self, token: &str) -> Result<CachedUser, AuthError> {
        let (status, body) = self
            .get("auth_user", "/api/v2/users/me", token)
            .await
            .map_err(unreachable)?;
        match status {
            StatusCode::OK => {
                let u: UserJson = serde_json::from_slice(&body)
                    .map_err(|e| unavailable(format!("users/me answer: {e}")))?;
                Ok(CachedUser {
                    user_id: u.id,
                    username: u.username,
                })
            }
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => {
                Err(Self::rejected(&body, crate::auth::user_signed_out()))
            }
            s => Err(unavailable(format!("/api/v2/users/me answered {s}"))),
        }
    }

    async fn probe(&self, token: &str, agent: Uuid) -> Result<bool, AuthError> {
        let path = format!("/api/v2/workspaceagents/{agent}/coordinate?version=99.0");
        let (status, body) = self
            .get("auth_reach", &path, token)
            .await
            .map_err(unreachable)?;
        match status {
            StatusCode::BAD_REQUEST => {
                let r: CoderResponse = serde_json::from_slice(&body).unwrap_or_default();
                let version_error = r.message == crate::api::errors::VERSION_MISMATCH_MESSAGE
                    || r.validations.iter().any(|v| v.field == "version");
                if version_error {
                    Ok(true)
                } else {
                    Err(unavailable(format!(
                        "coordinate probe answered 400 {:?}",
                        r.message
                    )))
                }
            }
            StatusCode::NOT_FOUND => Ok(false),
            StatusCode::CONFLICT => {
                tracing::debug!(agent = %agent, "upstream is browser-only; tunnel refused");
                let r: CoderResponse = serde_json::from_slice(&body).unwrap_or_default();
                let message = if r.message.is_empty() {
                    crate::auth::BROWSER_ONLY_MESSAGE.to_string()
                } else {
                    r.message
                };
                Err(AuthError::Conflict { message })
            }
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => {
                Err(Self::rejected(&body, crate::auth::user_signed_out()))
            }
            s => Err(unavailable(format!("coordinate probe answered {s}"))),
        }
    }

    /// May the holder of `token` reach `agent`? (Exact; cached per token and agent.)
    pub async fn token_may_reach(&self, token: &str, agent: Uuid) -> Result<bool, AuthError> {
        let d = self
            .cache
            .get_or_fetch(
                Key::Reach(hash(token), agent),
                |d| self.ttl(d),
                || async { Decision::Reach(self.probe(token, agent).await) },
            )
            .await;
        match d {
            Decision::Reach(r) => r,
            _ => Err(unavailable("cache type mismatch")),
        }
    }
}

/// Whether `token` can be sent on in a header at all. One that cannot (CR, LF or other control
/// bytes, which arrive percent-encoded in a query or inside a cookie) is no credential coderd
/// could know: it is answered as an invalid token (401), never asked about, never a 503.
fn sendable(token: &str) -> bool {
    http::HeaderValue::from_str(token).is_ok()
}

impl Authenticator for UpstreamAuthenticator {
    fn agent<'a>(&'a self, token: &'a str) -> AuthFuture<'a, AgentIdentity> {
        Box::pin(async move {
            if !sendable(token) {
                return Err(crate::auth::agent_not_authorized());
            }
            let d = self
                .cache
                .get_or_fetch(
                    Key::Agent(hash(token)),
                    |d| self.ttl(d),
                    || async { Decision::Agent(self.fetch_agent(token).await) },
                )
                .await;
            match d {
                Decision::Agent(r) => r,
                _ => Err(unavailable("cache type mismatch")),
            }
        })
    }

    fn user<'a>(&'a self, token: &'a str) -> AuthFuture<'a, UserIdentity> {
        Box::pin(async move {
            if !sendable(token) {
                return Err(crate::auth::user_signed_out());
            }
            let d = self
                .cache
                .get_or_fetch(
                    Key::User(hash(token)),
                    |d| self.ttl(d),
                    || async { Decision::User(self.fetch_user(token).await) },
                )
                .await;
            match d {
                Decision::User(r) => r.map(|u| UserIdentity {
                    user_id: u.user_id,
                    username: u.username,
                    token: SessionToken::new(token),
                }),
                _ => Err(unavailable("cache type mismatch")),
            }
        })
    }

    fn user_may_reach<'a>(
        &'a self,
        user: &'a UserIdentity,
        agent_id: Uuid,
    ) -> AuthFuture<'a, bool> {
        Box::pin(self.token_may_reach(user.token.expose(), agent_id))
    }
}

/// Convenience: an [`UpstreamAuthenticator`] as the trait object [`crate::Coordinator::new`] takes.
pub fn authenticator(upstream: Upstream) -> Arc<dyn Authenticator> {
    Arc::new(UpstreamAuthenticator::new(upstream))
}

#[cfg(test)]
mod sec_edge_tests {
    use super::*;
    use crate::upstream::UpstreamConfig;

    /// Issue 14, finding 6: a token that cannot travel in a header (CR/LF, from a cookie or a
    /// percent-encoded query) is an invalid token (401), not an unavailable upstream (503).
    #[tokio::test]
    async fn token_with_cr_lf_is_invalid_not_unavailable() {
        let registry = prometheus::Registry::new();
        let up = Upstream::new(
            UpstreamConfig {
                url: "http://127.0.0.1:9".into(),
                ..UpstreamConfig::default()
            },
            &registry,
        )
        .unwrap();
        let auth = UpstreamAuthenticator::new(up);
        let bad = "abc\r\nX-Injected: 1";
        assert!(matches!(
            auth.user(bad).await,
            Err(AuthError::InvalidToken { .. })
        ));
        assert!(matches!(
            auth.agent(bad).await,
            Err(AuthError::InvalidToken { .. })
        ));
    }

    /// Issue 14, finding 6: the 503 detail for an unreachable upstream says what failed, without
    /// the error chain (OS error, address), which is logged instead.
    #[tokio::test]
    async fn unreachable_upstream_detail_has_no_error_chain() {
        let registry = prometheus::Registry::new();
        let up = Upstream::new(
            UpstreamConfig {
                url: "http://127.0.0.1:9".into(),
                ..UpstreamConfig::default()
            },
            &registry,
        )
        .unwrap();
        let auth = UpstreamAuthenticator::new(up);
        let Err(AuthError::Unavailable(detail)) = auth.user("some-token").await else {
            panic!("an unreachable upstream must be unavailable");
        };
        assert!(detail.contains("upstream Coder server"), "{detail}");
        for leak in ["os error", "refused", "tcp connect", "127.0.0.1"] {
            assert!(!detail.contains(leak), "{leak:?} in {detail}");
        }
    }
}
