//! The request sent to the service and the reading of its answer.

use prost::Message;

use super::answer::{answer_size, read_answer, CallError, LimitStatus};
use super::descriptors::{entry_value, prepare};
use super::protocol::*;
use super::Purpose;
use crate::config::{Config, LimitRef};
use crate::request::TestRequest;

fn config(rules: &str) -> Config {
    let json =
        format!(r#"{{"global":{{"cluster":"rls","domain":"edge","timeout":"25ms"}},"rules":[{rules}]}}"#);
    Config::parse(json.as_bytes()).unwrap()
}

const PER_USER: &str = r#"{"name":"per-user","global":true,"key":[{"source":"header","name":"x-user"}],
    "limit":{"algorithm":"fixed_window","requests":50,"window":"1m"},"cost":{"header":"x-cost","max":10}}"#;

#[test]
fn a_global_rule_becomes_one_descriptor_with_its_limit_and_cost() {
    let c = config(PER_USER);
    assert_eq!(c.global.as_ref().map(|g| g.timeout_ms), Some(25));
    let call = prepare(
        &c,
        &TestRequest::get("/").with_header("x-user", "alice").with_header("x-cost", "3"),
        Purpose::Decide,
    )
    .unwrap()
    .unwrap();
    let request = RateLimitRequest::decode(call.message.as_slice()).unwrap();
    assert_eq!(request.domain, "edge");
    assert_eq!(request.hits_addend, 3);
    let d = &request.descriptors[0];
    let entries: Vec<_> = d.entries.iter().map(|e| (e.key.as_str(), e.value.as_str())).collect();
    assert_eq!(entries, vec![("rule", "per-user"), ("x-user", "alice")]);
    assert_eq!(d.limit, Some(RateLimitOverride { requests_per_unit: 50, unit: 2 }));
    assert_eq!(d.hits_addend, Some(UInt64Value { value: 3 }));
    assert!(!call.deny_on_failure);
}

#[test]
fn rules_that_do_not_apply_send_nothing() {
    let c = config(PER_USER);
    assert_eq!(prepare(&c, &TestRequest::get("/"), Purpose::Decide), Ok(None));
}

#[test]
fn a_refused_cost_is_refused_before_asking() {
    let c = config(PER_USER);
    let r = prepare(
        &c,
        &TestRequest::get("/").with_header("x-user", "a").with_header("x-cost", "11"),
        Purpose::Decide,
    );
    assert_eq!(
        r.err().map(|e| e.reason.to_string()),
        Some("cost 11 from x-cost exceeds the maximum 10".into())
    );
}

#[test]
fn plans_and_several_limits_are_named_in_the_descriptor() {
    let c = config(
        r#"{"name":"api","global":true,"failure_mode":"deny","key":[{"source":"client_address"}],
        "plan":{"header":"x-plan"},"default_plan":"free","plans":{
          "free":{"limits":[{"name":"s","algorithm":"fixed_window","requests":2,"window":"1s"},
                            {"name":"m","algorithm":"fixed_window","requests":100,"window":"month"}]},
          "vip":{"unlimited":true}}}"#,
    );
    let req = TestRequest::get("/").with_source("10.1.2.3:4444");
    let call = prepare(&c, &req, Purpose::Decide).unwrap().unwrap();
    assert!(call.deny_on_failure);
    let request = RateLimitRequest::decode(call.message.as_slice()).unwrap();
    let keys: Vec<Vec<_>> = request
        .descriptors
        .iter()
        .map(|d| d.entries.iter().map(|e| format!("{}={}", e.key, e.value)).collect())
        .collect();
    assert_eq!(keys[0], vec!["rule=api", "plan=free", "limit=api.s", "remote_address=10.1.2.3"]);
    assert_eq!(request.descriptors[1].limit, Some(RateLimitOverride { requests_per_unit: 100, unit: 5 }));
    assert_eq!(call.origins[1], LimitRef { rule: 0, plan: Some(0), limit: Some(1) });
    assert_eq!(prepare(&c, &req.clone().with_header("x-plan", "vip"), Purpose::Decide), Ok(None));
}

