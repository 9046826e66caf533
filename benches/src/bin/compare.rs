//! Side-by-side comparison: runs tailnetd's relay, Tailscale's `derper`, a plain TCP forwarder
//! (the machine's ceiling), tailnetd's coordinator and Coder's Go coordinator one after the
//! other — each server pinned to core 0, the load generator to core 1 — and writes
//! `benches/results/RESULTS.md`, `results.json` and `relay.png`.
//!
//! Every cell (workload × parameters) runs several times with the servers interleaved
//! (A B A B …) and is reported as the median with min–max. Each finished run is stored at once in
//! `results.json` under the output directory, and a later invocation adds to it: `--only` runs
//! parts, an interrupted run resumes where it stopped, and cells already measured often enough
//! are skipped (`--fresh` starts over). A full comparison takes hours on two cores, so it may
//! span several invocations; each run records the 1-minute load average before it, and a full
//! run flags runs that started while something else kept the machine busy.
//!
//! Relay workloads run in several modes: our load generator over plain HTTP, TLS and WebSocket,
//! batched (32 packets per write) and per-packet (one frame per write and flush, Tailscale's
//! client behaviour), and Tailscale's own `derphttp` client (`interop/derpload`), plain and TLS.
//!
//! `--quick` runs only tailnetd's workloads (and the forwarder), once each with tiny durations,
//! into `target/bench-quick/`: a smoke test that every workload runs and reports sane figures. It
//! needs neither Go nor derper and asserts nothing about speed.

use std::io::BufReader;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use benches::capacity::{self, CapacityReport, CpuShare, Probe, SearchPlan};
use benches::chart::{self, Panel, Series};
use benches::coord::{AuthFile, CoordReport};
use benches::idle::IdleReport;
use benches::process::{start_announced, Process};
use benches::relay::{Flush, RelayReport};
use clap::Parser;
use serde::{Deserialize, Serialize};

/// Tailscale release whose `derper` we compare against (the version `interop/tailscale` uses).
const DERPER_VERSION: &str = "v1.102.5";
/// Closed-loop window (packets in flight per pair) of the maximum-throughput runs: derper's and
/// tailnetd's per-destination queue depth, so no relay ever needs to drop.
const WINDOW: u64 = 32;
/// Coder release whose Go coordinator `interop/gocoord` serves.
const CODER_VERSION: &str = "v2.36.1";

#[derive(Debug, Parser)]
#[command(
    name = "compare",
    about = "tailnetd vs derper vs TCP ceiling vs Go coordinator"
)]
struct Cli {
    /// Smoke test: tailnetd workloads only, tiny durations, results under target/bench-quick.
    #[arg(long)]
    quick: bool,
    /// Measurement window per relay run, seconds (default 5; quick 0.5).
    #[arg(long)]
    duration: Option<f64>,
    /// Skip derper even if Go is available.
    #[arg(long)]
    no_derper: bool,
    /// Skip the Go coordinator even if Go is available.
    #[arg(long)]
    no_gocoord: bool,
    /// Idle connections per server (default 10,000; quick 100).
    #[arg(long)]
    idle_conns: Option<usize>,
    /// Output directory (default benches/results, quick: target/bench-quick).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Use the already-built tailnetd, loadgen and tcpfwd next to this binary (no cargo build).
    #[arg(long)]
    no_build: bool,
    /// Run only these parts (comma-separated): relay, relay-pp, relay-tls, relay-tls-pp,
    /// relay-ws, relay-go, relay-go-ws, relay-go-tls, sweep, idle, coord, coord-cap; default
    /// all.
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Runs of every cell (overrides --headline-runs and --other-runs).
    #[arg(long)]
    runs: Option<usize>,
    /// Runs of each headline cell (relay 100 × 1400 B in every mode, idle, coordinator at
    /// 10,100 peers); quick: 1.
    #[arg(long, default_value_t = 5)]
    headline_runs: usize,
    /// Runs of every other cell; quick: 1.
    #[arg(long, default_value_t = 3)]
    other_runs: usize,
    /// Forget the stored runs of the parts this invocation runs (all parts without --only)
    /// instead of adding to them; the other parts' runs are kept.
    #[arg(long)]
    fresh: bool,
    /// Forget the stored runs that were marked as disturbed (†), so they are measured again.
    #[arg(long)]
    rerun_busy: bool,
    /// Relay pair counts to run (default 1,10,100; quick 1,10).
    #[arg(long, value_delimiter = ',')]
    pairs: Vec<usize>,
    /// Relay packet sizes to run (default 100,1400,8000; quick 1400).
    #[arg(long, value_delimiter = ',')]
    sizes: Vec<usize>,
    /// A run is flagged as disturbed when the 1-minute load average before it exceeds this
    /// (default: CPUs + 0.5: our own server and load generator account for at most one per
    /// core). Not applied to --quick.
    #[arg(long)]
    busy_load: Option<f64>,
    /// CPU share (cores) the coordinator is held to by a cgroup in the capacity search
    /// (`coord-cap`), so that it, not the load generator, is the limit.
    #[arg(long, default_value_t = 0.25)]
    coord_cpu_share: f64,
    /// CPU share (cores) the relays are held to by a cgroup in the `-held` relay parts, so that
    /// the server, not the load generator, is the limit in every cell.
    #[arg(long, default_value_t = 0.5)]
    relay_cpu_share: f64,
    /// Only re-render RESULTS.md and relay.png (into --out or the file's directory) from a
    /// results.json written by an earlier run.
    #[arg(long)]
    render: Option<PathBuf>,
}

fn root() -> PathBuf {
    let here = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    here.parent().map(Path::to_path_buf).unwrap_or(here)
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("target"))
}

fn profile() -> &'static str {
    if cfg!(debug_assertions) {
        "debug"
    } else {
        "release"
    }
}

/// Builds tailnetd, loadgen and tcpfwd with the profile this binary was built with.
fn build_rust() -> Result<PathBuf> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(root()).args([
        "build", "-p", "tailnetd", "--bin", "tailnetd", "-p", "benches", "--bin", "loadgen",
        "--bin", "tcpfwd",
    ]);
    if profile() == "release" {
        cmd.arg("--release");
    }
    let st = cmd.status().context("running cargo build")?;
    if !st.success() {
        bail!("cargo build failed");
    }
    Ok(target_dir().join(profile()))
}

fn have(cmd: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {cmd} >/dev/null 2>&1")])
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

fn cpus() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

/// Builds derper at [`DERPER_VERSION`] into target/gobin (Go's module cache is the only cache).
fn build_derper() -> Result<PathBuf> {
    let gobin = target_dir().join("gobin");
    let bin = gobin.join("derper");
    if bin.exists() {
        return Ok(bin);
    }
    let st = Command::new("go")
        .args([
            "install",
            &format!("tailscale.com/cmd/derper@{DERPER_VERSION}"),
        ])
        .env("GOBIN", &gobin)
        .env("GOFLAGS", "-buildvcs=false")
        .status()
        .context("go install derper")?;
    if !st.success() {
        bail!("go install derper failed");
    }
    Ok(bin)
}

/// Builds interop/derpload (the load generator on Tailscale's derphttp client) into
/// target/gobin, twice: as is, and as `derpload-ws` with Tailscale's build tag
/// `ts_debug_websockets` (derphttp's WebSocket dialer); the second sits next to the first.
fn build_derpload() -> Result<PathBuf> {
    let bin = target_dir().join("gobin").join("derpload");
    for (out, tags) in [
        (bin.clone(), ""),
        (bin.with_file_name("derpload-ws"), "ts_debug_websockets"),
    ] {
        build_derpload_one(&out, tags)?;
    }
    Ok(bin)
}

fn build_derpload_one(bin: &Path, tags: &str) -> Result<()> {
    let st = Command::new("go")
        .args(["build", "-tags", tags, "-o"])
        .arg(bin)
        .arg(".")
        .current_dir(root().join("interop").join("derpload"))
        .env("GOFLAGS", "-buildvcs=false")
        .status()
        .context("go build derpload")?;
    if !st.success() {
        bail!("go build derpload failed");
    }
    Ok(())
}

/// Builds interop/gocoord into target/gobin.
fn build_gocoord() -> Result<PathBuf> {
    let bin = target_dir().join("gobin").join("gocoord");
    let st = Command::new("go")
        .args(["build", "-o"])
        .arg(&bin)
        .arg(".")
        .current_dir(root().join("interop").join("gocoord"))
        .env("GOFLAGS", "-buildvcs=false")
        .status()
        .context("go build gocoord")?;
    if !st.success() {
        bail!("go build gocoord failed");
    }
    Ok(bin)
}

/// How processes are pinned.
#[derive(Clone, Copy)]
struct Pin {
    enabled: bool,
}

impl Pin {
    fn command(&self, core: usize, bin: &Path) -> Command {
        if self.enabled {
            let mut c = Command::new("taskset");
            c.arg("-c").arg(core.to_string()).arg(bin);
            c
        } else {
            Command::new(bin)
        }
    }
}

/// A running server (killed on drop).
struct Server {
    process: Process,
    addr: String,
    /// The HTTPS listener, when started with TLS.
    tls_addr: Option<String>,
}

impl Server {
    fn pid(&self) -> u32 {
        self.process.pid()
    }
}

/// Every distinct server command line started (provenance: the flags in the results), with
/// the per-invocation scratch directory written as `$DIR`.
static COMMANDS: std::sync::Mutex<std::collections::BTreeSet<String>> =
    std::sync::Mutex::new(std::collections::BTreeSet::new());

fn note_command(cmd: &Command, dir: &Path) {
    let mut line = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        let a = a.to_string_lossy();
        line.push(' ');
        if a.is_empty() {
            line.push_str("\"\"");
        } else {
            line.push_str(&a);
        }
    }
    let line = line.replace(&dir.display().to_string(), "$DIR");
    COMMANDS
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(line);
}

/// Starts a server that prints a JSON line with `http_addr` on stdout.
fn start_json_server(name: &str, cmd: Command, log: &Path) -> Result<Server> {
    if let Some(dir) = log.parent() {
        note_command(&cmd, dir);
    }
    let a = start_announced(name, cmd, Some(log))?;
    Ok(Server {
        addr: a.field("http_addr")?,
        tls_addr: a.optional("https_addr"),
        process: a.process,
    })
}

fn free_port() -> Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

/// Starts derper; with `tls`, in its manual certificate mode on the self-signed certificate
/// `tls_files` wrote for `localhost` (`-certmode manual -certdir D -hostname localhost`).
fn start_derper(
    bin: &Path,
    pin: Pin,
    dir: &Path,
    tls: bool,
    wrap: impl FnOnce(Command) -> Command,
) -> Result<Server> {
    let port = free_port()?;
    let log = std::fs::File::create(dir.join("derper.log"))?;
    let mut cmd = pin.command(0, bin);
    cmd.args([
        "-a",
        &format!("127.0.0.1:{port}"),
        "-stun=false",
        "-http-port",
        "-1",
    ])
    .arg("-c")
    .arg(dir.join("derper.key"));
    if tls {
        cmd.args(["-certmode", "manual", "-hostname", "localhost", "-certdir"])
            .arg(dir.join("certs"));
    }
    let mut cmd = wrap(cmd);
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::from(log));
    note_command(&cmd, dir);
    let process = Process(cmd.spawn().context("starting derper")?);
    let addr = format!("127.0.0.1:{port}");
    let s = Server {
        process,
        addr: addr.clone(),
        tls_addr: tls.then(|| addr.clone()),
    };
    let t = Instant::now();
    while std::net::TcpStream::connect(&addr).is_err() {
        if t.elapsed() > Duration::from_secs(20) {
            bail!("derper did not listen on {addr}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(s)
}

struct Bins {
    tailnetd: PathBuf,
    loadgen: PathBuf,
    tcpfwd: PathBuf,
    derper: Option<PathBuf>,
    gocoord: Option<PathBuf>,
    derpload: Option<PathBuf>,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize, Deserialize)]
enum Relay {
    Tailnetd,
    Derper,
    Ceiling,
}

impl Relay {
    fn name(self) -> &'static str {
        match self {
            Relay::Tailnetd => "tailnetd",
            Relay::Derper => "derper",
            Relay::Ceiling => "tcp-forward",
        }
    }
}

/// One way of loading the relays: a part of the comparison (`--only` name) and its table.
#[derive(Clone, Copy, Debug)]
struct Mode {
    part: &'static str,
    title: &'static str,
    tls: bool,
    websocket: bool,
    flush: Flush,
    /// Tailscale's derphttp client (`interop/derpload`) instead of our load generator.
    go: bool,
    /// The server held to `--relay-cpu-share` by a CPU cgroup (P = 100 only).
    held: bool,
}

impl Mode {
    /// Whether the forwarder ceiling runs in this mode: with our load generator and without
    /// WebSocket (plain, or TLS-terminating in the TLS modes); it speaks no DERP handshake, so
    /// not with Tailscale's client.
    fn has_ceiling(&self) -> bool {
        !self.websocket && !self.go
    }
}

/// Whether the parts `want` selects start the plain forwarder (so its io_uring engine is probed
/// first): the sweep, and every plain relay mode with a ceiling. The TLS modes' ceiling is always
/// the tokio engine.
fn runs_plain_ceiling(want: &dyn Fn(&str) -> bool) -> bool {
    want("sweep")
        || MODES
            .iter()
            .any(|m| m.has_ceiling() && !m.tls && want(m.part))
}

