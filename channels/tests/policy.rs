//! Retry backoff and the per-channel limiter.

use std::time::{Duration, Instant};

use canvas_channels::{Limiter, RetryConfig, ceiling, next_attempt};

fn cfg(max_attempts: u32, base_ms: u64, max_ms: u64) -> RetryConfig {
    RetryConfig {
        max_attempts,
        base: Duration::from_millis(base_ms),
        max: Duration::from_millis(max_ms),
    }
}

#[test]
fn backoff_doubles_up_to_max_then_gives_up() {
    let retry = RetryConfig::default(); // 5 attempts, 1s base, 10m max
    let expected_ceilings = [1, 2, 4, 8].map(Duration::from_secs);
    for (i, expected) in expected_ceilings.iter().enumerate() {
        let attempts = i as u32 + 1;
        assert_eq!(ceiling(attempts, &retry), *expected);
        assert_eq!(next_attempt(attempts, &retry, 1.0), Some(*expected));
        assert_eq!(next_attempt(attempts, &retry, 0.0), Some(Duration::ZERO));
        assert_eq!(next_attempt(attempts, &retry, 0.5), Some(*expected / 2));
    }
    // After the fifth failed attempt: dead letter.
    assert_eq!(next_attempt(5, &retry, 0.5), None);
    assert_eq!(next_attempt(6, &retry, 0.5), None);
    // Nothing tried yet: go now.
    assert_eq!(next_attempt(0, &retry, 0.9), Some(Duration::ZERO));
}

#[test]
fn backoff_is_capped_and_never_overflows() {
    let retry = cfg(u32::MAX, 1_000, 600_000);
    assert_eq!(ceiling(10, &retry), Duration::from_millis(512_000));
    assert_eq!(
        ceiling(11, &retry),
        Duration::from_secs(600),
        "1024s is capped at 10m"
    );
    for attempts in [12, 31, 32, 33, 64, 1_000, u32::MAX - 1] {
        assert_eq!(
            ceiling(attempts, &retry),
            Duration::from_secs(600),
            "{attempts}"
        );
        assert_eq!(
            next_attempt(attempts, &retry, 1.0),
            Some(Duration::from_secs(600))
        );
    }
    let huge = RetryConfig {
        max_attempts: 100,
        base: Duration::from_secs(u64::MAX / 4),
        max: Duration::MAX,
    };
    assert_eq!(ceiling(40, &huge), Duration::MAX);
}

#[test]
fn jitter_stays_within_the_window() {
    let retry = cfg(20, 250, 30_000);
    // A fixed pseudo-random sequence: the bounds hold for any fraction in [0, 1].
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    for attempts in 1..20 {
        let cap = ceiling(attempts, &retry);
        assert!(cap <= retry.max);
        for _ in 0..200 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let f = (x >> 11) as f64 / (1u64 << 53) as f64;
            let wait = next_attempt(attempts, &retry, f).unwrap();
            assert!(wait <= cap, "{attempts}: {wait:?} > {cap:?}");
        }
    }
    // Out-of-range fractions are clamped, NaN counts as 0.
    assert_eq!(
        next_attempt(1, &retry, 7.0),
        Some(Duration::from_millis(250))
    );
    assert_eq!(next_attempt(1, &retry, -1.0), Some(Duration::ZERO));
    assert_eq!(next_attempt(1, &retry, f64::NAN), Some(Duration::ZERO));
    assert_eq!(
        next_attempt(1, &cfg(1, 250, 1_000), 0.5),
        None,
        "1 attempt = never retry"
    );
}

#[tokio::test]
async fn concurrency_bounds_permits_in_flight() {
    let limiter = Limiter::new(2, None);
    let a = limiter.acquire().await.unwrap();
    let _b = limiter.acquire().await.unwrap();
    assert_eq!(limiter.available(), 0);
    let third = tokio::time::timeout(Duration::from_millis(50), limiter.acquire()).await;
    assert!(third.is_err(), "a third permit must wait");
    drop(a);
    let third = tokio::time::timeout(Duration::from_millis(500), limiter.acquire()).await;
    assert!(third.is_ok(), "a freed slot is handed on");

    limiter.close();
    assert!(limiter.acquire().await.is_err());
}

#[tokio::test]
async fn rate_limit_allows_a_burst_then_holds_the_rate() {
    // 20/s: a burst of 20 at once, then one every 50 ms.
    let limiter = Limiter::new(100, Some(20.0));
    let started = Instant::now();
    let mut permits = Vec::new();
    for _ in 0..20 {
        permits.push(limiter.acquire().await.unwrap());
    }
    let burst = started.elapsed();
    assert!(burst < Duration::from_millis(200), "burst took {burst:?}");
    for _ in 0..10 {
        permits.push(limiter.acquire().await.unwrap());
    }
    let total = started.elapsed();
    assert!(
        total >= Duration::from_millis(450),
        "30 permits at 20/s took only {total:?}"
    );
    assert!(total < Duration::from_secs(3), "took {total:?}");

    // A low rate: 2/s with a burst of 2, so the third permit waits about 500 ms.
    let slow = Limiter::new(1_000, Some(2.0));
    let started = Instant::now();
    for _ in 0..3 {
        drop(slow.acquire().await.unwrap());
    }
    assert!(started.elapsed() >= Duration::from_millis(450));
}
