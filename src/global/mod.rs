//! Global rules: everything about the rate limit service, which speaks Envoy's Rate Limit Service
//! API v3. The messages ([`protocol`]), the request built from a request's global rules
//! ([`descriptors`]), the reading of the answer ([`answer`]), and what it means ([`verdict`]).
//! Nothing here calls back into the limiter: it hands over a [`GlobalCall`] and reads answers.

pub mod answer;
pub mod descriptors;
pub mod protocol;
pub mod verdict;

use crate::config::LimitRef;
use crate::request::plan::CostError;

/// A prepared call: the encoded request and what each descriptor stands for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GlobalCall {
    pub message: Vec<u8>,
    /// The limit each descriptor stands for, in the descriptors' order.
    pub origins: Vec<LimitRef>,
    /// A failure to get an answer denies the request (some rule says `failure_mode: deny`).
    pub deny_on_failure: bool,
}

/// Why the request cannot even be asked about.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    pub rule: usize,
    pub reason: CostError,
}

/// What a call to the service is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Purpose {
    /// Decide the request: every descriptor carries the rule's cost as its hits.
    Decide,
    /// Answer the status endpoint: hits 0, so the service reports without counting. Rules apply
    /// by their header conditions only, as for the local standings: the status request has its
    /// own path and method.
    Status,
}

#[cfg(test)]
mod tests;
