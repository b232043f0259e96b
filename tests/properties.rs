//! Property tests: random arrivals, keys, costs and workers whose clocks disagree, through the
//! whole limiter and a table small enough that keys fight for slots. Whatever the sequence, no key
//! is ever admitted more than its limit allows, by each algorithm's own arithmetic, at the instants
//! the limiter counts the admissions (see `counted_at`):
//! - fixed and sliding windows: the units admitted in any aligned window never exceed `requests`;
//! - token bucket and GCRA: the units admitted in any interval `[a, b]` never exceed the capacity
//!   (burst) plus what refills in `b - a` at the configured rate.

// A test crate: its helpers may fail the test outright.
#![allow(clippy::unwrap_used, clippy::panic)]

use std::collections::HashMap;

use proptest::prelude::*;

use ratelimit_wasm::config::Config;
use ratelimit_wasm::decide::{Env, Limiter, Verdict};
use ratelimit_wasm::report::metrics::Metric;
use ratelimit_wasm::report::Observer;
use ratelimit_wasm::request::TestRequest;
use ratelimit_wasm::state::memory::MemoryStore;
use ratelimit_wasm::state::table::Table;

const S: u64 = 1_000_000_000;
/// 2026-01-15T08:00:00Z, aligned to every window used here.
const T0: u64 = 1_768_464_000 * S;
/// Workers' clocks differ by up to this much either way (far more than they do in Envoy).
const MAX_SKEW: i64 = 2_000_000;
const WORKERS: usize = 3;

struct Quiet;

impl Observer for Quiet {
    fn count(&self, _metric: Metric) {}
    fn add(&self, _metric: Metric, _n: u64) {}
}

/// A limit, as the rule's JSON states it, and the bound the property checks.
#[derive(Clone, Debug)]
enum Limit {
    /// Token bucket or GCRA: at most `capacity` at once, refilling `tokens` every `period` ns.
    Bucket { json: String, capacity: u64, tokens: u64, period: u64 },
    /// Fixed or sliding window: at most `requests` per aligned window of `window` ns.
    Window { json: String, requests: u64, window: u64 },
}

impl Limit {
    fn json(&self) -> &str {
        match self {
            Limit::Bucket { json, .. } | Limit::Window { json, .. } => json,
        }
    }

    fn capacity(&self) -> u64 {
        match self {
            Limit::Bucket { capacity, .. } => *capacity,
            Limit::Window { requests, .. } => *requests,
        }
    }

    /// The unit arrivals are spaced in: a quarter window, or one token's refill interval, so
    /// that arrivals land exactly on the instants where a window ends or a bucket fills up.
    fn quantum(&self) -> u64 {
        match self {
            Limit::Bucket { period, tokens, .. } => period.div_ceil(*tokens),
            Limit::Window { window, .. } => window / 4,
        }
    }
}

