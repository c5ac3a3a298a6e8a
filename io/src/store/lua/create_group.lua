-- CreateGroup. KEYS[1] meta hash, KEYS[2] members hash. ARGV: owner, log epoch.
-- A group exists exactly when its log's meta does (both are created here, neither is
-- deleted). Returns 1 if created.
if redis.call('EXISTS', KEYS[1]) == 1 then
  return 0
end
redis.call('HSET', KEYS[1], 'epoch', ARGV[2], 'head', 0, 'first', 1, 'inc', node_incarnation())
redis.call('HSET', KEYS[2], ARGV[1], 0)
return 1
