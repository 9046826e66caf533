//! Database cost of replication: PostgreSQL statements per connect and per node update, counted
//! with `pg_stat_statements` over every connection of every replica, for one agent on replica A
//! and N clients (each with a tunnel to it) on replica B. Driven by `benches/ha.sh`, which starts
//! PostgreSQL (with `pg_stat_statements` preloaded) and the replicas.
//!
//! Phases, each measured between two quiet points (every peer saw what it waits for, and the
//! statement count stopped moving apart from heartbeats):
//! * connect: N clients connect (WebSocket + yamux + Coordinate), add their tunnel and send a
//!   node; done when the agent has every client's node and every client the agent's;
//! * client updates: U rounds, each client sends one changed node (a new preferred DERP), the
//!   round ends when the agent saw all of them (so nothing is coalesced: the per-update cost);
//! * agent updates: U changed agent nodes, each awaited at every client (fan-out across replicas).
//!
//! Statements the replicas send are counted (`pg_stat_statements.track = top`: not the foreign
//! key checks they trigger). Heartbeats (one statement per replica per 2 s) are excluded; statements are split into writes
//! (INSERT/UPDATE/DELETE/pg_notify) and reads (SELECT). One JSON line on stdout.
#![allow(clippy::print_stdout, clippy::print_stderr, clippy::unwrap_used)]

use std::collections::HashMap;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context, Result};
use clap::Parser;
use coordinator::authz::{addr_from_uuid, TAILSCALE_SERVICE_PREFIX};
use coordinator::rpc::drpc::{DrpcConfig, RpcClient};
use coordinator::rpc::wsio::{WsConfig, WsHandle, WsIo};
use coordinator::rpc::yamux::{self, Session};
use proto::tailnet::v2::coordinate_request::{Tunnel, UpdateSelf};
use proto::tailnet::v2::coordinate_response::peer_update::Kind;
use proto::tailnet::v2::{methods, CoordinateRequest, CoordinateResponse, Node};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use uuid::Uuid;

#[derive(Parser, Debug)]
struct Args {
    /// PostgreSQL URL (the database the replicas share; `pg_stat_statements` must be loaded).
    #[arg(long)]
    pg_url: String,
    /// Replica A (the agent's), `127.0.0.1:PORT`.
    #[arg(long)]
    a: String,
    /// Replica B (the clients'), `127.0.0.1:PORT`.
    #[arg(long)]
    b: String,
    #[arg(long)]
    agent_id: Uuid,
    #[arg(long)]
    agent_token: String,
    #[arg(long)]
    user_token: String,
    /// Clients.
    #[arg(long, default_value_t = 100)]
    clients: usize,
    /// Update rounds.
    #[arg(long, default_value_t = 10)]
    rounds: usize,
}

struct Conn {
    _rpc: RpcClient,
    _ws: WsHandle,
    tx: mpsc::Sender<CoordinateRequest>,
}

/// Opens a Coordinate stream; `on` sees every peer update (id, kind, node).
async fn open(
    addr: &str,
    path: &str,
    token: &str,
    on: impl Fn(Uuid, Kind, Option<&Node>) + Send + 'static,
) -> Result<Conn> {
    let mut req = format!("ws://{addr}{path}").into_client_request()?;
    req.headers_mut()
        .insert("Coder-Session-Token", token.parse()?);
    let (ws, _) = tokio_tungstenite::connect_async(req)
        .await
        .with_context(|| format!("dialling {addr}{path}"))?;
    let (io, handle) = WsIo::new(ws, WsConfig::client());
    let rpc = RpcClient::new(
        Session::client(io, yamux::Config::default()),
        DrpcConfig::default(),
    );
    let mut stream = rpc
        .open_stream(methods::COORDINATE)
        .await
        .map_err(|e| anyhow!("Coordinate: {e}"))?;
    let (tx, mut rx) = mpsc::channel::<CoordinateRequest>(64);
    tokio::spawn(async move {
        loop {
            tokio::select! {
                req = rx.recv() => match req {
                    Some(r) => if stream.send_msg(&r).await.is_err() { return },
                    None => return,
                },
                msg = stream.recv_msg::<CoordinateResponse>() => match msg {
                    Ok(Some(r)) => for u in r.peer_updates {
                        let (Ok(id), Ok(kind)) = (Uuid::from_slice(&u.id), Kind::try_from(u.kind)) else { continue };
                        on(id, kind, u.node.as_ref());
                    },
                    _ => return,
                },
            }
        }
    });
    Ok(Conn {
        _rpc: rpc,
        _ws: handle,
        tx,
    })
}

fn node(addr: String, derp: i32) -> Node {
    let mut key = b"np".to_vec();
    key.extend_from_slice(Uuid::new_v4().as_bytes());
    key.extend_from_slice(Uuid::new_v4().as_bytes());
    Node {
        id: 7,
        key: key.into(),
        disco: format!("discokey:{}", Uuid::new_v4().simple()),
        preferred_derp: derp,
        addresses: vec![addr.clone()],
        allowed_ips: vec![addr],
        ..Default::default()
    }
}

fn update(n: Node) -> CoordinateRequest {
    CoordinateRequest {
        update_self: Some(UpdateSelf { node: Some(n) }),
        ..Default::default()
    }
}

