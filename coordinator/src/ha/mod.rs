//! Horizontal scale: replicas share one peer graph through PostgreSQL, in Coder's own HA tables
//! (`tailnet_coordinators`, `tailnet_peers`, `tailnet_tunnels`) and on Coder's channels, so that
//! tailnetd replicas and Coder's own HA coordinator (enterprise `pgcoord`) see each other's peers.
//!
//! Why: one process holds the in-memory sharded graph ([`crate::graph`]); it stays the source of
//! truth for its **local** peers. This module mirrors them into PostgreSQL the way pgcoord does, and
//! feeds the peers other replicas publish into the graph as **remote peers** through one
//! [`RemoteSource`] (see [`crate::graph::remote`]).
//!
//! # What it owns
//!
//! * A random **coordinator id** per start, its row in `tailnet_coordinators`, refreshed every
//!   [`HEARTBEAT_PERIOD`] and published on `tailnet_coordinator_heartbeat` (payload: the id).
//!   [`MISSED_HEARTBEATS`] consecutive failed heartbeat writes make the replica *unhealthy*
//!   ([`HaHandle::healthy`], `/readyz` 503): every session is closed with pgcoord's
//!   `"coordinator unhealthy"` and new ones are refused with it
//!   ([`PeerGraph::set_unhealthy`]); one successful heartbeat makes it healthy again.
//! * The **writer**: it watches every local peer ([`PeerGraph::remote_source_all`]) and writes what
//!   pgcoord's binder/tunneler/handshaker would: a node → `tailnet_peers` upsert `ok`; a LOST end →
//!   status `lost` (row and tunnels kept); a graceful Disconnect → the row and every tunnel whose
//!   source it is are deleted; tunnel add/remove → `tailnet_tunnels` (also between two local peers:
//!   either may move to another replica); READY_FOR_HANDSHAKE to a remote peer → a notification on
//!   `tailnet_ready_for_handshake` (`"<to>,<from>"`). Each write publishes on
//!   `tailnet_peer_update` (`"<id>"`) or `tailnet_tunnel_update` (`"<src>,<dst>"`), in the same
//!   statement. A node that differs from the last written one only in `as_of` is not written.
//!   **Coalescing:** the writer takes what is queued (up to 4,096 events) and writes
//!   only the last node of each peer between two of its other events, so a burst of updates is one
//!   write of the latest (`coordinator_ha_coalesced_total`). It remembers only **connected** local
//!   peers and their tunnels (a LOST or DISCONNECTED peer is forgotten: its row stays for the
//!   others, and after a crash the others see it LOST anyway), so its memory follows the graph.
//!   **Overflow:** its queue is bounded ([`HaOptions::writer_queue`]); when it overflows, events
//!   are dropped (counted in `coordinator_remote_source_overflows_total`) and the writer
//!   re-synchronises: [`PeerGraph::resync_all`] restarts the queue and hands it every local peer
//!   atomically; peers it wrote that are gone are set `lost`, stale tunnels deleted, the rest
//!   written (`coordinator_ha_resyncs_total`). A write that fails because the database is away is
//!   retried (the queue fills meanwhile; an overflow ends in a re-sync).
//! * **Connections:** one `deadpool-postgres` pool ([`POOL_SIZE`] connections) shared by writer,
//!   mapper, heartbeat and clean-up (a connection found closed is replaced on its next use), and
//!   one dedicated LISTEN connection. Statements per kind: `coordinator_ha_writes_total`.
//! * The **mapper**: one `LISTEN` connection. A notification about peer X (or a tunnel with X at
//!   one end) makes it re-read X's rows and X's tunnels, keep the ends that are local here, and
//!   apply X's **best binding** to the graph: `ok` rows of live coordinators beat `lost` ones, newer
//!   `updated_at` beats older (pgcoord's rule). No row left → DISCONNECTED; only lost rows or
//!   only rows of dead coordinators → LOST. A coordinator is dead [`MISSED_HEARTBEATS`] ×
//!   [`HEARTBEAT_PERIOD`] after its last heartbeat *received here* (clock skew is irrelevant);
//!   its death re-maps every remote peer. A new coordinator re-maps its peers.
//! * Clean-up at start and every [`CLEANUP_PERIOD`]: Coder's `CleanTailnetCoordinators`,
//!   `CleanTailnetLostPeers`, `CleanTailnetTunnels` (24 h).
//! * **PostgreSQL restarts and crashes** end every connection, the LISTEN one included. It
//!   redials, re-LISTENs, and then has the writer re-write every local peer and tunnel it mirrors
//!   (a crash truncates the UNLOGGED tables) and the mapper re-read every remote peer it holds
//!   (notifications sent meanwhile are lost) and the remote ends of local peers' tunnels. Pooled
//!   connections found closed are replaced on use; a failed mapper read re-reads everything. A
//!   restart that takes longer than [`MISSED_HEARTBEATS`] heartbeats makes the replica unhealthy
//!   meanwhile, as in pgcoord.
//! * Shutdown ([`HaHandle::shutdown`]): own peers set `lost` and published; the coordinator row is
//!   kept (pgcoord PR #14165: peers must not look disconnected during a rolling deploy).
//!
//! # Where tailnetd differs from pgcoord on purpose
//!
//! * **Liveness is per connection.** pgcoord keys bindings by peer id, so a replaced connection's
//!   teardown can write LOST after the newcomer's first NODE. Here the graph ignores a stale
//!   connection's end ([`crate::graph`], "Liveness is per connection"), so no stale LOST reaches
//!   the writer.
//! * **One re-read per notification, no batching.** pgcoord's querier batches up to 50 keys and
//!   reads bindings of all tunnel peers of a local peer; here the mapper reads one remote peer's
//!   rows and tunnels per notification, which gives the same result per peer.
//! * **Local wins.** A peer id connected here is never also remote here (the graph's rule); rows
//!   of that id under other coordinators are ignored while it is connected here.
//! * **Overflow re-syncs** (above): pgcoord's binder also keeps one pending binding per peer, but
//!   its bounded channels drop what does not fit; here an overflow ends in a re-sync.

