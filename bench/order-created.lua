-- wrk script: every request is a new order.created event (unique id), so
-- each one runs the full claim + handler + commit path.
-- Each wrk thread numbers its own events; the thread id keeps them apart.
-- Seeded: two runs against one database (a warm-up, then the measurement)
-- must not send the same ids, or the second measures replays.
math.randomseed(os.time())
local counter = 0
local thread_tag = ""

function setup(thread)
  thread:set("tag", tostring(math.random(1, 1e9)))
end

function init(args)
  thread_tag = tag or tostring(math.random(1, 1e9))
end

function request()
  counter = counter + 1
  local id = thread_tag .. "-" .. counter
  local body = '{"order_id":"' .. id .. '","customer_id":"c-1","total":12.50}'
  return wrk.format("POST", "/", {
    ["ce-specversion"] = "1.0",
    ["ce-id"] = id,
    ["ce-source"] = "urn:bench",
    ["ce-type"] = "order.created",
    ["content-type"] = "application/json",
  }, body)
end

function response(status, headers, body)
  if status ~= 202 then
    io.stderr:write("unexpected status " .. status .. ": " .. body .. "\n")
  end
end
