//! `envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit`.

use std::borrow::Cow;
use std::collections::HashSet;
use std::sync::{Arc, RwLock};

use envoy_types::pb::envoy::extensions::common::ratelimit::v3::RateLimitDescriptor;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::quota::ExpirationSpecifier;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::{
    Code, DescriptorStatus, Quota, RateLimit,
};
use envoy_types::pb::envoy::service::ratelimit::v3::{RateLimitRequest, RateLimitResponse};
use envoy_types::pb::google::protobuf::{Duration as PbDuration, Timestamp};
use tonic::{Request, Status};

use crate::bounds::{descriptor_hits, request_hits, Bounds};
use crate::config::{Algorithm, Config, Rule, RuleLimit, Unit};
use crate::keys;
use crate::lease::{self, LeaseAsk, ReturnRequest, ReturnResponse};
use crate::log::Throttle;
use crate::metrics::Metrics;
use crate::store::{Check, LeaseArgs, Outcome, Store};

pub struct Limiter {
    pub config: Arc<RwLock<Arc<Config>>>,
    pub store: Store,
    pub metrics: Arc<Metrics>,
    pub default_algorithm: Algorithm,
    pub key_prefix: String,
    /// Every limit in shadow mode (`--shadow-mode`), whatever its configuration says.
    pub shadow_mode: bool,
    /// Checked before anything is counted.
    pub bounds: Bounds,
}

static REDIS_ERROR_LOG: Throttle = Throttle::new(10_000);
static REFUND_ERROR_LOG: Throttle = Throttle::new(10_000);
static LEASE_TRIM_LOG: Throttle = Throttle::new(10_000);

/// What to do for one descriptor.
enum Plan {
    /// Not limited: no override and no configured rate_limit (`no_limit`), or `unlimited`.
    Pass(&'static str),
    Limit {
        check: Check,
        shadow: bool,
        /// envoyproxy/ratelimit's `quota_mode`: over its limit, it denies the request only when
        /// every quota descriptor of the request is over.
        quota: bool,
        name: String,
    },
}

/// envoyproxy/ratelimit's `replaces`: a configured limit named by another configured limit of the
/// same request's `replaces` is not checked (and so not counted) for this request. Descriptors
/// with a `limit` override neither replace nor are replaced, as upstream.
fn drop_replaced(cfg: &Config, req: &RateLimitRequest, plans: Vec<Plan>) -> Vec<Plan> {
    let replaced: HashSet<&str> = req
        .descriptors
        .iter()
        .filter(|d| d.limit.is_none())
        .filter_map(|d| cfg.lookup(&req.domain, d.entries.iter().map(|e| (e.key.as_str(), e.value.as_str()))))
        .flat_map(|r| r.replaces.iter().map(String::as_str))
        .collect();
    if replaced.is_empty() {
        return plans;
    }
    plans
        .into_iter()
        .map(|p| match p {
            Plan::Limit { ref name, .. } if !name.is_empty() && replaced.contains(name.as_str()) => {
                Plan::Pass("replaced")
            }
            p => p,
        })
        .collect()
}

/// Whether the request is denied, as envoyproxy/ratelimit decides: a descriptor over its limit
/// denies unless it is in shadow mode or quota mode; quota descriptors deny together, when every
/// one of them is over (a shadow one never counts as over).
fn request_is_over(plans: &[Plan], outcomes: &[Option<Outcome>]) -> bool {
    let mut quota_total = 0;
    let mut quota_over = 0;
    for (p, o) in plans.iter().zip(outcomes) {
        let (Plan::Limit { shadow, quota, .. }, Some(o)) = (p, o) else { continue };
        let over_here = !o.allowed && !shadow;
        match quota {
            false if over_here => return true,
            false => {}
            true => {
                quota_total += 1;
                quota_over += usize::from(over_here);
            }
        }
    }
    quota_total > 0 && quota_over == quota_total
}

/// The entries that key a descriptor's counter: its own, except that an entry matched by a
/// `share_threshold` wildcard is keyed by the wildcard (`files/*`), so all its values share one
/// counter. A descriptor with a `limit` override keeps its own entries, as upstream.
fn counter_entries<'a>(
    d: &'a RateLimitDescriptor,
    found: Option<&(&Rule, Vec<Option<&str>>)>,
) -> Vec<(&'a str, Cow<'a, str>)> {
    let shared = found.filter(|_| d.limit.is_none()).map(|(_, s)| s.as_slice()).unwrap_or_default();
    d.entries
        .iter()
        .enumerate()
        .map(|(i, e)| match shared.get(i).copied().flatten() {
            Some(prefix) => (e.key.as_str(), Cow::Owned(format!("{prefix}*"))),
            None => (e.key.as_str(), Cow::Borrowed(e.value.as_str())),
        })
        .collect()
}