mod schema;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use futures_util::StreamExt;
use prometheus::{IntCounter, IntCounterVec, Opts, Registry};
use prost::Message;
use proto::tailnet::v2::coordinate_response::peer_update::Kind;
use proto::tailnet::v2::Node;
use tokio::sync::{mpsc, Notify};
use tokio::task::JoinHandle;
use tokio_postgres::{AsyncMessage, Client, NoTls};
use uuid::Uuid;

pub use self::schema::{coderd_managed, missing_columns, prepare, REQUIRED_COLUMNS};
use crate::graph::{PeerGraph, RemoteSource, SourceEvent, SourceEvents};

/// Coder's `HeartbeatPeriod`.
pub const HEARTBEAT_PERIOD: Duration = Duration::from_secs(2);
/// Coder's `MissedHeartbeats`: a coordinator silent for this many periods is dead; this many
/// failed heartbeat writes in a row make this replica unhealthy.
pub const MISSED_HEARTBEATS: u32 = 3;
/// Coder's cleanup period.
pub const CLEANUP_PERIOD: Duration = Duration::from_secs(3600);
/// Coder's channel names.
pub const CHANNEL_PEER_UPDATE: &str = "tailnet_peer_update";
/// See [`CHANNEL_PEER_UPDATE`].
pub const CHANNEL_TUNNEL_UPDATE: &str = "tailnet_tunnel_update";
/// See [`CHANNEL_PEER_UPDATE`].
pub const CHANNEL_HEARTBEAT: &str = "tailnet_coordinator_heartbeat";
/// See [`CHANNEL_PEER_UPDATE`].
pub const CHANNEL_READY_FOR_HANDSHAKE: &str = "tailnet_ready_for_handshake";
pub use crate::graph::ERR_UNHEALTHY;

/// Events queued from the graph to the writer before it must re-synchronise.
pub const WRITER_QUEUE: usize = 65_536;
/// Pooled connections per replica (besides the LISTEN connection).
pub const POOL_SIZE: usize = 4;
/// Bounded queues between the tasks.
const HINT_QUEUE: usize = 4096;
const NOTIFY_QUEUE: usize = 8192;

/// Errors of the PostgreSQL store.
#[derive(Debug, thiserror::Error)]
pub enum HaError {
    /// A database call failed.
    #[error("postgres: {0}")]
    Postgres(#[from] tokio_postgres::Error),
    /// Coder's tables lack what tailnetd needs.
    #[error(
        "the database lacks Coder's tailnet HA schema (tailnetd never alters a coderd-managed \
         database; run coderd's migrations): missing or mistyped columns: {0}"
    )]
    Schema(String),
    /// No connection could be had from the pool (or the pool could not be built).
    #[error("postgres pool: {0}")]
    Pool(String),
    /// The graph already has a watch-all source.
    #[error("the peer graph already has a PostgreSQL store")]
    AlreadyAttached,
}

impl From<deadpool_postgres::PoolError> for HaError {
    fn from(e: deadpool_postgres::PoolError) -> Self {
        match e {
            deadpool_postgres::PoolError::Backend(e) => HaError::Postgres(e),
            other => HaError::Pool(other.to_string()),
        }
    }
}

/// A running store.
#[derive(Debug)]
pub struct HaHandle {
    coordinator_id: Uuid,
    healthy: Arc<AtomicBool>,
    tasks: Vec<JoinHandle<()>>,
    pool: Pool,
}

impl HaHandle {
    /// This replica's coordinator id (random per start).
    pub fn coordinator_id(&self) -> Uuid {
        self.coordinator_id
    }

    /// False after [`MISSED_HEARTBEATS`] failed heartbeat writes in a row, until one succeeds.
    pub fn healthy(&self) -> bool {
        self.healthy.load(Ordering::Acquire)
    }

    /// The flag behind [`HaHandle::healthy`], for readiness probes.
    pub fn healthy_flag(&self) -> Arc<AtomicBool> {
        self.healthy.clone()
    }

    /// Stops the tasks and marks this coordinator's peers lost (published), like pgcoord's close.
    pub async fn shutdown(self) -> Result<(), HaError> {
        for t in &self.tasks {
            t.abort();
        }
        let db = self.pool.get().await?;
        let rows = db
            .query(
                "UPDATE tailnet_peers SET status = 'lost'::tailnet_status, \
                 updated_at = now() at time zone 'utc' WHERE coordinator_id = $1 RETURNING id",
                &[&self.coordinator_id],
            )
            .await?;
        for r in rows {
            let id: Uuid = r.get(0);
            notify(&db, CHANNEL_PEER_UPDATE, &id.to_string()).await?;
        }
        Ok(())
    }

