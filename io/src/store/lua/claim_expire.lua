-- ExpireClaim. KEYS[1] claim hash, KEYS[2] route record (same {u:<id>} tag). ARGV[1] epoch.
-- Only if the stored claim has exactly this epoch, expired or not: its lease ends now (0)
-- and the route record is deleted; the claim, its resume token and its resumption secret
-- stay (a server's cleanup of a closed connection: the client resumes without the
-- password). Returns 1 if it matched.
local ce = redis.call('HGET', KEYS[1], 'c_epoch')
if not ce or ce ~= ARGV[1] then
  return 0
end
redis.call('HSET', KEYS[1], 'lease', '0')
-- The record's epoch is at most the claim's, so this never deletes a newer session's.
redis.call('DEL', KEYS[2])
return 1
