//! The shared-data seam: Envoy's process-wide key/value map with compare-and-swap.
//!
//! [`MemoryStore`] imitates Envoy exactly, including its one surprise: `set` on a key that does not
//! exist inserts it whatever `cas` is passed, so two workers that both read "absent" both win.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};

/// Why a shared-data call failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StoreError {
    /// The key changed since the `cas` we passed was read.
    CasMismatch,
    /// A key that was just created could not be read back.
    Missing,
    /// Any other host status (the raw code is kept for the log).
    Host(u32),
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

/// An in-memory store with Envoy's semantics: one lock and one CAS counter for the whole map, the
/// counter bumped on every write and never zero. Safe to share between threads, as Envoy's is.
#[derive(Default)]
pub struct MemoryStore {
    inner: Mutex<MemoryInner>,
}

#[derive(Default)]
struct MemoryInner {
    map: HashMap<String, (Vec<u8>, u32)>,
    next_cas: u32,
    gets: u64,
    sets: u64,
}

impl MemoryStore {
    pub fn new() -> MemoryStore {
        MemoryStore::default()
    }

    fn lock(&self) -> MutexGuard<'_, MemoryInner> {
        // A test thread that panicked leaves the map consistent: every write is one insert.
        self.inner.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub fn len(&self) -> usize {
        self.lock().map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes held by keys and values, the part of Envoy's memory the filter controls.
    pub fn stored_bytes(&self) -> usize {
        self.lock().map.iter().map(|(k, (v, _))| k.len() + v.len()).sum()
    }

    /// (gets, sets) served so far.
    pub fn calls(&self) -> (u64, u64) {
        let inner = self.lock();
        (inner.gets, inner.sets)
    }
}

impl SharedStore for MemoryStore {
    fn get(&self, key: &str) -> Result<Option<Versioned>, StoreError> {
        let mut inner = self.lock();
        inner.gets += 1;
        Ok(inner.map.get(key).map(|(value, cas)| Versioned { value: value.clone(), cas: *cas }))
    }

    fn set(&self, key: &str, value: &[u8], cas: u32) -> Result<(), StoreError> {
        let mut inner = self.lock();
        inner.sets += 1;
        if let Some((_, current)) = inner.map.get(key) {
            if cas != 0 && cas != *current {
                return Err(StoreError::CasMismatch);
            }
        }
        inner.next_cas = inner.next_cas.wrapping_add(1).max(1);
        let next = inner.next_cas;
        inner.map.insert(key.to_owned(), (value.to_vec(), next));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_set_on_an_absent_key_inserts_whatever_the_cas() {
        let store = MemoryStore::new();
        assert_eq!(store.set("k", b"a", 12345), Ok(()));
        assert_eq!(store.get("k").unwrap().unwrap().value, b"a");
    }

    #[test]
    fn a_stale_cas_is_refused_and_a_fresh_one_accepted() {
        let store = MemoryStore::new();
        store.set("k", b"a", 0).unwrap();
        let first = store.get("k").unwrap().unwrap();
        store.set("k", b"b", first.cas).unwrap();
        assert_eq!(store.set("k", b"c", first.cas), Err(StoreError::CasMismatch));
        let second = store.get("k").unwrap().unwrap();
        assert_eq!(second.value, b"b");
        assert_ne!(second.cas, first.cas);
    }

    #[test]
    fn cas_zero_overwrites_unconditionally() {
        let store = MemoryStore::new();
        store.set("k", b"a", 0).unwrap();
        store.set("k", b"b", 0).unwrap();
        assert_eq!(store.get("k").unwrap().unwrap().value, b"b");
    }

    #[test]
    fn create_only_never_overwrites_an_existing_key() {
        let store = MemoryStore::new();
        store.set("k", b"live", 0).unwrap();
        assert_eq!(store.set("k", b"empty", CREATE_ONLY_CAS), Err(StoreError::CasMismatch));
    }
}
