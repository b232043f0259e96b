//! Global rules: the request to a rate limit service speaking Envoy's Rate Limit Service API v3
//! (`envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit`), and what its answer means.
//! The messages are the few fields of the public protos this filter uses, encoded with prost.

use std::hash::{DefaultHasher, Hasher};

use prost::Message;

use crate::config::{Config, FailureMode, KeyPart, Limit, Limits, MissingKeyPolicy, Rule};
use crate::keys::part_value;
use crate::request::Request;

pub const SERVICE: &str = "envoy.service.ratelimit.v3.RateLimitService";
pub const METHOD: &str = "ShouldRateLimit";

#[derive(Clone, PartialEq, Message)]
pub struct RateLimitRequest {
    #[prost(string, tag = "1")]
    pub domain: String,
    #[prost(message, repeated, tag = "2")]
    pub descriptors: Vec<RateLimitDescriptor>,
    #[prost(uint32, tag = "3")]
    pub hits_addend: u32,
}

/// `envoy.extensions.common.ratelimit.v3.RateLimitDescriptor`
#[derive(Clone, PartialEq, Message)]
pub struct RateLimitDescriptor {
    #[prost(message, repeated, tag = "1")]
    pub entries: Vec<Entry>,
    #[prost(message, optional, tag = "2")]
    pub limit: Option<RateLimitOverride>,
    #[prost(message, optional, tag = "3")]
    pub hits_addend: Option<UInt64Value>,
}

#[derive(Clone, PartialEq, Message)]
pub struct Entry {
    #[prost(string, tag = "1")]
    pub key: String,
    #[prost(string, tag = "2")]
    pub value: String,
}

#[derive(Clone, PartialEq, Message)]
pub struct RateLimitOverride {
    #[prost(uint32, tag = "1")]
    pub requests_per_unit: u32,
    /// `envoy.type.v3.RateLimitUnit`: 1 second, 2 minute, 3 hour, 4 day, 5 month, 6 year, 7 week.
    #[prost(int32, tag = "2")]
    pub unit: i32,
}

#[derive(Clone, PartialEq, Message)]
pub struct UInt64Value {
    #[prost(uint64, tag = "1")]
    pub value: u64,
}

#[derive(Clone, PartialEq, Message)]
pub struct RateLimitResponse {
    /// 1 OK, 2 OVER_LIMIT.
    #[prost(int32, tag = "1")]
    pub overall_code: i32,
    #[prost(message, repeated, tag = "2")]
    pub statuses: Vec<DescriptorStatus>,
}

#[derive(Clone, PartialEq, Message)]
pub struct DescriptorStatus {
    #[prost(int32, tag = "1")]
    pub code: i32,
    #[prost(message, optional, tag = "2")]
    pub current_limit: Option<CurrentLimit>,
    #[prost(uint32, tag = "3")]
    pub limit_remaining: u32,
    #[prost(message, optional, tag = "4")]
    pub duration_until_reset: Option<ProtoDuration>,
}

#[derive(Clone, PartialEq, Message)]
pub struct CurrentLimit {
    #[prost(uint32, tag = "1")]
    pub requests_per_unit: u32,
    #[prost(int32, tag = "2")]
    pub unit: i32,
    #[prost(string, tag = "3")]
    pub name: String,
}

#[derive(Clone, PartialEq, Message)]
pub struct ProtoDuration {
    #[prost(int64, tag = "1")]
    pub seconds: i64,
    #[prost(int32, tag = "2")]
    pub nanos: i32,
}

pub const CODE_OVER_LIMIT: i32 = 2;

/// Seconds in a Rate Limit Service unit (a month counts 30 days), for the policy's `w`.
pub fn unit_seconds(unit: i32) -> u64 {
    match unit {
        1 => 1,
        2 => 60,
        3 => 3_600,
        4 => 86_400,
        5 => 30 * 86_400,
        6 => 365 * 86_400,
        7 => 7 * 86_400,
        _ => 0,
    }
}

/// Which rule (and limit) each descriptor of a call stands for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DescriptorOrigin {
    pub rule: usize,
    pub plan: Option<usize>,
    pub limit: Option<usize>,
}

/// A prepared call: the encoded request and what each descriptor stands for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GlobalCall {
    pub message: Vec<u8>,
    pub origins: Vec<DescriptorOrigin>,
    /// A failure to get an answer denies the request (some rule says `failure_mode: deny`).
    pub deny_on_failure: bool,
}

