-- GET $VERIFY_PATH with a session cookie picked at random from $TOKENS (one
-- value a line), sent as `Cookie: $COOKIE=value`: the same shape for
-- oauth2-proxy's /oauth2/auth and our /v1/verify (bench/peers.sh).
local reqs = {}
function init(args)
  local name = os.getenv("COOKIE")
  for line in io.lines(os.getenv("TOKENS")) do
    reqs[#reqs + 1] = wrk.format("GET", os.getenv("VERIFY_PATH"), { ["Cookie"] = name .. "=" .. line })
  end
  math.randomseed(os.time())
end
function request()
  return reqs[math.random(#reqs)]
end
