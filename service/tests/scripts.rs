//! The Lua scripts inside real Redis, with the clock given by the test where it matters.
// Test helpers: failing loudly is what they are for.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::RedisServer;
use ratelimit_service::scripts;

const HOUR_MS: i64 = 3_600_000;

/// (allowed, remaining, ms_until_reset, window_start_ms, lease units granted, lease valid until)
type Reply = (i64, i64, i64, i64, i64, i64);

/// Runs a decision script: limit, hits, period, margin 1000, no deadline.
fn run(
    conn: &mut redis::Connection,
    script: &redis::Script,
    key: &str,
    limit: u64,
    hits: &str,
    period: i64,
) -> Reply {
    script.key(key).arg(limit).arg(hits).arg(period).arg(1000).arg(0).invoke(conn).unwrap()
}

#[test]
fn token_bucket_reset_is_bounded_for_huge_hits() {
    let redis = RedisServer::start();
    let mut conn = redis.conn();
    let bucket = redis::Script::new(&scripts::token_bucket());
    for hits in ["18446744073709551615", "9007199254740993", "51"] {
        let (allowed, remaining, reset, ..) = run(&mut conn, &bucket, "tb", 50, hits, HOUR_MS);
        assert_eq!((allowed, remaining), (0, 0), "{hits}");
        assert!(reset > 0 && reset <= HOUR_MS, "hits {hits}: reset {reset} ms");
    }
    let n: i64 = redis::cmd("EXISTS").arg("tb").query(&mut conn).unwrap();
    assert_eq!(n, 0, "a denied cost writes nothing");
}

/// A script whose clock is `ARGV[9]` (after the lease's two arguments and the charge flag)
/// instead of Redis' `TIME`.
fn at_given_time(script: String) -> redis::Script {
    let given = "\nlocal now = tonumber(ARGV[9])\n";
    assert!(script.contains(scripts::NOW));
    redis::Script::new(&script.replace(scripts::NOW, given))
}

fn run_at(
    conn: &mut redis::Connection,
    script: &redis::Script,
    key: &str,
    hits: u64,
    period: i64,
    now: i64,
) -> Reply {
    script
        .key(key)
        .arg(10)
        .arg(hits)
        .arg(period)
        .arg(1000)
        .arg(0)
        .arg(0)
        .arg(0)
        .arg(0)
        .arg(now)
        .invoke(conn)
        .unwrap()
}

#[test]
fn a_clock_going_back_keeps_counting_in_the_later_window() {
    let redis = RedisServer::start();
    let mut conn = redis.conn();
    let later = 1_767_225_600_000; // 2026-01-01T00:00Z: an hour, a month and a year start here.
    let cases = [
        ("fixed hour", scripts::fixed_window(), HOUR_MS),
        ("fixed month", scripts::fixed_window(), 0),
        ("sliding hour", scripts::sliding_window(), HOUR_MS),
        ("token bucket hour", scripts::token_bucket(), HOUR_MS),
    ];
    for (what, text, period) in cases {
        let script = at_given_time(text);
        let r = run_at(&mut conn, &script, what, 3, period, later + 1000);
        assert_eq!((r.0, r.1), (1, 7), "{what}");
        // A failover to a replica whose clock lags by a minute: back in the earlier window.
        let r = run_at(&mut conn, &script, what, 1, period, later - 60_000);
        assert_eq!(r.0, 1, "{what}");
        assert!(r.1 <= 6, "{what}: the 3 hits of the later window were lost: {r:?}");
        if period != HOUR_MS || what.starts_with("token") {
            continue;
        }
        let (w, c): (i64, i64) = redis::cmd("HMGET").arg(what).arg("w").arg("c").query(&mut conn).unwrap();
        assert_eq!((w, c), (later, 4), "{what}");
    }
}

