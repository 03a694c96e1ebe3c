-- wrk script: each connection (one per thread) loops POST a message, GET ?nowait, DELETE
-- the message it got. Counts completed cycles and anything unexpected.
-- Run: wrk -t16 -c16 -d10s -s bench/cycle.lua http://127.0.0.1:8989 -- <channel> [token]
-- (a token: every request carries it as a bearer token, for a server run with --auth).
local threads = {}
local channel = "bench"
local body = string.rep("x", 256)
local post_headers = {["Content-Type"] = "text/plain"}
local headers = {}

function setup(thread)
  table.insert(threads, thread)
end

function init(args)
  if args[1] then channel = args[1] end
  if args[2] then
    post_headers["Authorization"] = "Bearer " .. args[2]
    headers["Authorization"] = "Bearer " .. args[2]
  end
  state = "post"
  id = nil
  cycles = 0
  errors = 0
  empty = 0
end

function request()
  if state == "post" then
    return wrk.format("POST", "/channels/" .. channel, post_headers, body)
  elseif state == "get" then
    return wrk.format("GET", "/channels/" .. channel .. "?nowait", headers)
  end
  return wrk.format("DELETE", "/messages/" .. id, headers)
end

function response(status, headers, _)
  if state == "post" then
    if status == 202 then state = "get" else errors = errors + 1 end
  elseif state == "get" then
    if status == 200 then
      -- aiohttp keeps the header's case, Tornado (the original) capitalises it.
      id = headers["x-linger-msg-id"] or headers["X-Linger-Msg-Id"]
      state = "delete"
    elseif status == 204 then
      empty = empty + 1
    else
      errors = errors + 1
    end
  else
    if status == 204 then cycles = cycles + 1 else errors = errors + 1 end
    state = "post"
  end
end

function done(summary, _, _)
  local total_cycles, total_errors, total_empty = 0, 0, 0
  for _, thread in ipairs(threads) do
    total_cycles = total_cycles + thread:get("cycles")
    total_errors = total_errors + thread:get("errors")
    total_empty = total_empty + thread:get("empty")
  end
  io.write(string.format("RESULT ops=%d errors=%d empty=%d seconds=%.3f\n",
    total_cycles, total_errors, total_empty, summary.duration / 1e6))
end
