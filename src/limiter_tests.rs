//! Behaviour of the limiter against the in-memory store that imitates Envoy's shared data.

use std::collections::HashMap;
use std::sync::Mutex;

use crate::clock::{Clock, FakeClock};
use crate::config::Config;
use crate::keys::request_key;
use crate::limiter::{Limiter, Metric, Metrics, Report, Verdict};
use crate::request::TestRequest;
use crate::store::{MemoryStore, SharedStore};
use crate::table::{Applied, Lookup, TableEvents, SLOT_LEN};
use crate::token_bucket::BucketState;

const S: u64 = 1_000_000_000;
const T0: u64 = 1_800_000_000 * S;

#[derive(Default)]
struct Counts(Mutex<HashMap<Metric, u64>>);

impl Metrics for Counts {
    fn count(&self, metric: Metric) {
        *self.0.lock().unwrap().entry(metric).or_default() += 1;
    }
}

impl Counts {
    fn get(&self, metric: Metric) -> u64 {
        self.0.lock().unwrap().get(&metric).copied().unwrap_or(0)
    }
}

fn limiter(json: &str) -> (Limiter, MemoryStore) {
    let store = MemoryStore::new();
    let limiter = Limiter::new(Config::parse(json.as_bytes()).unwrap(), 42);
    limiter.table().initialize(&store).unwrap();
    (limiter, store)
}

fn per_key(capacity: u32, period: &str, extra: &str) -> String {
    format!(
        r#"{{"table_size":64{extra},"rules":[{{"name":"per-key","key":[{{"source":"header","name":"x-key"}}],"limit":{{"capacity":{capacity},"refill_period":"{period}"}}}}]}}"#
    )
}

fn keyed(key: &str) -> TestRequest {
    TestRequest::get("/").with_header("x-key", key)
}

fn allowed(v: Verdict) -> bool {
    matches!(v, Verdict::Allow { .. })
}

#[test]
fn denies_the_51st_request_on_a_fresh_key() {
    let (l, store) = limiter(&per_key(50, "24h", ""));
    let m = Counts::default();
    let admitted = (0..400).filter(|_| allowed(l.check(&store, &keyed("k"), T0, &m))).count();
    assert_eq!(admitted, 50);
    assert_eq!((m.get(Metric::Allowed(0)), m.get(Metric::Denied(0))), (50, 350));
}

#[test]
fn the_table_is_created_once_with_one_key_per_slot_plus_the_seed() {
    let (l, store) = limiter(&per_key(1, "1s", ""));
    l.table().shared_seed(&store, 7).unwrap();
    assert_eq!(store.len(), 64 + 1);
    let again = l.table().shared_seed(&store, 8).unwrap();
    assert_eq!(again, 7, "the first worker's seed wins");
}

#[test]
fn reports_remaining_and_reset_and_refills_after_waiting() {
    let (l, store) = limiter(&per_key(5, "1m", ""));
    let m = Counts::default();
    let clock = FakeClock::at(T0);
    let first = l.check(&store, &keyed("a"), clock.now_nanos(), &m);
    assert_eq!(first, Verdict::Allow { report: Some(Report { rule: 0, remaining: 4, reset_seconds: 12 }) });
    for _ in 0..4 {
        assert!(allowed(l.check(&store, &keyed("a"), clock.now_nanos(), &m)));
    }
    let denied = l.check(&store, &keyed("a"), clock.now_nanos(), &m);
    assert_eq!(
        denied,
        Verdict::Deny {
            report: Some(Report { rule: 0, remaining: 0, reset_seconds: 12 }),
            retry_after_seconds: 12
        }
    );
    clock.advance(12 * S);
    assert!(allowed(l.check(&store, &keyed("a"), clock.now_nanos(), &m)));
    assert!(!allowed(l.check(&store, &keyed("a"), clock.now_nanos(), &m)));
}

#[test]
fn a_request_without_the_key_part_is_not_limited_by_that_rule() {
    let (l, store) = limiter(&per_key(1, "1h", ""));
    let m = Counts::default();
    for _ in 0..10 {
        assert_eq!(l.check(&store, &TestRequest::get("/"), T0, &m), Verdict::Allow { report: None });
    }
}

const TWO_RULES: &str = r#"{"table_size":64,"rules":[
  {"name":"big","key":[{"source":"header","name":"x-key"}],"limit":{"capacity":100,"refill_period":"1h"}},
  {"name":"small","match":{"headers":[{"name":"x-tier","equals":"small"}]},
   "key":[{"source":"header","name":"x-key"}],"limit":{"capacity":2,"refill_period":"1h"}}]}"#;

