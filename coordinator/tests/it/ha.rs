//! Replicas sharing one peer graph through a real PostgreSQL (`coordinator::ha`): each test
//! starts a throwaway server (initdb + postgres as the `postgres` user when run as root, on a temp
//! directory and a free port), one database per test, and two in-process replicas (a graph each,
//! a store each) against it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use coordinator::authz::CoordinateeAuth;
use coordinator::graph::{GraphConfig, PeerGraph, PeerHandle, PeerReceiver};
use coordinator::ha;
use prometheus::Registry;
use proto::tailnet::v2::coordinate_request::{Disconnect, ReadyForHandshake, Tunnel, UpdateSelf};
use proto::tailnet::v2::coordinate_response::peer_update::Kind;
use proto::tailnet::v2::{CoordinateRequest, Node};
use uuid::Uuid;

// ---------------------------------------------------------------------------------------------
// A throwaway PostgreSQL server (shared with the binary's replica tests).

use crate::pg_server::PgServer;

impl PgServer {
    async fn create_db(&self) -> String {
        let name = format!("t_{}", Uuid::new_v4().simple());
        // Retry: the server accepts TCP slightly before it accepts sessions.
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match tokio_postgres::connect(&self.url("postgres"), tokio_postgres::NoTls).await {
                Ok((c, conn)) => {
                    tokio::spawn(conn);
                    c.batch_execute(&format!("CREATE DATABASE {name}"))
                        .await
                        .unwrap();
                    return self.url(&name);
                }
                Err(e) => {
                    assert!(Instant::now() < deadline, "postgres not ready: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }
}

async fn sql(url: &str) -> tokio_postgres::Client {
    let (c, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    c
}

// ---------------------------------------------------------------------------------------------
// Replicas and peers.

fn graph() -> Arc<PeerGraph> {
    PeerGraph::new(GraphConfig::default(), &Registry::new()).unwrap()
}

fn node(derp: i32) -> Node {
    Node {
        id: i64::from(derp) + 1,
        as_of: Some(prost_types::Timestamp {
            seconds: 1_700_000_000,
            nanos: 0,
        }),
        key: Bytes::from_static(b"nodekey"),
        disco: "discokey:00".into(),
        preferred_derp: derp,
        addresses: vec!["fd7a:115c:a1e0::1/128".into()],
        allowed_ips: vec!["fd7a:115c:a1e0::1/128".into()],
        ..Default::default()
    }
}

struct Peer {
    id: Uuid,
    handle: Option<PeerHandle>,
    rx: PeerReceiver,
    graph: Arc<PeerGraph>,
}

impl Peer {
    fn connect(graph: &Arc<PeerGraph>, id: Uuid) -> Peer {
        let (handle, rx) = graph.connect(id, "p".into(), CoordinateeAuth::SingleTailnet);
        Peer {
            id,
            handle: Some(handle),
            rx,
            graph: graph.clone(),
        }
    }

    fn send(&self, req: CoordinateRequest) {
        self.graph
            .handle(self.handle.as_ref().unwrap(), req)
            .unwrap();
    }

    fn update(&self, n: Node) {
        self.send(CoordinateRequest {
            update_self: Some(UpdateSelf { node: Some(n) }),
            ..Default::default()
        });
    }

    fn tunnel(&self, to: Uuid) {
        self.send(CoordinateRequest {
            add_tunnel: Some(Tunnel {
                id: Bytes::copy_from_slice(to.as_bytes()),
            }),
            ..Default::default()
        });
    }

    fn ready(&self, to: Uuid) {
        self.send(CoordinateRequest {
            ready_for_handshake: vec![ReadyForHandshake {
                id: Bytes::copy_from_slice(to.as_bytes()),
            }],
            ..Default::default()
        });
    }

    fn disconnect(&mut self) {
        let _ = self.graph.handle(
            self.handle.as_ref().unwrap(),
            CoordinateRequest {
                disconnect: Some(Disconnect {}),
                ..Default::default()
            },
        );
        self.handle = None;
    }

    /// Drops the connection without Disconnect (LOST).
    fn drop_conn(&mut self) {
        self.handle = None;
    }

    /// Waits (at most `within`) for an update about `about` of `kind` (and, for NODE, matching
    /// `derp`); returns how long it took.
    async fn expect(
        &mut self,
        about: Uuid,
        kind: Kind,
        derp: Option<i32>,
        within: Duration,
    ) -> Duration {
        let start = Instant::now();
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let r = tokio::time::timeout_at(deadline, self.rx.recv())
                .await
                .unwrap_or_else(|_| {
                    panic!("{}: no {kind:?} about {about} within {within:?}", self.id)
                })
                .expect("stream closed");
            for u in r.peer_updates {
                if u.id.as_ref() == about.as_bytes()
                    && u.kind == kind as i32
                    && (derp.is_none() || u.node.as_ref().map(|n| n.preferred_derp) == derp)
                {
                    return start.elapsed();
                }
            }
        }
    }
}

const SOON: Duration = Duration::from_secs(5);

// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_exchange_nodes_rfh_disconnected_lost() {
    let _ = tracing_subscriber::fmt().with_test_writer().try_init();
    let pg = PgServer::start();
    let url = pg.create_db().await;
    let (g1, g2) = (graph(), graph());
    let h1 = ha::start(g1.clone(), &url).await.unwrap();
    let h2 = ha::start(g2.clone(), &url).await.unwrap();
    assert_ne!(h1.coordinator_id(), h2.coordinator_id());

    // Agent on replica 1, client on replica 2.
    let mut agent = Peer::connect(&g1, Uuid::new_v4());
    agent.update(node(1));
    let mut client = Peer::connect(&g2, Uuid::new_v4());
    client.tunnel(agent.id);
    client.update(node(2));

    client.expect(agent.id, Kind::Node, Some(1), SOON).await;
    agent.expect(client.id, Kind::Node, Some(2), SOON).await;

    // READY_FOR_HANDSHAKE across replicas.
    agent.ready(client.id);
    client
        .expect(agent.id, Kind::ReadyForHandshake, None, SOON)
        .await;

    // A node change travels; an as_of-only change is not written.
    agent.update(node(7));
    client.expect(agent.id, Kind::Node, Some(7), SOON).await;
    let db = sql(&url).await;
    let at = |db: tokio_postgres::Client, id: Uuid| async move {
        let r = db
            .query_one(
                "SELECT updated_at::text FROM tailnet_peers WHERE id = $1",
                &[&id],
            )
            .await
            .unwrap();
        (db, r.get::<_, String>(0))
    };
    let (db, before) = at(db, agent.id).await;
    let mut same = node(7);
    same.as_of = Some(prost_types::Timestamp {
        seconds: 1_800_000_000,
        nanos: 0,
    });
    agent.update(same);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (db, after) = at(db, agent.id).await;
    assert_eq!(before, after, "an as_of-only node update was written");

    // Rows as pgcoord writes them.
    let rows = db
        .query(
            "SELECT coordinator_id, status::text FROM tailnet_peers ORDER BY status",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(rows.len(), 2);
    let tunnels = db
        .query(
            "SELECT coordinator_id, src_id, dst_id FROM tailnet_tunnels",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(tunnels.len(), 1);
    assert_eq!(tunnels[0].get::<_, Uuid>(0), h2.coordinator_id());
    assert_eq!(tunnels[0].get::<_, Uuid>(1), client.id);
    assert_eq!(tunnels[0].get::<_, Uuid>(2), agent.id);

    // Graceful disconnect of the client: the agent sees DISCONNECTED; row and tunnel deleted.
    client.disconnect();
    agent
        .expect(client.id, Kind::Disconnected, None, SOON)
        .await;
    let n: i64 = db
        .query_one(
            "SELECT count(*) FROM tailnet_peers WHERE id = $1",
            &[&client.id],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 0);
    let n: i64 = db
        .query_one(
            "SELECT count(*) FROM tailnet_tunnels WHERE src_id = $1",
            &[&client.id],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 0);

    // A second client; then the agent's stream ends without Disconnect: LOST, row kept as lost,
    // the client's tunnel kept.
    let mut c2 = Peer::connect(&g2, Uuid::new_v4());
    c2.tunnel(agent.id);
    c2.update(node(3));
    c2.expect(agent.id, Kind::Node, Some(7), SOON).await;
    agent.drop_conn();
    c2.expect(agent.id, Kind::Lost, None, SOON).await;
    let st: String = db
        .query_one(
            "SELECT status::text FROM tailnet_peers WHERE id = $1",
            &[&agent.id],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(st, "lost");
    let n: i64 = db
        .query_one(
            "SELECT count(*) FROM tailnet_tunnels WHERE src_id = $1 AND dst_id = $2",
            &[&c2.id, &agent.id],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 1);

    // The agent comes back on replica 2 (same id): c2 gets its node again.
    let agent2 = Peer::connect(&g2, agent.id);
    agent2.update(node(9));
    c2.expect(agent.id, Kind::Node, Some(9), SOON).await;
    drop(agent2);
    drop(h1);
    drop(h2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_replica_peers_turn_lost_within_8s() {
    let _ = tracing_subscriber::fmt().with_test_writer().try_init();
    let pg = PgServer::start();
    let url = pg.create_db().await;
    let (g1, g2) = (graph(), graph());
    let h1 = ha::start(g1.clone(), &url).await.unwrap();
    let h2 = ha::start(g2.clone(), &url).await.unwrap();
    let agent = Peer::connect(&g1, Uuid::new_v4());
    agent.update(node(1));
    let mut client = Peer::connect(&g2, Uuid::new_v4());
    client.tunnel(agent.id);
    client.update(node(2));
    client.expect(agent.id, Kind::Node, Some(1), SOON).await;

    // Replica 1 stops writing anything (as after SIGKILL): no LOST row is ever written for the
    // agent, so only the missed heartbeats can make it LOST.
    h1.abort();
    let took = client
        .expect(agent.id, Kind::Lost, None, Duration::from_secs(8))
        .await;
    assert!(
        took >= Duration::from_secs(3),
        "LOST came before any heartbeat was missed: {took:?}"
    );
    let st: String = sql(&url)
        .await
        .query_one(
            "SELECT status::text FROM tailnet_peers WHERE id = $1",
            &[&agent.id],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(st, "ok", "the dead replica's row was not touched");
    drop(agent);
    drop(h2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coderd_managed_database_is_checked_not_altered() {
    let _ = tracing_subscriber::fmt().with_test_writer().try_init();
    let pg = PgServer::start();
    let url = pg.create_db().await;
    let db = sql(&url).await;
    db.batch_execute(
        "CREATE TABLE schema_migrations (version bigint NOT NULL, dirty boolean NOT NULL)",
    )
    .await
    .unwrap();
    let err = ha::start(graph(), &url).await.unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("tailnet_peers.node bytea"), "{msg}");
    assert!(msg.contains("tailnet_tunnels.src_id uuid"), "{msg}");
    let n: i64 = db
        .query_one(
            "SELECT count(*) FROM information_schema.tables WHERE table_name LIKE 'tailnet%'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 0, "tailnetd created tables in a coderd-managed database");

    // A database of tailnetd's own: created once, then accepted again.
    let own = pg.create_db().await;
    let h = ha::start(graph(), &own).await.unwrap();
    drop(h);
    let h = ha::start(graph(), &own).await.unwrap();
    let logged: bool = sql(&own)
        .await
        .query_one(
            "SELECT relpersistence = 'u' FROM pg_class WHERE relname = 'tailnet_peers'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(logged, "tailnet_peers must be UNLOGGED like Coder's");
    drop(h);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_heartbeats_make_the_replica_unhealthy_until_one_succeeds() {
    let _ = tracing_subscriber::fmt().with_test_writer().try_init();
    let pg = PgServer::start();
    let url = pg.create_db().await;
    let g = graph();
    let h = ha::start(g.clone(), &url).await.unwrap();
    let mut peer = Peer::connect(&g, Uuid::new_v4());
    peer.update(node(1));
    assert!(h.healthy());

    // Heartbeat writes fail while the table is renamed away.
    let db = sql(&url).await;
    db.batch_execute("ALTER TABLE tailnet_coordinators RENAME TO tailnet_coordinators_away")
        .await
        .unwrap();
    let last = tokio::time::timeout(Duration::from_secs(10), async {
        let mut last = None;
        while let Some(r) = peer.rx.recv().await {
            last = Some(r);
        }
        last
    })
    .await
    .expect("session not closed while unhealthy");
    assert_eq!(last.unwrap().error, ha::ERR_UNHEALTHY);
    assert!(!h.healthy());
    let mut refused = Peer::connect(&g, Uuid::new_v4());
    let r = refused.rx.recv().await.unwrap();
    assert_eq!(r.error, ha::ERR_UNHEALTHY);
    assert!(refused.rx.recv().await.is_none());

    db.batch_execute("ALTER TABLE tailnet_coordinators_away RENAME TO tailnet_coordinators")
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(6);
    while !h.healthy() {
        assert!(
            Instant::now() < deadline,
            "not healthy again after heartbeats succeed"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut again = Peer::connect(&g, Uuid::new_v4());
    again.update(node(2));
    assert!(
        again.rx.try_recv().is_err(),
        "a session of a healthy replica was closed"
    );
}

/// pgcoord keys bindings by peer id, so a replaced connection's teardown can mark the peer LOST
/// after its successor's first node. tailnetd keys liveness per connection: the old
/// connection's end writes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replaced_connection_end_does_not_mark_its_successor_lost() {
    let pg = PgServer::start();
    let url = pg.create_db().await;
    let (g1, g2) = (graph(), graph());
    let _h1 = ha::start(g1.clone(), &url).await.unwrap();
    let _h2 = ha::start(g2.clone(), &url).await.unwrap();
    let id = Uuid::new_v4();
    let mut old = Peer::connect(&g1, id);
    old.update(node(1));
    let mut client = Peer::connect(&g2, Uuid::new_v4());
    client.tunnel(id);
    client.update(node(2));
    client.expect(id, Kind::Node, Some(1), SOON).await;

    let new = Peer::connect(&g1, id);
    new.update(node(4));
    client.expect(id, Kind::Node, Some(4), SOON).await;
    old.drop_conn();
    drop(old);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let st: String = sql(&url)
        .await
        .query_one(
            "SELECT status::text FROM tailnet_peers WHERE id = $1",
            &[&id],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(st, "ok");
    // And the client saw no LOST.
    while let Ok(r) = client.rx.try_recv() {
        for u in r.peer_updates {
            assert!(
                !(u.id.as_ref() == id.as_bytes() && u.kind == Kind::Lost as i32),
                "stale LOST reached the client"
            );
        }
    }
    drop(new);
}

async fn postgres_restart_keeps_sessions(mode: &str) {
    let _ = tracing_subscriber::fmt().with_test_writer().try_init();
    let mut pg = PgServer::start();
    let url = pg.create_db().await;
    let (g1, g2) = (graph(), graph());
    let h1 = ha::start(g1.clone(), &url).await.unwrap();
    let h2 = ha::start(g2.clone(), &url).await.unwrap();
    let mut agent = Peer::connect(&g1, Uuid::new_v4());
    agent.update(node(1));
    let mut client = Peer::connect(&g2, Uuid::new_v4());
    client.tunnel(agent.id);
    client.update(node(2));
    client.expect(agent.id, Kind::Node, Some(1), SOON).await;
    agent.expect(client.id, Kind::Node, Some(2), SOON).await;

    pg.restart(mode);

    // The sessions survived; state is back in the tables; updates flow again.
    let db_deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let ok = match tokio_postgres::connect(&url, tokio_postgres::NoTls).await {
            Ok((c, conn)) => {
                tokio::spawn(conn);
                let peers: i64 = c
                    .query_one(
                        "SELECT count(*) FROM tailnet_peers WHERE status = 'ok'",
                        &[],
                    )
                    .await
                    .map(|r| r.get(0))
                    .unwrap_or(0);
                let tunnels: i64 = c
                    .query_one("SELECT count(*) FROM tailnet_tunnels", &[])
                    .await
                    .map(|r| r.get(0))
                    .unwrap_or(0);
                peers == 2 && tunnels == 1
            }
            Err(_) => false,
        };
        if ok {
            break;
        }
        assert!(
            Instant::now() < db_deadline,
            "state not re-published after restart ({mode})"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    agent.update(node(5));
    client
        .expect(agent.id, Kind::Node, Some(5), Duration::from_secs(10))
        .await;
    client.update(node(6));
    agent
        .expect(client.id, Kind::Node, Some(6), Duration::from_secs(10))
        .await;
    assert!(h1.healthy() && h2.healthy());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_graceful_restart_keeps_sessions_and_state() {
    postgres_restart_keeps_sessions("fast").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_crash_truncating_unlogged_tables_is_republished() {
    postgres_restart_keeps_sessions("immediate").await;
}

/// Three replicas; the agent on the first, 999 clients spread over all three connect at once:
/// every client gets the agent's node and the agent gets every client's node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn burst_of_1000_peers_across_three_replicas_converges() {
    let pg = PgServer::start();
    let url = pg.create_db().await;
    let gs = [graph(), graph(), graph()];
    let mut hs = Vec::new();
    for g in &gs {
        hs.push(ha::start(g.clone(), &url).await.unwrap());
    }
    let agent = Peer::connect(&gs[0], Uuid::new_v4());
    agent.update(node(1));
    let agent_id = agent.id;
    let Peer {
        handle: agent_handle,
        rx: mut agent_rx,
        ..
    } = agent;
    // The agent reads from before the burst, as a real agent does (a receiver that lets 512
    // responses queue up is closed; the mapper hands a whole batch of remote peers to the graph
    // at once).
    let ids: Vec<Uuid> = (0..999).map(|_| Uuid::new_v4()).collect();
    let want: std::collections::HashSet<Uuid> = ids.iter().copied().collect();
    let agent_side = tokio::spawn(async move {
        let mut seen = std::collections::HashSet::new();
        while seen.len() < want.len() {
            let r = agent_rx.recv().await.expect("agent stream closed");
            for u in r.peer_updates {
                if u.kind == Kind::Node as i32 {
                    let id = Uuid::from_slice(&u.id).unwrap();
                    if want.contains(&id) {
                        seen.insert(id);
                    }
                }
            }
        }
        agent_handle
    });
    let mut clients: Vec<Peer> = ids
        .iter()
        .enumerate()
        .map(|(i, id)| {
            let c = Peer::connect(&gs[i % 3], *id);
            c.tunnel(agent_id);
            c.update(node(2));
            c
        })
        .collect();
    let start = Instant::now();
    // Clients stay connected until the agent has seen them all.
    for c in clients.iter_mut() {
        let left = Duration::from_secs(90).saturating_sub(start.elapsed());
        c.expect(
            agent_id,
            Kind::Node,
            Some(1),
            left.max(Duration::from_secs(1)),
        )
        .await;
    }
    tokio::time::timeout(
        Duration::from_secs(90).saturating_sub(start.elapsed()) + Duration::from_secs(1),
        agent_side,
    )
    .await
    .expect("the agent did not get every client's node")
    .unwrap();
    eprintln!(
        "1,000 peers over three replicas converged in {:?}",
        start.elapsed()
    );
}

/// Three replicas: an agent on the first, one client on each of the others. Nodes,
/// READY_FOR_HANDSHAKE, DISCONNECTED and LOST cross replicas both ways.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_nodes_rfh_disconnected_lost() {
    let pg = PgServer::start();
    let url = pg.create_db().await;
    let gs = [graph(), graph(), graph()];
    let mut hs = Vec::new();
    for g in &gs {
        hs.push(ha::start(g.clone(), &url).await.unwrap());
    }
    let mut agent = Peer::connect(&gs[0], Uuid::new_v4());
    agent.update(node(1));
    let mut c2 = Peer::connect(&gs[1], Uuid::new_v4());
    c2.tunnel(agent.id);
    c2.update(node(2));
    let mut c3 = Peer::connect(&gs[2], Uuid::new_v4());
    c3.tunnel(agent.id);
    c3.update(node(3));
    c2.expect(agent.id, Kind::Node, Some(1), SOON).await;
    c3.expect(agent.id, Kind::Node, Some(1), SOON).await;
    // Both clients' nodes, in whichever order they arrive.
    let mut want = std::collections::HashMap::from([(c2.id, 2), (c3.id, 3)]);
    let deadline = tokio::time::Instant::now() + SOON;
    while !want.is_empty() {
        let r = tokio::time::timeout_at(deadline, agent.rx.recv())
            .await
            .unwrap_or_else(|_| panic!("the agent still lacks {want:?}"))
            .expect("agent stream closed");
        for u in r.peer_updates {
            let id = Uuid::from_slice(&u.id).unwrap();
            if u.kind == Kind::Node as i32
                && want.get(&id).copied() == u.node.as_ref().map(|n| n.preferred_derp)
            {
                want.remove(&id);
            }
        }
    }

    agent.ready(c3.id);
    c3.expect(agent.id, Kind::ReadyForHandshake, None, SOON)
        .await;
    agent.update(node(4));
    c2.expect(agent.id, Kind::Node, Some(4), SOON).await;
    c3.expect(agent.id, Kind::Node, Some(4), SOON).await;

    c2.disconnect();
    agent.expect(c2.id, Kind::Disconnected, None, SOON).await;
    c3.drop_conn();
    agent.expect(c3.id, Kind::Lost, None, SOON).await;
    drop(hs);
}

fn counter(reg: &Registry, name: &str, label: Option<(&str, &str)>) -> u64 {
    for mf in reg.gather() {
        if mf.name() != name {
            continue;
        }
        for m in mf.get_metric() {
            let ok = label.is_none_or(|(k, v)| {
                m.get_label()
                    .iter()
                    .any(|l| l.name() == k && l.value() == v)
            });
            if ok {
                return m.get_counter().get_value() as u64;
            }
        }
    }
    0
}

/// A burst of node updates from one peer is written as (about) one statement carrying the latest
/// node: every update is either written or counted as coalesced, and the other replica ends on
/// the last one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn burst_of_updates_for_one_peer_is_coalesced_into_the_latest() {
    let pg = PgServer::start();
    let url = pg.create_db().await;
    let (g1, g2) = (graph(), graph());
    let reg = Registry::new();
    let options = ha::HaOptions {
        registry: reg.clone(),
        ..Default::default()
    };
    let h1 = ha::start_with(g1.clone(), &url, options).await.unwrap();
    let h2 = ha::start(g2.clone(), &url).await.unwrap();
    let agent = Peer::connect(&g1, Uuid::new_v4());
    agent.update(node(1));
    let mut client = Peer::connect(&g2, Uuid::new_v4());
    client.tunnel(agent.id);
    client.update(node(2));
    client.expect(agent.id, Kind::Node, Some(1), SOON).await;

    let written = || counter(&reg, "coordinator_ha_writes_total", Some(("kind", "peer")));
    let coalesced = || counter(&reg, "coordinator_ha_coalesced_total", None);
    let (w0, c0) = (written(), coalesced());
    for d in 10..210 {
        agent.update(node(d));
    }
    client.expect(agent.id, Kind::Node, Some(209), SOON).await;
    let deadline = Instant::now() + SOON;
    while written() - w0 + coalesced() - c0 < 200 {
        assert!(Instant::now() < deadline, "not every update accounted for");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (writes, merged) = (written() - w0, coalesced() - c0);
    assert_eq!(writes + merged, 200);
    assert!(
        writes <= 5,
        "200 updates took {writes} writes ({merged} coalesced)"
    );
    let row: Vec<u8> = sql(&url)
        .await
        .query_one("SELECT node FROM tailnet_peers WHERE id = $1", &[&agent.id])
        .await
        .unwrap()
        .get(0);
    let n = <Node as prost::Message>::decode(row.as_slice()).unwrap();
    assert_eq!(n.preferred_derp, 209, "the row holds the latest node");
    drop((h1, h2));
}

/// A burst of 100 clients connecting to one replica (each with a tunnel to an agent on the
/// other and a node) is written and read in batches: a handful of statements on each side, not
/// one or more per client (before batching: 2 writes and about 8 reads per client).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn burst_of_connects_is_written_and_read_in_batches() {
    let pg = PgServer::start();
    let url = pg.create_db().await;
    let (g1, g2) = (graph(), graph());
    let (reg1, reg2) = (Registry::new(), Registry::new());
    let h1 = ha::start_with(
        g1.clone(),
        &url,
        ha::HaOptions {
            registry: reg1.clone(),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let h2 = ha::start_with(
        g2.clone(),
        &url,
        ha::HaOptions {
            registry: reg2.clone(),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let mut agent = Peer::connect(&g2, Uuid::new_v4());
    agent.update(node(1));
    // The agent is written and known before the burst.
    let mut first = Peer::connect(&g1, Uuid::new_v4());
    first.tunnel(agent.id);
    first.update(node(2));
    agent.expect(first.id, Kind::Node, Some(2), SOON).await;
    first.expect(agent.id, Kind::Node, Some(1), SOON).await;

    let stmts = |r: &Registry| {
        (
            counter(r, "coordinator_ha_write_statements_total", None),
            counter(r, "coordinator_ha_read_statements_total", None),
        )
    };
    let (w1, r1) = stmts(&reg1);
    let (w2, r2) = stmts(&reg2);
    let clients: Vec<Peer> = (0..100)
        .map(|_| {
            let c = Peer::connect(&g1, Uuid::new_v4());
            c.tunnel(agent.id);
            c.update(node(3));
            c
        })
        .collect();
    let want: std::collections::HashSet<Uuid> = clients.iter().map(|c| c.id).collect();
    let mut seen = std::collections::HashSet::new();
    let deadline = tokio::time::Instant::now() + SOON;
    while seen.len() < want.len() {
        let r = tokio::time::timeout_at(deadline, agent.rx.recv())
            .await
            .unwrap_or_else(|_| panic!("the agent saw {} of 100 clients", seen.len()))
            .expect("agent stream closed");
        for u in r.peer_updates {
            let id = Uuid::from_slice(&u.id).unwrap();
            if u.kind == Kind::Node as i32 && want.contains(&id) {
                seen.insert(id);
            }
        }
    }
    let mut clients = clients;
    for c in clients.iter_mut() {
        c.expect(agent.id, Kind::Node, Some(1), SOON).await;
    }
    let (w1, r1) = (stmts(&reg1).0 - w1, stmts(&reg1).1 - r1);
    let (w2, r2) = (stmts(&reg2).0 - w2, stmts(&reg2).1 - r2);
    assert!(
        w1 + w2 <= 20 && r1 + r2 <= 20,
        "100 connects took {w1}+{w2} write and {r1}+{r2} read statements"
    );
    assert!(
        w1 >= 1 && r2 >= 1,
        "nothing counted: {w1} writes, {r2} reads"
    );
    drop((clients, first, h1, h2));
}

/// The writer's queue (16 events here) overflows under 300 connecting peers: it re-synchronises
/// from the graph instead of losing them. Afterwards the table holds exactly the connected
/// peers (all `ok`) and their tunnels: the 50 peers that left gracefully are deleted with their
/// tunnels, also those whose Disconnect was among the dropped events (the graph remembers
/// graceful leaves until the re-sync), and the other replica's agent has every client's node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writer_queue_overflow_resyncs_from_the_graph() {
    let pg = PgServer::start();
    let url = pg.create_db().await;
    let (g1, g2) = (graph(), graph());
    let reg = Registry::new();
    let options = ha::HaOptions {
        registry: reg.clone(),
        writer_queue: 16,
        ..Default::default()
    };
    let h1 = ha::start_with(g1.clone(), &url, options).await.unwrap();
    let h2 = ha::start(g2.clone(), &url).await.unwrap();
    let agent = Peer::connect(&g2, Uuid::new_v4());
    agent.update(node(1));
    let agent_id = agent.id;
    let Peer {
        handle: agent_handle,
        rx: mut agent_rx,
        ..
    } = agent;

    // 50 leavers, connected and written first (slowly enough for the 16-event queue)...
    let db = sql(&url).await;
    let me = h1.coordinator_id();
    let mut leavers = Vec::new();
    for i in 0..50 {
        let c = Peer::connect(&g1, Uuid::new_v4());
        c.tunnel(agent_id);
        c.update(node(3));
        leavers.push(c);
        if i % 5 == 4 {
            let deadline = Instant::now() + SOON;
            loop {
                let n: i64 = db
                    .query_one(
                        "SELECT count(*) FROM tailnet_tunnels t JOIN tailnet_peers p \
                         ON p.id = t.src_id AND p.coordinator_id = t.coordinator_id \
                         WHERE t.coordinator_id = $1",
                        &[&me],
                    )
                    .await
                    .unwrap()
                    .get(0);
                if n == i64::from(i + 1) {
                    break;
                }
                assert!(Instant::now() < deadline, "leavers not written: {n}");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
    assert_eq!(counter(&reg, "coordinator_ha_resyncs_total", None), 0);
    // ...then 300 clients at once (900 events: the queue overflows), and the 50 leave gracefully
    // right behind them, so their Disconnects are dropped with the overflow, or overflow it again.
    let clients: Vec<Peer> = (0..300)
        .map(|_| {
            let c = Peer::connect(&g1, Uuid::new_v4());
            c.tunnel(agent_id);
            c.update(node(2));
            c
        })
        .collect();
    for l in leavers.iter_mut() {
        l.disconnect();
    }

    let want: std::collections::HashSet<Uuid> = clients.iter().map(|c| c.id).collect();
    let mut seen = std::collections::HashSet::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while seen.len() < want.len() {
        let r = tokio::time::timeout_at(deadline, agent_rx.recv())
            .await
            .unwrap_or_else(|_| panic!("the agent saw {} of 300 clients", seen.len()))
            .expect("agent stream closed");
        for u in r.peer_updates {
            let id = Uuid::from_slice(&u.id).unwrap();
            if u.kind == Kind::Node as i32 && want.contains(&id) {
                seen.insert(id);
            }
        }
    }
    assert!(counter(&reg, "coordinator_ha_resyncs_total", None) >= 1);

    let leaver_ids: std::collections::HashSet<Uuid> = leavers.iter().map(|l| l.id).collect();
    let deadline = Instant::now() + SOON;
    loop {
        // Every row of this replica, whatever its status: a graceful leaver (even one whose
        // Disconnect fell into the overflow) is deleted, not set lost.
        let rows: Vec<(Uuid, String)> = db
            .query(
                "SELECT id, status::text FROM tailnet_peers WHERE coordinator_id = $1",
                &[&me],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect();
        let tunnel_srcs: Vec<Uuid> = db
            .query(
                "SELECT src_id FROM tailnet_tunnels WHERE coordinator_id = $1",
                &[&me],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        let ids: std::collections::HashSet<Uuid> = rows.iter().map(|r| r.0).collect();
        let all_ok = rows.iter().all(|r| r.1 == "ok");
        let client_tunnels = tunnel_srcs.iter().filter(|id| want.contains(id)).count();
        let leaver_rows = ids.intersection(&leaver_ids).count();
        let leaver_tunnels = tunnel_srcs
            .iter()
            .filter(|id| leaver_ids.contains(id))
            .count();
        if ids == want
            && rows.len() == 300
            && all_ok
            && tunnel_srcs.len() == 300
            && client_tunnels == 300
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "table not re-synchronised: {} rows ({} of the clients, {leaver_rows} of the \
             leavers, all ok: {all_ok}), {} tunnels ({client_tunnels} of the clients, \
             {leaver_tunnels} of the leavers)",
            rows.len(),
            ids.intersection(&want).count(),
            tunnel_srcs.len(),
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop((clients, leavers, agent_handle, h1, h2));
}
