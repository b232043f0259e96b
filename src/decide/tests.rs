//! Behaviour of the limiter against the in-memory store that imitates Envoy's shared data.

use std::collections::HashMap;
use std::sync::Mutex;

use crate::algorithm::State;
use crate::config::Config;
use crate::decide::{Env, Exchange, Limiter, Next, Verdict};
use crate::global::answer::CallError;
use crate::report::metrics::Metric;
use crate::report::violations::Violation;
use crate::report::Observer;
use crate::request::keys::request_key;
use crate::request::TestRequest;
use crate::state::clock::{Clock, FakeClock};
use crate::state::memory::{FailingStore, MemoryStore, Op};
use crate::state::slot::{REUSE_MARGIN_NANOS, SLOT_LEN};
use crate::state::store::SharedStore;
use crate::state::table::{Applied, Bucket, Lookup, Table, TableEvents};
use crate::state::Fingerprint;

const S: u64 = 1_000_000_000;
/// 2026-01-15T08:00:00Z
const T0: u64 = 1_768_464_000 * S;

#[derive(Default)]
struct Counts(Mutex<HashMap<Metric, u64>>, Mutex<Vec<String>>);

impl Observer for Counts {
    fn count(&self, metric: Metric) {
        self.add(metric, 1);
    }

    fn add(&self, metric: Metric, n: u64) {
        *self.0.lock().unwrap().entry(metric).or_default() += n;
    }

    fn violation(&self, violation: &Violation<'_>) {
        self.1.lock().unwrap().push(violation.render(0));
    }
}

impl Counts {
    fn get(&self, metric: Metric) -> u64 {
        self.0.lock().unwrap().get(&metric).copied().unwrap_or(0)
    }

    fn log(&self) -> Vec<String> {
        self.1.lock().unwrap().clone()
    }
}

/// (remaining, reset seconds) of the reported limit, and its name.
fn reported(l: &Limiter, v: &Verdict) -> Option<(String, u64, u64)> {
    let report = match v {
        Verdict::Allow { report, .. } | Verdict::Deny { report, .. } => report.as_ref()?,
    };
    Some((report.view(l.config()).name.to_owned(), report.remaining, report.reset_seconds))
}

fn retry_after(v: &Verdict) -> Option<u64> {
    match v {
        Verdict::Deny { retry_after_seconds, .. } => *retry_after_seconds,
        Verdict::Allow { .. } => None,
    }
}

/// Every slot of the limiter's table, as the root creates them at start-up.
fn whole_table(l: &Limiter) -> Table<'_> {
    Table::whole(&l.config().key_prefix, l.config().table_size)
}

/// The share of the table that rule `index` keeps its buckets in.
fn rule_table(l: &Limiter, index: usize) -> Table<'_> {
    l.table(l.config().rules[index].table.unwrap())
}

fn limiter(json: &str) -> (Limiter, MemoryStore) {
    let store = MemoryStore::new();
    let limiter = Limiter::new(Config::parse(json.as_bytes()).unwrap(), 42);
    whole_table(&limiter).initialize(&store).unwrap();
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
    let admitted = (0..400).filter(|_| allowed(l.check(&Env::at(&store, &keyed("k"), T0, &m)))).count();
    assert_eq!(admitted, 50);
    assert_eq!((m.get(Metric::Allowed(0)), m.get(Metric::Denied(0))), (50, 350));
}

#[test]
fn the_table_is_created_once_with_one_key_per_slot_plus_the_seed() {
    let (l, store) = limiter(&per_key(1, "1s", ""));
    whole_table(&l).shared_seed(&store, 7).unwrap();
    assert_eq!(store.len(), 64 + 1);
    let again = whole_table(&l).shared_seed(&store, 8).unwrap();
    assert_eq!(again, 7, "the first worker's seed wins");
}

#[test]
fn reports_remaining_and_reset_and_refills_after_waiting() {
    let (l, store) = limiter(&per_key(5, "1m", ""));
    let m = Counts::default();
    let clock = FakeClock::at(T0);
    let first = l.check(&Env::at(&store, &keyed("a"), clock.now_nanos(), &m));
    assert!(allowed(first.clone()));
    assert_eq!(reported(&l, &first), Some(("per-key".into(), 4, 12)));
    for _ in 0..4 {
        assert!(allowed(l.check(&Env::at(&store, &keyed("a"), clock.now_nanos(), &m))));
    }
    let denied = l.check(&Env::at(&store, &keyed("a"), clock.now_nanos(), &m));
    assert!(!allowed(denied.clone()));
    assert_eq!(reported(&l, &denied), Some(("per-key".into(), 0, 12)));
    assert_eq!(retry_after(&denied), Some(12));
    clock.advance(12 * S);
    assert!(allowed(l.check(&Env::at(&store, &keyed("a"), clock.now_nanos(), &m))));
    assert!(!allowed(l.check(&Env::at(&store, &keyed("a"), clock.now_nanos(), &m))));
}

#[test]
fn a_request_without_the_key_part_is_not_limited_by_that_rule() {
    let (l, store) = limiter(&per_key(1, "1h", ""));
    let m = Counts::default();
    for _ in 0..10 {
        assert!(matches!(
            l.check(&Env::at(&store, &TestRequest::get("/"), T0, &m)),
            Verdict::Allow { report: None, .. }
        ));
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
        admitted += u64::from(allowed(l.check(&Env::at(&store, &small, T0, &m))));
    }
    assert_eq!(admitted, 2);
    let v = l.check(&Env::at(&store, &keyed("k"), T0, &m));
    assert!(allowed(v.clone()));
    assert_eq!(reported(&l, &v).map(|r| (r.0, r.1)), Some(("big".into(), 100 - 2 - 1)));
}

#[test]
fn with_several_limits_the_lowest_remaining_is_reported() {
    let (l, store) = limiter(TWO_RULES);
    let m = Counts::default();
    let small = keyed("k").with_header("x-tier", "small");
    assert_eq!(reported(&l, &l.check(&Env::at(&store, &small, T0, &m))), Some(("small".into(), 1, 1800)));
}

#[test]
fn an_exhausted_key_stays_denied_after_a_flood_of_other_keys() {
    let (l, store) = limiter(&per_key(1, "24h", ""));
    let m = Counts::default();
    assert!(allowed(l.check(&Env::at(&store, &keyed("victim"), T0, &m))));
    assert!(!allowed(l.check(&Env::at(&store, &keyed("victim"), T0, &m))));
    let size_before = store.stored_bytes();
    for i in 0..20_000 {
        l.check(&Env::at(&store, &keyed(&format!("flood-{i}")), T0 + i, &m));
    }
    assert!(!allowed(l.check(&Env::at(&store, &keyed("victim"), T0 + 20_000, &m))));
    assert_eq!(store.stored_bytes(), size_before, "the table never grows");
    assert!(m.get(Metric::TableFull(0)) > 0);
}

/// The audit's case: a day-long limit keyed on a header the client chooses, next to a login limit
/// per client address.
const FLOOD_AND_LOGIN: &str = r#"{"table_size":256,"rules":[
  {"name":"api","match":{"path_prefix":"/api/"},"key":[{"source":"header","name":"x-api-key"}],
   "limit":{"algorithm":"fixed_window","requests":100,"window":"day"}},
  {"name":"login","match":{"path":"/login"},"key":[{"source":"client_address"}],
   "limit":{"algorithm":"fixed_window","requests":3,"window":"1h"}}]}"#;

#[test]
fn a_flood_of_new_keys_on_one_rule_never_changes_another_rules_decisions() {
    let (l, store) = limiter(FLOOD_AND_LOGIN);
    let m = Counts::default();
    for i in 0..3_000 {
        let api = TestRequest::get("/api/x").with_header("x-api-key", format!("flood-{i}"));
        l.check(&Env::at(&store, &api, T0, &m));
    }
    assert!(m.get(Metric::TableFull(0)) > 0, "the flood filled the api rule's share");
    let mut admitted = 0;
    for client in 0..20 {
        let login = TestRequest::get("/login").with_source(&format!("10.0.0.{client}:5000"));
        for _ in 0..5 {
            admitted += u64::from(allowed(l.check(&Env::at(&store, &login, T0, &m))));
        }
    }
    assert_eq!(admitted, 20 * 3, "each new client gets exactly its 3 logins");
    assert_eq!(m.get(Metric::TableFull(1)), 0);
}

#[test]
fn a_rule_can_deny_new_keys_when_its_share_is_full_while_another_lets_them_through() {
    let json = FLOOD_AND_LOGIN
        .replace(r#""name":"api","#, r#""name":"api","table_size":8,"when_table_full":"deny","#)
        .replace(r#""name":"login","#, r#""name":"login","table_size":8,"#);
    let (l, store) = limiter(&json);
    let m = Counts::default();
    let (mut api_admitted, mut login_admitted) = (0, 0);
    for i in 0..100 {
        let api = TestRequest::get("/api/x").with_header("x-api-key", format!("k{i}"));
        api_admitted += u64::from(allowed(l.check(&Env::at(&store, &api, T0, &m))));
        let login = TestRequest::get("/login").with_source(&format!("10.0.1.{i}:5000"));
        login_admitted += u64::from(allowed(l.check(&Env::at(&store, &login, T0, &m))));
    }
    assert_eq!(api_admitted, 8, "8 slots, then new keys are denied");
    assert_eq!(login_admitted, 100, "the default policy lets untracked keys through");
    assert_eq!((m.get(Metric::TableFull(0)), m.get(Metric::TableFull(1))), (92, 92));
}

#[test]
fn a_full_table_denies_new_keys_when_told_to() {
    let (l, store) = limiter(&per_key(1, "24h", r#","when_table_full":"deny""#));
    let m = Counts::default();
    let mut denied_new = 0;
    for i in 0..200 {
        if !allowed(l.check(&Env::at(&store, &keyed(&format!("k{i}")), T0, &m))) {
            denied_new += 1;
        }
    }
    assert!(denied_new > 0);
    assert_eq!(m.get(Metric::TableFull(0)), denied_new);
}

#[test]
fn refilled_slots_are_reused_by_new_keys() {
    let (l, store) = limiter(&per_key(1, "1s", ""));
    let m = Counts::default();
    for i in 0..64 {
        l.check(&Env::at(&store, &keyed(&format!("old{i}")), T0, &m));
    }
    for i in 0..64 {
        l.check(&Env::at(&store, &keyed(&format!("new{i}")), T0 + 2 * S, &m));
    }
    assert!(m.get(Metric::SlotReclaimed) > 0);
}

/// Finds a key value whose home slot (table of 8) is 0.
fn key_at_home_zero(l: &Limiter) -> (TestRequest, Fingerprint) {
    (0..1000)
        .map(|i| keyed(&format!("k{i}")))
        .find_map(|r| {
            let fp = request_key(42, &l.config().rules[0], &r)?.limit(
                None,
                0,
                crate::config::LimitKind::TokenBucket,
            );
            (fp.0 % 8 == 0).then_some((r, fp))
        })
        .unwrap()
}

/// Slot 0 holds a bucket that becomes free for another key at `T0 + S` (its state idles a reuse
/// margin earlier); slot 5 is free; the others stay live.
fn table_with_a_slot_about_to_idle() -> (Limiter, MemoryStore) {
    let (l, store) = limiter(
        r#"{"table_size":8,"rules":[{"name":"r","key":[{"source":"header","name":"x-key"}],"limit":{"capacity":2,"refill_period":"2s"}}]}"#,
    );
    let table = rule_table(&l, 0);
    let mut e = TableEvents::default();
    for i in 0..1000u64 {
        let fp = Fingerprint(0x1000 + i);
        let lookup = table.lookup(&store, fp, T0).unwrap();
        let Lookup::Vacant(slot) = lookup else { break };
        let idle_at = if slot.index == 0 { T0 + S - REUSE_MARGIN_NANOS } else { T0 + 3600 * S };
        if slot.index == 5 {
            continue;
        }
        let algorithm = l.config().rules[0].limits.all().next().unwrap().algorithm;
        table
            .measure_and_replace(
                &store,
                Bucket { fp, algorithm: &algorithm, now: T0 },
                Some(lookup),
                &mut e,
                |_| ((), Some(State { idle_at, word: T0 })),
            )
            .unwrap();
    }
    (l, store)
}

fn consume(
    l: &Limiter,
    store: &MemoryStore,
    fp: Fingerprint,
    now: u64,
    first: Option<Lookup>,
) -> (bool, TableEvents) {
    let algorithm = l.config().rules[0].limits.all().next().unwrap().algorithm;
    let mut events = TableEvents::default();
    let applied = rule_table(l, 0)
        .measure_and_replace(store, Bucket { fp, algorithm: &algorithm, now }, first, &mut events, |state| {
            let (d, next) = algorithm.decide(state, now, 1);
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
    let b_lookup = rule_table(&l, 0).lookup(&store, fp, T0 + S - 1).unwrap();
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
    let a_lookup = rule_table(&l, 0).lookup(&store, fp, T0 + S).unwrap();
    assert!(matches!(a_lookup, Lookup::Vacant(s) if s.index == 0));
    let (b_ok, _) = consume(&l, &store, fp, T0 + S - 1, None);
    let (a_ok, a_events) = consume(&l, &store, fp, T0 + S, Some(a_lookup));
    assert!(a_ok && b_ok);
    assert_eq!(a_events.cas_retries, 1, "A's first write lost the race and was counted");
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
    assert!(allowed(l.check(&Env::at(&store, &keyed("a"), T0, &m))));
    assert!(!allowed(l.check(&Env::at(&store, &keyed("a"), T0, &m))));
    assert_eq!(SLOT_LEN, 25);
}

#[test]
fn slots_missing_at_request_time_are_created_without_losing_updates() {
    let store = MemoryStore::new();
    let l = Limiter::new(Config::parse(per_key(3, "1h", "").as_bytes()).unwrap(), 42);
    let m = Counts::default();
    let admitted = (0..10).filter(|_| allowed(l.check(&Env::at(&store, &keyed("a"), T0, &m)))).count();
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
            admitted += usize::from(allowed(l.check(&Env::at(&store, &key, T0 + skew, &m))));
            // Noise from other keys in the same small table.
            let other = keyed(&format!("noise-{}", next() % 100));
            l.check(&Env::at(&store, &other, T0 + skew, &m));
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
                        if allowed(l.check(&Env::at(&store, &keyed(&format!("fresh-{round}")), T0, &m))) {
                            admitted.fetch_add(1, Ordering::SeqCst);
                        }
                    }
                });
            }
        });
        assert_eq!(admitted.load(Ordering::SeqCst), 50, "round {round}");
    }
}

