//! Side-by-side comparison: runs tailnetd's relay, Tailscale's `derper`, a plain TCP forwarder
//! (the machine's ceiling), tailnetd's coordinator and Coder's Go coordinator one after the
//! other — each server pinned to core 0, the load generator to core 1 — and writes
//! `benches/results/RESULTS.md`, `results.json` and `relay.png`.
//!
//! `--quick` runs only tailnetd's workloads (and the forwarder), with tiny durations, into
//! `target/bench-quick/`: a smoke test that every workload runs and reports. It needs neither Go
//! nor derper and asserts nothing about speed.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use benches::chart::{self, Panel, Series};
use benches::coord::{AuthFile, CoordReport};
use benches::idle::IdleReport;
use benches::relay::RelayReport;
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
    /// Run only these parts (comma-separated: relay, sweep, idle, coord); default all.
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
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
    child: Child,
    addr: String,
}

impl Server {
    fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts a server that prints a JSON line with `http_addr` on stdout.
fn start_json_server(name: &str, mut cmd: Command, log: &Path) -> Result<Server> {
    let log_file = std::fs::File::create(log)?;
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::from(log_file))
        .spawn()
        .with_context(|| format!("starting {name}"))?;
    let out = child.stdout.take().ok_or_else(|| anyhow!("no stdout"))?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = BufReader::new(out).read_line(&mut line);
        let _ = tx.send(line);
    });
    let line = match rx.recv_timeout(Duration::from_secs(60)) {
        Ok(l) => l,
        Err(_) => {
            let _ = child.kill();
            bail!(
                "{name} printed no start-up line within 60 s (log: {})",
                log.display()
            );
        }
    };
    let v: serde_json::Value = serde_json::from_str(line.trim())
        .with_context(|| format!("{name} start-up line {line:?} (log: {})", log.display()))?;
    let addr = v["http_addr"]
        .as_str()
        .ok_or_else(|| anyhow!("{name}: no http_addr in {line}"))?
        .to_string();
    Ok(Server { child, addr })
}

fn free_port() -> Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

