-- A channel's rate limits (see the PostgreSQL migration 0012). NULL: no limit.
ALTER TABLE added_channels ADD COLUMN requests_per_minute_max BIGINT CHECK (requests_per_minute_max >= 1);
ALTER TABLE added_channels ADD COLUMN tokens_per_minute_max BIGINT CHECK (tokens_per_minute_max >= 1);

-- Nothing reads upstream attempts by time: retention prunes them from the head of their key
-- (usage row id, attempt), which grows with time. The index cost every charge an entry.
DROP INDEX upstream_attempts_time;
