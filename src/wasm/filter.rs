//! The root context (configuration, metrics) and the HTTP context (one request's decision).

use std::cell::{Cell, RefCell};
use std::rc::Rc;

use crate::config::{self, Config, GlobalService};
use crate::global::{self, Answer, GlobalCall, Purpose};
use crate::headers::{render, LimitReport};
use crate::limiter::{Consumed, Limiter, Metric, Observer, Verdict};
use crate::request::Request;
use crate::status::status_json;
use crate::table::Table;
use crate::violations::{LogLimiter, Violation};
use crate::wasm::host::{self, HostRequest, HostStore, LogLevel};

const ACTION_CONTINUE: u32 = 0;
const ACTION_PAUSE: u32 = 1;
/// How often counts reach Envoy's counters.
const TICK_MS: u32 = 100;

/// The filter's counters for one worker: counted in wasm memory and added to Envoy's counters on
/// every tick (each 100 ms), which saves a host call per request.
struct Counters {
    /// (Envoy's metric id, count not yet flushed), indexed by [`Counters::slot`].
    entries: Vec<(Option<u32>, Cell<u64>)>,
    rules: usize,
}

/// Counters that are not per rule, after the three per-rule groups.
/// Their order is the order of [`Counters::slot`].
const GLOBAL_COUNTERS: [&str; 7] = [
    "table_full",
    "cas_retries_exhausted",
    "slot_reclaimed",
    "duplicate_folded",
    "store_errors",
    "global_failures",
    "cas_retries",
];

impl Counters {
    fn define(config: &Config) -> Counters {
        let name = |suffix: &str| format!("ratelimit_wasm.{}.{}", config.key_prefix, suffix);
        let mut entries = Vec::new();
        for what in ["allowed", "denied", "shadow_denied"] {
            for rule in &config.rules {
                entries.push((host::define_counter(&name(&format!("{}.{what}", rule.name))), Cell::new(0)));
            }
        }
        for what in GLOBAL_COUNTERS {
            entries.push((host::define_counter(&name(what)), Cell::new(0)));
        }
        Counters { entries, rules: config.rules.len() }
    }

    fn slot(&self, metric: Metric) -> usize {
        let r = self.rules;
        match metric {
            Metric::Allowed(rule) => rule,
            Metric::Denied(rule) => r + rule,
            Metric::ShadowDenied(rule) => 2 * r + rule,
            Metric::TableFull => 3 * r,
            Metric::CasRetriesExhausted => 3 * r + 1,
            Metric::SlotReclaimed => 3 * r + 2,
            Metric::DuplicateFolded => 3 * r + 3,
            Metric::StoreError => 3 * r + 4,
            Metric::GlobalFailure => 3 * r + 5,
            Metric::CasRetry => 3 * r + 6,
        }
    }

