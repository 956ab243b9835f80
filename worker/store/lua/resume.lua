-- resume: lift an account's pause early (``accounts resume``).
-- KEYS: none
-- ARGV: 1 prefix, 2 account
-- Returns: 1 if it was paused
local p, acct = ARGV[1], ARGV[2]
redis.call('DEL', p .. ':paused:' .. acct)
return redis.call('ZREM', p .. ':paused', acct)
