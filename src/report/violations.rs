//! The violation log: one structured line per denial, itself rate-limited so a flood of denied
//! requests cannot flood Envoy's log.

use std::fmt::Write;

use crate::algorithm::time::NANOS_PER_SECOND;

/// One denial (or, for a shadow rule, one request that would have been denied).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Violation<'a> {
    pub rule: &'a str,
    pub limit: Option<&'a str>,
    pub plan: Option<&'a str>,
    pub cost: u64,
    /// The bucket's keyed 64-bit fingerprint: identifies a client across lines without naming it.
    pub key_hash: u64,
    /// The raw key parts, only when the log is told to include them.
    pub key: Option<String>,
    pub retry_after_seconds: Option<u64>,
    pub reason: Option<String>,
    pub shadow: bool,
    /// When it happened (nanoseconds): the log's own rate limit counts by it.
    pub at: u64,
}

impl Violation<'_> {
    /// `ratelimit-wasm: denied rule="api" limit="api" plan="free" cost=1 key_hash=... retry_after=12`
    pub fn render(&self, suppressed: u64) -> String {
        let mut line = String::with_capacity(160);
        line.push_str(if self.shadow { "ratelimit-wasm: shadow-denied" } else { "ratelimit-wasm: denied" });
        let _ = write!(line, " rule=\"{}\"", self.rule);
        if let Some(limit) = self.limit {
            let _ = write!(line, " limit=\"{limit}\"");
        }
        if let Some(plan) = self.plan {
            let _ = write!(line, " plan=\"{plan}\"");
        }
        let _ = write!(line, " cost={} key_hash={:016x}", self.cost, self.key_hash);
        if let Some(key) = &self.key {
            let _ = write!(line, " key={key:?}");
        }
        if let Some(seconds) = self.retry_after_seconds {
            let _ = write!(line, " retry_after={seconds}");
        }
        if let Some(reason) = &self.reason {
            let _ = write!(line, " reason={reason:?}");
        }
        if suppressed > 0 {
            let _ = write!(line, " suppressed_before={suppressed}");
        }
        line
    }
}

/// At most `per_second` lines in each second of the clock (per worker); the number dropped is
/// reported on the next line that gets through.
#[derive(Clone, Debug)]
pub struct LogLimiter {
    per_second: u32,
    second: u64,
    written: u32,
    suppressed: u64,
}

impl LogLimiter {
    pub fn new(per_second: u32) -> LogLimiter {
        LogLimiter { per_second, second: 0, written: 0, suppressed: 0 }
    }

    /// `Some(suppressed since the last line)` when a line may be written now.
    pub fn admit(&mut self, now: u64) -> Option<u64> {
        let second = now / NANOS_PER_SECOND;
        if second != self.second {
            self.second = second;
            self.written = 0;
        }
        if self.written >= self.per_second {
            self.suppressed += 1;
            return None;
        }
        self.written += 1;
        Some(std::mem::take(&mut self.suppressed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = NANOS_PER_SECOND;

    #[test]
    fn a_flood_gets_a_few_lines_per_second_and_a_count_of_the_rest() {
        let mut log = LogLimiter::new(3);
        let admitted: Vec<_> = (0..10).map(|i| log.admit(100 * S + i)).collect();
        assert_eq!(admitted.iter().filter(|a| a.is_some()).count(), 3);
        assert_eq!(log.admit(101 * S), Some(7));
        assert_eq!(log.admit(101 * S), Some(0));
    }

    #[test]
    fn a_line_names_rule_plan_cost_and_key_hash_but_not_the_key() {
        let v = Violation {
            rule: "api",
            limit: Some("api.day"),
            plan: Some("free"),
            cost: 2,
            key_hash: 0xabc,
            key: None,
            retry_after_seconds: Some(12),
            reason: None,
            shadow: false,
            at: 0,
        };
        assert_eq!(
            v.render(4),
            "ratelimit-wasm: denied rule=\"api\" limit=\"api.day\" plan=\"free\" cost=2 key_hash=0000000000000abc retry_after=12 suppressed_before=4"
        );
        let shadow = Violation { shadow: true, key: Some("alice".into()), reason: Some("x".into()), ..v };
        assert!(shadow.render(0).starts_with("ratelimit-wasm: shadow-denied rule=\"api\""));
        assert!(shadow.render(0).contains(" key=\"alice\""));
    }
}
