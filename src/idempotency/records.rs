//! One slot of an idempotency table: up to [`WAYS`] records, each a key's state (claimed by a
//! request in flight, or completed with or without its response), and their byte encoding.
//!
//! The transitions are pure functions from the slot's records to an outcome and the records to
//! write; the ledger (`state::ledger`) owns the compare-and-swap loop around them.

use crate::state::ledger::Records;
use crate::state::Fingerprint;

/// Records one slot holds. A slot is the unit of compare-and-swap, so every key that hashes to it
/// is decided against the same value: two requests with one key can never both claim it.
pub const WAYS: usize = 4;

const FORMAT: u8 = 1;

/// A response kept to replay: its status, the configured headers and the body.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Stored {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Phase {
    /// A request holds the key; `owner` tells it apart from a later holder of the same key.
    InFlight { owner: u64 },
    /// Completed; the response when it was kept.
    Done(Option<Stored>),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    pub key: Fingerprint,
    /// Method and path of the request that claimed the key: another request with the same key is
    /// a client's mistake (422), not a retry.
    pub request: Fingerprint,
    /// The instant the record stops counting (nanoseconds since the epoch).
    pub expires: u64,
    pub phase: Phase,
}

/// What a request with a key finds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Found {
    /// Nobody has the key: it is now this request's (the records to write hold its claim).
    Claimed,
    /// Another request with this key is in flight.
    InFlight,
    /// The key's request completed; its response, if kept.
    Completed(Option<Stored>),
    /// The key was used for another request (method or path differ).
    Mismatch,
    /// The key is new, and the slot holds [`WAYS`] live records of other keys.
    Full,
}

/// A request with `key` (for request `request`) arrives at `now`: what it finds, and the records
/// to write (`None`: nothing to write).
pub fn claim(
    records: &[Record],
    key: Fingerprint,
    request: Fingerprint,
    owner: u64,
    now: u64,
    in_flight_nanos: u64,
) -> (Found, Option<Vec<Record>>) {
    let live: Vec<Record> = records.iter().filter(|r| r.expires > now).cloned().collect();
    if let Some(record) = live.iter().find(|r| r.key == key) {
        let found = match &record.phase {
            _ if record.request != request => Found::Mismatch,
            Phase::InFlight { .. } => Found::InFlight,
            Phase::Done(stored) => Found::Completed(stored.clone()),
        };
        return (found, None);
    }
    if live.len() >= WAYS {
        return (Found::Full, None);
    }
    let mut next = live;
    next.push(Record {
        key,
        request,
        expires: now.saturating_add(in_flight_nanos),
        phase: Phase::InFlight { owner },
    });
    (Found::Claimed, Some(next))
}

/// How the owner's request ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Ending {
    /// Completed: the key is remembered until `expires`, with the response if kept.
    Completed { stored: Option<Stored>, expires: u64 },
    /// Failed: the key is free again.
    Released,
}

/// The owner's request ended: the records to write, or `None` when its claim is gone (expired,
/// and perhaps taken by a later request, which it must not touch).
pub fn finish(
    records: &[Record],
    key: Fingerprint,
    owner: u64,
    now: u64,
    ending: Ending,
) -> Option<Vec<Record>> {
    let mine = |r: &Record| r.key == key && r.phase == Phase::InFlight { owner };
    let mut next: Vec<Record> = records.iter().filter(|r| r.expires > now).cloned().collect();
    let position = next.iter().position(mine)?;
    match ending {
        Ending::Released => {
            next.remove(position);
        }
        Ending::Completed { stored, expires } => {
            if let Some(record) = next.get_mut(position) {
                record.expires = expires;
                record.phase = Phase::Done(stored);
            }
        }
    }
    Some(next)
}

// ---------------------------------------------------------------------------------------------
// Encoding: FORMAT, count, then per record: key, request, expires (u64 LE each), phase tag,
// owner (in flight) or stored flag + status, headers (count u8; name and value as u16 LE length +
// bytes) and body (u32 LE length + bytes).

