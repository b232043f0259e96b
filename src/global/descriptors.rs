//! The request to the rate limit service: one descriptor per limit of every global rule that
//! applies, with the configured limit as an override and the cost as the hits.

use std::hash::Hasher;

use siphasher::sip::SipHasher13;

use prost::Message;

use super::protocol::{Entry, RateLimitDescriptor, RateLimitOverride, RateLimitRequest, UInt64Value};
use super::{GlobalCall, Purpose, Refusal};
use crate::config::{Config, FailureMode, KeyPart, Limit, LimitRef, MissingKeyPolicy, Rule};
use crate::request::keys::part_value;
use crate::request::plan::{cost_of, limits_for, PlanLimits};
use crate::request::Request;

/// The descriptors for every global rule that applies to `request`; `Ok(None)` when none does.
pub fn prepare(
    config: &Config,
    request: &dyn Request,
    purpose: Purpose,
) -> Result<Option<GlobalCall>, Refusal> {
    prepare_except(config, request, purpose, &[])
}

/// As [`prepare`], leaving out the rules in `decided` (their leases decided the request).
pub fn prepare_except(
    config: &Config,
    request: &dyn Request,
    purpose: Purpose,
    decided: &[usize],
) -> Result<Option<GlobalCall>, Refusal> {
    let Some(service) = &config.global else { return Ok(None) };
    let mut descriptors = Vec::new();
    let mut origins = Vec::new();
    let mut deny_on_failure = false;
    for (index, rule) in config.rules.iter().enumerate() {
        let Some(failure_mode) = rule.global else { continue };
        if decided.contains(&index) {
            continue;
        }
        let Some(asked) = ask_about(index, rule, request, purpose)? else { continue };
        for (limit, descriptor) in asked.descriptors() {
            descriptors.push(descriptor);
            origins.push(LimitRef { rule: index, plan: asked.chosen.plan_index(), limit });
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

/// The descriptors of rule `index` alone for this request, to call about later with hits of one's
/// choosing, when no request waits for the answer: a lease refresh (one hit; the unit joins the
/// lease), or a usage charge after the response (the usage beyond the estimate). Built while the
/// request's headers can be read: Envoy lets a filter read them only until it lets them go on.
pub fn prepare_charge(config: &Config, request: &dyn Request, index: usize) -> Option<Charge> {
    let service = config.global.as_ref()?;
    let rule = config.rules.get(index)?;
    let asked = ask_about(index, rule, request, Purpose::Decide).ok()??;
    let (limits, descriptors): (Vec<_>, Vec<_>) = asked.descriptors().into_iter().unzip();
    let origins = limits
        .into_iter()
        .map(|limit| LimitRef { rule: index, plan: asked.chosen.plan_index(), limit })
        .collect();
    Some(Charge { domain: service.domain.clone(), descriptors, origins })
}

/// One rule's descriptors for one request, kept to call about later.
#[derive(Clone, Debug, PartialEq)]
pub struct Charge {
    domain: String,
    descriptors: Vec<RateLimitDescriptor>,
    origins: Vec<LimitRef>,
}

impl Charge {
    /// The call with `hits` on every descriptor.
    pub fn call(&self, hits: u64) -> GlobalCall {
        let mut descriptors = self.descriptors.clone();
        for d in &mut descriptors {
            d.hits_addend = Some(UInt64Value { value: hits });
        }
        let hits_addend = u32::try_from(hits).unwrap_or(u32::MAX);
        let request = RateLimitRequest { domain: self.domain.clone(), descriptors, hits_addend };
        GlobalCall { message: request.encode_to_vec(), origins: self.origins.clone(), deny_on_failure: false }
    }
}

/// One global rule as the service will be asked about it.
struct Asked<'a> {
    rule: &'a Rule,
    chosen: PlanLimits<'a>,
    parts: Vec<Entry>,
    hits: u64,
}

/// What to ask about `rule` for this request; `Ok(None)` when the rule does not apply (its
/// conditions, a missing key part, an unlimited plan).
fn ask_about<'a>(
    index: usize,
    rule: &'a Rule,
    request: &dyn Request,
    purpose: Purpose,
) -> Result<Option<Asked<'a>>, Refusal> {
    let applies = match purpose {
        Purpose::Decide => rule.matcher.matches(request),
        Purpose::Status => rule.matcher.headers_match(request),
    };
    if !applies {
        return Ok(None);
    }
    let Some(parts) = key_entries(rule, request) else { return Ok(None) };
    let hits = match purpose {
        Purpose::Decide => cost_of(rule, request).map_err(|reason| Refusal { rule: index, reason })?,
        Purpose::Status => 0,
    };
    let chosen = limits_for(rule, request);
    if chosen.unlimited() {
        return Ok(None);
    }
    Ok(Some(Asked { rule, chosen, parts, hits }))
}

impl Asked<'_> {
    /// One descriptor per limit (each with its index), or one without a limit when the service's
    /// own configuration holds it.
    fn descriptors(&self) -> Vec<(Option<usize>, RateLimitDescriptor)> {
        if self.chosen.limits.is_empty() {
            return vec![(None, self.descriptor(None))];
        }
        self.chosen.limits.iter().enumerate().map(|(i, l)| (Some(i), self.descriptor(Some(l)))).collect()
    }

    fn descriptor(&self, limit: Option<&Limit>) -> RateLimitDescriptor {
        let mut entries = vec![Entry { key: "rule".into(), value: self.rule.name.clone() }];
        if let Some(name) = self.chosen.plan_name() {
            entries.push(Entry { key: "plan".into(), value: name.to_owned() });
        }
        if let (Some(l), true) = (limit, self.chosen.limits.len() > 1) {
            entries.push(Entry { key: "limit".into(), value: l.name.clone() });
        }
        entries.extend(self.parts.iter().cloned());
        let limit_override = limit.and_then(|l| {
            Some(RateLimitOverride { requests_per_unit: u32::try_from(l.quota).ok()?, unit: l.rls_unit? })
        });
        RateLimitDescriptor {
            entries,
            limit: limit_override,
            hits_addend: Some(UInt64Value { value: self.hits }),
        }
    }
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

/// What marks a hashed value; a value that starts with it is hashed too, so a client cannot send
/// a value that stands for another one.
const HASHED: &str = "hash:";

/// Values go as they are when they are UTF-8 of at most 256 bytes, else as `hash:<32 hex digits>`:
/// two SipHash-1-3 halves (keys 0, salts 1 and 2), the same in every Envoy, whatever compiler
/// built it, so counts are shared during a rolling update.
pub(super) fn entry_value(value: &[u8]) -> String {
    match std::str::from_utf8(value) {
        Ok(text) if text.len() <= 256 && !text.starts_with(HASHED) => text.to_owned(),
        _ => {
            let half = |salt: u8| {
                let mut h = SipHasher13::new_with_keys(0, 0);
                h.write(&[salt]);
                h.write(value);
                h.finish()
            };
            format!("{HASHED}{:016x}{:016x}", half(1), half(2))
        }
    }
}
