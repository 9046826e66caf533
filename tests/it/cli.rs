//! The binary as an operator meets it: start-up errors that name the field, the announcement
//! line, working dev credentials, the ops endpoints, and a clean exit on SIGTERM.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::support::{bin, echo_upstream, get, start};

#[test]
fn bad_flag_fails_naming_the_field() {
    let out = bin()
        .args(["derp", "--http-addr", "nonsense", "--stun-addr", ""])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("http_addr"), "{err}");
}

#[test]
fn bad_config_file_fails_naming_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.toml");
    std::fs::write(&path, "[relay]\nkeepalive = \"forever\"\n").unwrap();
    let out = bin()
        .args(["derp", "--config", path.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("relay.keepalive"), "{err}");
}

#[test]
fn mesh_with_is_checked_before_start() {
    // derper's rule: peers need the mesh key; and every entry must be a host or a URL.
    for (args, want) in [
        (
            &["--mesh-with", "derp1.example.com"][..],
            "mesh peers need mesh_psk_file",
        ),
        (
            &["--mesh-with", "a,,b", "--mesh-psk-file", "/k"][..],
            "empty entry",
        ),
        (
            &["--mesh-with", "a/b/c", "--mesh-psk-file", "/k"][..],
            "too many components",
        ),
    ] {
        let out = bin()
            .args(["derp", "--key-file", "/k.json", "--check"])
            .args(args)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(64), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("relay.mesh_with") && err.contains(want),
            "{err}"
        );
    }
    let out = bin()
        .args([
            "derp",
            "--key-file",
            "/k.json",
            "--mesh-psk-file",
            "/k",
            "--check",
        ])
        .args(["--mesh-with", "a.example.com,b.example.com:8443/10.0.0.2"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
}

#[test]
fn derp_role_requires_a_key_file() {
    let out = bin()
        .args(["derp", "--http-addr", "127.0.0.1:0", "--stun-addr", ""])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("key_file"));
}

