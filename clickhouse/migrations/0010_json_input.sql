-- 0010: events go in as JSON, parsed by ClickHouse in its own threads, and the look-up of
-- stored ids stops growing with the table.
--
-- The store sink inserts the events' JSON (the contract's keys, one object per event) into
-- two Null-engine input tables, `INSERT INTO ... FORMAT JSONEachRow`, with the settings in
-- watchllm_ext/store/rows.py (JSON_INPUT_SETTINGS: objects, arrays, numbers and booleans read
-- as their JSON text where the column is a String). Materialized views turn each block into
-- the rows that watchllm_ext/store/rows.py tables_for() builds in Python, column for column:
--   event_parts_input -> tool_calls (prompt_call items, tool_call events) and agent_steps;
--   events_input      -> events (inserted second, so an id in event_times has all its rows).
-- The free-form fields (metadata, response_metadata, tool_input, tool_output, expected,
-- actual) arrive as the JSON text the encoder wrote; a string in them that would parse as
-- JSON arrives already in its stored form (a JSON string, as rows._json writes it). A prompt
-- that is a list of chat messages arrives as its JSON text (it starts with '['); a text
-- prompt starting with '[' comes with value_format 1, so it is not mistaken for one.

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

-- The store sink's look-up of stored ids (store_sink.py lookup_times). event_times has the
-- same key, but with 8,192 rows a granule a look-up of 1,000 scattered ids reads nearly every
-- granule (~70 ms at two million rows, ~390 ms at ten million on this machine); with 256 rows
-- a granule and small compression blocks it reads ~1,000 small granules whatever the size
-- of the table (~40-55 ms from two to ten million). Kept by a view like event_times.
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

-- Events stored before this migration.
INSERT INTO event_ids
SELECT project_id, event_id, timestamp
FROM event_times;
