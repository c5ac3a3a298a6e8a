-- Append: conv_log's append as one step. KEYS (all under the conversation's {c:<id>} tag):
-- [1] meta hash (epoch, head, first), [2] log hash (seq -> encoded message),
-- [3] idempotency record of (sender, msg id), [4] group members hash (seq joined at).
-- ARGV: [1] '1' for a group, [2] sender, [3] body hash, [4] encoded message, [5] now,
-- [6] idempotency ttl ms, [7] max log length, [8] log epoch to use if the log is new.
-- Returns {'unknown'} | {'not_member'} | {'conflict'} | {'dup'|'ok', log epoch, seq, appended at}.
-- Private and `all` membership (accounts exist) is checked by the caller before: accounts are
-- never deleted, so that check cannot go stale.
if ARGV[1] == '1' then
  if redis.call('EXISTS', KEYS[1]) == 0 then
    return {'unknown'}
  end
  if redis.call('HEXISTS', KEYS[4], ARGV[2]) == 0 then
    return {'not_member'}
  end
end
local meta = redis.call('HMGET', KEYS[1], 'epoch', 'head', 'first')
local epoch = meta[1]
local head, first
if not epoch then
  epoch = ARGV[8]
  head, first = 0, 1
  redis.call('HSET', KEYS[1], 'epoch', epoch, 'head', 0, 'first', 1)
else
  head, first = tonumber(meta[2]), tonumber(meta[3])
end
local now = tonumber(ARGV[5])
local ttl = tonumber(ARGV[6])
-- The record is judged by the caller's clock (`now`), like the reference; PEXPIRE only
-- collects it.
local rec = redis.call('HMGET', KEYS[3], 'hash', 'seq', 'at')
if rec[1] and now < tonumber(rec[3]) + ttl then
  if rec[1] ~= ARGV[3] then
    return {'conflict'}
  end
  return {'dup', epoch, tonumber(rec[2]), rec[3]}
end
head = head + 1
redis.call('HSET', KEYS[2], head, ARGV[4])
redis.call('HSET', KEYS[3], 'hash', ARGV[3], 'seq', head, 'at', ARGV[5])
redis.call('PEXPIRE', KEYS[3], math.max(ttl, 1))
local max_len = math.max(tonumber(ARGV[7]), 1)
while head - first + 1 > max_len do
  redis.call('HDEL', KEYS[2], first)
  first = first + 1
end
redis.call('HSET', KEYS[1], 'head', head, 'first', first)
return {'ok', epoch, head, ARGV[5]}
