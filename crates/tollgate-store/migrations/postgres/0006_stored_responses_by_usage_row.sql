-- A stored response is keyed by its usage row's id, not by (account_id, request_id): that pair
-- already has usage_log's unique index, and a second index on it cost every charged row a
-- random-key insert (plus ON CONFLICT's speculative insertion). A usage id is sequential, so its
-- index grows at its last page: about 12 µs less per row with a body in the usage writer's
-- batches (docs/BENCHMARKS.md). A replay finds the charged row by (account_id, request_id), then
-- its body by the row's id. No foreign key, as for usage_log's own references (0005).
CREATE TABLE stored_responses_by_usage (
    usage_id     BIGINT PRIMARY KEY,
    status       BIGINT NOT NULL,
    content_type TEXT NOT NULL,
    body         BYTEA NOT NULL,
    created_at   BIGINT NOT NULL
);
INSERT INTO stored_responses_by_usage (usage_id, status, content_type, body, created_at)
SELECT u.id, s.status, s.content_type, s.body, s.created_at
FROM stored_responses s
JOIN usage_log u ON u.account_id = s.account_id AND u.request_id = s.request_id AND u.status <> 'failed';
DROP TABLE stored_responses;
ALTER TABLE stored_responses_by_usage RENAME TO stored_responses;
ALTER INDEX stored_responses_by_usage_pkey RENAME TO stored_responses_pkey;