#[test]
fn a_denial_by_one_rule_consumes_nothing_from_the_other() {
    let (l, store) = limiter(TWO_RULES);
    let m = Counts::default();
    let small = keyed("k").with_header("x-tier", "small");
    let mut admitted = 0;
    for _ in 0..12 {
        admitted += u64::from(allowed(l.check(&store, &small, T0, &m)));
    }
    assert_eq!(admitted, 2);
    match l.check(&store, &keyed("k"), T0, &m) {
        Verdict::Allow { report: Some(r) } => assert_eq!((r.rule, r.remaining), (0, 100 - 2 - 1)),
        other => panic!("expected an allowed request reporting rule big, got {other:?}"),
    }
}

#[test]
fn with_several_limits_the_lowest_remaining_is_reported() {
    let (l, store) = limiter(TWO_RULES);
    let m = Counts::default();
    let small = keyed("k").with_header("x-tier", "small");
    assert_eq!(
        l.check(&store, &small, T0, &m),
        Verdict::Allow { report: Some(Report { rule: 1, remaining: 1, reset_seconds: 1800 }) }
    );
}

#[test]
fn an_exhausted_key_stays_denied_after_a_flood_of_other_keys() {
    let (l, store) = limiter(&per_key(1, "24h", ""));
    let m = Counts::default();
    assert!(allowed(l.check(&store, &keyed("victim"), T0, &m)));
    assert!(!allowed(l.check(&store, &keyed("victim"), T0, &m)));
    let size_before = store.stored_bytes();
    for i in 0..20_000 {
        l.check(&store, &keyed(&format!("flood-{i}")), T0 + i, &m);
    }
    assert!(!allowed(l.check(&store, &keyed("victim"), T0 + 20_000, &m)));
    assert_eq!(store.stored_bytes(), size_before, "the table never grows");
    assert!(m.get(Metric::TableFull) > 0);
}

