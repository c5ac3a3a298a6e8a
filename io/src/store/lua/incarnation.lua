-- Prepended to every script that creates, serves or appends to a conversation's log (append,
-- read, create_group): the lost-tail rule of docs/design.md ("Never the same name for two
-- contents").
--
-- A log's meta hash records in 'inc' the run id of the Redis process that last wrote or served
-- it. Redis draws a new run id at every process start, and a promoted replica has its own. So
-- a log whose 'inc' is another process's may have lost writes that clients already read (an
-- AOF that lost its last second, a replica that lagged its dead master): its next seqs could
-- name other contents than the ones clients hold under the same (log epoch, seq). Such a log
-- moves to a fresh log epoch before anything is served or appended; its surviving messages
-- keep their seqs, and the move says what it carried over (settle_log). Conservative: a
-- restart that lost nothing moves the log too, and clients continue across it.
-- Script effects replication (the only mode in Redis 7) sends replicas the value written, not
-- the INFO call, so a replica holds its master's run id, not its own.
local function node_incarnation()
  local info = redis.call('INFO', 'server')
  -- A plain find: a pattern match over INFO's kilobyte costs more.
  local at = string.find(info, 'run_id:', 1, true)
  return string.sub(info, at + 7, at + 46)
end

-- The log epoch to serve for the log whose meta hash is `meta_key` and whose stored epoch is
-- `epoch` (nil: no log, nothing to settle), moving it to `fresh` if another process last
-- wrote it. A move records what it carried over: 'cf_epoch' the epoch it moved from and
-- 'cf_n' the head seq it still had (seqs 1..cf_n name the same messages under both epochs;
-- a client at (cf_epoch, c) with c <= cf_n continues at c, one past it lost c - cf_n).
-- A log without 'inc' (from before the rule) is only stamped.
local function settle_log(meta_key, epoch, fresh)
  if not epoch then
    return epoch
  end
  local inc = node_incarnation()
  local stamped = redis.call('HGET', meta_key, 'inc')
  if stamped == inc then
    return epoch
  end
  if stamped and fresh ~= epoch then
    local head = redis.call('HGET', meta_key, 'head') or '0'
    redis.call('HSET', meta_key, 'epoch', fresh, 'inc', inc, 'cf_epoch', epoch, 'cf_n', head)
    epoch = fresh
  else
    redis.call('HSET', meta_key, 'inc', inc)
  end
  return epoch
end
