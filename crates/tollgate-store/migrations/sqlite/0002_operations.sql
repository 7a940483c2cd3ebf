-- Ledger operations (as postgres/0002_operations.sql): reconciliation runs, periodic jobs under
-- a lease, per-period spend counters, low-balance thresholds, and the outbox.

CREATE TABLE reconciliation_log (
    id                INTEGER PRIMARY KEY AUTOINCREMENT,
    started_at        INTEGER NOT NULL,
    finished_at       INTEGER,
    accounts_checked  INTEGER NOT NULL DEFAULT 0,
    drifts_found      INTEGER NOT NULL DEFAULT 0,
    report            TEXT,
    fix               INTEGER NOT NULL DEFAULT 0,
    accounts_busy     INTEGER NOT NULL DEFAULT 0,
    accounts_repaired INTEGER NOT NULL DEFAULT 0,
    total_drift       INTEGER NOT NULL DEFAULT 0
);

CREATE TABLE job_leases (
    job        TEXT PRIMARY KEY,
    holder     TEXT NOT NULL,
    fence      INTEGER NOT NULL,
    expires_at INTEGER NOT NULL
);

CREATE TABLE job_runs (
    job          TEXT NOT NULL,
    period_start INTEGER NOT NULL,
    holder       TEXT NOT NULL,
    fence        INTEGER NOT NULL,
    started_at   INTEGER NOT NULL,
    finished_at  INTEGER,
    outcome      TEXT,
    PRIMARY KEY (job, period_start)
);

ALTER TABLE accounts ADD COLUMN low_balance_threshold INTEGER CHECK (low_balance_threshold >= 0);

CREATE TABLE spend_counters (
    scope      TEXT NOT NULL CHECK (scope IN ('account', 'key')),
    owner_id   TEXT NOT NULL,
    period     TEXT NOT NULL,
    requests   INTEGER NOT NULL,
    spent      INTEGER NOT NULL,
    updated_at INTEGER NOT NULL,
    PRIMARY KEY (scope, owner_id, period)
);

CREATE TABLE outbox (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    event_type      TEXT NOT NULL,
    account_id      TEXT NOT NULL,
    dedupe_key      TEXT NOT NULL UNIQUE,
    payload         TEXT NOT NULL,
    status          TEXT NOT NULL CHECK (status IN ('pending', 'delivered', 'failed')),
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_at INTEGER NOT NULL,
    delivered_at    INTEGER,
    last_error      TEXT,
    created_at      INTEGER NOT NULL
);
CREATE INDEX outbox_due ON outbox (status, next_attempt_at);

CREATE TABLE webhook_deliveries (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    outbox_id    INTEGER NOT NULL REFERENCES outbox (id),
    attempt      INTEGER NOT NULL,
    url          TEXT NOT NULL,
    status_code  INTEGER,
    error        TEXT,
    duration_ms  INTEGER NOT NULL,
    attempted_at INTEGER NOT NULL
);
CREATE INDEX webhook_deliveries_outbox ON webhook_deliveries (outbox_id);
