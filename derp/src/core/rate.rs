//! The per-client receive rate limit, with derper's `--rate-config` semantics.
//!
//! Why: an operator may cap how fast one client can push bytes into the relay. derper (since
//! April 2026, flag `-rate-config`, a JSON file reloaded on SIGHUP) does it with a token bucket
//! per client consulted after each frame *header* is read: the connection waits for tokens equal
//! to the frame's payload length (clamped to [`MIN_BURST_BYTES`]) before the frame is handled and
//! more is read. Nothing is dropped: the client is slowed by TCP flow control. Mesh peers are
//! exempt. A rate of 0 turns the limit off; a burst below [`MIN_BURST_BYTES`] is raised to it (so
//! one maximum-size frame always fits). A new configuration applies to existing connections too
//! (each gets a fresh, full bucket). ServerInfo does not announce the limit (derper sends only
//! `{"version":2}`; a Go client that saw a token bucket there would drop its own packets).
//!
//! This module owns the configuration ([`RateConfig`], its JSON form and normalization), the
//! server-wide cell connections read it from ([`RateLimits`]: one relaxed atomic load per frame
//! while the generation is unchanged) and the per-connection bucket ([`ReceiveBucket`]). The
//! connection task applies it in `conn::read` without blocking: when a frame must wait, reading
//! pauses and the connection's one timer is armed for the moment the tokens are there.
//!
//! Must never: drop a frame, sleep on the executor, or take a lock on the packet path (the
//! configuration's mutex is taken only when its generation changed).

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::time::Instant;

/// Smallest bucket: one maximum-size SendPacket payload (64 KiB packet + 32-byte key). derper's
/// `minRateLimitTokenBucketSize`; a frame is never charged more than this.
pub const MIN_BURST_BYTES: u64 = proto::derp::MAX_PACKET_SIZE as u64 + 32;

/// derper's rate configuration file (`derpserver.RateConfig`); values in bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct RateConfig {
    /// Per-client receive rate in bytes per second; 0 disables rate limiting.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub per_client_rate_limit_bytes_per_sec: u64,
    /// Per-client bucket size in bytes; raised to at least [`MIN_BURST_BYTES`].
    #[serde(default, skip_serializing_if = "is_zero")]
    pub per_client_rate_burst_bytes: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// Reading or parsing a rate configuration file failed.
#[derive(Debug, thiserror::Error)]
pub enum RateConfigError {
    /// The file could not be read.
    #[error("reading rate config {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not derper's rate configuration JSON.
    #[error("parsing rate config {path}: {source}")]
    Parse {
        /// The file.
        path: String,
        /// Why.
        source: serde_json::Error,
    },
}

impl RateConfig {
    /// Reads derper's JSON form (`{"PerClientRateLimitBytesPerSec":N,"PerClientRateBurstBytes":M}`;
    /// field names are matched case-insensitively, as Go's decoder does, and unknown fields are
    /// ignored).
    pub fn load(path: &Path) -> Result<RateConfig, RateConfigError> {
        let text = std::fs::read(path).map_err(|source| RateConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(&text).map_err(|source| RateConfigError::Parse {
            path: path.display().to_string(),
            source,
        })
    }

    /// Parses derper's JSON form (see [`RateConfig::load`]).
    pub fn parse(json: &[u8]) -> Result<RateConfig, serde_json::Error> {
        let value: serde_json::Value = serde_json::from_slice(json)?;
        let serde_json::Value::Object(fields) = value else {
            return serde_json::from_value::<RateConfig>(value);
        };
        let mut rc = RateConfig::default();
        for (name, v) in fields {
            let slot = if name.eq_ignore_ascii_case("PerClientRateLimitBytesPerSec") {
                &mut rc.per_client_rate_limit_bytes_per_sec
            } else if name.eq_ignore_ascii_case("PerClientRateBurstBytes") {
                &mut rc.per_client_rate_burst_bytes
            } else {
                continue;
            };
            *slot = serde_json::from_value(v)?;
        }
        Ok(rc)
    }

    /// The configuration as it is applied: all zero when the rate is 0, otherwise the burst
    /// raised to at least [`MIN_BURST_BYTES`].
    pub fn applied(self) -> RateConfig {
        if self.per_client_rate_limit_bytes_per_sec == 0 {
            return RateConfig::default();
        }
        RateConfig {
            per_client_rate_limit_bytes_per_sec: self.per_client_rate_limit_bytes_per_sec,
            per_client_rate_burst_bytes: self.per_client_rate_burst_bytes.max(MIN_BURST_BYTES),
        }
    }

    /// Whether a limit is in force.
    pub fn is_enabled(&self) -> bool {
        self.per_client_rate_limit_bytes_per_sec > 0
    }
}

/// The server-wide configuration every connection follows. Generation 0 means "never
/// configured"; each [`RateLimits::set`] bumps it, and connections rebuild their bucket when they
/// see a new one.
#[derive(Debug, Default)]
pub(crate) struct RateLimits {
    generation: AtomicU64,
    config: Mutex<RateConfig>,
}

impl RateLimits {
    /// Installs `rc` (already [applied](RateConfig::applied)) for every connection.
    pub(crate) fn set(&self, rc: RateConfig) {
        *self.config.lock().unwrap_or_else(|e| e.into_inner()) = rc;
        self.generation.fetch_add(1, Ordering::Release);
    }

