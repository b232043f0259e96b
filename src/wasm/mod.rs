//! The wasm glue: the proxy-wasm ABI exports ([`abi`]), the host calls ([`host`], the only module
//! with `unsafe`), and the root and HTTP contexts ([`filter`]).

mod abi;
mod filter;
mod host;
