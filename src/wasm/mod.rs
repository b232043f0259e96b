//! The wasm glue, the only place that calls the host: the proxy-wasm ABI exports ([`abi`]), the
//! host calls ([`host`], the only module with `unsafe`), the root context ([`root`]: configuration,
//! counters, tick) and the HTTP context ([`http`]: one request's callbacks, each running the core's
//! moment for it).

mod abi;
mod host;
mod http;
mod root;
