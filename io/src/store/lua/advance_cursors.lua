-- AdvanceCursors, the cursor part. KEYS[1] the user's cursor hash (conv -> 'epoch:seq').
-- ARGV: (conv, log epoch, seq) triples, already filtered by the caller to the conversations'
-- current log epochs. A cursor only moves forward within one log epoch; another epoch resets
-- it to 0 first. Seqs stay decimal strings (compared by length, then text) so a u64 cursor
-- survives Lua's doubles exactly.
local function greater(a, b)
  if #a ~= #b then
    return #a > #b
  end
  return a > b
end
for i = 1, #ARGV, 3 do
  local conv, epoch, seq = ARGV[i], ARGV[i + 1], ARGV[i + 2]
  local stored = redis.call('HGET', KEYS[1], conv)
  local cur = '0'
  if stored then
    local colon = string.find(stored, ':', 1, true)
    if string.sub(stored, 1, colon - 1) == epoch then
      cur = string.sub(stored, colon + 1)
    end
  end
  if greater(seq, cur) then
    cur = seq
  end
  redis.call('HSET', KEYS[1], conv, epoch .. ':' .. cur)
end
return 1
