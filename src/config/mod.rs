//! The filter JSON: parsed strictly, then compiled into immutable runtime structures.
//!
//! Every error names the JSON path of the offending field (`rules[0].limit.capacity: ...`). The
//! full message is logged by the wasm glue, which then makes Envoy refuse the plugin.

use std::fmt;

use serde::Deserialize;

pub mod duration;
mod idempotency;
mod lease;
mod limits;
mod table;
mod unique;

pub use idempotency::{Across, Idempotency, NotStoredPolicy, MAX_BODY_BYTES};
pub use lease::Lease;
pub use limits::{Cost, Delay, Limit, LimitKind, Limits, Plan, PlanSource, Plans};
use limits::{RawCost, RawLimit, RawPlan, RawPlanSource};
pub use table::TableShare;

pub const DEFAULT_KEY_PREFIX: &str = "ratelimit-wasm";
pub const DEFAULT_TABLE_SIZE: u32 = 65_536;
pub const MIN_TABLE_SIZE: u32 = 8;
pub const MAX_TABLE_SIZE: u32 = 1 << 24;
pub(crate) const MAX_NAME_LEN: usize = 64;

/// A configuration error: where in the JSON, and what is wrong there.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigError {
    pub path: String,
    pub message: String,
}

impl ConfigError {
    pub(crate) fn at(path: impl Into<String>, message: impl Into<String>) -> ConfigError {
        ConfigError { path: path.into(), message: message.into() }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            write!(f, "{}", self.message)
        } else {
            write!(f, "{}: {}", self.path, self.message)
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Runtime structures (what the limiter uses).

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TableFullPolicy {
    /// Let the request through without tracking that key (counted in `table_full`).
    Allow,
    /// Refuse the request with the deny response.
    Deny,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
pub enum HeaderFormat {
    #[serde(rename = "ietf")]
    Ietf,
    #[serde(rename = "x-ratelimit")]
    XRateLimit,
    #[serde(rename = "both")]
    Both,
    #[serde(rename = "none")]
    None,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MissingKeyPolicy {
    /// The rule does not apply to a request that lacks a key part.
    Skip,
    /// A missing part counts as the empty string: all such requests share one bucket.
    Empty,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KeyPart {
    ClientAddress,
    XForwardedFor { trusted_hops: u32 },
    Header(String),
    Query(String),
    Method,
    Path,
    Constant(String),
    JwtClaim(String),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PathMatch {
    Exact(String),
    Prefix(String),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HeaderCondition {
    Present(bool),
    Equals(Vec<u8>),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HeaderMatch {
    pub name: String,
    pub condition: HeaderCondition,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Matcher {
    pub path: Option<PathMatch>,
    pub methods: Vec<String>,
    pub headers: Vec<HeaderMatch>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rule {
    pub name: String,
    pub matcher: Matcher,
    pub key: Vec<KeyPart>,
    pub when_key_missing: MissingKeyPolicy,
    pub limits: Limits,
    pub cost: Cost,
    /// Counts, logs and reports, but never denies.
    pub shadow: bool,
    /// Decided by the rate limit service instead of shared data.
    pub global: Option<FailureMode>,
    /// The slots this rule's buckets live in (`None` for a global rule, which keeps none).
    pub table: Option<TableShare>,
    /// What a new key does when its probe window in the rule's share is all live.
    pub when_table_full: TableFullPolicy,
    /// For the local rule made from a global rule's `fallback` (named `<rule>.fallback`): the
    /// global rule's index. It applies only to requests whose call to the service failed.
    pub fallback_for: Option<usize>,
    /// A global rule's quota taken a few units at a time and spent locally.
    pub lease: Option<Lease>,
}

/// What a global rule does when the rate limit service cannot answer in time.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailureMode {
    Allow,
    Deny,
    /// Enforce the rule's `fallback` limit in this Envoy's shared data instead.
    Local,
}

/// Where global rules are decided: an Envoy cluster speaking the Rate Limit Service API.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GlobalService {
    pub cluster: String,
    /// The `:authority` of the calls, when the cluster's name cannot be one (Istio's
    /// `outbound|8081||ratelimit.svc`), or as configured.
    pub authority: Option<String>,
    pub domain: String,
    pub timeout_ms: u32,
    pub failure_mode: FailureMode,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DenyResponse {
    pub status: u32,
    pub body: String,
    pub content_type: String,
    /// The `grpc-status` a denied gRPC request gets (Envoy applies it to gRPC requests only).
    pub grpc_status: u32,
}

/// How long a request waits for the rate limit service by default. A call on a warm connection
/// takes about a millisecond on a LAN, but each worker's first call also opens its HTTP/2
/// connection: an audit measured 22.8 ms for one in a correct local setup, over the old 20 ms default.
pub const DEFAULT_GLOBAL_TIMEOUT_MS: u32 = 100;

/// RESOURCE_EXHAUSTED, what gRPC clients expect for a rate-limited call (Envoy's native filters
/// send it with `rate_limited_as_resource_exhausted`); without it Envoy maps 429 to UNAVAILABLE,
/// which tells clients to retry elsewhere at once.
pub const DEFAULT_GRPC_STATUS: u32 = 8;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    pub key_prefix: String,
    pub table_size: u32,
    pub when_table_full: TableFullPolicy,
    pub headers: HeaderFormat,
    pub deny: DenyResponse,
    /// A path the filter answers itself with the caller's current limits.
    pub status_path: Option<String>,
    /// How often one client address may call the status endpoint.
    pub status_limit: Limit,
    /// The slots the status endpoint's limit lives in (`None` without a status path).
    pub status_table: Option<TableShare>,
    pub violation_log: ViolationLog,
    pub global: Option<GlobalService>,
    pub rules: Vec<Rule>,
    /// Requests whose `Idempotency-Key` the filter enforces (at most one entry applies to a
    /// request: the first that matches).
    pub idempotency: Vec<Idempotency>,
}

/// Which limit of the configuration something is about, by position, so it can be kept without
/// borrowing the configuration (a request keeps it from its decision to its response).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LimitRef {
    pub rule: usize,
    /// The plan's index among the rule's plans, for a rule with plans.
    pub plan: Option<usize>,
    /// The limit's index among the plan's (or the rule's) limits; `None` for a global rule that
    /// leaves its limits to the service.
    pub limit: Option<usize>,
}

/// What a [`LimitRef`] points at.
#[derive(Clone, Copy, Debug)]
pub struct Found<'a> {
    pub rule: &'a Rule,
    pub plan: Option<&'a str>,
    pub limit: Option<&'a Limit>,
}

impl<'a> Found<'a> {
    /// The name headers and the status give it: the limit's, else the rule's.
    pub fn name(&self) -> &'a str {
        self.limit.map_or(self.rule.name.as_str(), |l| l.name.as_str())
    }
}

impl Config {
    /// The rule, plan name and limit `at` points at; `None` for a position this configuration
    /// does not have.
    pub fn find(&self, at: LimitRef) -> Option<Found<'_>> {
        let rule = self.rules.get(at.rule)?;
        let (plan, limits): (Option<&str>, &[Limit]) = match (&rule.limits, at.plan) {
            (Limits::List(limits), _) => (None, limits),
            (Limits::Plans(p), Some(plan)) => {
                let plan = p.plans.get(plan)?;
                (Some(plan.name.as_str()), &plan.limits)
            }
            (Limits::Plans(_), None) => (None, &[]),
        };
        let limit = match at.limit {
            Some(index) => Some(limits.get(index)?),
            None => None,
        };
        Some(Found { rule, plan, limit })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogLevel {
    Off,
    Debug,
    Info,
    Warn,
    Error,
}

/// One line per denial, itself rate-limited.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ViolationLog {
    pub level: LogLevel,
    pub max_per_second: u32,
    /// Log the raw key parts instead of only a hash of the key.
    pub include_key: bool,
}

// ---------------------------------------------------------------------------------------------
// The JSON as written by users.

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    key_prefix: Option<String>,
    #[serde(default)]
    table_size: Option<u32>,
    #[serde(default)]
    when_table_full: Option<TableFullPolicy>,
    #[serde(default)]
    headers: Option<HeaderFormat>,
    #[serde(default)]
    deny_response: Option<RawDenyResponse>,
    #[serde(default)]
    status_path: Option<String>,
    #[serde(default)]
    status_limit: Option<RawLimit>,
    #[serde(default)]
    violation_log: Option<RawViolationLog>,
    #[serde(default)]
    global: Option<RawGlobal>,
    rules: Vec<RawRule>,
    #[serde(default)]
    idempotency: Vec<idempotency::RawIdempotency>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGlobal {
    cluster: String,
    #[serde(default)]
    authority: Option<String>,
    domain: String,
    #[serde(default)]
    timeout: Option<duration::Duration>,
    #[serde(default)]
    failure_mode: Option<FailureMode>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawViolationLog {
    #[serde(default)]
    level: Option<LogLevel>,
    #[serde(default)]
    max_per_second: Option<u32>,
    #[serde(default)]
    include_key: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDenyResponse {
    #[serde(default)]
    status: Option<u32>,
    #[serde(default)]
    body: Option<String>,
    #[serde(default)]
    content_type: Option<String>,
    #[serde(default)]
    grpc_status: Option<u32>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    name: String,
    #[serde(default, rename = "match")]
    matcher: Option<RawMatch>,
    key: Vec<RawKeyPart>,
    #[serde(default)]
    when_key_missing: Option<MissingKeyPolicy>,
    #[serde(default)]
    limit: Option<RawLimit>,
    #[serde(default)]
    limits: Option<Vec<RawLimit>>,
    #[serde(default)]
    plan: Option<RawPlanSource>,
    #[serde(default)]
    plans: Option<std::collections::BTreeMap<String, RawPlan>>,
    #[serde(default)]
    default_plan: Option<String>,
    #[serde(default)]
    cost: Option<RawCost>,
    #[serde(default)]
    shadow: bool,
    #[serde(default)]
    global: bool,
    #[serde(default)]
    failure_mode: Option<FailureMode>,
    #[serde(default)]
    table_size: Option<u32>,
    #[serde(default)]
    when_table_full: Option<TableFullPolicy>,
    #[serde(default)]
    fallback: Option<RawLimit>,
    #[serde(default)]
    lease: Option<lease::RawLease>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMatch {
    #[serde(default)]
    path: Option<String>,
    #[serde(default)]
    path_prefix: Option<String>,
    #[serde(default)]
    methods: Vec<String>,
    #[serde(default)]
    headers: Vec<RawHeaderMatch>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHeaderMatch {
    name: String,
    #[serde(default)]
    present: Option<bool>,
    #[serde(default)]
    equals: Option<String>,
}

/// One key part as written: `source` says which of the other fields it takes. A flat struct (not
/// a tagged enum), so an error names the exact field (`rules[0].key[0].trusted_hops`).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawKeyPart {
    source: KeySource,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    trusted_hops: Option<u32>,
    #[serde(default)]
    value: Option<String>,
    #[serde(default)]
    claim: Option<String>,
}

#[derive(Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
enum KeySource {
    ClientAddress,
    XForwardedFor,
    Header,
    Query,
    Method,
    Path,
    Constant,
    JwtClaim,
}

impl KeySource {
    fn as_str(self) -> &'static str {
        match self {
            KeySource::ClientAddress => "client_address",
            KeySource::XForwardedFor => "x_forwarded_for",
            KeySource::Header => "header",
            KeySource::Query => "query",
            KeySource::Method => "method",
            KeySource::Path => "path",
            KeySource::Constant => "constant",
            KeySource::JwtClaim => "jwt_claim",
        }
    }

    /// The one field each source takes besides `source`, if any.
    fn field(self) -> Option<&'static str> {
        match self {
            KeySource::XForwardedFor => Some("trusted_hops"),
            KeySource::Header | KeySource::Query => Some("name"),
            KeySource::Constant => Some("value"),
            KeySource::JwtClaim => Some("claim"),
            KeySource::ClientAddress | KeySource::Method | KeySource::Path => None,
        }
    }
}

// ---------------------------------------------------------------------------------------------

impl Config {
    /// Parses and validates the plugin configuration bytes.
    pub fn parse(bytes: &[u8]) -> Result<Config, ConfigError> {
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Err(ConfigError::at("", "configuration is empty: expected a JSON object with \"rules\""));
        }
        unique::refuse_duplicate_fields(bytes)?;
        let mut value: serde_json::Value = serde_json::from_slice(bytes).map_err(|e| {
            if looks_like_a_binary_struct(bytes) {
                return ConfigError::at("", STRUCT_GIVEN);
            }
            ConfigError::at("", format!("invalid JSON: {e}"))
        })?;
        whole_floats_as_integers(&mut value);
        if !value.is_object() {
            return Err(ConfigError::at("", "the configuration must be a JSON object with \"rules\""));
        }
        let raw: RawConfig = serde_path_to_error::deserialize(value).map_err(|e| {
            let path = e.path().to_string();
            let path = if path == "." { String::new() } else { path };
            ConfigError::at(path, e.into_inner().to_string())
        })?;
        compile(raw)
    }
}

const STRUCT_GIVEN: &str = "the configuration is not JSON but a binary protobuf, which is how Envoy passes a google.protobuf.Struct: give the filter JSON as a string, configuration: {\"@type\": \"type.googleapis.com/google.protobuf.StringValue\", \"value\": \"{...}\"}";

/// A `google.protobuf.Struct` as Envoy hands it over: its binary encoding, which starts with
/// field 1 (a `fields` map entry, tag byte 0x0a) and a length that fits in what follows.
fn looks_like_a_binary_struct(bytes: &[u8]) -> bool {
    match bytes {
        [0x0a, len, rest @ ..] => usize::from(*len) <= rest.len() && (*len < 0x80 || rest.len() > 0x80),
        _ => false,
    }
}

/// Istio hands over `pluginConfig` re-serialised from a protobuf Struct, whose numbers are all
/// doubles: a Go serialiser may print `100` as `100.0` or `1e+06`. A whole number within a double's
/// exact range (2^53) means that integer; anything else stays a float (and an integer field refuses it).
fn whole_floats_as_integers(value: &mut serde_json::Value) {
    const EXACT: f64 = 9_007_199_254_740_992.0; // 2^53
    match value {
        serde_json::Value::Number(n) if n.is_f64() => {
            if let Some(f) = n.as_f64().filter(|f| f.fract() == 0.0 && f.abs() <= EXACT) {
                // In range and whole, so the conversion is exact.
                *value = serde_json::Value::from(f as i64);
            }
        }
        serde_json::Value::Array(items) => items.iter_mut().for_each(whole_floats_as_integers),
        serde_json::Value::Object(fields) => fields.values_mut().for_each(whole_floats_as_integers),
        _ => {}
    }
}

fn compile(raw: RawConfig) -> Result<Config, ConfigError> {
    let key_prefix = raw.key_prefix.unwrap_or_else(|| DEFAULT_KEY_PREFIX.to_owned());
    if !is_name(&key_prefix, ":") {
        return Err(ConfigError::at(
            "key_prefix",
            format!("must be 1 to {MAX_NAME_LEN} characters from A-Z a-z 0-9 _ . - :, got {key_prefix:?}"),
        ));
    }
    let table_size = raw.table_size.unwrap_or(DEFAULT_TABLE_SIZE);
    if !(MIN_TABLE_SIZE..=MAX_TABLE_SIZE).contains(&table_size) {
        return Err(ConfigError::at(
            "table_size",
            format!("must be between {MIN_TABLE_SIZE} and {MAX_TABLE_SIZE}, got {table_size}"),
        ));
    }
    let deny = compile_deny(raw.deny_response)?;
    let status_path = compile_status_path(raw.status_path)?;
    let status_limit = limits::compile_status_limit(raw.status_limit)?;
    let violation_log = compile_violation_log(raw.violation_log)?;
    if raw.rules.is_empty() && raw.idempotency.is_empty() {
        return Err(ConfigError::at("rules", "at least one rule is required"));
    }

    let global = match raw.global {
        Some(g) => Some(compile_global(g)?),
        None => None,
    };
    let idempotency = idempotency::compile_all(raw.idempotency, global.is_some())?;
    let when_table_full = raw.when_table_full.unwrap_or(TableFullPolicy::Allow);
    let mut rules: Vec<Rule> = Vec::with_capacity(raw.rules.len());
    let mut claims = Vec::with_capacity(raw.rules.len() + 1);
    // Fallback rules come after every configured rule, so those keep their positions.
    let mut fallbacks: Vec<(String, Rule)> = Vec::new();
    for (i, raw_rule) in raw.rules.into_iter().enumerate() {
        let path = format!("rules[{i}]");
        let reserved = raw_rule.table_size;
        let (rule, fallback) = compile_rule(&path, raw_rule, global.as_ref(), when_table_full)?;
        if let Some(j) = rules.iter().position(|r| r.name == rule.name) {
            return Err(ConfigError::at(
                format!("rules[{i}].name"),
                format!("duplicate rule name {:?} (also rules[{j}])", rule.name),
            ));
        }
        if rule.global.is_none() {
            claims.push(table::Claim { path: path.clone(), reserved });
        }
        if let Some(fallback) = fallback {
            fallbacks.push((format!("{path}.fallback"), Rule { fallback_for: Some(i), ..fallback }));
        }
        rules.push(rule);
    }
    for (path, fallback) in fallbacks {
        if let Some(j) = rules.iter().position(|r| r.name == fallback.name) {
            return Err(ConfigError::at(
                path,
                format!("its rule {:?} is also rules[{j}]'s name", fallback.name),
            ));
        }
        claims.push(table::Claim { path, reserved: None });
        rules.push(fallback);
    }
    let status_table = assign_shares(table_size, claims, &mut rules, status_path.is_some())?;
    Ok(Config {
        key_prefix,
        table_size,
        when_table_full,
        headers: raw.headers.unwrap_or(HeaderFormat::Both),
        deny,
        status_path,
        status_limit,
        status_table,
        violation_log,
        global,
        rules,
        idempotency,
    })
}

fn compile_status_path(raw: Option<String>) -> Result<Option<String>, ConfigError> {
    match raw {
        Some(p) if !p.starts_with('/') || p.contains(['?', '#']) => Err(ConfigError::at(
            "status_path",
            format!("must be a path starting with \"/\" without query, got {p:?}"),
        )),
        other => Ok(other),
    }
}

fn compile_violation_log(raw: Option<RawViolationLog>) -> Result<ViolationLog, ConfigError> {
    let Some(v) = raw else {
        return Ok(ViolationLog { level: LogLevel::Info, max_per_second: 10, include_key: false });
    };
    let max_per_second = v.max_per_second.unwrap_or(10);
    if max_per_second == 0 {
        return Err(ConfigError::at(
            "violation_log.max_per_second",
            "must be at least 1 (use \"level\": \"off\" to turn the log off)",
        ));
    }
    Ok(ViolationLog {
        level: v.level.unwrap_or(LogLevel::Info),
        max_per_second,
        include_key: v.include_key.unwrap_or(false),
    })
}

/// Gives each local rule (in `claims`, in rule order) its share of the table, and returns the
/// status endpoint's (its claim comes last, when there is a status path).
fn assign_shares(
    table_size: u32,
    mut claims: Vec<table::Claim>,
    rules: &mut [Rule],
    status_endpoint: bool,
) -> Result<Option<TableShare>, ConfigError> {
    if status_endpoint {
        claims.push(table::Claim { path: "status_limit".to_owned(), reserved: None });
    }
    let mut shares = table::share_out(table_size, &claims)?.into_iter();
    for rule in rules.iter_mut().filter(|r| r.global.is_none()) {
        rule.table = shares.next();
    }
    Ok(if status_endpoint { shares.next() } else { None })
}

fn compile_global(raw: RawGlobal) -> Result<GlobalService, ConfigError> {
    if raw.cluster.is_empty() {
        return Err(ConfigError::at(
            "global.cluster",
            "must name the Envoy cluster of the rate limit service",
        ));
    }
    if raw.domain.is_empty() {
        return Err(ConfigError::at("global.domain", "must not be empty"));
    }
    let timeout_ms = match raw.timeout {
        None => DEFAULT_GLOBAL_TIMEOUT_MS,
        Some(t) => u32::try_from(t.as_nanos() / 1_000_000).unwrap_or(u32::MAX),
    };
    if timeout_ms == 0 {
        return Err(ConfigError::at("global.timeout", "must be at least 1ms"));
    }
    let authority = match raw.authority {
        Some(a) if a.is_empty() || !a.bytes().all(is_authority_byte) => {
            return Err(ConfigError::at(
                "global.authority",
                format!("must be a host[:port] (letters, digits and - . _ ~ : [ ]), got {a:?}"),
            ))
        }
        Some(a) => Some(a),
        None => default_authority(&raw.cluster),
    };
    Ok(GlobalService {
        authority,
        cluster: raw.cluster,
        domain: raw.domain,
        timeout_ms,
        failure_mode: raw.failure_mode.unwrap_or(FailureMode::Allow),
    })
}

/// Envoy sends a call's cluster name as its `:authority` unless told otherwise, and a server
/// refuses one with characters a host cannot have. Istio names clusters
/// `outbound|<port>|<subset>|<host>`: its host part is the authority Istio's own config uses.
fn default_authority(cluster: &str) -> Option<String> {
    if cluster.bytes().all(is_authority_byte) {
        return None;
    }
    let host = cluster.rsplit('|').next().filter(|h| !h.is_empty() && h.bytes().all(is_authority_byte));
    Some(host.unwrap_or("ratelimit").to_owned())
}

fn is_authority_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"-._~:[]".contains(&b)
}

fn compile_deny(raw: Option<RawDenyResponse>) -> Result<DenyResponse, ConfigError> {
    let raw =
        raw.unwrap_or(RawDenyResponse { status: None, body: None, content_type: None, grpc_status: None });
    let status = raw.status.unwrap_or(429);
    if !(200..=599).contains(&status) {
        return Err(ConfigError::at(
            "deny_response.status",
            format!("must be an HTTP status between 200 and 599, got {status}"),
        ));
    }
    let content_type = raw.content_type.unwrap_or_else(|| "text/plain".to_owned());
    if content_type.is_empty() || !is_header_value(&content_type) {
        return Err(ConfigError::at(
            "deny_response.content_type",
            format!("must be a non-empty header value without control characters, got {content_type:?}"),
        ));
    }
    let grpc_status = raw.grpc_status.unwrap_or(DEFAULT_GRPC_STATUS);
    if grpc_status > 16 {
        return Err(ConfigError::at(
            "deny_response.grpc_status",
            format!("must be a gRPC status code between 0 and 16, got {grpc_status}"),
        ));
    }
    let body = raw.body.unwrap_or_else(|| "rate limited\n".to_owned());
    Ok(DenyResponse { status, body, content_type, grpc_status })
}

/// A rule as configured, and the local rule its `fallback` makes (for a global rule with
/// `failure_mode: local`).
fn compile_rule(
    path: &str,
    mut raw: RawRule,
    global: Option<&GlobalService>,
    when_table_full: TableFullPolicy,
) -> Result<(Rule, Option<Rule>), ConfigError> {
    let raw_fallback = raw.fallback.take();
    let rule = compile_rule_itself(path, raw, global, when_table_full)?;
    let fallback = match (rule.global, raw_fallback) {
        (Some(FailureMode::Local), Some(limit)) => Some(fallback_rule(path, &rule, limit, when_table_full)?),
        (Some(FailureMode::Local), None) => {
            return Err(ConfigError::at(
                format!("{path}.fallback"),
                "failure_mode \"local\" needs the local limit to enforce while the service cannot answer, e.g. {\"algorithm\": \"fixed_window\", \"requests\": 25, \"window\": \"1m\"}",
            ))
        }
        (_, Some(_)) => {
            return Err(ConfigError::at(format!("{path}.fallback"), "only a global rule with failure_mode \"local\" has a fallback"))
        }
        (_, None) => None,
    };
    Ok((rule, fallback))
}

/// The local rule `<name>.fallback`: the global rule's match, key and cost, with its fallback limit.
fn fallback_rule(
    path: &str,
    rule: &Rule,
    raw: RawLimit,
    when_table_full: TableFullPolicy,
) -> Result<Rule, ConfigError> {
    let name = format!("{}.fallback", rule.name);
    let limit = limits::compile_fallback(&format!("{path}.fallback"), &name, raw)?;
    Ok(Rule {
        name,
        matcher: rule.matcher.clone(),
        key: rule.key.clone(),
        when_key_missing: rule.when_key_missing,
        limits: Limits::List(vec![limit]),
        cost: rule.cost.clone(),
        shadow: false,
        global: None,
        table: None,
        when_table_full,
        fallback_for: None,
        lease: None,
    })
}

fn compile_rule_itself(
    path: &str,
    raw: RawRule,
    global: Option<&GlobalService>,
    when_table_full: TableFullPolicy,
) -> Result<Rule, ConfigError> {
    check_name(path, &raw.name)?;
    let matcher = compile_optional_match(path, raw.matcher)?;
    if raw.key.is_empty() {
        return Err(ConfigError::at(
            format!("{path}.key"),
            "at least one key part is required (use {\"source\": \"constant\", \"value\": \"all\"} for one shared bucket)",
        ));
    }
    let mut key = Vec::with_capacity(raw.key.len());
    for (j, part) in raw.key.into_iter().enumerate() {
        key.push(compile_key_part(&format!("{path}.key[{j}]"), part)?);
    }
    let limits = limits::compile_limits(
        path,
        &raw.name,
        limits::RawLimitSet {
            may_be_empty: raw.global,
            limit: raw.limit,
            limits: raw.limits,
            plan: raw.plan,
            plans: raw.plans,
            default_plan: raw.default_plan,
        },
    )?;
    let cost = limits::compile_cost(path, raw.cost, &limits)?;
    let lease = lease::compile_for(path, raw.lease, raw.global)?;
    let global = match (raw.global, global, raw.failure_mode) {
        (false, _, Some(_)) => {
            return Err(ConfigError::at(
                format!("{path}.failure_mode"),
                "only global rules have a failure mode",
            ))
        }
        (false, _, None) => None,
        (true, None, _) => {
            return Err(ConfigError::at(
                format!("{path}.global"),
                "a global rule needs the top-level \"global\" section (cluster, domain)",
            ))
        }
        (true, Some(service), mode) => {
            let table_field = local_table_field(raw.table_size, raw.when_table_full);
            check_global_rule(path, raw.shadow, table_field, &limits)?;
            Some(mode.unwrap_or(service.failure_mode))
        }
    };
    Ok(Rule {
        name: raw.name,
        matcher,
        key,
        when_key_missing: raw.when_key_missing.unwrap_or(MissingKeyPolicy::Skip),
        limits,
        cost,
        shadow: raw.shadow,
        global,
        table: None,
        when_table_full: raw.when_table_full.unwrap_or(when_table_full),
        fallback_for: None,
        lease,
    })
}

/// What a global rule may not have: shadow mode, table fields, limits the service cannot count.
fn check_global_rule(
    path: &str,
    shadow: bool,
    table_field: Option<&str>,
    limits: &Limits,
) -> Result<(), ConfigError> {
    if shadow {
        return Err(ConfigError::at(format!("{path}.shadow"), "a global rule cannot be a shadow rule"));
    }
    if let Some(field) = table_field {
        return Err(ConfigError::at(
            format!("{path}.{field}"),
            "a global rule keeps no state in this Envoy's table (the rate limit service counts it)",
        ));
    }
    if let Some(limit) = limits.all().find(|l| l.kind == LimitKind::Concurrency) {
        return Err(ConfigError::at(
            format!("{path}.global"),
            format!(
                "limit {:?} is a concurrency limit, which cannot be global: the Rate Limit Service API has no call to release a request's unit; make the rule local (per Envoy)",
                limit.name
            ),
        ));
    }
    if let Some(limit) = limits.all().find(|l| l.rls_unit.is_none()) {
        return Err(ConfigError::at(
            format!("{path}.global"),
            format!(
                "limit {:?} cannot be sent to a rate limit service, which counts requests per second, minute, hour, day, week or month: use {{\"algorithm\": \"fixed_window\", \"window\": \"1s\" | \"1m\" | \"1h\" | \"day\" | \"7d\" | \"month\"}} (the service chooses the algorithm)",
                limit.name
            ),
        ));
    }
    Ok(())
}

/// The first table field a global rule was given, which only local rules take.
fn local_table_field(table_size: Option<u32>, when_full: Option<TableFullPolicy>) -> Option<&'static str> {
    if table_size.is_some() {
        Some("table_size")
    } else if when_full.is_some() {
        Some("when_table_full")
    } else {
        None
    }
}

/// A rule's (or an idempotency entry's) `name`.
fn check_name(path: &str, name: &str) -> Result<(), ConfigError> {
    if is_name(name, "") {
        return Ok(());
    }
    Err(ConfigError::at(
        format!("{path}.name"),
        format!("must be 1 to {MAX_NAME_LEN} characters from A-Z a-z 0-9 _ . -, got {name:?}"),
    ))
}

/// A `match` that may be absent (then every request matches).
fn compile_optional_match(path: &str, raw: Option<RawMatch>) -> Result<Matcher, ConfigError> {
    raw.map_or(Ok(Matcher::default()), |m| compile_match(&format!("{path}.match"), m))
}

fn compile_match(path: &str, raw: RawMatch) -> Result<Matcher, ConfigError> {
    let path_match = match (raw.path, raw.path_prefix) {
        (Some(_), Some(_)) => return Err(ConfigError::at(path, "give either path or path_prefix, not both")),
        (Some(p), None) => Some((p, "path")),
        (None, Some(p)) => Some((p, "path_prefix")),
        (None, None) => None,
    };
    let path_match = match path_match {
        Some((p, field)) if !p.starts_with('/') => {
            return Err(ConfigError::at(
                format!("{path}.{field}"),
                format!("must start with \"/\", got {p:?}"),
            ))
        }
        Some((p, "path")) => Some(PathMatch::Exact(p)),
        Some((p, _)) => Some(PathMatch::Prefix(p)),
        None => None,
    };
    for (j, method) in raw.methods.iter().enumerate() {
        if method.is_empty() || !method.bytes().all(|b| b.is_ascii_alphabetic()) {
            return Err(ConfigError::at(
                format!("{path}.methods[{j}]"),
                format!("must be an HTTP method such as \"GET\", got {method:?}"),
            ));
        }
    }
    let mut headers = Vec::with_capacity(raw.headers.len());
    for (j, h) in raw.headers.into_iter().enumerate() {
        let here = format!("{path}.headers[{j}]");
        let name = header_name(&format!("{here}.name"), &h.name)?;
        let condition = match (h.present, h.equals) {
            (Some(present), None) => HeaderCondition::Present(present),
            (None, Some(value)) => HeaderCondition::Equals(value.into_bytes()),
            _ => return Err(ConfigError::at(here, "give exactly one of present or equals")),
        };
        headers.push(HeaderMatch { name, condition });
    }
    Ok(Matcher {
        path: path_match,
        methods: raw.methods.into_iter().map(|m| m.to_ascii_uppercase()).collect(),
        headers,
    })
}

fn compile_key_part(path: &str, raw: RawKeyPart) -> Result<KeyPart, ConfigError> {
    refuse_foreign_key_fields(path, &raw)?;
    let required = |given: Option<String>, field: &str| {
        given.ok_or_else(|| ConfigError::at(path, format!("missing field `{field}`")))
    };
    let non_empty = |given: Option<String>, field: &str| {
        let value = required(given, field)?;
        if value.is_empty() {
            return Err(ConfigError::at(format!("{path}.{field}"), "must not be empty"));
        }
        Ok(value)
    };
    Ok(match raw.source {
        KeySource::ClientAddress => KeyPart::ClientAddress,
        KeySource::XForwardedFor => KeyPart::XForwardedFor { trusted_hops: raw.trusted_hops.unwrap_or(0) },
        KeySource::Header => {
            let name = required(raw.name, "name")?;
            KeyPart::Header(header_name(&format!("{path}.name"), &name)?)
        }
        KeySource::Query => KeyPart::Query(non_empty(raw.name, "name")?),
        KeySource::Method => KeyPart::Method,
        KeySource::Path => KeyPart::Path,
        KeySource::Constant => KeyPart::Constant(required(raw.value, "value")?),
        KeySource::JwtClaim => KeyPart::JwtClaim(non_empty(raw.claim, "claim")?),
    })
}

/// A field that belongs to another source is refused, naming the one this source takes.
fn refuse_foreign_key_fields(path: &str, raw: &RawKeyPart) -> Result<(), ConfigError> {
    let present = [
        ("name", raw.name.is_some()),
        ("trusted_hops", raw.trusted_hops.is_some()),
        ("value", raw.value.is_some()),
        ("claim", raw.claim.is_some()),
    ];
    let takes = raw.source.field();
    for (field, is_present) in present {
        if is_present && takes != Some(field) {
            let it_takes = takes.map_or("no other field".to_owned(), |f| format!("`{f}`"));
            return Err(ConfigError::at(
                format!("{path}.{field}"),
                format!("not a field of source \"{}\" (it takes {it_takes})", raw.source.as_str()),
            ));
        }
    }
    Ok(())
}

/// Header names are matched lowercase, as Envoy stores them.
pub(crate) fn header_name(path: &str, name: &str) -> Result<String, ConfigError> {
    let token = |b: u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b);
    let body = name.strip_prefix(':').unwrap_or(name);
    if body.is_empty() || !body.bytes().all(token) {
        return Err(ConfigError::at(path, format!("must be an HTTP header name, got {name:?}")));
    }
    Ok(name.to_ascii_lowercase())
}

pub(crate) fn is_name(name: &str, extra: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name.chars().all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c) || extra.contains(c))
}

