//! End-to-end: the built `ratelimit-service` binary against real `redis-server` processes.

mod common;

use std::time::Duration;

use common::*;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_client::RateLimitServiceClient;
use tonic::transport::Channel;

const ALGORITHMS: [&str; 3] = ["fixed_window", "sliding_window", "token_bucket"];

fn config_all_algorithms(limit: u32) -> String {
    let mut y = String::from("domain: algs\ndescriptors:\n");
    for a in ALGORITHMS {
        y.push_str(&format!(
            "  - key: alg\n    value: {a}\n    algorithm: {a}\n    rate_limit: {{unit: hour, requests_per_unit: {limit}}}\n"
        ));
    }
    y
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn n_plus_first_request_is_over_limit_for_each_algorithm() {
    clear_of_hour_edge();
    let redis = RedisServer::start();
    let dir = TempDir::new("cfg");
    let cfg = dir.path().join("limits.yaml");
    write_file(&cfg, &config_all_algorithms(5));
    let svc = Service::start(&["--redis-url", &redis.url(), "--config", cfg.to_str().unwrap()]);
    let mut c = svc.client().await;
    for a in ALGORITHMS {
        for i in 0..5u32 {
            let r = call(&mut c, "algs", vec![desc(&[("alg", a)])]).await.unwrap();
            assert_eq!(r.overall_code, OK, "{a}: request {}", i + 1);
            let s = &r.statuses[0];
            assert_eq!(s.limit_remaining, 4 - i, "{a}");
            let l = s.current_limit.as_ref().unwrap();
            assert_eq!((l.requests_per_unit, l.unit), (5, HOUR));
            assert!(s.duration_until_reset.is_some());
        }
        let r = call(&mut c, "algs", vec![desc(&[("alg", a)])]).await.unwrap();
        assert_eq!(r.overall_code, OVER, "{a}: 6th request");
        assert_eq!(r.statuses[0].code, OVER);
        assert_eq!(r.statuses[0].limit_remaining, 0);
        let reset = r.statuses[0].duration_until_reset.unwrap();
        // On a denial the reset is when one more request fits. For the sliding window that can be
        // past the current window: the previous window's count must first weigh less than one
        // request, so the bound is two windows (seen failing at 03:06: 54 min + 12 min).
        let bound = if a == "sliding_window" { 2 * 3600 } else { 3600 };
        assert!(reset.seconds > 0 && reset.seconds <= bound, "{a}: {reset:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn override_limit_with_default_algorithm_and_cost() {
    clear_of_window_edge(Duration::from_secs(86_400), Duration::from_secs(60));
    let redis = RedisServer::start();
    for a in ALGORITHMS {
        let svc = Service::start(&["--redis-url", &redis.url(), "--default-algorithm", a]);
        let mut c = svc.client().await;
        let d = desc_limit(&[("rule", "r1"), ("user", a)], 10, DAY);
        // Cost 4 twice = 8 of 10; a third cost-4 request does not fit and consumes nothing.
        for expected_remaining in [6, 2] {
            let r = call(&mut c, "wasm", vec![with_hits(d.clone(), 4)]).await.unwrap();
            assert_eq!(r.overall_code, OK, "{a}");
            assert_eq!(r.statuses[0].limit_remaining, expected_remaining, "{a}");
        }
        let r = call(&mut c, "wasm", vec![with_hits(d.clone(), 4)]).await.unwrap();
        assert_eq!(r.overall_code, OVER, "{a}");
        // ... so two cost-1 requests still fit (request-level hits_addend 0 means 1).
        for _ in 0..2 {
            let r = call(&mut c, "wasm", vec![d.clone()]).await.unwrap();
            assert_eq!(r.overall_code, OK, "{a}");
        }
        let r = call(&mut c, "wasm", vec![d.clone()]).await.unwrap();
        assert_eq!(r.overall_code, OVER, "{a}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exact_under_concurrency_for_each_algorithm() {
    clear_of_hour_edge();
    let redis = RedisServer::start();
    let dir = TempDir::new("cfg");
    let svc = service_with_every_algorithm_at_50(&dir, &["--redis-url", &redis.url()]);
    each_algorithm_admits_exactly_50_of_400(&svc.client().await).await;
}

/// The service with one limit of 50 per algorithm, and a generous Redis timeout: 400 calls at once
/// on a busy 2-core machine.
fn service_with_every_algorithm_at_50(dir: &TempDir, redis: &[&str]) -> Service {
    let cfg = dir.path().join("limits.yaml");
    write_file(&cfg, &config_all_algorithms(50));
    let cfg = cfg.to_string_lossy();
    let mut args = redis.to_vec();
    args.extend(["--config", &cfg, "--redis-timeout-ms", "10000"]);
    Service::start(&args)
}

async fn each_algorithm_admits_exactly_50_of_400(c: &RateLimitServiceClient<Channel>) {
    for a in ALGORITHMS {
        let ok = concurrent_ok(c, "algs", desc(&[("alg", a)]), 400).await;
        assert_eq!(ok, 50, "{a}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_key_has_a_ttl_and_a_hash_tag() {
    let redis = RedisServer::start();
    let svc = Service::start(&["--redis-url", &redis.url(), "--key-prefix", "t"]);
    let mut c = svc.client().await;
    for (a, unit, max_ms) in [
        ("fixed_window", MINUTE, 61_000),
        ("sliding_window", MINUTE, 121_000),
        ("token_bucket", MINUTE, 61_000),
    ] {
        let svc2 =
            Service::start(&["--redis-url", &redis.url(), "--key-prefix", "t", "--default-algorithm", a]);
        let mut c2 = svc2.client().await;
        let r = call(&mut c2, "ttl", vec![desc_limit(&[("k", "v{}|=")], 10, unit)]).await.unwrap();
        assert_eq!(r.overall_code, OK);
        let tag = match a {
            "fixed_window" => "fw",
            "sliding_window" => "sw",
            _ => "tb",
        };
        let key = format!("t:{{ttl|k=v%7B%7D%7C%3D}}:{tag}:m");
        let mut conn = redis.conn();
        let pttl: i64 = redis::cmd("PTTL").arg(&key).query(&mut conn).unwrap();
        assert!(pttl > 0 && pttl <= max_ms, "{a}: {key} pttl {pttl}");
    }
    // A big month limit: key lives until the end of the calendar month (+1 s).
    let r = call(&mut c, "ttl", vec![desc_limit(&[("k", "month")], 10, 5)]).await.unwrap();
    assert_eq!(r.overall_code, OK);
    let mut conn = redis.conn();
    let pttl: i64 = redis::cmd("PTTL").arg("t:{ttl|k=month}:fw:mo").query(&mut conn).unwrap();
    assert!(pttl > 0 && pttl <= 31 * 86_400_000 + 1000, "{pttl}");
    let reset = r.statuses[0].duration_until_reset.unwrap().seconds;
    assert!((pttl / 1000 - reset).abs() <= 2, "{pttl} vs {reset}");
    // No key without a TTL.
    let keys: Vec<String> = redis::cmd("KEYS").arg("t:*").query(&mut conn).unwrap();
    assert_eq!(keys.len(), 4, "{keys:?}");
    for k in keys {
        let pttl: i64 = redis::cmd("PTTL").arg(&k).query(&mut conn).unwrap();
        assert!(pttl > 0, "{k}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn denied_request_consumes_from_no_descriptor_and_shadow_unlimited_nolimit() {
    clear_of_hour_edge();
    let redis = RedisServer::start();
    let dir = TempDir::new("cfg");
    let cfg = dir.path().join("limits.yaml");
    write_file(
        &cfg,
        "domain: mix\ndescriptors:\n  - key: big\n    rate_limit: {unit: hour, requests_per_unit: 10}\n  - key: small\n    rate_limit: {unit: hour, requests_per_unit: 1}\n  - key: trial\n    shadow_mode: true\n    rate_limit: {unit: hour, requests_per_unit: 1}\n  - key: vip\n    rate_limit: {unlimited: true}\n",
    );
    let svc = Service::start(&["--redis-url", &redis.url(), "--config", cfg.to_str().unwrap()]);
    let mut c = svc.client().await;
    let both = || vec![desc(&[("big", "x")]), desc(&[("small", "x")])];
    let r = call(&mut c, "mix", both()).await.unwrap();
    assert_eq!(r.overall_code, OK);
    assert_eq!(r.statuses[0].limit_remaining, 9);
    for _ in 0..3 {
        let r = call(&mut c, "mix", both()).await.unwrap();
        assert_eq!(r.overall_code, OVER);
        assert_eq!(r.statuses[0].code, OK);
        assert_eq!(r.statuses[1].code, OVER);
    }
    // The denied requests gave their hit on `big` back.
    let r = call(&mut c, "mix", vec![desc(&[("big", "x")])]).await.unwrap();
    assert_eq!(r.statuses[0].limit_remaining, 8);

    // Shadow mode: over the limit is reported as OK (remaining 0), overall OK.
    for i in 0..3 {
        let r = call(&mut c, "mix", vec![desc(&[("trial", "x")])]).await.unwrap();
        assert_eq!(r.overall_code, OK);
        assert_eq!(r.statuses[0].code, OK);
        assert_eq!(r.statuses[0].limit_remaining, 0, "request {i}");
    }
    // Unlimited and unknown descriptors: OK without current_limit.
    let r = call(&mut c, "mix", vec![desc(&[("vip", "x")]), desc(&[("nope", "x")])]).await.unwrap();
    assert_eq!(r.overall_code, OK);
    for s in &r.statuses {
        assert_eq!(s.code, OK);
        assert!(s.current_limit.is_none());
    }
    let r = call(&mut c, "other-domain", vec![desc(&[("big", "x")])]).await.unwrap();
    assert!(r.statuses[0].current_limit.is_none());
    // Empty domain / descriptors are INVALID_ARGUMENT.
    let e = call(&mut c, "", vec![desc(&[("big", "x")])]).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    let e = call(&mut c, "mix", vec![]).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);

    let (status, body) = svc.http_get("/metrics");
    assert_eq!(status, 200);
    assert!(
        body.contains("ratelimit_service_decisions_total{domain=\"mix\",code=\"over_limit\"} 3"),
        "{body}"
    );
    assert!(
        body.contains("ratelimit_service_descriptors_total{domain=\"mix\",code=\"shadow_over_limit\"} 2"),
        "{body}"
    );
    assert!(body.contains("ratelimit_service_refunds_total 3"), "{body}");
    assert!(body.contains("ratelimit_service_redis_latency_seconds_count"), "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shadow_mode_flag_never_denies_but_counts_and_reports() {
    clear_of_hour_edge();
    let redis = RedisServer::start();
    // The flag covers overrides too, not only the configuration file's entries.
    let svc = Service::start(&["--redis-url", &redis.url(), "--shadow-mode"]);
    assert!(svc.log_contains("shadow_mode=on"));
    let mut c = svc.client().await;
    let d = || vec![desc_limit(&[("k", "v")], 2, HOUR)];
    for expected_remaining in [1, 0, 0, 0] {
        let r = call(&mut c, "sh", d()).await.unwrap();
        assert_eq!((r.overall_code, r.statuses[0].code), (OK, OK));
        assert_eq!(r.statuses[0].limit_remaining, expected_remaining);
    }
    let (_, body) = svc.http_get("/metrics");
    assert!(
        body.contains("ratelimit_service_descriptors_total{domain=\"sh\",code=\"shadow_over_limit\"} 2"),
        "{body}"
    );
    assert!(body.contains("ratelimit_service_decisions_total{domain=\"sh\",code=\"ok\"} 4"), "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_hot_reload_and_bad_file_keeps_old_config() {
    clear_of_hour_edge();
    let redis = RedisServer::start();
    let dir = TempDir::new("cfg");
    let cfg = dir.path().join("limits.yaml");
    let limits = |n: u32| {
        format!(
            "domain: hot\ndescriptors:\n  - key: k\n    rate_limit: {{unit: hour, requests_per_unit: {n}}}\n"
        )
    };
    write_file(&cfg, &limits(2));
    // A directory: every *.yaml in it.
    let svc = Service::start(&["--redis-url", &redis.url(), "--config", dir.path().to_str().unwrap()]);
    let mut c = svc.client().await;
    for _ in 0..2 {
        assert_eq!(call(&mut c, "hot", vec![desc(&[("k", "v")])]).await.unwrap().overall_code, OK);
    }
    assert_eq!(call(&mut c, "hot", vec![desc(&[("k", "v")])]).await.unwrap().overall_code, OVER);

    write_file(&cfg, &limits(4));
    // Poll with hits 0 (consumes nothing) until the new limit shows.
    let t0 = std::time::Instant::now();
    loop {
        let r = call(&mut c, "hot", vec![with_hits(desc(&[("k", "v")]), 0)]).await.unwrap();
        if r.statuses[0].current_limit.as_ref().unwrap().requests_per_unit == 4 {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(20), "reload not seen");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The counter was kept: 2 used of 4.
    for _ in 0..2 {
        assert_eq!(call(&mut c, "hot", vec![desc(&[("k", "v")])]).await.unwrap().overall_code, OK);
    }
    assert_eq!(call(&mut c, "hot", vec![desc(&[("k", "v")])]).await.unwrap().overall_code, OVER);

    // A broken file: logged, counted, old configuration kept.
    write_file(
        &cfg,
        "domain: hot\ndescriptors:\n  - key: k\n    rate_limit: {unit: fortnight, requests_per_unit: 1}\n",
    );
    wait_until("failed reload in metrics", Duration::from_secs(20), || {
        svc.http_get("/metrics").1.contains("ratelimit_service_config_reloads_total{result=\"failure\"} 1")
    });
    assert!(svc.log_contains("configuration not reloaded"));
    assert!(svc.log_contains("limits.yaml"));
    let r = call(&mut c, "hot", vec![with_hits(desc(&[("k", "v")]), 0)]).await.unwrap();
    assert_eq!(r.statuses[0].current_limit.as_ref().unwrap().requests_per_unit, 4);
    assert_eq!(r.overall_code, OVER);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_gives_unavailable_and_503_then_recovers() {
    clear_of_hour_edge();
    let mut redis = RedisServer::start();
    let svc = Service::start(&["--redis-url", &redis.url(), "--redis-timeout-ms", "500"]);
    let mut c = svc.client().await;
    let d = || vec![desc_limit(&[("k", "v")], 100, HOUR)];
    assert_eq!(call(&mut c, "d", d()).await.unwrap().overall_code, OK);
    assert_eq!(svc.http_get("/healthz").0, 200);

    redis.stop();
    let e = call(&mut c, "d", d()).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unavailable, "{e}");
    let (status, body) = svc.http_get("/healthz");
    assert_eq!(status, 503);
    assert!(body.contains("redis"), "{body}");
    wait_until("redis down in log", Duration::from_secs(20), || svc.log_contains("redis is unreachable"));

    assert!(redis.spawn(), "redis restart on the same port");
    let t0 = std::time::Instant::now();
    loop {
        match call(&mut c, "d", d()).await {
            Ok(r) => {
                assert_eq!(r.overall_code, OK);
                break;
            }
            Err(e) => assert_eq!(e.code(), tonic::Code::Unavailable),
        }
        assert!(t0.elapsed() < Duration::from_secs(30), "decisions did not resume");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    wait_until("healthz 200", Duration::from_secs(20), || svc.http_get("/healthz").0 == 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counts_survive_a_service_restart_and_sigterm_is_graceful() {
    clear_of_hour_edge();
    let redis = RedisServer::start();
    let d = || vec![desc_limit(&[("k", "v")], 5, HOUR)];
    let mut svc = Service::start(&["--redis-url", &redis.url()]);
    {
        let mut c = svc.client().await;
        for _ in 0..3 {
            assert_eq!(call(&mut c, "r", d()).await.unwrap().overall_code, OK);
        }
    }
    let status = svc.terminate();
    assert!(status.success(), "{status:?}");
    assert!(svc.log_contains("shutting down"));

    let svc = Service::start(&["--redis-url", &redis.url()]);
    let mut c = svc.client().await;
    for _ in 0..2 {
        assert_eq!(call(&mut c, "r", d()).await.unwrap().overall_code, OK);
    }
    assert_eq!(call(&mut c, "r", d()).await.unwrap().overall_code, OVER);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_health_reports_serving() {
    use tonic_health::pb::health_client::HealthClient;
    use tonic_health::pb::HealthCheckRequest;
    let redis = RedisServer::start();
    let svc = Service::start(&["--redis-url", &redis.url()]);
    let ch = tonic::transport::Endpoint::from_shared(format!("http://{}", svc.grpc))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut h = HealthClient::new(ch);
    for service in ["", "envoy.service.ratelimit.v3.RateLimitService"] {
        let r = h.check(HealthCheckRequest { service: service.into() }).await.unwrap().into_inner();
        assert_eq!(r.status, 1, "{service:?} SERVING");
    }
}

#[test]
fn startup_errors_are_one_clear_line() {
    // Unreachable Redis: a port nobody listens on.
    let port = free_port();
    let url = format!("redis://127.0.0.1:{port}/");
    let (status, err) = run_to_exit(&["--redis-url", &url]);
    assert!(!status.success());
    assert!(err.contains(&format!("cannot reach Redis at {url}")), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");

    // Bad configuration: path, line and what is wrong.
    let dir = TempDir::new("bad");
    let cfg = dir.path().join("bad.yaml");
    std::fs::write(&cfg, "domain: d\ndescriptors:\n  - key: a\n    rate_limt: {unit: second}\n").unwrap();
    let (status, err) = run_to_exit(&["--redis-url", &url, "--config", cfg.to_str().unwrap()]);
    assert!(!status.success());
    assert!(err.contains("bad configuration"), "{err}");
    assert!(err.contains("bad.yaml"), "{err}");
    assert!(err.contains("unknown field `rate_limt`"), "{err}");
    assert!(err.contains("line 4"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_cluster_is_exact_too() {
    clear_of_hour_edge();
    let cluster = RedisCluster::start();
    let dir = TempDir::new("cfg");
    let urls = cluster.urls();
    let svc = service_with_every_algorithm_at_50(&dir, &["--redis-cluster", "--redis-url", &urls]);
    let c = svc.client().await;
    each_algorithm_admits_exactly_50_of_400(&c).await;
    // Many descriptors, spread over the three masters' slots.
    let mut c2 = c.clone();
    for i in 0..30 {
        let user = format!("u{i}");
        for n in 0..3 {
            let r = call(&mut c2, "many", vec![desc_limit(&[("user", &user)], 2, HOUR)]).await.unwrap();
            assert_eq!(r.overall_code, if n < 2 { OK } else { OVER }, "{user} #{n}");
        }
    }
    let mut masters_with_keys = 0;
    for n in &cluster.nodes {
        let mut conn = n.conn();
        let size: i64 = redis::cmd("DBSIZE").query(&mut conn).unwrap();
        if size > 0 {
            masters_with_keys += 1;
        }
    }
    assert_eq!(masters_with_keys, 3);
}
