//! Operator-facing configuration of the relay's edge (listeners, TLS, STUN, key file, TCP and
//! queue tuning), deserialized from the binary's TOML file and overridden by its flags.
//!
//! Why a separate type: the binary owns the CLI, but the meaning, defaults and validation of each
//! knob live next to the code that uses them. `validate()` reports every problem with the field
//! name, so a bad config fails at startup with a message an operator can act on, never later.
//!
//! Durations are written as text (`"2s"`, `"500ms"`, `"10m"`, `"1h"`) or as a number of seconds.
//! Addresses are `host:port`, `[v6]:port`, or `:port` (all IPv4 interfaces); an empty string
//! disables that listener.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The relay edge configuration: listeners, HTTP edge, TLS, STUN, key files and tuning (the
/// coordinator-only role uses the same listener, HTTP edge and TLS).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EdgeConfig {
    /// Plain HTTP listener (DERP over `http://`, probes, metrics); empty disables.
    pub http_addr: String,
    /// HTTPS listener; empty disables. Requires `tls_cert` and `tls_key`.
    pub https_addr: String,
    /// PEM certificate chain (leaf first) for `https_addr`; reloaded when it changes.
    pub tls_cert: Option<PathBuf>,
    /// PEM private key for `https_addr`.
    pub tls_key: Option<PathBuf>,
    /// Obtain the HTTPS certificate for this DNS name from an ACME CA (instead of `tls_cert` and
    /// `tls_key`); `None` = off. See [`crate::edge::acme`].
    pub acme_hostname: Option<String>,
    /// Directory holding ACME certificates and the account key (derper's `-certdir` layout).
    pub acme_cert_dir: Option<PathBuf>,
    /// The CA's ACME directory URL (Let's Encrypt production by default).
    pub acme_directory_url: String,
    /// Contact e-mail given to the CA with a new account.
    pub acme_email: Option<String>,
    /// Extra CA certificates (PEM) trusted for the ACME server's HTTPS.
    pub acme_ca_file: Option<PathBuf>,
    /// `tls-alpn-01` (on the HTTPS listener) or `http-01` (on the HTTP listener, port 80).
    pub acme_challenge: String,
    /// The CA's certificate profile; `None` = the CA's default.
    pub acme_profile: Option<String>,
    /// Longest time between two looks at the certificate's expiry.
    #[serde(with = "duration_text")]
    pub acme_check_interval: Duration,
    /// UDP STUN listener; empty disables.
    pub stun_addr: String,
    /// derper-format JSON key file; created if missing. `None` = ephemeral key (dev only).
    pub key_file: Option<PathBuf>,
    /// File holding the 64-hex-digit mesh key; `None` = no mesh.
    pub mesh_psk_file: Option<PathBuf>,
    /// Mesh peers to dial, derper's `--mesh-with` syntax (see [`crate::mesh::parse_mesh_with`]);
    /// empty = none. Needs `mesh_psk_file`.
    pub mesh_with: String,
    /// Extra CA certificates (PEM) trusted when dialing mesh peers over TLS, besides the web
    /// PKI roots and the system bundle (or `SSL_CERT_FILE`).
    pub mesh_ca_file: Option<PathBuf>,
    /// Packets queued per mesh peer before new ones are dropped.
    pub mesh_queue_depth: usize,
    /// UDP address the QUIC mesh accepts tailnetd peers on; empty = off (see
    /// [`crate::mesh::quic`]). Needs `mesh_psk_file`.
    pub mesh_quic_addr: String,
    /// tailnetd peers to mesh with over QUIC: comma-separated `host:udpport` of their
    /// `mesh_quic_addr`; empty = none. Needs `mesh_psk_file`.
    pub mesh_quic_with: String,
    /// QUIC mesh keep-alive interval: how often an idle link proves it is alive.
    #[serde(with = "duration_text")]
    pub mesh_quic_keepalive: Duration,
    /// A QUIC mesh link that hears nothing from its peer (keep-alives included) for this long
    /// is down: its routes go and it redials.
    #[serde(with = "duration_text")]
    pub mesh_quic_idle_timeout: Duration,
    /// Per-client send queue depth (packets).
    pub queue_depth: usize,
    /// Per-frame write deadline for non-mesh clients; `0s` = none.
    #[serde(with = "duration_text")]
    pub write_timeout: Duration,
    /// Interval of DERP KeepAlive frames.
    #[serde(with = "duration_text")]
    pub keepalive: Duration,
    /// Accepted TLS connections per second (token bucket); `None` = unlimited.
    pub accept_connection_limit: Option<f64>,
    /// Burst of the accept limiter (defaults to the limit rounded up, at least 1).
    pub accept_connection_burst: Option<u32>,
    /// TCP_USER_TIMEOUT on accepted connections (Linux); `0s` = system default.
    #[serde(with = "duration_text")]
    pub tcp_user_timeout: Duration,
    /// TCP keepalive idle time on accepted connections; `0s` = keepalive off.
    #[serde(with = "duration_text")]
    pub tcp_keepalive: Duration,
    /// Maximum concurrent relay (DERP) connections; lowered at start-up to fit under the
    /// open-file limit. Each listener accepts up to 1024 more for HTTP (health, coordination).
    pub max_connections: usize,
    /// Maximum concurrent connections from one source address, per listener; `0` = no cap.
    /// Behind a load balancer every connection comes from its address: raise or disable.
    pub max_connections_per_ip: usize,
    /// Accepted connections per second from one source address (token bucket, burst = the
    /// limit rounded up); `None` = unlimited.
    pub accept_connection_limit_per_ip: Option<f64>,
    /// Proxies in front (the load balancer) whose `X-Forwarded-For` names the client: their
    /// own connections are not limited per address; each relay upgrade through them counts
    /// against the client address they forward instead. Empty = every peer is a client.
    pub trusted_proxies: Vec<IpAddr>,
}

