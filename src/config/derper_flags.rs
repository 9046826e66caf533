//! derper's command line, accepted by `tailnetd derp` unchanged.
//!
//! Why: operators replacing `derper` have command lines in systemd units, container specs and
//! runbooks (`derper -hostname=derp.example.com -c=/var/lib/derper/derper.key -a=:443
//! -stun-port=3478 -certmode=manual -certdir=/etc/derper`). Go's `flag` package accepts `-flag`,
//! `--flag`, `-flag=value` and `-flag value` (booleans only as `-flag` or `-flag=value`), which
//! clap does not; and several derper flags mean something only together (whether `-a` serves
//! TLS depends on its port and `-certmode`; `-http-port` and `-stun-port` bind to `-a`'s host).
//! So before clap sees the arguments, [`translate`] reads derper's flags with Go's rules, derives
//! tailnetd's settings with derper's meaning, and passes every other argument through unchanged.
//!
//! A flag whose feature tailnetd lacks is an error naming it (never silently ignored); a flag
//! that only refines a feature left off (`-socket` without `-verify-clients`, `-acme-email`
//! without `-certmode=letsencrypt`) is accepted and has no effect, as in derper.
//! `-certmode=letsencrypt` maps to the `[acme]` settings (hostname, cert directory, e-mail); the
//! ACME directory and a private CA for it stay tailnetd's flags (`--acme-directory-url`,
//! `--acme-ca-file`), which may be given alongside. When any of derper's listener or
//! key flags (`-a`, `-http-port`, `-stun-port`, `-stun`, `-certmode`, `-certdir`, `-hostname`,
//! `-c`) is present, derper's defaults apply to all of them (`-a :443`, `-http-port 80`,
//! `-stun-port 3478`, `-certmode letsencrypt`, the key file `/var/lib/derper/derper.key` when
//! running as root) and to the mesh key file (`/home/derp/keys/derp-mesh.key` or
//! `~/keys/derp-mesh.key` if present); tailnetd's own listener flags cannot be mixed with them.
//! Without them, the other derper flags map one by one and tailnetd's listener defaults stay.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

/// How Go's flag package reads a flag's value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// `-flag` (true) or `-flag=value`; never takes the next argument.
    Bool,
    /// `-flag=value` or `-flag value`.
    Value,
}

/// Every flag of derper at tailscale.com v1.102.5 (`cmd/derper/derper.go`).
const DERPER_FLAGS: &[(&str, Kind)] = &[
    ("dev", Kind::Bool),
    ("version", Kind::Bool),
    ("a", Kind::Value),
    ("http-port", Kind::Value),
    ("stun-port", Kind::Value),
    ("c", Kind::Value),
    ("certmode", Kind::Value),
    ("certdir", Kind::Value),
    ("hostname", Kind::Value),
    ("acme-eab-kid", Kind::Value),
    ("acme-eab-key", Kind::Value),
    ("acme-email", Kind::Value),
    ("acme-ip-certs", Kind::Bool),
    ("stun", Kind::Bool),
    ("derp", Kind::Bool),
    ("home", Kind::Value),
    ("mesh-psk-file", Kind::Value),
    ("mesh-with", Kind::Value),
    ("secrets-url", Kind::Value),
    ("secrets-path-prefix", Kind::Value),
    ("secrets-cache-dir", Kind::Value),
    ("bootstrap-dns-names", Kind::Value),
    ("unpublished-bootstrap-dns-names", Kind::Value),
    ("verify-clients", Kind::Bool),
    ("verify-client-url", Kind::Value),
    ("verify-client-url-fail-open", Kind::Bool),
    ("socket", Kind::Value),
    ("accept-connection-limit", Kind::Value),
    ("accept-connection-burst", Kind::Value),
    ("rate-config", Kind::Value),
    ("tcp-keepalive-time", Kind::Value),
    ("tcp-user-timeout", Kind::Value),
    ("tcp-write-timeout", Kind::Value),
    ("ace", Kind::Bool),
];

/// derper's listener and key flags: any of them switches on derper's defaults for all of them.
const LISTENER_NAMES: &[&str] = &[
    "a",
    "http-port",
    "stun-port",
    "stun",
    "certmode",
    "certdir",
    "hostname",
    "c",
];

