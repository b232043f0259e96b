//! What the service's answer (or its absence) means: the verdict on a request's global rules, and
//! the caller's standing in them for the status endpoint.

use super::answer::{Answer, CallError};
use super::GlobalCall;
use crate::config::{Config, FailureMode};
use crate::report::metrics::Metric;
use crate::report::status::Standing;
use crate::report::{Observer, Reported};

/// The rate limit service's verdict on the global rules of a request.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GlobalVerdict {
    pub deny: bool,
    /// The most restrictive limit the service reported (on a denial, the one that denied).
    pub report: Option<Reported>,
    /// On a denial: never earlier than the service says its limit resets; `None` when nothing
    /// tells (then no `Retry-After` is sent rather than a guess).
    pub retry_after_seconds: Option<u64>,
    /// Headers the service asks to add to the client's response (the deny response or the
    /// upstream's), as Envoy's own rate limit filter adds them.
    pub response_headers: Vec<(String, String)>,
    /// Headers the service asks to add to the request, when it passes.
    pub request_headers: Vec<(String, String)>,
}

/// The verdict from the service's answer, or from its failure (then each rule's failure mode).
pub fn verdict(
    config: &Config,
    call: &GlobalCall,
    answer: Result<Answer, CallError>,
    observer: &dyn Observer,
) -> GlobalVerdict {
    match answer {
        Ok(answer) => answered(config, call, answer, observer),
        Err(error) => failed(config, call, &error, observer),
    }
}

fn failed(config: &Config, call: &GlobalCall, error: &CallError, observer: &dyn Observer) -> GlobalVerdict {
    count_failure(error, observer);
    let deny = call.deny_on_failure;
    for origin in &call.origins {
        let denies = config.rules.get(origin.rule).is_some_and(|r| r.global == Some(FailureMode::Deny));
        observer.count(if denies { Metric::Denied(origin.rule) } else { Metric::Allowed(origin.rule) });
    }
    GlobalVerdict { deny, retry_after_seconds: deny.then_some(1), ..GlobalVerdict::default() }
}

fn answered(config: &Config, call: &GlobalCall, answer: Answer, observer: &dyn Observer) -> GlobalVerdict {
    let mut report: Option<Reported> = None;
    let mut denial: Option<Reported> = None;
    for (index, status) in &answer.limits {
        let Some(origin) = call.origins.get(*index) else { continue };
        let described = Reported {
            limit: *origin,
            quota: status.quota,
            window_seconds: status.window_seconds,
            remaining: status.remaining,
            reset_seconds: status.reset_seconds,
            from_service: true,
        };
        if status.over_limit {
            if denial.is_none_or(|d| described.reset_seconds > d.reset_seconds) {
                denial = Some(described);
            }
        } else if report.is_none_or(|r| described.is_more_restrictive_than(&r)) {
            report = Some(described);
        }
    }
    for (i, origin) in call.origins.iter().enumerate() {
        let over = answer.limits.iter().any(|(j, s)| *j == i && s.over_limit);
        let denied = over || (answer.over_limit && answer.limits.is_empty());
        observer.count(if denied { Metric::Denied(origin.rule) } else { Metric::Allowed(origin.rule) });
    }
    let Answer { over_limit, response_headers, request_headers, .. } = answer;
    if over_limit {
        // The latest of what the service says; failing that, the longest window it can be.
        let said =
            denial.map(|d| d.reset_seconds).into_iter().chain(reset_in_headers(&response_headers)).max();
        let retry = said.or_else(|| longest_window(config, call)).map(|s| s.max(1));
        let report =
            denial.map(|d| Reported { remaining: 0, reset_seconds: retry.unwrap_or(d.reset_seconds), ..d });
        return GlobalVerdict {
            deny: true,
            report,
            retry_after_seconds: retry,
            response_headers,
            request_headers: Vec::new(),
        };
    }
    GlobalVerdict { deny: false, report, retry_after_seconds: None, response_headers, request_headers }
}

/// A reset the service announced in its own headers, in seconds (`Retry-After`,
/// `X-RateLimit-Reset`, `RateLimit-Reset`, the `t` of `RateLimit`). Values over a year are not
/// seconds to wait (some services send a Unix time there) and are ignored.
fn reset_in_headers(headers: &[(String, String)]) -> Option<u64> {
    let seconds = |v: &str| v.trim().parse::<u64>().ok().filter(|s| *s <= MAX_RESET_SECONDS);
    headers
        .iter()
        .filter_map(|(name, value)| match name.as_str() {
            "retry-after" | "x-ratelimit-reset" | "ratelimit-reset" => seconds(value),
            "ratelimit" => {
                value.split([';', ',']).filter_map(|p| p.trim().strip_prefix("t=")).filter_map(seconds).max()
            }
            _ => None,
        })
        .max()
}

const MAX_RESET_SECONDS: u64 = 366 * 86_400;

/// The longest window among the limits the call asked about: no fixed window of the service can
/// reset later than that from now. A calendar month counts 31 days. `None` when the rules leave
/// their limits to the service.
fn longest_window(config: &Config, call: &GlobalCall) -> Option<u64> {
    call.origins
        .iter()
        .filter_map(|origin| config.find(*origin)?.limit)
        .map(|limit| limit.window_seconds.unwrap_or(31 * 86_400))
        .max()
}

/// The caller's standing in its global rules, from the service's answer to a status call
/// (`Purpose::Status`, hits 0). Counts no request, since none was decided; a failure is counted
/// and logged like any other, and returned.
pub fn standings<'a>(
    config: &'a Config,
    call: &GlobalCall,
    answer: Result<Answer, CallError>,
    observer: &dyn Observer,
) -> Result<Vec<Standing<'a>>, CallError> {
    let answer = answer.inspect_err(|error| count_failure(error, observer))?;
    Ok(answer
        .limits
        .iter()
        .filter_map(|(index, status)| {
            let of = config.find(*call.origins.get(*index)?)?;
            Some(Standing {
                of,
                algorithm: of.limit.map_or("service", |l| l.kind.as_str()),
                quota: status.quota,
                window_seconds: status.window_seconds,
                remaining: status.remaining,
                reset_seconds: status.reset_seconds,
                global: true,
            })
        })
        .collect())
}

/// The service could not be asked or gave no usable answer: counted, and logged (rate-limited).
fn count_failure(error: &CallError, observer: &dyn Observer) {
    observer.count(Metric::GlobalFailure);
    observer.global_failure(&error.to_string());
}
