//! The decision for one request: every matching rule is checked, the request passes only if all
//! pass, and a denied request consumes from none of them.

use crate::config::{Config, Rule, TableFullPolicy};
use crate::headers::LimitReport;
use crate::keys::{request_key, Fingerprint};
use crate::request::Request;
use crate::store::{SharedStore, StoreError};
use crate::table::{Applied, Lookup, Table, TableEvents};
use crate::token_bucket::{ceil_seconds, Decision};

/// Something worth counting; the wasm glue maps each to a proxy-wasm counter.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Metric {
    Allowed(usize),
    Denied(usize),
    /// A key found its whole probe window live; the table-full policy was applied.
    TableFull,
    /// A request gave up after losing the CAS race too often (it is denied).
    CasRetriesExhausted,
    /// An idle slot (a bucket that had refilled) was reused for another key.
    SlotReclaimed,
    /// Two workers inserted one key at once; the copies were folded into one.
    DuplicateFolded,
    /// The host refused a shared-data call (the request is allowed).
    StoreError,
}

/// Where the wasm glue sends counts.
pub trait Metrics {
    fn count(&self, metric: Metric);
}

/// The limiter's answer for one request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Pass the request; `report` is the most restrictive limit that applied.
    Allow { report: Option<Report> },
    /// Answer with the deny response.
    Deny { report: Option<Report>, retry_after_seconds: u64 },
}

/// The limit to report in headers, by rule index.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Report {
    pub rule: usize,
    pub remaining: u64,
    pub reset_seconds: u64,
}

impl Report {
    fn new(rule: usize, decision: &Decision) -> Report {
        Report { rule, remaining: decision.remaining, reset_seconds: ceil_seconds(decision.reset_nanos) }
    }
}

/// The Retry-After sent when the table itself is the reason for a denial.
const TABLE_FULL_RETRY_AFTER_SECONDS: u64 = 1;

struct Item {
    rule: usize,
    fp: Fingerprint,
    lookup: Lookup,
    decision: Option<Decision>,
    stored_at: Option<u32>,
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

