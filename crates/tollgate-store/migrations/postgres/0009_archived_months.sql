-- `tollgate archive` (docs/RETENTION.md): a month of usage rows exported to a file, verified,
-- then dropped. What the ledger keeps of it is enough to prove every balance and chain:
--
-- archived_runs: per account, each run of consecutive chain positions that were usage rows of
-- the archived month, as one chain entry (its first balance_before, last balance_after, Σ cost).
-- A run never spans a fund row or a row of another month, so the live rows and the runs
-- together still cover every position once.
CREATE TABLE archived_runs (
    account_id     TEXT NOT NULL,
    first_seq      BIGINT NOT NULL,
    last_seq       BIGINT NOT NULL,
    usage_rows     BIGINT NOT NULL CHECK (usage_rows = last_seq - first_seq + 1),
    cost           BIGINT NOT NULL CHECK (cost >= 0),
    balance_before BIGINT NOT NULL,
    balance_after  BIGINT NOT NULL CHECK (balance_after = balance_before - cost),
    month          TEXT NOT NULL,
    -- The times of the run's first and last rows: statements select runs by created_at as rows.
    created_at     BIGINT NOT NULL,
    last_at        BIGINT NOT NULL,
    PRIMARY KEY (account_id, first_seq)
);

-- Per account and archived month: what a statement of that month still shows.
CREATE TABLE archived_account_months (
    account_id          TEXT NOT NULL,
    month               TEXT NOT NULL,
    usage_rows          BIGINT NOT NULL,
    requests            BIGINT NOT NULL,
    input_tokens        BIGINT NOT NULL,
    cached_input_tokens BIGINT NOT NULL,
    cache_write_tokens  BIGINT NOT NULL,
    output_tokens       BIGINT NOT NULL,
    cost                BIGINT NOT NULL,
    PRIMARY KEY (account_id, month)
);

-- One row per archive file of a month (a month archived again holds rows written late).
-- complete = 0: the file is written and verified, its rows are being dropped (SQLite drops them
-- in chunks; an archive run that stopped there is resumed from the file by the next one).
CREATE TABLE archived_months (
    month       TEXT NOT NULL,
    archived_at BIGINT NOT NULL,
    usage_rows  BIGINT NOT NULL,
    cost        BIGINT NOT NULL,
    accounts    BIGINT NOT NULL,
    runs        BIGINT NOT NULL,
    file        TEXT NOT NULL,
    sha256      TEXT NOT NULL,
    complete    BIGINT NOT NULL CHECK (complete IN (0, 1)),
    PRIMARY KEY (month, file)
);

-- Every cost that ever left an account, live or archived: the I2 sums read this.
CREATE VIEW ledger_costs AS
    SELECT account_id, 1::BIGINT AS entries, cost, created_at FROM usage_log
    UNION ALL
    SELECT account_id, usage_rows, cost, created_at FROM archived_runs;
