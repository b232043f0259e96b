//! The replies the filter sends itself instead of passing a request on: the deny response, the
//! status endpoint's answer, and the status endpoint's failure.

use std::borrow::Cow;

use super::headers::{render, LimitReport};
use crate::config::Config;

/// A response the filter sends in place of the upstream's.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LocalReply<'a> {
    pub status: u32,
    pub headers: Vec<(Cow<'a, str>, Cow<'a, str>)>,
    pub body: Cow<'a, [u8]>,
    /// For a gRPC request, the `grpc-status` to send (else Envoy maps the HTTP status).
    pub grpc_status: Option<u32>,
}

/// The configured deny response with the limit headers, `Retry-After` when retrying can help, and
/// `x-ratelimit-reason` when the request can never pass.
pub fn deny<'a>(
    config: &'a Config,
    report: Option<&LimitReport<'_>>,
    retry_after_seconds: Option<u64>,
    reason: Option<String>,
) -> LocalReply<'a> {
    let rendered = render(config.headers, report, retry_after_seconds);
    let mut headers: Vec<(Cow<'a, str>, Cow<'a, str>)> = Vec::with_capacity(rendered.len() + 2);
    headers.push((Cow::Borrowed("content-type"), Cow::Borrowed(config.deny.content_type.as_str())));
    headers.extend(rendered.into_iter().map(|(name, value)| (Cow::Borrowed(name), Cow::Owned(value))));
    if let Some(reason) = reason {
        headers.push((Cow::Borrowed("x-ratelimit-reason"), Cow::Owned(reason)));
    }
    LocalReply {
        status: config.deny.status,
        headers,
        body: Cow::Borrowed(config.deny.body.as_bytes()),
        grpc_status: Some(config.deny.grpc_status),
    }
}

/// The status endpoint's JSON.
pub fn status(json: String) -> LocalReply<'static> {
    LocalReply {
        status: 200,
        headers: vec![
            (Cow::Borrowed("content-type"), Cow::Borrowed("application/json")),
            (Cow::Borrowed("cache-control"), Cow::Borrowed("no-store")),
        ],
        body: Cow::Owned(json.into_bytes()),
        grpc_status: None,
    }
}

/// The status endpoint when shared data cannot be read.
pub fn status_unavailable() -> LocalReply<'static> {
    LocalReply {
        status: 503,
        headers: vec![(Cow::Borrowed("content-type"), Cow::Borrowed("text/plain"))],
        body: Cow::Borrowed(b"rate limit status unavailable\n"),
        grpc_status: None,
    }
}

impl<'a> LocalReply<'a> {
    /// Adds the rate limit service's headers; the service's figures win over ours: a header of
    /// ours with a name the service sends is left out.
    pub fn with_service_headers(mut self, service: Vec<(String, String)>) -> LocalReply<'a> {
        if service.is_empty() {
            return self;
        }
        self.headers.retain(|(name, _)| !service.iter().any(|(n, _)| n.eq_ignore_ascii_case(name)));
        self.headers.extend(service.into_iter().map(|(name, value)| (Cow::Owned(name), Cow::Owned(value))));
        self
    }
}

/// Why a request with an idempotency key is refused (draft-ietf-httpapi-idempotency-key-header).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyRefusal {
    /// 400: the route requires a key and the request has none, or not a well-formed one.
    Missing,
    /// 409: a request with the same key is in flight (or completed, its response not kept).
    InUse,
    /// 422: the key was used for another request.
    Reused,
    /// 503: the key cannot be tracked (its slot is full of live keys and `when_table_full` is
    /// `deny`).
    Full,
}

/// The refusal as an RFC 9457 problem document.
pub fn key_refusal(refusal: KeyRefusal, header: &str) -> LocalReply<'static> {
    let (status, title, detail) = match refusal {
        KeyRefusal::Missing => (400, "Idempotency-Key is missing", "This operation requires one well-formed key"),
        KeyRefusal::InUse => (409, "A request is outstanding for this Idempotency-Key", "A request with the same key is being processed, or was processed and its response was not kept; retry later or with a new key"),
        KeyRefusal::Reused => (422, "Idempotency-Key is already used", "The key was used for another request (method or path); use a new key"),
        KeyRefusal::Full => (503, "Idempotency-Key cannot be tracked now", "Too many keys are live; retry later"),
    };
    // Every part is a fixed text or a header name (a token): nothing to escape.
    let body = format!(r#"{{"title":"{title}","status":{status},"detail":"{detail}","header":"{header}"}}"#);
    LocalReply {
        status,
        headers: vec![(Cow::Borrowed("content-type"), Cow::Borrowed("application/problem+json"))],
        body: Cow::Owned(body.into_bytes()),
        grpc_status: None,
    }
}

/// A completed request's response, replayed to its retry, marked as a replay.
pub fn replay(status: u16, headers: Vec<(String, String)>, body: Vec<u8>) -> LocalReply<'static> {
    let mut all: Vec<(Cow<'static, str>, Cow<'static, str>)> =
        headers.into_iter().map(|(n, v)| (Cow::Owned(n), Cow::Owned(v))).collect();
    all.push((Cow::Borrowed("idempotent-replayed"), Cow::Borrowed("true")));
    LocalReply { status: u32::from(status), headers: all, body: Cow::Owned(body), grpc_status: None }
}
