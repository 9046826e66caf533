//! Tailscale/Coder JSON DERP map (`tailcfg.DERPMap` as extended by Coder's fork) and its
//! conversion to and from the protobuf `coder.tailnet.v2.DERPMap`.
//!
//! Why: coderd serves the map as JSON on `/api/v2/derp-map` and in REST responses, and as protobuf
//! on `StreamDERPMaps` and in the agent manifest; both must carry the same regions and nodes. Reading
//! mirrors Go's `encoding/json` (case-insensitive keys, unknown fields ignored, `null` = zero value);
//! writing mirrors Go's struct tags (omitempty exactly where Go has it). The protobuf form always
//! carries `home_params`, because Go clients dereference it unconditionally and would panic.
//!
//! Pure data code: never does I/O, never panics on any input.

use crate::tailnet::v2;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// DERP map errors.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum DerpMapError {
    /// JSON syntax or type error.
    #[error("derp map json: {0}")]
    Json(String),
    /// A port does not fit the protobuf `int32` field.
    #[error("region {region} node {node:?}: {field} {value} out of int32 range")]
    PortOutOfRange {
        /// Region id.
        region: i64,
        /// Node name.
        node: String,
        /// `STUNPort` or `DERPPort`.
        field: &'static str,
        /// Offending value.
        value: i64,
    },
}

fn is_false(b: &bool) -> bool {
    !*b
}
fn is_zero_i64(v: &i64) -> bool {
    *v == 0
}
fn is_zero_f64(v: &f64) -> bool {
    *v == 0.0
}

/// Serializes an integer-keyed map the way Go's `encoding/json` does: keys as decimal strings,
/// sorted as strings (so "1000" comes before "999").
pub(crate) fn ser_go_int_map<S, V>(m: &BTreeMap<i64, V>, s: S) -> Result<S::Ok, S::Error>
where
    S: serde::Serializer,
    V: Serialize,
{
    use serde::ser::SerializeMap;
    let mut keys: Vec<(String, &V)> = m.iter().map(|(k, v)| (k.to_string(), v)).collect();
    keys.sort_by(|a, b| a.0.cmp(&b.0));
    let mut map = s.serialize_map(Some(keys.len()))?;
    for (k, v) in keys {
        map.serialize_entry(&k, v)?;
    }
    map.end()
}

/// `tailcfg.DERPHomeParams`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct HomeParams {
    /// Region id → latency multiplier for home selection.
    #[serde(
        rename = "RegionScore",
        skip_serializing_if = "BTreeMap::is_empty",
        serialize_with = "ser_go_int_map"
    )]
    pub region_score: BTreeMap<i64, f64>,
}

/// `tailcfg.DERPMap` (Coder fork).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct DerpMap {
    /// Home selection tuning (omitted when `None`).
    #[serde(rename = "HomeParams", skip_serializing_if = "Option::is_none")]
    pub home_params: Option<HomeParams>,
    /// Regions keyed by region id (JSON: decimal string keys).
    #[serde(rename = "Regions", serialize_with = "ser_go_int_map")]
    pub regions: BTreeMap<i64, DerpRegion>,
    /// Use only these regions (note the lower-case JSON name).
    #[serde(rename = "omitDefaultRegions", skip_serializing_if = "is_false")]
    pub omit_default_regions: bool,
}

/// `tailcfg.DERPRegion` (Coder fork adds `EmbeddedRelay`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct DerpRegion {
    /// Region served by coderd's embedded DERP server.
    #[serde(rename = "EmbeddedRelay")]
    pub embedded_relay: bool,
    /// Region id (> 0).
    #[serde(rename = "RegionID")]
    pub region_id: i64,
    /// Short code.
    #[serde(rename = "RegionCode")]
    pub region_code: String,
    /// Long name.
    #[serde(rename = "RegionName")]
    pub region_name: String,
    /// Latitude (omitempty; not carried by protobuf).
    #[serde(rename = "Latitude", skip_serializing_if = "is_zero_f64")]
    pub latitude: f64,
    /// Longitude (omitempty; not carried by protobuf).
    #[serde(rename = "Longitude", skip_serializing_if = "is_zero_f64")]
    pub longitude: f64,
    /// Deprecated avoid flag.
    #[serde(rename = "Avoid", skip_serializing_if = "is_false")]
    pub avoid: bool,
    /// Never probe or home here (omitempty; not carried by protobuf).
    #[serde(rename = "NoMeasureNoHome", skip_serializing_if = "is_false")]
    pub no_measure_no_home: bool,
    /// Nodes in priority order.
    #[serde(rename = "Nodes")]
    pub nodes: Vec<DerpNode>,
}

