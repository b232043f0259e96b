//! Fixed windows: at most `limit` units per window, the count starting again at each window's
//! start. Windows of a fixed length are aligned to the Unix epoch (so `1h` windows start on the
//! hour and `1d` windows at UTC midnight); calendar months start on the first at 00:00 UTC.

use super::time::month_bounds;
use super::{Decision, State};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Window {
    /// A length in nanoseconds.
    Length(u64),
    /// The UTC calendar month.
    Month,
}

impl Window {
    /// (start, end) of the window containing `now`.
    pub fn bounds(self, now: u64) -> (u64, u64) {
        match self {
            Window::Length(length) => {
                let start = now - now % length;
                (start, start.saturating_add(length))
            }
            Window::Month => month_bounds(now),
        }
    }
}

/// The slot's words as a window's count: `idle_at` is the end of the window the count belongs
/// to, `word` the count.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WindowCount {
    pub end: u64,
    pub count: u64,
}

impl From<State> for WindowCount {
    fn from(s: State) -> WindowCount {
        WindowCount { end: s.idle_at, count: s.word }
    }
}

impl From<WindowCount> for State {
    fn from(w: WindowCount) -> State {
        State { idle_at: w.end, word: w.count }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FixedWindow {
    pub limit: u64,
    pub window: Window,
}

impl FixedWindow {
    /// The window and the count in it that apply at `now`. A state written for a later window (by
    /// a worker whose clock reading is a moment ahead) is taken as current.
    fn current(&self, state: State, now: u64) -> WindowCount {
        let (_, end) = self.window.bounds(now);
        let stored = WindowCount::from(state);
        if stored.end >= end {
            stored
        } else {
            WindowCount { end, count: 0 }
        }
    }

    pub fn decide(&self, state: State, now: u64, cost: u64) -> (Decision, State) {
        let WindowCount { end, count } = self.current(state, now);
        let until_end = end.saturating_sub(now);
        let used = count.saturating_add(cost);
        if used <= self.limit {
            let decision = Decision {
                allowed: true,
                remaining: self.limit - used,
                until_full_nanos: until_end,
                retry_after_nanos: 0,
            };
            (decision, WindowCount { end, count: used }.into())
        } else {
            let decision = Decision {
                allowed: false,
                remaining: self.limit.saturating_sub(count),
                until_full_nanos: until_end,
                retry_after_nanos: until_end,
            };
            (decision, state)
        }
    }

    pub fn status(&self, state: State, now: u64) -> Decision {
        let WindowCount { end, count } = self.current(state, now);
        let remaining = self.limit.saturating_sub(count);
        let until_full = if count == 0 { 0 } else { end.saturating_sub(now) };
        Decision { allowed: true, remaining, until_full_nanos: until_full, retry_after_nanos: 0 }
    }

    /// Counts `units` whatever is left: the count may pass the limit.
    pub fn charge(&self, state: State, now: u64, units: u64) -> State {
        let WindowCount { end, count } = self.current(state, now);
        WindowCount { end, count: count.saturating_add(units) }.into()
    }

    pub fn give_back(&self, state: State, now: u64, cost: u64) -> State {
        let WindowCount { end, count } = self.current(state, now);
        WindowCount { end, count: count.saturating_sub(cost) }.into()
    }

    pub fn merge(&self, a: State, b: State, now: u64) -> State {
        let (a, b) = (self.current(a, now), self.current(b, now));
        let merged = match a.end.cmp(&b.end) {
            std::cmp::Ordering::Equal => WindowCount { end: a.end, count: a.count.saturating_add(b.count) },
            std::cmp::Ordering::Greater => a,
            std::cmp::Ordering::Less => b,
        };
        merged.into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000_000;
    const MIN: u64 = 60 * S;
    /// 2026-11-23T00:40:00Z
    const NOW: u64 = 1_795_394_400 * S;

    fn run(w: &FixedWindow, state: State, now: u64, n: u64) -> (u64, State) {
        (0..n).fold((0, state), |(allowed, s), _| {
            let (d, next) = w.decide(s, now, 1);
            (allowed + u64::from(d.allowed), next)
        })
    }

    #[test]
    fn admits_the_limit_then_denies_until_the_window_ends() {
        let w = FixedWindow { limit: 10, window: Window::Length(MIN) };
        let (allowed, state) = run(&w, State::default(), NOW + 5 * S, 20);
        assert_eq!(allowed, 10);
        let (d, _) = w.decide(state, NOW + 5 * S, 1);
        assert_eq!((d.allowed, d.remaining, d.retry_after_nanos), (false, 0, 55 * S));
        assert!(!w.decide(state, NOW + MIN - 1, 1).0.allowed);
        let (d, _) = w.decide(state, NOW + MIN, 1);
        assert_eq!((d.allowed, d.remaining, d.reset_nanos()), (true, 9, MIN));
    }

    #[test]
    fn a_day_window_resets_at_utc_midnight() {
        let w = FixedWindow { limit: 10, window: Window::Length(86_400 * S) };
        let (d, _) = w.decide(State::default(), NOW, 1);
        assert_eq!(d.reset_nanos(), (86_400 - 40 * 60) * S, "23h20m to midnight");
    }

    #[test]
    fn a_month_window_resets_on_the_first() {
        let w = FixedWindow { limit: 999, window: Window::Month };
        let (d, state) = w.decide(State::default(), NOW, 1);
        assert_eq!(d.reset_nanos(), 1_796_083_200 * S - NOW);
        let (d, _) = w.decide(state, 1_796_083_200 * S, 1);
        assert_eq!(d.remaining, 998, "December starts afresh");
    }

    #[test]
    fn a_late_writer_from_the_previous_window_counts_in_the_new_one() {
        let w = FixedWindow { limit: 2, window: Window::Length(MIN) };
        let (_, state) = run(&w, State::default(), NOW + MIN, 2);
        assert!(!w.decide(state, NOW + MIN - 1, 1).0.allowed);
    }

    #[test]
    fn giving_back_and_merging_keep_counts_exact() {
        let w = FixedWindow { limit: 10, window: Window::Length(MIN) };
        let (_, a) = run(&w, State::default(), NOW, 3);
        let (_, b) = run(&w, State::default(), NOW, 4);
        let merged = w.merge(a, b, NOW);
        assert_eq!(WindowCount::from(merged).count, 7);
        assert_eq!(WindowCount::from(w.give_back(merged, NOW, 1)).count, 6);
        let old = w.merge(a, WindowCount { end: NOW - MIN, count: 9 }.into(), NOW);
        assert_eq!(WindowCount::from(old).count, 3, "an expired window adds nothing");
    }

    /// Property: over a random schedule, no window ever admits more than the limit.
    #[test]
    fn no_window_admits_more_than_its_limit() {
        let mut rng = 0x2545_f491_4f6c_dd1du64;
        for limit in [1u64, 3, 10] {
            let w = FixedWindow { limit, window: Window::Length(10 * S) };
            let mut state = State::default();
            let mut now = NOW;
            let mut per_window = std::collections::HashMap::<u64, u64>::new();
            for _ in 0..5_000 {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                now += rng % (2 * S);
                let cost = 1 + rng % limit;
                let (d, next) = w.decide(state, now, cost);
                state = next;
                if d.allowed {
                    *per_window.entry(now / (10 * S)).or_default() += cost;
                }
            }
            assert!(per_window.values().all(|&n| n <= limit), "limit {limit}: {per_window:?}");
        }
    }
}
