--[[
Parks one entry of a shard's usage stream in the shard's dead-letter stream, in one atomic step:
the dead letter is added, the entry acknowledged and deleted from the usage stream together.
Apart, a crash between the steps lost the entry (acknowledged, never parked) or kept it in both
streams, where whoever sums what the streams still owe (`unlogged_charges`: reconciliation, its
fix, the stale release) counted the charge twice.

KEYS[1]  the shard's usage stream          KEYS[2]  the shard's dead-letter stream
         (both carry the shard's hash tag: one cluster slot)
ARGV[1]  the consumer group   ARGV[2]  the entry id   ARGV[3]  the reason
ARGV[4]  the event to keep; "" keeps the entry's own `event` field as it is
Reply: 1 if parked; 0 if the entry was no longer pending (another consumer acknowledged it
after its commit, so the ledger has it): nothing is parked then, and the entry is deleted.

Keeps: an entry is in exactly one place, the usage stream (owed) or the dead letters (parked),
never both and never neither, until the ledger has it.
--]]

local stream, dead_letters = KEYS[1], KEYS[2]
local group, entry_id, reason, event = ARGV[1], ARGV[2], ARGV[3], ARGV[4]

if redis.call('XACK', stream, group, entry_id) == 0 then
  redis.call('XDEL', stream, entry_id)
  return 0
end
if event == '' then
  local found = redis.call('XRANGE', stream, entry_id, entry_id)
  if found[1] then
    local fields = found[1][2]
    for index = 1, #fields, 2 do
      if fields[index] == 'event' then event = fields[index + 1] end
    end
  end
end
redis.call('XADD', dead_letters, '*', 'event', event, 'reason', reason, 'entry_id', entry_id)
redis.call('XDEL', stream, entry_id)
return 1
