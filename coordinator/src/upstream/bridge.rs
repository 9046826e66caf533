//! The sidecar bridge: every agent served here is also a peer of coderd's own coordinator.
//!
//! Why: coderd reaches agents itself — the web terminal, `listening-ports`, workspace apps and
//! port-forwarding in the dashboard, workspace proxies — through its own tailnet ("server
//! tailnet"), which coordinates with coderd's in-process coordinator. An agent that coordinates
//! only with tailnetd is invisible there ("dial workspace agent"). So for each agent session on
//! `/me/rpc` (role `agent`) in sidecar mode, this module keeps one
//! `coder.tailnet.v2.Tailnet/Coordinate` stream to coderd on that agent's own upstream session
//! (the one [`super::agent_rpc`] forwards the Agent API on, dialled eagerly here), speaking *as
//! the agent* (coderd authorizes it as `AgentCoordinateeAuth`: `update_self`,
//! `ready_for_handshake` and `disconnect`, never `add_tunnel`):
//!
//! - **Agent → coderd.** The stream is a [`RemoteSource`] that watches the agent: the agent's
//!   node updates become `update_self`, its READY_FOR_HANDSHAKE to a coderd peer becomes
//!   `ready_for_handshake`, its graceful disconnect becomes `disconnect`, and its LOST ends the
//!   stream without one (coderd marks it LOST). Peers local to tailnetd stay local: nothing about
//!   them goes upstream.
//! - **coderd → agent.** Every peer coderd tells the agent about (NODE, READY_FOR_HANDSHAKE,
//!   DISCONNECTED, LOST) becomes a remote peer of the agent in the graph, with a tunnel to it.
//! - **Failure rules.** The bridge never blocks local coordination (it only uses the graph's
//!   non-blocking API; its queue is bounded). When coderd ends only the bridge stream, the stream
//!   is re-established with jittered exponential backoff (capped), and the remote peers of the
//!   dead stream are LOST to the agent meanwhile (its WireGuard sessions keep working). When the
//!   whole upstream session dies, today's rule applies ([`super::agent_rpc`]): the agent's session
//!   is closed, its clients see it LOST, and the agent redials. A failed eager dial is handled
//!   the same way.
//! - **coderd's side.** A second `Coordinate` for the same agent id overwrites the first in
//!   coderd's coordinator, so a re-established stream simply takes over. Because the upstream
//!   session carries the agent's own `role`, coderd's connection monitor records the agent as
//!   connected (first/last connected times) for as long as it is connected to tailnetd.
//!
//! This module must never hold a graph lock (it has none: it calls the graph's API), never keep a
//! stream after its agent's session ended, and never log tokens.

use std::sync::Arc;
use std::time::{Duration, Instant};

use prometheus::{IntCounter, IntCounterVec, IntGauge, Opts, Registry};
use proto::tailnet::v2::coordinate_request::{Disconnect, ReadyForHandshake, UpdateSelf};
use proto::tailnet::v2::coordinate_response::peer_update::Kind;
use proto::tailnet::v2::methods;
use proto::tailnet::v2::{CoordinateRequest, CoordinateResponse};
use rand::Rng;
use uuid::Uuid;

use super::agent_rpc::UpstreamLink;
use crate::graph::{PeerGraph, RemoteSource, SourceEvent, SourceEvents, DEFAULT_SOURCE_QUEUE};
use crate::rpc::drpc::{self, DrpcConfig, RpcError, RpcSender};

/// Bridge settings.
#[derive(Debug, Clone)]
pub struct BridgeConfig {
    /// Run a bridge for agent sessions when an upstream is configured.
    pub enabled: bool,
    /// First wait before re-establishing a stream coderd ended.
    pub initial_backoff: Duration,
    /// Cap of the (doubling, jittered) wait.
    pub max_backoff: Duration,
    /// Events from the agent queued before the stream is re-synchronised.
    pub queue: usize,
}

impl Default for BridgeConfig {
    /// Off (the binary switches it on with `--upstream`); 1 s doubling to 30 s.
    fn default() -> Self {
        Self {
            enabled: false,
            initial_backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(30),
            queue: DEFAULT_SOURCE_QUEUE,
        }
    }
}

/// `coordinator_upstream_bridge_*` metrics.
#[derive(Debug, Clone)]
pub struct BridgeMetrics {
    /// Bridge streams that are up.
    pub streams: IntGauge,
    /// Streams re-established after coderd ended one (or the agent's events overflowed).
    pub redials: IntCounter,
    /// Remote peers currently bound through bridge streams (one per stream and peer).
    pub remote_peers: IntGauge,
    /// Stream ends by reason: `upstream` (coderd ended it or it failed), `overflow`, `agent_left`.
    pub ends: IntCounterVec,
}

