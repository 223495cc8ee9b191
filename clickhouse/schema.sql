-- The current WatchLLM schema in one file, for reading. What is applied is
-- migrations/NNNN_*.sql; tests/test_store.py checks that this file gives the same tables.

CREATE TABLE IF NOT EXISTS events (
    project_id LowCardinality(String),
    event_id String,
    event_type LowCardinality(String),
    run_id String,
    timestamp DateTime64(3, 'UTC'),
    parent_event_id Nullable(String),
    user_id Nullable(String),
    session_id Nullable(String),
    tags Array(String),
    release Nullable(String),
    env LowCardinality(String),
    client_hostname Nullable(String),
    client_sdk_version Nullable(String),
    client_platform Nullable(String),
    metadata String CODEC(ZSTD(3)),
    -- prompt_call
    prompt Nullable(String) CODEC(ZSTD(3)),
    model LowCardinality(Nullable(String)),
    provider LowCardinality(Nullable(String)),
    tokens_input Nullable(UInt32),
    tokens_output Nullable(UInt32),
    cost_estimate_usd Nullable(Float64),
    cost_source LowCardinality(Nullable(String)),
    response Nullable(String) CODEC(ZSTD(3)),
    response_metadata Nullable(String) CODEC(ZSTD(3)),
    tool_call_count UInt16,
    -- prompt_call, tool_call and agent_step
    status LowCardinality(Nullable(String)),
    latency_ms Nullable(Float64),
    -- prompt_call, tool_call and error
    error_message Nullable(String),
    -- tool_call
    tool_name Nullable(String),
    tool_input Nullable(String) CODEC(ZSTD(3)),
    tool_output Nullable(String) CODEC(ZSTD(3)),
    -- agent_step
    step_number Nullable(UInt32),
    step_name Nullable(String),
    reasoning Nullable(String) CODEC(ZSTD(3)),
    action Nullable(String) CODEC(ZSTD(3)),
    observation Nullable(String) CODEC(ZSTD(3)),
    -- error
    error_type Nullable(String),
    stack_trace Nullable(String) CODEC(ZSTD(3)),
    -- assertion_failed (expected and actual as JSON text)
    assertion_name Nullable(String),
    expected Nullable(String),
    actual Nullable(String),
    -- assertion_failed and hallucination_detected
    severity LowCardinality(Nullable(String)),
    -- hallucination_detected
    detection_method Nullable(String),
    confidence Nullable(Float64),
    claim Nullable(String),
    evidence Nullable(String),
    -- cost_threshold_exceeded
    threshold_usd Nullable(Float64),
    actual_usd Nullable(Float64),
    -- cost_threshold_exceeded and performance_alert (the event's `window`)
    alert_window Nullable(String),
    -- performance_alert (the event's `threshold` and `actual`)
    metric Nullable(String),
    metric_threshold Nullable(Float64),
    metric_actual Nullable(Float64),
    -- how the free-form fields are written (migration 0008): 0 before it, 1 JSON, 2 JSON and
    -- a prompt of chat messages
    value_format UInt8 DEFAULT 0,
    ingested_at DateTime64(3, 'UTC'),
    INDEX idx_event_id event_id TYPE bloom_filter(0.01) GRANULARITY 1,
    INDEX idx_run_id run_id TYPE bloom_filter(0.01) GRANULARITY 1
) ENGINE = ReplacingMergeTree(ingested_at)
PARTITION BY toYYYYMM(timestamp)
ORDER BY (project_id, timestamp, event_id)
-- an insert (up to 100,000 events) writes one compact part, not a file per column (0012)
SETTINGS index_granularity = 8192, min_rows_for_wide_part = 100000;

-- One row per tool call: each item of a prompt_call's tool_calls[] (source 'prompt_call',
-- call_index its position) and each tool_call event (source 'tool_call', call_index 0).
CREATE TABLE IF NOT EXISTS tool_calls (
    project_id LowCardinality(String),
    event_id String,
    call_index UInt16,
    source LowCardinality(String),
    run_id String,
    timestamp DateTime64(3, 'UTC'),
    tool_call_id Nullable(String),
    tool_name String,
    tool_input Nullable(String) CODEC(ZSTD(3)),
    tool_output Nullable(String) CODEC(ZSTD(3)),
    status LowCardinality(Nullable(String)),
    latency_ms Nullable(Float64),
    error_message Nullable(String),
    ingested_at DateTime64(3, 'UTC')
) ENGINE = ReplacingMergeTree(ingested_at)
PARTITION BY toYYYYMM(timestamp)
ORDER BY (project_id, timestamp, event_id, call_index);

CREATE TABLE IF NOT EXISTS agent_steps (
    project_id LowCardinality(String),
    event_id String,
    run_id String,
    timestamp DateTime64(3, 'UTC'),
    step_number UInt32,
    step_name Nullable(String),
    reasoning Nullable(String) CODEC(ZSTD(3)),
    action Nullable(String) CODEC(ZSTD(3)),
    observation Nullable(String) CODEC(ZSTD(3)),
    status LowCardinality(Nullable(String)),
    latency_ms Nullable(Float64),
    ingested_at DateTime64(3, 'UTC')
) ENGINE = ReplacingMergeTree(ingested_at)
PARTITION BY toYYYYMM(timestamp)
ORDER BY (project_id, timestamp, event_id);

-- OpenTelemetry spans as received (trace id = run_id, span id = event_id); spans that map to
-- an event type are also stored as events, the rest only here, so a trace tree stays whole.
CREATE TABLE IF NOT EXISTS spans (
    project_id LowCardinality(String),
    trace_id String,
    span_id String,
    parent_span_id Nullable(String),
    name String,
    kind LowCardinality(String),
    start_time DateTime64(6, 'UTC'),
    end_time DateTime64(6, 'UTC'),
    duration_ms Float64,
    status_code LowCardinality(String),
    status_message String,
    service_name LowCardinality(String),
    scope_name LowCardinality(String) DEFAULT '',
    scope_version String DEFAULT '',
    event_type LowCardinality(Nullable(String)),
    attributes Map(String, String),
    resource_attributes Map(String, String),
    span_events String CODEC(ZSTD(3)),
    links String,
    ingested_at DateTime64(3, 'UTC'),
    INDEX spans_trace_id trace_id TYPE bloom_filter(0.01) GRANULARITY 4
) ENGINE = ReplacingMergeTree(ingested_at)
PARTITION BY toYYYYMM(start_time)
ORDER BY (project_id, start_time, trace_id, span_id)
SETTINGS index_granularity = 8192, min_rows_for_wide_part = 100000;

-- Per-run rollup, computed when read from the deduplicated events (FINAL), so every figure is
-- exact even when an event was delivered twice (a replay after a crash, a client retry).
-- Cost and latency are clamped to the schema's ranges (migration 0007), sums are UInt128.
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
CREATE TABLE IF NOT EXISTS hourly_usage_by_project (
    project_id LowCardinality(String),
    hour DateTime('UTC'),
    model LowCardinality(String),
    event_type LowCardinality(String),
    status LowCardinality(String),
    events UInt64,
    -- UInt128 (migration 0007): no number of events can wrap these sums
    tokens_input UInt128,
    tokens_output UInt128,
    cost_nanousd UInt128,
    latency_sum_us UInt128,
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

-- Lookup from a parent id to its children (kept by a view); from an event id to its time,
-- see event_ids below.
CREATE TABLE IF NOT EXISTS event_children (
    project_id LowCardinality(String),
    parent_event_id String,
    event_id String,
    timestamp DateTime64(3, 'UTC')
) ENGINE = ReplacingMergeTree
ORDER BY (project_id, parent_event_id, event_id, timestamp);

CREATE MATERIALIZED VIEW IF NOT EXISTS event_children_mv TO event_children AS
SELECT project_id, assumeNotNull(parent_event_id) AS parent_event_id, event_id, timestamp
FROM events
WHERE parent_event_id IS NOT NULL;

-- One row per project and hour: distinct runs and users, and the prompt calls' latency sketch.
CREATE TABLE IF NOT EXISTS hourly_totals_by_project (
    project_id LowCardinality(String),
    hour DateTime('UTC'),
    call_latency AggregateFunction(quantilesDD(0.01, 0.5, 0.9, 0.95, 0.99), Nullable(Float64)),
    runs AggregateFunction(uniq, String),
    users AggregateFunction(uniq, Nullable(String)),
    computed_at DateTime64(6, 'UTC')
) ENGINE = ReplacingMergeTree(computed_at)
ORDER BY (project_id, hour);

-- The store sink's way in (0010): the events' JSON (the contract's keys) into Null-engine
-- input tables; the views build the rows of tool_calls and agent_steps (from
-- event_parts_input) and of events (from events_input), as store/rows.py tables_for does.
CREATE TABLE IF NOT EXISTS events_input (
    project_id String,
    event_id String,
    event_type String,
    run_id String,
    timestamp DateTime64(3, 'UTC'),
    parent_event_id Nullable(String),
    user_id Nullable(String),
    session_id Nullable(String),
    tags Array(String),
    release Nullable(String),
    env String DEFAULT 'production',
    client String,
    metadata String DEFAULT '{}',
    prompt Nullable(String),
    model Nullable(String),
    provider Nullable(String),
    tokens_input Nullable(UInt32),
    tokens_output Nullable(UInt32),
    cost_estimate_usd Nullable(Float64),
    cost_source Nullable(String),
    response Nullable(String),
    response_metadata Nullable(String),
    status Nullable(String),
    latency_ms Nullable(Float64),
    error_message Nullable(String),
    tool_calls Array(Tuple(
        id Nullable(String),
        tool_name String,
        tool_input Nullable(String),
        tool_output Nullable(String),
        status Nullable(String),
        latency_ms Nullable(Float64),
        error_message Nullable(String))),
    tool_name Nullable(String),
    tool_input Nullable(String),
    tool_output Nullable(String),
    step_number Nullable(UInt32),
    step_name Nullable(String),
    reasoning Nullable(String),
    action Nullable(String),
    observation Nullable(String),
    error_type Nullable(String),
    stack_trace Nullable(String),
    assertion_name Nullable(String),
    expected Nullable(String),
    actual Nullable(String),
    severity Nullable(String),
    detection_method Nullable(String),
    confidence Nullable(Float64),
    claim Nullable(String),
    evidence Nullable(String),
    threshold_usd Nullable(Float64),
    actual_usd Nullable(Float64),
    window Nullable(String),
    metric Nullable(String),
    threshold Nullable(Float64),
    value_format UInt8 DEFAULT if(startsWith(ifNull(prompt, ''), '['), 2, 1)
) ENGINE = Null;

CREATE TABLE IF NOT EXISTS event_parts_input AS events_input ENGINE = Null;

CREATE MATERIALIZED VIEW IF NOT EXISTS events_input_mv TO events AS
SELECT
    project_id, event_id, event_type, run_id, timestamp, parent_event_id, user_id, session_id,
    tags, release, env,
    JSONExtract(client, 'hostname', 'Nullable(String)') AS client_hostname,
    JSONExtract(client, 'sdk_version', 'Nullable(String)') AS client_sdk_version,
    JSONExtract(client, 'platform', 'Nullable(String)') AS client_platform,
    metadata, prompt, model, provider, tokens_input, tokens_output, cost_estimate_usd,
    cost_source, response,
    if(event_type = 'prompt_call', ifNull(response_metadata, '{}'), response_metadata)
        AS response_metadata,
    toUInt16(length(tool_calls)) AS tool_call_count,
    status, latency_ms, error_message, tool_name, tool_input, tool_output, step_number,
    step_name, reasoning, action, observation, error_type, stack_trace, assertion_name,
    expected,
    if(event_type = 'assertion_failed', actual, NULL) AS actual,
    severity, detection_method, confidence, claim, evidence, threshold_usd, actual_usd,
    window AS alert_window, metric, threshold AS metric_threshold,
    -- the input's `actual` (the alias above would be read otherwise)
    if(event_type = 'performance_alert', toFloat64OrNull(events_input.actual), NULL)
        AS metric_actual,
    value_format,
    now64(3, 'UTC') AS ingested_at
FROM events_input;

CREATE MATERIALIZED VIEW IF NOT EXISTS event_parts_tool_calls_mv TO tool_calls AS
SELECT
    project_id, event_id, toUInt16(index - 1) AS call_index, 'prompt_call' AS source, run_id,
    timestamp, call.id AS tool_call_id, call.tool_name AS tool_name,
    call.tool_input AS tool_input, call.tool_output AS tool_output, call.status AS status,
    call.latency_ms AS latency_ms, call.error_message AS error_message,
    now64(3, 'UTC') AS ingested_at
FROM event_parts_input
ARRAY JOIN tool_calls AS call, arrayEnumerate(tool_calls) AS index
WHERE event_type = 'prompt_call';

CREATE MATERIALIZED VIEW IF NOT EXISTS event_parts_tool_events_mv TO tool_calls AS
SELECT
    project_id, event_id, toUInt16(0) AS call_index, 'tool_call' AS source, run_id, timestamp,
    CAST(NULL, 'Nullable(String)') AS tool_call_id, assumeNotNull(tool_name) AS tool_name,
    tool_input, tool_output, status, latency_ms, error_message,
    now64(3, 'UTC') AS ingested_at
FROM event_parts_input
WHERE event_type = 'tool_call';

CREATE MATERIALIZED VIEW IF NOT EXISTS event_parts_agent_steps_mv TO agent_steps AS
SELECT
    project_id, event_id, run_id, timestamp, assumeNotNull(step_number) AS step_number,
    step_name, reasoning, action, observation, status, latency_ms,
    now64(3, 'UTC') AS ingested_at
FROM event_parts_input
WHERE event_type = 'agent_step';

-- An event's time from its id: the store sink's look-up of stored ids and the analytics'
-- lookups by id. Small granules, so the look-up of a batch's ids reads about one granule an
-- id, whatever the size of the table (0010; it replaces event_times since 0012).
CREATE TABLE IF NOT EXISTS event_ids (
    project_id LowCardinality(String),
    event_id String,
    timestamp DateTime64(3, 'UTC')
) ENGINE = ReplacingMergeTree
ORDER BY (project_id, event_id, timestamp)
SETTINGS index_granularity = 256, min_compress_block_size = 4096, max_compress_block_size = 16384;

CREATE MATERIALIZED VIEW IF NOT EXISTS event_ids_mv TO event_ids AS
SELECT project_id, event_id, timestamp
FROM events;
