//! Probe filter for the benchmark: a no-op proxy-wasm filter that can optionally make the same
//! host calls as ratelimit-wasm's allowed path, with none of its logic. Comparing plain Envoy, this
//! filter as a no-op, this filter making the calls, and ratelimit-wasm splits the cost into: the
//! wasm filter itself, the host calls, and ratelimit-wasm's own work.

use std::cell::Cell;
use std::rc::Rc;

use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel, MapType, MetricType};

#[derive(Default, Clone, Copy)]
struct Steps {
    time: bool,
    header: bool,
    shared: bool,
    sharedget: bool,
    metric: bool,
    resp5: bool,
    resp3: bool,
    deny: bool,
}

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Warn);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> {
        Box::new(Root { steps: Steps::default(), counter: 0, seq: Rc::new(Cell::new(0)) })
    });
}}

struct Root {
    steps: Steps,
    counter: u32,
    seq: Rc<Cell<u64>>,
}

impl Context for Root {}

impl RootContext for Root {
    fn on_configure(&mut self, _size: usize) -> bool {
        let config = self.get_plugin_configuration().unwrap_or_default();
        let text = String::from_utf8_lossy(&config).to_string();
        for step in text.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            match step {
                "time" => self.steps.time = true,
                "header" => self.steps.header = true,
                "shared" => self.steps.shared = true,
                "sharedget" => self.steps.sharedget = true,
                "metric" => self.steps.metric = true,
                "resp5" => self.steps.resp5 = true,
                "resp3" => self.steps.resp3 = true,
                "deny" => self.steps.deny = true,
                _ => return false,
            }
        }
        if self.steps.shared || self.steps.sharedget {
            let _ = hostcalls::set_shared_data("probe:0", Some(&[1u8; 25]), None);
        }
        self.counter = hostcalls::define_metric(MetricType::Counter, "probe.allowed").unwrap_or(0);
        true
    }

    fn create_http_context(&self, _id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Filter { steps: self.steps, counter: self.counter, seq: self.seq.clone() }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct Filter {
    steps: Steps,
    counter: u32,
    seq: Rc<Cell<u64>>,
}

impl Context for Filter {}

impl HttpContext for Filter {
    fn on_http_request_headers(&mut self, _n: usize, _eos: bool) -> Action {
        let s = self.steps;
        let mut acc = 0u64;
        if s.time {
            acc ^= hostcalls::get_current_time().map(|t| t.elapsed().map(|d| d.as_nanos() as u64).unwrap_or(0)).unwrap_or(0);
        }
        if s.header {
            if let Ok(Some(v)) = hostcalls::get_map_value_bytes(MapType::HttpRequestHeaders, "x-key") {
                acc ^= v.len() as u64;
            }
        }
        if s.shared {
            // One hot slot, as ratelimit-wasm has for one hot key (no retry on a CAS mismatch).
            let n = self.seq.get().wrapping_add(1);
            self.seq.set(n);
            if let Ok((Some(mut value), cas)) = hostcalls::get_shared_data("probe:0") {
                if let Some(b) = value.get_mut(1) {
                    *b = b.wrapping_add((n ^ acc) as u8);
                }
                let _ = hostcalls::set_shared_data("probe:0", Some(&value), cas);
            }
        }
        if s.sharedget {
            // The 429 path reads its slot and writes nothing.
            if let Ok((Some(value), _)) = hostcalls::get_shared_data("probe:0") {
                acc ^= u64::from(value.first().copied().unwrap_or(0));
            }
        }
        if s.metric {
            let _ = hostcalls::increment_metric(self.counter, 1);
        }
        if s.deny {
            // The same local reply as ratelimit-wasm's 429: 7 headers and a short body.
            let _ = hostcalls::send_http_response(
                429,
                vec![
                    ("content-type", "text/plain"),
                    ("retry-after", "86400"),
                    ("ratelimit-policy", "\"per-key\";q=1;w=86400"),
                    ("ratelimit", "\"per-key\";r=0;t=86400"),
                    ("x-ratelimit-limit", "1"),
                    ("x-ratelimit-remaining", "0"),
                    ("x-ratelimit-reset", "86400"),
                ],
                Some(b"rate limited\n"),
            );
            return Action::Pause;
        }
        Action::Continue
    }

    fn on_http_response_headers(&mut self, _n: usize, _eos: bool) -> Action {
        if self.steps.resp3 {
            for (name, value) in
                [("x-ratelimit-limit", "1000000000"), ("x-ratelimit-remaining", "999999999"), ("x-ratelimit-reset", "1")]
            {
                let _ = hostcalls::set_map_value(MapType::HttpResponseHeaders, name, Some(value));
            }
        }
        if self.steps.resp5 {
            for (name, value) in [
                ("ratelimit-policy", "\"per-key\";q=1000000000;w=1"),
                ("ratelimit", "\"per-key\";r=999999999;t=1"),
                ("x-ratelimit-limit", "1000000000"),
                ("x-ratelimit-remaining", "999999999"),
                ("x-ratelimit-reset", "1"),
            ] {
                let _ = hostcalls::set_map_value(MapType::HttpResponseHeaders, name, Some(value));
            }
        }
        Action::Continue
    }
}
