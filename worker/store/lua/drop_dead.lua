-- requires: prelude
-- drop_dead: delete dead letters by id, keeping the per-reason counts exact.
-- KEYS: none ({p}:dead, {p}:deadcount)
-- ARGV: 1 prefix, 2.. dead-letter ids
-- Returns: how many were removed
local removed = 0
for i = 2, #ARGV do
  local entry_id = ARGV[i]
  for _, e in ipairs(redis.call('XRANGE', p .. ':dead', entry_id, entry_id)) do
    drop_dead(e)
    removed = removed + 1
  end
end
return removed
