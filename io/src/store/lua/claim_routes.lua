-- LoadRoutes. KEYS: (claim hash, route record) per user, in order. ARGV[1] now.
-- Returns a flat list of (server, epoch) pairs, nil/nil where the record does not belong to
-- the user's current live claim (an older epoch's, or under an expired claim).
local out = {}
local now = tonumber(ARGV[1])
for i = 1, #KEYS, 2 do
  local c = redis.call('HMGET', KEYS[i], 'c_epoch', 'server', 'lease')
  local r = redis.call('HMGET', KEYS[i + 1], 'server', 'epoch')
  if r[1] and c[1] and c[1] == r[2] and c[2] == r[1] and now < tonumber(c[3]) then
    out[#out + 1] = r[1]
    out[#out + 1] = r[2]
  else
    out[#out + 1] = false
    out[#out + 1] = false
  end
end
return out
