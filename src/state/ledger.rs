//! Slots that hold a few variable-size records (idempotency keys, quota leases), and the
//! compare-and-swap loop around them: read the slot, apply a pure transition to its records, write
//! the result only if nobody wrote in between. A slot is created on first use.

use super::store::{SharedStore, StoreError, CREATE_ONLY_CAS};
use super::table::MAX_ATTEMPTS;

/// A slot's records and their bytes. Bytes that are not records of this kind (another format, or
/// damaged) must decode as an empty slot: the next write replaces them.
pub trait Records: Sized {
    fn decode(bytes: &[u8]) -> Self;
    fn encode(&self) -> Vec<u8>;
}

/// Why a slot could not be updated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LedgerError {
    /// The host refused a shared-data call.
    Store(StoreError),
    /// Other workers kept winning the race for the slot.
    Exhausted,
}

/// Applies `transition` to the records of slot `key` until its result is written (or it asks for
/// no write). Returns what the transition decided on the records it was last applied to.
pub fn update<R: Records, T>(
    store: &dyn SharedStore,
    key: &str,
    mut transition: impl FnMut(&R) -> (T, Option<R>),
) -> Result<T, LedgerError> {
    for _ in 0..MAX_ATTEMPTS {
        let Some((records, cas)) = read(store, key)? else { continue };
        let (outcome, next) = transition(&records);
        let Some(next) = next else { return Ok(outcome) };
        match store.set(key, &next.encode(), cas) {
            Ok(()) => return Ok(outcome),
            Err(StoreError::CasMismatch) => continue,
            Err(e) => return Err(LedgerError::Store(e)),
        }
    }
    Err(LedgerError::Exhausted)
}

/// The slot's records and the CAS that guards them. A slot is created empty on first use: Envoy
/// inserts an absent key whatever CAS is passed, so a write straight onto an absent key could
/// not tell two racing workers apart; creating it first (identical bytes, so a race to create
/// loses nothing) gives every later write a CAS to race on. `None`: created now, read again.
fn read<R: Records>(store: &dyn SharedStore, key: &str) -> Result<Option<(R, u32)>, LedgerError> {
    match store.get(key).map_err(LedgerError::Store)? {
        Some(versioned) => Ok(Some((R::decode(&versioned.value), versioned.cas))),
        None => match store.set(key, &R::decode(&[]).encode(), CREATE_ONLY_CAS) {
            Ok(()) | Err(StoreError::CasMismatch) => Ok(None),
            Err(e) => Err(LedgerError::Store(e)),
        },
    }
}
