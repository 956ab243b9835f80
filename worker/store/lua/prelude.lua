-- prelude: the ledger's shared helpers, prepended to every ledger script by the registry
-- (worker/store/scripts.py). Every ledger script takes the key prefix as ARGV[1]; report
-- keys are built from it ({p}:r:{account}:{taskId}: see docs/design.md §3.3).
--
-- Ledger hash fields (docs/design.md §3.2): s state (q queued, r running, w waiting,
-- a accepted), m message id, t type, k kind, e enqueued at, d deadline, q last queued at,
-- n attempts, v deliveries lost, o owner worker, ps deferred slot "slot|since",
-- lc/lh/le last transient error (code, http status, text).
local p = ARGV[1]
-- the script's first write needs memory: under OOM the script fails here, before any write
local function guard() redis.call('SETNX', p .. ':oom', '1') end
-- a message template split at its @ID@ and @REFS@ placeholders, once per script call
local function compile(tpl)
  local parts, holes, pos = {}, {}, 1
  while true do
    local s, e = string.find(tpl, '@[A-Z]+@', pos)
    if not s then parts[#parts + 1] = string.sub(tpl, pos); return {parts, holes} end
    parts[#parts + 1] = string.sub(tpl, pos, s - 1)
    holes[#holes + 1] = string.sub(tpl, s, e)
    pos = e + 1
  end
end
local function render(compiled, id, refs)
  local parts, holes, out = compiled[1], compiled[2], {}
  for i, part in ipairs(parts) do
    out[#out + 1] = part
    if holes[i] == '@ID@' then out[#out + 1] = id elseif holes[i] then out[#out + 1] = refs end
  end
  return table.concat(out)
end
-- a new message id on the list ('' normal, 'u' urgent)
local function next_id(tag)
  local seq = redis.call('INCR', p .. ':' .. tag .. 'seq')
  return p .. '-' .. tag .. seq, seq
end
-- push the message naming refs (their ledger entries already say queued for it)
local function send(id, seq, refs, now, tag, list, compiled)
  local quoted = {}
  for i, r in ipairs(refs) do quoted[i] = '\\"' .. r .. '\\"' end
  redis.call('LPUSH', list, render(compiled, id, table.concat(quoted, ',')))
  redis.call('ZADD', p .. ':' .. tag .. 'msgs', seq, id)
  redis.call('HSET', p .. ':msgrefs', id, now .. '|' .. table.concat(refs, ','))
end
-- re-queue existing entries as one message
local function push(refs, now, tag, list, compiled)
  local id, seq = next_id(tag)
  for _, r in ipairs(refs) do redis.call('HSET', p .. ':r:' .. r, 's', 'q', 'm', id, 'q', now) end
  send(id, seq, refs, now, tag, list, compiled)
  return id
end
-- forget a message: its reports are finished or handed on (kombu's copy too, if asked)
local function forget(id, unacked, uindex)
  redis.call('ZREM', p .. ':msgs', id)
  redis.call('ZREM', p .. ':umsgs', id)
  redis.call('ZREM', p .. ':started', id)
  redis.call('HDEL', p .. ':msgrefs', id)
  redis.call('HDEL', p .. ':suspect', id)
  if unacked then
    redis.call('HDEL', unacked, id)
    redis.call('ZREM', uindex, id)
  end
end
-- the reports still queued for message id
local function queued_refs(id)
  local entry = redis.call('HGET', p .. ':msgrefs', id) or ''
  local refs = {}
  for r in string.gmatch(string.match(entry, '|(.*)$') or '', '[^,]+') do
    local f = redis.call('HMGET', p .. ':r:' .. r, 's', 'm')
    if f[1] == 'q' and f[2] == id then refs[#refs + 1] = r end
  end
  return refs
end
-- hand a message's still-queued reports to one new urgent message; forget the old one
local function hand_back(id, now, list, compiled, unacked, uindex)
  local refs = queued_refs(id)
  local new = ''
  if #refs > 0 then new = push(refs, now, 'u', list, compiled) end
  forget(id, unacked, uindex)
  return refs, new
end
local function count(now, field)
  if field == '' then return end
  local key = p .. ':stats:' .. math.floor(tonumber(now) / 60)
  redis.call('HINCRBY', key, field, 1)
  redis.call('EXPIRE', key, 172800)
  local outcome = string.match(field, '^([^|]*)')
  if outcome ~= 'retrying' and outcome ~= 'duplicate' then
    -- terminal outcomes per second, for the live view's sparkline
    local tput = p .. ':tput:' .. math.floor(tonumber(now))
    redis.call('INCR', tput)
    redis.call('EXPIRE', tput, 180)
  end
end
-- remove one dead letter (entry = {id, fields}) keeping the per-reason counts exact
local function drop_dead(entry)
  local f = entry[2]
  for i = 1, #f, 2 do
    if f[i] == 'reason' then redis.call('HINCRBY', p .. ':deadcount', f[i + 1], -1) end
  end
  redis.call('XDEL', p .. ':dead', entry[1])
end
local function drop_dead_id(id)
  for _, e in ipairs(redis.call('XRANGE', p .. ':dead', id, id)) do drop_dead(e) end
end
-- cap the stream in length and in age, a bounded number of entries per call
local function trim_dead(maxlen, minid)
  local excess = redis.call('XLEN', p .. ':dead') - tonumber(maxlen)
  if excess > 0 then
    local old = redis.call('XRANGE', p .. ':dead', '-', '+', 'COUNT', math.min(excess, 100))
    for _, e in ipairs(old) do drop_dead(e) end
  end
  for _, e in ipairs(redis.call('XRANGE', p .. ':dead', '-', '(' .. minid, 'COUNT', 100)) do
    drop_dead(e)
  end
end
local function bury(ref, f, now, reason, attempts, code, http, err, maxlen, minid)
  -- f = HMGET of t, k, e, v
  local acct, tid = string.match(ref, '^(.*):(%d+)$')
  redis.call('XADD', p .. ':dead', '*',
    'task_id', tid, 'account', acct, 'captcha_type', f[1] or '', 'kind', f[2] or '',
    'reason', reason, 'error_code', code, 'http_status', http, 'attempts', attempts,
    'deliveries', f[4] or '0', 'enqueued_at', f[3] or '', 'failed_at', now, 'error', err)
  redis.call('HINCRBY', p .. ':deadcount', reason, 1)
  trim_dead(maxlen, minid)
  local owner = redis.call('HGET', p .. ':r:' .. ref, 'o')
  if owner then redis.call('SREM', p .. ':running:' .. owner, ref) end
  redis.call('DEL', p .. ':r:' .. ref)
  redis.call('ZREM', p .. ':leases', ref)
  redis.call('ZREM', p .. ':sched', ref)
  redis.call('DECR', p .. ':npending')
  count(now, reason .. '|' .. (f[2] or '') .. '|' .. code .. '|' .. acct)
end
-- a delivery of a running report was lost (lease ran out, or its worker died): queue it
-- again, or dead-letter it as poison once it has been lost max deliveries times
local function lost_delivery(ref, now, list, compiled, max_deliveries, maxlen, minid)
  redis.call('ZREM', p .. ':leases', ref)
  local key = p .. ':r:' .. ref
  local owner = redis.call('HGET', key, 'o')
  if owner then redis.call('SREM', p .. ':running:' .. owner, ref) end
  local v = redis.call('HINCRBY', key, 'v', 1)
  if v >= tonumber(max_deliveries) then
    local f = redis.call('HMGET', key, 't', 'k', 'e', 'v', 'n')
    bury(ref, f, now, 'poison', f[5] or '0', '', '',
      'its worker was lost ' .. v .. ' times while sending it', maxlen, minid)
    return 'poison', v .. '|' .. (f[1] or '') .. '|' .. (f[2] or '')
  end
  return 'requeued', push({ref}, now, 'u', list, compiled)
end
