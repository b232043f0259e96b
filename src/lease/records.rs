//! One slot of a lease table: the leases of up to [`WAYS`] keys, each a few granted parts and
//! whether a refresh is under way, and their byte encoding. The transitions are pure functions; the
//! ledger (`state::ledger`) owns the compare-and-swap loop around them.

use crate::state::ledger::Records;
use crate::state::Fingerprint;

/// Keys one slot holds.
pub const WAYS: usize = 4;
/// Grants one key keeps at once: the one being spent and the refresh that followed it.
const PARTS: usize = 2;
const FORMAT: u8 = 2;
const MAX_ID_LEN: usize = 128;

/// Units of one grant, spendable until `deadline`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Part {
    pub id: String,
    pub units: u64,
    pub deadline: u64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    pub key: Fingerprint,
    /// Until then a call that may grant units for this key is under way: nobody else asks.
    pub refreshing_until: u64,
    /// Units requests wanted since `since` (spent, or found short), and when that count began
    /// (the last grant): the key's recent rate, which an adaptive lease asks for.
    pub demand: u64,
    pub since: u64,
    pub parts: Vec<Part>,
}

impl Record {
    fn is_live(&self, now: u64) -> bool {
        self.refreshing_until > now || self.parts.iter().any(|p| p.deadline > now)
    }
}

/// What spending from a key's lease did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Spend {
    /// The units were taken (from the parts named, for giving back); `left` remain. `refresh`:
    /// this request claimed the key's next refresh, to start in the background.
    Spent { taken: Vec<(String, u64)>, left: u64, refresh: Option<Demand> },
    /// Not enough units: the request must ask the service. `ask`: it claimed the key's next
    /// grant, so its call may carry the lease request (else one is under way, or the slot is
    /// full).
    Short { ask: Option<Demand> },
}

/// The units a key's requests wanted since its last grant, and over how long, when a request
/// claims the next one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Demand {
    pub units: u64,
    pub over_nanos: u64,
}

/// Spend `cost` units of `key`'s lease at `now`; a request that leaves the lease at or below
/// `refresh_below` (or finds it short) claims the refresh for `claim_nanos` unless one is under way.
pub fn spend(
    slot: &[Record],
    key: Fingerprint,
    cost: u64,
    now: u64,
    refresh_below: u64,
    claim_nanos: u64,
) -> (Spend, Option<Vec<Record>>) {
    let mut next: Vec<Record> = slot.iter().filter(|r| r.is_live(now)).cloned().collect();
    let Some(record) = next.iter_mut().find(|r| r.key == key) else {
        if next.len() >= WAYS {
            return (Spend::Short { ask: None }, None);
        }
        let refreshing_until = now.saturating_add(claim_nanos);
        next.push(Record { key, refreshing_until, demand: cost, since: now, parts: Vec::new() });
        return (Spend::Short { ask: Some(Demand { units: cost, over_nanos: 0 }) }, Some(next));
    };
    record.parts.retain(|p| p.deadline > now && p.units > 0);
    record.parts.sort_by_key(|p| p.deadline);
    record.demand = record.demand.saturating_add(cost);
    let total: u64 = record.parts.iter().map(|p| p.units).sum();
    let demand = Demand { units: record.demand, over_nanos: now.saturating_sub(record.since) };
    let claim = (record.refreshing_until <= now).then_some(demand);
    if total < cost {
        if claim.is_some() {
            record.refreshing_until = now.saturating_add(claim_nanos);
        }
        return (Spend::Short { ask: claim }, Some(next));
    }
    let taken = take(&mut record.parts, cost);
    let left = total - cost;
    let refresh = claim.filter(|_| left <= refresh_below);
    if refresh.is_some() {
        record.refreshing_until = now.saturating_add(claim_nanos);
    }
    (Spend::Spent { taken, left, refresh }, Some(next))
}

/// Takes `cost` units from the parts, soonest to expire first.
fn take(parts: &mut [Part], mut cost: u64) -> Vec<(String, u64)> {
    let mut taken = Vec::new();
    for part in parts.iter_mut() {
        let n = part.units.min(cost);
        if n > 0 {
            part.units -= n;
            cost -= n;
            taken.push((part.id.clone(), n));
        }
    }
    taken
}

