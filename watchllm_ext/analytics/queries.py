"""Every analytics query, named, in one place.

User input reaches ClickHouse only as `{name:Type}` parameters. The few parts of SQL that
vary (a bucket expression, a group-by column) are chosen from the allow-lists below, never
built from request text. The same SQL runs on chDB and on a ClickHouse server.

Reads that count, sum or rank go through `events FINAL` (or the rollup, itself computed
from `events FINAL`), so an event delivered twice is counted once.
"""

from __future__ import annotations

from ..schema import MAX_COST_USD, MAX_LATENCY_MS

# Percentile levels and the DDSketch accuracy; the rollup's state type fixes them.
QUANTILES = "quantilesDD(0.01, 0.5, 0.9, 0.95, 0.99)"

# Sums kept as integers (nano-USD, microseconds): the order of addition cannot change them,
# so a rollup's sum of hourly sums equals the raw sum to the last digit. UInt128, so that no
# number of events can wrap a sum: each value is below 2**64 and count() is a UInt64.
# Values are clamped to the schema's ranges first: rows stored before the ranges existed
# (a cost of 1.7e308 once made these conversions fail) count at the bound instead.
_COST = f"least(greatest(ifNull(cost_estimate_usd, 0), 0), {MAX_COST_USD})"
_LATENCY = f"least(greatest(ifNull(latency_ms, 0), 0), {MAX_LATENCY_MS})"
# (Float64 to UInt64 first: converting a Float64 straight to UInt128 is twice as slow.)
COST_NANOS = f"toUInt128(toUInt64(round({_COST} * 1e9)))"
LATENCY_US = f"toUInt128(toUInt64(round({_LATENCY} * 1000)))"
TOKENS_IN = "toUInt128(ifNull(tokens_input, 0))"
TOKENS_OUT = "toUInt128(ifNull(tokens_output, 0))"
# The latency for sketches, clamped the same way, NULL kept (least() would drop it).
LATENCY = f"if(latency_ms > {MAX_LATENCY_MS}, {MAX_LATENCY_MS}, latency_ms)"
# A run's end: each event's time plus its (clamped) latency, so at most 30 days on.
EVENT_END = f"timestamp + toIntervalMillisecond(toInt64({_LATENCY}))"

# Group-by columns for timeseries, by their public name.
GROUP_COLUMNS = {"model": "model", "status": "status", "event_type": "event_type"}

# --- the rollup ---------------------------------------------------------------------------

# The latency sketch of prompt calls only (quantilesDD skips NULLs).
_CALL_LATENCY_STATE = (
    QUANTILES.replace("quantilesDD", "quantilesDDState")
    + f"(if(event_type = 'prompt_call', {LATENCY}, NULL))"
)

# On a replicated cluster, the rollup must not read a replica that lags: an hour computed
# from one would look clean while missing rows. Replicas more than a minute behind are
# skipped (an error if a shard has no fresher one: the rollup tries again later); the
# rollup task stamps its work ROLLUP_MARGIN_CLUSTER early to cover the rest. No effect on
# a single node.
_FRESH_REPLICAS = (
    "SETTINGS max_replica_delay_for_distributed_queries = 60,"
    " fallback_to_stale_replicas_for_distributed_queries = 0"
)

_DIRTY_HOURS = f"""
SELECT m.project_id AS project_id, toString(m.hour) AS hour
FROM (
    SELECT project_id, hour, max(marked_at) AS marked FROM rollup_marks
    WHERE hour < toStartOfHour(now64(3, 'UTC')){{skip}}
    GROUP BY project_id, hour
) AS m
LEFT JOIN (
    SELECT project_id, hour, max(computed_at) AS computed FROM hourly_usage_by_project
    GROUP BY project_id, hour
) AS r ON m.project_id = r.project_id AND m.hour = r.hour
WHERE m.marked >= r.computed
ORDER BY m.hour
LIMIT {{{{limit:UInt32}}}}
{_FRESH_REPLICAS}"""
DIRTY_HOURS = _DIRTY_HOURS.format(skip="")
# The same without the projects whose refresh failed lately (analytics/rollup.py), so that
# their hours, which stay dirty, cannot take the whole `limit` of every round.
DIRTY_HOURS_EXCEPT = _DIRTY_HOURS.format(skip="\n      AND project_id NOT IN {skip:Array(String)}")

