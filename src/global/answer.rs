//! Reading the service's answer, and why a call may give none.

use std::fmt;

use prost::Message;

use super::protocol::{unit_seconds, HeaderValue, Quota, RateLimitResponse, CODE_OVER_LIMIT};

/// Why a call to the rate limit service gave no usable answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CallError {
    /// The host refused to start the call; `host_status` is proxy-wasm's result code.
    CannotCall { cluster: String, host_status: u32 },
    /// The call ended with gRPC status `code`; `message` is Envoy's (e.g. why a connection failed),
    /// empty when it gave none.
    Status { code: u32, message: String },
    /// The answer is not a `RateLimitResponse`.
    Undecodable(prost::DecodeError),
    /// The answer is larger than [`MAX_ANSWER_BYTES`]; it is not read.
    TooLarge { bytes: usize },
}

/// The largest answer read from the service: an answer for every descriptor a request can carry
/// is a few KiB, and the host copies an answer into the VM's memory before the filter sees it.
pub const MAX_ANSWER_BYTES: usize = 64 * 1024;

/// proxy-wasm's `ParseFailure`: what Envoy answers a gRPC call to a cluster it does not have.
const NO_SUCH_CLUSTER: u32 = 4;

/// Whether an answer of `bytes` may be read at all.
pub fn answer_size(bytes: usize) -> Result<usize, CallError> {
    if bytes > MAX_ANSWER_BYTES {
        return Err(CallError::TooLarge { bytes });
    }
    Ok(bytes)
}

impl fmt::Display for CallError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CallError::CannotCall { cluster, host_status: NO_SUCH_CLUSTER } => write!(
                f,
                "this Envoy has no cluster named {cluster:?}: define it (HTTP/2, see the README's global section) or fix global.cluster"
            ),
            CallError::CannotCall { cluster, host_status } => {
                write!(f, "Envoy refused to call cluster {cluster:?} (proxy-wasm result {host_status})")
            }
            CallError::Status { code, message } => {
                write!(f, "gRPC status {code}{}", grpc_status_hint(*code))?;
                if !message.is_empty() {
                    write!(f, ": {message}")?;
                }
                Ok(())
            }
            CallError::Undecodable(e) => write!(f, "undecodable response: {e}"),
            CallError::TooLarge { bytes } => {
                write!(f, "answer of {bytes} bytes, larger than the {MAX_ANSWER_BYTES} read")
            }
        }
    }
}

/// What a gRPC status means here, and where to look.
fn grpc_status_hint(status: u32) -> &'static str {
    match status {
        4 => " DEADLINE_EXCEEDED (no answer within global.timeout)",
        12 => " UNIMPLEMENTED (the cluster reaches a server that is not a rate limit service: wrong port?)",
        13 => " INTERNAL (the service failed, or answered something that is not gRPC)",
        14 => " UNAVAILABLE (the service is down or unreachable, or the cluster does not speak HTTP/2: Envoy's reason follows)",
        16 => " UNAUTHENTICATED (the service wants credentials)",
        _ => "",
    }
}

/// What the service's answer means for the request.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Answer {
    pub over_limit: bool,
    /// (descriptor index, status) for statuses that carry a limit.
    pub limits: Vec<(usize, LimitStatus)>,
    /// Headers (name, value) the service asks to add to the client's response, as checked by
    /// [`service_header`].
    pub response_headers: Vec<(String, String)>,
    /// Headers the service asks to add to the request sent upstream.
    pub request_headers: Vec<(String, String)>,
    /// Units the service granted to spend here, when every descriptor carries a quota.
    pub grant: Option<Grant>,
}

/// A lease as the service granted it: the same units for every descriptor of the call.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Grant {
    pub units: u64,
    pub id: String,
    /// `valid_until`, nanoseconds since the epoch on the service's clock.
    pub valid_until: Option<u64>,
    /// The soonest of the descriptors' `duration_until_reset`, in nanoseconds.
    pub reset_nanos: Option<u64>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LimitStatus {
    pub over_limit: bool,
    pub quota: u64,
    pub window_seconds: u64,
    pub remaining: u64,
    pub reset_seconds: u64,
}

