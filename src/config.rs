//! Command line, environment and TOML configuration for every role.
//!
//! One `Settings` value is resolved per run, in this order of precedence: a flag, then its
//! `TAILNETD_*` environment twin (clap handles both), then the `--config` TOML file, then the
//! role's default. Everything is validated here, before any socket is opened, so that a bad
//! value fails at start-up with a message that names the field instead of surfacing later as a
//! confusing runtime error.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use derp::config::DerpConfig;
use serde::Deserialize;

/// tailnetd: a Tailnet coordinator and DERP relay for Coder deployments.
#[derive(Debug, Parser)]
#[command(name = "tailnetd", version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub role: RoleCommand,
}

#[derive(Debug, Subcommand)]
pub enum RoleCommand {
    /// Everything on 127.0.0.1 with in-memory state and generated dev credentials (printed as JSON).
    Dev(CommonArgs),
    /// Coordinator and relay in one process: the sidecar next to coderd.
    Serve(CommonArgs),
    /// Coordinator only.
    Coordinator(CommonArgs),
    /// Relay and STUN only: what a regional relay node runs.
    Derp(CommonArgs),
}

impl RoleCommand {
    pub fn split(self) -> (Role, CommonArgs) {
        match self {
            RoleCommand::Dev(a) => (Role::Dev, a),
            RoleCommand::Serve(a) => (Role::Serve, a),
            RoleCommand::Coordinator(a) => (Role::Coordinator, a),
            RoleCommand::Derp(a) => (Role::Derp, a),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Dev,
    Serve,
    Coordinator,
    Derp,
}

impl Role {
    pub fn runs_relay(self) -> bool {
        matches!(self, Role::Dev | Role::Serve | Role::Derp)
    }
    pub fn runs_coordinator(self) -> bool {
        matches!(self, Role::Dev | Role::Serve | Role::Coordinator)
    }
    pub fn name(self) -> &'static str {
        match self {
            Role::Dev => "dev",
            Role::Serve => "serve",
            Role::Coordinator => "coordinator",
            Role::Derp => "derp",
        }
    }
}

/// Flags shared by every role. Each has an environment twin; none has a clap default, so that
/// the TOML file can fill in what the command line leaves out.
#[derive(Debug, Default, Args)]
pub struct CommonArgs {
    /// TOML configuration file.
    #[arg(long, env = "TAILNETD_CONFIG")]
    pub config: Option<PathBuf>,
    /// Plain HTTP listen address (`host:port`, port 0 picks one; empty disables).
    #[arg(long, env = "TAILNETD_HTTP_ADDR")]
    pub http_addr: Option<String>,
    /// HTTPS listen address (needs --tls-cert and --tls-key; empty disables).
    #[arg(long, env = "TAILNETD_HTTPS_ADDR")]
    pub https_addr: Option<String>,
    /// PEM certificate chain for HTTPS; reloaded when the file changes.
    #[arg(long, env = "TAILNETD_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key for HTTPS; reloaded when the file changes.
    #[arg(long, env = "TAILNETD_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// UDP STUN listen address (empty disables).
    #[arg(long, env = "TAILNETD_STUN_ADDR")]
    pub stun_addr: Option<String>,
    /// DERP private key file in derper's JSON format; created when missing.
    #[arg(long, env = "TAILNETD_KEY_FILE")]
    pub key_file: Option<PathBuf>,
    /// DERP mesh pre-shared key file (64 hex characters).
    #[arg(long, env = "TAILNETD_MESH_PSK_FILE")]
    pub mesh_psk_file: Option<PathBuf>,
    /// DERP map JSON file (Tailscale/Coder form), watched for changes.
    #[arg(long, env = "TAILNETD_DERP_MAP_FILE")]
    pub derp_map_file: Option<PathBuf>,
    /// Region id of this process's own relay in the DERP map.
    #[arg(long, env = "TAILNETD_REGION_ID")]
    pub region_id: Option<i64>,
    /// Region code of this process's own relay.
    #[arg(long, env = "TAILNETD_REGION_CODE")]
    pub region_code: Option<String>,
    /// Region name of this process's own relay.
    #[arg(long, env = "TAILNETD_REGION_NAME")]
    pub region_name: Option<String>,
    /// URL under which clients reach this process (defaults to the bound listener).
    #[arg(long, env = "TAILNETD_PUBLIC_URL")]
    pub public_url: Option<String>,
    /// Where `dev` also writes its credentials JSON.
    #[arg(long, env = "TAILNETD_CREDENTIALS")]
    pub credentials: Option<PathBuf>,
    /// Upstream Coder server (`http(s)://host[:port]`): every request tailnetd does not own is
    /// proxied to it, and it decides every token.
    #[arg(long, env = "TAILNETD_UPSTREAM")]
    pub upstream: Option<String>,
    /// Connect (and TLS handshake) timeout towards the upstream, e.g. `5s`.
    #[arg(long, env = "TAILNETD_UPSTREAM_CONNECT_TIMEOUT")]
    pub upstream_connect_timeout: Option<String>,
    /// How long to wait for the upstream's response headers, e.g. `30s`.
    #[arg(long, env = "TAILNETD_UPSTREAM_HEADER_TIMEOUT")]
    pub upstream_header_timeout: Option<String>,
    /// Largest request body proxied to the upstream; larger ones get 413.
    #[arg(long, env = "TAILNETD_UPSTREAM_MAX_BODY_BYTES")]
    pub upstream_max_body_bytes: Option<u64>,
    /// How long a positive auth decision of the upstream is reused, e.g. `30s`.
    #[arg(long, env = "TAILNETD_UPSTREAM_AUTH_TTL_OK")]
    pub upstream_auth_ttl_ok: Option<String>,
    /// How long a negative auth decision of the upstream is reused, e.g. `5s`.
    #[arg(long, env = "TAILNETD_UPSTREAM_AUTH_TTL_ERR")]
    pub upstream_auth_ttl_err: Option<String>,
    /// Replace the DERP map in proxied `/connection` and `/me/manifest` answers with ours
    /// (default: on when this process runs a relay).
    #[arg(long, env = "TAILNETD_UPSTREAM_REWRITE_DERP_MAP")]
    pub upstream_rewrite_derp_map: Option<bool>,
    /// Mirror every agent into coderd's own coordinator, so that coderd (web terminal, apps,
    /// port-forwarding, workspace proxies) reaches agents served here (default: on with
    /// `--upstream`; `--upstream-bridge=false` switches it off, e.g. when sharing coderd's HA
    /// tables instead).
    #[arg(long, env = "TAILNETD_UPSTREAM_BRIDGE")]
    pub upstream_bridge: Option<bool>,
    /// Log filter (tracing env-filter syntax), e.g. `info,derp=debug`.
    #[arg(long, env = "TAILNETD_LOG")]
    pub log: Option<String>,
    /// Log format: `text` or `json`.
    #[arg(long, env = "TAILNETD_LOG_FORMAT")]
    pub log_format: Option<String>,
}

/// The TOML file. Unknown keys are errors so that a typo never silently falls back to a default.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub http_addr: Option<String>,
    pub https_addr: Option<String>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub stun_addr: Option<String>,
    pub key_file: Option<PathBuf>,
    pub mesh_psk_file: Option<PathBuf>,
    pub derp_map_file: Option<PathBuf>,
    pub region_id: Option<i64>,
    pub region_code: Option<String>,
    pub region_name: Option<String>,
    pub public_url: Option<String>,
    pub credentials: Option<PathBuf>,
    pub log: Option<String>,
    pub log_format: Option<String>,
    #[serde(default)]
    pub relay: RelayFile,
    #[serde(default)]
    pub auth: AuthFile,
    #[serde(default)]
    pub derp_map: DerpMapFile,
    #[serde(default)]
    pub upstream: UpstreamFile,
}

