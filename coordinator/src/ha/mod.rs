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
//! * The **mapper**: one `LISTEN` connection. A notification about peer X (or a tunnel with X at
//!   one end) makes it re-read X's rows and X's tunnels, keep the ends that are local here, and
//!   apply X's **best binding** to the graph: `ok` rows of live coordinators beat `lost` ones, newer
//!   `updated_at` beats older (pgcoord's rule). No row left → DISCONNECTED; only lost rows or
//!   only rows of dead coordinators → LOST. A coordinator is dead [`MISSED_HEARTBEATS`] ×
//!   [`HEARTBEAT_PERIOD`] after its last heartbeat *received here* (clock skew is irrelevant);
//!   its death re-maps every remote peer. A new coordinator re-maps its peers.
//! * Clean-up at start and every [`CLEANUP_PERIOD`]: Coder's `CleanTailnetCoordinators`,
//!   `CleanTailnetLostPeers`, `CleanTailnetTunnels` (24 h).
//! * **PostgreSQL restarts and crashes:** every connection redials when it is found closed. The
//!   writer then re-writes every local peer and tunnel it mirrors (a crash truncates the UNLOGGED
//!   tables) and has the mapper re-read the remote ends of local peers' tunnels; the LISTEN
//!   connection redials, re-LISTENs and has the mapper re-read every remote peer it holds
//!   (notifications sent while it was away are lost). A restart that takes longer than
//!   [`MISSED_HEARTBEATS`] heartbeats makes the replica unhealthy meanwhile, as in pgcoord.
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
//!
//! # Not built yet
//!
//! * Per-peer coalescing of writes beyond the `as_of` rule; a connection pool (four dedicated
//!   connections: writer, mapper, heartbeat, LISTEN).

mod schema;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use prost::Message;
use proto::tailnet::v2::coordinate_response::peer_update::Kind;
use proto::tailnet::v2::Node;
use tokio::sync::mpsc;
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

/// Events queued from the graph to the writer before the writer's source fails.
const WRITER_QUEUE: usize = 65_536;
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
    /// The graph already has a watch-all source.
    #[error("the peer graph already has a PostgreSQL store")]
    AlreadyAttached,
}

