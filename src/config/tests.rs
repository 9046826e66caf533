//! Resolution rules: precedence, defaults per role, errors naming the field, the derived names.

use super::*;

fn resolve(args: &[&str]) -> Result<Settings> {
    let mut argv = vec!["tailnetd"];
    argv.extend_from_slice(args);
    Settings::resolve(&try_parse_from(argv)?)
}

fn error(args: &[&str]) -> String {
    format!("{:#}", resolve(args).unwrap_err())
}

fn write_config(text: &str) -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.toml");
    std::fs::write(&path, text).unwrap();
    let path = path.to_str().unwrap().to_string();
    (dir, path)
}

const KEY: &[&str] = &["--key-file", "/var/lib/tailnetd/derp.key"];

fn with_key<'a>(args: &[&'a str]) -> Vec<&'a str> {
    let mut v = args.to_vec();
    v.extend_from_slice(KEY);
    v
}

#[test]
fn dev_defaults_to_loopback() {
    let s = resolve(&["dev"]).unwrap();
    assert_eq!(s.listen.http_addr, "127.0.0.1:3340");
    assert_eq!(s.listen.stun_addr, "127.0.0.1:3478");
    assert_eq!(s.region.unwrap().region_id, 999);
    assert_eq!(s.drain_deadline, Duration::from_secs(10));
}

#[test]
fn empty_stun_disables_it() {
    let s = resolve(&with_key(&["derp", "--stun-addr", ""])).unwrap();
    assert_eq!(s.listen.stun_socket_addr().unwrap(), None);
}

#[test]
fn bad_address_names_the_field() {
    let e = error(&with_key(&["derp", "--http-addr", "not-an-addr"]));
    assert!(e.contains("http_addr"), "{e}");
}

#[test]
fn https_requires_cert_and_key() {
    let e = error(&with_key(&["derp", "--https-addr", "127.0.0.1:0"]));
    assert!(e.contains("tls_cert"), "{e}");
}

#[test]
fn relay_roles_but_dev_require_a_key_file() {
    for role in ["derp", "serve"] {
        let e = error(&[role]);
        assert!(e.contains("key_file"), "{e}");
    }
    resolve(&["dev"]).unwrap();
    resolve(&["coordinator"]).unwrap();
}

#[test]
fn settings_of_other_roles_are_not_flags() {
    for (role, flag) in [
        ("coordinator", "--stun-addr"),
        ("coordinator", "--relay-queue-depth"),
        ("coordinator", "--key-file"),
        ("derp", "--upstream"),
        ("derp", "--coordinator-graph-shards"),
        ("derp", "--region-id"),
    ] {
        let e = try_parse_from(["tailnetd", role, flag, "1"]).unwrap_err();
        assert_eq!(
            e.kind(),
            clap::error::ErrorKind::UnknownArgument,
            "{role} {flag}"
        );
    }
}

#[test]
fn file_keys_of_other_roles_are_errors_naming_the_key() {
    let (_d, path) = write_config("stun_addr = \"127.0.0.1:0\"\n[relay]\nqueue_depth = 8\n");
    let e = error(&["coordinator", "--config", &path]);
    assert!(
        e.contains("stun_addr: not used by the coordinator role"),
        "{e}"
    );
    assert!(
        e.contains("relay.queue_depth: not used by the coordinator role"),
        "{e}"
    );

    let (_d, path) = write_config("[upstream]\nurl = \"http://coderd:3000\"\n");
    let e = error(&with_key(&["derp", "--config", &path]));
    assert!(e.contains("upstream.url: not used by the derp role"), "{e}");
}

