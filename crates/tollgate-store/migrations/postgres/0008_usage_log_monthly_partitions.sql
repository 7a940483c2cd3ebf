-- usage_log becomes a table partitioned by month (of created_at, UTC), so that a month can be
-- detached, exported and dropped (`tollgate archive`) instead of every index growing for ever
-- (docs/RETENTION.md). fund_transactions stays one table: one row per deposit, refund or
-- adjustment, orders of magnitude fewer than usage rows, and the anchor of every balance.
--
-- A unique index of a partitioned table must contain the partition key, so "a request id is
-- charged at most once per account" (I1) can no longer be usage_log's own index: it moves to
-- charged_requests, one row per charged (account, request id) with its usage row's id, written in
-- the same statement as the usage row. UNIQUE (account_id, ledger_seq) cannot stay either; the
-- positions are assigned under the account's balance row lock, and `tollgate verify` reports a
-- position repeated or skipped (I4).
--
-- Conversion of an existing database: the rows are copied into the partitions in this
-- migration's transaction; writers wait meanwhile (docs/RETENTION.md gives the measured rate).

CREATE TABLE charged_requests (
    account_id TEXT NOT NULL,
    request_id TEXT NOT NULL,
    usage_id   BIGINT NOT NULL,
    created_at BIGINT NOT NULL,
    PRIMARY KEY (account_id, request_id)
);

