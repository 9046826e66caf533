//! Command line, environment and TOML configuration for every role, from one definition.
//!
//! # Why it is built this way
//!
//! Every setting is declared exactly once, in the [`settings!`] invocation below: its TOML key,
//! type, default (which may depend on the role) and help text (its doc comment). Everything else
//! is derived from that declaration:
//!
//! - the flag: `--` + the group's flag prefix + the key with `_` → `-` (`[relay] queue_depth` →
//!   `--relay-queue-depth`), unless the declaration overrides it (`#[flag = "upstream"]`);
//! - the environment twin: `TAILNETD_` + the flag in upper case (`TAILNETD_RELAY_QUEUE_DEPTH`);
//! - the TOML key: the group's section + the name (`relay.queue_depth`; top-level when the
//!   section is empty);
//! - `tailnetd <role> --help`: one entry per setting of the groups that role uses, under the
//!   group's heading, showing the role's default and the TOML key; settings that only make sense
//!   in the file (lists of regions, tokens, keys) are listed after the flags;
//! - the merge: flag, then environment (clap reads both, so a flag wins over its twin), then the
//!   file, then the role's default;
//! - `--check`: the effective value of every setting and where it came from.
//!
//! A declarative macro was chosen over a struct deriving both `clap::Args` and
//! `serde::Deserialize` because the derives cannot share a default or a help text, cannot make the
//! default depend on the role, and cannot name the flag and the TOML key from one identifier
//! without repeating it; the macro generates a typed struct per group instead, which the rest of
//! the binary reads like any other struct. Adding a setting is one declaration (a doc comment
//! and `name: Type = |role| default;`) in its group, plus the line in [`Settings::resolve`] that
//! hands the value to the library config that uses it; its flag, variable, key, help and
//! `--check` line need nothing more. Adding a group is one block naming its section, flag
//! prefix and roles, plus its `resolve` call in [`Settings::resolve`].
//!
//! Groups, not single settings, carry the roles: a role's command line has exactly the flags of
//! its groups (so `tailnetd derp --help` shows no coordinator setting, and `--upstream` is an
//! unknown argument there), and a file key of a group the role does not use is an error.
//!
//! Values are parsed by [`SettingValue`], once for text (flags and environment) and once for TOML
//! values. Durations are always written in human form (`500ms`, `5s`, `10m`, `1h`), in every
//! source. Structured values (regions, tokens, resume keys) are file-only: their type says so
//! (`SettingValue::FLAG`), so no flag is generated for them.
//!
//! Everything is validated here, before any socket is opened, so that a bad value fails at
//! start-up with a message naming the field (`relay.keepalive (--relay-keepalive): ...`) instead
//! of surfacing later as a confusing runtime error. Unknown TOML keys, and keys of settings the
//! chosen role does not use, are errors naming the key: a typo never silently falls back to a
//! default.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use clap::parser::ValueSource;
use clap::{Arg, ArgAction, ArgMatches, Command};
use coordinator::auth::{StaticAgent, StaticAuthConfig, StaticAuthenticator, StaticUser};
use coordinator::config::{CoordinatorConfig, ResumeKeyConfig};
use coordinator::derpmap::DerpMapConfig;
use coordinator::relay_health::RegionHealthConfig;
use coordinator::upstream::UpstreamConfig;
use derp::EdgeConfig;
use proto::derpmap::DerpRegion;

/// Which parts a process runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Dev,
    Serve,
    Coordinator,
    Derp,
}

const EVERY_ROLE: &[Role] = &[Role::Dev, Role::Serve, Role::Coordinator, Role::Derp];
const RELAY_ROLES: &[Role] = &[Role::Dev, Role::Serve, Role::Derp];
const COORDINATOR_ROLES: &[Role] = &[Role::Dev, Role::Serve, Role::Coordinator];
/// Roles whose coordinator hands out a DERP map naming this process's own relay.
const EMBEDDED_RELAY_ROLES: &[Role] = &[Role::Dev, Role::Serve];

impl Role {
    pub fn runs_relay(self) -> bool {
        RELAY_ROLES.contains(&self)
    }
    pub fn runs_coordinator(self) -> bool {
        COORDINATOR_ROLES.contains(&self)
    }
    pub fn name(self) -> &'static str {
        match self {
            Role::Dev => "dev",
            Role::Serve => "serve",
            Role::Coordinator => "coordinator",
            Role::Derp => "derp",
        }
    }
    fn about(self) -> &'static str {
        match self {
            Role::Dev => "Everything on 127.0.0.1 with in-memory state and generated dev credentials (printed as JSON).",
            Role::Serve => "Coordinator and relay in one process: the sidecar next to coderd.",
            Role::Coordinator => "Coordinator only.",
            Role::Derp => "Relay and STUN only: what a regional relay node runs.",
        }
    }
    fn from_name(name: &str) -> Option<Role> {
        EVERY_ROLE.iter().copied().find(|r| r.name() == name)
    }
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

// ---------------------------------------------------------------------------------------------
// Values
// ---------------------------------------------------------------------------------------------

/// How a setting's type is read from text (flags, environment) and from TOML, and shown back.
pub trait SettingValue: Sized {
    /// Whether the value can be given as a flag and environment variable. Structured values are
    /// file-only.
    const FLAG: bool = true;
    /// What `--help` shows as the value's placeholder.
    const VALUE_NAME: &'static str;
    /// Parses a flag or environment value.
    fn from_text(text: &str) -> Result<Self, String>;
    /// Converts a TOML value.
    fn from_toml(value: toml::Value) -> Result<Self, String>;
    /// The value as TOML text; `None` when unset. Secrets are never shown.
    fn to_toml(&self) -> Option<String>;
}

fn type_error(expected: &str, got: &toml::Value) -> String {
    format!("expected {expected}, got {} {got}", got.type_str())
}

impl SettingValue for String {
    const VALUE_NAME: &'static str = "TEXT";
    fn from_text(text: &str) -> Result<Self, String> {
        Ok(text.to_string())
    }
    fn from_toml(value: toml::Value) -> Result<Self, String> {
        match value {
            toml::Value::String(s) => Ok(s),
            other => Err(type_error("a string", &other)),
        }
    }
    fn to_toml(&self) -> Option<String> {
        Some(toml::Value::String(self.clone()).to_string())
    }
}

/// A database URL: used as given, shown (by `--check`, in logs) with its password replaced.
#[derive(Clone, PartialEq, Eq)]
pub struct DatabaseUrl(pub String);

impl DatabaseUrl {
    /// The URL with the password of its user info and any `password=` parameter replaced by
    /// `(secret)`.
    pub fn redacted(&self) -> String {
        let url = &self.0;
        let mut out = match url.find("://") {
            Some(scheme_end) => {
                let rest = &url[scheme_end + 3..];
                let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
                let authority = &rest[..authority_end];
                match authority.rfind('@') {
                    Some(at) => {
                        let user_info = &authority[..at];
                        let user = user_info.split(':').next().unwrap_or("");
                        let shown = if user_info.contains(':') {
                            format!("{user}:(secret)")
                        } else {
                            user.to_string()
                        };
                        format!(
                            "{}{shown}{}",
                            &url[..scheme_end + 3],
                            &url[scheme_end + 3 + at..]
                        )
                    }
                    None => url.clone(),
                }
            }
            None => url.clone(),
        };
        if let Some(q) = out.find('?') {
            let (head, query) = out.split_at(q + 1);
            let query: Vec<String> = query
                .split('&')
                .map(|kv| match kv.split_once('=') {
                    Some((k, _)) if k.eq_ignore_ascii_case("password") => format!("{k}=(secret)"),
                    _ => kv.to_string(),
                })
                .collect();
            out = format!("{head}{}", query.join("&"));
        }
        out
    }
}

impl std::fmt::Debug for DatabaseUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}", self.redacted())
    }
}

impl SettingValue for DatabaseUrl {
    const VALUE_NAME: &'static str = "URL";
    fn from_text(text: &str) -> Result<Self, String> {
        Ok(DatabaseUrl(text.to_string()))
    }
    fn from_toml(value: toml::Value) -> Result<Self, String> {
        String::from_toml(value).map(DatabaseUrl)
    }
    fn to_toml(&self) -> Option<String> {
        Some(toml::Value::String(self.redacted()).to_string())
    }
}

impl SettingValue for PathBuf {
    const VALUE_NAME: &'static str = "PATH";
    fn from_text(text: &str) -> Result<Self, String> {
        if text.is_empty() {
            return Err("empty path".into());
        }
        Ok(PathBuf::from(text))
    }
    fn from_toml(value: toml::Value) -> Result<Self, String> {
        Self::from_text(&String::from_toml(value)?)
    }
    fn to_toml(&self) -> Option<String> {
        Some(toml::Value::String(self.display().to_string()).to_string())
    }
}

