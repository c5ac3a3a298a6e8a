-- Append: conv_log's append as one step. KEYS (all under the conversation's {c:<id>} tag):
-- [1] meta hash (epoch, head, first, mv), [2] log hash (seq -> encoded message),
-- [3] idempotency record of (sender, msg id), [4] group members hash (seq joined at),
-- [5] order record of (sender, stream): '<last order seq stored>:<at>' (unused when unordered).
-- ARGV: [1] '1' for a group, [2] sender, [3] body hash, [4] encoded message, [5] now,
-- [6] idempotency ttl ms, [7] max log length, [8] log epoch to use if the log is new (or
-- moves: incarnation.lua, prepended),
-- [9] order seq (0: unordered), [10] order after, [11] the store's now (route records),
-- [12] and [13] for a group: the log epoch and membership changes ('mv') of the member list
-- the caller holds ('0' '0' if none).
-- Returns {'unknown'} | {'not_member'} | {'conflict'} | {'out_of_order'} | {'superseded'} |
-- {'dup'|'ok', log epoch, seq, appended at, recipients (below)}.
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
local meta = redis.call('HMGET', KEYS[1], 'epoch', 'head', 'first', 'mv')
local epoch = settle_log(KEYS[1], meta[1], ARGV[8])
local now = tonumber(ARGV[5])
local ttl = tonumber(ARGV[6])
local order_seq = tonumber(ARGV[9])
-- The order record, '<last>:<at>', judged by the caller's clock like the idempotency record.
local function last_order()
  local o = redis.call('GET', KEYS[5])
  if o then
    local last, at = string.match(o, '^(%d+):(%d+)$')
    if last and now < tonumber(at) + ttl then
      return tonumber(last)
    end
  end
  return 0
end
-- Raises (never lowers) the order record to this message's order seq: one SET with its TTL.
local function raise_order(last)
  if order_seq > last then
    redis.call('SET', KEYS[5], ARGV[9] .. ':' .. ARGV[5], 'PX', math.max(ttl, 1))
  end
end
-- What the push needs, read in this step so the route reads nothing more before it pushes;
-- the 5th element of a 'dup'/'ok' reply: for a group {mv, member ids (HKEYS)}, or just {mv}
-- when the log epoch (settled above) and mv are the ones the caller named (ARGV[12], [13]):
-- every membership change raises mv in its own step (join_group.lua, leave_group.lua); for
-- a private conversation, when given, KEYS[6..9] (claim hash and route record of the low
-- user, then of the high one; never on a Redis Cluster, where they are in other slots),
-- judged at ARGV[11] as claim_routes.lua judges them: the flat (server, epoch) pairs it
-- would return.
local function recipients()
  if ARGV[1] == '1' then
    local changes = meta[4] or '0'
    if epoch == ARGV[12] and changes == ARGV[13] then
      return {changes}
    end
    return {changes, redis.call('HKEYS', KEYS[4])}
  end
  local out = {}
  for i = 6, #KEYS - 1, 2 do
    local c = redis.call('HMGET', KEYS[i], 'c_epoch', 'server', 'lease')
    local r = redis.call('HMGET', KEYS[i + 1], 'server', 'epoch')
    if r[1] and c[1] and c[1] == r[2] and c[2] == r[1] and tonumber(ARGV[11]) < tonumber(c[3]) then
      out[#out + 1] = r[1]
      out[#out + 1] = r[2]
    else
      out[#out + 1] = false
      out[#out + 1] = false
    end
  end
  return out
end
-- The record is judged by the caller's clock (`now`), like the reference; PEXPIRE only
-- collects it. A log that does not exist has no records.
if epoch then
  local rec = redis.call('HMGET', KEYS[3], 'hash', 'seq', 'at')
  if rec[1] and now < tonumber(rec[3]) + ttl then
    if rec[1] ~= ARGV[3] then
      return {'conflict'}
    end
    if order_seq > 0 then
      raise_order(last_order())
    end
    return {'dup', epoch, tonumber(rec[2]), rec[3], recipients()}
  end
end
local last = 0
if order_seq > 0 then
  last = last_order()
  if order_seq <= last then
    return {'superseded'}
  end
  if tonumber(ARGV[10]) > last then
    return {'out_of_order'}
  end
end
-- Every check passed: only now may a new log come into being.
local head, first
if not epoch then
  epoch = ARGV[8]
  head, first = 0, 1
  redis.call('HSET', KEYS[1], 'epoch', epoch, 'head', 0, 'first', 1, 'inc', node_incarnation())
else
  head, first = tonumber(meta[2]), tonumber(meta[3])
end
head = head + 1
redis.call('HSET', KEYS[2], head, ARGV[4])
redis.call('HSET', KEYS[3], 'hash', ARGV[3], 'seq', head, 'at', ARGV[5])
redis.call('PEXPIRE', KEYS[3], math.max(ttl, 1))
if order_seq > 0 then
  raise_order(last)
end
local max_len = math.max(tonumber(ARGV[7]), 1)
while head - first + 1 > max_len do
  redis.call('HDEL', KEYS[2], first)
  first = first + 1
end
redis.call('HSET', KEYS[1], 'head', head, 'first', first)
return {'ok', epoch, head, ARGV[5], recipients()}
