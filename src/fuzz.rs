//! Fuzz targets: one function per target, each taking the fuzzer's bytes. None may panic on any
//! input, and each asserts what must hold whatever the input. `make fuzz` runs them under
//! cargo-fuzz (`fuzz/`); `tests/fuzz_replay.rs` replays them on stable over the committed corpus
//! (`fuzz/corpus/<target>/`) and deterministic mutations of it. Test-support code: built for tests
//! and with the `testing` feature only.
//!
//! - [`config`]: the configuration parser on any bytes;
//! - [`request`]: requests through the core's moments (decide, answered, settle, end, tick), with
//!   arbitrary headers, JWTs, `X-Forwarded-For`, costs and paths, a clock that moves both ways, the
//!   service's answers (and so give-backs), the status endpoint and a store that may fail;
//! - [`table`]: every slot of the table and the seed pre-filled with arbitrary bytes, then
//!   lookups, consumes, give-backs and the algorithms on whatever the slots hold;
//! - [`answer`]: the service's answer, decoded and mapped to verdicts and standings.

use std::cell::RefCell;
use std::collections::HashMap;

use prost::Message;

use crate::algorithm::{Decision, State};
use crate::config::{Config, Cost, HeaderCondition, KeyPart, Limit, Limits, PathMatch, PlanSource};
use crate::config::{TableShare, MIN_TABLE_SIZE};
use crate::decide::{Env, Exchange, Limiter, Next, ResponseHeaders};
use crate::global::answer::{read_answer, CallError, MAX_ANSWER_BYTES, MAX_SERVICE_HEADERS};
use crate::global::descriptors::prepare;
use crate::global::protocol::{CurrentLimit, DescriptorStatus, HeaderValue, ProtoDuration};
use crate::global::protocol::{Quota, RateLimitRequest, RateLimitResponse, Timestamp};
use crate::global::verdict::{standings, verdict};
use crate::global::Purpose;
use crate::idempotency::protocol::{ClaimRequest, CLAIM};
use crate::report::metrics::Metric;
use crate::report::reply::LocalReply;
use crate::report::status::status_json;
use crate::report::violations::Violation;
use crate::report::Observer;
use crate::request::keys::{request_key, status_key};
use crate::request::TestRequest;
use crate::state::clock::FakeClock;
use crate::state::memory::{FailingStore, MemoryStore, Op};
use crate::state::slot::{store_key, Slot, StoreKey, EMPTY_SLOT, NEVER_USED, TOMBSTONE};
use crate::state::store::SharedStore;
use crate::state::table::{Applied, Bucket, Table, TableEvents};
use crate::state::Fingerprint;

const S: u64 = 1_000_000_000;
const MS: u64 = 1_000_000;
/// 2026-01-15T08:00:00Z: hours from any calendar boundary.
const T0: u64 = 1_768_464_000 * S;
/// Moments of one run at most, so an input's cost stays bounded.
const MAX_STEPS: usize = 64;

// ---------------------------------------------------------------------------------------------
// Reading choices from the fuzzer's bytes.

/// The input as a sequence of choices; an exhausted input reads as zeros.
struct Choices<'a> {
    bytes: &'a [u8],
}

impl<'a> Choices<'a> {
    fn new(bytes: &'a [u8]) -> Choices<'a> {
        Choices { bytes }
    }

    fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    fn byte(&mut self) -> u8 {
        let Some((&first, rest)) = self.bytes.split_first() else { return 0 };
        self.bytes = rest;
        first
    }

    /// A number in `0..n` (0 when `n` is 0).
    fn below(&mut self, n: usize) -> usize {
        usize::from(self.byte()) % n.max(1)
    }

    fn take(&mut self, n: usize) -> &'a [u8] {
        let (taken, rest) = self.bytes.split_at(n.min(self.bytes.len()));
        self.bytes = rest;
        taken
    }

