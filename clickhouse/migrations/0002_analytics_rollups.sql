-- 0002: hourly_usage_by_project, the rollup that stats and timeseries read for whole hours.
--
-- Exact under duplicate delivery: rows are not summed as events arrive; an hour is
-- recomputed from the deduplicated events (FINAL) once it is complete, and again whenever
-- events for it arrive later. rollup_marks records, per project and hour, when events last
-- arrived; an hour whose last mark is newer than its rollup is read from the raw table.
-- Counts and sums are exact (cost in nano-USD and latency in microseconds, as integers, so
-- that the order of addition cannot change a sum); percentiles are DDSketch (1% relative accuracy) and distinct
-- counts `uniq` (approximate above 65,536): both merge deterministically, so a rollup
-- answer equals the raw answer on the same data.

CREATE TABLE IF NOT EXISTS hourly_usage_by_project (
    project_id LowCardinality(String),
    hour DateTime('UTC'),
    model LowCardinality(String),
    event_type LowCardinality(String),
    status LowCardinality(String),
    events UInt64,
    tokens_input UInt64,
    tokens_output UInt64,
    cost_nanousd UInt64,
    latency_sum_us UInt64,
    latency_count UInt64,
    latency_quantiles AggregateFunction(quantilesDD(0.01, 0.5, 0.9, 0.95, 0.99), Nullable(Float64)),
    runs AggregateFunction(uniq, String),
    users AggregateFunction(uniq, Nullable(String)),
    computed_at DateTime64(6, 'UTC')
) ENGINE = ReplacingMergeTree(computed_at)
ORDER BY (project_id, hour, model, event_type, status);

CREATE TABLE IF NOT EXISTS rollup_marks (
    project_id LowCardinality(String),
    hour DateTime('UTC'),
    marked_at DateTime64(6, 'UTC')
) ENGINE = ReplacingMergeTree(marked_at)
ORDER BY (project_id, hour);

CREATE MATERIALIZED VIEW IF NOT EXISTS rollup_marks_mv TO rollup_marks AS
SELECT project_id, toStartOfHour(timestamp) AS hour, now64(6, 'UTC') AS marked_at
FROM events
GROUP BY project_id, hour;

-- Hours that got events before this migration get their marks now, so they are read raw
-- until the rollup has computed them.
INSERT INTO rollup_marks
SELECT project_id, toStartOfHour(timestamp) AS hour, now64(6, 'UTC') AS marked_at
FROM events
GROUP BY project_id, hour;
