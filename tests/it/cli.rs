//! The binary as an operator meets it: start-up errors that name the field, the announcement
//! line, working dev credentials, the ops endpoints, and a clean exit on SIGTERM.

use std::time::{Duration, Instant};

use crate::support::{
    bin, echo_upstream, get, sigterm, start, start_dev_json_logs, start_with_logs, wait_exit,
};

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
    let unknown =
        "/api/v2/workspaceagents/3f2a9c4e-8b1d-4e6f-9a0b-1c2d3e4f5a6b/coordinate?version=2.0";
    let (status, body) = get(addr, unknown, &[("Coder-Session-Token", token)]);
    assert_eq!(status, 404, "{body}");
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

    sigterm(&r);
    wait_exit(&mut r, Duration::from_secs(20));
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
    let mut r = start_with_logs(&[
        "dev",
        "--http-addr",
        "127.0.0.1:0",
        "--stun-addr",
        "127.0.0.1:0",
    ]);
    drop(r.child.stderr.take());
    sigterm(&r);
    wait_exit(&mut r, Duration::from_secs(20));
}

/// SIGTERM turns `/readyz` to 503 first; for `drain_pause` everything else is still served (a
/// load balancer moves traffic away before anything closes), then the drain runs.
#[test]
fn sigterm_turns_readiness_off_and_serves_through_the_pause() {
    let mut r = start(&["dev", "--http-addr", "127.0.0.1:0", "--drain-pause", "3s"]);
    let addr = r.line["http_addr"].as_str().unwrap().to_string();
    assert_eq!(get(&addr, "/readyz", &[]).0, 200);
    sigterm(&r);
    let signalled = Instant::now();
    let deadline = signalled + Duration::from_secs(2);
    while get(&addr, "/readyz", &[]).0 != 503 {
        assert!(Instant::now() < deadline, "/readyz still 200 after SIGTERM");
        std::thread::sleep(Duration::from_millis(10));
    }
    // Inside the pause: health, the relay and coordination are served as before; only the
    // relay's probe says "draining" (region health moves peers away on it).
    assert_eq!(get(&addr, "/healthz", &[]).0, 200);
    assert_eq!(get(&addr, "/derp", &[]).0, 426);
    assert_eq!(
        get(&addr, "/derp/probe", &[]),
        (503, "draining\n".to_string())
    );
    let agent = r.line["agent_id"].as_str().unwrap().to_string();
    let token = r.line["client_token"].as_str().unwrap().to_string();
    let path = format!("/api/v2/workspaceagents/{agent}/coordinate?version=2.0");
    assert_eq!(get(&addr, &path, &[("Coder-Session-Token", &token)]).0, 426);
    assert!(
        r.child.try_wait().unwrap().is_none(),
        "exited inside the pause"
    );
    wait_exit(&mut r, Duration::from_secs(15));
    assert!(
        signalled.elapsed() >= Duration::from_secs(3),
        "the drain began before the pause ended ({:?})",
        signalled.elapsed()
    );
}

/// A second signal ends the pause at once (an operator's Ctrl-C twice).
#[test]
fn second_signal_cuts_the_drain_pause_short() {
    let mut r = start(&["dev", "--http-addr", "127.0.0.1:0", "--drain-pause", "120s"]);
    let addr = r.line["http_addr"].as_str().unwrap().to_string();
    sigterm(&r);
    let deadline = Instant::now() + Duration::from_secs(2);
    while get(&addr, "/readyz", &[]).0 != 503 {
        assert!(Instant::now() < deadline, "/readyz still 200 after SIGTERM");
        std::thread::sleep(Duration::from_millis(10));
    }
    sigterm(&r);
    wait_exit(&mut r, Duration::from_secs(20));
}

/// The pause is on by default where a load balancer is in front, off for `dev`.
#[test]
fn drain_pause_defaults_by_role() {
    for (role, want) in [
        ("dev", "0s"),
        ("derp", "5s"),
        ("coordinator", "5s"),
        ("serve", "5s"),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("derp.key");
        let mut args = vec![role, "--check"];
        if role == "serve" {
            args.extend(["--upstream", "http://127.0.0.1:1"]);
        }
        if role == "serve" || role == "derp" {
            args.extend(["--key-file", key.to_str().unwrap()]);
        }
        let out = bin()
            .env_remove("TAILNETD_DRAIN_PAUSE")
            .args(&args)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        let line = text
            .lines()
            .find(|l| l.contains("drain_pause"))
            .unwrap_or_else(|| panic!("{role} --check: no drain_pause in {text}"));
        assert!(line.contains(want), "{role}: {line}");
    }
}

/// `--log-format json`: every line on stderr is one JSON object with the fields a log shipper
/// indexes (timestamp, level, target, fields.message), and no line carries a token, even after
/// requests that presented one.
#[test]
fn json_logs_are_one_object_per_line_and_never_carry_tokens() {
    let mut r = start_dev_json_logs();
    let announced = r.line.clone();
    let addr = announced["http_addr"].as_str().unwrap();
    let token = announced["client_token"].as_str().unwrap();
    let agent = announced["agent_id"].as_str().unwrap();
    let path = format!("/api/v2/workspaceagents/{agent}/coordinate?version=2.0");
    assert_eq!(get(addr, &path, &[("Coder-Session-Token", token)]).0, 426);
    assert_eq!(
        get(
            addr,
            &path,
            &[("Coder-Session-Token", "wrongwrong-0123456789012345678901")]
        )
        .0,
        401
    );
    sigterm(&r);
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut r.child.stderr.take().unwrap(), &mut stderr).unwrap();
    wait_exit(&mut r, Duration::from_secs(20));
    let lines: Vec<&str> = stderr.lines().collect();
    assert!(lines.len() >= 2, "expected start and drain lines: {stderr}");
    for l in &lines {
        let v: serde_json::Value =
            serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}"));
        assert!(v["timestamp"].is_string(), "{l}");
        assert!(v["level"].is_string(), "{l}");
        assert!(v["target"].is_string(), "{l}");
        assert!(v["fields"]["message"].is_string(), "{l}");
        assert!(
            !l.contains(token),
            "a log line carries the session token: {l}"
        );
        assert!(
            !l.contains("wrongwrong"),
            "a log line carries a presented token: {l}"
        );
    }
    assert!(
        lines.iter().any(|l| l.contains("draining")),
        "no drain line: {stderr}"
    );
}
