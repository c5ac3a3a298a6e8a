-- BindSession. KEYS[1] claim hash, KEYS[2] route record.
-- ARGV: epoch, server, lease_until, now.
-- Only if the live claim has exactly this epoch and server: write the route record and
-- extend the lease (never shortening it). Returns {bound (1/0), current counter}.
local c = redis.call('HMGET', KEYS[1], 'epoch', 'c_epoch', 'server', 'lease')
if not c[1] then
  return {0, '0'}
end
if c[2] == ARGV[1] and c[3] == ARGV[2] and tonumber(ARGV[4]) < tonumber(c[4]) then
  if tonumber(ARGV[3]) > tonumber(c[4]) then
    redis.call('HSET', KEYS[1], 'lease', ARGV[3])
  end
  redis.call('HSET', KEYS[2], 'server', ARGV[2], 'epoch', ARGV[1])
  return {1, c[1]}
end
return {0, c[1]}
