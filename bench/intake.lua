-- wrk script for bench/intake.py: POSTs pre-signed CallRail bodies, one per request.
-- args: <bodies file: "signature\tbody" per line> <thread count>
local threads = {}
local counter = 1

function setup(thread)
  thread:set("id", counter)
  table.insert(threads, thread)
  counter = counter + 1
end

function init(args)
  local file, n = args[1], tonumber(args[2])
  sigs, bodies, codes, wrapped, idx = {}, {}, {}, 0, 0
  local i = 0
  for line in io.lines(file) do
    if i % n == (id - 1) then
      local tab = line:find("\t", 1, true)
      sigs[#sigs + 1] = line:sub(1, tab - 1)
      bodies[#bodies + 1] = line:sub(tab + 1)
    end
    i = i + 1
  end
end

function request()
  idx = idx + 1
  if idx > #bodies then idx = 1; wrapped = wrapped + 1 end
  return wrk.format("POST", nil, {["Signature"] = sigs[idx],
                                  ["Content-Type"] = "application/json"}, bodies[idx])
end

function response(status, headers, body)
  codes[status] = (codes[status] or 0) + 1
end

function done(summary, latency, requests)
  local parts, wraps = {}, 0
  local agg = {}
  for _, t in ipairs(threads) do
    local c = t:get("codes")
    for k, v in pairs(c) do agg[k] = (agg[k] or 0) + v end
    wraps = wraps + t:get("wrapped")
  end
  for k, v in pairs(agg) do parts[#parts + 1] = string.format('"%d": %d', k, v) end
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {"requests": %d, "duration_us": %d, "bytes": %d, "codes": {%s}, ' ..
    '"errors": {"connect": %d, "read": %d, "write": %d, "status": %d, "timeout": %d}, ' ..
    '"wrapped": %d, "latency_us": {"mean": %.1f, "max": %d, "p50": %d, "p90": %d, ' ..
    '"p99": %d, "p999": %d}}\n',
    summary.requests, summary.duration, summary.bytes, table.concat(parts, ", "),
    e.connect, e.read, e.write, e.status, e.timeout, wraps, latency.mean, latency.max,
    latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency:percentile(99.9)))
end
