//! The coordinator workload: A agents and C clients per agent speak Coder's v2 protocol
//! (WebSocket → yamux → dRPC `Coordinate`), using the coordinator crate's client-side stack.
//! Every client tunnels to its agent; clients send `update_self` at a fixed rate (reaching their
//! agent), agents send `update_self` at a fixed rate (fanned out to their C clients). The send
//! time (wall clock, ns) travels in the node's `as_of`, which coordinators pass through.
//!
//! Two server flavours: `tailnetd` (agents on `/api/v2/workspaceagents/me/rpc` with an agent
//! token, clients on `/{agent}/coordinate` with a user token, from `--auth-file`) and `gocoord`
//! (the Go coordinator harness in `interop/gocoord`: no auth, agents on `/{id}/coordinate?role=agent`).
//!
//! Two clients (`--client`): `lean` (default, [`lean`]: one task per connection on a plain socket,
//! so the one-core load generator stays well below the server's cost per message) and `full` (the
//! coordinator crate's own client stack, kept to cross-check the lean one). Both count exactly the
//! same things through [`tally`].

pub mod lean;

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context, Result};
use coordinator::rpc::drpc::{DrpcConfig, RpcClient, RpcReceiverOwned, RpcSender};
use coordinator::rpc::wsio::{WsConfig, WsHandle, WsIo};
use coordinator::rpc::yamux::{self, Session};
use futures_util::stream::{self, StreamExt, TryStreamExt};
use proto::tailnet::v2::coordinate_response::peer_update::Kind;
use proto::tailnet::v2::{methods, CoordinateRequest, CoordinateResponse};
use serde::{Deserialize, Serialize};
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use uuid::Uuid;

use self::lean::{LeanConn, LeanError};
use crate::fixtures::{add_tunnel, node, timestamp, timestamp_ns, update_self};
use crate::hist::Histogram;
use crate::procfs;

/// Which server the load generator talks to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Flavor {
    /// tailnetd's coordinator (needs `--auth-file`).
    Tailnetd,
    /// Coder's Go in-memory coordinator served by `interop/gocoord`.
    Gocoord,
}

/// Credentials shared by `compare` (which writes them into tailnetd's config) and the load
/// generator.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AuthFile {
    /// Agents: id and token.
    pub agents: Vec<AgentCred>,
    /// A user token allowed to reach every agent.
    pub client_token: String,
}

/// One agent's credentials.
#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
pub struct AgentCred {
    /// Agent id.
    pub id: Uuid,
    /// Agent token.
    pub token: Uuid,
}

impl AuthFile {
    /// `n` fresh agents and a user token.
    pub fn generate(n: usize) -> Self {
        AuthFile {
            agents: (0..n)
                .map(|_| AgentCred {
                    id: Uuid::new_v4(),
                    token: Uuid::new_v4(),
                })
                .collect(),
            client_token: "benchbench-aaaaaaaaaaaaaaaaaaaaaa".into(),
        }
    }

    /// The `[auth]` TOML section accepting these credentials.
    pub fn toml(&self) -> String {
        let mut s = String::from("[auth]\n");
        for a in &self.agents {
            s.push_str(&format!(
                "[[auth.agents]]\ntoken = \"{}\"\nid = \"{}\"\n",
                a.token, a.id
            ));
        }
        s.push_str(&format!(
            "[[auth.users]]\ntoken = \"{}\"\nagents = \"all\"\n",
            self.client_token
        ));
        s
    }
}

/// Which client implementation the load generator uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ClientKind {
    /// Hand-written WebSocket/yamux/dRPC, one task per connection (see [`lean`]).
    Lean,
    /// The coordinator crate's client stack (tungstenite + `WsIo` + yamux `Session` + `RpcClient`).
    Full,
}

