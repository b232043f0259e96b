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

/// A script whose clock is `ARGV[8]` (after the lease's two arguments) instead of Redis' `TIME`.
fn at_given_time(script: String) -> redis::Script {
    let given = "\nlocal now = tonumber(ARGV[8])\n";
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