    fn count(&self, metric: Metric) {
        if let Some((_, pending)) = self.entries.get(self.slot(metric)) {
            pending.set(pending.get() + 1);
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
struct Events {
    counters: Counters,
    log_level: Option<LogLevel>,
    log_limiter: RefCell<LogLimiter>,
    /// Failures of the rate limit service: at most a line per second per worker.
    failure_log: RefCell<LogLimiter>,
}

impl Observer for Events {
    fn count(&self, metric: Metric) {
        self.counters.count(metric);
    }

    fn violation(&self, violation: &Violation<'_>) {
        let Some(level) = self.log_level else { return };
        let Ok(mut limiter) = self.log_limiter.try_borrow_mut() else { return };
        if let Some(suppressed) = limiter.admit(violation.at) {
            host::log(level, &violation.render(suppressed));
        }
    }

    fn global_failure(&self, reason: &str) {
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
}

struct Shared {
    limiter: Limiter,
    events: Events,
}

#[derive(Default)]
pub struct Root {
    shared: Option<Rc<Shared>>,
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
        let store = HostStore;
        let table = Table::new(&config.key_prefix, config.table_size);
        let seed = match table.shared_seed(&store, random_seed()) {
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
            failure_log: RefCell::new(LogLimiter::new(1)),
        };
        self.shared = Some(Rc::new(Shared { limiter: Limiter::new(config, seed), events }));
        host::set_tick_period_ms(TICK_MS);
        true
    }

    pub fn on_tick(&mut self) {
        if let Some(shared) = &self.shared {
            shared.events.counters.flush();
        }
    }

    pub fn new_filter(&self) -> Filter {
        Filter { shared: self.shared.clone(), pending: Vec::new(), waiting: None, new_call: None }
    }
}

/// A seed nobody outside can guess, so clients cannot pick keys that collide in the table: std's
/// hash-map keys come from the host's `random_get` (WASI), which the module already uses.
fn random_seed() -> u64 {
    use std::hash::BuildHasher;
    std::collections::hash_map::RandomState::new().hash_one(host::now_nanos())
}

/// A request paused while the rate limit service decides its global rules.
struct Waiting {
    call: GlobalCall,
    /// What local limits took, given back if the service denies.
    consumed: Vec<Consumed>,
    /// The local limit to report, as owned values (the request outlives this callback).
    local: Option<OwnedReport>,
}

#[derive(Clone)]
struct OwnedReport {
    name: String,
    policy: Option<String>,
    quota: u64,
    window_seconds: u64,
    remaining: u64,
    reset_seconds: u64,
}

impl OwnedReport {
    fn of(r: &LimitReport<'_>) -> OwnedReport {
        OwnedReport {
            name: r.name.to_owned(),
            policy: r.policy.map(str::to_owned),
            quota: r.quota,
            window_seconds: r.window_seconds,
            remaining: r.remaining,
            reset_seconds: r.reset_seconds,
        }
    }

    fn view(&self) -> LimitReport<'_> {
        LimitReport {
            name: &self.name,
            policy: self.policy.as_deref(),
            quota: self.quota,
            window_seconds: self.window_seconds,
            remaining: self.remaining,
            reset_seconds: self.reset_seconds,
        }
    }
}

/// What a paused request waits for from the rate limit service.
enum Awaiting {
    /// The decision on its global rules.
    Decision(Waiting),
    /// The standing in its global rules, for the status endpoint.
    Status(GlobalCall),
}

pub struct Filter {
    /// `None` when the plugin is not configured: the filter then lets everything through.
    shared: Option<Rc<Shared>>,
    /// Headers to add to the upstream response.
    pending: Vec<(&'static str, String)>,
    waiting: Option<Awaiting>,
    /// A gRPC call started by the last callback, for the ABI layer to route its answer here.
    new_call: Option<u32>,
}

impl Filter {
    pub fn inert() -> Filter {
        Filter { shared: None, pending: Vec::new(), waiting: None, new_call: None }
    }

    pub fn take_new_call(&mut self) -> Option<u32> {
        self.new_call.take()
    }

    pub fn on_request_headers(&mut self, _context_id: u32) -> u32 {
        let Some(shared) = self.shared.clone() else { return ACTION_CONTINUE };
        let limiter = &shared.limiter;
        let config = limiter.config();
        let now = host::now_nanos();
        if let Some(status_path) = &config.status_path {
            if is_status_request(status_path) {
                return self.answer_status(&shared, now);
            }
        }
        let (local, consumed) = match limiter.check(&HostStore, &HostRequest, now, &shared.events) {
            Verdict::Allow { report, consumed } => (report.map(|r| r.describe(now)), consumed),
            Verdict::Deny { report, retry_after_seconds, reason } => {
                let described = report.map(|r| r.describe(now));
                return deny(config, described.as_ref(), retry_after_seconds, reason.as_deref());
            }
        };
        let call = match global::prepare(config, &HostRequest, Purpose::Decide) {
            Ok(Some(call)) => call,
            Ok(None) => {
                self.pending = render(config.headers, local.as_ref(), None);
                return ACTION_CONTINUE;
            }
            Err(refusal) => {
                limiter.give_back(&HostStore, &consumed, now, &shared.events);
                shared.events.count(Metric::Denied(refusal.rule));
                return deny(config, None, None, Some(&refusal.reason));
            }
        };
        let Some(service) = &config.global else { return ACTION_CONTINUE };
        match self.start_call(service, &call) {
            Ok(()) => {
                self.waiting = Some(Awaiting::Decision(Waiting {
                    call,
                    consumed,
                    local: local.as_ref().map(OwnedReport::of),
                }));
                ACTION_PAUSE
            }
            Err(reason) => {
                let verdict = limiter.global_verdict(&call, Err(reason), &shared.events);
                if verdict.deny {
                    limiter.give_back(&HostStore, &consumed, now, &shared.events);
                    return deny(config, None, verdict.retry_after_seconds, None);
                }
                self.pending = render(config.headers, local.as_ref(), None);
                ACTION_CONTINUE
            }
        }
    }

    /// The service answered (`Ok(body)`) or the call failed (`Err(grpc status)`).
    pub fn on_global_answer(&mut self, context_id: u32, answer: Result<Vec<u8>, u32>) {
        let (Some(shared), Some(awaiting)) = (self.shared.clone(), self.waiting.take()) else { return };
        host::set_effective_context(context_id);
        let limiter = &shared.limiter;
        let config = limiter.config();
        let answer = match answer {
            Ok(body) => global::read_answer(&body),
            Err(status) => Err(format!("gRPC status {status}{}", grpc_status_hint(status))),
        };
        let waiting = match awaiting {
            Awaiting::Decision(waiting) => waiting,
            Awaiting::Status(call) => {
                let _ = respond_status(&shared, host::now_nanos(), Some((&call, answer)));
                return;
            }
        };
        let verdict = limiter.global_verdict(&waiting.call, answer, &shared.events);
        if verdict.deny {
            limiter.give_back(&HostStore, &waiting.consumed, host::now_nanos(), &shared.events);
            let _ = deny(config, verdict.report.as_ref(), verdict.retry_after_seconds, None);
            return;
        }
        let local = waiting.local.as_ref().map(OwnedReport::view);
        let report = match (local, verdict.report) {
            (Some(l), Some(g)) => Some(if g.is_more_restrictive_than(&l) { g } else { l }),
            (l, g) => l.or(g),
        };
        self.pending = render(config.headers, report.as_ref(), None);
        host::resume_request();
    }

    /// The status endpoint. With global rules that apply, first asks the service (hits 0) and
    /// answers when it replies.
    fn answer_status(&mut self, shared: &Shared, now: u64) -> u32 {
        let config = shared.limiter.config();
        let (Some(service), Ok(Some(call))) =
            (&config.global, global::prepare(config, &HostRequest, Purpose::Status))
        else {
            return respond_status(shared, now, None);
        };
        match self.start_call(service, &call) {
            Ok(()) => {
                self.waiting = Some(Awaiting::Status(call));
                ACTION_PAUSE
            }
            Err(reason) => respond_status(shared, now, Some((&call, Err(reason)))),
        }
    }

    /// Sends `call` to the rate limit service; its answer comes back through `on_global_answer`.
    fn start_call(&mut self, service: &GlobalService, call: &GlobalCall) -> Result<(), String> {
        let token = host::grpc_call(
            &service.cluster,
            global::SERVICE,
            global::METHOD,
            &call.message,
            service.timeout_ms,
        )
        .map_err(|status| format!("cannot call cluster {:?} (host status {status})", service.cluster))?;
        self.new_call = Some(token);
        Ok(())
    }

    pub fn on_response_headers(&mut self) -> u32 {
        for (name, value) in self.pending.drain(..) {
            host::set_response_header(name, &value);
        }
        ACTION_CONTINUE
    }
}

fn grpc_status_hint(status: u32) -> &'static str {
    match status {
        4 => " (deadline exceeded: no answer within the timeout)",
        14 => " (unavailable: the service is down or unreachable, or gave no answer within the timeout)",
        _ => "",
    }
}

fn deny(
    config: &Config,
    report: Option<&LimitReport<'_>>,
    retry_after: Option<u64>,
    reason: Option<&str>,
) -> u32 {
    let rendered = render(config.headers, report, retry_after);
    let mut headers: Vec<(&str, &str)> = Vec::with_capacity(rendered.len() + 2);
    headers.push(("content-type", config.deny.content_type.as_str()));
    headers.extend(rendered.iter().map(|(n, v)| (*n, v.as_str())));
    if let Some(reason) = reason {
        headers.push(("x-ratelimit-reason", reason));
    }
    respond(config.deny.status, &headers, config.deny.body.as_bytes())
}

/// Sends the status JSON: the local standings, and the global ones from the service's answer to
/// `global` (or why there is none).
fn respond_status(shared: &Shared, now: u64, global: Option<(&GlobalCall, Result<Answer, String>)>) -> u32 {
    let limiter = &shared.limiter;
    let local = match limiter.standings(&HostStore, &HostRequest, now) {
        Ok(standings) => standings,
        Err(e) => {
            host::log(LogLevel::Warn, &format!("ratelimit-wasm: status unavailable: {e:?}"));
            return respond(503, &[("content-type", "text/plain")], b"rate limit status unavailable\n");
        }
    };
    let (global, error) =
        match global.map(|(call, answer)| limiter.global_standings(call, answer, &shared.events)) {
            None => (Vec::new(), None),
            Some(Ok(standings)) => (standings, None),
            Some(Err(reason)) => (Vec::new(), Some(reason)),
        };
    let body = status_json(&local, &global, error.as_deref(), now);
    respond(200, &[("content-type", "application/json"), ("cache-control", "no-store")], body.as_bytes())
}

/// `GET` or `HEAD` on `status_path` (any query string).
fn is_status_request(status_path: &str) -> bool {
    // The path first: on every other request, that is the only header read.
    let request = HostRequest;
    let path_ok = request.header(":path").is_some_and(|p| {
        let end = p.iter().position(|&b| b == b'?').unwrap_or(p.len());
        &p[..end] == status_path.as_bytes()
    });
    path_ok && request.header(":method").is_some_and(|m| m == b"GET" || m == b"HEAD")
}

fn respond(status: u32, headers: &[(&str, &str)], body: &[u8]) -> u32 {
    match host::send_local_response(status, headers, body) {
        Ok(()) => ACTION_PAUSE,
        Err(code) => {
            host::log(
                LogLevel::Warn,
                &format!("ratelimit-wasm: could not send a local response (status {code})"),
            );
            ACTION_CONTINUE
        }
    }
}
