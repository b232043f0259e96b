//! A request's plan (tier) and cost under a rule: which limits apply to it, and how much of them
//! it takes.

use std::fmt;

use super::{jwt, Request};
use crate::config::{Cost, Limit, Limits, PlanSource, Plans, Rule};

/// The limits a rule puts on one request.
#[derive(Clone, Copy, Debug)]
pub struct PlanLimits<'a> {
    /// The request's plan (index in the rule's plans, and name) when the rule has plans.
    pub plan: Option<(usize, &'a str)>,
    /// Empty for an unlimited plan, and for a global rule that leaves its limits to the service.
    pub limits: &'a [Limit],
}

impl<'a> PlanLimits<'a> {
    pub fn plan_name(&self) -> Option<&'a str> {
        self.plan.map(|(_, name)| name)
    }

    pub fn plan_index(&self) -> Option<usize> {
        self.plan.map(|(index, _)| index)
    }

    /// The request's plan is unlimited: no rule limits it (a global rule then asks nothing).
    pub fn unlimited(&self) -> bool {
        self.plan.is_some() && self.limits.is_empty()
    }
}

/// The plan of the request (for a rule with plans) and the limits that apply to it.
pub fn limits_for<'a>(rule: &'a Rule, request: &dyn Request) -> PlanLimits<'a> {
    match &rule.limits {
        Limits::List(limits) => PlanLimits { plan: None, limits },
        Limits::Plans(plans) => {
            let index = plan_of(plans, request);
            match plans.plans.get(index) {
                Some(p) => PlanLimits { plan: Some((index, &p.name)), limits: &p.limits },
                None => PlanLimits { plan: None, limits: &[] },
            }
        }
    }
}

/// The index of the request's plan: the one it names, else the default.
fn plan_of(plans: &Plans, request: &dyn Request) -> usize {
    let named = match &plans.source {
        PlanSource::Header(name) => request.header(name),
        PlanSource::JwtClaim(claim) => request.header("authorization").and_then(|a| jwt::claim(&a, claim)),
    };
    named
        .and_then(|n| plans.plans.iter().position(|p| p.name.as_bytes() == n.as_slice()))
        .unwrap_or(plans.default)
}

/// Why a request's cost cannot be accepted; sent to the client in `x-ratelimit-reason`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CostError {
    /// The cost header is not a positive whole number.
    NotAPositiveNumber { header: String },
    /// The cost header asks for more than the rule's `max`.
    AboveMaximum { cost: u64, header: String, max: u64 },
    /// The cost is more than a limit can ever hold: retrying cannot help.
    AboveCapacity { cost: u64, capacity: u64, limit: String },
}

impl fmt::Display for CostError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CostError::NotAPositiveNumber { header } => write!(f, "{header} must be a positive whole number"),
            CostError::AboveMaximum { cost, header, max } => {
                write!(f, "cost {cost} from {header} exceeds the maximum {max}")
            }
            CostError::AboveCapacity { cost, capacity, limit } => {
                write!(f, "cost {cost} exceeds the capacity {capacity} of limit {limit:?}")
            }
        }
    }
}

/// The request's cost under `rule`, or why it cannot be accepted.
pub fn cost_of(rule: &Rule, request: &dyn Request) -> Result<u64, CostError> {
    match &rule.cost {
        Cost::Constant(cost) => Ok(*cost),
        // The estimate now; the response's usage corrects it when the response arrives.
        Cost::Response { estimate, .. } => Ok(*estimate),
        Cost::Header { name, max, default } => {
            let Some(value) = request.header(name) else { return Ok(*default) };
            let cost = std::str::from_utf8(&value)
                .ok()
                .map(str::trim)
                .filter(|t| !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|t| t.parse::<u64>().ok())
                .filter(|c| *c > 0)
                .ok_or_else(|| CostError::NotAPositiveNumber { header: name.clone() })?;
            if cost > *max {
                return Err(CostError::AboveMaximum { cost, header: name.clone(), max: *max });
            }
            Ok(cost)
        }
    }
}

/// Refuses a cost above what `limit` can ever hold.
pub fn fits_capacity(cost: u64, limit: &Limit) -> Result<(), CostError> {
    let capacity = limit.algorithm.capacity();
    if cost > capacity {
        return Err(CostError::AboveCapacity { cost, capacity, limit: limit.name.clone() });
    }
    Ok(())
}
