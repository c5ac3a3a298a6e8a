-- LoadClaim (incarnation.lua prepended). KEYS[1] claim hash. Read only.
-- Returns {counter, c_epoch, server, lease, token, secret, secret_exp, foreign}: the claim's
-- fields (nil when absent) and 1 if another Redis process wrote the claim ('inc' set and not
-- this node's run id: a restart or a promotion since, which may have lost later logins, so
-- the route lets a proven login take the claim over; see claim_replace.lua for the raise).
local c = redis.call('HMGET', KEYS[1], 'epoch', 'c_epoch', 'server', 'lease', 'token',
  'secret', 'secret_exp', 'inc')
local foreign = 0
if c[2] and c[8] and c[8] ~= node_incarnation() then
  foreign = 1
end
return {c[1], c[2], c[3], c[4], c[5], c[6], c[7], foreign}