/// A call for `key` came back with `part` (or with nothing: `None`): the grant joins the key's
/// lease, and the key may be refreshed again.
pub fn granted(slot: &[Record], key: Fingerprint, part: Option<Part>, now: u64) -> Option<Vec<Record>> {
    let mut next: Vec<Record> = slot.iter().filter(|r| r.is_live(now) || r.key == key).cloned().collect();
    let position = match next.iter().position(|r| r.key == key) {
        Some(i) => i,
        None if part.is_some() && next.len() < WAYS => {
            next.push(Record { key, refreshing_until: 0, demand: 0, since: now, parts: Vec::new() });
            next.len() - 1
        }
        // No room for the grant: its units go unspent (fewer requests admitted, never more).
        None => return None,
    };
    let record = next.get_mut(position)?;
    record.refreshing_until = 0;
    record.parts.retain(|p| p.deadline > now && p.units > 0);
    if part.is_some() {
        record.demand = 0;
        record.since = now;
    }
    if let Some(part) = part.filter(|p| p.deadline > now && p.units > 0 && p.id.len() <= MAX_ID_LEN) {
        if record.parts.len() >= PARTS {
            // Keep the larger grants; the units dropped are simply not spent.
            record.parts.sort_by_key(|p| std::cmp::Reverse(p.units));
            record.parts.truncate(PARTS - 1);
        }
        record.parts.push(part);
    }
    next.retain(|r| r.is_live(now));
    Some(next)
}

/// Units taken for a request that was then denied go back to their parts, while these last.
pub fn give_back(
    slot: &[Record],
    key: Fingerprint,
    taken: &[(String, u64)],
    now: u64,
) -> Option<Vec<Record>> {
    let mut next = slot.to_vec();
    let record = next.iter_mut().find(|r| r.key == key)?;
    let mut changed = false;
    for (id, units) in taken {
        if let Some(part) = record.parts.iter_mut().find(|p| &p.id == id && p.deadline > now) {
            part.units = part.units.saturating_add(*units);
            changed = true;
        }
    }
    changed.then_some(next)
}

// ---------------------------------------------------------------------------------------------
// Encoding: FORMAT, count, then per record: key, refreshing_until, demand, since (u64 LE), part count, and per
// part: deadline, units (u64 LE), id (u8 length + bytes).

impl Records for Vec<Record> {
    fn decode(bytes: &[u8]) -> Self {
        decode(bytes).unwrap_or_default()
    }

    fn encode(&self) -> Vec<u8> {
        let mut out = vec![FORMAT, self.len() as u8];
        for record in self {
            out.extend_from_slice(&record.key.0.to_le_bytes());
            out.extend_from_slice(&record.refreshing_until.to_le_bytes());
            out.extend_from_slice(&record.demand.to_le_bytes());
            out.extend_from_slice(&record.since.to_le_bytes());
            out.push(record.parts.len() as u8);
            for part in &record.parts {
                out.extend_from_slice(&part.deadline.to_le_bytes());
                out.extend_from_slice(&part.units.to_le_bytes());
                let id = &part.id.as_bytes()[..part.id.len().min(MAX_ID_LEN)];
                out.push(id.len() as u8);
                out.extend_from_slice(id);
            }
        }
        out
    }
}

fn decode(bytes: &[u8]) -> Option<Vec<Record>> {
    let (&format, rest) = bytes.split_first()?;
    let (&count, mut rest) = rest.split_first()?;
    if format != FORMAT || usize::from(count) > WAYS {
        return None;
    }
    let mut records = Vec::with_capacity(usize::from(count));
    for _ in 0..count {
        let key = Fingerprint(u64_at(&mut rest)?);
        let refreshing_until = u64_at(&mut rest)?;
        let demand = u64_at(&mut rest)?;
        let since = u64_at(&mut rest)?;
        let (&n, after) = rest.split_first()?;
        rest = after;
        if usize::from(n) > PARTS {
            return None;
        }
        let mut parts = Vec::with_capacity(usize::from(n));
        for _ in 0..n {
            let deadline = u64_at(&mut rest)?;
            let units = u64_at(&mut rest)?;
            let (&len, after) = rest.split_first()?;
            let id = after.get(..usize::from(len))?;
            rest = after.get(usize::from(len)..)?;
            parts.push(Part { id: String::from_utf8(id.to_vec()).ok()?, units, deadline });
        }
        records.push(Record { key, refreshing_until, demand, since, parts });
    }
    rest.is_empty().then_some(records)
}

