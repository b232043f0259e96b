//! Test doubles for the store seam (built for tests and with the `testing` feature only):
//! [`MemoryStore`] imitates Envoy's shared data exactly, including the absent-key insert;
//! [`FailingStore`] wraps one and fails the calls a test chooses, as a host that refuses them.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};

use super::store::{SharedStore, StoreError, Versioned};

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

/// Which store operation a call is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    Get,
    Set,
}

/// One call as [`FailingStore`]'s rule sees it.
#[derive(Clone, Copy, Debug)]
pub struct StoreCall<'a> {
    pub op: Op,
    pub key: &'a str,
    /// 1 for the first call of this operation on this store, 2 for the next, and so on.
    pub nth: u64,
}

type FailRule = Box<dyn Fn(&StoreCall<'_>, &MemoryStore) -> bool + Send + Sync>;

/// A [`MemoryStore`] whose calls fail with `StoreError::Host(FailingStore::HOST_STATUS)` whenever
/// the rule says so; the failed call changes nothing. The rule also gets the store underneath, so
/// it can play another worker writing just before a chosen call.
pub struct FailingStore {
    pub inner: MemoryStore,
    rule: Mutex<FailRule>,
    gets: AtomicU64,
    sets: AtomicU64,
}

impl FailingStore {
    /// The host status the failures carry (proxy-wasm's `InternalFailure`).
    pub const HOST_STATUS: u32 = 10;

    /// Fails nothing until told to.
    pub fn new(inner: MemoryStore) -> FailingStore {
        FailingStore {
            inner,
            rule: Mutex::new(Box::new(|_, _| false)),
            gets: AtomicU64::new(0),
            sets: AtomicU64::new(0),
        }
    }

    /// From now on, fails every call `rule` picks (call numbers keep counting from creation).
    pub fn fail_when(&self, rule: impl Fn(&StoreCall<'_>) -> bool + Send + Sync + 'static) {
        self.before_each(move |call, _| rule(call));
    }

    /// From now on, runs `rule` before every call, with the store underneath (to write to it as
    /// another worker would); the call fails when it returns true.
    pub fn before_each(&self, rule: impl Fn(&StoreCall<'_>, &MemoryStore) -> bool + Send + Sync + 'static) {
        *self.rule.lock().unwrap_or_else(|p| p.into_inner()) = Box::new(rule);
    }

    /// Calls of `op` made so far.
    pub fn calls(&self, op: Op) -> u64 {
        match op {
            Op::Get => self.gets.load(Ordering::SeqCst),
            Op::Set => self.sets.load(Ordering::SeqCst),
        }
    }

    /// Fails the `n`-th call of `op` counted from now (1 = the next one), and only that one.
    pub fn fail_nth_from_now(&self, op: Op, n: u64) {
        let done = self.calls(op);
        self.fail_when(move |call| call.op == op && call.nth == done + n);
    }

    fn refused(&self, op: Op, key: &str) -> bool {
        let counter = match op {
            Op::Get => &self.gets,
            Op::Set => &self.sets,
        };
        let nth = counter.fetch_add(1, Ordering::SeqCst) + 1;
        let rule = self.rule.lock().unwrap_or_else(|p| p.into_inner());
        rule(&StoreCall { op, key, nth }, &self.inner)
    }
}

impl SharedStore for FailingStore {
    fn get(&self, key: &str) -> Result<Option<Versioned>, StoreError> {
        if self.refused(Op::Get, key) {
            return Err(StoreError::Host(FailingStore::HOST_STATUS));
        }
        self.inner.get(key)
    }

    fn set(&self, key: &str, value: &[u8], cas: u32) -> Result<(), StoreError> {
        if self.refused(Op::Set, key) {
            return Err(StoreError::Host(FailingStore::HOST_STATUS));
        }
        self.inner.set(key, value, cas)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::store::CREATE_ONLY_CAS;

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

    #[test]
    fn a_failing_store_fails_exactly_the_chosen_call_and_changes_nothing() {
        let store = FailingStore::new(MemoryStore::new());
        store.set("k", b"a", 0).unwrap();
        store.fail_nth_from_now(Op::Set, 2);
        store.set("k", b"b", 0).unwrap();
        assert_eq!(store.set("k", b"c", 0), Err(StoreError::Host(FailingStore::HOST_STATUS)));
        assert_eq!(store.get("k").unwrap().unwrap().value, b"b");
        store.set("k", b"d", 0).unwrap();
        store.fail_when(|call| call.op == Op::Get && call.key == "k");
        assert!(store.get("k").is_err());
        assert_eq!(store.get("other"), Ok(None));
    }
}
