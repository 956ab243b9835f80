-- requires: prelude
-- enqueue: dedup + ledger entry + Celery message for each report, one atomic call.
-- KEYS: none (the list is ARGV[2] so that the intake's async client and the ledger share
--       one argument layout; report keys are built from the prefix)
-- ARGV: 1 prefix, 2 normal list, 3 now, 4 message template (@ID@, @REFS@), 5 reports per
--       message, 6 the reports: a line each, tab-separated account, taskId, type, kind,
--       deadline, dead-letter id to remove (replay) or '', 7 (optional) the call's token,
--       8 its lifetime in seconds: a call run again with the same token (a retry waiting for
--       replicas, docs/design.md §8) answers what the first run answered and writes nothing,
--       so a report dead-lettered in between is not queued again
-- Writes fields: s=q, m, q, t, k, e, d, n=0, v=0 (a new entry); never touches an existing one
-- Returns: one character per report, "1" queued, "0" duplicate (pending or accepted)
local list, now, template, per, packed = ARGV[2], ARGV[3], ARGV[4], tonumber(ARGV[5]), ARGV[6]
local token, token_ttl = ARGV[7] or '', tonumber(ARGV[8])
guard()
if token ~= '' then
  local answered = redis.call('GET', p .. ':enq:' .. token)
  if answered then return answered end
end
local compiled = compile(template)
local rows = {}
local pattern = '([^\t]*)\t([^\t]*)\t([^\t]*)\t([^\t]*)\t([^\t]*)\t([^\n]*)\n'
for acct, tid, ctype, kind, deadline, dead in string.gmatch(packed, pattern) do
  rows[#rows + 1] = {acct, tid, ctype, kind, deadline, dead}
end
-- message ids: one INCRBY for the whole call (duplicates leave gaps, which is fine)
local last = redis.call('INCRBY', p .. ':seq', math.ceil(#rows / per))
local seq = last - math.ceil(#rows / per)
local flags, batch, added = {}, {}, 0
local payloads, scored, refsof = {}, {}, {}
local function flush()
  if #batch == 0 then return end
  local id = p .. '-' .. seq
  local quoted = {}
  for i, r in ipairs(batch) do quoted[i] = '\\"' .. r .. '\\"' end
  payloads[#payloads + 1] = render(compiled, id, table.concat(quoted, ','))
  scored[#scored + 1] = seq
  scored[#scored + 1] = id
  refsof[#refsof + 1] = id
  refsof[#refsof + 1] = now .. '|' .. table.concat(batch, ',')
  batch = {}
end
for _, row in ipairs(rows) do
  local acct, tid, kind = row[1], row[2], row[4]
  local ref = acct .. ':' .. tid
  local key = p .. ':r:' .. ref
  if redis.call('EXISTS', key) == 1 then
    flags[#flags + 1] = '0'
    count(now, 'duplicate|' .. kind .. '||' .. acct)
  else
    if #batch == 0 then seq = seq + 1 end
    redis.call('HSET', key, 's', 'q', 'm', p .. '-' .. seq, 'q', now, 't', row[3], 'k', kind,
      'e', now, 'd', row[5], 'n', 0, 'v', 0)
    batch[#batch + 1] = ref
    added = added + 1
    if #batch >= per then flush() end
    flags[#flags + 1] = '1'
  end
  if row[6] ~= '' then drop_dead_id(row[6]) end
end
flush()
-- one command per kind of write, in slices (Lua's unpack has a stack limit)
for i = 1, #payloads, 500 do
  redis.call('LPUSH', list, unpack(payloads, i, math.min(i + 499, #payloads)))
end
for i = 1, #scored, 1000 do
  redis.call('ZADD', p .. ':msgs', unpack(scored, i, math.min(i + 999, #scored)))
  redis.call('HSET', p .. ':msgrefs', unpack(refsof, i, math.min(i + 999, #refsof)))
end
if added > 0 then redis.call('INCRBY', p .. ':npending', added) end
local answer = table.concat(flags)
if token ~= '' then redis.call('SET', p .. ':enq:' .. token, answer, 'EX', token_ttl) end
return answer
