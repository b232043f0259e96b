//! The decision for one request: every matching rule is checked, the request passes only if all
//! enforced limits pass, and a denied request consumes from none of them.

use crate::algorithm::{ceil_seconds, Algorithm, Decision};
use crate::config::FailureMode;
use crate::config::{Config, Cost, Limit, Limits, PlanSource, Plans, Rule, TableFullPolicy};
use crate::global::{Answer, GlobalCall, LimitStatus};
use crate::headers::LimitReport;
use crate::jwt;
use crate::keys::{key_text, request_key, Fingerprint};
use crate::request::Request;
use crate::store::{SharedStore, StoreError};
use crate::table::{Applied, Lookup, Table, TableEvents};
use crate::violations::Violation;

/// Something worth counting; the wasm glue maps each to a proxy-wasm counter.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Metric {
    Allowed(usize),
    Denied(usize),
    /// A shadow rule would have denied the request (it was not denied for it).
    ShadowDenied(usize),
    /// A key found its whole probe window live; the table-full policy was applied.
    TableFull,
    /// A write lost the CAS race to another worker and was retried (contention on one key).
    CasRetry,
    /// A request gave up after losing the CAS race too often (it is denied).
    CasRetriesExhausted,
    /// An idle slot (a limit whose quota had come back) was reused for another key.
    SlotReclaimed,
    /// Two workers inserted one key at once; the copies were folded into one.
    DuplicateFolded,
    /// The host refused a shared-data call (the request is allowed).
    StoreError,
    /// The rate limit service gave no usable answer (the rule's failure mode applied).
    GlobalFailure,
}

/// Where the limiter reports what happened: counters, and denials for the violation log.
pub trait Observer {
    fn count(&self, metric: Metric);
    fn violation(&self, _violation: &Violation<'_>) {}
    /// The rate limit service could not be asked or did not answer usefully.
    fn global_failure(&self, _reason: &str) {}
}

/// What a request took from one local limit, so it can be given back if a global rule then
/// denies the request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Consumed {
    fp: Fingerprint,
    index: u32,
    cost: u64,
    algorithm: Algorithm,
}

/// The rate limit service's verdict on the global rules of a request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GlobalVerdict<'a> {
    pub deny: bool,
    /// The most restrictive limit the service reported (on a denial, the one that denied).
    pub report: Option<LimitReport<'a>>,
    pub retry_after_seconds: Option<u64>,
}

/// The limiter's answer for one request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict<'a> {
    /// Pass the request; `report` is the most restrictive limit that applied, `consumed` what it
    /// took from local limits.
    Allow { report: Option<Report<'a>>, consumed: Vec<Consumed> },
    /// Answer with the deny response. `retry_after_seconds` is `None` when retrying cannot help
    /// (the request costs more than a limit can ever hold); `reason` then says why.
    Deny { report: Option<Report<'a>>, retry_after_seconds: Option<u64>, reason: Option<String> },
}

/// One limit as the client should be told about it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Report<'a> {
    pub rule: usize,
    pub limit: &'a Limit,
    pub remaining: u64,
    pub reset_seconds: u64,
}

impl<'a> Report<'a> {
    fn new(rule: usize, limit: &'a Limit, decision: &Decision) -> Report<'a> {
        Report {
            rule,
            limit,
            remaining: decision.remaining,
            reset_seconds: ceil_seconds(decision.reset_nanos),
        }
    }

    /// The header-ready view.
    pub fn describe(&self, now: u64) -> LimitReport<'a> {
        LimitReport {
            name: &self.limit.name,
            policy: self.limit.policy.as_deref(),
            quota: self.limit.quota,
            window_seconds: self.limit.window_seconds_at(now),
            remaining: self.remaining,
            reset_seconds: self.reset_seconds,
        }
    }
}

/// One limit's standing for the status endpoint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Standing<'a> {
    pub rule: &'a Rule,
    pub plan: Option<&'a str>,
    pub limit: &'a Limit,
    pub remaining: u64,
    pub reset_seconds: u64,
}

