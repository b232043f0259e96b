//! Quota leases (issue 13, service side): `x-ratelimit-wasm-lease` on `ShouldRateLimit` and
//! `ratelimitwasm.lease.v1.Leases/Return`, against real redis-server processes.
// Test helpers: failing loudly is what they are for.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::*;
use envoy_types::pb::envoy::extensions::common::ratelimit::v3::RateLimitDescriptor;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::quota::ExpirationSpecifier;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::Quota;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_client::RateLimitServiceClient;
use envoy_types::pb::envoy::service::ratelimit::v3::RateLimitResponse;
use ratelimit_service::grpc::MessageCodec;
use ratelimit_service::lease::{ReturnRequest, ReturnResponse, RETURN_PATH};
use ratelimit_service::metrics::Metrics;
use tonic::codegen::http::uri::PathAndQuery;
use tonic::transport::Channel;

fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() as i64
}

/// A call asking for a lease of `k` units.
async fn lease(
    c: &mut RateLimitServiceClient<Channel>,
    domain: &str,
    descriptors: Vec<RateLimitDescriptor>,
    k: u64,
) -> RateLimitResponse {
    call_with(c, domain, descriptors, &[("x-ratelimit-wasm-lease", &k.to_string())]).await.unwrap()
}

/// The quota of the response: the same on every descriptor, or absent from all.
fn quota(r: &RateLimitResponse) -> Option<Quota> {
    let q = r.statuses[0].quota.clone();
    for s in &r.statuses {
        assert_eq!(s.quota, q, "every descriptor carries the same quota: {r:?}");
    }
    q
}

fn granted(r: &RateLimitResponse) -> u64 {
    quota(r).map_or(0, |q| u64::from(q.requests))
}

fn valid_until_ms(q: &Quota) -> i64 {
    let Some(ExpirationSpecifier::ValidUntil(t)) = q.expiration_specifier else {
        panic!("no valid_until: {q:?}")
    };
    t.seconds * 1000 + i64::from(t.nanos) / 1_000_000
}

async fn give_back(
    addr: SocketAddr,
    domain: &str,
    descriptors: Vec<RateLimitDescriptor>,
    id: &str,
    units: u64,
) -> Result<u64, tonic::Status> {
    let ch =
        tonic::transport::Endpoint::from_shared(format!("http://{addr}")).unwrap().connect().await.unwrap();
    let mut g = tonic::client::Grpc::new(ch);
    g.ready().await.unwrap();
    let codec =
        MessageCodec::<ReturnRequest, ReturnResponse>::new(Arc::new(Metrics::default()), usize::MAX, |_| {});
    let req = ReturnRequest { domain: domain.into(), descriptors, id: id.into(), units };
    g.unary(tonic::Request::new(req), PathAndQuery::from_static(RETURN_PATH), codec)
        .await
        .map(|r| r.into_inner().refunded)
}

