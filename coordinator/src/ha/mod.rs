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
//!   write of the latest (`coordinator_ha_coalesced_total`). **Batching:** what it took is split
//!   into stages of at most `STAGE_OPS` operations that touch disjoint rows, each written by
//!   one statement (multi-row upserts/deletes over arrays, one notification per row), and the
//!   stages of a batch are pipelined on one connection: one round trip per batch, however many
//!   peers it carries (`coordinator_ha_write_statements_total`). It remembers only **connected** local
//!   peers and their tunnels (a LOST or DISCONNECTED peer is forgotten: its row stays for the
//!   others, and after a crash the others see it LOST anyway), so its memory follows the graph.
//!   **Overflow:** its queue is bounded ([`HaOptions::writer_queue`]); when it overflows, events
//!   are dropped (counted in `coordinator_remote_source_overflows_total`) and the writer
//!   re-synchronises: [`PeerGraph::resync_all`] restarts the queue and hands it every local peer
//!   atomically, with the peers that left **gracefully** while events were dropped (the graph
//!   remembers up to [`crate::graph::RESYNC_LEAVES`] of them; beyond, counted in
//!   `coordinator_ha_resync_leaves_forgotten_total`). Those are deleted with the tunnels they are
//!   the source of, as their Disconnect would have been; other peers it wrote that are gone are
//!   set `lost` (row and tunnels kept); stale tunnels are deleted and the rest written
//!   (`coordinator_ha_resyncs_total`). A write that fails because the database is away is
//!   retried (the queue fills meanwhile; an overflow ends in a re-sync).
//! * **Connections:** one `deadpool-postgres` pool ([`POOL_SIZE`] connections) shared by writer,
//!   mapper, heartbeat and clean-up (a connection found closed is replaced on its next use), and
//!   one dedicated LISTEN connection. Statements per kind: `coordinator_ha_writes_total`.
//! * The **mapper**: one `LISTEN` connection. A notification about peer X (or a tunnel with X at
//!   one end) makes it re-read X's rows and X's tunnels, keep the ends that are local here, and
//!   apply X's **best binding** to the graph. **Batched:** it gathers notifications and hints for
//!   [`MAPPER_DEBOUNCE`] after the first (or up to `MAPPER_BATCH` keys) and reads all of them
//!   with one statement (`READ_BATCH`, `= ANY($1)`), so a burst of connects or updates costs one
//!   read per batch (`coordinator_ha_read_statements_total`); READY_FOR_HANDSHAKE notifications
//!   are passed on after the reads gathered before them. The best binding: `ok` rows of live coordinators beat `lost` ones, newer
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
//! * **Batches by time, not by worker.** pgcoord's querier batches up to 50 keys per query over
//!   10 workers and reads the bindings of all tunnel peers of a local peer; here one mapper reads
//!   every remote peer (and tunnel pair) notified within [`MAPPER_DEBOUNCE`] in one statement
//!   (up to `MAPPER_BATCH` keys), which gives the same result per peer. What one read
//!   returns is applied as one batch of the remote source ([`RemoteSource::begin_batch`]): the
//!   updates a local receiver has not taken yet share one queued response of up to 1,024
//!   updates, as pgcoord's mapper sends them, so a burst of remote peers takes one slot of the
//!   receiver's 512-response queue, not one per peer (the byte bound still counts every update).
//! * **Local wins.** A peer id connected here is never also remote here (the graph's rule); rows
//!   of that id under other coordinators are ignored while it is connected here.
//! * **Overflow re-syncs** (above): pgcoord's binder also keeps one pending binding per peer, but
//!   its bounded channels drop what does not fit; here an overflow ends in a re-sync that keeps
//!   pgcoord's semantics (graceful leavers deleted, lost ones kept as `lost`).

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
    /// Statements the writer sent (each writes a whole stage).
    statements: IntCounter,
    /// Statements the mapper sent (reads).
    reads: IntCounter,
    /// Graceful leaves that fell into an overflow beyond what the graph remembers (set LOST).
    resync_leaves_forgotten: IntCounter,
}