# The rows a recomputation reads: the given hours of one project, deduplicated.
_RECOMPUTED_FROM = """    {computed_at:DateTime64(6, 'UTC')} AS computed_at
FROM events FINAL
WHERE project_id = {project:String}
  AND timestamp >= {first:DateTime64(3, 'UTC')} AND timestamp < {last:DateTime64(3, 'UTC')}
  AND toStartOfHour(timestamp) IN {hours:Array(DateTime('UTC'))}
"""

# Recompute whole hours of one project from the deduplicated events.
RECOMPUTE_HOURS = f"""
INSERT INTO hourly_usage_by_project
SELECT
    project_id,
    toStartOfHour(timestamp) AS hour,
    ifNull(model, '') AS model,
    event_type,
    ifNull(status, '') AS status,
    count() AS events,
    sum({TOKENS_IN}) AS tokens_input,
    sum({TOKENS_OUT}) AS tokens_output,
    sum({COST_NANOS}) AS cost_nanousd,
    sum({LATENCY_US}) AS latency_sum_us,
    count(latency_ms) AS latency_count,
    {QUANTILES.replace("quantilesDD", "quantilesDDState")}({LATENCY}) AS latency_quantiles,
    uniqState(run_id) AS runs,
    uniqState(user_id) AS users,
{_RECOMPUTED_FROM}GROUP BY project_id, hour, model, event_type, status
{_FRESH_REPLICAS}"""

# The same hours' per-hour states (migration 0006); run before RECOMPUTE_HOURS with the same
# computed_at, so an hour that hourly_usage_by_project calls clean has them too.
RECOMPUTE_HOURLY_TOTALS = f"""
INSERT INTO hourly_totals_by_project
SELECT
    project_id,
    toStartOfHour(timestamp) AS hour,
    {_CALL_LATENCY_STATE} AS call_latency,
    uniqState(run_id) AS runs,
    uniqState(user_id) AS users,
{_RECOMPUTED_FROM}GROUP BY project_id, hour
{_FRESH_REPLICAS}"""

# Per whole hour of [first_hour, end_hour): when its rollup was computed, and when events
# for it last arrived. An hour is clean (the rollup may answer for it) when computed after
# its last events, dirty otherwise; a missing side of the join reads as 1970.
_HOUR_WINDOW = """WHERE project_id = {project:String} AND hour >= {first_hour:DateTime('UTC')}
      AND hour < {end_hour:DateTime('UTC')}
    GROUP BY hour"""
_COMPUTED = (
    f"SELECT hour, max(computed_at) AS computed FROM hourly_usage_by_project\n    {_HOUR_WINDOW}"
)
_MARKED = f"SELECT hour, max(marked_at) AS marked FROM rollup_marks\n    {_HOUR_WINDOW}"

# Used as subqueries, so no list of hours travels as a parameter.
_CLEAN_SQL = f"""
SELECT r.hour
FROM ({_COMPUTED}) AS r
LEFT JOIN ({_MARKED}) AS m ON r.hour = m.hour
WHERE r.computed > m.marked
"""
_DIRTY_SQL = f"""
SELECT m.hour
FROM ({_MARKED}) AS m
LEFT JOIN ({_COMPUTED}) AS r ON m.hour = r.hour
WHERE m.marked >= r.computed
"""

