-- SetPassword. KEYS[1] account hash, KEYS[2] claim hash (same {u:<id>} tag). ARGV[1] new
-- password hash.
-- Only a live account (one with a password, not tombstoned) changes; its resumption secret
-- is revoked with the old password (the session's claim stays). Returns 1 if it changed.
if redis.call('HEXISTS', KEYS[1], 'password_hash') == 0
  or redis.call('HEXISTS', KEYS[1], 'deleted') == 1 then
  return 0
end
redis.call('HSET', KEYS[1], 'password_hash', ARGV[1])
redis.call('HDEL', KEYS[2], 'secret', 'secret_exp')
return 1
