-- wrk script for the memory flood: every request carries a distinct x-key
-- ("f<thread>-<n>"), so N requests make N distinct rate-limit keys. Each thread stops after its
-- quota (args[1]); bench.py interrupts wrk once Envoy has seen every request.
local threads_seen = 0

function setup(thread)
  thread:set("tid", threads_seen)
  threads_seen = threads_seen + 1
end

local n, done_count, quota = 0, 0, 0

function init(args)
  quota = tonumber(args[1])
end

function request()
  n = n + 1
  return wrk.format("GET", "/", { ["x-key"] = "f" .. tid .. "-" .. n })
end

function response(status, headers, body)
  done_count = done_count + 1
  if done_count >= quota then
    wrk.thread:stop()
  end
end