#[test]
fn precedence_is_flag_then_file_then_default() {
    let (_d, path) = write_config(
        "http_addr = \"127.0.0.1:1111\"\nregion_id = 900\n[relay]\nqueue_depth = 64\nkeepalive = \"30s\"\n",
    );
    let s = resolve(&with_key(&[
        "serve",
        "--config",
        &path,
        "--region-id",
        "901",
        "--relay-keepalive",
        "20s",
    ]))
    .unwrap();
    assert_eq!(s.listen.http_addr, "127.0.0.1:1111");
    assert_eq!(s.region.as_ref().unwrap().region_id, 901);
    assert_eq!(s.listen.queue_depth, 64);
    assert_eq!(s.listen.keepalive, Duration::from_secs(20));
    assert_eq!(s.listen.write_timeout, EdgeConfig::default().write_timeout);
    let shown = s.effective_toml();
    assert!(
        shown.contains("http_addr = \"127.0.0.1:1111\"  # file"),
        "{shown}"
    );
    assert!(shown.contains("region_id = 901  # flag"), "{shown}");
    assert!(shown.contains("keepalive = \"20s\"  # flag"), "{shown}");
    assert!(
        shown.contains("write_timeout = \"2s\"  # default"),
        "{shown}"
    );
}

#[test]
fn check_output_is_toml_that_resolves_to_the_same_settings() {
    let (_d, path) = write_config(
        "[relay]\nqueue_depth = 64\n[coordinator]\nresponse_buffer = 100\ngraph_shards = 8\n",
    );
    let s = resolve(&with_key(&["serve", "--config", &path])).unwrap();
    let shown = s.effective_toml();
    // With no secrets configured, the output is itself a loadable file.
    let (_d2, path2) = write_config(&shown);
    let again = resolve(&["serve", "--config", &path2]).unwrap();
    assert_eq!(again.listen, s.listen);
    assert_eq!(again.coordinator.response_buffer, 100);
    assert_eq!(again.coordinator.graph_shards, 8);
    let without_origins = |t: &str| -> Vec<String> {
        t.lines()
            .skip(1)
            .map(|l| l.split("  # ").next().unwrap_or("").to_string())
            .collect()
    };
    assert_eq!(
        without_origins(&again.effective_toml()),
        without_origins(&shown)
    );
}

#[test]
fn unknown_file_key_names_the_key() {
    let (_d, path) = write_config("htp_addr = \"127.0.0.1:1\"\n[relay]\nwrite_timeout_ms = 5\n");
    let e = error(&with_key(&["derp", "--config", &path]));
    assert!(e.contains("htp_addr: unknown setting"), "{e}");
    assert!(e.contains("relay.write_timeout_ms: unknown setting"), "{e}");
}

#[test]
fn durations_need_a_unit_everywhere() {
    let e = error(&with_key(&["derp", "--relay-write-timeout", "2000"]));
    assert!(
        e.contains("relay.write_timeout (--relay-write-timeout)"),
        "{e}"
    );
    let (_d, path) = write_config("[relay]\nkeepalive = 60\n");
    let e = error(&with_key(&["derp", "--config", &path]));
    assert!(e.contains("relay.keepalive"), "{e}");
    let (_d, path) = write_config("[relay]\nwrite_timeout = \"0\"\nkeepalive = \"1m\"\n");
    let s = resolve(&with_key(&["derp", "--config", &path])).unwrap();
    assert_eq!(s.listen.write_timeout, Duration::ZERO);
    assert_eq!(s.listen.keepalive, Duration::from_secs(60));
}

#[test]
fn derp_map_regions_from_the_file() {
    let (_d, path) = write_config(
        r#"
[derp_map]
stun_servers = ["stun.example.com:3478"]
poll_interval = "5s"
[[derp_map.regions]]
RegionID = 901
RegionCode = "fra"
RegionName = "Frankfurt"
Nodes = [{ Name = "901a", RegionID = 901, HostName = "derp-fra.example.com" }]
"#,
    );
    let s = resolve(&with_key(&["serve", "--config", &path])).unwrap();
    assert_eq!(s.derp_map.regions.len(), 1);
    assert_eq!(s.derp_map.regions[0].region_id, 901);
    assert_eq!(s.derp_map.stun_servers, vec!["stun.example.com:3478"]);
    assert_eq!(s.derp_map.poll_interval, Duration::from_secs(5));
}

