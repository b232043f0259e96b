//! The status endpoint's answer: the caller's standing in every limit that applies to it, local
//! ones read from the table and global ones as the rate limit service reported them.

use serde::Serialize;

use crate::config::Found;

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

/// One limit's standing for the caller, local or global.
#[derive(Clone, Copy, Debug)]
pub struct Standing<'a> {
    pub of: Found<'a>,
    /// The configured algorithm; `service` when the service's own configuration holds the limit.
    pub algorithm: &'static str,
    pub quota: u64,
    pub window_seconds: u64,
    pub remaining: u64,
    pub reset_seconds: u64,
    /// Counted by the rate limit service across Envoys rather than in this Envoy.
    pub global: bool,
}

/// The status JSON: every standing, local ones first, and why the global ones are missing, if
/// they are.
pub fn status_json(standings: &[Standing<'_>], global_error: Option<&str>) -> String {
    let limits = standings
        .iter()
        .map(|s| StatusEntry {
            rule: &s.of.rule.name,
            limit: s.of.name(),
            plan: s.of.plan,
            algorithm: s.algorithm,
            quota: s.quota,
            window: s.window_seconds,
            remaining: s.remaining,
            reset: s.reset_seconds,
            shadow: s.of.rule.shadow,
            global: s.global,
        })
        .collect();
    let body = StatusBody { limits, global_error };
    serde_json::to_string(&body).unwrap_or_else(|_| "{\"limits\":[]}".to_owned())
}
