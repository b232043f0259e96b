//! Charges (`x-ratelimit-wasm-charge: 1` on `ShouldRateLimit`): usage that has already happened is
//! counted even past the limit, against real redis-server processes. The scripts' own timing
//! (when the overdraft is made up) is checked with a given clock in tests/scripts.rs.
// Test helpers: failing loudly is what they are for.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::*;
use envoy_types::pb::envoy::extensions::common::ratelimit::v3::RateLimitDescriptor;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_client::RateLimitServiceClient;
use envoy_types::pb::envoy::service::ratelimit::v3::RateLimitResponse;
use tonic::transport::Channel;

const CHARGE: (&str, &str) = ("x-ratelimit-wasm-charge", "1");

async fn charge(
    c: &mut RateLimitServiceClient<Channel>,
    domain: &str,
    descriptors: Vec<RateLimitDescriptor>,
) -> RateLimitResponse {
    call_with(c, domain, descriptors, &[CHARGE]).await.unwrap()
}

fn reset_ms(r: &RateLimitResponse, i: usize) -> i64 {
    let d = r.statuses[i].duration_until_reset.unwrap();
    d.seconds * 1000 + i64::from(d.nanos) / 1_000_000
}

fn ms_to_hour_end() -> i64 {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() as i64;
    3_600_000 - now % 3_600_000
}

/// Limit 10 an hour, a charge of 15: counted, answered OVER_LIMIT with nothing remaining, and an
/// ordinary call for 1 hit is then denied, with the reset each algorithm makes up the overdraft
/// by: the fixed window's end; the sliding window's end plus the 40% of the next window after
/// which its decaying share of 15 leaves room for one; the token bucket's 5 units of debt plus one
/// unit, at 6 minutes each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_charge_past_the_limit_is_counted_for_each_algorithm() {
    clear_of_hour_edge();
    let redis = RedisServer::start();
    for (a, svc) in services(&redis, &[]) {
        let mut c = svc.client().await;
        let d = desc_limit(&[("user", a)], 10, HOUR);
        let expected = match a {
            "fixed_window" => ms_to_hour_end(),
            "sliding_window" => ms_to_hour_end() + 1_440_000,
            _ => 2_160_000,
        };
        let r = charge(&mut c, "charge", vec![with_hits(d.clone(), 15)]).await;
        assert_eq!(
            (r.overall_code, r.statuses[0].code, r.statuses[0].limit_remaining),
            (OVER, OVER, 0),
            "{a}"
        );
        // Redis' clock against ours, and the time the calls take.
        let slack = 5_000;
        assert!(
            (reset_ms(&r, 0) - expected).abs() < slack,
            "{a}: reset {} ms, expected {expected}",
            reset_ms(&r, 0)
        );
        let r = call(&mut c, "charge", vec![d.clone()]).await.unwrap();
        assert_eq!((r.overall_code, r.statuses[0].limit_remaining), (OVER, 0), "{a}: the overdraft denies");
        assert!(
            (reset_ms(&r, 0) - expected).abs() < slack,
            "{a}: reset {} ms, expected {expected}",
            reset_ms(&r, 0)
        );
        // Another key is not touched.
        let r = call(&mut c, "charge", vec![desc_limit(&[("user", "other")], 10, HOUR)]).await.unwrap();
        assert_eq!((r.overall_code, r.statuses[0].limit_remaining), (OK, 9), "{a}");
        redis::cmd("FLUSHALL").query::<()>(&mut redis.conn()).unwrap();
    }
}