/// Every relay mode, in table order (which of them have a ceiling: [`Mode::has_ceiling`]).
const MODES: &[Mode] = &[
    Mode {
        part: "relay",
        title: "plain HTTP, batched writes (up to 32 packets per write)",
        tls: false,
        websocket: false,
        flush: Flush::Batched,
        go: false,
        held: false,
    },
    Mode {
        part: "relay-pp",
        title: "plain HTTP, one frame per write and flush (Tailscale's client behaviour)",
        tls: false,
        websocket: false,
        flush: Flush::PerPacket,
        go: false,
        held: false,
    },
    Mode {
        part: "relay-held",
        title: "plain HTTP, batched writes, server held to a CPU share (the server is the limit)",
        tls: false,
        websocket: false,
        flush: Flush::Batched,
        go: false,
        held: true,
    },
    Mode {
        part: "relay-pp-held",
        title: "plain HTTP, one frame per write and flush, server held to a CPU share (the server is the limit)",
        tls: false,
        websocket: false,
        flush: Flush::PerPacket,
        go: false,
        held: true,
    },
    Mode {
        part: "relay-tls",
        title: "TLS, batched writes",
        tls: true,
        websocket: false,
        flush: Flush::Batched,
        go: false,
        held: false,
    },
    Mode {
        part: "relay-tls-pp",
        title: "TLS, one frame per write and flush",
        tls: true,
        websocket: false,
        flush: Flush::PerPacket,
        go: false,
        held: false,
    },
    Mode {
        part: "relay-ws",
        title: "WebSocket over plain HTTP, batched writes",
        tls: false,
        websocket: true,
        flush: Flush::Batched,
        go: false,
        held: false,
    },
    Mode {
        part: "relay-go",
        title: "Tailscale's derphttp client (interop/derpload), plain HTTP, one frame per Send",
        tls: false,
        websocket: false,
        flush: Flush::PerPacket,
        go: true,
        held: false,
    },
    Mode {
        part: "relay-go-ws",
        title: "Tailscale's derphttp client (interop/derpload built with ts_debug_websockets), WebSocket over plain HTTP, one frame per Send",
        tls: false,
        websocket: true,
        flush: Flush::PerPacket,
        go: true,
        held: false,
    },
    Mode {
        part: "relay-go-tls",
        title: "Tailscale's derphttp client (interop/derpload), TLS, one frame per Send",
        tls: true,
        websocket: false,
        flush: Flush::PerPacket,
        go: true,
        held: false,
    },
];

/// The headline relay cell.
const HEADLINE: (usize, usize) = (100, 1400);

struct Ctx {
    bins: Bins,
    pin: Pin,
    dir: PathBuf,
    quick: bool,
    duration: f64,
    warmup: f64,
    notes: Vec<String>,
    /// The forwarder's engine for plain TCP: `uring` where the kernel allows io_uring, else
    /// `tokio` (TLS cells always use `tokio`: the TLS-terminating engine).
    ceiling_engine: &'static str,
    /// The cgroup of the `-held` relay parts (absent when they do not run or it could not be
    /// made: then the quick mode runs them unheld, a full run skips them).
    relay_share: Option<CpuShare>,
}

impl Ctx {
    /// Starts a relay, held to [`Ctx::relay_share`] when `held`.
    fn start_relay(&self, which: Relay, tls: bool, held: bool) -> Result<Server> {
        let wrap = |c: Command| match (held, &self.relay_share) {
            (true, Some(share)) => share.wrap(&c),
            _ => c,
        };
        match which {
            Relay::Tailnetd => {
                let mut c = self.pin.command(0, &self.bins.tailnetd);
                c.args([
                    "derp",
                    "--http-addr",
                    "127.0.0.1:0",
                    "--stun-addr",
                    "",
                    "--log",
                    "warn",
                    "--metrics-addr",
                    "",
                ])
                .arg("--key-file")
                .arg(self.dir.join("tailnetd.key"));
                if tls {
                    let (cert, key) = tls_files(&self.dir)?;
                    c.args(["--https-addr", "127.0.0.1:0", "--tls-cert"])
                        .arg(cert)
                        .arg("--tls-key")
                        .arg(key);
                }
                start_json_server("tailnetd", wrap(c), &self.dir.join("tailnetd.log"))
            }
            Relay::Derper => {
                let bin = self
                    .bins
                    .derper
                    .as_ref()
                    .ok_or_else(|| anyhow!("derper not available"))?;
                if tls {
                    tls_files(&self.dir)?;
                }
                start_derper(bin, self.pin, &self.dir, tls, wrap)
            }
            Relay::Ceiling => {
                let mut c = self.pin.command(0, &self.bins.tcpfwd);
                c.args(["--listen", "127.0.0.1:0"]);
                if tls {
                    let (cert, key) = tls_files(&self.dir)?;
                    c.args(["--engine", "tokio", "--tls-cert"])
                        .arg(cert)
                        .arg("--tls-key")
                        .arg(key);
                } else {
                    c.args(["--engine", self.ceiling_engine]);
                }
                start_json_server("tcpfwd", wrap(c), &self.dir.join("tcpfwd.log"))
            }
        }
    }