/// tailnetd flags that derper's listener and key flags replace.
const LISTENER_FLAGS: &[&str] = &[
    "--http-addr",
    "--https-addr",
    "--stun-addr",
    "--tls-cert",
    "--tls-key",
    "--key-file",
    "--acme-hostname",
    "--acme-cert-dir",
];

/// The setting that derper's `-mesh-with` maps to (`relay.mesh_with`, flag `--mesh-with`).
const MESH_WITH_FLAG: &str = "--mesh-with";

/// Rewrites a `tailnetd derp ...` command line that uses derper's flags into tailnetd's flags;
/// any other command line is returned unchanged. `has_flag` says whether this build's `derp`
/// role has a long flag (to map `-mesh-with` only where the mesh client exists).
pub fn translate(
    args: Vec<OsString>,
    has_flag: &dyn Fn(&str) -> bool,
) -> Result<Vec<OsString>, String> {
    if args.get(1).and_then(|a| a.to_str()) != Some("derp") {
        return Ok(args);
    }
    let mut it = args.into_iter();
    let mut out: Vec<OsString> = it.by_ref().take(2).collect();
    let mut given: Vec<(&'static str, String)> = Vec::new();
    let mut passthrough: Vec<OsString> = Vec::new();
    while let Some(arg) = it.next() {
        let Some(text) = arg.to_str() else {
            passthrough.push(arg);
            continue;
        };
        if text == "--" {
            passthrough.push(arg);
            passthrough.extend(it.by_ref());
            break;
        }
        let Some(body) = text
            .strip_prefix("--")
            .or_else(|| text.strip_prefix('-'))
            .filter(|b| !b.is_empty() && !b.starts_with('-'))
        else {
            passthrough.push(arg);
            continue;
        };
        let (name, inline) = match body.split_once('=') {
            Some((n, v)) => (n, Some(v.to_string())),
            None => (body, None),
        };
        let Some(&(name, kind)) = DERPER_FLAGS.iter().find(|(n, _)| *n == name) else {
            passthrough.push(arg);
            continue;
        };
        let value = match (kind, inline) {
            (_, Some(v)) => v,
            // tailnetd's own syntax for booleans is `--flag true|false`: a boolean literal right
            // after a bare boolean flag is its value (Go would stop parsing flags there).
            (Kind::Bool, None) => match it.as_slice().first().and_then(|a| a.to_str()) {
                Some(next) if go_bool(next).is_some() => {
                    let v = next.to_string();
                    it.next();
                    v
                }
                _ => "true".to_string(),
            },
            (Kind::Value, None) => match it.next() {
                Some(v) => v
                    .into_string()
                    .map_err(|_| format!("-{name}: the value is not UTF-8"))?,
                None => return Err(format!("-{name}: flag needs an argument")),
            },
        };
        let value = if kind == Kind::Bool {
            go_bool(&value)
                .ok_or_else(|| format!("-{name}={value}: invalid boolean value"))?
                .to_string()
        } else {
            value
        };
        given.push((name, value));
    }
    let derper_mode = given.iter().any(|(n, _)| LISTENER_NAMES.contains(n));
    let mut f = Flags::new(given);
    if derper_mode {
        if let Some(native) = passthrough.iter().filter_map(|a| a.to_str()).find(|a| {
            LISTENER_FLAGS
                .iter()
                .any(|l| *a == *l || a.starts_with(&format!("{l}=")))
        }) {
            return Err(format!(
                "{native}: cannot be mixed with derper's listener flags (-a, -http-port, \
                 -stun-port, -stun, -certmode, -certdir, -hostname, -c); use one style"
            ));
        }
    }
    let mut emitted = f.translate(derper_mode, has_flag)?;
    out.append(&mut passthrough);
    out.append(&mut emitted);
    Ok(out)
}

/// Go's `strconv.ParseBool`.
fn go_bool(v: &str) -> Option<bool> {
    match v {
        "1" | "t" | "T" | "TRUE" | "true" | "True" => Some(true),
        "0" | "f" | "F" | "FALSE" | "false" | "False" => Some(false),
        _ => None,
    }
}

/// derper's flags as given (the last occurrence wins, as in Go).
struct Flags {
    given: Vec<(&'static str, String)>,
}

impl Flags {
    fn new(given: Vec<(&'static str, String)>) -> Self {
        Flags { given }
    }

    fn get(&self, name: &str) -> Option<&str> {
        self.given
            .iter()
            .rev()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
    }

    fn flag(&self, name: &str, default: bool) -> bool {
        self.get(name).map_or(default, |v| v == "true")
    }

    /// Errors for a flag whose feature tailnetd lacks, when it asks for that feature.
    fn refuse(&self, name: &str, asks: impl Fn(&str) -> bool, why: &str) -> Result<(), String> {
        match self.get(name) {
            Some(v) if asks(v) => Err(format!("-{name}={v}: {why}")),
            _ => Ok(()),
        }
    }

    fn translate(
        &mut self,
        derper_mode: bool,
        has_flag: &dyn Fn(&str) -> bool,
    ) -> Result<Vec<OsString>, String> {
        let mut out: Vec<String> = Vec::new();
        let set = |out: &mut Vec<String>, flag: &str, value: &str| {
            out.push(format!("{flag}={value}"));
        };
        let on = |v: &str| v == "true";
        let nonempty = |v: &str| !v.is_empty();
        self.refuse(
            "dev",
            on,
            "derper's localhost dev mode (ephemeral key, plain HTTP on :3340) is `tailnetd dev`",
        )?;
        self.refuse("version", on, "print the version with `tailnetd --version`")?;
        self.refuse(
            "derp",
            |v| v == "false",
            "tailnetd cannot keep serving only probes and bootstrap DNS with the relay off",
        )?;
        self.refuse("verify-clients", on, "tailnetd cannot ask a local tailscaled about clients; use -verify-client-url (a tailnetd coordinator answers at /tailnetd/derp-admit)")?;
        self.refuse(
            "home",
            nonempty,
            "tailnetd does not serve a configurable home page",
        )?;
        self.refuse(
            "bootstrap-dns-names",
            nonempty,
            "tailnetd does not serve /bootstrap-dns",
        )?;
        self.refuse(
            "unpublished-bootstrap-dns-names",
            nonempty,
            "tailnetd does not serve /bootstrap-dns",
        )?;
        self.refuse(
            "secrets-url",
            nonempty,
            "tailnetd cannot fetch the mesh key from setec; use -mesh-psk-file",
        )?;
        self.refuse(
            "acme-ip-certs",
            on,
            "tailnetd obtains ACME certificates for DNS names only, not IP addresses",
        )?;
        self.refuse("ace", on, "tailnetd has no ACE (CONNECT proxy) server")?;

        // Shared names: the same flag, Go's syntax.
        if let Some(v) = self.get("verify-client-url") {
            set(&mut out, "--verify-client-url", v);
        }
        if let Some(v) = self.get("verify-client-url-fail-open") {
            set(&mut out, "--verify-client-url-fail-open", v);
        }
        if let Some(v) = self.get("rate-config") {
            set(&mut out, "--rate-config", v);
        }
        if let Some(v) = self.get("mesh-with") {
            if !v.is_empty() {
                if !has_flag(MESH_WITH_FLAG.trim_start_matches('-')) {
                    return Err(format!(
                        "-mesh-with={v}: this build of tailnetd has no outbound DERP mesh \
                         (setting relay.mesh_with, flag {MESH_WITH_FLAG})"
                    ));
                }
                set(&mut out, MESH_WITH_FLAG, v);
            }
        }
        let mesh_psk = self.get("mesh-psk-file").map(str::to_string).or_else(|| {
            derper_mode
                .then(default_mesh_psk_file)
                .flatten()
                .map(|p| p.display().to_string())
        });
        if let Some(p) = mesh_psk.filter(|p| !p.is_empty()) {
            set(&mut out, "--mesh-psk-file", &p);
        }

        // Limits and TCP tuning.
        if let Some(v) = self.get("accept-connection-limit") {
            let limit: f64 = v
                .trim()
                .parse()
                .map_err(|_| format!("-accept-connection-limit={v}: not a number"))?;
            if limit.is_nan() || limit < 0.0 {
                return Err(format!("-accept-connection-limit={v}: must be 0 or more"));
            }
            if limit.is_finite() {
                set(
                    &mut out,
                    "--relay-accept-connection-limit",
                    &limit.to_string(),
                );
            }
        }
        if let Some(v) = self.get("accept-connection-burst") {
            let burst: i64 = v
                .trim()
                .parse()
                .map_err(|_| format!("-accept-connection-burst={v}: not an integer"))?;
            let burst = u32::try_from(burst.max(0)).unwrap_or(u32::MAX);
            set(
                &mut out,
                "--relay-accept-connection-burst",
                &burst.to_string(),
            );
        }
        for (derper, tailnetd) in [
            ("tcp-keepalive-time", "--relay-tcp-keepalive"),
            ("tcp-user-timeout", "--relay-tcp-user-timeout"),
            ("tcp-write-timeout", "--relay-write-timeout"),
        ] {
            if let Some(v) = self.get(derper) {
                let d = go_duration(v).map_err(|e| format!("-{derper}={v}: {e}"))?;
                set(&mut out, tailnetd, &d);
            }
        }

        if derper_mode {
            self.listeners(&mut out)?;
        }
        Ok(out.into_iter().map(OsString::from).collect())
    }

    /// `-a`, `-http-port`, `-stun-port`, `-stun`, `-certmode`, `-certdir`, `-hostname`, `-c`
    /// with derper's defaults and meaning.
    fn listeners(&self, out: &mut Vec<String>) -> Result<(), String> {
        let addr = self.get("a").unwrap_or(":443");
        let (host, port) = split_host_port(addr)
            .ok_or_else(|| format!("-a={addr}: invalid server address (want host:port)"))?;
        let certmode = self.get("certmode").unwrap_or("letsencrypt");
        let serve_tls = port == "443" || certmode == "manual";
        let join = |p: &str| {
            if host.contains(':') {
                format!("[{host}]:{p}")
            } else {
                format!("{host}:{p}")
            }
        };
        let port_of = |name: &str, default: i64| -> Result<i64, String> {
            match self.get(name) {
                None => Ok(default),
                Some(v) => v
                    .trim()
                    .parse::<i64>()
                    .map_err(|_| format!("-{name}={v}: not an integer")),
            }
        };
        if serve_tls {
            let hostname = self.get("hostname").unwrap_or("derp.tailscale.com");
            let dir = self
                .get("certdir")
                .map(PathBuf::from)
                .unwrap_or_else(default_cert_dir);
            match certmode {
                "manual" => {}
                "letsencrypt" => {
                    for eab in ["acme-eab-kid", "acme-eab-key"] {
                        self.refuse(
                            eab,
                            |v| !v.is_empty(),
                            "tailnetd does not do ACME External Account Binding",
                        )?;
                    }
                    if hostname.parse::<std::net::IpAddr>().is_ok() {
                        return Err(format!(
                            "-hostname={hostname}: tailnetd obtains ACME certificates for DNS \
                             names only; use -certmode=manual for an IP address"
                        ));
                    }
                    out.push(format!("--https-addr={addr}"));
                    out.push(format!("--acme-hostname={hostname}"));
                    out.push(format!("--acme-cert-dir={}", dir.display()));
                    if let Some(email) = self.get("acme-email").filter(|e| !e.is_empty()) {
                        out.push(format!("--acme-email={email}"));
                    }
                }
                "gcp" => {
                    return Err(
                        "-certmode=gcp: Google's CA needs ACME External Account Binding, which \
                         tailnetd does not do; use -certmode=letsencrypt or -certmode=manual"
                            .to_string(),
                    )
                }
                other => return Err(format!("-certmode={other}: unsupported cert mode")),
            }
            let name = safe_hostname(hostname);
            let crt = dir.join(format!("{name}.crt"));
            let key = dir.join(format!("{name}.key"));
            if certmode == "manual" && hostname.parse::<std::net::IpAddr>().is_ok() && !crt.exists()
            {
                return Err(format!(
                    "-hostname={hostname}: derper creates a self-signed certificate for an IP \
                     address when {} is missing; tailnetd does not: create it (and {})",
                    crt.display(),
                    key.display()
                ));
            }
            if certmode == "manual" {
                out.push(format!("--https-addr={addr}"));
                out.push(format!("--tls-cert={}", crt.display()));
                out.push(format!("--tls-key={}", key.display()));
            }
            let http_port = port_of("http-port", 80)?;
            if http_port > -1 {
                out.push(format!("--http-addr={}", join(&http_port.to_string())));
            } else {
                out.push("--http-addr=".to_string());
            }
        } else {
            // Plain HTTP on -a; derper serves nothing else over TCP then.
            out.push(format!("--http-addr={addr}"));
            out.push("--https-addr=".to_string());
        }
        if self.flag("stun", true) {
            let stun_port = port_of("stun-port", 3478)?;
            out.push(format!("--stun-addr={}", join(&stun_port.to_string())));
        } else {
            out.push("--stun-addr=".to_string());
        }
        match self.get("c") {
            Some(c) => out.push(format!("--key-file={c}")),
            None if running_as_root() => {
                out.push("--key-file=/var/lib/derper/derper.key".to_string())
            }
            // Not root: derper requires -c; tailnetd's key_file check says so (unless the
            // config file names one).
            None => {}
        }
        Ok(())
    }
}

/// Go's `net.SplitHostPort` for listen addresses (`:443`, `1.2.3.4:443`, `[::1]:443`).
fn split_host_port(addr: &str) -> Option<(&str, &str)> {
    if let Some(rest) = addr.strip_prefix('[') {
        let (host, port) = rest.split_once("]:")?;
        return Some((host, port));
    }
    let (host, port) = addr.rsplit_once(':')?;
    if host.contains(':') {
        return None;
    }
    Some((host, port))
}

/// derper's file name for a host's certificate: the hostname without characters outside
/// `[a-zA-Z0-9-.]`.
fn safe_hostname(h: &str) -> String {
    h.chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '.')
        .collect()
}

/// derper's default `-certdir` (`tsweb.DefaultCertDir("derper-certs")`: the user cache
/// directory + `tailscale/derper-certs`).
fn default_cert_dir() -> PathBuf {
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from("."));
    cache.join("tailscale").join("derper-certs")
}

/// derper's default `-mesh-psk-file`: the first of its two conventional paths that exists.
fn default_mesh_psk_file() -> Option<PathBuf> {
    let mut candidates = vec![PathBuf::from("/home/derp/keys/derp-mesh.key")];
    if let Some(h) = std::env::var_os("HOME") {
        candidates.push(Path::new(&h).join("keys").join("derp-mesh.key"));
    }
    candidates.into_iter().find(|p| p.exists())
}

/// Whether the process runs as root (the owner of `/proc/self` is the process's user).
fn running_as_root() -> bool {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
    }
    #[cfg(not(unix))]
    false
}