CLEAN_HOURS = f"SELECT count() AS n FROM ({_CLEAN_SQL})"
_DIRTY_FOR_FORMAT = _DIRTY_SQL.replace("{", "{{").replace("}", "}}")
_CLEAN_FOR_FORMAT = _CLEAN_SQL.replace("{", "{{").replace("}", "}}")  # survives .format()

# The rows stats and timeseries aggregate: rollup rows for clean hours, and the same
# states computed from raw events for everything else in [from, to). `bucket_raw` and
# `bucket_rollup` are the bucket expressions (from BUCKETS) for the two sides.
_COMBINED = f"""
SELECT {{bucket_rollup}} AS bucket, model, event_type, status, events, tokens_input,
       tokens_output, cost_nanousd, latency_sum_us, latency_count, latency_quantiles, runs,
       users
FROM hourly_usage_by_project FINAL
WHERE project_id = {{{{project:String}}}} AND hour IN ({_CLEAN_FOR_FORMAT})
UNION ALL
SELECT {{bucket_raw}} AS bucket, ifNull(model, '') AS model, event_type,
       ifNull(status, '') AS status, count() AS events, sum({TOKENS_IN}),
       sum({TOKENS_OUT}), sum({COST_NANOS}), sum({LATENCY_US}), count(latency_ms),
       {QUANTILES.replace("quantilesDD", "quantilesDDState")}({LATENCY}),
       uniqState(run_id), uniqState(user_id)
FROM events FINAL
WHERE project_id = {{{{project:String}}}}
  AND timestamp >= {{{{from:DateTime64(3, 'UTC')}}}} AND timestamp < {{{{to:DateTime64(3, 'UTC')}}}}
  -- Raw rows: the partial hours at the edges and the dirty hours. Written as ranges and a
  -- set of hours (not "NOT IN clean") so that the primary key skips everything else.
  AND (timestamp < {{{{first_hour:DateTime('UTC')}}}}
       OR timestamp >= {{{{end_hour:DateTime('UTC')}}}}
       OR toStartOfHour(timestamp) IN ({_DIRTY_FOR_FORMAT}))
GROUP BY bucket, model, event_type, status
"""

_IS_CALL = "event_type = 'prompt_call'"
_QMERGE = QUANTILES.replace("quantilesDD", "quantilesDDMergeIf")

# Stats read sums from _COMBINED (one row per hour and group, summed), and the states that
# do not add up across groups (distinct runs and users, the calls' latency sketch) from
# hourly_totals_by_project: one state per hour for the clean hours, and the same states from
# raw events for the rest.
_HOURLY_STATES = f"""
SELECT call_latency, runs, users
FROM hourly_totals_by_project FINAL
WHERE project_id = {{project:String}} AND hour IN ({_CLEAN_SQL})
UNION ALL
SELECT {_CALL_LATENCY_STATE}, uniqState(run_id), uniqState(user_id)
FROM events FINAL
WHERE project_id = {{project:String}}
  AND timestamp >= {{from:DateTime64(3, 'UTC')}} AND timestamp < {{to:DateTime64(3, 'UTC')}}
  AND (timestamp < {{first_hour:DateTime('UTC')}}
       OR timestamp >= {{end_hour:DateTime('UTC')}}
       OR toStartOfHour(timestamp) IN ({_DIRTY_SQL}))
"""

STATS_STATES = f"""
SELECT
    {QUANTILES.replace("quantilesDD", "quantilesDDMerge")}(call_latency) AS latency_quantiles,
    uniqMerge(runs) AS distinct_runs,
    uniqMerge(users) AS distinct_users
FROM ({_HOURLY_STATES})
"""

