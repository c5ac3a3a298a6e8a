-- RegisterAccount, the name part. KEYS[1] name record (hash), KEYS[2] user id counter
-- (both under the {names} tag). ARGV[1] password hash.
-- Returns {created (1/0), user id, password hash as stored}.
-- The id is only taken when the name is free, so a refused name burns no id.
local id = redis.call('HGET', KEYS[1], 'user')
if id then
  return {0, id, redis.call('HGET', KEYS[1], 'password_hash')}
end
local new = redis.call('INCR', KEYS[2])
redis.call('HSET', KEYS[1], 'user', new, 'password_hash', ARGV[1])
return {1, new, ARGV[1]}