impl Default for EdgeConfig {
    fn default() -> Self {
        EdgeConfig {
            http_addr: "127.0.0.1:3340".into(),
            https_addr: String::new(),
            tls_cert: None,
            tls_key: None,
            acme_hostname: None,
            acme_cert_dir: None,
            acme_directory_url: crate::edge::acme::LETS_ENCRYPT_PRODUCTION.into(),
            acme_email: None,
            acme_ca_file: None,
            acme_challenge: "tls-alpn-01".into(),
            acme_profile: None,
            acme_check_interval: Duration::from_secs(3600),
            stun_addr: String::new(),
            key_file: None,
            mesh_psk_file: None,
            mesh_with: String::new(),
            mesh_ca_file: None,
            mesh_queue_depth: crate::core::mesh::DEFAULT_FORWARD_QUEUE,
            mesh_quic_addr: String::new(),
            mesh_quic_with: String::new(),
            mesh_quic_keepalive: crate::mesh::quic::DEFAULT_KEEPALIVE,
            mesh_quic_idle_timeout: crate::mesh::quic::DEFAULT_IDLE_TIMEOUT,
            queue_depth: 32,
            write_timeout: Duration::from_secs(2),
            keepalive: Duration::from_secs(60),
            accept_connection_limit: None,
            accept_connection_burst: None,
            tcp_user_timeout: Duration::from_secs(15),
            tcp_keepalive: Duration::from_secs(600),
            max_connections: 100_000,
            max_connections_per_ip: 10_000,
            accept_connection_limit_per_ip: None,
            trusted_proxies: Vec::new(),
        }
    }
}

/// A configuration problem, naming the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("config field `{field}`: {reason}")]
pub struct ConfigError {
    /// The field (as spelled in the TOML file).
    pub field: &'static str,
    /// What is wrong with it.
    pub reason: String,
}

/// Every problem found by [`EdgeConfig::validate`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid DERP configuration: {}", .0.iter().map(|e| e.to_string()).collect::<Vec<_>>().join("; "))]
pub struct ConfigErrors(pub Vec<ConfigError>);

