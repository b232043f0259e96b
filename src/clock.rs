//! The clock seam: wall-clock nanoseconds, as Envoy's `proxy_get_current_time_nanoseconds`.

use std::sync::atomic::{AtomicU64, Ordering};

pub trait Clock {
    fn now_nanos(&self) -> u64;
}

/// A clock that only moves when told to, for tests.
#[derive(Debug, Default)]
pub struct FakeClock {
    nanos: AtomicU64,
}

impl FakeClock {
    pub fn at(nanos: u64) -> FakeClock {
        FakeClock { nanos: AtomicU64::new(nanos) }
    }

    pub fn advance(&self, nanos: u64) {
        self.nanos.fetch_add(nanos, Ordering::SeqCst);
    }
}

impl Clock for FakeClock {
    fn now_nanos(&self) -> u64 {
        self.nanos.load(Ordering::SeqCst)
    }
}