    /// Stops the tasks without writing anything (what a crash looks like to the others).
    pub fn abort(self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl Drop for HaHandle {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Pause before retrying after a connection failure.
const REDIAL_PAUSE: Duration = Duration::from_millis(500);
/// Pseudo-channel the listener uses to tell the mapper that notifications may have been missed.
const RESYNC: &str = "";
/// Most events the writer takes from its queue at once (and coalesces).
const WRITER_BATCH: usize = 4096;

/// Options of [`start_with`].
#[derive(Debug, Clone)]
pub struct HaOptions {
    /// Where the store's metrics are registered.
    pub registry: Registry,
    /// Events queued from the graph to the writer before it must re-synchronise.
    pub writer_queue: usize,
    /// Most pooled connections (writer, mapper, heartbeat and clean-up share them; the LISTEN
    /// connection is separate).
    pub pool_size: usize,
}

impl Default for HaOptions {
    fn default() -> Self {
        Self {
            registry: Registry::new(),
            writer_queue: WRITER_QUEUE,
            pool_size: POOL_SIZE,
        }
    }
}

/// The store's metrics.
#[derive(Debug, Clone)]
struct HaMetrics {
    /// Statements sent by the writer, by what they write.
    writes: IntCounterVec,
    /// Node updates not written because a later one for the same peer was in the same batch.
    coalesced: IntCounter,
    /// Re-synchronisations of the writer after its queue overflowed.
    resyncs: IntCounter,
    /// Statements that failed (and were retried or given up).
    errors: IntCounterVec,
}

impl HaMetrics {
    fn new(registry: &Registry) -> Result<Self, prometheus::Error> {
        let m = Self {
            writes: IntCounterVec::new(
                Opts::new(
                    "coordinator_ha_writes_total",
                    "Statements the PostgreSQL writer sent, by kind (peer, lost, delete, tunnel, \
                     untunnel, rfh).",
                ),
                &["kind"],
            )?,
            coalesced: IntCounter::new(
                "coordinator_ha_coalesced_total",
                "Node updates not written because a newer one for the same peer replaced them.",
            )?,
            resyncs: IntCounter::new(
                "coordinator_ha_resyncs_total",
                "Writer re-synchronisations from the graph after its queue overflowed.",
            )?,
            errors: IntCounterVec::new(
                Opts::new(
                    "coordinator_ha_errors_total",
                    "Failed PostgreSQL statements, by task (writer, mapper, heartbeat).",
                ),
                &["task"],
            )?,
        };
        registry.register(Box::new(m.writes.clone()))?;
        registry.register(Box::new(m.coalesced.clone()))?;
        registry.register(Box::new(m.resyncs.clone()))?;
        registry.register(Box::new(m.errors.clone()))?;
        Ok(m)
    }
}

/// One LISTEN connection: its client (the connection lives as long as it) and the task that pumps
/// its notifications into `tx` (ends when the connection does).
async fn listen(
    url: &str,
    tx: mpsc::Sender<(String, String)>,
) -> Result<(Client, JoinHandle<()>), HaError> {
    let (client, mut conn) = tokio_postgres::connect(url, NoTls).await?;
    let pump = tokio::spawn(async move {
        let mut messages = futures_util::stream::poll_fn(move |cx| conn.poll_message(cx));
        while let Some(m) = messages.next().await {
            match m {
                Ok(AsyncMessage::Notification(n)) => {
                    if tx
                        .send((n.channel().to_owned(), n.payload().to_owned()))
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "postgres LISTEN connection failed");
                    return;
                }
            }
        }
    });
    let r = client
        .batch_execute(&format!(
            "LISTEN {CHANNEL_PEER_UPDATE}; LISTEN {CHANNEL_TUNNEL_UPDATE}; \
             LISTEN {CHANNEL_HEARTBEAT}; LISTEN {CHANNEL_READY_FOR_HANDSHAKE};"
        ))
        .await;
    if let Err(e) = r {
        pump.abort();
        return Err(e.into());
    }
    Ok((client, pump))
}

async fn connect(url: &str) -> Result<Client, HaError> {
    let (client, conn) = tokio_postgres::connect(url, NoTls).await?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::warn!(error = %e, "postgres connection ended");
        }
    });
    Ok(client)
}

fn pool(url: &str, size: usize) -> Result<Pool, HaError> {
    let config: tokio_postgres::Config = url.parse()?;
    let manager = Manager::from_config(
        config,
        NoTls,
        ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        },
    );
    Pool::builder(manager)
        .max_size(size.max(1))
        .runtime(Runtime::Tokio1)
        .create_timeout(Some(Duration::from_secs(10)))
        .wait_timeout(Some(Duration::from_secs(10)))
        .build()
        .map_err(|e| HaError::Pool(e.to_string()))
}

async fn notify(db: &Client, channel: &str, payload: &str) -> Result<(), HaError> {
    db.execute("SELECT pg_notify($1, $2)", &[&channel, &payload])
        .await?;
    Ok(())
}

/// Whether the database at `url` is managed by coderd (it has coderd's migration ledger). Next to
/// coderd, pgcoord already mirrors coderd's peers there, so the sidecar bridge must be off.
pub async fn coderd_managed_at(url: &str) -> Result<bool, HaError> {
    let db = connect(url).await?;
    coderd_managed(&db).await
}

/// [`start_with`] with default options (metrics in a registry of their own).
pub async fn start(graph: Arc<PeerGraph>, url: &str) -> Result<HaHandle, HaError> {
    start_with(graph, url, HaOptions::default()).await
}

