//! Resume tokens: HS512-signed JWS compact tokens whose `sub` is a client's peer id.
//!
//! Why: a Coder client that redials with `resume_token=<jwt>` keeps its peer id, so its tunnel
//! peers see the same identity instead of a LOST peer and a new one (tailnet/resume.go). The token
//! format is Coder's (`alg` HS512, header `kid`, claims `sub`/`exp`/`iat`), so every replica that
//! shares the configured key, and a coderd that shares the same `crypto_keys` secret, can verify
//! it. Hand-rolled on `hmac` + `sha2` + `base64` because the format is tiny and fixed.
//!
//! This module must never accept a token whose signature, key id or expiry does not check out,
//! and never log token contents.

use std::collections::HashMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use rand::RngCore;
use serde::{Deserialize, Serialize};
use sha2::Sha512;
use uuid::Uuid;

type HmacSha512 = Hmac<Sha512>;

/// Coder's default resume token lifetime (`DefaultResumeTokenExpiry`).
pub const DEFAULT_EXPIRY: Duration = Duration::from_secs(24 * 60 * 60);

/// Tokens longer than this are rejected before any decoding (a real token is ~300 bytes).
const MAX_TOKEN_LEN: usize = 4096;

/// One HMAC key with its JWS key id.
#[derive(Clone)]
pub struct ResumeKey {
    /// The `kid` header value (Coder uses the `crypto_keys` sequence number as text).
    pub id: String,
    /// The HMAC secret (Coder: 64 random bytes).
    pub secret: Vec<u8>,
}

impl std::fmt::Debug for ResumeKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResumeKey")
            .field("id", &self.id)
            .field("secret", &"<redacted>")
            .finish()
    }
}

impl ResumeKey {
    /// A random 64-byte key with the given id (dev mode: tokens only verify in this process).
    pub fn random(id: impl Into<String>) -> Self {
        let mut secret = vec![0u8; 64];
        rand::thread_rng().fill_bytes(&mut secret);
        Self {
            id: id.into(),
            secret,
        }
    }
}

/// Why a resume token was rejected (the text goes into the 401 body's `detail`).
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum ResumeError {
    /// The header carries no `kid`: an old-format token. Callers treat this as "no token".
    #[error("missing key ID")]
    MissingKeyId,
    /// Not three base64url parts, or the JSON inside is wrong.
    #[error("malformed token: {0}")]
    Malformed(&'static str),
    /// `alg` is not HS512.
    #[error("unexpected signing algorithm {0:?}")]
    Algorithm(String),
    /// `kid` names no key we have.
    #[error("unknown key ID {0:?}")]
    UnknownKey(String),
    /// The HMAC does not match.
    #[error("invalid signature")]
    Signature,
    /// `exp` is in the past (or absent).
    #[error("token expired")]
    Expired,
    /// `sub` is not a UUID.
    #[error("subject is not a UUID")]
    Subject,
    /// The system clock is before 1970.
    #[error("clock error")]
    Clock,
}

/// What `RefreshResumeToken` returns, before conversion to protobuf.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IssuedToken {
    /// The compact JWS.
    pub token: String,
    /// When the client should refresh (half the lifetime, as Coder).
    pub refresh_in: Duration,
    /// When the token stops verifying.
    pub expires_at: SystemTime,
}

impl IssuedToken {
    /// The protobuf response Coder clients expect.
    pub fn to_proto(&self) -> proto::tailnet::v2::RefreshResumeTokenResponse {
        let since = self
            .expires_at
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        proto::tailnet::v2::RefreshResumeTokenResponse {
            token: self.token.clone(),
            refresh_in: Some(prost_types::Duration {
                seconds: self.refresh_in.as_secs() as i64,
                nanos: self.refresh_in.subsec_nanos() as i32,
            }),
            expires_at: Some(prost_types::Timestamp {
                seconds: since.as_secs() as i64,
                nanos: since.subsec_nanos() as i32,
            }),
        }
    }
}

#[derive(Serialize, Deserialize)]
struct Header {
    alg: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    kid: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    typ: Option<String>,
}

/// Claims as issued: whole seconds, as Go's `jwt.NumericDate` marshals them.
#[derive(Serialize)]
struct IssueClaims {
    exp: u64,
    iat: u64,
    sub: String,
}

/// Claims as accepted: go-jose also accepts fractional seconds.
#[derive(Deserialize)]
struct Claims {
    #[serde(default)]
    sub: Option<String>,
    #[serde(default)]
    exp: Option<f64>,
    #[serde(default)]
    nbf: Option<f64>,
}