/// The upstream Coder server (`[upstream]`); durations are text such as `"5s"`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamFile {
    pub url: Option<String>,
    pub connect_timeout: Option<String>,
    pub header_timeout: Option<String>,
    pub max_body_bytes: Option<u64>,
    pub auth_ttl_ok: Option<String>,
    pub auth_ttl_err: Option<String>,
    pub rewrite_derp_map: Option<bool>,
    pub bridge: Option<bool>,
}

/// Extra DERP map content (`[derp_map]`), merged with `derp_map_file` and this process's relay.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DerpMapFile {
    /// Regions in Tailscale/Coder JSON field names (`RegionID`, `RegionCode`, `Nodes`, ...).
    #[serde(default)]
    pub regions: Vec<proto::derpmap::DerpRegion>,
    /// External STUN servers (`host:port`); each becomes a STUN-only region.
    #[serde(default)]
    pub stun_servers: Vec<String>,
}

/// Relay tuning knobs (`[relay]`); durations are text such as `"2s"` or `"500ms"`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RelayFile {
    pub queue_depth: Option<usize>,
    pub write_timeout: Option<String>,
    pub keepalive: Option<String>,
    pub tcp_user_timeout: Option<String>,
    pub tcp_keepalive: Option<String>,
    pub accept_connection_limit: Option<f64>,
    pub accept_connection_burst: Option<u32>,
    pub max_connections: Option<usize>,
}

