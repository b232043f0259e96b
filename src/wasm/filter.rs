//! The root context (configuration, metrics) and the HTTP context (one request's decision).

use std::rc::Rc;

use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType};

use crate::config::Config;
use crate::headers::render;
use crate::limiter::{Limiter, Metric, Metrics, Verdict};
use crate::wasm::host::{self, HostRequest, HostStore, LogLevel};

/// Counter ids, defined once per worker at configuration time.
struct Counters {
    allowed: Vec<Option<u32>>,
    denied: Vec<Option<u32>>,
    table_full: Option<u32>,
    cas_retries_exhausted: Option<u32>,
    slot_reclaimed: Option<u32>,
    duplicate_folded: Option<u32>,
    store_errors: Option<u32>,
}

impl Counters {
    fn define(config: &Config) -> Counters {
        let name = |suffix: &str| format!("ratelimit_wasm.{}.{}", config.key_prefix, suffix);
        let per_rule = |what: &str| {
            config.rules.iter().map(|r| host::define_counter(&name(&format!("{}.{what}", r.name)))).collect()
        };
        Counters {
            allowed: per_rule("allowed"),
            denied: per_rule("denied"),
            table_full: host::define_counter(&name("table_full")),
            cas_retries_exhausted: host::define_counter(&name("cas_retries_exhausted")),
            slot_reclaimed: host::define_counter(&name("slot_reclaimed")),
            duplicate_folded: host::define_counter(&name("duplicate_folded")),
            store_errors: host::define_counter(&name("store_errors")),
        }
    }
}

impl Metrics for Counters {
    fn count(&self, metric: Metric) {
        let id = match metric {
            Metric::Allowed(rule) => self.allowed.get(rule).copied().flatten(),
            Metric::Denied(rule) => self.denied.get(rule).copied().flatten(),
            Metric::TableFull => self.table_full,
            Metric::CasRetriesExhausted => self.cas_retries_exhausted,
            Metric::SlotReclaimed => self.slot_reclaimed,
            Metric::DuplicateFolded => self.duplicate_folded,
            Metric::StoreError => self.store_errors,
        };
        if let Some(id) = id {
            host::increment(id, 1);
        }
    }
}

struct Shared {
    limiter: Limiter,
    counters: Counters,
}

#[derive(Default)]
pub struct Root {
    shared: Option<Rc<Shared>>,
}

impl Context for Root {}

impl RootContext for Root {
    fn on_configure(&mut self, plugin_configuration_size: usize) -> bool {
        let bytes = host::plugin_configuration(plugin_configuration_size);
        let config = match Config::parse(&bytes) {
            Ok(config) => config,
            Err(e) => {
                host::log(LogLevel::Error, &format!("ratelimit-wasm: invalid configuration: {e}"));
                return false;
            }
        };
        let store = HostStore;
        let table = crate::table::Table::new(&config.key_prefix, config.table_size);
        let seed = match table.shared_seed(&store, mix(host::now_nanos())) {
            Ok(seed) => seed,
            Err(e) => {
                host::log(LogLevel::Error, &format!("ratelimit-wasm: shared data unavailable: {e:?}"));
                return false;
            }
        };
        if let Err(e) = table.initialize(&store) {
            host::log(LogLevel::Error, &format!("ratelimit-wasm: could not create the state table: {e:?}"));
            return false;
        }
        host::log(
            LogLevel::Info,
            &format!(
                "ratelimit-wasm: configured {} rule(s), table of {} slots under prefix {:?}",
                config.rules.len(),
                config.table_size,
                config.key_prefix
            ),
        );
        let counters = Counters::define(&config);
        self.shared = Some(Rc::new(Shared { limiter: Limiter::new(config, seed), counters }));
        true
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        let shared = self.shared.clone()?;
        Some(Box::new(Filter { shared, pending: Vec::new() }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

/// SplitMix64 finaliser: spreads a clock reading over all 64 bits for the hash seed.
fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

struct Filter {
    shared: Rc<Shared>,
    /// Headers to add to the upstream response.
    pending: Vec<(&'static str, String)>,
}

impl Context for Filter {}

impl HttpContext for Filter {
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        let shared = &self.shared;
        let limiter = &shared.limiter;
        let config = limiter.config();
        let now = host::now_nanos();
        match limiter.check(&HostStore, &HostRequest, now, &shared.counters) {
            Verdict::Allow { report } => {
                let described = report.as_ref().and_then(|r| limiter.describe(r));
                self.pending = render(config.headers, described.as_ref(), None);
                Action::Continue
            }
            Verdict::Deny { report, retry_after_seconds } => {
                let described = report.as_ref().and_then(|r| limiter.describe(r));
                let rendered = render(config.headers, described.as_ref(), Some(retry_after_seconds));
                let mut headers: Vec<(&str, &str)> = Vec::with_capacity(rendered.len() + 1);
                headers.push(("content-type", config.deny.content_type.as_str()));
                headers.extend(rendered.iter().map(|(n, v)| (*n, v.as_str())));
                match host::send_local_response(config.deny.status, &headers, config.deny.body.as_bytes()) {
                    Ok(()) => Action::Pause,
                    Err(status) => {
                        host::log(
                            LogLevel::Warn,
                            &format!("ratelimit-wasm: could not send the deny response (status {status})"),
                        );
                        Action::Continue
                    }
                }
            }
        }
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        for (name, value) in self.pending.drain(..) {
            host::set_response_header(name, &value);
        }
        Action::Continue
    }
}
