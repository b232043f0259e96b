//! The status endpoint: the caller's standing in every limit that applies to it, consuming
//! nothing. Local limits are read from the table; global ones are asked of the service (hits 0).

use super::{Env, Limiter};
use crate::config::{Found, TableFullPolicy};
use crate::global::answer::{read_answer, CallError};
use crate::global::{verdict, GlobalCall};
use crate::report::headers::LimitReport;
use crate::report::metrics::Metric;
use crate::report::reply::{self, LocalReply};
use crate::report::status::{status_json, Standing};
use crate::request::keys::{request_key, status_key};
use crate::request::plan::limits_for;
use crate::request::Request;
use crate::state::store::StoreError;
use crate::state::table::{Applied, Bucket};

impl Limiter {
    /// `GET` or `HEAD` on `status_path` (any query string).
    pub(super) fn is_status_request(&self, request: &dyn Request) -> bool {
        let Some(status_path) = &self.config.status_path else { return false };
        // The path first: on every other request, that is the only header read.
        let path_ok = request.header(":path").is_some_and(|p| {
            let end = p.iter().position(|&b| b == b'?').unwrap_or(p.len());
            &p[..end] == status_path.as_bytes()
        });
        path_ok && request.header(":method").is_some_and(|m| m == b"GET" || m == b"HEAD")
    }

    /// The status endpoint's own limit, per client address: the deny reply when this call is over
    /// it. A store that fails lets the call through, as for rules.
    pub(super) fn limit_status_calls(&self, env: &Env<'_>) -> Option<LocalReply<'_>> {
        let (limit, now) = (&self.config.status_limit, env.now());
        // Only a configuration with a status path has a share, and only it has status requests.
        let share = self.config.status_table?;
        let bucket =
            Bucket { fp: status_key(self.seed, env.request, limit.kind), algorithm: &limit.algorithm, now };
        let decision = match self.consume(env, &self.table(share), bucket, None, 1) {
            Ok(Applied::Unchanged(decision)) => decision,
            Ok(Applied::Full) => {
                env.observer.count(Metric::StatusTableFull);
                if self.config.when_table_full == TableFullPolicy::Allow {
                    return None;
                }
                env.observer.count(Metric::StatusDenied);
                return Some(reply::deny(&self.config, None, Some(1), None));
            }
            Ok(Applied::Exhausted) => {
                // Never over-admit, as for rules: a call that cannot be recorded is refused.
                env.observer.count(Metric::CasRetriesExhausted);
                env.observer.count(Metric::StatusDenied);
                return Some(reply::deny(&self.config, None, Some(1), None));
            }
            Ok(Applied::Stored { .. }) | Err(_) => return None,
        };
        env.observer.count(Metric::StatusDenied);
        let report = LimitReport {
            name: &limit.name,
            policy: limit.policy.as_deref(),
            quota: limit.quota,
            window_seconds: limit.window_seconds_at(now),
            remaining: decision.remaining,
            reset_seconds: decision.reset_seconds(),
        };
        Some(reply::deny(&self.config, Some(&report), Some(report.reset_seconds.max(1)), None))
    }

    /// The caller's standing in every local rule whose header conditions and key it meets (path
    /// and method conditions are ignored: the status request has its own), consuming nothing.
    pub fn standings(&self, env: &Env<'_>) -> Result<Vec<Standing<'_>>, StoreError> {
        let now = env.now();
        let mut out = Vec::new();
        for rule in &self.config.rules {
            // Global rules have no share: the service reports them. A fallback is not in force.
            let Some(share) = rule.table.filter(|_| rule.fallback_for.is_none()) else { continue };
            if !rule.matcher.headers_match(env.request) {
                continue;
            }
            let table = self.table(share);
            let Some(key) = request_key(self.seed, rule, env.request) else { continue };
            let chosen = limits_for(rule, env.request);
            for (limit_index, limit) in chosen.limits.iter().enumerate() {
                let fp = key.limit(chosen.plan_name(), limit_index, limit.kind);
                let state = table.lookup(env.store, fp, now)?.state();
                let d = limit.algorithm.status(state, now);
                out.push(Standing {
                    of: Found { rule, plan: chosen.plan_name(), limit: Some(limit) },
                    algorithm: limit.kind.as_str(),
                    quota: limit.quota,
                    window_seconds: limit.window_seconds_at(now),
                    remaining: d.remaining,
                    reset_seconds: d.reset_seconds(),
                    global: false,
                });
            }
        }
        Ok(out)
    }

    /// The status JSON: the local standings, and the global ones from the service's answer to
    /// `global` (or why there is none).
    pub(super) fn status_reply(
        &self,
        env: &Env<'_>,
        global: Option<(&GlobalCall, Result<&[u8], CallError>)>,
    ) -> LocalReply<'static> {
        let mut standings = match self.standings(env) {
            Ok(standings) => standings,
            Err(error) => {
                env.observer.status_unavailable(error);
                return reply::status_unavailable();
            }
        };
        let mut global_error = None;
        if let Some((call, answer)) = global {
            let answer = answer.and_then(read_answer);
            match verdict::standings(&self.config, call, answer, env.observer) {
                Ok(global) => standings.extend(global),
                Err(error) => global_error = Some(error.to_string()),
            }
        }
        reply::status(status_json(&standings, global_error.as_deref()))
    }
}
