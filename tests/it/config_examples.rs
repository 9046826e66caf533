//! The configuration an operator copies must work: every file in `deploy/config/` starts its role
//! and becomes ready, and every `tailnetd ...` command line and TOML example in the README passes
//! `--check`.

use std::path::{Path, PathBuf};

use crate::support::{bin, echo_upstream, get, start};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

const ROLES: &[&str] = &["dev", "serve", "coordinator", "derp"];

/// A self-signed certificate and key for an example's HTTPS listener.
fn tls_files(dir: &Path) -> (String, String) {
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let cert = dir.join("cert.pem");
    let key = dir.join("key.pem");
    std::fs::write(&cert, ck.cert.pem()).unwrap();
    std::fs::write(&key, ck.key_pair.serialize_pem()).unwrap();
    (
        cert.to_str().unwrap().to_string(),
        key.to_str().unwrap().to_string(),
    )
}

#[test]
fn every_deploy_config_starts_its_role_and_gets_ready() {
    let mut files: Vec<PathBuf> = std::fs::read_dir(repo().join("deploy/config"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    assert!(files.len() >= 3, "{files:?}");
    for path in files {
        assert_eq!(
            path.extension().and_then(|e| e.to_str()),
            Some("toml"),
            "{} is not a TOML file",
            path.display()
        );
        let role = path.file_stem().unwrap().to_str().unwrap().to_string();
        assert!(
            ROLES.contains(&role.as_str()),
            "{}: name the file after the role that runs it",
            path.display()
        );
        let file: toml::Table = std::fs::read_to_string(&path).unwrap().parse().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let mut args: Vec<String> = vec![
            role.clone(),
            "--config".into(),
            path.to_str().unwrap().into(),
            "--http-addr".into(),
            "127.0.0.1:0".into(),
        ];
        let runs_relay = role != "coordinator";
        if runs_relay {
            let key = dir.path().join("derp.key");
            args.extend([
                "--stun-addr".into(),
                "127.0.0.1:0".into(),
                "--key-file".into(),
                key.to_str().unwrap().into(),
            ]);
        }
        if file.contains_key("https_addr") {
            let (cert, key) = tls_files(dir.path());
            args.extend([
                "--https-addr".into(),
                "127.0.0.1:0".into(),
                "--tls-cert".into(),
                cert,
                "--tls-key".into(),
                key,
            ]);
        }
        let upstream = file.contains_key("upstream").then(echo_upstream);
        if let Some(up) = &upstream {
            args.extend(["--upstream".into(), format!("http://{up}")]);
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let running = start(&args);
        let line = &running.line;
        assert_eq!(line["role"], role.as_str(), "{}", path.display());
        let addr = line["http_addr"].as_str().unwrap();
        assert_eq!(get(addr, "/healthz", &[]).0, 200, "{}", path.display());
        assert_eq!(get(addr, "/readyz", &[]).0, 200, "{}", path.display());
        if file.contains_key("https_addr") {
            assert!(line["https_addr"].is_string(), "{}: {line}", path.display());
        }
        if runs_relay {
            assert!(line["derp_public_key"].is_string(), "{}", path.display());
            assert_eq!(get(addr, "/derp/latency-check", &[]).0, 200);
        }
        if upstream.is_some() {
            // What tailnetd does not own reaches the (stand-in) upstream.
            let (status, body) = get(addr, "/api/v2/buildinfo", &[]);
            assert_eq!(status, 200, "{}", path.display());
            assert!(body.starts_with("GET /api/v2/buildinfo "), "{body}");
        }
    }
}

/// Fenced code blocks of the README: (info string, lines).
fn readme_blocks() -> Vec<(String, Vec<String>)> {
    let text = std::fs::read_to_string(repo().join("README.md")).unwrap();
    let mut blocks = Vec::new();
    let mut open: Option<(String, Vec<String>)> = None;
    for line in text.lines() {
        let fence = line.trim_start().strip_prefix("```");
        match (&mut open, fence) {
            (None, Some(info)) => open = Some((info.trim().to_string(), Vec::new())),
            (Some(_), Some(_)) => blocks.extend(open.take()),
            (Some((_, lines)), None) => lines.push(line.to_string()),
            (None, None) => {}
        }
    }
    assert!(open.is_none(), "README.md has an unclosed code block");
    blocks
}

/// Splits a shell command line into words (quotes and backslash continuations, no expansion).
fn shell_words(line: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut in_word = false;
    let mut quote: Option<char> = None;
    for c in line.chars() {
        match (quote, c) {
            (Some(q), c) if c == q => quote = None,
            (Some(_), c) => word.push(c),
            (None, '"' | '\'') => {
                quote = Some(c);
                in_word = true;
            }
            (None, c) if c.is_whitespace() => {
                if in_word {
                    words.push(std::mem::take(&mut word));
                    in_word = false;
                }
            }
            (None, c) => {
                word.push(c);
                in_word = true;
            }
        }
    }
    assert!(quote.is_none(), "unbalanced quote in {line:?}");
    if in_word {
        words.push(word);
    }
    words
}

/// Runs `tailnetd ARGS --check`; returns stderr when it fails.
fn check(args: &[String]) -> Result<String, String> {
    let out = bin().args(args).arg("--check").output().unwrap();
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).to_string())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).to_string())
    }
}