    /// Runs a load generator pinned to core 1 and returns the last line of its stdout.
    fn generator(&self, bin: &Path, args: &[String], timeout: Duration) -> Result<String> {
        let mut cmd = self.pin.command(1, bin);
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let mut child = cmd
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let out = child.stdout.take().ok_or_else(|| anyhow!("no stdout"))?;
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut s = String::new();
            let _ = std::io::Read::read_to_string(&mut BufReader::new(out), &mut s);
            let _ = tx.send(s);
        });
        let out = match rx.recv_timeout(timeout) {
            Ok(s) => s,
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                bail!("{} timed out after {timeout:?}: {args:?}", bin.display());
            }
        };
        let st = child.wait()?;
        if !st.success() {
            bail!("{} failed ({st}): {args:?}", bin.display());
        }
        Ok(out.lines().last().unwrap_or("").to_string())
    }

    fn loadgen(&self, args: &[String], timeout: Duration) -> Result<String> {
        self.generator(&self.bins.loadgen, args, timeout)
    }

    #[allow(clippy::too_many_arguments)]
    fn relay_run(
        &self,
        which: Relay,
        mode: &Mode,
        pairs: usize,
        size: usize,
        rate: f64,
        window: u64,
        label: &str,
    ) -> Result<RelayReport> {
        let srv = self.start_relay(which, mode.tls, mode.held)?;
        let tls_port = || {
            srv.tls_addr
                .as_deref()
                .and_then(|a| a.rsplit(':').next())
                .map(str::to_string)
                .ok_or_else(|| anyhow!("{} announced no https_addr", which.name()))
        };
        let url = match (which, mode.tls) {
            (Relay::Ceiling, false) => srv.addr.clone(),
            (Relay::Ceiling, true) => format!("tls://localhost:{}", tls_port()?),
            (_, false) => format!("http://{}/derp", srv.addr),
            (_, true) => format!("https://localhost:{}/derp", tls_port()?),
        };
        let ca = self.dir.join("certs").join("localhost.crt");
        let t = Duration::from_secs_f64(self.duration + self.warmup) * 3 + Duration::from_secs(120);
        let mut args: Vec<String>;
        let out = if mode.go {
            let plain = self
                .bins
                .derpload
                .as_ref()
                .ok_or_else(|| anyhow!("derpload not available"))?;
            let ws = plain.with_file_name("derpload-ws");
            let bin = if mode.websocket { &ws } else { plain };
            args = vec![
                "-url".into(),
                url,
                "-pairs".into(),
                pairs.to_string(),
                "-size".into(),
                size.to_string(),
                "-rate".into(),
                rate.to_string(),
                "-duration".into(),
                self.duration.to_string(),
                "-warmup".into(),
                self.warmup.to_string(),
                "-window".into(),
                window.to_string(),
                "-server-pid".into(),
                srv.pid().to_string(),
                "-label".into(),
                label.into(),
            ];
            if mode.tls {
                args.extend(["-ca".into(), ca.display().to_string()]);
            }
            if mode.websocket {
                args.push("-ws".into());
            }
            self.generator(bin, &args, t)?
        } else {
            let transport = match (which, mode.websocket) {
                (Relay::Ceiling, _) => "raw",
                (_, true) => "ws",
                (_, false) => "derp",
            };
            args = [
                "relay",
                "--url",
                &url,
                "--transport",
                transport,
                "--flush",
                mode.flush.name(),
                "--pairs",
                &pairs.to_string(),
                "--size",
                &size.to_string(),
                "--rate",
                &rate.to_string(),
                "--duration",
                &self.duration.to_string(),
                "--warmup",
                &self.warmup.to_string(),
                "--window",
                &window.to_string(),
                "--server-pid",
                &srv.pid().to_string(),
                "--label",
                label,
            ]
            .iter()
            .map(|s| s.to_string())
            .collect();
            if mode.tls {
                args.extend(["--ca".into(), ca.display().to_string()]);
            }
            self.loadgen(&args, t)?
        };
        drop(srv);
        serde_json::from_str(&out).with_context(|| format!("load generator output {out:?}"))
    }

    fn idle_run(&self, which: Relay, conns: usize, tls: bool) -> Result<IdleReport> {
        let srv = self.start_relay(which, tls, false)?;
        let url = if tls {
            let port = srv
                .tls_addr
                .as_deref()
                .and_then(|a| a.rsplit(':').next())
                .ok_or_else(|| anyhow!("{} announced no https_addr", which.name()))?;
            format!("https://localhost:{port}/derp")
        } else {
            format!("http://{}/derp", srv.addr)
        };
        let mut args: Vec<String> = [
            "idle",
            "--url",
            &url,
            "--conns",
            &conns.to_string(),
            "--server-pid",
            &srv.pid().to_string(),
            "--label",
            which.name(),
            "--settle",
            if self.quick { "0.3" } else { "2" },
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        if which == Relay::Derper {
            // Go's collector runs first (derper's debug handler, loopback only); tailnetd gets
            // the same settle time.
            let base = url.trim_end_matches("/derp");
            args.extend(["--gc-url".into(), format!("{base}/debug/gc")]);
        }
        if tls {
            args.extend([
                "--ca".into(),
                self.dir
                    .join("certs")
                    .join("localhost.crt")
                    .display()
                    .to_string(),
            ]);
        }
        let out = self.loadgen(&args, Duration::from_secs(600))?;
        drop(srv);
        serde_json::from_str(&out).with_context(|| format!("loadgen output {out:?}"))
    }
    fn coord_run(&self, go: bool, w: &CoordWorkload) -> Result<CoordReport> {
        self.coord_run_in(go, w, None)
    }

    /// [`Ctx::coord_run`] with the server started in `share` (a CPU cgroup) if given.
    fn coord_run_in(
        &self,
        go: bool,
        w: &CoordWorkload,
        share: Option<&CpuShare>,
    ) -> Result<CoordReport> {
        let held = |c: Command| match share {
            Some(s) => s.wrap(&c),
            None => c,
        };
        let auth = AuthFile::generate(w.agents);
        let auth_path = self.dir.join("auth.json");
        std::fs::write(&auth_path, serde_json::to_vec(&auth)?)?;
        let srv = if go {
            let bin = self
                .bins
                .gocoord
                .as_ref()
                .ok_or_else(|| anyhow!("gocoord not available"))?;
            let mut c = self.pin.command(0, bin);
            c.args(["-addr", "127.0.0.1:0"]);
            start_json_server("gocoord", held(c), &self.dir.join("gocoord.log"))?
        } else {
            let cfg = self.dir.join("coordinator.toml");
            std::fs::write(&cfg, auth.toml())?;
            let mut c = self.pin.command(0, &self.bins.tailnetd);
            // Every client of the workload is one user's session: lift that user's cap above
            // them (the cap is for real users, not for a load generator).
            let sessions = (w.agents * w.clients).max(1).to_string();
            c.args([
                "coordinator",
                "--http-addr",
                "127.0.0.1:0",
                "--log",
                "warn",
                "--metrics-addr",
                "",
                "--coordinator-max-sessions-per-user",
                &sessions,
                "--config",
            ])
            .arg(&cfg);
            start_json_server("tailnetd", held(c), &self.dir.join("coordinator.log"))?
        };
        let args: Vec<String> = [
            "coordinator",
            "--url",
            &format!("http://{}", srv.addr),
            "--flavor",
            if go { "gocoord" } else { "tailnetd" },
            "--auth-file",
            &auth_path.display().to_string(),
            "--agents",
            &w.agents.to_string(),
            "--clients-per-agent",
            &w.clients.to_string(),
            "--rate",
            &w.client_rate.to_string(),
            "--agent-rate",
            &w.agent_rate.to_string(),
            "--duration",
            &w.duration.to_string(),
            "--warmup",
            &self.warmup.to_string(),
            "--server-pid",
            &srv.pid().to_string(),
            "--label",
            &w.label,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let out = self.loadgen(&args, Duration::from_secs(900))?;
        drop(srv);
        serde_json::from_str(&out).with_context(|| format!("loadgen output {out:?}"))
    }
}

impl Ctx {
    /// Searches the capacity of one server on one shape (see `benches::capacity`): fresh server
    /// and load generator per probe, every peer at the probe's rate.
    fn coord_capacity(
        &self,
        go: bool,
        shape: &CoordWorkload,
        share: Option<&CpuShare>,
        plan: SearchPlan,
    ) -> Result<CapacityReport> {
        let mut probes = Vec::new();
        capacity::search(plan, |rate| {
            let Some(duration) = capacity::probe_window(shape.duration, rate) else {
                eprintln!(
                    "compare: capacity {}: {rate}/s per peer is below what one probe measures",
                    shape.label
                );
                return Ok(false);
            };
            let w = CoordWorkload {
                label: format!("{} at {rate}/s per peer", shape.label),
                client_rate: rate,
                agent_rate: rate,
                duration,
                ..shape.clone()
            };
            let report = self.coord_run_in(go, &w, share)?;
            let failed = capacity::passes(&report).err();
            eprintln!(
                "compare: capacity {} {}: {rate}/s per peer: {}",
                shape.label,
                if go { "Go coordinator" } else { "tailnetd" },
                failed.as_deref().unwrap_or("within bounds")
            );
            let pass = failed.is_none();
            probes.push(Probe {
                rate_per_peer: rate,
                report,
                failed,
            });
            Ok(pass)
        })?;
        Ok(CapacityReport {
            shape: shape.label.clone(),
            cpu_share: share.map(|s| s.cores),
            probes,
        })
    }
}

/// The capacity shapes: every peer sends at the searched rate.
fn capacity_shapes(quick: bool) -> Vec<CoordWorkload> {
    let w = |label: &str, agents, clients| CoordWorkload {
        label: label.into(),
        agents,
        clients,
        client_rate: 0.0,
        agent_rate: 0.0,
        duration: if quick { 0.5 } else { 5.0 },
    };
    if quick {
        return vec![w("2 x 5", 2, 5)];
    }
    vec![
        w("10 x 100 (1,010 peers)", 10, 100),
        w("100 x 100 (10,100 peers)", 100, 100),
        w("fan-out 1 x 1000", 1, 1000),
    ]
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct CoordWorkload {
    label: String,
    agents: usize,
    clients: usize,
    client_rate: f64,
    agent_rate: f64,
    duration: f64,
}

/// One measured run of one cell on one server, as stored in `results.json`.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Run {
    /// The part (`--only` name): a relay mode, `sweep`, `idle` or `coord`.
    part: String,
    /// The cell within the part, e.g. `P=100 S=1400`, `0.5x`, `10000 conns`, a coordinator label.
    cell: String,
    /// `tailnetd`, `derper`, `tcp-forward` or `Go coordinator`.
    server: String,
    /// Index of this run among the cell's runs on this server (interleaved with the others).
    seq: usize,
    /// When it started (UTC).
    utc: String,
    /// The 1-minute load average just before it.
    load1: f64,
    /// Full runs only: cores busy (all processes) during 0.5 s just before the run, while none
    /// of ours ran.
    #[serde(default)]
    other_cpu: Option<f64>,
    /// Full runs only: the load average or `other_cpu` said something else was running.
    busy: bool,
    /// The load generator's report (`RelayReport`, `IdleReport` or `CoordReport`).
    report: serde_json::Value,
}

/// Runs of one part: per cell (in first-run order), per server, the reports.
type Grouped<T> = Vec<(String, Vec<(String, Vec<T>)>)>;

#[derive(Default, Serialize, Deserialize)]
struct Results {
    command: String,
    started_utc: String,
    machine: Vec<(String, String)>,
    /// Identifies the tailnetd binary the runs measured (sha256 prefix); runs of another build
    /// are not merged.
    #[serde(default)]
    build: String,
    runs: Vec<Run>,
    sweep_base_pps: f64,
    coord_workloads: Vec<CoordWorkload>,
    notes: Vec<String>,
    errors: Vec<String>,
    /// The CPU share (cores) of the `-held` relay parts, when they ran.
    #[serde(default)]
    relay_cpu_share: Option<f64>,
}

/// `results.json` as written before runs were stored one by one (one run per cell), so that
/// `--render` still reads committed results of that time.
#[derive(Deserialize)]
struct LegacyResults {
    command: String,
    started_utc: String,
    machine: Vec<(String, String)>,
    relay_max: Vec<(Relay, serde_json::Value)>,
    relay_sweep: Vec<(Relay, f64, serde_json::Value)>,
    sweep_base_pps: f64,
    idle: Vec<(Relay, serde_json::Value)>,
    coord: Vec<(String, serde_json::Value)>,
    coord_workloads: Vec<CoordWorkload>,
    notes: Vec<String>,
    errors: Vec<String>,
}

impl From<LegacyResults> for Results {
    fn from(l: LegacyResults) -> Results {
        let run = |part: &str, cell: String, server: &str, report: serde_json::Value| Run {
            part: part.into(),
            cell,
            server: server.into(),
            seq: 0,
            utc: l.started_utc.clone(),
            load1: 0.0,
            other_cpu: None,
            busy: false,
            report,
        };
        let field = |v: &serde_json::Value, k: &str| v[k].as_u64().unwrap_or(0);
        let mut runs = Vec::new();
        for (r, rep) in &l.relay_max {
            let cell = format!("P={} S={}", field(rep, "pairs"), field(rep, "size"));
            runs.push(run("relay", cell, r.name(), rep.clone()));
        }
        for (r, f, rep) in &l.relay_sweep {
            runs.push(run("sweep", format!("{f}x"), r.name(), rep.clone()));
        }
        for (r, rep) in &l.idle {
            let cell = format!("{} conns", field(rep, "conns"));
            runs.push(run("idle", cell, r.name(), rep.clone()));
        }
        for (name, rep) in &l.coord {
            let cell = rep["label"].as_str().unwrap_or_default().to_string();
            runs.push(run("coord", cell, name, rep.clone()));
        }
        Results {
            command: l.command,
            started_utc: l.started_utc,
            machine: l.machine,
            build: String::new(),
            runs,
            sweep_base_pps: l.sweep_base_pps,
            coord_workloads: l.coord_workloads,
            notes: l.notes,
            errors: l.errors,
            relay_cpu_share: None,
        }
    }
}

/// Reads a `results.json` of either format.
fn read_results(bytes: &[u8]) -> Result<Results> {
    match serde_json::from_slice::<Results>(bytes) {
        Ok(r) => Ok(r),
        Err(e) => serde_json::from_slice::<LegacyResults>(bytes)
            .map(Results::from)
            .map_err(|_| anyhow!("neither the per-run nor the one-run-per-cell format: {e}")),
    }
}

impl Results {
    fn count(&self, part: &str, cell: &str, server: &str) -> usize {
        self.runs
            .iter()
            .filter(|r| r.part == part && r.cell == cell && r.server == server)
            .count()
    }

    /// Every run of a part, grouped by cell (in first-run order) and server.
    fn grouped<T: serde::de::DeserializeOwned>(&self, part: &str) -> Grouped<T> {
        let mut out: Grouped<T> = Vec::new();
        for r in self.runs.iter().filter(|r| r.part == part) {
            let Ok(rep) = serde_json::from_value::<T>(r.report.clone()) else {
                continue;
            };
            let ci = match out.iter().position(|(c, _)| *c == r.cell) {
                Some(i) => i,
                None => {
                    out.push((r.cell.clone(), Vec::new()));
                    out.len() - 1
                }
            };
            let servers = &mut out[ci].1;
            match servers.iter_mut().find(|(s, _)| *s == r.server) {
                Some((_, v)) => v.push(rep),
                None => servers.push((r.server.clone(), vec![rep])),
            }
        }
        out
    }

    fn busy_runs(&self, part: &str, cell: &str, server: &str) -> usize {
        self.runs
            .iter()
            .filter(|r| r.part == part && r.cell == cell && r.server == server && r.busy)
            .count()
    }
}

/// Runs cells and stores every finished run at once.
struct Runner {
    res: Results,
    path: PathBuf,
    quick: bool,
    busy_load: f64,
    /// Errors of this invocation.
    errors: Vec<String>,
}

impl Runner {
    fn save(&self) -> Result<()> {
        let tmp = self.path.with_extension("json.tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(&self.res)?)?;
        std::fs::rename(&tmp, &self.path)?;
        Ok(())
    }

    /// Runs `cell` of `part` until every server has `runs` runs, interleaving the servers
    /// (A B A B …). Runs stored earlier count; a server that fails is not tried again in this
    /// cell.
    fn cell<S: Copy, T: Serialize>(
        &mut self,
        part: &str,
        cell: &str,
        servers: &[(String, S)],
        runs: usize,
        mut f: impl FnMut(S) -> Result<T>,
    ) {
        let mut failed: Vec<String> = Vec::new();
        for seq in 0..runs {
            for (name, s) in servers {
                if failed.contains(name) || self.res.count(part, cell, name) > seq {
                    continue;
                }
                let load1 = load1();
                let other_cpu = if self.quick {
                    None
                } else {
                    busy_cores(Duration::from_millis(500))
                };
                let busy = !self.quick
                    && (load1 > self.busy_load || other_cpu.is_some_and(|c| c > BUSY_CORES));
                eprintln!(
                    "compare: {part} {cell} {name} run {}/{runs} (load {load1:.2}, other CPU {}{})",
                    seq + 1,
                    opt(other_cpu, 2),
                    if busy { ", busy" } else { "" }
                );
                let utc = sh("date -u +%Y-%m-%dT%H:%M:%SZ");
                match f(*s).and_then(|rep| Ok(serde_json::to_value(rep)?)) {
                    Ok(report) => {
                        self.res.runs.push(Run {
                            part: part.into(),
                            cell: cell.into(),
                            server: name.clone(),
                            seq,
                            utc,
                            load1,
                            other_cpu,
                            busy,
                            report,
                        });
                        if let Err(e) = self.save() {
                            self.errors.push(format!("saving results: {e:#}"));
                        }
                    }
                    Err(e) => {
                        failed.push(name.clone());
                        self.errors.push(format!("{part} {cell} {name}: {e:#}"));
                    }
                }
            }
        }
    }
}

/// Cores another process may keep busy between our runs before a run counts as disturbed.
const BUSY_CORES: f64 = 0.25;

/// Cores busy (user + nice + system + irq + softirq + steal, all processes) over `d`, from
/// `/proc/stat`; `None` where it cannot be read.
fn busy_cores(d: Duration) -> Option<f64> {
    fn sample() -> Option<(u64, u64)> {
        let stat = std::fs::read_to_string("/proc/stat").ok()?;
        let line = stat.lines().next()?.strip_prefix("cpu ")?;
        let v: Vec<u64> = line
            .split_whitespace()
            .filter_map(|x| x.parse().ok())
            .collect();
        // user nice system idle iowait irq softirq steal
        let busy = v.first()? + v.get(1)? + v.get(2)? + v.get(5)? + v.get(6)? + v.get(7)?;
        Some((busy, v.iter().take(8).sum()))
    }
    let (b0, t0) = sample()?;
    std::thread::sleep(d);
    let (b1, t1) = sample()?;
    let total = t1.saturating_sub(t0);
    (total > 0).then(|| b1.saturating_sub(b0) as f64 / total as f64 * cpus() as f64)
}

fn load1() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(0.0)
}

fn sh(cmd: &str) -> String {
    Command::new("sh")
        .args(["-c", cmd])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

/// A self-signed certificate for `localhost` and 127.0.0.1 in `dir/certs/localhost.{crt,key}`
/// (the names derper's manual certificate mode looks for), written once per comparison.
fn tls_files(dir: &Path) -> Result<(PathBuf, PathBuf)> {
    let certs = dir.join("certs");
    let (crt, key) = (certs.join("localhost.crt"), certs.join("localhost.key"));
    if crt.exists() && key.exists() {
        return Ok((crt, key));
    }
    std::fs::create_dir_all(&certs)?;
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()])
        .context("generating a self-signed certificate")?;
    std::fs::write(&crt, ck.cert.pem())?;
    std::fs::write(&key, ck.key_pair.serialize_pem())?;
    Ok((crt, key))
}

