-- Charging in the ledger while the hot store is unreachable (degradation.hot_store_down =
-- "charge_ledger"; crates/tollgate-store/src/ledger_charging.rs).

-- Holds placed by authorize in the ledger; a settle or void removes its own, expired ones are
-- released by the sweeper (and ignored by authorize).
CREATE TABLE ledger_holds (
    account_id  TEXT NOT NULL REFERENCES accounts (id),
    api_key_id  TEXT NOT NULL,
    request_id  TEXT NOT NULL,
    amount      BIGINT NOT NULL CHECK (amount >= 0),
    expires_at  BIGINT NOT NULL,
    PRIMARY KEY (account_id, request_id)
);

-- Accounts charged in the ledger: their hot-store state misses those charges, so the hot store
-- must not serve them until they are unloaded from it (and so reloaded from the ledger).
CREATE TABLE hot_stale_accounts (
    account_id  TEXT PRIMARY KEY REFERENCES accounts (id),
    marked_at   BIGINT NOT NULL
);