# The sums per event type, model and outcome; the route adds them up into the totals, the
# events by type and the top models (one pass instead of three). Models past the top
# STATS_MODELS by prompt calls are summed under '' (the rows without a model), so the answer
# has at most types x (STATS_MODELS + 1) x 2 rows however many models the range has.
STATS_MODELS = 10
STATS_SUMS = f"""
SELECT
    event_type,
    if(model_rank <= {STATS_MODELS}, model, '') AS model,
    failed,
    sum(events) AS events,
    sum(tokens_input) AS tokens_input,
    sum(tokens_output) AS tokens_output,
    sum(cost_nanousd) AS cost_nanousd,
    sum(latency_sum_us) AS latency_sum_us,
    sum(latency_count) AS latency_count
FROM (
    SELECT *, dense_rank() OVER (ORDER BY model = '', model_calls DESC, model)
        AS model_rank
    FROM (
        SELECT *, sumIf(events, {_IS_CALL}) OVER (PARTITION BY model) AS model_calls
        FROM (
            SELECT
                event_type,
                model,
                status != 'success' AS failed,
                sum(events) AS events,
                sum(tokens_input) AS tokens_input,
                sum(tokens_output) AS tokens_output,
                sum(cost_nanousd) AS cost_nanousd,
                sum(latency_sum_us) AS latency_sum_us,
                sum(latency_count) AS latency_count
            FROM ({_COMBINED.format(bucket_rollup="0", bucket_raw="0")})
            GROUP BY event_type, model, failed
        )
    )
)
GROUP BY event_type, model, failed
ORDER BY event_type, model, failed
"""

# Bucket expressions: the interval's unit and count are parameters, the zone too.
_BUCKET = "toStartOfInterval({col}, toInterval{unit}({{step:UInt32}}), {{tz:String}})"
BUCKET_UNITS = ("Minute", "Hour", "Day")


def _timeseries(unit: str, group: str | None) -> str:
    group_select = f"{GROUP_COLUMNS[group]} AS grp, " if group else "'' AS grp, "
    combined = _COMBINED.format(
        # As DateTime64, as the raw side's timestamp: a day bucket that would start before
        # the epoch is 0 on both sides (a DateTime's is the next day; routes.timeseries).
        bucket_rollup=_BUCKET.format(col="toDateTime64(hour, 0, 'UTC')", unit=unit),
        bucket_raw=_BUCKET.format(col="timestamp", unit=unit),
    )
    return f"""
SELECT
    toUnixTimestamp(bucket) AS bucket,
    {group_select}
    sumIf(events, {_IS_CALL}) AS requests,
    sumIf(events, {_IS_CALL} AND status != 'success') AS errors,
    sum(events) AS all_events,
    sum(tokens_input) AS tokens_input,
    sum(tokens_output) AS tokens_output,
    sum(cost_nanousd) / 1e9 AS cost,
    {_QMERGE}(latency_quantiles, {_IS_CALL}) AS latency_quantiles
FROM ({combined})
GROUP BY bucket, grp
ORDER BY bucket, grp
"""


TIMESERIES = {
    (unit, group): _timeseries(unit, group)
    for unit in BUCKET_UNITS
    for group in (None, *GROUP_COLUMNS)
}

# With group_by, the answer is bounded whatever the number of groups: TIMESERIES_TOP ranks the
# groups of the range by a measure (allow-listed below) and answers the top {groups} of them
# with how many there are; TIMESERIES_GROUPED then gives those groups' points and, summed into
# one series (kept = 0), every other group's: "other" is total minus the top, by construction.
RANK_MEASURES = {
    "events": "sum(events)",
    "requests": f"sumIf(events, {_IS_CALL})",
    "errors": f"sumIf(events, {_IS_CALL} AND status != 'success')",
    "cost": "sum(cost_nanousd)",
    "tokens": "sum(tokens_input) + sum(tokens_output)",
}


def _timeseries_top(group: str, measure: str) -> str:
    combined = _COMBINED.format(bucket_rollup="0", bucket_raw="0")
    return f"""
SELECT grp, count() OVER () AS groups_total
FROM (
    SELECT {GROUP_COLUMNS[group]} AS grp, {RANK_MEASURES[measure]} AS measure
    FROM ({combined})
    GROUP BY grp
)
ORDER BY measure DESC, grp
LIMIT {{groups:UInt32}}
"""