/// Parses a listen address: `host:port`, `[v6]:port`, `:port` (0.0.0.0); empty → `None`.
pub fn parse_listen_addr(s: &str) -> Result<Option<SocketAddr>, String> {
    let s = s.trim();
    if s.is_empty() {
        return Ok(None);
    }
    if let Some(port) = s.strip_prefix(':') {
        let port: u16 = port.parse().map_err(|_| format!("bad port in {s:?}"))?;
        return Ok(Some(SocketAddr::from((Ipv4Addr::UNSPECIFIED, port))));
    }
    if s.eq_ignore_ascii_case("localhost") || s.to_ascii_lowercase().starts_with("localhost:") {
        let port = s.get(10..).unwrap_or("");
        let port: u16 = port.parse().map_err(|_| format!("bad port in {s:?}"))?;
        return Ok(Some(SocketAddr::from((Ipv4Addr::LOCALHOST, port))));
    }
    s.parse::<SocketAddr>()
        .map(Some)
        .map_err(|_| format!("{s:?} is not host:port (an IP address and a port)"))
}

impl EdgeConfig {
    /// The parsed HTTP listen address (`None` = disabled). Call [`validate`](Self::validate) first.
    pub fn http_socket_addr(&self) -> Result<Option<SocketAddr>, ConfigError> {
        parse_listen_addr(&self.http_addr).map_err(|reason| ConfigError {
            field: "http_addr",
            reason,
        })
    }

    /// The parsed HTTPS listen address (`None` = disabled).
    pub fn https_socket_addr(&self) -> Result<Option<SocketAddr>, ConfigError> {
        parse_listen_addr(&self.https_addr).map_err(|reason| ConfigError {
            field: "https_addr",
            reason,
        })
    }

    /// The parsed STUN listen address (`None` = disabled).
    pub fn stun_socket_addr(&self) -> Result<Option<SocketAddr>, ConfigError> {
        parse_listen_addr(&self.stun_addr).map_err(|reason| ConfigError {
            field: "stun_addr",
            reason,
        })
    }

    /// Copies the DERP core knobs (queue depth, write timeout, keepalive) into a server config.
    pub fn apply_to(&self, server: &mut crate::core::server::ServerConfig) {
        server.queue_depth = self.queue_depth;
        server.write_timeout = self.write_timeout;
        server.keepalive = self.keepalive;
    }