// ---------------------------------------------------------------------------------------------
// Policies: algorithms, several limits, plans, costs, shadow mode, status, violation log.

fn rule_json(name: &str, body: &str) -> String {
    format!(
        r#"{{"table_size":256,"rules":[{{"name":"{name}","key":[{{"source":"header","name":"x-key"}}],{body}}}]}}"#
    )
}

#[test]
fn every_algorithm_admits_exactly_its_quota_on_a_fresh_key() {
    for limit in [
        r#"{"algorithm":"token_bucket","capacity":5,"refill_period":"1h"}"#,
        r#"{"algorithm":"gcra","requests":5,"period":"1h","burst":5}"#,
        r#"{"algorithm":"fixed_window","requests":5,"window":"1h"}"#,
        r#"{"algorithm":"sliding_window","requests":5,"window":"1h"}"#,
        r#"{"algorithm":"fixed_window","requests":5,"window":"month"}"#,
    ] {
        let (l, store) = limiter(&rule_json("r", &format!(r#""limit":{limit}"#)));
        let m = Counts::default();
        let admitted = (0..20).filter(|_| allowed(l.check(&Env::at(&store, &keyed("k"), T0, &m)))).count();
        assert_eq!(admitted, 5, "{limit}");
    }
}

#[test]
fn gcra_with_the_default_burst_spaces_requests_evenly() {
    let (l, store) = limiter(&rule_json("r", r#""limit":{"algorithm":"gcra","requests":10,"period":"1s"}"#));
    let m = Counts::default();
    assert!(allowed(l.check(&Env::at(&store, &keyed("k"), T0, &m))));
    assert!(!allowed(l.check(&Env::at(&store, &keyed("k"), T0 + 50_000_000, &m))));
    assert!(allowed(l.check(&Env::at(&store, &keyed("k"), T0 + 100_000_000, &m))));
    let v = l.check(&Env::at(&store, &keyed("k"), T0 + 100_000_000, &m));
    assert_eq!(reported(&l, &v).map(|r| r.0), Some("r".into()));
}

const PER_SECOND_AND_DAY: &str = r#""limits":[
    {"name":"second","algorithm":"fixed_window","requests":3,"window":"1s"},
    {"name":"day","algorithm":"fixed_window","requests":5,"window":"day"}]"#;

#[test]
fn several_limits_on_one_rule_must_all_pass_and_a_denial_consumes_from_none() {
    let (l, store) = limiter(&rule_json("api", PER_SECOND_AND_DAY));
    let m = Counts::default();
    let admitted = (0..10).filter(|_| allowed(l.check(&Env::at(&store, &keyed("k"), T0, &m)))).count();
    assert_eq!(admitted, 3, "the per-second limit bites first");
    // Seven denials by the per-second limit took nothing from the daily one: 2 more pass.
    let later = (0..10).filter(|_| allowed(l.check(&Env::at(&store, &keyed("k"), T0 + 2 * S, &m)))).count();
    assert_eq!(later, 2);
    let v = l.check(&Env::at(&store, &keyed("k"), T0 + 4 * S, &m));
    assert_eq!(reported(&l, &v).map(|r| (r.0, r.1)), Some(("api.day".into(), 0)));
}

#[test]
fn a_daily_quota_resets_at_utc_midnight_and_says_so() {
    let (l, store) =
        limiter(&rule_json("ai", r#""limit":{"algorithm":"fixed_window","requests":2,"window":"day"}"#));
    let m = Counts::default();
    // T0 is 2026-01-15T08:00:00Z: 16 h to midnight.
    let v = l.check(&Env::at(&store, &keyed("k"), T0, &m));
    assert_eq!(reported(&l, &v), Some(("ai".into(), 1, 16 * 3600)));
    l.check(&Env::at(&store, &keyed("k"), T0, &m));
    assert_eq!(retry_after(&l.check(&Env::at(&store, &keyed("k"), T0, &m))), Some(16 * 3600));
    assert!(allowed(l.check(&Env::at(&store, &keyed("k"), T0 + 16 * 3600 * S, &m))));
}

const PLANS: &str = r#""plan":{"header":"x-plan"},"default_plan":"free","plans":{
    "free":{"limit":{"algorithm":"fixed_window","requests":2,"window":"1m"}},
    "premium":{"limit":{"algorithm":"fixed_window","requests":5,"window":"1m"}},
    "enterprise":{"unlimited":true}}"#;

#[test]
fn each_plan_has_its_own_limits_and_unknown_plans_get_the_default() {
    let (l, store) = limiter(&rule_json("api", PLANS));
    let m = Counts::default();
    let count = |key: &str, plan: Option<&str>| {
        let req = match plan {
            Some(p) => keyed(key).with_header("x-plan", p),
            None => keyed(key),
        };
        (0..20).filter(|_| allowed(l.check(&Env::at(&store, &req, T0, &m)))).count()
    };
    assert_eq!(count("a", Some("free")), 2);
    assert_eq!(count("b", Some("premium")), 5);
    assert_eq!(count("c", Some("enterprise")), 20);
    assert_eq!(count("d", Some("platinum")), 2, "unknown plan: the default");
    assert_eq!(count("e", None), 2, "no plan: the default");
}

#[test]
fn the_plan_can_come_from_a_jwt_claim() {
    let json = rule_json("api", &PLANS.replace(r#"{"header":"x-plan"}"#, r#"{"jwt_claim":"plan"}"#));
    let (l, store) = limiter(&json);
    let m = Counts::default();
    let token = |plan: &str| {
        let payload = format!(r#"{{"sub":"u","plan":"{plan}"}}"#);
        format!("Bearer eyJhbGciOiJub25lIn0.{}.", base64url(payload.as_bytes()))
    };
    let premium = keyed("a").with_header("authorization", token("premium"));
    assert_eq!((0..20).filter(|_| allowed(l.check(&Env::at(&store, &premium, T0, &m)))).count(), 5);
    let free = keyed("b").with_header("authorization", token("free"));
    assert_eq!((0..20).filter(|_| allowed(l.check(&Env::at(&store, &free, T0, &m)))).count(), 2);
    let garbage = keyed("c").with_header("authorization", "Bearer not-a-jwt");
    assert_eq!((0..20).filter(|_| allowed(l.check(&Env::at(&store, &garbage, T0, &m)))).count(), 2);
}

fn base64url(bytes: &[u8]) -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk.iter().enumerate().fold(0u32, |acc, (i, &b)| acc | (u32::from(b) << (16 - 8 * i)));
        for i in 0..=chunk.len() {
            out.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
        }
    }
    out
}

const HEADER_COST: &str =
    r#""limit":{"capacity":10,"refill_period":"1h"},"cost":{"header":"x-cost","max":20,"default":2}"#;

#[test]
fn cost_comes_from_a_header_with_a_default() {
    let (l, store) = limiter(&rule_json("r", HEADER_COST));
    let m = Counts::default();
    let v = l.check(&Env::at(&store, &keyed("k").with_header("x-cost", "7"), T0, &m));
    assert_eq!(reported(&l, &v).map(|r| r.1), Some(3));
    let v = l.check(&Env::at(&store, &keyed("k"), T0, &m));
    assert_eq!(reported(&l, &v).map(|r| r.1), Some(1), "no header: the default cost of 2");
}

#[test]
fn a_cost_above_the_capacity_or_the_maximum_is_denied_with_a_reason() {
    let (l, store) = limiter(&rule_json("r", HEADER_COST));
    let m = Counts::default();
    let reason = |cost: &str| match l.check(&Env::at(&store, &keyed("k").with_header("x-cost", cost), T0, &m))
    {
        Verdict::Deny { reason, retry_after_seconds: None, report: None } => reason.map(|r| r.to_string()),
        other => panic!("expected a denial without Retry-After, got {other:?}"),
    };
    assert_eq!(reason("11").as_deref(), Some("cost 11 exceeds the capacity 10 of limit \"r\""));
    assert_eq!(reason("21").as_deref(), Some("cost 21 from x-cost exceeds the maximum 20"));
    assert_eq!(reason("-1").as_deref(), Some("x-cost must be a positive whole number"));
    assert_eq!(reason("0").as_deref(), Some("x-cost must be a positive whole number"));
    // None of that consumed anything.
    let v = l.check(&Env::at(&store, &keyed("k").with_header("x-cost", "10"), T0, &m));
    assert!(allowed(v));
    assert_eq!(m.get(Metric::Denied(0)), 4);
}

#[test]
fn a_shadow_rule_counts_logs_and_reports_but_never_denies() {
    let json = rule_json("r", r#""limit":{"capacity":2,"refill_period":"1h"},"shadow":true"#);
    let (l, store) = limiter(&json);
    let m = Counts::default();
    let verdicts: Vec<_> = (0..5).map(|_| l.check(&Env::at(&store, &keyed("k"), T0, &m))).collect();
    assert!(verdicts.iter().all(|v| matches!(v, Verdict::Allow { .. })));
    assert_eq!(reported(&l, &verdicts[4]).map(|r| r.1), Some(0));
    assert_eq!(m.get(Metric::ShadowDenied(0)), 3);
    assert_eq!(m.get(Metric::Denied(0)), 0);
    assert_eq!(m.log().len(), 3);
    assert!(m.log()[0].starts_with("ratelimit-wasm: shadow-denied rule=\"r\""));
}

#[test]
fn a_shadow_rule_does_not_block_an_enforced_one_nor_the_reverse() {
    let json = r#"{"table_size":256,"rules":[
        {"name":"shadow","key":[{"source":"header","name":"x-key"}],"limit":{"capacity":1,"refill_period":"1h"},"shadow":true},
        {"name":"real","key":[{"source":"header","name":"x-key"}],"limit":{"capacity":3,"refill_period":"1h"}}]}"#;
    let (l, store) = limiter(json);
    let m = Counts::default();
    let admitted = (0..10).filter(|_| allowed(l.check(&Env::at(&store, &keyed("k"), T0, &m)))).count();
    assert_eq!(admitted, 3);
}

#[test]
fn the_status_reports_every_applicable_limit_without_consuming() {
    let (l, store) = limiter(&rule_json("api", PER_SECOND_AND_DAY));
    let m = Counts::default();
    l.check(&Env::at(&store, &keyed("k"), T0, &m));
    for _ in 0..3 {
        let standings = l.standings(&Env::at(&store, &keyed("k"), T0, &Counts::default())).unwrap();
        let summary: Vec<_> = standings.iter().map(|s| (s.of.name(), s.remaining)).collect();
        assert_eq!(summary, vec![("api.second", 2), ("api.day", 4)]);
    }
    let json = crate::report::status::status_json(
        &l.standings(&Env::at(&store, &keyed("k"), T0, &Counts::default())).unwrap(),
        None,
    );
    assert!(json.starts_with(r#"{"limits":[{"rule":"api","limit":"api.second","algorithm":"fixed_window","quota":3,"window":1,"remaining":2,"reset":1,"shadow":false,"global":false}"#), "{json}");
    assert!(
        l.standings(&Env::at(&store, &TestRequest::get("/"), T0, &Counts::default())).unwrap().is_empty(),
        "no key, no limits"
    );
}

#[test]
fn the_violation_log_names_rule_plan_and_a_key_hash_not_the_key() {
    let (l, store) = limiter(&rule_json("api", PLANS));
    let m = Counts::default();
    for _ in 0..3 {
        l.check(&Env::at(&store, &keyed("secret-user").with_header("x-plan", "free"), T0, &m));
    }
    let log = m.log();
    assert_eq!(log.len(), 1);
    assert!(
        log[0]
            .starts_with("ratelimit-wasm: denied rule=\"api\" limit=\"api\" plan=\"free\" cost=1 key_hash="),
        "{}",
        log[0]
    );
    assert!(!log[0].contains("secret-user"));
}

#[test]
fn the_violation_log_can_include_the_raw_key() {
    let json = rule_json("api", r#""limit":{"capacity":1,"refill_period":"1h"}"#)
        .replace(r#"{"table_size""#, r#"{"violation_log":{"include_key":true},"table_size""#);
    let (l, store) = limiter(&json);
    let m = Counts::default();
    l.check(&Env::at(&store, &keyed("alice"), T0, &m));
    l.check(&Env::at(&store, &keyed("alice"), T0, &m));
    assert!(m.log()[0].contains(" key=\"alice\""), "{}", m.log()[0]);
}

// ---------------------------------------------------------------------------------------------
// Global rules: what the service's answer (or its absence) means.

mod global {
    use super::*;
    use crate::global::answer::{Answer, CallError, LimitStatus};
    use crate::global::descriptors::prepare;
    use crate::global::verdict::{standings, verdict};
    use crate::global::Purpose;

    const CONFIG: &str = r#"{"global":{"cluster":"rls","domain":"edge"},"rules":[
        {"name":"local","key":[{"source":"header","name":"x-key"}],"limit":{"capacity":5,"refill_period":"1h"}},
        {"name":"open","global":true,"key":[{"source":"header","name":"x-key"}],
         "limit":{"algorithm":"fixed_window","requests":10,"window":"1m"}},
        {"name":"closed","global":true,"failure_mode":"deny","match":{"path_prefix":"/pay"},
         "key":[{"source":"header","name":"x-key"}],"limit":{"algorithm":"fixed_window","requests":3,"window":"1s"}}]}"#;

    fn status(over: bool, remaining: u64, reset: u64) -> LimitStatus {
        LimitStatus { over_limit: over, quota: 10, window_seconds: 60, remaining, reset_seconds: reset }
    }

    #[test]
    fn local_rules_ignore_global_ones_and_report_what_they_took() {
        let (l, store) = limiter(CONFIG);
        let m = Counts::default();
        match l.check(&Env::at(&store, &keyed("k"), T0, &m)) {
            Verdict::Allow { report: Some(r), consumed, .. } => {
                assert_eq!(l.config().find(r.limit).unwrap().name(), "local");
                assert_eq!(consumed.len(), 1);
                l.give_back(&Env::at(&store, &keyed("k"), T0, &m), &consumed);
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            l.standings(&Env::at(&store, &keyed("k"), T0, &Counts::default())).unwrap()[0].remaining,
            5,
            "given back"
        );
    }

    #[test]
    fn an_over_limit_answer_denies_with_the_service_reset() {
        let (l, _) = limiter(CONFIG);
        let m = Counts::default();
        let call = prepare(l.config(), &keyed("k"), Purpose::Decide).unwrap().unwrap();
        let answer = Answer { over_limit: true, limits: vec![(0, status(true, 0, 42))], ..Answer::default() };
        let v = verdict(l.config(), &call, Ok(answer), &m);
        assert!(v.deny);
        assert_eq!(v.retry_after_seconds, Some(42));
        assert_eq!(
            v.report.map(|r| r.view(l.config())).map(|r| (r.name, r.remaining, r.reset_seconds)),
            Some(("open", 0, 42))
        );
        assert_eq!(m.get(Metric::Denied(1)), 1);
    }

    #[test]
    fn an_ok_answer_reports_the_most_restrictive_status() {
        let (l, _) = limiter(CONFIG);
        let m = Counts::default();
        let call = prepare(l.config(), &TestRequest::get("/pay").with_header("x-key", "k"), Purpose::Decide)
            .unwrap()
            .unwrap();
        assert_eq!(call.origins.len(), 2);
        let answer = Answer {
            over_limit: false,
            limits: vec![(0, status(false, 7, 30)), (1, status(false, 2, 1))],
            ..Answer::default()
        };
        let v = verdict(l.config(), &call, Ok(answer), &m);
        assert!(!v.deny);
        assert_eq!(v.report.map(|r| r.view(l.config())).map(|r| (r.name, r.remaining)), Some(("closed", 2)));
        assert_eq!(m.get(Metric::Allowed(1)) + m.get(Metric::Allowed(2)), 2);
    }

    #[test]
    fn the_status_asks_the_service_with_zero_hits_whatever_the_path() {
        let (l, _) = limiter(CONFIG);
        // The status request's own path: `closed` (path /pay) still applies, by its key alone.
        let call = prepare(
            l.config(),
            &TestRequest::get("/ratelimit/status").with_header("x-key", "k"),
            Purpose::Status,
        )
        .unwrap()
        .unwrap();
        let sent =
            <crate::global::protocol::RateLimitRequest as prost::Message>::decode(call.message.as_slice())
                .unwrap();
        let hits: Vec<_> = sent.descriptors.iter().map(|d| d.hits_addend.as_ref().map(|h| h.value)).collect();
        assert_eq!(hits, vec![Some(0), Some(0)]);
        assert_eq!(
            prepare(l.config(), &TestRequest::get("/ratelimit/status"), Purpose::Status),
            Ok(None),
            "no key"
        );
    }

    #[test]
    fn global_standings_name_each_limit_and_count_nothing() {
        let (l, _) = limiter(CONFIG);
        let call = prepare(l.config(), &TestRequest::get("/s").with_header("x-key", "k"), Purpose::Status)
            .unwrap()
            .unwrap();
        let answer = Answer {
            over_limit: false,
            limits: vec![(0, status(false, 7, 30)), (1, status(true, 0, 1))],
            ..Answer::default()
        };
        let m = Counts::default();
        let reported = standings(l.config(), &call, Ok(answer), &m).unwrap();
        assert!(m.0.lock().unwrap().is_empty(), "a status call decides no request");
        let json = crate::report::status::status_json(&reported, None);
        assert_eq!(
            json,
            r#"{"limits":[{"rule":"open","limit":"open","algorithm":"fixed_window","quota":10,"window":60,"remaining":7,"reset":30,"shadow":false,"global":true},{"rule":"closed","limit":"closed","algorithm":"fixed_window","quota":10,"window":60,"remaining":0,"reset":1,"shadow":false,"global":true}]}"#
        );
        let failed =
            standings(l.config(), &call, Err(CallError::Status { code: 14, message: String::new() }), &m)
                .map(|_| ())
                .unwrap_err();
        assert_eq!(m.get(Metric::GlobalFailure), 1);
        let failed = crate::report::status::status_json(&[], Some(&failed.to_string()));
        assert_eq!(
            failed,
            r#"{"limits":[],"global_error":"gRPC status 14 UNAVAILABLE (the service is down or unreachable, or the cluster does not speak HTTP/2: Envoy's reason follows)"}"#
        );
    }

    #[test]
    fn a_failure_applies_the_failure_mode_of_the_rules_involved() {
        let (l, _) = limiter(CONFIG);
        let m = Counts::default();
        let open = prepare(l.config(), &keyed("k"), Purpose::Decide).unwrap().unwrap();
        assert!(
            !verdict(l.config(), &open, Err(CallError::Status { code: 4, message: String::new() }), &m).deny
        );
        let both = prepare(l.config(), &TestRequest::get("/pay").with_header("x-key", "k"), Purpose::Decide)
            .unwrap()
            .unwrap();
        let v = verdict(l.config(), &both, Err(CallError::Status { code: 4, message: String::new() }), &m);
        assert!(v.deny);
        assert_eq!(v.retry_after_seconds, Some(1));
        assert_eq!(m.get(Metric::GlobalFailure), 2);
    }
}

#[test]
fn a_new_key_in_a_sparse_table_costs_three_reads_and_two_writes() {
    // The scans stop at the first slot no key has used: no need to read the whole window.
    let (l, store) = limiter(&per_key(5, "1h", ""));
    let m = Counts::default();
    let before = store.calls();
    assert!(allowed(l.check(&Env::at(&store, &keyed("fresh"), T0, &m))));
    let after = store.calls();
    assert_eq!((after.0 - before.0, after.1 - before.1), (3, 2));
    let before = store.calls();
    l.check(&Env::at(&store, &keyed("fresh"), T0, &m));
    let after = store.calls();
    assert_eq!((after.0 - before.0, after.1 - before.1), (1, 1), "a known key: one read, one write");
}

/// A limiter with another configuration over the same shared data, as after a configuration push.
fn reconfigured(json: &str, store: &MemoryStore) -> Limiter {
    let limiter = Limiter::new(Config::parse(json.as_bytes()).unwrap(), 42);
    whole_table(&limiter).initialize(store).unwrap();
    limiter
}

#[test]
fn a_pushed_configuration_keeps_what_clients_used() {
    let (l, store) = limiter(&rule_json("api", r#""limit":{"capacity":2,"refill_period":"1h"}"#));
    let m = Counts::default();
    assert_eq!((0..3).filter(|_| allowed(l.check(&Env::at(&store, &keyed("k"), T0, &m)))).count(), 2);
    // Same rule, twice the capacity at the same rate per token: the bucket keeps the time until it
    // is full again (1 h), which is 2 of the new 4 tokens.
    let doubled = reconfigured(&rule_json("api", r#""limit":{"capacity":4,"refill_period":"2h"}"#), &store);
    assert_eq!(
        doubled.standings(&Env::at(&store, &keyed("k"), T0, &Counts::default())).unwrap()[0].remaining,
        2
    );
    assert_eq!((0..3).filter(|_| allowed(doubled.check(&Env::at(&store, &keyed("k"), T0, &m)))).count(), 2);
}

#[test]
fn a_limit_whose_algorithm_changes_starts_afresh_instead_of_misreading_the_state() {
    let (l, store) = limiter(&rule_json("api", r#""limit":{"capacity":2,"refill_period":"1h"}"#));
    let m = Counts::default();
    assert_eq!((0..3).filter(|_| allowed(l.check(&Env::at(&store, &keyed("k"), T0, &m)))).count(), 2);
    let window = r#""limit":{"algorithm":"fixed_window","requests":2,"window":"1h"}"#;
    let windowed = reconfigured(&rule_json("api", window), &store);
    assert_eq!((0..3).filter(|_| allowed(windowed.check(&Env::at(&store, &keyed("k"), T0, &m)))).count(), 2);
}

#[test]
fn a_store_error_while_giving_back_never_turns_a_denial_into_an_admission() {
    // Two limits; between this worker's check and its write, another worker takes the last unit
    // of the second, so what the first took is given back, and that give-back's write fails.
    let limits = r#""limits":[{"name":"wide","capacity":10,"refill_period":"1h"},
        {"name":"narrow","capacity":2,"refill_period":"1h"}]"#;
    let config = Config::parse(rule_json("r", limits).as_bytes()).unwrap();
    let other = std::sync::Arc::new(Limiter::new(config.clone(), 42));
    let l = Limiter::new(config, 42);
    let store = FailingStore::new(MemoryStore::new());
    whole_table(&l).initialize(&store).unwrap();
    let m = Counts::default();
    assert!(allowed(l.check(&Env::at(&store, &keyed("k"), T0, &m))));
    let base = store.calls(Op::Set);
    store.before_each(move |call, shared| {
        if call.op == Op::Set && call.nth == base + 2 {
            let _ = other.check(&Env::at(shared, &keyed("k"), T0, &Counts::default()));
        }
        call.op == Op::Set && call.nth == base + 3
    });
    let verdict = l.check(&Env::at(&store, &keyed("k"), T0, &m));
    assert_eq!(store.calls(Op::Set), base + 3, "the write, the lost race, the failed give-back");
    assert!(!allowed(verdict));
    assert_eq!(m.get(Metric::StoreError), 1);
}

#[test]
fn a_worker_whose_clock_lags_never_starts_afresh_a_key_whose_slot_was_just_reused() {
    // Fixed window, 1 per second, in a table of 8 slots. k1 takes its one request; at the very
    // instant its window ends, another worker sees k1's slot as free and puts k2 there; a worker
    // whose clock reads a nanosecond earlier then checks k1, in k1's old window.
    let (l, store) = limiter(
        r#"{"table_size":8,"rules":[{"name":"r","key":[{"source":"header","name":"x-key"}],
            "limit":{"algorithm":"fixed_window","requests":1,"window":"1s"}}]}"#,
    );
    let m = Counts::default();
    let kind = crate::config::LimitKind::FixedWindow;
    let home =
        |key: &str| request_key(42, &l.config().rules[0], &keyed(key)).unwrap().limit(None, 0, kind).0 % 8;
    let k2 = (0..1000).map(|i| format!("k2-{i}")).find(|k| home(k) == home("k1")).unwrap();
    let window_end = T0 + S;
    assert!(allowed(l.check(&Env::at(&store, &keyed("k1"), T0, &m))));
    assert!(allowed(l.check(&Env::at(&store, &keyed(&k2), window_end, &m))));
    let late = l.check(&Env::at(&store, &keyed("k1"), window_end - 1, &m));
    assert!(!allowed(late), "k1 was admitted twice in the window ending at {window_end}");
}

#[test]
fn the_status_endpoint_has_its_own_limit_per_client_address() {
    let (l, store) = limiter(
        r#"{"table_size":64,"status_path":"/rl","status_limit":{"capacity":2,"refill_period":"1h"},
        "rules":[{"name":"r","key":[{"source":"header","name":"x-key"}],"limit":{"capacity":5,"refill_period":"1h"}}]}"#,
    );
    let m = Counts::default();
    let call = |from: &str| {
        let request = TestRequest::get("/rl").with_header("x-key", "k").with_source(from);
        match l.decide(&Env::at(&store, &request, T0, &m), &mut Exchange::default()) {
            Next::Reply(r) => {
                let retry = r.headers.iter().find(|(n, _)| n == "retry-after").map(|(_, v)| v.to_string());
                (r.status, retry)
            }
            other => panic!("{other:?}"),
        }
    };
    assert_eq!(call("10.0.0.1:1000"), (200, None));
    assert_eq!(call("10.0.0.1:1001"), (200, None));
    assert_eq!(call("10.0.0.1:1002"), (429, Some("1800".into())), "2 per hour: one more in 30 minutes");
    assert_eq!(call("10.0.0.2:1000"), (200, None), "another client address has its own");
    assert_eq!(m.get(Metric::StatusDenied), 1);
    let standing = l.standings(&Env::at(&store, &keyed("k"), T0, &m)).unwrap();
    assert_eq!(standing[0].remaining, 5, "status calls take nothing from the rules");
}

// ---------------------------------------------------------------------------------------------
// A third-party rate limit service (Limitador's way): no per-descriptor statuses, the figures in
// `response_headers_to_add`.

const GLOBAL_HOURLY: &str = r#"{"headers":"x-ratelimit","global":{"cluster":"rls","domain":"d"},"rules":[
  {"name":"per-user","global":true,"key":[{"source":"header","name":"x-user"}],
   "limit":{"algorithm":"fixed_window","requests":5,"window":"1h"}}]}"#;

fn service_answer(over_limit: bool, headers: &[(&str, &str)], upstream: &[(&str, &str)]) -> Vec<u8> {
    use crate::global::protocol::{HeaderValue, RateLimitResponse};
    use prost::Message;
    let to_add = |list: &[(&str, &str)]| -> Vec<HeaderValue> {
        list.iter()
            .map(|(k, v)| HeaderValue { key: (*k).into(), value: (*v).into(), raw_value: Vec::new() })
            .collect()
    };
    RateLimitResponse {
        overall_code: if over_limit { 2 } else { 1 },
        response_headers_to_add: to_add(headers),
        request_headers_to_add: to_add(upstream),
        ..RateLimitResponse::default()
    }
    .encode_to_vec()
}

/// A reply's headers, owned.
type Headers = Vec<(String, String)>;

/// Decides a request of user "u" and hands the limiter `answer`; the reply's headers, if any.
fn answered_with(json: &str, answer: &[u8]) -> (Option<Headers>, Exchange, Limiter, MemoryStore) {
    let (l, store) = limiter(json);
    let m = Counts::default();
    let request = TestRequest::get("/").with_header("x-user", "u");
    let env = Env::at(&store, &request, T0, &m);
    let mut exchange = Exchange::default();
    assert!(matches!(l.decide(&env, &mut exchange), Next::Ask(_)));
    let reply = match l.answered(&env, &mut exchange, Ok(answer)) {
        Next::Reply(r) => Some(r.headers.iter().map(|(n, v)| (n.to_string(), v.to_string())).collect()),
        _ => None,
    };
    (reply, exchange, l, store)
}

fn value_of<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
}

#[test]
fn a_denial_without_statuses_never_announces_a_retry_before_the_services_reset() {
    let answer = service_answer(true, &[("X-RateLimit-Limit", "5"), ("X-RateLimit-Reset", "2400")], &[]);
    let (reply, ..) = answered_with(GLOBAL_HOURLY, &answer);
    let headers = reply.expect("denied");
    assert_eq!(value_of(&headers, "retry-after"), Some("2400"));
    assert_eq!(value_of(&headers, "x-ratelimit-limit"), Some("5"), "the service's headers are forwarded");
    assert_eq!(headers.iter().filter(|(n, _)| n == "x-ratelimit-reset").count(), 1, "{headers:?}");
}

#[test]
fn a_denial_that_says_nothing_about_its_reset_waits_the_longest_window_asked_about() {
    let (reply, ..) = answered_with(GLOBAL_HOURLY, &service_answer(true, &[], &[]));
    assert_eq!(value_of(&reply.expect("denied"), "retry-after"), Some("3600"));
}

#[test]
fn a_denial_of_a_limit_left_to_the_service_that_says_nothing_sends_no_retry_after() {
    let json = r#"{"global":{"cluster":"rls","domain":"d"},"rules":[
        {"name":"per-user","global":true,"key":[{"source":"header","name":"x-user"}]}]}"#;
    let (reply, ..) = answered_with(json, &service_answer(true, &[], &[]));
    assert_eq!(value_of(&reply.expect("denied"), "retry-after"), None);
}

#[test]
fn an_admission_carries_the_services_headers_to_the_response_and_upstream() {
    let answer = service_answer(
        false,
        &[("x-ratelimit-remaining", "4"), ("content-type", "text/html")],
        &[("x-ratelimit-tier", "gold")],
    );
    let (reply, mut exchange, l, store) = answered_with(GLOBAL_HOURLY, &answer);
    assert_eq!(reply, None);
    assert_eq!(exchange.take_upstream_headers(), vec![("x-ratelimit-tier".to_owned(), "gold".to_owned())]);
    let m = Counts::default();
    let settled =
        l.settle(&Env::at(&store, &TestRequest::get("/"), T0, &m), &mut exchange, &TestRequest::default());
    assert_eq!(settled.service, vec![("x-ratelimit-remaining".to_owned(), "4".to_owned())]);
    assert!(settled.limit.iter().all(|(n, _)| *n != "x-ratelimit-remaining"));
}

// ---------------------------------------------------------------------------------------------
// Concurrency limits: units held from admission to the end of the stream, leased.

const IN_FLIGHT_3: &str = r#"{"table_size":64,"headers":"ietf","rules":[{"name":"slow","key":[{"source":"header","name":"x-key"}],
    "limit":{"algorithm":"concurrency","max_in_flight":3,"lease":"60s"}}]}"#;

/// Decides a request of `key` at `now`; its exchange when it is let through.
fn start(l: &Limiter, store: &dyn SharedStore, key: &str, now: u64, m: &Counts) -> Option<Exchange> {
    let mut exchange = Exchange::default();
    match l.decide(&Env::at(store, &keyed(key), now, m), &mut exchange) {
        Next::Continue => Some(exchange),
        _ => None,
    }
}

fn finish(l: &Limiter, store: &dyn SharedStore, mut exchange: Exchange, now: u64, m: &Counts) {
    l.end(&Env::at(store, &keyed("any"), now, m), &mut exchange);
}

#[test]
fn no_more_than_max_in_flight_are_admitted_until_one_ends() {
    let (l, store) = limiter(IN_FLIGHT_3);
    let m = Counts::default();
    let mut open: Vec<Exchange> = (0..5).filter_map(|_| start(&l, &store, "k", T0, &m)).collect();
    assert_eq!(open.len(), 3);
    assert_eq!(l.units_held(), 3);
    finish(&l, &store, open.pop().unwrap(), T0 + S, &m);
    assert!(start(&l, &store, "k", T0 + S, &m).is_some(), "an ended request frees its unit");
    assert!(start(&l, &store, "other", T0 + S, &m).is_some(), "keys are counted apart");
}

#[test]
fn units_in_flight_are_counted_across_workers() {
    let (first, store) = limiter(IN_FLIGHT_3);
    let second = reconfigured(IN_FLIGHT_3, &store);
    let m = Counts::default();
    let a = start(&first, &store, "k", T0, &m);
    let b = start(&second, &store, "k", T0, &m);
    let c = start(&first, &store, "k", T0, &m);
    assert!(a.is_some() && b.is_some() && c.is_some());
    assert!(start(&second, &store, "k", T0, &m).is_none());
    finish(&second, &store, b.unwrap(), T0 + S, &m);
    assert!(start(&first, &store, "k", T0 + S, &m).is_some());
}

#[test]
fn the_last_request_to_end_leaves_the_slot_free_for_another_key() {
    let (l, store) = limiter(IN_FLIGHT_3);
    let m = Counts::default();
    let exchange = start(&l, &store, "k", T0, &m).unwrap();
    finish(&l, &store, exchange, T0 + S, &m);
    let table = rule_table(&l, 0);
    let fp = request_key(42, &l.config().rules[0], &keyed("k")).unwrap().limit(None, 0, kind_of(&l));
    let lookup = table.lookup(&store, fp, T0 + S).unwrap();
    assert!(matches!(lookup, Lookup::Found(_)) && lookup.state() == State::default(), "{lookup:?}");
}

fn kind_of(l: &Limiter) -> crate::config::LimitKind {
    l.config().rules[0].limits.all().next().unwrap().kind
}

#[test]
fn a_denial_by_another_limit_of_the_request_gives_its_unit_back() {
    let json = r#"{"table_size":64,"rules":[{"name":"r","key":[{"source":"header","name":"x-key"}],
        "limits":[{"algorithm":"concurrency","max_in_flight":2},{"name":"rate","capacity":1,"refill_period":"1h"}]}]}"#;
    let (l, store) = limiter(json);
    let m = Counts::default();
    let first = start(&l, &store, "k", T0, &m);
    assert!(first.is_some());
    for _ in 0..5 {
        assert!(start(&l, &store, "k", T0, &m).is_none(), "the rate limit denies");
    }
    assert_eq!(l.units_held(), 1, "the denied requests hold nothing");
    let standing = l.standings(&Env::at(&store, &keyed("k"), T0, &m)).unwrap();
    assert_eq!(standing[0].remaining, 1, "one of two slots in use");
}

