//! The status endpoint's answer: the caller's standing in every limit that applies to it, local
//! ones read from the table and global ones as the rate limit service reported them.

use serde::Serialize;

use crate::limiter::{GlobalStanding, Standing};

#[derive(Serialize)]
struct StatusBody<'a> {
    limits: Vec<StatusEntry<'a>>,
    /// Why the global rules are missing: the service could not be asked or did not answer.
    #[serde(skip_serializing_if = "Option::is_none")]
    global_error: Option<&'a str>,
}

#[derive(Serialize)]
struct StatusEntry<'a> {
    rule: &'a str,
    /// The limit's name in the headers.
    limit: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    plan: Option<&'a str>,
    /// The configured algorithm; `service` when the service's own configuration holds the limit.
    algorithm: &'static str,
    /// `q` of the policy.
    quota: u64,
    /// `w` of the policy, seconds.
    window: u64,
    remaining: u64,
    /// Seconds until the quota is fully available again (global: the service's
    /// `duration_until_reset`).
    reset: u64,
    shadow: bool,
    /// Counted by the rate limit service across Envoys rather than in this Envoy.
    global: bool,
}

pub fn status_json(
    local: &[Standing<'_>],
    global: &[GlobalStanding<'_>],
    global_error: Option<&str>,
    now: u64,
) -> String {
    let local = local.iter().map(|s| StatusEntry {
        rule: &s.rule.name,
        limit: &s.limit.name,
        plan: s.plan,
        algorithm: s.limit.kind.as_str(),
        quota: s.limit.quota,
        window: s.limit.window_seconds_at(now),
        remaining: s.remaining,
        reset: s.reset_seconds,
        shadow: s.rule.shadow,
        global: false,
    });
    let global_entries = global.iter().map(|g| StatusEntry {
        rule: &g.rule.name,
        limit: g.limit_name(),
        plan: g.plan,
        algorithm: g.limit.map_or("service", |l| l.kind.as_str()),
        quota: g.status.quota,
        window: g.status.window_seconds,
        remaining: g.status.remaining,
        reset: g.status.reset_seconds,
        shadow: g.rule.shadow,
        global: true,
    });
    let body = StatusBody { limits: local.chain(global_entries).collect(), global_error };
    serde_json::to_string(&body).unwrap_or_else(|_| "{\"limits\":[]}".to_owned())
}
