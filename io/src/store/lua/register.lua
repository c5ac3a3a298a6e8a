-- RegisterAccount, the name part. KEYS[1] name record (hash) under the name's ASCII
-- lowercase form, so `Bob` and `bob` are one name; KEYS[2] user id counter; KEYS[3] the
-- record under the name as typed (where records written before names were case-insensitive
-- live); all under the {names} tag. ARGV[1] password hash, ARGV[2] the name as typed.
-- Returns {created (1/0), user id, password hash as stored, name as first typed}.
-- The id is only taken when the name is free, so a refused name burns no id.
for _, key in ipairs({KEYS[1], KEYS[3]}) do
  local id = redis.call('HGET', key, 'user')
  if id then
    local stored = redis.call('HMGET', key, 'password_hash', 'name')
    return {0, id, stored[1], stored[2] or ARGV[2]}
  end
end
local new = redis.call('INCR', KEYS[2])
redis.call('HSET', KEYS[1], 'user', new, 'password_hash', ARGV[1], 'name', ARGV[2])
return {1, new, ARGV[1], ARGV[2]}
