-- wrk script for the idempotency section: POST / with a constant x-key (the rate limit rule's key)
-- and an Idempotency-Key that is new on every request ("<run>-<thread>-<n>"), so with an
-- idempotency entry each request is a first one (claims its key, completes it at stream end).
-- The baseline variants get the very same requests (their filter ignores the header).
-- args: quota per thread, run id (unique per run, so keys never repeat across runs).
-- When a thread has had `quota` responses it stops and prints "idem-done" on stdout; bench.py
-- interrupts wrk once every thread has (wrk itself would wait out its -d).
local threads_seen = 0

function setup(thread)
  thread:set("tid", threads_seen)
  threads_seen = threads_seen + 1
end

local n, done_count, quota, run = 0, 0, 0, "r"

function init(args)
  quota = tonumber(args[1])
  run = args[2] or "r"
end

function request()
  n = n + 1
  return wrk.format("POST", "/", { ["x-key"] = "bench-key",
                                   ["idempotency-key"] = run .. "-" .. tid .. "-" .. n })
end

function response(status, headers, body)
  done_count = done_count + 1
  if done_count == quota then
    io.write("idem-done\n")
    io.flush()
    wrk.thread:stop()
  end
end
