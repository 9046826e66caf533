//! The JSON carried (sealed) in the ClientInfo and ServerInfo handshake frames.
//!
//! Why hand-written decoding: Go's `encoding/json` matches object keys case-insensitively,
//! ignores unknown keys, treats `null` as "leave unchanged" and lets a later duplicate win;
//! Tailscale's own tests send both `"Version"/"MeshKey"` and `"version"/"meshKey"`. serde's derive
//! cannot match keys case-insensitively, so a small visitor walks the object in document order.
//! Encoding reproduces Go's output byte for byte (field order and `omitempty`).
//!
//! What this module must never do: reject unknown fields, validate `version` (derper doesn't), or
//! accept a mesh key that is not exactly 64 hex digits (Go: "invalid mesh key").

use core::fmt;

use serde::de::{self, Deserializer, IgnoredAny, MapAccess, Visitor};
use serde::Deserialize;

use crate::key::{parse_hex32, MeshKey};

/// Why ClientInfo/ServerInfo JSON was rejected.
#[derive(Debug, thiserror::Error)]
pub enum InfoError {
    /// `meshKey` present but not a string of exactly 64 hex digits.
    #[error("invalid mesh key")]
    InvalidMeshKey,
    /// Malformed JSON, not an object, or a field of the wrong type.
    #[error("invalid JSON: {0}")]
    Json(#[from] serde_json::Error),
}

/// What a client tells the server about itself (`derp.ClientInfo`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ClientInfo {
    /// Mesh key (`"meshKey"`), granting mesh privileges when it matches the server's. An all-zero
    /// key is treated as absent, as Go's `omitzero`/`IsZero` do.
    pub mesh_key: Option<MeshKey>,
    /// Client protocol version (`"version"`, omitted when 0). Not validated.
    pub version: i64,
    /// Whether the client acknowledges pings (`"CanAckPings"`, always emitted).
    pub can_ack_pings: bool,
    /// Whether the client is a prober (`"IsProber"`, omitted when false).
    pub is_prober: bool,
    /// Opaque application label for stats (`"AppName"`, omitted when empty).
    pub app_name: String,
}

/// What the server tells a client after the handshake (`derp.ServerInfo`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ServerInfo {
    /// Server protocol version (`"version"`, omitted when 0; servers send 2).
    pub version: i64,
    /// Client-side send rate limit in bytes/s (`"TokenBucketBytesPerSecond"`, omitted when 0).
    /// Advertising it makes Go clients silently drop packets over the rate.
    pub token_bucket_bytes_per_second: i64,
    /// Burst for the limit above (`"TokenBucketBytesBurst"`, omitted when 0).
    pub token_bucket_bytes_burst: i64,
}

impl ServerInfo {
    /// What derper sends: `{"version":2}`.
    pub const fn current() -> Self {
        ServerInfo {
            version: super::PROTOCOL_VERSION,
            token_bucket_bytes_per_second: 0,
            token_bucket_bytes_burst: 0,
        }
    }
}

fn json_str(out: &mut Vec<u8>, s: &str) {
    // serde_json's string escaping matches Go's for everything a client label contains, except
    // that Go also escapes <, > and & as \u003c etc.; both forms decode identically.
    match serde_json::to_vec(s) {
        Ok(v) => out.extend_from_slice(&v),
        Err(_) => out.extend_from_slice(b"\"\""),
    }
}

fn push_int(out: &mut Vec<u8>, v: i64) {
    out.extend_from_slice(v.to_string().as_bytes());
}

impl ClientInfo {
    /// Encodes like Go: `{"meshKey":..,"version":..,"CanAckPings":..,"IsProber":..,"AppName":..}`
    /// with empty/zero optional fields omitted.
    pub fn to_json(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(64);
        out.push(b'{');
        if let Some(k) = self.mesh_key.filter(|k| !k.is_zero()) {
            out.extend_from_slice(b"\"meshKey\":\"");
            out.extend_from_slice(k.to_string().as_bytes());
            out.extend_from_slice(b"\",");
        }
        if self.version != 0 {
            out.extend_from_slice(b"\"version\":");
            push_int(&mut out, self.version);
            out.push(b',');
        }
        out.extend_from_slice(b"\"CanAckPings\":");
        out.extend_from_slice(if self.can_ack_pings {
            b"true"
        } else {
            b"false"
        });
        if self.is_prober {
            out.extend_from_slice(b",\"IsProber\":true");
        }
        if !self.app_name.is_empty() {
            out.extend_from_slice(b",\"AppName\":");
            json_str(&mut out, &self.app_name);
        }
        out.push(b'}');
        out
    }

    /// Decodes Go-style: keys case-insensitive, unknown keys ignored, `null` leaves a field at
    /// its default, later duplicates win. A `meshKey` that is not a 64-hex-digit string (including
    /// `null`) is [`InfoError::InvalidMeshKey`], reported only if the JSON is otherwise valid.
    pub fn from_json(data: &[u8]) -> Result<Self, InfoError> {
        let raw: RawClientInfo = serde_json::from_slice(data)?;
        let mesh_key = match raw.mesh_key {
            MeshKeyState::Absent => None,
            MeshKeyState::Invalid => return Err(InfoError::InvalidMeshKey),
            MeshKeyState::Valid(k) if k.is_zero() => None,
            MeshKeyState::Valid(k) => Some(k),
        };
        Ok(ClientInfo {
            mesh_key,
            version: raw.version,
            can_ack_pings: raw.can_ack_pings,
            is_prober: raw.is_prober,
            app_name: raw.app_name,
        })
    }
}

