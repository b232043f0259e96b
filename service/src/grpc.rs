//! The gRPC face of `ShouldRateLimit`, written out instead of the generated server so that the
//! codec is ours: prost's answers an undecodable request (a non-UTF-8 string, a truncated message)
//! with INTERNAL and nothing counts it; this one answers INVALID_ARGUMENT, as for any other bad
//! request, and counts it in `grpc_errors_total`. Our own `ratelimitwasm.lease.v1.Leases/Return`
//! and `ratelimitwasm.idempotency.v1.Keys/Claim` and `/Complete` are served the same way, on the
//! same port.

use std::convert::Infallible;
use std::marker::PhantomData;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use envoy_types::pb::envoy::service::ratelimit::v3::{RateLimitRequest, RateLimitResponse};
use prost::bytes::Buf;
use prost::Message;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::codegen::{http, Body, BoxFuture, Service, StdError};
use tonic::metadata::MetadataMap;
use tonic::server::{NamedService, UnaryService};
use tonic::{Request, Response, Status};

use crate::idempotency::{self, ClaimRequest, ClaimResponse, CompleteRequest, CompleteResponse, Keys};
use crate::lease::{ReturnRequest, ReturnResponse};
use crate::metrics::Metrics;
use crate::service::Limiter;

pub const SERVICE_NAME: &str = "envoy.service.ratelimit.v3.RateLimitService";
const METHOD_PATH: &str = "/envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit";

/// The Rate Limit Service v3 server.
#[derive(Clone)]
pub struct RlsServer {
    pub limiter: Arc<Limiter>,
    /// Largest request message decoded (`--max-request-bytes`); a larger one is refused before
    /// prost allocates its descriptors.
    pub max_request_bytes: usize,
}

/// `ratelimitwasm.lease.v1.Leases`: one method, `Return` (see `Limiter::give_back`).
#[derive(Clone)]
pub struct LeaseServer {
    pub limiter: Arc<Limiter>,
    /// As for `RlsServer`: a `Return` carries the grant's descriptors.
    pub max_request_bytes: usize,
}

/// `ratelimitwasm.idempotency.v1.Keys`: `Claim` and `Complete` (see `idempotency`).
#[derive(Clone)]
pub struct KeysServer {
    pub keys: Arc<Keys>,
    /// As for `RlsServer` (a `Complete` carries up to 16 headers and a 64 KiB body).
    pub max_request_bytes: usize,
}

/// The answer to one HTTP/2 request of a gRPC call.
type Answer = BoxFuture<http::Response<tonic::body::Body>, Infallible>;

/// Makes `$server` a tonic service named `$name`, each call answered by its `route` method.
macro_rules! served_by_hand {
    ($server:ty, $name:expr) => {
        impl NamedService for $server {
            const NAME: &'static str = $name;
        }

        impl<B> Service<http::Request<B>> for $server
        where
            B: Body + Send + 'static,
            B::Error: Into<StdError> + Send + 'static,
        {
            type Response = http::Response<tonic::body::Body>;
            type Error = Infallible;
            type Future = Answer;

            fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
                Poll::Ready(Ok(()))
            }

            fn call(&mut self, req: http::Request<B>) -> Answer {
                self.route(req)
            }
        }
    };
}

served_by_hand!(RlsServer, SERVICE_NAME);
served_by_hand!(LeaseServer, crate::lease::SERVICE_NAME);
served_by_hand!(KeysServer, idempotency::SERVICE_NAME);

impl RlsServer {
    fn route<B: Body + Send + 'static>(&self, req: http::Request<B>) -> Answer
    where
        B::Error: Into<StdError> + Send + 'static,
    {
        match req.uri().path() {
            METHOD_PATH => {
                let (metrics, max_bytes) = (self.limiter.metrics.clone(), self.max_request_bytes);
                let codec = MessageCodec::new(metrics, max_bytes, |m| m.grpc_error("invalid_argument"));
                unary(codec, ShouldRateLimit(self.limiter.clone()), req)
            }
            _ => unknown_method(),
        }
    }
}