/// Coordinator workload settings.
#[derive(Clone, Debug, clap::Args)]
pub struct CoordArgs {
    /// Base URL, `http://127.0.0.1:PORT`.
    #[arg(long)]
    pub url: String,
    /// Server flavour.
    #[arg(long, value_enum, default_value_t = Flavor::Tailnetd)]
    pub flavor: Flavor,
    /// Credentials (JSON, see `AuthFile`); required for `tailnetd`.
    #[arg(long)]
    pub auth_file: Option<PathBuf>,
    /// Agents.
    #[arg(long, default_value_t = 10)]
    pub agents: usize,
    /// Clients per agent.
    #[arg(long, default_value_t = 10)]
    pub clients_per_agent: usize,
    /// update_self per second sent by each client.
    #[arg(long, default_value_t = 1.0)]
    pub rate: f64,
    /// update_self per second sent by each agent (fanned out to its clients).
    #[arg(long, default_value_t = 1.0)]
    pub agent_rate: f64,
    /// Measurement window, s.
    #[arg(long, default_value_t = 5.0)]
    pub duration: f64,
    /// Warm-up before the window, s.
    #[arg(long, default_value_t = 1.0)]
    pub warmup: f64,
    /// Connections set up at once.
    #[arg(long, default_value_t = 32)]
    pub concurrency: usize,
    /// Server process id: CPU during the window, RSS growth per connected peer, peak RSS.
    #[arg(long)]
    pub server_pid: Option<u32>,
    /// Free-form label copied into the JSON.
    #[arg(long, default_value = "")]
    pub label: String,
    /// Client implementation.
    #[arg(long, value_enum, default_value_t = ClientKind::Lean)]
    pub client: ClientKind,
    /// Base URL the clients dial (default: `--url`); with replicas, agents on one and clients
    /// on another (lean client only).
    #[arg(long)]
    pub client_url: Option<String>,
    /// Change the node (its preferred DERP) on every send, not only `as_of`: a replica writes
    /// an update to PostgreSQL (and so to the other replicas) only if the node changed (lean
    /// client only).
    #[arg(long)]
    pub vary_node: bool,
}

/// What one coordinator run measured.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CoordReport {
    /// Always "coordinator".
    pub mode: String,
    /// The `--label`.
    pub label: String,
    /// `tailnetd` or `gocoord`.
    pub flavor: String,
    /// Agents.
    pub agents: usize,
    /// Clients per agent.
    pub clients_per_agent: usize,
    /// Connected peers (agents + clients) after setup.
    pub peers: usize,
    /// Deliveries per second the send schedule offered in the window if nothing is lost
    /// (clients → agent, agents → each client): every scheduled send stamped inside the window,
    /// times its recipients.
    pub offered_deliveries_per_s: f64,
    /// Peer updates (NODE) delivered per second during the window.
    pub delivered_updates_per_s: f64,
    /// Agent→client fan-out latency percentiles, ms.
    pub fanout_p50_ms: f64,
    /// p99, ms.
    pub fanout_p99_ms: f64,
    /// Max, ms.
    pub fanout_max_ms: f64,
    /// Client→agent latency, p50 ms.
    pub to_agent_p50_ms: f64,
    /// p99, ms.
    pub to_agent_p99_ms: f64,
    /// Peers connected (WebSocket + yamux + Coordinate + tunnel + first node) per second.
    pub setup_peers_per_s: f64,
    /// Server RSS growth per connected peer, bytes.
    pub rss_per_peer_bytes: Option<f64>,
    /// Server CPU seconds per window second.
    pub server_cpu_util: Option<f64>,
    /// Server peak RSS, bytes.
    pub server_peak_rss_bytes: Option<u64>,
    /// Streams that ended or reported an error before the end of the run.
    pub failed_streams: u64,
    /// The load generator's own CPU seconds per window second (absent in older results).
    #[serde(default)]
    pub loadgen_cpu_util: Option<f64>,
    /// NODE updates received again with the same (peer, stamp), not counted as delivered
    /// (absent in older results).
    #[serde(default)]
    pub duplicate_updates: u64,
}

/// Where and as whom one peer connects.
struct Target {
    /// Path and query of the WebSocket endpoint.
    path: String,
    /// `Coder-Session-Token`, if the flavour authenticates.
    token: Option<String>,
    /// The peer's own id.
    id: Uuid,
    /// Whether the peer is an agent.
    agent: bool,
    /// The agent a client tunnels to (the agent's own id for agents).
    agent_id: Uuid,
}