#[test]
fn units_of_a_worker_that_vanished_are_dropped_one_lease_later_while_a_live_worker_keeps_its_own() {
    let (live, store) = limiter(IN_FLIGHT_3);
    let m = Counts::default();
    let kept = start(&live, &store, "k", T0, &m).unwrap();
    {
        // A worker that crashes holding two units: it never ends them, nor renews them.
        let vanished = reconfigured(IN_FLIGHT_3, &store);
        assert!(start(&vanished, &store, "k", T0, &m).is_some());
        assert!(start(&vanished, &store, "k", T0, &m).is_some());
    }
    assert!(start(&live, &store, "k", T0 + 30 * S, &m).is_none(), "still leased");
    // The live worker ticks (every 100 ms in Envoy; here once per second) for ten minutes.
    for second in 1..=600 {
        live.tick(&store, T0 + second * S, &m);
    }
    let later = T0 + 600 * S;
    let standing = live.standings(&Env::at(&store, &keyed("k"), later, &m)).unwrap();
    assert_eq!(standing[0].remaining, 2, "the vanished worker's two units are gone, the live one's stays");
    finish(&live, &store, kept, later, &m);
    let standing = live.standings(&Env::at(&store, &keyed("k"), later, &m)).unwrap();
    assert_eq!(standing[0].remaining, 3);
}

