//! The sliding window (weighted two-window counter): the count of the previous fixed window,
//! weighted by how much of it still overlaps a window ending now, plus the current window's count.
//! It smooths the burst a fixed window allows at its boundary, in constant memory.

use super::{Decision, State};

/// The slot's words (see [`Counts`]): `idle_at` is the start of the current window plus two
/// windows (after that nothing in it matters), `word` packs the previous window's count (high 32
/// bits) and the current's (low).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SlidingWindow {
    pub limit: u64,
    pub window: u64,
}

/// The slot's words as two windows' counts, read by `counts` and written by `store`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Counts {
    start: u64,
    previous: u64,
    current: u64,
}

impl SlidingWindow {
    fn counts(&self, state: State, now: u64) -> Counts {
        let w = self.window;
        let start = now - now % w;
        let (previous, current) = (state.word >> 32, state.word & 0xffff_ffff);
        if state.idle_at == 0 {
            return Counts { start, previous: 0, current: 0 };
        }
        let state_start = state.idle_at.saturating_sub(2 * w);
        if state_start == start {
            Counts { start, previous, current }
        } else if state_start.saturating_add(w) == start {
            Counts { start, previous: current, current: 0 }
        } else if state_start > start {
            // Written by a worker whose clock reading is a moment ahead: take its window.
            Counts { start: state_start, previous, current }
        } else {
            Counts { start, previous: 0, current: 0 }
        }
    }

    fn store(&self, c: Counts) -> State {
        State {
            idle_at: c.start.saturating_add(2 * self.window),
            word: (c.previous.min(u64::from(u32::MAX)) << 32) | c.current.min(u64::from(u32::MAX)),
        }
    }

    /// The weighted count times the window length (exact integer arithmetic).
    fn scaled(&self, c: &Counts, now: u64, current: u64) -> u128 {
        let w = u128::from(self.window);
        let elapsed = u128::from(now.saturating_sub(c.start)).min(w);
        u128::from(c.previous) * (w - elapsed) + u128::from(current) * w
    }

    /// Nanoseconds until the weighted count drops to zero.
    fn until_clear(&self, c: &Counts, now: u64, current: u64) -> u64 {
        if current > 0 {
            c.start.saturating_add(2 * self.window).saturating_sub(now)
        } else if c.previous > 0 {
            c.start.saturating_add(self.window).saturating_sub(now)
        } else {
            0
        }
    }

    /// Nanoseconds from `now` until a request of `cost` fits.
    fn wait(&self, c: &Counts, now: u64, cost: u64) -> u64 {
        let w = u128::from(self.window);
        let limit = u128::from(self.limit);
        let elapsed = u128::from(now.saturating_sub(c.start)).min(w);
        let (previous, current, cost) = (u128::from(c.previous), u128::from(c.current), u128::from(cost));
        // Later in this window: previous * (w - e) + (current + cost) * w <= limit * w.
        if current + cost <= limit && previous > 0 {
            let slack = (limit - current - cost) * w / previous;
            let e = w.saturating_sub(slack);
            if e <= w {
                return e.saturating_sub(elapsed) as u64;
            }
        }
        // In the next window, where this window's count becomes the previous one.
        let e =
            (limit.saturating_sub(cost) * w).checked_div(current).map_or(0, |room| w.saturating_sub(room));
        (w - elapsed + e) as u64
    }

    pub fn decide(&self, state: State, now: u64, cost: u64) -> (Decision, State) {
        let c = self.counts(state, now);
        let now = now.max(c.start);
        let current = c.current.saturating_add(cost);
        let limit_scaled = u128::from(self.limit) * u128::from(self.window);
        let scaled = self.scaled(&c, now, current);
        if scaled <= limit_scaled {
            let decision = Decision {
                allowed: true,
                remaining: ((limit_scaled - scaled) / u128::from(self.window)) as u64,
                until_full_nanos: self.until_clear(&c, now, current),
                retry_after_nanos: 0,
            };
            (decision, self.store(Counts { current, ..c }))
        } else {
            let before = self.scaled(&c, now, c.current);
            let wait = self.wait(&c, now, cost).max(1);
            let decision = Decision {
                allowed: false,
                remaining: (limit_scaled.saturating_sub(before) / u128::from(self.window)) as u64,
                until_full_nanos: self.until_clear(&c, now, c.current),
                retry_after_nanos: wait,
            };
            (decision, state)
        }
    }

    pub fn status(&self, state: State, now: u64) -> Decision {
        let c = self.counts(state, now);
        let now = now.max(c.start);
        let limit_scaled = u128::from(self.limit) * u128::from(self.window);
        let scaled = self.scaled(&c, now, c.current);
        Decision {
            allowed: true,
            remaining: (limit_scaled.saturating_sub(scaled) / u128::from(self.window)) as u64,
            until_full_nanos: self.until_clear(&c, now, c.current),
            retry_after_nanos: 0,
        }
    }