fn coord_workloads(quick: bool) -> Vec<CoordWorkload> {
    let cd = if quick { 0.5 } else { 5.0 };
    let w = |label: &str, agents, clients, client_rate, agent_rate| CoordWorkload {
        label: label.into(),
        agents,
        clients,
        client_rate,
        agent_rate,
        duration: cd,
    };
    if quick {
        return vec![w("2x5", 2, 5, 2.0, 2.0)];
    }
    vec![
        w(
            "fan-out 1 agent x 1000 clients, agent 10/s",
            1,
            1000,
            0.2,
            10.0,
        ),
        w("10,100 peers (100 x 100), 0.5/s each", 100, 100, 0.5, 0.5),
        w("throughput 10 x 100, 3/s each", 10, 100, 3.0, 3.0),
        w("throughput 10 x 100, 6/s each", 10, 100, 6.0, 6.0),
        w("throughput 10 x 100, 12/s each", 10, 100, 12.0, 12.0),
        w("throughput 10 x 100, 24/s each", 10, 100, 24.0, 24.0),
    ]
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    if let Some(path) = &cli.render {
        let res = read_results(&std::fs::read(path)?)?;
        let dir = cli
            .out
            .clone()
            .or_else(|| path.parent().map(Path::to_path_buf))
            .unwrap_or_default();
        let quick = res.command.contains("--quick");
        write_chart(&res, &dir.join("relay.png"))?;
        std::fs::write(dir.join("RESULTS.md"), markdown(&res, quick))?;
        return Ok(());
    }
    let quick = cli.quick;
    let started = Instant::now();
    let out_dir = cli.out.clone().unwrap_or_else(|| {
        if quick {
            target_dir().join("bench-quick")
        } else {
            root().join("benches").join("results")
        }
    });
    std::fs::create_dir_all(&out_dir)?;
    let dir = std::env::temp_dir().join(format!("tailnetd-compare-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let want = |part: &str| cli.only.is_empty() || cli.only.iter().any(|o| o == part);
    let known = ["sweep", "idle", "coord", "coord-cap"];
    for o in &cli.only {
        if !known.contains(&o.as_str()) && !MODES.iter().any(|m| m.part == o) {
            bail!("--only: unknown part {o:?}");
        }
    }

    eprintln!(
        "compare: building tailnetd, loadgen, tcpfwd ({})",
        profile()
    );
    let bin_dir = if cli.no_build {
        target_dir().join(profile())
    } else {
        build_rust()?
    };
    let mut notes = Vec::new();
    let go = have("go");
    let go_tool =
        |name: &str, skip: bool, build: fn() -> Result<PathBuf>, notes: &mut Vec<String>| {
            if quick || skip {
                None
            } else if !go {
                notes.push(format!("{name} skipped: no Go toolchain"));
                None
            } else {
                match build() {
                    Ok(b) => Some(b),
                    Err(e) => {
                        notes.push(format!("{name} skipped: {e:#}"));
                        None
                    }
                }
            }
        };
    let derper = go_tool("derper", cli.no_derper, build_derper, &mut notes);
    let gocoord = go_tool("Go coordinator", cli.no_gocoord, build_gocoord, &mut notes);
    let go_modes = MODES.iter().any(|m| m.go && want(m.part));
    let derpload = go_tool("derpload", !go_modes, build_derpload, &mut notes);
    let pin = Pin {
        enabled: cpus() >= 2
            && have("taskset")
            && Command::new("taskset")
                .args(["-c", "1", "true"])
                .status()
                .map(|s| s.success())
                .unwrap_or(false),
    };
    if !pin.enabled {
        notes.push("not pinned: needs taskset and at least 2 CPUs".to_string());
    }
    let duration = cli.duration.unwrap_or(if quick { 0.5 } else { 5.0 });
    let tcpfwd = bin_dir.join("tcpfwd");
    // The plain ceiling's engine: io_uring where the kernel allows it. Probed only when a part
    // with the plain forwarder runs (the TLS ceiling is always the tokio engine; without a plain
    // part the engine named below is never started).
    let plain_ceiling = runs_plain_ceiling(&want);
    let probe = if plain_ceiling {
        start_announced(
            "tcpfwd --engine uring",
            {
                let mut c = Command::new(&tcpfwd);
                c.args(["--listen", "127.0.0.1:0", "--engine", "uring"]);
                c
            },
            Some(&dir.join("tcpfwd-probe.log")),
        )
        .map(drop)
    } else {
        Ok(())
    };
    let ceiling_engine = match probe {
        Ok(()) => "uring",
        Err(e) => {
            notes.push(format!(
                "tcp-forward: io_uring refused here ({e:#}); the plain cells use its tokio engine"
            ));
            "tokio"
        }
    };
    let held_modes = MODES.iter().any(|m| m.held && want(m.part));
    let relay_share = if held_modes {
        match CpuShare::new(cli.relay_cpu_share) {
            Ok(s) => Some(s),
            Err(e) => {
                notes.push(format!(
                    "no CPU share for the -held relay parts: {e:#}{}",
                    if quick {
                        " (quick: run unheld)"
                    } else {
                        " (skipped)"
                    }
                ));
                None
            }
        }
    } else {
        None
    };
    let ctx = Ctx {
        bins: Bins {
            tailnetd: bin_dir.join("tailnetd"),
            loadgen: bin_dir.join("loadgen"),
            tcpfwd,
            derper,
            gocoord,
            derpload,
        },
        pin,
        dir: dir.clone(),
        quick,
        duration,
        warmup: if quick { 0.2 } else { 1.0 },
        notes,
        ceiling_engine,
        relay_share,
    };

    let load0 = sh("cat /proc/loadavg");
    let build = sh(&format!(
        "sha256sum '{}' | cut -c1-16",
        ctx.bins.tailnetd.display()
    ));
    let mut res = Results {
        command: std::env::args().collect::<Vec<_>>().join(" "),
        started_utc: sh("date -u +%Y-%m-%dT%H:%M:%SZ"),
        build: build.clone(),
        ..Default::default()
    };
    // Merge with the runs stored by earlier invocations (of the same tailnetd build, on the same
    // machine: a cell's servers run interleaved on one machine, but parts measured on different
    // CPUs are not comparable, so such runs are not merged).
    let cpu = sh(LSCPU);
    let path = out_dir.join("results.json");
    let mut merge_note = None;
    if !quick {
        if let Ok(bytes) = std::fs::read(&path) {
            match read_results(&bytes) {
                Ok(prev) if prev.build == build && stored_cpu(&prev) != Some(cpu.as_str()) => {
                    merge_note =
                        Some(format!(
                        "{} runs stored earlier were measured on another machine ({}); not merged",
                        prev.runs.len(),
                        stored_cpu(&prev).unwrap_or("not recorded").replace('\n', "; ")
                    ))
                }
                Ok(mut prev) if prev.build == build => {
                    let stored = prev.runs.len();
                    if cli.fresh {
                        prev.runs.retain(|r| !want(&r.part));
                        if want("sweep") {
                            prev.sweep_base_pps = 0.0;
                        }
                    }
                    if cli.rerun_busy {
                        prev.runs.retain(|r| !r.busy);
                    }
                    merge_note = Some(format!(
                        "added to {} runs stored by earlier invocations (first: `{}` at {}){}",
                        prev.runs.len(),
                        prev.command,
                        prev.started_utc,
                        if prev.runs.len() < stored {
                            format!(
                                "; {} stored runs dropped (--fresh/--rerun-busy)",
                                stored - prev.runs.len()
                            )
                        } else {
                            String::new()
                        }
                    ));
                    res.runs = prev.runs;
                    res.sweep_base_pps = prev.sweep_base_pps;
                    res.relay_cpu_share = prev.relay_cpu_share;
                    res.notes = prev.notes;
                    res.errors = prev.errors;
                }
                Ok(prev) => {
                    merge_note = Some(format!(
                        "{} runs stored earlier measured another tailnetd build ({}); not merged",
                        prev.runs.len(),
                        prev.build
                    ))
                }
                Err(e) => {
                    merge_note = Some(format!(
                        "the earlier results.json is unreadable ({e:#}); not merged"
                    ))
                }
            }
        }
    }
    // A Go counterpart's version, or that it did not run.
    let ran = |built: bool, version: String| if built { version } else { "not run".into() };
    res.machine = vec![
        ("uname -a".into(), sh("uname -a")),
        ("lscpu".into(), cpu.clone()),
        ("memory".into(), sh("grep MemTotal /proc/meminfo")),
        ("rustc".into(), sh("rustc -V")),
        (
            "go".into(),
            if go {
                sh("go version")
            } else {
                "not installed".into()
            },
        ),
        (
            "tailnetd".into(),
            format!(
                "{} ({} build)",
                sh(&format!(
                    "git -C {} describe --always --dirty",
                    root().display()
                )),
                profile()
            ),
        ),
        ("derper".into(), ran(ctx.bins.derper.is_some(), format!("tailscale.com/cmd/derper@{DERPER_VERSION}"))),
        ("Go coordinator".into(), ran(ctx.bins.gocoord.is_some(), format!("github.com/coder/coder/v2@{CODER_VERSION} tailnet.NewCoordinator via interop/gocoord"))),
        ("Go load generator".into(), ran(ctx.bins.derpload.is_some(), format!("interop/derpload on tailscale.com@{DERPER_VERSION} derp/derphttp"))),
        (
            "pinning".into(),
            if pin.enabled {
                "server: taskset -c 0, load generator: taskset -c 1".into()
            } else {
                "none".into()
            },
        ),
    ];
    // Provenance: what exactly ran (hashes of every binary, Go build information).
    let derpload_ws = ctx
        .bins
        .derpload
        .as_ref()
        .map(|p| p.with_file_name("derpload-ws"));
    let binaries = [
        ("tailnetd", Some(&ctx.bins.tailnetd)),
        ("loadgen", Some(&ctx.bins.loadgen)),
        ("tcpfwd", Some(&ctx.bins.tcpfwd)),
        ("derper", ctx.bins.derper.as_ref()),
        ("Go coordinator", ctx.bins.gocoord.as_ref()),
        ("derpload", ctx.bins.derpload.as_ref()),
        ("derpload-ws", derpload_ws.as_ref()),
    ];
    for (name, path) in binaries {
        let Some(path) = path else { continue };
        res.machine.push((
            format!("sha256 {name}"),
            sh(&format!("sha256sum '{}' | cut -d' ' -f1", path.display())),
        ));
        if go
            && matches!(
                name,
                "derper" | "Go coordinator" | "derpload" | "derpload-ws"
            )
        {
            res.machine.push((
                format!("go version -m {name}"),
                sh(&format!(
                    "go version -m '{}' | grep -E '^\\s*(path|mod|build\\s+(-compiler|-tags|CGO_ENABLED|GOARCH|GOAMD64|GOOS|-trimpath))|: go' | tr -s '\\t' ' '",
                    path.display()
                )),
            ));
        }
    }
    let busy_load = cli.busy_load.unwrap_or(cpus() as f64 + 0.5);
    let mut run = Runner {
        res,
        path: path.clone(),
        quick,
        busy_load,
        errors: Vec::new(),
    };
    let runs_for = |headline: bool| {
        cli.runs.unwrap_or(if quick {
            1
        } else if headline {
            cli.headline_runs
        } else {
            cli.other_runs
        })
    };

    // 1. Relay, closed loop (at most WINDOW packets in flight per pair), in every mode.
    let grid_p = if cli.pairs.is_empty() {
        if quick {
            vec![1, 10]
        } else {
            vec![1, 10, 100]
        }
    } else {
        cli.pairs.clone()
    };
    let grid_s = if cli.sizes.is_empty() {
        if quick {
            vec![1400]
        } else {
            vec![100, 1400, 8000]
        }
    } else {
        cli.sizes.clone()
    };
    let mut planned: Vec<(String, String, String)> = Vec::new();
    for mode in MODES.iter().filter(|m| want(m.part)) {
        if mode.go && ctx.bins.derpload.is_none() {
            continue;
        }
        let mut servers = vec![("tailnetd".to_string(), Relay::Tailnetd)];
        if ctx.bins.derper.is_some() {
            servers.push(("derper".into(), Relay::Derper));
        }
        if mode.has_ceiling() {
            servers.push(("tcp-forward".into(), Relay::Ceiling));
        }
        // The Go client is for the cells a Tailscale node meets: 1400-byte packets; the other
        // modes of our generator cover the whole grid (quick: the plain modes at P = 1 and 10,
        // the rest at P = 10).
        let cells: Vec<(usize, usize)> = grid_p
            .iter()
            .flat_map(|&p| grid_s.iter().map(move |&s| (p, s)))
            .filter(|&(p, s)| !mode.go || (s == 1400 && p >= 10))
            .filter(|&(p, _)| !mode.held || quick || p == 100)
            .filter(|&(p, _)| !quick || mode.part == "relay" || p == 10)
            .collect();
        if mode.held {
            match &ctx.relay_share {
                Some(share) => run.res.relay_cpu_share = Some(share.cores),
                None if quick => {}
                None => {
                    run.errors
                        .push(format!("{} skipped: no CPU share", mode.part));
                    continue;
                }
            }
        }
        for (p, s) in cells {
            let cell = format!("P={p} S={s}");
            for (name, _) in &servers {
                planned.push((mode.part.into(), cell.clone(), name.clone()));
            }
            let runs = runs_for((p, s) == HEADLINE);
            run.cell(mode.part, &cell, &servers, runs, |r| {
                let label = format!("{} {} closed-loop P={p} S={s}", r.name(), mode.part);
                ctx.relay_run(r, mode, p, s, 0.0, WINDOW, &label)
            });
        }
    }

    // 2. Offered-load sweep at P=100 (quick: 10), S=1400, plain, in fractions of derper's
    //    saturation (tailnetd's when derper is absent): the median of the batched plain cell.
    let sweep_p = if quick { 10 } else { 100 };
    if want("sweep") {
        let base_server = if ctx.bins.derper.is_some() {
            "derper"
        } else {
            "tailnetd"
        };
        let has_sweep = run.res.runs.iter().any(|r| r.part == "sweep");
        if !(has_sweep && run.res.sweep_base_pps > 0.0) {
            let mut v: Vec<f64> = run
                .res
                .grouped::<RelayReport>("relay")
                .into_iter()
                .filter(|(c, _)| *c == format!("P={sweep_p} S=1400"))
                .flat_map(|(_, s)| s)
                .filter(|(s, _)| s == base_server)
                .flat_map(|(_, reps)| reps)
                .map(|r| r.delivered_pps)
                .collect();
            run.res.sweep_base_pps = median(&mut v).unwrap_or(0.0);
        }
        let base = run.res.sweep_base_pps;
        let fractions: Vec<f64> = if quick {
            vec![0.5]
        } else {
            vec![0.25, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0]
        };
        let mut servers = vec![("tailnetd".to_string(), Relay::Tailnetd)];
        if ctx.bins.derper.is_some() {
            servers.push(("derper".into(), Relay::Derper));
        }
        servers.push(("tcp-forward".into(), Relay::Ceiling));
        if base > 0.0 {
            for &f in &fractions {
                let cell = format!("{f}x");
                for (name, _) in &servers {
                    planned.push(("sweep".into(), cell.clone(), name.clone()));
                }
                let rate = (base * f).round();
                run.cell("sweep", &cell, &servers, runs_for(false), |r| {
                    let label = format!("{} sweep {f}x P={sweep_p} S=1400", r.name());
                    ctx.relay_run(r, &MODES[0], sweep_p, 1400, rate, 0, &label)
                });
            }
        } else {
            run.errors.push(format!(
                "sweep skipped: no saturation figure of {base_server} at P={sweep_p} S=1400 (run part relay first)"
            ));
        }
    }

    // 3. Idle memory per connection, at two connection counts (the slope between them is the
    //    cost of one more connection, free of fixed start-up memory).
    if want("idle") {
        let top = cli.idle_conns.unwrap_or(if quick { 100 } else { 10_000 });
        let counts = if quick {
            vec![top]
        } else {
            vec![top / 10, top]
        };
        let mut servers = vec![("tailnetd".to_string(), Relay::Tailnetd)];
        if ctx.bins.derper.is_some() {
            servers.push(("derper".into(), Relay::Derper));
        }
        for tls in [false, true] {
            for &conns in &counts {
                let cell = format!("{conns} conns{}", if tls { " TLS" } else { "" });
                for (name, _) in &servers {
                    planned.push(("idle".into(), cell.clone(), name.clone()));
                }
                run.cell("idle", &cell, &servers, runs_for(conns == top), |r| {
                    ctx.idle_run(r, conns, tls)
                });
            }
        }
    }

    // 4. Coordinator.
    let workloads = coord_workloads(quick);
    if want("coord") {
        let mut servers = vec![("tailnetd".to_string(), false)];
        if ctx.bins.gocoord.is_some() {
            servers.push(("Go coordinator".into(), true));
        }
        for w in &workloads {
            for (name, _) in &servers {
                planned.push(("coord".into(), w.label.clone(), name.clone()));
            }
            let headline = w.agents * (w.clients + 1) >= 10_000;
            run.cell("coord", &w.label, &servers, runs_for(headline), |g| {
                ctx.coord_run(g, w)
            });
        }
    }
    // 5. Coordinator capacity: each server held to the same CPU share, searched per shape.
    let mut cap_notes = Vec::new();
    if want("coord-cap") {
        let share = match CpuShare::new(cli.coord_cpu_share) {
            Ok(s) => Some(s),
            Err(e) if quick => {
                // The smoke test runs the search anyway: it checks the code, not a figure.
                cap_notes.push(format!("coord-cap without a CPU share: {e:#}"));
                None
            }
            Err(e) => {
                run.errors.push(format!("coord-cap skipped: {e:#}"));
                None
            }
        };
        if share.is_some() || quick {
            let plan = if quick {
                SearchPlan {
                    start: 2.0,
                    steps: 1,
                    bisections: 0,
                }
            } else {
                SearchPlan {
                    start: 1.0,
                    steps: 8,
                    bisections: 3,
                }
            };
            let mut servers = vec![("tailnetd".to_string(), false)];
            if ctx.bins.gocoord.is_some() {
                servers.push(("Go coordinator".into(), true));
            }
            for shape in capacity_shapes(quick) {
                for (name, _) in &servers {
                    planned.push(("coord-cap".into(), shape.label.clone(), name.clone()));
                }
                let headline = shape.agents * (shape.clients + 1) >= 10_000;
                run.cell(
                    "coord-cap",
                    &shape.label,
                    &servers,
                    runs_for(headline),
                    |g| ctx.coord_capacity(g, &shape, share.as_ref(), plan),
                );
            }
        }
    }
    let mut res = run.res;
    let errors = run.errors;
    let commands = COMMANDS.lock().unwrap_or_else(|e| e.into_inner()).clone();
    if !commands.is_empty() {
        res.machine.push((
            "server command lines".into(),
            commands.into_iter().collect::<Vec<_>>().join("\n"),
        ));
    }
    res.coord_workloads = workloads;
    let mut notes = ctx.notes.clone();
    notes.extend(cap_notes);
    notes.extend(merge_note);
    notes.push(format!(
        "load average at start: {load0}; at end: {}; total wall time {:.0} s",
        sh("cat /proc/loadavg"),
        started.elapsed().as_secs_f64()
    ));
    res.notes.push(format!(
        "`{}` at {} UTC: {}",
        res.command,
        res.started_utc,
        notes.join("; ")
    ));
    res.errors
        .extend(errors.iter().map(|e| format!("{}: {e}", res.started_utc)));
    std::fs::write(&path, serde_json::to_vec_pretty(&res)?)?;
    let png = out_dir.join("relay.png");
    if let Err(e) = write_chart(&res, &png) {
        res.errors.push(format!("chart: {e:#}"));
    }
    std::fs::write(out_dir.join("RESULTS.md"), markdown(&res, quick))?;
    let _ = std::fs::remove_dir_all(&dir);
    eprintln!("compare: wrote {}", out_dir.join("RESULTS.md").display());
    for e in &errors {
        eprintln!("compare: error: {e}");
    }
    if quick {
        // The smoke test's contract: every planned cell ran and reported, and its figures are
        // sane.
        let missing: Vec<String> = planned
            .iter()
            .filter(|(p, c, s)| res.count(p, c, s) == 0)
            .map(|(p, c, s)| format!("{p} {c} {s}"))
            .collect();
        if !missing.is_empty() || !errors.is_empty() || planned.is_empty() {
            bail!("quick comparison incomplete: missing {missing:?}, errors {errors:?}");
        }
        let insane = quick_sanity(&res);
        if !insane.is_empty() {
            bail!(
                "quick comparison ran but its figures are not sane:\n  {}",
                insane.join("\n  ")
            );
        }
    }
    Ok(())
}

/// What a quick run must show besides having run: every workload connected every client and
/// delivered something, and closed-loop relay runs (which never offer more than the queues hold)
/// lost nothing. Write-offs (a sender that waited 100 ms) are not judged here: on a busy machine
/// they mean slowness, and speed is not what the smoke test is for. A run with write-offs may
/// also lose packets without a fault: the sender that wrote its in-flight packets off sends a
/// new window while the old one may still be queued, so the relay's 32-packet queue can
/// overflow and head-drop, as designed. So closed-loop loss fails only a run without
/// write-offs. Returns one line per failure.
fn quick_sanity(res: &Results) -> Vec<String> {
    let mut bad = Vec::new();
    for r in &res.runs {
        let what = format!("{} {} {}", r.part, r.cell, r.server);
        match r.part.as_str() {
            "idle" => match serde_json::from_value::<IdleReport>(r.report.clone()) {
                Ok(rep) if rep.connected != rep.conns => bad.push(format!(
                    "{what}: {} of {} connections",
                    rep.connected, rep.conns
                )),
                Ok(_) => {}
                Err(e) => bad.push(format!("{what}: unreadable report: {e}")),
            },
            "coord" => match serde_json::from_value::<CoordReport>(r.report.clone()) {
                Ok(rep) => {
                    if rep.failed_streams > 0 {
                        bad.push(format!("{what}: {} failed streams", rep.failed_streams));
                    }
                    if rep.delivered_updates_per_s <= 0.0 {
                        bad.push(format!("{what}: delivered no updates"));
                    }
                }
                Err(e) => bad.push(format!("{what}: unreadable report: {e}")),
            },
            "coord-cap" => match serde_json::from_value::<CapacityReport>(r.report.clone()) {
                Ok(rep) => {
                    if !rep
                        .probes
                        .iter()
                        .any(|p| p.report.delivered_updates_per_s > 0.0)
                    {
                        bad.push(format!("{what}: no probe delivered anything"));
                    }
                }
                Err(e) => bad.push(format!("{what}: unreadable report: {e}")),
            },
            _ => match serde_json::from_value::<RelayReport>(r.report.clone()) {
                Ok(rep) => {
                    if rep.received_window == 0 || rep.delivered_pps <= 0.0 {
                        bad.push(format!("{what}: delivered nothing in the window"));
                    }
                    if rep.window > 0 && rep.drops > 0 && rep.window_stalls == 0 {
                        bad.push(format!(
                            "{what}: closed loop lost {} packets ({} write-offs)",
                            rep.drops, rep.window_stalls
                        ));
                    }
                }
                Err(e) => bad.push(format!("{what}: unreadable report: {e}")),
            },
        }
    }
    bad
}

/// The median of `v` (sorted in place); `None` if empty.
fn median(v: &mut [f64]) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

/// Median, min and max of one figure over runs.
#[derive(Clone, Copy, Debug)]
struct Spread {
    med: f64,
    min: f64,
    max: f64,
    n: usize,
}

fn spread<T>(runs: &[T], f: impl Fn(&T) -> Option<f64>) -> Option<Spread> {
    let mut v: Vec<f64> = runs.iter().filter_map(f).collect();
    let med = median(&mut v)?;
    Some(Spread {
        med,
        min: v[0],
        max: v[v.len() - 1],
        n: v.len(),
    })
}

/// `median (min–max)`, or just the value for a single run.
fn fmt_spread(s: Option<Spread>, digits: usize) -> String {
    match s {
        None => "–".into(),
        Some(s) if s.n == 1 || (s.max - s.min).abs() < f64::EPSILON => {
            format!("{:.digits$}", s.med)
        }
        Some(s) => format!("{:.digits$} ({:.digits$}–{:.digits$})", s.med, s.min, s.max),
    }
}

fn med<T>(runs: &[T], f: impl Fn(&T) -> Option<f64>) -> Option<f64> {
    spread(runs, f).map(|s| s.med)
}

/// The coordinator capacity table: per shape and server, the capacity (median and min–max over
/// the searches), what the capacity probe cost, and the ratio tailnetd / Go on each shape.
fn capacity_section(m: &mut String, res: &Results) {
    let w = |m: &mut String, s: &str| {
        m.push_str(s);
        m.push('\n');
    };
    let cap = res.grouped::<CapacityReport>("coord-cap");
    if cap.is_empty() {
        return;
    }
    let share = cap
        .iter()
        .flat_map(|(_, s)| s)
        .flat_map(|(_, runs)| runs)
        .find_map(|r| r.cpu_share);
    w(
        m,
        &format!(
            "## Coordinator capacity (server held to {} by a CPU cgroup)",
            share.map_or(
                "no CPU share (cgroup unavailable)".to_string(),
                |c| format!("{c} of a core")
            )
        ),
    );
    w(m, "");
    w(m, &format!(
        "Capacity: the highest offered update rate (every peer at the same rate) at which the server delivered ≥ {:.0} % of the offered updates with fan-out and to-agent p99 ≤ {:.0} ms and no failed stream, searched by doubling and bisection (`benches/src/capacity.rs`); a fresh server per probe. ≥ marks a capacity that was the highest rate tried (a lower bound).",
        capacity::MIN_DELIVERED * 100.0,
        capacity::MAX_P99_MS
    ));
    w(m, "");
    w(m, "| shape | server | searches | capacity updates/s | per-peer rate at capacity | fan-out p99 ms at capacity | server CPU µs/update at capacity | CPU at capacity (server / load gen) | probes |");
    w(m, "|---|---|---|---|---|---|---|---|---|");
    let mut ratios = Vec::new();
    for (cell, servers) in &cap {
        let mut medians = Vec::new();
        for (server, runs) in servers {
            let best = |f: &dyn Fn(&Probe) -> Option<f64>| spread(runs, |r| r.best().and_then(f));
            let busy = res.busy_runs("coord-cap", cell, server);
            let c = spread(runs, |r| Some(r.capacity()));
            medians.push((
                server.clone(),
                c.map(|s| s.med),
                med(runs, |r| {
                    r.best()
                        .and_then(|p| capacity::cpu_us_per_update(&p.report))
                }),
            ));
            w(
                m,
                &format!(
                    "| {cell} | {server} | {}{} | {}{} | {} | {} | {} | {} / {} | {} |",
                    runs.len(),
                    if busy > 0 {
                        format!(" ({busy}†)")
                    } else {
                        String::new()
                    },
                    if runs.iter().any(CapacityReport::open_ended) {
                        "≥ "
                    } else {
                        ""
                    },
                    fmt_spread(c, 0),
                    fmt_spread(best(&|p| Some(p.rate_per_peer)), 2),
                    fmt_spread(best(&|p| Some(p.report.fanout_p99_ms)), 1),
                    fmt_spread(best(&|p| capacity::cpu_us_per_update(&p.report)), 1),
                    opt(
                        med(runs, |r| r.best().and_then(|p| p.report.server_cpu_util)),
                        2
                    ),
                    opt(
                        med(runs, |r| r.best().and_then(|p| p.report.loadgen_cpu_util)),
                        2
                    ),
                    runs.iter().map(|r| r.probes.len()).sum::<usize>(),
                ),
            );
        }
        let get = |name: &str| medians.iter().find(|(s, _, _)| s == name);
        if let (Some(t), Some(g)) = (get("tailnetd"), get("Go coordinator")) {
            if let (Some(tc), Some(gc)) = (t.1, g.1) {
                if gc > 0.0 {
                    let cpu = match (t.2, g.2) {
                        (Some(a), Some(b)) if b > 0.0 => {
                            format!("; server CPU per update at capacity {:.2}× Go's", a / b)
                        }
                        _ => String::new(),
                    };
                    ratios.push(format!(
                        "- {cell}: capacity tailnetd / Go = {:.2}×{cpu}",
                        tc / gc
                    ));
                }
            }
        }
    }
    w(m, "");
    for r in ratios {
        w(m, &r);
    }
    w(m, "");
}

/// The coordinator's capacity targets, one pair of rows per `coord-cap` shape: capacity ≥ 5× the
/// Go coordinator's and server CPU per update at capacity ≤ 0.2× Go's (medians of the searches).
/// Where the Go coordinator met the bounds at no rate probed in any search, its capacity is
/// below the lowest rate that failed, so the ratio is a lower bound (written `>`).
fn capacity_targets(m: &mut String, res: &Results) {
    let share = |runs: &[CapacityReport]| {
        runs.iter()
            .find_map(|r| r.cpu_share)
            .map_or("no CPU share".to_string(), |c| format!("{c} core"))
    };
    for (cell, servers) in &res.grouped::<CapacityReport>("coord-cap") {
        let runs = |name: &str| servers.iter().find(|(s, _)| s == name).map(|(_, r)| r);
        let (Some(t), Some(g)) = (runs("tailnetd"), runs("Go coordinator")) else {
            continue;
        };
        let (tc, gc) = (
            spread(t, |r| Some(r.capacity())),
            spread(g, |r| Some(r.capacity())),
        );
        let Some(tc) = tc else { continue };
        let go_upper = g
            .iter()
            .all(|r| r.best().is_none())
            .then(|| {
                g.iter()
                    .filter_map(CapacityReport::failed_below)
                    .fold(f64::INFINITY, f64::min)
            })
            .filter(|u| u.is_finite());
        let (measured, ok) = match (gc, go_upper) {
            (_, Some(upper)) => (
                format!(
                    "{} vs none (Go met the bounds at no rate probed; its lowest, {upper:.0} updates/s, failed) /s = > {:.1}×",
                    fmt_spread(Some(tc), 0),
                    tc.med / upper
                ),
                Some(tc.med / upper >= 5.0),
            ),
            (Some(gc), None) if gc.med > 0.0 => (
                format!(
                    "{} vs {} /s = {:.2}×",
                    fmt_spread(Some(tc), 0),
                    fmt_spread(Some(gc), 0),
                    tc.med / gc.med
                ),
                Some(tc.med / gc.med >= 5.0),
            ),
            _ => ("–".to_string(), None),
        };
        w_line(
            m,
            &format!(
                "| coordinator capacity ≥ 5× the Go coordinator's ({cell}, {}) | {measured} | {} |",
                share(t),
                verdict(ok)
            ),
        );
        let cpu = |runs: &[CapacityReport]| {
            spread(runs, |r| {
                r.best()
                    .and_then(|p| capacity::cpu_us_per_update(&p.report))
            })
        };
        let (tu, gu) = (cpu(t), cpu(g));
        let r = match (tu, gu) {
            (Some(a), Some(b)) if b.med > 0.0 => Some(a.med / b.med),
            _ => None,
        };
        w_line(
            m,
            &format!(
                "| server CPU per update at capacity ≤ 0.2× Go's ({cell}) | {} vs {} µs = {}× | {} |",
                fmt_spread(tu, 1),
                fmt_spread(gu, 1),
                opt(r, 2),
                verdict(r.map(|r| r <= 0.2))
            ),
        );
    }
}

/// What `compare` records of the machine's CPU (and compares before merging stored runs).
const LSCPU: &str = "lscpu | grep -E '^(Architecture|CPU\\(s\\)|Model name|Thread|Core|Socket|CPU max MHz|L2|L3|Hypervisor)'";

/// The CPU description stored with earlier runs.
fn stored_cpu(prev: &Results) -> Option<&str> {
    prev.machine
        .iter()
        .find(|(k, _)| k == "lscpu")
        .map(|(_, v)| v.as_str())
}

fn w_line(m: &mut String, s: &str) {
    m.push_str(s);
    m.push('\n');
}

/// Whether any run of a closed-loop cell wrote packets off or lost them: such a row is not a
/// "without loss" figure.
fn stalled(runs: &[RelayReport]) -> bool {
    runs.iter()
        .any(|r| r.window_stalls > 0 || (r.window > 0 && r.drops > 0))
}

/// Which side was at ≥ 90% of the CPU it had: `server_cores` is 1 (a pinned core) or the
/// share of a held part.
fn limit(runs: &[RelayReport], server_cores: f64) -> &'static str {
    let s = med(runs, |r| r.server_cpu_util).unwrap_or(0.0);
    let c = med(runs, |r| r.loadgen_cpu_util).unwrap_or(0.0);
    match (s >= 0.9 * server_cores, c >= 0.9) {
        (true, true) => "both",
        (true, false) => "server",
        (false, true) => "client",
        (false, false) => "neither",
    }
}

fn write_chart(res: &Results, path: &Path) -> Result<()> {
    let mut thr = Vec::new();
    let mut lat = Vec::new();
    let sweep = res.grouped::<RelayReport>("sweep");
    for r in [Relay::Tailnetd, Relay::Derper, Relay::Ceiling] {
        let pts: Vec<(f64, f64, f64)> = sweep
            .iter()
            .filter_map(|(_, servers)| {
                let (_, runs) = servers.iter().find(|(s, _)| s == r.name())?;
                Some((
                    med(runs, |x| Some(x.offered_gbps))?,
                    med(runs, |x| Some(x.delivered_gbps))?,
                    med(runs, |x| Some(x.latency_p99_us))?,
                ))
            })
            .collect();
        if pts.is_empty() {
            continue;
        }
        thr.push(Series {
            name: r.name().into(),
            points: pts.iter().map(|p| (p.0, p.1)).collect(),
        });
        lat.push(Series {
            name: r.name().into(),
            points: pts.iter().map(|p| (p.0, p.2)).collect(),
        });
    }
    let p = sweep
        .first()
        .and_then(|(_, s)| s.first())
        .and_then(|(_, r)| r.first())
        .map_or(0, |r| r.pairs);
    chart::write_png(
        path,
        &[
            Panel {
                title: format!("Delivered vs offered (P={p}, 1400 B, medians)"),
                x_label: "offered Gbit/s".into(),
                y_label: "delivered Gbit/s".into(),
                log_y: false,
                series: thr,
            },
            Panel {
                title: "p99 one-way latency (medians)".into(),
                x_label: "offered Gbit/s".into(),
                y_label: "p99 latency, us (log)".into(),
                log_y: true,
                series: lat,
            },
        ],
    )
}

/// The targets row "the forwarder is not beaten" of one relay part: tailnetd against
/// `tcp-forward` in every cell, raw (Gbit/s) and per core of server CPU; "beyond the spread" =
/// tailnetd's slowest run ahead of the forwarder's fastest. Cells with write-offs are left out.
fn ceiling_row(res: &Results, mode: &Mode) -> Option<String> {
    let cells = res.grouped::<RelayReport>(mode.part);
    let (mut n, mut ahead, mut beyond) = (0, 0, 0);
    let (mut ahead_core, mut beyond_core) = (0, 0);
    // Where tailnetd is ahead: the cell and both servers' limiting sides.
    let mut limits: Vec<String> = Vec::new();
    // Cells where tailnetd is ahead beyond the spread while the forwarder was at its own limit:
    // only there is a ceiling measured and beaten. Where the load generator's core (or latency,
    // at one pair) bounded the forwarder, the cell did not measure the ceiling. Where both cores
    // were at their limit, the raw figure is the load generator's as much as the server's (a
    // server that sleeps more makes its client's sends dearer: findings.md), so there the
    // forwarder is beaten only if tailnetd also moved more per core of server CPU.
    let mut beaten_at_limit: Vec<String> = Vec::new();
    let server_cores = if mode.held {
        res.relay_cpu_share.unwrap_or(1.0)
    } else {
        1.0
    };
    for (cell, servers) in &cells {
        let get = |name: &str| servers.iter().find(|(s, _)| s == name).map(|(_, r)| r);
        let (Some(t), Some(c)) = (get("tailnetd"), get("tcp-forward")) else {
            continue;
        };
        if stalled(t) || stalled(c) {
            continue;
        }
        n += 1;
        // (tailnetd's median ahead, tailnetd's slowest run ahead of the forwarder's fastest)
        let compare = |f: fn(&RelayReport) -> Option<f64>| match (spread(t, f), spread(c, f)) {
            (Some(ts), Some(cs)) => (ts.med > cs.med, ts.min > cs.max),
            _ => (false, false),
        };
        let (raw_ahead, raw_beyond) = compare(|r| Some(r.delivered_gbps));
        let (core_ahead, core_beyond) = compare(|r| r.gbps_per_core);
        ahead += usize::from(raw_ahead);
        beyond += usize::from(raw_beyond);
        ahead_core += usize::from(core_ahead);
        beyond_core += usize::from(core_beyond);
        if raw_ahead || core_ahead {
            let forwarder = limit(c, server_cores);
            limits.push(format!("{cell}: {} / {forwarder}", limit(t, server_cores)));
            let beaten = match forwarder {
                "server" => raw_beyond || core_beyond,
                "both" => core_beyond,
                _ => false,
            };
            if beaten {
                beaten_at_limit.push(cell.clone());
            }
        }
    }
    if n == 0 {
        return None;
    }
    let verdict = if beyond + beyond_core == 0 {
        "not beaten beyond the spread".to_string()
    } else if beaten_at_limit.is_empty() {
        "not beaten where the forwarder was the limit (ahead beyond the spread only where the \
         forwarder was below its core's limit, the load generator or latency bounding it, or \
         raw only with both cores at their limit, not per core of server CPU)"
            .to_string()
    } else {
        format!(
            "**beaten** with the forwarder at its limit: {}",
            beaten_at_limit.join(", ")
        )
    };
    Some(format!(
        "| the TCP-forward ceiling is not beaten ({}, {n} cells) | tailnetd's median ahead in {ahead} raw, {ahead_core} per core; beyond the spread in {beyond} raw, {beyond_core} per core{} | {verdict} |",
        mode.part,
        if limits.is_empty() {
            String::new()
        } else {
            format!(
                " (limit where ahead, tailnetd / forwarder, from the CPU columns: {})",
                limits.join("; ")
            )
        }
    ))
}

fn verdict(ok: Option<bool>) -> &'static str {
    match ok {
        Some(true) => "met",
        Some(false) => "**not met**",
        None => "not measured",
    }
}

