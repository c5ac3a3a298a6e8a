-- Migration to schema 2, one name record. KEYS[1] a record keyed by the name as typed
-- (written before names ignored case), KEYS[2] the record under the name's lowercase form,
-- KEYS[3] the conflicts hash; all {names}. ARGV[1] the name as typed, ARGV[2] lowercase.
-- Moves the record to its lowercase key. When both exist for different accounts (`Bob`
-- and `bob`, registered before names ignored case), the older account (lower id) keeps
-- the reservation; the newer one's record is dropped and the newer id is written to the
-- conflicts hash (id -> name) for the operator.
-- Returns {outcome, kept id, unreserved id}: 0 nothing to do, 1 moved, 2 duplicate of the
-- same account dropped, 3 conflict.
local typed = redis.call('HGET', KEYS[1], 'user')
if not typed then
  return {0, 0, 0}
end
local function move()
  local fields = redis.call('HGETALL', KEYS[1])
  redis.call('DEL', KEYS[2])
  redis.call('HSET', KEYS[2], unpack(fields))
  -- Records from before names ignored case hold no `name`: the key said it.
  redis.call('HSETNX', KEYS[2], 'name', ARGV[1])
  redis.call('DEL', KEYS[1])
end
local lower = redis.call('HGET', KEYS[2], 'user')
if not lower then
  move()
  return {1, typed, 0}
end
if lower == typed then
  redis.call('DEL', KEYS[1])
  return {2, typed, 0}
end
if tonumber(typed) < tonumber(lower) then
  redis.call('HSET', KEYS[3], lower, redis.call('HGET', KEYS[2], 'name') or ARGV[2])
  move()
  return {3, typed, lower}
end
redis.call('HSET', KEYS[3], typed, redis.call('HGET', KEYS[1], 'name') or ARGV[1])
redis.call('DEL', KEYS[1])
return {3, lower, typed}
