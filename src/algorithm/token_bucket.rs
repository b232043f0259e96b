//! The token bucket, as a pure function from old state to decision and new state.
//!
//! The bucket is stored as a single instant, `full_at`: the time at which it will have refilled to
//! its capacity. Tokens missing now are `(full_at - now) / interval`, so one number captures the
//! bucket exactly (this is the GCRA formulation of a token bucket with continuous refill). A bucket
//! whose `full_at` lies in the past is full and carries no information, which is what lets the
//! table reuse its slot.

use super::time::ceil_seconds;
use super::{Decision, State};

/// What is stored for one bucket. `Default` is a full bucket.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BucketState {
    pub full_at: u64,
    /// The latest clock reading that updated the bucket. Workers read the clock a few
    /// microseconds apart and may write in another order; deciding at no earlier time than this
    /// keeps a late writer with an early reading from seeing a spurious extra debt.
    pub updated_at: u64,
}

/// The slot's words as a bucket: `idle_at` is `full_at`, `word` is `updated_at`.
impl From<State> for BucketState {
    fn from(s: State) -> BucketState {
        BucketState { full_at: s.idle_at, updated_at: s.word }
    }
}

impl From<BucketState> for State {
    fn from(b: BucketState) -> State {
        State { idle_at: b.full_at, word: b.updated_at }
    }
}

/// A turn reserved for a request that waits for it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Reserved {
    /// How long the request must wait for its turn, from the bucket's own latest time (which a
    /// worker whose clock reads earlier than another's takes as now): at most `max_delay`.
    pub wait_nanos: u64,
    pub decision: Decision,
    pub state: State,
}

/// An immutable bucket definition, validated at configuration time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TokenBucket {
    capacity: u64,
    /// Nanoseconds to refill one token.
    interval: u64,
    /// `capacity * interval`: how far `full_at` may run ahead of now.
    tolerance: u64,
}

/// The largest debt a bucket may hold, so `now + tolerance` never overflows for the next
/// five centuries of wall-clock time.
pub const MAX_TOLERANCE_NANOS: u64 = 1 << 62;

impl TokenBucket {
    /// `None` when the refill rate is finer than one token per nanosecond or the bucket would
    /// take longer than [`MAX_TOLERANCE_NANOS`] to fill.
    pub fn new(capacity: u32, refill_tokens: u32, refill_period_nanos: u64) -> Option<TokenBucket> {
        if capacity == 0 || refill_tokens == 0 {
            return None;
        }
        if refill_period_nanos / u64::from(refill_tokens) == 0 {
            return None;
        }
        // Rounded up: a rate that is not a whole number of nanoseconds per token refills at most a
        // nanosecond per token slower than configured, never faster.
        let interval = refill_period_nanos.div_ceil(u64::from(refill_tokens));
        let tolerance = interval.checked_mul(u64::from(capacity))?;
        (tolerance <= MAX_TOLERANCE_NANOS).then_some(TokenBucket {
            capacity: u64::from(capacity),
            interval,
            tolerance,
        })
    }

    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// Seconds to refill an empty bucket, rounded up: the `w` of the quota policy.
    pub fn window_seconds(&self) -> u64 {
        ceil_seconds(self.tolerance)
    }

    /// The debt as far as admitting goes: never more than a full bucket's.
    fn debt(&self, state: BucketState, now: u64) -> u64 {
        self.owed(state, now).min(self.tolerance)
    }

    /// The whole debt, including the turns reserved beyond the bucket's capacity for requests
    /// that wait (see [`Self::reserve`]): what giving back and merging must keep.
    fn owed(&self, state: BucketState, now: u64) -> u64 {
        state.full_at.saturating_sub(now)
    }

    pub fn decide(&self, state: State, now: u64, cost: u64) -> (Decision, State) {
        let (decision, next) = self.decide_bucket(state.into(), now, cost);
        (decision, next.into())
    }