/// Issues and verifies resume tokens. Immutable; share it behind an `Arc`.
#[derive(Debug, Clone)]
pub struct ResumeTokenProvider {
    signing: ResumeKey,
    verify: HashMap<String, Vec<u8>>,
    expiry: Duration,
}

impl ResumeTokenProvider {
    /// Sign with `signing`; verify with it and with `extra_verify` keys (rotation).
    pub fn new(signing: ResumeKey, extra_verify: Vec<ResumeKey>, expiry: Duration) -> Self {
        let mut verify: HashMap<String, Vec<u8>> =
            extra_verify.into_iter().map(|k| (k.id, k.secret)).collect();
        verify.insert(signing.id.clone(), signing.secret.clone());
        Self {
            signing,
            verify,
            expiry,
        }
    }

    /// Issue a token for `peer_id`, valid for the configured lifetime from now.
    pub fn issue(&self, peer_id: Uuid) -> Result<IssuedToken, ResumeError> {
        self.issue_at(peer_id, SystemTime::now())
    }

    fn issue_at(&self, peer_id: Uuid, now: SystemTime) -> Result<IssuedToken, ResumeError> {
        let now_s = now
            .duration_since(UNIX_EPOCH)
            .map_err(|_| ResumeError::Clock)?
            .as_secs();
        let expires_at = UNIX_EPOCH + Duration::from_secs(now_s) + self.expiry;
        let header = Header {
            alg: "HS512".into(),
            kid: Some(self.signing.id.clone()),
            typ: Some("JWT".into()),
        };
        let h = serde_json::to_vec(&header).map_err(|_| ResumeError::Malformed("header"))?;
        let c = serde_json::to_vec(&IssueClaims {
            exp: now_s + self.expiry.as_secs(),
            iat: now_s,
            sub: peer_id.to_string(),
        })
        .map_err(|_| ResumeError::Malformed("claims"))?;
        let signing_input = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(h),
            URL_SAFE_NO_PAD.encode(c)
        );
        let sig = sign(&self.signing.secret, signing_input.as_bytes())?;
        Ok(IssuedToken {
            token: format!("{signing_input}.{}", URL_SAFE_NO_PAD.encode(sig)),
            refresh_in: self.expiry / 2,
            expires_at,
        })
    }

    /// Verify `token` and return the peer id it carries. [`ResumeError::MissingKeyId`] means an
    /// old token: callers use a fresh peer id instead of failing.
    pub fn verify(&self, token: &str) -> Result<Uuid, ResumeError> {
        self.verify_at(token, SystemTime::now())
    }

    fn verify_at(&self, token: &str, now: SystemTime) -> Result<Uuid, ResumeError> {
        if token.len() > MAX_TOKEN_LEN {
            return Err(ResumeError::Malformed("too long"));
        }
        let mut parts = token.split('.');
        let (Some(h64), Some(c64), Some(s64), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(ResumeError::Malformed("not a compact JWS"));
        };
        let h = URL_SAFE_NO_PAD
            .decode(h64)
            .map_err(|_| ResumeError::Malformed("header encoding"))?;
        let header: Header =
            serde_json::from_slice(&h).map_err(|_| ResumeError::Malformed("header json"))?;
        let kid = match header.kid {
            Some(k) if !k.is_empty() => k,
            _ => return Err(ResumeError::MissingKeyId),
        };
        if header.alg != "HS512" {
            return Err(ResumeError::Algorithm(header.alg));
        }
        let key = self
            .verify
            .get(&kid)
            .ok_or_else(|| ResumeError::UnknownKey(kid.clone()))?;
        let sig = URL_SAFE_NO_PAD
            .decode(s64)
            .map_err(|_| ResumeError::Malformed("signature encoding"))?;
        let mut mac = HmacSha512::new_from_slice(key).map_err(|_| ResumeError::Signature)?;
        mac.update(h64.as_bytes());
        mac.update(b".");
        mac.update(c64.as_bytes());
        mac.verify_slice(&sig).map_err(|_| ResumeError::Signature)?;
        let c = URL_SAFE_NO_PAD
            .decode(c64)
            .map_err(|_| ResumeError::Malformed("claims encoding"))?;
        let claims: Claims =
            serde_json::from_slice(&c).map_err(|_| ResumeError::Malformed("claims json"))?;
        let now_s = now
            .duration_since(UNIX_EPOCH)
            .map_err(|_| ResumeError::Clock)?
            .as_secs_f64();
        match claims.exp {
            Some(exp) if exp > now_s => {}
            _ => return Err(ResumeError::Expired),
        }
        // go-jose allows one minute of clock skew on nbf.
        if let Some(nbf) = claims.nbf {
            if nbf > now_s + 60.0 {
                return Err(ResumeError::Expired);
            }
        }
        claims
            .sub
            .as_deref()
            .and_then(|s| Uuid::parse_str(s).ok())
            .ok_or(ResumeError::Subject)
    }
}

