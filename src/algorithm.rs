//! The algorithms a limit can use, behind one interface the limiter and the table rely on.
//! Each is a pure function from (old state, now, cost) to (decision, new state).

use crate::duration::NANOS_PER_SECOND;
use crate::fixed_window::{FixedWindow, Window};
use crate::sliding_window::SlidingWindow;
use crate::token_bucket::{BucketState, TokenBucket};

/// What one table slot stores for a bucket, whatever the algorithm: `idle_at` is the instant after
/// which the state is indistinguishable from a fresh one (so the slot may be reused), `extra` is
/// algorithm-specific. `Default` is the fresh state.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct State {
    pub idle_at: u64,
    pub extra: u64,
}

/// The answer for one request against one limit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Decision {
    pub allowed: bool,
    /// Units left after this request (before it, when denied).
    pub remaining: u64,
    /// Allowed: nanoseconds until the quota is fully available again. Denied: equals
    /// `retry_after_nanos`.
    pub reset_nanos: u64,
    /// Nanoseconds until a request of this cost would be allowed (0 when allowed).
    pub retry_after_nanos: u64,
}

pub fn ceil_seconds(nanos: u64) -> u64 {
    nanos.div_ceil(NANOS_PER_SECOND)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Algorithm {
    /// Token bucket; also GCRA, which admits exactly the same sequences and differs only in how
    /// the limit is stated (see `Kind`).
    TokenBucket(TokenBucket),
    FixedWindow(FixedWindow),
    SlidingWindow(SlidingWindow),
}

impl From<State> for BucketState {
    fn from(s: State) -> BucketState {
        BucketState { full_at: s.idle_at, updated_at: s.extra }
    }
}

impl From<BucketState> for State {
    fn from(b: BucketState) -> State {
        State { idle_at: b.full_at, extra: b.updated_at }
    }
}

impl Algorithm {
    pub fn decide(&self, state: State, now: u64, cost: u64) -> (Decision, State) {
        match self {
            Algorithm::TokenBucket(b) => {
                let (d, next) = b.decide(state.into(), now, cost);
                (d, next.into())
            }
            Algorithm::FixedWindow(w) => w.decide(state, now, cost),
            Algorithm::SlidingWindow(w) => w.decide(state, now, cost),
        }
    }

    /// The limit as it stands, consuming nothing.
    pub fn status(&self, state: State, now: u64) -> Decision {
        match self {
            Algorithm::TokenBucket(b) => b.status(state.into(), now),
            Algorithm::FixedWindow(w) => w.status(state, now),
            Algorithm::SlidingWindow(w) => w.status(state, now),
        }
    }

    /// Gives back what an earlier `decide` at the same cost took.
    pub fn refund(&self, state: State, now: u64, cost: u64) -> State {
        match self {
            Algorithm::TokenBucket(b) => b.refund(state.into(), now, cost).into(),
            Algorithm::FixedWindow(w) => w.refund(state, now, cost),
            Algorithm::SlidingWindow(w) => w.refund(state, now, cost),
        }
    }

    /// One state holding what two copies of the same limit had taken.
    pub fn merge(&self, a: State, b: State, now: u64) -> State {
        match self {
            Algorithm::TokenBucket(t) => t.merge(a.into(), b.into(), now).into(),
            Algorithm::FixedWindow(w) => w.merge(a, b, now),
            Algorithm::SlidingWindow(w) => w.merge(a, b, now),
        }
    }

    /// The most one request may cost and ever pass.
    pub fn capacity(&self) -> u64 {
        match self {
            Algorithm::TokenBucket(b) => b.capacity(),
            Algorithm::FixedWindow(w) => w.limit,
            Algorithm::SlidingWindow(w) => w.limit,
        }
    }

    /// The window of the quota policy in seconds at `now` (a calendar month varies).
    pub fn window_seconds(&self, now: u64) -> u64 {
        match self {
            Algorithm::TokenBucket(b) => b.window_seconds(),
            Algorithm::FixedWindow(FixedWindow { window, .. }) => {
                let (start, end) = window.bounds(now);
                ceil_seconds(end - start)
            }
            Algorithm::SlidingWindow(w) => ceil_seconds(w.window),
        }
    }

    /// True when the policy window is the same at every instant (so its header can be prepared
    /// once).
    pub fn has_fixed_window(&self) -> bool {
        !matches!(self, Algorithm::FixedWindow(FixedWindow { window: Window::Month, .. }))
    }
}
