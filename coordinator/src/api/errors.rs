//! Coder's pre-upgrade error bodies (`codersdk.Response`) and the `version` query rules.
//!
//! Why: Go clients decide whether to retry, drop a resume token or give up from the status code
//! and these JSON fields, so they must match coderd. Nothing here does I/O.

use axum::response::{IntoResponse, Response};
use http::StatusCode;
use serde::Serialize;

use crate::config::{CURRENT_MAJOR, CURRENT_MINOR};

/// Coder's message for a bad `version` (`workspacesdk.AgentAPIMismatchMessage`).
pub const VERSION_MISMATCH_MESSAGE: &str = "Unknown or unsupported API version";
/// Coder's message for a bad resume token (`workspacesdk.CoordinateAPIInvalidResumeToken`).
pub const INVALID_RESUME_TOKEN_MESSAGE: &str = "Invalid resume token";

/// One entry of `validations`.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Validation {
    /// The offending field (query parameter name).
    pub field: String,
    /// What is wrong with it.
    pub detail: String,
}

/// `codersdk.Response` with its status code.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct ApiError {
    /// HTTP status (not serialized).
    #[serde(skip)]
    pub status: StatusCode,
    /// Top-level message.
    pub message: String,
    /// Optional detail.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// Optional per-field errors.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub validations: Vec<Validation>,
}

impl ApiError {
    /// A body with just a message.
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            detail: None,
            validations: Vec::new(),
        }
    }

    /// Set `detail`.
    pub fn detail(mut self, detail: impl Into<String>) -> Self {
        self.detail = Some(detail.into());
        self
    }

    /// Add a validation entry.
    pub fn validation(mut self, field: impl Into<String>, detail: impl Into<String>) -> Self {
        self.validations.push(Validation {
            field: field.into(),
            detail: detail.into(),
        });
        self
    }

    /// The 400 Coder sends for a bad `version`.
    pub fn version(err: VersionError) -> Self {
        Self::new(StatusCode::BAD_REQUEST, VERSION_MISMATCH_MESSAGE)
            .validation("version", err.to_string())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status;
        (status, axum::Json(self)).into_response()
    }
}

/// A parsed `MAJOR.MINOR` API version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ApiVersion {
    /// Major version (1 = JSON, 2 = dRPC).
    pub major: i64,
    /// Minor version (informational: RPCs are not gated by it).
    pub minor: i64,
}

/// Why a `version` was refused; `Display` is Coder's `apiversion` error text.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum VersionError {
    /// Not `MAJOR.MINOR`.
    #[error("invalid version string: {0}")]
    Invalid(String),
    /// Major part not an integer.
    #[error("invalid major version: {0}")]
    Major(String),
    /// Minor part not an integer.
    #[error("invalid minor version: {0}")]
    Minor(String),
    /// Major too new.
    #[error(
        "server is at version {CURRENT_MAJOR}.{CURRENT_MINOR}, behind requested major version {0}"
    )]
    MajorTooNew(String),
    /// Minor too new.
    #[error(
        "server is at version {CURRENT_MAJOR}.{CURRENT_MINOR}, behind requested minor version {0}"
    )]
    MinorTooNew(String),
    /// An old major this endpoint does not serve.
    #[error("version {0} is no longer supported")]
    Unsupported(String),
}

/// Go's `strconv.Atoi`: optional sign, ASCII digits, fits in i64.
fn atoi(s: &str) -> Option<i64> {
    let digits = s.strip_prefix(['+', '-']).unwrap_or(s);
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

/// Coder's `apiversion.Parse` + `Validate` against 2.[`CURRENT_MINOR`], with major 1 accepted
/// only when `allow_v1` (the endpoints that still serve the JSON protocol).
pub fn parse_version(v: &str, allow_v1: bool) -> Result<ApiVersion, VersionError> {
    let parts: Vec<&str> = v.split('.').collect();
    if parts.len() != 2 {
        return Err(VersionError::Invalid(v.to_string()));
    }
    let major = atoi(parts[0]).ok_or_else(|| VersionError::Major(v.to_string()))?;
    let minor = atoi(parts[1]).ok_or_else(|| VersionError::Minor(v.to_string()))?;
    let cur_major = CURRENT_MAJOR as i64;
    if major > cur_major {
        return Err(VersionError::MajorTooNew(v.to_string()));
    }
    if major == cur_major {
        if minor > CURRENT_MINOR as i64 {
            return Err(VersionError::MinorTooNew(v.to_string()));
        }
        return Ok(ApiVersion { major, minor });
    }
    if major == 1 && allow_v1 {
        return Ok(ApiVersion { major, minor });
    }
    Err(VersionError::Unsupported(v.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions() {
        assert_eq!(
            parse_version("2.0", false),
            Ok(ApiVersion { major: 2, minor: 0 })
        );
        assert!(parse_version("2.10", false).is_ok());
        assert_eq!(
            parse_version("2.11", false).unwrap_err().to_string(),
            "server is at version 2.10, behind requested minor version 2.11"
        );
        assert_eq!(
            parse_version("3.0", true).unwrap_err().to_string(),
            "server is at version 2.10, behind requested major version 3.0"
        );
        assert_eq!(
            parse_version("1.0", false).unwrap_err().to_string(),
            "version 1.0 is no longer supported"
        );
        assert!(parse_version("1.0", true).is_ok());
        assert!(parse_version("1.3", true).is_ok());
        assert_eq!(
            parse_version("2", true).unwrap_err().to_string(),
            "invalid version string: 2"
        );
        assert_eq!(
            parse_version("x.1", true).unwrap_err().to_string(),
            "invalid major version: x.1"
        );
        assert_eq!(
            parse_version("2.y", true).unwrap_err().to_string(),
            "invalid minor version: 2.y"
        );
        assert!(parse_version("2.1.1", true).is_err());
        assert!(parse_version("", true).is_err());
        assert!(parse_version("0.5", true).is_err());
    }

    #[test]
    fn error_body() {
        let e = ApiError::version(VersionError::Invalid("x".into()));
        let v = serde_json::to_value(&e).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"message":"Unknown or unsupported API version",
                "validations":[{"field":"version","detail":"invalid version string: x"}]})
        );
        let e = ApiError::new(StatusCode::NOT_FOUND, "m").detail("d");
        assert_eq!(
            serde_json::to_value(&e).unwrap(),
            serde_json::json!({"message":"m","detail":"d"})
        );
    }
}