impl ServerInfo {
    /// Encodes like Go: `{"version":2}` plus the token bucket fields when non-zero.
    pub fn to_json(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(16);
        out.push(b'{');
        let mut first = true;
        for (name, v) in [
            ("version", self.version),
            (
                "TokenBucketBytesPerSecond",
                self.token_bucket_bytes_per_second,
            ),
            ("TokenBucketBytesBurst", self.token_bucket_bytes_burst),
        ] {
            if v == 0 {
                continue;
            }
            if !first {
                out.push(b',');
            }
            first = false;
            out.push(b'"');
            out.extend_from_slice(name.as_bytes());
            out.extend_from_slice(b"\":");
            push_int(&mut out, v);
        }
        out.push(b'}');
        out
    }

    /// Decodes Go-style (case-insensitive keys, unknown keys ignored, `null` = unchanged).
    pub fn from_json(data: &[u8]) -> Result<Self, InfoError> {
        let raw: RawServerInfo = serde_json::from_slice(data)?;
        Ok(ServerInfo {
            version: raw.version,
            token_bucket_bytes_per_second: raw.per_second,
            token_bucket_bytes_burst: raw.burst,
        })
    }
}

#[derive(Default)]
enum MeshKeyState {
    #[default]
    Absent,
    Invalid,
    Valid(MeshKey),
}

#[derive(Default)]
struct RawClientInfo {
    mesh_key: MeshKeyState,
    version: i64,
    can_ack_pings: bool,
    is_prober: bool,
    app_name: String,
}

#[derive(Default)]
struct RawServerInfo {
    version: i64,
    per_second: i64,
    burst: i64,
}

/// Matches a JSON object key against a fixed list ASCII-case-insensitively, yielding its index.
struct FieldSeed<const N: usize>([&'static str; N]);

impl<'de, const N: usize> de::DeserializeSeed<'de> for FieldSeed<N> {
    type Value = Option<usize>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_str(self)
    }
}

impl<'de, const N: usize> Visitor<'de> for FieldSeed<N> {
    type Value = Option<usize>;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an object key")
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
        Ok(self.0.iter().position(|n| n.eq_ignore_ascii_case(v)))
    }
}

const CLIENT_FIELDS: [&str; 5] = ["meshKey", "version", "CanAckPings", "IsProber", "AppName"];
const SERVER_FIELDS: [&str; 3] = [
    "version",
    "TokenBucketBytesPerSecond",
    "TokenBucketBytesBurst",
];

impl<'de> Deserialize<'de> for RawClientInfo {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = RawClientInfo;
            // Go: unmarshaling `null` into a struct is a no-op, not an error.
            fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
                Ok(RawClientInfo::default())
            }
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a ClientInfo JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut out = RawClientInfo::default();
                while let Some(idx) = map.next_key_seed(FieldSeed(CLIENT_FIELDS))? {
                    match idx {
                        Some(0) => {
                            let v: serde_json::Value = map.next_value()?;
                            out.mesh_key = match v {
                                serde_json::Value::String(s) => match parse_hex32(&s) {
                                    Ok(b) => MeshKeyState::Valid(MeshKey::from_bytes(b)),
                                    Err(_) => MeshKeyState::Invalid,
                                },
                                _ => MeshKeyState::Invalid,
                            };
                        }
                        Some(1) => {
                            if let Some(v) = map.next_value::<Option<i64>>()? {
                                out.version = v;
                            }
                        }
                        Some(2) => {
                            if let Some(v) = map.next_value::<Option<bool>>()? {
                                out.can_ack_pings = v;
                            }
                        }
                        Some(3) => {
                            if let Some(v) = map.next_value::<Option<bool>>()? {
                                out.is_prober = v;
                            }
                        }
                        Some(4) => {
                            if let Some(v) = map.next_value::<Option<String>>()? {
                                out.app_name = v;
                            }
                        }
                        _ => {
                            map.next_value::<IgnoredAny>()?;
                        }
                    }
                }
                Ok(out)
            }
        }
        d.deserialize_any(V)
    }
}

impl<'de> Deserialize<'de> for RawServerInfo {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = RawServerInfo;
            // Go: unmarshaling `null` into a struct is a no-op, not an error.
            fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
                Ok(RawServerInfo::default())
            }
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a ServerInfo JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut out = RawServerInfo::default();
                while let Some(idx) = map.next_key_seed(FieldSeed(SERVER_FIELDS))? {
                    let slot = match idx {
                        Some(0) => &mut out.version,
                        Some(1) => &mut out.per_second,
                        Some(2) => &mut out.burst,
                        _ => {
                            map.next_value::<IgnoredAny>()?;
                            continue;
                        }
                    };
                    if let Some(v) = map.next_value::<Option<i64>>()? {
                        *slot = v;
                    }
                }
                Ok(out)
            }
        }
        d.deserialize_any(V)
    }
}
