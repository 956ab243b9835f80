"""The pending-report ledger: every state change of a report is one atomic Lua script.

A report's life (``keys.py`` lists the keys)::

    enqueue ──► queued ──claim──► running ──finish──► accepted            (kept dedup_ttl_s)
                  ▲                  │  ├────finish──► dead letter         (entry deleted)
                  │                  │  └─finish(retry|defer)─► waiting ──sweep (due)──┐
                  └──────────────────┴─────────────────────────────────────────────────┘
                  ▲   sweep: lease expired, or its worker's heartbeat stopped → queued
                  │          again, or "poison"
                  └── sweep: its message is held by no live worker and waits in no list
                             (a killed worker's prefetch, kombu's pop window, a failed
                             write) → handed to a new message

Why a ledger: kombu's Redis transport pops a message before it records it as unacked, so a
worker killed in between loses it (docs/design.md §4). The ledger is written in the same script
that pushes the message and is cleared only at a terminal outcome, so a report can always
be found and re-queued. A message names its reports and carries an id; a worker may act on
a report only if the report is ``queued`` *for that message id* — so a redelivered or
duplicated message never sends a report twice, and an accepted report is never sent again.

Two lists per queue (see ``messages.py``): new reports in the normal list, re-queued ones
(retries, deferred, recovered) in the urgent list that workers drain first. Each list is
FIFO with its own message sequence. A message is accounted for while it waits in its list
(its sequence is not older than the list's oldest) or while a live worker holds it (each
worker's heartbeat lists the messages it has received and not finished). Any other message
whose reports are still queued for it is an orphan: after ``lost_grace_s`` its reports go
to a new message. A worker whose heartbeat stops for ``worker_timeout_s`` is dead: its
reports in flight are re-queued and its messages handed on at once, so a killed worker's
reports are back in seconds, not after kombu's visibility timeout.

Out of memory: under ``maxmemory`` with ``noeviction`` Redis refuses a script's *first*
write that needs memory, and lets the rest of a script that has written once run to its
end. Every script here therefore starts with such a write (``guard``): a script either
fails before writing anything, or completes. Nothing is half-written.

Scripts take the key prefix and build key names from it (see ``keys.py``); report keys
are dynamic, so this layout targets a single Redis server or a replica set, not Cluster.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import redis

from worker.store import calls as guarded
from worker.store import limits, messages
from worker.store.keys import UNACKED, UNACKED_INDEX, Keys

# The heartbeat: how often a worker says it is alive, and how long without one before the
# sweep (any worker's) takes it for dead and hands its reports on.
HEARTBEAT_S = 1.0
WORKER_TIMEOUT_S = 5.0

_COMMON = """
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
  for i, r in ipairs(refs) do quoted[i] = '\\\\"' .. r .. '\\\\"' end
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
"""

# ARGV: prefix, normal list, now, normal template, refs per message, then the reports as one
#       string: a line per report, tab-separated: account, task_id, captcha_type, kind,
#       deadline, dead-letter id (or empty). One argument, not six per report: encoding the
#       arguments was the producer's largest cost.
# Returns a string with one character per report: "1" queued, "0" duplicate (already
# pending or accepted).
ENQUEUE_SCRIPT = _ENQUEUE = (
    _COMMON
    + """
