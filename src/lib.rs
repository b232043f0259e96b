//! ratelimit-wasm: exact, memory-bounded rate limiting for Envoy and Istio.
//!
//! Everything but [`wasm`] is host-free and tested natively: configuration, keys, the token bucket,
//! the shared-data table and the limiter. The `wasm` module is the only place that calls the host.

pub mod algorithm;
pub mod calendar;
pub mod clock;
pub mod config;
pub mod duration;
pub mod fixed_window;
pub mod global;
pub mod headers;
pub mod jwt;
pub mod keys;
pub mod limiter;
pub mod matching;
pub mod request;
pub mod sliding_window;
pub mod status;
pub mod store;
pub mod table;
pub mod token_bucket;
pub mod violations;

#[cfg(all(target_arch = "wasm32", feature = "glue", not(test)))]
mod wasm;
