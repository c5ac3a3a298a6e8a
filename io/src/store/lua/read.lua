-- Fetch (and, with limit 0, one conversation's head for LoadHeads).
-- KEYS (all under the conversation's tag): [1] meta, [2] members, [3] log.
-- ARGV: [1] user, [2] '1' for a group, [3] log epoch the reader expects, [4] after seq,
-- [5] limit, [6] '1' if the caller established the user may read a non-group conversation,
-- [7] a fresh log epoch, taken if the log moves (incarnation.lua, prepended).
-- Returns {nil} when there is no log, else {log epoch, head, first, joined at (-1: not a
-- member of the group), epoch moved from (0: never), head carried over, seq, message, ...}.
-- Messages are returned only when the epoch matches and the user may read, starting after
-- max(after seq, the user's visible start - 1).
local epoch = redis.call('HGET', KEYS[1], 'epoch')
if not epoch then
  return {false}
end
settle_log(KEYS[1], epoch, ARGV[7])
local meta = redis.call('HMGET', KEYS[1], 'epoch', 'head', 'first', 'cf_epoch', 'cf_n')
local head, first = tonumber(meta[2]), tonumber(meta[3])
local joined, may_read = 0, ARGV[6] == '1'
if ARGV[2] == '1' then
  local j = redis.call('HGET', KEYS[2], ARGV[1])
  if j then
    joined, may_read = tonumber(j), true
  else
    joined, may_read = -1, false
  end
end
local out = {meta[1], head, first, joined, meta[4] or '0', meta[5] or '0'}
if not may_read or meta[1] ~= ARGV[3] then
  return out
end
local visible = math.max(first, math.max(joined, 0) + 1)
local start = math.max(math.max(tonumber(ARGV[4]), visible - 1) + 1, first)
local stop = math.min(head, start + tonumber(ARGV[5]) - 1)
-- HMGET in chunks: unpack() of thousands of values overflows Lua's C stack.
local s = start
while s <= stop do
  local fields = {}
  local last = math.min(stop, s + 499)
  for q = s, last do
    fields[#fields + 1] = q
  end
  local values = redis.call('HMGET', KEYS[3], unpack(fields))
  for i = 1, #fields do
    if values[i] then
      out[#out + 1] = fields[i]
      out[#out + 1] = values[i]
    end
  end
  s = last + 1
end
return out
