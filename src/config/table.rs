//! How the state table is shared out: each local rule (and the status endpoint) owns its own
//! range of slots, so a flood of new keys on one rule can fill only that rule's range and never
//! changes another rule's decisions.

use super::{ConfigError, MAX_TABLE_SIZE, MIN_TABLE_SIZE};

/// A range of the table's slots: `start .. start + size`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TableShare {
    pub start: u32,
    pub size: u32,
}

/// One user of the table, as the configuration asks for it.
pub(super) struct Claim {
    /// Where an error about its own `table_size` points (`rules[2].table_size`).
    pub path: String,
    /// Its own `table_size`, reserved for it; `None` takes an even part of what is left.
    pub reserved: Option<u32>,
}

/// The shares of `claims`, in their order, out of `total` slots: reserved sizes first, then the
/// rest split evenly (the first ones take one more slot each when it does not divide).
pub(super) fn share_out(total: u32, claims: &[Claim]) -> Result<Vec<TableShare>, ConfigError> {
    let mut reserved_sum: u64 = 0;
    for claim in claims {
        if let Some(size) = claim.reserved {
            if !(MIN_TABLE_SIZE..=MAX_TABLE_SIZE).contains(&size) {
                return Err(ConfigError::at(
                    format!("{}.table_size", claim.path),
                    format!("must be between {MIN_TABLE_SIZE} and {MAX_TABLE_SIZE}, got {size}"),
                ));
            }
            reserved_sum += u64::from(size);
        }
    }
    let even = claims.iter().filter(|c| c.reserved.is_none()).count() as u64;
    let left = u64::from(total).saturating_sub(reserved_sum);
    if reserved_sum > u64::from(total) || left < even * u64::from(MIN_TABLE_SIZE) {
        return Err(ConfigError::at(
            "table_size",
            format!(
                "{total} slots cannot be shared out: the rules' own table_size take {reserved_sum}, and each of the {even} other user(s) of the table (local rules, the status endpoint) needs at least {MIN_TABLE_SIZE}: raise table_size"
            ),
        ));
    }
    let part = left.checked_div(even).unwrap_or(0);
    let extra = left.checked_rem(even).unwrap_or(0);
    let mut shares = Vec::with_capacity(claims.len());
    let (mut start, mut taken_extra) = (0u64, 0u64);
    for claim in claims {
        let size = match claim.reserved {
            Some(size) => u64::from(size),
            None if taken_extra < extra => {
                taken_extra += 1;
                part + 1
            }
            None => part,
        };
        // Both fit in u32: every share lies within `total`.
        shares.push(TableShare { start: start as u32, size: size as u32 });
        start += size;
    }
    Ok(shares)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claim(reserved: Option<u32>) -> Claim {
        Claim { path: "rules[0]".to_owned(), reserved }
    }

    #[test]
    fn reserved_shares_are_kept_and_the_rest_is_split_evenly_without_gaps() {
        let shares = share_out(100, &[claim(None), claim(Some(30)), claim(None), claim(None)]).unwrap();
        let sizes: Vec<u32> = shares.iter().map(|s| s.size).collect();
        assert_eq!(sizes, [24, 30, 23, 23]);
        let starts: Vec<u32> = shares.iter().map(|s| s.start).collect();
        assert_eq!(starts, [0, 24, 54, 77]);
    }

    #[test]
    fn a_table_too_small_for_its_users_is_refused() {
        let err = share_out(20, &[claim(Some(8)), claim(None), claim(None)]).unwrap_err();
        assert_eq!(err.path, "table_size");
    }

    #[test]
    fn a_reserved_share_below_one_probe_window_is_refused_at_its_field() {
        let err = share_out(100, &[claim(Some(4))]).unwrap_err();
        assert_eq!(err.path, "rules[0].table_size");
    }
}