fn ratio(a: f64, b: f64) -> String {
    if b > 0.0 && a.is_finite() {
        format!("{:.2}×", a / b)
    } else {
        "–".into()
    }
}

fn opt(v: Option<f64>, digits: usize) -> String {
    v.map_or("–".into(), |x| format!("{x:.digits$}"))
}

/// The runs of one relay cell on one server.
fn relay_runs(res: &Results, part: &str, cell: &str, server: &str) -> Vec<RelayReport> {
    res.grouped::<RelayReport>(part)
        .into_iter()
        .filter(|(c, _)| c == cell)
        .flat_map(|(_, s)| s)
        .filter(|(s, _)| s == server)
        .flat_map(|(_, r)| r)
        .collect()
}

/// The issue's targets, restated from medians (never asserted).
fn targets(m: &mut String, res: &Results) {
    let w = |m: &mut String, s: &str| {
        m.push_str(s);
        m.push('\n');
    };
    w(
        m,
        "## Targets (reported, not asserted; medians, min–max in brackets)",
    );
    w(m, "");
    w(m, "| target | measured | verdict |");
    w(m, "|---|---|---|");
    let cell = format!("P={} S={}", HEADLINE.0, HEADLINE.1);
    let both = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => Some(a / b),
        _ => None,
    };
    for part in ["relay", "relay-tls", "relay-pp", "relay-go", "relay-go-tls"] {
        let t = relay_runs(res, part, &cell, "tailnetd");
        let d = relay_runs(res, part, &cell, "derper");
        if t.is_empty() || d.is_empty() {
            continue;
        }
        let (ts, ds) = (
            spread(&t, |r| Some(r.delivered_gbps)),
            spread(&d, |r| Some(r.delivered_gbps)),
        );
        let r = both(ts.map(|s| s.med), ds.map(|s| s.med));
        let lossy = stalled(&t) || stalled(&d);
        w(m, &format!(
            "| relay throughput ≥ 2× derper ({part}, {cell}, one core) | {} vs {} Gbit/s = {}{} | {} |",
            fmt_spread(ts, 3), fmt_spread(ds, 3), opt(r, 2) + "×",
            if lossy { " (write-offs or loss: not a without-loss figure)" } else { "" },
            if lossy { "not measured" } else { verdict(r.map(|r| r >= 2.0)) }
        ));
        let (tp, dp) = (med(&t, |r| r.gbps_per_core), med(&d, |r| r.gbps_per_core));
        let rc = both(tp, dp);
        w(m, &format!(
            "| same, per server core (Gbit/s ÷ server CPU) | {} vs {} Gbit/s per core = {}× | {} |",
            opt(tp, 2), opt(dp, 2), opt(rc, 2), if lossy { "not measured" } else { verdict(rc.map(|r| r >= 2.0)) }
        ));
        let c = relay_runs(res, part, &cell, "tcp-forward");
        if !c.is_empty() {
            let cm = med(&c, |r| Some(r.delivered_gbps));
            let r = both(ts.map(|s| s.med), cm);
            w(m, &format!(
                "| relay throughput ≥ 80% of the TCP-forward ceiling ({part}, {cell}) | {} vs {} Gbit/s = {} | {} |",
                fmt_spread(ts, 3), opt(cm, 3), r.map_or("–".into(), |r| format!("{:.0}%", r * 100.0)),
                if stalled(&t) { "not measured" } else { verdict(r.map(|r| r >= 0.8)) }
            ));
            let rc = both(tp, med(&c, |r| r.gbps_per_core));
            w(
                m,
                &format!(
                    "| same, per server core | {} vs {} Gbit/s per core = {} | {} |",
                    opt(tp, 2),
                    opt(med(&c, |r| r.gbps_per_core), 2),
                    rc.map_or("–".into(), |r| format!("{:.0}%", r * 100.0)),
                    if stalled(&t) {
                        "not measured"
                    } else {
                        verdict(rc.map(|r| r >= 0.8))
                    }
                ),
            );
        }
    }
    // Issue 15: is the forwarder a ceiling? Per relay part with forwarder rows, the cells where
    // tailnetd is ahead of it, by the medians and beyond the spread.
    for mode in MODES.iter().filter(|m| m.has_ceiling()) {
        if let Some(line) = ceiling_row(res, mode) {
            w(m, &line);
        }
    }
    // Issue 16: with Tailscale-style traffic, CPU per delivered packet.
    for part in [
        "relay-go",
        "relay-go-tls",
        "relay-go-ws",
        "relay-pp",
        "relay-tls-pp",
    ] {
        for p in [10, 100] {
            let cell = format!("P={p} S=1400");
            let t = relay_runs(res, part, &cell, "tailnetd");
            let d = relay_runs(res, part, &cell, "derper");
            if t.is_empty() || d.is_empty() {
                continue;
            }
            let (ts, ds) = (
                spread(&t, |r| r.server_cpu_us_per_packet),
                spread(&d, |r| r.server_cpu_us_per_packet),
            );
            let r = both(ts.map(|s| s.med), ds.map(|s| s.med));
            w(m, &format!(
                "| server CPU per delivered packet ≤ 0.5× derper's ({part}, {cell}) | {} vs {} µs = {}× | {} |",
                fmt_spread(ts, 2), fmt_spread(ds, 2), opt(r, 2), verdict(r.map(|r| r <= 0.5))
            ));
            let (tc, dc) = (
                spread(&t, |r| r.loadgen_cpu_us_per_packet),
                spread(&d, |r| r.loadgen_cpu_us_per_packet),
            );
            let r = both(tc.map(|s| s.med), dc.map(|s| s.med));
            w(m, &format!(
                "| client CPU per delivered packet ≤ derper's ({part}, {cell}) | {} vs {} µs = {}× | {} |",
                fmt_spread(tc, 2), fmt_spread(dc, 2), opt(r, 2), verdict(r.map(|r| r <= 1.0))
            ));
        }
    }
    let half = |server: &str| {
        let runs = relay_runs(res, "sweep", "0.5x", server);
        spread(&runs, |r| Some(r.latency_p99_us))
    };
    let (ht, hd) = (half("tailnetd"), half("derper"));
    let ok = match (ht, hd) {
        (Some(a), Some(b)) => Some(a.med <= b.med),
        _ => None,
    };
    w(
        m,
        &format!(
            "| p99 at half of derper's saturation load ≤ derper's | {} vs {} µs | {} |",
            fmt_spread(ht, 0),
            fmt_spread(hd, 0),
            verdict(ok)
        ),
    );
    let idle = res.grouped::<IdleReport>("idle");
    let tops = [
        idle.iter().rfind(|(c, _)| !c.ends_with(" TLS")),
        idle.iter().rfind(|(c, _)| c.ends_with(" TLS")),
    ];
    for (cell, servers) in tops.into_iter().flatten() {
        let per = |s: &str| {
            servers
                .iter()
                .find(|(n, _)| n == s)
                .and_then(|(_, r)| spread(r, |x| Some(x.rss_per_conn_bytes)))
        };
        let (t, d) = (per("tailnetd"), per("derper"));
        let r = both(t.map(|s| s.med), d.map(|s| s.med));
        w(
            m,
            &format!(
                "| idle memory per connection ≤ ¼ of derper's ({cell}) | {} vs {} B = {}× | {} |",
                fmt_spread(t, 0),
                fmt_spread(d, 0),
                opt(r, 2),
                verdict(r.map(|r| r <= 0.25))
            ),
        );
    }
    let coord = res.grouped::<CoordReport>("coord");
    let best = |go: bool| {
        coord
            .iter()
            .flat_map(|(_, s)| s.iter())
            .filter(|(n, runs)| {
                (n != "tailnetd") == go && runs.iter().all(|r| r.failed_streams == 0)
            })
            .filter_map(|(_, runs)| med(runs, |r| Some(r.delivered_updates_per_s)))
            .fold(None, |a: Option<f64>, b| Some(a.map_or(b, |a| a.max(b))))
    };
    let r = both(best(false), best(true));
    w(m, &format!(
        "| coordinator delivered updates/s ≥ 5× the Go coordinator's (best median of a workload without failed streams in any run; fixed offered rates, so below either server's capacity) | {} vs {} /s = {}× | {} |",
        opt(best(false), 0), opt(best(true), 0), opt(r, 2), verdict(r.map(|r| r >= 5.0))
    ));
    capacity_targets(m, res);
    let big = coord
        .iter()
        .flat_map(|(_, s)| s.iter())
        .filter(|(n, runs)| n == "tailnetd" && runs.iter().any(|r| r.peers >= 10_000))
        .find_map(|(_, runs)| spread(runs, |r| Some(r.fanout_p99_ms)));
    w(
        m,
        &format!(
            "| coordinator p99 fan-out < 10 ms at 10,000 connected peers | {} ms | {} |",
            fmt_spread(big, 2),
            verdict(big.map(|v| v.med < 10.0))
        ),
    );
    w(m, "");
    w(m, "A target whose cell had write-offs or closed-loop loss in any run is \"not measured\": that is not a without-loss figure. When a ratio is bounded by the load generator rather than the server (the limit column of each table), \"not met\" may say more about this two-core machine than about the server.");
    w(m, "");
}