/// A running store.
#[derive(Debug)]
pub struct HaHandle {
    coordinator_id: Uuid,
    healthy: Arc<AtomicBool>,
    tasks: Vec<JoinHandle<()>>,
    db: Arc<Client>,
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
        let rows = self
            .db
            .query(
                "UPDATE tailnet_peers SET status = 'lost'::tailnet_status, \
                 updated_at = now() at time zone 'utc' WHERE coordinator_id = $1 RETURNING id",
                &[&self.coordinator_id],
            )
            .await?;
        for r in rows {
            let id: Uuid = r.get(0);
            notify(&self.db, CHANNEL_PEER_UPDATE, &id.to_string()).await?;
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

/// Pause between redials of a lost connection.
const REDIAL_PAUSE: Duration = Duration::from_millis(500);
/// Pseudo-channel the listener uses to tell the mapper that notifications may have been missed.
const RESYNC: &str = "";

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

/// A client that redials when its connection is gone.
struct Db {
    url: String,
    client: Client,
}

impl Db {
    async fn open(url: &str) -> Result<Db, HaError> {
        Ok(Db {
            url: url.to_owned(),
            client: connect(url).await?,
        })
    }

    /// Redials (once) if the connection is gone; true if it did.
    async fn ensure(&mut self) -> Result<bool, HaError> {
        if !self.client.is_closed() {
            return Ok(false);
        }
        self.client = connect(&self.url).await?;
        Ok(true)
    }

    /// Redials until it succeeds, if the connection is gone; true if it did.
    async fn ensure_forever(&mut self) -> bool {
        loop {
            match self.ensure().await {
                Ok(redialled) => return redialled,
                Err(e) => {
                    tracing::warn!(error = %e, "postgres redial failed");
                    tokio::time::sleep(REDIAL_PAUSE).await;
                }
            }
        }
    }
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

/// Connects to `url`, prepares Coder's tables ([`prepare`]), and starts mirroring `graph`.
pub async fn start(graph: Arc<PeerGraph>, url: &str) -> Result<HaHandle, HaError> {
    let admin = connect(url).await?;
    prepare(&admin).await?;
    let coordinator_id = Uuid::new_v4();
    let (source, events) = graph
        .remote_source_all(WRITER_QUEUE)
        .ok_or(HaError::AlreadyAttached)?;

    // LISTEN first, so nothing published after our first heartbeat is missed.
    let (notify_tx, notify_rx) = mpsc::channel::<(String, String)>(NOTIFY_QUEUE);
    let first = listen(url, notify_tx.clone()).await?;
    let listen_url = url.to_owned();
    let listen_task = tokio::spawn(async move {
        let mut current = first;
        loop {
            // Wait for the connection to end, then redial and tell the mapper to re-read what
            // it may have missed.
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
    let mut hb_db = Db::open(url).await?;
    heartbeat_once(&hb_db.client, coordinator_id).await?;
    clean(&hb_db.client).await?;
    let hb_healthy = healthy.clone();
    let hb_graph = graph.clone();
    let heartbeat_task = tokio::spawn(async move {
        let failures = AtomicU32::new(0);
        let mut tick = tokio::time::interval(HEARTBEAT_PERIOD);
        let mut last_clean = Instant::now();
        loop {
            tick.tick().await;
            let beat = match hb_db.ensure().await {
                Ok(_) => heartbeat_once(&hb_db.client, coordinator_id).await,
                Err(e) => Err(e),
            };
            match beat {
                Ok(()) => {
                    failures.store(0, Ordering::Relaxed);
                    if !hb_healthy.swap(true, Ordering::AcqRel) {
                        tracing::info!("coordinator healthy again");
                        hb_graph.set_unhealthy(false);
                    }
                }
                Err(e) => {
                    let n = failures.fetch_add(1, Ordering::Relaxed) + 1;
                    tracing::warn!(error = %e, failures = n, "coordinator heartbeat failed");
                    if n >= MISSED_HEARTBEATS && hb_healthy.swap(false, Ordering::AcqRel) {
                        tracing::error!("coordinator unhealthy: heartbeats fail");
                        hb_graph.set_unhealthy(true);
                    }
                }
            }
            if last_clean.elapsed() >= CLEANUP_PERIOD {
                last_clean = Instant::now();
                if let Err(e) = clean(&hb_db.client).await {
                    tracing::warn!(error = %e, "tailnet cleanup failed");
                }
            }
        }
    });

    let writer_db = Db::open(url).await?;
    let (hint_tx, hint_rx) = mpsc::channel(HINT_QUEUE);
    let writer = Writer {
        db: writer_db,
        me: coordinator_id,
        nodes: HashMap::new(),
        tunnels: HashSet::new(),
        hints: hint_tx,
    };
    let writer_task = tokio::spawn(writer.run(events));

    let mapper_db = Db::open(url).await?;
    let mut mapper = Mapper {
        db: mapper_db,
        me: coordinator_id,
        graph,
        source,
        coords: HashMap::new(),
        tracked: HashMap::new(),
    };
    mapper.load_live_coordinators().await?;
    let mapper_task = tokio::spawn(mapper.run(notify_rx, hint_rx));

    Ok(HaHandle {
        coordinator_id,
        healthy,
        tasks: vec![listen_task, heartbeat_task, writer_task, mapper_task],
        db: Arc::new(admin),
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
    /// Local peer `local`'s tunnel to a possibly remote `remote` was written: map that pair.
    Remote {
        /// The other end.
        remote: Uuid,
        /// The local peer.
        local: Uuid,
    },
}

/// What the writer last wrote about one local peer (to skip `as_of`-only updates and to
/// re-publish after PostgreSQL lost its rows).
struct Written {
    /// The node encoded without `as_of`.
    key: Vec<u8>,
    /// The node as written.
    bytes: Vec<u8>,
    lost: bool,
}

/// Mirrors local peers into the tables.
struct Writer {
    db: Db,
    me: Uuid,
    nodes: HashMap<Uuid, Written>,
    /// Tunnels of local peers (src, dst) as written.
    tunnels: HashSet<(Uuid, Uuid)>,
    hints: mpsc::Sender<Hint>,
}

impl Writer {
    async fn run(mut self, mut events: SourceEvents) {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            let ev = tokio::select! {
                ev = events.recv() => match ev {
                    Some(ev) => ev,
                    None => return,
                },
                _ = tick.tick() => {
                    // Idle: notice a lost connection without waiting for the next write.
                    if self.db.client.is_closed() {
                        self.db.ensure_forever().await;
                        self.republish().await;
                    }
                    continue;
                }
            };
            if matches!(ev, SourceEvent::Overflow) {
                tracing::error!(
                    "postgres writer queue overflowed; local peers are no longer mirrored"
                );
                return;
            }
            loop {
                match self.apply(ev.clone()).await {
                    Ok(()) => break,
                    Err(e) if self.db.client.is_closed() => {
                        tracing::warn!(error = %e, "postgres write failed; redialling");
                        self.db.ensure_forever().await;
                        self.republish().await;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "postgres write failed");
                        break;
                    }
                }
            }
        }
    }

    /// After a redial: PostgreSQL may have restarted, or crashed and truncated the UNLOGGED
    /// tables; write every local peer and tunnel again (and publish them), and have the mapper
    /// re-read the remote ends of local peers' tunnels.
    async fn republish(&mut self) {
        let r = async {
            for (id, w) in &self.nodes {
                self.write_peer(*id, &w.bytes, w.lost).await?;
            }
            for (src, dst) in &self.tunnels {
                self.write_tunnel(*src, *dst).await?;
            }
            Ok::<(), HaError>(())
        }
        .await;
        if let Err(e) = r {
            tracing::warn!(error = %e, "re-publishing local peers failed");
            return;
        }
        for id in self.nodes.keys() {
            let _ = self.hints.send(Hint::LocalConnected(*id)).await;
        }
    }

    async fn write_peer(&self, id: Uuid, bytes: &[u8], lost: bool) -> Result<(), HaError> {
        let status = if lost { "lost" } else { "ok" };
        self.db
            .client
            .execute(
                "WITH c AS (INSERT INTO tailnet_coordinators (id, heartbeat_at) \
                 VALUES ($2, now() at time zone 'utc') ON CONFLICT (id) DO NOTHING), \
                 p AS (INSERT INTO tailnet_peers \
                 (id, coordinator_id, node, status, updated_at) \
                 VALUES ($1, $2, $3, $4::text::tailnet_status, now() at time zone 'utc') \
                 ON CONFLICT (id, coordinator_id) DO UPDATE SET node = $3, \
                 status = $4::text::tailnet_status, updated_at = now() at time zone 'utc' \
                 RETURNING id) \
                 SELECT pg_notify('tailnet_peer_update', id::text) FROM p",
                &[&id, &self.me, &bytes, &status],
            )
            .await?;
        Ok(())
    }

    async fn write_tunnel(&self, src: Uuid, dst: Uuid) -> Result<(), HaError> {
        self.db
            .client
            .execute(
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
                &[&self.me, &src, &dst],
            )
            .await?;
        Ok(())
    }

    async fn apply(&mut self, ev: SourceEvent) -> Result<(), HaError> {
        match ev {
            SourceEvent::Node { about, node } => {
                let mut cmp = (*node).clone();
                cmp.as_of = None;
                let key = cmp.encode_to_vec();
                if self
                    .nodes
                    .get(&about)
                    .is_some_and(|w| !w.lost && w.key == key)
                {
                    return Ok(());
                }
                let bytes = node.encode_to_vec();
                self.write_peer(about, &bytes, false).await?;
                self.nodes.insert(
                    about,
                    Written {
                        key,
                        bytes,
                        lost: false,
                    },
                );
            }
            SourceEvent::Gone { about, kind } => {
                if kind == Kind::Disconnected {
                    self.nodes.remove(&about);
                    self.tunnels.retain(|(src, _)| *src != about);
                    self.db
                        .client
                        .execute(
                            "WITH p AS (DELETE FROM tailnet_peers WHERE id = $1 \
                             AND coordinator_id = $2 RETURNING id) \
                             SELECT pg_notify('tailnet_peer_update', id::text) FROM p",
                            &[&about, &self.me],
                        )
                        .await?;
                    self.db
                        .client
                        .execute(
                            "WITH t AS (DELETE FROM tailnet_tunnels WHERE coordinator_id = $1 \
                             AND src_id = $2 RETURNING src_id, dst_id) \
                             SELECT pg_notify('tailnet_tunnel_update', \
                             src_id::text || ',' || dst_id::text) FROM t",
                            &[&self.me, &about],
                        )
                        .await?;
                } else {
                    if let Some(w) = self.nodes.get_mut(&about) {
                        w.lost = true;
                    }
                    self.db
                        .client
                        .execute(
                            "WITH p AS (UPDATE tailnet_peers SET status = 'lost'::tailnet_status, \
                             updated_at = now() at time zone 'utc' WHERE id = $1 \
                             AND coordinator_id = $2 RETURNING id) \
                             SELECT pg_notify('tailnet_peer_update', id::text) FROM p",
                            &[&about, &self.me],
                        )
                        .await?;
                }
            }
            SourceEvent::TunnelAdded { about, to } => {
                self.tunnels.insert((about, to));
                self.write_tunnel(about, to).await?;
                let _ = self
                    .hints
                    .send(Hint::Remote {
                        remote: to,
                        local: about,
                    })
                    .await;
            }
            SourceEvent::TunnelRemoved { about, to } => {
                self.tunnels.remove(&(about, to));
                self.db
                    .client
                    .execute(
                        "WITH t AS (DELETE FROM tailnet_tunnels WHERE coordinator_id = $1 \
                         AND src_id = $2 AND dst_id = $3 RETURNING src_id, dst_id) \
                         SELECT pg_notify('tailnet_tunnel_update', \
                         src_id::text || ',' || dst_id::text) FROM t",
                        &[&self.me, &about, &to],
                    )
                    .await?;
            }
            SourceEvent::ReadyForHandshake { about, to } => {
                notify(
                    &self.db.client,
                    CHANNEL_READY_FOR_HANDSHAKE,
                    &format!("{to},{about}"),
                )
                .await?;
            }
            SourceEvent::Connected { about } => {
                let _ = self.hints.send(Hint::LocalConnected(about)).await;
            }
            SourceEvent::Overflow => {}
        }
        Ok(())
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

/// Feeds other coordinators' peers into the graph.
struct Mapper {
    db: Db,
    me: Uuid,
    graph: Arc<PeerGraph>,
    source: RemoteSource,
    /// Other coordinators: when their last heartbeat arrived here, and whether they are alive.
    coords: HashMap<Uuid, (Instant, bool)>,
    tracked: HashMap<Uuid, Tracked>,
}

impl Mapper {
    fn dead_after() -> Duration {
        HEARTBEAT_PERIOD * MISSED_HEARTBEATS
    }

    async fn load_live_coordinators(&mut self) -> Result<(), HaError> {
        let rows = self
            .db
            .client
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
                _ = tick.tick() => self.check_deaths().await,
            };
            if let Err(e) = r {
                tracing::warn!(error = %e, "postgres mapping failed");
                if self.db.client.is_closed() {
                    self.db.ensure_forever().await;
                    if let Err(e) = self.resync().await {
                        tracing::warn!(error = %e, "postgres re-mapping failed");
                    }
                }
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
                        .db
                        .client
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
                // peers (or two local ones) changes nothing here.
                if src_local && !dst_local {
                    self.refresh_pair(*dst, *src).await?;
                } else if dst_local && !src_local {
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
            .db
            .client
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
        let rows = self
            .db
            .client
            .query(
                "SELECT coordinator_id, node, status::text, (extract(epoch FROM updated_at) * 1000000)::int8 \
                 FROM tailnet_peers WHERE id = $1 AND coordinator_id <> $2",
                &[&x, &self.me],
            )
            .await?;
        let tunnels = match only {
            None => {
                self.db
                    .client
                    .query(
                        "SELECT src_id, dst_id FROM tailnet_tunnels \
                         WHERE src_id = $1 OR dst_id = $1",
                        &[&x],
                    )
                    .await?
            }
            Some(l) => {
                self.db
                    .client
                    .query(
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