impl Limiter {
    fn plan(
        &self,
        cfg: &Config,
        domain: &str,
        d: &RateLimitDescriptor,
        request_hits: u64,
    ) -> Result<Plan, Status> {
        let entries = || d.entries.iter().map(|e| (e.key.as_str(), e.value.as_str()));
        let found = cfg.lookup_shared(domain, entries());
        let rule = found.as_ref().map(|(r, _)| *r);
        let (rpu, unit, name) = match (&d.limit, rule.map(|r| r.limit)) {
            (Some(o), _) => {
                let unit = Unit::from_proto(o.unit).ok_or_else(|| {
                    Status::invalid_argument(format!(
                        "descriptor limit override has an unknown unit ({})",
                        o.unit
                    ))
                })?;
                (o.requests_per_unit, unit, String::new())
            }
            (None, Some(RuleLimit::Limited { requests_per_unit, unit })) => {
                (requests_per_unit, unit, rule.map(|r| r.name.clone()).unwrap_or_default())
            }
            (None, Some(RuleLimit::Unlimited)) => return Ok(Plan::Pass("unlimited")),
            (None, Some(RuleLimit::None)) | (None, None) => return Ok(Plan::Pass("no_limit")),
        };
        let algorithm = rule.and_then(|r| r.algorithm).unwrap_or(self.default_algorithm);
        let hits = descriptor_hits(d, request_hits);
        let counter = counter_entries(d, found.as_ref());
        Ok(Plan::Limit {
            check: Check {
                key: keys::key(
                    &self.key_prefix,
                    domain,
                    counter.iter().map(|(k, v)| (*k, v.as_ref())),
                    algorithm,
                    unit,
                ),
                algorithm,
                limit: rpu,
                unit,
                hits,
            },
            shadow: self.shadow_mode || rule.is_some_and(|r| r.shadow_mode),
            quota: d.limit.is_none() && rule.is_some_and(|r| r.quota_mode),
            name,
        })
    }

    /// The plans of a request's descriptors, after the checks every request passes first (also
    /// a lease `Return`, so that it keys its descriptors exactly as the grant did).
    fn plans(&self, req: &RateLimitRequest) -> Result<Vec<Plan>, Status> {
        if req.domain.is_empty() {
            return Err(Status::invalid_argument("rate limit domain must not be empty"));
        }
        if req.descriptors.is_empty() {
            return Err(Status::invalid_argument("rate limit descriptor list must not be empty"));
        }
        self.bounds.check(req).map_err(|e| Status::invalid_argument(e.to_string()))?;
        let request_hits = request_hits(req);
        let cfg = self
            .config
            .read()
            .map(|c| Arc::clone(&c))
            .map_err(|_| Status::internal("configuration lock poisoned"))?;
        let plans = req
            .descriptors
            .iter()
            .map(|d| self.plan(&cfg, &req.domain, d, request_hits))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(drop_replaced(&cfg, req, plans))
    }

