//! Prometheus text-format metrics, rendered by hand.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

/// Series kept per labeled family; (domain, code) pairs of further domains are counted under
/// `domain="_other"`, so a client sending random domains cannot grow the metrics without bound.
pub const MAX_SERIES: usize = 800;

/// Longest `domain` label kept as sent; a longer domain is labeled by its first
/// `LABEL_PREFIX_BYTES` bytes, `#` and 16 hex digits of its SHA-1, so 800 series of 1 MiB domains
/// cannot make `/metrics` (and the service's memory) hundreds of megabytes.
pub const MAX_LABEL_BYTES: usize = 64;
const LABEL_PREFIX_BYTES: usize = 32;

const BUCKETS_S: [f64; 12] = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5];

#[derive(Default)]
pub struct Metrics {
    decisions: Mutex<BTreeMap<(String, &'static str), u64>>,
    descriptors: Mutex<BTreeMap<(String, &'static str), u64>>,
    charges: Mutex<BTreeMap<(String, &'static str), u64>>,
    grpc_errors: Mutex<BTreeMap<&'static str, u64>>,
    latency_buckets: [AtomicU64; BUCKETS_S.len()],
    latency_sum_us: AtomicU64,
    latency_count: AtomicU64,
    redis_errors: AtomicU64,
    redis_up: AtomicU64,
    refunds: AtomicU64,
    leases_granted: AtomicU64,
    lease_units_granted: AtomicU64,
    lease_units_refunded: AtomicU64,
    lease_returns: Mutex<BTreeMap<&'static str, u64>>,
    idempotency_claims: Mutex<BTreeMap<&'static str, u64>>,
    idempotency_completions: Mutex<BTreeMap<&'static str, u64>>,
    reloads_ok: AtomicU64,
    reloads_failed: AtomicU64,
}

/// The `domain` label of a domain: itself when short, else a capped prefix and a hash.
pub fn domain_label(domain: &str) -> String {
    if domain.len() <= MAX_LABEL_BYTES {
        return domain.to_string();
    }
    let mut cut = LABEL_PREFIX_BYTES;
    while !domain.is_char_boundary(cut) {
        cut -= 1;
    }
    let digest = sha1_smol::Sha1::from(domain).digest().to_string();
    format!("{}#{}", &domain[..cut], &digest[..16])
}

fn bump(map: &Mutex<BTreeMap<(String, &'static str), u64>>, domain: &str, code: &'static str) {
    let label = domain_label(domain);
    let domain = label.as_str();
    let Ok(mut m) = map.lock() else { return };
    let key = (label.clone(), code);
    if let Some(v) = m.get_mut(&key) {
        *v += 1;
        return;
    }
    let known = m.keys().filter(|(d, _)| d != "_other").count();
    let domain_known = m.keys().any(|(d, _)| d == domain);
    let key = if domain_known || known < MAX_SERIES { key } else { ("_other".to_string(), code) };
    *m.entry(key).or_insert(0) += 1;
}

fn esc(s: &str) -> String {
    s.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

impl Metrics {
    /// One request's overall decision: `code` is `ok` or `over_limit`.
    pub fn decision(&self, domain: &str, code: &'static str) {
        bump(&self.decisions, domain, code);
    }

    /// One descriptor's result: `ok`, `over_limit`, `shadow_over_limit`, `unlimited`, `no_limit`,
    /// `replaced`.
    pub fn descriptor(&self, domain: &str, code: &'static str) {
        bump(&self.descriptors, domain, code);
    }

    /// One charge (`x-ratelimit-wasm-charge: 1`): `code` is `ok`, or `over_limit` when the
    /// charge left a descriptor over its limit. Charges are not counted as decisions.
    pub fn charge(&self, domain: &str, code: &'static str) {
        bump(&self.charges, domain, code);
    }

    pub fn grpc_error(&self, code: &'static str) {
        if let Ok(mut m) = self.grpc_errors.lock() {
            *m.entry(code).or_insert(0) += 1;
        }
    }

    pub fn observe_redis(&self, d: Duration) {
        let s = d.as_secs_f64();
        for (i, b) in BUCKETS_S.iter().enumerate() {
            if s <= *b {
                self.latency_buckets[i].fetch_add(1, Ordering::Relaxed);
            }
        }
        self.latency_sum_us.fetch_add(d.as_micros() as u64, Ordering::Relaxed);
        self.latency_count.fetch_add(1, Ordering::Relaxed);
    }

    pub fn redis_error(&self) {
        self.redis_errors.fetch_add(1, Ordering::Relaxed);
    }

    pub fn set_redis_up(&self, up: bool) {
        self.redis_up.store(u64::from(up), Ordering::Relaxed);
    }

    pub fn refund(&self) {
        self.refunds.fetch_add(1, Ordering::Relaxed);
    }

    /// A `ShouldRateLimit` call granted a lease of `units`.
    pub fn lease_granted(&self, units: u64) {
        self.leases_granted.fetch_add(1, Ordering::Relaxed);
        self.lease_units_granted.fetch_add(units, Ordering::Relaxed);
    }

    /// Units a `Return` gave back.
    pub fn lease_refunded(&self, units: u64) {
        self.lease_units_refunded.fetch_add(units, Ordering::Relaxed);
    }

    /// One `Return` call: `refunded`, `nothing`, `invalid_argument`, `unavailable`, `other`.
    pub fn lease_return(&self, outcome: &'static str) {
        if let Ok(mut m) = self.lease_returns.lock() {
            *m.entry(outcome).or_insert(0) += 1;
        }
    }

    /// One idempotency `Claim`: `claimed`, `in_flight`, `mismatch`, `completed`,
    /// `invalid_argument`, `unavailable`, `other`.
    pub fn idempotency_claim(&self, outcome: &'static str) {
        if let Ok(mut m) = self.idempotency_claims.lock() {
            *m.entry(outcome).or_insert(0) += 1;
        }
    }

    /// One idempotency `Complete`: `done`, `not_owner`, `invalid_argument`, `unavailable`, `other`.
    pub fn idempotency_completion(&self, outcome: &'static str) {
        if let Ok(mut m) = self.idempotency_completions.lock() {
            *m.entry(outcome).or_insert(0) += 1;
        }
    }

    pub fn reload(&self, ok: bool) {
        if ok {
            self.reloads_ok.fetch_add(1, Ordering::Relaxed);
        } else {
            self.reloads_failed.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn render(&self) -> String {
        let mut o = String::new();
        let p = "ratelimit_service";
        let labeled =
            |o: &mut String, name: &str, help: &str, m: &Mutex<BTreeMap<(String, &'static str), u64>>| {
                let _ = writeln!(o, "# HELP {p}_{name} {help}\n# TYPE {p}_{name} counter");
                if let Ok(m) = m.lock() {
                    for ((d, c), v) in m.iter() {
                        let _ = writeln!(o, "{p}_{name}{{domain=\"{}\",code=\"{c}\"}} {v}", esc(d));
                    }
                }
            };
        labeled(
            &mut o,
            "decisions_total",
            "ShouldRateLimit answers by domain and overall code.",
            &self.decisions,
        );
        labeled(
            &mut o,
            "descriptors_total",
            "Descriptor results by domain and code (ok, over_limit, shadow_over_limit, unlimited, no_limit, replaced).",
            &self.descriptors,
        );
        labeled(
            &mut o,
            "charges_total",
            "ShouldRateLimit charges (x-ratelimit-wasm-charge: usage counted even past the limit) by domain and overall code.",
            &self.charges,
        );
        let _ = writeln!(o, "# HELP {p}_grpc_errors_total ShouldRateLimit calls answered with a gRPC error, by status.\n# TYPE {p}_grpc_errors_total counter");
        if let Ok(m) = self.grpc_errors.lock() {
            for (c, v) in m.iter() {
                let _ = writeln!(o, "{p}_grpc_errors_total{{status=\"{c}\"}} {v}");
            }
        }
        let _ = writeln!(o, "# HELP {p}_redis_latency_seconds Latency of Redis calls (scripts and PINGs).\n# TYPE {p}_redis_latency_seconds histogram");
        for (i, b) in BUCKETS_S.iter().enumerate() {
            let _ = writeln!(
                o,
                "{p}_redis_latency_seconds_bucket{{le=\"{b}\"}} {}",
                self.latency_buckets[i].load(Ordering::Relaxed)
            );
        }
        let count = self.latency_count.load(Ordering::Relaxed);
        let _ = writeln!(o, "{p}_redis_latency_seconds_bucket{{le=\"+Inf\"}} {count}");
        let _ = writeln!(
            o,
            "{p}_redis_latency_seconds_sum {}",
            self.latency_sum_us.load(Ordering::Relaxed) as f64 / 1e6
        );
        let _ = writeln!(o, "{p}_redis_latency_seconds_count {count}");
        let simple = [
            ("redis_errors_total", "counter", "Redis calls that failed or timed out.", self.redis_errors.load(Ordering::Relaxed)),
            ("redis_up", "gauge", "1 when the last health PING to Redis succeeded.", self.redis_up.load(Ordering::Relaxed)),
            ("refunds_total", "counter", "Hits given back to a descriptor because another descriptor of the same request was over its limit.", self.refunds.load(Ordering::Relaxed)),
            ("leases_granted_total", "counter", "ShouldRateLimit calls that granted a lease (a quota of one or more units).", self.leases_granted.load(Ordering::Relaxed)),
            ("lease_units_granted_total", "counter", "Units granted in leases (each lease counted once, whatever its number of descriptors).", self.lease_units_granted.load(Ordering::Relaxed)),
            ("lease_units_refunded_total", "counter", "Lease units given back by Leases/Return.", self.lease_units_refunded.load(Ordering::Relaxed)),
        ];
        for (name, kind, help, v) in simple {
            let _ = writeln!(o, "# HELP {p}_{name} {help}\n# TYPE {p}_{name} {kind}\n{p}_{name} {v}");
        }
        let _ = writeln!(o, "# HELP {p}_lease_returns_total Leases/Return calls by outcome.\n# TYPE {p}_lease_returns_total counter");
        if let Ok(m) = self.lease_returns.lock() {
            for (c, v) in m.iter() {
                let _ = writeln!(o, "{p}_lease_returns_total{{outcome=\"{c}\"}} {v}");
            }
        }
        let by_outcome = [
            ("idempotency_claims_total", "Idempotency Keys/Claim calls by outcome.", &self.idempotency_claims),
            (
                "idempotency_completions_total",
                "Idempotency Keys/Complete calls by outcome (done: completed or released; not_owner: nothing changed).",
                &self.idempotency_completions,
            ),
        ];
        for (name, help, m) in by_outcome {
            let _ = writeln!(o, "# HELP {p}_{name} {help}\n# TYPE {p}_{name} counter");
            if let Ok(m) = m.lock() {
                for (c, v) in m.iter() {
                    let _ = writeln!(o, "{p}_{name}{{outcome=\"{c}\"}} {v}");
                }
            }
        }
        let _ = writeln!(o, "# HELP {p}_config_reloads_total Configuration reloads after a file change, by result.\n# TYPE {p}_config_reloads_total counter");
        let _ = writeln!(
            o,
            "{p}_config_reloads_total{{result=\"success\"}} {}",
            self.reloads_ok.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            o,
            "{p}_config_reloads_total{{result=\"failure\"}} {}",
            self.reloads_failed.load(Ordering::Relaxed)
        );
        o
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_and_histogram() {
        let m = Metrics::default();
        m.decision("edge", "ok");
        m.decision("edge", "ok");
        m.decision("we\"ird", "over_limit");
        m.observe_redis(Duration::from_millis(3));
        m.reload(false);
        let t = m.render();
        assert!(t.contains("ratelimit_service_decisions_total{domain=\"edge\",code=\"ok\"} 2"), "{t}");
        assert!(t.contains("domain=\"we\\\"ird\",code=\"over_limit\"} 1"), "{t}");
        assert!(t.contains("ratelimit_service_redis_latency_seconds_bucket{le=\"0.005\"} 1"), "{t}");
        assert!(t.contains("ratelimit_service_redis_latency_seconds_bucket{le=\"0.0025\"} 0"), "{t}");
        assert!(t.contains("ratelimit_service_redis_latency_seconds_count 1"), "{t}");
        assert!(t.contains("ratelimit_service_config_reloads_total{result=\"failure\"} 1"), "{t}");
    }

    #[test]
    fn long_domain_labels_are_capped_and_hashed() {
        let m = Metrics::default();
        for i in 0..20 {
            m.decision(&format!("{i:02}{}", "é".repeat(50_000)), "ok");
        }
        let t = m.render();
        assert!(t.len() < 8_000, "{} bytes", t.len());
        assert_eq!(m.decisions.lock().unwrap().len(), 20, "distinct domains stay distinct");
        let label = domain_label(&"é".repeat(100));
        assert!(label.len() <= MAX_LABEL_BYTES && label.starts_with(&"é".repeat(16)), "{label}");
        assert_eq!(domain_label("short"), "short");
    }

    #[test]
    fn domain_labels_are_bounded() {
        let m = Metrics::default();
        for i in 0..(MAX_SERIES + 50) {
            m.decision(&format!("d{i}"), "ok");
        }
        let n = m.decisions.lock().unwrap().len();
        assert_eq!(n, MAX_SERIES + 1);
    }
}