    /// The header-ready view of a report.
    pub fn describe(&self, report: &Report) -> Option<LimitReport<'_>> {
        let rule = self.config.rules.get(report.rule)?;
        Some(LimitReport {
            policy: &rule.policy,
            rule_name: &rule.name,
            limit: rule.bucket.capacity(),
            remaining: report.remaining,
            reset_seconds: report.reset_seconds,
        })
    }

    pub fn check(
        &self,
        store: &dyn SharedStore,
        request: &dyn Request,
        now: u64,
        metrics: &dyn Metrics,
    ) -> Verdict {
        match self.try_check(store, request, now, metrics) {
            Ok(verdict) => verdict,
            Err(_) => {
                // The host refused shared data: failing open keeps traffic flowing.
                metrics.count(Metric::StoreError);
                Verdict::Allow { report: None }
            }
        }
    }

    fn try_check(
        &self,
        store: &dyn SharedStore,
        request: &dyn Request,
        now: u64,
        metrics: &dyn Metrics,
    ) -> Result<Verdict, StoreError> {
        let table = self.table();
        let rules = &self.config.rules;
        let mut items: Vec<Item> = Vec::new();
        for (index, rule) in rules.iter().enumerate() {
            if !rule.matcher.matches(request) {
                continue;
            }
            let Some(fp) = request_key(self.seed, rule, request) else { continue };
            let lookup = table.lookup(store, fp, now)?;
            if lookup == Lookup::Full {
                metrics.count(Metric::TableFull);
                match self.config.when_table_full {
                    TableFullPolicy::Allow => continue,
                    TableFullPolicy::Deny => {
                        metrics.count(Metric::Denied(index));
                        return Ok(Verdict::Deny {
                            report: None,
                            retry_after_seconds: TABLE_FULL_RETRY_AFTER_SECONDS,
                        });
                    }
                }
            }
            items.push(Item { rule: index, fp, lookup, decision: None, stored_at: None });
        }

        // Check everything before writing anything: the usual denial costs no write at all.
        let mut denial: Option<(usize, Decision)> = None;
        for item in &items {
            let rule = &rules[item.rule];
            let (decision, _) = rule.bucket.decide(item.lookup.state(), now, rule.cost);
            if !decision.allowed {
                metrics.count(Metric::Denied(item.rule));
                if denial.is_none_or(|(_, d)| decision.retry_after_nanos > d.retry_after_nanos) {
                    denial = Some((item.rule, decision));
                }
            }
        }
        if let Some((rule, decision)) = denial {
            return Ok(deny(rule, &decision));
        }

        for i in 0..items.len() {
            let item = &items[i];
            let rule = &rules[item.rule];
            let mut events = TableEvents::default();
            let applied =
                table.measure_and_replace(store, item.fp, now, Some(item.lookup), &mut events, |state| {
                    let (decision, next) = rule.bucket.decide(state, now, rule.cost);
                    (decision, decision.allowed.then_some(next))
                })?;
            for _ in 0..events.duplicates_folded {
                metrics.count(Metric::DuplicateFolded);
            }
            if events.confirm_exhausted {
                metrics.count(Metric::CasRetriesExhausted);
            }
            let refused = match applied {
                Applied::Stored { decision, index, reclaimed } => {
                    if reclaimed {
                        metrics.count(Metric::SlotReclaimed);
                    }
                    items[i].decision = Some(decision);
                    items[i].stored_at = Some(index);
                    continue;
                }
                Applied::Unchanged(decision) => {
                    // Another worker took the last tokens between our check and our write.
                    metrics.count(Metric::Denied(item.rule));
                    deny(item.rule, &decision)
                }
                Applied::Full => {
                    metrics.count(Metric::TableFull);
                    if self.config.when_table_full == TableFullPolicy::Allow {
                        continue;
                    }
                    metrics.count(Metric::Denied(item.rule));
                    Verdict::Deny { report: None, retry_after_seconds: TABLE_FULL_RETRY_AFTER_SECONDS }
                }
                Applied::Exhausted => {
                    // Never over-admit: a request that cannot be recorded is refused.
                    metrics.count(Metric::CasRetriesExhausted);
                    metrics.count(Metric::Denied(item.rule));
                    Verdict::Deny { report: None, retry_after_seconds: 1 }
                }
            };
            self.refund(store, &table, &items[..i], now, metrics)?;
            return Ok(refused);
        }

        let mut report: Option<Report> = None;
        for item in &items {
            let Some(decision) = item.decision else { continue };
            metrics.count(Metric::Allowed(item.rule));
            let candidate = Report::new(item.rule, &decision);
            if report.is_none_or(|r| more_restrictive(&candidate, &r)) {
                report = Some(candidate);
            }
        }
        Ok(Verdict::Allow { report })
    }

    /// Gives back what the first limits of a request took when a later one refused it.
    fn refund(
        &self,
        store: &dyn SharedStore,
        table: &Table<'_>,
        consumed: &[Item],
        now: u64,
        metrics: &dyn Metrics,
    ) -> Result<(), StoreError> {
        for item in consumed {
            let Some(index) = item.stored_at else { continue };
            let rule: &Rule = &self.config.rules[item.rule];
            if !table.update_at(store, item.fp, index, |state| rule.bucket.refund(state, now, rule.cost))? {
                metrics.count(Metric::CasRetriesExhausted);
            }
        }
        Ok(())
    }
}

fn deny(rule: usize, decision: &Decision) -> Verdict {
    let report = Report::new(rule, decision);
    Verdict::Deny { report: Some(report), retry_after_seconds: report.reset_seconds.max(1) }
}

/// Lowest remaining first; then the longer wait; then the earlier rule (already held).
fn more_restrictive(a: &Report, b: &Report) -> bool {
    (a.remaining, std::cmp::Reverse(a.reset_seconds)) < (b.remaining, std::cmp::Reverse(b.reset_seconds))
}

#[cfg(test)]
#[path = "limiter_tests.rs"]
mod tests;
