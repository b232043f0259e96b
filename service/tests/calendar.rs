//! The fixed window's calendar month/year bounds, computed by the Lua code inside real Redis.

mod common;

use common::RedisServer;
use ratelimit_service::scripts::CALENDAR;

#[test]
fn calendar_month_and_year_bounds_in_lua() {
    let redis = RedisServer::start();
    let mut conn = redis.conn();
    let script = redis::Script::new(&format!(
        "{CALENDAR}\nlocal s, e = bounds(tonumber(ARGV[1]), tonumber(ARGV[2]))\nreturn {{s, e}}"
    ));
    let cases: [(i64, i64, i64, i64); 8] = [
        // (now ms, mode, start, end); mode 0 = month, -1 = year
        (1_707_998_400_000, 0, 1_706_745_600_000, 1_709_251_200_000), // 2024-02-15 (leap Feb)
        (1_704_067_199_999, 0, 1_701_388_800_000, 1_704_067_200_000), // last ms of 2023
        (1_704_067_199_999, -1, 1_672_531_200_000, 1_704_067_200_000),
        (1_704_067_200_000, 0, 1_704_067_200_000, 1_706_745_600_000), // first ms of 2024
        (951_782_400_000, 0, 949_363_200_000, 951_868_800_000),       // 2000-02-29
        (951_782_400_000, -1, 946_684_800_000, 978_307_200_000),
        (1_733_011_200_000, 0, 1_733_011_200_000, 1_735_689_600_000), // December
        (915_148_800_000, 0, 915_148_800_000, 917_827_200_000),       // 1999-01-01
    ];
    for (now, mode, start, end) in cases {
        let got: (i64, i64) = script.arg(now).arg(mode).invoke(&mut conn).unwrap();
        assert_eq!(got, (start, end), "now={now} mode={mode}");
    }
}
