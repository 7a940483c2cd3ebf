-- Every upstream attempt of a request (issue 23): the channel, how it answered, how fast, and
-- the usage the upstream reported. Written in the statement that writes the request's usage
-- row, keyed by that row's id. The served attempt of a charged request is the customer's; the
-- others failed before any byte reached the client and are the operator's cost.
CREATE TABLE upstream_attempts (
    usage_id            BIGINT   NOT NULL,
    attempt             BIGINT   NOT NULL CHECK (attempt >= 1),
    account_id          TEXT     NOT NULL,
    request_id          TEXT     NOT NULL,
    channel             TEXT     NOT NULL,
    provider            TEXT     NOT NULL,
    upstream_model      TEXT     NOT NULL,
    status_code         BIGINT,
    served              BOOLEAN  NOT NULL,
    error               TEXT,
    latency_ms          BIGINT   NOT NULL CHECK (latency_ms >= 0),
    first_byte_ms       BIGINT,
    -- The upstream's own report, when it made one (all five or none).
    input_tokens        BIGINT,
    cached_input_tokens BIGINT,
    cache_write_tokens  BIGINT,
    output_tokens       BIGINT,
    reasoning_tokens    BIGINT,
    created_at          BIGINT   NOT NULL,
    PRIMARY KEY (usage_id, attempt)
);
CREATE INDEX upstream_attempts_request ON upstream_attempts (account_id, request_id);
CREATE INDEX upstream_attempts_time ON upstream_attempts (created_at);

-- What an operator set through /internal/channels: a channel disabled or enabled again, over
-- its configuration, for every gateway (each reloads on the config notification).
CREATE TABLE channel_states (
    model      TEXT    NOT NULL,
    channel    TEXT    NOT NULL,
    enabled    BOOLEAN NOT NULL,
    reason     TEXT,
    updated_at BIGINT  NOT NULL,
    PRIMARY KEY (model, channel)
);