#[test]
fn upstream_from_flags_and_file() {
    let (_d, path) = write_config(
        "[upstream]\nurl = \"http://coderd:3000/\"\nauth_ttl_ok = \"10s\"\npreserve_host = false\n",
    );
    let s = resolve(&with_key(&[
        "serve",
        "--config",
        &path,
        "--upstream-connect-timeout",
        "2s",
    ]))
    .unwrap();
    let up = s.upstream.unwrap();
    assert_eq!(up.url, "http://coderd:3000");
    assert_eq!(up.auth_ttl_ok, Duration::from_secs(10));
    assert_eq!(up.connect_timeout, Duration::from_secs(2));
    assert!(!up.preserve_host);
    assert!(up.rewrite_derp_map, "on by default when serving a relay");

    let s = resolve(&["coordinator", "--upstream", "http://coderd:3000"]).unwrap();
    assert!(!s.upstream.unwrap().rewrite_derp_map);
    let s = resolve(&[
        "coordinator",
        "--upstream",
        "http://coderd:3000",
        "--upstream-rewrite-derp-map",
        "true",
    ])
    .unwrap();
    assert!(s.upstream.unwrap().rewrite_derp_map);
}

#[test]
fn upstream_errors_name_the_field() {
    let e = error(&["coordinator", "--upstream", "coderd:3000"]);
    assert!(
        e.contains("upstream.url (--upstream)") || e.contains("upstream.url:"),
        "{e}"
    );
    let e = error(&[
        "coordinator",
        "--upstream",
        "http://coderd",
        "--upstream-header-timeout",
        "soon",
    ]);
    assert!(e.contains("upstream.header_timeout"), "{e}");
}

#[test]
fn coordinator_settings_reach_the_coordinator_config() {
    let secret = "ab".repeat(32);
    let (_d, path) = write_config(&format!(
        r#"
[coordinator]
response_buffer = 64
ws_ping_interval = "5s"
ws_pong_timeout = "7s"
v1_write_timeout = "3s"
v1_max_message = 65536
shutdown_grace = "1s"
resume_token_expiry = "1h"
graph_shards = 32
[auth.resume_key]
id = "2"
secret_hex = "{secret}"
[[auth.resume_verify_keys]]
id = "1"
secret_hex = "{secret}"
"#
    ));
    let s = resolve(&["coordinator", "--config", &path]).unwrap();
    let c = &s.coordinator;
    assert_eq!(c.response_buffer, 64);
    assert_eq!(c.ws_ping_interval, Duration::from_secs(5));
    assert_eq!(c.ws_pong_timeout, Duration::from_secs(7));
    assert_eq!(c.v1_write_timeout, Duration::from_secs(3));
    assert_eq!(c.v1_max_message, 65536);
    assert_eq!(c.shutdown_grace, Duration::from_secs(1));
    assert_eq!(c.resume_expiry, Duration::from_secs(3600));
    assert_eq!(c.graph_shards, 32);
    assert_eq!(c.resume_key.as_ref().unwrap().id, "2");
    assert_eq!(c.resume_verify_keys.len(), 1);
    // Secrets stay out of --check.
    assert!(!s.effective_toml().contains(&secret));

    let s = resolve(&["coordinator", "--coordinator-graph-shards", "4"]).unwrap();
    assert_eq!(s.coordinator.graph_shards, 4);
    let e = error(&["coordinator", "--coordinator-graph-shards", "0"]);
    assert!(e.contains("coordinator.graph_shards"), "{e}");
    let e = error(&["coordinator", "--coordinator-response-buffer", "0"]);
    assert!(e.contains("coordinator.response_buffer"), "{e}");
}

#[test]
fn node_limits_from_flags_and_file() {
    let defaults = coordinator::graph::NodeLimits::default();
    let s = resolve(&["coordinator"]).unwrap();
    assert_eq!(s.coordinator.node_limits, defaults);
    let s = resolve(&[
        "coordinator",
        "--coordinator-node-max-endpoints",
        "32",
        "--coordinator-node-max-bytes",
        "8192",
    ])
    .unwrap();
    assert_eq!(s.coordinator.node_limits.max_endpoints, 32);
    assert_eq!(s.coordinator.node_limits.max_node_bytes, 8192);
    assert_eq!(
        s.coordinator.node_limits.max_derp_latency,
        defaults.max_derp_latency
    );
    let e = error(&["coordinator", "--coordinator-node-max-bytes", "100"]);
    assert!(e.contains("coordinator.node_max_bytes"), "{e}");
}

