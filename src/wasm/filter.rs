//! The root context (configuration, metrics) and the HTTP context (one request's decision).

use std::cell::RefCell;
use std::rc::Rc;

use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType};

use crate::config::{self, Config};
use crate::headers::render;
use crate::limiter::{Limiter, Metric, Observer, Verdict};
use crate::status::status_json;
use crate::violations::{LogLimiter, Violation};
use crate::wasm::host::{self, HostRequest, HostStore, LogLevel};

/// Counter ids, defined once per worker at configuration time.
struct Counters {
    allowed: Vec<Option<u32>>,
    denied: Vec<Option<u32>>,
    shadow_denied: Vec<Option<u32>>,
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
            shadow_denied: per_rule("shadow_denied"),
            table_full: host::define_counter(&name("table_full")),
            cas_retries_exhausted: host::define_counter(&name("cas_retries_exhausted")),
            slot_reclaimed: host::define_counter(&name("slot_reclaimed")),
            duplicate_folded: host::define_counter(&name("duplicate_folded")),
            store_errors: host::define_counter(&name("store_errors")),
        }
    }
}

/// Counters plus the violation log, for one worker.
struct Events {
    counters: Counters,
    log_level: Option<LogLevel>,
    log_limiter: RefCell<LogLimiter>,
}

impl Observer for Events {
    fn count(&self, metric: Metric) {
        self.counters.count(metric);
    }

    fn violation(&self, violation: &Violation<'_>) {
        let Some(level) = self.log_level else { return };
        let Ok(mut limiter) = self.log_limiter.try_borrow_mut() else { return };
        if let Some(suppressed) = limiter.admit(host::now_nanos()) {
            host::log(level, &violation.render(suppressed));
        }
    }
}

impl Counters {
    fn count(&self, metric: Metric) {
        let id = match metric {
            Metric::Allowed(rule) => self.allowed.get(rule).copied().flatten(),
            Metric::Denied(rule) => self.denied.get(rule).copied().flatten(),
            Metric::ShadowDenied(rule) => self.shadow_denied.get(rule).copied().flatten(),
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
    events: Events,
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
        let events = Events {
            counters: Counters::define(&config),
            log_level: match config.violation_log.level {
                config::LogLevel::Off => None,
                config::LogLevel::Debug => Some(LogLevel::Debug),
                config::LogLevel::Info => Some(LogLevel::Info),
                config::LogLevel::Warn => Some(LogLevel::Warn),
                config::LogLevel::Error => Some(LogLevel::Error),
            },
            log_limiter: RefCell::new(LogLimiter::new(config.violation_log.max_per_second)),
        };
        self.shared = Some(Rc::new(Shared { limiter: Limiter::new(config, seed), events }));
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

impl Filter {
    fn answer_status(&mut self, limiter: &Limiter, now: u64) -> Action {
        match limiter.standings(&HostStore, &HostRequest, now) {
            Ok(standings) => {
                let body = status_json(&standings, now);
                respond(
                    200,
                    &[("content-type", "application/json"), ("cache-control", "no-store")],
                    body.as_bytes(),
                )
            }
            Err(e) => {
                host::log(LogLevel::Warn, &format!("ratelimit-wasm: status unavailable: {e:?}"));
                respond(503, &[("content-type", "text/plain")], b"rate limit status unavailable\n")
            }
        }
    }
}

/// `GET <status_path>` (any query string).
fn is_status_request(status_path: &str) -> bool {
    let request = HostRequest;
    use crate::request::Request;
    let method_ok = request.header(":method").is_some_and(|m| m == b"GET" || m == b"HEAD");
    let path_ok = request.header(":path").is_some_and(|p| {
        let end = p.iter().position(|&b| b == b'?').unwrap_or(p.len());
        &p[..end] == status_path.as_bytes()
    });
    method_ok && path_ok
}

fn respond(status: u32, headers: &[(&str, &str)], body: &[u8]) -> Action {
    match host::send_local_response(status, headers, body) {
        Ok(()) => Action::Pause,
        Err(code) => {
            host::log(
                LogLevel::Warn,
                &format!("ratelimit-wasm: could not send a local response (status {code})"),
            );
            Action::Continue
        }
    }
}

impl Context for Filter {}

impl HttpContext for Filter {
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        let shared = Rc::clone(&self.shared);
        let limiter = &shared.limiter;
        let config = limiter.config();
        let now = host::now_nanos();
        if let Some(status_path) = &config.status_path {
            if is_status_request(status_path) {
                return self.answer_status(limiter, now);
            }
        }
        match limiter.check(&HostStore, &HostRequest, now, &shared.events) {
            Verdict::Allow { report } => {
                let described = report.map(|r| r.describe(now));
                self.pending = render(config.headers, described.as_ref(), None);
                Action::Continue
            }
            Verdict::Deny { report, retry_after_seconds, reason } => {
                let described = report.map(|r| r.describe(now));
                let rendered = render(config.headers, described.as_ref(), retry_after_seconds);
                let mut headers: Vec<(&str, &str)> = Vec::with_capacity(rendered.len() + 2);
                headers.push(("content-type", config.deny.content_type.as_str()));
                headers.extend(rendered.iter().map(|(n, v)| (*n, v.as_str())));
                if let Some(reason) = &reason {
                    headers.push(("x-ratelimit-reason", reason.as_str()));
                }
                respond(config.deny.status, &headers, config.deny.body.as_bytes())
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
