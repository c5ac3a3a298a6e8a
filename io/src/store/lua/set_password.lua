-- SetPassword. KEYS[1] account hash. ARGV[1] new password hash.
-- Only a live account (one with a password, not tombstoned) changes. Returns 1 if it did.
if redis.call('HEXISTS', KEYS[1], 'password_hash') == 0
  or redis.call('HEXISTS', KEYS[1], 'deleted') == 1 then
  return 0
end
redis.call('HSET', KEYS[1], 'password_hash', ARGV[1])
return 1
