-- The usage writer checks each batch's accounts and prices once per batch: the accounts are the
-- balance rows it locks, the prices one lookup of the batch's distinct ids (record_usage_in).
-- The per-row foreign-key triggers repeated those checks for every row, each taking a KEY SHARE
-- lock on the same account and price rows: about a third of PostgreSQL's time per inserted usage
-- row. No statement deletes an account or a price, so the references cannot dangle later.
ALTER TABLE usage_log DROP CONSTRAINT usage_log_account_id_fkey;
ALTER TABLE usage_log DROP CONSTRAINT usage_log_price_id_fkey;