#[test]
fn a_concurrency_limit_reports_free_slots_and_a_denial_retries_after_a_second() {
    let (l, store) = limiter(IN_FLIGHT_3);
    let m = Counts::default();
    let mut exchange = start(&l, &store, "k", T0, &m).unwrap();
    let headers = l.settle(&Env::at(&store, &keyed("k"), T0, &m), &mut exchange, &TestRequest::default());
    let value = |name: &str| headers.limit.iter().find(|(n, _)| *n == name).map(|(_, v)| v.clone());
    assert_eq!(value("ratelimit").as_deref(), Some(r#""slow";r=2;t=0"#));
    assert_eq!(value("ratelimit-policy").as_deref(), Some(r#""slow";q=3;w=1"#));
    let _held: Vec<Exchange> = (0..2).filter_map(|_| start(&l, &store, "k", T0, &m)).collect();
    let mut denied = Exchange::default();
    match l.decide(&Env::at(&store, &keyed("k"), T0, &m), &mut denied) {
        Next::Reply(reply) => {
            let retry = reply.headers.iter().find(|(n, _)| n == "retry-after").map(|(_, v)| v.to_string());
            assert_eq!(retry.as_deref(), Some("1"));
        }
        other => panic!("expected a denial, got {other:?}"),
    }
}

#[test]
fn a_request_that_ends_while_waiting_for_the_service_gives_back_its_units() {
    let json = r#"{"table_size":64,"global":{"cluster":"rls","domain":"d"},"rules":[
        {"name":"slow","key":[{"source":"header","name":"x-key"}],"limit":{"algorithm":"concurrency","max_in_flight":1}},
        {"name":"g","global":true,"key":[{"source":"header","name":"x-key"}],
         "limit":{"algorithm":"fixed_window","requests":5,"window":"1h"}}]}"#;
    let (l, store) = limiter(json);
    let m = Counts::default();
    let mut waiting = Exchange::default();
    assert!(matches!(l.decide(&Env::at(&store, &keyed("k"), T0, &m), &mut waiting), Next::Ask(_)));
    let mut second = Exchange::default();
    assert!(matches!(l.decide(&Env::at(&store, &keyed("k"), T0, &m), &mut second), Next::Reply(_)));
    // The client goes away before the service answers.
    l.end(&Env::at(&store, &keyed("k"), T0, &m), &mut waiting);
    let mut third = Exchange::default();
    assert!(matches!(l.decide(&Env::at(&store, &keyed("k"), T0, &m), &mut third), Next::Ask(_)));
}

// ---------------------------------------------------------------------------------------------
// Delay instead of reject: a request whose turn comes within max_delay waits for it.

const MS: u64 = 1_000_000;

fn ten_per_second(extra: &str) -> String {
    format!(
        r#"{{"table_size":64,"rules":[{{"name":"smooth","key":[{{"source":"header","name":"x-key"}}],
        "limit":{{"capacity":1,"refill_tokens":10,"refill_period":"1s","max_delay":"1s"{extra}}}}}]}}"#
    )
}

