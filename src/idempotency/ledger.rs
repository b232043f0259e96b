//! The compare-and-swap loop around a slot's records: read the slot, apply a pure transition from
//! [`records`](super::records), write the result only if nobody wrote in between.

use super::records::{decode, encode, Record};
use crate::state::store::{SharedStore, StoreError, CREATE_ONLY_CAS};
use crate::state::table::MAX_ATTEMPTS;

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
pub fn update<T>(
    store: &dyn SharedStore,
    key: &str,
    mut transition: impl FnMut(&[Record]) -> (T, Option<Vec<Record>>),
) -> Result<T, LedgerError> {
    for _ in 0..MAX_ATTEMPTS {
        let Some((records, cas)) = read(store, key)? else { continue };
        let (outcome, next) = transition(&records);
        let Some(next) = next else { return Ok(outcome) };
        match store.set(key, &encode(&next), cas) {
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
fn read(store: &dyn SharedStore, key: &str) -> Result<Option<(Vec<Record>, u32)>, LedgerError> {
    match store.get(key).map_err(LedgerError::Store)? {
        Some(versioned) => Ok(Some((decode(&versioned.value), versioned.cas))),
        None => match store.set(key, &encode(&[]), CREATE_ONLY_CAS) {
            Ok(()) | Err(StoreError::CasMismatch) => Ok(None),
            Err(e) => Err(LedgerError::Store(e)),
        },
    }
}
