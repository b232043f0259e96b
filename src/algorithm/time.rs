//! Time units and UTC calendar arithmetic (for quotas that reset at midnight or on the first of
//! the month). Every instant in the core is nanoseconds since the Unix epoch, as the host's clock.

pub const NANOS_PER_SECOND: u64 = 1_000_000_000;
pub const NANOS_PER_MS: u64 = 1_000_000;

/// Whole seconds, rounded up: a header never announces a moment earlier than the real one.
pub fn ceil_seconds(nanos: u64) -> u64 {
    nanos.div_ceil(NANOS_PER_SECOND)
}

const NANOS_PER_DAY: u64 = 86_400 * NANOS_PER_SECOND;

/// Days since 1970-01-01 of the given proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let m = i64::from(month);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(day) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// (year, month) of the given day count since 1970-01-01.
fn civil_from_days(days: i64) -> (i64, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month)
}

/// Start and end (Unix nanoseconds) of the UTC calendar month that contains `now`.
pub fn month_bounds(now: u64) -> (u64, u64) {
    let days = (now / NANOS_PER_DAY) as i64;
    let (year, month) = civil_from_days(days);
    let (next_year, next_month) = if month == 12 { (year + 1, 1) } else { (year, month + 1) };
    // Saturating: the clock's u64 nanoseconds end in 2554, within the last month.
    let start = (days_from_civil(year, month, 1).max(0) as u64).saturating_mul(NANOS_PER_DAY);
    let end = (days_from_civil(next_year, next_month, 1).max(0) as u64).saturating_mul(NANOS_PER_DAY);
    (start, end)
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = NANOS_PER_SECOND;

    #[test]
    fn months_start_on_the_first_at_utc_midnight() {
        // 2026-11-23T00:40:00Z
        let now = 1_795_394_400 * S;
        let (start, end) = month_bounds(now);
        assert_eq!(start, 1_793_491_200 * S, "2026-11-01T00:00:00Z");
        assert_eq!(end, 1_796_083_200 * S, "2026-12-01T00:00:00Z");
    }

    #[test]
    fn february_of_a_leap_year_has_29_days_and_december_rolls_over() {
        let (start, end) = month_bounds(1_709_251_199 * S); // 2024-02-29T23:59:59Z
        assert_eq!((end - start) / (86_400 * S), 29);
        let (start, end) = month_bounds(1_798_761_599 * S); // 2026-12-31T23:59:59Z
        assert_eq!(start, 1_796_083_200 * S);
        assert_eq!(end, 1_798_761_600 * S, "2027-01-01T00:00:00Z");
    }

    #[test]
    fn the_last_nanosecond_of_a_month_belongs_to_it() {
        let (_, end) = month_bounds(1_796_083_200 * S - 1);
        assert_eq!(end, 1_796_083_200 * S);
        let (start, _) = month_bounds(1_796_083_200 * S);
        assert_eq!(start, 1_796_083_200 * S);
    }

    #[test]
    fn the_last_month_the_clock_can_show_ends_at_the_clock_s_end() {
        // 2554-07-21T23:34:33Z is u64::MAX nanoseconds: the month containing it must not overflow.
        let (start, end) = month_bounds(u64::MAX);
        assert!(end == u64::MAX && start > u64::MAX - 31 * 86_400 * S);
    }

    #[test]
    fn round_trips_every_day_for_four_centuries() {
        for days in (0..146_097i64).step_by(7) {
            let (y, m) = civil_from_days(days);
            let first = days_from_civil(y, m, 1);
            assert!(first <= days && days - first < 31, "day {days}");
        }
    }
}