/// The brief's case, with the filter's calls: a quota of 1,000 tokens a day, each request admitted
/// for an estimate of 1 token, then charged the 299 its response used beyond it. With charges the
/// fourth response's usage is counted and the fifth request is denied; without the header (a
/// service that refuses what does not fit, uncounted) the quota never runs out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daily_token_quota_runs_out_with_charges_and_not_without() {
    clear_of_window_edge(Duration::from_secs(86_400), Duration::from_secs(60));
    let redis = RedisServer::start();
    for (a, svc) in services(&redis, &[]) {
        let mut c = svc.client().await;
        for (with_header, admitted) in [(true, 4), (false, 10)] {
            let d = desc_limit(&[("plan", &format!("{a}-{with_header}"))], 1000, DAY);
            let headers: &[(&'static str, &str)] = if with_header { &[CHARGE] } else { &[] };
            let mut n = 0;
            for _ in 0..10 {
                let r = call(&mut c, "tokens", vec![d.clone()]).await.unwrap();
                if r.overall_code != OK {
                    break;
                }
                n += 1;
                call_with(&mut c, "tokens", vec![with_hits(d.clone(), 299)], headers).await.unwrap();
            }
            assert_eq!(n, admitted, "{a}, charge header {with_header}");
        }
    }
}

/// A charge counts in every descriptor and gives nothing back when one of them is over, unlike an
/// ordinary call (all or nothing). Counted in `charges_total`, not among the decisions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_charge_counts_in_every_descriptor_and_keeps_its_hits() {
    clear_of_hour_edge();
    let redis = RedisServer::start();
    for (a, svc) in services(&redis, &[]) {
        let mut c = svc.client().await;
        let small = desc_limit(&[("user", "u")], 10, HOUR);
        let big = desc_limit(&[("tenant", "t")], 100, HOUR);
        let r = charge(&mut c, "multi", vec![with_hits(small.clone(), 15), with_hits(big.clone(), 15)]).await;
        assert_eq!(r.overall_code, OVER, "{a}");
        assert_eq!((r.statuses[0].code, r.statuses[0].limit_remaining), (OVER, 0), "{a}");
        assert_eq!((r.statuses[1].code, r.statuses[1].limit_remaining), (OK, 85), "{a}");
        let r = call(&mut c, "multi", vec![big.clone()]).await.unwrap();
        assert_eq!((r.overall_code, r.statuses[0].limit_remaining), (OK, 84), "{a}: the charge was kept");
        // An ordinary call over one descriptor keeps nothing in the other.
        let r = call(&mut c, "multi", vec![small.clone(), big.clone()]).await.unwrap();
        assert_eq!(r.overall_code, OVER, "{a}");
        let r = call(&mut c, "multi", vec![big]).await.unwrap();
        assert_eq!(r.statuses[0].limit_remaining, 83, "{a}");
        let (_, body) = svc.http_get("/metrics");
        assert!(
            body.contains("ratelimit_service_charges_total{domain=\"multi\",code=\"over_limit\"} 1"),
            "{body}"
        );
        assert!(body.contains("ratelimit_service_decisions_total{domain=\"multi\",code=\"ok\"} 2"), "{body}");
        assert!(
            body.contains("ratelimit_service_decisions_total{domain=\"multi\",code=\"over_limit\"} 1"),
            "{body}"
        );
        redis::cmd("FLUSHALL").query::<()>(&mut redis.conn()).unwrap();
    }
}

/// Without the header a call is as before: 15 hits on a limit of 10 are refused and not counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_header_hits_that_do_not_fit_are_not_counted() {
    clear_of_hour_edge();
    let redis = RedisServer::start();
    for (a, svc) in services(&redis, &[]) {
        let mut c = svc.client().await;
        let d = desc_limit(&[("user", a)], 10, HOUR);
        let r = call(&mut c, "plain", vec![with_hits(d.clone(), 15)]).await.unwrap();
        assert_eq!(r.overall_code, OVER, "{a}");
        let r = call(&mut c, "plain", vec![d]).await.unwrap();
        assert_eq!((r.overall_code, r.statuses[0].limit_remaining), (OK, 9), "{a}");
        let (_, body) = svc.http_get("/metrics");
        assert!(!body.contains("ratelimit_service_charges_total{"), "{body}");
    }
}

/// A value other than 1, a charge with a lease, a charge over the hits bounds: INVALID_ARGUMENT
/// naming the header (or the flag), and nothing counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_charges_are_invalid_argument_and_count_nothing() {
    clear_of_hour_edge();
    let redis = RedisServer::start();
    let svc = Service::start(&["--redis-url", &redis.url(), "--max-hits-per-descriptor", "100"]);
    let mut c = svc.client().await;
    let d = desc_limit(&[("user", "bad")], 10, HOUR);
    type Case<'a> = (&'a [(&'static str, &'a str)], u64, &'a str);
    let cases: [Case; 5] = [
        (&[("x-ratelimit-wasm-charge", "yes")], 5, "x-ratelimit-wasm-charge: \"yes\" is not 1"),
        (&[("x-ratelimit-wasm-charge", "0")], 5, "x-ratelimit-wasm-charge"),
        (&[("x-ratelimit-wasm-charge", "true")], 5, "x-ratelimit-wasm-charge"),
        (&[CHARGE, ("x-ratelimit-wasm-lease", "5")], 5, "cannot be combined with x-ratelimit-wasm-lease"),
        (&[CHARGE], 101, "--max-hits-per-descriptor"),
    ];
    for (headers, hits, message) in cases {
        let e = call_with(&mut c, "bad", vec![with_hits(d.clone(), hits)], headers).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{headers:?}");
        assert!(e.message().contains(message), "{headers:?}: {}", e.message());
    }
    let r = call(&mut c, "bad", vec![d]).await.unwrap();
    assert_eq!((r.overall_code, r.statuses[0].limit_remaining), (OK, 9));
}

/// Shadow mode counts a charge as usual and never denies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_shadow_mode_a_charge_is_counted_and_nothing_denied() {
    clear_of_hour_edge();
    let redis = RedisServer::start();
    let svc = Service::start(&["--redis-url", &redis.url(), "--shadow-mode"]);
    let mut c = svc.client().await;
    let d = desc_limit(&[("user", "shadow")], 10, HOUR);
    let r = charge(&mut c, "sh", vec![with_hits(d.clone(), 15)]).await;
    assert_eq!((r.overall_code, r.statuses[0].code, r.statuses[0].limit_remaining), (OK, OK, 0));
    let r = call(&mut c, "sh", vec![d]).await.unwrap();
    assert_eq!((r.overall_code, r.statuses[0].limit_remaining), (OK, 0), "the charge was counted");
}