fn relay_table(m: &mut String, res: &Results, mode: &Mode) {
    let w = |m: &mut String, s: &str| {
        m.push_str(s);
        m.push('\n');
    };
    let mut cells = res.grouped::<RelayReport>(mode.part);
    if cells.is_empty() {
        return;
    }
    cells.sort_by_key(|(_, s)| {
        s.first()
            .and_then(|(_, r)| r.first())
            .map_or((0, 0), |r| (r.pairs, r.size))
    });
    let server_cores = match (mode.held, res.relay_cpu_share) {
        (true, Some(share)) => share,
        _ => 1.0,
    };
    if mode.held {
        w(
            m,
            &format!(
                "### `{}`: {} ({})",
                mode.part,
                mode.title,
                res.relay_cpu_share.map_or(
                    "no share: the cgroup could not be made".into(),
                    |c| format!("{c} core")
                ),
            ),
        );
    } else {
        w(m, &format!("### `{}`: {}", mode.part, mode.title));
    }
    w(m, "");
    w(m, "| P | S (B) | server | runs | Gbit/s | kpps | offered kpps (actual) | loss (worst) | write-offs | p99 µs | CPU server / client | server µs/pkt | client µs/pkt | Gbit/s per server core | limit | tailnetd ÷ this | same per core |");
    w(
        m,
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    );
    for (cell, servers) in &cells {
        let tailnetd = servers
            .iter()
            .find(|(s, _)| s == "tailnetd")
            .map(|(_, r)| r);
        for (server, runs) in servers {
            let Some(first) = runs.first() else { continue };
            let busy = res.busy_runs(mode.part, cell, server);
            let flag = if stalled(runs) { " ⚠" } else { "" };
            let (vs, vs_core) = match tailnetd {
                Some(t) if server != "tailnetd" => {
                    if stalled(t) || stalled(runs) {
                        ("– (write-offs)".to_string(), "–".to_string())
                    } else {
                        (
                            ratio(
                                med(t, |r| Some(r.delivered_gbps)).unwrap_or(0.0),
                                med(runs, |r| Some(r.delivered_gbps)).unwrap_or(0.0),
                            ),
                            ratio(
                                med(t, |r| r.gbps_per_core).unwrap_or(0.0),
                                med(runs, |r| r.gbps_per_core).unwrap_or(0.0),
                            ),
                        )
                    }
                }
                _ => (String::new(), String::new()),
            };
            w(m, &format!(
                "| {} | {} | {server} | {}{} | {}{flag} | {} | {} | {:.2}% | {} | {} | {} / {} | {} | {} | {} | {} | {vs} | {vs_core} |",
                first.pairs,
                first.size,
                runs.len(),
                if busy > 0 { format!(" ({busy}†)") } else { String::new() },
                fmt_spread(spread(runs, |r| Some(r.delivered_gbps)), 3),
                opt(med(runs, |r| Some(r.delivered_pps / 1e3)), 1),
                opt(med(runs, |r| Some(r.actual_offered_pps / 1e3)), 1),
                runs.iter().map(|r| r.loss).fold(0.0, f64::max) * 100.0,
                runs.iter().map(|r| r.window_stalls).sum::<u64>(),
                fmt_spread(spread(runs, |r| Some(r.latency_p99_us)), 0),
                opt(med(runs, |r| r.server_cpu_util), 2),
                opt(med(runs, |r| r.loadgen_cpu_util), 2),
                fmt_spread(spread(runs, |r| r.server_cpu_us_per_packet), 2),
                fmt_spread(spread(runs, |r| r.loadgen_cpu_us_per_packet), 2),
                opt(med(runs, |r| r.gbps_per_core), 2),
                limit(runs, server_cores),
            ));
        }
    }
    w(m, "");
}