#[test]
fn dev_announces_working_credentials_and_drains_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let creds = dir.path().join("creds.json");
    let mut r = start(&[
        "dev",
        "--http-addr",
        "127.0.0.1:0",
        "--stun-addr",
        "127.0.0.1:0",
        "--credentials",
        creds.to_str().unwrap(),
    ]);
    let line = r.line.clone();
    for field in [
        "base_url",
        "derp_url",
        "agent_id",
        "agent_token",
        "client_token",
        "derp_public_key",
        "stun_addr",
    ] {
        assert!(line[field].is_string(), "missing {field} in {line}");
    }
    let from_file: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&creds).unwrap()).unwrap();
    assert_eq!(from_file, line);

    let addr = line["http_addr"].as_str().unwrap();
    assert_eq!(get(addr, "/healthz", &[]).0, 200);
    assert_eq!(get(addr, "/readyz", &[]).0, 200);
    let (status, metrics) = get(addr, "/metrics", &[]);
    assert_eq!(status, 200);
    for name in [
        "derp_current_connections",
        "derp_packets_dropped",
        "process_resident_memory_bytes",
        "coordinator_peers",
    ] {
        assert!(metrics.contains(name), "{name} missing from /metrics");
    }

    // The generated user token reaches the generated agent: a plain GET (no upgrade) passes
    // auth and the access check and is then refused only for not upgrading (426). A wrong token
    // is a 401, an unknown agent a 404.
    let agent = line["agent_id"].as_str().unwrap();
    let path = format!("/api/v2/workspaceagents/{agent}/coordinate?version=2.0");
    let token = line["client_token"].as_str().unwrap();
    assert_eq!(get(addr, &path, &[("Coder-Session-Token", token)]).0, 426);
    assert_eq!(
        get(
            addr,
            &path,
            &[("Coder-Session-Token", "abcdefghij-0123456789012345678901")]
        )
        .0,
        401
    );
    let agent_token = line["agent_token"].as_str().unwrap();
    assert_eq!(
        get(
            addr,
            "/api/v2/workspaceagents/me/rpc?version=2.0",
            &[("Coder-Session-Token", agent_token)]
        )
        .0,
        426
    );

    // The DERP map names this process's relay.
    let (status, _) = get(addr, "/derp/latency-check", &[]);
    assert_eq!(status, 200);

    let pid = r.child.id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(status) = r.child.try_wait().unwrap() {
            assert!(status.success(), "exit status {status}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "tailnetd did not exit after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn coordinator_role_serves_no_relay() {
    let r = start(&["coordinator", "--http-addr", "127.0.0.1:0"]);
    assert!(r.line["derp_public_key"].is_null());
    assert!(r.line["stun_addr"].is_null());
    let addr = r.line["http_addr"].as_str().unwrap();
    assert_eq!(get(addr, "/healthz", &[]).0, 200);
    assert_eq!(
        get(
            addr,
            "/derp",
            &[("Upgrade", "DERP"), ("Connection", "Upgrade")]
        )
        .0,
        404
    );
}

#[test]
fn derp_role_keeps_its_key_across_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("derp.key");
    let args = [
        "derp",
        "--http-addr",
        "127.0.0.1:0",
        "--stun-addr",
        "",
        "--key-file",
        key.to_str().unwrap(),
    ];
    let first = start(&args).line["derp_public_key"].clone();
    let second = start(&args).line["derp_public_key"].clone();
    assert!(first.is_string());
    assert_eq!(first, second);
    let text = std::fs::read_to_string(&key).unwrap();
    assert!(text.contains("\"PrivateKey\""), "{text}");
    assert!(text.contains("privkey:"), "{text}");
}

#[test]
fn upstream_flag_proxies_what_tailnetd_does_not_own() {
    let up = echo_upstream();
    let r = start(&[
        "coordinator",
        "--http-addr",
        "127.0.0.1:0",
        "--upstream",
        &format!("http://{up}"),
    ]);
    let addr = r.line["http_addr"].as_str().unwrap();
    let (status, body) = get(addr, "/api/v2/buildinfo?x=1", &[]);
    assert_eq!(status, 200);
    assert_eq!(body, "GET /api/v2/buildinfo?x=1 HTTP/1.1|xff=true");
    // Owned routes stay local.
    assert_eq!(get(addr, "/healthz", &[]).0, 200);
}

#[test]
fn dead_upstream_is_a_502_with_coders_error_shape() {
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().to_string()
    };
    let r = start(&[
        "coordinator",
        "--http-addr",
        "127.0.0.1:0",
        "--upstream",
        &format!("http://{dead}"),
        "--upstream-connect-timeout",
        "2s",
    ]);
    let addr = r.line["http_addr"].as_str().unwrap();
    let (status, body) = get(addr, "/api/v2/users/me", &[]);
    assert_eq!(status, 502);
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert!(v["message"].is_string(), "{body}");
    // Auth needs the upstream too: a new session gets 503, not 401.
    let (status, _) = get(
        addr,
        "/api/v2/workspaceagents/me/rpc",
        &[(
            "Coder-Session-Token",
            "9a3b4c5d-0000-4000-8000-000000000001",
        )],
    );
    assert_eq!(status, 503);
}

/// Regression (found by the Coder interop suite): with stderr closed by a dead supervisor, log
/// lines written while draining must not panic the process; SIGTERM still exits 0.
#[test]
fn sigterm_with_closed_stderr_exits_cleanly() {
    let mut child = bin()
        .args([
            "dev",
            "--http-addr",
            "127.0.0.1:0",
            "--stun-addr",
            "127.0.0.1:0",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    assert!(!line.is_empty());
    drop(child.stderr.take());
    let pid = child.id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            assert_eq!(status.code(), Some(0), "exit status {status}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "tailnetd did not exit after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}
