//! Fleet-wide idempotency keys: `ratelimitwasm.idempotency.v1.Keys/Claim` and `/Complete`, our
//! own unary methods on the gRPC port (served by hand in `grpc`, like `Leases/Return`).
//!
//! One Redis hash per key, `<prefix>:idem:{<domain>:<key>}` (see `keys::idempotency_key`),
//! written only by the two scripts (`scripts::IDEM_CLAIM`, `scripts::IDEM_COMPLETE`), so a claim
//! and a completion are each one atomic step: of two concurrent claims of a fresh key exactly one
//! is `CLAIMED`, and only the claim's owner can complete or release it, while it is in flight.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use tonic::Status;

use crate::keys;
use crate::log::Throttle;
use crate::metrics::Metrics;
use crate::store::{ClaimOutcome, Completion, KeptResponse, Store};

pub const SERVICE_NAME: &str = "ratelimitwasm.idempotency.v1.Keys";
pub const CLAIM_PATH: &str = "/ratelimitwasm.idempotency.v1.Keys/Claim";
pub const COMPLETE_PATH: &str = "/ratelimitwasm.idempotency.v1.Keys/Complete";

/// Longest idempotency key, in bytes.
pub const MAX_KEY_BYTES: usize = 256;
/// Longest `request` and `owner`, in bytes.
pub const MAX_TOKEN_BYTES: usize = 64;
pub const MAX_IN_FLIGHT_MS: u64 = 86_400_000;
/// 31 days.
pub const MAX_TTL_MS: u64 = 2_678_400_000;
pub const MAX_HEADERS: usize = 16;
pub const MAX_HEADER_VALUE_BYTES: usize = 4096;
pub const MAX_BODY_BYTES: usize = 65_536;

#[derive(Clone, PartialEq, prost::Message)]
pub struct ClaimRequest {
    #[prost(string, tag = "1")]
    pub domain: String,
    #[prost(string, tag = "2")]
    pub key: String,
    #[prost(string, tag = "3")]
    pub request: String,
    #[prost(string, tag = "4")]
    pub owner: String,
    #[prost(uint64, tag = "5")]
    pub in_flight_ms: u64,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Header {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(string, tag = "2")]
    pub value: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct StoredResponse {
    #[prost(uint32, tag = "1")]
    pub status: u32,
    #[prost(message, repeated, tag = "2")]
    pub headers: Vec<Header>,
    #[prost(bytes = "vec", tag = "3")]
    pub body: Vec<u8>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct ClaimResponse {
    #[prost(enumeration = "claim_response::Outcome", tag = "1")]
    pub outcome: i32,
    #[prost(message, optional, tag = "2")]
    pub stored: Option<StoredResponse>,
}

pub mod claim_response {
    /// `ClaimResponse.Outcome`.
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
    #[repr(i32)]
    pub enum Outcome {
        Unknown = 0,
        Claimed = 1,
        InFlight = 2,
        Mismatch = 3,
        Completed = 4,
    }
}

pub use claim_response::Outcome;

#[derive(Clone, PartialEq, prost::Message)]
pub struct CompleteRequest {
    #[prost(string, tag = "1")]
    pub domain: String,
    #[prost(string, tag = "2")]
    pub key: String,
    #[prost(string, tag = "3")]
    pub owner: String,
    #[prost(bool, tag = "4")]
    pub release: bool,
    #[prost(uint64, tag = "5")]
    pub ttl_ms: u64,
    #[prost(message, optional, tag = "6")]
    pub stored: Option<StoredResponse>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct CompleteResponse {
    #[prost(bool, tag = "1")]
    pub done: bool,
}

/// What is wrong with a field of a request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Problem {
    /// Its length in bytes is outside `min..=max`.
    Length { got: usize, min: usize, max: usize },
    /// A byte other than `A-Z a-z 0-9 . _ : -`.
    Characters,
    /// A number outside `min..=max`.
    Range { got: u64, min: u64, max: u64 },
    /// More items than `max`.
    TooMany { got: usize, max: usize },
    /// Not an HTTP token (RFC 9110 `tchar`s, at least one).
    NotToken,
    /// A control character other than tab.
    NotPrintable,
}

/// A request field the service refuses; the text names the field (`stored.headers[2].name`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InvalidField {
    pub field: String,
    pub problem: Problem,
}

impl fmt::Display for InvalidField {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let field = &self.field;
        match &self.problem {
            Problem::Length { got, min, max } => {
                write!(f, "{field}: {got} bytes, must be {min} to {max}")
            }
            Problem::Characters => {
                write!(f, "{field}: only A-Z, a-z, 0-9, '.', '_', ':' and '-' are allowed")
            }
            Problem::Range { got, min, max } => write!(f, "{field}: {got}, must be {min} to {max}"),
            Problem::TooMany { got, max } => write!(f, "{field}: {got} given, at most {max} allowed"),
            Problem::NotToken => write!(f, "{field}: not an HTTP header name (token)"),
            Problem::NotPrintable => write!(f, "{field}: control characters other than tab are not allowed"),
        }
    }
}