def _timeseries_grouped(unit: str, group: str) -> str:
    column = GROUP_COLUMNS[group]
    return (
        _timeseries(unit, group)
        .replace(
            f"{column} AS grp, ",
            f"{column} IN {{top:Array(String)}} AS kept, if(kept, {column}, '') AS grp, ",
        )
        .replace("GROUP BY bucket, grp", "GROUP BY bucket, kept, grp")
        .replace("ORDER BY bucket, grp", "ORDER BY bucket, kept, grp")
    )


TIMESERIES_TOP = {(g, m): _timeseries_top(g, m) for g in GROUP_COLUMNS for m in RANK_MEASURES}
TIMESERIES_GROUPED = {
    (unit, group): _timeseries_grouped(unit, group)
    for unit in BUCKET_UNITS
    for group in GROUP_COLUMNS
}

# The zones this store's ClickHouse knows (analytics/params.py takes those Python knows too).
TIME_ZONES = "SELECT time_zone FROM system.time_zones"

# --- logs, events, runs -----------------------------------------------------------------------

# A row of logs or of a run tree is a summary, cut here so that long values never leave
# ClickHouse: error_message and the prompt/response previews at SUMMARY_CHARS characters
# (whole characters: substringUTF8, never half of one), tags at the first SUMMARY_TAGS. The
# *_cut flags say which were cut (routes.py lists them in `truncated_fields`); the whole
# values stay in /v1/analytics/event/{id}. New names (not `tags AS tags`): an alias would
# shadow the column for the length checks and for the `tag` filter of LOGS.
SUMMARY_CHARS = 200
SUMMARY_TAGS = 16
LOG_COLUMNS = f"""
    event_id, event_type, toString(timestamp) AS ts, run_id, parent_event_id, user_id,
    session_id, model, provider, status, latency_ms, tokens_input, tokens_output,
    cost_estimate_usd, cost_source, tool_name, step_name, error_type,
    substringUTF8(error_message, 1, {SUMMARY_CHARS}) AS error_message_head,
    lengthUTF8(ifNull(error_message, '')) > {SUMMARY_CHARS} AS error_message_cut,
    arraySlice(tags, 1, {SUMMARY_TAGS}) AS tags_head,
    length(tags) > {SUMMARY_TAGS} AS tags_cut,
    substringUTF8(ifNull(prompt, ''), 1, {SUMMARY_CHARS}) AS prompt_preview,
    lengthUTF8(ifNull(prompt, '')) > {SUMMARY_CHARS} AS prompt_cut,
    substringUTF8(ifNull(response, ''), 1, {SUMMARY_CHARS}) AS response_preview,
    lengthUTF8(ifNull(response, '')) > {SUMMARY_CHARS} AS response_cut
"""

# A lower bound of a summary's size as JSON, in bytes: its text in UTF-8 plus 300 for the
# keys (a node's JSON has more than 500 bytes of them), so RUN_EVENTS can drop in SQL the
# rows that cannot fit a byte budget; routes.py then counts the exact JSON.
SUMMARY_BYTES = """(300 + length(event_id) + length(event_type) + length(run_id)
    + length(ifNull(parent_event_id, '')) + length(ifNull(user_id, ''))
    + length(ifNull(session_id, '')) + length(ifNull(model, '')) + length(ifNull(provider, ''))
    + length(ifNull(status, '')) + length(ifNull(cost_source, ''))
    + length(ifNull(tool_name, '')) + length(ifNull(error_message_head, ''))
    + length(ifNull(step_name, '')) + length(ifNull(error_type, ''))
    + arraySum(arrayMap(t -> length(t), tags_head))
    + length(prompt_preview) + length(response_preview))"""