    /// Up to `max` bytes, as many as the next byte says.
    fn short(&mut self, max: usize) -> &'a [u8] {
        let n = self.below(max + 1);
        self.take(n)
    }

    fn u64(&mut self) -> u64 {
        let mut word = [0u8; 8];
        let taken = self.take(8);
        word[..taken.len()].copy_from_slice(taken);
        u64::from_le_bytes(word)
    }

    /// One of `options`, or (one chance more) arbitrary bytes.
    fn text(&mut self, options: &[&str]) -> Vec<u8> {
        let i = self.below(options.len() + 1);
        match options.get(i) {
            Some(option) => option.as_bytes().to_vec(),
            None => self.short(24).to_vec(),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// What every target checks.

/// Counts what the core reports, and checks what it logs.
#[derive(Default)]
struct Recorder {
    counts: RefCell<HashMap<Metric, u64>>,
}

/// The longest `max_delay` a configuration may set, in milliseconds.
const MAX_DELAY_MS: u64 = 60_000;

impl Recorder {
    fn get(&self, metric: Metric) -> u64 {
        self.counts.borrow().get(&metric).copied().unwrap_or(0)
    }
}

impl Observer for Recorder {
    fn count(&self, metric: Metric) {
        *self.counts.borrow_mut().entry(metric).or_default() += 1;
    }

    /// A request is never held longer than its `max_delay`, whatever the clock did.
    fn add(&self, metric: Metric, n: u64) {
        if let Metric::DelayedMs(_) = metric {
            assert!(n <= MAX_DELAY_MS, "a request held {n} ms, longer than any max_delay");
        }
        *self.counts.borrow_mut().entry(metric).or_default() += n;
    }

    fn violation(&self, violation: &Violation<'_>) {
        let line = violation.render(0);
        assert!(!line.contains(['\n', '\r']), "a violation log line spans lines: {line:?}");
    }

    fn global_failure(&self, reason: &str) {
        assert!(!reason.is_empty(), "a failure of the rate limit service logged without a reason");
    }
}

/// No header has an empty name, or a line break or a NUL in its name or value, whatever the
/// request or the service's answer held.
fn check_headers<'h>(headers: impl IntoIterator<Item = (&'h str, &'h str)>) {
    for (name, value) in headers {
        let clean = |text: &str| !text.bytes().any(|b| matches!(b, b'\r' | b'\n' | 0));
        assert!(!name.is_empty() && clean(name) && clean(value), "header {name:?}: {value:?}");
    }
}

/// The headers a request that passed gets: clean; the service's, at most
/// [`MAX_SERVICE_HEADERS`] of each list, never the upstream's `content-type`.
fn check_passed(settled: &ResponseHeaders, exchange: &mut Exchange) {
    check_headers(settled.limit.iter().map(|(name, value)| (*name, value.as_str())));
    check_headers(settled.service.iter().map(|(name, value)| (name.as_str(), value.as_str())));
    assert!(settled.service.len() <= MAX_SERVICE_HEADERS, "{settled:?}");
    assert!(settled.service.iter().all(|(name, _)| name != "content-type"), "{settled:?}");
    let upstream = exchange.take_upstream_headers();
    check_headers(upstream.iter().map(|(name, value)| (name.as_str(), value.as_str())));
    assert!(upstream.len() <= MAX_SERVICE_HEADERS, "{upstream:?}");
}

/// A reply's headers are clean, and the status endpoint's body is JSON (a replayed response's
/// is whatever the upstream sent).
fn check_reply(reply: &LocalReply<'_>) {
    check_headers(reply.headers.iter().map(|(name, value)| (name.as_ref(), value.as_ref())));
    let replayed = reply.headers.iter().any(|(name, _)| name == "idempotent-replayed");
    if reply.status == 200 && reply.grpc_status.is_none() && !replayed {
        let parsed = serde_json::from_slice::<serde_json::Value>(&reply.body);
        assert!(parsed.is_ok(), "the status body is not JSON: {:?}", String::from_utf8_lossy(&reply.body));
    }
}

/// A decision never reports more than the limit holds, and a request that passes need not wait.
fn check_decision(decision: &Decision, capacity: u64) {
    assert!(decision.remaining <= capacity, "{decision:?} of a limit of {capacity}");
    assert!(!decision.allowed || decision.retry_after_nanos == 0, "{decision:?}");
}

/// One of this module's own configurations, which must parse.
fn fixed_config(json: &str) -> Option<Config> {
    let parsed = Config::parse(json.as_bytes());
    assert!(parsed.is_ok(), "{parsed:?}");
    parsed.ok()
}

/// A store that fails the calls the input picks (none when its first byte is below 128).
fn failing_store(input: &mut Choices<'_>) -> (FailingStore, bool) {
    let store = FailingStore::new(MemoryStore::new());
    let (mode, every) = (input.byte(), u64::from(input.byte() % 16) + 1);
    if mode < 128 {
        return (store, false);
    }
    let op = if mode % 3 == 0 {
        Some(Op::Get)
    } else if mode % 3 == 1 {
        Some(Op::Set)
    } else {
        None
    };
    store.fail_when(move |call| op.is_none_or(|op| op == call.op) && call.nth % every == 0);
    (store, true)
}

// ---------------------------------------------------------------------------------------------
// The configuration parser.

/// Any bytes: parsed, or refused with a message that says why. An accepted configuration shares
/// its table out without overlaps, parses the same twice, and serves requests.
pub fn config(data: &[u8]) {
    let config = match Config::parse(data) {
        Ok(config) => config,
        Err(e) => {
            assert!(!e.message.is_empty(), "an error that does not say why: {e:?}");
            return;
        }
    };
    check_shares(&config);
    assert_eq!(Config::parse(data).as_ref(), Ok(&config), "parsing twice gave another configuration");
    serve_a_few(config);
}

/// Every local rule (and the status endpoint) has its own share of at least one probe window,
/// within the table; global rules have none.
fn check_shares(config: &Config) {
    for rule in &config.rules {
        assert_eq!(rule.table.is_none(), rule.global.is_some(), "rule {:?}", rule.name);
    }
    assert_eq!(config.status_table.is_some(), config.status_path.is_some());
    let mut shares: Vec<TableShare> = config.rules.iter().filter_map(|r| r.table).collect();
    shares.extend(config.status_table);
    shares.sort_by_key(|s| s.start);
    let mut end = 0u64;
    for share in shares {
        assert!(u64::from(share.start) >= end && share.size >= MIN_TABLE_SIZE, "{share:?} after {end}");
        end = u64::from(share.start) + u64::from(share.size);
    }
    assert!(end <= u64::from(config.table_size), "shares end at {end} of {}", config.table_size);
}

/// A request that meets the rules' conditions and has their key parts, as far as one can.
fn matching_request(config: &Config) -> TestRequest {
    let mut request = TestRequest::get("/").with_source("10.0.0.1:5000");
    request = request.with_header("x-forwarded-for", "192.0.2.1, 198.51.100.2, 203.0.113.3");
    for rule in &config.rules {
        if let Some(method) = rule.matcher.methods.first() {
            request = request.with_header(":method", method);
        }
        match &rule.matcher.path {
            Some(PathMatch::Exact(path)) => request = request.with_header(":path", path),
            Some(PathMatch::Prefix(prefix)) => {
                request = request.with_header(":path", format!("{prefix}x?q=1"))
            }
            None => {}
        }
        for header in &rule.matcher.headers {
            let value = match &header.condition {
                HeaderCondition::Equals(value) => value.clone(),
                HeaderCondition::Present(_) => b"v".to_vec(),
            };
            request = request.with_header(&header.name, value);
        }
        for part in &rule.key {
            request = match part {
                KeyPart::Header(name) => request.with_header(name, "k"),
                KeyPart::JwtClaim(claim) => {
                    request.with_header("authorization", bearer(&format!("{claim:?}:\"k\"")))
                }
                _ => request,
            };
        }
        if let Cost::Header { name, .. } = &rule.cost {
            request = request.with_header(name, "1");
        }
        if let Limits::Plans(plans) = &rule.limits {
            if let (PlanSource::Header(name), Some(plan)) = (&plans.source, plans.plans.first()) {
                request = request.with_header(name, &plan.name);
            }
        }
    }
    request
}

/// A few requests (and status calls) through every moment; the service, if any, is unavailable.
fn serve_a_few(config: Config) {
    let request = matching_request(&config);
    let status = config.status_path.as_ref().map(|p| TestRequest::get(p).with_source("10.0.0.2:1"));
    let limiter = Limiter::new(config, 7);
    let (store, observer) = (MemoryStore::new(), Recorder::default());
    for request in std::iter::once(&request).chain(status.as_ref()) {
        for second in 0..3 {
            let env = Env::at(&store, request, T0 + second * S, &observer);
            let mut exchange = Exchange::default();
            let next = match limiter.decide(&env, &mut exchange) {
                Next::Ask(_) => limiter.answered(
                    &env,
                    &mut exchange,
                    Err(CallError::Status { code: 14, message: String::new() }),
                ),
                next => next,
            };
            match next {
                Next::Reply(reply) => check_reply(&reply),
                Next::Continue | Next::Delay { .. } => {
                    check_passed(
                        &limiter.settle(&env, &mut exchange, &TestRequest::default()),
                        &mut exchange,
                    );
                }
                Next::Ask(_) => assert!(!exchange.is_awaiting(), "an answered request asks again"),
            }
            limiter.end(&env, &mut exchange);
        }
    }
    limiter.tick(&store, T0 + 3 * S, &observer);
    assert_eq!(limiter.units_held(), 0, "units still held after every stream ended");
    let standings = limiter.standings(&Env::at(&store, &request, T0, &observer));
    assert!(standings.is_ok(), "{:?}", standings.err());
}

fn bearer(claims: &str) -> Vec<u8> {
    let mut token = b"Bearer eyJhbGciOiJub25lIn0.".to_vec();
    token.extend(base64url(format!("{{{claims}}}").as_bytes()));
    token.push(b'.');
    token
}

fn base64url(bytes: &[u8]) -> Vec<u8> {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = Vec::with_capacity(bytes.len() * 4 / 3 + 3);
    for chunk in bytes.chunks(3) {
        let n = chunk.iter().enumerate().fold(0u32, |acc, (i, &b)| acc | (u32::from(b) << (16 - 8 * i)));
        for i in 0..=chunk.len() {
            out.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize]);
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Requests through the core.

/// The limit every request configuration starts with: `strict`, keyed on `x-key`, 5 per day, so
/// within [`STRICT_SPAN`] of clock readings it never gives a unit back by refilling.
const STRICT_QUOTA: u64 = 5;
/// Less than the 4.8 h a token of 5 per 24 h takes to refill; T0 is 8 h from midnight.
const STRICT_SPAN: u64 = 4 * 3600 * S;

/// The concurrency limit of the last configuration: at most this many requests of one `x-key` in
/// flight (its lease, 24 h, outlasts [`STRICT_SPAN`]).
const IN_FLIGHT_MAX: usize = 2;

/// The request target's configurations, chosen by the first byte. Rule 0 is always `strict`.
const REQUEST_CONFIGS: [&str; 6] = [
    // Token bucket; plans from a JWT claim, a header cost, an XFF key in its own full-denying
    // share, a shadow rule, the status endpoint, raw keys in the log, requests held for their turn.
    r#"{"table_size":72,"status_path":"/rl","status_limit":{"capacity":3,"refill_period":"1h"},
      "violation_log":{"include_key":true},"rules":[
      {"name":"strict","key":[{"source":"header","name":"x-key"}],"limit":{"capacity":5,"refill_period":"24h"}},
      {"name":"plans","match":{"path_prefix":"/api/"},"key":[{"source":"jwt_claim","claim":"sub"}],
       "plan":{"jwt_claim":"plan"},"default_plan":"free","plans":{
         "free":{"limits":[{"name":"second","algorithm":"gcra","requests":2,"period":"1s","burst":4},
                           {"name":"month","algorithm":"fixed_window","requests":100,"window":"month"}]},
         "pro":{"limit":{"algorithm":"sliding_window","requests":10,"window":"1m"}},
         "internal":{"unlimited":true}},
       "cost":{"header":"x-cost","max":50,"default":1}},
      {"name":"xff","table_size":8,"when_table_full":"deny","key":[{"source":"x_forwarded_for","trusted_hops":1}],
       "limit":{"algorithm":"fixed_window","requests":20,"window":"1m"}},
      {"name":"shadow","shadow":true,"key":[{"source":"client_address"}],
       "limit":{"algorithm":"fixed_window","requests":3,"window":"1h"}},
      {"name":"paced","match":{"path_prefix":"/paced"},"key":[{"source":"header","name":"x-key"}],
       "limit":{"capacity":1,"refill_tokens":10,"refill_period":"1s","max_delay":"1s","max_queued":3}}]}"#,
    // Fixed window; global rules (one denying on failure, one with a local fallback, one with
    // plans), the status endpoint asking the service, a custom deny response.
    r#"{"table_size":32,"headers":"ietf","status_path":"/ratelimit/status",
      "global":{"cluster":"rls","domain":"edge","timeout":"50ms"},
      "deny_response":{"status":503,"body":"slow down","content_type":"text/plain","grpc_status":14},
      "rules":[
      {"name":"strict","when_table_full":"deny","key":[{"source":"header","name":"x-key"}],
       "limit":{"algorithm":"fixed_window","requests":5,"window":"1d"}},
      {"name":"open","global":true,"key":[{"source":"header","name":"x-key"},{"source":"path"}],
       "limit":{"algorithm":"fixed_window","requests":10,"window":"1m"},
       "failure_mode":"local","fallback":{"algorithm":"fixed_window","requests":3,"window":"1m"}},
      {"name":"closed","global":true,"failure_mode":"deny","match":{"path_prefix":"/pay","methods":["POST"]},
       "key":[{"source":"x_forwarded_for","trusted_hops":2}],
       "limits":[{"name":"s","algorithm":"fixed_window","requests":3,"window":"1s"},
                 {"name":"m","algorithm":"fixed_window","requests":30,"window":"month"}],
       "cost":{"header":"x-cost","max":9,"default":1}},
      {"name":"tiers","global":true,"key":[{"source":"jwt_claim","claim":"sub"}],"plan":{"header":"x-plan"},
       "default_plan":"basic","plans":{"basic":{"limit":{"algorithm":"fixed_window","requests":5,"window":"1h"}},
       "vip":{"unlimited":true}}}]}"#,
    // Sliding window; a small table that denies when full, query, method and constant keys, a
    // header condition, a constant cost, two limits on one rule, a cost charged from the response.
    r#"{"table_size":32,"when_table_full":"deny","headers":"x-ratelimit","key_prefix":"fz","rules":[
      {"name":"strict","key":[{"source":"header","name":"x-key"}],
       "limit":{"algorithm":"sliding_window","requests":5,"window":"24h"}},
      {"name":"gcra","match":{"headers":[{"name":"x-tier","equals":"gold"}]},
       "key":[{"source":"query","name":"k"},{"source":"method"}],"when_key_missing":"empty",
       "limit":{"algorithm":"gcra","requests":4,"period":"1s","burst":2},"cost":2},
      {"name":"all","key":[{"source":"constant","value":"all"}],
       "limits":[{"name":"burst","capacity":50,"refill_tokens":5,"refill_period":"1s"},
                 {"name":"minute","algorithm":"sliding_window","requests":200,"window":"1m"}]},
      {"name":"metered","key":[{"source":"header","name":"x-key"}],
       "limit":{"algorithm":"fixed_window","requests":1000,"window":"1h"},
       "cost":{"response_header":"x-usage","max":500,"estimate":2}}]}"#,
    // GCRA; local rules next to a global one that denies when the service fails, plans from a
    // header, the path as a key.
    r#"{"table_size":40,"status_path":"/rl","global":{"cluster":"rls","domain":"d","failure_mode":"deny"},"rules":[
      {"name":"strict","key":[{"source":"header","name":"x-key"}],
       "limit":{"algorithm":"gcra","requests":5,"period":"24h","burst":5}},
      {"name":"by-plan","key":[{"source":"path"}],"plan":{"header":"x-plan"},"default_plan":"free",
       "plans":{"free":{"limit":{"capacity":2,"refill_period":"1s"}},"pro":{"unlimited":true}},
       "cost":{"header":"x-cost","max":3,"default":1}},
      {"name":"remote","global":true,"match":{"path_prefix":"/api/"},"key":[{"source":"client_address"}],
       "limit":{"algorithm":"fixed_window","requests":100,"window":"1h"}}]}"#,
    // Token bucket next to a concurrency limit on the same key (units held from admission to the
    // stream's end, renewed on ticks), and a global rule whose denial releases them.
    r#"{"table_size":32,"status_path":"/rl","global":{"cluster":"rls","domain":"c"},"rules":[
      {"name":"strict","key":[{"source":"header","name":"x-key"}],"limit":{"capacity":5,"refill_period":"24h"}},
      {"name":"inflight","key":[{"source":"header","name":"x-key"}],
       "limit":{"algorithm":"concurrency","max_in_flight":2,"lease":"24h"}},
      {"name":"remote","global":true,"match":{"path_prefix":"/api/"},"key":[{"source":"client_address"}],
       "limit":{"algorithm":"fixed_window","requests":100,"window":"1h"}}]}"#,
    // A leased global rule charged from the response, and idempotency keys: kept here in a tiny
    // table, and kept by the service (whose answers are fuzzed like any other).
    r#"{"table_size":32,"global":{"cluster":"outbound|81||rls.ns","domain":"l"},"rules":[
      {"name":"strict","key":[{"source":"header","name":"x-key"}],"limit":{"capacity":5,"refill_period":"24h"}},
      {"name":"leased","global":true,"key":[{"source":"header","name":"x-key"}],
       "limit":{"algorithm":"fixed_window","requests":50,"window":"1h"},
       "lease":{"size":5,"refresh_below":2,"validity":"10s","adaptive":true},
       "cost":{"response_header":"x-usage","max":500,"estimate":1}}],
     "idempotency":[
      {"name":"pay","match":{"methods":["POST"]},"scope":[{"source":"header","name":"x-key"}],"required":true,
       "table_size":8,"max_body_bytes":16,"when_table_full":"deny"},
      {"name":"fleet","match":{"path_prefix":"/api/"},"scope":[{"source":"client_address"}],"across":"fleet",
       "when_service_fails":"deny"}]}"#,
];

