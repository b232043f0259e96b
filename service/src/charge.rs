//! Charges: a `ShouldRateLimit` call whose hits are usage that has already happened (a cost the
//! upstream's response stated, e.g. LLM tokens), asked for by request metadata
//! `x-ratelimit-wasm-charge: 1`. Its hits are counted whatever the result, even past the limit,
//! so later calls are denied until the overdraft is made up (see `scripts`).
//!
//! Metadata, as for leases, so the request stays a standard `RateLimitRequest`: a service that
//! does not know the header answers as usual (and refuses a charge that does not fit, uncounted).

use std::fmt;

use tonic::metadata::MetadataMap;

use crate::lease::LEASE_HEADER;

/// `x-ratelimit-wasm-charge: 1`.
pub const CHARGE_HEADER: &str = "x-ratelimit-wasm-charge";

/// A charge header the service does not accept; the text names the header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ChargeHeaderError {
    /// A value other than `1`.
    Value(String),
    /// Together with the lease header: a charge grants no lease.
    WithLease,
}

impl fmt::Display for ChargeHeaderError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ChargeHeaderError::Value(v) => write!(f, "{CHARGE_HEADER}: {v:?} is not 1"),
            ChargeHeaderError::WithLease => write!(
                f,
                "{CHARGE_HEADER} cannot be combined with {LEASE_HEADER}: a charge counts usage already spent and grants no lease"
            ),
        }
    }
}

impl std::error::Error for ChargeHeaderError {}

/// Whether the call is a charge. Absent: an ordinary call, answered exactly as before charges.
pub fn charge_asked(meta: &MetadataMap) -> Result<bool, ChargeHeaderError> {
    let Some(v) = meta.get(CHARGE_HEADER) else { return Ok(false) };
    if v.as_bytes() != b"1" {
        return Err(ChargeHeaderError::Value(
            String::from_utf8_lossy(v.as_bytes()).chars().take(32).collect(),
        ));
    }
    if meta.contains_key(LEASE_HEADER) {
        return Err(ChargeHeaderError::WithLease);
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lease::tests::meta;

    #[test]
    fn only_the_value_1_asks_for_a_charge() {
        assert_eq!(charge_asked(&meta(&[])), Ok(false));
        assert_eq!(charge_asked(&meta(&[(CHARGE_HEADER, "1")])), Ok(true));
        for v in ["0", "true", "01", " 1", "", "2"] {
            let e = charge_asked(&meta(&[(CHARGE_HEADER, v)])).unwrap_err();
            assert!(matches!(e, ChargeHeaderError::Value(_)), "{v:?}: {e:?}");
            assert!(e.to_string().starts_with("x-ratelimit-wasm-charge: "), "{e}");
        }
    }

    #[test]
    fn a_charge_with_a_lease_is_refused() {
        let e = charge_asked(&meta(&[(CHARGE_HEADER, "1"), (LEASE_HEADER, "5")])).unwrap_err();
        assert_eq!(e, ChargeHeaderError::WithLease);
        assert!(
            e.to_string().contains("x-ratelimit-wasm-charge")
                && e.to_string().contains("x-ratelimit-wasm-lease")
        );
    }
}
