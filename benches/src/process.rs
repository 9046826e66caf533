//! Server processes the benchmark binaries start: killed and reaped on drop, and the one JSON
//! line tailnetd (and the Go helpers, and `tcpfwd`) print on stdout once listening.
//!
//! Why here: `compare`, `soak` and `attack_rss` each start servers and read that line; one
//! reader keeps the start-up deadline and the error messages the same everywhere.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};

/// How long a server may take to print its start-up line.
pub const START_TIMEOUT: Duration = Duration::from_secs(60);

/// A child process, killed and reaped when dropped.
#[derive(Debug)]
pub struct Process(pub Child);

impl Process {
    /// Its pid.
    pub fn pid(&self) -> u32 {
        self.0.id()
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A started server and the JSON object it announced.
#[derive(Debug)]
pub struct Announced {
    /// The process.
    pub process: Process,
    /// The start-up line.
    pub line: serde_json::Value,
}

impl Announced {
    /// A string field of the start-up line.
    pub fn field(&self, key: &str) -> Result<String> {
        self.line[key]
            .as_str()
            .map(str::to_string)
            .ok_or_else(|| anyhow!("no {key} in the start-up line {}", self.line))
    }

    /// A string field of the start-up line, if present.
    pub fn optional(&self, key: &str) -> Option<String> {
        self.line[key].as_str().map(str::to_string)
    }
}

/// Starts `cmd` (stdin closed, stderr to `log` if given, else discarded) and waits up to
/// [`START_TIMEOUT`] for its JSON start-up line.
pub fn start_announced(name: &str, mut cmd: Command, log: Option<&Path>) -> Result<Announced> {
    let stderr = match log {
        Some(path) => Stdio::from(
            std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?,
        ),
        None => Stdio::null(),
    };
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(stderr)
        .spawn()
        .with_context(|| format!("starting {name}"))?;
    let mut process = Process(child);
    let out = process
        .0
        .stdout
        .take()
        .ok_or_else(|| anyhow!("no stdout"))?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = BufReader::new(out).read_line(&mut line);
        let _ = tx.send(line);
    });
    let where_ = log.map_or(String::new(), |p| format!(" (log: {})", p.display()));
    let Ok(line) = rx.recv_timeout(START_TIMEOUT) else {
        bail!("{name} printed no start-up line within {START_TIMEOUT:?}{where_}");
    };
    let line = serde_json::from_str(line.trim())
        .with_context(|| format!("{name} start-up line {line:?}{where_}"))?;
    Ok(Announced { process, line })
}