fn limits() -> impl Strategy<Value = Limit> {
    let periods = prop::sample::select(vec![("500ms", S / 2), ("1s", S), ("3s", 3 * S), ("1m", 60 * S)]);
    // Sometimes with a delay: a denied request then waits for its turn, counted when it comes.
    let delay =
        prop_oneof![Just(String::new()), (1u64..2000).prop_map(|ms| format!(r#","max_delay":"{ms}ms""#))];
    let bucket =
        (1u64..8, 1u64..5, periods.clone(), delay).prop_map(|(capacity, tokens, (p, period), delay)| {
            Limit::Bucket {
                json: format!(
                    r#"{{"capacity":{capacity},"refill_tokens":{tokens},"refill_period":"{p}"{delay}}}"#
                ),
                capacity,
                tokens,
                period,
            }
        });
    let gcra = (1u64..8, 1u64..5, periods.clone()).prop_map(|(burst, requests, (p, period))| Limit::Bucket {
        json: format!(r#"{{"algorithm":"gcra","requests":{requests},"period":"{p}","burst":{burst}}}"#),
        capacity: burst,
        tokens: requests,
        period,
    });
    let windows = (1u64..8, periods, prop::bool::ANY).prop_map(|(requests, (w, window), sliding)| {
        let algorithm = if sliding { "sliding_window" } else { "fixed_window" };
        Limit::Window {
            json: format!(r#"{{"algorithm":"{algorithm}","requests":{requests},"window":"{w}"}}"#),
            requests,
            window,
        }
    });
    // Many tokens per short period: a refill interval of a few nanoseconds, where rounding it
    // down would refill measurably faster than configured.
    let fast = (
        1u64..400,
        100_000u64..600_000,
        prop::sample::select(vec![("1ms", S / 1000), ("6ms", 6 * S / 1000)]),
    )
        .prop_map(|(capacity, tokens, (p, period))| Limit::Bucket {
            json: format!(r#"{{"capacity":{capacity},"refill_tokens":{tokens},"refill_period":"{p}"}}"#),
            capacity,
            tokens,
            period,
        });
    prop_oneof![bucket, gcra, windows, fast]
}

/// One request: which key, on which worker, how long after the previous one, at what cost.
#[derive(Clone, Copy, Debug)]
struct Arrival {
    key: u8,
    worker: usize,
    /// Nanoseconds since the previous arrival.
    after: u64,
    cost: u64,
}

fn arrivals(capacity: u64, quantum: u64) -> impl Strategy<Value = Vec<Arrival>> {
    // At once, a whole number of quanta later, or anywhere within one quantum.
    let after = prop_oneof![Just(0u64), (1u64..=6).prop_map(move |n| n * quantum), 1..=quantum];
    let one = (0u8..12, 0..WORKERS, after, 1..=capacity).prop_map(|(key, worker, after, cost)| Arrival {
        key,
        worker,
        after,
        cost,
    });
    prop::collection::vec(one, 1..160)
}

/// A worker's clock offset: none, a nanosecond, a microsecond, or the most, either way.
fn skew() -> impl Strategy<Value = i64> {
    prop::sample::select(vec![0, 1, -1, 1_000, -1_000, MAX_SKEW, -MAX_SKEW])
}

fn scenario() -> impl Strategy<Value = (Limit, Vec<Arrival>, [i64; WORKERS])> {
    limits().prop_flat_map(|limit| {
        let (capacity, quantum) = (limit.capacity(), limit.quantum());
        (Just(limit), arrivals(capacity, quantum), [skew(), skew(), skew()])
    })
}

/// Runs the arrivals; (key, clock reading of the admitting worker, cost) of every admission.
fn admissions(limit: &Limit, arrivals: &[Arrival], skews: &[i64; WORKERS]) -> Vec<(u8, u64, u64, u64)> {
    // 8 slots for 12 keys: keys are refused for a full table, and slots are reused as they idle.
    let json = format!(
        r#"{{"table_size":8,"when_table_full":"deny","rules":[{{"name":"r","key":[{{"source":"header","name":"x-key"}}],
        "cost":{{"header":"x-cost","max":{}}},"limit":{}}}]}}"#,
        limit.capacity(),
        limit.json()
    );
    let config = Config::parse(json.as_bytes()).unwrap_or_else(|e| panic!("{e}: {json}"));
    let store = MemoryStore::new();
    Table::whole(&config.key_prefix, config.table_size).initialize(&store).unwrap();
    let limiter = Limiter::new(config, 7);
    let mut now = T0;
    let mut admitted = Vec::new();
    for a in arrivals {
        now += a.after;
        let reading = now.saturating_add_signed(skews[a.worker]);
        let request = TestRequest::get("/")
            .with_header("x-key", format!("k{}", a.key))
            .with_header("x-cost", a.cost.to_string());
        if let Verdict::Allow { turn, .. } = limiter.check(&Env::at(&store, &request, reading, &Quiet)) {
            // A request that waits reaches the upstream at its turn.
            admitted.push((a.key, reading, turn.map_or(0, |t| t.wait), a.cost));
        }
    }
    admitted
}

/// When the limiter counts each admission of one key, in the bucket's own time: a worker whose
/// clock reads earlier than the key's last admission is counted at that admission's instant (the
/// state never goes back in time), so the instants are the clock readings made non-decreasing, in
/// the order decided; a request that waits is counted at its turn, its wait after that instant.
/// Sorted by instant.
fn counted_at(admitted: &[(u64, u64, u64)]) -> Vec<(u64, u64)> {
    let mut latest = 0;
    let mut counted: Vec<(u64, u64)> = admitted
        .iter()
        .map(|&(reading, wait, cost)| {
            latest = latest.max(reading);
            (latest + wait, cost)
        })
        .collect();
    counted.sort_unstable();
    counted
}

/// The first admission that breaks the limit's bound, described.
fn violation(limit: &Limit, admitted: &[(u8, u64, u64, u64)]) -> Option<String> {
    let mut per_key: HashMap<u8, Vec<(u64, u64, u64)>> = HashMap::new();
    for &(key, at, wait, cost) in admitted {
        per_key.entry(key).or_default().push((at, wait, cost));
    }
    for (key, list) in per_key {
        let list = counted_at(&list);
        match limit {
            Limit::Window { requests, window, .. } => {
                let mut per_window: HashMap<u64, u64> = HashMap::new();
                for (at, cost) in &list {
                    *per_window.entry(at / window).or_default() += cost;
                }
                if let Some((w, used)) = per_window.into_iter().find(|(_, used)| used > requests) {
                    return Some(format!("key k{key}: {used} units in window {w}, limit {requests}"));
                }
            }
            Limit::Bucket { capacity, tokens, period, .. } => {
                for i in 0..list.len() {
                    let mut used = 0;
                    for j in i..list.len() {
                        used += list[j].1;
                        let elapsed = u128::from(list[j].0 - list[i].0);
                        let refilled = elapsed * u128::from(*tokens) / u128::from(*period);
                        if u128::from(used) > u128::from(*capacity) + refilled {
                            return Some(format!(
                                "key k{key}: {used} units in {elapsed} ns, bound {capacity} + {refilled}"
                            ));
                        }
                    }
                }
            }
        }
    }
    None
}

proptest! {
    // No regression file is written: a failure prints its minimal input, to add as a unit test.
    #![proptest_config(ProptestConfig { cases: 1000, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn no_key_is_ever_admitted_beyond_its_limit_whatever_the_arrivals_costs_and_clock_skews(
        (limit, arrivals, skews) in scenario()
    ) {
        let admitted = admissions(&limit, &arrivals, &skews);
        prop_assert_eq!(violation(&limit, &admitted), None, "{:?}", limit);
    }
}
