-- requires: prelude
-- done: a worker is done with a message (normally after its last report; early on
--       shutdown): the reports still queued for it go to one new urgent message at once,
--       and the message is forgotten (docs/design.md §4.3).
-- KEYS: 1 the urgent list
-- ARGV: 1 prefix, 2 message id, 3 now, 4 urgent message template
-- Reads fields: s, m of the message's reports; writes s=q, m, q for those handed back
-- Returns: {reports handed back, new message id or ''}
local id, now, template = ARGV[2], ARGV[3], ARGV[4]
guard()
local refs, new = hand_back(id, now, KEYS[1], compile(template))
return {#refs, new}