# Keyset pagination, newest first: rows strictly after the cursor's (timestamp, event_id).
# Each filter is "no filter" when its parameter is empty.
LOGS = f"""
SELECT {LOG_COLUMNS}
FROM events FINAL
WHERE project_id = {{project:String}}
  AND timestamp >= {{from:DateTime64(3, 'UTC')}} AND timestamp < {{to:DateTime64(3, 'UTC')}}
  AND ({{has_cursor:UInt8}} = 0
       OR (timestamp, event_id) < ({{cursor_ts:DateTime64(3, 'UTC')}}, {{cursor_id:String}}))
  AND ({{status:String}} = '' OR status = {{status:String}})
  AND ({{model:String}} = '' OR model = {{model:String}})
  AND ({{run_id:String}} = '' OR run_id = {{run_id:String}})
  AND ({{user_id:String}} = '' OR user_id = {{user_id:String}})
  AND ({{event_type:String}} = '' OR event_type = {{event_type:String}})
  AND ({{tag:String}} = '' OR has(tags, {{tag:String}}))
  AND ({{q:String}} = ''
       OR positionCaseInsensitiveUTF8(ifNull(prompt, ''), {{q:String}}) > 0
       OR positionCaseInsensitiveUTF8(ifNull(response, ''), {{q:String}}) > 0)
ORDER BY timestamp DESC, event_id DESC
LIMIT {{limit:UInt32}}
"""

# Lookups by id read without FINAL (which would merge the whole project first) and keep the
# latest delivery of each row, as ReplacingMergeTree(ingested_at) does.
# An event's time from its id (event_ids, migrations 0010 and 0012), so the lookups below
# read by primary key.
_EVENT_TIMES = """timestamp IN (
    SELECT timestamp FROM event_ids
    WHERE project_id = {project:String} AND event_id = {event_id:String})"""

EVENT = f"""
SELECT * EXCEPT (ingested_at)
FROM events
WHERE project_id = {{project:String}} AND event_id = {{event_id:String}} AND {_EVENT_TIMES}
ORDER BY ingested_at DESC
LIMIT 1
"""

EVENT_TOOL_CALLS = f"""
SELECT call_index, source, tool_call_id, tool_name, tool_input, tool_output, status,
       latency_ms, error_message
FROM tool_calls
WHERE project_id = {{project:String}} AND event_id = {{event_id:String}} AND {_EVENT_TIMES}
ORDER BY call_index, ingested_at DESC
LIMIT 1 BY call_index
"""

EVENT_AGENT_STEPS = f"""
SELECT step_number, step_name, reasoning, action, observation, status, latency_ms
FROM agent_steps
WHERE project_id = {{project:String}} AND event_id = {{event_id:String}} AND {_EVENT_TIMES}
ORDER BY step_number, ingested_at DESC
LIMIT 1 BY step_number
"""

EVENT_CHILDREN = """
SELECT event_id FROM event_children
WHERE project_id = {project:String} AND parent_event_id = {event_id:String}
GROUP BY event_id
ORDER BY min(timestamp), event_id
LIMIT 1000
"""

# The events and the spans a run tree holds at most, each (the route's `limit` may ask fewer).
MAX_TREE_NODES = 10_000

_RUN_FIGURES = f"""
    run_id,
    toString(min(timestamp)) AS start,
    toString(max({EVENT_END})) AS end,
    dateDiff('millisecond', min(timestamp), max({EVENT_END})) AS duration_ms,
    sum({COST_NANOS}) / 1e9 AS cost,
    sum({TOKENS_IN}) AS tokens_input,
    sum({TOKENS_OUT}) AS tokens_output,
    count() AS event_count,
    countIf(event_type = 'error' OR ifNull(status, 'success') NOT IN ('success', 'warning'))
        AS error_count
"""

