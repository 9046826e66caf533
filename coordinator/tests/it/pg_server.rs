//! A throwaway PostgreSQL server for one test: initdb and postgres (as the `postgres` user when
//! run as root: PostgreSQL refuses root) on a temp directory and a free port, trust auth, no
//! fsync. Shared by the coordinator's replica tests (`ha.rs`) and the binary's (`replicas.rs`,
//! through `#[path]`), so it needs nothing but std and tempfile. Binaries: `$PG_BIN_DIR`, else
//! the newest `/usr/lib/postgresql/*/bin` (scripts/test.sh installs PostgreSQL when absent).

#![allow(dead_code)]

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct PgServer {
    pub bin: PathBuf,
    pub data: PathBuf,
    _dir: tempfile::TempDir,
    pub port: u16,
    child: Option<Child>,
}

fn pg_bin_dir() -> PathBuf {
    if let Ok(d) = std::env::var("PG_BIN_DIR") {
        return PathBuf::from(d);
    }
    let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.path().join("bin"))
                .collect()
        })
        .unwrap_or_default();
    found.retain(|p| p.join("postgres").exists());
    found.sort();
    found.pop().unwrap_or_else(|| {
        panic!(
            "PostgreSQL server binaries not found (set PG_BIN_DIR or install PostgreSQL, e.g. \
             `apt-get install postgresql`; scripts/test.sh installs it)"
        )
    })
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// `cmd args…`, as the `postgres` user when running as root (PostgreSQL refuses root).
pub fn pg_command(bin: &std::path::Path, args: &[&str]) -> Command {
    if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(bin).args(args);
        c
    } else {
        let mut c = Command::new(bin);
        c.args(args);
        c
    }
}

impl PgServer {
    pub fn start() -> PgServer {
        let bin = pg_bin_dir();
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        if is_root() {
            let ok = Command::new("chown")
                .args(["postgres:postgres"])
                .arg(dir.path())
                .status()
                .unwrap()
                .success();
            assert!(ok, "chown of the PostgreSQL temp dir failed");
        }
        let st = pg_command(
            &bin.join("initdb"),
            &[
                "-D",
                data.to_str().unwrap(),
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
                "--no-sync",
            ],
        )
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap();
        assert!(st.success(), "initdb failed");
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut s = PgServer {
            bin,
            data,
            _dir: dir,
            port,
            child: None,
        };
        s.run();
        s
    }

    pub fn run(&mut self) {
        let child = pg_command(
            &self.bin.join("postgres"),
            &[
                "-D",
                self.data.to_str().unwrap(),
                "-p",
                &self.port.to_string(),
                "-k",
                self.data.to_str().unwrap(),
                "-c",
                "listen_addresses=127.0.0.1",
                "-c",
                "fsync=off",
                "-c",
                "max_connections=200",
            ],
        )
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < deadline, "postgres did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        // TCP is accepted slightly before sessions are.
        while !Command::new(self.bin.join("pg_isready"))
            .args([
                "-q",
                "-h",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-U",
                "postgres",
            ])
            .status()
            .is_ok_and(|s| s.success())
        {
            assert!(
                Instant::now() < deadline,
                "postgres did not accept sessions"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn url(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.port)
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        let _ = pg_command(
            &self.bin.join("pg_ctl"),
            &["-D", self.data.to_str().unwrap(), "stop", "-m", "immediate"],
        )
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
        if let Some(mut c) = self.child.take() {
            let _ = c.wait();
        }
    }
}

impl PgServer {
    /// Stops the server (`fast`: graceful; `immediate`: a crash, which truncates UNLOGGED tables
    /// at the next start) and starts it again on the same port.
    pub fn restart(&mut self, mode: &str) {
        let st = pg_command(
            &self.bin.join("pg_ctl"),
            &["-D", self.data.to_str().unwrap(), "stop", "-m", mode],
        )
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap();
        assert!(st.success(), "pg_ctl stop -m {mode} failed");
        if let Some(mut c) = self.child.take() {
            let _ = c.wait();
        }
        self.run();
    }
}