/// A global rule's standing as the service reported it.
pub struct GlobalStanding<'a> {
    pub rule: &'a Rule,
    pub plan: Option<&'a str>,
    /// The configured limit; `None` when the service's own configuration holds the limit.
    pub limit: Option<&'a Limit>,
    pub status: LimitStatus,
}

impl<'a> GlobalStanding<'a> {
    /// The name the headers and the status give this limit.
    pub fn limit_name(&self) -> &'a str {
        global_limit_name(self.rule, self.limit)
    }
}

/// A global limit's name: the configured limit's, or the rule's when the service holds the limit.
fn global_limit_name<'a>(rule: &'a Rule, limit: Option<&'a Limit>) -> &'a str {
    limit.map_or(rule.name.as_str(), |l| l.name.as_str())
}

/// The service could not be asked or gave no usable answer: counted, and logged (rate-limited).
fn global_failed(reason: &str, observer: &dyn Observer) {
    observer.count(Metric::GlobalFailure);
    observer.global_failure(reason);
}

/// The Retry-After sent when the table itself is the reason for a denial.
const TABLE_FULL_RETRY_AFTER_SECONDS: u64 = 1;

struct Item<'a> {
    rule: usize,
    limit: &'a Limit,
    plan: Option<&'a str>,
    fp: Fingerprint,
    lookup: Lookup,
    cost: u64,
    shadow: bool,
    decision: Option<Decision>,
    stored_at: Option<u32>,
    /// A shadow limit over its quota: reported, not consumed.
    skip: bool,
}

impl Item<'_> {
    /// What this item took, once its write is stored.
    fn consumed(&self) -> Option<Consumed> {
        Some(Consumed {
            fp: self.fp,
            index: self.stored_at?,
            cost: self.cost,
            algorithm: self.limit.algorithm,
        })
    }
}

impl Consumed {
    /// Gives it back: `Ok(false)` when other workers kept winning the CAS race.
    fn give_back(&self, store: &dyn SharedStore, table: &Table<'_>, now: u64) -> Result<bool, StoreError> {
        table.update_at(store, self.fp, self.index, |state| self.algorithm.refund(state, now, self.cost))
    }
}

/// An immutable, configured limiter; shared by every request of a worker.
pub struct Limiter {
    config: Config,
    seed: u64,
}

impl Limiter {
    pub fn new(config: Config, seed: u64) -> Limiter {
        Limiter { config, seed }
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    pub fn table(&self) -> Table<'_> {
        Table::new(&self.config.key_prefix, self.config.table_size)
    }

