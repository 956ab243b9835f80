-- ratelimit: the rate limiter's shared helpers (docs/design.md §5), timed by Redis's clock.
-- Prepended to claim (which plans and admits in the claim's round trip) and to plan, admit
-- and cool.
-- the stricter of this worker's limit and the fleet's effective one (the strictest any
-- live worker declares, kept by the heartbeats): one limit per account, fleet-wide
local function rl_limit(limit_key, interval, amount, window)
  local stored = redis.call('GET', limit_key)
  if stored then
    local i, a, w = string.match(stored, '^([^,]+),([^,]+),([^,]+)$')
    if i and tonumber(a) / tonumber(w) < amount / window then
      return tonumber(i), tonumber(a), tonumber(w)
    end
  end
  return interval, amount, window
end
local function rl_now()
  local t = redis.call('TIME')
  return tonumber(t[1]) + tonumber(t[2]) / 1000000
end
-- reserve the next planned slot; returns its time, or nil if it falls after the deadline
local function rl_plan(plan_key, cool_key, interval, deadline, now)
  local tat = tonumber(redis.call('GET', plan_key) or '0')
  local cool = tonumber(redis.call('GET', cool_key) or '0')
  local slot = math.max(now, tat, cool)
  if slot > deadline then return nil end
  local nxt = slot + interval
  redis.call('SET', plan_key, string.format('%.6f', nxt), 'PX',
    math.ceil((nxt - now) * 1000) + 60000)
  return slot
end
-- admit one request now if the sliding log allows; returns 0, else the seconds to wait.
-- With hold > 0 and the log at most half full, the admission is held: logged at now + hold
-- instead of now, it covers a send at any time in the next hold seconds (every admission
-- counts every entry not older than its window, future ones too, so no window of the
-- period ever sees more than the limit); the second answer says whether it was held.
-- Near the limit the entry is logged at now, as always: holding there would halve the
-- rate the limit allows.
local function rl_admit(log_key, cool_key, limit, window, member, now, hold)
  local cool = tonumber(redis.call('GET', cool_key) or '0')
  if cool > now then return cool - now end
  redis.call('ZREMRANGEBYSCORE', log_key, '-inf', '(' .. string.format('%.6f', now - window))
  local count = redis.call('ZCARD', log_key)
  if count < limit then
    local ahead = (hold and hold > 0 and (count + 1) * 2 <= limit) and hold or 0
    redis.call('ZADD', log_key, now + ahead, member)
    redis.call('PEXPIRE', log_key, math.ceil((window + ahead) * 1000) + 1000)
    return 0, ahead > 0
  end
  local oldest = redis.call('ZRANGE', log_key, 0, 0, 'WITHSCORES')
  return tonumber(oldest[2]) + window - now
end
