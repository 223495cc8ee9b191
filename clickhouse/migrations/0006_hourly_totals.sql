-- 0006: hourly_totals_by_project, one row per project and hour with the states that do not
-- add up across the groups of hourly_usage_by_project: distinct runs and users, and the
-- latency sketch of prompt calls. Stats over 30 days then merge ~720 states instead of
-- ~24,000 (one per hour, model, type and status), where a run or a user appears in many.
-- Computed with, and just before, the hour's hourly_usage_by_project rows (analytics/rollup.py)
-- and read only for the hours that table says are clean.

CREATE TABLE IF NOT EXISTS hourly_totals_by_project (
    project_id LowCardinality(String),
    hour DateTime('UTC'),
    call_latency AggregateFunction(quantilesDD(0.01, 0.5, 0.9, 0.95, 0.99), Nullable(Float64)),
    runs AggregateFunction(uniq, String),
    users AggregateFunction(uniq, Nullable(String)),
    computed_at DateTime64(6, 'UTC')
) ENGINE = ReplacingMergeTree(computed_at)
ORDER BY (project_id, hour);

-- Hours stored before this migration, from the deduplicated events (an hour computed now is
-- at least as recent as its hourly_usage_by_project rows).
INSERT INTO hourly_totals_by_project
SELECT
    project_id,
    toStartOfHour(timestamp) AS hour,
    quantilesDDState(0.01, 0.5, 0.9, 0.95, 0.99)(if(event_type = 'prompt_call', latency_ms, NULL)),
    uniqState(run_id),
    uniqState(user_id),
    now64(6, 'UTC')
FROM events FINAL
GROUP BY project_id, hour;
