//! The state table: a fixed set of shared-data slots that holds every bucket, so host memory is
//! bounded by configuration however many distinct keys arrive.
//!
//! Layout: slots `<prefix>:0 .. <prefix>:<size-1>`, each created once at start-up with the same
//! empty bytes (workers racing to create a slot write identical values, so nothing is lost), then
//! only ever updated with compare-and-swap. A key lives in one slot of the probe window of
//! [`WINDOW`] slots that starts at its home slot. A slot whose bucket has refilled to full carries
//! no information and may be reused by another key; live state is never evicted, so flooding the
//! table cannot reset anybody's limit. When the whole window is live, the caller applies the
//! table-full policy.
//!
//! Two workers that insert the same new key at the same moment could pick different free slots (a
//! slot can turn idle between their reads). Every insert is therefore confirmed by a CAS "touch"
//! of the home slot after re-scanning the window; of any two confirmed inserts, the later one's
//! re-scan sees the earlier, and duplicates found are folded into the earliest copy.

use super::slot::{store_key, Slot, StoreKey, EMPTY_SLOT, NEVER_USED};
use super::store::{SharedStore, StoreError, Versioned, CREATE_ONLY_CAS};
use super::Fingerprint;
use crate::algorithm::{Algorithm, State};
use crate::config::TableShare;

/// Slots probed for one key.
pub const WINDOW: u32 = 8;
/// How often a read-compute-CAS loop retries before giving up.
pub const MAX_ATTEMPTS: u32 = 16;

/// A slot as read, with the CAS that guards writing it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Snapshot {
    pub index: u32,
    cas: u32,
    slot: Slot,
}

/// Where a key's bucket is, as far as one scan could tell.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lookup {
    /// The key has a slot (its bucket may have refilled since).
    Found(Snapshot),
    /// The key has no slot; this is the first free one in its window.
    Vacant(Snapshot),
    /// The key has no slot and every slot of its window holds another key's live state.
    Full,
}

impl Lookup {
    /// The state as the scan saw it: a fresh one unless the key was found.
    pub fn state(&self) -> State {
        match self {
            Lookup::Found(s) => s.slot.state,
            _ => State::default(),
        }
    }
}

/// What a read-compute-CAS on one key did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Applied<D> {
    /// The new state `state` is stored in slot `index`.
    Stored { decision: D, index: u32, reclaimed: bool, state: State },
    /// The decision asked for no write (a denial).
    Unchanged(D),
    /// No slot could be had for the key.
    Full,
    /// Other workers kept winning the CAS race.
    Exhausted,
}

/// One bucket as a table operation needs it: whose it is, how its states merge (should an insert
/// race leave two copies), and the instant of the operation.
#[derive(Clone, Copy, Debug)]
pub struct Bucket<'b> {
    pub fp: Fingerprint,
    pub algorithm: &'b Algorithm,
    pub now: u64,
}

/// Counts of things worth a metric, gathered by one table operation.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TableEvents {
    pub duplicates_folded: u32,
    pub confirm_exhausted: bool,
    /// Writes that lost the CAS race to another worker and were retried.
    pub cas_retries: u32,
}

/// The slots `start .. start + size` of the table under `prefix`: the whole table, or one rule's
/// share of it (a key's probe window wraps around within the share).
pub struct Table<'a> {
    prefix: &'a str,
    start: u32,
    size: u32,
}

