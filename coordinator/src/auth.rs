//! Who is calling: token extraction in Coder's order and the [`Authenticator`] trait that turns a
//! token into an agent or user identity.
//!
//! Why: the coordinator must accept exactly the credentials real Coder agents and clients send
//! (cookie, query, `Coder-Session-Token` header, `Authorization: Bearer`, `access_token` query) and
//! answer with the status codes they treat as permanent or retryable. The check itself sits behind a
//! trait so that a later issue can delegate it to an upstream Coder server; [`StaticAuthenticator`]
//! serves the tokens written in the configuration (and the ones `tailnetd dev` generates).
//!
//! This module must never log a token, and never hold a lock across `.await` (the static
//! authenticator answers synchronously from immutable maps).

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::pin::Pin;

use http::HeaderMap;
use serde::Deserialize;
use uuid::Uuid;

/// Name of the cookie (and query parameter) Coder reads the session token from.
pub const SESSION_TOKEN_COOKIE: &str = "coder_session_token";
/// Header Coder's SDKs send the session token in.
pub const SESSION_TOKEN_HEADER: &str = "Coder-Session-Token";
/// Query parameter of last resort (`httpmw.APITokenFromRequest`).
pub const ACCESS_TOKEN_QUERY: &str = "access_token";

/// Coder's message for a signed-out user (`httpmw.SignedOutErrorMessage`).
pub const SIGNED_OUT_MESSAGE: &str =
    "You are signed out or your session has expired. Please sign in again to continue.";
/// Coder's 409 when the enterprise browser-only feature refuses non-browser connections.
pub const BROWSER_ONLY_MESSAGE: &str = "Non-browser connections are disabled for your deployment.";

/// A boxed future so that [`Authenticator`] stays object safe (`Arc<dyn Authenticator>`).
pub type AuthFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, AuthError>> + Send + 'a>>;

/// The workspace agent an agent token belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentIdentity {
    /// The agent's UUID: its peer id in the graph.
    pub agent_id: Uuid,
    /// Display name, `<owner>-<workspace>-<agent>` in Coder.
    pub name: String,
}

/// A user's session token, kept next to the identity it resolved to so that later checks ask
/// with the same credential. `Debug` and `Display` never show it; only [`SessionToken::expose`]
/// does, for the code that must send it on.
#[derive(Clone, PartialEq, Eq)]
pub struct SessionToken(String);

impl SessionToken {
    /// Wrap a token as presented by the caller.
    pub fn new(token: impl Into<String>) -> Self {
        Self(token.into())
    }

    /// The token itself: only to hand it to the backend that checks it, never to log it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for SessionToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SessionToken(<redacted>)")
    }
}

impl std::fmt::Display for SessionToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

/// The user a session token belongs to, with that token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserIdentity {
    /// Stable user id (Coder's user UUID).
    pub user_id: Uuid,
    /// Username, for logs.
    pub username: String,
    /// The credential this identity was resolved from. [`Authenticator::user_may_reach`] decides
    /// for it, not for the user as a whole: one user's tokens may carry different rights (Coder's
    /// scoped API keys). Redacted in `Debug`.
    pub token: SessionToken,
}

/// Why a token was not accepted. Each variant maps onto the HTTP status Coder uses.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum AuthError {
    /// The token is malformed, unknown or expired: 401.
    #[error("{message}")]
    InvalidToken {
        /// Coder's top-level message.
        message: String,
        /// Optional detail.
        detail: Option<String>,
    },
    /// The caller is authenticated but may not reach the resource: 404 (Coder hides existence).
    #[error("forbidden")]
    Forbidden,
    /// The deployment refuses this kind of connection (Coder's browser-only mode): 409 with the
    /// backend's message.
    #[error("{message}")]
    Conflict {
        /// Coder's top-level message ([`BROWSER_ONLY_MESSAGE`]).
        message: String,
    },
    /// The backend that checks tokens cannot answer right now: 503 (clients retry).
    #[error("authentication backend unavailable: {0}")]
    Unavailable(String),
}

impl AuthError {
    /// A short label for the `coordinator_auth_failures_total{reason}` metric.
    pub fn reason(&self) -> &'static str {
        match self {
            AuthError::InvalidToken { .. } => "invalid_token",
            AuthError::Forbidden => "forbidden",
            AuthError::Conflict { .. } => "conflict",
            AuthError::Unavailable(_) => "unavailable",
        }
    }
}