/// `tailcfg.DERPNode` (Coder fork adds `ForceHTTP`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct DerpNode {
    /// Unique node name, e.g. `"999b"`.
    #[serde(rename = "Name")]
    pub name: String,
    /// Region id.
    #[serde(rename = "RegionID")]
    pub region_id: i64,
    /// DNS name / TLS SNI.
    #[serde(rename = "HostName")]
    pub host_name: String,
    /// Expected certificate name (or `sha256-raw:` pin).
    #[serde(rename = "CertName", skip_serializing_if = "String::is_empty")]
    pub cert_name: String,
    /// Literal IPv4 to dial (or e.g. `"none"`).
    #[serde(rename = "IPv4", skip_serializing_if = "String::is_empty")]
    pub ipv4: String,
    /// Literal IPv6 to dial (or e.g. `"none"`).
    #[serde(rename = "IPv6", skip_serializing_if = "String::is_empty")]
    pub ipv6: String,
    /// STUN port (0 ⇒ 3478, -1 disables).
    #[serde(rename = "STUNPort", skip_serializing_if = "is_zero_i64")]
    pub stun_port: i64,
    /// STUN only, no DERP.
    #[serde(rename = "STUNOnly", skip_serializing_if = "is_false")]
    pub stun_only: bool,
    /// DERP port (0 ⇒ 443).
    #[serde(rename = "DERPPort", skip_serializing_if = "is_zero_i64")]
    pub derp_port: i64,
    /// Skip TLS verification (tests).
    #[serde(rename = "InsecureForTests", skip_serializing_if = "is_false")]
    pub insecure_for_tests: bool,
    /// Dial plain HTTP.
    #[serde(rename = "ForceHTTP", skip_serializing_if = "is_false")]
    pub force_http: bool,
    /// STUN test IP (tests).
    #[serde(rename = "STUNTestIP", skip_serializing_if = "String::is_empty")]
    pub stun_test_ip: String,
    /// Answers captive-portal checks on port 80.
    #[serde(rename = "CanPort80", skip_serializing_if = "is_false")]
    pub can_port_80: bool,
}

const MAP_FIELDS: &[&str] = &["HomeParams", "Regions", "omitDefaultRegions"];
const HOME_FIELDS: &[&str] = &["RegionScore"];
const REGION_FIELDS: &[&str] = &[
    "EmbeddedRelay",
    "RegionID",
    "RegionCode",
    "RegionName",
    "Latitude",
    "Longitude",
    "Avoid",
    "NoMeasureNoHome",
    "Nodes",
];
const NODE_FIELDS: &[&str] = &[
    "Name",
    "RegionID",
    "HostName",
    "CertName",
    "IPv4",
    "IPv6",
    "STUNPort",
    "STUNOnly",
    "DERPPort",
    "InsecureForTests",
    "ForceHTTP",
    "STUNTestIP",
    "CanPort80",
];

/// Renames the keys of `obj` to their canonical field names, matching case-insensitively like Go
/// (an exact match wins over a case-folded one), drops unknown keys and `null` values (Go leaves the
/// zero value for both). Non-objects are returned unchanged so serde reports the type error.
fn canonical_object(v: serde_json::Value, fields: &[&str]) -> serde_json::Value {
    let serde_json::Value::Object(map) = v else {
        return v;
    };
    let mut out = serde_json::Map::new();
    for (k, val) in map {
        if val.is_null() {
            continue;
        }
        let Some(canon) = fields.iter().find(|f| f.eq_ignore_ascii_case(&k)) else {
            continue;
        };
        let exact = *canon == k;
        if exact || !out.contains_key(*canon) {
            out.insert((*canon).to_string(), val);
        }
    }
    serde_json::Value::Object(out)
}

