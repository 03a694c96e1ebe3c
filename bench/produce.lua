-- wrk script: POST 256-byte messages, round robin over <channels> channels named
-- <prefix>0.. (or <prefix> alone). Counts 202s and anything else.
-- Run: wrk -t4 -c16 -d10s -s bench/produce.lua URL -- <prefix> <channels>
local threads = {}
local body = string.rep("x", 256)

function setup(thread)
  table.insert(threads, thread)
end

function init(args)
  prefix = args[1] or "bench"
  channels = tonumber(args[2] or "1")
  next_channel = 0
  added = 0
  errors = 0
end

function request()
  local channel = prefix .. (channels > 1 and tostring(next_channel % channels) or "")
  next_channel = next_channel + 1
  return wrk.format("POST", "/channels/" .. channel, {["Content-Type"] = "text/plain"}, body)
end

function response(status, _, _)
  if status == 202 then added = added + 1 else errors = errors + 1 end
end

function done(summary, _, _)
  local total_added, total_errors = 0, 0
  for _, thread in ipairs(threads) do
    total_added = total_added + thread:get("added")
    total_errors = total_errors + thread:get("errors")
  end
  io.write(string.format("RESULT ops=%d errors=%d empty=0 seconds=%.3f\n",
    total_added, total_errors, summary.duration / 1e6))
end