impl BridgeMetrics {
    /// Creates the metrics and registers them on `registry`.
    pub fn new(registry: &Registry) -> Result<Self, prometheus::Error> {
        let m = BridgeMetrics {
            streams: IntGauge::new(
                "coordinator_upstream_bridge_streams",
                "bridge Coordinate streams to coderd that are up (one per bridged agent)",
            )?,
            redials: IntCounter::new(
                "coordinator_upstream_bridge_redials_total",
                "bridge streams re-established after coderd ended them",
            )?,
            remote_peers: IntGauge::new(
                "coordinator_upstream_bridge_remote_peers",
                "coderd peers bound as remote peers through bridge streams",
            )?,
            ends: IntCounterVec::new(
                Opts::new(
                    "coordinator_upstream_bridge_stream_ends_total",
                    "bridge stream ends by reason (upstream, overflow, agent_left)",
                ),
                &["reason"],
            )?,
        };
        registry.register(Box::new(m.streams.clone()))?;
        registry.register(Box::new(m.redials.clone()))?;
        registry.register(Box::new(m.remote_peers.clone()))?;
        registry.register(Box::new(m.ends.clone()))?;
        Ok(m)
    }
}

/// Why one bridge stream ended.
#[derive(Debug)]
enum End {
    /// The agent's session ended: the bridge is done.
    SessionEnded,
    /// The agent left the graph (its Coordinate stream ended); coderd was told.
    AgentLeft,
    /// coderd ended the stream, or it failed.
    Upstream(String),
    /// The agent's events overflowed the bounded queue: re-synchronise.
    Overflow,
}

/// Runs the bridge of agent `agent` until its session ends. Spawned by the session.
pub(crate) async fn run(
    graph: Arc<PeerGraph>,
    link: Arc<UpstreamLink>,
    agent: Uuid,
    config: BridgeConfig,
    metrics: BridgeMetrics,
) {
    let session = tokio::select! {
        s = link.session_or_fail() => match s {
            Ok(s) => s,
            // The link failed: the agent's session closes and the agent redials.
            Err(_) => return,
        },
        _ = link.ended() => return,
    };
    let mut backoff = config.initial_backoff;
    loop {
        let started = Instant::now();
        let (mut source, mut events) = graph.remote_source(config.queue);
        source.watch(agent);
        let end = match drpc::open_call(&session, &DrpcConfig::default(), methods::COORDINATE).await
        {
            Ok(stream) => {
                metrics.streams.inc();
                tracing::info!(agent = %agent, "bridge to coderd's coordinator up");
                let end = pump(stream, &mut source, &mut events, agent, &link, &metrics).await;
                metrics.streams.dec();
                end
            }
            Err(e) => End::Upstream(format!("open Coordinate: {e}")),
        };
        let lost = source.peer_count();
        metrics.remote_peers.sub(lost as i64);
        // The stream's remote peers become LOST to the agent (established tunnels keep working).
        drop(source);
        let wait = match end {
            End::SessionEnded => return,
            End::AgentLeft => {
                metrics.ends.with_label_values(&["agent_left"]).inc();
                tracing::info!(agent = %agent, "agent left coordination; bridge stream closed");
                backoff = config.initial_backoff;
                // The agent usually reopens Coordinate at once on the same session.
                config.initial_backoff.min(Duration::from_millis(100))
            }
            End::Upstream(reason) => {
                if session.is_closed() {
                    // The whole upstream session died: agent_rpc closes the agent's session.
                    return;
                }
                metrics.ends.with_label_values(&["upstream"]).inc();
                if started.elapsed() >= config.max_backoff {
                    backoff = config.initial_backoff;
                }
                let wait = jittered(backoff);
                tracing::warn!(
                    agent = %agent,
                    reason = %reason,
                    remote_peers_lost = lost,
                    retry_in = ?wait,
                    "bridge stream to coderd ended; re-establishing"
                );
                backoff = (backoff * 2).min(config.max_backoff);
                metrics.redials.inc();
                wait
            }
            End::Overflow => {
                metrics.ends.with_label_values(&["overflow"]).inc();
                metrics.redials.inc();
                tracing::warn!(agent = %agent, "bridge fell behind the agent; re-synchronising");
                Duration::ZERO
            }
        };
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = link.ended() => return,
            _ = session.closed() => return,
        }
    }
}