/// Decides request `id` of key "k" at `now`.
fn arrive<'l>(
    l: &'l Limiter,
    store: &dyn SharedStore,
    id: u32,
    now: u64,
    m: &Counts,
) -> (Next<'l>, Exchange) {
    let mut exchange = Exchange::for_request(id);
    let next = l.decide(&Env::at(store, &keyed("k"), now, m), &mut exchange);
    (next, exchange)
}

#[test]
fn a_request_whose_turn_comes_within_max_delay_waits_for_it_instead_of_being_denied() {
    let (l, store) = limiter(&ten_per_second(""));
    let m = Counts::default();
    let mut turns = Vec::new();
    let (mut passed, mut denied) = (0, 0);
    for id in 1..=30 {
        match arrive(&l, &store, id, T0, &m).0 {
            Next::Continue => passed += 1,
            Next::Delay { until } => turns.push((until - T0) / MS),
            Next::Reply(_) => denied += 1,
            Next::Ask(_) => unreachable!(),
        }
    }
    assert_eq!((passed, denied), (1, 19));
    assert_eq!(turns, [100, 200, 300, 400, 500, 600, 700, 800, 900, 1000]);
    assert_eq!(l.tick(&store, T0 + 350 * MS, &m), [2, 3, 4], "due in the order they arrived");
    assert_eq!(l.waiting(), 7);
    assert_eq!((m.get(Metric::Delayed(0)), m.get(Metric::DelayedMs(0))), (10, 5_500));
}

#[test]
fn a_client_that_leaves_while_waiting_gives_its_turn_back() {
    let (l, store) = limiter(&ten_per_second(""));
    let m = Counts::default();
    let mut waiting: Vec<Exchange> = Vec::new();
    for id in 1..=11 {
        let (next, exchange) = arrive(&l, &store, id, T0, &m);
        if matches!(next, Next::Delay { .. }) {
            waiting.push(exchange);
        }
    }
    assert_eq!(waiting.len(), 10);
    assert!(matches!(arrive(&l, &store, 12, T0, &m).0, Next::Reply(_)), "no turn within a second");
    let mut gone = waiting.pop().unwrap();
    l.end(&Env::at(&store, &keyed("k"), T0, &m), &mut gone);
    assert_eq!(l.waiting(), 9);
    assert!(matches!(arrive(&l, &store, 13, T0, &m).0, Next::Delay { until } if until == T0 + 1_000 * MS));
}

#[test]
fn no_more_than_max_queued_requests_of_a_key_wait_in_a_worker() {
    let (l, store) = limiter(&ten_per_second(r#","max_queued":3"#));
    let m = Counts::default();
    let delayed =
        (1..=30).filter(|id| matches!(arrive(&l, &store, *id, T0, &m).0, Next::Delay { .. })).count();
    assert_eq!(delayed, 3);
}

#[test]
fn a_shadow_rule_never_delays() {
    let json = ten_per_second("").replace(r#""name":"smooth","#, r#""name":"smooth","shadow":true,"#);
    let (l, store) = limiter(&json);
    let m = Counts::default();
    assert!((1..=5).all(|id| matches!(arrive(&l, &store, id, T0, &m).0, Next::Continue)));
}

#[test]
fn a_request_with_global_rules_waits_for_its_turn_once_the_service_agrees() {
    let json = r#"{"table_size":64,"global":{"cluster":"rls","domain":"d"},"rules":[
        {"name":"smooth","key":[{"source":"header","name":"x-key"}],
         "limit":{"capacity":1,"refill_tokens":10,"refill_period":"1s","max_delay":"1s"}},
        {"name":"g","global":true,"key":[{"source":"header","name":"x-key"}],
         "limit":{"algorithm":"fixed_window","requests":5,"window":"1h"}}]}"#;
    let (l, store) = limiter(json);
    let m = Counts::default();
    let ok = service_answer(false, &[], &[]);
    let mut first = Exchange::for_request(1);
    let request = keyed("k");
    let env = Env::at(&store, &request, T0, &m);
    assert!(matches!(l.decide(&env, &mut first), Next::Ask(_)));
    assert!(matches!(l.answered(&env, &mut first, Ok(&ok)), Next::Continue));
    let mut second = Exchange::for_request(2);
    assert!(matches!(l.decide(&env, &mut second), Next::Ask(_)));
    let later = Env::at(&store, &request, T0 + 20 * MS, &m);
    assert!(
        matches!(l.answered(&later, &mut second, Ok(&ok)), Next::Delay { until } if until == T0 + 100 * MS)
    );
}

// ---------------------------------------------------------------------------------------------
// Costs charged from the response (usage quotas): admitted on an estimate, corrected afterwards.

const TOKENS_PER_DAY: &str = r#"{"table_size":64,"headers":"x-ratelimit","rules":[{"name":"tokens",
    "key":[{"source":"header","name":"x-key"}],
    "cost":{"response_header":"x-usage-tokens","max":100000,"estimate":ESTIMATE},
    "limit":{"algorithm":"fixed_window","requests":1000,"window":"day"}}]}"#;

/// One request of key "k" at T0 whose response states `used` tokens: (passed, X-RateLimit-Remaining).
fn metered_request(l: &Limiter, store: &dyn SharedStore, used: &str, m: &Counts) -> (bool, Option<String>) {
    let mut exchange = Exchange::default();
    let request = keyed("k");
    let env = Env::at(store, &request, T0, m);
    if !matches!(l.decide(&env, &mut exchange), Next::Continue) {
        return (false, None);
    }
    let response = TestRequest::default().with_header("x-usage-tokens", used);
    let settled = l.settle(&env, &mut exchange, &response);
    let remaining = settled.limit.iter().find(|(n, _)| *n == "x-ratelimit-remaining").map(|(_, v)| v.clone());
    (true, remaining)
}

