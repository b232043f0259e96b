//! A global rule's `lease`: the rule takes quota from the rate limit service a few units at a time
//! and spends it in this Envoy's shared data, instead of asking on every request.

use serde::Deserialize;

use super::duration::Duration;
use super::{ConfigError, MIN_TABLE_SIZE};
use crate::algorithm::time::NANOS_PER_SECOND;

/// The most units one lease may ask for (the service's bound).
pub const MAX_LEASE_SIZE: u32 = 100_000;
const MAX_VALIDITY_NANOS: u64 = 3_600 * NANOS_PER_SECOND;
const DEFAULT_VALIDITY_NANOS: u64 = 10 * NANOS_PER_SECOND;
const DEFAULT_LEASE_SLOTS: u32 = 1024;
const MAX_LEASE_SLOTS: u32 = 1 << 20;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Lease {
    /// Units asked for on each call, on top of the call's own.
    pub size: u32,
    /// A refresh starts in the background once a key's units are down to this many.
    pub refresh_below: u32,
    /// How long a lease may live at most (the service may cut it at its window's end).
    pub validity_nanos: u64,
    /// Slots of the rule's lease table (4 keys each).
    pub table_size: u32,
    /// Ask for what the key's recent rate would spend over `validity`, instead of `size` each time.
    pub adaptive: bool,
}

impl Lease {
    /// The units to ask for, for a key whose requests wanted `units` over the last `over_nanos`:
    /// `size`, or (adaptive) what that rate would spend over a lease's `validity`, within
    /// `refresh_below + 1 ..= size`.
    pub fn ask_for(&self, units: u64, over_nanos: u64) -> u64 {
        let size = u64::from(self.size);
        if !self.adaptive {
            return size;
        }
        let over = u128::from(over_nanos.max(MIN_SPAN_NANOS));
        let at_rate = u128::from(units) * u128::from(self.validity_nanos) / over;
        u64::try_from(at_rate).unwrap_or(u64::MAX).clamp(u64::from(self.refresh_below) + 1, size)
    }
}

/// A rate measured over less than this is taken over this (a key's first requests).
const MIN_SPAN_NANOS: u64 = 1_000_000_000;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawLease {
    size: u32,
    #[serde(default)]
    refresh_below: Option<u32>,
    #[serde(default)]
    validity: Option<Duration>,
    #[serde(default)]
    table_size: Option<u32>,
    #[serde(default)]
    adaptive: bool,
}

/// The lease of rule `path`, which must be global.
pub(super) fn compile_for(
    path: &str,
    raw: Option<RawLease>,
    global: bool,
) -> Result<Option<Lease>, ConfigError> {
    match (raw, global) {
        (Some(_), false) => Err(ConfigError::at(
            format!("{path}.lease"),
            "only a global rule takes a lease (a local rule already decides in this Envoy)",
        )),
        (Some(raw), true) => compile(&format!("{path}.lease"), raw).map(Some),
        (None, _) => Ok(None),
    }
}

fn compile(path: &str, raw: RawLease) -> Result<Lease, ConfigError> {
    if !(1..=MAX_LEASE_SIZE).contains(&raw.size) {
        return Err(ConfigError::at(
            format!("{path}.size"),
            format!("must be between 1 and {MAX_LEASE_SIZE}, got {}", raw.size),
        ));
    }
    let refresh_below = raw.refresh_below.unwrap_or(raw.size / 4);
    if refresh_below >= raw.size {
        return Err(ConfigError::at(
            format!("{path}.refresh_below"),
            format!("must be below size ({}), got {refresh_below}", raw.size),
        ));
    }
    let validity_nanos = raw.validity.map_or(DEFAULT_VALIDITY_NANOS, |d| d.as_nanos());
    if !(1_000_000..=MAX_VALIDITY_NANOS).contains(&validity_nanos) {
        return Err(ConfigError::at(format!("{path}.validity"), "must be between 1ms and 1h"));
    }
    let table_size = raw.table_size.unwrap_or(DEFAULT_LEASE_SLOTS);
    if !(MIN_TABLE_SIZE..=MAX_LEASE_SLOTS).contains(&table_size) {
        return Err(ConfigError::at(
            format!("{path}.table_size"),
            format!("must be between {MIN_TABLE_SIZE} and {MAX_LEASE_SLOTS}, got {table_size}"),
        ));
    }
    Ok(Lease { size: raw.size, refresh_below, validity_nanos, table_size, adaptive: raw.adaptive })
}
