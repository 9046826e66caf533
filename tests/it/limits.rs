//! What one client can cost the process (issue 14): relay connections stop at the relay's cap
//! while health and coordination requests are still served, the cap stays below the process's
//! open-file limit, and a per-source-address cap leaves room for other addresses.
//!
//! Clients bind 127.0.0.2, 127.0.0.3, ... as source addresses; nothing leaves loopback.

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::time::Duration;

use crate::support::{bin, get, Running};

/// Starts `tailnetd dev` on port 0, optionally under an open-file limit (soft = hard).
fn start_dev(nofile: Option<u32>, extra: &[&str]) -> Running {
    start_dev_logging(nofile, extra, std::process::Stdio::null())
}

/// [`start_dev`] with its log (stderr) going to `log`.
fn start_dev_logging(nofile: Option<u32>, extra: &[&str], log: std::process::Stdio) -> Running {
    use std::io::BufRead;
    let mut cmd = match nofile {
        Some(n) => {
            let mut c = std::process::Command::new("prlimit");
            c.arg(format!("--nofile={n}:{n}"))
                .arg(env!("CARGO_BIN_EXE_tailnetd"))
                .env("TAILNETD_METRICS_ADDR", "127.0.0.1:0");
            c
        }
        None => bin(),
    };
    let mut child = cmd
        .args(["dev", "--http-addr", "127.0.0.1:0", "--stun-addr", ""])
        .args(extra)
        .stdout(std::process::Stdio::piped())
        .stderr(log)
        .spawn()
        .unwrap();
    let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    assert!(!line.is_empty(), "tailnetd exited without announcing");
    Running {
        child,
        line: serde_json::from_str(&line).unwrap(),
    }
}

fn http_addr(r: &Running) -> SocketAddr {
    r.line["http_addr"].as_str().unwrap().parse().unwrap()
}

/// Connects from `source` (a 127.x address) to `to`.
fn connect_from(source: IpAddr, to: SocketAddr) -> std::io::Result<TcpStream> {
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
    sock.bind(&SocketAddr::new(source, 0).into())?;
    sock.connect_timeout(&to.into(), Duration::from_secs(5))?;
    let s: TcpStream = sock.into();
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    Ok(s)
}

/// What became of one DERP upgrade request.
#[derive(Debug)]
enum Upgrade {
    /// `101 Switching Protocols`: a relay connection (kept open in the stream).
    Relay(#[allow(dead_code)] TcpStream),
    /// An HTTP answer other than 101 (its status).
    Refused(u16),
    /// Closed (or reset) without an answer.
    Closed,
}

fn derp_upgrade(source: IpAddr, to: SocketAddr) -> Upgrade {
    derp_upgrade_forwarded(source, to, None)
}

/// A DERP upgrade from `source`, with `X-Forwarded-For: forwarded_for` when given.
fn derp_upgrade_forwarded(source: IpAddr, to: SocketAddr, forwarded_for: Option<&str>) -> Upgrade {
    let Ok(mut s) = connect_from(source, to) else {
        return Upgrade::Closed;
    };
    let xff = forwarded_for
        .map(|v| format!("X-Forwarded-For: {v}\r\n"))
        .unwrap_or_default();
    let req = format!(
        "GET /derp HTTP/1.1\r\nHost: {to}\r\nUpgrade: DERP\r\nConnection: Upgrade\r\n{xff}\r\n"
    );
    if s.write_all(req.as_bytes()).is_err() {
        return Upgrade::Closed;
    }
    let mut head = [0u8; 12];
    match s.read_exact(&mut head) {
        Ok(()) => match std::str::from_utf8(&head[9..12]).unwrap().parse().unwrap() {
            101 => Upgrade::Relay(s),
            status => Upgrade::Refused(status),
        },
        Err(_) => Upgrade::Closed,
    }
}

/// A WebSocket handshake on `path` with a Coder session token; returns the answer's status.
fn websocket_dial(to: SocketAddr, path: &str, token: &str) -> u16 {
    let mut s = connect_from(ip("127.0.0.1"), to).unwrap();
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: {to}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
         Coder-Session-Token: {token}\r\n\r\n"
    );
    s.write_all(req.as_bytes()).unwrap();
    let mut head = [0u8; 12];
    s.read_exact(&mut head).unwrap();
    std::str::from_utf8(&head[9..12]).unwrap().parse().unwrap()
}

fn ip(text: &str) -> IpAddr {
    text.parse().unwrap()
}

