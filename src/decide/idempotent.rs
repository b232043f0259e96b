//! A request's idempotency key through its moments: claimed (or answered from) at admission, its
//! response captured as it passes, and the key completed or released when the stream ends.

use std::hash::Hasher;
use std::sync::atomic::Ordering;

use siphasher::sip::SipHasher13;

use super::{Env, Limiter};
use crate::config::{Idempotency, NotStoredPolicy, TableFullPolicy};
use crate::idempotency::records::{claim, finish, Ending, Found, Record, Stored};
use crate::idempotency::slot_key;
use crate::report::metrics::Metric;
use crate::report::reply::{self, KeyRefusal, LocalReply};
use crate::request::keys::{idempotency_key, request_identity};
use crate::request::Response;
use crate::state::ledger::{self, LedgerError};
use crate::state::Fingerprint;

/// The longest key accepted; the draft sets no bound, UUIDs take 36.
const MAX_KEY_LEN: usize = 255;

/// What a request holds of an idempotency key, from its admission to its end.
#[derive(Debug)]
pub(super) struct Claim {
    entry: usize,
    key: Fingerprint,
    owner: u64,
    response: Option<Capture>,
}

/// What a request needs of its response body.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BodyWanted {
    Nothing,
    /// Only to know that it ended.
    EndOnly,
    /// Its bytes (and its end).
    Bytes,
}

/// The response as it passes: what will be kept of it.
#[derive(Debug)]
struct Capture {
    stored: Stored,
    /// The whole response went by (not cut by a reset).
    complete: bool,
    /// Kept for replay: storing is on and the body fits.
    keep: bool,
}

impl Limiter {
    /// At admission: the request claims its key and goes on (`None`), or is answered from the
    /// key's record (a replay, 409, 422) or refused (400).
    pub(super) fn claim_key(&self, env: &Env<'_>, id: u32) -> (Option<Claim>, Option<LocalReply<'static>>) {
        let Some((index, entry)) =
            self.config.idempotency.iter().enumerate().find(|(_, e)| e.matcher.matches(env.request))
        else {
            return (None, None);
        };
        let refuse = |metric: fn(usize) -> Metric, refusal: KeyRefusal| {
            env.observer.count(metric(index));
            (None, Some(reply::key_refusal(refusal, &entry.header)))
        };
        let value = match env.request.header(&entry.header) {
            None if !entry.required => return (None, None),
            None => return refuse(Metric::KeyRefused, KeyRefusal::Missing),
            Some(value) => match well_formed(&value) {
                Some(v) => v.to_vec(),
                None => return refuse(Metric::KeyRefused, KeyRefusal::Missing),
            },
        };
        let Some(key) = idempotency_key(self.seed, entry, env.request, &value) else { return (None, None) };
        let request = request_identity(self.seed, env.request);
        let owner = self.owner_token(env.now(), id);
        let slot = slot_key(&self.config.key_prefix, &entry.name, entry.table_size, key);
        let now = env.now();
        let found = ledger::update(env.store, &slot, |records: &Vec<Record>| {
            claim(records, key, request, owner, now, entry.in_flight_nanos)
        });
        let claimed = Claim { entry: index, key, owner, response: None };
        match found {
            Ok(Found::Claimed) => {
                env.observer.count(Metric::KeyClaimed(index));
                (Some(claimed), None)
            }
            Ok(Found::InFlight) => refuse(Metric::KeyInFlight, KeyRefusal::InUse),
            Ok(Found::Mismatch) => refuse(Metric::KeyReused, KeyRefusal::Reused),
            Ok(Found::Completed(Some(stored))) => {
                env.observer.count(Metric::Replayed(index));
                (None, Some(reply::replay(stored.status, stored.headers, stored.body)))
            }
            Ok(Found::Completed(None)) if entry.when_not_stored == NotStoredPolicy::Pass => {
                env.observer.count(Metric::ResponseNotKept(index));
                (None, None)
            }
            Ok(Found::Completed(None)) => refuse(Metric::ResponseNotKept, KeyRefusal::InUse),
            Ok(Found::Full) => self.key_table_full(env, index, entry),
            Err(LedgerError::Store(_) | LedgerError::Exhausted) => {
                // The key cannot be checked: the request goes on unprotected rather than failing,
                // as a rule's store error lets a request through.
                env.observer.count(Metric::KeyStoreError(index));
                (None, None)
            }
        }
    }

    fn key_table_full(
        &self,
        env: &Env<'_>,
        index: usize,
        entry: &Idempotency,
    ) -> (Option<Claim>, Option<LocalReply<'static>>) {
        env.observer.count(Metric::KeyTableFull(index));
        match entry.when_table_full {
            TableFullPolicy::Allow => (None, None),
            TableFullPolicy::Deny => (None, Some(reply::key_refusal(KeyRefusal::Full, &entry.header))),
        }
    }

