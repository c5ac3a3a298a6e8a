-- ReleaseClaim. KEYS[1] claim hash, KEYS[2] route record. ARGV[1] epoch.
-- Deletes the claim (the counter stays), its resumption secret, and the route record only
-- if the stored claim has exactly this epoch, expired or not. Returns 1 if it deleted.
local ce = redis.call('HGET', KEYS[1], 'c_epoch')
if not ce or ce ~= ARGV[1] then
  return 0
end
redis.call('HDEL', KEYS[1], 'c_epoch', 'server', 'lease', 'token', 'secret', 'secret_exp')
-- The record's epoch is at most the claim's, so this never deletes a newer session's.
redis.call('DEL', KEYS[2])
return 1
