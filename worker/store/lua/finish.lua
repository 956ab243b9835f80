-- requires: prelude
-- finish: record deliveries' outcomes (docs/design.md §3.1) — those of a bulk message's
--         reports in one round trip, each recorded on its own, as if alone — and optionally
--         close messages (as done.lua, in the same round trip).
-- KEYS: 1 the urgent list (used only to close messages: reports not reached go there)
-- ARGV: 1 prefix, 2 now, 3 dedup ttl s, 4 dead-letter max entries, 5 dead-letter min id,
--       6 urgent message template, 7 the messages to close, comma-separated ('' = none),
--       then ten per outcome: message id, ref, outcome (accepted | retry | defer | dead |
--       release: not sent, queued for its message again, to be handed on when it closes,
--       or at once in a new message if it is closed already),
--       attempts, error code, http status, error text, due (retry, defer) or reason (dead),
--       stats field ('' = none), planned slot "slot|since" (defer) or ''
-- Reads fields: s, m, t, k, e, v, o; writes s (a | w | q) and n, lc, lh, le, ps; an accepted
--       entry keeps only s and m, for dedup_ttl; a dead one is deleted (a stream entry)
-- Returns: per outcome, in order: 1 recorded, 0 another delivery owns the report now
--       (nothing changed)
local now, dedup_ttl, dead_maxlen, dead_minid = ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local template, closing = ARGV[6], ARGV[7]
local rows = ARGV  -- read from 8 on, ten at a time (the header above)
local urgent = KEYS[1]
guard()
local orphans = {}  -- released reports whose message was closed before: no close hands them on
local function record(id, ref, outcome, attempts, code, http, err, arg, stats_field, planned)
  local key = p .. ':r:' .. ref
  local f = redis.call('HMGET', key, 's', 'm', 't', 'k', 'e', 'v', 'o')
  if outcome == 'accepted' then
    -- recorded whoever owns the report: the API took it, so nobody may send it again
    if f[1] == 'a' then return 0 end
    if f[7] then redis.call('SREM', p .. ':running:' .. f[7], ref) end
    redis.call('DEL', key)
    redis.call('HSET', key, 's', 'a', 'm', id)
    redis.call('EXPIRE', key, dedup_ttl)
    redis.call('ZREM', p .. ':leases', ref)
    redis.call('ZREM', p .. ':sched', ref)
    if f[1] then redis.call('DECR', p .. ':npending') end
    count(now, stats_field)
    return 1
  end
  if f[1] ~= 'r' or f[2] ~= id then return 0 end
  if outcome == 'release' then
    if f[7] then redis.call('SREM', p .. ':running:' .. f[7], ref) end
    redis.call('HSET', key, 's', 'q')
    redis.call('HDEL', key, 'o')
    redis.call('ZREM', p .. ':leases', ref)
    if redis.call('HEXISTS', p .. ':msgrefs', id) == 0 then
      orphans[#orphans + 1] = ref  -- its message is closed already: handed on below
    end
    return 1
  end
  if outcome == 'retry' or outcome == 'defer' then
    if f[7] then redis.call('SREM', p .. ':running:' .. f[7], ref) end
    redis.call('HSET', key, 's', 'w', 'n', attempts)
    if outcome == 'retry' then
      redis.call('HSET', key, 'lc', code, 'lh', http, 'le', err)
      redis.call('HDEL', key, 'ps')
    elseif planned ~= '' then
      redis.call('HSET', key, 'ps', planned)
    else
      redis.call('HDEL', key, 'ps')
    end
    redis.call('ZREM', p .. ':leases', ref)
    redis.call('ZADD', p .. ':sched', arg, ref)
    count(now, stats_field)
    return 1
  end
  bury(ref, {f[3], f[4], f[5], f[6]}, now, arg, attempts, code, http, err, dead_maxlen, dead_minid)
  return 1
end
local out = {}
for i = 8, #rows, 10 do
  out[#out + 1] = record(rows[i], rows[i + 1], rows[i + 2], rows[i + 3], rows[i + 4],
    rows[i + 5], rows[i + 6], rows[i + 7], rows[i + 8], rows[i + 9])
end
-- the worker is done with these messages (one round trip less): reports still queued for
-- one (not reached) go to a new urgent message
local compiled = nil
if #orphans > 0 then
  compiled = compile(template)
  push(orphans, now, 'u', urgent, compiled)
end
for id in string.gmatch(closing, '[^,]+') do
  local refs = queued_refs(id)
  if #refs > 0 then
    compiled = compiled or compile(template)
    push(refs, now, 'u', urgent, compiled)
  end
  forget(id)
end
return out
