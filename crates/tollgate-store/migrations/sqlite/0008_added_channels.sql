-- Channels an operator added through /internal/channels (see the PostgreSQL migration 0011).
CREATE TABLE added_channels (
    model                   TEXT    NOT NULL,
    channel                 TEXT    NOT NULL,
    provider                TEXT    NOT NULL,
    upstream_model          TEXT,
    priority                INTEGER NOT NULL,
    weight                  INTEGER NOT NULL CHECK (weight >= 1),
    concurrent_requests_max INTEGER CHECK (concurrent_requests_max >= 1),
    created_at              INTEGER NOT NULL,
    PRIMARY KEY (model, channel)
);

-- A key's own session lock, over the one of the model it calls (NULL: the model's).
ALTER TABLE api_keys ADD COLUMN session_lock TEXT CHECK (session_lock IN ('off', 'reject', 'wait'));
