//! Issue 10: what hostile or broken callers, a stalled Redis and changing files must not do.
// Test helpers: failing loudly is what they are for.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::*;

fn dbsize(redis: &RedisServer) -> i64 {
    redis::cmd("DBSIZE").query(&mut redis.conn()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_over_a_bound_are_invalid_argument_and_count_nothing() {
    clear_of_hour_edge();
    let redis = RedisServer::start();
    let svc = Service::start(&[
        "--redis-url",
        &redis.url(),
        "--max-descriptors",
        "4",
        "--max-entries",
        "2",
        "--max-value-bytes",
        "16",
        "--max-hits-per-descriptor",
        "10",
        "--max-hits-per-call",
        "15",
    ]);
    let mut c = svc.client().await;
    let one = |v: &str| desc_limit(&[("k", v)], 100, HOUR);
    let long = "x".repeat(17);
    let cases: Vec<(&str, &str, Vec<_>)> = vec![
        ("descriptors", "d", (0..5).map(|i| one(&i.to_string())).collect()),
        ("entries", "d", vec![desc_limit(&[("a", "1"), ("b", "2"), ("c", "3")], 100, HOUR)]),
        ("value", "d", vec![one(&long)]),
        ("key", "d", vec![desc_limit(&[(long.as_str(), "v")], 100, HOUR)]),
        ("domain", long.as_str(), vec![one("v")]),
        ("hits", "d", vec![with_hits(one("v"), 11)]),
        ("call hits", "d", vec![with_hits(one("a"), 8), with_hits(one("b"), 8)]),
    ];
    for (what, domain, descriptors) in cases {
        let e = call(&mut c, domain, descriptors).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{what}: {e}");
        assert!(e.message().contains("--max-"), "{what}: the message names the flag: {e}");
    }
    assert_eq!(dbsize(&redis), 0, "nothing was counted");
    // Exactly at every bound: allowed and counted.
    let at = vec![
        with_hits(desc_limit(&[("a", &"y".repeat(16)), ("b", "1")], 100, HOUR), 10),
        with_hits(one("2"), 5),
        with_hits(one("3"), 0),
        with_hits(one("4"), 0),
    ];
    let r = call(&mut c, &"z".repeat(16), at).await.unwrap();
    assert_eq!(r.overall_code, OK);
    assert_eq!(dbsize(&redis), 2);
    let (_, body) = svc.http_get("/metrics");
    assert!(body.contains("ratelimit_service_grpc_errors_total{status=\"invalid_argument\"} 7"), "{body}");
}
