//! Reading the service's answer, and why a call may give none.

use std::fmt;

use prost::Message;

use super::protocol::{unit_seconds, RateLimitResponse, CODE_OVER_LIMIT};

/// Why a call to the rate limit service gave no usable answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CallError {
    /// The host refused to start the call (e.g. no such cluster).
    CannotCall { cluster: String, host_status: u32 },
    /// The call ended with this gRPC status (timeout, unavailable, ...).
    Status(u32),
    /// The answer is not a `RateLimitResponse`.
    Undecodable(prost::DecodeError),
    /// The answer is larger than [`MAX_ANSWER_BYTES`]; it is not read.
    TooLarge { bytes: usize },
}

/// The largest answer read from the service: an answer for every descriptor a request can carry
/// is a few KiB, and the host copies an answer into the VM's memory before the filter sees it.
pub const MAX_ANSWER_BYTES: usize = 64 * 1024;

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
            CallError::CannotCall { cluster, host_status } => {
                write!(f, "cannot call cluster {cluster:?} (host status {host_status})")
            }
            CallError::Status(status) => write!(f, "gRPC status {status}{}", grpc_status_hint(*status)),
            CallError::Undecodable(e) => write!(f, "undecodable response: {e}"),
            CallError::TooLarge { bytes } => {
                write!(f, "answer of {bytes} bytes, larger than the {MAX_ANSWER_BYTES} read")
            }
        }
    }
}

fn grpc_status_hint(status: u32) -> &'static str {
    match status {
        4 => " (deadline exceeded: no answer within the timeout)",
        14 => " (unavailable: the service is down or unreachable, or gave no answer within the timeout)",
        _ => "",
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
pub fn read_answer(body: &[u8]) -> Result<Answer, CallError> {
    let response = RateLimitResponse::decode(body).map_err(CallError::Undecodable)?;
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
