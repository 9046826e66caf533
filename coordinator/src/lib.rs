//! The Coder tailnet coordinator: the peer graph, the transports Coder's agents and clients speak
//! (v1 JSON and v2 dRPC over yamux over WebSocket), authentication, resume tokens and the DERP map.
//!
//! The binary builds one [`Coordinator`] with [`Coordinator::new`], merges [`Coordinator::router`]
//! into its HTTP server and calls [`Coordinator::shutdown`] on SIGTERM.
#![forbid(unsafe_code)]

pub mod api;
pub mod auth;
pub mod authz;
pub mod config;
pub mod derpmap;
pub mod dev;
#[cfg(any(test, feature = "fuzzing"))]
pub mod fuzzing;
pub mod graph;
pub mod ha;
pub mod metrics;
pub mod relay_health;
pub mod resume;
pub mod rpc;
pub mod service;
pub mod upstream;
pub mod v1;

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

pub use crate::auth::{AgentIdentity, AuthError, Authenticator, StaticAuthenticator, UserIdentity};
pub use crate::config::CoordinatorConfig;
pub use crate::derpmap::{DerpMapConfig, DerpMapSnapshot, DerpMapSource, EmbeddedRelay};
pub use crate::dev::DevCredentials;

use crate::graph::{GraphConfig, PeerGraph};
use crate::metrics::Metrics;
use crate::resume::{ResumeKey, ResumeTokenProvider};
use crate::rpc::RpcMetrics;

/// Why a coordinator could not be built.
#[derive(Debug, thiserror::Error)]
pub enum CoordinatorError {
    /// A metric could not be registered (usually: two coordinators on one registry).
    #[error("registering coordinator metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    /// The peer graph could not be built.
    #[error(transparent)]
    Graph(#[from] graph::GraphError),
    /// `Coordinator::new` was called outside a tokio runtime.
    #[error("Coordinator::new must be called inside a tokio runtime")]
    NoRuntime,
}

/// Counts live tasks of one kind so shutdown can wait for them (bounded).
#[derive(Debug)]
pub(crate) struct Tracker(watch::Sender<usize>);

impl Tracker {
    fn new() -> Self {
        Self(watch::channel(0).0)
    }

    /// Count one task until the guard drops.
    pub(crate) fn track(&self) -> TrackGuard {
        self.0.send_modify(|n| *n += 1);
        TrackGuard(self.0.clone())
    }

    fn count(&self) -> usize {
        *self.0.borrow()
    }

    /// Wait until no task is tracked or `timeout` passes; returns the count left.
    async fn drained(&self, timeout: Duration) -> usize {
        let mut rx = self.0.subscribe();
        let _ = tokio::time::timeout(timeout, rx.wait_for(|n| *n == 0)).await;
        self.count()
    }
}

/// See [`Tracker::track`].
#[derive(Debug)]
pub(crate) struct TrackGuard(watch::Sender<usize>);

impl Drop for TrackGuard {
    fn drop(&mut self) {
        self.0.send_modify(|n| *n = n.saturating_sub(1));
    }
}

/// One coordinator: the graph, its HTTP face and the DERP map it hands out.
pub struct Coordinator {
    pub(crate) config: CoordinatorConfig,
    pub(crate) graph: Arc<PeerGraph>,
    pub(crate) auth: Arc<dyn Authenticator>,
    pub(crate) derp: DerpMapSource,
    pub(crate) resume: ResumeTokenProvider,
    pub(crate) metrics: Metrics,
    pub(crate) rpc_metrics: Arc<RpcMetrics>,
    /// Sidecar mode: forwarding of non-Tailnet dRPC streams to coderd (`config.upstream`).
    pub(crate) upstream_rpc: Option<Arc<upstream::agent_rpc::UpstreamRpc>>,
    /// Sidecar mode: the bridges' metrics (see [`upstream::bridge`]).
    pub(crate) bridge_metrics: upstream::bridge::BridgeMetrics,
    /// Fired by [`Coordinator::shutdown`]: sessions and the file watcher stop.
    pub(crate) cancel: CancellationToken,
    /// Live WebSocket sessions of every kind.
    pub(crate) sessions: Tracker,
    /// Live `Coordinate` streams and v1 sessions (they end when the graph shuts down).
    pub(crate) coordinations: Tracker,
    /// Concurrent sessions per user and per agent id (see [`api::caps`]).
    pub(crate) caps: api::caps::SessionCaps,
}

impl std::fmt::Debug for Coordinator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Coordinator")
            .field("sessions", &self.sessions.count())
            .finish_non_exhaustive()
    }
}

impl Coordinator {
    /// The upstream coderd of sidecar mode (`config.upstream`): the same value the Agent API
    /// forwarder dials, for the reverse-proxy fallback router ([`upstream::Upstream::proxy_router`]).
    pub fn upstream(&self) -> Option<&upstream::Upstream> {
        self.config.upstream.as_ref()
    }

