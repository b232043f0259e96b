//! The Lua scripts. Each checks and consumes in one step, atomically, using Redis' own clock
//! (`TIME`), so several service instances agree on windows. Every write sets a TTL.
//!
//! All decision scripts take `KEYS[1]` and `ARGV = limit, hits, period_ms, margin_ms, deadline_ms`
//! and return `{allowed (1|0), remaining, ms_until_reset, window_start_ms, granted, valid_until_ms}`.
//! A request whose hits do not fit consumes nothing. `hits = 0` consumes nothing and is allowed
//! when one more hit would fit. A script that runs after `deadline_ms` (Redis' clock; 0: none)
//! returns `{-1, 0, 0, 0, 0, 0}` and changes nothing: its caller has already been answered
//! UNAVAILABLE.
//!
//! Leases: with `ARGV[6] = K > 0`, `ARGV[7] = validity_ms` and `KEYS[2]` = the lease's key (same
//! hash tag), an allowed call also takes `granted = min(K, what remains after its hits)` units,
//! spent in the same state as `granted` more admitted requests, in the same atomic step (so two
//! calls can never together take more than remains), and records them in `KEYS[2]` (hash
//! `n` = units outstanding, `w` = window start or `i` = the bucket's ms per unit) with a TTL
//! until `valid_until_ms`: now + validity, for the window algorithms cut at the end of the
//! current (sub-)window, after which the units can neither be spent nor given back. Without
//! `ARGV[6]` (or 0) the scripts behave and write exactly as they did before leases.
//!
//! Charges: with `ARGV[8] = 1` (and no lease: `ARGV[6] = ARGV[7] = 0`) the hits are usage that has
//! already happened (a cost stated by the upstream's response), so they are counted whatever the
//! result, even past the limit: the windows add them to the current count, the token bucket moves
//! its time forward past the burst (into debt, bounded at `MAX_DEBT_MS` ahead of now). The reply is
//! `allowed = 0` (remaining 0, `ms_until_reset` = until one more hit fits) when the charge left the
//! descriptor over its limit, else as for an admitted call. Later calls are then denied until the
//! window ends or slides past the overdraft, or the bucket has refilled the debt. A charge of 0 hits,
//! or against a limit of 0, counts nothing and is answered as an ordinary call. Without `ARGV[8]` (or
//! 0) nothing changes.
//!
//! Redis' clock may go back (a failover to a replica whose clock lags): a window script that finds
//! a stored window later than its own keeps counting in the stored one; the token bucket's state is
//! an absolute time, so an earlier clock only makes it stricter.
//!
//! Fixed window: `period_ms > 0` aligns windows to multiples of the period since the Unix epoch
//! (like envoyproxy/ratelimit: a WEEK starts Thursday 00:00 UTC); `0` means the calendar month
//! (UTC) and `-1` the calendar year (UTC). State: hash `{w = window start ms, c = count}`.
//!
//! Sliding window: two adjacent fixed windows, the previous one weighted by the part of it still
//! inside the sliding window. State: hash `{w, c = current count, p = previous count}`.
//!
//! Token bucket, as GCRA: capacity `limit`, refilled at `limit` per period. State: string holding
//! the theoretical arrival time (ms, fractional).

pub const NOW: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"#;

/// Refuses to act for a caller that has given up (a stalled Redis running queued scripts late).
pub const DEADLINE: &str = r#"
local deadline = tonumber(ARGV[5]) or 0
if deadline > 0 and now > deadline then
  return {-1, 0, 0, 0, 0, 0}
end
"#;

/// The lease arguments of the decision scripts; absent when the caller asked for no lease.
pub const LEASE_ARGS: &str = r#"
local lease = tonumber(ARGV[6]) or 0
local validity = tonumber(ARGV[7]) or 0
"#;

/// The charge flag of the decision scripts (`ARGV[8]`); absent on an ordinary call.
pub const CHARGE_ARG: &str = r#"
local charge = ARGV[8] == '1'
"#;