fn sign(secret: &[u8], input: &[u8]) -> Result<Vec<u8>, ResumeError> {
    let mut mac = HmacSha512::new_from_slice(secret).map_err(|_| ResumeError::Signature)?;
    mac.update(input);
    Ok(mac.finalize().into_bytes().to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn provider() -> ResumeTokenProvider {
        ResumeTokenProvider::new(ResumeKey::random("1"), vec![], DEFAULT_EXPIRY)
    }

    #[test]
    fn roundtrip_and_shape() {
        let p = provider();
        let id = Uuid::new_v4();
        let t = p.issue(id).unwrap();
        assert_eq!(t.refresh_in, Duration::from_secs(12 * 3600));
        assert_eq!(p.verify(&t.token).unwrap(), id);
        let header = URL_SAFE_NO_PAD
            .decode(t.token.split('.').next().unwrap())
            .unwrap();
        assert_eq!(header, br#"{"alg":"HS512","kid":"1","typ":"JWT"}"#);
        let claims: serde_json::Value = serde_json::from_slice(
            &URL_SAFE_NO_PAD
                .decode(t.token.split('.').nth(1).unwrap())
                .unwrap(),
        )
        .unwrap();
        assert_eq!(claims["sub"], id.to_string());
        assert!(claims["exp"].is_u64());
        let pb = t.to_proto();
        assert_eq!(pb.refresh_in.unwrap().seconds, 12 * 3600);
    }

    #[test]
    fn shared_key_verifies_across_replicas() {
        let key = ResumeKey::random("7");
        let a = ResumeTokenProvider::new(key.clone(), vec![], DEFAULT_EXPIRY);
        let b = ResumeTokenProvider::new(ResumeKey::random("8"), vec![key], DEFAULT_EXPIRY);
        let id = Uuid::new_v4();
        assert_eq!(b.verify(&a.issue(id).unwrap().token).unwrap(), id);
        assert_eq!(
            a.verify(&b.issue(id).unwrap().token),
            Err(ResumeError::UnknownKey("8".into()))
        );
    }

    #[test]
    fn rejects_bad_tokens() {
        let p = provider();
        let id = Uuid::new_v4();
        let t = p.issue(id).unwrap().token;
        let mut tampered: Vec<char> = t.chars().collect();
        let i = tampered.len() - 10;
        tampered[i] = if tampered[i] == 'A' { 'B' } else { 'A' };
        let tampered: String = tampered.into_iter().collect();
        assert_eq!(p.verify(&tampered), Err(ResumeError::Signature));
        assert!(matches!(p.verify("abc"), Err(ResumeError::Malformed(_))));
        assert!(matches!(p.verify("a.b.c"), Err(ResumeError::Malformed(_))));
        let other = provider();
        assert_eq!(other.verify(&t), Err(ResumeError::Signature));
        // Expired.
        let old = p
            .issue_at(id, SystemTime::now() - Duration::from_secs(25 * 3600))
            .unwrap();
        assert_eq!(p.verify(&old.token), Err(ResumeError::Expired));
        // No kid: treated as absent by callers.
        let h = URL_SAFE_NO_PAD.encode(br#"{"alg":"HS512","typ":"JWT"}"#);
        let c = URL_SAFE_NO_PAD.encode(br#"{"sub":"x","exp":99999999999}"#);
        let input = format!("{h}.{c}");
        let s = URL_SAFE_NO_PAD.encode(sign(&p.signing.secret, input.as_bytes()).unwrap());
        assert_eq!(
            p.verify(&format!("{input}.{s}")),
            Err(ResumeError::MissingKeyId)
        );
        // Good signature, bad subject.
        let h = URL_SAFE_NO_PAD.encode(br#"{"alg":"HS512","kid":"1"}"#);
        let c = URL_SAFE_NO_PAD.encode(br#"{"sub":"not-a-uuid","exp":99999999999}"#);
        let input = format!("{h}.{c}");
        let s = URL_SAFE_NO_PAD.encode(sign(&p.signing.secret, input.as_bytes()).unwrap());
        assert_eq!(p.verify(&format!("{input}.{s}")), Err(ResumeError::Subject));
        // Wrong algorithm.
        let h = URL_SAFE_NO_PAD.encode(br#"{"alg":"none","kid":"1"}"#);
        assert!(matches!(
            p.verify(&format!("{h}.{c}.")),
            Err(ResumeError::Algorithm(_))
        ));
    }
}
