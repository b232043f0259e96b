//! The rate limit service's idempotency methods (`ratelimitwasm.idempotency.v1.Keys`, see
//! service/README.md): the messages, with the service's field numbers, encoded with prost.

use prost::Message;

pub const SERVICE: &str = "ratelimitwasm.idempotency.v1.Keys";
pub const CLAIM: &str = "Claim";
pub const COMPLETE: &str = "Complete";

pub const OUTCOME_CLAIMED: i32 = 1;
pub const OUTCOME_IN_FLIGHT: i32 = 2;
pub const OUTCOME_MISMATCH: i32 = 3;
pub const OUTCOME_COMPLETED: i32 = 4;

#[derive(Clone, PartialEq, Message)]
pub struct ClaimRequest {
    #[prost(string, tag = "1")]
    pub domain: String,
    #[prost(string, tag = "2")]
    pub key: String,
    #[prost(string, tag = "3")]
    pub request: String,
    #[prost(string, tag = "4")]
    pub owner: String,
    #[prost(uint64, tag = "5")]
    pub in_flight_ms: u64,
}

#[derive(Clone, PartialEq, Message)]
pub struct Header {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(string, tag = "2")]
    pub value: String,
}

#[derive(Clone, PartialEq, Message)]
pub struct StoredResponse {
    #[prost(uint32, tag = "1")]
    pub status: u32,
    #[prost(message, repeated, tag = "2")]
    pub headers: Vec<Header>,
    #[prost(bytes = "vec", tag = "3")]
    pub body: Vec<u8>,
}

#[derive(Clone, PartialEq, Message)]
pub struct ClaimResponse {
    #[prost(int32, tag = "1")]
    pub outcome: i32,
    #[prost(message, optional, tag = "2")]
    pub stored: Option<StoredResponse>,
}

#[derive(Clone, PartialEq, Message)]
pub struct CompleteRequest {
    #[prost(string, tag = "1")]
    pub domain: String,
    #[prost(string, tag = "2")]
    pub key: String,
    #[prost(string, tag = "3")]
    pub owner: String,
    #[prost(bool, tag = "4")]
    pub release: bool,
    #[prost(uint64, tag = "5")]
    pub ttl_ms: u64,
    #[prost(message, optional, tag = "6")]
    pub stored: Option<StoredResponse>,
}