/// Turns tokens into identities. Implementations must be cheap to call concurrently.
pub trait Authenticator: Send + Sync + 'static {
    /// Resolve an agent token (already known to be a UUID) to its agent.
    fn agent<'a>(&'a self, token: &'a str) -> AuthFuture<'a, AgentIdentity>;
    /// Resolve a user session token to its user; the identity carries `token` along.
    fn user<'a>(&'a self, token: &'a str) -> AuthFuture<'a, UserIdentity>;
    /// May the holder of `user.token` open a tunnel to `agent_id` (Coder: RBAC `ssh` on the
    /// agent's workspace, as allowed by that token's scope)? `user` comes from [`Self::user`].
    fn user_may_reach<'a>(&'a self, user: &'a UserIdentity, agent_id: Uuid)
        -> AuthFuture<'a, bool>;
}

/// Extract the session token in Coder's order: cookie `coder_session_token`, query
/// `coder_session_token`, header `Coder-Session-Token`, `Authorization: Bearer`, query
/// `access_token`. Empty values count as absent.
pub fn token_from_request(headers: &HeaderMap, query: Option<&str>) -> Option<String> {
    if let Some(v) = cookie_value(headers, SESSION_TOKEN_COOKIE) {
        return Some(v);
    }
    if let Some(v) = query_value(query, SESSION_TOKEN_COOKIE) {
        return Some(v);
    }
    if let Some(v) = headers
        .get(SESSION_TOKEN_HEADER)
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty())
    {
        return Some(v.to_string());
    }
    for value in headers.get_all(http::header::AUTHORIZATION) {
        let Ok(text) = value.to_str() else { continue };
        let mut parts = text.split(' ');
        if let (Some(scheme), Some(tok), None) = (parts.next(), parts.next(), parts.next()) {
            if scheme.eq_ignore_ascii_case("bearer") && !tok.is_empty() {
                return Some(tok.to_string());
            }
        }
        break;
    }
    query_value(query, ACCESS_TOKEN_QUERY)
}

/// First non-empty value of cookie `name` across all `Cookie` headers.
fn cookie_value(headers: &HeaderMap, name: &str) -> Option<String> {
    for value in headers.get_all(http::header::COOKIE) {
        let Ok(text) = value.to_str() else { continue };
        for pair in text.split(';') {
            let pair = pair.trim();
            if let Some((k, v)) = pair.split_once('=') {
                if k.trim() == name {
                    let v = v.trim().trim_matches('"');
                    if !v.is_empty() {
                        return Some(v.to_string());
                    }
                }
            }
        }
    }
    None
}

/// First non-empty value of query parameter `name` (form-urlencoded).
pub fn query_value(query: Option<&str>, name: &str) -> Option<String> {
    let query = query?;
    for pair in query.split('&') {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        if percent_decode(k).as_deref() == Some(name) {
            return percent_decode(v).filter(|v| !v.is_empty());
        }
    }
    None
}

/// Decode `application/x-www-form-urlencoded` text (`+` is a space). `None` if not UTF-8 or
/// a `%` escape is broken.
fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let hi = bytes.get(i + 1).and_then(|b| (*b as char).to_digit(16))?;
                let lo = bytes.get(i + 2).and_then(|b| (*b as char).to_digit(16))?;
                out.push((hi * 16 + lo) as u8);
                i += 2;
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8(out).ok()
}

/// One agent in the static configuration.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct StaticAgent {
    /// The agent token (a UUID, as Coder's agents send).
    pub token: Uuid,
    /// The agent id (its peer id).
    pub id: Uuid,
    /// Display name; defaults to `agent-<id>`.
    #[serde(default)]
    pub name: Option<String>,
}

/// Which agents a static user may reach.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(untagged)]
pub enum AgentAccess {
    /// `"all"` or `"known"`.
    Keyword(AccessKeyword),
    /// Exactly these agent ids.
    Only(Vec<Uuid>),
}

/// The keyword forms of `agents = ...` in the configuration.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum AccessKeyword {
    /// `"all"`: any agent id, configured or not (what Coder's coordinator conformance cases need:
    /// they tunnel to ids no agent token names).
    All,
    /// `"known"`: exactly the agents of `[[auth.agents]]`; a dial to any other id gets coderd's
    /// 404, as a real deployment answers for an agent that does not exist.
    Known,
}