const METHODS: &[&str] = &["GET", "POST", "HEAD", "PUT"];
const PATHS: &[&str] = &[
    "/",
    "/api/x",
    "/api/y?k=1",
    "/pay",
    "/pay/now?x",
    "/rl",
    "/rl?verbose",
    "/ratelimit/status",
    "/search?k=a&k=b",
    "/?k=%zz&k",
    "/paced",
];
const USAGES: &[&str] = &["0", "1", "300", "501", "18446744073709551616", "x", ""];
/// The longest a request is held for its turn (`paced`'s `max_delay`).
const MAX_DELAY: u64 = S;
const KEYS: &[&str] = &["a", "b", "c", "d"];
const IDEMPOTENCY_KEYS: &[&str] = &["k1", "\"k1\"", "k2", "a,b", "", " ", "\"", "\"\"", "x\ty"];
const PLANS: &[&str] = &["free", "pro", "internal", "vip", "basic"];
const COSTS: &[&str] = &["1", "2", "7", "0", "-1", " 3 ", "51", "18446744073709551616", ""];
const CLAIM_VALUES: &[&str] = &[
    "\"u1\"",
    "\"u2\"",
    "7",
    "true",
    "null",
    "{\"x\":1}",
    "\"pro\"",
    "\"free\"",
    "\"internal\"",
    "\"a\\nb\"",
];
const FORWARDED: &[&str] = &["192.0.2.1", "192.0.2.1, 198.51.100.2", " , ,", "::1, 2001:db8::1", "x\ty, z"];
const SOURCES: &[&str] = &["10.0.0.1:5000", "10.0.0.2:5000", "[::1]:80", "garbage", ""];