guard()
local list, now, per = ARGV[2], ARGV[3], tonumber(ARGV[5])
local compiled = compile(ARGV[4])
local rows = {}
local pattern = '([^\\t]*)\\t([^\\t]*)\\t([^\\t]*)\\t([^\\t]*)\\t([^\\t]*)\\t([^\\n]*)\\n'
for acct, tid, ctype, kind, deadline, dead in string.gmatch(ARGV[6], pattern) do
  rows[#rows + 1] = {acct, tid, ctype, kind, deadline, dead}
end
-- message ids: one INCRBY for the whole call (duplicates leave gaps, which is fine)
local last = redis.call('INCRBY', p .. ':seq', math.ceil(#rows / per))
local seq = last - math.ceil(#rows / per)
local flags, batch, added = {}, {}, 0
local payloads, scored, refsof = {}, {}, {}
local function flush()
  if #batch == 0 then return end
  local id = p .. '-' .. seq
  local quoted = {}
  for i, r in ipairs(batch) do quoted[i] = '\\\\"' .. r .. '\\\\"' end
  payloads[#payloads + 1] = render(compiled, id, table.concat(quoted, ','))
  scored[#scored + 1] = seq
  scored[#scored + 1] = id
  refsof[#refsof + 1] = id
  refsof[#refsof + 1] = now .. '|' .. table.concat(batch, ',')
  batch = {}
end
for _, row in ipairs(rows) do
  local acct, tid, kind = row[1], row[2], row[4]
  local ref = acct .. ':' .. tid
  local key = p .. ':r:' .. ref
  if redis.call('EXISTS', key) == 1 then
    flags[#flags + 1] = '0'
    count(now, 'duplicate|' .. kind .. '||' .. acct)
  else
    if #batch == 0 then seq = seq + 1 end
    redis.call('HSET', key, 's', 'q', 'm', p .. '-' .. seq, 'q', now, 't', row[3], 'k', kind,
      'e', now, 'd', row[5], 'n', 0, 'v', 0)
    batch[#batch + 1] = ref
    added = added + 1
    if #batch >= per then flush() end
    flags[#flags + 1] = '1'
  end
  if row[6] ~= '' then drop_dead_id(row[6]) end
end
flush()
-- one command per kind of write, in slices (Lua's unpack has a stack limit)
for i = 1, #payloads, 500 do
  redis.call('LPUSH', list, unpack(payloads, i, math.min(i + 499, #payloads)))
end
for i = 1, #scored, 1000 do
  redis.call('ZADD', p .. ':msgs', unpack(scored, i, math.min(i + 999, #scored)))
  redis.call('HSET', p .. ':msgrefs', unpack(refsof, i, math.min(i + 999, #refsof)))
end
if added > 0 then redis.call('INCRBY', p .. ':npending', added) end
return table.concat(flags)
"""
)

# ARGV: prefix, ref, message id, now, lease until, worker id ('' = none), then (optional)
#       the account's limiter: slot interval, limit N, window, member
# Returns {0, state} when this message may not act on the report, else {1, type, kind,
# enqueued_at, deadline, attempts, deliveries, queued_at, paused_until, planned slot,
# limiter} where limiter is '' (not asked), 'go' (admitted now), 'none' (no slot before the
# deadline) or the time of the reserved slot.
_CLAIM = (
    _COMMON
    + limits.LUA
    + """
guard()
local ref, id, now, worker = ARGV[2], ARGV[3], tonumber(ARGV[4]), ARGV[6]
local tag = string.sub(id, #p + 2, #p + 2) == 'u' and 'u' or ''
if redis.call('ZREM', p .. ':' .. tag .. 'msgs', id) == 1 then
  -- the message has started: tracked as started until its worker says it is done
  redis.call('ZADD', p .. ':started', now, id)
  redis.call('HDEL', p .. ':suspect', id)
end
local key = p .. ':r:' .. ref
local f = redis.call('HMGET', key, 's', 'm', 't', 'k', 'e', 'd', 'n', 'v', 'q', 'ps')
if f[1] ~= 'q' or f[2] ~= id then return {0, f[1] or ''} end
redis.call('HSET', key, 's', 'r')
redis.call('ZADD', p .. ':leases', ARGV[5], ref)
if worker ~= '' then
  redis.call('HSET', key, 'o', worker)
  redis.call('SADD', p .. ':running:' .. worker, ref)
end
local acct = string.match(ref, '^(.*):%d+$')
local paused = redis.call('ZSCORE', p .. ':paused', acct)
if paused and tonumber(paused) <= now then paused = false end
local lim = ''
if ARGV[7] and not paused and not f[10] and now < tonumber(f[6]) then
  local interval, amount, window = rl_limit(p .. ':limit:' .. acct, tonumber(ARGV[7]),
    tonumber(ARGV[8]), tonumber(ARGV[9]))
  local rnow = rl_now()
  local cool = p .. ':cool:' .. acct
  local slot = rl_plan(p .. ':plan:' .. acct, cool, interval, tonumber(f[6]), rnow)
  if not slot then
    lim = 'none'
  elseif slot <= rnow and rl_admit(p .. ':rl:' .. acct, cool, amount, window, ARGV[10],
      rnow) == 0 then
    lim = 'go'
  else
    lim = string.format('%.6f', slot)
  end
end
return {1, f[3], f[4], f[5], f[6], f[7], f[8], f[9], paused or '', f[10] or '', lim}
"""
)

# ARGV: prefix, ref, message id, outcome (accepted|retry|defer|dead), now, attempts,
#       error code, http status, error text, due (retry, defer) or reason (dead), dedup ttl,
#       dead maxlen, dead min id, stats field ('' = none), planned slot (defer), then
#       optionally "done" (this was the message's last report: see _DONE), urgent list,
#       urgent template
# Returns 1 when recorded, 0 when another delivery owns the report now (nothing changed).
_FINISH = (
    _COMMON
    + """
guard()
local ref, id, outcome, now = ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local function record()
  local attempts, code, http, err, arg = ARGV[6], ARGV[7], ARGV[8], ARGV[9], ARGV[10]
  local key = p .. ':r:' .. ref
  local f = redis.call('HMGET', key, 's', 'm', 't', 'k', 'e', 'v', 'o')
  if outcome == 'accepted' then
    -- recorded whoever owns the report: the API took it, so nobody may send it again
    if f[1] == 'a' then return 0 end
    if f[7] then redis.call('SREM', p .. ':running:' .. f[7], ref) end
    redis.call('DEL', key)
    redis.call('HSET', key, 's', 'a', 'm', id)
    redis.call('EXPIRE', key, ARGV[11])
    redis.call('ZREM', p .. ':leases', ref)
    redis.call('ZREM', p .. ':sched', ref)
    if f[1] then redis.call('DECR', p .. ':npending') end
    count(now, ARGV[14])
    return 1
  end
  if f[1] ~= 'r' or f[2] ~= id then return 0 end
  if outcome == 'retry' or outcome == 'defer' then
    if f[7] then redis.call('SREM', p .. ':running:' .. f[7], ref) end
    redis.call('HSET', key, 's', 'w', 'n', attempts)
    if outcome == 'retry' then
      redis.call('HSET', key, 'lc', code, 'lh', http, 'le', err)
      redis.call('HDEL', key, 'ps')
    elseif ARGV[15] ~= '' then
      redis.call('HSET', key, 'ps', ARGV[15])
    else
      redis.call('HDEL', key, 'ps')
    end
    redis.call('ZREM', p .. ':leases', ref)
    redis.call('ZADD', p .. ':sched', arg, ref)
    count(now, ARGV[14])
    return 1
  end
  bury(ref, {f[3], f[4], f[5], f[6]}, now, arg, attempts, code, http, err, ARGV[12], ARGV[13])
  return 1
end
local recorded = record()
if ARGV[16] == 'done' then
  -- the message's last report: the worker is done with the message (one round trip less)
  local refs = queued_refs(id)
  if #refs > 0 then push(refs, now, 'u', ARGV[17], compile(ARGV[18])) end
  forget(id)
end
return recorded
"""
)

# ARGV: prefix, message id, urgent list, now, urgent template.
# A worker is done with a message (normally after its last report; early on shutdown):
# the reports still queued for it go to a new urgent message at once. Returns
# {reports handed back, new message id or ''}.
_DONE = (
    _COMMON
    + """
guard()
local refs, new = hand_back(ARGV[2], ARGV[4], ARGV[3], compile(ARGV[5]))
return {#refs, new}
"""
)

# ARGV: prefix, worker id, worker timeout s, held message ids (comma-separated),
#       rate-limit declarations ("account,interval,amount,window" joined by ';').
# One heartbeat: the worker is alive (Redis's clock), holds exactly these messages, and
# declares these limits. Each account's effective limit is the strictest one declared by a
# live worker. Returns a flat list: account, effective "interval,amount,window", ...
_HEARTBEAT = (
    _COMMON
    + """
guard()
local worker, timeout = ARGV[2], tonumber(ARGV[3])
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
redis.call('ZADD', p .. ':workers', now, worker)
local held = p .. ':held:' .. worker
redis.call('DEL', held)
local ids = {}
for id in string.gmatch(ARGV[4], '[^,]+') do ids[#ids + 1] = id end
for i = 1, #ids, 1000 do redis.call('SADD', held, unpack(ids, i, math.min(i + 999, #ids))) end
local out = {}
for decl in string.gmatch(ARGV[5], '[^;]+') do
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
"""
)

# ARGV: prefix, worker id, accounts (comma-separated). A clean stop: the worker's heartbeat
# is marked stale so that the next sweep re-queues anything it still had in flight, its
# held messages are left to kombu's restore at shutdown (or the orphan sweep), and its
# rate-limit declarations are withdrawn.
_UNREGISTER = """
local p, worker = ARGV[1], ARGV[2]
redis.call('DEL', p .. ':held:' .. worker)
if redis.call('EXISTS', p .. ':running:' .. worker) == 1 then
  redis.call('ZADD', p .. ':workers', 0, worker)
else
  redis.call('ZREM', p .. ':workers', worker)
end
for acct in string.gmatch(ARGV[3], '[^,]+') do redis.call('HDEL', p .. ':decl:' .. acct, worker) end
return 1
"""

# ARGV: prefix, urgent list, now, urgent template, lease until, max deliveries, lost grace,
#       limit, dead maxlen, dead min id, unacked key, unacked index key, worker timeout,
#       normal list
# Returns a flat list of events: kind, subject, detail (for logs).
_SWEEP = (
    _COMMON
    + """
guard()
local list, now, limit = ARGV[2], ARGV[3], tonumber(ARGV[8])
local maxdel, grace, maxlen, minid = ARGV[6], tonumber(ARGV[7]), ARGV[9], ARGV[10]
local unacked, uindex, timeout, normal = ARGV[11], ARGV[12], tonumber(ARGV[13]), ARGV[14]
local tpl = compile(ARGV[4])
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
"""
)

# ARGV: prefix, account, now, until, reason json, ttl seconds. Returns 1 if newly paused.
_PAUSE = """
local p, acct = ARGV[1], ARGV[2]
redis.call('SETNX', p .. ':oom', '1')
local current = redis.call('ZSCORE', p .. ':paused', acct)
if current and tonumber(current) > tonumber(ARGV[3]) then return 0 end
redis.call('ZADD', p .. ':paused', ARGV[4], acct)
redis.call('SET', p .. ':paused:' .. acct, ARGV[5], 'EX', ARGV[6])
return 1
"""

# ARGV: prefix, then dead-letter ids. Returns how many were removed.
_DROP_DEAD = (
    _COMMON
    + """
local removed = 0
for i = 2, #ARGV do
  for _, e in ipairs(redis.call('XRANGE', p .. ':dead', ARGV[i], ARGV[i])) do
    drop_dead(e)
    removed = removed + 1
  end
end
return removed
"""
)

# ARGV: prefix, account. Returns 1 if it was paused.
_RESUME = """
local p, acct = ARGV[1], ARGV[2]
redis.call('DEL', p .. ':paused:' .. acct)
return redis.call('ZREM', p .. ':paused', acct)
"""


@dataclass(frozen=True, slots=True)
class Claim:
    """What a worker learns when it claims a report for one delivery."""

    captcha_type: str
    kind: str
    enqueued_at: float
    deadline: float
    attempts: int
    deliveries: int
    queued_at: float
    paused_until: float | None
    planned_slot: float | None  # a rate-limit slot reserved before the report was deferred
    limiter_since: float | None  # when the report first asked the limiter for that slot
    # the limiter's answer in the claim: "" not asked, "go" admitted now, "none" no slot
    # before the deadline, else the time of the slot reserved for it
    limiter: str = ""


@dataclass(frozen=True, slots=True)
class SweepEvent:
    # requeued | lease_expired | worker_lost | orphaned | poison | worker_dead | resumed
    kind: str
    subject: str  # a ref; an account for "resumed"; a worker id for "worker_dead"
    detail: str


def enqueue_args(
    keys: Keys, queue: str, rows: Sequence[Sequence[Any]], per_message: int = 1
) -> list[Any]:
    """Arguments of ``ENQUEUE_SCRIPT`` (run by ``Ledger.enqueue`` and by the intake's async
    client)."""
    packed = "".join("\t".join(map(str, row)) + "\n" for row in rows)
    return [
        keys.prefix,
        messages.list_key(queue, urgent=False),
        _now(),
        messages.template(queue, urgent=False),
        per_message,
        packed,
    ]


def parse_flags(reply: Any) -> list[int]:
    """The enqueue script's answer: 1 queued, 0 duplicate, per report."""
    text = reply if isinstance(reply, bytes) else str(reply).encode()
    return [1 if c == 49 else 0 for c in text]


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _now() -> str:
    return f"{time.time():.6f}"


class Ledger:
    """Python face of the scripts, bound to one Redis client, prefix and queue."""

    def __init__(
        self,
        client: redis.Redis,
        keys: Keys,
        queue: str,
        *,
        dedup_ttl_s: int = 3600,
        dead_max_entries: int = 100_000,
        dead_max_age_s: int = 7 * 86400,
    ) -> None:
        self.client = client
        self.keys = keys
        self.queue = queue
        self.urgent_list, self.normal_list = messages.list_keys(queue)
        self.normal_template = messages.template(queue, urgent=False)
        self.urgent_template = messages.template(queue, urgent=True)
        self.dedup_ttl_s = dedup_ttl_s
        self.dead_max_entries = dead_max_entries
        self.dead_max_age_s = dead_max_age_s
        self._enqueue = client.register_script(_ENQUEUE)
        self._claim = client.register_script(_CLAIM)
        self._finish = client.register_script(_FINISH)
        self._sweep = client.register_script(_SWEEP)
        self._pause = client.register_script(_PAUSE)
        self._resume = client.register_script(_RESUME)
        self._drop_dead = client.register_script(_DROP_DEAD)
        self._done = client.register_script(_DONE)
        self._heartbeat = client.register_script(_HEARTBEAT)
        self._unregister = client.register_script(_UNREGISTER)

    def _run(self, script: Any, args: Sequence[Any]) -> Any:
        """Run a script; a redis-py failure becomes the project's StoreError (full,
        unreachable, other). Scripts write all or nothing, so a failed call changed nothing."""
        return guarded.call(script, args=args, on=self.client)

    def enqueue(self, rows: Sequence[Sequence[Any]], *, per_message: int = 1) -> list[int]:
        """Queue ``rows`` of (account, task_id, type, kind, deadline, dead-letter id or '');
        one flag per row: 1 queued, 0 duplicate."""
        if not rows:
            return []
        return parse_flags(
            self._run(self._enqueue, enqueue_args(self.keys, self.queue, rows, per_message))
        )

    def claim(
        self,
        ref: str,
        message_id: str,
        lease_s: float,
        limiter: Sequence[str | float | int] = (),
        *,
        worker: str = "",
    ) -> Claim | str:
        """Take ``ref`` for this delivery; a string (its state) means: do not act on it.
        With ``limiter`` (``Limiter.claim_args``) the account's rate limiter is asked in the
        same round trip. ``worker`` (the claiming worker's id) lets the sweep re-queue the
        report at once should that worker's heartbeat stop."""
        now = time.time()
        args = [self.keys.prefix, ref, message_id, now, now + lease_s, worker, *limiter]
        reply = self._run(self._claim, args)
        if int(reply[0]) == 0:
            return _text(reply[1]) or "gone"
        f = [_text(v) for v in reply[1:]]
        return Claim(
            captcha_type=f[0],
            kind=f[1],
            enqueued_at=float(f[2]),
            deadline=float(f[3]),
            attempts=int(f[4] or 0),
            deliveries=int(f[5] or 0),
            queued_at=float(f[6] or f[2]),
            paused_until=float(f[7]) if f[7] else None,
            planned_slot=float(f[8].split("|")[0]) if f[8] else None,
            limiter_since=float(f[8].split("|")[1]) if "|" in f[8] else None,
            limiter=f[9] if len(f) > 9 else "",
        )

    def finish(
        self,
        ref: str,
        message_id: str,
        outcome: str,
        *,
        attempts: int,
        stats_field: str = "",
        error_code: str = "",
        http_status: int | None = None,
        error: str = "",
        due: float = 0.0,
        reason: str = "",
        planned_slot: float | None = None,
        limiter_since: float | None = None,
        done: bool = False,
    ) -> bool:
        """Record an outcome: ``accepted``, ``retry`` or ``defer`` (due at ``due``; a deferral
        keeps its reserved ``planned_slot`` and costs no attempt) or ``dead`` (``reason``).
        ``done``: this was the message's last report, so the worker is done with the message
        too (as :meth:`done`, in the same round trip)."""
        now = time.time()
        arg = f"{due:.6f}" if outcome in ("retry", "defer") else reason
        tail = ["done", self.urgent_list, self.urgent_template] if done else []
        reply = self._run(
            self._finish,
            [
                self.keys.prefix,
                ref,
                message_id,
                outcome,
                f"{now:.6f}",
                attempts,
                error_code,
                "" if http_status is None else http_status,
                error[:500],
                arg,
                self.dedup_ttl_s,
                self.dead_max_entries,
                self._dead_min_id(now),
                stats_field,
                ""
                if planned_slot is None
                else f"{planned_slot:.6f}|{limiter_since if limiter_since else now:.6f}",
                *tail,
            ],
        )
        return bool(int(reply))

    def sweep(
        self,
        *,
        lease_s: float,
        max_deliveries: int,
        lost_grace_s: float,
        worker_timeout_s: float = WORKER_TIMEOUT_S,
        limit: int = 500,
    ) -> list[SweepEvent]:
        now = time.time()
        reply = self._run(
            self._sweep,
            [
                self.keys.prefix,
                self.urgent_list,
                f"{now:.6f}",
                self.urgent_template,
                f"{now + lease_s:.6f}",
                max_deliveries,
                lost_grace_s,
                limit,
                self.dead_max_entries,
                self._dead_min_id(now),
                UNACKED,
                UNACKED_INDEX,
                worker_timeout_s,
                self.normal_list,
            ],
        )
        items = [_text(v) for v in reply]
        return [SweepEvent(*items[i : i + 3]) for i in range(0, len(items), 3)]

    def pause(self, account: str, seconds: float, reason_json: str) -> bool:
        """Pause ``account`` for ``seconds``; False if it was already paused (by another worker)."""
        now = time.time()
        ttl = max(1, round(seconds))
        args: list[str | float] = [self.keys.prefix, account, now, now + seconds, reason_json, ttl]
        return bool(int(self._run(self._pause, args)))

    def resume(self, account: str) -> bool:
        """Lift a pause early; False if ``account`` was not paused."""
        return bool(int(self._run(self._resume, [self.keys.prefix, account])))

    def drop_dead(self, ids: Sequence[str]) -> int:
        """Delete dead letters by id (per-reason counts kept exact); how many there were."""
        removed = 0
        for start in range(0, len(ids), 500):
            chunk = ids[start : start + 500]
            removed += int(self._run(self._drop_dead, [self.keys.prefix, *chunk]))
        return removed

    def done(self, message_id: str) -> int:
        """The worker is done with ``message_id``: reports still queued for it (not reached,
        e.g. on shutdown) go to a new urgent message now. How many were handed back."""
        reply = self._run(
            self._done,
            [self.keys.prefix, message_id, self.urgent_list, _now(), self.urgent_template],
        )
        return int(reply[0])

    def heartbeat(
        self,
        worker: str,
        held: Sequence[str],
        declarations: Sequence[tuple[str, float, int, float]] = (),
        *,
        timeout_s: float = WORKER_TIMEOUT_S,
    ) -> dict[str, tuple[float, int, float]]:
        """``worker`` is alive, holds exactly ``held`` and declares these rate limits
        (account, interval, amount, window). Returns each declared account's effective
        limit (the strictest declared by a live worker) as (interval, amount, window)."""
        decls = ";".join(f"{a},{i!r},{n},{w!r}" for a, i, n, w in declarations)
        reply = self._run(
            self._heartbeat, [self.keys.prefix, worker, timeout_s, ",".join(held), decls]
        )
        items = [_text(v) for v in reply]
        out: dict[str, tuple[float, int, float]] = {}
        for i in range(0, len(items), 2):
            interval, amount, window = items[i + 1].split(",")
            out[items[i]] = (float(interval), int(amount), float(window))
        return out

    def unregister(self, worker: str, accounts: Sequence[str]) -> None:
        """A clean stop: withdraw the worker's heartbeat, held messages and declarations."""
        self._run(self._unregister, [self.keys.prefix, worker, ",".join(accounts)])

    def _dead_min_id(self, now: float) -> str:
        return f"{int((now - self.dead_max_age_s) * 1000)}-0"
