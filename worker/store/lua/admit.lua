-- requires: ratelimit
-- admit: admit one request now if the account's sliding log allows (docs/design.md §5).
-- KEYS: 1 sliding-log key, 2 cool-down key, 3 the fleet's limit key
-- ARGV: 1 limit N, 2 window s (period + margin), 3 log member, 4 slot interval s
-- Returns: {1, 0} when admitted, else {0, seconds to wait}
local log_key, cool_key, limit_key = KEYS[1], KEYS[2], KEYS[3]
local amount, window, member = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3]
local interval = tonumber(ARGV[4])
local _
_, amount, window = rl_limit(limit_key, interval, amount, window)
local wait = rl_admit(log_key, cool_key, amount, window, member, rl_now())
if wait == 0 then return {1, '0'} end
return {0, string.format('%.6f', wait)}