impl LeaseServer {
    fn route<B: Body + Send + 'static>(&self, req: http::Request<B>) -> Answer
    where
        B::Error: Into<StdError> + Send + 'static,
    {
        match req.uri().path() {
            crate::lease::RETURN_PATH => {
                let (metrics, max_bytes) = (self.limiter.metrics.clone(), self.max_request_bytes);
                let codec = MessageCodec::new(metrics, max_bytes, |m| m.lease_return("invalid_argument"));
                unary(codec, Return(self.limiter.clone()), req)
            }
            _ => unknown_method(),
        }
    }
}

impl KeysServer {
    fn route<B: Body + Send + 'static>(&self, req: http::Request<B>) -> Answer
    where
        B::Error: Into<StdError> + Send + 'static,
    {
        let (metrics, max_bytes) = (self.keys.metrics.clone(), self.max_request_bytes);
        match req.uri().path() {
            idempotency::CLAIM_PATH => {
                let codec =
                    MessageCodec::new(metrics, max_bytes, |m| m.idempotency_claim("invalid_argument"));
                unary(codec, Claim(self.keys.clone()), req)
            }
            idempotency::COMPLETE_PATH => {
                let codec =
                    MessageCodec::new(metrics, max_bytes, |m| m.idempotency_completion("invalid_argument"));
                unary(codec, Complete(self.keys.clone()), req)
            }
            _ => unknown_method(),
        }
    }
}

/// One unary call: `request` decoded by `codec`, answered by `service`.
fn unary<E, D, S, B>(codec: MessageCodec<E, D>, service: S, request: http::Request<B>) -> Answer
where
    E: Message + Send + 'static,
    D: Message + Default + Send + 'static,
    S: UnaryService<D, Response = E> + Send + 'static,
    S::Future: Send + 'static,
    B: Body + Send + 'static,
    B::Error: Into<StdError> + Send + 'static,
{
    Box::pin(async move { Ok(tonic::server::Grpc::new(codec).unary(service, request).await) })
}

fn unknown_method() -> Answer {
    Box::pin(async { Ok(Status::unimplemented("unknown method").into_http()) })
}

struct Claim(Arc<Keys>);

impl UnaryService<ClaimRequest> for Claim {
    type Response = ClaimResponse;
    type Future = BoxFuture<Response<ClaimResponse>, Status>;

    fn call(&mut self, request: Request<ClaimRequest>) -> Self::Future {
        let keys = self.0.clone();
        let budget = grpc_timeout(request.metadata());
        Box::pin(async move { keys.claim(request.into_inner(), budget).await.map(Response::new) })
    }
}

struct Complete(Arc<Keys>);

impl UnaryService<CompleteRequest> for Complete {
    type Response = CompleteResponse;
    type Future = BoxFuture<Response<CompleteResponse>, Status>;

    fn call(&mut self, request: Request<CompleteRequest>) -> Self::Future {
        let keys = self.0.clone();
        Box::pin(async move { keys.complete(request.into_inner()).await.map(Response::new) })
    }
}

struct Return(Arc<Limiter>);

impl UnaryService<ReturnRequest> for Return {
    type Response = ReturnResponse;
    type Future = BoxFuture<Response<ReturnResponse>, Status>;

    fn call(&mut self, request: Request<ReturnRequest>) -> Self::Future {
        let limiter = self.0.clone();
        Box::pin(async move { limiter.give_back(request.into_inner()).await.map(Response::new) })
    }
}

struct ShouldRateLimit(Arc<Limiter>);

impl UnaryService<RateLimitRequest> for ShouldRateLimit {
    type Response = RateLimitResponse;
    type Future = BoxFuture<Response<RateLimitResponse>, Status>;

    fn call(&mut self, request: Request<RateLimitRequest>) -> Self::Future {
        let limiter = self.0.clone();
        Box::pin(async move { limiter.answer(request).await.map(Response::new) })
    }
}

