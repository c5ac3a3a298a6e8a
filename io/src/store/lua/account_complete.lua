-- RegisterAccount, the account part (incarnation.lua prepended), run after register.lua
-- from its reply. KEYS[1] account hash, KEYS[2] claim hash (same {u:<id>} tag). ARGV[1..4]
-- name, password hash, `all` epoch and seq as the reservation stored them; ARGV[5] '1' if
-- this registration created the name (register.lua answered created).
-- Field by field and only where missing (HSETNX): it also completes a registration whose
-- writer died between the two steps, and never undoes a password reset. Never called for a
-- tombstone, which must stay without a password.
-- The claim hash records in 'inc' that this incarnation vouches for its counter being 0
-- (docs/design.md, "Never the same name for two contents"): a first login that a restart
-- or promotion lost leaves no claim behind, and the counter would issue epoch 1 again; with
-- the stamp, claim_replace.lua finds another incarnation's 'inc' and raises the counter
-- first. Only by the registration that created the name: one completing an older
-- registration cannot know what was lost since.
for i, field in ipairs({'name', 'password_hash', 'all_epoch', 'all_seq'}) do
  redis.call('HSETNX', KEYS[1], field, ARGV[i])
end
if ARGV[5] == '1' then
  redis.call('HSETNX', KEYS[2], 'inc', node_incarnation())
end
return 1