fn is_header_value(value: &str) -> bool {
    value.bytes().all(|b| b == b'\t' || (b' '..=b'~').contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> Result<Config, String> {
        Config::parse(json.as_bytes()).map_err(|e| e.to_string())
    }

    const MINIMAL: &str = r#"{"rules":[{"name":"r","key":[{"source":"header","name":"X-Key"}],"limit":{"capacity":10,"refill_period":"1m"}}]}"#;

    #[test]
    fn a_minimal_config_gets_the_documented_defaults() {
        let config = parse(MINIMAL).unwrap();
        assert_eq!(config.key_prefix, "ratelimit-wasm");
        assert_eq!(config.table_size, 65_536);
        assert_eq!(config.when_table_full, TableFullPolicy::Allow);
        assert_eq!(config.headers, HeaderFormat::Both);
        assert_eq!(config.deny.status, 429);
        let rule = &config.rules[0];
        assert_eq!(rule.key, vec![KeyPart::Header("x-key".into())]);
        assert_eq!(rule.when_key_missing, MissingKeyPolicy::Skip);
        assert_eq!(rule.cost, Cost::Constant(1));
        let Limits::List(limits) = &rule.limits else { panic!("one limit expected") };
        assert_eq!(limits[0].policy.as_deref(), Some("\"r\";q=10;w=60"));
        assert_eq!(config.status_path, None);
        assert_eq!(
            config.violation_log,
            ViolationLog { level: LogLevel::Info, max_per_second: 10, include_key: false }
        );
    }

    #[test]
    fn a_global_section_without_a_timeout_waits_100_ms() {
        let json = r#"{"global":{"cluster":"rls","domain":"d"},"rules":[{"name":"g","global":true,"key":[{"source":"method"}]}]}"#;
        assert_eq!(parse(json).unwrap().global.map(|g| g.timeout_ms), Some(100));
    }

    #[test]
    fn a_configuration_given_as_a_struct_is_recognised_and_the_fix_named() {
        // Struct { fields: {"rules": Value { string_value: "x" }} }, as Envoy passes it.
        let entry = [&[0x0a, 5][..], b"rules", &[0x12, 3, 0x1a, 1], b"x"].concat();
        let bytes = [&[0x0a, entry.len() as u8][..], &entry].concat();
        let err = Config::parse(&bytes).unwrap_err().to_string();
        assert!(err.contains("google.protobuf.StringValue"), "{err}");
        let plain = Config::parse(b"\n{oops").unwrap_err().to_string();
        assert!(plain.starts_with("invalid JSON"), "JSON after a newline is still JSON: {plain}");
    }

    #[test]
    fn whole_numbers_printed_as_floats_by_istio_are_read_as_integers() {
        let floats = MINIMAL
            .replace(r#""capacity":10"#, r#""capacity":10.0"#)
            .replace(r#"{"rules""#, r#"{"table_size":6.5536e4,"rules""#);
        let config = parse(&floats).unwrap();
        assert_eq!(config.table_size, 65_536);
        assert_eq!(config.rules[0].limits.all().next().map(|l| l.quota), Some(10));
        let half = MINIMAL.replace(r#""capacity":10"#, r#""capacity":10.5"#);
        assert!(
            parse(&half).unwrap_err().starts_with("rules[0].limit.capacity:"),
            "a fraction is still refused"
        );
    }

    #[test]
    fn every_key_source_parses() {
        let json = r#"{"rules":[{"name":"r","key":[
            {"source":"client_address"},{"source":"x_forwarded_for","trusted_hops":2},
            {"source":"header","name":"x-user"},{"source":"query","name":"api_key"},
            {"source":"method"},{"source":"path"},{"source":"constant","value":"c"}],
            "limit":{"capacity":1,"refill_period":"1s"}}]}"#;
        let key = parse(json).unwrap().rules.remove(0).key;
        assert_eq!(
            key,
            vec![
                KeyPart::ClientAddress,
                KeyPart::XForwardedFor { trusted_hops: 2 },
                KeyPart::Header("x-user".into()),
                KeyPart::Query("api_key".into()),
                KeyPart::Method,
                KeyPart::Path,
                KeyPart::Constant("c".into()),
            ]
        );
    }

    #[test]
    fn an_unknown_field_inside_a_key_part_is_refused() {
        let json = r#"{"rules":[{"name":"r","key":[{"source":"header","name":"x","nam":"y"}],"limit":{"capacity":1,"refill_period":"1s"}}]}"#;
        assert!(parse(json).unwrap_err().starts_with("rules[0].key[0].nam: unknown field `nam`"));
    }

    #[test]
    fn a_cluster_name_that_cannot_be_an_authority_gets_istios_host_part_as_one() {
        let global = |g: &str| {
            let json = format!(
                r#"{{"global":{g},"rules":[{{"name":"r","global":true,"key":[{{"source":"method"}}]}}]}}"#
            );
            Config::parse(json.as_bytes()).unwrap().global.unwrap().authority
        };
        assert_eq!(global(r#"{"cluster":"ratelimit_service","domain":"d"}"#), None);
        assert_eq!(
            global(r#"{"cluster":"outbound|8081||ratelimit.ns.svc.cluster.local","domain":"d"}"#).as_deref(),
            Some("ratelimit.ns.svc.cluster.local")
        );
        assert_eq!(global(r#"{"cluster":"a|b|","domain":"d"}"#).as_deref(), Some("ratelimit"));
        assert_eq!(
            global(r#"{"cluster":"a|b","authority":"rls:8081","domain":"d"}"#).as_deref(),
            Some("rls:8081")
        );
    }
}
