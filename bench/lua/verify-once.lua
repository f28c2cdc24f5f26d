-- /v1/verify with each token of $TOKENS once, in order (run with -t1);
-- after the last one, /healthz until bench/memory.sh stops wrk.
local file
function init(args)
  file = assert(io.open(os.getenv("TOKENS"), "r"))
end
function request()
  local line = file and file:read("*l")
  if not line then
    file = nil
    return wrk.format("GET", "/healthz")
  end
  return wrk.format("GET", "/v1/verify", { ["Authorization"] = "Bearer " .. line })
end
