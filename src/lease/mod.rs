//! Quota leases: a global rule takes units from the rate limit service a few at a time (the
//! service counts them as spent when it grants them) and spends them in this Envoy's shared data,
//! so most requests need no call. The protocol is the service's (`service/README.md`, Leases): gRPC
//! metadata asks, `DescriptorStatus.quota` grants.
//!
//! Each leased rule owns a table of slots in shared data (`<prefix>:lease:<rule>:<slot>`),
//! created on first use, never more than its `table_size`; a slot holds the leases of up to
//! [`records::WAYS`] keys, and is the unit of compare-and-swap, so a unit is spent once across
//! workers.

pub mod records;

use crate::state::Fingerprint;

/// gRPC metadata that asks the service for a lease of that many units.
pub const ASK_HEADER: &str = "x-ratelimit-wasm-lease";
/// gRPC metadata: the longest the lease may live, in milliseconds.
pub const VALIDITY_HEADER: &str = "x-ratelimit-wasm-lease-validity-ms";

/// The shared-data key of the slot that holds `key`'s lease under rule `rule`.
pub fn slot_key(prefix: &str, rule: &str, table_size: u32, key: Fingerprint) -> String {
    let slot = key.0 % u64::from(table_size.max(1));
    format!("{prefix}:lease:{rule}:{slot}")
}

/// The instant a granted lease stops being spendable here, on this Envoy's clock: no later than
/// the validity asked for, the service's windows' resets and its `valid_until`, each counted from
/// when the call was sent (before the service's own now, so never late whatever the clocks say).
pub fn deadline(
    sent_at: u64,
    validity_nanos: u64,
    reset_nanos: Option<u64>,
    valid_until: Option<u64>,
) -> u64 {
    let mut end = sent_at.saturating_add(validity_nanos);
    if let Some(reset) = reset_nanos.filter(|r| *r > 0) {
        end = end.min(sent_at.saturating_add(reset));
    }
    if let Some(until) = valid_until {
        end = end.min(until);
    }
    end
}
