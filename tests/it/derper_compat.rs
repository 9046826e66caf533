//! derper's command lines, unchanged, with `tailnetd derp`: the documented manual-certificate
//! line through `--check` and through a real start, the `-certmode=letsencrypt` line mapped to
//! the ACME settings (issuance itself: interop/acme with Pebble), flags whose feature tailnetd lacks failing
//! with the flag's name, `-rate-config` with its SIGHUP reload, and the accept-rate flags.

use std::io::{Read, Write};
use std::process::Command;
use std::time::Duration;

use derp::{dial, DialOptions, ReceivedFrame};
use proto::key::NodePrivate;

use crate::support::{bin, get, start};

/// Writes `DIR/<host>.crt` and `DIR/<host>.key` the way `-certmode=manual` expects them.
fn manual_cert(dir: &std::path::Path, host: &str) {
    let ck = rcgen::generate_simple_self_signed(vec![host.to_string()]).unwrap();
    std::fs::write(dir.join(format!("{host}.crt")), ck.cert.pem()).unwrap();
    std::fs::write(dir.join(format!("{host}.key")), ck.key_pair.serialize_pem()).unwrap();
}

/// `tailnetd ARGS --check`: (exit code, stdout, stderr).
fn check(args: &[&str]) -> (i32, String, String) {
    let out = bin().args(args).arg("--check").output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

#[test]
fn derper_readme_manual_cert_line_checks() {
    let dir = tempfile::tempdir().unwrap();
    manual_cert(dir.path(), "derp.example.com");
    let d = dir.path().display();
    // The command line of derper's documentation, only the paths changed.
    let (code, out, err) = check(&[
        "derp",
        "-hostname=derp.example.com",
        &format!("-c={d}/derper.key"),
        "-a=:443",
        "-stun-port=3478",
        "-certmode=manual",
        &format!("-certdir={d}"),
    ]);
    assert_eq!(code, 0, "{err}");
    for line in [
        "https_addr = \":443\"  # flag".to_string(),
        "http_addr = \":80\"  # flag".to_string(),
        "stun_addr = \":3478\"  # flag".to_string(),
        format!("tls_cert = \"{d}/derp.example.com.crt\"  # flag"),
        format!("tls_key = \"{d}/derp.example.com.key\"  # flag"),
        format!("key_file = \"{d}/derper.key\"  # flag"),
    ] {
        assert!(out.contains(&line), "{line} missing from:\n{out}");
    }
    // Go's other spellings of the same flags mean the same.
    let (code, out2, err) = check(&[
        "derp",
        "--hostname",
        "derp.example.com",
        "-c",
        &format!("{d}/derper.key"),
        "--a=:443",
        "-stun-port",
        "3478",
        "--certmode",
        "manual",
        "-certdir",
        &d.to_string(),
    ]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out, out2);
}

#[test]
fn derper_letsencrypt_line_checks() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().display();
    // derper's default certmode is letsencrypt, and -a defaults to :443: ACME for -hostname,
    // kept in -certdir, the HTTP listener on :80.
    let (code, out, err) = check(&[
        "derp",
        "-hostname=derp.example.com",
        &format!("-c={d}/derper.key"),
        &format!("-certdir={d}"),
        "-acme-email=ops@example.com",
    ]);
    assert_eq!(code, 0, "{err}");
    for line in [
        "https_addr = \":443\"  # flag".to_string(),
        "http_addr = \":80\"  # flag".to_string(),
        "hostname = \"derp.example.com\"  # flag".to_string(),
        format!("cert_dir = \"{d}\"  # flag"),
        "email = \"ops@example.com\"  # flag".to_string(),
        "directory_url = \"https://acme-v02.api.letsencrypt.org/directory\"  # default".to_string(),
        "challenge = \"tls-alpn-01\"  # default".to_string(),
    ] {
        assert!(out.contains(&line), "{line} missing from:\n{out}");
    }
}

#[test]
fn derper_flags_tailnetd_lacks_fail_naming_the_flag() {
    for (args, flag) in [
        // Google's CA needs External Account Binding.
        (
            vec![
                "derp",
                "-certmode=gcp",
                "-hostname=derp.example.com",
                "-c=/tmp/k",
            ],
            "-certmode=gcp",
        ),
        (
            vec!["derp", "-verify-clients", "-a=:3340", "-c=/tmp/k"],
            "-verify-clients=true",
        ),
        (
            vec![
                "derp",
                "-a=:3340",
                "-c=/tmp/k",
                "-bootstrap-dns-names=x.example",
            ],
            "-bootstrap-dns-names=x.example",
        ),
        (vec!["derp", "-dev"], "-dev=true"),
    ] {
        let (code, _, err) = check(&args);
        assert_eq!(code, 64, "{args:?}: {err}");
        assert!(err.contains(flag), "{args:?}: {err}");
    }
}