    /// `budget`: how long the caller waits (its gRPC deadline), if it said. `lease`: the units
    /// the caller asks for on top of its hits. `charge`: the hits are usage already spent, counted
    /// in every descriptor whatever the result (see `crate::charge`); it takes no lease.
    pub async fn decide(
        &self,
        req: RateLimitRequest,
        budget: Option<std::time::Duration>,
        lease: Option<LeaseAsk>,
        charge: bool,
    ) -> Result<RateLimitResponse, Status> {
        let plans = self.plans(&req)?;
        // No lease where a limit is in shadow mode: the service never refuses such a request,
        // so units taken for a lease would only charge the key for requests nobody made.
        let shadow = plans.iter().any(|p| matches!(p, Plan::Limit { shadow: true, .. }));
        let lease = lease.filter(|_| !shadow && !charge);
        let lease_id = lease.map(|_| lease::new_id());
        let lease_args = lease.zip(lease_id.as_deref()).map(|(ask, id)| LeaseArgs {
            id,
            units: ask.units,
            validity_ms: ask.validity_ms,
        });

        let deadline = self.store.deadline(budget);
        let results = futures_util::future::join_all(plans.iter().map(|p| async move {
            match p {
                Plan::Pass(_) => Ok(None),
                Plan::Limit { check, .. } => {
                    self.store.check(check, deadline, lease_args, charge).await.map(Some)
                }
            }
        }))
        .await;

        let mut outcomes: Vec<Option<Outcome>> = Vec::with_capacity(results.len());
        let mut first_err = None;
        for r in results {
            match r {
                Ok(o) => outcomes.push(o),
                Err(e) => {
                    first_err.get_or_insert(e);
                    outcomes.push(None);
                }
            }
        }
        let over = request_is_over(&plans, &outcomes);
        if let Some(e) = first_err {
            if let Some(n) = REDIS_ERROR_LOG.allow() {
                crate::warn!("redis call failed, answering UNAVAILABLE: {e} ({n} similar errors not logged)");
            }
            // Also a charge: the caller answered UNAVAILABLE may charge again, and must not be
            // counted twice.
            self.refund_all(&plans, &outcomes, lease_id.as_deref(), charge).await;
            return Err(Status::unavailable(format!("rate limit store unavailable: {e}")));
        }
        if over && !charge {
            // All or nothing: a denied request keeps no hits in the descriptors that allowed it.
            // A charge keeps them all: the usage has happened whatever the answer.
            self.refund_all(&plans, &outcomes, lease_id.as_deref(), false).await;
        }
        let quota = match lease_id {
            Some(id) if !over => self.settle_lease(&plans, &mut outcomes, id).await,
            _ => None,
        };

        let mut statuses = Vec::with_capacity(plans.len());
        for (p, o) in plans.iter().zip(&outcomes) {
            let (status, code) = match (p, o) {
                (Plan::Limit { check, shadow, name, .. }, Some(o)) => {
                    let over_here = !o.allowed;
                    let code = match (over_here, *shadow) {
                        (false, _) => "ok",
                        (true, false) => "over_limit",
                        (true, true) => "shadow_over_limit",
                    };
                    let st = DescriptorStatus {
                        code: if over_here && !*shadow { Code::OverLimit as i32 } else { Code::Ok as i32 },
                        current_limit: Some(RateLimit {
                            name: name.clone(),
                            requests_per_unit: check.limit,
                            unit: check.unit.to_proto(),
                        }),
                        limit_remaining: o.remaining.min(u64::from(u32::MAX)) as u32,
                        duration_until_reset: Some(PbDuration {
                            seconds: (o.reset_ms / 1000) as i64,
                            nanos: ((o.reset_ms % 1000) * 1_000_000) as i32,
                        }),
                        quota: quota.clone(),
                    };
                    (st, code)
                }
                (Plan::Pass(code), _) => (
                    DescriptorStatus { code: Code::Ok as i32, quota: quota.clone(), ..Default::default() },
                    *code,
                ),
                // Unreachable: a failed call returned UNAVAILABLE above.
                (Plan::Limit { .. }, None) => continue,
            };
            if !charge {
                self.metrics.descriptor(&req.domain, code);
            }
            statuses.push(status);
        }
        let overall = if over { "over_limit" } else { "ok" };
        // A charge decides no admission: counted on its own, not among the decisions.
        if charge {
            self.metrics.charge(&req.domain, overall);
        } else {
            self.metrics.decision(&req.domain, overall);
        }
        Ok(RateLimitResponse {
            overall_code: if over { Code::OverLimit } else { Code::Ok } as i32,
            statuses,
            ..Default::default()
        })
    }

    /// The lease of an allowed request: the same `g` for every descriptor, the smallest any of
    /// them granted. Each descriptor's script took its own grant atomically with its check (the
    /// descriptors may live on different Redis Cluster nodes, so no one script can see them
    /// all); what one took beyond `g` is given back here. Meanwhile those units only look spent,
    /// which can refuse a concurrent call but never admit one too many.
    async fn settle_lease(
        &self,
        plans: &[Plan],
        outcomes: &mut [Option<Outcome>],
        id: String,
    ) -> Option<Quota> {
        let limited: Vec<(&Check, &mut Outcome)> = plans
            .iter()
            .zip(outcomes.iter_mut())
            .filter_map(|(p, o)| match (p, o) {
                (Plan::Limit { check, .. }, Some(o)) => Some((check, o)),
                _ => None,
            })
            .collect();
        let g = limited.iter().map(|(_, o)| o.granted).min().unwrap_or(0);
        let trims = limited.into_iter().filter(|(_, o)| o.granted > g).map(|(check, o)| {
            let id = id.as_str();
            async move {
                match self.store.lease_return(check, id, o.granted - g, g == 0).await {
                    Ok(back) => o.remaining = o.remaining.saturating_add(back),
                    // The extra units stay spent until their window ends or the lease's key
                    // expires: fewer admitted, never more.
                    Err(e) => {
                        if let Some(n) = LEASE_TRIM_LOG.allow() {
                            crate::warn!(
                                "could not give back lease units beyond the request's grant: {e} ({n} similar errors not logged)"
                            );
                        }
                    }
                }
            }
        });
        futures_util::future::join_all(trims).await;
        if g == 0 {
            return None;
        }
        let valid_until = plans
            .iter()
            .zip(outcomes.iter())
            .filter_map(|(p, o)| match (p, o) {
                (Plan::Limit { .. }, Some(o)) => Some(o.valid_until_ms),
                _ => None,
            })
            .min()
            .unwrap_or(0);
        self.metrics.lease_granted(g);
        Some(Quota {
            requests: g.min(u64::from(u32::MAX)) as u32,
            id,
            expiration_specifier: Some(ExpirationSpecifier::ValidUntil(Timestamp {
                seconds: valid_until.div_euclid(1000),
                nanos: (valid_until.rem_euclid(1000) * 1_000_000) as i32,
            })),
        })
    }

