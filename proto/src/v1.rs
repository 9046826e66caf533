//! Coder's legacy v1 JSON `Node` (tailnet/coordinator.go before v2.16) and lossless conversion
//! to and from the protobuf `coder.tailnet.v2.Node`.
//!
//! Why: old agents and clients exchanged nodes as JSON over a websocket; the coordinator keeps
//! nodes as v2 protobuf, so v1 peers need an exact, loss-free bridge. Reading follows Go's
//! `encoding/json`: keys match case-insensitively, unknown fields are ignored, and `null` or absent
//! fields mean the zero value. Writing follows Go too: empty maps/slices are written as `null`
//! (Go's nil), times as RFC 3339 with trimmed nanoseconds in UTC (`Z`).
//!
//! Mapping notes: v2 `as_of` absent ⇔ v1 Go zero time (`0001-01-01T00:00:00Z`). v2 `key` is
//! `"np"` + 32 bytes, v1 `key` is `"nodekey:<hex>"`. The time code is calendar arithmetic only:
//! this module never reads a clock and never panics on any input.

use crate::key::{DiscoPublic, NodePublic};
use crate::tailnet::v2;
use bytes::Bytes;
use serde::de::Error as _;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::collections::BTreeMap;

/// Unix seconds of Go's zero `time.Time` (0001-01-01T00:00:00Z).
pub const GO_ZERO_TIME_UNIX: i64 = -62_135_596_800;

/// Conversion and parsing errors.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ConvertError {
    /// JSON syntax or type error.
    #[error("v1 node json: {0}")]
    Json(String),
    /// `Node.key` is not `"np"` + 32 bytes.
    #[error("node key must be \"np\" + 32 bytes, got {0} bytes")]
    BadNodeKey(usize),
    /// Disco key text is not `discokey:` + 64 hex.
    #[error("invalid disco key {0:?}")]
    BadDiscoKey(String),
    /// A prefix in `addresses`/`allowed_ips` does not parse.
    #[error("invalid prefix {0:?}")]
    BadPrefix(String),
    /// A value does not fit the protobuf field's integer width.
    #[error("{field} value {value} out of range")]
    OutOfRange {
        /// Field name.
        field: &'static str,
        /// Offending value.
        value: i64,
    },
    /// A DERP latency is NaN or infinite (not representable in JSON).
    #[error("derp latency for {0:?} is not finite")]
    NonFiniteLatency(String),
    /// A timestamp is outside years 0000..=9999 or has invalid nanoseconds.
    #[error("timestamp out of range: {seconds}s {nanos}ns")]
    BadTimestamp {
        /// Seconds since the Unix epoch.
        seconds: i64,
        /// Nanoseconds.
        nanos: i32,
    },
}

/// A UTC instant with nanosecond precision (what Go's `time.Time` carries over JSON).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Time {
    /// Seconds since the Unix epoch.
    pub seconds: i64,
    /// Nanoseconds, 0..1e9.
    pub nanos: u32,
}

impl Default for Time {
    /// Go's zero time.
    fn default() -> Self {
        Time::GO_ZERO
    }
}

fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = i64::from((m + 9) % 12);
    let doy = (153 * mp + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

fn days_in_month(y: i64, m: u32) -> u32 {
    match m {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        _ => {
            if (y % 4 == 0 && y % 100 != 0) || y % 400 == 0 {
                29
            } else {
                28
            }
        }
    }
}

/// Smallest Unix second representable in RFC 3339 (0000-01-01T00:00:00Z).
const MIN_RFC3339: i64 = -62_167_219_200;
/// Largest Unix second representable in RFC 3339 (9999-12-31T23:59:59Z).
const MAX_RFC3339: i64 = 253_402_300_799;

impl Time {
    /// Go's zero `time.Time`.
    pub const GO_ZERO: Time = Time {
        seconds: GO_ZERO_TIME_UNIX,
        nanos: 0,
    };

    /// Whether this is Go's zero time.
    pub fn is_go_zero(&self) -> bool {
        *self == Time::GO_ZERO
    }

    /// Parses RFC 3339 (`YYYY-MM-DDTHH:MM:SS[.fraction](Z|±HH:MM)`), as Go's `time.Time`
    /// `UnmarshalJSON` does. Fractions longer than 9 digits are truncated.
    pub fn parse_rfc3339(s: &str) -> Option<Time> {
        let b = s.as_bytes();
        let num = |r: std::ops::Range<usize>| -> Option<u32> {
            let part = b.get(r)?;
            let mut v = 0u32;
            for &c in part {
                if !c.is_ascii_digit() {
                    return None;
                }
                v = v * 10 + u32::from(c - b'0');
            }
            Some(v)
        };
        let sep = |i: usize, c: u8| b.get(i) == Some(&c);
        if !(sep(4, b'-') && sep(7, b'-') && sep(10, b'T') && sep(13, b':') && sep(16, b':')) {
            return None;
        }
        let year = i64::from(num(0..4)?);
        let month = num(5..7)?;
        let day = num(8..10)?;
        let hour = num(11..13)?;
        let minute = num(14..16)?;
        let second = num(17..19)?;
        if !(1..=12).contains(&month)
            || day < 1
            || day > days_in_month(year, month)
            || hour > 23
            || minute > 59
            || second > 59
        {
            return None;
        }
        let mut i = 19;
        let mut nanos = 0u32;
        if sep(i, b'.') {
            i += 1;
            let start = i;
            while b.get(i).is_some_and(|c| c.is_ascii_digit()) {
                if i - start < 9 {
                    nanos = nanos * 10 + u32::from(b[i] - b'0');
                }
                i += 1;
            }
            let digits = i - start;
            if digits == 0 {
                return None;
            }
            for _ in digits..9 {
                nanos *= 10;
            }
        }
        let offset: i64 = match b.get(i..)? {
            b"Z" => 0,
            [sign @ (b'+' | b'-'), rest @ ..] if rest.len() == 5 && rest[2] == b':' => {
                let oh = num(i + 1..i + 3)?;
                let om = num(i + 4..i + 6)?;
                if oh > 23 || om > 59 {
                    return None;
                }
                let o = i64::from(oh * 3600 + om * 60);
                if *sign == b'-' {
                    -o
                } else {
                    o
                }
            }
            _ => return None,
        };
        let days = days_from_civil(year, month, day);
        let seconds =
            days * 86_400 + i64::from(hour) * 3600 + i64::from(minute) * 60 + i64::from(second)
                - offset;
        Some(Time { seconds, nanos })
    }

    /// Formats as Go's `RFC3339Nano` in UTC (trailing fraction zeros trimmed, `Z` suffix).
    /// `None` if the year is outside 0000..=9999 or nanos ≥ 1e9 (Go's `MarshalJSON` fails too).
    pub fn format_rfc3339(&self) -> Option<String> {
        if !(MIN_RFC3339..=MAX_RFC3339).contains(&self.seconds) || self.nanos >= 1_000_000_000 {
            return None;
        }
        let days = self.seconds.div_euclid(86_400);
        let secs = self.seconds.rem_euclid(86_400);
        let (y, m, d) = civil_from_days(days);
        let mut out = format!(
            "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}",
            secs / 3600,
            (secs / 60) % 60,
            secs % 60
        );
        if self.nanos > 0 {
            let frac = format!("{:09}", self.nanos);
            out.push('.');
            out.push_str(frac.trim_end_matches('0'));
        }
        out.push('Z');
        Some(out)
    }

    /// Converts to a protobuf timestamp.
    pub fn to_timestamp(self) -> prost_types::Timestamp {
        prost_types::Timestamp {
            seconds: self.seconds,
            nanos: self.nanos as i32,
        }
    }

    /// Converts from a protobuf timestamp, rejecting what RFC 3339 cannot carry.
    pub fn from_timestamp(ts: &prost_types::Timestamp) -> Result<Time, ConvertError> {
        let bad = ConvertError::BadTimestamp {
            seconds: ts.seconds,
            nanos: ts.nanos,
        };
        let nanos = u32::try_from(ts.nanos).map_err(|_| bad.clone())?;
        if nanos >= 1_000_000_000 || !(MIN_RFC3339..=MAX_RFC3339).contains(&ts.seconds) {
            return Err(bad);
        }
        Ok(Time {
            seconds: ts.seconds,
            nanos,
        })
    }
}

impl Serialize for Time {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let text = self.format_rfc3339().ok_or_else(|| {
            serde::ser::Error::custom("Time.MarshalJSON: year outside of range [0,9999]")
        })?;
        s.serialize_str(&text)
    }
}

impl<'de> Deserialize<'de> for Time {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match Option::<String>::deserialize(d)? {
            None => Ok(Time::GO_ZERO),
            Some(s) => Time::parse_rfc3339(&s)
                .ok_or_else(|| D::Error::custom(format!("invalid RFC 3339 time {s:?}"))),
        }
    }
}

fn de_null_default<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de> + Default,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

fn ser_vec_nil<S: Serializer>(v: &[String], s: S) -> Result<S::Ok, S::Error> {
    if v.is_empty() {
        s.serialize_none()
    } else {
        v.serialize(s)
    }
}

fn ser_map_nil<S: Serializer, V: Serialize>(
    m: &BTreeMap<String, V>,
    s: S,
) -> Result<S::Ok, S::Error> {
    if m.is_empty() {
        s.serialize_none()
    } else {
        m.serialize(s)
    }
}