pub fn encode(records: &[Record]) -> Vec<u8> {
    let mut out = vec![FORMAT, records.len() as u8];
    for record in records {
        out.extend_from_slice(&record.key.0.to_le_bytes());
        out.extend_from_slice(&record.request.0.to_le_bytes());
        out.extend_from_slice(&record.expires.to_le_bytes());
        match &record.phase {
            Phase::InFlight { owner } => {
                out.push(0);
                out.extend_from_slice(&owner.to_le_bytes());
            }
            Phase::Done(None) => out.push(1),
            Phase::Done(Some(stored)) => {
                out.push(2);
                encode_stored(&mut out, stored);
            }
        }
    }
    out
}

fn encode_stored(out: &mut Vec<u8>, stored: &Stored) {
    out.extend_from_slice(&stored.status.to_le_bytes());
    out.push(stored.headers.len() as u8);
    for (name, value) in &stored.headers {
        for text in [name, value] {
            out.extend_from_slice(&(text.len() as u16).to_le_bytes());
            out.extend_from_slice(text.as_bytes());
        }
    }
    out.extend_from_slice(&(stored.body.len() as u32).to_le_bytes());
    out.extend_from_slice(&stored.body);
}

/// Damaged bytes read as an empty slot: every key in it is then new again, which replays nothing
/// wrong.
impl Records for Vec<Record> {
    fn decode(bytes: &[u8]) -> Self {
        decode(bytes)
    }

    fn encode(&self) -> Vec<u8> {
        encode(self)
    }
}

/// The records of a slot's bytes; bytes that are not a slot of this format read as an empty slot.
pub fn decode(bytes: &[u8]) -> Vec<Record> {
    let mut reader = Reader { bytes, at: 0 };
    decode_from(&mut reader).unwrap_or_default()
}

fn decode_from(r: &mut Reader<'_>) -> Option<Vec<Record>> {
    if r.u8()? != FORMAT {
        return None;
    }
    let count = usize::from(r.u8()?);
    if count > WAYS {
        return None;
    }
    let mut records = Vec::with_capacity(count);
    for _ in 0..count {
        let key = Fingerprint(r.u64()?);
        let request = Fingerprint(r.u64()?);
        let expires = r.u64()?;
        let phase = match r.u8()? {
            0 => Phase::InFlight { owner: r.u64()? },
            1 => Phase::Done(None),
            2 => Phase::Done(Some(decode_stored(r)?)),
            _ => return None,
        };
        records.push(Record { key, request, expires, phase });
    }
    (r.at == r.bytes.len()).then_some(records)
}

fn decode_stored(r: &mut Reader<'_>) -> Option<Stored> {
    let status = u16::from_le_bytes(r.take(2)?.try_into().ok()?);
    let count = r.u8()?;
    let mut headers = Vec::with_capacity(usize::from(count));
    for _ in 0..count {
        let name = r.text()?;
        let value = r.text()?;
        headers.push((name, value));
    }
    let len = u32::from_le_bytes(r.take(4)?.try_into().ok()?) as usize;
    let body = r.take(len)?.to_vec();
    Some(Stored { status, headers, body })
}

struct Reader<'b> {
    bytes: &'b [u8],
    at: usize,
}

