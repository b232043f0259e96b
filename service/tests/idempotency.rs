//! Fleet-wide idempotency keys (issue 12, service side): `ratelimitwasm.idempotency.v1.Keys/Claim`
//! and `/Complete`, against real redis-server processes.
// Test helpers: failing loudly is what they are for.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use ratelimit_service::grpc::MessageCodec;
use ratelimit_service::idempotency::{
    ClaimRequest, ClaimResponse, CompleteRequest, CompleteResponse, Header, Outcome, StoredResponse,
    CLAIM_PATH, COMPLETE_PATH,
};
use ratelimit_service::metrics::Metrics;
use tonic::codegen::http::uri::PathAndQuery;
use tonic::transport::Channel;

#[derive(Clone)]
struct Keys(tonic::client::Grpc<Channel>);

impl Keys {
    async fn connect(addr: SocketAddr) -> Keys {
        let ch = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect()
            .await
            .unwrap();
        Keys(tonic::client::Grpc::new(ch))
    }

    async fn claim_req(&mut self, r: ClaimRequest) -> Result<ClaimResponse, tonic::Status> {
        self.0.ready().await.unwrap();
        let codec = MessageCodec::<ClaimRequest, ClaimResponse>::new(
            Arc::new(Metrics::default()),
            usize::MAX,
            |_| {},
        );
        self.0
            .unary(tonic::Request::new(r), PathAndQuery::from_static(CLAIM_PATH), codec)
            .await
            .map(|r| r.into_inner())
    }

    async fn complete_req(&mut self, r: CompleteRequest) -> Result<bool, tonic::Status> {
        self.0.ready().await.unwrap();
        let codec = MessageCodec::<CompleteRequest, CompleteResponse>::new(
            Arc::new(Metrics::default()),
            usize::MAX,
            |_| {},
        );
        self.0
            .unary(tonic::Request::new(r), PathAndQuery::from_static(COMPLETE_PATH), codec)
            .await
            .map(|r| r.into_inner().done)
    }

    /// A claim in domain `edge` for an hour.
    async fn claim(&mut self, key: &str, request: &str, owner: &str) -> ClaimResponse {
        self.claim_req(claim_req(key, request, owner, 3_600_000)).await.unwrap()
    }

    async fn outcome(&mut self, key: &str, request: &str, owner: &str) -> Outcome {
        self.claim(key, request, owner).await.outcome()
    }

    /// Completes for a day, keeping `stored` if given.
    async fn complete(&mut self, key: &str, owner: &str, stored: Option<StoredResponse>) -> bool {
        let r = CompleteRequest {
            domain: "edge".into(),
            key: key.into(),
            owner: owner.into(),
            release: false,
            ttl_ms: 86_400_000,
            stored,
        };
        self.complete_req(r).await.unwrap()
    }

    async fn release(&mut self, key: &str, owner: &str) -> bool {
        let r = CompleteRequest {
            domain: "edge".into(),
            key: key.into(),
            owner: owner.into(),
            release: true,
            ..Default::default()
        };
        self.complete_req(r).await.unwrap()
    }
}

fn claim_req(key: &str, request: &str, owner: &str, in_flight_ms: u64) -> ClaimRequest {
    ClaimRequest {
        domain: "edge".into(),
        key: key.into(),
        request: request.into(),
        owner: owner.into(),
        in_flight_ms,
    }
}

fn response() -> StoredResponse {
    StoredResponse {
        status: 201,
        headers: vec![
            Header { name: "content-type".into(), value: "application/json".into() },
            Header { name: "location".into(), value: "/orders/42".into() },
            Header { name: "x-note".into(), value: "a: b\tc".into() },
        ],
        // Not UTF-8, with line breaks: bodies are bytes.
        body: vec![b'{', b'}', b'\n', 0, 255],
    }
}

fn claims(svc: &Service, outcome: &str) -> u64 {
    metric(svc, &format!("ratelimit_service_idempotency_claims_total{{outcome=\"{outcome}\"}}"))
}

fn completions(svc: &Service, outcome: &str) -> u64 {
    metric(svc, &format!("ratelimit_service_idempotency_completions_total{{outcome=\"{outcome}\"}}"))
}

