-- Ledger operations: reconciliation runs, periodic jobs under a lease, per-period spend
-- counters, low-balance thresholds, and the outbox of events told to the outside world.

ALTER TABLE reconciliation_log
    ADD COLUMN fix               BIGINT NOT NULL DEFAULT 0 CHECK (fix IN (0, 1)),
    ADD COLUMN accounts_busy     BIGINT NOT NULL DEFAULT 0,
    ADD COLUMN accounts_repaired BIGINT NOT NULL DEFAULT 0,
    ADD COLUMN total_drift       BIGINT NOT NULL DEFAULT 0;

-- One row per periodic job: who holds it, until when, and the fencing token of the holder.
CREATE TABLE job_leases (
    job        TEXT PRIMARY KEY,
    holder     TEXT NOT NULL,
    fence      BIGINT NOT NULL,
    expires_at BIGINT NOT NULL
);

-- One row per (job, period) that ran: the primary key makes a period run at most once.
CREATE TABLE job_runs (
    job          TEXT NOT NULL,
    period_start BIGINT NOT NULL,
    holder       TEXT NOT NULL,
    fence        BIGINT NOT NULL,
    started_at   BIGINT NOT NULL,
    finished_at  BIGINT,
    outcome      TEXT,
    PRIMARY KEY (job, period_start)
);

-- A balance below this (when set) sends one `balance.low` alert per crossing.
ALTER TABLE accounts ADD COLUMN low_balance_threshold BIGINT CHECK (low_balance_threshold >= 0);

-- Requests and spend per account and per key and period ('total', 'YYYY-MM', 'YYYY-MM-DD'),
-- maintained in the same transaction as the usage rows: the durable copy of the hot store's
-- quota and budget counters, and the base of key-budget alerts.
CREATE TABLE spend_counters (
    scope      TEXT NOT NULL CHECK (scope IN ('account', 'key')),
    owner_id   TEXT NOT NULL,
    period     TEXT NOT NULL,
    requests   BIGINT NOT NULL,
    spent      BIGINT NOT NULL,
    updated_at BIGINT NOT NULL,
    PRIMARY KEY (scope, owner_id, period)
);

-- Events for the outside world, written in the transaction of the money change they describe,
-- so a rolled-back change leaves none; the worker delivers them after commit.
CREATE TABLE outbox (
    id              BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    event_type      TEXT NOT NULL,
    account_id      TEXT NOT NULL,
    dedupe_key      TEXT NOT NULL UNIQUE,
    payload         TEXT NOT NULL,
    status          TEXT NOT NULL CHECK (status IN ('pending', 'delivered', 'failed')),
    attempts        BIGINT NOT NULL DEFAULT 0,
    next_attempt_at BIGINT NOT NULL,
    delivered_at    BIGINT,
    last_error      TEXT,
    created_at      BIGINT NOT NULL
);
CREATE INDEX outbox_due ON outbox (next_attempt_at) WHERE status = 'pending';

CREATE TABLE webhook_deliveries (
    id           BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    outbox_id    BIGINT NOT NULL REFERENCES outbox (id),
    attempt      BIGINT NOT NULL,
    url          TEXT NOT NULL,
    status_code  BIGINT,
    error        TEXT,
    duration_ms  BIGINT NOT NULL,
    attempted_at BIGINT NOT NULL
);
CREATE INDEX webhook_deliveries_outbox ON webhook_deliveries (outbox_id);
