-- LeaveGroup, and an account deletion's leaving of each group. KEYS[1] meta hash, KEYS[2]
-- members hash. ARGV[1] user. Returns 1 if the user was a member.
-- A removal raises the membership's change count 'mv' (see append.lua) in this step, so no
-- append after it can confirm a member list that still holds the user.
local removed = redis.call('HDEL', KEYS[2], ARGV[1])
if removed == 1 and redis.call('EXISTS', KEYS[1]) == 1 then
  -- HGET and HSET rather than HINCRBY: the documented ACL users (deploy/README.md) have them.
  redis.call('HSET', KEYS[1], 'mv', tonumber(redis.call('HGET', KEYS[1], 'mv') or '0') + 1)
end
return removed