# Runs that started in [from, to): a run with an event in the range whose first event (over
# all time: a run may have begun before the range) is in it. Newest first, keyset-paginated on
# (start, run_id); the figures cover each run's whole life, not only the part in the range.
RUNS = f"""
WITH started AS (
    SELECT run_id, min(timestamp) AS first_seen
    FROM events  -- no FINAL needed: a duplicate cannot change a minimum
    WHERE project_id = {{project:String}}
      AND run_id IN (
          SELECT run_id FROM events
          WHERE project_id = {{project:String}}
            AND timestamp >= {{from:DateTime64(3, 'UTC')}}
            AND timestamp < {{to:DateTime64(3, 'UTC')}})
      AND timestamp < {{to:DateTime64(3, 'UTC')}}
    GROUP BY run_id
    HAVING first_seen >= {{from:DateTime64(3, 'UTC')}}
       AND ({{has_cursor:UInt8}} = 0
            OR (first_seen, run_id) < ({{cursor_ts:DateTime64(3, 'UTC')}}, {{cursor_id:String}}))
    ORDER BY first_seen DESC, run_id DESC
    LIMIT {{limit:UInt32}}
)
SELECT {_RUN_FIGURES}
FROM (
    SELECT * FROM events
    WHERE project_id = {{project:String}} AND run_id IN (SELECT run_id FROM started)
      -- exact: a listed run has no event before the window
      AND timestamp >= {{from:DateTime64(3, 'UTC')}}
    ORDER BY ingested_at DESC
    LIMIT 1 BY event_id
)
GROUP BY run_id
ORDER BY min(timestamp) DESC, run_id DESC
"""

# One run's events, each once (its latest delivery), without FINAL.
_RUN_ROWS = """
SELECT * FROM events
WHERE project_id = {project:String} AND run_id = {run_id:String}
ORDER BY ingested_at DESC
LIMIT 1 BY event_id
"""

RUN = f"""
SELECT {_RUN_FIGURES}
FROM ({_RUN_ROWS})
GROUP BY run_id
"""


# The columns of LOGS, so that an event in a run tree reads as it does in /logs (cost_source,
# user, session and tags included).
# At most MAX_TREE_NODES events, and only those whose summaries, added up in time order, start
# within {max_bytes}: a run of 10,000 fat events never reaches Python whole.
def _run_events(limit: str) -> str:
    return f"""
SELECT * FROM (
    SELECT *, sum(row_bytes) OVER (ORDER BY sort_ts, event_id ROWS UNBOUNDED PRECEDING)
        - row_bytes AS bytes_before
    FROM (
        SELECT {LOG_COLUMNS}, timestamp AS sort_ts, {SUMMARY_BYTES} AS row_bytes
        FROM ({_RUN_ROWS})
        ORDER BY timestamp, event_id
        LIMIT {limit}
    )
)
WHERE bytes_before < {{max_bytes:UInt64}}
ORDER BY sort_ts, event_id
"""


RUN_EVENTS = _run_events("{limit:UInt32}")

# --- the spans of a run (an OpenTelemetry trace: run_id = trace id) ---------------------------
# `spans` is a ReplacingMergeTree keyed on (project, start time, trace, span): FINAL keeps one
# copy of a span sent twice. The table has no index on trace_id, so the trace's start times
# are found first without FINAL, and FINAL then reads only the granules of that time range:
# 10 ms instead of 60 ms for a trace among 1,000,000 spans of its project (chDB,
# docs/ANALYTICS.md). A span sent again with another start time (a client that re-stamps a
# retry) is another key to the table: LIMIT 1 BY keeps its newest copy, as FINAL does.
_TRACE_FILTER = "project_id = {project:String} AND trace_id = {run_id:String}"
_TRACE_SPANS = f"""
SELECT * FROM spans FINAL
WHERE {_TRACE_FILTER}
  AND start_time >= (SELECT min(start_time) FROM spans WHERE {_TRACE_FILTER})
  AND start_time <= (SELECT max(start_time) FROM spans WHERE {_TRACE_FILTER})
ORDER BY ingested_at DESC, start_time DESC
LIMIT 1 BY span_id
"""