fn exists(redis: &RedisServer, key: &str) -> bool {
    redis::cmd("EXISTS").arg(key).query::<i64>(&mut redis.conn()).unwrap() == 1
}

fn pttl(redis: &RedisServer, key: &str) -> i64 {
    redis::cmd("PTTL").arg(key).query(&mut redis.conn()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claim_in_flight_mismatch_complete_and_replay() {
    let redis = RedisServer::start();
    let svc = Service::start(&["--redis-url", &redis.url()]);
    let mut k = Keys::connect(svc.grpc).await;

    let r = k.claim("order-1", "POST.orders", "owner-a").await;
    assert_eq!((r.outcome(), r.stored), (Outcome::Claimed, None));
    let record = "rl:idem:{edge:order-1}";
    let ttl = pttl(&redis, record);
    assert!(ttl > 0 && ttl <= 3_600_000, "the claim lasts in_flight_ms: {ttl}");
    let fields: Vec<(String, String)> = redis::cmd("HGETALL").arg(record).query(&mut redis.conn()).unwrap();
    let mut fields: Vec<(&str, &str)> = fields.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect();
    fields.sort();
    assert_eq!(fields, vec![("owner", "owner-a"), ("request", "POST.orders"), ("state", "in_flight")]);

    // While in flight: the same request waits, another one is a mismatch; nobody else completes.
    assert_eq!(k.outcome("order-1", "POST.orders", "owner-b").await, Outcome::InFlight);
    assert_eq!(k.outcome("order-1", "POST.orders", "owner-a").await, Outcome::InFlight, "one claim per key");
    assert_eq!(k.outcome("order-1", "PUT.orders", "owner-b").await, Outcome::Mismatch);
    assert!(!k.complete("order-1", "owner-b", Some(response())).await);
    assert!(!k.release("order-1", "owner-b").await);
    assert_eq!(k.outcome("order-1", "POST.orders", "owner-b").await, Outcome::InFlight);

    // Completed with the response kept: every later claim of the same request replays it.
    assert!(k.complete("order-1", "owner-a", Some(response())).await);
    let ttl = pttl(&redis, record);
    assert!(ttl > 3_600_000 && ttl <= 86_400_000, "the completed record lasts ttl_ms: {ttl}");
    for owner in ["owner-b", "owner-c", "owner-a"] {
        let r = k.claim("order-1", "POST.orders", owner).await;
        assert_eq!((r.outcome(), r.stored), (Outcome::Completed, Some(response())), "{owner}");
    }
    assert_eq!(k.outcome("order-1", "DELETE.orders", "owner-b").await, Outcome::Mismatch);
    // Completed is final: neither a second completion nor a release changes it.
    assert!(!k.complete("order-1", "owner-a", None).await);
    assert!(!k.release("order-1", "owner-a").await);
    let r = k.claim("order-1", "POST.orders", "owner-d").await;
    assert_eq!(r.stored, Some(response()));

    // Keys are per domain.
    let mut other = claim_req("order-1", "POST.orders", "owner-e", 60_000);
    other.domain = "other".into();
    assert_eq!(k.claim_req(other).await.unwrap().outcome(), Outcome::Claimed);

    assert_eq!(claims(&svc, "claimed"), 2);
    assert_eq!(claims(&svc, "in_flight"), 3);
    assert_eq!(claims(&svc, "mismatch"), 2);
    assert_eq!(claims(&svc, "completed"), 4);
    assert_eq!(completions(&svc, "done"), 1);
    assert_eq!(completions(&svc, "not_owner"), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn complete_without_stored_and_release_then_reclaim() {
    let redis = RedisServer::start();
    let svc = Service::start(&["--redis-url", &redis.url()]);
    let mut k = Keys::connect(svc.grpc).await;

    // Completed without the response (too big for the caller, or not kept by configuration).
    assert_eq!(k.outcome("send-1", "POST.msg", "a").await, Outcome::Claimed);
    assert!(k.complete("send-1", "a", None).await);
    let r = k.claim("send-1", "POST.msg", "b").await;
    assert_eq!((r.outcome(), r.stored), (Outcome::Completed, None));

    // A kept response with no headers and an empty body is still a kept response.
    assert_eq!(k.outcome("send-2", "POST.msg", "a").await, Outcome::Claimed);
    let empty = StoredResponse { status: 204, headers: vec![], body: vec![] };
    assert!(k.complete("send-2", "a", Some(empty.clone())).await);
    assert_eq!(k.claim("send-2", "POST.msg", "b").await.stored, Some(empty));

    // Released (the first request failed): the record is gone, and the retry claims afresh,
    // also for another request.
    assert_eq!(k.outcome("send-3", "POST.msg", "a").await, Outcome::Claimed);
    assert!(k.release("send-3", "a").await);
    assert!(!exists(&redis, "rl:idem:{edge:send-3}"));
    assert!(!k.release("send-3", "a").await, "released once");
    assert_eq!(k.outcome("send-3", "PATCH.msg", "b").await, Outcome::Claimed);
    assert!(!k.complete("send-3", "a", None).await, "the first owner's claim is over");
    assert!(k.complete("send-3", "b", None).await);
    assert_eq!(completions(&svc, "done"), 4);
    assert_eq!(completions(&svc, "not_owner"), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_abandoned_claim_expires_and_its_late_owner_cannot_touch_the_next() {
    let redis = RedisServer::start();
    let svc = Service::start(&["--redis-url", &redis.url()]);
    let mut k = Keys::connect(svc.grpc).await;
    let record = "rl:idem:{edge:pay-1}";

    assert_eq!(
        k.claim_req(claim_req("pay-1", "POST.pay", "late", 300)).await.unwrap().outcome(),
        Outcome::Claimed
    );
    let ttl = pttl(&redis, record);
    assert!(ttl > 0 && ttl <= 300, "{ttl}");
    // Redis' own expiry decides; the owner never completed.
    wait_until("the abandoned claim's expiry", Duration::from_secs(10), || !exists(&redis, record));
    assert_eq!(k.outcome("pay-1", "POST.pay", "next").await, Outcome::Claimed);

    // The late owner (its request finally done) can neither complete nor release the new claim.
    assert!(!k.complete("pay-1", "late", Some(response())).await);
    assert!(!k.release("pay-1", "late").await);
    assert_eq!(k.outcome("pay-1", "POST.pay", "other").await, Outcome::InFlight, "still next's claim");
    let owner: String = redis::cmd("HGET").arg(record).arg("owner").query(&mut redis.conn()).unwrap();
    assert_eq!(owner, "next");
    assert!(pttl(&redis, record) > 300, "the new claim's expiry was not touched");

    // Nor once the new claim completed.
    assert!(k.complete("pay-1", "next", None).await);
    assert!(!k.release("pay-1", "late").await);
    assert_eq!(k.claim("pay-1", "POST.pay", "other").await.outcome(), Outcome::Completed);
}

async fn exactly_one_claims(k: &Keys, tag: &str) {
    for round in 0..5 {
        // A fresh key each round: every claim races to create it.
        let key = format!("race-{tag}-{round}");
        let mut set = tokio::task::JoinSet::new();
        for i in 0..50 {
            let mut k = k.clone();
            let key = key.clone();
            set.spawn(async move { k.outcome(&key, "POST.race", &format!("owner-{i}")).await });
        }
        let mut outcomes = Vec::new();
        while let Some(r) = set.join_next().await {
            outcomes.push(r.unwrap());
        }
        let claimed = outcomes.iter().filter(|o| **o == Outcome::Claimed).count();
        let waiting = outcomes.iter().filter(|o| **o == Outcome::InFlight).count();
        assert_eq!((claimed, waiting), (1, 49), "{tag} round {round}: {outcomes:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_claims_of_a_fresh_key_exactly_one_wins() {
    let redis = RedisServer::start();
    // Two service instances on one Redis: the fleet.
    let a = Service::start(&["--redis-url", &redis.url()]);
    let b = Service::start(&["--redis-url", &redis.url()]);
    exactly_one_claims(&Keys::connect(a.grpc).await, "one").await;
    for round in 0..5 {
        let key = format!("race-two-{round}");
        let mut set = tokio::task::JoinSet::new();
        for i in 0..50 {
            let addr = if i % 2 == 0 { a.grpc } else { b.grpc };
            let key = key.clone();
            set.spawn(async move {
                Keys::connect(addr).await.outcome(&key, "POST.race", &format!("owner-{i}")).await
            });
        }
        let mut claimed = 0;
        while let Some(r) = set.join_next().await {
            claimed += usize::from(r.unwrap() == Outcome::Claimed);
        }
        assert_eq!(claimed, 1, "two instances, round {round}");
    }
    assert_eq!(claims(&a, "claimed") + claims(&b, "claimed"), 10);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_inputs_are_invalid_argument_naming_the_field() {
    let redis = RedisServer::start();
    let svc = Service::start(&["--redis-url", &redis.url(), "--max-value-bytes", "64"]);
    let mut k = Keys::connect(svc.grpc).await;
    let good = claim_req("k", "r", "o", 1000);
    let long = |n| "x".repeat(n);
    let claims_bad: Vec<(ClaimRequest, &str)> = vec![
        (ClaimRequest { domain: String::new(), ..good.clone() }, "domain:"),
        (ClaimRequest { domain: long(65), ..good.clone() }, "domain:"),
        (ClaimRequest { key: String::new(), ..good.clone() }, "key:"),
        (ClaimRequest { key: long(257), ..good.clone() }, "key:"),
        (ClaimRequest { key: "a b".into(), ..good.clone() }, "key:"),
        (ClaimRequest { key: "a}{b".into(), ..good.clone() }, "key:"),
        (ClaimRequest { request: String::new(), ..good.clone() }, "request:"),
        (ClaimRequest { request: long(65), ..good.clone() }, "request:"),
        (ClaimRequest { request: "POST /x".into(), ..good.clone() }, "request:"),
        (ClaimRequest { owner: String::new(), ..good.clone() }, "owner:"),
        (ClaimRequest { owner: "o/1".into(), ..good.clone() }, "owner:"),
        (ClaimRequest { in_flight_ms: 0, ..good.clone() }, "in_flight_ms:"),
        (ClaimRequest { in_flight_ms: 86_400_001, ..good.clone() }, "in_flight_ms:"),
    ];
    let n_claims = claims_bad.len() as u64;
    for (r, field) in claims_bad {
        let e = k.claim_req(r.clone()).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{r:?}: {e}");
        assert!(e.message().starts_with(field), "{r:?}: {e}");
    }
    // The bounds are inclusive.
    let edge = ClaimRequest {
        domain: long(64),
        key: long(256),
        request: long(64),
        owner: long(64),
        in_flight_ms: 86_400_000,
    };
    assert_eq!(k.claim_req(edge).await.unwrap().outcome(), Outcome::Claimed);
    assert_eq!(dbsize(&redis), 1);

    assert_eq!(k.outcome("c", "r", "o").await, Outcome::Claimed);
    let good = CompleteRequest {
        domain: "edge".into(),
        key: "c".into(),
        owner: "o".into(),
        release: false,
        ttl_ms: 1000,
        stored: Some(response()),
    };
    let with = |f: &dyn Fn(&mut StoredResponse)| {
        let mut s = response();
        f(&mut s);
        CompleteRequest { stored: Some(s), ..good.clone() }
    };
    let header = |name: &str, value: &str| Header { name: name.into(), value: value.into() };
    let completes_bad: Vec<(CompleteRequest, &str)> = vec![
        (CompleteRequest { domain: String::new(), ..good.clone() }, "domain:"),
        (CompleteRequest { key: "k\n".into(), ..good.clone() }, "key:"),
        (CompleteRequest { owner: long(65), ..good.clone() }, "owner:"),
        (CompleteRequest { ttl_ms: 0, ..good.clone() }, "ttl_ms:"),
        (CompleteRequest { ttl_ms: 2_678_400_001, ..good.clone() }, "ttl_ms:"),
        (with(&|s| s.status = 0), "stored.status:"),
        (with(&|s| s.status = 99), "stored.status:"),
        (with(&|s| s.status = 600), "stored.status:"),
        (with(&|s| s.headers = vec![header("a", "b"); 17]), "stored.headers:"),
        (with(&|s| s.headers.push(header("bad name", "v"))), "stored.headers[3].name:"),
        (with(&|s| s.headers.push(header("", "v"))), "stored.headers[3].name:"),
        (with(&|s| s.headers[1].value = "a\r\nset-cookie: x".into()), "stored.headers[1].value:"),
        (with(&|s| s.headers[0].value = long(4097)), "stored.headers[0].value:"),
        (with(&|s| s.body = vec![0; 65_537]), "stored.body:"),
    ];
    let n_completes = completes_bad.len() as u64;
    for (r, field) in completes_bad {
        let e = k.complete_req(r).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{field} {e}");
        assert!(e.message().starts_with(field), "{field}: {e}");
    }
    // Nothing changed: the claim is still in flight, and completes at the bounds.
    assert_eq!(k.outcome("c", "r", "o2").await, Outcome::InFlight);
    let most = CompleteRequest {
        ttl_ms: 2_678_400_000,
        stored: Some(StoredResponse {
            status: 599,
            headers: vec![header("x-long", &long(4096)); 16],
            body: vec![7; 65_536],
        }),
        ..good.clone()
    };
    assert!(k.complete_req(most.clone()).await.unwrap());
    assert_eq!(k.claim("c", "r", "o2").await.stored, most.stored);
    // A release ignores ttl_ms and stored.
    assert_eq!(k.outcome("d", "r", "o").await, Outcome::Claimed);
    let release = CompleteRequest { key: "d".into(), release: true, ttl_ms: 0, ..with(&|s| s.status = 0) };
    assert!(k.complete_req(release).await.unwrap());

    assert_eq!(claims(&svc, "invalid_argument"), n_claims);
    assert_eq!(completions(&svc, "invalid_argument"), n_completes);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_over_max_request_bytes_are_refused_undecoded() {
    let redis = RedisServer::start();
    let svc = Service::start(&["--redis-url", &redis.url(), "--max-request-bytes", "2000"]);
    let mut k = Keys::connect(svc.grpc).await;
    assert_eq!(k.outcome("big", "r", "o").await, Outcome::Claimed);
    let mut r = CompleteRequest {
        domain: "edge".into(),
        key: "big".into(),
        owner: "o".into(),
        release: false,
        ttl_ms: 1000,
        stored: Some(StoredResponse { status: 200, headers: vec![], body: vec![1; 2000] }),
    };
    let e = k.complete_req(r.clone()).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e}");
    assert!(e.message().contains("--max-request-bytes"), "{e}");
    let e = k.claim_req(ClaimRequest { domain: "x".repeat(2000), ..claim_req("big", "r", "o", 1) }).await;
    assert_eq!(e.unwrap_err().code(), tonic::Code::InvalidArgument);
    assert_eq!(claims(&svc, "invalid_argument"), 1);
    assert_eq!(completions(&svc, "invalid_argument"), 1);
    r.stored = Some(StoredResponse { status: 200, headers: vec![], body: vec![1; 1000] });
    assert!(k.complete_req(r).await.unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_is_unavailable() {
    let mut redis = RedisServer::start();
    let svc = Service::start(&["--redis-url", &redis.url(), "--redis-timeout-ms", "500"]);
    let mut k = Keys::connect(svc.grpc).await;
    assert_eq!(k.outcome("down", "r", "o").await, Outcome::Claimed);
    redis.stop();
    let e = k.claim_req(claim_req("down-2", "r", "o", 1000)).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unavailable, "{e}");
    let r = CompleteRequest {
        domain: "edge".into(),
        key: "down".into(),
        owner: "o".into(),
        release: true,
        ..Default::default()
    };
    let e = k.complete_req(r).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unavailable, "{e}");
    assert_eq!(claims(&svc, "unavailable"), 1);
    assert_eq!(completions(&svc, "unavailable"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotency_keys_work_on_a_redis_cluster() {
    let cluster = RedisCluster::start();
    let svc = Service::start(&["--redis-cluster", "--redis-url", &cluster.urls()]);
    let mut k = Keys::connect(svc.grpc).await;
    // Keys in different slots, on different nodes.
    for i in 0..6 {
        let key = format!("cl-{i}");
        assert_eq!(k.outcome(&key, "POST.x", "a").await, Outcome::Claimed);
        assert_eq!(k.outcome(&key, "POST.y", "b").await, Outcome::Mismatch);
        assert!(k.complete(&key, "a", Some(response())).await);
        assert_eq!(k.claim(&key, "POST.x", "b").await.stored, Some(response()));
    }
    exactly_one_claims(&k, "cluster").await;
}