impl<'a> Table<'a> {
    pub fn new(prefix: &'a str, share: TableShare) -> Table<'a> {
        Table { prefix, start: share.start, size: share.size.max(WINDOW) }
    }

    /// The slots this table covers.
    pub fn share(&self) -> TableShare {
        TableShare { start: self.start, size: self.size }
    }

    /// All `size` slots, as created at start-up.
    pub fn whole(prefix: &'a str, size: u32) -> Table<'a> {
        Table::new(prefix, TableShare { start: 0, size })
    }

    /// Creates every slot that does not exist yet. Safe to run from every worker at once.
    pub fn initialize(&self, store: &dyn SharedStore) -> Result<(), StoreError> {
        for index in self.start..self.start.saturating_add(self.size) {
            let key = store_key(self.prefix, StoreKey::Slot(index));
            if store.get(key.as_str())?.is_none() {
                create(store, key.as_str(), &EMPTY_SLOT)?;
            }
        }
        Ok(())
    }

    /// The process-wide hash seed: the first worker's `candidate` wins, everyone reads it back.
    /// An unreadable seed (another layout under the same prefix) is replaced by CAS, and the seed
    /// read back: every worker must hash with the same one, or a client gets a bucket per worker.
    pub fn shared_seed(&self, store: &dyn SharedStore, candidate: u64) -> Result<u64, StoreError> {
        let key = store_key(self.prefix, StoreKey::Seed);
        let seed = candidate.to_le_bytes();
        for _ in 0..MAX_ATTEMPTS {
            match store.get(key.as_str())? {
                Some(Versioned { value, cas }) => {
                    if let Ok(bytes) = <[u8; 8]>::try_from(value.as_slice()) {
                        return Ok(u64::from_le_bytes(bytes));
                    }
                    match store.set(key.as_str(), &seed, cas) {
                        Ok(()) | Err(StoreError::CasMismatch) => {}
                        Err(e) => return Err(e),
                    }
                }
                None => create(store, key.as_str(), &seed)?,
            }
        }
        // Something keeps writing unreadable bytes there: refuse rather than hash apart.
        Err(StoreError::Missing)
    }

    fn home(&self, fp: Fingerprint) -> u32 {
        self.start + (fp.0 % u64::from(self.size)) as u32
    }

    fn slot_index(&self, home: u32, offset: u32) -> u32 {
        let within = (u64::from(home.saturating_sub(self.start)) + u64::from(offset)) % u64::from(self.size);
        self.start + within as u32
    }

    fn read(&self, store: &dyn SharedStore, index: u32) -> Result<Snapshot, StoreError> {
        let key = store_key(self.prefix, StoreKey::Slot(index));
        for _ in 0..2 {
            if let Some(Versioned { value, cas }) = store.get(key.as_str())? {
                return Ok(Snapshot { index, cas, slot: Slot::decode(&value) });
            }
            // Not created yet (the table of another configuration, or a host that lost it):
            // create it empty, then read it back.
            create(store, key.as_str(), &EMPTY_SLOT)?;
        }
        Err(StoreError::Missing)
    }

    fn write(&self, store: &dyn SharedStore, snapshot: &Snapshot, slot: Slot) -> Result<bool, StoreError> {
        let key = store_key(self.prefix, StoreKey::Slot(snapshot.index));
        match store.set(key.as_str(), &slot.encode(), snapshot.cas) {
            Ok(()) => Ok(true),
            Err(StoreError::CasMismatch) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Finds the key's slot, stopping at the first match or the first never-used slot; else the first
    /// free slot.
    pub fn lookup(&self, store: &dyn SharedStore, fp: Fingerprint, now: u64) -> Result<Lookup, StoreError> {
        let home = self.home(fp);
        let mut vacant = None;
        for offset in 0..WINDOW {
            let snapshot = self.read(store, self.slot_index(home, offset))?;
            if snapshot.slot.fingerprint == fp.0 {
                return Ok(Lookup::Found(snapshot));
            }
            if vacant.is_none() && snapshot.slot.is_free(now) {
                vacant = Some(snapshot);
            }
            if snapshot.slot.fingerprint == NEVER_USED {
                break;
            }
        }
        Ok(vacant.map_or(Lookup::Full, Lookup::Vacant))
    }

    /// Read-compute-CAS for one bucket, starting from `first` (a fresh lookup when `None`).
    /// `decide` maps the current state to a decision and, when something must be stored, the new
    /// state.
    pub fn measure_and_replace<D: Copy>(
        &self,
        store: &dyn SharedStore,
        bucket: Bucket<'_>,
        first: Option<Lookup>,
        events: &mut TableEvents,
        mut decide: impl FnMut(State) -> (D, Option<State>),
    ) -> Result<Applied<D>, StoreError> {
        let Bucket { fp, now, .. } = bucket;
        let mut lookup = match first {
            Some(l) => l,
            None => self.lookup(store, fp, now)?,
        };
        for _ in 0..MAX_ATTEMPTS {
            let snapshot = match lookup {
                Lookup::Found(s) | Lookup::Vacant(s) => s,
                Lookup::Full => return Ok(Applied::Full),
            };
            let (decision, new_state) = decide(lookup.state());
            let Some(new_state) = new_state else {
                return Ok(Applied::Unchanged(decision));
            };
            if self.write(store, &snapshot, Slot::holding(fp, new_state))? {
                let inserted = matches!(lookup, Lookup::Vacant(_));
                if inserted {
                    self.confirm_insert(store, bucket, events)?;
                }
                let reclaimed = inserted && snapshot.slot.fingerprint != NEVER_USED;
                return Ok(Applied::Stored { decision, index: snapshot.index, reclaimed, state: new_state });
            }
            // Lost the race: if the slot we wanted now holds our key, retry there.
            events.cas_retries += 1;
            let again = self.read(store, snapshot.index)?;
            lookup = if again.slot.fingerprint == fp.0 {
                Lookup::Found(again)
            } else {
                // Another key took it, or ours may have been inserted elsewhere meanwhile.
                self.lookup(store, fp, now)?
            };
        }
        Ok(Applied::Exhausted)
    }

    /// Applies `update` to the key's state in slot `index`, if the key is still there.
    pub fn update_at(
        &self,
        store: &dyn SharedStore,
        fp: Fingerprint,
        index: u32,
        mut update: impl FnMut(State) -> State,
    ) -> Result<bool, StoreError> {
        for _ in 0..MAX_ATTEMPTS {
            let snapshot = self.read(store, index)?;
            if snapshot.slot.fingerprint != fp.0 {
                return Ok(true);
            }
            let state = update(snapshot.slot.state);
            if self.write(store, &snapshot, Slot::holding(fp, state))? {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Makes sure the key just inserted has exactly one slot: re-scan the window, fold any later
    /// copies into the earliest, then touch the home slot with the CAS read at the start of the
    /// scan. If the touch fails, someone wrote the home slot meanwhile: scan again.
    fn confirm_insert(
        &self,
        store: &dyn SharedStore,
        bucket: Bucket<'_>,
        events: &mut TableEvents,
    ) -> Result<(), StoreError> {
        let fp = bucket.fp;
        let home = self.home(fp);
        for _ in 0..MAX_ATTEMPTS {
            let home_snapshot = self.read(store, home)?;
            let mut copies: [Option<Snapshot>; WINDOW as usize] = [None; WINDOW as usize];
            let mut count = 0;
            for offset in 0..WINDOW {
                let snapshot = if offset == 0 {
                    home_snapshot
                } else {
                    self.read(store, self.slot_index(home, offset))?
                };
                if snapshot.slot.fingerprint == fp.0 {
                    copies[count] = Some(snapshot);
                    count += 1;
                }
                if snapshot.slot.fingerprint == NEVER_USED {
                    break;
                }
            }
            if count > 1 {
                if let Some(first) = copies[0] {
                    for later in copies[1..count].iter().flatten() {
                        self.fold(store, bucket, first.index, later)?;
                        events.duplicates_folded += 1;
                    }
                }
                continue;
            }
            if self.write(store, &home_snapshot, home_snapshot.slot)? {
                return Ok(());
            }
        }
        events.confirm_exhausted = true;
        Ok(())
    }

    /// Moves what a duplicate copy holds into the canonical (earliest) one.
    fn fold(
        &self,
        store: &dyn SharedStore,
        bucket: Bucket<'_>,
        canonical: u32,
        duplicate: &Snapshot,
    ) -> Result<(), StoreError> {
        if !self.write(store, duplicate, Slot::EMPTIED)? {
            // It changed under us; the next scan will see it again.
            return Ok(());
        }
        let held = duplicate.slot.state;
        let Bucket { fp, algorithm, now } = bucket;
        self.update_at(store, fp, canonical, |state| algorithm.merge(state, held, now))?;
        Ok(())
    }
}

/// Creates `key` with `value` unless it exists (then nothing changes).
fn create(store: &dyn SharedStore, key: &str, value: &[u8]) -> Result<(), StoreError> {
    match store.set(key, value, CREATE_ONLY_CAS) {
        Ok(()) | Err(StoreError::CasMismatch) => Ok(()),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::memory::MemoryStore;

    #[test]
    fn an_unreadable_seed_is_replaced_and_every_worker_reads_the_same_one() {
        let store = MemoryStore::new();
        store.set("p:seed", b"not eight bytes", 0).unwrap();
        let table = Table::whole("p", 8);
        let first = table.shared_seed(&store, 1).unwrap();
        let second = table.shared_seed(&store, 2).unwrap();
        assert_eq!((first, second), (1, 1));
    }
}