/// Calendar helpers (proleptic Gregorian, UTC), after H. Hinnant's civil-from-days algorithms.
/// `bounds(now_ms, mode)` gives the start and end (ms) of the calendar month (`mode == 0`) or year
/// (`mode == -1`) holding `now_ms`.
pub const CALENDAR: &str = r#"
local floor = math.floor
local function days_from_civil(y, m, d)
  if m <= 2 then y = y - 1 end
  local era = floor(y / 400)
  local yoe = y - era * 400
  local mp = m > 2 and m - 3 or m + 9
  local doy = floor((153 * mp + 2) / 5) + d - 1
  local doe = yoe * 365 + floor(yoe / 4) - floor(yoe / 100) + doy
  return era * 146097 + doe - 719468
end
local function civil_from_days(z)
  z = z + 719468
  local era = floor(z / 146097)
  local doe = z - era * 146097
  local yoe = floor((doe - floor(doe / 1460) + floor(doe / 36524) - floor(doe / 146096)) / 365)
  local y = yoe + era * 400
  local doy = doe - (365 * yoe + floor(yoe / 4) - floor(yoe / 100))
  local mp = floor((5 * doy + 2) / 153)
  local m = mp < 10 and mp + 3 or mp - 9
  if m <= 2 then y = y + 1 end
  return y, m
end
local function bounds(now_ms, mode)
  local y, m = civil_from_days(floor(now_ms / 86400000))
  local sy, sm, ey, em
  if mode == 0 then
    sy, sm = y, m
    if m == 12 then ey, em = y + 1, 1 else ey, em = y, m + 1 end
  else
    sy, sm, ey, em = y, 1, y + 1, 1
  end
  return days_from_civil(sy, sm, 1) * 86400000, days_from_civil(ey, em, 1) * 86400000
end
"#;

pub const FIXED_WINDOW_BODY: &str = r#"
local limit = tonumber(ARGV[1])
local hits = tonumber(ARGV[2])
local period = tonumber(ARGV[3])
local margin = tonumber(ARGV[4])
local start, stop
if period > 0 then
  start = now - (now % period)
  stop = start + period
else
  start, stop = bounds(now, period)
end
local cnt = 0
local h = redis.call('HMGET', KEYS[1], 'w', 'c')
local w = tonumber(h[1])
if w and w > start then
  -- Redis' clock went back (a failover to a replica whose clock lags): keep counting in the
  -- later window already stored rather than overwrite it and lose its count.
  start = w
  if period > 0 then stop = start + period else start, stop = bounds(w, period) end
end
if w == start then cnt = tonumber(h[2]) or 0 end
if charge and hits > 0 and limit > 0 then
  -- Usage already spent: counted even past the limit, so that later calls of this window are denied.
  cnt = cnt + hits
  redis.call('HSET', KEYS[1], 'w', string.format('%d', start), 'c', string.format('%d', cnt))
  redis.call('PEXPIRE', KEYS[1], stop - now + margin)
  if cnt > limit then
    return {0, 0, stop - now, start, 0, 0}
  end
  return {1, limit - cnt, stop - now, start, 0, 0}
end
local need = hits
if need < 1 then need = 1 end
if cnt + need > limit then
  return {0, 0, stop - now, start, 0, 0}
end
local granted = 0
if lease > 0 then
  granted = math.min(lease, limit - cnt - hits)
  if granted < 0 then granted = 0 end
end
if hits + granted > 0 then
  cnt = cnt + hits + granted
  redis.call('HSET', KEYS[1], 'w', string.format('%d', start), 'c', cnt)
  redis.call('PEXPIRE', KEYS[1], stop - now + margin)
end
local valid_until = 0
if granted > 0 then
  -- Units of this window may not be spent (nor given back) in the next one: cut at its end.
  valid_until = math.min(now + validity, stop)
  redis.call('HSET', KEYS[2], 'n', granted, 'w', string.format('%d', start))
  redis.call('PEXPIRE', KEYS[2], valid_until - now)
end
return {1, limit - cnt, stop - now, start, granted, valid_until}
"#;

pub const SLIDING_WINDOW_BODY: &str = r#"
local limit = tonumber(ARGV[1])
local hits = tonumber(ARGV[2])
local period = tonumber(ARGV[3])
local margin = tonumber(ARGV[4])
local start = now - (now % period)
local stop = start + period
local h = redis.call('HMGET', KEYS[1], 'w', 'c', 'p')
local w = tonumber(h[1])
local cur = tonumber(h[2]) or 0
local prev = tonumber(h[3]) or 0
if w ~= nil and w > start then
  -- Redis' clock went back: stay in the later window stored, as the fixed window does.
  start = w
  stop = start + period