/// Connects to `url`, prepares Coder's tables ([`prepare`]), and starts mirroring `graph`.
pub async fn start_with(
    graph: Arc<PeerGraph>,
    url: &str,
    options: HaOptions,
) -> Result<HaHandle, HaError> {
    let metrics = HaMetrics::new(&options.registry).map_err(|e| HaError::Pool(e.to_string()))?;
    let pool = pool(url, options.pool_size)?;
    {
        let admin = pool.get().await?;
        prepare(&admin).await?;
    }
    let coordinator_id = Uuid::new_v4();
    let (source, events) = graph
        .remote_source_all(options.writer_queue)
        .ok_or(HaError::AlreadyAttached)?;

    // LISTEN first, so nothing published after our first heartbeat is missed.
    let (notify_tx, notify_rx) = mpsc::channel::<(String, String)>(NOTIFY_QUEUE);
    let republish = Arc::new(Notify::new());
    let first = listen(url, notify_tx.clone()).await?;
    let listen_url = url.to_owned();
    let listen_republish = republish.clone();
    let listen_task = tokio::spawn(async move {
        let mut current = first;
        loop {
            // Wait for the connection to end (PostgreSQL restarted or crashed, or the network
            // failed: every connection is gone then), redial, have the writer write everything
            // again and the mapper re-read what it may have missed.
            let _ = (&mut current.1).await;
            drop(current);
            tracing::warn!("postgres LISTEN connection ended; redialling");
            current = loop {
                match listen(&listen_url, notify_tx.clone()).await {
                    Ok(c) => break c,
                    Err(e) => {
                        tracing::warn!(error = %e, "postgres LISTEN redial failed");
                        tokio::time::sleep(REDIAL_PAUSE).await;
                    }
                }
            };
            listen_republish.notify_one();
            if notify_tx
                .send((RESYNC.to_owned(), String::new()))
                .await
                .is_err()
            {
                return;
            }
        }
    });

    let healthy = Arc::new(AtomicBool::new(true));
    {
        let db = pool.get().await?;
        heartbeat_once(&db, coordinator_id).await?;
        clean(&db).await?;
    }
    let hb_healthy = healthy.clone();
    let hb_graph = graph.clone();
    let hb_pool = pool.clone();
    let hb_errors = metrics.errors.with_label_values(&["heartbeat"]);
    let heartbeat_task = tokio::spawn(async move {
        let mut failures = 0u32;
        let mut tick = tokio::time::interval(HEARTBEAT_PERIOD);
        let mut last_clean = Instant::now();
        loop {
            tick.tick().await;
            let beat = match hb_pool.get().await {
                Ok(db) => heartbeat_once(&db, coordinator_id).await,
                Err(e) => Err(e.into()),
            };
            match beat {
                Ok(()) => {
                    failures = 0;
                    if !hb_healthy.swap(true, Ordering::AcqRel) {
                        tracing::info!("coordinator healthy again");
                        hb_graph.set_unhealthy(false);
                    }
                }
                Err(e) => {
                    hb_errors.inc();
                    failures += 1;
                    tracing::warn!(error = %e, failures, "coordinator heartbeat failed");
                    if failures >= MISSED_HEARTBEATS && hb_healthy.swap(false, Ordering::AcqRel) {
                        tracing::error!("coordinator unhealthy: heartbeats fail");
                        hb_graph.set_unhealthy(true);
                    }
                }
            }
            if last_clean.elapsed() >= CLEANUP_PERIOD {
                last_clean = Instant::now();
                let r = match hb_pool.get().await {
                    Ok(db) => clean(&db).await,
                    Err(e) => Err(e.into()),
                };
                if let Err(e) = r {
                    tracing::warn!(error = %e, "tailnet cleanup failed");
                }
            }
        }
    });

    let (hint_tx, hint_rx) = mpsc::channel(HINT_QUEUE);
    let writer = Writer {
        pool: pool.clone(),
        me: coordinator_id,
        graph: graph.clone(),
        nodes: HashMap::new(),
        tunnels: HashSet::new(),
        hints: hint_tx,
        republish,
        metrics: metrics.clone(),
    };
    let writer_task = tokio::spawn(writer.run(events));

    let mut mapper = Mapper {
        pool: pool.clone(),
        me: coordinator_id,
        graph,
        source,
        coords: HashMap::new(),
        tracked: HashMap::new(),
        errors: metrics.errors.with_label_values(&["mapper"]),
    };
    mapper.load_live_coordinators().await?;
    let mapper_task = tokio::spawn(mapper.run(notify_rx, hint_rx));

    Ok(HaHandle {
        coordinator_id,
        healthy,
        tasks: vec![listen_task, heartbeat_task, writer_task, mapper_task],
        pool,
    })
}

async fn heartbeat_once(db: &Client, me: Uuid) -> Result<(), HaError> {
    db.execute(
        "WITH h AS (INSERT INTO tailnet_coordinators (id, heartbeat_at) \
         VALUES ($1, now() at time zone 'utc') ON CONFLICT (id) \
         DO UPDATE SET heartbeat_at = now() at time zone 'utc' RETURNING id) \
         SELECT pg_notify('tailnet_coordinator_heartbeat', id::text) FROM h",
        &[&me],
    )
    .await?;
    Ok(())
}

async fn clean(db: &Client) -> Result<(), HaError> {
    db.batch_execute(
        "DELETE FROM tailnet_coordinators WHERE heartbeat_at < now() - INTERVAL '24 HOURS'; \
         DELETE FROM tailnet_peers WHERE updated_at < now() - INTERVAL '24 HOURS' \
           AND status = 'lost'::tailnet_status; \
         DELETE FROM tailnet_tunnels WHERE updated_at < now() - INTERVAL '24 HOURS' AND \
           NOT EXISTS (SELECT 1 FROM tailnet_peers WHERE id = tailnet_tunnels.src_id \
             AND coordinator_id = tailnet_tunnels.coordinator_id);",
    )
    .await?;
    Ok(())
}

/// Work for the mapper that comes from local events rather than from PostgreSQL.
#[derive(Debug)]
enum Hint {
    /// Local peer connected: map the remote ends of its tunnels.
    LocalConnected(Uuid),
    /// Local peer `local`'s tunnel to a possibly remote `remote` was written or deleted: map that
    /// pair (the mapper skips the notification of that write).
    Remote {
        /// The other end.
        remote: Uuid,
        /// The local peer.
        local: Uuid,
    },
}

/// What the writer last wrote about one connected local peer (to skip `as_of`-only updates and to
/// re-publish after PostgreSQL lost its rows).
struct Written {
    /// The node encoded without `as_of`.
    key: Vec<u8>,
    /// The node as written.
    bytes: Vec<u8>,
}

