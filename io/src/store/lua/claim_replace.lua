-- ReplaceClaim and ResumeClaim (incarnation.lua prepended). KEYS[1] claim hash, KEYS[2]
-- account hash (same {u:<id>} tag).
-- ARGV: expected, new epoch, server, lease_until, token hash, secret hash ('' = none),
-- secret expiry (unix ms), and for ResumeClaim the hash of the secret presented ('' for
-- ReplaceClaim): then the stored claim must still hold exactly that secret and the account
-- must not be a tombstone (its claim is released just after), or nothing is written;
-- [9] the caller's now (unix ms).
-- No claim epoch is issued twice (docs/design.md, "Never the same name for two contents"):
-- the claim hash records in 'inc' the run id of the process that wrote it. One another
-- process wrote may have lost later logins, whose epochs the counter no longer shows: the
-- counter first rises to max(counter + 1, now) (one login a millisecond per user never gets
-- there) and the answer is a lost race, which the caller retries against it. A claim
-- without 'inc' (written before the rule) is only stamped by its next write.
-- Returns {replaced (1/0), counter before, old c_epoch, server, lease, token, secret,
-- secret_exp} (nil fields when there was no claim). A tombstone's claim is answered without
-- its secret. Epochs are stored as the caller's canonical decimal strings.
local c = redis.call('HMGET', KEYS[1], 'epoch', 'c_epoch', 'server', 'lease', 'token',
  'secret', 'secret_exp', 'inc')
local counter = c[1] or '0'
if ARGV[8] ~= '' then
  if redis.call('HEXISTS', KEYS[2], 'deleted') == 1 then
    return {0, counter, c[2], c[3], c[4], c[5], false, false}
  end
  if c[6] ~= ARGV[8] then
    return {0, counter, c[2], c[3], c[4], c[5], c[6], c[7]}
  end
end
local inc = node_incarnation()
if c[8] and c[8] ~= inc then
  counter = string.format('%.0f', math.max(tonumber(counter) + 1, tonumber(ARGV[9])))
  redis.call('HSET', KEYS[1], 'epoch', counter, 'inc', inc)
  return {0, counter, c[2], c[3], c[4], c[5], c[6], c[7]}
end
local cur = tonumber(counter)
local expected = tonumber(ARGV[1])
if cur ~= expected or tonumber(ARGV[2]) <= expected then
  return {0, counter, c[2], c[3], c[4], c[5], c[6], c[7]}
end
redis.call('HSET', KEYS[1], 'epoch', ARGV[2], 'c_epoch', ARGV[2], 'server', ARGV[3],
  'lease', ARGV[4], 'token', ARGV[5], 'inc', inc)
if ARGV[6] ~= '' then
  redis.call('HSET', KEYS[1], 'secret', ARGV[6], 'secret_exp', ARGV[7])
else
  redis.call('HDEL', KEYS[1], 'secret', 'secret_exp')
end
return {1, counter, c[2], c[3], c[4], c[5], c[6], c[7]}