#[test]
fn derper_command_line_starts_a_tls_relay() {
    let dir = tempfile::tempdir().unwrap();
    manual_cert(dir.path(), "127.0.0.1");
    let d = dir.path().display().to_string();
    let r = start(&[
        "derp",
        "-hostname=127.0.0.1",
        &format!("-c={d}/derper.key"),
        "-a=127.0.0.1:0",
        "-http-port=-1",
        "-stun-port=0",
        "-certmode=manual",
        &format!("-certdir={d}"),
    ]);
    assert!(r.line["http_addr"].is_null(), "{}", r.line);
    assert!(r.line["stun_addr"].is_string(), "{}", r.line);
    let https = r.line["https_addr"].as_str().unwrap().to_string();
    // derper's key file format, created on first start.
    let key_json = std::fs::read_to_string(dir.path().join("derper.key")).unwrap();
    assert!(key_json.contains("privkey:"), "{key_json}");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut opts = DialOptions::new(NodePrivate::generate(&mut rand::rngs::OsRng));
        opts.tls.insecure_skip_verify = true;
        opts.timeout = Duration::from_secs(10);
        let mut d = dial(&format!("https://{https}/derp"), opts).await.unwrap();
        assert!(d.tls_version.is_some());
        let first = tokio::time::timeout(Duration::from_secs(10), d.client.recv())
            .await
            .unwrap()
            .unwrap();
        assert!(matches!(first, ReceivedFrame::ServerInfo(_)), "{first:?}");
    });
}

fn metric(metrics_addr: &str, series: &str) -> Option<f64> {
    let (_, text) = get(metrics_addr, "/metrics", &[]);
    text.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|r| r.strip_prefix(' ')))
        .and_then(|v| v.trim().parse().ok())
}

#[test]
fn derper_rate_config_flag_loads_and_reloads_on_sighup() {
    let dir = tempfile::tempdir().unwrap();
    let rc = dir.path().join("rate.json");
    std::fs::write(&rc, r#"{"PerClientRateLimitBytesPerSec":1000000}"#).unwrap();
    let key = dir.path().join("derper.key");
    let r = start(&[
        "derp",
        "-a=127.0.0.1:0",
        "-stun=false",
        &format!("-c={}", key.display()),
        &format!("-rate-config={}", rc.display()),
    ]);
    let m = r.line["metrics_addr"].as_str().unwrap().to_string();
    assert_eq!(
        metric(&m, "derp_rate_limit_per_client_bytes_per_second"),
        Some(1e6)
    );
    assert_eq!(
        metric(&m, "derp_rate_limit_per_client_burst_bytes"),
        Some(65568.0)
    );
    std::fs::write(
        &rc,
        r#"{"PerClientRateLimitBytesPerSec":2000000,"PerClientRateBurstBytes":100000}"#,
    )
    .unwrap();
    let pid = r.child.id().to_string();
    assert!(Command::new("kill")
        .args(["-HUP", &pid])
        .status()
        .unwrap()
        .success());
    let mut reloaded = false;
    for _ in 0..100 {
        if metric(&m, "derp_rate_limit_per_client_burst_bytes") == Some(100000.0) {
            reloaded = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(reloaded, "SIGHUP did not reload the rate config");
    assert_eq!(
        metric(&m, "derp_rate_limit_per_client_bytes_per_second"),
        Some(2e6)
    );
    // A broken file stops the start, naming the setting (derper: "loading rate config").
    std::fs::write(&rc, "{").unwrap();
    let out = bin()
        .args([
            "derp",
            "-a=127.0.0.1:0",
            "-stun=false",
            &format!("-c={}", key.display()),
            &format!("-rate-config={}", rc.display()),
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("relay.rate_config (--rate-config)"), "{err}");
}

#[test]
fn derper_accept_connection_limit_flags_close_excess_connections() {
    let dir = tempfile::tempdir().unwrap();
    let r = start(&[
        "derp",
        "-a=127.0.0.1:0",
        "-stun=false",
        &format!("-c={}", dir.path().join("k").display()),
        "-accept-connection-limit=0.001",
        "-accept-connection-burst=1",
    ]);
    let addr = r.line["http_addr"].as_str().unwrap().to_string();
    // The first connection takes the only token; the next ones are closed unanswered.
    let mut answered = 0;
    for _ in 0..3 {
        let mut s = std::net::TcpStream::connect(&addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let _ = write!(
            s,
            "GET /derp/probe HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        );
        let mut resp = String::new();
        let _ = s.read_to_string(&mut resp);
        if resp.starts_with("HTTP/1.1 200") {
            answered += 1;
        }
    }
    assert_eq!(answered, 1);
    let m = r.line["metrics_addr"].as_str().unwrap();
    assert_eq!(
        metric(
            m,
            "derp_listener_rejected_connections_total{listener=\"http\",reason=\"rate_limit\"}"
        ),
        Some(2.0)
    );
}