end
if w == nil then
  cur, prev = 0, 0
elseif w == start then
  -- same window
elseif w == start - period then
  prev, cur = cur, 0
else
  prev, cur = 0, 0
end
local weight = (stop - now) / period
if weight > 1 then weight = 1 end
-- When will `need` more fit? Within this window the previous window's share decays; in the next
-- one, this window's count (overdrawn by a charge, possibly) becomes the decaying share.
local function wait_for(need)
  local wait = stop - now
  local room = limit - cur - need
  if room >= 0 and prev > 0 then
    wait = math.ceil(start + period * (1 - room / prev) - now)
  elseif cur > 0 and limit - need >= 0 then
    wait = math.ceil(stop + period * (1 - (limit - need) / cur) - now)
  end
  if wait < 1 then wait = 1 end
  return wait
end
if charge and hits > 0 and limit > 0 then
  -- Usage already spent: counted even past the limit; the overdraft also weighs on the next window.
  cur = cur + hits
  redis.call('HSET', KEYS[1], 'w', string.format('%d', start), 'c', string.format('%d', cur), 'p', prev)
  redis.call('PEXPIRE', KEYS[1], stop + period - now + margin)
  local left = limit - (prev * weight + cur)
  if left < -1e-9 then
    return {0, 0, wait_for(1), start, 0, 0}
  end
  return {1, math.floor(left + 1e-9), stop - now, start, 0, 0}
end
local est = prev * weight + cur
local need = hits
if need < 1 then need = 1 end
if est + need > limit then
  return {0, 0, wait_for(need), start, 0, 0}
end
local granted = 0
if lease > 0 then
  granted = math.min(lease, math.floor(limit - (prev * weight + cur + hits) + 1e-9))
  if granted < 0 then granted = 0 end
end
if hits + granted > 0 then
  cur = cur + hits + granted
  redis.call('HSET', KEYS[1], 'w', string.format('%d', start), 'c', cur, 'p', prev)
  redis.call('PEXPIRE', KEYS[1], stop + period - now + margin)
end
local remaining = math.floor(limit - (prev * weight + cur) + 1e-9)
if remaining < 0 then remaining = 0 end
local valid_until = 0
if granted > 0 then
  -- The units are counted in the current sub-window as if admitted now; spent after its end they
  -- would weigh less than the requests they stand for, and a refund could not find them.
  valid_until = math.min(now + validity, stop)
  redis.call('HSET', KEYS[2], 'n', granted, 'w', string.format('%d', start))
  redis.call('PEXPIRE', KEYS[2], valid_until - now)
end
return {1, remaining, stop - now, start, granted, valid_until}
"#;

pub const TOKEN_BUCKET_BODY: &str = r#"
local limit = tonumber(ARGV[1])
local hits = tonumber(ARGV[2])
local period = tonumber(ARGV[3])
local margin = tonumber(ARGV[4])
if limit <= 0 then
  return {0, 0, period, 0, 0, 0}
end
local interval = period / limit
local tat = tonumber(redis.call('GET', KEYS[1])) or now
if tat < now then tat = now end
if charge and hits > 0 then
  -- Usage already spent: the time moves on by all of it, past the burst into debt if need be, so
  -- that calls are denied until the bucket has refilled the debt. The debt is bounded so that the
  -- time, the TTL and the replies stay exact integers-as-doubles (and within what PX accepts).
  local new_tat = tat + interval * hits
  if new_tat - now > MAX_DEBT_MS then new_tat = now + MAX_DEBT_MS end
  local ahead = new_tat - now
  -- The TTL covers the debt: the key expires only once the bucket is full again.
  redis.call('SET', KEYS[1], string.format('%.4f', new_tat), 'PX', math.ceil(ahead) + margin)
  if ahead > period + 1e-6 then
    return {0, 0, math.ceil(ahead + interval - period), 0, 0, 0}
  end
  local remaining = math.floor((period - ahead) / interval + 1e-6)
  if remaining < 0 then remaining = 0 end
  return {1, remaining, math.ceil(ahead), 0, 0, 0}