# The trace's figures: whether it has spans at all (a trace whose spans are none of them LLM
# work has no events, yet is a run), and its time span for the run's figures then.
RUN_SPAN_FIGURES = f"""
SELECT count() AS span_count,
       toString(min(start_time)) AS start,
       toString(max(end_time)) AS end,
       dateDiff('millisecond', min(start_time), max(end_time)) AS duration_ms,
       countIf(status_code = 'error') AS error_count
FROM ({_TRACE_SPANS})
"""

# A span in a run tree is a summary, like an event's: name and status message cut at
# SUMMARY_CHARS characters, the first SPAN_ATTRIBUTES attributes in the order sent with
# keys and values cut at SUMMARY_CHARS; `*_cut` flags say what was cut. The whole span is
# in the `spans` table (resource attributes, span events and links are only counted here).
SPAN_ATTRIBUTES = 32
SPAN_COLUMNS = f"""
    span_id, parent_span_id, kind, toString(start_time) AS ts, toString(end_time) AS end_ts,
    duration_ms, status_code, service_name, event_type,
    substringUTF8(name, 1, {SUMMARY_CHARS}) AS name_head,
    lengthUTF8(name) > {SUMMARY_CHARS} AS name_cut,
    substringUTF8(status_message, 1, {SUMMARY_CHARS}) AS status_message_head,
    lengthUTF8(status_message) > {SUMMARY_CHARS} AS status_message_cut,
    arrayMap(k -> substringUTF8(k, 1, {SUMMARY_CHARS}),
             arraySlice(mapKeys(attributes), 1, {SPAN_ATTRIBUTES})) AS attribute_keys,
    arrayMap(v -> substringUTF8(v, 1, {SUMMARY_CHARS}),
             arraySlice(mapValues(attributes), 1, {SPAN_ATTRIBUTES})) AS attribute_values,
    length(attributes) AS attribute_count,
    length(attributes) > {SPAN_ATTRIBUTES}
        OR arrayExists(t -> lengthUTF8(t) > {SUMMARY_CHARS},
                       arraySlice(arrayConcat(mapKeys(attributes), mapValues(attributes)), 1,
                                  2 * {SPAN_ATTRIBUTES})) AS attributes_cut,
    JSONLength(span_events) AS span_event_count,
    JSONLength(links) AS link_count
"""
# A lower bound of a span summary's JSON size (as SUMMARY_BYTES for events): its text plus
# 400 for the keys, plus quotes, colon and comma around each attribute.
SPAN_SUMMARY_BYTES = """(400 + length(span_id) + length(ifNull(parent_span_id, ''))
    + length(name_head) + length(kind) + length(status_message_head) + length(service_name)
    + length(ifNull(event_type, ''))
    + arraySum(arrayMap(t -> length(t) + 3, attribute_keys))
    + arraySum(arrayMap(t -> length(t) + 3, attribute_values)))"""


# The first MAX_TREE_NODES spans in start order whose summaries, added up, start within
# {max_bytes}: as RUN_EVENTS, a trace of 10,000 fat spans never reaches Python whole.
def _run_spans(limit: str) -> str:
    return f"""
SELECT * FROM (
    SELECT *, sum(row_bytes) OVER (ORDER BY sort_ts, span_id ROWS UNBOUNDED PRECEDING)
        - row_bytes AS bytes_before
    FROM (
        SELECT {SPAN_COLUMNS}, start_time AS sort_ts, {SPAN_SUMMARY_BYTES} AS row_bytes
        FROM ({_TRACE_SPANS})
        ORDER BY start_time, span_id
        LIMIT {limit}
    )
)
WHERE bytes_before < {{max_bytes:UInt64}}
ORDER BY sort_ts, span_id
"""


RUN_SPANS = _run_spans("{limit:UInt32}")
