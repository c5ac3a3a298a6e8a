-- ReplaceClaim. KEYS[1] claim hash. ARGV: expected, new epoch, server, lease_until, token hash.
-- Returns {replaced (1/0), counter before, old c_epoch, server, lease, token} (nil fields
-- when there was no claim). Epochs are stored as the caller's canonical decimal strings.
local c = redis.call('HMGET', KEYS[1], 'epoch', 'c_epoch', 'server', 'lease', 'token')
local cur = tonumber(c[1] or '0')
local expected = tonumber(ARGV[1])
if cur ~= expected or tonumber(ARGV[2]) <= expected then
  return {0, c[1] or '0', c[2], c[3], c[4], c[5]}
end
redis.call('HSET', KEYS[1], 'epoch', ARGV[2], 'c_epoch', ARGV[2], 'server', ARGV[3],
  'lease', ARGV[4], 'token', ARGV[5])
return {1, c[1] or '0', c[2], c[3], c[4], c[5]}
