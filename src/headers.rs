//! Every rate-limit header the filter emits is rendered here.

use crate::config::HeaderFormat;

/// What the client is told about one limit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LimitReport<'a> {
    /// The rule's prepared `RateLimit-Policy` item, e.g. `"per-ip";q=100;w=60`.
    pub policy: &'a str,
    pub rule_name: &'a str,
    pub limit: u64,
    pub remaining: u64,
    /// Seconds until the quota is fully available again; on a denial, until a retry can pass.
    pub reset_seconds: u64,
}

/// The headers for a response: `report` is the most restrictive limit (if any applied), and
/// `retry_after` is set on denials.
pub fn render(
    format: HeaderFormat,
    report: Option<&LimitReport<'_>>,
    retry_after: Option<u64>,
) -> Vec<(&'static str, String)> {
    let mut headers = Vec::with_capacity(6);
    if let Some(seconds) = retry_after {
        headers.push(("retry-after", seconds.to_string()));
    }
    let Some(r) = report else { return headers };
    if matches!(format, HeaderFormat::Ietf | HeaderFormat::Both) {
        headers.push(("ratelimit-policy", r.policy.to_owned()));
        headers.push(("ratelimit", format!("\"{}\";r={};t={}", r.rule_name, r.remaining, r.reset_seconds)));
    }
    if matches!(format, HeaderFormat::XRateLimit | HeaderFormat::Both) {
        headers.push(("x-ratelimit-limit", r.limit.to_string()));
        headers.push(("x-ratelimit-remaining", r.remaining.to_string()));
        headers.push(("x-ratelimit-reset", r.reset_seconds.to_string()));
    }
    headers
}

#[cfg(test)]
mod tests {
    use super::*;

    const REPORT: LimitReport<'static> = LimitReport {
        policy: "\"per-ip\";q=100;w=60",
        rule_name: "per-ip",
        limit: 100,
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
