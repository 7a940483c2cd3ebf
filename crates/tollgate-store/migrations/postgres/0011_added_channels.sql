-- Channels an operator added through /internal/channels (issue 23): served beside the
-- configured channels of their model by every gateway (each reloads on the config
-- notification, kind `channel`). A configured channel of the same name wins over one here.
CREATE TABLE added_channels (
    model                   TEXT   NOT NULL,
    channel                 TEXT   NOT NULL,
    provider                TEXT   NOT NULL,
    -- NULL: the model's own upstream name.
    upstream_model          TEXT,
    priority                BIGINT NOT NULL,
    weight                  BIGINT NOT NULL CHECK (weight >= 1),
    concurrent_requests_max BIGINT CHECK (concurrent_requests_max >= 1),
    created_at              BIGINT NOT NULL,
    PRIMARY KEY (model, channel)
);

-- A key's own session lock, over the one of the model it calls (NULL: the model's).
ALTER TABLE api_keys ADD COLUMN session_lock TEXT CHECK (session_lock IN ('off', 'reject', 'wait'));
