//! Tunables of the coordinator's API face, with Coder's defaults.
//!
//! Why: the binary fills this from flags/TOML; tests shrink the timers. Every value here bounds a
//! queue, a message or a wait. This module must never read files or the environment itself.

use std::time::Duration;

use serde::Deserialize;

use crate::resume::{ResumeKey, DEFAULT_EXPIRY};

/// Highest Tailnet API minor version served (Coder's `CurrentMinor` for major 2).
pub const CURRENT_MINOR: u64 = 10;
/// Highest Tailnet API major version served.
pub const CURRENT_MAJOR: u64 = 2;

/// Configuration of a [`crate::Coordinator`].
#[derive(Debug, Clone)]
pub struct CoordinatorConfig {
    /// Resume token signing key; `None` = a random key per process (tokens verify only here).
    pub resume_key: Option<ResumeKey>,
    /// Older keys still accepted for verification (rotation).
    pub resume_verify_keys: Vec<ResumeKey>,
    /// Resume token lifetime (Coder: 24 h; clients refresh after half).
    pub resume_expiry: Duration,
    /// WebSocket ping interval on coordination and DERP map sockets (Coder: 15 s).
    pub ws_ping_interval: Duration,
    /// How long a WebSocket ping may stay unanswered before the session is closed with 1001.
    pub ws_pong_timeout: Duration,
    /// Agent v2 sessions (`/me/rpc`) follow coderd's agent rule instead: closed once no pong
    /// has arrived for this long, checked every `ws_ping_interval` (coderd's
    /// `AgentInactiveDisconnectTimeout`: twice its 15 s update frequency).
    pub agent_inactive_disconnect_timeout: Duration,
    /// v1 sessions: a write that takes longer ends the session (Coder: 5 s).
    pub v1_write_timeout: Duration,
    /// v1 sessions: largest JSON value accepted from a peer before the session is ended.
    pub v1_max_message: usize,
    /// Responses buffered per peer before it is kicked as too slow (Coder: 512).
    pub response_buffer: usize,
    /// How long shutdown waits for sessions to say goodbye.
    pub shutdown_grace: Duration,
    /// Lock shards of the peer graph (1..=[`crate::graph::MAX_SHARDS`]; more shards, less
    /// contention between unrelated peers). Default: [`crate::graph::default_shards`].
    pub graph_shards: usize,
    /// Sidecar mode: the coderd to forward non-Tailnet dRPC streams to (`coder.agent.v2.Agent` on
    /// `/me/rpc`, `WorkspaceUpdates` on `/api/v2/tailnet`). `None` = answer them "unknown rpc".
    /// The same [`crate::upstream::Upstream`] value the reverse proxy and the authenticator use.
    pub upstream: Option<crate::upstream::Upstream>,
    /// Sidecar mode: mirror every agent into coderd's coordinator (see
    /// [`crate::upstream::bridge`]). Off by default here; the binary turns it on with `--upstream`.
    pub upstream_bridge: crate::upstream::bridge::BridgeConfig,
    /// How large one peer's node may be (entries per field, encoded bytes); a larger node ends
    /// the session. See [`crate::graph::NodeLimits`].
    pub node_limits: crate::graph::NodeLimits,
    /// Most tunnels one peer may hold; one more `add_tunnel` ends the session. See
    /// [`crate::graph::GraphConfig::max_tunnels_per_peer`].
    pub max_tunnels_per_peer: usize,
    /// Most concurrent client coordination sessions of one user (`/api/v2/tailnet` and
    /// `{agent}/coordinate` together); one more is answered 429 before the upgrade. See
    /// [`crate::api::caps`].
    pub max_sessions_per_user: usize,
    /// Most concurrent coordination sessions of one agent id (`/me/coordinate` and `/me/rpc`
    /// together); one more is answered 429 before the upgrade.
    pub max_sessions_per_agent: usize,
    /// Bytes (encoded nodes and responses) queued per peer before it is kicked as too slow, next
    /// to the entry bound `response_buffer`. See [`crate::graph::GraphConfig::response_queue_bytes`].
    pub response_buffer_bytes: usize,
    /// Most concurrent yamux streams of one v2 session; a SYN beyond it is refused with RST.
    pub session_max_streams: usize,
    /// Most bytes one agent's v2 session may hold buffered and unread across all its streams
    /// (yamux receive buffers, partial dRPC packets, complete messages not yet taken by their
    /// call); more ends the session as a yamux protocol error. See [`crate::rpc::yamux::Config`].
    pub agent_session_max_buffered_bytes: usize,
    /// The same bound for a client's v2 session (`/api/v2/tailnet`, `{agent}/coordinate`).
    pub client_session_max_buffered_bytes: usize,
}

