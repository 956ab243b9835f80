-- requires: prelude
-- finish: record one delivery's outcome (docs/design.md §3.1); optionally close the message
--         (its last report: as done.lua, in the same round trip).
-- KEYS: 1 the urgent list (used only with "done": reports not reached are pushed there)
-- ARGV: 1 prefix, 2 ref, 3 message id, 4 outcome (accepted | retry | defer | dead), 5 now,
--       6 attempts, 7 error code, 8 http status, 9 error text, 10 due (retry, defer) or
--       reason (dead), 11 dedup ttl s, 12 dead-letter max entries, 13 dead-letter min id,
--       14 stats field ('' = none), 15 planned slot "slot|since" (defer) or '',
--       16 "done" or '', 17 urgent message template (with "done")
-- Reads fields: s, m, t, k, e, v, o; writes s (a | w) and n, lc, lh, le, ps; an accepted
--       entry keeps only s and m, for dedup_ttl; a dead one is deleted (a stream entry)
-- Returns: 1 recorded, 0 another delivery owns the report now (nothing changed)
local ref, id, outcome, now = ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local attempts, code, http, err, arg = ARGV[6], ARGV[7], ARGV[8], ARGV[9], ARGV[10]
local dedup_ttl, dead_maxlen, dead_minid, stats_field = ARGV[11], ARGV[12], ARGV[13], ARGV[14]
local planned, done, template = ARGV[15], ARGV[16], ARGV[17]
local urgent = KEYS[1]
guard()
local function record()
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
local recorded = record()
if done == 'done' then
  -- the message's last report: the worker is done with the message (one round trip less)
  local refs = queued_refs(id)
  if #refs > 0 then push(refs, now, 'u', urgent, compile(template)) end
  forget(id)
end
return recorded