fn target(args: &CoordArgs, auth: &AuthFile, agent_idx: usize, agent: bool) -> Target {
    let cred = auth.agents[agent_idx];
    let (path, token, id) = match (args.flavor, agent) {
        (Flavor::Tailnetd, true) => (
            "/api/v2/workspaceagents/me/rpc?version=2.0".to_string(),
            Some(cred.token.to_string()),
            cred.id,
        ),
        (Flavor::Tailnetd, false) => (
            format!("/api/v2/workspaceagents/{}/coordinate?version=2.0", cred.id),
            Some(auth.client_token.clone()),
            Uuid::new_v4(),
        ),
        (Flavor::Gocoord, true) => (
            format!(
                "/api/v2/workspaceagents/{}/coordinate?version=2.0&role=agent",
                cred.id
            ),
            None,
            cred.id,
        ),
        (Flavor::Gocoord, false) => {
            // The harness names the client by the `client` query parameter.
            let id = Uuid::new_v4();
            (
                format!(
                    "/api/v2/workspaceagents/{}/coordinate?version=2.0&client={id}",
                    cred.id
                ),
                None,
                id,
            )
        }
    };
    Target {
        path,
        token,
        id,
        agent,
        agent_id: cred.id,
    }
}

/// The measurement window, shared by every peer once setup is over.
#[derive(Clone, Copy, Debug)]
struct Plan {
    /// Start of the send schedule (warm-up begins).
    start: Instant,
    /// The wall clock (ns) at `start`: updates are stamped with the wall time of their
    /// *scheduled* send ([`Plan::wall_at`]), so a sender held back (by a full window or a slow
    /// server) shows up as latency instead of hiding it (no coordinated omission).
    wall0: u64,
    /// The window starts at `start + win_start` (after the warm-up).
    win_start: Duration,
    /// Senders stop at `start + win_end`; receivers one second later.
    win_end: Duration,
    /// Updates stamped in `[win_start_wall, win_end_wall)` (wall clock, ns) are counted.
    win_start_wall: u64,
    win_end_wall: u64,
}

impl Plan {
    /// The wall clock (ns) at the instant `t` of the schedule.
    fn wall_at(&self, t: Instant) -> u64 {
        self.wall0 + t.saturating_duration_since(self.start).as_nanos() as u64
    }

    /// First send of peer number `k`: phases spread evenly so the offered load is smooth.
    fn first_send(&self, k: usize, period: Duration) -> Instant {
        self.start + period.mul_f64(((k as f64) * 0.618_033_988_7).fract())
    }

    /// How many of the sends peer `k` schedules at `period` are stamped inside the window:
    /// the same schedule the senders walk, so the offered load is exact (a peer with a low rate
    /// in a short window offers a whole number of updates, not rate × duration).
    fn scheduled_in_window(&self, k: usize, period: Duration) -> u64 {
        let mut n = 0;
        let mut t = self.first_send(k, period);
        while t < self.send_end() {
            let off = t - self.start;
            if off >= self.win_start && off < self.win_end {
                n += 1;
            }
            t += period;
        }
        n
    }

    fn send_end(&self) -> Instant {
        self.start + self.win_end
    }

    fn recv_end(&self) -> Instant {
        self.start + self.win_end + Duration::from_secs(1)
    }
}

/// One receiver's accounting, the same for both clients: NODE updates stamped inside the
/// window are delivered, once per (peer, stamp) (a coordinator may send a peer's unchanged
/// node again, e.g. with a new tunnel); their latency goes to the agent's or the client's
/// histogram.
struct Tally {
    fan: Histogram,
    to_agent: Histogram,
    seen: HashSet<(bytes::Bytes, u64)>,
}

impl Tally {
    fn new() -> Self {
        Tally {
            fan: Histogram::new(),
            to_agent: Histogram::new(),
            seen: HashSet::new(),
        }
    }

    /// Accounts `resp`; returns how many updates were counted (new, inside the window) and
    /// how many were duplicates.
    fn count(&mut self, resp: &CoordinateResponse, agent: bool, plan: &Plan) -> (u64, u64) {
        let now = wall_ns();
        let (mut n, mut dup) = (0, 0);
        for u in &resp.peer_updates {
            if u.kind != Kind::Node as i32 {
                continue;
            }
            let sent = timestamp_ns(u.node.as_ref().and_then(|n| n.as_of.as_ref()));
            if sent < plan.win_start_wall || sent >= plan.win_end_wall {
                continue;
            }
            if !self.seen.insert((u.id.clone(), sent)) {
                dup += 1;
                continue;
            }
            n += 1;
            let lat = now.saturating_sub(sent);
            if agent {
                self.to_agent.record(lat);
            } else {
                self.fan.record(lat);
            }
        }
        (n, dup)
    }
}

