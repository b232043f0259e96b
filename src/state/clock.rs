//! The clock seam: wall-clock nanoseconds since the Unix epoch, as Envoy's
//! `proxy_get_current_time_nanoseconds`. A phase reads it once and decides at that instant.

pub trait Clock {
    fn now_nanos(&self) -> u64;
}

/// A clock that only moves when told to (built for tests and with the `testing` feature only).
#[cfg(any(test, feature = "testing"))]
#[derive(Debug, Default)]
pub struct FakeClock {
    nanos: std::sync::atomic::AtomicU64,
}

#[cfg(any(test, feature = "testing"))]
impl FakeClock {
    pub fn at(nanos: u64) -> FakeClock {
        FakeClock { nanos: std::sync::atomic::AtomicU64::new(nanos) }
    }

    pub fn advance(&self, nanos: u64) {
        self.nanos.fetch_add(nanos, std::sync::atomic::Ordering::SeqCst);
    }
}

#[cfg(any(test, feature = "testing"))]
impl Clock for FakeClock {
    fn now_nanos(&self) -> u64 {
        self.nanos.load(std::sync::atomic::Ordering::SeqCst)
    }
}
