//! Concurrency units held by this worker's requests: acquired when a request is admitted, renewed on
//! the worker's tick once per lease epoch (so a long stream keeps its units), and released when the
//! stream ends, whatever ended it. A worker keeps the count per key and epoch, since the shared
//! state counts units by the epoch they were last renewed in.

use std::collections::HashMap;

use super::local::Consumed;
use super::{Env, Limiter};
use crate::algorithm::concurrency::Concurrency;
use crate::algorithm::Algorithm;
use crate::config::TableShare;
use crate::report::metrics::Metric;
use crate::report::Observer;
use crate::state::store::{SharedStore, StoreError};
use crate::state::table::{Applied, Bucket, Lookup, TableEvents};
use crate::state::Fingerprint;

/// One key of one concurrency limit: where its units are counted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Holder {
    fp: u64,
    start: u32,
    size: u32,
}

impl Holder {
    fn share(&self) -> TableShare {
        TableShare { start: self.start, size: self.size }
    }
}

/// Units one request holds of one key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Hold {
    holder: Holder,
    units: u64,
}

/// What this worker holds of one key: the limit, and units per epoch they are counted in.
#[derive(Debug)]
struct Held {
    limit: Concurrency,
    by_epoch: Vec<(u64, u64)>,
}

/// The units every request of this worker holds.
#[derive(Debug, Default)]
pub struct Holdings(HashMap<Holder, Held>);

impl Holdings {
    fn add(&mut self, holder: Holder, limit: Concurrency, epoch: u64, units: u64) {
        let held = self.0.entry(holder).or_insert_with(|| Held { limit, by_epoch: Vec::new() });
        match held.by_epoch.iter_mut().find(|(e, _)| *e == epoch) {
            Some((_, n)) => *n += units,
            None => held.by_epoch.push((epoch, units)),
        }
    }

    /// Takes `units` of the key, oldest epoch first: what to release from each epoch.
    fn take(&mut self, holder: Holder, mut units: u64) -> Option<(Concurrency, Vec<(u64, u64)>)> {
        let held = self.0.get_mut(&holder)?;
        held.by_epoch.sort_unstable();
        let mut taken = Vec::new();
        for (epoch, n) in &mut held.by_epoch {
            let now_taken = units.min(*n);
            if now_taken > 0 {
                taken.push((*epoch, now_taken));
                *n -= now_taken;
                units -= now_taken;
            }
        }
        held.by_epoch.retain(|(_, n)| *n > 0);
        let limit = held.limit;
        if held.by_epoch.is_empty() {
            self.0.remove(&holder);
        }
        Some((limit, taken))
    }

    /// Units held in total (for tests and the status of a worker).
    pub fn units(&self) -> u64 {
        self.0.values().flat_map(|h| h.by_epoch.iter().map(|(_, n)| n)).sum()
    }
}

impl Limiter {
    /// The request is admitted: it holds the units its concurrency limits took until it ends.
    pub(super) fn hold(&self, consumed: Vec<Consumed>) -> Vec<Hold> {
        if consumed.is_empty() {
            return Vec::new();
        }
        let mut holdings = self.holdings();
        consumed
            .into_iter()
            .filter_map(|c| {
                let Algorithm::Concurrency(limit) = c.algorithm else { return None };
                let holder = Holder { fp: c.fp.0, start: c.share.start, size: c.share.size };
                holdings.add(holder, limit, c.held_in, c.cost);
                Some(Hold { holder, units: c.cost })
            })
            .collect()
    }

    /// The request's stream has ended: its units are released from the epochs they count in.
    pub(super) fn release(&self, env: &Env<'_>, holds: &[Hold]) {
        for hold in holds {
            let Some((limit, taken)) = self.holdings().take(hold.holder, hold.units) else { continue };
            if let Err(_error) = self.release_units(env, hold.holder, limit, &taken) {
                // The units stay counted until their lease ends: never fewer than are in flight.
                env.observer.count(Metric::StoreError);
            }
        }
    }

    fn release_units(
        &self,
        env: &Env<'_>,
        holder: Holder,
        limit: Concurrency,
        taken: &[(u64, u64)],
    ) -> Result<(), StoreError> {
        let (table, fp, now) = (self.table(holder.share()), Fingerprint(holder.fp), env.now());
        // A key no longer in the table has had its units dropped with their lease.
        let Lookup::Found(found) = table.lookup(env.store, fp, now)? else { return Ok(()) };
        let released = table.update_at(env.store, fp, found.index, |mut state| {
            for &(epoch, n) in taken {
                state = limit.release(state, now, n, epoch);
            }
            state
        })?;
        if !released {
            env.observer.count(Metric::CasRetriesExhausted);
        }
        Ok(())
    }

    /// Renews the lease of every unit this worker holds whose epoch has passed, in one write per
    /// key. Units that cannot be renewed now (a store error, a full table) are tried again on the
    /// next tick.
    pub(super) fn renew_holdings(&self, store: &dyn SharedStore, now: u64, observer: &dyn Observer) {
        let mut holdings = self.holdings();
        for (holder, held) in holdings.0.iter_mut() {
            let current = now / held.limit.epoch;
            if held.by_epoch.iter().all(|(e, _)| *e >= current) {
                continue;
            }
            match self.renew_key(store, now, *holder, held) {
                Ok(Some(epoch)) => {
                    let units = held.by_epoch.iter().map(|(_, n)| n).sum();
                    held.by_epoch = vec![(epoch, units)];
                }
                Ok(None) => observer.count(Metric::CasRetriesExhausted),
                Err(_) => observer.count(Metric::StoreError),
            }
        }
    }

    /// One read-compute-CAS that moves all of the key's older units to the current epoch; the
    /// epoch they are now counted in.
    fn renew_key(
        &self,
        store: &dyn SharedStore,
        now: u64,
        holder: Holder,
        held: &Held,
    ) -> Result<Option<u64>, StoreError> {
        let algorithm = Algorithm::Concurrency(held.limit);
        let bucket = Bucket { fp: Fingerprint(holder.fp), algorithm: &algorithm, now };
        let mut events = TableEvents::default();
        let applied = self.table(holder.share()).measure_and_replace(
            store,
            bucket,
            None,
            &mut events,
            |mut state| {
                let mut epoch = 0;
                for &(held_in, n) in &held.by_epoch {
                    (state, epoch) = held.limit.renew(state, now, n, held_in);
                }
                (epoch, Some(state))
            },
        )?;
        Ok(match applied {
            Applied::Stored { decision, .. } | Applied::Unchanged(decision) => Some(decision),
            Applied::Full | Applied::Exhausted => None,
        })
    }
}
