-- Every upstream attempt of a request (issue 23); see the PostgreSQL migration 0010.
CREATE TABLE upstream_attempts (
    usage_id            INTEGER NOT NULL,
    attempt             INTEGER NOT NULL CHECK (attempt >= 1),
    account_id          TEXT    NOT NULL,
    request_id          TEXT    NOT NULL,
    channel             TEXT    NOT NULL,
    provider            TEXT    NOT NULL,
    upstream_model      TEXT    NOT NULL,
    status_code         INTEGER,
    served              INTEGER NOT NULL CHECK (served IN (0, 1)),
    error               TEXT,
    latency_ms          INTEGER NOT NULL CHECK (latency_ms >= 0),
    first_byte_ms       INTEGER,
    input_tokens        INTEGER,
    cached_input_tokens INTEGER,
    cache_write_tokens  INTEGER,
    output_tokens       INTEGER,
    reasoning_tokens    INTEGER,
    created_at          INTEGER NOT NULL,
    PRIMARY KEY (usage_id, attempt)
) WITHOUT ROWID;
CREATE INDEX upstream_attempts_request ON upstream_attempts (account_id, request_id);
CREATE INDEX upstream_attempts_time ON upstream_attempts (created_at);

-- What an operator set through /internal/channels (see the PostgreSQL migration 0010).
CREATE TABLE channel_states (
    model      TEXT    NOT NULL,
    channel    TEXT    NOT NULL,
    enabled    INTEGER NOT NULL CHECK (enabled IN (0, 1)),
    reason     TEXT,
    updated_at INTEGER NOT NULL,
    PRIMARY KEY (model, channel)
);