impl std::error::Error for InvalidField {}

fn invalid(field: impl Into<String>, problem: Problem) -> InvalidField {
    InvalidField { field: field.into(), problem }
}

fn check_len(field: &str, v: &str, max: usize) -> Result<(), InvalidField> {
    if v.is_empty() || v.len() > max {
        return Err(invalid(field, Problem::Length { got: v.len(), min: 1, max }));
    }
    Ok(())
}

/// `key`, `request`, `owner`: 1..=`max` bytes of `A-Z a-z 0-9 . _ : -`.
fn check_plain(field: &str, v: &str, max: usize) -> Result<(), InvalidField> {
    check_len(field, v, max)?;
    if !v.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-')) {
        return Err(invalid(field, Problem::Characters));
    }
    Ok(())
}

fn check_range(field: &str, v: u64, min: u64, max: u64) -> Result<(), InvalidField> {
    if !(min..=max).contains(&v) {
        return Err(invalid(field, Problem::Range { got: v, min, max }));
    }
    Ok(())
}

fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// Checks a response to keep, and encodes it as the scripts store it.
pub fn kept_response(s: &StoredResponse) -> Result<KeptResponse, InvalidField> {
    check_range("stored.status", u64::from(s.status), 100, 599)?;
    if s.headers.len() > MAX_HEADERS {
        return Err(invalid("stored.headers", Problem::TooMany { got: s.headers.len(), max: MAX_HEADERS }));
    }
    if s.body.len() > MAX_BODY_BYTES {
        let got = s.body.len();
        return Err(invalid("stored.body", Problem::Length { got, min: 0, max: MAX_BODY_BYTES }));
    }
    let mut headers = String::new();
    for (i, h) in s.headers.iter().enumerate() {
        if h.name.is_empty() || !h.name.bytes().all(is_tchar) {
            return Err(invalid(format!("stored.headers[{i}].name"), Problem::NotToken));
        }
        let field = || format!("stored.headers[{i}].value");
        if h.value.len() > MAX_HEADER_VALUE_BYTES {
            let got = h.value.len();
            return Err(invalid(field(), Problem::Length { got, min: 0, max: MAX_HEADER_VALUE_BYTES }));
        }
        if h.value.chars().any(|c| c != '\t' && c.is_control()) {
            return Err(invalid(field(), Problem::NotPrintable));
        }
        if i > 0 {
            headers.push('\n');
        }
        headers.push_str(&h.name);
        headers.push(':');
        headers.push_str(&h.value);
    }
    Ok(KeptResponse { status: s.status, headers, body: s.body.clone() })
}

/// The response a completed record kept, as `Claim` answers it.
pub fn stored_response(k: KeptResponse) -> StoredResponse {
    let headers = k
        .headers
        .split('\n')
        .filter(|l| !l.is_empty())
        .map(|l| {
            let (name, value) = l.split_once(':').unwrap_or((l, ""));
            Header { name: name.to_string(), value: value.to_string() }
        })
        .collect();
    StoredResponse { status: k.status, headers, body: k.body }
}

