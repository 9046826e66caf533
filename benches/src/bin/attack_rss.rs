//! Issue 14's memory attacks against a real `tailnetd dev` process, with its RSS before and after
//! each attack and the server's own accounting (its `/metrics`) next to it. A measurement for the
//! README, not a test: nothing is asserted. Each attack runs against a fresh process.
//!
//! 1. `nodes`: one user opens as many `/api/v2/tailnet` sessions as it can (the per-user cap
//!    answers 429 past it) and each sends the largest node the limits allow.
//! 2. `stalled`: one agent, many clients of one user tunnelled to it that stop reading; the agent
//!    sends a stream of distinct largest-allowed nodes.
//! 3. `partial`: one user's sessions each open many yamux streams holding partial dRPC packets,
//!    staying just under the per-session buffered-bytes limit; then one session goes over it.
//!
//! `cargo build --release -p tailnetd -p benches && target/release/attack_rss`

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use benches::fixtures::node;
use benches::process::{start_announced, Process};
use benches::procfs;
use bytes::{Bytes, BytesMut};
use clap::Parser;
use coordinator::rpc::drpc::{DrpcConfig, RpcClient, RpcStream};
use coordinator::rpc::wsio::{WsConfig, WsHandle, WsIo};
use coordinator::rpc::yamux::{self, Session};
use prost::Message;
use proto::tailnet::v2::coordinate_request::{Tunnel, UpdateSelf};
use proto::tailnet::v2::{methods, CoordinateRequest, Node};
use tokio::io::AsyncWriteExt;
use tokio_tungstenite::tungstenite;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use uuid::Uuid;

#[derive(Parser, Debug)]
#[command(about = "issue 14's memory attacks against tailnetd dev, with RSS before/after")]
struct Args {
    /// The tailnetd binary (a release build).
    #[arg(long, default_value = "target/release/tailnetd")]
    tailnetd: PathBuf,
    /// Which attacks: nodes, stalled, partial (comma-separated).
    #[arg(long, default_value = "nodes,stalled,partial")]
    attacks: String,
    /// Sessions the attacker tries to open (more than the per-user cap of 256).
    #[arg(long, default_value_t = 300)]
    sessions: usize,
    /// Stalled receivers in the `stalled` attack.
    #[arg(long, default_value_t = 200)]
    receivers: usize,
    /// Node updates the agent sends in the `stalled` attack.
    #[arg(long, default_value_t = 400)]
    updates: usize,
    /// The per-session buffered-bytes limit of client sessions the `partial` attack stays just
    /// under (`coordinator.client_session_max_buffered_bytes`).
    #[arg(long, default_value_t = 1 << 20)]
    client_session_limit: usize,
    /// Extra arguments for `tailnetd dev` (e.g. `--coordinator-max-sessions-per-user=64`).
    #[arg(long, allow_hyphen_values = true)]
    server_arg: Vec<String>,
}

/// Largest node bytes and endpoints the default limits allow.
const MAX_NODE_BYTES: usize = 65_536;

/// A running `tailnetd dev`.
struct Server {
    process: Process,
    addr: SocketAddr,
    agent_id: Uuid,
    agent_token: String,
    client_token: String,
}

impl Server {
    fn start(args: &Args) -> Result<Server> {
        let mut cmd = Command::new(&args.tailnetd);
        cmd.args([
            "dev",
            "--http-addr",
            "127.0.0.1:0",
            "--stun-addr",
            "",
            "--metrics-addr",
            "",
            "--log",
            "warn",
        ])
        .args(&args.server_arg);
        let a = start_announced(&args.tailnetd.display().to_string(), cmd, None)?;
        Ok(Server {
            addr: a.field("http_addr")?.parse()?,
            agent_id: a.field("agent_id")?.parse()?,
            agent_token: a.field("agent_token")?,
            client_token: a.field("client_token")?,
            process: a.process,
        })
    }

    fn rss_mb(&self) -> f64 {
        procfs::rss_bytes(self.process.pid()).unwrap_or(0) as f64 / (1 << 20) as f64
    }

