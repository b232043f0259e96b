//! Every metric the filter counts, defined once: the [`Metric`] the core reports, each counter's
//! name, and its place in the glue's table of counters all come from the one list below, so a
//! metric cannot be counted without a counter or named without being counted.

use crate::config::Config;

macro_rules! metrics {
    (
        per_rule { $($(#[$rule_doc:meta])* $rule:ident = $rule_name:literal,)* }
        filter_wide { $($(#[$doc:meta])* $metric:ident = $name:literal,)* }
    ) => {
        /// Something worth counting. The first kinds are counted per rule (the `usize` is the
        /// rule's index), the others once for the filter.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        pub enum Metric {
            $($(#[$rule_doc])* $rule(usize),)*
            $($(#[$doc])* $metric,)*
        }

        #[repr(usize)]
        enum RuleKind { $($rule,)* }

        #[repr(usize)]
        enum FilterKind { $($metric,)* }

        /// Name suffixes of the per-rule counters, in `RuleKind` order.
        const PER_RULE: &[&str] = &[$($rule_name,)*];
        /// Names of the filter-wide counters, in `FilterKind` order.
        const FILTER_WIDE: &[&str] = &[$($name,)*];

        impl Metric {
            /// The metric's place in a table laid out as [`counter_names`] lists the counters.
            pub fn slot(self, rules: usize) -> usize {
                match self {
                    $(Metric::$rule(rule) => RuleKind::$rule as usize * rules + rule,)*
                    $(Metric::$metric => PER_RULE.len() * rules + FilterKind::$metric as usize,)*
                }
            }
        }
    };
}

metrics! {
    per_rule {
        /// A request the rule applied to was allowed.
        Allowed = "allowed",
        /// The rule denied a request.
        Denied = "denied",
        /// A shadow rule would have denied the request (it was not denied for it).
        ShadowDenied = "shadow_denied",
        /// A new key found its whole probe window in the rule's share of the table live; the
        /// rule's table-full policy was applied.
        TableFull = "table_full",
        /// A request the rule would have denied was held for the turn reserved for it instead.
        Delayed = "delayed",
        /// Milliseconds that delayed requests were held for, in all.
        DelayedMs = "delayed_ms",
        /// Units charged from responses beyond the estimates taken at admission, in all.
        Charged = "charged",
    }
    filter_wide {
        /// As `table_full`, in the status endpoint's share of the table.
        StatusTableFull = "status_table_full",
        /// A request gave up after losing the CAS race too often (it is denied).
        CasRetriesExhausted = "cas_retries_exhausted",
        /// An idle slot (a limit whose quota had come back) was reused for another key.
        SlotReclaimed = "slot_reclaimed",
        /// Two workers inserted one key at once; the copies were folded into one.
        DuplicateFolded = "duplicate_folded",
        /// The host refused a shared-data call (the request is allowed).
        StoreError = "store_errors",
        /// The rate limit service gave no usable answer (the rule's failure mode applied).
        GlobalFailure = "global_failures",
        /// A write lost the CAS race to another worker and was retried (contention on one key).
        CasRetry = "cas_retries",
        /// A call to the status endpoint was refused: its caller is over `status_limit`.
        StatusDenied = "status_denied",
        /// A request that waited for its turn ended before it (the client left); the turn was
        /// given back.
        DelayAbandoned = "delay_abandoned",
    }
}

/// The full name of every counter, in slot order:
/// `ratelimit_wasm.<key_prefix>.<rule>.<what>` for each per-rule kind and rule, then
/// `ratelimit_wasm.<key_prefix>.<what>`.
pub fn counter_names(config: &Config) -> Vec<String> {
    let prefix = &config.key_prefix;
    let per_rule = PER_RULE.iter().flat_map(|what| {
        config.rules.iter().map(move |rule| format!("ratelimit_wasm.{prefix}.{}.{what}", rule.name))
    });
    let filter_wide = FILTER_WIDE.iter().map(|what| format!("ratelimit_wasm.{prefix}.{what}"));
    per_rule.chain(filter_wide).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_metric_has_its_own_named_counter() {
        let json = r#"{"key_prefix":"p","rules":[
            {"name":"a","key":[{"source":"method"}],"limit":{"capacity":1,"refill_period":"1s"}},
            {"name":"b","key":[{"source":"method"}],"limit":{"capacity":1,"refill_period":"1s"}}]}"#;
        let config = Config::parse(json.as_bytes()).unwrap();
        let names = counter_names(&config);
        let name = |m: Metric| names[m.slot(2)].as_str();
        assert_eq!(names.len(), 7 * 2 + 9);
        assert_eq!(name(Metric::Allowed(0)), "ratelimit_wasm.p.a.allowed");
        assert_eq!(name(Metric::ShadowDenied(1)), "ratelimit_wasm.p.b.shadow_denied");
        assert_eq!(name(Metric::TableFull(1)), "ratelimit_wasm.p.b.table_full");
        assert_eq!(name(Metric::StatusTableFull), "ratelimit_wasm.p.status_table_full");
        assert_eq!(name(Metric::CasRetry), "ratelimit_wasm.p.cas_retries");
        let mut slots: Vec<usize> =
            [Metric::Denied(0), Metric::Denied(1), Metric::StoreError, Metric::GlobalFailure]
                .into_iter()
                .map(|m| m.slot(2))
                .collect();
        slots.dedup();
        assert_eq!(slots.len(), 4);
    }
}