/// Static tokens and the resume-token key (`[auth]`), used when no upstream Coder server decides.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthFile {
    #[serde(flatten)]
    pub tokens: coordinator::auth::StaticAuthConfig,
    /// Key for resume tokens; replicas sharing it accept each other's tokens.
    pub resume_key: Option<coordinator::config::ResumeKeyConfig>,
}

/// Fully resolved and validated settings for one run.
#[derive(Debug)]
pub struct Settings {
    pub role: Role,
    /// Listeners, TLS files, key files and relay knobs, validated by the relay crate's own rules.
    pub listen: DerpConfig,
    pub derp_map_file: Option<PathBuf>,
    pub region_id: i64,
    pub region_code: String,
    pub region_name: String,
    pub public_url: Option<String>,
    pub credentials: Option<PathBuf>,
    pub log: String,
    pub log_json: bool,
    pub auth: AuthFile,
    pub derp_map: DerpMapFile,
    /// Set when an upstream Coder server decides auth and serves everything else.
    pub upstream: Option<coordinator::upstream::UpstreamConfig>,
    /// With an upstream: bridge every agent into its coordinator (`upstream.bridge`).
    pub upstream_bridge: bool,
}

fn load_file(path: &Path) -> Result<FileConfig> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading config file {}", path.display()))?;
    toml::from_str(&text).with_context(|| format!("config file {}", path.display()))
}

fn duration(field: &str, value: Option<String>, default: Duration) -> Result<Duration> {
    match value {
        None => Ok(default),
        Some(v) => derp::config::parse_duration(&v).map_err(|e| anyhow!("{field}: {e}")),
    }
}

/// The upstream flags.
struct UpstreamArgs {
    url: Option<String>,
    connect_timeout: Option<String>,
    header_timeout: Option<String>,
    max_body_bytes: Option<u64>,
    auth_ttl_ok: Option<String>,
    auth_ttl_err: Option<String>,
    rewrite_derp_map: Option<bool>,
}

fn resolve_upstream(
    a: UpstreamArgs,
    f: UpstreamFile,
    role: Role,
) -> Result<Option<coordinator::upstream::UpstreamConfig>> {
    let Some(url) = a.url.or(f.url).filter(|u| !u.trim().is_empty()) else {
        return Ok(None);
    };
    if !role.runs_coordinator() {
        bail!("upstream: the {} role runs no coordinator", role.name());
    }
    if !(url.starts_with("http://") || url.starts_with("https://")) {
        bail!("upstream: {url:?} must start with http:// or https://");
    }
    let d = coordinator::upstream::UpstreamConfig::default();
    Ok(Some(coordinator::upstream::UpstreamConfig {
        url: url.trim_end_matches('/').to_string(),
        connect_timeout: duration(
            "upstream.connect_timeout",
            a.connect_timeout.or(f.connect_timeout),
            d.connect_timeout,
        )?,
        header_timeout: duration(
            "upstream.header_timeout",
            a.header_timeout.or(f.header_timeout),
            d.header_timeout,
        )?,
        max_body_bytes: a
            .max_body_bytes
            .or(f.max_body_bytes)
            .unwrap_or(d.max_body_bytes),
        auth_ttl_ok: duration(
            "upstream.auth_ttl_ok",
            a.auth_ttl_ok.or(f.auth_ttl_ok),
            d.auth_ttl_ok,
        )?,
        auth_ttl_err: duration(
            "upstream.auth_ttl_err",
            a.auth_ttl_err.or(f.auth_ttl_err),
            d.auth_ttl_err,
        )?,
        rewrite_derp_map: a
            .rewrite_derp_map
            .or(f.rewrite_derp_map)
            .unwrap_or(role.runs_relay()),
        ..d
    }))
}

