-- requires: prelude ratelimit
-- claim: take a report for one delivery of one message; optionally plan and admit its
--        rate-limit slot in the same round trip (docs/design.md §3.1, §5).
-- KEYS: none (report, plan, log and cool-down keys are built from the prefix and account)
-- ARGV: 1 prefix, 2 ref (account:taskId), 3 message id, 4 now, 5 lease until, 6 worker id
--       ('' = none), then optionally the account's limiter: 7 slot interval, 8 limit N,
--       9 window (period + margin), 10 sliding-log member
-- Reads fields: s, m, t, k, e, d, n, v, q, ps; writes s=r, o; moves the message from
--       {p}:msgs / {p}:umsgs to {p}:started; adds the ref to {p}:leases, {p}:running:{worker}
-- Returns: {0, state} when this message may not act on the report; else {1, type, kind,
--       enqueued at, deadline, attempts, deliveries, queued at, paused until, planned slot,
--       limiter} with limiter '' (not asked), 'go' (admitted now), 'none' (no slot before
--       the deadline) or the time of the reserved slot
local ref, id, now, lease_until, worker = ARGV[2], ARGV[3], tonumber(ARGV[4]), ARGV[5], ARGV[6]
local interval, amount, window, member = ARGV[7], ARGV[8], ARGV[9], ARGV[10]
guard()
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
local lim = ''
if interval and not paused and not f[10] and now < tonumber(f[6]) then
  local lim_interval, lim_amount, lim_window = rl_limit(p .. ':limit:' .. acct, tonumber(interval),
    tonumber(amount), tonumber(window))
  local rnow = rl_now()
  local cool = p .. ':cool:' .. acct
  local slot = rl_plan(p .. ':plan:' .. acct, cool, lim_interval, tonumber(f[6]), rnow)
  if not slot then
    lim = 'none'
  elseif slot <= rnow and rl_admit(p .. ':rl:' .. acct, cool, lim_amount, lim_window,
      member, rnow) == 0 then
    lim = 'go'
  else
    lim = string.format('%.6f', slot)
  end
end
return {1, f[3], f[4], f[5], f[6], f[7], f[8], f[9], paused or '', f[10] or '', lim}