/// `d` ± 20 %.
fn jittered(d: Duration) -> Duration {
    d.mul_f64(rand::thread_rng().gen_range(0.8..1.2))
}

/// Pumps one stream: the agent's events up, coderd's peer updates into the graph.
async fn pump(
    stream: drpc::RpcStream,
    source: &mut RemoteSource,
    events: &mut SourceEvents,
    agent: Uuid,
    link: &UpstreamLink,
    metrics: &BridgeMetrics,
) -> End {
    let (tx, mut rx) = stream.split();
    let mut bound = source.peer_count();
    loop {
        tokio::select! {
            _ = link.ended() => return End::SessionEnded,
            ev = events.recv() => match ev {
                Some(SourceEvent::Node { node, .. }) => {
                    let req = CoordinateRequest {
                        update_self: Some(UpdateSelf {
                            node: Some(Arc::unwrap_or_clone(node)),
                        }),
                        ..Default::default()
                    };
                    if let Err(e) = tx.send_msg(&req).await {
                        return upstream_end("send update_self", e);
                    }
                }
                Some(SourceEvent::ReadyForHandshake { to, .. }) => {
                    let req = CoordinateRequest {
                        ready_for_handshake: vec![ReadyForHandshake {
                            id: bytes::Bytes::copy_from_slice(to.as_bytes()),
                        }],
                        ..Default::default()
                    };
                    if let Err(e) = tx.send_msg(&req).await {
                        return upstream_end("send ready_for_handshake", e);
                    }
                }
                Some(SourceEvent::Gone { kind, .. }) => {
                    if kind == Kind::Disconnected {
                        disconnect(&tx).await;
                    }
                    // Without a disconnect, the stream's end is a LOST for coderd.
                    return End::AgentLeft;
                }
                Some(SourceEvent::Overflow) => return End::Overflow,
                // Only the watch-all source (the PostgreSQL store) receives these.
                Some(SourceEvent::Connected { .. })
                | Some(SourceEvent::TunnelAdded { .. })
                | Some(SourceEvent::TunnelRemoved { .. }) => {}
                None => return End::SessionEnded,
            },
            resp = rx.recv_msg::<CoordinateResponse>() => match resp {
                Ok(Some(r)) => {
                    apply(source, agent, r);
                    let now = source.peer_count();
                    metrics.remote_peers.add(now as i64 - bound as i64);
                    bound = now;
                }
                Ok(None) => return End::Upstream("coderd closed the stream".into()),
                Err(e) => return upstream_end("receive", e),
            },
        }
    }
}

fn upstream_end(what: &str, e: RpcError) -> End {
    End::Upstream(format!("{what}: {e}"))
}

async fn disconnect(tx: &RpcSender) {
    let req = CoordinateRequest {
        disconnect: Some(Disconnect {}),
        ..Default::default()
    };
    if tx.send_msg(&req).await.is_ok() {
        let _ = tx.close_send().await;
    }
}

/// coderd's peer updates for the agent → remote peers of the agent.
fn apply(source: &mut RemoteSource, agent: Uuid, resp: CoordinateResponse) {
    if !resp.error.is_empty() {
        // Non-fatal errors (e.g. a READY_FOR_HANDSHAKE for a peer coderd no longer links).
        tracing::debug!(agent = %agent, error = %resp.error, "coderd's coordinator reported an error");
    }
    for u in resp.peer_updates {
        let Ok(peer) = Uuid::from_slice(&u.id) else {
            tracing::debug!(agent = %agent, "peer update with a malformed id from coderd; ignored");
            continue;
        };
        if peer == agent {
            continue;
        }
        match Kind::try_from(u.kind) {
            Ok(Kind::Node) => {
                if let Some(node) = u.node {
                    // Every peer coderd tells an agent about has a tunnel to it.
                    source.upsert_node(peer, node);
                    source.add_tunnel(peer, agent);
                }
            }
            Ok(Kind::ReadyForHandshake) => {
                source.ready_for_handshake(peer, agent);
            }
            Ok(Kind::Disconnected) => {
                source.disconnected(peer);
            }
            Ok(Kind::Lost) => {
                source.lost(peer);
            }
            Ok(Kind::Unspecified) | Err(_) => {}
        }
    }
}

/// Whether a session is bridged: an agent session on `/me/rpc` whose `role` coderd monitors.
pub(crate) fn wants_bridge(config: &BridgeConfig, link: &UpstreamLink) -> bool {
    config.enabled && link.is_monitored_agent()
}