#[test]
fn peer_max_tunnels_from_flags() {
    let s = resolve(&["coordinator"]).unwrap();
    assert_eq!(
        s.coordinator.max_tunnels_per_peer,
        coordinator::graph::DEFAULT_MAX_TUNNELS_PER_PEER
    );
    let s = resolve(&["coordinator", "--coordinator-peer-max-tunnels", "16"]).unwrap();
    assert_eq!(s.coordinator.max_tunnels_per_peer, 16);
}

#[test]
fn session_and_queue_bounds_from_defaults_flags_and_file() {
    let d = CoordinatorConfig::default();
    let s = resolve(&["coordinator"]).unwrap();
    assert_eq!(s.coordinator.max_sessions_per_user, 256);
    assert_eq!(s.coordinator.max_sessions_per_agent, 8);
    assert_eq!(s.coordinator.response_buffer_bytes, d.response_buffer_bytes);
    assert_eq!(s.coordinator.session_max_streams, d.session_max_streams);
    assert_eq!(
        s.coordinator.agent_session_max_buffered_bytes,
        d.agent_session_max_buffered_bytes
    );
    assert_eq!(
        s.coordinator.client_session_max_buffered_bytes,
        d.client_session_max_buffered_bytes
    );
    let s = resolve(&[
        "coordinator",
        "--coordinator-max-sessions-per-user",
        "3",
        "--coordinator-max-sessions-per-agent",
        "2",
        "--coordinator-response-buffer-bytes",
        "100000",
        "--coordinator-session-max-streams",
        "16",
    ])
    .unwrap();
    assert_eq!(s.coordinator.max_sessions_per_user, 3);
    assert_eq!(s.coordinator.max_sessions_per_agent, 2);
    assert_eq!(s.coordinator.response_buffer_bytes, 100_000);
    assert_eq!(s.coordinator.session_max_streams, 16);
    let (_d, path) = write_config("[coordinator]\nagent_session_max_buffered_bytes = 6000000\nclient_session_max_buffered_bytes = 300000\n");
    let s = resolve(&["coordinator", "--config", &path]).unwrap();
    assert_eq!(s.coordinator.agent_session_max_buffered_bytes, 6_000_000);
    assert_eq!(s.coordinator.client_session_max_buffered_bytes, 300_000);
    let e = error(&["coordinator", "--coordinator-max-sessions-per-user", "0"]);
    assert!(e.contains("coordinator.max_sessions_per_user"), "{e}");
    let e = error(&[
        "coordinator",
        "--coordinator-agent-session-max-buffered-bytes",
        "1000",
    ]);
    assert!(
        e.contains("coordinator.agent_session_max_buffered_bytes"),
        "{e}"
    );
}

#[test]
fn bad_auth_entries_name_the_field() {
    let (_d, path) = write_config("[auth.resume_key]\nid = \"1\"\nsecret_hex = \"abcd\"\n");
    let e = error(&["coordinator", "--config", &path]);
    assert!(e.contains("auth.resume_key"), "{e}");
    let (_d, path) = write_config("[[auth.agents]]\ntoken = \"not-a-uuid\"\nid = \"x\"\n");
    let e = error(&["coordinator", "--config", &path]);
    assert!(e.contains("auth.agents"), "{e}");
}

#[test]
fn bad_queue_depth_names_the_field() {
    let (_d, path) = write_config("[relay]\nqueue_depth = 0\n");
    let e = error(&with_key(&["derp", "--config", &path]));
    assert!(e.contains("relay.queue_depth"), "{e}");
}

#[test]
fn bad_log_settings_name_the_field() {
    let e = error(&["coordinator", "--log-format", "xml"]);
    assert!(e.contains("log_format"), "{e}");
    let e = error(&["coordinator", "--log", "info,[[["]);
    assert!(e.contains("log:"), "{e}");
}