    /// Checks every field; returns all problems at once.
    pub fn validate(&self) -> Result<(), ConfigErrors> {
        let mut errs = Vec::new();
        let mut bad =
            |field: &'static str, reason: String| errs.push(ConfigError { field, reason });

        let http = self.http_socket_addr();
        let https = self.https_socket_addr();
        if let Err(e) = &http {
            bad(e.field, e.reason.clone());
        }
        if let Err(e) = &https {
            bad(e.field, e.reason.clone());
        }
        if let Err(e) = self.stun_socket_addr() {
            bad(e.field, e.reason);
        }
        if matches!((&http, &https), (Ok(None), Ok(None))) {
            bad(
                "http_addr",
                "no listener: set http_addr or https_addr".into(),
            );
        }
        let acme = self.acme_hostname.is_some();
        if let Ok(Some(_)) = https {
            if acme && (self.tls_cert.is_some() || self.tls_key.is_some()) {
                bad(
                    "acme_hostname",
                    "set either acme_hostname or tls_cert and tls_key, not both".into(),
                );
            }
            if self.tls_cert.is_none() && !acme {
                bad(
                    "tls_cert",
                    "required when https_addr is set (or set acme_hostname)".into(),
                );
            }
            if self.tls_key.is_none() && !acme {
                bad(
                    "tls_key",
                    "required when https_addr is set (or set acme_hostname)".into(),
                );
            }
        } else if acme {
            bad("acme_hostname", "needs https_addr".into());
        } else if self.tls_cert.is_some() != self.tls_key.is_some() {
            let field = if self.tls_cert.is_some() {
                "tls_key"
            } else {
                "tls_cert"
            };
            bad(field, "tls_cert and tls_key must be set together".into());
        }
        if let (Ok(Some(a)), Ok(Some(b))) = (&http, &https) {
            if a == b && a.port() != 0 {
                bad("https_addr", format!("same address as http_addr ({a})"));
            }
        }
        if let Some(h) = &self.acme_hostname {
            let valid = !h.is_empty()
                && h.len() <= 253
                && h.parse::<IpAddr>().is_err()
                && h.split('.').all(|l| {
                    !l.is_empty()
                        && l.len() <= 63
                        && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
                });
            if !valid {
                bad("acme_hostname", format!("{h:?} is not a DNS name"));
            }
            if self.acme_cert_dir.is_none() {
                bad("acme_cert_dir", "required with acme_hostname".into());
            }
            match crate::edge::acme::ChallengeKind::parse(&self.acme_challenge) {
                Err(e) => bad("acme_challenge", e),
                Ok(crate::edge::acme::ChallengeKind::Http01) if matches!(http, Ok(None)) => bad(
                    "acme_challenge",
                    "http-01 needs the plain HTTP listener (http_addr, port 80 for a real CA)"
                        .into(),
                ),
                Ok(_) => {}
            }
            if !self.acme_directory_url.starts_with("https://") {
                bad(
                    "acme_directory_url",
                    format!("{:?} must start with https://", self.acme_directory_url),
                );
            }
            if self.acme_check_interval < Duration::from_secs(1) {
                bad("acme_check_interval", "must be at least 1s".into());
            }
        }
        if self
            .key_file
            .as_ref()
            .is_some_and(|p| p.as_os_str().is_empty())
        {
            bad("key_file", "empty path".into());
        }
        if self
            .mesh_psk_file
            .as_ref()
            .is_some_and(|p| p.as_os_str().is_empty())
        {
            bad("mesh_psk_file", "empty path".into());
        }
        match crate::mesh::parse_mesh_with(&self.mesh_with) {
            Err(e) => bad("mesh_with", e.to_string()),
            Ok(peers) if !peers.is_empty() && self.mesh_psk_file.is_none() => {
                bad("mesh_with", "mesh peers need mesh_psk_file".into())
            }
            Ok(_) => {}
        }
        match crate::mesh::quic::parse_mesh_quic_addr(&self.mesh_quic_addr) {
            Err(e) => bad("mesh_quic_addr", e.to_string()),
            Ok(Some(_)) if self.mesh_psk_file.is_none() => {
                bad("mesh_quic_addr", "the QUIC mesh needs mesh_psk_file".into())
            }
            Ok(_) => {}
        }
        match crate::mesh::quic::parse_mesh_quic_with(&self.mesh_quic_with) {
            Err(e) => bad("mesh_quic_with", e.to_string()),
            Ok(peers) if !peers.is_empty() && self.mesh_psk_file.is_none() => {
                bad("mesh_quic_with", "mesh peers need mesh_psk_file".into())
            }
            Ok(_) => {}
        }
        if let Err(e) = crate::mesh::quic::QuicTimers::new(
            self.mesh_quic_keepalive,
            self.mesh_quic_idle_timeout,
        ) {
            bad("mesh_quic_idle_timeout", e.to_string());
        }
        if self
            .mesh_ca_file
            .as_ref()
            .is_some_and(|p| p.as_os_str().is_empty())
        {
            bad("mesh_ca_file", "empty path".into());
        }
        if self.mesh_queue_depth == 0 || self.mesh_queue_depth > 1 << 20 {
            bad(
                "mesh_queue_depth",
                format!("{} is out of range 1..=1048576", self.mesh_queue_depth),
            );
        }
        if self.queue_depth == 0 || self.queue_depth > 65_536 {
            bad(
                "queue_depth",
                format!("{} is out of range 1..=65536", self.queue_depth),
            );
        }
        if self.write_timeout > Duration::from_secs(300) {
            bad("write_timeout", "must be at most 5m".into());
        }
        if self.keepalive < Duration::from_secs(1) || self.keepalive > Duration::from_secs(110) {
            bad(
                "keepalive",
                "must be between 1s and 110s (clients give up after 120s of silence)".into(),
            );
        }
        if let Some(limit) = self.accept_connection_limit {
            if !(limit.is_finite() && limit > 0.0) {
                bad(
                    "accept_connection_limit",
                    format!("{limit} is not a positive number"),
                );
            }
        }
        if self.accept_connection_burst == Some(0) {
            bad("accept_connection_burst", "must be at least 1".into());
        }
        if self.accept_connection_burst.is_some() && self.accept_connection_limit.is_none() {
            bad(
                "accept_connection_burst",
                "set only together with accept_connection_limit".into(),
            );
        }
        if self.tcp_user_timeout > Duration::from_secs(3600) {
            bad("tcp_user_timeout", "must be at most 1h".into());
        }
        if !self.tcp_keepalive.is_zero() && self.tcp_keepalive < Duration::from_secs(1) {
            bad("tcp_keepalive", "must be 0s (off) or at least 1s".into());
        }
        if let Some(limit) = self.accept_connection_limit_per_ip {
            if !(limit.is_finite() && limit > 0.0) {
                bad(
                    "accept_connection_limit_per_ip",
                    format!("{limit} is not a positive number"),
                );
            }
        }
        if self.max_connections == 0 {
            bad("max_connections", "must be at least 1".into());
        }
        if errs.is_empty() {
            Ok(())
        } else {
            Err(ConfigErrors(errs))
        }
    }
}