    pub fn status(&self, state: State, now: u64) -> Decision {
        self.status_bucket(state.into(), now)
    }

    pub fn give_back(&self, state: State, now: u64, cost: u64) -> State {
        self.give_back_bucket(state.into(), now, cost).into()
    }

    pub fn merge(&self, a: State, b: State, now: u64) -> State {
        self.merge_buckets(a.into(), b.into(), now).into()
    }

    fn decide_bucket(&self, state: BucketState, now: u64, cost: u64) -> (Decision, BucketState) {
        let now = now.max(state.updated_at);
        let debt = self.debt(state, now);
        let cost_nanos = cost.saturating_mul(self.interval);
        let new_debt = debt.saturating_add(cost_nanos);
        if new_debt <= self.tolerance {
            let decision = Decision {
                allowed: true,
                remaining: (self.tolerance - new_debt) / self.interval,
                until_full_nanos: new_debt,
                retry_after_nanos: 0,
            };
            (decision, BucketState { full_at: now.saturating_add(new_debt), updated_at: now })
        } else {
            // Turns reserved for waiting requests come first: the wait counts the whole debt.
            let owed = self.owed(state, now);
            let decision = Decision {
                allowed: false,
                remaining: (self.tolerance - debt) / self.interval,
                until_full_nanos: owed,
                retry_after_nanos: owed.saturating_add(cost_nanos).saturating_sub(self.tolerance),
            };
            (decision, state)
        }
    }

    /// A denied request's turn, reserved now: the units are taken at once (running `max_delay`
    /// into debt beyond the bucket's capacity), and the request must wait until its turn, when the
    /// bucket would have let it pass. `None` when its turn is further than `max_delay` away.
    pub fn reserve(&self, state: State, now: u64, cost: u64, max_delay: u64) -> Option<Reserved> {
        let state = BucketState::from(state);
        let now = now.max(state.updated_at);
        let new_debt = self.owed(state, now).saturating_add(cost.saturating_mul(self.interval));
        let wait = new_debt.saturating_sub(self.tolerance);
        if wait > max_delay {
            return None;
        }
        let decision =
            Decision { allowed: true, remaining: 0, until_full_nanos: new_debt, retry_after_nanos: 0 };
        let state = BucketState { full_at: now.saturating_add(new_debt), updated_at: now };
        Some(Reserved { wait_nanos: wait, decision, state: state.into() })
    }

    /// Takes `units` whatever is left: a usage known only afterwards. The bucket may owe more than
    /// its capacity; it refills from there.
    pub fn charge(&self, state: State, now: u64, units: u64) -> State {
        let state = BucketState::from(state);
        let now = now.max(state.updated_at);
        let owed = self.owed(state, now).saturating_add(units.saturating_mul(self.interval));
        BucketState { full_at: now.saturating_add(owed.min(MAX_TOLERANCE_NANOS)), updated_at: now }.into()
    }

    fn status_bucket(&self, state: BucketState, now: u64) -> Decision {
        let now = now.max(state.updated_at);
        Decision {
            allowed: true,
            remaining: (self.tolerance - self.debt(state, now)) / self.interval,
            until_full_nanos: self.owed(state, now),
            retry_after_nanos: 0,
        }
    }

    /// One bucket holding what two copies of it had taken.
    fn merge_buckets(&self, a: BucketState, b: BucketState, now: u64) -> BucketState {
        let now = now.max(a.updated_at).max(b.updated_at);
        let debt = self.owed(a, now).saturating_add(self.owed(b, now)).min(MAX_TOLERANCE_NANOS);
        BucketState { full_at: now.saturating_add(debt), updated_at: now }
    }

