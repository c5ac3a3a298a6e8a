-- CountLoginFailure. KEYS[1] the user's failure hash. ARGV[1] expected count, ARGV[2] now
-- (unix ms), ARGV[3] forget after (ms).
-- A record whose last failure is forget-after old counts as empty (the PEXPIRE below also
-- reclaims it, by Redis's clock). Adds one only if the count equals the expected one.
-- Returns {counted (1/0), count, last}.
local v = redis.call('HMGET', KEYS[1], 'count', 'last')
local count = tonumber(v[1]) or 0
local last = tonumber(v[2]) or 0
local now = tonumber(ARGV[2])
if count > 0 and last + tonumber(ARGV[3]) <= now then
  count = 0
  last = 0
end
if count ~= tonumber(ARGV[1]) then
  return {0, count, last}
end
count = count + 1
redis.call('HSET', KEYS[1], 'count', count, 'last', ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return {1, count, now}