/// Parses `"1h"`, `"10m"`, `"2s"`, `"500ms"`, `"1.5s"`, or a bare number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration like 2s, 500ms, 10m"))?;
    let secs = match unit.trim() {
        "" | "s" => n,
        "ms" => n / 1000.0,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        other => return Err(format!("unknown duration unit {other:?} in {s:?}")),
    };
    Duration::try_from_secs_f64(secs).map_err(|_| format!("{s:?} is out of range"))
}

/// Formats a duration the way [`parse_duration`] reads it.
pub fn format_duration(d: Duration) -> String {
    if d.subsec_nanos() == 0 {
        let s = d.as_secs();
        if s != 0 && s.checked_rem(3600) == Some(0) {
            format!("{}h", s / 3600)
        } else if s != 0 && s.checked_rem(60) == Some(0) {
            format!("{}m", s / 60)
        } else {
            format!("{s}s")
        }
    } else {
        format!("{}ms", d.as_millis())
    }
}

mod duration_text {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&super::format_duration(*d))
    }

    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Text(String),
        Int(u64),
        Float(f64),
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        match Raw::deserialize(d)? {
            Raw::Text(t) => super::parse_duration(&t).map_err(serde::de::Error::custom),
            Raw::Int(n) => Ok(Duration::from_secs(n)),
            Raw::Float(f) => Duration::try_from_secs_f64(f).map_err(serde::de::Error::custom),
        }
    }
}

#[cfg(test)]
mod edge_tests {
    use super::*;

    #[test]
    fn edge_defaults_validate() {
        EdgeConfig::default().validate().unwrap();
    }

