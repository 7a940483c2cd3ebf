-- The embedded ledger. Money is INTEGER nano-units, times INTEGER Unix milliseconds.
-- Each account's fund and usage rows share one ledger_seq sequence (the audit chain, I4),
-- assigned under the account_balance row by the one writer SQLite allows at a time.

CREATE TABLE accounts (
    id                    TEXT PRIMARY KEY,
    kind                  TEXT NOT NULL CHECK (kind IN ('user', 'tenant')),
    name                  TEXT NOT NULL,
    customer_type         TEXT NOT NULL,
    status                TEXT NOT NULL CHECK (status IN ('active', 'suspended')),
    credit_limit          INTEGER NOT NULL CHECK (credit_limit >= 0),
    daily_request_quota   INTEGER CHECK (daily_request_quota >= 0),
    monthly_request_quota INTEGER CHECK (monthly_request_quota >= 0),
    created_at            INTEGER NOT NULL,
    updated_at            INTEGER NOT NULL
);

CREATE TABLE account_balance (
    account_id    TEXT PRIMARY KEY REFERENCES accounts (id),
    balance       INTEGER NOT NULL,
    last_fund_seq INTEGER NOT NULL,
    ledger_seq    INTEGER NOT NULL,
    updated_at    INTEGER NOT NULL
);

CREATE TABLE api_keys (
    id             TEXT PRIMARY KEY,
    account_id     TEXT NOT NULL REFERENCES accounts (id),
    name           TEXT NOT NULL,
    key_hash       TEXT NOT NULL UNIQUE,
    prefix         TEXT NOT NULL,
    status         TEXT NOT NULL CHECK (status IN ('active', 'revoked')),
    budget_daily   INTEGER,
    budget_monthly INTEGER,
    budget_total   INTEGER,
    rpm            INTEGER,
    tpm            INTEGER,
    allowed_models TEXT,
    expires_at     INTEGER,
    created_at     INTEGER NOT NULL,
    revoked_at     INTEGER
);
CREATE INDEX api_keys_account ON api_keys (account_id);

-- Price history: rows are never updated; the newest row of a triple is the current price and
-- its id is the price snapshot usage rows point at.
CREATE TABLE prices (
    id                    INTEGER PRIMARY KEY AUTOINCREMENT,
    provider              TEXT NOT NULL,
    model                 TEXT NOT NULL,
    customer_type         TEXT NOT NULL,
    input_per_mtok        INTEGER NOT NULL CHECK (input_per_mtok >= 0),
    output_per_mtok       INTEGER NOT NULL CHECK (output_per_mtok >= 0),
    cached_input_per_mtok INTEGER CHECK (cached_input_per_mtok >= 0),
    cache_write_per_mtok  INTEGER CHECK (cache_write_per_mtok >= 0),
    per_request           INTEGER NOT NULL CHECK (per_request >= 0),
    effective_from        INTEGER NOT NULL
);
CREATE INDEX prices_triple ON prices (provider, model, customer_type, id);

CREATE TABLE topup_records (
    id           TEXT PRIMARY KEY,
    account_id   TEXT NOT NULL REFERENCES accounts (id),
    amount       INTEGER NOT NULL CHECK (amount > 0),
    reference_id TEXT NOT NULL UNIQUE,
    status       TEXT NOT NULL CHECK (status IN ('pending', 'confirmed')),
    fund_seq     INTEGER,
    created_at   INTEGER NOT NULL,
    confirmed_at INTEGER
);

CREATE TABLE fund_transactions (
    seq            INTEGER PRIMARY KEY AUTOINCREMENT,
    account_id     TEXT NOT NULL REFERENCES accounts (id),
    kind           TEXT NOT NULL CHECK (kind IN ('deposit', 'refund', 'adjustment')),
    amount         INTEGER NOT NULL,
    balance_before INTEGER NOT NULL,
    balance_after  INTEGER NOT NULL CHECK (balance_after = balance_before + amount),
    ledger_seq     INTEGER NOT NULL,
    reference_id   TEXT NOT NULL,
    reason         TEXT,
    operator_id    TEXT,
    created_at     INTEGER NOT NULL,
    UNIQUE (kind, reference_id),
    UNIQUE (account_id, ledger_seq)
);

CREATE TABLE usage_log (
    id                  INTEGER PRIMARY KEY AUTOINCREMENT,
    request_id          TEXT NOT NULL,
    account_id          TEXT NOT NULL REFERENCES accounts (id),
    api_key_id          TEXT NOT NULL,
    provider            TEXT NOT NULL,
    model               TEXT NOT NULL,
    customer_type       TEXT NOT NULL,
    price_id            INTEGER REFERENCES prices (id),
    input_tokens        INTEGER NOT NULL,
    cached_input_tokens INTEGER NOT NULL,
    cache_write_tokens  INTEGER NOT NULL,
    output_tokens       INTEGER NOT NULL,
    reasoning_tokens    INTEGER NOT NULL,
    usage_source        TEXT NOT NULL,
    cost                INTEGER NOT NULL CHECK (cost >= 0),
    balance_before      INTEGER NOT NULL,
    balance_after       INTEGER NOT NULL CHECK (balance_after = balance_before - cost),
    ledger_seq          INTEGER NOT NULL,
    status              TEXT NOT NULL,
    latency_ms          INTEGER NOT NULL,
    created_at          INTEGER NOT NULL,
    UNIQUE (account_id, ledger_seq)
);
-- A request id is charged at most once per account (I1); failed attempts (cost 0) do not
-- occupy it, so a retry after a failure can be charged.
CREATE UNIQUE INDEX usage_log_charged_request ON usage_log (account_id, request_id) WHERE status <> 'failed';
CREATE INDEX usage_log_account_time ON usage_log (account_id, created_at);
CREATE INDEX usage_log_key_time ON usage_log (api_key_id, created_at);

-- Responses of charged non-streaming requests, replayed to retries.
CREATE TABLE stored_responses (
    account_id   TEXT NOT NULL,
    request_id   TEXT NOT NULL,
    status       INTEGER NOT NULL,
    content_type TEXT NOT NULL,
    body         BLOB NOT NULL,
    created_at   INTEGER NOT NULL,
    PRIMARY KEY (account_id, request_id)
);