/// A request from the input: method, path and a choice of the headers the configurations read.
/// Also returns its `x-key`, the `strict` rule's key.
fn fuzz_request(input: &mut Choices<'_>) -> (TestRequest, Option<Vec<u8>>) {
    let mut request = TestRequest::default()
        .with_header(":method", input.text(METHODS))
        .with_header(":path", input.text(PATHS));
    let present = input.byte();
    let mut key = None;
    if present & 1 != 0 {
        let value = input.text(KEYS);
        request = request.with_header("x-key", &value);
        key = Some(value);
    }
    if present & 2 != 0 {
        request = request.with_header("x-plan", input.text(PLANS));
    }
    if present & 4 != 0 {
        request = request.with_header("x-cost", input.text(COSTS));
    }
    if present & 8 != 0 {
        request = request.with_header("authorization", fuzz_bearer(input));
    }
    if present & 16 != 0 {
        request = request.with_header("x-forwarded-for", input.text(FORWARDED));
    }
    if present & 32 != 0 {
        request = request.with_source(&String::from_utf8_lossy(&input.text(SOURCES)));
    }
    if present & 64 != 0 {
        request = request.with_header("x-tier", input.text(&["gold", "silver"]));
    }
    if present & 128 != 0 {
        request = request.with_header("idempotency-key", input.text(IDEMPOTENCY_KEYS));
    }
    (request, key)
}

/// An `Authorization` value: a JWT with chosen claims, one with an arbitrary payload, or junk.
fn fuzz_bearer(input: &mut Choices<'_>) -> Vec<u8> {
    match input.below(4) {
        0 => {
            let sub = String::from_utf8_lossy(&input.text(CLAIM_VALUES)).into_owned();
            let plan = String::from_utf8_lossy(&input.text(CLAIM_VALUES)).into_owned();
            bearer(&format!("\"sub\":{sub},\"plan\":{plan}"))
        }
        1 => {
            let mut token = b"Bearer e30.".to_vec();
            token.extend(base64url(input.short(32)));
            token.extend(b".sig");
            token
        }
        2 => input.short(48).to_vec(),
        _ => b"bearer   not-a-jwt".to_vec(),
    }
}

/// The service's answer to a call, or why there is none.
fn fuzz_answer(input: &mut Choices<'_>) -> Result<Vec<u8>, CallError> {
    match input.below(6) {
        0 => Ok(input.short(48).to_vec()),
        1 | 2 => Ok(fuzz_response(input).encode_to_vec()),
        3 => Err(CallError::Status { code: u32::from(input.byte()), message: String::new() }),
        4 => Err(CallError::CannotCall { cluster: "rls".into(), host_status: u32::from(input.byte()) }),
        _ => Err(CallError::TooLarge { bytes: MAX_ANSWER_BYTES + usize::from(input.byte()) + 1 }),
    }
}

/// A well-formed `RateLimitResponse` with chosen codes, limits and resets.
fn fuzz_response(input: &mut Choices<'_>) -> RateLimitResponse {
    let overall_code = i32::from(input.byte() % 4);
    let mut statuses = Vec::new();
    for _ in 0..input.below(5) {
        let code = i32::from(input.byte() % 4);
        let current_limit = (input.byte() % 4 != 0).then_some(CurrentLimit {
            requests_per_unit: u32::from(input.byte()),
            unit: i32::from(input.byte() % 9),
            name: String::new(),
        });
        let limit_remaining = u32::from(input.byte());
        let seconds = if input.byte() % 8 == 0 { input.u64() as i64 } else { i64::from(input.byte() as i8) };
        let reset = ProtoDuration { seconds, nanos: i32::from(input.byte()) };
        let duration_until_reset = (input.byte() % 3 != 0).then_some(reset);
        // Leases the service may grant: any count, any expiry (past, far future, negative).
        let quota = (input.byte() % 3 == 0).then(|| Quota {
            requests: input.u64() as u32,
            valid_until: (input.byte() % 2 == 0)
                .then(|| Timestamp { seconds: input.u64() as i64, nanos: i32::from(input.byte() as i8) }),
            id: "x".repeat(usize::from(input.byte())),
        });
        statuses.push(DescriptorStatus { code, current_limit, limit_remaining, duration_until_reset, quota });
    }
    RateLimitResponse {
        overall_code,
        statuses,
        response_headers_to_add: fuzz_header_values(input),
        request_headers_to_add: fuzz_header_values(input),
    }
}

