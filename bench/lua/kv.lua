-- wrk script for trio-kv: random keys, a GET/PUT mix, optional session metadata.
--
-- Arguments (after `--`), all key=value:
--   keys=N        keys are PREFIX0 .. PREFIX(N-1)   (ignored when keyfile= is given)
--   prefix=S      key prefix (default "k")
--   keyfile=PATH  one key per line; keys are drawn from it instead
--   put=P         percent of requests that are PUT (0..100)
--   vsize=B       value size in bytes for PUT
--   meta=0|1      1: each wrk thread is one client session that passes the causal metadata
--                 of every response on to its next request (PUT body field, GET header)
--   seed=N        random seed base
-- done() prints one JSON line prefixed with "WRKJSON " that bench/wrk.py parses.

local threads = {}

function setup(thread)
  thread:set("tid", #threads + 1)
  table.insert(threads, thread)
end

local function parse_args(args)
  local a = {}
  for _, s in ipairs(args) do
    local k, v = s:match("^([^=]+)=(.*)$")
    if k then a[k] = v end
  end
  return a
end

function init(args)
  local a = parse_args(args)
  prefix = a.prefix or "k"
  nkeys = tonumber(a.keys or "1000")
  put_pct = tonumber(a.put or "0")
  use_meta = (a.meta == "1")
  local vsize = tonumber(a.vsize or "100")
  keylist = nil
  if a.keyfile then
    keylist = {}
    for line in io.lines(a.keyfile) do
      if #line > 0 then table.insert(keylist, line) end
    end
    nkeys = #keylist
  end
  math.randomseed(tonumber(a.seed or "1") * 7919 + (tid or 1) * 104729)
  value = string.rep("v", vsize)
  body_plain = '{"value":"' .. value .. '"}'
  put_headers = { ["Content-Type"] = "application/json" }
  meta = "{}"
  if use_meta then
    -- Defined only in metadata mode: without it wrk never hands bodies to Lua (cheaper).
    response = function(status, headers, body)
      if body then
        local m = body:match('"causal%-metadata"%s*:%s*(%b{})')
        if m then meta = m end
      end
    end
  end
end

local function pick_key()
  if keylist then return keylist[math.random(nkeys)] end
  return prefix .. (math.random(nkeys) - 1)
end

function request()
  local path = "/data/" .. pick_key()
  if put_pct > 0 and math.random(100) <= put_pct then
    local body = body_plain
    if use_meta then
      body = '{"value":"' .. value .. '","causal-metadata":' .. meta .. '}'
    end
    return wrk.format("PUT", path, put_headers, body)
  end
  if use_meta then
    return wrk.format("GET", path, { ["X-Causal-Metadata"] = meta })
  end
  return wrk.format("GET", path)
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {"requests":%d,"duration_us":%d,"bytes":%d,' ..
    '"err_connect":%d,"err_read":%d,"err_write":%d,"err_status":%d,"err_timeout":%d,' ..
    '"lat_mean_us":%.1f,"lat_max_us":%d,"p50_us":%d,"p90_us":%d,"p99_us":%d,"p999_us":%d}\n',
    summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency.mean, latency.max,
    latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency:percentile(99.9)))
end