/// One user in the static configuration.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct StaticUser {
    /// The session token, Coder's `<10 chars>-<22 chars>` form (any non-empty string is accepted).
    pub token: String,
    /// Username for logs; defaults to `user`.
    #[serde(default)]
    pub name: Option<String>,
    /// User id; defaults to a stable id derived from the token position.
    #[serde(default)]
    pub id: Option<Uuid>,
    /// Agents this user may reach.
    pub agents: AgentAccess,
}

/// The `[auth]` table of the configuration.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct StaticAuthConfig {
    /// Agent tokens.
    #[serde(default)]
    pub agents: Vec<StaticAgent>,
    /// User tokens.
    #[serde(default)]
    pub users: Vec<StaticUser>,
}

/// Errors building a [`StaticAuthenticator`].
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum StaticAuthError {
    /// Two agents share a token.
    #[error("duplicate agent token for agent {0}")]
    DuplicateAgentToken(Uuid),
    /// Two users share a token.
    #[error("duplicate user token (user {0})")]
    DuplicateUserToken(String),
    /// A user token is empty.
    #[error("empty user token (user {0})")]
    EmptyUserToken(String),
}

#[derive(Debug, Clone)]
struct UserEntry {
    user_id: Uuid,
    username: String,
    all: bool,
    agents: HashSet<Uuid>,
}

/// Answers from tokens listed in the configuration. Immutable after construction.
#[derive(Debug, Default)]
pub struct StaticAuthenticator {
    agents: HashMap<Uuid, AgentIdentity>,
    users: HashMap<String, UserEntry>,
    users_by_id: HashMap<Uuid, String>,
}

impl StaticAuthenticator {
    /// Build from configuration; rejects duplicate tokens.
    pub fn new(config: &StaticAuthConfig) -> Result<Self, StaticAuthError> {
        let mut agents = HashMap::new();
        for a in &config.agents {
            let identity = AgentIdentity {
                agent_id: a.id,
                name: a.name.clone().unwrap_or_else(|| format!("agent-{}", a.id)),
            };
            if agents.insert(a.token, identity).is_some() {
                return Err(StaticAuthError::DuplicateAgentToken(a.id));
            }
        }
        let mut users = HashMap::new();
        let mut users_by_id = HashMap::new();
        for (i, u) in config.users.iter().enumerate() {
            let username = u.name.clone().unwrap_or_else(|| format!("user{i}"));
            if u.token.is_empty() {
                return Err(StaticAuthError::EmptyUserToken(username));
            }
            let user_id = u.id.unwrap_or_else(|| {
                // Stable per configuration position so logs stay comparable across restarts.
                let mut b = [0u8; 16];
                b[8..].copy_from_slice(&(i as u64 + 1).to_be_bytes());
                uuid::Builder::from_random_bytes(b).into_uuid()
            });
            let (all, set) = match &u.agents {
                AgentAccess::Keyword(AccessKeyword::All) => (true, HashSet::new()),
                AgentAccess::Keyword(AccessKeyword::Known) => {
                    (false, config.agents.iter().map(|a| a.id).collect())
                }
                AgentAccess::Only(ids) => (false, ids.iter().copied().collect()),
            };
            let entry = UserEntry {
                user_id,
                username: username.clone(),
                all,
                agents: set,
            };
            if users.insert(u.token.clone(), entry).is_some() {
                return Err(StaticAuthError::DuplicateUserToken(username));
            }
            users_by_id.insert(user_id, u.token.clone());
        }
        Ok(Self {
            agents,
            users,
            users_by_id,
        })
    }
}

/// Coder's answer for an agent token that matches no agent.
pub fn agent_not_authorized() -> AuthError {
    AuthError::InvalidToken {
        message: "Workspace agent not authorized.".into(),
        detail: Some(
            "The agent cannot authenticate until the workspace provision job has been completed. \
             If the job is no longer running, this agent is invalid."
                .into(),
        ),
    }
}

/// Coder's answer for a user token that matches no session.
pub fn user_signed_out() -> AuthError {
    AuthError::InvalidToken {
        message: SIGNED_OUT_MESSAGE.into(),
        detail: Some("API key is invalid.".into()),
    }
}

impl Authenticator for StaticAuthenticator {
    fn agent<'a>(&'a self, token: &'a str) -> AuthFuture<'a, AgentIdentity> {
        let res = Uuid::parse_str(token)
            .ok()
            .and_then(|t| self.agents.get(&t).cloned())
            .ok_or_else(agent_not_authorized);
        Box::pin(std::future::ready(res))
    }