    /// Sum of every sample of `name` (with labels containing `label`) on `/metrics`.
    fn metric(&self, name: &str, label: &str) -> f64 {
        let Ok(mut s) = TcpStream::connect(self.addr) else {
            return f64::NAN;
        };
        let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
        let req = format!(
            "GET /metrics HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
            self.addr
        );
        if s.write_all(req.as_bytes()).is_err() {
            return f64::NAN;
        }
        let mut text = String::new();
        let _ = s.read_to_string(&mut text);
        text.lines()
            .filter(|l| {
                l.split(['{', ' ']).next() == Some(name) && (label.is_empty() || l.contains(label))
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    /// Waits until `name` has stopped changing for a second (at most `wait`).
    async fn settle(&self, name: &str, wait: Duration) -> f64 {
        let end = Instant::now() + wait;
        let mut last = self.metric(name, "");
        let mut stable_since = Instant::now();
        while Instant::now() < end {
            tokio::time::sleep(Duration::from_millis(250)).await;
            let now = self.metric(name, "");
            if now != last {
                last = now;
                stable_since = Instant::now();
            } else if stable_since.elapsed() >= Duration::from_secs(1) {
                break;
            }
        }
        last
    }
}

/// One v2 session of the attacker.
struct Conn {
    rpc: RpcClient,
    _ws: WsHandle,
}

enum Dial<T> {
    Ok(T),
    /// The server answered this status instead of upgrading.
    Refused(u16),
}

async fn ws(addr: SocketAddr, path: &str, token: &str) -> Result<Dial<WsIo>> {
    let mut req = format!("ws://{addr}{path}").into_client_request()?;
    req.headers_mut()
        .insert("Coder-Session-Token", token.parse()?);
    match tokio_tungstenite::connect_async(req).await {
        Ok((ws, _)) => Ok(Dial::Ok(WsIo::new(ws, WsConfig::client()).0)),
        Err(tungstenite::Error::Http(resp)) => Ok(Dial::Refused(resp.status().as_u16())),
        Err(e) => Err(e.into()),
    }
}

async fn dial(addr: SocketAddr, path: &str, token: &str) -> Result<Dial<Conn>> {
    let mut r = format!("ws://{addr}{path}").into_client_request()?;
    r.headers_mut()
        .insert("Coder-Session-Token", token.parse()?);
    let ws = match tokio_tungstenite::connect_async(r).await {
        Ok((ws, _)) => ws,
        Err(tungstenite::Error::Http(resp)) => return Ok(Dial::Refused(resp.status().as_u16())),
        Err(e) => return Err(e.into()),
    };
    let (io, handle) = WsIo::new(ws, WsConfig::client());
    let session = Session::client(io, yamux::Config::default());
    Ok(Dial::Ok(Conn {
        rpc: RpcClient::new(session, DrpcConfig::default()),
        _ws: handle,
    }))
}

async fn coordinate(c: &Conn) -> Result<RpcStream> {
    Ok(c.rpc.open_stream(methods::COORDINATE).await?)
}

fn update_self(n: Node) -> CoordinateRequest {
    CoordinateRequest {
        update_self: Some(UpdateSelf { node: Some(n) }),
        ..Default::default()
    }
}

/// The largest node the default limits allow for `peer`: one long endpoint fills it up to
/// `MAX_NODE_BYTES`; `tag` makes each version distinct.
fn largest_node(peer: Uuid, agent: bool, tag: usize) -> Node {
    let mut n = node(peer, agent, 1);
    n.endpoints = vec![format!("{tag}:")];
    let room = MAX_NODE_BYTES - n.encoded_len() - 8;
    n.endpoints[0].push_str(&"e".repeat(room));
    n
}

#[allow(clippy::print_stdout, reason = "the report is this tool's output")]
fn report(attack: &str, what: &str, before: f64, after: f64, accounting: &str) {
    println!(
        "| {attack} | {what} | {before:.0} | {after:.0} | {:+.0} | {accounting} |",
        after - before
    );
}

/// Attack 1: max-size nodes over as many sessions of one user as it can open.
async fn attack_nodes(args: &Args) -> Result<()> {
    let s = Server::start(args)?;
    let before = s.rss_mb();
    let mut held = Vec::new();
    let mut refused = 0;
    for _ in 0..args.sessions {
        match dial(s.addr, "/api/v2/tailnet?version=2.3", &s.client_token).await? {
            Dial::Ok(c) => {
                let stream = coordinate(&c).await?;
                stream
                    .send_msg(&update_self(largest_node(Uuid::new_v4(), false, 0)))
                    .await?;
                held.push((c, stream));
            }
            Dial::Refused(429) => refused += 1,
            Dial::Refused(other) => bail!("unexpected status {other}"),
        }
    }
    let node_bytes = s
        .settle("coordinator_graph_node_bytes", Duration::from_secs(60))
        .await;
    let after = s.rss_mb();
    report(
        "nodes",
        &format!(
            "{} sessions of one user tried, {} open, {refused} refused (429), each with a {} B node",
            args.sessions,
            held.len(),
            MAX_NODE_BYTES
        ),
        before,
        after,
        &format!(
            "graph node bytes {node_bytes:.0}; session buffered bytes {:.0}",
            s.metric("coordinator_session_buffered_bytes", "")
        ),
    );
    drop(held);
    Ok(())
}

/// Attack 2: stalled tunnelled receivers and an agent sending distinct max-size nodes.
async fn attack_stalled(args: &Args) -> Result<()> {
    let s = Server::start(args)?;
    let before = s.rss_mb();
    let Dial::Ok(agent) = dial(
        s.addr,
        "/api/v2/workspaceagents/me/rpc?version=2.10&role=agent",
        &s.agent_token,
    )
    .await?
    else {
        bail!("agent refused");
    };
    let agent_stream = coordinate(&agent).await?;
    agent_stream
        .send_msg(&update_self(node(s.agent_id, true, 1)))
        .await?;
    let path = format!(
        "/api/v2/workspaceagents/{}/coordinate?version=2.0",
        s.agent_id
    );
    let mut receivers = Vec::new();
    for _ in 0..args.receivers {
        let Dial::Ok(c) = dial(s.addr, &path, &s.client_token).await? else {
            bail!("client refused");
        };
        let mut stream = coordinate(&c).await?;
        stream
            .send_msg(&CoordinateRequest {
                add_tunnel: Some(Tunnel {
                    id: Bytes::copy_from_slice(s.agent_id.as_bytes()),
                }),
                ..Default::default()
            })
            .await?;
        // Read the agent's node once, then never again.
        tokio::time::timeout(Duration::from_secs(10), stream.recv())
            .await
            .context("no agent node")??;
        receivers.push((c, stream));
    }
    let mut peak_outbox: f64 = 0.0;
    for i in 0..args.updates {
        agent_stream
            .send_msg(&update_self(largest_node(s.agent_id, true, i)))
            .await?;
        if i % 20 == 0 {
            peak_outbox = peak_outbox.max(s.metric("coordinator_outbox_bytes", ""));
        }
    }
    s.settle("coordinator_outbox_bytes", Duration::from_secs(30))
        .await;
    peak_outbox = peak_outbox.max(s.metric("coordinator_outbox_bytes", ""));
    let after = s.rss_mb();
    report(
        "stalled",
        &format!(
            "{} stalled receivers of one agent; the agent sent {} distinct {} B nodes ({} MB)",
            args.receivers,
            args.updates,
            MAX_NODE_BYTES,
            args.updates * MAX_NODE_BYTES / 1_000_000
        ),
        before,
        after,
        &format!(
            "outbox bytes peak {peak_outbox:.0}, now {:.0}; byte-bound kicks {:.0}",
            s.metric("coordinator_outbox_bytes", ""),
            s.metric("coordinator_outbox_byte_overflows_total", ""),
        ),
    );
    drop(receivers);
    Ok(())
}

/// One dRPC frame of an Invoke that never completes, `len` bytes of data.
fn partial_invoke(len: usize) -> BytesMut {
    let mut out = BytesMut::new();
    proto::drpc::Frame {
        stream_id: 1,
        message_id: 1,
        kind: proto::drpc::Kind::Invoke,
        done: false,
        control: false,
        data: Bytes::from(vec![b'x'; len]),
    }
    .encode(&mut out);
    out
}

/// Attack 3: many yamux streams with partial packets, in every session one user may open.
async fn attack_partial(args: &Args) -> Result<()> {
    // Each stream's partial Invoke is held twice (assembler + raw prefix) next to the stream's
    // 8 KiB read buffer: fill 90% of the per-session limit.
    const PART: usize = 100 * 1024;
    let per_stream = 2 * PART + 16 * 1024;
    let streams_per_session = (args.client_session_limit * 9 / 10 / per_stream).max(1);
    let s = Server::start(args)?;
    let before = s.rss_mb();
    let mut held = Vec::new();
    let mut refused = 0;
    for _ in 0..args.sessions {
        match ws(s.addr, "/api/v2/tailnet?version=2.3", &s.client_token).await? {
            Dial::Ok(io) => {
                let session = Session::client(io, yamux::Config::default());
                let mut streams = Vec::new();
                for _ in 0..streams_per_session {
                    let mut st = session.open().await?;
                    st.write_all(&partial_invoke(PART)).await?;
                    streams.push(st);
                }
                held.push((session, streams));
            }
            Dial::Refused(429) => refused += 1,
            Dial::Refused(other) => bail!("unexpected status {other}"),
        }
    }
    let buffered = s
        .settle(
            "coordinator_session_buffered_bytes",
            Duration::from_secs(60),
        )
        .await;
    let after = s.rss_mb();
    report(
        "partial",
        &format!(
            "{} sessions of one user tried, {} open, {refused} refused; {streams_per_session} streams each with a {} KiB partial packet per session",
            args.sessions,
            held.len(),
            PART / 1024
        ),
        before,
        after,
        &format!(
            "session buffered bytes {buffered:.0}; sessions ended over the limit {:.0}",
            s.metric("tailnetd_yamux_buffer_limit_exceeded_total", "")
        ),
    );
    // One session more goes over its limit: it is ended and what it held is given back.
    drop(held.pop());
    let deadline = Instant::now() + Duration::from_secs(10);
    let io = loop {
        match ws(s.addr, "/api/v2/tailnet?version=2.3", &s.client_token).await? {
            Dial::Ok(io) => break io,
            Dial::Refused(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Dial::Refused(status) => bail!("refused with {status}"),
        }
    };
    let session = Session::client(io, yamux::Config::default());
    let mut streams = Vec::new();
    for _ in 0..64 {
        let Ok(mut st) = session.open().await else {
            break;
        };
        if st.write_all(&partial_invoke(PART)).await.is_err() {
            break;
        }
        streams.push(st);
    }
    let _ = tokio::time::timeout(Duration::from_secs(10), session.closed()).await;
    let buffered_after = s
        .settle(
            "coordinator_session_buffered_bytes",
            Duration::from_secs(30),
        )
        .await;
    report(
        "partial, one more over the limit",
        "a session in its place writes 64 such streams",
        after,
        s.rss_mb(),
        &format!(
            "session buffered bytes {buffered_after:.0}; sessions ended over the limit {:.0}",
            s.metric("tailnetd_yamux_buffer_limit_exceeded_total", "")
        ),
    );
    drop((streams, session, held));
    Ok(())
}

#[tokio::main]
#[allow(clippy::print_stdout, reason = "the report is this tool's output")]
async fn main() -> Result<()> {
    let args = Args::parse();
    println!("| attack | what the attacker did | RSS before (MB) | RSS after (MB) | growth (MB) | the server's own accounting |");
    println!("|---|---|---|---|---|---|");
    for attack in args.attacks.split(',').map(str::trim) {
        match attack {
            "nodes" => attack_nodes(&args).await?,
            "stalled" => attack_stalled(&args).await?,
            "partial" => attack_partial(&args).await?,
            other => bail!("unknown attack {other:?}"),
        }
    }
    Ok(())
}