const HEADER_NAMES: &[&str] = &[
    "x-ratelimit-limit",
    "retry-after",
    "ratelimit",
    "RateLimit-Reset",
    "content-type",
    "content-length",
    ":path",
    "x-a b",
    "x-tenant",
];
const HEADER_VALUES: &[&str] =
    &["60", "t=5", "limit=10, remaining=0; t=3600", "99999999999", "a\r\nb: c", "\t x", ""];

/// Headers the service asks to add, good and bad, in `value` or `raw_value`.
fn fuzz_header_values(input: &mut Choices<'_>) -> Vec<HeaderValue> {
    let mut headers = Vec::new();
    for _ in 0..input.below(4) * usize::from(input.byte() % 8 + 1) {
        let key = String::from_utf8_lossy(&input.text(HEADER_NAMES)).into_owned();
        let value = input.text(HEADER_VALUES);
        headers.push(if input.byte() % 3 == 0 {
            HeaderValue { key, value: String::new(), raw_value: value }
        } else {
            HeaderValue { key, value: String::from_utf8_lossy(&value).into_owned(), raw_value: Vec::new() }
        });
    }
    headers
}

/// A request between its moments.
struct Pending {
    id: u32,
    request: TestRequest,
    exchange: Exchange,
    key: Option<Vec<u8>>,
}

/// One run of the request target: one limiter and store, requests arriving, waiting for the
/// service, answered, admitted, completed or reset in the order the input says, at clock readings
/// it picks.
struct Run<'a> {
    limiter: &'a Limiter,
    store: &'a dyn SharedStore,
    observer: &'a Recorder,
    store_fails: bool,
    /// The concurrency limit's rule, in the configuration that has one.
    in_flight_rule: Option<usize>,
    now: u64,
    earliest: u64,
    latest: u64,
    /// Requests waiting for the rate limit service.
    pending: Vec<Pending>,
    /// Requests held for their turn.
    delayed: Vec<Pending>,
    /// Requests admitted whose stream has not ended.
    open: Vec<Pending>,
    /// Whether the clock never went back.
    monotonic: bool,
    next_id: u32,
    /// Requests admitted per `x-key`.
    admitted: HashMap<Vec<u8>, u64>,
}

/// Requests with arbitrary headers through every moment. When the store never fails, no key
/// meets a full table and the clock readings span less than a refill, no `x-key` is admitted
/// more than the `strict` limit's quota, nor has more requests in flight than the concurrency
/// limit allows, however the requests interleave and whatever the service answers (a request a
/// global rule denies, or that ends while waiting, gives back what it took).
pub fn request(data: &[u8]) {
    let mut input = Choices::new(data);
    let Some(config) = fixed_config(REQUEST_CONFIGS[input.below(REQUEST_CONFIGS.len())]) else { return };
    let limiter = Limiter::new(config, 42);
    let (store, store_fails) = failing_store(&mut input);
    let whole = Table::whole(&limiter.config().key_prefix, limiter.config().table_size);
    assert!(whole.initialize(&store.inner).is_ok());
    let observer = Recorder::default();
    let mut run = Run {
        limiter: &limiter,
        store: &store,
        observer: &observer,
        store_fails,
        in_flight_rule: limiter.config().rules.iter().position(|r| r.name == "inflight"),
        now: T0,
        earliest: T0,
        latest: T0,
        pending: Vec::new(),
        delayed: Vec::new(),
        open: Vec::new(),
        monotonic: true,
        next_id: 1,
        admitted: HashMap::new(),
    };
    for _ in 0..MAX_STEPS {
        if input.is_empty() {
            break;
        }
        run.step(&mut input);
    }
    run.finish();
}