/// Whether `resp` carries the NODE of peer `want`.
fn has_node_of(resp: &CoordinateResponse, want: &Uuid) -> bool {
    resp.peer_updates
        .iter()
        .any(|u| u.kind == Kind::Node as i32 && u.id[..] == want.as_bytes()[..])
}

fn wall_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

#[derive(Default)]
struct Counters {
    /// Deliveries the schedule offers in the window: each send stamped inside it, times its
    /// recipients (an agent's clients, or a client's agent).
    offered_window: AtomicU64,
    delivered_window: AtomicU64,
    duplicates: AtomicU64,
    failed: AtomicU64,
}

/// What every peer task hands back.
type PeerTask = JoinHandle<(Histogram, Histogram)>;

// ---- full client: the coordinator crate's stack -------------------------------------------

struct Peer {
    id: Uuid,
    agent: bool,
    _rpc: RpcClient,
    _ws: WsHandle,
    tx: RpcSender,
    rx: RpcReceiverOwned,
}

async fn connect(base: &str, path: &str, token: Option<&str>) -> Result<(RpcClient, WsHandle)> {
    let ws_base = base
        .strip_prefix("http://")
        .map(|r| format!("ws://{r}"))
        .ok_or_else(|| anyhow!("only http:// base URLs, got {base}"))?;
    let mut req = format!("{ws_base}{path}").into_client_request()?;
    if let Some(t) = token {
        req.headers_mut().insert("Coder-Session-Token", t.parse()?);
    }
    // tungstenite's default 128 KiB read buffer is zero-filled on every read (`BytesMut::resize`),
    // which would make the load generator, not the server, the bottleneck at 10k peers.
    let config = WebSocketConfig::default().read_buffer_size(8 << 10);
    let (ws, _) = tokio_tungstenite::connect_async_with_config(req, Some(config), false)
        .await
        .with_context(|| format!("websocket {path}"))?;
    let (io, handle) = WsIo::new(ws, WsConfig::client());
    let session = Session::client(io, yamux::Config::default());
    Ok((RpcClient::new(session, DrpcConfig::default()), handle))
}

async fn open_full(args: &CoordArgs, t: Target) -> Result<Peer> {
    let (rpc, ws) = connect(&args.url, &t.path, t.token.as_deref()).await?;
    let stream = rpc
        .open_stream(methods::COORDINATE)
        .await
        .map_err(|e| anyhow!("open Coordinate: {e}"))?;
    let (tx, rx) = stream.split();
    if !t.agent {
        tx.send_msg(&add_tunnel(t.agent_id))
            .await
            .map_err(|e| anyhow!("add_tunnel: {e}"))?;
    }
    tx.send_msg(&update_self(node(t.id, t.agent, wall_ns())))
        .await
        .map_err(|e| anyhow!("update_self: {e}"))?;
    let mut p = Peer {
        id: t.id,
        agent: t.agent,
        _rpc: rpc,
        _ws: ws,
        tx,
        rx,
    };
    if !t.agent {
        // Ready when the agent's node arrives.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let resp = tokio::time::timeout_at(deadline, p.rx.recv_msg::<CoordinateResponse>())
                .await
                .map_err(|_| anyhow!("agent node not received within 30 s"))?
                .map_err(|e| anyhow!("recv: {e}"))?
                .ok_or_else(|| anyhow!("stream ended during setup"))?;
            if !resp.error.is_empty() {
                bail!("coordinator error: {}", resp.error);
            }
            if has_node_of(&resp, &t.agent_id) {
                break;
            }
        }
    }
    Ok(p)
}

