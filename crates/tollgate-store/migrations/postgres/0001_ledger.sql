-- The production ledger (PostgreSQL). Money is BIGINT nano-units, times BIGINT Unix milliseconds.
-- Each account's fund and usage rows share one ledger_seq sequence (the audit chain, I4),
-- assigned under the account_balance row lock (SELECT … FOR UPDATE).

CREATE TABLE accounts (
    id                    TEXT PRIMARY KEY,
    kind                  TEXT NOT NULL CHECK (kind IN ('user', 'tenant')),
    name                  TEXT NOT NULL,
    customer_type         TEXT NOT NULL,
    status                TEXT NOT NULL CHECK (status IN ('active', 'suspended')),
    credit_limit          BIGINT NOT NULL CHECK (credit_limit >= 0),
    daily_request_quota   BIGINT CHECK (daily_request_quota >= 0),
    monthly_request_quota BIGINT CHECK (monthly_request_quota >= 0),
    created_at            BIGINT NOT NULL,
    updated_at            BIGINT NOT NULL
);

CREATE TABLE account_balance (
    account_id    TEXT PRIMARY KEY REFERENCES accounts (id),
    balance       BIGINT NOT NULL,
    last_fund_seq BIGINT NOT NULL,
    ledger_seq    BIGINT NOT NULL,
    updated_at    BIGINT NOT NULL
);

CREATE TABLE api_keys (
    id             TEXT PRIMARY KEY,
    account_id     TEXT NOT NULL REFERENCES accounts (id),
    name           TEXT NOT NULL,
    key_hash       TEXT NOT NULL UNIQUE,
    prefix         TEXT NOT NULL,
    status         TEXT NOT NULL CHECK (status IN ('active', 'revoked')),
    budget_daily   BIGINT,
    budget_monthly BIGINT,
    budget_total   BIGINT,
    rpm            BIGINT,
    tpm            BIGINT,
    allowed_models TEXT,
    expires_at     BIGINT,
    created_at     BIGINT NOT NULL,
    revoked_at     BIGINT
);
CREATE INDEX api_keys_account ON api_keys (account_id);

-- Price history: rows are never updated; the newest row of a triple is the current price and
-- its id is the price snapshot usage rows point at.
CREATE TABLE prices (
    id                    BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    provider              TEXT NOT NULL,
    model                 TEXT NOT NULL,
    customer_type         TEXT NOT NULL,
    input_per_mtok        BIGINT NOT NULL CHECK (input_per_mtok >= 0),
    output_per_mtok       BIGINT NOT NULL CHECK (output_per_mtok >= 0),
    cached_input_per_mtok BIGINT CHECK (cached_input_per_mtok >= 0),
    cache_write_per_mtok  BIGINT CHECK (cache_write_per_mtok >= 0),
    per_request           BIGINT NOT NULL CHECK (per_request >= 0),
    effective_from        BIGINT NOT NULL
);
CREATE INDEX prices_triple ON prices (provider, model, customer_type, id);

CREATE TABLE topup_records (
    id           TEXT PRIMARY KEY,
    account_id   TEXT NOT NULL REFERENCES accounts (id),
    amount       BIGINT NOT NULL CHECK (amount > 0),
    reference_id TEXT NOT NULL UNIQUE,
    status       TEXT NOT NULL CHECK (status IN ('pending', 'confirmed')),
    fund_seq     BIGINT,
    created_at   BIGINT NOT NULL,
    confirmed_at BIGINT
);

CREATE TABLE fund_transactions (
    seq            BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    account_id     TEXT NOT NULL REFERENCES accounts (id),
    kind           TEXT NOT NULL CHECK (kind IN ('deposit', 'refund', 'adjustment')),
    amount         BIGINT NOT NULL,
    balance_before BIGINT NOT NULL,
    balance_after  BIGINT NOT NULL CHECK (balance_after = balance_before + amount),
    ledger_seq     BIGINT NOT NULL,
    reference_id   TEXT NOT NULL,
    reason         TEXT,
    operator_id    TEXT,
    created_at     BIGINT NOT NULL,
    UNIQUE (kind, reference_id),
    UNIQUE (account_id, ledger_seq)
);

CREATE TABLE usage_log (
    id                  BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    request_id          TEXT NOT NULL,
    account_id          TEXT NOT NULL REFERENCES accounts (id),
    api_key_id          TEXT NOT NULL,
    provider            TEXT NOT NULL,
    model               TEXT NOT NULL,
    customer_type       TEXT NOT NULL,
    price_id            BIGINT REFERENCES prices (id),
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
    status       BIGINT NOT NULL,
    content_type TEXT NOT NULL,
    body         BYTEA NOT NULL,
    created_at   BIGINT NOT NULL,
    PRIMARY KEY (account_id, request_id)
);

-- One row per reconciliation run (filled by the reconciliation job).
CREATE TABLE reconciliation_log (
    id               BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    started_at       BIGINT NOT NULL,
    finished_at      BIGINT,
    accounts_checked BIGINT NOT NULL DEFAULT 0,
    drifts_found     BIGINT NOT NULL DEFAULT 0,
    report           TEXT
);