    /// The configuration in force.
    pub(crate) fn current(&self) -> RateConfig {
        *self.config.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The current generation (one relaxed load: the per-frame check).
    #[inline]
    pub(crate) fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }
}

/// One connection's token bucket (golang.org/x/time/rate's reservation semantics: a frame takes
/// its tokens at once, possibly going below zero, and the connection waits until the balance is
/// back at zero).
#[derive(Debug)]
pub(crate) struct ReceiveBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl ReceiveBucket {
    /// A full bucket for an enabled configuration; `None` when the limit is off.
    pub(crate) fn new(rc: RateConfig, now: Instant) -> Option<ReceiveBucket> {
        let rc = rc.applied();
        if !rc.is_enabled() {
            return None;
        }
        let burst = rc.per_client_rate_burst_bytes as f64;
        Some(ReceiveBucket {
            rate: rc.per_client_rate_limit_bytes_per_sec as f64,
            burst,
            tokens: burst,
            last: now,
        })
    }

    /// Takes the tokens for a frame with a `len`-byte payload (clamped to [`MIN_BURST_BYTES`]).
    /// `None`: go ahead; `Some(t)`: handle the frame no earlier than `t`.
    pub(crate) fn reserve(&mut self, len: usize, now: Instant) -> Option<Instant> {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        let n = (len as u64).min(MIN_BURST_BYTES) as f64;
        self.tokens -= n;
        if self.tokens >= 0.0 {
            return None;
        }
        Some(now + Duration::from_secs_f64(-self.tokens / self.rate))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_derpers_json_and_applies_its_minimum_burst() {
        let rc = RateConfig::parse(
            br#"{"PerClientRateLimitBytesPerSec":1000,"perclientrateburstbytes":10,"Other":1}"#,
        )
        .unwrap();
        assert_eq!(rc.per_client_rate_limit_bytes_per_sec, 1000);
        assert_eq!(rc.per_client_rate_burst_bytes, 10);
        assert_eq!(rc.applied().per_client_rate_burst_bytes, MIN_BURST_BYTES);
        assert_eq!(MIN_BURST_BYTES, 65_568);
        // Rate 0 disables everything, whatever the burst says.
        let off = RateConfig::parse(br#"{"PerClientRateBurstBytes":100000}"#).unwrap();
        assert_eq!(off.applied(), RateConfig::default());
        assert!(RateConfig::parse(b"{\"PerClientRateLimitBytesPerSec\":-1}").is_err());
        // Written back the way derper writes it (zero fields omitted).
        let json = serde_json::to_string(&RateConfig {
            per_client_rate_limit_bytes_per_sec: 5,
            per_client_rate_burst_bytes: 0,
        })
        .unwrap();
        assert_eq!(json, r#"{"PerClientRateLimitBytesPerSec":5}"#);
    }

    #[test]
    fn bucket_waits_for_the_deficit_and_clamps_large_frames() {
        let t0 = Instant::now();
        let rc = RateConfig {
            per_client_rate_limit_bytes_per_sec: 100_000,
            per_client_rate_burst_bytes: 100_000,
        };
        let mut b = ReceiveBucket::new(rc, t0).unwrap();
        assert_eq!(b.reserve(60_000, t0), None);
        assert_eq!(b.reserve(40_000, t0), None);
        // Empty: 50 000 bytes more need half a second.
        let until = b.reserve(50_000, t0).unwrap();
        assert_eq!(until - t0, Duration::from_millis(500));
        // A 1 MiB frame is charged as 65 568 bytes.
        let later = t0 + Duration::from_millis(500);
        let until = b.reserve(1 << 20, later).unwrap();
        assert_eq!(until - later, Duration::from_secs_f64(65_568.0 / 100_000.0));
        assert!(ReceiveBucket::new(RateConfig::default(), t0).is_none());
    }
}
