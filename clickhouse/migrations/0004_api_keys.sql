-- 0004: API keys on the server, for setting key_store = 'clickhouse', so that every WatchLLM
-- process in front of one server or cluster knows the same keys. Only a SHA-256 of the secret
-- is stored. A revocation is a newer version of the key's row (ReplacingMergeTree on
-- updated_at); reads use FINAL.

CREATE TABLE IF NOT EXISTS api_keys (
    key_id String,
    project_id String,
    scope LowCardinality(String),
    secret_hash String,
    name String,
    created_at DateTime64(3, 'UTC'),
    revoked_at Nullable(DateTime64(3, 'UTC')),
    updated_at DateTime64(6, 'UTC')
) ENGINE = ReplacingMergeTree(updated_at)
ORDER BY key_id;