impl Run<'_> {
    fn step(&mut self, input: &mut Choices<'_>) {
        match input.below(8) {
            0..=2 => self.arrive(input),
            3 => self.answer(input),
            4 => self.complete(input),
            5 => self.reset(input),
            6 => self.move_clock(input),
            _ => self.aside(input),
        }
    }

    /// A new request: its request headers.
    fn arrive(&mut self, input: &mut Choices<'_>) {
        let (request, key) = fuzz_request(input);
        let id = self.next_id;
        self.next_id += 1;
        let mut pending = Pending { id, request, exchange: Exchange::for_request(id), key };
        let (limiter, clock) = (self.limiter, FakeClock::at(self.now));
        let env = Env::new(self.store, &pending.request, &clock, self.observer);
        let next = limiter.decide(&env, &mut pending.exchange);
        self.after(next, pending);
    }

    /// The service answers one of the requests waiting for it.
    fn answer(&mut self, input: &mut Choices<'_>) {
        if self.pending.is_empty() {
            return;
        }
        let mut pending = self.pending.swap_remove(input.below(self.pending.len()));
        let answer = fuzz_answer(input);
        let answer = match &answer {
            Ok(body) => Ok(body.as_slice()),
            Err(e) => Err(e.clone()),
        };
        let (limiter, clock) = (self.limiter, FakeClock::at(self.now));
        let env = Env::new(self.store, &pending.request, &clock, self.observer);
        let next = limiter.answered(&env, &mut pending.exchange, answer);
        // The one call that may follow an answer: the service's word on the request's
        // idempotency key (`across: "fleet"`), once its limits have admitted it.
        let asks_for_key = matches!(&next, Next::Ask(ask) if ask.method == CLAIM);
        assert!(asks_for_key || !pending.exchange.is_awaiting(), "an answered request still waits");
        assert!(asks_for_key || !matches!(next, Next::Ask(_)), "an answered request asks again");
        self.after(next, pending);
    }

    /// What the glue does after a moment.
    fn after(&mut self, next: Next<'_>, pending: Pending) {
        match next {
            Next::Continue => self.admit(pending),
            Next::Delay { until } => {
                let latest = self.now.saturating_add(MAX_DELAY);
                assert!(!self.monotonic || until <= latest, "held until {until}, past {latest}");
                self.delayed.push(pending);
            }
            Next::Reply(reply) => {
                check_reply(&reply);
                self.end(pending);
            }
            Next::Ask(ask) => {
                let global = self.limiter.config().global.as_ref();
                assert_eq!(Some(ask.cluster), global.map(|g| g.cluster.as_str()));
                if ask.method == CLAIM {
                    let claim = ClaimRequest::decode(ask.message.as_slice());
                    assert!(claim.is_ok_and(|c| !c.key.is_empty() && !c.owner.is_empty()), "an empty claim");
                } else {
                    let sent = RateLimitRequest::decode(ask.message.as_slice());
                    assert!(sent.is_ok_and(|s| !s.descriptors.is_empty()), "an undecodable or empty call");
                }
                assert!(pending.exchange.is_awaiting());
                self.pending.push(pending);
            }
        }
    }

    /// A request passes: its stream stays open until it completes or is reset.
    fn admit(&mut self, pending: Pending) {
        if let Some(key) = &pending.key {
            *self.admitted.entry(key.clone()).or_default() += 1;
            if let Some(rule) = self.in_flight_rule.filter(|rule| self.exact(*rule)) {
                let holding = self.open.iter().chain(&self.delayed);
                let in_flight = 1 + holding.filter(|p| p.key.as_ref() == Some(key)).count();
                assert!(
                    in_flight <= IN_FLIGHT_MAX,
                    "{in_flight} requests of one key in flight (rule {rule})"
                );
            }
        }
        self.open.push(pending);
    }

    /// One open stream gets its response headers, and ends.
    fn complete(&mut self, input: &mut Choices<'_>) {
        if self.open.is_empty() {
            return;
        }
        let mut pending = self.open.swap_remove(input.below(self.open.len()));
        let mut response = TestRequest::default();
        if input.byte() % 2 == 0 {
            response = response.with_header("x-usage", input.text(USAGES));
        }
        let clock = FakeClock::at(self.now);
        let env = Env::new(self.store, &pending.request, &clock, self.observer);
        response = response.with_header(":status", input.text(&["200", "201", "503", "99", "x", ""]));
        self.limiter.keep_response(&mut pending.exchange, &response, input.byte() % 4 == 0);
        let settled = self.limiter.settle(&env, &mut pending.exchange, &response);
        check_passed(&settled, &mut pending.exchange);
        // A body in pieces, perhaps trailers, perhaps cut short, as Envoy hands them over.
        for _ in 0..input.below(3) {
            let chunk = input.text(&["{}", "0123456789abcdef", ""]);
            self.limiter.response_body(&mut pending.exchange, &chunk, input.byte() % 2 == 0);
        }
        if input.byte() % 4 == 0 {
            self.limiter.trailers(
                &env,
                &mut pending.exchange,
                &TestRequest::default().with_header("x-usage", input.text(USAGES)),
            );
        }
        self.limiter.end(&env, &mut pending.exchange);
        // The calls no request waits for, answered (the service's answers fuzzed) or failed.
        for call in self.limiter.take_background() {
            let answer = fuzz_answer(input);
            let answer = match &answer {
                Ok(body) => Ok(body.as_slice()),
                Err(e) => Err(e.clone()),
            };
            self.limiter.background_answered(self.store, self.now, &call, answer, self.observer);
        }
    }

    /// A stream ends early (reset by the client or the upstream): one waiting for the service, one
    /// held for its turn, or one admitted.
    fn reset(&mut self, input: &mut Choices<'_>) {
        let streams = match input.byte() % 3 {
            0 => &mut self.pending,
            1 => &mut self.delayed,
            _ => &mut self.open,
        };
        if !streams.is_empty() {
            let pending = streams.swap_remove(input.below(streams.len()));
            self.end(pending);
        }
    }

    fn end(&self, mut pending: Pending) {
        let clock = FakeClock::at(self.now);
        let env = Env::new(self.store, &pending.request, &clock, self.observer);
        self.limiter.end(&env, &mut pending.exchange);
    }

    /// The clock moves a little or a lot, forward or back, or jumps anywhere.
    fn move_clock(&mut self, input: &mut Choices<'_>) {
        let amount = u64::from(input.byte());
        self.now = match input.below(6) {
            0 => self.now.saturating_add(amount * 10 * MS),
            1 => self.now.saturating_sub(amount * 10 * MS),
            2 => self.now.saturating_add(amount * 60 * S),
            3 => self.now.saturating_sub(amount * 60 * S),
            4 => input.u64(),
            _ => T0,
        };
        self.monotonic &= self.now >= self.latest;
        self.earliest = self.earliest.min(self.now);
        self.latest = self.latest.max(self.now);
    }

    /// A worker's tick (the requests whose turn has come are resumed: admitted), or the standings
    /// of a request (the status endpoint's local part).
    fn aside(&mut self, input: &mut Choices<'_>) {
        if input.byte() % 2 == 0 {
            for id in self.limiter.tick(self.store, self.now, self.observer) {
                let at = self.delayed.iter().position(|p| p.id == id);
                assert!(at.is_some(), "request {id} resumed, but none such is held");
                if let Some(at) = at {
                    let pending = self.delayed.remove(at);
                    self.admit(pending);
                }
            }
            return;
        }
        let (request, _) = fuzz_request(input);
        let clock = FakeClock::at(self.now);
        let env = Env::new(self.store, &request, &clock, self.observer);
        match self.limiter.standings(&env) {
            Ok(standings) => {
                let json = status_json(&standings, None);
                assert!(serde_json::from_str::<serde_json::Value>(&json).is_ok(), "{json}");
            }
            Err(e) => assert!(self.store_fails, "standings failed on a store that never fails: {e}"),
        }
    }

    /// Whether `rule`'s limit must have held exactly so far: the store never failed, the rule never
    /// met a full table, and the clock readings span less than [`STRICT_SPAN`].
    fn exact(&self, rule: usize) -> bool {
        !self.store_fails
            && self.latest - self.earliest < STRICT_SPAN
            && self.observer.get(Metric::TableFull(rule)) == 0
            && self.observer.get(Metric::StoreError) == 0
    }

    /// The streams still open end: the worker holds no concurrency unit any more, and (when exact)
    /// every key has its whole concurrency limit back; the `strict` limit's quota must have held.
    fn finish(&mut self) {
        let streams = [&mut self.pending, &mut self.delayed, &mut self.open].map(std::mem::take);
        for pending in streams.into_iter().flatten() {
            self.end(pending);
        }
        assert_eq!(self.limiter.units_held(), 0, "units still held after every stream ended");
        assert_eq!(self.limiter.waiting(), 0, "requests still queued after every stream ended");
        if let Some(rule) = self.in_flight_rule.filter(|rule| self.exact(*rule)) {
            let clean = [Metric::CasRetriesExhausted, Metric::DuplicateFolded].map(|m| self.observer.get(m));
            for key in self.admitted.keys().filter(|_| clean == [0, 0]) {
                let request = TestRequest::get("/").with_header("x-key", key);
                let env = Env::at(self.store, &request, self.now, self.observer);
                let standings = self.limiter.standings(&env).unwrap_or_default();
                let in_flight =
                    standings.iter().find(|s| std::ptr::eq(s.of.rule, &self.limiter.config().rules[rule]));
                let remaining = in_flight.map(|s| s.remaining);
                assert_eq!(
                    remaining,
                    Some(IN_FLIGHT_MAX as u64),
                    "x-key {:?}: units left in flight",
                    String::from_utf8_lossy(key)
                );
            }
        }
        if !self.exact(0) {
            return;
        }
        for (key, admitted) in &self.admitted {
            assert!(
                *admitted <= STRICT_QUOTA,
                "x-key {:?} admitted {admitted} times, over the quota of {STRICT_QUOTA}",
                String::from_utf8_lossy(key)
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The slot table on whatever shared data holds.

/// Every algorithm, the status endpoint, 8 slots per share.
const TABLE_CONFIG: &str = r#"{"table_size":40,"key_prefix":"t","status_path":"/st","rules":[
  {"name":"tb","key":[{"source":"header","name":"x-key"}],"limit":{"capacity":3,"refill_period":"1m"}},
  {"name":"fw","key":[{"source":"header","name":"x-key"}],
   "limits":[{"algorithm":"fixed_window","requests":3,"window":"1m"},{"algorithm":"fixed_window","requests":9,"window":"month"}]},
  {"name":"sw","key":[{"source":"header","name":"x-key"}],"limit":{"algorithm":"sliding_window","requests":3,"window":"1m"}},
  {"name":"gc","when_table_full":"deny","key":[{"source":"header","name":"x-key"}],
   "limit":{"algorithm":"gcra","requests":3,"period":"1m","burst":2},"cost":{"header":"x-cost","max":3,"default":1}}]}"#;

/// The seed a worker offers when the store has none (or an unreadable one).
const CANDIDATE_SEED: u64 = 0x5eed;

/// Every slot and the seed hold what the input says (another layout, a corrupt state, an
/// arbitrary or a real key's fingerprint, nothing at all). Starting up reads back one seed and
/// creates what is missing; lookups, consumes, give-backs, the status endpoint and the algorithms
/// on any slot's state never panic, never fail on a store that does not, and no decision reports
/// more than its limit holds.
pub fn table(data: &[u8]) {
    let mut input = Choices::new(data);
    let Some(config) = fixed_config(TABLE_CONFIG) else { return };
    let (store, store_fails) = failing_store(&mut input);
    let seed = fill_seed(&mut input, &store.inner, &config.key_prefix);
    for index in 0..config.table_size {
        let key = store_key(&config.key_prefix, StoreKey::Slot(index));
        if let Some(bytes) = slot_bytes(&mut input, &config, seed) {
            assert!(store.inner.set(key.as_str(), &bytes, 0).is_ok());
        }
    }
    let whole = Table::whole(&config.key_prefix, config.table_size);
    let started =
        whole.shared_seed(&store, CANDIDATE_SEED).and_then(|s| whole.initialize(&store).map(|()| s));
    match started {
        Ok(read) => assert_eq!(read, seed, "the seed read back is not the one stored"),
        Err(e) => assert!(store_fails, "start-up failed on a store that never fails: {e}"),
    }
    let (limiter, observer) = (Limiter::new(config, seed), Recorder::default());
    let mut now = T0;
    for _ in 0..MAX_STEPS {
        if input.is_empty() {
            break;
        }
        table_step(&limiter, (&store, store_fails), &observer, &mut input, &mut now);
    }
}

/// Stores the seed the input says (none, 8 bytes, or any length); the seed every worker must use.
fn fill_seed(input: &mut Choices<'_>, store: &MemoryStore, prefix: &str) -> u64 {
    let bytes = match input.below(3) {
        0 => return CANDIDATE_SEED,
        1 => input.take(8),
        _ => input.short(12),
    };
    assert!(store.set(store_key(prefix, StoreKey::Seed).as_str(), bytes, 0).is_ok());
    <[u8; 8]>::try_from(bytes).map_or(CANDIDATE_SEED, u64::from_le_bytes)
}

/// What one slot holds before start-up; `None` for nothing at all.
fn slot_bytes(input: &mut Choices<'_>, config: &Config, seed: u64) -> Option<Vec<u8>> {
    match input.below(8) {
        0 => None,
        1 => Some(input.short(40).to_vec()),
        2 => Some(EMPTY_SLOT.to_vec()),
        _ => {
            let fingerprint = match input.below(4) {
                0 => NEVER_USED,
                1 => TOMBSTONE,
                2 => input.u64(),
                _ => known_fingerprint(input, config, seed),
            };
            let state = State { idle_at: instant(input), word: instant(input) };
            Some(Slot { fingerprint, state }.encode().to_vec())
        }
    }
}

/// An instant or a count: anything, near T0, or small.
fn instant(input: &mut Choices<'_>) -> u64 {
    match input.below(3) {
        0 => input.u64(),
        1 => T0.saturating_add_signed(i64::from(input.byte() as i8) * 7 * S as i64),
        _ => u64::from(input.byte()),
    }
}

/// The fingerprint of a real key's bucket under one of the rules, or of a status caller.
fn known_fingerprint(input: &mut Choices<'_>, config: &Config, seed: u64) -> u64 {
    let request = TestRequest::get("/").with_header("x-key", input.text(KEYS)).with_source("10.0.0.1:1");
    let Some(rule) = config.rules.get(input.below(config.rules.len() + 1)) else {
        return status_key(seed, &request, config.status_limit.kind).0;
    };
    let limits: Vec<&Limit> = rule.limits.all().collect();
    let index = input.below(limits.len());
    let (Some(key), Some(limit)) = (request_key(seed, rule, &request), limits.get(index)) else { return 2 };
    key.limit(None, index, limit.kind).0
}

/// One thing done to the table.
fn table_step(
    limiter: &Limiter,
    (store, store_fails): (&FailingStore, bool),
    observer: &Recorder,
    input: &mut Choices<'_>,
    now: &mut u64,
) {
    match input.below(6) {
        0 | 1 => table_request(limiter, store, observer, input, *now),
        2 => {
            let request = TestRequest::get("/").with_header("x-key", input.text(KEYS));
            let standings = limiter.standings(&Env::at(store, &request, *now, observer));
            assert!(standings.is_ok() || store_fails, "{:?}", standings.err());
        }
        3 => algorithms_on_slot(limiter, &store.inner, input, *now),
        4 => consume_found(limiter, (store, store_fails), input, *now),
        _ => *now = instant(input),
    }
}

/// A request (or status call) through decide, answered if asked, settle and end.
fn table_request(
    limiter: &Limiter,
    store: &FailingStore,
    observer: &Recorder,
    input: &mut Choices<'_>,
    now: u64,
) {
    let mut request = TestRequest::get(if input.byte() % 4 == 0 { "/st" } else { "/" })
        .with_header("x-key", input.text(KEYS))
        .with_source(&String::from_utf8_lossy(&input.text(SOURCES)));
    if input.byte() % 2 == 0 {
        request = request.with_header("x-cost", input.text(COSTS));
    }
    let env = Env::at(store, &request, now, observer);
    let mut exchange = Exchange::default();
    match limiter.decide(&env, &mut exchange) {
        Next::Reply(reply) => check_reply(&reply),
        Next::Continue | Next::Delay { .. } => {
            check_passed(&limiter.settle(&env, &mut exchange, &TestRequest::default()), &mut exchange)
        }
        Next::Ask(_) => assert!(limiter.config().global.is_some(), "asked without a service"),
    }
    limiter.end(&env, &mut exchange);
}

/// Every limit's algorithm on the state some slot holds, at `now`.
fn algorithms_on_slot(limiter: &Limiter, store: &MemoryStore, input: &mut Choices<'_>, now: u64) {
    let config = limiter.config();
    let index = u32::from(input.byte()) % config.table_size;
    let Ok(Some(held)) = store.get(store_key(&config.key_prefix, StoreKey::Slot(index)).as_str()) else {
        return;
    };
    let state = Slot::decode(&held.value).state;
    let other = State { idle_at: instant(input), word: instant(input) };
    let cost = match input.below(3) {
        0 => 1,
        1 => u64::from(input.byte()),
        _ => input.u64(),
    };
    let limits =
        config.rules.iter().flat_map(|r| r.limits.all()).chain(std::iter::once(&config.status_limit));
    for limit in limits {
        let (algorithm, capacity) = (&limit.algorithm, limit.algorithm.capacity());
        let (decision, next) = algorithm.decide(state, now, cost);
        check_decision(&decision, capacity);
        check_decision(&algorithm.status(state, now), capacity);
        check_decision(&algorithm.status(next, now), capacity);
        let back = algorithm.give_back(next, now, cost, algorithm.held_in(next));
        check_decision(&algorithm.status(algorithm.merge(back, other, now), now), capacity);
    }
}

/// Read-compute-CAS and a give-back on the bucket whose fingerprint some slot holds, under the
/// limit of the share that slot belongs to.
fn consume_found(
    limiter: &Limiter,
    (store, store_fails): (&FailingStore, bool),
    input: &mut Choices<'_>,
    now: u64,
) {
    let config = limiter.config();
    let index = u32::from(input.byte()) % config.table_size;
    let Ok(Some(held)) = store.inner.get(store_key(&config.key_prefix, StoreKey::Slot(index)).as_str())
    else {
        return;
    };
    let fp = Fingerprint::from_hash(Slot::decode(&held.value).fingerprint);
    let within = |share: &TableShare| (share.start..share.start + share.size).contains(&index);
    let owner = config.rules.iter().find(|r| r.table.as_ref().is_some_and(within));
    let (share, limit) = match owner {
        Some(rule) => {
            let limits: Vec<&Limit> = rule.limits.all().collect();
            let Some(limit) = limits.get(input.below(limits.len())).copied() else { return };
            (rule.table, limit)
        }
        None => (config.status_table, &config.status_limit),
    };
    let Some(table) = share.map(|s| limiter.table(s)) else { return };
    let (algorithm, cost) = (&limit.algorithm, u64::from(input.byte() % 4));
    let bucket = Bucket { fp, algorithm, now };
    let applied = table.measure_and_replace(store, bucket, None, &mut TableEvents::default(), |state| {
        let (decision, next) = algorithm.decide(state, now, cost);
        check_decision(&decision, algorithm.capacity());
        (decision, decision.allowed.then_some(next))
    });
    assert!(applied.is_ok() || store_fails, "{applied:?}");
    if let Ok(Applied::Stored { index, state: stored, .. }) = applied {
        let held_in = algorithm.held_in(stored);
        let given = table.update_at(store, fp, index, |state| algorithm.give_back(state, now, cost, held_in));
        assert!(given.is_ok() || store_fails, "{given:?}");
    }
}

// ---------------------------------------------------------------------------------------------
// The service's answer.

/// Global rules of every kind, a local one, the status endpoint.
const ANSWER_CONFIG: &str = r#"{"table_size":16,"status_path":"/ratelimit/status",
  "global":{"cluster":"rls","domain":"edge"},"rules":[
  {"name":"local","key":[{"source":"header","name":"x-key"}],"limit":{"capacity":5,"refill_period":"1h"}},
  {"name":"open","global":true,"key":[{"source":"header","name":"x-key"}],
   "limit":{"algorithm":"fixed_window","requests":10,"window":"1m"}},
  {"name":"closed","global":true,"failure_mode":"deny","match":{"path_prefix":"/pay"},
   "key":[{"source":"x_forwarded_for","trusted_hops":1}],"cost":{"header":"x-cost","max":9,"default":1},
   "limits":[{"name":"s","algorithm":"fixed_window","requests":3,"window":"1s"},
             {"name":"m","algorithm":"fixed_window","requests":30,"window":"month"}]},
  {"name":"service","global":true,"key":[{"source":"jwt_claim","claim":"sub"}]}]}"#;

