-- A channel's rate limits, as the upstream sets them for its credentials (issue 23): past
-- either, in the last minute, the channel is skipped like a full one. NULL: no limit.
ALTER TABLE added_channels ADD COLUMN requests_per_minute_max BIGINT CHECK (requests_per_minute_max >= 1);
ALTER TABLE added_channels ADD COLUMN tokens_per_minute_max BIGINT CHECK (tokens_per_minute_max >= 1);

-- Nothing reads upstream attempts by time: retention prunes them from the head of their key
-- (usage row id, attempt), which grows with time. The index cost every charge an entry.
DROP INDEX upstream_attempts_time;