fn start_derper(bin: &Path, pin: Pin, dir: &Path) -> Result<Server> {
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
    .arg(dir.join("derper.key"))
    .stdin(Stdio::null())
    .stdout(Stdio::null())
    .stderr(Stdio::from(log));
    let child = cmd.spawn().context("starting derper")?;
    let addr = format!("127.0.0.1:{port}");
    let s = Server {
        child,
        addr: addr.clone(),
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

struct Ctx {
    bins: Bins,
    pin: Pin,
    dir: PathBuf,
    quick: bool,
    duration: f64,
    warmup: f64,
    notes: Vec<String>,
}

impl Ctx {
    fn start_relay(&self, which: Relay) -> Result<Server> {
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
                start_json_server("tailnetd", c, &self.dir.join("tailnetd.log"))
            }
            Relay::Derper => {
                let bin = self
                    .bins
                    .derper
                    .as_ref()
                    .ok_or_else(|| anyhow!("derper not available"))?;
                start_derper(bin, self.pin, &self.dir)
            }
            Relay::Ceiling => {
                let mut c = self.pin.command(0, &self.bins.tcpfwd);
                c.args(["--listen", "127.0.0.1:0"]);
                start_json_server("tcpfwd", c, &self.dir.join("tcpfwd.log"))
            }
        }
    }

    fn loadgen(&self, args: &[String], timeout: Duration) -> Result<String> {
        let mut cmd = self.pin.command(1, &self.bins.loadgen);
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let mut child = cmd.spawn().context("starting loadgen")?;
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
                bail!("loadgen timed out after {timeout:?}: {args:?}");
            }
        };
        let st = child.wait()?;
        if !st.success() {
            bail!("loadgen failed ({st}): {args:?}");
        }
        Ok(out.lines().last().unwrap_or("").to_string())
    }

    fn relay_run(
        &self,
        which: Relay,
        pairs: usize,
        size: usize,
        rate: f64,
        window: u64,
        label: &str,
    ) -> Result<RelayReport> {
        let srv = self.start_relay(which)?;
        let (url, transport) = match which {
            Relay::Ceiling => (srv.addr.clone(), "raw"),
            _ => (format!("http://{}/derp", srv.addr), "derp"),
        };
        let args: Vec<String> = [
            "relay",
            "--url",
            &url,
            "--transport",
            transport,
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
        let t = Duration::from_secs_f64(self.duration + self.warmup) * 3 + Duration::from_secs(120);
        let out = self.loadgen(&args, t)?;
        drop(srv);
        serde_json::from_str(&out).with_context(|| format!("loadgen output {out:?}"))
    }

    fn idle_run(&self, which: Relay, conns: usize) -> Result<IdleReport> {
        let srv = self.start_relay(which)?;
        let url = format!("http://{}/derp", srv.addr);
        let args: Vec<String> = [
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
        let out = self.loadgen(&args, Duration::from_secs(600))?;
        drop(srv);
        serde_json::from_str(&out).with_context(|| format!("loadgen output {out:?}"))
    }

    fn coord_run(&self, go: bool, w: &CoordWorkload) -> Result<CoordReport> {
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
            start_json_server("gocoord", c, &self.dir.join("gocoord.log"))?
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
            start_json_server("tailnetd", c, &self.dir.join("coordinator.log"))?
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

#[derive(Clone, Debug, Serialize, Deserialize)]
struct CoordWorkload {
    label: String,
    agents: usize,
    clients: usize,
    client_rate: f64,
    agent_rate: f64,
    duration: f64,
}

#[derive(Default, Serialize, Deserialize)]
struct Results {
    command: String,
    started_utc: String,
    machine: Vec<(String, String)>,
    relay_max: Vec<(Relay, RelayReport)>,
    relay_sweep: Vec<(Relay, f64, RelayReport)>,
    sweep_base_pps: f64,
    idle: Vec<(Relay, IdleReport)>,
    coord: Vec<(String, CoordReport)>,
    coord_workloads: Vec<CoordWorkload>,
    notes: Vec<String>,
    errors: Vec<String>,
}

fn sh(cmd: &str) -> String {
    Command::new("sh")
        .args(["-c", cmd])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    if let Some(path) = &cli.render {
        let res: Results = serde_json::from_slice(&std::fs::read(path)?)?;
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
    let derper = if quick || cli.no_derper {
        None
    } else if !go {
        notes.push("derper skipped: no Go toolchain".to_string());
        None
    } else {
        match build_derper() {
            Ok(b) => Some(b),
            Err(e) => {
                notes.push(format!("derper skipped: {e:#}"));
                None
            }
        }
    };
    let gocoord = if quick || cli.no_gocoord {
        None
    } else if !go {
        notes.push("Go coordinator skipped: no Go toolchain".to_string());
        None
    } else {
        match build_gocoord() {
            Ok(b) => Some(b),
            Err(e) => {
                notes.push(format!("Go coordinator skipped: {e:#}"));
                None
            }
        }
    };
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
    let ctx = Ctx {
        bins: Bins {
            tailnetd: bin_dir.join("tailnetd"),
            loadgen: bin_dir.join("loadgen"),
            tcpfwd: bin_dir.join("tcpfwd"),
            derper,
            gocoord,
        },
        pin,
        dir: dir.clone(),
        quick,
        duration,
        warmup: if quick { 0.2 } else { 1.0 },
        notes,
    };

    let load0 = sh("cat /proc/loadavg");
    let mut res = Results {
        command: std::env::args().collect::<Vec<_>>().join(" "),
        started_utc: sh("date -u +%Y-%m-%dT%H:%M:%SZ"),
        ..Default::default()
    };
    res.machine = vec![
        ("uname -a".into(), sh("uname -a")),
        ("lscpu".into(), sh("lscpu | grep -E '^(Architecture|CPU\\(s\\)|Model name|Thread|Core|Socket|CPU max MHz|L2|L3|Hypervisor)'")),
        ("memory".into(), sh("grep MemTotal /proc/meminfo")),
        ("rustc".into(), sh("rustc -V")),
        ("go".into(), if go { sh("go version") } else { "not installed".into() }),
        ("tailnetd".into(), format!("{} ({} build)", sh(&format!("git -C {} describe --always --dirty", root().display())), profile())),
        ("derper".into(), if ctx.bins.derper.is_some() { format!("tailscale.com/cmd/derper@{DERPER_VERSION}") } else { "not run".into() }),
        ("Go coordinator".into(), if ctx.bins.gocoord.is_some() { format!("github.com/coder/coder/v2@{CODER_VERSION} tailnet.NewCoordinator via interop/gocoord") } else { "not run".into() }),
        ("pinning".into(), if pin.enabled { "server: taskset -c 0, load generator: taskset -c 1".into() } else { "none".into() }),
    ];
    // Provenance: what exactly ran (hashes of every binary, Go build information).
    let binaries = [
        ("tailnetd", Some(&ctx.bins.tailnetd)),
        ("loadgen", Some(&ctx.bins.loadgen)),
        ("tcpfwd", Some(&ctx.bins.tcpfwd)),
        ("derper", ctx.bins.derper.as_ref()),
        ("Go coordinator", ctx.bins.gocoord.as_ref()),
    ];
    for (name, path) in binaries {
        let Some(path) = path else { continue };
        res.machine.push((
            format!("sha256 {name}"),
            sh(&format!("sha256sum '{}' | cut -d' ' -f1", path.display())),
        ));
        if go && matches!(name, "derper" | "Go coordinator") {
            res.machine.push((
                format!("go version -m {name}"),
                sh(&format!(
                    "go version -m '{}' | grep -E '^\\s*(path|mod|build\\s+(-compiler|CGO_ENABLED|GOARCH|GOAMD64|GOOS|-trimpath))|: go' | tr -s '\\t' ' '",
                    path.display()
                )),
            ));
        }
    }

    let mut relays = vec![Relay::Tailnetd];
    if ctx.bins.derper.is_some() {
        relays.push(Relay::Derper);
    }
    relays.push(Relay::Ceiling);

    let want = |part: &str| cli.only.is_empty() || cli.only.iter().any(|o| o == part);
    // 1. Relay: as fast as possible, P × S.
    let (ps, ss): (Vec<usize>, Vec<usize>) = if quick {
        (vec![1, 10], vec![1400])
    } else {
        (vec![1, 10, 100], vec![100, 1400, 8000])
    };
    for &p in ps.iter().filter(|_| want("relay")) {
        for &s in &ss {
            for &r in &relays {
                let label = format!("{} closed-loop P={p} S={s}", r.name());
                eprintln!("compare: relay {label}");
                match ctx.relay_run(r, p, s, 0.0, WINDOW, &label) {
                    Ok(rep) => res.relay_max.push((r, rep)),
                    Err(e) => res.errors.push(format!("{label}: {e:#}")),
                }
            }
        }
    }

    // 2. Offered-load sweep at P=100 (quick: 10), S=1400, in fractions of derper's saturation
    //    (tailnetd's when derper is absent).
    let sweep_p = if quick { 10 } else { 100 };
    let base_relay = if relays.contains(&Relay::Derper) {
        Relay::Derper
    } else {
        Relay::Tailnetd
    };
    let earlier: Vec<(Relay, RelayReport)> = if res.relay_max.is_empty() {
        // A partial run: take the base from an earlier results.json.
        std::fs::read(out_dir.join("results.json"))
            .ok()
            .and_then(|b| serde_json::from_slice::<Results>(&b).ok())
            .map(|r| r.relay_max)
            .unwrap_or_default()
    } else {
        Vec::new()
    };
    let base = res
        .relay_max
        .iter()
        .chain(earlier.iter())
        .filter(|(r, rep)| *r == base_relay && rep.pairs == sweep_p && rep.size == 1400)
        .map(|(_, rep)| rep.delivered_pps)
        .next()
        .unwrap_or(0.0);
    res.sweep_base_pps = base;
    let fractions: Vec<f64> = if quick {
        vec![0.5]
    } else {
        vec![0.25, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0]
    };
    if base > 0.0 && want("sweep") {
        for &f in &fractions {
            for &r in &relays {
                let rate = (base * f).round();
                let label = format!("{} sweep {f}x P={sweep_p} S=1400", r.name());
                eprintln!("compare: relay {label} ({rate} pps)");
                match ctx.relay_run(r, sweep_p, 1400, rate, 0, &label) {
                    Ok(rep) => res.relay_sweep.push((r, f, rep)),
                    Err(e) => res.errors.push(format!("{label}: {e:#}")),
                }
            }
        }
    } else if want("sweep") {
        res.errors
            .push("sweep skipped: no saturation figure".into());
    }

    // 3. Idle memory per connection.
    let conns = cli.idle_conns.unwrap_or(if quick { 100 } else { 10_000 });
    for &r in relays
        .iter()
        .filter(|r| **r != Relay::Ceiling && want("idle"))
    {
        eprintln!("compare: idle {} × {conns}", r.name());
        match ctx.idle_run(r, conns) {
            Ok(rep) => res.idle.push((r, rep)),
            Err(e) => res.errors.push(format!("idle {}: {e:#}", r.name())),
        }
    }

    // 4. Coordinator.
    let cd = if quick { 0.5 } else { 5.0 };
    let workloads = if quick {
        vec![CoordWorkload {
            label: "2x5".into(),
            agents: 2,
            clients: 5,
            client_rate: 2.0,
            agent_rate: 2.0,
            duration: cd,
        }]
    } else {
        vec![
            CoordWorkload {
                label: "fan-out 1 agent x 1000 clients, agent 10/s".into(),
                agents: 1,
                clients: 1000,
                client_rate: 0.2,
                agent_rate: 10.0,
                duration: cd,
            },
            CoordWorkload {
                label: "10,100 peers (100 x 100), 0.5/s each".into(),
                agents: 100,
                clients: 100,
                client_rate: 0.5,
                agent_rate: 0.5,
                duration: cd,
            },
            CoordWorkload {
                label: "throughput 10 x 100, 3/s each".into(),
                agents: 10,
                clients: 100,
                client_rate: 3.0,
                agent_rate: 3.0,
                duration: cd,
            },
            CoordWorkload {
                label: "throughput 10 x 100, 6/s each".into(),
                agents: 10,
                clients: 100,
                client_rate: 6.0,
                agent_rate: 6.0,
                duration: cd,
            },
            CoordWorkload {
                label: "throughput 10 x 100, 12/s each".into(),
                agents: 10,
                clients: 100,
                client_rate: 12.0,
                agent_rate: 12.0,
                duration: cd,
            },
            CoordWorkload {
                label: "throughput 10 x 100, 24/s each".into(),
                agents: 10,
                clients: 100,
                client_rate: 24.0,
                agent_rate: 24.0,
                duration: cd,
            },
        ]
    };
    let mut flavors = vec![false];
    if ctx.bins.gocoord.is_some() {
        flavors.push(true);
    }
    for w in workloads.iter().filter(|_| want("coord")) {
        for &g in &flavors {
            let name = if g { "Go coordinator" } else { "tailnetd" };
            eprintln!("compare: coordinator {name} {}", w.label);
            match ctx.coord_run(g, w) {
                Ok(rep) => res.coord.push((name.to_string(), rep)),
                Err(e) => res
                    .errors
                    .push(format!("coordinator {name} {}: {e:#}", w.label)),
            }
        }
    }
    res.coord_workloads = workloads;
    res.notes = ctx.notes.clone();
    res.notes.push(format!(
        "load average at start: {load0}; at end: {}",
        sh("cat /proc/loadavg")
    ));
    res.notes.push(format!(
        "total wall time {:.0} s",
        started.elapsed().as_secs_f64()
    ));

    // A partial run (--only) replaces just its parts of an earlier results.json, so a part that
    // was disturbed (e.g. by another build on the machine) can be measured again.
    if !cli.only.is_empty() {
        if let Ok(old) = std::fs::read(out_dir.join("results.json")) {
            if let Ok(mut prev) = serde_json::from_slice::<Results>(&old) {
                let part = |p: &str| cli.only.iter().any(|o| o == p);
                if part("relay") {
                    prev.relay_max = std::mem::take(&mut res.relay_max);
                }
                if part("sweep") {
                    prev.relay_sweep = std::mem::take(&mut res.relay_sweep);
                    prev.sweep_base_pps = res.sweep_base_pps;
                }
                if part("idle") {
                    prev.idle = std::mem::take(&mut res.idle);
                }
                if part("coord") {
                    prev.coord = std::mem::take(&mut res.coord);
                    prev.coord_workloads = std::mem::take(&mut res.coord_workloads);
                }
                prev.notes.push(format!(
                    "re-measured {} by `{}` at {} UTC: {}",
                    cli.only.join(","),
                    res.command,
                    res.started_utc,
                    res.notes.join("; ")
                ));
                prev.errors.append(&mut res.errors);
                res = prev;
            }
        }
    }
    std::fs::write(
        out_dir.join("results.json"),
        serde_json::to_vec_pretty(&res)?,
    )?;
    let png = out_dir.join("relay.png");
    if let Err(e) = write_chart(&res, &png) {
        res.errors.push(format!("chart: {e:#}"));
    }
    std::fs::write(out_dir.join("RESULTS.md"), markdown(&res, quick))?;
    let _ = std::fs::remove_dir_all(&dir);
    eprintln!("compare: wrote {}", out_dir.join("RESULTS.md").display());
    for e in &res.errors {
        eprintln!("compare: error: {e}");
    }
    if quick {
        // The smoke test's only contract: every tailnetd workload ran and reported.
        let tailnetd_relay = res
            .relay_max
            .iter()
            .filter(|(r, _)| *r == Relay::Tailnetd)
            .count();
        if !cli.only.is_empty() {
            return Ok(());
        }
        if tailnetd_relay != ps.len() * ss.len()
            || res.idle.is_empty()
            || res.coord.is_empty()
            || !res.errors.is_empty()
        {
            bail!("quick comparison incomplete: {:?}", res.errors);
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
/// they mean slowness, and speed is not what the smoke test is for. Returns one line per failure.
fn quick_sanity(res: &Results) -> Vec<String> {
    let mut bad = Vec::new();
    let relay_runs = res
        .relay_max
        .iter()
        .map(|(r, rep)| (r, rep))
        .chain(res.relay_sweep.iter().map(|(r, _, rep)| (r, rep)));
    for (r, rep) in relay_runs {
        let what = format!("{} {}", r.name(), rep.label);
        if rep.received_window == 0 || rep.delivered_pps <= 0.0 {
            bad.push(format!("{what}: delivered nothing in the window"));
        }
        if rep.window > 0 && rep.drops > 0 {
            bad.push(format!(
                "{what}: closed loop lost {} packets ({} write-offs)",
                rep.drops, rep.window_stalls
            ));
        }
    }
    for (r, rep) in &res.idle {
        if rep.connected != rep.conns {
            bad.push(format!(
                "idle {}: {} of {} connections",
                r.name(),
                rep.connected,
                rep.conns
            ));
        }
    }
    for (name, rep) in &res.coord {
        if rep.failed_streams > 0 {
            bad.push(format!(
                "coordinator {name} {}: {} failed streams",
                rep.label, rep.failed_streams
            ));
        }
        if rep.delivered_updates_per_s <= 0.0 {
            bad.push(format!(
                "coordinator {name} {}: delivered no updates",
                rep.label
            ));
        }
    }
    bad
}

fn write_chart(res: &Results, path: &Path) -> Result<()> {
    let mut thr = Vec::new();
    let mut lat = Vec::new();
    for r in [Relay::Tailnetd, Relay::Derper, Relay::Ceiling] {
        let pts: Vec<&RelayReport> = res
            .relay_sweep
            .iter()
            .filter(|(x, _, _)| *x == r)
            .map(|(_, _, rep)| rep)
            .collect();
        if pts.is_empty() {
            continue;
        }
        thr.push(Series {
            name: r.name().into(),
            points: pts
                .iter()
                .map(|p| (p.offered_gbps, p.delivered_gbps))
                .collect(),
        });
        lat.push(Series {
            name: r.name().into(),
            points: pts
                .iter()
                .map(|p| (p.offered_gbps, p.latency_p99_us))
                .collect(),
        });
    }
    let p = res.relay_sweep.first().map(|x| x.2.pairs).unwrap_or(0);
    chart::write_png(
        path,
        &[
            Panel {
                title: format!("Delivered vs offered (P={p}, 1400 B)"),
                x_label: "offered Gbit/s".into(),
                y_label: "delivered Gbit/s".into(),
                log_y: false,
                series: thr,
            },
            Panel {
                title: "p99 one-way latency".into(),
                x_label: "offered Gbit/s".into(),
                y_label: "p99 latency, us (log)".into(),
                log_y: true,
                series: lat,
            },
        ],
    )
}

fn verdict(ok: Option<bool>) -> &'static str {
    match ok {
        Some(true) => "met",
        Some(false) => "**not met**",
        None => "not measured",
    }
}

/// The targets, reported (never asserted).
fn targets(m: &mut String, res: &Results) {
    let w = |m: &mut String, s: &str| {
        m.push_str(s);
        m.push('\n');
    };
    w(m, "## Targets (reported, not asserted)");
    w(m, "");
    w(m, "| target | measured | verdict |");
    w(m, "|---|---|---|");
    let max = |r: Relay| {
        res.relay_max
            .iter()
            .find(|(x, rep)| *x == r && rep.pairs == 100 && rep.size == 1400)
            .map(|(_, rep)| rep.delivered_gbps)
    };
    let (t, d, c) = (
        max(Relay::Tailnetd),
        max(Relay::Derper),
        max(Relay::Ceiling),
    );
    let both = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => Some(a / b),
        _ => None,
    };
    let r = both(t, d);
    w(
        m,
        &format!(
        "| relay throughput ≥ 2× derper (P=100, 1400 B, one core) | {} vs {} Gbit/s = {} | {} |",
        opt(t, 3), opt(d, 3), opt(r, 2) + "×", verdict(r.map(|r| r >= 2.0))
    ),
    );
    let pcore = |r: Relay| {
        res.relay_max
            .iter()
            .find(|(x, rep)| *x == r && rep.pairs == 100 && rep.size == 1400)
            .and_then(|(_, rep)| rep.gbps_per_core)
    };
    let rc = both(pcore(Relay::Tailnetd), pcore(Relay::Derper));
    w(m, &format!(
        "| same, normalised per server core (Gbit/s ÷ server CPU) | {} vs {} Gbit/s per core = {}× | {} |",
        opt(pcore(Relay::Tailnetd), 2), opt(pcore(Relay::Derper), 2), opt(rc, 2), verdict(rc.map(|r| r >= 2.0))
    ));
    let r = both(t, c);
    w(m, &format!(
        "| relay throughput ≥ 80% of the TCP-forward ceiling (P=100, 1400 B) | {} vs {} Gbit/s = {} | {} |",
        opt(t, 3), opt(c, 3), r.map_or("–".into(), |r| format!("{:.0}%", r * 100.0)), verdict(r.map(|r| r >= 0.8))
    ));
    let half = |r: Relay| {
        res.relay_sweep
            .iter()
            .find(|(x, f, _)| *x == r && (*f - 0.5).abs() < 1e-9)
            .map(|(_, _, rep)| rep.latency_p99_us)
    };
    let (ht, hd) = (half(Relay::Tailnetd), half(Relay::Derper));
    let ok = match (ht, hd) {
        (Some(a), Some(b)) => Some(a <= b),
        _ => None,
    };
    w(
        m,
        &format!(
            "| p99 at half of derper's saturation load ≤ derper's | {} vs {} µs | {} |",
            opt(ht, 0),
            opt(hd, 0),
            verdict(ok)
        ),
    );
    let idle = |r: Relay| {
        res.idle
            .iter()
            .find(|(x, _)| *x == r)
            .map(|(_, i)| i.rss_per_conn_bytes)
    };
    let r = both(idle(Relay::Tailnetd), idle(Relay::Derper));
    w(
        m,
        &format!(
            "| idle memory per connection ≤ ¼ of derper's | {} vs {} B = {} | {} |",
            opt(idle(Relay::Tailnetd), 0),
            opt(idle(Relay::Derper), 0),
            opt(r, 2) + "×",
            verdict(r.map(|r| r <= 0.25))
        ),
    );
    let best = |go: bool| {
        res.coord
            .iter()
            .filter(|(n, r)| (n != "tailnetd") == go && r.failed_streams == 0)
            .map(|(_, r)| r.delivered_updates_per_s)
            .fold(None, |a: Option<f64>, b| Some(a.map_or(b, |a| a.max(b))))
    };
    let r = both(best(false), best(true));
    w(m, &format!(
        "| coordinator delivered updates/s ≥ 5× the Go coordinator's (best run of each without failed streams: a server that kicks peers does not count) | {} vs {} /s = {} | {} |",
        opt(best(false), 0), opt(best(true), 0), opt(r, 2) + "×", verdict(r.map(|r| r >= 5.0))
    ));
    let big = res
        .coord
        .iter()
        .filter(|(n, r)| n == "tailnetd" && r.peers >= 10_000)
        .map(|(_, r)| r.fanout_p99_ms)
        .next();
    w(
        m,
        &format!(
            "| coordinator p99 fan-out < 10 ms at 10,000 connected peers | {} ms | {} |",
            opt(big, 2),
            verdict(big.map(|v| v < 10.0))
        ),
    );
    w(m, "");
    w(m, "When a ratio is bounded by the load generator rather than the server (the TCP-forward ceiling and the server CPU column show this), \"not met\" may say more about this two-core machine than about the server.");
    w(m, "");
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

fn markdown(res: &Results, quick: bool) -> String {
    let mut m = String::new();
    let w = |m: &mut String, s: &str| {
        m.push_str(s);
        m.push('\n');
    };
    w(&mut m, "# tailnetd benchmark results");
    w(&mut m, "");
    if quick {
        w(&mut m, "**Quick smoke run** (tiny durations, debug-friendly): these numbers only show that every workload runs. Do not quote them.");
        w(&mut m, "");
    }
    w(&mut m, &format!("Generated by `{}` at {} (UTC). Every figure is exactly as measured in that run; raw data in `results.json`, chart in `relay.png`.", res.command, res.started_utc));
    w(&mut m, "");
    w(&mut m, "## Machine and versions");
    w(&mut m, "");
    for (k, v) in &res.machine {
        w(&mut m, &format!("- **{k}**: {}", v.replace('\n', "; ")));
    }
    w(&mut m, "");
    w(&mut m, "Method: each server runs alone (restarted for every run) pinned to core 0; the load generator (`loadgen`, one tokio worker per allowed core) is pinned to core 1. Plain HTTP on loopback, no TLS, no STUN. Relay runs: 1 s warm-up, then the measurement window. The maximum-throughput runs are closed loop (each pair keeps at most 32 packets in flight, the relays' per-destination queue depth, so a relay never needs to drop); the sweep is open loop at fixed total rates (up to 4× the base figure) and shows latency against offered load and behaviour under overload; loss = (sent − received) / sent over the whole run after a 2 s drain; latency = one-way, sender timestamp to receiver, same clock. tailnetd runs with `--log warn`; derper with its defaults. The load generator shares the machine with the server, so at the top end it can be the bottleneck: the TCP-forward ceiling shows where that is.");
    w(&mut m, "");

    // Relay max table.
    w(&mut m, "## Relay throughput, maximum without loss (closed loop: at most 32 packets in flight per pair)");
    w(&mut m, "");
    w(&mut m, "| P | S (B) | tailnetd Gbit/s | tailnetd kpps | tailnetd loss | tailnetd p99 µs | tailnetd CPU (server / load gen) | tailnetd Gbit/s per core | derper Gbit/s | derper loss | derper p99 µs | derper CPU (server / load gen) | derper Gbit/s per core | ceiling Gbit/s | ceiling CPU (server / load gen) | tailnetd/derper | tailnetd/derper per core | tailnetd/ceiling |");
    w(
        &mut m,
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    );
    let find = |r: Relay, p: usize, s: usize| {
        res.relay_max
            .iter()
            .find(|(x, rep)| *x == r && rep.pairs == p && rep.size == s)
            .map(|(_, rep)| rep)
    };
    let mut keys: Vec<(usize, usize)> = res
        .relay_max
        .iter()
        .map(|(_, r)| (r.pairs, r.size))
        .collect();
    keys.sort();
    keys.dedup();
    for (p, s) in &keys {
        let t = find(Relay::Tailnetd, *p, *s);
        let d = find(Relay::Derper, *p, *s);
        let c = find(Relay::Ceiling, *p, *s);
        let g = |r: Option<&RelayReport>| {
            r.map_or("–".into(), |r| format!("{:.3}", r.delivered_gbps))
        };
        let l =
            |r: Option<&RelayReport>| r.map_or("–".into(), |r| format!("{:.1}%", r.loss * 100.0));
        let q = |r: Option<&RelayReport>| {
            r.map_or("–".into(), |r| format!("{:.0}", r.latency_p99_us))
        };
        let cpu = |r: Option<&RelayReport>| {
            r.map_or("–".into(), |r| {
                format!(
                    "{} / {}",
                    opt(r.server_cpu_util, 2),
                    opt(r.loadgen_cpu_util, 2)
                )
            })
        };
        let pc = |r: Option<&RelayReport>| r.map_or("–".into(), |r| opt(r.gbps_per_core, 2));
        w(
            &mut m,
            &format!(
                "| {p} | {s} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                g(t),
                t.map_or("–".into(), |r| format!("{:.1}", r.delivered_pps / 1e3)),
                l(t),
                q(t),
                cpu(t),
                pc(t),
                g(d),
                l(d),
                q(d),
                cpu(d),
                pc(d),
                g(c),
                cpu(c),
                ratio(
                    t.map_or(0.0, |r| r.delivered_gbps),
                    d.map_or(0.0, |r| r.delivered_gbps)
                ),
                ratio(
                    t.and_then(|r| r.gbps_per_core).unwrap_or(0.0),
                    d.and_then(|r| r.gbps_per_core).unwrap_or(0.0)
                ),
                ratio(
                    t.map_or(0.0, |r| r.delivered_gbps),
                    c.map_or(0.0, |r| r.delivered_gbps)
                ),
            ),
        );
    }
    w(&mut m, "");
    w(
        &mut m,
        "CPU = server CPU seconds per second of the window (1.00 = the whole pinned core), then the load generator's own (it has the other core). Gbit/s per core = delivered Gbit/s ÷ CPU: what the server would move with a whole core to itself if it scaled linearly; it matters whenever CPU < 1.00, i.e. when the one-core load generator, not the server, was the limit.",
    );
    w(&mut m, "");

    // Sweep.
    if !res.relay_sweep.is_empty() {
        let p = res.relay_sweep[0].2.pairs;
        w(&mut m, &format!("## Offered-load sweep (P={p}, 1400 B), in multiples of {:.0} pps (the saturation figure of the first server above at P={p}, S=1400)", res.sweep_base_pps));
        w(&mut m, "");
        w(&mut m, "| × | offered Gbit/s | server | delivered Gbit/s | loss | p50 µs | p99 µs | p99.9 µs | CPU (server / load gen) |");
        w(&mut m, "|---|---|---|---|---|---|---|---|---|");
        for (r, f, rep) in &res.relay_sweep {
            w(
                &mut m,
                &format!(
                    "| {f} | {:.3} | {} | {:.3} | {:.2}% | {:.0} | {:.0} | {:.0} | {} / {} |",
                    rep.offered_gbps,
                    r.name(),
                    rep.delivered_gbps,
                    rep.loss * 100.0,
                    rep.latency_p50_us,
                    rep.latency_p99_us,
                    rep.latency_p999_us,
                    opt(rep.server_cpu_util, 2),
                    opt(rep.loadgen_cpu_util, 2)
                ),
            );
        }
        w(&mut m, "");
        w(
            &mut m,
            "![throughput and p99 latency against offered load](relay.png)",
        );
        w(&mut m, "");
    }

    // Idle.
    w(&mut m, "## Idle connections");
    w(&mut m, "");
    w(
        &mut m,
        "| server | connections | RSS before | RSS after | RSS per connection | handshakes/s |",
    );
    w(&mut m, "|---|---|---|---|---|---|");
    for (r, rep) in &res.idle {
        w(
            &mut m,
            &format!(
                "| {} | {}/{} | {:.1} MiB | {:.1} MiB | {:.0} B | {:.0} |",
                r.name(),
                rep.connected,
                rep.conns,
                rep.rss_before_bytes as f64 / 1048576.0,
                rep.rss_after_bytes as f64 / 1048576.0,
                rep.rss_per_conn_bytes,
                rep.connect_rate_per_s
            ),
        );
    }
    let idle_of = |r: Relay| {
        res.idle
            .iter()
            .find(|(x, _)| *x == r)
            .map(|(_, i)| i.rss_per_conn_bytes)
    };
    if let (Some(t), Some(d)) = (idle_of(Relay::Tailnetd), idle_of(Relay::Derper)) {
        w(&mut m, "");
        w(
            &mut m,
            &format!(
                "tailnetd/derper memory per idle connection: {}",
                ratio(t, d)
            ),
        );
    }
    w(&mut m, "");

    // Coordinator.
    w(
        &mut m,
        "## Coordinator (Coder v2 protocol: WebSocket → yamux → dRPC)",
    );
    w(&mut m, "");
    w(&mut m, "| workload | server | peers | offered updates/s | delivered updates/s | fan-out p50 ms | fan-out p99 ms | to-agent p99 ms | setup peers/s | RSS/peer | CPU (server / load gen) | failed streams |");
    w(&mut m, "|---|---|---|---|---|---|---|---|---|---|---|---|");
    for (name, r) in &res.coord {
        w(&mut m, &format!(
            "| {} | {name} | {} | {:.0} | {:.0} | {:.2} | {:.2} | {:.2} | {:.0} | {} | {} / {} | {} |",
            r.label, r.peers, r.offered_deliveries_per_s, r.delivered_updates_per_s, r.fanout_p50_ms,
            r.fanout_p99_ms, r.to_agent_p99_ms, r.setup_peers_per_s,
            r.rss_per_peer_bytes.map_or("–".into(), |b| format!("{:.0} B", b)),
            opt(r.server_cpu_util, 2), opt(r.loadgen_cpu_util, 2), r.failed_streams
        ));
    }
    w(&mut m, "");
    for wl in &res.coord_workloads {
        let t = res
            .coord
            .iter()
            .find(|(n, r)| n == "tailnetd" && r.label == wl.label);
        let g = res
            .coord
            .iter()
            .find(|(n, r)| n != "tailnetd" && r.label == wl.label);
        if let (Some((_, t)), Some((_, g))) = (t, g) {
            w(&mut m, &format!(
                "- {}: tailnetd/Go delivered updates/s {}, fan-out p99 {:.2} ms vs {:.2} ms, RSS/peer {}, CPU {} vs {}",
                wl.label, ratio(t.delivered_updates_per_s, g.delivered_updates_per_s), t.fanout_p99_ms, g.fanout_p99_ms,
                ratio(t.rss_per_peer_bytes.unwrap_or(0.0), g.rss_per_peer_bytes.unwrap_or(0.0)),
                opt(t.server_cpu_util, 2), opt(g.server_cpu_util, 2)
            ));
        }
    }
    w(&mut m, "");
    w(&mut m, "Delivered updates/s counts NODE updates received by all peers whose `as_of` stamp falls in the window (clients → their agent, agents → each of their clients). At a fixed offered rate both servers should deliver everything; the CPU column then shows the cost of doing so.");
    w(&mut m, "");

    targets(&mut m, res);
    if !res.notes.is_empty() || !res.errors.is_empty() {
        w(&mut m, "## Notes and errors");
        w(&mut m, "");
        for n in &res.notes {
            w(&mut m, &format!("- {n}"));
        }
        for e in &res.errors {
            w(&mut m, &format!("- ERROR: {e}"));
        }
        w(&mut m, "");
    }
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    fn relay_report(received: u64, window: u64, drops: u64) -> RelayReport {
        serde_json::from_value(serde_json::json!({
            "mode": "relay", "label": "P=10 S=1400", "transport": "derp",
            "pairs": 10, "size": 1400, "offered_pps": 0.0, "offered_gbps": 0.0,
            "window": window, "window_stalls": 0, "duration_s": 0.5,
            "sent_window": received + drops, "received_window": received,
            "sent_total": received + drops, "received_total": received,
            "drops": drops, "loss": 0.0, "delivered_gbps": 0.0,
            "delivered_pps": received as f64 * 2.0,
            "latency_p50_us": 1.0, "latency_p99_us": 1.0, "latency_p999_us": 1.0,
            "latency_max_us": 1.0
        }))
        .unwrap()
    }

    #[test]
    fn quick_sanity_accepts_a_good_run_and_names_each_bad_figure() {
        let mut res = Results::default();
        res.relay_max
            .push((Relay::Tailnetd, relay_report(1000, 32, 0)));
        res.relay_sweep
            .push((Relay::Tailnetd, 0.5, relay_report(500, 0, 3)));
        assert!(quick_sanity(&res).is_empty(), "{:?}", quick_sanity(&res));

        res.relay_max
            .push((Relay::Tailnetd, relay_report(0, 32, 0)));
        res.relay_max
            .push((Relay::Tailnetd, relay_report(900, 32, 7)));
        let bad = quick_sanity(&res);
        assert_eq!(bad.len(), 2, "{bad:?}");
        assert!(bad[0].contains("delivered nothing"), "{bad:?}");
        assert!(bad[1].contains("lost 7 packets"), "{bad:?}");
    }
}
