//! The local rules of one request: collect the limits that apply, check them all without writing
//! (the usual denial costs no write), then consume from each, giving back what the earlier ones
//! took if a later one has run out meanwhile. A denied request consumes from none of them.

use super::{Env, Limiter};
use crate::algorithm::time::ceil_seconds;
use crate::algorithm::{Algorithm, Decision, State};
use crate::config::{Cost, Limit, LimitRef, Rule, TableFullPolicy, TableShare};
use crate::report::metrics::Metric;
use crate::report::violations::Violation;
use crate::report::{most_restrictive, Reported};
use crate::request::keys::{key_text, request_key};
use crate::request::plan::{cost_of, fits_capacity, limits_for, CostError};
use crate::state::store::StoreError;
use crate::state::table::{Applied, Bucket, Lookup, Table, TableEvents};
use crate::state::Fingerprint;

/// The Retry-After sent when the table itself is the reason for a denial.
const TABLE_FULL_RETRY_AFTER_SECONDS: u64 = 1;

/// The limiter's answer on a request's local rules.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Pass the request; `report` is the most restrictive limit that applied, `consumed` what it
    /// took from local limits (kept when global rules may still deny it, when it waits, and for
    /// concurrency limits, held until it ends). `turn`: when turns were reserved for it, how long
    /// it must wait.
    /// `allowed_by`: the rules to count as having allowed it, once it is finally admitted (when
    /// global rules may still deny it; otherwise they are counted at once and this is empty).
    Allow { report: Option<Reported>, consumed: Vec<Consumed>, turn: Option<Turn>, allowed_by: Vec<usize> },
    /// Answer with the deny response. `retry_after_seconds` is `None` when retrying cannot help
    /// (the request costs more than a limit can ever hold); `reason` then says why.
    Deny { report: Option<Reported>, retry_after_seconds: Option<u64>, reason: Option<CostError> },
}

/// A request that must wait for the turns reserved for it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Turn {
    /// The instant, on this worker's clock, the last of its turns comes.
    pub until: u64,
    /// How long that is from the moment it was decided.
    pub wait: u64,
    /// The buckets (fingerprints) of the limits that delay it: each lets only so many wait.
    pub keys: Vec<u64>,
}

/// What a request took from one local limit, so it can be given back if a global rule then
/// denies the request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Consumed {
    /// The limit it was taken from.
    pub(super) at: LimitRef,
    pub(super) fp: Fingerprint,
    pub(super) share: TableShare,
    pub(super) index: u32,
    pub(super) cost: u64,
    pub(super) algorithm: Algorithm,
    /// Where a concurrency limit's units are counted (see [`Algorithm::held_in`]).
    pub(super) held_in: u64,
}

impl Consumed {
    /// Gives it back: `Ok(false)` when other workers kept winning the CAS race.
    fn give_back(&self, env: &Env<'_>, limiter: &Limiter) -> Result<bool, StoreError> {
        let now = env.now();
        limiter.table(self.share).update_at(env.store, self.fp, self.index, |state| {
            self.algorithm.give_back(state, now, self.cost, self.held_in)
        })
    }
}

/// One limit that applies to the request, from its lookup to its write.
struct Item<'a> {
    at: LimitRef,
    rule: &'a Rule,
    limit: &'a Limit,
    plan: Option<&'a str>,
    fp: Fingerprint,
    share: TableShare,
    lookup: Lookup,
    cost: u64,
    decision: Option<Decision>,
    /// The slot its new state went to, and that state.
    stored: Option<(u32, State)>,
    /// A shadow limit over its quota: reported, not consumed.
    skip: bool,
    /// How long the request must wait for the turn reserved for it in this limit (0: none).
    wait: u64,
}