#[test]
fn a_usage_quota_admits_while_any_is_left_and_charges_what_each_response_states() {
    let (l, store) = limiter(&TOKENS_PER_DAY.replace("ESTIMATE", "1"));
    let m = Counts::default();
    let runs: Vec<(bool, Option<String>)> = (0..6).map(|_| metered_request(&l, &store, "300", &m)).collect();
    let remaining: Vec<Option<&str>> = runs.iter().map(|(_, r)| r.as_deref()).collect();
    assert_eq!(remaining, [Some("700"), Some("400"), Some("100"), Some("0"), None, None]);
    assert_eq!(runs.iter().filter(|(passed, _)| *passed).count(), 4, "the 4th overdraws by 200; then denied");
    assert_eq!(m.get(Metric::Charged(0)), 4 * 299);
}

#[test]
fn a_usage_below_the_estimate_gives_the_difference_back() {
    let (l, store) = limiter(&TOKENS_PER_DAY.replace("ESTIMATE", "100"));
    let m = Counts::default();
    assert_eq!(metered_request(&l, &store, "10", &m).1.as_deref(), Some("990"));
    assert_eq!(
        metered_request(&l, &store, "garbage", &m).1.as_deref(),
        Some("890"),
        "no usage: the estimate stands"
    );
}

#[test]
fn a_usage_stated_only_in_the_trailers_is_charged_when_they_arrive() {
    let (l, store) = limiter(&TOKENS_PER_DAY.replace("ESTIMATE", "1"));
    let m = Counts::default();
    let request = keyed("k");
    let env = Env::at(&store, &request, T0, &m);
    let mut exchange = Exchange::default();
    assert_eq!(l.decide(&env, &mut exchange), Next::Continue);
    // A streamed response: the headers say nothing of the usage, so they show the estimate.
    let settled = l.settle(&env, &mut exchange, &TestRequest::default());
    assert!(settled.limit.contains(&("x-ratelimit-remaining", "999".to_owned())), "{:?}", settled.limit);
    l.trailers(&env, &mut exchange, &TestRequest::default().with_header("x-usage-tokens", "500"));
    assert_eq!(m.get(Metric::Charged(0)), 499);
    assert_eq!(metered_request(&l, &store, "300", &m).1.as_deref(), Some("200"));
}

#[test]
fn an_overdrawn_token_bucket_refills_from_below_zero() {
    let json = r#"{"table_size":64,"rules":[{"name":"tokens","key":[{"source":"header","name":"x-key"}],
        "cost":{"response_header":"x-usage-tokens","max":100000},
        "limit":{"capacity":100,"refill_period":"100s"}}]}"#;
    let (l, store) = limiter(json);
    let m = Counts::default();
    assert!(metered_request(&l, &store, "250", &m).0, "admitted on the estimate of 1");
    let at = |seconds: u64| {
        let mut exchange = Exchange::default();
        matches!(l.decide(&Env::at(&store, &keyed("k"), T0 + seconds * S, &m), &mut exchange), Next::Continue)
    };
    assert!(!at(150), "150 s refill 150 of the 250 owed: still 0 left");
    assert!(at(151), "one token back");
}

// ---------------------------------------------------------------------------------------------
// failure_mode "local": while the service cannot answer, the rule's fallback limit applies here.

const GLOBAL_WITH_FALLBACK: &str = r#"{"table_size":64,"global":{"cluster":"rls","domain":"d"},"rules":[
  {"name":"g","global":true,"failure_mode":"local","key":[{"source":"header","name":"x-key"}],
   "limit":{"algorithm":"fixed_window","requests":10,"window":"1m"},
   "fallback":{"algorithm":"fixed_window","requests":3,"window":"1m"}}]}"#;

/// Decides a request of key "k" and gives it `answer`: whether it passed.
fn through_service(
    l: &Limiter,
    store: &dyn SharedStore,
    answer: Result<&[u8], CallError>,
    m: &Counts,
) -> bool {
    let request = keyed("k");
    let env = Env::at(store, &request, T0, m);
    let mut exchange = Exchange::default();
    assert!(matches!(l.decide(&env, &mut exchange), Next::Ask(_)));
    matches!(l.answered(&env, &mut exchange, answer), Next::Continue)
}

#[test]
fn while_the_service_fails_a_local_fallback_limits_exactly_and_the_service_decides_again_once_back() {
    let (l, store) = limiter(GLOBAL_WITH_FALLBACK);
    let m = Counts::default();
    let down: Vec<bool> = (0..5)
        .map(|_| through_service(&l, &store, Err(CallError::Status { code: 14, message: String::new() }), &m))
        .collect();
    assert_eq!(down, [true, true, true, false, false]);
    let fallback = l.config().rules.iter().position(|r| r.name == "g.fallback").unwrap();
    assert_eq!((m.get(Metric::Allowed(fallback)), m.get(Metric::Denied(fallback))), (3, 2));
    let ok = service_answer(false, &[], &[]);
    assert!(through_service(&l, &store, Ok(&ok), &m), "the service answers again: its word counts");
    assert_eq!(m.get(Metric::GlobalFailure), 5);
}

#[test]
fn a_local_rule_counts_a_request_as_allowed_only_once_the_global_rules_admit_it() {
    let json = r#"{"table_size":64,"global":{"cluster":"rls","domain":"d"},"rules":[
        {"name":"local","key":[{"source":"header","name":"x-key"}],"limit":{"capacity":10,"refill_period":"1h"}},
        {"name":"g","global":true,"key":[{"source":"header","name":"x-key"}],
         "limit":{"algorithm":"fixed_window","requests":1,"window":"1h"}}]}"#;
    let (l, store) = limiter(json);
    let m = Counts::default();
    let (ok, over) = (service_answer(false, &[], &[]), service_answer(true, &[], &[]));
    let passed = [
        through_service(&l, &store, Ok(&ok), &m),
        through_service(&l, &store, Ok(&over), &m),
        through_service(&l, &store, Err(CallError::Status { code: 14, message: String::new() }), &m),
    ];
    assert_eq!(passed, [true, false, true]);
    assert_eq!(
        m.get(Metric::Allowed(0)),
        2,
        "the denied request is not counted as allowed by the local rule"
    );
    assert_eq!((m.get(Metric::Allowed(1)), m.get(Metric::Denied(1))), (2, 1));
}

#[test]
fn a_worker_whose_clock_steps_back_holds_a_request_no_longer_than_its_wait() {
    // The bucket's time is T0 (the first request); this worker's clock then reads near 1970 (an
    // NTP step, say). The second request's turn is one refill interval after the bucket's time:
    // it is held 100 ms on this worker's clock, not until the bucket's T0 comes round again.
    let (l, store) = limiter(&ten_per_second(""));
    let m = Counts::default();
    assert!(matches!(arrive(&l, &store, 1, T0, &m).0, Next::Continue));
    let stepped_back = 1_000;
    assert!(
        matches!(arrive(&l, &store, 2, stepped_back, &m).0, Next::Delay { until } if until == stepped_back + 100 * MS)
    );
    assert_eq!(m.get(Metric::DelayedMs(0)), 100);
}

// ---------------------------------------------------------------------------------------------
// Idempotency keys: a request's key from admission to its end.

mod idempotency {
    use super::*;
    use crate::decide::BodyWanted;

    const ENTRY: &str = r#"{"name":"pay","match":{"methods":["POST"],"path_prefix":"/pay"},
        "scope":[{"source":"header","name":"x-tenant"}],"ttl":"1h","in_flight_timeout":"30s",
        "replay_headers":["content-type","location"],"max_body_bytes":16"#;