/// Runs a decision script at time `now` with limit 10, no lease, and the charge flag given.
fn run_charge(
    conn: &mut redis::Connection,
    script: &redis::Script,
    key: &str,
    hits: u64,
    period: i64,
    charge: bool,
    now: i64,
) -> Reply {
    script
        .key(key)
        .arg(10)
        .arg(hits)
        .arg(period)
        .arg(1000)
        .arg(0)
        .arg(0)
        .arg(0)
        .arg(u8::from(charge))
        .arg(now)
        .invoke(conn)
        .unwrap()
}

/// Limit 10 an hour, a charge of 15 one second into the hour: counted, answered over the limit,
/// and every later call is denied until the overdraft is made up, which each algorithm reports
/// as its reset: the fixed window at its end, the sliding window once the overdrawn window's
/// decaying share leaves room, the token bucket once it has refilled the debt.
#[test]
fn a_charge_past_the_limit_is_counted_and_denies_until_made_up() {
    let redis = RedisServer::start();
    let mut conn = redis.conn();
    let hour = 1_767_225_600_000; // 2026-01-01T00:00Z
    let t0 = hour + 1000;
    let cases = [
        // (what, script, ms from t0 until one hit fits again)
        ("fixed", scripts::fixed_window(), HOUR_MS - 1000),
        // Next window: 15 * weight <= 9 once 40% of it has passed.
        ("sliding", scripts::sliding_window(), HOUR_MS - 1000 + HOUR_MS * 2 / 5),
        // 15 units at 6 min each from a full bucket of 10: 5 units of debt, then one more unit.
        ("bucket", scripts::token_bucket(), 6 * 360_000),
    ];
    for (what, text, made_up) in cases {
        let s = at_given_time(text);
        let r = run_charge(&mut conn, &s, what, 15, HOUR_MS, true, t0);
        assert_eq!((r.0, r.1), (0, 0), "{what}: {r:?}");
        assert!((r.2 - made_up).abs() <= 1, "{what}: reset {} ms, expected {made_up}", r.2);
        // An ordinary call for 1 hit is denied, uncounted, with the same reset.
        let r = run_charge(&mut conn, &s, what, 1, HOUR_MS, false, t0 + 1);
        assert_eq!((r.0, r.1), (0, 0), "{what}: {r:?}");
        assert!((r.2 - (made_up - 1)).abs() <= 1, "{what}: reset {} ms, expected {}", r.2, made_up - 1);
        // Still denied just before the overdraft is made up, admitted from then on.
        let r = run_charge(&mut conn, &s, what, 1, HOUR_MS, false, t0 + made_up - 2);
        assert_eq!(r.0, 0, "{what}: admitted before the overdraft was made up: {r:?}");
        let r = run_charge(&mut conn, &s, what, 1, HOUR_MS, false, t0 + made_up + 1);
        assert_eq!(r.0, 1, "{what}: still denied after the reported reset: {r:?}");
        let ttl: i64 = redis::cmd("PTTL").arg(what).query(&mut conn).unwrap();
        assert!(ttl > 0, "{what}: the state must keep a TTL, got {ttl}");
    }
    // The fixed window's next window starts from zero: 1 hit counted leaves 9 (checked above at
    // the window's start), and the overdraft of the previous window is gone.
    let (w, c): (i64, i64) = redis::cmd("HMGET").arg("fixed").arg("w").arg("c").query(&mut conn).unwrap();
    assert_eq!((w, c), (hour + HOUR_MS, 1));
}

/// The token bucket's key lives as long as its debt: an expired key would be a full bucket.
#[test]
fn a_charged_bucket_keeps_its_key_until_the_debt_is_refilled() {
    let redis = RedisServer::start();
    let mut conn = redis.conn();
    let s = at_given_time(scripts::token_bucket());
    let now = 1_767_225_600_000;
    // 15 units at 6 min each: the time is 90 min ahead, 30 min past the burst.
    run_charge(&mut conn, &s, "tb", 15, HOUR_MS, true, now);
    let ttl: i64 = redis::cmd("PTTL").arg("tb").query(&mut conn).unwrap();
    assert!(ttl > 5_400_000 - 60_000 && ttl <= 5_400_000 + 1000, "ttl {ttl} ms");
    let tat: f64 = redis::cmd("GET").arg("tb").query::<String>(&mut conn).unwrap().parse().unwrap();
    assert_eq!(tat, (now + 5_400_000) as f64);
}