ALTER TABLE usage_log RENAME TO usage_log_unpartitioned;
-- Free the names (the copy is faster without them; the new table's are built after it).
ALTER TABLE usage_log_unpartitioned DROP CONSTRAINT usage_log_pkey;
ALTER TABLE usage_log_unpartitioned DROP CONSTRAINT usage_log_account_id_ledger_seq_key;
DROP INDEX usage_log_charged_request;
DROP INDEX usage_log_account_time;
DROP INDEX usage_log_account_page;
DROP INDEX usage_log_key_page;

-- Ids keep growing from where the old identity stopped (stored responses are keyed by them).
CREATE SEQUENCE usage_log_ids;
SELECT setval('usage_log_ids', COALESCE((SELECT MAX(id) FROM usage_log_unpartitioned), 0) + 1, false);

CREATE TABLE usage_log (
    id                  BIGINT NOT NULL DEFAULT nextval('usage_log_ids'),
    request_id          TEXT NOT NULL,
    account_id          TEXT NOT NULL,
    api_key_id          TEXT NOT NULL,
    provider            TEXT NOT NULL,
    model               TEXT NOT NULL,
    customer_type       TEXT NOT NULL,
    price_id            BIGINT,
    input_tokens        BIGINT NOT NULL,
    cached_input_tokens BIGINT NOT NULL,
    cache_write_tokens  BIGINT NOT NULL,
    output_tokens       BIGINT NOT NULL,
    reasoning_tokens    BIGINT NOT NULL,
    usage_source        TEXT NOT NULL,
    cost                BIGINT NOT NULL CHECK (cost >= 0),
    balance_before      BIGINT NOT NULL,
    balance_after       BIGINT NOT NULL CHECK (balance_after = balance_before - cost),
    ledger_seq          BIGINT NOT NULL,
    status              TEXT NOT NULL,
    latency_ms          BIGINT NOT NULL,
    created_at          BIGINT NOT NULL,
    request_fingerprint TEXT
) PARTITION BY RANGE (created_at);
ALTER SEQUENCE usage_log_ids OWNED BY usage_log.id;

-- Rows of a month without a partition (the `partitions` job not run for months, or a clock far
-- ahead) land here rather than fail; making that month's partition moves them out.
CREATE TABLE usage_log_default PARTITION OF usage_log DEFAULT;

-- The partition of the month starting at `month_start` (named usage_log_YYYY_MM), made if
-- missing; true when made. Writers wait while it is made (SHARE ROW EXCLUSIVE on usage_log):
-- the month's rows, if any reached the default partition, move into it in the same transaction,
-- so no row is ever in two places or in none. The `partitions` job calls it ahead of time.
CREATE FUNCTION tollgate_usage_partition(month_start DATE) RETURNS BOOLEAN
LANGUAGE plpgsql AS $$
DECLARE
    partition_name TEXT := format('usage_log_%s', to_char(month_start, 'YYYY_MM'));
    lower_ms BIGINT := (EXTRACT(EPOCH FROM (month_start::TIMESTAMP AT TIME ZONE 'UTC')) * 1000)::BIGINT;
    upper_ms BIGINT := (EXTRACT(EPOCH FROM ((month_start + INTERVAL '1 month') AT TIME ZONE 'UTC')) * 1000)::BIGINT;
BEGIN
    IF EXTRACT(DAY FROM month_start) <> 1 THEN
        RAISE EXCEPTION 'tollgate_usage_partition: % is not the first day of a month', month_start;
    END IF;
    IF to_regclass(partition_name) IS NOT NULL THEN
        RETURN false;
    END IF;
    LOCK TABLE usage_log IN SHARE ROW EXCLUSIVE MODE;
    IF to_regclass(partition_name) IS NOT NULL THEN
        RETURN false;
    END IF;
    EXECUTE format('CREATE TABLE %I (LIKE usage_log INCLUDING DEFAULTS INCLUDING CONSTRAINTS)', partition_name);
    EXECUTE format(
        'WITH moved AS (DELETE FROM usage_log_default WHERE created_at >= %s AND created_at < %s RETURNING *) INSERT INTO %I SELECT * FROM moved',
        lower_ms, upper_ms, partition_name);
    EXECUTE format('ALTER TABLE usage_log ATTACH PARTITION %I FOR VALUES FROM (%s) TO (%s)', partition_name, lower_ms, upper_ms);
    RETURN true;
END
$$;

-- A partition for every month the old table has rows in, and for this month and the next two.
DO $$
DECLARE
    first_day DATE;
BEGIN
    FOR first_day IN
        SELECT DISTINCT date_trunc('month', to_timestamp(floor(created_at / 1000.0)::DOUBLE PRECISION) AT TIME ZONE 'UTC')::DATE
        FROM usage_log_unpartitioned
        UNION
        SELECT (date_trunc('month', now() AT TIME ZONE 'UTC') + make_interval(months => ahead))::DATE FROM generate_series(0, 2) AS ahead
    LOOP
        PERFORM tollgate_usage_partition(first_day);
    END LOOP;
END
$$;

INSERT INTO usage_log (id, request_id, account_id, api_key_id, provider, model, customer_type, price_id,
    input_tokens, cached_input_tokens, cache_write_tokens, output_tokens, reasoning_tokens, usage_source,
    cost, balance_before, balance_after, ledger_seq, status, latency_ms, created_at, request_fingerprint)
SELECT id, request_id, account_id, api_key_id, provider, model, customer_type, price_id,
    input_tokens, cached_input_tokens, cache_write_tokens, output_tokens, reasoning_tokens, usage_source,
    cost, balance_before, balance_after, ledger_seq, status, latency_ms, created_at, request_fingerprint
FROM usage_log_unpartitioned;

INSERT INTO charged_requests (account_id, request_id, usage_id, created_at)
SELECT account_id, request_id, id, created_at FROM usage_log_unpartitioned WHERE status <> 'failed';

DROP TABLE usage_log_unpartitioned;

-- The indexes, built once the rows are in (each partition gets its own).
ALTER TABLE usage_log ADD CONSTRAINT usage_log_pkey PRIMARY KEY (id, created_at);
CREATE INDEX usage_log_account_time ON usage_log (account_id, created_at);
CREATE INDEX usage_log_account_page ON usage_log (account_id, id);
CREATE INDEX usage_log_key_page ON usage_log (api_key_id, id);
