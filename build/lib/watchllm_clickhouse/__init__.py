"""ClickHouse SQL shipped with WatchLLM: `schema.sql` (the current schema, for reading) and
`migrations/NNNN_name.sql` (what is applied, once each, in order)."""