/// At most this many headers of each list are taken from one answer; the rest are dropped.
pub const MAX_SERVICE_HEADERS: usize = 16;
/// A longer header value from the service is dropped.
pub const MAX_SERVICE_HEADER_VALUE: usize = 4096;

/// Decodes a `RateLimitResponse`.
pub fn read_answer(body: &[u8]) -> Result<Answer, CallError> {
    let response = RateLimitResponse::decode(body).map_err(CallError::Undecodable)?;
    let limits = response
        .statuses
        .iter()
        .enumerate()
        .filter_map(|(i, s)| {
            let limit = s.current_limit.as_ref()?;
            let window_seconds = unit_seconds(limit.unit);
            // Without the service's reset, the window is the longest it can be: never earlier.
            let reset = s.duration_until_reset.as_ref().map_or(window_seconds, |d| {
                let secs = u64::try_from(d.seconds).unwrap_or(0);
                secs.saturating_add(u64::from(d.nanos > 0))
            });
            Some((
                i,
                LimitStatus {
                    over_limit: s.code == CODE_OVER_LIMIT,
                    quota: u64::from(limit.requests_per_unit),
                    window_seconds,
                    remaining: u64::from(s.limit_remaining),
                    reset_seconds: reset,
                },
            ))
        })
        .collect();
    let over_limit = response.overall_code == CODE_OVER_LIMIT;
    Ok(Answer {
        over_limit,
        limits,
        response_headers: service_headers(&response.response_headers_to_add),
        request_headers: service_headers(&response.request_headers_to_add),
        grant: if over_limit { None } else { grant(&response) },
    })
}

/// The lease in the answer: only when every descriptor carries a quota (a service that ignores
/// the ask carries none), for the fewest units any of them grants.
fn grant(response: &RateLimitResponse) -> Option<Grant> {
    let quotas: Vec<&Quota> = response.statuses.iter().map(|s| s.quota.as_ref()).collect::<Option<_>>()?;
    let units = quotas.iter().map(|q| u64::from(q.requests)).min().filter(|u| *u > 0)?;
    let nanos = |seconds: i64, nanos: i32| {
        let seconds = u64::try_from(seconds).ok()?;
        Some(seconds.saturating_mul(1_000_000_000).saturating_add(u64::try_from(nanos).unwrap_or(0)))
    };
    let valid_until =
        quotas.iter().filter_map(|q| q.valid_until.as_ref().and_then(|t| nanos(t.seconds, t.nanos))).min();
    let reset_nanos = response
        .statuses
        .iter()
        .filter_map(|s| s.duration_until_reset.as_ref().and_then(|d| nanos(d.seconds, d.nanos)))
        .min();
    Some(Grant { units, id: quotas.first()?.id.clone(), valid_until, reset_nanos })
}

fn service_headers(given: &[HeaderValue]) -> Vec<(String, String)> {
    given.iter().filter_map(service_header).take(MAX_SERVICE_HEADERS).collect()
}

/// The header as Envoy may be given it, or `None`: a name that is an HTTP token (no pseudo-header,
/// no framing header), lower-cased; a value of printable characters and tabs, at most
/// [`MAX_SERVICE_HEADER_VALUE`] bytes. `raw_value`, when set, is the value.
pub fn service_header(header: &HeaderValue) -> Option<(String, String)> {
    let name = header.key.to_ascii_lowercase();
    let token = |b: u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b);
    if name.is_empty() || !name.bytes().all(token) || FRAMING.contains(&name.as_str()) {
        return None;
    }
    let value = if header.raw_value.is_empty() {
        header.value.clone()
    } else {
        String::from_utf8(header.raw_value.clone()).ok()?
    };
    let printable = |c: char| c == '\t' || !c.is_control();
    if value.len() > MAX_SERVICE_HEADER_VALUE || !value.chars().all(printable) {
        return None;
    }
    Some((name, value))
}

/// Headers that frame the message: Envoy sets them, a service must not.
const FRAMING: &[&str] = &["content-length", "transfer-encoding", "connection", "host", "te", "upgrade"];