end
local need = hits
if need < 1 then need = 1 end
local check = tat + interval * need - now
if check > period + 1e-6 then
  -- A cost above the limit never fits; its wait would overflow Redis' integer reply (2^64-1
  -- hits gave 0): bound it at one period past any debt a charge left (the time until the bucket
  -- is back at its burst), as the window scripts bound theirs at the window's end. A cost that
  -- fits waits for exactly that debt and its own refill, which is never more.
  local wait = math.ceil(check - period)
  local most = period
  if tat - now > period then most = period + math.ceil(tat - now - period) end
  if wait > most then wait = most end
  return {0, 0, wait, 0, 0, 0}
end
local new_tat = tat + interval * hits
local granted = 0
if lease > 0 then
  granted = math.min(lease, math.floor((period - (new_tat - now)) / interval + 1e-6))
  if granted < 0 then granted = 0 end
  new_tat = new_tat + interval * granted
end
if hits + granted > 0 then
  redis.call('SET', KEYS[1], string.format('%.4f', new_tat), 'PX', math.ceil(new_tat - now) + margin)
end
local remaining = math.floor((period - (new_tat - now)) / interval + 1e-6)
if remaining < 0 then remaining = 0 end
local valid_until = 0
if granted > 0 then
  valid_until = now + validity
  redis.call('HSET', KEYS[2], 'n', granted, 'i', string.format('%.6f', interval))
  redis.call('PEXPIRE', KEYS[2], validity)
end
return {1, remaining, math.ceil(new_tat - now), 0, granted, valid_until}
"#;

/// Gives back `hits` taken by an earlier decision (the request was denied by another descriptor).
/// `KEYS[1]`, `ARGV = algorithm tag, hits, window_start_ms, period_ms, limit`. Only touches the
/// counter of the window the hits were taken from; keeps the TTL.
pub const REFUND: &str = r#"
local alg = ARGV[1]
local hits = tonumber(ARGV[2])
if alg == 'tb' then
  local tat = tonumber(redis.call('GET', KEYS[1]))
  if tat then
    local interval = tonumber(ARGV[4]) / tonumber(ARGV[5])
    redis.call('SET', KEYS[1], string.format('%.4f', tat - interval * hits), 'KEEPTTL')
  end
  return 1
end
local h = redis.call('HMGET', KEYS[1], 'w', 'c')
if h[1] and tonumber(h[1]) == tonumber(ARGV[3]) then
  local c = (tonumber(h[2]) or 0) - hits
  if c < 0 then c = 0 end
  redis.call('HSET', KEYS[1], 'c', c)
  return 1
end
return 0
"#;

/// Gives back up to `units` of a lease. `KEYS[1]` the descriptor's state, `KEYS[2]` the lease
/// (written by a decision script; gone once its validity ended, so nothing is given back into a
/// later window), `ARGV = algorithm tag, units, close (1|0)`. Gives back `min(units, n)`, takes
/// them off `n`, and with `close` (or nothing left) deletes the lease so it cannot be given back
/// twice. Windows: only into the window the units were taken from. Token bucket: the time the
/// units took, never past a full bucket. Returns the units given back.
pub const LEASE_RETURN: &str = r#"
local lease = redis.call('HMGET', KEYS[2], 'n', 'w', 'i')
local n = tonumber(lease[1])
if not n then
  return 0
end
local r = math.min(tonumber(ARGV[2]), n)
if r > 0 then
  if ARGV[1] == 'tb' then
    local tat = tonumber(redis.call('GET', KEYS[1]))
    local interval = tonumber(lease[3])
    if tat and interval then
      local t = redis.call('TIME')
      local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
      local back = tat - interval * r
      -- Never more than a full bucket: a full bucket is a time of now or earlier.
      if back < now then back = now end
      redis.call('SET', KEYS[1], string.format('%.4f', back), 'KEEPTTL')
    else
      -- The bucket's key expired: it is full, there is nothing to give back into.
      r = 0
    end
  else
    local h = redis.call('HMGET', KEYS[1], 'w', 'c')
    if h[1] and lease[2] and tonumber(h[1]) == tonumber(lease[2]) then
      local c = (tonumber(h[2]) or 0) - r
      if c < 0 then c = 0 end
      redis.call('HSET', KEYS[1], 'c', c)
    else
      r = 0
    end
  end