    fn keys(extra: &str) -> (Limiter, MemoryStore) {
        limiter(&format!(r#"{{"rules":[],"idempotency":[{ENTRY}{extra}}}]}}"#))
    }

    fn post(path: &str, key: &str, tenant: &str) -> TestRequest {
        TestRequest::get(path)
            .with_header(":method", "POST")
            .with_header("idempotency-key", key)
            .with_header("x-tenant", tenant)
    }

    fn response(status: &str) -> TestRequest {
        TestRequest::default()
            .with_header(":status", status)
            .with_header("content-type", "application/json")
            .with_header("location", "/pay/1")
            .with_header("x-other", "not kept")
    }

    /// Admission: `Ok(exchange)` when it goes on, `Err((status, body))` when answered.
    fn arrive(
        l: &Limiter,
        store: &MemoryStore,
        req: &TestRequest,
        now: u64,
        m: &Counts,
    ) -> Result<Exchange, (u32, String)> {
        let mut exchange = Exchange::for_request(1);
        match l.decide(&Env::at(store, req, now, m), &mut exchange) {
            Next::Continue => Ok(exchange),
            Next::Reply(r) => Err((r.status, String::from_utf8_lossy(&r.body).into_owned())),
            other => panic!("unexpected {other:?}"),
        }
    }

    /// The upstream answers `status` with `body` in one piece, and the stream ends.
    fn complete(
        l: &Limiter,
        store: &MemoryStore,
        mut exchange: Exchange,
        status: &str,
        body: &[u8],
        now: u64,
        m: &Counts,
    ) {
        let request = TestRequest::default();
        let env = Env::at(store, &request, now, m);
        l.keep_response(&mut exchange, &response(status), body.is_empty());
        if l.wants_response_body(&exchange) != BodyWanted::Nothing {
            l.response_body(&mut exchange, body, true);
        }
        l.end(&env, &mut exchange);
    }

    #[test]
    fn a_duplicate_in_flight_gets_409_and_a_retry_after_completion_the_stored_response() {
        let (l, store) = keys("");
        let m = Counts::default();
        let first = arrive(&l, &store, &post("/pay", "k1", "t"), T0, &m).unwrap();
        let (status, body) = arrive(&l, &store, &post("/pay", "k1", "t"), T0 + S, &m).unwrap_err();
        assert_eq!(status, 409);
        assert!(body.contains("A request is outstanding for this Idempotency-Key"), "{body}");
        complete(&l, &store, first, "201", b"{\"id\":1}", T0 + 2 * S, &m);
        let mut exchange = Exchange::for_request(2);
        let Next::Reply(replayed) =
            l.decide(&Env::at(&store, &post("/pay", "k1", "t"), T0 + 3 * S, &m), &mut exchange)
        else {
            panic!("not replayed")
        };
        assert_eq!(replayed.status, 201);
        assert_eq!(&*replayed.body, b"{\"id\":1}");
        let headers: Vec<(String, String)> =
            replayed.headers.iter().map(|(n, v)| (n.to_string(), v.to_string())).collect();
        assert_eq!(
            headers,
            [("content-type", "application/json"), ("location", "/pay/1"), ("idempotent-replayed", "true")]
                .map(|(n, v)| (n.to_owned(), v.to_owned()))
        );
        assert_eq!(
            (m.get(Metric::KeyClaimed(0)), m.get(Metric::KeyInFlight(0)), m.get(Metric::Replayed(0))),
            (1, 1, 1)
        );
    }

    #[test]
    fn the_same_key_on_another_path_or_method_gets_422() {
        let (l, store) = keys("");
        let m = Counts::default();
        let _first = arrive(&l, &store, &post("/pay", "k1", "t"), T0, &m).unwrap();
        assert_eq!(arrive(&l, &store, &post("/pay/other", "k1", "t"), T0, &m).unwrap_err().0, 422);
        let put = post("/pay", "k1", "t").with_header(":method", "PUT");
        // PUT is not matched by the entry at all: it passes unprotected.
        assert!(arrive(&l, &store, &put, T0, &m).is_ok());
    }

    #[test]
    fn keys_are_scoped_so_two_tenants_with_one_key_do_not_meet() {
        let (l, store) = keys("");
        let m = Counts::default();
        let _a = arrive(&l, &store, &post("/pay", "k1", "tenant-a"), T0, &m).unwrap();
        assert!(arrive(&l, &store, &post("/pay", "k1", "tenant-b"), T0, &m).is_ok());
    }

    #[test]
    fn a_5xx_or_a_response_cut_short_frees_the_key_for_a_retry() {
        let (l, store) = keys("");
        let m = Counts::default();
        let first = arrive(&l, &store, &post("/pay", "k1", "t"), T0, &m).unwrap();
        complete(&l, &store, first, "503", b"down", T0 + S, &m);
        let retry = arrive(&l, &store, &post("/pay", "k1", "t"), T0 + 2 * S, &m).unwrap();
        // The client resets before the response ends.
        let mut retry = retry;
        l.keep_response(&mut retry, &response("200"), false);
        l.end(&Env::at(&store, &TestRequest::default(), T0 + 3 * S, &m), &mut retry);
        assert!(arrive(&l, &store, &post("/pay", "k1", "t"), T0 + 4 * S, &m).is_ok());
        assert_eq!(m.get(Metric::KeyReleased(0)), 2);
    }

    #[test]
    fn without_release_on_failure_a_5xx_is_replayed() {
        let (l, store) = keys(r#","release_on_failure":false"#);
        let m = Counts::default();
        let first = arrive(&l, &store, &post("/pay", "k1", "t"), T0, &m).unwrap();
        complete(&l, &store, first, "500", b"oops", T0 + S, &m);
        assert_eq!(
            arrive(&l, &store, &post("/pay", "k1", "t"), T0 + 2 * S, &m).unwrap_err(),
            (500, "oops".to_owned())
        );
    }

    #[test]
    fn a_body_over_the_cap_is_not_kept_and_its_retry_gets_409_or_passes_as_configured() {
        for (extra, retry_passes) in [("", false), (r#","when_not_stored":"pass""#, true)] {
            let (l, store) = keys(extra);
            let m = Counts::default();
            let first = arrive(&l, &store, &post("/pay", "k1", "t"), T0, &m).unwrap();
            complete(&l, &store, first, "200", &[b'x'; 17], T0 + S, &m);
            let retry = arrive(&l, &store, &post("/pay", "k1", "t"), T0 + 2 * S, &m);
            assert_eq!(retry.is_ok(), retry_passes, "{extra}");
            if !retry_passes {
                assert_eq!(retry.unwrap_err().0, 409);
            }
            assert_eq!(m.get(Metric::ResponseNotKept(0)), 1);
        }
    }

    #[test]
    fn a_key_is_forgotten_after_its_ttl_and_an_abandoned_claim_after_its_in_flight_timeout() {
        let (l, store) = keys("");
        let m = Counts::default();
        let first = arrive(&l, &store, &post("/pay", "k1", "t"), T0, &m).unwrap();
        complete(&l, &store, first, "200", b"ok", T0, &m);
        assert!(arrive(&l, &store, &post("/pay", "k1", "t"), T0 + 3599 * S, &m).is_err());
        assert!(arrive(&l, &store, &post("/pay", "k1", "t"), T0 + 3600 * S, &m).is_ok());
        // That claim is never completed (its Envoy went away): the key is free after 30 s.
        assert!(arrive(&l, &store, &post("/pay", "k1", "t"), T0 + 3629 * S, &m).is_err());
        assert!(arrive(&l, &store, &post("/pay", "k1", "t"), T0 + 3630 * S, &m).is_ok());
    }

    #[test]
    fn a_required_key_that_is_missing_or_malformed_gets_400_and_an_optional_one_passes() {
        let (l, store) = keys(r#","required":true"#);
        let m = Counts::default();
        let bare = TestRequest::get("/pay").with_header(":method", "POST").with_header("x-tenant", "t");
        assert_eq!(arrive(&l, &store, &bare, T0, &m).unwrap_err().0, 400);
        assert_eq!(arrive(&l, &store, &post("/pay", "a,b", "t"), T0, &m).unwrap_err().0, 400);
        let (l, store) = keys("");
        assert!(arrive(&l, &store, &bare, T0, &m).is_ok());
    }

    #[test]
    fn the_table_holds_at_most_its_size_in_slots_and_a_full_slot_applies_the_policy() {
        let (l, store) = keys(r#","table_size":8,"when_table_full":"deny""#);
        let m = Counts::default();
        let mut refused = 0;
        for i in 0..100 {
            if let Err((status, _)) = arrive(&l, &store, &post("/pay", &format!("k{i}"), "t"), T0, &m) {
                assert_eq!(status, 503);
                refused += 1;
            }
        }
        // 8 slots of 4 records: 32 keys at most.
        assert_eq!(100 - refused, 32);
        assert_eq!(m.get(Metric::KeyTableFull(0)), 68);
        // The rate limit table the helper creates, and the 8 slots of the entry's.
        assert_eq!(store.len(), l.config().table_size as usize + 8);
    }

    #[cfg(not(target_family = "wasm"))]
    #[test]
    fn of_many_threads_sending_one_fresh_key_at_once_exactly_one_goes_on() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let (l, store) = keys("");
        for round in 0..50 {
            let passed = AtomicUsize::new(0);
            let m = Counts::default();
            std::thread::scope(|s| {
                for _ in 0..4 {
                    s.spawn(|| {
                        for _ in 0..25 {
                            if arrive(&l, &store, &post("/pay", &format!("fresh-{round}"), "t"), T0, &m)
                                .is_ok()
                            {
                                passed.fetch_add(1, Ordering::SeqCst);
                            }
                        }
                    });
                }
            });
            assert_eq!(passed.load(Ordering::SeqCst), 1, "round {round}");
        }
    }

    // Keys kept by the rate limit service (`across: "fleet"`).

    const FLEET: &str = r#"{"global":{"cluster":"rls","domain":"edge"},"rules":[],"idempotency":[{"name":"pay",
        "match":{"methods":["POST"]},"scope":[{"source":"header","name":"x-tenant"}],"across":"fleet",
        "replay_headers":["content-type"],"ttl":"1h","in_flight_timeout":"30s"WHEN}]}"#;

    fn claim_answer(outcome: i32, stored: Option<(u32, &[u8])>) -> Vec<u8> {
        use crate::idempotency::protocol::{ClaimResponse, Header, StoredResponse};
        use prost::Message;
        ClaimResponse {
            outcome,
            stored: stored.map(|(status, body)| StoredResponse {
                status,
                headers: vec![Header { name: "content-type".into(), value: "application/json".into() }],
                body: body.to_vec(),
            }),
        }
        .encode_to_vec()
    }

    /// Admission of a fleet-keyed request: the claim it sends, and its exchange.
    fn ask_claim(l: &Limiter, store: &MemoryStore, req: &TestRequest, m: &Counts) -> (Exchange, Vec<u8>) {
        let mut exchange = Exchange::for_request(1);
        match l.decide(&Env::at(store, req, T0, m), &mut exchange) {
            Next::Ask(ask) => {
                assert_eq!((ask.service, ask.method), ("ratelimitwasm.idempotency.v1.Keys", "Claim"));
                (exchange, ask.message)
            }
            other => panic!("no claim asked: {other:?}"),
        }
    }

    #[test]
    fn a_fleet_key_is_claimed_at_the_service_and_completed_there_with_the_response() {
        use crate::decide::Background;
        use crate::idempotency::protocol::{ClaimRequest, CompleteRequest, OUTCOME_CLAIMED};
        use prost::Message;
        let (l, store) = limiter(&FLEET.replace("WHEN", ""));
        let m = Counts::default();
        let (mut exchange, message) = ask_claim(&l, &store, &post("/pay", "k1", "t"), &m);
        let claim = ClaimRequest::decode(message.as_slice()).unwrap();
        assert_eq!((claim.domain.as_str(), claim.in_flight_ms), ("edge", 30_000));
        assert!(claim.key.starts_with("pay:") && claim.key.len() == 4 + 64, "{}", claim.key);
        // Another Envoy (another seed) names the same key the same way.
        let other = Limiter::new(Config::parse(FLEET.replace("WHEN", "").as_bytes()).unwrap(), 7);
        let (_, again) = ask_claim(&other, &store, &post("/pay", "k1", "t"), &m);
        assert_eq!(ClaimRequest::decode(again.as_slice()).unwrap().key, claim.key);
        let request = post("/pay", "k1", "t");
        let env = Env::at(&store, &request, T0, &m);
        assert_eq!(l.answered(&env, &mut exchange, Ok(&claim_answer(OUTCOME_CLAIMED, None))), Next::Continue);
        let after = Env::at(&store, &crate::request::HeadersGone, T0, &m);
        l.keep_response(&mut exchange, &response("201"), false);
        l.response_body(&mut exchange, b"{\"id\":1}", true);
        l.end(&after, &mut exchange);
        let background = l.take_background();
        let [Background::KeyComplete { message, .. }] = background.as_slice() else {
            panic!("{background:?}")
        };
        let complete = CompleteRequest::decode(message.as_slice()).unwrap();
        assert_eq!(
            (complete.key, complete.owner, complete.release, complete.ttl_ms),
            (claim.key, claim.owner, false, 3_600_000)
        );
        let stored = complete.stored.unwrap();
        assert_eq!((stored.status, stored.body.as_slice()), (201, &b"{\"id\":1}"[..]));
    }

    #[test]
    fn the_services_word_on_a_fleet_key_answers_as_a_local_key_would() {
        use crate::idempotency::protocol::{OUTCOME_COMPLETED, OUTCOME_IN_FLIGHT, OUTCOME_MISMATCH};
        let (l, store) = limiter(&FLEET.replace("WHEN", ""));
        let m = Counts::default();
        let request = post("/pay", "k1", "t");
        let env = Env::at(&store, &request, T0, &m);
        for (answer, status) in [
            (claim_answer(OUTCOME_IN_FLIGHT, None), 409),
            (claim_answer(OUTCOME_MISMATCH, None), 422),
            (claim_answer(OUTCOME_COMPLETED, Some((201, b"done"))), 201),
            (claim_answer(OUTCOME_COMPLETED, None), 409),
        ] {
            let (mut exchange, _) = ask_claim(&l, &store, &post("/pay", "k1", "t"), &m);
            let Next::Reply(reply) = l.answered(&env, &mut exchange, Ok(&answer)) else {
                panic!("not answered")
            };
            assert_eq!(reply.status, status);
        }
        assert_eq!(m.get(Metric::Replayed(0)), 1);
    }

    #[test]
    fn a_fleet_key_the_service_cannot_check_goes_unprotected_or_gets_503_as_configured() {
        for (when, expected) in [("", None), (r#","when_service_fails":"deny""#, Some(503))] {
            let (l, store) = limiter(&FLEET.replace("WHEN", when));
            let m = Counts::default();
            let request = post("/pay", "k1", "t");
            let env = Env::at(&store, &request, T0, &m);
            let (mut exchange, _) = ask_claim(&l, &store, &post("/pay", "k1", "t"), &m);
            let failed = Err(CallError::Status { code: 14, message: String::new() });
            let status = match l.answered(&env, &mut exchange, failed) {
                Next::Continue => None,
                Next::Reply(r) => Some(r.status),
                other => panic!("{other:?}"),
            };
            assert_eq!(status, expected, "{when}");
            assert_eq!(m.get(Metric::KeyStoreError(0)), 1);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Quota leases: a leased global rule spends granted units here and asks only when they run out.

mod leases {
    use super::*;
    use crate::decide::Background;
    use crate::global::protocol::{DescriptorStatus, Quota, RateLimitResponse, Timestamp};
    use prost::Message;

    const LEASED: &str = r#"{"global":{"cluster":"rls","domain":"d"},"rules":[
      {"name":"api","global":true,"key":[{"source":"header","name":"x-user"}],
       "limit":{"algorithm":"fixed_window","requests":1000,"window":"1h"},
       "lease":{"size":10,"refresh_below":3,"validity":"10s"}}]}"#;

    fn user(u: &str) -> TestRequest {
        TestRequest::get("/").with_header("x-user", u)
    }

    /// The service's answer: OK, with `granted` units leased (none: a service that ignores leases).
    fn answer(granted: Option<u32>, over: bool) -> Vec<u8> {
        let quota = granted.map(|requests| Quota {
            requests,
            valid_until: Some(Timestamp { seconds: i64::try_from(T0 / S).unwrap() + 3600, nanos: 0 }),
            id: format!("lease-{requests}"),
        });
        RateLimitResponse {
            overall_code: if over { 2 } else { 1 },
            statuses: vec![DescriptorStatus {
                code: if over { 2 } else { 1 },
                quota,
                ..DescriptorStatus::default()
            }],
            ..RateLimitResponse::default()
        }
        .encode_to_vec()
    }

    /// What a call asks for along with it (gRPC metadata), as (name, value) pairs.
    type Asked = Vec<(&'static str, String)>;

    /// Decides a request: `Ok` when it was decided without a call, else its exchange and the lease
    /// its call asks for.
    fn arrive(
        l: &Limiter,
        store: &MemoryStore,
        req: &TestRequest,
        now: u64,
        m: &Counts,
    ) -> Result<(), Box<(Exchange, Asked)>> {
        let mut exchange = Exchange::default();
        match l.decide(&Env::at(store, req, now, m), &mut exchange) {
            Next::Continue => Ok(()),
            Next::Ask(ask) => Err(Box::new((exchange, ask.metadata))),
            other => panic!("unexpected {other:?}"),
        }
    }

    fn settle_call(
        l: &Limiter,
        store: &MemoryStore,
        mut exchange: Exchange,
        body: &[u8],
        now: u64,
        m: &Counts,
    ) -> bool {
        matches!(l.answered(&Env::at(store, &user("u"), now, m), &mut exchange, Ok(body)), Next::Continue)
    }

    #[test]
    fn a_grant_is_spent_here_and_the_service_is_asked_again_only_when_it_runs_low() {
        let (l, store) = limiter(LEASED);
        let m = Counts::default();
        let (exchange, lease) = *arrive(&l, &store, &user("u"), T0, &m).unwrap_err();
        let expected = [("x-ratelimit-wasm-lease", "10"), ("x-ratelimit-wasm-lease-validity-ms", "10000")];
        assert_eq!(lease, expected.map(|(n, v)| (n, v.to_owned())));
        assert!(settle_call(&l, &store, exchange, &answer(Some(10), false), T0, &m));
        // 10 units leased: 7 requests leave 3, the refresh threshold; that one claims a refresh.
        for i in 0..7 {
            assert!(arrive(&l, &store, &user("u"), T0 + i, &m).is_ok(), "request {i}");
            assert_eq!(l.take_background().len(), usize::from(i == 6), "request {i}");
        }
        for i in 7..10 {
            assert!(arrive(&l, &store, &user("u"), T0 + i, &m).is_ok(), "request {i}");
        }
        assert!(l.take_background().is_empty(), "one refresh per key at a time");
        // Spent, and the refresh still under way: the request asks, without a lease of its own.
        let (_, lease) = *arrive(&l, &store, &user("u"), T0 + 20, &m).unwrap_err();
        assert!(lease.is_empty());
        assert_eq!(m.get(Metric::LeaseServed(0)), 10);
        // Counted as allowed by the rule, as the service's answers are: 1 by its call, 10 leased.
        assert_eq!(m.get(Metric::Allowed(0)), 11);
    }

    #[test]
    fn a_refresh_adds_its_grant_and_its_own_unit() {
        let (l, store) = limiter(LEASED);
        let m = Counts::default();
        let (exchange, _) = *arrive(&l, &store, &user("u"), T0, &m).unwrap_err();
        assert!(settle_call(&l, &store, exchange, &answer(Some(7), false), T0, &m));
        for i in 0..4 {
            arrive(&l, &store, &user("u"), T0 + i, &m).unwrap();
        }
        let refreshes: Vec<Background> = l.take_background();
        assert_eq!(refreshes.len(), 1);
        l.background_answered(&store, T0 + 5, &refreshes[0], Ok(&answer(Some(10), false)), &m);
        // 3 left + 10 granted + the refresh's own hit.
        let served = (0..20).take_while(|i| arrive(&l, &store, &user("u"), T0 + 10 + i, &m).is_ok()).count();
        assert_eq!(served, 14);
    }

    #[test]
    fn an_adaptive_lease_asks_for_what_the_keys_rate_spends_over_its_validity() {
        let json = LEASED
            .replace(r#""size":10"#, r#""size":100"#)
            .replace(r#""validity":"10s""#, r#""validity":"10s","adaptive":true"#);
        let (l, store) = limiter(&json);
        let m = Counts::default();
        let asked = |metadata: &Asked| metadata.first().map(|(_, v)| v.clone());
        // A new key has no rate yet: 1 unit over the minimum span of 1 s, times 10 s.
        let (exchange, first) = *arrive(&l, &store, &user("u"), T0, &m).unwrap_err();
        assert_eq!(asked(&first).as_deref(), Some("10"));
        assert!(settle_call(&l, &store, exchange, &answer(Some(10), false), T0, &m));
        // 2 requests a second for 3.5 s take it to refresh_below (3): 7 units in 3.5 s is 20 over 10 s.
        for i in 0..7 {
            assert!(arrive(&l, &store, &user("u"), T0 + S / 2 * (i + 1), &m).is_ok());
        }
        let background = l.take_background();
        assert_eq!(background.len(), 1);
        assert_eq!(l.background_metadata(&background[0])[0], ("x-ratelimit-wasm-lease", "20".to_owned()));
    }

    #[test]
    fn a_service_that_grants_nothing_is_asked_on_every_request() {
        let (l, store) = limiter(LEASED);
        let m = Counts::default();
        for i in 0..5 {
            let (exchange, _) = *arrive(&l, &store, &user("u"), T0 + i, &m).unwrap_err();
            assert!(settle_call(&l, &store, exchange, &answer(None, false), T0 + i, &m));
        }
        assert_eq!(m.get(Metric::LeaseServed(0)), 0);
    }

    #[test]
    fn leased_units_expire_with_their_validity() {
        let (l, store) = limiter(LEASED);
        let m = Counts::default();
        let (exchange, _) = *arrive(&l, &store, &user("u"), T0, &m).unwrap_err();
        assert!(settle_call(&l, &store, exchange, &answer(Some(10), false), T0, &m));
        assert!(arrive(&l, &store, &user("u"), T0 + 10 * S - 1, &m).is_ok());
        assert!(arrive(&l, &store, &user("u"), T0 + 10 * S, &m).is_err());
    }

    #[test]
    fn a_denied_request_spends_nothing_and_keys_have_their_own_leases() {
        let (l, store) = limiter(LEASED);
        let m = Counts::default();
        let (exchange, _) = *arrive(&l, &store, &user("u"), T0, &m).unwrap_err();
        assert!(!settle_call(&l, &store, exchange, &answer(None, true), T0, &m));
        assert!(arrive(&l, &store, &user("u"), T0 + 1, &m).is_err());
        let (exchange, _) = *arrive(&l, &store, &user("v"), T0 + 2, &m).unwrap_err();
        assert!(settle_call(&l, &store, exchange, &answer(Some(2), false), T0 + 2, &m));
        assert!(arrive(&l, &store, &user("u"), T0 + 3, &m).is_err(), "v's lease is v's");
        assert!(arrive(&l, &store, &user("v"), T0 + 3, &m).is_ok());
    }

    #[cfg(not(target_family = "wasm"))]
    #[test]
    fn threads_spending_one_lease_at_once_spend_each_unit_once() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        for round in 0..20 {
            let (l, store) = limiter(LEASED);
            let m = Counts::default();
            let key = format!("fresh-{round}");
            let (exchange, _) = *arrive(&l, &store, &user(&key), T0, &m).unwrap_err();
            assert!(settle_call(&l, &store, exchange, &answer(Some(50), false), T0, &m));
            let served = AtomicUsize::new(0);
            std::thread::scope(|s| {
                for _ in 0..4 {
                    s.spawn(|| {
                        for _ in 0..30 {
                            if arrive(&l, &store, &user(&key), T0 + 1, &m).is_ok() {
                                served.fetch_add(1, Ordering::SeqCst);
                            }
                        }
                    });
                }
            });
            assert_eq!(served.load(Ordering::SeqCst), 50, "round {round}");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Usage charged to a global rule after its response.

#[test]
fn a_global_rule_charges_the_usage_beyond_its_estimate_by_a_background_call() {
    use crate::decide::Background;
    use crate::global::protocol::{
        CurrentLimit, DescriptorStatus, ProtoDuration, RateLimitRequest, RateLimitResponse,
    };
    use prost::Message;
    let json = r#"{"headers":"x-ratelimit","global":{"cluster":"rls","domain":"d"},"rules":[
      {"name":"tokens","global":true,"key":[{"source":"header","name":"x-user"}],
       "cost":{"response_header":"x-usage-tokens","max":100000,"estimate":2},
       "limit":{"algorithm":"fixed_window","requests":1000,"window":"day"}}]}"#;
    let (l, store) = limiter(json);
    let m = Counts::default();
    let request = TestRequest::get("/").with_header("x-user", "u");
    let env = Env::at(&store, &request, T0, &m);
    let mut exchange = Exchange::default();
    let Next::Ask(ask) = l.decide(&env, &mut exchange) else { panic!("no call") };
    let asked = RateLimitRequest::decode(ask.message.as_slice()).unwrap();
    assert_eq!(asked.descriptors[0].hits_addend.as_ref().map(|h| h.value), Some(2), "the estimate");
    let answer = RateLimitResponse {
        overall_code: 1,
        statuses: vec![DescriptorStatus {
            code: 1,
            current_limit: Some(CurrentLimit { requests_per_unit: 1000, unit: 4, name: String::new() }),
            limit_remaining: 998,
            duration_until_reset: Some(ProtoDuration { seconds: 3600, nanos: 0 }),
            quota: None,
        }],
        ..RateLimitResponse::default()
    }
    .encode_to_vec();
    assert_eq!(l.answered(&env, &mut exchange, Ok(&answer)), Next::Continue);
    let response = TestRequest::default().with_header("x-usage-tokens", "300");
    // As in Envoy, the request's headers cannot be read any more when its response arrives.
    let after = Env::at(&store, &crate::request::HeadersGone, T0, &m);
    let headers = l.settle(&after, &mut exchange, &response);
    assert!(headers.limit.contains(&("x-ratelimit-remaining", "700".to_owned())), "{:?}", headers.limit);
    let background = l.take_background();
    let [Background::Usage { rule: 0, call }] = background.as_slice() else { panic!("{background:?}") };
    let charge = RateLimitRequest::decode(call.message.as_slice()).unwrap();
    assert_eq!(
        charge.descriptors,
        asked
            .descriptors
            .iter()
            .cloned()
            .map(|mut d| {
                d.hits_addend = Some(crate::global::protocol::UInt64Value { value: 298 });
                d
            })
            .collect::<Vec<_>>()
    );
    assert_eq!(l.background_metadata(&background[0]), vec![("x-ratelimit-wasm-charge", "1".to_owned())]);
    assert_eq!(m.get(Metric::Charged(0)), 298);
    // A usage at or under the estimate charges nothing more (a service cannot take hits back).
    let mut exchange = Exchange::default();
    assert!(matches!(l.decide(&env, &mut exchange), Next::Ask(_)));
    l.answered(&env, &mut exchange, Ok(&answer));
    l.settle(&env, &mut exchange, &TestRequest::default().with_header("x-usage-tokens", "1"));
    assert!(l.take_background().is_empty());
}
