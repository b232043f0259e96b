//! What the filter tells: the headers ([`headers`]) and local replies ([`reply`]) clients get, the
//! status endpoint's JSON ([`status`]), the violation log ([`violations`]), and the metrics
//! ([`metrics`]), with the [`Observer`] the core reports to.

pub mod headers;
pub mod metrics;
pub mod reply;
pub mod status;
pub mod violations;

use crate::config::{Config, LimitRef};
use crate::state::store::StoreError;
use headers::LimitReport;
use metrics::Metric;
use violations::Violation;

/// Where the core reports what happened: counters, and denials for the violation log. The wasm
/// glue implements it with Envoy's counters and log; tests record.
pub trait Observer {
    fn count(&self, metric: Metric);
    /// Adds `n` to a counter in one step (a total, such as milliseconds of delay: `n` can be
    /// large, so no implementation may loop over it).
    fn add(&self, metric: Metric, n: u64);
    fn violation(&self, _violation: &Violation<'_>) {}
    /// The rate limit service could not be asked or did not answer usefully.
    fn global_failure(&self, _reason: &str) {}
    /// The status endpoint could not read the table.
    fn status_unavailable(&self, _error: StoreError) {}
}

/// One limit as the client will be told about it. It names the limit by position, so a request
/// can keep it from its decision until its response headers without borrowing the configuration.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Reported {
    pub limit: LimitRef,
    /// `q` of the policy.
    pub quota: u64,
    /// `w` of the policy, seconds.
    pub window_seconds: u64,
    pub remaining: u64,
    /// Seconds until the quota is whole again; on a denial, until a retry can pass.
    pub reset_seconds: u64,
    /// The figures are the rate limit service's (so the policy prepared from the configured limit
    /// does not apply).
    pub from_service: bool,
}

impl Reported {
    /// Which of two to report: the lowest remaining, then the longer wait; on a tie, `other`.
    pub fn is_more_restrictive_than(&self, other: &Reported) -> bool {
        headers::more_restrictive(self.remaining, self.reset_seconds, other.remaining, other.reset_seconds)
    }

    /// The header-ready view, with the names from `config`.
    pub fn view<'a>(&self, config: &'a Config) -> LimitReport<'a> {
        let found = config.find(self.limit);
        let prepared = if self.from_service { None } else { found.and_then(|f| f.limit) };
        LimitReport {
            name: found.as_ref().map_or("", |f| f.name()),
            policy: prepared.and_then(|l| l.policy.as_deref()),
            quota: self.quota,
            window_seconds: self.window_seconds,
            remaining: self.remaining,
            reset_seconds: self.reset_seconds,
        }
    }
}

/// The most restrictive of two optional reports (`a` on a tie).
pub fn most_restrictive(a: Option<Reported>, b: Option<Reported>) -> Option<Reported> {
    match (a, b) {
        (Some(a), Some(b)) => Some(if b.is_more_restrictive_than(&a) { b } else { a }),
        (a, b) => a.or(b),
    }
}