/// The service side of the two methods.
pub struct Keys {
    pub store: Store,
    pub metrics: Arc<Metrics>,
    pub key_prefix: String,
    /// Longest domain, in bytes (`--max-value-bytes`, as for RLS domains).
    pub max_domain_bytes: usize,
}

static REDIS_ERROR_LOG: Throttle = Throttle::new(10_000);

fn unavailable(e: crate::store::StoreError) -> Status {
    if let Some(n) = REDIS_ERROR_LOG.allow() {
        crate::warn!("redis call failed, answering UNAVAILABLE: {e} ({n} similar errors not logged)");
    }
    Status::unavailable(format!("idempotency store unavailable: {e}"))
}

fn error_label(s: &Status) -> &'static str {
    match s.code() {
        tonic::Code::InvalidArgument => "invalid_argument",
        tonic::Code::Unavailable => "unavailable",
        _ => "other",
    }
}

impl Keys {
    fn record(&self, domain: &str, key: &str) -> Result<String, InvalidField> {
        check_len("domain", domain, self.max_domain_bytes)?;
        check_plain("key", key, MAX_KEY_BYTES)?;
        Ok(keys::idempotency_key(&self.key_prefix, domain, key))
    }

    /// `Claim`, counted by outcome. `budget`: the caller's gRPC deadline, if it said; a script
    /// Redis runs after it changes nothing (the caller has been answered UNAVAILABLE).
    pub async fn claim(&self, r: ClaimRequest, budget: Option<Duration>) -> Result<ClaimResponse, Status> {
        let result = self.claim_inner(r, budget).await;
        self.metrics.idempotency_claim(match &result {
            Ok(r) => match r.outcome() {
                Outcome::Claimed => "claimed",
                Outcome::InFlight => "in_flight",
                Outcome::Mismatch => "mismatch",
                Outcome::Completed => "completed",
                Outcome::Unknown => "other",
            },
            Err(s) => error_label(s),
        });
        result
    }

    async fn claim_inner(&self, r: ClaimRequest, budget: Option<Duration>) -> Result<ClaimResponse, Status> {
        let bad = |e: InvalidField| Status::invalid_argument(e.to_string());
        let record = self.record(&r.domain, &r.key).map_err(bad)?;
        check_plain("request", &r.request, MAX_TOKEN_BYTES).map_err(bad)?;
        check_plain("owner", &r.owner, MAX_TOKEN_BYTES).map_err(bad)?;
        check_range("in_flight_ms", r.in_flight_ms, 1, MAX_IN_FLIGHT_MS).map_err(bad)?;
        let deadline = self.store.deadline(budget);
        let found = self
            .store
            .idem_claim(&record, &r.request, &r.owner, r.in_flight_ms, deadline)
            .await
            .map_err(unavailable)?;
        let (outcome, stored) = match found {
            ClaimOutcome::Claimed => (Outcome::Claimed, None),
            ClaimOutcome::InFlight => (Outcome::InFlight, None),
            ClaimOutcome::Mismatch => (Outcome::Mismatch, None),
            ClaimOutcome::Completed(kept) => (Outcome::Completed, kept.map(stored_response)),
        };
        Ok(ClaimResponse { outcome: outcome as i32, stored })
    }

    /// `Complete`, counted by outcome (`done`, `not_owner`, or the error).
    pub async fn complete(&self, r: CompleteRequest) -> Result<CompleteResponse, Status> {
        let result = self.complete_inner(r).await;
        self.metrics.idempotency_completion(match &result {
            Ok(CompleteResponse { done: true }) => "done",
            Ok(CompleteResponse { done: false }) => "not_owner",
            Err(s) => error_label(s),
        });
        result
    }