/// A Go `time.Duration` text (`10m0s`, `1h30m`, `1.5s`, `300ms`, `0`) as tailnetd's duration
/// text (milliseconds).
fn go_duration(text: &str) -> Result<String, String> {
    let t = text.trim();
    if t == "0" {
        return Ok("0".into());
    }
    if t.starts_with('-') {
        return Err("a negative duration".into());
    }
    let t = t.strip_prefix('+').unwrap_or(t);
    if t.is_empty() {
        return Err("empty duration".into());
    }
    let mut rest = t;
    let mut nanos = 0f64;
    while !rest.is_empty() {
        let n_end = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(|| format!("missing unit in duration {text:?}"))?;
        let (num, tail) = rest.split_at(n_end);
        let n: f64 = num
            .parse()
            .map_err(|_| format!("invalid duration {text:?}"))?;
        let u_end = tail
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(tail.len());
        let (unit, tail) = tail.split_at(u_end);
        let scale = match unit {
            "ns" => 1.0,
            "us" | "µs" | "μs" => 1e3,
            "ms" => 1e6,
            "s" => 1e9,
            "m" => 60e9,
            "h" => 3600e9,
            _ => return Err(format!("unknown unit {unit:?} in duration {text:?}")),
        };
        nanos += n * scale;
        rest = tail;
    }
    Ok(format!("{}ms", nanos / 1e6))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tr(line: &str) -> Result<Vec<String>, String> {
        tr_with(line, &|_| false)
    }

    fn tr_with(line: &str, has: &dyn Fn(&str) -> bool) -> Result<Vec<String>, String> {
        let args: Vec<OsString> = line.split_whitespace().map(OsString::from).collect();
        translate(args, has).map(|v| {
            v.into_iter()
                .map(|a| a.into_string().unwrap())
                .collect::<Vec<_>>()
        })
    }

    #[test]
    fn go_flag_syntax_every_form() {
        let out = tr("tailnetd derp -verify-client-url=http://a/x --verify-client-url-fail-open=f -rate-config /etc/rc.json").unwrap();
        assert_eq!(
            out,
            [
                "tailnetd",
                "derp",
                "--verify-client-url=http://a/x",
                "--verify-client-url-fail-open=false",
                "--rate-config=/etc/rc.json"
            ]
        );
        // A bare boolean is true and takes the next argument only if it is a boolean.
        let out = tr("tailnetd derp --verify-client-url-fail-open --check").unwrap();
        assert_eq!(out[2..], ["--check", "--verify-client-url-fail-open=true"]);
        let out = tr("tailnetd derp --verify-client-url-fail-open false --check").unwrap();
        assert_eq!(out[2..], ["--check", "--verify-client-url-fail-open=false"]);
        assert!(tr("tailnetd derp -stun=maybe")
            .unwrap_err()
            .contains("-stun=maybe"));
        assert!(tr("tailnetd derp -c")
            .unwrap_err()
            .contains("-c: flag needs an argument"));
        // Other roles and tailnetd's own flags pass through untouched.
        assert_eq!(
            tr("tailnetd dev -a :1").unwrap(),
            ["tailnetd", "dev", "-a", ":1"]
        );
        assert_eq!(
            tr("tailnetd derp --http-addr 127.0.0.1:0 --key-file k").unwrap()[2..],
            ["--http-addr", "127.0.0.1:0", "--key-file", "k"]
        );
    }

    #[test]
    fn manual_certs_on_443_with_derpers_defaults() {
        let out = tr("tailnetd derp -hostname=derp.example.com -c=/var/lib/derper/derper.key -a=:443 -stun-port=3478 -certmode=manual -certdir=/etc/derper").unwrap();
        assert_eq!(
            out[2..],
            [
                "--https-addr=:443",
                "--tls-cert=/etc/derper/derp.example.com.crt",
                "--tls-key=/etc/derper/derp.example.com.key",
                "--http-addr=:80",
                "--stun-addr=:3478",
                "--key-file=/var/lib/derper/derper.key",
            ]
        );
    }

    #[test]
    fn plain_http_when_not_443_and_not_manual() {
        let out =
            tr("tailnetd derp -a 127.0.0.1:3340 -http-port=-1 -stun=false -c k.json").unwrap();
        assert_eq!(
            out[2..],
            [
                "--http-addr=127.0.0.1:3340",
                "--https-addr=",
                "--stun-addr=",
                "--key-file=k.json"
            ]
        );
        let out = tr("tailnetd derp -a [::1]:8443 -certmode manual -hostname h -certdir d -http-port -1 -stun-port 3479 -c k").unwrap();
        assert_eq!(
            out[2..],
            [
                "--https-addr=[::1]:8443",
                "--tls-cert=d/h.crt",
                "--tls-key=d/h.key",
                "--http-addr=",
                "--stun-addr=[::1]:3479",
                "--key-file=k"
            ]
        );
    }

    #[test]
    fn letsencrypt_maps_to_the_acme_settings() {
        let out = tr("tailnetd derp -hostname=derp.example.com -c=k -certdir=/var/cache/derper -acme-email=ops@example.com --acme-directory-url=https://ca.test/dir").unwrap();
        assert_eq!(
            out[2..],
            [
                "--acme-directory-url=https://ca.test/dir",
                "--https-addr=:443",
                "--acme-hostname=derp.example.com",
                "--acme-cert-dir=/var/cache/derper",
                "--acme-email=ops@example.com",
                "--http-addr=:80",
                "--stun-addr=:3478",
                "--key-file=k",
            ]
        );
        // Not on 443 and not manual: plain HTTP, as derper; -acme-email then does nothing.
        let out =
            tr("tailnetd derp -a :8080 -hostname=h.example.com -acme-email=x@y -c k").unwrap();
        assert_eq!(out[2], "--http-addr=:8080");
        assert!(!out.iter().any(|a| a.starts_with("--acme")));
        for (line, flag) in [
            (
                "tailnetd derp -hostname=10.0.0.1 -certdir=d -c k",
                "-hostname=10.0.0.1",
            ),
            (
                "tailnetd derp -hostname=h -certdir=d -acme-eab-kid=x -c k",
                "-acme-eab-kid=x",
            ),
            (
                "tailnetd derp -certmode=gcp -hostname=h -certdir=d -c k",
                "-certmode=gcp",
            ),
            (
                "tailnetd derp -acme-ip-certs -hostname=h -certdir=d -c k",
                "-acme-ip-certs=true",
            ),
            (
                "tailnetd derp -hostname=h -certdir=d -c k --acme-hostname=other",
                "--acme-hostname=other: cannot be mixed",
            ),
        ] {
            let e = tr(line).unwrap_err();
            assert!(e.starts_with(flag), "{line}: {e}");
        }
    }

    #[test]
    fn missing_features_are_named_errors() {
        for (line, flag) in [
            ("tailnetd derp -verify-clients", "-verify-clients=true"),
            ("tailnetd derp -dev", "-dev=true"),
            ("tailnetd derp -derp=false -a :80 -c k", "-derp=false"),
            ("tailnetd derp -home=blank", "-home=blank"),
            (
                "tailnetd derp -bootstrap-dns-names=a.b",
                "-bootstrap-dns-names=a.b",
            ),
            (
                "tailnetd derp -secrets-url=https://s",
                "-secrets-url=https://s",
            ),
            (
                "tailnetd derp -certmode=bogus -a :443 -c k",
                "-certmode=bogus",
            ),
            ("tailnetd derp -mesh-with=a,b", "-mesh-with=a,b"),
        ] {
            let e = tr(line).unwrap_err();
            assert!(e.starts_with(flag), "{line}: {e}");
        }
        // Off or empty, the same flags are harmless.
        assert!(tr("tailnetd derp -verify-clients=false -derp=true -home= -a :80 -c k").is_ok());
        // With the mesh client built in, -mesh-with maps to its setting.
        let out = tr_with("tailnetd derp -mesh-with=a,b/c", &|f| f == "mesh-with").unwrap();
        assert_eq!(out[2..], ["--mesh-with=a,b/c"]);
        // An IP hostname without certificate files: derper would make one, tailnetd says so.
        let e = tr("tailnetd derp -hostname=10.0.0.1 -certmode=manual -certdir=/nonexistent -c k")
            .unwrap_err();
        assert!(e.starts_with("-hostname=10.0.0.1"), "{e}");
        let e = tr("tailnetd derp -a :80 -c k --http-addr=1.2.3.4:5").unwrap_err();
        assert!(
            e.starts_with("--http-addr=1.2.3.4:5: cannot be mixed"),
            "{e}"
        );
    }

    #[test]
    fn limits_and_durations() {
        let out = tr("tailnetd derp -accept-connection-limit=+Inf -accept-connection-burst=9223372036854775807 -tcp-keepalive-time=10m0s -tcp-user-timeout 15s -tcp-write-timeout=0").unwrap();
        assert_eq!(
            out[2..],
            [
                "--relay-accept-connection-burst=4294967295",
                "--relay-tcp-keepalive=600000ms",
                "--relay-tcp-user-timeout=15000ms",
                "--relay-write-timeout=0",
            ]
        );
        let out = tr("tailnetd derp -accept-connection-limit 2.5").unwrap();
        assert_eq!(out[2..], ["--relay-accept-connection-limit=2.5"]);
        assert_eq!(go_duration("1h30m").unwrap(), "5400000ms");
        assert_eq!(go_duration("1.5s").unwrap(), "1500ms");
        assert_eq!(go_duration("250us").unwrap(), "0.25ms");
        assert!(go_duration("10").is_err());
        assert!(go_duration("-1s").is_err());
    }
}
