//! Issue 10: what hostile or broken callers, a stalled Redis and changing files must not do.
// Test helpers: failing loudly is what they are for.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use common::*;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_client::RateLimitServiceClient;
use envoy_types::pb::envoy::service::ratelimit::v3::{RateLimitRequest, RateLimitResponse};
use prost::bytes::BufMut;
use prost::Message;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::codegen::http::uri::PathAndQuery;
use tonic::transport::Channel;

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
        "--max-request-bytes",
        "2000",
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
        ("request bytes", "d", (0..100).map(|i| one(&format!("{i:016}"))).collect()),
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
    assert!(body.contains("ratelimit_service_grpc_errors_total{status=\"invalid_argument\"} 8"), "{body}");
}

/// Opens a connection and sends the start of a request head, never its end.
fn half_sent(addr: SocketAddr) -> TcpStream {
    let mut s = TcpStream::connect(addr).unwrap();
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n").unwrap();
    s
}

/// True when the server closed the connection (EOF) within `within`.
fn closed_by_server(s: &mut TcpStream, within: Duration) -> bool {
    s.set_read_timeout(Some(within)).unwrap();
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).is_ok()
}

#[test]
fn half_sent_http_requests_are_closed() {
    let redis = RedisServer::start();
    let svc = Service::start(&["--redis-url", &redis.url(), "--http-header-timeout-ms", "300"]);
    let mut conns: Vec<TcpStream> = (0..20).map(|_| half_sent(svc.http)).collect();
    // One that connects and sends nothing at all.
    conns.push(TcpStream::connect(svc.http).unwrap());
    for (i, s) in conns.iter_mut().enumerate() {
        assert!(closed_by_server(s, Duration::from_secs(10)), "connection {i} still open after 10 s");
    }
    assert_eq!(svc.http_get("/healthz").0, 200);
}

#[test]
fn http_connections_over_the_cap_wait_for_a_free_one() {
    let redis = RedisServer::start();
    let svc = Service::start(&[
        "--redis-url",
        &redis.url(),
        "--http-max-connections",
        "1",
        "--http-header-timeout-ms",
        "60000",
    ]);
    let holder = half_sent(svc.http);
    let mut waiting = TcpStream::connect(svc.http).unwrap();
    waiting.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").unwrap();
    // While the only slot is held, the complete request is not read (the bound of this negative
    // check is the wait; a served request answers within milliseconds).
    waiting.set_read_timeout(Some(Duration::from_millis(700))).unwrap();
    let mut byte = [0u8; 1];
    let early = waiting.read(&mut byte);
    assert!(early.is_err(), "answered while the cap was reached: {early:?}");
    drop(holder);
    waiting.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut answer = String::new();
    waiting.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
}

/// Sends `body` as the bytes of a `ShouldRateLimit` request message.
async fn raw_call(addr: SocketAddr, body: Vec<u8>) -> Result<RateLimitResponse, tonic::Status> {
    let ch =
        tonic::transport::Endpoint::from_shared(format!("http://{addr}")).unwrap().connect().await.unwrap();
    let mut g = tonic::client::Grpc::new(ch);
    g.ready().await.unwrap();
    let path = PathAndQuery::from_static("/envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit");
    g.unary(tonic::Request::new(body), path, RawCodec).await.map(|r| r.into_inner())
}

struct RawCodec;
struct RawEncoder;
struct ResponseDecoder;

impl Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = RateLimitResponse;
    type Encoder = RawEncoder;
    type Decoder = ResponseDecoder;
    fn encoder(&mut self) -> RawEncoder {
        RawEncoder
    }
    fn decoder(&mut self) -> ResponseDecoder {
        ResponseDecoder
    }
}