fn u64_at(rest: &mut &[u8]) -> Option<u64> {
    let bytes = rest.get(..8)?;
    *rest = rest.get(8..)?;
    Some(u64::from_le_bytes(bytes.try_into().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: Fingerprint = Fingerprint(9);
    const CLAIM: u64 = 100;

    fn part(id: &str, units: u64, deadline: u64) -> Part {
        Part { id: id.into(), units, deadline }
    }

    fn with_lease(units: u64, deadline: u64) -> Vec<Record> {
        let (_, claimed) = spend(&[], KEY, 1, 0, 0, CLAIM);
        granted(&claimed.unwrap(), KEY, Some(part("a", units, deadline)), 1).unwrap()
    }

    #[test]
    fn a_new_key_is_short_and_its_first_request_claims_the_grant() {
        let (outcome, next) = spend(&[], KEY, 1, 0, 2, CLAIM);
        assert_eq!(outcome, Spend::Short { ask: Some(Demand { units: 1, over_nanos: 0 }) });
        // A second request meanwhile finds the grant under way.
        assert_eq!(spend(&next.unwrap(), KEY, 1, 1, 2, CLAIM).0, Spend::Short { ask: None });
    }

    #[test]
    fn units_are_spent_until_none_are_left_and_the_refresh_is_claimed_once_below_the_threshold() {
        let mut slot = with_lease(5, 1_000);
        let mut refreshes = 0;
        for expected_left in (0..5).rev() {
            let (outcome, next) = spend(&slot, KEY, 1, 10, 2, CLAIM);
            let Spend::Spent { left, refresh, .. } = outcome else { panic!("{outcome:?}") };
            assert_eq!(left, expected_left);
            refreshes += usize::from(refresh.is_some());
            slot = next.unwrap();
        }
        assert_eq!(refreshes, 1);
        assert_eq!(spend(&slot, KEY, 1, 10, 2, CLAIM).0, Spend::Short { ask: None });
        // The claim lapses: the next short request asks again, for what the key wanted since.
        let demand = Demand { units: 6, over_nanos: 10 + CLAIM - 1 };
        assert_eq!(spend(&slot, KEY, 1, 10 + CLAIM, 2, CLAIM).0, Spend::Short { ask: Some(demand) });
    }

    #[test]
    fn units_are_not_spent_after_their_deadline() {
        let slot = with_lease(5, 1_000);
        assert!(matches!(spend(&slot, KEY, 1, 999, 0, CLAIM).0, Spend::Spent { .. }));
        assert!(matches!(spend(&slot, KEY, 1, 1_000, 0, CLAIM).0, Spend::Short { ask: Some(_) }));
    }

    #[test]
    fn a_refresh_joins_the_lease_and_the_soonest_units_are_spent_first() {
        let slot = with_lease(2, 500);
        let slot = granted(&slot, KEY, Some(part("b", 10, 2_000)), 10).unwrap();
        let (outcome, _) = spend(&slot, KEY, 3, 20, 0, CLAIM);
        assert_eq!(
            outcome,
            Spend::Spent { taken: vec![("a".into(), 2), ("b".into(), 1)], left: 9, refresh: None }
        );
    }

    #[test]
    fn units_of_a_denied_request_go_back_while_their_part_lasts() {
        let slot = with_lease(3, 500);
        let (Spend::Spent { taken, .. }, Some(after)) = spend(&slot, KEY, 2, 10, 0, CLAIM) else { panic!() };
        let back = give_back(&after, KEY, &taken, 20).unwrap();
        assert!(matches!(spend(&back, KEY, 3, 30, 0, CLAIM).0, Spend::Spent { left: 0, .. }));
        assert_eq!(give_back(&after, KEY, &taken, 500), None);
    }

    #[test]
    fn a_slot_holds_four_keys_and_a_fifth_goes_without_a_lease() {
        let mut slot = Vec::new();
        for k in 0..WAYS as u64 {
            slot = spend(&slot, Fingerprint(100 + k), 1, 0, 0, CLAIM).1.unwrap();
        }
        assert_eq!(spend(&slot, KEY, 1, 1, 0, CLAIM), (Spend::Short { ask: None }, None));
    }

    #[test]
    fn records_survive_encoding_and_damaged_bytes_read_as_an_empty_slot() {
        let slot = granted(&with_lease(3, 500), KEY, Some(part("second-grant", 7, 900)), 2).unwrap();
        let bytes = slot.encode();
        assert_eq!(<Vec<Record> as Records>::decode(&bytes), slot);
        for cut in 0..bytes.len() {
            assert!(<Vec<Record> as Records>::decode(&bytes[..cut]).is_empty(), "cut at {cut}");
        }
    }

    #[test]
    fn the_deadline_is_the_earliest_of_validity_reset_and_valid_until() {
        assert_eq!(crate::lease::deadline(100, 50, None, None), 150);
        assert_eq!(crate::lease::deadline(100, 50, Some(20), None), 120);
        assert_eq!(crate::lease::deadline(100, 50, Some(0), Some(130)), 130);
    }
}