/// Finding 2: at the relay's cap (per-address cap off), a new relay upgrade is answered 503 and
/// closed, while health, readiness and a coordinator request are still served.
#[test]
fn limits_relay_cap_leaves_health_and_coordination_served() {
    let dev = start_dev(
        None,
        &[
            "--relay-max-connections",
            "5",
            "--relay-max-connections-per-ip",
            "0",
        ],
    );
    let addr = http_addr(&dev);
    let held: Vec<Upgrade> = (0..5)
        .map(|_| derp_upgrade(ip("127.0.0.2"), addr))
        .collect();
    assert!(
        held.iter().all(|u| matches!(u, Upgrade::Relay(_))),
        "{held:?}"
    );
    let over = derp_upgrade(ip("127.0.0.2"), addr);
    assert!(matches!(over, Upgrade::Refused(503)), "{over:?}");
    let a = addr.to_string();
    assert_eq!(get(&a, "/healthz", &[]).0, 200);
    assert_eq!(get(&a, "/readyz", &[]).0, 200);
    let token = dev.line["agent_token"].as_str().unwrap().to_string();
    assert_eq!(
        websocket_dial(addr, "/api/v2/workspaceagents/me/coordinate", &token),
        101,
        "the agent's coordinator dial was not served"
    );
    drop(held);
}

/// Finding 2: under a small open-file limit the relay's cap is lowered below it, so a flood of
/// relay connections never makes accept fail: health is still served.
#[test]
fn limits_open_file_limit_bounds_the_relay() {
    let dev = start_dev(Some(256), &["--relay-max-connections-per-ip", "0"]);
    let addr = http_addr(&dev);
    let mut relays = 0;
    let mut held = Vec::new();
    for _ in 0..320 {
        match derp_upgrade(ip("127.0.0.2"), addr) {
            u @ Upgrade::Relay(_) => {
                relays += 1;
                held.push(u);
            }
            Upgrade::Refused(503) => {}
            other => panic!("unexpected answer {other:?} after {relays} relay connections"),
        }
    }
    assert!(relays > 0 && relays < 256, "{relays} relay connections");
    let (status, body) = get(&addr.to_string(), "/healthz", &[]);
    assert_eq!((status, body.as_str()), (200, "ok\n"));
    drop(held);
}

/// The listeners share one descriptor pool: with an HTTPS listener beside the HTTP one, relay
/// connections on the HTTP listener alone still reach the relay's cap (an even split between the
/// listeners stopped them at (256 - 64) / 2 = 96 of the 128, closing the rest at accept).
#[test]
fn limits_listeners_share_the_descriptor_pool() {
    let dir = tempfile::tempdir().unwrap();
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let (cert_path, key_path) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::write(&cert_path, cert.cert.pem()).unwrap();
    std::fs::write(&key_path, cert.key_pair.serialize_pem()).unwrap();
    let dev = start_dev(
        Some(256),
        &[
            "--relay-max-connections-per-ip",
            "0",
            "--https-addr",
            "127.0.0.1:0",
            "--tls-cert",
            cert_path.to_str().unwrap(),
            "--tls-key",
            key_path.to_str().unwrap(),
        ],
    );
    assert!(dev.line["https_addr"].is_string(), "{}", dev.line);
    let addr = http_addr(&dev);
    // Under 256 descriptors: reserve R = 64, relay cap 256 - 2R = 128, listeners 256 - R = 192.
    let mut held = Vec::new();
    let mut answers = Vec::new();
    for _ in 0..160 {
        match derp_upgrade(ip("127.0.0.2"), addr) {
            u @ Upgrade::Relay(_) => held.push(u),
            other => answers.push(format!("{other:?}")),
        }
    }
    assert_eq!(held.len(), 128, "relay connections; then {answers:?}");
    assert!(answers.iter().all(|a| a == "Refused(503)"), "{answers:?}");
    drop(held);
}

/// Finding 2: one address reaches the per-address cap; a second address still gets a relay
/// connection.
#[test]
fn limits_per_address_cap_leaves_room_for_others() {
    let dev = start_dev(None, &["--relay-max-connections-per-ip", "3"]);
    let addr = http_addr(&dev);
    let held: Vec<Upgrade> = (0..3)
        .map(|_| derp_upgrade(ip("127.0.0.2"), addr))
        .collect();
    assert!(
        held.iter().all(|u| matches!(u, Upgrade::Relay(_))),
        "{held:?}"
    );
    let over = derp_upgrade(ip("127.0.0.2"), addr);
    assert!(matches!(over, Upgrade::Closed), "{over:?}");
    let other = derp_upgrade(ip("127.0.0.3"), addr);
    assert!(matches!(other, Upgrade::Relay(_)), "{other:?}");
    let metrics = get(&addr.to_string(), "/metrics", &[]).1;
    assert!(
        metrics.lines().any(
            |l| l.starts_with("derp_listener_rejected_connections_total")
                && l.contains("per_ip_cap")
        ),
        "no per-address rejection counted"
    );
    drop(held);
}

