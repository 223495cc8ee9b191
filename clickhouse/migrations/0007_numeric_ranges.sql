-- 0007: sums that no number of events can wrap, and figures that rows stored before the
-- schema's numeric ranges (watchllm_ext/schema.py, docs/EVENTS.md) cannot break.
--
-- The rollup's sums become UInt128: every summed value is below 2^64 and a count below 2^64,
-- so a sum stays below 2^128 (as UInt64, 18,447 events at the largest cost, 1e15 nano-USD,
-- wrapped it). The traces view clamps cost and latency to the ranges before converting them
-- to integers, as analytics/queries.py does: a cost of 1.7e308 stored before made the
-- conversion fail, a latency of 1e20 made the end of a run negative. Hours holding such rows
-- are marked, so the rollup recomputes them with the clamps.

ALTER TABLE hourly_usage_by_project
    MODIFY COLUMN tokens_input UInt128,
    MODIFY COLUMN tokens_output UInt128,
    MODIFY COLUMN cost_nanousd UInt128,
    MODIFY COLUMN latency_sum_us UInt128;

CREATE OR REPLACE VIEW traces AS
SELECT
    project_id,
    run_id,
    min(timestamp) AS start_time,
    max(timestamp + toIntervalMillisecond(toInt64(least(greatest(ifNull(latency_ms, 0), 0), 2592000000.0))))
        AS end_time,
    count() AS event_count,
    countIf(event_type = 'error' OR ifNull(status, 'success') NOT IN ('success', 'warning'))
        AS error_count,
    -- integer nano-USD: the order of addition cannot change the sum
    sum(toUInt128(toUInt64(round(least(greatest(ifNull(cost_estimate_usd, 0), 0), 1000000.0) * 1e9)))) / 1e9
        AS cost_usd,
    sum(toUInt128(ifNull(tokens_input, 0))) AS tokens_input,
    sum(toUInt128(ifNull(tokens_output, 0))) AS tokens_output
FROM events FINAL
GROUP BY project_id, run_id;

INSERT INTO rollup_marks
SELECT project_id, toStartOfHour(timestamp) AS hour, now64(6, 'UTC') AS marked_at
FROM events
WHERE cost_estimate_usd > 1000000.0 OR latency_ms > 2592000000.0
GROUP BY project_id, hour;