/// Sets up every peer with the full client; returns them, agents first.
async fn setup_full(args: &CoordArgs, auth: &AuthFile) -> Result<Vec<Peer>> {
    let mut agents: Vec<Peer> = stream::iter(0..args.agents)
        .map(|i| open_full(args, target(args, auth, i, true)))
        .buffer_unordered(args.concurrency.max(1))
        .try_collect()
        .await?;
    let clients: Vec<Peer> = stream::iter(0..args.agents * args.clients_per_agent)
        .map(|i| {
            open_full(
                args,
                target(args, auth, i / args.clients_per_agent.max(1), false),
            )
        })
        .buffer_unordered(args.concurrency.max(1))
        .try_collect()
        .await?;
    agents.extend(clients);
    Ok(agents)
}

/// Runs the full-client peers: a sender and a receiver task each.
fn run_full(
    args: &CoordArgs,
    peers: Vec<Peer>,
    plan: Plan,
    counters: &Arc<Counters>,
) -> Vec<(JoinHandle<()>, PeerTask)> {
    let mut tasks = Vec::with_capacity(peers.len());
    for (k, p) in peers.into_iter().enumerate() {
        let rate = if p.agent { args.agent_rate } else { args.rate };
        let Peer {
            id,
            agent,
            _rpc,
            _ws,
            tx,
            mut rx,
        } = p;
        let c = counters.clone();
        if rate > 0.0 {
            let recipients = if agent {
                args.clients_per_agent as u64
            } else {
                1
            };
            let period = Duration::from_secs_f64(1.0 / rate);
            c.offered_window.fetch_add(
                plan.scheduled_in_window(k, period) * recipients,
                Ordering::Relaxed,
            );
        }
        let sender = tokio::spawn(async move {
            if rate <= 0.0 {
                return;
            }
            let period = Duration::from_secs_f64(1.0 / rate);
            let mut next = plan.first_send(k, period);
            while next < plan.send_end() {
                tokio::time::sleep_until(next.into()).await;
                if tx
                    .send_msg(&update_self(node(id, agent, plan.wall_at(next))))
                    .await
                    .is_err()
                {
                    break;
                }
                next += period;
            }
        });
        let receiver = tokio::spawn(async move {
            let _keep = (_rpc, _ws);
            let mut tally = Tally::new();
            loop {
                let resp = match tokio::time::timeout_at(
                    plan.recv_end().into(),
                    rx.recv_msg::<CoordinateResponse>(),
                )
                .await
                {
                    Err(_) => break,
                    Ok(Ok(Some(r))) => r,
                    Ok(Ok(None)) | Ok(Err(_)) => {
                        c.failed.fetch_add(1, Ordering::Relaxed);
                        break;
                    }
                };
                if !resp.error.is_empty() {
                    c.failed.fetch_add(1, Ordering::Relaxed);
                }
                let (n, dup) = tally.count(&resp, agent, &plan);
                c.delivered_window.fetch_add(n, Ordering::Relaxed);
                c.duplicates.fetch_add(dup, Ordering::Relaxed);
            }
            (tally.fan, tally.to_agent)
        });
        tasks.push((sender, receiver));
    }
    tasks
}

// ---- lean client: one task per connection -------------------------------------------------

/// Connects one lean peer, sends Invoke (+ add_tunnel) + update_self, then hands the connection
/// to its task. A client is ready when its agent's node has arrived.
async fn open_lean(
    args: &CoordArgs,
    t: Target,
    k: usize,
    counters: Arc<Counters>,
    plan_rx: watch::Receiver<Option<Plan>>,
) -> Result<PeerTask> {
    let base = match (&args.client_url, t.agent) {
        (Some(u), false) => u,
        _ => &args.url,
    };
    let authority = base
        .strip_prefix("http://")
        .map(|r| r.trim_end_matches('/'))
        .ok_or_else(|| anyhow!("only http:// base URLs, got {base}"))?;
    let mut conn = LeanConn::connect(authority, &t.path, t.token.as_deref())
        .await
        .with_context(|| format!("websocket {}", t.path))?;
    conn.wire.queue_open(methods::COORDINATE);
    if !t.agent {
        conn.wire.queue_request(&add_tunnel(t.agent_id))?;
    }
    let req = update_self(node(t.id, t.agent, wall_ns()));
    conn.wire.queue_request(&req)?;
    conn.flush().await?;
    let rate = if t.agent { args.agent_rate } else { args.rate };
    let (ready_tx, ready_rx) = oneshot::channel();
    let want = (!t.agent).then_some(t.agent_id);
    let task = tokio::spawn(drive_lean(LeanPeer {
        conn,
        vary: args.vary_node,
        req,
        agent: t.agent,
        want,
        ready: Some(ready_tx),
        k,
        rate,
        recipients: if t.agent {
            args.clients_per_agent as u64
        } else {
            1
        },
        counters,
        plan_rx,
    }));
    if want.is_some() {
        match tokio::time::timeout(Duration::from_secs(30), ready_rx).await {
            Err(_) => {
                task.abort();
                bail!("agent node not received within 30 s");
            }
            Ok(Err(_)) => bail!("stream ended during setup"),
            Ok(Ok(Err(e))) => bail!("{e}"),
            Ok(Ok(Ok(()))) => {}
        }
    }
    Ok(task)
}

