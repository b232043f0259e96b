//! Concurrency limits: at most `max` units (requests, or their cost) in flight per key, acquired
//! when a request is admitted and released when its stream ends.
//!
//! A worker that dies holding units never releases them, so units are leased: time is cut into
//! epochs of half the lease, and the state counts the units placed in the current epoch and in the
//! previous one. A worker moves the units it still holds into the current epoch once per epoch
//! (renewing their lease); units left in an epoch two epochs old are dropped. So a unit whose holder
//! is gone stops counting at most one lease after its last renewal, and one that is renewed keeps
//! counting however long its stream lives.

use super::{Decision, State};
use crate::algorithm::time::NANOS_PER_SECOND;

/// The wait a denied request is told: a slot can free up at any moment.
pub const RETRY_AFTER_NANOS: u64 = NANOS_PER_SECOND;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Concurrency {
    pub max: u64,
    /// Nanoseconds in an epoch: half the lease.
    pub epoch: u64,
}

/// The slot's words as units in flight: `idle_at` is the start of the epoch two after the one
/// counted (from then on nothing counted here matters), `word` packs the previous epoch's units
/// (high 32 bits) and the current's (low). No units at all is the fresh state.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct InFlight {
    pub epoch: u64,
    pub previous: u64,
    pub current: u64,
}

impl InFlight {
    pub fn total(&self) -> u64 {
        self.previous.saturating_add(self.current)
    }
}

impl Concurrency {
    fn epoch_at(&self, now: u64) -> u64 {
        now / self.epoch
    }

    /// The units as they count at `now`. A state written in a later epoch (by a worker whose clock
    /// reads a moment ahead) is taken as current.
    pub fn in_flight(&self, state: State, now: u64) -> InFlight {
        let now_epoch = self.epoch_at(now);
        if state.idle_at == 0 {
            return InFlight { epoch: now_epoch, previous: 0, current: 0 };
        }
        let stored = InFlight {
            epoch: (state.idle_at / self.epoch).saturating_sub(2),
            previous: state.word >> 32,
            current: state.word & 0xffff_ffff,
        };
        self.moved_to(stored, now_epoch.max(stored.epoch))
    }

    /// `units` as seen from the later epoch `epoch`: the current epoch's become the previous, older
    /// ones are dropped.
    fn moved_to(&self, units: InFlight, epoch: u64) -> InFlight {
        match epoch.saturating_sub(units.epoch) {
            0 => units,
            1 => InFlight { epoch, previous: units.current, current: 0 },
            _ => InFlight { epoch, previous: 0, current: 0 },
        }
    }

    fn store(&self, units: InFlight) -> State {
        if units.total() == 0 {
            return State::default();
        }
        let word = units.previous.min(0xffff_ffff) << 32 | units.current.min(0xffff_ffff);
        State { idle_at: units.epoch.saturating_add(2).saturating_mul(self.epoch), word }
    }

    /// The epoch units placed by writing `stored` are counted in.
    pub fn held_in(&self, stored: State) -> u64 {
        (stored.idle_at / self.epoch).saturating_sub(2)
    }

    pub fn decide(&self, state: State, now: u64, cost: u64) -> (Decision, State) {
        let units = self.in_flight(state, now);
        let used = units.total().saturating_add(cost);
        if used <= self.max {
            let decision = Decision {
                allowed: true,
                remaining: self.max - used,
                until_full_nanos: 0,
                retry_after_nanos: 0,
            };
            (decision, self.store(InFlight { current: units.current.saturating_add(cost), ..units }))
        } else {
            let decision = Decision {
                allowed: false,
                remaining: self.max.saturating_sub(units.total()),
                until_full_nanos: 0,
                retry_after_nanos: RETRY_AFTER_NANOS,
            };
            (decision, state)
        }
    }

    pub fn status(&self, state: State, now: u64) -> Decision {
        let units = self.in_flight(state, now);
        let remaining = self.max.saturating_sub(units.total());
        Decision { allowed: true, remaining, until_full_nanos: 0, retry_after_nanos: 0 }
    }