    /// Gives back what a request that is not allowed took: its hits and any lease units.
    /// `charge`: the scripts counted the hits also where they answered over the limit (except
    /// against a limit of 0, which counts nothing).
    async fn refund_all(
        &self,
        plans: &[Plan],
        outcomes: &[Option<Outcome>],
        lease_id: Option<&str>,
        charge: bool,
    ) {
        let jobs = plans.iter().zip(outcomes).filter_map(|(p, o)| match (p, o) {
            (Plan::Limit { check, .. }, Some(o))
                if (o.allowed || (charge && check.limit > 0)) && (check.hits > 0 || o.granted > 0) =>
            {
                Some((check, o))
            }
            _ => None,
        });
        let results = futures_util::future::join_all(jobs.map(|(c, o)| async move {
            if let (Some(id), true) = (lease_id, o.granted > 0) {
                self.store.lease_return(c, id, o.granted, true).await?;
            }
            if c.hits == 0 {
                return Ok(());
            }
            let r = self.store.refund(c, o).await;
            if r.is_ok() {
                self.metrics.refund();
            }
            r
        }))
        .await;
        if let Some(Err(e)) = results.into_iter().find(|r| r.is_err()) {
            if let Some(n) = REFUND_ERROR_LOG.allow() {
                crate::warn!(
                    "could not give back hits of a denied request: {e} ({n} similar errors not logged)"
                );
            }
        }
    }
}

impl Limiter {
    /// One call: the decision, or a gRPC error counted by status.
    pub async fn answer(&self, request: Request<RateLimitRequest>) -> Result<RateLimitResponse, Status> {
        let budget = crate::grpc::grpc_timeout(request.metadata());
        let asked = crate::charge::charge_asked(request.metadata())
            .map_err(|e| Status::invalid_argument(e.to_string()))
            .and_then(|charge| {
                lease::lease_ask(request.metadata())
                    .map(|ask| (ask, charge))
                    .map_err(|e| Status::invalid_argument(e.to_string()))
            });
        let r = match asked {
            Ok((ask, charge)) => self.decide(request.into_inner(), budget, ask, charge).await,
            Err(e) => Err(e),
        };
        if let Err(s) = &r {
            self.metrics.grpc_error(match s.code() {
                tonic::Code::InvalidArgument => "invalid_argument",
                tonic::Code::Unavailable => "unavailable",
                _ => "other",
            });
        }
        r
    }
}

impl Limiter {
    /// `Leases/Return`: gives back up to `units` of lease `id` to each of its descriptors and
    /// ends the lease (see `scripts::LEASE_RETURN`), counted by outcome.
    pub async fn give_back(&self, r: ReturnRequest) -> Result<ReturnResponse, Status> {
        let result = self.give_back_inner(r).await;
        self.metrics.lease_return(match &result {
            Ok(r) if r.refunded > 0 => "refunded",
            Ok(_) => "nothing",
            Err(s) if s.code() == tonic::Code::InvalidArgument => "invalid_argument",
            Err(s) if s.code() == tonic::Code::Unavailable => "unavailable",
            Err(_) => "other",
        });
        if let Ok(r) = &result {
            self.metrics.lease_refunded(r.refunded);
        }
        result
    }

    async fn give_back_inner(&self, r: ReturnRequest) -> Result<ReturnResponse, Status> {
        if !lease::valid_id(&r.id) {
            return Err(Status::invalid_argument(format!(
                "lease id must be 1 to {} bytes of A-Z, a-z, 0-9, '-', '_', '.'",
                lease::MAX_ID_BYTES
            )));
        }
        let req = RateLimitRequest { domain: r.domain, descriptors: r.descriptors, hits_addend: 0 };
        let plans = self.plans(&req)?;
        // No lease holds more: larger numbers only risk Lua's floating point.
        let units = r.units.min(lease::MAX_LEASE_UNITS);
        let id = r.id.as_str();
        let results = futures_util::future::join_all(plans.iter().filter_map(|p| match p {
            Plan::Limit { check, .. } => Some(self.store.lease_return(check, id, units, true)),
            Plan::Pass(_) => None,
        }))
        .await;
        let mut refunded = 0;
        for r in results {
            // A retry after UNAVAILABLE is safe: descriptors already given back have no lease left.
            let back = r.map_err(|e| Status::unavailable(format!("rate limit store unavailable: {e}")))?;
            refunded = refunded.max(back);
        }
        Ok(ReturnResponse { refunded })
    }
}
