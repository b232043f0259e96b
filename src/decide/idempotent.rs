//! A request's idempotency key through its moments: claimed (or answered from) at admission, its
//! response captured as it passes, and the key completed or released when the stream ends.

use std::hash::Hasher;
use std::sync::atomic::Ordering;

use siphasher::sip::SipHasher13;

use super::background::Background;
use super::{Env, Limiter};
use crate::algorithm::time::NANOS_PER_MS;
use crate::config::{Across, Idempotency, NotStoredPolicy, TableFullPolicy};
use crate::global::answer::CallError;
use crate::idempotency::fleet::{claim_message, complete_message, read_claim};
use crate::idempotency::records::{claim, finish, Ending, Found, Record, Stored};
use crate::idempotency::slot_key;
use crate::report::metrics::Metric;
use crate::report::reply::{self, KeyRefusal, LocalReply};
use crate::request::keys::{
    fleet_idempotency_key, fleet_request_identity, idempotency_key, request_identity,
};
use crate::request::Response;
use crate::state::ledger::{self, LedgerError};
use crate::state::Fingerprint;

/// The longest key accepted; the draft sets no bound, UUIDs take 36.
const MAX_KEY_LEN: usize = 255;

/// What a request holds of an idempotency key, from its admission to its end.
#[derive(Debug)]
pub(super) struct Claim {
    entry: usize,
    key: KeyAt,
    owner: u64,
    response: Option<Capture>,
}

/// Where a claimed key is kept.
#[derive(Debug)]
enum KeyAt {
    /// This Envoy's shared data, under its fingerprint.
    Here(Fingerprint),
    /// The rate limit service, under its name there.
    Service(String),
}

/// What admission does about a request's idempotency key.
#[derive(Debug)]
pub(super) enum KeyStep {
    /// Go on, holding the claim if there is one.
    Go(Option<Claim>),
    /// Answer the request instead (a replay, 409, 422, 400, 503).
    Answer(LocalReply<'static>),
    /// Ask the rate limit service, which keeps the entry's keys.
    Ask(FleetClaim),
}

/// A claim asked of the rate limit service, on the way.
#[derive(Debug)]
pub(super) struct FleetClaim {
    entry: usize,
    key: String,
    owner: u64,
    pub message: Vec<u8>,
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
    /// At admission: the request claims its key and goes on, is answered from the key's record
    /// (a replay, 409, 422) or refused (400), or asks the rate limit service (keys kept there).
    pub(super) fn claim_key(&self, env: &Env<'_>, id: u32) -> KeyStep {
        let Some((index, entry)) =
            self.config.idempotency.iter().enumerate().find(|(_, e)| e.matcher.matches(env.request))
        else {
            return KeyStep::Go(None);
        };
        let value = match env.request.header(&entry.header) {
            None if !entry.required => return KeyStep::Go(None),
            None => return refuse(env, index, entry, Metric::KeyRefused, KeyRefusal::Missing),
            Some(value) => match well_formed(&value) {
                Some(v) => v.to_vec(),
                None => return refuse(env, index, entry, Metric::KeyRefused, KeyRefusal::Missing),
            },
        };
        let owner = self.owner_token(env.now(), id);
        if entry.across == Across::Fleet {
            return self.ask_fleet(env, index, entry, &value, owner);
        }
        let Some(key) = idempotency_key(self.seed, entry, env.request, &value) else {
            return KeyStep::Go(None);
        };
        let request = request_identity(self.seed, env.request);
        let slot = slot_key(&self.config.key_prefix, &entry.name, entry.table_size, key);
        let now = env.now();
        let found = ledger::update(env.store, &slot, |records: &Vec<Record>| {
            claim(records, key, request, owner, now, entry.in_flight_nanos)
        });
        let claimed = Claim { entry: index, key: KeyAt::Here(key), owner, response: None };
        match found {
            Ok(found) => self.found(env, index, found, claimed),
            Err(LedgerError::Store(_) | LedgerError::Exhausted) => {
                // The key cannot be checked: the request goes on unprotected rather than failing,
                // as a rule's store error lets a request through.
                env.observer.count(Metric::KeyStoreError(index));
                KeyStep::Go(None)
            }
        }
    }

