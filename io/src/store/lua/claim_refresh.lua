-- RefreshLeases. KEYS: one claim hash per session, in order.
-- ARGV: server, lease_until, now, then one epoch per session.
-- Returns a flat list of (outcome, current counter) pairs:
-- 0 refreshed, 1 superseded (with the counter), 2 gone.
local out = {}
local now = tonumber(ARGV[3])
local lease_until = tonumber(ARGV[2])
for i, key in ipairs(KEYS) do
  local epoch = ARGV[3 + i]
  local c = redis.call('HMGET', key, 'epoch', 'c_epoch', 'server', 'lease')
  if not c[1] then
    out[#out + 1] = 2
    out[#out + 1] = '0'
  elseif c[2] == epoch and c[3] == ARGV[1] and now < tonumber(c[4]) then
    if lease_until > tonumber(c[4]) then
      redis.call('HSET', key, 'lease', ARGV[2])
    end
    out[#out + 1] = 0
    out[#out + 1] = c[1]
  elseif tonumber(c[1]) > tonumber(epoch) then
    out[#out + 1] = 1
    out[#out + 1] = c[1]
  else
    -- Released, expired (never revived), or another server's claim of this epoch.
    out[#out + 1] = 2
    out[#out + 1] = c[1]
  end
end
return out