/// A bucket charged far past its burst, again and again: the time stays an exact number, its debt
/// stops at `MAX_DEBT_MS`, the TTL and every later reply stay within it, and a cost that can never
/// fit reports at most a period past the debt.
#[test]
fn a_bucket_deep_in_debt_stays_exact_and_bounded() {
    let redis = RedisServer::start();
    let mut conn = redis.conn();
    let s = at_given_time(scripts::token_bucket());
    let now = 1_767_225_600_000;
    let max = scripts::MAX_DEBT_MS as i64;
    // Limit 10 a day: 2.4 h per unit, a million units 274 years each charge.
    let day = 24 * HOUR_MS;
    for _ in 0..3 {
        let r = run_charge(&mut conn, &s, "deep", 1_000_000, day, true, now);
        assert_eq!((r.0, r.1), (0, 0), "{r:?}");
        assert!(r.2 > 0 && r.2 <= max, "{r:?}");
    }
    let tat: f64 = redis::cmd("GET").arg("deep").query::<String>(&mut conn).unwrap().parse().unwrap();
    assert_eq!(tat, (now + max) as f64, "the debt stops at MAX_DEBT_MS");
    let ttl: i64 = redis::cmd("PTTL").arg("deep").query(&mut conn).unwrap();
    assert!(ttl > max - day && ttl <= max + 1000, "ttl {ttl} ms");
    // A hit that fits once the debt is refilled waits for exactly that.
    let r = run_charge(&mut conn, &s, "deep", 1, day, false, now);
    assert_eq!(r.0, 0);
    assert_eq!(r.2, max - day + day / 10);
    // A cost above the limit never fits: bounded at a period past the debt.
    let r = run_charge(&mut conn, &s, "deep", 11, day, false, now);
    assert_eq!((r.0, r.2), (0, max - day + day));
}

/// What fits is answered as an ordinary admitted call; a charge of 0 hits counts nothing; a
/// charge against a limit of 0 counts nothing.
#[test]
fn a_charge_that_fits_is_answered_as_an_admitted_call() {
    let redis = RedisServer::start();
    let mut conn = redis.conn();
    let now = 1_767_225_600_000 + 1000;
    for (what, text) in [
        ("fixed", scripts::fixed_window()),
        ("sliding", scripts::sliding_window()),
        ("bucket", scripts::token_bucket()),
    ] {
        let s = at_given_time(text);
        let r = run_charge(&mut conn, &s, what, 4, HOUR_MS, true, now);
        assert_eq!((r.0, r.1), (1, 6), "{what}: {r:?}");
        let r = run_charge(&mut conn, &s, what, 0, HOUR_MS, true, now);
        assert_eq!((r.0, r.1), (1, 6), "{what}: {r:?}");
        let r = run_charge(&mut conn, &s, what, 6, HOUR_MS, true, now);
        assert_eq!((r.0, r.1), (1, 0), "{what}: exactly at the limit is not over it: {r:?}");
        let zero: (i64, i64, i64, i64, i64, i64) = s
            .key(format!("{what}-zero"))
            .arg(0)
            .arg(5)
            .arg(HOUR_MS)
            .arg(1000)
            .arg(0)
            .arg(0)
            .arg(0)
            .arg(1)
            .arg(now)
            .invoke(&mut conn)
            .unwrap();
        assert_eq!(zero.0, 0, "{what}");
        let n: i64 = redis::cmd("EXISTS").arg(format!("{what}-zero")).query(&mut conn).unwrap();
        assert_eq!(n, 0, "{what}: a limit of 0 counts nothing");
    }
}