fn ser_int_map_nil<S: Serializer, V: Serialize>(
    m: &BTreeMap<i64, V>,
    s: S,
) -> Result<S::Ok, S::Error> {
    if m.is_empty() {
        s.serialize_none()
    } else {
        crate::derpmap::ser_go_int_map(m, s)
    }
}

/// Coder's v1 JSON node (`tailnet.Node`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Node {
    /// `tailcfg.NodeID` (random).
    #[serde(default, deserialize_with = "de_null_default")]
    pub id: i64,
    /// When the node was generated.
    #[serde(default)]
    pub as_of: Time,
    /// WireGuard node public key (`"nodekey:<hex>"`).
    #[serde(default, deserialize_with = "de_null_default")]
    pub key: NodePublic,
    /// Disco public key (`"discokey:<hex>"`).
    #[serde(default, deserialize_with = "de_null_default")]
    pub disco: DiscoPublic,
    /// Home DERP region id.
    #[serde(default, deserialize_with = "de_null_default")]
    pub preferred_derp: i64,
    /// Latency in seconds per `"<region>-v4"` / `"<region>-v6"`.
    #[serde(
        default,
        serialize_with = "ser_map_nil",
        deserialize_with = "de_null_default"
    )]
    pub derp_latency: BTreeMap<String, f64>,
    /// Region id → reason websockets were forced.
    #[serde(
        default,
        serialize_with = "ser_int_map_nil",
        deserialize_with = "de_null_default"
    )]
    pub derp_forced_websockets: BTreeMap<i64, String>,
    /// Tailnet addresses (prefixes).
    #[serde(
        default,
        serialize_with = "ser_vec_nil",
        deserialize_with = "de_null_default"
    )]
    pub addresses: Vec<String>,
    /// Allowed IPs (prefixes).
    #[serde(
        default,
        serialize_with = "ser_vec_nil",
        deserialize_with = "de_null_default"
    )]
    pub allowed_ips: Vec<String>,
    /// `ip:port` endpoints.
    #[serde(
        default,
        serialize_with = "ser_vec_nil",
        deserialize_with = "de_null_default"
    )]
    pub endpoints: Vec<String>,
}

impl Default for Node {
    fn default() -> Self {
        Node {
            id: 0,
            as_of: Time::GO_ZERO,
            key: NodePublic::ZERO,
            disco: DiscoPublic::default(),
            preferred_derp: 0,
            derp_latency: BTreeMap::new(),
            derp_forced_websockets: BTreeMap::new(),
            addresses: Vec::new(),
            allowed_ips: Vec::new(),
            endpoints: Vec::new(),
        }
    }
}

const FIELDS: [&str; 10] = [
    "id",
    "as_of",
    "key",
    "disco",
    "preferred_derp",
    "derp_latency",
    "derp_forced_websockets",
    "addresses",
    "allowed_ips",
    "endpoints",
];

/// Go-style case-insensitive field matching: rename keys to the canonical field name. An exact
/// match wins over a case-folded one (as in Go).
fn canonicalize(v: serde_json::Value) -> Result<serde_json::Value, ConvertError> {
    let serde_json::Value::Object(map) = v else {
        return Err(ConvertError::Json(
            "v1 node must be a JSON object".to_string(),
        ));
    };
    let mut out = serde_json::Map::new();
    let mut exact = std::collections::HashSet::new();
    for (k, _) in map.iter() {
        if FIELDS.contains(&k.as_str()) {
            exact.insert(k.clone());
        }
    }
    for (k, val) in map {
        let canon = FIELDS.iter().find(|f| f.eq_ignore_ascii_case(&k)).copied();
        match canon {
            Some(f) if f == k => {
                out.insert(k, val);
            }
            Some(f) if !exact.contains(f) => {
                out.insert(f.to_string(), val);
            }
            Some(_) => {}
            None => {}
        }
    }
    Ok(serde_json::Value::Object(out))
}

impl Node {
    /// Parses one JSON node the way Go's decoder would (case-insensitive keys, nulls → zero).
    pub fn from_json(data: &[u8]) -> Result<Node, ConvertError> {
        let v: serde_json::Value =
            serde_json::from_slice(data).map_err(|e| ConvertError::Json(e.to_string()))?;
        Node::from_value(v)
    }

    /// Like [`Node::from_json`] from an already parsed value.
    pub fn from_value(v: serde_json::Value) -> Result<Node, ConvertError> {
        serde_json::from_value(canonicalize(v)?).map_err(|e| ConvertError::Json(e.to_string()))
    }

    /// Parses a stream of concatenated JSON nodes (v1 peers may send several per message, since
    /// the Go server used a streaming decoder).
    pub fn from_json_stream(data: &[u8]) -> Result<Vec<Node>, ConvertError> {
        serde_json::Deserializer::from_slice(data)
            .into_iter::<serde_json::Value>()
            .map(|v| {
                v.map_err(|e| ConvertError::Json(e.to_string()))
                    .and_then(Node::from_value)
            })
            .collect()
    }