impl<'b> Reader<'b> {
    fn take(&mut self, n: usize) -> Option<&'b [u8]> {
        let end = self.at.checked_add(n)?;
        let slice = self.bytes.get(self.at..end)?;
        self.at = end;
        Some(slice)
    }

    fn u8(&mut self) -> Option<u8> {
        self.take(1)?.first().copied()
    }

    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_le_bytes(self.take(8)?.try_into().ok()?))
    }

    fn text(&mut self) -> Option<String> {
        let len = usize::from(u16::from_le_bytes(self.take(2)?.try_into().ok()?));
        String::from_utf8(self.take(len)?.to_vec()).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: Fingerprint = Fingerprint(7);
    const POST_PAY: Fingerprint = Fingerprint(100);
    const MINUTE: u64 = 60_000_000_000;

    fn claimed(owner: u64, now: u64) -> Vec<Record> {
        claim(&[], KEY, POST_PAY, owner, now, MINUTE).1.unwrap()
    }

    fn reply() -> Stored {
        Stored {
            status: 201,
            headers: vec![("content-type".into(), "application/json".into())],
            body: b"{}".to_vec(),
        }
    }

    #[test]
    fn the_first_request_claims_the_key_and_a_duplicate_finds_it_in_flight() {
        let records = claimed(1, 0);
        assert_eq!(claim(&records, KEY, POST_PAY, 2, 5, MINUTE), (Found::InFlight, None));
    }

    #[test]
    fn a_retry_after_completion_finds_the_stored_response_until_the_ttl() {
        let records = claimed(1, 0);
        let done =
            finish(&records, KEY, 1, 10, Ending::Completed { stored: Some(reply()), expires: 100 }).unwrap();
        assert_eq!(claim(&done, KEY, POST_PAY, 2, 99, MINUTE).0, Found::Completed(Some(reply())));
        assert_eq!(claim(&done, KEY, POST_PAY, 2, 100, MINUTE).0, Found::Claimed);
    }

    #[test]
    fn the_same_key_on_another_request_is_a_mismatch_in_flight_and_after() {
        let records = claimed(1, 0);
        assert_eq!(claim(&records, KEY, Fingerprint(101), 2, 1, MINUTE).0, Found::Mismatch);
        let done = finish(&records, KEY, 1, 2, Ending::Completed { stored: None, expires: 100 }).unwrap();
        assert_eq!(claim(&done, KEY, Fingerprint(101), 2, 3, MINUTE).0, Found::Mismatch);
    }

    #[test]
    fn a_released_key_can_be_claimed_again() {
        let records = claimed(1, 0);
        let released = finish(&records, KEY, 1, 5, Ending::Released).unwrap();
        assert!(released.is_empty());
        assert_eq!(claim(&released, KEY, POST_PAY, 2, 6, MINUTE).0, Found::Claimed);
    }

    #[test]
    fn an_owner_whose_claim_expired_and_was_retaken_touches_nothing() {
        let records = claimed(1, 0);
        let retaken = claim(&records, KEY, POST_PAY, 2, MINUTE, MINUTE).1.unwrap();
        assert_eq!(finish(&retaken, KEY, 1, MINUTE + 1, Ending::Released), None);
        assert_eq!(claim(&retaken, KEY, POST_PAY, 3, MINUTE + 2, MINUTE).0, Found::InFlight);
    }

    #[test]
    fn a_slot_with_every_way_live_refuses_a_new_key_and_frees_expired_ones() {
        let mut records = Vec::new();
        for k in 0..WAYS as u64 {
            records = claim(&records, Fingerprint(10 + k), POST_PAY, k, k, MINUTE).1.unwrap();
        }
        assert_eq!(claim(&records, KEY, POST_PAY, 9, 10, MINUTE), (Found::Full, None));
        assert_eq!(claim(&records, KEY, POST_PAY, 9, MINUTE, MINUTE).0, Found::Claimed);
    }

    #[test]
    fn records_survive_encoding_and_damaged_bytes_read_as_an_empty_slot() {
        let records = claimed(1, 0);
        let mut done =
            finish(&records, KEY, 1, 1, Ending::Completed { stored: Some(reply()), expires: 9 }).unwrap();
        done.extend(claim(&done, Fingerprint(8), POST_PAY, 3, 2, MINUTE).1.unwrap().pop());
        let bytes = encode(&done);
        assert_eq!(decode(&bytes), done);
        for cut in 0..bytes.len() {
            assert_eq!(decode(&bytes[..cut]), Vec::<Record>::new(), "cut at {cut}");
        }
        assert_eq!(decode(&[FORMAT + 1, 0]), Vec::<Record>::new());
    }
}
