//! The wasm glue: registers the root context with the proxy-wasm SDK. Host calls live in
//! [`host`] only.

mod filter;
mod host;

proxy_wasm::main! {{
    proxy_wasm::set_log_level(proxy_wasm::types::LogLevel::Info);
    proxy_wasm::set_root_context(|_| -> Box<dyn proxy_wasm::traits::RootContext> {
        Box::<filter::Root>::default()
    });
}}
