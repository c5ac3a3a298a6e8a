-- DeleteAccount, the name part. KEYS[1] the name record under its lowercase form, KEYS[2]
-- under the name as typed (a record not migrated yet), both {names}. ARGV[1] user id,
-- ARGV[2] now. Marks the record that belongs to this user deleted and drops its password
-- hash (so an interrupted registration's completion cannot give the account one back).
-- The name stays reserved. Returns how many records it marked.
local marked = 0
for _, key in ipairs({KEYS[1], KEYS[2]}) do
  if redis.call('HGET', key, 'user') == ARGV[1] then
    redis.call('HSET', key, 'deleted', ARGV[2])
    redis.call('HDEL', key, 'password_hash')
    marked = marked + 1
  end
end
return marked
