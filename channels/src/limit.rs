//! Per-channel back-pressure: a bound on requests in flight and a token-bucket rate, so a
//! burst of due rows cannot overrun a provider's quota.

use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use governor::clock::{Clock, MonotonicClock};
use governor::state::{InMemoryState, NotKeyed};
use governor::{Quota, RateLimiter};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// The right to make one request on a channel; the concurrency slot is freed on drop.
#[derive(Debug)]
pub struct Permit {
    _slot: OwnedSemaphorePermit,
}

/// The limiter has been closed (daemon shutdown).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the limiter is closed")]
pub struct Closed;

type Bucket = RateLimiter<NotKeyed, InMemoryState, MonotonicClock>;

/// Concurrency slots plus an optional GCRA token bucket (governor). The rate limiter reads a
/// monotonic clock, never the wall clock: it measures intervals, not dates.
#[derive(Debug)]
pub struct Limiter {
    slots: Arc<Semaphore>,
    bucket: Option<Bucket>,
    clock: MonotonicClock,
}

impl Limiter {
    /// `concurrency` requests at once (at least 1); `rate_limit` requests per second when
    /// set, with a burst of one second's worth (at least 1), so an idle channel may send a
    /// second's quota at once and then holds the rate.
    pub fn new(concurrency: u32, rate_limit: Option<f64>) -> Limiter {
        let clock = MonotonicClock;
        let bucket = rate_limit.and_then(|rate| {
            if !(rate.is_finite() && rate > 0.0) {
                return None;
            }
            let period = Duration::from_secs_f64(1.0 / rate);
            let burst = NonZeroU32::new(rate.round().clamp(1.0, f64::from(u32::MAX)) as u32)
                .unwrap_or(NonZeroU32::MIN);
            Quota::with_period(period)
                .map(|q| RateLimiter::direct_with_clock(q.allow_burst(burst), clock.clone()))
        });
        Limiter {
            slots: Arc::new(Semaphore::new(concurrency.max(1) as usize)),
            bucket,
            clock,
        }
    }

    /// Wait for a free slot, then for a token; hold the [`Permit`] for the whole request.
    /// The slot is taken first so that a token is never spent by a request that then
    /// queues for a slot (which would let requests bunch up past the rate).
    pub async fn acquire(&self) -> Result<Permit, Closed> {
        let slot = self
            .slots
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| Closed)?;
        if let Some(bucket) = &self.bucket {
            while let Err(not_until) = bucket.check() {
                tokio::time::sleep(not_until.wait_time_from(self.clock.now())).await;
            }
        }
        Ok(Permit { _slot: slot })
    }

    /// Refuse every waiting and future [`Limiter::acquire`]; for shutdown.
    pub fn close(&self) {
        self.slots.close();
    }

    /// Slots free right now (for metrics).
    pub fn available(&self) -> usize {
        self.slots.available_permits()
    }
}