    /// Build a coordinator, register its metrics (and the graph's and transport's) on `registry`,
    /// and start watching the DERP map file. Must be called inside a tokio runtime.
    pub fn new(
        config: CoordinatorConfig,
        authenticator: Arc<dyn Authenticator>,
        derp_map: DerpMapSource,
        registry: &prometheus::Registry,
    ) -> Result<Arc<Self>, CoordinatorError> {
        let rt = tokio::runtime::Handle::try_current().map_err(|_| CoordinatorError::NoRuntime)?;
        let metrics = Metrics::new(registry)?;
        let caps = api::caps::SessionCaps::new(
            config.max_sessions_per_user,
            config.max_sessions_per_agent,
            registry,
        )?;
        let rpc_metrics = RpcMetrics::new()?;
        rpc_metrics.register(registry)?;
        let graph = PeerGraph::with_shards(
            GraphConfig {
                response_queue: config.response_buffer.max(1),
                response_queue_bytes: config.response_buffer_bytes.max(1),
                node_limits: config.node_limits.clone(),
                max_tunnels_per_peer: config.max_tunnels_per_peer,
            },
            config.graph_shards,
            registry,
        )?;
        let signing = config
            .resume_key
            .clone()
            .unwrap_or_else(|| ResumeKey::random("1"));
        let resume = ResumeTokenProvider::new(
            signing,
            config.resume_verify_keys.clone(),
            config.resume_expiry,
        );
        let upstream_metrics = upstream::agent_rpc::UpstreamRpcMetrics::new(registry)?;
        let bridge_metrics = upstream::bridge::BridgeMetrics::new(registry)?;
        let upstream_rpc = config.upstream.as_ref().map(|up| {
            Arc::new(upstream::agent_rpc::UpstreamRpc::new(
                up.clone(),
                upstream_metrics,
            ))
        });
        let coord = Arc::new(Self {
            config,
            graph,
            auth: authenticator,
            derp: derp_map,
            resume,
            metrics,
            rpc_metrics: Arc::new(rpc_metrics),
            upstream_rpc,
            bridge_metrics,
            cancel: CancellationToken::new(),
            sessions: Tracker::new(),
            coordinations: Tracker::new(),
            caps,
        });
        let derp = coord.derp.clone();
        let cancel = coord.cancel.clone();
        rt.spawn(async move { derp.watch_file(cancel, || {}).await });
        // Count every published change, whether from the file or from `DerpMapSource::set`.
        let mut maps = coord.derp.subscribe();
        let cancel = coord.cancel.clone();
        let updates = coord.metrics.derp_map_updates.clone();
        rt.spawn(async move {
            maps.borrow_and_update();
            loop {
                tokio::select! {
                    changed = maps.changed() => {
                        if changed.is_err() {
                            return;
                        }
                        maps.borrow_and_update();
                        updates.inc();
                    }
                    _ = cancel.cancelled() => return,
                }
            }
        });
        Ok(coord)
    }

    /// Every coordination endpoint (`/api/v2/workspaceagents/...`, `/api/v2/tailnet`,
    /// `/api/v2/derp-map`). Merge it with the relay's routes and `/metrics`.
    pub fn router(self: &Arc<Self>) -> axum::Router {
        api::router(self.clone())
    }

    /// The current DERP map.
    pub fn derp_map(&self) -> Arc<DerpMapSnapshot> {
        self.derp.current()
    }

    /// The DERP map source (to publish a new map programmatically).
    pub fn derp_map_source(&self) -> &DerpMapSource {
        &self.derp
    }

    /// The peer graph (for the binary's relay admission and for tests).
    pub fn graph(&self) -> &Arc<PeerGraph> {
        &self.graph
    }

    /// Number of live WebSocket sessions.
    pub fn session_count(&self) -> usize {
        self.sessions.count()
    }

    /// Whether [`Coordinator::shutdown`] has started.
    pub fn is_shutting_down(&self) -> bool {
        self.cancel.is_cancelled()
    }

    /// Close every peer with LOST semantics (`error:"coordinator closed"`, so data planes keep
    /// working and clients redial elsewhere), end every session, stop the file watcher. New
    /// requests get 503. Waits at most `shutdown_grace` for sessions to finish.
    pub async fn shutdown(&self) {
        let grace = self.config.shutdown_grace;
        // First the graph: every Coordinate stream gets the error and ends with Close while its
        // WebSocket is still up, and tunnel peers see LOST rather than DISCONNECTED.
        self.graph.shutdown();
        self.coordinations.drained(grace / 2).await;
        self.cancel.cancel();
        let left = self.sessions.drained(grace).await;
        if left > 0 {
            tracing::warn!(
                sessions = left,
                "coordinator shutdown: sessions still open after grace period"
            );
        }
    }
}

#[cfg(test)]
mod config_tests {
    use super::*;

    #[tokio::test]
    async fn the_configured_shard_count_reaches_the_graph() {
        let config = CoordinatorConfig {
            graph_shards: 3,
            ..CoordinatorConfig::default()
        };
        let auth = Arc::new(StaticAuthenticator::default());
        let derp = DerpMapSource::new(DerpMapConfig::default()).unwrap();
        let c = Coordinator::new(config, auth, derp, &prometheus::Registry::new()).unwrap();
        assert_eq!(c.graph().shard_count(), 3);
        c.shutdown().await;
    }
}