    pub fn check<'a>(
        &'a self,
        store: &dyn SharedStore,
        request: &dyn Request,
        now: u64,
        observer: &dyn Observer,
    ) -> Verdict<'a> {
        match self.try_check(store, request, now, observer) {
            Ok(verdict) => verdict,
            Err(_) => {
                // The host refused shared data: failing open keeps traffic flowing.
                observer.count(Metric::StoreError);
                Verdict::Allow { report: None, consumed: Vec::new() }
            }
        }
    }

    /// The caller's standing in every rule whose header conditions and key it meets (path and
    /// method conditions are ignored: the status request has its own), consuming nothing.
    pub fn standings<'a>(
        &'a self,
        store: &dyn SharedStore,
        request: &dyn Request,
        now: u64,
    ) -> Result<Vec<Standing<'a>>, StoreError> {
        let table = self.table();
        let mut out = Vec::new();
        for rule in &self.config.rules {
            // Global rules: the service reports them, see `global_standings`.
            if rule.global.is_some() || !rule.matcher.headers_match(request) {
                continue;
            }
            let Some(key) = request_key(self.seed, rule, request) else { continue };
            let (plan, limits) = limits_for(rule, request);
            for (index, limit) in limits.iter().enumerate() {
                let state = table.lookup(store, key.limit(plan, index, limit.kind), now)?.state();
                let d = limit.algorithm.status(state, now);
                out.push(Standing {
                    rule,
                    plan,
                    limit,
                    remaining: d.remaining,
                    reset_seconds: ceil_seconds(d.reset_nanos),
                });
            }
        }
        Ok(out)
    }

    fn try_check<'a>(
        &'a self,
        store: &dyn SharedStore,
        request: &dyn Request,
        now: u64,
        observer: &dyn Observer,
    ) -> Result<Verdict<'a>, StoreError> {
        let table = self.table();
        let rules = &self.config.rules;
        let mut items: Vec<Item<'a>> = Vec::new();
        for (index, rule) in rules.iter().enumerate() {
            if rule.global.is_some() || !rule.matcher.matches(request) {
                continue;
            }
            let Some(key) = request_key(self.seed, rule, request) else { continue };
            let (plan, limits) = limits_for(rule, request);
            if limits.is_empty() {
                continue; // an unlimited plan
            }
            let cost = match cost_of(rule, request) {
                Ok(cost) => cost,
                Err(reason) => {
                    let fp = key.limit(plan, 0, limits[0].kind);
                    if let Some(verdict) =
                        self.refuse_cost(index, None, plan, fp, 0, reason, request, observer, now)
                    {
                        return Ok(verdict);
                    }
                    continue;
                }
            };
            for (limit_index, limit) in limits.iter().enumerate() {
                let fp = key.limit(plan, limit_index, limit.kind);
                if cost > limit.algorithm.capacity() {
                    let reason = format!(
                        "cost {cost} exceeds the capacity {} of limit {:?}",
                        limit.algorithm.capacity(),
                        limit.name
                    );
                    if let Some(verdict) =
                        self.refuse_cost(index, Some(limit), plan, fp, cost, reason, request, observer, now)
                    {
                        return Ok(verdict);
                    }
                    continue;
                }
                let lookup = table.lookup(store, fp, now)?;
                if lookup == Lookup::Full {
                    observer.count(Metric::TableFull);
                    if rule.shadow || self.config.when_table_full == TableFullPolicy::Allow {
                        continue;
                    }
                    observer.count(Metric::Denied(index));
                    return Ok(table_full_denial());
                }
                let shadow = rule.shadow;
                items.push(Item {
                    rule: index,
                    limit,
                    plan,
                    fp,
                    lookup,
                    cost,
                    shadow,
                    decision: None,
                    stored_at: None,
                    skip: false,
                });
            }
        }

        // Check everything before writing anything: the usual denial costs no write at all.
        for item in items.iter_mut() {
            let (decision, _) = item.limit.algorithm.decide(item.lookup.state(), now, item.cost);
            item.decision = Some(decision);
            if !decision.allowed && item.shadow {
                item.skip = true;
                observer.count(Metric::ShadowDenied(item.rule));
                observer.violation(&self.violation(item, &decision, request, now));
            }
        }
        let mut worst: Option<(usize, Decision)> = None;
        for (i, item) in items.iter().enumerate() {
            let Some(decision) = item.decision.filter(|d| !d.allowed && !item.shadow) else { continue };
            observer.count(Metric::Denied(item.rule));
            observer.violation(&self.violation(item, &decision, request, now));
            if worst.is_none_or(|(_, w)| decision.retry_after_nanos > w.retry_after_nanos) {
                worst = Some((i, decision));
            }
        }
        if let Some((i, decision)) = worst {
            return Ok(deny(&items[i], &decision));
        }

        for i in 0..items.len() {
            if items[i].skip {
                continue;
            }
            let item = &items[i];
            let algorithm = &item.limit.algorithm;
            let cost = item.cost;
            let mut events = TableEvents::default();
            let applied = table.measure_and_replace(
                store,
                item.fp,
                now,
                Some(item.lookup),
                algorithm,
                &mut events,
                |state| {
                    let (decision, next) = algorithm.decide(state, now, cost);
                    (decision, decision.allowed.then_some(next))
                },
            )?;
            for _ in 0..events.duplicates_folded {
                observer.count(Metric::DuplicateFolded);
            }
            for _ in 0..events.cas_retries {
                observer.count(Metric::CasRetry);
            }
            if events.confirm_exhausted {
                observer.count(Metric::CasRetriesExhausted);
            }
            let refused = match applied {
                Applied::Stored { decision, index, reclaimed } => {
                    if reclaimed {
                        observer.count(Metric::SlotReclaimed);
                    }
                    items[i].decision = Some(decision);
                    items[i].stored_at = Some(index);
                    continue;
                }
                Applied::Unchanged(decision) if item.shadow => {
                    // Another worker took the last of a shadow limit: report it, deny nothing.
                    observer.count(Metric::ShadowDenied(item.rule));
                    items[i].decision = Some(decision);
                    continue;
                }
                Applied::Unchanged(decision) => {
                    // Another worker took the last of it between our check and our write.
                    observer.count(Metric::Denied(item.rule));
                    observer.violation(&self.violation(item, &decision, request, now));
                    deny(item, &decision)
                }
                Applied::Full => {
                    observer.count(Metric::TableFull);
                    if item.shadow || self.config.when_table_full == TableFullPolicy::Allow {
                        items[i].decision = None;
                        continue;
                    }
                    observer.count(Metric::Denied(item.rule));
                    table_full_denial()
                }
                Applied::Exhausted if item.shadow => {
                    observer.count(Metric::CasRetriesExhausted);
                    continue;
                }
                Applied::Exhausted => {
                    // Never over-admit: a request that cannot be recorded is refused.
                    observer.count(Metric::CasRetriesExhausted);
                    observer.count(Metric::Denied(item.rule));
                    Verdict::Deny { report: None, retry_after_seconds: Some(1), reason: None }
                }
            };
            self.refund(store, &table, &items[..i], now, observer)?;
            return Ok(refused);
        }

        // Only a later global denial needs this; without global rules nothing is allocated.
        let consumed = if self.config.global.is_some() {
            items.iter().filter_map(Item::consumed).collect()
        } else {
            Vec::new()
        };
        let mut report: Option<Report<'a>> = None;
        let mut counted: Option<usize> = None;
        for item in &items {
            if counted != Some(item.rule) && !item.skip {
                observer.count(Metric::Allowed(item.rule));
                counted = Some(item.rule);
            }
            let Some(decision) = item.decision else { continue };
            let candidate = Report::new(item.rule, item.limit, &decision);
            if report.is_none_or(|r| more_restrictive(&candidate, &r)) {
                report = Some(candidate);
            }
        }
        Ok(Verdict::Allow { report, consumed })
    }

    /// Gives back what `consumed` took (the request was then denied by a global rule).
    pub fn give_back(
        &self,
        store: &dyn SharedStore,
        consumed: &[Consumed],
        now: u64,
        observer: &dyn Observer,
    ) {
        let table = self.table();
        for c in consumed {
            match c.give_back(store, &table, now) {
                Ok(true) => {}
                Ok(false) => observer.count(Metric::CasRetriesExhausted),
                Err(_) => observer.count(Metric::StoreError),
            }
        }
    }

    /// The verdict on a request's global rules from the service's answer, or from its failure
    /// (`Err(reason)`: no answer in time, an error status, an undecodable body).
    pub fn global_verdict<'a>(
        &'a self,
        call: &GlobalCall,
        answer: Result<Answer, String>,
        observer: &dyn Observer,
    ) -> GlobalVerdict<'a> {
        let answer = match answer {
            Ok(answer) => answer,
            Err(reason) => {
                global_failed(&reason, observer);
                let deny = call.deny_on_failure;
                for origin in &call.origins {
                    let rule = &self.config.rules[origin.rule];
                    let denies = rule.global == Some(FailureMode::Deny);
                    observer.count(if denies {
                        Metric::Denied(origin.rule)
                    } else {
                        Metric::Allowed(origin.rule)
                    });
                }
                return GlobalVerdict { deny, report: None, retry_after_seconds: deny.then_some(1) };
            }
        };
        let mut report: Option<LimitReport<'a>> = None;
        let mut denial: Option<LimitReport<'a>> = None;
        for (index, status) in &answer.limits {
            let Some(origin) = call.origins.get(*index) else { continue };
            let described = LimitReport {
                name: self.origin_name(origin),
                policy: None,
                quota: status.quota,
                window_seconds: status.window_seconds,
                remaining: status.remaining,
                reset_seconds: status.reset_seconds,
            };
            if status.over_limit {
                if denial.is_none_or(|d| described.reset_seconds > d.reset_seconds) {
                    denial = Some(described);
                }
            } else if report.is_none_or(|r| described.is_more_restrictive_than(&r)) {
                report = Some(described);
            }
        }
        for (i, origin) in call.origins.iter().enumerate() {
            let over = answer.limits.iter().any(|(j, s)| *j == i && s.over_limit);
            let denied = over || (answer.over_limit && answer.limits.is_empty());
            observer.count(if denied { Metric::Denied(origin.rule) } else { Metric::Allowed(origin.rule) });
        }
        if answer.over_limit {
            let retry = denial.map_or(1, |d| d.reset_seconds.max(1));
            let report = denial.map(|d| LimitReport { remaining: 0, reset_seconds: retry, ..d });
            return GlobalVerdict { deny: true, report, retry_after_seconds: Some(retry) };
        }
        GlobalVerdict { deny: false, report, retry_after_seconds: None }
    }

    fn origin_name(&self, origin: &crate::global::DescriptorOrigin) -> &str {
        self.origin_parts(origin).map_or("", |(rule, _, limit)| global_limit_name(rule, limit))
    }

    /// The rule, plan name and configured limit a descriptor was built from (no limit when the
    /// service's own configuration decides).
    fn origin_parts(
        &self,
        origin: &crate::global::DescriptorOrigin,
    ) -> Option<(&Rule, Option<&str>, Option<&Limit>)> {
        let rule = self.config.rules.get(origin.rule)?;
        let (plan, limit) = match (&rule.limits, origin.plan) {
            (Limits::Fixed(limits), _) => (None, origin.limit.and_then(|l| limits.get(l))),
            (Limits::Plans(p), Some(plan)) => {
                let plan = p.plans.get(plan);
                (plan.map(|p| p.name.as_str()), plan.and_then(|p| origin.limit.and_then(|l| p.limits.get(l))))
            }
            (Limits::Plans(_), None) => (None, None),
        };
        Some((rule, plan, limit))
    }

    /// The caller's standing in its global rules, from the service's answer to a status call
    /// (`Purpose::Status`, hits 0). Counts no request, since none was decided; a failure is counted
    /// and logged like any other, and its reason returned.
    pub fn global_standings<'a>(
        &'a self,
        call: &GlobalCall,
        answer: Result<Answer, String>,
        observer: &dyn Observer,
    ) -> Result<Vec<GlobalStanding<'a>>, String> {
        let answer = answer.inspect_err(|reason| global_failed(reason, observer))?;
        Ok(answer
            .limits
            .iter()
            .filter_map(|(index, status)| {
                let (rule, plan, limit) = self.origin_parts(call.origins.get(*index)?)?;
                Some(GlobalStanding { rule, plan, limit, status: *status })
            })
            .collect())
    }

    /// A request whose cost no limit can ever hold: denied with a reason (no Retry-After), or
    /// only logged for a shadow rule (then `None`: carry on).
    #[allow(clippy::too_many_arguments)]
    fn refuse_cost<'a>(
        &'a self,
        rule: usize,
        limit: Option<&'a Limit>,
        plan: Option<&'a str>,
        fp: Fingerprint,
        cost: u64,
        reason: String,
        request: &dyn Request,
        observer: &dyn Observer,
        now: u64,
    ) -> Option<Verdict<'a>> {
        let shadow = self.config.rules[rule].shadow;
        observer.count(if shadow { Metric::ShadowDenied(rule) } else { Metric::Denied(rule) });
        observer.violation(&Violation {
            rule: &self.config.rules[rule].name,
            limit: limit.map(|l| l.name.as_str()),
            plan,
            cost,
            key_hash: fp.0,
            key: self.key_for_log(rule, request),
            retry_after_seconds: None,
            reason: Some(reason.clone()),
            shadow,
            at: now,
        });
        (!shadow).then_some(Verdict::Deny { report: None, retry_after_seconds: None, reason: Some(reason) })
    }

    fn key_for_log(&self, rule: usize, request: &dyn Request) -> Option<String> {
        self.config.violation_log.include_key.then(|| key_text(&self.config.rules[rule], request))
    }

    fn violation<'a>(
        &'a self,
        item: &Item<'a>,
        decision: &Decision,
        request: &dyn Request,
        now: u64,
    ) -> Violation<'a> {
        Violation {
            rule: &self.config.rules[item.rule].name,
            limit: Some(&item.limit.name),
            plan: item.plan,
            cost: item.cost,
            key_hash: item.fp.0,
            key: self.key_for_log(item.rule, request),
            retry_after_seconds: Some(ceil_seconds(decision.retry_after_nanos).max(1)),
            reason: None,
            shadow: item.shadow,
            at: now,
        }
    }

    /// Gives back what the first limits of a request took when a later one refused it.
    fn refund(
        &self,
        store: &dyn SharedStore,
        table: &Table<'_>,
        consumed: &[Item<'_>],
        now: u64,
        observer: &dyn Observer,
    ) -> Result<(), StoreError> {
        for c in consumed.iter().filter_map(Item::consumed) {
            if !c.give_back(store, table, now)? {
                observer.count(Metric::CasRetriesExhausted);
            }
        }
        Ok(())
    }
}

