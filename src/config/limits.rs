//! Limits, plans and costs: the part of a rule that says how much is allowed.

use std::collections::BTreeMap;
use std::num::NonZeroU32;

use serde::{Deserialize, Deserializer};

use super::duration::Duration;
use super::{header_name, is_name, ConfigError, MAX_NAME_LEN};
use crate::algorithm::concurrency::Concurrency;
use crate::algorithm::fixed_window::{FixedWindow, Window};
use crate::algorithm::sliding_window::SlidingWindow;
use crate::algorithm::time::{ceil_seconds, NANOS_PER_SECOND};
use crate::algorithm::token_bucket::TokenBucket;
use crate::algorithm::Algorithm;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LimitKind {
    TokenBucket,
    Gcra,
    FixedWindow,
    SlidingWindow,
    Concurrency,
}

impl LimitKind {
    pub fn as_str(self) -> &'static str {
        match self {
            LimitKind::TokenBucket => "token_bucket",
            LimitKind::Gcra => "gcra",
            LimitKind::FixedWindow => "fixed_window",
            LimitKind::SlidingWindow => "sliding_window",
            LimitKind::Concurrency => "concurrency",
        }
    }

    /// The fields each algorithm takes, for error messages.
    fn fields(self) -> &'static [&'static str] {
        match self {
            LimitKind::TokenBucket => {
                &["capacity", "refill_tokens", "refill_period", "max_delay", "max_queued"]
            }
            LimitKind::Gcra => &["requests", "period", "burst", "max_delay", "max_queued"],
            LimitKind::FixedWindow | LimitKind::SlidingWindow => &["requests", "window"],
            LimitKind::Concurrency => &["max_in_flight", "lease"],
        }
    }
}

/// One limit, ready to use.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limit {
    /// The name in the headers: the rule's name, or `rule.limit` when a rule has several.
    pub name: String,
    pub kind: LimitKind,
    pub algorithm: Algorithm,
    /// `q` of the quota policy.
    pub quota: u64,
    /// `w` of the quota policy, when it does not vary (calendar months do).
    pub window_seconds: Option<u64>,
    /// The `RateLimit-Policy` item, prepared once when `window_seconds` is fixed.
    pub policy: Option<String>,
    /// The Rate Limit Service unit (`envoy.type.v3.RateLimitUnit`) of a fixed window that has
    /// one: 1 second, minute, hour, day, week, or the calendar month.
    pub rls_unit: Option<i32>,
    /// Delay a request this limit would deny, when its turn comes soon enough.
    pub delay: Option<Delay>,
}

/// How long a request may be held for its turn, and how many may wait at once.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Delay {
    pub max_nanos: u64,
    /// Per key and worker.
    pub max_queued: u32,
}

