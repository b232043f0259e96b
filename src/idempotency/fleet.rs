//! Keys kept by the rate limit service (`across: "fleet"`): the messages of its `Keys` methods,
//! and what a claim's answer means, in the terms of the local records.

use prost::Message;

use super::protocol::{
    ClaimRequest, ClaimResponse, CompleteRequest, Header, StoredResponse, OUTCOME_CLAIMED, OUTCOME_COMPLETED,
    OUTCOME_IN_FLIGHT, OUTCOME_MISMATCH,
};
use super::records::{Ending, Found, Stored};

/// The claim of `key` for request `request` by `owner`, lasting `in_flight_ms` if never completed.
pub fn claim_message(domain: &str, key: &str, request: &str, owner: u64, in_flight_ms: u64) -> Vec<u8> {
    ClaimRequest {
        domain: domain.to_owned(),
        key: key.to_owned(),
        request: request.to_owned(),
        owner: format!("{owner:016x}"),
        in_flight_ms: in_flight_ms.max(1),
    }
    .encode_to_vec()
}

/// What the claim found, as a local claim would have; `None` for an answer that is not one.
pub fn read_claim(answer: &[u8]) -> Option<Found> {
    let response = ClaimResponse::decode(answer).ok()?;
    Some(match response.outcome {
        OUTCOME_CLAIMED => Found::Claimed,
        OUTCOME_IN_FLIGHT => Found::InFlight,
        OUTCOME_MISMATCH => Found::Mismatch,
        OUTCOME_COMPLETED => Found::Completed(response.stored.and_then(stored)),
        _ => return None,
    })
}

/// A stored response as the service sends it back; `None` when it is not one to replay.
fn stored(s: StoredResponse) -> Option<Stored> {
    let status = u16::try_from(s.status).ok().filter(|s| (100..=599).contains(s))?;
    let headers = s.headers.into_iter().map(|h| (h.name, h.value)).collect();
    Some(Stored { status, headers, body: s.body })
}

/// How the owner's request ended, for the service to complete (or release) the key.
pub fn complete_message(domain: &str, key: &str, owner: u64, ending: Ending, ttl_ms: u64) -> Vec<u8> {
    let (release, stored) = match ending {
        Ending::Released => (true, None),
        Ending::Completed { stored, .. } => (false, stored),
    };
    CompleteRequest {
        domain: domain.to_owned(),
        key: key.to_owned(),
        owner: format!("{owner:016x}"),
        release,
        ttl_ms: ttl_ms.max(1),
        stored: stored.map(|s| StoredResponse {
            status: u32::from(s.status),
            headers: s.headers.into_iter().map(|(name, value)| Header { name, value }).collect(),
            body: s.body,
        }),
    }
    .encode_to_vec()
}
