//! When to try a failed delivery again. A pure function so the daemon (which owns the clock
//! and the random source) stays deterministic under test.

use std::time::Duration;

use crate::config::RetryConfig;

/// The wait before the next attempt, after `attempts` attempts have failed; `None` when
/// `retry.max_attempts` is used up and the row goes to the dead letters.
///
/// Exponential backoff with full jitter: the ceiling is `base · 2^(attempts-1)`, capped at
/// `max`, and the wait is `random_fraction` of it (`random_fraction` in `[0, 1)`; values
/// outside are clamped). Full jitter spreads a burst of failures (a provider outage) over
/// the whole window instead of retrying them all at once. `attempts == 0` (nothing tried
/// yet) gives `Some(0)`.
pub fn next_attempt(attempts: u32, retry: &RetryConfig, random_fraction: f64) -> Option<Duration> {
    if attempts == 0 {
        return Some(Duration::ZERO);
    }
    if attempts >= retry.max_attempts {
        return None;
    }
    Some(ceiling(attempts, retry).mul_f64(clamp_fraction(random_fraction)))
}

/// The backoff ceiling after `attempts` failures (≥ 1): `min(max, base · 2^(attempts-1))`,
/// without overflow for any count.
pub fn ceiling(attempts: u32, retry: &RetryConfig) -> Duration {
    let doublings = attempts.saturating_sub(1);
    let factor = 2u32.checked_pow(doublings);
    factor
        .and_then(|f| retry.base.checked_mul(f))
        .map_or(retry.max, |d| d.min(retry.max))
}

fn clamp_fraction(f: f64) -> f64 {
    if f.is_nan() { 0.0 } else { f.clamp(0.0, 1.0) }
}