/// Why the request cannot even be asked about.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    pub rule: usize,
    pub reason: String,
}

/// What a call to the service is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Purpose {
    /// Decide the request: every descriptor carries the rule's cost as its hits.
    Decide,
    /// Answer the status endpoint: hits 0, so the service reports without counting. Rules apply
    /// by their header conditions only, as for the local standings: the status request has its
    /// own path and method.
    Status,
}

/// The descriptors for every global rule that applies to `request`; `Ok(None)` when none does.
pub fn prepare(
    config: &Config,
    request: &dyn Request,
    purpose: Purpose,
) -> Result<Option<GlobalCall>, Refusal> {
    let Some(service) = &config.global else { return Ok(None) };
    let mut descriptors = Vec::new();
    let mut origins = Vec::new();
    let mut deny_on_failure = false;
    for (index, rule) in config.rules.iter().enumerate() {
        let Some(failure_mode) = rule.global else { continue };
        let applies = match purpose {
            Purpose::Decide => rule.matcher.matches(request),
            Purpose::Status => rule.matcher.headers_match(request),
        };
        if !applies {
            continue;
        }
        let Some(parts) = key_entries(rule, request) else { continue };
        let cost = match purpose {
            Purpose::Decide => {
                crate::limiter::cost_of(rule, request).map_err(|reason| Refusal { rule: index, reason })?
            }
            Purpose::Status => 0,
        };
        let (plan, limits): (Option<(usize, &str)>, &[Limit]) = match &rule.limits {
            Limits::Fixed(limits) => (None, limits),
            Limits::Plans(plans) => {
                let chosen = crate::limiter::plan_of(plans, request);
                let Some(p) = plans.plans.get(chosen) else { continue };
                if p.limits.is_empty() {
                    continue; // unlimited plan
                }
                (Some((chosen, p.name.as_str())), &p.limits)
            }
        };
        let mut push = |limit: Option<(usize, &Limit)>| {
            let mut entries = vec![Entry { key: "rule".into(), value: rule.name.clone() }];
            if let Some((_, name)) = plan {
                entries.push(Entry { key: "plan".into(), value: name.to_owned() });
            }
            if let (Some((_, l)), true) = (limit, limits.len() > 1) {
                entries.push(Entry { key: "limit".into(), value: l.name.clone() });
            }
            entries.extend(parts.iter().cloned());
            let limit_override = limit.and_then(|(_, l)| {
                Some(RateLimitOverride { requests_per_unit: u32::try_from(l.quota).ok()?, unit: l.rls_unit? })
            });
            descriptors.push(RateLimitDescriptor {
                entries,
                limit: limit_override,
                hits_addend: Some(UInt64Value { value: cost }),
            });
            origins.push(DescriptorOrigin {
                rule: index,
                plan: plan.map(|(i, _)| i),
                limit: limit.map(|(i, _)| i),
            });
        };
        if limits.is_empty() {
            push(None);
        } else {
            for (i, limit) in limits.iter().enumerate() {
                push(Some((i, limit)));
            }
        }
        deny_on_failure |= failure_mode == FailureMode::Deny;
    }
    if descriptors.is_empty() {
        return Ok(None);
    }
    // Services that ignore the per-descriptor addend read the request's, when all agree.
    let first = descriptors.first().and_then(|d| d.hits_addend.as_ref()).map_or(1, |h| h.value);
    let same = descriptors.iter().all(|d| d.hits_addend.as_ref().map_or(1, |h| h.value) == first);
    let hits_addend = if same { u32::try_from(first).unwrap_or(u32::MAX) } else { 0 };
    let request = RateLimitRequest { domain: service.domain.clone(), descriptors, hits_addend };
    Ok(Some(GlobalCall { message: request.encode_to_vec(), origins, deny_on_failure }))
}

/// The descriptor entries for a rule's key parts; `None` when a part is missing and the rule skips.
fn key_entries(rule: &Rule, request: &dyn Request) -> Option<Vec<Entry>> {
    let mut entries = Vec::with_capacity(rule.key.len());
    for part in &rule.key {
        let value = match (part_value(part, request), rule.when_key_missing) {
            (Some(v), _) => v,
            (None, MissingKeyPolicy::Empty) => Vec::new(),
            (None, MissingKeyPolicy::Skip) => return None,
        };
        entries.push(Entry { key: entry_key(part), value: entry_value(&value) });
    }
    Some(entries)
}