    /// What a request with a key does about what it found there (`claimed`: its claim, should it
    /// be the first).
    fn found(&self, env: &Env<'_>, index: usize, found: Found, claimed: Claim) -> KeyStep {
        let Some(entry) = self.config.idempotency.get(index) else { return KeyStep::Go(None) };
        match found {
            Found::Claimed => {
                env.observer.count(Metric::KeyClaimed(index));
                KeyStep::Go(Some(claimed))
            }
            Found::InFlight => refuse(env, index, entry, Metric::KeyInFlight, KeyRefusal::InUse),
            Found::Mismatch => refuse(env, index, entry, Metric::KeyReused, KeyRefusal::Reused),
            Found::Completed(Some(stored)) => {
                env.observer.count(Metric::Replayed(index));
                KeyStep::Answer(reply::replay(stored.status, stored.headers, stored.body))
            }
            Found::Completed(None) if entry.when_not_stored == NotStoredPolicy::Pass => {
                env.observer.count(Metric::ResponseNotKept(index));
                KeyStep::Go(None)
            }
            Found::Completed(None) => refuse(env, index, entry, Metric::ResponseNotKept, KeyRefusal::InUse),
            Found::Full => {
                env.observer.count(Metric::KeyTableFull(index));
                unprotected_or_refused(entry.when_table_full, &entry.header)
            }
        }
    }

    /// A key kept by the rate limit service: the claim to ask it for.
    fn ask_fleet(
        &self,
        env: &Env<'_>,
        index: usize,
        entry: &Idempotency,
        value: &[u8],
        owner: u64,
    ) -> KeyStep {
        let Some(service) = &self.config.global else { return KeyStep::Go(None) };
        let Some(key) = fleet_idempotency_key(entry, env.request, value) else { return KeyStep::Go(None) };
        let request = fleet_request_identity(env.request);
        let in_flight_ms = entry.in_flight_nanos / NANOS_PER_MS;
        let message = claim_message(&service.domain, &key, &request, owner, in_flight_ms);
        KeyStep::Ask(FleetClaim { entry: index, key, owner, message })
    }

    /// The service's answer to a claim (or why there is none).
    pub(super) fn fleet_answered(
        &self,
        env: &Env<'_>,
        asked: FleetClaim,
        answer: Result<&[u8], CallError>,
    ) -> KeyStep {
        let Some(entry) = self.config.idempotency.get(asked.entry) else { return KeyStep::Go(None) };
        let found = match answer.map(read_claim) {
            Ok(Some(found)) => found,
            failed => {
                let reason = match failed {
                    Err(e) => e.to_string(),
                    Ok(_) => "undecodable answer to Keys/Claim".to_owned(),
                };
                env.observer.count(Metric::KeyStoreError(asked.entry));
                env.observer.global_failure(&format!("idempotency key not checked: {reason}"));
                return unprotected_or_refused(entry.when_service_fails, &entry.header);
            }
        };
        let claimed =
            Claim { entry: asked.entry, key: KeyAt::Service(asked.key), owner: asked.owner, response: None };
        self.found(env, asked.entry, found, claimed)
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
        let result = match &claim.key {
            KeyAt::Service(key) => {
                let Some(service) = &self.config.global else { return };
                let ttl_ms = entry.ttl_nanos / NANOS_PER_MS;
                let message = complete_message(&service.domain, key, claim.owner, ending, ttl_ms);
                // Its answer is the background call's: a failure is counted there.
                self.background().push(Background::KeyComplete { entry: claim.entry, message });
                Ok(())
            }
            KeyAt::Here(key) => {
                let slot = slot_key(&self.config.key_prefix, &entry.name, entry.table_size, *key);
                ledger::update(env.store, &slot, |records: &Vec<_>| {
                    ((), finish(records, *key, claim.owner, now, ending.clone()))
                })
            }
        };
        match result {
            Ok(()) if released => env.observer.count(Metric::KeyReleased(claim.entry)),
            Ok(()) => {}
            // The claim stays until its in_flight_timeout, then frees itself.
            Err(_) => env.observer.count(Metric::KeyStoreError(claim.entry)),
        }
    }
}

fn refuse(
    env: &Env<'_>,
    index: usize,
    entry: &Idempotency,
    metric: fn(usize) -> Metric,
    refusal: KeyRefusal,
) -> KeyStep {
    env.observer.count(metric(index));
    KeyStep::Answer(reply::key_refusal(refusal, &entry.header))
}

/// A key that cannot be tracked (its slot full, the service unreachable): the request goes on
/// unprotected, or gets 503, as the entry says.
fn unprotected_or_refused(policy: TableFullPolicy, header: &str) -> KeyStep {
    match policy {
        TableFullPolicy::Allow => KeyStep::Go(None),
        TableFullPolicy::Deny => KeyStep::Answer(reply::key_refusal(KeyRefusal::Full, header)),
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