#[test]
fn every_readme_command_line_passes_check() {
    let mut commands = Vec::new();
    for (info, lines) in readme_blocks() {
        if !matches!(info.as_str(), "sh" | "console" | "bash" | "shell") {
            continue;
        }
        let joined = lines.join("\n").replace("\\\n", " ");
        for line in joined.lines() {
            let line = line.trim().trim_start_matches("$ ");
            if line.starts_with("tailnetd ") {
                commands.push(line.to_string());
            }
        }
    }
    assert!(commands.len() >= 3, "{commands:?}");
    for command in &commands {
        let words = shell_words(command);
        if words.iter().any(|w| w == "--help" || w == "--check") {
            // Runs as written: help exits 0, --check is the check.
            let out = bin().args(&words[1..]).output().unwrap();
            assert!(out.status.success(), "README: `{command}` failed: {out:?}");
            continue;
        }
        if let Err(e) = check(&words[1..]) {
            panic!("README: `{command}` does not pass --check: {e}");
        }
    }
}

#[test]
fn every_readme_toml_example_passes_check() {
    let dir = tempfile::tempdir().unwrap();
    let mut seen = 0;
    for (info, lines) in readme_blocks() {
        if info != "toml" {
            continue;
        }
        seen += 1;
        // The first line names the command that reads the file: `# tailnetd <role> ...`.
        let first = lines.first().map(String::as_str).unwrap_or("");
        let words = shell_words(first.trim_start_matches('#'));
        assert!(
            words.first().map(String::as_str) == Some("tailnetd")
                && words.get(1).is_some_and(|r| ROLES.contains(&r.as_str())),
            "README TOML example must start with `# tailnetd <role>`: {first:?}"
        );
        let path = dir.path().join(format!("example{seen}.toml"));
        std::fs::write(&path, lines.join("\n")).unwrap();
        let args = vec![
            words[1].clone(),
            "--config".to_string(),
            path.to_str().unwrap().to_string(),
        ];
        if let Err(e) = check(&args) {
            panic!("README TOML example {seen} ({first}) does not pass --check: {e}");
        }
    }
    assert!(seen >= 1, "README.md has no TOML example");
}

#[test]
fn check_reports_precedence_flag_env_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.toml");
    std::fs::write(
        &path,
        "[coordinator]\nresponse_buffer = 50\nws_ping_interval = \"20s\"\nshutdown_grace = \"3s\"\n",
    )
    .unwrap();
    let out = bin()
        .args(["coordinator", "--config", path.to_str().unwrap(), "--check"])
        .args(["--coordinator-ws-ping-interval", "30s"])
        .env("TAILNETD_COORDINATOR_RESPONSE_BUFFER", "77")
        .env("TAILNETD_COORDINATOR_WS_PING_INTERVAL", "25s")
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("response_buffer = 77  # environment"),
        "{text}"
    );
    assert!(
        text.contains("ws_ping_interval = \"30s\"  # flag"),
        "{text}"
    );
    assert!(text.contains("shutdown_grace = \"3s\"  # file"), "{text}");
    assert!(
        text.contains("v1_write_timeout = \"5s\"  # default"),
        "{text}"
    );
}

#[test]
fn role_help_shows_only_that_roles_settings() {
    let help = |role: &str| {
        let out = bin().args([role, "--help"]).output().unwrap();
        assert!(out.status.success());
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    let derp = help("derp");
    for absent in ["--upstream", "--coordinator-", "auth.", "--region-id"] {
        assert!(!derp.contains(absent), "derp --help shows {absent}");
    }
    let coordinator = help("coordinator");
    for absent in ["--stun-addr", "--key-file", "--relay-", "--mesh-psk-file"] {
        assert!(
            !coordinator.contains(absent),
            "coordinator --help shows {absent}"
        );
    }
    assert!(coordinator.contains("--upstream-auth-ttl-ok"));
    assert!(help("serve").contains("--relay-queue-depth"));
}