/// Descriptor keys follow Envoy's own rate limit actions where one exists.
fn entry_key(part: &KeyPart) -> String {
    match part {
        KeyPart::ClientAddress | KeyPart::XForwardedFor { .. } => "remote_address".into(),
        KeyPart::Header(name) => name.clone(),
        KeyPart::Query(name) => format!("query.{name}"),
        KeyPart::Method => "method".into(),
        KeyPart::Path => "path".into(),
        KeyPart::Constant(_) => "generic_key".into(),
        KeyPart::JwtClaim(claim) => format!("jwt.{claim}"),
    }
}

/// Values go as they are when they are UTF-8 of at most 256 bytes, else as `hash:<32 hex digits>`,
/// a 128-bit hash that is the same in every Envoy running this build.
fn entry_value(value: &[u8]) -> String {
    match std::str::from_utf8(value) {
        Ok(text) if text.len() <= 256 => text.to_owned(),
        _ => {
            let half = |salt: u8| {
                let mut h = DefaultHasher::new();
                h.write_u8(salt);
                h.write(value);
                h.finish()
            };
            format!("hash:{:016x}{:016x}", half(1), half(2))
        }
    }
}

/// What the service's answer means for the request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Answer {
    pub over_limit: bool,
    /// (descriptor index, status) for statuses that carry a limit.
    pub limits: Vec<(usize, LimitStatus)>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LimitStatus {
    pub over_limit: bool,
    pub quota: u64,
    pub window_seconds: u64,
    pub remaining: u64,
    pub reset_seconds: u64,
}

/// Decodes a `RateLimitResponse`.
pub fn read_answer(body: &[u8]) -> Result<Answer, String> {
    let response = RateLimitResponse::decode(body).map_err(|e| format!("undecodable response: {e}"))?;
    let limits = response
        .statuses
        .iter()
        .enumerate()
        .filter_map(|(i, s)| {
            let limit = s.current_limit.as_ref()?;
            let reset = s.duration_until_reset.as_ref().map_or(0, |d| {
                let secs = u64::try_from(d.seconds).unwrap_or(0);
                secs + u64::from(d.nanos > 0)
            });
            Some((
                i,
                LimitStatus {
                    over_limit: s.code == CODE_OVER_LIMIT,
                    quota: u64::from(limit.requests_per_unit),
                    window_seconds: unit_seconds(limit.unit),
                    remaining: u64::from(s.limit_remaining),
                    reset_seconds: reset,
                },
            ))
        })
        .collect();
    Ok(Answer { over_limit: response.overall_code == CODE_OVER_LIMIT, limits })
}

#[cfg(test)]
mod tests {
    use super::*;
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
        assert_eq!(r.err().map(|e| e.reason), Some("cost 11 from x-cost exceeds the maximum 10".into()));
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
        assert_eq!(call.origins[1], DescriptorOrigin { rule: 0, plan: Some(0), limit: Some(1) });
        assert_eq!(prepare(&c, &req.clone().with_header("x-plan", "vip"), Purpose::Decide), Ok(None));
    }

    #[test]
    fn a_global_rule_may_leave_the_limit_to_the_service() {
        let c = config(r#"{"name":"svc","global":true,"key":[{"source":"constant","value":"all"}]}"#);
        let call = prepare(&c, &TestRequest::get("/"), Purpose::Decide).unwrap().unwrap();
        let request = RateLimitRequest::decode(call.message.as_slice()).unwrap();
        assert_eq!(request.descriptors[0].limit, None);
        assert_eq!(
            request.descriptors[0].entries[1],
            Entry { key: "generic_key".into(), value: "all".into() }
        );
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
                },
                DescriptorStatus {
                    code: 1,
                    current_limit: None,
                    limit_remaining: 0,
                    duration_until_reset: None,
                },
            ],
        };
        let answer = read_answer(&response.encode_to_vec()).unwrap();
        assert!(answer.over_limit);
        assert_eq!(
            answer.limits,
            vec![(
                0,
                LimitStatus {
                    over_limit: true,
                    quota: 50,
                    window_seconds: 60,
                    remaining: 0,
                    reset_seconds: 42
                }
            )]
        );
        assert!(read_answer(&[0xff, 0xff, 0xff]).is_err());
    }
}
