//! Bounds on one `ShouldRateLimit` request, checked before anything is looked up or counted.
//!
//! gRPC's 4 MiB message cap alone lets one call carry 100,000 descriptors: that many scripts, Redis
//! keys and futures, other callers held up and memory never returned. A request over any bound is
//! answered INVALID_ARGUMENT and costs Redis nothing.

use std::fmt;

use envoy_types::pb::envoy::extensions::common::ratelimit::v3::RateLimitDescriptor;
use envoy_types::pb::envoy::service::ratelimit::v3::RateLimitRequest;

/// The limits of one request; every one has a flag (see `Args`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Bounds {
    /// Descriptors in one request.
    pub descriptors: usize,
    /// Entries in one descriptor.
    pub entries: usize,
    /// Bytes of the domain and of each entry's key and value.
    pub value_bytes: usize,
    /// Hits one descriptor may add.
    pub hits_per_descriptor: u64,
    /// Hits all descriptors of one request may add together.
    pub hits_per_call: u64,
}

impl Default for Bounds {
    fn default() -> Bounds {
        Bounds {
            descriptors: 64,
            entries: 32,
            value_bytes: 4096,
            hits_per_descriptor: 1_000_000,
            hits_per_call: 10_000_000,
        }
    }
}

/// Which bound a request broke; the text goes back to the caller.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BoundError {
    Descriptors { got: usize, max: usize },
    Entries { descriptor: usize, got: usize, max: usize },
    DomainBytes { got: usize, max: usize },
    EntryBytes { descriptor: usize, entry: usize, got: usize, max: usize },
    Hits { descriptor: usize, got: u64, max: u64 },
    CallHits { got: u64, max: u64 },
}

impl fmt::Display for BoundError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BoundError::Descriptors { got, max } => {
                write!(f, "{got} descriptors in one request, at most {max} allowed (--max-descriptors)")
            }
            BoundError::Entries { descriptor, got, max } => write!(
                f,
                "descriptors[{descriptor}] has {got} entries, at most {max} allowed (--max-entries)"
            ),
            BoundError::DomainBytes { got, max } => {
                write!(f, "domain is {got} bytes long, at most {max} allowed (--max-value-bytes)")
            }
            BoundError::EntryBytes { descriptor, entry, got, max } => write!(
                f,
                "descriptors[{descriptor}].entries[{entry}] key or value is {got} bytes long, at most {max} allowed (--max-value-bytes)"
            ),
            BoundError::Hits { descriptor, got, max } => write!(
                f,
                "descriptors[{descriptor}] adds {got} hits, at most {max} allowed (--max-hits-per-descriptor)"
            ),
            BoundError::CallHits { got, max } => {
                write!(f, "the request adds {got} hits, at most {max} allowed (--max-hits-per-call)")
            }
        }
    }
}

impl std::error::Error for BoundError {}

/// The request-level hits: `hits_addend` 0 means 1, as Envoy sends it.
pub fn request_hits(req: &RateLimitRequest) -> u64 {
    u64::from(req.hits_addend.max(1))
}

/// The hits one descriptor adds: its own `hits_addend` if set, else the request's. Refilling
/// through negative hits is not supported: such a descriptor only reports.
pub fn descriptor_hits(d: &RateLimitDescriptor, request_hits: u64) -> u64 {
    if d.is_negative_hits {
        0
    } else {
        d.hits_addend.map(|h| h.value).unwrap_or(request_hits)
    }
}

impl Bounds {
    pub fn check(&self, req: &RateLimitRequest) -> Result<(), BoundError> {
        if req.descriptors.len() > self.descriptors {
            return Err(BoundError::Descriptors { got: req.descriptors.len(), max: self.descriptors });
        }
        if req.domain.len() > self.value_bytes {
            return Err(BoundError::DomainBytes { got: req.domain.len(), max: self.value_bytes });
        }
        let per_request = request_hits(req);
        let mut total: u64 = 0;
        for (i, d) in req.descriptors.iter().enumerate() {
            self.check_descriptor(i, d)?;
            let hits = descriptor_hits(d, per_request);
            if hits > self.hits_per_descriptor {
                return Err(BoundError::Hits { descriptor: i, got: hits, max: self.hits_per_descriptor });
            }
            total = total.saturating_add(hits);
        }
        if total > self.hits_per_call {
            return Err(BoundError::CallHits { got: total, max: self.hits_per_call });
        }
        Ok(())
    }

    fn check_descriptor(&self, i: usize, d: &RateLimitDescriptor) -> Result<(), BoundError> {
        if d.entries.len() > self.entries {
            return Err(BoundError::Entries { descriptor: i, got: d.entries.len(), max: self.entries });
        }
        for (j, e) in d.entries.iter().enumerate() {
            let got = e.key.len().max(e.value.len());
            if got > self.value_bytes {
                return Err(BoundError::EntryBytes { descriptor: i, entry: j, got, max: self.value_bytes });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::envoy::extensions::common::ratelimit::v3::rate_limit_descriptor::Entry;
    use envoy_types::pb::google::protobuf::UInt64Value;

    fn d(n: usize, value: &str, hits: Option<u64>) -> RateLimitDescriptor {
        RateLimitDescriptor {
            entries: (0..n).map(|_| Entry { key: "k".into(), value: value.into() }).collect(),
            hits_addend: hits.map(|value| UInt64Value { value }),
            ..Default::default()
        }
    }

    fn req(descriptors: Vec<RateLimitDescriptor>, hits: u32) -> RateLimitRequest {
        RateLimitRequest { domain: "d".into(), descriptors, hits_addend: hits }
    }

    #[test]
    fn each_bound_is_inclusive_and_named() {
        let b =
            Bounds { descriptors: 2, entries: 2, value_bytes: 3, hits_per_descriptor: 5, hits_per_call: 8 };
        assert_eq!(b.check(&req(vec![d(2, "abc", Some(5)), d(1, "", None)], 3)), Ok(()));
        let e = b.check(&req(vec![d(1, "", None); 3], 0)).unwrap_err();
        assert_eq!(e, BoundError::Descriptors { got: 3, max: 2 });
        let e = b.check(&req(vec![d(3, "", None)], 0)).unwrap_err();
        assert_eq!(e, BoundError::Entries { descriptor: 0, got: 3, max: 2 });
        let e = b.check(&req(vec![d(1, "", None), d(1, "abcd", None)], 0)).unwrap_err();
        assert_eq!(e, BoundError::EntryBytes { descriptor: 1, entry: 0, got: 4, max: 3 });
        let e = b.check(&req(vec![d(1, "", None)], 6)).unwrap_err();
        assert_eq!(e, BoundError::Hits { descriptor: 0, got: 6, max: 5 });
        let e = b.check(&req(vec![d(1, "", Some(5)), d(1, "", Some(4))], 0)).unwrap_err();
        assert_eq!(e, BoundError::CallHits { got: 9, max: 8 });
        let mut long = req(vec![d(1, "", None)], 0);
        long.domain = "abcd".into();
        assert_eq!(b.check(&long).unwrap_err(), BoundError::DomainBytes { got: 4, max: 3 });
    }

    #[test]
    fn huge_hits_do_not_overflow_the_sum() {
        let b = Bounds { hits_per_descriptor: u64::MAX, hits_per_call: u64::MAX - 1, ..Bounds::default() };
        let e = b.check(&req(vec![d(1, "", Some(u64::MAX)), d(1, "", Some(u64::MAX))], 0)).unwrap_err();
        assert_eq!(e, BoundError::CallHits { got: u64::MAX, max: u64::MAX - 1 });
    }
}