    /// Serializes as Go's `json.Marshal` would (field order as in Go's struct).
    pub fn to_json(&self) -> Result<Vec<u8>, ConvertError> {
        serde_json::to_vec(self).map_err(|e| ConvertError::Json(e.to_string()))
    }

    /// Converts to the protobuf node.
    pub fn to_proto(&self) -> Result<v2::Node, ConvertError> {
        let preferred_derp =
            i32::try_from(self.preferred_derp).map_err(|_| ConvertError::OutOfRange {
                field: "preferred_derp",
                value: self.preferred_derp,
            })?;
        for (k, v) in &self.derp_latency {
            if !v.is_finite() {
                return Err(ConvertError::NonFiniteLatency(k.clone()));
            }
        }
        let mut forced = BTreeMap::new();
        for (k, v) in &self.derp_forced_websockets {
            let k32 = i32::try_from(*k).map_err(|_| ConvertError::OutOfRange {
                field: "derp_forced_websockets",
                value: *k,
            })?;
            forced.insert(k32, v.clone());
        }
        check_prefixes(&self.addresses)?;
        check_prefixes(&self.allowed_ips)?;
        let as_of = if self.as_of.is_go_zero() {
            None
        } else {
            // Validate the range so that the round trip back to JSON cannot fail.
            let ts = self.as_of.to_timestamp();
            Time::from_timestamp(&ts)?;
            Some(ts)
        };
        Ok(v2::Node {
            id: self.id,
            as_of,
            key: Bytes::copy_from_slice(&self.key.to_np_bytes()),
            disco: self.disco.to_string(),
            preferred_derp,
            derp_latency: self.derp_latency.clone(),
            derp_forced_websocket: forced,
            addresses: self.addresses.clone(),
            allowed_ips: self.allowed_ips.clone(),
            endpoints: self.endpoints.clone(),
        })
    }

    /// Converts from the protobuf node. Fails where Go's `ProtoToNode` (or JSON encoding) would.
    pub fn from_proto(n: &v2::Node) -> Result<Node, ConvertError> {
        let key =
            NodePublic::from_np_bytes(&n.key).map_err(|_| ConvertError::BadNodeKey(n.key.len()))?;
        let disco: DiscoPublic = n
            .disco
            .parse()
            .map_err(|_| ConvertError::BadDiscoKey(n.disco.clone()))?;
        for (k, v) in &n.derp_latency {
            if !v.is_finite() {
                return Err(ConvertError::NonFiniteLatency(k.clone()));
            }
        }
        check_prefixes(&n.addresses)?;
        check_prefixes(&n.allowed_ips)?;
        let as_of = match &n.as_of {
            None => Time::GO_ZERO,
            Some(ts) => Time::from_timestamp(ts)?,
        };
        Ok(Node {
            id: n.id,
            as_of,
            key,
            disco,
            preferred_derp: i64::from(n.preferred_derp),
            derp_latency: n.derp_latency.clone(),
            derp_forced_websockets: n
                .derp_forced_websocket
                .iter()
                .map(|(k, v)| (i64::from(*k), v.clone()))
                .collect(),
            addresses: n.addresses.clone(),
            allowed_ips: n.allowed_ips.clone(),
            endpoints: n.endpoints.clone(),
        })
    }
}

/// Serializes the server → v1 peer message: a JSON array of nodes.
pub fn nodes_to_json(nodes: &[Node]) -> Result<Vec<u8>, ConvertError> {
    serde_json::to_vec(nodes).map_err(|e| ConvertError::Json(e.to_string()))
}

/// Whether `s` is a valid `netip.Prefix` text (`<ip>/<bits>`, bits in range, no leading zeros).
pub fn is_valid_prefix(s: &str) -> bool {
    let Some((addr, bits)) = s.split_once('/') else {
        return false;
    };
    if bits.is_empty()
        || bits.len() > 3
        || !bits.bytes().all(|c| c.is_ascii_digit())
        || (bits.len() > 1 && bits.starts_with('0'))
    {
        return false;
    }
    let Ok(bits) = bits.parse::<u8>() else {
        return false;
    };
    match addr.parse::<std::net::IpAddr>() {
        Ok(std::net::IpAddr::V4(_)) => bits <= 32,
        Ok(std::net::IpAddr::V6(_)) => bits <= 128,
        Err(_) => false,
    }
}

fn check_prefixes(list: &[String]) -> Result<(), ConvertError> {
    match list.iter().find(|p| !is_valid_prefix(p)) {
        Some(bad) => Err(ConvertError::BadPrefix(bad.clone())),
        None => Ok(()),
    }
}