    fn user<'a>(&'a self, token: &'a str) -> AuthFuture<'a, UserIdentity> {
        let res = self
            .users
            .get(token)
            .map(|e| UserIdentity {
                user_id: e.user_id,
                username: e.username.clone(),
                token: SessionToken::new(token),
            })
            .ok_or_else(user_signed_out);
        Box::pin(std::future::ready(res))
    }

    fn user_may_reach<'a>(
        &'a self,
        user: &'a UserIdentity,
        agent_id: Uuid,
    ) -> AuthFuture<'a, bool> {
        // Rights are configured per user entry, found by id; `user.token` is not needed.
        let res = match self
            .users_by_id
            .get(&user.user_id)
            .and_then(|t| self.users.get(t))
        {
            Some(e) => Ok(e.all || e.agents.contains(&agent_id)),
            None => Err(user_signed_out()),
        };
        Box::pin(std::future::ready(res))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        h
    }

    #[test]
    fn token_order_matches_coder() {
        let all = headers(&[
            ("cookie", "a=b; coder_session_token=cookie"),
            ("coder-session-token", "header"),
            ("authorization", "Bearer bearer"),
        ]);
        let q = Some("coder_session_token=query&access_token=access");
        assert_eq!(token_from_request(&all, q).as_deref(), Some("cookie"));
        let no_cookie = headers(&[
            ("coder-session-token", "header"),
            ("authorization", "Bearer bearer"),
        ]);
        assert_eq!(token_from_request(&no_cookie, q).as_deref(), Some("query"));
        assert_eq!(
            token_from_request(&no_cookie, Some("access_token=x")).as_deref(),
            Some("header")
        );
        let bearer = headers(&[("authorization", "bearer tok")]);
        assert_eq!(
            token_from_request(&bearer, Some("access_token=x")).as_deref(),
            Some("tok")
        );
        assert_eq!(
            token_from_request(&HeaderMap::new(), Some("x=1&access_token=a%2Bb")).as_deref(),
            Some("a+b")
        );
        assert_eq!(token_from_request(&HeaderMap::new(), None), None);
        let empty = headers(&[
            ("cookie", "coder_session_token="),
            ("coder-session-token", ""),
        ]);
        assert_eq!(
            token_from_request(&empty, Some("coder_session_token=")),
            None
        );
    }

    #[tokio::test]
    async fn static_authenticator() {
        let agent = Uuid::new_v4();
        let token = Uuid::new_v4();
        let other = Uuid::new_v4();
        let cfg: StaticAuthConfig = toml::from_str(&format!(
            r#"
            [[agents]]
            token = "{token}"
            id = "{agent}"
            name = "me-ws-main"
            [[users]]
            token = "aaaaaaaaaa-bbbbbbbbbbbbbbbbbbbbbb"
            agents = "all"
            [[users]]
            token = "cccccccccc-dddddddddddddddddddddd"
            name = "bob"
            agents = ["{agent}"]
            "#
        ))
        .unwrap();
        let a = StaticAuthenticator::new(&cfg).unwrap();
        let id = a.agent(&token.to_string()).await.unwrap();
        assert_eq!(id.agent_id, agent);
        assert_eq!(id.name, "me-ws-main");
        assert_eq!(
            a.agent(&Uuid::new_v4().to_string()).await,
            Err(agent_not_authorized())
        );
        let alice = a.user("aaaaaaaaaa-bbbbbbbbbbbbbbbbbbbbbb").await.unwrap();
        let bob = a.user("cccccccccc-dddddddddddddddddddddd").await.unwrap();
        assert_eq!(bob.username, "bob");
        assert!(a.user_may_reach(&alice, other).await.unwrap());
        assert!(a.user_may_reach(&bob, agent).await.unwrap());
        assert!(!a.user_may_reach(&bob, other).await.unwrap());
        assert_eq!(a.user("nope").await, Err(user_signed_out()));
        // The identity carries its token, which never shows in logs.
        assert_eq!(bob.token.expose(), "cccccccccc-dddddddddddddddddddddd");
        let shown = format!("{bob:?} {} {:?}", bob.token, bob.token);
        assert!(!shown.contains("cccccccccc"), "{shown}");
        assert!(shown.contains("<redacted>"), "{shown}");
    }

    #[test]
    fn conflict_is_its_own_reason() {
        let e = AuthError::Conflict {
            message: BROWSER_ONLY_MESSAGE.into(),
        };
        assert_eq!(e.reason(), "conflict");
        assert_eq!(e.to_string(), BROWSER_ONLY_MESSAGE);
    }
}