/// Keeps, of the Node events in `batch`, only the last one of each peer between two of its
/// other events (so a peer's order of node, tunnel, RFH and removal is kept); returns the events
/// to write and how many node updates were dropped.
fn coalesce(batch: Vec<SourceEvent>) -> (Vec<SourceEvent>, u64) {
    let mut later_node: HashSet<Uuid> = HashSet::new();
    let mut keep = vec![true; batch.len()];
    let mut dropped = 0;
    for (i, ev) in batch.iter().enumerate().rev() {
        match ev {
            SourceEvent::Node { about, .. } => {
                if !later_node.insert(*about) {
                    keep[i] = false;
                    dropped += 1;
                }
            }
            SourceEvent::Gone { about, .. }
            | SourceEvent::Connected { about }
            | SourceEvent::ReadyForHandshake { about, .. }
            | SourceEvent::TunnelAdded { about, .. }
            | SourceEvent::TunnelRemoved { about, .. } => {
                later_node.remove(about);
            }
            SourceEvent::Overflow => {}
        }
    }
    let out = batch
        .into_iter()
        .zip(keep)
        .filter_map(|(ev, k)| k.then_some(ev))
        .collect();
    (out, dropped)
}

/// Whether a failed statement is worth retrying: the connection (or the pool's next one) failed,
/// or the server is shutting down / restarting (SQLSTATE classes 08 and 57).
fn retryable(e: &HaError) -> bool {
    match e {
        HaError::Pool(_) => true,
        HaError::Postgres(e) => {
            e.is_closed()
                || match e.code() {
                    None => true,
                    Some(c) => c.code().starts_with("08") || c.code().starts_with("57"),
                }
        }
        HaError::Schema(_) | HaError::AlreadyAttached => false,
    }
}

/// Mirrors local peers into the tables.
struct Writer {
    pool: Pool,
    me: Uuid,
    graph: Arc<PeerGraph>,
    /// Connected local peers as written (LOST and DISCONNECTED ones are forgotten).
    nodes: HashMap<Uuid, Written>,
    /// Tunnels of connected local peers (src, dst) as written.
    tunnels: HashSet<(Uuid, Uuid)>,
    hints: mpsc::Sender<Hint>,
    /// Signalled after the LISTEN connection redialled: PostgreSQL may have lost everything.
    republish: Arc<Notify>,
    metrics: HaMetrics,
}

impl Writer {
    async fn run(mut self, mut events: SourceEvents) {
        loop {
            let first = tokio::select! {
                ev = events.recv() => match ev {
                    Some(ev) => ev,
                    None => return,
                },
                _ = self.republish.notified() => {
                    self.republish().await;
                    continue;
                }
            };
            // Take what is queued behind it (bounded), and write each peer's latest node only.
            let mut batch = vec![first];
            while batch.len() < WRITER_BATCH && !matches!(batch.last(), Some(SourceEvent::Overflow))
            {
                match events.try_recv() {
                    Some(Some(ev)) => batch.push(ev),
                    Some(None) | None => break,
                }
            }
            let overflowed = matches!(batch.last(), Some(SourceEvent::Overflow));
            let (batch, dropped) = coalesce(batch);
            self.metrics.coalesced.inc_by(dropped);
            for ev in batch {
                if !matches!(ev, SourceEvent::Overflow) {
                    self.apply_retrying(ev).await;
                }
            }
            if overflowed {
                self.resync().await;
            }
        }
    }

    /// Applies `ev`, retrying while the database is unreachable (the queue fills meanwhile and,
    /// if it overflows, [`Writer::resync`] catches up).
    async fn apply_retrying(&mut self, ev: SourceEvent) {
        loop {
            match self.apply(ev.clone()).await {
                Ok(()) => return,
                Err(e) => {
                    self.metrics.errors.with_label_values(&["writer"]).inc();
                    if !retryable(&e) {
                        tracing::warn!(error = %e, "postgres write failed");
                        return;
                    }
                    tracing::warn!(error = %e, "postgres write failed; retrying");
                    tokio::time::sleep(REDIAL_PAUSE).await;
                }
            }
        }
    }

    /// The queue overflowed, so events were dropped: re-read every connected local peer from the
    /// graph (which restarts the queue at the same moment) and write the difference.
    async fn resync(&mut self) {
        self.metrics.resyncs.inc();
        let Some(snapshot) = self.graph.resync_all() else {
            return;
        };
        tracing::warn!(
            peers = snapshot.len(),
            "postgres writer queue overflowed; re-synchronising from the graph"
        );
        let live: HashSet<Uuid> = snapshot.iter().map(|p| p.id).collect();
        let tunnels: HashSet<(Uuid, Uuid)> = snapshot
            .iter()
            .flat_map(|p| p.tunnels.iter().map(move |t| (p.id, *t)))
            .collect();
        // Peers that left while events were dropped: how they left is unknown, so LOST (their
        // tunnel peers keep WireGuard; the row is cleaned up on Coder's schedule).
        let gone: Vec<Uuid> = self
            .nodes
            .keys()
            .filter(|id| !live.contains(id))
            .copied()
            .collect();
        for id in gone {
            self.apply_retrying(SourceEvent::Gone {
                about: id,
                kind: Kind::Lost,
            })
            .await;
        }
        let stale: Vec<(Uuid, Uuid)> = self.tunnels.difference(&tunnels).copied().collect();
        for (about, to) in stale {
            self.apply_retrying(SourceEvent::TunnelRemoved { about, to })
                .await;
        }
        for p in snapshot {
            if let Some(node) = p.node {
                self.apply_retrying(SourceEvent::Node { about: p.id, node })
                    .await;
            }
            for to in p.tunnels {
                if !self.tunnels.contains(&(p.id, to)) {
                    self.apply_retrying(SourceEvent::TunnelAdded { about: p.id, to })
                        .await;
                }
            }
            let _ = self.hints.send(Hint::LocalConnected(p.id)).await;
        }
    }

