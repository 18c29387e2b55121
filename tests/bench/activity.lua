-- wrk script for `make bench` (tests/bench): every request is a new activity.
--
-- Arguments (after `--`): prefix, ip_base, body format, per_ip.
--   prefix     makes the emails of this phase unique (a thread number is appended)
--   ip_base    first /32 block of 10.0.0.0/8 used by this phase
--   body       the body, where each `{local}` is replaced by the email's local part
--   per_ip     requests sent from one X-Forwarded-For address before the next
-- Every response status is counted, and done() prints one line:
--   BENCH_RESULT {"requests": ..., "duration_us": ..., "statuses": {"202": ...}, ...}

local threads = {}
local thread_count = 0

function setup(thread)
   thread:set("tid", thread_count)
   thread_count = thread_count + 1
   table.insert(threads, thread)
end

local counter = 0
local prefix = "w"
local ip_base = 0
local body_tpl = "{local}"
local per_ip = 50
local headers = { ["Content-Type"] = "application/json" }
statuses = {}

function init(args)
   prefix = args[1] .. "t" .. tid
   ip_base = tonumber(args[2]) + tid * 1048576
   body_tpl = args[3]
   per_ip = tonumber(args[4])
end

function request()
   local n = counter
   counter = counter + 1
   local block = (ip_base + math.floor(n / per_ip)) % 16777216
   headers["X-Forwarded-For"] = string.format(
      "10.%d.%d.%d", math.floor(block / 65536), math.floor(block / 256) % 256, block % 256
   )
   -- The local part is letters, digits and "-": nothing `gsub` reads as a pattern.
   local body = string.gsub(body_tpl, "{local}", prefix .. "-" .. n)
   return wrk.format("POST", nil, headers, body)
end

function response(status, hdrs, body)
   statuses[status] = (statuses[status] or 0) + 1
end

function done(summary, latency, requests)
   local totals = {}
   for _, thread in ipairs(threads) do
      local s = thread:get("statuses")
      for code, count in pairs(s) do
         totals[code] = (totals[code] or 0) + count
      end
   end
   local parts = {}
   for code, count in pairs(totals) do
      table.insert(parts, string.format('"%d": %d', code, count))
   end
   local e = summary.errors
   io.write(string.format(
      'BENCH_RESULT {"requests": %d, "duration_us": %d, "bytes": %d, '
         .. '"errors": {"connect": %d, "read": %d, "write": %d, "status": %d, "timeout": %d}, '
         .. '"latency_us": {"p50": %d, "p90": %d, "p99": %d, "max": %d, "mean": %.1f}, '
         .. '"statuses": {%s}}\n',
      summary.requests, summary.duration, summary.bytes,
      e.connect, e.read, e.write, e.status, e.timeout,
      latency:percentile(50), latency:percentile(90), latency:percentile(99),
      latency.max, latency.mean,
      table.concat(parts, ", ")
   ))
end