#[test]
fn names_are_derived_from_the_declaration() {
    let mut flags = std::collections::HashSet::new();
    let mut keys = std::collections::HashSet::new();
    for g in GROUPS {
        for s in g.settings {
            assert!(
                keys.insert(g.key(s.name)),
                "duplicate key {}",
                g.key(s.name)
            );
            assert!(!s.help().is_empty(), "{} has no help", g.key(s.name));
            if let Some(f) = s.flag(g) {
                assert!(flags.insert(f.clone()), "duplicate flag {f}");
                let env = s.env(g).unwrap();
                assert_eq!(
                    env,
                    format!("TAILNETD_{}", f.to_uppercase().replace('-', "_"))
                );
            }
        }
    }
    // The flags and variables the Go suites, the benches and existing deployments use.
    for f in [
        "http-addr",
        "https-addr",
        "tls-cert",
        "tls-key",
        "stun-addr",
        "key-file",
        "mesh-psk-file",
        "derp-map-file",
        "region-id",
        "region-code",
        "region-name",
        "public-url",
        "credentials",
        "upstream",
        "upstream-connect-timeout",
        "upstream-header-timeout",
        "upstream-max-body-bytes",
        "upstream-auth-ttl-ok",
        "upstream-auth-ttl-err",
        "upstream-rewrite-derp-map",
        "log",
        "log-format",
    ] {
        assert!(flags.contains(f), "--{f} is gone");
    }
    command().debug_assert();
}

#[test]
fn help_shows_only_the_roles_settings() {
    let help = |role: Role| role_command(role).render_long_help().to_string();
    let derp = help(Role::Derp);
    for absent in [
        "--upstream",
        "--coordinator-",
        "--region-",
        "--derp-map",
        "auth.agents",
    ] {
        assert!(!derp.contains(absent), "derp --help shows {absent}");
    }
    assert!(derp.contains("--relay-queue-depth"));
    assert!(derp.contains("TAILNETD_RELAY_QUEUE_DEPTH"));
    assert!(derp.contains("[toml: relay.queue_depth]"));
    let coordinator = help(Role::Coordinator);
    for absent in [
        "--stun-addr",
        "--key-file",
        "--relay-",
        "--mesh-psk-file",
        "--region-",
    ] {
        assert!(
            !coordinator.contains(absent),
            "coordinator --help shows {absent}"
        );
    }
    assert!(coordinator.contains("--coordinator-graph-shards"));
    assert!(
        coordinator.contains("auth.resume_key"),
        "file-only settings are listed"
    );
    assert!(help(Role::Dev).contains("[default: 127.0.0.1:3340]"));
    assert!(help(Role::Serve).contains("[default: 0.0.0.0:8080]"));
    assert!(derp.contains("empty disables. [default: \"\"]"), "{derp}");
}

#[test]
fn upstream_bridge_is_on_with_an_upstream_unless_switched_off() {
    assert!(
        !resolve(&["coordinator"]).unwrap().upstream_bridge,
        "no upstream, no bridge"
    );
    assert!(
        resolve(&["coordinator", "--upstream", "http://coderd:3000"])
            .unwrap()
            .upstream_bridge
    );
    let off = resolve(&[
        "coordinator",
        "--upstream",
        "http://coderd:3000",
        "--upstream-bridge=false",
    ]);
    assert!(!off.unwrap().upstream_bridge);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.toml");
    std::fs::write(
        &path,
        "[upstream]\nurl = \"http://coderd:3000\"\nbridge = false\n",
    )
    .unwrap();
    let from_file = resolve(&["coordinator", "--config", path.to_str().unwrap()]).unwrap();
    assert!(!from_file.upstream_bridge);
}

#[test]
fn postgres_url_password_stays_out_of_check() {
    let url = "postgres://tailnetd:hunter2@db:5432/tailnet?sslmode=require&password=hunter3";
    let s = resolve(&["coordinator", "--postgres-url", url]).unwrap();
    assert_eq!(s.postgres_url.as_deref(), Some(url), "used as given");
    let shown = s.effective_toml();
    assert!(
        !shown.contains("hunter2") && !shown.contains("hunter3"),
        "{shown}"
    );
    assert!(
        shown.contains(
            "postgres://tailnetd:(secret)@db:5432/tailnet?sslmode=require&password=(secret)"
        ),
        "{shown}"
    );
    let no_password = DatabaseUrl("postgres://tailnetd@db/tailnet".into());
    assert_eq!(no_password.redacted(), "postgres://tailnetd@db/tailnet");
    let at_in_path = DatabaseUrl("postgresql://u:p@ss@db/x".into());
    assert_eq!(at_in_path.redacted(), "postgresql://u:(secret)@db/x");
}
