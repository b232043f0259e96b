//! Every rate-limit header the filter emits is rendered here.

use crate::config::HeaderFormat;

/// What the client is told about one limit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LimitReport<'a> {
    /// The limit's name in the headers (the rule's, or `rule.limit`).
    pub name: &'a str,
    /// The `RateLimit-Policy` item when prepared at configuration time, e.g. `"per-ip";q=100;w=60`.
    pub policy: Option<&'a str>,
    pub quota: u64,
    pub window_seconds: u64,
    pub remaining: u64,
    /// Seconds until the quota is fully available again; on a denial, until a retry can pass.
    pub reset_seconds: u64,
}

/// Which of several limits to report: the lowest remaining, then the longer wait. Every report
/// (local limits, the service's answer, and the choice between the two) orders by this.
pub fn more_restrictive(a_remaining: u64, a_reset: u64, b_remaining: u64, b_reset: u64) -> bool {
    (a_remaining, std::cmp::Reverse(a_reset)) < (b_remaining, std::cmp::Reverse(b_reset))
}

impl LimitReport<'_> {
    pub fn is_more_restrictive_than(&self, other: &LimitReport<'_>) -> bool {
        more_restrictive(self.remaining, self.reset_seconds, other.remaining, other.reset_seconds)
    }
}

/// The headers for a response: `report` is the most restrictive limit (if any applied), and
/// `retry_after` is set on denials.
pub fn render(
    format: HeaderFormat,
    report: Option<&LimitReport<'_>>,
    retry_after: Option<u64>,
) -> Vec<(&'static str, String)> {
    if report.is_none() && retry_after.is_none() {
        return Vec::new(); // no allocation for a response no limit applied to
    }
    let mut headers = Vec::with_capacity(6);
    if let Some(seconds) = retry_after {
        headers.push(("retry-after", seconds.to_string()));
    }
    let Some(r) = report else { return headers };
    if matches!(format, HeaderFormat::Ietf | HeaderFormat::Both) {
        let policy = match r.policy {
            Some(prepared) => prepared.to_owned(),
            None => format!("\"{}\";q={};w={}", r.name, r.quota, r.window_seconds),
        };
        headers.push(("ratelimit-policy", policy));
        headers.push(("ratelimit", format!("\"{}\";r={};t={}", r.name, r.remaining, r.reset_seconds)));
    }
    if matches!(format, HeaderFormat::XRateLimit | HeaderFormat::Both) {
        headers.push(("x-ratelimit-limit", r.quota.to_string()));
        headers.push(("x-ratelimit-remaining", r.remaining.to_string()));
        headers.push(("x-ratelimit-reset", r.reset_seconds.to_string()));
    }
    headers
}

#[cfg(test)]
mod tests {
    use super::*;

    const REPORT: LimitReport<'static> = LimitReport {
        name: "per-ip",
        policy: Some("\"per-ip\";q=100;w=60"),
        quota: 100,
        window_seconds: 60,
        remaining: 42,
        reset_seconds: 17,
    };

    #[test]
    fn both_formats_render_the_draft_10_and_legacy_fields() {
        assert_eq!(
            render(HeaderFormat::Both, Some(&REPORT), None),
            vec![
                ("ratelimit-policy", "\"per-ip\";q=100;w=60".to_owned()),
                ("ratelimit", "\"per-ip\";r=42;t=17".to_owned()),
                ("x-ratelimit-limit", "100".to_owned()),
                ("x-ratelimit-remaining", "42".to_owned()),
                ("x-ratelimit-reset", "17".to_owned()),
            ]
        );
    }

    #[test]
    fn a_policy_whose_window_varies_is_rendered_on_the_spot() {
        let month = LimitReport { name: "ai.month", policy: None, window_seconds: 2_592_000, ..REPORT };
        let headers = render(HeaderFormat::Ietf, Some(&month), None);
        assert_eq!(headers[0].1, "\"ai.month\";q=100;w=2592000");
    }

    #[test]
    fn retry_after_is_sent_even_when_limit_headers_are_off() {
        assert_eq!(render(HeaderFormat::None, Some(&REPORT), Some(3)), vec![("retry-after", "3".to_owned())]);
    }

    #[test]
    fn each_format_emits_only_its_own_fields() {
        let names = |f| render(f, Some(&REPORT), None).into_iter().map(|(n, _)| n).collect::<Vec<_>>();
        assert_eq!(names(HeaderFormat::Ietf), vec!["ratelimit-policy", "ratelimit"]);
        assert_eq!(
            names(HeaderFormat::XRateLimit),
            vec!["x-ratelimit-limit", "x-ratelimit-remaining", "x-ratelimit-reset"]
        );
    }
}