/// Names a relay-crate config field the way the TOML file spells it.
fn file_field(field: &str) -> String {
    match field {
        "http_addr" | "https_addr" | "tls_cert" | "tls_key" | "stun_addr" | "key_file"
        | "mesh_psk_file" => field.to_string(),
        other => format!("relay.{other}"),
    }
}

impl Settings {
    pub fn resolve(role: Role, args: CommonArgs) -> Result<Settings> {
        let file = match &args.config {
            Some(p) => load_file(p)?,
            None => FileConfig::default(),
        };
        let dev = role == Role::Dev;
        let defaults = DerpConfig::default();

        let http_default = if dev {
            "127.0.0.1:3340"
        } else {
            "0.0.0.0:8080"
        };
        let stun_default = match (role.runs_relay(), dev) {
            (false, _) => "",
            (true, true) => "127.0.0.1:3478",
            (true, false) => "0.0.0.0:3478",
        };
        let stun_addr = args
            .stun_addr
            .or(file.stun_addr)
            .unwrap_or_else(|| stun_default.to_string());
        if !role.runs_relay() && !stun_addr.trim().is_empty() {
            bail!("stun_addr: the {} role runs no relay", role.name());
        }
        let relay = file.relay;
        let listen = DerpConfig {
            http_addr: args
                .http_addr
                .or(file.http_addr)
                .unwrap_or_else(|| http_default.to_string()),
            https_addr: args.https_addr.or(file.https_addr).unwrap_or_default(),
            tls_cert: args.tls_cert.or(file.tls_cert),
            tls_key: args.tls_key.or(file.tls_key),
            stun_addr,
            key_file: args.key_file.or(file.key_file),
            mesh_psk_file: args.mesh_psk_file.or(file.mesh_psk_file),
            queue_depth: relay.queue_depth.unwrap_or(defaults.queue_depth),
            write_timeout: duration(
                "relay.write_timeout",
                relay.write_timeout,
                defaults.write_timeout,
            )?,
            keepalive: duration("relay.keepalive", relay.keepalive, defaults.keepalive)?,
            accept_connection_limit: relay.accept_connection_limit,
            accept_connection_burst: relay.accept_connection_burst,
            tcp_user_timeout: duration(
                "relay.tcp_user_timeout",
                relay.tcp_user_timeout,
                defaults.tcp_user_timeout,
            )?,
            tcp_keepalive: duration(
                "relay.tcp_keepalive",
                relay.tcp_keepalive,
                defaults.tcp_keepalive,
            )?,
            max_connections: relay.max_connections.unwrap_or(defaults.max_connections),
        };
        if let Err(errs) = listen.validate() {
            let text: Vec<String> = errs
                .0
                .iter()
                .map(|e| format!("{}: {}", file_field(e.field), e.reason))
                .collect();
            bail!("{}", text.join("; "));
        }

        let region_id = args.region_id.or(file.region_id).unwrap_or(999);
        if region_id <= 0 {
            bail!("region_id: must be positive, got {region_id}");
        }
        let public_url = args.public_url.or(file.public_url);
        if let Some(u) = &public_url {
            if !(u.starts_with("http://") || u.starts_with("https://")) {
                bail!("public_url: {u:?} must start with http:// or https://");
            }
        }
        let log_format = args
            .log_format
            .or(file.log_format)
            .unwrap_or_else(|| "text".into());
        let log_json = match log_format.as_str() {
            "text" => false,
            "json" => true,
            other => bail!("log_format: {other:?} is neither \"text\" nor \"json\""),
        };
        let upstream_args = UpstreamArgs {
            url: args.upstream,
            connect_timeout: args.upstream_connect_timeout,
            header_timeout: args.upstream_header_timeout,
            max_body_bytes: args.upstream_max_body_bytes,
            auth_ttl_ok: args.upstream_auth_ttl_ok,
            auth_ttl_err: args.upstream_auth_ttl_err,
            rewrite_derp_map: args.upstream_rewrite_derp_map,
        };
        let bridge = args.upstream_bridge.or(file.upstream.bridge);
        let upstream = resolve_upstream(upstream_args, file.upstream, role)?;
        let upstream_bridge = upstream.is_some() && bridge.unwrap_or(true);
        if let Some(k) = &file.auth.resume_key {
            k.to_key().map_err(|e| anyhow!("auth.resume_key: {e}"))?;
        }

        Ok(Settings {
            role,
            listen,
            derp_map_file: args.derp_map_file.or(file.derp_map_file),
            region_id,
            region_code: args
                .region_code
                .or(file.region_code)
                .unwrap_or_else(|| "coder".into()),
            region_name: args
                .region_name
                .or(file.region_name)
                .unwrap_or_else(|| "Coder Embedded Relay".into()),
            public_url,
            credentials: args.credentials.or(file.credentials),
            log: args.log.or(file.log).unwrap_or_else(|| "info".into()),
            log_json,
            auth: file.auth,
            derp_map: file.derp_map,
            upstream,
            upstream_bridge,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args() -> CommonArgs {
        CommonArgs::default()
    }

    #[test]
    fn dev_defaults_to_loopback() {
        let s = Settings::resolve(Role::Dev, args()).unwrap();
        assert_eq!(s.listen.http_addr, "127.0.0.1:3340");
        assert_eq!(s.listen.stun_addr, "127.0.0.1:3478");
        assert_eq!(s.region_id, 999);
    }

    #[test]
    fn empty_stun_disables_it() {
        let mut a = args();
        a.stun_addr = Some(String::new());
        let s = Settings::resolve(Role::Derp, a).unwrap();
        assert_eq!(s.listen.stun_socket_addr().unwrap(), None);
    }

    #[test]
    fn bad_address_names_the_field() {
        let mut a = args();
        a.http_addr = Some("not-an-addr".into());
        let e = format!("{:#}", Settings::resolve(Role::Derp, a).unwrap_err());
        assert!(e.contains("http_addr"), "{e}");
    }

    #[test]
    fn https_requires_cert_and_key() {
        let mut a = args();
        a.https_addr = Some("127.0.0.1:0".into());
        let e = format!("{:#}", Settings::resolve(Role::Derp, a).unwrap_err());
        assert!(e.contains("tls_cert"), "{e}");
    }

    #[test]
    fn coordinator_role_rejects_stun() {
        let mut a = args();
        a.stun_addr = Some("127.0.0.1:0".into());
        let e = format!("{:#}", Settings::resolve(Role::Coordinator, a).unwrap_err());
        assert!(e.contains("stun_addr"), "{e}");
    }

    #[test]
    fn file_fills_in_and_flags_override() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.toml");
        std::fs::write(
            &path,
            "http_addr = \"127.0.0.1:1111\"\nregion_id = 900\n[relay]\nqueue_depth = 64\n",
        )
        .unwrap();
        let mut a = args();
        a.config = Some(path.clone());
        a.region_id = Some(901);
        let s = Settings::resolve(Role::Derp, a).unwrap();
        assert_eq!(s.listen.http_addr, "127.0.0.1:1111");
        assert_eq!(s.region_id, 901);
        assert_eq!(s.listen.queue_depth, 64);
    }

    #[test]
    fn unknown_file_key_names_the_field() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.toml");
        std::fs::write(&path, "htp_addr = \"127.0.0.1:1\"\n").unwrap();
        let mut a = args();
        a.config = Some(path);
        let e = format!("{:#}", Settings::resolve(Role::Derp, a).unwrap_err());
        assert!(e.contains("htp_addr"), "{e}");
    }

    #[test]
    fn derp_map_regions_from_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.toml");
        std::fs::write(
            &path,
            r#"
[derp_map]
stun_servers = ["stun.example.com:3478"]
[[derp_map.regions]]
RegionID = 901
RegionCode = "fra"
RegionName = "Frankfurt"
Nodes = [{ Name = "901a", RegionID = 901, HostName = "derp-fra.example.com" }]
"#,
        )
        .unwrap();
        let mut a = args();
        a.config = Some(path);
        let s = Settings::resolve(Role::Serve, a).unwrap();
        assert_eq!(s.derp_map.regions.len(), 1);
        assert_eq!(s.derp_map.regions[0].region_id, 901);
        assert_eq!(s.derp_map.stun_servers, vec!["stun.example.com:3478"]);
    }

