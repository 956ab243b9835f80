-- requires: ratelimit
-- cool: the API pushed back (429): no sends for the account on any worker until now +
--       seconds; extends, never shortens (docs/design.md §5).
-- KEYS: 1 cool-down key
-- ARGV: 1 seconds
-- Returns: 1 if extended
local cool_key, seconds = KEYS[1], tonumber(ARGV[1])
local untl = rl_now() + seconds
local cur = tonumber(redis.call('GET', cool_key) or '0')
if cur >= untl then return 0 end
redis.call('SET', cool_key, string.format('%.6f', untl), 'PX', math.ceil(seconds * 1000))
return 1
