//! When to renew an ACME certificate and when to look again: pure functions of the certificate's
//! validity, the clock and the failure count, so that they are tested without a clock or a CA.
//!
//! Rule (as certbot and Caddy do it): renew once less than a third of the certificate's lifetime
//! remains (30 days of a 90-day certificate; two days of a six-day one). The loop wakes at the
//! renewal time or after `check_interval`, whichever is first, so that a suspended machine or a
//! clock jump is noticed within one interval. After a failed order it retries with a doubling
//! delay (from [`FIRST_RETRY`] up to [`MAX_RETRY`], never later than `check_interval`), so that a
//! CA outage is neither hammered nor waited out for a whole interval.

use std::time::{Duration, SystemTime};

/// The fraction of the lifetime left at which a certificate is renewed.
pub const RENEW_WHEN_LEFT: f64 = 1.0 / 3.0;
/// Delay before the first retry after a failed order.
pub const FIRST_RETRY: Duration = Duration::from_secs(10);
/// Longest delay between retries.
pub const MAX_RETRY: Duration = Duration::from_secs(3600);

/// The validity window of a certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Validity {
    /// notBefore.
    pub not_before: SystemTime,
    /// notAfter.
    pub not_after: SystemTime,
}

impl Validity {
    /// When this certificate is due for renewal: notAfter minus a third of its lifetime (a
    /// certificate whose notAfter is not after notBefore is due at once).
    pub fn renew_at(&self) -> SystemTime {
        match self.not_after.duration_since(self.not_before) {
            Ok(lifetime) if !lifetime.is_zero() => {
                self.not_after - lifetime.mul_f64(RENEW_WHEN_LEFT)
            }
            _ => self.not_before,
        }
    }
}

/// What the renewal loop does next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// Order a certificate now.
    Renew,
    /// Sleep this long, then decide again.
    Wait(Duration),
}

/// Decides the next step at `now` for the certificate in service (`None`: there is none), after
/// `failures` consecutive failed orders (the last one at `last_failure`).
pub fn next(
    current: Option<Validity>,
    now: SystemTime,
    check_interval: Duration,
    failures: u32,
    last_failure: Option<SystemTime>,
) -> Next {
    let check_interval = check_interval.max(Duration::from_millis(1));
    if failures > 0 {
        if let Some(at) = last_failure {
            let retry_at = at + retry_delay(failures).min(check_interval);
            if let Ok(wait) = retry_at.duration_since(now) {
                if !wait.is_zero() {
                    return Next::Wait(wait);
                }
            }
            return Next::Renew;
        }
    }
    let Some(v) = current else {
        return Next::Renew;
    };
    match v.renew_at().duration_since(now) {
        Ok(wait) if !wait.is_zero() => Next::Wait(wait.min(check_interval)),
        _ => Next::Renew,
    }
}

/// The delay after the `failures`-th consecutive failure: 10 s, 20 s, 40 s, ... up to 1 h.
pub fn retry_delay(failures: u32) -> Duration {
    let doublings = failures.saturating_sub(1).min(16);
    FIRST_RETRY.saturating_mul(1 << doublings).min(MAX_RETRY)
}

#[cfg(test)]
mod edge_tests {
    use super::*;

    const DAY: Duration = Duration::from_secs(86_400);
    const HOUR: Duration = Duration::from_secs(3600);

    fn t0() -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000)
    }

    fn cert(days: u64) -> Validity {
        Validity {
            not_before: t0(),
            not_after: t0() + DAY * days as u32,
        }
    }

    #[test]
    fn a_third_of_the_lifetime_before_expiry() {
        assert_eq!(cert(90).renew_at(), t0() + DAY * 60);
        assert_eq!(cert(6).renew_at(), t0() + DAY * 4);
        let broken = Validity {
            not_before: t0(),
            not_after: t0() - DAY,
        };
        assert_eq!(broken.renew_at(), t0());
    }

    #[test]
    fn waits_until_due_but_looks_every_interval() {
        let c = Some(cert(90));
        assert_eq!(next(c, t0(), HOUR, 0, None), Next::Wait(HOUR));
        // One minute before the renewal time: wake then, not an hour later.
        let near = t0() + DAY * 60 - Duration::from_secs(60);
        assert_eq!(
            next(c, near, HOUR, 0, None),
            Next::Wait(Duration::from_secs(60))
        );
        assert_eq!(next(c, t0() + DAY * 60, HOUR, 0, None), Next::Renew);
        assert_eq!(next(c, t0() + DAY * 89, HOUR, 0, None), Next::Renew);
        // Expired long ago (or the clock jumped): renew.
        assert_eq!(next(c, t0() + DAY * 200, HOUR, 0, None), Next::Renew);
        // No certificate at all: order one now.
        assert_eq!(next(None, t0(), HOUR, 0, None), Next::Renew);
    }

    #[test]
    fn failures_back_off_doubling_up_to_the_cap() {
        assert_eq!(retry_delay(1), Duration::from_secs(10));
        assert_eq!(retry_delay(2), Duration::from_secs(20));
        assert_eq!(retry_delay(4), Duration::from_secs(80));
        assert_eq!(retry_delay(12), MAX_RETRY);
        assert_eq!(retry_delay(u32::MAX), MAX_RETRY);
        let due = Some(cert(90));
        let failed = t0() + DAY * 61;
        assert_eq!(
            next(due, failed, 24 * HOUR, 3, Some(failed)),
            Next::Wait(Duration::from_secs(40))
        );
        assert_eq!(
            next(
                due,
                failed + Duration::from_secs(40),
                24 * HOUR,
                3,
                Some(failed)
            ),
            Next::Renew
        );
        // The check interval bounds the retry delay too.
        assert_eq!(
            next(due, failed, Duration::from_secs(5), 9, Some(failed)),
            Next::Wait(Duration::from_secs(5))
        );
        // A failure with no certificate in service retries the same way.
        assert_eq!(
            next(None, failed, HOUR, 1, Some(failed)),
            Next::Wait(Duration::from_secs(10))
        );
    }
}
