-- requires: prelude
-- heartbeat: a worker is alive (Redis's clock), holds exactly these messages, and declares
--            these rate limits; each account's effective limit becomes the strictest one a
--            live worker declares (docs/design.md §4.1, §5).
-- KEYS: none ({p}:workers, {p}:held:{worker}, {p}:decl:{acct}, {p}:limit:{acct})
-- ARGV: 1 prefix, 2 worker id, 3 worker timeout s, 4 held message ids (comma-separated),
--       5 declarations "account,interval,amount,window" joined by ';'
-- Returns: a flat list: account, effective "interval,amount,window", ...
local worker, timeout, held_ids, declarations = ARGV[2], tonumber(ARGV[3]), ARGV[4], ARGV[5]
guard()
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
redis.call('ZADD', p .. ':workers', now, worker)
local held = p .. ':held:' .. worker
redis.call('DEL', held)
local ids = {}
for id in string.gmatch(held_ids, '[^,]+') do ids[#ids + 1] = id end
for i = 1, #ids, 1000 do redis.call('SADD', held, unpack(ids, i, math.min(i + 999, #ids))) end
local out = {}
for decl in string.gmatch(declarations, '[^;]+') do
  local acct, spec = string.match(decl, '^([^,]+),(.*)$')
  local dk = p .. ':decl:' .. acct
  redis.call('HSET', dk, worker, spec)
  local best, best_rate = spec, nil
  local all = redis.call('HGETALL', dk)
  for i = 1, #all, 2 do
    local beat = redis.call('ZSCORE', p .. ':workers', all[i])
    if beat and now - tonumber(beat) < timeout then
      local _, amount, window = string.match(all[i + 1], '^([^,]+),([^,]+),([^,]+)$')
      local rate = tonumber(amount) / tonumber(window)
      if best_rate == nil or rate < best_rate then best, best_rate = all[i + 1], rate end
    else
      redis.call('HDEL', dk, all[i])
    end
  end
  redis.call('SET', p .. ':limit:' .. acct, best, 'PX', math.ceil(timeout * 3000))
  out[#out + 1] = acct
  out[#out + 1] = best
end
return out
