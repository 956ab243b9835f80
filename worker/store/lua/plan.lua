-- requires: ratelimit
-- plan: reserve the account's next free rate-limit slot (docs/design.md §5).
-- KEYS: 1 plan key, 2 cool-down key, 3 the fleet's limit key
-- ARGV: 1 slot interval s, 2 deadline (epoch s), 3 limit N, 4 window s (period + margin)
-- Returns: {slot - now, now}, or {-1, now} when no slot is free before the deadline
local plan_key, cool_key, limit_key = KEYS[1], KEYS[2], KEYS[3]
local interval, deadline = tonumber(ARGV[1]), tonumber(ARGV[2])
local amount, window = tonumber(ARGV[3]), tonumber(ARGV[4])
interval = rl_limit(limit_key, interval, amount, window)
local now = rl_now()
local slot = rl_plan(plan_key, cool_key, interval, deadline, now)
if not slot then return {'-1', string.format('%.6f', now)} end
return {string.format('%.6f', slot - now), string.format('%.6f', now)}
