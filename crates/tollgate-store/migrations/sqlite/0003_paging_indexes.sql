-- Index review (docs/RETENTION.md): transaction pages run newest first by id, per account or per
-- key. From an index on (account_id, created_at) PostgreSQL must sort every row of the account
-- to return one page; with (owner, id) a page is a short backward index scan at any size.
CREATE INDEX usage_log_account_page ON usage_log (account_id, id);
DROP INDEX usage_log_key_time;
CREATE INDEX usage_log_key_page ON usage_log (api_key_id, id);
