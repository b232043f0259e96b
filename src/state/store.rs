//! The shared-data seam: Envoy's process-wide key/value map with compare-and-swap, and its one
//! surprise: `set` on a key that does not exist inserts it whatever `cas` is passed, so two workers
//! that both read "absent" both win. The test doubles (`state::memory`) imitate it exactly.

/// Why a shared-data call failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StoreError {
    /// The key changed since the `cas` we passed was read.
    CasMismatch,
    /// A key that was just created could not be read back, or keeps holding unreadable bytes.
    Missing,
    /// Any other host status (the raw code is kept for the log).
    Host(u32),
}

impl std::fmt::Display for StoreError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StoreError::CasMismatch => write!(f, "CasMismatch"),
            StoreError::Missing => write!(f, "Missing"),
            StoreError::Host(status) => write!(f, "Host({status})"),
        }
    }
}

/// A value read from the store with the CAS token that guards its next update.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Versioned {
    pub value: Vec<u8>,
    pub cas: u32,
}

pub trait SharedStore {
    /// `Ok(None)` when the key does not exist.
    fn get(&self, key: &str) -> Result<Option<Versioned>, StoreError>;
    /// `cas == 0` writes unconditionally; otherwise fails with `CasMismatch` when the key exists
    /// with another CAS. An absent key is inserted whatever `cas` is.
    fn set(&self, key: &str, value: &[u8], cas: u32) -> Result<(), StoreError>;
}

/// A CAS value that no read ever returns in practice: a `set` with it only creates a missing key
/// (Envoy's CAS counter would have to land on exactly this value for that key to be overwritten).
pub const CREATE_ONLY_CAS: u32 = u32::MAX;
