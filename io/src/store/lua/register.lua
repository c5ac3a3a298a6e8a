-- RegisterAccount, the name part. KEYS[1] name record (hash) under the name's ASCII
-- lowercase form, so `Bob` and `bob` are one name; KEYS[2] user id counter; KEYS[3] the
-- record under the name as typed (where records written before names were case-insensitive
-- live until `cim admin migrate` moves them); all under the {names} tag. ARGV[1] password
-- hash, ARGV[2] the name as typed, ARGV[3] and ARGV[4] the `all` log's epoch and head when
-- the registration began (where the account starts reading `all`).
-- Returns {created (1/0), user id, password hash as stored, name as first typed,
-- all epoch, all seq, deleted (1/0)}. The id is only taken when the name is free, so a
-- refused name burns no id; a tombstone's name stays taken.
for _, key in ipairs({KEYS[1], KEYS[3]}) do
  local id = redis.call('HGET', key, 'user')
  if id then
    local stored = redis.call('HMGET', key, 'password_hash', 'name', 'all_epoch', 'all_seq',
      'deleted')
    return {0, id, stored[1] or '', stored[2] or ARGV[2], stored[3] or '0', stored[4] or '0',
      stored[5] and 1 or 0}
  end
end
local new = redis.call('INCR', KEYS[2])
redis.call('HSET', KEYS[1], 'user', new, 'password_hash', ARGV[1], 'name', ARGV[2],
  'all_epoch', ARGV[3], 'all_seq', ARGV[4])
return {1, new, ARGV[1], ARGV[2], ARGV[3], ARGV[4], 0}