    /// Tells this request's claim apart from any later claim of the same key (after this one
    /// expired), so it never completes or releases another request's.
    fn owner_token(&self, now: u64, id: u32) -> u64 {
        let mut hasher = SipHasher13::new_with_keys(self.seed, now);
        hasher.write_u32(id);
        hasher.write_u64(self.claims.fetch_add(1, Ordering::Relaxed));
        hasher.finish()
    }

    /// Response headers of a request that holds a key: its status and the headers to replay.
    pub(super) fn capture_headers(&self, claim: &mut Claim, response: &dyn Response, end_of_stream: bool) {
        let Some(entry) = self.config.idempotency.get(claim.entry) else { return };
        let status = response
            .header(":status")
            .and_then(|s| std::str::from_utf8(&s).ok().and_then(|s| s.parse::<u16>().ok()))
            .unwrap_or(0);
        let mut headers = Vec::new();
        for name in &entry.replay_headers {
            if let Some(value) = response.header(name).and_then(|v| String::from_utf8(v).ok()) {
                headers.push((name.clone(), value));
            }
        }
        let stored = Stored { status, headers, body: Vec::new() };
        claim.response = Some(Capture { stored, complete: end_of_stream, keep: entry.store_responses });
    }

    /// What the claim needs of the response body: whether it ends (a response cut by a reset
    /// frees the key), and its bytes while they are kept for replay.
    pub(super) fn wants_body(claim: &Claim) -> BodyWanted {
        match &claim.response {
            Some(c) if !c.complete && c.keep => BodyWanted::Bytes,
            Some(c) if !c.complete => BodyWanted::EndOnly,
            _ => BodyWanted::Nothing,
        }
    }

    /// A piece of the response body passed; `end`: it was the last.
    pub(super) fn capture_body(&self, claim: &mut Claim, chunk: &[u8], end: bool) {
        let Some(entry) = self.config.idempotency.get(claim.entry) else { return };
        let Some(capture) = claim.response.as_mut() else { return };
        if capture.keep {
            if capture.stored.body.len() + chunk.len() > entry.max_body_bytes as usize {
                capture.keep = false;
                capture.stored.body = Vec::new();
            } else {
                capture.stored.body.extend_from_slice(chunk);
            }
        }
        capture.complete |= end;
    }

    /// The stream is over: the key is completed (remembered until its TTL, with the response
    /// when kept) or, for a request that failed, released for a retry.
    pub(super) fn finish_key(&self, env: &Env<'_>, claim: Claim) {
        let Some(entry) = self.config.idempotency.get(claim.entry) else { return };
        let now = env.now();
        let failed = match &claim.response {
            Some(c) => !c.complete || c.stored.status >= 500,
            None => true,
        };
        let ending = if failed && entry.release_on_failure {
            Ending::Released
        } else {
            let stored = claim.response.filter(|c| c.keep && c.complete).map(|c| c.stored);
            Ending::Completed { stored, expires: now.saturating_add(entry.ttl_nanos) }
        };
        let released = ending == Ending::Released;
        let slot = slot_key(&self.config.key_prefix, &entry.name, entry.table_size, claim.key);
        let result = ledger::update(env.store, &slot, |records: &Vec<_>| {
            let next = finish(records, claim.key, claim.owner, now, ending.clone());
            ((), next)
        });
        match result {
            Ok(()) if released => env.observer.count(Metric::KeyReleased(claim.entry)),
            Ok(()) => {}
            // The claim stays until its in_flight_timeout, then frees itself.
            Err(_) => env.observer.count(Metric::KeyStoreError(claim.entry)),
        }
    }
}

/// The key of an `Idempotency-Key` value: a structured-field string (`"..."`) or, as many clients
/// send it, the bare text; printable ASCII, 1 to 255 characters, no comma (two keys in one field).
fn well_formed(value: &[u8]) -> Option<&[u8]> {
    let value = value.trim_ascii();
    let inner = match value {
        [b'"', inner @ .., b'"'] => inner,
        _ => value,
    };
    let printable = |b: &u8| (0x21..=0x7e).contains(b) && !matches!(b, b'"' | b'\\' | b',');
    (!inner.is_empty() && inner.len() <= MAX_KEY_LEN && inner.iter().all(printable)).then_some(inner)
}

#[cfg(test)]
mod tests {
    use super::well_formed;

    #[test]
    fn keys_are_taken_quoted_or_bare_and_malformed_ones_refused() {
        assert_eq!(well_formed(b"\"8e03978e-40d5\""), Some(&b"8e03978e-40d5"[..]));
        assert_eq!(well_formed(b" abc "), Some(&b"abc"[..]));
        for bad in [&b""[..], b"\"\"", b"a,b", b"a b", b"\"a\\\"b\"", &[b'a'; 256][..], b"caf\xc3\xa9"] {
            assert_eq!(well_formed(bad), None, "{bad:?}");
        }
    }
}
