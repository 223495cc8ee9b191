-- 0005: lookups from an event id, and from a parent event id, to the event's time. The event
-- tables are ordered by (project, time, id), so a lookup by id alone must test every granule
-- of the project (bloom filters, 0003, make that ~35 ms at ten million events); these small
-- tables are ordered by id, so event detail and a parent's children read a few granules, then
-- fetch the rows by primary key (project, time). Kept by materialized views on every insert;
-- duplicates collapse like the events' (ReplacingMergeTree on the whole key).

CREATE TABLE IF NOT EXISTS event_times (
    project_id LowCardinality(String),
    event_id String,
    timestamp DateTime64(3, 'UTC')
) ENGINE = ReplacingMergeTree
ORDER BY (project_id, event_id, timestamp);

CREATE TABLE IF NOT EXISTS event_children (
    project_id LowCardinality(String),
    parent_event_id String,
    event_id String,
    timestamp DateTime64(3, 'UTC')
) ENGINE = ReplacingMergeTree
ORDER BY (project_id, parent_event_id, event_id, timestamp);

CREATE MATERIALIZED VIEW IF NOT EXISTS event_times_mv TO event_times AS
SELECT project_id, event_id, timestamp
FROM events;

CREATE MATERIALIZED VIEW IF NOT EXISTS event_children_mv TO event_children AS
SELECT project_id, assumeNotNull(parent_event_id) AS parent_event_id, event_id, timestamp
FROM events
WHERE parent_event_id IS NOT NULL;

-- Events stored before this migration.
INSERT INTO event_times
SELECT project_id, event_id, timestamp
FROM events;

INSERT INTO event_children
SELECT project_id, assumeNotNull(parent_event_id) AS parent_event_id, event_id, timestamp
FROM events
WHERE parent_event_id IS NOT NULL;
