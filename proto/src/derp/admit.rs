//! derper's admission controller protocol (`--verify-client-url`): the JSON a relay POSTs about
//! a connecting client and the JSON answer it needs to admit it.
//!
//! Why here: both sides are ours — the relay asks (`derp::edge::verify_url`) and the
//! coordinator answers (its `/tailnetd/derp-admit` endpoint) — and both must match Tailscale's
//! `tailcfg.DERPAdmitClientRequest` / `DERPAdmitClientResponse` byte for byte, so that a
//! headscale or Coder verifier works with our relay and a derper works with our coordinator.
//!
//! Request: `{"NodePublic":"nodekey:<64 hex>","Source":"<client IP>"}` (the IP in Go's
//! `netip.Addr` text form: IPv4 dotted, IPv6 compressed, an IPv4-mapped IPv6 address unmapped).
//! Answer: HTTP 200 and `{"Allow":true}`; anything else refuses. Decoding follows Go's
//! `encoding/json`: field names match case-insensitively, unknown fields are ignored, and only
//! the first JSON value of the body counts.

use std::net::IpAddr;

use crate::key::NodePublic;

/// Largest answer body derper reads (`io.LimitReader(res.Body, 4<<10)`).
pub const MAX_RESPONSE_BYTES: usize = 4 << 10;

/// A body that is not the expected JSON.
#[derive(Debug, thiserror::Error)]
pub enum AdmitJsonError {
    /// Not JSON (or truncated).
    #[error("not JSON: {0}")]
    Json(#[from] serde_json::Error),
    /// JSON, but not an object.
    #[error("not a JSON object")]
    NotObject,
    /// A field has the wrong type or form.
    #[error("field {field}: {reason}")]
    Field {
        /// The field.
        field: &'static str,
        /// What is wrong.
        reason: String,
    },
}

/// `tailcfg.DERPAdmitClientRequest`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AdmitRequest {
    /// The connecting client's node key.
    pub node_public: NodePublic,
    /// The client's IP address (`None`: unknown, sent as `""` like Go's zero `netip.Addr`).
    pub source: Option<IpAddr>,
}

impl AdmitRequest {
    /// The request body, as Go's `json.Marshal` writes it.
    pub fn to_json(&self) -> Vec<u8> {
        let source = self
            .source
            .map(|ip| ip.to_canonical().to_string())
            .unwrap_or_default();
        serde_json::json!({
            "NodePublic": self.node_public.to_string(),
            "Source": source,
        })
        .to_string()
        .into_bytes()
    }

    /// Decodes a request body (what the coordinator's endpoint receives).
    pub fn from_json(body: &[u8]) -> Result<AdmitRequest, AdmitJsonError> {
        let fields = first_object(body)?;
        let mut node_public = NodePublic::ZERO;
        let mut source = None;
        for (name, value) in fields {
            if name.eq_ignore_ascii_case("NodePublic") {
                let text = value.as_str().ok_or(AdmitJsonError::Field {
                    field: "NodePublic",
                    reason: "not a string".into(),
                })?;
                // Go decodes a JSON null (or a missing field) to the zero key; "" is an error.
                node_public = text.parse().map_err(|e| AdmitJsonError::Field {
                    field: "NodePublic",
                    reason: format!("{e}"),
                })?;
            } else if name.eq_ignore_ascii_case("Source") {
                let text = match &value {
                    serde_json::Value::String(s) => s.as_str(),
                    serde_json::Value::Null => "",
                    _ => {
                        return Err(AdmitJsonError::Field {
                            field: "Source",
                            reason: "not a string".into(),
                        })
                    }
                };
                source = if text.is_empty() {
                    None
                } else {
                    Some(text.parse().map_err(|_| AdmitJsonError::Field {
                        field: "Source",
                        reason: format!("{text:?} is not an IP address"),
                    })?)
                };
            }
        }
        Ok(AdmitRequest {
            node_public,
            source,
        })
    }
}

/// `tailcfg.DERPAdmitClientResponse`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct AdmitResponse {
    /// Whether the client may connect.
    pub allow: bool,
}