/// Default [`CoordinatorConfig::response_buffer_bytes`] (8 MiB): a receiver that keeps up holds
/// one or two responses; a real agent's init batch of 1,000 clients' nodes (~2 KB each) is 2 MB.
pub const DEFAULT_RESPONSE_BUFFER_BYTES: usize = 8 << 20;
/// Default [`CoordinatorConfig::session_max_streams`]: hashicorp's accept backlog; Coder's agents
/// and clients keep a handful of streams open (Coordinate, DERP maps, one per unary call).
pub const DEFAULT_SESSION_MAX_STREAMS: usize = 256;
/// Default [`CoordinatorConfig::agent_session_max_buffered_bytes`] (8 MiB): one dRPC message of
/// the 4 MiB maximum (an agent's largest, a batch of startup logs, is about 1 MiB) with its read
/// buffer, plus the receive windows of a few busy streams.
pub const DEFAULT_AGENT_SESSION_MAX_BUFFERED_BYTES: usize = 8 << 20;
/// Default [`CoordinatorConfig::client_session_max_buffered_bytes`] (1 MiB): what clients send
/// is small (a node of at most `node_max_bytes`, telemetry, token refreshes), and one user may
/// hold `max_sessions_per_user` of these sessions.
pub const DEFAULT_CLIENT_SESSION_MAX_BUFFERED_BYTES: usize = 1 << 20;

impl Default for CoordinatorConfig {
    fn default() -> Self {
        Self {
            resume_key: None,
            resume_verify_keys: Vec::new(),
            resume_expiry: DEFAULT_EXPIRY,
            ws_ping_interval: Duration::from_secs(15),
            ws_pong_timeout: Duration::from_secs(15),
            agent_inactive_disconnect_timeout: Duration::from_secs(30),
            v1_write_timeout: Duration::from_secs(5),
            v1_max_message: 1 << 20,
            response_buffer: 512,
            shutdown_grace: Duration::from_secs(5),
            graph_shards: crate::graph::default_shards(),
            upstream: None,
            upstream_bridge: crate::upstream::bridge::BridgeConfig::default(),
            node_limits: crate::graph::NodeLimits::default(),
            max_tunnels_per_peer: crate::graph::DEFAULT_MAX_TUNNELS_PER_PEER,
            max_sessions_per_user: crate::api::caps::DEFAULT_MAX_SESSIONS_PER_USER,
            max_sessions_per_agent: crate::api::caps::DEFAULT_MAX_SESSIONS_PER_AGENT,
            response_buffer_bytes: DEFAULT_RESPONSE_BUFFER_BYTES,
            session_max_streams: DEFAULT_SESSION_MAX_STREAMS,
            agent_session_max_buffered_bytes: DEFAULT_AGENT_SESSION_MAX_BUFFERED_BYTES,
            client_session_max_buffered_bytes: DEFAULT_CLIENT_SESSION_MAX_BUFFERED_BYTES,
        }
    }
}

/// A resume key as written in TOML: `{ id = "1", secret_hex = "<128 hex chars>" }`. Coder stores
/// `crypto_keys.secret` as hex, so the same text works for both.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ResumeKeyConfig {
    /// Key id (`kid`); Coder uses the key's sequence number.
    pub id: String,
    /// The secret, hex encoded (at least 32 bytes).
    pub secret_hex: String,
}

/// A resume key could not be decoded.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ResumeKeyError {
    /// Not hex.
    #[error("resume key {0:?}: secret is not hex")]
    NotHex(String),
    /// Shorter than 32 bytes.
    #[error("resume key {0:?}: secret must be at least 32 bytes, got {1}")]
    TooShort(String, usize),
    /// Empty key id.
    #[error("resume key id must not be empty")]
    EmptyId,
}

impl ResumeKeyConfig {
    /// Decode into a [`ResumeKey`].
    pub fn to_key(&self) -> Result<ResumeKey, ResumeKeyError> {
        if self.id.is_empty() {
            return Err(ResumeKeyError::EmptyId);
        }
        let secret = hex::decode(self.secret_hex.trim())
            .map_err(|_| ResumeKeyError::NotHex(self.id.clone()))?;
        if secret.len() < 32 {
            return Err(ResumeKeyError::TooShort(self.id.clone(), secret.len()));
        }
        Ok(ResumeKey {
            id: self.id.clone(),
            secret,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resume_key_config() {
        let k = ResumeKeyConfig {
            id: "3".into(),
            secret_hex: "ab".repeat(64),
        };
        assert_eq!(k.to_key().unwrap().secret.len(), 64);
        let short = ResumeKeyConfig {
            id: "3".into(),
            secret_hex: "ab".repeat(8),
        };
        assert_eq!(
            short.to_key().unwrap_err(),
            ResumeKeyError::TooShort("3".into(), 8)
        );
        let bad = ResumeKeyConfig {
            id: "3".into(),
            secret_hex: "zz".into(),
        };
        assert!(bad.to_key().is_err());
    }
}
