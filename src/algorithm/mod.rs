//! The algorithms a limit can use, behind one interface the limiter and the table rely on.
//! Each is a pure function from (old state, now, cost) to (decision, new state); the store owns
//! the read-compute-CAS loop around it.

pub mod concurrency;
pub mod fixed_window;
pub mod sliding_window;
pub mod time;
pub mod token_bucket;

use concurrency::Concurrency;
use fixed_window::{FixedWindow, Window};
use sliding_window::SlidingWindow;
use time::ceil_seconds;
use token_bucket::TokenBucket;

/// What one table slot stores for a bucket, whatever the algorithm. `idle_at` is the instant from
/// which the state is indistinguishable from a fresh one (so the slot may be reused); `word` is
/// the algorithm's own, read and written only through that algorithm's typed view
/// ([`token_bucket::BucketState`], [`fixed_window::WindowCount`], [`sliding_window::Counts`]).
/// `Default` is the fresh state.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct State {
    pub idle_at: u64,
    pub word: u64,
}

/// The answer for one request against one limit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Decision {
    pub allowed: bool,
    /// Units left after this request (before it, when denied).
    pub remaining: u64,
    /// Nanoseconds until the whole quota is available again (0: it is now).
    pub until_full_nanos: u64,
    /// Nanoseconds until a request of this cost would pass (0 when allowed).
    pub retry_after_nanos: u64,
}

impl Decision {
    /// The reset the headers announce: until the quota is whole again when the request passed,
    /// until it would pass when it was denied.
    pub fn reset_nanos(&self) -> u64 {
        if self.allowed {
            self.until_full_nanos
        } else {
            self.retry_after_nanos
        }
    }

    pub fn reset_seconds(&self) -> u64 {
        ceil_seconds(self.reset_nanos())
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Algorithm {
    /// Token bucket; also GCRA, which admits exactly the same sequences and differs only in how
    /// the limit is stated (see `LimitKind`).
    TokenBucket(TokenBucket),
    FixedWindow(FixedWindow),
    SlidingWindow(SlidingWindow),
    /// Units in flight, released when their request ends.
    Concurrency(Concurrency),
}

impl Algorithm {
    pub fn decide(&self, state: State, now: u64, cost: u64) -> (Decision, State) {
        match self {
            Algorithm::TokenBucket(b) => b.decide(state, now, cost),
            Algorithm::FixedWindow(w) => w.decide(state, now, cost),
            Algorithm::SlidingWindow(w) => w.decide(state, now, cost),
            Algorithm::Concurrency(c) => c.decide(state, now, cost),
        }
    }

    /// For a request this limit denies now: its turn reserved, if the algorithm knows the exact
    /// instant (token bucket, GCRA) and it comes within `max_delay`.
    pub fn reserve(
        &self,
        state: State,
        now: u64,
        cost: u64,
        max_delay: u64,
    ) -> Option<token_bucket::Reserved> {
        match self {
            Algorithm::TokenBucket(b) => b.reserve(state, now, cost, max_delay),
            _ => None,
        }
    }

    /// The limit as it stands, consuming nothing.
    pub fn status(&self, state: State, now: u64) -> Decision {
        match self {
            Algorithm::TokenBucket(b) => b.status(state, now),
            Algorithm::FixedWindow(w) => w.status(state, now),
            Algorithm::SlidingWindow(w) => w.status(state, now),
            Algorithm::Concurrency(c) => c.status(state, now),
        }
    }

    /// Gives back what an earlier `decide` at the same cost took; `held_in` is [`Self::held_in`]
    /// of the state that `decide` stored (only a concurrency limit needs it).
    pub fn give_back(&self, state: State, now: u64, cost: u64, held_in: u64) -> State {
        match self {
            Algorithm::TokenBucket(b) => b.give_back(state, now, cost),
            Algorithm::FixedWindow(w) => w.give_back(state, now, cost),
            Algorithm::SlidingWindow(w) => w.give_back(state, now, cost),
            Algorithm::Concurrency(c) => c.release(state, now, cost, held_in),
        }
    }

    /// Takes `units` whatever is left (a usage known only from the response): the remaining
    /// quota may go below zero. A concurrency limit is never charged so (refused at configuration).
    pub fn charge(&self, state: State, now: u64, units: u64) -> State {
        match self {
            Algorithm::TokenBucket(b) => b.charge(state, now, units),
            Algorithm::FixedWindow(w) => w.charge(state, now, units),
            Algorithm::SlidingWindow(w) => w.charge(state, now, units),
            Algorithm::Concurrency(_) => state,
        }
    }

    /// A concurrency limit: what it takes is held until the request ends.
    pub fn is_concurrency(&self) -> bool {
        matches!(self, Algorithm::Concurrency(_))
    }

    /// For a concurrency limit, the lease epoch the units placed by storing `stored` count in;
    /// 0 for the others, which need no such mark.
    pub fn held_in(&self, stored: State) -> u64 {
        match self {
            Algorithm::Concurrency(c) => c.held_in(stored),
            _ => 0,
        }
    }

    /// One state holding what two copies of the same limit had taken.
    pub fn merge(&self, a: State, b: State, now: u64) -> State {
        match self {
            Algorithm::TokenBucket(t) => t.merge(a, b, now),
            Algorithm::FixedWindow(w) => w.merge(a, b, now),
            Algorithm::SlidingWindow(w) => w.merge(a, b, now),
            Algorithm::Concurrency(c) => c.merge(a, b, now),
        }
    }

    /// The most one request may cost and ever pass.
    pub fn capacity(&self) -> u64 {
        match self {
            Algorithm::TokenBucket(b) => b.capacity(),
            Algorithm::FixedWindow(w) => w.limit,
            Algorithm::SlidingWindow(w) => w.limit,
            Algorithm::Concurrency(c) => c.max,
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
            // Units in flight have no window; the policy's `w` says 1.
            Algorithm::Concurrency(_) => 1,
        }
    }

    /// True when the policy window is the same at every instant (so its header can be prepared
    /// once).
    pub fn has_constant_window(&self) -> bool {
        !matches!(self, Algorithm::FixedWindow(FixedWindow { window: Window::Month, .. }))
    }
}