impl Item<'_> {
    /// A concurrency limit holds its units until the request ends; a cost charged from the
    /// response is corrected when the response arrives.
    fn outlives_admission(&self) -> bool {
        self.limit.algorithm.is_concurrency() || matches!(self.rule.cost, Cost::Response { .. })
    }

    /// What this item took, once its write is stored.
    fn consumed(&self) -> Option<Consumed> {
        let (index, state) = self.stored?;
        Some(Consumed {
            at: self.at,
            fp: self.fp,
            share: self.share,
            index,
            cost: self.cost,
            algorithm: self.limit.algorithm,
            held_in: self.limit.algorithm.held_in(state),
        })
    }

    fn report(&self, decision: &Decision, now: u64) -> Reported {
        Reported {
            limit: self.at,
            quota: self.limit.quota,
            window_seconds: self.limit.window_seconds_at(now),
            remaining: decision.remaining,
            reset_seconds: decision.reset_seconds(),
            from_service: false,
        }
    }

    fn deny(&self, decision: &Decision, now: u64) -> Verdict {
        let report = self.report(decision, now);
        Verdict::Deny {
            report: Some(report),
            retry_after_seconds: Some(report.reset_seconds.max(1)),
            reason: None,
        }
    }
}

/// A request refused for its cost, as the violation log names it.
struct CostRefusal<'a> {
    index: usize,
    rule: &'a Rule,
    limit: Option<&'a Limit>,
    plan: Option<&'a str>,
    fp: Fingerprint,
    cost: u64,
    reason: CostError,
}

/// Either the limits to check, or the verdict already reached while collecting them.
type Collected<'a> = Result<Vec<Item<'a>>, Verdict>;

/// Counts what one table operation ran into.
fn count_events(env: &Env<'_>, events: &TableEvents) {
    for _ in 0..events.duplicates_folded {
        env.observer.count(Metric::DuplicateFolded);
    }
    for _ in 0..events.cas_retries {
        env.observer.count(Metric::CasRetry);
    }
    if events.confirm_exhausted {
        env.observer.count(Metric::CasRetriesExhausted);
    }
}

fn table_full_denial() -> Verdict {
    Verdict::Deny { report: None, retry_after_seconds: Some(TABLE_FULL_RETRY_AFTER_SECONDS), reason: None }
}

impl Limiter {
    /// The verdict of the local rules. A store the host refuses lets the request through
    /// (counted in `store_errors`): failing open keeps traffic flowing.
    pub fn check(&self, env: &Env<'_>) -> Verdict {
        self.check_rules(env, &|rule: &Rule| rule.fallback_for.is_none())
    }

    /// The verdict of the fallback rules of the global rules `failed` (their call to the service
    /// failed), as [`Self::check`] gives it for the local rules.
    pub fn check_fallbacks(&self, env: &Env<'_>, failed: &[usize]) -> Verdict {
        self.check_rules(env, &|rule: &Rule| rule.fallback_for.is_some_and(|g| failed.contains(&g)))
    }

    fn check_rules(&self, env: &Env<'_>, applies: &dyn Fn(&Rule) -> bool) -> Verdict {
        match self.try_check(env, applies) {
            Ok(verdict) => verdict,
            Err(_) => {
                env.observer.count(Metric::StoreError);
                Verdict::Allow { report: None, consumed: Vec::new(), turn: None, allowed_by: Vec::new() }
            }
        }
    }

    fn try_check(&self, env: &Env<'_>, applies: &dyn Fn(&Rule) -> bool) -> Result<Verdict, StoreError> {
        let mut items = match self.collect(env, applies)? {
            Ok(items) => items,
            Err(verdict) => return Ok(verdict),
        };
        if let Some(denial) = self.check_all(env, &mut items) {
            return Ok(denial);
        }
        if let Some(refused) = self.commit(env, &mut items)? {
            return Ok(refused);
        }
        Ok(self.allow(env, &items))
    }