impl AdmitResponse {
    /// The answer body, as Go's `json.Marshal` writes it.
    pub fn to_json(&self) -> Vec<u8> {
        if self.allow {
            br#"{"Allow":true}"#.to_vec()
        } else {
            br#"{"Allow":false}"#.to_vec()
        }
    }

    /// Decodes an answer body the way derper does: the first JSON value of at most
    /// [`MAX_RESPONSE_BYTES`] bytes, `Allow` matched case-insensitively (missing = false).
    pub fn from_json(body: &[u8]) -> Result<AdmitResponse, AdmitJsonError> {
        let body = &body[..body.len().min(MAX_RESPONSE_BYTES)];
        let fields = first_object(body)?;
        let mut allow = false;
        for (name, value) in fields {
            if name.eq_ignore_ascii_case("Allow") {
                allow = match value {
                    serde_json::Value::Bool(b) => b,
                    serde_json::Value::Null => false,
                    _ => {
                        return Err(AdmitJsonError::Field {
                            field: "Allow",
                            reason: "not a boolean".into(),
                        })
                    }
                };
            }
        }
        Ok(AdmitResponse { allow })
    }
}

/// The first JSON value of `body` (Go's `json.Decoder.Decode` reads one value and ignores the
/// rest), which must be an object.
fn first_object(body: &[u8]) -> Result<serde_json::Map<String, serde_json::Value>, AdmitJsonError> {
    let mut values = serde_json::Deserializer::from_slice(body).into_iter::<serde_json::Value>();
    match values.next() {
        Some(Ok(serde_json::Value::Object(m))) => Ok(m),
        Some(Ok(_)) => Err(AdmitJsonError::NotObject),
        Some(Err(e)) => Err(e.into()),
        None => Err(serde_json::from_slice::<serde_json::Value>(b"")
            .err()
            .map_or(AdmitJsonError::NotObject, AdmitJsonError::Json)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_matches_gos_encoding_and_round_trips() {
        let k = NodePublic::from_bytes([0xab; 32]);
        let req = AdmitRequest {
            node_public: k,
            source: Some("::ffff:10.1.2.3".parse().unwrap()),
        };
        let json = String::from_utf8(req.to_json()).unwrap();
        assert_eq!(
            json,
            format!(
                r#"{{"NodePublic":"nodekey:{}","Source":"10.1.2.3"}}"#,
                "ab".repeat(32)
            )
        );
        let back = AdmitRequest::from_json(json.as_bytes()).unwrap();
        assert_eq!(back.node_public, k);
        assert_eq!(back.source, Some("10.1.2.3".parse().unwrap()));
        let lower = format!(
            r#"{{"nodepublic":"nodekey:{}","source":"","x":1}}"#,
            "ab".repeat(32)
        );
        let back = AdmitRequest::from_json(lower.as_bytes()).unwrap();
        assert_eq!((back.node_public, back.source), (k, None));
        assert!(AdmitRequest::from_json(br#"{"NodePublic":"abc"}"#).is_err());
        assert!(AdmitRequest::from_json(b"[]").is_err());
    }

    #[test]
    fn response_decoding_follows_gos_decoder() {
        let allow = |b: &[u8]| AdmitResponse::from_json(b).map(|r| r.allow).ok();
        assert_eq!(allow(br#"{"Allow":true}"#), Some(true));
        assert_eq!(allow(br#"{"allow":true} trailing"#), Some(true));
        assert_eq!(allow(br#"{"Allow":false}"#), Some(false));
        assert_eq!(allow(br#"{}"#), Some(false));
        assert_eq!(allow(br#"{"Allow":"yes"}"#), None);
        assert_eq!(allow(b""), None);
        // Beyond 4 KiB the body is cut, so an answer padded past it does not decode.
        let mut big = br#"{"pad":""#.to_vec();
        big.extend(std::iter::repeat_n(b'x', MAX_RESPONSE_BYTES));
        big.extend(br#"","Allow":true}"#);
        assert_eq!(allow(&big), None);
        assert_eq!(
            AdmitResponse { allow: true }.to_json(),
            br#"{"Allow":true}"#
        );
    }
}