    /// After PostgreSQL came back: it may have restarted, or crashed and truncated the UNLOGGED
    /// tables; write every local peer and tunnel again (and publish them), and have the mapper
    /// re-read the remote ends of local peers' tunnels.
    async fn republish(&mut self) {
        loop {
            let r = async {
                let db = self.pool.get().await?;
                for (id, w) in &self.nodes {
                    write_peer(&db, self.me, *id, &w.bytes).await?;
                    self.metrics.writes.with_label_values(&["peer"]).inc();
                }
                for (src, dst) in &self.tunnels {
                    write_tunnel(&db, self.me, *src, *dst).await?;
                    self.metrics.writes.with_label_values(&["tunnel"]).inc();
                }
                Ok::<(), HaError>(())
            }
            .await;
            match r {
                Ok(()) => break,
                Err(e) if retryable(&e) => {
                    tracing::warn!(error = %e, "re-publishing local peers failed; retrying");
                    tokio::time::sleep(REDIAL_PAUSE).await;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "re-publishing local peers failed");
                    return;
                }
            }
        }
        for id in self.nodes.keys() {
            let _ = self.hints.send(Hint::LocalConnected(*id)).await;
        }
    }

    async fn apply(&mut self, ev: SourceEvent) -> Result<(), HaError> {
        let writes = &self.metrics.writes;
        match ev {
            SourceEvent::Node { about, node } => {
                let mut cmp = (*node).clone();
                cmp.as_of = None;
                let key = cmp.encode_to_vec();
                if self.nodes.get(&about).is_some_and(|w| w.key == key) {
                    return Ok(());
                }
                let bytes = node.encode_to_vec();
                let db = self.pool.get().await?;
                write_peer(&db, self.me, about, &bytes).await?;
                writes.with_label_values(&["peer"]).inc();
                self.nodes.insert(about, Written { key, bytes });
            }
            SourceEvent::Gone { about, kind } => {
                let db = self.pool.get().await?;
                if kind == Kind::Disconnected {
                    db.execute(
                        "WITH p AS (DELETE FROM tailnet_peers WHERE id = $1 \
                         AND coordinator_id = $2 RETURNING id) \
                         SELECT pg_notify('tailnet_peer_update', id::text) FROM p",
                        &[&about, &self.me],
                    )
                    .await?;
                    db.execute(
                        "WITH t AS (DELETE FROM tailnet_tunnels WHERE coordinator_id = $1 \
                         AND src_id = $2 RETURNING src_id, dst_id) \
                         SELECT pg_notify('tailnet_tunnel_update', \
                         src_id::text || ',' || dst_id::text) FROM t",
                        &[&self.me, &about],
                    )
                    .await?;
                    writes.with_label_values(&["delete"]).inc_by(2);
                } else {
                    db.execute(
                        "WITH p AS (UPDATE tailnet_peers SET status = 'lost'::tailnet_status, \
                         updated_at = now() at time zone 'utc' WHERE id = $1 \
                         AND coordinator_id = $2 RETURNING id) \
                         SELECT pg_notify('tailnet_peer_update', id::text) FROM p",
                        &[&about, &self.me],
                    )
                    .await?;
                    writes.with_label_values(&["lost"]).inc();
                }
                // Gone either way: the row (lost) and its tunnels stay in PostgreSQL for the
                // others, but this writer keeps only connected peers.
                self.nodes.remove(&about);
                self.tunnels.retain(|(src, _)| *src != about);
            }
            SourceEvent::TunnelAdded { about, to } => {
                let db = self.pool.get().await?;
                write_tunnel(&db, self.me, about, to).await?;
                writes.with_label_values(&["tunnel"]).inc();
                self.tunnels.insert((about, to));
                let _ = self
                    .hints
                    .send(Hint::Remote {
                        remote: to,
                        local: about,
                    })
                    .await;
            }
            SourceEvent::TunnelRemoved { about, to } => {
                let db = self.pool.get().await?;
                db.execute(
                    "WITH t AS (DELETE FROM tailnet_tunnels WHERE coordinator_id = $1 \
                     AND src_id = $2 AND dst_id = $3 RETURNING src_id, dst_id) \
                     SELECT pg_notify('tailnet_tunnel_update', \
                     src_id::text || ',' || dst_id::text) FROM t",
                    &[&self.me, &about, &to],
                )
                .await?;
                writes.with_label_values(&["untunnel"]).inc();
                self.tunnels.remove(&(about, to));
                let _ = self
                    .hints
                    .send(Hint::Remote {
                        remote: to,
                        local: about,
                    })
                    .await;
            }
            SourceEvent::ReadyForHandshake { about, to } => {
                let db = self.pool.get().await?;
                notify(&db, CHANNEL_READY_FOR_HANDSHAKE, &format!("{to},{about}")).await?;
                writes.with_label_values(&["rfh"]).inc();
            }
            SourceEvent::Connected { about } => {
                let _ = self.hints.send(Hint::LocalConnected(about)).await;
            }
            SourceEvent::Overflow => {}
        }
        Ok(())
    }
}

