//! The request: what the rules may read from it (the seam), which rules apply ([`matching`]), its
//! key under each rule ([`keys`], [`jwt`]), and its plan and cost ([`plan`]).

pub mod jwt;
pub mod keys;
pub mod matching;
pub mod plan;

#[cfg(any(test, feature = "testing"))]
use std::collections::HashMap;

/// A read-only view of the request being decided. The wasm glue implements it with host calls;
/// tests use [`TestRequest`].
pub trait Request {
    /// The value of a request header (lowercase name; pseudo-headers such as `:path` included),
    /// as raw bytes: header values need not be UTF-8.
    fn header(&self, name: &str) -> Option<Vec<u8>>;
    /// Envoy's `source.address` property: `ip:port` of the downstream peer.
    fn source_address(&self) -> Option<Vec<u8>>;
}

/// The upstream's response headers, as the settle moment reads them (for a cost charged from the
/// response). Tests use [`TestRequest`]'s headers.
pub trait Response {
    fn header(&self, name: &str) -> Option<Vec<u8>>;
}

/// The request as the moments after its headers went on see it: Envoy lets a filter read the
/// request's headers only until it lets them go on, so the response's moments (settle, trailers,
/// end) must have taken what they need before. Reads nothing.
pub struct HeadersGone;

impl Request for HeadersGone {
    fn header(&self, _name: &str) -> Option<Vec<u8>> {
        None
    }

    fn source_address(&self) -> Option<Vec<u8>> {
        None
    }
}

/// A request built in memory (built for tests and with the `testing` feature only).
#[cfg(any(test, feature = "testing"))]
#[derive(Clone, Debug, Default)]
pub struct TestRequest {
    headers: HashMap<String, Vec<u8>>,
    source: Option<Vec<u8>>,
}

#[cfg(any(test, feature = "testing"))]
impl TestRequest {
    pub fn get(path: &str) -> TestRequest {
        TestRequest::default().with_header(":method", "GET").with_header(":path", path)
    }

    pub fn with_header(mut self, name: &str, value: impl AsRef<[u8]>) -> TestRequest {
        self.headers.insert(name.to_ascii_lowercase(), value.as_ref().to_vec());
        self
    }

    pub fn with_source(mut self, address: &str) -> TestRequest {
        self.source = Some(address.as_bytes().to_vec());
        self
    }
}

#[cfg(any(test, feature = "testing"))]
impl Request for TestRequest {
    fn header(&self, name: &str) -> Option<Vec<u8>> {
        self.headers.get(name).cloned()
    }

    fn source_address(&self) -> Option<Vec<u8>> {
        self.source.clone()
    }
}

#[cfg(any(test, feature = "testing"))]
impl Response for TestRequest {
    fn header(&self, name: &str) -> Option<Vec<u8>> {
        self.headers.get(name).cloned()
    }
}
