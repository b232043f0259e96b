//! ratelimit-wasm: exact, memory-bounded rate limiting for Envoy and Istio.
//!
//! Everything but [`wasm`] is host-free and tested natively: the configuration ([`config`]), the
//! request's rules, keys, plan and cost ([`request`]), the algorithms ([`algorithm`]), the shared
//! state table ([`state`]), the limiter and the request's moments ([`decide`]), the rate limit
//! service's protocol ([`global`]), and what clients and operators are told ([`report`]). The
//! `wasm` module is the only one that calls the host.

pub mod algorithm;
pub mod config;
pub mod decide;
#[cfg(any(test, feature = "testing"))]
pub mod fuzz;
pub mod global;
pub mod idempotency;
pub mod lease;
pub mod report;
pub mod request;
pub mod state;

#[cfg(all(target_arch = "wasm32", feature = "glue", not(test)))]
mod wasm;