async fn write_peer(db: &Client, me: Uuid, id: Uuid, bytes: &[u8]) -> Result<(), HaError> {
    db.execute(
        "WITH c AS (INSERT INTO tailnet_coordinators (id, heartbeat_at) \
         VALUES ($2, now() at time zone 'utc') ON CONFLICT (id) DO NOTHING), \
         p AS (INSERT INTO tailnet_peers \
         (id, coordinator_id, node, status, updated_at) \
         VALUES ($1, $2, $3, 'ok'::tailnet_status, now() at time zone 'utc') \
         ON CONFLICT (id, coordinator_id) DO UPDATE SET node = $3, \
         status = 'ok'::tailnet_status, updated_at = now() at time zone 'utc' \
         RETURNING id) \
         SELECT pg_notify('tailnet_peer_update', id::text) FROM p",
        &[&id, &me, &bytes],
    )
    .await?;
    Ok(())
}

async fn write_tunnel(db: &Client, me: Uuid, src: Uuid, dst: Uuid) -> Result<(), HaError> {
    db.execute(
        "WITH c AS (INSERT INTO tailnet_coordinators (id, heartbeat_at) \
         VALUES ($1, now() at time zone 'utc') ON CONFLICT (id) DO NOTHING), \
         t AS (INSERT INTO tailnet_tunnels \
         (coordinator_id, src_id, dst_id, updated_at) \
         VALUES ($1, $2, $3, now() at time zone 'utc') \
         ON CONFLICT (coordinator_id, src_id, dst_id) \
         DO UPDATE SET updated_at = now() at time zone 'utc' \
         RETURNING src_id, dst_id) \
         SELECT pg_notify('tailnet_tunnel_update', \
         src_id::text || ',' || dst_id::text) FROM t",
        &[&me, &src, &dst],
    )
    .await?;
    Ok(())
}

/// What the graph was last told about one remote peer.
#[derive(Debug, Default)]
struct Tracked {
    /// Encoded node of the applied best binding.
    node: Option<Vec<u8>>,
    /// Local peers it is linked with through this source.
    tunnels: HashSet<Uuid>,
}

/// Feeds other coordinators' peers into the graph.
struct Mapper {
    pool: Pool,
    me: Uuid,
    graph: Arc<PeerGraph>,
    source: RemoteSource,
    /// Other coordinators: when their last heartbeat arrived here, and whether they are alive.
    coords: HashMap<Uuid, (Instant, bool)>,
    tracked: HashMap<Uuid, Tracked>,
    errors: IntCounter,
}

impl Mapper {
    fn dead_after() -> Duration {
        HEARTBEAT_PERIOD * MISSED_HEARTBEATS
    }

    async fn load_live_coordinators(&mut self) -> Result<(), HaError> {
        let rows = self
            .pool
            .get()
            .await?
            .query(
                "SELECT id FROM tailnet_coordinators \
                 WHERE heartbeat_at > now() - INTERVAL '6 seconds' AND id <> $1",
                &[&self.me],
            )
            .await?;
        let now = Instant::now();
        for r in rows {
            self.coords.insert(r.get(0), (now, true));
        }
        Ok(())
    }

    async fn run(
        mut self,
        mut notes: mpsc::Receiver<(String, String)>,
        mut hints: mpsc::Receiver<Hint>,
    ) {
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        // A read failed, so something may be mapped stale: re-read everything on the next tick.
        let mut need_resync = false;
        loop {
            let r = tokio::select! {
                n = notes.recv() => match n {
                    Some((channel, payload)) => self.on_notification(&channel, &payload).await,
                    None => return,
                },
                h = hints.recv() => match h {
                    Some(Hint::Remote { remote, local }) => self.refresh_pair(remote, local).await,
                    Some(Hint::LocalConnected(id)) => self.on_local_connected(id).await,
                    None => return,
                },
                _ = tick.tick() => {
                    if std::mem::take(&mut need_resync) {
                        if let Err(e) = self.resync().await {
                            tracing::warn!(error = %e, "postgres re-mapping failed");
                            need_resync = true;
                        }
                    }
                    self.check_deaths().await
                }
            };
            if let Err(e) = r {
                self.errors.inc();
                tracing::warn!(error = %e, "postgres mapping failed");
                need_resync = true;
            }
        }
    }

    /// Notifications may have been missed: re-read every remote peer the graph holds. A peer
    /// found without rows now is LOST, not DISCONNECTED: after a PostgreSQL crash its replica
    /// has not re-published it yet, and a graceful disconnect cannot be told apart.
    async fn resync(&mut self) -> Result<(), HaError> {
        let ids: Vec<Uuid> = self.tracked.keys().copied().collect();
        for x in ids {
            self.refresh_as(x, Kind::Lost).await?;
        }
        Ok(())
    }

    async fn on_notification(&mut self, channel: &str, payload: &str) -> Result<(), HaError> {
        let ids: Vec<Uuid> = payload
            .split(',')
            .filter_map(|s| Uuid::parse_str(s.trim()).ok())
            .collect();
        match (channel, ids.as_slice()) {
            (RESYNC, _) => self.resync().await?,
            (CHANNEL_HEARTBEAT, [c]) if *c != self.me => {
                let prev = self.coords.insert(*c, (Instant::now(), true));
                if !matches!(prev, Some((_, true))) {
                    let rows = self
                        .pool
                        .get()
                        .await?
                        .query(
                            "SELECT DISTINCT id FROM tailnet_peers WHERE coordinator_id = $1",
                            &[c],
                        )
                        .await?;
                    for r in rows {
                        self.refresh(r.get(0)).await?;
                    }
                }
            }
            (CHANNEL_PEER_UPDATE, [x]) => self.refresh(*x).await?,
            (CHANNEL_TUNNEL_UPDATE, [src, dst]) => {
                let (src_local, dst_local) = (self.graph.is_local(*src), self.graph.is_local(*dst));
                // Remote peers are only linked with local ones: a tunnel between two remote
                // peers (or two local ones) changes nothing here. A tunnel from a local peer was
                // written by this replica's writer, which already had the pair re-read (rows of
                // a local id under other coordinators are ignored anyway).
                if dst_local && !src_local {
                    self.refresh_pair(*src, *dst).await?;
                }
            }
            (CHANNEL_READY_FOR_HANDSHAKE, [to, from])
                if self.graph.is_local(*to) && !self.graph.is_local(*from) =>
            {
                self.source.ready_for_handshake(*from, *to);
            }
            _ => {}
        }
        Ok(())
    }

