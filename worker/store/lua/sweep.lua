-- requires: prelude
-- sweep: everything time or a dead worker makes due (docs/design.md §4): retries and
--        deferrals, expired leases, workers whose heartbeat stopped, orphaned messages,
--        account pauses that ran out. Any number of sweepers may run: each call is atomic.
-- KEYS: 1 the urgent list, 2 the normal list, 3 kombu's unacked hash, 4 kombu's unacked
--       index
-- ARGV: 1 prefix, 2 now, 3 urgent message template, 4 max deliveries, 5 lost grace s,
--       6 most items per section, 7 dead-letter max entries, 8 dead-letter min id,
--       9 worker timeout s
-- Reads fields: s, m, o, v, t, k, e, n; writes s=q, m, q (re-queued), v (lost deliveries)
-- Returns: a flat list of events: kind, subject, detail
local list, normal, unacked, uindex = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local now, template, maxdel, grace = ARGV[2], ARGV[3], ARGV[4], tonumber(ARGV[5])
local limit, maxlen, minid, timeout = tonumber(ARGV[6]), ARGV[7], ARGV[8], tonumber(ARGV[9])
guard()
local tpl = compile(template)
local events = {}
local function event(kind, subject, detail)
  events[#events + 1] = kind; events[#events + 1] = subject; events[#events + 1] = detail
end
local function due(key)
  return redis.call('ZRANGE', key, '-inf', now, 'BYSCORE', 'LIMIT', 0, limit)
end
local function ours(id) return string.sub(id, 1, #p + 1) == p .. '-' end
-- 1. retries and deferred reports that are due: to the urgent list
for _, ref in ipairs(due(p .. ':sched')) do
  redis.call('ZREM', p .. ':sched', ref)
  if redis.call('HGET', p .. ':r:' .. ref, 's') == 'w' then
    event('requeued', ref, push({ref}, now, 'u', list, tpl))
  end
end
-- 2. leases that expired: the worker hung (a killed one is found sooner, below)
for _, ref in ipairs(due(p .. ':leases')) do
  if redis.call('HGET', p .. ':r:' .. ref, 's') == 'r' then
    local kind, detail = lost_delivery(ref, now, list, tpl, maxdel, maxlen, minid)
    event(kind == 'poison' and 'poison' or 'lease_expired', ref, detail)
  else
    redis.call('ZREM', p .. ':leases', ref)
  end
end
-- 3. workers whose heartbeat stopped (Redis's clock). After a gap in the sweeps (Redis
--    or the whole fleet stalled) every worker gets one more timeout to beat again.
local t = redis.call('TIME')
local rnow = tonumber(t[1]) + tonumber(t[2]) / 1000000
local last = tonumber(redis.call('GET', p .. ':lastsweep') or '0')
redis.call('SET', p .. ':lastsweep', string.format('%.6f', rnow), 'EX', 86400)
if last > 0 and rnow - last > timeout / 2 then
  redis.call('SET', p .. ':stallguard', string.format('%.6f', rnow + timeout),
    'PX', math.ceil(timeout * 1000) + 1000)
end
local guarded = tonumber(redis.call('GET', p .. ':stallguard') or '0') > rnow
local live = {}
local workers = redis.call('ZRANGE', p .. ':workers', 0, -1, 'WITHSCORES')
for i = 1, #workers, 2 do
  local w = workers[i]
  if guarded or rnow - tonumber(workers[i + 1]) < timeout then
    live[#live + 1] = p .. ':held:' .. w
  else
    for _, ref in ipairs(redis.call('SMEMBERS', p .. ':running:' .. w)) do
      local f = redis.call('HMGET', p .. ':r:' .. ref, 's', 'o')
      if f[1] == 'r' and f[2] == w then
        local kind, detail = lost_delivery(ref, now, list, tpl, maxdel, maxlen, minid)
        event(kind == 'poison' and 'poison' or 'worker_lost', ref, detail)
      end
    end
    for _, id in ipairs(redis.call('SMEMBERS', p .. ':held:' .. w)) do
      if ours(id) then
        local refs, new = hand_back(id, now, list, tpl, unacked, uindex)
        for _, r in ipairs(refs) do event('orphaned', r, 'worker lost|' .. new) end
      end
    end
    redis.call('DEL', p .. ':running:' .. w, p .. ':held:' .. w)
    redis.call('ZREM', p .. ':workers', w)
    event('worker_dead', w, string.format('%.1f', rnow - tonumber(workers[i + 1])))
  end
end
-- 4. orphans: messages with reports queued for them that wait in no list and that no live
--    worker holds (kombu's unacked entry of a dead worker, a message popped and never
--    recorded, a message whose worker gave up on it). Seen twice, grace apart: handed on.
local held = {}
if #live > 0 then
  for _, id in ipairs(redis.call('SUNION', unpack(live))) do held[id] = true end
end
local cands, order = {}, {}
local function cand(id)
  if not held[id] and not cands[id] then cands[id] = true; order[#order + 1] = id end
end
for _, id in ipairs(redis.call('HKEYS', unacked)) do if ours(id) then cand(id) end end
for _, id in ipairs(redis.call('ZRANGE', p .. ':started', 0, limit - 1)) do cand(id) end
for _, pair in ipairs({{'', normal}, {'u', list}}) do
  -- a message older than the oldest one still waiting in its list has been popped
  local bound = '+inf'
  local tail = redis.call('LINDEX', pair[2], -1)
  if tail then
    local seq = string.match(string.match(tail, '"delivery_tag":%s*"([^"]*)"') or '', '(%d+)$')
    bound = seq and ('(' .. seq) or '-inf'
  end
  for _, id in ipairs(redis.call('ZRANGE', p .. ':' .. pair[1] .. 'msgs', '-inf', bound,
      'BYSCORE', 'LIMIT', 0, limit)) do
    cand(id)
  end
end
local since = {}
local suspects = redis.call('HGETALL', p .. ':suspect')
for i = 1, #suspects, 2 do
  if cands[suspects[i]] then
    since[suspects[i]] = tonumber(suspects[i + 1])
  else
    redis.call('HDEL', p .. ':suspect', suspects[i])
  end
end
for _, id in ipairs(order) do
  if not since[id] then
    redis.call('HSET', p .. ':suspect', id, now)
  elseif tonumber(now) - since[id] >= grace then
    local refs, new = hand_back(id, now, list, tpl, unacked, uindex)
    for _, r in ipairs(refs) do event('orphaned', r, 'message orphaned|' .. new) end
  end
end
-- 5. account pauses that ran out
for _, acct in ipairs(redis.call('ZRANGE', p .. ':paused', '-inf', now, 'BYSCORE')) do
  redis.call('ZREM', p .. ':paused', acct)
  event('resumed', acct, '')
end
return events