/// A prost codec that encodes `E` and decodes `D`: refuses a message over `max_bytes` before
/// decoding it, and answers an undecodable one INVALID_ARGUMENT, counted by `count_error`.
/// Public so that a client (the tests) can speak `Return` with the same messages.
pub struct MessageCodec<E, D> {
    metrics: Arc<Metrics>,
    max_bytes: usize,
    count_error: fn(&Metrics),
    _types: PhantomData<fn(E) -> D>,
}

impl<E, D> MessageCodec<E, D> {
    pub fn new(metrics: Arc<Metrics>, max_bytes: usize, count_error: fn(&Metrics)) -> Self {
        MessageCodec { metrics, max_bytes, count_error, _types: PhantomData }
    }
}

impl<E, D> Codec for MessageCodec<E, D>
where
    E: Message + Send + 'static,
    D: Message + Default + Send + 'static,
{
    type Encode = E;
    type Decode = D;
    type Encoder = MessageEncoder<E>;
    type Decoder = MessageDecoder<D>;

    fn encoder(&mut self) -> MessageEncoder<E> {
        MessageEncoder(PhantomData)
    }

    fn decoder(&mut self) -> MessageDecoder<D> {
        MessageDecoder {
            metrics: self.metrics.clone(),
            max_bytes: self.max_bytes,
            count_error: self.count_error,
            _type: PhantomData,
        }
    }
}

pub struct MessageEncoder<E>(PhantomData<fn(E)>);

impl<E: Message> Encoder for MessageEncoder<E> {
    type Item = E;
    type Error = Status;

    fn encode(&mut self, item: E, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        item.encode(dst).map_err(|e| Status::internal(format!("cannot encode the message: {e}")))
    }
}

pub struct MessageDecoder<D> {
    metrics: Arc<Metrics>,
    max_bytes: usize,
    count_error: fn(&Metrics),
    _type: PhantomData<fn() -> D>,
}

impl<D: Message + Default> Decoder for MessageDecoder<D> {
    type Item = D;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<D>, Status> {
        let len = src.remaining();
        if len > self.max_bytes {
            (self.count_error)(&self.metrics);
            return Err(Status::invalid_argument(format!(
                "the request is {len} bytes, at most {} allowed (--max-request-bytes)",
                self.max_bytes
            )));
        }
        D::decode(src).map(Some).map_err(|e| {
            (self.count_error)(&self.metrics);
            let name = std::any::type_name::<D>().rsplit("::").next().unwrap_or_default();
            Status::invalid_argument(format!("malformed {name}: {e}"))
        })
    }
}

/// The caller's deadline from its `grpc-timeout` header (`<digits><H|M|S|m|u|n>`, gRPC over
/// HTTP/2), so that scripts Redis runs after the caller gave up change nothing. Envoy sends its
/// rate limit filter's `timeout` (20 ms by default) this way.
pub fn grpc_timeout(meta: &MetadataMap) -> Option<Duration> {
    let v = meta.get("grpc-timeout")?.to_str().ok()?;
    let (digits, unit) = v.split_at(v.len().checked_sub(1)?);
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.saturating_mul(3600)),
        "M" => Duration::from_secs(n.saturating_mul(60)),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn timeout(v: &str) -> Option<Duration> {
        let mut m = MetadataMap::new();
        m.insert("grpc-timeout", v.parse().unwrap());
        grpc_timeout(&m)
    }

    #[test]
    fn grpc_timeout_header_units() {
        assert_eq!(timeout("20m"), Some(Duration::from_millis(20)));
        assert_eq!(timeout("2S"), Some(Duration::from_secs(2)));
        assert_eq!(timeout("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(timeout("3M"), Some(Duration::from_secs(180)));
        assert_eq!(timeout("150u"), Some(Duration::from_micros(150)));
        assert_eq!(timeout("7n"), Some(Duration::from_nanos(7)));
        assert_eq!(timeout("5x"), None);
        assert_eq!(timeout("m"), None);
        assert_eq!(grpc_timeout(&MetadataMap::new()), None);
    }
}