    async fn on_local_connected(&mut self, local: Uuid) -> Result<(), HaError> {
        let rows = self
            .pool
            .get()
            .await?
            .query(
                "SELECT src_id, dst_id FROM tailnet_tunnels WHERE src_id = $1 OR dst_id = $1",
                &[&local],
            )
            .await?;
        let mut others = HashSet::new();
        for r in rows {
            let (s, d): (Uuid, Uuid) = (r.get(0), r.get(1));
            others.insert(if s == local { d } else { s });
        }
        for x in others {
            self.refresh(x).await?;
        }
        Ok(())
    }

    async fn check_deaths(&mut self) -> Result<(), HaError> {
        let mut died = false;
        for (id, (seen, alive)) in self.coords.iter_mut() {
            if *alive && seen.elapsed() >= Self::dead_after() {
                *alive = false;
                died = true;
                tracing::info!(coordinator = %id, "coordinator missed heartbeats; its peers are lost");
            }
        }
        if died {
            self.resync().await?;
        }
        Ok(())
    }

    fn alive(&self, c: Uuid) -> bool {
        self.coords.get(&c).is_some_and(|(_, a)| *a)
    }

    /// Re-reads remote peer `x` and applies its best binding and its tunnels with local peers.
    async fn refresh(&mut self, x: Uuid) -> Result<(), HaError> {
        self.refresh_as(x, Kind::Disconnected).await
    }

    /// [`Mapper::refresh`]; `absent` is what a peer without rows is reported as.
    async fn refresh_as(&mut self, x: Uuid, absent: Kind) -> Result<(), HaError> {
        self.refresh_inner(x, absent, None).await
    }

    /// Like [`Mapper::refresh`], but only the tunnel between `x` and local peer `local` is
    /// re-read (a tunnel notification: reading all of an agent's tunnels for each of its
    /// clients' tunnels would cost O(clients²)).
    async fn refresh_pair(&mut self, x: Uuid, local: Uuid) -> Result<(), HaError> {
        self.refresh_inner(x, Kind::Disconnected, Some(local)).await
    }

    async fn refresh_inner(
        &mut self,
        x: Uuid,
        absent: Kind,
        only: Option<Uuid>,
    ) -> Result<(), HaError> {
        if self.graph.is_local(x) {
            return Ok(());
        }
        let db = self.pool.get().await?;
        let rows = db
            .query(
                "SELECT coordinator_id, node, status::text, (extract(epoch FROM updated_at) * 1000000)::int8 \
                 FROM tailnet_peers WHERE id = $1 AND coordinator_id <> $2",
                &[&x, &self.me],
            )
            .await?;
        let tunnels = match only {
            None => {
                db.query(
                    "SELECT src_id, dst_id FROM tailnet_tunnels \
                         WHERE src_id = $1 OR dst_id = $1",
                    &[&x],
                )
                .await?
            }
            Some(l) => {
                db.query(
                    "SELECT src_id, dst_id FROM tailnet_tunnels \
                         WHERE (src_id = $1 AND dst_id = $2) OR (src_id = $2 AND dst_id = $1) \
                         LIMIT 1",
                    &[&x, &l],
                )
                .await?
            }
        };
        // Best binding: (usable NODE, updated_at) maximal.
        let mut best: Option<(bool, i64, Vec<u8>)> = None;
        for r in &rows {
            let c: Uuid = r.get(0);
            let node: Vec<u8> = r.get(1);
            let status: String = r.get(2);
            let at: i64 = r.get(3);
            let usable = status == "ok" && self.alive(c);
            let better = match &best {
                None => true,
                Some((bu, bat, _)) => (usable, at) > (*bu, *bat),
            };
            if better {
                best = Some((usable, at, node));
            }
        }
        let locals: HashSet<Uuid> = tunnels
            .iter()
            .map(|r| {
                let (s, d): (Uuid, Uuid) = (r.get(0), r.get(1));
                if s == x {
                    d
                } else {
                    s
                }
            })
            .filter(|o| *o != x && self.graph.is_local(*o))
            .collect();
        match best {
            None => {
                if self.tracked.remove(&x).is_some() {
                    if absent == Kind::Lost {
                        self.source.lost(x);
                    } else {
                        self.source.disconnected(x);
                    }
                }
            }
            Some((false, _, _)) => {
                if self.tracked.remove(&x).is_some() {
                    self.source.lost(x);
                }
            }
            Some((true, _, bytes)) => {
                let node = match Node::decode(bytes.as_slice()) {
                    Ok(n) => n,
                    Err(e) => {
                        tracing::warn!(peer = %x, error = %e, "undecodable node in tailnet_peers");
                        return Ok(());
                    }
                };
                let t = self.tracked.entry(x).or_default();
                if t.node.as_ref() != Some(&bytes) {
                    if !self.source.upsert_node(x, node) {
                        return Ok(());
                    }
                    t.node = Some(bytes);
                }
                for l in &locals {
                    if !t.tunnels.contains(l) && self.source.add_tunnel(x, *l) {
                        t.tunnels.insert(*l);
                    }
                }
                let gone: Vec<Uuid> = t
                    .tunnels
                    .difference(&locals)
                    .filter(|l| only.is_none_or(|o| o == **l))
                    .copied()
                    .collect();
                for l in gone {
                    self.source.remove_tunnel(x, l);
                    t.tunnels.remove(&l);
                }
            }
        }
        Ok(())
    }
}
