-- POST /v1/refresh in chains: every token in $TOKENS is refreshed once, and
-- the token each refresh returns is queued to be refreshed once in its turn
-- (one chain per session, no token presented twice, so no grace replays).
local queue, head, tail = {}, 1, 0
function init(args)
  for line in io.lines(os.getenv("TOKENS")) do
    tail = tail + 1
    queue[tail] = line
  end
end
function request()
  if head > tail then
    return wrk.format("GET", "/healthz")  -- never reached while tokens > connections
  end
  local t = queue[head]
  queue[head] = nil
  head = head + 1
  return wrk.format("POST", "/v1/refresh", { ["Authorization"] = "Bearer " .. t })
end
function response(status, headers, body)
  local t = body and body:match('"access_token":"([^"]+)"')
  if t then
    tail = tail + 1
    queue[tail] = t
  end
end