    /// Releases `cost` units counted in epoch `held_in`; units of a dropped epoch no longer count.
    pub fn release(&self, state: State, now: u64, cost: u64, held_in: u64) -> State {
        let mut units = self.in_flight(state, now);
        if held_in == units.epoch {
            units.current = units.current.saturating_sub(cost);
        } else if held_in.saturating_add(1) == units.epoch {
            units.previous = units.previous.saturating_sub(cost);
        }
        self.store(units)
    }

    /// Renews the lease of `count` units held since epoch `held_in`: they are counted in the
    /// current epoch from now on (counted again if their epoch was already dropped). The new state
    /// and the epoch they are now held in.
    pub fn renew(&self, state: State, now: u64, count: u64, held_in: u64) -> (State, u64) {
        let mut units = self.in_flight(state, now);
        if held_in == units.epoch {
            return (state, held_in);
        }
        if held_in.saturating_add(1) == units.epoch {
            units.previous = units.previous.saturating_sub(count);
        }
        units.current = units.current.saturating_add(count);
        (self.store(units), units.epoch)
    }

    /// One state holding what two copies of the same limit hold.
    pub fn merge(&self, a: State, b: State, now: u64) -> State {
        let (a, b) = (self.in_flight(a, now), self.in_flight(b, now));
        let epoch = a.epoch.max(b.epoch);
        let (a, b) = (self.moved_to(a, epoch), self.moved_to(b, epoch));
        self.store(InFlight {
            epoch,
            previous: a.previous.saturating_add(b.previous),
            current: a.current.saturating_add(b.current),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = NANOS_PER_SECOND;
    /// A lease of 60 s.
    const C: Concurrency = Concurrency { max: 3, epoch: 30 * S };
    const T0: u64 = 1_768_464_000 * S;

    fn take(state: State, now: u64) -> (bool, State) {
        let (d, next) = C.decide(state, now, 1);
        (d.allowed, next)
    }

    #[test]
    fn admits_up_to_max_in_flight_and_a_release_makes_room() {
        let mut s = State::default();
        for _ in 0..3 {
            let (ok, next) = take(s, T0);
            assert!(ok);
            s = next;
        }
        assert!(!take(s, T0).0);
        s = C.release(s, T0 + S, 1, C.held_in(s));
        assert!(take(s, T0 + S).0);
    }

    #[test]
    fn the_last_release_leaves_a_fresh_state_so_the_slot_is_free_at_once() {
        let (_, s) = take(State::default(), T0);
        assert_eq!(C.release(s, T0 + S, 1, C.held_in(s)), State::default());
    }

    #[test]
    fn units_never_renewed_stop_counting_within_one_lease() {
        let (_, s) = take(State::default(), T0);
        let (_, s) = take(s, T0);
        let (_, s) = take(s, T0);
        assert_eq!(C.status(s, T0 + 30 * S).remaining, 0, "still leased in the next epoch");
        assert_eq!(C.status(s, T0 + 60 * S).remaining, 3, "dropped one lease later");
    }

    #[test]
    fn renewed_units_keep_counting_however_long_they_live() {
        let (_, mut s) = take(State::default(), T0);
        let mut held_in = C.held_in(s);
        for epoch in 1..10 {
            let now = T0 + epoch * 30 * S + S;
            (s, held_in) = C.renew(s, now, 1, held_in);
            assert_eq!(C.status(s, now).remaining, 2);
        }
        let end = T0 + 10 * 30 * S;
        assert_eq!(C.release(s, end, 1, held_in), State::default());
    }

    #[test]
    fn a_release_from_the_previous_epoch_takes_from_the_previous_count() {
        let (_, s) = take(State::default(), T0);
        let held_in = C.held_in(s);
        let (_, s) = take(s, T0 + 30 * S);
        let s = C.release(s, T0 + 31 * S, 1, held_in);
        let units = C.in_flight(s, T0 + 31 * S);
        assert_eq!((units.previous, units.current), (0, 1));
    }

    #[test]
    fn merging_two_copies_adds_their_units() {
        let (_, a) = take(State::default(), T0);
        let (_, b) = take(State::default(), T0 + 30 * S);
        assert_eq!(C.status(C.merge(a, b, T0 + 31 * S), T0 + 31 * S).remaining, 1);
    }
}
