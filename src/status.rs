//! The status endpoint's answer: the caller's standing in every limit that applies to it.

use serde::Serialize;

use crate::limiter::Standing;

#[derive(Serialize)]
struct StatusBody<'a> {
    limits: Vec<StatusEntry<'a>>,
}

#[derive(Serialize)]
struct StatusEntry<'a> {
    rule: &'a str,
    /// The limit's name in the headers.
    limit: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    plan: Option<&'a str>,
    algorithm: &'static str,
    /// `q` of the policy.
    quota: u64,
    /// `w` of the policy, seconds.
    window: u64,
    remaining: u64,
    /// Seconds until the quota is fully available again.
    reset: u64,
    shadow: bool,
}

pub fn status_json(standings: &[Standing<'_>], now: u64) -> String {
    let body = StatusBody {
        limits: standings
            .iter()
            .map(|s| StatusEntry {
                rule: &s.rule.name,
                limit: &s.limit.name,
                plan: s.plan,
                algorithm: s.limit.kind.as_str(),
                quota: s.limit.quota,
                window: s.limit.window_seconds_at(now),
                remaining: s.remaining,
                reset: s.reset_seconds,
                shadow: s.rule.shadow,
            })
            .collect(),
    };
    serde_json::to_string(&body).unwrap_or_else(|_| "{\"limits\":[]}".to_owned())
}
