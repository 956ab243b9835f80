-- pause: pause an account on every worker after an account fault (docs/design.md §1).
-- KEYS: none ({p}:paused, {p}:paused:{acct})
-- ARGV: 1 prefix, 2 account, 3 now, 4 paused until, 5 why (JSON), 6 ttl s
-- Returns: 1 newly paused, 0 already paused for longer (one pause, one log line)
local p, acct, now, untl, why, ttl = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6]
redis.call('SETNX', p .. ':oom', '1') -- all or nothing under OOM, as the prelude's guard
local current = redis.call('ZSCORE', p .. ':paused', acct)
if current and tonumber(current) > tonumber(now) then return 0 end
redis.call('ZADD', p .. ':paused', untl, acct)
redis.call('SET', p .. ':paused:' .. acct, why, 'EX', ttl)
return 1
