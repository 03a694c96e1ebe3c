-- wrk script: GET ?nowait then DELETE what was delivered, round robin over <channels>
-- channels named <prefix>0.. (or <prefix> alone). Counts consumed messages, empty
-- answers and errors (a 404 on DELETE means a message was delivered twice).
-- Run: wrk -t8 -c8 -d10s -s bench/consume.lua URL -- <prefix> <channels>
local threads = {}

function setup(thread)
  table.insert(threads, thread)
end

function init(args)
  prefix = args[1] or "bench"
  channels = tonumber(args[2] or "1")
  next_channel = 0
  state = "get"
  id = nil
  consumed = 0
  errors = 0
  empty = 0
end

local function channel()
  if channels <= 1 then return prefix end
  return prefix .. tostring(next_channel % channels)
end

function request()
  if state == "get" then
    return wrk.format("GET", "/channels/" .. channel() .. "?nowait")
  end
  return wrk.format("DELETE", "/messages/" .. id)
end

function response(status, headers, _)
  if state == "get" then
    if status == 200 then
      -- aiohttp keeps the header's case, Tornado (the original) capitalises it.
      id = headers["x-linger-msg-id"] or headers["X-Linger-Msg-Id"]
      state = "delete"
    elseif status == 204 then
      empty = empty + 1
      next_channel = next_channel + 1
    else
      errors = errors + 1
    end
  else
    if status == 204 then consumed = consumed + 1 else errors = errors + 1 end
    state = "get"
    next_channel = next_channel + 1
  end
end

function done(summary, _, _)
  local total, total_errors, total_empty = 0, 0, 0
  for _, thread in ipairs(threads) do
    total = total + thread:get("consumed")
    total_errors = total_errors + thread:get("errors")
    total_empty = total_empty + thread:get("empty")
  end
  io.write(string.format("RESULT ops=%d errors=%d empty=%d seconds=%.3f\n",
    total, total_errors, total_empty, summary.duration / 1e6))
end
