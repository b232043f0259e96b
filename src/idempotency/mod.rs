//! Idempotency keys (draft-ietf-httpapi-idempotency-key-header): at most one request per key
//! reaches the upstream; a retry of a completed one gets its response replayed.
//!
//! Each `idempotency` entry owns a table of slots in shared data (`<prefix>:idem:<name>:<slot>`),
//! created on first use, never more than its `table_size`. A key lives in the slot its
//! fingerprint picks, with at most [`records::WAYS`] records per slot; a record expires on its
//! own (claim: `in_flight_timeout`; completed: `ttl`), so the table holds only live keys.

pub mod fleet;
pub mod protocol;
pub mod records;

use crate::state::Fingerprint;

/// The shared-data key of slot `slot` of entry `name`'s table.
pub fn slot_key(prefix: &str, name: &str, table_size: u32, key: Fingerprint) -> String {
    // The fingerprint is a keyed hash: its low bits spread keys evenly over the slots.
    let slot = key.0 % u64::from(table_size.max(1));
    format!("{prefix}:idem:{name}:{slot}")
}
