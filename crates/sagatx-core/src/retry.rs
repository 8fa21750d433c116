//! Retry policy arithmetic: exponential, capped backoff with bounded jitter.
//!
//! The policy is plain data so that it can be journaled with the definition;
//! the random draw for the jitter comes in as an argument, never from inside.

use serde::{Deserialize, Serialize};

/// Jitter is at most this fraction of the computed backoff, either way.
pub const JITTER_FRACTION: f64 = 0.2;

/// Compensations and confirms get at least this many attempts (API.md §1).
pub const UNDO_MIN_ATTEMPTS: u32 = 10;

/// Upper bound on `max_attempts`, so that a typo cannot retry forever.
pub const MAX_ATTEMPTS_LIMIT: u32 = 1000;

/// Upper bound on any backoff, one day.
pub const BACKOFF_MS_LIMIT: u64 = 86_400_000;

/// A resolved retry policy: every field known.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct RetryPolicy {
    /// Attempts in all, the first one included; at least 1.
    pub max_attempts: u32,
    /// Backoff before the second attempt.
    pub initial_backoff_ms: u64,
    /// Backoff never exceeds this (before jitter).
    pub max_backoff_ms: u64,
    /// Growth factor between consecutive backoffs; at least 1.0.
    pub multiplier: f64,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 3,
            initial_backoff_ms: 100,
            max_backoff_ms: 30_000,
            multiplier: 2.0,
        }
    }
}

/// A partial policy as written in a definition: each field overrides the
/// level above it (step over saga over defaults).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetryOverride {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_attempts: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initial_backoff_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_backoff_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub multiplier: Option<f64>,
}

impl RetryOverride {
    pub fn is_empty(&self) -> bool {
        *self == RetryOverride::default()
    }

    /// Applies this override on top of `base`.
    pub fn apply(&self, base: RetryPolicy) -> RetryPolicy {
        RetryPolicy {
            max_attempts: self.max_attempts.unwrap_or(base.max_attempts),
            initial_backoff_ms: self.initial_backoff_ms.unwrap_or(base.initial_backoff_ms),
            max_backoff_ms: self.max_backoff_ms.unwrap_or(base.max_backoff_ms),
            multiplier: self.multiplier.unwrap_or(base.multiplier),
        }
    }
}

impl RetryPolicy {
    /// The policy used for compensations and confirms: the same, with at
    /// least [`UNDO_MIN_ATTEMPTS`] attempts.
    pub fn for_undo(self) -> RetryPolicy {
        RetryPolicy {
            max_attempts: self.max_attempts.max(UNDO_MIN_ATTEMPTS),
            ..self
        }
    }