fn canonical_map(v: serde_json::Value) -> serde_json::Value {
    let mut m = match canonical_object(v, MAP_FIELDS) {
        serde_json::Value::Object(m) => m,
        other => return other,
    };
    if let Some(hp) = m.remove("HomeParams") {
        m.insert("HomeParams".into(), canonical_object(hp, HOME_FIELDS));
    }
    if let Some(regions) = m.remove("Regions") {
        let regions = match regions {
            serde_json::Value::Object(rs) => serde_json::Value::Object(
                rs.into_iter()
                    .filter(|(_, r)| !r.is_null())
                    .map(|(id, r)| (id, canonical_region(r)))
                    .collect(),
            ),
            other => other,
        };
        m.insert("Regions".into(), regions);
    }
    serde_json::Value::Object(m)
}

fn canonical_region(v: serde_json::Value) -> serde_json::Value {
    let mut r = match canonical_object(v, REGION_FIELDS) {
        serde_json::Value::Object(r) => r,
        other => return other,
    };
    if let Some(nodes) = r.remove("Nodes") {
        let nodes = match nodes {
            serde_json::Value::Array(ns) => serde_json::Value::Array(
                ns.into_iter()
                    .filter(|n| !n.is_null())
                    .map(|n| canonical_object(n, NODE_FIELDS))
                    .collect(),
            ),
            other => other,
        };
        r.insert("Nodes".into(), nodes);
    }
    serde_json::Value::Object(r)
}

fn port_to_i32(
    region: i64,
    node: &DerpNode,
    field: &'static str,
    v: i64,
) -> Result<i32, DerpMapError> {
    i32::try_from(v).map_err(|_| DerpMapError::PortOutOfRange {
        region,
        node: node.name.clone(),
        field,
        value: v,
    })
}

impl DerpMap {
    /// Parses JSON the way Go's decoder would (case-insensitive keys, unknown fields ignored,
    /// `null` = zero value). Case-variant duplicate keys: the exact spelling wins, otherwise the
    /// first folded one in key order.
    pub fn from_json(data: &[u8]) -> Result<DerpMap, DerpMapError> {
        let v: serde_json::Value =
            serde_json::from_slice(data).map_err(|e| DerpMapError::Json(e.to_string()))?;
        DerpMap::from_value(v)
    }

    /// Like [`DerpMap::from_json`] from an already parsed value.
    pub fn from_value(v: serde_json::Value) -> Result<DerpMap, DerpMapError> {
        if !v.is_object() {
            return Err(DerpMapError::Json("DERP map must be a JSON object".into()));
        }
        serde_json::from_value(canonical_map(v)).map_err(|e| DerpMapError::Json(e.to_string()))
    }

    /// Serializes with Go's field names and omitempty rules (no trailing newline).
    pub fn to_json(&self) -> Result<Vec<u8>, DerpMapError> {
        serde_json::to_vec(self).map_err(|e| DerpMapError::Json(e.to_string()))
    }

    /// Converts to protobuf (Coder's `DERPMapToProto`). `home_params` is always set. Latitude,
    /// Longitude, NoMeasureNoHome and omitDefaultRegions have no protobuf field and are dropped.
    pub fn to_proto(&self) -> Result<v2::DerpMap, DerpMapError> {
        let mut regions = BTreeMap::new();
        for (id, r) in &self.regions {
            let mut nodes = Vec::with_capacity(r.nodes.len());
            for n in &r.nodes {
                nodes.push(v2::derp_map::region::Node {
                    name: n.name.clone(),
                    region_id: n.region_id,
                    host_name: n.host_name.clone(),
                    cert_name: n.cert_name.clone(),
                    ipv4: n.ipv4.clone(),
                    ipv6: n.ipv6.clone(),
                    stun_port: port_to_i32(*id, n, "STUNPort", n.stun_port)?,
                    stun_only: n.stun_only,
                    derp_port: port_to_i32(*id, n, "DERPPort", n.derp_port)?,
                    insecure_for_tests: n.insecure_for_tests,
                    force_http: n.force_http,
                    stun_test_ip: n.stun_test_ip.clone(),
                    can_port_80: n.can_port_80,
                });
            }
            regions.insert(
                *id,
                v2::derp_map::Region {
                    region_id: r.region_id,
                    embedded_relay: r.embedded_relay,
                    region_code: r.region_code.clone(),
                    region_name: r.region_name.clone(),
                    avoid: r.avoid,
                    nodes,
                },
            );
        }
        Ok(v2::DerpMap {
            home_params: Some(v2::derp_map::HomeParams {
                region_score: self
                    .home_params
                    .as_ref()
                    .map(|h| h.region_score.clone())
                    .unwrap_or_default(),
            }),
            regions,
        })
    }

