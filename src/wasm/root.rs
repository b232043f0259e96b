//! The root context: configuration, the table's creation, the counters and the logs of one
//! worker (or of the main thread), and its tick.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;

use crate::config::{self, Config};
use crate::decide::{Background, Limiter};
use crate::global::answer::CallError;
use crate::report::metrics::{counter_names, Metric};
use crate::report::violations::{LogLimiter, Violation};
use crate::report::Observer;
use crate::state::store::StoreError;
use crate::state::table::Table;
use crate::wasm::host::{self, HostStore, LogLevel};
use crate::wasm::http::Filter;

/// How often counts reach Envoy's counters.
const TICK_MS: u32 = 100;
/// The tick while requests wait for their turn: how late a turn can be resumed, at most.
pub const WAITING_TICK_MS: u32 = 5;

/// The filter's counters for one worker: counted in wasm memory and added to Envoy's counters on
/// every tick (each 100 ms), which saves a host call per request.
struct Counters {
    /// (Envoy's metric id, count not yet flushed), in the order of [`Metric::slot`].
    entries: Vec<(Option<u32>, Cell<u64>)>,
    rules: usize,
}

impl Counters {
    fn define(config: &Config) -> Counters {
        let entries =
            counter_names(config).iter().map(|name| (host::define_counter(name), Cell::new(0))).collect();
        Counters { entries, rules: config.rules.len() }
    }

    fn count(&self, metric: Metric) {
        self.add(metric, 1);
    }

    fn add(&self, metric: Metric, n: u64) {
        if let Some((_, pending)) = self.entries.get(metric.slot(self.rules)) {
            pending.set(pending.get().saturating_add(n));
        }
    }

    fn flush(&self) {
        for (id, pending) in &self.entries {
            let n = pending.replace(0);
            if let (Some(id), true) = (id, n > 0) {
                host::increment(*id, i64::try_from(n).unwrap_or(i64::MAX));
            }
        }
    }
}

/// Counters plus the violation and failure logs, for one worker.
pub struct Events {
    counters: Counters,
    log_level: Option<LogLevel>,
    log_limiter: RefCell<LogLimiter>,
    /// Failures of the rate limit service: at most a line per second per worker.
    failure_log: RefCell<LogLimiter>,
    /// The first failure of a worker is an error, with what to check: the global section.
    first_failure: Cell<Option<String>>,
}

impl Observer for Events {
    fn count(&self, metric: Metric) {
        self.counters.count(metric);
    }

    fn add(&self, metric: Metric, n: u64) {
        self.counters.add(metric, n);
    }

    fn violation(&self, violation: &Violation<'_>) {
        let Some(level) = self.log_level else { return };
        let Ok(mut limiter) = self.log_limiter.try_borrow_mut() else { return };
        if let Some(suppressed) = limiter.admit(violation.at) {
            host::log(level, &violation.render(suppressed));
        }
    }

    fn global_failure(&self, reason: &str) {
        if let Some(what_to_check) = self.first_failure.take() {
            host::log(
                LogLevel::Error,
                &format!("ratelimit-wasm: the rate limit service failed (first failure in this worker): {reason}. {what_to_check}"),
            );
            return;
        }
        let Ok(mut limiter) = self.failure_log.try_borrow_mut() else { return };
        if let Some(suppressed) = limiter.admit(host::now_nanos()) {
            let more = if suppressed > 0 {
                format!(" ({suppressed} more since the last line)")
            } else {
                String::new()
            };
            host::log(LogLevel::Warn, &format!("ratelimit-wasm: rate limit service failed: {reason}{more}"));
        }
    }

    fn status_unavailable(&self, error: StoreError) {
        host::log(LogLevel::Warn, &format!("ratelimit-wasm: status unavailable: {error:?}"));
    }
}

/// What every request of a worker shares: the limiter and the events it reports.
pub struct Shared {
    pub limiter: Limiter,
    pub events: Events,
    /// The root context's id: calls no request waits for are made in its name, so their answers
    /// come back to it whatever became of the request that asked for them.
    root_id: u32,
    /// Those calls under way (lease refreshes, usage charges, idempotency completions), by token.
    background: RefCell<HashMap<u32, Background>>,
    /// The tick period asked of Envoy last, in ms.
    tick_ms: Cell<u32>,
}

impl Shared {
    /// Asks Envoy to tick every `ms`, only when that changes the period: Envoy re-arms its timer
    /// on every call, so asking on every request would keep the tick from ever firing under
    /// steady load (and the requests held for their turn from being resumed).
    pub fn tick_every(&self, ms: u32) {
        if self.tick_ms.replace(ms) != ms {
            host::set_tick_period_ms(ms);
        }
    }

    /// Starts the calls requests asked for that no request waits for, as the root context's calls.
    /// From a request's callback it borrows the root's identity for the calls, then gives the
    /// request's back (`context_id`), so they start at once rather than on the next tick.
    pub fn start_background(&self, now: u64, context_id: Option<u32>) {
        if !self.limiter.has_background() || !host::set_effective_context(self.root_id) {
            return;
        }
        let Some(service) = self.limiter.config().global.as_ref() else { return };
        for call in self.limiter.take_background() {
            let metadata = self.limiter.background_metadata(&call);
            let metadata: Vec<(&str, &str)> = metadata.iter().map(|(n, v)| (*n, v.as_str())).collect();
            let (target, (grpc_service, method)) = (self.limiter.call_target(), call.method());
            match host::grpc_call(target, grpc_service, method, call.message(), service.timeout_ms, &metadata)
            {
                Ok(token) => {
                    self.background.borrow_mut().insert(token, call);
                }
                Err(host_status) => {
                    let error = CallError::CannotCall { cluster: service.cluster.clone(), host_status };
                    self.limiter.background_answered(&HostStore, now, &call, Err(error), &self.events);
                }
            }
        }
        if let Some(id) = context_id {
            host::set_effective_context(id);
        }
    }