/// The plan of the request (for a rule with plans) and the limits that apply to it.
fn limits_for<'a>(rule: &'a Rule, request: &dyn Request) -> (Option<&'a str>, &'a [Limit]) {
    match &rule.limits {
        Limits::Fixed(limits) => (None, limits),
        Limits::Plans(plans) => match plans.plans.get(plan_of(plans, request)) {
            Some(p) => (Some(&p.name), &p.limits),
            None => (None, &[]),
        },
    }
}

/// The index of the request's plan: the one it names, else the default.
pub(crate) fn plan_of(plans: &Plans, request: &dyn Request) -> usize {
    let named = match &plans.source {
        PlanSource::Header(name) => request.header(name),
        PlanSource::JwtClaim(claim) => request.header("authorization").and_then(|a| jwt::claim(&a, claim)),
    };
    named
        .and_then(|n| plans.plans.iter().position(|p| p.name.as_bytes() == n.as_slice()))
        .unwrap_or(plans.default)
}

/// The request's cost under `rule`, or why it cannot be accepted.
pub(crate) fn cost_of(rule: &Rule, request: &dyn Request) -> Result<u64, String> {
    match &rule.cost {
        Cost::Constant(cost) => Ok(*cost),
        Cost::Header { name, max, default } => {
            let Some(value) = request.header(name) else { return Ok(*default) };
            let cost = std::str::from_utf8(&value)
                .ok()
                .map(str::trim)
                .filter(|t| !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|t| t.parse::<u64>().ok())
                .filter(|c| *c > 0)
                .ok_or_else(|| format!("{name} must be a positive whole number"))?;
            if cost > *max {
                return Err(format!("cost {cost} from {name} exceeds the maximum {max}"));
            }
            Ok(cost)
        }
    }
}

fn deny<'a>(item: &Item<'a>, decision: &Decision) -> Verdict<'a> {
    let report = Report::new(item.rule, item.limit, decision);
    Verdict::Deny {
        report: Some(report),
        retry_after_seconds: Some(report.reset_seconds.max(1)),
        reason: None,
    }
}

fn table_full_denial<'a>() -> Verdict<'a> {
    Verdict::Deny { report: None, retry_after_seconds: Some(TABLE_FULL_RETRY_AFTER_SECONDS), reason: None }
}

/// On a tie the earlier limit, already held, stays.
fn more_restrictive(a: &Report<'_>, b: &Report<'_>) -> bool {
    crate::headers::more_restrictive(a.remaining, a.reset_seconds, b.remaining, b.reset_seconds)
}

#[cfg(test)]
#[path = "limiter_tests.rs"]
mod tests;