#[test]
fn a_global_rule_may_leave_the_limit_to_the_service() {
    let c = config(r#"{"name":"svc","global":true,"key":[{"source":"constant","value":"all"}]}"#);
    let call = prepare(&c, &TestRequest::get("/"), Purpose::Decide).unwrap().unwrap();
    let request = RateLimitRequest::decode(call.message.as_slice()).unwrap();
    assert_eq!(request.descriptors[0].limit, None);
    assert_eq!(request.descriptors[0].entries[1], Entry { key: "generic_key".into(), value: "all".into() });
}

#[test]
fn the_hash_of_a_long_value_is_siphash_1_3_whatever_built_the_module() {
    // Computed from the SipHash-1-3 specification: every Envoy of a rolling update sends the same.
    assert_eq!(entry_value(&[b'a'; 300]), "hash:ee5c6896559fe6309b6393f5627a5b8f");
}

#[test]
fn a_value_that_looks_hashed_is_hashed_too() {
    let forged = "hash:ee5c6896559fe6309b6393f5627a5b8f";
    let sent = entry_value(forged.as_bytes());
    assert!(sent.starts_with("hash:") && sent.len() == 37);
    assert_ne!(sent, forged, "a client must not be able to name another value's descriptor");
}

#[test]
fn long_or_binary_values_are_sent_as_a_stable_hash() {
    assert_eq!(entry_value(b"alice"), "alice");
    let long = entry_value(&[b'a'; 300]);
    assert!(long.starts_with("hash:") && long.len() == 37);
    assert_eq!(long, entry_value(&[b'a'; 300]));
    assert_ne!(entry_value(&[0xff, 0x00]), entry_value(&[0xff, 0x01]));
}

#[test]
fn reads_over_limit_answers_with_their_reset() {
    let response = RateLimitResponse {
        overall_code: 2,
        statuses: vec![
            DescriptorStatus {
                code: 2,
                current_limit: Some(CurrentLimit { requests_per_unit: 50, unit: 2, name: String::new() }),
                limit_remaining: 0,
                duration_until_reset: Some(ProtoDuration { seconds: 41, nanos: 5 }),
                quota: None,
            },
            DescriptorStatus { code: 1, ..DescriptorStatus::default() },
        ],
        ..RateLimitResponse::default()
    };
    let answer = read_answer(&response.encode_to_vec()).unwrap();
    assert!(answer.over_limit);
    assert_eq!(
        answer.limits,
        vec![(
            0,
            LimitStatus { over_limit: true, quota: 50, window_seconds: 60, remaining: 0, reset_seconds: 42 }
        )]
    );
    assert!(read_answer(&[0xff, 0xff, 0xff]).is_err());
}

#[test]
fn an_answer_above_64_kib_is_a_failed_call_and_is_never_read() {
    assert_eq!(answer_size(65_536), Ok(65_536));
    assert_eq!(answer_size(3_000_000), Err(CallError::TooLarge { bytes: 3_000_000 }));
    assert_eq!(
        CallError::TooLarge { bytes: 3_000_000 }.to_string(),
        "answer of 3000000 bytes, larger than the 65536 read"
    );
}

#[test]
fn a_status_without_its_reset_is_taken_to_reset_at_the_end_of_a_whole_window() {
    let status = DescriptorStatus {
        code: 2,
        current_limit: Some(CurrentLimit { requests_per_unit: 5, unit: 3, name: String::new() }),
        limit_remaining: 0,
        duration_until_reset: None,
        quota: None,
    };
    let response =
        RateLimitResponse { overall_code: 2, statuses: vec![status], ..RateLimitResponse::default() };
    let answer = read_answer(&response.encode_to_vec()).unwrap();
    assert_eq!(answer.limits[0].1.reset_seconds, 3_600);
}

fn header(key: &str, value: &str) -> HeaderValue {
    HeaderValue { key: key.into(), value: value.into(), raw_value: Vec::new() }
}

#[test]
fn the_services_headers_are_read_and_unsafe_ones_dropped() {
    let mut response_headers = vec![
        header("X-RateLimit-Limit", "10, 10;w=3600"),
        header("bad name", "x"),
        header(":status", "200"),
        header("content-length", "0"),
        header("x-split", "a\r\nset-cookie: evil=1"),
        HeaderValue { key: "x-raw".into(), value: "ignored".into(), raw_value: b"raw wins".to_vec() },
    ];
    response_headers.extend((0..40).map(|i| header(&format!("x-many-{i}"), "1")));
    let response = RateLimitResponse {
        overall_code: 1,
        response_headers_to_add: response_headers,
        request_headers_to_add: vec![header("x-limited-by", "limitador")],
        ..RateLimitResponse::default()
    };
    let answer = read_answer(&response.encode_to_vec()).unwrap();
    let names: Vec<&str> = answer.response_headers.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(&names[..3], ["x-ratelimit-limit", "x-raw", "x-many-0"]);
    assert_eq!(answer.response_headers.len(), super::answer::MAX_SERVICE_HEADERS);
    assert_eq!(answer.response_headers[1].1, "raw wins");
    assert_eq!(answer.request_headers, vec![("x-limited-by".to_owned(), "limitador".to_owned())]);
}
