//! Replacing the DERP map inside coderd's JSON answers with tailnetd's own.
//!
//! Why: when tailnetd serves the relays, clients and legacy agents must learn tailnetd's regions,
//! but they also read the DERP map from two REST answers that are proxied to coderd:
//! `GET /api/v2/workspaceagents/{id}/connection` (`AgentConnectionInfo.derp_map`, read by the CLI
//! before dialing) and the legacy `GET /api/v2/workspaceagents/me/manifest`
//! (`Manifest.derpmap`). Only that one top-level field is replaced; every other member keeps its
//! position and its value byte for byte (values are carried as raw JSON text, never re-encoded;
//! only the insignificant whitespace between members is normalised).
//!
//! This module does no I/O. It must never change anything but the named top-level member, and
//! never fail silently: a body that is not a JSON object is reported so the caller passes it
//! through unchanged and counts it.

use std::borrow::Cow;
use std::fmt;

use serde::de::{Deserializer, MapAccess, Visitor};
use serde_json::value::RawValue;

/// Which member of which proxied answer carries a DERP map.
pub fn derp_field_for(method: &http::Method, path: &str) -> Option<&'static str> {
    if method != http::Method::GET {
        return None;
    }
    let rest = path.strip_prefix("/api/v2/workspaceagents/")?;
    if rest == "me/manifest" {
        return Some("derpmap");
    }
    let (agent, tail) = rest.split_once('/')?;
    if tail == "connection" && !agent.is_empty() && agent != "me" {
        return Some("derp_map");
    }
    None
}

/// Why a body was not rewritten.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RewriteError {
    /// Not a JSON object (or not valid JSON).
    #[error("not a JSON object: {0}")]
    NotJsonObject(String),
    /// The object has no such member.
    #[error("no {0:?} member")]
    NoField(String),
}

struct Members<'a>(Vec<(Cow<'a, str>, &'a RawValue)>);

impl<'de> serde::Deserialize<'de> for Members<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Members<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> Result<Self::Value, A::Error> {
                let mut out = Vec::new();
                while let Some(k) = m.next_key::<Cow<'de, str>>()? {
                    let v: &'de RawValue = m.next_value()?;
                    out.push((k, v));
                }
                Ok(Members(out))
            }
        }
        d.deserialize_map(V)
    }
}

/// Replace the top-level member `field` of the JSON object `body` with `replacement` (raw JSON
/// text, already valid). Every other member keeps its order and raw value.
pub fn replace_member(
    body: &[u8],
    field: &str,
    replacement: &str,
) -> Result<Vec<u8>, RewriteError> {
    let members: Members<'_> =
        serde_json::from_slice(body).map_err(|e| RewriteError::NotJsonObject(e.to_string()))?;
    if !members.0.iter().any(|(k, _)| k == field) {
        return Err(RewriteError::NoField(field.to_string()));
    }
    let mut out = Vec::with_capacity(body.len() + replacement.len());
    out.push(b'{');
    for (i, (k, v)) in members.0.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        // A key serialises infallibly.
        let key = serde_json::to_string(k.as_ref())
            .map_err(|e| RewriteError::NotJsonObject(e.to_string()))?;
        out.extend_from_slice(key.as_bytes());
        out.push(b':');
        if k == field {
            out.extend_from_slice(replacement.trim().as_bytes());
        } else {
            out.extend_from_slice(v.get().as_bytes());
        }
    }
    out.push(b'}');
    // Go's json.Encoder ends with a newline; keep it if the original had one.
    if body.last() == Some(&b'\n') {
        out.push(b'\n');
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields() {
        let get = http::Method::GET;
        assert_eq!(
            derp_field_for(&get, "/api/v2/workspaceagents/me/manifest"),
            Some("derpmap")
        );
        assert_eq!(
            derp_field_for(&get, "/api/v2/workspaceagents/abc/connection"),
            Some("derp_map")
        );
        assert_eq!(derp_field_for(&get, "/api/v2/workspaceagents/abc"), None);
        assert_eq!(
            derp_field_for(&get, "/api/v2/workspaceagents/abc/connection/x"),
            None
        );
        assert_eq!(
            derp_field_for(&http::Method::POST, "/api/v2/workspaceagents/me/manifest"),
            None
        );
        assert_eq!(
            derp_field_for(&get, "/api/v2/workspaceagents/connection"),
            None
        );
    }

    #[test]
    fn replaces_only_the_member() {
        let body =
            br#"{"z":1, "derp_map" : {"Regions":{"1":{}}},"a":[1, 2,{"b":"\u00e9"}],"n":null}"#;
        let out = replace_member(body, "derp_map", "{\"Regions\":{}}\n").unwrap();
        assert_eq!(
            std::str::from_utf8(&out).unwrap(),
            r#"{"z":1,"derp_map":{"Regions":{}},"a":[1, 2,{"b":"\u00e9"}],"n":null}"#
        );
        let with_nl = b"{\"derpmap\":null}\n";
        assert_eq!(
            replace_member(with_nl, "derpmap", "{}").unwrap(),
            b"{\"derpmap\":{}}\n"
        );
        assert!(matches!(
            replace_member(b"[1]", "derp_map", "{}"),
            Err(RewriteError::NotJsonObject(_))
        ));
        assert!(matches!(
            replace_member(b"{\"a\":1}", "derp_map", "{}"),
            Err(RewriteError::NoField(_))
        ));
        assert!(replace_member(b"{\"a\":", "derp_map", "{}").is_err());
    }
}
