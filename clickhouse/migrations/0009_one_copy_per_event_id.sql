-- 0009: one stored copy per (project_id, event_id). From this version the store sink keeps any
-- copy of an id already stored out of the tables, whatever its timestamp (the first copy
-- stored wins, watchllm_ext/builtins/store_sink.py). Copies stored before it, which FINAL
-- cannot collapse (the tables are ordered by time, then id), are deleted here: of an id stored
-- with several timestamps the earliest stays, as when two copies race. The rollups of their
-- hours are deleted (a recomputation replaces only the groups an hour still has): an hour
-- without a rollup is read raw, and recomputed (its events marked it when they arrived). On a
-- store without such copies each statement reads event_times once and changes nothing.
-- The subqueries read another table, hence allow_nondeterministic_mutations (replicated
-- tables refuse such a mutation otherwise); event_times, which they read, is cleaned last.

DELETE FROM hourly_usage_by_project WHERE (project_id, hour) IN (
    SELECT project_id, toStartOfHour(later) FROM (
    SELECT project_id, event_id, arrayJoin(arrayPopFront(arraySort(groupUniqArray(timestamp)))) AS later
    FROM event_times
    GROUP BY project_id, event_id
    HAVING uniqExact(timestamp) > 1
    )
) SETTINGS allow_nondeterministic_mutations = 1;

DELETE FROM hourly_totals_by_project WHERE (project_id, hour) IN (
    SELECT project_id, toStartOfHour(later) FROM (
    SELECT project_id, event_id, arrayJoin(arrayPopFront(arraySort(groupUniqArray(timestamp)))) AS later
    FROM event_times
    GROUP BY project_id, event_id
    HAVING uniqExact(timestamp) > 1
    )
) SETTINGS allow_nondeterministic_mutations = 1;

DELETE FROM events WHERE (project_id, event_id, timestamp) IN (
    SELECT project_id, event_id, arrayJoin(arrayPopFront(arraySort(groupUniqArray(timestamp)))) AS later
    FROM event_times
    GROUP BY project_id, event_id
    HAVING uniqExact(timestamp) > 1
) SETTINGS allow_nondeterministic_mutations = 1;

DELETE FROM tool_calls WHERE (project_id, event_id, timestamp) IN (
    SELECT project_id, event_id, arrayJoin(arrayPopFront(arraySort(groupUniqArray(timestamp)))) AS later
    FROM event_times
    GROUP BY project_id, event_id
    HAVING uniqExact(timestamp) > 1
) SETTINGS allow_nondeterministic_mutations = 1;

DELETE FROM agent_steps WHERE (project_id, event_id, timestamp) IN (
    SELECT project_id, event_id, arrayJoin(arrayPopFront(arraySort(groupUniqArray(timestamp)))) AS later
    FROM event_times
    GROUP BY project_id, event_id
    HAVING uniqExact(timestamp) > 1
) SETTINGS allow_nondeterministic_mutations = 1;

DELETE FROM event_children WHERE (project_id, event_id, timestamp) IN (
    SELECT project_id, event_id, arrayJoin(arrayPopFront(arraySort(groupUniqArray(timestamp)))) AS later
    FROM event_times
    GROUP BY project_id, event_id
    HAVING uniqExact(timestamp) > 1
) SETTINGS allow_nondeterministic_mutations = 1;

DELETE FROM event_times WHERE (project_id, event_id, timestamp) IN (
    SELECT project_id, event_id, arrayJoin(arrayPopFront(arraySort(groupUniqArray(timestamp)))) AS later
    FROM event_times
    GROUP BY project_id, event_id
    HAVING uniqExact(timestamp) > 1
) SETTINGS allow_nondeterministic_mutations = 1;
