//! Global rules with a lease: a request spends from its key's lease when it can, and needs no
//! call for that rule; a lease running low is refreshed in the background (one call per key at a
//! time across the Envoy's workers), and an empty one is refilled by the request's own call.

use super::background::Background;
use super::{Env, Limiter};
use crate::algorithm::time::NANOS_PER_MS;
use crate::config::Lease;
use crate::global::answer::{read_answer, CallError, Grant};
use crate::global::descriptors::prepare_charge;
use crate::global::GlobalCall;
use crate::lease::records::{give_back, granted, spend, Part, Record, Spend};
use crate::lease::{deadline, slot_key, ASK_HEADER, VALIDITY_HEADER};
use crate::report::metrics::Metric;
use crate::report::Observer;
use crate::request::keys::request_key;
use crate::request::plan::{cost_of, limits_for};
use crate::state::ledger;
use crate::state::store::SharedStore;
use crate::state::Fingerprint;

/// How long past its timeout a call's claim on a key's refresh lasts, should its answer be lost.
const CLAIM_MARGIN_NANOS: u64 = 1_000_000_000;

/// A leased rule's part in one request.
#[derive(Debug)]
pub(super) struct LeaseUse {
    pub rule: usize,
    key: Fingerprint,
    slot: String,
    spend: Spend,
}

impl LeaseUse {
    /// The lease decided the rule for this request: no call needed for it.
    pub fn decided(&self) -> bool {
        matches!(self.spend, Spend::Spent { .. })
    }
}

/// A call that may bring units for a key's lease: the request's own call, or a refresh.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeaseAsk {
    pub rule: usize,
    key: Fingerprint,
    slot: String,
    /// When the call was prepared: the lease's life is counted from then.
    sent_at: u64,
    /// The call's own hit joins the lease too (a refresh asks in no request's name).
    own_hit: bool,
    /// The units asked for.
    units: u64,
}

/// A background refresh for the glue to start from its root context.
#[derive(Debug, PartialEq, Eq)]
pub struct Refresh {
    pub ask: LeaseAsk,
    pub call: GlobalCall,
}

impl Limiter {
    /// Spends from the leases of the request's leased global rules.
    pub(super) fn spend_leases(&self, env: &Env<'_>) -> Vec<LeaseUse> {
        let mut uses = Vec::new();
        for (index, rule) in self.config.rules.iter().enumerate() {
            let Some(lease) = rule.lease.filter(|_| rule.global.is_some()) else { continue };
            if !rule.matcher.matches(env.request) {
                continue;
            }
            let Some(rule_key) = request_key(self.seed, rule, env.request) else { continue };
            let Ok(cost) = cost_of(rule, env.request) else { continue };
            // The checks the call would make (see `global::descriptors`): an unlimited plan is
            // asked nothing, so it spends nothing either.
            let chosen = limits_for(rule, env.request);
            if chosen.unlimited() {
                continue;
            }
            let key = rule_key.lease(chosen.plan_name());
            let slot = slot_key(&self.config.key_prefix, &rule.name, lease.table_size, key);
            let (now, below, claim) = (env.now(), u64::from(lease.refresh_below), self.claim_nanos());
            let spent = ledger::update(env.store, &slot, |records: &Vec<Record>| {
                spend(records, key, cost, now, below, claim)
            });
            // A lease that cannot be read decides nothing: the request asks the service.
            let spend = spent.unwrap_or(Spend::Short { ask: None });
            if matches!(spend, Spend::Spent { .. }) {
                env.observer.count(Metric::LeaseServed(index));
            }
            uses.push(LeaseUse { rule: index, key, slot, spend });
        }
        uses
    }