impl Encoder for RawEncoder {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), tonic::Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for ResponseDecoder {
    type Item = RateLimitResponse;
    type Error = tonic::Status;
    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<RateLimitResponse>, tonic::Status> {
        RateLimitResponse::decode(src).map(Some).map_err(|e| tonic::Status::internal(e.to_string()))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_requests_are_invalid_argument_and_counted() {
    let redis = RedisServer::start();
    let svc = Service::start(&["--redis-url", &redis.url()]);
    // Field 1 (domain, a string) holding bytes that are not UTF-8.
    let not_utf8 = vec![0x0a, 0x02, 0xff, 0xfe];
    let valid = RateLimitRequest {
        domain: "d".into(),
        descriptors: vec![desc_limit(&[("k", "v")], 10, HOUR)],
        hits_addend: 0,
    }
    .encode_to_vec();
    let truncated = valid[..valid.len() - 3].to_vec();
    for (what, body) in [("not UTF-8", not_utf8), ("truncated", truncated)] {
        let e = raw_call(svc.grpc, body).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{what}: {e}");
    }
    let r = raw_call(svc.grpc, valid).await.unwrap();
    assert_eq!(r.overall_code, OK);
    let (_, body) = svc.http_get("/metrics");
    assert!(body.contains("ratelimit_service_grpc_errors_total{status=\"invalid_argument\"} 2"), "{body}");
    assert_eq!(dbsize(&redis), 1);
}

/// Sends SIGCONT when dropped, so a failing test never leaves a stopped redis-server behind.
struct Paused<'a>(&'a RedisServer);

impl<'a> Paused<'a> {
    fn new(r: &'a RedisServer) -> Paused<'a> {
        r.signal("STOP");
        Paused(r)
    }
}

impl Drop for Paused<'_> {
    fn drop(&mut self) {
        self.0.signal("CONT");
    }
}

fn evalsha_calls(redis: &RedisServer) -> u64 {
    let info: String = redis::cmd("INFO").arg("commandstats").query(&mut redis.conn()).unwrap();
    info.lines()
        .find_map(|l| l.strip_prefix("cmdstat_evalsha:calls="))
        .and_then(|rest| rest.split(',').next())
        .map_or(0, |n| n.parse().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_answered_unavailable_change_nothing_when_a_stalled_redis_resumes() {
    clear_of_hour_edge();
    let redis = RedisServer::start();
    let svc = Service::start(&["--redis-url", &redis.url(), "--redis-timeout-ms", "300"]);
    let mut c = svc.client().await;
    let d = || vec![desc_limit(&[("k", "v")], 50, HOUR)];
    assert_eq!(call(&mut c, "stall", d()).await.unwrap().overall_code, OK);
    {
        let _paused = Paused::new(&redis);
        let mut set = tokio::task::JoinSet::new();
        for _ in 0..5 {
            let mut c = c.clone();
            set.spawn(async move { call(&mut c, "stall", d()).await });
        }
        while let Some(r) = set.join_next().await {
            let e = r.unwrap().unwrap_err();
            assert_eq!(e.code(), tonic::Code::Unavailable, "{e}");
        }
    }
    // Redis runs the five queued scripts once it resumes; they must find their deadline passed.
    wait_until("the queued scripts ran", Duration::from_secs(20), || evalsha_calls(&redis) >= 6);
    let count: u64 = redis::cmd("HGET").arg("rl:{stall|k=v}:fw:h").arg("c").query(&mut redis.conn()).unwrap();
    assert_eq!(count, 1, "calls answered UNAVAILABLE were counted");
    let r = call(&mut c, "stall", d()).await.unwrap();
    assert_eq!(r.statuses[0].limit_remaining, 48);
}

fn one_per_hour(domain: &str) -> String {
    format!(
        "domain: {domain}\ndescriptors:\n  - key: k\n    rate_limit: {{unit: hour, requests_per_unit: 1}}\n"
    )
}

async fn limit_of(c: &mut RateLimitServiceClient<Channel>, domain: &str) -> Option<u32> {
    let r = call(c, domain, vec![with_hits(desc(&[("k", "v")]), 0)]).await.unwrap();
    r.statuses[0].current_limit.as_ref().map(|l| l.requests_per_unit)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_or_emptied_config_file_keeps_the_last_good_limits() {
    clear_of_hour_edge();
    let redis = RedisServer::start();
    let dir = TempDir::new("cfg");
    let (a, b) = (dir.path().join("a.yaml"), dir.path().join("b.yaml"));
    write_file(&a, &one_per_hour("a"));
    write_file(&b, &one_per_hour("b"));
    let svc = Service::start(&["--redis-url", &redis.url(), "--config", dir.path().to_str().unwrap()]);
    let mut c = svc.client().await;
    assert_eq!(limit_of(&mut c, "b").await, Some(1));

    std::fs::remove_file(&b).unwrap();
    wait_until("the WARN for b", Duration::from_secs(20), || svc.log_contains("domain `b` is gone"));
    assert!(svc.log_contains("WARN configuration not reloaded"));
    assert_eq!(limit_of(&mut c, "b").await, Some(1), "b's limits were dropped with its file");

    // What a file cut after its first line parses as: a domain without descriptors.
    write_file(&a, "domain: a\n");
    wait_until("the WARN for a", Duration::from_secs(20), || {
        svc.log_contains("domain `a` has no descriptors any more")
    });
    assert_eq!(limit_of(&mut c, "a").await, Some(1), "a's limits were dropped");
    let (_, body) = svc.http_get("/metrics");
    assert!(body.contains("ratelimit_service_config_reloads_total{result=\"failure\"} 2"), "{body}");

    // A complete set is taken again.
    write_file(&b, &one_per_hour("b"));
    write_file(&a, &one_per_hour("a").replace("requests_per_unit: 1", "requests_per_unit: 5"));
    wait_until("a's new limit", Duration::from_secs(20), || svc.log_contains("configuration reloaded"));
    assert_eq!(limit_of(&mut c, "a").await, Some(5));
    assert_eq!(limit_of(&mut c, "b").await, Some(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_configs_load_and_replaces_share_threshold_quota_and_shadow_mode_count_as_upstream() {
    clear_of_hour_edge();
    let redis = RedisServer::start();
    let fixtures = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/upstream");
    let svc = Service::start(&["--redis-url", &redis.url(), "--config", fixtures]);
    for field in ["detailed_metric", "value_to_metric", "name", "metadata"] {
        assert!(
            svc.log_contains(&format!(
                "WARN configuration: {fixtures}/{field}.yaml: descriptors[0].{field}: accepted and ignored"
            )),
            "{field}"
        );
    }
    let mut c = svc.client().await;

    // replaces: with both limits in one request only the replacing one (3 an hour) counts.
    let specific = || desc(&[("key_1", "value_1"), ("user", "bkthomps")]);
    let replacing = || desc(&[("key_2", "value_2"), ("user", "bkthomps")]);
    for i in 0..3 {
        let r = call(&mut c, "replaces", vec![specific(), replacing()]).await.unwrap();
        assert_eq!(r.overall_code, OK, "request {i}");
        assert!(r.statuses[0].current_limit.is_none(), "the replaced limit is not applied");
        assert_eq!(r.statuses[1].limit_remaining, 2 - i);
    }
    let r = call(&mut c, "replaces", vec![specific(), replacing()]).await.unwrap();
    assert_eq!((r.overall_code, r.statuses[0].code, r.statuses[1].code), (OVER, OK, OVER));
    // ... and the replaced limit was left alone: on its own it still has both of its 2.
    let r = call(&mut c, "replaces", vec![specific()]).await.unwrap();
    assert_eq!((r.overall_code, r.statuses[0].limit_remaining), (OK, 1));

    // shadow_mode: over the limit is counted and reported, and answered OK.
    for remaining in [0, 0] {
        let r =
            call(&mut c, "shadow_mode", vec![desc(&[("service", "s"), ("user", "user-a")])]).await.unwrap();
        assert_eq!((r.overall_code, r.statuses[0].limit_remaining), (OK, remaining));
    }
    let user_b = || vec![desc(&[("service", "s"), ("user", "user-b")])];
    assert_eq!(call(&mut c, "shadow_mode", user_b()).await.unwrap().overall_code, OK);
    assert_eq!(call(&mut c, "shadow_mode", user_b()).await.unwrap().overall_code, OVER);
    // share_threshold: files/* values share one counter of 2; own/* values have one each.
    let route = |v: &str| vec![desc(&[("route", v)])];
    for (value, code) in [("files/a.pdf", OK), ("files/b.csv", OK), ("files/c.txt", OVER)] {
        assert_eq!(
            call(&mut c, "share_threshold", route(value)).await.unwrap().overall_code,
            code,
            "{value}"
        );
    }
    for value in ["own/a", "own/b", "own/c", "own/a"] {
        assert_eq!(call(&mut c, "share_threshold", route(value)).await.unwrap().overall_code, OK, "{value}");
    }
    let shared: u64 = redis::cmd("HGET")
        .arg("rl:{share_threshold|route=files/*}:fw:h")
        .arg("c")
        .query(&mut redis.conn())
        .unwrap();
    assert_eq!(shared, 2);

    // quota_mode: the request is denied only once both quota descriptors are over (1 and 3).
    let quotas = || vec![desc(&[("daily_quota", "u")]), desc(&[("monthly_quota", "u")])];
    for (i, (overall, daily)) in [(OK, OK), (OK, OVER), (OK, OVER), (OVER, OVER)].into_iter().enumerate() {
        let r = call(&mut c, "quota_mode", quotas()).await.unwrap();
        assert_eq!((r.overall_code, r.statuses[0].code), (overall, daily), "request {i}");
    }
    // A descriptor not in quota mode denies on its own, as always.
    let mut user = vec![desc(&[("per_user", "v")])];
    assert_eq!(call(&mut c, "quota_mode", user.clone()).await.unwrap().overall_code, OK);
    user.push(desc(&[("monthly_quota", "other")]));
    assert_eq!(call(&mut c, "quota_mode", user).await.unwrap().overall_code, OVER);

    let (_, body) = svc.http_get("/metrics");
    for line in [
        "ratelimit_service_descriptors_total{domain=\"replaces\",code=\"replaced\"} 4",
        "ratelimit_service_descriptors_total{domain=\"shadow_mode\",code=\"shadow_over_limit\"} 1",
    ] {
        assert!(body.contains(line), "{line}\n{body}");
    }
}
