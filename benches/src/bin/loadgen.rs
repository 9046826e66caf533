//! Load generator for tailnetd, derper, the TCP-forward ceiling and Coder's Go coordinator.
//! Prints one JSON object per run on stdout and one human-readable line on stderr.

use anyhow::Result;
use benches::{coord, idle, relay};
use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "loadgen", about = "DERP relay and coordinator load generator")]
struct Cli {
    /// Runtime worker threads (default: the CPUs this process may run on).
    #[arg(long, global = true)]
    threads: Option<usize>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// P sender→receiver pairs through a relay (or the TCP forwarder).
    Relay(relay::RelayArgs),
    /// N idle DERP connections; server RSS per connection.
    Idle(idle::IdleArgs),
    /// A agents × C clients over Coder's v2 protocol.
    Coordinator(coord::CoordArgs),
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let threads = cli.threads.unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    });
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads.max(1))
        .enable_all()
        .build()?;
    let (json, human) = rt.block_on(async {
        Ok::<_, anyhow::Error>(match cli.cmd {
            Cmd::Relay(a) => {
                let r = relay::run(a).await?;
                let h = format!(
                    "relay {} {} P={} S={} offered={:.0}pps (actual {:.0}): {:.3} Gbit/s {:.0} pps loss {:.2}% stalls {} p50 {:.0}µs p99 {:.0}µs p99.9 {:.0}µs cpu {} loadgen cpu {}; µs/packet server {} client {}",
                    r.transport, r.flush, r.pairs, r.size, r.offered_pps, r.actual_offered_pps,
                    r.delivered_gbps, r.delivered_pps, r.loss * 100.0, r.window_stalls,
                    r.latency_p50_us, r.latency_p99_us, r.latency_p999_us,
                    r.server_cpu_util.map_or("-".into(), |u| format!("{u:.2}")),
                    r.loadgen_cpu_util.map_or("-".into(), |u| format!("{u:.2}")),
                    r.server_cpu_us_per_packet.map_or("-".into(), |u| format!("{u:.2}")),
                    r.loadgen_cpu_us_per_packet.map_or("-".into(), |u| format!("{u:.2}"))
                );
                (serde_json::to_string(&r)?, h)
            }
            Cmd::Idle(a) => {
                let r = idle::run(a).await?;
                let h = format!(
                    "idle {}/{} conns: {:.0} B/conn RSS, {:.0} conns/s",
                    r.connected, r.conns, r.rss_per_conn_bytes, r.connect_rate_per_s
                );
                (serde_json::to_string(&r)?, h)
            }
            Cmd::Coordinator(a) => {
                let r = coord::run(a).await?;
                let h = format!(
                    "coordinator {} {}x{} ({} peers): {:.0} updates/s delivered (offered {:.0}), fan-out p50 {:.2}ms p99 {:.2}ms, to-agent p99 {:.2}ms, setup {:.0} peers/s, {} failed, {} duplicates",
                    r.flavor, r.agents, r.clients_per_agent, r.peers, r.delivered_updates_per_s,
                    r.offered_deliveries_per_s, r.fanout_p50_ms, r.fanout_p99_ms, r.to_agent_p99_ms,
                    r.setup_peers_per_s, r.failed_streams, r.duplicate_updates
                );
                (serde_json::to_string(&r)?, h)
            }
        })
    })?;
    // The JSON line on stdout is this tool's output contract.
    #[allow(clippy::print_stdout)]
    {
        println!("{json}");
    }
    eprintln!("{human}");
    rt.shutdown_timeout(std::time::Duration::from_secs(1));
    Ok(())
}