    async fn complete_inner(&self, r: CompleteRequest) -> Result<CompleteResponse, Status> {
        let bad = |e: InvalidField| Status::invalid_argument(e.to_string());
        let record = self.record(&r.domain, &r.key).map_err(bad)?;
        check_plain("owner", &r.owner, MAX_TOKEN_BYTES).map_err(bad)?;
        let kept;
        let what = if r.release {
            // Freed: `ttl_ms` and `stored` have nothing to apply to.
            Completion::Release
        } else {
            check_range("ttl_ms", r.ttl_ms, 1, MAX_TTL_MS).map_err(bad)?;
            kept = r.stored.as_ref().map(kept_response).transpose().map_err(bad)?;
            Completion::Complete { ttl_ms: r.ttl_ms, kept: kept.as_ref() }
        };
        let done = self.store.idem_complete(&record, &r.owner, what).await.map_err(unavailable)?;
        Ok(CompleteResponse { done })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn response(headers: &[(&str, &str)], body: &[u8]) -> StoredResponse {
        StoredResponse {
            status: 201,
            headers: headers.iter().map(|(n, v)| Header { name: (*n).into(), value: (*v).into() }).collect(),
            body: body.to_vec(),
        }
    }

    #[test]
    fn kept_responses_round_trip() {
        for r in [
            response(&[], b""),
            response(
                &[("content-type", "application/json"), ("x-empty", ""), ("x-colon", "a: b:c\tz")],
                b"{}",
            ),
            response(&[("set-cookie", "a=1"), ("set-cookie", "b=2")], &[0, 10, 255]),
            response(&[("x-unicode", "caf\u{e9} \u{2603}")], b"\n\r\n"),
        ] {
            let kept = kept_response(&r).unwrap();
            assert_eq!(stored_response(kept), r);
        }
    }

    #[test]
    fn bad_stored_fields_are_named() {
        let field = |r: &StoredResponse| kept_response(r).unwrap_err().field;
        let mut r = response(&[], b"");
        r.status = 99;
        assert_eq!(field(&r), "stored.status");
        r.status = 600;
        assert_eq!(field(&r), "stored.status");
        let many: Vec<(&str, &str)> = vec![("a", "b"); MAX_HEADERS + 1];
        assert_eq!(field(&response(&many, b"")), "stored.headers");
        assert!(kept_response(&response(&many[..MAX_HEADERS], b"")).is_ok());
        assert_eq!(field(&response(&[("ok", "v"), ("bad name", "v")], b"")), "stored.headers[1].name");
        assert_eq!(field(&response(&[("a:b", "v")], b"")), "stored.headers[0].name");
        assert_eq!(field(&response(&[("", "v")], b"")), "stored.headers[0].name");
        assert_eq!(field(&response(&[("n", "a\nb")], b"")), "stored.headers[0].value");
        assert_eq!(field(&response(&[("n", "a\rb")], b"")), "stored.headers[0].value");
        assert_eq!(field(&response(&[("n", "\u{85}")], b"")), "stored.headers[0].value");
        let long = "v".repeat(MAX_HEADER_VALUE_BYTES + 1);
        assert_eq!(field(&response(&[("n", &long)], b"")), "stored.headers[0].value");
        assert!(kept_response(&response(&[("n", &long[1..])], b"")).is_ok());
        assert_eq!(field(&response(&[], &vec![0; MAX_BODY_BYTES + 1])), "stored.body");
        assert!(kept_response(&response(&[], &vec![0; MAX_BODY_BYTES])).is_ok());
    }

    #[test]
    fn plain_fields_take_only_their_characters_and_lengths() {
        assert!(check_plain("key", "Ab9._:-", MAX_KEY_BYTES).is_ok());
        assert!(check_plain("key", &"k".repeat(MAX_KEY_BYTES), MAX_KEY_BYTES).is_ok());
        for (v, p) in [
            ("", Problem::Length { got: 0, min: 1, max: MAX_KEY_BYTES }),
            (
                &"k".repeat(MAX_KEY_BYTES + 1) as &str,
                Problem::Length { got: 257, min: 1, max: MAX_KEY_BYTES },
            ),
            ("a b", Problem::Characters),
            ("a}", Problem::Characters),
            ("\u{e9}", Problem::Characters),
        ] {
            assert_eq!(check_plain("key", v, MAX_KEY_BYTES), Err(invalid("key", p)), "{v:?}");
        }
        let e = check_range("in_flight_ms", 0, 1, MAX_IN_FLIGHT_MS).unwrap_err();
        assert_eq!(e.to_string(), "in_flight_ms: 0, must be 1 to 86400000");
    }
}
