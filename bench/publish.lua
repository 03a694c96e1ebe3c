-- wrk script: publish 256-byte messages to topic <topic>; counts 202s and errors.
-- Run: wrk -t4 -c4 -d10s -s bench/publish.lua URL -- <topic>
local threads = {}
local body = string.rep("x", 256)

function setup(thread)
  table.insert(threads, thread)
end

function init(args)
  topic = args[1] or "bench"
  published = 0
  errors = 0
end

function request()
  return wrk.format("POST", "/topics/" .. topic, {["Content-Type"] = "text/plain"}, body)
end

function response(status, _, _)
  if status == 202 then published = published + 1 else errors = errors + 1 end
end

function done(summary, _, _)
  local total, total_errors = 0, 0
  for _, thread in ipairs(threads) do
    total = total + thread:get("published")
    total_errors = total_errors + thread:get("errors")
  end
  io.write(string.format("RESULT ops=%d errors=%d empty=0 seconds=%.3f\n",
    total, total_errors, summary.duration / 1e6))
end
