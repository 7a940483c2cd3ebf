-- A charged request id is bound to the request it named: a retry is answered only when its key
-- and fingerprint (SHA-256 of the protocol, URL facts and body, hex of its first 16 bytes) match.
-- NULL for ids the gateway made and for rows written before this column: those are matched on
-- the key alone.
ALTER TABLE usage_log ADD COLUMN request_fingerprint TEXT;