impl SettingValue for bool {
    const VALUE_NAME: &'static str = "true|false";
    fn from_text(text: &str) -> Result<Self, String> {
        match text.trim() {
            "true" => Ok(true),
            "false" => Ok(false),
            other => Err(format!("{other:?} is neither true nor false")),
        }
    }
    fn from_toml(value: toml::Value) -> Result<Self, String> {
        match value {
            toml::Value::Boolean(b) => Ok(b),
            other => Err(type_error("true or false", &other)),
        }
    }
    fn to_toml(&self) -> Option<String> {
        Some(self.to_string())
    }
}

macro_rules! integer_setting {
    ($($t:ty),*) => {$(
        impl SettingValue for $t {
            const VALUE_NAME: &'static str = "N";
            fn from_text(text: &str) -> Result<Self, String> {
                text.trim().parse().map_err(|e| format!("{text:?}: {e}"))
            }
            fn from_toml(value: toml::Value) -> Result<Self, String> {
                match value {
                    toml::Value::Integer(n) => {
                        <$t>::try_from(n).map_err(|_| format!("{n} is out of range"))
                    }
                    other => Err(type_error("an integer", &other)),
                }
            }
            fn to_toml(&self) -> Option<String> {
                Some(self.to_string())
            }
        }
    )*};
}
integer_setting!(u32, u64, usize, i64);

impl SettingValue for f64 {
    const VALUE_NAME: &'static str = "NUMBER";
    fn from_text(text: &str) -> Result<Self, String> {
        text.trim().parse().map_err(|e| format!("{text:?}: {e}"))
    }
    fn from_toml(value: toml::Value) -> Result<Self, String> {
        match value {
            toml::Value::Float(f) => Ok(f),
            // A TOML integer is exact in f64 for every realistic rate.
            toml::Value::Integer(n) => Ok(n as f64),
            other => Err(type_error("a number", &other)),
        }
    }
    fn to_toml(&self) -> Option<String> {
        Some(toml::Value::Float(*self).to_string())
    }
}

/// Parses a duration in human form: a number and a unit (`500ms`, `5s`, `1.5s`, `10m`, `1h`);
/// `0` alone means zero. Bare numbers are refused so that no source guesses a unit.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let t = text.trim();
    if t != "0" && t.ends_with(|c: char| c.is_ascii_digit() || c == '.') {
        return Err(format!(
            "{text:?} has no unit: write a duration like 500ms, 5s, 10m or 1h"
        ));
    }
    derp::edge::config::parse_duration(t)
}

impl SettingValue for Duration {
    const VALUE_NAME: &'static str = "DURATION";
    fn from_text(text: &str) -> Result<Self, String> {
        parse_duration(text)
    }
    fn from_toml(value: toml::Value) -> Result<Self, String> {
        match value {
            toml::Value::String(s) => parse_duration(&s),
            other => Err(type_error("a duration text such as \"5s\"", &other)),
        }
    }
    fn to_toml(&self) -> Option<String> {
        Some(toml::Value::String(derp::edge::config::format_duration(*self)).to_string())
    }
}

impl SettingValue for LogFormat {
    const VALUE_NAME: &'static str = "text|json";
    fn from_text(text: &str) -> Result<Self, String> {
        match text.trim() {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            other => Err(format!("{other:?} is neither \"text\" nor \"json\"")),
        }
    }
    fn from_toml(value: toml::Value) -> Result<Self, String> {
        Self::from_text(&String::from_toml(value)?)
    }
    fn to_toml(&self) -> Option<String> {
        let name = match self {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        };
        Some(format!("\"{name}\""))
    }
}

/// An optional setting: unset by default; an empty text (`--tls-cert ""`) unsets it.
impl<T: SettingValue> SettingValue for Option<T> {
    const FLAG: bool = T::FLAG;
    const VALUE_NAME: &'static str = T::VALUE_NAME;
    fn from_text(text: &str) -> Result<Self, String> {
        if text.is_empty() {
            Ok(None)
        } else {
            T::from_text(text).map(Some)
        }
    }
    fn from_toml(value: toml::Value) -> Result<Self, String> {
        match value {
            toml::Value::String(s) if s.is_empty() => Ok(None),
            v => T::from_toml(v).map(Some),
        }
    }
    fn to_toml(&self) -> Option<String> {
        self.as_ref().and_then(T::to_toml)
    }
}

/// An element of a file-only list: read with serde, shown without its secrets.
pub trait FileEntry: serde::de::DeserializeOwned {
    fn summary(&self) -> String;
}

impl FileEntry for String {
    fn summary(&self) -> String {
        toml::Value::String(self.clone()).to_string()
    }
}

impl FileEntry for DerpRegion {
    fn summary(&self) -> String {
        format!(
            "{{ RegionID = {}, RegionCode = {}, Nodes = {} }}",
            self.region_id,
            toml::Value::String(self.region_code.clone()),
            self.nodes.len()
        )
    }
}

impl FileEntry for StaticAgent {
    fn summary(&self) -> String {
        format!("{{ id = \"{}\", token = \"(secret)\" }}", self.id)
    }
}

impl FileEntry for StaticUser {
    fn summary(&self) -> String {
        let agents = match &self.agents {
            coordinator::auth::AgentAccess::Keyword(coordinator::auth::AccessKeyword::All) => {
                "\"all\"".to_string()
            }
            coordinator::auth::AgentAccess::Keyword(coordinator::auth::AccessKeyword::Known) => {
                "\"known\"".to_string()
            }
            coordinator::auth::AgentAccess::Only(ids) => format!("{} agents", ids.len()),
        };
        let name = self.name.as_deref().unwrap_or("user");
        format!("{{ name = \"{name}\", token = \"(secret)\", agents = {agents} }}")
    }
}

impl FileEntry for ResumeKeyConfig {
    fn summary(&self) -> String {
        format!(
            "{{ id = {}, secret_hex = \"(secret)\" }}",
            toml::Value::String(self.id.clone())
        )
    }
}

fn from_toml_serde<T: serde::de::DeserializeOwned>(value: toml::Value) -> Result<T, String> {
    value.try_into().map_err(|e: toml::de::Error| e.to_string())
}

impl<T: FileEntry> SettingValue for Vec<T> {
    const FLAG: bool = false;
    const VALUE_NAME: &'static str = "LIST";
    fn from_text(_: &str) -> Result<Self, String> {
        Err("only settable in the TOML file".into())
    }
    fn from_toml(value: toml::Value) -> Result<Self, String> {
        from_toml_serde(value)
    }
    fn to_toml(&self) -> Option<String> {
        let items: Vec<String> = self.iter().map(FileEntry::summary).collect();
        Some(format!("[{}]", items.join(", ")))
    }
}

impl SettingValue for ResumeKeyConfig {
    const FLAG: bool = false;
    const VALUE_NAME: &'static str = "TABLE";
    fn from_text(_: &str) -> Result<Self, String> {
        Err("only settable in the TOML file".into())
    }
    fn from_toml(value: toml::Value) -> Result<Self, String> {
        from_toml_serde(value)
    }
    fn to_toml(&self) -> Option<String> {
        Some(self.summary())
    }
}

// ---------------------------------------------------------------------------------------------
// The definition machinery
// ---------------------------------------------------------------------------------------------

/// One declared setting, as the macro records it.
#[derive(Debug)]
pub struct SettingSpec {
    /// The key inside the group's section.
    pub name: &'static str,
    /// The doc comment of the declaration.
    pub doc: &'static str,
    /// A flag name replacing the derived one.
    pub flag_override: Option<&'static str>,
    /// Whether the type can be given as text (see [`SettingValue::FLAG`]).
    pub has_flag: bool,
    pub value_name: &'static str,
}

/// One group of settings: a TOML section, a flag prefix and the roles that use it.
#[derive(Debug)]
pub struct GroupSpec {
    pub heading: &'static str,
    /// TOML table holding the group's keys; empty = top level.
    pub section: &'static str,
    pub flag_prefix: &'static str,
    pub roles: &'static [Role],
    pub settings: &'static [SettingSpec],
    /// The role's default of each setting, as TOML text (`None` = unset).
    pub defaults: fn(Role) -> Vec<Option<String>>,
}

impl GroupSpec {
    fn key(&self, name: &str) -> String {
        if self.section.is_empty() {
            name.to_string()
        } else {
            format!("{}.{name}", self.section)
        }
    }
}

impl SettingSpec {
    /// The long flag without `--`; `None` for file-only settings.
    pub fn flag(&self, group: &GroupSpec) -> Option<String> {
        if !self.has_flag {
            return None;
        }
        Some(match self.flag_override {
            Some(f) => f.to_string(),
            None => format!("{}{}", group.flag_prefix, self.name.replace('_', "-")),
        })
    }

