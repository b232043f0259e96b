//! The Lua scripts inside real Redis, with the clock given by the test where it matters.
// Test helpers: failing loudly is what they are for.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::RedisServer;
use ratelimit_service::scripts;

const HOUR_MS: i64 = 3_600_000;

/// (allowed, remaining, ms_until_reset, window_start_ms)
type Reply = (i64, i64, i64, i64);

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
        let (allowed, remaining, reset, _) = run(&mut conn, &bucket, "tb", 50, hits, HOUR_MS);
        assert_eq!((allowed, remaining), (0, 0), "{hits}");
        assert!(reset > 0 && reset <= HOUR_MS, "hits {hits}: reset {reset} ms");
    }
    let n: i64 = redis::cmd("EXISTS").arg("tb").query(&mut conn).unwrap();
    assert_eq!(n, 0, "a denied cost writes nothing");
}
