//! Quota leases: what a caller asks for on `ShouldRateLimit` (request metadata), the lease ids,
//! and the messages of our own `ratelimitwasm.lease.v1.Leases/Return`.
//!
//! The ask travels as metadata rather than in the request message so that the request stays a
//! standard `RateLimitRequest`: a service that does not know leases (envoyproxy/ratelimit,
//! Limitador) ignores the header and answers as usual, and the filter then makes a call per
//! request.

use std::collections::hash_map::RandomState;
use std::fmt;
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

use envoy_types::pb::envoy::extensions::common::ratelimit::v3::RateLimitDescriptor;
use tonic::metadata::MetadataMap;

/// The most extra units a caller asks for: `x-ratelimit-wasm-lease: <K>`.
pub const LEASE_HEADER: &str = "x-ratelimit-wasm-lease";
/// How long the lease may live at most, in ms: `x-ratelimit-wasm-lease-validity-ms: <ms>`.
pub const VALIDITY_HEADER: &str = "x-ratelimit-wasm-lease-validity-ms";

pub const MAX_LEASE_UNITS: u64 = 100_000;
pub const MAX_VALIDITY_MS: u64 = 3_600_000;
pub const DEFAULT_VALIDITY_MS: u64 = 10_000;
/// Longest lease id accepted by `Return`; ours are 49 bytes at most.
pub const MAX_ID_BYTES: usize = 128;

pub const SERVICE_NAME: &str = "ratelimitwasm.lease.v1.Leases";
pub const RETURN_PATH: &str = "/ratelimitwasm.lease.v1.Leases/Return";

/// A caller's lease request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LeaseAsk {
    /// 1..=`MAX_LEASE_UNITS`.
    pub units: u64,
    /// 1..=`MAX_VALIDITY_MS`.
    pub validity_ms: u64,
}

/// A lease header with a value outside its range; the text names the header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeaseHeaderError {
    pub header: &'static str,
    pub value: String,
    pub max: u64,
}

impl fmt::Display for LeaseHeaderError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {:?} is not an integer from 1 to {}", self.header, self.value, self.max)
    }
}

impl std::error::Error for LeaseHeaderError {}

fn parse_header(meta: &MetadataMap, header: &'static str, max: u64) -> Result<Option<u64>, LeaseHeaderError> {
    let Some(v) = meta.get(header) else { return Ok(None) };
    let bad = || LeaseHeaderError {
        header,
        value: String::from_utf8_lossy(v.as_bytes()).chars().take(32).collect(),
        max,
    };
    let text = v.to_str().map_err(|_| bad())?;
    // Digits only: `u64::from_str` would also take a leading `+`.
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    match text.parse::<u64>() {
        Ok(n) if (1..=max).contains(&n) => Ok(Some(n)),
        _ => Err(bad()),
    }
}

/// The lease a call asks for, if any. The validity header alone asks for nothing (and is not
/// looked at), so a call without the lease header is answered exactly as before leases.
pub fn lease_ask(meta: &MetadataMap) -> Result<Option<LeaseAsk>, LeaseHeaderError> {
    let Some(units) = parse_header(meta, LEASE_HEADER, MAX_LEASE_UNITS)? else { return Ok(None) };
    let validity_ms = parse_header(meta, VALIDITY_HEADER, MAX_VALIDITY_MS)?.unwrap_or(DEFAULT_VALIDITY_MS);
    Ok(Some(LeaseAsk { units, validity_ms }))
}

/// A new lease id: 128 random bits per process (from the OS, through `RandomState`), then a
/// counter, so ids are unique across grants, restarts and service instances sharing one Redis.
pub fn new_id() -> String {
    static SEED: OnceLock<(u64, u64)> = OnceLock::new();
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let (a, b) = *SEED.get_or_init(|| {
        let draw = || {
            let mut h = RandomState::new().build_hasher();
            h.write_u64(std::process::id().into());
            h.finish()
        };
        (draw(), draw())
    });
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("{a:016x}{b:016x}-{n:x}")
}

/// Whether `id` can be a lease id: it becomes part of a Redis key, so only short, plain ids.
pub fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_ID_BYTES
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// `Return` request: give back unused units of lease `id`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ReturnRequest {
    #[prost(string, tag = "1")]
    pub domain: String,
    /// The descriptors of the `ShouldRateLimit` call that granted the lease.
    #[prost(message, repeated, tag = "2")]
    pub descriptors: Vec<RateLimitDescriptor>,
    /// `Quota.id` of the grant.
    #[prost(string, tag = "3")]
    pub id: String,
    /// Units not spent.
    #[prost(uint64, tag = "4")]
    pub units: u64,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct ReturnResponse {
    /// Units given back (to each descriptor of the lease; the largest amount if they differ).
    #[prost(uint64, tag = "1")]
    pub refunded: u64,
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Request metadata made of `pairs` (name, value), for the header parsers' tests.
    pub(crate) fn meta(pairs: &[(&'static str, &str)]) -> MetadataMap {
        let mut m = MetadataMap::new();
        for (k, v) in pairs {
            m.insert(*k, v.parse().unwrap());
        }
        m
    }

    #[test]
    fn the_lease_header_asks_with_a_default_validity() {
        assert_eq!(lease_ask(&meta(&[])), Ok(None));
        assert_eq!(lease_ask(&meta(&[(VALIDITY_HEADER, "junk")])), Ok(None));
        assert_eq!(
            lease_ask(&meta(&[(LEASE_HEADER, "4")])),
            Ok(Some(LeaseAsk { units: 4, validity_ms: DEFAULT_VALIDITY_MS }))
        );
        assert_eq!(
            lease_ask(&meta(&[(LEASE_HEADER, "100000"), (VALIDITY_HEADER, "3600000")])),
            Ok(Some(LeaseAsk { units: 100_000, validity_ms: 3_600_000 }))
        );
    }

    #[test]
    fn values_out_of_range_are_errors_naming_the_header() {
        for v in ["0", "100001", "-1", "+4", "4.0", " 4", "", "18446744073709551616", "x"] {
            let e = lease_ask(&meta(&[(LEASE_HEADER, v)])).unwrap_err();
            assert_eq!(e.header, LEASE_HEADER, "{v:?}");
            assert!(e.to_string().starts_with("x-ratelimit-wasm-lease: "), "{e}");
        }
        for v in ["0", "3600001", "1s"] {
            let e = lease_ask(&meta(&[(LEASE_HEADER, "1"), (VALIDITY_HEADER, v)])).unwrap_err();
            assert_eq!(e.header, VALIDITY_HEADER, "{v:?}");
        }
    }

    #[test]
    fn ids_are_unique_short_and_valid() {
        let a = new_id();
        let b = new_id();
        assert_ne!(a, b);
        assert!(valid_id(&a) && a.len() <= 49, "{a}");
        assert!(!valid_id(""));
        assert!(!valid_id("a}b"));
        assert!(!valid_id(&"a".repeat(MAX_ID_BYTES + 1)));
        assert!(valid_id(&"a".repeat(MAX_ID_BYTES)));
    }
}
