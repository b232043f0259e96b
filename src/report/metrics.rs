//! Every metric the filter counts, defined once: the [`Metric`] the core reports, each counter's
//! name and labels, and its place in the glue's table of counters all come from the one list below,
//! so a metric cannot be counted without a counter or named without being counted.
//!
//! Labels travel inside the name the way Istio's own stats do (`rule=.=login;.;`), because
//! proxy-wasm counters have no labels of their own: Envoy's `stats_tags` (Istio's `extraStatTags`)
//! cut each `<label>=.=<value>;.;` out of the name into a tag. The delimiters cannot occur in a
//! rule name or key prefix, so a value may contain dots.

use crate::config::Config;

macro_rules! metrics {
    (
        per_rule { $($(#[$rule_doc:meta])* $rule:ident = $rule_name:literal $(decision $decision:literal)?,)* }
        filter_wide { $($(#[$doc:meta])* $metric:ident = $name:literal,)* }
        per_idempotency { $($(#[$idem_doc:meta])* $idem:ident = $idem_name:literal $(decision $idem_decision:literal)?,)* }
    ) => {
        /// Something worth counting. The first kinds are counted per rule (the `usize` is the
        /// rule's index), the others once for the filter.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        pub enum Metric {
            $($(#[$rule_doc])* $rule(usize),)*
            $($(#[$doc])* $metric,)*
            $($(#[$idem_doc])* $idem(usize),)*
        }

        #[repr(usize)]
        enum RuleKind { $($rule,)* }

        #[repr(usize)]
        enum FilterKind { $($metric,)* }

        #[repr(usize)]
        enum IdempotencyKind { $($idem,)* }

        /// Metric names and `decision` labels (empty for none) of the per-rule counters, in
        /// `RuleKind` order.
        const PER_RULE: &[(&str, &str)] = &[$(($rule_name, concat!("" $(, $decision)?)),)*];
        /// Metric names of the filter-wide counters, in `FilterKind` order.
        const FILTER_WIDE: &[&str] = &[$($name,)*];
        /// Metric names and `decision` labels of each idempotency entry's counters, in
        /// `IdempotencyKind` order.
        const PER_ENTRY: &[(&str, &str)] = &[$(($idem_name, concat!("" $(, $idem_decision)?)),)*];

        impl Metric {
            /// The metric's place in a table laid out as [`counter_names`] lists the counters.
            pub fn slot(self, rules: usize) -> usize {
                match self {
                    $(Metric::$rule(rule) => RuleKind::$rule as usize * rules + rule,)*
                    $(Metric::$metric => PER_RULE.len() * rules + FilterKind::$metric as usize,)*
                    $(Metric::$idem(entry) => {
                        PER_RULE.len() * rules + FILTER_WIDE.len() + entry * PER_ENTRY.len() + IdempotencyKind::$idem as usize
                    })*
                }
            }
        }
    };
}

metrics! {
    per_rule {
        /// A request the rule applied to was allowed.
        Allowed = "ratelimit_wasm_requests_total" decision "allowed",
        /// The rule denied a request.
        Denied = "ratelimit_wasm_requests_total" decision "denied",
        /// A shadow rule would have denied the request (it was not denied for it).
        ShadowDenied = "ratelimit_wasm_requests_total" decision "shadow_denied",
        /// A new key found its whole probe window in the rule's share of the table live; the
        /// rule's table-full policy was applied.
        TableFull = "ratelimit_wasm_table_full_total",
        /// A request the rule would have denied was held for the turn reserved for it instead.
        Delayed = "ratelimit_wasm_delayed_total",
        /// Milliseconds that delayed requests were held for, in all.
        DelayedMs = "ratelimit_wasm_delayed_milliseconds_total",
        /// Units charged from responses beyond the estimates taken at admission, in all.
        Charged = "ratelimit_wasm_charged_units_total",
        /// A request of a leased global rule was decided from its key's lease, without a call.
        LeaseServed = "ratelimit_wasm_lease_served_total",
        /// Units the rate limit service granted to this rule's leases, in all.
        LeaseGranted = "ratelimit_wasm_lease_granted_units_total",
        /// Background calls that refreshed a lease (answered or failed).
        LeaseRefresh = "ratelimit_wasm_lease_refreshes_total",
    }
    filter_wide {
        /// As `table_full`, in the status endpoint's share of the table.
        StatusTableFull = "ratelimit_wasm_status_table_full_total",
        /// A request gave up after losing the CAS race too often (it is denied).
        CasRetriesExhausted = "ratelimit_wasm_cas_retries_exhausted_total",
        /// An idle slot (a limit whose quota had come back) was reused for another key.
        SlotReclaimed = "ratelimit_wasm_slot_reclaimed_total",
        /// Two workers inserted one key at once; the copies were folded into one.
        DuplicateFolded = "ratelimit_wasm_duplicate_folded_total",
        /// The host refused a shared-data call (the request is allowed).
        StoreError = "ratelimit_wasm_store_errors_total",
        /// The rate limit service gave no usable answer (the rule's failure mode applied).
        GlobalFailure = "ratelimit_wasm_global_failures_total",
        /// A write lost the CAS race to another worker and was retried (contention on one key).
        CasRetry = "ratelimit_wasm_cas_retries_total",
        /// A call to the status endpoint was refused: its caller is over `status_limit`.
        StatusDenied = "ratelimit_wasm_status_denied_total",
        /// A request that waited for its turn ended before it (the client left); the turn was
        /// given back.
        DelayAbandoned = "ratelimit_wasm_delay_abandoned_total",
    }
    per_idempotency {
        /// A request claimed its key (the first with it): it went on to the upstream.
        KeyClaimed = "ratelimit_wasm_idempotency_requests_total" decision "first",
        /// A retry of a completed request got the stored response.
        Replayed = "ratelimit_wasm_idempotency_requests_total" decision "replayed",
        /// A request found its key held by a request in flight (409).
        KeyInFlight = "ratelimit_wasm_idempotency_requests_total" decision "in_flight",
        /// A request reused a key of another request (422).
        KeyReused = "ratelimit_wasm_idempotency_requests_total" decision "mismatch",
        /// A retry of a completed request whose response was not kept (409, or passed).
        ResponseNotKept = "ratelimit_wasm_idempotency_requests_total" decision "not_stored",
        /// A request without a key (or with a malformed one) was refused (400).
        KeyRefused = "ratelimit_wasm_idempotency_requests_total" decision "refused",
        /// A new key found its slot full of live keys; `when_table_full` applied.
        KeyTableFull = "ratelimit_wasm_idempotency_table_full_total",
        /// A failed request freed its key for a retry.
        KeyReleased = "ratelimit_wasm_idempotency_released_total",
        /// A shared-data call about a key failed (the request went on unprotected).
        KeyStoreError = "ratelimit_wasm_idempotency_store_errors_total",
    }
}

/// The full name of every counter, in slot order: each per-rule kind for each rule, then the
/// filter-wide ones, e.g.
/// `key_prefix=.=demo;.;rule=.=login;.;decision=.=denied;.;ratelimit_wasm_requests_total`.
pub fn counter_names(config: &Config) -> Vec<String> {
    let prefix = label("key_prefix", &config.key_prefix);
    let per_rule = PER_RULE.iter().flat_map(|&(name, decision)| {
        let prefix = &prefix;
        config.rules.iter().map(move |rule| of_rule(prefix, &rule.name, name, decision))
    });
    let filter_wide = FILTER_WIDE.iter().map(|name| format!("{prefix}{name}"));
    let per_entry = config.idempotency.iter().flat_map(|entry| {
        let prefix = &prefix;
        PER_ENTRY.iter().map(move |&(name, decision)| of_rule(prefix, &entry.name, name, decision))
    });
    per_rule.chain(filter_wide).chain(per_entry).collect()
}

/// A counter of rule (or idempotency entry) `rule`, with its decision label unless `decision` is
/// empty.
fn of_rule(prefix: &str, rule: &str, name: &str, decision: &str) -> String {
    let decision = if decision.is_empty() { String::new() } else { label("decision", decision) };
    format!("{prefix}{}{decision}{name}", label("rule", rule))
}

/// One label in Istio's in-name form, which Envoy's tag extraction turns into a Prometheus label.
fn label(name: &str, value: &str) -> String {
    format!("{name}=.={value};.;")
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
        assert_eq!(names.len(), 10 * 2 + 9);
        let p = "key_prefix=.=p;.;";
        assert_eq!(
            name(Metric::Allowed(0)),
            format!("{p}rule=.=a;.;decision=.=allowed;.;ratelimit_wasm_requests_total")
        );
        assert_eq!(
            name(Metric::ShadowDenied(1)),
            format!("{p}rule=.=b;.;decision=.=shadow_denied;.;ratelimit_wasm_requests_total")
        );
        assert_eq!(name(Metric::TableFull(1)), format!("{p}rule=.=b;.;ratelimit_wasm_table_full_total"));
        assert_eq!(name(Metric::StatusTableFull), format!("{p}ratelimit_wasm_status_table_full_total"));
        assert_eq!(name(Metric::CasRetry), format!("{p}ratelimit_wasm_cas_retries_total"));
        let mut slots: Vec<usize> =
            [Metric::Denied(0), Metric::Denied(1), Metric::StoreError, Metric::GlobalFailure]
                .into_iter()
                .map(|m| m.slot(2))
                .collect();
        slots.dedup();
        assert_eq!(slots.len(), 4);
    }

    #[test]
    fn dotted_rule_names_and_prefixes_stay_whole_inside_their_labels() {
        let json = r#"{"key_prefix":"team.a:v1","rules":[
            {"name":"api.v1","key":[{"source":"method"}],"limit":{"capacity":1,"refill_period":"1s"}},
            {"name":"api","key":[{"source":"method"}],"limit":{"capacity":1,"refill_period":"1s"}}]}"#;
        let config = Config::parse(json.as_bytes()).unwrap();
        let names = counter_names(&config);
        assert_eq!(
            names[Metric::Denied(0).slot(2)],
            "key_prefix=.=team.a:v1;.;rule=.=api.v1;.;decision=.=denied;.;ratelimit_wasm_requests_total"
        );
        let distinct: std::collections::HashSet<&String> = names.iter().collect();
        assert_eq!(distinct.len(), names.len());
    }
}
