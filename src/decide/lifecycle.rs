//! The moments of one request, as the wasm glue calls them, and what the request carries between
//! them.

use super::holdings::Hold;
use super::idempotent::{BodyWanted, Claim, FleetClaim, KeyStep};
use super::leased::{LeaseAsk, LeaseUse};
use super::local::{Consumed, Turn, Verdict};
use super::{Env, Limiter};
use crate::config::{Cost, FailureMode};
use crate::global::answer::{read_answer, CallError};
use crate::global::descriptors::{prepare, prepare_charge, prepare_except, Charge};
use crate::global::protocol::{METHOD as RLS_METHOD, SERVICE as RLS_SERVICE};
use crate::global::verdict::verdict;
use crate::global::{GlobalCall, Purpose};
use crate::idempotency::protocol::{CLAIM, SERVICE as KEYS_SERVICE};
use crate::report::headers::render;
use crate::report::metrics::Metric;
use crate::report::reply::{self, LocalReply};
use crate::report::{most_restrictive, Observer, Reported};
use crate::request::Response;
use crate::state::store::SharedStore;

/// One request's state from its first moment to its last; owned by the HTTP context, passed to
/// every moment.
#[derive(Debug, Default)]
pub struct Exchange {
    /// Which request of the worker this is (the glue's context id), to find it when its turn comes.
    id: u32,
    /// The limit the response headers describe; set only when the request passes.
    report: Option<Reported>,
    /// The call to the rate limit service the request waits for.
    awaiting: Option<Awaiting>,
    /// Headers the rate limit service asked to add to the response.
    service_headers: Vec<(String, String)>,
    /// Headers the rate limit service asked to add to the request, for the glue to add before it
    /// resumes the request.
    upstream_headers: Vec<(String, String)>,
    /// Concurrency units the request holds until its stream ends.
    holds: Vec<Hold>,
    /// While it waits for its turn: what it took, to give back if it ends before its turn.
    reserved: Vec<Consumed>,
    /// What it took on an estimate, to correct with the usage its response states.
    metered: Vec<Consumed>,
    /// The idempotency key it holds, to complete or release when it ends.
    key: Option<Claim>,
    /// The lease its call to the service asks for, on the way.
    lease_ask: Option<LeaseAsk>,
    /// Global rules that admitted it on an estimate (with its descriptors), to charge with the
    /// usage its response states.
    metered_global: Vec<(usize, Charge)>,
}

impl Exchange {
    /// The exchange of request `id` (unique among the worker's requests in flight).
    pub fn for_request(id: u32) -> Exchange {
        Exchange { id, ..Exchange::default() }
    }

    /// The request is paused, waiting for the rate limit service.
    pub fn is_awaiting(&self) -> bool {
        self.awaiting.is_some()
    }

    /// The headers to add to the request before it goes upstream (once).
    pub fn take_upstream_headers(&mut self) -> Vec<(String, String)> {
        std::mem::take(&mut self.upstream_headers)
    }
}

/// The headers a response from upstream gets: the limit headers, and the rate limit service's.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ResponseHeaders {
    /// Ours, less any whose name the service sends (its figures win).
    pub limit: Vec<(&'static str, String)>,
    /// The service's, in its order (a name may repeat). No `content-type`: that belongs to the
    /// upstream's response (the service's applies to a deny response only).
    pub service: Vec<(String, String)>,
}

/// What the local rules let through, carried to the request's admission (or given back).
#[derive(Debug, Default)]
struct Passed {
    report: Option<Reported>,
    consumed: Vec<Consumed>,
    turn: Option<Turn>,
    /// Rules to count as having allowed it once it is admitted.
    allowed_by: Vec<usize>,
    /// What it took from the leases of global rules, to give back if it is denied.
    leases: Vec<LeaseUse>,
}

/// What a paused request waits for from the rate limit service.
#[derive(Debug)]
enum Awaiting {
    /// The decision on its global rules; what local limits took is given back if it denies.
    Decision { call: GlobalCall, passed: Passed },
    /// The standing in its global rules, for the status endpoint.
    Status(GlobalCall),
    /// The service's word on its idempotency key; then it goes on as admitted.
    Key { claim: FleetClaim, consumed: Vec<Consumed>, turn: Option<Turn> },
}

