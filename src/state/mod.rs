//! Shared state: the store seam (Envoy's shared data and its compare-and-swap), the slot table
//! that holds every bucket in a fixed amount of memory, and the clock seam.

pub mod clock;
pub mod ledger;
#[cfg(any(test, feature = "testing"))]
pub mod memory;
pub mod slot;
pub mod store;
pub mod table;

/// The identity of one rule's bucket for one request: a 64-bit keyed hash of the rule name and the
/// key parts. The raw key is never stored, so a huge header value costs no shared memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fingerprint(pub u64);

impl Fingerprint {
    /// Never 0 or 1: the table reserves them for never-used and emptied slots.
    pub fn from_hash(hash: u64) -> Fingerprint {
        Fingerprint(if hash < 2 { hash + 2 } else { hash })
    }
}