    /// A background call's answer (or failure); `false` when `token` is not one of these calls.
    fn background_answered(&self, token: u32, answer: Result<Vec<u8>, CallError>) -> bool {
        let Some(call) = self.background.borrow_mut().remove(&token) else { return false };
        let answer = answer.as_deref().map_err(Clone::clone);
        self.limiter.background_answered(&HostStore, host::now_nanos(), &call, answer, &self.events);
        true
    }
}

#[derive(Default)]
pub struct Root {
    /// The root context's id, to make calls in its name (their answers come back to it).
    id: u32,
    shared: Option<Rc<Shared>>,
    /// When counters were last flushed (the tick may run faster than that).
    flushed_at: u64,
}

impl Root {
    pub fn configure(&mut self, plugin_configuration_size: usize) -> bool {
        let bytes = host::plugin_configuration(plugin_configuration_size);
        let config = match Config::parse(&bytes) {
            Ok(config) => config,
            Err(e) => {
                host::log(LogLevel::Error, &format!("ratelimit-wasm: invalid configuration: {e}"));
                return false;
            }
        };
        let Some(seed) = prepare_table(&config) else { return false };
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
            log_level: log_level(config.violation_log.level),
            log_limiter: RefCell::new(LogLimiter::new(config.violation_log.max_per_second)),
            failure_log: RefCell::new(LogLimiter::new(1)),
            first_failure: Cell::new(config.global.as_ref().map(|g| {
                format!(
                    "Check that global.cluster {:?} is an Envoy cluster with HTTP/2 (http2_protocol_options) reaching the service's gRPC port, and that the service answers within global.timeout ({} ms); later failures are logged as warnings, at most one line a second",
                    g.cluster, g.timeout_ms
                )
            })),
        };
        let limiter = Limiter::new(config, seed);
        let background = RefCell::new(HashMap::new());
        let shared = Shared { limiter, events, root_id: self.id, background, tick_ms: Cell::new(0) };
        shared.tick_every(TICK_MS);
        self.shared = Some(Rc::new(shared));
        true
    }

    pub fn new(id: u32) -> Root {
        Root { id, ..Root::default() }
    }

    pub fn on_tick(&mut self) {
        let Some(shared) = self.shared.clone() else { return };
        let now = host::now_nanos();
        shared.start_background(now, None);
        for context_id in shared.limiter.tick(&HostStore, now, &shared.events) {
            // Its turn has come. A request that ended meanwhile left the queue then.
            if host::set_effective_context(context_id) && !host::resume_request() {
                host::log(LogLevel::Error, "ratelimit-wasm: could not resume a request at its turn");
            }
        }
        host::set_effective_context(self.id);
        if shared.limiter.waiting() == 0 {
            shared.tick_every(TICK_MS);
        }
        if now.saturating_sub(self.flushed_at) >= u64::from(TICK_MS) * 1_000_000 {
            shared.events.counters.flush();
            self.flushed_at = now;
        }
    }

    /// A background call's answer (or failure); `false` when `token` is not one of this root's calls.
    pub fn on_background_answer(&mut self, token: u32, answer: Result<Vec<u8>, CallError>) -> bool {
        self.shared.as_ref().is_some_and(|shared| shared.background_answered(token, answer))
    }

    pub fn new_filter(&self, context_id: u32) -> Filter {
        Filter::new(self.shared.clone(), context_id)
    }
}

/// The shared hash seed, once the table exists; `None` (logged) when shared data is unavailable.
fn prepare_table(config: &Config) -> Option<u64> {
    let store = HostStore;
    let table = Table::whole(&config.key_prefix, config.table_size);
    let seed = match table.shared_seed(&store, random_seed()) {
        Ok(seed) => seed,
        Err(e) => {
            host::log(LogLevel::Error, &format!("ratelimit-wasm: shared data unavailable: {e:?}"));
            return None;
        }
    };
    if let Err(e) = table.initialize(&store) {
        host::log(LogLevel::Error, &format!("ratelimit-wasm: could not create the state table: {e:?}"));
        return None;
    }
    Some(seed)
}

fn log_level(level: config::LogLevel) -> Option<LogLevel> {
    match level {
        config::LogLevel::Off => None,
        config::LogLevel::Debug => Some(LogLevel::Debug),
        config::LogLevel::Info => Some(LogLevel::Info),
        config::LogLevel::Warn => Some(LogLevel::Warn),
        config::LogLevel::Error => Some(LogLevel::Error),
    }
}

/// A seed nobody outside can guess, so clients cannot pick keys that collide in the table: std's
/// hash-map keys come from the host's `random_get` (WASI), which the module already uses.
fn random_seed() -> u64 {
    use std::hash::BuildHasher;
    std::collections::hash_map::RandomState::new().hash_one(host::now_nanos())
}
