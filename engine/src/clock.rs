//! Time, injected. The only place the wall clock is read is [`SystemClock`]; tests, `canvas
//! test` and `canvas simulate` use a [`VirtualClock`] that jumps to the next due moment.

use std::sync::Mutex;

use crate::state::Time;

pub trait Clock: Send + Sync {
    fn now(&self) -> Time;
}

/// The wall clock, for the daemon.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Time {
        chrono::Utc::now()
    }
}

/// A clock that only moves when told to, and never backwards.
#[derive(Debug)]
pub struct VirtualClock(Mutex<Time>);

impl VirtualClock {
    pub fn new(start: Time) -> VirtualClock {
        VirtualClock(Mutex::new(start))
    }

    /// Move to `t`; a `t` in the past leaves the clock where it is.
    pub fn advance_to(&self, t: Time) {
        let mut now = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if t > *now {
            *now = t;
        }
    }
}

impl Clock for VirtualClock {
    fn now(&self) -> Time {
        *self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}