impl Limit {
    pub fn window_seconds_at(&self, now: u64) -> u64 {
        self.window_seconds.unwrap_or_else(|| self.algorithm.window_seconds(now))
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PlanSource {
    Header(String),
    JwtClaim(String),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Plan {
    pub name: String,
    /// Empty when the plan is unlimited.
    pub limits: Vec<Limit>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Plans {
    pub source: PlanSource,
    /// Index into `plans` of the plan for requests without a known plan.
    pub default: usize,
    pub plans: Vec<Plan>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Limits {
    /// The same limits for every request.
    List(Vec<Limit>),
    /// Limits by the request's plan.
    Plans(Plans),
}

impl Limits {
    /// Every limit of the rule, whatever the plan.
    pub fn all(&self) -> Box<dyn Iterator<Item = &Limit> + '_> {
        match self {
            Limits::List(limits) => Box::new(limits.iter()),
            Limits::Plans(p) => Box::new(p.plans.iter().flat_map(|plan| plan.limits.iter())),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Cost {
    Constant(u64),
    /// Read from a request header: missing means `default`; above `max`, or not a positive
    /// integer, and the request is denied with a reason.
    Header {
        name: String,
        max: u64,
        default: u64,
    },
    /// Known from the response: `estimate` is taken when the request is admitted (so it passes
    /// while that much is left), and the usage the response header states (at most `max`) is
    /// charged when it arrives, correcting the estimate. The remaining quota may go below zero.
    Response {
        name: String,
        estimate: u64,
        max: u64,
    },
}

// ---------------------------------------------------------------------------------------------

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawLimit {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    algorithm: Option<LimitKind>,
    #[serde(default)]
    capacity: Option<NonZeroU32>,
    #[serde(default)]
    refill_tokens: Option<NonZeroU32>,
    #[serde(default)]
    refill_period: Option<Duration>,
    #[serde(default)]
    requests: Option<NonZeroU32>,
    #[serde(default)]
    period: Option<Duration>,
    #[serde(default)]
    burst: Option<NonZeroU32>,
    #[serde(default)]
    window: Option<RawWindow>,
    #[serde(default)]
    max_in_flight: Option<NonZeroU32>,
    #[serde(default)]
    lease: Option<Duration>,
    #[serde(default)]
    max_delay: Option<Duration>,
    #[serde(default)]
    max_queued: Option<NonZeroU32>,
}

/// `"month"`, `"day"`, or a duration.
#[derive(Clone, Copy)]
pub(super) struct RawWindow(Window, &'static str);

impl<'de> Deserialize<'de> for RawWindow {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        match text.as_str() {
            "month" => Ok(RawWindow(Window::Month, "month")),
            "day" => Ok(RawWindow(Window::Length(86_400 * NANOS_PER_SECOND), "day")),
            _ => Duration::parse(&text)
                .map(|d| RawWindow(Window::Length(d.as_nanos()), ""))
                .map_err(|e| serde::de::Error::custom(format!("{e}, or \"day\" or \"month\""))),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawPlanSource {
    #[serde(default)]
    header: Option<String>,
    #[serde(default)]
    jwt_claim: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawPlan {
    #[serde(default)]
    limit: Option<RawLimit>,
    #[serde(default)]
    limits: Option<Vec<RawLimit>>,
    #[serde(default)]
    unlimited: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawCostHeader {
    header: String,
    max: NonZeroU32,
    #[serde(default)]
    default: Option<NonZeroU32>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawCostResponse {
    response_header: String,
    max: NonZeroU32,
    #[serde(default)]
    estimate: Option<NonZeroU32>,
}

/// `"cost": 3`, `{"header": "x-cost", "max": 100, "default": 1}` or
/// `{"response_header": "x-usage-tokens", "max": 100000, "estimate": 1}`.
pub(super) enum RawCost {
    Constant(NonZeroU32),
    Header(RawCostHeader),
    Response(RawCostResponse),
}

impl<'de> Deserialize<'de> for RawCost {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        let value = serde_json::Value::deserialize(deserializer)?;
        match value {
            serde_json::Value::Object(ref fields) if fields.contains_key("response_header") => {
                serde_json::from_value(value).map(RawCost::Response).map_err(D::Error::custom)
            }
            serde_json::Value::Object(_) => {
                serde_json::from_value(value).map(RawCost::Header).map_err(D::Error::custom)
            }
            serde_json::Value::Number(n) => n
                .as_u64()
                .and_then(|n| u32::try_from(n).ok())
                .and_then(NonZeroU32::new)
                .map(RawCost::Constant)
                .ok_or_else(|| {
                    D::Error::custom(format!("must be a whole number from 1 to {}, got {n}", u32::MAX))
                }),
            other => Err(D::Error::custom(format!(
                "expected a whole number or {{\"header\": ..., \"max\": ...}}, got {other}"
            ))),
        }
    }
}

pub(super) struct RawLimitSet {
    /// A global rule may leave its limits to the rate limit service's own configuration.
    pub may_be_empty: bool,
    pub limit: Option<RawLimit>,
    pub limits: Option<Vec<RawLimit>>,
    pub plan: Option<RawPlanSource>,
    pub plans: Option<BTreeMap<String, RawPlan>>,
    pub default_plan: Option<String>,
}

// ---------------------------------------------------------------------------------------------

pub(super) fn compile_limits(path: &str, rule: &str, raw: RawLimitSet) -> Result<Limits, ConfigError> {
    let given = [raw.limit.is_some(), raw.limits.is_some(), raw.plans.is_some()];
    let count = given.iter().filter(|g| **g).count();
    if count == 0 && raw.may_be_empty && raw.plan.is_none() && raw.default_plan.is_none() {
        return Ok(Limits::List(Vec::new()));
    }
    if count != 1 {
        return Err(ConfigError::at(path, "give exactly one of limit, limits or plans"));
    }
    if let Some(limit) = raw.limit {
        return Ok(Limits::List(vec![compile_limit(&format!("{path}.limit"), rule, false, limit)?]));
    }
    if let Some(limits) = raw.limits {
        return Ok(Limits::List(compile_limit_list(&format!("{path}.limits"), rule, limits)?));
    }
    let plans_raw = raw.plans.unwrap_or_default();
    let source = match raw.plan {
        None => return Err(ConfigError::at(path, "plans need \"plan\": where to read the plan from")),
        Some(RawPlanSource { header: Some(h), jwt_claim: None }) => {
            PlanSource::Header(header_name(&format!("{path}.plan.header"), &h)?)
        }
        Some(RawPlanSource { header: None, jwt_claim: Some(c) }) if !c.is_empty() => PlanSource::JwtClaim(c),
        Some(_) => {
            return Err(ConfigError::at(format!("{path}.plan"), "give exactly one of header or jwt_claim"))
        }
    };
    if plans_raw.is_empty() {
        return Err(ConfigError::at(format!("{path}.plans"), "at least one plan is required"));
    }
    let mut plans = Vec::with_capacity(plans_raw.len());
    for (name, plan) in plans_raw {
        let here = format!("{path}.plans.{name}");
        if !is_name(&name, "") {
            return Err(ConfigError::at(
                &here,
                format!("plan names must be 1 to {MAX_NAME_LEN} characters from A-Z a-z 0-9 _ . -"),
            ));
        }
        let limits = match (plan.limit, plan.limits, plan.unlimited) {
            (None, None, true) => Vec::new(),
            (Some(limit), None, false) => vec![compile_limit(&format!("{here}.limit"), rule, false, limit)?],
            (None, Some(list), false) => compile_limit_list(&format!("{here}.limits"), rule, list)?,
            _ => {
                return Err(ConfigError::at(here, "give exactly one of limit, limits or \"unlimited\": true"))
            }
        };
        plans.push(Plan { name, limits });
    }
    let Some(default_name) = raw.default_plan else {
        return Err(ConfigError::at(
            path,
            "plans need \"default_plan\": the plan of requests without a known plan",
        ));
    };
    let Some(default) = plans.iter().position(|p| p.name == default_name) else {
        return Err(ConfigError::at(
            format!("{path}.default_plan"),
            format!("{default_name:?} is not one of the plans"),
        ));
    };
    Ok(Limits::Plans(Plans { source, default, plans }))
}

fn compile_limit_list(path: &str, rule: &str, raw: Vec<RawLimit>) -> Result<Vec<Limit>, ConfigError> {
    if raw.is_empty() {
        return Err(ConfigError::at(path, "at least one limit is required"));
    }
    let several = raw.len() > 1;
    let mut limits: Vec<Limit> = Vec::with_capacity(raw.len());
    for (i, r) in raw.into_iter().enumerate() {
        let limit = compile_limit(&format!("{path}[{i}]"), rule, several, r)?;
        if let Some(j) = limits.iter().position(|l| l.name == limit.name) {
            return Err(ConfigError::at(
                format!("{path}[{i}].name"),
                format!(
                    "two limits of this rule are called {:?} (also [{j}]); give each a distinct name",
                    limit.name
                ),
            ));
        }
        limits.push(limit);
    }
    Ok(limits)
}

/// The local limit a global rule falls back to while the service cannot answer (a rule of its
/// own, `rule`). Any algorithm but concurrency, which a global rule's requests could not release.
pub(super) fn compile_fallback(path: &str, rule: &str, raw: RawLimit) -> Result<Limit, ConfigError> {
    let limit = compile_limit(path, rule, false, raw)?;
    if limit.kind == LimitKind::Concurrency || limit.delay.is_some() {
        return Err(ConfigError::at(
            path,
            "a fallback limit counts requests: no concurrency limit, no max_delay",
        ));
    }
    Ok(limit)
}

/// The status endpoint's own limit, per client address: `raw`, or 10 calls a minute.
pub(super) fn compile_status_limit(raw: Option<RawLimit>) -> Result<Limit, ConfigError> {
    let default = || RawLimit {
        capacity: NonZeroU32::new(10),
        refill_period: Duration::from_nanos(60 * NANOS_PER_SECOND),
        ..RawLimit::default()
    };
    let limit = compile_limit("status_limit", "status", false, raw.unwrap_or_else(default))?;
    if limit.delay.is_some() {
        return Err(ConfigError::at(
            "status_limit.max_delay",
            "the status endpoint answers or refuses at once",
        ));
    }
    Ok(limit)
}

fn compile_limit(path: &str, rule: &str, several: bool, raw: RawLimit) -> Result<Limit, ConfigError> {
    let kind = raw.algorithm.unwrap_or(LimitKind::TokenBucket);
    refuse_foreign_fields(path, kind, &raw)?;
    let Compiled { algorithm, quota, window_seconds, default_name } = compile_algorithm(path, kind, &raw)?;
    let delay = compile_delay(path, &raw)?;
    let name = limit_name(path, rule, several, raw.name, default_name)?;
    let policy = window_seconds.map(|w| format!("\"{name}\";q={quota};w={w}"));
    let rls_unit = rls_unit(&algorithm);
    Ok(Limit { name, kind, algorithm, quota, window_seconds, policy, rls_unit, delay })
}

/// Requests wait at most this long, and by default at most this many per key and worker.
const MAX_DELAY_NANOS: u64 = 60 * NANOS_PER_SECOND;
const DEFAULT_MAX_QUEUED: u32 = 100;

fn compile_delay(path: &str, raw: &RawLimit) -> Result<Option<Delay>, ConfigError> {
    let Some(max_delay) = raw.max_delay else {
        if raw.max_queued.is_some() {
            return Err(ConfigError::at(
                format!("{path}.max_queued"),
                "only limits with a max_delay queue requests",
            ));
        }
        return Ok(None);
    };
    let max_nanos = max_delay.as_nanos();
    if !(1_000_000..=MAX_DELAY_NANOS).contains(&max_nanos) {
        return Err(ConfigError::at(format!("{path}.max_delay"), "must be between 1ms and 60s"));
    }
    let max_queued = raw.max_queued.map_or(DEFAULT_MAX_QUEUED, NonZeroU32::get);
    Ok(Some(Delay { max_nanos, max_queued }))
}

/// A field that belongs to another algorithm is refused, naming the fields this one takes.
fn refuse_foreign_fields(path: &str, kind: LimitKind, raw: &RawLimit) -> Result<(), ConfigError> {
    let present = [
        ("capacity", raw.capacity.is_some()),
        ("refill_tokens", raw.refill_tokens.is_some()),
        ("refill_period", raw.refill_period.is_some()),
        ("requests", raw.requests.is_some()),
        ("period", raw.period.is_some()),
        ("burst", raw.burst.is_some()),
        ("window", raw.window.is_some()),
        ("max_in_flight", raw.max_in_flight.is_some()),
        ("lease", raw.lease.is_some()),
        ("max_delay", raw.max_delay.is_some()),
        ("max_queued", raw.max_queued.is_some()),
    ];
    for (field, is_present) in present {
        if is_present && !kind.fields().contains(&field) {
            return Err(ConfigError::at(
                format!("{path}.{field}"),
                format!(
                    "not a field of algorithm \"{}\" (it takes {})",
                    kind.as_str(),
                    kind.fields().join(", ")
                ),
            ));
        }
    }
    Ok(())
}

/// One limit's algorithm with what its headers say of it.
struct Compiled {
    algorithm: Algorithm,
    /// `q` of the policy.
    quota: u64,
    /// `w` of the policy, when it does not vary.
    window_seconds: Option<u64>,
    /// The limit's name when a rule has several and this one has none: its period or window.
    default_name: String,
}

fn compile_algorithm(path: &str, kind: LimitKind, raw: &RawLimit) -> Result<Compiled, ConfigError> {
    let missing = |field: &str| {
        ConfigError::at(path, format!("missing field `{field}` for algorithm \"{}\"", kind.as_str()))
    };
    match kind {
        LimitKind::TokenBucket => {
            let capacity = raw.capacity.ok_or_else(|| missing("capacity"))?.get();
            let period = raw.refill_period.ok_or_else(|| missing("refill_period"))?;
            let tokens = raw.refill_tokens.map_or(capacity, NonZeroU32::get);
            let bucket = bucket(path, "refill_tokens", capacity, tokens, period)?;
            Ok(Compiled {
                algorithm: Algorithm::TokenBucket(bucket),
                quota: u64::from(capacity),
                window_seconds: Some(bucket.window_seconds()),
                default_name: period.to_string(),
            })
        }
        LimitKind::Gcra => {
            let requests = raw.requests.ok_or_else(|| missing("requests"))?.get();
            let period = raw.period.ok_or_else(|| missing("period"))?;
            let burst = raw.burst.map_or(1, NonZeroU32::get);
            let bucket = bucket(path, "requests", burst, requests, period)?;
            Ok(Compiled {
                algorithm: Algorithm::TokenBucket(bucket),
                quota: u64::from(requests),
                window_seconds: Some(ceil_seconds(period.as_nanos())),
                default_name: period.to_string(),
            })
        }
        LimitKind::FixedWindow => {
            let requests = raw.requests.ok_or_else(|| missing("requests"))?.get();
            let window = raw.window.ok_or_else(|| missing("window"))?;
            Ok(fixed_window(requests, window))
        }
        LimitKind::SlidingWindow => {
            let requests = raw.requests.ok_or_else(|| missing("requests"))?.get();
            let RawWindow(window, _) = raw.window.ok_or_else(|| missing("window"))?;
            let Window::Length(nanos) = window else {
                return Err(ConfigError::at(
                    format!("{path}.window"),
                    "a sliding window needs a fixed length; use algorithm \"fixed_window\" for calendar months",
                ));
            };
            Ok(Compiled {
                algorithm: Algorithm::SlidingWindow(SlidingWindow {
                    limit: u64::from(requests),
                    window: nanos,
                }),
                quota: u64::from(requests),
                window_seconds: Some(ceil_seconds(nanos)),
                default_name: Duration::from_nanos(nanos).map_or_else(String::new, |d| d.to_string()),
            })
        }
        LimitKind::Concurrency => concurrency(path, raw),
    }
}

/// The lease of units in flight when none is given, and the shortest allowed: a lease is two
/// epochs, and every worker must renew its units (on a 100 ms tick) within each.
const DEFAULT_LEASE_NANOS: u64 = 60 * NANOS_PER_SECOND;
const MIN_LEASE_NANOS: u64 = 2 * NANOS_PER_SECOND;
const MAX_LEASE_NANOS: u64 = 86_400 * NANOS_PER_SECOND;

fn concurrency(path: &str, raw: &RawLimit) -> Result<Compiled, ConfigError> {
    let max = raw.max_in_flight.ok_or_else(|| {
        ConfigError::at(path, "missing field `max_in_flight` for algorithm \"concurrency\"")
    })?;
    let lease = raw.lease.map_or(DEFAULT_LEASE_NANOS, Duration::as_nanos);
    if !(MIN_LEASE_NANOS..=MAX_LEASE_NANOS).contains(&lease) {
        return Err(ConfigError::at(format!("{path}.lease"), "must be between 2s and 24h"));
    }
    Ok(Compiled {
        algorithm: Algorithm::Concurrency(Concurrency { max: u64::from(max.get()), epoch: lease / 2 }),
        quota: u64::from(max.get()),
        window_seconds: Some(1),
        default_name: "in_flight".to_owned(),
    })
}

fn fixed_window(requests: u32, RawWindow(window, label): RawWindow) -> Compiled {
    let window_seconds = match window {
        Window::Length(nanos) => Some(ceil_seconds(nanos)),
        Window::Month => None,
    };
    let default_name = match window {
        Window::Length(nanos) if label.is_empty() => Duration::from_nanos(nanos).map(|d| d.to_string()),
        _ => None,
    }
    .unwrap_or_else(|| label.to_owned());
    Compiled {
        algorithm: Algorithm::FixedWindow(FixedWindow { limit: u64::from(requests), window }),
        quota: u64::from(requests),
        window_seconds,
        default_name,
    }
}

/// The name in the headers: the rule's, or `rule.limit` when a rule has several limits or the
/// limit is named.
fn limit_name(
    path: &str,
    rule: &str,
    several: bool,
    given: Option<String>,
    default_name: String,
) -> Result<String, ConfigError> {
    let limit_name = match given {
        Some(n) if !is_name(&n, "") => {
            return Err(ConfigError::at(
                format!("{path}.name"),
                format!("must be 1 to {MAX_NAME_LEN} characters from A-Z a-z 0-9 _ . -, got {n:?}"),
            ))
        }
        Some(n) => Some(n),
        None if several => Some(default_name),
        None => None,
    };
    Ok(match limit_name {
        Some(l) => format!("{rule}.{l}"),
        None => rule.to_owned(),
    })
}

/// The Rate Limit Service unit of a fixed window that has one.
fn rls_unit(algorithm: &Algorithm) -> Option<i32> {
    match algorithm {
        Algorithm::FixedWindow(FixedWindow { window: Window::Month, .. }) => Some(5),
        Algorithm::FixedWindow(FixedWindow { window: Window::Length(nanos), .. }) => {
            match nanos / NANOS_PER_SECOND {
                _ if nanos % NANOS_PER_SECOND != 0 => None,
                1 => Some(1),
                60 => Some(2),
                3_600 => Some(3),
                86_400 => Some(4),
                604_800 => Some(7),
                _ => None,
            }
        }
        _ => None,
    }
}

fn bucket(
    path: &str,
    rate_field: &str,
    capacity: u32,
    tokens: u32,
    period: Duration,
) -> Result<TokenBucket, ConfigError> {
    if period.as_nanos() / u64::from(tokens) == 0 {
        return Err(ConfigError::at(
            format!("{path}.{rate_field}"),
            format!("{tokens} per {period} is more than one token per nanosecond"),
        ));
    }
    TokenBucket::new(capacity, tokens, period.as_nanos()).ok_or_else(|| {
        ConfigError::at(
            path,
            format!(
                "a bucket of {capacity} refilled {tokens} per {period} takes longer than 146 years to fill"
            ),
        )
    })
}

pub(super) fn compile_cost(path: &str, raw: Option<RawCost>, limits: &Limits) -> Result<Cost, ConfigError> {
    match raw {
        None => Ok(Cost::Constant(1)),
        Some(RawCost::Constant(cost)) => {
            let cost = u64::from(cost.get());
            if let Some(limit) = limits.all().find(|l| cost > l.algorithm.capacity()) {
                return Err(ConfigError::at(
                    format!("{path}.cost"),
                    format!(
                        "cost {cost} exceeds the capacity {} of limit {:?}, so every request would be denied",
                        limit.algorithm.capacity(),
                        limit.name
                    ),
                ));
            }
            Ok(Cost::Constant(cost))
        }
        Some(RawCost::Header(h)) => {
            let name = header_name(&format!("{path}.cost.header"), &h.header)?;
            let max = u64::from(h.max.get());
            let default = u64::from(h.default.map_or(1, NonZeroU32::get));
            if default > max {
                return Err(ConfigError::at(
                    format!("{path}.cost.default"),
                    format!("default {default} exceeds max {max}"),
                ));
            }
            Ok(Cost::Header { name, max, default })
        }
        Some(RawCost::Response(r)) => compile_response_cost(path, r, limits),
    }
}

fn compile_response_cost(path: &str, raw: RawCostResponse, limits: &Limits) -> Result<Cost, ConfigError> {
    let name = header_name(&format!("{path}.cost.response_header"), &raw.response_header)?;
    let max = u64::from(raw.max.get());
    let estimate = u64::from(raw.estimate.map_or(1, NonZeroU32::get));
    if estimate > max {
        return Err(ConfigError::at(
            format!("{path}.cost.estimate"),
            format!("estimate {estimate} exceeds max {max}"),
        ));
    }
    if let Some(limit) = limits.all().find(|l| l.kind == LimitKind::Concurrency) {
        return Err(ConfigError::at(
            format!("{path}.cost.response_header"),
            format!(
                "limit {:?} counts requests in flight, which a response cannot charge afterwards",
                limit.name
            ),
        ));
    }
    if let Some(limit) = limits.all().find(|l| estimate > l.algorithm.capacity()) {
        return Err(ConfigError::at(
            format!("{path}.cost.estimate"),
            format!(
                "estimate {estimate} exceeds the capacity {} of limit {:?}",
                limit.algorithm.capacity(),
                limit.name
            ),
        ));
    }
    Ok(Cost::Response { name, estimate, max })
}
