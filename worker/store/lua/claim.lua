-- requires: prelude ratelimit
-- claim: take reports for one delivery each — a message's reports in one round trip — and
--        optionally plan and admit each one's rate-limit slot in that same round trip
--        (docs/design.md §3.1, §5). Each report is claimed on its own, as if alone. With a
--        room to fill, also takes more messages off the lists (urgent first), as kombu
--        would have handed them to workers, and claims their reports: a worker busy with
--        single-report messages delivers several per Celery task (§3.4).
-- KEYS: 1 the urgent list, 2 the normal list (read only to take messages)
-- ARGV: 1 prefix, 2 now, 3 lease until, 4 worker id ('' = none), 5 the rate limits: a line
--       per account, tab-separated name, slot interval, limit N, window (period + margin);
--       an account not there is not asked, 6 sliding-log member prefix, 7 take messages
--       off the lists until this many reports in all (0 = none), 8 hold: seconds an
--       admission may wait for its send while the account's log is at most half full
--       (0 = none; see rl_admit), then two per report: message id, ref (account:taskId)
-- Reads fields: s, m, t, k, e, d, n, v, q, ps; writes s=r, o; moves each message from
--       {p}:msgs / {p}:umsgs to {p}:started; adds each ref to {p}:leases, {p}:running:{worker}
-- Returns: {claims, taken}: claims has one answer per report, in order; taken one entry per
--       message taken, {message id, ref, answer, ref, answer, ...}. An answer is {0, state}
--       when this message may not act on the report; else {1, type, kind, enqueued at,
--       deadline, attempts, deliveries, queued at, paused until, planned slot, limiter} with
--       limiter '' (not asked), 'go' (admitted now, to be sent at once), 'held' (admitted
--       for a send within hold seconds), 'none' (no slot before the deadline) or the time
--       of the reserved slot
local now, lease_until, worker = tonumber(ARGV[2]), ARGV[3], ARGV[4]
local packed_limits, member_prefix, room = ARGV[5], ARGV[6], tonumber(ARGV[7])
local hold = tonumber(ARGV[8])
local rows = ARGV  -- read from 9 on, two at a time (the header above)
guard()
local limits = {}
for acct, i, n, w in string.gmatch(packed_limits, '([^\t\n]*)\t([^\t]*)\t([^\t]*)\t([^\n]*)\n') do
  limits[acct] = {tonumber(i), tonumber(n), tonumber(w)}
end
local admitted = 0
local function claim(id, ref)
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
  redis.call('ZADD', p .. ':leases', lease_until, ref)
  if worker ~= '' then
    redis.call('HSET', key, 'o', worker)
    redis.call('SADD', p .. ':running:' .. worker, ref)
  end
  local acct = string.match(ref, '^(.*):%d+$')
  local paused = redis.call('ZSCORE', p .. ':paused', acct)
  if paused and tonumber(paused) <= now then paused = false end
  local lim, limit = '', limits[acct]
  if limit and not paused and not f[10] and now < tonumber(f[6]) then
    local lim_interval, lim_amount, lim_window = rl_limit(p .. ':limit:' .. acct,
      limit[1], limit[2], limit[3])
    local rnow = rl_now()
    local cool = p .. ':cool:' .. acct
    local slot = rl_plan(p .. ':plan:' .. acct, cool, lim_interval, tonumber(f[6]), rnow)
    admitted = admitted + 1
    if not slot then
      lim = 'none'
    else
      local wait, held = 1, false
      if slot <= rnow then
        wait, held = rl_admit(p .. ':rl:' .. acct, cool, lim_amount, lim_window,
          member_prefix .. '.' .. admitted, rnow, hold)
      end
      if wait ~= 0 then
        lim = string.format('%.6f', slot)
      else
        lim = held and 'held' or 'go'
      end
    end
  end
  return {1, f[3], f[4], f[5], f[6], f[7], f[8], f[9], paused or '', f[10] or '', lim}
end
local claims = {}
for i = 9, #rows, 2 do claims[#claims + 1] = claim(rows[i], rows[i + 1]) end
local taken, count, foreign = {}, #claims, false
for _, list in ipairs({KEYS[1], KEYS[2]}) do
  while count < room and not foreign do
    local entry = redis.call('RPOP', list)
    if not entry then break end
    local id = string.match(entry, '"delivery_tag":%s*"([^"]*)"')
    local refs = id and redis.call('HGET', p .. ':msgrefs', id)
    if not id or string.sub(id, 1, #p + 1) ~= p .. '-' then
      redis.call('RPUSH', list, entry)  -- not one of ours: back where it was, for kombu
      foreign = true
      break
    end
    local one = {id}
    for ref in string.gmatch(string.match(refs or '', '|(.*)$') or '', '[^,]+') do
      one[#one + 1] = ref
      one[#one + 1] = claim(id, ref)
      count = count + 1
    end
    taken[#taken + 1] = one
  end
end
return {claims, taken}