    /// Gives back what an earlier `decide` at the same cost took.
    fn give_back_bucket(&self, state: BucketState, now: u64, cost: u64) -> BucketState {
        let now = now.max(state.updated_at);
        let owed = self.owed(state, now);
        let cost_nanos = cost.saturating_mul(self.interval);
        BucketState { full_at: now.saturating_add(owed.saturating_sub(cost_nanos)), updated_at: now }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::algorithm::time::NANOS_PER_SECOND;

    const S: u64 = NANOS_PER_SECOND;
    const T0: u64 = 1_700_000_000 * S;

    fn bucket(capacity: u32, tokens: u32, period_secs: u64) -> TokenBucket {
        TokenBucket::new(capacity, tokens, period_secs * S).unwrap()
    }

    /// Sends `n` requests of cost 1 at `now`, returns how many were allowed and the final state.
    fn burst(b: &TokenBucket, mut state: BucketState, now: u64, n: u32) -> (u32, BucketState) {
        let mut allowed = 0;
        for _ in 0..n {
            let (d, next) = b.decide_bucket(state, now, 1);
            allowed += u32::from(d.allowed);
            state = next;
        }
        (allowed, state)
    }

    #[test]
    fn a_fresh_bucket_allows_exactly_its_capacity() {
        let b = bucket(50, 50, 86_400);
        let (allowed, _) = burst(&b, BucketState::default(), T0, 400);
        assert_eq!(allowed, 50);
    }

    #[test]
    fn denies_the_51st_request_on_a_fresh_key() {
        let b = bucket(50, 50, 86_400);
        let (_, state) = burst(&b, BucketState::default(), T0, 50);
        let (d, after) = b.decide_bucket(state, T0, 1);
        assert!(!d.allowed);
        assert_eq!(after, state, "a denial must not change the bucket");
    }

    #[test]
    fn refills_one_token_per_interval() {
        let b = bucket(5, 5, 60); // one token per 12 s
        let (_, state) = burst(&b, BucketState::default(), T0, 5);
        assert!(!b.decide_bucket(state, T0 + 12 * S - 1, 1).0.allowed);
        let (d, state) = b.decide_bucket(state, T0 + 12 * S, 1);
        assert!(d.allowed);
        assert!(!b.decide_bucket(state, T0 + 12 * S, 1).0.allowed);
    }

    #[test]
    fn reports_remaining_and_seconds_until_full() {
        let b = bucket(5, 5, 60);
        let (d, state) = b.decide_bucket(BucketState::default(), T0, 1);
        assert_eq!((d.remaining, d.reset_nanos()), (4, 12 * S));
        let (_, state) = burst(&b, state, T0, 4);
        let (d, _) = b.decide_bucket(state, T0, 1);
        assert_eq!(
            (d.allowed, d.remaining, d.retry_after_nanos, d.reset_nanos()),
            (false, 0, 12 * S, 12 * S)
        );
    }

    #[test]
    fn a_cost_above_remaining_is_denied_and_reports_what_is_left() {
        let b = bucket(10, 10, 10);
        let (_, state) = b.decide_bucket(BucketState::default(), T0, 7);
        let (d, _) = b.decide_bucket(state, T0, 5);
        assert_eq!((d.allowed, d.remaining, d.retry_after_nanos), (false, 3, 2 * S));
    }

    #[test]
    fn burst_capacity_may_exceed_the_refill_amount() {
        let b = bucket(150, 100, 60);
        let (allowed, _) = burst(&b, BucketState::default(), T0, 200);
        assert_eq!(allowed, 150);
        assert_eq!(b.window_seconds(), 90);
    }

    #[test]
    fn status_reports_without_consuming() {
        let b = bucket(5, 5, 60);
        let (_, state) = b.decide_bucket(BucketState::default(), T0, 2);
        let d = b.status_bucket(state, T0);
        assert_eq!((d.remaining, d.reset_nanos()), (3, 24 * S));
        assert_eq!(b.status_bucket(state, T0).remaining, 3);
    }

    #[test]
    fn merging_two_copies_adds_their_debts() {
        let b = bucket(10, 10, 10);
        let (_, a) = burst(&b, BucketState::default(), T0, 3);
        let (_, c) = burst(&b, BucketState::default(), T0, 4);
        let (allowed, _) = burst(&b, b.merge_buckets(a, c, T0), T0, 10);
        assert_eq!(allowed, 3);
    }

    #[test]
    fn giving_back_restores_the_bucket_exactly() {
        let b = bucket(3, 3, 3);
        let (_, one) = b.decide_bucket(BucketState::default(), T0, 1);
        let (_, two) = b.decide_bucket(one, T0, 1);
        assert_eq!(b.give_back_bucket(two, T0, 1).full_at, one.full_at);
        assert!(b.give_back_bucket(one, T0, 1).full_at <= T0, "a full bucket again");
    }

    #[test]
    fn never_refills_faster_than_configured_when_a_token_is_not_whole_nanoseconds() {
        // 134,616 per 6 ms is 44.57 ns a token: rounded down to 44 ns it admitted 426 units where
        // 425 fit; 500,001 per ms rounded down to 1 ns refilled twice as fast.
        for (capacity, tokens, period) in
            [(333, 134_616, 6_000_000), (1, 500_001, 1_000_000), (10, 7, S), (5, 3, 1_000)]
        {
            let b = TokenBucket::new(capacity, tokens, period).unwrap();
            let (mut state, mut now, mut admitted) = (BucketState::default(), T0, 0u64);
            while now < T0 + 2 * period {
                // Every request as soon as the bucket says one fits: the most it can be made to admit.
                let (d, next) = b.decide_bucket(state, now, 1);
                if d.allowed {
                    admitted += 1;
                    state = next;
                    let fit = u64::from(capacity) + (now - T0) * u64::from(tokens) / period;
                    assert!(admitted <= fit, "{tokens} per {period} ns: {admitted} admitted where {fit} fit");
                } else {
                    now += d.retry_after_nanos;
                }
            }
        }
    }

    #[test]
    fn rejects_rates_finer_than_a_nanosecond_and_empty_buckets() {
        assert!(TokenBucket::new(0, 1, S).is_none());
        assert!(TokenBucket::new(1, 0, S).is_none());
        assert!(TokenBucket::new(1, u32::MAX, 1_000).is_none());
    }

    #[test]
    fn a_late_writer_with_an_earlier_clock_reading_still_gets_the_last_token() {
        let b = bucket(3, 3, 86_400);
        let (_, state) = b.decide_bucket(BucketState::default(), T0 + 500, 1);
        let (_, state) = b.decide_bucket(state, T0 + 900, 1);
        let (d, _) = b.decide_bucket(state, T0 + 100, 1);
        assert!(d.allowed);
    }

    #[test]
    fn a_clock_that_steps_back_never_hands_out_extra_tokens() {
        let b = bucket(2, 2, 2);
        let (allowed, state) = burst(&b, BucketState::default(), T0, 2);
        assert_eq!(allowed, 2);
        assert!(!b.decide_bucket(state, T0 - 10 * S, 1).0.allowed);
    }

    #[test]
    fn turns_are_reserved_one_interval_apart_up_to_the_longest_delay() {
        let b = bucket(1, 10, 1); // one at once, then one every 100 ms
        let (_, mut state) = b.decide(State::default(), T0, 1);
        let mut waits = Vec::new();
        while let Some(r) = b.reserve(state, T0, 1, S) {
            waits.push(r.wait_nanos / 1_000_000);
            state = r.state;
        }
        assert_eq!(waits, [100, 200, 300, 400, 500, 600, 700, 800, 900, 1000]);
        let (d, _) = b.decide(state, T0 + S, 1);
        assert!(!d.allowed, "the reserved turns are taken: nothing left at their last one");
        let (d, _) = b.decide(state, T0 + S + S / 10, 1);
        assert!(d.allowed);
    }
}
