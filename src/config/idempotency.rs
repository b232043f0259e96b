//! `idempotency`: which requests carry an `Idempotency-Key` the filter enforces
//! (draft-ietf-httpapi-idempotency-key-header), how keys are scoped, and what is kept of a
//! completed response to replay.

use serde::Deserialize;

use super::duration::Duration;
use super::{
    check_name, compile_key_part, compile_optional_match, header_name, ConfigError, KeyPart, Matcher,
    MissingKeyPolicy, RawKeyPart, RawMatch, TableFullPolicy, MIN_TABLE_SIZE,
};
use crate::algorithm::time::NANOS_PER_SECOND;

pub const DEFAULT_IDEMPOTENCY_HEADER: &str = "idempotency-key";
const DEFAULT_TTL_NANOS: u64 = 86_400 * NANOS_PER_SECOND;
const DEFAULT_IN_FLIGHT_NANOS: u64 = 60 * NANOS_PER_SECOND;
pub const DEFAULT_IDEMPOTENCY_SLOTS: u32 = 1024;
pub const MAX_IDEMPOTENCY_SLOTS: u32 = 1 << 20;
const DEFAULT_MAX_BODY_BYTES: u32 = 4096;
/// A stored response is read whole by every request with its key: kept small.
pub const MAX_BODY_BYTES: u32 = 65_536;
const MAX_REPLAY_HEADERS: usize = 16;