    /// Checks the bounds; the error names the offending field (relative).
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        if self.max_attempts == 0 || self.max_attempts > MAX_ATTEMPTS_LIMIT {
            return Err((
                "max_attempts",
                format!("must be between 1 and {MAX_ATTEMPTS_LIMIT}"),
            ));
        }
        if self.initial_backoff_ms > BACKOFF_MS_LIMIT {
            return Err((
                "initial_backoff_ms",
                format!("must be at most {BACKOFF_MS_LIMIT} (one day)"),
            ));
        }
        if self.max_backoff_ms > BACKOFF_MS_LIMIT {
            return Err((
                "max_backoff_ms",
                format!("must be at most {BACKOFF_MS_LIMIT} (one day)"),
            ));
        }
        if self.max_backoff_ms < self.initial_backoff_ms {
            return Err((
                "max_backoff_ms",
                "must be at least initial_backoff_ms".to_string(),
            ));
        }
        if !self.multiplier.is_finite() || !(1.0..=100.0).contains(&self.multiplier) {
            return Err((
                "multiplier",
                "must be a number from 1.0 to 100.0".to_string(),
            ));
        }
        Ok(())
    }

    /// The backoff before attempt `failed_attempts + 1`, before jitter:
    /// `min(max_backoff_ms, initial_backoff_ms * multiplier^(failed_attempts-1))`.
    pub fn base_backoff_ms(&self, failed_attempts: u32) -> u64 {
        let n = failed_attempts.max(1) - 1;
        let raw = self.initial_backoff_ms as f64 * self.multiplier.powi(n.min(1024) as i32);
        let capped = raw.min(self.max_backoff_ms as f64);
        if capped.is_finite() {
            capped as u64
        } else {
            self.max_backoff_ms
        }
    }

    /// The backoff with jitter. `random01` is a uniform draw from `[0, 1)`,
    /// supplied by the caller; the result is within ±20 % of the base.
    pub fn backoff_ms(&self, failed_attempts: u32, random01: f64) -> u64 {
        let base = self.base_backoff_ms(failed_attempts) as f64;
        let r = if random01.is_finite() {
            random01.clamp(0.0, 1.0)
        } else {
            0.5
        };
        let factor = 1.0 + JITTER_FRACTION * (2.0 * r - 1.0);
        (base * factor).round().max(0.0) as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_exponentially_and_is_capped() {
        let p = RetryPolicy::default();
        assert_eq!(p.base_backoff_ms(1), 100);
        assert_eq!(p.base_backoff_ms(2), 200);
        assert_eq!(p.base_backoff_ms(3), 400);
        assert_eq!(p.base_backoff_ms(20), 30_000);
        assert_eq!(p.base_backoff_ms(u32::MAX), 30_000);
    }

    #[test]
    fn jitter_stays_within_twenty_percent() {
        let p = RetryPolicy::default();
        assert_eq!(p.backoff_ms(1, 0.0), 80);
        assert_eq!(p.backoff_ms(1, 0.5), 100);
        assert_eq!(p.backoff_ms(1, 0.999_999), 120);
        assert_eq!(p.backoff_ms(1, f64::NAN), 100);
    }

    #[test]
    fn override_applies_field_by_field() {
        let saga = RetryOverride {
            max_attempts: Some(5),
            multiplier: Some(3.0),
            ..Default::default()
        };
        let step = RetryOverride {
            max_attempts: Some(7),
            ..Default::default()
        };
        let p = step.apply(saga.apply(RetryPolicy::default()));
        assert_eq!(p.max_attempts, 7);
        assert_eq!(p.multiplier, 3.0);
        assert_eq!(p.initial_backoff_ms, 100);
        assert_eq!(p.for_undo().max_attempts, 10);
        let many = RetryPolicy {
            max_attempts: 12,
            ..p
        };
        assert_eq!(many.for_undo().max_attempts, 12);
    }

    #[test]
    fn validation_names_the_field() {
        let bad = RetryPolicy {
            max_attempts: 0,
            ..Default::default()
        };
        assert_eq!(bad.validate().map_err(|e| e.0), Err("max_attempts"));
        let bad = RetryPolicy {
            multiplier: 0.5,
            ..Default::default()
        };
        assert_eq!(bad.validate().map_err(|e| e.0), Err("multiplier"));
        let bad = RetryPolicy {
            initial_backoff_ms: 10,
            max_backoff_ms: 5,
            ..Default::default()
        };
        assert_eq!(bad.validate().map_err(|e| e.0), Err("max_backoff_ms"));
    }

    proptest::proptest! {
        #[test]
        fn backoff_is_bounded(
            attempts in 1u32..2000,
            init in 0u64..100_000,
            extra in 0u64..1_000_000,
            mult in 1.0f64..100.0,
            r in 0.0f64..1.0,
        ) {
            let p = RetryPolicy { max_attempts: 3, initial_backoff_ms: init, max_backoff_ms: init + extra, multiplier: mult };
            let base = p.base_backoff_ms(attempts);
            proptest::prop_assert!(base <= p.max_backoff_ms);
            proptest::prop_assert!(base >= p.initial_backoff_ms.min(p.max_backoff_ms));
            let b = p.backoff_ms(attempts, r) as f64;
            proptest::prop_assert!(b <= base as f64 * 1.2 + 1.0);
            proptest::prop_assert!(b >= base as f64 * 0.8 - 1.0);
        }
    }
}