    /// The environment twin of the flag.
    pub fn env(&self, group: &GroupSpec) -> Option<String> {
        self.flag(group)
            .map(|f| format!("TAILNETD_{}", f.to_ascii_uppercase().replace('-', "_")))
    }

    /// The doc comment as one line of help.
    pub fn help(&self) -> String {
        self.doc
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .collect::<Vec<_>>()
            .join(" ")
    }
}

macro_rules! optional_literal {
    () => {
        None
    };
    ($x:literal) => {
        Some($x)
    };
}

/// Declares groups of settings; see the module documentation for what is derived.
macro_rules! settings {
    ($(
        $(#[doc = $group_doc:literal])*
        group $Group:ident {
            heading: $heading:literal,
            section: $section:literal,
            flag_prefix: $prefix:literal,
            roles: $roles:expr $(,)?
        } {
            $(
                $(#[doc = $doc:literal])*
                $(#[flag = $flag:literal])?
                $name:ident: $ty:ty = $default:expr;
            )*
        }
    )*) => {
        $(
            $(#[doc = $group_doc])*
            #[derive(Debug, Clone)]
            pub struct $Group {
                $( $(#[doc = $doc])* pub $name: $ty, )*
            }

            impl $Group {
                pub const SPEC: GroupSpec = GroupSpec {
                    heading: $heading,
                    section: $section,
                    flag_prefix: $prefix,
                    roles: $roles,
                    settings: &[$(SettingSpec {
                        name: stringify!($name),
                        doc: concat!($($doc, "\n",)* ""),
                        flag_override: optional_literal!($($flag)?),
                        has_flag: <$ty as SettingValue>::FLAG,
                        value_name: <$ty as SettingValue>::VALUE_NAME,
                    }),*],
                    defaults: Self::defaults,
                };

                fn defaults(role: Role) -> Vec<Option<String>> {
                    vec![$({
                        let default: fn(Role) -> $ty = $default;
                        default(role).to_toml()
                    }),*]
                }

                /// The group's values for the role, or `None` when the role does not use it.
                fn resolve(sources: &mut Sources<'_>) -> Result<Option<Self>> {
                    if !Self::SPEC.roles.contains(&sources.role) {
                        return Ok(None);
                    }
                    let resolved = Self {
                        $($name: {
                            let default: fn(Role) -> $ty = $default;
                            sources.take(&Self::SPEC, stringify!($name), default)?
                        },)*
                    };
                    sources.record(&Self::SPEC, vec![$(resolved.$name.to_toml()),*]);
                    Ok(Some(resolved))
                }
            }
        )*

        /// Every group, in the order `--help` and `--check` show them.
        pub const GROUPS: &[&GroupSpec] = &[$(&$Group::SPEC),*];
    };
}

// ---------------------------------------------------------------------------------------------
// The definition: every setting of every role
// ---------------------------------------------------------------------------------------------

settings! {
    /// Listeners, TLS, the announcement and logging: every role.
    group GeneralSettings {
        heading: "Listeners and logging",
        section: "",
        flag_prefix: "",
        roles: EVERY_ROLE,
    } {
        /// Plain HTTP listen address: `host:port`, `:port` for every IPv4 interface, port 0
        /// picks a free one; empty disables.
        http_addr: String = |role| {
            if role == Role::Dev { "127.0.0.1:3340" } else { "0.0.0.0:8080" }.into()
        };
        /// HTTPS listen address (needs tls_cert and tls_key, or acme.hostname); empty disables.
        https_addr: String = |_| String::new();
        /// PEM certificate chain (leaf first) for HTTPS; reloaded when the file changes.
        tls_cert: Option<PathBuf> = |_| None;
        /// PEM private key for HTTPS; reloaded when the file changes.
        tls_key: Option<PathBuf> = |_| None;
        /// URL under which clients reach this process (default: the bound listener, HTTPS
        /// preferred).
        public_url: Option<String> = |_| None;
        /// File to which the announcement line (for `dev`: with the dev credentials) is also
        /// written.
        credentials: Option<PathBuf> = |_| None;
        /// How long draining after SIGTERM/SIGINT may take before the process exits anyway.
        drain_deadline: Duration = |_| Duration::from_secs(10);
        /// After SIGTERM/SIGINT, how long `/readyz` answers 503 while everything is still served,
        /// so that load balancers stop sending new connections before the drain begins; `0s`
        /// starts draining at once. A second signal cuts the pause short.
        drain_pause: Duration = |role| {
            if role == Role::Dev { Duration::ZERO } else { Duration::from_secs(5) }
        };
        /// Log filter (tracing env-filter syntax), e.g. `info,derp=debug`.
        log: String = |_| "info".into();
        /// Log format: `text` or `json`.
        log_format: LogFormat = |_| LogFormat::Text;
        /// Listen address of the metrics endpoint (`/metrics` only), kept off the public
        /// listener as coderd keeps its own; port 0 picks a free one; empty disables. `dev`
        /// leaves it off and serves `/metrics` on its listener instead.
        metrics_addr: String = |role| {
            if role == Role::Dev { "" } else { "127.0.0.1:2113" }.into()
        };
        /// Also serve `/metrics` on the public listener(s) (on by default only for `dev`).
        metrics_on_public_listener: bool = |role| role == Role::Dev;
    }

    /// ACME certificates for the HTTPS listener (`[acme]`), instead of tls_cert/tls_key:
    /// derper's `-certmode=letsencrypt`.
    group AcmeSettings {
        heading: "Certificates (ACME)",
        section: "acme",
        flag_prefix: "acme-",
        roles: EVERY_ROLE,
    } {
        /// DNS name to obtain the HTTPS certificate for from an ACME CA (Let's Encrypt by
        /// default); unset = off. Needs https_addr and acme.cert_dir.
        hostname: Option<String> = |_| None;
        /// Directory keeping the certificate (file named after the hostname, derper's layout)
        /// and the ACME account key.
        cert_dir: Option<PathBuf> = |_| None;
        /// ACME directory URL of the CA (e.g. Let's Encrypt staging:
        /// https://acme-staging-v02.api.letsencrypt.org/directory).
        directory_url: String = |_| EdgeConfig::default().acme_directory_url;
        /// Contact e-mail registered with a new ACME account.
        email: Option<String> = |_| None;
        /// Extra CA certificates (PEM) trusted for the ACME server's HTTPS (a private or test
        /// CA), besides the web PKI roots.
        ca_file: Option<PathBuf> = |_| None;
        /// Challenge: `tls-alpn-01` (answered on the HTTPS listener, port 443) or `http-01`
        /// (answered on the HTTP listener, port 80).
        challenge: String = |_| EdgeConfig::default().acme_challenge;
        /// Certificate profile to ask the CA for (e.g. `shortlived`); unset = the CA's default.
        profile: Option<String> = |_| None;
        /// Longest time between two looks at the certificate's expiry; it is renewed once less
        /// than a third of its lifetime is left.
        check_interval: Duration = |_| EdgeConfig::default().acme_check_interval;
    }

    /// The relay's own listener and identity: roles that run the relay.
    group RelayNodeSettings {
        heading: "Relay",
        section: "",
        flag_prefix: "",
        roles: RELAY_ROLES,
    } {
        /// UDP STUN listen address; empty disables.
        stun_addr: String = |role| {
            if role == Role::Dev { "127.0.0.1:3478" } else { "0.0.0.0:3478" }.into()
        };
        /// DERP private key file in derper's JSON format; created when missing. Required by
        /// every role but `dev`, which uses an ephemeral key when it is unset.
        key_file: Option<PathBuf> = |_| None;
        /// DERP mesh pre-shared key file (64 hex characters).
        mesh_psk_file: Option<PathBuf> = |_| None;
    }

    /// Relay tuning (`[relay]`); the relay crate owns the defaults and the limits.
    group RelayTuningSettings {
        heading: "Relay",
        section: "relay",
        flag_prefix: "relay-",
        roles: RELAY_ROLES,
    } {
        /// Per-client send queue depth in packets.
        queue_depth: usize = |_| EdgeConfig::default().queue_depth;
        /// Mesh peers to dial, derper's syntax: comma-separated hostnames (each dialed as
        /// `https://HOST/derp`; `HOST/DIALHOST` connects to DIALHOST), or `http(s)://` URLs
        /// dialed as written. This relay may list itself. Needs --mesh-psk-file.
        #[flag = "mesh-with"]
        mesh_with: String = |_| String::new();
        /// Extra CA certificates (PEM) trusted for mesh peers' TLS, besides the web PKI roots
        /// and the system bundle (or `SSL_CERT_FILE`).
        #[flag = "mesh-ca-file"]
        mesh_ca_file: Option<PathBuf> = |_| None;
        /// Packets queued per mesh peer before new ones are dropped.
        mesh_queue_depth: usize = |_| EdgeConfig::default().mesh_queue_depth;
        /// UDP address (ip:port) on which other tailnetd relays mesh with this one over QUIC
        /// (datagrams, mesh key as authentication); empty = off. Needs --mesh-psk-file.
        #[flag = "mesh-quic-addr"]
        mesh_quic_addr: String = |_| String::new();
        /// tailnetd relays to mesh with over QUIC: comma-separated `host:udpport` of their
        /// --mesh-quic-addr. derper peers stay in --mesh-with. This relay may list itself.
        /// Needs --mesh-psk-file.
        #[flag = "mesh-quic-with"]
        mesh_quic_with: String = |_| String::new();
        /// QUIC mesh keep-alive: an idle link pings its peer this often (at most half the idle
        /// timeout).
        #[flag = "mesh-quic-keepalive"]
        mesh_quic_keepalive: Duration = |_| EdgeConfig::default().mesh_quic_keepalive;
        /// A QUIC mesh link that hears nothing from its peer for this long is down (routes
        /// dropped, redial with backoff); at most 10m.
        #[flag = "mesh-quic-idle-timeout"]
        mesh_quic_idle_timeout: Duration = |_| EdgeConfig::default().mesh_quic_idle_timeout;
        /// Per-frame write deadline for non-mesh clients; `0s` = none.
        write_timeout: Duration = |_| EdgeConfig::default().write_timeout;
        /// Interval of DERP KeepAlive frames (clients give up after 120s of silence).
        keepalive: Duration = |_| EdgeConfig::default().keepalive;
        /// TCP_USER_TIMEOUT on accepted connections (Linux); `0s` = system default.
        tcp_user_timeout: Duration = |_| EdgeConfig::default().tcp_user_timeout;
        /// TCP keepalive idle time on accepted connections; `0s` = keepalive off.
        tcp_keepalive: Duration = |_| EdgeConfig::default().tcp_keepalive;
        /// Accepted TLS connections per second (token bucket); unset = unlimited.
        accept_connection_limit: Option<f64> = |_| EdgeConfig::default().accept_connection_limit;
        /// Burst of the accept limiter (default: the limit rounded up, at least 1).
        accept_connection_burst: Option<u32> = |_| EdgeConfig::default().accept_connection_burst;
        /// Maximum concurrent relay (DERP) connections; lowered at start-up to fit under the
        /// open-file limit (logged). Past it, relay upgrades get a 503; each listener accepts
        /// up to 1024 more connections for health and coordination requests.
        max_connections: usize = |_| EdgeConfig::default().max_connections;
        /// Maximum concurrent connections from one source address (TCP peer), per listener;
        /// `0` = no cap. Behind a load balancer all connections share its address: raise it
        /// above the balancer's connection count, or set 0.
        max_connections_per_ip: usize = |_| EdgeConfig::default().max_connections_per_ip;
        /// Accepted connections per second from one source address; unset = unlimited.
        accept_connection_limit_per_ip: Option<f64> =
            |_| EdgeConfig::default().accept_connection_limit_per_ip;
        /// derper's per-client receive rate limit file (JSON: `PerClientRateLimitBytesPerSec`,
        /// `PerClientRateBurstBytes`), applied as backpressure on reading; reloaded on SIGHUP.
        #[flag = "rate-config"]
        rate_config: Option<PathBuf> = |_| None;
    }

    /// Who may use the relay of `serve` and `dev`: the peers the coordinator knows.
    group AdmissionSettings {
        heading: "Relay admission",
        section: "relay",
        flag_prefix: "relay-",
        roles: EMBEDDED_RELAY_ROLES,
    } {
        /// How long a node key the coordinator does not know yet may stay connected to the relay
        /// (clients may reach the relay before their first node update); its connection is
        /// closed if no node with that key arrives by then. `0s` refuses unknown keys at once.
        admission_grace: Duration = |_| Duration::from_secs(10);
        /// Admit every node key to the relay, known to the coordinator or not (off: only keys of
        /// peers the coordinator knows, local or remote).
        admit_any_key: bool = |_| false;
    }

    /// derper's client verification for a separate relay (`--verify-client-url`).
    group VerifyClientSettings {
        heading: "Relay admission",
        section: "relay",
        flag_prefix: "",
        roles: &[Role::Derp],
    } {
        /// Admission controller URL (derper's protocol): each connecting client's node key and
        /// IP are POSTed as JSON and `{"Allow":true}` admits it. A tailnetd coordinator answers
        /// at `/tailnetd/derp-admit`. Unset: every key is admitted.
        #[flag = "verify-client-url"]
        verify_client_url: Option<String> = |_| None;
        /// Admit clients when the verify URL cannot be reached (derper's default: true).
        #[flag = "verify-client-url-fail-open"]
        verify_client_url_fail_open: bool = |_| true;
    }

    /// The region under which the coordinator's DERP map lists this process's own relay.
    group RegionSettings {
        heading: "Embedded relay region",
        section: "",
        flag_prefix: "",
        roles: EMBEDDED_RELAY_ROLES,
    } {
        /// Region id of this process's relay in the DERP map (> 0).
        region_id: i64 = |_| 999;
        /// Region code of this process's relay.
        region_code: String = |_| "coder".into();
        /// Region name of this process's relay.
        region_name: String = |_| "Coder Embedded Relay".into();
    }

    /// Where the DERP map handed to clients comes from (besides this process's relay).
    group DerpMapFileSettings {
        heading: "DERP map",
        section: "",
        flag_prefix: "",
        roles: COORDINATOR_ROLES,
    } {
        /// DERP map JSON file (Tailscale/Coder form), merged into the map and watched for
        /// changes.
        derp_map_file: Option<PathBuf> = |_| None;
    }

    /// Extra DERP map content (`[derp_map]`).
    group DerpMapSettings {
        heading: "DERP map",
        section: "derp_map",
        flag_prefix: "derp-map-",
        roles: COORDINATOR_ROLES,
    } {
        /// How often the modification time of derp_map_file is checked.
        poll_interval: Duration = |_| DerpMapConfig::default().poll_interval;
        /// Extra regions, `[[derp_map.regions]]` tables with Tailscale/Coder JSON field names:
        /// `RegionID`, `RegionCode`, `RegionName`, `Nodes = [{ Name, RegionID, HostName, ... }]`.
        regions: Vec<DerpRegion> = |_| Vec::new();
        /// External STUN servers (`host:port`); each becomes a STUN-only region.
        stun_servers: Vec<String> = |_| Vec::new();
        /// How often every relay of the map is probed (`GET /derp/probe`, then a DERP round
        /// trip); a region none of whose relays passes is marked `Avoid` for every subscriber
        /// and restored when it passes again; `0s` disables probing.
        health_interval: Duration = |_| RegionHealthConfig::default().interval;
        /// Bound on one probe of one relay.
        health_timeout: Duration = |_| RegionHealthConfig::default().probe_timeout;
        /// Consecutive failed rounds before a region is marked `Avoid` (a relay that answers
        /// "draining" marks it at once).
        health_failures: u32 = |_| RegionHealthConfig::default().failures_to_avoid;
        /// Consecutive good rounds before an avoided region is restored.
        health_successes: u32 = |_| RegionHealthConfig::default().successes_to_restore;
    }

    /// The upstream Coder server (`[upstream]`): with a URL, tailnetd proxies every request it
    /// does not own to it, and it decides every token.
    group UpstreamSettings {
        heading: "Upstream coderd (sidecar mode)",
        section: "upstream",
        flag_prefix: "upstream-",
        roles: COORDINATOR_ROLES,
    } {
        /// Upstream Coder server, `http(s)://host[:port]`; unset = tokens come from [auth].
        #[flag = "upstream"]
        url: Option<String> = |_| None;
        /// Connect (and TLS handshake) timeout towards the upstream.
        connect_timeout: Duration = |_| UpstreamConfig::default().connect_timeout;
        /// How long to wait for the upstream's response headers (bodies may stream longer).
        header_timeout: Duration = |_| UpstreamConfig::default().header_timeout;
        /// Largest request body proxied to the upstream; larger ones get 413.
        max_body_bytes: u64 = |_| UpstreamConfig::default().max_body_bytes;
        /// How long a positive auth decision of the upstream is reused.
        auth_ttl_ok: Duration = |_| UpstreamConfig::default().auth_ttl_ok;
        /// How long a negative auth decision of the upstream is reused.
        auth_ttl_err: Duration = |_| UpstreamConfig::default().auth_ttl_err;
        /// Most auth decisions kept in the cache.
        auth_cache_entries: usize = |_| UpstreamConfig::default().auth_cache_entries;
        /// Replace the DERP map in proxied `/connection` and `/me/manifest` answers with ours
        /// (default: on when this process runs a relay).
        rewrite_derp_map: bool = |role| role.runs_relay();
        /// Largest response body whose DERP map is rewritten; larger ones pass unchanged.
        max_rewrite_bytes: usize = |_| UpstreamConfig::default().max_rewrite_bytes;
        /// Forward the client's Host header (otherwise the upstream's authority is sent).
        preserve_host: bool = |_| UpstreamConfig::default().preserve_host;
        /// Comma-separated IP addresses of the proxies in front (the load balancer) whose
        /// forwarding headers (X-Forwarded-*, X-Real-IP, True-Client-IP, Forwarded) are passed
        /// on; from any other peer they are replaced by what tailnetd saw. The relay's
        /// per-address limits count relay upgrades through them against the forwarded client
        /// address. Empty = none.
        trusted_proxies: String = |_| String::new();
        /// Mirror every agent into coderd's own coordinator (one Coordinate stream per agent on
        /// its upstream session), so that coderd's web terminal, apps, port-forwarding and
        /// workspace proxies reach agents served here. Off only where tailnetd shares coderd's
        /// HA tables instead (never both).
        bridge: bool = |_| true;
    }

    /// Coordinator tuning (`[coordinator]`), with Coder's defaults.
    group CoordinatorSettings {
        heading: "Coordinator",
        section: "coordinator",
        flag_prefix: "coordinator-",
        roles: COORDINATOR_ROLES,
    } {
        /// Responses buffered per peer before it is kicked as too slow.
        response_buffer: usize = |_| CoordinatorConfig::default().response_buffer;
        /// WebSocket ping interval on coordination and DERP map sockets.
        ws_ping_interval: Duration = |_| CoordinatorConfig::default().ws_ping_interval;
        /// How long a WebSocket ping may stay unanswered before the session is closed.
        ws_pong_timeout: Duration = |_| CoordinatorConfig::default().ws_pong_timeout;
        /// Agent sessions on /me/rpc: closed (the agent LOST) once no pong has arrived for this
        /// long, checked every ws_ping_interval (coderd's agent rule and default).
        agent_inactive_disconnect_timeout: Duration =
            |_| CoordinatorConfig::default().agent_inactive_disconnect_timeout;
        /// v1 sessions: a write that takes longer ends the session.
        v1_write_timeout: Duration = |_| CoordinatorConfig::default().v1_write_timeout;
        /// v1 sessions: largest JSON message in bytes accepted from a peer.
        v1_max_message: usize = |_| CoordinatorConfig::default().v1_max_message;
        /// How long shutdown waits for sessions to say goodbye.
        shutdown_grace: Duration = |_| CoordinatorConfig::default().shutdown_grace;
        /// Lifetime of resume tokens (clients refresh after half).
        resume_token_expiry: Duration = |_| CoordinatorConfig::default().resume_expiry;
        /// Lock shards of the peer graph (default: 4 x CPUs rounded up to a power of two, at
        /// least 16); more shards, less contention between unrelated peers.
        graph_shards: usize = |_| CoordinatorConfig::default().graph_shards;
        /// Most `endpoints` one node may carry; a larger node ends its session.
        node_max_endpoints: usize = |_| CoordinatorConfig::default().node_limits.max_endpoints;
        /// Most `addresses` one node may carry; a larger node ends its session.
        node_max_addresses: usize = |_| CoordinatorConfig::default().node_limits.max_addresses;
        /// Most `allowed_ips` one node may carry; a larger node ends its session.
        node_max_allowed_ips: usize = |_| CoordinatorConfig::default().node_limits.max_allowed_ips;
        /// Most `derp_latency` entries one node may carry (two per DERP region); a larger node
        /// ends its session.
        node_max_derp_latency: usize =
            |_| CoordinatorConfig::default().node_limits.max_derp_latency;
        /// Most `derp_forced_websocket` entries one node may carry; a larger node ends its
        /// session.
        node_max_derp_forced_websocket: usize =
            |_| CoordinatorConfig::default().node_limits.max_derp_forced_websocket;
        /// Largest protobuf encoding of one node in bytes; a larger node ends its session.
        node_max_bytes: usize = |_| CoordinatorConfig::default().node_limits.max_node_bytes;
        /// Most tunnels one peer may hold; one more `add_tunnel` ends its session.
        peer_max_tunnels: usize = |_| CoordinatorConfig::default().max_tunnels_per_peer;
        /// Most concurrent client coordination sessions of one user (/api/v2/tailnet and
        /// {agent}/coordinate together); one more is answered 429.
        max_sessions_per_user: usize = |_| CoordinatorConfig::default().max_sessions_per_user;
        /// Most concurrent coordination sessions of one agent id (/me/coordinate and /me/rpc
        /// together); one more is answered 429.
        max_sessions_per_agent: usize = |_| CoordinatorConfig::default().max_sessions_per_agent;
        /// Bytes queued per peer before it is kicked as too slow (next to response_buffer).
        response_buffer_bytes: usize = |_| CoordinatorConfig::default().response_buffer_bytes;
        /// Most concurrent yamux streams of one v2 session; more are refused with RST.
        session_max_streams: usize = |_| CoordinatorConfig::default().session_max_streams;
        /// Most bytes one agent's v2 session may hold buffered and unread across its streams;
        /// more ends the session.
        agent_session_max_buffered_bytes: usize =
            |_| CoordinatorConfig::default().agent_session_max_buffered_bytes;
        /// Most bytes one client's v2 session may hold buffered and unread across its streams;
        /// more ends the session.
        client_session_max_buffered_bytes: usize =
            |_| CoordinatorConfig::default().client_session_max_buffered_bytes;
        /// PostgreSQL URL (`postgres://user:pass@host:port/db`): replicas share one peer graph
        /// through Coder's HA tables (see README, "Replicas"); unset = this process alone.
        #[flag = "postgres-url"]
        postgres_url: Option<DatabaseUrl> = |_| None;
    }

    /// Static tokens and resume-token keys (`[auth]`). The tokens are used when no upstream
    /// Coder server decides; the resume keys always.
    group AuthSettings {
        heading: "Auth",
        section: "auth",
        flag_prefix: "auth-",
        roles: COORDINATOR_ROLES,
    } {
        /// Agent tokens: `[[auth.agents]]` tables with `token` (UUID), `id` (UUID) and an
        /// optional `name`.
        agents: Vec<StaticAgent> = |_| Vec::new();
        /// User tokens: `[[auth.users]]` tables with `token`, `agents` (`"all"`: any agent id;
        /// `"known"`: the agents above; or a list of agent ids) and optional `name` and `id`.
        users: Vec<StaticUser> = |_| Vec::new();
        /// Resume token signing key, `{ id = "1", secret_hex = "<64+ hex digits>" }`; replicas
        /// sharing it accept each other's tokens (default: a random key per process).
        resume_key: Option<ResumeKeyConfig> = |_| None;
        /// Older resume keys still accepted for verification (key rotation), same form.
        resume_verify_keys: Vec<ResumeKeyConfig> = |_| Vec::new();
    }
}

// ---------------------------------------------------------------------------------------------
// Command line
// ---------------------------------------------------------------------------------------------

/// What the command line asked for.
#[derive(Debug)]
pub struct Invocation {
    pub role: Role,
    /// `--check`: print the effective configuration and exit.
    pub check: bool,
    matches: ArgMatches,
}

/// The `tailnetd` command with one subcommand per role, each carrying only the settings the
/// role uses.
pub fn command() -> Command {
    Command::new("tailnetd")
        .version(env!("CARGO_PKG_VERSION"))
        .about("tailnetd: a Tailnet coordinator and DERP relay for Coder deployments.")
        .subcommand_required(true)
        .arg_required_else_help(true)
        .subcommands(EVERY_ROLE.iter().map(|r| role_command(*r)))
}

fn role_command(role: Role) -> Command {
    let mut cmd = Command::new(role.name())
        .about(role.about())
        .arg(
            Arg::new("config")
                .long("config")
                .env("TAILNETD_CONFIG")
                .value_name("FILE")
                .help("TOML configuration file; keys as shown in [toml: ...] below.")
                .action(ArgAction::Set),
        )
        .arg(
            Arg::new("check")
                .long("check")
                .help(
                    "Resolve and validate the configuration, print the effective settings and \
                     where each came from, then exit (status 0 valid, 64 invalid).",
                )
                .action(ArgAction::SetTrue),
        );
    let mut file_only = Vec::new();
    for group in GROUPS.iter().filter(|g| g.roles.contains(&role)) {
        let defaults = (group.defaults)(role);
        for (setting, default) in group.settings.iter().zip(defaults) {
            let key = group.key(setting.name);
            let (Some(flag), Some(env)) = (setting.flag(group), setting.env(group)) else {
                file_only.push(format!("  {key}\n      {}", setting.help()));
                continue;
            };
            let default = default.map_or_else(|| "unset".to_string(), |d| unquote(&d));
            cmd = cmd.arg(
                Arg::new(key.clone())
                    .long(flag)
                    .env(env)
                    .value_name(setting.value_name)
                    .help(format!(
                        "{} [default: {default}] [toml: {key}]",
                        setting.help()
                    ))
                    .help_heading(group.heading)
                    .action(ArgAction::Set),
            );
        }
    }
    let mut after = String::new();
    if !file_only.is_empty() {
        after = format!(
            "Settings only in the --config file:\n{}\n\n",
            file_only.join("\n")
        );
    }
    after.push_str(
        "Precedence: flag, then environment variable, then the --config file, then the \
         default. Durations are written like 500ms, 5s, 10m, 1h. --check prints the result.",
    );
    cmd.after_help(after)
}

/// `"text"` → `text` for help output; an empty text stays `""`.
fn unquote(toml_text: &str) -> String {
    match toml_text
        .strip_prefix('"')
        .and_then(|t| t.strip_suffix('"'))
    {
        Some("") | None => toml_text.to_string(),
        Some(inner) => inner.to_string(),
    }
}

/// Parses the process's command line; exits with clap's usage message on a malformed one, and
/// with status 64 on a derper flag tailnetd cannot honour ([`derper_flags`]).
pub fn parse_command_line() -> Invocation {
    let args = match derper_args(std::env::args_os().collect()) {
        Ok(a) => a,
        Err(e) => {
            use std::io::Write;
            let _ = writeln!(std::io::stderr(), "tailnetd: invalid configuration: {e}");
            std::process::exit(64);
        }
    };
    let parsed = command()
        .try_get_matches_from(args)
        .and_then(|m| invocation(&m));
    parsed.unwrap_or_else(|e| e.exit())
}

/// derper's flags on a `tailnetd derp` command line, rewritten into tailnetd's.
fn derper_args(args: Vec<std::ffi::OsString>) -> Result<Vec<std::ffi::OsString>, String> {
    let derp = role_command(Role::Derp);
    let has_flag = |name: &str| derp.get_arguments().any(|a| a.get_long() == Some(name));
    derper_flags::translate(args, &has_flag)
}

/// Like [`parse_command_line`] on the given arguments (the first is the program name).
#[cfg(test)]
pub fn try_parse_from<I, T>(args: I) -> Result<Invocation, clap::Error>
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    let args = args.into_iter().map(Into::into).collect();
    let args = derper_args(args)
        .map_err(|e| command().error(clap::error::ErrorKind::ValueValidation, e))?;
    command()
        .try_get_matches_from(args)
        .and_then(|m| invocation(&m))
}

fn invocation(matches: &ArgMatches) -> Result<Invocation, clap::Error> {
    let role_and_matches = matches
        .subcommand()
        .and_then(|(name, m)| Some((Role::from_name(name)?, m)));
    let Some((role, matches)) = role_and_matches else {
        return Err(command().error(
            clap::error::ErrorKind::MissingSubcommand,
            "a role is required: dev, serve, coordinator or derp",
        ));
    };
    Ok(Invocation {
        role,
        check: matches.get_flag("check"),
        matches: matches.clone(),
    })
}

// ---------------------------------------------------------------------------------------------
// Merging the sources
// ---------------------------------------------------------------------------------------------

/// The sources of one resolution: the parsed command line (flags and environment) and the file.
struct Sources<'a> {
    role: Role,
    matches: &'a ArgMatches,
    file: toml::Table,
    file_name: String,
    /// Where each setting's value came from, by TOML key.
    origins: BTreeMap<String, &'static str>,
    /// The effective values in declaration order: (group, values as TOML text).
    effective: Vec<(&'static GroupSpec, Vec<Option<String>>)>,
}

impl Sources<'_> {
    fn take<T: SettingValue>(
        &mut self,
        group: &GroupSpec,
        name: &'static str,
        default: fn(Role) -> T,
    ) -> Result<T> {
        let key = group.key(name);
        // Taken out of the file in any case: whatever is left over is unknown.
        let raw = if group.section.is_empty() {
            self.file.remove(name)
        } else {
            match self.file.get_mut(group.section) {
                Some(toml::Value::Table(t)) => t.remove(name),
                _ => None,
            }
        };
        if T::FLAG {
            if let Ok(Some(text)) = self.matches.try_get_one::<String>(&key) {
                let setting = group.settings.iter().find(|s| s.name == name);
                let (origin, source) = match self.matches.value_source(&key) {
                    Some(ValueSource::EnvVariable) => (
                        "environment",
                        setting.and_then(|s| s.env(group)).unwrap_or_default(),
                    ),
                    _ => (
                        "flag",
                        format!(
                            "--{}",
                            setting.and_then(|s| s.flag(group)).unwrap_or_default()
                        ),
                    ),
                };
                let value = T::from_text(text).map_err(|e| anyhow!("{key} ({source}): {e}"))?;
                self.origins.insert(key, origin);
                return Ok(value);
            }
        }
        if let Some(raw) = raw {
            let value =
                T::from_toml(raw).map_err(|e| anyhow!("{key} (in {}): {e}", self.file_name))?;
            self.origins.insert(key, "file");
            return Ok(value);
        }
        self.origins.insert(key, "default");
        Ok(default(self.role))
    }

    fn record(&mut self, group: &'static GroupSpec, values: Vec<Option<String>>) {
        self.effective.push((group, values));
    }

    /// Every key left in the file is unknown or belongs to a setting this role does not use.
    fn reject_leftovers(&self) -> Result<()> {
        let mut problems = Vec::new();
        for (key, value) in &self.file {
            let is_section = GROUPS.iter().any(|g| g.section == key);
            match value {
                toml::Value::Table(t) if is_section => {
                    for sub in t.keys() {
                        problems.push(self.leftover(key, sub));
                    }
                }
                _ if is_section => problems.push(format!(
                    "{key}: must be a table ([{key}]), got {}",
                    value.type_str()
                )),
                _ => problems.push(self.leftover("", key)),
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            bail!("{}: {}", self.file_name, problems.join("; "))
        }
    }

    fn leftover(&self, section: &str, name: &str) -> String {
        let owner = GROUPS
            .iter()
            .find(|g| g.section == section && g.settings.iter().any(|s| s.name == name));
        let key = if section.is_empty() {
            name.to_string()
        } else {
            format!("{section}.{name}")
        };
        match owner {
            Some(g) => format!(
                "{key}: not used by the {} role ({} setting)",
                self.role.name(),
                g.heading
            ),
            None => format!(
                "{key}: unknown setting (see `tailnetd {} --help`)",
                self.role.name()
            ),
        }
    }
}

fn load_file(path: &Path) -> Result<toml::Table> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading config file {}", path.display()))?;
    text.parse::<toml::Table>()
        .with_context(|| format!("config file {}", path.display()))
}

// ---------------------------------------------------------------------------------------------
// The resolved settings
// ---------------------------------------------------------------------------------------------

/// Fully resolved and validated settings for one run.
#[derive(Debug)]
pub struct Settings {
    pub role: Role,
    /// Listeners, TLS files, key files and relay knobs, validated by the relay crate's own rules.
    pub listen: EdgeConfig,
    pub public_url: Option<String>,
    pub credentials: Option<PathBuf>,
    pub drain_deadline: Duration,
    /// Readiness-off pause before the drain (see the setting's doc).
    pub drain_pause: Duration,
    pub log: String,
    pub log_json: bool,
    /// The metrics listener (`None` = none).
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// `/metrics` on the public listener(s) too.
    pub metrics_on_public_listener: bool,
    /// This process's relay in the DERP map (roles running relay and coordinator).
    pub region: Option<RegionSettings>,
    /// The coordinator's DERP map sources (the embedded relay is added at start).
    pub derp_map: DerpMapConfig,
    /// Probing the map's relays and marking failed regions `Avoid`.
    pub region_health: RegionHealthConfig,
    /// Static tokens, used when no upstream decides.
    pub auth: StaticAuthConfig,
    /// Coordinator tuning with the resume keys decoded; `upstream` is filled in at start.
    pub coordinator: CoordinatorConfig,
    /// Set when an upstream Coder server decides auth and serves everything else.
    pub upstream: Option<UpstreamConfig>,
    /// With an upstream: bridge every agent into its coordinator (`upstream.bridge`).
    pub upstream_bridge: bool,
    /// Share the peer graph with other replicas through this PostgreSQL database.
    pub postgres_url: Option<String>,
    /// Who may use the relay (see [`RelayAdmission`]).
    pub relay_admission: RelayAdmission,
    /// derper's rate configuration file for the relay (`relay.rate_config`).
    pub rate_config: Option<PathBuf>,
    /// `--check` output: effective values and their origins.
    effective: Vec<(&'static GroupSpec, Vec<Option<String>>)>,
    origins: BTreeMap<String, &'static str>,
}

/// Names a relay-crate config field the way the TOML file spells it.
fn relay_field(field: &str) -> String {
    if let Some(name) = field.strip_prefix("acme_") {
        return AcmeSettings::SPEC.key(name);
    }
    let top_level = GeneralSettings::SPEC
        .settings
        .iter()
        .chain(RelayNodeSettings::SPEC.settings)
        .any(|s| s.name == field);
    if top_level {
        field.to_string()
    } else {
        RelayTuningSettings::SPEC.key(field)
    }
}

fn positive_duration(key: &str, d: Duration) -> Result<Duration> {
    if d.is_zero() {
        bail!("{key}: must be more than 0s");
    }
    Ok(d)
}

impl Settings {
    /// Resolves the settings of the invocation's role from its flags, environment and file.
    pub fn resolve(invocation: &Invocation) -> Result<Settings> {
        let m = &invocation.matches;
        let config_path = m.try_get_one::<String>("config").ok().flatten();
        let (file, file_name) = match config_path {
            Some(p) => (load_file(Path::new(p))?, format!("config file {p}")),
            None => (toml::Table::new(), "config file".to_string()),
        };
        Self::resolve_with_file(invocation, file, file_name)
    }

    /// [`Settings::resolve`] with the file already parsed (the seam the TOML fuzz target uses).
    fn resolve_with_file(
        invocation: &Invocation,
        file: toml::Table,
        file_name: String,
    ) -> Result<Settings> {
        let role = invocation.role;
        let m = &invocation.matches;
        let mut src = Sources {
            role,
            matches: m,
            file,
            file_name,
            origins: BTreeMap::new(),
            effective: Vec::new(),
        };
        let general = GeneralSettings::resolve(&mut src)?
            .ok_or_else(|| anyhow!("general settings apply to every role"))?;
        let acme = AcmeSettings::resolve(&mut src)?
            .ok_or_else(|| anyhow!("ACME settings apply to every role"))?;
        let relay_node = RelayNodeSettings::resolve(&mut src)?;
        let relay_tuning = RelayTuningSettings::resolve(&mut src)?;
        let admission = AdmissionSettings::resolve(&mut src)?;
        let verify = VerifyClientSettings::resolve(&mut src)?;
        let region = RegionSettings::resolve(&mut src)?;
        let map_file = DerpMapFileSettings::resolve(&mut src)?;
        let map = DerpMapSettings::resolve(&mut src)?;
        let upstream = UpstreamSettings::resolve(&mut src)?;
        let coordinator = CoordinatorSettings::resolve(&mut src)?;
        let auth = AuthSettings::resolve(&mut src)?;
        src.reject_leftovers()?;

        let mut listen = EdgeConfig {
            http_addr: general.http_addr,
            https_addr: general.https_addr,
            tls_cert: general.tls_cert,
            tls_key: general.tls_key,
            stun_addr: String::new(),
            acme_hostname: acme.hostname,
            acme_cert_dir: acme.cert_dir,
            acme_directory_url: acme.directory_url,
            acme_email: acme.email,
            acme_ca_file: acme.ca_file,
            acme_challenge: acme.challenge,
            acme_profile: acme.profile,
            acme_check_interval: acme.check_interval,
            ..EdgeConfig::default()
        };
        if let Some(node) = relay_node {
            listen.stun_addr = node.stun_addr;
            listen.key_file = node.key_file;
            listen.mesh_psk_file = node.mesh_psk_file;
        }
        let relay_tuning_rate_config = relay_tuning.as_ref().and_then(|t| t.rate_config.clone());
        if let Some(t) = relay_tuning {
            listen.queue_depth = t.queue_depth;
            listen.mesh_with = t.mesh_with;
            listen.mesh_ca_file = t.mesh_ca_file;
            listen.mesh_queue_depth = t.mesh_queue_depth;
            listen.mesh_quic_addr = t.mesh_quic_addr;
            listen.mesh_quic_with = t.mesh_quic_with;
            listen.mesh_quic_keepalive = t.mesh_quic_keepalive;
            listen.mesh_quic_idle_timeout = t.mesh_quic_idle_timeout;
            listen.write_timeout = t.write_timeout;
            listen.keepalive = t.keepalive;
            listen.tcp_user_timeout = t.tcp_user_timeout;
            listen.tcp_keepalive = t.tcp_keepalive;
            listen.accept_connection_limit = t.accept_connection_limit;
            listen.accept_connection_burst = t.accept_connection_burst;
            listen.max_connections = t.max_connections;
            listen.max_connections_per_ip = t.max_connections_per_ip;
            listen.accept_connection_limit_per_ip = t.accept_connection_limit_per_ip;
        }
        if let Err(errs) = listen.validate() {
            let text: Vec<String> = errs
                .0
                .iter()
                .map(|e| format!("{}: {}", relay_field(e.field), e.reason))
                .collect();
            bail!("{}", text.join("; "));
        }
        if role.runs_relay() && role != Role::Dev && listen.key_file.is_none() {
            bail!(
                "key_file: required for the {} role, so that the relay keeps its identity \
                 across restarts",
                role.name()
            );
        }

        if let Some(u) = &general.public_url {
            if !(u.starts_with("http://") || u.starts_with("https://")) {
                bail!("public_url: {u:?} must start with http:// or https://");
            }
        }
        tracing_subscriber::EnvFilter::try_new(&general.log)
            .map_err(|e| anyhow!("log: {:?} is not a log filter: {e}", general.log))?;
        positive_duration("drain_deadline", general.drain_deadline)?;
        if let Some(r) = &region {
            if r.region_id <= 0 {
                bail!("region_id: must be positive, got {}", r.region_id);
            }
        }

        let mut derp_map = DerpMapConfig::default();
        let mut region_health = RegionHealthConfig::default();
        if let Some(f) = map_file {
            derp_map.file = f.derp_map_file;
        }
        if let Some(m) = map {
            derp_map.poll_interval = positive_duration("derp_map.poll_interval", m.poll_interval)?;
            derp_map.regions = m.regions;
            derp_map.stun_servers = m.stun_servers;
            region_health = RegionHealthConfig {
                interval: m.health_interval,
                probe_timeout: positive_duration("derp_map.health_timeout", m.health_timeout)?,
                failures_to_avoid: m.health_failures.max(1),
                successes_to_restore: m.health_successes.max(1),
            };
        }

        // The relay limits per forwarded client behind the same trusted proxies (with or
        // without an upstream URL).
        listen.trusted_proxies = match &upstream {
            Some(u) => parse_trusted_proxies(&u.trusted_proxies)?,
            None => Vec::new(),
        };
        let bridge = upstream.as_ref().is_some_and(|u| u.bridge);
        let upstream = match upstream {
            Some(u) => resolve_upstream(u)?,
            None => None,
        };
        let upstream_bridge = upstream.is_some() && bridge;

        let mut coordinator_config = CoordinatorConfig::default();
        let postgres_url = coordinator
            .as_ref()
            .and_then(|c| c.postgres_url.as_ref().map(|u| u.0.clone()));
        if let Some(c) = coordinator {
            if c.response_buffer == 0 {
                bail!("coordinator.response_buffer: must be at least 1");
            }
            if c.v1_max_message < 1024 {
                bail!("coordinator.v1_max_message: must be at least 1024 bytes");
            }
            let max = coordinator::graph::MAX_SHARDS;
            if !(1..=max).contains(&c.graph_shards) {
                bail!(
                    "coordinator.graph_shards: {} is out of range 1..={max}",
                    c.graph_shards
                );
            }
            coordinator_config.response_buffer = c.response_buffer;
            coordinator_config.ws_ping_interval =
                positive_duration("coordinator.ws_ping_interval", c.ws_ping_interval)?;
            coordinator_config.ws_pong_timeout =
                positive_duration("coordinator.ws_pong_timeout", c.ws_pong_timeout)?;
            coordinator_config.agent_inactive_disconnect_timeout = positive_duration(
                "coordinator.agent_inactive_disconnect_timeout",
                c.agent_inactive_disconnect_timeout,
            )?;
            coordinator_config.v1_write_timeout =
                positive_duration("coordinator.v1_write_timeout", c.v1_write_timeout)?;
            coordinator_config.v1_max_message = c.v1_max_message;
            coordinator_config.shutdown_grace = c.shutdown_grace;
            coordinator_config.resume_expiry =
                positive_duration("coordinator.resume_token_expiry", c.resume_token_expiry)?;
            coordinator_config.graph_shards = c.graph_shards;
            coordinator_config.max_tunnels_per_peer = c.peer_max_tunnels;
            coordinator_config.max_sessions_per_user = checked_minimum(
                1,
                "coordinator.max_sessions_per_user",
                c.max_sessions_per_user,
            )?;
            coordinator_config.max_sessions_per_agent = checked_minimum(
                1,
                "coordinator.max_sessions_per_agent",
                c.max_sessions_per_agent,
            )?;
            coordinator_config.response_buffer_bytes = checked_minimum(
                64 * 1024,
                "coordinator.response_buffer_bytes",
                c.response_buffer_bytes,
            )?;
            coordinator_config.session_max_streams =
                checked_minimum(1, "coordinator.session_max_streams", c.session_max_streams)?;
            coordinator_config.agent_session_max_buffered_bytes = checked_minimum(
                5 << 20,
                "coordinator.agent_session_max_buffered_bytes",
                c.agent_session_max_buffered_bytes,
            )?;
            coordinator_config.client_session_max_buffered_bytes = checked_minimum(
                256 * 1024,
                "coordinator.client_session_max_buffered_bytes",
                c.client_session_max_buffered_bytes,
            )?;
            if c.node_max_bytes < 1024 {
                bail!("coordinator.node_max_bytes: must be at least 1024 bytes");
            }
            coordinator_config.node_limits = coordinator::graph::NodeLimits {
                max_endpoints: c.node_max_endpoints,
                max_addresses: c.node_max_addresses,
                max_allowed_ips: c.node_max_allowed_ips,
                max_derp_latency: c.node_max_derp_latency,
                max_derp_forced_websocket: c.node_max_derp_forced_websocket,
                max_node_bytes: c.node_max_bytes,
            };
        }
        let mut static_auth = StaticAuthConfig::default();
        if let Some(a) = auth {
            static_auth.agents = a.agents;
            static_auth.users = a.users;
            StaticAuthenticator::new(&static_auth).map_err(|e| anyhow!("auth: {e}"))?;
            coordinator_config.resume_key = a
                .resume_key
                .as_ref()
                .map(ResumeKeyConfig::to_key)
                .transpose()
                .map_err(|e| anyhow!("auth.resume_key: {e}"))?;
            coordinator_config.resume_verify_keys = a
                .resume_verify_keys
                .iter()
                .enumerate()
                .map(|(i, k)| {
                    k.to_key()
                        .map_err(|e| anyhow!("auth.resume_verify_keys[{i}]: {e}"))
                })
                .collect::<Result<_>>()?;
        }

        let rate_config = relay_tuning_rate_config;
        let relay_admission = RelayAdmission::resolve(admission, verify)?;

        let metrics_addr = derp::edge::config::parse_listen_addr(&general.metrics_addr)
            .map_err(|e| anyhow!("metrics_addr (--metrics-addr): {e}"))?;

        Ok(Settings {
            role,
            listen,
            public_url: general.public_url,
            credentials: general.credentials,
            drain_deadline: general.drain_deadline,
            drain_pause: general.drain_pause,
            log: general.log,
            log_json: general.log_format == LogFormat::Json,
            metrics_addr,
            metrics_on_public_listener: general.metrics_on_public_listener,
            region,
            derp_map,
            region_health,
            auth: static_auth,
            coordinator: coordinator_config,
            upstream,
            upstream_bridge,
            postgres_url,
            relay_admission,
            rate_config,
            effective: src.effective,
            origins: src.origins,
        })
    }

    /// The effective configuration as TOML text, each value annotated with where it came from;
    /// what `--check` prints. Secrets are not shown.
    pub fn effective_toml(&self) -> String {
        let mut out = format!(
            "# tailnetd {}: effective configuration (flag > environment > file > default)\n",
            self.role.name()
        );
        let mut section = "";
        let mut order: Vec<&(&GroupSpec, Vec<Option<String>>)> = self.effective.iter().collect();
        // Top-level keys first: TOML puts every key after a [section] header into that section.
        order.sort_by_key(|(g, _)| !g.section.is_empty());
        for (group, values) in order {
            if group.section != section {
                section = group.section;
                out.push_str(&format!("\n[{section}]\n"));
            }
            for (setting, value) in group.settings.iter().zip(values) {
                let key = group.key(setting.name);
                let origin = self.origins.get(&key).copied().unwrap_or("default");
                match value {
                    Some(v) => out.push_str(&format!("{} = {v}  # {origin}\n", setting.name)),
                    None => out.push_str(&format!("# {} unset  # {origin}\n", setting.name)),
                }
            }
        }
        out
    }
}

/// Who may use the relay.
#[derive(Debug, Clone, PartialEq)]
pub enum RelayAdmission {
    /// Every key (the `derp` role without a verify URL, or `relay.admit_any_key`).
    Open,
    /// `serve`/`dev`: keys the coordinator's peer graph knows, and unknown keys for `grace`.
    Coordinated { grace: Duration },
    /// `derp`: derper's `--verify-client-url`.
    VerifyUrl { url: String, fail_open: bool },
}

impl RelayAdmission {
    fn resolve(
        admission: Option<AdmissionSettings>,
        verify: Option<VerifyClientSettings>,
    ) -> Result<RelayAdmission> {
        if let Some(a) = admission {
            if a.admit_any_key {
                return Ok(RelayAdmission::Open);
            }
            return Ok(RelayAdmission::Coordinated {
                grace: a.admission_grace,
            });
        }
        if let Some(v) = verify {
            if let Some(url) = v.verify_client_url.filter(|u| !u.trim().is_empty()) {
                derp::edge::verify_url::UrlVerifier::new(&url, v.verify_client_url_fail_open, &[])
                    .map_err(|e| anyhow!("relay.verify_client_url (--verify-client-url): {e}"))?;
                return Ok(RelayAdmission::VerifyUrl {
                    url,
                    fail_open: v.verify_client_url_fail_open,
                });
            }
        }
        Ok(RelayAdmission::Open)
    }
}

/// `upstream.trusted_proxies`: comma-separated IP addresses.
fn parse_trusted_proxies(text: &str) -> Result<Vec<std::net::IpAddr>> {
    text.split(',')
        .map(str::trim)
        .filter(|a| !a.is_empty())
        .map(|a| {
            a.parse::<std::net::IpAddr>().map_err(|_| {
                anyhow!("upstream.trusted_proxies (--upstream-trusted-proxies): {a:?} is not an IP address")
            })
        })
        .collect()
}

/// `value` if it is at least `min`, else an error naming the setting.
fn checked_minimum(min: usize, field: &str, value: usize) -> Result<usize> {
    if value < min {
        bail!("{field}: must be at least {min}, got {value}");
    }
    Ok(value)
}

fn resolve_upstream(u: UpstreamSettings) -> Result<Option<UpstreamConfig>> {
    let Some(url) = u.url.filter(|u| !u.trim().is_empty()) else {
        return Ok(None);
    };
    if !(url.starts_with("http://") || url.starts_with("https://")) {
        bail!("upstream.url: {url:?} must start with http:// or https://");
    }
    if u.auth_cache_entries == 0 {
        bail!("upstream.auth_cache_entries: must be at least 1");
    }
    Ok(Some(UpstreamConfig {
        url: url.trim_end_matches('/').to_string(),
        connect_timeout: positive_duration("upstream.connect_timeout", u.connect_timeout)?,
        header_timeout: positive_duration("upstream.header_timeout", u.header_timeout)?,
        max_body_bytes: u.max_body_bytes,
        auth_ttl_ok: u.auth_ttl_ok,
        auth_ttl_err: u.auth_ttl_err,
        auth_cache_entries: u.auth_cache_entries,
        rewrite_derp_map: u.rewrite_derp_map,
        max_rewrite_bytes: u.max_rewrite_bytes,
        preserve_host: u.preserve_host,
        trusted_proxies: parse_trusted_proxies(&u.trusted_proxies)?,
        ..UpstreamConfig::default()
    }))
}

pub mod derper_flags;
#[cfg(test)]
mod tests;

// The TOML fuzz target's entry point (`fuzz/fuzz_targets/config_toml.rs`; cargo-fuzz sets
// `cfg(fuzzing)`); the tests replay its corpus through it.
#[cfg(any(test, fuzzing))]
pub mod fuzzing;
