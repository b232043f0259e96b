//! `callcount <allowed-config.json> <denied-config.json>`: per-request host-call counts of
//! ratelimit-wasm's core, as JSON. The first config serves `hot` and `fresh`, the second `denied`.
//!
//! Scenarios (the same rule the benchmark uses, keyed by header `x-key`):
//! - `hot`: one key, already in the table, allowed (the speed section's allowed path);
//! - `fresh`: a new key on every request (the memory flood);
//! - `denied`: a key already exhausted (the 429 path).
//!
//! The wasm glue adds, per request, outside the core: 1 get_current_time, one
//! replace_header_map_value per rendered header (allowed) or 1 send_local_response (denied).

use std::cell::Cell;
use std::time::Instant;

use ratelimit_wasm::config::Config;
use ratelimit_wasm::decide::{Env, Exchange, Limiter, Next};
use ratelimit_wasm::report::metrics::Metric;
use ratelimit_wasm::report::Observer;
use ratelimit_wasm::request::{Request, TestRequest};
use ratelimit_wasm::state::memory::MemoryStore;
use ratelimit_wasm::state::table::Table;

struct CountingRequest<'a> {
    inner: &'a TestRequest,
    headers: &'a Cell<u64>,
    properties: &'a Cell<u64>,
}

impl Request for CountingRequest<'_> {
    fn header(&self, name: &str) -> Option<Vec<u8>> {
        self.headers.set(self.headers.get() + 1);
        self.inner.header(name)
    }
    fn source_address(&self) -> Option<Vec<u8>> {
        self.properties.set(self.properties.get() + 1);
        self.inner.source_address()
    }
}

#[derive(Default)]
struct Counting {
    metrics: Cell<u64>,
}

impl Observer for Counting {
    fn count(&self, _metric: Metric) {
        self.metrics.set(self.metrics.get() + 1);
    }

    fn add(&self, _metric: Metric, _n: u64) {
        self.metrics.set(self.metrics.get() + 1);
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() != 2 {
        eprintln!("usage: callcount <allowed-config.json> <denied-config.json>");
        std::process::exit(2)
    }
    let load = |path: &str| {
        let json = std::fs::read(path).unwrap_or_else(|e| panic!("{path}: {e}"));
        let config = Config::parse(&json).unwrap_or_else(|e| panic!("{path}: {e}"));
        let store = MemoryStore::new();
        Table::whole(&config.key_prefix, config.table_size).initialize(&store).expect("initialize");
        (Limiter::new(config, 0x5eed), store)
    };
    let allowed_setup = load(&args[0]);
    let denied_setup = load(&args[1]);
    let mut now: u64 = 1_700_000_000_000_000_000;
    let mut out = serde_json::Map::new();

    for scenario in ["hot", "fresh", "denied"] {
        let (limiter, store) = if scenario == "denied" { &denied_setup } else { &allowed_setup };
        let n: u64 = 20_000;
        let headers = Cell::new(0);
        let properties = Cell::new(0);
        let observer = Counting::default();
        let mut rendered = 0u64;
        let mut allowed = 0u64;
        let key = |i: u64| match scenario {
            "hot" => "bench-key".to_string(),
            "fresh" => format!("fresh-{i}"),
            _ => "exhausted".to_string(),
        };
        // Prime: the hot key gets its slot; the exhausted key is drained.
        for _ in 0..3 {
            let req = TestRequest::get("/").with_header("x-key", key(0));
            let cr = CountingRequest { inner: &req, headers: &headers, properties: &properties };
            let _ = limiter.decide(&Env::at(store, &cr, now, &observer), &mut Exchange::default());
        }
        let requests: Vec<TestRequest> = (1..=n).map(|i| TestRequest::get("/").with_header("x-key", key(i))).collect();
        headers.set(0);
        properties.set(0);
        observer.metrics.set(0);
        let (g0, s0) = store.calls();
        let t0 = Instant::now();
        for req in &requests {
            now += 1_000; // 1 us between requests
            let cr = CountingRequest { inner: req, headers: &headers, properties: &properties };
            // The request's moments as the glue runs them: decide, then settle on a response.
            let env = Env::at(store, &cr, now, &observer);
            let mut exchange = Exchange::default();
            match limiter.decide(&env, &mut exchange) {
                Next::Continue | Next::Delay { .. } => {
                    allowed += 1;
                    let settled = limiter.settle(&env, &mut exchange, &TestRequest::default());
                    rendered += (settled.limit.len() + settled.service.len()) as u64;
                }
                Next::Reply(reply) => rendered += reply.headers.len() as u64,
                Next::Ask(_) => panic!("the bench's configs have no global rules"),
            }
            limiter.end(&env, &mut exchange);
        }
        let ns = t0.elapsed().as_nanos() as f64 / n as f64;
        let (g1, s1) = store.calls();
        let per = |x: u64| x as f64 / n as f64;
        out.insert(
            scenario.to_string(),
            serde_json::json!({
                "requests": n,
                "allowed": allowed,
                "get_shared_data": per(g1 - g0),
                "set_shared_data": per(s1 - s0),
                "get_header_map_value": per(headers.get()),
                "get_property": per(properties.get()),
                "increment_metric": per(observer.metrics.get()),
                "response_headers_rendered": per(rendered),
                "native_ns_per_request": ns,
            }),
        );
    }
    println!("{}", serde_json::Value::Object(out));
}