#[test]
fn a_full_table_denies_new_keys_when_told_to() {
    let (l, store) = limiter(&per_key(1, "24h", r#","when_table_full":"deny""#));
    let m = Counts::default();
    let mut denied_new = 0;
    for i in 0..200 {
        if !allowed(l.check(&store, &keyed(&format!("k{i}")), T0, &m)) {
            denied_new += 1;
        }
    }
    assert!(denied_new > 0);
    assert_eq!(m.get(Metric::TableFull), denied_new);
}

#[test]
fn refilled_slots_are_reused_by_new_keys() {
    let (l, store) = limiter(&per_key(1, "1s", ""));
    let m = Counts::default();
    for i in 0..64 {
        l.check(&store, &keyed(&format!("old{i}")), T0, &m);
    }
    for i in 0..64 {
        l.check(&store, &keyed(&format!("new{i}")), T0 + 2 * S, &m);
    }
    assert!(m.get(Metric::SlotReclaimed) > 0);
}

/// Finds a key value whose home slot (table of 8) is 0.
fn key_at_home_zero(l: &Limiter) -> (TestRequest, crate::keys::Fingerprint) {
    (0..1000)
        .map(|i| keyed(&format!("k{i}")))
        .find_map(|r| {
            let fp = request_key(42, &l.config().rules[0], &r)?;
            (fp.0 % 8 == 0).then_some((r, fp))
        })
        .unwrap()
}

/// Slot 0 holds a bucket that turns idle at `T0 + S`; slot 5 is free; the others stay live.
fn table_with_a_slot_about_to_idle() -> (Limiter, MemoryStore) {
    let (l, store) = limiter(
        r#"{"table_size":8,"rules":[{"name":"r","key":[{"source":"header","name":"x-key"}],"limit":{"capacity":2,"refill_period":"2s"}}]}"#,
    );
    let table = l.table();
    let mut e = TableEvents::default();
    for i in 0..1000u64 {
        let fp = crate::keys::Fingerprint(0x1000 + i);
        let lookup = table.lookup(&store, fp, T0).unwrap();
        let Lookup::Vacant(slot) = lookup else { break };
        let idle_at = if slot.index == 0 { T0 + S } else { T0 + 3600 * S };
        if slot.index == 5 {
            continue;
        }
        table
            .measure_and_replace(&store, fp, T0, Some(lookup), &mut e, |_| {
                ((), Some(BucketState { full_at: idle_at, updated_at: T0 }))
            })
            .unwrap();
    }
    (l, store)
}

fn consume(
    l: &Limiter,
    store: &MemoryStore,
    fp: crate::keys::Fingerprint,
    now: u64,
    first: Option<Lookup>,
) -> (bool, TableEvents) {
    let rule = &l.config().rules[0];
    let mut events = TableEvents::default();
    let applied = l
        .table()
        .measure_and_replace(store, fp, now, first, &mut events, |state| {
            let (d, next) = rule.bucket.decide(state, now, 1);
            (d.allowed, d.allowed.then_some(next))
        })
        .unwrap();
    (matches!(applied, Applied::Stored { .. }), events)
}

#[test]
fn two_workers_inserting_one_key_across_an_idling_slot_keep_one_bucket() {
    // Worker A's clock says slot 0 is idle, worker B's (a nanosecond earlier) says it is live, so
    // they pick different free slots for the same new key. B confirms last and folds.
    let (l, store) = table_with_a_slot_about_to_idle();
    let (_, fp) = key_at_home_zero(&l);
    let b_lookup = l.table().lookup(&store, fp, T0 + S - 1).unwrap();
    assert!(matches!(b_lookup, Lookup::Vacant(s) if s.index == 5));
    let (a_ok, _) = consume(&l, &store, fp, T0 + S, None);
    let (b_ok, b_events) = consume(&l, &store, fp, T0 + S - 1, Some(b_lookup));
    assert!(a_ok && b_ok);
    assert_eq!(b_events.duplicates_folded, 1);
    let (third, _) = consume(&l, &store, fp, T0 + S, None);
    assert!(!third, "capacity 2 is spent by A and B together");
}

#[test]
fn an_insert_confirmed_first_makes_the_racing_writer_retry_on_its_slot() {
    let (l, store) = table_with_a_slot_about_to_idle();
    let (_, fp) = key_at_home_zero(&l);
    let a_lookup = l.table().lookup(&store, fp, T0 + S).unwrap();
    assert!(matches!(a_lookup, Lookup::Vacant(s) if s.index == 0));
    let (b_ok, _) = consume(&l, &store, fp, T0 + S - 1, None);
    let (a_ok, _) = consume(&l, &store, fp, T0 + S, Some(a_lookup));
    assert!(a_ok && b_ok);
    let (third, _) = consume(&l, &store, fp, T0 + S, None);
    assert!(!third, "A found B's copy instead of creating a second bucket");
}

#[test]
fn unreadable_slot_bytes_are_treated_as_free_space() {
    let (l, store) = limiter(&per_key(1, "1h", ""));
    for i in 0..64 {
        store.set(&format!("ratelimit-wasm:{i}"), b"garbage", 0).unwrap();
    }
    let m = Counts::default();
    assert!(allowed(l.check(&store, &keyed("a"), T0, &m)));
    assert!(!allowed(l.check(&store, &keyed("a"), T0, &m)));
    assert_eq!(SLOT_LEN, 25);
}

#[test]
fn slots_missing_at_request_time_are_created_without_losing_updates() {
    let store = MemoryStore::new();
    let l = Limiter::new(Config::parse(per_key(3, "1h", "").as_bytes()).unwrap(), 42);
    let m = Counts::default();
    let admitted = (0..10).filter(|_| allowed(l.check(&store, &keyed("a"), T0, &m))).count();
    assert_eq!(admitted, 3);
}

/// A pseudo-random schedule of simulated workers, each one step at a time, with slightly
/// different clocks: no key may ever admit more than its capacity.
#[test]
fn interleaved_workers_with_skewed_clocks_never_exceed_capacity() {
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    for round in 0..50u64 {
        let (l, store) = limiter(&per_key(5, "24h", ""));
        let m = Counts::default();
        let key = keyed(&format!("round-{round}"));
        let mut admitted = 0;
        for _ in 0..40 {
            let skew = next() % 1000;
            admitted += usize::from(allowed(l.check(&store, &key, T0 + skew, &m)));
            // Noise from other keys in the same small table.
            let other = keyed(&format!("noise-{}", next() % 100));
            l.check(&store, &other, T0 + skew, &m);
        }
        assert_eq!(admitted, 5, "round {round}");
    }
}

#[cfg(not(target_family = "wasm"))]
#[test]
fn four_threads_on_one_fresh_key_admit_exactly_the_capacity() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    for round in 0..20 {
        let (l, store) = limiter(&per_key(50, "24h", ""));
        let admitted = AtomicUsize::new(0);
        let m = Counts::default();
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    for _ in 0..100 {
                        if allowed(l.check(&store, &keyed(&format!("fresh-{round}")), T0, &m)) {
                            admitted.fetch_add(1, Ordering::SeqCst);
                        }
                    }
                });
            }
        });
        assert_eq!(admitted.load(Ordering::SeqCst), 50, "round {round}");
    }
}