impl HaMetrics {
    fn new(registry: &Registry) -> Result<Self, prometheus::Error> {
        let m = Self {
            writes: IntCounterVec::new(
                Opts::new(
                    "coordinator_ha_writes_total",
                    "Rows (and READY_FOR_HANDSHAKE notifications) the PostgreSQL writer wrote, by \
                     kind (peer, lost, delete, tunnel, untunnel, rfh); several per statement.",
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
            statements: IntCounter::new(
                "coordinator_ha_write_statements_total",
                "Statements the PostgreSQL writer sent (each writes a batch of rows).",
            )?,
            reads: IntCounter::new(
                "coordinator_ha_read_statements_total",
                "Statements the PostgreSQL mapper sent (each reads a batch of peers).",
            )?,
            resync_leaves_forgotten: IntCounter::new(
                "coordinator_ha_resync_leaves_forgotten_total",
                "Graceful leaves during a writer overflow beyond what the graph remembers \
                 (re-synchronised as lost instead of deleted).",
            )?,
        };
        registry.register(Box::new(m.writes.clone()))?;
        registry.register(Box::new(m.statements.clone()))?;
        registry.register(Box::new(m.reads.clone()))?;
        registry.register(Box::new(m.resync_leaves_forgotten.clone()))?;
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
        reads: metrics.reads.clone(),
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

/// Most operations in one [`Stage`] (one statement).
const STAGE_OPS: usize = 1024;

/// One stage's statement: every write kind as a multi-row data-modifying CTE over arrays, and
/// one notification per written row (pgcoord's channels and payloads), in one round trip.
/// `$1` this coordinator; `$2` peers that left gracefully (row and all tunnels they are the
/// source of deleted); `$3` peers lost (status `lost`, tunnels kept); `$4`/`$5` node upserts
/// (ids, nodes); `$6`/`$7` tunnels deleted (src, dst); `$8`/`$9` tunnels upserted (src, dst);
/// `$10` READY_FOR_HANDSHAKE payloads (`"<to>,<from>"`). The coordinator row is (re)created
/// first, as pgcoord's rows reference it (after a crash truncated the table, before the next
/// heartbeat). A stage never touches one row twice (see [`Stage::fits`]), so the CTEs, which
/// see one snapshot, do not interfere.
const WRITE_STAGE: &str = "\
WITH c AS (INSERT INTO tailnet_coordinators (id, heartbeat_at) \
    VALUES ($1, now() at time zone 'utc') ON CONFLICT (id) DO NOTHING), \
dp AS (DELETE FROM tailnet_peers WHERE coordinator_id = $1 AND id = ANY($2::uuid[]) RETURNING id), \
dt AS (DELETE FROM tailnet_tunnels WHERE coordinator_id = $1 AND (src_id = ANY($2::uuid[]) \
    OR (src_id, dst_id) IN (SELECT s, d FROM unnest($6::uuid[], $7::uuid[]) AS u(s, d))) \
    RETURNING src_id, dst_id), \
lp AS (UPDATE tailnet_peers SET status = 'lost'::tailnet_status, \
    updated_at = now() at time zone 'utc' WHERE coordinator_id = $1 AND id = ANY($3::uuid[]) \
    RETURNING id), \
up AS (INSERT INTO tailnet_peers (id, coordinator_id, node, status, updated_at) \
    SELECT u.id, $1, u.node, 'ok'::tailnet_status, now() at time zone 'utc' \
    FROM unnest($4::uuid[], $5::bytea[]) AS u(id, node) \
    ON CONFLICT (id, coordinator_id) DO UPDATE SET node = excluded.node, \
    status = 'ok'::tailnet_status, updated_at = now() at time zone 'utc' RETURNING id), \
ut AS (INSERT INTO tailnet_tunnels (coordinator_id, src_id, dst_id, updated_at) \
    SELECT $1, u.s, u.d, now() at time zone 'utc' FROM unnest($8::uuid[], $9::uuid[]) AS u(s, d) \
    ON CONFLICT (coordinator_id, src_id, dst_id) DO UPDATE SET updated_at = now() at time zone 'utc' \
    RETURNING src_id, dst_id), \
n AS (SELECT 'tailnet_peer_update' AS ch, id::text AS msg FROM dp \
    UNION ALL SELECT 'tailnet_peer_update', id::text FROM lp \
    UNION ALL SELECT 'tailnet_peer_update', id::text FROM up \
    UNION ALL SELECT 'tailnet_tunnel_update', src_id::text || ',' || dst_id::text FROM dt \
    UNION ALL SELECT 'tailnet_tunnel_update', src_id::text || ',' || dst_id::text FROM ut \
    UNION ALL SELECT 'tailnet_ready_for_handshake', r FROM unnest($10::text[]) AS r) \
SELECT count(pg_notify(ch, msg))::int8 FROM n";

/// One write, as the writer stages it.
enum Op {
    Node {
        about: Uuid,
        key: Vec<u8>,
        bytes: Vec<u8>,
    },
    Gone {
        about: Uuid,
        kind: Kind,
    },
    Tunnel {
        about: Uuid,
        to: Uuid,
    },
    Untunnel {
        about: Uuid,
        to: Uuid,
    },
    Rfh {
        about: Uuid,
        to: Uuid,
    },
    Connected {
        about: Uuid,
    },
}

/// Writes of one batch that touch disjoint rows, sent as one statement ([`WRITE_STAGE`]). A new
/// stage starts where an operation would touch a row the current one already touches (a peer's
/// row twice; a tunnel twice; a graceful leave and a tunnel of the same source), so applying the
/// stages in order is applying the events in order.
#[derive(Default)]
struct Stage {
    ops: Vec<Op>,
    deletes: Vec<Uuid>,
    lost: Vec<Uuid>,
    node_ids: Vec<Uuid>,
    node_bytes: Vec<Vec<u8>>,
    untunnel_src: Vec<Uuid>,
    untunnel_dst: Vec<Uuid>,
    tunnel_src: Vec<Uuid>,
    tunnel_dst: Vec<Uuid>,
    rfh: Vec<String>,
    peers: HashSet<Uuid>,
    pairs: HashSet<(Uuid, Uuid)>,
    tunnel_srcs: HashSet<Uuid>,
    deleted: HashSet<Uuid>,
}

impl Stage {
    fn fits(&self, op: &Op) -> bool {
        if self.ops.len() >= STAGE_OPS {
            return false;
        }
        match op {
            Op::Node { about, .. } => !self.peers.contains(about),
            Op::Gone { about, kind } => {
                !self.peers.contains(about)
                    && (*kind != Kind::Disconnected || !self.tunnel_srcs.contains(about))
            }
            Op::Tunnel { about, to } | Op::Untunnel { about, to } => {
                !self.pairs.contains(&(*about, *to)) && !self.deleted.contains(about)
            }
            Op::Rfh { .. } | Op::Connected { .. } => true,
        }
    }

    fn push(&mut self, op: Op) {
        match &op {
            Op::Node { about, bytes, .. } => {
                self.peers.insert(*about);
                self.node_ids.push(*about);
                self.node_bytes.push(bytes.clone());
            }
            Op::Gone { about, kind } => {
                self.peers.insert(*about);
                if *kind == Kind::Disconnected {
                    self.deleted.insert(*about);
                    self.deletes.push(*about);
                } else {
                    self.lost.push(*about);
                }
            }
            Op::Tunnel { about, to } => {
                self.pairs.insert((*about, *to));
                self.tunnel_srcs.insert(*about);
                self.tunnel_src.push(*about);
                self.tunnel_dst.push(*to);
            }
            Op::Untunnel { about, to } => {
                self.pairs.insert((*about, *to));
                self.tunnel_srcs.insert(*about);
                self.untunnel_src.push(*about);
                self.untunnel_dst.push(*to);
            }
            Op::Rfh { about, to } => self.rfh.push(format!("{to},{about}")),
            Op::Connected { .. } => {}
        }
        self.ops.push(op);
    }

    /// Whether the stage writes anything (a stage of only `Connected` has hints only).
    fn writes(&self) -> bool {
        self.ops.iter().any(|o| !matches!(o, Op::Connected { .. }))
    }
}

/// Splits `ops` into [`Stage`]s, in order.
fn stages(ops: impl IntoIterator<Item = Op>) -> Vec<Stage> {
    let mut out: Vec<Stage> = vec![Stage::default()];
    for op in ops {
        if !out.last().is_some_and(|s| s.fits(&op)) {
            out.push(Stage::default());
        }
        if let Some(s) = out.last_mut() {
            s.push(op);
        }
    }
    out.retain(|s| !s.ops.is_empty());
    out
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
            let ops = self.ops(batch);
            self.write(stages(ops)).await;
            if overflowed {
                self.resync().await;
            }
        }
    }

    /// The operations for `events`, in order; a node that differs from the one written (or
    /// about to be, earlier in `events`) only in `as_of` is left out.
    fn ops(&self, events: Vec<SourceEvent>) -> Vec<Op> {
        // Node keys as they will be once the earlier ops are written (None: forgotten).
        let mut ahead: HashMap<Uuid, Option<Vec<u8>>> = HashMap::new();
        let mut out = Vec::with_capacity(events.len());
        for ev in events {
            let op = match ev {
                SourceEvent::Node { about, node } => {
                    let mut cmp = (*node).clone();
                    cmp.as_of = None;
                    let key = cmp.encode_to_vec();
                    let current = match ahead.get(&about) {
                        Some(k) => k.as_ref(),
                        None => self.nodes.get(&about).map(|w| &w.key),
                    };
                    if current == Some(&key) {
                        continue;
                    }
                    ahead.insert(about, Some(key.clone()));
                    Op::Node {
                        about,
                        key,
                        bytes: node.encode_to_vec(),
                    }
                }
                SourceEvent::Gone { about, kind } => {
                    ahead.insert(about, None);
                    Op::Gone { about, kind }
                }
                SourceEvent::TunnelAdded { about, to } => Op::Tunnel { about, to },
                SourceEvent::TunnelRemoved { about, to } => Op::Untunnel { about, to },
                SourceEvent::ReadyForHandshake { about, to } => Op::Rfh { about, to },
                SourceEvent::Connected { about } => Op::Connected { about },
                SourceEvent::Overflow => continue,
            };
            out.push(op);
        }
        out
    }

    /// Writes `stages` in order: all of them pipelined on one connection (one round trip), then
    /// each result in order. A stage that failed because the database is away is retried with
    /// the ones after it (the queue fills meanwhile and, if it overflows, [`Writer::resync`]
    /// catches up); one that failed otherwise is logged, counted and skipped.
    async fn write(&mut self, stages: Vec<Stage>) {
        let mut next = 0;
        while next < stages.len() {
            let results = match self.pool.get().await {
                Ok(db) => match db.prepare_cached(WRITE_STAGE).await {
                    Ok(stmt) => {
                        let me = self.me;
                        futures_util::future::join_all(stages[next..].iter().map(|s| {
                            let db = &db;
                            let stmt = &stmt;
                            async move {
                                if !s.writes() {
                                    return Ok(());
                                }
                                db.query_one(
                                    stmt,
                                    &[
                                        &me,
                                        &s.deletes,
                                        &s.lost,
                                        &s.node_ids,
                                        &s.node_bytes,
                                        &s.untunnel_src,
                                        &s.untunnel_dst,
                                        &s.tunnel_src,
                                        &s.tunnel_dst,
                                        &s.rfh,
                                    ],
                                )
                                .await
                                .map(|_| ())
                                .map_err(HaError::from)
                            }
                        }))
                        .await
                    }
                    Err(e) => vec![Err(e.into())],
                },
                Err(e) => vec![Err(e.into())],
            };
            let mut retry = false;
            for r in results {
                match r {
                    Ok(()) => {
                        if stages[next].writes() {
                            self.metrics.statements.inc();
                        }
                        self.written(&stages[next]).await;
                        next += 1;
                    }
                    Err(e) => {
                        self.metrics.errors.with_label_values(&["writer"]).inc();
                        if retryable(&e) {
                            tracing::warn!(error = %e, "postgres write failed; retrying");
                            retry = true;
                            break;
                        }
                        tracing::warn!(error = %e, "postgres write failed");
                        next += 1;
                    }
                }
            }
            if retry {
                tokio::time::sleep(REDIAL_PAUSE).await;
            }
        }
    }

    /// `stage` is in the database: remember it, count it, and have the mapper map what it
    /// changed for local peers.
    async fn written(&mut self, stage: &Stage) {
        let writes = &self.metrics.writes;
        for op in &stage.ops {
            let hint = match op {
                Op::Node { about, key, bytes } => {
                    writes.with_label_values(&["peer"]).inc();
                    self.nodes.insert(
                        *about,
                        Written {
                            key: key.clone(),
                            bytes: bytes.clone(),
                        },
                    );
                    None
                }
                Op::Gone { about, kind } => {
                    writes
                        .with_label_values(&[if *kind == Kind::Disconnected {
                            "delete"
                        } else {
                            "lost"
                        }])
                        .inc();
                    // Gone either way: the row (lost) and its tunnels stay in PostgreSQL for
                    // the others, but this writer keeps only connected peers.
                    self.nodes.remove(about);
                    self.tunnels.retain(|(src, _)| src != about);
                    None
                }
                Op::Tunnel { about, to } => {
                    writes.with_label_values(&["tunnel"]).inc();
                    self.tunnels.insert((*about, *to));
                    Some(Hint::Remote {
                        remote: *to,
                        local: *about,
                    })
                }
                Op::Untunnel { about, to } => {
                    writes.with_label_values(&["untunnel"]).inc();
                    self.tunnels.remove(&(*about, *to));
                    Some(Hint::Remote {
                        remote: *to,
                        local: *about,
                    })
                }
                Op::Rfh { .. } => {
                    writes.with_label_values(&["rfh"]).inc();
                    None
                }
                Op::Connected { about } => Some(Hint::LocalConnected(*about)),
            };
            if let Some(h) = hint {
                let _ = self.hints.send(h).await;
            }
        }
    }

    /// The queue overflowed, so events were dropped: re-read every connected local peer from the
    /// graph (which restarts the queue at the same moment) and write the difference. Peers this
    /// writer wrote that left gracefully meanwhile (the graph remembers them) are deleted with
    /// the tunnels they are the source of, as a Disconnect is; the others that vanished are set
    /// LOST (row and tunnels kept).
    async fn resync(&mut self) {
        self.metrics.resyncs.inc();
        let Some(state) = self.graph.resync_all() else {
            return;
        };
        self.metrics
            .resync_leaves_forgotten
            .inc_by(state.leaves_forgotten);
        tracing::warn!(
            peers = state.peers.len(),
            left_gracefully = state.left_gracefully.len(),
            "postgres writer queue overflowed; re-synchronising from the graph"
        );
        let live: HashSet<Uuid> = state.peers.iter().map(|p| p.id).collect();
        let left: HashSet<Uuid> = state.left_gracefully.into_iter().collect();
        // Peers this writer has rows or tunnels of.
        let known: HashSet<Uuid> = self
            .nodes
            .keys()
            .copied()
            .chain(self.tunnels.iter().map(|(src, _)| *src))
            .collect();
        let mut events = Vec::new();
        let mut gone = HashSet::new();
        for id in known {
            // A graceful leaver that came back is deleted too: what was written before it left
            // goes, and its current state is written below.
            let kind = if left.contains(&id) {
                Kind::Disconnected
            } else if !live.contains(&id) {
                Kind::Lost
            } else {
                continue;
            };
            gone.insert(id);
            events.push(SourceEvent::Gone { about: id, kind });
        }
        // Tunnels as they will be once the leavers are written (the writer forgets theirs).
        let kept: HashSet<(Uuid, Uuid)> = self
            .tunnels
            .iter()
            .filter(|(src, _)| !gone.contains(src))
            .copied()
            .collect();
        let current: HashSet<(Uuid, Uuid)> = state
            .peers
            .iter()
            .flat_map(|p| p.tunnels.iter().map(move |t| (p.id, *t)))
            .collect();
        for (about, to) in kept.difference(&current) {
            events.push(SourceEvent::TunnelRemoved {
                about: *about,
                to: *to,
            });
        }
        for p in state.peers {
            if let Some(node) = p.node {
                events.push(SourceEvent::Node { about: p.id, node });
            }
            for to in p.tunnels {
                if !kept.contains(&(p.id, to)) {
                    events.push(SourceEvent::TunnelAdded { about: p.id, to });
                }
            }
            events.push(SourceEvent::Connected { about: p.id });
        }
        let ops = self.ops(events);
        self.write(stages(ops)).await;
    }

    /// After PostgreSQL came back: it may have restarted, or crashed and truncated the UNLOGGED
    /// tables; write every local peer and tunnel again (and publish them), and have the mapper
    /// re-read the remote ends of local peers' tunnels.
    async fn republish(&mut self) {
        let mut ops: Vec<Op> = self
            .nodes
            .iter()
            .map(|(id, w)| Op::Node {
                about: *id,
                key: w.key.clone(),
                bytes: w.bytes.clone(),
            })
            .collect();
        ops.extend(self.tunnels.iter().map(|(about, to)| Op::Tunnel {
            about: *about,
            to: *to,
        }));
        ops.extend(self.nodes.keys().map(|id| Op::Connected { about: *id }));
        self.write(stages(ops)).await;
    }
}

/// What the graph was last told about one remote peer.
#[derive(Debug, Default)]
struct Tracked {
    /// Encoded node of the applied best binding.
    node: Option<Vec<u8>>,
    /// Local peers it is linked with through this source.
    tunnels: HashSet<Uuid>,
}

/// Most keys (peers, pairs, local peers) the mapper reads in one statement.
const MAPPER_BATCH: usize = 1024;
/// Most keys the mapper holds pending; beyond, it stops taking notifications and hints (their
/// bounded queues then hold the rest) until a read went through.
const MAPPER_PENDING: usize = 4 * MAPPER_BATCH;
/// How long the mapper gathers notifications and hints before reading them all at once.
pub const MAPPER_DEBOUNCE: Duration = Duration::from_millis(5);

/// The mapper's one read per batch: `$1` remote peers to re-read fully; `$2` local peers that
/// connected (the other ends of their tunnels are re-read fully too); `$3`/`$4` (remote, local)
/// pairs whose tunnel is re-read; `$5` this coordinator. Returns the peer rows (`tunnel` false:
/// id, coordinator, node, status, updated_at in µs) of every peer to re-read, then (`tunnel`
/// true: src, dst) every tunnel of the peers re-read fully and the pairs' tunnels in either
/// direction. pgcoord's `GetTailnetTunnelPeerBindingsBatch` reads the same, per local peer.
const READ_BATCH: &str = "\
WITH e AS (SELECT CASE WHEN src_id = ANY($2::uuid[]) THEN dst_id ELSE src_id END AS id \
    FROM tailnet_tunnels WHERE src_id = ANY($2::uuid[]) OR dst_id = ANY($2::uuid[])), \
f AS (SELECT unnest($1::uuid[]) AS id UNION SELECT id FROM e), \
pr AS (SELECT r, l FROM unnest($3::uuid[], $4::uuid[]) AS pr(r, l)) \
SELECT false AS tunnel, id, coordinator_id, node, status::text, \
    (extract(epoch FROM updated_at) * 1000000)::int8 \
    FROM tailnet_peers WHERE coordinator_id <> $5 \
    AND (id IN (SELECT id FROM f) OR id = ANY($3::uuid[])) \
UNION ALL \
SELECT DISTINCT true, src_id, dst_id, NULL::bytea, NULL::text, NULL::int8 FROM tailnet_tunnels \
    WHERE src_id IN (SELECT id FROM f) OR dst_id IN (SELECT id FROM f) \
    OR (src_id, dst_id) IN (SELECT r, l FROM pr) OR (src_id, dst_id) IN (SELECT l, r FROM pr)";

/// Reads the mapper has gathered and not yet made.
#[derive(Debug, Default)]
struct Pending {
    /// Remote peers to re-read fully, and what a peer without rows is reported as.
    full: HashMap<Uuid, Kind>,
    /// (remote, local) pairs: the remote's binding and only that tunnel.
    pairs: HashSet<(Uuid, Uuid)>,
    /// Local peers that connected: re-read the remote ends of their tunnels.
    locals: HashSet<Uuid>,
    /// READY_FOR_HANDSHAKE (from remote, to local), passed on after the reads gathered before it.
    rfh: Vec<(Uuid, Uuid)>,
}

impl Pending {
    fn len(&self) -> usize {
        self.full.len() + self.pairs.len() + self.locals.len() + self.rfh.len()
    }

    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Puts a batch that failed back (later requests for the same keys win).
    fn merge_back(&mut self, older: Pending) {
        for (x, k) in older.full {
            self.full.entry(x).or_insert(k);
        }
        self.pairs.extend(older.pairs);
        self.locals.extend(older.locals);
        let newer = std::mem::replace(&mut self.rfh, older.rfh);
        self.rfh.extend(newer);
    }

    /// Takes at most [`MAPPER_BATCH`] keys out (READY_FOR_HANDSHAKE only once no read is left).
    fn take_chunk(&mut self) -> Pending {
        let mut out = Pending::default();
        let mut room = MAPPER_BATCH;
        let full: Vec<Uuid> = self.full.keys().take(room).copied().collect();
        for x in full {
            if let Some(k) = self.full.remove(&x) {
                out.full.insert(x, k);
            }
        }
        room -= out.full.len();
        let pairs: Vec<(Uuid, Uuid)> = self.pairs.iter().take(room).copied().collect();
        for p in pairs {
            self.pairs.remove(&p);
            out.pairs.insert(p);
        }
        room -= out.pairs.len();
        let locals: Vec<Uuid> = self.locals.iter().take(room).copied().collect();
        for l in locals {
            self.locals.remove(&l);
            out.locals.insert(l);
        }
        if self.full.is_empty() && self.pairs.is_empty() && self.locals.is_empty() {
            out.rfh = std::mem::take(&mut self.rfh);
        }
        out
    }
}

/// One `tailnet_peers` row of a remote peer.
struct PeerRow {
    coordinator: Uuid,
    node: Vec<u8>,
    ok: bool,
    at: i64,
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
    /// Statements the mapper sent.
    reads: IntCounter,
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

    /// Gathers notifications and hints into [`Pending`] for up to [`MAPPER_DEBOUNCE`] after the
    /// first (or until [`MAPPER_BATCH`] keys), then reads them with one statement per
    /// [`MAPPER_BATCH`] keys. A failed read is put back and retried after [`REDIAL_PAUSE`].
    async fn run(
        mut self,
        mut notes: mpsc::Receiver<(String, String)>,
        mut hints: mpsc::Receiver<Hint>,
    ) {
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        let mut pending = Pending::default();
        // When the pending reads are due (set when the first one is gathered).
        let mut due: Option<tokio::time::Instant> = None;
        loop {
            let taking = pending.len() < MAPPER_PENDING;
            let r = tokio::select! {
                n = notes.recv(), if taking => match n {
                    Some((channel, payload)) => {
                        self.on_notification(&mut pending, &channel, &payload).await
                    }
                    None => return,
                },
                h = hints.recv(), if taking => {
                    match h {
                        Some(Hint::Remote { remote, local }) => {
                            if !self.graph.is_local(remote) {
                                pending.pairs.insert((remote, local));
                            }
                        }
                        Some(Hint::LocalConnected(id)) => {
                            pending.locals.insert(id);
                        }
                        None => return,
                    }
                    Ok(())
                },
                _ = tokio::time::sleep_until(due.unwrap_or_else(tokio::time::Instant::now)),
                    if due.is_some() =>
                {
                    due = None;
                    let r = self.flush(&mut pending).await;
                    if r.is_err() {
                        due = Some(tokio::time::Instant::now() + REDIAL_PAUSE);
                    }
                    r
                },
                _ = tick.tick() => {
                    self.check_deaths(&mut pending);
                    Ok(())
                }
            };
            if let Err(e) = r {
                self.errors.inc();
                tracing::warn!(error = %e, "postgres mapping failed");
            }
            if pending.is_empty() {
                due = None;
            } else if due.is_none() {
                due = Some(tokio::time::Instant::now() + MAPPER_DEBOUNCE);
            }
            if pending.len() >= MAPPER_BATCH
                && due.is_some_and(|d| d <= tokio::time::Instant::now() + MAPPER_DEBOUNCE)
            {
                // A full batch is read at once.
                due = Some(tokio::time::Instant::now());
            }
        }
    }

    /// Notifications may have been missed: re-read every remote peer the graph holds. A peer
    /// found without rows now is LOST, not DISCONNECTED: after a PostgreSQL crash its replica
    /// has not re-published it yet, and a graceful disconnect cannot be told apart.
    fn resync(&self, pending: &mut Pending) {
        for x in self.tracked.keys() {
            pending.full.insert(*x, Kind::Lost);
        }
    }

    async fn on_notification(
        &mut self,
        pending: &mut Pending,
        channel: &str,
        payload: &str,
    ) -> Result<(), HaError> {
        let mut ids = [Uuid::nil(); 2];
        let mut n = 0;
        for s in payload.split(',') {
            let Ok(id) = Uuid::parse_str(s.trim()) else {
                continue;
            };
            if n < ids.len() {
                ids[n] = id;
            }
            n += 1;
        }
        let ids = &ids[..n.min(2)];
        match (channel, n, ids) {
            (RESYNC, _, _) => self.resync(pending),
            (CHANNEL_HEARTBEAT, 1, [c]) if *c != self.me => {
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
                    self.reads.inc();
                    for r in rows {
                        pending.full.insert(r.get(0), Kind::Disconnected);
                    }
                }
            }
            (CHANNEL_PEER_UPDATE, 1, [x]) if !self.graph.is_local(*x) => {
                pending.full.insert(*x, Kind::Disconnected);
            }
            (CHANNEL_TUNNEL_UPDATE, 2, [src, dst]) => {
                let (src_local, dst_local) = (self.graph.is_local(*src), self.graph.is_local(*dst));
                // Remote peers are only linked with local ones: a tunnel between two remote
                // peers (or two local ones) changes nothing here. A tunnel from a local peer was
                // written by this replica's writer, which already had the pair re-read (rows of
                // a local id under other coordinators are ignored anyway).
                if dst_local && !src_local {
                    pending.pairs.insert((*src, *dst));
                }
            }
            (CHANNEL_READY_FOR_HANDSHAKE, 2, [to, from])
                if self.graph.is_local(*to) && !self.graph.is_local(*from) =>
            {
                if pending.is_empty() {
                    self.source.ready_for_handshake(*from, *to);
                } else {
                    pending.rfh.push((*from, *to));
                }
            }
            _ => {}
        }
        Ok(())
    }

    fn check_deaths(&mut self, pending: &mut Pending) {
        let mut died = false;
        for (id, (seen, alive)) in self.coords.iter_mut() {
            if *alive && seen.elapsed() >= Self::dead_after() {
                *alive = false;
                died = true;
                tracing::info!(coordinator = %id, "coordinator missed heartbeats; its peers are lost");
            }
        }
        if died {
            self.resync(pending);
        }
    }

    fn alive(&self, c: Uuid) -> bool {
        self.coords.get(&c).is_some_and(|(_, a)| *a)
    }

    /// Makes every pending read, [`MAPPER_BATCH`] keys per statement, then passes on the
    /// READY_FOR_HANDSHAKEs gathered after them. On failure what was not read is put back.
    async fn flush(&mut self, pending: &mut Pending) -> Result<(), HaError> {
        while !pending.is_empty() {
            let chunk = pending.take_chunk();
            // What one read returns reaches each local receiver as one response (pgcoord's
            // mapper does the same), so a burst of remote peers never overflows the queue of a
            // receiver that keeps reading.
            self.source.begin_batch();
            let applied = self.read_and_apply(&chunk).await;
            if applied.is_ok() {
                for (from, to) in chunk.rfh.iter() {
                    self.source.ready_for_handshake(*from, *to);
                }
            }
            self.source.end_batch();
            match applied {
                Ok(()) => {}
                Err(e) => {
                    pending.merge_back(chunk);
                    return Err(e);
                }
            }
        }
        Ok(())
    }

    async fn read_and_apply(&mut self, p: &Pending) -> Result<(), HaError> {
        if p.full.is_empty() && p.pairs.is_empty() && p.locals.is_empty() {
            return Ok(());
        }
        let full: Vec<Uuid> = p.full.keys().copied().collect();
        let locals: Vec<Uuid> = p.locals.iter().copied().collect();
        let (pair_r, pair_l): (Vec<Uuid>, Vec<Uuid>) = p.pairs.iter().copied().unzip();
        let rows = {
            let db = self.pool.get().await?;
            let stmt = db.prepare_cached(READ_BATCH).await?;
            db.query(&stmt, &[&full, &locals, &pair_r, &pair_l, &self.me])
                .await?
        };
        self.reads.inc();
        let mut peers: HashMap<Uuid, Vec<PeerRow>> = HashMap::new();
        let mut tunnels: Vec<(Uuid, Uuid)> = Vec::new();
        for r in &rows {
            let tunnel: bool = r.get(0);
            let a: Uuid = r.get(1);
            let b: Uuid = r.get(2);
            if tunnel {
                tunnels.push((a, b));
            } else {
                let status: String = r.get(4);
                peers.entry(a).or_default().push(PeerRow {
                    coordinator: b,
                    node: r.get(3),
                    ok: status == "ok",
                    at: r.get(5),
                });
            }
        }
        // Remote ends of the connected local peers' tunnels are re-read fully.
        let mut full = p.full.clone();
        for (s, d) in &tunnels {
            for (l, o) in [(s, d), (d, s)] {
                if p.locals.contains(l) && !self.graph.is_local(*o) {
                    full.entry(*o).or_insert(Kind::Disconnected);
                }
            }
        }
        // Local tunnel peers of each remote peer, from the rows read.
        let mut linked: HashMap<Uuid, HashSet<Uuid>> = HashMap::new();
        for (s, d) in &tunnels {
            for (x, o) in [(s, d), (d, s)] {
                if x != o && self.graph.is_local(*o) {
                    linked.entry(*x).or_default().insert(*o);
                }
            }
        }
        let none = HashSet::new();
        for (x, absent) in &full {
            let rows = peers.get(x).map_or(&[][..], Vec::as_slice);
            let locals = linked.get(x).unwrap_or(&none);
            self.apply(*x, rows, locals, *absent, None);
        }
        let mut only: HashMap<Uuid, HashSet<Uuid>> = HashMap::new();
        for (x, l) in &p.pairs {
            if !full.contains_key(x) {
                only.entry(*x).or_default().insert(*l);
            }
        }
        for (x, ls) in &only {
            let rows = peers.get(x).map_or(&[][..], Vec::as_slice);
            let locals: HashSet<Uuid> = linked
                .get(x)
                .map(|s| s.intersection(ls).copied().collect())
                .unwrap_or_default();
            self.apply(*x, rows, &locals, Kind::Disconnected, Some(ls));
        }
        Ok(())
    }

    /// Applies remote peer `x`'s best binding among `rows` and its tunnels with the local peers
    /// `locals` (if `only` is given, only the tunnels with those local peers were read).
    /// `absent` is what a peer without rows is reported as.
    fn apply(
        &mut self,
        x: Uuid,
        rows: &[PeerRow],
        locals: &HashSet<Uuid>,
        absent: Kind,
        only: Option<&HashSet<Uuid>>,
    ) {
        if self.graph.is_local(x) {
            return;
        }
        // Best binding: (usable NODE, updated_at) maximal.
        let mut best: Option<(bool, i64, &[u8])> = None;
        for r in rows {
            let usable = r.ok && self.alive(r.coordinator);
            let better = match &best {
                None => true,
                Some((bu, bat, _)) => (usable, r.at) > (*bu, *bat),
            };
            if better {
                best = Some((usable, r.at, r.node.as_slice()));
            }
        }
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
                let node = match Node::decode(bytes) {
                    Ok(n) => n,
                    Err(e) => {
                        tracing::warn!(peer = %x, error = %e, "undecodable node in tailnet_peers");
                        return;
                    }
                };
                let t = self.tracked.entry(x).or_default();
                if t.node.as_deref() != Some(bytes) {
                    if !self.source.upsert_node(x, node) {
                        return;
                    }
                    t.node = Some(bytes.to_vec());
                }
                for l in locals {
                    if !t.tunnels.contains(l) && self.source.add_tunnel(x, *l) {
                        t.tunnels.insert(*l);
                    }
                }
                let gone: Vec<Uuid> = t
                    .tunnels
                    .difference(locals)
                    .filter(|l| only.is_none_or(|o| o.contains(*l)))
                    .copied()
                    .collect();
                for l in gone {
                    self.source.remove_tunnel(x, l);
                    t.tunnels.remove(&l);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{stages, Op, STAGE_OPS};
    use proto::tailnet::v2::coordinate_response::peer_update::Kind;
    use uuid::Uuid;

    const A: Uuid = Uuid::from_u128(0xa);
    const B: Uuid = Uuid::from_u128(0xb);

    fn node(about: Uuid) -> Op {
        Op::Node {
            about,
            key: vec![1],
            bytes: vec![1],
        }
    }

    fn sizes(ops: Vec<Op>) -> Vec<usize> {
        stages(ops).iter().map(|s| s.ops.len()).collect()
    }

    #[test]
    fn disjoint_rows_share_a_stage() {
        let ops = vec![
            node(A),
            node(B),
            Op::Tunnel { about: A, to: B },
            Op::Untunnel { about: B, to: A },
            Op::Rfh { about: A, to: B },
            Op::Connected { about: A },
            Op::Gone {
                about: Uuid::from_u128(0xc),
                kind: Kind::Disconnected,
            },
        ];
        assert_eq!(sizes(ops), vec![7]);
    }

    #[test]
    fn a_row_touched_twice_starts_a_new_stage_in_order() {
        // A node after the peer's graceful leave (it reconnected): delete first, then upsert.
        let s = stages(vec![
            node(A),
            Op::Gone {
                about: A,
                kind: Kind::Disconnected,
            },
            node(A),
        ]);
        assert_eq!(s.len(), 3);
        assert_eq!(s[1].deletes, vec![A]);
        assert_eq!(s[2].node_ids, vec![A]);
        // A tunnel and the graceful leave of its source: the delete takes the tunnel with it.
        assert_eq!(
            sizes(vec![
                Op::Tunnel { about: A, to: B },
                Op::Gone {
                    about: A,
                    kind: Kind::Disconnected,
                },
                Op::Tunnel { about: A, to: B },
            ]),
            vec![1, 1, 1]
        );
        // The same tunnel added and removed.
        assert_eq!(
            sizes(vec![
                Op::Tunnel { about: A, to: B },
                Op::Untunnel { about: A, to: B },
            ]),
            vec![1, 1]
        );
        // A lost peer's tunnels stay, so they do not conflict with its status.
        assert_eq!(
            sizes(vec![
                Op::Tunnel { about: A, to: B },
                Op::Gone {
                    about: A,
                    kind: Kind::Lost,
                },
            ]),
            vec![2]
        );
    }

    #[test]
    fn a_stage_holds_at_most_stage_ops() {
        let ops = (0..STAGE_OPS as u128 + 1)
            .map(|i| node(Uuid::from_u128(i + 100)))
            .collect();
        assert_eq!(sizes(ops), vec![STAGE_OPS, 1]);
    }
}