    #[test]
    fn upstream_from_flags_and_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.toml");
        std::fs::write(
            &path,
            "[upstream]\nurl = \"http://coderd:3000/\"\nauth_ttl_ok = \"10s\"\n",
        )
        .unwrap();
        let mut a = args();
        a.config = Some(path);
        a.upstream_connect_timeout = Some("2s".into());
        let s = Settings::resolve(Role::Serve, a).unwrap();
        let up = s.upstream.unwrap();
        assert_eq!(up.url, "http://coderd:3000");
        assert_eq!(up.auth_ttl_ok, Duration::from_secs(10));
        assert_eq!(up.connect_timeout, Duration::from_secs(2));
        assert!(up.rewrite_derp_map, "on by default when serving a relay");

        let mut a = args();
        a.upstream = Some("http://coderd:3000".into());
        let s = Settings::resolve(Role::Coordinator, a).unwrap();
        assert!(!s.upstream.unwrap().rewrite_derp_map);
    }

    #[test]
    fn upstream_bridge_is_on_with_an_upstream_unless_switched_off() {
        let s = Settings::resolve(Role::Serve, args()).unwrap();
        assert!(!s.upstream_bridge, "no upstream, no bridge");
        let mut a = args();
        a.upstream = Some("http://coderd:3000".into());
        assert!(Settings::resolve(Role::Serve, a).unwrap().upstream_bridge);
        let mut a = args();
        a.upstream = Some("http://coderd:3000".into());
        a.upstream_bridge = Some(false);
        assert!(!Settings::resolve(Role::Serve, a).unwrap().upstream_bridge);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.toml");
        std::fs::write(
            &path,
            "[upstream]\nurl = \"http://coderd:3000\"\nbridge = false\n",
        )
        .unwrap();
        let mut a = args();
        a.config = Some(path);
        assert!(!Settings::resolve(Role::Serve, a).unwrap().upstream_bridge);
    }

    #[test]
    fn upstream_errors_name_the_field() {
        let mut a = args();
        a.upstream = Some("coderd:3000".into());
        let e = format!("{:#}", Settings::resolve(Role::Serve, a).unwrap_err());
        assert!(e.contains("upstream"), "{e}");
        let mut a = args();
        a.upstream = Some("http://coderd".into());
        a.upstream_header_timeout = Some("soon".into());
        let e = format!("{:#}", Settings::resolve(Role::Serve, a).unwrap_err());
        assert!(e.contains("upstream.header_timeout"), "{e}");
        let mut a = args();
        a.upstream = Some("http://coderd".into());
        let e = format!("{:#}", Settings::resolve(Role::Derp, a).unwrap_err());
        assert!(e.contains("upstream"), "{e}");
    }

    #[test]
    fn bad_queue_depth_names_the_field() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.toml");
        std::fs::write(&path, "[relay]\nqueue_depth = 0\n").unwrap();
        let mut a = args();
        a.config = Some(path);
        let e = format!("{:#}", Settings::resolve(Role::Derp, a).unwrap_err());
        assert!(e.contains("relay.queue_depth"), "{e}");
    }
}