    /// After the request's call is prepared: the one lease that may ride on it (when the call is
    /// about that leased rule alone), and a background refresh for every other lease that claimed
    /// one.
    pub(super) fn plan_refreshes(
        &self,
        env: &Env<'_>,
        uses: &[LeaseUse],
        call: Option<&GlobalCall>,
    ) -> Option<LeaseAsk> {
        let alone = call.and_then(|c| {
            let rule = c.origins.first()?.rule;
            c.origins.iter().all(|o| o.rule == rule).then_some(rule)
        });
        let mut riding = None;
        for u in uses {
            let claimed = match u.spend {
                Spend::Spent { refresh, .. } => refresh,
                Spend::Short { ask } => ask,
            };
            let (Some(demand), Some(lease)) = (claimed, self.lease_of(u.rule)) else { continue };
            let ask = LeaseAsk {
                rule: u.rule,
                key: u.key,
                slot: u.slot.clone(),
                sent_at: env.now(),
                own_hit: false,
                units: lease.ask_for(demand.units, demand.over_nanos),
            };
            if matches!(u.spend, Spend::Short { .. }) && alone == Some(u.rule) {
                riding = Some(ask);
            } else if let Some(charge) = prepare_charge(&self.config, env.request, u.rule) {
                let refresh = Refresh { ask: LeaseAsk { own_hit: true, ..ask }, call: charge.call(1) };
                self.background().push(Background::Refresh(refresh));
            }
        }
        riding
    }

    /// What a denied request took from leases goes back.
    pub(super) fn give_back_leases(&self, env: &Env<'_>, uses: &[LeaseUse]) {
        let now = env.now();
        for u in uses {
            let Spend::Spent { taken, .. } = &u.spend else { continue };
            let _ = ledger::update(env.store, &u.slot, |records: &Vec<Record>| {
                ((), give_back(records, u.key, taken, now))
            });
        }
    }

    /// The answer to a call that asked for a lease: its grant (if any) joins the key's lease, and
    /// the key may be refreshed again.
    pub(super) fn lease_answered(
        &self,
        store: &dyn SharedStore,
        now: u64,
        ask: &LeaseAsk,
        grant: Option<&Grant>,
        observer: &dyn Observer,
    ) {
        let Some(lease) = self.lease_of(ask.rule) else { return };
        let part = grant.map(|g| Part {
            id: g.id.clone(),
            units: g.units + u64::from(ask.own_hit),
            deadline: deadline(ask.sent_at, lease.validity_nanos, g.reset_nanos, g.valid_until),
        });
        if let Some(p) = &part {
            observer.add(Metric::LeaseGranted(ask.rule), p.units);
        }
        let _ = ledger::update(store, &ask.slot, |records: &Vec<Record>| {
            ((), granted(records, ask.key, part.clone(), now))
        });
    }

    /// A background refresh was answered, or failed.
    pub(super) fn refreshed(
        &self,
        store: &dyn SharedStore,
        now: u64,
        refresh: &Refresh,
        answer: Result<&[u8], CallError>,
        observer: &dyn Observer,
    ) {
        observer.count(Metric::LeaseRefresh(refresh.ask.rule));
        let answer = answer.and_then(read_answer);
        if let Err(e) = &answer {
            observer.global_failure(&e.to_string());
        }
        let grant = answer.ok().and_then(|a| a.grant);
        self.lease_answered(store, now, &refresh.ask, grant.as_ref(), observer);
    }

    /// The gRPC metadata of a call that asks for a lease: the units and the longest validity (see
    /// `lease`).
    pub(super) fn lease_metadata(&self, ask: &LeaseAsk) -> Vec<(&'static str, String)> {
        let Some(lease) = self.lease_of(ask.rule) else { return Vec::new() };
        let validity_ms = lease.validity_nanos / NANOS_PER_MS;
        vec![(ASK_HEADER, ask.units.to_string()), (VALIDITY_HEADER, validity_ms.to_string())]
    }

    fn lease_of(&self, rule: usize) -> Option<Lease> {
        self.config.rules.get(rule)?.lease
    }

    /// How long a claim on a key's next grant lasts: the call's timeout, and a margin.
    fn claim_nanos(&self) -> u64 {
        let timeout = self.config.global.as_ref().map_or(0, |g| u64::from(g.timeout_ms) * NANOS_PER_MS);
        timeout + CLAIM_MARGIN_NANOS
    }
}