struct LeanPeer {
    conn: LeanConn,
    /// `--vary-node`.
    vary: bool,
    /// The update_self request, re-stamped and re-encoded for every send.
    req: CoordinateRequest,
    agent: bool,
    /// For clients: the agent whose node makes the client ready.
    want: Option<Uuid>,
    ready: Option<oneshot::Sender<std::result::Result<(), String>>>,
    k: usize,
    rate: f64,
    /// Peers each of its updates goes to (an agent's clients, or 1).
    recipients: u64,
    counters: Arc<Counters>,
    plan_rx: watch::Receiver<Option<Plan>>,
}

/// The one task of a lean peer: reads and accounts responses, sends `update_self` on schedule,
/// answers pings and returns window, all on one socket; every wake-up ends with one write.
async fn drive_lean(mut p: LeanPeer) -> (Histogram, Histogram) {
    let mut tally = Tally::new();
    let mut plan: Option<Plan> = None;
    let period = (p.rate > 0.0).then(|| Duration::from_secs_f64(1.0 / p.rate));
    let mut next: Option<Instant> = None;
    let send_timer = tokio::time::sleep(Duration::from_secs(86_400));
    let end_timer = tokio::time::sleep(Duration::from_secs(86_400));
    tokio::pin!(send_timer, end_timer);
    // Room for one more update (the node is constant but for `as_of`).
    let need = prost::Message::encoded_len(&p.req) as u32 + 64;
    let res: std::result::Result<(), LeanError> = async {
        loop {
            let can_send = next.is_some() && p.conn.wire.send_window() >= need;
            tokio::select! {
                biased;
                r = p.conn.read() => {
                    r?;
                    let LeanPeer { conn, agent, want, ready, counters, .. } = &mut p;
                    let mut on = |resp: &CoordinateResponse| {
                        if !resp.error.is_empty() {
                            counters.failed.fetch_add(1, Ordering::Relaxed);
                        }
                        if let Some(w) = want {
                            if ready.is_some() && has_node_of(resp, w) {
                                if let Some(tx) = ready.take() {
                                    let _ = tx.send(Ok(()));
                                }
                            }
                        }
                        if let Some(pl) = &plan {
                            let (n, dup) = tally.count(resp, *agent, pl);
                            counters.delivered_window.fetch_add(n, Ordering::Relaxed);
                            counters.duplicates.fetch_add(dup, Ordering::Relaxed);
                        }
                    };
                    conn.process(&mut on)?;
                }
                _ = &mut send_timer, if can_send => {
                    // Stamped with its scheduled time (armed only while `next` and `plan` are set).
                    let stamp = match (next, plan) {
                        (Some(n), Some(pl)) => timestamp(pl.wall_at(n)),
                        _ => timestamp(wall_ns()),
                    };
                    if let Some(n) = p
                        .req
                        .update_self
                        .as_mut()
                        .and_then(|u| u.node.as_mut())
                    {
                        n.as_of = Some(stamp);
                        if p.vary {
                            n.preferred_derp = n.preferred_derp % 900 + 1;
                        }
                    }
                    p.conn.wire.queue_request(&p.req)?;
                    // The timer is armed only while `next` is set, which needs a period and a plan.
                    next = match (next, period, plan) {
                        (Some(n), Some(per), Some(pl)) if n + per < pl.send_end() => {
                            send_timer.as_mut().reset((n + per).into());
                            Some(n + per)
                        }
                        _ => None,
                    };
                }
                _ = &mut end_timer, if plan.is_some() => return Ok(()),
                c = p.plan_rx.changed(), if plan.is_none() => {
                    if c.is_err() {
                        // The run was abandoned (setup failed elsewhere).
                        return Ok(());
                    }
                    let Some(pl) = *p.plan_rx.borrow_and_update() else { continue };
                    plan = Some(pl);
                    end_timer.as_mut().reset(pl.recv_end().into());
                    if let Some(per) = period {
                        p.counters.offered_window.fetch_add(
                            pl.scheduled_in_window(p.k, per) * p.recipients,
                            Ordering::Relaxed,
                        );
                        let first = pl.first_send(p.k, per);
                        if first < pl.send_end() {
                            next = Some(first);
                            send_timer.as_mut().reset(first.into());
                        }
                    }
                }
            }
            p.conn.flush().await?;
        }
    }
    .await;
    if let Err(e) = res {
        p.counters.failed.fetch_add(1, Ordering::Relaxed);
        if let Some(tx) = p.ready.take() {
            let _ = tx.send(Err(e.to_string()));
        }
    }
    (tally.fan, tally.to_agent)
}

