-- JoinGroup. KEYS[1] meta hash, KEYS[2] members hash. ARGV[1] user.
-- Returns the seq the user joined at (the head when first joined), or -1 if no such group.
-- A new member raises the membership's change count 'mv' (see append.lua) in this step.
if redis.call('EXISTS', KEYS[1]) == 0 then
  return -1
end
local joined = redis.call('HGET', KEYS[2], ARGV[1])
if joined then
  return tonumber(joined)
end
local head = redis.call('HGET', KEYS[1], 'head')
redis.call('HSET', KEYS[2], ARGV[1], head)
-- HGET and HSET rather than HINCRBY: the documented ACL users (deploy/README.md) have them.
redis.call('HSET', KEYS[1], 'mv', tonumber(redis.call('HGET', KEYS[1], 'mv') or '0') + 1)
return tonumber(head)
