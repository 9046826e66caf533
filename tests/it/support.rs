//! What the integration tests share: starting the binary, reading its announcement line, a
//! minimal HTTP client and a stand-in upstream.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The binary, with its metrics listener and STUN socket on free ports (tests run several
/// processes at once, and the defaults are fixed ports), no readiness-off pause before a drain,
/// and no relay probing (configuration examples name hosts that must not be dialled); flags
/// still win over all four.
pub fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_tailnetd"));
    c.env("TAILNETD_METRICS_ADDR", "127.0.0.1:0")
        .env("TAILNETD_STUN_ADDR", "127.0.0.1:0")
        .env("TAILNETD_DRAIN_PAUSE", "0s")
        .env("TAILNETD_DERP_MAP_HEALTH_INTERVAL", "0s");
    c
}

pub struct Running {
    pub child: Child,
    pub line: serde_json::Value,
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts the binary with `args` and reads its announcement line; its logs are discarded.
pub fn start(args: &[&str]) -> Running {
    spawn_announced(args, Stdio::null())
}

/// As [`start`], with stderr (the logs) piped for the test to read: `child.stderr`.
pub fn start_with_logs(args: &[&str]) -> Running {
    spawn_announced(args, Stdio::piped())
}

/// `tailnetd dev` on a free HTTP port, without STUN, logging JSON lines to a piped stderr.
pub fn start_dev_json_logs() -> Running {
    start_with_logs(&[
        "dev",
        "--http-addr",
        "127.0.0.1:0",
        "--stun-addr",
        "",
        "--log-format",
        "json",
    ])
}

fn spawn_announced(args: &[&str], stderr: Stdio) -> Running {
    let mut child = bin()
        .args(args)
        .stdout(Stdio::piped())
        .stderr(stderr)
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    assert!(!line.is_empty(), "tailnetd exited without announcing");
    Running {
        child,
        line: serde_json::from_str(&line).unwrap(),
    }
}

/// A minimal HTTP/1.1 GET returning (status, body), so these tests need no HTTP client crate.
pub fn get(addr: &str, path: &str, headers: &[(&str, &str)]) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    let status = resp[9..12].parse().unwrap();
    let body = resp.split("\r\n\r\n").nth(1).unwrap_or("").to_string();
    (status, body)
}

/// A one-thread HTTP upstream that answers every request with its request line, so a test can
/// see what reached it.
pub fn echo_upstream() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        for conn in l.incoming() {
            let Ok(mut c) = conn else { return };
            let mut buf = [0u8; 8192];
            let n = c.read(&mut buf).unwrap_or(0);
            let head = String::from_utf8_lossy(&buf[..n]).to_string();
            let first = head.lines().next().unwrap_or("").to_string();
            let forwarded = head
                .lines()
                .any(|l| l.to_ascii_lowercase().starts_with("x-forwarded-for:"));
            let body = format!("{first}|xff={forwarded}");
            let _ = write!(
                c,
                "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    addr
}

/// Sends SIGTERM to the running binary.
pub fn sigterm(r: &Running) {
    let pid = r.child.id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
}

/// Waits for the exit and returns how long it took.
pub fn wait_exit(r: &mut Running, within: Duration) -> Duration {
    let start = Instant::now();
    loop {
        if let Some(status) = r.child.try_wait().unwrap() {
            assert!(status.success(), "exit status {status}");
            return start.elapsed();
        }
        assert!(
            start.elapsed() < within,
            "tailnetd did not exit within {within:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}
