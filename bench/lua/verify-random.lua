-- /v1/verify with a token picked at random from $TOKENS (one per line).
local reqs = {}
function init(args)
  for line in io.lines(os.getenv("TOKENS")) do
    reqs[#reqs + 1] = wrk.format("GET", os.getenv("VERIFY_PATH") or "/v1/verify",
      { ["Authorization"] = "Bearer " .. line })
  end
  math.randomseed(os.time())
end
function request()
  return reqs[math.random(#reqs)]
end