    /// Counts `units` whatever is left: the weighted count may pass the limit.
    pub fn charge(&self, state: State, now: u64, units: u64) -> State {
        let c = self.counts(state, now);
        self.store(Counts { current: c.current.saturating_add(units), ..c })
    }

    pub fn give_back(&self, state: State, now: u64, cost: u64) -> State {
        let c = self.counts(state, now);
        self.store(Counts { current: c.current.saturating_sub(cost), ..c })
    }

    pub fn merge(&self, a: State, b: State, now: u64) -> State {
        let (x, y) = (self.counts(a, now), self.counts(b, now));
        let c = match x.start.cmp(&y.start) {
            std::cmp::Ordering::Equal => Counts {
                start: x.start,
                previous: x.previous.max(y.previous),
                current: x.current + y.current,
            },
            std::cmp::Ordering::Greater => x,
            std::cmp::Ordering::Less => y,
        };
        self.store(c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000_000;
    const MIN: u64 = 60 * S;
    const T0: u64 = 1_795_394_400 * S; // a minute boundary

    fn sw(limit: u64) -> SlidingWindow {
        SlidingWindow { limit, window: MIN }
    }

    fn send(w: &SlidingWindow, state: State, now: u64, n: u64) -> (u64, State) {
        (0..n).fold((0, state), |(allowed, s), _| {
            let (d, next) = w.decide(s, now, 1);
            (allowed + u64::from(d.allowed), next)
        })
    }

    #[test]
    fn admits_the_limit_in_a_fresh_window() {
        let (allowed, _) = send(&sw(10), State::default(), T0 + 10 * S, 30);
        assert_eq!(allowed, 10);
    }

    #[test]
    fn the_previous_window_weighs_in_proportion_to_its_overlap() {
        let w = sw(10);
        let (_, state) = send(&w, State::default(), T0 + 59 * S, 10);
        // 15 s into the next window, 75 % of the previous window still counts: 7.5 -> 2 fit.
        let (allowed, _) = send(&w, state, T0 + MIN + 15 * S, 10);
        assert_eq!(allowed, 2);
        // Half-way: 5 count, 5 fit.
        let (allowed, _) = send(&w, state, T0 + MIN + 30 * S, 10);
        assert_eq!(allowed, 5);
    }

    #[test]
    fn retry_after_is_the_moment_the_weighted_count_makes_room() {
        let w = sw(10);
        let (_, state) = send(&w, State::default(), T0 + 59 * S, 10);
        let now = T0 + MIN + 15 * S;
        let (_, state) = send(&w, state, now, 2);
        let (d, _) = w.decide(state, now, 1);
        assert!(!d.allowed);
        // Needs 10 * (60 - e) / 60 + 3 <= 10, i.e. e >= 18 s: 3 s from now.
        assert_eq!(d.retry_after_nanos, 3 * S);
        assert!(!w.decide(state, now + d.retry_after_nanos - 1, 1).0.allowed);
        assert!(w.decide(state, now + d.retry_after_nanos, 1).0.allowed);
    }

    #[test]
    fn a_full_current_window_waits_into_the_next_one() {
        let w = sw(10);
        let (_, state) = send(&w, State::default(), T0, 10);
        let (d, _) = w.decide(state, T0, 1);
        // Next window: 10 * (60 - e) / 60 + 1 <= 10 -> e >= 6 s; 60 s + 6 s from now.
        assert_eq!(d.retry_after_nanos, 66 * S);
        assert!(w.decide(state, T0 + 66 * S, 1).0.allowed);
        assert!(!w.decide(state, T0 + 66 * S - 1, 1).0.allowed);
    }

    #[test]
    fn state_two_windows_old_is_forgotten() {
        let w = sw(3);
        let (_, state) = send(&w, State::default(), T0, 3);
        assert!(state.idle_at == T0 + 2 * MIN);
        let (allowed, _) = send(&w, state, T0 + 2 * MIN, 5);
        assert_eq!(allowed, 3);
    }

    /// Property: in any fixed window the admitted cost never exceeds the limit, and the weighted
    /// count the decision is based on never exceeds it either.
    #[test]
    fn no_aligned_window_admits_more_than_its_limit() {
        let mut rng = 0x9e37_79b9_7f4a_7c15u64;
        for limit in [1u64, 5, 50] {
            let w = SlidingWindow { limit, window: 10 * S };
            let mut state = State::default();
            let mut now = T0;
            let mut per_window = std::collections::HashMap::<u64, u64>::new();
            for _ in 0..5_000 {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                now += rng % S;
                let (d, next) = w.decide(state, now, 1);
                state = next;
                if d.allowed {
                    *per_window.entry(now / (10 * S)).or_default() += 1;
                    assert!(w.status(state, now).remaining <= limit);
                }
            }
            assert!(per_window.values().all(|&n| n <= limit), "limit {limit}");
        }
    }
}