fn markdown(res: &Results, quick: bool) -> String {
    let mut m = String::new();
    let w = |m: &mut String, s: &str| {
        m.push_str(s);
        m.push('\n');
    };
    w(&mut m, "# tailnetd benchmark results");
    w(&mut m, "");
    if quick {
        w(&mut m, "**Quick smoke run** (tiny durations, one run per cell): these numbers only show that every workload runs. Do not quote them.");
        w(&mut m, "");
    }
    w(&mut m, &format!("Generated by `{}` at {} (UTC), with the runs of every invocation listed under notes. Every figure is exactly as measured; raw data (every run) in `results.json`, chart in `relay.png`.", res.command, res.started_utc));
    w(&mut m, "");
    w(&mut m, "## Machine and versions");
    w(&mut m, "");
    for (k, v) in &res.machine {
        if k == "server command lines" {
            w(&mut m, &format!("- **{k}**:"));
            for line in v.lines() {
                w(&mut m, &format!("  - `{line}`"));
            }
        } else {
            w(&mut m, &format!("- **{k}**: {}", v.replace('\n', "; ")));
        }
    }
    w(&mut m, "");
    w(&mut m, "Method: each server runs alone (restarted for every run) pinned to core 0; the load generator is pinned to core 1. Every cell runs several times with the servers interleaved (A B A B …); figures are medians with min–max in brackets. Loopback, no STUN. Relay runs: 1 s warm-up, then the measurement window. The relay tables are closed loop (each pair keeps at most 32 packets in flight, the relays' per-destination queue depth, so a relay never needs to drop; the offered load is what the senders actually sent per second, the nominal rate being as fast as the window allows); a sender that waits 100 ms for room writes its in-flight packets off (counted as write-offs) and a row with any is marked ⚠ and never used as a without-loss figure. The sweep is open loop at fixed total rates and shows latency against offered load; loss = (sent − received) / sent over the whole run after a 2 s drain; latency = one-way, sender timestamp to receiver, same clock. CPU = CPU seconds per second of the window (1.00 = the whole pinned core), server then client; µs/pkt = CPU per packet delivered in the window (the client's counts one send and one receive); limit = the side whose core was ≥ 0.90 busy. † = runs that started while something else was running: the 1-minute load average above CPUs + 0.5 (or `--busy-load`), or more than 0.25 core busy during 0.5 s just before the run, when none of our processes ran. tailnetd runs with `--log warn`; derper with its defaults (TLS: `-certmode manual` with a self-signed certificate for localhost; tailnetd: `--tls-cert`/`--tls-key` with the same certificate).");
    w(&mut m, "");

    w(
        &mut m,
        "## Relay, closed loop (at most 32 packets in flight per pair)",
    );
    w(&mut m, "");
    for mode in MODES {
        relay_table(&mut m, res, mode);
    }

    // Sweep.
    let sweep = res.grouped::<RelayReport>("sweep");
    if !sweep.is_empty() {
        let p = sweep
            .first()
            .and_then(|(_, s)| s.first())
            .and_then(|(_, r)| r.first())
            .map_or(0, |r| r.pairs);
        w(&mut m, &format!("## Offered-load sweep (P={p}, 1400 B, plain, batched), in multiples of {:.0} pps (the median saturation figure of derper, or tailnetd without derper, at P={p}, S=1400)", res.sweep_base_pps));
        w(&mut m, "");
        w(&mut m, "| × | server | runs | offered kpps (nominal) | offered kpps (actual) | delivered Gbit/s | loss % | p50 µs | p99 µs | p99.9 µs | CPU (server / client) |");
        w(&mut m, "|---|---|---|---|---|---|---|---|---|---|---|");
        for (cell, servers) in &sweep {
            for (server, runs) in servers {
                let busy = res.busy_runs("sweep", cell, server);
                w(
                    &mut m,
                    &format!(
                        "| {} | {server} | {}{} | {} | {} | {} | {} | {} | {} | {} | {} / {} |",
                        cell.trim_end_matches('x'),
                        runs.len(),
                        if busy > 0 {
                            format!(" ({busy}†)")
                        } else {
                            String::new()
                        },
                        opt(med(runs, |r| Some(r.offered_pps / 1e3)), 1),
                        fmt_spread(spread(runs, |r| Some(r.actual_offered_pps / 1e3)), 1),
                        fmt_spread(spread(runs, |r| Some(r.delivered_gbps)), 3),
                        fmt_spread(spread(runs, |r| Some(r.loss * 100.0)), 2),
                        fmt_spread(spread(runs, |r| Some(r.latency_p50_us)), 0),
                        fmt_spread(spread(runs, |r| Some(r.latency_p99_us)), 0),
                        fmt_spread(spread(runs, |r| Some(r.latency_p999_us)), 0),
                        opt(med(runs, |r| r.server_cpu_util), 2),
                        opt(med(runs, |r| r.loadgen_cpu_util), 2),
                    ),
                );
            }
        }
        w(&mut m, "");
        w(
            &mut m,
            "![throughput and p99 latency against offered load](relay.png)",
        );
        w(&mut m, "");
    }

    // Idle.
    let idle = res.grouped::<IdleReport>("idle");
    if !idle.is_empty() {
        w(&mut m, "## Idle connections");
        w(&mut m, "");
        w(&mut m, "| connections | server | runs | connected (worst) | RSS before MiB | RSS after MiB | RSS per connection B | handshakes/s |");
        w(&mut m, "|---|---|---|---|---|---|---|---|");
        for (cell, servers) in &idle {
            for (server, runs) in servers {
                let busy = res.busy_runs("idle", cell, server);
                w(
                    &mut m,
                    &format!(
                        "| {} | {server} | {}{} | {} | {} | {} | {} | {} |",
                        cell,
                        runs.len(),
                        if busy > 0 {
                            format!(" ({busy}†)")
                        } else {
                            String::new()
                        },
                        runs.iter().map(|r| r.connected).min().unwrap_or(0),
                        fmt_spread(
                            spread(runs, |r| Some(r.rss_before_bytes as f64 / 1048576.0)),
                            1
                        ),
                        fmt_spread(
                            spread(runs, |r| Some(r.rss_after_bytes as f64 / 1048576.0)),
                            1
                        ),
                        fmt_spread(spread(runs, |r| Some(r.rss_per_conn_bytes)), 0),
                        opt(med(runs, |r| Some(r.connect_rate_per_s)), 0),
                    ),
                );
            }
        }
        w(&mut m, "");
        for tls in [false, true] {
            let cells: Vec<_> = idle
                .iter()
                .filter(|(c, _)| c.ends_with(" TLS") == tls)
                .collect();
            if cells.len() < 2 {
                continue;
            }
            let (lo, hi) = (&cells[0].1, &cells[cells.len() - 1].1);
            for (server, hruns) in hi {
                let Some((_, lruns)) = lo.iter().find(|(s, _)| s == server) else {
                    continue;
                };
                let conns = |runs: &[IdleReport]| runs.first().map_or(0.0, |r| r.conns as f64);
                let after = |runs: &[IdleReport]| med(runs, |r| Some(r.rss_after_bytes as f64));
                if let (Some(a), Some(b)) = (after(lruns), after(hruns)) {
                    if conns(hruns) > conns(lruns) {
                        w(&mut m, &format!(
                            "- {server}{}: slope {:.0} B per connection between {} and {} connections (difference of the median RSS after connecting)",
                            if tls { " TLS" } else { "" },
                            (b - a) / (conns(hruns) - conns(lruns)), conns(lruns), conns(hruns)
                        ));
                    }
                }
            }
        }
        w(&mut m, "");
        w(&mut m, "derper's collector is run (`/debug/gc`) before each RSS reading; both servers then get the same settle time.");
        w(&mut m, "");
    }

    // Coordinator.
    let coord = res.grouped::<CoordReport>("coord");
    if !coord.is_empty() {
        w(
            &mut m,
            "## Coordinator (Coder v2 protocol: WebSocket → yamux → dRPC)",
        );
        w(&mut m, "");
        w(&mut m, "| workload | server | runs | peers | offered updates/s | delivered updates/s | fan-out p50 ms | fan-out p99 ms | to-agent p99 ms | setup peers/s | RSS/peer B | CPU (server / client) | failed streams (worst) |");
        w(
            &mut m,
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        );
        for (cell, servers) in &coord {
            for (server, runs) in servers {
                let busy = res.busy_runs("coord", cell, server);
                w(&mut m, &format!(
                    "| {cell} | {server} | {}{} | {} | {} | {} | {} | {} | {} | {} | {} | {} / {} | {} |",
                    runs.len(),
                    if busy > 0 { format!(" ({busy}†)") } else { String::new() },
                    runs.first().map_or(0, |r| r.peers),
                    opt(med(runs, |r| Some(r.offered_deliveries_per_s)), 0),
                    fmt_spread(spread(runs, |r| Some(r.delivered_updates_per_s)), 0),
                    fmt_spread(spread(runs, |r| Some(r.fanout_p50_ms)), 2),
                    fmt_spread(spread(runs, |r| Some(r.fanout_p99_ms)), 2),
                    fmt_spread(spread(runs, |r| Some(r.to_agent_p99_ms)), 2),
                    opt(med(runs, |r| Some(r.setup_peers_per_s)), 0),
                    fmt_spread(spread(runs, |r| r.rss_per_peer_bytes), 0),
                    opt(med(runs, |r| r.server_cpu_util), 2),
                    opt(med(runs, |r| r.loadgen_cpu_util), 2),
                    runs.iter().map(|r| r.failed_streams).max().unwrap_or(0),
                ));
            }
        }
        w(&mut m, "");
        w(&mut m, "Delivered updates/s counts NODE updates received by all peers whose `as_of` stamp falls in the window (clients → their agent, agents → each of their clients). At a fixed offered rate both servers should deliver everything; the CPU column then shows the cost of doing so.");
        w(&mut m, "");
    }

    capacity_section(&mut m, res);
    targets(&mut m, res);
    w(&mut m, "## Notes and errors");
    w(&mut m, "");
    let busy: Vec<String> = res
        .runs
        .iter()
        .filter(|r| r.busy)
        .map(|r| {
            format!(
                "{} {} {} #{} (load {:.2}, other CPU {} cores)",
                r.part,
                r.cell,
                r.server,
                r.seq + 1,
                r.load1,
                opt(r.other_cpu, 2)
            )
        })
        .collect();
    if !busy.is_empty() {
        w(
            &mut m,
            &format!(
                "- **{} of {} runs started while something else was running** (†): {}",
                busy.len(),
                res.runs.len(),
                busy.join(", ")
            ),
        );
    }
    for n in &res.notes {
        w(&mut m, &format!("- {n}"));
    }
    for e in &res.errors {
        w(&mut m, &format!("- ERROR: {e}"));
    }
    w(&mut m, "");
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    fn relay_report(received: u64, window: u64, drops: u64) -> serde_json::Value {
        serde_json::json!({
            "mode": "relay", "label": "P=10 S=1400", "transport": "derp",
            "pairs": 10, "size": 1400, "offered_pps": 0.0, "offered_gbps": 0.0,
            "window": window, "window_stalls": 0, "duration_s": 0.5,
            "sent_window": received + drops, "received_window": received,
            "sent_total": received + drops, "received_total": received,
            "drops": drops, "loss": 0.0, "delivered_gbps": received as f64 / 1e3,
            "delivered_pps": received as f64 * 2.0,
            "latency_p50_us": 1.0, "latency_p99_us": 1.0, "latency_p999_us": 1.0,
            "latency_max_us": 1.0
        })
    }

    fn run(part: &str, server: &str, seq: usize, report: serde_json::Value) -> Run {
        Run {
            part: part.into(),
            cell: "P=10 S=1400".into(),
            server: server.into(),
            seq,
            utc: String::new(),
            load1: 0.0,
            other_cpu: None,
            busy: false,
            report,
        }
    }

    #[test]
    fn quick_sanity_accepts_a_good_run_and_names_each_bad_figure() {
        let mut res = Results::default();
        res.runs
            .push(run("relay", "tailnetd", 0, relay_report(1000, 32, 0)));
        res.runs
            .push(run("sweep", "tailnetd", 0, relay_report(500, 0, 3)));
        assert!(quick_sanity(&res).is_empty(), "{:?}", quick_sanity(&res));

        res.runs
            .push(run("relay-pp", "tailnetd", 0, relay_report(0, 32, 0)));
        res.runs
            .push(run("relay-tls", "tailnetd", 0, relay_report(900, 32, 7)));
        // Loss after write-offs is explained (a second window on top of a queued one).
        let mut stalled = relay_report(900, 32, 5);
        stalled["window_stalls"] = 1.into();
        res.runs.push(run("relay-ws", "tailnetd", 0, stalled));
        let bad = quick_sanity(&res);
        assert_eq!(bad.len(), 2, "{bad:?}");
        assert!(
            bad[0].contains("relay-pp") && bad[0].contains("delivered nothing"),
            "{bad:?}"
        );
        assert!(bad[1].contains("lost 7 packets"), "{bad:?}");
    }

    /// The ceiling row of one `relay` cell: tailnetd's runs used 0.8 of a core, the
    /// forwarder's `forwarder_cpu`; the load generator used all of its core, so the forwarder's
    /// limit is "both" at 1.0 core and "client" below 0.9.
    fn ceiling_row_of(tailnetd: [u64; 3], forwarder: [u64; 3], forwarder_cpu: f64) -> String {
        ceiling_row_with(tailnetd, 0.8, forwarder, forwarder_cpu, 1.0)
    }

    /// [`ceiling_row_of`] with every CPU figure chosen: tailnetd's, the forwarder's, and the load
    /// generator's in both servers' runs.
    fn ceiling_row_with(
        tailnetd: [u64; 3],
        tailnetd_cpu: f64,
        forwarder: [u64; 3],
        forwarder_cpu: f64,
        loadgen_cpu: f64,
    ) -> String {
        let mode = MODES
            .iter()
            .find(|m| m.part == "relay")
            .expect("relay mode");
        let with_cpu = |mut report: serde_json::Value, cpu: f64| {
            let gbps = report["delivered_gbps"].as_f64().expect("delivered_gbps");
            report["server_cpu_util"] = cpu.into();
            report["gbps_per_core"] = (gbps / cpu).into();
            report["loadgen_cpu_util"] = loadgen_cpu.into();
            report
        };
        let mut res = Results::default();
        for (seq, (t, c)) in tailnetd.into_iter().zip(forwarder).enumerate() {
            res.runs.push(run(
                "relay",
                "tailnetd",
                seq,
                with_cpu(relay_report(t, 32, 0), tailnetd_cpu),
            ));
            res.runs.push(run(
                "relay",
                "tcp-forward",
                seq,
                with_cpu(relay_report(c, 32, 0), forwarder_cpu),
            ));
        }
        ceiling_row(&res, mode).expect("a row")
    }

    #[test]
    fn the_ceiling_row_counts_cells_where_tailnetd_is_ahead_and_beyond_the_spread() {
        let row = ceiling_row_of([1000, 1100, 1200], [1300, 1400, 1500], 1.0);
        assert!(row.contains("ahead in 0 raw"), "{row}");
        assert!(row.contains("not beaten beyond the spread"), "{row}");

        // Overlapping ranges with tailnetd's median ahead: ahead, not beyond the spread.
        let row = ceiling_row_of([1000, 1100, 1200], [900, 1050, 1150], 1.0);
        assert!(
            row.contains("ahead in 1 raw") && row.contains("beyond the spread in 0 raw"),
            "{row}"
        );

        // tailnetd's slowest run ahead of the forwarder's fastest while the forwarder used its
        // whole core: the ceiling is beaten.
        let row = ceiling_row_of([1200, 1300, 1400], [900, 1050, 1150], 1.0);
        assert!(
            row.contains("beyond the spread in 1 raw")
                && row.contains("P=10 S=1400: client / both")
                && row.contains("**beaten** with the forwarder at its limit: P=10 S=1400"),
            "{row}"
        );

        // The same figures with the forwarder at half a core (the load generator bounded it):
        // no ceiling was measured in that cell, and the verdict says so.
        let row = ceiling_row_of([1200, 1300, 1400], [900, 1050, 1150], 0.5);
        assert!(
            row.contains("beyond the spread in 1 raw")
                && row.contains("P=10 S=1400: client / client")
                && row.contains("not beaten where the forwarder was the limit")
                && !row.contains("**beaten**"),
            "{row}"
        );

        // Both cores at their limit (the forwarder at 0.91, tailnetd and the load generator at
        // 1.0): tailnetd ahead beyond the spread raw but not per core of server CPU. The raw
        // figure is the load generator's as much as the server's: not beaten.
        let row = ceiling_row_with([1200, 1300, 1400], 1.0, [900, 1050, 1150], 0.91, 1.0);
        assert!(
            row.contains("beyond the spread in 1 raw, 0 per core")
                && row.contains("P=10 S=1400: both / both")
                && row.contains("not beaten where the forwarder was the limit")
                && !row.contains("**beaten**"),
            "{row}"
        );

        // The forwarder alone at its limit (the load generator at half its core): tailnetd ahead
        // beyond the spread raw is enough to beat it.
        let row = ceiling_row_with([1200, 1300, 1400], 1.0, [900, 1050, 1150], 0.91, 0.5);
        assert!(
            row.contains("beyond the spread in 1 raw, 0 per core")
                && row.contains("P=10 S=1400: server / server")
                && row.contains("**beaten** with the forwarder at its limit: P=10 S=1400"),
            "{row}"
        );
    }

    #[test]
    fn the_io_uring_probe_runs_only_for_parts_with_the_plain_forwarder() {
        let only = |parts: &'static [&'static str]| move |p: &str| parts.contains(&p);
        for parts in [
            &["sweep"][..],
            &["relay"],
            &["relay-pp"],
            &["relay-held"],
            &["relay-pp-held"],
            &["idle", "relay-pp"],
        ] {
            assert!(runs_plain_ceiling(&only(parts)), "{parts:?}");
        }
        for parts in [
            &["relay-tls"][..],
            &["relay-tls-pp"],
            &["relay-ws"],
            &["relay-go", "relay-go-ws", "relay-go-tls"],
            &["idle", "coord", "coord-cap"],
        ] {
            assert!(!runs_plain_ceiling(&only(parts)), "{parts:?}");
        }
        // No --only: every part, the plain ones among them.
        assert!(runs_plain_ceiling(&|_| true));
    }

    #[test]
    fn runs_group_by_cell_and_server_and_report_median_with_spread() {
        let mut res = Results::default();
        for (seq, (t, d)) in [(3000, 1000), (1000, 3000), (2000, 2000)]
            .into_iter()
            .enumerate()
        {
            res.runs
                .push(run("relay", "tailnetd", seq, relay_report(t, 32, 0)));
            res.runs
                .push(run("relay", "derper", seq, relay_report(d, 32, 0)));
        }
        assert_eq!(res.count("relay", "P=10 S=1400", "derper"), 3);
        let g = res.grouped::<RelayReport>("relay");
        assert_eq!(g.len(), 1);
        assert_eq!(g[0].1.len(), 2);
        let s = spread(&g[0].1[0].1, |r| Some(r.delivered_gbps)).unwrap();
        assert_eq!((s.med, s.min, s.max, s.n), (2.0, 1.0, 3.0, 3));
        assert_eq!(fmt_spread(Some(s), 1), "2.0 (1.0–3.0)");
        assert_eq!(median(&mut [4.0, 1.0, 3.0, 2.0]), Some(2.5));
        let md = markdown(&res, false);
        assert!(
            md.contains("| 10 | 1400 | tailnetd | 3 | 2.000 (1.000–3.000)"),
            "{md}"
        );
    }

    #[test]
    fn cells_interleave_servers_resume_stored_runs_and_save_each_run() {
        let path = std::env::temp_dir().join(format!("compare-test-{}.json", std::process::id()));
        let mut res = Results::default();
        // One run of A is already stored (an earlier, interrupted invocation).
        res.runs.push(run("relay", "A", 0, relay_report(1, 32, 0)));
        let mut r = Runner {
            res,
            path: path.clone(),
            // Quick: no 0.5 s CPU sample before each run.
            quick: true,
            busy_load: f64::INFINITY,
            errors: Vec::new(),
        };
        let servers = [("A".to_string(), 'A'), ("B".to_string(), 'B')];
        let mut order = Vec::new();
        r.cell("relay", "P=10 S=1400", &servers, 4, |s| {
            order.push(s);
            if s == 'B' && order.len() == 5 {
                bail!("B broke");
            }
            Ok(relay_report(1, 32, 0))
        });
        // B (A's first run is stored), then A B A B A interleaved; B failed on its third run
        // and is not tried again in this cell.
        assert_eq!(order, ['B', 'A', 'B', 'A', 'B', 'A']);
        assert_eq!(r.res.count("relay", "P=10 S=1400", "A"), 4);
        assert_eq!(r.res.count("relay", "P=10 S=1400", "B"), 2);
        assert_eq!(r.errors.len(), 1, "{:?}", r.errors);
        let saved: Results = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        assert_eq!(saved.runs.len(), 6);
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn committed_results_render_in_either_format() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("results/results.json");
        let res = read_results(&std::fs::read(path).unwrap()).unwrap();
        assert!(res
            .runs
            .iter()
            .any(|r| r.part == "relay" && r.server == "derper"));
        let md = markdown(&res, false);
        assert!(md.contains("| 100 | 1400 | tailnetd |"), "{md}");
        assert!(
            md.contains("## Idle connections") && md.contains("## Coordinator"),
            "{md}"
        );
    }

    #[test]
    fn a_cell_with_write_offs_is_marked_and_not_a_without_loss_figure() {
        let mut res = Results::default();
        res.runs
            .push(run("relay", "tailnetd", 0, relay_report(2000, 32, 0)));
        let mut lossy = relay_report(1000, 32, 0);
        lossy["window_stalls"] = 3.into();
        res.runs.push(run("relay", "derper", 0, lossy));
        let md = markdown(&res, false);
        assert!(md.contains("1.000 ⚠"), "{md}");
        assert!(md.contains("– (write-offs)"), "{md}");
    }
}