fn lease_keys(redis: &RedisServer) -> Vec<String> {
    redis::cmd("KEYS").arg("*:lease:*").query(&mut redis.conn()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grant_never_exceeds_what_remains_for_each_algorithm() {
    clear_of_hour_edge();
    let redis = RedisServer::start();
    for (a, svc) in services(&redis, &[]) {
        let mut c = svc.client().await;
        let d = desc_limit(&[("user", a)], 12, HOUR);
        let mut ids = Vec::new();
        // 12 = (1 + 4) + (1 + 4) + (1 + 1): the third grant is what remained after its own hit.
        for (g, remaining) in [(4, 7), (4, 2), (1, 0)] {
            let before = now_ms();
            let r = lease(&mut c, "lease", vec![d.clone()], 4).await;
            assert_eq!(r.overall_code, OK, "{a}");
            let q = quota(&r).unwrap_or_else(|| panic!("{a}: no quota in {r:?}"));
            assert_eq!(q.requests, g, "{a}");
            assert_eq!(r.statuses[0].limit_remaining, remaining, "{a}");
            let until = valid_until_ms(&q);
            // Default validity 10 s; the hour's window is more than a minute from its end. The
            // slack is for Redis' clock, which the service reads, against ours.
            assert!(until > before && until <= now_ms() + 10_000 + 1000, "{a}: {until} vs {before}");
            assert!(!q.id.is_empty() && q.id.len() <= 128, "{a}: {}", q.id);
            ids.push(q.id);
        }
        ids.sort();
        ids.dedup();
        assert_eq!(ids.len(), 3, "{a}: one id per grant");
        let r = lease(&mut c, "lease", vec![d.clone()], 4).await;
        assert_eq!(r.overall_code, OVER, "{a}");
        assert_eq!(quota(&r), None, "{a}");
        // Limit 11: 1 + 4, 1 + 4, then 1 + 0, then over.
        let d = desc_limit(&[("user", a), ("n", "11")], 11, HOUR);
        for g in [4, 4, 0] {
            let r = lease(&mut c, "lease", vec![d.clone()], 4).await;
            assert_eq!((r.overall_code, granted(&r)), (OK, g), "{a}");
        }
        assert_eq!(lease(&mut c, "lease", vec![d.clone()], 4).await.overall_code, OVER, "{a}");
        // The units are spent in the algorithm's state: a plain call sees them gone.
        assert_eq!(call(&mut c, "lease", vec![d]).await.unwrap().overall_code, OVER, "{a}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_grants_never_exceed_the_limit_for_each_algorithm() {
    clear_of_hour_edge();
    let redis = RedisServer::start();
    for (a, svc) in services(&redis, &[]) {
        let client = svc.client().await;
        for round in 0..3 {
            // A fresh key each round: the first calls race to create it.
            let d = desc_limit(&[("user", &format!("{a}-{round}"))], 50, HOUR);
            let mut set = tokio::task::JoinSet::new();
            for i in 0..60u64 {
                let mut c = client.clone();
                let d = d.clone();
                set.spawn(async move { lease(&mut c, "race", vec![d], 1 + i % 7).await });
            }
            let mut admitted = 0;
            while let Some(r) = set.join_next().await {
                let r = r.unwrap();
                if r.overall_code == OK {
                    admitted += 1 + granted(&r);
                } else {
                    assert_eq!(quota(&r), None, "{a}");
                }
            }
            // 60 calls asking for up to 8 each: the limit is reached, and never passed.
            assert_eq!(admitted, 50, "{a} round {round}: hits + granted units");
            let mut c = client.clone();
            assert_eq!(call(&mut c, "race", vec![d]).await.unwrap().overall_code, OVER, "{a}");
        }
        // Two descriptors: each call's grant is the smaller remaining; the shared one never passes 30.
        let shared = desc_limit(&[("tenant", a)], 30, HOUR);
        let mut set = tokio::task::JoinSet::new();
        for i in 0..40 {
            let mut c = client.clone();
            let ds = vec![shared.clone(), desc_limit(&[("user", &format!("{a}-two-{i}"))], 1000, HOUR)];
            set.spawn(async move { lease(&mut c, "race", ds, 5).await });
        }
        let mut admitted = 0;
        while let Some(r) = set.join_next().await {
            let r = r.unwrap();
            if r.overall_code == OK {
                admitted += 1 + granted(&r);
            }
        }
        assert!(admitted <= 30, "{a}: {admitted} admitted on a limit of 30");
        assert!(admitted > 0, "{a}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_descriptors_share_one_grant_the_smallest_remaining() {
    clear_of_hour_edge();
    let redis = RedisServer::start();
    for (a, svc) in services(&redis, &[]) {
        let mut c = svc.client().await;
        let big = desc_limit(&[("big", a)], 10, HOUR);
        let small = desc_limit(&[("small", a)], 3, HOUR);
        let free = desc(&[("no_rule", a)]);
        let r = lease(&mut c, "multi", vec![big.clone(), small.clone(), free.clone()], 5).await;
        assert_eq!((r.overall_code, granted(&r)), (OK, 2), "{a}: min(5, 9, 2)");
        assert_eq!(r.statuses[0].limit_remaining, 7, "{a}: big gave back what it took beyond 2");
        assert_eq!(r.statuses[1].limit_remaining, 0, "{a}");
        assert!(r.statuses[2].current_limit.is_none(), "{a}");
        // Big really got its 3 extra units back: 7 remain.
        let r = call(&mut c, "multi", vec![big.clone()]).await.unwrap();
        assert_eq!(r.statuses[0].limit_remaining, 6, "{a}");
        // Small is spent, so a request naming both is over and takes nothing from big.
        let r = lease(&mut c, "multi", vec![big.clone(), small], 5).await;
        assert_eq!((r.overall_code, quota(&r)), (OVER, None), "{a}");
        let r = call(&mut c, "multi", vec![big]).await.unwrap();
        assert_eq!(
            r.statuses[0].limit_remaining, 5,
            "{a}: the denied request's hit and grant were given back"
        );
        // An unlimited descriptor does not constrain the grant, and alone grants nothing.
        let r = lease(&mut c, "multi", vec![free.clone(), desc_limit(&[("other", a)], 100, HOUR)], 7).await;
        assert_eq!(granted(&r), 7, "{a}");
        let r = lease(&mut c, "multi", vec![free], 7).await;
        assert_eq!((r.overall_code, quota(&r)), (OK, None), "{a}");
    }
    // Only live leases are kept: the granted ones, each with a TTL.
    for k in lease_keys(&redis) {
        let ttl: i64 = redis::cmd("PTTL").arg(&k).query(&mut redis.conn()).unwrap();
        assert!(ttl > 0 && ttl <= 10_000, "{k}: {ttl}");
        let n: u64 = redis::cmd("HGET").arg(&k).arg("n").query(&mut redis.conn()).unwrap();
        assert!(n == 2 || n == 7, "{k}: {n}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_lease_header_nothing_changes() {
    clear_of_hour_edge();
    let redis = RedisServer::start();
    for (a, svc) in services(&redis, &[]) {
        let mut c = svc.client().await;
        let d = desc_limit(&[("plain", a)], 3, HOUR);
        // The validity header alone asks for nothing.
        let headers: [&[(&'static str, &str)]; 2] = [&[], &[("x-ratelimit-wasm-lease-validity-ms", "5000")]];
        for (i, h) in headers.iter().cycle().take(3).enumerate() {
            let r = call_with(&mut c, "plain", vec![d.clone()], h).await.unwrap();
            assert_eq!(r.overall_code, OK, "{a}");
            assert_eq!(r.statuses[0].limit_remaining, 2 - i as u32, "{a}");
            assert_eq!(quota(&r), None, "{a}");
        }
        assert_eq!(call(&mut c, "plain", vec![d]).await.unwrap().overall_code, OVER, "{a}");
    }
    assert!(lease_keys(&redis).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn return_refunds_exactly_and_at_most_once() {
    clear_of_hour_edge();
    let redis = RedisServer::start();
    for (a, svc) in services(&redis, &[]) {
        let mut c = svc.client().await;
        let d = desc_limit(&[("ret", a)], 10, HOUR);
        let r = lease(&mut c, "ret", vec![d.clone()], 4).await;
        let q = quota(&r).unwrap();
        assert_eq!((q.requests, r.statuses[0].limit_remaining), (4, 5), "{a}");
        assert_eq!(give_back(svc.grpc, "ret", vec![d.clone()], &q.id, 3).await.unwrap(), 3, "{a}");
        // The lease is closed: a second return (or a retry) gives nothing.
        assert_eq!(give_back(svc.grpc, "ret", vec![d.clone()], &q.id, 1).await.unwrap(), 0, "{a}");
        assert_eq!(give_back(svc.grpc, "ret", vec![d.clone()], &q.id, 3).await.unwrap(), 0, "{a}");
        let r = call(&mut c, "ret", vec![d.clone()]).await.unwrap();
        assert_eq!(r.statuses[0].limit_remaining, 7, "{a}: 5 + 3 given back - 1");
        // Asking back more than the lease holds gives back what it holds, once.
        let r = lease(&mut c, "ret", vec![d.clone()], 4).await;
        let q = quota(&r).unwrap();
        assert_eq!((q.requests, r.statuses[0].limit_remaining), (4, 2), "{a}");
        assert_eq!(give_back(svc.grpc, "ret", vec![d.clone()], &q.id, u64::MAX).await.unwrap(), 4, "{a}");
        assert_eq!(give_back(svc.grpc, "ret", vec![d.clone()], &q.id, u64::MAX).await.unwrap(), 0, "{a}");
        let r = call(&mut c, "ret", vec![d.clone()]).await.unwrap();
        assert_eq!(r.statuses[0].limit_remaining, 5, "{a}");
        // Unknown ids, other descriptors and other domains create nothing.
        assert_eq!(give_back(svc.grpc, "ret", vec![d.clone()], "no-such-lease", 5).await.unwrap(), 0);
        let other = desc_limit(&[("ret", a), ("x", "y")], 10, HOUR);
        let r = lease(&mut c, "ret", vec![d.clone()], 2).await;
        let q = quota(&r).unwrap();
        assert_eq!(give_back(svc.grpc, "ret", vec![other], &q.id, 2).await.unwrap(), 0, "{a}");
        assert_eq!(give_back(svc.grpc, "other", vec![d.clone()], &q.id, 2).await.unwrap(), 0, "{a}");
        let r = call(&mut c, "ret", vec![d.clone()]).await.unwrap();
        assert_eq!(r.statuses[0].limit_remaining, 1, "{a}: 5 - 1 - 2 - 1");
        // Bad requests.
        for (what, id, ds) in [
            ("empty id", "", vec![d.clone()]),
            ("id with a brace", "a}b", vec![d.clone()]),
            ("long id", &"a".repeat(129) as &str, vec![d.clone()]),
            ("no descriptors", "abc", vec![]),
        ] {
            let e = give_back(svc.grpc, "ret", ds, id, 1).await.unwrap_err();
            assert_eq!(e.code(), tonic::Code::InvalidArgument, "{a} {what}: {e}");
        }
        assert_eq!(metric(&svc, "ratelimit_service_leases_granted_total "), 3, "{a}");
        assert_eq!(metric(&svc, "ratelimit_service_lease_units_granted_total "), 10, "{a}");
        assert_eq!(metric(&svc, "ratelimit_service_lease_units_refunded_total "), 7, "{a}");
        assert_eq!(metric(&svc, "ratelimit_service_lease_returns_total{outcome=\"refunded\"}"), 2, "{a}");
        assert_eq!(metric(&svc, "ratelimit_service_lease_returns_total{outcome=\"nothing\"}"), 6, "{a}");
        assert_eq!(metric(&svc, "ratelimit_service_lease_returns_total{outcome=\"invalid_argument\"}"), 4);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refund_into_a_full_token_bucket_gives_nothing() {
    let redis = RedisServer::start();
    let svc = Service::start(&["--redis-url", &redis.url(), "--default-algorithm", "token_bucket"]);
    let mut c = svc.client().await;
    let d = desc_limit(&[("tb", "cap")], 10, HOUR);
    let r = lease(&mut c, "cap", vec![d.clone()], 4).await;
    let q = quota(&r).unwrap();
    // Someone deletes the bucket (or it expired full): the units have nowhere to go back to.
    let _: i64 = redis::cmd("DEL").arg("rl:{cap|tb=cap}:tb:h").query(&mut redis.conn()).unwrap();
    assert_eq!(give_back(svc.grpc, "cap", vec![d.clone()], &q.id, 4).await.unwrap(), 0);
    let r = call(&mut c, "cap", vec![d]).await.unwrap();
    assert_eq!(r.statuses[0].limit_remaining, 9, "a full bucket, not a fuller one");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn return_is_refused_once_the_window_or_validity_ended() {
    let redis = RedisServer::start();
    for (a, svc) in services(&redis, &[]) {
        let mut c = svc.client().await;
        let d = desc_limit(&[("late", a)], 1000, SECOND);
        // A long validity: the window algorithms cut it at the end of the current second; the
        // bucket keeps the asked 300 ms.
        let validity = if a == "token_bucket" { "300" } else { "3600000" };
        let h = [("x-ratelimit-wasm-lease", "50"), ("x-ratelimit-wasm-lease-validity-ms", validity)];
        let before = now_ms();
        let r = call_with(&mut c, "late", vec![d.clone()], &h).await.unwrap();
        let q = quota(&r).unwrap();
        let until = valid_until_ms(&q);
        if a == "token_bucket" {
            assert!(until > before && until <= now_ms() + 300 + 1000, "{a}: {until}");
        } else {
            assert_eq!(until % 1000, 0, "{a}: cut at the window's end: {until}");
            assert!(until > before - 1000 && until <= now_ms() + 1000 + 1000, "{a}: {until}");
        }
        // Wait (by Redis' clock, which decides) until the lease has ended.
        wait_until("the lease's end", Duration::from_secs(10), || {
            let (s, us): (i64, i64) = redis::cmd("TIME").query(&mut redis.conn()).unwrap();
            s * 1000 + us / 1000 > until
        });
        assert_eq!(give_back(svc.grpc, "late", vec![d.clone()], &q.id, 50).await.unwrap(), 0, "{a}");
    }
    assert!(lease_keys(&redis).is_empty(), "ended leases leave no key");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shadow_mode_grants_nothing() {
    clear_of_hour_edge();
    let redis = RedisServer::start();
    for (a, svc) in services(&redis, &["--shadow-mode"]) {
        let mut c = svc.client().await;
        let d = desc_limit(&[("shadow", a)], 10, HOUR);
        for remaining in [9, 8] {
            let r = lease(&mut c, "shadow", vec![d.clone()], 4).await;
            assert_eq!((r.overall_code, quota(&r)), (OK, None), "{a}");
            assert_eq!(r.statuses[0].limit_remaining, remaining, "{a}: only the hits count");
        }
    }
    // A shadow_mode rule in the configuration: no lease for a request that names it, even
    // beside an enforced limit.
    let dir = TempDir::new("cfg");
    let cfg = dir.path().join("limits.yaml");
    write_file(
        &cfg,
        "domain: s\ndescriptors:\n  - key: tried\n    shadow_mode: true\n    rate_limit: {unit: hour, requests_per_unit: 10}\n",
    );
    let svc = Service::start(&["--redis-url", &redis.url(), "--config", cfg.to_str().unwrap()]);
    let mut c = svc.client().await;
    let r =
        lease(&mut c, "s", vec![desc(&[("tried", "x")]), desc_limit(&[("real", "x")], 10, HOUR)], 4).await;
    assert_eq!((r.overall_code, quota(&r)), (OK, None));
    assert_eq!(r.statuses[1].limit_remaining, 9);
    assert!(lease_keys(&redis).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_lease_headers_are_invalid_argument_and_count_nothing() {
    let redis = RedisServer::start();
    let svc = Service::start(&["--redis-url", &redis.url()]);
    let mut c = svc.client().await;
    let d = desc_limit(&[("bad", "h")], 10, HOUR);
    let cases: [(&[(&'static str, &str)], &str); 6] = [
        (&[("x-ratelimit-wasm-lease", "0")], "x-ratelimit-wasm-lease:"),
        (&[("x-ratelimit-wasm-lease", "100001")], "x-ratelimit-wasm-lease:"),
        (&[("x-ratelimit-wasm-lease", "ten")], "x-ratelimit-wasm-lease:"),
        (&[("x-ratelimit-wasm-lease", "-3")], "x-ratelimit-wasm-lease:"),
        (
            &[("x-ratelimit-wasm-lease", "3"), ("x-ratelimit-wasm-lease-validity-ms", "0")],
            "x-ratelimit-wasm-lease-validity-ms:",
        ),
        (
            &[("x-ratelimit-wasm-lease", "3"), ("x-ratelimit-wasm-lease-validity-ms", "3600001")],
            "x-ratelimit-wasm-lease-validity-ms:",
        ),
    ];
    for (h, named) in cases {
        let e = call_with(&mut c, "bad", vec![d.clone()], h).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{h:?}: {e}");
        assert!(e.message().starts_with(named), "{h:?}: {e}");
    }
    assert_eq!(dbsize(&redis), 0, "nothing was counted");
    assert_eq!(metric(&svc, "ratelimit_service_grpc_errors_total{status=\"invalid_argument\"}"), 6);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_work_on_a_redis_cluster() {
    clear_of_hour_edge();
    let cluster = RedisCluster::start();
    let urls = cluster.urls();
    for a in ALGORITHMS {
        let svc = Service::start(&["--redis-cluster", "--redis-url", &urls, "--default-algorithm", a]);
        let mut c = svc.client().await;
        // Descriptors in different slots: each grant and each return is one script on one node.
        let ds: Vec<_> = (0..4).map(|i| desc_limit(&[("user", &format!("{a}-{i}"))], 10 + i, HOUR)).collect();
        let r = lease(&mut c, "cl", ds.clone(), 20).await;
        let q = quota(&r).unwrap();
        assert_eq!(q.requests, 9, "{a}: min(20, 9, 10, 11, 12)");
        assert_eq!(give_back(svc.grpc, "cl", ds.clone(), &q.id, 9).await.unwrap(), 9, "{a}");
        let r = call(&mut c, "cl", ds).await.unwrap();
        let remaining: Vec<u32> = r.statuses.iter().map(|s| s.limit_remaining).collect();
        assert_eq!(remaining, vec![8, 9, 10, 11], "{a}");
    }
}