/// What the glue does after a moment.
#[derive(Debug, PartialEq, Eq)]
pub enum Next<'a> {
    /// Let the request go on (resume it, if it was paused).
    Continue,
    /// Answer the request with this reply instead.
    Reply(LocalReply<'a>),
    /// Call the rate limit service and pause the request; the answer, or the failure to start
    /// the call, goes to [`Limiter::answered`].
    Ask(Ask<'a>),
    /// Pause the request until its turn, the instant `until`: the tick that finds it due (see
    /// [`Limiter::tick`]) resumes it.
    Delay { until: u64 },
}

/// A call to start: ShouldRateLimit on the service's cluster.
#[derive(Debug, PartialEq, Eq)]
pub struct Ask<'a> {
    pub cluster: &'a str,
    /// The call's target for the host (see `global::protocol::call_target`).
    pub target: &'a [u8],
    /// The gRPC service and method: the Rate Limit Service's `ShouldRateLimit`, or our `Keys`.
    pub service: &'static str,
    pub method: &'static str,
    pub timeout_ms: u32,
    pub message: Vec<u8>,
    /// gRPC metadata to send with it (a lease request).
    pub metadata: Vec<(&'static str, String)>,
}

impl Limiter {
    /// Request headers: the status endpoint, the local rules, then the call for the global rules.
    pub fn decide(&self, env: &Env<'_>, exchange: &mut Exchange) -> Next<'_> {
        if self.is_status_request(env.request) {
            if let Some(denial) = self.limit_status_calls(env) {
                return Next::Reply(denial);
            }
            return self.ask_status(env, exchange);
        }
        let mut passed = match self.check(env) {
            Verdict::Allow { report, consumed, turn, allowed_by } => {
                Passed { report, consumed, turn, allowed_by, leases: Vec::new() }
            }
            Verdict::Deny { report, retry_after_seconds, reason } => {
                return Next::Reply(self.deny(report, retry_after_seconds, reason.map(|r| r.to_string())));
            }
        };
        passed.leases = self.spend_leases(env);
        let decided: Vec<usize> = passed.leases.iter().filter(|u| u.decided()).map(|u| u.rule).collect();
        // Its leases admitted it for those rules, as the service would have.
        passed.allowed_by.extend(&decided);
        let prepared = prepare_except(&self.config, env.request, Purpose::Decide, &decided);
        exchange.lease_ask =
            self.plan_refreshes(env, &passed.leases, prepared.as_ref().ok().and_then(Option::as_ref));
        match prepared {
            Ok(None) => {
                exchange.report = passed.report.take();
                exchange.metered_global = self.metered_global(env, None, &passed.leases);
                self.admit(env, exchange, passed)
            }
            Ok(Some(call)) => {
                let metadata = exchange.lease_ask.as_ref().map_or(Vec::new(), |a| self.lease_metadata(a));
                self.ask(exchange, Awaiting::Decision { call, passed }, metadata)
            }
            Err(refusal) => {
                self.give_back(env, &passed.consumed);
                self.give_back_leases(env, &passed.leases);
                env.observer.count(Metric::Denied(refusal.rule));
                Next::Reply(self.deny(None, None, Some(refusal.reason.to_string())))
            }
        }
    }

    /// The service's answer (the encoded `RateLimitResponse`), or why there is none, including
    /// a call that could not be started.
    pub fn answered(
        &self,
        env: &Env<'_>,
        exchange: &mut Exchange,
        answer: Result<&[u8], CallError>,
    ) -> Next<'_> {
        let Some(awaiting) = exchange.awaiting.take() else { return Next::Continue };
        let (call, mut passed) = match awaiting {
            Awaiting::Status(call) => return Next::Reply(self.status_reply(env, Some((&call, answer)))),
            Awaiting::Decision { call, passed } => (call, passed),
            Awaiting::Key { claim, consumed, turn } => {
                let step = self.fleet_answered(env, claim, answer);
                return self.after_key(env, exchange, step, consumed, turn);
            }
        };
        let answer = answer.and_then(read_answer);
        let failed = answer.is_err();
        if let Some(ask) = exchange.lease_ask.take() {
            let grant = answer.as_ref().ok().and_then(|a| a.grant.as_ref());
            self.lease_answered(env.store, env.now(), &ask, grant, env.observer);
        }
        let verdict = verdict(&self.config, &call, answer, env.observer);
        if failed && !verdict.deny {
            if let Err(denial) = self.fall_back(env, &call, &mut passed) {
                return Next::Reply(denial);
            }
        }
        if verdict.deny {
            self.give_back(env, &passed.consumed);
            self.give_back_leases(env, &passed.leases);
            let reply = self.deny(verdict.report, verdict.retry_after_seconds, None);
            return Next::Reply(reply.with_service_headers(verdict.response_headers));
        }
        exchange.report = most_restrictive(passed.report.take(), verdict.report);
        exchange.metered_global = self.metered_global(env, Some(&call), &passed.leases);
        exchange.service_headers = verdict.response_headers;
        exchange.upstream_headers = verdict.request_headers;
        self.admit(env, exchange, passed)
    }

    /// The call failed: the global rules with `failure_mode: local` are decided by their fallback
    /// limits, which join what the request passed; or the denial (everything taken given back).
    fn fall_back(&self, env: &Env<'_>, call: &GlobalCall, passed: &mut Passed) -> Result<(), LocalReply<'_>> {
        let failed: Vec<usize> = call
            .origins
            .iter()
            .map(|o| o.rule)
            .filter(|r| self.config.rules.get(*r).is_some_and(|rule| rule.global == Some(FailureMode::Local)))
            .collect();
        if failed.is_empty() {
            return Ok(());
        }
        match self.check_fallbacks(env, &failed) {
            Verdict::Allow { report, consumed, allowed_by, .. } => {
                passed.consumed.extend(consumed);
                passed.allowed_by.extend(allowed_by);
                passed.report = most_restrictive(passed.report.take(), report);
                Ok(())
            }
            Verdict::Deny { report, retry_after_seconds, reason } => {
                self.give_back(env, &passed.consumed);
                self.give_back_leases(env, &passed.leases);
                Err(self.deny(report, retry_after_seconds, reason.map(|r| r.to_string())))
            }
        }
    }

    /// The request is admitted: it holds its concurrency units, and goes on at once or waits for
    /// its turn.
    fn admit(&self, env: &Env<'_>, exchange: &mut Exchange, passed: Passed) -> Next<'_> {
        let Passed { consumed, turn, allowed_by, .. } = passed;
        for rule in allowed_by {
            env.observer.count(Metric::Allowed(rule));
        }
        let step = self.claim_key(env, exchange.id);
        self.after_key(env, exchange, step, consumed, turn)
    }

    /// Admission, once the request's idempotency key is settled: it goes on (at once or at its
    /// turn), is answered from its key, or waits for the service that keeps its key.
    fn after_key(
        &self,
        env: &Env<'_>,
        exchange: &mut Exchange,
        step: KeyStep,
        consumed: Vec<Consumed>,
        turn: Option<Turn>,
    ) -> Next<'_> {
        let answer = match step {
            KeyStep::Go(claim) => {
                exchange.key = claim;
                return self.go_on(env, exchange, consumed, turn);
            }
            KeyStep::Answer(answer) => answer,
            KeyStep::Ask(claim) => {
                return self.ask(exchange, Awaiting::Key { claim, consumed, turn }, Vec::new());
            }
        };
        // Answered from its key, it never reaches the upstream: it holds nothing, and what its
        // limits took stays taken (it was a request like any other).
        exchange.report = None;
        let held: Vec<Consumed> = consumed.into_iter().filter(|c| c.algorithm.is_concurrency()).collect();
        self.give_back(env, &held);
        Next::Reply(answer)
    }

    /// The request goes on, at once or at its turn, holding its concurrency units.
    fn go_on(
        &self,
        env: &Env<'_>,
        exchange: &mut Exchange,
        consumed: Vec<Consumed>,
        turn: Option<Turn>,
    ) -> Next<'_> {
        let metered = |c: &&Consumed| {
            self.config.rules.get(c.at.rule).is_some_and(|r| matches!(r.cost, Cost::Response { .. }))
        };
        exchange.metered = consumed.iter().filter(metered).copied().collect();
        let Some(turn) = turn.filter(|t| t.until > env.now()) else {
            exchange.holds = self.hold(consumed);
            return Next::Continue;
        };
        exchange.reserved = consumed.iter().filter(|c| !c.algorithm.is_concurrency()).copied().collect();
        exchange.holds = self.hold(consumed);
        self.queue().add(exchange.id, turn.until, turn.keys);
        Next::Delay { until: turn.until }
    }

    /// Response headers: a cost charged from the response is charged, and the headers to add to
    /// the response are returned.
    pub fn settle(&self, env: &Env<'_>, exchange: &mut Exchange, response: &dyn Response) -> ResponseHeaders {
        let mut report = exchange.report.take();
        // A usage the headers do not state may come in the trailers.
        let (metered, later) =
            self.split_by_usage_stated(std::mem::take(&mut exchange.metered), |c| c.at.rule, response);
        exchange.metered = later;
        if !metered.is_empty() {
            report = self.charge_usage(env, &metered, response, report);
        }
        let (metered_global, later) =
            self.split_by_usage_stated(std::mem::take(&mut exchange.metered_global), |(r, _)| *r, response);
        exchange.metered_global = later;
        for (rule, extra) in self.charge_global_usage(env, &metered_global, response) {
            // The service will count it: its figures, less the charge.
            if let Some(r) = report.as_mut().filter(|r| r.limit.rule == rule) {
                r.remaining = r.remaining.saturating_sub(extra);
            }
        }
        let report = report.map(|r| r.view(&self.config));
        let mut limit = render(self.config.headers, report.as_ref(), None);
        let mut service = std::mem::take(&mut exchange.service_headers);
        if !service.is_empty() {
            service.retain(|(name, _)| name != "content-type");
            limit.retain(|(name, _)| !service.iter().any(|(n, _)| n == name));
        }
        ResponseHeaders { limit, service }
    }

    /// Response trailers: the usage of costs charged from the response that the headers did not
    /// state (the headers have gone to the client by then: they showed the estimate).
    pub fn trailers(&self, env: &Env<'_>, exchange: &mut Exchange, trailers: &dyn Response) {
        let metered = std::mem::take(&mut exchange.metered);
        if !metered.is_empty() {
            self.charge_usage(env, &metered, trailers, None);
        }
        let metered_global = std::mem::take(&mut exchange.metered_global);
        self.charge_global_usage(env, &metered_global, trailers);
    }

    /// Splits `items` (each of the rule `rule_of` says) into those whose usage `response` states
    /// and the others.
    fn split_by_usage_stated<T>(
        &self,
        items: Vec<T>,
        rule_of: impl Fn(&T) -> usize,
        response: &dyn Response,
    ) -> (Vec<T>, Vec<T>) {
        items.into_iter().partition(|item| match self.config.rules.get(rule_of(item)).map(|r| &r.cost) {
            Some(Cost::Response { name, .. }) => response.header(name).is_some(),
            _ => true,
        })
    }

    /// Response headers, for a request that holds an idempotency key: what of the response to
    /// keep for a retry (`end_of_stream`: there is no body).
    pub fn keep_response(&self, exchange: &mut Exchange, response: &dyn Response, end_of_stream: bool) {
        if let Some(claim) = exchange.key.as_mut() {
            self.capture_headers(claim, response, end_of_stream);
        }
    }

    /// What the glue should hand over of the response body.
    pub fn wants_response_body(&self, exchange: &Exchange) -> BodyWanted {
        exchange.key.as_ref().map_or(BodyWanted::Nothing, Limiter::wants_body)
    }

    /// A piece of the response body (empty when only its end is wanted); `end`: the last.
    pub fn response_body(&self, exchange: &mut Exchange, chunk: &[u8], end: bool) {
        if let Some(claim) = exchange.key.as_mut() {
            self.capture_body(claim, chunk, end);
        }
    }

    /// The stream is over, whatever ended it (response sent, client or upstream reset, timeout, a
    /// local reply): the concurrency units it held are released, and a request still waiting for
    /// the rate limit service gives back what its local limits took (it was never admitted).
    pub fn end(&self, env: &Env<'_>, exchange: &mut Exchange) {
        match exchange.awaiting.take() {
            Some(Awaiting::Decision { passed, .. }) => {
                self.give_back(env, &passed.consumed);
                self.give_back_leases(env, &passed.leases);
            }
            // It never went on; its claim at the service (if made) lapses after in_flight_timeout.
            Some(Awaiting::Key { consumed, .. }) => self.give_back(env, &consumed),
            _ => {}
        }
        if let Some(ask) = exchange.lease_ask.take() {
            // Its call never answered: the key may be refreshed again.
            self.lease_answered(env.store, env.now(), &ask, None, env.observer);
        }
        let reserved = std::mem::take(&mut exchange.reserved);
        if !reserved.is_empty() && self.queue().remove(exchange.id) {
            // It went away before its turn: the turn goes back to the bucket.
            env.observer.count(Metric::DelayAbandoned);
            self.give_back(env, &reserved);
        }
        let holds = std::mem::take(&mut exchange.holds);
        if !holds.is_empty() {
            self.release(env, &holds);
        }
        if let Some(claim) = exchange.key.take() {
            self.finish_key(env, claim);
        }
    }

    /// Background work of one worker, on its every tick: renewing the lease of the concurrency
    /// units its requests hold. The requests whose turn has come, to resume, earliest first.
    pub fn tick(&self, store: &dyn SharedStore, now: u64, observer: &dyn Observer) -> Vec<u32> {
        self.renew_holdings(store, now, observer);
        self.queue().due(now)
    }

    /// The global rules with a cost from the response that admitted the request (those its call
    /// asked about, and those its leases decided), each with its descriptors for a later charge.
    fn metered_global(
        &self,
        env: &Env<'_>,
        call: Option<&GlobalCall>,
        leases: &[LeaseUse],
    ) -> Vec<(usize, Charge)> {
        let asked = call.into_iter().flat_map(|c| c.origins.iter().map(|o| o.rule));
        let leased = leases.iter().filter(|u| u.decided()).map(|u| u.rule);
        let mut rules: Vec<usize> = asked
            .chain(leased)
            .filter(|r| {
                self.config.rules.get(*r).is_some_and(|rule| matches!(rule.cost, Cost::Response { .. }))
            })
            .collect();
        rules.sort_unstable();
        rules.dedup();
        rules.into_iter().filter_map(|r| Some((r, prepare_charge(&self.config, env.request, r)?))).collect()
    }

    fn ask_status(&self, env: &Env<'_>, exchange: &mut Exchange) -> Next<'_> {
        match prepare(&self.config, env.request, Purpose::Status) {
            Ok(Some(call)) => self.ask(exchange, Awaiting::Status(call), Vec::new()),
            _ => Next::Reply(self.status_reply(env, None)),
        }
    }

    /// The call a request waits for: the Rate Limit Service's `ShouldRateLimit` for its global
    /// rules or the status, our `Keys/Claim` for an idempotency key kept by the service.
    fn ask(
        &self,
        exchange: &mut Exchange,
        mut awaiting: Awaiting,
        metadata: Vec<(&'static str, String)>,
    ) -> Next<'_> {
        let Some(global) = &self.config.global else { return Next::Continue };
        let (message, service, method) = match &mut awaiting {
            Awaiting::Decision { call, .. } | Awaiting::Status(call) => {
                (std::mem::take(&mut call.message), RLS_SERVICE, RLS_METHOD)
            }
            Awaiting::Key { claim, .. } => (std::mem::take(&mut claim.message), KEYS_SERVICE, CLAIM),
        };
        exchange.awaiting = Some(awaiting);
        let target = &self.call_target;
        Next::Ask(Ask {
            cluster: &global.cluster,
            target,
            service,
            method,
            timeout_ms: global.timeout_ms,
            message,
            metadata,
        })
    }

    fn deny(
        &self,
        report: Option<Reported>,
        retry_after_seconds: Option<u64>,
        reason: Option<String>,
    ) -> LocalReply<'_> {
        let view = report.map(|r| r.view(&self.config));
        reply::deny(&self.config, view.as_ref(), retry_after_seconds, reason)
    }
}