/// Any bytes as the service's answer: decoded or refused with a reason, then mapped to a verdict
/// (a denial always says when to retry, and names a limit of the configuration) and to standings,
/// for a few requests and a status call; and through the limiter's moments.
pub fn answer(data: &[u8]) {
    let read = read_answer(data);
    match &read {
        Ok(answer) => assert!(answer.limits.windows(2).all(|w| w[0].0 < w[1].0), "{answer:?}"),
        Err(e) => assert!(!e.to_string().is_empty()),
    }
    let Some(config) = fixed_config(ANSWER_CONFIG) else { return };
    let limiter = Limiter::new(config, 42);
    let (store, observer) = (MemoryStore::new(), Recorder::default());
    let requests = [
        TestRequest::get("/x")
            .with_header("x-key", "k")
            .with_header("authorization", bearer("\"sub\":\"u\"")),
        TestRequest::get("/pay")
            .with_header("x-forwarded-for", "192.0.2.1, 10.0.0.1")
            .with_header("x-cost", "2"),
        TestRequest::get("/ratelimit/status").with_header("x-key", "k").with_source("10.0.0.1:1"),
    ];
    for request in &requests {
        map_answer(limiter.config(), request, data, &observer);
        let env = Env::at(&store, request, T0, &observer);
        let mut exchange = Exchange::default();
        let next = match limiter.decide(&env, &mut exchange) {
            Next::Ask(_) => limiter.answered(&env, &mut exchange, Ok(data)),
            next => next,
        };
        match next {
            Next::Reply(reply) => check_reply(&reply),
            Next::Continue | Next::Delay { .. } => {
                check_passed(&limiter.settle(&env, &mut exchange, &TestRequest::default()), &mut exchange);
            }
            Next::Ask(_) => assert!(!exchange.is_awaiting(), "an answered request asks again"),
        }
        limiter.end(&env, &mut exchange);
    }
}

/// The verdict and the standings the answer gives for `request`'s calls.
fn map_answer(config: &Config, request: &TestRequest, data: &[u8], observer: &Recorder) {
    for purpose in [Purpose::Decide, Purpose::Status] {
        let Ok(Some(call)) = prepare(config, request, purpose) else { continue };
        let v = verdict(config, &call, read_answer(data), observer);
        assert!(v.deny || v.retry_after_seconds.is_none(), "a retry for a request that passes: {v:?}");
        assert_ne!(v.retry_after_seconds, Some(0), "{v:?}");
        assert!(
            v.response_headers.len() <= MAX_SERVICE_HEADERS && v.request_headers.len() <= MAX_SERVICE_HEADERS
        );
        let service = v.response_headers.iter().chain(&v.request_headers);
        check_headers(service.map(|(name, value)| (name.as_str(), value.as_str())));
        if let Some(report) = v.report {
            assert!(config.find(report.limit).is_some(), "{report:?}");
        }
        if let Ok(standing) = standings(config, &call, read_answer(data), observer) {
            let json = status_json(&standing, None);
            assert!(serde_json::from_str::<serde_json::Value>(&json).is_ok(), "{json}");
        }
    }
}