/// One `idempotency` entry, compiled.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Idempotency {
    pub name: String,
    pub matcher: Matcher,
    /// The request header carrying the key (lowercase).
    pub header: String,
    /// What a key is qualified by, so one tenant's key never meets another's.
    pub scope: Vec<KeyPart>,
    pub when_scope_missing: MissingKeyPolicy,
    /// A matching request without the header is refused (400) instead of passed unprotected.
    pub required: bool,
    /// How long a completed request's key is remembered.
    pub ttl_nanos: u64,
    /// How long a key stays claimed by a request that never completes (an Envoy that died).
    pub in_flight_nanos: u64,
    /// Keep completed responses (status, `replay_headers`, body up to `max_body_bytes`) to replay.
    pub store_responses: bool,
    pub max_body_bytes: u32,
    pub replay_headers: Vec<String>,
    /// What a retry of a completed request whose response was not kept gets.
    pub when_not_stored: NotStoredPolicy,
    /// A request that fails (5xx, or no complete response) frees its key for a retry.
    pub release_on_failure: bool,
    pub table_size: u32,
    pub when_table_full: TableFullPolicy,
    /// Where keys are kept: this Envoy's shared data, or the rate limit service (every Envoy).
    pub across: Across,
    /// With keys kept by the service: what a request does when the service cannot answer.
    pub when_service_fails: TableFullPolicy,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Across {
    /// This Envoy's shared data: one request per key per Envoy.
    Envoy,
    /// The rate limit service (`global.cluster`): one request per key across the fleet.
    Fleet,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NotStoredPolicy {
    /// 409, as for a request still in flight.
    Conflict,
    /// Let it through to the upstream again.
    Pass,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawIdempotency {
    name: String,
    #[serde(default, rename = "match")]
    matcher: Option<RawMatch>,
    #[serde(default)]
    header: Option<String>,
    scope: Vec<RawKeyPart>,
    #[serde(default)]
    when_scope_missing: Option<MissingKeyPolicy>,
    #[serde(default)]
    required: bool,
    #[serde(default)]
    ttl: Option<Duration>,
    #[serde(default)]
    in_flight_timeout: Option<Duration>,
    #[serde(default)]
    store_responses: Option<bool>,
    #[serde(default)]
    max_body_bytes: Option<u32>,
    #[serde(default)]
    replay_headers: Option<Vec<String>>,
    #[serde(default)]
    when_not_stored: Option<NotStoredPolicy>,
    #[serde(default)]
    release_on_failure: Option<bool>,
    #[serde(default)]
    table_size: Option<u32>,
    #[serde(default)]
    when_table_full: Option<TableFullPolicy>,
    #[serde(default)]
    across: Option<Across>,
    #[serde(default)]
    when_service_fails: Option<TableFullPolicy>,
}

/// Compiles the `idempotency` list; names are unique among its entries.
pub(super) fn compile_all(
    raw: Vec<RawIdempotency>,
    has_service: bool,
) -> Result<Vec<Idempotency>, ConfigError> {
    let mut compiled: Vec<Idempotency> = Vec::with_capacity(raw.len());
    for (i, entry) in raw.into_iter().enumerate() {
        let path = format!("idempotency[{i}]");
        let entry = compile(&path, entry)?;
        if entry.across == Across::Fleet && !has_service {
            return Err(ConfigError::at(
                format!("{path}.across"),
                "\"fleet\" keeps keys in the rate limit service: it needs the top-level \"global\" section (cluster, domain)",
            ));
        }
        if let Some(j) = compiled.iter().position(|e| e.name == entry.name) {
            return Err(ConfigError::at(
                format!("{path}.name"),
                format!("duplicate name {:?} (also idempotency[{j}])", entry.name),
            ));
        }
        compiled.push(entry);
    }
    Ok(compiled)
}

fn compile(path: &str, raw: RawIdempotency) -> Result<Idempotency, ConfigError> {
    check_name(path, &raw.name)?;
    let matcher = compile_optional_match(path, raw.matcher)?;
    let header = match raw.header {
        Some(h) => header_name(&format!("{path}.header"), &h)?,
        None => DEFAULT_IDEMPOTENCY_HEADER.to_owned(),
    };
    if raw.scope.is_empty() {
        return Err(ConfigError::at(
            format!("{path}.scope"),
            "at least one key part is required, so one client's key cannot meet another's (e.g. {\"source\": \"header\", \"name\": \"x-api-key\"}; {\"source\": \"constant\", \"value\": \"all\"} shares keys between everybody)",
        ));
    }
    let mut scope = Vec::with_capacity(raw.scope.len());
    for (j, part) in raw.scope.into_iter().enumerate() {
        scope.push(compile_key_part(&format!("{path}.scope[{j}]"), part)?);
    }
    let max_body_bytes = raw.max_body_bytes.unwrap_or(DEFAULT_MAX_BODY_BYTES);
    if max_body_bytes > MAX_BODY_BYTES {
        return Err(ConfigError::at(
            format!("{path}.max_body_bytes"),
            format!("must be at most {MAX_BODY_BYTES}, got {max_body_bytes}"),
        ));
    }
    let table_size = raw.table_size.unwrap_or(DEFAULT_IDEMPOTENCY_SLOTS);
    if !(MIN_TABLE_SIZE..=MAX_IDEMPOTENCY_SLOTS).contains(&table_size) {
        return Err(ConfigError::at(
            format!("{path}.table_size"),
            format!("must be between {MIN_TABLE_SIZE} and {MAX_IDEMPOTENCY_SLOTS}, got {table_size}"),
        ));
    }
    let ttl_nanos = raw.ttl.map_or(DEFAULT_TTL_NANOS, |d| d.as_nanos());
    let in_flight_nanos = raw.in_flight_timeout.map_or(DEFAULT_IN_FLIGHT_NANOS, |d| d.as_nanos());
    Ok(Idempotency {
        name: raw.name,
        matcher,
        header,
        scope,
        when_scope_missing: raw.when_scope_missing.unwrap_or(MissingKeyPolicy::Skip),
        required: raw.required,
        ttl_nanos,
        in_flight_nanos,
        store_responses: raw.store_responses.unwrap_or(true),
        max_body_bytes,
        replay_headers: compile_replay_headers(path, raw.replay_headers)?,
        when_not_stored: raw.when_not_stored.unwrap_or(NotStoredPolicy::Conflict),
        release_on_failure: raw.release_on_failure.unwrap_or(true),
        table_size,
        when_table_full: raw.when_table_full.unwrap_or(TableFullPolicy::Allow),
        across: raw.across.unwrap_or(Across::Envoy),
        when_service_fails: raw.when_service_fails.unwrap_or(TableFullPolicy::Allow),
    })
}

fn compile_replay_headers(path: &str, raw: Option<Vec<String>>) -> Result<Vec<String>, ConfigError> {
    let Some(names) = raw else { return Ok(vec!["content-type".to_owned()]) };
    if names.len() > MAX_REPLAY_HEADERS {
        return Err(ConfigError::at(
            format!("{path}.replay_headers"),
            format!("at most {MAX_REPLAY_HEADERS} header names, got {}", names.len()),
        ));
    }
    let mut compiled = Vec::with_capacity(names.len());
    for (j, name) in names.iter().enumerate() {
        let here = format!("{path}.replay_headers[{j}]");
        let name = header_name(&here, name)?;
        if name.starts_with(':') || FRAMING.contains(&name.as_str()) {
            return Err(ConfigError::at(
                here,
                format!("{name:?} describes one response's framing and is never replayed"),
            ));
        }
        compiled.push(name);
    }
    Ok(compiled)
}

/// Headers Envoy sets for the reply it sends; a stored copy would contradict them.
const FRAMING: &[&str] =
    &["content-length", "transfer-encoding", "connection", "keep-alive", "upgrade", "te", "trailer"];