/// Sets up every peer with the lean client; returns their tasks, agents first.
async fn setup_lean(
    args: &CoordArgs,
    auth: &AuthFile,
    counters: &Arc<Counters>,
    plan_rx: &watch::Receiver<Option<Plan>>,
) -> Result<Vec<PeerTask>> {
    let mut agents: Vec<PeerTask> = stream::iter(0..args.agents)
        .map(|i| {
            open_lean(
                args,
                target(args, auth, i, true),
                i,
                counters.clone(),
                plan_rx.clone(),
            )
        })
        .buffer_unordered(args.concurrency.max(1))
        .try_collect()
        .await?;
    let clients: Vec<PeerTask> = stream::iter(0..args.agents * args.clients_per_agent)
        .map(|i| {
            open_lean(
                args,
                target(args, auth, i / args.clients_per_agent.max(1), false),
                args.agents + i,
                counters.clone(),
                plan_rx.clone(),
            )
        })
        .buffer_unordered(args.concurrency.max(1))
        .try_collect()
        .await?;
    agents.extend(clients);
    Ok(agents)
}

/// Runs the coordinator workload.
pub async fn run(args: CoordArgs) -> Result<CoordReport> {
    let auth = match (&args.auth_file, args.flavor) {
        (Some(p), _) => {
            let text = std::fs::read_to_string(p).with_context(|| format!("{}", p.display()))?;
            let a: AuthFile = serde_json::from_str(&text)?;
            if a.agents.len() < args.agents {
                bail!(
                    "auth file has {} agents, need {}",
                    a.agents.len(),
                    args.agents
                );
            }
            a
        }
        (None, Flavor::Gocoord) => AuthFile::generate(args.agents),
        (None, Flavor::Tailnetd) => bail!("--auth-file is required for tailnetd"),
    };
    let counters = Arc::new(Counters::default());
    let (plan_tx, plan_rx) = watch::channel(None::<Plan>);
    let rss_before = args.server_pid.and_then(procfs::rss_bytes);
    let t = Instant::now();
    // Agents first, then their clients.
    enum Set {
        Full(Vec<Peer>),
        Lean(Vec<PeerTask>),
    }
    let set = match args.client {
        ClientKind::Full => Set::Full(setup_full(&args, &auth).await?),
        ClientKind::Lean => Set::Lean(setup_lean(&args, &auth, &counters, &plan_rx).await?),
    };
    drop(plan_rx);
    let setup = t.elapsed().as_secs_f64();
    let peers = match &set {
        Set::Full(p) => p.len(),
        Set::Lean(p) => p.len(),
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_after = args.server_pid.and_then(procfs::rss_bytes);

    let start = Instant::now();
    let wall0 = wall_ns();
    let warm = Duration::from_secs_f64(args.warmup);
    let dur = Duration::from_secs_f64(args.duration);
    let win_end = warm + dur;
    let plan = Plan {
        start,
        wall0,
        win_start: warm,
        win_end,
        win_start_wall: wall0 + warm.as_nanos() as u64,
        win_end_wall: wall0 + win_end.as_nanos() as u64,
    };
    let (senders, receivers) = match set {
        Set::Full(p) => run_full(&args, p, plan, &counters).into_iter().unzip(),
        Set::Lean(tasks) => {
            plan_tx.send_replace(Some(plan));
            (Vec::new(), tasks)
        }
    };
    let mut cpu0 = None;
    tokio::time::sleep_until((start + warm).into()).await;
    if let Some(pid) = args.server_pid {
        cpu0 = procfs::cpu_seconds(pid);
    }
    let me = std::process::id();
    let own0 = procfs::cpu_seconds(me);
    tokio::time::sleep_until((start + win_end).into()).await;
    let cpu1 = args.server_pid.and_then(procfs::cpu_seconds);
    let own1 = procfs::cpu_seconds(me);
    let mut fan = Histogram::new();
    let mut to_agent = Histogram::new();
    for s in senders {
        let _ = s.await;
    }
    for r in receivers {
        if let Ok((f, a)) = r.await {
            fan.merge(&f);
            to_agent.merge(&a);
        }
    }
    let secs = dur.as_secs_f64();
    let ms = |ns: u64| ns as f64 / 1e6;
    Ok(CoordReport {
        mode: "coordinator".into(),
        label: args.label.clone(),
        flavor: match args.flavor {
            Flavor::Tailnetd => "tailnetd".into(),
            Flavor::Gocoord => "gocoord".into(),
        },
        agents: args.agents,
        clients_per_agent: args.clients_per_agent,
        peers,
        offered_deliveries_per_s: counters.offered_window.load(Ordering::Relaxed) as f64 / secs,
        delivered_updates_per_s: counters.delivered_window.load(Ordering::Relaxed) as f64 / secs,
        fanout_p50_ms: ms(fan.quantile(0.5)),
        fanout_p99_ms: ms(fan.quantile(0.99)),
        fanout_max_ms: ms(fan.max()),
        to_agent_p50_ms: ms(to_agent.quantile(0.5)),
        to_agent_p99_ms: ms(to_agent.quantile(0.99)),
        setup_peers_per_s: peers as f64 / setup.max(1e-9),
        rss_per_peer_bytes: match (rss_before, rss_after) {
            (Some(b), Some(a)) if peers > 0 => Some((a as f64 - b as f64) / peers as f64),
            _ => None,
        },
        server_cpu_util: match (cpu0, cpu1) {
            (Some(a), Some(b)) => Some((b - a) / secs),
            _ => None,
        },
        server_peak_rss_bytes: args.server_pid.and_then(procfs::peak_rss_bytes),
        failed_streams: counters.failed.load(Ordering::Relaxed),
        duplicate_updates: counters.duplicates.load(Ordering::Relaxed),
        loadgen_cpu_util: own0.zip(own1).map(|(a, b)| (b - a) / secs),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offered_load_counts_the_sends_scheduled_inside_the_window() {
        let s = Duration::from_secs;
        let plan = Plan {
            start: Instant::now(),
            wall0: 0,
            win_start: s(1),
            win_end: s(6),
            win_start_wall: 1_000_000_000,
            win_end_wall: 6_000_000_000,
        };
        // Peer 0 starts at once: sends at 0 s (warm-up) and 4 s (window); 8 s is past the end.
        assert_eq!(plan.scheduled_in_window(0, s(4)), 1);
        // At 0.25/s a 5 s window holds one or two sends, never 1.25; over many peers the mean
        // is the nominal rate.
        let counts: Vec<u64> = (0..1000)
            .map(|k| plan.scheduled_in_window(k, s(4)))
            .collect();
        assert!(counts.iter().all(|&n| n == 1 || n == 2), "{counts:?}");
        let total: u64 = counts.iter().sum();
        assert!((1200..=1300).contains(&total), "{total} for a nominal 1250");
        // Every stamp the senders would put inside the window is counted, none outside.
        let fast = plan.scheduled_in_window(3, Duration::from_millis(100));
        assert_eq!(fast, 50);
    }
}
