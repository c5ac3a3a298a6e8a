-- DeleteAccount, the account part. KEYS[1] account hash. ARGV[1] now (unix ms).
-- Marks the account deleted and drops its password (so no code, old or new, can log in
-- with it); the name and the `all` start stay, for display. Returns {status, name}:
-- 0 no such account (name nil), 1 deleted now, 2 already deleted.
local name = redis.call('HGET', KEYS[1], 'name')
if not name then
  return {0, false}
end
if redis.call('HEXISTS', KEYS[1], 'deleted') == 1 then
  return {2, name}
end
redis.call('HSET', KEYS[1], 'deleted', ARGV[1])
redis.call('HDEL', KEYS[1], 'password_hash')
return {1, name}