    /// Every local limit that applies, with where its bucket is.
    fn collect<'a>(
        &'a self,
        env: &Env<'_>,
        applies: &dyn Fn(&Rule) -> bool,
    ) -> Result<Collected<'a>, StoreError> {
        let mut items = Vec::new();
        for (index, rule) in self.config.rules.iter().enumerate() {
            // Global rules have no share: the service decides them.
            let Some(share) = rule.table else { continue };
            if !applies(rule) || !rule.matcher.matches(env.request) {
                continue;
            }
            let table = self.table(share);
            if let Err(verdict) = self.collect_rule(env, &table, index, rule, &mut items)? {
                return Ok(Err(verdict));
            }
        }
        Ok(Ok(items))
    }

    /// The limits of one rule; `Err(verdict)` when the rule already decides the request.
    fn collect_rule<'a>(
        &'a self,
        env: &Env<'_>,
        table: &Table<'_>,
        index: usize,
        rule: &'a Rule,
        items: &mut Vec<Item<'a>>,
    ) -> Result<Result<(), Verdict>, StoreError> {
        let Some(key) = request_key(self.seed, rule, env.request) else { return Ok(Ok(())) };
        let chosen = limits_for(rule, env.request);
        let Some(first) = chosen.limits.first() else { return Ok(Ok(())) }; // an unlimited plan
        let cost = match cost_of(rule, env.request) {
            Ok(cost) => cost,
            Err(reason) => {
                let fp = key.limit(chosen.plan_name(), 0, first.kind);
                let (limit, plan, cost) = (None, chosen.plan_name(), 0);
                let refused =
                    self.refuse_cost(env, CostRefusal { index, rule, limit, plan, fp, cost, reason });
                return Ok(refused.map_or(Ok(()), Err));
            }
        };
        for (limit_index, limit) in chosen.limits.iter().enumerate() {
            let fp = key.limit(chosen.plan_name(), limit_index, limit.kind);
            if let Err(reason) = fits_capacity(cost, limit) {
                let (limit, plan) = (Some(limit), chosen.plan_name());
                let refusal = CostRefusal { index, rule, limit, plan, fp, cost, reason };
                if let Some(verdict) = self.refuse_cost(env, refusal) {
                    return Ok(Err(verdict));
                }
                continue;
            }
            let lookup = table.lookup(env.store, fp, env.now())?;
            if lookup == Lookup::Full {
                env.observer.count(Metric::TableFull(index));
                if rule.shadow || rule.when_table_full == TableFullPolicy::Allow {
                    continue;
                }
                env.observer.count(Metric::Denied(index));
                return Ok(Err(table_full_denial()));
            }
            let at = LimitRef { rule: index, plan: chosen.plan_index(), limit: Some(limit_index) };
            let plan = chosen.plan_name();
            items.push(Item {
                at,
                rule,
                limit,
                plan,
                fp,
                share: table.share(),
                lookup,
                cost,
                decision: None,
                stored: None,
                skip: false,
                wait: 0,
            });
        }
        Ok(Ok(()))
    }

    /// Decides every item on the state its lookup saw, writing nothing; the denial to send if an
    /// enforced limit is over (the longest wait of them).
    fn check_all(&self, env: &Env<'_>, items: &mut [Item<'_>]) -> Option<Verdict> {
        let now = env.now();
        for item in items.iter_mut() {
            let (decision, wait, _) = self.measure(item, item.lookup.state(), now);
            item.decision = Some(decision);
            item.wait = wait;
            if !decision.allowed && item.rule.shadow {
                item.skip = true;
                env.observer.count(Metric::ShadowDenied(item.at.rule));
                env.observer.violation(&self.violation(env, item, &decision));
            }
        }
        let mut worst: Option<(usize, Decision)> = None;
        for (i, item) in items.iter().enumerate() {
            let Some(decision) = item.decision.filter(|d| !d.allowed && !item.rule.shadow) else { continue };
            env.observer.count(Metric::Denied(item.at.rule));
            env.observer.violation(&self.violation(env, item, &decision));
            if worst.is_none_or(|(_, w)| decision.retry_after_nanos > w.retry_after_nanos) {
                worst = Some((i, decision));
            }
        }
        worst.map(|(i, decision)| items[i].deny(&decision, now))
    }

    /// Consumes from every item in turn; the denial to send if one of them cannot be consumed
    /// after all (what the earlier ones took is given back first; a store error while giving back
    /// is counted and never turns the denial into an admission).
    fn commit(&self, env: &Env<'_>, items: &mut [Item<'_>]) -> Result<Option<Verdict>, StoreError> {
        for i in 0..items.len() {
            if items[i].skip {
                continue;
            }
            let applied = self.consume_item(env, &items[i])?;
            if let Some(refused) = self.settle_item(env, &mut items[i], applied) {
                let taken: Vec<Consumed> = items[..i].iter().filter_map(Item::consumed).collect();
                self.give_back(env, &taken);
                return Ok(Some(refused));
            }
        }
        Ok(None)
    }

    /// A limit's decision on `state`, with the turn reserved for the request when the limit denies
    /// it but may delay it: (decision, the wait for its turn or 0, the state to store if any). A
    /// shadow rule never delays.
    fn measure(&self, item: &Item<'_>, state: State, now: u64) -> (Decision, u64, Option<State>) {
        let algorithm = &item.limit.algorithm;
        let (decision, next) = algorithm.decide(state, now, item.cost);
        if decision.allowed {
            return (decision, 0, Some(next));
        }
        let delay = item.limit.delay.filter(|d| !item.rule.shadow && self.may_queue(item.fp.0, d));
        match delay.and_then(|d| algorithm.reserve(state, now, item.cost, d.max_nanos)) {
            Some(turn) => (turn.decision, turn.wait_nanos, Some(turn.state)),
            None => (decision, 0, None),
        }
    }

    /// Read-compute-CAS of one item's bucket, as [`Self::measure`] decides it.
    fn consume_item(&self, env: &Env<'_>, item: &Item<'_>) -> Result<Applied<(Decision, u64)>, StoreError> {
        let now = env.now();
        let bucket = Bucket { fp: item.fp, algorithm: &item.limit.algorithm, now };
        let mut events = TableEvents::default();
        let table = self.table(item.share);
        let applied = table.measure_and_replace(env.store, bucket, Some(item.lookup), &mut events, |state| {
            let (decision, wait, next) = self.measure(item, state, now);
            ((decision, wait), next)
        });
        count_events(env, &events);
        applied
    }

    /// Read-compute-CAS of one bucket at `cost`, from `first` (a fresh lookup when `None`): the
    /// write only happens if the limit still allows it. What the table ran into is counted, even
    /// when a store error then ends the operation.
    pub(super) fn consume(
        &self,
        env: &Env<'_>,
        table: &Table<'_>,
        bucket: Bucket<'_>,
        first: Option<Lookup>,
        cost: u64,
    ) -> Result<Applied<Decision>, StoreError> {
        let (algorithm, now) = (bucket.algorithm, bucket.now);
        let mut events = TableEvents::default();
        let applied = table.measure_and_replace(env.store, bucket, first, &mut events, |state| {
            let (decision, next) = algorithm.decide(state, now, cost);
            (decision, decision.allowed.then_some(next))
        });
        count_events(env, &events);
        applied
    }

    /// Records what consuming one item did; the denial when it refused the request.
    fn settle_item(
        &self,
        env: &Env<'_>,
        item: &mut Item<'_>,
        applied: Applied<(Decision, u64)>,
    ) -> Option<Verdict> {
        let (observer, rule, shadow) = (env.observer, item.at.rule, item.rule.shadow);
        match applied {
            Applied::Stored { decision: (decision, wait), index, reclaimed, state } => {
                if reclaimed {
                    observer.count(Metric::SlotReclaimed);
                }
                item.decision = Some(decision);
                item.wait = wait;
                item.stored = Some((index, state));
                None
            }
            Applied::Unchanged((decision, _)) if shadow => {
                // Another worker took the last of a shadow limit: report it, deny nothing.
                observer.count(Metric::ShadowDenied(rule));
                item.decision = Some(decision);
                None
            }
            Applied::Unchanged((decision, _)) => {
                // Another worker took the last of it between our check and our write.
                observer.count(Metric::Denied(rule));
                observer.violation(&self.violation(env, item, &decision));
                Some(item.deny(&decision, env.now()))
            }
            Applied::Full => {
                observer.count(Metric::TableFull(rule));
                if shadow || item.rule.when_table_full == TableFullPolicy::Allow {
                    item.decision = None;
                    return None;
                }
                observer.count(Metric::Denied(rule));
                Some(table_full_denial())
            }
            Applied::Exhausted => {
                observer.count(Metric::CasRetriesExhausted);
                if shadow {
                    return None;
                }
                // Never over-admit: a request that cannot be recorded is refused.
                observer.count(Metric::Denied(rule));
                Some(Verdict::Deny { report: None, retry_after_seconds: Some(1), reason: None })
            }
        }
    }

    /// The request passes: counts once per rule, reports the most restrictive limit.
    fn allow(&self, env: &Env<'_>, items: &[Item<'_>]) -> Verdict {
        let turn = Self::turn(env, items);
        // Concurrency units are held until the request ends; the rest only a later global denial
        // or a client leaving while it waits needs. Without either, nothing is allocated.
        let keep_all = self.config.global.is_some() || turn.is_some();
        let consumed =
            items.iter().filter(|i| keep_all || i.outlives_admission()).filter_map(Item::consumed).collect();
        let now = env.now();
        let mut report: Option<Reported> = None;
        let mut counted: Option<usize> = None;
        let mut allowed_by = Vec::new();
        for item in items {
            if counted != Some(item.at.rule) && !item.skip {
                // With global rules, a request is allowed only once the service has agreed.
                if self.config.global.is_some() {
                    allowed_by.push(item.at.rule);
                } else {
                    env.observer.count(Metric::Allowed(item.at.rule));
                }
                counted = Some(item.at.rule);
            }
            let Some(decision) = item.decision else { continue };
            report = most_restrictive(report, Some(item.report(&decision, now)));
        }
        Verdict::Allow { report, consumed, turn, allowed_by }
    }

    /// The latest of the turns reserved for the request, counted per rule. The wait is held on
    /// this worker's clock from now, so it never exceeds `max_delay`, even when the bucket's time
    /// (another worker's reading) runs ahead of this worker's.
    fn turn(env: &Env<'_>, items: &[Item<'_>]) -> Option<Turn> {
        let delayed: Vec<&Item<'_>> = items.iter().filter(|i| i.wait > 0).collect();
        let wait = delayed.iter().map(|i| i.wait).max()?;
        let mut counted: Option<usize> = None;
        for item in &delayed {
            if counted != Some(item.at.rule) {
                env.observer.count(Metric::Delayed(item.at.rule));
                env.observer.add(Metric::DelayedMs(item.at.rule), item.wait / 1_000_000);
                counted = Some(item.at.rule);
            }
        }
        Some(Turn {
            until: env.now().saturating_add(wait),
            wait,
            keys: delayed.iter().map(|i| i.fp.0).collect(),
        })
    }

    /// Gives back what `consumed` took (a later limit or a global rule denied the request). Errors
    /// are counted: the request stays denied.
    pub fn give_back(&self, env: &Env<'_>, consumed: &[Consumed]) {
        for c in consumed {
            match c.give_back(env, self) {
                Ok(true) => {}
                Ok(false) => env.observer.count(Metric::CasRetriesExhausted),
                Err(_) => env.observer.count(Metric::StoreError),
            }
        }
    }

    /// A request whose cost no limit can ever hold: denied with a reason (no Retry-After), or
    /// only logged for a shadow rule (then `None`: carry on).
    fn refuse_cost(&self, env: &Env<'_>, refusal: CostRefusal<'_>) -> Option<Verdict> {
        let CostRefusal { index, rule, limit, plan, fp, cost, reason } = refusal;
        let shadow = rule.shadow;
        env.observer.count(if shadow { Metric::ShadowDenied(index) } else { Metric::Denied(index) });
        env.observer.violation(&Violation {
            rule: &rule.name,
            limit: limit.map(|l| l.name.as_str()),
            plan,
            cost,
            key_hash: fp.0,
            key: self.key_for_log(rule, env),
            retry_after_seconds: None,
            reason: Some(reason.to_string()),
            shadow,
            at: env.now(),
        });
        (!shadow).then_some(Verdict::Deny { report: None, retry_after_seconds: None, reason: Some(reason) })
    }

    fn key_for_log(&self, rule: &Rule, env: &Env<'_>) -> Option<String> {
        self.config.violation_log.include_key.then(|| key_text(rule, env.request))
    }

    fn violation<'a>(&'a self, env: &Env<'_>, item: &Item<'a>, decision: &Decision) -> Violation<'a> {
        Violation {
            rule: &item.rule.name,
            limit: Some(&item.limit.name),
            plan: item.plan,
            cost: item.cost,
            key_hash: item.fp.0,
            key: self.key_for_log(item.rule, env),
            retry_after_seconds: Some(ceil_seconds(decision.retry_after_nanos).max(1)),
            reason: None,
            shadow: item.rule.shadow,
            at: env.now(),
        }
    }
}