/// (writes, reads) so far, heartbeats and statistics queries excluded.
async fn statements(db: &tokio_postgres::Client) -> Result<(i64, i64)> {
    let row = db
        .query_one(
            "SELECT \
               coalesce(sum(calls) FILTER (WHERE query ~* '(\\m(insert|update|delete)\\M|pg_notify)'), 0)::int8, \
               coalesce(sum(calls) FILTER (WHERE NOT query ~* '(\\m(insert|update|delete)\\M|pg_notify)'), 0)::int8 \
             FROM pg_stat_statements \
             WHERE query NOT LIKE 'WITH h AS (INSERT INTO tailnet_coordinators%' \
               AND query NOT LIKE '%pg_stat_statements%' \
               AND query !~* '^\\s*(begin|commit|rollback|set|show|listen|discard)'",
            &[],
        )
        .await?;
    Ok((row.get(0), row.get(1)))
}

/// Waits until `done()` holds and the statement count stays put for 1 s.
async fn settle(
    db: &tokio_postgres::Client,
    what: &str,
    done: impl Fn() -> bool,
) -> Result<(i64, i64)> {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !done() {
        if Instant::now() > deadline {
            anyhow::bail!("{what}: not converged within 60 s");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut last = statements(db).await?;
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let now = statements(db).await?;
        if now == last {
            return Ok(now);
        }
        last = now;
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let (db, conn) = tokio_postgres::connect(&args.pg_url, tokio_postgres::NoTls).await?;
    tokio::spawn(conn);
    db.batch_execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        .await?;

    let agent_seen: Arc<Mutex<HashMap<Uuid, i32>>> = Arc::default();
    let seen = agent_seen.clone();
    let agent = open(
        &args.a,
        "/api/v2/workspaceagents/me/rpc?version=2.10&role=agent",
        &args.agent_token,
        move |id, kind, n| {
            if kind == Kind::Node {
                if let Some(n) = n {
                    seen.lock().unwrap().insert(id, n.preferred_derp);
                }
            }
        },
    )
    .await?;
    let agent_addr = format!(
        "{}/128",
        addr_from_uuid(TAILSCALE_SERVICE_PREFIX, args.agent_id)
    );
    agent.tx.send(update(node(agent_addr.clone(), 1))).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let base = settle(&db, "agent", || true).await?;

    // Connect phase.
    let path = format!(
        "/api/v2/workspaceagents/{}/coordinate?version=2.0",
        args.agent_id
    );
    let mut clients = Vec::new();
    let mut client_views = Vec::new();
    for i in 0..args.clients {
        let view = Arc::new(AtomicI32::new(0));
        let v = view.clone();
        let agent_id = args.agent_id;
        let c = open(&args.b, &path, &args.user_token, move |id, kind, n| {
            if id == agent_id && kind == Kind::Node {
                v.store(n.map_or(0, |n| n.preferred_derp), Ordering::Relaxed);
            }
        })
        .await?;
        c.tx.send(CoordinateRequest {
            add_tunnel: Some(Tunnel {
                id: args.agent_id.as_bytes().to_vec().into(),
            }),
            ..Default::default()
        })
        .await?;
        let addr = format!("fd7a:115c:a1e0:{:x}::1/128", i + 1);
        c.tx.send(update(node(addr.clone(), 1000))).await?;
        clients.push((c, addr));
        client_views.push(view);
    }
    let n = args.clients;
    let after_connect = settle(&db, "connect", || {
        agent_seen
            .lock()
            .unwrap()
            .values()
            .filter(|d| **d == 1000)
            .count()
            == n
            && client_views.iter().all(|v| v.load(Ordering::Relaxed) == 1)
    })
    .await?;

    // Client updates, one round at a time.
    let mut prev = after_connect;
    let mut client_cost = (0, 0);
    for r in 0..args.rounds {
        let derp = 2000 + r as i32;
        for (c, addr) in &clients {
            c.tx.send(update(node(addr.clone(), derp))).await?;
        }
        let now = settle(&db, "client round", || {
            agent_seen
                .lock()
                .unwrap()
                .values()
                .filter(|d| **d == derp)
                .count()
                == n
        })
        .await?;
        client_cost.0 += now.0 - prev.0;
        client_cost.1 += now.1 - prev.1;
        prev = now;
    }

    // Agent updates, each awaited at every client.
    let mut agent_cost = (0, 0);
    for r in 0..args.rounds {
        let derp = 3000 + r as i32;
        agent
            .tx
            .send(update(node(agent_addr.clone(), derp)))
            .await?;
        let now = settle(&db, "agent round", || {
            client_views
                .iter()
                .all(|v| v.load(Ordering::Relaxed) == derp)
        })
        .await?;
        agent_cost.0 += now.0 - prev.0;
        agent_cost.1 += now.1 - prev.1;
        prev = now;
    }

    let connects = n as f64;
    let updates = (n * args.rounds) as f64;
    let rounds = args.rounds as f64;
    println!(
        "{}",
        serde_json::json!({
            "clients": n,
            "rounds": args.rounds,
            "per_connect_writes": (after_connect.0 - base.0) as f64 / connects,
            "per_connect_reads": (after_connect.1 - base.1) as f64 / connects,
            "per_client_update_writes": client_cost.0 as f64 / updates,
            "per_client_update_reads": client_cost.1 as f64 / updates,
            "per_agent_update_writes": agent_cost.0 as f64 / rounds,
            "per_agent_update_reads": agent_cost.1 as f64 / rounds,
        })
    );
    // Every statement with its calls, on stderr (what the figures above are made of).
    for r in db
        .query(
            "SELECT calls, left(regexp_replace(query, '\\s+', ' ', 'g'), 110) FROM pg_stat_statements \
             ORDER BY calls DESC LIMIT 15",
            &[],
        )
        .await?
    {
        let (calls, q): (i64, String) = (r.get(0), r.get(1));
        eprintln!("{calls:>8}  {q}");
    }
    drop(clients);
    drop(agent);
    Ok(())
}