    #[test]
    fn edge_durations_and_addrs() {
        assert_eq!(parse_duration("2s").unwrap(), Duration::from_secs(2));
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("10m").unwrap(), Duration::from_secs(600));
        assert_eq!(parse_duration("1.5s").unwrap(), Duration::from_millis(1500));
        assert_eq!(parse_duration("3").unwrap(), Duration::from_secs(3));
        assert!(parse_duration("3 parsecs").is_err());
        assert!(parse_duration("").is_err());
        assert_eq!(format_duration(Duration::from_secs(600)), "10m");
        assert_eq!(format_duration(Duration::from_millis(1500)), "1500ms");
        assert_eq!(
            parse_listen_addr(":443").unwrap(),
            Some("0.0.0.0:443".parse().unwrap())
        );
        assert_eq!(
            parse_listen_addr("[::1]:80").unwrap(),
            Some("[::1]:80".parse().unwrap())
        );
        assert_eq!(
            parse_listen_addr("localhost:80").unwrap(),
            Some("127.0.0.1:80".parse().unwrap())
        );
        assert_eq!(parse_listen_addr("").unwrap(), None);
        assert!(parse_listen_addr("example.com:80").is_err());
    }

    #[test]
    fn edge_acme_settings_are_checked() {
        let acme = |f: &dyn Fn(&mut EdgeConfig)| {
            let mut cfg = EdgeConfig {
                https_addr: "127.0.0.1:443".into(),
                acme_hostname: Some("derp.example.com".into()),
                acme_cert_dir: Some("/var/lib/certs".into()),
                ..EdgeConfig::default()
            };
            f(&mut cfg);
            cfg.validate()
                .err()
                .map(|e| e.0.iter().map(|e| e.field).collect::<Vec<_>>())
        };
        assert_eq!(acme(&|_| {}), None, "ACME instead of certificate files");
        assert_eq!(
            acme(&|c| c.acme_cert_dir = None),
            Some(vec!["acme_cert_dir"])
        );
        assert_eq!(
            acme(&|c| c.tls_cert = Some("/c".into())),
            Some(vec!["acme_hostname"])
        );
        assert_eq!(acme(&|c| c.https_addr.clear()), Some(vec!["acme_hostname"]));
        for bad in ["10.0.0.1", "a..b", "", "x_y.example"] {
            assert_eq!(
                acme(&|c| c.acme_hostname = Some(bad.into())),
                Some(vec!["acme_hostname"]),
                "{bad}"
            );
        }
        assert_eq!(
            acme(&|c| c.acme_challenge = "dns-01".into()),
            Some(vec!["acme_challenge"])
        );
        assert_eq!(
            acme(&|c| {
                c.acme_challenge = "http-01".into();
                c.http_addr.clear();
            }),
            Some(vec!["acme_challenge"])
        );
        assert_eq!(
            acme(&|c| c.acme_directory_url = "http://ca/dir".into()),
            Some(vec!["acme_directory_url"])
        );
        assert_eq!(
            acme(&|c| c.acme_check_interval = Duration::from_millis(10)),
            Some(vec!["acme_check_interval"])
        );
    }

    #[test]
    fn edge_quic_mesh_timers_are_checked() {
        let timers = |keepalive: u64, idle: u64| {
            EdgeConfig {
                mesh_quic_keepalive: Duration::from_millis(keepalive),
                mesh_quic_idle_timeout: Duration::from_millis(idle),
                ..EdgeConfig::default()
            }
            .validate()
            .err()
            .map(|e| e.0.iter().map(|e| e.field).collect::<Vec<_>>())
        };
        assert_eq!(timers(300, 1_500), None);
        assert_eq!(timers(3_000, 6_000), None, "exactly half");
        let refused = Some(vec!["mesh_quic_idle_timeout"]);
        assert_eq!(
            timers(3_001, 6_000),
            refused,
            "one lost keep-alive would end it"
        );
        assert_eq!(timers(99, 1_000), refused, "keep-alive too short");
        assert_eq!(timers(1_000, 600_001), refused, "idle timeout over 10m");
    }

    #[test]
    fn edge_toml_round_trip_and_errors_name_fields() {
        let cfg: EdgeConfig = toml::from_str(
            r#"
            http_addr = ""
            https_addr = ":8443"
            tls_cert = "/c.pem"
            stun_addr = "nonsense"
            queue_depth = 0
            write_timeout = "1s"
            keepalive = 200
            accept_connection_burst = 0
            "#,
        )
        .unwrap();
        assert_eq!(cfg.write_timeout, Duration::from_secs(1));
        let errs = cfg.validate().unwrap_err().0;
        let fields: Vec<_> = errs.iter().map(|e| e.field).collect();
        for f in [
            "tls_key",
            "stun_addr",
            "queue_depth",
            "keepalive",
            "accept_connection_burst",
        ] {
            assert!(fields.contains(&f), "{f} missing from {errs:?}");
        }
        let text = toml::to_string(&EdgeConfig::default()).unwrap();
        let back: EdgeConfig = toml::from_str(&text).unwrap();
        assert_eq!(back, EdgeConfig::default());
        assert!(toml::from_str::<EdgeConfig>("bogus = 1").is_err());
    }
}