/// Finding 5: failed unauthenticated DERP handshakes are logged at debug, with a rate-limited
/// summary at info, so a client cannot turn each failed connection into an INFO line.
#[test]
fn limits_failed_handshakes_do_not_amplify_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let log_path = dir.path().join("log");
    let log = std::fs::File::create(&log_path).unwrap();
    let mut dev = start_dev_logging(None, &[], log.into());
    let addr = http_addr(&dev);
    let attempts = 40;
    for _ in 0..attempts {
        let Upgrade::Relay(mut s) = derp_upgrade(ip("127.0.0.2"), addr) else {
            panic!("no relay connection");
        };
        // Not a ClientInfo frame: the handshake fails at once.
        s.write_all(&[0xff; 64]).unwrap();
        let mut sink = Vec::new();
        let _ = s.read_to_end(&mut sink);
    }
    std::thread::sleep(Duration::from_millis(300));
    let _ = dev.child.kill();
    let _ = dev.child.wait();
    let text = std::fs::read_to_string(&log_path).unwrap();
    let lines = text
        .lines()
        .filter(|l| l.contains("INFO") && l.contains("127.0.0.2"))
        .count();
    assert!(
        lines <= 2,
        "{lines} INFO lines for {attempts} failed handshakes:\n{text}"
    );
}

/// Finding 2 with a proxy in front: the per-address cap applies to the address tailnetd trusts.
/// Behind a trusted proxy (`upstream.trusted_proxies`), two clients with different
/// `X-Forwarded-For` are counted separately and one client reaches its own cap (429); a peer that
/// is not trusted is counted by its own address whatever `X-Forwarded-For` it sends.
#[test]
fn limits_per_address_cap_counts_the_forwarded_client_behind_a_trusted_proxy() {
    let dev = start_dev(
        None,
        &[
            "--relay-max-connections-per-ip",
            "2",
            "--upstream-trusted-proxies",
            "127.0.0.2",
        ],
    );
    let addr = http_addr(&dev);
    let proxy = ip("127.0.0.2");
    // Two connections each for two clients behind the proxy: four relay connections from one
    // TCP peer address, twice the per-address cap.
    let mut held = Vec::new();
    for client in ["198.51.100.1", "198.51.100.2"] {
        for _ in 0..2 {
            let u = derp_upgrade_forwarded(proxy, addr, Some(client));
            assert!(matches!(u, Upgrade::Relay(_)), "{client}: {u:?}");
            held.push(u);
        }
    }
    // A third for the first client is over its cap: 429, counted.
    let over = derp_upgrade_forwarded(proxy, addr, Some("198.51.100.1"));
    assert!(matches!(over, Upgrade::Refused(429)), "{over:?}");
    // Only the rightmost untrusted hop counts: a client cannot pick its own address by
    // prepending one (198.51.100.1 is still the one the proxy saw).
    let spoofed = derp_upgrade_forwarded(proxy, addr, Some("203.0.113.7, 198.51.100.1"));
    assert!(matches!(spoofed, Upgrade::Refused(429)), "{spoofed:?}");
    let metrics = get(&addr.to_string(), "/metrics", &[]).1;
    let rejected = |reason: &str| -> f64 {
        metrics
            .lines()
            .filter(|l| {
                l.starts_with("derp_listener_rejected_connections_total")
                    && l.contains(&format!("reason=\"{reason}\""))
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    assert_eq!(rejected("per_ip_cap"), 2.0, "{metrics}");

    // An untrusted peer's X-Forwarded-For is ignored: it is counted by its own address.
    let untrusted = ip("127.0.0.3");
    let mut mine = Vec::new();
    for client in ["198.51.100.10", "198.51.100.11"] {
        let u = derp_upgrade_forwarded(untrusted, addr, Some(client));
        assert!(matches!(u, Upgrade::Relay(_)), "{u:?}");
        mine.push(u);
    }
    let over = derp_upgrade_forwarded(untrusted, addr, Some("198.51.100.12"));
    assert!(matches!(over, Upgrade::Closed), "{over:?}");
    let metrics = get(&addr.to_string(), "/metrics", &[]).1;
    let rejected_now: f64 = metrics
        .lines()
        .filter(|l| {
            l.starts_with("derp_listener_rejected_connections_total")
                && l.contains("reason=\"per_ip_cap\"")
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert_eq!(rejected_now, 3.0, "{metrics}");
    // Closing one of the first client's connections gives its place back.
    held.remove(0);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let again = loop {
        match derp_upgrade_forwarded(proxy, addr, Some("198.51.100.1")) {
            u @ Upgrade::Relay(_) => break u,
            other if std::time::Instant::now() > deadline => panic!("{other:?}"),
            _ => std::thread::sleep(Duration::from_millis(50)),
        }
    };
    drop((held, mine, again));
}