    /// Converts from protobuf (Coder's `DERPMapFromProto`). A present `home_params` becomes
    /// `Some` (like Go, which always allocates it); an absent one becomes `None`.
    pub fn from_proto(p: &v2::DerpMap) -> DerpMap {
        DerpMap {
            home_params: p.home_params.as_ref().map(|h| HomeParams {
                region_score: h.region_score.clone(),
            }),
            regions: p
                .regions
                .iter()
                .map(|(id, r)| {
                    (
                        *id,
                        DerpRegion {
                            embedded_relay: r.embedded_relay,
                            region_id: r.region_id,
                            region_code: r.region_code.clone(),
                            region_name: r.region_name.clone(),
                            latitude: 0.0,
                            longitude: 0.0,
                            avoid: r.avoid,
                            no_measure_no_home: false,
                            nodes: r
                                .nodes
                                .iter()
                                .map(|n| DerpNode {
                                    name: n.name.clone(),
                                    region_id: n.region_id,
                                    host_name: n.host_name.clone(),
                                    cert_name: n.cert_name.clone(),
                                    ipv4: n.ipv4.clone(),
                                    ipv6: n.ipv6.clone(),
                                    stun_port: i64::from(n.stun_port),
                                    stun_only: n.stun_only,
                                    derp_port: i64::from(n.derp_port),
                                    insecure_for_tests: n.insecure_for_tests,
                                    force_http: n.force_http,
                                    stun_test_ip: n.stun_test_ip.clone(),
                                    can_port_80: n.can_port_80,
                                })
                                .collect(),
                        },
                    )
                })
                .collect(),
            omit_default_regions: false,
        }
    }
}

fn same_node(a: &DerpNode, b: &DerpNode) -> bool {
    a.name == b.name
        && a.region_id == b.region_id
        && a.host_name == b.host_name
        && a.cert_name == b.cert_name
        && a.ipv4 == b.ipv4
        && a.ipv6 == b.ipv6
        && a.stun_port == b.stun_port
        && a.stun_only == b.stun_only
        && a.derp_port == b.derp_port
        && a.insecure_for_tests == b.insecure_for_tests
        && a.force_http == b.force_http
        && a.stun_test_ip == b.stun_test_ip
}

fn same_region(a: &DerpRegion, b: &DerpRegion) -> bool {
    if a.embedded_relay != b.embedded_relay
        || a.region_id != b.region_id
        || a.region_code != b.region_code
        || a.region_name != b.region_name
        || a.avoid != b.avoid
        || a.nodes.len() != b.nodes.len()
    {
        return false;
    }
    // Like Go: index a's nodes by name (a later duplicate wins), look up each of b's nodes.
    let by_name: BTreeMap<&str, &DerpNode> = a.nodes.iter().map(|n| (n.name.as_str(), n)).collect();
    b.nodes.iter().all(|n| {
        by_name
            .get(n.name.as_str())
            .is_some_and(|an| same_node(an, n))
    })
}

/// Coder's `CompareDERPMaps`: true if the maps would configure clients identically. Node order is
/// ignored (nodes are matched by `Name`); HomeParams, CanPort80, Latitude, Longitude and
/// NoMeasureNoHome are ignored (Coder's fork compares none of them).
pub fn same_map(a: &DerpMap, b: &DerpMap) -> bool {
    a.regions.len() == b.regions.len()
        && a.omit_default_regions == b.omit_default_regions
        && a.regions
            .iter()
            .all(|(id, ra)| b.regions.get(id).is_some_and(|rb| same_region(ra, rb)))
}

/// [`same_map`] on protobuf maps.
pub fn same_proto_map(a: &v2::DerpMap, b: &v2::DerpMap) -> bool {
    same_map(&DerpMap::from_proto(a), &DerpMap::from_proto(b))
}