end
if ARGV[3] == '1' or n - r <= 0 then
  redis.call('DEL', KEYS[2])
else
  redis.call('HINCRBY', KEYS[2], 'n', -r)
end
return r
"#;

/// The most a charge may put a token bucket into debt, in ms ahead of now (about 317 years): the
/// time stays well inside a double's exact integers and `PX` accepts the TTL. A bucket charged
/// further is as good as exhausted for ever anyway.
pub const MAX_DEBT_MS: u64 = 10_000_000_000_000;

pub fn fixed_window() -> String {
    format!("{NOW}{DEADLINE}{LEASE_ARGS}{CHARGE_ARG}{CALENDAR}{FIXED_WINDOW_BODY}")
}

pub fn sliding_window() -> String {
    format!("{NOW}{DEADLINE}{LEASE_ARGS}{CHARGE_ARG}{SLIDING_WINDOW_BODY}")
}

pub fn token_bucket() -> String {
    format!("{NOW}{DEADLINE}{LEASE_ARGS}{CHARGE_ARG}\nlocal MAX_DEBT_MS = {MAX_DEBT_MS}\n{TOKEN_BUCKET_BODY}")
}

/// Idempotency `Claim`. `KEYS[1]` the record (a hash: `state` = `in_flight` | `completed`,
/// `request`, `owner`, and once completed with a kept response `status`, `headers`, `body`),
/// `ARGV = request, owner, in_flight_ms, deadline_ms` (0: none). No record: creates an in-flight
/// one owned by `owner`, expiring after `in_flight_ms`. Returns
/// `{outcome, kept (1|0), status, headers, body}`: outcome 1 claimed, 2 in flight, 3 another
/// request's record (whatever its state), 4 completed (with the kept response, if any); -1 when
/// run after the deadline (nothing changed); -2 for a record this script did not write.
pub const IDEM_CLAIM: &str = r#"
local deadline = tonumber(ARGV[4]) or 0
if deadline > 0 then
  local t = redis.call('TIME')
  if tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) > deadline then
    return {-1, 0, 0, '', ''}
  end
end
local h = redis.call('HMGET', KEYS[1], 'state', 'request', 'status', 'headers', 'body')
if not h[1] then
  -- No record (a hash without a state is not one of ours: replaced whole).
  redis.call('DEL', KEYS[1])
  redis.call('HSET', KEYS[1], 'state', 'in_flight', 'request', ARGV[1], 'owner', ARGV[2])
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
  return {1, 0, 0, '', ''}
end
if h[2] ~= ARGV[1] then
  return {3, 0, 0, '', ''}
end
if h[1] == 'in_flight' then
  return {2, 0, 0, '', ''}
end
if h[1] ~= 'completed' then
  return {-2, 0, 0, '', ''}
end
if h[3] then
  return {4, 1, tonumber(h[3]) or 0, h[4] or '', h[5] or ''}
end
return {4, 0, 0, '', ''}
"#;

/// Idempotency `Complete`. `KEYS[1]` the record, `ARGV = owner, release (1|0), ttl_ms, kept (1|0),
/// status, headers, body`. Acts only on an in-flight record claimed by `owner`: `release` deletes
/// it; otherwise it becomes `completed` (with the response when `kept`) and expires after `ttl_ms`.
/// Returns 1 when it acted, 0 (nothing changed) otherwise.
pub const IDEM_COMPLETE: &str = r#"
local h = redis.call('HMGET', KEYS[1], 'state', 'owner')
if h[1] ~= 'in_flight' or h[2] ~= ARGV[1] then
  return 0
end
if ARGV[2] == '1' then
  redis.call('DEL', KEYS[1])
  return 1
end
redis.call('HSET', KEYS[1], 'state', 'completed')
if ARGV[4] == '1' then
  redis.call('HSET', KEYS[1], 'status', ARGV[5], 'headers', ARGV[6], 'body', ARGV[7])
end
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return 1
"#;
