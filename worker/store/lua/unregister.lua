-- unregister: a worker's clean stop: its held messages are left to kombu's restore (or the
--             orphan sweep); anything it still has running is found by the next sweep;
--             its rate-limit declarations are withdrawn (docs/design.md §4.1).
-- KEYS: none
-- ARGV: 1 prefix, 2 worker id, 3 accounts (comma-separated)
-- Returns: 1
local p, worker, accounts = ARGV[1], ARGV[2], ARGV[3]
redis.call('DEL', p .. ':held:' .. worker)
if redis.call('EXISTS', p .. ':running:' .. worker) == 1 then
  redis.call('ZADD', p .. ':workers', 0, worker)
else
  redis.call('ZREM', p .. ':workers', worker)
end
for acct in string.gmatch(accounts, '[^,]+') do redis.call('HDEL', p .. ':decl:' .. acct, worker) end
return 1
